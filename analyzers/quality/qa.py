"""Extractive QA (SQuAD v1.1 / v2), as Hugging Face's run_qa does it.

A long context is split into windows of `qa_max_length` tokens that overlap by
`doc_stride` tokens; each window scores a start and an end per token (the model's QA head,
or the probe's). The answer is the best span over all windows of the question, among
the `n_best` starts and ends of each window, end >= start, at most `max_answer_length`
tokens, inside the context. SQuAD v2: the null answer (position 0) wins when its score
beats the best span by more than `null_threshold`.

The QA task itself (data, own head or probe, scores) is analyzers/quality/qa_task.py."""
from __future__ import annotations

import torch

from tritpress.compressor.errors import TritpressError


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
