"""The exporters' settings, torch-free: `OnnxConfig` (how the ONNX file is written and checked, with
its default tolerances) and `PackedLoadConfig` (the `--skeleton` class a packed custom nn.Module
loads into).

A field's trailing comment is its --help (cli/flags.py). They live apart from exporters/onnx and
exporters/packed (which re-export them) so that the command line builds its options, and `--help`
answers, without importing torch or onnx."""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from tritpress.compressor.errors import TritpressError

if TYPE_CHECKING:
    from torch import nn

ONNX_FORMATS = ("matmulnbits", "matmulnbits4", "qgemm", "int2", "float")
NBITS_FORMATS = ("matmulnbits", "matmulnbits4")   # the formats whose quantized MatMuls are MatMulNBits
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# Default tolerances, relative to the output's own scale (a decoder's logits reach +-50, a hidden state ~1).
# A graph computing in fp32 matches PyTorch to rounding, which grows with the values summed:
# FP32_RTOL * max(1, max|output|). ORT's int8-activation kernels (MatMulNBits accuracy_level 4; the int2 format
# too, since ORT fuses DequantizeLinear+MatMul into MatMulNBits with session.qdq_matmulnbits_accuracy_level,
# default 4) round every MatMul input to an int8 step of max|block|/127 per block of K (qgemm: ORT's
# DynamicQuantizeLinear, one uint8 step (max - min)/255 per whole input tensor); what that does to the
# outputs depends on the model (outlier activations, depth), so validation measures it: the PyTorch model is run
# again with its quantized layers' inputs rounded the same way (`int8_block_inputs`), and the atol is
# INT8_ACT_MARGIN x that emulated deviation (ORT lands within a few % of it; the margin covers rounding that
# falls the other way), at least INT8_ACT_RTOL * max|output|. The same graph is also run with fp32 compute,
# which must match to FP32_RTOL * max(1, max|output|): a wrong weight layout fails that check, not only the
# loose one.
FP32_RTOL = 1e-4
INT8_ACT_RTOL = 0.1
INT8_ACT_MARGIN = 2.0
FP16_RTOL = 1e-2


def finite_absmax(a: np.ndarray) -> float:
    """max |a| over finite values: a trimmed vocabulary's -inf logits do not set the tolerance."""
    return float(np.abs(a[np.isfinite(a)]).max(initial=0.0))


def fp32_atol(reference: np.ndarray) -> float:
    """fp32 rounding, relative to the output's magnitude (summing larger values rounds more)."""
    return FP32_RTOL * max(1.0, finite_absmax(reference))


@dataclass
class OnnxConfig:
    """How `export_onnx` writes and checks the ONNX file."""

    enabled: bool = False           # pipeline only: also export <out>/model.onnx (validated with ONNX Runtime)
    format: str = "qgemm"           # qgemm: 2-bit file, int8 weights made at session load for ONNX Runtime's
                                    # int8 GEMM (DynamicQuantizeMatMul, per-tensor uint8 activations; ORT
                                    # int8 speed, benchmarks/bench_onnx.py); matmulnbits: ORT
                                    # com.microsoft::MatMulNBits (2-bit); matmulnbits4: the same 2-bit file
                                    # widened to ORT's 4-bit kernel at session load; int2: standard
                                    # DequantizeLinear on INT2 (opset 25); float: dequantized fp32 weights
    accuracy_level: int = 4         # matmulnbits*: compute type, 4 = int8 activations (fast CPU path)
    block_size: int = 128           # matmulnbits*: block size along the input dimension (power of two >= 16)
    atol: float | None = None       # max |ONNX - PyTorch| per output [default: relative to the output:
                                    # 1e-4 x max(1, max |PyTorch output|) with fp32 compute; with int8
                                    # activations (matmulnbits at accuracy level 4, int2) 2 x what rounding
                                    # the MatMul inputs to int8 does in PyTorch, at least 0.1 x max |output|]
    opset: int = 25                 # opset of a graph that needs INT2/INT4 initializers (>= 25 / 21); others
                                    # keep the TorchScript exporter's 20
    validate: bool = True           # compare ONNX Runtime with PyTorch after export
    float_dtype: str = "fp32"       # format float: fp32 or fp16 storage of the dequantized weights
    kv_cache: bool = False          # decoder LMs: export the incremental-decoding graph (past_key_values.* in,
                                    # present.* out)
    switch_weights: int = 0         # qgemm: a quantized MatMul with at least this many weights gets a row-count
                                    # switch (MatMulNBits on 4-bit codes for <= 4 rows, the int8 GEMM beyond,
                                    # both from the one stored copy); 0: only grouped weights (--group-size)

    def __post_init__(self):
        if self.format not in ONNX_FORMATS:
            raise ValueError(f"format={self.format!r} is not one of {', '.join(ONNX_FORMATS)}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level={self.accuracy_level} is not one of 0..4")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two >= 16")
        if self.format == "int2" and self.opset < 25:
            raise ValueError("format int2 needs opset >= 25 (INT2 appeared in ONNX opset 25)")
        if self.float_dtype not in ("fp32", "fp16"):
            raise ValueError(f"float_dtype={self.float_dtype!r} is not one of fp32, fp16")
        if self.atol is not None and self.atol <= 0:
            raise ValueError("atol must be > 0")
        if self.switch_weights < 0:
            raise ValueError("switch_weights must be >= 0")

    @property
    def int8_activations(self) -> bool:
        """ONNX Runtime computes this graph's quantized MatMuls with int8 activations."""
        return self.format in ("int2", "qgemm") or (self.format.startswith("matmulnbits") and self.accuracy_level == 4)

    def atol_for(self, reference: np.ndarray, int8_deviation: float = 0.0) -> float:
        """The default atol of an output (see FP32_RTOL); `int8_deviation`: max |PyTorch with int8-rounded
        MatMul inputs - PyTorch| of this output, for the int8-activation kernels."""
        if self.atol is not None:
            return self.atol
        scale = finite_absmax(reference)
        if self.int8_activations:
            return max(INT8_ACT_RTOL * scale, INT8_ACT_MARGIN * int8_deviation)
        if self.format == "float" and self.float_dtype == "fp16":  # int8 codes x scale rounded to fp16
            return FP16_RTOL * max(1.0, scale)
        return fp32_atol(reference)

    def to_dict(self) -> dict:
        return asdict(self)


SKELETON_FLAG = "--skeleton"


@dataclass
class PackedLoadConfig:
    """How the commands that read a packed file (`export`, `info`) load it as a model."""

    skeleton: str | None = None   # the class a custom nn.Module checkpoint is loaded into: package.module:Class
                                  # (imported, called with no arguments; a function returning the model
                                  # works too) [default: transformers models are rebuilt from their config]

    def model_skeleton(self) -> nn.Module | None:
        return skeleton_from_spec(self.skeleton) if self.skeleton else None


def skeleton_from_spec(spec: str, flag: str = SKELETON_FLAG) -> nn.Module:
    """An instance of `package.module:Class` (or of any callable there that builds the model with no
    arguments) to load a packed custom nn.Module into. The module is imported from the environment,
    else from the current folder. Every failure is one line naming `flag`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TritpressError(f"{flag} {spec!r}: expected package.module:Class, e.g. mypkg.models:CharLSTM")
    module = _import_for_skeleton(module_name, spec, flag)
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise TritpressError(f"{flag} {spec}: {module_name} has no {attr}")
    if not callable(target):
        raise TritpressError(f"{flag} {spec}: {attr} is a {type(target).__name__}, not a class")
    from torch import nn  # only when a skeleton is loaded: building the flags imports no torch
    try:
        model = target()
    except Exception as e:  # noqa: BLE001 - the user's constructor: any failure, told in one line
        raise TritpressError(f"{flag} {spec}: {attr}() with no arguments failed ({type(e).__name__}: "
                             f"{_first_line(e)}); name a class or function that builds the model without "
                             "arguments") from e
    if not isinstance(model, nn.Module):
        raise TritpressError(f"{flag} {spec}: {attr}() made a {type(model).__name__}, not an nn.Module")
    return model


def _import_for_skeleton(module_name: str, spec: str, flag: str):
    added = os.getcwd() not in sys.path  # a console script's sys.path lacks the current folder
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - importing user code can raise anything
        raise TritpressError(f"{flag} {spec}: cannot import {module_name} ({type(e).__name__}: "
                             f"{_first_line(e)}); install its package or run from the folder that holds it") from e
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


HF_LINEAR_CLASSES = ("bitlinear", "autobitlinear")


@dataclass
class HfExportConfig:
    """How `export_hf_bitnet` writes and checks a transformers BitNet folder."""

    linear_class: str = "bitlinear"  # transformers' BitNet layer: bitlinear (2-bit weights in memory, unpacked at
                                     # each forward) | autobitlinear (unpacked to float once, at load)
    tokenizer: str | None = None     # the tokenizer folder to copy in [default: the source model's, when it has one]
    rtol: float = 1e-3               # max |transformers - tritpress| / max |tritpress| of the main output (or 2x
                                     # tritpress's own float32-vs-float64 difference, when larger: int8
                                     # activations make a deep model sensitive to the last bit)
    validate: bool = True            # load the folder with plain from_pretrained and compare with tritpress

    def __post_init__(self):
        if self.linear_class not in HF_LINEAR_CLASSES:
            raise ValueError(f"linear_class={self.linear_class!r} is not one of {', '.join(HF_LINEAR_CLASSES)}")
        if self.rtol <= 0:
            raise ValueError("rtol must be > 0")


GGUF_TERNARY_TYPES = ("tq1_0", "tq2_0")


@dataclass
class GgufExportConfig:
    """How `export_gguf` writes and checks a GGUF file for llama.cpp."""

    ternary_type: str = "tq1_0"   # ternary matrices whose rows are a multiple of 256 wide: tq1_0 (1.69 bits per
                                  # weight) | tq2_0 (2.06, faster kernels); narrower rows: Q4_0 holding the same
                                  # codes exactly
    tokenizer: str | None = None  # a .gguf file to copy the tokenizer (tokenizer.* keys) from [default: the source
                                  # model's, when it came from a GGUF file]
    rtol: float = 1e-3            # max relative difference of each tensor read back (gguf's own dequantizer) from
                                  # tritpress's weight; exact types give 0, a cross-layer gain folded into an fp16
                                  # scale up to 2**-11
    validate: bool = True         # read the file back with the gguf package and compare every tensor

    def __post_init__(self):
        if self.ternary_type not in GGUF_TERNARY_TYPES:
            raise ValueError(f"ternary_type={self.ternary_type!r} is not one of {', '.join(GGUF_TERNARY_TYPES)}")
        if self.rtol <= 0:
            raise ValueError("rtol must be > 0")
