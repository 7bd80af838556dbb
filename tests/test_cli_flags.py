"""A setting is declared once: every field of every config dataclass is reachable by a flag
and (where the command reads recipes) by a recipe key, and setting it either way, or through
the Python API, gives the same config. Also: the CLI modules import without a cycle and
without touching the environment."""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.cli_helpers import run_cli
from tritpress.analyzers.quality.evaluate import EvalConfig
from tritpress.analyzers.quality.finetune import FinetuneConfig
from tritpress.cli import settings
from tritpress.cli.flags import choice_enum, field_comments, field_type
from tritpress.cli.pipeline import CompressConfig
from tritpress.cli.recipe import SECTIONS
from tritpress.cli.search import SearchConfig
from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.share import SharingConfig
from tritpress.exporters.onnx import OnnxConfig
from tritpress.exporters.settings import GgufExportConfig, HfExportConfig
from tritpress.exporters.packed import PackedLoadConfig

# values a generic rule (next choice, default + 1, ...) would get wrong: they must be valid
VALUES = {
    ("TernaryConfig", "act_bits"): 8, ("TernaryConfig", "exclude"): ["blocks\\.0"], ("TernaryConfig", "group_size"): 32,
    ("SharingConfig", "strategy"): "alternate", ("SharingConfig", "groups"): "0,1;2,3", ("SharingConfig", "tie_decoder"): "same-depth",
    ("OnnxConfig", "accuracy_level"): 1, ("OnnxConfig", "block_size"): 64, ("OnnxConfig", "float_dtype"): "fp16",
    ("EvalConfig", "tasks"): "lm,qa", ("EvalConfig", "probe"): "always", ("EvalConfig", "device"): "cpu",
    ("EvalConfig", "max_drop"): ["perplexity=5%", "cls.accuracy=2"], ("EvalConfig", "qa_train_fraction"): 0.25,
    ("FinetuneConfig", "task"): "qa",
    ("SearchConfig", "max_drop"): "2%", ("SearchConfig", "try_sharing"): "none,cycle:2",
    ("SearchConfig", "try_bits"): "int4,ternary", ("SearchConfig", "try_relax_rank"): "0,8",
    ("SearchConfig", "try_outside"): "int8,int4", ("SearchConfig", "probe_max_drop"): "2.5",
    ("SearchConfig", "try_min_count"): "1,2",
}
POSITIONAL = {"CompressConfig": "model", "EvalConfig": "compressed", "FinetuneConfig": "model"}


def other_value(cls, f: dataclasses.Field):
    """A valid value different from the field's default."""
    if (cls.__name__, f.name) in VALUES:
        return VALUES[(cls.__name__, f.name)]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    choices = choice_enum(cls, f.name)
    if choices:
        return next(c.value for c in choices if c.value != default)
    scalar, is_list = field_type(cls, f)
    if is_list:
        return ["a.txt", "b.txt"]
    if scalar is bool:
        return not default
    if scalar is str:
        return f"{f.name}-value"
    return scalar((default or 0) + (1 if scalar is int else 0.5))


def flag_args(section, f: dataclasses.Field, value) -> list[str]:
    flag = section.flag_names(f.name)[0]
    if isinstance(value, bool):
        return [flag] if value else [f"--no-{flag[2:]}"]
    if isinstance(value, list):
        return [a for v in value for a in (flag, str(v))]
    return [flag, str(value)]


def cases(command: str, sections):
    return [pytest.param(command, s, f, id=f"{command}-{s.name or 'top'}.{f.name}")
            for s in sections for f in s.fields()]


ALL_CASES = (cases("run", settings.RUN) + cases("evaluate", settings.EVALUATE)
             + cases("finetune-head", settings.FINETUNE) + cases("export", settings.EXPORT)
             + cases("info", settings.INFO) + cases("analyze", settings.ANALYZE) + cases("search", settings.SEARCH))


@pytest.fixture
def captured(monkeypatch):
    """Replace each command's work by recording the config it built."""
    import tritpress.analyzers.redundancy as redundancy
    from tritpress.cli import evaluate, export, run, search_command

    seen = []
    monkeypatch.setattr(search_command, "run_search",
                        lambda cfg, scfg, quiet: seen.append((cfg, scfg)) or SimpleNamespace(passed=True, record={}))
    monkeypatch.setattr(search_command, "show_search", lambda record, json_out: None)
    monkeypatch.setattr(run, "run_pipeline", lambda cfg, quiet: seen.append(cfg))
    monkeypatch.setattr(evaluate, "run_evaluation", lambda cfg: seen.append(cfg) or {"passed": True})
    monkeypatch.setattr(evaluate, "show_evaluation", lambda report, json_out: None)
    monkeypatch.setattr(evaluate, "run_finetune",
                        lambda cfg: seen.append(cfg) or {"first_loss": 1.0, "final_loss_mean_last_10": 1.0,
                                                         "steps": 1, "epochs_done": 1, "wall_seconds": 1})
    monkeypatch.setattr(export, "run_export",
                        lambda packed, onnx, cfg, quiet, load: seen.append((cfg, load)) or {})
    monkeypatch.setattr(export, "run_hf_export",
                        lambda packed, out, cfg, quiet, load: seen.append((cfg, load)) or {})
    monkeypatch.setattr(export, "run_gguf_export",
                        lambda packed, out, cfg, quiet, load: seen.append((cfg, load)) or {})
    monkeypatch.setattr(run, "packed_info", lambda packed, load: seen.append(load) or {})
    monkeypatch.setattr(redundancy, "analyze_model", lambda model, cfg, *a: seen.append(cfg) or ({}, []))
    return seen


BASE_ARGS = {"run": ["run", "m"], "evaluate": ["evaluate", "m"], "export": ["export", "p.safetensors", "--onnx", "o"],
             "export-hf": ["export", "p.safetensors", "--hf", "o"],
             "export-gguf": ["export", "p.safetensors", "--gguf", "o.gguf"],
             "finetune-head": ["finetune-head", "m", "--task", "tok", "--train", "t", "--out", "o"],
             "analyze": ["analyze", "m", "--json", "--share-data", "cal.txt"],
             "info": ["info", "p.safetensors", "--json"], "search": ["search", "m"]}


def api_config(command: str, section, name: str, value):
    """The config the Python API builds for the same setting."""
    if command == "search":  # (the candidates' common settings, what to try)
        if section.name == "search":
            return CompressConfig(model="m"), SearchConfig(**{name: value})
        return api_config("run", section, name, value), SearchConfig()
    if command == "run" and section.name == "":
        return CompressConfig(model="m", **{name: value})
    if command == "run":
        return CompressConfig(model="m", **{section.name: section.cls(**{name: value})})
    if command == "evaluate":
        return EvalConfig(compressed="m", **{name: value})
    if command == "finetune-head":
        return FinetuneConfig(**{"model": "m", "task": "tok", "train": "t", "out": "o", name: value})
    if command == "analyze":
        return SharingConfig(**{"data": "cal.txt", name: value})
    if command == "export":  # the output's config (--hf's / --gguf's for their flags, else --onnx's) and the load config
        output = section.cls if section.cls in (HfExportConfig, GgufExportConfig) else OnnxConfig
        return tuple(cls(**({name: value} if cls is section.cls else {})) for cls in (output, PackedLoadConfig))
    return section.cls(**{name: value})


@pytest.mark.parametrize("command, section, f", ALL_CASES)
def test_flag_and_api_give_the_same_config(command, section, f, captured, capsys):
    value = other_value(section.cls, f)
    base = {HfExportConfig: BASE_ARGS["export-hf"], GgufExportConfig: BASE_ARGS["export-gguf"]}.get(
        section.cls, BASE_ARGS[command])
    code, _, err = run_cli([*base, *flag_args(section, f, value)], capsys)
    assert code == 0, err
    expected = api_config(command, section, f.name, value)
    assert captured == [expected]
    assert expected != DEFAULTS[command]  # the flag really changed the setting


DEFAULTS = {"run": CompressConfig(model="m"), "evaluate": EvalConfig(compressed="m"),
            "export": (OnnxConfig(), PackedLoadConfig()), "info": PackedLoadConfig(),
            "finetune-head": FinetuneConfig(model="m", task="tok", train="t", out="o"),
            "analyze": SharingConfig(data="cal.txt"), "search": (CompressConfig(model="m"), SearchConfig())}


def _recipe(tmp_path, table: str, key: str, value) -> str:
    path = tmp_path / "r.toml"
    head = f"{key} = {json.dumps(value)}\n" if not table else f"[{table}]\n{key} = {json.dumps(value)}\n"
    path.write_text(head)
    return str(path)


RECIPE_CASES = [pytest.param(s, f, id=f"{s.name or 'top'}.{f.name}") for s in settings.RUN for f in s.fields()] + \
    [pytest.param(settings.EVALUATE[0], f, id=f"eval.{f.name}") for f in dataclasses.fields(EvalConfig)]


@pytest.mark.parametrize("section, f", RECIPE_CASES)
def test_recipe_key_gives_the_config_of_the_flag(section, f, captured, tmp_path, capsys):
    """`compress run --recipe` reads every table, [eval] included; `compress evaluate --recipe` its [eval]."""
    value = other_value(section.cls, f)
    recipe = _recipe(tmp_path, section.name, f.name, value)
    code, _, err = run_cli(["run", "m", "--recipe", recipe], capsys)
    assert code == 0, err
    if section.cls is EvalConfig:
        assert captured[-1] == CompressConfig(model="m", eval=EvalConfig(**{f.name: value}))
        if f.name != "compressed":  # the positional argument wins over the recipe
            code, _, err = run_cli(["evaluate", "m", "--recipe", recipe], capsys)
            assert code == 0, err
            assert captured[-1] == EvalConfig(compressed="m", **{f.name: value})
    else:
        assert captured[-1] == api_config("run", section, f.name, value)


SEARCH_FIELDS = [pytest.param(f, id=f"search.{f.name}") for f in dataclasses.fields(SearchConfig)]


@pytest.mark.parametrize("f", SEARCH_FIELDS)
def test_search_recipe_table_gives_the_config_of_the_flag(f, captured, tmp_path, capsys):
    """`compress search --recipe` reads its [search] table (and every run table); `compress run` reads the
    same recipe and leaves [search] to the search."""
    value = other_value(SearchConfig, f)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"[quant]\nmethod = \"twn\"\n[search]\n{f.name} = {json.dumps(value)}\n")
    code, _, err = run_cli(["search", "m", "--recipe", recipe], capsys)
    assert code == 0, err
    run_cfg = CompressConfig(model="m", quant=TernaryConfig(method="twn"))
    assert captured[-1] == (run_cfg, SearchConfig(**{f.name: value}))
    code, _, err = run_cli(["run", "m", "--recipe", recipe], capsys)
    assert code == 0, err
    assert captured[-1] == run_cfg


@pytest.mark.parametrize("args, flag", [(["--try-bits", "int3"], "--try-bits"), (["--max-drop", "x"], "--max-drop"),
                                        (["--try-relax-rank", "a"], "--try-relax-rank"),
                                        (["--try-outside", "int3"], "--try-outside"),
                                        (["--try-min-count", "0"], "--try-min-count")])
def test_bad_search_setting_is_one_line_naming_the_flag(args, flag, capsys):
    code, _, err = run_cli(["search", "m", *args], capsys)
    assert code != 0 and flag in err and len(err.strip().splitlines()) == 1, err


def test_every_field_has_a_flag_or_is_the_positional_argument():
    covered = {}
    for sections in (settings.RUN, settings.EVALUATE, settings.FINETUNE, settings.EXPORT, settings.INFO,
                     settings.SEARCH):
        for s in sections:
            covered.setdefault(s.cls, set()).update(f.name for f in s.fields())
    for cls, names in covered.items():
        missing = {f.name for f in dataclasses.fields(cls)} - names
        if cls is CompressConfig:
            missing -= set(SECTIONS)  # tables: their own sections above ([eval]: `compress evaluate`)
        missing.discard(POSITIONAL.get(cls.__name__))
        assert not missing, (cls.__name__, missing)
    assert EvalConfig in covered and set(SECTIONS.values()) - {EvalConfig} <= set(covered)


def test_help_comes_from_the_field_comments(capsys):
    comments = field_comments(SharingConfig)
    assert comments["strategy"].endswith('explicit groups "0,2,4;1,3,5" or a .json file')  # continuation line
    evaluation = field_comments(EvalConfig)
    assert evaluation["trust_pickle"] == "allow unpickling a saved nn.Module"  # the group comment after it: not help
    assert evaluation["lm_data"].startswith("LM text (repeatable): WikiText .txt")  # continued at another column
    code, out, _ = run_cli(["run", "--help"], capsys)
    assert code == 0
    assert "Tokens per training sequence [default: 128]" in out and "--share-probe-steps" in out


def test_analyze_old_flag_names_still_work(captured, capsys):
    new = ["--share-data", "cal.txt", "--share-sequences", 4, "--share-seq-len", 16, "--share-pairs", 3]
    old = ["--data", "cal.txt", "--sequences", 4, "--seq-len", 16, "--pairs", 3]
    for flags in (new, old):
        code, _, err = run_cli(["analyze", "m", "--json", *flags], capsys)
        assert code == 0, err
    assert captured[0] == captured[1] == SharingConfig(data="cal.txt", calib_sequences=4, calib_seq_len=16,
                                                         auto_pairs=3)
    code, out, _ = run_cli(["analyze", "--help"], capsys)
    assert "--share-data" in out and "--sequences" not in out  # the old names are hidden
    code, _, err = run_cli(["analyze", "m"], capsys)
    assert code == 2 and "--share-data" in err


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_the_cli_sets_nothing_and_has_no_cycle():
    proc = _python("import os, sys\n"
                   "import tritpress.cli.main\n"
                   "assert 'torch' not in sys.modules, 'cli.main imports torch'\n"
                   "import tritpress.cli.evaluate, tritpress.cli.analyze, tritpress.cli.export, tritpress.cli.run\n"
                   "assert 'tritpress.cli.app' not in sys.modules, 'a command imports the app'\n"
                   "import tritpress.cli.app\n"
                   "assert 'TQDM_DISABLE' not in os.environ\n")
    assert proc.returncode == 0, proc.stderr


def test_main_disables_library_progress_bars_before_they_load():
    proc = _python("from tritpress.cli.main import main\n"
                   "try:\n    main(['info', '--help'])\nexcept SystemExit:\n    pass\n"
                   "import tqdm\n"
                   "assert tqdm.tqdm(total=2).disable\n")
    assert proc.returncode == 0, proc.stderr


def test_top_level_help_points_at_the_pipeline_options_without_importing_torch():
    """`compress --help` is read first: it names the main job and where its options are, and lists
    the commands from cli/app.COMMANDS without loading their modules (torch takes seconds to import)."""
    proc = _python("import sys\n"
                   "from tritpress.cli.main import main\n"
                   "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
                   "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'tritpress' in m)\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Usage: compress MODEL [OPTIONS] | COMMAND [ARGS]..."
    assert "compress run --help" in " ".join(lines[1:4])
    from tritpress.cli.app import COMMANDS
    listed = proc.stdout.split("Commands:")[1]
    assert all(name in listed for name in COMMANDS)


HEAVY = ("torch", "transformers", "onnx", "onnxruntime")


def _command_names() -> list[str]:
    from tritpress.cli.app import COMMANDS
    return list(COMMANDS)


@pytest.mark.parametrize("name", _command_names())
def test_a_command_help_imports_no_torch(name):
    """`compress NAME --help` builds every option from the settings dataclasses, which live in torch-free
    modules (compressor/settings, exporters/settings, analyzers/settings, cli/config): a fresh interpreter
    answers it without importing torch, transformers or onnx (seconds each, with a cold disk cache)."""
    proc = _python("import sys\n"
                   "from tritpress.cli.main import main\n"
                   f"try:\n    main([{name!r}, '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
                   f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
                   "assert not heavy, heavy[:8]\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: compress {name} ") and "--help" in proc.stdout


def test_settings_keep_their_old_import_paths_and_the_packages_their_api():
    """The config dataclasses moved to torch-free modules; the modules that held them re-export the very
    same objects, and the package __init__s (loaded on first use) still give their public API."""
    import tritpress.analyzers.quality as quality
    import tritpress.compressor as compressor
    import tritpress.exporters as exporters
    from tritpress.analyzers import defaults, settings as eval_settings
    from tritpress.analyzers.quality import bootstrap, finetune, metrics, registry
    from tritpress.cli import config as cli_config, pipeline, search
    from tritpress.compressor import config, quantize, settings as comp_settings, share, train
    from tritpress.exporters import onnx, packed, settings as exp_settings

    assert config.TernaryConfig is comp_settings.TernaryConfig is compressor.TernaryConfig
    assert config.WEIGHT_FORMATS is comp_settings.WEIGHT_FORMATS
    assert tuple(config.FLOAT_DTYPES) == comp_settings.FLOAT_FORMATS
    assert quantize.TERNARY_METHODS is comp_settings.TERNARY_METHODS
    assert share.SharingConfig is comp_settings.SharingConfig and share.INITS is comp_settings.INITS
    assert train.TrainConfig is comp_settings.TrainConfig and train.SCHEDULES is comp_settings.SCHEDULES
    assert onnx.OnnxConfig is exp_settings.OnnxConfig and onnx.ONNX_FORMATS is exp_settings.ONNX_FORMATS
    assert packed.PackedLoadConfig is exp_settings.PackedLoadConfig
    assert packed.skeleton_from_spec is exp_settings.skeleton_from_spec
    evaluate = importlib.import_module("tritpress.analyzers.quality.evaluate")  # quality.evaluate: the function
    assert evaluate.EvalConfig is eval_settings.EvalConfig is quality.EvalConfig
    assert finetune.FinetuneConfig is eval_settings.FinetuneConfig
    assert metrics.TAG_SCHEMES is defaults.TAG_SCHEMES and registry.PROBE_CHOICES is defaults.PROBE_CHOICES
    assert bootstrap.RESAMPLES == defaults.RESAMPLES
    assert pipeline.CompressConfig is cli_config.CompressConfig
    assert search.SearchConfig is cli_config.SearchConfig and search.ORDERS is cli_config.ORDERS
    assert callable(quality.evaluate) and EvalConfig().lm_data == [quality.TASKS["lm"].default_data]
    assert [getattr(compressor, n) for n in compressor.__all__] and [getattr(exporters, n) for n in exporters.__all__]
    assert compressor.prepare.__module__ == "tritpress.compressor.transform"
    with pytest.raises(AttributeError):
        compressor.no_such_name  # noqa: B018


def test_every_command_loads_and_its_listed_line_fits_its_docstring(capsys):
    """The table's one-line summaries stand in for the docstrings at `compress --help`: every command
    still answers its own --help, with its full docstring."""
    from tritpress.cli.app import COMMANDS
    for name, (load, line) in COMMANDS.items():
        code, out, _ = run_cli([name, "--help"], capsys)
        assert code == 0 and out.startswith(f"Usage: compress {name} ")
        assert load().__doc__.split()[0] in out and line.endswith(".")
