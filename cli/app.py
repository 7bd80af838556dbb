"""The `compress` typer app: every sub-command, registered in one place (the command modules
import nothing from here or from cli.main, so there is no import cycle)."""
from __future__ import annotations

import typer
from typer.core import TyperGroup

from tritpress.cli.analyze import analyze
from tritpress.cli.evaluate import evaluate_command, finetune_head_command
from tritpress.cli.export import export
from tritpress.cli.run import info, run


class DefaultCommandGroup(TyperGroup):
    """Routes `compress MODEL ...` to the `run` command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=DefaultCommandGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Post-hoc ternary (1.58-bit) compression of transformer and RNN checkpoints. "
                       "`compress MODEL` runs the pipeline (same as `compress run MODEL`).")

app.command(name="export")(export)
app.command(name="run")(run)
app.command(name="info")(info)
app.command(name="evaluate")(evaluate_command)
app.command(name="finetune-head")(finetune_head_command)
app.command(name="analyze")(analyze)
