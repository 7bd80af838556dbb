"""Structure discovery (block stack, head, ties, roles) and prepare()/fake-quant behaviour."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tritpress.compressor import TernaryConfig, convert, discover, find_block_stack, get_record, prepare, set_lambda
from tritpress.compressor.layers import (FakeQuantEmbedding, FakeQuantLinear, FakeQuantRNN, QEmbedding, QLinear, QRNN,
                               WeightFormat)
from tests.tiny_models import FACTORIES, LSTMLM, build, main_output, run, sample_ids

EXPECTED_STACK = {
    # name: (path, kind, count, block type)
    "bert": ("encoder.layer", "modulelist", 3, "BertLayer"),
    "gpt2": ("transformer.h", "modulelist", 2, "GPT2Block"),
    "llama_tied": ("model.layers", "modulelist", 2, "LlamaDecoderLayer"),
    "llama_untied": ("model.layers", "modulelist", 2, "LlamaDecoderLayer"),
    "lstm": ("rnn", "rnn-layers", 2, "LSTM"),
    "lstm_tied": ("rnn", "rnn-layers", 2, "LSTM"),
    "gru": ("rnn", "rnn-layers", 2, "GRU"),
}
EXPECTED_HEAD = {
    "bert": (None, None),
    "gpt2": ("lm_head", "transformer.wte"),
    "llama_tied": ("lm_head", "model.embed_tokens"),
    "llama_untied": ("lm_head", None),
    "lstm": ("out", None),
    "lstm_tied": ("out", "emb"),
    "gru": ("out", None),
}


# ------------------------------------------------------------------ discovery

@pytest.mark.parametrize("name", list(FACTORIES))
def test_block_stack(name):
    model = build(name)
    stack = find_block_stack(model)
    path, kind, count, block_type = EXPECTED_STACK[name]
    assert (stack.path, stack.kind, stack.num_blocks, stack.block_type) == (path, kind, count, block_type)
    container = model.get_submodule(path)
    if kind == "modulelist":
        assert stack.params_per_block == sum(p.numel() for p in container[0].parameters())
    else:
        assert stack.params_per_block == sum(p.numel() for p in container.parameters()) // count
    assert discover(model).blocks == stack


@pytest.mark.parametrize("name", list(FACTORIES))
def test_head_and_tie(name):
    s = discover(build(name))
    assert (s.head, s.head_tied_to) == EXPECTED_HEAD[name]
    heads = s.by_role("head")
    assert [layer.name for layer in heads] == ([s.head] if s.head else [])


def test_bert_roles():
    s = discover(build("bert"))
    roles = {layer.name: (layer.kind, layer.role) for layer in s.layers}
    assert roles["pooler.dense"] == ("linear", "outside")
    assert {n for n, (_, r) in roles.items() if r == "embedding"} == {
        "embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"}
    block = [n for n, (k, r) in roles.items() if r == "block"]
    assert len(block) == 3 * 6 and all(n.startswith("encoder.layer.") for n in block)
    assert all(roles[n][0] == "linear" for n in block)
    q = next(layer for layer in s.layers if layer.name == "encoder.layer.0.intermediate.dense")
    assert q.shape == [64, 32] and q.params == 64 * 32


def test_a_vocabulary_sized_linear_inside_the_blocks_is_not_the_head():
    """A task model without an LM head whose FFN width equals its vocabulary size: no block Linear
    becomes the "head" (it got the head's int8 format, and a cycle-shared copy of it two formats)."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    s = discover(BertForSequenceClassification(cfg))
    assert s.head is None
    assert {layer.role for layer in s.layers if ".intermediate." in layer.name} == {"block"}


def test_gpt2_conv1d_layers_are_block_with_out_in_shape():
    model = build("gpt2")
    s = discover(model)
    conv = [layer for layer in s.layers if layer.kind == "conv1d"]
    assert len(conv) == 2 * 4
    assert all(layer.role == "block" and layer.name.startswith("transformer.h.") for layer in conv)
    shapes = {layer.name: layer.shape for layer in conv}
    # Conv1D stores weight [in, out]; discovery reports [out, in] like nn.Linear
    assert shapes["transformer.h.0.attn.c_attn"] == [96, 32]
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    assert shapes["transformer.h.0.mlp.c_fc"] == [128, 32]
    assert shapes["transformer.h.0.mlp.c_proj"] == [32, 128]
    lm = next(layer for layer in s.layers if layer.name == "lm_head")
    assert (lm.kind, lm.role, lm.shape) == ("linear", "head", [100, 32])


def test_llama_roles():
    s = discover(build("llama_untied"))
    block = s.by_role("block")
    assert len(block) == 2 * 7 and all(layer.kind == "linear" for layer in block)
    assert [layer.name for layer in s.by_role("embedding")] == ["model.embed_tokens"]
    assert s.by_role("outside") == []


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_rnn_roles(name):
    s = discover(build(name))
    roles = {layer.name: (layer.kind, layer.role, layer.shape) for layer in s.layers}
    assert roles == {"emb": ("embedding", "embedding", [100, 32]), "rnn": ("rnn", "block", [2, 32]),
                     "out": ("linear", "head", [100, 32])}


def test_head_sharing_the_embedding_weight_wins_over_a_later_vocab_sized_linear():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.rnn = nn.GRU(32, 32, 2)
            self.decoder = nn.Linear(32, 100, bias=False)
            self.decoder.weight = self.emb.weight
            self.aux = nn.Linear(32, 100)          # also vocab-sized, declared last, not tied

    s = discover(TwoHeads())
    assert (s.head, s.head_tied_to) == ("decoder", "emb")
    assert {layer.name: layer.role for layer in s.layers}["aux"] == "outside"


def test_untied_vocab_sized_linear_is_the_head_of_a_custom_model():
    class Untied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.proj = nn.Linear(32, 32)
            self.lm = nn.Linear(32, 100)

    s = discover(Untied())
    assert (s.head, s.head_tied_to) == ("lm", None)


def test_single_layer_lstm_has_no_stack_but_is_still_quantized():
    torch.manual_seed(0)
    model = LSTMLM(layers=1).eval()
    assert find_block_stack(model) is None
    s = discover(model)
    assert s.blocks is None and [layer.role for layer in s.layers if layer.name == "rnn"] == ["block"]
    q = convert(copy.deepcopy(model), TernaryConfig())
    assert isinstance(q.rnn, QRNN)
    assert set(q.rnn.qweights) == {"weight_ih_l0", "weight_hh_l0"}


def test_largest_repeated_stack_is_the_primary_one_every_stack_is_listed_and_mixed_lists_are_not_stacks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(4, 4) for _ in range(5)])          # 5 * 20 = 100 params
            self.big = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])          # 2 * 1056 params
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 64)])

    stack = find_block_stack(Net())
    assert (stack.path, stack.num_blocks, stack.block_type, stack.params_per_block) == ("big", 2, "Linear", 1056)
    s = discover(Net())
    roles = {layer.name: layer.role for layer in s.layers}
    assert [(b.path, b.num_blocks) for b in s.stacks] == [("small", 5), ("big", 2)] and s.blocks.path == "big"
    assert roles["big.0"] == roles["big.1"] == roles["small.0"] == "block"
    assert roles["mixed.0"] == "outside"


def test_exclude_regex_leaves_layers_untouched():
    model = build("llama_untied")
    s = discover(model, exclude=[r"layers\.0\.", r"down_proj"])
    names = {layer.name for layer in s.layers}
    assert not any(".layers.0." in n or n.endswith("down_proj") for n in names)
    assert "model.layers.1.self_attn.q_proj" in names
    q = convert(model, TernaryConfig(exclude=[r"layers\.0\."]))
    assert isinstance(q.model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(q.model.layers[1].self_attn.q_proj, QLinear)


# ------------------------------------------------------------------ prepare / fake quant

@pytest.mark.parametrize("name", list(FACTORIES))
def test_lambda_zero_is_the_float_model_and_lambda_one_is_quantized(name):
    model = build(name)
    ids = sample_ids()
    ref = run(model, ids)
    p = prepare(copy.deepcopy(model), TernaryConfig(embedding="int4"))
    assert any(isinstance(m, (FakeQuantLinear, FakeQuantRNN)) for m in p.modules())
    set_lambda(p, 0.0)
    assert torch.allclose(run(p, ids), ref, atol=1e-6, rtol=0)
    set_lambda(p, 1.0)
    full = run(p, ids)
    assert (full - ref).abs().max() > 1e-3
    set_lambda(p, 0.5)
    half = run(p, ids)
    assert (half - ref).abs().max() > 1e-4 and (half - full).abs().max() > 1e-4


def test_lambda_zero_is_float_also_with_int8_activations():
    model = build("llama_untied")
    ids = sample_ids()
    p = prepare(copy.deepcopy(model), TernaryConfig(act_bits=8))
    set_lambda(p, 0.0)
    assert torch.allclose(run(p, ids), run(model, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama_untied", "bert", "lstm"])
def test_gradients_reach_the_original_weights(name):
    model = build(name)
    before = {n: p for n, p in model.named_parameters()}
    p = prepare(model, TernaryConfig())
    set_lambda(p, 1.0)
    out = main_output(p(sample_ids()))
    (out.float() ** 2).mean().backward()
    after = dict(p.named_parameters())
    assert {id(t) for t in after.values()} == {id(t) for t in before.values()}, "prepare replaced parameters"
    quantized = {id(m.weight) for m in p.modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))}
    quantized |= {id(w) for m in p.modules() if isinstance(m, FakeQuantRNN)
                  for n, w in m.rnn.named_parameters() if n.startswith("weight_")}
    assert quantized
    for n, t in before.items():
        if id(t) in quantized:
            assert t.grad is not None and t.grad.abs().sum() > 0, n


def test_gpt2_conv1d_is_wrapped_with_its_transposed_weight_and_trains():
    model = build("gpt2")
    orig = model.transformer.h[0].mlp.c_fc.weight.detach().clone()   # [in, out]
    p = prepare(model, TernaryConfig())
    fq = p.transformer.h[0].mlp.c_fc
    assert isinstance(fq, FakeQuantLinear) and fq.weight.shape == (128, 32)
    assert torch.equal(fq.weight.detach(), orig.t())
    main_output(p(sample_ids())).pow(2).mean().backward()
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0


def test_fake_quant_linear_gradient_is_straight_through():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 4))
    fmt = WeightFormat("ternary", "absmean", "channel", "fp32")
    layer = FakeQuantLinear(w, None, fmt)
    x = torch.randn(3, 4)
    c = torch.randn(3, 5)
    (layer(x) * c).sum().backward()
    # the same loss on the dequantized weight as a leaf: dL/dWq = c^T x
    codes, scale = fmt.quantize(w)
    wq = (codes.float() * scale[:, None]).requires_grad_()
    (nn.functional.linear(x, wq) * c).sum().backward()
    assert torch.allclose(w.grad, wq.grad, atol=1e-6)
    assert torch.allclose(w.grad, c.t() @ x, atol=1e-5)


@pytest.mark.parametrize("name,cfg", [("gpt2", TernaryConfig()), ("gpt2", TernaryConfig(embedding="fp16")),
                                      ("gpt2", TernaryConfig(embedding="ternary", act_bits=8)),
                                      ("llama_tied", TernaryConfig(embedding="int4")),
                                      ("lstm_tied", TernaryConfig())])
def test_tied_weights_stay_one_parameter_after_prepare(name, cfg):
    model = build(name)
    s = discover(model)
    head, emb = model.get_submodule(s.head), model.get_submodule(s.head_tied_to)
    assert head.weight is emb.weight
    p = prepare(model, cfg)
    head, emb = p.get_submodule(s.head), p.get_submodule(s.head_tied_to)
    assert head.weight is emb.weight
    assert get_record(p).formats[s.head] == get_record(p).formats[s.head_tied_to]
    n_unique = len({id(t) for t in p.parameters()})
    assert n_unique == len(list(p.parameters()))
    q = convert(p)
    head, emb = q.get_submodule(s.head), q.get_submodule(s.head_tied_to)
    if hasattr(head, "qweight"):
        assert head.qweight is emb.qweight
    else:
        assert head.weight is emb.weight


def test_prepare_twice_is_refused():
    p = prepare(build("bert"), TernaryConfig())
    with pytest.raises(ValueError, match="already prepared"):
        prepare(p, TernaryConfig())


@pytest.mark.parametrize("name,group", [("gpt2", 0), ("llama_untied", 0), ("gru", 0), ("llama_untied", 16),
                                        ("gru", 16)])
def test_convert_after_prepare_matches_the_fake_quant_forward(name, group):
    cfg = TernaryConfig(float_dtype="fp32", scale_dtype="fp32", granularity="channel", embedding="int4",
                        head="int4", group_size=group)
    p = prepare(build(name), cfg)
    ids = sample_ids()
    fake = run(p, ids)
    q = convert(p)
    assert get_record(q).converted
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantRNN)) for m in q.modules())
    assert torch.allclose(run(q, ids), fake, atol=1e-4, rtol=1e-4)


def test_gru_model_works_end_to_end(tmp_path):
    from tritpress.compressor.ingest import SourceInfo
    from tritpress.exporters.packed import load_packed, save_packed
    model = build("gru")
    q = convert(copy.deepcopy(model), TernaryConfig(method="twn", granularity="channel"))
    assert isinstance(q.rnn, QRNN) and q.rnn.qweights["weight_hh_l1"].codes.shape == (96, 32)
    out = run(q)
    assert out.shape == (2, 7, 100) and torch.isfinite(out).all()
    save_packed(q, tmp_path / "gru.safetensors", SourceInfo("module", "x", "tests.LSTMLM"))
    r = load_packed(tmp_path / "gru.safetensors", skeleton=LSTMLM(cell="gru"))
    assert torch.equal(run(r), out)


@pytest.mark.parametrize("name", ["bert", "gpt2", "lstm"])
def test_converted_layers_compute_with_their_dequantized_weights(name):
    q = convert(build(name), TernaryConfig(embedding="int4", granularity="channel"))
    torch.manual_seed(3)
    checked = 0
    with torch.no_grad():
        for n, m in q.named_modules():
            if isinstance(m, QLinear):
                x = torch.randn(4, m.in_features)
                w = m.qweight.codes.float() * m.qweight.scale.reshape(-1, 1)
                assert torch.allclose(m(x), nn.functional.linear(x, w, m.bias), atol=1e-6), n
                checked += 1
            elif isinstance(m, QEmbedding):
                ids = torch.tensor([[0, 5, 99], [7, 7, 1]]) % m.num_embeddings
                table = m.qweight.codes.float() * m.qweight.scale.reshape(-1, 1)
                assert torch.equal(m(ids), table[ids]), n
                checked += 1
            elif isinstance(m, QRNN):
                ref = copy.deepcopy(m._template).to_empty(device="cpu")
                for pn, _ in ref.named_parameters():
                    src = m.qweights[pn].dequantize() if pn in m.qweights else getattr(m, pn)
                    getattr(ref, pn).data.copy_(src)
                x = torch.randn(2, 5, 32)
                assert torch.allclose(m(x)[0], ref(x)[0], atol=1e-6), n
                checked += 1
    assert checked >= 3
