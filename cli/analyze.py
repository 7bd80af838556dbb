"""`compress analyze MODEL`: the redundancy analysis alone (table, analysis.json, PNG plots)."""
from __future__ import annotations

import json
from typing import Optional

import typer

from tritpress.cli.options import DebugOpt

from tritpress.compressor.share import INITS, SHARE_KINDS, SharingConfig

SHARING = SharingConfig()


def analyze(
    model: str = typer.Argument(..., help="Model, as for `compress run`."),
    data: str = typer.Option(..., "--data", help="Calibration text: file, pkg:ptb or a HF dataset."),
    out: str = typer.Option("runs/analysis", "--out", "-o", help="Output folder."),
    config: Optional[str] = typer.Option(None, "--config", help="HF config.json for a bare state_dict."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow full unpickling (trusted files only)."),
    share: str = typer.Option(SHARING.share, help=f"Matrices tied inside a block: {', '.join(SHARE_KINDS)}."),
    share_init: str = typer.Option(SHARING.init, help=f"Shared-weight init: {', '.join(INITS)}."),
    relax_rank: int = typer.Option(0, help="Per-occurrence low-rank correction in the measured ties."),
    sequences: int = typer.Option(SHARING.calib_sequences, help="Calibration sequences."),
    seq_len: int = typer.Option(SHARING.calib_seq_len, help="Tokens per calibration sequence."),
    pairs: int = typer.Option(SHARING.auto_pairs, help="Block pairs tied and measured at most (0 = none)."),
    json_out: bool = typer.Option(False, "--json", help="Print analysis.json to stdout."),
    debug: bool = DebugOpt,
):
    """Redundancy analysis of MODEL's block stack: Block Influence, CKA, angular distance, weight
    similarity and the measured loss increase of tying each pair of blocks."""
    from tritpress.analyzers.redundancy import analyze_model, table
    from tritpress.compressor.errors import TritpressError

    try:
        cfg = SharingConfig(share=share, init=share_init, relax_rank=relax_rank, calib_sequences=sequences,
                            calib_seq_len=seq_len, auto_pairs=pairs, data=data)
    except ValueError as e:
        raise TritpressError(str(e)) from e
    result, files = analyze_model(model, cfg, out, config, trust_pickle)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(table(result))
        typer.echo(f"\nwrote {', '.join(files)}")
