"""Metric code against its references: the official SQuAD script's semantics (hand-checked
cases), seqeval's documented examples (lenient vs strict), and perplexity equal to exp of
the mean token NLL computed directly, window by window."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tritpress.analyzers.quality import lm
from tritpress.analyzers.quality.gate import Tolerance, gate_row, parse_max_drop, tolerance_for
from tritpress.analyzers.quality.metrics import (classification_scores, entity_scores, iob1_to_iob2, normalize_answer,
                                       squad_exact, squad_f1, squad_scores, token_accuracy)
from tritpress.compressor.errors import TritpressError
from tests.tiny_models import build


# ------------------------------------------------------------------ SQuAD (official evaluate-v1.1 / v2.0)

@pytest.mark.parametrize("raw,norm", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("an apple", "apple"),
    ("A.B.C.", "abc"),                         # punctuation removed before articles: "a" survives as "abc"
    ("theater of the absurd", "theater of absurd"),  # articles only as whole words
    ("  Denver\tBroncos ", "denver broncos"),
    ("the", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_squad_em_f1_hand_cases():
    assert squad_exact("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert squad_f1("Denver Broncos", "Broncos") == pytest.approx(2 / 3)       # P 1/2, R 1
    assert squad_f1("in the year 1990", "1990") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))  # "in","year","1990"
    assert squad_f1("red red blue", "red blue blue") == pytest.approx(2 / 3)   # bag overlap counts multiplicity
    assert squad_f1("", "Broncos") == 0.0
    assert squad_f1("cats", "dogs") == 0.0


def test_squad_scores_max_over_golds_and_missing_prediction():
    golds = {"q1": ["Denver Broncos", "Broncos", "the Broncos"], "q2": ["1990"], "q3": ["Paris"]}
    preds = {"q1": "Broncos!", "q2": "in 1990"}  # q3 unanswered: scores 0
    s = squad_scores(preds, golds)
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert "HasAns_f1" not in s  # v1.1: no breakdown


def test_squad_v2_no_answer():
    golds = {"a": [], "b": ["x y"], "c": [""]}
    s = squad_scores({"a": "", "b": "", "c": "something"}, golds)
    assert s["exact_match"] == pytest.approx(100 / 3)  # only "a" right: empty vs empty
    assert s["NoAns_total"] == 2 and s["HasAns_total"] == 1
    assert s["NoAns_exact"] == 50.0 and s["HasAns_exact"] == 0.0


# ------------------------------------------------------------------ seqeval

def test_seqeval_documented_example():
    """seqeval README: one MISC span misplaced, one PER right -> F1 0.50 (both modes here)."""
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_scores(gold, pred, "lenient")["f1"] == pytest.approx(50.0)
    assert entity_scores(gold, pred, "strict")["f1"] == pytest.approx(50.0)


def test_seqeval_lenient_vs_strict():
    """seqeval README: a chunk starting with I- counts in conlleval mode, not in strict IOB2."""
    gold, pred = [["B-NP", "I-NP", "O"]], [["I-NP", "I-NP", "O"]]
    assert entity_scores(gold, pred, "lenient")["f1"] == pytest.approx(100.0)
    assert entity_scores(gold, pred, "strict")["f1"] == pytest.approx(0.0)


def test_token_accuracy_and_iob1():
    assert token_accuracy([["O", "B-X"], ["O"]], [["O", "O"], ["O"]]) == pytest.approx(200 / 3)
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-LOC"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG", "B-LOC"]
    iob2 = ["B-PER", "I-PER", "O", "B-LOC"]
    assert iob1_to_iob2(iob2) == iob2


# ------------------------------------------------------------------ classification

def test_classification_scores():
    s = classification_scores([1, 1, 0, 0], [1, 0, 0, 0], 2)
    assert s["accuracy"] == 75.0
    assert s["f1"] == pytest.approx(100 * 2 / 3)               # class 1: tp 1, fn 1
    assert s["macro_f1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)
    assert "f1" not in classification_scores([0, 1, 2], [0, 1, 1], 3)


# ------------------------------------------------------------------ perplexity

def _direct_nll(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Token by token: token t (t >= 1) is predicted from the window that scores it, one forward each."""
    total, n = 0.0, 0
    for begin, end, first in lm.sliding_windows(len(ids), context, stride):
        for t in range(first, end):
            with torch.no_grad():
                logits = model(input_ids=ids[begin:t].unsqueeze(0)).logits[0, -1].double()
            total += -float(F.log_softmax(logits, -1)[ids[t]])
            n += 1
    return total, n


@pytest.mark.parametrize("context,stride", [(16, 8), (16, 16), (16, 5), (64, 32)])
def test_causal_perplexity_equals_direct(context, stride):
    model = build("gpt2")
    ids = torch.randint(0, 100, (41,), generator=torch.Generator().manual_seed(0))
    stream = lm.LMText(ids, n_bytes=123, n_lines=1)
    got = lm.causal_perplexity(model, stream, context, stride, batch_size=3)
    total, n = _direct_nll(model, ids, context, stride)
    assert got["scored_tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / 123, rel=1e-6)
    if stride < context:
        assert n == len(ids) - 1  # overlapping windows score every token after the first once


def test_windows_cover_every_token_once():
    seen = []
    for _, end, first in lm.sliding_windows(1000, 128, 48):
        seen.extend(range(first, end))
    assert seen == list(range(1, 1000))
    with pytest.raises(TritpressError):
        lm.sliding_windows(10, 8, 9)


def test_full_context_equals_one_forward():
    model = build("llama_untied")
    ids = torch.randint(0, 100, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = F.cross_entropy(model(input_ids=ids[None]).logits[0, :-1].double(), ids[1:])
    got = lm.causal_perplexity(model, lm.LMText(ids, 50, 1), 64, 32)
    assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-6)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_rnn_stream_carries_state(name):
    """Chunks of 7 with the state carried == one forward over the whole stream."""
    from tritpress.compressor.transform import convert
    model = build(name)
    ids = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(2))
    for m in (model, convert(copy.deepcopy(model))):  # nn.LSTM, and our QRNN after convert
        with torch.no_grad():
            nll = F.cross_entropy(m(ids[None])[0, :-1].double(), ids[1:])
        got = lm.rnn_perplexity(m, lm.LMText(ids, 80, 1), context=7)
        assert got["scored_tokens"] == 39
        assert got["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-6)
        # without carrying, chunking would change the number: the hooks are doing the work
        with torch.no_grad():
            chunked = sum(float(F.cross_entropy(m(ids[None, b:b + 8])[0, :-1].double(), ids[b + 1:b + 8],
                                                reduction="sum")) for b in range(0, 39, 7))
        assert abs(chunked / 39 - float(nll)) > 1e-4


def test_pseudo_perplexity_equals_direct():
    from transformers import BertForMaskedLM
    from tests.tiny_models import bert_config
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config()).eval()
    ids = torch.randint(5, 100, (20,), generator=torch.Generator().manual_seed(3))
    got = lm.pseudo_perplexity(model, lm.LMText(ids, 40, 1), context=10, mask_id=4, cls_id=2, sep_id=3,
                               batch_size=5)
    total = 0.0
    for p in range(20):  # windows of 8 content tokens between [CLS] and [SEP]
        b = (p // 8) * 8
        seq = ids[b:b + 8].clone()
        seq[p - b] = 4
        x = torch.cat([torch.tensor([2]), seq, torch.tensor([3])])[None]
        with torch.no_grad():
            total += -float(F.log_softmax(model(input_ids=x).logits[0, p - b + 1].double(), -1)[ids[p]])
    assert got["scored_tokens"] == 20
    assert got["perplexity"] == pytest.approx(math.exp(total / 20), rel=1e-6)
    sub = lm.pseudo_perplexity(model, lm.LMText(ids, 40, 1), 10, 4, 2, 3, max_positions=6, seed=1)
    assert sub["scored_tokens"] == 6 and sub["scored_fraction"] == pytest.approx(0.3)


# ------------------------------------------------------------------ gate

def test_gate_rows():
    tol = Tolerance.parse("5%")
    assert gate_row("lm", "lm", "perplexity", 20.0, 20.9, "own", tol)["status"] == "PASS"
    assert gate_row("lm", "lm", "perplexity", 20.0, 21.2, "own", tol)["status"] == "FAIL"
    assert gate_row("lm", "lm", "perplexity", 20.0, float("nan"), "own", tol)["status"] == "FAIL"
    one = Tolerance.parse("1")
    row = gate_row("cls", "cls", "accuracy", 90.0, 89.5, "probe", one)
    assert row["status"] == "PASS" and row["delta"] == -0.5 and row["delta_rel"] == pytest.approx(-0.5 / 90)
    assert gate_row("cls", "cls", "accuracy", 90.0, 88.9, "probe", one)["status"] == "FAIL"
    assert gate_row("cls", "cls", "accuracy", 90.0, 95.0, "probe", one)["status"] == "PASS"  # gains never fail


def test_max_drop_parsing():
    o = parse_max_drop(["f1=2", "qa.f1=3", "perplexity=10%"])
    assert str(tolerance_for("qa", "f1", o)) == "3" and str(tolerance_for("tok", "f1", o)) == "2"
    assert tolerance_for("lm", "perplexity", o).relative and tolerance_for("lm", "perplexity", o).value == 0.1
    assert str(tolerance_for("cls", "accuracy", {})) == "1"
    assert str(tolerance_for("lm", "bits_per_byte", {})) == "2%"
    for bad in (["f1"], ["=3"], ["f1=abc"]):
        with pytest.raises(TritpressError):
            parse_max_drop(bad)
