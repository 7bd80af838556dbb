"""How tritpress calls a model: the one place that builds inputs, runs a forward, reads the
main output, hooks block outputs and measures held-out quality. Training, the sharing analysis,
evaluation, export and the pipeline's checks all go through it.

- `ModelIO`: how to call a model and read its output, discovered once from its structure.
- `BlockOutputs`: forward hooks recording each block's output.
- `example_inputs` / `run_model` / `compare_outputs`: one example batch through two models, compared
  (the pipeline's checks: original vs ternary, converted vs reloaded packed file).
- `held_out_quality`: perplexity for causal LMs, agreement with a teacher otherwise.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .structure import ModelStructure

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
def run_model(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return first_float_output(out).float()


def compare_outputs(reference: torch.Tensor, other: torch.Tensor) -> dict:
    a, b = reference.reshape(-1), other.reshape(-1)
    return {
        "max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0,
        "relative_l2": float((a - b).norm() / a.norm().clamp(min=1e-12)),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "shape": list(reference.shape),
    }


@dataclass
class ModelIO:
    """How to call the model and read its output, discovered once from its structure."""

    hf: bool                 # keyword input_ids (transformers) or positional ids (custom module)
    seq_first: bool          # custom RNN models built with batch_first=False
    has_head: bool           # output is logits over a vocabulary
    causal: bool             # next-token prediction applies
    block_paths: list[str]
    no_cache: bool = False   # HF forward takes use_cache: pass False (one full-sequence forward, no KV cache)

    @classmethod
    def discover(cls, model: nn.Module, structure: ModelStructure) -> "ModelIO":
        hf = hasattr(model, "config") and hasattr(model.config, "to_dict")
        rnns = [m for m in model.modules() if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN))]
        seq_first = not hf and bool(rnns) and not all(getattr(r, "batch_first", False) for r in rnns)
        name = type(model).__name__
        causal = (not hf and bool(rnns)) or name.endswith(("ForCausalLM", "LMHeadModel")) \
            or bool(getattr(getattr(model, "config", None), "is_decoder", False))
        blocks = []
        if structure.blocks is not None and structure.blocks.kind == "modulelist":
            blocks = [f"{structure.blocks.path}.{i}" for i in range(structure.blocks.num_blocks)]
        no_cache = hf and "use_cache" in inspect.signature(model.forward).parameters
        return cls(hf, seq_first, structure.head is not None, causal and structure.head is not None, blocks,
                   no_cache)

    def forward(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        if self.hf:
            kwargs = {"use_cache": False} if self.no_cache else {}
            return first_float_output(model(input_ids=ids, **kwargs)).float()
        if self.seq_first:
            return first_float_output(model(ids.t())).float().transpose(0, 1)
        return first_float_output(model(ids)).float()


class BlockOutputs:
    """Forward hooks that record each block's output (the hidden state it passes on)."""

    def __init__(self, model: nn.Module, paths: list[str]):
        self.outputs: list[torch.Tensor] = []
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook) for p in paths]

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.outputs.append(out)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def nmse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE normalized by the teacher's mean square, per sequence, averaged over sequences:
    scale-free across blocks and models, and a mean of per-sequence terms, so splitting a batch
    across processes does not change it."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    return ((s - t).pow(2).mean(1) / t.pow(2).mean(1).clamp(min=1e-8)).mean()


@torch.no_grad()
def held_out_quality(io: ModelIO, model: nn.Module, blocks: torch.Tensor, teacher: nn.Module | None = None,
             batch: int = 8) -> dict:
    """Held-out quality: perplexity for causal LMs, agreement with the teacher otherwise."""
    model.eval()
    nll_sum, n_tokens, cos_sum, nmse_sum, n_batches = 0.0, 0, 0.0, 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i: i + batch]
        out = io.forward(model, ids)
        if io.causal:
            nll_sum += float(F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
            n_tokens += ids[:, 1:].numel()
        elif teacher is not None:
            ref = io.forward(teacher, ids)
            cos_sum += float(F.cosine_similarity(out.mean(1), ref.mean(1), dim=-1).mean())
            nmse_sum += float(nmse(out, ref))
            n_batches += 1
    if io.causal:
        return {"nll": nll_sum / n_tokens, "ppl": math.exp(nll_sum / n_tokens), "tokens": n_tokens}
    if n_batches:
        return {"cosine_to_teacher": cos_sum / n_batches, "nmse_to_teacher": nmse_sum / n_batches,
                "sequences": len(blocks)}
    return {}
