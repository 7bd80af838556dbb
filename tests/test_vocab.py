"""Vocabulary trimming (compressor/vocab): the trimmed model takes and returns the original
tokenizer's ids; kept tokens compute exactly what the untrimmed model does, a dropped id reads
as the unknown token and is scored -inf; trim -> convert -> pack -> reload is exact, the packed
file stores only the kept rows plus the kept-id table, ONNX validates, and `compress
--trim-vocab` reports what was kept, on tiny BERT-, GPT-2- and LLaMA-style models."""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from tests.cli_helpers import run_cli
from tests.tiny_models import FACTORIES, SKELETONS, VOCAB, build, main_output
from tritpress.analyzers.size import size_report
from tritpress.compressor.config import TernaryConfig
from tritpress.compressor.ingest import SourceInfo
from tritpress.compressor.modelio import compare_outputs
from tritpress.compressor.train import student_vocabulary
from tritpress.compressor.transform import convert, tie_groups
from tritpress.compressor.vocab import (TrimmedEmbedding, TrimmedHead, fix_mixes, learn_mixes, mixed_kept_rows,
                                        nearest_kept_rows, trim_model)
from tritpress.exporters.onnx import OnnxConfig, export_onnx, ort_session
from tritpress.exporters.packed import load_packed, read_metadata, save_packed

MODELS = ["bert", "gpt2", "llama_tied", "llama_untied", "lstm_tied"]
UNK = 1
KEEP = list(range(0, VOCAB, 3))          # 0, 3, ..., 99: 34 ids, + the unknown token = 35
KEPT = sorted(set(KEEP) | {UNK})
DROPPED = 2                              # an id outside KEEP
KEPT_IDS = torch.tensor([[0, 3, 6, 9, 12, 15, 18], [99, 96, 1, 30, 30, 60, 3]])


def out(model, ids):
    with torch.no_grad():
        return main_output(model(ids))


def trimmed(name):
    model = build(name)
    t = copy.deepcopy(model)
    findings = trim_model(t, KEEP, UNK)
    return model, t.eval(), findings


def source_for(name, model):
    if FACTORIES[name][1]:
        return SourceInfo("hf", "x", type(model).__name__, model.config.to_dict())
    return SourceInfo("module", "x", "tests.LSTMLM")


def pack_and_load(name, model, path):
    save_packed(model, path, source_for(name, model))
    return load_packed(path, skeleton=SKELETONS[name]()) if name in SKELETONS else load_packed(path)


def has_vocab_head(name):
    return name != "bert"


# ------------------------------------------------------------------ the trimmed float model

@pytest.mark.parametrize("name", MODELS)
def test_kept_tokens_compute_what_the_original_does(name):
    model, t, findings = trimmed(name)
    assert findings["vocab_size"] == VOCAB and findings["kept"] == len(KEPT) == 35
    assert isinstance(t.get_submodule(findings["embedding"]), TrimmedEmbedding)
    a, b = out(model, KEPT_IDS), out(t, KEPT_IDS)
    assert a.shape == b.shape  # full vocabulary out
    if has_vocab_head(name):
        assert isinstance(t.get_submodule(findings["head"]), TrimmedHead)
        assert torch.equal(a[..., KEPT], b[..., KEPT])
        dropped = sorted(set(range(VOCAB)) - set(KEPT))
        assert bool(torch.isneginf(b[..., dropped]).all())
        assert bool((b.softmax(-1)[..., dropped] == 0).all())
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_an_out_of_corpus_id_is_the_unknown_token(name):
    _, t, _ = trimmed(name)
    with_dropped, with_unk = KEPT_IDS.clone(), KEPT_IDS.clone()
    with_dropped[0, 2], with_unk[0, 2] = DROPPED, UNK
    assert torch.equal(out(t, with_dropped), out(t, with_unk))


@pytest.mark.parametrize("name", ["gpt2", "llama_tied", "lstm_tied"])
def test_a_tied_head_stays_tied_to_the_trimmed_embedding(name):
    _, t, f = trimmed(name)
    emb, head = t.get_submodule(f["embedding"]), t.get_submodule(f["head"])
    assert head.proj.weight is emb.table.weight and head.kept_ids is emb.kept_ids
    q = convert(t, TernaryConfig(embedding="int2"))
    assert head.proj.qweight is emb.table.qweight


@pytest.mark.parametrize("name", ["bert", "llama_tied", "lstm_tied"])
def test_a_dropped_id_can_read_its_nearest_kept_token(name, tmp_path):
    """--trim-dropped nearest: a dropped id computes what its nearest kept id (cosine of the original
    embedding rows) computes, before and after convert -> pack -> reload; the map is one int16 tensor
    of a row per dropped id, counted as vocabulary map."""
    import torch.nn.functional as F

    model = build(name)
    t = copy.deepcopy(model)
    f = trim_model(t, KEEP, UNK, "nearest")
    emb = t.get_submodule(f["embedding"])
    assert f["dropped_read_as"] == "nearest" and emb.dropped_rows.dtype == torch.int16
    assert emb.dropped_rows.numel() == VOCAB - len(KEPT)
    original = model.get_submodule(f["embedding"]).weight.detach()
    unit = F.normalize(original, dim=1)
    nearest = KEPT[int((unit[DROPPED] @ unit[KEPT].t()).argmax())]
    assert nearest != UNK  # the tiny models' random rows: the point is that it is not the unknown token
    with_dropped, with_nearest = KEPT_IDS.clone(), KEPT_IDS.clone()
    with_dropped[0, 2], with_nearest[0, 2] = DROPPED, nearest
    assert torch.equal(out(t, with_dropped), out(t, with_nearest))
    q = convert(t, TernaryConfig(embedding="int2"))
    r = pack_and_load(name, q, tmp_path / "m.safetensors")
    assert torch.equal(out(r, with_dropped), out(r, with_nearest)) and torch.equal(out(r, with_dropped),
                                                                                 out(q, with_dropped))
    assert torch.equal(r.get_submodule(f["embedding"]).dropped_rows, emb.dropped_rows)
    report = size_report(tmp_path / "m.safetensors")
    vocab_row = next(c for c in report["components"] if c["component"] == "vocabulary map")
    assert vocab_row["unique_params"] == len(KEPT) + VOCAB - len(KEPT)


@pytest.mark.parametrize("name", ["bert", "llama_tied", "lstm_tied"])
def test_a_dropped_id_can_read_a_mix_of_kept_rows(name, tmp_path):
    """--trim-dropped mix: a dropped id reads the weighted sum of its k kept rows, before and after
    convert -> pack -> reload; rows int16 and weights fp16, [dropped, k] each, counted as vocabulary map."""
    model = build(name)
    t = copy.deepcopy(model)
    f = trim_model(t, KEEP, UNK, "mix", 3)
    emb = t.get_submodule(f["embedding"])
    dropped_n = VOCAB - len(KEPT)
    assert f["dropped_read_as"] == "mix" and f["mix"] == 3
    assert emb.dropped_rows.shape == emb.dropped_coefs.shape == (dropped_n, 3)
    assert emb.dropped_rows.dtype == torch.int16 and emb.dropped_coefs.dtype == torch.float16
    ids = torch.tensor([[DROPPED, KEPT[4]]])
    with torch.no_grad():
        got = emb(ids)
        k = sorted(set(range(VOCAB)) - set(KEPT)).index(DROPPED)
        want = (emb.table.weight[emb.dropped_rows[k].long()] * emb.dropped_coefs[k].float().unsqueeze(1)).sum(0)
        assert torch.allclose(got[0, 0], want, atol=1e-6)
        assert torch.equal(got[0, 1], emb.table.weight[KEPT.index(KEPT[4])])   # a kept id reads its own row
        assert torch.equal(emb.expand(emb.table.weight)[[DROPPED, KEPT[4]]], got[0])
    q = convert(t, TernaryConfig(embedding="int2"))
    r = pack_and_load(name, q, tmp_path / "m.safetensors")
    with_dropped = KEPT_IDS.clone()
    with_dropped[0, 2] = DROPPED
    assert torch.equal(out(r, with_dropped), out(q, with_dropped))
    assert torch.equal(r.get_submodule(f["embedding"]).dropped_coefs, emb.dropped_coefs)
    reloaded_rows = r.get_submodule(f["embedding"]).dropped_rows
    assert reloaded_rows.dtype == torch.int16 and torch.equal(reloaded_rows, emb.dropped_rows)
    # format 4: the rows (positions among 35 kept rows) are stored in 6 bits each, not int16's 16
    entry = read_metadata(tmp_path / "m.safetensors")["tensors"][f"{f['embedding']}.dropped_rows"]
    bits = int(emb.dropped_rows.max()).bit_length()
    assert bits <= 6 and (entry["encoding"], entry["bits"], entry["dtype"]) == ("uintbits", bits, "int16")
    report = size_report(tmp_path / "m.safetensors")
    vocab_row = next(c for c in report["components"] if c["component"] == "vocabulary map")
    assert vocab_row["unique_params"] == len(KEPT) + 2 * 3 * dropped_n


@pytest.mark.parametrize("k", [1, 2, 5])
def test_a_mix_is_at_least_as_close_as_the_nearest_row(k):
    """Least squares over the chosen rows: never further from the original row than the nearest kept
    row itself (up to the fp16 weights), and closer as k grows."""
    torch.manual_seed(k)
    table = torch.randn(60, 16)
    kept = torch.arange(0, 60, 2)
    rows, coefs = mixed_kept_rows(table, kept, k)
    assert rows.shape == coefs.shape == (30, k) and coefs.dtype == torch.float16
    assert all(len(set(r.tolist())) == k for r in rows)          # k distinct rows each
    target = table[1::2]
    mixed = (table[kept][rows] * coefs.float().unsqueeze(2)).sum(1)
    nearest = table[kept][nearest_kept_rows(table, kept)]
    err_mix, err_near = (mixed - target).norm(dim=1), (nearest - target).norm(dim=1)
    assert bool((err_mix <= err_near * (1 + 1e-3) + 1e-3).all())
    if k > 1:
        fewer_rows, fewer_coefs = mixed_kept_rows(table, kept, k - 1)
        fewer = (table[kept][fewer_rows] * fewer_coefs.float().unsqueeze(2)).sum(1)
        assert (mixed - target).norm() < (fewer - target).norm()


def test_trim_refuses_bad_input():
    with pytest.raises(ValueError, match="kept token ids"):
        trim_model(build("gpt2"), [5, VOCAB + 3], UNK)
    with pytest.raises(ValueError, match="unk, nearest or mix"):
        trim_model(build("gpt2"), KEEP, UNK, "closest")
    with pytest.raises(ValueError, match="at least 1 kept row"):
        trim_model(build("gpt2"), KEEP, UNK, "mix", 0)
    q = convert(build("gpt2"))
    with pytest.raises(ValueError, match="before quantizing"):
        trim_model(q, KEEP, UNK)


# ------------------------------------------------------------------ packed file

@pytest.mark.parametrize("fmt", ["int8", "int2", "ternary", "fp16", "int4-g16"])
@pytest.mark.parametrize("name", MODELS)
def test_trim_pack_reload_is_exact(name, fmt, tmp_path):
    _, t, f = trimmed(name)
    kind, _, group = fmt.partition("-g")
    q = convert(t, TernaryConfig(embedding=kind, head=kind, group_size=int(group or 0)))
    r = pack_and_load(name, q, tmp_path / "m.safetensors")
    random_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    for ids in (KEPT_IDS, random_ids):  # random: dropped ids too
        assert torch.equal(out(q, ids), out(r, ids))
    assert torch.equal(r.get_submodule(f["embedding"]).kept_ids, torch.tensor(KEPT, dtype=torch.int32))
    with_dropped = KEPT_IDS.clone()
    with_dropped[1, 1] = DROPPED
    with_unk = KEPT_IDS.clone()
    with_unk[1, 1] = UNK
    assert torch.equal(out(r, with_dropped), out(r, with_unk))
    # the kept-id table is one tensor in the file, also when a head aliases it
    meta = read_metadata(tmp_path / "m.safetensors")
    assert sum(k.endswith("kept_ids") for k in meta["tensors"]) == 1
    assert sorted(map(sorted, tie_groups(r))) == sorted(map(sorted, tie_groups(q)))


@pytest.mark.parametrize("trim,embedding", [(False, "int8"), (False, "int2"), (True, "int8")])
def test_files_are_written_at_format_version_4_with_the_kept_ids_as_a_bitmap(trim, embedding, tmp_path):
    model = trimmed("gpt2")[1] if trim else build("gpt2")
    meta = save_packed(convert(model, TernaryConfig(embedding=embedding)), tmp_path / "m.safetensors",
                       source_for("gpt2", model))
    assert meta["format_version"] == read_metadata(tmp_path / "m.safetensors")["format_version"] == 4
    kept = [e for k, e in meta["tensors"].items() if k.endswith("kept_ids")]
    assert [(e["encoding"], e["universe"], e["shape"]) for e in kept] == ([("bitset", KEPT[-1] + 1, [len(KEPT)])]
                                                                         if trim else [])


def _non_metadata_bytes(rep):
    return {c["component"]: c["bytes"] for c in rep["components"] if c["component"] != "metadata"}


@pytest.mark.parametrize("fmt", ["int8", "int2", "ternary", "fp16"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_untied"])
def test_bytes_go_down_by_the_dropped_rows(name, fmt, tmp_path):
    cfg = TernaryConfig(embedding=fmt, head=fmt)
    full = convert(build(name), copy.deepcopy(cfg))
    _, t, f = trimmed(name)
    q = convert(t, copy.deepcopy(cfg))
    save_packed(full, tmp_path / "full.safetensors", source_for(name, full))
    save_packed(q, tmp_path / "trim.safetensors", source_for(name, q))
    a, b = size_report(tmp_path / "full.safetensors"), size_report(tmp_path / "trim.safetensors")
    dim, n_kept = 32, len(KEPT)

    def table(rows):  # codes + one fp16 scale per row (float formats: no scale)
        code = {"int8": rows * dim, "int2": math.ceil(rows * dim / 4), "ternary": math.ceil(rows * dim / 5),
                "fp16": 2 * rows * dim}[fmt]
        return code + (0 if fmt == "fp16" else 2 * rows)

    tables = 1 if name != "llama_untied" else 2  # bert: no vocab head; gpt2: tied
    id_map = min(4 * n_kept, math.ceil((KEPT[-1] + 1) / 8))  # int32 ids or their bitmap, the smaller
    expected = tables * (table(VOCAB) - table(n_kept)) - id_map
    a_bytes, b_bytes = _non_metadata_bytes(a), _non_metadata_bytes(b)
    assert b_bytes["vocabulary map"] == id_map
    assert sum(a_bytes.values()) - sum(b_bytes.values()) == expected == b["vocabulary"]["bytes_saved"]
    assert b["vocabulary"] == {"vocab_size": VOCAB, "kept": n_kept, "dropped": VOCAB - n_kept,
                               "bytes_saved": expected}
    assert "vocabulary" not in a and os.path.getsize(tmp_path / "trim.safetensors") == b["file_bytes"]


# ------------------------------------------------------------------ ONNX

@pytest.mark.parametrize("fmt,group", [("matmulnbits", 0), ("int2", 0), ("float", 0), ("qgemm", 16), ("int2", 16)])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_untied"])
def test_onnx_takes_original_ids_and_validates(name, fmt, group, tmp_path):
    _, t, f = trimmed(name)
    r = pack_and_load(name, convert(t, TernaryConfig(embedding="int2", head="int4", group_size=group)),
                      tmp_path / "m.safetensors")
    result = export_onnx(r, tmp_path / "m.onnx", OnnxConfig(format=fmt))
    assert result["validation"]["passed"]
    sess = ort_session(tmp_path / "m.onnx")
    names = [i.name for i in sess.get_inputs()]

    def feeds(ids):
        return {n: (ids.numpy() if n == "input_ids" else np.ones(ids.shape, np.int64)) for n in names}

    with_dropped, with_unk = KEPT_IDS.clone(), KEPT_IDS.clone()
    with_dropped[0, 0], with_unk[0, 0] = DROPPED, UNK
    got = sess.run(None, feeds(with_dropped))[0]
    assert np.array_equal(got, sess.run(None, feeds(with_unk))[0])
    assert got.shape[-1] == (VOCAB if has_vocab_head(name) else 32)
    if has_vocab_head(name):
        dropped = sorted(set(range(VOCAB)) - set(KEPT))
        assert np.isneginf(got[..., dropped]).all() and np.isfinite(got[..., KEPT]).all()


# ------------------------------------------------------------------ -inf logits elsewhere

def test_compare_outputs_agrees_on_equal_infinities():
    a = torch.tensor([1.0, float("-inf"), 2.0])
    assert compare_outputs(a, a.clone())["max_abs_diff"] == 0.0
    c = compare_outputs(torch.tensor([1.0, 5.0, 2.0]), a)
    assert c["nonfinite_mismatch"] == 1 and c["max_abs_diff"] == 0.0 and c["shape"] == [3]


def test_distillation_is_over_the_students_vocabulary():
    s = torch.tensor([[[0.5, float("-inf"), 1.0, float("-inf")]]])
    t = torch.tensor([[[0.25, 3.0, 0.5, 0.75]]])
    s2, t2, produced = student_vocabulary(s, t)
    assert produced.tolist() == [True, False, True, False]
    assert s2.tolist() == [[[0.5, 1.0]]] and t2.tolist() == [[[0.25, 0.5]]]
    full = torch.zeros(1, 1, 4)
    assert student_vocabulary(full, t)[2] is None


def test_qat_losses_are_finite_for_a_trimmed_student():
    from tritpress.compressor.modelio import BlockOutputs, ModelIO
    from tritpress.compressor.structure import discover
    from tritpress.compressor.train import TrainConfig, distill_losses
    from tritpress.compressor.transform import prepare

    teacher, t, _ = trimmed("llama_untied")
    student = prepare(t, TernaryConfig(embedding="int2", head="int2"))
    io = ModelIO.discover(teacher, discover(teacher))
    ids = torch.tensor([KEEP[:8], KEEP[8:16]])
    ids[0, 3] = DROPPED  # a target the student cannot produce: ignored, not an infinite loss
    hooks = [BlockOutputs(m, io.block_paths) for m in (student, teacher)]
    losses = distill_losses(io, student, teacher, ids, *hooks, TrainConfig())
    assert set(losses) >= {"kd", "task", "hidden", "loss"}
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    losses["loss"].backward()
    assert student.lm_head.proj.weight.grad is not None


# ------------------------------------------------------------------ the pipeline

WORDS = [f"w{i}" for i in range(VOCAB - 5)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text that uses 20 of the 95 words: with the 5 special tokens, 25 ids are kept."""
    d = tmp_path_factory.mktemp("trim")
    used = WORDS[10:30]
    lines = [" ".join(used[(i + j) % 20] for j in range(12)) for i in range(80)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    return d / "corpus.txt"


@pytest.mark.parametrize("name,extra", [("gpt2", ["--onnx"]), ("bert", []),
                                        ("bert", ["--trim-dropped", "nearest", "--onnx"]),
                                        ("gpt2", ["--trim-dropped", "mix", "--trim-mix", "2", "--onnx"]),
                                        ("llama_tied", ["--steps", "2", "--batch-size", "2", "--seq-len", "16"])])
def test_pipeline_trims_before_quantizing_and_reports(name, extra, corpus, tmp_path, capsys):
    d = tmp_path / name
    build(name).save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    trim = ["--trim-vocab", "data", "--data", corpus] if "--steps" in extra else ["--trim-vocab", corpus]
    code, out_text, err = run_cli([d, "--out", tmp_path / "o", "--embedding", "int2", *trim, *extra], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    v = report["vocabulary"]
    assert v["corpus_ids"] == 21  # 20 words; each document ends with EOS ([SEP]), as the LM data does
    assert v["kept"] == 25 and v["vocab_size"] == VOCAB and v["bytes_saved"] > 0
    assert v["embedding"] and "trim" in report["timings_s"]
    assert v["dropped_read_as"] == (extra[extra.index("--trim-dropped") + 1] if "--trim-dropped" in extra else "unk")
    assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
    assert "vocabulary: kept 25 of 100 token ids" in out_text
    read_as = {"nearest": "nearest to them", "mix": "a weighted sum of 2 kept rows"}.get(
        v["dropped_read_as"], "read as the unknown token")
    assert read_as in out_text
    if "--onnx" in extra:
        assert report["onnx"]["validation"]["passed"]
    if "--steps" in extra:
        assert "trimmed_float" in report["training"]["quality"]
        final = report["training"]["final"]
        assert math.isfinite(final["loss"]) and math.isfinite(final["kd"])
        assert math.isfinite(report["training"]["quality"]["ternary_qat"]["ppl"])
    r = load_packed(tmp_path / "o" / "model.tritpress.safetensors")
    ids = word_tokenizer()("w10 w11 w12 w13", return_tensors="pt")["input_ids"]
    assert out(r, ids).shape[:2] == ids.shape


def test_trim_min_count_drops_the_rare_ids(corpus, tmp_path, capsys):
    """--trim-min-count 2: an id the corpus uses once is dropped like an unused one (here read as a mix)."""
    d = tmp_path / "b"
    build("bert").save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    text = tmp_path / "rare.txt"
    text.write_text(corpus.read_text() + " ".join(WORDS[40:43]) + "\n")   # 3 words used once
    code, out_text, err = run_cli([d, "--out", tmp_path / "o", "--trim-vocab", text, "--trim-min-count", "2",
                                   "--trim-dropped", "mix"], capsys)
    assert code == 0, err
    v = json.loads((tmp_path / "o" / "report.json").read_text())["vocabulary"]
    assert v["corpus_ids"] == 24 and v["rare_ids"] == 3 and v["min_count"] == 2 and v["kept"] == 25  # + EOS
    assert v["mix"] == 4 and "21 used 2+ times by" in out_text
    code, _, err = run_cli([d, "--out", tmp_path / "o2", "--trim-vocab", text, "--trim-min-count", "0"], capsys)
    assert code == 1 and "--trim-min-count" in err and len(error_lines(err)) == 1


def error_lines(err):
    return [line for line in err.strip().splitlines() if not line.startswith("[")]  # [stage] progress lines


def test_pipeline_trim_errors_are_one_line(corpus, tmp_path, capsys):
    d = tmp_path / "g"
    build("gpt2").save_pretrained(d)
    code, _, err = run_cli([d, "--out", tmp_path / "o", "--trim-vocab", corpus], capsys)
    assert code == 1 and "tokenizer" in err and len(error_lines(err)) == 1
    word_tokenizer().save_pretrained(d)
    code, _, err = run_cli([d, "--out", tmp_path / "o", "--trim-vocab", "data"], capsys)
    assert code == 1 and "--data" in err and len(error_lines(err)) == 1
    assert not (tmp_path / "o" / "model.tritpress.safetensors").exists()


@pytest.mark.parametrize("name", ["bert", "llama_tied"])
def test_learned_mix_weights_train_and_are_stored_as_fp16(name, tmp_path):
    """--trim-learn-mix: the dropped ids' mix weights become a parameter. Before any step the model is
    unchanged; a step moves the weights of the dropped ids the batch used and no others; fix_mix
    stores them as the fp16 buffer (same state-dict keys and dtypes), and the file reloads exactly."""
    t = copy.deepcopy(build(name))
    trim_model(t, KEEP, UNK, "mix", 3)
    emb = next(m for m in t.modules() if isinstance(m, TrimmedEmbedding))
    before_keys = {k: v.dtype for k, v in t.state_dict().items()}
    start = emb.dropped_coefs.clone()
    ids = torch.tensor([[DROPPED, KEPT[4], 5, KEPT[7]]])
    reference = out(t, ids)
    assert learn_mixes(t) == 1 and emb.learns_mix and emb.dropped_coefs.dtype == torch.float32
    assert torch.equal(out(t, ids), reference)                 # the same model until it is trained
    main_output(t(ids)).pow(2).mean().backward()
    dropped = sorted(set(range(VOCAB)) - set(KEPT))
    used = sorted(dropped.index(i) for i in (DROPPED, 5))
    assert (emb.dropped_coefs.grad != 0).any(1).nonzero().flatten().tolist() == used
    with torch.no_grad():   # a sign step, large enough to survive the fp16 rounding
        emb.dropped_coefs.add_(0.05 * emb.dropped_coefs.grad.sign())
    assert (emb.dropped_coefs.detach().half() != start).any(1).nonzero().flatten().tolist() == used
    trained = out(t, ids)
    fix_mixes(t)
    assert not emb.learns_mix and emb.dropped_coefs.dtype == torch.float16
    assert {k: v.dtype for k, v in t.state_dict().items()} == before_keys
    assert torch.allclose(out(t, ids), trained, atol=1e-2)  # the weights rounded to fp16
    q = convert(t, TernaryConfig(embedding="int8"))
    r = pack_and_load(name, q, tmp_path / "m.safetensors")
    assert torch.equal(out(r, ids), out(q, ids))
    assert torch.equal(r.get_submodule(next(n for n, m in q.named_modules() if isinstance(m, TrimmedEmbedding)))
                       .dropped_coefs, emb.dropped_coefs)


def test_trim_learn_mix_on_the_command_line(corpus, tmp_path, capsys):
    """QAT trains the mix weights of the ids the training text reaches (here: 3 words used once, dropped by
    --trim-min-count 2); the others keep their fitted values. Without a mix, a one-line error."""
    d = tmp_path / "m"
    build("llama_tied").save_pretrained(d)
    word_tokenizer().save_pretrained(d)
    text = tmp_path / "rare.txt"
    text.write_text(" ".join(WORDS[40:43]) + "\n" + corpus.read_text())   # first: the held-out 5 % is the end
    common = [d, "--trim-vocab", "data", "--data", text, "--trim-min-count", "2", "--trim-dropped", "mix",
              "--steps", "6", "--batch-size", "4", "--seq-len", "16", "--lr", "0.05"]
    coefs = {}
    for name, flags in (("learned", ["--trim-learn-mix"]), ("fitted", [])):
        code, _, err = run_cli([*common, *flags, "--out", tmp_path / name], capsys)
        assert code == 0, err
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["vocabulary"].get("mix_learned", False) == bool(flags)
        assert report["checks"]["reload_vs_converted"]["max_abs_diff"] == 0.0
        r = load_packed(tmp_path / name / "model.tritpress.safetensors")
        coefs[name] = next(m for m in r.modules() if isinstance(m, TrimmedEmbedding)).dropped_coefs
    changed = (coefs["learned"] != coefs["fitted"]).any(1)
    assert 0 < int(changed.sum()) <= 3     # only rare words the training windows reached
    code, _, err = run_cli([d, "--trim-vocab", "data", "--data", text, "--steps", "2", "--trim-learn-mix",
                            "--out", tmp_path / "bad"], capsys)
    assert code == 1 and "--trim-learn-mix" in err and len(error_lines(err)) == 1 and "Traceback" not in err
