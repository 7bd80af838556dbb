"""Encoder-decoder models (tiny random T5 and BART) and the ties across stacks: every stack found,
the checks run with decoder inputs, scaled and positional embeddings kept exact, the output head
tied to the input embedding, decoder blocks tied to encoder blocks; through train, convert, pack
and reload."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from torch import nn

from tests.cli_helpers import run_cli
from tritpress.analyzers.report import render
from tritpress.analyzers.size import size_report
from tests.tiny_models import HIDDEN, VOCAB, make_bart, make_llama, make_t5
from tritpress.compressor.cross_ties import decoder_pairs, matrix_keys, tie_decoder, tie_embeddings
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.ingest import SourceInfo
from tritpress.compressor.layers import QEmbedding
from tritpress.compressor.modelio import ModelIO, example_inputs, run_model
from tritpress.compressor.share import SharedLinear, SharingConfig
from tritpress.compressor.structure import discover, lookup_multiplier
from tritpress.compressor.transform import convert, prepare
from tritpress.compressor.config import TernaryConfig
from tritpress.exporters.packed import load_packed, read_metadata, save_packed


def _ids(seed=1, batch=2, length=9):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _pack_reload(model, path):
    save_packed(model, path, SourceInfo("hf", "x", type(model).__name__, model.config.to_dict()))
    return load_packed(path)


# ------------------------------------------------------------------ structure and inputs


def test_t5_has_two_stacks_whose_first_blocks_carry_the_position_bias():
    model = make_t5()
    s = discover(model)
    assert [(b.path, b.num_blocks, b.block_type) for b in s.stacks] == [("encoder.block", 3, "T5Block"),
                                                                       ("decoder.block", 3, "T5Block")]
    first, second = model.encoder.block[0], model.encoder.block[1]
    assert sum(p.numel() for p in first.parameters()) > sum(p.numel() for p in second.parameters())
    roles = {layer.name: layer.role for layer in s.layers if layer.kind == "linear"}
    assert roles.pop("lm_head") == "head" and set(roles.values()) == {"block"}   # both stacks' Linears
    assert len(roles) == 3 * 6 + 3 * 10                                           # q k v o wi wo (+ cross q k v o)
    io = ModelIO.discover(model, s)
    assert io.block_paths == [f"encoder.block.{i}" for i in range(3)] + [f"decoder.block.{i}" for i in range(3)]


def test_encoder_decoder_inputs_teacher_force_the_shifted_source():
    model = make_t5()
    inputs = example_inputs(model)
    ids = inputs["input_ids"]
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, :-1])
    assert (inputs["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()
    out = ModelIO.of(model).forward(model, ids)   # ids alone: the decoder inputs are added
    assert out.shape == (*ids.shape, VOCAB)
    torch.testing.assert_close(out, run_model(model, inputs))


def test_seq2seq_lm_reads_the_first_half_and_predicts_the_second():
    model = make_t5()
    io = ModelIO.of(model)
    assert io.causal and io.decoder_start == model.config.decoder_start_token_id
    ids = _ids(length=10)
    inputs = io.lm_inputs(ids)
    assert torch.equal(inputs["input_ids"], ids[:, :5])
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], ids[:, 5:9])
    logits, target = io.next_token_pairs(io.forward(model, inputs), ids)
    assert logits.shape == (2 * 5, VOCAB) and torch.equal(target, ids[:, 5:].flatten())
    direct = model(input_ids=ids[:, :5], labels=ids[:, 5:].contiguous()).loss   # transformers' own teacher-forced loss
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, target), direct)


def test_scaled_word_embedding_keeps_its_factor_and_positions_stay_float(tmp_path):
    model = make_bart(scale_embedding=True)
    enc = model.model.encoder
    assert lookup_multiplier(model.model.shared) == pytest.approx(math.sqrt(HIDDEN))
    assert lookup_multiplier(enc.embed_positions) is None          # reads positions from the input's shape
    assert lookup_multiplier(nn.Embedding(5, 3)) == 1.0
    names = {layer.name for layer in discover(model).layers if layer.kind == "embedding"}
    assert "model.encoder.embed_positions" not in names and "model.shared" in names
    ids = _ids()
    ref = enc.embed_tokens(ids)
    q = convert(prepare(copy.deepcopy(model)))
    assert isinstance(q.model.encoder.embed_tokens, QEmbedding)
    got = q.model.encoder.embed_tokens(ids)
    assert (got - ref).norm() / ref.norm() < 0.02                  # int8 rows, same factor
    assert isinstance(q.model.encoder.embed_positions, nn.Embedding)   # untouched (class and forward)
    inputs = example_inputs(model)
    out = run_model(q, inputs)
    loaded = _pack_reload(q, tmp_path / "bart.safetensors")
    assert loaded.model.encoder.embed_tokens.multiplier == pytest.approx(math.sqrt(HIDDEN))
    torch.testing.assert_close(run_model(loaded, inputs), out, rtol=0, atol=0)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = random.Random(0)
    words = "the a cat dog sat ran on far mat away near big small red old new".split()
    f = tmp_path_factory.mktemp("text") / "text.txt"
    f.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(40)))
    return f


@pytest.mark.parametrize("make", [lambda: make_t5(untied_head=True), make_bart], ids=["t5", "bart"])
def test_pipeline_runs_both_stacks_with_ties_and_checks(make, text, tmp_path, capsys):
    d = tmp_path / "model"
    make().save_pretrained(d)
    out = tmp_path / "out"
    code, stdout, err = run_cli([d, "--tie-decoder", "same-depth", "--tie-embeddings", "embedding", "--data", text,
                                 "--steps", 2, "--seq-len", 16, "--batch-size", 2, "--eval-tokens", 64,
                                 "--share-sequences", 4, "--share-seq-len", 16, "--onnx", "--out", out, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["structure"]["stacks"]) == 2
    onnx = report["onnx"]
    assert onnx["validation"]["passed"] and set(onnx["parts"]) == {"encoder", "decoder"}
    assert "decoder:encoder_hidden_states" in onnx["inputs"] and (out / "model.decoder.onnx").is_file()
    checks = report["checks"]
    assert "skipped" not in checks and checks["reload_vs_converted"]["codes_bit_identical"], checks
    assert checks["reload_vs_converted"]["max_abs_diff"] == 0.0
    # T5's own head is tied to its embedding here; BART's already reads it
    assert report["sharing"]["embedding_tie"]["already_tied"] == (report["model"]["model_class"].startswith("Bart"))
    ties = report["sharing"]["decoder_ties"]
    assert len(ties["ties"]) == 6 * len(ties["pairs"]) and ties["decoder_only"]   # cross-attention kept
    assert "calibration_loss_after" in ties
    training = report["training"]
    assert training["steps"] == 2 and {"task", "kd", "hidden"} <= set(training["final"])   # decoder logits + blocks
    assert training["quality"]["original"]["ppl"] > 1                                        # target-side perplexity
    rendered = render(report)
    assert "block stacks" in rendered and "decoder tied to encoder" in rendered and "embedding tie:" in rendered
    code, info, err = run_cli(["info", out / "model.tritpress.safetensors"], capsys)   # one row per stack there too
    assert code == 0 and "block stack" in info and all(st["path"] in info for st in report["structure"]["stacks"])
    # target-side perplexity, original vs packed, through the evaluation gate
    code, stdout, err = run_cli(["evaluate", out / "model.tritpress.safetensors", "--baseline", d, "--tasks", "lm",
                                 "--lm-data", text, "--context", 32, "--bootstrap", 0, "--json"], capsys)
    rows = json.loads(stdout)["rows"]
    assert [r["metric"] for r in rows] == ["perplexity"] and rows[0]["baseline"] > 1 and rows[0]["compressed"] > 1


# ------------------------------------------------------------------ the embedding tie


def test_tie_embeddings_makes_one_tensor_through_convert_pack_reload(tmp_path):
    model = make_llama(False)
    before = sum(p.numel() for p in model.parameters())
    findings = tie_embeddings(model, "average")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert findings["unique_params_before"] - findings["unique_params_after"] == VOCAB * HIDDEN
    assert before - sum(p.numel() for p in model.parameters()) == VOCAB * HIDDEN
    assert 0 < findings["relative_error"]["head"] and 0 < findings["relative_error"]["embedding"]
    q = convert(prepare(model))
    assert q.lm_head.qweight is q.model.embed_tokens.qweight
    f = tmp_path / "m.safetensors"
    ids = _ids()
    ref = q(ids).logits
    loaded = _pack_reload(q, f)
    assert loaded.lm_head.qweight.codes is loaded.model.embed_tokens.qweight.codes
    torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
    stored = [k for k in read_metadata(f)["tensors"] if k.endswith("qweight.codes") and "layers" not in k]
    assert len(stored) == 1


def test_tie_embeddings_on_a_tied_model_changes_nothing_and_shapes_must_agree():
    model = make_llama(True)
    assert tie_embeddings(model)["already_tied"]

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, HIDDEN)
            self.out = nn.Linear(2 * HIDDEN, VOCAB)

        def forward(self, ids):
            h = self.emb(ids)
            return self.out(torch.cat([h, h], -1))

    with pytest.raises(TritpressError, match="different shapes"):
        tie_embeddings(Wide())


# ------------------------------------------------------------------ the decoder tie


@pytest.mark.parametrize("make, kept", [(make_t5, "EncDecAttention"), (make_bart, "encoder_attn")],
                         ids=["t5", "bart"])
def test_decoder_self_attention_and_ffn_tied_to_the_encoder_cross_attention_kept(make, kept, tmp_path):
    model = make()
    s = discover(model)
    enc, dec = (model.get_submodule(b.path) for b in s.stacks)
    before = sum(p.numel() for p in model.parameters())
    findings = tie_decoder(model, SharingConfig(tie_decoder="same-depth"))
    n = len(enc)
    assert findings["pairs"] == [[i, i] for i in range(n)]
    enc_keys = matrix_keys(enc[0])
    tied = 0
    for key, name in matrix_keys(dec[0]).items():
        d = dec[0].get_submodule(name.removesuffix(".inner"))
        if kept in name:
            assert not isinstance(d, SharedLinear) and key not in enc_keys
            continue
        e = enc[0].get_submodule(enc_keys[key].removesuffix(".inner"))
        assert isinstance(d, SharedLinear) and d.inner.weight is e.inner.weight and d.gain is not e.gain
        tied += d.inner.weight.numel()
    assert tied and before - sum(p.numel() for p in model.parameters()) == n * tied - 2 * n * len(enc_keys)
    q = convert(prepare(model))
    inputs = example_inputs(q)
    ref = run_model(q, inputs)
    loaded = _pack_reload(q, tmp_path / "m.safetensors")
    torch.testing.assert_close(run_model(loaded, inputs), ref, rtol=0, atol=0)
    # stored once: the tied trits leave the file, and the decoder's row uses what it does not store
    _pack_reload(convert(prepare(make())), tmp_path / "untied.safetensors")
    tied_size, untied_size = size_report(tmp_path / "m.safetensors"), size_report(tmp_path / "untied.safetensors")
    ternary = [{c["component"]: c for c in r["components"]}["ternary layers"] for r in (tied_size, untied_size)]
    assert ternary[1]["unique_params"] - ternary[0]["unique_params"] == n * tied
    assert ternary[0]["params"] == ternary[1]["params"]
    assert ternary[1]["bytes"] - ternary[0]["bytes"] >= n * tied // 5        # 5 trits per byte
    enc_row, dec_row = tied_size["stacks"]
    assert enc_row["params"] == enc_row["stored_params"] and dec_row["params"] - dec_row["stored_params"] >= n * tied


def test_onnx_encoder_and_decoder_graphs_chain_to_the_model_s_logits(tmp_path):
    import numpy as np
    import onnxruntime as ort
    from tritpress.exporters.onnx import OnnxConfig, export_onnx

    model = make_t5(untied_head=True)
    tie_decoder(model, SharingConfig(tie_decoder="same-depth"))
    q = convert(prepare(model))
    result = export_onnx(q, tmp_path / "t5.onnx", OnnxConfig(format="float"))
    assert result["validation"]["passed"] and len(result["validation"]["outputs"]) == 2
    src, tgt = _ids(length=7), _ids(seed=2, length=4)
    mask = torch.ones_like(src)
    enc = ort.InferenceSession(str(tmp_path / "t5.encoder.onnx"))
    dec = ort.InferenceSession(str(tmp_path / "t5.decoder.onnx"))
    hidden = enc.run(None, {"input_ids": src.numpy(), "attention_mask": mask.numpy()})[0]
    logits = dec.run(None, {"decoder_input_ids": tgt.numpy(), "encoder_hidden_states": hidden,
                            "encoder_attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = q(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits.numpy()
    assert logits.shape == ref.shape and np.abs(logits - ref).max() < 1e-4


def test_auto_ties_each_decoder_block_to_the_encoder_block_whose_tie_costs_least(text, tmp_path):
    from tritpress.compressor.redundancy import Calibration
    from tritpress.compressor.sharing_stage import share_stage

    model = make_bart()
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    cal = Calibration.build(model, ids)
    tied, findings = share_stage(model, None, SharingConfig(tie_decoder="auto"), None, calibration_ids=ids)
    ranked = findings["decoder_ties"]["candidates"]
    assert len(ranked["pairs"]) == 2 * 2
    for d in range(2):   # each measured pair really is the loss of that tie alone
        row = min((r for r in ranked["pairs"] if r["decoder"] == d), key=lambda r: r["loss_after_tying"])
        alone = copy.deepcopy(model)
        tie_decoder(alone, SharingConfig(tie_decoder=f"{d}:{row['encoder']}"))
        assert cal.loss(alone) == pytest.approx(row["loss_after_tying"], abs=1e-6)
    assert findings["decoder_ties"]["pairs"] == [[r["decoder"], r["encoder"]] for r in ranked["cheapest"]]
    assert tied is not model and not any(isinstance(m, SharedLinear) for m in model.modules())  # the original untied
    with pytest.raises(TritpressError, match="calibration text"):
        share_stage(make_bart(), None, SharingConfig(tie_decoder="auto"), None)


def test_decoder_pairs_and_refusals():
    assert decoder_pairs("same-depth", 3, 2) == [(0, 0), (1, 1)]
    assert decoder_pairs("0:0, 1:0,2:1", 2, 3) == [(0, 0), (1, 0), (2, 1)]
    for spec, message in (("5:0", "the decoder has blocks"), ("0:0,0:1", "named twice"), ("a:b", "DEC:ENC")):
        with pytest.raises(TritpressError, match=message):
            decoder_pairs(spec, 2, 3)
    with pytest.raises(ValueError, match="without a --sharing strategy"):
        SharingConfig("alternate", tie_decoder="same-depth")
    with pytest.raises(TritpressError, match="two block stacks"):
        tie_decoder(make_llama(True), SharingConfig(tie_decoder="same-depth"))


def test_bad_tie_flags_are_one_line(tmp_path, capsys):
    d = tmp_path / "llama"
    make_llama(True).save_pretrained(d)
    code, _, err = run_cli([d, "--tie-decoder", "same-depth", "--out", tmp_path / "o"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("compress: error:")]
    assert code != 0 and len(errors) == 1 and "two block stacks" in errors[0] and "Traceback" not in err
    code, _, err = run_cli([d, "--tie-decoder", "x", "--out", tmp_path / "o2"], capsys)
    assert code != 0 and "DEC:ENC" in err and "Traceback" not in err


# ------------------------------------------------------------------ transformers BitNet export


def test_hf_bitnet_export_of_tied_encoder_decoders(tmp_path):
    """BART and T5 with decoders tied to their encoders load in transformers as BitNet models computing what
    tritpress computes (gains folded, float shared Linears included); T5's `wo` layers, which
    transformers keeps float, are refused as ternary in one line naming the --exclude that fixes it."""
    from tritpress.exporters.hf_bitnet import HfExportConfig, HfExportError, export_hf_bitnet

    def exported(model, cfg, name):
        # init closest: one occurrence copies its block, the other gets a gain far from 1 (folded on export)
        tie_decoder(model, SharingConfig(tie_decoder="same-depth", init="closest"))
        q = convert(prepare(model, cfg))
        return export_hf_bitnet(q, tmp_path / name, HfExportConfig(),
                                SourceInfo("hf", "", type(model).__name__, model.config.to_dict()))

    expressible = TernaryConfig(granularity="tensor", act_bits=8)
    assert exported(make_bart(), expressible, "bart")["validation"]["passed"]
    with pytest.raises(HfExportError, match=r"keeps 'wo' layers float .* --exclude '\\\.wo\\b'"):
        exported(make_t5(), expressible, "t5-refused")
    result = exported(make_t5(), TernaryConfig(granularity="tensor", act_bits=8, exclude=[r"\.wo\b"]), "t5")
    assert result["validation"]["passed"] and result["tied_across_layers"] > 0
    assert not (tmp_path / "t5-refused").exists()
