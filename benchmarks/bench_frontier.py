"""The size frontier of a task model: several compression configurations, each one task-QAT
`compress` run gated with the model's own head on the full dev file, as one JSON object.

Each configuration is NAME=FLAGS (FLAGS added to --base); its run is the `qat` command of
bench_task_qat (same data, steps and gate), in OUT/NAME. The JSON gives per configuration the
packed bytes (whole file), × smaller than fp32, every gate row (metric, teacher, compressed, Δ
with its 95 % paired-bootstrap interval), the worst Δ, whether it is within each --max-drop, and
whether it is on the Pareto frontier (no other configuration is both smaller and better):

    HF_HUB_OFFLINE=1 python benchmarks/bench_frontier.py --task cls --teacher runs/minilm-sst2 \\
        --train ../shared/data/sst-2/train.tsv --dev ../shared/data/sst-2/dev.tsv --steps 2000 --seq-len 64 \\
        --base "--granularity channel --lr 5e-4" \\
        --config "int8=" \\
        --config "x33=--sharing sequence --embedding int2 --head int2 --trim-vocab data" \\
        --config "x47=--sharing alternate --embedding ternary --head ternary --outside-blocks int4 --trim-vocab data" \\
        --max-drop 1 --max-drop 3 --out runs/frontier-sst2 > frontier_sst2.json

`--reuse` reads a configuration whose OUT/NAME already holds a report.json (e.g. a bench_task_qat
`qat` folder linked there) instead of running it again. `compress search` is the product's own
search over these axes; this script measures chosen points at full training length.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_task_qat  # noqa: E402  (its commands, runner and report summary)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--task", "--teacher", "--train", "--dev", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--base", default="", help="flags of every configuration, one string")
    p.add_argument("--config", action="append", required=True, metavar="NAME=FLAGS")
    p.add_argument("--max-drop", action="append", type=float, default=[], help="points; repeatable")
    p.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--split-articles", type=float, default=0.0,
                   help="qa: split the SQuAD file by article: this leading fraction trains, the rest is held out")
    return p.parse_args(argv)


def point(name: str, info: dict, summary: dict, max_drops: list[float]) -> dict:
    deltas = [r["delta"] for r in summary["rows"] if r.get("delta") is not None]
    worst = min(deltas) if deltas else None
    return {"name": name, **info, "bytes": summary["packed_bytes"], "ratio_vs_fp32": summary["ratio_vs_fp32"],
            "gate_passed": summary["gate_passed"], "worst_delta": worst,
            "within": {str(d): worst is not None and worst >= -d for d in max_drops},
            "rows": summary["rows"], "timings_s": summary["timings_s"]}


def mark_frontier(points: list[dict]) -> None:
    """On the frontier: no other point is at most as large and strictly better (or smaller and as good)."""
    for p in points:
        p["on_frontier"] = p["worst_delta"] is not None and not any(
            q is not p and q["worst_delta"] is not None and q["bytes"] <= p["bytes"]
            and q["worst_delta"] >= p["worst_delta"] and (q["bytes"], q["worst_delta"]) != (p["bytes"], p["worst_delta"])
            for q in points)


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.split_articles:  # the same cut as bench_task_qat's, so QA points compare with its rows
        a.train, a.dev = bench_task_qat.split_squad(a.train, a.split_articles, out)
    task_args = ["--task", a.task, "--teacher", a.teacher, "--train", a.train, "--dev", a.dev, "--out", str(out),
                 "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len)]
    for e in a.eval:
        task_args += ["--eval", e]
    bench_task_qat.write_recipe(a, out)  # the gate's settings: the same for every configuration
    points = []
    for spec in a.config:
        name, _, flags = spec.partition("=")
        b = bench_task_qat.parse_args([*task_args, "--extra", f"{a.base} {flags}".strip()])
        cmd = bench_task_qat.commands(b)["qat"]
        cmd[cmd.index("--out") + 1] = str(out / name)
        info = bench_task_qat.run(name, cmd, out / name, a.reuse)
        points.append(point(name, info, bench_task_qat.summary(out / name), a.max_drop))
    mark_frontier(points)
    points.sort(key=lambda p: p["bytes"])
    print(json.dumps({"benchmark": "tritpress bench_frontier", "task": a.task, "teacher": a.teacher,
                      "train": a.train, "dev": a.dev, "steps": a.steps, "points": points}, indent=2))


if __name__ == "__main__":
    main()
