"""The gate's sampling uncertainty: the paired bootstrap of each Δ. Per-example statistics give
exactly the reference metrics on the full sample (seqeval, the SQuAD script's scores, our
perplexity); the interval brackets the point Δ, shrinks with n, is reproducible by seed; the
notes say "within noise" and flag a compressed model better beyond noise."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tritpress.analyzers.quality import bootstrap as bs
from tritpress.analyzers.quality import lm
from tritpress.analyzers.quality.gate import Tolerance, gate_row
from tritpress.analyzers.quality.metrics import (classification_scores, detect_scheme, entity_scores,
                                                 squad_per_question, squad_scores, tag_macro_f1, to_iob2,
                                                 token_accuracy)
from tests.tiny_models import build


def noisy(gold: list[int], accuracy: float, num_labels: int, seed: int) -> list[int]:
    """Predictions right with probability `accuracy`, otherwise another label."""
    r = random.Random(seed)
    return [g if r.random() < accuracy else (g + r.randrange(1, num_labels)) % num_labels for g in gold]


def labels(n: int, num_labels: int = 3, seed: int = 0) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(num_labels) for _ in range(n)]


# ------------------------------------------------------------------ the full sample is the point estimate


@pytest.mark.parametrize("num_labels", [2, 3])
def test_classification_stats_equal_the_scores(num_labels):
    gold = labels(300, num_labels)
    pred = noisy(gold, 0.7, num_labels, 1)
    pred[:3] = [-1, -1, -1]  # a head class the data does not have: always wrong
    full = bs.classification_stats(gold, pred, num_labels).on_full_sample()
    ref = classification_scores(gold, pred, num_labels)
    assert full.keys() == ref.keys()
    for k in ref:
        assert full[k] == pytest.approx(ref[k], abs=1e-9)


def ner_sentences(n: int, seed: int, flip: float):
    """Gold IOB2 sentences and predictions with some tags changed (broken spans included)."""
    r = random.Random(seed)
    choices = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    gold, pred = [], []
    for _ in range(n):
        g = to_iob2([r.choice(choices) for _ in range(r.randint(1, 12))], "iob1")
        gold.append(g)
        pred.append([r.choice(choices) if r.random() < flip else t for t in g])
    return gold, pred


def test_entity_stats_equal_seqeval_corpus_f1():
    gold, pred = ner_sentences(200, 0, 0.2)
    full = bs.entity_stats(gold, pred).on_full_sample()
    assert full["f1_lenient"] == pytest.approx(entity_scores(gold, pred, "lenient")["f1"], abs=1e-9)
    assert full["f1_strict"] == pytest.approx(entity_scores(gold, pred, "strict")["f1"], abs=1e-9)
    assert full["f1_lenient"] != pytest.approx(full["f1_strict"])  # the broken spans make them differ
    assert full["token_accuracy"] == pytest.approx(token_accuracy(gold, pred), abs=1e-9)


def test_plain_tag_stats_equal_the_scores():
    r = random.Random(3)
    tags = ["AT", "NN", "NN-TL", "CC", "VBD", "IN"]
    gold = [[r.choice(tags) for _ in range(r.randint(1, 9))] for _ in range(80)]
    pred = [[t if r.random() < 0.8 else r.choice(tags + ["XX"]) for t in s] for s in gold]
    full = bs.plain_tag_stats(gold, pred).on_full_sample()
    assert full["token_accuracy"] == pytest.approx(token_accuracy(gold, pred), abs=1e-9)
    assert full["tag_macro_f1"] == pytest.approx(tag_macro_f1(gold, pred), abs=1e-9)
    # a hand case: tags A (tp 1, fn 1) and B (tp 1, fp 1): F1 2/3 each
    assert tag_macro_f1([["A", "A", "B"]], [["A", "B", "B"]]) == pytest.approx(100 * 2 / 3)


def test_squad_stats_equal_the_official_scores():
    golds = {"q1": ["Denver Broncos", "Broncos"], "q2": ["1990"], "q3": ["Paris"], "q4": ["red blue"]}
    preds = {"q1": "Broncos!", "q2": "in 1990", "q4": "red"}
    full = bs.squad_stats(squad_per_question(preds, golds)).on_full_sample()
    ref = squad_scores(preds, golds)
    assert full == pytest.approx({"exact_match": ref["exact_match"], "f1": ref["f1"]}, abs=1e-9)


def test_lm_window_stats_equal_perplexity_and_bits_per_byte():
    torch.manual_seed(0)
    model = build("gpt2").eval()
    ids = torch.randint(0, 50, (90,))
    stream = lm.LMText(ids, n_bytes=400, n_lines=3)
    m = lm.causal_perplexity(model, stream, context=16, stride=8, batch_size=2)
    stats = bs.lm_stats(m["per_window"], m["bytes"])
    assert stats.n == m["windows"]
    full = stats.on_full_sample()
    assert full["perplexity"] == pytest.approx(m["perplexity"], rel=1e-12)
    assert full["bits_per_byte"] == pytest.approx(m["bits_per_byte"], rel=1e-12)


# ------------------------------------------------------------------ the interval


def _cls_pair(n: int, base_acc: float, comp_acc: float, seed: int = 0):
    gold = labels(n, 3, seed)
    base = bs.classification_stats(gold, noisy(gold, base_acc, 3, seed + 1), 3)
    comp = bs.classification_stats(gold, noisy(gold, comp_acc, 3, seed + 2), 3)
    return base, comp


def test_interval_brackets_the_point_delta_and_shrinks_with_n():
    widths = []
    for n in (200, 3000):
        base, comp = _cls_pair(n, 0.8, 0.75)
        ci = bs.intervals(base, comp, 1000, seed=0)
        point = comp.on_full_sample()["accuracy"] - base.on_full_sample()["accuracy"]
        lo, hi = ci["accuracy"]
        assert lo < point < hi
        assert set(ci) == {"accuracy", "macro_f1"}
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 15x the examples, about a quarter of the width


def test_interval_is_paired():
    """The same predictions for both models: every resample gives Δ = 0 exactly."""
    base, _ = _cls_pair(300, 0.8, 0.8)
    assert bs.intervals(base, base, 200, seed=1)["accuracy"] == (0.0, 0.0)


def test_interval_reproducible_by_seed():
    base, comp = _cls_pair(400, 0.8, 0.77)
    assert bs.intervals(base, comp, 300, seed=5) == bs.intervals(base, comp, 300, seed=5)
    assert bs.intervals(base, comp, 300, seed=5) != bs.intervals(base, comp, 300, seed=6)


def test_no_interval_without_statistics_for_both_or_over_other_examples():
    base, comp = _cls_pair(100, 0.8, 0.8)
    other, _ = _cls_pair(101, 0.8, 0.8)
    assert bs.intervals(base, None) == {} and bs.intervals(base, other) == {}
    assert bs.intervals(base, comp, resamples=0) == {}


def test_notes_within_noise_and_better_beyond_noise():
    tol = Tolerance(1.0, False)
    base, comp = _cls_pair(300, 0.80, 0.79)
    ci = bs.intervals(base, comp)["accuracy"]
    b, c = base.on_full_sample()["accuracy"], comp.on_full_sample()["accuracy"]
    row = gate_row("cls", "cls", "accuracy", b, c, "probe", tol, ci, base.n)
    assert row["note"] == "within noise" and row["delta_ci95"] == list(ci) and row["n"] == 300
    assert row["status"] == ("PASS" if c - b >= -1 else "FAIL")  # the tolerance decides, not the interval

    base, comp = _cls_pair(2000, 0.70, 0.77)  # 7 points better: suspicious of the protocol
    ci = bs.intervals(base, comp)["accuracy"]
    row = gate_row("cls", "cls", "accuracy", base.on_full_sample()["accuracy"], comp.on_full_sample()["accuracy"],
                   "probe", tol, ci, base.n)
    assert ci[0] > 0 and row["status"] == "PASS"
    assert row["note"].startswith("compressed better beyond noise") and "check the protocol" in row["note"]
    base, comp = _cls_pair(2000, 0.77, 0.70)
    ci = bs.intervals(base, comp)["accuracy"]
    assert bs.verdict_note(ci, lower_is_better=False) == "worse beyond noise"
    assert bs.verdict_note((-0.5, -0.1), lower_is_better=True).startswith("compressed better")  # perplexity down
    assert bs.verdict_note(None, False) == "interval not finite"
    plain = gate_row("cls", "cls", "accuracy", 90.0, 89.5, "probe", tol)  # no statistics: no interval
    assert plain["delta_ci95"] is None and plain["n"] is None and plain["note"] == ""


def test_perplexity_interval_lower_is_better():
    r = np.random.default_rng(0)
    tokens = [16] * 300
    base_nll = r.normal(3.0, 0.5, 300) * 16
    base = bs.lm_stats(list(zip(base_nll, tokens)), 5000)
    worse = bs.lm_stats(list(zip(base_nll + 16 * 0.2, tokens)), 5000)  # every window 0.2 nats/token worse
    ci = bs.intervals(base, worse, 500)
    assert ci["perplexity"][0] > 0 and ci["bits_per_byte"][0] > 0
    assert bs.verdict_note(ci["perplexity"], lower_is_better=True) == "worse beyond noise"


# ------------------------------------------------------------------ tag schemes


def test_detect_scheme():
    assert detect_scheme([["B-PER", "I-PER", "O"], ["B-LOC"]]) == "iob2"
    assert detect_scheme([["I-PER", "I-PER", "O"], ["I-LOC", "B-LOC"]]) == "iob1"
    assert detect_scheme([["S-PER", "O", "B-LOC", "E-LOC"]]) == "iobes"
    assert detect_scheme([["AT", "NN-TL", "CC"], ["O"]]) == "plain"
    assert to_iob2(["S-PER", "B-LOC", "I-LOC", "E-LOC", "O"], "iobes") == ["B-PER", "B-LOC", "I-LOC", "I-LOC", "O"]
    assert to_iob2(["AT", "NN"], "plain") == ["AT", "NN"]
