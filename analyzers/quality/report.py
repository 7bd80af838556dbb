"""Rendering an evaluation report: terminal table, report.json, report.md, PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tabulate import tabulate

from tritpress.compressor.fileio import atomic_path, write_json, write_text

HEADERS = ["task", "metric", "head", "baseline", "compressed", "Δ abs", "Δ 95% CI", "Δ rel", "max drop", "result",
           "note"]


def _num(v: float) -> str:
    if v is None or not math.isfinite(v):
        return str(v)
    return f"{v:,.2f}" if abs(v) >= 100 else f"{v:.4f}" if abs(v) < 10 else f"{v:.3f}"


def _rel(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.1f}%"


def _ci(row: dict) -> str:
    """[lo, hi] of Δ with n, or empty (no per-example statistics)."""
    ci = row.get("delta_ci95")
    if not ci:
        return "" if not row.get("n") else "n/a"
    return f"[{ci[0]:+.3g}, {ci[1]:+.3g}] n={row['n']}"


def table_rows(report: dict) -> list[list[str]]:
    rows = [[r["task"], r["metric"], r["head"], _num(r["baseline"]), _num(r["compressed"]),
             f"{r['delta']:+.4g}" if math.isfinite(r["delta"]) else str(r["delta"]), _ci(r), _rel(r["delta_rel"]),
             r["tolerance"], r["status"], r.get("note", "")] for r in report["rows"]]
    for label, entry in report["tasks"].items():
        for key, shown in (("skipped", "SKIPPED"), ("error", "ERROR")):
            if key in entry:
                rows.append([label, "", "", "", "", "", "", "", "", f"{shown}: {entry[key]}", ""])
    return rows


def render(report: dict, fmt: str = "simple") -> str:
    table = tabulate(table_rows(report), headers=HEADERS, tablefmt=fmt, disable_numparse=True)
    verdict = "PASS" if report["passed"] else "FAIL"
    failed = [f"{r['task']} {r['metric']}" for r in report["rows"] if r["status"] == "FAIL"]
    tail = f"gate: {verdict}" + (f" ({len(failed)} of {len(report['rows'])} rows failed: {', '.join(failed)})"
                                 if failed else f" ({len(report['rows'])} rows)")
    if report.get("errors"):
        tail += f"; {len(report['errors'])} task(s) failed: {', '.join(report['errors'])}"
    return f"{table}\n\n{tail}"


def failure_line(report: dict) -> str | None:
    """One line naming the tasks that failed (their errors are in report.json), or None."""
    errors = report.get("errors") or {}
    if not errors:
        return None
    where = report.get("files", {}).get("json") or "report.json"
    first = next(iter(errors))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"error: task {first} failed: {errors[first]}{more}; the finished tasks' results are in {where}"


def protocol_lines(report: dict) -> list[str]:
    """One line per task: data, split, sample counts, head, protocol parameters."""
    lines = []
    for label, entry in report["tasks"].items():
        if "skipped" in entry or "error" in entry:
            continue
        prot = {**entry["data"], **entry["compressed"]["protocol"], "head": entry["compressed"]["head"],
                "seconds": {"baseline": entry["baseline"]["seconds"], "compressed": entry["compressed"]["seconds"]}}
        lines.append(f"- **{label}**: `{json.dumps(prot, default=str)}`")
    return lines


def markdown(report: dict) -> str:
    m = report["models"]
    env = report["environment"]
    parts = [
        "# Evaluation report", "",
        f"- baseline: `{m['baseline']}` ({m['baseline_class']})",
        f"- compressed: `{m['compressed']}` ({m['compressed_class']})",
        *[f"- note: {n}" for n in m.get("notes", [])],
        f"- gate: **{'PASS' if report['passed'] else 'FAIL'}**", "",
        tabulate(table_rows(report), headers=HEADERS, tablefmt="github", disable_numparse=True), "",
        "Head `probe`: a linear head trained on the frozen features of each model with the same seed, "
        "data and budget (the model has no head for that task); `own`: the model's own task/LM head. "
        "Δ rel = (compressed − baseline) / |baseline|. A row fails when the drop (in the metric's bad "
        "direction) exceeds the max drop (absolute, or % of the baseline). Δ 95% CI: the interval of Δ from a "
        "paired bootstrap over the n evaluation examples (both models on the same resampled examples; the "
        "verdict does not use it). \"within noise\": it contains 0; \"compressed better beyond noise\": worth "
        "a look at the protocol (a compressed model rarely beats its original for real).", "",
        "## Protocol", "", *protocol_lines(report), "",
        "## Environment", "", f"`{json.dumps(env)}`", "",
    ]
    if report.get("files", {}).get("plots"):
        parts += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["files"]["plots"]]
    return "\n".join(parts) + "\n"


def write_outputs(report: dict, out: Path, packed_file: str | None, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "plots": []}
    if plots:
        report["files"]["plots"] = make_plots(report, out, packed_file)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))


def make_plots(report: dict, out: Path, packed_file: str | None) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []  # plots are optional; the table and JSON carry the same numbers
    files = []
    if report["rows"]:
        files.append(_deltas_plot(plt, report, out / "quality_deltas.png"))
    if packed_file:
        files.append(_size_plot(plt, packed_file, out / "size_breakdown.png"))
    return files


def _save(plt, fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _deltas_plot(plt, report: dict, path: Path) -> str:
    rows = report["rows"]
    labels = [f"{r['task']} {r['metric']} ({r['head']})" for r in rows]
    # quality change in percent of the baseline, signed so that negative = worse
    values = []
    for r in rows:
        rel = r["delta_rel"] if math.isfinite(r["delta_rel"]) else 0.0
        values.append(100 * (-rel if r["lower_is_better"] else rel))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    colors = ["tab:green" if r["status"] == "PASS" else "tab:red" for r in rows]
    shown = [max(-100.0, min(100.0, v)) for v in values]  # a 10^6 % perplexity blow-up would hide the rest
    ax.barh(range(len(rows)), shown, color=colors)
    for i, (v, s) in enumerate(zip(values, shown)):
        ax.text(s, i, f" {v:+.3g}% ", va="center", ha="left" if s >= 0 else "right", fontsize=7)
    ax.set_xlim(-130, 130)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("quality change vs baseline, % of baseline (negative = worse, bars clipped at ±100; "
                  "green PASS, red FAIL)", fontsize=8)
    ax.set_title("compressed vs baseline, per task and metric")
    return _save(plt, fig, path)


def _size_plot(plt, packed_file: str, path: Path) -> str:
    from tritpress.analyzers.size import size_report
    size = size_report(packed_file)
    comps = [c for c in size["components"] if c["bytes"]]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    left = 0.0
    for c in comps:
        ax.barh(0, c["bytes"] / 1e6, left=left, label=f"{c['component']} {c['bytes'] / 1e6:.2f} MB")
        left += c["bytes"] / 1e6
    bars = [("packed", 0)]
    if "original" in size:
        ax.barh(1, size["original"]["fp16_bytes"] / 1e6, color="lightgray")
        ax.barh(2, size["original"]["fp32_bytes"] / 1e6, color="darkgray")
        bars = [("packed", 0), ("original fp16", 1), ("original fp32", 2)]
    ax.set_yticks([b[1] for b in bars], [b[0] for b in bars])
    ax.set_xlabel("MB")
    ax.set_title("size by component")
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)
