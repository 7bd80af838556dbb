"""`compress run MODEL [flags]` (also plain `compress MODEL`) and `compress info PACKED`.

Every setting flag of `run` is generated from the config dataclasses (cli/settings.RUN);
only the argument and the flags that are not settings are declared here."""
from __future__ import annotations

import json
from typing import Optional

import typer

from tritpress.cli import settings
from tritpress.cli.flags import with_flags
from tritpress.cli.options import DebugOpt
from tritpress.cli.runtime import launch_workers, quiet_libraries, under_torchrun

MODEL_HELP = ("HF model folder or hub id, .gguf file, state_dict (.pt/.bin/.safetensors, with --config), saved "
              "nn.Module (.pt), or a bundled model: pkg:all-MiniLM-L6-v2, pkg:SmolLM2-135M.")


@with_flags(*settings.RUN)
def run(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="TOML/YAML recipe; flags override it."),
    nproc: int = typer.Option(1, help="Start N local worker processes (torchrun); gloo on CPU, NCCL on GPU."),
    max_restarts: int = typer.Option(0, help="With --nproc: elastic restarts after a worker fails."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of tables."),
    save_recipe: Optional[str] = typer.Option(None, "--save-recipe", help="Write the full recipe (all "
                                              "defaults spelled out) to this TOML file and exit."),
    debug: bool = DebugOpt,
    flags: dict = None,
):
    """Ingest MODEL, quantize to ternary, pack (1.6 bits/weight) and report sizes."""
    from tritpress.cli.recipe import build_config, read_recipe

    if model is not None:
        flags[""]["model"] = model
    cfg = build_config(read_recipe(recipe) if recipe else {}, flags)
    if save_recipe:
        return write_recipe(cfg, save_recipe)
    if nproc > 1 and not under_torchrun():
        raise typer.Exit(launch_workers(nproc, max_restarts))
    quiet_libraries()
    report = run_pipeline(cfg, quiet=json_out)
    if report is not None:  # None: a non-zero rank under torchrun; rank 0 reports
        show_report(report, json_out)


def write_recipe(cfg, path: str) -> None:
    from tritpress.cli.recipe import dump_recipe
    from tritpress.compressor.fileio import write_text

    write_text(path, dump_recipe(cfg))
    typer.echo(f"recipe written to {path}")


def run_pipeline(cfg, quiet: bool) -> dict | None:
    """The pipeline with progress on stderr; its report (None on ranks other than 0)."""
    from tritpress.cli.pipeline import compress
    from tritpress.cli.progress import with_progress

    return with_progress(lambda listener: compress(cfg, listener), quiet=quiet)


def show_report(report: dict, json_out: bool) -> None:
    """Tables (or report.json) on stdout; exit 1 when the evaluation gate failed."""
    from tritpress.analyzers.report import render

    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(render(report))
        typer.echo(f"\nwrote {report['files']['packed']} and {report['files']['report']}")
    evaluation = report.get("evaluation")
    if evaluation:
        from tritpress.analyzers.quality.report import render as render_eval
        if not json_out:
            typer.echo("\n" + render_eval(evaluation))
        from tritpress.analyzers.quality.report import failure_line
        if failure_line(evaluation):
            typer.echo(failure_line(evaluation), err=True)
        if not evaluation["passed"]:
            raise typer.Exit(1)


@with_flags(*settings.INFO)
def info(packed: str = typer.Argument(..., help="A packed checkpoint (.safetensors)."),
         json_out: bool = typer.Option(False, "--json", help="Print JSON."),
         debug: bool = DebugOpt,
         flags: dict = None):
    """Size report of a packed checkpoint (verifies its checksum); with --skeleton, also loads it
    into that class."""
    from tritpress.analyzers.report import size_table, stack_table
    from tritpress.exporters.packed import PackedLoadConfig

    size = packed_info(packed, PackedLoadConfig(**flags["load"]))
    typer.echo(json.dumps(size, indent=2) if json_out else "\n".join([size_table(size), *stack_table(size)]))
    if size.get("loads_into") and not json_out:
        typer.echo(f"loads into {size['loads_into']}: ok")


def packed_info(packed: str, load) -> dict:
    """The size report of a verified packed file; with a skeleton, the file is also loaded into it
    (a custom nn.Module's checkpoint that does not fit its class is refused) and `loads_into` names it."""
    from tritpress.analyzers.size import size_report
    from tritpress.exporters.packed import load_packed, read_packed_state

    read_packed_state(packed)  # full integrity check before reporting
    size = size_report(packed)
    skeleton = load.model_skeleton()
    if skeleton is not None:
        load_packed(packed, skeleton=skeleton)
        size["loads_into"] = f"{type(skeleton).__module__}.{type(skeleton).__qualname__}"
    return size
