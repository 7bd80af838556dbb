"""The packed checkpoint: one safetensors file.

Tensors:
- ternary codes -> uint8, 5 trits per byte (`encoding: trits5`), flat row-major;
- int4 codes -> uint8, 2 per byte (`int4x2`); int2 codes -> uint8, 4 per byte (`int2x4`);
  int8 codes -> int8 (`raw`);
- scales and float tensors -> their storage dtype (`raw`);
- a 1-D tensor of strictly increasing non-negative integers (a trimmed vocabulary's kept token
  ids) -> a bitmap over [0, largest] (`bitset`) when that is smaller than the integers;
- any other tensor of non-negative integers (a trimmed vocabulary's dropped id -> kept row maps)
  -> `bits`-bit fields, bits = the largest value's bit length (`uintbits`, format 4), when smaller.
A trimmed vocabulary (compressor/vocab) adds that one tensor, the kept token ids, and a
`vocab` entry (which modules are trimmed, their shapes, the unknown token's id); the embedding
and head store only the kept rows.
Every tensor is stored once: aliases (tied or shared weights) are listed in
`tie_map` and re-tied on load. The JSON metadata also holds the format version, the source
model's config, the module map, the quantization config and a SHA-256 of all tensor bytes, so a
truncated or tampered file is rejected before any weight is used. From format version 3 it is
stored zlib-compressed (base64, key `tritpress.zlib`: 46 KB of JSON for MiniLM become 3.4 KB, 1.5 %
of a 30x-smaller file); key `tritpress` then holds a stub with the format and version, so an older
tritpress says "upgrade" instead of "not a tritpress file".
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.errors import CorruptCheckpointError, TritpressError
from tritpress.compressor.fileio import atomic_path
from tritpress.compressor.ingest import SourceInfo, build_from_config
from tritpress.compressor.layers import QTensor, WeightFormat
from tritpress.compressor.share import rebuild_wrappers, sharing_meta
from tritpress.compressor.structure import BlockStack, LayerInfo, ModelStructure, set_submodule
from tritpress.compressor.vocab import VOCAB_MAP, rebuild_trimmed, vocab_meta
from tritpress.compressor.transform import (QuantRecord, _set_record, build_empty, get_record, hold_ties,
                                            qtensor_formats, storage_dtypes, tie_groups)

from .settings import (SKELETON_FLAG, PackedLoadConfig, _first_line,  # re-exported: torch-free home
                       skeleton_from_spec)
from .packing import (MAX_UINT_BITS, is_idset, pack_idset, pack_int2, pack_int4, pack_trits, pack_uint,
                      packed_idset_size, packed_int2_size, packed_int4_size, packed_trits_size, packed_uint_size,
                      uint_bits, unpack_idset, unpack_int2, unpack_int4, unpack_trits, unpack_uint)

FORMAT = "tritpress.packed"
FORMAT_VERSION = 4   # the newest this code reads and the one it writes
# 1: the first; 2: int2 tensors and trimmed vocabularies; 3: compressed metadata, `bitset` id tables;
# 4: non-negative integer tensors in as few bits as their largest value needs (`uintbits`)
META_KEY = "tritpress"
ZMETA_KEY = "tritpress.zlib"  # version 3: the metadata, zlib-compressed, base64
DTYPES = {str(d).removeprefix("torch."): d for d in
          (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.int32,
           torch.int64, torch.bool, torch.float64)}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def component_of(key: str, record: QuantRecord, code_formats: dict) -> str:
    """Which row of the size report a stored tensor belongs to."""
    owner = max((layer for layer in record.structure.layers
                 if key.startswith(layer.name + ".")), key=lambda layer: len(layer.name), default=None)
    leaf = key.rsplit(".", 1)[-1]
    if leaf in VOCAB_MAP:  # a trimmed vocabulary's kept ids and dropped-id map (compressor/vocab)
        return "vocabulary map"
    if owner is None or leaf.startswith("bias"):
        return "norms/biases"
    if key.endswith(".scale") and key[: -len("scale")] + "codes" in code_formats:
        return "scales"
    return {"block": "ternary layers", "embedding": "embeddings", "head": "head",
            "outside": "other layers"}[owner.role]


def encode_tensor(key, t, code_formats, dtypes) -> tuple[torch.Tensor, str, dict]:
    """One state-dict tensor as the packed file stores it: codes packed (5 trits per byte, int4/int2
    nibbles), id sets as bitmaps, other non-negative integers in the fewest bits that hold them
    (whichever of these is smallest), floats in their storage dtype. -> (stored tensor, encoding, extra
    entry fields)."""
    stored, encoding = _encode_codes(key, t, code_formats, dtypes)
    if key in code_formats or stored.dtype.is_floating_point or stored.dtype == torch.bool or not stored.numel():
        return stored, encoding, {}  # codes keep their format's bits (int8: a byte), whatever their values
    values = stored.numpy()
    raw_bytes = stored.numel() * stored.element_size()
    sizes = {}  # each alternative's bytes, known before anything is packed
    if stored.dim() == 1 and is_idset(values):
        sizes["bitset"] = packed_idset_size(int(values[-1]) + 1)
    bits = uint_bits(values) if int(values.min()) >= 0 else None
    if bits is not None and bits < min(8 * stored.element_size(), MAX_UINT_BITS):  # row maps: 14 bits, not 16
        sizes["uintbits"] = packed_uint_size(values.size, bits)
    best = min(sizes, key=sizes.get, default=None)
    if best is None or sizes[best] >= raw_bytes:
        return stored, encoding, {}
    if best == "bitset":
        bitmap, universe = pack_idset(values)
        return torch.from_numpy(bitmap), "bitset", {"universe": universe}
    return torch.from_numpy(pack_uint(values, bits)), "uintbits", {"bits": bits}


def _encode_codes(key, t, code_formats, dtypes):
    if key in code_formats:
        kind = code_formats[key].kind
        codes = t.detach().cpu().numpy()
        if kind == "ternary":
            return torch.from_numpy(pack_trits(codes)), "trits5"
        if kind == "int4":
            return torch.from_numpy(pack_int4(codes)), "int4x2"
        if kind == "int2":
            return torch.from_numpy(pack_int2(codes)), "int2x4"
        return t.detach().clone().contiguous(), "raw"
    if key in dtypes:
        return t.detach().to(dtypes[key]).clone().contiguous(), "raw"
    return t.detach().clone().contiguous(), "raw"


def _digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """SHA-256 over the metadata (all but this digest) and every tensor's name, dtype and bytes:
    any edit to shapes, dtypes, maps or data is detected."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}:{_dtype_name(t.dtype)}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy
    return h.hexdigest()


def save_packed(model: nn.Module, path, source: SourceInfo, extra: dict | None = None) -> dict:
    """Write a converted model as a packed checkpoint (atomically). Returns the metadata."""
    from safetensors.torch import save_file

    record = get_record(model)
    if record is None or not record.converted:
        raise TritpressError("save_packed needs a converted model: call compressor.convert(model) first")
    code_formats = {f"{n}.codes": f for n, f in qtensor_formats(model).items()}
    dtypes = storage_dtypes(model)
    state = model.state_dict(keep_vars=True)
    groups = tie_groups(model)
    tensors, entries = {}, {}
    for keys in groups:
        key = keys[0]
        t = state[key]
        stored, encoding, fields = encode_tensor(key, t.detach().cpu(), code_formats, dtypes)
        tensors[key] = stored
        entries[key] = {"encoding": encoding, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                        "stored_dtype": _dtype_name(stored.dtype), **fields,
                        "component": component_of(key, record, code_formats),
                        "aliases": {a: component_of(a, record, code_formats) for a in keys[1:]}}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": source.to_dict(),
        "quant_config": record.config.to_dict(),
        "structure": record.structure.to_dict(),
        "module_map": record.module_map(model),
        "tie_map": {keys[0]: keys[1:] for keys in groups if len(keys) > 1},
        "sharing": sharing_meta(model),
        "vocab": vocab_meta(model),
        "tensors": entries,
        "extra": extra or {},
    }
    meta["sha256"] = _digest(tensors, meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=_header_metadata(meta))
    return meta


def _header_metadata(meta: dict) -> dict[str, str]:
    """The safetensors `__metadata__` strings: a readable stub (an older tritpress reads the version
    from it and asks for an upgrade) and the whole metadata compressed."""
    # the digest stays out of the compressed part (in the stub, at a fixed length): otherwise zlib's output
    # length moves with its digits, and two files of the same formats, ties and vocabulary differ by a few bytes
    stub = {"format": FORMAT, "format_version": meta["format_version"], "tensors": {}, "metadata": ZMETA_KEY,
            "sha256": meta["sha256"]}
    body = {k: v for k, v in meta.items() if k != "sha256"}
    packed = base64.b64encode(zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 9)).decode()
    return {META_KEY: json.dumps(stub), ZMETA_KEY: packed}


def _unpack_metadata(path, extra: dict) -> str:
    try:
        return zlib.decompress(base64.b64decode(extra[ZMETA_KEY], validate=True)).decode()
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise CorruptCheckpointError(f"{path}: compressed metadata is missing or damaged ({e})") from e


def read_header(path) -> tuple[dict, int]:
    """The safetensors JSON header and its size in bytes (8-byte length + JSON)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: file too short to be a packed checkpoint")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise CorruptCheckpointError(f"{path}: header size {n} is not plausible")
        blob = f.read(n)
    if len(blob) < n:
        raise CorruptCheckpointError(f"{path}: truncated header")
    try:
        header = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    return header, 8 + n


def read_metadata(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TritpressError(f"no such file: {path}")
    header, _ = read_header(path)
    extra = header.get("__metadata__") or {}
    raw = extra.get(META_KEY) if isinstance(extra, dict) else None
    if raw is None:
        raise TritpressError(f"{path} is a safetensors file but not a tritpress packed checkpoint")
    try:
        meta = json.loads(raw)
        if isinstance(meta, dict) and meta.get("metadata") == ZMETA_KEY and meta.get("format") == FORMAT \
                and meta.get("format_version", 0) <= FORMAT_VERSION:
            stub, meta = meta, json.loads(_unpack_metadata(path, extra))
            if isinstance(meta, dict) and "sha256" in stub:  # files before it moved there hold it inside
                meta.setdefault("sha256", stub["sha256"])
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: metadata is not valid JSON") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict):
        raise CorruptCheckpointError(f"{path}: metadata is not a tritpress metadata object")
    if meta.get("format") != FORMAT:
        raise TritpressError(f"{path}: unknown format {meta.get('format')!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise TritpressError(f"{path}: format version {meta['format_version']} is newer than this tritpress "
                             f"reads ({FORMAT_VERSION}); upgrade tritpress")
    return meta


def _expected_stored(entry: dict) -> tuple[list[int], str | None]:
    n = int(np.prod(entry["shape"])) if entry["shape"] else 1
    if entry["encoding"] == "trits5":
        return [packed_trits_size(n)], "uint8"
    if entry["encoding"] == "int4x2":
        return [packed_int4_size(n)], "uint8"
    if entry["encoding"] == "int2x4":
        return [packed_int2_size(n)], "uint8"
    if entry["encoding"] == "bitset":
        return [packed_idset_size(int(entry["universe"]))], "uint8"
    if entry["encoding"] == "uintbits":
        return [packed_uint_size(n, int(entry["bits"]))], "uint8"
    return entry["shape"], None


def decode_tensor(key, stored: torch.Tensor, entry: dict) -> torch.Tensor:
    """The inverse of `encode_tensor` for one stored tensor and its metadata entry."""
    n = int(np.prod(entry["shape"])) if entry["shape"] else 1
    try:
        # each unpack returns a fresh array (a gather), not a view of the file's bytes: no copy needed
        if entry["encoding"] == "trits5":
            return torch.from_numpy(unpack_trits(stored.numpy(), n)).reshape(entry["shape"])
        if entry["encoding"] == "int4x2":
            return torch.from_numpy(unpack_int4(stored.numpy(), n)).reshape(entry["shape"])
        if entry["encoding"] == "int2x4":
            return torch.from_numpy(unpack_int2(stored.numpy(), n)).reshape(entry["shape"])
        if entry["encoding"] == "bitset":
            ids = unpack_idset(stored.numpy(), n, int(entry["universe"]))
            return torch.from_numpy(ids).to(DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if entry["encoding"] == "uintbits":
            values = unpack_uint(stored.numpy(), n, int(entry["bits"]))
            return torch.from_numpy(values).to(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    except ValueError as e:
        raise CorruptCheckpointError(f"tensor {key}: {e}") from e
    return stored


def read_packed_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Verified, decoded tensors (one per tie group) and the metadata."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_metadata(path)
    header, header_bytes = read_header(path)
    try:
        data_size = path.stat().st_size - header_bytes
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if end != data_size:
            raise CorruptCheckpointError(f"{path}: data section is {data_size} bytes, header says {end} "
                                         "(truncated or appended to)")
        if set(meta["tensors"]) != {k for k in header if k != "__metadata__"}:
            raise CorruptCheckpointError(f"{path}: tensor list does not match its metadata")
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:
            raise CorruptCheckpointError(f"{path}: unreadable tensor data ({e})") from e
        # the digest (SHA-256 releases the GIL) runs on another thread while the tensors decode; nothing
        # decoded is returned before it matches, and a mismatch is the error reported whatever else failed
        with ThreadPoolExecutor(max_workers=1) as pool:
            digest = pool.submit(_digest, stored, meta)
            try:
                return _decoded(path, stored, meta), meta
            finally:
                if digest.result() != meta.get("sha256"):  # the digest covers the metadata too
                    raise CorruptCheckpointError(f"{path}: checksum mismatch, the data or metadata was modified "
                                                 "or corrupted")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CorruptCheckpointError(f"{path}: malformed header or metadata ({type(e).__name__}: {e})") from e


def _decoded(path, stored: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Every stored tensor checked against its metadata entry and decoded."""
    for key, entry in meta["tensors"].items():
        shape, _ = _expected_stored(entry)
        t = stored[key]
        if list(t.shape) != list(shape) or _dtype_name(t.dtype) != entry["stored_dtype"]:
            raise CorruptCheckpointError(f"{path}: tensor {key} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                                         f"metadata expects {entry['stored_dtype']}{list(shape)}")
    return {k: decode_tensor(k, t, meta["tensors"][k]) for k, t in stored.items()}


def _record_from_meta(meta: dict) -> QuantRecord:
    s = meta["structure"]
    structure = ModelStructure(BlockStack(**s["blocks"]) if s["blocks"] else None,
                               [LayerInfo(**layer) for layer in s["layers"]], s["head"], s["head_tied_to"],
                               [BlockStack(**b) for b in s.get("stacks", [])])   # older files list none
    record = QuantRecord(TernaryConfig.from_dict(meta["quant_config"]), structure, converted=True)
    for name, entry in meta["module_map"].items():
        record.formats[name] = WeightFormat(**entry["format"])
        record.sources[name] = entry["source"]
    return record


def retie(model: nn.Module, tie_map: dict[str, list[str]]) -> None:
    """Make every alias the very same tensor object as its canonical key."""
    state = model.state_dict(keep_vars=True)
    for canonical, aliases in tie_map.items():
        t = state[canonical]
        for alias in aliases:
            owner_name, _, leaf = alias.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if leaf in owner._parameters:
                owner._parameters[leaf] = t
            else:
                owner._buffers[leaf] = t


def load_packed(path, skeleton: nn.Module | None = None) -> nn.Module:
    """Load a packed checkpoint as a runnable converted model.

    Transformers models are rebuilt from the stored config; a custom nn.Module
    needs `skeleton`, an instance of the original architecture (its weights are
    overwritten; on the command line, --skeleton package.module:Class)."""
    tensors, meta = read_packed_state(path)
    source = meta["source"]
    if skeleton is not None:
        model = skeleton.float().eval() if any(p.dtype != torch.float32 for p in skeleton.parameters()) \
            else skeleton.eval()
    elif source.get("hf_config"):
        with parameters_on_meta(), _no_init():  # every parameter is assigned from the file
            model = build_from_config(source["hf_config"], source["model_class"])
    else:
        module_name, _, class_name = source["model_class"].rpartition(".")
        raise TritpressError(f"{path} was made from a custom nn.Module ({source['model_class']}): name its class, "
                             f"{SKELETON_FLAG} {module_name}:{class_name} on the command line, or "
                             "load_packed(path, skeleton=an instance of it) in Python")
    state = {}
    for key, t in tensors.items():
        for k in [key, *meta["tie_map"].get(key, [])]:
            state[k] = t
    try:
        if meta.get("sharing"):  # cross-layer sharing wrappers, before the layers inside them are rebuilt
            rebuild_wrappers(model, meta["sharing"])
        rebuild_trimmed(model, meta.get("vocab") or {})  # a trimmed vocabulary: files without one have no entry
        with torch.device("meta"):  # empty quantized layers: their codes and scales are assigned from the file
            build_empty(model, meta["module_map"])
        _set_record(model, _record_from_meta(meta))
        current = model.state_dict(keep_vars=True)  # stored dtypes (fp16 scales...) -> the module's own
        model.load_state_dict({k: t.to(current[k].dtype) if k in current else t for k, t in state.items()},
                              strict=True, assign=True)
    except (RuntimeError, AttributeError, KeyError, TypeError, ValueError) as e:  # another architecture
        raise TritpressError(f"{path} does not fit the model skeleton, a {type(model).__name__} (on the command "
                             f"line: {SKELETON_FLAG}): {_first_line(e)}") from e
    retie(model, meta["tie_map"])
    retie_qtensors(model)
    hold_ties(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CorruptCheckpointError(f"{path}: no stored value for {left[0]} (and {len(left) - 1} more)")
    return model.eval()


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, initialisation a no-op);
    buffers stay real, so values computed at construction (rotary frequencies, position ids) are kept.
    The same trick as accelerate's init_empty_weights(include_buffers=False)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _no_init():
    """transformers' own switch for skipping weight initialisation (on the meta device torch still runs
    its Python reference of normal_: 0.3 s for MiniLM); a no-op context where transformers has none."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def retie_qtensors(model: nn.Module) -> None:
    """Make QTensors whose codes and scales are tied one module again, as convert left them: the ONNX
    export recognises a head tied to its embedding by the QTensor they share, and stores the table once."""
    first: dict[tuple[int, int], QTensor] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, QTensor):
            one = first.setdefault((id(m.codes), id(m.scale)), m)
            if one is not m:
                set_submodule(model, name, one)
