"""Task metrics that match their reference implementations exactly.

- SQuAD v1.1/v2: the official evaluation script's answer normalization, EM and F1
  (max over gold answers; v2: an unanswerable question has the single gold "").
- Entity-level P/R/F1: seqeval itself (the reference), conlleval-lenient or strict IOB2.
- Classification: accuracy, macro-F1, binary F1 (positive class 1), as in GLUE.
All scores are percentages (0-100), like the papers and leaderboards report them.
"""
from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass

ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
PUNCT = set(string.punctuation)


# ------------------------------------------------------------------ what the gate compares


@dataclass(frozen=True)
class Metric:
    """A gated score, declared with what the gate needs to judge it: which way is better, and
    how large a drop passes when `--max-drop` says nothing about it."""

    name: str                      # the key in a runner's "metrics" dict and in report rows
    lower_is_better: bool = False
    max_drop: str = "1"            # absolute in the metric's units (points, for 0-100 scores) or "N%" of
                                   # the baseline; the --max-drop syntax


PERPLEXITY = Metric("perplexity", lower_is_better=True, max_drop="5%")
BITS_PER_BYTE = Metric("bits_per_byte", lower_is_better=True, max_drop="2%")
ACCURACY = Metric("accuracy")
MACRO_F1 = Metric("macro_f1")
F1 = Metric("f1")
F1_LENIENT = Metric("f1_lenient")
F1_STRICT = Metric("f1_strict")
TOKEN_ACCURACY = Metric("token_accuracy")
EXACT_MATCH = Metric("exact_match")


# ------------------------------------------------------------------ SQuAD


def normalize_answer(s: str) -> str:
    """Lower-case, remove punctuation, articles and extra whitespace (official script order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in PUNCT)
    s = ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_toks or not gold_toks:  # v2: no-answer is right only against no-answer
        return float(pred_toks == gold_toks)
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict:
    """EM and F1 in percent over `golds` (a question without a prediction scores 0).
    A gold list that is empty, or holds only "", marks an unanswerable (v2) question."""
    em = f1 = 0.0
    has_ans = {"n": 0, "em": 0.0, "f1": 0.0}
    no_ans = {"n": 0, "em": 0.0, "f1": 0.0}
    for qid, answers in golds.items():
        answers = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions.get(qid, "")
        q_em = max(squad_exact(pred, a) for a in answers)
        q_f1 = max(squad_f1(pred, a) for a in answers)
        em, f1 = em + q_em, f1 + q_f1
        bucket = no_ans if answers == [""] else has_ans
        bucket["n"] += 1
        bucket["em"] += q_em
        bucket["f1"] += q_f1
    n = max(len(golds), 1)
    out = {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "total": len(golds)}
    if no_ans["n"]:  # v2 breakdown, as the official v2 script reports it
        for name, b in (("HasAns", has_ans), ("NoAns", no_ans)):
            out[f"{name}_exact"] = 100.0 * b["em"] / max(b["n"], 1)
            out[f"{name}_f1"] = 100.0 * b["f1"] / max(b["n"], 1)
            out[f"{name}_total"] = b["n"]
    return out


# ------------------------------------------------------------------ entities (seqeval)


def _seqeval():
    try:
        from seqeval import metrics
        from seqeval.scheme import IOB2
    except ImportError as e:
        from tritpress.compressor.errors import TritpressError
        raise TritpressError("entity-level NER scores need seqeval: pip install seqeval") from e
    return metrics, IOB2


def entity_scores(gold: list[list[str]], pred: list[list[str]], mode: str = "lenient") -> dict:
    """Micro P/R/F1 (percent) over entities. lenient = conlleval (a chunk may start with I-);
    strict = IOB2 scheme, an entity counts only with a well-formed B-/I- span."""
    metrics, IOB2 = _seqeval()
    kw = {"mode": "strict", "scheme": IOB2} if mode == "strict" else {}
    return {"precision": 100.0 * metrics.precision_score(gold, pred, zero_division=0, **kw),
            "recall": 100.0 * metrics.recall_score(gold, pred, zero_division=0, **kw),
            "f1": 100.0 * metrics.f1_score(gold, pred, zero_division=0, **kw)}


def token_accuracy(gold: list[list[str]], pred: list[list[str]]) -> float:
    pairs = [(g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
    return 100.0 * sum(g == p for g, p in pairs) / max(len(pairs), 1)


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """CoNLL-2003's original IOB1 (I- starts a chunk unless it follows the same type) -> IOB2."""
    out, prev = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


# ------------------------------------------------------------------ classification


def classification_scores(gold: list[int], pred: list[int], num_labels: int) -> dict:
    """Accuracy and macro-F1 (percent); two-class sets also get binary F1 of class 1 (GLUE)."""
    n = max(len(gold), 1)
    out = {"accuracy": 100.0 * sum(g == p for g, p in zip(gold, pred)) / n}
    f1s = [_f1_of(gold, pred, c) for c in range(num_labels)]
    out["macro_f1"] = 100.0 * sum(f1s) / max(num_labels, 1)
    if num_labels == 2:
        out["f1"] = 100.0 * f1s[1]
    return out


def _f1_of(gold, pred, c) -> float:
    tp = sum(g == c and p == c for g, p in zip(gold, pred))
    fp = sum(g != c and p == c for g, p in zip(gold, pred))
    fn = sum(g == c and p != c for g, p in zip(gold, pred))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
