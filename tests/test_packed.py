"""The packed checkpoint: exact reload, ties stored once, ~1.6 bits per ternary
weight, and rejection of truncated / tampered / foreign files."""
from __future__ import annotations

import base64
import copy
import json
import math
import os
import struct
import sys
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tritpress.analyzers.size import COMPONENTS, size_report
from tritpress.compressor import TernaryConfig, convert, get_record
from tritpress.compressor.config import WEIGHT_FORMATS
from tritpress.compressor.errors import CorruptCheckpointError, TritpressError
from tritpress.compressor.ingest import SourceInfo
from tritpress.compressor.layers import QLinear, QTensor
from tritpress.compressor.transform import tie_groups
from tritpress.exporters.packed import PackedLoadConfig, load_packed, read_metadata, save_packed, skeleton_from_spec
from tests.tiny_models import FACTORIES, SKELETONS, build, run, sample_ids

CONFIGS = {
    "default": TernaryConfig(),
    "twn-channel-int4emb": TernaryConfig(method="twn", granularity="channel", embedding="int4", head="int8"),
    "act8-ternary-emb-int4-head": TernaryConfig(granularity="channel", act_bits=8, embedding="ternary",
                                                head="int4", outside_blocks="int8"),
    "twn-fp16-emb-bf16-floats": TernaryConfig(method="twn", embedding="fp16", head="fp32", float_dtype="bf16"),
    "bf16-emb-ternary-head": TernaryConfig(embedding="bf16", head="ternary", outside_blocks="ternary",
                                           scale_dtype="fp32"),
    "act8-fp32-everything": TernaryConfig(act_bits=8, embedding="fp32", head="keep", float_dtype="fp32",
                                          scale_dtype="bf16"),
    "int2-emb-int2-head": TernaryConfig(embedding="int2", head="int2", outside_blocks="int2"),
    # a scale per 16 weights of a row (GGUF Q4_0's layout at 32): the LSTM's 32-wide rows too
    "int4-g16-everything": TernaryConfig(embedding="int4", head="int4", outside_blocks="int8", group_size=16),
}
TIED = {"gpt2", "llama_tied", "lstm_tied"}
BYTES_PER = {"ternary": lambda n: math.ceil(n / 5), "int4": lambda n: math.ceil(n / 2),
             "int2": lambda n: math.ceil(n / 4), "int8": lambda n: n,
             "fp16": lambda n: 2 * n, "bf16": lambda n: 2 * n, "fp32": lambda n: 4 * n}


def source_for(name, model):
    if FACTORIES[name][1]:
        return SourceInfo("hf", "x", type(model).__name__, model.config.to_dict())
    return SourceInfo("module", "x", "tests.LSTMLM")


def load_for(name, path):
    return load_packed(path, skeleton=SKELETONS[name]()) if name in SKELETONS else load_packed(path)


def roundtrip(name, cfg, path):
    model = build(name)
    q = convert(copy.deepcopy(model), copy.deepcopy(cfg))
    meta = save_packed(q, path, source_for(name, model))
    return model, q, load_for(name, path), meta


def file_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


# ------------------------------------------------------------------ exact round trip

@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(FACTORIES))
def test_round_trip_is_exact(name, cfg_name, tmp_path):
    path = tmp_path / "m.tritpress.safetensors"
    model, q, r, meta = roundtrip(name, CONFIGS[cfg_name], path)

    # the converted model really is quantized, and the reload computes exactly the same thing
    assert not torch.equal(run(model), run(q))
    assert torch.equal(run(q), run(r))
    assert get_record(r).converted and get_record(r).formats == get_record(q).formats

    # every QTensor (codes and scales) is bit-identical, same format
    qts = {n: m for n, m in q.named_modules(remove_duplicate=False) if isinstance(m, QTensor)}
    assert qts, "convert produced no QTensor"
    for n, qt in qts.items():
        rt = r.get_submodule(n)
        assert isinstance(rt, QTensor) and rt.fmt == qt.fmt, n
        assert rt.codes.dtype == torch.int8 and torch.equal(rt.codes, qt.codes), n
        assert rt.scale.dtype == qt.scale.dtype and torch.equal(rt.scale, qt.scale), n
        if qt.fmt.kind == "ternary":
            assert set(rt.codes.unique().tolist()) <= {-1, 0, 1}
    # and so is every other tensor of the state dict
    qs, rs = q.state_dict(), r.state_dict()
    assert qs.keys() == rs.keys()
    for k in qs:
        assert qs[k].dtype == rs[k].dtype and torch.equal(qs[k], rs[k]), k
    # activation quantization survives the reload
    assert {n: m.act_bits for n, m in q.named_modules() if isinstance(m, QLinear)} == \
           {n: m.act_bits for n, m in r.named_modules() if isinstance(m, QLinear)}


@pytest.mark.parametrize("cfg_name", ["default", "act8-ternary-emb-int4-head", "twn-fp16-emb-bf16-floats",
                                      "int2-emb-int2-head", "int4-g16-everything"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_ties_are_stored_once_and_restored(name, cfg_name, tmp_path):
    path = tmp_path / "m.tritpress.safetensors"
    _, q, r, meta = roundtrip(name, CONFIGS[cfg_name], path)
    groups = tie_groups(q)
    shared = [g for g in groups if len(g) > 1]
    if name in TIED:
        assert shared, "the tied embedding/head must be one tensor after convert"
    else:
        assert not shared
    assert meta["tie_map"] == {g[0]: g[1:] for g in shared}
    assert read_metadata(path)["tie_map"] == meta["tie_map"]
    # stored once: only canonical keys are in the file
    assert file_keys(path) == {g[0] for g in groups}
    rstate = r.state_dict(keep_vars=True)
    for g in shared:
        ptrs = {rstate[k].data_ptr() for k in g}
        assert len(ptrs) == 1, g
        assert all(rstate[k] is rstate[g[0]] for k in g)
    # the reload has exactly the same tie structure
    assert sorted(map(sorted, tie_groups(r))) == sorted(map(sorted, groups))


def test_tied_gpt2_head_and_embedding_share_storage_after_load(tmp_path):
    path = tmp_path / "g.safetensors"
    _, q, r, meta = roundtrip("gpt2", CONFIGS["default"], path)
    assert r.lm_head.qweight.codes.data_ptr() == r.transformer.wte.qweight.codes.data_ptr()
    assert r.lm_head.qweight.scale.data_ptr() == r.transformer.wte.qweight.scale.data_ptr()
    assert meta["tie_map"]["transformer.wte.qweight.codes"] == ["lm_head.qweight.codes"]
    assert "lm_head.qweight.codes" not in file_keys(path)
    # with a float embedding the Parameter itself is shared
    _, _, r2, meta2 = roundtrip("gpt2", CONFIGS["twn-fp16-emb-bf16-floats"], tmp_path / "g2.safetensors")
    assert r2.lm_head.weight is r2.transformer.wte.weight
    assert meta2["tie_map"] == {"transformer.wte.weight": ["lm_head.weight"]}


@pytest.mark.parametrize("fmt", WEIGHT_FORMATS)
@pytest.mark.parametrize("name", ["gpt2", "llama_tied", "lstm_tied"])
def test_tied_head_stays_one_tensor_with_every_format(name, fmt, tmp_path):
    """--head asks for another format on purpose: a tied head follows --embedding, one tensor."""
    other = "int8" if fmt != "int8" else "ternary"
    _, q, r, meta = roundtrip(name, TernaryConfig(embedding=fmt, head=other), tmp_path / "m.safetensors")
    record = get_record(q)
    head, emb = record.structure.head, record.structure.head_tied_to
    assert emb is not None and record.formats[head] == record.formats[emb]
    for model in (q, r):
        h, e = model.get_submodule(head), model.get_submodule(emb)
        if hasattr(e, "qweight"):
            assert e.qweight.fmt.kind == fmt and h.qweight.fmt == e.qweight.fmt
            assert h.qweight.codes is e.qweight.codes and h.qweight.scale is e.qweight.scale
        else:
            assert h.weight is e.weight
    # stored once: the only ties in the file are the embedding's tensors, aliased by the head
    assert meta["tie_map"] and all(k.startswith(emb + ".") and [a.replace(head, emb, 1) for a in v] == [k]
                                   for k, v in meta["tie_map"].items())
    assert torch.equal(run(q), run(r))


@pytest.mark.parametrize("kind", ["int2", "int4", "ternary"])
def test_untied_low_bit_head_is_stored_at_its_format_cost(kind, tmp_path):
    path = tmp_path / "m.safetensors"
    _, q, _, _ = roundtrip("llama_untied", TernaryConfig(embedding=kind, head=kind), path)
    rows = {c["component"]: c for c in size_report(path)["components"]}
    vocab, dim = q.lm_head.qweight.codes.shape
    expected = {"int2": math.ceil(vocab * dim / 4), "int4": math.ceil(vocab * dim / 2),
                "ternary": math.ceil(vocab * dim / 5)}[kind]
    assert rows["head"]["bytes"] == rows["embeddings"]["bytes"] == expected
    assert rows["head"]["bits_per_weight"] == round(8 * expected / (vocab * dim), 4)


# ------------------------------------------------------------------ size

@pytest.mark.parametrize("cfg_name", ["default", "twn-channel-int4emb", "act8-ternary-emb-int4-head",
                                      "bf16-emb-ternary-head", "act8-fp32-everything", "int2-emb-int2-head",
                                      "int4-g16-everything"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_size_report_matches_file_and_bits_per_weight(name, cfg_name, tmp_path):
    path = tmp_path / "m.tritpress.safetensors"
    _, q, _, _ = roundtrip(name, CONFIGS[cfg_name], path)
    rep = size_report(path)
    size = os.path.getsize(path)
    assert rep["file_bytes"] == size
    assert sum(c["bytes"] for c in rep["components"]) == size
    assert [c["component"] for c in rep["components"]] == list(COMPONENTS)

    record = get_record(q)
    block = {layer.name for layer in record.structure.layers if layer.role == "block"}
    ternary_block = {}
    for n, m in q.named_modules():  # unique QTensors of block layers
        if isinstance(m, QTensor) and any(n == b or n.startswith(b + ".") for b in block):
            ternary_block[id(m.codes)] = m.codes.numel()
    weights = sum(ternary_block.values())
    n_tensors = len(ternary_block)
    tern = rep["ternary"]
    assert weights > 0 and tern["weights"] == weights
    # exactly ceil(n/5) bytes per ternary tensor
    assert tern["code_bytes"] == sum(math.ceil(n / 5) for n in ternary_block.values())
    bpw = 8 * tern["code_bytes"] / weights
    assert 1.6 <= bpw <= 1.6 + 8 * n_tensors / weights
    assert tern["bits_per_weight"] == round(bpw, 4)

    # embeddings are stored at exactly their format's cost
    emb_bytes = 0
    seen = set()
    for layer in record.structure.by_role("embedding"):
        fmt = record.formats[layer.name]
        m = q.get_submodule(layer.name)
        t = m.qweight.codes if hasattr(m, "qweight") else m.weight
        if id(t) not in seen:
            seen.add(id(t))
            emb_bytes += BYTES_PER[fmt.kind](t.numel())
    emb_row = next(c for c in rep["components"] if c["component"] == "embeddings")
    assert emb_row["bytes"] == emb_bytes
    # every scale once, in its storage dtype: one per tensor, row or group of a row (--group-size)
    scales = {id(m.scale): m.scale.numel() for m in q.modules() if isinstance(m, QTensor)}
    scale_row = next(c for c in rep["components"] if c["component"] == "scales")
    assert scale_row["bytes"] == sum(scales.values()) * (4 if record.config.scale_dtype == "fp32" else 2)

    state = q.state_dict(keep_vars=True)
    assert rep["params"] == sum(t.numel() for t in state.values())
    assert rep["unique_params"] == sum(state[g[0]].numel() for g in tie_groups(q))


def test_packed_file_is_much_smaller_than_fp32(tmp_path):
    path = tmp_path / "m.safetensors"
    model, *_ = roundtrip("llama_untied", TernaryConfig(embedding="int4", head="int4"), path)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    assert os.path.getsize(path) < fp32 / 4


# ------------------------------------------------------------------ errors and tampering

def split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path, header, data):
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def rewrite(src, dst, edit_meta=None, edit_header=None):
    header, data = split(src)
    if edit_meta is not None:
        meta = json.loads(zlib.decompress(base64.b64decode(header["__metadata__"]["tritpress.zlib"])))
        edit_meta(meta)
        header["__metadata__"]["tritpress.zlib"] = base64.b64encode(zlib.compress(json.dumps(meta).encode())).decode()
    if edit_header is not None:
        edit_header(header)
    write(dst, header, data)
    return dst


@pytest.fixture(scope="module")
def packed_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "gpt2.tritpress.safetensors"
    model = build("gpt2")
    q = convert(copy.deepcopy(model), TernaryConfig())
    save_packed(q, path, source_for("gpt2", model))
    return path, q


def test_untouched_rewrite_still_loads(packed_gpt2, tmp_path):
    """Control: the header rewriting used by the tamper tests yields a valid file by itself."""
    path, q = packed_gpt2
    out = rewrite(path, tmp_path / "same.safetensors", edit_meta=lambda m: None)
    assert torch.equal(run(load_packed(out)), run(q))


@pytest.mark.parametrize("cut", [1, 3, 17])
def test_truncated_file_is_corrupt(packed_gpt2, tmp_path, cut):
    path, _ = packed_gpt2
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(CorruptCheckpointError):
        load_packed(bad)


def test_truncated_inside_header_is_corrupt(packed_gpt2, tmp_path):
    path, _ = packed_gpt2
    for n in (0, 5, 8, 100):
        bad = tmp_path / f"cut{n}.safetensors"
        bad.write_bytes(path.read_bytes()[:n])
        with pytest.raises(CorruptCheckpointError):
            load_packed(bad)


def test_appended_bytes_are_corrupt(packed_gpt2, tmp_path):
    path, _ = packed_gpt2
    bad = tmp_path / "longer.safetensors"
    bad.write_bytes(path.read_bytes() + b"\0\0\0\0")
    with pytest.raises(CorruptCheckpointError):
        load_packed(bad)


@pytest.mark.parametrize("where", [0.0, 0.13, 0.5, 0.77, 1.0])
def test_flipped_data_byte_fails_checksum(packed_gpt2, tmp_path, where):
    path, _ = packed_gpt2
    header, data = split(path)
    raw = bytearray(path.read_bytes())
    start = len(raw) - len(data)
    pos = start + min(int(where * len(data)), len(data) - 1)
    raw[pos] ^= 0x01
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        load_packed(bad)


@pytest.mark.parametrize("key,new_shape", [
    ("transformer.h.0.attn.c_proj.qweight.codes", [32, 33]),   # trits5: 205 bytes stored, 212 expected
    ("transformer.wte.qweight.codes", [99, 32]),                # raw int8 codes
    ("transformer.h.1.ln_2.bias", [31]),                        # raw float
])
def test_edited_shape_in_metadata_is_corrupt(packed_gpt2, tmp_path, key, new_shape):
    path, _ = packed_gpt2

    def edit(meta):
        assert key in meta["tensors"]
        meta["tensors"][key]["shape"] = new_shape

    bad = rewrite(path, tmp_path / "shape.safetensors", edit_meta=edit)
    with pytest.raises(CorruptCheckpointError):
        load_packed(bad)


def test_same_numel_shape_edit_is_corrupt(packed_gpt2, tmp_path):
    path, _ = packed_gpt2
    key = "transformer.h.0.attn.c_proj.qweight.codes"   # [32, 32] -> [16, 64]: same 1024 trits

    def edit(meta):
        meta["tensors"][key]["shape"] = [16, 64]

    bad = rewrite(path, tmp_path / "shape.safetensors", edit_meta=edit)
    with pytest.raises(CorruptCheckpointError):
        load_packed(bad)


def test_retyped_raw_tensor_is_corrupt(packed_gpt2, tmp_path):
    path, q = packed_gpt2
    key = "transformer.h.0.ln_1.weight"

    def edit(header):
        assert header[key]["dtype"] == "F16"
        header[key]["dtype"] = "BF16"     # same byte size, different numbers

    bad = rewrite(path, tmp_path / "retyped.safetensors", edit_header=edit)
    with pytest.raises(CorruptCheckpointError):
        load_packed(bad)


def test_tensor_list_mismatch_is_corrupt(packed_gpt2, tmp_path):
    path, _ = packed_gpt2

    def edit(meta):
        meta["tensors"]["extra.weight"] = dict(meta["tensors"]["transformer.h.1.ln_2.bias"])

    with pytest.raises(CorruptCheckpointError):
        load_packed(rewrite(path, tmp_path / "more.safetensors", edit_meta=edit))


def test_garbled_metadata_json_is_corrupt(packed_gpt2, tmp_path):
    path, _ = packed_gpt2
    header, data = split(path)
    header["__metadata__"]["tritpress"] = header["__metadata__"]["tritpress"][:-7]
    bad = tmp_path / "garbled.safetensors"
    write(bad, header, data)
    with pytest.raises(CorruptCheckpointError):
        load_packed(bad)


def test_newer_format_version_is_refused(packed_gpt2, tmp_path):
    path, _ = packed_gpt2

    def edit(meta):
        meta["format_version"] = 99

    with pytest.raises(TritpressError, match="newer"):
        load_packed(rewrite(path, tmp_path / "v99.safetensors", edit_meta=edit))


def test_metadata_is_compressed_and_an_uncompressed_one_still_reads(packed_gpt2, tmp_path):
    """Formats 3+ store the metadata zlib-compressed behind a readable stub; files of formats 1 and 2
    hold it as plain JSON under `tritpress` and must keep loading."""
    path, q = packed_gpt2
    header, data = split(path)
    stub = json.loads(header["__metadata__"]["tritpress"])
    digest = stub.pop("sha256")
    assert stub == {"format": "tritpress.packed", "format_version": 4, "tensors": {}, "metadata": "tritpress.zlib"}
    assert len(digest) == 64
    blob = header["__metadata__"].pop("tritpress.zlib")
    plain = zlib.decompress(base64.b64decode(blob)).decode()
    assert len(blob) < len(plain) / 4 and "sha256" not in json.loads(plain)
    header["__metadata__"]["tritpress"] = json.dumps({**json.loads(plain), "sha256": digest})  # as formats 1-2 held it
    write(tmp_path / "plain.safetensors", header, data)
    ids = sample_ids()
    assert torch.equal(run(load_packed(tmp_path / "plain.safetensors"), ids), run(q, ids))


def test_the_file_size_depends_on_formats_not_on_weight_values(tmp_path):
    """The digest sits outside the compressed metadata: models that differ only in their weights' values
    pack to files of exactly the same size (compress search sizes a candidate before training it)."""
    sizes = []
    for seed in (0, 1):
        q = convert(build("gpt2", seed=seed), TernaryConfig())
        f = tmp_path / f"s{seed}.safetensors"
        save_packed(q, f, SourceInfo("hf", "x", type(q).__name__, q.config.to_dict()))
        sizes.append((f.stat().st_size, read_metadata(f)["sha256"]))
    assert sizes[0][0] == sizes[1][0] and sizes[0][1] != sizes[1][1]


def test_compressed_metadata_that_is_damaged_or_newer_is_refused(packed_gpt2, tmp_path):
    path, _ = packed_gpt2
    header, data = split(path)
    blob = header["__metadata__"]["tritpress.zlib"]
    header["__metadata__"]["tritpress.zlib"] = blob[:len(blob) // 2]
    write(tmp_path / "half.safetensors", header, data)
    with pytest.raises(CorruptCheckpointError, match="compressed metadata"):
        load_packed(tmp_path / "half.safetensors")
    header["__metadata__"]["tritpress.zlib"] = blob
    header["__metadata__"]["tritpress"] = json.dumps({"format": "tritpress.packed", "format_version": 5,
                                                      "tensors": {}, "metadata": "tritpress.zlib"})
    write(tmp_path / "v5.safetensors", header, data)
    with pytest.raises(TritpressError, match="newer"):
        load_packed(tmp_path / "v5.safetensors")


def test_plain_safetensors_file_is_not_a_packed_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3, 3)}, str(path))
    with pytest.raises(TritpressError, match="not a tritpress"):
        load_packed(path)
    with pytest.raises(TritpressError):
        read_metadata(path)
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(TritpressError, match="not a tritpress"):
        load_packed(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_file_is_refused(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / "random.safetensors"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(TritpressError):
        load_packed(path)


def test_plausible_header_length_with_garbage_is_refused(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"\x00\xff not json \x01 at all")
    with pytest.raises(CorruptCheckpointError):
        load_packed(path)


@pytest.mark.parametrize("header", [b"[]      ", b'"x"     ', b'{"__metadata__": {"tritpress": "[1]"}}  '])
def test_non_object_json_header_is_refused(tmp_path, header):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(TritpressError):
        load_packed(path)


def test_missing_file(tmp_path):
    with pytest.raises(TritpressError, match="no such file"):
        load_packed(tmp_path / "nope.safetensors")


def test_custom_module_needs_skeleton(tmp_path):
    path = tmp_path / "lstm.safetensors"
    model = build("lstm")
    save_packed(convert(copy.deepcopy(model), TernaryConfig()), path, source_for("lstm", model))
    with pytest.raises(TritpressError, match="skeleton"):
        load_packed(path)


def test_wrong_skeleton_is_a_tritpress_error(tmp_path):
    from tests.tiny_models import LSTMLM
    path = tmp_path / "lstm.safetensors"
    model = build("lstm")
    save_packed(convert(copy.deepcopy(model), TernaryConfig()), path, source_for("lstm", model))
    with pytest.raises(TritpressError, match="does not fit"):
        load_packed(path, skeleton=LSTMLM(dim=16))


def test_save_packed_requires_a_converted_model(tmp_path):
    from tritpress.compressor import prepare
    model = build("gpt2")
    src = source_for("gpt2", model)
    with pytest.raises(TritpressError, match="convert"):
        save_packed(model, tmp_path / "a.safetensors", src)
    with pytest.raises(TritpressError, match="convert"):
        save_packed(prepare(model, TernaryConfig()), tmp_path / "b.safetensors", src)
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


# ------------------------------------------------------------------ --skeleton package.module:Class


def test_skeleton_spec_builds_the_class_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_skeletons.py").write_text(
        "from tests.tiny_models import LSTMLM\n\n"
        "class Wide(LSTMLM):\n    def __init__(self):\n        super().__init__(dim=16)\n\n"
        "def needs_args(dim):\n    return LSTMLM(dim=dim)\n")
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    model = skeleton_from_spec("my_skeletons:Wide")
    assert type(model).__name__ == "Wide" and model.rnn.hidden_size == 16
    assert sys.path == path_before  # the current folder was only borrowed for the import
    with pytest.raises(TritpressError, match=r"^--skeleton my_skeletons:needs_args: needs_args\(\) with no "
                                             r"arguments failed \(TypeError"):
        skeleton_from_spec("my_skeletons:needs_args")
    assert PackedLoadConfig().model_skeleton() is None
    assert type(PackedLoadConfig("tests.tiny_models:LSTMLM").model_skeleton()).__name__ == "LSTMLM"


def test_a_packed_custom_module_loads_into_its_named_class(tmp_path):
    path = tmp_path / "lstm.safetensors"
    model = build("lstm")
    converted = convert(copy.deepcopy(model), TernaryConfig())
    save_packed(converted, path, SourceInfo("module", "lstm.pt", "tests.tiny_models.LSTMLM"))  # as ingest names it
    with pytest.raises(TritpressError, match="--skeleton tests.tiny_models:LSTMLM on the command line"):
        load_packed(path)
    reloaded = load_packed(path, skeleton=skeleton_from_spec("tests.tiny_models:LSTMLM"))
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids), converted(ids))


def test_load_builds_no_throwaway_weights(packed_gpt2, monkeypatch):
    """The skeleton's parameters live on the meta device and nothing initialises them: every value comes
    from the file (load_packed used to build and randomly initialise a whole fp32 model first)."""
    import torch.nn.init as init

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was initialised while loading")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "zeros_", "ones_"):
        monkeypatch.setattr(init, name, refuse)
    path, q = packed_gpt2
    model = load_packed(path)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ids = sample_ids()
    assert torch.equal(run(model, ids), run(q, ids))
