"""`compress evaluate` on real-world input: the Δ interval in every output, a POS-tagged
(non-IOB) file, a failing task that keeps the others' results, and bad input refused in one
line before any model runs."""
from __future__ import annotations

import json
import random

import pytest
import torch

from tritpress.analyzers.quality import EvalConfig, Task, TaskData, evaluate, registered
from tritpress.analyzers.quality import data as qdata
from tritpress.analyzers.quality.metrics import Metric
from tests.cli_helpers import run_cli
from tests.test_eval_cli import bert_dir, files, gpt2_dirs, word_tokenizer, _save  # noqa: F401 (fixtures)
from tests.test_eval_data import SHARED, needs_data

POS = {"alice": "NP", "bob": "NP", "carol": "NP", "dave": "NP", "went": "VBD", "flew": "VBD", "walked": "VBD",
       "drove": "VBD", "to": "IN", "paris": "NP-TL", "rome": "NP-TL", "oslo": "NP-TL", ".": "."}


@pytest.fixture(scope="module")
def pos_files(tmp_path_factory):
    """CoNLL-style files whose tag column holds POS tags (Brown-style: NP, VBD, NP-TL): not IOB."""
    from tests.test_eval_cli import sentence
    d, r = tmp_path_factory.mktemp("pos"), random.Random(1)
    for name, n in (("train.pos", 30), ("dev.pos", 12)):
        lines = []
        for _ in range(n):
            words, _ = sentence(r)
            lines += [f"{w} {POS[w]}" for w in words] + [""]
        (d / name).write_text("\n".join(lines))
    return d


def test_the_interval_is_in_every_output(bert_dir, files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "rep"
    code, text, err = run_cli(["evaluate", bert_dir, "--baseline", bert_dir, "--tasks", "cls,tok", "--no-plots",
                               "--cls-data", files / "dev.tsv", "--cls-train", files / "train.tsv",
                               "--tok-data", files / "dev.conll", "--tok-train", files / "train.conll",
                               "--probe-epochs", 2, "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    for row in report["rows"]:  # the same model twice: Δ is 0 on every resample
        assert row["delta_ci95"] == [0.0, 0.0] and row["note"] == "within noise"
        assert row["n"] == (24 if row["task"] == "cls" else 20)
    assert report["tasks"]["tok"]["bootstrap"]["unit"] == "sentence"
    assert "per_example" not in json.dumps(report)  # the statistics stay out of report.json
    assert "Δ 95% CI" in text and "within noise" in text and "n=24" in text
    assert "within noise" in (out / "report.md").read_text()


def test_pos_tags_are_scored_as_plain_tags(bert_dir, pos_files, tmp_path):  # noqa: F811
    """Before: KeyError 'A'-style crash in the entity parser. Now: token accuracy and tag macro-F1."""
    assert qdata.read_tok(str(pos_files / "dev.pos"), "validation").scheme == "plain"
    report = evaluate(EvalConfig(compressed=str(bert_dir), baseline=str(bert_dir), tasks="tok", quiet=True,
                                 plots=False, tok_data=str(pos_files / "dev.pos"),
                                 tok_train=str(pos_files / "train.pos"), probe_epochs=2, out=str(tmp_path / "r")))
    assert [r["metric"] for r in report["rows"]] == ["token_accuracy", "tag_macro_f1"]
    assert report["passed"] and all(r["n"] == 12 for r in report["rows"])
    tok = report["tasks"]["tok"]
    assert tok["data"]["tag_scheme"] == "plain" and "plain tags" in tok["compressed"]["protocol"]["tagging"]
    assert "f1_lenient" not in tok["compressed"]["metrics"]


def test_ragged_jsonl_is_refused_in_one_line(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"text": "good", "label": "1"}\n{"text": "bad"}\n')
    with pytest.raises(Exception, match="example 2 has no 'label' column"):
        qdata.read_cls(str(tmp_path / "r.jsonl"), "validation")


def test_tag_scheme_flag(pos_files, files):  # noqa: F811
    with pytest.raises(Exception, match="are not IOB2"):
        qdata.read_tok(str(pos_files / "dev.pos"), "validation", scheme="iob2")
    as_plain = qdata.read_tok(str(files / "dev.conll"), "validation", scheme="plain")
    assert as_plain.plain and any(t.startswith("I-") for s in as_plain.tags for t in s)  # kept as written
    assert qdata.read_tok(str(files / "dev.conll"), "validation").scheme == "iob1"


@needs_data
def test_conll2000_chunks_are_iob_and_its_pos_column_plain(tmp_path):
    path = SHARED / "conll2000" / "test.txt.gz"
    assert qdata.read_tok(str(path), "test").scheme == "iob2"
    pos = qdata.read_conll(path, tag_column=1)
    assert qdata.with_scheme(pos, "auto", str(path)).scheme == "plain"


# ------------------------------------------------------------------ one failing task


GOOD = Metric("good_score")


def _run_ok(task, model, tokenizer, data, cfg, desc):
    return {"metrics": {"good_score": 50.0}, "protocol": {}, "head": "own"}


def _run_broken(task, model, tokenizer, data, cfg, desc):
    raise KeyError("A")  # what an unexpected failure in a runner looks like


def _read(task, cfg, need_train):
    return [TaskData(task.name, test=[1])]


def test_a_failing_task_keeps_the_others_results(gpt2_dirs, tmp_path, capsys):  # noqa: F811
    good, _ = gpt2_dirs
    ok = Task("okay", "works", (GOOD,), _read, _run_ok, needs_probe=lambda *_: False)
    broken = Task("broken", "raises", (GOOD,), _read, _run_broken, needs_probe=lambda *_: False)
    later = Task("later", "after the failure", (GOOD,), _read, _run_ok, needs_probe=lambda *_: False)
    with registered(ok), registered(broken), registered(later):
        code, out, err = run_cli(["evaluate", good, "--baseline", good, "--tasks", "okay,broken,later",
                                  "--no-plots", "--out", tmp_path / "rep"], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "task broken failed: KeyError: 'A'" in err, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [r["task"] for r in report["rows"]] == ["okay", "later"]
    assert report["tasks"]["broken"]["error"] == "KeyError: 'A'" and report["errors"] == {"broken": "KeyError: 'A'"}
    assert report["passed"] is False
    assert "ERROR: KeyError" in out and "ERROR" in (tmp_path / "rep" / "report.md").read_text()


# ------------------------------------------------------------------ bad input, before compute


def _cls_model(tmp_path, id2label):
    from transformers import BertConfig, BertForSequenceClassification
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, id2label=id2label,
                     label2id={v: k for k, v in id2label.items()})
    return _save(BertForSequenceClassification(cfg).eval(), tok, tmp_path / "clsmodel")


def _tok_model(tmp_path, tags):
    from transformers import BertConfig, BertForTokenClassification
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, id2label=dict(enumerate(tags)),
                     label2id={t: i for i, t in enumerate(tags)})
    return _save(BertForTokenClassification(cfg).eval(), tok, tmp_path / "tokmodel")


def _one_line_before_compute(args, msg, out, capsys):
    """Exit 1 with one line naming the problem, and no report: nothing was scored (qa would run first)."""
    code, _, err = run_cli(["evaluate", *args, "--no-plots", "--out", out], capsys)
    assert code == 1 and msg in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "report.json").exists()


def test_bad_input_is_refused_before_compute(files, tmp_path, capsys):  # noqa: F811
    named = _cls_model(tmp_path, {0: "negative", 1: "positive"})
    qa = ["--qa-data", files / "squad.json", "--qa-max-length", 24, "--doc-stride", 8]
    (tmp_path / "cols.tsv").write_text("review\tstars\ngood\t1\n")
    _one_line_before_compute([named, "--baseline", named, "--tasks", "qa,cls", "--cls-data", tmp_path / "cols.tsv",
                              *qa], "no text column", tmp_path / "a", capsys)
    (tmp_path / "names.tsv").write_text("sentence\tlabel\nthe film was good\tpositive\nthe film was bad\tneutral\n")
    _one_line_before_compute([named, "--baseline", named, "--tasks", "qa,cls", "--cls-data", tmp_path / "names.tsv",
                              *qa], "labels ['neutral'] that BertForSequenceClassification's head does not know",
                             tmp_path / "b", capsys)
    tagger = _tok_model(tmp_path, ["O", "B-PER", "I-PER"])
    _one_line_before_compute([tagger, "--baseline", tagger, "--tasks", "cls", "--probe", "never",
                              "--cls-data", files / "dev.tsv"], "--probe never, but BertForTokenClassification has "
                             "no text classification head",
                             tmp_path / "c", capsys)
    _one_line_before_compute([tagger, "--baseline", tagger, "--tasks", "qa,tok", "--tok-data", files / "dev.conll",
                              "--probe", "auto", *qa], "entity types ['LOC']", tmp_path / "d", capsys)


def test_named_labels_are_matched_by_name():
    """A head whose id2label names the classes in another order than the data sorts them; a head
    with generic LABEL_k names (or numeric data labels) is matched by position, as before."""
    from types import SimpleNamespace
    from tritpress.analyzers.quality.cls_task import _class_of_label
    head = lambda id2label: SimpleNamespace(config=SimpleNamespace(id2label=id2label,  # noqa: E731
                                                                   num_labels=len(id2label)))
    assert _class_of_label(head({0: "POSITIVE", 1: "NEGATIVE"}), ["negative", "positive"]) == [1, 0]
    assert _class_of_label(head({0: "LABEL_0", 1: "LABEL_1"}), ["negative", "positive"]) == [0, 1]
    assert _class_of_label(head({0: "positive", 1: "negative"}), ["0", "1"]) == [0, 1]
    with pytest.raises(Exception, match="2 labels, the data 3"):
        _class_of_label(head({0: "LABEL_0", 1: "LABEL_1"}), ["0", "1", "2"])
