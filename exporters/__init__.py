"""tritpress exporters: packed checkpoint, ONNX."""
from .packed import load_packed, read_metadata, save_packed
from .packing import pack_int4, pack_trits, unpack_int4, unpack_trits

__all__ = ["save_packed", "load_packed", "read_metadata", "pack_trits", "unpack_trits", "pack_int4", "unpack_int4"]
