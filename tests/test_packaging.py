"""Installed, tritpress is one namespace: the four folders of the repository are
tritpress.compressor, .exporters, .analyzers and .cli, and no generic top-level name
(compressor, cli, ...) lands in site-packages."""
import ast
import os
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("compressor", "exporters", "analyzers", "cli")


def test_every_package_installs_under_tritpress():
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p.startswith("tritpress.") for p in setup["packages"]), setup["packages"]
    assert setup["package-dir"] == {f"tritpress.{f}": f for f in FOLDERS}
    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["compress"]
    assert script == "tritpress.cli.main:main"


def test_the_namespace_imports_from_this_checkout_and_no_generic_name_does(tmp_path):
    # a fresh interpreter outside the repository: pytest puts the repository root on sys.path
    code = ("import importlib.util as u; "
            f"print([str(u.find_spec('tritpress.' + f).origin) for f in {FOLDERS!r}]); "
            f"print([f for f in {FOLDERS!r} if u.find_spec(f)])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert [Path(p).resolve() for p in ast.literal_eval(out[0])] == [REPO / f / "__init__.py" for f in FOLDERS]
    assert ast.literal_eval(out[1]) == []
