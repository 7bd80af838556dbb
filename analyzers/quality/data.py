"""Readers for the four evaluation tasks: local files in their standard formats, or a
Hugging Face dataset `NAME[:CONFIG][@SPLIT]` when online.

| task | local formats                                   | HF examples                         |
|------|-------------------------------------------------|-------------------------------------|
| lm   | WikiText .txt/.tokens/.raw, .jsonl/.csv/.parquet, pkg:ptb | wikitext:wikitext-2-raw-v1 |
| cls  | GLUE .tsv (header row), .jsonl/.csv (columns)   | glue:sst2                           |
| tok  | CoNLL column files (IOB1/IOB2/IOBES, or plain tags like POS), .jsonl | conll2003      |
| qa   | SQuAD .json (or a .zip holding one), .jsonl     | squad, squad_v2                     |
"""
from __future__ import annotations

import csv
import json
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import read_json_file, read_text_file

from .metrics import TAG_SCHEMES, detect_scheme, to_iob2

TEXT_COLUMNS = ("sentence", "text", "sentence1", "question1", "#1 String")
PAIR_COLUMNS = ("sentence2", "question2", "#2 String")
LABEL_COLUMNS = ("label", "Quality")


@dataclass
class Columns:
    """Column names for tabular data; None = the usual names (GLUE/HF conventions)."""

    text: str | None = None
    text_pair: str | None = None
    label: str | None = None


@dataclass
class ClsData:
    texts: list[str]
    pairs: list[str] | None
    labels: list[int]
    label_names: list[str]

    @property
    def size(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> "ClsData":
        return ClsData([self.texts[i] for i in idx], [self.pairs[i] for i in idx] if self.pairs else None,
                       [self.labels[i] for i in idx], self.label_names)


@dataclass
class TokData:
    words: list[list[str]]
    tags: list[list[str]]          # IOB2 (entities), or plain tags (scheme "plain": POS and the like)
    scheme: str = "iob2"           # the file's scheme: iob1, iob2, iobes (all read as IOB2) or plain

    @property
    def size(self) -> int:
        return len(self.words)

    @property
    def plain(self) -> bool:
        return self.scheme == "plain"

    def subset(self, idx: list[int]) -> "TokData":
        return TokData([self.words[i] for i in idx], [self.tags[i] for i in idx], self.scheme)


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]             # [] = unanswerable (SQuAD v2)
    starts: list[int]
    article: str = ""


@dataclass
class QAData:
    examples: list[QAExample] = field(default_factory=list)
    version: str = "1.1"

    @property
    def size(self) -> int:
        return len(self.examples)

    def subset(self, idx: list[int]) -> "QAData":
        return QAData([self.examples[i] for i in idx], self.version)


def split_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """'NAME[:CONFIG][@SPLIT]' -> (name, config, split)."""
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    return name, config or None, split or default_split


LOCAL_SUFFIXES = (".txt", ".tokens", ".raw", ".tsv", ".csv", ".jsonl", ".json", ".zip", ".gz", ".parquet",
                  ".train", ".testa", ".testb", ".conll", ".iob", ".bio")


def is_local(spec: str) -> bool:
    """A path (existing, or named like a data file) rather than a hub dataset name."""
    return Path(spec).exists() or Path(spec).suffix.lower() in LOCAL_SUFFIXES or spec.startswith((".", "/", "~"))


def short_name(spec: str) -> str:
    """A data file as parent/name (the report label of an LM text); a hub name as given."""
    p = Path(spec)
    return f"{p.parent.name}/{p.name}" if is_local(spec) and p.parent.name else spec


def hf_train_spec(spec: str, flag: str, split: str = "train") -> str:
    """The training split of the hub dataset `spec`; a local file has none: pass `flag`."""
    if is_local(spec):
        raise TritpressError(f"the probe needs training data for {spec}: pass {flag}")
    name, config, _ = split_spec(spec, "")
    return f"{name}:{config}@{split}" if config else f"{name}@{split}"


def subsample(n: int, k: int, seed: int) -> list[int]:
    """Sorted seeded sample of k of range(n); all of it when k is 0 or >= n."""
    if not k or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def sample(data, k: int, seed: int, spec: str, split: str):
    """(at most k items of ClsData/TokData/QAData `data`, seeded; its provenance for the report)."""
    idx = subsample(data.size, k, seed)
    provenance = {"data": spec, "split": split if not is_local(spec) else "(file)", "available": data.size,
                  "used": len(idx), "subsample_seed": seed if len(idx) < data.size else None}
    return data.subset(idx), provenance


def load_hf(spec: str, default_split: str):
    from tritpress.compressor.data import _datasets
    name, config, split = split_spec(spec, default_split)
    try:
        return _datasets().load_dataset(name, config, split=split)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TritpressError(f"could not load dataset {spec!r} (split {split!r}; offline? pass a local file): "
                             f"{first}") from e


def _file(spec: str) -> Path:
    path = Path(spec)
    if not path.is_file():
        raise TritpressError(f"no such data file: {spec}")
    return path


def _rows(path: Path) -> list[dict]:
    """Rows of a .tsv (GLUE: header row, no quoting), .csv, .jsonl or .json list."""
    suffix = path.suffix.lower()
    text = read_text_file(path, "data file", encoding="utf-8-sig")
    if suffix == ".tsv":
        return list(csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        return [_json(line, f"{path} line {i + 1}") for i, line in enumerate(text.splitlines()) if line.strip()]
    if suffix == ".json":
        data = _json(text, str(path))
        return data if isinstance(data, list) else data.get("data", [])
    raise TritpressError(f"unsupported data file {path.name}: use .tsv, .csv, .jsonl or .json")


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TritpressError(f"data file {where} is not valid JSON: {e}") from None


def _column(rows: list[dict], name: str, spec: str) -> list:
    """One column of every row; a row without it (ragged .jsonl) is refused, not a KeyError later."""
    missing = next((i for i, r in enumerate(rows) if name not in r), None)
    if missing is not None:
        raise TritpressError(f"{spec}: example {missing + 1} has no {name!r} column")
    return [r[name] for r in rows]


def _pick(columns, wanted: str | None, defaults: tuple, what: str, spec: str, required: bool = True):
    if wanted:
        if wanted not in columns:
            raise TritpressError(f"{spec} has no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise TritpressError(f"{spec}: no {what} column among {', '.join(columns)}; name it with a column flag")
    return found


# ------------------------------------------------------------------ cls


def read_cls(spec: str, split: str, cols: Columns = Columns(), label_names: list[str] | None = None) -> ClsData:
    if is_local(spec):
        rows = _rows(_file(spec))
        if not rows:
            raise TritpressError(f"{spec} holds no examples")
        columns = list(rows[0])
        get = lambda c: _column(rows, c, spec)  # noqa: E731
        names_from_data = None
    else:
        ds = load_hf(spec, split)
        columns = ds.column_names
        get = lambda c: list(ds[c])  # noqa: E731
        feature = ds.features.get(cols.label or "label")
        names_from_data = getattr(feature, "names", None)
    text_c = _pick(columns, cols.text, TEXT_COLUMNS, "text", spec)
    pair_c = _pick(columns, cols.text_pair, PAIR_COLUMNS, "text pair", spec, required=False)
    label_c = _pick(columns, cols.label, LABEL_COLUMNS, "label", spec)
    raw = [str(v).strip() for v in get(label_c)]
    if any(v in ("", "-1", "None") for v in raw):
        raise TritpressError(f"{spec} has unlabelled examples (a test split?); use a labelled split")
    names = label_names or names_from_data or sorted(set(raw), key=lambda v: (not v.lstrip("-").isdigit(),
                                                                              int(v) if v.lstrip("-").isdigit()
                                                                              else 0, v))
    if names_from_data and not label_names:
        labels = [int(v) for v in raw]
    else:
        index = {n: i for i, n in enumerate(names)}
        missing = sorted(set(raw) - set(index))
        if missing:
            raise TritpressError(f"{spec} has labels {missing[:3]} that the training data does not have")
        labels = [index[v] for v in raw]
    pairs = [str(t) for t in get(pair_c)] if pair_c else None
    return ClsData([str(t) for t in get(text_c)], pairs, labels, [str(n) for n in names])


# ------------------------------------------------------------------ tok


def read_conll(path: Path, tag_column: int = -1) -> TokData:
    """The words and the raw tags of `tag_column` (see with_scheme)."""
    words, tags, sent_w, sent_t = [], [], [], []

    def flush():
        if sent_w:
            words.append(sent_w.copy())
            tags.append(sent_t.copy())
            sent_w.clear()
            sent_t.clear()

    opener = __import__("gzip").open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if not parts or parts[0] == "-DOCSTART-":
                    flush()
                    continue
                sent_w.append(parts[0])
                sent_t.append(parts[tag_column])
    except UnicodeDecodeError:
        read_text_file(path, "data file")  # raises the one-line message naming the file
        raise
    flush()
    return TokData(words, tags)


def with_scheme(data: TokData, scheme: str, spec: str) -> TokData:
    """Raw tags read as `scheme` ("auto": detected from the tags): IOB1/IOBES become IOB2, plain
    tags stay as they are. A file whose tags are not IOB cannot be read as IOB (seqeval would
    misparse its tags)."""
    if scheme not in TAG_SCHEMES:
        raise TritpressError(f"unknown tag scheme {scheme!r}; choose from {', '.join(TAG_SCHEMES)}")
    found = detect_scheme(data.tags)
    if scheme != "auto" and found == "plain" and scheme != "plain":
        bad = sorted({t for s in data.tags for t in s if detect_scheme([[t]]) == "plain"})[:4]
        raise TritpressError(f"{spec}: tags {bad} are not {scheme.upper()} (PREFIX-TYPE); use --tag-scheme plain "
                             "or auto")
    scheme = found if scheme == "auto" else scheme
    return TokData(data.words, [to_iob2(t, scheme) for t in data.tags], scheme)


def read_tok(spec: str, split: str, tokens_column: str = "tokens", tags_column: str = "ner_tags",
             scheme: str = "auto") -> TokData:
    if is_local(spec):
        path = _file(spec)
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = _rows(path)
            data = TokData([r[tokens_column] for r in rows], [list(r[tags_column]) for r in rows])
        else:
            data = read_conll(path)
    else:
        ds = load_hf(spec, split)
        names = getattr(ds.features[tags_column].feature, "names", None)
        tags = [[names[t] if names else t for t in row] for row in ds[tags_column]]
        data = TokData(list(ds[tokens_column]), tags)
    if not data.words:
        raise TritpressError(f"{spec} holds no sentences")
    return with_scheme(data, scheme, spec)


# ------------------------------------------------------------------ qa


def _squad_json(data: dict) -> QAData:
    out = QAData(version=str(data.get("version", "1.1")).lstrip("v"))
    for article in data["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                out.examples.append(QAExample(qa["id"], qa["question"], para["context"],
                                              [a["text"] for a in answers], [a["answer_start"] for a in answers],
                                              article.get("title", "")))
    if any(not e.answers for e in out.examples):
        out.version = "2.0"
    return out


def _hf_rows(rows) -> QAData:
    out = QAData()
    for r in rows:
        a = r["answers"]
        out.examples.append(QAExample(str(r["id"]), r["question"], r["context"], list(a["text"]),
                                      list(a["answer_start"]), r.get("title", "")))
    out.version = "2.0" if any(not e.answers for e in out.examples) else "1.1"
    return out


def read_qa(spec: str, split: str) -> QAData:
    if is_local(spec):
        path = _file(spec)
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as z:
                members = [n for n in z.namelist() if n.endswith(".json")]
                if len(members) != 1:
                    raise TritpressError(f"{spec} should hold exactly one .json file (found {len(members)})")
                return _squad_json(json.loads(z.read(members[0])))
        if path.suffix.lower() == ".json":
            return _squad_json(read_json_file(path, "data file"))
        return _hf_rows(_rows(path))
    return _hf_rows(load_hf(spec, split))


def split_by_article(data: QAData, train_fraction: float = 0.5) -> tuple[QAData, QAData]:
    """Articles in file order: the first part trains a probe, the rest is evaluated (no article in both)."""
    titles = list(dict.fromkeys(e.article for e in data.examples))
    if len(titles) < 2:
        raise TritpressError("splitting QA data by article needs at least two articles; pass --qa-train")
    cut = set(titles[: max(1, round(len(titles) * train_fraction))])
    train = QAData([e for e in data.examples if e.article in cut], data.version)
    rest = QAData([e for e in data.examples if e.article not in cut], data.version)
    return train, rest
