"""tritpress compressor: ingest, quantize, share, train."""
from .config import TernaryConfig
from .ingest import LoadedModel, load_model
from .structure import ModelStructure, discover, find_block_stack
from .transform import convert, get_record, prepare, set_lambda

__all__ = ["TernaryConfig", "LoadedModel", "load_model", "ModelStructure", "discover", "find_block_stack",
           "prepare", "convert", "set_lambda", "get_record"]
