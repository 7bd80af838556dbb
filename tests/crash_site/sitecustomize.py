"""Test helper: a `compress` run that dies right after a training step, as a killed worker would.

With this folder on PYTHONPATH and TRITPRESS_TEST_CRASH_AT_STEP=N in the environment, every
Python process (the `compress` command, and each torchrun worker, which inherits both) wraps
train_qat so that its on_step callback, which rank 0 calls once step N is done and
checkpointed, hard-exits with code 17. In-process tests use `crash_at_step(N)` directly."""
from __future__ import annotations

import contextlib
import os

ENV = "TRITPRESS_TEST_CRASH_AT_STEP"
EXIT_CODE = 17


def install(step: int):
    """Wrap train_qat so that the run hard-exits (code 17) after step `step`. -> undo()."""
    from tritpress.compressor import train

    original = train.train_qat

    def train_qat(*args, on_step=None, **kwargs):
        def step_done(entry):
            if on_step is not None:
                on_step(entry)
            if entry["step"] == step:
                os._exit(EXIT_CODE)
        return original(*args, on_step=step_done, **kwargs)

    train.train_qat = train_qat
    return lambda: setattr(train, "train_qat", original)


@contextlib.contextmanager
def crash_at_step(step: int):
    """Within this block, train_qat hard-exits (code 17) after step `step`."""
    undo = install(step)
    try:
        yield
    finally:
        undo()


if int(os.environ.get(ENV, "0")):
    install(int(os.environ[ENV]))  # for the whole life of this process
