"""Ties across stacks and ends of a model, beside the block-to-block plans of `share`:

    findings = tie_embeddings(model, "embedding")                  # output head := input embedding
    findings = tie_decoder(model, SharingConfig(tie_decoder="same-depth"))

- `tie_embeddings`: an untied output head ([vocab, hidden]) becomes the input embedding's very
  Parameter (ALBERT/T5-style tying), initialized from the embedding or from the average of the two;
  the head keeps its bias. One tensor in memory, in training, in the packed file.
- `tie_decoder`: in an encoder-decoder model, each decoder block's self-attention and feed-forward
  matrices are tied to those of an encoder block (the same depth, a plan "DEC:ENC,...", or "auto":
  per decoder block the encoder block whose tie costs least on calibration data, `rank_decoder_pairs`), through
  `share.tie_occurrences` (per-occurrence gain, optional low-rank correction). The decoder's
  cross-attention has no encoder counterpart and stays its own.

Which matrix of a decoder block answers to which of an encoder block is read from the modules,
not from per-model tables: a matrix's key is its path inside the block with each list index
replaced by the type of the module there (T5's `layer.2.DenseReluDense.wi` and the encoder's
`layer.1.DenseReluDense.wi` are both `layer/T5LayerFF/DenseReluDense/wi`; BART's
`self_attn.q_proj` is itself), and the shapes must agree.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .errors import TritpressError
from .settings import SharingConfig
from .share import SharedLinear, _as_matrix, tie_occurrences, unique_params
from .structure import ModelStructure, discover, is_linear
from .vocab import token_embedding


@torch.no_grad()
def tie_embeddings(model: nn.Module, init: str = "embedding", structure: ModelStructure | None = None) -> dict:
    """Tie the output head's weight to the input embedding's, in place. `init`: "embedding" (the
    head takes the embedding's values) or "average". -> findings: relative change of each matrix,
    unique parameters before/after. A head already tied is left as it is."""
    structure = structure or discover(model)
    emb_name = token_embedding(model)
    if structure.head is None or emb_name is None:
        raise TritpressError("--tie-embeddings: the model has no output head and input embedding to tie")
    emb = model.get_submodule(emb_name)
    head = model.get_submodule(structure.head)
    if isinstance(head, SharedLinear):
        head = head.inner
    if head.weight is emb.weight:
        return {"embedding": emb_name, "head": structure.head, "already_tied": True}
    h, e = _as_matrix(head, "weight"), emb.weight.detach().float()
    if h.shape != e.shape:
        raise TritpressError(f"--tie-embeddings: the output head {structure.head} {list(h.shape)} and the input "
                             f"embedding {emb_name} {list(e.shape)} have different shapes")
    if not isinstance(head, nn.Linear):
        raise TritpressError(f"--tie-embeddings: the output head {structure.head} is a {type(head).__name__}, "
                             "not a Linear")
    before = unique_params(model)
    shared = e if init == "embedding" else (e + h) / 2
    param = nn.Parameter(shared.to(emb.weight.dtype).contiguous(), requires_grad=emb.weight.requires_grad)
    for m in [m for m in model.modules() if getattr(m, "weight", None) is emb.weight]:
        m.weight = param   # every module holding the embedding (BART's shared, encoder and decoder tables)
    head.weight = param
    return {"embedding": emb_name, "head": structure.head, "init": init, "already_tied": False,
            "relative_error": {"head": round(_relative(h, shared), 5), "embedding": round(_relative(e, shared), 5)},
            "unique_params_before": before, "unique_params_after": unique_params(model)}


def _relative(w: torch.Tensor, shared: torch.Tensor) -> float:
    return float((w - shared).norm() / w.norm().clamp(min=1e-12))


def decoder_stacks(structure: ModelStructure) -> tuple:
    """(encoder stack, decoder stack) of an encoder-decoder model: its two transformer stacks."""
    stacks = [s for s in structure.all_stacks if s.kind == "modulelist"]
    if len(stacks) != 2:
        raise TritpressError(f"--tie-decoder needs an encoder-decoder model with two block stacks; found "
                             f"{len(stacks)}")
    return stacks[0], stacks[1]


def decoder_pairs(spec: str, n_encoder: int, n_decoder: int) -> list[tuple[int, int]]:
    """"same-depth" or "DEC:ENC,DEC:ENC..." -> [(decoder block, encoder block)], validated
    ("auto" is chosen by `rank_decoder_pairs`, on calibration data)."""
    if spec == "auto":
        raise TritpressError("--tie-decoder auto measures every decoder/encoder block pair: pass calibration text "
                             "with --data or --share-data")
    if spec == "same-depth":
        return [(d, d) for d in range(min(n_encoder, n_decoder))]
    pairs = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        dec, sep, enc = part.partition(":")
        if not sep or not dec.strip().isdigit() or not enc.strip().isdigit():
            raise TritpressError(f"--tie-decoder {spec!r}: write same-depth or DEC:ENC pairs like \"0:0,1:0,2:1\"")
        d, e = int(dec), int(enc)
        if not (0 <= d < n_decoder and 0 <= e < n_encoder):
            raise TritpressError(f"--tie-decoder {part}: the decoder has blocks 0-{n_decoder - 1}, the encoder "
                                 f"0-{n_encoder - 1}")
        if any(d == p[0] for p in pairs):
            raise TritpressError(f"--tie-decoder: decoder block {d} is named twice")
        pairs.append((d, e))
    if not pairs:
        raise TritpressError(f"--tie-decoder {spec!r}: no pairs")
    return pairs


def matrix_keys(block: nn.Module) -> dict[str, str]:
    """{key: path inside the block} of every Linear weight (a SharedLinear's inner one), the key
    being the path with each list index replaced by the type of the module there."""
    out = {}
    for name, m in block.named_modules():
        if isinstance(m, SharedLinear) or not is_linear(m) or not name:
            continue
        parts, node = [], block
        for part in name.split("."):
            node = getattr(node, part) if not part.isdigit() else node[int(part)]
            parts.append(type(node).__name__ if part.isdigit() else part)
        key = "/".join(p for p in parts if p != "inner")
        out.setdefault(key, name)
    return out


@torch.no_grad()
def rank_decoder_pairs(model: nn.Module, cal, cfg: SharingConfig, structure: ModelStructure | None = None) -> dict:
    """The calibration loss of the model with one decoder block tied to one encoder block, for every
    pair (at most cfg.auto_pairs, nearest depths first), each on a copy; and per decoder block the
    encoder block whose tie costs least ("auto" ties those). -> {"pairs": [...], "best": "DEC:ENC,..."}."""
    structure = structure or discover(model)
    enc, dec = decoder_stacks(structure)
    grid = sorted(((d, e) for d in range(dec.num_blocks) for e in range(enc.num_blocks)),
                  key=lambda p: (abs(p[0] - p[1]), p))[:cfg.auto_pairs or None]
    rows = []
    for d, e in grid:
        tied = copy.deepcopy(model)
        tie_decoder(tied, dataclasses.replace(cfg, tie_decoder=f"{d}:{e}"), structure)
        loss = cal.loss(tied)
        rows.append({"decoder": d, "encoder": e, "loss_after_tying": round(loss, 6),
                     "loss_increase": round(loss - cal.base_loss, 6)})
    best = {}
    for r in rows:
        if r["decoder"] not in best or r["loss_after_tying"] < best[r["decoder"]]["loss_after_tying"]:
            best[r["decoder"]] = r
    cheapest = [best[d] for d in sorted(best)]
    return {"metric": cal.metric, "base_loss": round(cal.base_loss, 6), "pairs": rows, "cheapest": cheapest,
            "best": ",".join(f"{r['decoder']}:{r['encoder']}" for r in cheapest)}


@torch.no_grad()
def tie_decoder(model: nn.Module, cfg: SharingConfig, structure: ModelStructure | None = None) -> dict:
    """Tie each decoder block's self-attention and feed-forward matrices to an encoder block's, in
    place (`decoder_pairs(cfg.tie_decoder)`); several decoder blocks may tie to one encoder block.
    -> findings: the pairs, each tied matrix with its relative error, the decoder matrices kept."""
    structure = structure or discover(model)
    enc, dec = decoder_stacks(structure)
    pairs = decoder_pairs(cfg.tie_decoder, enc.num_blocks, dec.num_blocks)
    before = unique_params(model)
    report, kept = [], set()
    dec_keys = {d: matrix_keys(model.get_submodule(f"{dec.path}.{d}")) for d, _ in pairs}
    for e in sorted({e for _, e in pairs}):
        decs = [d for d, e2 in pairs if e2 == e]
        enc_keys = matrix_keys(model.get_submodule(f"{enc.path}.{e}"))
        for d in decs:
            kept |= {k for k in dec_keys[d] if k not in enc_keys}
        for key, enc_name in enc_keys.items():
            paths = [f"{enc.path}.{e}.{enc_name}"]
            for d in decs:
                dec_name = dec_keys[d].get(key)
                if dec_name is not None and _shape(model, paths[0]) == _shape(model, f"{dec.path}.{d}.{dec_name}"):
                    paths.append(f"{dec.path}.{d}.{dec_name}")
            if len(paths) == 1:
                continue
            owners = [(_linear(model, p), "weight") for p in paths]
            if len({id(o.weight) for o, _ in owners}) < len(owners):
                raise TritpressError("--tie-decoder: these matrices are already tied by --sharing; use one of them")
            errors, _ = tie_occurrences(model, owners, [_linear_path(model, p) for p in paths], cfg)
            report.append({"matrix": key, "encoder_block": e, "decoder_blocks": decs,
                           "relative_error": [round(x, 5) for x in errors]})
    return {"pairs": [list(p) for p in pairs], "encoder": enc.path, "decoder": dec.path, "ties": report,
            "decoder_only": sorted(kept), "unique_params_before": before, "unique_params_after": unique_params(model)}


def _linear_path(model: nn.Module, path: str) -> str:
    return f"{path}.inner" if isinstance(model.get_submodule(path), SharedLinear) else path


def _linear(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(_linear_path(model, path))


def _shape(model: nn.Module, path: str) -> tuple:
    return tuple(_as_matrix(_linear(model, path), "weight").shape)
