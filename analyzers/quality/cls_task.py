"""The text classification task (GLUE-style): accuracy, macro-F1, binary F1.

The model's own sequence-classification head when it has one; otherwise a linear probe on
the mean of the last hidden state over real tokens."""
from __future__ import annotations

import torch

from tritpress.compressor.errors import TritpressError
from tritpress.compressor import modelio

from . import data as qdata
from .encode import batches, encode_texts, map_batches, model_inputs, progress_bar, ready_tokenizer
from .bootstrap import classification_stats
from .metrics import classification_scores
from .probe import classifier_probe, probe_config
from .registry import TaskData, use_own_head


def read_cls(task, cfg, need_train: bool) -> list[TaskData]:
    """The probe's training data is read first: its label names order the evaluation labels."""
    cols = qdata.Columns(cfg.text_column, cfg.text_pair_column, cfg.label_column)
    spec, train_spec = task.eval_data(cfg), task.train_data(cfg)
    train = qdata.read_cls(train_spec or qdata.hf_train_spec(spec, task.train_flag, task.train_split),
                           task.train_split, cols) if need_train else None
    test = qdata.read_cls(spec, task.eval_split, cols, train.label_names if train else None)
    prot = {}
    test, prot["eval"] = qdata.sample(test, cfg.max_samples, cfg.seed, spec, task.eval_split)
    if train:
        train, prot["probe_train"] = qdata.sample(train, cfg.probe_samples, cfg.seed, train_spec or "train split",
                                                  task.train_split)
    return [TaskData(task.name, test, train, prot)]


def _pooled(model, tok, data, cfg, update) -> torch.Tensor:
    """Mean of the last hidden state over real tokens: one vector per example."""
    parts = batches(len(data.texts), cfg.batch_size)

    def one(i):
        enc = encode_texts(tok, data, parts[i], cfg.max_length)
        h = modelio.features(model, model_inputs(model, enc))
        mask = enc["attention_mask"].unsqueeze(-1).float()  # CPU, like h
        return list((h * mask).sum(1) / mask.sum(1))
    return torch.stack(map_batches(one, len(parts), update))


def _class_of_label(model, names: list[str]) -> list[int]:
    """The head's class id of each data label: by name when the head names its classes (id2label
    other than LABEL_k) and the data's labels are names, else by position (label k = class k)."""
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    by_name = {v.lower(): k for k, v in id2label.items()}
    named_head = any(v != f"LABEL_{k}" for k, v in id2label.items())
    named_data = not all(n.lstrip("-").isdigit() for n in names)
    if named_head and named_data:
        unknown = [n for n in names if n.lower() not in by_name]
        if unknown:
            raise TritpressError(f"the data has labels {unknown[:4]} that {type(model).__name__}'s head does not "
                                 f"know (its id2label: {sorted(id2label.values())[:6]})")
        return [by_name[n.lower()] for n in names]
    if model.config.num_labels != len(names):
        raise TritpressError(f"the model's classifier has {model.config.num_labels} labels, the data {len(names)}")
    return list(range(len(names)))


def check_cls(task, model, tokenizer, data: TaskData, cfg) -> None:
    """Before any forward: the model's own head must know the evaluation labels."""
    if use_own_head(model, task, cfg.probe):
        _class_of_label(model, data.test.label_names)


def _own_predictions(model, tok, test, cfg, desc: str) -> list[int]:
    label_of = {c: i for i, c in enumerate(_class_of_label(model, test.label_names))}  # other classes: -1, wrong
    parts = batches(len(test.texts), cfg.batch_size)
    with progress_bar(desc, len(test.texts), "ex", cfg.quiet) as update:
        classes = map_batches(lambda i: model(**model_inputs(model, encode_texts(tok, test, parts[i],
                              cfg.max_length))).logits.argmax(-1).tolist(), len(parts), update)
    return [label_of.get(c, -1) for c in classes]


def _probe_predictions(task, model, tok, train, test, cfg, desc: str, protocol: dict) -> list[int]:
    pc = probe_config(cfg, task)
    with progress_bar(desc + " (probe features)", len(train.texts) + len(test.texts), "ex", cfg.quiet) as u:
        x_train, x_test = _pooled(model, tok, train, cfg, u), _pooled(model, tok, test, cfg, u)
    probe = classifier_probe(x_train, torch.tensor(train.labels), len(test.label_names), pc)
    protocol.update(probe=pc.to_dict(), probe_train_examples=len(train.texts), pooling="mean")
    with torch.no_grad():
        return probe(x_test).argmax(-1).tolist()


def run_cls(task, model, tokenizer, data: TaskData, cfg, desc: str) -> dict:
    tok, test = ready_tokenizer(tokenizer), data.test
    protocol = {"eval_examples": len(test.texts), "labels": test.label_names, "max_length": cfg.max_length}
    if use_own_head(model, task, cfg.probe):
        preds, head = _own_predictions(model, tok, test, cfg, desc), "own"
    else:
        preds, head = _probe_predictions(task, model, tok, data.train, test, cfg, desc, protocol), "probe"
    scores = classification_scores(test.labels, preds, len(test.label_names))
    return {"metrics": scores, "protocol": protocol, "head": head,
            "per_example": classification_stats(test.labels, preds, len(test.label_names))}
