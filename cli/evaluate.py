"""`compress evaluate COMPRESSED --baseline ORIGINAL --tasks lm,cls,tok,qa`: the quality gate.

A thin layer over analyzers.quality.evaluate(EvalConfig): every flag is an EvalConfig field
(also settable in a recipe's [eval] table). Exit code 0 when every row passes, 1 when a row
fails (or on an error)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import List, Optional

import typer

from tritpress.cli.options import DebugOpt

from tritpress.analyzers.quality.evaluate import EvalConfig

D = EvalConfig()


def evaluate_command(
    compressed: str = typer.Argument(..., help="Compressed model: a packed .safetensors file, a folder holding "
                                     "model.tritpress.safetensors (the `compress` output), or any model spec."),
    baseline: Optional[str] = typer.Option(None, "--baseline", "-b", help="The original model (any `compress` "
                                           "MODEL spec) [default: the source recorded in the packed file]."),
    tasks: Optional[str] = typer.Option(None, help=f"Comma-separated: lm, cls, tok, qa [default: {D.tasks}]."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Report folder [default: <packed folder>/eval]."),
    config: Optional[str] = typer.Option(None, "--config", help="HF config.json for a bare state_dict baseline."),
    trust_pickle: Optional[bool] = typer.Option(None, "--trust-pickle", help="Allow unpickling a saved nn.Module."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="TOML/YAML recipe; its [eval] table; flags override."),
    lm_data: Optional[List[str]] = typer.Option(None, help="LM text (repeatable): WikiText .txt, .jsonl/.csv, pkg:ptb, "
                                                f"or HF NAME[:CONFIG][@SPLIT] [default: {D.lm_data[0]}]."),
    lm_train: Optional[str] = typer.Option(None, help="Masked-LM probe text for an encoder without an LM head "
                                           "(same formats as --lm-data) [default: the HF train split]."),
    cls_data: Optional[str] = typer.Option(None, help=f"Classification eval data: GLUE .tsv, .jsonl/.csv or HF "
                                           f"[default: {D.cls_data} validation]."),
    cls_train: Optional[str] = typer.Option(None, help="Probe training data for cls [default: the HF train split]."),
    tok_data: Optional[str] = typer.Option(None, help=f"NER eval data: CoNLL column file (IOB1/IOB2), .jsonl or HF "
                                           f"[default: {D.tok_data} validation]."),
    tok_train: Optional[str] = typer.Option(None, help="Probe training data for tok [default: the HF train split]."),
    qa_data: Optional[str] = typer.Option(None, help=f"QA eval data: SQuAD .json/.zip, .jsonl or HF "
                                          f"[default: {D.qa_data} validation]."),
    qa_train: Optional[str] = typer.Option(None, help="Probe training data for qa [default: HF train split; a local "
                                           "--qa-data file is split by article]."),
    qa_heldout: Optional[bool] = typer.Option(None, "--qa-heldout", help="Own QA head: score only the articles a "
                                              "probe would not train on (after finetune-head --qa-articles).",
                                              show_default=False),
    text_column: Optional[str] = typer.Option(None, help="cls text column [default: sentence/text/...]."),
    text_pair_column: Optional[str] = typer.Option(None, help="cls second-text column [default: sentence2/...]."),
    label_column: Optional[str] = typer.Option(None, help="cls label column [default: label]."),
    lm_text_column: Optional[str] = typer.Option(None, help=f"Text column of tabular LM data [default: {D.lm_text_column}]."),
    max_samples: Optional[int] = typer.Option(None, help="Evaluate at most N examples per task, seeded subsample "
                                              "[default: all]."),
    probe_samples: Optional[int] = typer.Option(None, help="Train probes on at most N examples [default: all]."),
    lm_tokens: Optional[int] = typer.Option(None, help="Evaluate at least N LM tokens, whole lines [default: all]."),
    context: Optional[int] = typer.Option(None, help="LM window in tokens [default: min(1024, model positions)]."),
    stride: Optional[int] = typer.Option(None, help="LM window stride [default: context/2 for causal LMs]."),
    mlm_positions: Optional[int] = typer.Option(None, help="Masked LMs: tokens scored for pseudo-perplexity "
                                                f"[default: {D.mlm_positions}; 0 = all]."),
    lm_probe_windows: Optional[int] = typer.Option(None, help="Masked-LM probe training windows "
                                                   f"[default: {D.lm_probe_windows}]."),
    max_length: Optional[int] = typer.Option(None, help=f"cls/tok max tokens [default: {D.max_length}]."),
    qa_max_length: Optional[int] = typer.Option(None, help=f"QA window tokens [default: {D.qa_max_length}]."),
    doc_stride: Optional[int] = typer.Option(None, help=f"QA window overlap [default: {D.doc_stride}]."),
    max_answer_length: Optional[int] = typer.Option(None, help=f"Longest QA answer, tokens [default: {D.max_answer_length}]."),
    n_best: Optional[int] = typer.Option(None, help=f"QA candidate starts/ends per window [default: {D.n_best}]."),
    null_threshold: Optional[float] = typer.Option(None, help="SQuAD v2 no-answer margin [default: 0]."),
    batch_size: Optional[int] = typer.Option(None, help=f"Examples per forward [default: {D.batch_size}]."),
    probe: Optional[str] = typer.Option(None, help="auto: the model's own head when it has one, else a probe; "
                                        "always: probe even then [default: auto]."),
    probe_epochs: Optional[int] = typer.Option(None, help="Probe epochs [default: per task: lm 5, cls 20, tok 10, "
                                               "qa 10]."),
    probe_lr: Optional[float] = typer.Option(None, help=f"Probe learning rate [default: {D.probe_lr}]."),
    seed: Optional[int] = typer.Option(None, help=f"Seed for subsamples and probes [default: {D.seed}]."),
    max_drop: Optional[List[str]] = typer.Option(None, help="Tolerance, repeatable: METRIC=VALUE or TASK.METRIC=VALUE, "
                                                 "absolute or N% of the baseline [defaults: 1 point; perplexity 5%, "
                                                 "bits_per_byte 2%]."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N [default: auto]."),
    plots: Optional[bool] = typer.Option(None, "--plots/--no-plots", help="Write PNG plots [default: plots]."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the table."),
    nproc: int = typer.Option(1, help="Run N local processes (torchrun), examples sharded across them."),
    debug: bool = DebugOpt,
):
    """Score COMPRESSED against its baseline on LM / classification / NER / QA; gate on the drops."""
    from tritpress.cli.launch import launch_workers as _launch_workers, quiet_libraries as _quiet_libraries

    given = {k: v for k, v in locals().items() if k in {f.name for f in dataclasses.fields(EvalConfig)}}
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_workers(nproc, 0))
    _quiet_libraries()
    cfg = build_eval_config(recipe, {**given, "quiet": json_out})
    from tritpress.analyzers.quality import evaluate
    from tritpress.analyzers.quality.distributed import is_main
    from tritpress.analyzers.quality.report import render

    report = evaluate(cfg)
    if is_main():
        if json_out:
            typer.echo(json.dumps(report, indent=2, default=str))
        else:
            typer.echo(render(report))
            typer.echo(f"\nwrote {', '.join([report['files']['json'], report['files']['markdown'], *report['files']['plots']])}")
    if not report["passed"]:
        raise typer.Exit(1)


def build_eval_config(recipe: str | None, flags: dict) -> EvalConfig:
    from tritpress.compressor.errors import TritpressError
    from tritpress.cli.recipe import read_recipe, section_config

    values = dict((read_recipe(recipe).get("eval") or {}) if recipe else {})
    values.update({k: v for k, v in flags.items() if v is not None and v != []})
    try:
        return section_config(EvalConfig, values, "eval")
    except (TypeError, ValueError) as e:
        raise TritpressError(f"invalid evaluation setting: {e}") from e


def finetune_head_command(
    model: str = typer.Argument(..., help="A transformers encoder: HF folder or pkg:all-MiniLM-L6-v2."),
    task: str = typer.Option(..., help="cls, tok or qa."),
    train: str = typer.Option(..., help="Training data (GLUE .tsv / CoNLL / SQuAD .json/.zip / .jsonl / .csv)."),
    out: str = typer.Option(..., "--out", "-o", help="Output HF folder (model + tokenizer)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps [default: 300]."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per step [default: 16]."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate, linear decay [default: 5e-5]."),
    max_length: Optional[int] = typer.Option(None, help="cls/tok tokens [default: 128]."),
    qa_max_length: Optional[int] = typer.Option(None, help="QA window tokens [default: 256]."),
    doc_stride: Optional[int] = typer.Option(None, help="QA window overlap [default: 128]."),
    max_samples: Optional[int] = typer.Option(None, help="Use at most N training examples, seeded [default: all]."),
    qa_articles: Optional[float] = typer.Option(None, help="qa: train on this leading fraction of the articles "
                                                "(evaluate the rest with `evaluate --qa-heldout`) [default: all]."),
    seed: Optional[int] = typer.Option(None, help="Seed [default: 0]."),
    debug: bool = DebugOpt,
):
    """Fine-tune MODEL with a fresh task head (a task-finetuned baseline to compress and evaluate)."""
    import sys

    from tritpress.analyzers.quality.finetune import FinetuneConfig, finetune_head
    from tritpress.cli.launch import quiet_libraries as _quiet_libraries

    _quiet_libraries()
    given = {k: v for k, v in locals().items() if k in {f.name for f in dataclasses.fields(FinetuneConfig)}
             and v is not None}
    info = finetune_head(FinetuneConfig(**given), progress=lambda s, n, loss: (
        print(f"step {s}/{n} loss {loss:.4f}", file=sys.stderr, flush=True) if s == 1 or s % 25 == 0 or s == n
        else None))
    typer.echo(f"fine-tuned {task} head: loss {info['first_loss']:.4f} -> {info['final_loss_mean_last_10']:.4f} "
               f"(mean of the last 10 steps); wrote {out}")
