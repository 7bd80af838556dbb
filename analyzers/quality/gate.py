"""The quality gate: one row per task/metric, baseline vs compressed, PASS/FAIL.

A tolerance is the largest allowed *drop* (in the metric's bad direction): absolute in the
metric's own units (points, for the 0-100 scores) or relative (a fraction of the baseline,
written with %). Each metric declares its direction and default tolerance (metrics.Metric:
1 point for accuracy/F1/EM, 5 % for perplexity, 2 % for bits per byte).
`--max-drop METRIC=VALUE[%]` or `--max-drop TASK.METRIC=VALUE[%]` overrides them.
Each row also shows the 95 % interval of Δ (bootstrap.py) and whether Δ is within noise; the
interval informs, it does not decide."""
from __future__ import annotations

import math
from dataclasses import dataclass

from tritpress.compressor.errors import TritpressError

from .bootstrap import verdict_note
from .metrics import Metric
from .registry import find_metric


@dataclass
class Tolerance:
    value: float
    relative: bool

    def __str__(self) -> str:
        return f"{100 * self.value:g}%" if self.relative else f"{self.value:g}"

    def allowed(self, baseline: float) -> float:
        """The drop this tolerance allows from `baseline`, in the metric's units."""
        return self.value * abs(baseline) if self.relative else self.value

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


def _declared(task: str, metric: Metric | str) -> Metric:
    """A metric given by name is looked up in the task's declaration."""
    return metric if isinstance(metric, Metric) else find_metric(task, metric)


def tolerance_for(task: str, metric: Metric | str, overrides: dict[str, Tolerance]) -> Tolerance:
    metric = _declared(task, metric)
    for key in (f"{task}.{metric.name}", metric.name):
        if key in overrides:
            return overrides[key]
    return Tolerance.parse(metric.max_drop)


def gate_row(task: str, label: str, metric: Metric | str, base: float, comp: float, head: str,
             tol: Tolerance, ci: tuple[float, float] | None = None, n: int | None = None) -> dict:
    """`label` names the row (lm:<dataset> for each LM text); `task` finds a metric given by name.
    `ci`: the 95 % interval of Δ over `n` examples (paired bootstrap), shown beside the verdict
    and described by `note`; the verdict itself is the tolerance on the point Δ alone."""
    metric = _declared(task, metric)
    lower = metric.lower_is_better
    delta = comp - base
    rel = delta / abs(base) if base not in (0, 0.0) and math.isfinite(base) else float("nan")
    drop = delta if lower else -delta
    allowed = tol.allowed(base)
    ok = math.isfinite(comp) and math.isfinite(base) and drop <= allowed + 1e-12
    return {"task": label, "metric": metric.name, "head": head, "baseline": base, "compressed": comp,
            "delta": delta, "delta_rel": rel, "tolerance": str(tol), "tolerance_kind":
            "relative" if tol.relative else "absolute", "lower_is_better": lower, "status": "PASS" if ok else "FAIL",
            "delta_ci95": list(ci) if ci else None, "n": n,
            "note": verdict_note(ci, lower) if n else ""}
