"""`compress --sharing ...` and `compress analyze` end to end on a tiny 4-block LLaMA, and
their error paths (one line, non-zero exit)."""
import json
import random

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.cli_helpers import run_cli
from tests.tiny_models import llama_config


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama4")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(True, num_hidden_layers=4)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    f = tmp_path_factory.mktemp("text") / "text.txt"
    f.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(40)))
    return f


SMALL = ["--share-sequences", 4, "--share-seq-len", 16]


def test_compress_sharing_alternate_whole_pipeline(llama_dir, text, tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, err = run_cli([llama_dir, "--sharing", "alternate", "--data", text, "--steps", 2, "--seq-len", 16,
                                 "--batch-size", 2, "--eval-tokens", 64, *SMALL, "--out", out, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    s = report["sharing"]
    assert s["plan"]["groups"] == [[0, 2], [1, 3]]
    assert s["unique_params_after"] < s["unique_params_before"]
    assert s["calibration_loss"]["metric"] == "nll"
    assert (out / "analysis" / "analysis.json").exists() and (out / "analysis" / "cka.png").exists()
    assert "shared_float" in report["training"]["quality"] and "ternary_qat" in report["training"]["quality"]
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
    assert report["size"]["unique_params"] < report["size"]["params"]  # aliases counted, stored once
    # the unshared run of the same model packs the block codes twice as often
    code, stdout, err = run_cli([llama_dir, "--out", tmp_path / "plain", "--json"], capsys)
    assert code == 0, err
    codes = lambda r: next(c for c in r["size"]["components"] if c["component"] == "ternary layers")  # noqa: E731
    assert codes(json.loads(stdout))["unique_params"] == 2 * codes(report)["unique_params"]
    assert codes(json.loads(stdout))["bytes"] > 1.9 * codes(report)["bytes"]


def test_compress_sharing_text_output_and_recipe(llama_dir, text, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{llama_dir}"\nout = "{tmp_path / "o"}"\n[sharing]\nstrategy = "sequence"\n'
                      f'unique = 2\nshare = "attention"\nanalyze = false\n')
    code, stdout, err = run_cli(["run", "--recipe", recipe, "--share-init", "closest"], capsys)
    assert code == 0, err
    assert "sharing: sequence (attention matrices, init closest" in stdout and "groups 0,1;2,3" in stdout
    saved = tmp_path / "full.toml"
    code, _, _ = run_cli(["run", "--recipe", recipe, "--save-recipe", saved], capsys)
    assert code == 0 and "[sharing]" in saved.read_text() and 'strategy = "sequence"' in saved.read_text()


@pytest.mark.parametrize("budget", [["--sharing", "auto", "--target-params", 0.6], ["--sharing", "auto:2"]],
                         ids=["target-params", "unique-blocks"])
def test_compress_auto_sharing(llama_dir, text, tmp_path, capsys, budget):
    code, stdout, err = run_cli([llama_dir, *budget, "--data", text, *SMALL,
                                 "--no-share-analyze", "--out", tmp_path / "o", "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)["sharing"]
    assert s["auto"]["unique_blocks"] == len(s["plan"]["groups"]) and s["unique_block_fraction"] <= 0.6
    if budget[-1] == "auto:2":
        assert s["auto"]["mode"] == "unique_blocks" and len(s["plan"]["groups"]) == 2
    losses = [c["loss_after_tying"] for c in s["auto"]["candidates"]]  # several rows may be "refined"
    assert s["calibration_loss"]["after_tying"] == pytest.approx(min(losses), abs=1e-6)


def test_compress_auto_sharing_ranked_after_fine_tuning(llama_dir, text, tmp_path, capsys):
    args = [llama_dir, "--sharing", "auto", "--target-params", 0.6, "--share-probe-steps", 2, "--data", text,
            "--steps", 2, "--seq-len", 16, "--batch-size", 2, "--eval-tokens", 64, *SMALL, "--no-share-analyze"]
    code, stdout, err = run_cli([*args, "--out", tmp_path / "o", "--json"], capsys)
    assert code == 0, err
    auto = json.loads(stdout)["sharing"]["auto"]
    assert auto["ranked_by"] == "calibration loss after 2 fine-tuning steps"
    probed = {r["strategy"]: r["loss_after_probe"] for r in auto["probed"]}
    assert {"cycle:2", "sequence:2", "alternate"} & set(probed) and auto["chosen"] in probed
    assert probed[auto["chosen"]] == min(probed.values())
    code, text_out, err = run_cli([*args, "--out", tmp_path / "t"], capsys)  # the terminal report says the same
    assert code == 0, err
    assert f"auto: chose {auto['chosen']} by the calibration loss after 2 fine-tuning steps" in text_out
    assert "after probe" in text_out
    # probes leave nothing behind: the only training log is the real run's
    assert list((tmp_path / "o").glob("**/train_log.jsonl")) == [tmp_path / "o" / "train" / "train_log.jsonl"]
    code, _, err = run_cli([llama_dir, "--sharing", "auto", "--target-params", 0.6, "--share-probe-steps", 2,
                            *SMALL, "--share-data", text, "--out", tmp_path / "o2"], capsys)
    assert code != 0 and "--share-probe-steps needs training text" in err and "Traceback" not in err


def test_analyze_command(llama_dir, text, tmp_path, capsys):
    code, stdout, err = run_cli(["analyze", llama_dir, "--data", text, "--out", tmp_path / "a", "--sequences", 4,
                                 "--seq-len", 16], capsys)
    assert code == 0, err
    assert "influence" in stdout and "middle-cycle" not in stdout  # 4 blocks: half = 2 unique, no middle-cycle
    result = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert len(result["block_influence"]) == 4 and result["loss_increase"][0][1] is not None
    assert (tmp_path / "a" / "block_influence.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--sharing", "0,9"], "block 9 is out of range"),
    (["--sharing", "0,1;1,2"], "block 1 is in more than one group"),
    (["--sharing", "auto"], "needs a number of unique blocks"),
    (["--sharing", "auto", "--target-params", 0.5], "pass calibration text"),
    (["--sharing", "diagonal"], "is not one of"),
    (["--sharing", "cycle:9"], "unique=9 must be between 1 and the 4 blocks"),
    (["--sharing", "alternate", "--share-init", "median"], "median"),
])
def test_bad_sharing_input_is_one_line(llama_dir, tmp_path, capsys, args, message):
    code, _, err = run_cli([llama_dir, *args, "--out", tmp_path / "o"], capsys)
    assert code != 0
    errors = [line for line in err.splitlines() if not line.startswith("[")]  # "[stage]" progress lines aside
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
