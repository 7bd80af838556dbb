"""`compress export PACKED --onnx OUT | --hf DIR | --gguf OUT`: a packed checkpoint -> a validated ONNX
file, a transformers BitNet folder that plain `from_pretrained` loads (checked against tritpress's
outputs), or a llama.cpp GGUF file (TQ1_0/TQ2_0; every tensor read back with the gguf package).

Every setting flag is an OnnxConfig, HfExportConfig or GgufExportConfig field (cli/settings.EXPORT)."""
from __future__ import annotations

import json

import typer

from tritpress.cli import settings
from tritpress.cli.flags import with_flags
from tritpress.cli.options import DebugOpt


def export_config(cls, what: str, values: dict):
    """An export config (OnnxConfig, HfExportConfig) from the flags given, with a one-line error for bad values."""
    from tritpress.compressor.errors import TritpressError

    try:
        return cls(**values)
    except ValueError as e:
        raise TritpressError(f"invalid {what} setting: {e}") from e


@with_flags(*settings.EXPORT)
def export(
    packed: str = typer.Argument(..., help="A packed checkpoint (.safetensors) made by `compress`."),
    onnx: str = typer.Option(None, "--onnx", help="Output ONNX file."),
    hf: str = typer.Option(None, "--hf", help="Output folder: a transformers BitNet model (config.json with "
                           "quantization_config, model.safetensors in 2-bit layout, the tokenizer)."),
    gguf: str = typer.Option(None, "--gguf", help="Output file: a llama.cpp GGUF model (llama-family decoders; "
                             "ternary matrices as TQ1_0/TQ2_0)."),
    json_out: bool = typer.Option(False, "--json", help="Print the export result as JSON."),
    debug: bool = DebugOpt,
    flags: dict = None,
):
    """Export a packed checkpoint to ONNX (quantized weights stay quantized; validated with ONNX Runtime,
    non-zero exit when an output differs by more than --atol) or, with --hf, to a transformers BitNet
    folder (validated with from_pretrained, non-zero exit beyond --hf-rtol) or, with --gguf, to a llama.cpp
    GGUF file (every tensor read back with the gguf package)."""
    from tritpress.compressor.errors import TritpressError
    from tritpress.exporters.packed import PackedLoadConfig
    from tritpress.exporters.settings import GgufExportConfig, HfExportConfig, OnnxConfig

    if sum(x is not None for x in (onnx, hf, gguf)) != 1:
        raise TritpressError("give one output: --onnx FILE, --hf FOLDER or --gguf FILE")
    load = PackedLoadConfig(**flags["load"])
    if hf is not None:
        cfg = export_config(HfExportConfig, "--hf", flags["hf"])
        result = run_hf_export(packed, hf, cfg, quiet=json_out, load=load)
    elif gguf is not None:
        cfg = export_config(GgufExportConfig, "--gguf", flags["gguf"])
        result = run_gguf_export(packed, gguf, cfg, quiet=json_out, load=load)
    else:
        cfg = export_config(OnnxConfig, "ONNX", flags["onnx"])
        result = run_export(packed, onnx, cfg, quiet=json_out, load=load)
    if json_out:
        typer.echo(json.dumps(result, indent=2))


def packed_for_export(packed: str, out: str, flag: str, load, quiet: bool):
    """The packed file loaded as a model, once `out` (the --onnx / --hf output) is checked not to be the
    input and to be writable -> (model, progress printer: silent when quiet)."""
    from pathlib import Path

    from tritpress.compressor.fileio import check_writable, refuse_overwrite_input
    from tritpress.exporters.packed import load_packed

    refuse_overwrite_input([out], [packed])
    check_writable(Path(out).parent, flag)
    model = load_packed(packed, skeleton=load.model_skeleton())
    return model, (lambda line: None) if quiet else typer.echo


def run_export(packed: str, onnx: str, cfg, quiet: bool, load) -> dict:
    """Load the packed file (into the --skeleton class, for a custom nn.Module) and export it;
    progress lines on stdout unless quiet."""
    from tritpress.exporters.onnx import export_onnx

    model, log = packed_for_export(packed, onnx, "--onnx", load, quiet)
    return export_onnx(model, onnx, cfg, packed_path=packed, log=log)


def run_hf_export(packed: str, out: str, cfg, quiet: bool, load) -> dict:
    """Load the packed file and write it as a transformers BitNet folder; progress lines unless quiet."""
    from pathlib import Path

    from tritpress.exporters.hf_bitnet import export_hf_bitnet
    from tritpress.exporters.packed import read_metadata

    model, log = packed_for_export(packed, out, "--hf", load, quiet)
    result = export_hf_bitnet(model, out, cfg, read_metadata(packed)["source"], log=log)
    result["packed_bytes"] = Path(packed).stat().st_size
    log(f"{out}: {result['bytes']:,} bytes of weights "
        f"({result['bytes'] / result['packed_bytes']:.2f}x the packed file)")
    return result


def run_gguf_export(packed: str, out: str, cfg, quiet: bool, load) -> dict:
    """Load the packed file and write it as a llama.cpp GGUF file; progress lines unless quiet."""
    from pathlib import Path

    from tritpress.exporters.llama_gguf import export_gguf
    from tritpress.exporters.packed import read_metadata

    model, log = packed_for_export(packed, out, "--gguf", load, quiet)
    result = export_gguf(model, out, cfg, read_metadata(packed)["source"], log=log)
    result["packed_bytes"] = Path(packed).stat().st_size
    log(f"{out}: {result['bytes']:,} bytes ({result['bytes'] / result['packed_bytes']:.2f}x the packed file)")
    return result
