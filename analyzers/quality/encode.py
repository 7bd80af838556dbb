"""Tokenizing task data in batches and running the model over them (shared by the tasks)."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.modelio import keyword_inputs

from . import distributed


def ready_tokenizer(tokenizer, need_fast: bool = False):
    if tokenizer is None:
        raise TritpressError("this task needs a tokenizer; the model has none (give --baseline a model folder "
                             "with tokenizer files)")
    if need_fast and not getattr(tokenizer, "is_fast", False):
        raise TritpressError(f"this task needs a fast tokenizer (word and character offsets); "
                             f"{type(tokenizer).__name__} is not one")
    if tokenizer.pad_token_id is None:  # GPT-2/LLaMA-style tokenizers: pad with EOS (masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@contextmanager
def progress_bar(desc: str, total: int, unit: str, quiet: bool):
    """A tqdm bar on stderr (rank 0 only); yields its update function."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
               mininterval=0.2 if tty else 15.0, disable=quiet or not distributed.is_main())
    try:
        yield bar.update
    finally:
        bar.close()


def model_inputs(model, enc) -> dict:
    """Only the tensors the model's forward takes (e.g. no token_type_ids for GPT-2)."""
    return keyword_inputs(model, enc)


@torch.no_grad()
def map_batches(fn, n_batches: int, update=None, sizes: list[int] | None = None) -> list:
    """fn(batch index) -> list of per-item results, sharded over ranks and gathered in order.
    The progress bar advances by sizes[i] (default: the items batch i returned)."""
    results = {}
    for i in distributed.my_batches(n_batches):
        results[i] = fn(i)
        if update:
            update(sizes[i] if sizes else len(results[i]))
    return distributed.gather_by_batch(results)


def encode_texts(tok, data, idx, max_length: int, pad: bool = True):
    """Classification examples `idx` of ClsData `data` (text, or text pair), padded to the batch
    (pad=False: unpadded token lists, for fine-tuning's own batches)."""
    pairs = [data.pairs[i] for i in idx] if data.pairs else None
    return tok([data.texts[i] for i in idx], pairs, truncation=True, max_length=max_length, padding=pad,
               return_tensors="pt" if pad else None)


def encode_words(tok, words: list[list[str]], idx, max_length: int, pad: bool = True):
    """Pre-split sentences `idx` (NER), padded to the batch (pad=False: unpadded token lists)."""
    try:
        return tok([words[i] for i in idx], is_split_into_words=True, truncation=True, max_length=max_length,
                   padding=pad, return_tensors="pt" if pad else None)
    except Exception as e:  # e.g. byte-level BPE without add_prefix_space
        raise TritpressError(f"the tokenizer cannot encode pre-split words: {str(e).splitlines()[0]}") from e


def first_subtokens(enc, row: int, n_words: int) -> list[int | None]:
    """Token index of each word's first sub-token (None if truncated away): the token that
    carries the word's tag."""
    first = [None] * n_words
    for t, w in enumerate(enc.word_ids(row)):
        if w is not None and first[w] is None:
            first[w] = t
    return first


PAD_VALUES = {"labels": -100, "attention_mask": 0, "token_type_ids": 0}  # input_ids: the tokenizer's pad id


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Tensors padded to the longest feature of the batch (token lists) or stacked (scalars)."""
    width = max(len(f["input_ids"]) for f in features)
    out = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            fill = pad_id if key == "input_ids" else PAD_VALUES.get(key, 0)
            values = [v + [fill] * (width - len(v)) for v in values]
        out[key] = torch.tensor(values)
    return out
