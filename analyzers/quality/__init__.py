"""Task quality of a compressed model against its original: LM, classification, NER, QA.

Importing the package registers the built-in tasks (tasks.py); registry.py adds others."""
from .evaluate import EvalConfig, evaluate, evaluate_packed
from .metrics import Metric
from .registry import TASKS, Task, TaskData, register, registered, unregister

__all__ = ["EvalConfig", "evaluate", "evaluate_packed", "Metric", "TASKS", "Task", "TaskData", "register",
           "registered", "unregister"]
