"""The text classification task (GLUE-style): accuracy, macro-F1, binary F1.

The model's own sequence-classification head when it has one; otherwise a linear probe on
the mean of the last hidden state over real tokens."""
from __future__ import annotations

import torch

from tritpress.compressor.errors import TritpressError
from tritpress.compressor import modelio

from . import data as qdata
from .encode import batches, encode_texts, map_batches, model_inputs, progress_bar, ready_tokenizer
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


def _label_index(model, test) -> dict[int, int] | None:
    """Class id of the model -> label index of the data, by the label names in the model's config
    (finetune-head stores them: a dev file with fewer labels or another order is still scored
    right); None when the config does not name the data's labels (then by index)."""
    names = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if not set(test.label_names) <= set(names.values()):
        return None
    index = {name: i for i, name in enumerate(test.label_names)}
    return {k: index.get(name, -1) for k, name in names.items()}  # a label the data lacks: always wrong


def _own_predictions(model, tok, test, cfg, desc: str) -> list[int]:
    n_labels, by_name = len(test.label_names), _label_index(model, test)
    if by_name is None and model.config.num_labels != n_labels:
        raise TritpressError(f"the model's classifier has {model.config.num_labels} labels, the data {n_labels}")
    parts = batches(len(test.texts), cfg.batch_size)
    with progress_bar(desc, len(test.texts), "ex", cfg.quiet) as update:
        preds = map_batches(lambda i: model(**model_inputs(model, encode_texts(tok, test, parts[i],
                            cfg.max_length))).logits.argmax(-1).tolist(), len(parts), update)
    return [by_name[p] for p in preds] if by_name else preds


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
    return {"metrics": scores, "protocol": protocol, "head": head}
