"""lm-evaluation-harness on a tritpress model, against tritpress's own perplexity on the same text.

The packed model is exported with `compress export --hf` (a transformers BitNet folder) and lm-eval's
`HFLM` loads that folder like any Hugging Face model; its rolling log-likelihood (disjoint windows of
--window predicted tokens, each after one token of context, the first token after the prefix token)
is compared with `compress evaluate --tasks lm` on the packed file with the same windows (context
window + 1, stride window, BOS prepended). Prints one JSON object: token perplexity and bits per
byte from each, and their relative differences:

    HF_HUB_OFFLINE=1 python benchmarks/bench_lm_eval.py --packed runs/hf-smollm2/model.tritpress.safetensors \\
        --hf runs/bench-hf/hf-smollm2 --text ../shared/data/wikitext-2/test.txt --lines 40 --window 256 \\
        --lm-eval-python /path/to/venv-with-lm_eval/bin/python --out runs/bench-lm-eval

lm-eval runs in its own environment (`--lm-eval-python`, where `pip install lm_eval` put it), so the
tritpress environment does not take its dependencies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

LM_EVAL = r'''
import json, math, sys
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import bits_per_byte
from lm_eval.models.huggingface import HFLM
folder, text_path, window = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(text_path, encoding="utf-8").read()
lm = HFLM(pretrained=folder, max_length=window, batch_size=4, device="cpu", dtype="float32")
ll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
tokens = len(lm.tok_encode(text))
n_bytes = len(text.encode("utf-8"))
print(json.dumps({"loglikelihood": ll, "tokens": tokens, "bytes": n_bytes, "perplexity": math.exp(-ll / tokens),
                  "bits_per_byte": bits_per_byte([(ll, n_bytes)]), "prefix_token_id": lm.prefix_token_id}))
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--packed", "--hf", "--text", "--lm-eval-python", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--lines", type=int, default=40, help="the first N lines of --text (as tritpress reads them)")
    p.add_argument("--window", type=int, default=256)
    return p.parse_args(argv)


def text_slice(path: str, lines: int, out: Path) -> Path:
    """The first `lines` lines as tritpress reads them, joined by newlines: the text both sides score."""
    from tritpress.compressor.data import read_texts

    sliced = out / "slice.txt"
    sliced.write_text("\n".join(read_texts(path)[:lines]), encoding="utf-8")
    return sliced


def ours(packed: str, text: Path, window: int, out: Path) -> dict:
    run = subprocess.run(["compress", "evaluate", packed, "--tasks", "lm", "--lm-data", str(text),
                          "--context", str(window + 1), "--stride", str(window), "--out", str(out / "eval"),
                          "--json"], capture_output=True, text=True)
    if run.returncode not in (0, 1):  # 1: the gate failed, the numbers are there
        raise SystemExit(f"compress evaluate failed: {run.stderr.strip()[-400:]}")
    report = json.loads(run.stdout)
    rows = {r["metric"]: r for r in report["rows"]}
    return {"perplexity": rows["perplexity"]["compressed"], "bits_per_byte": rows["bits_per_byte"]["compressed"],
            "baseline_perplexity": rows["perplexity"]["baseline"]}


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = text_slice(a.text, a.lines, out)
    mine = ours(a.packed, text, a.window, out)
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}  # transformers' BitNet kernels: eager, not compiled
    run = subprocess.run([a.lm_eval_python, "-c", LM_EVAL, a.hf, str(text), str(a.window)], capture_output=True,
                         text=True, env=env)
    if run.returncode:
        raise SystemExit(f"lm-eval failed: {run.stderr.strip()[-600:]}")
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps({"benchmark": "tritpress bench_lm_eval", "packed": a.packed, "hf": a.hf, "text": a.text,
                      "lines": a.lines, "window": a.window, "tritpress": mine, "lm_eval": theirs,
                      "perplexity_rel_diff": theirs["perplexity"] / mine["perplexity"] - 1,
                      "bits_per_byte_rel_diff": theirs["bits_per_byte"] / mine["bits_per_byte"] - 1}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
