"""Process memory: hand freed heap pages back to the operating system.

Tensors of a few MB (a layer's weights) come from glibc's heap once it has raised its mmap threshold, so
freeing them (converting a model in place, dropping a reloaded copy) leaves the pages counted in the
process's resident memory until something reuses them. `malloc_trim(0)` returns every free page."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

_libc: dict = {}


def _symbol(name: str):
    """A glibc function, or None where the C library has no such symbol."""
    if name not in _libc:
        lib = ctypes.util.find_library("c")
        try:
            _libc[name] = getattr(ctypes.CDLL(lib), name, None) if lib else None
        except OSError:
            _libc[name] = None
    return _libc[name]


def release_free_memory() -> None:
    """malloc_trim(0) where the C library has it (glibc); a no-op elsewhere."""
    trim = _symbol("malloc_trim")
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3             # glibc mallopt parameter
DEFAULT_MMAP_MAX = 32 << 20       # where glibc's dynamic threshold ends up after large frees (64-bit)


@contextlib.contextmanager
def lean_heap(threshold: int = 1 << 20):
    """Inside: every allocation of `threshold` bytes or more is its own memory mapping, returned to the OS
    the moment it is freed (glibc; elsewhere a no-op). For runs of a few large passes (post-training),
    where a fragmented heap, not the live tensors, would set the peak; training loops are better off with
    the heap. On exit the threshold is glibc's ceiling, the value its dynamic rule settles at."""
    mallopt = _symbol("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_MAX)
