"""Evaluation data readers on the real files in ../shared/data (skipped where absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tritpress.analyzers.quality import data as qdata
from tritpress.compressor.errors import TritpressError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")


@needs_data
def test_sst2_dev_and_mrpc_pairs():
    d = qdata.read_cls(str(SHARED / "sst-2/dev.tsv"), "validation")
    assert len(d.texts) == 872 and sum(d.labels) == 444 and d.label_names == ["0", "1"] and d.pairs is None
    m = qdata.read_cls(str(SHARED / "mrpc/dev.tsv"), "validation")  # UTF-8 BOM, '#1 String'/'#2 String'
    assert len(m.texts) == 408 and sum(m.labels) == 279 and len(m.pairs) == 408


@needs_data
def test_sst2_test_split_is_refused():
    with pytest.raises(TritpressError, match="label"):
        qdata.read_cls(str(SHARED / "sst-2/test.tsv"), "test")


@needs_data
def test_conll_iob1_equals_iob2_after_conversion():
    iob1 = qdata.read_tok(str(SHARED / "conll2003/eng.testa"), "validation")
    iob2 = qdata.read_tok(str(SHARED / "conll2003/valid.txt"), "validation")
    assert len(iob1.words) == len(iob2.words) == 3250
    assert sum(map(len, iob2.words)) == 51362
    assert iob1.words == iob2.words and iob1.tags == iob2.tags
    counts = {t: sum(s.count(f"B-{t}") for s in iob2.tags) for t in ("PER", "LOC", "ORG", "MISC")}
    assert counts == {"PER": 1842, "LOC": 1837, "ORG": 1341, "MISC": 922}


@needs_data
def test_squad_zip_and_article_split():
    d = qdata.read_qa(str(SHARED / "squad-v1.1/dev-v1.1.json.zip"), "validation")
    assert d.version == "1.1" and len(d.examples) == 10570
    ex = d.examples[0]
    assert all(ex.context[s:s + len(a)] == a for s, a in zip(ex.starts, ex.answers))
    train, test = qdata.split_by_article(d)
    assert not {e.article for e in train.examples} & {e.article for e in test.examples}
    assert len(train.examples) + len(test.examples) == 10570
    assert len({e.article for e in train.examples}) == 24


def test_local_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"review": "good", "stars": "pos"}\n{"review": "bad", "stars": "neg"}\n')
    d = qdata.read_cls(str(tmp_path / "a.jsonl"), "train", qdata.Columns(text="review", label="stars"))
    assert d.texts == ["good", "bad"] and d.label_names == ["neg", "pos"] and d.labels == [1, 0]
    (tmp_path / "b.csv").write_text("text,label\nfine,1\nawful,0\n")
    assert qdata.read_cls(str(tmp_path / "b.csv"), "train").labels == [1, 0]
    with pytest.raises(TritpressError, match="no column"):
        qdata.read_cls(str(tmp_path / "a.jsonl"), "train", qdata.Columns(text="missing"))
    with pytest.raises(TritpressError, match="no such data file"):
        qdata.read_tok(str(tmp_path / "nope.txt"), "train")
    (tmp_path / "q.jsonl").write_text('{"id": "1", "question": "q?", "context": "ctx", '
                                      '"answers": {"text": [], "answer_start": []}}\n')
    assert qdata.read_qa(str(tmp_path / "q.jsonl"), "validation").version == "2.0"
    assert qdata.split_spec("glue:sst2@train", "validation") == ("glue", "sst2", "train")
    assert qdata.split_spec("conll2003", "validation") == ("conll2003", None, "validation")
