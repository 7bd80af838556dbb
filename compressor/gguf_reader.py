"""Read a GGUF checkpoint into a transformers model one tensor at a time.

transformers' own GGUF path dequantizes the whole file into a float32 state_dict and then copies it
into a freshly initialised model: two float32 copies of the weights at once, plus a random init that
is thrown away. Here the model is built with its parameters on the meta device, and each GGUF tensor
is dequantized (large ones in slices of rows) straight into the float32 tensor that becomes the
parameter, so the process holds one float32 copy plus one slice. Names, the llama q/k un-permutation
and the config come from transformers' and gguf-py's own tables, so the values are those of
`from_pretrained(..., gguf_file=...)` (tested bit for bit).

The file's header is parsed here rather than by gguf-py's `GGUFReader`, whose constructor builds a numpy
view of every metadata element (for a 49k-token vocabulary: ~160 MB and seconds) when only the
tensors' names, shapes, types and offsets are needed.
"""
from __future__ import annotations

import contextlib
import copy
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .memory import release_free_memory

SLICE_BYTES = 8 << 20   # float32 bytes dequantized per slice of a large tensor (bounds the transient memory)
PLAIN_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor")   # per-tensor processing in transformers
# GGUF metadata value types -> struct format (8: string, 9: array are variable-sized)
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]   # numpy order: rows first (GGUF lists the fastest dimension first)
    qtype: int               # gguf.GGMLQuantizationType value
    offset: int              # from the start of the file
    nbytes: int


@dataclass
class GGUFHeader:
    architecture: str
    tensors: list[GGUFTensorInfo]


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool):
        """Read (keep=True) or skip one metadata value."""
        if vtype in SCALAR:
            return self.take(SCALAR[vtype])
        if vtype == 8:
            if keep:
                return self.string()
            n = self.take("Q")   # (not `pos += take()`: pos would be read before take moves it)
            self.pos += n
            return None
        if vtype != 9:
            raise ValueError(f"unknown GGUF metadata type {vtype}")
        etype, count = self.take("I"), self.take("Q")
        if etype in SCALAR:   # fixed-size elements: skip in one step
            self.pos += count * struct.calcsize(SCALAR[etype])
        else:
            for _ in range(count):
                self.value(etype, keep=False)
        return None


def read_gguf_header(path: str) -> GGUFHeader:
    """Tensor infos and the architecture of a little-endian GGUF v2/v3 file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    with open(path, "rb") as f:
        buf = memoryview(np.memmap(f, dtype=np.uint8, mode="r"))
    cur = _Cursor(buf)
    magic, version = bytes(buf[:4]), struct.unpack_from("<I", buf, 4)[0]
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"not a little-endian GGUF v2/v3 file (magic {magic!r}, version {version})")
    cur.pos = 8
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    meta = {}
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.take("I")
        keep = key in ("general.architecture", "general.alignment")
        value = cur.value(vtype, keep)
        if keep:
            meta[key] = value
    infos = []
    for _ in range(n_tensors):
        name, ndim = cur.string(), cur.take("I")
        dims = [cur.take("Q") for _ in range(ndim)]
        qtype, offset = cur.take("I"), cur.take("Q")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        count = int(np.prod(dims))
        infos.append(GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, count // block * size))
    align = int(meta.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    for info in infos:
        info.offset += start
        if info.offset + info.nbytes > len(buf):
            raise ValueError(f"the GGUF file ends inside tensor {info.name} (truncated?)")
    return GGUFHeader(str(meta.get("general.architecture", "")), infos)


@contextlib.contextmanager
def metadata_parsed_once():
    """transformers reads a GGUF file's metadata with gguf-py's reader for the model's config and again for
    the tokenizer's (seconds each for a 49k-token vocabulary): inside, repeated metadata-only reads of one
    file return copies of the first."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original, parsed = gguf_utils.load_gguf_checkpoint, {}

    def once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return original(path, return_tensors=return_tensors, **kwargs)
        key = os.path.realpath(path)
        if key not in parsed:
            parsed[key] = original(path, return_tensors=False)
        return copy.deepcopy(parsed[key])

    gguf_utils.load_gguf_checkpoint = once
    try:
        yield
    finally:
        gguf_utils.load_gguf_checkpoint = original


def tensor_processor(header: GGUFHeader, config: dict):
    """transformers' tensor processor for the architecture, or None when it combines or rewrites tensors
    across the file (MoE experts, ...), which only transformers' own loader handles."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    cls = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)
    return cls(config=config) if cls.__name__ in PLAIN_PROCESSORS else None


def load_gguf_model(path: str, header: GGUFHeader, config, model_class, processor,
                    lazy: bool = False) -> tuple[nn.Module, "LazyWeights | None"]:
    """`model_class.from_pretrained(folder, gguf_file=...)` in float32, read tensor by tensor: `config` is
    the transformers config of the file, `processor` from `tensor_processor`. lazy=True leaves every
    Linear weight that no other module shares on the meta device, to be read when a stage needs it
    (`LazyWeights`): the model is then complete only through those reads."""
    from accelerate import init_empty_weights

    release_free_memory()   # what parsing the metadata (config, tokenizer) left in the heap
    # parameters on meta (no memory, no random init); buffers such as rotary frequencies are computed
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config, dtype=torch.float32)
    names = gguf_to_hf_names(model, header.architecture, config.num_hidden_layers)
    params = dict(model.named_parameters(remove_duplicate=False))
    by_param = {hf: info for info in header.tensors if (hf := names.get(info.name)) in params}
    later = _lazy_linear_weights(model) & by_param.keys() if lazy else set()   # a tied head is not in the file
    with open(path, "rb") as file:   # read, not memory-mapped: mapped pages would count as the process's
        for hf_name, info in by_param.items():
            if hf_name not in later:
                _assign(model, hf_name, _read_tensor(file, info, processor, tuple(params[hf_name].shape)))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in later]
    if missing:
        raise ValueError(f"the GGUF file has no tensor for {missing[0]} ({len(missing)} parameters missing)")
    weights = LazyWeights(path, processor, {n: by_param[n] for n in later}) if later else None
    return model.eval(), weights


def _lazy_linear_weights(model: nn.Module) -> set[str]:
    """The `weight` of every nn.Linear whose parameter no other module holds."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and seen.get(id(m.weight)) == 1}


class LazyWeights:
    """Linear weights of a model that stay in the GGUF file until read: `read` returns one as a float32
    tensor (the values `from_pretrained` would hold), `streamed` runs a forward pass that reads each just
    before its layer runs and drops it after, so the original runs with one layer's weights in memory."""

    def __init__(self, path: str, processor, infos: dict[str, GGUFTensorInfo]):
        self.path, self.processor, self.infos = path, processor, infos
        self.quantized: dict[str, nn.Module] = {}   # weight name -> QTensor made by a streamed forward

    def take_quantized(self, name: str, fmt) -> nn.Module | None:
        """The QTensor a streamed forward made of `name` in format `fmt`, once; None if it made none."""
        q = self.quantized.pop(name, None)
        return q if q is not None and q.fmt == fmt else None

    def names(self) -> set[str]:
        return set(self.infos)

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        with open(self.path, "rb") as file:
            return _read_tensor(file, self.infos[name], self.processor, shape)

    def fill_remaining(self, model: nn.Module) -> None:
        """Read every lazy weight still on the meta device into its module, for good."""
        for name in self.infos:
            owner, _, leaf = name.rpartition(".")
            w = model.get_submodule(owner)._parameters.get(leaf)
            if w is not None and w.is_meta:
                _assign(model, name, self.read(name, tuple(w.shape)))

    @contextlib.contextmanager
    def streamed(self, model: nn.Module, quantize=None):
        """Inside, a forward of `model` reads each lazy weight for its layer only. `quantize(name, weight)`
        -> a QTensor or None: what it returns is kept for `take_quantized`, so that convert() does not
        read the weight a second time."""
        handles = []
        for name, m in model.named_modules():
            if f"{name}.weight" in self.infos and getattr(m, "weight", None) is not None and m.weight.is_meta:
                handles.append(m.register_forward_pre_hook(self._fill_hook(f"{name}.weight")))
                handles.append(m.register_forward_hook(self._done_hook(f"{name}.weight", quantize)))
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
            for m in model.modules():
                _drop_read_weight(m)

    def _fill_hook(self, name: str):
        def fill(module, args):
            if module.weight.is_meta:
                w = nn.Parameter(self.read(name, tuple(module.weight.shape)), requires_grad=False)
                w._read_lazily = True
                module.weight = w
        return fill

    def _done_hook(self, name: str, quantize):
        def done(module, args, output):
            if quantize is not None and getattr(module.weight, "_read_lazily", False):
                q = quantize(name, module.weight)
                if q is not None:
                    self.quantized[name] = q
            _drop_read_weight(module)
        return done


def _drop_read_weight(module: nn.Module) -> None:
    """Put a weight that LazyWeights read back on the meta device (its memory freed)."""
    w = getattr(module, "weight", None)
    if getattr(w, "_read_lazily", False):
        module.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
        release_free_memory()   # reading the next layer's weight reuses no hole: give the pages back


def gguf_to_hf_names(model: nn.Module, architecture: str, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> parameter name, as transformers' `get_gguf_hf_weights_map` maps them (every
    submodule's relative names tried, the outermost module first), with gguf-py's table built once."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise ValueError(f"gguf-py does not know the architecture {architecture!r}")
    table = get_tensor_name_map(arch, n_layers)
    keys = list(model.state_dict().keys())
    mapping: dict[str, str] = {}
    for prefix, _ in model.named_modules():
        lead = prefix + "." if prefix else ""
        for full in keys:
            if not full.startswith(lead):
                continue
            name, dot, suffix = full[len(lead):].rpartition(".")
            if suffix not in ("weight", "bias"):
                name, dot, suffix = full[len(lead):], "", ""
            gguf_name = table.get_name(name)
            if gguf_name is not None:
                mapping.setdefault(gguf_name + dot + suffix, full)
    return mapping


def _read_tensor(file, info: GGUFTensorInfo, processor, shape: tuple[int, ...]) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor of `shape`, read from `file` a slice of rows at a time."""
    from gguf import dequantize
    rows = info.shape[0] if len(info.shape) > 1 else 1
    row_bytes = info.nbytes // rows
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(rows, -1)   # GGUF rows are the torch tensor's first dimension
    # llama's q and k rows are un-permuted across heads: those (small) tensors are processed whole
    whole = ".attn_q." in info.name or ".attn_k." in info.name or out.numel() * 4 <= SLICE_BYTES
    step = rows if whole else max(1, SLICE_BYTES // (flat.shape[1] * 4))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        raw = np.empty((n, row_bytes), dtype=np.uint8)   # a row's bytes (dequantize views float types)
        file.seek(info.offset + start * row_bytes)
        if file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
            raise ValueError(f"the GGUF file ends inside tensor {info.name}")
        part = dequantize(raw, info.qtype)
        if whole:
            part = processor.process(weights=part.reshape(info.shape), name=info.name).weights
        flat[start:start + n].copy_(torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32)).reshape(n, -1))
    return out


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
