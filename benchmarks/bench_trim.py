"""What vocabulary trimming alone costs a float token-classification model, no quantization: the
model's own head on the dev set, (1) as it is, (2) trimmed to the ids its training examples use
(the ids `compress --trim-vocab data` keeps) with every other id read as the unknown token, (3)
trimmed the same way with each dropped id read as the kept id nearest to it in the original
embedding (`--trim-dropped nearest`). Prints one JSON object:

    HF_HUB_OFFLINE=1 python benchmarks/bench_trim.py --model runs/minilm-conll \\
        --train ../shared/data/conll2003/train.txt --dev ../shared/data/conll2003/valid.txt
"""
from __future__ import annotations

import argparse
import copy
import json


def train_ids(model, tokenizer, train: str, dev: str, seq_len: int) -> set[int]:
    """The ids `compress --trim-vocab data` keeps from a task model's training examples (the same reader
    and encoding QAT trains on, each cut to --seq-len tokens)."""
    from tritpress.analyzers.quality.examples import task_examples
    from tritpress.compressor.train import TrainConfig

    examples = task_examples(model, tokenizer, "tok", TrainConfig(data=train, eval_data=dev, seq_len=seq_len))[0]
    return {i for f in examples.features for i in f["input_ids"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--seq-len", type=int, default=128, help="the --seq-len the compress run trims with")
    args = p.parse_args(argv)
    from tritpress.analyzers.quality import EvalConfig
    from tritpress.analyzers.quality.evaluate import read_jobs
    from tritpress.compressor import load_model
    from tritpress.compressor.settings import TRIM_DROPPED
    from tritpress.compressor.vocab import trim_model

    loaded = load_model(args.model)
    tok = loaded.tokenizer
    cfg = EvalConfig(tasks="tok", tok_data=args.dev, quiet=True, bootstrap=0)
    (task, data), = read_jobs(cfg, loaded.model, tok)
    score = lambda model, name: task.run(task, model, tok, data, cfg, name)["metrics"]  # noqa: E731
    result = {"model": args.model, "dev": args.dev, "baseline": score(loaded.model, "baseline")}
    used = train_ids(loaded.model, tok, args.train, args.dev, args.seq_len) | set(tok.all_special_ids)
    for dropped in TRIM_DROPPED:  # unk: what --trim-vocab does by default; nearest: --trim-dropped nearest
        model = copy.deepcopy(loaded.model)
        result[f"trim_{dropped}"] = trim_model(model, used, tok.unk_token_id, dropped)
        result[f"trimmed_{dropped}"] = score(model, f"trimmed, dropped ids as {dropped}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
