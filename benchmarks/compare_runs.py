"""Compare the packed outputs of several `compress` runs of the same model (e.g. one process
vs torchrun DDP vs FSDP): fraction of identical ternary codes, largest float difference, and
the final training losses. Prints JSON.

    python benchmarks/compare_runs.py RUN_DIR_A RUN_DIR_B [RUN_DIR_C ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


from tritpress.cli.pipeline import PACKED_NAME, REPORT_NAME  # noqa: E402
from tritpress.exporters.packed import read_packed_state  # noqa: E402


def compare(ref: dict, other: dict) -> dict:
    codes_same = codes_total = 0
    float_max = 0.0
    for key, t in ref.items():
        o = other[key]
        if key.endswith(".codes"):
            codes_same += int((t == o).sum())
            codes_total += t.numel()
        elif t.is_floating_point():
            float_max = max(float_max, float((t.float() - o.float()).abs().max()))
    return {"codes_identical_fraction": codes_same / max(codes_total, 1), "codes": codes_total,
            "max_abs_float_diff": float_max, "same_keys": set(ref) == set(other)}


def main(dirs: list[str]) -> dict:
    states = {d: read_packed_state(Path(d) / PACKED_NAME)[0] for d in dirs}
    reports = {d: json.loads((Path(d) / REPORT_NAME).read_text()) for d in dirs}
    ref = dirs[0]
    out = {"reference": ref, "runs": {}}
    for d in dirs:
        tr = reports[d].get("training") or {}
        out["runs"][d] = {"world_size": tr.get("world_size"), "parallel": tr.get("parallel"),
                          "device": tr.get("device"), "final": tr.get("final"),
                          "quality": tr.get("quality"),
                          **({} if d == ref else compare(states[ref], states[d]))}
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
