"""`compress finetune-head MODEL --task cls|tok|qa --train FILE --dev FILE --out DIR`: a
task-finetuned baseline (users compress fine-tuned models).

The encoder's weights are loaded into the transformers class with the task's head
(`AutoModelFor{SequenceClassification,TokenClassification,QuestionAnswering}`; the head is
freshly initialized unless MODEL already has this task's head), and the whole model is
fine-tuned (finetune_loop.py: AdamW, warm-up and linear decay, length-grouped batches, for
--epochs or --steps, within --max-minutes). With --dev the model is scored by the evaluation
task's own runner every --eval-every steps and at each epoch end, and the best checkpoint is
what is saved. The output is a Hugging Face folder with the tokenizer, the label set in its
config (id2label), and finetune.json (config, dev curve, best step, wall time); `compress` and
`compress evaluate` read it like any other checkpoint (its own head is then used). It is
written to a temporary folder and renamed into place."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from tritpress.compressor.errors import TritpressError

from . import tasks as builtin
from .encode import ready_tokenizer
from .finetune_data import TaskFiles, dev_task_data, read_task_files, train_features
from .finetune_loop import DevTracker, LoopResult, loss_curve, run_training
from .registry import TASKS
from tritpress.analyzers.settings import FinetuneConfig  # re-exported: torch-free home

AUTO_CLASSES = {"cls": "AutoModelForSequenceClassification", "tok": "AutoModelForTokenClassification",
                "qa": "AutoModelForQuestionAnswering"}
TASK_OF = {"cls": builtin.CLS, "tok": builtin.TOK, "qa": builtin.QA}
DEFAULT_METRIC = {"cls": "accuracy", "tok": "f1_strict", "qa": "f1"}


def _folder(spec: str) -> str:
    from tritpress.compressor.bundled import resolve_bundled
    if spec.startswith("pkg:"):
        folder, gguf = resolve_bundled(spec)
        if gguf:
            raise TritpressError("finetune-head needs a transformers model folder, not a GGUF file")
        return folder
    if not (Path(spec) / "config.json").is_file():
        raise TritpressError(f"finetune-head needs a Hugging Face model folder with config.json: {spec}")
    return spec


def check_settings(cfg: FinetuneConfig) -> str:
    """The dev metric; a bad setting is a one-line error."""
    if cfg.task not in AUTO_CLASSES:
        raise TritpressError(f"--task must be one of {', '.join(AUTO_CLASSES)}")
    if cfg.batch_size < 1 or (cfg.epochs < 1 and cfg.steps < 1) or cfg.epochs < 0:
        raise TritpressError("--batch-size and --epochs or --steps must be positive")
    if not 0 <= cfg.warmup < 1:
        raise TritpressError("--warmup is a fraction of the steps: 0 <= warmup < 1")
    metric = cfg.metric or DEFAULT_METRIC[cfg.task]
    names = [m.name for m in TASK_OF[cfg.task].metrics]
    if metric not in names:
        raise TritpressError(f"--metric {metric!r} is not a {cfg.task} metric; choose from {', '.join(names)}")
    return metric


def check_out(out: Path, folder: str) -> None:
    """Never the input, never a folder that is not an earlier finetune-head output."""
    from tritpress.compressor.fileio import refuse_overwrite_input
    refuse_overwrite_input([out, out / "config.json"], [folder])
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "finetune.json").is_file())):
        raise TritpressError(f"--out {out} exists and is not a finetune-head output; choose another folder")


def existing_head(config) -> str | None:
    """The task whose head MODEL already has (by its architectures), or None (a bare encoder)."""
    for arch in config.architectures or []:
        for name, task in TASKS.items():
            if task.head_classes and arch.endswith(task.head_classes):
                return name
    return None


def head_settings(config, cfg: FinetuneConfig, labels: list[str] | None) -> dict:
    """from_pretrained kwargs of the head: the label set goes into the model config (id2label)."""
    have = existing_head(config)
    if have and have != cfg.task:
        raise TritpressError(f"{cfg.model} already has a {TASKS[have].title} head ({config.architectures[0]}); "
                             f"--task {cfg.task} does not match it: use --task {have} or the base encoder")
    if labels is None:
        return {}
    if have == cfg.task:
        names = [str(config.id2label[i]) for i in range(config.num_labels)]
        generic = names == [f"LABEL_{i}" for i in range(len(names))]
        if len(names) != len(labels) or not (generic or names == labels):
            raise TritpressError(f"{cfg.model}'s head has the labels {names[:6]}, the training data "
                                 f"{labels[:6]}: fine-tune the base encoder instead")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def dev_scorer(task, tok, files: TaskFiles, cfg: FinetuneConfig):
    """score(model) -> the task's metrics on the dev split, by the task's own runner (what
    `compress evaluate` reports), or None without --dev."""
    from .evaluate import EvalConfig
    data = dev_task_data(task, files)
    if data is None:
        return None
    ecfg = EvalConfig(tasks=task.name, max_length=cfg.max_length, qa_max_length=cfg.qa_max_length,
                      doc_stride=cfg.doc_stride, batch_size=cfg.eval_batch_size, seed=cfg.seed, quiet=True,
                      plots=False)
    return lambda model: task.run(task, model, tok, data, ecfg, "dev")["metrics"]


def finetune_head(cfg: FinetuneConfig, progress=None) -> dict:
    """Fine-tune, keep the best dev checkpoint, save; returns finetune.json's content.
    progress(kind, info): kind "step", "eval" or "stop" (the CLI draws them on stderr)."""
    import transformers
    started = time.monotonic()
    metric, folder, out = check_settings(cfg), _folder(cfg.model), Path(cfg.out)
    check_out(out, folder)
    files = read_task_files(cfg)
    head_kw = head_settings(transformers.AutoConfig.from_pretrained(folder), cfg, files.labels)
    tok = ready_tokenizer(transformers.AutoTokenizer.from_pretrained(folder), need_fast=cfg.task != "cls")
    train = train_features(cfg, tok, files.train, files.labels)
    torch.manual_seed(cfg.seed)
    model = getattr(transformers, AUTO_CLASSES[cfg.task]).from_pretrained(folder, **head_kw)
    task = TASK_OF[cfg.task]
    score = dev_scorer(task, tok, files, cfg)
    tracker = DevTracker(metric, task.metric(metric).lower_is_better) if score else None
    result = run_training(model, train, cfg, tok.pad_token_id, score, tracker, started, progress)
    if tracker and tracker.best_state is not None:
        model.load_state_dict(tracker.best_state)
    info = run_record(cfg, folder, files, train, result, started)
    save_folder(model.eval(), tok, info, out)
    return info


def run_record(cfg: FinetuneConfig, folder: str, files: TaskFiles, train, result: LoopResult, started: float) -> dict:
    """finetune.json: what was trained on what, the dev curve, the checkpoint kept, the time."""
    tracker, losses = result.tracker, result.losses
    return {"config": dataclasses.asdict(cfg), "base_folder": folder, "task": cfg.task, "labels": files.labels,
            "data": {**files.provenance, "train_examples": train.examples, "train_features": len(train.features),
                     "dev_examples": files.dev.size if files.dev is not None else 0},
            "steps": result.steps, "planned_steps": result.planned_steps,
            "scheduled_steps": result.scheduled_steps, "steps_per_epoch": result.steps_per_epoch,
            "epochs_done": round(result.steps / result.steps_per_epoch, 3), "stopped": result.stopped,
            "metric": tracker.metric if tracker else None, "dev_curve": tracker.curve if tracker else [],
            "best": tracker.best if tracker else None,
            "saved": "best dev checkpoint" if tracker else "last step",
            "first_loss": losses[0], "final_loss_mean_last_10": sum(losses[-10:]) / len(losses[-10:]),
            "loss_curve": loss_curve(losses, cfg.log_every),
            "wall_seconds": round(time.monotonic() - started, 1), "threads": torch.get_num_threads()}


def save_folder(model, tok, info: dict, out: Path) -> None:
    """The model, tokenizer and finetune.json, written to a temporary folder renamed to `out`."""
    from tritpress.compressor.fileio import atomic_dir, write_json
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "finetune.json", info)
