"""Rendering a `compress search` record (search.json): the frontier table for the terminal and
Markdown, the size-vs-quality PNG, and the line naming the closest configuration when none passed.

Reads only the record's dict, so a saved search.json renders the same as a live search."""
from __future__ import annotations

import math
from pathlib import Path

from tabulate import tabulate

from tritpress.compressor.fileio import atomic_path, write_text

HEADERS = ["candidate", "sharing", "bits", "trim", "bytes", "MB", "x fp32", "worst row", "Δ [95% CI]", "result", "frontier",
           "why"]


def worst_row(candidate: dict) -> dict | None:
    """The gate row nearest to failing (smallest margin: allowed drop minus the drop)."""
    rows = candidate.get("rows") or []
    return min(rows, key=lambda r: -math.inf if r["margin"] is None else r["margin"]) if rows else None


def frontier_names(record: dict) -> set[str]:
    """The trained candidates no smaller candidate beats on its worst row's margin (the Pareto frontier
    of size and quality)."""
    trained = sorted((c for c in record["candidates"] if c.get("rows")), key=lambda c: c["bytes"])
    best, names = -math.inf, set()
    for c in trained:
        margin = worst_row(c)["margin"]
        margin = -math.inf if margin is None else margin
        if margin > best:
            best = margin
            names.add(c["name"])
    return names


def _size(c: dict) -> int | None:
    return c.get("bytes") or c.get("estimated_bytes")


def table_rows(record: dict) -> list[list[str]]:
    """One row per candidate, smallest first (unsized ones, e.g. errors, last)."""
    on_frontier = frontier_names(record)
    rows = []
    for c in sorted(record["candidates"], key=lambda c: (_size(c) is None, _size(c) or 0)):
        r = worst_row(c)
        metric = f"{r['task']} {r['metric']} {r['compressed']:.4g} (base {r['baseline']:.4g})" if r else ""
        ci = r.get("delta_ci95") if r else None
        delta = (f"{r['delta']:+.3g}" + (f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "")) if r else ""
        size = _size(c)
        rows.append([c["name"], c["sharing"] + (f" r{c['relax_rank']}" if c["relax_rank"] else ""), c["bits"],
                     _trimmed(c), f"{size:,}" if size else "", f"{size / 1e6:.3f}" if size else "",
                     f"{c['ratio']:g}" if c.get("ratio") else "", metric, delta, c["status"],
                     "*" if c["name"] in on_frontier else "", c.get("why", "")])
    return rows


def _trimmed(c: dict) -> str:
    count = c.get("min_count", 1)
    return "no" if not c["trim_vocab"] else "yes" if count == 1 else f"ids used {count}+"


def render(record: dict, fmt: str = "simple") -> str:
    table = tabulate(table_rows(record), headers=HEADERS, tablefmt=fmt, disable_numparse=True)
    return f"{table}\n\n{record['message']}"


def closest_line(record: dict) -> str:
    """No candidate passed: one line naming the closest configuration and why none passed."""
    by_name = {c["name"]: c for c in record["candidates"]}
    c = by_name.get(record.get("closest"))
    target = record["search"].get("target_ratio")
    stopped = " (stopped by --max-minutes)" if record.get("stopped") == "max_minutes" else ""
    if c is None:
        return f"no candidate passed{stopped}: none could be sized (see the why column)"
    if c.get("rows"):
        return (f"no candidate passed the gate{stopped}; closest: {c['name']} ({_size(c) / 1e6:.3f} MB, "
                f"{c['ratio']:g}x; {c['why']})")
    if target and c.get("ratio") and c["ratio"] < target:
        return (f"no candidate reaches --target-ratio {target:g}{stopped}; closest: {c['name']} at {c['ratio']:g}x "
                f"({_size(c) / 1e6:.3f} MB)")
    return f"no candidate was trained{stopped}; the smallest: {c['name']} ({c['ratio']:g}x)"


def write_frontier(record: dict, md_path: Path, png_path: Path) -> dict:
    """frontier.md always; frontier.png when matplotlib (the `analysis` extra) is installed.
    -> the files written, by kind."""
    head = f"# Search: {record['model']} (gate: {record['tasks']})\n\n"
    write_text(md_path, head + render(record, fmt="github") + "\n")
    files = {"markdown": str(md_path)}
    why_not = plot(record, png_path)
    if why_not is None:
        files["plot"] = str(png_path)
    else:
        record["plot_note"] = f"no {png_path.name}: {why_not}"
    return files


def plot(record: dict, path: Path) -> str | None:
    """Size (MB) against the worst row's Δ, PASS and FAIL marked, the size target as a line.
    -> None when written, else why not."""
    trained = [c for c in record["candidates"] if c.get("rows")]
    if not trained:
        return "no candidate was trained"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'tritpress[analysis]')"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for status, color in (("PASS", "tab:green"), ("FAIL", "tab:red")):
        points = [(c["bytes"] / 1e6, worst_row(c)["delta"], c["name"]) for c in trained if c["status"] == status]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, label=status, zorder=3)
        for x, y, name in points:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    target = record["search"].get("target_ratio")
    if target and record.get("fp32_bytes"):
        ax.axvline(record["fp32_bytes"] / target / 1e6, color="gray", linestyle="--", label=f"{target:g}x target")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("packed file (MB)")
    ax.set_ylabel("Δ of the worst gate row (compressed - original)")
    ax.set_title(f"{Path(str(record['model'])).name}: size vs quality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return None
