"""The `compress` command: end to end on tiny models, and every error path
exits non-zero with one line on stderr and no traceback."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from tests.cli_helpers import run_cli
from tests.tiny_models import build


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    build("gpt2").save_pretrained(d)
    return d


def test_run_on_hf_folder_writes_packed_file_and_report(tiny_gpt2_dir, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_gpt2_dir.iterdir()}
    code, out, err = run_cli([tiny_gpt2_dir, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "ternary layers" in out and "reload check" in out and "[OK]" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    packed = tmp_path / "o" / "model.tritpress.safetensors"
    assert sum(c["bytes"] for c in report["size"]["components"]) == packed.stat().st_size
    assert report["size"]["file_bytes"] == packed.stat().st_size
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
    assert report["structure"]["head_tied_to"] == "transformer.wte"
    # the input folder is untouched
    assert {p.name: p.stat().st_mtime_ns for p in tiny_gpt2_dir.iterdir()} == before
    code, out, _ = run_cli(["info", packed], capsys)
    assert code == 0 and "ternary layers" in out


def test_flags_and_recipe(tiny_gpt2_dir, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{tiny_gpt2_dir}"\nout = "{tmp_path / "o"}"\n[quant]\nmethod = "twn"\n'
                      'embedding = "int4"\n')
    code, out, err = run_cli(["run", "--recipe", recipe, "--granularity", "channel", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["quant_config"]["method"] == "twn"            # from the recipe
    assert report["quant_config"]["granularity"] == "channel"   # from the flag
    assert report["quant_config"]["embedding"] == "int4"
    saved = tmp_path / "full.toml"
    code, _, _ = run_cli(["run", "--recipe", recipe, "--save-recipe", saved], capsys)
    assert code == 0 and 'method = "twn"' in saved.read_text() and "scale_dtype" in saved.read_text()


def test_pickled_module_needs_opt_in(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(build("lstm"), path)
    code, _, err = run_cli([path, "--out", tmp_path / "o"], capsys)
    _one_line_error(code, err)
    assert "--trust-pickle" in err
    assert not (tmp_path / "o").exists()
    code, out, err = run_cli([path, "--out", tmp_path / "o", "--trust-pickle"], capsys)
    assert code == 0, err
    assert "rnn-layers" in json.dumps(json.loads((tmp_path / "o" / "report.json").read_text())["structure"])


def _one_line_error(code, err, expected_code=1):
    assert code == expected_code
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]  # stage markers
    assert len(lines) == 1 and lines[0].startswith("compress: error:"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("make_args", [
    lambda t: [t / "missing.pt"],
    lambda t: [(t / "garbage.pt").write_bytes(b"not a checkpoint") and t / "garbage.pt"],
    lambda t: [(t / "cfg.json").write_text("{}") and t / "missing.bin", "--config", t / "cfg.json"],
    lambda t: ["info", (t / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00") and t / "bad.safetensors"],
    lambda t: ["run", "--recipe", t / "nope.toml"],
    lambda t: ["pkg:no-such-model"],
], ids=["missing", "garbage", "missing-state-dict", "corrupt-packed", "missing-recipe", "unknown-bundled"])
def test_errors_are_one_line(make_args, tmp_path, capsys):
    code, _, err = run_cli(make_args(tmp_path), capsys)
    _one_line_error(code, err)


def test_state_dict_without_config(tiny_gpt2_dir, tmp_path, capsys):
    path = tmp_path / "sd.pt"
    torch.save(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).state_dict(), path)
    code, _, err = run_cli([path], capsys)
    _one_line_error(code, err)
    assert "--config" in err
    code, _, err = run_cli([path, "--config", tiny_gpt2_dir / "config.json", "--out", tmp_path / "o"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("flag", [["--method", "nope"], ["--embedding", "int3"], ["--act-bits", "4"],
                                  ["--no-such-flag"]])
def test_bad_flag_values_exit_2(tiny_gpt2_dir, flag, capsys):
    code, _, err = run_cli([tiny_gpt2_dir, *flag], capsys)
    _one_line_error(code, err, expected_code=2)


def test_refuses_to_write_into_input_folder(tiny_gpt2_dir, capsys):
    code, _, err = run_cli([tiny_gpt2_dir, "--out", tiny_gpt2_dir], capsys)
    _one_line_error(code, err)
    assert "refusing" in err


def test_debug_shows_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "from tritpress.cli.main import main; main()", str(tmp_path / "missing.pt")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
