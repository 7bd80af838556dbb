"""What the exporters read off a converted model, shared by the transformers BitNet folder
(`hf_bitnet`) and the llama.cpp GGUF file (`llama_gguf`): the path transformers gives a module
(tritpress's wrappers dropped), a shared occurrence's gain, the state keys a written module holds,
the check that a model is converted and expressible, the source's architecture on the meta device,
and the tokenizer to copy in."""
from __future__ import annotations

import torch
from torch import nn

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.share import SharedLinear
from tritpress.compressor.transform import get_record
from tritpress.compressor.vocab import TrimmedEmbedding


def hf_name(name: str, modules: dict[str, nn.Module]) -> str:
    """A module path of the converted model -> the path transformers builds: the wrappers tritpress
    adds (a shared occurrence's `inner`, a trimmed embedding's `table`) are dropped."""
    parts, kept = name.split("."), []
    for i, part in enumerate(parts):
        parent = modules.get(".".join(parts[:i]))
        if (isinstance(parent, SharedLinear) and part == "inner") or \
                (isinstance(parent, TrimmedEmbedding) and part == "table"):
            continue
        kept.append(part)
    return ".".join(kept)


def occurrence_gain(name: str, modules: dict[str, nn.Module]) -> float:
    """A shared occurrence's gain (SharedLinear, folded into the scale by the exporters); 1 elsewhere."""
    parent = modules.get(name.rpartition(".")[0]) if name.endswith(".inner") else None
    return float(parent.gain.detach()) if isinstance(parent, SharedLinear) else 1.0


def state_keys_of(name: str, m: nn.Module) -> set[str]:
    """The state-dict keys module `name` holds (its parameters and buffers, tied ones included): what an
    exporter has written once it wrote the module, so the walk over the remaining state skips them."""
    return {f"{name}.{k}" for k, _ in [*m.named_parameters(remove_duplicate=False),
                                       *m.named_buffers(remove_duplicate=False)]}


def exportable_source(model: nn.Module, source, why_not, error: type, what: str) -> dict:
    """The source as a dict, once `model` is checked to be converted and `why_not(model, source)` finds
    nothing it cannot express (else `error` with the first reason, in one line)."""
    record = get_record(model)
    if record is None or not record.converted:
        raise error(f"writing {what} needs a converted model (compressor.convert or load_packed)")
    source = source.to_dict() if hasattr(source, "to_dict") else (source or {})
    why = why_not(model, source)
    if why:
        raise error(f"cannot write {what}: {why[0]}" + (f" (and {len(why) - 1} more)" if len(why) > 1 else ""))
    return source


def meta_skeleton(source: dict) -> nn.Module:
    """The transformers model of the source config, on the meta device (no memory, no init)."""
    from tritpress.compressor.ingest import build_from_config

    with torch.device("meta"):
        return build_from_config(source["hf_config"], source["model_class"])


def source_tokenizer(source: dict, cfg, error: type = TritpressError):
    """The tokenizer to copy in: cfg.tokenizer (--hf-tokenizer), else the source model's (None when it
    has none); a cfg.tokenizer that cannot be loaded raises `error`."""
    from tritpress.compressor.ingest import _tokenizer as load_tokenizer

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        if tok is None:
            raise error(f"--hf-tokenizer {cfg.tokenizer}: no tokenizer could be loaded from it")
        return tok
    kw = {"gguf_file": source["gguf_file"]} if source.get("gguf_file") else {}
    return load_tokenizer(source["path"], **kw) if source.get("path") else None
