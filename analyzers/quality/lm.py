"""Language-modeling quality: perplexity and bits per byte.

- causal LMs: sliding window of `context` tokens moved by `stride` (the Hugging Face
  "Perplexity of fixed-length models" protocol): each token is scored once, with up to
  `context - 1` tokens of left context; tokens already scored by an earlier window are
  context only.
- masked LMs: pseudo-perplexity (Salazar et al. 2020): each scored token is masked on its
  own and predicted from both sides; `max_positions` subsamples the tokens (seeded).
- RNN LMs: one stream, read in chunks of `context` tokens with the recurrent state carried
  across chunks, every token after the first scored.
- models whose output is only the next token's logits (RNN or not): a window moving by one
  token, every token after the first scored after up to `context - 1` tokens before it.

perplexity = exp(total NLL / scored tokens); bits per byte = total NLL / ln 2 / UTF-8 bytes of
the text, comparable across tokenizers (reported when every token is scored).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tritpress.compressor import modelio
from tritpress.compressor.errors import TritpressError

from . import distributed


@dataclass
class LMText:
    ids: torch.Tensor        # [N] token ids of the whole stream
    n_bytes: int             # UTF-8 bytes of the text those ids encode
    n_lines: int


def build_stream(texts: list[str], encode: Callable[[str], list[int]], max_tokens: int = 0,
                 bos: int | None = None) -> LMText:
    """Lines joined by newlines; with `max_tokens`, cut inside the line that reaches it so that the
    stream scores exactly `max_tokens` tokens (every token after the first; a line can hold thousands),
    and the byte count is exactly that of the text the ids encode."""
    lines, n = [], 0
    for line in texts:
        lines.append(line)
        n += len(encode(line))
        if max_tokens and n >= max_tokens:
            break
    text = "\n".join(lines)
    if max_tokens:  # the first token is context only, unless a BOS is prepended
        text = prefix_with_tokens(text, encode, max_tokens + (0 if bos is not None else 1))
    ids = ([bos] if bos is not None else []) + encode(text)
    if len(ids) < 2:
        raise TritpressError("the language-modeling text has fewer than two tokens")
    return LMText(torch.tensor(ids, dtype=torch.long), len(text.encode("utf-8")), text.count("\n") + 1)


def prefix_with_tokens(text: str, encode: Callable[[str], list[int]], tokens: int) -> str:
    """The longest prefix of `text` that encodes to at most `tokens` ids (binary search on its length:
    a longer prefix never encodes to fewer tokens, give or take a merge at the cut)."""
    if len(encode(text)) <= tokens:
        return text
    lo, hi = 0, len(text)  # encode(text[:lo]) fits, encode(text[:hi]) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(encode(text[:mid])) <= tokens else (lo, mid)
    return text[:lo]


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window over n tokens."""
    if stride < 1 or context < 2 or stride > context:
        raise TritpressError(f"need 1 <= stride <= context and context >= 2 (got context {context}, stride {stride})")
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def _nll_sums(model, batch_ids: torch.Tensor, first: list[int], begin: list[int]) -> list[tuple[float, int]]:
    out = modelio.logits(model, batch_ids)
    batch_ids = batch_ids.to(out.device)
    logp = F.log_softmax(out[:, :-1].double(), -1)
    nll = -logp.gather(-1, batch_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # nll[t-1] scores token t
    return [(float(nll[i, f - b - 1:].sum()), batch_ids.shape[1] - (f - b)) for i, (f, b) in
            enumerate(zip(first, begin))]


def equal_length_batches(windows: list[tuple], batch_size: int) -> list[list[tuple]]:
    """Windows (begin, end, ...) in batches of at most `batch_size` of one length: batched without padding."""
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


@torch.no_grad()
def causal_perplexity(model: nn.Module, stream: LMText, context: int, stride: int, batch_size: int = 4,
                      progress=None) -> dict:
    windows = sliding_windows(len(stream.ids), context, stride)
    batches = equal_length_batches(windows, batch_size)
    results = {}
    for i in distributed.my_batches(len(batches)):
        batch = batches[i]
        ids = torch.stack([stream.ids[b:e] for b, e, _ in batch])
        results[i] = _nll_sums(model, ids, [f for _, _, f in batch], [b for b, _, _ in batch])
        if progress:
            progress(len(batch))
    items = distributed.gather_by_batch(results)
    out = _summary(sum(x for x, _ in items), sum(n for _, n in items), stream, len(windows))
    out["per_window"] = items  # (NLL sum, scored tokens) of each window: the bootstrap's units
    return out


@torch.no_grad()
def seq2seq_perplexity(model: nn.Module, stream: LMText, context: int, batch_size: int = 4, progress=None) -> dict:
    """Target-side perplexity of an encoder-decoder LM: the stream cut into windows of `context`
    tokens; each window's first half is the source, its second half the target, every target token
    scored after the whole source and the target tokens before it (teacher forcing:
    `ModelIO.lm_inputs`). Half of the tokens are scored, so no bits per byte."""
    io, length = modelio.ModelIO.of(model), len(stream.ids)
    windows = [(b, min(b + context, length)) for b in range(0, length - 1, context)]
    windows = [w for w in windows if w[1] - w[0] >= 2]
    batches = equal_length_batches(windows, batch_size)
    results = {}
    for i in distributed.my_batches(len(batches)):
        ids = torch.stack([stream.ids[b:e] for b, e in batches[i]]).to(modelio.device_of(model))
        logits, target = io.next_token_pairs(io.forward(model, io.lm_inputs(ids)), ids)
        nll = F.cross_entropy(logits.double(), target, reduction="none").view(len(ids), -1)
        results[i] = [(float(row.sum()), row.numel()) for row in nll]
        if progress:
            progress(int(ids.numel()))
    items = distributed.gather_by_batch(results)
    out = _summary(sum(x for x, _ in items), sum(n for _, n in items), None, len(windows))
    out["per_window"] = items
    return out


@torch.no_grad()
def rnn_perplexity(model: nn.Module, stream: LMText, context: int, progress=None) -> dict:
    """One stream, chunk by chunk, state carried (sequential: every rank computes it whole)."""
    nll_sum, n, per_chunk = 0.0, 0, []
    ids = stream.ids
    with modelio.carried_state(model):
        for begin in range(0, len(ids) - 1, context):
            chunk = ids[begin: begin + context + 1].unsqueeze(0)
            count = chunk.shape[1] - 1
            nll = _chunk_nll(model, chunk)
            nll_sum += nll
            n += count
            per_chunk.append((nll, count))
            if progress:
                progress(count)
    out = _summary(nll_sum, n, stream, math.ceil((len(ids) - 1) / context))
    out["per_window"] = per_chunk
    return out


@torch.no_grad()
def next_token_perplexity(model: nn.Module, stream: LMText, context: int, batch_size: int = 16,
                          progress=None) -> dict:
    """A model that predicts only the token after its input: token t (t >= 1) read after the window
    ids[max(0, t - context + 1): t]. Windows of one length batch together (only the first
    `context - 2` are shorter); bootstrap units are runs of `context` consecutive scored tokens."""
    if context < 2:
        raise TritpressError(f"need context >= 2 (got {context})")
    ids = stream.ids
    targets = list(range(1, len(ids)))
    groups: dict[int, list[int]] = {}
    for t in targets:
        groups.setdefault(min(t, context - 1), []).append(t)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    results = {}
    for i in distributed.my_batches(len(batches)):
        batch = batches[i]
        width = min(batch[0], context - 1)
        out = modelio.logits(model, torch.stack([ids[t - width: t] for t in batch]))
        nll = F.cross_entropy(out.double(), ids[batch].to(out.device), reduction="none")
        results[i] = [(float(x), 1) for x in nll]
        if progress:
            progress(len(batch))
    items = distributed.gather_by_batch(results)  # batches are in target order: so are the items
    nll_sum = sum(x for x, _ in items)
    out = _summary(nll_sum, len(items), stream, len(targets))
    out["per_window"] = [(sum(x for x, _ in items[j:j + context]), len(items[j:j + context]))
                         for j in range(0, len(items), context)]
    return out


def _chunk_nll(model, chunk: torch.Tensor) -> float:
    out = modelio.logits(model, chunk[:, :-1])
    return float(F.cross_entropy(out[0].double(), chunk[0, 1:].to(out.device), reduction="sum"))


@torch.no_grad()
def pseudo_perplexity(model: nn.Module, stream: LMText, context: int, mask_id: int, cls_id: int | None,
                      sep_id: int | None, max_positions: int = 0, seed: int = 0, batch_size: int = 16,
                      progress=None, head: nn.Module | None = None) -> dict:
    """`head` (optional): a probe mapping frozen features to vocabulary logits, for an encoder
    without its own masked-LM head."""
    specials = [t for t in (cls_id, sep_id) if t is not None]
    span = context - len(specials)
    ids = stream.ids
    windows = [(b, min(b + span, len(ids))) for b in range(0, len(ids), span)]
    positions = torch.arange(len(ids))
    if max_positions and max_positions < len(ids):
        g = torch.Generator().manual_seed(seed)
        positions = torch.sort(torch.randperm(len(ids), generator=g)[:max_positions]).values
    jobs = []  # (window index, position in stream)
    for p in positions.tolist():
        jobs.append((p // span, p))
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    results = {}
    for bi in distributed.my_batches(len(batches)):
        rows, targets, where = [], [], []
        for w, p in batches[bi]:
            b, e = windows[w]
            seq = ids[b:e].clone()
            seq[p - b] = mask_id
            prefix = [cls_id] if cls_id is not None else []
            rows.append(torch.cat([torch.tensor(prefix, dtype=torch.long), seq,
                                   torch.tensor([sep_id] if sep_id is not None else [], dtype=torch.long)]))
            targets.append(int(ids[p]))
            where.append(p - b + len(prefix))
        lengths = [len(r) for r in rows]
        padded = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(padded)
        for i, r in enumerate(rows):
            padded[i, :len(r)] = r
            mask[i, :len(r)] = 1
        rows_at = (torch.arange(len(rows)), torch.tensor(where))
        if head is None:
            at = modelio.logits(model, padded, mask)[rows_at].cpu()
        else:
            enc = {"input_ids": padded, "attention_mask": mask}
            at = head(modelio.features(model, _to(model, enc))[rows_at])
        logp = F.log_softmax(at.double(), -1)
        results[bi] = [(-float(logp[i, t]), 1) for i, t in enumerate(targets)]
        if progress:
            progress(len(rows))
    items = distributed.gather_by_batch(results)
    out = _summary(sum(x for x, _ in items), sum(n for _, n in items), None, len(windows))
    out["scored_fraction"] = len(positions) / len(ids)
    per_window: dict[int, list] = {}  # masked positions of one window share its context: resample windows
    for (w, _), (nll, count) in zip(jobs, items):
        per_window.setdefault(w, [0.0, 0])
        per_window[w][0] += nll
        per_window[w][1] += count
    out["per_window"] = [tuple(v) for v in per_window.values()]
    return out


def _summary(nll_sum: float, n: int, stream: LMText | None, windows: int) -> dict:
    out = {"perplexity": math.exp(nll_sum / n), "nll": nll_sum / n, "scored_tokens": n, "windows": windows}
    if stream is not None:
        out["bits_per_byte"] = nll_sum / math.log(2) / stream.n_bytes
        out["bytes"] = stream.n_bytes
    return out


def _to(model, enc: dict) -> dict:
    device = modelio.device_of(model)
    return {k: v.to(device) for k, v in enc.items()}


class TiedLMProbe(nn.Module):
    """BERT's masked-LM head shape (dense, GELU, LayerNorm, then the model's own input embedding
    as the output matrix, frozen): the probe for an encoder shipped without its MLM head."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        hidden = embedding.shape[1]
        self.register_buffer("embedding", embedding)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))

    def forward(self, h):
        return F.linear(self.norm(F.gelu(self.dense(h.float()))), self.embedding, self.bias)


def embedding_table(model: nn.Module) -> torch.Tensor:
    """[V, H] token embedding, read through the module (works for quantized embeddings too)."""
    emb = model.get_input_embeddings()
    vocab = getattr(emb, "num_embeddings", None)
    with torch.no_grad():
        return emb(torch.arange(vocab, device=modelio.device_of(model))).float().cpu()


@torch.no_grad()
def _masked_features(model, stream: LMText, span: int, mask_id: int, cls_id, sep_id, windows: int,
                     rate: float, seed: int, batch_size: int, progress=None):
    g = torch.Generator().manual_seed(seed)
    starts = list(range(0, len(stream.ids) - span + 1, span))[:windows]
    feats, targets = [], []
    for i in range(0, len(starts), batch_size):
        rows, picks = [], []
        for b in starts[i:i + batch_size]:
            seq = stream.ids[b:b + span].clone()
            pick = (torch.rand(span, generator=g) < rate).nonzero().flatten()
            targets.append(seq[pick].clone())
            seq[pick] = mask_id
            rows.append(torch.cat([torch.tensor([cls_id] if cls_id is not None else []), seq,
                                   torch.tensor([sep_id] if sep_id is not None else [])]).long())
            picks.append(pick + (1 if cls_id is not None else 0))
        ids = torch.stack(rows)
        h = modelio.features(model, _to(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
        feats.extend(h[r, p] for r, p in enumerate(picks))
        if progress:
            progress(len(rows) * span)
    return torch.cat(feats), torch.cat(targets)


def train_mlm_probe(model, stream: LMText, context: int, mask_id: int, cls_id, sep_id, cfg, windows: int,
                    batch_size: int, progress=None) -> TiedLMProbe:
    """Masked-LM probe: 15 % of the tokens of `windows` training windows masked (seeded), the
    head trained on their frozen features with the probe budget (ProbeConfig)."""
    from .probe import train_probe_module
    span = context - (cls_id is not None) - (sep_id is not None)
    x, y = _masked_features(model, stream, span, mask_id, cls_id, sep_id, windows, 0.15, cfg.seed, batch_size,
                            progress)
    torch.manual_seed(cfg.seed)
    head = TiedLMProbe(embedding_table(model))
    with torch.no_grad():  # start from the unigram distribution of the training targets (add-one smoothed)
        counts = torch.bincount(y, minlength=head.bias.numel()).float() + 1.0
        head.bias.copy_((counts / counts.sum()).log())
    return train_probe_module(head, x, lambda out, idx: F.cross_entropy(out, y[idx]), cfg)
