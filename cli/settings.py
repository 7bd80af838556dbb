"""Which flag sets which setting: one FlagSection per config dataclass and command.

The fields themselves (type, default, help) are declared once, in their dataclasses; this
table only says how a field is spelled on the command line where that is not simply
`--field-name`. The recipe key is always the field name, in its table.
"""
from __future__ import annotations

import dataclasses

# every config from its torch-free module: a command's --help builds these sections without torch
from tritpress.analyzers.settings import EvalConfig, FinetuneConfig
from tritpress.cli.config import CompressConfig, SearchConfig
from tritpress.cli.flags import FlagSection
from tritpress.cli.recipe import SECTIONS
from tritpress.compressor.settings import SharingConfig, TernaryConfig, TrainConfig
from tritpress.exporters.settings import GgufExportConfig, HfExportConfig, OnnxConfig, PackedLoadConfig

# top-level recipe keys of `compress run` (MODEL is the positional argument)
PIPELINE = FlagSection("", CompressConfig, names={"out": ("out", "-o")}, skip=("model", *SECTIONS))
QUANT = FlagSection("quant", TernaryConfig)
TRAIN = FlagSection("train", TrainConfig)
# --share-FIELD, except where the flag predates the prefix (and --share-sequences etc. drop calib_/auto_)
SHARING = FlagSection("sharing", SharingConfig, prefix="share-", names={
    "strategy": "sharing", "share": "share", "relax_rank": "relax-rank", "target_params": "target-params",
    "max_loss_increase": "max-loss-increase", "calib_sequences": "share-sequences",
    "calib_seq_len": "share-seq-len", "auto_pairs": "share-pairs", "auto_refine": "share-refine",
    "auto_probe_steps": "share-probe-steps", "auto_probe_top": "share-probe-top",
    "tie_embeddings": "tie-embeddings", "tie_decoder": "tie-decoder"})
# `compress run --onnx --onnx-format int2 ...`: the export after packing
PIPELINE_ONNX = FlagSection("onnx", OnnxConfig, prefix="onnx-", names={"enabled": "onnx"})
RUN = (PIPELINE, QUANT, TRAIN, SHARING, PIPELINE_ONNX)
# `compress search`: every run option (the candidates' common settings; the search sets --sharing,
# --relax-rank, --embedding, --head and --trim-vocab per candidate), and what to try
SEARCH = (*RUN, FlagSection("search", SearchConfig))

# `--skeleton package.module:Class` of the commands that load a packed file (`evaluate` has its own
# EvalConfig.skeleton, a key of the recipe's [eval] table)
PACKED_LOAD = FlagSection("load", PackedLoadConfig)
# `compress export PACKED --onnx OUT | --hf DIR`: --onnx is the output file, so `enabled` has no flag;
# the --hf export's settings are --hf-FIELD
EXPORT = (FlagSection("onnx", OnnxConfig, names={"format": "onnx-format"}, skip=("enabled",)),
          FlagSection("hf", HfExportConfig, prefix="hf-"), FlagSection("gguf", GgufExportConfig, prefix="gguf-"),
          PACKED_LOAD)
INFO = (PACKED_LOAD,)

# `compress analyze`: the calibration settings of --sharing, under the same names; the
# analyze command's older names stay accepted
ANALYZE = (dataclasses.replace(
    SHARING, only=("data", "share", "init", "relax_rank", "calib_sequences", "calib_seq_len", "calib_dtype",
                   "auto_pairs"),
    hidden_aliases={"data": "data", "calib_sequences": "sequences", "calib_seq_len": "seq-len",
                    "auto_pairs": "pairs"}),)

EVALUATE = (FlagSection("eval", EvalConfig, names={"baseline": ("baseline", "-b"), "out": ("out", "-o")},
                        skip=("compressed",)),)
FINETUNE = (FlagSection("finetune", FinetuneConfig, names={"out": ("out", "-o")}, skip=("model",),
                        required=("task", "train", "out")),)
