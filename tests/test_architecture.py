"""The floor plan of docs/ARCHITECTURE.md, enforced: every product module sits on one floor,
imports only from its own floor or lower, and no two modules import each other (directly or
round a longer loop).

Imports are read with `ast` from the source, so imports inside functions and under
`if TYPE_CHECKING:` count as much as the ones at the top: a lazy import is still a dependency.
`from package import name` is an import of the submodule when `name` is one, otherwise of the
package's __init__. The implicit import of a parent package that every submodule import
performs is not an edge (it would make each package a cycle with its own modules)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"compressor": "tritpress.compressor", "exporters": "tritpress.exporters",
            "analyzers": "tritpress.analyzers", "cli": "tritpress.cli"}

# floor -> modules (relative to the repository root, without .py); the same table is in
# docs/ARCHITECTURE.md. A package __init__ sits on the floor of what it re-exports.
FLOORS = {
    0: ["compressor/errors", "compressor/fileio", "compressor/settings", "compressor/config", "compressor/fused",
        "compressor/quantize", "compressor/memory",
        "compressor/layers", "compressor/structure", "compressor/vocab", "compressor/modelio", "compressor/distributed"],
    1: ["compressor/ingest", "compressor/gguf_reader", "compressor/bundled", "compressor/data"],
    2: ["compressor/transform", "compressor/train", "compressor/augment", "compressor/__init__"],
    3: ["compressor/share", "compressor/cross_ties", "compressor/redundancy", "compressor/redundancy_auto", "compressor/sharing_stage"],
    4: ["exporters/settings", "exporters/packing", "exporters/packed", "exporters/onnx", "exporters/onnx_quant", "exporters/converted", "exporters/hf_bitnet", "exporters/llama_gguf", "exporters/__init__"],
    5: ["analyzers/defaults", "analyzers/settings", "analyzers/size", "analyzers/report", "analyzers/redundancy", "analyzers/frontier", "analyzers/__init__",
        "analyzers/quality/*"],
    6: ["cli/config", "cli/pipeline", "cli/search", "cli/__init__"],
    7: ["cli/recipe"],
    8: ["cli/main", "cli/app", "cli/run", "cli/analyze", "cli/evaluate", "cli/export", "cli/search_command",
        "cli/options", "cli/flags",
        "cli/settings", "cli/runtime", "cli/progress"],
}
FLOOR_NAMES = {0: "core", 1: "ingest & data", 2: "quantize/QAT", 3: "sharing", 4: "packing & export",
               5: "reports & evaluation", 6: "pipeline", 7: "recipe", 8: "commands"}


def module_name(path: Path) -> str:
    """compressor/share.py -> tritpress.compressor.share; analyzers/quality/__init__.py -> ...quality."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def product_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def floor_of(path: Path) -> int | None:
    rel = path.relative_to(REPO).with_suffix("").as_posix()
    for floor, entries in FLOORS.items():
        for entry in entries:
            if rel == entry or (entry.endswith("/*") and rel.startswith(entry[:-1]) and "/" not in rel[len(entry) - 1:]):
                return floor
    return None


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The tritpress modules `path` imports, anywhere in the file."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", known)


def imports_in(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, is_package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import tritpress.compressor.share as s` and the like
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = product_files()
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


@pytest.fixture(scope="module")
def floors() -> dict[str, int | None]:
    return {module_name(p): floor_of(p) for p in product_files()}


def test_every_module_has_a_floor(floors):
    missing = sorted(m for m, f in floors.items() if f is None)
    assert not missing, f"add these modules to FLOORS here and in docs/ARCHITECTURE.md: {missing}"


def test_no_module_imports_a_higher_floor(graph, floors):
    upward = [f"{m} (floor {floors[m]}) imports {t} (floor {floors[t]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets)
              if floors[m] is not None and floors[t] is not None and floors[t] > floors[m]]
    assert not upward, "\n".join(upward)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_relative_and_type_checking_imports():
    """The parser itself: imports in functions and TYPE_CHECKING blocks, relative imports,
    `from package import submodule` and `import a.b.c as x`; cycles round longer loops."""
    source = """
from typing import TYPE_CHECKING
from .share import SharingConfig
if TYPE_CHECKING:
    from tritpress.exporters.packed import save_packed
def f():
    from tritpress.analyzers.quality import evaluate
    from tritpress.compressor import modelio
    import tritpress.cli.main as m
"""
    known = {module_name(p) for p in product_files()}
    assert imports_in(source, "tritpress.compressor.train", False, known) == {
        "tritpress.compressor.share", "tritpress.exporters.packed", "tritpress.analyzers.quality.evaluate",
        "tritpress.compressor.modelio", "tritpress.cli.main"}
    assert imports_in("from . import data\nfrom .. import size", "tritpress.analyzers.quality", True, known) == {
        "tritpress.analyzers.quality.data", "tritpress.analyzers.size"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_doc_has_the_same_table():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for floor, entries in FLOORS.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| F{floor} ")), None)
        assert row is not None, f"docs/ARCHITECTURE.md has no table row for F{floor}"
        assert f"| {FLOOR_NAMES[floor]} |" in row, row
        for entry in entries:
            assert f"`{entry}`" in row, f"docs/ARCHITECTURE.md, row F{floor}: `{entry}` missing"


def test_every_table_entry_is_a_module():
    """A module that was moved or removed leaves the table too."""
    stale = [e for entries in FLOORS.values() for e in entries
             if not (e.endswith("/*") and (REPO / e[:-2]).is_dir()) and not (REPO / f"{e}.py").is_file()]
    assert not stale, stale
