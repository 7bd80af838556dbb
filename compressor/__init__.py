"""tritpress compressor: ingest, quantize, share, train.

The public API is loaded on first use (PEP 562): importing a torch-free submodule, such as the
settings the command line builds its flags from, must not import torch through this package."""
from __future__ import annotations

# name -> the submodule that defines it
_API = {"TernaryConfig": "config", "LoadedModel": "ingest", "load_model": "ingest", "ModelStructure": "structure",
        "discover": "structure", "find_block_stack": "structure", "prepare": "transform", "convert": "transform",
        "set_lambda": "transform", "get_record": "transform"}

__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import config, ingest, structure, transform
    value = getattr({"config": config, "ingest": ingest, "structure": structure,
                     "transform": transform}[_API[name]], name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value
