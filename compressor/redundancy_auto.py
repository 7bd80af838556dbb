"""The `auto` sharing decision: choose block groups by the measured calibration-loss increase
of real ties (redundancy.py), refine the winner by measured block swaps, and optionally rank
the candidates by their loss after a short fine-tune (the probe)."""
from __future__ import annotations

import copy
import time
from typing import Callable

from torch import nn

from .errors import TritpressError
from .redundancy import Calibration, analyze, measure_plan
from .share import SharingConfig, SharingPlan, apply_sharing, fixed_plans, plan_fraction
from .structure import ModelStructure, discover


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


def unique_blocks(cfg: SharingConfig, model, structure) -> int:
    """auto:K -> K (refused beyond the stack); else the most unique blocks that fit --target-params."""
    n = structure.blocks.num_blocks
    if not cfg.unique:
        return groups_for_target(model, cfg, structure)
    if cfg.unique > n:
        raise TritpressError(f"--sharing auto:{cfg.unique}: the stack has only {n} blocks")
    return cfg.unique


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

    auto:K (exactly K unique blocks) or --target-params F (the most that fit): the greedy plan
    (pairs merged by measured cost) and every fixed pattern
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
    if cfg.target_params or cfg.unique:
        g = unique_blocks(cfg, model, structure)
        greedy = next((gs for gs in greedy_merges(costs) if len(gs) <= g), [[b] for b in range(n)]) \
            if g < n else [[b] for b in range(n)]
        candidates = {"greedy": SharingPlan(n, greedy, cfg.share, "auto"), **fixed_plans(n, g, cfg.share)}
        rows = [measure_plan(model, p, name, cfg, cal, structure) for name, p in candidates.items()]
        best = min(rows, key=lambda r: r["loss_after_tying"])
        refined, best = refine_by_swaps(model, SharingPlan(n, best["groups"], cfg.share, "auto"), best, costs, cfg,
                                        cal, structure)
        rows += refined
        findings = {"mode": "unique_blocks" if cfg.unique else "target_params", "target_params": cfg.target_params,
                    "unique_blocks": g}
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
