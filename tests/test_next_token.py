"""Models whose output is only the next token's logits ([batch, vocab], RNN or not): detected from
the output's shape, trained on windows whose last token is the target, scored window by window
(held-out loss and `evaluate --tasks lm`); and the whole CLI on a character-level LSTM with
attention over its time steps, saved as a whole nn.Module, with its own vocabulary (--vocab) and
its class named by --skeleton."""
from __future__ import annotations

import contextlib
import io
import json
import math
import string

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.cli_helpers import run_cli
from tritpress.cli.main import main
from tests.tiny_models import VOCAB, AttentionCharLSTM, build, sample_ids
from tritpress.analyzers.quality import lm
from tritpress.analyzers.quality.heads import lm_kind
from tritpress.compressor import TernaryConfig, convert, prepare
from tritpress.compressor.data import next_token_windows
from tritpress.compressor.modelio import ModelIO, held_out_loss, held_out_quality, returns_next_token_only
from tritpress.compressor.structure import discover
from tritpress.compressor.train import TrainConfig, distill_losses, train_qat


class LastPosition(nn.Module):
    """A per-position LM cut down to its last position's logits: on a prefix it must predict what the
    full model predicts at that prefix's end (an LSTM is causal), so every number can be checked
    against the per-position model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)[:, -1]


class NextTokenMLP(nn.Module):
    """Not an RNN: embedding, a stack of two identical blocks, mean over time steps, head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(2))
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h.mean(1))


def io_of(model):
    return ModelIO.discover(model, discover(model))


def char_lstm(seed: int = 0) -> AttentionCharLSTM:
    torch.manual_seed(seed)
    return AttentionCharLSTM().eval()


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("make", [char_lstm, lambda: NextTokenMLP().eval(), lambda: LastPosition(build("lstm"))])
def test_next_token_only_models_are_detected_from_the_output_shape(make):
    model = make()
    io = io_of(model)
    assert io.next_token_only and io.causal and io.has_head
    assert lm_kind(model) == "next"
    converted = convert(prepare(make(), TernaryConfig()))  # the head is a quantized layer now
    assert io_of(converted).next_token_only and lm_kind(converted) == "next"


@pytest.mark.parametrize("name", ["lstm", "gru", "gpt2", "bert"])
def test_per_position_models_are_not_next_token_only(name):
    model = build(name)
    assert not io_of(model).next_token_only
    assert lm_kind(model) != "next"


@torch.no_grad()
def test_a_seq_first_next_token_rnn_is_called_seq_first_and_its_output_is_not_transposed():
    class SeqFirstNext(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.out = nn.Embedding(VOCAB, 16), nn.LSTM(16, 16, 2), nn.Linear(16, VOCAB)

        def forward(self, ids):  # ids [seq, batch]
            return self.out(self.rnn(self.emb(ids))[0][-1])

    torch.manual_seed(0)
    model = SeqFirstNext().eval()
    io, ids = io_of(model), sample_ids(batch=3, length=5)
    assert io.seq_first and io.next_token_only
    assert torch.equal(io.forward(model, ids), model(ids.t()))


def test_a_position_table_larger_than_the_vocabulary_does_not_hide_the_next_token_output():
    class WithPositions(NextTokenMLP):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(4 * VOCAB, 16)

        def forward(self, ids):
            return super().forward(ids) + 0 * self.pos(torch.arange(ids.shape[1])).sum()

    assert returns_next_token_only(WithPositions().eval())


def test_detection_leaves_each_module_in_its_own_mode():
    model = char_lstm().train()
    model.rnn.eval()
    assert returns_next_token_only(model)
    assert model.training and model.emb.training and not model.rnn.training


def test_a_forward_that_does_not_take_ids_alone_is_not_next_token_only():
    class NeedsTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

        def forward(self, ids, lengths):
            return self.out(self.emb(ids))[:, -1]

    assert not returns_next_token_only(NeedsTwo())


# ---------------------------------------------------------------- held-out loss and perplexity


@torch.no_grad()
def test_held_out_loss_reads_every_prefix_as_a_window():
    full = build("lstm")
    wrapped = LastPosition(full)
    ids = sample_ids(batch=5, length=9)
    expected = held_out_loss(io_of(full), full, ids, batch=2)  # per-position: one forward per sequence
    assert held_out_loss(io_of(wrapped), wrapped, ids, batch=2) == pytest.approx(expected, rel=1e-5)
    quality = held_out_quality(io_of(wrapped), wrapped, ids, batch=2)
    assert quality["tokens"] == 5 * 8 and quality["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


@torch.no_grad()
def test_perplexity_of_a_next_token_model_is_the_stride_one_window_of_the_per_position_model():
    full = build("lstm")
    g = torch.Generator().manual_seed(3)
    stream = lm.LMText(torch.randint(0, VOCAB, (41,), generator=g), n_bytes=120, n_lines=3)
    seen = []
    got = lm.next_token_perplexity(LastPosition(full), stream, context=8, batch_size=4, progress=seen.append)
    expected = lm.causal_perplexity(full, stream, context=8, stride=1, batch_size=4)
    assert got["scored_tokens"] == 40 == sum(seen) and got["windows"] == 40
    for key in ("perplexity", "nll", "bits_per_byte"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9)
    assert sum(n for _, n in got["per_window"]) == 40 and len(got["per_window"]) == 5  # runs of 8 tokens
    assert sum(x for x, _ in got["per_window"]) == pytest.approx(got["nll"] * 40, rel=1e-9)


# ---------------------------------------------------------------- training


def test_the_task_loss_is_the_cross_entropy_of_each_window_s_last_token():
    teacher = char_lstm()
    student = prepare(char_lstm(seed=1), TernaryConfig())
    io = io_of(teacher)
    windows = next_token_windows(sample_ids(batch=2, length=10))
    from tritpress.compressor.modelio import BlockOutputs
    hooks = BlockOutputs(student, []), BlockOutputs(teacher, [])
    losses = distill_losses(io, student, teacher, windows, *hooks, TrainConfig())
    with torch.no_grad():
        expected = F.cross_entropy(student(windows[:, :-1]), windows[:, -1])
    assert losses["task"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(losses) == {"kd", "task", "loss"}


@pytest.mark.parametrize("make", [char_lstm, lambda: NextTokenMLP().eval()])
def test_qat_trains_a_next_token_model_on_windows(make, tmp_path):
    teacher = make()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prepare(make(), TernaryConfig())
    start = {k: v.clone() for k, v in student.state_dict().items()}
    windows = next_token_windows(torch.randint(0, VOCAB, (20, 12), generator=torch.Generator().manual_seed(0)))
    cfg = TrainConfig(steps=3, seq_len=12, batch_size=4, checkpoint_every=0).resolved(1000)
    result = train_qat(student, teacher, discover(teacher), windows, cfg, tmp_path)
    curve = result.findings["curve"]
    assert len(curve) == 3 and all(math.isfinite(e["loss"]) and e["task"] > 0 for e in curve)
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


# ---------------------------------------------------------------- the command line, end to end

CHARS = string.printable[:VOCAB - 1]   # 99 characters, newline among them, and <unk>: the 100 rows


@pytest.fixture(scope="module")
def char_files(tmp_path_factory):
    """A pickled character LSTM with attention (tests.tiny_models, so that it unpickles), its
    character vocabulary and a little text."""
    d = tmp_path_factory.mktemp("charlm")
    torch.save(char_lstm(), d / "char.pt")
    (d / "vocab.json").write_text(json.dumps({"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}))
    words = "the quick brown fox jumps over the lazy dog; a small cat sleeps on the warm mat".split()
    lines = [" ".join(words[(i * 5 + j) % len(words)] for j in range(6 + i % 5)) for i in range(40)]
    (d / "text.txt").write_text("\n".join(lines) + "\n")
    (d / "recipe.toml").write_text(f'[eval]\nlm_data = ["{d / "text.txt"}"]\nlm_tokens = 200\nplots = false\n'
                                   'max_drop = ["perplexity=1000%", "bits_per_byte=1000%"]\n')
    return d


def run_main(args) -> tuple[int, str, str]:
    """`compress ARGS` in this process, for module fixtures (capsys is per test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def char_run(char_files, tmp_path_factory):
    """`compress` with every stage on the character LSTM: sharing (its two LSTM layers tied), QAT,
    pack, ONNX and `--tasks lm`, with its --vocab. -> (output folder, exit code, report, stderr)."""
    d, out = char_files, tmp_path_factory.mktemp("charrun") / "o"
    code, stdout, err = run_main([d / "char.pt", "--trust-pickle", "--vocab", d / "vocab.json", "--out", out,
                                  "--steps", 3, "--data", d / "text.txt", "--seq-len", 16, "--batch-size", 4,
                                  "--eval-tokens", 64, "--sharing", "0,1", "--share-data", d / "text.txt",
                                  "--share-sequences", 4, "--share-seq-len", 12, "--onnx", "--tasks", "lm",
                                  "--recipe", d / "recipe.toml", "--json"])
    return out, code, json.loads(stdout) if code == 0 else None, err


def test_every_stage_runs_on_a_pickled_character_lstm_with_attention(char_run):
    out, code, report, err = char_run
    assert code == 0, err
    assert "no tokenizer" not in err  # --vocab given: nothing to warn about
    training = report["training"]
    assert training["steps"] == 3 and len(training["curve"]) == 3
    assert training["train_sequences"] > training["eval_sequences"]  # windows moving by one character
    assert set(training["quality"]) == {"original", "shared_float", "ternary_post_training", "ternary_qat"}
    assert all(math.isfinite(q["ppl"]) and q["tokens"] == 4 * 15 for q in training["quality"].values())
    sharing = report["sharing"]
    assert sharing["plan"]["groups"] == [[0, 1]] and sharing["unique_params_after"] < sharing["unique_params_before"]
    assert all(math.isfinite(sharing["calibration_loss"][k]) for k in ("original", "after_tying"))
    assert report["onnx"]["validation"]["passed"]
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
    evaluation = report["evaluation"]
    assert evaluation["passed"], evaluation
    entry = next(iter(evaluation["tasks"].values()))
    protocol = entry["baseline"]["protocol"]
    assert protocol["kind"] == "next" and protocol["scored_tokens"] == protocol["tokens"] - 1
    assert protocol["bytes"] == protocol["tokens"]  # one token per character (ASCII text)
    assert protocol["vocab"].endswith("vocab.json")


def test_the_run_tokenized_its_text_with_the_vocabulary(char_files, char_run):
    """The original's held-out perplexity in the report, recomputed from characters numbered by
    vocab.json: the run used exactly this encoding."""
    from tritpress.compressor.data import TokenVocab, lm_blocks, read_texts, tokenizer_fn
    _, code, report, err = char_run
    assert code == 0, err
    texts = read_texts(str(char_files / "text.txt"))
    blocks = lm_blocks(texts, tokenizer_fn(TokenVocab.read(str(char_files / "vocab.json"))), 16)
    held_out = blocks[-report["training"]["eval_sequences"]:]
    teacher = torch.load(char_files / "char.pt", weights_only=False)
    assert report["training"]["quality"]["original"]["nll"] == pytest.approx(
        held_out_loss(io_of(teacher), teacher, held_out), rel=1e-5)


def test_without_vocab_a_one_line_note_says_how_the_text_is_tokenized(char_files, tmp_path, monkeypatch):
    monkeypatch.setattr("tritpress.compressor.data._SAID", set())
    d = char_files
    code, _, err = run_main([d / "char.pt", "--trust-pickle", "--out", tmp_path / "o", "--steps", 1,
                             "--data", d / "text.txt", "--seq-len", 16, "--batch-size", 2, "--eval-tokens", 32,
                             "--sharing", "0,1", "--share-data", d / "text.txt", "--share-sequences", 2,
                             "--share-seq-len", 8, "--tasks", "lm", "--recipe", d / "recipe.toml"])
    assert code == 0, err
    notes = [line for line in err.splitlines() if "no tokenizer" in line]
    assert len(notes) == 1 and "--vocab FILE" in notes[0] and "words" in notes[0]


def test_a_bad_vocab_is_refused_before_any_compute(char_files, tmp_path, capsys):
    bad = tmp_path / "v.json"
    bad.write_text('{"a": 0, "b": 500}')
    code, _, err = run_cli([char_files / "char.pt", "--trust-pickle", "--vocab", bad, "--out", tmp_path / "o",
                            "--steps", 2, "--data", char_files / "text.txt"], capsys)
    assert_one_line_error(code, err, "--vocab")
    assert "[train]" not in err and not (tmp_path / "o").exists()
    packed = tmp_path / "p"
    code, _, err = run_cli([char_files / "char.pt", "--trust-pickle", "--out", packed], capsys)
    assert code == 0, err
    code, _, err = run_cli(["evaluate", packed, "--baseline", char_files / "char.pt", "--trust-pickle",
                            "--tasks", "lm", "--lm-data", char_files / "text.txt", "--vocab", bad,
                            "--out", tmp_path / "ev"], capsys)
    assert_one_line_error(code, err, "--vocab")
    assert not (tmp_path / "ev" / "report.json").exists()


def assert_one_line_error(code, err, flag):
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]  # stage markers
    assert code == 1 and len(lines) == 1 and lines[0].startswith("compress: error:") and flag in lines[0], err
    assert "Traceback" not in err


SKELETON = "tests.tiny_models:AttentionCharLSTM"


def test_evaluate_export_and_info_name_the_class_with_skeleton(char_files, char_run, tmp_path, capsys):
    out, code, _, err = char_run
    assert code == 0, err
    packed = out / "model.tritpress.safetensors"
    code, text, err = run_cli(["evaluate", packed, "--baseline", char_files / "char.pt", "--trust-pickle",
                               "--skeleton", SKELETON, "--vocab", char_files / "vocab.json", "--tasks", "lm",
                               "--lm-data", char_files / "text.txt", "--lm-tokens", 100, "--context", 12,
                               "--max-drop", "perplexity=1000%", "--max-drop", "bits_per_byte=1000%",
                               "--no-plots", "--json", "--out", tmp_path / "ev"], capsys)
    assert code == 0, err
    report = json.loads(text)
    assert next(iter(report["tasks"].values()))["compressed"]["protocol"]["kind"] == "next"
    code, text, err = run_cli(["export", packed, "--onnx", tmp_path / "m.onnx", "--skeleton", SKELETON, "--json"],
                              capsys)
    assert code == 0, err
    assert json.loads(text)["validation"]["passed"] and (tmp_path / "m.onnx").is_file()
    code, text, err = run_cli(["info", packed, "--skeleton", SKELETON], capsys)
    assert code == 0, err
    assert "ternary layers" in text and "loads into tests.tiny_models.AttentionCharLSTM: ok" in text


def test_without_skeleton_the_error_names_the_flag(char_run, tmp_path, capsys):
    out, code, _, err = char_run
    assert code == 0, err
    code, _, err = run_cli(["export", out / "model.tritpress.safetensors", "--onnx", tmp_path / "m.onnx"], capsys)
    assert_one_line_error(code, err, f"--skeleton {SKELETON}")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("command", ["export", "info", "evaluate"])
@pytest.mark.parametrize("value, says", [
    ("tests.tiny_models", "expected package.module:Class"),
    ("no_such_package.models:Net", "cannot import no_such_package.models"),
    ("tests.tiny_models:NoSuchClass", "has no NoSuchClass"),
    ("tests.tiny_models:VOCAB", "not a class"),
    ("tests.tiny_models:sample_ids", "not an nn.Module"),
    ("tests.tiny_models:bert_config", "BertConfig"),  # not an nn.Module either
    ("tests.tiny_models:make_gpt2", "does not fit"),
])
def test_a_bad_skeleton_is_one_line_naming_the_flag(char_files, char_run, tmp_path, capsys, command, value, says):
    out, code, _, err = char_run
    assert code == 0, err
    packed = out / "model.tritpress.safetensors"
    args = {"export": ["export", packed, "--onnx", tmp_path / "m.onnx"], "info": ["info", packed],
            "evaluate": ["evaluate", packed, "--baseline", char_files / "char.pt", "--trust-pickle", "--tasks", "lm",
                         "--lm-data", char_files / "text.txt", "--out", tmp_path / "ev"]}[command]
    code, _, err = run_cli([*args, "--skeleton", value], capsys)
    assert_one_line_error(code, err, "--skeleton")
    assert says in err
