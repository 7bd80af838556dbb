"""compressor.modelio, the one place that calls a model: ids or keyword inputs, layouts, hooks,
held-out loss; and the helpers it shares with the layers and the exporter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritpress.compressor import TernaryConfig, convert, prepare
from tritpress.compressor.layers import QLinear, QTensor, WeightFormat, layer_input
from tritpress.compressor.modelio import (BlockOutputs, ModelIO, batched_forward, features, held_out_loss,
                                          held_out_quality, keyword_inputs, logits, next_token_nll, nmse,
                                          nmse_per_sequence)
from tritpress.compressor.quantize import quantize_activations_int8
from tritpress.compressor.structure import discover, set_submodule
from tests.tiny_models import build, main_output, sample_ids


class SeqFirstLSTM(nn.Module):
    """A custom RNN LM built with batch_first=False: it takes ids [seq, batch]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.rnn = nn.LSTM(16, 16, 2)
        self.out = nn.Linear(16, 100)

    def forward(self, ids):
        return self.out(self.rnn(self.emb(ids))[0])


def io_of(model):
    return ModelIO.discover(model, discover(model))


# ---------------------------------------------------------------- forward: ids or keyword inputs

@pytest.mark.parametrize("name", ["gpt2", "bert", "llama_untied", "lstm"])
@torch.no_grad()
def test_forward_on_ids_is_the_model_main_output(name):
    model = build(name)
    ids = sample_ids()
    expected = main_output(model(input_ids=ids) if hasattr(model, "config") else model(ids)).float()
    assert torch.equal(io_of(model).forward(model, ids), expected)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama_untied", "lstm"])
@torch.no_grad()
def test_forward_on_a_dict_of_input_ids_equals_forward_on_ids(name):
    model = build(name)
    io, ids = io_of(model), sample_ids()
    assert torch.equal(io.forward(model, {"input_ids": ids}), io.forward(model, ids))


@pytest.mark.parametrize("name", ["gpt2", "llama_untied"])
@torch.no_grad()
def test_forward_on_a_padded_batch_uses_the_attention_mask(name):
    model = build(name)
    io = io_of(model)
    short, long = sample_ids(seed=2, batch=1, length=4), sample_ids(seed=3, batch=1, length=7)
    ids = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), long])
    mask = torch.tensor([[1] * 4 + [0] * 3, [1] * 7])
    out = io.forward(model, {"input_ids": ids, "attention_mask": mask})
    assert out.shape == (2, 7, 100)
    assert torch.allclose(out[0, :4], io.forward(model, short)[0], atol=1e-5)
    assert torch.allclose(out[1], io.forward(model, long)[0], atol=1e-5)


@torch.no_grad()
def test_forward_takes_a_tokenizer_batch_with_token_type_ids():
    bert, llama = build("bert"), build("llama_untied")
    ids = sample_ids()
    types = torch.ones_like(ids)
    bert_io, llama_io = io_of(bert), io_of(llama)
    with_types = bert_io.forward(bert, {"input_ids": ids, "token_type_ids": types})
    assert torch.equal(with_types, main_output(bert(input_ids=ids, token_type_ids=types)).float())
    assert not torch.equal(with_types, bert_io.forward(bert, ids))
    # LlamaForCausalLM's forward has no token_type_ids of its own (they fall into its **kwargs, unused)
    got = llama_io.forward(llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types})
    assert torch.equal(got, llama_io.forward(llama, ids))


@torch.no_grad()
def test_custom_module_gets_input_ids_alone_from_a_dict():
    model = build("lstm")
    io, ids = io_of(model), sample_ids()
    got = io.forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert torch.equal(got, model(ids).float())


@torch.no_grad()
def test_seq_first_rnn_is_called_seq_first_and_answers_batch_first():
    torch.manual_seed(0)
    model = SeqFirstLSTM().eval()
    io, ids = io_of(model), sample_ids(batch=3, length=5)
    assert io.seq_first and io.causal and not io.hf
    expected = model(ids.t()).transpose(0, 1)
    assert torch.equal(io.forward(model, ids), expected)
    assert torch.equal(io.forward(model, {"input_ids": ids}), expected)
    # a converted copy (QRNN instead of nn.LSTM) is still called seq-first
    converted = convert(prepare(SeqFirstLSTM().eval(), TernaryConfig()))
    assert io_of(converted).seq_first


def test_discover_finds_use_cache_and_blocks():
    gpt2, bert = build("gpt2"), build("bert")
    io = io_of(gpt2)
    assert io.hf and io.causal and io.has_head and io.no_cache
    assert io.block_paths == ["transformer.h.0", "transformer.h.1"]
    assert ModelIO.discover(gpt2) == io  # the structure is discovered when not given
    assert not io_of(bert).causal


@torch.no_grad()
def test_logits_is_forward_through_a_cached_model_io():
    model = build("gpt2")
    ids = sample_ids()
    assert torch.equal(logits(model, ids, torch.ones_like(ids)), io_of(model).forward(model, ids))
    assert ModelIO.of(model) is ModelIO.of(model)


def test_keyword_inputs_keeps_what_the_forward_takes():
    ids = sample_ids()
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
           "offset_mapping": torch.zeros(2, 7, 2)}
    assert set(keyword_inputs(build("bert"), enc)) == {"input_ids", "attention_mask", "token_type_ids"}
    # a forward taking **kwargs gets every token input, never the tokenizer's other outputs
    assert set(keyword_inputs(build("llama_untied"), enc)) == {"input_ids", "attention_mask", "token_type_ids"}


@torch.no_grad()
def test_forward_leaves_out_keywords_a_transformers_forward_does_not_take():
    class NoTypes(nn.Module):  # a transformers-style model whose forward names only input_ids
        def __init__(self):
            super().__init__()
            self.config = build("gpt2").config
            self.emb = nn.Embedding(100, 8)

        def forward(self, input_ids):
            return self.emb(input_ids)

    model = NoTypes()
    io, ids = ModelIO.discover(model), sample_ids()
    assert io.hf and not io.takes("token_type_ids") and not io.no_cache
    assert torch.equal(io.forward(model, {"input_ids": ids, "token_type_ids": ids}), model.emb(ids))


# ---------------------------------------------------------------- hooks and held-out loss

@torch.no_grad()
def test_block_outputs_records_inputs_and_outputs_in_block_order():
    model = build("gpt2")
    io = io_of(model)
    hooks = BlockOutputs(model, io.block_paths, inputs=True)
    try:
        io.forward(model, sample_ids())
        ins, outs = hooks.take_inputs(), hooks.take()
    finally:
        hooks.remove()
    assert len(ins) == len(outs) == 2
    assert torch.equal(ins[1], outs[0])  # block 1 reads what block 0 passed on
    assert hooks.take() == [] and hooks.take_inputs() == []


@torch.no_grad()
def test_held_out_loss_is_next_token_nll_per_token_for_a_causal_lm():
    model = build("gpt2")
    io, ids = io_of(model), sample_ids(batch=5)
    out = io.forward(model, ids)
    expected = F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert held_out_loss(io, model, ids, batch=2) == pytest.approx(float(expected), rel=1e-5)
    assert held_out_quality(io, model, ids, batch=2)["nll"] == pytest.approx(float(expected), rel=1e-5)
    assert next_token_nll(out, ids)[1] == 5 * 6


@torch.no_grad()
def test_held_out_loss_of_an_encoder_is_nmse_per_sequence_against_the_reference():
    model = build("bert")
    io, ids = io_of(model), sample_ids(batch=5)
    reference = [out * 1.1 for _, out in batched_forward(io, model, ids, 2)]
    expected = torch.cat([nmse_per_sequence(out, ref) for (_, out), ref in
                          zip(batched_forward(io, model, ids, 2), reference)]).mean()
    assert held_out_loss(io, model, ids, reference, batch=2) == pytest.approx(float(expected), rel=1e-6)
    assert held_out_loss(io, model, ids, [out for _, out in batched_forward(io, model, ids, 2)], batch=2) == 0.0
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(nmse(a, b), nmse_per_sequence(a, b).mean())


# ---------------------------------------------------------------- shared helpers

def test_set_submodule_replaces_by_dotted_path_and_at_the_top():
    model = build("gpt2")
    new = nn.Identity()
    set_submodule(model, "transformer.h.1.mlp", new)
    assert model.get_submodule("transformer.h.1.mlp") is new
    set_submodule(model, "lm_head", new)
    assert model.lm_head is new


@pytest.mark.parametrize("act_bits", [None, 8])
def test_qlinear_multiplies_the_layer_input_by_the_dequantized_weight(act_bits):
    torch.manual_seed(0)
    w, x = torch.randn(6, 4), torch.randn(2, 3, 4)
    q = QTensor.from_float(w, WeightFormat("ternary"))
    expected_x = quantize_activations_int8(x) if act_bits == 8 else x
    assert torch.equal(layer_input(x, act_bits), expected_x)
    assert torch.equal(QLinear(q, None, act_bits)(x), F.linear(expected_x, q.dequantize()))


@torch.no_grad()
def test_features_are_the_last_hidden_state():
    model = build("bert")
    ids = sample_ids()
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = model(**enc, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(features(model, enc), expected.float())


def test_onnx_export_of_a_seq_first_rnn_takes_seq_first_ids(tmp_path):
    from tritpress.exporters.onnx import OnnxConfig, export_onnx

    torch.manual_seed(0)
    result = export_onnx(convert(prepare(SeqFirstLSTM().eval(), TernaryConfig())), tmp_path / "m.onnx",
                         OnnxConfig(format="float"))
    assert result["validation"]["passed"]
    assert result["validation"]["input_shapes"]["input_ids"] == [11, 3]  # [sequence, batch]
