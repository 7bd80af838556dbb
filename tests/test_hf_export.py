"""The Hugging Face BitNet export (exporters/hf_bitnet): a packed model written as a transformers folder
that plain from_pretrained loads and that computes what tritpress computes (tiny BERT-, LLaMA-style
models, a classifier, shared blocks, a trimmed embedding); transformers' 2-bit layout round-trips;
what the format cannot express is refused in one line, with no folder left behind."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cli_helpers import run_cli
from tests.tiny_models import bert_config, build
from tritpress.compressor import TernaryConfig, convert
from tritpress.compressor.ingest import SourceInfo
from tritpress.compressor.layers import QLinear
from tritpress.compressor.share import SharingConfig, apply_sharing, plan_groups
from tritpress.compressor.vocab import trim_model
from tritpress.exporters.hf_bitnet import (HfExportConfig, HfExportError, export_hf_bitnet, load_hf_bitnet,
                                           pack_rows_2bit, unpack_rows_2bit)
from tritpress.exporters.packed import save_packed

EXPRESSIBLE = TernaryConfig(granularity="tensor", act_bits=8)


def source(model):
    return SourceInfo("hf", "", type(model).__name__, model.config.to_dict())


def export(model, tmp_path, cfg=EXPRESSIBLE, hf=HfExportConfig(), name="hf"):
    q = convert(copy.deepcopy(model), copy.deepcopy(cfg))
    return q, export_hf_bitnet(q, tmp_path / name, hf, source(model))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6).map(lambda n: 4 * n), cols=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
def test_2bit_layout_round_trips_and_is_transformers_own(rows, cols, seed):
    from transformers.integrations.bitnet import unpack_weights

    codes = torch.randint(-1, 2, (rows, cols), generator=torch.Generator().manual_seed(seed)).to(torch.int8)
    packed = pack_rows_2bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows // 4, cols)
    assert torch.equal(unpack_rows_2bit(packed), codes)
    with torch._dynamo.config.patch(disable=True):
        assert torch.equal(unpack_weights(packed, dtype=torch.float32), codes.float())


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
@pytest.mark.parametrize("name", ["bert", "llama_tied", "llama_untied"])
def test_transformers_loads_the_folder_and_matches(name, linear_class, tmp_path):
    model = build(name)
    q, result = export(model, tmp_path, hf=HfExportConfig(linear_class=linear_class))
    v = result["validation"]
    assert v["passed"] and v["max_rel_diff"] < 1e-5 and v["top1_agreement"] == 1.0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["linear_class"] == linear_class
    assert result["ternary_linears"] == sum(isinstance(m, QLinear) and m.qweight.fmt.kind == "ternary"
                                            for m in q.modules()) > 0
    hf = load_hf_bitnet(tmp_path / "hf", type(model).__name__)
    kind = "BitLinear" if linear_class == "bitlinear" else "AutoBitLinear"
    assert sum(type(m).__name__ == kind for m in hf.modules()) == result["ternary_linears"]
    if name == "llama_tied":  # transformers ties the head again: the table is written once
        from safetensors import safe_open
        with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize("dropped,group", [("unk", 0), ("nearest", 0), ("mix", 0), ("mix", 16)])
def test_classifier_with_shared_blocks_and_trimmed_embedding(dropped, group, tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(num_labels=3, num_hidden_layers=4)).eval()
    student, _ = apply_sharing(copy.deepcopy(model), plan_groups(4, SharingConfig("alternate")))
    trim_model(student, list(range(0, 100, 2)), 1, dropped)
    q, result = export(student, tmp_path, TernaryConfig(granularity="tensor", act_bits=8, outside_blocks="int8",
                                                       group_size=group))
    assert result["validation"]["passed"] and result["validation"]["max_rel_diff"] < 1e-5
    assert result["tied_across_layers"] == 12   # 6 matrices of blocks 2 and 3 repeat those of blocks 0 and 1
    assert any("pooler" in m for m in result["modules_to_not_convert"])
    hf = load_hf_bitnet(tmp_path / "hf", "BertForSequenceClassification")
    assert hf.bert.embeddings.word_embeddings.weight.shape[0] == 100   # the full vocabulary again
    ids = torch.tensor([[2, 3, 4, 5, 7]])       # 3, 5, 7 were dropped: id 1, their nearest kept id or a mix
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        assert torch.allclose(hf(ids).logits, q(ids).logits, atol=1e-5)


@pytest.mark.parametrize("cfg,fragment", [
    (TernaryConfig(granularity="channel", act_bits=8), "--granularity tensor"),
    (TernaryConfig(granularity="tensor"), "--act-bits 8"),
    (TernaryConfig(granularity="tensor", act_bits=8, head="ternary"), "--head / --outside-blocks int8"),
])
def test_inexpressible_quantization_is_refused_with_the_flag(cfg, fragment, tmp_path):
    with pytest.raises(HfExportError, match=fragment):
        export(build("llama_untied" if cfg.head == "ternary" else "llama_tied"), tmp_path, cfg)
    assert list(tmp_path.iterdir()) == []


def test_gpt2_conv1d_and_trimmed_head_are_refused(tmp_path):
    with pytest.raises(HfExportError, match="Conv1D"):
        export(build("gpt2"), tmp_path)
    trimmed = build("llama_untied")
    trim_model(trimmed, list(range(0, 100, 2)), 1)
    with pytest.raises(HfExportError, match="trim-vocab"):
        export(trimmed, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_hf(tmp_path, capsys):
    model = build("llama_tied")
    packed = tmp_path / "m.tritpress.safetensors"
    save_packed(convert(copy.deepcopy(model), copy.deepcopy(EXPRESSIBLE)), packed, source(model))
    code, out, err = run_cli(["export", packed, "--hf", tmp_path / "hf", "--hf-linear-class", "autobitlinear"], capsys)
    assert code == 0, err
    assert "top-1 agreement 100.00 %" in out and (tmp_path / "hf" / "config.json").is_file()
    code, out, err = run_cli(["export", packed, "--hf", tmp_path / "x", "--onnx", tmp_path / "x.onnx"], capsys)
    assert code != 0 and "one output" in err and len(err.strip().splitlines()) == 1


def test_cli_refusal_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    model = build("llama_tied")
    packed = tmp_path / "m.tritpress.safetensors"
    save_packed(convert(copy.deepcopy(model), TernaryConfig(granularity="channel")), packed, source(model))
    code, out, err = run_cli(["export", packed, "--hf", tmp_path / "hf"], capsys)
    assert code == 1 and "--granularity tensor" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
