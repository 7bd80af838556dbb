"""Fused kernels for QAT: the element-wise chains of fake quantization and of logit distillation,
compiled by torch.compile into one loop each while a training run asks for them.

Why: eagerly, per-token int8 activation quantization is five passes over the activations
(abs, amax, mul, round, clamp, div), the ternary weight quantizer as many over each weight, and
distillation over a vocabulary (two log-softmaxes, an exp, a KL, a cross-entropy and their
backward) ten or more passes over [tokens, vocab] floats; torch's eager exp alone runs at
~1 ns per element on this CPU. Compiled, each chain is one or two vectorized loops (HF's
AutoBitLinear compiles its quantizers the same way): a 1024 x 8192 KD + CE step goes from
0.16 s to 0.02 s on 2 cores.

Each kernel is a plain function (`@fusable`), called eagerly unless `fused_kernels(True)` is
active: short runs, tests and inference never pay a compile (seconds per kernel, once per
process; inductor caches on disk). Compiled results equal the eager ones up to float
reassociation (a mean or max summed in another order: tests/test_fused.py bounds it). Where
torch.compile cannot run (no C++ compiler, an unsupported platform) the first failure
switches every kernel back to eager with one warning.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch

_state = {"on": False, "broken": None}


def fusable(fn: Callable) -> Callable:
    """`fn` compiled (dynamic shapes) while fused kernels are on, else `fn` itself."""
    compiled: list = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not _state["on"]:
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True}))
        try:
            return compiled[0](*args, **kwargs)
        except Exception as e:
            out = fn(*args, **kwargs)  # the kernel's own error (bad input) raises here, eagerly, as it would
            # eager ran where compiled did not: compiling is what fails here (no compiler, a platform)
            _state["on"], _state["broken"] = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"fused kernels unavailable, running eagerly ({_state['broken']})", stacklevel=2)
            return out

    run.eager = fn
    return run


@contextlib.contextmanager
def fused_kernels(on: bool = True):
    """Within the block, `@fusable` kernels run compiled (`on`), else eagerly; restored after."""
    before = _state["on"]
    _state["on"] = bool(on) and _state["broken"] is None
    try:
        yield
    finally:
        _state["on"] = before


def fused_active() -> bool:
    return _state["on"]


def fusion_failure() -> str | None:
    """Why compiled kernels were given up in this process, or None."""
    return _state["broken"]
