"""Peak memory of `compress MODEL` (post-training, default settings) against what loading the fp32
model costs by itself, each in a fresh process, median of --repeats:

- `compress`: the whole pipeline (ingest, quantize, check, pack, reload check), run in-process (post-training
  from a GGUF: its Linear weights are read one layer at a time, compressor/gguf_reader.LazyWeights);
- `ingest`: tritpress's load_model of the same source alone, the whole fp32 model (a GGUF source is
  dequantized tensor by tensor into a meta skeleton);
- `from_pretrained`: transformers' from_pretrained of the model saved once as an fp32 safetensors
  folder (what a user would otherwise load; its weights stay memory-mapped until touched);
- `fp32_forward`: the same, then one forward pass on 16 tokens (every weight touched: the process
  that runs the fp32 model);
- `imports`: a process that only imported torch, transformers and tritpress (the floor under all three);
- `fp32_bytes`: 4 bytes per parameter.

Peak RSS is the process's ru_maxrss (pages of a memory-mapped safetensors file count once read):

    HF_HUB_OFFLINE=1 python benchmarks/bench_memory.py --models smollm2 --repeats 3 --out runs/bench-memory
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import MODELS, PEAK_RSS, prepare  # noqa: E402  (the fp32 folder, made once)

PEAK = PEAK_RSS + r'''
import json, sys
kind, source, cls, out = sys.argv[1:5]
if kind == "compress":
    from tritpress.cli.main import main
    try:
        main([source, "--out", out])
    except SystemExit as e:
        assert not e.code, f"compress exited {e.code}"
elif kind == "imports":
    import torch, transformers  # noqa: F401
    from tritpress.compressor import load_model  # noqa: F401
elif kind == "ingest":
    from tritpress.compressor import load_model
    model = load_model(source).model
else:
    import torch, transformers
    model = getattr(transformers, cls).from_pretrained(source)
    if kind == "fp32_forward":
        with torch.no_grad():
            model(input_ids=torch.arange(16).view(1, -1) + 100)
print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
'''


def peak(kind: str, source: str, cls: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", PEAK, kind, source, cls, out], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} {source} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2"], choices=sorted(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True, help="where the fp32 folders are kept between runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "tritpress bench_memory", "repeats": args.repeats, "models": {}}
    for name in args.models:
        _, folder, cls = prepare(name, out)
        params = _params(folder)
        runs = {"compress": [], "ingest": [], "from_pretrained": [], "fp32_forward": [], "imports": []}
        for _ in range(args.repeats):  # interleaved
            runs["imports"].append(peak("imports", MODELS[name], cls))
            runs["compress"].append(peak("compress", MODELS[name], cls))
            runs["ingest"].append(peak("ingest", MODELS[name], cls))
            runs["from_pretrained"].append(peak("hf", str(folder), cls))
            runs["fp32_forward"].append(peak("fp32_forward", str(folder), cls))
        med = {k: statistics.median(v) for k, v in runs.items()}
        fp32_mb = params * 4 / 2 ** 20
        result["models"][name] = {
            "source": MODELS[name], "params": params, "fp32_mb": round(fp32_mb, 1),
            "median_peak_rss_mb": {k: round(v, 1) for k, v in med.items()},
            "compress_over_from_pretrained": round(med["compress"] / med["from_pretrained"], 3),
            "compress_over_fp32_forward": round(med["compress"] / med["fp32_forward"], 3),
            "compress_over_fp32_bytes": round(med["compress"] / fp32_mb, 3),
            "compress_over_ingest": round(med["compress"] / med["ingest"], 3),
            # what the process holds beyond the libraries, against one fp32 copy of the weights
            "compress_above_imports_over_fp32_bytes": round((med["compress"] - med["imports"]) / fp32_mb, 3),
            "from_pretrained_above_imports_over_fp32_bytes": round((med["from_pretrained"] - med["imports"]) / fp32_mb,
                                                                   3), "runs": runs}
    print(json.dumps(result, indent=2))


def _params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    main()
