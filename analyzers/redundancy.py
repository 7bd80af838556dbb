"""Redundancy analysis of a block stack on calibration data: which blocks could share weights.

Per block: Block Influence (ShortGPT: 1 - mean cosine between a block's input and output
tokens). Per pair of blocks: linear CKA (Kornblith et al. 2019) and angular distance
(arccos(cos)/pi on the last token, arXiv 2403.17887) between block outputs, cosine
similarity of the weights per matrix type, and the ground truth: the calibration-loss
increase measured when the pair is actually tied (compressor.share.apply_sharing, with the
chosen initialization). Cosine-type scores correlate only moderately with that increase,
so `auto` decides by the measured numbers.

Calibration loss: next-token NLL for causal LMs; for encoders (no LM loss), the normalized
MSE of the output against the original model's output (0 for the original itself).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.modelio import BlockOutputs, ModelIO, batched_forward, held_out_loss
from tritpress.compressor.share import (SharingConfig, SharingPlan, _as_matrix, apply_sharing, block_matrices, fixed_plans,
                              plan_fraction, plan_groups)
from tritpress.compressor.structure import ModelStructure, discover

MAX_CKA_TOKENS = 4096


@dataclass
class Calibration:
    """Calibration sequences and what the original model does on them."""

    io: ModelIO
    ids: torch.Tensor               # [N, seq_len] token ids
    reference: list[torch.Tensor]   # the original's main output per batch (encoders)
    base_loss: float
    batch: int = 8

    @classmethod
    def build(cls, model: nn.Module, ids: torch.Tensor, structure: ModelStructure | None = None,
              batch: int = 8) -> "Calibration":
        io = ModelIO.discover(model, structure or discover(model))
        model.eval()
        with torch.no_grad():
            reference = [] if io.causal else [out for _, out in batched_forward(io, model, ids, batch)]
        cal = cls(io, ids, reference, 0.0, batch)
        cal.base_loss = cal.loss(model)
        return cal

    def loss(self, model: nn.Module) -> float:
        return held_out_loss(self.io, model, self.ids, self.reference, self.batch)

    @property
    def metric(self) -> str:
        return "nll" if self.io.causal else "nmse_to_original"


CALIBRATION_POOL_TOKENS = 1 << 20


def calibration_ids(spec: str, tokenizer, model: nn.Module, sequences: int, seq_len: int) -> torch.Tensor:
    """[sequences, seq_len] token ids from the validation split of DATA (a file is used as is),
    spread evenly over the text (its first 2^20 tokens, or 32x what is needed if more): the
    first N consecutive blocks come from a handful of documents, and plans ranked on them did
    not keep their order on other text (docs/sharing.md)."""
    from tritpress.compressor.data import lm_blocks, read_texts, token_vocab_size, tokenizer_fn

    texts = read_texts(spec, "validation")
    encode = tokenizer_fn(tokenizer, texts, token_vocab_size(model))
    pool = lm_blocks(texts, encode, seq_len, max(CALIBRATION_POOL_TOKENS, 32 * sequences * seq_len))
    if len(pool) <= sequences:
        return pool
    return pool[torch.linspace(0, len(pool) - 1, sequences).round().long()]


def tied_loss(model: nn.Module, plan: SharingPlan, cfg: SharingConfig, cal: Calibration,
              structure: ModelStructure | None = None) -> float:
    """Calibration loss of a copy of `model` with `plan` really tied."""
    tied, _ = apply_sharing(copy.deepcopy(model), plan, cfg, structure)
    return cal.loss(tied)


# ------------------------------------------------------------------ activation metrics


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [tokens, features] representations."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    xty = (x.t() @ y).pow(2).sum()
    return float(xty / ((x.t() @ x).pow(2).sum().sqrt() * (y.t() @ y).pow(2).sum().sqrt()).clamp(min=1e-12))


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over sequences of arccos(cos(a, b)) / pi on the last token ([seqs, tokens, dim])."""
    cos = F.cosine_similarity(a[:, -1], b[:, -1], dim=-1).clamp(-1, 1)
    return float((torch.arccos(cos) / math.pi).mean())


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT: 1 - mean over tokens of cos(block input, block output)."""
    return float(1 - F.cosine_similarity(x_in, x_out, dim=-1).mean())


@torch.no_grad()
def activation_metrics(model: nn.Module, cal: Calibration, paths: list[str]) -> dict:
    n = len(paths)
    hooks = BlockOutputs(model, paths, inputs=True)
    per_batch_in, per_batch_out = [], []  # [batch][block]
    try:
        for _ in batched_forward(cal.io, model, cal.ids, cal.batch):
            per_batch_in.append(hooks.take_inputs())
            per_batch_out.append(hooks.take())
    finally:
        hooks.remove()
    ins = [torch.cat([b[i].float() for b in per_batch_in]) for i in range(n)]
    outs = [torch.cat([b[i].float() for b in per_batch_out]) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    flat = [o.flatten(0, -2) for o in outs]
    take = torch.randperm(flat[0].shape[0], generator=g)[:MAX_CKA_TOKENS]
    flat = [f[take] for f in flat]
    cka = [[round(linear_cka(flat[i], flat[j]), 5) for j in range(n)] for i in range(n)]
    ang = [[round(angular_distance(outs[i], outs[j]), 5) for j in range(n)] for i in range(n)]
    influence = [round(block_influence(ins[i], outs[i]), 5) for i in range(n)]
    return {"block_influence": influence, "cka": cka, "angular_distance": ang}


def weight_similarity(model: nn.Module, structure: ModelStructure, share: str) -> dict[str, list[list[float]]]:
    """Per matrix type (name inside the block): pairwise cosine of the flattened weights."""
    mats = block_matrices(model, structure, share)
    n = len(mats)
    out = {}
    for name in mats[0]:
        ws = torch.stack([_as_matrix(*mats[b][name]).flatten() for b in range(n)])
        ws = F.normalize(ws, dim=1)
        out[name] = [[round(float(v), 5) for v in row] for row in ws @ ws.t()]
    return out


# ------------------------------------------------------------------ the analysis


def candidate_pairs(n: int, weight_sim: dict, limit: int) -> list[tuple[int, int]]:
    """All block pairs, or the `limit` most weight-similar ones when there are more."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(pairs) <= limit:
        return pairs
    mean = [[sum(m[i][j] for m in weight_sim.values()) / len(weight_sim) for j in range(n)] for i in range(n)]
    return sorted(sorted(pairs, key=lambda p: -mean[p[0]][p[1]])[:limit])


def pair_plan(n: int, i: int, j: int, share: str) -> SharingPlan:
    groups = sorted([[i, j]] + [[b] for b in range(n) if b not in (i, j)])
    return SharingPlan(n, groups, share, f"pair {i},{j}")


def analyze(model: nn.Module, cal: Calibration, cfg: SharingConfig, structure: ModelStructure | None = None,
            measure_pairs: bool = True, strategies: bool = True) -> dict:
    """The redundancy analysis as a JSON-able dict (see module docstring)."""
    t0 = time.perf_counter()
    structure = structure or discover(model)
    stack = structure.blocks
    if stack is None:
        raise TritpressError("cannot analyze: no stack of repeated blocks (or stacked LSTM/GRU layers) found")
    n = stack.num_blocks
    result = {"model_blocks": {"path": stack.path, "num_blocks": n, "block_type": stack.block_type},
              "calibration": {"sequences": len(cal.ids), "seq_len": cal.ids.shape[1], "metric": cal.metric,
                              "base_loss": round(cal.base_loss, 6)},
              "share": cfg.share, "init": cfg.init, "relax_rank": cfg.relax_rank}
    timings = {}
    t = time.perf_counter()
    if stack.kind == "modulelist":
        result.update(activation_metrics(model, cal, [f"{stack.path}.{i}" for i in range(n)]))
    else:  # nn.LSTM runs its layers inside one kernel: per-layer hidden states are not observable
        result.update(block_influence=None, cka=None, angular_distance=None)
    timings["activations_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    sims = weight_similarity(model, structure, cfg.share)
    result["weight_cosine"] = sims
    result["weight_cosine_mean"] = [[round(sum(m[i][j] for m in sims.values()) / len(sims), 5) for j in range(n)]
                                    for i in range(n)]
    timings["weights_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    increase = [[None] * n for _ in range(n)]
    if measure_pairs and n > 1:
        for i, j in candidate_pairs(n, sims, cfg.auto_pairs):
            d = tied_loss(model, pair_plan(n, i, j, cfg.share), cfg, cal, structure) - cal.base_loss
            increase[i][j] = increase[j][i] = round(d, 6)
    result["loss_increase"] = increase
    timings["pairs_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    if strategies and n > 1:
        result["strategies"] = strategy_table(model, cal, cfg, structure, max(1, (n + 1) // 2))
    timings["strategies_s"] = round(time.perf_counter() - t, 3)
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    result["timings"] = timings
    return result


def strategy_table(model, cal: Calibration, cfg: SharingConfig, structure, num_unique: int) -> list[dict]:
    """Each fixed pattern with `num_unique` unique blocks (plus alternate), tied and measured."""
    n = structure.blocks.num_blocks
    plans = fixed_plans(n, num_unique, cfg.share)
    if num_unique != 2 and n >= 2:
        plans = {"alternate": plan_groups(n, SharingConfig("alternate", share=cfg.share)), **plans}
    return [measure_plan(model, plan, name, cfg, cal, structure) for name, plan in plans.items()]


def measure_plan(model, plan: SharingPlan, name: str, cfg: SharingConfig, cal: Calibration, structure) -> dict:
    loss = tied_loss(model, plan, cfg, cal, structure)
    return {"strategy": name, "groups": plan.groups, "unique_blocks": plan.num_unique,
            "unique_block_fraction": round(plan_fraction(model, plan, cfg, structure), 5),
            "loss_after_tying": round(loss, 6), "loss_increase": round(loss - cal.base_loss, 6)}


# ------------------------------------------------------------------ output


def table(result: dict) -> str:
    from tabulate import tabulate

    n = result["model_blocks"]["num_blocks"]
    rows = []
    for i in range(n):
        inc = [v for v in result["loss_increase"][i] if v is not None]
        nearest = min(range(n), key=lambda j: result["loss_increase"][i][j]
                      if result["loss_increase"][i][j] is not None else math.inf) if inc else None
        rows.append([i, _fmt(result["block_influence"], i), _fmt(result["cka"], i, i + 1),
                     _fmt(result["angular_distance"], i, i + 1), _fmt(result["weight_cosine_mean"], i, i + 1),
                     "" if nearest is None else f"{nearest} ({result['loss_increase'][i][nearest]:+.4f})"])
    out = tabulate(rows, headers=["block", "influence", "CKA next", "angular next", "weight cos next",
                                  f"cheapest partner ({result['calibration']['metric']} change)"],
                   disable_numparse=True)
    if result.get("strategies"):
        srows = [[s["strategy"], s["unique_blocks"], f"{s['unique_block_fraction']:.3f}", f"{s['loss_after_tying']:.4f}",
                  f"{s['loss_increase']:+.4f}"] for s in result["strategies"]]
        out += "\n\n" + tabulate(srows, headers=["strategy", "unique blocks", "unique block params",
                                                 result["calibration"]["metric"], "increase"], disable_numparse=True)
    return out


def _fmt(matrix, i, j=None):
    if matrix is None:
        return "-"
    if j is None:
        return f"{matrix[i]:.4f}"
    return f"{matrix[i][j]:.4f}" if j < len(matrix) and matrix[i][j] is not None else "-"


def write_outputs(result: dict, out_dir) -> list[str]:
    """analysis.json, analysis.txt and PNG plots (heatmaps, block influence) into out_dir."""
    from tritpress.compressor.fileio import atomic_path, write_json, write_text

    out_dir = Path(out_dir)
    write_json(out_dir / "analysis.json", result)
    write_text(out_dir / "analysis.txt", table(result) + "\n")
    files = [str(out_dir / "analysis.json"), str(out_dir / "analysis.txt")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files  # plots need the `analysis` extra: pip install matplotlib
    heatmaps = {"cka": "linear CKA of block outputs", "angular_distance": "angular distance (last token)",
                "weight_cosine_mean": "weight cosine (mean over matrix types)",
                "loss_increase": f"measured {result['calibration']['metric']} increase when the pair is tied"}
    for key, title in heatmaps.items():
        m = result.get(key)
        if m is None:
            continue
        data = torch.tensor([[math.nan if v is None else v for v in row] for row in m])
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        im = ax.imshow(data.numpy(), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax)
        files.append(_save(fig, out_dir / f"{key}.png", atomic_path, plt))
    if result.get("block_influence"):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(len(result["block_influence"])), result["block_influence"])
        ax.set_xlabel("block")
        ax.set_ylabel("1 - cos(in, out)")
        ax.set_title("Block Influence (ShortGPT)", fontsize=9)
        files.append(_save(fig, out_dir / "block_influence.png", atomic_path, plt))
    return files


def _save(fig, path, atomic_path, plt) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------ auto


def _pair_costs(result: dict) -> list[list[float]]:
    """Measured increase where measured; unmeasured pairs rank after every measured one, by weight cosine."""
    inc, wcos = result["loss_increase"], result["weight_cosine_mean"]
    n = len(inc)
    worst = max([v for row in inc for v in row if v is not None], default=0.0)
    return [[inc[i][j] if inc[i][j] is not None else abs(worst) + 1.0 + (1.0 - wcos[i][j]) for j in range(n)]
            for i in range(n)]


def greedy_merges(costs: list[list[float]]):
    """Yield successive groupings, merging at each step the two groups whose worst member pair
    (complete linkage) costs least."""
    groups = [[i] for i in range(len(costs))]
    while len(groups) > 1:
        best = min(((a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))),
                   key=lambda ab: max(costs[i][j] for i in groups[ab[0]] for j in groups[ab[1]]))
        a, b = best
        merged = sorted(groups[a] + groups[b])
        groups = sorted([g for k, g in enumerate(groups) if k not in (a, b)] + [merged])
        yield [list(g) for g in groups]


def groups_for_target(model, cfg: SharingConfig, structure) -> int:
    """The most unique blocks whose plan keeps unique block parameters within cfg.target_params."""
    n = structure.blocks.num_blocks
    for g in range(n, 0, -1):
        plan = SharingPlan(n, [[b for b in range(n) if b % g == k] for k in range(g)], cfg.share)
        if plan_fraction(model, plan, cfg, structure) <= cfg.target_params + 1e-9:
            return g
    one = plan_fraction(model, SharingPlan(n, [list(range(n))], cfg.share), cfg, structure)
    raise TritpressError(f"--target-params {cfg.target_params} cannot be met: sharing every block "
                         f"(--share {cfg.share}, relax rank {cfg.relax_rank}) keeps {one:.3f} of the block parameters")


def _linkage(groups: list[list[int]], costs) -> float:
    return sum(max((costs[i][j] for i in g for j in g if i < j), default=0.0) for g in groups)


def refine_by_swaps(model, plan: SharingPlan, measured: dict, costs, cfg: SharingConfig, cal: Calibration,
                    structure) -> list[dict]:
    """Local search at a fixed budget: swap two blocks of different groups (same group sizes,
    so the same unique parameters), most promising swaps first by the pair costs; keep a swap
    when the MEASURED loss drops. At most cfg.auto_refine ties are measured. Returns the
    measured rows and the best row (`measured` when no swap helped)."""
    groups = [list(g) for g in plan.groups]
    best, best_loss, rows, evals = measured, measured["loss_after_tying"], [], 0
    tried = {tuple(map(tuple, sorted(groups)))}  # swapping two singletons gives the same plan back
    while evals < cfg.auto_refine:
        swaps = []
        for ga in range(len(groups)):
            for gb in range(ga + 1, len(groups)):
                for a in groups[ga]:
                    for b in groups[gb]:
                        new = [list(g) for g in groups]
                        new[ga] = sorted(x if x != a else b for x in new[ga])
                        new[gb] = sorted(x if x != b else a for x in new[gb])
                        key = tuple(map(tuple, sorted(new)))
                        if key not in tried:
                            swaps.append((_linkage(new, costs), key, sorted(new)))
        if not swaps:
            break
        improved = False
        for _, key, new in sorted(swaps)[: cfg.auto_refine - evals]:
            tried.add(key)
            evals += 1
            row = measure_plan(model, SharingPlan(plan.num_blocks, new, plan.share, "auto"), "refined", cfg, cal,
                               structure)
            rows.append(row)
            if row["loss_after_tying"] < best_loss:
                best_loss, groups, improved, best = row["loss_after_tying"], new, True, row
                break
        if not improved:
            break
    return rows, best


def probe_candidates(model: nn.Module, rows: list[dict], probe: Callable[[nn.Module], nn.Module],
                     cfg: SharingConfig, cal: Calibration, structure) -> tuple[dict, list[dict]]:
    """Rank candidate plans by what fine-tuning makes of them: each distinct plan (best after
    tying first, at most cfg.auto_probe_top, 0 = all) is tied, fine-tuned by `probe` (a short
    ternary QAT run) and measured on the calibration data. -> (best row, probed rows)."""
    seen, picked = set(), []
    for row in sorted(rows, key=lambda r: r["loss_after_tying"]):
        key = tuple(map(tuple, sorted(row["groups"])))
        if key not in seen:
            seen.add(key)
            picked.append(row)
    picked = picked[: cfg.auto_probe_top or None]
    for row in picked:
        t = time.perf_counter()
        plan = SharingPlan(structure.blocks.num_blocks, row["groups"], cfg.share, "auto")
        tied, _ = apply_sharing(copy.deepcopy(model), plan, cfg, structure)
        row["loss_after_probe"] = round(cal.loss(probe(tied)), 6)
        row["probe_s"] = round(time.perf_counter() - t, 2)
    return min(picked, key=lambda r: r["loss_after_probe"]), picked


def auto_plan(model: nn.Module, cal: Calibration, cfg: SharingConfig, structure: ModelStructure | None = None,
              analysis: dict | None = None, probe: Callable[[nn.Module], nn.Module] | None = None
              ) -> tuple[SharingPlan, dict]:
    """Choose groups by the measured calibration-loss increase.

    --target-params F: the greedy plan (pairs merged by measured cost) and every fixed pattern
    with the same number of unique blocks are tied and measured; the lowest loss wins, so auto
    is never worse than the best fixed pattern at that budget (on the calibration data), and
    the winner is refined by measured block swaps. With `probe` (a short fine-tune, see
    cfg.auto_probe_steps) these candidates are then ranked by their loss AFTER fine-tuning: a
    plan that ties badly may train well, and the loss right after tying does not always say.
    --max-loss-increase D alone: merge greedily while the measured increase stays <= D."""
    structure = structure or discover(model)
    n = structure.blocks.num_blocks
    if analysis is None or analysis.get("loss_increase") is None:
        analysis = analyze(model, cal, cfg, structure, strategies=False)
    costs = _pair_costs(analysis)
    if cfg.target_params:
        g = groups_for_target(model, cfg, structure)
        greedy = next((gs for gs in greedy_merges(costs) if len(gs) <= g), [[b] for b in range(n)]) \
            if g < n else [[b] for b in range(n)]
        candidates = {"greedy": SharingPlan(n, greedy, cfg.share, "auto"), **fixed_plans(n, g, cfg.share)}
        rows = [measure_plan(model, p, name, cfg, cal, structure) for name, p in candidates.items()]
        best = min(rows, key=lambda r: r["loss_after_tying"])
        refined, best = refine_by_swaps(model, SharingPlan(n, best["groups"], cfg.share, "auto"), best, costs, cfg,
                                        cal, structure)
        rows += refined
        findings = {"mode": "target_params", "target_params": cfg.target_params, "unique_blocks": g}
        if probe is not None:
            # the initial candidates (greedy + every fixed pattern) and the refined best
            best, probed = probe_candidates(model, rows[: len(candidates)] + [best], probe, cfg, cal, structure)
            findings["ranked_by"] = f"calibration loss after {cfg.auto_probe_steps} fine-tuning steps"
            findings["probed"] = [{k: r[k] for k in ("strategy", "groups", "loss_after_tying", "loss_after_probe",
                                                     "probe_s")} for r in probed]
        else:
            findings["ranked_by"] = "calibration loss right after tying"
        plan = SharingPlan(n, best["groups"], cfg.share, "auto")
        findings.update(chosen=best["strategy"], candidates=rows)
        if cfg.max_loss_increase and best["loss_increase"] > cfg.max_loss_increase:
            findings["warning"] = (f"the best plan at this budget raises the calibration loss by "
                                   f"{best['loss_increase']:.4f} > --max-loss-increase {cfg.max_loss_increase}")
        return plan, findings
    plan, rows = SharingPlan(n, [[b] for b in range(n)], cfg.share, "auto"), []
    for groups in greedy_merges(costs):
        candidate = SharingPlan(n, groups, cfg.share, "auto")
        row = measure_plan(model, candidate, f"greedy {len(groups)}", cfg, cal, structure)
        rows.append(row)
        if row["loss_increase"] > cfg.max_loss_increase:
            break
        plan = candidate
    return plan, {"mode": "max_loss_increase", "max_loss_increase": cfg.max_loss_increase,
                  "unique_blocks": plan.num_unique, "steps": rows}


def analyze_model(spec: str, cfg: SharingConfig, out_dir, config: str | None = None,
                  trust_pickle: bool = False) -> tuple[dict, list[str]]:
    """Load MODEL, calibrate on cfg.data, analyze, write the outputs. -> (result, files)."""
    from tritpress.compressor.fileio import refuse_overwrite_input
    from tritpress.compressor.ingest import load_model
    from tritpress.compressor.sharing_stage import calibration_for

    refuse_overwrite_input([Path(out_dir) / "analysis.json"], [spec, config])
    loaded = load_model(spec, config, trust_pickle)
    structure = discover(loaded.model)
    if structure.blocks is None:
        raise TritpressError("cannot analyze: no stack of repeated blocks (or stacked LSTM/GRU layers) found")
    cal = calibration_for(loaded.model, loaded.tokenizer, cfg, cfg.data, structure)
    result = analyze(loaded.model, cal, cfg, structure, measure_pairs=cfg.auto_pairs > 0)
    result["model"] = spec
    return result, write_outputs(result, out_dir)
