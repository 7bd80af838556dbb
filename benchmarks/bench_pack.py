"""Benchmark of trit packing and of whole-model packed checkpoints.

    HF_HUB_OFFLINE=1 python benchmarks/bench_pack.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_pack.py --quick                     # small synthetic set, no SmolLM2
    python benchmarks/bench_pack.py --models a,c                # choose models (letters or names)

Prints ONE JSON object on stdout; progress goes to stderr. Sections:

- "pack": pack_trits / unpack_trits throughput on a synthetic ternary set (MB of fp32
  weights per second = numel*4/1e6 / seconds, median of repeats), the per-tensor path
  (QTensor codes -> packed bytes -> codes, as save_packed/load_packed do it), and a plain
  np.copy of the same number of fp32 weights measured in the same run: on a shared, noisy
  machine the ratios to that copy mean more than absolute times.
- "bits_per_weight": achieved bits/weight of pack_trits vs log2(3) and the 5-trits-per-byte bound.
- "models": convert -> save_packed -> size_report -> load_packed for real and random-init
  models, with exactness checks (reload outputs and codes must be identical).

Exit status: 0 when every check passed, 1 otherwise (the JSON is printed either way).
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tritpress.analyzers.size import size_report  # noqa: E402
from tritpress.compressor import TernaryConfig, convert, get_record, load_model  # noqa: E402
from tritpress.compressor.ingest import SourceInfo  # noqa: E402
from tritpress.compressor.layers import QTensor, WeightFormat  # noqa: E402
from tritpress.compressor.transform import qtensor_formats  # noqa: E402
from tritpress.exporters import load_packed, save_packed  # noqa: E402
from tritpress.exporters import packed as packed_mod  # noqa: E402
from tritpress.compressor.transform import tie_groups  # noqa: E402
from tritpress.exporters.packing import (MAX_TRIT_BYTE, TRITS_PER_BYTE, pack_trits, packed_trits_size,  # noqa: E402
                               unpack_trits)

SEED = 0
LOG2_3 = math.log2(3)
LAYOUT_BOUND = 8 / TRITS_PER_BYTE  # 1.6 bits per weight


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def timed(fn, repeats: int, warmup: int = 1):
    """Median/min seconds of fn() over `repeats` runs after `warmup` untimed ones; also the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}, out


def stage(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 4)


def throughput(n: int, seconds: float) -> float:
    return round(n * 4 / 1e6 / seconds, 1)


# ------------------------------------------------------------------ 1+2: synthetic packing

def reference_pack(codes: np.ndarray) -> np.ndarray:
    """Independent re-implementation of the documented layout, for a correctness check."""
    t = codes.reshape(-1).astype(np.int32) + 1
    t = np.concatenate([t, np.zeros((-t.size) % 5, np.int32)]).reshape(-1, 5)
    return (t @ np.array([1, 3, 9, 27, 81], np.int32)).astype(np.uint8)


def bench_pack(rows: int, cols: int, repeats: int) -> tuple[dict, dict, list[str]]:
    n = rows * cols
    log(f"[pack] synthetic set: {rows}x{cols} = {n} codes, {repeats} repeats (+1 warm-up)")
    rng = np.random.default_rng(SEED)
    codes = rng.integers(-1, 2, size=n, dtype=np.int8)
    weights = rng.standard_normal(n, dtype=np.float32)
    failures = []

    copy_t, _ = timed(lambda: np.copy(weights), repeats)
    pack_t, packed = timed(lambda: pack_trits(codes), repeats)
    unpack_t, unpacked = timed(lambda: unpack_trits(packed, n), repeats)

    # per-tensor path of save_packed/load_packed: QTensor int8 codes -> uint8 bytes (tensor) and back
    fmt = WeightFormat("ternary")
    qt = QTensor(torch.from_numpy(codes.copy()).reshape(rows, cols), torch.ones(1), fmt)
    encode, decode = packed_mod.encode_tensor, packed_mod.decode_tensor
    notes = []
    key = "layer.qweight.codes"
    enc_t, (stored, encoding, *_) = timed(lambda: encode(key, qt.codes, {key: fmt}, {}), repeats)
    entry = {"encoding": encoding, "shape": [rows, cols]}
    dec_t, decoded = timed(lambda: decode(key, stored, entry), repeats)

    # correctness
    ok_roundtrip = bool(np.array_equal(unpacked, codes))
    ok_layout = bool(np.array_equal(packed, reference_pack(codes)))
    ok_tensor = bool(torch.equal(decoded, qt.codes)) and decoded.dtype == torch.int8
    ok_size = packed.size == packed_trits_size(n) and packed.dtype == np.uint8
    ok_max = int(packed.max()) <= MAX_TRIT_BYTE
    for name, ok in [("unpack(pack(codes)) == codes", ok_roundtrip), ("layout matches documented formula", ok_layout),
                     ("per-tensor encode/decode round trip", ok_tensor), ("packed size/dtype", ok_size),
                     ("bytes <= 242", ok_max)]:
        if not ok:
            failures.append(f"pack: {name}")
    # small edge cases: every length 0..11 (padding), all-(-1), all-(+1), out-of-range rejected
    edge_ok = True
    for m in range(12):
        for c in (rng.integers(-1, 2, size=m, dtype=np.int8), np.full(m, -1, np.int8), np.full(m, 1, np.int8)):
            p = pack_trits(c)
            edge_ok &= p.size == packed_trits_size(m) and np.array_equal(unpack_trits(p, m), c)
    rejects = 0
    for bad in (np.array([2], np.int8), np.array([-2], np.int8)):
        try:
            pack_trits(bad)
        except ValueError:
            rejects += 1
    try:
        unpack_trits(np.array([243], np.uint8), 5)
    except ValueError:
        rejects += 1
    if not edge_ok:
        failures.append("pack: edge-case round trips (lengths 0..11, all -1, all +1)")
    if rejects != 3:
        failures.append("pack: out-of-range input not rejected")

    copy_s = copy_t["median_s"]
    res = {
        "n_codes": n, "shape": [rows, cols], "seed": SEED, "repeats": repeats, "warmup": 1,
        "distribution": "uniform over {-1, 0, +1} (numpy default_rng)",
        "unit": "MB of fp32 weights per second = numel*4/1e6 / median seconds",
        "copy_fp32_baseline": {"op": "np.copy of n float32", "median_s": round(copy_s, 5),
                               "min_s": round(copy_t["min_s"], 5), "MB_per_s": throughput(n, copy_s)},
        "pack_trits": {"median_s": round(pack_t["median_s"], 5), "min_s": round(pack_t["min_s"], 5),
                       "MB_per_s": throughput(n, pack_t["median_s"]),
                       "time_ratio_vs_copy": round(pack_t["median_s"] / copy_s, 2)},
        "unpack_trits": {"median_s": round(unpack_t["median_s"], 5), "min_s": round(unpack_t["min_s"], 5),
                         "MB_per_s": throughput(n, unpack_t["median_s"]),
                         "time_ratio_vs_copy": round(unpack_t["median_s"] / copy_s, 2)},
        "per_tensor_encode": {"path": "QTensor.codes (torch int8) -> exporters.packed.encode_tensor -> uint8 tensor",
                              "median_s": round(enc_t["median_s"], 5), "min_s": round(enc_t["min_s"], 5),
                              "MB_per_s": throughput(n, enc_t["median_s"]),
                              "time_ratio_vs_copy": round(enc_t["median_s"] / copy_s, 2)},
        "per_tensor_decode": {"path": "uint8 tensor -> exporters.packed.decode_tensor -> int8 codes tensor",
                              "median_s": round(dec_t["median_s"], 5), "min_s": round(dec_t["min_s"], 5),
                              "MB_per_s": throughput(n, dec_t["median_s"]),
                              "time_ratio_vs_copy": round(dec_t["median_s"] / copy_s, 2)},
        "checks": {"roundtrip_exact": ok_roundtrip, "layout_matches_reference": ok_layout,
                   "per_tensor_roundtrip_exact": ok_tensor, "size_and_dtype": ok_size, "max_byte_le_242": ok_max,
                   "edge_cases_ok": bool(edge_ok), "out_of_range_rejected": f"{rejects}/3"},
        "notes": notes,
    }
    achieved = packed.nbytes * 8 / n
    bpw = {
        "n_codes": n, "packed_bytes": int(packed.nbytes), "achieved": round(achieved, 6),
        "information_limit_log2_3": round(LOG2_3, 6), "layout_bound_5_per_byte": LAYOUT_BOUND,
        "efficiency_log2_3_over_achieved": round(LOG2_3 / achieved, 6),
        "empirical_entropy_bits": round(float(-sum(p * math.log2(p) for p in
                                                  np.bincount(codes + 1, minlength=3) / n if p > 0)), 6),
    }
    return res, bpw, failures


# ------------------------------------------------------------------ 3: models

class ZarembaLSTM(nn.Module):
    """Word-level LSTM LM, Zaremba et al. (2014) 'medium': 650 units, 2 layers, 10k vocabulary."""

    def __init__(self, vocab: int = 10000, hidden: int = 650, layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, ids):
        out, _ = self.rnn(self.embedding(ids))
        return self.decoder(out)


def load_minilm():
    lm = load_model("pkg:all-MiniLM-L6-v2")
    return lm.model, lm.source, []


def load_smollm2():
    lm = load_model("pkg:SmolLM2-135M")
    notes = ["GGUF weights were already 4-bit (Q4_1) rounded before dequantization to float32: the 'original' "
             "float model already carries that rounding, so ratios vs fp32/fp16 are vs a dequantized Q4_1 model"]
    return lm.model, lm.source, notes + list(lm.source.notes)


def load_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config()).float().eval()
    source = SourceInfo("module", "<in-memory GPT2LMHeadModel(GPT2Config())>", type(model).__name__,
                        model.config.to_dict())
    notes = [f"GPT-2 small architecture (GPT2Config() defaults), RANDOMLY INITIALIZED with torch.manual_seed({SEED}): "
             "no pretrained GPT-2 weights are available offline; sizes are real, fidelity numbers are not"]
    return model, source, notes


def load_lstm():
    torch.manual_seed(SEED)
    model = ZarembaLSTM().eval()
    source = SourceInfo("module", "<in-memory ZarembaLSTM>", f"{ZarembaLSTM.__module__}.{ZarembaLSTM.__qualname__}")
    notes = [f"Embedding(10000,650) -> LSTM(650,650,2 layers) -> Linear(650,10000), RANDOMLY INITIALIZED with "
             f"torch.manual_seed({SEED}); reloaded with skeleton=ZarembaLSTM()"]
    return model, source, notes


MODELS = {
    "a": ("all-MiniLM-L6-v2", "pkg:all-MiniLM-L6-v2, BERT encoder (pretrained)", load_minilm),
    "b": ("SmolLM2-135M", "pkg:SmolLM2-135M, LLaMA decoder (pretrained, GGUF Q4_1)", load_smollm2),
    "c": ("gpt2-small-random", "transformers GPT2LMHeadModel(GPT2Config()), 124M, random init", load_gpt2),
    "d": ("lstm-zaremba-medium", "2-layer LSTM word LM, 650 units, 10k vocab, random init", load_lstm),
}
NAME_TO_LETTER = {"minilm": "a", "all-minilm-l6-v2": "a", "smollm2": "b", "smollm2-135m": "b",
                  "gpt2": "c", "lstm": "d", **{v[0].lower(): k for k, v in MODELS.items()}}


def make_inputs(letter: str, model: nn.Module) -> dict:
    g = torch.Generator().manual_seed(SEED)
    if letter == "d":
        return {"ids": torch.randint(0, 10000, (2, 35), generator=g)}
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if letter == "a":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    else:
        inputs["use_cache"] = False
    return inputs


@torch.no_grad()
def outputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"output": out}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def unique_code_keys(model: nn.Module) -> dict[str, WeightFormat]:
    """One `...codes` state_dict key per stored QTensor (aliases dropped) -> its format."""
    fmts = {f"{n}.codes": f for n, f in qtensor_formats(model).items()}
    canon = {keys[0] for keys in tie_groups(model)}
    return {k: f for k, f in fmts.items() if k in canon}


def run_row(letter: str, model: nn.Module, source: SourceInfo, cfg: TernaryConfig, n_params: int,
            inputs: dict, ref_float: dict, tmp: str, label: str) -> tuple[dict, list[str]]:
    failures = []
    row = {"config": {k: v for k, v in cfg.to_dict().items() if v != TernaryConfig().to_dict()[k]} or "defaults"}
    log(f"  [{label}] convert")
    _, row["convert_s"] = stage(lambda: convert(model, cfg))
    y_conv = outputs(model, inputs)

    # pure packing share of save_packed: the same encode calls, without hashing and I/O
    codes = unique_code_keys(model)
    state = model.state_dict(keep_vars=True)
    encode = packed_mod.encode_tensor
    _, row["pack_codes_only_s"] = stage(lambda: [encode(k, state[k], codes, {}) for k in codes])
    row["code_tensors"] = {kind: sum(1 for f in codes.values() if f.kind == kind)
                           for kind in sorted({f.kind for f in codes.values()})}

    path = os.path.join(tmp, f"{MODELS[letter][0]}-{label}.safetensors")
    log(f"  [{label}] save_packed -> {path}")
    _, row["save_packed_s"] = stage(lambda: save_packed(model, path, source, extra={"original_params": n_params}))
    rep, row["size_report_s"] = stage(lambda: size_report(path))
    log(f"  [{label}] load_packed")
    skeleton = ZarembaLSTM() if letter == "d" else None
    reloaded, row["reload_s"] = stage(lambda: load_packed(path, skeleton=skeleton))
    y_re, row["reload_forward_s"] = stage(lambda: outputs(reloaded, inputs))

    # --- size
    file_size = os.path.getsize(path)
    comp_sum = sum(c["bytes"] for c in rep["components"])
    row.update({
        "file_bytes": rep["file_bytes"],
        "ratio_vs_fp32": rep.get("ratio_vs_fp32"), "ratio_vs_fp16": rep.get("ratio_vs_fp16"),
        "ternary": {k: rep["ternary"][k] for k in ("weights", "code_bytes", "bits_per_weight",
                                                   "bits_per_weight_with_scales")},
        "overall_bits_per_original_param": round(8 * rep["file_bytes"] / n_params, 4),
        "components_bytes": {c["component"]: c["bytes"] for c in rep["components"]},
        "components_bits_per_weight": {c["component"]: c["bits_per_weight"] for c in rep["components"]
                                       if c["bits_per_weight"] is not None},
    })

    # --- checks
    diffs = {k: float((y_conv[k] - y_re[k]).abs().max()) if k in y_re else None for k in y_conv}
    max_diff = max((d for d in diffs.values() if d is not None), default=float("nan"))
    s1, s2 = model.state_dict(), reloaded.state_dict()
    code_keys = [k for k in s1 if k.endswith(".codes")]
    codes_identical = all(k in s2 and s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]) for k in code_keys)
    state_identical = set(s1) == set(s2) and all(s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]) for k in s1)
    ties_match = sorted(map(sorted, tie_groups(model))) == sorted(map(sorted, tie_groups(reloaded)))
    tern_block = [k for k in codes if codes[k].kind == "ternary" and k in packed_meta_components(path, "ternary layers")]
    expected_code_bytes = sum(packed_trits_size(state[k].numel()) for k in tern_block)
    checks = {
        "max_abs_diff_reload_vs_converted": max_diff,
        "max_abs_diff_per_output": diffs,
        "reload_output_keys_match": set(y_conv) == set(y_re),
        "codes_bit_identical": codes_identical, "n_code_tensors_compared": len(code_keys),
        "full_state_dict_identical": state_identical,
        "tie_groups_match": ties_match,
        "report_bytes_sum": comp_sum, "os_path_getsize": file_size, "report_sum_equals_file_size": comp_sum == file_size,
        "ternary_code_bytes_expected": expected_code_bytes,
        "ternary_code_bytes_match": expected_code_bytes == rep["ternary"]["code_bytes"],
    }
    row["checks"] = checks
    for name, ok in [("reload max abs diff == 0.0", max_diff == 0.0), ("reload output keys", checks["reload_output_keys_match"]),
                     ("codes bit-identical", codes_identical), ("state_dict identical", state_identical),
                     ("tie groups", ties_match), ("report bytes sum == file size", comp_sum == file_size),
                     ("ternary code bytes == sum ceil(n/5)", checks["ternary_code_bytes_match"])]:
        if not ok:
            failures.append(f"{MODELS[letter][0]}/{label}: {name}")

    # --- informational: how far the converted model is from the float one (post-training, no fine-tuning)
    fid = {}
    for k in ref_float:
        if k in y_conv and y_conv[k].shape == ref_float[k].shape:
            a, b = ref_float[k].double().flatten(), y_conv[k].double().flatten()
            fid[k] = {"rel_l2": round(float((a - b).norm() / a.norm().clamp_min(1e-30)), 4),
                      "cosine": round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 4)}
    row["fidelity_vs_float_info"] = fid
    row["record_converted"] = bool(get_record(reloaded) and get_record(reloaded).converted)
    del reloaded
    return row, failures


def packed_meta_components(path, component: str) -> set[str]:
    from tritpress.exporters.packed import read_metadata
    return {k for k, e in read_metadata(path)["tensors"].items() if e["component"] == component}


def bench_model(letter: str, tmp: str, all_ternary: bool) -> tuple[dict, list[str]]:
    name, desc, loader = MODELS[letter]
    log(f"[model {letter}] {name}: load")
    (model, source, notes), load_s = stage(loader)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    res = {"description": desc, "notes": notes, "original_params": n_params, "load_s": load_s,
           "source_kind": source.kind, "model_class": source.model_class, "rows": {}}
    inputs = make_inputs(letter, model)
    ref_float, res["float_forward_s"] = stage(lambda: outputs(model, inputs))
    failures = []
    spare = None
    if all_ternary:
        spare, res["deepcopy_for_second_row_s"] = stage(lambda: copy.deepcopy(model))
    res["rows"]["default"], f = run_row(letter, model, source, TernaryConfig(), n_params, inputs, ref_float, tmp,
                                        "default")
    failures += f
    del model
    gc.collect()
    if spare is not None:
        cfg = TernaryConfig(embedding="ternary", head="ternary")
        res["rows"]["all-ternary"], f = run_row(letter, spare, source, cfg, n_params, inputs, ref_float, tmp,
                                                "all-ternary")
        failures += f
        del spare
        gc.collect()
    return res, failures


def parse_models(spec: str | None, quick: bool) -> list[str]:
    if spec is None:
        return ["a", "c", "d"] if quick else ["a", "b", "c", "d"]
    out = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        letter = item if item in MODELS else NAME_TO_LETTER.get(item)
        if letter is None:
            raise SystemExit(f"unknown model {item!r}; use letters a-d or names {sorted(NAME_TO_LETTER)}")
        if letter not in out:
            out.append(letter)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M-code synthetic set, 3 repeats, skip SmolLM2")
    ap.add_argument("--models", default=None,
                    help="comma list of a (MiniLM), b (SmolLM2), c (GPT-2 random), d (LSTM); default all "
                         "(--quick: a,c,d); an explicit list wins over --quick")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats for the synthetic set")
    ap.add_argument("--no-all-ternary", action="store_true", help="skip the embedding/head=ternary rows")
    args = ap.parse_args(argv)

    # keep stdout for the one JSON object: anything else written to fd 1 (C libraries too) goes to stderr
    json_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)

    t_all = time.perf_counter()
    torch.manual_seed(SEED)
    letters = parse_models(args.models, args.quick)
    rows, cols = (1024, 1024) if args.quick else (4096, 4096)
    repeats = args.repeats or (3 if args.quick else 7)
    result = {
        "benchmark": "tritpress bench_pack",
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "quick": args.quick,
        "env": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE")},
    }
    failures = []
    result["pack"], result["bits_per_weight"], f = bench_pack(rows, cols, repeats)
    failures += f
    result["models"] = {}
    with tempfile.TemporaryDirectory(prefix="bench_pack_") as tmp:
        for letter in letters:
            name = MODELS[letter][0]
            try:
                result["models"][name], f = bench_model(letter, tmp, not args.no_all_ternary)
                failures += f
            except Exception as e:  # report and go on with the other models
                log(traceback.format_exc())
                result["models"][name] = {"error": f"{type(e).__name__}: {e}"}
                failures.append(f"{name}: {type(e).__name__}: {e}")
            gc.collect()
    result["total_s"] = round(time.perf_counter() - t_all, 2)
    result["failures"] = failures
    result["all_checks_passed"] = not failures
    json_out.write(json.dumps(result, indent=2) + "\n")
    json_out.flush()
    log(f"done in {result['total_s']} s; {'all checks passed' if not failures else f'{len(failures)} FAILURES'}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
