"""`compress`: the command line over the tritpress Python API (entry point).

`compress MODEL [flags]` is short for `compress run MODEL [flags]`; the commands live in
cli/app.py. Errors print one line on stderr and exit non-zero; --debug shows the traceback.
Importing this module has no side effects: `main()` prepares the process, then imports the app.
"""
from __future__ import annotations

import importlib
import sys


def _click_exceptions(name: str) -> tuple:
    """The exception class from click and from typer's vendored copy of click (typer >= 0.20)."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _command():
    """The click command of the app, imported after the environment is set (torch imports tqdm)."""
    from tritpress.cli.runtime import disable_library_progress_bars
    disable_library_progress_bars()
    from tritpress.cli.app import command
    return command()



def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    debug = "--debug" in args
    command = _command()
    from tritpress.cli.app import Interrupted  # loaded by _command() already
    try:
        rc = command.main(args=args, prog_name="compress", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except _click_exceptions("Exit") as e:
        sys.exit(e.exit_code)
    except _click_exceptions("Abort"):
        print("compress: aborted", file=sys.stderr)
        sys.exit(130)
    except _click_exceptions("ClickException") as e:
        print(f"compress: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C; after training's, at which step and how to go on
        print(f"compress: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        print(f"compress: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)


def _one_line(e: Exception) -> str:
    """A TritpressError as it is; anything else (a bug, or a library failing on odd input) with its class."""
    from tritpress.compressor.errors import TritpressError  # imports torch: only once something failed

    if isinstance(e, TritpressError):
        return str(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first} (re-run with --debug for the traceback)"


if __name__ == "__main__":
    main()
