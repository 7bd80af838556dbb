"""`compress finetune-head` as a baseline to trust, on a tiny random BERT and tiny files: the
best dev checkpoint is the one saved, runs are reproducible by seed, length-grouped batches
cover every example once per epoch, the wall budget stops cleanly, the label set is in the
saved config, and bad input is a one-line error before any compute."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from tests.cli_helpers import run_cli
from tests.test_eval_cli import bert_dir, files, word_tokenizer  # noqa: F401  (module fixtures)
from tritpress.analyzers.quality import finetune as ft
from tritpress.analyzers.quality.encode import collate
from tritpress.analyzers.quality.finetune_data import epoch_batches
from tritpress.analyzers.quality.finetune_loop import Schedule
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import atomic_dir


def config(bert_dir, files, tmp_path, **kw) -> ft.FinetuneConfig:
    base = dict(model=str(bert_dir), task="cls", train=str(files / "train.tsv"), dev=str(files / "dev.tsv"),
                out=str(tmp_path / "ft"), batch_size=8, lr=1e-3, log_every=1)
    return ft.FinetuneConfig(**{**base, **kw})


def saved_weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------ batches


@pytest.mark.parametrize("group", [1, 4, 50])
def test_length_grouped_batches_cover_every_example_once_per_epoch(group):
    lengths = [random.Random(i).randint(3, 60) for i in range(203)]
    for epoch in range(3):
        batches = epoch_batches(lengths, 16, group, seed=7, epoch=epoch)
        flat = [k for b in batches for k in b]
        assert sorted(flat) == list(range(203)) and len(flat) == 203
        assert sum(len(b) < 16 for b in batches) <= -(-203 // (16 * group))  # short only at a chunk's end
    assert epoch_batches(lengths, 16, group, 7, 1) == epoch_batches(lengths, 16, group, 7, 1)  # seeded
    assert epoch_batches(lengths, 16, group, 7, 1) != epoch_batches(lengths, 16, group, 7, 2)  # reshuffled


def test_length_grouping_pads_less_than_a_plain_shuffle():
    lengths = [random.Random(i).randint(3, 60) for i in range(1000)]

    def padding(batches):
        return sum(max(lengths[k] for k in b) * len(b) - sum(lengths[k] for k in b) for b in batches)
    assert padding(epoch_batches(lengths, 16, 50, 0, 0)) < padding(epoch_batches(lengths, 16, 1, 0, 0)) / 5


def test_collate_pads_to_the_longest_feature_of_the_batch():
    batch = collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [1, -100, 2]},
                     {"input_ids": [5], "attention_mask": [1], "labels": [0]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, -100, 2], [0, -100, -100]]
    scalar = collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], pad_id=9)
    assert scalar["labels"].tolist() == [1, 0] and scalar["input_ids"].tolist() == [[1, 2], [3, 9]]


def test_warmup_then_linear_decay_and_a_shortened_end():
    f = Schedule(100, 0.1)
    assert f(0) == 0 and f(5) == 0.5 and f(10) == 1 and f(55) == 0.5 and f(100) == 0
    assert Schedule(10, 0.0)(0) == 1
    assert not f.shorten(5, 50) and not f.shorten(55, 120)  # not during the warm-up, never later
    assert f.shorten(55, 75) and f(55) == 0.5 and f(65) == 0.25 and f(75) == 0 and f.total == 75


# ------------------------------------------------------------------ the best checkpoint


def test_the_best_dev_checkpoint_is_the_one_saved(bert_dir, files, tmp_path, monkeypatch):
    """A fake dev metric that peaks at the second evaluation: those weights are saved, not the last."""
    values, seen = iter([50.0, 90.0, 70.0, 60.0]), []

    def fake_scorer(task, tok, files_, cfg):
        def score(model):
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
            return {"accuracy": next(values), "macro_f1": 0.0}
        return score
    monkeypatch.setattr(ft, "dev_scorer", fake_scorer)
    info = ft.finetune_head(config(bert_dir, files, tmp_path, epochs=2, eval_every=4))
    assert [p["step"] for p in info["dev_curve"]] == [4, 6, 8, 12]  # every 4 steps and each epoch end (6 batches)
    assert info["best"]["step"] == 6 and info["best"]["metrics"]["accuracy"] == 90.0
    assert info["steps"] == 12 and info["stopped"] == "completed"
    saved = saved_weights(tmp_path / "ft")
    assert all(torch.equal(saved[k], seen[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], seen[3][k]) for k in saved)
    on_disk = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert on_disk["best"]["step"] == 6 and on_disk["wall_seconds"] >= 0 and len(on_disk["dev_curve"]) == 4


@pytest.mark.parametrize("task,train,dev,metric", [("cls", "train.tsv", "dev.tsv", "accuracy"),
                                                  ("tok", "train.conll", "dev.conll", "f1_strict")])
def test_dev_scores_are_the_evaluation_numbers_and_labels_are_in_the_config(bert_dir, files, tmp_path, task, train,
                                                                           dev, metric):
    from tritpress.analyzers.quality import EvalConfig, evaluate
    cfg = config(bert_dir, files, tmp_path, task=task, train=str(files / train), dev=str(files / dev), steps=6)
    info = ft.finetune_head(cfg)
    out = tmp_path / "ft"
    saved = json.loads((out / "config.json").read_text())
    assert list(saved["id2label"].values()) == info["labels"] and saved["label2id"] == {
        n: i for i, n in enumerate(info["labels"])}
    report = evaluate(EvalConfig(compressed=str(out), baseline=str(out), tasks=task, quiet=True, plots=False,
                                 cls_data=str(files / "dev.tsv"), tok_data=str(files / "dev.conll"),
                                 out=str(tmp_path / "rep")))
    entry = report["tasks"][task]["compressed"]
    assert entry["head"] == "own" and entry["metrics"][metric] == info["best"]["metrics"][metric]


def test_same_seed_same_run_other_seed_other_run(bert_dir, files, tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        info = ft.finetune_head(config(bert_dir, files, tmp_path, out=str(tmp_path / name), seed=seed, epochs=2))
        runs.append((info["dev_curve"], info["loss_curve"], saved_weights(tmp_path / name)))
    (curve_a, loss_a, w_a), (curve_b, loss_b, w_b), (_, loss_c, w_c) = runs
    strip = lambda curve: [{k: v for k, v in p.items() if k not in ("eval_seconds", "elapsed_minutes")}  # noqa: E731
                           for p in curve]
    assert strip(curve_a) == strip(curve_b) and loss_a == loss_b
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert loss_a != loss_c and not all(torch.equal(w_a[k], w_c[k]) for k in w_a)


def test_max_minutes_stops_cleanly_and_keeps_the_best(bert_dir, files, tmp_path, capsys):
    code, text, err = run_cli(["finetune-head", bert_dir, "--task", "cls", "--train", files / "train.tsv",
                               "--dev", files / "dev.tsv", "--out", tmp_path / "ft", "--epochs", 50,
                               "--batch-size", 8, "--max-minutes", 1e-6], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert info["stopped"] == "max_minutes" and info["steps"] == 1 and info["planned_steps"] == 300
    assert [p["step"] for p in info["dev_curve"]] == [1] and info["best"]["step"] == 1
    assert "--max-minutes reached" in err and "dev step 1" in err and "best dev accuracy" in text


def test_out_is_replaced_only_when_it_is_an_earlier_output(bert_dir, files, tmp_path):
    cfg = config(bert_dir, files, tmp_path, steps=2, dev="")
    ft.finetune_head(cfg)
    ft.finetune_head(cfg)  # an earlier output: replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ft.")]  # no temporary folder left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TritpressError, match="not a finetune-head output"):
        ft.finetune_head(config(bert_dir, files, tmp_path, steps=2, out=str(other)))
    with pytest.raises(TritpressError, match="refusing"):
        ft.finetune_head(config(bert_dir, files, tmp_path, steps=2, out=str(bert_dir)))


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash")
    assert (out / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------ one-line errors, before any compute


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a model is loaded or trained."""
    import transformers

    def forbidden(*a, **k):
        raise AssertionError("compute started before the input was checked")
    for name in ft.AUTO_CLASSES.values():
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", forbidden)
    monkeypatch.setattr(ft, "run_training", forbidden)


def _bad_files(tmp_path):
    (tmp_path / "nolabel.tsv").write_text("sentence\tscore\ngood film \t1\nbad film \t0\n")
    (tmp_path / "dev3.tsv").write_text("sentence\tlabel\ngood film \t1\nso so \t2\n")
    (tmp_path / "notqa.jsonl").write_text('{"question": "who?", "context": "bob"}\n')
    (tmp_path / "dev_org.conll").write_text("acme B-ORG\nwent O\n")
    return tmp_path


@pytest.mark.parametrize("task,train,dev,message", [
    ("cls", "nolabel.tsv", None, "no label column"),
    ("cls", "train.tsv", "--label-column=stars", "has no column 'stars'"),
    ("tok", "train.tsv", None, "not IOB tags"),
    ("qa", "notqa.jsonl", None, "not SQuAD-style"),
    ("cls", "train.tsv", "dev3.tsv", "that the training data does not have"),
    ("tok", "train.conll", "dev_org.conll", "that the training data"),
])
def test_bad_data_is_a_one_line_error_before_any_compute(bert_dir, files, tmp_path, capsys, no_compute, task, train,
                                                         dev, message):
    bad = _bad_files(tmp_path)
    where = lambda name: files / name if (files / name).exists() else bad / name  # noqa: E731
    args = ["finetune-head", bert_dir, "--task", task, "--train", where(train), "--out", tmp_path / "ft"]
    extra = [dev] if dev and dev.startswith("--") else ["--dev", where(dev)] if dev else []
    code, _, err = run_cli(args + extra, capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_task_that_does_not_match_the_models_head_is_refused(files, tmp_path, capsys, no_compute):
    from transformers import BertConfig, BertForTokenClassification
    tok = word_tokenizer()
    model = BertForTokenClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=4))
    model.save_pretrained(tmp_path / "ner")
    tok.save_pretrained(tmp_path / "ner")
    code, _, err = run_cli(["finetune-head", tmp_path / "ner", "--task", "cls", "--train", files / "train.tsv",
                            "--out", tmp_path / "ft"], capsys)
    assert code == 1 and "token classification (NER) head" in err and "--task tok" in err, err
    code, _, err = run_cli(["finetune-head", tmp_path / "ner", "--task", "tok", "--train", files / "train.conll",
                            "--out", tmp_path / "ft"], capsys)  # same kind, but 4 generic labels for 3 tags
    assert code == 1 and "head has the labels" in err, err
    code, _, err = run_cli(["finetune-head", tmp_path / "ner", "--task", "cls", "--train", files / "train.tsv",
                            "--out", tmp_path / "ft", "--metric", "f1_strict"], capsys)
    assert code == 1 and "--metric" in err, err


def test_fit_budget_shortens_the_schedule_to_end_in_time(bert_dir, files, tmp_path, monkeypatch):
    """A fake clock, one second per step: 30 s of budget for 300 planned steps -> the decay ends at step 30."""
    from tritpress.analyzers.quality import finetune_loop

    class Clock:
        now = 0.0

        def monotonic(self):
            return self.now
    clock, real_step, lrs = Clock(), finetune_loop.train_step, []

    def one_second_step(model, opt, sched, batch):
        clock.now += 1.0
        lrs.append(sched.get_last_lr()[0])
        return real_step(model, opt, sched, batch)
    monkeypatch.setattr(finetune_loop, "time", clock)
    monkeypatch.setattr(ft, "time", clock)
    monkeypatch.setattr(finetune_loop, "train_step", one_second_step)
    cfg = config(bert_dir, files, tmp_path, epochs=50, max_minutes=0.5, fit_budget=True, log_every=5, dev="")
    info = ft.finetune_head(cfg)
    assert info["planned_steps"] == 300 and info["scheduled_steps"] == 30 and info["steps"] == 30
    assert info["stopped"] == "completed" and lrs[19] == pytest.approx(1e-3 * 281 / 282)  # warm-up 18 steps, decay
    assert lrs[-1] == pytest.approx(1e-3 * 280 / 282 / 10)  # shortened at step 20: a tenth of the way left at 29
    info = ft.finetune_head(dataclasses.replace(cfg, fit_budget=False, out=str(tmp_path / "plain")))
    assert info["scheduled_steps"] == 300 and info["steps"] == 31 and info["stopped"] == "max_minutes"


def test_atomic_dir_output_has_the_umasks_permissions(tmp_path):
    import os
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("1")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_qa_dev_from_the_training_file_is_only_the_articles_left_out(files, tmp_path):
    """--qa-articles 0.5 with --dev = the training file: the dev split is the other half of the
    articles, so the checkpoint is never picked on questions it trained on."""
    from tritpress.analyzers.quality.finetune_data import _read_qa
    squad = str(files / "squad.json")
    cfg = ft.FinetuneConfig(model="x", task="qa", train=squad, dev=squad, qa_articles=0.5)
    train, dev, _ = _read_qa(cfg)
    seen, unseen = {e.article for e in train.examples}, {e.article for e in dev.examples}
    assert seen and unseen and not seen & unseen
    copy = tmp_path / "other.json"
    copy.write_text((files / "squad.json").read_text())
    _, whole, _ = _read_qa(dataclasses.replace(cfg, dev=str(copy)))   # another file: used as given
    assert {e.article for e in whole.examples} == seen | unseen
