"""Encoder-decoder models through `compress`, with and without the cross-stack ties: a tiny random
T5 (3 + 3 blocks, its own untied output head, like T5 v1.1) and a tiny random BART (2 + 2 blocks,
scaled word embeddings), each compressed as it is, with `--tie-decoder same-depth` and `auto`, and (T5) with
`--tie-embeddings embedding` too; every run QAT-trains a few steps on the text, packs, reloads and
exports ONNX validated by ONNX Runtime. No real seq2seq checkpoint ships in a package here, so
these are random weights: the tie losses are those of unrelated matrices, not of a trained model.
Prints one JSON object (bytes, unique parameters, the ties' relative errors and calibration
losses, target-side perplexity before/after, the reload and ONNX checks):

    HF_HUB_OFFLINE=1 python benchmarks/bench_seq2seq.py --data ../shared/data/wikitext-2/valid.txt --out runs/bench-seq2seq
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIGS = {"as-is": [], "tie-decoder": ["--tie-decoder", "same-depth"], "tie-decoder-auto": ["--tie-decoder", "auto"],
           "tie-decoder+embeddings": ["--tie-decoder", "same-depth", "--tie-embeddings", "embedding"]}


def build(kind: str, folder: Path) -> None:
    import torch
    from torch import nn
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(vocab_size=512, d_model=64, d_kv=32, d_ff=256, num_layers=3,
                                                    num_decoder_layers=3, num_heads=2, decoder_start_token_id=0,
                                                    pad_token_id=0, eos_token_id=1))
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach() + 0.1 * torch.randn(512, 64))
    else:
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128,
            scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))
    model.save_pretrained(folder)


def summary(report: dict) -> dict:
    sharing = report.get("sharing") or {}
    quality = report["training"]["quality"]
    out = {"file_bytes": report["size"]["file_bytes"], "ratio_vs_fp32": report["size"]["ratio_vs_fp32"],
           "unique_params": report["size"]["unique_params"],
           "stacks": [f"{s['path']}: {s['num_blocks']} x {s['block_type']}" for s in report["structure"]["stacks"]],
           "ppl": {k: round(v["ppl"], 3) for k, v in quality.items()},
           "reload_bit_identical": report["checks"]["reload_vs_converted"]["codes_bit_identical"],
           "onnx_validated": report["onnx"]["validation"]["passed"]}
    dec = sharing.get("decoder_ties")
    if dec:
        out["decoder_ties"] = {"pairs": dec["pairs"], "matrices": len(dec["ties"]),
                               "kept_per_decoder_block": dec["decoder_only"],
                               "pair_losses": {f"{r['decoder']}:{r['encoder']}": r["loss_after_tying"]
                                               for r in dec.get("candidates", {}).get("pairs", [])},
                               "relative_error_max": max(e for t in dec["ties"] for e in t["relative_error"]),
                               "calibration_loss_after": dec.get("calibration_loss_after")}
    tie = sharing.get("embedding_tie")
    if tie:
        out["embedding_tie"] = {k: tie.get(k) for k in ("relative_error", "calibration_loss_after", "already_tied")}
    if "calibration_loss" in sharing:
        out["calibration_loss"] = sharing["calibration_loss"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="plain text: training, calibration and held-out blocks")
    p.add_argument("--out", default="runs/bench-seq2seq")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--max-train-tokens", type=int, default=200_000)
    args = p.parse_args(argv)
    out, results = Path(args.out), {}
    for kind in ("t5", "bart"):
        folder = out / kind / "model"
        build(kind, folder)
        for name, flags in CONFIGS.items():
            if kind == "bart" and "embeddings" in name:
                continue  # BART's head already reads its word embedding
            cmd = [sys.executable, "-m", "tritpress.cli.main", str(folder), *flags, "--data", args.data,
                   "--steps", str(args.steps), "--seq-len", "64", "--batch-size", "8",
                   "--max-train-tokens", str(args.max_train_tokens), "--eval-tokens", "8192", "--onnx",
                   "--out", str(out / kind / name), "--json"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1]}")
            results[f"{kind}/{name}"] = {"command": " ".join(["compress", *cmd[3:]]),
                                         **summary(json.loads(done.stdout))}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
