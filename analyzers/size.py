"""Size report of a packed checkpoint, read from the file itself.

Bytes per component come from the safetensors header offsets, so the rows
add up to the file size exactly (the `metadata` row is the header: JSON
metadata plus safetensors' tensor index)."""
from __future__ import annotations

import math
from pathlib import Path

from tritpress.compressor.settings import grouped
from tritpress.exporters.packed import read_header, read_metadata
from tritpress.exporters.packing import packed_int2_size, packed_int4_size, packed_trits_size

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
CODE_BYTES = {"ternary": packed_trits_size, "int4": packed_int4_size, "int2": packed_int2_size, "int8": lambda n: n}

COMPONENTS = ("ternary layers", "embeddings", "head", "other layers", "norms/biases", "scales", "vocabulary map",
              "metadata")


def size_report(packed_path) -> dict:
    path = Path(packed_path)
    meta = read_metadata(path)
    header, header_bytes = read_header(path)
    rows = {c: {"component": c, "params": 0, "unique_params": 0, "bytes": 0} for c in COMPONENTS}
    for key, entry in meta["tensors"].items():
        start, end = header[key]["data_offsets"]
        row = rows[entry["component"]]
        unique = math.prod(entry["shape"])
        row["params"] += unique
        row["unique_params"] += unique
        row["bytes"] += end - start
        for component in entry["aliases"].values():  # tied/shared copies: counted, not stored
            rows[component]["params"] += unique
    rows["metadata"]["bytes"] = header_bytes
    file_bytes = path.stat().st_size
    total_bytes = sum(r["bytes"] for r in rows.values())
    if total_bytes != file_bytes:  # cannot happen for a file that read_metadata accepted
        raise RuntimeError(f"size accounting is off: {total_bytes} != {file_bytes}")
    for r in rows.values():
        r["bits_per_weight"] = round(8 * r["bytes"] / r["unique_params"], 4) if r["unique_params"] else None
    tern = rows["ternary layers"]
    # scales of the ternary block layers only (ternary embeddings/heads have their own rows)
    scales_of_ternary = sum(
        header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
        for k, e in meta["tensors"].items()
        if e["component"] == "scales"
        and meta["tensors"].get(k[: -len("scale")] + "codes", {}).get("component") == "ternary layers")
    original = meta.get("extra", {}).get("original_params")
    report = {
        "file": str(path),
        "file_bytes": file_bytes,
        "components": [rows[c] for c in COMPONENTS],
        "params": sum(r["params"] for r in rows.values()),
        "unique_params": sum(r["unique_params"] for r in rows.values()),
        "ternary": {
            "weights": tern["unique_params"],
            "code_bytes": tern["bytes"],
            "bits_per_weight": tern["bits_per_weight"],
            "bits_per_weight_with_scales": round(8 * (tern["bytes"] + scales_of_ternary) / tern["unique_params"], 4)
            if tern["unique_params"] else None,
            "information_limit": round(math.log2(3), 4),
        },
    }
    report["stacks"] = stack_rows(meta, header)
    if meta.get("vocab"):
        report["vocabulary"] = vocabulary_savings(meta, rows["vocabulary map"]["bytes"])
    if original:
        report["original"] = {"params": original, "fp32_bytes": 4 * original, "fp16_bytes": 2 * original}
        report["ratio_vs_fp32"] = round(4 * original / file_bytes, 2)
        report["ratio_vs_fp16"] = round(2 * original / file_bytes, 2)
    return report


def stack_rows(meta: dict, header: dict) -> list[dict]:
    """One row per block stack: the parameters its blocks use, those stored under its path, and their
    bytes. A tensor tied across stacks (a decoder block reading an encoder block's matrix) is stored
    once, under the first path, so the other stack uses it without storing it."""
    structure = meta["structure"]
    stacks = structure.get("stacks") or ([structure["blocks"]] if structure.get("blocks") else [])
    out = []
    for stack in stacks:
        prefix = stack["path"] + "."
        used = stored = size = 0
        for key, entry in meta["tensors"].items():
            n = math.prod(entry["shape"])
            if key.startswith(prefix):
                stored += n
                start, end = header[key]["data_offsets"]
                size += end - start
            used += n * sum(1 for k in [key, *entry["aliases"]] if k.startswith(prefix))
        out.append({"stack": stack["path"], "blocks": stack["num_blocks"], "block_type": stack["block_type"],
                    "params": used, "stored_params": stored, "bytes": size})
    return out


def _table_bytes(fmt: dict, rows: int, dim: int) -> int:
    """Bytes the packed file spends on a [rows, dim] weight of this format (codes and scales)."""
    n = rows * dim
    if fmt["kind"] in DTYPE_BYTES:
        return n * DTYPE_BYTES[fmt["kind"]]
    scales = rows if fmt["kind"] != "ternary" or fmt["granularity"] == "channel" else 1
    scales *= grouped((rows, dim), fmt["kind"], fmt.get("group_size", 0)) or 1
    return CODE_BYTES[fmt["kind"]](n) + scales * DTYPE_BYTES[fmt["scale_dtype"]]


def vocabulary_savings(meta: dict, map_bytes: int) -> dict:
    """A trimmed vocabulary: ids kept, and the bytes the full embedding/head rows would have taken
    in this file minus what the kept rows and the kept-id table take."""
    floats = meta["quant_config"]["float_dtype"]
    tied = meta["structure"]["head_tied_to"]
    saved, out = 0, {}
    for name, e in meta["vocab"].items():
        inner = f"{name}.{'table' if e['kind'] == 'embedding' else 'proj'}"
        fmt = meta["module_map"].get(inner, {}).get("format", {"kind": floats})
        if e["kind"] == "embedding":
            out = {"vocab_size": e["vocab_size"], "kept": e["rows"], "dropped": e["vocab_size"] - e["rows"]}
        if e["kind"] == "head" and tied:
            continue  # the tied head reads the embedding's rows: counted once
        saved += _table_bytes(fmt, e["vocab_size"], e["dim"]) - _table_bytes(fmt, e["rows"], e["dim"])
        if e.get("bias"):
            saved += (e["vocab_size"] - e["rows"]) * DTYPE_BYTES[floats]
    return {**out, "bytes_saved": saved - map_bytes}
