"""llama.cpp on tritpress's GGUF export, against tritpress on the same token ids.

`compress export PACKED --gguf FILE` writes the file (unless --gguf names one that exists); the text
is tokenized with the model's own tokenizer and cut into --windows windows of --window tokens, each
starting with BOS; every window is scored by tritpress (the packed model, its own arithmetic) and by
llama.cpp (llama-cpp-python with logits for every position; llama.cpp quantizes activations itself,
in 8-bit blocks). Prints one JSON object: perplexity from each and their relative difference, top-1
agreement of the next-token prediction over all positions, the largest logit difference relative to
the largest logit, the same between tritpress in float64 and float32 (the yardstick: what float
rounding alone changes), and the file sizes:

    HF_HUB_OFFLINE=1 python benchmarks/bench_gguf.py --packed runs/hf-smollm2/model.tritpress.safetensors \\
        --text ../shared/data/wikitext-2/test.txt --llama-python /path/to/venv-with-llama_cpp/bin/python \\
        --out runs/bench-gguf

llama-cpp-python runs in its own environment (--llama-python), built from source:
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python` (an hour here, sharing 2 cores with a training run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

LLAMA = r'''
import json, sys, time
import numpy as np
from llama_cpp import Llama
gguf, ids_path, out_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
windows = np.load(ids_path)
llm = Llama(model_path=gguf, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
            n_threads=threads, verbose=False)
logits, t0 = [], time.perf_counter()
for w in windows:
    llm.reset()
    llm.eval(w.tolist())
    logits.append(np.array(llm.scores[: len(w)], dtype=np.float32))
np.save(out_path, np.stack(logits))
print(json.dumps({"seconds": time.perf_counter() - t0, "n_vocab": llm.n_vocab()}))
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--packed", "--text", "--llama-python", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--gguf", help="an existing export to score [default: OUT/model.gguf, written here]")
    p.add_argument("--ternary-type", default="tq1_0", choices=("tq1_0", "tq2_0"))
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def export(packed: str, gguf: Path, ternary_type: str) -> dict:
    cmd = ["compress", "export", packed, "--gguf", str(gguf), "--gguf-ternary-type", ternary_type, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {"command": " ".join(cmd), **json.loads(done.stdout)}


def token_windows(packed: str, text: str, windows: int, window: int) -> np.ndarray:
    """[windows, window] token ids: BOS, then the next window - 1 tokens of the text."""
    from tritpress.compressor.data import read_texts, tokenizer_fn
    from tritpress.exporters.converted import source_tokenizer
    from tritpress.exporters.packed import read_metadata
    from tritpress.exporters.settings import HfExportConfig

    tok = source_tokenizer(read_metadata(packed)["source"], HfExportConfig())
    ids = tokenizer_fn(tok)("\n".join(read_texts(text)))
    body = window - 1
    if len(ids) < windows * body:
        raise SystemExit(f"{text}: {len(ids)} tokens, fewer than {windows} windows of {body}")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return np.array([[bos, *ids[i * body:(i + 1) * body]] for i in range(windows)], dtype=np.int64)


def tritpress_logits(packed: str, ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """tritpress's logits; in float64 too, as the yardstick: how far tritpress moves from itself when
    only float rounding changes (int8 activations make a deep post-training model sensitive to it)."""
    import torch

    from tritpress.exporters.packed import load_packed

    model = load_packed(packed).to(getattr(torch, dtype))
    with torch.no_grad():
        return np.stack([model(input_ids=torch.from_numpy(w)[None]).logits[0].float().numpy() for w in ids])


def agreement(a: np.ndarray, b: np.ndarray, ids: np.ndarray) -> dict:
    pa, pb = perplexity(a, ids), perplexity(b, ids)
    return {"perplexity": [pa, pb], "perplexity_rel_diff": pb / pa - 1,
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
            "max_rel_logit_diff": float(np.abs(a - b).max() / np.abs(a).max())}


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean negative log-likelihood of token t + 1 given positions <= t), over every window."""
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return float(math.exp(nll.mean()))


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = Path(args.gguf) if args.gguf else out / "model.gguf"
    exported = None if args.gguf else export(args.packed, gguf, args.ternary_type)
    ids = token_windows(args.packed, args.text, args.windows, args.window)
    np.save(out / "ids.npy", ids)
    ours = tritpress_logits(args.packed, ids)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    run = subprocess.run([args.llama_python, "-c", LLAMA, str(gguf), str(out / "ids.npy"),
                          str(out / "llama_logits.npy"), str(args.threads)], capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(f"llama.cpp failed: {run.stderr.strip()[-2000:]}")
    theirs = np.load(out / "llama_logits.npy")[..., : ours.shape[-1]]
    wide = tritpress_logits(args.packed, ids, "float64")
    print(json.dumps({
        "benchmark": "tritpress bench_gguf", "packed": args.packed, "gguf": str(gguf),
        "export": exported and {k: exported[k] for k in ("command", "bytes", "bits_per_weight", "types",
                                                         "ternary_matrices", "ternary_as_tq", "validation")},
        "packed_bytes": Path(args.packed).stat().st_size, "gguf_bytes": gguf.stat().st_size,
        "text": args.text, "windows": args.windows, "window": args.window, "tokens_scored": int(ids[:, 1:].size),
        "llama_cpp_vs_tritpress": agreement(ours, theirs, ids),
        "tritpress_float64_vs_float32": agreement(ours, wide, ids),
        "llama_cpp": json.loads(run.stdout.strip().splitlines()[-1]),
        "python": sys.version.split()[0],
    }, indent=2))


if __name__ == "__main__":
    main()
