"""`compress evaluate` end to end on tiny models and tiny local files in the standard formats:
the probe protocol on a bare encoder (all four tasks), the models' own heads, the gate failing
on a broken (zeroed) model with a non-zero exit, errors as one line, and the pipeline stage."""
from __future__ import annotations

import json
import random

import pytest
import torch

from tritpress.analyzers.quality import EvalConfig, evaluate
from tests.cli_helpers import run_cli

NAMES = ["alice", "bob", "carol", "dave"]
PLACES = ["paris", "rome", "oslo"]
VERBS = ["went", "flew", "walked", "drove"]
GOOD, BAD = ["good", "great", "fine"], ["bad", "awful", "poor"]
FILLER = ["to", "the", "a", "film", "was", "very", "and", "then", "home", "?", "who", "where", "did", "go", "."]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + sorted(set(NAMES + PLACES + VERBS + GOOD + BAD + FILLER))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def sentence(r: random.Random) -> tuple[list[str], list[str]]:
    who, where = r.choice(NAMES), r.choice(PLACES)
    words = [who, r.choice(VERBS), "to", where, "."]
    return words, ["B-PER", "O", "O", "B-LOC", "O"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    r = random.Random(0)
    (d / "lm.txt").write_text("\n".join(" ".join(sentence(r)[0]) for _ in range(60)) + "\n")
    for name, n in (("train.tsv", 48), ("dev.tsv", 24)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            rows.append(f"the film was very {r.choice(GOOD if label else BAD)} \t{label}")
        (d / name).write_text("\n".join(rows) + "\n")
    for name, n in (("train.conll", 40), ("dev.conll", 20)):
        lines = ["-DOCSTART- -X- -X- O", ""]
        for _ in range(n):
            w, t = sentence(r)
            lines += [f"{a} X X {b.replace('B-', 'I-')}" for a, b in zip(w, t)] + [""]  # IOB1, as CoNLL ships it
        (d / name).write_text("\n".join(lines))
    articles = []
    for a in range(4):
        paras = []
        for _ in range(3):
            w, _ = sentence(r)
            ctx = " ".join(w)
            paras.append({"context": ctx, "qas": [
                {"id": f"{a}-{len(paras)}-w", "question": "who went ?",
                 "answers": [{"text": w[0], "answer_start": 0}]},
                {"id": f"{a}-{len(paras)}-p", "question": "where did they go ?",
                 "answers": [{"text": w[3], "answer_start": ctx.index(" to ") + 4}]}]})
        articles.append({"title": f"art{a}", "paragraphs": paras})
    (d / "squad.json").write_text(json.dumps({"version": "1.1", "data": articles}))
    return d


def _save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory, files):
    """A tiny GPT-2 trained for a few steps on lm.txt (so it beats uniform), and a zeroed copy."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = word_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=1))
    ids = torch.tensor(tok(files.joinpath("lm.txt").read_text(), add_special_tokens=False)["input_ids"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        b = ids[(step * 32) % (len(ids) - 33):][:33].unsqueeze(0)
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("gpt2")
    good = _save(model.eval(), tok, root / "good")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return good, _save(model, tok, root / "zeroed")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel
    tok = word_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return _save(BertModel(cfg).eval(), tok, tmp_path_factory.mktemp("bert") / "bert")


def test_lm_gate_passes_on_itself_and_fails_on_zeroed_model(gpt2_dirs, files, tmp_path, capsys):
    good, zeroed = gpt2_dirs
    common = ["--tasks", "lm", "--lm-data", files / "lm.txt", "--context", 32, "--stride", 16, "--no-plots"]
    code, out, err = run_cli(["evaluate", good, "--baseline", good, "--out", tmp_path / "same", *common], capsys)
    assert code == 0, err
    assert "gate: PASS" in out
    report = json.loads((tmp_path / "same" / "report.json").read_text())
    assert [r["metric"] for r in report["rows"]] == ["perplexity", "bits_per_byte"]
    assert all(r["delta"] == 0 and r["head"] == "own" for r in report["rows"])
    vocab = len(word_tokenizer())
    assert report["rows"][0]["baseline"] < vocab / 2  # trained: far below uniform
    prot = report["tasks"]["lm:" + files.name + "/lm.txt"]["compressed"]["protocol"]
    assert prot["context"] == 32 and prot["stride"] == 16 and prot["kind"] == "causal"

    code, out, err = run_cli(["evaluate", zeroed, "--baseline", good, "--out", tmp_path / "zero", *common], capsys)
    assert code == 1
    assert "FAIL" in out and "gate: FAIL" in out and "Traceback" not in err
    report = json.loads((tmp_path / "zero" / "report.json").read_text())
    assert report["passed"] is False
    assert report["rows"][0]["compressed"] == pytest.approx(vocab, rel=1e-4)  # zero weights: uniform over the vocab
    assert (tmp_path / "zero" / "report.md").read_text().count("FAIL") >= 2


def test_probe_protocol_all_four_tasks_on_packed_encoder(bert_dir, files, tmp_path, capsys):
    packed = tmp_path / "packed"
    code, _, err = run_cli([bert_dir, "--out", packed], capsys)  # post-training ternary
    assert code == 0, err
    code, out, err = run_cli([
        "evaluate", packed, "--baseline", bert_dir, "--tasks", "lm,cls,tok,qa",
        "--lm-data", files / "lm.txt", "--lm-train", files / "lm.txt", "--mlm-positions", 40, "--context", 16,
        "--probe-samples", 8, "--lm-probe-windows", 8,
        "--cls-data", files / "dev.tsv", "--cls-train", files / "train.tsv",
        "--tok-data", files / "dev.conll", "--tok-train", files / "train.conll",
        "--qa-data", files / "squad.json", "--qa-max-length", 24, "--doc-stride", 8,
        "--probe-epochs", 3, "--max-drop", "perplexity=1000%", "--out", tmp_path / "rep"], capsys)
    assert code in (0, 1), err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {r["task"].split(":")[0] for r in report["rows"]} == {"lm", "cls", "tok", "qa"}
    assert all(r["head"] == "probe" for r in report["rows"])
    assert report["tasks"]["qa"]["data"]["split_by_article"].startswith(str(files / "squad.json"))
    tok = report["tasks"]["tok"]["compressed"]["protocol"]
    assert tok["eval_sentences"] == 20 and tok["probe_train_sentences"] == 8
    for f in ("report.md", "quality_deltas.png", "size_breakdown.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0
    assert "probe" in (tmp_path / "rep" / "report.md").read_text()
    assert code == (0 if report["passed"] else 1)


def test_own_heads_are_used(files, tmp_path):
    from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                              BertForTokenClassification)
    tok = word_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    torch.manual_seed(0)
    heads = {"cls": BertForSequenceClassification(BertConfig(num_labels=2, **cfg)),
             "tok": BertForTokenClassification(BertConfig(id2label=dict(enumerate(tags)),
                                                          label2id={t: i for i, t in enumerate(tags)}, **cfg)),
             "qa": BertForQuestionAnswering(BertConfig(**cfg))}
    for task, model in heads.items():
        path = _save(model.eval(), tok, tmp_path / task)
        report = evaluate(EvalConfig(compressed=str(path), baseline=str(path), tasks=task, quiet=True, plots=False,
                                     cls_data=str(files / "dev.tsv"), tok_data=str(files / "dev.conll"),
                                     qa_data=str(files / "squad.json"), qa_max_length=24, doc_stride=8,
                                     out=str(tmp_path / f"rep_{task}")))
        assert report["passed"] and report["rows"], task
        assert all(r["head"] == "own" and r["delta"] == 0 for r in report["rows"])


@pytest.mark.parametrize("tokens", [50, 117])
def test_lm_tokens_scores_the_number_asked_for(gpt2_dirs, files, tmp_path, capsys, tokens):
    """Lines of hundreds of tokens: the text is cut inside the line that reaches N, not after it."""
    good, _ = gpt2_dirs
    lines = files.joinpath("lm.txt").read_text().splitlines()
    long_lines = tmp_path / "long.txt"
    long_lines.write_text("\n".join(" ".join(lines[i::3]) for i in range(3)) + "\n")  # ~100 words a line
    code, _, err = run_cli(["evaluate", good, "--baseline", good, "--out", tmp_path / "e", "--tasks", "lm",
                            "--lm-data", long_lines, "--lm-tokens", tokens, "--context", 32, "--no-plots"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    prot = next(iter(report["tasks"].values()))["compressed"]["protocol"]
    assert prot["scored_tokens"] == tokens and prot["lines"] == (1 if tokens < 100 else 2)
    assert 0 < prot["bytes"] < len("\n".join(long_lines.read_text().splitlines()[:prot["lines"]]))


def test_errors_are_one_line(gpt2_dirs, files, tmp_path, capsys):
    good, _ = gpt2_dirs
    for args, msg in (
        (["--tasks", "lm,nope"], "unknown task"),
        (["--tasks", "lm", "--max-drop", "perplexity"], "bad --max-drop"),
        (["--tasks", "lm", "--lm-data", tmp_path / "missing.txt"], "no such data file"),
        (["--tasks", "cls", "--cls-data", files / "dev.tsv"], "--cls-train"),  # GPT-2 has no cls head
    ):
        code, _, err = run_cli(["evaluate", good, "--baseline", good, "--out", tmp_path / "e", *args], capsys)
        assert code == 1 and msg in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1


def test_pipeline_stage(gpt2_dirs, files, tmp_path, capsys):
    good, _ = gpt2_dirs
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[eval]\nlm_data = ["{files / "lm.txt"}"]\ncontext = 32\nplots = false\n'
                      'max_drop = ["perplexity=100000%", "bits_per_byte=100000%"]\n')
    code, out, err = run_cli([good, "--out", tmp_path / "o", "--tasks", "lm", "--recipe", recipe], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    ev = report["evaluation"]
    assert ev["passed"] and [r["metric"] for r in ev["rows"]] == ["perplexity", "bits_per_byte"]
    assert (tmp_path / "o" / "eval" / "report.md").exists() and "gate: PASS" in out


def test_two_processes_give_the_numbers_of_one(gpt2_dirs, files, tmp_path):
    """torchrun, 2 gloo workers: examples sharded by batch, results gathered in order -> identical rows."""
    import os
    import subprocess
    import sys
    good, zeroed = gpt2_dirs
    settings = dict(lm_data=[str(files / "lm.txt")], context=16, stride=8, batch_size=2, plots=False,
                    cls_data=str(files / "dev.tsv"), cls_train=str(files / "train.tsv"), probe_epochs=2)
    one = evaluate(EvalConfig(compressed=str(zeroed), baseline=str(good), tasks="lm,cls", out=str(tmp_path / "one"),
                              quiet=True, **settings))
    flags = ["--lm-data", files / "lm.txt", "--context", 16, "--stride", 8, "--batch-size", 2, "--no-plots",
             "--cls-data", files / "dev.tsv", "--cls-train", files / "train.tsv", "--probe-epochs", 2]
    cmd = [sys.executable, "-m", "tritpress.cli.main", "evaluate", zeroed, "--baseline", good, "--tasks", "lm,cls",
           "--out", tmp_path / "two", "--nproc", 2, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the zeroed model fails the gate, on 2 ranks too
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["environment"]["processes"] == 2 and one["environment"]["processes"] == 1
    key = lambda r: (r["task"], r["metric"], r["baseline"], r["compressed"])  # noqa: E731
    assert [key(r) for r in one["rows"]] == [key(r) for r in two["rows"]]
    assert {r["task"].split(":")[0] for r in one["rows"]} == {"lm", "cls"}


@pytest.mark.parametrize("task,data", [("cls", "train.tsv"), ("tok", "train.conll"), ("qa", "squad.json")])
def test_finetune_head_builds_a_baseline_with_its_own_head(bert_dir, files, tmp_path, capsys, task, data):
    out = tmp_path / "ft"
    code, text, err = run_cli(["finetune-head", bert_dir, "--task", task, "--train", files / data, "--out", out,
                               "--steps", 4, "--batch-size", 8, "--qa-max-length", 24, "--doc-stride", 8], capsys)
    assert code == 0, err
    assert "fine-tuned" in text and (out / "config.json").exists() and (out / "finetune.json").exists()
    report = evaluate(EvalConfig(compressed=str(out), baseline=str(out), tasks=task, quiet=True, plots=False,
                                 cls_data=str(files / "dev.tsv"), tok_data=str(files / "dev.conll"),
                                 qa_data=str(files / "squad.json"), qa_max_length=24, doc_stride=8,
                                 out=str(tmp_path / "rep")))
    assert report["rows"] and all(r["head"] == "own" for r in report["rows"])
    code, _, err = run_cli(["finetune-head", bert_dir, "--task", "nope", "--train", files / data, "--out", out],
                           capsys)
    assert code == 1 and "--task" in err


def test_rnn_lm_packed_with_skeleton(files, tmp_path, capsys):
    """A saved nn.Module LSTM LM (no tokenizer: word vocabulary from the text), packed, then
    evaluated against the original: the stream perplexity path with carried state."""
    from tests.tiny_models import build
    pt = tmp_path / "lstm.pt"
    torch.save(build("lstm"), pt)
    code, _, err = run_cli([pt, "--trust-pickle", "--out", tmp_path / "packed"], capsys)
    assert code == 0, err
    report = evaluate(EvalConfig(compressed=str(tmp_path / "packed"), baseline=str(pt), trust_pickle=True,
                                 tasks="lm", lm_data=[str(files / "lm.txt")], context=16, quiet=True, plots=False,
                                 max_drop=["perplexity=1000%", "bits_per_byte=1000%"], out=str(tmp_path / "rep")))
    entry = report["tasks"][f"lm:{files.name}/lm.txt"]
    assert entry["baseline"]["protocol"]["kind"] == "rnn" and report["passed"]
    assert entry["baseline"]["protocol"]["scored_tokens"] == entry["baseline"]["protocol"]["tokens"] - 1
    assert entry["baseline"]["metrics"]["perplexity"] != entry["compressed"]["metrics"]["perplexity"]
