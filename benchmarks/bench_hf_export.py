"""The Hugging Face BitNet export, checked where users load it: packed files -> `compress export --hf` ->
a FRESH virtual environment with only torch, transformers and accelerate (transformers asks for accelerate
to load any BitNet model; tritpress is not installed there) loads each folder with plain
`from_pretrained` and runs the same token ids as tritpress's own model. Prints one JSON object:
per model the folder's weight bytes (vs the packed file and fp32), the max relative difference of the
main output and the top-1 agreement (argmax over the last dimension, every position), next to the same
two figures for tritpress against itself in float64 (how much int8 activations amplify last-bit changes):

    HF_HUB_OFFLINE=1 python benchmarks/bench_hf_export.py --packed runs/hf-smollm2/model.tritpress.safetensors \\
        --packed runs/hf-minilm-sst2/model.tritpress.safetensors --text ../shared/data/wikitext-2/valid.txt \\
        --out runs/bench-hf > bench_hf.json

The fresh environment is made once in OUT/venv (`pip install torch==TORCH transformers==SAME accelerate`,
from the package index) and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHECK = r'''
import importlib.util, json, sys
import torch, transformers
from safetensors.torch import load_file
assert importlib.util.find_spec("tritpress") is None, "tritpress is installed in the fresh environment"
folder, ref_path = sys.argv[1], sys.argv[2]
ref = load_file(ref_path)
config = transformers.AutoConfig.from_pretrained(folder)
cls = getattr(transformers, config.architectures[0])
model = cls.from_pretrained(folder, dtype=torch.float32).eval()
inputs = {k: v for k, v in ref.items() if k != "output"}
with torch.no_grad():
    out = model(**inputs)
got = (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()
want = ref["output"]
print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                  "layers": sorted({type(m).__name__ for m in model.modules() if "Bit" in type(m).__name__}),
                  "max_rel_diff": float((got - want).abs().max() / want.abs().max()),
                  "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
                  "positions": int(want[..., 0].numel())}))
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packed", action="append", required=True, help="a packed file; repeatable")
    p.add_argument("--out", required=True)
    p.add_argument("--text", help="a text file: its first lines are the checked inputs [default: two sentences]")
    p.add_argument("--lines", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--linear-class", default="bitlinear")
    return p.parse_args(argv)


def fresh_venv(folder: Path) -> Path:
    import torch
    import transformers

    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}",
                        f"transformers=={transformers.__version__}", "accelerate"], check=True)
    return python


def reference(packed: str, folder: Path, text: str | None, lines: int, seq_len: int) -> Path:
    """tritpress's own output on the checked inputs, saved with them (safetensors)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from tritpress.compressor.modelio import EXAMPLE_TEXT, keyword_inputs, run_model
    from tritpress.exporters.packed import load_packed

    model = load_packed(packed)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [t for t in Path(text).read_text().splitlines() if t.strip()][:lines] if text else EXAMPLE_TEXT
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
    inputs = keyword_inputs(model, enc)   # the token tensors its forward takes (no token_type_ids for a LLaMA)
    out = run_model(model, inputs)
    path = folder.parent / f"{folder.name}.reference.safetensors"
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, "output": out.contiguous()}, str(path))
    wide = run_model(model.double(), inputs)   # tritpress against itself: float64 vs float32 arithmetic
    own = {"max_rel_diff": float((wide - out).abs().max() / out.abs().max()),
           "top1_agreement": float((wide.argmax(-1) == out.argmax(-1)).float().mean())}
    return path, own


def fp32_bytes(packed: str) -> int:
    from tritpress.exporters.converted import meta_skeleton
    from tritpress.exporters.packed import read_metadata

    return 4 * sum(p.numel() for p in meta_skeleton(read_metadata(packed)["source"]).parameters())


def one(packed: str, python: Path, a, out: Path) -> dict:
    folder = out / Path(packed).parent.name
    t0 = time.perf_counter()
    run = subprocess.run(["compress", "export", packed, "--hf", str(folder), "--hf-linear-class", a.linear_class,
                          "--json"], capture_output=True, text=True)
    if run.returncode:
        return {"packed": packed, "exit": run.returncode, "error": run.stderr.strip()}
    export = json.loads(run.stdout)
    wall = round(time.perf_counter() - t0, 1)
    ref, own = reference(packed, folder, a.text, a.lines, a.seq_len)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run([str(python), "-I", "-c", CHECK, str(folder), str(ref)], capture_output=True, text=True,
                           env=env)
    fresh = json.loads(check.stdout) if check.returncode == 0 else {"exit": check.returncode,
                                                                     "error": check.stderr.strip()[-400:]}
    fp32 = fp32_bytes(packed)
    return {"packed": packed, "folder": str(folder), "export_wall_s": wall, "linear_class": a.linear_class,
            "hf_weight_bytes": export["bytes"], "packed_bytes": export["packed_bytes"], "fp32_bytes": fp32,
            "hf_ratio_vs_fp32": round(fp32 / export["bytes"], 2),
            "packed_ratio_vs_fp32": round(fp32 / export["packed_bytes"], 2),
            "in_process_check": export.get("validation"), "fresh_venv_check": fresh,
            "tritpress_fp64_vs_fp32": own,
            "cross_layer_ties_written_per_layer": export["tied_across_layers"]}


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    python = fresh_venv(out / "venv")
    print(json.dumps({"benchmark": "tritpress bench_hf_export",
                      "models": [one(p, python, a, out) for p in a.packed]}, indent=1))


if __name__ == "__main__":
    main()
