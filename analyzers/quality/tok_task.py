"""The token classification task (NER, CoNLL-style): entity F1 (seqeval, lenient and strict)
and token accuracy. Each word is labelled at its first sub-token, by the model's own
token-classification head or a linear probe on frozen features. Plain tags (POS and the
like, --tag-scheme plain or detected) have no entities: token accuracy and tag macro-F1."""
from __future__ import annotations

import torch

from tritpress.compressor.errors import TritpressError
from tritpress.compressor import modelio

from . import data as qdata
from .encode import (batches, encode_words, first_subtokens, map_batches, model_inputs, progress_bar,
                     ready_tokenizer)
from .bootstrap import entity_stats, plain_tag_stats
from .metrics import entity_scores, tag_macro_f1, token_accuracy
from .probe import classifier_probe, probe_config
from .registry import TaskData, use_own_head


def read_tok(task, cfg, need_train: bool) -> list[TaskData]:
    spec, train_spec = task.eval_data(cfg), task.train_data(cfg)
    prot = {}
    full_test = qdata.read_tok(spec, task.eval_split, scheme=cfg.tag_scheme)
    test, prot["eval"] = qdata.sample(full_test, cfg.max_samples, cfg.seed, spec, task.eval_split)
    train = None
    if need_train:
        source = train_spec or qdata.hf_train_spec(spec, task.train_flag, task.train_split)
        full = qdata.read_tok(source, task.train_split, scheme=cfg.tag_scheme)
        if full.plain != test.plain:
            raise TritpressError(f"{spec} has {full_test.scheme} tags but {source} {full.scheme} tags; "
                                 "both must be entity (IOB) tags or both plain")
        train, prot["probe_train"] = qdata.sample(full, cfg.probe_samples, cfg.seed, train_spec or "train split",
                                                  task.train_split)
    prot["tag_scheme"] = full_test.scheme
    return [TaskData(task.name, test, train, prot)]


def check_tok(task, model, tokenizer, data: TaskData, cfg) -> None:
    """Before any forward: the model's own head must know the evaluation data's tags (for
    entity tags: their entity types; its id2label may be IOB1 or IOB2)."""
    if not use_own_head(model, task, cfg.probe):
        return
    labels = {str(v) for v in model.config.id2label.values()}
    gold = {t for s in data.test.tags for t in s}
    if data.test.plain:
        unknown = sorted(gold - labels)
    else:
        types = lambda tags: {t[2:] for t in tags if t != "O" and t[1:2] == "-"}  # noqa: E731
        unknown = sorted(types(gold) - types(labels))
    if unknown:
        raise TritpressError(f"{data.label}: the data has {'tags' if data.test.plain else 'entity types'} "
                             f"{unknown[:6]} that {type(model).__name__}'s head does not know (its labels: "
                             f"{sorted(labels)[:8]})")


def _word_outputs(model, tok, words, cfg, update, fn) -> list:
    """fn(per-token tensor [T, ...]) at each word's first sub-token; None for truncated words."""
    parts = batches(len(words), cfg.batch_size)

    def one(i):
        enc = encode_words(tok, words, parts[i], cfg.max_length)
        out = fn(model_inputs(model, enc))
        rows = []
        for r, s in enumerate(parts[i]):
            rows.append([None if t is None else out[r, t] for t in first_subtokens(enc, r, len(words[s]))])
        return rows
    return map_batches(one, len(parts), update)


def _own_tags(model, tok, test, cfg, update) -> list[list[str]]:
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    per_word = _word_outputs(model, tok, test.words, cfg, update, lambda enc: model(**enc).logits.argmax(-1).cpu())
    return [["O" if p is None else id2label[int(p)] for p in row] for row in per_word]


def _probe_tags(task, model, tok, train, test, cfg, update, protocol: dict) -> list[list[str]]:
    pc = probe_config(cfg, task)
    tags = sorted({t for s in train.tags for t in s})
    index = {t: i for i, t in enumerate(tags)}
    feats = lambda enc: modelio.features(model, enc)  # noqa: E731
    train_rows = _word_outputs(model, tok, train.words, cfg, update, feats)
    x = torch.stack([v for row in train_rows for v in row if v is not None])
    y = torch.tensor([index[t] for row, ts in zip(train_rows, train.tags) for v, t in zip(row, ts) if v is not None])
    probe = classifier_probe(x, y, len(tags), pc)
    test_rows = _word_outputs(model, tok, test.words, cfg, update, feats)
    flat = [v for row in test_rows for v in row if v is not None]
    with torch.no_grad():
        predicted = iter(probe(torch.stack(flat)).argmax(-1).tolist() if flat else [])
    protocol.update(probe=pc.to_dict(), probe_train_sentences=len(train.words), probe_train_words=len(y))
    return [["O" if v is None else tags[next(predicted)] for v in row] for row in test_rows]


def _scores(gold: list[list[str]], preds: list[list[str]], plain: bool) -> dict:
    if plain:
        return {"token_accuracy": token_accuracy(gold, preds), "tag_macro_f1": tag_macro_f1(gold, preds)}
    lenient, strict = entity_scores(gold, preds, "lenient"), entity_scores(gold, preds, "strict")
    return {"f1_lenient": lenient["f1"], "f1_strict": strict["f1"], "token_accuracy": token_accuracy(gold, preds),
            "precision_lenient": lenient["precision"], "recall_lenient": lenient["recall"],
            "precision_strict": strict["precision"], "recall_strict": strict["recall"]}


def run_tok(task, model, tokenizer, data: TaskData, cfg, desc: str) -> dict:
    tok, test, own = ready_tokenizer(tokenizer, need_fast=True), data.test, use_own_head(model, task, cfg.probe)
    protocol = {"eval_sentences": len(test.words), "eval_words": sum(map(len, test.words)),
                "tagging": "IOB2 (IOB1 input converted)", "first_subtoken_labels_word": True,
                "seqeval": {"lenient": "default (conlleval)", "strict": "mode='strict', scheme=IOB2"},
                "max_length": cfg.max_length}
    if test.plain:
        protocol.pop("seqeval")
        protocol["tagging"] = "plain tags (no entities): token accuracy, macro-F1 over the evaluation data's tags"
    with progress_bar(desc, len(test.words) + (0 if own else len(data.train.words)), "sent", cfg.quiet) as update:
        if own:
            preds, head = _own_tags(model, tok, test, cfg, update), "own"
        else:
            preds, head = _probe_tags(task, model, tok, data.train, test, cfg, update, protocol), "probe"
    stats = plain_tag_stats(test.tags, preds) if test.plain else entity_stats(test.tags, preds)
    return {"metrics": _scores(test.tags, preds, test.plain), "protocol": protocol, "head": head,
            "per_example": stats}
