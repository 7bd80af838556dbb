"""lm-evaluation-harness as an evaluation task: `--tasks lmeval --lmeval-tasks hellaswag,text.txt`.

Both models, baseline and compressed, are handed to lm-eval's own `HFLM` (it takes a loaded
transformers model and its tokenizer) and scored by `lm_eval.simple_evaluate`: the numbers are
lm-eval's, computed by its code, and gated like every other task. Each --lmeval-tasks entry is
an lm-eval task name, a task YAML file, or a local text file, which becomes lm-eval's WikiText
protocol on that file read as one document (rolling log-likelihood: word and byte perplexity,
bits per byte). lm-eval is optional: `pip install 'tritpress[lmeval]'`; the hub's task data
needs the network, a local text file does not."""
from __future__ import annotations

from pathlib import Path

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.modelio import is_hf

from . import data as qdata
from .metrics import Metric
from .registry import TaskData

# lm-eval's metric key -> (the metric as reported and gated here, factor to its units): fractions become points
FROM_LMEVAL = {
    "word_perplexity": (Metric("word_perplexity", lower_is_better=True, max_drop="5%"), 1.0),
    "byte_perplexity": (Metric("byte_perplexity", lower_is_better=True, max_drop="2%"), 1.0),
    "bits_per_byte": (Metric("bits_per_byte", lower_is_better=True, max_drop="2%"), 1.0),
    "acc": (Metric("accuracy"), 100.0),
    "acc_norm": (Metric("accuracy_norm"), 100.0),
    "exact_match": (Metric("exact_match"), 100.0),
}
METRICS = tuple(metric for metric, _ in FROM_LMEVAL.values())


def lm_eval_module():
    """lm_eval, or the one-line reason it cannot be used."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - its transformers backend
    except ImportError as e:
        raise TritpressError(f"--tasks lmeval needs lm-evaluation-harness ({e}): "
                             "pip install 'tritpress[lmeval]'") from e
    return lm_eval


def read_lmeval(task, cfg, need_train: bool) -> list[TaskData]:
    """One job per --lmeval-tasks entry (comma-separated lists are split)."""
    specs = [s.strip() for entry in task.eval_data(cfg) for s in entry.split(",") if s.strip()]
    if not specs:
        raise TritpressError("--tasks lmeval needs --lmeval-tasks: lm-eval task names, task YAML files or "
                             "local text files")
    lm_eval_module()
    jobs = []
    for spec in specs:
        config = task_config(spec)
        protocol = {"lm_eval_task": spec, "limit": cfg.lmeval_limit or None,
                    "num_fewshot": None if cfg.lmeval_fewshot < 0 else cfg.lmeval_fewshot,
                    "max_length": cfg.lmeval_max_length or None}
        jobs.append(TaskData(f"{task.name}:{qdata.short_name(spec)}", config, None, protocol))
    return jobs


def task_config(spec: str):
    """What simple_evaluate is given for one entry: a task name as is, a YAML file's config, or a
    text file's rolling-log-likelihood task (the text read as one document, as lm-eval's WikiText)."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TritpressError(f"--lmeval-tasks: no such task file {spec}")
        from lm_eval.utils import load_yaml_config
        return load_yaml_config(str(path))
    if path.suffix == ".txt" or path.is_file():
        if not path.is_file():
            raise TritpressError(f"--lmeval-tasks: no such text file {spec}")
        return {"task": f"text_{path.stem}", "dataset_path": "text",
                "dataset_kwargs": {"data_files": {"test": str(path.resolve())}, "sample_by": "document"},
                "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
                "doc_to_target": "{{text}}", "metric_list": [
                    {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}]}
    return spec


def no_probe(task, model, tokenizer, cfg) -> bool:
    return False   # lm-eval scores the model's own LM head


def check_lmeval(task, model, tokenizer, data: TaskData, cfg) -> None:
    """lm-eval's HFLM scores transformers causal LMs with their tokenizer: anything else is refused."""
    if not is_hf(model) or not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise TritpressError(f"--tasks lmeval scores transformers causal LMs through lm-eval's HFLM, "
                             f"not a {type(model).__name__}")
    if tokenizer is None:
        raise TritpressError("--tasks lmeval needs the model's tokenizer (none found with the baseline)")


def run_lmeval(task, model, tokenizer, data: TaskData, cfg, desc: str) -> dict:
    lm_eval = lm_eval_module()
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device),
              **({"max_length": cfg.lmeval_max_length} if cfg.lmeval_max_length else {}))
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[data.test], limit=cfg.lmeval_limit or None, bootstrap_iters=0, log_samples=False,
        num_fewshot=None if cfg.lmeval_fewshot < 0 else cfg.lmeval_fewshot, random_seed=cfg.seed,
        numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
        verbosity="ERROR")
    name = data.test["task"] if isinstance(data.test, dict) else data.test
    results = out["results"].get(name) or next(iter(out["results"].values()))
    metrics = {}
    for key, value in results.items():
        metric, _, filt = key.partition(",")
        if metric in FROM_LMEVAL and isinstance(value, (int, float)) and filt in ("none", ""):
            declared, factor = FROM_LMEVAL[metric]
            metrics[declared.name] = float(value) * factor
    if not metrics:
        raise TritpressError(f"lm-eval task {name!r} reported none of {', '.join(FROM_LMEVAL)} "
                             f"(it reported {', '.join(k for k in results if ',' in k)})")
    protocol = {"lm_eval_version": out.get("lm_eval_version"), "task": name,
                "samples": (out.get("n-samples") or {}).get(name), "max_length": lm.max_length}
    return {"metrics": metrics, "protocol": protocol, "head": "own"}
