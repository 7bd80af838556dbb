"""Neighbour-swap augmentation of task examples (compressor/augment.py, --augment)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tritpress.compressor.augment import NeighborSwap, neighbor_table
from tritpress.compressor.settings import TrainConfig
from tests.test_eval_cli import files  # noqa: F401  (fixture)
from tests.test_task_qat import _cls_args, cls_work, sources, models, tok  # noqa: F401  (fixtures)
from tests.test_train import _one_thread, cli  # noqa: F401  (fixtures; _one_thread autouse)


def test_neighbors_are_the_nearest_other_rows_by_cosine():
    w = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    table = neighbor_table(w, 4, exclude=[3, 7], chunk=16)  # several chunks
    sim = F.normalize(w, dim=1) @ F.normalize(w, dim=1).T
    sim.fill_diagonal_(float("-inf"))
    sim[:, [3, 7]] = float("-inf")
    assert torch.equal(table, sim.topk(4, dim=1).indices)
    assert not (table == torch.arange(50)[:, None]).any() and not torch.isin(table, torch.tensor([3, 7])).any()


@pytest.mark.parametrize("task", ["cls", "tok", "qa"])
def test_swaps_keep_special_tokens_padding_and_labels(task, sources, models):
    train, _ = sources[task]
    emb = models[task].get_input_embeddings().weight
    special = [0, 1, 2, 3, 4]   # [PAD] [UNK] [CLS] [SEP] [MASK] of the tiny tokenizer
    table = neighbor_table(emb, 3, exclude=special)
    swap = NeighborSwap(train, table, 0.5, keep=special, seed=1)
    idx = list(range(min(8, len(train))))
    plain, noisy = train.batch(idx), swap.batch(idx)
    assert torch.equal(noisy["input_ids"], swap.batch(idx)["input_ids"])          # same indices, same batch
    assert not torch.equal(noisy["input_ids"], NeighborSwap(train, table, 0.5, special, seed=2).batch(idx)["input_ids"])
    for k in plain:
        if k != "input_ids":
            assert torch.equal(plain[k], noisy[k])                                  # labels, masks unchanged
    ids, new = plain["input_ids"], noisy["input_ids"]
    changed = ids != new
    fixed = torch.isin(ids, torch.tensor(special)) | ~plain["attention_mask"].bool()
    assert changed.any() and not (changed & fixed).any()
    assert all(int(n) in table[int(o)].tolist() for o, n in zip(ids[changed], new[changed]))
    free = int((~fixed).sum())
    assert 0.2 * free < int(changed.sum()) < 0.8 * free                           # about p of the free tokens
    assert swap.task == task and len(swap) == len(train) and swap.features is train.features


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment=1.0)
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment=0.1, augment_neighbors=0)


def test_cli_trains_on_swapped_examples_and_refuses_text(cls_work, files, tmp_path):  # noqa: F811
    out = tmp_path / "a"
    code, _, err = cli([*_cls_args(cls_work, files, out), "--augment", 0.3, "--augment-neighbors", 4])
    assert code == 0, err
    training = json.loads((out / "report.json").read_text())["training"]
    assert training["config"]["augment"] == 0.3 and training["config"]["augment_neighbors"] == 4
    assert training["task"] == "cls" and training["train_examples"] > 0
    code, _, err = cli([cls_work / "cls", "--data", files / "lm.txt", "--task", "lm", "--out", tmp_path / "b",
                        "--steps", 1, "--batch-size", 2, "--seq-len", 8, "--augment", 0.3])
    assert code == 1 and "--augment swaps tokens of a task model's examples" in err and "Traceback" not in err
