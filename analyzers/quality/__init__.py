"""Task quality of a compressed model against its original: LM, classification, NER, QA."""
from .evaluate import EvalConfig, evaluate  # noqa: F401
