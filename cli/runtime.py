"""What the commands do to the process before they work: quiet libraries, start workers."""
from __future__ import annotations

import os
import subprocess
import sys

# flags of the launching command that torchrun's workers must not see (they would launch again)
LAUNCH_FLAGS = ("--nproc", "--max-restarts")


def disable_library_progress_bars() -> None:
    """Our own display replaces the libraries' tqdm bars. tqdm reads TQDM_DISABLE when it is
    imported (torch imports it), so the entry point calls this before importing the commands;
    torchrun's workers inherit it."""
    os.environ.setdefault("TQDM_DISABLE", "1")


def quiet_libraries() -> None:
    """No warnings, transformers logging or progress bars, no tokenizers fork warning."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def launch_workers(nproc: int, max_restarts: int) -> int:
    """Re-run this very command under torchrun with N local workers (minus --nproc); its exit code."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in LAUNCH_FLAGS:
            skip = True
            continue
        if a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "tritpress.cli.main", *args]
    return subprocess.call(cmd)
