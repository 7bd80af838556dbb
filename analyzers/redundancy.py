"""The outputs of the redundancy analysis (compressor/redundancy.py): analysis.json, the text
table, PNG heatmaps and the Block Influence bar chart, and `compress analyze` end to end."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.redundancy import analyze
from tritpress.compressor.share import SharingConfig
from tritpress.compressor.structure import discover


def table(result: dict) -> str:
    from tabulate import tabulate

    n = result["model_blocks"]["num_blocks"]
    rows = []
    for i in range(n):
        inc = [v for v in result["loss_increase"][i] if v is not None]
        nearest = min(range(n), key=lambda j: result["loss_increase"][i][j]
                      if result["loss_increase"][i][j] is not None else math.inf) if inc else None
        rows.append([i, _fmt(result["block_influence"], i), _fmt(result["cka"], i, i + 1),
                     _fmt(result["angular_distance"], i, i + 1), _fmt(result["weight_cosine_mean"], i, i + 1),
                     "" if nearest is None else f"{nearest} ({result['loss_increase'][i][nearest]:+.4f})"])
    out = tabulate(rows, headers=["block", "influence", "CKA next", "angular next", "weight cos next",
                                  f"cheapest partner ({result['calibration']['metric']} change)"],
                   disable_numparse=True)
    if result.get("strategies"):
        srows = [[s["strategy"], s["unique_blocks"], f"{s['unique_block_fraction']:.3f}", f"{s['loss_after_tying']:.4f}",
                  f"{s['loss_increase']:+.4f}"] for s in result["strategies"]]
        out += "\n\n" + tabulate(srows, headers=["strategy", "unique blocks", "unique block params",
                                                 result["calibration"]["metric"], "increase"], disable_numparse=True)
    if result["calibration"].get("dtype") == "bf16":  # say why the numbers differ from an fp32 run in the 4th digit
        out += "\n\nforwards under bf16 autocast (--share-calib-dtype; fp32 gives the exact numbers)"
    return out


def _fmt(matrix, i, j=None):
    if matrix is None:
        return "-"
    if j is None:
        return f"{matrix[i]:.4f}"
    return f"{matrix[i][j]:.4f}" if j < len(matrix) and matrix[i][j] is not None else "-"


def write_outputs(result: dict, out_dir) -> list[str]:
    """analysis.json, analysis.txt and PNG plots (heatmaps, block influence) into out_dir."""
    from tritpress.compressor.fileio import atomic_path, write_json, write_text

    out_dir = Path(out_dir)
    write_json(out_dir / "analysis.json", result)
    write_text(out_dir / "analysis.txt", table(result) + "\n")
    files = [str(out_dir / "analysis.json"), str(out_dir / "analysis.txt")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files  # plots need the `analysis` extra: pip install matplotlib
    heatmaps = {"cka": "linear CKA of block outputs", "angular_distance": "angular distance (last token)",
                "weight_cosine_mean": "weight cosine (mean over matrix types)",
                "loss_increase": f"measured {result['calibration']['metric']} increase when the pair is tied"}
    for key, title in heatmaps.items():
        m = result.get(key)
        if m is None:
            continue
        data = torch.tensor([[math.nan if v is None else v for v in row] for row in m])
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        im = ax.imshow(data.numpy(), cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax)
        files.append(_save(fig, out_dir / f"{key}.png", atomic_path, plt))
    if result.get("block_influence"):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(len(result["block_influence"])), result["block_influence"])
        ax.set_xlabel("block")
        ax.set_ylabel("1 - cos(in, out)")
        ax.set_title("Block Influence (ShortGPT)", fontsize=9)
        files.append(_save(fig, out_dir / "block_influence.png", atomic_path, plt))
    return files


def _save(fig, path, atomic_path, plt) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return str(path)


def analyze_model(spec: str, cfg: SharingConfig, out_dir, config: str | None = None,
                  trust_pickle: bool = False) -> tuple[dict, list[str]]:
    """Load MODEL, calibrate on cfg.data, analyze, write the outputs. -> (result, files)."""
    from tritpress.compressor.fileio import refuse_overwrite_input
    from tritpress.compressor.ingest import load_model
    from tritpress.compressor.sharing_stage import calibration_for

    refuse_overwrite_input([Path(out_dir) / "analysis.json"], [spec, config])
    loaded = load_model(spec, config, trust_pickle)
    structure = discover(loaded.model)
    if structure.blocks is None:
        raise TritpressError("cannot analyze: no stack of repeated blocks (or stacked LSTM/GRU layers) found")
    cal = calibration_for(loaded.model, loaded.tokenizer, cfg, cfg.data, structure)
    result = analyze(loaded.model, cal, cfg, structure, measure_pairs=cfg.auto_pairs > 0)
    result["model"] = spec
    return result, write_outputs(result, out_dir)
