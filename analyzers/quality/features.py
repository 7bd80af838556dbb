"""Training features of a task's examples, one list of unpadded token lists per example (a QA
window per entry), shared by `compress finetune-head` and task-aware QAT: each batch is then
padded to its own longest entry (`encode.collate`). The two callers differ only in how a label
is numbered — the data's own order for a new head, the head's label2id for a trained one — so
that numbering is an argument."""
from __future__ import annotations

from .encode import batches, encode_texts, encode_words, first_subtokens
from .qa import encode_windows, span_labels

ENCODE_CHUNK = 256   # examples per tokenizer call
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _row(enc, i: int) -> dict:
    return {k: enc[k][i] for k in TOKEN_KEYS if k in enc}


def cls_features(tok, d, max_length: int, class_of: list[int]) -> list[dict]:
    """ClsData `d`: text (pair) tokens and `labels` = class_of[the example's label index]."""
    feats = []
    for part in batches(d.size, ENCODE_CHUNK):
        enc = encode_texts(tok, d, part, max_length, pad=False)
        feats += [{**_row(enc, r), "labels": class_of[d.labels[i]]} for r, i in enumerate(part)]
    return feats


def tok_features(tok, d, max_length: int, tag_ids: dict[str, int]) -> list[dict]:
    """TokData `d`: each word's first sub-token carries tag_ids[its tag]; the other sub-tokens
    and the special tokens are -100 (not scored)."""
    feats = []
    for part in batches(d.size, ENCODE_CHUNK):
        enc = encode_words(tok, d.words, part, max_length, pad=False)
        for r, i in enumerate(part):
            row = _row(enc, r)
            row["labels"] = [-100] * len(row["input_ids"])
            for w, t in enumerate(first_subtokens(enc, r, len(d.words[i]))):
                if t is not None:
                    row["labels"][t] = tag_ids[d.tags[i][w]]
            feats.append(row)
    return feats


def qa_features(tok, d, windows) -> list[dict]:
    """QAData `d`: every question's windows (`windows.qa_max_length` tokens, `windows.doc_stride`
    overlap; the evaluation's own encode_windows) with the answer's start and end token, padding
    stripped again."""
    tok.padding_side = "right"  # the span labels index the unpadded prefix
    feats = []
    for part in batches(d.size, ENCODE_CHUNK // 8):
        chunk = [d.examples[k] for k in part]
        enc, sample, offsets, context = encode_windows(tok, chunk, windows)
        starts, ends = span_labels(chunk, sample, offsets, context)
        for j in range(len(sample)):
            n = int(enc["attention_mask"][j].sum())
            row = {k: enc[k][j, :n].tolist() for k in TOKEN_KEYS if k in enc}
            feats.append({**row, "start_positions": int(starts[j]), "end_positions": int(ends[j])})
    return feats
