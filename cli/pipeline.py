"""The `compress MODEL` pipeline as a Python function:

    checkpoint -> model -> [tied model] -> ternary model (post-training or QAT) -> packed file
               -> [ONNX] -> report [-> evaluation]

Each stage is a function of the run state (`RunState`: the config, the models, what earlier stages
found) that returns its findings; `compress()` reads top to bottom as the list of stages and
writes each stage's findings into the run state, then collects the report. The CLI is a thin
layer over `compress()`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import check_writable, refuse_overwrite_input, write_json
from tritpress.compressor.ingest import load_model
from tritpress.compressor.memory import lean_heap, release_free_memory
from tritpress.compressor.train import TrainConfig
from tritpress.compressor.transform import convert, get_record, layer_quantizer, prepare
from tritpress.compressor.vocab import fix_mixes, learn_mixes

from .config import CompressConfig  # re-exported: torch-free home of the settings

if TYPE_CHECKING:
    from tritpress.compressor.data import TokenVocab
    from tritpress.compressor.distributed import DistContext
    from tritpress.compressor.ingest import LoadedModel

PACKED_NAME = "model.tritpress.safetensors"
REPORT_NAME = "report.json"
ONNX_NAME = "model.onnx"


class Listener:
    """Progress callbacks; the CLI draws them, the API default ignores them."""

    def stage(self, name: str) -> None:
        pass

    def step(self, entry: dict, total: int) -> None:
        pass

    def note(self, line: str) -> None:
        """A line the user should see (e.g. the step --resume continues from)."""


@dataclass
class RunState:
    """One `compress` run: what it was asked, and what its stages have made and found so far."""
    cfg: CompressConfig
    ctx: "DistContext"                     # this process in the (possibly 1-process) job
    listener: Listener
    out: Path
    loaded: "LoadedModel | None" = None    # the ingested checkpoint; its model is the original and teacher
    vocab: "TokenVocab | None" = None      # --vocab, read right after ingest (a bad file fails before compute)
    start: nn.Module | None = None         # the model to quantize: the original, or its tied copy
    original_params: int = 0              # the original's unique parameters, counted before anything changes it
    reference: tuple | str | None = None   # (example inputs, the original's output) for the check, or why not
    model: nn.Module | None = None         # the ternary model: converted, then packed
    train_data: tuple | None = None        # (training data, held-out data, where that comes from), read once:
                                           # LM token blocks, or a task model's examples (TaskExamples)
    sharing: dict | None = None
    trimmed: dict | None = None            # --trim-vocab: what was kept
    training: dict | None = None
    checks: dict = field(default_factory=dict)
    example: tuple | None = None           # (inputs, ternary model's output) of the check, for verify
    onnx: dict | None = None
    onnx_error: Exception | None = None    # ONNX validation failed: reported, then raised at the end
    timings: dict = field(default_factory=dict)

    @property
    def packed_path(self) -> Path:
        return self.out / PACKED_NAME

    @property
    def report_path(self) -> Path:
        return self.out / REPORT_NAME


def compress(cfg: CompressConfig, listener: Listener | None = None) -> dict | None:
    """Run the pipeline; writes <out>/model.tritpress.safetensors and <out>/report.json.
    Returns the report (the same dict as report.json). Under torchrun every rank trains;
    only rank 0 packs, reports and returns the report (the others return None)."""
    from tritpress.compressor.distributed import init_distributed

    run = RunState(cfg, init_distributed(), listener or Listener(), cfg.out_dir())
    refuse_overwrite_input([run.packed_path, run.report_path, run.out / ONNX_NAME], [cfg.model, cfg.config])
    check_writable(run.out, "--out")
    # post-training (a GGUF streamed layer by layer): no heap fragments on top of the live tensors; evaluation
    # and ONNX, many passes of many allocations, keep the heap
    with lean_heap() if _streams_original(cfg) else contextlib.nullcontext():
        if not model_stages(run):
            return None  # rank 0 packs and reports
    if cfg.onnx.enabled:
        run.onnx, run.onnx_error = timed(run, "onnx", export)
    report = report_of(run)
    write_json(run.report_path, report)
    if cfg.tasks:
        report["evaluation"] = timed(run, "evaluate", evaluate)  # report["timings_s"] is run.timings
        write_json(run.report_path, report)
    if run.onnx_error is not None:
        raise run.onnx_error
    return report


def model_stages(run: RunState) -> bool:
    """checkpoint -> [tied, trimmed] -> ternary model -> checked, packed, reloaded. False on the ranks
    other than 0 of a distributed run once training ends (rank 0 packs)."""
    cfg = run.cfg
    if cfg.trim_learn_mix and (not cfg.trim_vocab or cfg.trim_dropped != "mix" or cfg.train.steps < 1):
        raise TritpressError("--trim-learn-mix trains the weights of --trim-dropped mix in QAT: it needs "
                             "--trim-vocab, --trim-dropped mix and --steps 1 or more")
    run.loaded, run.vocab = timed(run, "ingest", ingest)
    run.start = run.loaded.model  # the original stays untouched: it is the teacher
    run.original_params = sum(p.numel() for p in run.start.parameters())  # unique: parameters() dedups ties
    if cfg.sharing.active:
        refuse_sharing_with_fsdp(run)
        run.start, run.sharing = timed(run, "share", share)
    if cfg.trim_vocab:  # after the tie (which reads the original), before QAT: the trained model is trimmed
        run.start, run.trimmed = timed(run, "trim", trim)
    if cfg.check:  # before the model stage: post-training may convert the original itself
        run.reference = timed(run, "reference", reference_output)
    if cfg.train.steps > 0:
        run.model, run.training = timed(run, "train", fine_tune)
        if not run.ctx.is_main:
            return False
    else:
        run.model = timed(run, "quantize", quantize)
    if cfg.check:
        run.checks, run.example = timed(run, "check", check)
    timed(run, "pack", pack)
    if run.example is not None:
        run.checks["reload_vs_converted"] = timed(run, "verify", verify)
    return True


def timed(run: RunState, name: str, stage: Callable[[RunState], object]):
    """Announce the stage, run it, record its wall time in run.timings[name]. A library failing on odd
    input (a raw KeyError, ValueError...) becomes one line naming the stage and the inputs it read."""
    run.listener.stage(name)
    t0 = time.perf_counter()
    try:
        findings = stage(run)
    except TritpressError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TritpressError(f"stage {name} failed on {_stage_inputs(run.cfg, name)}: {type(e).__name__}: "
                             f"{first} (check that input; --debug shows the traceback)") from e
    run.timings[name] = round(time.perf_counter() - t0, 3)
    release_free_memory()  # what the stage freed (a model converted in place, a reloaded copy) leaves the process
    return findings


def _stage_inputs(cfg: CompressConfig, name: str) -> str:
    """What a stage reads, as the user named it."""
    data = {"share": ("--share-data", cfg.sharing.data or cfg.train.data),
            "train": ("--data", cfg.train.data), "evaluate": ("--tasks", cfg.tasks)}.get(name)
    model = f"MODEL {cfg.model}" + (f" (--config {cfg.config})" if cfg.config else "")
    return f"{data[0]} {data[1]} with {model}" if data and data[1] else model


# ------------------------------------------------------------------ stages


def ingest(run: RunState) -> tuple["LoadedModel", "TokenVocab | None"]:
    """-> (the checkpoint, its --vocab vocabulary or None)."""
    from tritpress.compressor.data import TokenVocab, token_vocab_size

    loaded = load_model(run.cfg.model, run.cfg.config, run.cfg.trust_pickle, lazy=_streams_original(run.cfg))
    vocab = TokenVocab.read(run.cfg.vocab, token_vocab_size(loaded.model)) if run.cfg.vocab else None
    return loaded, vocab


def _streams_original(cfg: CompressConfig) -> bool:
    """Post-training with nothing that reads the whole original (no tie, no trim, no teacher): its Linear
    weights may stay in a GGUF file, read one layer at a time by the check's forward and by convert."""
    return cfg.train.steps == 0 and not cfg.sharing.active and not cfg.trim_vocab


def text_tokenizer(run: RunState):
    """What tokenizes the run's text: the --vocab vocabulary, else the checkpoint's tokenizer (None:
    compressor.data.tokenizer_fn builds a word vocabulary)."""
    return run.vocab if run.vocab is not None else run.loaded.tokenizer


def refuse_sharing_with_fsdp(run: RunState) -> None:
    if run.ctx.enabled and run.cfg.train.parallel == "fsdp":  # FSDP units are blocks: a tie would span units
        raise TritpressError("--sharing is not supported with --parallel fsdp; use --parallel ddp")


def share(run: RunState) -> tuple[nn.Module, dict]:
    """-> (tied copy of the original, sharing findings). The analysis files go to <out>/analysis."""
    from tritpress.analyzers.redundancy import write_outputs
    from tritpress.compressor.sharing_stage import share_stage

    cfg, probe = run.cfg, None
    ids = task_calibration_ids(run)
    if cfg.sharing.strategy == "auto" and cfg.sharing.auto_probe_steps > 0:
        # the probes train on the same blocks as the real run: read and tokenize them once
        probe = _qat_probe(cfg, run.loaded, run.ctx,
                           augmented_examples(run, training_data(run, need="--share-probe-steps")[0]))
    write = (lambda analysis: write_outputs(analysis, run.out / "analysis")) if run.ctx.is_main else None
    data = cfg.sharing.data or (cfg.train.data if ids is None else None)
    tied, findings = share_stage(run.loaded.model, text_tokenizer(run), cfg.sharing, data, cfg.quant.exclude,
                                 write_analysis=write, probe=probe, calibration_ids=ids)
    findings["calibration_source"] = "the training examples (--data)" if ids is not None else data
    return tied, findings


def task_calibration_ids(run: RunState):
    """A task model whose --data holds its examples (no --share-data): the redundancy measures
    calibrate on blocks of those examples' tokens, through the model's own head. None otherwise."""
    from tritpress.compressor.redundancy import calibration_seq_len, example_calibration_ids

    cfg = run.cfg
    if cfg.sharing.data or not cfg.train.data or not _on_task_examples(cfg, run.loaded.model):
        return None
    if not (cfg.sharing.analyze or cfg.sharing.strategy == "auto"):
        return None
    examples = training_data(run, need="--sharing")[0]
    return example_calibration_ids(examples.features, cfg.sharing.calib_sequences,
                                   calibration_seq_len(run.loaded.model, cfg.sharing.calib_seq_len))


def trim(run: RunState) -> tuple[nn.Module, dict]:
    """-> (the model to quantize with a trimmed vocabulary, what was kept). The original stays whole:
    it is the teacher, and the check compares against it."""
    from tritpress.compressor.vocab import trim_model

    tok = run.loaded.tokenizer
    if tok is None:
        raise TritpressError("--trim-vocab needs the model's tokenizer (its special and unknown tokens)")
    if tok.unk_token_id is None:
        raise TritpressError("--trim-vocab: the tokenizer has no unknown token to read dropped ids as")
    cfg = run.cfg
    if cfg.trim_min_count < 1 or cfg.trim_mix < 1:
        raise TritpressError(f"--trim-min-count and --trim-mix must be 1 or more (got {cfg.trim_min_count}, "
                             f"{cfg.trim_mix})")
    counts, source = corpus_ids(run)
    used = {i for i, n in counts.items() if n >= cfg.trim_min_count}
    model = copy.deepcopy(run.start) if run.start is run.loaded.model else run.start
    try:
        findings = trim_model(model, used | set(tok.all_special_ids), tok.unk_token_id, cfg.trim_dropped,
                              cfg.trim_mix)
    except ValueError as e:
        raise TritpressError(f"--trim-vocab: {e}") from e
    rare = {"min_count": cfg.trim_min_count, "rare_ids": len(counts) - len(used)} if cfg.trim_min_count > 1 else {}
    learned = {"mix_learned": True} if cfg.trim_learn_mix else {}
    return model, {"source": source, "corpus_ids": len(counts), **rare, **findings, **learned}


def corpus_ids(run: RunState) -> tuple[Counter, str]:
    """How often --trim-vocab's corpus uses each token id, and where that comes from: `data` is what
    QAT trains on (a task model's training examples, or every token of the LM text --data names),
    else a text."""
    from tritpress.analyzers.quality.examples import resolve_task
    from tritpress.compressor.data import read_texts, tokenizer_fn

    cfg = run.cfg
    spec = cfg.trim_vocab
    if spec == "data":
        if not cfg.train.data:
            raise TritpressError("--trim-vocab data keeps the tokens of the training data: pass --data FILE")
        if resolve_task(run.loaded.model, cfg.train.task) != "lm":
            examples = training_data(run, need="--trim-vocab data")[0]
            return Counter(i for f in examples.features for i in f["input_ids"]), f"{examples.source} (training examples)"
        spec = cfg.train.data
    encode = tokenizer_fn(run.loaded.tokenizer)
    ids = Counter(i for text in read_texts(spec, "train", cfg.train.text_column) for i in encode(text))
    if not ids:
        raise TritpressError(f"--trim-vocab: {spec} holds no tokens")
    return ids, spec


def quantize(run: RunState) -> nn.Module:
    """Post-training quantization: the ternary model, no training. Converted in place unless a
    later stage reads the float original: a tied or trimmed copy always is, and so is the original
    of a transformers checkpoint (the check's reference output is taken before, the evaluation
    reloads the original from disk): one model in memory, not two. A custom module's original stays,
    the reload check needs it as skeleton."""
    keep = run.start is run.loaded.model and not run.loaded.source.is_transformers
    return convert(copy.deepcopy(run.start) if keep else run.start, run.cfg.quant, weights=run.loaded.lazy)


def fine_tune(run: RunState) -> tuple[nn.Module | None, dict]:
    """prepare -> QAT with distillation from the original -> convert; quality before and after.
    -> (ternary model, training findings); the model is None on ranks other than 0."""
    from tritpress.compressor.modelio import ModelIO
    from tritpress.compressor.structure import discover
    from tritpress.compressor.train import train_qat  # looked up per run: tests wrap it

    cfg, ctx, teacher = run.cfg, run.ctx, run.loaded.model
    tcfg = _resolved_train_config(cfg, teacher)
    train, held_out, eval_source = training_data(run)
    train = augmented_examples(run, train)
    structure = discover(teacher, cfg.quant.exclude)
    quality_of = _quality_measure(ModelIO.discover(teacher, structure), teacher, held_out)
    student = learnable(prepare(copy.deepcopy(run.start), cfg.quant), cfg)  # from the tied model when sharing
    quality = _quality_before(run, quality_of, student) if ctx.is_main else {}
    result = train_qat(student, teacher, structure, train, tcfg, run.out / "train", ctx,
                       on_step=lambda entry: run.listener.step(entry, tcfg.steps),
                       on_resume=lambda step: run.listener.note(_resume_line(step, tcfg, run.out / "train")))
    if not ctx.is_main:
        return None, result.findings  # rank 0 packs and reports
    if result.full_state is not None:  # FSDP left the student sharded: rebuild a plain one
        student = learnable(prepare(copy.deepcopy(run.start), cfg.quant), cfg)
        student.load_state_dict(result.full_state)
    fix_mixes(student)  # trained mix weights -> the fp16 buffer the file stores
    model = convert(student)
    quality["ternary_qat"] = quality_of(model)
    result.findings.update(config=dataclasses.asdict(tcfg), train_sequences=len(train), eval_source=eval_source,
                           eval_sequences=len(held_out), quality=quality, **_data_provenance(train, held_out))
    return model, result.findings


def learnable(student: nn.Module, cfg: CompressConfig) -> nn.Module:
    """--trim-learn-mix: the student's dropped-id mix weights become parameters QAT trains."""
    if cfg.trim_learn_mix:
        learn_mixes(student)
    return student


def reference_output(run: RunState) -> tuple | str:
    """The original's output on an example input, for the check. -> (inputs, output), or why the
    model could not be run (a custom forward we cannot call: reported, not failed)."""
    from tritpress.compressor import modelio

    original, lazy = run.loaded.model, run.loaded.lazy
    try:
        inputs = modelio.example_inputs(original, run.loaded.tokenizer)
        if lazy is None:
            return inputs, modelio.run_model(original, inputs)
        # each Linear's weight read from the file for its layer only, and quantized on the way for convert
        with lazy.streamed(original, layer_quantizer(original, run.cfg.quant)):
            return inputs, modelio.run_model(original, inputs)
    except Exception as e:
        return f"could not run the model on an example input: {type(e).__name__}: {e}"


def check(run: RunState) -> tuple[dict, tuple | None]:
    """Original vs ternary outputs on the example input. -> (checks, (inputs, ternary output) for
    verify, or None when the model could not be run)."""
    from tritpress.compressor import modelio

    if isinstance(run.reference, str):
        return {"skipped": run.reference}, None
    inputs, ref = run.reference
    try:
        ternary_out = modelio.run_model(run.model, inputs)
    except Exception as e:
        return {"skipped": f"could not run the ternary model on the example input: {type(e).__name__}: {e}"}, None
    compared = modelio.compare_outputs(ref, ternary_out)
    checks = {"ternary_vs_original": {**compared, "fine_tuned": run.training is not None}}
    return checks, (inputs, ternary_out)


def pack(run: RunState) -> None:
    from tritpress.exporters.packed import save_packed

    extra = {"original_params": run.original_params, "tritpress_version": _version()}
    save_packed(run.model, run.packed_path, run.loaded.source, extra)


def verify(run: RunState) -> dict:
    """Reload the packed file: its outputs and codes must be the converted model's, exactly."""
    from tritpress.compressor import modelio
    from tritpress.exporters.packed import load_packed

    inputs, ternary_out = run.example
    skeleton = None if run.loaded.source.is_transformers else copy.deepcopy(run.loaded.model)
    codes = {k: t for k, t in run.model.state_dict().items() if k.endswith(".codes")}
    lean = run.loaded.lazy is not None and run.model is run.loaded.model
    if lean:  # the memory-lean post-training run: the converted model is compared by digest, then replaced
        codes = {k: _digest(t) for k, t in codes.items()}
        run.model = run.start = run.loaded.model = None
        release_free_memory()
    reloaded = load_packed(run.packed_path, skeleton=skeleton)
    release_free_memory()  # the file's bytes, decoded
    result = modelio.compare_outputs(ternary_out, modelio.run_model(reloaded, inputs))
    reloaded_state = reloaded.state_dict()
    codes_equal = codes.keys() <= reloaded_state.keys() and all(
        (_digest(reloaded_state[k]) == t) if lean else torch.equal(t, reloaded_state[k]) for k, t in codes.items())
    result["codes_bit_identical"] = codes_equal
    if result["max_abs_diff"] != 0.0 or result.get("nonfinite_mismatch") or not codes_equal:
        raise TritpressError(f"reloading {run.packed_path} did not reproduce the converted model "
                             f"(max |diff| {result['max_abs_diff']:.3g})")
    if lean:  # bit for bit the converted model (checked above): it is the model from here on
        run.model = run.start = run.loaded.model = reloaded
    return result


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def export(run: RunState) -> tuple[dict | None, Exception | None]:
    """model.onnx. -> (ONNX findings, the validation error to raise once the report is written)."""
    from tritpress.exporters.onnx import OnnxValidationError, export_onnx

    try:
        return export_onnx(run.model, run.out / ONNX_NAME, run.cfg.onnx, packed_path=run.packed_path), None
    except OnnxValidationError as e:  # report it, then fail
        return e.result, e


def report_of(run: RunState) -> dict:
    from tritpress.analyzers.size import size_report

    size = size_report(run.packed_path)
    report = {
        "tritpress_version": _version(),
        "model": {k: v for k, v in run.loaded.source.to_dict().items() if k != "hf_config"},
        "structure": _structure_summary(get_record(run.model).structure),
        "quant_config": run.cfg.quant.to_dict(),
        "size": size,
        "training": run.training,
        "sharing": run.sharing,
        "vocabulary": {**run.trimmed, **size.get("vocabulary", {})} if run.trimmed else None,  # + bytes saved
        "checks": run.checks,
        "timings_s": run.timings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform()},
        "files": {"packed": str(run.packed_path), "report": str(run.report_path)},
        "onnx": run.onnx,
    }
    if run.onnx:
        report["files"]["onnx"] = run.onnx["path"]
    return report


def evaluate(run: RunState) -> dict:
    """The packed file against the original on the --tasks, gated (analyzers/quality)."""
    from tritpress.analyzers.quality.evaluate import evaluate_packed

    cfg = run.cfg
    return evaluate_packed(cfg.eval, cfg.tasks, run.packed_path, cfg.model, run.out / "eval",
                           config=cfg.config, trust_pickle=cfg.trust_pickle, vocab=cfg.vocab)


# ------------------------------------------------------------------ training helpers


def training_data(run: RunState, need: str = "--steps") -> tuple:
    """The training and held-out data, read and tokenized on first use (the sharing probe and
    the real QAT run train on the same data): LM token blocks, or for a task model (its head, or
    --task) the task's own examples."""
    from tritpress.analyzers.quality.examples import resolve_task, task_examples

    if run.train_data is None:
        tcfg, model = run.cfg.train, run.loaded.model
        task = resolve_task(model, tcfg.task)
        if task == "lm":
            run.train_data = _training_blocks(tcfg, run.loaded.model, text_tokenizer(run), need)
        elif not tcfg.data:
            raise TritpressError(f"{need} on a {task} model needs its training examples: pass --data FILE "
                                 f"(or --task lm with text)")
        else:
            run.train_data = task_examples(model, run.loaded.tokenizer, task, tcfg)
    return run.train_data


def augmented_examples(run: RunState, train):
    """--augment: the task examples with neighbour swaps (compressor/augment.py); as they are without."""
    from tritpress.compressor.augment import augmented

    tcfg = run.cfg.train
    if not tcfg.augment:
        return train
    if isinstance(train, torch.Tensor):
        raise TritpressError("--augment swaps tokens of a task model's examples (cls/tok/qa); this run distils "
                             "on text")
    return augmented(train, run.loaded.model, run.loaded.tokenizer, tcfg.augment, tcfg.augment_neighbors, tcfg.seed)


def _training_blocks(tcfg: TrainConfig, teacher: nn.Module, tokenizer, need: str = "--steps"):
    """-> (training token blocks, held-out blocks, where the held-out blocks come from). A model that
    predicts only the next token trains on every window of --seq-len tokens (data.next_token_windows);
    its held-out blocks stay blocks (modelio.prefix_nll reads them window by window)."""
    from tritpress.compressor.data import lm_blocks, next_token_windows, read_texts, token_vocab_size, tokenizer_fn
    from tritpress.compressor.modelio import ModelIO

    if not tcfg.data:
        raise TritpressError(f"{need} needs training text: pass --data FILE, pkg:ptb or a dataset name")
    texts = read_texts(tcfg.data, "train", tcfg.text_column)
    encode = tokenizer_fn(tokenizer, texts, token_vocab_size(teacher))
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
    if ModelIO.discover(teacher).next_token_only:
        blocks = next_token_windows(blocks)
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
                               resume=False).resolved(n_params, _on_task_examples(cfg, teacher))
    structure = discover(teacher, cfg.quant.exclude)

    def probe(tied):
        student = prepare(tied, cfg.quant)
        with tempfile.TemporaryDirectory() as tmp:
            train_qat(student, teacher, structure, blocks, tcfg, tmp, ctx)
        return convert(student)
    return probe


def _resume_line(step: int, tcfg: TrainConfig, state_dir: Path) -> str:
    if step == 0:
        return f"--resume: no training checkpoint in {state_dir}; starting at step 0"
    return f"resuming from step {step} of {tcfg.steps} (checkpoint in {state_dir})"


def _resolved_train_config(cfg: CompressConfig, teacher: nn.Module) -> TrainConfig:
    from tritpress.compressor.distributed import restarted_by_torchrun

    tcfg = cfg.train.resolved(sum(p.numel() for p in teacher.parameters()), _on_task_examples(cfg, teacher))
    if restarted_by_torchrun():
        tcfg.resume = True  # an elastic restart continues from the last checkpoint
    return tcfg


def _on_task_examples(cfg: CompressConfig, teacher: nn.Module) -> bool:
    from tritpress.analyzers.quality.examples import resolve_task

    return resolve_task(teacher, cfg.train.task) != "lm"


def _quality_measure(io, teacher: nn.Module, held_out) -> Callable[[nn.Module], dict]:
    """model -> its held-out quality: perplexity or agreement with the teacher on LM blocks; on a
    task's examples, the task metric with the model's own head and agreement with the teacher."""
    from tritpress.analyzers.quality.examples import quality_measure
    from tritpress.compressor.modelio import held_out_quality

    if isinstance(held_out, torch.Tensor):
        return lambda model: held_out_quality(io, model, held_out, teacher)
    return quality_measure(teacher, held_out)


def _data_provenance(train, held_out) -> dict:
    """For task examples: which task, how many examples (and QA windows) trained and were scored."""
    if isinstance(train, torch.Tensor):
        return {}
    return {"task": train.task, "train_data": train.source, "train_examples": train.examples,
            "eval_examples": held_out.examples}


def _quality_before(run: RunState, quality_of: Callable[[nn.Module], dict], student: nn.Module) -> dict:
    """Held-out quality of the original, the tied float model (when sharing) and the ternary
    model before training."""
    teacher = run.loaded.model
    quality = {"original": quality_of(teacher)}
    if run.start is not teacher:  # tied and/or trimmed, still float
        quality["trimmed_float" if run.trimmed and not run.sharing else "shared_float"] = quality_of(run.start)
    quality["ternary_post_training"] = quality_of(convert(copy.deepcopy(student)))
    return quality


def _structure_summary(structure) -> dict:
    roles = {}
    for layer in structure.layers:
        r = roles.setdefault(layer.role, {"layers": 0, "params": 0})
        r["layers"] += 1
        r["params"] += layer.params
    blocks = dataclasses.asdict(structure.blocks) if structure.blocks else None
    return {"blocks": blocks, "stacks": [dataclasses.asdict(s) for s in structure.all_stacks],
            "head": structure.head, "head_tied_to": structure.head_tied_to, "roles": roles}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("tritpress")
    except Exception:
        return "unknown"
