"""The settings of the compressor, torch-free: `TernaryConfig` (what `prepare`/`convert` do),
`SharingConfig` (cross-layer ties) and `TrainConfig` (QAT), with the value lists their fields accept.

Every CLI flag of these maps to one field; a field's trailing comment is its --help (cli/flags.py).
They live apart from the code that uses them (config, share, train, which re-export them) so that
the command line builds its options, and `--help` answers, without importing torch."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

TERNARY_METHODS = ("absmean", "twn")
GRANULARITIES = ("tensor", "channel")
GRANULARITY_CHOICES = ("auto", *GRANULARITIES)  # auto: structure.default_granularity
# How a non-block weight (embedding, output head, Linear outside the block stack) is stored.
WEIGHT_FORMATS = ("keep", "fp32", "fp16", "bf16", "int8", "int4", "int2", "ternary")
FLOAT_FORMATS = ("fp32", "fp16", "bf16")   # the keys of config.FLOAT_DTYPES (their torch dtypes)
ACT_BITS = (None, 8)
GROUP_SIZES = (0, 16, 32, 64, 128, 256)   # 0: one scale per row; else MatMulNBits' and GGUF's block sizes
INT_FORMATS = ("int8", "int4", "int2")     # the integer formats: one scale per row, or per group of a row


def grouped(shape, kind: str, group_size: int) -> int:
    """Scales per row of an int-format weight of `shape` quantized with `group_size` (0: one per row, as
    when the rows are not a whole number of groups: an LSTM's 650-wide rows, a bias)."""
    if not group_size or kind not in INT_FORMATS or len(shape) != 2 or shape[-1] % group_size:
        return 0
    return shape[-1] // group_size


@dataclass
class TernaryConfig:
    """What `prepare`/`convert` do to a model.

    Linear / Conv1D / RNN weights inside the repeated block stack become ternary
    ({-1, 0, +1} * scale). Embeddings, the output head and Linears outside the stack
    follow their own format; norms and biases stay float (stored as `float_dtype`).
    """

    method: str = "absmean"          # ternary quantizer: absmean (BitNet b1.58) | twn (TernaryBERT)
    granularity: str = "auto"        # one scale per tensor or per output channel; auto: per channel for a task model (cls/tok/qa head), per tensor otherwise
    act_bits: int | None = None      # 8: per-token absmax int8 activations (W1.58A8) [default: off]
    embedding: str = "int8"          # embedding storage: keep | fp32 | fp16 | bf16 | int8 | int4 | int2 | ternary (per row)
    head: str = "int8"               # output head storage; a head tied to the embedding follows --embedding
    outside_blocks: str = "keep"     # Linears outside the block stack (pooler, classifier...)
    float_dtype: str = "fp16"        # storage of norms, biases and tensors kept float
    scale_dtype: str = "fp16"        # storage of quantization scales
    group_size: int = 0              # int8/int4/int2 weights: one scale per this many weights of a row (16-256, a power of two; 32 is GGUF Q4_0's and ORT 4-bit's layout); 0: one per row
    exclude: list[str] = field(default_factory=list)  # regex of module names left float (repeatable)

    def __post_init__(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")

        check("method", self.method, TERNARY_METHODS)
        check("granularity", self.granularity, GRANULARITY_CHOICES)
        check("act_bits", self.act_bits, ACT_BITS)
        for name in ("embedding", "head", "outside_blocks"):
            check(name, getattr(self, name), WEIGHT_FORMATS)
        check("float_dtype", self.float_dtype, FLOAT_FORMATS)
        check("scale_dtype", self.scale_dtype, FLOAT_FORMATS)
        check("group_size", self.group_size, GROUP_SIZES)
        self.exclude = list(self.exclude)

    def storage_format(self, fmt: str) -> str:
        """Resolve 'keep' to the float storage dtype."""
        return self.float_dtype if fmt == "keep" else fmt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TernaryConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TernaryConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)


STRATEGIES = ("none", "alternate", "sequential", "cycle", "sequence", "middle-cycle", "groups", "auto")
SHARE_KINDS = ("all", "attention", "ffn")
INITS = ("average", "stepwise", "closest")
CALIB_DTYPES = ("auto", "fp32", "bf16")
TRIM_DROPPED = ("unk", "nearest", "mix")   # what a dropped id reads after --trim-vocab (compressor/vocab)
TIE_EMBEDDINGS = ("off", "embedding", "average")   # --tie-embeddings: the tied head's initial value (compressor/cross_ties)


@dataclass
class SharingConfig:
    """Which blocks share weights, what is tied inside a block, and how the shared weight starts."""

    strategy: str = "none"          # cross-layer sharing: none, alternate, sequential[:N], cycle[:K], sequence[:K],
                                    # middle-cycle[:K], auto[:K], explicit groups "0,2,4;1,3,5" or a .json file
    groups: str | None = None       # with strategy groups: "0,2,4;1,3,5" or a JSON file ([[0,2,4],[1,3,5]])
    every: int = 2                  # sequential: stride N (blocks i, i+N, i+2N... share)
    unique: int = 0                 # cycle/sequence/middle-cycle/auto: unique blocks; 0 = half the stack (auto:
                                    # target_params or max_loss_increase decide)
    share: str = "all"              # matrices tied inside a block: all | attention | ffn
    init: str = "average"           # initial shared weight: group average, stepwise (one evenly spaced member)
                                    # or closest to the mean
    relax_rank: int = 0             # per-occurrence low-rank correction of shared weights (counted in sizes);
                                    # 0 = strict tie
    target_params: float = 0.0      # auto: unique block parameters to keep, as a fraction (e.g. 0.5)
    max_loss_increase: float = 0.0  # auto: largest calibration-loss increase accepted
    data: str | None = None         # calibration text for the analysis [default: the training --data]
    calib_sequences: int = 16       # calibration sequences
    calib_seq_len: int = 128        # calibration tokens per sequence
    calib_dtype: str = "auto"       # the analysis' forwards: auto | fp32 | bf16 (autocast: 1.6-3.4x faster on a CPU
                                    # with bf16 instructions, same ranking; docs/sharing.md). auto: bf16 there
                                    # when the fp32 analysis would take minutes (>= 20 TFLOP), else fp32
    auto_pairs: int = 66            # auto/analysis: block pairs tied and measured at most (0 = none)
    auto_refine: int = 12           # auto: block swaps tied and measured at most
    auto_probe_steps: int = 0       # auto: rank the candidates by their calibration loss after this many QAT
                                    # steps each, not right after tying (0 = off)
    auto_probe_top: int = 0         # auto with --share-probe-steps: fine-tune at most this many candidates,
                                    # best after tying first (0 = all)
    analyze: bool = True            # compress: write the redundancy analysis first (needs calibration text)
    tie_embeddings: str = "off"     # tie an untied output head to the input embedding, starting from the
                                    # embedding's values or the average of both: off | embedding | average
    tie_decoder: str = "none"       # encoder-decoder: tie each decoder block's self-attention and feed-forward
                                    # to an encoder block: none | same-depth | auto (the pair that costs least
                                    # on calibration text) | pairs "DEC:ENC,..." ("0:0,1:0,2:1")

    def __post_init__(self):
        s = str(self.strategy)
        if s not in STRATEGIES and ":" in s:  # "cycle:3", "sequential:3"
            s, _, arg = s.partition(":")
            if not arg.isdigit():
                raise ValueError(f"sharing {self.strategy!r}: expected NAME:INTEGER, e.g. cycle:3")
            if s == "sequential":
                self.every = int(arg)
            else:
                self.unique = int(arg)
        elif s not in STRATEGIES and (re.fullmatch(r"[\d,;\s]+", s) or s.endswith(".json")):
            self.groups, s = s, "groups"
        self.strategy = s
        for name, allowed in (("strategy", STRATEGIES), ("share", SHARE_KINDS), ("init", INITS),
                              ("calib_dtype", CALIB_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"sharing {name}={getattr(self, name)!r} is not one of {', '.join(allowed)} "
                                 "(or explicit groups like \"0,2,4;1,3,5\" / a .json file)")
        if self.tie_embeddings not in TIE_EMBEDDINGS:
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r} is not one of {', '.join(TIE_EMBEDDINGS)}")
        if self.tie_decoder not in ("none", "same-depth", "auto") and not re.fullmatch(r"\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*",
                                                                          self.tie_decoder):
            raise ValueError(f"tie_decoder={self.tie_decoder!r}: none, same-depth, auto or DEC:ENC pairs like \"0:0,1:0,2:1\"")
        if self.tie_decoder != "none" and self.strategy != "none":
            raise ValueError("tie_decoder ties decoder blocks to encoder blocks: use it without a --sharing strategy")
        if self.strategy == "groups" and not self.groups:
            raise ValueError("sharing strategy 'groups' needs groups, e.g. \"0,2,4;1,3,5\"")
        if self.relax_rank < 0 or self.every < 1 or self.unique < 0 or self.auto_probe_steps < 0 \
                or self.auto_probe_top < 0:
            raise ValueError("relax_rank >= 0, every >= 1, unique >= 0, auto_probe_steps >= 0 and "
                             "auto_probe_top >= 0 are required")
        if not 0.0 <= self.target_params <= 1.0:
            raise ValueError("target_params is a fraction of the unique block parameters, in [0, 1]")
        if self.strategy == "auto" and not (self.target_params or self.max_loss_increase or self.unique):
            raise ValueError("sharing auto needs a number of unique blocks (auto:K), target_params (e.g. 0.5) "
                             "or max_loss_increase")

    @property
    def active(self) -> bool:
        return self.strategy != "none" or self.tie_embeddings != "off" or self.tie_decoder != "none"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SCHEDULES = ("cosine", "linear", "constant")
QUANT_SCHEDULES = ("linear", "sigmoid", "none")
PARALLEL = ("ddp", "fsdp")
FUSED = ("auto", "on", "off")
TEACHER_DTYPES = ("fp32", "bf16")
FUSED_AUTO_STEPS = 200  # fused="auto" compiles for runs at least this long
TASKS = ("auto", "lm", "cls", "tok", "qa")


@dataclass
class TrainConfig:
    steps: int = 0                 # QAT optimizer steps with distillation from the original; 0 = post-training only
    data: str | None = None        # training text: .txt/.jsonl/.json/.csv/.tsv/.parquet file, pkg:ptb,
                                   # or a HF dataset NAME[:CONFIG] (online); a task model: its task's
                                   # training examples (GLUE .tsv, CoNLL columns, SQuAD .json/.zip, .jsonl/.csv)
    task: str = "auto"             # what QAT trains on: auto (the model's head: cls/tok/qa, else lm) | lm
                                   # (text blocks) | cls | tok | qa (the task's examples through its own
                                   # head, each cut to --seq-len tokens)
    text_column: str = "text"      # text column of tabular data
    eval_data: str | None = None   # held-out text (task: examples) for before/after quality [default: the
                                   # last 5% of --data]
    seq_len: int = 128             # tokens per training sequence
    doc_stride: int = 64           # task qa: tokens shared by consecutive --seq-len windows of a long context
    batch_size: int = 8            # sequences per optimizer step, all processes together
    micro_batch_size: int = 0      # sequences per forward per process (gradient accumulation); 0 = no accumulation
    lr: float = 0.0                # peak learning rate [default: 5e-4 on a task model's examples; else 2e-4 below 100M params, 1e-4 above]
    weight_decay: float = 0.0      # AdamW weight decay
    warmup_steps: int = -1         # learning-rate warm-up steps [default: 10% of steps]
    schedule: str = "cosine"       # LR decay after warm-up: cosine | linear | constant
    quant_warmup: int = -1         # steps for lambda to reach 1 [default: half of steps]
    quant_schedule: str = "linear"  # lambda schedule: linear = min(step/warmup, 1) | sigmoid | none (lambda = 1)
    grad_clip: float = 1.0         # gradient-norm clip
    task_weight: float = 1.0       # next-token CE weight
    kd_weight: float = 1.0         # logit KL / output MSE weight
    kd_temperature: float = 1.0    # KD temperature
    hidden_weight: float = 1.0     # per-block hidden-state MSE weight
    attention_weight: float = 1.0  # task models: per-block attention-probability MSE weight
    label_weight: float = 0.0      # task models: gold-label cross-entropy weight
    augment: float = 0.0           # task models: chance that each token of a training example is swapped for one
                                   # of its --augment-neighbors nearest ids in the teacher's input embedding (the
                                   # teacher scores the new input; TinyBERT-style); 0 = off
    augment_neighbors: int = 8     # --augment: nearest ids (cosine) a token may be swapped for
    max_train_tokens: int = 0      # use at most this many training tokens; 0 = all of --data
    eval_tokens: int = 32768       # held-out tokens scored before and after
    max_examples: int = 0          # task models: train on at most N examples (seeded sample); 0 = all
    eval_examples: int = 512       # task models: held-out examples scored before and after; 0 = all
    seed: int = 0                  # seed for data order and init
    checkpoint_every: int = 50     # save training state every N steps; 0 = never
    resume: bool = False           # continue from the last training checkpoint in --out
    stop_after: int = 0            # stop (checkpointed) after this many steps of the --steps schedule, as if
                                   # interrupted there: a --resume continues the same run; 0 = all --steps
    parallel: str = "ddp"          # with several processes: ddp | fsdp
    fused: str = "auto"            # torch.compile the fake-quantization and distillation kernels: on | off |
                                   # auto (on for runs of 200+ steps: compiling costs seconds once)
    teacher_dtype: str = "fp32"    # the teacher's forward: fp32 | bf16 (autocast; on a CPU with bf16
                                   # instructions ~4x faster matmuls, logits distilled from bf16 values)

    def __post_init__(self):
        for name, allowed in (("schedule", SCHEDULES), ("quant_schedule", QUANT_SCHEDULES),
                              ("parallel", PARALLEL), ("task", TASKS), ("fused", FUSED),
                              ("teacher_dtype", TEACHER_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.steps < 0 or self.seq_len < 2 or self.batch_size < 1 or self.stop_after < 0:
            raise ValueError("steps >= 0, seq_len >= 2, batch_size >= 1 and stop_after >= 0 are required")
        if not 0.0 <= self.augment < 1.0 or self.augment_neighbors < 1:
            raise ValueError("augment is a probability in [0, 1) and augment_neighbors >= 1")

    @property
    def fuses(self) -> bool:
        """Whether QAT runs the compiled kernels (compressor/fused.py)."""
        return self.fused == "on" or (self.fused == "auto" and self.last_step >= FUSED_AUTO_STEPS)

    @property
    def last_step(self) -> int:
        """The step this run stops after: --stop-after within the --steps schedule, else --steps."""
        return min(self.steps, self.stop_after) if self.stop_after else self.steps

    def resolved(self, n_params: int, task_examples: bool = False) -> "TrainConfig":
        """Concrete values for the derived defaults. `task_examples`: QAT trains on a task model's
        examples: 5e-4 (with per-channel scales) was the best of a 300-step SST-2 sweep and kept
        SST-2 and CoNLL-2003 closest to the teacher (README "Measured: task models")."""
        r = dataclasses.replace(self)
        if r.lr <= 0:
            r.lr = 5e-4 if task_examples else 2e-4 if n_params < 100_000_000 else 1e-4
        if r.warmup_steps < 0:
            r.warmup_steps = max(1, r.steps // 10)
        if r.quant_warmup < 0:
            r.quant_warmup = max(1, r.steps // 2)
        return r
