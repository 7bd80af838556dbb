"""Every stage of `compress` in one run, for each tiny model family of tests/tiny_models: ingest,
sharing (analysis + tie), ternary QAT with distillation, pack and reload, ONNX export validated with
ONNX Runtime, and `--tasks lm` evaluation with its gate. The README's table of the architectures
tested end to end points here."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tests.cli_helpers import run_cli
from tests.tiny_models import build

pytest.importorskip("onnxruntime")

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Text, a word vocabulary for it (the tiny models have no tokenizer) and the [eval] recipe."""
    d = tmp_path_factory.mktemp("e2e")
    rng = random.Random(0)
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(40)) + "\n")
    (d / "vocab.json").write_text(json.dumps({"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}))
    # a gate this budget passes: the point is that every stage runs and reports, not the quality of 2 steps
    (d / "recipe.toml").write_text(f'[eval]\nlm_data = ["{d / "text.txt"}"]\nlm_train = "{d / "text.txt"}"\n'
                                   'lm_tokens = 200\ncontext = 16\nlm_probe_windows = 8\nprobe_epochs = 1\n'
                                   'plots = false\nbootstrap = 0\n'
                                   'max_drop = ["perplexity=100000%", "bits_per_byte=100000%"]\n')
    return d


def checkpoint(name: str, where) -> list:
    """The model as a user hands it over: a transformers folder, or a pickled nn.Module."""
    model = build(name)
    if name in ("lstm", "gru"):
        torch.save(model, where / "model.pt")
        return [where / "model.pt", "--trust-pickle"]
    model.save_pretrained(where / "model")
    return [where / "model"]


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_tied", "llama_untied", "lstm", "gru"])
def test_every_stage_runs_on_each_tiny_family(name, files, tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, err = run_cli([*checkpoint(name, tmp_path), "--vocab", files / "vocab.json", "--out", out,
                                 "--sharing", "cycle:1", "--share-data", files / "text.txt", "--share-sequences", 4,
                                 "--share-seq-len", 16, "--steps", 2, "--data", files / "text.txt", "--seq-len", 16,
                                 "--batch-size", 2, "--eval-tokens", 64, "--onnx", "--tasks", "lm",
                                 "--recipe", files / "recipe.toml", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    sharing = report["sharing"]
    assert len(sharing["plan"]["groups"]) == 1  # every block tied to one
    assert sharing["unique_params_after"] < sharing["unique_params_before"]
    assert (out / "analysis" / "analysis.json").is_file()
    training = report["training"]
    assert training["steps"] == 2 and math.isfinite(training["final"]["loss"])
    assert {"shared_float", "ternary_qat"} <= set(training["quality"])
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
    assert report["checks"]["reload_vs_converted"]["codes_bit_identical"]
    assert report["onnx"]["validation"]["passed"] and (out / "model.onnx").is_file()
    evaluation = report["evaluation"]
    assert evaluation["passed"], evaluation
    metrics = next(iter(evaluation["tasks"].values()))["compressed"]["metrics"]
    assert math.isfinite(metrics["perplexity"])


@pytest.mark.parametrize("name", ["llama_untied", "lstm"])
def test_post_training_copies_the_model_only_where_a_later_stage_reads_the_original(name, tmp_path, capsys,
                                                                                   monkeypatch):
    """Post-training: a transformers checkpoint is converted in place (the check's reference output
    is taken first; evaluation reloads the original from disk): no model copy, one model in memory.
    A pickled module keeps its original as the reload skeleton: one copy. Both checks still hold."""
    import copy

    from tritpress.cli import pipeline

    copies = []
    real = copy.deepcopy

    def counting(x, *a, **k):
        if isinstance(x, torch.nn.Module) and not a and "memo" not in k:   # a top-level copy, not its recursion
            copies.append(type(x).__name__)
        return real(x, *a, **k)

    monkeypatch.setattr(pipeline.copy, "deepcopy", counting)
    code, stdout, err = run_cli([*checkpoint(name, tmp_path), "--out", tmp_path / "o", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    whole = [c for c in copies if c == type(build(name)).__name__]   # (a QRNN copies its inner nn.LSTM)
    assert len(whole) == (0 if name == "llama_untied" else 2), copies   # lstm: quantize + verify skeleton
    assert report["checks"]["ternary_vs_original"]["max_abs_diff"] > 0
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
    assert report["size"]["original"]["params"] == sum(p.numel() for p in build(name).parameters())
