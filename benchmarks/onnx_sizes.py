"""ONNX export on real models: every format, file size against the packed checkpoint, validation.

    HF_HUB_OFFLINE=1 python benchmarks/onnx_sizes.py                         # all models, all formats
    python benchmarks/onnx_sizes.py --models minilm,lstm --formats matmulnbits

Prints ONE JSON object on stdout; progress (the validation lines) goes to stderr.
Models: all-MiniLM-L6-v2, SmolLM2-135M (GGUF Q4_1-rounded weights), a shared-layer variant
of each (blocks 2k and 2k+1 share every weight Parameter: "sequence" sharing, half the
unique block weights), and an LSTM LM (random init, the 2 x 650 "medium" LSTM LM size with
the WikiText-2 vocabulary of 33278). Each model is converted post-training with the default
TernaryConfig, saved packed, then exported in each format; ratio = ONNX bytes / packed bytes.
Exit status 1 when any export fails validation or a quantized format exceeds 1.3x packed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import torch  # noqa: E402


from tritpress.compressor.ingest import SourceInfo, load_model  # noqa: E402
from tritpress.compressor.structure import discover  # noqa: E402
from tritpress.compressor.transform import convert  # noqa: E402
from tritpress.exporters.onnx import ONNX_FORMATS, OnnxConfig, OnnxValidationError, export_onnx  # noqa: E402
from tritpress.exporters.packed import save_packed  # noqa: E402

MAX_RATIO = 1.3


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def share_pairs(model):
    """Blocks 2k+1 reuse block 2k's weight Parameters (the same objects)."""
    stack = discover(model).blocks
    blocks = model.get_submodule(stack.path)
    for i in range(1, len(blocks), 2):
        src = dict(blocks[i - 1].named_parameters())
        for name, _ in list(blocks[i].named_parameters()):
            owner, _, leaf = name.rpartition(".")
            setattr(blocks[i].get_submodule(owner) if owner else blocks[i], leaf, src[name])
    return model


class LSTMLM(torch.nn.Module):
    def __init__(self, vocab=33278, dim=650, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.rnn = torch.nn.LSTM(dim, dim, layers, batch_first=True)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.out(self.rnn(self.emb(ids))[0])


def models(keys):
    for key in keys:
        if key in ("minilm", "minilm_shared", "smollm2", "smollm2_shared"):
            spec = "pkg:all-MiniLM-L6-v2" if key.startswith("minilm") else "pkg:SmolLM2-135M"
            loaded = load_model(spec)
            model = loaded.model.eval()
            yield key, (share_pairs(model) if key.endswith("_shared") else model), loaded.source
        elif key == "lstm":
            torch.manual_seed(0)
            yield key, LSTMLM().eval(), SourceInfo("module", "LSTMLM", "LSTMLM")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,minilm_shared,smollm2,smollm2_shared,lstm")
    ap.add_argument("--formats", default=",".join(ONNX_FORMATS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort
    out = {"benchmark": "onnx_sizes", "onnxruntime": ort.__version__, "torch": torch.__version__, "runs": []}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for key, model, source in models(args.models.split(",")):
            unique = sum(p.numel() for p in model.parameters())
            model = convert(model)
            packed = os.path.join(tmp, f"{key}.safetensors")
            save_packed(model, packed, source)
            for fmt in args.formats.split(","):
                log(f"== {key} {fmt}")
                t = time.perf_counter()
                try:
                    r = export_onnx(model, os.path.join(tmp, f"{key}_{fmt}.onnx"), OnnxConfig(format=fmt),
                                    packed_path=packed, log=log)
                except OnnxValidationError as e:
                    r = e.result
                v = r["validation"]
                run = {"model": key, "format": fmt, "unique_params": unique, "packed_bytes": r["packed_bytes"],
                       "onnx_bytes": r["file_bytes"], "ratio": r["size_ratio_vs_packed"],
                       "rewrites": r["rewrites"], "deduplicated_initializers": r["deduplicated_initializers"],
                       "validation_passed": v["passed"],
                       "outputs": {o["name"]: {k: o[k] for k in ("max_abs_diff", "atol", "exact_max_abs_diff")
                                               if k in o} for o in v["outputs"]},
                       "seconds": round(time.perf_counter() - t, 1)}
                run["within_1.3x"] = fmt == "float" or run["ratio"] <= MAX_RATIO
                ok = ok and v["passed"] and run["within_1.3x"]
                out["runs"].append(run)
                os.unlink(os.path.join(tmp, f"{key}_{fmt}.onnx"))
            del model
    out["all_passed"] = ok
    print(json.dumps(out, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
