"""Options every `compress` sub-command shares, and the fixed value sets of settings."""
import typer

# from the torch-free settings modules: a command's --help imports no torch
from tritpress.analyzers.defaults import PROBE_CHOICES, TAG_SCHEMES
from tritpress.cli.config import ORDERS
from tritpress.compressor.settings import (ACT_BITS, CALIB_DTYPES, FLOAT_FORMATS, FUSED, GRANULARITY_CHOICES, INITS, PARALLEL,
                                           QUANT_SCHEDULES, SCHEDULES, SHARE_KINDS, TASKS, TEACHER_DTYPES,
                                           TERNARY_METHODS, TIE_EMBEDDINGS, TRIM_DROPPED, WEIGHT_FORMATS)
from tritpress.exporters.settings import GGUF_TERNARY_TYPES, HF_LINEAR_CLASSES, ONNX_FORMATS

# read by cli.main.main before typer parses (it decides how errors are shown); declared on each
# command so that --help lists it and typer accepts it
DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks on errors.")

# (config class, field) -> the values its flag accepts; typer shows them and refuses others
# with a usage error (exit 2) before anything runs
CHOICES = {
    ("TernaryConfig", "method"): TERNARY_METHODS,
    ("TernaryConfig", "granularity"): GRANULARITY_CHOICES,
    ("TernaryConfig", "act_bits"): ACT_BITS,
    ("TernaryConfig", "embedding"): WEIGHT_FORMATS,
    ("TernaryConfig", "head"): WEIGHT_FORMATS,
    ("TernaryConfig", "outside_blocks"): WEIGHT_FORMATS,
    ("TernaryConfig", "float_dtype"): FLOAT_FORMATS,
    ("TernaryConfig", "scale_dtype"): FLOAT_FORMATS,
    ("TrainConfig", "schedule"): SCHEDULES,
    ("TrainConfig", "quant_schedule"): QUANT_SCHEDULES,
    ("TrainConfig", "parallel"): PARALLEL,
    ("TrainConfig", "task"): TASKS,
    ("TrainConfig", "fused"): FUSED,
    ("TrainConfig", "teacher_dtype"): TEACHER_DTYPES,
    ("SharingConfig", "share"): SHARE_KINDS,
    ("SharingConfig", "init"): INITS,
    ("SharingConfig", "calib_dtype"): CALIB_DTYPES,
    ("SharingConfig", "tie_embeddings"): TIE_EMBEDDINGS,
    ("OnnxConfig", "format"): ONNX_FORMATS,
    ("HfExportConfig", "linear_class"): HF_LINEAR_CLASSES,
    ("GgufExportConfig", "ternary_type"): GGUF_TERNARY_TYPES,
    ("EvalConfig", "probe"): PROBE_CHOICES,
    ("EvalConfig", "tag_scheme"): TAG_SCHEMES,
    ("SearchConfig", "order"): ORDERS,
    ("CompressConfig", "trim_dropped"): TRIM_DROPPED,
}
