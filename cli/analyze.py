"""`compress analyze MODEL`: the redundancy analysis alone (table, analysis.json, PNG plots).

Its calibration flags are the SharingConfig flags of `compress run --sharing` (--share-data,
--share-sequences, ...; cli/settings.ANALYZE); the older --data, --sequences, --seq-len and
--pairs are still accepted."""
from __future__ import annotations

import json
from typing import Optional

import typer

from tritpress.cli import settings
from tritpress.cli.flags import with_flags
from tritpress.cli.options import DebugOpt


@with_flags(*settings.ANALYZE)
def analyze(
    model: str = typer.Argument(..., help="Model, as for `compress run`."),
    out: str = typer.Option("runs/analysis", "--out", "-o", help="Output folder."),
    config: Optional[str] = typer.Option(None, "--config", help="HF config.json for a bare state_dict."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow full unpickling (trusted files only)."),
    json_out: bool = typer.Option(False, "--json", help="Print analysis.json to stdout."),
    debug: bool = DebugOpt,
    flags: dict = None,
):
    """Redundancy analysis of MODEL's block stack: Block Influence, CKA, angular distance, weight
    similarity and the measured loss increase of tying each pair of blocks."""
    from tritpress.analyzers.redundancy import analyze_model, table
    from tritpress.compressor.errors import TritpressError
    from tritpress.compressor.fileio import check_writable
    from tritpress.compressor.share import SharingConfig

    if "data" not in flags["sharing"]:
        raise typer.BadParameter("calibration text is required", param_hint="'--share-data'")
    try:
        cfg = SharingConfig(**flags["sharing"])
    except ValueError as e:
        raise TritpressError(str(e)) from e
    check_writable(out, "--out")
    result, files = analyze_model(model, cfg, out, config, trust_pickle)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(table(result))
        typer.echo(f"\nwrote {', '.join(files)}")
