"""tritpress exporters: packed checkpoint, ONNX.

The public API is loaded on first use (PEP 562): importing a torch-free submodule, such as the
settings the command line builds its flags from, must not import torch through this package."""
from __future__ import annotations

# name -> the submodule that defines it
_API = {"save_packed": "packed", "load_packed": "packed", "read_metadata": "packed", "pack_trits": "packing",
        "unpack_trits": "packing", "pack_int4": "packing", "unpack_int4": "packing"}

__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import packed, packing
    value = getattr({"packed": packed, "packing": packing}[_API[name]], name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value
