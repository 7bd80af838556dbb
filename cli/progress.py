"""The pipeline's progress on stderr: a spinner per stage and a training bar on a terminal,
plain lines otherwise (CI logs), nothing from ranks other than 0."""
from __future__ import annotations

import os
import sys
from typing import Callable


class PlainListener:
    """Progress as plain lines on stderr (not a terminal, e.g. CI logs)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def stage(self, name):
        if not self.quiet:
            print(f"[{name}]", file=sys.stderr, flush=True)

    def note(self, line):
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def step(self, e, total):
        if not self.quiet and (e["step"] == 1 or e["step"] % 10 == 0 or e["step"] == total):
            print(f"step {e['step']}/{total} loss {e['loss']:.4f} lambda {e['lambda']:.2f} lr {e['lr']:.2e} "
                  f"{e['tokens_per_s']:.0f} tok/s{_examples_rate(e)}", file=sys.stderr, flush=True)


def _examples_rate(e: dict) -> str:
    """Task QAT's examples per second (LM steps read fixed token blocks: none)."""
    return f" {e['examples_per_s']:.1f} ex/s" if "examples_per_s" in e else ""


def with_progress(fn: Callable, quiet: bool):
    """Run fn(listener): a spinner per stage and a bar with loss, lambda, lr, tokens/s, ETA (stderr)."""
    rank = int(os.environ.get("RANK", "0"))
    if quiet or not sys.stderr.isatty() or rank != 0:
        return fn(PlainListener(quiet or rank != 0))
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                  transient=True) as progress:
        return fn(_rich_listener(progress))


def _rich_listener(progress):
    from tritpress.cli.pipeline import Listener

    task = progress.add_task("starting", total=None, info="")

    class RichListener(Listener):
        def stage(self, name):
            progress.update(task, description=name, total=None, completed=0, info="")

        def step(self, e, total):
            progress.update(task, total=total, completed=e["step"],
                            info=f"loss {e['loss']:.4f} λ {e['lambda']:.2f} lr {e['lr']:.1e} "
                                 f"{e['tokens_per_s']:.0f} tok/s{_examples_rate(e)}")

        def note(self, line):
            progress.console.print(line, markup=False, highlight=False)

    return RichListener()
