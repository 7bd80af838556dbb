"""ONNX Runtime latency: ternary export (MatMulNBits bits=2) vs an fp32 ONNX export of the original model.

    HF_HUB_OFFLINE=1 python benchmarks/bench_onnx.py                   # MiniLM + SmolLM2 first 10 blocks
    python benchmarks/bench_onnx.py --models minilm --threads 1         # one model, one thread count
    python benchmarks/bench_onnx.py --smollm-blocks 30                   # the whole SmolLM2 (slow)

Prints ONE JSON object on stdout; progress goes to stderr. Both files of a model are made
and timed in the same run, with the same ONNX Runtime settings (CPU provider, graph
optimization ORT_ENABLE_ALL, fixed intra-op threads, one inter-op thread), on the same
random token ids. Cases: batch 1 x 1 token (the length of one decode step, as a full-sequence
forward), batch 1 x 128 tokens, batch 16 x 128 tokens; for SmolLM2 also the incremental-decoding
(KV-cache) graphs: one new token after 128 cached ones, batch 1 and 16. Latency is
the median of repeated runs after warm-up; `speedup` = fp32 median / ternary median.
SmolLM2 is cut to its first blocks (--smollm-blocks) to keep the run short on a shared 2-core
machine; its GGUF weights are Q4_1-rounded.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


from tritpress.compressor.ingest import load_model  # noqa: E402
from tritpress.compressor.structure import discover, set_submodule  # noqa: E402
from tritpress.compressor.transform import convert  # noqa: E402
from tritpress.exporters.onnx import OnnxConfig, export_onnx, save_onnx, signature, trace_to_onnx  # noqa: E402

MODELS = {"minilm": "pkg:all-MiniLM-L6-v2", "smollm2": "pkg:SmolLM2-135M"}
CASES = [("decode_step_b1", 1, 1), ("seq128_b1", 1, 128), ("seq128_b16", 16, 128)]
KV_CASES = [("kv_decode_past128_b1", 1, 128), ("kv_decode_past128_b16", 16, 128)]  # 1 new token


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def first_blocks(model, n):
    """Keep the first n blocks of the discovered block stack (a shallower model of the same kind)."""
    stack = discover(model).blocks
    if stack is None or stack.kind != "modulelist" or n >= stack.num_blocks:
        return model
    blocks = model.get_submodule(stack.path)
    set_submodule(model, stack.path, torch.nn.ModuleList(list(blocks)[:n]))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, key):
            setattr(model.config, key, n)
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:n]
    return model


def session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_runs(sess, feeds, budget_s, min_runs=3, max_runs=50):
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return {"median_ms": round(1e3 * statistics.median(times), 3), "runs": len(times)}


def bench_model(key, blocks, threads_list, budget_s, tmp):
    loaded = load_model(MODELS[key])
    original = loaded.model.eval()
    if key == "smollm2":
        original = first_blocks(original, blocks)
    n_blocks = discover(original).blocks.num_blocks
    sig = signature(original)
    fp32_path = os.path.join(tmp, f"{key}_fp32.onnx")
    save_onnx(trace_to_onnx(original, sig), fp32_path)
    cfg = OnnxConfig(format="matmulnbits", accuracy_level=4)
    ternary = convert(copy.deepcopy(original))
    result = export_onnx(ternary, os.path.join(tmp, f"{key}_ternary.onnx"), cfg)
    log(f"{key}: fp32 {os.path.getsize(fp32_path) / 1e6:.1f} MB, ternary {result['file_bytes'] / 1e6:.1f} MB")
    kv = _kv_files(original, ternary, tmp, key) if key == "smollm2" else None
    out = {"model": MODELS[key], "blocks": n_blocks, "fp32_onnx_bytes": os.path.getsize(fp32_path),
           "ternary_onnx_bytes": result["file_bytes"], "ternary_config": cfg.to_dict(),
           "ternary_validation_passed": result["validation"]["passed"], "cases": []}
    rng = np.random.default_rng(0)
    for threads in threads_list:
        fp32, tern = session(fp32_path, threads), session(result["path"], threads)
        for name, batch, seq in CASES:
            ids = rng.integers(0, sig.vocab, (batch, seq)).astype(np.int64)
            feeds = {n: (ids if n == "input_ids" else np.ones_like(ids)) for n in sig.input_names}
            a = time_runs(fp32, feeds, budget_s)
            b = time_runs(tern, feeds, budget_s)
            case = {"case": name, "batch": batch, "seq": seq, "threads": threads, "fp32": a, "ternary": b,
                    "speedup": round(a["median_ms"] / b["median_ms"], 3)}
            log(f"  {name} threads={threads}: fp32 {a['median_ms']} ms, ternary {b['median_ms']} ms, "
                f"x{case['speedup']}")
            out["cases"].append(case)
        if kv:
            fp32, tern = session(kv["fp32"], threads), session(kv["ternary"], threads)
            for name, batch, past in KV_CASES:
                feeds = kv_feeds(kv["sig"], batch, past, rng)
                a = time_runs(fp32, feeds, budget_s)
                b = time_runs(tern, feeds, budget_s)
                case = {"case": name, "batch": batch, "seq": 1, "past": past, "threads": threads, "fp32": a,
                        "ternary": b, "speedup": round(a["median_ms"] / b["median_ms"], 3)}
                log(f"  {name} threads={threads}: fp32 {a['median_ms']} ms, ternary {b['median_ms']} ms, "
                    f"x{case['speedup']}")
                out["cases"].append(case)
    if kv:
        out["kv_cache_graph"] = {"fp32_onnx_bytes": os.path.getsize(kv["fp32"]),
                                 "ternary_onnx_bytes": kv["ternary_bytes"],
                                 "ternary_validation_passed": kv["passed"]}
    return out


def _kv_files(original, ternary, tmp, key):
    """Incremental-decoding graphs (KV cache) of the original (fp32) and of the ternary model."""
    sig = signature(original, kv_cache=True)
    fp32 = os.path.join(tmp, f"{key}_kv_fp32.onnx")
    save_onnx(trace_to_onnx(original, sig), fp32)
    result = export_onnx(ternary, os.path.join(tmp, f"{key}_kv_ternary.onnx"),
                         OnnxConfig(format="matmulnbits", accuracy_level=4, kv_cache=True))
    return {"sig": sig, "fp32": fp32, "ternary": result["path"], "ternary_bytes": result["file_bytes"],
            "passed": result["validation"]["passed"]}


def kv_feeds(sig, batch, past, rng):
    layers, heads, dim, _ = sig.cache
    feeds = {"input_ids": rng.integers(0, sig.vocab, (batch, 1)).astype(np.int64),
             "attention_mask": np.ones((batch, past + 1), np.int64)}
    for name in sig.input_names[2:]:
        feeds[name] = rng.standard_normal((batch, heads, past, dim)).astype(np.float32)
    return feeds


def main():
    import onnxruntime as ort
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--smollm-blocks", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--budget-s", type=float, default=2.0, help="time per case and file (after 2 warm-ups)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    threads = [int(t) for t in args.threads.split(",")]
    report = {"benchmark": "onnx_latency", "onnxruntime": ort.__version__, "torch": torch.__version__,
              "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "settings": {"provider": "CPUExecutionProvider", "graph_optimization_level": "ORT_ENABLE_ALL",
                           "intra_op_threads": threads, "inter_op_threads": 1, "warmup_runs": 2,
                           "budget_s_per_case": args.budget_s, "statistic": "median",
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
              "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            report["models"].append(bench_model(key, args.smollm_blocks, threads, args.budget_s, tmp))
    b1 = [c["speedup"] for m in report["models"] for c in m["cases"] if c["batch"] == 1]
    report["summary"] = {"batch1_speedup_min": min(b1), "batch1_speedup_max": max(b1), "target_batch1": 2.0}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
