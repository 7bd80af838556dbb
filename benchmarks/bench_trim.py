"""What vocabulary trimming alone costs a float token-classification model, no quantization: the
model's own head on the dev set, (1) as it is, (2) trimmed to the ids its training sentences use
with every other id read as the unknown token (what `--trim-vocab data` does), (3) trimmed the same
way but each dropped id read as the kept id nearest to it in the original embedding (cosine), a
diagnostic for a mapping tritpress does not build yet. Prints one JSON object:

    HF_HUB_OFFLINE=1 python benchmarks/bench_trim.py --model runs/minilm-conll \\
        --train ../shared/data/conll2003/train.txt --dev ../shared/data/conll2003/valid.txt
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F


def train_ids(tokenizer, path: str) -> set[int]:
    """The ids the CoNLL training sentences use, tokenized as the task encodes them (words pre-split)."""
    used: set[int] = set()
    with open(path, encoding="utf-8") as f:
        for sentence in f.read().split("\n\n"):
            words = [line.split()[0] for line in sentence.splitlines() if line.strip() and
                     not line.startswith("-DOCSTART-")]
            if words:
                used.update(tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"])
    return used


def nearest_kept(embedding: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[vocab] row of each id in the kept table: its own when kept, else its nearest kept id's (cosine)."""
    rows = torch.full((embedding.shape[0],), -1, dtype=torch.long)
    rows[kept] = torch.arange(len(kept))
    dropped = (rows < 0).nonzero().flatten()
    unit = F.normalize(embedding, dim=1)
    rows[dropped] = torch.cat([(unit[dropped[i:i + 2048]] @ unit[kept].t()).argmax(1)
                               for i in range(0, len(dropped), 2048)])
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    args = p.parse_args(argv)
    from tritpress.analyzers.quality import EvalConfig
    from tritpress.analyzers.quality.evaluate import read_jobs
    from tritpress.compressor import load_model
    from tritpress.compressor.vocab import TrimmedEmbedding, trim_model

    loaded = load_model(args.model)
    tok = loaded.tokenizer
    cfg = EvalConfig(tasks="tok", tok_data=args.dev, quiet=True, bootstrap=0)
    (task, data), = read_jobs(cfg, loaded.model, tok)
    score = lambda model, name: task.run(task, model, tok, data, cfg, name)["metrics"]  # noqa: E731
    result = {"model": args.model, "dev": args.dev, "baseline": score(loaded.model, "baseline")}
    used = train_ids(tok, args.train)
    model = copy.deepcopy(loaded.model)
    result["trim"] = trim_model(model, used | set(tok.all_special_ids), tok.unk_token_id)
    result["trimmed_unknown"] = score(model, "trimmed, dropped ids as [UNK]")
    table = next(m for m in model.modules() if isinstance(m, TrimmedEmbedding))
    table.index = nearest_kept(loaded.model.get_input_embeddings().weight.detach(), table.kept_ids.long())
    result["trimmed_nearest"] = score(model, "trimmed, dropped ids as the nearest kept id")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
