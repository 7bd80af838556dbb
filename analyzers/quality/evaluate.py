"""`compress evaluate COMPRESSED --baseline ORIGINAL --tasks lm,cls,tok,qa` as a function.

    from tritpress.analyzers.quality import EvalConfig, evaluate
    report = evaluate(EvalConfig(compressed="runs/minilm", baseline="pkg:all-MiniLM-L6-v2",
                                 tasks="cls,tok", cls_data="sst-2/dev.tsv", cls_train="sst-2/train.tsv", ...))
    report["passed"]  # the gate's verdict

Both models see the same data, the same protocol and (for probes) the same seeds and budget.
Writes OUT/report.json, OUT/report.md and PNG plots (rank 0 only under torchrun). A task that
fails is recorded (tasks.<label>.error, errors) beside the ones that finished; the gate fails.
"""
from __future__ import annotations

import copy
import dataclasses
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tritpress.compressor.errors import TritpressError

from . import tasks as builtin
from .bootstrap import RESAMPLES, intervals
from .distributed import rank_world
from .gate import gate_row, parse_max_drop, tolerance_for
from .metrics import TAG_SCHEMES
from .registry import PROBE_CHOICES, Task, TaskData, get, parse_tasks

PACKED_NAME = "model.tritpress.safetensors"


@dataclass
class EvalConfig:
    compressed: str = ""                 # packed file, folder holding one, or any model spec
    baseline: str | None = None          # the original model (any `compress` MODEL spec) [default: the source
                                         # recorded in the packed file]
    tasks: str = "lm,cls,tok,qa"         # comma-separated: lm, cls, tok, qa
    out: str | None = None               # report folder [default: <packed folder>/eval, else runs/eval]
    config: str | None = None            # HF config.json for a bare state_dict baseline
    trust_pickle: bool = False           # allow unpickling a saved nn.Module
    skeleton: str | None = None          # the class to load a packed custom nn.Module into: package.module:Class
                                         # (imported, called with no arguments) [default: a copy of the baseline]
    vocab: str | None = None             # the models' own vocabulary for the LM text: a JSON map token -> id;
                                         # characters when every key but <unk>-style markers is one character,
                                         # else words [default: the tokenizer; without one, words by frequency]
    # data: local files or HF names NAME[:CONFIG][@SPLIT]
    lm_data: list[str] = field(default_factory=lambda: [builtin.LM.default_data])  # LM text (repeatable):
                                         # WikiText .txt, .jsonl/.csv, pkg:ptb, or HF NAME[:CONFIG][@SPLIT]
    lm_train: str | None = None          # masked-LM probe text for an encoder without an LM head (same formats
                                         # as --lm-data) [default: the HF train split]
    cls_data: str = builtin.CLS.default_data  # classification eval data: GLUE .tsv, .jsonl/.csv or HF
                                         # (its validation split)
    cls_train: str | None = None         # probe training data for cls [default: the HF train split]
    tok_data: str = builtin.TOK.default_data  # token-classification eval data: CoNLL column file (its
                                         # last column: IOB1/IOB2/IOBES entity tags, or plain tags such as
                                         # POS), .jsonl or HF (its validation split)
    tok_train: str | None = None         # probe training data for tok [default: the HF train split]
    tag_scheme: str = "auto"             # tok tags: auto (detected from the tags), iob1, iob2, iobes (entity
                                         # F1), or plain (POS-like: token accuracy and tag macro-F1)
    qa_data: str = builtin.QA.default_data  # QA eval data: SQuAD .json/.zip, .jsonl or HF (its validation split)
    qa_train: str | None = None          # probe training data for qa [default: HF train split; a local
                                         # --qa-data file is split by article]
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
        parse_tasks(self.tasks)
        parse_max_drop(self.max_drop)
        for name, value, choices in (("tag_scheme", self.tag_scheme, TAG_SCHEMES), ("probe", self.probe,
                                                                                    PROBE_CHOICES)):
            if value not in choices:
                raise TritpressError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


# ------------------------------------------------------------------ models


def _packed_file(spec: str) -> Path | None:
    p = Path(spec)
    if p.is_dir() and (p / PACKED_NAME).is_file():
        return p / PACKED_NAME
    if p.is_file() and p.suffix == ".safetensors":
        from tritpress.exporters.packed import read_metadata
        try:
            read_metadata(p)
            return p
        except Exception:
            return None
    return None


def load_models(cfg: EvalConfig):
    """(baseline LoadedModel, compressed nn.Module, tokenizer, description)."""
    from tritpress.compressor.ingest import load_model
    packed = _packed_file(cfg.compressed)
    baseline_spec = cfg.baseline
    if baseline_spec is None and packed is not None:
        from tritpress.exporters.packed import read_metadata
        src = read_metadata(packed)["source"]
        baseline_spec = str(Path(src["path"]) / src["gguf_file"]) if src.get("gguf_file") else src["path"]
        if not Path(baseline_spec).exists():
            raise TritpressError(f"the original recorded in {packed} ({baseline_spec}) is not here; pass --baseline")
    if baseline_spec is None:
        raise TritpressError("pass --baseline ORIGINAL (the model the compressed one is compared with)")
    base = load_model(baseline_spec, cfg.config, cfg.trust_pickle)
    if packed is not None:
        from tritpress.exporters.packed import load_packed, skeleton_from_spec
        if cfg.skeleton:
            skeleton = skeleton_from_spec(cfg.skeleton)
        else:
            skeleton = None if base.source.is_transformers else copy.deepcopy(base.model)
        comp, comp_tok, comp_desc = load_packed(packed, skeleton=skeleton), None, str(packed)
    else:
        loaded = load_model(cfg.compressed, cfg.config, cfg.trust_pickle)
        comp, comp_tok, comp_desc = loaded.model, loaded.tokenizer, cfg.compressed
    info = {"baseline": baseline_spec, "baseline_class": base.source.model_class, "compressed": comp_desc,
            "compressed_class": type(comp).__name__, "packed_file": str(packed) if packed else None,
            "notes": base.source.notes}
    return base, comp.eval(), base.tokenizer or comp_tok, info


# ------------------------------------------------------------------ run


def read_jobs(cfg: EvalConfig, base_model, tokenizer) -> list[tuple[Task, TaskData]]:
    """Every task's data, read once before any model runs (a bad file fails fast): the same data
    for the baseline and the compressed model. The baseline decides own head or probe."""
    jobs = []
    for name in parse_tasks(cfg.tasks):
        task = get(name)
        need_train = task.probe_needed(base_model, tokenizer, cfg)
        jobs += [(task, data) for data in task.read(task, cfg, need_train)]
    return jobs


def check_jobs(jobs: list[tuple[Task, TaskData]], models, tokenizer, cfg: EvalConfig) -> None:
    """Every task's own input checks on both models, before any model runs: bad input fails in
    one line before compute, not after the tasks before it."""
    for task, data in jobs:
        if task.check is not None:
            for model in models:
                task.check(task, model, tokenizer, data, cfg)


def score_job(task: Task, data: TaskData, models, tokenizer, cfg: EvalConfig) -> tuple[dict, dict]:
    """(report.json tasks.<label>: both models' results, or why the task was skipped (an error on
    the baseline skips the task; one on the compressed model only is raised); {role: per-example
    statistics}, kept out of the report)."""
    entry, stats = {"task": task.name, "data": data.protocol}, {}
    try:
        for role, model in zip(("baseline", "compressed"), models):
            t0 = time.perf_counter()
            entry[role] = task.run(task, model, tokenizer, data, cfg, f"{data.label} {role}")
            entry[role]["seconds"] = round(time.perf_counter() - t0, 3)
            stats[role] = entry[role].pop("per_example", None)
    except TritpressError as e:
        if "baseline" in entry:
            raise
        entry["skipped"] = str(e)
    return entry, stats


def gate_rows(task: Task, label: str, entry: dict, overrides: dict, stats: dict | None = None,
              cfg: EvalConfig | None = None) -> list[dict]:
    """One gate row per declared metric that both models reported, with the paired-bootstrap
    interval of its Δ where the runner gave per-example statistics for both models."""
    if "skipped" in entry or "error" in entry:
        return []
    base, comp = entry["baseline"]["metrics"], entry["compressed"]["metrics"]
    stats = stats or {}
    resamples, seed = (cfg.bootstrap, cfg.seed) if cfg else (RESAMPLES, 0)
    cis = intervals(stats.get("baseline"), stats.get("compressed"), resamples, seed)
    n = stats["baseline"].n if cis else None
    if cis:
        entry["bootstrap"] = {"unit": stats["baseline"].unit, "n": n, "resamples": resamples, "seed": seed,
                              "paired": True, "interval": "95 % percentile"}
    return [gate_row(label, label, metric, base[metric.name], comp[metric.name], entry["compressed"]["head"],
                     tolerance_for(task.name, metric, overrides), cis.get(metric.name), n if metric.name in cis
                     else None)
            for metric in task.gated if metric.name in base and metric.name in comp]


def one_line(e: Exception) -> str:
    """An exception as one line: its message's first line, with the type unless it is ours."""
    first = (str(e).strip().splitlines() or [""])[0]
    return first if isinstance(e, TritpressError) else f"{type(e).__name__}: {first}".rstrip(": ")


def score_all(jobs, models, tokenizer, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """(tasks, gate rows). A task that fails records its one-line error and the others still run:
    the finished tasks' results are not lost to a later one's failure (in one process; under
    torchrun the failure still ends the run)."""
    overrides = parse_max_drop(cfg.max_drop)
    tasks, rows = {}, []
    for task, data in jobs:
        try:
            tasks[data.label], stats = score_job(task, data, models, tokenizer, cfg)
        except Exception as e:  # noqa: BLE001 - any failure of one task, reported, not fatal to the others
            if rank_world()[1] > 1:
                raise  # a rank that went on alone would wait forever in the next task's collectives
            tasks[data.label] = {"task": task.name, "data": data.protocol, "error": one_line(e)}
            continue
        rows += gate_rows(task, data.label, tasks[data.label], overrides, stats, cfg)
    return tasks, rows


def _out_dir(cfg: EvalConfig, info: dict) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path(info["packed_file"]).parent / "eval" if info["packed_file"] else Path("runs") / "eval"


def evaluate(cfg: EvalConfig) -> dict:
    """Score the baseline and the compressed model on every task, gate, write the report files."""
    from tritpress.compressor.distributed import init_distributed
    from tritpress.compressor.fileio import check_writable, refuse_overwrite_input

    ctx = init_distributed()
    torch.manual_seed(cfg.seed)
    base, comp, tokenizer, info = load_models(cfg)
    device = ctx.device if cfg.device == "auto" else torch.device(cfg.device)
    base.model.to(device)
    comp.to(device)
    out = _out_dir(cfg, info)
    refuse_overwrite_input([out / "report.json", out / "report.md"], [cfg.compressed, info["baseline"]])
    check_writable(out, "--out")
    jobs = read_jobs(cfg, base.model, tokenizer)
    check_jobs(jobs, (base.model, comp), tokenizer, cfg)
    tasks, rows = score_all(jobs, (base.model, comp), tokenizer, cfg)
    errors = {label: e["error"] for label, e in tasks.items() if "error" in e}
    report = {"passed": bool(rows) and not errors and all(r["status"] == "PASS" for r in rows), "rows": rows,
              "tasks": tasks, "models": info, "config": dataclasses.asdict(cfg),
              "environment": _versions(ctx.world, device), "files": {}}
    if errors:
        report["errors"] = errors
    if not rows:
        report["note"] = "no task produced numbers for both models"
    if ctx.is_main:
        from .report import write_outputs
        write_outputs(report, out, info.get("packed_file"), cfg.plots)
    return report


def _versions(world: int, device) -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "platform": platform.platform(), "processes": world,
           "device": str(device)}
    for pkg in ("torch", "transformers", "tokenizers", "seqeval", "datasets", "numpy", "tritpress"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


STAGE_KEYS = ("passed", "rows", "tasks", "files")  # what the pipeline's report.json keeps of it


def evaluate_packed(settings: EvalConfig, tasks: str, packed_path, baseline: str, report_dir, *,
                    config: str | None = None, trust_pickle: bool = False, vocab: str | None = None) -> dict:
    """A packed file against its original model on `tasks` (e.g. "lm,cls"), with `settings` (a
    recipe's [eval] table; its model, task and output fields are replaced, and its vocab when the run
    has one); the report files go to `report_dir`. Runs whole on this process (rank 0 after
    training), quietly; returns the report's STAGE_KEYS. The pipeline's evaluation stage."""
    from .distributed import local_only
    ecfg = dataclasses.replace(settings, compressed=str(packed_path), baseline=baseline, config=config,
                               trust_pickle=trust_pickle, vocab=vocab or settings.vocab, tasks=tasks,
                               out=str(report_dir), quiet=True)
    with local_only():
        report = evaluate(ecfg)
    return {k: report[k] for k in STAGE_KEYS}
