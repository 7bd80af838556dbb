"""Extractive QA (SQuAD v1.1 / v2), as Hugging Face's run_qa does it.

A long context is split into windows of `qa_max_length` tokens that overlap by
`doc_stride` tokens; each window scores a start and an end per token (the model's QA head,
or the probe's). The answer is the best span over all windows of the question, among
the `n_best` starts and ends of each window, end >= start, at most `max_answer_length`
tokens, inside the context. SQuAD v2: the null answer (position 0) wins when its score
beats the best span by more than `null_threshold`."""
from __future__ import annotations

import torch

from tritpress.compressor import modelio
from tritpress.compressor.errors import TritpressError

from .encode import batches, map_batches, model_inputs, progress_bar, ready_tokenizer
from .metrics import squad_scores
from .probe import span_probe
from .tasks import probe_config, use_own_head


def encode_windows(tok, examples, cfg):
    try:
        enc = tok([e.question.lstrip() for e in examples], [e.context for e in examples],
                  truncation="only_second", max_length=cfg.qa_max_length, stride=cfg.doc_stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
    except Exception as e:
        raise TritpressError(f"the tokenizer cannot build QA windows: {str(e).splitlines()[0]}") from e
    sample = enc.pop("overflow_to_sample_mapping").tolist()
    offsets = enc.pop("offset_mapping")
    context = torch.tensor([[s == 1 for s in enc.sequence_ids(j)] for j in range(len(sample))])
    return enc, sample, offsets, context


def span_labels(examples, sample, offsets, context):
    """Start/end token of the first gold answer in each window; 0 (the null position) if not inside."""
    starts, ends = [], []
    for j, i in enumerate(sample):
        ex, s, e = examples[i], 0, 0
        if ex.answers:
            a0 = ex.starts[0]
            a1 = a0 + len(ex.answers[0])
            idx = context[j].nonzero().flatten().tolist()
            if idx and offsets[j, idx[0], 0] <= a0 and offsets[j, idx[-1], 1] >= a1:
                s = next(t for t in idx if offsets[j, t, 1] > a0)
                e = next(t for t in reversed(idx) if offsets[j, t, 0] < a1)
        starts.append(s)
        ends.append(e)
    return torch.tensor(starts), torch.tensor(ends)


def best_answer(ex, windows, cfg, v2: bool) -> str:
    """windows: [(start_logits [T], end_logits [T], offsets [T, 2], context mask [T])]."""
    best, best_score, null_score = "", None, None
    for s_log, e_log, offs, ctx in windows:
        null = float(s_log[0] + e_log[0])
        null_score = null if null_score is None else min(null_score, null)
        s_masked = s_log.masked_fill(~ctx, float("-inf"))
        e_masked = e_log.masked_fill(~ctx, float("-inf"))
        k = min(cfg.n_best, int(ctx.sum()))
        for s in s_masked.topk(k).indices.tolist():
            for e in e_masked.topk(k).indices.tolist():
                if e < s or e - s + 1 > cfg.max_answer_length:
                    continue
                score = float(s_log[s] + e_log[e])
                if best_score is None or score > best_score:
                    best_score, best = score, ex.context[int(offs[s, 0]):int(offs[e, 1])]
    if v2 and (best_score is None or null_score > best_score + cfg.null_threshold):
        return ""
    return best


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


def run_qa(model, tokenizer, train, test, cfg, desc: str) -> dict:
    tok = ready_tokenizer(tokenizer, need_fast=True)
    v2 = test.version.startswith("2")
    protocol = {"squad_version": "2.0" if v2 else "1.1", "eval_questions": len(test.examples),
                "max_length": cfg.qa_max_length, "doc_stride": cfg.doc_stride,
                "max_answer_length": cfg.max_answer_length, "n_best": cfg.n_best,
                "null_threshold": cfg.null_threshold if v2 else None,
                "normalization": "official SQuAD (lower, no punctuation/articles, collapsed spaces), max over golds"}
    own = use_own_head(model, "qa", cfg.probe)
    total = len(test.examples) + (0 if own else len(train.examples))
    with progress_bar(desc, total, "q", cfg.quiet) as update:
        if own:
            scorer = lambda enc: _own_logits(model, enc)  # noqa: E731
            head = "own"
        else:
            pc = probe_config(cfg, "qa")
            x, allowed, starts, ends = _window_features(model, tok, train.examples, cfg, update)
            probe = span_probe(x, allowed, starts, ends, pc)
            scorer = lambda enc: _probe_logits(model, probe, enc)  # noqa: E731
            head = "probe"
            protocol.update(probe=pc.to_dict(), probe_train_questions=len(train.examples), probe_train_windows=len(x))
        parts = batches(len(test.examples), max(1, cfg.batch_size // 2))

        def one(i):
            chunk = [test.examples[k] for k in parts[i]]
            enc, sample, offsets, context = encode_windows(tok, chunk, cfg)
            start, end = scorer(model_inputs(model, enc))
            per_example = {}
            for j, k in enumerate(sample):
                per_example.setdefault(k, []).append((start[j], end[j], offsets[j], context[j]))
            return [(ex.id, best_answer(ex, per_example[k], cfg, v2)) for k, ex in enumerate(chunk)]
        predictions = dict(map_batches(one, len(parts), update, [len(p) for p in parts]))
    golds = {e.id: e.answers for e in test.examples}
    scores = squad_scores(predictions, golds)
    metrics = {"exact_match": scores["exact_match"], "f1": scores["f1"]}
    metrics.update({k: v for k, v in scores.items() if k.startswith(("HasAns", "NoAns")) and not k.endswith("total")})
    return {"metrics": metrics, "protocol": protocol, "head": head}


def _own_logits(model, enc):
    out = model(**enc)
    return out.start_logits.float().cpu(), out.end_logits.float().cpu()


def _probe_logits(model, probe, enc):
    out = probe(modelio.features(model, enc))
    return out[..., 0], out[..., 1]
