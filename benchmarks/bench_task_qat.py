"""Task models through the pipeline: teacher vs post-training ternary vs task-aware QAT ternary.

For a fine-tuned task model (e.g. `compress finetune-head` output) this runs the two `compress`
commands a user would, each ending in the quality gate with the model's own head on the full
dev file, and prints one JSON object with their rows (metric, teacher, compressed, Δ with its
95 % paired-bootstrap interval, PASS/FAIL), packed sizes and wall times:

    compress TEACHER --out OUT/ptq --recipe OUT/eval.toml --tasks TASK --data TRAIN --seq-len L
    compress TEACHER --out OUT/qat --recipe OUT/eval.toml --tasks TASK --data TRAIN --seq-len L \
        --steps N --eval-data DEV --batch-size B

(the post-training run reads TRAIN only for what --extra asks of it: `--trim-vocab data`, the
`--sharing` analysis). Size-frontier configurations go in --extra, e.g.
`--extra "--granularity channel --lr 5e-4 --sharing sequence --embedding int2 --head int2 --trim-vocab data"`.

    HF_HUB_OFFLINE=1 python benchmarks/bench_task_qat.py --task cls --teacher runs/minilm-sst2 \
        --train ../shared/data/sst-2/train.tsv --dev ../shared/data/sst-2/dev.tsv --steps 2000 \
        --seq-len 64 --out runs/bench-sst2 > bench_task_qat_sst2.json

SQuAD ships only a dev file here: `--split-articles 0.5` writes its first half of the articles to
OUT/train.json (QAT's data, the articles `finetune-head --qa-articles 0.5` trained on) and the rest
to OUT/heldout.json (QAT's held-out examples and the gate), so no article is on both sides:

    HF_HUB_OFFLINE=1 python benchmarks/bench_task_qat.py --task qa --teacher runs/minilm-squad \
        --train ../shared/data/squad-v1.1/dev-v1.1.json.zip --dev ../shared/data/squad-v1.1/dev-v1.1.json.zip \
        --split-articles 0.5 --steps 600 --seq-len 192 --batch-size 16 --extra "--doc-stride 64" \
        --eval qa_max_length=192 --eval doc_stride=64 --out runs/bench-squad > bench_task_qat_squad.json

`--eval KEY=VALUE` adds an [eval] setting of the gate (the recipe's evaluation fields).
`--reuse` reads a run folder that already holds a report.json instead of running it again.
The gate's exit status 1 (a failing row) is data here, not an error.
"""
from __future__ import annotations

import argparse
import json
import zipfile
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA_KEY = {"cls": "cls_data", "tok": "tok_data", "qa": "qa_data"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(DATA_KEY), required=True)
    p.add_argument("--teacher", required=True, help="the fine-tuned task model (HF folder)")
    p.add_argument("--train", required=True, help="the task's training file (QAT data)")
    p.add_argument("--dev", required=True, help="the held-out file: QAT's held-out examples and the gate")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--reuse", action="store_true", help="keep runs that already have a report.json")
    p.add_argument("--extra", default="", help="more flags for both runs, one string")
    p.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE",
                   help="an [eval] setting of the gate, repeatable (e.g. qa_max_length=192)")
    p.add_argument("--split-articles", type=float, default=0.0,
                   help="qa: split the SQuAD file by article: this leading fraction trains, the rest is held out")
    return p.parse_args(argv)


def commands(a) -> dict[str, list[str]]:
    out = Path(a.out)
    # both runs read the training examples: --trim-vocab data keeps their tokens, --sharing calibrates on them
    common = [a.teacher, "--recipe", str(out / "eval.toml"), "--tasks", a.task, "--data", a.train,
              "--seq-len", str(a.seq_len), *a.extra.split()]
    qat = ["--steps", str(a.steps), "--eval-data", a.dev, "--batch-size", str(a.batch_size)]
    return {"ptq": ["compress", *common, "--out", str(out / "ptq")],
            "qat": ["compress", *common, "--out", str(out / "qat"), *qat]}


def run(name: str, cmd: list[str], folder: Path, reuse: bool) -> dict:
    report = folder / "report.json"
    if reuse and report.is_file():
        return {"command": " ".join(cmd), "reused": True, "wall_s": None, "exit": None}
    if folder.exists():
        shutil.rmtree(folder)
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run([shutil.which("compress") or "compress", *cmd[1:]], stdout=subprocess.DEVNULL)
    return {"command": " ".join(cmd), "reused": False, "wall_s": round(time.perf_counter() - t0, 1),
            "exit": proc.returncode}


def summary(folder: Path) -> dict:
    rep = json.loads((folder / "report.json").read_text())
    ev = rep.get("evaluation") or {}
    rows = [{k: r.get(k) for k in ("task", "metric", "head", "baseline", "compressed", "delta", "delta_ci95",
                                    "n", "note", "tolerance", "status")} for r in ev.get("rows", [])]
    training = rep.get("training") or {}
    return {"packed_bytes": rep["size"]["file_bytes"], "ratio_vs_fp32": rep["size"]["ratio_vs_fp32"],
            "gate_passed": ev.get("passed"), "rows": rows,
            "train_quality": training.get("quality"), "train_task": training.get("task"),
            "train_examples": training.get("train_examples"), "timings_s": rep.get("timings_s")}


def split_squad(spec: str, fraction: float, out: Path) -> tuple[str, str]:
    """SQuAD JSON (or a .zip holding one) cut by article in file order -> (train.json, heldout.json)."""
    if spec.endswith(".zip"):
        with zipfile.ZipFile(spec) as z:
            data = json.loads(z.read(next(n for n in z.namelist() if n.endswith(".json"))))
    else:
        data = json.loads(Path(spec).read_text())
    cut = max(1, round(len(data["data"]) * fraction))
    paths = out / "train.json", out / "heldout.json"
    for path, articles in zip(paths, (data["data"][:cut], data["data"][cut:])):
        path.write_text(json.dumps({**data, "data": articles}))
    return str(paths[0].resolve()), str(paths[1].resolve())


def toml_value(text: str) -> str:
    """A number or true/false as is, anything else as a quoted string."""
    try:
        float(text)
        return text
    except ValueError:
        return text if text in ("true", "false") else json.dumps(text)


def write_recipe(a, out: Path) -> None:
    """OUT/eval.toml: the gate's [eval] settings (the dev file, --eval KEY=VALUE)."""
    settings = [f'{DATA_KEY[a.task]} = "{Path(a.dev).resolve()}"']
    settings += [f"{k.strip()} = {toml_value(v.strip())}" for k, v in (e.split("=", 1) for e in a.eval)]
    (out / "eval.toml").write_text("[eval]\n" + "\n".join(settings) + "\n")


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.split_articles:
        a.train, a.dev = split_squad(a.train, a.split_articles, out)
    write_recipe(a, out)
    result = {"benchmark": "tritpress bench_task_qat", "task": a.task, "teacher": a.teacher,
              "train": a.train, "dev": a.dev, "runs": {}}
    for name, cmd in commands(a).items():
        info = run(name, cmd, out / name, a.reuse)
        result["runs"][name] = {**info, **summary(out / name)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
