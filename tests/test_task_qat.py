"""Task-aware QAT: a fine-tuned classification / tagging / QA model trains on its own task's
examples through its own head (TernaryBERT losses), on tiny random BERTs with a word-piece
tokenizer and tiny files in the standard formats. Task detection, batches (padding, pairs,
first-sub-token labels, QA windows), the loss terms, the LM path unchanged, the CLI end to end
with the --tasks gate, two gloo processes against one, and the one-line errors."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tritpress.analyzers.quality.examples import (head_task, quality_measure, read_task_data, resolve_task,
                                                  task_examples)
from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.errors import TritpressError
from tritpress.compressor.modelio import BlockOutputs, ModelIO, eager_attention
from tritpress.compressor.structure import discover
from tritpress.compressor.train import (TrainConfig, batch_indices, distill_losses, lr_factor, quant_lambda,
                                        task_losses, train_qat)
from tritpress.compressor.transform import convert, get_record, prepare, set_lambda
from tritpress.exporters.packed import load_packed
from tests.test_eval_cli import BAD, FILLER, GOOD, NAMES, PLACES, VERBS, files  # noqa: F401  (fixture)
from tests.test_train import _one_thread, _tail, cli, cli_proc, text_blocks, train_state  # noqa: F401  (fixtures; _one_thread autouse)
from tests.tiny_models import build

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
SPLIT = {"alice": ("ali", "##ce"), "rome": ("ro", "##me")}   # words the tokenizer cuts in two




def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(NAMES + PLACES + VERBS + GOOD + BAD + FILLER) - set(SPLIT))
    vocab = specials + words + [piece for pieces in SPLIT.values() for piece in pieces]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def task_model(task: str, vocab: int, seed: int = 0, **kw):
    from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                              BertForTokenClassification)
    if task == "tok":
        kw = {"id2label": dict(enumerate(TAGS)), "label2id": {t: i for i, t in enumerate(TAGS)}, **kw}
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, **kw)
    torch.manual_seed(seed)
    cls = {"cls": BertForSequenceClassification, "tok": BertForTokenClassification, "qa": BertForQuestionAnswering}
    return cls[task](cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return wordpiece_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    return {task: task_model(task, len(tok)) for task in ("cls", "tok", "qa")}


def _value(t) -> float:
    return float(t.detach())


DATA = {"cls": "train.tsv", "tok": "train.conll", "qa": "squad.json"}


@pytest.fixture(scope="module")
def sources(models, tok, files):  # noqa: F811
    """task -> (training examples, held-out examples) of the tiny files."""
    out = {}
    for task, model in models.items():
        cfg = TrainConfig(data=str(files / DATA[task]), seq_len=32, doc_stride=8)
        train, held_out, _ = task_examples(model, tok, task, cfg)
        out[task] = train, held_out
    return out


# ------------------------------------------------------------------ detection and batches


def test_task_is_detected_from_the_head(models):
    assert {t: resolve_task(m, "auto") for t, m in models.items()} == {"cls": "cls", "tok": "tok", "qa": "qa"}
    assert head_task(build("bert")) is None and resolve_task(build("bert"), "auto") == "lm"
    assert resolve_task(build("gpt2"), "auto") == "lm"
    assert resolve_task(models["cls"], "lm") == "lm" and resolve_task(models["tok"], "tok") == "tok"
    with pytest.raises(TritpressError, match="--task tok does not match.*BertForSequenceClassification.*--task cls"):
        resolve_task(models["cls"], "tok")
    with pytest.raises(TritpressError, match="no cls/tok/qa head"):
        resolve_task(build("bert"), "qa")


def test_cls_batches_pad_each_batch_and_number_labels_as_the_head(tok, tmp_path):
    rows = ["sentence1\tsentence2\tlabel", "alice went home\tthe film was good\tpos",
            "bob\tpoor\tneg", "carol went to rome\tthe film\tpos", "dave\tdave\tneg"]
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    model = task_model("cls", len(tok), id2label={0: "pos", 1: "neg"}, label2id={"pos": 0, "neg": 1})
    cfg = TrainConfig(data=str(tmp_path / "pairs.tsv"), eval_data=str(tmp_path / "pairs.tsv"), seq_len=32)
    train, _, where = task_examples(model, tok, "cls", cfg)
    assert len(train) == train.examples == 4 and where == cfg.eval_data
    b = train.batch([0, 1])
    lengths = [len(tok("alice went home", "the film was good")["input_ids"]), len(tok("bob", "poor")["input_ids"])]
    assert b["input_ids"].shape == (2, max(lengths)) and b["attention_mask"].sum(1).tolist() == lengths
    assert (b["input_ids"][1, lengths[1]:] == tok.pad_token_id).all()
    # [CLS] ali ##ce went home [SEP] | the film was good [SEP]
    assert b["token_type_ids"][0].tolist() == [0] * 6 + [1] * 5 and b["token_type_ids"][1, lengths[1]:].sum() == 0
    assert b["labels"].tolist() == [0, 1]                      # the head's numbers, not the data's sorted order
    assert train.batch([1])["input_ids"].shape == (1, lengths[1])   # padded to this batch's longest only


def test_tok_labels_sit_on_each_words_first_subtoken(sources, tok):
    train, _ = sources["tok"]
    row = next(i for i, f in enumerate(train.features) if tok.convert_ids_to_tokens(f["input_ids"])[1] == "ali")
    b = train.batch([row])
    tokens = tok.convert_ids_to_tokens(b["input_ids"][0].tolist())
    assert tokens[:3] == ["[CLS]", "ali", "##ce"] and tokens[-1] == "[SEP]"
    labels = b["labels"][0].tolist()
    assert labels[0] == labels[2] == labels[-1] == -100                  # [CLS], the second piece, [SEP]
    assert labels[1] == TAGS.index("B-PER")                              # IOB1 I-PER read as IOB2 B-PER
    assert sum(v != -100 for v in labels) == 5                           # one per word


def test_qa_windows_overlap_by_the_doc_stride_and_point_at_the_answer(tok, models, files):  # noqa: F811
    cfg = TrainConfig(data=str(files / "squad.json"), seq_len=12, doc_stride=2)
    train, held_out, _ = task_examples(models["qa"], tok, "qa", cfg)
    assert len(train) > train.examples                                   # long contexts gave several windows
    answered = 0
    for f in train.features:
        s, e = f["start_positions"], f["end_positions"]
        assert len(f["input_ids"]) <= 12 and 0 <= s <= e
        if s:
            answered += 1
            words = tok.convert_tokens_to_string(tok.convert_ids_to_tokens(f["input_ids"][s:e + 1]))
            assert words.replace(" ##", "") in (NAMES + PLACES)
    assert answered >= train.examples                                    # every answer is inside some window
    b = train.batch([0, 1, 2])
    assert set(b) >= {"input_ids", "attention_mask", "start_positions", "end_positions"}


def test_qa_held_out_by_default_is_whole_articles(tok, models, files):  # noqa: F811
    """Without --eval-data, QA holds out the last articles, never questions on a paragraph it trains on."""
    from tritpress.analyzers.quality import data as qdata
    squad = qdata.read_qa(str(files / "squad.json"), "train")
    train, held_out, where = task_examples(models["qa"], tok, "qa", TrainConfig(data=str(files / "squad.json"),
                                                                                seq_len=24, doc_stride=8))
    last = [e for e in squad.examples if e.article == squad.examples[-1].article]
    assert where.startswith("last 1 of 4 articles")
    assert held_out.examples == len(last) and train.examples == squad.size - len(last)


# ------------------------------------------------------------------ losses


def _student(teacher, lam: float):
    student = prepare(copy.deepcopy(teacher), TernaryConfig())
    set_lambda(student, lam)
    return student


def _losses(teacher, student, batch, **kw):
    io = ModelIO.discover(teacher, discover(teacher))
    s_blocks, t_blocks = BlockOutputs(student, io.block_paths), BlockOutputs(teacher, io.block_paths)
    cfg = TrainConfig(label_weight=1.0, **kw)
    try:
        with eager_attention(teacher, student):
            return task_losses(io, student, teacher, batch, s_blocks, t_blocks, cfg, _task_of(teacher))
    finally:
        s_blocks.remove()
        t_blocks.remove()


def _task_of(model) -> str:
    return head_task(model)


@pytest.mark.parametrize("task", ["cls", "tok", "qa"])
def test_loss_terms_are_zero_for_the_teacher_itself_and_finite(task, models, sources):
    teacher, (train, _) = models[task], sources[task]
    batch = train.batch([0, 1, 2, 3])
    same = _losses(teacher, _student(teacher, 0.0), batch)      # lambda 0: fake-quant off
    assert set(same) == {"kd", "hidden", "attention", "label", "loss"}
    assert all(math.isfinite(_value(v)) for v in same.values())
    assert max(abs(_value(same[k])) for k in ("kd", "hidden", "attention")) < 1e-6, same
    assert _value(same["label"]) > 0                                  # gold labels: a random head is wrong
    ternary = _losses(teacher, _student(teacher, 1.0), batch)
    assert all(_value(ternary[k]) > 0 for k in ("kd", "hidden", "attention")), ternary   # random heads: kd is tiny
    assert teacher.config._attn_implementation == "sdpa"            # eager only while training


@pytest.mark.parametrize("task", ["cls", "tok", "qa"])
def test_losses_do_not_depend_on_how_a_batch_is_split_or_padded(task, models, sources):
    teacher, (train, _) = models[task], sources[task]
    lengths = [len(f["input_ids"]) for f in train.features]
    idx = sorted(range(len(lengths)), key=lengths.__getitem__)
    idx = [idx[0], idx[-1], idx[1], idx[-2]]                          # halves padded to different widths
    student = _student(teacher, 1.0)
    whole = _losses(teacher, student, train.batch(idx))
    halves = [_losses(teacher, student, train.batch(idx[:2])), _losses(teacher, student, train.batch(idx[2:]))]
    for k in whole:
        assert _value(whole[k]) == pytest.approx((_value(halves[0][k]) + _value(halves[1][k])) / 2, rel=1e-4), k


def test_lm_blocks_train_exactly_as_the_plain_distillation_loop(text_blocks, tmp_path):  # noqa: F811
    """The token-block path is the documented loop, to the bit: per step the seeded global batch,
    lambda, micro batches of distill_losses, clip, AdamW, LR schedule."""
    cfg = TrainConfig(steps=3, seq_len=16, batch_size=4, micro_batch_size=2, lr=1e-3,
                      checkpoint_every=0).resolved(1)
    teacher = build("gpt2")
    student = prepare(copy.deepcopy(teacher), TernaryConfig())
    reference = copy.deepcopy(student)
    findings = train_qat(student, teacher, discover(teacher), text_blocks, cfg, tmp_path).findings
    assert findings["task"] == "lm" and "train_examples" not in findings
    _plain_loop(reference, teacher, text_blocks, cfg)
    got, want = student.state_dict(), reference.state_dict()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def _plain_loop(student, teacher, blocks, cfg):
    io = ModelIO.discover(student, discover(teacher))
    teacher.eval().requires_grad_(False)
    student.eval()
    s_blocks, t_blocks = BlockOutputs(student, io.block_paths), BlockOutputs(teacher, io.block_paths)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    torch.manual_seed(cfg.seed)
    for step in range(cfg.steps):
        set_lambda(student, quant_lambda(step, cfg))
        ids = blocks[batch_indices(step, len(blocks), cfg.batch_size, cfg.seed)]
        for m0 in range(0, cfg.batch_size, cfg.micro_batch_size):
            loss = distill_losses(io, student, teacher, ids[m0:m0 + cfg.micro_batch_size], s_blocks, t_blocks, cfg)
            (loss["loss"] * (cfg.micro_batch_size / cfg.batch_size)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    teacher.requires_grad_(True)


@pytest.mark.parametrize("task", ["tok", "qa"])
def test_train_qat_on_task_examples(task, models, sources, tmp_path):
    teacher, (train, _) = models[task], sources[task]
    student = prepare(copy.deepcopy(teacher), TernaryConfig())
    cfg = TrainConfig(steps=3, batch_size=4, micro_batch_size=2, lr=1e-3, checkpoint_every=0).resolved(1)
    findings = train_qat(student, teacher, discover(teacher), train, cfg, tmp_path).findings
    assert findings["task"] == task and findings["train_examples"] == len(train) and findings["examples_seen"] == 12
    curve = findings["curve"]
    assert all(math.isfinite(e["loss"]) and e["tokens"] > 0 and e["examples_per_s"] > 0 for e in curve)
    assert findings["tokens"] == sum(e["tokens"] for e in curve)
    assert teacher.config._attn_implementation == student.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("task, metric", [("cls", "accuracy"), ("tok", "token_accuracy"), ("qa", "span_exact")])
def test_held_out_quality_with_the_own_head(task, metric, models, sources):
    teacher, (train, _) = models[task], sources[task]
    measure = quality_measure(teacher, train, batch_size=3)
    own = measure(teacher)
    assert own["agreement"] == 1.0 and 0 <= own[metric] <= 1 and own["scored"] > 0
    other = measure(task_model(task, teacher.config.vocab_size, seed=1))   # another random head
    assert set(other) == set(own) and other["agreement"] < 1.0 and other["scored"] == own["scored"]
    assert set(measure(convert(_student(teacher, 1.0)))) == set(own)


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def cls_work(tmp_path_factory, files):  # noqa: F811
    d = tmp_path_factory.mktemp("task_qat")
    tokenizer = wordpiece_tokenizer()
    task_model("cls", len(tokenizer)).save_pretrained(d / "cls")
    tokenizer.save_pretrained(d / "cls")
    (d / "r.toml").write_text(f'[eval]\ncls_data = "{files / "dev.tsv"}"\nplots = false\n')
    return d


TRAIN_ARGS = ["--steps", 4, "--batch-size", 4, "--seq-len", 32, "--checkpoint-every", 4]


def _cls_args(cls_work, files, out):  # noqa: F811
    return [cls_work / "cls", "--data", files / "train.tsv", "--eval-data", files / "dev.tsv", "--out", out,
            *TRAIN_ARGS]


@pytest.fixture(scope="module")
def run_cls(cls_work, files):  # noqa: F811
    out = cls_work / "one"
    code, stdout, err = cli([*_cls_args(cls_work, files, out), "--tasks", "cls", "--recipe", cls_work / "r.toml"])
    assert code == 0, err
    return out, stdout, err


def test_cls_model_trains_on_its_examples_end_to_end(run_cls, files):  # noqa: F811
    out, stdout, err = run_cls
    report = json.loads((out / "report.json").read_text())
    training = report["training"]
    assert training["task"] == "cls" and training["train_examples"] == 48 and training["eval_examples"] == 24
    assert training["train_data"] == str(files / "train.tsv") and training["examples_seen"] == 16
    assert set(training["quality"]) == {"original", "ternary_post_training", "ternary_qat"}
    for q in training["quality"].values():
        assert 0 <= q["accuracy"] <= 1 and 0 <= q["agreement"] <= 1 and q["scored"] == 24
    assert training["quality"]["original"]["agreement"] == 1.0
    assert {"kd", "hidden", "attention"} <= set(training["final"]) and "label" not in training["final"]
    assert "task: cls (own head), trained on 48 examples" in stdout and "ex/s" in err
    ev = report["evaluation"]                                      # the --tasks gate on the packed file
    assert ev["rows"] and all(r["task"] == "cls" and r["head"] == "own" for r in ev["rows"])
    model = load_packed(out / "model.tritpress.safetensors")
    assert type(model).__name__ == "BertForSequenceClassification"


def test_two_processes_reproduce_one_for_a_task_model(run_cls, cls_work, files):  # noqa: F811
    out = cls_work / "two"
    p = cli_proc([*_cls_args(cls_work, files, out), "--nproc", 2])
    assert p.returncode == 0, _tail(p)
    one, two = train_state(run_cls[0]), train_state(out)
    assert one["step"] == two["step"] == 4
    worst = max((one["model"][k].float() - two["model"][k].float()).abs().max().item() for k in one["model"])
    assert worst <= 1e-5, worst   # each process pads its own half: float summation order only
    for x, y in zip(one["curve"], two["curve"]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["tokens"] == x["tokens"]


@pytest.mark.parametrize("data, extra, message", [
    ("lm.txt", [], "looks like plain text.*--task lm"),
    ("train.tsv", ["--task", "tok"], "--task tok does not match the model"),
    ("three.tsv", [], r"labels \['2'\] that the model's head does not know"),
    ("nocols.tsv", [], "no text column"),
    ("train.conll", [], "unsupported data file"),
])
def test_bad_task_input_is_one_line_before_training(data, extra, message, cls_work, files, tmp_path):  # noqa: F811
    (tmp_path / "three.tsv").write_text("sentence\tlabel\nthe film\t0\nthe film\t2\n")
    (tmp_path / "nocols.tsv").write_text("words\tlab\nthe film\t0\n")
    path = tmp_path / data if data in ("three.tsv", "nocols.tsv") else files / data
    out = tmp_path / "o"
    code, _, err = cli([cls_work / "cls", "--data", path, "--out", out, "--steps", 2, *extra])
    lines = [line for line in err.strip().splitlines() if not line.startswith("[")]   # stage markers
    assert code == 1 and len(lines) == 1 and lines[0].startswith("compress: error:"), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (out / "train").exists() and not (out / "analysis").exists()   # refused before any compute


def test_sharing_a_task_model_calibrates_on_its_own_examples(cls_work, files, tmp_path):  # noqa: F811
    out = tmp_path / "o"
    code, _, err = cli([*_cls_args(cls_work, files, out), "--sharing", "cycle:1", "--share-sequences", 4,
                        "--share-seq-len", 16])
    assert code == 0, err
    sharing = json.loads((out / "report.json").read_text())["sharing"]
    assert sharing["calibration_source"] == "the training examples (--data)"
    cal = sharing["analysis"]["calibration"]
    assert cal["sequences"] == 4 and cal["seq_len"] == 16 and cal["metric"] == "nmse_to_original"
    assert sharing["calibration_loss"]["original"] == 0 < sharing["calibration_loss"]["after_tying"]


def test_example_calibration_blocks_drop_padding_and_spread_over_the_examples():
    from tritpress.compressor.redundancy import example_calibration_ids
    feats = [{"input_ids": [1, 10 + i, 2, 0, 0], "attention_mask": [1, 1, 1, 0, 0]} for i in range(8)]
    ids = example_calibration_ids(feats, sequences=2, seq_len=6)
    assert ids.tolist() == [[1, 10, 2, 1, 11, 2], [1, 16, 2, 1, 17, 2]]   # 4 blocks, first and last kept
    with pytest.raises(TritpressError, match="fewer than one block"):
        example_calibration_ids(feats[:1], sequences=2, seq_len=6)


def test_auto_granularity_is_per_channel_for_a_task_head_only(models):
    for task, model in models.items():
        student = prepare(copy.deepcopy(model), TernaryConfig())
        assert get_record(student).config.granularity == "channel", task
        assert all(f.granularity == "channel" for f in get_record(student).formats.values())
    lm = prepare(build("gpt2"), TernaryConfig())
    assert get_record(lm).config.granularity == "tensor"
    explicit = prepare(copy.deepcopy(models["cls"]), TernaryConfig(granularity="tensor"))
    assert get_record(explicit).config.granularity == "tensor"


def test_task_data_of_the_wrong_kind_is_one_line(models, tok, files, tmp_path):  # noqa: F811
    (tmp_path / "q.jsonl").write_text('{"question": "who ?", "context": "bob went"}\n')
    with pytest.raises(TritpressError, match="is not QA examples.*answers"):
        read_task_data("qa", str(tmp_path / "q.jsonl"), "train")
    (tmp_path / "text.txt").write_text("the film was good\nbob went home .\nwho ?\n")
    with pytest.raises(TritpressError, match="looks like plain text"):
        read_task_data("tok", str(tmp_path / "text.txt"), "train")     # ragged lines: not CoNLL columns
    read_task_data("tok", str(files / "train.conll"), "train")          # CoNLL columns pass
    untagged = task_model("tok", len(tok), id2label=None, label2id=None, num_labels=5)
    with pytest.raises(TritpressError, match="labels .*B-LOC.* that the model's head does not know"):
        task_examples(untagged, tok, "tok", TrainConfig(data=str(files / "train.conll")))


def test_task_lm_distils_plain_text_on_a_task_model(cls_work, files, tmp_path):  # noqa: F811
    code, _, err = cli([cls_work / "cls", "--data", files / "lm.txt", "--task", "lm", "--out", tmp_path / "o",
                        "--steps", 1, "--batch-size", 2, "--seq-len", 8])
    assert code == 0, err
    training = json.loads((tmp_path / "o" / "report.json").read_text())["training"]
    assert training["task"] == "lm" and "train_examples" not in training
