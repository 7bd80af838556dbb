"""A task model's own examples for quantization-aware training (task-aware QAT).

    task = resolve_task(model, "auto")                 # cls | tok | qa from the head, else lm
    train, held_out, where = task_examples(model, tokenizer, task, train_cfg)
    train_qat(student, model, structure, train, ...)  # train is a compressor.train.ExampleSource
    quality_measure(model, held_out)(ternary)          # own-head metric and agreement with the teacher

The data is read with the evaluation readers (GLUE .tsv / CoNLL columns / SQuAD .json(.zip) /
.jsonl / .csv, analyzers/quality/data.py) and tokenized once with the evaluation encoders;
`TaskExamples.batch` pads each batch to its own longest example. Labels are given as the model's
head numbers them (config.label2id; GLUE's 0/1 also by number), so a label the head does not know
is refused before any compute, as is plain LM text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.modelio import ModelIO, device_of, task_forward

from . import data as qdata
from .encode import batches, collate, ready_tokenizer
from .features import cls_features, qa_features, tok_features
from .registry import get, use_own_head

HEAD_TASKS = ("cls", "tok", "qa")
FORMATS = {"cls": "classification examples (GLUE .tsv, .csv or .jsonl with text and label columns)",
           "tok": "tagged words (CoNLL word ... tag columns, or .jsonl tokens/ner_tags)",
           "qa": "QA examples (SQuAD .json or .zip, or .jsonl)"}
LM_TEXT_SUFFIXES = (".txt", ".tokens", ".raw")
QUALITY_METRIC = {"cls": "accuracy", "tok": "token_accuracy", "qa": "span_exact"}


def head_task(model) -> str | None:
    """cls | tok | qa when the model is a transformers model with that task's own head."""
    return next((name for name in HEAD_TASKS if use_own_head(model, get(name), "auto")), None)


def resolve_task(model, requested: str) -> str:
    """What QAT trains on: `requested` (TrainConfig.task), or with "auto" the model's head task
    (lm without one). A task the head does not do is refused."""
    head = head_task(model)
    if requested == "auto":
        return head or "lm"
    if requested in ("lm", head):
        return requested
    what = f"a {get(head).title} head (--task {head})" if head else "no cls/tok/qa head"
    raise TritpressError(f"--task {requested} does not match the model: {type(model).__name__} has {what}")


@dataclass
class TaskExamples:
    """Encoded examples of one task (a compressor.train.ExampleSource): one feature dict of
    token lists and labels per example (per window for qa)."""
    task: str
    features: list[dict]
    pad_id: int
    examples: int          # examples read (questions for qa: each gives one or more windows)
    source: str

    def __len__(self) -> int:
        return len(self.features)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.features[i] for i in indices], self.pad_id)


# ------------------------------------------------------------------ reading


def _plain_text(task: str, spec: str) -> bool:
    """LM text where a task's examples are expected: pkg:ptb, a .txt for cls/qa, or for tok a file
    whose lines are not word ... tag columns (the same number of them, at least two, on every line)."""
    if spec.startswith("pkg:"):
        return True
    path = Path(spec)
    if not path.is_file():
        return False
    if task != "tok":
        return path.suffix.lower() in LM_TEXT_SUFFIXES
    if path.suffix.lower() in (".jsonl", ".json", ".gz"):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.split() for _, line in zip(range(200), f) if line.strip()]
    widths = {len(parts) for parts in lines if parts[0] != "-DOCSTART-"}
    return len(widths) > 1 or min(widths, default=2) < 2


def read_task_data(task: str, spec: str, split: str, text_column: str | None = None):
    """ClsData / TokData / QAData of `spec`, or a one-line error for data of the wrong kind."""
    if _plain_text(task, spec):
        raise TritpressError(f"{spec} looks like plain text, but QAT of a {task} model trains on its "
                             f"{FORMATS[task]}; pass --task lm to distil it on text instead")
    try:
        if task == "cls":
            return qdata.read_cls(spec, split, qdata.Columns(text=text_column))
        return qdata.read_tok(spec, split) if task == "tok" else qdata.read_qa(spec, split)
    except TritpressError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # rows without the task's fields
        raise TritpressError(f"{spec} is not {FORMATS[task]}: missing or bad field {e}") from e


def head_label_ids(model, names: list[str], spec: str) -> dict[str, int]:
    """The head's class number of each label name in the data: by config.label2id, else (GLUE's
    0/1 under a head named LABEL_0/LABEL_1) by the number itself."""
    n = int(model.config.num_labels)
    label2id = {str(k): int(v) for k, v in (getattr(model.config, "label2id", None) or {}).items()}
    if all(name in label2id for name in names):
        return {name: label2id[name] for name in names}
    numbered = lambda s: s.isdigit() and int(s) < n  # noqa: E731
    if all(numbered(name) for name in names):
        return {name: int(name) for name in names}
    unknown = [name for name in names if name not in label2id and not numbered(name)]
    raise TritpressError(f"{spec} has labels {unknown[:5]} that the model's head does not know (its {n} labels: "
                         f"{', '.join(list(label2id)[:8])})")


# ------------------------------------------------------------------ encoding


def encode_examples(model, tok, task: str, d, spec: str, tcfg) -> TaskExamples:
    """The examples' features, labels numbered as the model's own head numbers them."""
    if task == "cls":
        ids = head_label_ids(model, d.label_names, spec)
        feats = cls_features(tok, d, tcfg.seq_len, [ids[name] for name in d.label_names])
    elif task == "tok":
        feats = tok_features(tok, d, tcfg.seq_len, head_label_ids(model, sorted({t for s in d.tags for t in s}), spec))
    else:
        feats = qa_features(tok, d, SimpleNamespace(qa_max_length=tcfg.seq_len, doc_stride=tcfg.doc_stride))
    return TaskExamples(task, feats, tok.pad_token_id, d.size, spec)


def task_examples(model, tokenizer, task: str, tcfg) -> tuple[TaskExamples, TaskExamples, str]:
    """(training examples, held-out examples, where the held-out ones come from) of TrainConfig
    `tcfg`: --data, and --eval-data or else the last 5% of --data (at most eval_examples)."""
    if tokenizer is None:
        raise TritpressError(f"QAT on {task} examples needs the model's tokenizer; the checkpoint has none")
    tok = ready_tokenizer(tokenizer, need_fast=task != "cls")
    tok.padding_side = "right"  # the QA span labels index the unpadded prefix of each window
    column = None if tcfg.text_column == "text" else tcfg.text_column  # "text" is among the usual names
    train = read_task_data(task, tcfg.data, "train", column)
    if tcfg.eval_data:
        held_out, where = read_task_data(task, tcfg.eval_data, "validation", column), tcfg.eval_data
    else:
        train, held_out, where = _hold_out(task, train, tcfg)
    train = train.subset(qdata.subsample(train.size, tcfg.max_examples, tcfg.seed))
    held_out = held_out.subset(qdata.subsample(held_out.size, tcfg.eval_examples, tcfg.seed))
    return (encode_examples(model, tok, task, train, tcfg.data, tcfg),
            encode_examples(model, tok, task, held_out, tcfg.eval_data or tcfg.data, tcfg), where)


def _hold_out(task: str, train, tcfg):
    """The last 5% of --data (at most eval_examples) as the held-out split; for QA the last articles,
    since questions on one paragraph share its context and would leak it across the split."""
    if train.size < 2:
        raise TritpressError(f"{tcfg.data} holds {train.size} example: too few to hold some out; pass --eval-data")
    articles = list(dict.fromkeys(e.article for e in train.examples)) if task == "qa" else []
    if len(articles) >= 2:
        k = max(1, len(articles) // 20)
        kept, held_out = qdata.split_by_article(train, (len(articles) - k) / len(articles))
        return kept, held_out, f"last {k} of {len(articles)} articles of {tcfg.data} (held out from training)"
    n = min(tcfg.eval_examples or train.size, max(1, train.size // 20))
    return (train.subset(range(train.size - n)), train.subset(range(train.size - n, train.size)),
            f"last {n} examples of {tcfg.data} (held out from training)")


# ------------------------------------------------------------------ held-out quality


def _outcomes(task: str, student: list, teacher: list, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(right against the gold labels, same as the teacher) per scored unit: an example (cls), a
    word's first sub-token (tok), a window's start and end both (qa)."""
    if task == "cls":
        pred, ref = student[0].argmax(-1), teacher[0].argmax(-1)
        return pred == batch["labels"], pred == ref
    if task == "tok":
        scored = batch["labels"] != -100
        pred, ref = student[0].argmax(-1), teacher[0].argmax(-1)
        return (pred == batch["labels"])[scored], (pred == ref)[scored]
    quiet = ~batch["attention_mask"].bool()
    pred = [s.masked_fill(quiet, float("-inf")).argmax(-1) for s in student]
    ref = [t.masked_fill(quiet, float("-inf")).argmax(-1) for t in teacher]
    right = (pred[0] == batch["start_positions"]) & (pred[1] == batch["end_positions"])
    return right, (pred[0] == ref[0]) & (pred[1] == ref[1])


@torch.no_grad()
def _head_outputs(model, examples: TaskExamples, parts: list[range]) -> list[list[torch.Tensor]]:
    """The model's head logits (on the CPU) for each batch `parts` of the examples."""
    model.eval()
    io, device = ModelIO.of(model), device_of(model)
    out = []
    for part in parts:
        batch = {k: v.to(device) for k, v in examples.batch(list(part)).items()}
        out.append([x.cpu() for x in task_forward(io, model, batch)[0]])
    return out


def quality_measure(teacher, examples: TaskExamples, batch_size: int = 32) -> Callable[..., dict]:
    """model -> the task metric with its own head on the held-out examples (accuracy, token
    accuracy, or start-and-end exact for qa windows) and its agreement with the teacher, whose
    predictions are computed once, on first use."""
    parts = batches(len(examples), batch_size)
    reference: list = []

    def measure(model) -> dict:
        if not reference:
            reference.extend(_head_outputs(teacher, examples, parts))
        outputs = reference if model is teacher else _head_outputs(model, examples, parts)
        right, same = [], []
        for part, s, t in zip(parts, outputs, reference):
            r, a = _outcomes(examples.task, s, t, examples.batch(list(part)))
            right.append(r)
            same.append(a)
        right, same = torch.cat(right).float(), torch.cat(same).float()
        return {QUALITY_METRIC[examples.task]: float(right.mean()), "agreement": float(same.mean()),
                "scored": len(right)}
    return measure
