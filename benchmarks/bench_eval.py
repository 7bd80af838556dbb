"""Evaluation throughput per task on this CPU: the fp32 original vs its post-training
ternary packed file (all-MiniLM-L6-v2, probe protocol), through `analyzers.quality.evaluate`.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/bench_eval.py           # ~3 min on 1 core
    python benchmarks/bench_eval.py --samples 200 --probe-samples 400            # larger

Prints ONE JSON object on stdout (progress on stderr). Per task: the units it processes
(lm: pseudo-perplexity positions scored; cls: sentences; tok: sentences; qa: questions;
probe training examples included, since the harness must embed them), seconds, units/s for
each model, and the ratio compressed/original measured in the same run (the machine is
shared and noisy: the ratio means more than the absolute numbers). Data: ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def make_packed(spec: str, folder: Path) -> Path:
    import copy

    from tritpress.compressor import convert, load_model
    from tritpress.exporters.packed import save_packed
    loaded = load_model(spec)
    path = folder / "model.tritpress.safetensors"
    save_packed(convert(copy.deepcopy(loaded.model)), path, loaded.source,
                {"original_params": sum(p.numel() for p in loaded.model.parameters())})
    return path


def units(task: str, entry: dict) -> int:
    p = entry["compressed"]["protocol"]
    if task == "lm":
        return p["scored_tokens"] + p.get("probe_train_windows", 0) * p["context"]
    if task == "cls":
        return p["eval_examples"] + p.get("probe_train_examples", 0)
    if task == "tok":
        return p["eval_sentences"] + p.get("probe_train_sentences", 0)
    return p["eval_questions"] + p.get("probe_train_questions", 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pkg:all-MiniLM-L6-v2")
    ap.add_argument("--samples", type=int, default=100, help="evaluation examples per task")
    ap.add_argument("--probe-samples", type=int, default=200, help="probe training examples per task")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tritpress.analyzers.quality import EvalConfig, evaluate
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        packed = make_packed(args.model, Path(tmp))
        pack_s = time.perf_counter() - t0
        cfg = EvalConfig(
            compressed=str(packed), baseline=args.model, tasks="lm,cls,tok,qa", out=str(Path(tmp) / "eval"),
            lm_data=[str(DATA / "wikitext-2/test.txt")], lm_train=str(DATA / "wikitext-2/valid.txt"),
            mlm_positions=args.samples, cls_data=str(DATA / "sst-2/dev.tsv"), cls_train=str(DATA / "sst-2/train.tsv"),
            tok_data=str(DATA / "conll2003/valid.txt"), tok_train=str(DATA / "conll2003/train.txt"),
            qa_data=str(DATA / "squad-v1.1/dev-v1.1.json.zip"), qa_max_length=256,
            max_samples=args.samples, probe_samples=args.probe_samples, plots=False)
        report = evaluate(cfg)
    tasks = {}
    for label, entry in report["tasks"].items():
        if "skipped" in entry:
            tasks[label] = {"skipped": entry["skipped"]}
            continue
        n = units(entry["task"], entry)
        b, c = entry["baseline"]["seconds"], entry["compressed"]["seconds"]
        tasks[label] = {"unit": {"lm": "token", "cls": "sentence", "tok": "sentence", "qa": "question"}[entry["task"]],
                        "units": n, "head": entry["compressed"]["head"],
                        "original_s": b, "compressed_s": c,
                        "original_units_per_s": round(n / b, 2), "compressed_units_per_s": round(n / c, 2),
                        "compressed_over_original_time": round(c / b, 3)}
    print(json.dumps({"model": args.model, "threads": args.threads, "pack_s": round(pack_s, 2),
                      "samples": args.samples, "probe_samples": args.probe_samples, "tasks": tasks,
                      "gate_passed": report["passed"],
                      "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                      "platform": platform.platform()}}, indent=2))


if __name__ == "__main__":
    main()
