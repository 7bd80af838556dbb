"""Run the `compress` CLI in-process, as the tests of every sub-command do."""
from __future__ import annotations

import pytest

from tritpress.cli.main import main


def run_cli(args, capsys):
    """-> (exit code, stdout, stderr) of `compress ARGS`."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err
