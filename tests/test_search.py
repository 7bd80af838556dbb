"""`compress search` on a tiny classification BERT (2 blocks) with tiny task files: the candidates are
sized before training (post-training packed files) and trained smallest first; the smallest that
passes wins and nothing bigger trains; candidates below --target-ratio are never trained; --resume
reads finished candidates back; search.json / frontier.md / the winner's files are written; exit 0
with a winner, 1 without; the walk orders (smallest-first, bisect) and --max-minutes on their own.

The gate is the pipeline's evaluate stage: most tests replace it by one that passes exactly the
candidates at or above a size, which is how quality is expected to behave and lets a test know the
answer; the end-to-end test keeps the real gate."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import tritpress.cli.pipeline as pipeline
import tritpress.cli.search as search_mod
from tritpress.analyzers.quality.gate import Tolerance, gate_row
from tritpress.cli.search import Budget, Candidate, SearchConfig, bisect, smallest_first
from tritpress.exporters.packed import load_packed
from tests.test_eval_cli import files  # noqa: F401  (fixture)
from tests.test_task_qat import cls_work  # noqa: F401  (fixture)
from tests.test_train import _one_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from tests.test_train import cli

FOUR = ["--try-sharing", "none", "--try-bits", "int8,int4,int2,ternary"]  # 4 candidates of 4 different sizes




def _args(cls_work, files, out, *extra):  # noqa: F811
    return [cls_work / "cls", "--data", files / "train.tsv", "--eval-data", files / "dev.tsv",
            "--share-data", files / "lm.txt", "--tasks", "cls", "--recipe", cls_work / "r.toml",
            "--steps", 2, "--batch-size", 4, "--seq-len", 32, "--checkpoint-every", 0, "--out", out, *extra]


@pytest.fixture
def runs(monkeypatch):
    """Every pipeline run the search starts: ("size" | "train", candidate name)."""
    seen = []
    real = search_mod.compress

    def spy(cfg, listener=None):
        out = Path(cfg.out)
        seen.append(("train", out.name) if cfg.tasks else ("size", out.parent.name))
        return real(cfg, listener)
    monkeypatch.setattr(search_mod, "compress", spy)
    return seen


def gate_passing_from(monkeypatch, min_bytes: int) -> None:
    """The evaluate stage replaced: a packed file of at least `min_bytes` passes (drop 0.5 of 1 allowed),
    a smaller one fails (drop 3). A trained file is exactly as big as its sized estimate."""
    def evaluate(run):
        big = run.packed_path.stat().st_size >= min_bytes
        row = gate_row("cls", "cls", "accuracy", 90.0, 89.5 if big else 87.0, "own", Tolerance(1.0, False),
                       ci=(-1.5, 0.5), n=24)
        return {"passed": row["status"] == "PASS", "rows": [row], "tasks": {}, "files": {}}
    monkeypatch.setattr(pipeline, "evaluate", evaluate)


@pytest.fixture(scope="module")
def sizes(cls_work, files, tmp_path_factory):  # noqa: F811
    """name -> packed bytes of the four candidates, from a search that only sizes (target out of reach)."""
    out = tmp_path_factory.mktemp("sizes")
    code, _, err = cli(["search", *_args(cls_work, files, out, *FOUR, "--target-ratio", 1e6)])
    assert code == 1, err
    record = json.loads((out / "search.json").read_text())
    return {c["name"]: c["estimated_bytes"] for c in record["candidates"]}


def test_sizes_are_known_before_training_and_differ(sizes):
    assert list(sizes) == ["none-int8", "none-int4", "none-int2", "none-ternary"]
    assert sizes["none-int8"] > sizes["none-int4"] > sizes["none-int2"] > sizes["none-ternary"]


def test_probes_stop_hopeless_candidates_and_a_promising_one_trains_on_from_its_probe(sizes, cls_work, files,
                                                                                       tmp_path, monkeypatch, runs):  # noqa: F811
    """--probe-steps 1 of --steps 2: the two smallest drop 5 points at their probe (beyond --probe-max-drop
    2.5): no further training; the third drops 2 (fails the 1-point gate, within 2.5): it continues
    from its probe's checkpoint to step 2, where it drops 0.5 and passes; the biggest is never trained."""
    order = sorted(sizes, key=sizes.get)

    def evaluate(run):
        steps = run.training["steps"]
        big = run.packed_path.stat().st_size >= sizes[order[2]]
        drop = (2.0 if steps == 1 else 0.5) if big else 5.0
        row = gate_row("cls", "cls", "accuracy", 90.0, 90.0 - drop, "own", Tolerance(1.0, False),
                       ci=(-drop - 1, -drop + 1), n=24)
        return {"passed": row["status"] == "PASS", "rows": [row], "tasks": {}, "files": {}}
    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    out = tmp_path / "s"
    code, _, err = cli(["search", *_args(cls_work, files, tmp_path / "early", *FOUR, "--steps", 4, "--probe-steps", 1)])
    assert code != 0 and "--probe-steps 1 ends before quantization is fully on (--quant-warmup 2 of --steps 4)" in err
    runs.clear()
    code, _, err = cli(["search", *_args(cls_work, files, out, *FOUR, "--probe-steps", 1, "--probe-max-drop", 2.5)])
    assert code == 0, err
    assert [r for r in runs if r[0] == "train"] == [("train", order[0]), ("train", order[1]), ("train", order[2]),
                                                     ("train", order[2])]
    status = {c["name"]: c for c in json.loads((out / "search.json").read_text())["candidates"]}
    for name in order[:2]:
        assert status[name]["status"] == "FAIL" and "beyond --probe-max-drop" in status[name]["why"]
        assert status[name]["probe"]["steps"] == 1
    winner = status[order[2]]
    assert winner["status"] == "PASS" and winner["probe"]["status"] == "FAIL" and "allowed drop" not in winner["why"]
    training = json.loads((out / "candidates" / order[2] / "report.json").read_text())["training"]
    assert training["steps"] == 2 and training["resumed_from"] == 1          # continued, not retrained
    assert status[order[3]]["status"] == "skipped"


def test_unreachable_target_trains_nothing_and_names_the_closest(cls_work, files, tmp_path, runs):  # noqa: F811
    """Sharing strategies are sized too; one that ties the same blocks as another is skipped as a duplicate
    (alternate on 2 blocks ties nothing: the model of none)."""
    out = tmp_path / "s"
    code, stdout, err = cli(["search", *_args(cls_work, files, out, "--try-sharing", "none,alternate,cycle,auto:1",
                                              "--try-bits", "ternary", "--trim-vocab", "data",
                                              "--target-ratio", 1e6)])
    assert code == 1
    assert all(kind == "size" for kind, _ in runs) and len(runs) == 8
    record = json.loads((out / "search.json").read_text())
    by = {c["name"]: c for c in record["candidates"]}
    assert by["auto_1-ternary"]["estimated_bytes"] < by["none-ternary"]["estimated_bytes"]  # auto:K: K unique blocks
    assert "the same model as none-ternary" in by["alternate-ternary"]["why"]
    assert "the same model as none-ternary-trim" in by["alternate-ternary-trim"]["why"]
    # sized with the trim (on a 40-token vocabulary the kept-id table costs more than the rows it drops)
    assert by["none-ternary-trim"]["estimated_bytes"] != by["none-ternary"]["estimated_bytes"]
    smallest = min((c for c in by.values() if c["status"] == "skipped" and "target" in c["why"]),
                   key=lambda c: c["estimated_bytes"])
    assert f"no candidate reaches --target-ratio 1e+06; closest: {smallest['name']}" in stdout
    assert record["closest"] == smallest["name"] and not (out / "model.tritpress.safetensors").exists()
    assert "no frontier.png: no candidate was trained" in stdout
    assert not list(out.rglob(".sizing-*")) and not list(out.rglob("*.tmp"))  # nothing half-written left


def test_the_smallest_passing_candidate_wins_and_nothing_bigger_trains(sizes, cls_work, files, tmp_path,
                                                                          monkeypatch, runs):  # noqa: F811
    order = sorted(sizes, key=sizes.get)
    gate_passing_from(monkeypatch, sizes[order[1]])  # the second smallest is the smallest that passes
    out = tmp_path / "s"
    code, stdout, err = cli(["search", *_args(cls_work, files, out, *FOUR)])
    assert code == 0, err
    assert [r for r in runs if r[0] == "train"] == [("train", order[0]), ("train", order[1])]
    assert sorted(r[1] for r in runs if r[0] == "size") == sorted(sizes)
    record = json.loads((out / "search.json").read_text())
    status = {c["name"]: c for c in record["candidates"]}
    assert record["winner"] == order[1] and status[order[0]]["status"] == "FAIL"
    assert status[order[1]]["status"] == "PASS"
    assert status[order[1]]["estimated_bytes"] == sizes[order[1]]
    # sized = trained, to the byte (the SHA-256 sits outside the compressed metadata)
    assert status[order[1]]["bytes"] == sizes[order[1]]
    for name in order[2:]:
        assert status[name]["status"] == "skipped" and f"bigger than {order[1]}" in status[name]["why"]
        assert not (out / "candidates" / name / "report.json").exists()
    winner = (out / "model.tritpress.safetensors").read_bytes()
    assert winner == (out / "candidates" / order[1] / "model.tritpress.safetensors").read_bytes()
    assert json.loads((out / "report.json").read_text())["evaluation"]["passed"]
    assert type(load_packed(out / "model.tritpress.safetensors")).__name__ == "BertForSequenceClassification"
    md = (out / "frontier.md").read_text()
    assert all(name in md for name in sizes) and "| PASS" in md and f"smallest passing: {order[1]}" in md
    assert order[1] in stdout and "[-1.5, +0.5]" in stdout and "smallest passing" in stdout
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_candidates_below_the_target_ratio_are_never_trained(sizes, cls_work, files, tmp_path,
                                                             monkeypatch, runs):  # noqa: F811
    order = sorted(sizes, key=sizes.get)
    gate_passing_from(monkeypatch, 0)  # everything would pass: only the size target decides
    out = tmp_path / "s"
    code, _, err = cli(["search", *_args(cls_work, files, out, *FOUR, "--target-ratio", 1.0)])
    assert code == 0, err
    record = json.loads((out / "search.json").read_text())
    ratios = {c["name"]: c["ratio"] for c in record["candidates"]}
    target = (ratios[order[0]] + ratios[order[1]]) / 2  # only the smallest reaches it
    runs.clear()
    out2 = tmp_path / "t"
    code, _, err = cli(["search", *_args(cls_work, files, out2, *FOUR, "--target-ratio", target)])
    assert code == 0, err
    assert [r for r in runs if r[0] == "train"] == [("train", order[0])]
    record = json.loads((out2 / "search.json").read_text())
    for c in record["candidates"]:
        if c["name"] != order[0]:
            assert c["status"] == "skipped" and "--target-ratio" in c["why"] and c["ratio"] < target


def test_nothing_passes_exit_1_names_the_closest(sizes, cls_work, files, tmp_path, monkeypatch, runs):  # noqa: F811
    gate_passing_from(monkeypatch, 10 ** 12)
    out = tmp_path / "s"
    code, stdout, err = cli(["search", *_args(cls_work, files, out, *FOUR)])
    assert code == 1
    record = json.loads((out / "search.json").read_text())
    assert record["winner"] is None and all(c["status"] == "FAIL" for c in record["candidates"])
    assert "no candidate passed the gate; closest: " in stdout and record["closest"] in stdout
    assert not (out / "model.tritpress.safetensors").exists()


def test_resume_reads_finished_candidates_back(sizes, cls_work, files, tmp_path, monkeypatch, runs):  # noqa: F811
    order = sorted(sizes, key=sizes.get)
    gate_passing_from(monkeypatch, sizes[order[2]])
    out = tmp_path / "s"
    code, _, err = cli(["search", *_args(cls_work, files, out, *FOUR)])
    assert code == 0, err
    first = json.loads((out / "search.json").read_text())
    (out / "candidates" / order[1] / "report.json").unlink()  # as if interrupted during that candidate
    runs.clear()
    code, _, err = cli(["search", *_args(cls_work, files, out, *FOUR, "--resume")])
    assert code == 0, err
    assert runs == [("train", order[1])]  # no sizing, and only the unfinished candidate trains
    second = json.loads((out / "search.json").read_text())
    assert second["winner"] == first["winner"] == order[2]
    assert "finished before" in err
    runs.clear()
    code, _, err = cli(["search", *_args(cls_work, files, out, *FOUR, "--resume", "--steps", 3)])
    assert code == 0, err  # other settings: nothing is read back
    assert [r[0] for r in runs].count("train") == 3 and [r[0] for r in runs].count("size") == 4


def test_end_to_end_with_the_real_gate(cls_work, files, tmp_path):  # noqa: F811
    """Two candidates, the real evaluation; a tolerance every candidate meets: the smallest wins."""
    out = tmp_path / "s"
    code, stdout, err = cli(["search", *_args(cls_work, files, out, "--try-sharing", "none", "--try-bits",
                                              "int8,ternary", "--max-drop", 100)])
    assert code == 0, err
    record = json.loads((out / "search.json").read_text())
    assert record["winner"] == "none-ternary"
    winner = next(c for c in record["candidates"] if c["name"] == "none-ternary")
    assert winner["rows"][0]["tolerance"] == "100" and winner["rows"][0]["metric"] == "accuracy"
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 2 and report["quant_config"]["embedding"] == "ternary"
    assert not (out / "candidates" / "none-int8" / "report.json").exists()  # bigger than the winner


def test_bad_input_is_one_line(cls_work, files, tmp_path):  # noqa: F811
    code, _, err = cli(["search", cls_work / "cls", "--out", tmp_path / "o"])
    assert code != 0 and "--tasks" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ the walks, on their own


def _queue(n: int, passing_from: int):
    """n sized candidates; training one passes it from index `passing_from` on."""
    queue = [Candidate(f"c{i}", "none", 0, "int8", None, pipeline.CompressConfig(model="m", out=f"c{i}"),
                       estimated_bytes=100 * (i + 1)) for i in range(n)]
    trained = []

    def run(c):
        trained.append(c.name)
        c.status = "PASS" if int(c.name[1:]) >= passing_from else "FAIL"
    return queue, trained, run


def test_smallest_first_trains_up_to_the_first_pass():
    queue, trained, run = _queue(8, 5)
    assert smallest_first(queue, run, Budget(0)) is None
    assert trained == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert all(c.status == "skipped" and "bigger than c5" in c.why for c in queue[6:])


def test_bisect_finds_the_boundary_in_log_runs():
    queue, trained, run = _queue(8, 5)
    assert bisect(queue, run, Budget(0)) is None
    assert len(trained) <= 3 and queue[5].status == "PASS"
    assert min((c for c in queue if c.status == "PASS"), key=lambda c: c.estimated_bytes).name == "c5"
    assert all(c.status in ("PASS", "FAIL", "skipped") for c in queue)
    assert any("assumed to fail" in c.why for c in queue[:5])


def test_max_minutes_stops_between_candidates(monkeypatch):
    queue, trained, run = _queue(4, 99)
    clock = Budget(1.0)
    calls = iter([0.0, 10.0, 120.0])
    monkeypatch.setattr(clock, "elapsed_s", lambda: next(calls))
    assert smallest_first(queue, run, clock) == "max_minutes"
    assert trained == ["c0", "c1"]
    assert all("--max-minutes" in c.why for c in queue[2:])


def test_search_config_refuses_bad_values():
    with pytest.raises(ValueError, match="--order"):
        SearchConfig(order="random")
    with pytest.raises(ValueError, match="--try-bits"):
        SearchConfig(try_bits="int3")
    with pytest.raises(ValueError, match="--try-outside"):
        SearchConfig(try_outside="int3")
    with pytest.raises(ValueError, match="--try-min-count"):
        SearchConfig(try_min_count="1,0")


def test_trimming_depth_is_one_more_axis(tmp_path):
    """--try-min-count: each trimmed candidate at every count; untrimmed ones once; names and the frontier
    table say which."""
    from tritpress.analyzers.frontier import table_rows

    cfg = pipeline.CompressConfig(model="m", out=str(tmp_path), trim_vocab="data", trim_dropped="mix")
    plan = search_mod.plan_candidates(cfg, SearchConfig(try_sharing="none", try_bits="int2", try_min_count="1,3"),
                                      tmp_path)
    assert [c.name for c in plan] == ["none-int2", "none-int2-trim", "none-int2-trim3"]
    assert [(c.cfg.trim_vocab, c.cfg.trim_min_count, c.cfg.trim_dropped) for c in plan] == [
        (None, 1, "mix"), ("data", 1, "mix"), ("data", 3, "mix")]
    rows = table_rows({"candidates": [c.to_dict() for c in plan]})
    assert [r[3] for r in rows] == ["no", "yes", "ids used 3+"]
    default = search_mod.plan_candidates(dataclasses.replace(cfg, trim_min_count=2),
                                         SearchConfig(try_sharing="none", try_bits="int2"), tmp_path)
    assert [c.name for c in default] == ["none-int2", "none-int2-trim2"]


def test_outside_block_formats_are_one_more_axis(tmp_path):
    cfg = pipeline.CompressConfig(model="m", out=str(tmp_path), trim_vocab="data")
    plan = search_mod.plan_candidates(cfg, SearchConfig(try_sharing="none", try_bits="int2", try_outside="keep,int4"),
                                      tmp_path)
    assert [c.name for c in plan] == ["none-int2-okeep", "none-int2-okeep-trim", "none-int2-oint4", "none-int2-oint4-trim"]
    assert [c.cfg.quant.outside_blocks for c in plan] == ["keep", "keep", "int4", "int4"]
    assert [c.to_dict()["outside"] for c in plan] == ["keep", "keep", "int4", "int4"]
    default = search_mod.plan_candidates(cfg, SearchConfig(try_sharing="none", try_bits="int2"), tmp_path)
    assert [c.name for c in default] == ["none-int2", "none-int2-trim"] and default[0].outside is None
