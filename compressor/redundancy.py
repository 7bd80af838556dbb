"""Redundancy measures of a block stack on calibration data: which blocks could share weights.

Per block: Block Influence (ShortGPT: 1 - mean cosine between a block's input and output
tokens). Per pair of blocks: linear CKA (Kornblith et al. 2019) and angular distance
(arccos(cos)/pi on the last token, arXiv 2403.17887) between block outputs, cosine
similarity of the weights per matrix type, and the ground truth: the calibration-loss
increase measured when the pair is actually tied (share.apply_sharing, with the chosen
initialization). Cosine-type scores correlate only moderately with that increase, so `auto`
(redundancy_auto.py) decides by the measured numbers. The outputs of `compress analyze`
(analysis.json, the text table, PNG heatmaps) are drawn by analyzers/redundancy.py.

Calibration loss: next-token NLL for causal LMs; for encoders (no LM loss), the normalized
MSE of the output against the original model's output (0 for the original itself).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TritpressError
from .modelio import BlockOutputs, ModelIO, batched_forward, device_of, held_out_loss
from .share import (SharingConfig, SharingPlan, _as_matrix, apply_sharing, block_matrices, fixed_plans,
                    plan_fraction, plan_groups)
from .structure import ModelStructure, discover

MAX_CKA_TOKENS = 4096


@dataclass
class Calibration:
    """Calibration sequences and what the original model does on them."""

    io: ModelIO
    ids: torch.Tensor               # [N, seq_len] token ids
    reference: list[torch.Tensor]   # the original's main output per batch (encoders)
    base_loss: float
    batch: int = 8
    replay: "BlockReplay | None" = None   # the original's block outputs (ties measured from their first block)
    dtype: str = "fp32"             # every forward of the analysis: fp32, or bf16 autocast

    @classmethod
    def build(cls, model: nn.Module, ids: torch.Tensor, structure: ModelStructure | None = None,
              batch: int = 8, dtype: str = "fp32") -> "Calibration":
        structure = structure or discover(model)
        io = ModelIO.discover(model, structure)
        model.eval()
        cal = cls(io, ids, [], 0.0, batch, dtype=dtype)
        stack = structure.blocks
        if stack is not None and stack.kind == "modulelist" and not io.next_token_only:
            cal.replay = BlockReplay(model, stack.path, stack.num_blocks)
        # one pass: an encoder's reference outputs (its loss against them is 0 by definition), or an LM's NLL
        with torch.no_grad(), cal.replay.recording() if cal.replay else contextlib.nullcontext():
            if io.causal:
                cal.base_loss = cal.loss(model)
            else:
                with cal.precision():
                    cal.reference = [out.float() for _, out in batched_forward(io, model, ids, batch)]
        return cal

    def precision(self):
        """bf16 autocast for the forwards when asked for (the reference, the base and every tied
        loss alike, so that an increase compares like with like)."""
        if self.dtype == "bf16":
            return torch.autocast(self.ids.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, model: nn.Module) -> float:
        with self.precision():
            return held_out_loss(self.io, model, self.ids, self.reference, self.batch)

    @property
    def metric(self) -> str:
        return "nll" if self.io.causal else "nmse_to_original"


class BlockReplay:
    """The original model's output of every block on each calibration batch. Tying blocks
    changes nothing before the first tied block k, so a tie is measured by replaying the
    recorded outputs of blocks 0..k-1 and running blocks k..n-1 only: a pair (i, j) costs
    (n-i)/n of a forward, and only the tied blocks are copied, never the model. The numbers are
    the same as a full forward of a tied copy (test_share.py)."""

    def __init__(self, model: nn.Module, path: str, num_blocks: int):
        self.model, self.path = model, path
        self.outputs: list[list] = [[] for _ in range(num_blocks)]   # [block][batch], as the block returned it

    def blocks(self) -> nn.Module:
        return self.model.get_submodule(self.path)

    @contextlib.contextmanager
    def recording(self):
        def keep(k):
            return lambda module, args, output: self.outputs[k].append(output)
        handles = [b.register_forward_hook(keep(k)) for k, b in enumerate(self.blocks())]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def skipping(self, start: int):
        """Blocks before `start` return their recorded outputs, batch after batch."""
        skipped = list(self.blocks())[:start]
        saved = [b.__dict__.get("forward") for b in skipped]
        for b, outs in zip(skipped, self.outputs):
            b.forward = _replayer(outs)
        try:
            yield
        finally:
            for b, f in zip(skipped, saved):
                del b.forward
                if f is not None:
                    b.forward = f

    def tied_loss(self, plan: SharingPlan, cfg: SharingConfig, cal: "Calibration",
                  structure: ModelStructure) -> float:
        """Calibration loss with `plan` tied on copies of its tied blocks, put in place and taken out."""
        blocks = self.blocks()
        members = sorted(b for g in plan.tied for b in g)
        originals = {b: blocks[b] for b in members}
        try:
            for b in members:
                blocks[b] = copy.deepcopy(originals[b])
            apply_sharing(self.model, plan, cfg, structure, tied_only=True)
            with self.skipping(members[0]):
                return cal.loss(self.model)
        finally:
            for b, original in originals.items():
                blocks[b] = original


def _replayer(outputs: list):
    batches = iter(outputs)
    return lambda *args, **kwargs: next(batches)


# `--share-calib-dtype auto` runs the analysis in bf16 when its fp32 forwards would add up to at least
# this many FLOPs (about 2 minutes at the ~185 GFLOP/s two cores multiply fp32 at) and the CPU multiplies
# bf16 natively: there bf16 is 1.6-3.4x faster and ranks the ties alike (docs/sharing.md), below it the
# exact fp32 numbers cost little.
AUTO_BF16_FLOPS = 20e12


def analysis_flops(model: nn.Module, structure: ModelStructure, tokens: int, cfg: SharingConfig) -> float:
    """Matrix-product FLOPs of the analysis' forwards, estimated from the stack's parameters: the
    build and activation passes, each measured pair from its first block on (replay), the strategies.
    When --share-pairs caps the pairs, the costliest ones are counted (the analysis measures the most
    weight-similar ones): an upper bound."""
    stack = structure.blocks
    n = stack.num_blocks if stack is not None else 1
    pairs = [(n - i) / n for i in range(n) for _ in range(i + 1, n)]
    measured = sorted(pairs, reverse=True)[:max(0, cfg.auto_pairs)]
    passes = 2 + sum(measured) + (4 if cfg.analyze else 0)
    params = sum(p.numel() for p in model.get_submodule(stack.path).parameters()) if stack is not None else 0
    return 2.0 * params * tokens * passes


def resolve_calib_dtype(model: nn.Module, structure: ModelStructure, ids: torch.Tensor, cfg: SharingConfig) -> str:
    """cfg.calib_dtype, with `auto` decided: bf16 on a CPU with native bf16 matrix products when
    the fp32 analysis would cost >= AUTO_BF16_FLOPS, fp32 otherwise (GPUs: fp32, it is fast there)."""
    if cfg.calib_dtype != "auto":
        return cfg.calib_dtype
    on_cpu = device_of(model).type == "cpu" and ids.device.type == "cpu"
    native = on_cpu and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native and analysis_flops(model, structure, ids.numel(), cfg) >= AUTO_BF16_FLOPS else "fp32"


CALIBRATION_POOL_TOKENS = 1 << 20


def calibration_ids(spec: str, tokenizer, model: nn.Module, sequences: int, seq_len: int) -> torch.Tensor:
    """[sequences, seq_len] token ids from the validation split of DATA (a file is used as is),
    spread evenly over the text (its first 2^20 tokens, or 32x what is needed if more): the
    first N consecutive blocks come from a handful of documents, and plans ranked on them did
    not keep their order on other text (docs/sharing.md)."""
    from tritpress.compressor.data import lm_blocks, read_texts, token_vocab_size, tokenizer_fn

    seq_len = calibration_seq_len(model, seq_len)
    texts = read_texts(spec, "validation")
    encode = tokenizer_fn(tokenizer, texts, token_vocab_size(model))
    pool = lm_blocks(texts, encode, seq_len, max(CALIBRATION_POOL_TOKENS, 32 * sequences * seq_len))
    return spread_blocks(pool, sequences)


def calibration_seq_len(model: nn.Module, seq_len: int) -> int:
    """--share-seq-len, capped at the positions the model has (a 64-position model fed the
    default 128 tokens fails inside its embedding)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
    return min([seq_len] + [v for v in limits if isinstance(v, int) and v > 0])


def example_calibration_ids(features: list[dict], sequences: int, seq_len: int) -> torch.Tensor:
    """[sequences, seq_len] token ids from a task model's examples: their tokens without padding,
    end to end, cut into seq_len blocks spread evenly over the examples. A task model's --data
    holds examples, not text, and the calibration loss is then measured through its own head on
    the inputs it serves (each example keeps its [CLS] ... [SEP] markers inside a block)."""
    stream: list[int] = []
    for f in features:
        mask = f.get("attention_mask")
        stream.extend(i for j, i in enumerate(f["input_ids"]) if mask is None or mask[j])
        if len(stream) >= CALIBRATION_POOL_TOKENS:
            break
    n = len(stream) // seq_len
    if n == 0:
        raise TritpressError(f"sharing calibration: the training examples hold {len(stream)} tokens, "
                             f"fewer than one block of --share-seq-len {seq_len}")
    return spread_blocks(torch.tensor(stream[:n * seq_len]).view(n, seq_len), sequences)


def spread_blocks(pool: torch.Tensor, sequences: int) -> torch.Tensor:
    """`sequences` blocks of `pool` evenly spaced from its first to its last (all when fewer)."""
    if len(pool) <= sequences:
        return pool
    return pool[torch.linspace(0, len(pool) - 1, sequences).round().long()]


def tied_loss(model: nn.Module, plan: SharingPlan, cfg: SharingConfig, cal: Calibration,
              structure: ModelStructure | None = None, replay: bool = True) -> float:
    """Calibration loss of `model` with `plan` really tied; `model` is left as it was. With the
    calibration's recorded block outputs of this model, only the tied blocks are copied and the
    blocks before the first one are replayed (`replay=False`: a tied copy of the whole model)."""
    if not plan.tied:
        return cal.loss(model)
    if replay and cal.replay is not None and cal.replay.model is model:
        return cal.replay.tied_loss(plan, cfg, cal, structure or discover(model))
    tied, _ = apply_sharing(copy.deepcopy(model), plan, cfg, structure)
    return cal.loss(tied)


# ------------------------------------------------------------------ activation metrics


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [tokens, features] representations."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    xty = (x.t() @ y).pow(2).sum()
    return float(xty / ((x.t() @ x).pow(2).sum().sqrt() * (y.t() @ y).pow(2).sum().sqrt()).clamp(min=1e-12))


def cka_matrix(reps: list[torch.Tensor]) -> list[list[float]]:
    """linear_cka of every pair of [tokens, features] representations, rounded to 5 digits: each
    centred once, its self-term computed once, each cross term once (CKA is symmetric)."""
    centered = [x - x.mean(0, keepdim=True) for x in reps]
    self_norm = [(x.t() @ x).pow(2).sum().sqrt() for x in centered]
    n = len(reps)
    out = [[round(float(self_norm[i] ** 2 / (self_norm[i] ** 2).clamp(min=1e-12)), 5) if i == j else 0.0
            for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            cross = (centered[i].t() @ centered[j]).pow(2).sum()
            out[i][j] = out[j][i] = round(float(cross / (self_norm[i] * self_norm[j]).clamp(min=1e-12)), 5)
    return out


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over sequences of arccos(cos(a, b)) / pi on the last token ([seqs, tokens, dim])."""
    cos = F.cosine_similarity(a[:, -1], b[:, -1], dim=-1).clamp(-1, 1)
    return float((torch.arccos(cos) / math.pi).mean())


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT: 1 - mean over tokens of cos(block input, block output)."""
    return float(1 - F.cosine_similarity(x_in, x_out, dim=-1).mean())


def _forwards(cal: Calibration, model: nn.Module):
    with cal.precision():
        yield from batched_forward(cal.io, model, cal.ids, cal.batch)


@torch.no_grad()
def activation_metrics(model: nn.Module, cal: Calibration, paths: list[str]) -> dict:
    n = len(paths)
    hooks = BlockOutputs(model, paths, inputs=True)
    per_batch_in, per_batch_out = [], []  # [batch][block]
    try:
        for _ in _forwards(cal, model):
            per_batch_in.append(hooks.take_inputs())
            per_batch_out.append(hooks.take())
    finally:
        hooks.remove()
    ins = [torch.cat([b[i].float() for b in per_batch_in]) for i in range(n)]
    outs = [torch.cat([b[i].float() for b in per_batch_out]) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    flat = [o.flatten(0, -2) for o in outs]
    take = torch.randperm(flat[0].shape[0], generator=g)[:MAX_CKA_TOKENS]
    cka = cka_matrix([f[take] for f in flat])
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
                              "base_loss": round(cal.base_loss, 6), "dtype": cal.dtype},
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
