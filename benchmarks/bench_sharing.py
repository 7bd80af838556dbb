"""Benchmark of cross-layer sharing: analysis wall time, and the strategy table on a real model.

    OMP_NUM_THREADS=1 python benchmarks/bench_sharing.py                  # analysis timing only (~1-2 min)
    python benchmarks/bench_sharing.py --analysis-model bert-base --threads 2   # issue #14's 110M case
    python benchmarks/bench_sharing.py --sequences 16 --reference       # + the whole-model-copy way, same run
    OMP_NUM_THREADS=1 python benchmarks/bench_sharing.py --table minilm --steps 40
    OMP_NUM_THREADS=1 python benchmarks/bench_sharing.py --table smollm2 --steps 0 --sequences 8

Prints ONE JSON object on stdout; progress goes to stderr.

"analysis": the full redundancy analysis (compressor/redundancy.analyze: block
influence, CKA, angular distance, weight cosine, all 66 block pairs tied and measured, 4 fixed
strategies tied and measured) of a randomly initialized 12-block LLaMA-style model (hidden 128,
FFN 344, vocab 2000), or of a random BertModel in bert-base's shape (--analysis-model bert-base,
110M), on 64 calibration sequences of 128 tokens, with torch's thread count as given. Speed is
also given as a ratio against one plain forward pass over the same calibration set, measured in
the same run (`forward_s`): analysis_s / forward_s is how many calibration passes the analysis
costs. A tie is measured on copies of the tied blocks only, the blocks before the first one
replayed from their recorded outputs; --reference also runs the analysis the way it was done
before (each tie on a deep copy of the whole model, full forwards) and prints the largest
difference between the two results (0 expected).

"table": for each strategy at comparable budgets, `compress()` is run on the real model with
that sharing plan (ternary QAT with distillation from the untied original when --steps > 0);
per row: unique parameters, packed bytes, and the held-out metric of the model right after
tying (float) and after QAT. MiniLM (encoder): cosine / normalized MSE of the last hidden
state against the original on wikitext-2 test; SmolLM2 (causal LM): perplexity. The calibration
(for auto) is wikitext-2 valid; training text too.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
MODELS = {"minilm": "pkg:all-MiniLM-L6-v2", "smollm2": "pkg:SmolLM2-135M"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


ANALYSIS_MODELS = {
    "llama-small": "random LlamaForCausalLM, 12 blocks, hidden 128, FFN 344, vocab 2000",
    "bert-base": "random BertModel in bert-base-uncased's shape: 12 blocks, hidden 768, FFN 3072, vocab 30522 (110M)",
    "smollm2": "the real SmolLM2-135M-Instruct (30 blocks; weights 4-bit-rounded in its GGUF) on wikitext-2 valid",
}


@functools.lru_cache(maxsize=1)
def _smollm2():
    from tritpress.compressor.ingest import load_model
    return load_model(MODELS["smollm2"])


def analysis_model(shape: str, seq_len: int):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape == "smollm2":
        return _smollm2().model.eval()
    if shape == "bert-base":
        return BertModel(BertConfig(max_position_embeddings=max(512, seq_len)), add_pooling_layer=False).eval()
    cfg = LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=344, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq_len,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def bench_analysis(sequences: int, seq_len: int, shape: str = "llama-small", reference: bool = False,
                   dtype: str = "fp32", model=None) -> dict:
    """The full analysis (66 pairs, 4 strategies) timed; with `reference`, also the way it was
    measured before replay (every tie on a deep copy of the whole model, full forwards), in the
    same run, and the largest difference between the two results. `dtype`: the calibration's."""
    from tritpress.compressor.redundancy import Calibration, analyze
    from tritpress.compressor.share import SharingConfig

    model = model if model is not None else analysis_model(shape, seq_len)
    ids = calibration_tokens(model, shape, sequences, seq_len)
    t = time.perf_counter()
    cal = Calibration.build(model, ids, dtype=dtype)  # reference outputs (encoders), base loss, blocks recorded
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    cal.loss(model)  # one plain pass over the calibration set: the unit the analysis is counted in
    forward_s = time.perf_counter() - t
    t = time.perf_counter()
    result = analyze(model, cal, SharingConfig(auto_pairs=66))
    analysis_s = time.perf_counter() - t
    measured = sum(v is not None for row in result["loss_increase"] for v in row) // 2
    out = {"model": ANALYSIS_MODELS[shape], "params": sum(p.numel() for p in model.parameters()),
           "calibration": {"sequences": sequences, "seq_len": seq_len,
                           "tokens": "wikitext-2 valid" if shape == "smollm2" else "random ids"},
           "pairs_measured": measured, "strategies_measured": len(result["strategies"]),
           "calibration_build_s": round(build_s, 3), "forward_s": round(forward_s, 3),
           "analysis_s": round(analysis_s, 3), "analysis_over_forward": round(analysis_s / forward_s, 2),
           "total_s": round(build_s + analysis_s, 3), "breakdown_s": result["timings"], "calib_dtype": dtype,
           "result": {k: result[k] for k in ("loss_increase", "strategies", "cka")}}
    if reference:
        log("reference: ties on whole-model copies, full forwards ...")
        cal.replay = None
        t = time.perf_counter()
        before = analyze(model, cal, SharingConfig(auto_pairs=66))
        out["reference_analysis_s"] = round(time.perf_counter() - t, 3)
        out["reference_over_replay"] = round(out["reference_analysis_s"] / analysis_s, 2)
        out["reference_over_forward"] = round(out["reference_analysis_s"] / forward_s, 2)
        out["max_abs_difference"] = max_difference(result, before)
    return out


def calibration_tokens(model, shape: str, sequences: int, seq_len: int) -> torch.Tensor:
    """Random ids for the random models; wikitext-2 valid, spread as `compress` spreads it, for SmolLM2."""
    if shape == "smollm2":
        from tritpress.compressor.redundancy import calibration_ids
        return calibration_ids(str(DATA / "valid.txt"), _smollm2().tokenizer, model, sequences, seq_len)
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (sequences, seq_len), generator=torch.Generator().manual_seed(1))


def compare_dtypes(sequences: int, seq_len: int, shape: str) -> dict:
    """The analysis in fp32 and under bf16 autocast on the same model and tokens, one after the
    other, and how far the bf16 one moves the results: the largest change of a pair's loss
    increase (absolute, and relative to the largest increase), the rank correlation of the pairs,
    whether the cheapest pairs and the strategies' order stay."""
    from tritpress.compressor.redundancy import resolve_calib_dtype
    from tritpress.compressor.share import SharingConfig
    from tritpress.compressor.structure import discover

    model = analysis_model(shape, seq_len)
    ids = calibration_tokens(model, shape, sequences, seq_len)
    auto = resolve_calib_dtype(model, discover(model), ids, SharingConfig(auto_pairs=66))
    runs = {dt: bench_analysis(sequences, seq_len, shape, dtype=dt, model=model) for dt in ("fp32", "bf16")}
    a, b = runs["fp32"]["result"], runs["bf16"]["result"]
    n = len(a["loss_increase"])  # the measured pairs (all of them up to 12 blocks; --share-pairs caps larger stacks)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if a["loss_increase"][i][j] is not None]
    x = [a["loss_increase"][i][j] for i, j in pairs]
    y = [b["loss_increase"][i][j] for i, j in pairs]
    cheapest = lambda v: {pairs[k] for k in sorted(range(len(v)), key=v.__getitem__)[:5]}  # noqa: E731
    order = lambda r: [s["strategy"] for s in sorted(r["strategies"], key=lambda s: s["loss_increase"])]  # noqa: E731
    return {"auto_resolves_to": auto,
            "fp32": {k: v for k, v in runs["fp32"].items() if k != "result"},
            "bf16": {k: v for k, v in runs["bf16"].items() if k != "result"},
            "bf16_speedup": round(runs["fp32"]["total_s"] / runs["bf16"]["total_s"], 2),
            "agreement": {"max_abs_pair_difference": round(max(abs(u - v) for u, v in zip(x, y)), 6),
                          "max_pair_difference_over_largest_increase": round(
                              max(abs(u - v) for u, v in zip(x, y)) / max(map(abs, x)), 5),
                          "pair_rank_correlation_spearman": round(spearman(x, y), 5),
                          "same_5_cheapest_pairs": cheapest(x) == cheapest(y),
                          "strategy_order_fp32": order(a), "strategy_order_bf16": order(b),
                          "same_strategy_order": order(a) == order(b),
                          "max_cka_difference": max_difference(a, b)["cka"]}}


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        r = [0] * len(v)
        for rank, k in enumerate(sorted(range(len(v)), key=v.__getitem__)):
            r[k] = rank
        return r
    rx, ry = ranks(x), ranks(y)
    n = len(x)
    return 1 - 6 * sum((p - q) ** 2 for p, q in zip(rx, ry)) / (n * (n * n - 1))


def max_difference(a: dict, b: dict) -> dict:
    """Largest |a - b| over the measured loss increases, the strategy losses and the CKA matrix."""
    pairs = [abs(x - y) for ra, rb in zip(a["loss_increase"], b["loss_increase"]) for x, y in zip(ra, rb)
             if x is not None]
    plans = [abs(x["loss_after_tying"] - y["loss_after_tying"]) for x, y in zip(a["strategies"], b["strategies"])]
    cka = [abs(x - y) for ra, rb in zip(a["cka"], b["cka"]) for x, y in zip(ra, rb)]
    return {"loss_increase": max(pairs), "strategies": max(plans), "cka": max(cka)}


def strategy_rows(name: str, steps: int, sequences: int, eval_tokens: int, auto_targets: list[float],
                  strategies: list[str], out_root: Path, init: str = "average", relax_rank: int = 0,
                  batch_size: int = 8, pairs: int = 66, probe_steps: int = 0, probe_top: int = 0) -> list[dict]:
    from tritpress.cli.pipeline import CompressConfig, compress
    from tritpress.compressor.share import SharingConfig
    from tritpress.compressor.train import TrainConfig

    rows = []
    runs = [(s, {}) for s in strategies] + [("auto", {"target_params": t}) for t in auto_targets]
    for strategy, extra in runs:
        t0 = time.perf_counter()
        label = strategy + (f"@{extra['target_params']}" if extra else "")
        log(f"[{name}] {label} ...")
        sharing = SharingConfig(strategy, data=str(DATA / "valid.txt"), calib_sequences=sequences,
                                analyze=False, init=init, relax_rank=relax_rank, auto_pairs=pairs,
                                auto_probe_steps=probe_steps if extra else 0, auto_probe_top=probe_top, **extra)
        train = TrainConfig(steps=steps, data=str(DATA / "valid.txt"), eval_data=str(DATA / "test.txt"),
                            eval_tokens=eval_tokens, checkpoint_every=0, seed=0, batch_size=batch_size)
        cfg = CompressConfig(MODELS[name], out=str(out_root / label.replace(":", "_")), train=train,
                             sharing=sharing, check=False)
        report = compress(cfg)
        s = report["sharing"]
        row = {"strategy": label, "groups": ";".join(",".join(map(str, g)) for g in s["plan"]["groups"]) if s
               else "none", "unique_blocks": len(s["plan"]["groups"]) if s else None,
               "unique_params": s["unique_params_after"] if s else report["size"]["original"]["params"],
               "unique_block_fraction": s["unique_block_fraction"] if s else 1.0,
               "packed_bytes": report["size"]["file_bytes"], "wall_s": round(time.perf_counter() - t0, 1)}
        if s and "auto" in s:
            row["auto_chosen"] = s["auto"].get("chosen")
            row["auto_ranked_by"] = s["auto"].get("ranked_by")
            row["auto_probed"] = s["auto"].get("probed")
            row["auto_candidates"] = [[c["strategy"], c["loss_after_tying"]] for c in s["auto"]["candidates"]]
        if s and "calibration_loss" in s:
            row["calibration_after_tying"] = s["calibration_loss"]
        if report.get("training"):
            q = report["training"]["quality"]
            row["after_tying"] = q.get("shared_float", q["original"])
            row["after_qat"] = q["ternary_qat"]
            row["original"] = q["original"]
        rows.append(row)
        log(json.dumps(row))
    return rows


def tie_only_rows(name: str, sequences: int, seq_len: int, auto_targets: list[float], strategies: list[str],
                  pairs: int, init: str = "average", relax_rank: int = 0) -> dict:
    """No training: load the model once; calibrate on wikitext-2 valid (auto's choice), evaluate
    each tied model on wikitext-2 test."""
    import math

    from tritpress.compressor.redundancy import Calibration, calibration_ids, measure_plan
    from tritpress.compressor.redundancy_auto import auto_plan
    from tritpress.compressor.ingest import load_model
    from tritpress.compressor.share import SharingConfig, plan_groups
    from tritpress.compressor.structure import discover

    loaded = load_model(MODELS[name])
    model = loaded.model.eval()
    structure = discover(model)
    n = structure.blocks.num_blocks
    ids = lambda split: calibration_ids(str(DATA / f"{split}.txt"), loaded.tokenizer, model, sequences, seq_len)  # noqa: E731
    t = time.perf_counter()
    cal, test = Calibration.build(model, ids("valid"), structure), Calibration.build(model, ids("test"), structure)
    forward_s = (time.perf_counter() - t) / 2
    to_metric = (lambda v: {"ppl": round(math.exp(v), 3)}) if cal.io.causal else (lambda v: {"nmse": round(v, 4)})  # noqa: E731
    rows = [{"strategy": "none", "unique_blocks": n, "unique_block_fraction": 1.0, "test": to_metric(test.base_loss),
             "calibration": to_metric(cal.base_loss)}]
    for s in strategies:
        if s == "none":
            continue
        cfg = SharingConfig(s, init=init, relax_rank=relax_rank)
        plan = plan_groups(n, cfg)
        r = measure_plan(model, plan, s, cfg, test, structure)
        rows.append({"strategy": s, "unique_blocks": plan.num_unique,
                     "unique_block_fraction": r["unique_block_fraction"], "test": to_metric(r["loss_after_tying"])})
        log(json.dumps(rows[-1]))
    for target in auto_targets:
        t = time.perf_counter()
        cfg = SharingConfig("auto", target_params=target, auto_pairs=pairs, init=init, relax_rank=relax_rank)
        plan, findings = auto_plan(model, cal, cfg, structure)
        r = measure_plan(model, plan, "auto", cfg, test, structure)
        rows.append({"strategy": f"auto@{target}", "unique_blocks": plan.num_unique, "groups": plan.describe(),
                     "chosen": findings["chosen"], "unique_block_fraction": r["unique_block_fraction"],
                     "test": to_metric(r["loss_after_tying"]),
                     "calibration_candidates": [[c["strategy"], to_metric(c["loss_after_tying"])]
                                                for c in findings["candidates"]],
                     "auto_wall_s": round(time.perf_counter() - t, 1)})
        log(json.dumps(rows[-1]))
    return {"model": MODELS[name], "init": init, "relax_rank": relax_rank,
            "calibration": f"wikitext-2 valid, {sequences} x {seq_len} tokens",
            "evaluation": f"wikitext-2 test, {sequences} x {seq_len} tokens", "forward_s": round(forward_s, 2),
            "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=64, help="analysis benchmark: calibration sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--analysis-model", choices=sorted(ANALYSIS_MODELS), default="llama-small",
                    help="analysis benchmark: the model's shape (random weights)")
    ap.add_argument("--reference", action="store_true",
                    help="analysis benchmark: also time the analysis without replay (whole-model copies)")
    ap.add_argument("--calib-dtype", choices=("fp32", "bf16", "both"), default="fp32",
                    help="analysis benchmark: the calibration forwards' precision; both: fp32 then bf16 on the "
                         "same model and tokens, and how far bf16 moves the results")
    ap.add_argument("--table", choices=sorted(MODELS), help="also run the strategy table on this real model")
    ap.add_argument("--steps", type=int, default=40, help="table: QAT steps per strategy (0 = none)")
    ap.add_argument("--table-sequences", type=int, default=16, help="table: calibration sequences for auto")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--strategies", default="none,alternate,sequence:2,cycle:3,sequence:3,middle-cycle:3")
    ap.add_argument("--auto-targets", default="0.34,0.51", help="auto: --target-params values")
    ap.add_argument("--init", default="average", help="table: shared-weight initialization")
    ap.add_argument("--relax-rank", type=int, default=0, help="table: per-occurrence low-rank correction")
    ap.add_argument("--pairs", type=int, default=66, help="table: block pairs auto measures")
    ap.add_argument("--batch-size", type=int, default=8, help="table: QAT sequences per step")
    ap.add_argument("--auto-probe-steps", type=int, default=0,
                    help="table: auto ranks its candidates after this many QAT steps (0 = right after tying)")
    ap.add_argument("--auto-probe-top", type=int, default=0, help="table: fine-tune only this many candidates")
    ap.add_argument("--out", default=None, help="table: keep run folders here (default: a temp dir)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}}
    if not args.skip_analysis:
        log("analysis benchmark ...")
        if args.calib_dtype == "both":
            result["analysis"] = compare_dtypes(args.sequences, args.seq_len, args.analysis_model)
        else:
            result["analysis"] = bench_analysis(args.sequences, args.seq_len, args.analysis_model, args.reference,
                                                args.calib_dtype)
            result["analysis"].pop("result")
        log(json.dumps(result["analysis"]))
    if args.table and args.steps == 0:
        result["table"] = tie_only_rows(args.table, args.table_sequences, args.seq_len,
                                        [float(t) for t in args.auto_targets.split(",") if t],
                                        [s for s in args.strategies.split(",") if s], args.pairs, args.init,
                                        args.relax_rank)
    elif args.table:
        with tempfile.TemporaryDirectory() as tmp:
            out_root = Path(args.out) if args.out else Path(tmp)
            targets = [float(t) for t in args.auto_targets.split(",") if t]
            result["table"] = {"model": MODELS[args.table], "steps": args.steps,
                               "rows": strategy_rows(args.table, args.steps, args.table_sequences, args.eval_tokens,
                                                     targets, [s for s in args.strategies.split(",") if s],
                                                     out_root, args.init, args.relax_rank, args.batch_size,
                                                     args.pairs, args.auto_probe_steps, args.auto_probe_top)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
