"""Which heads a model under evaluation has and what kind of language model it is. Calling it
(logits, features, carried recurrent state) is compressor.modelio's."""
from __future__ import annotations

from torch import nn

from tritpress.compressor.modelio import CAUSAL_SUFFIXES, ModelIO, is_encoder_decoder, is_hf, recurrent_modules

# the LM heads; a task's own head classes are declared with the task (registry.Task.head_classes)
HEAD_SUFFIXES = {
    "causal": CAUSAL_SUFFIXES,
    "masked": ("ForMaskedLM",),
}


def has_head(model: nn.Module, task: str) -> bool:
    return is_hf(model) and type(model).__name__.endswith(HEAD_SUFFIXES[task])


def lm_kind(model: nn.Module) -> str | None:
    """causal | seq2seq (an encoder-decoder with an LM head) | masked | next (a custom module whose
    output is only the next token's logits, RNN or not) | rnn | None (no language-model head)."""
    if is_encoder_decoder(model) and ModelIO.of(model).decoder_start is not None:
        return "seq2seq"
    if has_head(model, "causal") or (is_hf(model) and getattr(model.config, "is_decoder", False)
                                     and hasattr(model, "lm_head")):
        return "causal"
    if has_head(model, "masked"):
        return "masked"
    if not is_hf(model) and ModelIO.of(model).next_token_only:
        return "next"
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
