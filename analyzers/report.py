"""Human-readable rendering of a pipeline report (terminal tables)."""
from __future__ import annotations

from tabulate import tabulate


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f}"


def size_table(size: dict) -> str:
    rows = []
    for c in size["components"]:
        if not c["params"] and not c["bytes"]:
            continue
        bpw = "" if c["bits_per_weight"] is None else f"{c['bits_per_weight']:.4f}"
        rows.append([c["component"], f"{c['params']:,}", f"{c['unique_params']:,}", bpw, f"{c['bytes']:,}",
                     _mb(c["bytes"])])
    rows.append(["total", f"{size['params']:,}", f"{size['unique_params']:,}",
                 f"{8 * size['file_bytes'] / max(size['unique_params'], 1):.4f}", f"{size['file_bytes']:,}",
                 _mb(size["file_bytes"])])
    return tabulate(rows, headers=["component", "params", "unique params", "bits/weight", "bytes", "MB"],
                    colalign=("left", "right", "right", "right", "right", "right"), disable_numparse=True)


def summary_lines(report: dict) -> list[str]:
    size = report["size"]
    lines = []
    if "original" in size:
        o = size["original"]
        lines.append(f"original: {o['params']:,} params = {_mb(o['fp32_bytes'])} MB fp32 / "
                     f"{_mb(o['fp16_bytes'])} MB fp16  ->  packed {_mb(size['file_bytes'])} MB: "
                     f"{size['ratio_vs_fp32']}x smaller than fp32, {size['ratio_vs_fp16']}x than fp16")
    t = size["ternary"]
    if t["weights"]:
        lines.append(f"ternary layers: {t['weights']:,} weights at {t['bits_per_weight']:.4f} bits/weight "
                     f"({t['bits_per_weight_with_scales']:.4f} with scales; limit log2(3) = "
                     f"{t['information_limit']})")
    checks = report.get("checks", {})
    if "ptq_vs_original" in checks:
        c = checks["ptq_vs_original"]
        lines.append(f"post-training ternary vs original output: cosine {c['cosine']:.4f}, relative L2 error "
                     f"{c['relative_l2']:.3f} (post-training only, no fine-tuning: quality loss is expected)")
    if "reload_vs_converted" in checks:
        c = checks["reload_vs_converted"]
        ok = "OK" if c["max_abs_diff"] == 0.0 and c["codes_bit_identical"] else "FAILED"
        lines.append(f"reload check: packed file reproduces the converted model, max |diff| = "
                     f"{c['max_abs_diff']:.3g}, codes bit-identical: {c['codes_bit_identical']}  [{ok}]")
    if "skipped" in checks:
        lines.append(f"checks skipped: {checks['skipped']}")
    for note in report.get("model", {}).get("notes", []):
        lines.append(f"note: {note}")
    return lines


def render(report: dict) -> str:
    model = report["model"]
    blocks = report["structure"]["blocks"]
    head = f"model: {model['path']} ({model['model_class']}, {model['kind']})"
    if blocks:
        head += f"; block stack {blocks['path']}: {blocks['num_blocks']} x {blocks['block_type']}"
    return "\n".join([head, "", size_table(report["size"]), "", *summary_lines(report)])
