"""The quality gate: one row per task/metric, baseline vs compressed, PASS/FAIL.

A tolerance is the largest allowed *drop* (in the metric's bad direction): absolute in the
metric's own units (points, for the 0-100 scores) or relative (a fraction of the baseline,
written with %). Defaults: 1 point for accuracy/F1/EM, 5 % for perplexity, 2 % for bits per
byte. `--max-drop METRIC=VALUE[%]` or `--max-drop TASK.METRIC=VALUE[%]` overrides them."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tritpress.compressor.errors import TritpressError

LOWER_IS_BETTER = {"perplexity", "bits_per_byte"}
DEFAULT_MAX_DROP = {"perplexity": "5%", "bits_per_byte": "2%"}  # everything else: 1.0 point


@dataclass
class Tolerance:
    value: float
    relative: bool

    def __str__(self) -> str:
        return f"{100 * self.value:g}%" if self.relative else f"{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> "Tolerance":
        text = text.strip()
        try:
            if text.endswith("%"):
                return cls(float(text[:-1]) / 100.0, True)
            return cls(float(text), False)
        except ValueError as e:
            raise TritpressError(f"bad tolerance {text!r}: use a number (absolute) or a percentage like 5%") from e


def parse_max_drop(items: list[str]) -> dict[str, Tolerance]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TritpressError(f"bad --max-drop {item!r}: use METRIC=VALUE or TASK.METRIC=VALUE (e.g. f1=2, "
                                 "perplexity=10%)")
        out[key.strip()] = Tolerance.parse(value)
    return out


def tolerance_for(task: str, metric: str, overrides: dict[str, Tolerance]) -> Tolerance:
    for key in (f"{task}.{metric}", metric):
        if key in overrides:
            return overrides[key]
    return Tolerance.parse(DEFAULT_MAX_DROP.get(metric, "1"))


def gate_row(task: str, label: str, metric: str, base: float, comp: float, head: str, tol: Tolerance) -> dict:
    lower = metric in LOWER_IS_BETTER
    delta = comp - base
    rel = delta / abs(base) if base not in (0, 0.0) and math.isfinite(base) else float("nan")
    drop = delta if lower else -delta
    allowed = tol.value * abs(base) if tol.relative else tol.value
    ok = math.isfinite(comp) and math.isfinite(base) and drop <= allowed + 1e-12
    return {"task": label, "metric": metric, "head": head, "baseline": base, "compressed": comp,
            "delta": delta, "delta_rel": rel, "tolerance": str(tol), "tolerance_kind":
            "relative" if tol.relative else "absolute", "lower_is_better": lower, "status": "PASS" if ok else "FAIL"}
