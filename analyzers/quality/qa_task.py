"""The extractive QA task (SQuAD v1.1 / v2): exact match and F1, official normalization.

The model's own QA head when it has one; otherwise a span probe (start/end logits) on frozen
features of the windows (analyzers/quality/qa.py). A local --qa-data file without --qa-train
is split by article: the first articles train the probe, the others are evaluated."""
from __future__ import annotations

import torch

from tritpress.compressor import modelio

from . import data as qdata
from .encode import batches, map_batches, model_inputs, progress_bar, ready_tokenizer
from .bootstrap import squad_stats
from .metrics import squad_per_question, squad_scores
from .probe import probe_config, span_probe
from .qa import best_answer, encode_windows, span_labels
from .registry import TaskData, use_own_head


def _articles(d) -> int:
    return len({e.article for e in d.examples})


def _probe_split(task, cfg, test, prot: dict):
    """(probe training data, evaluation data): --qa-train, else a local file split by article,
    else the hub dataset's train split."""
    spec, train_spec = task.eval_data(cfg), task.train_data(cfg)
    if train_spec:
        return qdata.read_qa(train_spec, task.train_split), test
    if qdata.is_local(spec):
        train, test = qdata.split_by_article(test, cfg.qa_train_fraction)
        prot["split_by_article"] = (f"{spec} split by article: the first {_articles(train)} articles train the "
                                    f"probe, the other {_articles(test)} are evaluated")
        return train, test
    return qdata.read_qa(qdata.hf_train_spec(spec, task.train_flag, task.train_split), task.train_split), test


def read_qa(task, cfg, need_train: bool) -> list[TaskData]:
    spec = task.eval_data(cfg)
    test = qdata.read_qa(spec, task.eval_split)
    train, prot = None, {}
    if need_train:
        train, test = _probe_split(task, cfg, test, prot)
        train, prot["probe_train"] = qdata.sample(train, cfg.probe_samples, cfg.seed,
                                                  task.train_data(cfg) or spec, task.train_split)
    elif cfg.qa_heldout:  # own head fine-tuned on the first articles: score only the others
        seen, test = qdata.split_by_article(test, cfg.qa_train_fraction)
        prot["split_by_article"] = (f"{spec} split by article: only the last {_articles(test)} articles are "
                                    f"evaluated (the first {_articles(seen)} may have trained the head)")
    test, prot["eval"] = qdata.sample(test, cfg.max_samples, cfg.seed, spec, task.eval_split)
    return [TaskData(task.name, test, train, prot)]


def _window_features(model, tok, examples, cfg, update):
    """Frozen features [W, L, H] (fp16, padded to qa_max_length), context masks and labels."""
    parts = batches(len(examples), max(1, cfg.batch_size // 2))

    def one(i):
        chunk = [examples[k] for k in parts[i]]
        enc, sample, offsets, context = encode_windows(tok, chunk, cfg)
        h = modelio.features(model, model_inputs(model, enc)).half()
        starts, ends = span_labels(chunk, sample, offsets, context)
        return [(h[j], context[j], starts[j], ends[j]) for j in range(len(sample))]
    rows = map_batches(one, len(parts), update, [len(p) for p in parts])
    L = cfg.qa_max_length
    x = torch.zeros(len(rows), L, rows[0][0].shape[-1], dtype=torch.float16)
    allowed = torch.zeros(len(rows), L, dtype=torch.bool)
    for j, (h, ctx, _, _) in enumerate(rows):
        x[j, :len(h)] = h
        allowed[j, :len(ctx)] = ctx
    allowed[:, 0] = True  # the null answer
    return x, allowed, torch.stack([r[2] for r in rows]), torch.stack([r[3] for r in rows])


def _probe_scorer(task, model, tok, train, cfg, update, protocol: dict):
    """Train the span probe on the training questions; -> enc -> (start, end) logits."""
    pc = probe_config(cfg, task)
    x, allowed, starts, ends = _window_features(model, tok, train.examples, cfg, update)
    probe = span_probe(x, allowed, starts, ends, pc)
    protocol.update(probe=pc.to_dict(), probe_train_questions=len(train.examples), probe_train_windows=len(x))
    return lambda enc: _probe_logits(model, probe, enc)


def _predictions(model, tok, test, scorer, cfg, v2: bool, update) -> dict[str, str]:
    """{question id: best answer} over all windows of each question."""
    parts = batches(len(test.examples), max(1, cfg.batch_size // 2))

    def one(i):
        chunk = [test.examples[k] for k in parts[i]]
        enc, sample, offsets, context = encode_windows(tok, chunk, cfg)
        start, end = scorer(model_inputs(model, enc))
        per_example = {}
        for j, k in enumerate(sample):
            per_example.setdefault(k, []).append((start[j], end[j], offsets[j], context[j]))
        return [(ex.id, best_answer(ex, per_example[k], cfg, v2)) for k, ex in enumerate(chunk)]
    return dict(map_batches(one, len(parts), update, [len(p) for p in parts]))


def run_qa(task, model, tokenizer, data: TaskData, cfg, desc: str) -> dict:
    tok, test, train = ready_tokenizer(tokenizer, need_fast=True), data.test, data.train
    v2 = test.version.startswith("2")
    protocol = {"squad_version": "2.0" if v2 else "1.1", "eval_questions": len(test.examples),
                "max_length": cfg.qa_max_length, "doc_stride": cfg.doc_stride,
                "max_answer_length": cfg.max_answer_length, "n_best": cfg.n_best,
                "null_threshold": cfg.null_threshold if v2 else None,
                "normalization": "official SQuAD (lower, no punctuation/articles, collapsed spaces), max over golds"}
    own = use_own_head(model, task, cfg.probe)
    with progress_bar(desc, len(test.examples) + (0 if own else len(train.examples)), "q", cfg.quiet) as update:
        if own:
            scorer, head = (lambda enc: _own_logits(model, enc)), "own"
        else:
            scorer, head = _probe_scorer(task, model, tok, train, cfg, update, protocol), "probe"
        predictions = _predictions(model, tok, test, scorer, cfg, v2, update)
    golds = {e.id: e.answers for e in test.examples}
    scores = squad_scores(predictions, golds)
    metrics = {"exact_match": scores["exact_match"], "f1": scores["f1"]}
    metrics.update({k: v for k, v in scores.items() if k.startswith(("HasAns", "NoAns")) and not k.endswith("total")})
    return {"metrics": metrics, "protocol": protocol, "head": head,
            "per_example": squad_stats(squad_per_question(predictions, golds))}


def _own_logits(model, enc):
    out = model(**enc)
    return out.start_logits.float().cpu(), out.end_logits.float().cpu()


def _probe_logits(model, probe, enc):
    out = probe(modelio.features(model, enc))
    return out[..., 0], out[..., 1]
