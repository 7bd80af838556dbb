"""The data of `compress finetune-head`: training and dev files read and checked before any
compute, training examples tokenized once without padding, and the batches of each epoch.

Batches are length-grouped: each epoch shuffles the examples (seeded by seed and epoch),
sorts every chunk of `group` batches by length and cuts it into batches, then shuffles the
batch order. Padding to the longest example of a batch (`collate`) then pads little, which
on a CPU is most of the cost of short-sentence tasks; every example is in exactly one batch
per epoch."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field


from tritpress.compressor.errors import TritpressError

from . import data as qdata
from .features import cls_features, qa_features, tok_features
from .registry import TaskData

TRAIN_SPLIT, DEV_SPLIT = "train", "validation"
@dataclass
class TaskFiles:
    """The training and dev data of one task, read and checked."""

    train: object                          # ClsData / TokData / QAData
    dev: object | None                     # the same type, scored by the task's runner
    labels: list[str] | None               # cls: label names; tok: tag names; qa: None
    provenance: dict = field(default_factory=dict)


@dataclass
class TrainSet:
    """Tokenized training features (QA: one per window), unpadded."""

    features: list[dict]
    lengths: list[int]
    examples: int                          # training examples (QA questions) they come from


# ------------------------------------------------------------------ reading and checking


def read_task_files(cfg) -> TaskFiles:
    """Training and dev data of cfg.task; a bad file is a one-line error here, before any compute."""
    train, dev, labels = {"cls": _read_cls, "tok": _read_tok, "qa": _read_qa}[cfg.task](cfg)
    prov = {}
    train, prov["train"] = qdata.sample(train, cfg.max_samples, cfg.seed, cfg.train, TRAIN_SPLIT)
    if dev is not None:
        dev, prov["dev"] = qdata.sample(dev, cfg.dev_samples, cfg.seed, cfg.dev, DEV_SPLIT)
    return TaskFiles(train, dev, labels, prov)


def _read_cls(cfg):
    cols = qdata.Columns(cfg.text_column, cfg.text_pair_column, cfg.label_column)
    train = qdata.read_cls(cfg.train, TRAIN_SPLIT, cols)
    if len(train.label_names) < 2:
        raise TritpressError(f"{cfg.train}: a classifier needs at least two labels, found {train.label_names}")
    # indexed by the training labels: a dev label they lack is read_cls's one-line error
    dev = qdata.read_cls(cfg.dev, DEV_SPLIT, cols, label_names=train.label_names) if cfg.dev else None
    return train, dev, train.label_names


def _iob_tags(d, spec: str) -> set[str]:
    tags = {t for s in d.tags for t in s}
    odd = sorted(t for t in tags if t != "O" and not t.startswith(("B-", "I-")))
    if odd:
        raise TritpressError(f"{spec}: tags {odd[:3]} are not IOB tags (O, B-X, I-X); expected a CoNLL column "
                             "file with the NER tag in the last column")
    return tags


def _read_tok(cfg):
    train = qdata.read_tok(cfg.train, TRAIN_SPLIT)
    tags = sorted(_iob_tags(train, cfg.train))
    dev = qdata.read_tok(cfg.dev, DEV_SPLIT) if cfg.dev else None
    if dev is not None:
        missing = sorted(_iob_tags(dev, cfg.dev) - set(tags))
        if missing:
            raise TritpressError(f"{cfg.dev} has tags {missing[:3]} that the training data {cfg.train} does not have")
    return train, dev, tags


def _read_squad(spec: str, split: str):
    try:
        d = qdata.read_qa(spec, split)
    except (KeyError, TypeError, AttributeError) as e:
        raise TritpressError(f"{spec} is not SQuAD-style QA data (no {e} field: needs id, question, context, "
                             "answers)") from e
    if not d.examples:
        raise TritpressError(f"{spec} holds no questions")
    return d


def _read_qa(cfg):
    train = _read_squad(cfg.train, TRAIN_SPLIT)
    dev = _read_squad(cfg.dev, DEV_SPLIT) if cfg.dev else None
    if cfg.qa_articles:
        train, _ = qdata.split_by_article(train, cfg.qa_articles)
        if dev is not None and _same_file(cfg.dev, cfg.train):
            # scoring the training articles would pick the checkpoint that memorized them best
            _, dev = qdata.split_by_article(dev, cfg.qa_articles)
    return train, dev, None


def _same_file(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def dev_task_data(task, files: TaskFiles) -> TaskData | None:
    """The dev split as the task runner takes it (the model's own head: no probe training data)."""
    return TaskData(task.name, files.dev, None, files.provenance) if files.dev is not None else None


# ------------------------------------------------------------------ tokenizing once


def train_features(cfg, tok, d, labels) -> TrainSet:
    """Every training example tokenized once; a new head numbers classes and tags in the data's order."""
    if cfg.task == "cls":
        features = cls_features(tok, d, cfg.max_length, list(range(len(d.label_names))))
    elif cfg.task == "tok":
        features = tok_features(tok, d, cfg.max_length, {t: i for i, t in enumerate(labels)})
    else:
        features = qa_features(tok, d, cfg)
    return TrainSet(features, [len(f["input_ids"]) for f in features], d.size)


# ------------------------------------------------------------------ batches


def epoch_batches(lengths: list[int], batch_size: int, group: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of every example exactly once, in length-grouped batches (module doc); the
    same seed and epoch give the same batches."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * max(1, group)
    out = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda k: lengths[k])
        out += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out
