"""The quantization settings: `TernaryConfig` and the storage formats, declared in the torch-free
compressor/settings (so that `--help` imports no torch) and re-exported here, with the torch dtype
of each float storage format."""
from __future__ import annotations

import torch

from .settings import ACT_BITS, FLOAT_FORMATS, WEIGHT_FORMATS, TernaryConfig

FLOAT_DTYPES = dict(zip(FLOAT_FORMATS, (torch.float32, torch.float16, torch.bfloat16)))

__all__ = ["TernaryConfig", "WEIGHT_FORMATS", "FLOAT_DTYPES", "FLOAT_FORMATS", "ACT_BITS"]
