"""The `compress MODEL` pipeline as a Python function:

    checkpoint -> model -> ternary model (post-training) -> packed file -> report

Each stage is a plain function call; `compress()` strings them together and
collects the report. The CLI is a thin layer over `compress()`.
"""
from __future__ import annotations

import copy
import dataclasses
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from tritpress.exporters.onnx import OnnxConfig

from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import refuse_overwrite_input, write_json
from tritpress.compressor.ingest import load_model
from tritpress.compressor.share import SharingConfig
from tritpress.compressor.train import TrainConfig
from tritpress.compressor.transform import convert, get_record, prepare

if TYPE_CHECKING:
    from tritpress.analyzers.quality.evaluate import EvalConfig

PACKED_NAME = "model.tritpress.safetensors"
REPORT_NAME = "report.json"
ONNX_NAME = "model.onnx"


@dataclass
class CompressConfig:
    model: str                                   # path, hub id or pkg:NAME
    out: str | None = None                       # output folder (default runs/<model name>)
    config: str | None = None                    # HF config.json for a bare state_dict
    trust_pickle: bool = False                   # allow full unpickling of a saved nn.Module
    quant: TernaryConfig = field(default_factory=TernaryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    check: bool = True                           # compare outputs: original vs ternary, converted vs reload
    onnx: OnnxConfig = field(default_factory=OnnxConfig)  # [onnx] enabled = true: export model.onnx last
    tasks: str | None = None                     # evaluate after packing: lm,cls,tok,qa (settings: [eval])
    eval: "EvalConfig" = field(default_factory=lambda: _eval_config())

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = re.sub(r"[^\w.-]+", "_", Path(self.model.split(":", 1)[-1]).stem or "model").strip("_")
        return Path("runs") / (name or "model")


class Listener:
    """Progress callbacks; the CLI draws them, the API default ignores them."""

    def stage(self, name: str) -> None:
        pass

    def step(self, entry: dict, total: int) -> None:
        pass


def compress(cfg: CompressConfig, listener: Listener | None = None) -> dict | None:
    """Run the pipeline; writes <out>/model.tritpress.safetensors and <out>/report.json.
    Returns the report (the same dict as report.json). Under torchrun every rank trains;
    only rank 0 packs, reports and returns the report (the others return None)."""
    from tritpress.compressor.distributed import init_distributed

    listener = listener or Listener()
    on_stage = listener.stage
    ctx = init_distributed()
    from tritpress.compressor import modelio
    from tritpress.analyzers.size import size_report
    from tritpress.exporters.packed import load_packed, save_packed

    out = cfg.out_dir()
    packed_path, report_path = out / PACKED_NAME, out / REPORT_NAME
    refuse_overwrite_input([packed_path, report_path, out / ONNX_NAME], [cfg.model, cfg.config])
    timings = {}

    def stage(name):
        on_stage(name)
        timings[name] = time.perf_counter()

    def done(name):
        timings[name] = round(time.perf_counter() - timings[name], 3)

    stage("ingest")
    loaded = load_model(cfg.model, cfg.config, cfg.trust_pickle)
    original = loaded.model
    original_params = sum(p.numel() for p in original.parameters())  # unique: parameters() dedups ties
    done("ingest")

    start, sharing = original, None  # start: the model quantized (tied when sharing), original: the teacher
    train_data = None  # (training blocks, held-out blocks, their source), when the sharing probe needed them first
    if cfg.sharing.active:
        from tritpress.compressor.sharing_stage import share_stage
        if ctx.enabled and cfg.train.parallel == "fsdp":  # FSDP units are blocks: a tie would span units
            raise TritpressError("--sharing is not supported with --parallel fsdp; use --parallel ddp")
        stage("share")
        probe = None
        if cfg.sharing.strategy == "auto" and cfg.sharing.auto_probe_steps > 0:
            # the probes train on the same blocks as the real run: read and tokenize them once
            train_data = _training_blocks(cfg.train, loaded, need="--share-probe-steps")
            probe = _qat_probe(cfg, loaded, ctx, train_data[0])
        from tritpress.analyzers.redundancy import write_outputs
        write_analysis = (lambda analysis: write_outputs(analysis, out / "analysis")) if ctx.is_main else None
        start, sharing = share_stage(original, loaded.tokenizer, cfg.sharing, cfg.sharing.data or cfg.train.data,
                                     cfg.quant.exclude, write_analysis=write_analysis, probe=probe)
        done("share")

    training = None
    if cfg.train.steps > 0:
        stage("train")
        model, training = _fine_tune(cfg, loaded, ctx, listener, start, train_data)
        done("train")
        if not ctx.is_main:
            return None
    else:
        stage("quantize")
        model = convert(copy.deepcopy(start), cfg.quant)
        done("quantize")
    record = get_record(model)

    checks = {}
    if cfg.check:
        stage("check")
        try:
            inputs = modelio.example_inputs(original, loaded.tokenizer)
            ref = modelio.run_model(original, inputs)
            ternary_out = modelio.run_model(model, inputs)
            checks["ternary_vs_original"] = {**modelio.compare_outputs(ref, ternary_out), "fine_tuned": training is not None}
        except Exception as e:  # a custom forward we cannot call: report, do not fail
            checks["skipped"] = f"could not run the model on an example input: {type(e).__name__}: {e}"
        done("check")

    stage("pack")
    extra = {"original_params": original_params, "tritpress_version": _version()}
    save_packed(model, packed_path, loaded.source, extra)
    done("pack")

    if cfg.check and "skipped" not in checks:
        stage("verify")
        skeleton = None if loaded.source.is_transformers else copy.deepcopy(original)
        reloaded = load_packed(packed_path, skeleton=skeleton)
        reload_out = modelio.run_model(reloaded, inputs)
        checks["reload_vs_converted"] = modelio.compare_outputs(ternary_out, reload_out)
        reloaded_state = reloaded.state_dict()
        codes_equal = all(torch.equal(t, reloaded_state[k]) for k, t in model.state_dict().items()
                          if k.endswith(".codes"))
        checks["reload_vs_converted"]["codes_bit_identical"] = codes_equal
        if checks["reload_vs_converted"]["max_abs_diff"] != 0.0 or not codes_equal:
            raise TritpressError(f"reloading {packed_path} did not reproduce the converted model "
                                 f"(max |diff| {checks['reload_vs_converted']['max_abs_diff']:.3g})")
        done("verify")

    onnx_result, onnx_error = None, None
    if cfg.onnx.enabled:
        stage("onnx")
        from tritpress.exporters.onnx import OnnxValidationError, export_onnx
        try:
            onnx_result = export_onnx(model, out / ONNX_NAME, cfg.onnx, packed_path=packed_path)
        except OnnxValidationError as e:  # report it, then fail
            onnx_result, onnx_error = e.result, e
        done("onnx")

    report = {
        "tritpress_version": _version(),
        "model": {k: v for k, v in loaded.source.to_dict().items() if k != "hf_config"},
        "structure": _structure_summary(record.structure),
        "quant_config": cfg.quant.to_dict(),
        "size": size_report(packed_path),
        "training": training,
        "sharing": sharing,
        "checks": checks,
        "timings_s": timings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform()},
        "files": {"packed": str(packed_path), "report": str(report_path)},
        "onnx": onnx_result,
    }
    if onnx_result:
        report["files"]["onnx"] = onnx_result["path"]
    write_json(report_path, report)
    if cfg.tasks:
        from tritpress.analyzers.quality.evaluate import evaluate_stage
        stage("evaluate")
        report["evaluation"] = evaluate_stage(cfg, packed_path, out)
        done("evaluate")
        write_json(report_path, report)
    if onnx_error is not None:
        raise onnx_error
    return report


def _training_blocks(tcfg: TrainConfig, loaded, need: str = "--steps"):
    """-> (training token blocks, held-out blocks, where the held-out blocks come from)."""
    from tritpress.compressor.data import lm_blocks, read_texts, token_vocab_size, tokenizer_fn

    teacher = loaded.model
    if not tcfg.data:
        raise TritpressError(f"{need} needs training text: pass --data FILE, pkg:ptb or a dataset name")
    texts = read_texts(tcfg.data, "train", tcfg.text_column)
    encode = tokenizer_fn(loaded.tokenizer, texts, token_vocab_size(teacher))
    max_tokens = tcfg.max_train_tokens or None
    blocks = lm_blocks(texts, encode, tcfg.seq_len, max_tokens)
    n_eval = max(1, tcfg.eval_tokens // tcfg.seq_len)
    if tcfg.eval_data:
        eval_texts = read_texts(tcfg.eval_data, "validation", tcfg.text_column)
        eval_blocks = lm_blocks(eval_texts, encode, tcfg.seq_len, n_eval * tcfg.seq_len)
        eval_source = tcfg.eval_data
    else:  # hold out the tail of DATA
        n_eval = min(n_eval, max(1, len(blocks) // 20))
        blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
        eval_source = f"last {n_eval} blocks of {tcfg.data} (held out from training)"
    if len(blocks) < 1:
        raise TritpressError("not enough training text left after holding out evaluation blocks")
    return blocks, eval_blocks, eval_source


def _qat_probe(cfg: CompressConfig, loaded, ctx, blocks) -> Callable:
    """For `--sharing auto --share-probe-steps N`: a function that fine-tunes a tied candidate for N
    steps on `blocks` with the run's own QAT recipe (same data, seed, distillation; no checkpoints)
    and returns the converted ternary model, so auto can rank candidates by what training makes of them."""
    import tempfile

    from tritpress.compressor.structure import discover
    from tritpress.compressor.train import train_qat

    teacher = loaded.model
    n_params = sum(p.numel() for p in teacher.parameters())
    tcfg = dataclasses.replace(cfg.train, steps=cfg.sharing.auto_probe_steps, checkpoint_every=0,
                               resume=False).resolved(n_params)
    structure = discover(teacher, cfg.quant.exclude)

    def probe(tied):
        student = prepare(tied, cfg.quant)
        with tempfile.TemporaryDirectory() as tmp:
            train_qat(student, teacher, structure, blocks, tcfg, tmp, ctx)
        return convert(student)
    return probe


def _fine_tune(cfg: CompressConfig, loaded, ctx, listener: Listener, start=None, train_data=None):
    """prepare -> QAT with distillation from the original -> convert; quality before and after.
    `train_data`: _training_blocks' result when already read (the sharing probe)."""
    from tritpress.compressor.distributed import restarted_by_torchrun
    from tritpress.compressor.structure import discover
    from tritpress.compressor.modelio import ModelIO, held_out_quality
    from tritpress.compressor.train import train_qat

    teacher = loaded.model
    start = teacher if start is None else start  # the student starts from the tied model when sharing
    n_params = sum(p.numel() for p in teacher.parameters())
    tcfg = cfg.train.resolved(n_params)
    if restarted_by_torchrun():
        tcfg.resume = True  # an elastic restart continues from the last checkpoint
    blocks, eval_blocks, eval_source = train_data or _training_blocks(tcfg, loaded)
    structure = discover(teacher, cfg.quant.exclude)
    io = ModelIO.discover(teacher, structure)
    student = prepare(copy.deepcopy(start), cfg.quant)
    quality = {}
    if ctx.is_main:
        quality["original"] = held_out_quality(io, teacher, eval_blocks, teacher)
        if start is not teacher:
            quality["shared_float"] = held_out_quality(io, start, eval_blocks, teacher)
        quality["ternary_post_training"] = held_out_quality(io, convert(copy.deepcopy(student)), eval_blocks, teacher)
    result = train_qat(student, teacher, structure, blocks, tcfg, cfg.out_dir() / "train", ctx,
                       on_step=lambda entry: listener.step(entry, tcfg.steps))
    findings, full_state = result.findings, result.full_state
    if not ctx.is_main:
        return None, findings  # rank 0 packs and reports
    if full_state is not None:  # FSDP: rebuild a plain student from the gathered weights
        student = prepare(copy.deepcopy(start), cfg.quant)
        student.load_state_dict(full_state)
    model = convert(student)
    quality["ternary_qat"] = held_out_quality(io, model, eval_blocks, teacher)
    findings.update(config=dataclasses.asdict(tcfg), train_sequences=len(blocks), eval_source=eval_source,
                    eval_sequences=len(eval_blocks), quality=quality)
    return model, findings


def _eval_config():
    from tritpress.analyzers.quality.evaluate import EvalConfig
    return EvalConfig()


def _structure_summary(structure) -> dict:
    roles = {}
    for layer in structure.layers:
        r = roles.setdefault(layer.role, {"layers": 0, "params": 0})
        r["layers"] += 1
        r["params"] += layer.params
    blocks = dataclasses.asdict(structure.blocks) if structure.blocks else None
    return {"blocks": blocks, "head": structure.head, "head_tied_to": structure.head_tied_to, "roles": roles}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("tritpress")
    except Exception:
        return "unknown"
