"""The evaluation task registry: a task declared in one place runs through `evaluate` and the
gate; metrics carry their direction and default tolerance; the evaluation entry point needs
nothing from the pipeline."""
from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tritpress.analyzers.quality import (TASKS, EvalConfig, Metric, Task, TaskData, evaluate, evaluate_packed,
                                         registered)
from tritpress.analyzers.quality.evaluate import STAGE_KEYS
from tritpress.analyzers.quality.gate import Tolerance, tolerance_for
from tritpress.compressor.errors import TritpressError
from tests.tiny_models import build

# ------------------------------------------------------------------ a toy task, declared once

SCORE = Metric("toy_score")                                         # higher is better, 1 point
WEIGHT = Metric("toy_weight", lower_is_better=True, max_drop="10%")


def read_toy(task, cfg, need_train):
    return [TaskData(f"{task.name}:a", test=[1.0, 2.0], protocol={"eval": {"items": 2, "seed": cfg.seed}}),
            TaskData(f"{task.name}:b", test=[3.0], protocol={"eval": {"items": 1, "seed": cfg.seed}})]


def run_toy(task, model, tokenizer, data, cfg, desc):
    """toy_weight: mean |w| over the model's parameters (times the data); toy_score: 100 while any is non-zero."""
    with torch.no_grad():
        mean_abs = float(torch.cat([p.abs().flatten() for p in model.parameters()]).mean())
    return {"metrics": {"toy_score": 100.0 if mean_abs else 0.0, "toy_weight": mean_abs * sum(data.test),
                        "unrelated": 1.0},
            "protocol": {"items": len(data.test)}, "head": "own"}


TOY = Task("toy", "a toy task", (SCORE, WEIGHT), read_toy, run_toy, needs_probe=lambda *_: False)


@pytest.fixture(scope="module")
def lstm_pair(tmp_path_factory):
    """A saved LSTM LM and a copy with every weight halved (toy_weight halves: a 50 % gain)."""
    d = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    model = build("lstm")
    torch.save(model, d / "base.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    torch.save(model, d / "half.pt")
    return d / "base.pt", d / "half.pt"


def _toy_config(compressed, baseline, out, **kw):
    return EvalConfig(compressed=str(compressed), baseline=str(baseline), trust_pickle=True, tasks="toy",
                      quiet=True, plots=False, out=str(out), **kw)


def test_a_task_registered_in_one_place_runs_through_evaluate_and_the_gate(lstm_pair, tmp_path):
    base, half = lstm_pair
    with registered(TOY):
        assert "toy" in TASKS
        report = evaluate(_toy_config(half, base, tmp_path / "gain"))
        # lower toy_weight is better, so halving it passes; toy_score stays at 100
        assert [(r["task"], r["metric"]) for r in report["rows"]] == [
            ("toy:a", "toy_score"), ("toy:a", "toy_weight"), ("toy:b", "toy_score"), ("toy:b", "toy_weight")]
        assert report["passed"] and all(r["status"] == "PASS" for r in report["rows"])
        weight = report["rows"][1]
        assert weight["lower_is_better"] and weight["tolerance"] == "10%" and weight["tolerance_kind"] == "relative"
        assert weight["compressed"] == pytest.approx(weight["baseline"] / 2)
        assert report["rows"][0]["tolerance"] == "1" and not report["rows"][0]["lower_is_better"]
        assert report["tasks"]["toy:b"]["data"] == {"eval": {"items": 1, "seed": 0}}
        assert "unrelated" not in {r["metric"] for r in report["rows"]}  # only declared metrics are gated

        # the other way round toy_weight doubles: beyond its 10 % default, and beyond a 50 % override
        report = evaluate(_toy_config(base, half, tmp_path / "loss"))
        assert not report["passed"]
        assert [r["status"] for r in report["rows"]] == ["PASS", "FAIL", "PASS", "FAIL"]
        report = evaluate(_toy_config(base, half, tmp_path / "override", max_drop=["toy.toy_weight=150%"]))
        assert report["passed"] and report["rows"][1]["tolerance"] == "150%"
        saved = json.loads((tmp_path / "override" / "report.json").read_text())
        assert [r["status"] for r in saved["rows"]] == ["PASS"] * 4
    assert "toy" not in TASKS
    with pytest.raises(TritpressError, match="unknown task"):
        _toy_config(base, base, tmp_path / "gone")


def test_registry_refuses_a_second_task_of_a_name_and_tasks_without_metrics():
    with pytest.raises(TritpressError, match="already registered"):
        with registered(Task("lm", "again", (SCORE,), read_toy, run_toy)):
            pass
    assert TASKS["lm"].title == "language modeling"
    with pytest.raises(TritpressError, match="metric"):
        with registered(Task("empty", "no metrics", (), read_toy, run_toy)):
            pass
    with pytest.raises(TritpressError, match="metric"):
        with registered(Task("twice", "a metric twice", (SCORE, SCORE), read_toy, run_toy)):
            pass
    assert "empty" not in TASKS and "twice" not in TASKS


# ------------------------------------------------------------------ the built-in declarations


def test_builtin_tasks_declare_metrics_keys_and_defaults():
    assert list(TASKS) == ["lm", "cls", "tok", "qa", "lmeval"]
    assert {n: [m.name for m in t.metrics] for n, t in TASKS.items()} == {
        "lm": ["perplexity", "bits_per_byte"], "cls": ["accuracy", "macro_f1", "f1"],
        "tok": ["f1_lenient", "f1_strict", "token_accuracy"], "qa": ["exact_match", "f1"],
        "lmeval": ["word_perplexity", "byte_perplexity", "bits_per_byte", "accuracy", "accuracy_norm",
                   "exact_match"]}
    for name, task in TASKS.items():
        for metric in task.metrics:
            assert metric.lower_is_better == (name == "lm" or "perplexity" in metric.name or "byte" in metric.name)
            Tolerance.parse(metric.max_drop)  # every default is valid --max-drop syntax
        if name == "lmeval":   # lm-eval's tasks name their own data; no probe
            assert (task.data_key, task.train_key) == ("lmeval_tasks", None)
            continue
        assert (task.data_key, task.train_key) == (f"{name}_data", f"{name}_train")
        assert task.train_flag == f"--{name}-train"
    assert {n: t.probe_epochs for n, t in TASKS.items() if n != "lmeval"} == {"lm": 5, "cls": 20, "tok": 10, "qa": 10}
    cfg = EvalConfig()
    assert cfg.lm_data == [TASKS["lm"].default_data] and cfg.qa_data == TASKS["qa"].default_data == "squad"


def test_the_gate_reads_direction_and_tolerance_from_the_metric():
    assert str(tolerance_for("lm", TASKS["lm"].metrics[0], {})) == "5%"
    assert str(tolerance_for("lm", "bits_per_byte", {})) == "2%"
    assert str(tolerance_for("toy", WEIGHT, {})) == "10%"  # a metric object needs no registered task
    assert str(tolerance_for("qa", "exact_match", {"exact_match": Tolerance(2.0, False)})) == "2"


# ------------------------------------------------------------------ the evaluation entry point


def test_evaluate_packed_needs_no_pipeline_config_and_the_pipeline_stage_agrees(lstm_pair, tmp_path):
    from tritpress.cli import pipeline

    base, _ = lstm_pair
    lm_file = tmp_path / "lm.txt"
    lm_file.write_text("\n".join("the cat sat on the mat ." for _ in range(20)) + "\n")
    settings = EvalConfig(lm_data=[str(lm_file)], context=8, plots=False)
    got = evaluate_packed(settings, "lm", base, str(base), tmp_path / "new", trust_pickle=True)
    assert tuple(got) == STAGE_KEYS and got["passed"]
    assert [r["metric"] for r in got["rows"]] == ["perplexity", "bits_per_byte"]
    assert (tmp_path / "new" / "report.json").is_file() and got["files"]["json"] == str(tmp_path / "new" /
                                                                                        "report.json")
    ccfg = SimpleNamespace(eval=settings, tasks="lm", model=str(base), config=None, trust_pickle=True, vocab=None)
    old = pipeline.evaluate(SimpleNamespace(cfg=ccfg, packed_path=base, out=tmp_path / "old"))
    assert (tmp_path / "old" / "eval" / "report.json").is_file()
    key = lambda r: (r["task"], r["metric"], r["baseline"], r["compressed"], r["status"])  # noqa: E731
    assert [key(r) for r in old["rows"]] == [key(r) for r in got["rows"]]


def test_analyzers_quality_imports_nothing_from_cli():
    root = Path(__file__).resolve().parents[1] / "analyzers" / "quality"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("tritpress.cli", "cli")) for n in names), (path.name, names)
