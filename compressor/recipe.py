"""Recipes: the pipeline's configuration as a TOML or YAML file.

    model = "pkg:all-MiniLM-L6-v2"
    out = "runs/minilm"

    [quant]
    method = "absmean"
    embedding = "int4"

Every key is a field of `CompressConfig` ([quant]: `TernaryConfig`); flags given
on the command line override the recipe."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .config import TernaryConfig
from .errors import TritpressError
from .pipeline import CompressConfig


def read_recipe(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TritpressError(f"no such recipe file: {path}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml  # optional: only needed for YAML recipes
            data = yaml.safe_load(text) or {}
        else:
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(text)
    except ImportError as e:
        raise TritpressError(f"reading {p.suffix} recipes needs {e.name}: pip install pyyaml") from e
    except Exception as e:
        raise TritpressError(f"cannot parse recipe {path}: {e}") from e
    if not isinstance(data, dict):
        raise TritpressError(f"recipe {path} must be a table of settings")
    return data


def build_config(recipe: dict, overrides: dict, quant_overrides: dict) -> CompressConfig:
    """Recipe values, then explicitly given flags (None = not given)."""
    recipe = dict(recipe)
    quant = dict(recipe.pop("quant", {}) or {})
    quant.update({k: v for k, v in quant_overrides.items() if v is not None})
    top = {**recipe, **{k: v for k, v in overrides.items() if v is not None}}
    fields = {f.name for f in dataclasses.fields(CompressConfig)} - {"quant"}
    unknown = set(top) - fields
    if unknown:
        raise TritpressError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
    if "model" not in top:
        raise TritpressError("no MODEL given (argument or `model = ...` in the recipe)")
    try:
        return CompressConfig(quant=TernaryConfig.from_dict(quant), **top)
    except (TypeError, ValueError) as e:
        raise TritpressError(f"invalid setting: {e}") from e


def dump_recipe(cfg: CompressConfig) -> str:
    """A TOML recipe that reproduces `cfg` (every default spelled out)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name != "quant" and v is not None:
            lines.append(f"{f.name} = {value(v)}")
    lines.append("\n[quant]")
    for k, v in cfg.quant.to_dict().items():
        if v is not None:
            lines.append(f"{k} = {value(v)}")
    return "\n".join(lines) + "\n"
