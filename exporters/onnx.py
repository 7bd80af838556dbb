"""ONNX export of a converted (ternary) model, validated against PyTorch.

    result = export_onnx(model, "model.onnx", OnnxConfig(format="matmulnbits"))

1. `float_twin`: a copy of the converted model whose QLinear / QEmbedding / QRNN
   are plain float modules holding the dequantized weights, one Parameter per
   QTensor (tied and shared weights stay one Parameter, hence one initializer).
   QLinear becomes `x @ Wt` with Wt = W^T stored as [in, out], so the exported
   MatMul reads the initializer directly (no Transpose to constant-fold, which is
   what duplicates shared weights: pytorch #108342).
2. TorchScript export (`dynamo=False`) with dynamic batch and sequence axes and
   without constant folding (ONNX Runtime folds at load time, in memory).
3. `onnx_quant.quantize_graph` puts the codes back (MatMulNBits or
   DequantizeLinear on INT2/INT4/INT8), `dedup_initializers` merges identical ones.
4. `validate`: ONNX Runtime vs the converted PyTorch model at another batch size
   and sequence length; every output's shape and max |diff| against `atol`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import atomic_path
from tritpress.compressor.layers import QEmbedding, QLinear, QRNN, QTensor, layer_input, scaled_rows
from tritpress.compressor.modelio import (ModelIO, embedding_rows, forward_params, is_encoder_decoder, output_tensors,
                                          random_ids)
from tritpress.compressor.structure import set_submodule
from tritpress.compressor.transform import get_record

from .settings import (ACCURACY_LEVELS, FP16_RTOL, FP32_RTOL, INT8_ACT_MARGIN, INT8_ACT_RTOL, NBITS_FORMATS,  # re-exported:
                       ONNX_FORMATS, OnnxConfig, finite_absmax, fp32_atol)  # torch-free home of the settings

TORCHSCRIPT_MAX_OPSET = 20
EXTERNAL_DATA_BYTES = 2**31 - 2**26   # protobuf's 2 GB limit, with room for the graph itself
EXPORT_SHAPE = (2, 5)      # (batch, sequence) traced at export
VALIDATE_SHAPE = (3, 11)   # another (batch, sequence): checks the axes are really dynamic
EXPORT_PAST, VALIDATE_PAST = 3, 9   # KV-cache graph: cached tokens before the new ones


class OnnxValidationError(TritpressError):
    """ONNX Runtime's outputs differ from PyTorch's by more than atol (the file is kept)."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------- float twin

class MatMulLinear(nn.Module):
    """QLinear as exported: x @ Wt (+ b), Wt = dequantized W^T laid out [in, out]."""

    def __init__(self, wt: nn.Parameter, bias, act_bits):
        super().__init__()
        self.wt, self.bias, self.act_bits = wt, bias, act_bits

    def forward(self, x):
        y = torch.matmul(layer_input(x, self.act_bits), self.wt)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """[out, in], a view: model code that reads a Linear's `.weight` (T5 reads its dtype) traces."""
        return self.wt.t()


class TiedLinear(nn.Module):
    """A head tied to an embedding: reads the embedding's [vocab, dim] table (one initializer)."""

    def __init__(self, weight: nn.Parameter, bias, act_bits):
        super().__init__()
        self.weight, self.bias, self.act_bits = weight, bias, act_bits

    def forward(self, x):
        return F.linear(layer_input(x, self.act_bits), self.weight, self.bias)


class U8Embedding(nn.Module):
    """An int8 embedding whose table is stored as codes + 128 (uint8): the very bytes of the
    tied head's 8-bit MatMulNBits weight, so the rewrite lets both read one initializer."""

    def __init__(self, qweight: QTensor, padding_idx=None):
        super().__init__()
        self.register_buffer("table_u8", (qweight.codes.to(torch.int16) + 128).to(torch.uint8))
        self.register_buffer("scale", qweight.scale.clone())
        self.padding_idx = padding_idx

    def forward(self, ids):
        return scaled_rows(self.table_u8[ids].float() - 128.0, self.scale, ids)


class Multiplied(nn.Module):
    """An exported embedding whose rows a scaled embedding multiplies (QEmbedding.multiplier)."""

    def __init__(self, inner: nn.Module, multiplier: float):
        super().__init__()
        self.inner, self.multiplier = inner, multiplier

    def forward(self, ids):
        return self.inner(ids) * self.multiplier


def _float_rnn(q: QRNN, param: Callable) -> nn.Module:
    rnn = copy.deepcopy(q._template).to_empty(device="cpu")
    for n, _ in list(rnn.named_parameters()):
        setattr(rnn, n, param(q.qweights[n], "rows") if n in q.qweights else getattr(q, n))
    return rnn


def float_twin(model: nn.Module, fmt: str = "float") -> tuple[nn.Module, dict[int, tuple]]:
    """A copy of a converted model for export, and id(tensor) -> (QTensor, layout) for every
    dequantized weight (layout "t": stored transposed, "rows": as the QTensor; "table": the
    uint8 table of a U8Embedding). For `float` every weight is a float Parameter; otherwise
    embeddings keep their integer codes (Gather on int8: never a whole float table per run)."""
    if get_record(model) is None or not get_record(model).converted:
        raise TritpressError("ONNX export needs a converted model (compressor.convert or load_packed)")
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules(remove_duplicate=False))
    # QTensors read row-wise by an embedding: a head tied to one reads the same table
    rows = {id(m.qweight) for m in modules.values() if isinstance(m, QEmbedding)}
    params: dict[tuple, nn.Parameter] = {}
    origin: dict[int, tuple] = {}

    def param(qt: QTensor, layout: str) -> nn.Parameter:
        key = (id(qt), layout)
        if key not in params:
            w = qt.dequantize(torch.float32)
            p = nn.Parameter((w.t() if layout == "t" else w).contiguous(), requires_grad=False)
            params[key] = p
            origin[id(p)] = (qt, layout)
        return params[key]

    # int8 tables shared with a head: under matmulnbits the head is an 8-bit MatMulNBits and the
    # embedding gathers from the same uint8 bytes
    heads = {id(m.qweight) for m in modules.values() if isinstance(m, QLinear)}
    u8_tables = {q for q in rows & heads if fmt in NBITS_FORMATS} - {
        id(m.qweight) for m in modules.values() if isinstance(m, QEmbedding) and m.qweight.fmt.kind != "int8"}
    replaced: dict[int, nn.Module] = {}  # a module placed at several paths is replaced by one twin
    for name, m in modules.items():
        if not isinstance(m, (QLinear, QEmbedding, QRNN)) or not name:
            continue
        if id(m) not in replaced:
            tied = id(m.qweight) in rows if not isinstance(m, QRNN) else False
            if isinstance(m, QLinear) and (not tied or id(m.qweight) in u8_tables or fmt == "qgemm"):
                # qgemm: a head tied to an int8 table multiplies that table's codes, transposed at session load
                new = MatMulLinear(param(m.qweight, "t"), m.bias, m.act_bits)
            elif isinstance(m, QLinear):  # a QLinear reads the embedding's codes as they are
                new = TiedLinear(param(m.qweight, "rows"), m.bias, m.act_bits) if fmt == "float" else m
            elif isinstance(m, QEmbedding) and id(m.qweight) in u8_tables:
                new = U8Embedding(m.qweight, m.padding_idx)
                origin[id(new.table_u8)] = (m.qweight, "table")
            elif isinstance(m, QEmbedding) and fmt != "float":
                new = m  # its codes: what a qgemm head tied to it reads; stored at their bits (pack_embedding_codes)
                origin[id(m.qweight.codes)] = (m.qweight, "codes")
            elif isinstance(m, QEmbedding):
                new = nn.Embedding.from_pretrained(param(m.qweight, "rows"), freeze=True,
                                                   padding_idx=m.padding_idx)
                new.weight = param(m.qweight, "rows")  # from_pretrained wraps a new Parameter
            else:
                new = _float_rnn(m, param)
            if isinstance(m, QEmbedding) and m.multiplier != 1.0 and new is not m:
                new = Multiplied(new, m.multiplier)
            replaced[id(m)] = new
        set_submodule(twin, name, replaced[id(m)])
    return twin.eval(), origin


def quant_weights(twin: nn.Module, origin: dict[int, tuple], prefix: str = "") -> dict:
    """Initializer name (every alias) -> QuantWeight, in the layout the twin exports."""
    from .onnx_quant import CodesOf, QuantWeight, TableOf

    out = {}
    tensors = [*twin.named_parameters(remove_duplicate=False), *twin.named_buffers(remove_duplicate=False)]
    for name, p in tensors:
        if id(p) not in origin:
            continue
        qt, layout = origin[id(p)]
        if layout in ("table", "codes"):
            out[prefix + name] = TableOf(id(qt)) if layout == "table" else CodesOf(id(qt), qt.fmt.kind)
            continue
        codes, scale = qt.codes.numpy(), qt.scale.float().numpy()
        group = codes.shape[1] // scale.shape[1] if scale.ndim == 2 else 0
        out[prefix + name] = QuantWeight(codes=codes.T.copy() if layout == "t" else codes.copy(),
                                         scale=scale.copy() if group else scale.reshape(-1).copy(),
                                         axis=1 if layout == "t" else 0, kind=qt.fmt.kind, source=id(qt), group=group)
    return out


# ---------------------------------------------------------------- model IO

@dataclass
class Signature:
    """How the exported graph is called: input/output names and their dynamic axes."""

    io: ModelIO                  # how the model itself is called (compressor.modelio)
    vocab: int
    input_names: list
    output_names: list
    cache: tuple | None = None   # KV-cache graph: (layers, kv heads, head dim, cache kwarg name)
    past: int = 0                # cached tokens in the example inputs
    part: str | None = None      # a seq2seq model's "encoder" or "decoder" graph (None: the whole model)
    hidden: int = 0              # the decoder graph: width of the encoder_hidden_states it reads

    @property
    def seq_first(self) -> bool:
        return self.io.seq_first

    def inputs(self, batch: int, seq: int, seed: int = 0) -> tuple:
        g = torch.Generator().manual_seed(seed)
        ids = random_ids(self.vocab, batch, seq, g)
        if self.seq_first:
            ids = ids.t().contiguous()
        if not self.io.hf:
            return (ids,)
        if self.part == "decoder":  # the encoder's output for a source 2 tokens longer than the target
            hidden = torch.randn(batch, seq + 2, self.hidden, generator=g)
            return (ids, hidden, torch.ones(batch, seq + 2, dtype=torch.long))
        if self.cache:
            layers, heads, dim, _ = self.cache
            mask = torch.ones(batch, self.past + seq, dtype=torch.long)
            past = [torch.randn(batch, heads, self.past, dim, generator=g) for _ in range(2 * layers)]
            return (ids, mask, *past)
        return tuple(ids if n == "input_ids" else torch.ones_like(ids) for n in self.input_names)


class Exportable(nn.Module):
    """Positional tensors in, a tuple of tensors out: what torch.onnx.export traces."""

    def __init__(self, model: nn.Module, sig: Signature):
        super().__init__()
        self.model, self.sig = model, sig

    def forward(self, *inputs):
        if self.sig.cache:
            return self._forward_cached(*inputs)
        if self.sig.part == "encoder":
            ids, mask = inputs
            return (self.model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state,)
        if self.sig.part == "decoder":
            ids, hidden, mask = inputs
            out = self.model(decoder_input_ids=ids, encoder_outputs=(hidden,), attention_mask=mask, use_cache=False,
                             return_dict=True)
            return (out.logits,)
        if self.sig.io.hf:
            out = self.sig.io.call(self.model, dict(zip(self.sig.input_names, inputs)), return_dict=True)
            return tuple(out[k] for k in self.sig.output_names)
        return tuple(output_tensors(self.sig.io.call(self.model, *inputs)))

    def _forward_cached(self, ids, mask, *past):
        from transformers import DynamicCache

        layers, _, _, kwarg = self.sig.cache
        cache = DynamicCache()
        for i in range(layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = _call_cached(self.sig.io, self.model, ids, mask, **{kwarg: cache})
        return (out.logits, *_cache_tensors(out.past_key_values))


def _call_cached(io: ModelIO, model: nn.Module, ids, mask, **cache):
    """One incremental-decoding step: the new ids, the mask over past + new tokens, the cache."""
    return io.call(model, {"input_ids": ids, "attention_mask": mask}, use_cache=True, return_dict=True, **cache)


def _cache_tensors(cache) -> list:
    """[key 0, value 0, key 1, ...] of a transformers Cache."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for kv in cache for t in kv[:2]]  # legacy tuple of (key, value)


@torch.no_grad()
def signature(model: nn.Module, kv_cache: bool = False) -> Signature:
    """Input and output names of the exported graph (discovered by running the model once)."""
    vocab = embedding_rows(model)
    if vocab is None:
        raise TritpressError("ONNX export needs a model that takes token ids (no embedding found)")
    io = ModelIO.discover(model)
    if not io.hf:
        sig = Signature(io, vocab, ["input_ids"], [])
        n = len(_call(model, sig, *EXPORT_SHAPE))
        sig.output_names = ["output"] if n == 1 else [f"output_{i}" for i in range(n)]
        return sig
    params = forward_params(model)
    if kv_cache:
        return _cached_signature(model, io, vocab, params)
    names = ["input_ids"] + (["attention_mask"] if "attention_mask" in params else [])
    sig = Signature(io, vocab, names, [])
    out = io.call(model, dict(zip(names, sig.inputs(*EXPORT_SHAPE))), return_dict=True)
    sig.output_names = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
    return sig


SEQ2SEQ_PARTS = {"encoder": (["input_ids", "attention_mask"], ["last_hidden_state"]),
                 "decoder": (["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits"])}


@torch.no_grad()
def seq2seq_signature(model: nn.Module, part: str) -> Signature:
    """The encoder graph (source ids and mask -> its hidden states) or the decoder graph (target ids,
    the encoder's hidden states and the source mask -> logits) of an encoder-decoder model, the pair
    a generation loop runs (optimum's encoder_model / decoder_model, without a cache)."""
    names, outputs = SEQ2SEQ_PARTS[part]
    sig = Signature(ModelIO.discover(model), embedding_rows(model), list(names), list(outputs), part=part)
    ids = torch.zeros(1, 2, dtype=torch.long)
    sig.hidden = model.get_encoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.shape[-1]
    return sig


def _cached_signature(model: nn.Module, io: ModelIO, vocab: int, params) -> Signature:
    """Inputs input_ids, attention_mask (past + new tokens), past_key_values.{i}.key/value;
    outputs logits, present.{i}.key/value (optimum's names). Shapes found by running once."""
    if "use_cache" not in params or "attention_mask" not in params:
        raise TritpressError("--kv-cache needs a transformers decoder LM (its forward takes use_cache)")
    ids = torch.zeros(1, 2, dtype=torch.long)
    out = _call_cached(io, model, ids, torch.ones_like(ids))
    present = _cache_tensors(getattr(out, "past_key_values", None) or [])
    if getattr(out, "logits", None) is None or not present or any(t.dim() != 4 for t in present):
        raise TritpressError("--kv-cache needs a decoder LM returning logits and a [batch, heads, seq, dim] "
                             "key/value cache")
    layers, (_, heads, _, dim) = len(present) // 2, present[0].shape
    kwarg = "past_key_values" if "past_key_values" in params else "cache"
    kv = [f"{i}.{n}" for i in range(layers) for n in ("key", "value")]
    return Signature(io, vocab, ["input_ids", "attention_mask"] + [f"past_key_values.{k}" for k in kv],
                     ["logits"] + [f"present.{k}" for k in kv], cache=(layers, heads, dim, kwarg), past=EXPORT_PAST)


@torch.no_grad()
def _call(model: nn.Module, sig: Signature, batch: int, seq: int, seed: int = 0) -> tuple:
    return _call_with(model, sig, sig.inputs(batch, seq, seed))


@torch.no_grad()
def _call_with(model: nn.Module, sig: Signature, inputs: tuple) -> tuple:
    return Exportable(model, sig).eval()(*inputs)


def _dynamic_axes(model: nn.Module, sig: Signature) -> dict:
    """Input axes by construction; output axes found by running two input shapes."""
    b, s = EXPORT_SHAPE
    if sig.cache:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "logits": {0: "batch", 1: "sequence"}}
        axes.update({n: {0: "batch", 2: "past_sequence"} for n in sig.input_names[2:]})
        axes.update({n: {0: "batch", 2: "total_sequence"} for n in sig.output_names[1:]})
        return axes
    ab = {0: "sequence", 1: "batch"} if sig.seq_first else {0: "batch", 1: "sequence"}
    axes = {n: dict(ab) for n in sig.input_names}
    if sig.part == "decoder":
        axes.update({"decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
                     "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                     "encoder_attention_mask": {0: "batch", 1: "encoder_sequence"}})
    first = _call(model, sig, b, s)
    by_batch = _call(model, sig, b + 1, s)
    by_seq = _call(model, sig, b, s + 1)
    for name, t0, tb, ts in zip(sig.output_names, first, by_batch, by_seq):
        axes[name] = {i: ("batch" if tb.shape[i] != d else "sequence")
                      for i, d in enumerate(t0.shape) if tb.shape[i] != d or ts.shape[i] != d}
    return axes


# ---------------------------------------------------------------- export

def export_onnx(model: nn.Module, path, cfg: OnnxConfig | None = None, packed_path=None,
                log: Callable[[str], None] | None = None, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """Export a converted model to ONNX (atomically) and validate it. Returns the result dict;
    raises OnnxValidationError (file kept) when an output differs by more than atol. An
    encoder-decoder model becomes two graphs, `<stem>.encoder.onnx` and `<stem>.decoder.onnx`
    (`seq2seq_signature`); the result sums and lists both."""
    cfg = cfg or OnnxConfig()
    log = log or (lambda line: None)
    path = Path(path)
    model = model.eval()
    if not is_encoder_decoder(model) or cfg.kv_cache:
        return _export_graph(model, path, signature(model, cfg.kv_cache), cfg, packed_path, log, external_data_bytes)
    parts = {part: _export_graph(model, path.with_name(f"{path.stem}.{part}{path.suffix}"),
                                 seq2seq_signature(model, part), cfg, None, log, external_data_bytes)
             for part in SEQ2SEQ_PARTS}
    return _joined(parts, packed_path)


def _joined(parts: dict, packed_path) -> dict:
    """One result for a seq2seq model's graphs: paths and bytes summed, every output validated."""
    first = parts["encoder"]
    result = {**first, "path": " + ".join(r["path"] for r in parts.values()), "parts": parts,
              "file_bytes": sum(r["file_bytes"] for r in parts.values()),
              "inputs": [f"{p}:{n}" for p, r in parts.items() for n in r["inputs"]],
              "outputs": [f"{p}:{n}" for p, r in parts.items() for n in r["outputs"]]}
    if all("validation" in r for r in parts.values()):
        result["validation"] = {**first["validation"], "passed": all(r["validation"]["passed"] for r in parts.values()),
                                "outputs": [{**o, "name": f"{p}:{o['name']}"} for p, r in parts.items()
                                            for o in r["validation"]["outputs"]]}
    return _against_packed(result, packed_path)


def _against_packed(result: dict, packed_path) -> dict:
    """`result` with the packed checkpoint's bytes and the ONNX file's size ratio to them (given one)."""
    if packed_path is not None:
        packed = Path(packed_path).stat().st_size
        result.update(packed_bytes=packed, size_ratio_vs_packed=round(result["file_bytes"] / packed, 4))
    return result


def _export_graph(model: nn.Module, path: Path, sig: Signature, cfg: OnnxConfig, packed_path, log,
                  external_data_bytes: int) -> dict:
    from .onnx_quant import dedup_initializers, float16_weights, quantize_graph

    twin, origin = float_twin(model, cfg.format)
    proto = trace_to_onnx(twin, sig, min(cfg.opset, TORCHSCRIPT_MAX_OPSET))
    stats = {"matmulnbits": 0, "dequantize_linear": 0, "min_opset": 0}
    if cfg.format == "float" and cfg.float_dtype == "fp16":
        stats["float16_weights"] = float16_weights(proto, quant_weights(twin, origin, prefix="model."))
    elif cfg.format != "float":
        stats = quantize_graph(proto, quant_weights(twin, origin, prefix="model."), cfg.format, cfg.block_size,
                               cfg.accuracy_level, cfg.switch_weights)
    removed = dedup_initializers(proto)
    _set_opset(proto, stats.pop("min_opset"), cfg.opset)
    external = _save(proto, path, external_data_bytes)
    result = {"path": str(path), "format": cfg.format, "config": cfg.to_dict(),
              "file_bytes": _file_bytes(path), "external_data": external,
              "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
              "rewrites": stats, "deduplicated_initializers": removed,
              "inputs": sig.input_names, "outputs": sig.output_names}
    _against_packed(result, packed_path)
    log(f"wrote {path} ({result['file_bytes'] / 1e6:.2f} MB, format {cfg.format}"
        + (f", {result['size_ratio_vs_packed']:.2f}x the packed checkpoint" if packed_path else "") + ")")
    if cfg.validate:
        result["validation"] = validate(path, model, sig, cfg, log)
        if not result["validation"]["passed"]:
            raise OnnxValidationError(_failure_message(result), result)
    return result


def _failure_message(result: dict) -> str:
    problems = []
    for o in result["validation"]["outputs"]:
        if not o["shape_ok"]:
            problems.append(f"output {o['name']}: shape {o['onnx_shape']} != {o['torch_shape']}")
        elif o["max_abs_diff"] > o["atol"] or (not o["ok"] and "exact_atol" not in o):
            problems.append(f"output {o['name']}: max |ONNX - PyTorch| {o['max_abs_diff']:.3g} > atol {o['atol']:.3g}")
        elif not o["ok"]:
            problems.append(f"output {o['name']}: with fp32 compute max |ONNX - PyTorch| "
                            f"{o['exact_max_abs_diff']:.3g} > {o['exact_atol']:.3g}")
    if not problems:
        problems.append("output names differ from the PyTorch model's")
    return "ONNX validation failed: " + "; ".join(problems) + f" (file kept: {result['path']})"


def trace_to_onnx(model: nn.Module, sig: Signature, opset: int = TORCHSCRIPT_MAX_OPSET):
    """TorchScript export (no constant folding) of any float model -> ModelProto. Also how the
    fp32 baseline of the original model is exported (benchmarks/bench_onnx.py)."""
    import onnx

    wrapper = Exportable(model, sig).eval()
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "float.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(wrapper, sig.inputs(*EXPORT_SHAPE), str(traced), dynamo=False,
                                  opset_version=opset, do_constant_folding=False, input_names=sig.input_names,
                                  output_names=sig.output_names, dynamic_axes=_dynamic_axes(model, sig))
            except Exception as e:  # an op or control flow the TorchScript exporter cannot trace
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise TritpressError(f"torch.onnx.export could not trace {type(model).__name__}: "
                                     f"{type(e).__name__}: {first}") from e
        return onnx.load(str(traced))


def save_onnx(proto, path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> bool:
    """Write atomically (external data over 2 GB); True when the weights went to `<name>.data`."""
    return _save(proto, Path(path), external_data_bytes)


def _set_opset(proto, needed: int, requested: int) -> None:
    """Raise the default-domain opset when the rewrite used newer types (INT4: 21, INT2: 25)."""
    import onnx

    if not needed:
        return
    if requested < needed:
        raise TritpressError(f"this export needs opset >= {needed} (INT2/INT4 weights); got --opset {requested}")
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, requested)
    default = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    proto.ir_version = max(proto.ir_version, onnx.helper.find_min_ir_version_for(default))


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _save(proto, path: Path, external_data_bytes: int) -> bool:
    """Write atomically; weights go to `<name>.data` next to the file when over the 2 GB limit."""
    import onnx

    external = _initializer_bytes(proto) > external_data_bytes
    with atomic_path(path) as tmp:
        if external:
            data_name = path.name + ".data"
            if (path.parent / data_name).exists():
                (path.parent / data_name).unlink()  # save_model appends to an existing data file
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(tmp))
    return external


def _file_bytes(path: Path) -> int:
    data = path.parent / (path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ---------------------------------------------------------------- validation

def ort_session(path_or_bytes, threads: int | None = None, config: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    src = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _run_fp32_compute(path: Path, feeds: dict) -> list:
    """The same graph with its quantized MatMuls computed in fp32 (accuracy_level 0; qgemm: the folded
    int8 weight times its scale, by a float MatMul of the unquantized input)."""
    import onnx

    from .onnx_quant import qgemm_as_fp32

    proto = onnx.load(str(path))
    qgemm_as_fp32(proto.graph)
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    config = {"session.qdq_matmulnbits_accuracy_level": "0"}
    if _initializer_bytes(proto) < EXTERNAL_DATA_BYTES:
        return ort_session(proto.SerializeToString(), config=config).run(None, feeds)
    with tempfile.TemporaryDirectory() as tmp:
        _save(proto, Path(tmp) / "exact.onnx", 0)
        return ort_session(Path(tmp) / "exact.onnx", config=config).run(None, feeds)


@torch.no_grad()
def validate(path, model: nn.Module, sig: Signature, cfg: OnnxConfig, log: Callable[[str], None]) -> dict:
    """ONNX Runtime vs the converted PyTorch model at VALIDATE_SHAPE, output by output."""
    import onnxruntime as ort

    if sig.cache:  # another batch size, past length and number of new tokens than the trace
        sig = dataclasses.replace(sig, past=VALIDATE_PAST)
    inputs = sig.inputs(*VALIDATE_SHAPE, seed=1)
    feeds = {n: t.numpy() for n, t in zip(sig.input_names, inputs)}
    ref = [t.float().numpy() for t in _call_with(model, sig, inputs)]
    deviation = _int8_deviation(model, sig, inputs, ref, cfg) if cfg.int8_activations else None
    sess = ort_session(path)
    got = sess.run(None, feeds)
    exact = _run_fp32_compute(Path(path), feeds) if cfg.int8_activations else None
    names = [o.name for o in sess.get_outputs()]
    log(f"Validating ONNX model {path} (onnxruntime {ort.__version__}, inputs "
        f"{', '.join(f'{n}{list(t.shape)}' for n, t in zip(sig.input_names, inputs))}):")
    names_ok = names == sig.output_names
    log(f"\t-[{'✓' if names_ok else 'x'}] ONNX model output names match reference model ({', '.join(names)})")
    outputs = []
    for i, (name, r, g) in enumerate(zip(sig.output_names, ref, got)):
        o = _compare(name, r, g, cfg.atol_for(r, deviation[i] if deviation else 0.0))
        log(f"\t- Validating ONNX Model output \"{name}\":")
        log(f"\t\t-[{'✓' if o['shape_ok'] else 'x'}] {tuple(g.shape)} matches {tuple(r.shape)}")
        how = "" if cfg.atol is not None else _atol_origin(cfg, r, deviation[i] if deviation else 0.0)
        if deviation:
            o["int8_emulated_max_abs_diff"] = deviation[i]
        close = o["max_abs_diff"] <= o["atol"]
        log(f"\t\t-[{'✓' if close else 'x'}] {'all values close' if close else 'values not close enough'} "
            f"(atol: {o['atol']:.3g}{how}), max |ONNX - PyTorch| = {o['max_abs_diff']:.3g}")
        if exact is not None:
            e = _compare(name, r, exact[i], fp32_atol(r))
            o.update(exact_max_abs_diff=e["max_abs_diff"], exact_atol=e["atol"], ok=o["ok"] and e["ok"])
            exact_how = "int8 weights as float" if cfg.format == "qgemm" else "accuracy_level 0"
            log(f"\t\t-[{'✓' if e['ok'] else 'x'}] same graph with fp32 compute ({exact_how}): "
                f"max |ONNX - PyTorch| = {e['max_abs_diff']:.3g} (atol: {e['atol']:.3g})")
        outputs.append(o)
    passed = names_ok and len(outputs) == len(names) and all(o["ok"] for o in outputs)
    return {"onnxruntime": ort.__version__, "passed": passed, "outputs": outputs,
            "int8_activations": cfg.int8_activations,
            "input_shapes": {n: list(t.shape) for n, t in zip(sig.input_names, inputs)}}


def _atol_origin(cfg: OnnxConfig, reference: np.ndarray, deviation: float) -> str:
    """How the default atol was derived, for the validation log."""
    if not cfg.int8_activations:
        return f" = {FP32_RTOL:g} x max(1, max |PyTorch|)" if cfg.format != "float" or cfg.float_dtype == "fp32" \
            else f" = {FP16_RTOL:g} x max(1, max |PyTorch|), fp16 weights"
    if INT8_ACT_MARGIN * deviation > INT8_ACT_RTOL * float(np.abs(reference).max(initial=0.0)):
        return f" = {INT8_ACT_MARGIN:g} x {deviation:.3g}, PyTorch with int8-rounded MatMul inputs"
    return f" = {INT8_ACT_RTOL:g} x max |PyTorch|, int8 activations"


def dynamic_uint8(x: torch.Tensor) -> torch.Tensor:
    """x through ONNX DynamicQuantizeLinear and back: one uint8 step (max(x, 0) - min(x, 0)) / 255 and zero
    point over the whole tensor (what ORT's int8 GEMM path does to a MatMul input)."""
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    step = ((high - low) / 255.0).clamp(min=1e-30)
    zero = torch.round(-low / step).clamp(0, 255)
    return (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step


@contextlib.contextmanager
def int8_block_inputs(model: nn.Module, block_size: int, per_tensor_uint8: bool = False):
    """Within: every quantized Linear rounds its input as ORT's int8-activation MatMulNBits does (symmetric
    int8, one step max|x|/127 per block of `choose_block(K, block_size)` along K) or, `per_tensor_uint8`,
    as its DynamicQuantizeLinear does (`dynamic_uint8`): an emulation of that kernel's error; the
    validation's tolerance is derived from it."""
    from .onnx_quant import choose_block

    def per_block(x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        block = choose_block(k, block_size)
        pad = -k % block
        xb = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)
        step = xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127.0
        return (torch.round(xb / step).clamp(-127, 127) * step).reshape(*x.shape[:-1], k + pad)[..., :k]

    rounded = dynamic_uint8 if per_tensor_uint8 else per_block
    handles = [m.register_forward_pre_hook(lambda _, args: (rounded(args[0]), *args[1:]))
               for m in model.modules() if isinstance(m, QLinear)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _int8_deviation(model: nn.Module, sig: Signature, inputs: tuple, ref: list, cfg: OnnxConfig) -> list[float]:
    """Per output: max |PyTorch with int8-rounded MatMul inputs - PyTorch| (see int8_block_inputs)."""
    with int8_block_inputs(model, cfg.block_size, per_tensor_uint8=cfg.format == "qgemm"):
        emulated = [t.float().numpy() for t in _call_with(model, sig, inputs)]
    return [_finite_deviation(e, r) if e.shape == r.shape else 0.0 for e, r in zip(emulated, ref)]


def _finite_deviation(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| where both are finite (a trimmed vocabulary's -inf logits agree and are skipped)."""
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[both] - b[both]).max(initial=0.0))


def _compare(name: str, ref: np.ndarray, got: np.ndarray, atol: float) -> dict:
    shape_ok = tuple(ref.shape) == tuple(got.shape)
    # equal infinities agree (a trimmed vocabulary's dropped ids are -inf in both); any other
    # non-finite value is a failure
    same = (ref == got) if shape_ok else None
    with np.errstate(invalid="ignore"):  # inf - inf where they agree: masked out by `same`
        diff = float(np.abs(np.where(same, 0.0, ref - got)).max(initial=0.0)) if shape_ok else float("inf")
    ok = shape_ok and diff <= atol and bool((np.isfinite(got) | same).all())
    return {"name": name, "onnx_shape": list(got.shape), "torch_shape": list(ref.shape), "shape_ok": shape_ok,
            "max_abs_diff": diff, "atol": atol, "ok": ok}


def onnx_lines(result: dict) -> list[str]:
    """The report's ONNX section: file size against the packed checkpoint, validation per output."""
    size = f"ONNX ({result['format']}): {result['path']}, {result['file_bytes'] / 1e6:.2f} MB"
    if "packed_bytes" in result:
        size += (f" vs packed {result['packed_bytes'] / 1e6:.2f} MB "
                 f"({result['size_ratio_vs_packed']:.2f}x)")
    lines = [size]
    v = result.get("validation")
    if v:
        lines.append(f"validation with onnxruntime {v['onnxruntime']}: " + ("passed" if v["passed"] else "FAILED"))
        for o in v["outputs"]:
            line = (f"  {o['name']}: shape {o['onnx_shape']} {'ok' if o['shape_ok'] else 'MISMATCH'}, "
                    f"max |ONNX - PyTorch| {o['max_abs_diff']:.3g} (atol {o['atol']:.3g})")
            if "exact_max_abs_diff" in o:
                line += f"; fp32 compute {o['exact_max_abs_diff']:.3g} (atol {o['exact_atol']:.3g})"
            lines.append(line)
    return lines
