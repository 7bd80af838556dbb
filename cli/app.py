"""The `compress` app: every sub-command, registered in one place (the command modules import
nothing from here or from cli.main, so there is no import cycle).

A command's module is imported only when that command is called or asked for its help: the flags of
every command are generated from config dataclasses whose modules import torch (1-15 s, with a cold
disk cache), and `compress` / `compress --help` list the commands from the table below alone."""
from __future__ import annotations

from typing import Callable

import typer
from typer.core import TyperGroup

HELP = ("`compress MODEL [OPTIONS]` runs the pipeline (same as `compress run MODEL`); its options: "
        "`compress run --help`.\n\n"
        "Post-hoc ternary (1.58-bit) compression of transformer and RNN checkpoints.")


def _export() -> Callable:
    from tritpress.cli.export import export
    return export


def _run() -> Callable:
    from tritpress.cli.run import run
    return run


def _info() -> Callable:
    from tritpress.cli.run import info
    return info


def _evaluate() -> Callable:
    from tritpress.cli.evaluate import evaluate_command
    return evaluate_command


def _finetune_head() -> Callable:
    from tritpress.cli.evaluate import finetune_head_command
    return finetune_head_command


def _search() -> Callable:
    from tritpress.cli.search_command import search_command
    return search_command


def _analyze() -> Callable:
    from tritpress.cli.analyze import analyze
    return analyze


# name -> (the command function, imported when needed; its line in `compress --help`)
COMMANDS: dict[str, tuple[Callable[[], Callable], str]] = {
    "run": (_run, "Ingest MODEL, quantize to ternary (QAT with --steps), pack, verify [, evaluate, ONNX]."),
    "export": (_export, "Export a packed checkpoint to ONNX (validated with ONNX Runtime) or to a transformers "
                          "BitNet folder (validated with from_pretrained)."),
    "info": (_info, "Size report of a packed checkpoint (verifies its checksum)."),
    "evaluate": (_evaluate, "Score COMPRESSED against its baseline on LM / classification / NER / QA, gated."),
    "finetune-head": (_finetune_head, "Fine-tune MODEL with a task head: a task baseline to evaluate against."),
    "search": (_search, "Find the smallest configuration whose quality gate passes (sharing x bits x trimming)."),
    "analyze": (_analyze, "Redundancy analysis of MODEL's block stack (what --sharing measures)."),
}


class Interrupted(Exception):
    """Ctrl-C in a command (typer would turn the KeyboardInterrupt into a silent exit 130); its message
    is the interrupt's, e.g. compressor.errors.TrainingInterrupted's step and how to continue."""


class App(TyperGroup):
    """The command group: routes `compress MODEL ...` to `run`, loads a command when it is used."""

    def parse_args(self, ctx, args):
        if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise Interrupted(str(e) or "interrupted") from e

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [self.subcommand_metavar]  # the group itself has no option but --help

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        if name not in self.commands:
            one = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
            one.command(name=name)(COMMANDS[name][0]())
            self.commands[name] = typer.main.get_command(one)
        return self.commands[name]

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, line) for name, (_, line) in COMMANDS.items()])


def command() -> App:
    return App(name="compress", help=HELP, no_args_is_help=True, rich_markup_mode=None,
               subcommand_metavar="MODEL [OPTIONS] | COMMAND [ARGS]...")
