"""Process plumbing the commands share: quiet third-party logging, and re-running the
command line under torchrun with N local workers (`--nproc`)."""
from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore")
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:
        pass


def launch_workers(nproc: int, max_restarts: int) -> int:
    """Re-run this very command under torchrun with N local workers (minus --nproc)."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "tritpress.cli.main", *args]
    return subprocess.call(cmd)
