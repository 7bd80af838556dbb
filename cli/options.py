"""Options every `compress` sub-command shares, and the fixed value sets of settings."""
import typer

from tritpress.analyzers.quality.metrics import TAG_SCHEMES
from tritpress.analyzers.quality.registry import PROBE_CHOICES
from tritpress.cli.search import ORDERS
from tritpress.compressor.config import ACT_BITS, FLOAT_DTYPES, WEIGHT_FORMATS
from tritpress.compressor.quantize import GRANULARITIES, TERNARY_METHODS
from tritpress.compressor.share import INITS, SHARE_KINDS
from tritpress.compressor.train import PARALLEL, QUANT_SCHEDULES, SCHEDULES, TASKS
from tritpress.exporters.onnx import ONNX_FORMATS

# read by cli.main.main before typer parses (it decides how errors are shown); declared on each
# command so that --help lists it and typer accepts it
DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks on errors.")

# (config class, field) -> the values its flag accepts; typer shows them and refuses others
# with a usage error (exit 2) before anything runs
CHOICES = {
    ("TernaryConfig", "method"): TERNARY_METHODS,
    ("TernaryConfig", "granularity"): GRANULARITIES,
    ("TernaryConfig", "act_bits"): ACT_BITS,
    ("TernaryConfig", "embedding"): WEIGHT_FORMATS,
    ("TernaryConfig", "head"): WEIGHT_FORMATS,
    ("TernaryConfig", "outside_blocks"): WEIGHT_FORMATS,
    ("TernaryConfig", "float_dtype"): tuple(FLOAT_DTYPES),
    ("TernaryConfig", "scale_dtype"): tuple(FLOAT_DTYPES),
    ("TrainConfig", "schedule"): SCHEDULES,
    ("TrainConfig", "quant_schedule"): QUANT_SCHEDULES,
    ("TrainConfig", "parallel"): PARALLEL,
    ("TrainConfig", "task"): TASKS,
    ("SharingConfig", "share"): SHARE_KINDS,
    ("SharingConfig", "init"): INITS,
    ("OnnxConfig", "format"): ONNX_FORMATS,
    ("EvalConfig", "probe"): PROBE_CHOICES,
    ("EvalConfig", "tag_scheme"): TAG_SCHEMES,
    ("SearchConfig", "order"): ORDERS,
}
