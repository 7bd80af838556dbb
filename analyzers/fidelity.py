"""Compare a model's outputs with another's on one example batch.

Used twice by the pipeline: original vs post-training ternary (how much PTQ
alone moves the outputs), and converted vs reloaded packed checkpoint (must be
identical)."""
from __future__ import annotations

import torch
from torch import nn

EXAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Ternary weights keep only the sign and a shared scale of every parameter.",
]


def example_inputs(model: nn.Module, tokenizer=None, seq_len: int = 16, seed: int = 0) -> dict | tuple:
    """Keyword inputs for a transformers model (tokenized text when a tokenizer exists,
    else random ids), or a positional (ids,) tuple for a custom module."""
    vocab = max((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), default=None)
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(EXAMPLE_TEXT, return_tensors="pt", padding=True, truncation=True, max_length=seq_len * 4)
        if vocab is None or int(enc["input_ids"].max()) < vocab:
            return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    g = torch.Generator().manual_seed(seed)
    if vocab is None:
        raise ValueError("cannot build an example input: the model has no embedding and no tokenizer")
    ids = torch.randint(0, vocab, (2, seq_len), generator=g)
    return {"input_ids": ids} if hasattr(model, "config") else (ids,)


def first_float_output(out) -> torch.Tensor:
    """The model's main output: logits / last_hidden_state / the first float tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, dict) else out
    for value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
        if isinstance(value, (tuple, list)):
            try:
                return first_float_output(value)
            except ValueError:
                continue
    raise ValueError(f"no float tensor in the model output ({type(out).__name__})")


@torch.no_grad()
def run(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return first_float_output(out).float()


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    a, b = reference.reshape(-1), other.reshape(-1)
    return {
        "max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0,
        "relative_l2": float((a - b).norm() / a.norm().clamp(min=1e-12)),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "shape": list(reference.shape),
    }
