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

from tritpress.analyzers.settings import EvalConfig
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import read_text_file
from tritpress.compressor.settings import SharingConfig, TernaryConfig, TrainConfig
from tritpress.exporters.settings import OnnxConfig

from .config import CompressConfig  # the settings alone: reading a recipe (and --help) imports no torch

SECTIONS = {"quant": TernaryConfig, "train": TrainConfig, "eval": EvalConfig, "onnx": OnnxConfig,
            "sharing": SharingConfig}


def read_recipe(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TritpressError(f"no such recipe file: {path}")
    text = read_text_file(p, "recipe")
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


def section_config(cls, values: dict, name: str):
    """The dataclass of one recipe table; unknown keys are refused by name."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - fields
    if unknown:
        raise TritpressError(f"unknown [{name}] settings: {', '.join(sorted(unknown))}")
    return cls(**values)


def build_config(recipe: dict, flags: dict[str, dict]) -> CompressConfig:
    """Recipe values, then the flags given on the command line: {table: {key: value}}, where
    table "" holds the top-level keys (model, out, ...)."""
    recipe = dict(recipe)
    recipe.pop("search", None)  # `compress search`'s own table (SearchConfig): one recipe serves both commands
    sections = {name: {**(recipe.pop(name, {}) or {}), **flags.get(name, {})} for name in SECTIONS}
    top = {**recipe, **flags.get("", {})}
    fields = {f.name for f in dataclasses.fields(CompressConfig)} - set(SECTIONS)
    unknown = set(top) - fields
    if unknown:
        raise TritpressError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
    if "model" not in top:
        raise TritpressError("no MODEL given (argument or `model = ...` in the recipe)")
    try:
        built = {name: section_config(cls, sections[name], name) for name, cls in SECTIONS.items()}
        return CompressConfig(**built, **top)
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
        if f.name not in SECTIONS and v is not None:
            lines.append(f"{f.name} = {value(v)}")
    for name in SECTIONS:
        lines.append(f"\n[{name}]")
        for k, v in dataclasses.asdict(getattr(cfg, name)).items():
            if v is not None:
                lines.append(f"{k} = {value(v)}")
    lines.append("# train: lr = 0 means 2e-4 below 100M parameters, 1e-4 above; warmup_steps = -1 means 10% of\n"
                 "# steps; quant_warmup = -1 means half of steps")
    return "\n".join(lines) + "\n"
