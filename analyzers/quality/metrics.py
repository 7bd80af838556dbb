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

from tritpress.analyzers.defaults import TAG_SCHEMES  # re-exported: declared with the settings

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
TAG_MACRO_F1 = Metric("tag_macro_f1")   # plain (non-IOB) tags, e.g. POS: F1 per tag, averaged


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


def squad_per_question(predictions: dict[str, str], golds: dict[str, list[str]]) -> list[tuple[float, float]]:
    """(EM, F1) of each question of `golds`, in order, as squad_scores counts them (0-1)."""
    out = []
    for qid, answers in golds.items():
        answers = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions.get(qid, "")
        out.append((max(squad_exact(pred, a) for a in answers), max(squad_f1(pred, a) for a in answers)))
    return out


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


def entity_counts(gold: list[list[str]], pred: list[list[str]], mode: str = "lenient") -> list[tuple[int, int, int]]:
    """(true positives, predicted, gold entities) per sentence, as seqeval counts them (its
    entities never cross a sentence), so their sums give seqeval's corpus-level micro F1."""
    if mode == "strict":
        _, IOB2 = _seqeval()
        from seqeval.scheme import Entities
        g = [{e.to_tuple() for e in s} for s in Entities(gold, IOB2).entities]
        p = [{e.to_tuple() for e in s} for s in Entities(pred, IOB2).entities]
    else:
        _seqeval()
        from seqeval.metrics.sequence_labeling import get_entities
        g, p = [set(get_entities(s)) for s in gold], [set(get_entities(s)) for s in pred]
    return [(len(a & b), len(b), len(a)) for a, b in zip(g, p)]


def tag_counts(gold: list[list[str]], pred: list[list[str]], tags: list[str]) -> list[list[int]]:
    """Per sentence: [correct tokens, tokens, tp per tag..., fp per tag..., fn per tag...] (plain tags)."""
    index, T = {t: i for i, t in enumerate(tags)}, len(tags)
    rows = []
    for gs, ps in zip(gold, pred):
        row = [0, 0] + [0] * (3 * T)
        for g, p in zip(gs, ps):
            row[0], row[1] = row[0] + (g == p), row[1] + 1
            gi, pi = index.get(g), index.get(p)
            if g == p and gi is not None:
                row[2 + gi] += 1
                continue
            if pi is not None:
                row[2 + T + pi] += 1
            if gi is not None:
                row[2 + 2 * T + gi] += 1
        rows.append(row)
    return rows


def tag_macro_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    """F1 of each tag of the gold data (a token is one prediction), averaged (percent)."""
    tags = sorted({t for s in gold for t in s})
    sums = [sum(col) for col in zip(*tag_counts(gold, pred, tags))] or [0] * (2 + 3 * len(tags))
    T = len(tags)
    f1s = [0.0 if sums[2 + i] == 0 else 2 * sums[2 + i] / (2 * sums[2 + i] + sums[2 + T + i] + sums[2 + 2 * T + i])
           for i in range(T)]
    return 100.0 * sum(f1s) / max(T, 1)


def token_accuracy(gold: list[list[str]], pred: list[list[str]]) -> float:
    pairs = [(g, p) for gs, ps in zip(gold, pred) for g, p in zip(gs, ps)]
    return 100.0 * sum(g == p for g, p in pairs) / max(len(pairs), 1)


_PREFIXED = re.compile(r"^[BIES]-.+")


def detect_scheme(sentences: list[list[str]]) -> str:
    """iob1, iob2, iobes or plain, from the tags themselves: any tag that is neither O nor
    PREFIX-TYPE (B/I/E/S) makes them plain (e.g. POS tags AT, NN-TL); E-/S- make them IOBES;
    an I- that starts a chunk makes them IOB1 (IOB2 always starts with B-)."""
    tags = {t for s in sentences for t in s}
    if any(t != "O" and not _PREFIXED.match(t) for t in tags):
        return "plain"
    if any(t[0] in "ES" for t in tags if t != "O"):
        return "iobes"
    return "iob1" if any(iob1_to_iob2(s) != list(s) for s in sentences) else "iob2"


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """A sentence's tags in IOB2, from `scheme`; plain tags stay as they are."""
    if scheme == "iob1":
        return iob1_to_iob2(tags)
    if scheme == "iobes":
        return [{"S": "B", "E": "I"}.get(t[0], t[0]) + t[1:] if t != "O" else t for t in tags]
    return list(tags)


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
