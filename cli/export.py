"""`compress export PACKED --onnx OUT`: a packed checkpoint -> a validated ONNX file."""
from __future__ import annotations

import json
from enum import Enum
from typing import Optional

import typer

from tritpress.cli.options import DebugOpt

from tritpress.exporters.onnx import ONNX_FORMATS, OnnxConfig

ONNX_DEFAULTS = OnnxConfig()
OnnxFormat = Enum("OnnxFormat", {f: f for f in ONNX_FORMATS}, type=str)


def onnx_config(**values) -> OnnxConfig:
    """OnnxConfig from flags (None = not given), with a one-line error for bad values."""
    from tritpress.compressor.errors import TritpressError

    try:
        return OnnxConfig(**{k: v for k, v in values.items() if v is not None})
    except ValueError as e:
        raise TritpressError(f"invalid ONNX setting: {e}") from e


def export(
    packed: str = typer.Argument(..., help="A packed checkpoint (.safetensors) made by `compress`."),
    onnx: str = typer.Option(..., "--onnx", help="Output ONNX file."),
    onnx_format: Optional[OnnxFormat] = typer.Option(
        None, "--onnx-format", help="matmulnbits: ORT com.microsoft::MatMulNBits (2-bit); int2: standard "
        "DequantizeLinear on INT2 (opset 25); float: dequantized fp32 weights "
        f"[default: {ONNX_DEFAULTS.format}]."),
    accuracy_level: Optional[int] = typer.Option(None, "--accuracy-level", help="MatMulNBits compute type, "
                                                 f"4 = int8 activations [default: {ONNX_DEFAULTS.accuracy_level}]."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="MatMulNBits block size along the "
                                             f"input dimension [default: {ONNX_DEFAULTS.block_size}]."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Max |ONNX - PyTorch| per output [default: "
                                         "1e-4 with fp32 compute; 0.1 x max |PyTorch output| with int8 "
                                         "activations (matmulnbits at accuracy level 4, int2)]."),
    opset: Optional[int] = typer.Option(None, "--opset", help="Opset of a graph that needs INT2/INT4 "
                                        "initializers (>= 25 / 21); others keep the TorchScript exporter's 20 "
                                        f"[default: {ONNX_DEFAULTS.opset}]."),
    validate: Optional[bool] = typer.Option(None, "--validate/--no-validate",
                                            help="Compare ONNX Runtime with PyTorch [default: validate]."),
    float_dtype: Optional[str] = typer.Option(None, "--float-dtype", help="Format float: fp32 or fp16 storage "
                                              f"of the weights [default: {ONNX_DEFAULTS.float_dtype}]."),
    kv_cache: Optional[bool] = typer.Option(None, "--kv-cache", help="Decoder LMs: export the incremental-"
                                            "decoding graph (past_key_values.* in, present.* out)."),
    json_out: bool = typer.Option(False, "--json", help="Print the export result as JSON."),
    debug: bool = DebugOpt,
):
    """Export a packed checkpoint to ONNX (quantized weights stay quantized) and validate it
    with ONNX Runtime; exits non-zero when an output differs by more than --atol."""
    from tritpress.compressor.fileio import refuse_overwrite_input
    from tritpress.exporters.onnx import export_onnx
    from tritpress.exporters.packed import load_packed

    cfg = onnx_config(format=onnx_format.value if onnx_format else None, accuracy_level=accuracy_level,
                      block_size=block_size, atol=atol, opset=opset, validate=validate,
                      float_dtype=float_dtype, kv_cache=kv_cache)
    refuse_overwrite_input([onnx], [packed])
    model = load_packed(packed)
    log = (lambda line: None) if json_out else typer.echo
    result = export_onnx(model, onnx, cfg, packed_path=packed, log=log)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
