"""The first --lines non-empty lines of a text file, cut at exactly --tokens tokens of a model's tokenizer,
on stdout without a final newline: a text that both lm-eval's rolling windows and tritpress's stride
windows cover in whole windows (tokens a multiple of the window), so the two protocols score the same
tokens with the same context.

    HF_HUB_OFFLINE=1 python benchmarks/text_slice.py ../shared/data/wikitext-2/test.txt --lines 40 --tokens 3840 \\
        --model pkg:SmolLM2-135M > runs/lmeval-wt2/test-3840.txt
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("text")
    p.add_argument("--lines", type=int, default=40)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--model", required=True, help="any compress MODEL spec: its tokenizer counts the tokens")
    args = p.parse_args(argv)
    from tritpress.analyzers.quality.lm import prefix_with_tokens
    from tritpress.compressor import load_model

    tokenizer = load_model(args.model).tokenizer
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    with open(args.text, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()][: args.lines]
    cut = prefix_with_tokens("\n".join(lines), encode, args.tokens)  # the LM task's own cut
    if len(encode(cut)) != args.tokens:
        raise SystemExit(f"the first {args.lines} lines hold fewer than {args.tokens} tokens")
    sys.stdout.write(cut)


if __name__ == "__main__":
    main()
