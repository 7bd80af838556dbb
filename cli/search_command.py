"""`compress search MODEL --tasks cls --max-drop 1 --target-ratio 30 [run options]`: the smallest
configuration whose quality gate passes (cli/search.search). Every `compress run` option sets the
candidates' common settings; the [search] table of a recipe and the search flags (SearchConfig
fields) say what to try. Exit 0 with a winner, 1 without one (the closest configuration named)."""
from __future__ import annotations

import json
from typing import Optional

import typer

from tritpress.cli import settings
from tritpress.cli.flags import with_flags
from tritpress.cli.options import DebugOpt
from tritpress.cli.run import MODEL_HELP
from tritpress.cli.runtime import quiet_libraries


@with_flags(*settings.SEARCH)
def search_command(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="TOML/YAML recipe (its [search] table: the search "
                                         "settings); flags override it."),
    json_out: bool = typer.Option(False, "--json", help="Print search.json to stdout instead of the table."),
    debug: bool = DebugOpt,
    flags: dict = None,
):
    """Try sharing x embedding/head bits x vocabulary trimming from the smallest packed size up; keep
    the smallest configuration whose --tasks gate passes within --max-drop (OUT/search.json, frontier.md/.png,
    the winner as OUT/model.tritpress.safetensors)."""
    cfg, scfg = build_search_config(recipe, flags, model)
    quiet_libraries()
    result = run_search(cfg, scfg, quiet=json_out)
    show_search(result.record, json_out)
    if not result.passed:
        raise typer.Exit(1)


def build_search_config(recipe: str | None, flags: dict, model: str | None):
    """(CompressConfig, SearchConfig): the recipe, then the flags given."""
    from tritpress.cli.recipe import build_config, read_recipe, section_config
    from tritpress.cli.search import SearchConfig
    from tritpress.compressor.errors import TritpressError

    values = read_recipe(recipe) if recipe else {}
    if model is not None:
        flags[""]["model"] = model
    try:
        scfg = section_config(SearchConfig, {**(values.get("search") or {}), **flags["search"]}, "search")
    except (TypeError, ValueError) as e:
        raise TritpressError(f"invalid search setting: {e}") from e
    return build_config(values, flags), scfg


def run_search(cfg, scfg, quiet: bool):
    """The search with the pipeline's progress display (each candidate's stages and steps, and one
    line per candidate) on stderr."""
    from tritpress.cli.progress import with_progress
    from tritpress.cli.search import search

    return with_progress(lambda listener: search(cfg, scfg, listener), quiet=quiet)


def show_search(record: dict, json_out: bool) -> None:
    from tritpress.analyzers.frontier import render

    if json_out:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(render(record))
    files = record["files"]
    typer.echo(f"\nwrote {', '.join(files.values())}")
    if record.get("plot_note"):
        typer.echo(record["plot_note"])
