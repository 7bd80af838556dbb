"""The built-in evaluation tasks, one registry entry each (lm-evaluation-harness style).

An entry names the task's data reader and runner (in the task's own module), its gated
metrics in report order (each declares its direction and default tolerance, metrics.py), the
EvalConfig keys of its data (recipe keys and --flags) and its protocol defaults. A model's own
head is used when it has one for the task; otherwise the probe protocol (probe.py), labelled so.
A new task is one more `register(Task(...))`, here or in any module imported before evaluation.
"""
from __future__ import annotations

from . import metrics as m
from .cls_task import check_cls, read_cls, run_cls
from .lm_task import check_lm, needs_lm_probe, read_lm, run_lm
from .lmeval_task import METRICS as LMEVAL_METRICS, check_lmeval, no_probe, read_lmeval, run_lmeval
from .qa_task import read_qa, run_qa
from tritpress.analyzers.defaults import DEFAULT_DATA

from .registry import Task, register
from .tok_task import check_tok, read_tok, run_tok

LM = register(Task(
    "lm", "language modeling", (m.PERPLEXITY, m.BITS_PER_BYTE), read_lm, run_lm,
    data_key="lm_data", train_key="lm_train", default_data=DEFAULT_DATA["lm"], eval_split="test",
    needs_probe=needs_lm_probe, probe_epochs=5, check=check_lm))

CLS = register(Task(
    "cls", "text classification", (m.ACCURACY, m.MACRO_F1, m.F1), read_cls, run_cls,
    data_key="cls_data", train_key="cls_train", default_data=DEFAULT_DATA["cls"],
    head_classes=("ForSequenceClassification",), probe_epochs=20, check=check_cls))

TOK = register(Task(
    "tok", "token classification (NER)", (m.F1_LENIENT, m.F1_STRICT, m.TOKEN_ACCURACY), read_tok, run_tok,
    data_key="tok_data", train_key="tok_train", default_data=DEFAULT_DATA["tok"],
    head_classes=("ForTokenClassification",),
    probe_epochs=10, check=check_tok, data_metrics=(m.TAG_MACRO_F1,)))

QA = register(Task(
    "qa", "extractive QA", (m.EXACT_MATCH, m.F1), read_qa, run_qa,
    data_key="qa_data", train_key="qa_train", default_data=DEFAULT_DATA["qa"],
    head_classes=("ForQuestionAnswering",), probe_epochs=10))

LMEVAL = register(Task(
    "lmeval", "lm-evaluation-harness", LMEVAL_METRICS, read_lmeval, run_lmeval, data_key="lmeval_tasks",
    needs_probe=no_probe, check=check_lmeval))
