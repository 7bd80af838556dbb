"""Vocabulary trimming: keep the embedding and head rows of the token ids a corpus uses.

The trimmed model still takes and returns the ORIGINAL tokenizer's ids, so nothing outside it
(tokenizer, evaluation, ONNX callers) changes:

- `TrimmedEmbedding` wraps an `nn.Embedding` of the kept rows only; a buffer maps every original
  id to its row, and an id outside the kept set to the unknown token's row (a gather);
- `TrimmedHead` wraps a `nn.Linear` with the kept rows only; its logits are gathered back to the
  full vocabulary, with -inf for the dropped ids: the model can never predict a token it could
  not read back (it would be the unknown token), and argmax / softmax / sampling over the
  original vocabulary work unchanged (dropped ids get probability exactly 0).

The kept ids (int32, sorted) are the only persistent extra tensor, one per model (the head
aliases the embedding's); the id -> row maps are rebuilt from them on load. With `dropped="nearest"`
a dropped id reads instead the row of the kept token nearest to it in the original embedding
(cosine): a name the corpus never used reads a similar token, not `[UNK]` (on CoNLL-2003 trimmed to
its training sentences, the float model loses 0.89 F1 instead of 3.10, benchmarks/bench_trim.py);
that map is one more persistent tensor, a row per dropped id in id order (int16 below 32,768 rows).
With `dropped="mix"` a dropped id reads a weighted sum of k kept rows, chosen and weighted to
approximate its own original row (mixed_kept_rows): two [dropped, k] tensors, the rows and fp16
weights, 4k bytes per dropped id instead of 2, for a closer stand-in. The wrapped
`table` / `proj` are ordinary layers, so prepare/convert/pack quantize them like any other
embedding or head, and a tied head stays tied to its embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .settings import TRIM_DROPPED
from .structure import discover, lookup_multiplier, set_submodule


VOCAB_MAP = ("kept_ids", "dropped_rows", "dropped_coefs")  # the persistent tensors of a trimmed vocabulary


def _rows_dtype(kept: int) -> torch.dtype:
    return torch.int16 if kept <= torch.iinfo(torch.int16).max else torch.int32


def _row_map(kept_ids: torch.Tensor, vocab_size: int, fill: int) -> torch.Tensor:
    """[vocab_size] int64: original id -> its position in kept_ids, `fill` where it is not kept."""
    out = torch.full((vocab_size,), fill, dtype=torch.int64)
    out[kept_ids.long()] = torch.arange(len(kept_ids))
    return out


class _Remapped(nn.Module):
    """Holds the kept ids and rebuilds the maps derived from them (the subclass's `_derived()`:
    `index`, and an embedding's `mix`) whenever they are loaded."""

    def __init__(self, kept_ids: torch.Tensor, vocab_size: int, buffers: dict | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("kept_ids", kept_ids.to(torch.int32))
        for name, t in (buffers or {}).items():  # what `_derived` reads besides the kept ids
            self.register_buffer(name, t)
        for name, t in self._derived().items():
            self.register_buffer(name, t, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        for name, t in self._derived().items():
            setattr(self, name, None if t is None else t.to(self.kept_ids.device))


class TrimmedEmbedding(_Remapped):
    """Original ids in, rows of the kept-ids table out; a dropped id reads the unknown token's row,
    or with `dropped_rows` (one per dropped id, in id order) the row given there, or with
    `dropped_rows` and `dropped_coefs` ([dropped, k] each) that weighted sum of k kept rows."""

    vocab_table = "table"  # structure.discover: the embedding inside; num_embeddings is the original size

    def __init__(self, table: nn.Module, kept_ids: torch.Tensor, vocab_size: int, unk_id: int,
                 dropped_rows: torch.Tensor | None = None, dropped_coefs: torch.Tensor | None = None):
        self.unk_id = unk_id
        rows = {} if dropped_rows is None else {"dropped_rows": dropped_rows.to(_rows_dtype(len(kept_ids)))}
        if dropped_coefs is not None:
            rows["dropped_coefs"] = dropped_coefs.to(torch.float16)
        super().__init__(kept_ids, vocab_size, rows)
        self.table = table
        self.num_embeddings, self.embedding_dim = vocab_size, table.embedding_dim

    def _derived(self) -> dict:
        """index: [vocab] row per original id; with a mix, index and mix are [vocab, k] (a kept id:
        its own row with weight 1, then weight-0 columns)."""
        rows = _row_map(self.kept_ids, self.vocab_size, -1)
        if rows[self.unk_id] < 0:
            raise ValueError(f"the unknown token {self.unk_id} must be among the kept ids")
        dropped, coefs = getattr(self, "dropped_rows", None), getattr(self, "dropped_coefs", None)
        small = _rows_dtype(len(self.kept_ids))  # the exported graph's constants: int16 and fp16 where they fit
        if dropped is None:
            return {"index": torch.where(rows < 0, rows[self.unk_id], rows).to(small), "mix": None}
        missing = rows < 0
        if len(dropped) != int(missing.sum()) or (coefs is not None and coefs.shape != dropped.shape) or (
                dropped.numel() and not 0 <= int(dropped.min()) <= int(dropped.max()) < len(self.kept_ids)):
            raise ValueError(f"{len(dropped)} rows for dropped ids do not fit the {int(missing.sum())} dropped "
                             f"ids and {len(self.kept_ids)} kept rows")
        if coefs is None:
            rows[missing] = dropped.long()
            return {"index": rows.to(small), "mix": None}
        index = torch.zeros(self.vocab_size, dropped.shape[1], dtype=torch.int64)
        mix = torch.zeros(self.vocab_size, dropped.shape[1])
        index[~missing, 0], mix[~missing, 0] = rows[~missing], 1.0
        index[missing], mix[missing] = dropped.long(), coefs.detach().float()
        return {"index": index.to(small), "mix": mix.half()}

    def forward(self, ids):
        return self._read(self.table(self.index[ids].long()), ids)

    def expand(self, table: torch.Tensor) -> torch.Tensor:
        """This table's rows as the full vocabulary's [vocab, dim] (what an untrimmed model would hold)."""
        return self._read(table[self.index.long()], slice(None))

    def _read(self, rows: torch.Tensor, ids) -> torch.Tensor:
        """The rows gathered for `ids` -> what those ids read: the rows, or with a mix their weighted sum."""
        if self.learns_mix:  # the weights as a function of the trained parameter (learn_mix)
            own = F.one_hot(torch.zeros(1, dtype=torch.long), self.dropped_coefs.shape[1]).to(self.dropped_coefs)
            mix = torch.cat([own, self.dropped_coefs])[self.mix_slot[ids].long()]   # slot 0: a kept id's own row
            return (rows * mix.unsqueeze(-1).to(rows.dtype)).sum(-2)
        return rows if self.mix is None else (rows * self.mix[ids].unsqueeze(-1).to(rows.dtype)).sum(-2)

    @property
    def learns_mix(self) -> bool:
        return isinstance(getattr(self, "dropped_coefs", None), nn.Parameter)

    def learn_mix(self) -> None:
        """Make the dropped ids' mix weights a trainable fp32 parameter (QAT then fits them to what the
        teacher does with those ids, which training examples reach through --augment's swaps); their
        kept rows stay as chosen. fix_mix() turns them back into the stored fp16 buffer."""
        if self.learns_mix or getattr(self, "dropped_coefs", None) is None:
            return
        coefs = self.dropped_coefs.float()
        del self._buffers["dropped_coefs"]
        self.dropped_coefs = nn.Parameter(coefs)
        dropped = _dropped_ids(self.vocab_size, self.kept_ids.long())  # dropped id: slot 1 + its position
        slot = torch.zeros(self.vocab_size, dtype=torch.int64)
        slot[dropped] = torch.arange(1, len(dropped) + 1)
        self.register_buffer("mix_slot", slot.to(torch.int32), persistent=False)

    def fix_mix(self) -> None:
        """The trained mix weights, rounded to the fp16 buffer the file stores; the lookup tables rebuilt."""
        if not self.learns_mix:
            return
        coefs = self.dropped_coefs.detach().to(torch.float16)
        del self._parameters["dropped_coefs"]
        self.register_buffer("dropped_coefs", coefs)
        del self._buffers["mix_slot"]
        for name, t in self._derived().items():
            setattr(self, name, t)


class TrimmedHead(_Remapped):
    """Logits over the kept ids, gathered back to the full vocabulary with -inf for dropped ids."""

    vocab_head = "proj"  # structure.discover: the head Linear inside this wrapper

    def __init__(self, proj: nn.Module, kept_ids: torch.Tensor, vocab_size: int):
        super().__init__(kept_ids, vocab_size)
        self.proj = proj

    def _derived(self) -> dict:
        kept = len(self.kept_ids)  # K: the -inf column; int16 where it fits (a constant of the exported graph)
        return {"index": _row_map(self.kept_ids, self.vocab_size, kept).to(_rows_dtype(kept + 1))}

    def forward(self, x):
        y = self.proj(x)
        # one gather along the last axis (ONNX Gather): column K is the -inf of every dropped id
        return F.pad(y, (0, 1), value=float("-inf"))[..., self.index.long()]


def _embedding_rows(emb: nn.Embedding, kept: torch.Tensor) -> nn.Embedding:
    pad = emb.padding_idx
    new_pad = int((kept == pad).nonzero()[0, 0]) if pad is not None and bool((kept == pad).any()) else None
    table = nn.Embedding(len(kept), emb.embedding_dim, padding_idx=new_pad)
    table.weight = nn.Parameter(emb.weight.detach()[kept].clone(), requires_grad=emb.weight.requires_grad)
    return table


def _linear_rows(head: nn.Linear, kept: torch.Tensor, weight: nn.Parameter | None) -> nn.Linear:
    proj = nn.Linear(head.in_features, len(kept), bias=head.bias is not None)
    proj.weight = weight if weight is not None else nn.Parameter(head.weight.detach()[kept].clone())
    if head.bias is not None:
        proj.bias = nn.Parameter(head.bias.detach()[kept].clone())
    return proj


def _dropped_ids(vocab: int, kept: torch.Tensor) -> torch.Tensor:
    """The ids not in `kept`, in id order."""
    dropped = torch.ones(vocab, dtype=torch.bool)
    dropped[kept] = False
    return dropped.nonzero().flatten()


def nearest_kept_rows(weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """For each id not in `kept` (sorted), in id order: the row (position in `kept`) of the kept id
    whose embedding is nearest to its own, by cosine."""
    unit = F.normalize(weight.detach().float(), dim=1)
    ids, kept_unit = _dropped_ids(weight.shape[0], kept), unit[kept].t()
    return torch.cat([(unit[ids[i:i + 2048]] @ kept_unit).argmax(1) for i in range(0, len(ids), 2048)] or
                     [torch.zeros(0, dtype=torch.long)])


def mixed_kept_rows(weight: torch.Tensor, kept: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each id not in `kept` (sorted), in id order: k rows (positions in `kept`) and fp16 weights
    whose weighted sum of kept embeddings is nearest to its own (orthogonal matching pursuit: the
    row most aligned with what is left, then least squares over the rows chosen so far).
    -> (rows [dropped, k] int64, weights [dropped, k] fp16)."""
    table, ids = weight.detach().float(), _dropped_ids(weight.shape[0], kept)
    basis = table[kept]
    unit = F.normalize(basis, dim=1).t()
    rows, coefs = [], []
    for i in range(0, len(ids), 2048):
        target = table[ids[i:i + 2048]]
        chosen, residual = torch.zeros(len(target), 0, dtype=torch.int64), target
        for _ in range(min(k, len(kept))):
            score = (residual @ unit).abs().scatter_(1, chosen, -1.0)  # a row is chosen once
            chosen = torch.cat([chosen, score.argmax(1, keepdim=True)], 1)
            picked = basis[chosen].transpose(1, 2)                                  # [n, dim, t]
            coef = torch.linalg.lstsq(picked, target.unsqueeze(2)).solution.half()  # stored as fp16
            residual = target - (picked @ coef.float()).squeeze(2)
        rows.append(chosen)
        coefs.append(coef.squeeze(2))
    if not rows:
        return torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k, dtype=torch.float16)
    return torch.cat(rows), torch.cat(coefs)


def trim_vocab(model: nn.Module, embedding: str, head: str | None, keep_ids, unk_id: int,
               dropped: str = "unk", mix: int = 4) -> dict:
    """Replace the token embedding (and the head, tied or not) by trimmed wrappers, in place.
    `keep_ids`: the ids to keep (the unknown token is added); `dropped`: what a dropped id reads,
    "unk" (the unknown token's row), "nearest" (nearest_kept_rows) or "mix" (`mix` kept rows
    weighted, mixed_kept_rows). -> the findings.
    The embedding must be a float nn.Embedding and the head a float nn.Linear: trim before
    prepare/convert, so that quantization and training see the trimmed tables."""
    emb = model.get_submodule(embedding)
    out = model.get_submodule(head) if head else None
    if not isinstance(emb, nn.Embedding) or (out is not None and type(out) is not nn.Linear):
        raise ValueError("trim_vocab needs a float nn.Embedding (and nn.Linear head): trim before quantizing")
    if lookup_multiplier(emb) != 1.0:
        raise ValueError(f"cannot trim the vocabulary of {type(emb).__name__}: its forward does more than look rows up")
    vocab = emb.num_embeddings
    kept = torch.tensor(sorted({int(i) for i in keep_ids} | {int(unk_id)}), dtype=torch.int64)
    if kept[0] < 0 or kept[-1] >= vocab:
        raise ValueError(f"kept token ids must be in [0, {vocab}); got {int(kept[0])}..{int(kept[-1])}")
    if dropped not in TRIM_DROPPED:
        raise ValueError(f"a dropped id reads {', '.join(TRIM_DROPPED[:-1])} or {TRIM_DROPPED[-1]}, not {dropped!r}")
    if dropped == "mix" and mix < 1:
        raise ValueError(f"a dropped id mixes at least 1 kept row, not {mix}")
    rows = coefs = None
    if dropped == "nearest":
        rows = nearest_kept_rows(emb.weight, kept)
    elif dropped == "mix":
        rows, coefs = mixed_kept_rows(emb.weight, kept, mix)
    new_emb = TrimmedEmbedding(_embedding_rows(emb, kept), kept, vocab, int(unk_id), rows, coefs)
    set_submodule(model, embedding, new_emb)
    if out is not None:
        tied = out.weight is emb.weight
        new_head = TrimmedHead(_linear_rows(out, kept, new_emb.table.weight if tied else None), kept, vocab)
        new_head.kept_ids = new_emb.kept_ids  # one tensor: stored once, aliased by the head
        set_submodule(model, head, new_head)
    return {"vocab_size": vocab, "kept": len(kept), "dropped": vocab - len(kept), "dropped_read_as": dropped,
            **({"mix": int(rows.shape[1])} if coefs is not None else {})}


def token_embedding(model: nn.Module) -> str | None:
    """Module name of the token embedding: the model's input embeddings, or the first nn.Embedding
    of a custom module (the convention compressor.data also follows)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    names = [n for n, m in model.named_modules() if (m is emb if emb is not None else isinstance(m, nn.Embedding))]
    return names[0] if names else None


def trim_model(model: nn.Module, keep_ids, unk_id: int, dropped: str = "unk", mix: int = 4) -> dict:
    """Trim the token embedding and, when it scores the vocabulary, the head (compressor.structure
    finds it; a classifier head is left alone). -> findings: vocab size, kept, dropped, modules."""
    embedding = token_embedding(model)
    if embedding is None:
        raise ValueError("the model has no token embedding to trim")
    vocab = model.get_submodule(embedding).num_embeddings
    head = discover(model).head
    if head is not None and getattr(model.get_submodule(head), "out_features", None) != vocab:
        head = None
    return {**trim_vocab(model, embedding, head, keep_ids, unk_id, dropped, mix), "embedding": embedding, "head": head}


def vocab_meta(model: nn.Module) -> dict:
    """What load_packed needs to put the wrappers back: module name -> kind and shapes."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, TrimmedEmbedding):
            out[name] = {"kind": "embedding", "vocab_size": m.vocab_size, "rows": len(m.kept_ids),
                         "dim": m.embedding_dim, "unk_id": m.unk_id, "padding_idx": m.table.padding_idx}
            if getattr(m, "dropped_rows", None) is not None:
                out[name]["dropped_rows"] = True
            if getattr(m, "dropped_coefs", None) is not None:
                out[name]["mix"] = int(m.dropped_coefs.shape[1])
        elif isinstance(m, TrimmedHead):
            proj = m.proj
            out[name] = {"kind": "head", "vocab_size": m.vocab_size, "rows": len(m.kept_ids),
                         "dim": proj.in_features, "bias": proj.bias is not None}
    return out


def rebuild_trimmed(model: nn.Module, meta: dict) -> None:
    """Empty trimmed wrappers of the stored shapes (load_packed fills them). Distinct placeholder ids,
    the unknown token's among them, stand in for the kept ids until the state dict is loaded."""
    for name, e in meta.items():
        placeholder = torch.arange(e["rows"], dtype=torch.int32)   # distinct ids, the unknown token's among them
        placeholder[-1] = max(e.get("unk_id", 0), e["rows"] - 1)
        if e["kind"] == "embedding":
            table = nn.Embedding(e["rows"], e["dim"], padding_idx=e["padding_idx"])
            # filled, with the kept ids, and the index rebuilt, when the state is loaded
            shape = (e["vocab_size"] - e["rows"], *([e["mix"]] if e.get("mix") else []))
            rows = torch.zeros(shape, dtype=torch.long) if e.get("dropped_rows") else None
            coefs = torch.zeros(shape) if e.get("mix") else None
            new = TrimmedEmbedding(table, placeholder, e["vocab_size"], e["unk_id"], rows, coefs)
        else:
            new = TrimmedHead(nn.Linear(e["dim"], e["rows"], bias=e["bias"]), placeholder, e["vocab_size"])
        set_submodule(model, name, new)


def learn_mixes(model: nn.Module) -> int:
    """TrimmedEmbedding.learn_mix on every trimmed embedding with a mix. -> how many."""
    found = [m for m in model.modules() if isinstance(m, TrimmedEmbedding)]
    for m in found:
        m.learn_mix()  # a no-op without a mix
    return sum(m.learns_mix for m in found)


def fix_mixes(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, TrimmedEmbedding):
            m.fix_mix()
