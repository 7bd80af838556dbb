"""Load time of a packed file vs transformers' from_pretrained of the fp32 original, interleaved.

For each model: the original is saved once as an fp32 safetensors folder (what a user would otherwise
ship) and compressed once with default settings (`compress MODEL`); then `load_packed(packed)` and
`AutoModel*.from_pretrained(folder)` alternate --repeats times, each in a fresh process that has
imported torch, transformers and tritpress before the clock starts (so only the load is timed), and
the medians and their ratio are printed as one JSON object, with each process's peak RSS:

    HF_HUB_OFFLINE=1 python benchmarks/bench_load.py --models minilm smollm2 --repeats 7 --out runs/bench-load
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = {"minilm": "pkg:all-MiniLM-L6-v2", "smollm2": "pkg:SmolLM2-135M"}

PEAK_RSS = r'''
def peak_rss_mb():
    """This process's peak RSS, VmHWM: it starts afresh at exec (ru_maxrss keeps the parent's at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
'''

LOAD = PEAK_RSS + r'''
import json, sys, time
t0 = time.perf_counter()
kind, path, cls = sys.argv[1], sys.argv[2], sys.argv[3]
import transformers
from tritpress.exporters.packed import load_packed
model_class = getattr(transformers, cls)  # imports done before the clock starts, for both
t1 = time.perf_counter()
model = load_packed(path) if kind == "packed" else model_class.from_pretrained(path)
t2 = time.perf_counter()
print(json.dumps({"load_s": t2 - t1, "import_s": t1 - t0,
                  "peak_rss_mb": peak_rss_mb()}))
'''


def prepare(name: str, out: Path) -> tuple[Path, Path, str]:
    """(packed file, fp32 folder, transformers class) for one model, made once."""
    from tritpress.compressor import load_model

    folder, packed = out / f"{name}-fp32", out / name / "model.tritpress.safetensors"
    loaded = load_model(MODELS[name])
    cls = type(loaded.model).__name__
    if not folder.is_dir():
        model = loaded.model
        if getattr(model, "hf_quantizer", None) is not None:  # read from GGUF: float32 now, saved as such
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        model.save_pretrained(str(folder))
    if not packed.is_file():
        subprocess.run(["compress", MODELS[name], "--no-check", "--out", str(packed.parent)], check=True,
                       capture_output=True)
    return packed, folder, cls


def timed_load(kind: str, path: Path, cls: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD, kind, str(path), cls], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm"], choices=sorted(MODELS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "tritpress bench_load", "repeats": args.repeats, "models": {}}
    for name in args.models:
        packed, folder, cls = prepare(name, out)
        runs = {"packed": [], "from_pretrained": []}
        for _ in range(args.repeats):  # interleaved: the machine's load drifts alike for both
            runs["packed"].append(timed_load("packed", packed, cls))
            runs["from_pretrained"].append(timed_load("hf", folder, cls))
        med = {k: statistics.median(r["load_s"] for r in v) for k, v in runs.items()}
        result["models"][name] = {
            "packed_bytes": packed.stat().st_size, "class": cls,
            "median_load_s": med, "ratio_packed_vs_from_pretrained": med["packed"] / med["from_pretrained"],
            "peak_rss_mb": {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in runs.items()},
            "runs": runs}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
