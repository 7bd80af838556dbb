"""Functions read top to bottom: none in the product code is longer than 60 lines
(benchmarks and tests are exempt). A long function is a sign that a stage hides another."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compressor", "exporters", "analyzers", "cli")
MAX_LINES = 60


def _long_functions(path: Path, root: Path = REPO):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                yield f"{path.relative_to(root)}:{node.lineno} {node.name}() is {lines} lines"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_60_lines(package):
    found = [msg for path in sorted((REPO / package).rglob("*.py")) for msg in _long_functions(path)]
    assert not found, "functions over 60 lines:\n" + "\n".join(found)


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"def too_long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert [m.split()[1] for m in _long_functions(path, tmp_path)] == ["too_long()"]
