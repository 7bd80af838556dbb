"""Quantizer math: plain functions over tensors, no modules.

Ternary weights are `codes * scale` with codes in {-1, 0, +1} (int8) and one
scale per tensor or per output channel (row 0 of the weight is output
channel 0, for Linear, Embedding and RNN weights alike).
"""
from __future__ import annotations

import torch

from .fused import fusable
from .settings import GRANULARITIES, TERNARY_METHODS  # declared with TernaryConfig, torch-free

EPS = 1e-5


def _reduce_abs_mean(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    a = w.abs()
    if per_channel:
        return a.reshape(a.shape[0], -1).mean(dim=1)
    return a.mean().reshape(1)


def _expand(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [1] or [rows] scale against a weight of any rank; a [rows, groups] scale (one per
    group of consecutive values of a row) is repeated over its group."""
    if scale.numel() == 1:
        return scale.reshape([1] * like.dim())
    if scale.dim() == 2:
        return scale.repeat_interleave(like.shape[-1] // scale.shape[1], dim=1)
    return scale.reshape([-1] + [1] * (like.dim() - 1))


def ternary_absmean(w: torch.Tensor, per_channel: bool = False, dtype=torch.int8):
    """BitNet b1.58: alpha = mean|W|, codes = clamp(round(W / (alpha + eps)), -1, 1)."""
    w = w.detach().float()
    alpha = _reduce_abs_mean(w, per_channel)
    codes = torch.clamp(torch.round(w / (_expand(alpha, w) + EPS)), -1, 1)
    return codes.to(dtype), alpha


def ternary_twn(w: torch.Tensor, per_channel: bool = False, dtype=torch.int8):
    """Ternary Weight Networks: delta = 0.7 mean|W|; alpha = mean of |w| over |w| > delta."""
    w = w.detach().float()
    delta = 0.7 * _reduce_abs_mean(w, per_channel)
    mask = w.abs() > _expand(delta, w)
    kept = (w.abs() * mask)
    if per_channel:
        n = mask.reshape(w.shape[0], -1).sum(dim=1)
        s = kept.reshape(w.shape[0], -1).sum(dim=1)
    else:
        n = mask.sum().reshape(1)
        s = kept.sum().reshape(1)
    alpha = torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s))
    codes = torch.sign(w) * mask
    return codes.to(dtype), alpha


def quantize_ternary(w: torch.Tensor, method: str = "absmean", granularity: str = "tensor", dtype=torch.int8):
    """-> (codes in {-1, 0, 1} as `dtype`, float32 scales). A float `dtype` saves the QAT forward
    two conversions per weight."""
    if method not in TERNARY_METHODS:
        raise ValueError(f"unknown ternary method {method!r} (choose from {', '.join(TERNARY_METHODS)})")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r} (choose from {', '.join(GRANULARITIES)})")
    fn = ternary_absmean if method == "absmean" else ternary_twn
    return fn(w, per_channel=granularity == "channel", dtype=dtype)


def quantize_rows(w: torch.Tensor, bits: int, dtype=torch.int8):
    """Symmetric absmax integer quantization, one scale per row (int8: [-127, 127], int4: [-7, 7])."""
    if bits not in (4, 8):
        raise ValueError(f"row quantization supports 4 or 8 bits, not {bits}")
    w = w.detach().float()
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = absmax / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / _expand(safe, w)), -qmax, qmax)
    return codes.to(dtype), scale


def quantize_int2_rows(w: torch.Tensor, dtype=torch.int8):
    """2-bit codes in {-2, -1, 0, 1} with one signed scale per row: value = code * scale.

    Why this grid: it is two's-complement int2, which is exactly ONNX's INT2 (DequantizeLinear)
    and MatMulNBits' 2-bit codes with zero point 2, so export adds no op and stays bit-exact;
    zero is a level, so zero rows (padding) and exact zeros stay zero; value = code * scale
    like every other integer format. Its one asymmetry is turned into a per-row choice: the
    scale's sign puts the lone level -2 on the side of the row's larger magnitude. The
    magnitude is the row's RMS, near the MSE optimum of this grid for bell-shaped rows
    (Gaussian rows: MSE 0.146 sigma^2, vs 0.219 with absmax / 2 and 0.262 for absmean ternary;
    the zero-free symmetric grid {+-1, +-3} * sigma / 2 reaches 0.118 but needs a half-integer
    zero point that neither ONNX path has)."""
    w = w.detach().float()
    rows = w.reshape(w.shape[0], -1)
    rms = rows.pow(2).mean(dim=1).sqrt()
    scale = torch.where(rows.amax(dim=1) > -rows.amin(dim=1), -rms, rms)
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / _expand(safe, w)), -2, 1)
    return codes.to(dtype), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    # scaled in place: one float tensor the size of the weight, not two (a 49k-row head is 113 MB each)
    return codes.to(dtype, copy=True).mul_(_expand(scale.to(dtype), codes))


class _StraightThrough(torch.autograd.Function):
    """Forward returns the precomputed `q`; backward passes the gradient to `w` unchanged.
    One node instead of the sub/detach/add chain of `w + (q - w).detach()`."""

    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste(w: torch.Tensor, q: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Straight-through estimator with warm-up: forward sees w + lam*(q - w), gradient flows to w."""
    q = q.detach()
    if lam != 1.0:
        q = torch.lerp(w.detach(), q, lam)
    return _StraightThrough.apply(w, q)


def quantize_activations_int8(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Per-token absmax int8 fake quantization (W1.58A8): s = 127 / max|x| over the last dim.
    `lam` blends it in during warm-up, like the weights."""
    return ste(x, int8_token_values(x.detach()), lam)


@fusable
def int8_token_values(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 255 levels per token (last dim): round(x * s) / s with s = 127 / max|x|."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return torch.clamp(torch.round(x * s), -128, 127) / s
