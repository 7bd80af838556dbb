"""Configuration dataclasses. Every CLI flag maps to one field here; a field's trailing comment is
its --help (cli/flags.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .quantize import GRANULARITIES, TERNARY_METHODS

# How a non-block weight (embedding, output head, Linear outside the block stack) is stored.
WEIGHT_FORMATS = ("keep", "fp32", "fp16", "bf16", "int8", "int4", "int2", "ternary")
FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ACT_BITS = (None, 8)


@dataclass
class TernaryConfig:
    """What `prepare`/`convert` do to a model.

    Linear / Conv1D / RNN weights inside the repeated block stack become ternary
    ({-1, 0, +1} * scale). Embeddings, the output head and Linears outside the stack
    follow their own format; norms and biases stay float (stored as `float_dtype`).
    """

    method: str = "absmean"          # ternary quantizer: absmean (BitNet b1.58) | twn (TernaryBERT)
    granularity: str = "tensor"      # one scale per tensor or per output channel
    act_bits: int | None = None      # 8: per-token absmax int8 activations (W1.58A8) [default: off]
    embedding: str = "int8"          # embedding storage: keep | fp32 | fp16 | bf16 | int8 | int4 | int2 | ternary (per row)
    head: str = "int8"               # output head storage; a head tied to the embedding follows --embedding
    outside_blocks: str = "keep"     # Linears outside the block stack (pooler, classifier...)
    float_dtype: str = "fp16"        # storage of norms, biases and tensors kept float
    scale_dtype: str = "fp16"        # storage of quantization scales
    exclude: list[str] = field(default_factory=list)  # regex of module names left float (repeatable)

    def __post_init__(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")

        check("method", self.method, TERNARY_METHODS)
        check("granularity", self.granularity, GRANULARITIES)
        check("act_bits", self.act_bits, ACT_BITS)
        for name in ("embedding", "head", "outside_blocks"):
            check(name, getattr(self, name), WEIGHT_FORMATS)
        check("float_dtype", self.float_dtype, tuple(FLOAT_DTYPES))
        check("scale_dtype", self.scale_dtype, tuple(FLOAT_DTYPES))
        self.exclude = list(self.exclude)

    def storage_format(self, fmt: str) -> str:
        """Resolve 'keep' to the float storage dtype."""
        return self.float_dtype if fmt == "keep" else fmt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TernaryConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TernaryConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)
