"""Hugging Face BitNet export: a converted (packed) model -> a transformers folder that plain
`AutoModel*.from_pretrained` loads without tritpress (transformers itself asks for `accelerate`
to load any BitNet model).

    export_hf_bitnet(load_packed("model.tritpress.safetensors"), "model-hf", HfExportConfig())

The folder holds `config.json` (the source config plus `quantization_config`: quant_method
"bitnet", offline mode, the linear class), `model.safetensors` (ternary matrices in transformers'
2-bit layout, everything else float32) and the tokenizer.

What transformers' BitNet layers compute decides what can be written exactly:
- both layers quantize their input per token to int8 (absmax, like our --act-bits 8) and hold ONE
  scale per matrix: our ternary Linears must be per tensor with int8 activations;
- BitLinear: y = (int8(x) @ codes^T) / (weight_scale * input_scale) + bias, so weight_scale =
  1 / (gain * scale) (a shared occurrence's gain scales its input, which the per-token int8
  rounding passes through unchanged);
- AutoBitLinear (offline): y = (x_q @ codes^T + bias) * weight_scale, so weight_scale =
  gain * scale and the stored bias is bias / weight_scale.
Embeddings, the head and Linears kept out of the ternary stack are written dequantized in
float32; the Linears among them are listed in `modules_to_not_convert`. A trimmed input
embedding is expanded back to the full vocabulary (a dropped id reads the unknown token's row,
as in tritpress). Cross-layer ties are written once per layer: transformers has no such ties.
Refused with one line each: per-channel scales, float activations, a low-rank relaxation, a
trimmed output head (its -inf logits), GPT-2's Conv1D (transformers' BitNet replaces nn.Linear
only), recurrent layers, custom nn.Modules.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import atomic_dir
from tritpress.compressor.layers import QEmbedding, QLinear, QRNN
from tritpress.compressor.modelio import compare_outputs, example_inputs, run_model
from tritpress.compressor.share import SharedLinear
from tritpress.compressor.structure import in_stacks
from tritpress.compressor.transform import get_record
from tritpress.compressor.vocab import VOCAB_MAP, TrimmedEmbedding, TrimmedHead

from .converted import exportable_source, hf_name, meta_skeleton, occurrence_gain, source_tokenizer, state_keys_of
from .settings import HfExportConfig  # re-exported: torch-free home

HF_WEIGHTS = "model.safetensors"
TRITS_PER_BYTE = 4   # transformers' layout: 4 rows of 2-bit codes (+1) per uint8 row
ROUNDING_MARGIN = 2.0   # x tritpress's own float32-vs-float64 spread (see rounding_spread)


class HfExportError(TritpressError):
    """The model cannot be written as a transformers BitNet folder (or does not match once loaded)."""


# ------------------------------------------------------------------ transformers' 2-bit layout

def pack_rows_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes [out, in] -> uint8 [out / 4, in]: row r of byte-row j holds code row r * out/4 + j,
    in bits 2r..2r+1, stored as code + 1 (transformers.integrations.bitnet's layout)."""
    out = codes.shape[0]
    if out % TRITS_PER_BYTE:
        raise HfExportError(f"a ternary matrix with {out} rows: transformers' BitNet layout needs a multiple of 4")
    u = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(TRITS_PER_BYTE, out // TRITS_PER_BYTE, -1)
    return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


def unpack_rows_2bit(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_rows_2bit: uint8 [out / 4, in] -> int8 codes [out, in]."""
    parts = [((packed >> (2 * r)) & 3).to(torch.int8) - 1 for r in range(TRITS_PER_BYTE)]
    return torch.cat(parts, 0)


# ------------------------------------------------------------------ what can be written


def refusals(model: nn.Module, source: dict) -> list[str]:
    """Why the model cannot be written as a transformers BitNet folder (empty: it can)."""
    if not source.get("hf_config"):
        return [f"{source.get('model_class')} is not a transformers model: only transformers models have a "
                "BitNet form (export --onnx instead)"]
    stacks = get_record(model).structure.all_stacks
    why = []
    for name, m in model.named_modules():
        if isinstance(m, QRNN):
            why.append(f"{name}: recurrent layers have no transformers BitNet form (export --onnx instead)")
        elif isinstance(m, TrimmedHead):
            why.append(f"{name}: a trimmed output head (-inf logits for dropped ids) has no transformers form; "
                       "compress without --trim-vocab")
        elif isinstance(m, SharedLinear) and m.rank:
            why.append(f"{name}: a low-rank relaxation (--relax-rank {m.rank}) has no BitNet form; use --relax-rank 0")
        elif isinstance(m, QLinear) and m.qweight.fmt.kind == "ternary":
            why += _ternary_refusals(name, m, in_blocks=in_stacks(stacks, name))
    return why


def _ternary_refusals(name: str, m: QLinear, in_blocks: bool) -> list[str]:
    """What a ternary Linear lacks for transformers' BitNet layers (one scale per matrix, int8 activations)."""
    if not in_blocks:  # --head / --outside-blocks ternary: one scale per row and float activations, always
        return [f"{name}: a ternary layer outside the block stack (a scale per row, float activations) has no "
                "BitNet form; compress with --head / --outside-blocks int8 (or another non-ternary format)"]
    why = []
    if m.qweight.fmt.granularity != "tensor":
        why.append(f"{name}: per-channel scales (transformers' BitNet holds one scale per matrix); "
                   "compress with --granularity tensor")
    if m.act_bits != 8:
        why.append(f"{name}: float activations (transformers' BitNet layers quantize them to int8); "
                   "compress with --act-bits 8")
    return why


def _ternary_tensors(m: QLinear, gain: float, linear_class: str) -> dict[str, torch.Tensor]:
    """weight (packed codes), weight_scale [1] and bias of one ternary Linear, for `linear_class`."""
    scale = float(m.qweight.scale.reshape(-1)[0]) * gain
    if scale == 0.0:  # an all-zero matrix: any scale gives the same (zero) product
        scale = 1.0
    out = {"weight": pack_rows_2bit(m.qweight.codes),
           "weight_scale": torch.tensor([1.0 / scale if linear_class == "bitlinear" else scale])}
    if m.bias is not None:
        bias = m.bias.detach().float()
        out["bias"] = bias if linear_class == "bitlinear" else bias / scale
    return out


def _float_weight(m: nn.Module, name: str, modules: dict[str, nn.Module]) -> torch.Tensor:
    """The float32 table of a QLinear / QEmbedding (a trimmed embedding expanded to the full vocabulary)."""
    w = m.qweight.dequantize(torch.float32) * occurrence_gain(name, modules)
    parent = modules.get(name.rpartition(".")[0])
    if isinstance(parent, TrimmedEmbedding) and name.endswith(".table"):
        w = parent.expand(w)
    return w.contiguous()


def _refuse_conv1d(ternary: list[str], skeleton: nn.Module) -> None:
    names = [n for n in ternary if not isinstance(skeleton.get_submodule(n), nn.Linear)]
    if names:
        kind = type(skeleton.get_submodule(names[0])).__name__
        raise HfExportError(f"{names[0]} (and {len(names) - 1} more) is a {kind} in {type(skeleton).__name__}: "
                            "transformers' BitNet replaces nn.Linear layers only (export --onnx instead)")


def _refuse_kept_float(ternary: list[str], skeleton: nn.Module) -> None:
    names = sorted(set(ternary) & kept_in_fp32(skeleton))
    if names:
        leaf = names[0].rpartition(".")[2]
        raise HfExportError(f"{names[0]} (and {len(names) - 1} more) is ternary, but {type(skeleton).__name__} keeps "
                            f"'{leaf}' layers float (_keep_in_fp32_modules), so transformers' BitNet would not run it "
                            f"as tritpress does; compress with --exclude '\\.{leaf}\\b' to leave them float")


def tied_aliases(skeleton: nn.Module) -> set[str]:
    """Names transformers ties to an earlier tensor (e.g. lm_head.weight = the embedding): its own
    save_pretrained writes only the first, and from_pretrained ties the others again."""
    first: dict[int, str] = {}
    state = skeleton.state_dict(keep_vars=True)
    for key, t in state.items():
        first.setdefault(id(t), key)
    return {key for key, t in state.items() if first[id(t)] != key}


def kept_in_fp32(skeleton: nn.Module) -> set[str]:
    """The Linears the model class keeps float whatever the quantization (`_keep_in_fp32_modules`: T5's
    `wo`): transformers makes no BitNet layer of them."""
    names = set(getattr(skeleton, "_keep_in_fp32_modules", None) or []) | \
        set(getattr(skeleton, "_keep_in_fp32_modules_strict", None) or [])
    return {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and names & set(n.split("."))}


def hf_state(model: nn.Module, linear_class: str, aliases: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors by transformers name, names of the ternary Linears); names in `aliases` are not computed."""
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors, ternary, done = {}, [], set()
    for name, m in modules.items():
        if not isinstance(m, (QLinear, QEmbedding)):
            continue
        hf = hf_name(name, modules)
        done |= state_keys_of(name, m)
        if isinstance(m, QLinear) and m.qweight.fmt.kind == "ternary":
            tensors.update({f"{hf}.{k}": t for k, t in _ternary_tensors(m, occurrence_gain(name, modules), linear_class).items()})
            ternary.append(hf)
            continue
        if f"{hf}.weight" not in aliases:
            tensors[f"{hf}.weight"] = _float_weight(m, name, modules)
        if isinstance(m, QLinear) and m.bias is not None and f"{hf}.bias" not in aliases:
            tensors[f"{hf}.bias"] = m.bias.detach().float().clone()
    for key, t in model.state_dict(keep_vars=True).items():
        leaf = key.rpartition(".")[2]
        # a gain is folded into the scale; the kept ids and the dropped-id map into the expanded table
        if key in done or leaf == "gain" or leaf in VOCAB_MAP:
            continue
        owner = key.rpartition(".")[0]
        hf_key = hf_name(owner, modules) + "." + leaf if owner else leaf
        if hf_key not in aliases:
            tensors[hf_key] = t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
            if leaf == "weight" and isinstance(modules.get(owner), nn.Linear):  # a shared float Linear: its gain
                tensors[hf_key] *= occurrence_gain(owner, modules)
    return tensors, ternary


def check_names(tensors: dict, skeleton: nn.Module, aliases: set[str]) -> None:
    """Every name written is one the model loads (or a BitNet weight_scale), and none it needs is missing."""
    state = skeleton.state_dict(keep_vars=True)
    unknown = [k for k in tensors if (k not in state or k in aliases) and not k.endswith(".weight_scale")]
    missing = [k for k in state if k not in aliases and k not in tensors]
    if unknown or missing:
        raise HfExportError(f"the converted model does not map onto {type(skeleton).__name__}: "
                            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unknown)} unknown "
                            f"(e.g. {unknown[:2]})")


def float_linears(skeleton: nn.Module, ternary: list[str]) -> list[str]:
    """The nn.Linear layers written float, as `modules_to_not_convert` patterns (transformers reads
    each as a regex from the start of a module path, or as a suffix)."""
    tern = set(ternary)
    return [re.escape(n) for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in tern]


def hf_config(source: dict, cfg: HfExportConfig, kept_float: list[str]) -> dict:
    config = dict(source["hf_config"])
    config["architectures"] = [source["model_class"]]
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": cfg.linear_class,
                                     "quantization_mode": "offline", "modules_to_not_convert": sorted(kept_float),
                                     "use_rms_norm": False}
    return config


def load_hf_bitnet(folder, model_class: str) -> nn.Module:
    """The folder as transformers loads it (torch.compile of its BitNet kernels off: same arithmetic,
    no minutes-long compile on a CPU)."""
    import transformers

    cls = getattr(transformers, model_class, None) or transformers.AutoModel
    with torch._dynamo.config.patch(disable=True):
        return cls.from_pretrained(str(folder), dtype=torch.float32).eval()


def _max_rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    finite = torch.isfinite(ref) & torch.isfinite(got)
    scale = float(ref[finite].abs().max()) if bool(finite.any()) else 1.0
    return float((ref - got)[finite].abs().max()) / max(scale, 1e-12) if bool(finite.any()) else 0.0


@torch.no_grad()
def rounding_spread(model: nn.Module, inputs, ref: torch.Tensor) -> float:
    """max relative |float64 - float32| of tritpress's own output: with int8 activations a last-bit change
    of a layer's input can move a value across a rounding step, and a deep model carries that on (SmolLM2:
    ~5 % of the logits' range), so another implementation of the same arithmetic differs by as much."""
    wide = copy.deepcopy(model).double()
    return _max_rel(run_model(wide, inputs), ref)


@torch.no_grad()
def compare_hf(model: nn.Module, hf_model: nn.Module, tokenizer, cfg: HfExportConfig) -> dict:
    """tritpress vs transformers on the example input: max relative difference (allowed: --hf-rtol, or
    ROUNDING_MARGIN x tritpress's own float32-vs-float64 spread when that is larger) and top-1 agreement."""
    inputs = example_inputs(model, tokenizer)
    ref = run_model(model, inputs)
    with torch._dynamo.config.patch(disable=True):
        got = run_model(hf_model, inputs)
    result = compare_outputs(ref, got)
    result["max_rel_diff"] = _max_rel(ref, got)
    result["top1_agreement"] = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    result["rounding_spread"] = rounding_spread(model, inputs, ref) if result["max_rel_diff"] > cfg.rtol else None
    result["allowed"] = max(cfg.rtol, ROUNDING_MARGIN * (result["rounding_spread"] or 0.0))
    result["passed"] = result["max_rel_diff"] <= result["allowed"]
    return result


def _check_loadable() -> None:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise HfExportError("checking the export loads it with transformers, which needs accelerate for BitNet "
                            "models: pip install accelerate (or --no-hf-validate)")


def export_hf_bitnet(model: nn.Module, out, cfg: HfExportConfig | None = None, source: dict | None = None,
                     log=lambda line: None) -> dict:
    """Write `model` (converted, e.g. load_packed's) as a transformers BitNet folder at `out`
    (atomically: no partial folder on failure) and, with cfg.validate, load it back with
    from_pretrained and compare. `source`: where the model came from (a SourceInfo, or the
    `source` entry of a packed file's metadata: `read_metadata(path)["source"]`)."""
    cfg = cfg or HfExportConfig()
    source = exportable_source(model, source, refusals, HfExportError, "a transformers BitNet model")
    if cfg.validate:
        _check_loadable()
    skeleton = meta_skeleton(source)
    aliases = tied_aliases(skeleton)
    tensors, ternary = hf_state(model, cfg.linear_class, aliases)
    _refuse_conv1d(ternary, skeleton)
    _refuse_kept_float(ternary, skeleton)
    check_names(tensors, skeleton, aliases)
    tokenizer = source_tokenizer(source, cfg, HfExportError)
    with atomic_dir(out) as tmp:
        result = _write(tmp, tensors, hf_config(source, cfg, float_linears(skeleton, ternary)), tokenizer)
        result.update(ternary_linears=len(ternary), linear_class=cfg.linear_class,
                      tied_across_layers=_cross_layer_ties(model))
        log(f"wrote {len(tensors)} tensors ({len(ternary)} ternary Linears as {cfg.linear_class}), "
            f"{result['bytes']:,} bytes")
        if result["tied_across_layers"]:
            log(f"{result['tied_across_layers']} cross-layer tied matrices are written once per layer "
                "(transformers has no cross-layer ties)")
        if cfg.validate:
            result["validation"] = compare_hf(model, load_hf_bitnet(tmp, source["model_class"]), tokenizer, cfg)
            _log_validation(result["validation"], log)
            v = result["validation"]
            if not v["passed"]:
                raise HfExportError(f"the transformers model differs from tritpress's: max relative difference "
                                    f"{v['max_rel_diff']:.2e} > {v['allowed']:.2e}")
    result["path"] = str(out)
    return result


def _cross_layer_ties(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, SharedLinear)) - \
        len({id(m.inner.qweight) for m in model.modules() if isinstance(m, SharedLinear)
             and isinstance(m.inner, QLinear)})


def _log_validation(v: dict, log) -> None:
    mark = "OK" if v["passed"] else "FAIL"
    spread = "" if v["rounding_spread"] is None else \
        f"; tritpress's own float32 vs float64: {v['rounding_spread']:.2e}"
    log(f"transformers from_pretrained vs tritpress: max relative difference {v['max_rel_diff']:.2e} "
        f"(allowed {v['allowed']:.2e}{spread}), top-1 agreement {100 * v['top1_agreement']:.2f} %  {mark}")


def _write(folder: Path, tensors: dict, config: dict, tokenizer) -> dict:
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / HF_WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return {"bytes": (folder / HF_WEIGHTS).stat().st_size, "tokenizer": tokenizer is not None,
            "modules_to_not_convert": config["quantization_config"]["modules_to_not_convert"]}
