"""Tiny, randomly initialised models shared by the tests (no downloads).

Kept in a plain module (not only in conftest) so that a pickled instance
(`torch.save(model)`) can be unpickled again as `tests.tiny_models.LSTMLM`.
"""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 100
HIDDEN = 32


class LSTMLM(nn.Module):
    """Embedding -> multi-layer LSTM (or GRU) -> vocab-sized Linear head."""

    def __init__(self, vocab: int = VOCAB, dim: int = HIDDEN, layers: int = 2, cell: str = "lstm",
                 tie: bool = False):
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = rnn_cls(dim, dim, layers, batch_first=True)
        self.out = nn.Linear(dim, vocab)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.rnn(self.emb(ids))[0])


class AttentionCharLSTM(nn.Module):
    """A character-level LSTM with attention over its time steps whose forward returns only the
    next token's logits [batch, vocab] (the last position's), as Keras-style text generators do."""

    def __init__(self, vocab: int = VOCAB, dim: int = HIDDEN, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, layers, batch_first=True)
        self.score = nn.Linear(dim, 1)
        self.out = nn.Linear(2 * dim, vocab)

    def forward(self, ids):
        h = self.rnn(self.emb(ids))[0]                                 # [B, T, H]
        weights = torch.softmax(self.score(h).squeeze(-1), dim=1)      # attention over the T steps
        attended = (weights.unsqueeze(-1) * h).sum(1)
        return self.out(torch.cat([attended, h[:, -1]], -1))           # [B, V]: the next token only


def bert_config(**kw):
    from transformers import BertConfig
    return BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64), **kw})


def gpt2_config(**kw):
    from transformers import GPT2Config
    return GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64,
                                bos_token_id=0, eos_token_id=0), **kw})


def llama_config(tie: bool, **kw):
    from transformers import LlamaConfig
    return LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, pad_token_id=0), **kw})


def make_bert():
    from transformers import BertModel
    return BertModel(bert_config()).eval()


def make_gpt2():
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel(gpt2_config()).eval()


def make_llama(tie: bool):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM(llama_config(tie)).eval()


def make_large_logit_decoder(seed: int = 0):
    """(Not in FACTORIES: the parametrized tests over every model need no model this wide.) A Gemma-3-like tied decoder whose logits reach about +-50: a LLaMA with tied embedding/head and
    norm weights scaled up (Gemma's norms are large), wide enough (hidden 256) that fp32 rounding and
    int8 activations move the logits by more than an absolute 1e-4 / a few % of their range."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(True, hidden_size=256, intermediate_size=512, vocab_size=256,
                                          num_hidden_layers=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.mul_(20.0)
        model.model.norm.weight.mul_(40.0)
    return model


def make_t5(untied_head: bool = False, seed: int = 0):
    """(Not in FACTORIES: seq2seq models go through the pipeline in tests/test_seq2seq.py.) A 3 + 3
    block T5; its encoder's and decoder's first blocks carry the relative-position bias."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=3,
                                                num_decoder_layers=3, num_heads=2, decoder_start_token_id=0,
                                                pad_token_id=0, eos_token_id=1)).eval()
    if untied_head:  # T5 v1.1 style: a head of its own
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach() + 0.1 * torch.randn(VOCAB, HIDDEN))
    return model


def make_bart(scale_embedding: bool = True, seed: int = 0):
    """A 2 + 2 block BART whose word embeddings multiply their rows by sqrt(d_model) and whose
    positions are a learned table read by the input's shape (both nn.Embedding subclasses)."""
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        scale_embedding=scale_embedding, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)).eval()


def make_lstm(**kw):
    return LSTMLM(**kw).eval()


# name -> (factory, is a transformers model)
FACTORIES = {
    "bert": (make_bert, True),
    "gpt2": (make_gpt2, True),
    "llama_tied": (lambda: make_llama(True), True),
    "llama_untied": (lambda: make_llama(False), True),
    "lstm": (make_lstm, False),
    "lstm_tied": (lambda: make_lstm(tie=True), False),
    "gru": (lambda: make_lstm(cell="gru"), False),
}

# skeleton factories for custom modules (load_packed(path, skeleton=...))
SKELETONS = {
    "lstm": lambda: LSTMLM(),
    "lstm_tied": lambda: LSTMLM(tie=True),
    "gru": lambda: LSTMLM(cell="gru"),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[name][0]()


def main_output(out) -> torch.Tensor:
    """The main tensor of a model output (logits / last hidden state / plain tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    return out[0]


def sample_ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def run(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return main_output(model(sample_ids() if ids is None else ids))
