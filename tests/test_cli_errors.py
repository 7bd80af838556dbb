"""Failures a new user meets, each one line naming the file or flag and what to do, found before
any compute where they can be; and outputs readable by others (the umask's permissions)."""
import json
import os
import pathlib

import pytest

from tests.cli_helpers import run_cli
from tests.tiny_models import build


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    build("gpt2").save_pretrained(d)
    return d


def _one_line(code, err):
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]  # the stage lines
    assert len(lines) == 1, err
    return lines[0]


def test_an_output_folder_under_a_file_fails_before_ingest(gpt2_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run_cli([gpt2_dir, "--out", blocker / "out"], capsys)
    assert "[ingest]" not in err
    line = _one_line(code, err)
    assert str(blocker / "out") in line and "is a file" in line and "--out" in line


def test_an_unwritable_output_folder_fails_before_any_compute(gpt2_dir, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits, so the refusal is simulated where the check writes its probe."""
    real_touch = pathlib.Path.touch

    def touch(self, *a, **kw):
        if self.name.startswith(".tritpress-write-check"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_touch(self, *a, **kw)
    monkeypatch.setattr(pathlib.Path, "touch", touch)
    code, _, err = run_cli([gpt2_dir, "--out", tmp_path / "o", "--steps", "3", "--data", "missing.txt"], capsys)
    line = _one_line(code, err)
    assert "[ingest]" not in err and line == f"compress: error: cannot write to {tmp_path} (Permission denied): choose another --out, " \
                   "or make it writable"
    monkeypatch.setattr(pathlib.Path, "touch", real_touch)
    assert run_cli([gpt2_dir, "--out", tmp_path / "ok"], capsys)[0] == 0
    packed = tmp_path / "ok" / "model.tritpress.safetensors"
    monkeypatch.setattr(pathlib.Path, "touch", touch)
    code, _, err = run_cli(["export", packed, "--onnx", tmp_path / "x" / "m.onnx"], capsys)
    assert "choose another --onnx" in _one_line(code, err)
    code, _, err = run_cli(["evaluate", packed, "--tasks", "lm", "--lm-data", "x.txt", "--out", tmp_path / "e"],
                           capsys)
    assert "choose another --out" in _one_line(code, err)


def test_text_that_is_not_utf8_names_the_file(gpt2_dir, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait, d\xe9j\xe0 vu\n".encode("latin-1") * 50)
    code, _, err = run_cli([gpt2_dir, "--out", tmp_path / "o", "--steps", "1", "--data", latin1], capsys)
    line = _one_line(code, err)
    assert f"data file {latin1} is not UTF-8 text (byte 0xe9 at offset 3)" in line and "iconv" in line
    recipe = tmp_path / "r.toml"
    recipe.write_bytes("# caf\xe9\nsteps = 0\n".encode("latin-1"))
    code, _, err = run_cli([gpt2_dir, "--recipe", recipe], capsys)
    assert f"recipe {recipe} is not UTF-8 text" in _one_line(code, err)
    tsv = tmp_path / "dev.tsv"
    tsv.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    code, _, err = run_cli(["evaluate", gpt2_dir, "--baseline", gpt2_dir, "--tasks", "cls", "--cls-data", tsv,
                            "--cls-train", tsv, "--out", tmp_path / "e"], capsys)
    assert f"data file {tsv} is not UTF-8 text" in _one_line(code, err)


def test_bad_json_names_the_file(gpt2_dir, tmp_path, capsys):
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0\n')
    code, _, err = run_cli(["evaluate", gpt2_dir, "--baseline", gpt2_dir, "--tasks", "cls", "--cls-data", jsonl,
                            "--cls-train", jsonl, "--out", tmp_path / "e"], capsys)
    assert f"data file {jsonl} line 2 is not valid JSON" in _one_line(code, err)


def test_outputs_get_the_umasks_permissions(gpt2_dir, tmp_path, capsys):
    mask = os.umask(0o022)
    try:
        code, _, err = run_cli([gpt2_dir, "--out", tmp_path / "o", "--onnx"], capsys)
    finally:
        os.umask(mask)
    assert code == 0, err
    files = [p for p in (tmp_path / "o").rglob("*")]
    assert {p.name for p in files} >= {"model.tritpress.safetensors", "report.json", "model.onnx"}
    modes = {p.name: p.stat().st_mode & 0o777 for p in files}
    assert all(m == (0o755 if p.is_dir() else 0o644) for p, m in zip(files, modes.values())), modes
    assert json.loads((tmp_path / "o" / "report.json").read_text())["onnx"]["validation"]["passed"]


def test_a_raw_library_error_in_a_stage_names_the_stage_and_its_input(gpt2_dir, tmp_path, capsys, monkeypatch):
    from tritpress.compressor import data

    text = tmp_path / "t.txt"
    text.write_text("some words here\n" * 200)

    def broken(*a, **kw):
        raise KeyError("A")  # what a tokenizer meeting an unknown symbol raises
    monkeypatch.setattr(data, "tokenizer_fn", broken)
    code, _, err = run_cli([gpt2_dir, "--out", tmp_path / "o", "--steps", "1", "--data", text], capsys)
    assert _one_line(code, err) == (f"compress: error: stage train failed on --data {text} with MODEL {gpt2_dir}: "
                                    "KeyError: 'A' (check that input; --debug shows the traceback)")
