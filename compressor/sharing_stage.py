"""The sharing stage of `compress`: redundancy analysis on calibration text, a plan (fixed
pattern, explicit groups or `auto`), and the tie itself, on a copy of the ingested model
(the original stays untied: it is the distillation teacher)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

from torch import nn

from .errors import TritpressError
from .cross_ties import rank_decoder_pairs, tie_decoder, tie_embeddings
from .redundancy import Calibration, analyze, calibration_ids, resolve_calib_dtype
from .redundancy_auto import auto_plan
from .share import SharingConfig, apply_sharing, plan_groups
from .structure import discover


def calibration_for(model: nn.Module, tokenizer, scfg: SharingConfig, data: str | None, structure, ids=None):
    """Calibration of `model` on `ids` (given token blocks) or DATA, in --share-calib-dtype (auto
    decided here); None without either."""
    if ids is None and not data:
        return None
    if ids is None:
        ids = calibration_ids(data, tokenizer, model, scfg.calib_sequences, scfg.calib_seq_len)
    return Calibration.build(model, ids, structure, dtype=resolve_calib_dtype(model, structure, ids, scfg))


def share_stage(model: nn.Module, tokenizer, scfg: SharingConfig, data: str | None, exclude=(),
                write_analysis: Callable[[dict], list[str]] | None = None, probe=None,
                calibration_ids=None) -> tuple[nn.Module, dict]:
    """-> (tied copy of `model`, findings for the report). `write_analysis` writes the analysis
    and returns the files (the pipeline passes analyzers.redundancy.write_outputs into its folder:
    drawing reports is a floor above this one); None writes nothing.
    `probe` (auto only): fine-tunes a tied candidate, see redundancy_auto.auto_plan.
    `calibration_ids` ([N, T] token ids) replace DATA: a task model's blocks of its own examples."""
    structure = discover(model, exclude)
    blocks = scfg.strategy != "none"
    if blocks and structure.blocks is None:
        raise TritpressError("--sharing: no stack of repeated blocks (or stacked LSTM/GRU layers) found in the model")
    auto = scfg.strategy == "auto"
    if auto and not data and calibration_ids is None:
        raise TritpressError("--sharing auto measures the loss of candidate ties: pass calibration text "
                             "with --data or --share-data")
    plan = plan_groups(structure.blocks.num_blocks, scfg) if blocks and not auto else None  # refuse a bad plan early
    findings: dict = {"config": scfg.to_dict()}
    analyze_blocks = bool(scfg.analyze) and blocks
    cal = calibration_for(model, tokenizer, scfg, data, structure, calibration_ids) \
        if (analyze_blocks or auto or not blocks) else None
    analysis = None
    if cal is not None and (analyze_blocks or auto):
        analysis = analyze(model, cal, scfg, structure, strategies=scfg.analyze)
        files = write_analysis(analysis) if write_analysis is not None else []
        findings["analysis"] = {"files": files, "wall_s": analysis["timings"]["total_s"],
                                "calibration": analysis["calibration"],
                                "strategies": analysis.get("strategies")}
    else:
        findings["analysis"] = "skipped: no calibration text (--data or --share-data)" if analyze_blocks else "off"
    if auto:
        plan, findings["auto"] = auto_plan(model, cal, scfg, structure, analysis, probe)
    tied = copy.deepcopy(model)
    if plan is not None:
        tied, tie = apply_sharing(tied, plan, scfg, structure)
        findings.update(tie)
    findings.update(cross_ties(tied, scfg, cal))
    if cal is not None:
        findings["calibration_loss"] = {"metric": cal.metric, "original": round(cal.base_loss, 6),
                                        "after_tying": round(cal.loss(tied), 6)}
    return tied, findings


def cross_ties(tied: nn.Module, scfg: SharingConfig, cal=None) -> dict:
    """The decoder-to-encoder and head-to-embedding ties on the tied copy, each with the calibration
    loss right after it (with calibration data). With calibration data every decoder/encoder block
    pair is measured first (`rank_decoder_pairs`); `--tie-decoder auto` ties the best ones."""
    out, ranking = {}, None
    if scfg.tie_decoder != "none" and cal is not None and (scfg.analyze or scfg.tie_decoder == "auto"):
        ranking = rank_decoder_pairs(tied, cal, scfg)
        if scfg.tie_decoder == "auto":
            scfg = dataclasses.replace(scfg, tie_decoder=ranking["best"])
    for key, on, tie in (("decoder_ties", scfg.tie_decoder != "none", lambda m: tie_decoder(m, scfg)),
                         ("embedding_tie", scfg.tie_embeddings != "off",
                          lambda m: tie_embeddings(m, scfg.tie_embeddings))):
        if on:
            out[key] = tie(tied)
            if cal is not None:
                out[key]["calibration_loss_after"] = round(cal.loss(tied), 6)
    if ranking is not None:
        out["decoder_ties"]["candidates"] = ranking
    return out
