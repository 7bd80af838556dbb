"""`compress evaluate COMPRESSED --baseline ORIGINAL --tasks lm,cls,tok,qa` as a function.

    from tritpress.analyzers.quality import EvalConfig, evaluate
    report = evaluate(EvalConfig(compressed="runs/minilm", baseline="pkg:all-MiniLM-L6-v2",
                                 tasks="cls,tok", cls_data="sst-2/dev.tsv", cls_train="sst-2/train.tsv", ...))
    report["passed"]  # the gate's verdict

Both models see the same data, the same protocol and (for probes) the same seeds and budget.
Writes OUT/report.json, OUT/report.md and PNG plots (rank 0 only under torchrun).
"""
from __future__ import annotations

import copy
import dataclasses
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tritpress.compressor.errors import TritpressError

from . import data as qdata
from .gate import gate_row, parse_max_drop, tolerance_for
from .tasks import TASKS, needs_lm_probe, parse_tasks, run_cls, run_lm, run_tok, use_own_head

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
    # data: local files or HF names NAME[:CONFIG][@SPLIT]
    lm_data: list[str] = field(default_factory=lambda: [TASKS["lm"].default_data])  # LM text (repeatable):
                                         # WikiText .txt, .jsonl/.csv, pkg:ptb, or HF NAME[:CONFIG][@SPLIT]
    lm_train: str | None = None          # masked-LM probe text for an encoder without an LM head (same formats
                                         # as --lm-data) [default: the HF train split]
    cls_data: str = TASKS["cls"].default_data  # classification eval data: GLUE .tsv, .jsonl/.csv or HF
                                         # (its validation split)
    cls_train: str | None = None         # probe training data for cls [default: the HF train split]
    tok_data: str = TASKS["tok"].default_data  # NER eval data: CoNLL column file (IOB1/IOB2), .jsonl or HF
                                         # (its validation split)
    tok_train: str | None = None         # probe training data for tok [default: the HF train split]
    qa_data: str = TASKS["qa"].default_data  # QA eval data: SQuAD .json/.zip, .jsonl or HF (its validation split)
    qa_train: str | None = None          # probe training data for qa [default: HF train split; a local
                                         # --qa-data file is split by article]
    text_column: str | None = None       # cls text column [default: sentence/text/...]
    text_pair_column: str | None = None  # cls second-text column [default: sentence2/...]
    label_column: str | None = None      # cls label column [default: label]
    lm_text_column: str = "text"         # text column of tabular LM data
    # sample counts (0 = all): evaluation examples, and probe-training examples
    max_samples: int = 0                 # evaluate at most N examples per task, seeded subsample; 0 = all
    probe_samples: int = 0               # train probes on at most N examples; 0 = all
    lm_tokens: int = 0                   # evaluate at least N LM tokens, whole lines; 0 = all
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
                                         # probe even then
    probe_epochs: int = 0                # probe epochs; 0 = per task: lm 5, cls 20, tok 10, qa 10
    probe_lr: float = 1e-3               # probe learning rate
    probe_batch_size: int = 64           # examples per probe training step
    seed: int = 0                        # seed for subsamples and probes
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
        from tritpress.exporters.packed import load_packed
        skeleton = None if base.source.is_transformers else copy.deepcopy(base.model)
        comp, comp_tok, comp_desc = load_packed(packed, skeleton=skeleton), None, str(packed)
    else:
        loaded = load_model(cfg.compressed, cfg.config, cfg.trust_pickle)
        comp, comp_tok, comp_desc = loaded.model, loaded.tokenizer, cfg.compressed
    info = {"baseline": baseline_spec, "baseline_class": base.source.model_class, "compressed": comp_desc,
            "compressed_class": type(comp).__name__, "packed_file": str(packed) if packed else None,
            "notes": base.source.notes}
    return base, comp.eval(), base.tokenizer or comp_tok, info


# ------------------------------------------------------------------ data


def _subsample(n: int, k: int, seed: int) -> list[int]:
    if not k or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def _name(spec: str) -> str:
    p = Path(spec)
    return f"{p.parent.name}/{p.name}" if qdata.is_local(spec) and p.parent.name else spec


def _hf_train(spec: str, flag: str) -> str:
    if qdata.is_local(spec):
        raise TritpressError(f"the probe needs training data for {spec}: pass {flag}")
    name, config, _ = qdata.split_spec(spec, "")
    return f"{name}:{config}@train" if config else f"{name}@train"


def _data_protocol(spec: str, split: str, n_total: int, n_used: int, seed: int) -> dict:
    return {"data": spec, "split": split if not qdata.is_local(spec) else "(file)", "available": n_total,
            "used": n_used, "subsample_seed": seed if n_used < n_total else None}


def _lm_texts(spec: str, cfg: EvalConfig) -> list[str]:
    from tritpress.compressor.data import read_texts
    if qdata.is_local(spec) or spec.startswith("pkg:"):
        name, split = spec.partition("@")[0], spec.partition("@")[2] or TASKS["lm"].eval_split
        return read_texts(name, split, cfg.lm_text_column)
    name, config, split = qdata.split_spec(spec, TASKS["lm"].eval_split)
    return read_texts(f"{name}:{config}" if config else name, split, cfg.lm_text_column)


def load_cls(cfg, need_train: bool):
    cols = qdata.Columns(cfg.text_column, cfg.text_pair_column, cfg.label_column)
    train = qdata.read_cls(cfg.cls_train or _hf_train(cfg.cls_data, "--cls-train"), "train", cols) \
        if need_train else None
    test = qdata.read_cls(cfg.cls_data, TASKS["cls"].eval_split, cols, train.label_names if train else None)
    prot = {"eval": _data_protocol(cfg.cls_data, TASKS["cls"].eval_split, len(test.texts),
                                   min(len(test.texts), cfg.max_samples or len(test.texts)), cfg.seed)}
    test = _take_cls(test, _subsample(len(test.texts), cfg.max_samples, cfg.seed))
    if train:
        idx = _subsample(len(train.texts), cfg.probe_samples, cfg.seed)
        prot["probe_train"] = _data_protocol(cfg.cls_train or "train split", "train", len(train.texts), len(idx),
                                             cfg.seed)
        train = _take_cls(train, idx)
    return train, test, prot


def _take_cls(d, idx):
    return qdata.ClsData([d.texts[i] for i in idx], [d.pairs[i] for i in idx] if d.pairs else None,
                         [d.labels[i] for i in idx], d.label_names)


def load_tok(cfg, need_train: bool):
    test = qdata.read_tok(cfg.tok_data, TASKS["tok"].eval_split)
    idx = _subsample(len(test.words), cfg.max_samples, cfg.seed)
    prot = {"eval": _data_protocol(cfg.tok_data, TASKS["tok"].eval_split, len(test.words), len(idx), cfg.seed)}
    test = qdata.TokData([test.words[i] for i in idx], [test.tags[i] for i in idx])
    train = None
    if need_train:
        full = qdata.read_tok(cfg.tok_train or _hf_train(cfg.tok_data, "--tok-train"), "train")
        idx = _subsample(len(full.words), cfg.probe_samples, cfg.seed)
        prot["probe_train"] = _data_protocol(cfg.tok_train or "train split", "train", len(full.words), len(idx),
                                             cfg.seed)
        train = qdata.TokData([full.words[i] for i in idx], [full.tags[i] for i in idx])
    return train, test, prot


def load_qa(cfg, need_train: bool):
    test = qdata.read_qa(cfg.qa_data, TASKS["qa"].eval_split)
    train, prot = None, {}
    if not need_train and cfg.qa_heldout:
        train, test = qdata.split_by_article(test, cfg.qa_train_fraction)
        prot["split_by_article"] = (f"{cfg.qa_data} split by article: only the last "
                                    f"{len({e.article for e in test.examples})} articles are evaluated (the first "
                                    f"{len({e.article for e in train.examples})} may have trained the head)")
        train = None
    if need_train:
        if cfg.qa_train:
            train = qdata.read_qa(cfg.qa_train, "train")
        elif qdata.is_local(cfg.qa_data):
            train, test = qdata.split_by_article(test, cfg.qa_train_fraction)
            prot["split_by_article"] = (f"{cfg.qa_data} split by article: the first "
                                        f"{len({e.article for e in train.examples})} articles train the probe, the "
                                        f"other {len({e.article for e in test.examples})} are evaluated")
        else:
            train = qdata.read_qa(_hf_train(cfg.qa_data, "--qa-train"), "train")
        idx = _subsample(len(train.examples), cfg.probe_samples, cfg.seed)
        prot["probe_train"] = _data_protocol(cfg.qa_train or cfg.qa_data, "train", len(train.examples), len(idx),
                                             cfg.seed)
        train = qdata.QAData([train.examples[i] for i in idx], train.version)
    idx = _subsample(len(test.examples), cfg.max_samples, cfg.seed)
    prot["eval"] = _data_protocol(cfg.qa_data, TASKS["qa"].eval_split, len(test.examples), len(idx), cfg.seed)
    test = qdata.QAData([test.examples[i] for i in idx], test.version)
    return train, test, prot


# ------------------------------------------------------------------ run


def _jobs(cfg: EvalConfig, base_model, tokenizer):
    """(label, task, runner(model, tokenizer, desc) -> result, data protocol) for each task and dataset."""
    from .qa import run_qa
    jobs = []
    for task in parse_tasks(cfg.tasks):
        need_train = task != "lm" and not use_own_head(base_model, task, cfg.probe)
        if task == "lm":
            train = None
            if needs_lm_probe(base_model, tokenizer, cfg.probe):
                spec = cfg.lm_train or _hf_train(cfg.lm_data[0], "--lm-train")
                train = _lm_texts(spec, cfg)
            for spec in cfg.lm_data:
                texts = _lm_texts(spec, cfg)
                prot = {"eval": {"data": spec, "lines_available": len(texts)}}
                if train is not None:
                    prot["probe_train"] = {"data": cfg.lm_train or "train split", "lines_available": len(train)}
                jobs.append((f"lm:{_name(spec)}", "lm",
                             lambda m, t, d, texts=texts, train=train: run_lm(m, t, texts, cfg, d, train), prot))
            continue
        loader, runner = {"cls": (load_cls, run_cls), "tok": (load_tok, run_tok), "qa": (load_qa, run_qa)}[task]
        train, test, prot = loader(cfg, need_train)
        jobs.append((task, task, lambda m, t, d, r=runner, a=train, b=test: r(m, t, a, b, cfg, d), prot))
    return jobs


def evaluate(cfg: EvalConfig) -> dict:
    """Score the baseline and the compressed model on every task, gate, write the report files."""
    from tritpress.compressor.distributed import init_distributed
    from tritpress.compressor.fileio import refuse_overwrite_input

    ctx = init_distributed()
    torch.manual_seed(cfg.seed)
    base, comp, tokenizer, info = load_models(cfg)
    device = ctx.device if cfg.device == "auto" else torch.device(cfg.device)
    base.model.to(device)
    comp.to(device)
    out = Path(cfg.out) if cfg.out else (Path(info["packed_file"]).parent / "eval" if info["packed_file"]
                                         else Path("runs") / "eval")
    refuse_overwrite_input([out / "report.json", out / "report.md"], [cfg.compressed, info["baseline"]])
    overrides = parse_max_drop(cfg.max_drop)
    tasks, rows = {}, []
    for label, task, runner, data_prot in _jobs(cfg, base.model, tokenizer):
        entry = {"task": task, "data": data_prot}
        try:
            for role, model in (("baseline", base.model), ("compressed", comp)):
                t0 = time.perf_counter()
                entry[role] = runner(model, tokenizer, f"{label} {role}")
                entry[role]["seconds"] = round(time.perf_counter() - t0, 3)
        except TritpressError as e:
            if "baseline" in entry:  # the baseline ran, the compressed model did not: that is a failure
                raise
            entry["skipped"] = str(e)
            tasks[label] = entry
            continue
        tasks[label] = entry
        head = entry["compressed"]["head"]
        for metric in TASKS[task].metrics:
            if metric in entry["baseline"]["metrics"] and metric in entry["compressed"]["metrics"]:
                rows.append(gate_row(label, label, metric, entry["baseline"]["metrics"][metric],
                                     entry["compressed"]["metrics"][metric], head,
                                     tolerance_for(task, metric, overrides)))
    report = {"passed": bool(rows) and all(r["status"] == "PASS" for r in rows), "rows": rows, "tasks": tasks,
              "models": info, "config": dataclasses.asdict(cfg), "environment": _versions(ctx.world, device),
              "files": {}}
    if not rows:
        report["passed"] = False
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


def evaluate_stage(ccfg, packed_path, out_dir) -> dict:
    """The `compress MODEL --tasks ...` pipeline stage: the packed file against the input model,
    with the settings of the recipe's [eval] table; run whole on this process (rank 0)."""
    from .distributed import local_only
    ecfg = dataclasses.replace(ccfg.eval, compressed=str(packed_path), baseline=ccfg.model, config=ccfg.config,
                               trust_pickle=ccfg.trust_pickle, tasks=ccfg.tasks, out=str(Path(out_dir) / "eval"),
                               quiet=True)
    with local_only():
        report = evaluate(ecfg)
    return {k: report[k] for k in ("passed", "rows", "tasks", "files")}
