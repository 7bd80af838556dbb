"""`compress evaluate --tasks lmeval`: lm-evaluation-harness's own HFLM and simple_evaluate score
both models on a local text (its WikiText protocol), its bits per byte equal tritpress's own LM task
on the same windows, the gate fails a broken model, a packed ternary model with a tied head runs in
HFLM (transformers' tie_weights used to fail on it), and bad input is one line."""
from __future__ import annotations

import json

import pytest

from tests.cli_helpers import run_cli
from tests.test_eval_cli import files, gpt2_dirs, word_tokenizer  # noqa: F401 - fixtures

pytest.importorskip("lm_eval")

WINDOW = 16


@pytest.fixture(scope="module")
def gpt2_bos(gpt2_dirs):  # noqa: F811
    """The tiny GPT-2 pair with a causal LM's tokenizer: the same words, a BOS token and no
    [CLS] ... [SEP] template. lm-eval puts the BOS before the first window (its prefix token),
    tritpress's LM task prepends it: the same windows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(word_tokenizer().get_vocab(), unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="[CLS]")
    for d in gpt2_dirs:
        tok.save_pretrained(d)
    return gpt2_dirs


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """256 tokens: 16 whole windows of 16, so the last window is no different in either protocol
    (lm-eval gives a short last window more context than one token)."""
    import random

    from tests.test_eval_cli import sentence

    r = random.Random(1)
    path = tmp_path_factory.mktemp("lmeval") / "text.txt"
    # no final newline: lm-eval counts the file's bytes, tritpress those of its lines joined by newlines
    path.write_text("\n".join(" ".join(sentence(r)[0][:4]) for _ in range(64)))
    return path


def rows(report: dict, task: str) -> dict:
    return {r["metric"]: r for r in report["rows"] if r["task"].startswith(task)}


def test_lmeval_on_a_local_text_agrees_with_the_lm_task_and_gates(gpt2_bos, text, tmp_path, capsys):
    good, zeroed = gpt2_bos
    common = ["--tasks", "lm,lmeval", "--lm-data", text, "--lmeval-tasks", text, "--context", WINDOW + 1,
              "--stride", WINDOW, "--lmeval-max-length", WINDOW, "--no-plots", "--bootstrap", 0]
    code, out, err = run_cli(["evaluate", good, "--baseline", good, "--out", tmp_path / "same", *common], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    lmeval, ours = rows(report, "lmeval"), rows(report, "lm:")
    assert set(lmeval) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(r["delta"] == 0 and r["status"] == "PASS" for r in lmeval.values())
    # lm-eval's rolling windows of 16 predicted tokens after one of context == context 17, stride 16
    assert lmeval["bits_per_byte"]["baseline"] == pytest.approx(ours["bits_per_byte"]["baseline"], rel=1e-5)
    entry = next(v for k, v in report["tasks"].items() if k.startswith("lmeval"))
    assert entry["compressed"]["protocol"]["max_length"] == WINDOW
    assert next(v for k, v in report["tasks"].items() if k.startswith("lm:"))["baseline"]["protocol"]["tokens"] == 257

    code, out, err = run_cli(["evaluate", zeroed, "--baseline", good, "--out", tmp_path / "zero", *common], capsys)
    assert code == 1 and "Traceback" not in err
    zero = rows(json.loads((tmp_path / "zero" / "report.json").read_text()), "lmeval")
    assert zero["bits_per_byte"]["status"] == "FAIL" and zero["bits_per_byte"]["delta"] > 0


def test_lmeval_runs_a_packed_ternary_model_with_a_tied_head(gpt2_bos, files, tmp_path, capsys):  # noqa: F811
    good, _ = gpt2_bos
    code, _, err = run_cli([good, "--out", tmp_path / "p", "--no-check"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["evaluate", tmp_path / "p", "--baseline", good, "--tasks", "lmeval", "--lmeval-tasks",
                              files / "lm.txt", "--lmeval-max-length", WINDOW, "--no-plots", "--out",
                              tmp_path / "e", "--max-drop", "word_perplexity=100000%", "--max-drop", "byte_perplexity=100000%",
                              "--max-drop", "bits_per_byte=100000%"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    compressed = rows(report, "lmeval")["word_perplexity"]["compressed"]
    assert compressed > 0 and compressed != rows(report, "lmeval")["word_perplexity"]["baseline"]


@pytest.mark.parametrize("args, message", [
    (["--lmeval-tasks", "nowhere.txt"], "no such text file"),
    ([], "needs --lmeval-tasks"),
])
def test_lmeval_bad_input_is_one_line(gpt2_bos, tmp_path, capsys, args, message):
    good, _ = gpt2_bos
    code, out, err = run_cli(["evaluate", good, "--baseline", good, "--tasks", "lmeval", *args, "--out",
                              tmp_path / "x"], capsys)
    assert code != 0 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_lmeval_refuses_a_model_that_is_not_a_causal_lm(files, tmp_path, capsys):  # noqa: F811
    from transformers import BertConfig, BertModel

    tok = word_tokenizer()
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    code, out, err = run_cli(["evaluate", tmp_path / "bert", "--baseline", tmp_path / "bert", "--tasks", "lmeval",
                              "--lmeval-tasks", files / "lm.txt", "--out", tmp_path / "x"], capsys)
    assert code != 0 and "causal LMs" in err and "Traceback" not in err
