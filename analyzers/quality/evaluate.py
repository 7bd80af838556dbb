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
from pathlib import Path

import torch

from tritpress.compressor.errors import TritpressError

from . import tasks as builtin  # noqa: F401 - importing it registers the built-in tasks
from .bootstrap import RESAMPLES, intervals
from .distributed import rank_world
from .gate import gate_row, parse_max_drop, tolerance_for
from .registry import Task, TaskData, get, parse_tasks
from tritpress.analyzers.settings import EvalConfig  # re-exported: torch-free home

PACKED_NAME = "model.tritpress.safetensors"


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
