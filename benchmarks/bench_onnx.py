"""ONNX Runtime latency of tritpress's ternary exports against what a user would run instead: an fp32
ONNX export of the original model, ONNX Runtime's own int8 (`quant_pre_process` + `quantize_dynamic`,
int8 weights) and ONNX Runtime's own 4-bit (`MatMulNBitsQuantizer`, block 32, symmetric, int8
activations; needs `pip install tritpress[bench]` (onnx-ir), else that column is left out) of that fp32 export.

    HF_HUB_OFFLINE=1 python benchmarks/bench_onnx.py                   # MiniLM + SmolLM2 first 10 blocks
    python benchmarks/bench_onnx.py --models minilm --threads 1         # one model, one thread count
    python benchmarks/bench_onnx.py --formats qgemm,matmulnbits4        # which tritpress formats
    python benchmarks/bench_onnx.py --heads int8,int4-g32               # and embedding/head formats
    python benchmarks/bench_onnx.py --formats qgemm,qgemm-switch        # qgemm with --switch-weights

Prints ONE JSON object on stdout; progress goes to stderr. Every file of a model is made and timed in
the same run, with the same ONNX Runtime settings (CPU provider, ORT_ENABLE_ALL, fixed intra-op threads,
one inter-op thread), on the same random token ids, interleaved: --rounds rounds, each timing every
file once (the median of its runs within --budget-s after 2 warm-ups); a file's figure is the median
of its rounds. Cases: batch 1 x 1 token (one decode step's length, as a full-sequence forward), batch
1 x 128, batch 16 x 128; for SmolLM2 also the incremental-decoding (KV-cache) graphs: one new token
after 128 cached ones, batch 1 and 16. Per case and tritpress format: `vs_best_ort` = the faster of
ORT int8 / ORT 4-bit in ms / ours in ms (>= 1: ours at least as fast), `vs_fp32`; per file its bytes
and `bytes_vs_ort_int8`. SmolLM2 is cut to its first blocks (--smollm-blocks); its GGUF weights are
Q4_1-rounded.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import torch  # noqa: E402


from tritpress.compressor.ingest import load_model  # noqa: E402
from tritpress.compressor.structure import discover, set_submodule  # noqa: E402
from tritpress.compressor.settings import TernaryConfig  # noqa: E402
from tritpress.compressor.transform import convert  # noqa: E402
from tritpress.exporters.onnx import (OnnxConfig, export_onnx, ort_session, save_onnx, signature,  # noqa: E402
                                     trace_to_onnx)

MODELS = {"minilm": "pkg:all-MiniLM-L6-v2", "smollm2": "pkg:SmolLM2-135M"}
CASES = [("decode_step_b1", 1, 1), ("seq128_b1", 1, 128), ("seq128_b16", 16, 128)]
DEFAULT_HEAD = "int8"   # the default TernaryConfig's embedding and head
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


def time_runs(sess, feeds, budget_s, min_runs=3, max_runs=50):
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ort_baselines(fp32_path, tmp, stem):
    """ONNX Runtime's own tools on the fp32 export: {"ort_int8": path, "ort_4bit": path (if onnx_ir)}."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = os.path.join(tmp, f"{stem}_pre.onnx")
    # without the pre-processing no MatMul of the TorchScript export is quantized (its weight
    # transposes stay nodes)
    quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
    out = {"ort_int8": os.path.join(tmp, f"{stem}_ort_int8.onnx")}
    quantize_dynamic(pre, out["ort_int8"], weight_type=QuantType.QInt8)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # ORT's 4-bit quantizer imports onnx_ir
        log(f"ORT 4-bit baseline left out: {e}")
        return out
    q = MatMulNBitsQuantizer(onnx.load(pre), block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    out["ort_4bit"] = os.path.join(tmp, f"{stem}_ort_4bit.onnx")
    q.model.save_model_to_file(out["ort_4bit"], use_external_data_format=False)
    return out


def model_files(original, ternaries, formats, tmp, key, kv, switch_weights):
    """fp32, ORT's int8 / 4-bit, and tritpress's formats of one graph kind -> ({name: path}, validation).
    `ternaries`: {head label: converted model}; a file of a head format other than the default is
    named `<format>[<head>]`."""
    stem = f"{key}{'_kv' if kv else ''}"
    sig = signature(original, kv_cache=kv)
    files = {"fp32": os.path.join(tmp, f"{stem}_fp32.onnx")}
    save_onnx(trace_to_onnx(original, sig), files["fp32"])
    files.update(ort_baselines(files["fp32"], tmp, stem))
    passed = {}
    for head, ternary in ternaries.items():
        for fmt in formats:
            name = label(fmt, head)
            result = export_onnx(ternary, os.path.join(tmp, f"{stem}_{name}.onnx"),
                                 onnx_config(fmt, kv, switch_weights))
            files[name], passed[name] = result["path"], result["validation"]["passed"]
    return sig, files, passed


def label(fmt: str, head: str) -> str:
    """A file's name in the report: its format, and `[<head>]` for a head format other than the default."""
    return fmt if head == DEFAULT_HEAD else f"{fmt}[{head}]"


def onnx_config(fmt: str, kv: bool, switch_weights: int) -> OnnxConfig:
    """A tritpress format, or "qgemm-switch": qgemm with the row-count switch on every ternary MatMul of at
    least `switch_weights` weights (--switch-weights)."""
    if fmt == "qgemm-switch":
        return OnnxConfig(format="qgemm", kv_cache=kv, switch_weights=switch_weights)
    return OnnxConfig(format=fmt, kv_cache=kv)


def head_config(head: str) -> TernaryConfig:
    """"int8" (the default), "int4-g32" (--embedding/--head int4 --group-size 32), ..."""
    kind, _, group = head.partition("-g")
    return TernaryConfig(embedding=kind, head=kind, group_size=int(group or 0))


def feeds_for(sig, batch, seq, past, seed):
    """The graph's inputs as the export's own validation makes them (random ids; a KV graph's random cache)."""
    sig = dataclasses.replace(sig, past=past) if sig.cache else sig
    return {n: t.numpy() for n, t in zip(sig.input_names, sig.inputs(batch, seq, seed))}


def time_case(sessions, feeds, rounds, budget_s):
    """Interleaved: each round times every file once; a file's figure is the median of its rounds."""
    per = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            per[name].append(time_runs(sess, feeds, budget_s))
    return {name: round(statistics.median(v), 4) for name, v in per.items()}


def ratios(ms, formats):
    ort = [ms[k] for k in ("ort_int8", "ort_4bit") if k in ms]
    return {fmt: {"vs_best_ort": round(min(ort) / ms[fmt], 3), "vs_fp32": round(ms["fp32"] / ms[fmt], 3)}
            for fmt in formats}


def bench_model(key, blocks, threads_list, formats, heads, rounds, budget_s, tmp, switch_weights):
    original = load_model(MODELS[key]).model.eval()
    if key == "smollm2":
        original = first_blocks(original, blocks)
    ternaries = {head: convert(copy.deepcopy(original), head_config(head)) for head in heads}
    labels = [label(f, h) for h in heads for f in formats]
    graphs = [(False, CASES)] + ([(True, KV_CASES)] if key == "smollm2" else [])
    out = {"model": MODELS[key], "blocks": discover(original).blocks.num_blocks, "graphs": [], "cases": []}
    for kv, cases in graphs:
        sig, files, passed = model_files(original, ternaries, formats, tmp, key, kv, switch_weights)
        sizes = {k: os.path.getsize(v) for k, v in files.items()}
        out["graphs"].append({"kv_cache": kv, "bytes": sizes, "validation_passed": passed,
                              "bytes_vs_ort_int8": {k: round(v / sizes["ort_int8"], 3) for k, v in sizes.items()}})
        log(f"{key}{' KV' if kv else ''}: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
        for threads in threads_list:
            sessions = {name: ort_session(path, threads) for name, path in files.items()}
            for name, batch, n in cases:
                seq, past = (1, n) if kv else (n, 0)   # a KV case: one new token after n cached ones
                ms = time_case(sessions, feeds_for(sig, batch, seq, past, seed=0), rounds, budget_s)
                case = {"case": name, "batch": batch, "seq": seq, "past": past,
                        "threads": threads, "median_ms": ms, "ours": ratios(ms, labels)}
                log(f"  {name} threads={threads}: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()) + " ms; "
                    + ", ".join(f"{f} x{r['vs_best_ort']} vs best ORT" for f, r in case["ours"].items()))
                out["cases"].append(case)
    return out


def main():
    import onnxruntime as ort
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--smollm-blocks", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--formats", default="matmulnbits,matmulnbits4,qgemm", help="tritpress ONNX formats to time")
    ap.add_argument("--switch-weights", type=int, default=1 << 18,
                    help="format qgemm-switch: MatMuls of at least this many weights get the row-count switch")
    ap.add_argument("--heads", default=DEFAULT_HEAD,
                    help="embedding/head formats of the ternary model, each exported in every format: int8 (the "
                         "default), int4-g32 (--embedding int4 --group-size 32), ...")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case")
    ap.add_argument("--budget-s", type=float, default=0.5, help="time per file, case and round (after 2 warm-ups)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    threads = [int(t) for t in args.threads.split(",")]
    heads, formats = args.heads.split(","), args.formats.split(",")
    report = {"benchmark": "onnx_latency", "onnxruntime": ort.__version__, "torch": torch.__version__,
              "platform": platform.platform(), "cpu_count": os.cpu_count(),
              "settings": {"switch_weights": args.switch_weights, "provider": "CPUExecutionProvider",
                           "graph_optimization_level": "ORT_ENABLE_ALL",
                           "intra_op_threads": threads, "inter_op_threads": 1, "warmup_runs": 2,
                           "rounds": args.rounds, "budget_s_per_round": args.budget_s,
                           "statistic": "median of interleaved rounds (each the median of its runs)",
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
              "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            report["models"].append(bench_model(key, args.smollm_blocks, threads, formats, heads, args.rounds,
                                                args.budget_s, tmp, args.switch_weights))
    report["summary"] = {fmt: {"min_vs_best_ort": min(c["ours"][fmt]["vs_best_ort"] for m in report["models"]
                                                      for c in m["cases"]),
                               "max_bytes_vs_ort_int8": max(g["bytes_vs_ort_int8"][fmt] for m in report["models"]
                                                            for g in m["graphs"])}
                         for fmt in [label(f, h) for h in heads for f in formats]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
