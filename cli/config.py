"""The settings of `compress run` and `compress search`, torch-free: `CompressConfig` (the pipeline:
top-level recipe keys and one table per stage) and `SearchConfig` (what the search tries).

A field's trailing comment is its --help (cli/flags.py). They live apart from cli/pipeline and
cli/search (which re-export them) so that the command line builds its options, and `--help`
answers, without importing torch."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tritpress.analyzers.settings import EvalConfig
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.settings import WEIGHT_FORMATS, SharingConfig, TernaryConfig, TrainConfig
from tritpress.exporters.settings import OnnxConfig


@dataclass
class CompressConfig:
    model: str                                   # path, hub id or pkg:NAME
    out: str | None = None                       # output folder [default: runs/<model name>]
    config: str | None = None                    # HF config.json for a bare state_dict
    trust_pickle: bool = False                   # allow full unpickling of a saved nn.Module (runs code from
                                                 # the file: trusted files only)
    vocab: str | None = None                     # the model's own vocabulary for its text (training, calibration,
                                                 # --tasks lm): a JSON map token -> id; characters when every key
                                                 # but <unk>-style markers is one character, else words [default:
                                                 # the model's tokenizer; without one, words by frequency]
    quant: TernaryConfig = field(default_factory=TernaryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    check: bool = True                           # compare outputs: original vs ternary, converted vs reload
    onnx: OnnxConfig = field(default_factory=OnnxConfig)  # [onnx] enabled = true: export model.onnx last
    trim_vocab: str | None = None                # keep only the token ids this corpus uses (+ the tokenizer's
                                                 # special and unknown tokens; other ids read as the unknown
                                                 # token): "data" = the --data training data, or a text file
    trim_dropped: str = "unk"                    # --trim-vocab: a dropped id reads the unknown token (unk), the
                                                 # kept token nearest to it in the original embedding (nearest;
                                                 # one more row index per dropped id), or a weighted sum of
                                                 # --trim-mix kept rows fit to its original row (mix; 4 bytes
                                                 # per row and dropped id)
    trim_mix: int = 4                            # --trim-dropped mix: kept rows per dropped id
    trim_learn_mix: bool = False                 # --trim-dropped mix: train the mix weights in QAT (the kept rows
                                                 # stay as fit; the teacher scores dropped ids where --augment
                                                 # swaps them in); stored as fp16 as before
    trim_min_count: int = 1                      # --trim-vocab: keep an id only when the corpus uses it this many
                                                 # times or more (rarer ids are dropped like unused ones)
    tasks: str | None = None                     # after packing, evaluate and gate on these tasks (lm,cls,tok,qa;
                                                 # data and tolerances from the recipe's [eval] table)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = re.sub(r"[^\w.-]+", "_", Path(self.model.split(":", 1)[-1]).stem or "model").strip("_")
        return Path("runs") / (name or "model")


ORDERS = ("smallest-first", "bisect")

# Why smallest first, stopping at the first PASS (the default): every candidate trains for the same
# --steps, so candidates cost about the same and the only saving is the number of runs. Trained from
# the smallest up, the first that passes is the answer (every smaller one was tried and failed)
# whatever shape quality takes over size: sharing, bits and trimming do not degrade quality in one
# order, so the assumption a bisection makes (bigger than a passing candidate passes, smaller than a
# failing one fails) can be wrong, and then it returns a bigger model than needed or misses a
# passing one. `--order bisect` makes that assumption for its log2(n) runs, when n runs are too many.
# Largest first ("cheap to aggressive") would have to train every candidate to know which passing
# one is the smallest.


@dataclass
class SearchConfig:
    max_drop: str | None = None          # largest drop of each gated score: points (1: the 0-100 scores) or a
                                         # percentage of the baseline (1%: every metric, perplexity included)
                                         # [default: the gate's: 1 point, perplexity 5%]
    target_ratio: float = 0.0            # skip, untrained, a candidate whose packed file is less than this
                                         # many times smaller than fp32 (0 = any size)
    try_sharing: str = "none,sequence,cycle,alternate"  # --sharing strategies to try, comma-separated
    try_bits: str = "int8,int4,int2,ternary"  # --embedding/--head formats to try (both set alike), comma-separated
    try_relax_rank: str = "0"            # --relax-rank values to try with sharing, comma-separated (0 = strict tie)
    try_outside: str = ""                # --outside-blocks formats to try (pooler, classifier...), comma-separated
                                         # [default: the run's --outside-blocks only]
    try_min_count: str = ""              # with --trim-vocab: --trim-min-count values to try, comma-separated
                                         # [default: the run's --trim-min-count only]
    order: str = "smallest-first"        # smallest-first: train from the smallest up, stop at the first PASS
                                         # (the smallest that passes); bisect: log2(n) runs, assuming quality
                                         # falls with size
    max_minutes: float = 0.0             # stop between candidates after this many minutes (0 = no limit)
    probe_steps: int = 0                 # train each candidate this many steps of its --steps schedule first and
                                         # gate it; only a promising one trains on to --steps (0 = no probe)
    probe_max_drop: str | None = None    # a probe dropping more than this (points, or N% of the baseline) on any
                                         # gated score ends its candidate untrained further [default: 3x --max-drop]

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"--order {self.order!r} is not one of {', '.join(ORDERS)}")
        if self.target_ratio < 0 or self.max_minutes < 0 or self.probe_steps < 0:
            raise ValueError("--target-ratio, --max-minutes and --probe-steps must be >= 0")
        if self.probe_max_drop is not None and not re.fullmatch(r"\s*\d+(\.\d+)?%?\s*", self.probe_max_drop):
            raise ValueError(f"--probe-max-drop {self.probe_max_drop!r}: a number of points or a percentage like 5%")
        bad = [b for b in split_list(self.try_bits) if b not in WEIGHT_FORMATS]
        if bad or not split_list(self.try_bits):
            raise ValueError(f"--try-bits {self.try_bits!r}: each one of {', '.join(WEIGHT_FORMATS)}")
        bad = [b for b in split_list(self.try_outside) if b not in WEIGHT_FORMATS]
        if bad:
            raise ValueError(f"--try-outside {self.try_outside!r}: each one of {', '.join(WEIGHT_FORMATS)}")
        if not split_list(self.try_sharing):
            raise ValueError("--try-sharing needs at least one strategy (none = no sharing)")
        if not all(r.isdigit() for r in split_list(self.try_relax_rank)) or not split_list(self.try_relax_rank):
            raise ValueError(f"--try-relax-rank {self.try_relax_rank!r}: comma-separated integers >= 0")
        if not all(n.isdigit() and int(n) >= 1 for n in split_list(self.try_min_count)):
            raise ValueError(f"--try-min-count {self.try_min_count!r}: comma-separated integers >= 1")
        if self.max_drop is not None:
            from tritpress.analyzers.quality.gate import Tolerance
            try:
                Tolerance.parse(self.max_drop)
            except TritpressError as e:
                raise ValueError(f"--max-drop: {e}") from None


def split_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]
