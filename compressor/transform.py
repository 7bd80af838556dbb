"""`prepare` (model -> fake-quant, trainable) and `convert` (-> real codes and scales).

    model = prepare(model, TernaryConfig())   # trainable, weights stay float
    ...fine-tune...
    model = convert(model)                    # QLinear / QEmbedding / QRNN hold codes + scales

Both transform the model in place and return it. Ties survive: modules that
share a weight Parameter share one fake-quant Parameter and one QTensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FLOAT_DTYPES, TernaryConfig
from .layers import (FakeQuantEmbedding, FakeQuantLinear, FakeQuantRNN, QEmbedding, QLinear, QRNN,
                     QTensor, WeightFormat)
from .memory import release_free_memory
from .settings import INT_FORMATS
from .structure import (ModelStructure, default_granularity, discover, is_conv1d, lookup_multiplier, rnn_weight_names,
                        set_submodule)

TRIM_BYTES = 8 << 20    # convert() hands freed float weights back to the OS after every this many bytes

RECORD_ATTR = "tritpress"


@dataclass
class QuantRecord:
    """What prepare/convert did, kept on the model (`model.tritpress`) for packing and reports."""

    config: TernaryConfig
    structure: ModelStructure
    formats: dict[str, WeightFormat] = field(default_factory=dict)   # module name -> weight format
    sources: dict[str, str] = field(default_factory=dict)            # module name -> original class
    converted: bool = False

    def module_map(self, model: nn.Module) -> dict:
        """JSON-able description of every replaced module, enough to rebuild it on load."""
        out = {}
        for name, fmt in self.formats.items():
            m = model.get_submodule(name)
            entry = {"type": type(m).__name__, "source": self.sources[name], "format": fmt.to_dict()}
            if isinstance(m, QLinear):
                entry.update(shape=list(m.qweight.codes.shape), bias=m.bias is not None, act_bits=m.act_bits)
            elif isinstance(m, QEmbedding):
                entry.update(shape=list(m.qweight.codes.shape), padding_idx=m.padding_idx, multiplier=m.multiplier)
            elif isinstance(m, QRNN):
                entry.update(weights={n: list(q.codes.shape) for n, q in m.qweights.items()})
            elif not fmt.is_float:
                raise RuntimeError(f"{name} is not converted; call convert() before packing")
            out[name] = entry
        return out


def get_record(model: nn.Module) -> QuantRecord | None:
    return getattr(model, RECORD_ATTR, None)


def _set_record(model: nn.Module, record: QuantRecord) -> None:
    object.__setattr__(model, RECORD_ATTR, record)


def layer_formats(structure: ModelStructure, cfg: TernaryConfig) -> dict[str, WeightFormat]:
    """Decide each layer's weight format from its role."""

    def fmt(kind: str, granularity: str) -> WeightFormat:
        kind = cfg.storage_format(kind)
        group = cfg.group_size if kind in INT_FORMATS else 0
        return WeightFormat(kind, cfg.method, granularity, cfg.scale_dtype, group)

    # embeddings and the head are ternarized per row (TernaryBERT does so for embeddings)
    by_role = {"block": fmt("ternary", cfg.granularity), "outside": fmt(cfg.outside_blocks, cfg.granularity),
               "embedding": fmt(cfg.embedding, "channel"), "head": fmt(cfg.head, "channel")}
    formats = {layer.name: by_role[layer.role] for layer in structure.layers}
    if structure.head and structure.head_tied_to:
        # one tensor, one format: a tied head is stored as its embedding
        formats[structure.head] = formats[structure.head_tied_to]
    return formats


def _plan(model: nn.Module, config: TernaryConfig | None) -> tuple[TernaryConfig, ModelStructure, dict]:
    """-> (the config with granularity resolved, the structure, each layer's WeightFormat)."""
    cfg = config or TernaryConfig()
    if cfg.granularity == "auto":  # resolved once: the record (and the packed file) holds the choice
        cfg = dataclasses.replace(cfg, granularity=default_granularity(model))
    structure = discover(model, cfg.exclude)
    return cfg, structure, layer_formats(structure, cfg)


def layer_quantizer(model: nn.Module, config: TernaryConfig | None = None):
    """(weight name, float weight) -> the QTensor convert(model, config) will make of it, or None for a
    weight it keeps in float: lets a pass that reads the weights anyway (a lazily loaded model's forward)
    quantize them on the way (gguf_reader.LazyWeights.streamed)."""
    formats = _plan(model, config)[2]

    def quantize(name: str, weight: torch.Tensor) -> QTensor | None:
        fmt = formats.get(name.rpartition(".")[0]) if name.endswith(".weight") else None
        return None if fmt is None or fmt.is_float else QTensor.from_float(weight, fmt)
    return quantize


def prepare(model: nn.Module, config: TernaryConfig | None = None) -> nn.Module:
    """Swap quantizable layers for fake-quant versions (in place)."""
    if get_record(model) is not None:
        raise ValueError("model is already prepared")
    cfg, structure, formats = _plan(model, config)
    record = QuantRecord(cfg, structure)
    new_params: dict[int, nn.Parameter] = {}  # id(original weight) -> parameter used after prepare

    def linear_weight(m):
        key = id(m.weight)
        if key not in new_params:
            w = m.weight.detach().t().contiguous() if is_conv1d(m) else None
            new_params[key] = nn.Parameter(w, requires_grad=m.weight.requires_grad) if w is not None else m.weight
        return new_params[key]

    for layer in structure.layers:
        fmt = formats[layer.name]
        m = model.get_submodule(layer.name)
        record.sources[layer.name] = type(m).__name__
        record.formats[layer.name] = fmt
        if fmt.is_float:
            continue  # stored as a float dtype: nothing to simulate beyond rounding at convert
        if layer.kind in ("linear", "conv1d"):
            bias = m.bias
            new = FakeQuantLinear(linear_weight(m), bias, fmt, cfg.act_bits if layer.role == "block" else None)
        elif layer.kind == "embedding":
            new = FakeQuantEmbedding(m, fmt, lookup_multiplier(m))
        else:
            new = FakeQuantRNN(m, fmt)
        set_submodule(model, layer.name, new)
    _set_record(model, record)
    return model


def set_lambda(model: nn.Module, lam: float) -> None:
    """Quantization warm-up factor for every fake-quant module (0 = float, 1 = fully quantized)."""
    for m in model.modules():
        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantRNN)):
            m.lam = float(lam)


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Groups of state_dict keys that are the same tensor (tied or shared weights)."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    return list(groups.values())


def qtensor_formats(model: nn.Module) -> dict[str, WeightFormat]:
    """state_dict key prefix of every QTensor (alias included) -> its format."""
    return {name: m.fmt for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QTensor)}


def storage_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """state_dict key -> dtype it is stored in, for every float tensor (QTensor scales included)."""
    record = get_record(model)
    default = FLOAT_DTYPES[record.config.float_dtype]
    override = {f"{n}.weight": FLOAT_DTYPES[f.kind] for n, f in record.formats.items() if f.is_float}
    override.update({f"{n}.scale": FLOAT_DTYPES[f.scale_dtype] for n, f in qtensor_formats(model).items()})
    return {key: override.get(key, default)
            for key, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}


@torch.no_grad()
def convert(model: nn.Module, config: TernaryConfig | None = None, weights=None) -> nn.Module:
    """Fake-quant model (or a plain one, post-training) -> real ternary model, in place. `weights`
    (gguf_reader.LazyWeights) reads the Linear weights a lazily loaded model left on the meta device,
    one layer at a time: each is quantized and dropped before the next is read."""
    if get_record(model) is None:
        prepare(model, config)
    record = get_record(model)
    if record.converted:
        return model
    qtensors: dict[int, QTensor] = {}  # id(weight parameter) -> QTensor, keeps ties
    dropped = 0  # float bytes replaced since the heap was last trimmed

    def qt(name: str, w: nn.Parameter, fmt: WeightFormat) -> QTensor:
        if id(w) not in qtensors:
            lazy = w.is_meta and weights is not None   # the weight is still in the checkpoint file
            made = weights.take_quantized(f"{name}.weight", fmt) if lazy else None
            if made is None:
                made = QTensor.from_float(weights.read(f"{name}.weight", tuple(w.shape)) if lazy else w, fmt)
            qtensors[id(w)] = made
        return qtensors[id(w)]

    for name in _conversion_order(model, [n for n, f in record.formats.items() if not f.is_float]):
        fmt = record.formats[name]
        m = model.get_submodule(name)
        if isinstance(m, FakeQuantLinear):
            bias = nn.Parameter(m.bias.detach().clone()) if m.bias is not None else None
            new = QLinear(qt(name, m.weight, fmt), bias, m.act_bits)
        elif isinstance(m, FakeQuantEmbedding):
            new = QEmbedding(qt(name, m.weight, fmt), m.padding_idx, m.multiplier)
        else:
            rnn = m.rnn
            new = QRNN(rnn, {n: qt(f"{name}.rnn.{n}", getattr(rnn, n), fmt) for n in rnn_weight_names(rnn)})
        set_submodule(model, name, new)
        dropped += sum(p.numel() * p.element_size() for p in m.parameters(recurse=True))
        if dropped > TRIM_BYTES:  # the float weights just dropped: converting in place never holds two copies
            release_free_memory()
            dropped = 0
    if weights is not None:  # layers kept in float (excluded, or a float format) read theirs now
        weights.fill_remaining(model)
    record.converted = True
    hold_ties(model)
    # round every remaining float tensor to its storage dtype, so that the packed
    # checkpoint reloads to exactly this model
    dtypes = storage_dtypes(model)
    for key, t in model.state_dict(keep_vars=True).items():
        if key in dtypes:
            t.data = t.data.to(dtypes[key]).to(t.dtype)
    return model


def _conversion_order(model: nn.Module, names: list[str]) -> list[str]:
    """`names` with the layers that share one weight (a head tied to its embedding) next to each other:
    the float weight is dropped as soon as the last of them is converted, not at the end."""
    groups: dict[object, list[str]] = {}
    for name in names:
        w = getattr(model.get_submodule(name), "weight", None)
        groups.setdefault(id(w) if isinstance(w, torch.Tensor) else name, []).append(name)
    return [name for group in groups.values() for name in group]


def hold_ties(model: nn.Module) -> None:
    """transformers' tie_weights() re-ties an output head to its input embedding through their
    float `.weight` parameters, which quantized layers no longer have (lm-eval's HFLM calls it
    on any model it is given, and failed). A converted model already holds one QTensor for both,
    so on it tie_weights does nothing."""
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights = _ties_already_held


def _ties_already_held(*args, **kwargs) -> None:
    return None


def build_empty(model: nn.Module, module_map: dict) -> None:
    """Replace the layers named in a packed checkpoint's module map by empty converted
    modules of the right shapes (used when loading a packed checkpoint)."""
    for name, entry in module_map.items():
        fmt = WeightFormat(**entry["format"])
        if fmt.is_float:
            continue
        if entry["type"] == "QLinear":
            bias = nn.Parameter(torch.zeros(entry["shape"][0])) if entry["bias"] else None
            new = QLinear(QTensor.empty(entry["shape"], fmt), bias, entry["act_bits"])
        elif entry["type"] == "QEmbedding":
            new = QEmbedding(QTensor.empty(entry["shape"], fmt), entry["padding_idx"], entry.get("multiplier", 1.0))
        elif entry["type"] == "QRNN":
            rnn = model.get_submodule(name)
            new = QRNN(rnn, {n: QTensor.empty(s, fmt) for n, s in entry["weights"].items()})
        else:
            raise ValueError(f"unknown module type {entry['type']!r} for {name}")
        set_submodule(model, name, new)
