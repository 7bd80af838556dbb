"""Load a checkpoint in any supported format into an nn.Module.

Formats: a Hugging Face model folder or hub id, a GGUF file, a state_dict
(.pt/.bin/.safetensors) plus an HF config.json, a whole pickled nn.Module
(only with an explicit opt-in: unpickling can run arbitrary code), and the
bundled `pkg:NAME` models.
"""
from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bundled import resolve_bundled
from .errors import TritpressError, UnsafeCheckpointError
from .fileio import read_json_file

TRUST_FLAG = "--trust-pickle"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class SourceInfo:
    kind: str                       # hf | gguf | state_dict | module
    path: str
    model_class: str                # transformers class name, or module.qualname of a custom module
    hf_config: dict | None = None   # config.to_dict() for transformers models
    gguf_file: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_transformers(self) -> bool:
        return self.hf_config is not None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "model_class": self.model_class,
                "gguf_file": self.gguf_file, "notes": self.notes, "hf_config": self.hf_config}


@dataclass
class LoadedModel:
    model: nn.Module
    source: SourceInfo
    tokenizer: Any = None
    lazy: Any = None   # gguf_reader.LazyWeights: Linear weights left on meta, read when needed (load_model(lazy=True))


def _transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


def _hf_class(config, default: str = "AutoModel"):
    tf = _transformers()
    for arch in getattr(config, "architectures", None) or []:
        if hasattr(tf, arch):
            return getattr(tf, arch)
    return getattr(tf, default)


def build_from_config(config_dict: dict, class_name: str | None = None) -> nn.Module:
    """An HF model with random weights from a config dict (the skeleton weights are loaded into)."""
    tf = _transformers()
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise TritpressError("config has no 'model_type'; is it a Hugging Face config.json?")
    try:
        config = tf.AutoConfig.for_model(model_type, **config_dict)
    except ValueError as e:
        raise TritpressError(f"unsupported config: {e}") from e
    cls = getattr(tf, class_name) if class_name and hasattr(tf, class_name) else _hf_class(config)
    if cls.__name__.startswith("Auto"):
        model = cls.from_config(config)
    else:
        model = cls._from_config(config)
    return model.float().eval()


def _tokenizer(path: str, **kw):
    try:
        tok = _transformers().AutoTokenizer.from_pretrained(path, **kw)
    except Exception:  # a model without a tokenizer is still compressible
        return None
    # transformers may build an empty tokenizer for a folder that has no tokenizer files (for BART: a
    # RobertaTokenizer holding only its special tokens, which encodes any text to nothing)
    try:
        empty = len(tok) <= 1 or not tok("hello world", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode is no tokenizer
        empty = True
    return None if empty else tok


def _from_pretrained(path: str, gguf_file: str | None = None, lazy: bool = False) -> LoadedModel:
    tf = _transformers()
    try:
        weights = None
        if gguf_file:
            tokenizer, model, weights = _from_gguf(path, gguf_file, tf, lazy)
        else:
            tokenizer = _tokenizer(path)
            model = _hf_class(tf.AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise TritpressError(f"could not load {path!r}: {str(e).splitlines()[0]}") from e
    model = _as_float32(model).eval()
    config_dict = model.config.to_dict()
    # GGUF weights arrive dequantized to float32; the marker would make transformers treat the
    # model (and any skeleton built from this config) as quantized
    config_dict.pop("quantization_config", None)
    notes = []
    if gguf_file:
        notes.append(f"weights dequantized from GGUF {gguf_file}; a GGUF that was quantized (e.g. Q4_1) "
                     "carries that rounding into the 'original' baseline")
    source = SourceInfo("gguf" if gguf_file else "hf", str(path), type(model).__name__,
                        config_dict, gguf_file, notes)
    return LoadedModel(model, source, tokenizer, weights)


def _from_gguf(folder: str, gguf_file: str, tf, lazy: bool):
    """-> (tokenizer, model, LazyWeights or None). GGUF tensors dequantized one at a time into a meta
    skeleton (one float32 copy in memory); an architecture whose tensors transformers combines across the
    file goes through its own loader."""
    from .gguf_reader import load_gguf_model, metadata_parsed_once, read_gguf_header, tensor_processor
    path = os.path.join(folder, gguf_file)
    try:
        header = read_gguf_header(path)
    except (ValueError, OSError, KeyError, struct.error) as e:
        raise TritpressError(f"{path} is not a readable GGUF file: {e}") from e
    with metadata_parsed_once():  # the tokenizer first: its vocabulary's parse is freed before the weights
        tokenizer = _tokenizer(folder, gguf_file=gguf_file)
        config = tf.AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):   # dequantized to float32: no quantizer on the model
        del config.quantization_config
    processor = tensor_processor(header, config.to_dict())
    if processor is None:
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        return tokenizer, model, None
    return (tokenizer, *load_gguf_model(path, header, config, tf.AutoModelForCausalLM, processor, lazy))


def _as_float32(model: nn.Module) -> nn.Module:
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return model.float()


def _refuse_packed(path: Path) -> None:
    """A safetensors input must be a plain state_dict, readable, and not our own packed output."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            packed = "tritpress" in (f.metadata() or {})
    except Exception as e:
        raise TritpressError(f"{path} is not a readable safetensors file: {e}") from e
    if packed:
        raise TritpressError(f"{path} is already a tritpress packed checkpoint (inspect it with `compress info`)")


def _load_state_dict_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        _refuse_packed(path)
        return load_file(str(path))
    obj = _torch_load(path, trust_pickle=False)
    return _unwrap_state_dict(obj, path)


def _is_pickle_stream(path: Path) -> bool:
    """Parse (never execute) the pickle opcodes of a file, or of a torch zip's data.pkl."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(name)
        else:
            data = path.read_bytes()
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:
        return False


def _torch_load(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # a well-formed pickle that the safe unpickler refuses needs code to load; bytes that
        # are no pickle at all are just not a checkpoint
        if "unsupported global" not in str(e).lower() and not _is_pickle_stream(path):
            raise TritpressError(f"{path} is not a readable PyTorch checkpoint (invalid pickle data)") from e
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects (e.g. a whole nn.Module) and loading it can run "
                f"arbitrary code; if you trust this file, re-run with {TRUST_FLAG}") from e
    except Exception as e:  # torch's legacy/zip readers raise many types on garbage
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TritpressError(f"{path} is not a readable PyTorch checkpoint ({first})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # trusted, but still broken
        raise TritpressError(f"could not unpickle {path}: {str(e).splitlines()[0]}") from e


def _unwrap_state_dict(obj, path) -> dict:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise TritpressError(f"{path} is not a state_dict (a mapping of names to tensors)")


TASK_HEADS = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
              "AutoModelForTokenClassification", "AutoModelForQuestionAnswering")


def _best_fitting_class(config_dict: dict, state: dict) -> str | None:
    """A config without `architectures` does not say which head the weights belong to:
    pick the Auto class whose parameter names match the state_dict best."""
    if config_dict.get("architectures") or not config_dict.get("model_type"):
        return None  # named by the config, or not an HF config (build_from_config says so)
    tf = _transformers()
    config_dict = dict(config_dict)
    config = tf.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    keys, best, best_score = set(state), None, None
    for name in TASK_HEADS:
        try:
            with torch.device("meta"):  # names only: no memory, no init cost
                candidate = set(getattr(tf, name).from_config(config).state_dict())
        except Exception:  # this head does not exist for this model type
            continue
        score = len(candidate ^ keys)
        if best_score is None or score < best_score:
            best, best_score = name, score
    return best


def _first_mismatch(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if "size mismatch" in line]
    return lines[0] if lines else message.splitlines()[0]


def _load_state_dict_with_config(path: Path, config_path: str) -> LoadedModel:
    config_dict = read_json_file(config_path, "--config")
    state = _load_state_dict_file(path)
    model = build_from_config(config_dict, _best_fitting_class(config_dict, state))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise TritpressError(f"state_dict does not fit the model built from {config_path}: "
                             f"{_first_mismatch(str(e))}") from e
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in state}
    params = model.state_dict(keep_vars=True)
    missing = [k for k in result.missing_keys if id(params[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise TritpressError(
            f"state_dict does not fit the model built from {config_path}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")
    source = SourceInfo("state_dict", str(path), type(model).__name__, model.config.to_dict())
    tok_dir = Path(config_path).parent
    return LoadedModel(model.eval(), source, _tokenizer(str(tok_dir)))


def _load_module(path: Path, trust_pickle: bool) -> LoadedModel:
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, dict):
        raise TritpressError(f"{path} is a state_dict: pass the model's config with --config config.json")
    if not isinstance(obj, nn.Module):
        raise TritpressError(f"{path} holds a {type(obj).__name__}, not an nn.Module or a state_dict")
    model = _as_float32(obj).eval()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and hasattr(_transformers(), type(model).__name__):
        return LoadedModel(model, SourceInfo("module", str(path), type(model).__name__, cfg.to_dict()))
    qualname = f"{type(model).__module__}.{type(model).__qualname__}"
    return LoadedModel(model, SourceInfo("module", str(path), qualname))


def load_model(spec: str, config: str | None = None, trust_pickle: bool = False, lazy: bool = False) -> LoadedModel:
    """Load `spec` (a path, hub id or `pkg:NAME`) as an eval-mode float32 model. lazy=True: a GGUF
    source's Linear weights stay in the file until read (`LoadedModel.lazy`); other sources load whole."""
    if spec.startswith("pkg:"):
        folder, gguf = resolve_bundled(spec)
        return _from_pretrained(folder, gguf, lazy)
    path = Path(spec)
    if path.is_dir():
        if (path / "config.json").exists():
            return _from_pretrained(str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _from_pretrained(str(path), ggufs[0].name, lazy)
        raise TritpressError(f"{path} has no config.json (not a Hugging Face model folder)")
    if path.is_file():
        if path.suffix == ".gguf":
            return _from_pretrained(str(path.parent), path.name, lazy)
        if config is not None:
            return _load_state_dict_with_config(path, config)
        if path.suffix == ".safetensors":
            _refuse_packed(path)
            raise TritpressError(f"{path} is a state_dict: pass the model's config with --config config.json")
        return _load_module(path, trust_pickle)
    if os.sep not in spec and HUB_ID.match(spec) and "/" in spec:
        return _from_pretrained(spec)  # hub id, needs network
    raise TritpressError(f"no such file or folder: {spec}")
