"""Cross-layer sharing: plans, real ties through prepare/train/convert/pack/load, refusals,
LSTM layers, the redundancy analysis and auto."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.ingest import SourceInfo
from tritpress.compressor.layers import QTensor
from tritpress.compressor.share import (SharedLinear, SharingConfig, apply_sharing, fixed_plans, plan_fraction,
                              plan_groups)
from tritpress.compressor.structure import discover
from tritpress.compressor.transform import convert, prepare
from tritpress.exporters.packed import load_packed, read_metadata, save_packed
from tests.tiny_models import LSTMLM, bert_config, gpt2_config, llama_config, main_output, sample_ids


def groups(strategy, n, **kw):
    return plan_groups(n, SharingConfig(strategy, **kw)).groups


# ------------------------------------------------------------------ plans


def test_strategy_groups_6_blocks():
    assert groups("none", 6) == [[0], [1], [2], [3], [4], [5]]
    assert groups("alternate", 6) == [[0, 2, 4], [1, 3, 5]]
    assert groups("sequential", 6, every=3) == [[0, 3], [1, 4], [2, 5]]
    assert groups("cycle", 6, unique=3) == [[0, 3], [1, 4], [2, 5]]
    assert groups("sequence", 6, unique=3) == [[0, 1], [2, 3], [4, 5]]
    assert groups("middle-cycle", 6, unique=4) == [[0], [1, 3], [2, 4], [5]]
    assert groups("groups", 6, groups="0,2,4;1,3,5") == [[0, 2, 4], [1, 3, 5]]
    assert groups("groups", 6, groups="0,5") == [[0, 5], [1], [2], [3], [4]]  # unnamed blocks stay alone


def test_strategy_groups_12_blocks():
    assert groups("alternate", 12) == [list(range(0, 12, 2)), list(range(1, 12, 2))]
    assert groups("cycle", 12, unique=4) == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert groups("sequence", 12, unique=4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert groups("sequence", 12, unique=5) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9], [10, 11]]
    assert groups("middle-cycle", 12, unique=5) == [[0], [1, 4, 7, 10], [2, 5, 8], [3, 6, 9], [11]]
    assert groups("sequential", 12, every=5) == [[0, 5, 10], [1, 6, 11], [2, 7], [3, 8], [4, 9]]
    assert groups("cycle", 12) == groups("cycle", 12, unique=6)  # default: half the stack
    for s in ("alternate", "cycle", "sequence", "middle-cycle"):  # every block exactly once
        assert sorted(b for g in groups(s, 12) for b in g) == list(range(12))


def test_strategy_shorthand_and_json_groups(tmp_path):
    assert SharingConfig("cycle:3").unique == 3 and SharingConfig("cycle:3").strategy == "cycle"
    assert SharingConfig("sequential:4").every == 4
    cfg = SharingConfig("0,2;1,3")
    assert cfg.strategy == "groups" and cfg.groups == "0,2;1,3"
    f = tmp_path / "g.json"
    f.write_text(json.dumps([[0, 3], [1, 2]]))
    assert groups(str(f), 4) == [[0, 3], [1, 2]]


@pytest.mark.parametrize("spec, message", [
    ("0,2,9", "block 9 is out of range"),
    ("0,2;2,3", "block 2 is in more than one group"),
    ("0,a", "cannot read sharing groups"),
])
def test_invalid_groups_refused(spec, message):
    with pytest.raises(TritpressError, match=message):
        plan_groups(6, SharingConfig("groups", groups=spec))


def test_invalid_configs_refused():
    with pytest.raises(ValueError, match="not one of"):
        SharingConfig("diagonal")
    with pytest.raises(ValueError, match="share"):
        SharingConfig("alternate", share="mlp")
    with pytest.raises(ValueError, match="needs a number of unique blocks"):
        SharingConfig("auto")
    with pytest.raises(TritpressError, match="unique=7"):
        plan_groups(6, SharingConfig("cycle", unique=7))
    with pytest.raises(TritpressError, match="middle-cycle needs unique >= 3"):
        plan_groups(6, SharingConfig("middle-cycle", unique=2))
    with pytest.raises(TritpressError, match="no such sharing groups file"):
        plan_groups(6, SharingConfig("groups", groups="missing.json"))


def test_plan_for_wrong_block_count_refused():
    model = _llama(4)
    with pytest.raises(TritpressError, match="plan is for 6 blocks, the model has 4"):
        apply_sharing(model, plan_groups(6, SharingConfig("alternate")))


def test_blocks_of_different_shapes_refused():
    # an LSTM whose first layer reads 16 features and the others 32: layer 0 cannot share weight_ih
    rnn = LSTMLM(dim=32, layers=3)
    rnn.emb = nn.Embedding(100, 16)
    rnn.rnn = nn.LSTM(16, 32, 3, batch_first=True)
    with pytest.raises(TritpressError, match="blocks 0 and 2 cannot share weight_ih: shapes"):
        apply_sharing(rnn, plan_groups(3, SharingConfig("alternate")))
    apply_sharing(rnn, plan_groups(3, SharingConfig("groups", groups="1,2")))  # layers 1 and 2 can


# ------------------------------------------------------------------ real ties


def _llama(n, tie=False):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(tie, num_hidden_layers=n)).eval()


def _bert(n):
    from transformers import BertModel
    torch.manual_seed(0)
    return BertModel(bert_config(num_hidden_layers=n)).eval()


def _gpt2(n):
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config(n_layer=n)).eval()


def _weights(model, stack_path, block):
    blk = model.get_submodule(f"{stack_path}.{block}")
    return {n: m for n, m in blk.named_modules() if isinstance(m, SharedLinear)}


def _train_step(model, steps=2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        main_output(model(sample_ids())).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("make, path", [(_llama, "model.layers"), (_bert, "encoder.layer"), (_gpt2, "transformer.h")])
def test_ties_are_one_storage_through_train_convert_save_load(make, path, tmp_path):
    model = make(4)
    before = sum(p.numel() for p in model.parameters())
    cfg = SharingConfig("alternate", relax_rank=2)
    model, findings = apply_sharing(model, plan_groups(4, cfg), cfg)
    assert findings["unique_params_after"] == sum(p.numel() for p in model.parameters()) < before
    w0, w2, w1 = _weights(model, path, 0), _weights(model, path, 2), _weights(model, path, 1)
    for name in w0:
        assert w0[name].inner.weight is w2[name].inner.weight          # same Parameter object
        assert w0[name].inner.weight is not w1[name].inner.weight
        assert w0[name].gain is not w2[name].gain                        # per-occurrence scale
        assert w0[name].inner.bias is None or w0[name].inner.bias is not w2[name].inner.bias
    model = prepare(model)
    _train_step(model)
    w0, w2 = _weights(model, path, 0), _weights(model, path, 2)
    for name in w0:  # still one tensor after optimizer steps
        assert w0[name].inner.weight is w2[name].inner.weight
    model = convert(model)
    w0, w2 = _weights(model, path, 0), _weights(model, path, 2)
    for name in w0:
        assert isinstance(w0[name].inner.qweight, QTensor) and w0[name].inner.qweight is w2[name].inner.qweight
    ref = main_output(model(sample_ids()))
    f = tmp_path / "m.safetensors"
    meta = save_packed(model, f, SourceInfo("hf", "x", type(model).__name__, model.config.to_dict()))
    stored = set(meta["tensors"])
    for name in w0:  # stored once, listed as an alias of the other occurrence
        k0, k2 = f"{path}.0.{name}.inner.qweight.codes", f"{path}.2.{name}.inner.qweight.codes"
        assert (k0 in stored) != (k2 in stored)
        assert k2 in meta["tie_map"].get(k0, []) or k0 in meta["tie_map"].get(k2, [])
    loaded = load_packed(f)
    w0, w2 = _weights(loaded, path, 0), _weights(loaded, path, 2)
    for name in w0:
        assert w0[name].inner.qweight.codes is w2[name].inner.qweight.codes
        assert w0[name].gain is not w2[name].gain
    torch.testing.assert_close(main_output(loaded(sample_ids())), ref, rtol=0, atol=0)


def test_packed_file_shrinks_by_the_tied_share(tmp_path):
    from transformers import LlamaForCausalLM
    sizes = {}
    for strategy in ("none", "alternate"):
        torch.manual_seed(0)  # wide enough that tensor bytes, not per-tensor metadata, dominate
        model = LlamaForCausalLM(llama_config(False, num_hidden_layers=4, hidden_size=128,
                                              intermediate_size=256)).eval()
        cfg = SharingConfig(strategy)
        model, _ = apply_sharing(model, plan_groups(4, cfg), cfg)
        model = convert(model)
        f = tmp_path / f"{strategy}.safetensors"
        save_packed(model, f, SourceInfo("hf", "x", type(model).__name__, model.config.to_dict()))
        sizes[strategy] = f.stat().st_size
        codes = sum(e["shape"][0] * e["shape"][1] for k, e in read_metadata(f)["tensors"].items()
                    if e["component"] == "ternary layers")
        sizes[strategy + "_codes"] = codes
    assert sizes["alternate_codes"] * 2 == sizes["none_codes"]  # 4 blocks -> 2 stored sets
    saved_code_bytes = (sizes["none_codes"] - sizes["alternate_codes"]) / 5  # 5 trits per byte
    # the file shrinks by the tied codes, less the per-occurrence gains and their metadata
    assert 0.8 * saved_code_bytes < sizes["none"] - sizes["alternate"] <= saved_code_bytes


def test_relaxed_tie_starts_close_to_original():
    model = _llama(4)
    ref = main_output(model(sample_ids())).detach()
    errs = {}
    for rank in (0, 8, 32):  # 32 = full rank of the 32x32 attention matrices
        cfg = SharingConfig("alternate", relax_rank=rank)
        tied, _ = apply_sharing(copy.deepcopy(model), plan_groups(4, cfg), cfg)
        errs[rank] = float((main_output(tied(sample_ids())).detach() - ref).abs().max())
    assert errs[8] < errs[0]
    assert errs[32] < 1e-4 < errs[0]


def test_inits_differ_and_stepwise_copies_a_member():
    model = _llama(4)
    outs = {}
    for init in ("average", "stepwise", "closest"):
        cfg = SharingConfig("alternate", init=init)
        tied, findings = apply_sharing(copy.deepcopy(model), plan_groups(4, cfg), cfg)
        outs[init] = main_output(tied(sample_ids())).detach()
        copied = {g["copied_member"] for g in findings["groups"]}
        assert (copied == {None}) == (init == "average")
        if init == "stepwise":
            w = _weights(tied, "model.layers", 0)["self_attn.q_proj"].inner.weight
            member = next(g["copied_member"] for g in findings["groups"] if g["group"] == [0, 2])
            torch.testing.assert_close(w, model.model.layers[member].self_attn.q_proj.weight)
    assert not torch.equal(outs["average"], outs["stepwise"])


def test_share_attention_only_leaves_ffn_untied():
    model = _llama(4)
    cfg = SharingConfig("alternate", share="attention")
    tied, _ = apply_sharing(model, plan_groups(4, cfg), cfg)
    layers = tied.model.layers
    assert layers[0].self_attn.q_proj.inner.weight is layers[2].self_attn.q_proj.inner.weight
    assert isinstance(layers[0].mlp.up_proj, nn.Linear) and layers[0].mlp.up_proj.weight is not layers[2].mlp.up_proj.weight
    frac_attn = plan_fraction(_llama(4), plan_groups(4, cfg), cfg)
    frac_all = plan_fraction(_llama(4), plan_groups(4, SharingConfig("alternate")), SharingConfig("alternate"))
    assert frac_all < frac_attn < 1


def test_fraction_prediction_matches_real_tie():
    for cfg in (SharingConfig("cycle", unique=3), SharingConfig("alternate", relax_rank=4, share="ffn")):
        model = _bert(6)
        plan = plan_groups(6, cfg)
        predicted = plan_fraction(model, plan, cfg)
        _, findings = apply_sharing(model, plan, cfg)
        assert predicted == pytest.approx(findings["block_params_after"] / findings["block_params_before"])


# ------------------------------------------------------------------ LSTM


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lstm_layers_share(cell, tmp_path):
    torch.manual_seed(0)
    model = LSTMLM(layers=4, cell=cell).eval()
    before = sum(p.numel() for p in model.parameters())
    cfg = SharingConfig("alternate")
    model, findings = apply_sharing(model, plan_groups(4, cfg), cfg)
    rnn = model.rnn
    assert rnn.weight_ih_l0 is rnn.weight_ih_l2 and rnn.weight_hh_l1 is rnn.weight_hh_l3
    assert rnn.bias_ih_l0 is not rnn.bias_ih_l2  # biases stay per layer
    per_layer_mats = rnn.weight_ih_l0.numel() + rnn.weight_hh_l0.numel()
    assert findings["unique_params_after"] == before - 2 * per_layer_mats
    model = prepare(model)
    _train_step(model)
    assert model.rnn.rnn.weight_ih_l0 is model.rnn.rnn.weight_ih_l2
    model = convert(model)
    q = model.rnn.qweights
    assert q["weight_ih_l0"] is q["weight_ih_l2"]
    ref = main_output(model(sample_ids()))
    f = tmp_path / "lstm.safetensors"
    meta = save_packed(model, f, SourceInfo("module", "x", "tests.tiny_models.LSTMLM"))
    assert sum(1 for k in meta["tensors"] if k.startswith("rnn.") and k.endswith(".codes")) == 4  # 2 sets x ih, hh
    loaded = load_packed(f, skeleton=LSTMLM(layers=4, cell=cell))
    assert loaded.rnn.qweights["weight_ih_l0"].codes is loaded.rnn.qweights["weight_ih_l2"].codes
    torch.testing.assert_close(main_output(loaded(sample_ids())), ref, rtol=0, atol=0)


def test_lstm_refuses_attention_split_and_relaxation():
    with pytest.raises(TritpressError, match="no attention/FFN parts"):
        apply_sharing(LSTMLM(layers=4), plan_groups(4, SharingConfig("alternate", share="ffn")))
    with pytest.raises(TritpressError, match="relax-rank"):
        cfg = SharingConfig("alternate", relax_rank=2)
        apply_sharing(LSTMLM(layers=4), plan_groups(4, cfg), cfg)


# ------------------------------------------------------------------ analysis and auto


def test_analysis_metrics_and_outputs(tmp_path):
    from tritpress.analyzers.redundancy import write_outputs
    from tritpress.compressor.redundancy import Calibration, analyze, linear_cka

    x = torch.randn(200, 8)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 3 * x @ torch.linalg.qr(torch.randn(8, 8))[0]) == pytest.approx(1.0, abs=1e-4)
    assert linear_cka(x, torch.randn(200, 8)) < 0.3
    model = _llama(6)
    cal = Calibration.build(model, torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    result = analyze(model, cal, SharingConfig(auto_pairs=6))
    n = 6
    assert len(result["block_influence"]) == n and all(0 <= v <= 2 for v in result["block_influence"])
    assert result["cka"][2][2] == pytest.approx(1.0, abs=1e-4)
    measured = [(i, j) for i in range(n) for j in range(i + 1, n) if result["loss_increase"][i][j] is not None]
    assert len(measured) == 6
    i, j = measured[0]  # the stored number is the loss of a real tie of that pair
    from tritpress.compressor.redundancy import pair_plan, tied_loss
    cfg = SharingConfig()
    assert result["loss_increase"][i][j] == pytest.approx(tied_loss(model, pair_plan(n, i, j, "all"), cfg, cal)
                                                          - cal.base_loss, abs=1e-5)
    assert {s["strategy"] for s in result["strategies"]} == {"alternate", "cycle:3", "sequence:3", "middle-cycle:3"}
    files = write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "analysis.json").read_text())["loss_increase"] == result["loss_increase"]
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs and all(open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for f in pngs)


@pytest.mark.parametrize("make", [_llama, _bert], ids=["llama", "bert"])
def test_bf16_calibration_moves_the_analysis_little(make):
    """--share-calib-dtype bf16 runs every analysis forward under bf16 autocast: the base loss and
    each pair's increase stay near the fp32 ones (relative to the largest increase), the model
    comes back fp32 and unchanged."""
    from tritpress.compressor.redundancy import Calibration, analyze

    model = make(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    runs = {dt: analyze(model, Calibration.build(model, ids, dtype=dt), SharingConfig(auto_pairs=6), strategies=False)
            for dt in ("fp32", "bf16")}
    a, b = (r["loss_increase"] for r in runs.values())
    largest = max(abs(v) for row in a for v in row if v is not None)
    assert largest > 0
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= 0.1 * largest, (x, y, largest)
    base = [r["calibration"]["base_loss"] for r in runs.values()]
    assert base[1] == pytest.approx(base[0], rel=0.02, abs=1e-6)
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="calib_dtype"):
        SharingConfig(calib_dtype="fp8")


def test_auto_calibration_dtype_is_bf16_only_where_the_fp32_analysis_is_large(monkeypatch):
    """--share-calib-dtype auto (the default): fp32 for a small analysis, bf16 once the estimated fp32
    FLOPs pass AUTO_BF16_FLOPS on a CPU with native bf16, fp32 again without it or off the CPU;
    explicit values stay."""
    from tritpress.compressor import redundancy
    from tritpress.compressor.redundancy import analysis_flops, resolve_calib_dtype
    from tritpress.compressor.structure import discover

    model = _bert(4)
    structure = discover(model)
    ids = torch.zeros(4, 16, dtype=torch.long)
    cfg = SharingConfig()
    assert cfg.calib_dtype == "auto"
    params = sum(p.numel() for p in model.encoder.layer.parameters())
    pairs = sum((4 - i) / 4 for i in range(4) for _ in range(i + 1, 4))  # 6 pairs, each from its first block
    assert analysis_flops(model, structure, 64, cfg) == pytest.approx(2 * params * 64 * (2 + pairs + 4))
    assert analysis_flops(model, structure, 64, SharingConfig(auto_pairs=0, analyze=False)) == \
        pytest.approx(2 * params * 64 * 2)
    assert resolve_calib_dtype(model, structure, ids, cfg) == "fp32"
    monkeypatch.setattr(redundancy, "AUTO_BF16_FLOPS", 1.0)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert resolve_calib_dtype(model, structure, ids, cfg) == "bf16"
    assert resolve_calib_dtype(model, structure, ids, SharingConfig(calib_dtype="fp32")) == "fp32"
    assert resolve_calib_dtype(model.to("meta"), structure, ids, cfg) == "fp32"  # not on the CPU: fp32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert resolve_calib_dtype(model, structure, ids, cfg) == "fp32"
    assert resolve_calib_dtype(model, structure, ids, SharingConfig(calib_dtype="bf16")) == "bf16"


def test_bert_base_analysis_is_bf16_by_default_here_and_minilm_fp32():
    """The sizes behind the threshold: bert-base's analysis on 64 x 128 tokens (issue #14's case,
    ~74 TFLOP in fp32) is past it, all-MiniLM-L6-v2's on the default 16 x 128 (~0.7 TFLOP) is not."""
    from transformers import BertConfig, BertModel

    from tritpress.compressor.redundancy import AUTO_BF16_FLOPS, analysis_flops
    from tritpress.compressor.structure import discover

    def flops(cfg, tokens):
        with torch.device("meta"):
            model = BertModel(cfg)
        return analysis_flops(model, discover(model), tokens, SharingConfig())
    base = BertConfig()  # bert-base: 12 x 768, FFN 3072
    minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    assert flops(base, 64 * 128) > 3 * AUTO_BF16_FLOPS
    assert flops(minilm, 16 * 128) < AUTO_BF16_FLOPS / 10


@pytest.mark.parametrize("make", [_llama, _bert, _gpt2], ids=["llama", "bert", "gpt2"])
def test_replayed_ties_equal_tied_copies_and_leave_the_model(make):
    """The analysis measures a tie on copies of the tied blocks with the blocks before them
    replayed from the recorded outputs: the same loss as a full forward of a tied copy of the
    whole model, again and again, and the model itself untouched."""
    from tritpress.compressor.redundancy import Calibration, pair_plan, tied_loss
    from tritpress.compressor.share import SharingPlan

    model = make(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    cal = Calibration.build(model, torch.randint(0, 100, (5, 12), generator=torch.Generator().manual_seed(0)),
                            batch=2)
    assert cal.replay is not None and all(len(o) == 3 for o in cal.replay.outputs)
    cases = [(pair_plan(4, 2, 3, "all"), SharingConfig()), (pair_plan(4, 0, 3, "ffn"), SharingConfig(share="ffn")),
             (SharingPlan(4, [[0, 2], [1, 3]], "all", "x"), SharingConfig(init="stepwise")),
             (pair_plan(4, 1, 2, "all"), SharingConfig(relax_rank=2)), (pair_plan(4, 2, 3, "all"), SharingConfig())]
    for plan, cfg in cases:
        fast = tied_loss(model, plan, cfg, cal)
        slow = tied_loss(model, plan, cfg, cal, replay=False)
        assert fast == pytest.approx(slow, rel=1e-6, abs=1e-9) and fast != cal.base_loss
    assert [type(m) for m in model.modules()] == modules and "forward" not in vars(model.get_submodule(
        cal.replay.path)[0])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert cal.loss(model) == cal.base_loss


def test_cka_matrix_is_linear_cka_of_every_pair():
    from tritpress.compressor.redundancy import cka_matrix, linear_cka

    g = torch.Generator().manual_seed(3)
    reps = [torch.randn(300, 16, generator=g) for _ in range(3)]
    reps.append(reps[0] @ torch.randn(16, 16, generator=g) + 0.1 * reps[1])
    m = cka_matrix(reps)
    for i in range(4):
        for j in range(4):
            assert m[i][j] == m[j][i] == pytest.approx(round(linear_cka(reps[i], reps[j]), 5), abs=2e-5)


def test_calibration_sequences_are_spread_over_the_text(tmp_path):
    from tritpress.compressor.redundancy import calibration_ids
    from tritpress.compressor.data import lm_blocks, read_texts, tokenizer_fn

    f = tmp_path / "cal.txt"
    f.write_text("\n".join(" ".join(f"w{(d * 7 + i) % 90}" for i in range(50)) for d in range(40)))  # 2000 words
    model = _llama(2)
    ids = calibration_ids(str(f), None, model, 4, 16)
    texts = read_texts(str(f), "validation")
    every = lm_blocks(texts, tokenizer_fn(None, texts, 100), 16)
    assert ids.shape == (4, 16)
    assert torch.equal(ids[0], every[0]) and torch.equal(ids[-1], every[-1])  # first and last block
    assert torch.equal(ids[1], every[round((len(every) - 1) / 3)])
    assert torch.equal(calibration_ids(str(f), None, model, 500, 16), every)  # short text: all of it


def test_calibration_blocks_fit_the_model_positions(tmp_path):
    """--share-seq-len beyond the model's positions is capped (it failed inside the embedding)."""
    from tritpress.compressor.redundancy import calibration_ids, calibration_seq_len

    f = tmp_path / "cal.txt"
    f.write_text(" ".join(f"w{i % 90}" for i in range(3000)))
    bert, gpt2 = _bert(2), _gpt2(2)
    limits = bert.config.max_position_embeddings, gpt2.config.n_positions
    assert calibration_seq_len(bert, 10_000) == limits[0] and calibration_seq_len(gpt2, 10_000) == limits[1]
    assert calibration_seq_len(bert, 8) == 8 and calibration_seq_len(nn.LSTM(4, 4), 300) == 300
    ids = calibration_ids(str(f), None, bert, 2, limits[0] * 2)
    assert ids.shape == (2, limits[0])


def test_auto_is_no_worse_than_fixed_patterns_at_its_budget():
    from tritpress.compressor.redundancy import Calibration, measure_plan
    from tritpress.compressor.redundancy_auto import auto_plan

    model = _bert(6)
    cal = Calibration.build(model, torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    cfg = SharingConfig("auto", target_params=0.55)
    plan, findings = auto_plan(model, cal, cfg)
    assert plan.num_unique == 3 and plan_fraction(model, plan, cfg) <= 0.55
    chosen = measure_plan(model, plan, "auto", cfg, cal, discover(model))["loss_after_tying"]
    for name, fixed in fixed_plans(6, 3, "all").items():
        assert chosen <= measure_plan(model, fixed, name, cfg, cal, discover(model))["loss_after_tying"] + 1e-9
    with pytest.raises(TritpressError, match="cannot be met"):
        auto_plan(model, cal, SharingConfig("auto", target_params=0.05))


def test_auto_k_ties_exactly_k_unique_blocks_no_worse_than_fixed_patterns():
    """auto:K: the budget is a number of unique blocks (what a size target asks for) instead of a
    parameter fraction; the winner is the best measured tie among the K-group candidates."""
    from tritpress.compressor.redundancy import Calibration, measure_plan
    from tritpress.compressor.redundancy_auto import auto_plan

    model = _bert(6)
    cal = Calibration.build(model, torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    cfg = SharingConfig("auto:2")
    assert (cfg.strategy, cfg.unique) == ("auto", 2)
    plan, findings = auto_plan(model, cal, cfg)
    assert plan.num_unique == 2 and findings["mode"] == "unique_blocks" and findings["unique_blocks"] == 2
    chosen = measure_plan(model, plan, "auto", cfg, cal, discover(model))["loss_after_tying"]
    for name, fixed in fixed_plans(6, 2, "all").items():
        assert chosen <= measure_plan(model, fixed, name, cfg, cal, discover(model))["loss_after_tying"] + 1e-9
    with pytest.raises(TritpressError, match="only 6 blocks"):
        auto_plan(model, cal, SharingConfig("auto:7"))


def test_auto_with_probe_ranks_by_the_loss_after_fine_tuning():
    """The probe decides, not the loss right after tying: a probe that 'fine-tunes' one chosen
    plan back to the original (and ruins the others) makes auto pick that plan, even when it is
    the worst right after tying; every fixed pattern at the budget is probed."""
    import copy

    from tritpress.compressor.redundancy import Calibration, measure_plan
    from tritpress.compressor.redundancy_auto import auto_plan

    model = _llama(6)
    structure = discover(model)
    cal = Calibration.build(model, torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    cfg = SharingConfig("auto", target_params=0.55, auto_probe_steps=1)
    after_tying = {name: measure_plan(model, p, name, cfg, cal, structure)["loss_after_tying"]
                   for name, p in fixed_plans(6, 3, "all").items()}
    worst = max(after_tying, key=after_tying.get)
    target = fixed_plans(6, 3, "all")[worst].groups
    seen = []

    def probe(tied):
        # which blocks share storage in this candidate
        q = [tied.model.layers[b].self_attn.q_proj for b in range(6)]
        weights = [getattr(m, "inner", m).weight for m in q]
        groups = sorted(sorted(j for j in range(6) if weights[j] is weights[i]) for i in range(6))
        groups = [g for k, g in enumerate(groups) if g not in groups[:k]]
        seen.append(groups)
        if groups == target:
            return copy.deepcopy(model)
        with torch.no_grad():  # "training" ruined every other candidate
            for p in tied.parameters():
                p.mul_(20)
        return tied

    plan, findings = auto_plan(model, cal, cfg, structure, probe=probe)
    assert plan.groups == target and findings["chosen"] == worst
    assert "after 1 fine-tuning steps" in findings["ranked_by"]
    assert all(p.groups in seen for p in fixed_plans(6, 3, "all").values())
    probed = {r["strategy"]: r["loss_after_probe"] for r in findings["probed"]}
    assert probed[worst] == pytest.approx(cal.base_loss, abs=1e-6) == min(probed.values())
    # without a probe the same call ranks right after tying
    plan0, findings0 = auto_plan(model, cal, cfg, structure)
    assert findings0["ranked_by"] == "calibration loss right after tying" and "probed" not in findings0
    capped = auto_plan(model, cal, SharingConfig("auto", target_params=0.55, auto_probe_steps=1, auto_probe_top=2),
                       structure, probe=lambda t: t)[1]
    assert len(capped["probed"]) == 2


def test_auto_max_loss_increase_respects_threshold():
    from tritpress.compressor.redundancy import Calibration, tied_loss
    from tritpress.compressor.redundancy_auto import auto_plan

    model = _llama(4)
    cal = Calibration.build(model, torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    cfg = SharingConfig("auto", max_loss_increase=0.002)
    plan, findings = auto_plan(model, cal, cfg)
    assert tied_loss(model, plan, cfg, cal) - cal.base_loss <= 0.002 + 1e-9
    assert findings["steps"][-1]["loss_increase"] > 0.002 or plan.num_unique == 1


def test_refinement_keeps_the_budget_and_never_worsens():
    from tritpress.compressor.redundancy import Calibration, analyze, measure_plan
    from tritpress.compressor.redundancy_auto import _pair_costs, refine_by_swaps

    model = _llama(6)
    cal = Calibration.build(model, torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0)))
    cfg = SharingConfig(auto_refine=6)
    structure = discover(model)
    start = plan_groups(6, SharingConfig("sequence", unique=3))
    measured = measure_plan(model, start, "sequence:3", cfg, cal, structure)
    rows, best = refine_by_swaps(model, start, measured, _pair_costs(analyze(model, cal, cfg, strategies=False)),
                                 cfg, cal, structure)
    assert 1 <= len(rows) <= 6
    assert best["loss_after_tying"] <= measured["loss_after_tying"]
    assert sorted(map(len, best["groups"])) == [2, 2, 2]  # swaps keep the group sizes, hence the budget


def test_onnx_export_stores_a_shared_weight_once():
    onnx = pytest.importorskip("onnx")
    import io

    sizes = {}
    for strategy in ("none", "alternate"):
        cfg = SharingConfig(strategy)
        model, _ = apply_sharing(_bert(4), plan_groups(4, cfg), cfg)
        model = convert(model)

        class Hidden(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids).last_hidden_state

        f = io.BytesIO()
        torch.onnx.export(Hidden(model), (sample_ids(),), f, dynamo=False)
        graph = onnx.load_from_string(f.getvalue()).graph
        sizes[strategy] = sum(len(i.raw_data) for i in graph.initializer)
    block_matrix_floats = 4 * 32 * 32 + 2 * 32 * 64  # per block: q, k, v, o, intermediate, output
    # 2 of the 4 blocks' matrices are not stored again (whether exported as codes or folded to floats)
    assert sizes["none"] - sizes["alternate"] >= 0.8 * 2 * block_matrix_floats
