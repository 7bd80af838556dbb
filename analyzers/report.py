"""Human-readable rendering of a pipeline report (terminal tables)."""
from __future__ import annotations

from tabulate import tabulate


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f}"


def size_table(size: dict) -> str:
    rows = []
    for c in size["components"]:
        if not c["params"] and not c["bytes"]:
            continue
        bpw = "" if c["bits_per_weight"] is None else f"{c['bits_per_weight']:.4f}"
        rows.append([c["component"], f"{c['params']:,}", f"{c['unique_params']:,}", bpw, f"{c['bytes']:,}",
                     _mb(c["bytes"])])
    rows.append(["total", f"{size['params']:,}", f"{size['unique_params']:,}",
                 f"{8 * size['file_bytes'] / max(size['unique_params'], 1):.4f}", f"{size['file_bytes']:,}",
                 _mb(size["file_bytes"])])
    return tabulate(rows, headers=["component", "params", "unique params", "bits/weight", "bytes", "MB"],
                    colalign=("left", "right", "right", "right", "right", "right"), disable_numparse=True)


def summary_lines(report: dict) -> list[str]:
    size = report["size"]
    lines = []
    if "original" in size:
        o = size["original"]
        lines.append(f"original: {o['params']:,} params = {_mb(o['fp32_bytes'])} MB fp32 / "
                     f"{_mb(o['fp16_bytes'])} MB fp16  ->  packed {_mb(size['file_bytes'])} MB: "
                     f"{size['ratio_vs_fp32']}x smaller than fp32, {size['ratio_vs_fp16']}x than fp16")
    t = size["ternary"]
    if t["weights"]:
        lines.append(f"ternary layers: {t['weights']:,} weights at {t['bits_per_weight']:.4f} bits/weight "
                     f"({t['bits_per_weight_with_scales']:.4f} with scales; limit log2(3) = "
                     f"{t['information_limit']})")
    checks = report.get("checks", {})
    if "ternary_vs_original" in checks:
        c = checks["ternary_vs_original"]
        what = ("fine-tuned ternary vs original output" if c["fine_tuned"] else
                "post-training ternary vs original output")
        note = "" if c["fine_tuned"] else " (post-training only, no fine-tuning: quality loss is expected)"
        lines.append(f"{what}: cosine {c['cosine']:.4f}, relative L2 error {c['relative_l2']:.3f}{note}")
    if "reload_vs_converted" in checks:
        c = checks["reload_vs_converted"]
        ok = "OK" if c["max_abs_diff"] == 0.0 and c["codes_bit_identical"] else "FAILED"
        lines.append(f"reload check: packed file reproduces the converted model, max |diff| = "
                     f"{c['max_abs_diff']:.3g}, codes bit-identical: {c['codes_bit_identical']}  [{ok}]")
    if "skipped" in checks:
        lines.append(f"checks skipped: {checks['skipped']}")
    for note in report.get("model", {}).get("notes", []):
        lines.append(f"note: {note}")
    return lines


def training_table(training: dict) -> str:
    """Held-out quality of the original, post-training ternary and QAT ternary models."""
    quality = training["quality"]
    names = {"original": "original (teacher)", "shared_float": "shared (float, right after tying)",
             "trimmed_float": "trimmed vocabulary (float)",
             "ternary_post_training": "ternary, post-training",
             "ternary_qat": f"ternary, QAT {training['steps']} steps"}
    metric_names = [k for k in ("ppl", "nll", "cosine_to_teacher", "nmse_to_teacher", "accuracy", "token_accuracy",
                                "span_exact", "agreement") if k in next(iter(quality.values()), {})]
    rows = [[names[k]] + [f"{v[m]:.4f}" for m in metric_names] for k, v in quality.items()]
    return tabulate(rows, headers=["model", *metric_names], disable_numparse=True)


def training_lines(training: dict) -> list[str]:
    final = training.get("final") or {}
    losses = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "task", "kd", "hidden", "attention", "label")
                       if k in final)
    lines = [f"training: {training['steps']} steps, {training['tokens']:,} tokens, {training['wall_s']:.1f} s, "
             f"{training['world_size']} process(es) ({training['parallel']}); final {losses}"]
    if training.get("train_examples") is not None:  # a task model: its own examples, its own head
        windows = (f" ({training['train_sequences']:,} windows)" if training["task"] == "qa" else "")
        lines += [f"task: {training['task']} (own head), trained on {training['train_examples']:,} examples"
                  f"{windows} of {training['train_data']}",
                  f"held-out: {training['eval_source']}, {training['eval_examples']} examples"]
    else:
        lines.append(f"held-out: {training['eval_source']}, {training['eval_sequences']} sequences")
    return [*lines, "", training_table(training)]


def sharing_lines(sharing: dict) -> list[str]:
    lines = []
    plan = sharing.get("plan")
    if plan:
        lines += [f"sharing: {plan['strategy']} ({sharing['config']['share']} matrices, init {sharing['config']['init']}, "
                  f"relax rank {sharing['config']['relax_rank']}): {len(plan['groups'])} unique of {plan['num_blocks']} "
                  f"blocks, groups {';'.join(','.join(map(str, g)) for g in plan['groups'])}",
                  f"unique parameters: {sharing['unique_params_before']:,} -> {sharing['unique_params_after']:,} "
                  f"(block stack {sharing['block_params_before']:,} -> {sharing['block_params_after']:,}, "
                  f"{sharing['unique_block_fraction']:.3f})"]
    lines += cross_tie_lines(sharing)
    if "calibration_loss" in sharing:
        c = sharing["calibration_loss"]
        lines.append(f"calibration {c['metric']}: original {c['original']:.4f}, right after tying {c['after_tying']:.4f}")
    auto = sharing.get("auto")
    if auto and auto.get("mode") == "target_params":
        lines.append(f"auto: chose {auto['chosen']} by the {auto['ranked_by']}")
        if auto.get("probed"):
            lines += [f"  {r['strategy']:<16} {';'.join(','.join(map(str, g)) for g in r['groups']):<24} "
                      f"after tying {r['loss_after_tying']:.4f}  after probe {r['loss_after_probe']:.4f}"
                      for r in auto["probed"]]
    if isinstance(sharing.get("analysis"), dict) and sharing["analysis"]["files"]:
        lines.append(f"analysis: {sharing['analysis']['files'][0]} (+ table and plots)")
    return lines


def stack_table(size: dict) -> list[str]:
    """A row per block stack (several: an encoder's and a decoder's), after the size table."""
    stacks = size.get("stacks") or []
    if len(stacks) < 2:
        return []
    rows = [[s["stack"], f"{s['blocks']} x {s['block_type']}", f"{s['params']:,}", f"{s['stored_params']:,}",
             f"{s['bytes']:,}"] for s in stacks]
    return ["", tabulate(rows, headers=["block stack", "blocks", "params", "stored here", "bytes"],
                         disable_numparse=True)]


def cross_tie_lines(sharing: dict) -> list[str]:
    """The decoder-to-encoder and head-to-embedding ties (compressor/cross_ties)."""
    lines = []
    dec = sharing.get("decoder_ties")
    if dec:
        errors = [e for t in dec["ties"] for e in t["relative_error"]]
        lines.append(f"decoder tied to encoder ({dec['decoder']} -> {dec['encoder']}, decoder:encoder "
                     f"{','.join(f'{d}:{e}' for d, e in dec['pairs'])}): {len(dec['ties'])} matrices shared, "
                     f"relative error up to {max(errors, default=0):.3f}; kept per decoder block: "
                     f"{', '.join(dec['decoder_only']) or 'none'}; unique parameters "
                     f"{dec['unique_params_before']:,} -> {dec['unique_params_after']:,}" + _after(dec))
        ranked = dec.get("candidates")
        if ranked:
            lines.append(f"  decoder/encoder block pairs measured one at a time: {len(ranked['pairs'])}; calibration "
                         f"{ranked['metric']} {ranked['base_loss']:.4f} untied; cheapest per decoder block: "
                         + ", ".join(f"{r['decoder']}:{r['encoder']} ({r['loss_after_tying']:.4f})"
                                     for r in ranked["cheapest"]))
    tie = sharing.get("embedding_tie")
    if tie and tie.get("already_tied"):
        lines.append(f"embedding tie: {tie['head']} already reads {tie['embedding']}'s weight")
    elif tie:
        err = tie["relative_error"]
        lines.append(f"embedding tie: {tie['head']} := {tie['embedding']} (init {tie['init']}; relative change head "
                     f"{err['head']:.3f}, embedding {err['embedding']:.3f}); unique parameters "
                     f"{tie['unique_params_before']:,} -> {tie['unique_params_after']:,}" + _after(tie))
    return lines


def _after(tie: dict) -> str:
    loss = tie.get("calibration_loss_after")
    return f"; calibration loss after it {loss:.4f}" if loss is not None else ""


def render(report: dict) -> str:
    model = report["model"]
    head = f"model: {model['path']} ({model['model_class']}, {model['kind']})"
    stacks = report["structure"]["stacks"]
    if stacks:
        head += "; block stack" + ("s " if len(stacks) > 1 else " ") + ", ".join(
            f"{s['path']}: {s['num_blocks']} x {s['block_type']}" for s in stacks)
    parts = [head, "", size_table(report["size"]), *stack_table(report["size"]), "", *summary_lines(report)]
    if report.get("sharing"):
        parts += ["", *sharing_lines(report["sharing"])]
    if report.get("vocabulary"):
        v = report["vocabulary"]
        scored = ", the head scores them -inf" if v.get("head") else ""
        read_as = {"nearest": "the row of the kept id nearest to them (cosine)",
                   "mix": f"a weighted sum of {v.get('mix')} kept rows fit to their own"}.get(
                       v.get("dropped_read_as"), "the unknown token")
        used = (f"{v['corpus_ids']:,} used by {v['source']}" if not v.get("min_count") else
                f"{v['corpus_ids'] - v['rare_ids']:,} used {v['min_count']}+ times by {v['source']}")
        parts += ["", f"vocabulary: kept {v['kept']:,} of {v['vocab_size']:,} token ids ({used}, + special and "
                      f"unknown tokens); other ids read as {read_as}{scored}; {v['bytes_saved']:,} bytes saved"]
    if report.get("training"):
        parts += ["", *training_lines(report["training"])]
    if report.get("onnx"):
        from tritpress.exporters.onnx import onnx_lines
        parts += ["", *onnx_lines(report["onnx"])]
    return "\n".join(parts)
