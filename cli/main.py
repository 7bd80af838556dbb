"""`compress`: the command line over the tritpress Python API.

`compress MODEL [flags]` is short for `compress run MODEL [flags]`.
Errors print one line on stderr and exit non-zero; --debug shows the traceback.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

# library progress bars (tqdm reads this when it is imported); our own display replaces them
os.environ.setdefault("TQDM_DISABLE", "1")
from enum import Enum
from typing import List, Optional

import typer
from typer.core import TyperGroup

from tritpress.compressor.config import FLOAT_DTYPES, WEIGHT_FORMATS, TernaryConfig
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.quantize import GRANULARITIES, TERNARY_METHODS
from tritpress.compressor.share import INITS, SHARE_KINDS, SharingConfig
from tritpress.compressor.train import PARALLEL, QUANT_SCHEDULES, SCHEDULES, TrainConfig

from tritpress.cli.export import OnnxFormat, export as export_command
from tritpress.cli.launch import launch_workers as _launch_workers, quiet_libraries as _quiet_libraries
from tritpress.cli.options import DebugOpt

DEFAULTS = TernaryConfig()
TRAIN = TrainConfig()
SHARING = SharingConfig()


class DefaultCommandGroup(TyperGroup):
    """Routes `compress MODEL ...` to the `run` command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=DefaultCommandGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Post-hoc ternary (1.58-bit) compression of transformer and RNN checkpoints. "
                       "`compress MODEL` runs the pipeline (same as `compress run MODEL`).")


def _choices(name: str, values) -> type[Enum]:
    """An Enum typer can show as a choice list."""
    return Enum(name, {str(v): str(v) for v in values}, type=str)


Method = _choices("Method", TERNARY_METHODS)
Granularity = _choices("Granularity", GRANULARITIES)
WeightFormatChoice = _choices("WeightFormat", WEIGHT_FORMATS)
FloatDtype = _choices("FloatDtype", FLOAT_DTYPES)
ActBits = _choices("ActBits", ["8"])
Schedule = _choices("Schedule", SCHEDULES)
QuantSchedule = _choices("QuantSchedule", QUANT_SCHEDULES)
Parallel = _choices("Parallel", PARALLEL)
ShareKind = _choices("ShareKind", SHARE_KINDS)
ShareInit = _choices("ShareInit", INITS)


def _value(choice):
    return None if choice is None else choice.value


app.command(name="export")(export_command)


@app.command()
def run(
    model: Optional[str] = typer.Argument(None, help="HF model folder or hub id, .gguf file, state_dict "
                                          "(.pt/.bin/.safetensors, with --config), saved nn.Module (.pt), "
                                          "or a bundled model: pkg:all-MiniLM-L6-v2, pkg:SmolLM2-135M."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder [default: runs/<model name>]."),
    config: Optional[str] = typer.Option(None, "--config", help="HF config.json for a bare state_dict."),
    trust_pickle: Optional[bool] = typer.Option(None, "--trust-pickle", help="Allow full unpickling of a "
                                                "saved nn.Module (runs code from the file: trusted files only)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="TOML/YAML recipe; flags override it."),
    method: Optional[Method] = typer.Option(None,
                                         help=f"Ternary quantizer [default: {DEFAULTS.method}]."),
    granularity: Optional[Granularity] = typer.Option(None,
                                              help=f"One scale per tensor or per output channel "
                                                   f"[default: {DEFAULTS.granularity}]."),
    act_bits: Optional[ActBits] = typer.Option(None, "--act-bits",
                                           help="8: per-token int8 activations (W1.58A8) [default: off]."),
    embedding: Optional[WeightFormatChoice] = typer.Option(None,
                                            help=f"Embedding storage [default: {DEFAULTS.embedding}]."),
    head: Optional[WeightFormatChoice] = typer.Option(None,
                                       help=f"Output head storage; a tied head follows --embedding "
                                            f"[default: {DEFAULTS.head}]."),
    outside_blocks: Optional[WeightFormatChoice] = typer.Option(None,
                                                 help=f"Linears outside the block stack "
                                                      f"[default: {DEFAULTS.outside_blocks}]."),
    float_dtype: Optional[FloatDtype] = typer.Option(None,
                                              help=f"Storage of norms/biases/kept tensors "
                                                   f"[default: {DEFAULTS.float_dtype}]."),
    scale_dtype: Optional[FloatDtype] = typer.Option(None,
                                              help=f"Storage of scales [default: {DEFAULTS.scale_dtype}]."),
    exclude: Optional[List[str]] = typer.Option(None, help="Regex of module names to leave float (repeatable)."),
    steps: Optional[int] = typer.Option(None, help="QAT optimizer steps with distillation from the original; "
                                        f"0 = post-training only [default: {TRAIN.steps}]."),
    data: Optional[str] = typer.Option(None, help="Training text: .txt/.jsonl/.json/.csv/.tsv/.parquet file, "
                                       "pkg:ptb, or a HF dataset NAME[:CONFIG] (online)."),
    text_column: Optional[str] = typer.Option(None, help=f"Text column of tabular data [default: {TRAIN.text_column}]."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out text [default: the last 5% of --data]."),
    seq_len: Optional[int] = typer.Option(None, help=f"Tokens per training sequence [default: {TRAIN.seq_len}]."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per optimizer step, all processes "
                                             f"together [default: {TRAIN.batch_size}]."),
    micro_batch_size: Optional[int] = typer.Option(None, help="Sequences per forward per process (gradient "
                                                   "accumulation) [default: no accumulation]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [default: 2e-4 below 100M params, 1e-4 above]."),
    weight_decay: Optional[float] = typer.Option(None, help=f"AdamW weight decay [default: {TRAIN.weight_decay}]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Learning-rate warm-up steps [default: 10% of steps]."),
    schedule: Optional[Schedule] = typer.Option(None, help=f"LR decay after warm-up [default: {TRAIN.schedule}]."),
    quant_warmup: Optional[int] = typer.Option(None, help="Steps for lambda to reach 1 [default: half of steps]."),
    quant_schedule: Optional[QuantSchedule] = typer.Option(None, help="lambda schedule: linear = min(step/"
                                                           f"warmup, 1) [default: {TRAIN.quant_schedule}]."),
    grad_clip: Optional[float] = typer.Option(None, help=f"Gradient-norm clip [default: {TRAIN.grad_clip}]."),
    task_weight: Optional[float] = typer.Option(None, help=f"Next-token CE weight [default: {TRAIN.task_weight}]."),
    kd_weight: Optional[float] = typer.Option(None, help=f"Logit KL / output MSE weight [default: {TRAIN.kd_weight}]."),
    kd_temperature: Optional[float] = typer.Option(None, help=f"KD temperature [default: {TRAIN.kd_temperature}]."),
    hidden_weight: Optional[float] = typer.Option(None, help="Per-block hidden-state MSE weight "
                                                  f"[default: {TRAIN.hidden_weight}]."),
    max_train_tokens: Optional[int] = typer.Option(None, help="Use at most this many training tokens [default: all]."),
    eval_tokens: Optional[int] = typer.Option(None, help=f"Held-out tokens [default: {TRAIN.eval_tokens}]."),
    seed: Optional[int] = typer.Option(None, help=f"Seed for data order and init [default: {TRAIN.seed}]."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Save training state every N steps "
                                                   f"[default: {TRAIN.checkpoint_every}]."),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue from the last training checkpoint in --out."),
    parallel: Optional[Parallel] = typer.Option(None, help=f"With several processes [default: {TRAIN.parallel}]."),
    nproc: int = typer.Option(1, help="Start N local worker processes (torchrun); gloo on CPU, NCCL on GPU."),
    max_restarts: int = typer.Option(0, help="With --nproc: elastic restarts after a worker fails."),
    onnx: Optional[bool] = typer.Option(None, "--onnx", help="Also export <out>/model.onnx (validated "
                                        "with ONNX Runtime); see `compress export --help` for the formats."),
    onnx_format: Optional[OnnxFormat] = typer.Option(None, "--onnx-format", help="With --onnx: matmulnbits | "
                                                     "int2 | float [default: matmulnbits]."),
    tasks: Optional[str] = typer.Option(None, help="After packing, evaluate and gate on these tasks "
                                        "(lm,cls,tok,qa; data and tolerances from the recipe's [eval] table)."),
    sharing: Optional[str] = typer.Option(None, help="Cross-layer sharing: none, alternate, sequential[:N], "
                                          "cycle[:K], sequence[:K], middle-cycle[:K], auto, explicit groups "
                                          "\"0,2,4;1,3,5\" or a .json file [default: none]."),
    share: Optional[ShareKind] = typer.Option(None, help="Matrices tied inside a block [default: all]."),
    share_init: Optional[ShareInit] = typer.Option(None, help="Initial shared weight: group average, stepwise "
                                                   "(one evenly spaced member) or closest to the mean "
                                                   f"[default: {SHARING.init}]."),
    share_every: Optional[int] = typer.Option(None, help=f"sequential: stride N [default: {SHARING.every}]."),
    share_unique: Optional[int] = typer.Option(None, help="cycle/sequence/middle-cycle: unique blocks "
                                               "[default: half the stack]."),
    relax_rank: Optional[int] = typer.Option(None, help="Per-occurrence low-rank correction of shared "
                                             "weights (counted in sizes) [default: 0]."),
    target_params: Optional[float] = typer.Option(None, help="auto: unique block parameters to keep, as a "
                                                  "fraction (e.g. 0.5)."),
    max_loss_increase: Optional[float] = typer.Option(None, help="auto: largest calibration-loss increase."),
    share_data: Optional[str] = typer.Option(None, help="Calibration text for the analysis [default: --data]."),
    share_sequences: Optional[int] = typer.Option(None, help="Calibration sequences "
                                                  f"[default: {SHARING.calib_sequences}]."),
    share_seq_len: Optional[int] = typer.Option(None, help=f"Calibration tokens per sequence "
                                                f"[default: {SHARING.calib_seq_len}]."),
    share_pairs: Optional[int] = typer.Option(None, help="Block pairs tied and measured at most "
                                              f"[default: {SHARING.auto_pairs}]."),
    share_refine: Optional[int] = typer.Option(None, help="auto: block swaps tied and measured at most "
                                               f"[default: {SHARING.auto_refine}]."),
    share_probe_steps: Optional[int] = typer.Option(None, help="auto: rank the candidates by their calibration "
                                                    "loss after this many QAT steps each, not right after tying "
                                                    "(0 = off) [default: 0]."),
    share_probe_top: Optional[int] = typer.Option(None, help="auto with --share-probe-steps: fine-tune at most "
                                                  "this many candidates, best after tying first (0 = all) "
                                                  "[default: 0]."),
    share_analyze: Optional[bool] = typer.Option(None, "--share-analyze/--no-share-analyze",
                                                 help="Write the redundancy analysis [default: on]."),
    check: Optional[bool] = typer.Option(None, "--check/--no-check",
                                         help="Compare outputs (original vs ternary, reload) [default: check]."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of tables."),
    save_recipe: Optional[str] = typer.Option(None, "--save-recipe", help="Write the full recipe (all "
                                              "defaults spelled out) to this TOML file and exit."),
    debug: bool = DebugOpt,
):
    """Ingest MODEL, quantize to ternary, pack (1.6 bits/weight) and report sizes."""
    from tritpress.compressor.fileio import write_text
    from tritpress.cli.recipe import build_config, dump_recipe, read_recipe

    cfg = build_config(
        read_recipe(recipe) if recipe else {},
        {"model": model, "out": out, "config": config, "trust_pickle": trust_pickle, "check": check,
         "tasks": tasks},
        {"quant": {"method": _value(method), "granularity": _value(granularity),
                   "act_bits": int(act_bits.value) if act_bits else None, "embedding": _value(embedding),
                   "head": _value(head), "outside_blocks": _value(outside_blocks),
                   "float_dtype": _value(float_dtype), "scale_dtype": _value(scale_dtype),
                   "exclude": exclude or None},
         "train": {"steps": steps, "data": data, "text_column": text_column, "eval_data": eval_data,
                   "seq_len": seq_len, "batch_size": batch_size, "micro_batch_size": micro_batch_size,
                   "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                   "schedule": _value(schedule), "quant_warmup": quant_warmup,
                   "quant_schedule": _value(quant_schedule), "grad_clip": grad_clip, "task_weight": task_weight,
                   "kd_weight": kd_weight, "kd_temperature": kd_temperature, "hidden_weight": hidden_weight,
                   "max_train_tokens": max_train_tokens, "eval_tokens": eval_tokens, "seed": seed,
                   "checkpoint_every": checkpoint_every, "resume": resume, "parallel": _value(parallel)},
         "onnx": {"enabled": onnx, "format": _value(onnx_format)},
         "sharing": {"strategy": sharing, "share": _value(share), "init": _value(share_init), "every": share_every,
                     "unique": share_unique, "relax_rank": relax_rank, "target_params": target_params,
                     "max_loss_increase": max_loss_increase, "data": share_data,
                     "calib_sequences": share_sequences, "calib_seq_len": share_seq_len,
                     "auto_pairs": share_pairs, "auto_refine": share_refine, "auto_probe_steps": share_probe_steps,
                     "auto_probe_top": share_probe_top, "analyze": share_analyze}},
    )
    if save_recipe:
        write_text(save_recipe, dump_recipe(cfg))
        typer.echo(f"recipe written to {save_recipe}")
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_workers(nproc, max_restarts))
    _quiet_libraries()
    from tritpress.analyzers.report import render
    from tritpress.cli.pipeline import compress

    report = _with_progress(lambda listener: compress(cfg, listener), quiet=json_out)
    if report is None:  # a non-zero rank under torchrun: rank 0 reports
        return
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(render(report))
        typer.echo(f"\nwrote {report['files']['packed']} and {report['files']['report']}")
    if report.get("evaluation"):
        from tritpress.analyzers.quality.report import render as render_eval
        if not json_out:
            typer.echo("\n" + render_eval(report["evaluation"]))
        if not report["evaluation"]["passed"]:
            raise typer.Exit(1)


@app.command()
def info(packed: str = typer.Argument(..., help="A packed checkpoint (.safetensors)."),
         json_out: bool = typer.Option(False, "--json", help="Print JSON."),
         debug: bool = DebugOpt):
    """Size report of a packed checkpoint (verifies its checksum)."""
    from tritpress.analyzers.report import size_table
    from tritpress.analyzers.size import size_report
    from tritpress.exporters.packed import read_packed_state

    read_packed_state(packed)  # full integrity check before reporting
    size = size_report(packed)
    typer.echo(json.dumps(size, indent=2) if json_out else size_table(size))


from tritpress.cli.evaluate import evaluate_command, finetune_head_command  # noqa: E402

app.command("evaluate")(evaluate_command)
app.command("finetune-head")(finetune_head_command)
from tritpress.cli.analyze import analyze  # noqa: E402  (registers `compress analyze`)

app.command("analyze")(analyze)


class _PlainListener:
    """Progress as plain lines on stderr (not a terminal, e.g. CI logs)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def stage(self, name):
        if not self.quiet:
            print(f"[{name}]", file=sys.stderr, flush=True)

    def step(self, e, total):
        if not self.quiet and (e["step"] == 1 or e["step"] % 10 == 0 or e["step"] == total):
            print(f"step {e['step']}/{total} loss {e['loss']:.4f} lambda {e['lambda']:.2f} lr {e['lr']:.2e} "
                  f"{e['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)


def _with_progress(fn, quiet: bool):
    """Run fn(listener): a spinner per stage and a bar with loss, lambda, lr, tokens/s, ETA (stderr)."""
    if quiet or not sys.stderr.isatty() or int(os.environ.get("RANK", "0")) != 0:
        return fn(_PlainListener(quiet or int(os.environ.get("RANK", "0")) != 0))
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from tritpress.cli.pipeline import Listener

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                  transient=True) as progress:
        task = progress.add_task("starting", total=None, info="")

        class RichListener(Listener):
            def stage(self, name):
                progress.update(task, description=name, total=None, completed=0, info="")

            def step(self, e, total):
                progress.update(task, total=total, completed=e["step"],
                                info=f"loss {e['loss']:.4f} λ {e['lambda']:.2f} lr {e['lr']:.1e} "
                                     f"{e['tokens_per_s']:.0f} tok/s")

        return fn(RichListener())


def _click_exceptions(name: str) -> tuple:
    """The exception class from click and from typer's vendored copy of click (typer >= 0.20)."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        args = ["--help"]
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=args, prog_name="compress", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except _click_exceptions("Exit") as e:
        sys.exit(e.exit_code)
    except _click_exceptions("Abort"):
        print("compress: aborted", file=sys.stderr)
        sys.exit(130)
    except _click_exceptions("ClickException") as e:
        print(f"compress: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        sys.exit(130)
    except TritpressError as e:
        if debug:
            raise
        print(f"compress: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a bug, or a library failing on odd input: still one line
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"compress: error: {type(e).__name__}: {first} (re-run with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
