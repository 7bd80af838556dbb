"""What vocabulary trimming alone costs a float task model, no quantization: the model's own head on
the dev set, (1) as it is, (2) trimmed to the ids its training examples use (the ids `compress
--trim-vocab data` keeps) with every other id read as the unknown token, (3) trimmed the same way
with each dropped id read as the kept id nearest to it in the original embedding (`--trim-dropped
nearest`), (4) `subwords`: the kept ids plus the one-character word pieces of every character they contain (so
a word in those characters can still be spelled), and the dev text tokenized by the model's own WordPiece tokenizer with the dropped
pieces removed from its vocabulary: a word whose piece was dropped is split into kept pieces, the
way BERT already splits rare words, instead of becoming another token, (5) `mix K` (`--trim-dropped mix
--trim-mix K`): each dropped id reads a weighted sum of K kept rows fit to its own. With `--min-count N`
(repeatable) rows (2), (3) and (5) are measured again keeping only the ids the training examples use N+
times (`--trim-min-count N`). Prints one JSON object:

    HF_HUB_OFFLINE=1 python benchmarks/bench_trim.py --model runs/minilm-conll \\
        --train ../shared/data/conll2003/train.txt --dev ../shared/data/conll2003/valid.txt
    HF_HUB_OFFLINE=1 python benchmarks/bench_trim.py --task qa --model runs/minilm-squad --seq-len 192 \\
        --train runs/frontier-squad/train.json --dev runs/frontier-squad/heldout.json \\
        --eval qa_max_length=192 --eval doc_stride=64
    HF_HUB_OFFLINE=1 python benchmarks/bench_trim.py --model runs/minilm-conll --train ../shared/data/conll2003/train.txt \\
        --dev ../shared/data/conll2003/valid.txt --mix 4 --mix 8 --min-count 1 --min-count 2 --min-count 3 --no-subwords
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_task_qat import toml_value  # noqa: E402  (--eval KEY=VALUE read as the other benchmarks write it)


def train_ids(model, tokenizer, task: str, train: str, dev: str, seq_len: int, doc_stride: int) -> Counter:
    """How often a task model's training examples use each id: what `compress --trim-vocab data` keeps
    (the same reader and encoding QAT trains on, each cut to --seq-len tokens)."""
    from tritpress.analyzers.quality.examples import task_examples
    from tritpress.compressor.train import TrainConfig

    tcfg = TrainConfig(data=train, eval_data=dev, seq_len=seq_len, doc_stride=doc_stride)
    examples = task_examples(model, tokenizer, task, tcfg)[0]
    return Counter(i for f in examples.features for i in f["input_ids"])


def spelling_ids(tokenizer, used: set[int]) -> set[int]:
    """The WordPiece vocabulary's one-character pieces ("a", "##a") of every character the kept pieces
    contain: with them kept, a word made of the corpus's characters still has a spelling (a few hundred
    ids, not the vocabulary's ~2,000 one-character pieces of every script)."""
    prefix = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("continuing_subword_prefix", "##")
    vocab = tokenizer.get_vocab()
    chars = {c for t in tokenizer.convert_ids_to_tokens(sorted(used)) for c in t.removeprefix(prefix)}
    return {i for t, i in vocab.items() if len(t.removeprefix(prefix)) == 1 and t.removeprefix(prefix) in chars}


def restricted_tokenizer(tokenizer, kept: set[int]):
    """The same tokenizer with the pieces outside `kept` removed from its WordPiece vocabulary (ids unchanged)."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise SystemExit(f"subwords: a WordPiece tokenizer is needed, not {spec['model']['type']}")
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i in kept}
    out = copy.deepcopy(tokenizer)
    out._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="tok", choices=("cls", "tok", "qa"))
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--seq-len", type=int, default=128, help="the --seq-len the compress run trims with")
    p.add_argument("--doc-stride", type=int, default=64, help="qa: the --doc-stride of the compress run")
    p.add_argument("--eval", action="append", default=[], metavar="KEY=VALUE", help="an EvalConfig field")
    p.add_argument("--mix", type=int, action="append", default=[], metavar="K",
                   help="also a row with --trim-dropped mix --trim-mix K (repeatable)")
    p.add_argument("--min-count", type=int, action="append", default=[], metavar="N",
                   help="keep the ids used N+ times (--trim-min-count N; repeatable) [default: 1]")
    p.add_argument("--subwords", action=argparse.BooleanOptionalAction, default=True,
                   help="the re-spelling row (a WordPiece tokenizer)")
    args = p.parse_args(argv)
    from tritpress.analyzers.quality import EvalConfig
    from tritpress.analyzers.quality.evaluate import read_jobs
    from tritpress.compressor import load_model
    from tritpress.compressor.vocab import trim_model

    loaded = load_model(args.model)
    tok = loaded.tokenizer
    # each value as the [eval] table of bench_task_qat's eval.toml holds it: true/false, numbers, else strings
    settings = {k.strip(): tomllib.loads(f"v = {toml_value(v.strip())}")["v"]
                for k, v in (e.split("=", 1) for e in args.eval)}
    cfg = EvalConfig(tasks=args.task, **{f"{args.task}_data": args.dev}, quiet=True, bootstrap=0, **settings)
    (task, data), = read_jobs(cfg, loaded.model, tok)
    score = lambda model, name, t=tok: task.run(task, model, t, data, cfg, name)["metrics"]  # noqa: E731
    result = {"model": args.model, "task": args.task, "dev": args.dev, "baseline": score(loaded.model, "baseline")}
    counts = train_ids(loaded.model, tok, args.task, args.train, args.dev, args.seq_len, args.doc_stride)
    for n in args.min_count or [1]:
        used = {i for i, c in counts.items() if c >= n} | set(tok.all_special_ids)
        suffix = "" if n == 1 else f"_min{n}"
        # unk: what --trim-vocab does by default; nearest / mix K: --trim-dropped nearest / mix --trim-mix K
        for dropped, k in [("unk", 0), ("nearest", 0), *(("mix", k) for k in args.mix)]:
            name = f"{dropped}{k or ''}{suffix}"
            model = copy.deepcopy(loaded.model)
            result[f"trim_{name}"] = trim_model(model, used, tok.unk_token_id, dropped, k or 4)
            result[f"trimmed_{name}"] = score(model, f"trimmed{suffix}, dropped ids as {dropped} {k or ''}")
    if args.subwords:
        used = set(counts) | set(tok.all_special_ids)
        kept = used | spelling_ids(tok, used)
        model = copy.deepcopy(loaded.model)
        result["trim_subwords"] = trim_model(model, kept, tok.unk_token_id, "nearest")
        result["trimmed_subwords"] = score(model, "trimmed, dropped pieces re-spelled", restricted_tokenizer(tok, kept))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
