"""Re-score finished `compress` runs on more held-out text than the run itself used.

    python benchmarks/rescore_runs.py --model pkg:all-MiniLM-L6-v2 --tokens 32768 /tmp/runs/minilm_table/*

Each run folder's packed checkpoint (model.tritpress.safetensors) is loaded and scored with the
same function the pipeline uses after training (compressor.modelio.held_out_quality) on the first TOKENS
tokens of wikitext-2 test (or --data): perplexity for causal LMs, cosine / normalized MSE of the
last hidden state against the original model otherwise. Use it when two rows of a table are
closer than the noise of the run's own small evaluation set. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "test.txt"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run folders (each with model.tritpress.safetensors)")
    ap.add_argument("--model", required=True, help="the original model the runs were compressed from")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tritpress.compressor.data import lm_blocks, read_texts, token_vocab_size, tokenizer_fn
    from tritpress.compressor.ingest import load_model
    from tritpress.cli.pipeline import PACKED_NAME
    from tritpress.compressor.structure import discover
    from tritpress.compressor.modelio import ModelIO, held_out_quality
    from tritpress.exporters.packed import load_packed

    loaded = load_model(args.model)
    original = loaded.model.eval()
    texts = read_texts(args.data, "test")
    encode = tokenizer_fn(loaded.tokenizer, texts, token_vocab_size(original))
    blocks = lm_blocks(texts, encode, args.seq_len, args.tokens)
    io = ModelIO.discover(original, discover(original))
    rows = {"original": held_out_quality(io, original, blocks, original)}
    for run in args.runs:
        path = Path(run) / PACKED_NAME
        if not path.exists():
            print(f"skipping {run}: no {PACKED_NAME}", file=sys.stderr)
            continue
        rows[Path(run).name] = held_out_quality(io, load_packed(path), blocks, original)
        print(json.dumps({Path(run).name: rows[Path(run).name]}), file=sys.stderr, flush=True)
    print(json.dumps({"model": args.model, "data": args.data, "sequences": len(blocks), "seq_len": args.seq_len,
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
