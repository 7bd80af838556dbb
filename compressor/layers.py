"""Modules that hold quantized weights.

Two forms, as in torchao's prepare -> train -> convert:
- fake-quant (`FakeQuantLinear`, `FakeQuantEmbedding`, `FakeQuantRNN`): float
  weights, forward uses w + lam*(q(w) - w) with a straight-through gradient;
- converted (`QLinear`, `QEmbedding`, `QRNN`): integer codes and scales in a
  `QTensor`, no float copy of the weight.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import FLOAT_DTYPES
from .fused import fusable
from .settings import INT_FORMATS, grouped
from .quantize import (_expand, dequantize, quantize_activations_int8, quantize_int2_rows, quantize_rows,
                       quantize_ternary, ste)

CONVERT_SLICE_BYTES = 4 << 20    # float32 bytes of a row-scaled weight quantized at once by convert()
DEQUANT_SLICE_BYTES = 8 << 20    # float bytes of a QLinear weight dequantized at once by its forward


@dataclass(frozen=True)
class WeightFormat:
    """How one weight tensor is represented: ternary, int8/int4/int2 per row, or a float dtype."""

    kind: str                    # ternary | int8 | int4 | int2 | fp32 | fp16 | bf16
    method: str = "absmean"      # ternary only
    granularity: str = "tensor"  # ternary only; int formats always have one scale per row (or per group)
    scale_dtype: str = "fp16"
    group_size: int = 0          # int formats: one scale per this many weights of a row (0: per row)

    @property
    def is_float(self) -> bool:
        return self.kind in FLOAT_DTYPES

    def quantize(self, w: torch.Tensor, dtype=torch.int8):
        """-> (codes as `dtype`, float32 scales already rounded to scale_dtype)."""
        return quantize_format(w, self.kind, self.method, self.granularity, self.scale_dtype, dtype, self.group_size)

    def fake(self, w: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
        """The weight the forward pass sees during QAT (straight-through gradient)."""
        if self.is_float:
            if FLOAT_DTYPES[self.kind] == w.dtype:  # stored as it computes: nothing to round
                return w
            return ste(w, w.detach().to(FLOAT_DTYPES[self.kind]).to(w.dtype), lam)
        with torch.no_grad():
            q = fake_values(w.detach(), self.kind, self.method, self.granularity, self.scale_dtype, self.group_size)
        return ste(w, q, lam)

    @property
    def per_row(self) -> bool:
        """Each row's codes and scale depend on that row alone (int formats, per-channel ternary)."""
        return self.kind in INT_FORMATS or (self.kind == "ternary" and self.granularity == "channel")

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_format(w: torch.Tensor, kind: str, method: str, granularity: str, scale_dtype: str, dtype=torch.int8,
                    group_size: int = 0):
    """WeightFormat.quantize over plain arguments (what a compiled kernel specializes on). An int format
    with a group size whose rows it divides quantizes each group of a row as a row of its own: codes keep
    the weight's shape, scales are [rows, groups]."""
    groups = grouped(w.shape, kind, group_size)
    if groups:
        codes, scale = quantize_format(w.reshape(-1, group_size), kind, method, granularity, scale_dtype, dtype)
        return codes.reshape(w.shape), scale.reshape(w.shape[0], groups)
    if kind == "ternary":
        codes, scale = quantize_ternary(w, method, granularity, dtype)
    elif kind in ("int8", "int4"):
        codes, scale = quantize_rows(w, int(kind[3:]), dtype)
    elif kind == "int2":
        codes, scale = quantize_int2_rows(w, dtype)
    else:
        raise ValueError(f"{kind} is not an integer format")
    return codes, scale.to(FLOAT_DTYPES[scale_dtype]).float()


@fusable
def fake_values(w: torch.Tensor, kind: str, method: str, granularity: str, scale_dtype: str,
                group_size: int = 0) -> torch.Tensor:
    """codes * scale of `w` in an integer format: the values convert() stores, computed with float
    codes (two conversions fewer) and, under fused kernels, in one compiled loop."""
    codes, scale = quantize_format(w, kind, method, granularity, scale_dtype, torch.float32, group_size)
    return (codes * _expand(scale, codes)).to(w.dtype)


class QTensor(nn.Module):
    """Integer codes (int8 tensor, values per format) and float32 scales."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, fmt: WeightFormat):
        super().__init__()
        self.fmt = fmt
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: WeightFormat) -> "QTensor":
        rowwise = fmt.kind != "ternary" or fmt.granularity == "channel"
        if not rowwise or w.numel() * 4 <= CONVERT_SLICE_BYTES or w.dim() < 2:
            return cls(*fmt.quantize(w), fmt)
        # one scale per row: a large table (an embedding) is quantized a slice of rows at a time, the same
        # codes and scales without float temporaries the size of the whole table
        step = max(1, CONVERT_SLICE_BYTES // (w[0].numel() * 4))
        parts = [fmt.quantize(w[i:i + step]) for i in range(0, w.shape[0], step)]
        return cls(torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts]), fmt)

    @classmethod
    def empty(cls, shape, fmt: WeightFormat) -> "QTensor":
        rows = shape[0] if (fmt.kind != "ternary" or fmt.granularity == "channel") else 1
        groups = grouped(shape, fmt.kind, fmt.group_size)
        return cls(torch.zeros(shape, dtype=torch.int8), torch.zeros((rows, groups) if groups else rows), fmt)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, dtype)

    def extra_repr(self) -> str:
        return f"{self.fmt.kind}, shape={tuple(self.codes.shape)}"


_last_input: list = [None]  # (x, (its version, lam, grad mode), quantized x) of the last int8 layer input


def layer_input(x: torch.Tensor, act_bits: int | None, lam: float = 1.0) -> torch.Tensor:
    """The activations a linear layer multiplies: int8 fake-quantized per token when act_bits == 8
    (blended in by `lam` during warm-up), as they are otherwise. Attention's query/key/value
    projections (a gated FFN's gate/up) read the very same tensor one after the other: it is
    quantized once and the result reused while the tensor is unchanged (its version counter);
    the gradients of the uses add up in the one straight-through node, as they would in three."""
    if act_bits != 8:
        return x
    if x.is_inference():  # under torch.inference_mode a tensor keeps no version counter: nothing to key on
        return quantize_activations_int8(x, lam)
    key = (x._version, lam, torch.is_grad_enabled())
    last = _last_input[0]
    if last is not None and last[0] is x and last[1] == key:
        return last[2]
    q = quantize_activations_int8(x, lam)
    _last_input[0] = (x, key, q)
    return q


# ---------------------------------------------------------------- fake-quant forms

class FakeQuantLinear(nn.Module):
    """Linear with a fake-quantized weight ([out, in]); also replaces GPT-2's Conv1D."""

    def __init__(self, weight: nn.Parameter, bias, fmt: WeightFormat, act_bits: int | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.fmt = fmt
        self.act_bits = act_bits
        self.lam = 1.0

    def forward(self, x):
        return F.linear(layer_input(x, self.act_bits, self.lam), self.fmt.fake(self.weight, self.lam), self.bias)

    def extra_repr(self):
        return f"{self.fmt.kind}, shape={tuple(self.weight.shape)}, act_bits={self.act_bits}"


class FakeQuantEmbedding(nn.Module):
    """`multiplier`: the constant a scaled embedding's own forward multiplies its rows by
    (structure.lookup_multiplier; BART's sqrt(d_model)), kept so that the swap changes nothing else."""

    def __init__(self, emb: nn.Embedding, fmt: WeightFormat, multiplier: float = 1.0):
        super().__init__()
        self.weight = emb.weight
        self.fmt = fmt
        self.lam = 1.0
        self.padding_idx = emb.padding_idx
        self.multiplier = multiplier
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim

    def forward(self, ids):
        if self.fmt.per_row:
            # rows are quantized independently, so quantizing only the looked-up rows gives the
            # same values and gradients as quantizing the table, at a fraction of the cost
            # (a 49k-row vocabulary vs a batch of a few thousand tokens)
            rows = F.embedding(ids, self.weight, self.padding_idx)
            rows = self.fmt.fake(rows.reshape(-1, rows.shape[-1]), self.lam).reshape(rows.shape)
        else:
            rows = F.embedding(ids, self.fmt.fake(self.weight, self.lam), self.padding_idx)
        return rows * self.multiplier if self.multiplier != 1.0 else rows


class FakeQuantRNN(nn.Module):
    """Wraps an LSTM/GRU/RNN; its weight matrices are fake-quantized each forward."""

    def __init__(self, rnn: nn.Module, fmt: WeightFormat):
        super().__init__()
        self.rnn = rnn
        self.fmt = fmt
        self.lam = 1.0

    def forward(self, *args, **kwargs):
        # every name of a shared (cross-layer tied) matrix gets the same fake-quantized tensor
        fake: dict[int, torch.Tensor] = {}
        weights = {}
        for n, p in self.rnn.named_parameters(remove_duplicate=False):
            if n.startswith("weight_"):
                if id(p) not in fake:
                    fake[id(p)] = self.fmt.fake(p, self.lam)
                p = fake[id(p)]
            weights[n] = p
        return functional_call(self.rnn, weights, args, kwargs)


# ---------------------------------------------------------------- converted forms

class QLinear(nn.Module):
    """A Linear whose weight is a QTensor, dequantized at each forward. Also the exported form of
    a head tied to a quantized embedding (ONNX Runtime constant-folds the Cast/Mul/Transpose of
    the shared codes once, at load)."""

    def __init__(self, qweight: QTensor, bias, act_bits: int | None = None):
        super().__init__()
        self.qweight = qweight
        self.bias = bias
        self.act_bits = act_bits
        self.out_features, self.in_features = qweight.codes.shape

    def forward(self, x):
        x = layer_input(x, self.act_bits)
        q = self.qweight
        if q.codes.numel() * x.element_size() <= DEQUANT_SLICE_BYTES or torch.jit.is_tracing() or \
                torch.onnx.is_in_onnx_export():
            return F.linear(x, q.dequantize(x.dtype), self.bias)
        # a large weight (a 49k-row head) is applied a slice of output rows at a time: never the whole
        # float matrix in memory (the ONNX export traces the one-matrix form above)
        step = max(1, DEQUANT_SLICE_BYTES // (self.in_features * x.element_size()))
        per_row = q.scale.numel() > 1
        return torch.cat([F.linear(x, dequantize(q.codes[i:i + step], q.scale[i:i + step] if per_row else q.scale,
                                                 x.dtype), None if self.bias is None else self.bias[i:i + step])
                          for i in range(0, self.out_features, step)], dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer applies, dequantized on each read (not stored): model code
        that reads a Linear's `.weight` (T5's feed-forward casts its input to `wo.weight.dtype`)
        works on a converted model too."""
        return self.qweight.dequantize(self.qweight.scale.dtype)


class QEmbedding(nn.Module):
    def __init__(self, qweight: QTensor, padding_idx=None, multiplier: float = 1.0):
        super().__init__()
        self.qweight = qweight
        self.padding_idx = padding_idx
        self.multiplier = multiplier   # as FakeQuantEmbedding's
        self.num_embeddings, self.embedding_dim = qweight.codes.shape

    def forward(self, ids):
        # gather rows first: never materialize the whole float table
        rows = scaled_rows(self.qweight.codes[ids].float(), self.qweight.scale, ids)
        return rows * self.multiplier if self.multiplier != 1.0 else rows


def scaled_rows(rows: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gathered code rows [..., dim] times their scales: one per tensor, per row ([vocab]) or per group of
    a row ([vocab, groups], each scale over dim / groups consecutive values; reshapes only, so it traces)."""
    if scale.numel() == 1:
        return rows * scale
    if scale.dim() == 1:
        return rows * scale[ids].unsqueeze(-1)
    per = scale[ids]
    return (rows.reshape(*per.shape, -1) * per.unsqueeze(-1)).reshape(rows.shape)


class QRNN(nn.Module):
    """An LSTM/GRU whose weight matrices are QTensors; biases stay float parameters."""

    def __init__(self, rnn: nn.Module, qweights: dict[str, QTensor]):
        super().__init__()
        # a parameter-free copy of the RNN runs the recurrence with our weights
        template = copy.deepcopy(rnn).to("meta")
        object.__setattr__(self, "_template", template)
        self.qweights = nn.ModuleDict(qweights)
        for n, p in rnn.named_parameters(remove_duplicate=False):
            if n not in qweights:
                setattr(self, n, p)
        self.batch_first = getattr(rnn, "batch_first", False)

    def forward(self, *args, **kwargs):
        weights, cache = {}, {}
        for n, _ in self._template.named_parameters(remove_duplicate=False):
            if n in self.qweights:  # a QTensor shared by several layers is dequantized once
                q = self.qweights[n]
                weights[n] = cache[id(q)] = cache[id(q)] if id(q) in cache else q.dequantize()
            else:
                weights[n] = getattr(self, n)
        return functional_call(self._template, weights, args, kwargs)
