"""Sampling uncertainty of a gate row's Δ: a paired bootstrap over the evaluation examples.

Both models are scored on the same examples, so each resample draws one set of example
indices and scores *both* models on it (a paired bootstrap: the noise the two share cancels
in Δ). It never re-runs a model: a task runner returns, besides its metrics, per-example
statistics (`ExampleStats`) whose column sums determine every metric — correctness for
accuracy, per-class tp/fp/fn for (macro-)F1, per-sentence entity counts for seqeval's
corpus-level F1, per-question EM/F1 for SQuAD, per-window NLL/tokens/bytes for perplexity.
A resample is a vector of counts over the examples, so its sums are one matrix product, and
the full sample (every count 1) gives exactly the point estimate."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tritpress.analyzers.defaults import RESAMPLES  # re-exported: declared with the settings

LEVEL = 0.95
CHUNK = 100   # resamples per matrix product: bounds memory at CHUNK x examples counts


@dataclass
class ExampleStats:
    """One row per example (sentence, question, LM window) of additive statistics, and how
    their column sums become the task's metrics (vectorized: sums [B, k] -> {name: [B]})."""

    values: np.ndarray                                      # [n, k] float64
    metrics: Callable[[np.ndarray], dict[str, np.ndarray]]
    unit: str = "example"                                   # what one row is, for the report

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def on_full_sample(self) -> dict[str, float]:
        """The metrics of the whole sample: the runner's point estimates."""
        return {k: float(v[0]) for k, v in self.metrics(self.values.sum(0, keepdims=True)).items()}


def resample_counts(n: int, resamples: int, seed: int):
    """Chunks of [c, n] bootstrap counts (how often each example is drawn), seeded."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        c = min(CHUNK, resamples - start)
        idx = rng.integers(0, n, size=(c, n)) + (np.arange(c) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=c * n).reshape(c, n).astype(np.float64)


def paired_deltas(base: ExampleStats, comp: ExampleStats, resamples: int = RESAMPLES,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """{metric: [resamples] of compressed - baseline}, both scored on the same resampled examples."""
    out: dict[str, list] = {}
    with np.errstate(all="ignore"):  # a broken model's perplexity may overflow: its interval is not finite
        for counts in resample_counts(base.n, resamples, seed):
            b, c = base.metrics(counts @ base.values), comp.metrics(counts @ comp.values)
            for name in b.keys() & c.keys():
                out.setdefault(name, []).append(c[name] - b[name])
    return {name: np.concatenate(parts) for name, parts in out.items()}


def intervals(base: ExampleStats | None, comp: ExampleStats | None, resamples: int = RESAMPLES,
              seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """{metric: (lo, hi)}, the 95 % percentile interval of Δ; None where it is not finite.
    Empty when either side has no per-example statistics or they are not over the same examples."""
    if base is None or comp is None or base.n != comp.n or base.n == 0 or resamples < 1:
        return {}
    tail = 100 * (1 - LEVEL) / 2
    out = {}
    for name, d in paired_deltas(base, comp, resamples, seed).items():
        lo, hi = np.percentile(d, [tail, 100 - tail]) if np.isfinite(d).all() else (math.nan, math.nan)
        out[name] = (float(lo), float(hi)) if math.isfinite(lo) and math.isfinite(hi) else None
    return out


def verdict_note(ci: tuple[float, float] | None, lower_is_better: bool) -> str:
    """Where the interval of Δ lies relative to 0, in the metric's good direction."""
    if ci is None:
        return "interval not finite"
    lo, hi = ci
    if lo <= 0 <= hi:
        return "within noise"
    better = hi < 0 if lower_is_better else lo > 0
    if better:
        # a compressed model clearly beating its original usually means the two were not scored
        # alike (e.g. probes trained on different samples), not that compression helped
        return "compressed better beyond noise: check the protocol (same data, probe sample, seeds?)"
    return "worse beyond noise"


# ------------------------------------------------------------------ per-task statistics


def _ratio(num, den) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _f1(tp, fp, fn) -> np.ndarray:
    """2tp / (2tp + fp + fn); 0 without a true positive (metrics._f1_of, seqeval zero_division=0)."""
    return np.where(tp > 0, 2 * tp / np.where(tp > 0, 2 * tp + fp + fn, 1), 0.0)


def classification_stats(gold: list[int], pred: list[int], num_labels: int) -> ExampleStats:
    """Per example: [1, correct, tp_c..., fp_c..., fn_c...] -> accuracy, macro-F1, binary F1."""
    g, p, C = np.asarray(gold), np.asarray(pred), num_labels
    classes = np.arange(C)
    gc, pc = g[:, None] == classes, p[:, None] == classes
    values = np.column_stack([np.ones(len(g)), g == p, gc & pc, ~gc & pc, gc & ~pc]).astype(np.float64)

    def metrics(s):
        tp, fp, fn = s[:, 2:2 + C], s[:, 2 + C:2 + 2 * C], s[:, 2 + 2 * C:2 + 3 * C]
        f1 = _f1(tp, fp, fn)
        out = {"accuracy": 100 * _ratio(s[:, 1], s[:, 0]), "macro_f1": 100 * f1.sum(1) / max(C, 1)}
        if C == 2:
            out["f1"] = 100 * f1[:, 1]
        return out
    return ExampleStats(values, metrics, "example")


def squad_stats(per_question: list[tuple[float, float]]) -> ExampleStats:
    """Per question: [1, EM, F1] (0/1 and 0-1) -> exact_match, f1 in percent."""
    values = np.column_stack([np.ones(len(per_question)), np.asarray(per_question, dtype=np.float64)
                              .reshape(-1, 2)])
    return ExampleStats(values, lambda s: {"exact_match": 100 * _ratio(s[:, 1], s[:, 0]),
                                           "f1": 100 * _ratio(s[:, 2], s[:, 0])}, "question")


def lm_stats(windows: list[tuple[float, int]], n_bytes: int | None) -> ExampleStats:
    """Per window: [NLL sum, scored tokens, bytes] -> perplexity (and bits per byte with a byte
    count). A window's bytes are the text's bytes in proportion to its scored tokens (token
    offsets are not kept), so the interval of bits/byte ignores how bytes per token vary."""
    arr = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    share = arr[:, 1] * (n_bytes / arr[:, 1].sum() if n_bytes else 0.0)
    values = np.column_stack([arr, share])

    def metrics(s):
        out = {"perplexity": np.exp(_ratio(s[:, 0], s[:, 1]))}
        if n_bytes:
            out["bits_per_byte"] = _ratio(s[:, 0] / math.log(2), s[:, 2])
        return out
    return ExampleStats(values, metrics, "window")


def entity_stats(gold: list[list[str]], pred: list[list[str]]) -> ExampleStats:
    """Per sentence: seqeval's (tp, predicted, gold) entity counts, lenient and strict, and
    [correct tokens, tokens] -> f1_lenient, f1_strict (seqeval's corpus micro F1), token_accuracy."""
    from .metrics import entity_counts
    tokens = [(sum(g == p for g, p in zip(gs, ps)), len(list(zip(gs, ps)))) for gs, ps in zip(gold, pred)]
    values = np.column_stack([np.asarray(entity_counts(gold, pred, "lenient"), dtype=np.float64).reshape(-1, 3),
                              np.asarray(entity_counts(gold, pred, "strict"), dtype=np.float64).reshape(-1, 3),
                              np.asarray(tokens, dtype=np.float64).reshape(-1, 2)])

    def metrics(s):
        f1 = lambda tp, pr, go: 100 * _f1(tp, pr - tp, go - tp)  # noqa: E731
        return {"f1_lenient": f1(s[:, 0], s[:, 1], s[:, 2]), "f1_strict": f1(s[:, 3], s[:, 4], s[:, 5]),
                "token_accuracy": 100 * _ratio(s[:, 6], s[:, 7])}
    return ExampleStats(values, metrics, "sentence")


def plain_tag_stats(gold: list[list[str]], pred: list[list[str]]) -> ExampleStats:
    """Per sentence: correct tokens, tokens, tp/fp/fn per gold tag -> token_accuracy, tag_macro_f1."""
    from .metrics import tag_counts
    tags = sorted({t for s in gold for t in s})
    T = len(tags)
    values = np.asarray(tag_counts(gold, pred, tags), dtype=np.float64).reshape(-1, 2 + 3 * T)

    def metrics(s):
        f1 = _f1(s[:, 2:2 + T], s[:, 2 + T:2 + 2 * T], s[:, 2 + 2 * T:])
        return {"token_accuracy": 100 * _ratio(s[:, 0], s[:, 1]), "tag_macro_f1": 100 * f1.sum(1) / max(T, 1)}
    return ExampleStats(values, metrics, "sentence")
