"""Calling a model under evaluation: which heads it has, its logits, its features."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from tritpress.compressor.errors import TritpressError

HEAD_SUFFIXES = {
    "cls": ("ForSequenceClassification",),
    "tok": ("ForTokenClassification",),
    "qa": ("ForQuestionAnswering",),
    "causal": ("ForCausalLM", "LMHeadModel"),
    "masked": ("ForMaskedLM",),
}


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_dict")


def recurrent_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost recurrent modules (nn.LSTM/GRU/RNN, or our wrappers around one)."""
    from tritpress.compressor.layers import FakeQuantRNN, QRNN
    kinds = (nn.RNNBase, QRNN, FakeQuantRNN)
    found, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, kinds):
            found.append(m)
            inside.add(name)
    return found


def has_head(model: nn.Module, task: str) -> bool:
    return is_hf(model) and type(model).__name__.endswith(HEAD_SUFFIXES[task])


def lm_kind(model: nn.Module) -> str | None:
    """causal | masked | rnn | None (no language-model head)."""
    if has_head(model, "causal") or (is_hf(model) and getattr(model.config, "is_decoder", False)
                                     and hasattr(model, "lm_head")):
        return "causal"
    if has_head(model, "masked"):
        return "masked"
    if not is_hf(model) and recurrent_modules(model):
        return "rnn"
    return None


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the token embedding, also when it was quantized (QEmbedding)."""
    from tritpress.compressor.data import token_vocab_size
    return token_vocab_size(model) or next((m.num_embeddings for m in model.modules()
                                            if isinstance(getattr(m, "num_embeddings", None), int)), None)


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits on the model's device."""
    ids = ids.to(device_of(model))
    attention_mask = None if attention_mask is None else attention_mask.to(ids.device)
    if is_hf(model):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        return model(input_ids=ids, **kw).logits.float()
    from tritpress.compressor.structure import discover
    from tritpress.compressor.modelio import ModelIO
    io = getattr(model, "_tritpress_io", None) or ModelIO.discover(model, discover(model))
    model._tritpress_io = io
    return io.forward(model, ids)


def features(model: nn.Module, enc: dict) -> torch.Tensor:
    """Last hidden state [B, T, H] of a transformers model (the probe's frozen features), on the CPU."""
    if not is_hf(model):
        raise TritpressError(f"probing {type(model).__name__} needs a transformers model (hidden states)")
    out = model(**enc, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    h = hidden[-1] if hidden else getattr(out, "last_hidden_state", None)
    if h is None:
        raise TritpressError(f"{type(model).__name__} returns no hidden states to probe")
    return h.float().cpu()


@contextlib.contextmanager
def carried_state(model: nn.Module):
    """While active, every outermost recurrent module starts from the state it ended with on the
    previous call (the stream is read as one sequence), whatever the model's own forward does."""
    state: dict[int, object] = {}

    def pre(module, args, kwargs):
        key = id(module)
        if key in state and len(args) == 1 and "hx" not in kwargs:
            return args + (state[key],), kwargs
        return None

    def post(module, args, kwargs, output):
        hx = output[1]
        state[id(module)] = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()

    handles = []
    for m in recurrent_modules(model):
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
