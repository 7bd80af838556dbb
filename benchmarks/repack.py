"""Rewrite packed files with this tritpress's format (same weights) and compare sizes.

A model trained by an older tritpress keeps its file format; this loads each file, writes it again
(format of the installed tritpress) next to --out, checks that the rewritten file reloads to the
same outputs bit for bit, and prints one JSON object: bytes and × vs fp32 before and after, and
the size rows that changed:

    HF_HUB_OFFLINE=1 python benchmarks/repack.py runs/frontier-sst2/x32-seqffn-int2-oint4-5000/model.tritpress.safetensors \\
        --out runs/repacked
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tritpress.analyzers.size import size_report
from tritpress.compressor.ingest import SourceInfo
from tritpress.compressor.modelio import example_inputs, run_model
from tritpress.exporters.packed import load_packed, read_metadata, save_packed


def repack(path: Path, out: Path) -> dict:
    meta = read_metadata(path)
    model = load_packed(path)
    target = out / f"{path.parent.name}.tritpress.safetensors"
    save_packed(model, target, SourceInfo(**meta["source"]), meta.get("extra"))
    again = load_packed(target)
    inputs = example_inputs(model, None)
    with torch.no_grad():
        identical = torch.equal(run_model(model, inputs), run_model(again, inputs))
    before, after = size_report(path), size_report(target)
    rows = [(a["component"], a["bytes"], b["bytes"]) for a, b in zip(before["components"], after["components"])
            if a["bytes"] != b["bytes"]]
    return {"file": str(path), "rewritten": str(target), "format_version": [meta["format_version"],
            read_metadata(target)["format_version"]], "bytes": [before["file_bytes"], after["file_bytes"]],
            "ratio_vs_fp32": [before.get("ratio_vs_fp32"), after.get("ratio_vs_fp32")],
            "changed_rows": {c: [a, b] for c, a, b in rows}, "outputs_identical": identical}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("packed", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"benchmark": "tritpress repack", "files": [repack(Path(f), out) for f in args.packed]},
                     indent=2))


if __name__ == "__main__":
    main()
