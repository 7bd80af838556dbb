"""The evaluation settings, torch-free: `EvalConfig` (`compress evaluate`, the recipe's [eval] table)
and `FinetuneConfig` (`compress finetune-head`).

A field's trailing comment is its --help (cli/flags.py). They live apart from quality/evaluate.py
and quality/finetune.py (which re-export them) so that the command line builds its options, and
`--help` answers, without importing torch; what checks a value against the task registry is
imported when a config is made."""
from __future__ import annotations

from dataclasses import dataclass, field

from tritpress.compressor.errors import TritpressError

from .defaults import DEFAULT_DATA, PROBE_CHOICES, RESAMPLES, TAG_SCHEMES


@dataclass
class EvalConfig:
    compressed: str = ""                 # packed file, folder holding one, or any model spec
    baseline: str | None = None          # the original model (any `compress` MODEL spec) [default: the source
                                         # recorded in the packed file]
    tasks: str = "lm,cls,tok,qa"         # comma-separated: lm, cls, tok, qa, lmeval (lm-evaluation-harness)
    out: str | None = None               # report folder [default: <packed folder>/eval, else runs/eval]
    config: str | None = None            # HF config.json for a bare state_dict baseline
    trust_pickle: bool = False           # allow unpickling a saved nn.Module
    skeleton: str | None = None          # the class to load a packed custom nn.Module into: package.module:Class
                                         # (imported, called with no arguments) [default: a copy of the baseline]
    vocab: str | None = None             # the models' own vocabulary for the LM text: a JSON map token -> id;
                                         # characters when every key but <unk>-style markers is one character,
                                         # else words [default: the tokenizer; without one, words by frequency]
    # data: local files or HF names NAME[:CONFIG][@SPLIT]
    lm_data: list[str] = field(default_factory=lambda: [DEFAULT_DATA["lm"]])  # LM text (repeatable):
                                         # WikiText .txt, .jsonl/.csv, pkg:ptb, or HF NAME[:CONFIG][@SPLIT]
    lm_train: str | None = None          # masked-LM probe text for an encoder without an LM head (same formats
                                         # as --lm-data) [default: the HF train split]
    cls_data: str = DEFAULT_DATA["cls"]  # classification eval data: GLUE .tsv, .jsonl/.csv or HF
                                         # (its validation split)
    cls_train: str | None = None         # probe training data for cls [default: the HF train split]
    tok_data: str = DEFAULT_DATA["tok"]  # token-classification eval data: CoNLL column file (its
                                         # last column: IOB1/IOB2/IOBES entity tags, or plain tags such as
                                         # POS), .jsonl or HF (its validation split)
    tok_train: str | None = None         # probe training data for tok [default: the HF train split]
    tag_scheme: str = "auto"             # tok tags: auto (detected from the tags), iob1, iob2, iobes (entity
                                         # F1), or plain (POS-like: token accuracy and tag macro-F1)
    qa_data: str = DEFAULT_DATA["qa"]  # QA eval data: SQuAD .json/.zip, .jsonl or HF (its validation split)
    qa_train: str | None = None          # probe training data for qa [default: HF train split; a local
                                         # --qa-data file is split by article]
    lmeval_tasks: list[str] = field(default_factory=list)  # --tasks lmeval (repeatable, or comma-separated):
                                         # lm-eval task names, task YAML files, or local .txt files (lm-eval's
                                         # rolling perplexity of the file as one document)
    lmeval_limit: int = 0                # --tasks lmeval: at most N examples per lm-eval task; 0 = all
    lmeval_fewshot: int = -1             # --tasks lmeval: few-shot examples; -1 = the task's default
    lmeval_max_length: int = 0           # --tasks lmeval: HFLM's window in tokens; 0 = lm-eval's default
    text_column: str | None = None       # cls text column [default: sentence/text/...]
    text_pair_column: str | None = None  # cls second-text column [default: sentence2/...]
    label_column: str | None = None      # cls label column [default: label]
    lm_text_column: str = "text"         # text column of tabular LM data
    # sample counts (0 = all): evaluation examples, and probe-training examples
    max_samples: int = 0                 # evaluate at most N examples per task, seeded subsample; 0 = all
    probe_samples: int = 0               # train probes on at most N examples; 0 = all
    lm_tokens: int = 0                   # score N LM tokens (the text is cut inside the line that reaches N); 0 = all
    context: int = 0                     # LM window in tokens; 0 = min(1024, model positions)
    stride: int = 0                      # LM window stride; 0 = context/2 for causal LMs
    mlm_positions: int = 1024            # masked LMs: tokens scored for pseudo-perplexity; 0 = all
    lm_probe_windows: int = 128          # masked-LM probe training windows of --context tokens
    max_length: int = 128                # cls/tok max tokens
    qa_max_length: int = 384             # QA window tokens
    doc_stride: int = 128                # QA window overlap
    max_answer_length: int = 30          # longest QA answer, tokens
    n_best: int = 20                     # QA candidate starts/ends per window
    null_threshold: float = 0.0          # SQuAD v2 no-answer margin
    qa_train_fraction: float = 0.5       # articles used for the probe when a local QA file is split
    qa_heldout: bool = False             # own QA head: score only the articles a probe would not train on
                                         # (after finetune-head --qa-articles)
    batch_size: int = 16                 # examples per forward
    probe: str = "auto"                  # auto: the model's own head when it has one, else a probe; always:
                                         # probe even then; never: own head only (an error without one)
    probe_epochs: int = 0                # probe epochs; 0 = per task: lm 5, cls 20, tok 10, qa 10
    probe_lr: float = 1e-3               # probe learning rate
    probe_batch_size: int = 64           # examples per probe training step
    seed: int = 0                        # seed for subsamples, probes and the bootstrap
    bootstrap: int = RESAMPLES           # paired bootstrap resamples for the 95 % interval of each Δ; 0 = none
    max_drop: list[str] = field(default_factory=list)   # tolerance, repeatable: METRIC=VALUE or
                                         # TASK.METRIC=VALUE, absolute or N% of the baseline
                                         # [defaults: 1 point; perplexity 5%, bits_per_byte 2%]
    device: str = "auto"                 # auto (cuda:LOCAL_RANK when available, else cpu), cpu, cuda, cuda:N
    plots: bool = True                   # write PNG plots
    quiet: bool = False                  # no progress bars on stderr (--json implies it)

    def __post_init__(self):
        if isinstance(self.lm_data, str):
            self.lm_data = [self.lm_data]
        from .quality import tasks  # noqa: F401 - registers the built-in tasks that --tasks names
        from .quality.gate import parse_max_drop
        from .quality.registry import parse_tasks

        parse_tasks(self.tasks)
        parse_max_drop(self.max_drop)
        for name, value, choices in (("tag_scheme", self.tag_scheme, TAG_SCHEMES), ("probe", self.probe,
                                                                                    PROBE_CHOICES)):
            if value not in choices:
                raise TritpressError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


@dataclass
class FinetuneConfig:
    model: str = ""                   # an HF folder or pkg:NAME (a transformers encoder)
    task: str = "cls"                 # cls, tok or qa
    train: str = ""                   # training data (GLUE .tsv / CoNLL / SQuAD .json/.zip / .jsonl / .csv)
    out: str = ""                     # output HF folder (model + tokenizer); replaced only if a finetune-head output
    steps: int = 300                  # optimizer steps, when --epochs is 0
    epochs: int = 0                   # passes over the training data, reshuffled each epoch (seeded); 0 = --steps
    batch_size: int = 16              # examples per step
    lr: float = 5e-5                  # AdamW peak learning rate
    warmup: float = 0.06              # linear warm-up over this fraction of the steps, then linear decay to 0
    weight_decay: float = 0.01        # AdamW weight decay (not on biases and norms)
    max_length: int = 128             # cls/tok tokens; qa uses --qa-max-length / --doc-stride
    qa_max_length: int = 256          # QA window tokens
    doc_stride: int = 128             # QA window overlap
    group_batches: int = 50           # length grouping: each chunk of N batches is sorted by length, so a batch
                                      # pads little (1 = plain shuffle)
    text_column: str | None = None    # cls text column of .tsv/.csv/.jsonl data [default: sentence/text/...]
    text_pair_column: str | None = None  # cls second-text column [default: sentence2/...]
    label_column: str | None = None   # cls label column [default: label]
    max_samples: int = 0              # use at most N training examples, seeded; 0 = all
    qa_articles: float = 0.0          # qa: train on this leading fraction of the articles only (0 = all);
                                      # `compress evaluate --qa-heldout` then scores the other articles
    dev: str = ""                     # dev data (same formats): scored every --eval-every steps and at each epoch
                                      # end; the best checkpoint is the one saved
    eval_every: int = 0               # score --dev every N steps (0 = at epoch ends and at the end only)
    metric: str = ""                  # dev metric that picks the best checkpoint [default: cls accuracy, tok
                                      # f1_strict, qa f1]
    dev_samples: int = 0              # score at most N dev examples, seeded; 0 = all
    eval_batch_size: int = 64         # dev examples per forward
    max_minutes: float = 0.0          # wall budget: stop cleanly after the step that passes it, keep the best;
                                      # 0 = none
    fit_budget: bool = False          # with --max-minutes: shorten the schedule when the pace so far will not
                                      # reach its end in time, so the decay still ends (the run then depends on
                                      # the machine's speed)
    log_every: int = 50               # a progress line on stderr every N steps
    seed: int = 0                     # seed (head init, dropout, data order, subsamples)
