"""Cross-layer parameter sharing: several blocks of the stack use one stored weight.

    plan = plan_groups(num_blocks, SharingConfig(strategy="cycle", unique=3))   # pure
    model, findings = apply_sharing(model, plan, SharingConfig(init="average"))

A tie is real: every member block's Linear holds the SAME nn.Parameter, so there is one
storage in memory, one set of gradients in training, one ternary QTensor after `convert` and
one tensor in the packed checkpoint (its tie map lists the other occurrences).

What is cheap stays per occurrence: biases and norms are not touched, and every occurrence of
a shared matrix is wrapped in `SharedLinear`, which holds its own scalar `gain` (the
per-occurrence scale: the ternary weight an occurrence uses is gain * scale * codes) and,
with `relax_rank` r > 0, its own low-rank correction B @ A (r * (in + out) floats),
initialized from a truncated SVD of (original - gain * shared). Both count in every size
figure: they are ordinary parameters of the model.

Stacked LSTM/GRU layers share their weight_ih/weight_hh matrices directly (no wrapper: an
RNN layer has no per-occurrence scale or relaxation here).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TritpressError
from .settings import INITS, SHARE_KINDS, STRATEGIES, SharingConfig  # re-exported: torch-free home
from .structure import ModelStructure, discover, is_conv1d, is_linear, set_submodule

@dataclass
class SharingPlan:
    """Every block in exactly one group; a group with one member is an unshared block."""

    num_blocks: int
    groups: list[list[int]]
    share: str = "all"
    strategy: str = "groups"

    @property
    def tied(self) -> list[list[int]]:
        return [g for g in self.groups if len(g) > 1]

    @property
    def num_unique(self) -> int:
        return len(self.groups)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return ";".join(",".join(map(str, g)) for g in self.groups)


# ------------------------------------------------------------------ plans (pure)


def _from_assignment(n: int, unique_of: list[int], share: str, strategy: str) -> SharingPlan:
    groups: dict[int, list[int]] = {}
    for block, u in enumerate(unique_of):
        groups.setdefault(u, []).append(block)
    return SharingPlan(n, sorted(groups.values()), share, strategy)


def parse_groups(spec: str, n: int) -> list[list[int]]:
    """"0,2,4;1,3,5" or a JSON file holding [[0,2,4],[1,3,5]] -> validated groups (the blocks not
    named stay alone)."""
    if spec.endswith(".json"):
        try:
            raw = json.loads(Path(spec).read_text())
        except FileNotFoundError:
            raise TritpressError(f"no such sharing groups file: {spec}") from None
        except json.JSONDecodeError as e:
            raise TritpressError(f"sharing groups file {spec} is not valid JSON: {e}") from None
        if isinstance(raw, dict):
            raw = raw.get("groups")
        if not isinstance(raw, list) or not all(isinstance(g, list) for g in raw):
            raise TritpressError(f"sharing groups file {spec} must hold a list of lists of block indices")
    else:
        try:
            raw = [[int(x) for x in part.split(",") if x.strip()] for part in spec.split(";") if part.strip()]
        except ValueError:
            raise TritpressError(f"cannot read sharing groups {spec!r}: write them like \"0,2,4;1,3,5\"") from None
    seen: set[int] = set()
    for g in raw:
        for b in g:
            if not isinstance(b, int) or isinstance(b, bool):
                raise TritpressError(f"sharing groups: {b!r} is not a block index")
            if not 0 <= b < n:
                raise TritpressError(f"sharing groups: block {b} is out of range (the stack has {n} blocks, 0-{n - 1})")
            if b in seen:
                raise TritpressError(f"sharing groups: block {b} is in more than one group")
            seen.add(b)
    groups = [sorted(g) for g in raw if g] + [[b] for b in range(n) if b not in seen]
    return sorted(groups)


def plan_groups(n: int, cfg: SharingConfig) -> SharingPlan:
    """The groups of a fixed strategy for a stack of n blocks (`auto` needs a model: see auto_plan)."""
    if n < 1:
        raise TritpressError("the model has no block stack to share")
    s = cfg.strategy
    k = cfg.unique or max(1, (n + 1) // 2)
    if s in ("cycle", "sequence", "middle-cycle") and not 1 <= k <= n:
        raise TritpressError(f"sharing {s}: unique={k} must be between 1 and the {n} blocks")
    if s == "none":
        return SharingPlan(n, [[i] for i in range(n)], cfg.share, s)
    if s == "alternate":  # even blocks share one set, odd blocks another
        return _from_assignment(n, [i % 2 for i in range(n)], cfg.share, s)
    if s == "sequential":  # blocks i, i+N, i+2N... share
        if cfg.every > n:
            raise TritpressError(f"sharing sequential: every={cfg.every} is more than the {n} blocks")
        return _from_assignment(n, [i % cfg.every for i in range(n)], cfg.share, s)
    if s == "cycle":  # 1,2,3,1,2,3: K unique blocks looped
        return _from_assignment(n, [i % k for i in range(n)], cfg.share, s)
    if s == "sequence":  # 1,1,2,2,3,3: each unique block repeated back to back
        return _from_assignment(n, [i * k // n for i in range(n)], cfg.share, s)
    if s == "middle-cycle":  # first and last unique, the K-2 others cycled over the middle
        if k < 3 or n < 3:
            raise TritpressError(f"sharing middle-cycle needs unique >= 3 and at least 3 blocks (got unique={k}, {n} blocks)")
        inner = k - 2
        return _from_assignment(n, [0] + [1 + (i % inner) for i in range(n - 2)] + [k - 1], cfg.share, s)
    if s == "groups":
        return SharingPlan(n, parse_groups(cfg.groups, n), cfg.share, s)
    raise TritpressError(f"sharing {s}: the plan depends on the model; use auto_plan(model, ...)")


def fixed_plans(n: int, num_unique: int, share: str) -> dict[str, SharingPlan]:
    """Every fixed pattern with exactly `num_unique` unique blocks (the comparison set for auto).
    sequential with every=K and cycle with unique=K give the same groups; cycle names both."""
    out = {}
    if num_unique == 2:
        out["alternate"] = plan_groups(n, SharingConfig("alternate", share=share))
    for name in ("cycle", "sequence", "middle-cycle"):
        if name == "middle-cycle" and (num_unique < 3 or n < 3):
            continue
        if 1 <= num_unique <= n:
            out[f"{name}:{num_unique}"] = plan_groups(n, SharingConfig(name, unique=num_unique, share=share))
    return out


# ------------------------------------------------------------------ the block matrices


def _kind_of(rel_name: str) -> str:
    """attention or ffn, from the module path inside the block (no per-model tables)."""
    parts = rel_name.lower().split(".")
    return "attention" if any("attn" in p or "attention" in p for p in parts) else "ffn"


def block_stack(model: nn.Module, structure: ModelStructure | None = None):
    structure = structure or discover(model)
    if structure.blocks is None:
        raise TritpressError("cannot share: no stack of repeated blocks (or stacked LSTM/GRU layers) found")
    return structure.blocks


def block_matrices(model: nn.Module, structure: ModelStructure | None, share: str) -> list[dict[str, tuple]]:
    """Per block: {name inside the block: (owner module, attribute)} of the matrices a plan ties.
    Transformer blocks: the Linear/Conv1D weights (wrapped ones included) of the chosen kind.
    RNN layers: weight_ih/weight_hh of layer i (the name drops the layer index)."""
    stack = block_stack(model, structure)
    if stack.kind == "rnn-layers":
        if share != "all":
            raise TritpressError(f"--share {share}: LSTM/GRU layers have no attention/FFN parts; use --share all")
        rnn = model.get_submodule(stack.path)
        out = []
        for i in range(stack.num_blocks):
            names = [n for n in rnn._flat_weights_names if n.startswith("weight_") and
                     re.fullmatch(rf"weight_(ih|hh)_l{i}(_reverse)?", n)]
            out.append({re.sub(rf"_l{i}", "", n): (rnn, n) for n in names})
        return out
    blocks = model.get_submodule(stack.path)
    out = []
    for block in blocks:
        mats = {}
        for name, m in block.named_modules():
            if isinstance(m, SharedLinear):
                m, name = m.inner, f"{name}.inner"
            elif name.endswith(".inner") or not is_linear(m):
                continue
            if share == "all" or _kind_of(name) == share:
                mats[name] = (m, "weight")
        out.append(mats)
    if not out[0]:
        raise TritpressError(f"--share {share}: the blocks have no such matrices")
    return out


def _as_matrix(owner: nn.Module, attr: str) -> torch.Tensor:
    """[out, in] float view of a weight (GPT-2's Conv1D stores [in, out])."""
    w = getattr(owner, attr).detach().float()
    return w.t() if is_conv1d(owner) else w


def _check_shapes(mats: list[dict], group: list[int]) -> None:
    first = mats[group[0]]
    for b in group[1:]:
        if set(mats[b]) != set(first):
            raise TritpressError(f"blocks {group[0]} and {b} cannot share: they hold different matrices")
        for name, (owner, attr) in mats[b].items():
            a, s = tuple(getattr(first[name][0], first[name][1]).shape), tuple(getattr(owner, attr).shape)
            if a != s:
                raise TritpressError(f"blocks {group[0]} and {b} cannot share {name}: shapes {list(a)} and {list(s)} "
                                     "differ")


def check_plan(model: nn.Module, plan: SharingPlan, structure: ModelStructure | None = None) -> None:
    """Refuse a plan that does not fit the model (wrong block count, shapes that differ)."""
    stack = block_stack(model, structure)
    if plan.num_blocks != stack.num_blocks:
        raise TritpressError(f"the sharing plan is for {plan.num_blocks} blocks, the model has {stack.num_blocks}")
    members = sorted(b for g in plan.groups for b in g)
    if members != list(range(stack.num_blocks)):
        raise TritpressError("the sharing plan must name every block exactly once")
    mats = block_matrices(model, structure, plan.share)
    for g in plan.tied:
        _check_shapes(mats, g)


# ------------------------------------------------------------------ the shared occurrence


class SharedLinear(nn.Module):
    """One occurrence of a (possibly) shared Linear: inner(gain * x) + B @ A @ x.

    `inner` is the Linear (later FakeQuantLinear, QLinear) whose weight Parameter is shared
    with the other members of the group; its bias is this occurrence's own. Scaling the input
    by `gain` scales the matrix product only, not the bias, and per-token int8 activation
    quantization is invariant to it."""

    def __init__(self, inner: nn.Module, rank: int = 0, in_features: int = 0, out_features: int = 0):
        super().__init__()
        self.inner = inner
        self.gain = nn.Parameter(torch.ones(1))
        self.rank = rank
        if rank:
            self.lora_a = nn.Parameter(torch.zeros(rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x):
        y = self.inner(x * self.gain.to(x.dtype))
        if self.rank:
            y = y + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y

    @property
    def weight(self) -> torch.Tensor:
        """The shared matrix this occurrence scales (`inner.weight`, not a copy): model code that
        reads a Linear's `.weight` (T5's feed-forward casts its input to `wo.weight.dtype`) runs."""
        return self.inner.weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def _initial(ws: list[torch.Tensor], init: str, position: float) -> tuple[torch.Tensor, int | None]:
    """Shared value of one matrix for a group -> (value, index of the member it copies or None)."""
    stack = torch.stack(ws)
    mean = stack.mean(0)
    if init == "average":
        return mean, None
    if init == "closest":
        i = int(((stack - mean) ** 2).flatten(1).sum(1).argmin())
    else:  # stepwise: the member at this group's evenly spaced position
        i = min(range(len(ws)), key=lambda j: abs(j - position * (len(ws) - 1)))
    return ws[i].clone(), i


def _stepwise_positions(groups: list[list[int]], n: int) -> dict[int, float]:
    """Relaxed Recursive Transformers' stepwise init picks layers linspace(0, L-1, K): group g (in
    order of first member) takes the member nearest to the g-th evenly spaced layer."""
    tied = [g for g in groups if len(g) > 1]
    out = {}
    for gi, g in enumerate(sorted(tied)):
        target = gi * (n - 1) / max(1, len(tied) - 1) if len(tied) > 1 else (n - 1) / 2
        nearest = min(range(len(g)), key=lambda j: abs(g[j] - target))
        out[id(g)] = nearest / max(1, len(g) - 1)
    return out


@torch.no_grad()
def apply_sharing(model: nn.Module, plan: SharingPlan, cfg: SharingConfig | None = None,
                  structure: ModelStructure | None = None, tied_only: bool = False) -> tuple[nn.Module, dict]:
    """Tie the plan's groups in place: one nn.Parameter per group and matrix, initialized by
    cfg.init; per-occurrence gain (and low-rank correction with cfg.relax_rank). Returns
    (model, findings: unique parameters before/after, per-group init error). `tied_only`
    leaves the blocks of one-member groups untouched (not wrapped; a wrapper there computes the
    same numbers): the analysis ties copies of just the tied blocks inside the original model."""
    cfg = cfg or SharingConfig()
    structure = structure or discover(model)
    check_plan(model, plan, structure)
    stack = structure.blocks
    before = unique_params(model)
    block_before = _stack_params(model, stack)
    if not plan.tied:
        return model, {"plan": plan.to_dict(), "unique_params_before": before, "unique_params_after": before,
                       "block_params_before": block_before, "block_params_after": block_before,
                       "unique_block_fraction": 1.0, "groups": []}
    rnn = stack.kind == "rnn-layers"
    if rnn and cfg.relax_rank:
        raise TritpressError("--relax-rank applies to transformer blocks; LSTM/GRU layers share strictly")
    mats = block_matrices(model, structure, plan.share)
    positions = _stepwise_positions(plan.groups, plan.num_blocks)
    report = []
    for g in (plan.tied if tied_only else plan.groups):
        for name in mats[g[0]]:
            paths = None if rnn else [f"{stack.path}.{b}.{name}" for b in g]
            errors, copied = tie_occurrences(model, [mats[b][name] for b in g], paths, cfg, positions.get(id(g), 0.0))
            if len(g) > 1:
                report.append({"group": g, "matrix": name, "copied_member": None if copied is None else g[copied],
                               "relative_error": [round(e, 5) for e in errors]})
    after = unique_params(model)
    block_after = _stack_params(model, stack)
    return model, {"plan": plan.to_dict(), "init": cfg.init, "relax_rank": cfg.relax_rank,
                   "unique_params_before": before, "unique_params_after": after,
                   "block_params_before": block_before, "block_params_after": block_after,
                   "unique_block_fraction": round(block_after / block_before, 5), "groups": report}


def tie_occurrences(model: nn.Module, owners: list[tuple], paths: list[str] | None, cfg: SharingConfig,
                    position: float = 0.0) -> tuple[list[float], int | None]:
    """Tie the matrices `owners` ((module, attribute) each) to one new Parameter initialized by
    cfg.init; each occurrence at `paths` (module paths of the Linears; None: RNN weights, no
    wrapper) gets its SharedLinear gain (and low-rank correction). One owner: wrapped only.
    -> (relative error of each occurrence after its gain, index of the member copied or None)."""
    ws = [_as_matrix(o, a) for o, a in owners]
    shared, copied = _initial(ws, cfg.init, position)
    if len(owners) > 1:
        native = shared.t() if is_conv1d(owners[0][0]) else shared
        first = getattr(owners[0][0], owners[0][1])
        param = nn.Parameter(native.to(first.dtype).contiguous(), requires_grad=first.requires_grad)
        for owner, attr in owners:
            setattr(owner, attr, param)
    errors = []
    for i, w in enumerate(ws):
        gain = float((w * shared).sum() / (shared * shared).sum().clamp(min=1e-12)) if len(owners) > 1 else 1.0
        residual = w - gain * shared
        if paths is not None:
            _wrap_occurrence(model, paths[i], gain, residual, cfg.relax_rank)
        if len(owners) > 1:
            errors.append(float(residual.norm() / w.norm().clamp(min=1e-12)))
    return errors, copied


def _wrap_occurrence(model, path, gain, residual, rank):
    """Put a SharedLinear around the Linear at `path`."""
    if path.endswith(".inner"):  # already wrapped by an earlier call: update in place
        wrapper = model.get_submodule(path[:-len(".inner")])
    else:
        inner = model.get_submodule(path)
        out_f, in_f = residual.shape
        wrapper = SharedLinear(inner, rank, in_f, out_f)
        set_submodule(model, path, wrapper)
    wrapper.gain.fill_(gain)
    if rank and wrapper.rank:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        wrapper.lora_b.zero_()
        wrapper.lora_a.zero_()
        wrapper.lora_b[:, :r] = u[:, :r] * root
        wrapper.lora_a[:r] = root[:, None] * vh[:r]


def unique_params(model: nn.Module) -> int:
    """Parameters stored once each (parameters() skips the aliases of a tied tensor)."""
    return sum(p.numel() for p in model.parameters())


def _stack_params(model: nn.Module, stack) -> int:
    return unique_params(model.get_submodule(stack.path))


def sharing_meta(model: nn.Module) -> dict | None:
    """What load_packed needs to rebuild the SharedLinear wrappers on a fresh skeleton."""
    wrapped = {name: {"rank": m.rank, "shape": [m.lora_b.shape[0], m.lora_a.shape[1]] if m.rank else None}
               for name, m in model.named_modules() if isinstance(m, SharedLinear)}
    return {"wrapped": wrapped} if wrapped else None


def rebuild_wrappers(model: nn.Module, meta: dict) -> None:
    """Wrap the named modules of a fresh skeleton as they were when the checkpoint was saved."""
    for name, entry in meta.get("wrapped", {}).items():
        inner = model.get_submodule(name)
        out_f, in_f = entry["shape"] if entry["rank"] else (0, 0)
        set_submodule(model, name, SharedLinear(inner, entry["rank"], in_f, out_f))


def plan_fraction(model: nn.Module, plan: SharingPlan, cfg: SharingConfig,
                  structure: ModelStructure | None = None) -> float:
    """Unique block parameters after / before tying with this plan, without tying anything."""
    structure = structure or discover(model)
    stack = structure.blocks
    mats = block_matrices(model, structure, plan.share)
    before = _stack_params(model, stack)
    tied = sum(getattr(o, a).numel() for o, a in mats[0].values())
    extra = 0
    if stack.kind != "rnn-layers" and plan.tied:
        per_block = sum(1 + cfg.relax_rank * sum(_as_matrix(o, a).shape) for o, a in mats[0].values())
        extra = per_block * stack.num_blocks
    after = before - tied * (stack.num_blocks - plan.num_unique) + extra
    return after / before

