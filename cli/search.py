"""`compress search`: the smallest configuration whose quality gate passes.

    configurations: sharing x embedding/head bits x relax rank x vocabulary trimming [x outside-block formats]
      -> each one's packed size, from a post-training run (no QAT: a packed file's bytes do not
         depend on the weights' values, only on the formats, the ties and the kept vocabulary)
      -> skip what misses --target-ratio, and duplicates (two strategies that tie the same blocks)
      -> train the rest smallest first, each as one ordinary `compress` run gated on --tasks,
         until one passes (or --order bisect); that one is the answer

Every candidate is `pipeline.compress` with a modified CompressConfig, in OUT/candidates/NAME
(its model, report.json and eval/ as any run's), so nothing of the pipeline is repeated here. With
--resume a candidate whose report.json holds its gate verdict for the same settings is read, not
rerun, and an interrupted one continues from its training checkpoint: an interrupted search
continues where it stopped. OUT/search.json records every candidate; the winner is copied to
OUT/model.tritpress.safetensors and OUT/report.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tritpress.compressor.errors import TritpressError
from tritpress.compressor.fileio import atomic_path, check_writable, read_json_file, refuse_overwrite_input, write_json

from .config import ORDERS, SearchConfig, split_list  # re-exported: torch-free home
from .pipeline import ONNX_NAME, PACKED_NAME, REPORT_NAME, CompressConfig, Listener, compress

SEARCH_NAME = "search.json"
FRONTIER_MD = "frontier.md"
FRONTIER_PNG = "frontier.png"
CANDIDATES_DIR = "candidates"
SIZE_NAME = "size.json"            # a candidate's measured packed size (reused by --resume)
CANDIDATE_NAME = "candidate.json"  # the settings a candidate's run was started with
@dataclass
class Candidate:
    """One configuration: its run's settings, its size, and what the search made of it."""
    name: str
    sharing: str
    relax_rank: int
    bits: str
    trim_vocab: str | None
    cfg: CompressConfig
    estimated_bytes: int | None = None   # the post-training packed file (before QAT)
    bytes: int | None = None             # the trained packed file
    ratio: float | None = None           # x smaller than fp32
    fp32_bytes: int | None = None
    groups: list | None = None           # the tie's groups: two strategies tying the same blocks are one model
    status: str = "pending"              # PASS | FAIL | skipped | error | pending
    why: str = ""
    rows: list = field(default_factory=list)  # the gate rows, compact
    wall_s: float | None = None
    outside: str | None = None           # --outside-blocks of this candidate (None: the run's, not searched)
    probe: dict | None = None            # --probe-steps: the probe's steps, gate rows and verdict
    min_count: int = 1                   # --trim-min-count of this candidate (a trimmed one)

    @property
    def folder(self) -> Path:
        return Path(self.cfg.out)

    def skip(self, why: str) -> None:
        self.status, self.why = "skipped", why

    def to_dict(self) -> dict:
        keep = ("name", "sharing", "relax_rank", "bits", "trim_vocab", "min_count", "outside", "estimated_bytes",
                "bytes", "ratio",
                "status", "why", "rows", "wall_s", "probe")
        return {**{k: getattr(self, k) for k in keep}, "folder": str(self.folder)}


@dataclass
class SearchResult:
    candidates: list[Candidate]
    winner: Candidate | None             # the smallest candidate that passed
    closest: Candidate | None            # without a winner: the one nearest to passing (or to the target)
    stopped: str | None                  # why the search ended before its rule did: max_minutes
    record: dict                         # the contents of search.json
    out: Path

    @property
    def passed(self) -> bool:
        return self.winner is not None


def search(cfg: CompressConfig, scfg: SearchConfig, listener: Listener | None = None) -> SearchResult:
    """Size every configuration, train the eligible ones in --order until the rule stops, write
    search.json, frontier.md/.png and the winner's files into cfg.out_dir()."""
    listener = listener or Listener()
    out = cfg.out_dir()
    _refuse_bad_input(cfg, scfg, out)
    clock = Budget(scfg.max_minutes)
    candidates = plan_candidates(cfg, scfg, out)
    stopped = None
    try:
        stopped = size_all(candidates, cfg.train.resume, listener, clock)
        queue = eligible(candidates, scfg)
        if stopped is None and queue:
            walk = bisect if scfg.order == "bisect" else smallest_first
            stopped = walk(queue, lambda c: run_probed(c, scfg, cfg.train.resume, listener), clock)
    except KeyboardInterrupt:  # Ctrl-C (TrainingInterrupted too): what was found is kept, then stop
        finish(cfg, scfg, candidates, "interrupted", out, clock)
        raise
    return finish(cfg, scfg, candidates, stopped, out, clock)


def _refuse_bad_input(cfg: CompressConfig, scfg: SearchConfig, out: Path) -> None:
    if not cfg.tasks:
        raise TritpressError("search gates every candidate on its task quality: pass --tasks (e.g. cls, tok, qa, lm)")
    train = cfg.train
    warmup = train.resolved(0).quant_warmup   # (the default does not depend on the model's size)
    if scfg.probe_steps and scfg.probe_steps < min(warmup, train.steps) and train.quant_schedule != "none":
        # the probe's converted model is fully ternary, but it trained with part of each weight still float
        raise TritpressError(f"--probe-steps {scfg.probe_steps} ends before quantization is fully on (--quant-warmup "
                             f"{warmup} of --steps {train.steps}): the probe would judge a model trained partly "
                             f"float; use --probe-steps >= {warmup} or a shorter --quant-warmup")
    refuse_overwrite_input([out / PACKED_NAME, out / REPORT_NAME, out / SEARCH_NAME], [cfg.model, cfg.config])
    check_writable(out, "--out")


class Budget:
    """--max-minutes, read between candidates (a running candidate is never cut)."""

    def __init__(self, minutes: float):
        self.minutes, self.t0 = minutes, time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.t0

    def spent(self) -> bool:
        return bool(self.minutes) and self.elapsed_s() >= 60 * self.minutes


# ------------------------------------------------------------------ candidates


def plan_candidates(cfg: CompressConfig, scfg: SearchConfig, out: Path) -> list[Candidate]:
    """Every combination, in the order of the lists given (the tie-break between equal sizes).
    Trimming is tried off, and as --trim-vocab says when it is given (at each --try-min-count)."""
    counts = [int(n) for n in split_list(scfg.try_min_count)] or [cfg.trim_min_count]
    trims = [(None, 1)] + ([(cfg.trim_vocab, n) for n in counts] if cfg.trim_vocab else [])
    ranks = [int(r) for r in split_list(scfg.try_relax_rank)]
    outsides = split_list(scfg.try_outside) or [None]
    candidates = []
    for sharing in split_list(scfg.try_sharing):
        for rank in ([0] if sharing == "none" else ranks):
            for bits in split_list(scfg.try_bits):
                for outside in outsides:
                    for trim, count in trims:
                        name = _name(sharing, rank, bits, trim, outside, count)
                        config = candidate_config(cfg, scfg, sharing, rank, bits, trim, out / CANDIDATES_DIR / name,
                                                  outside, count)
                        candidates.append(Candidate(name, sharing, rank, bits, trim, config, outside=outside,
                                                    min_count=count))
    return candidates


def _name(sharing: str, rank: int, bits: str, trim: str | None, outside: str | None = None, count: int = 1) -> str:
    slug = re.sub(r"[^\w.-]+", "_", sharing).strip("_") or "groups"
    trimmed = ("-trim" + (str(count) if count > 1 else "")) if trim else ""
    return f"{slug}{f'-r{rank}' if rank else ''}-{bits}{f'-o{outside}' if outside else ''}{trimmed}"


def candidate_config(cfg: CompressConfig, scfg: SearchConfig, sharing: str, rank: int, bits: str,
                     trim: str | None, folder: Path, outside: str | None = None, count: int = 1) -> CompressConfig:
    """The user's run settings with this candidate's sharing, formats, trim and gate tolerance."""
    try:  # the redundancy analysis does not change a fixed strategy's tie: `compress analyze` writes it once
        scfg_sharing = dataclasses.replace(cfg.sharing, strategy=sharing, relax_rank=rank, groups=None,
                                           analyze=cfg.sharing.analyze and sharing == "auto")
    except ValueError as e:
        raise TritpressError(f"--try-sharing {sharing!r}: {e}") from None
    return dataclasses.replace(
        cfg, out=str(folder), trim_vocab=trim, trim_min_count=count, sharing=scfg_sharing,
        quant=dataclasses.replace(cfg.quant, embedding=bits, head=bits, outside_blocks=outside or cfg.quant.outside_blocks),
        eval=dataclasses.replace(cfg.eval, max_drop=[*cfg.eval.max_drop, *max_drop_entries(cfg.tasks, scfg.max_drop)]))


def max_drop_entries(tasks: str, max_drop: str | None) -> list[str]:
    """--max-drop as the gate's TASK.METRIC=VALUE entries (they override the recipe's [eval] max_drop):
    points apply to the scores measured in points, a percentage to every gated metric (a perplexity
    has no points to lose)."""
    from tritpress.analyzers.quality.registry import get, parse_tasks

    if max_drop is None:
        return []
    relative = max_drop.strip().endswith("%")
    return [f"{task}.{m.name}={max_drop}" for task in parse_tasks(tasks) for m in get(task).gated
            if relative or not m.lower_is_better]


def settings_key(cfg: CompressConfig) -> dict:
    """What decides a candidate's result: its settings, less --resume (how, not what, it runs) and
    --stop-after (how far it has run: a probe is the first steps of the same run)."""
    d = dataclasses.asdict(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=False,
                                                                               stop_after=0)))
    return json.loads(json.dumps(d, default=str))


# ------------------------------------------------------------------ sizes


def size_all(candidates: list[Candidate], resume: bool, listener: Listener, clock: Budget) -> str | None:
    """Each candidate's packed size, before any training; then duplicates are skipped."""
    for i, c in enumerate(candidates):
        if clock.spent():
            _not_tried(candidates[i:], "--max-minutes reached before its size was measured")
            return "max_minutes"
        try:
            measure_size(c, resume)
        except TritpressError as e:
            c.status, c.why = "error", f"sizing: {e}"
            listener.note(f"search: {c.name}: {c.why}")
            continue
        listener.note(f"search: {c.name}: {c.estimated_bytes / 1e6:.3f} MB, {c.ratio:g}x smaller than fp32")
    _skip_duplicates(candidates)
    return None


def measure_size(c: Candidate, resume: bool) -> None:
    """The candidate's packed bytes from a post-training run of its settings in a scratch folder (no QAT,
    no check, evaluation or ONNX); kept in NAME/size.json, which --resume reads back."""
    cache, key = c.folder / SIZE_NAME, settings_key(c.cfg)
    saved = read_json_file(cache, "size record") if resume and cache.is_file() else None
    if saved is None or saved.get("config") != key:
        cfg = c.cfg
        sizing = dataclasses.replace(
            cfg, tasks=None, check=False, onnx=dataclasses.replace(cfg.onnx, enabled=False),
            train=dataclasses.replace(cfg.train, steps=0, resume=False), trim_learn_mix=False)  # same bytes
        c.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=c.folder, prefix=".sizing-") as tmp:
            report = compress(dataclasses.replace(sizing, out=tmp), Listener())
        groups = (report.get("sharing") or {}).get("plan", {}).get("groups")
        groups = groups if groups and any(len(g) > 1 for g in groups) else None  # nothing tied: no sharing
        saved = {"config": key, "bytes": report["size"]["file_bytes"], "fp32_bytes":
                 report["size"]["original"]["fp32_bytes"], "groups": groups}
        write_json(cache, saved)
    c.estimated_bytes, c.fp32_bytes, c.groups = saved["bytes"], saved["fp32_bytes"], saved["groups"]
    c.ratio = round(c.fp32_bytes / c.estimated_bytes, 2)


def _skip_duplicates(candidates: list[Candidate]) -> None:
    """Two strategies that tie the same blocks (alternate and cycle on 4 blocks; alternate on 2 blocks ties
    nothing, as none) are the same model."""
    seen: dict[str, str] = {}
    for c in candidates:
        if c.status != "pending":
            continue
        key = json.dumps([c.groups, c.relax_rank if c.groups else 0, c.bits, c.outside, c.trim_vocab, c.min_count,
                          c.cfg.sharing.share if c.groups else None])
        if key in seen:
            c.skip(f"the same model as {seen[key]} (same tied blocks)")
        else:
            seen[key] = c.name


def eligible(candidates: list[Candidate], scfg: SearchConfig) -> list[Candidate]:
    """The sized candidates that can reach --target-ratio, smallest first (a stable sort: equal sizes
    keep the order of the --try-* lists)."""
    queue = sorted((c for c in candidates if c.status == "pending"), key=lambda c: c.estimated_bytes)
    for c in queue:
        if scfg.target_ratio and c.ratio < scfg.target_ratio:
            c.skip(f"{c.ratio:g}x < --target-ratio {scfg.target_ratio:g} (not trained)")
    return [c for c in queue if c.status == "pending"]


# ------------------------------------------------------------------ the walk


def smallest_first(queue: list[Candidate], run, clock: Budget) -> str | None:
    """Train in size order; the first PASS is the smallest that passes, and the rest are bigger."""
    for i, c in enumerate(queue):
        if clock.spent():
            _not_tried(queue[i:], "--max-minutes reached")
            return "max_minutes"
        run(c)
        if c.status == "PASS":
            for later in queue[i + 1:]:
                later.skip(f"bigger than {c.name}, which passes (not trained)")
            return None
    return None


def bisect(queue: list[Candidate], run, clock: Budget) -> str | None:
    """Binary search over the size order for the smallest PASS, assuming every candidate bigger than a
    passing one passes and every one smaller than a failing one fails."""
    lo, hi = 0, len(queue)  # the answer lies in queue[lo:hi], or is none (hi == len)
    stopped = None
    while lo < hi:
        if clock.spent():
            stopped = "max_minutes"
            break
        mid = (lo + hi) // 2
        run(queue[mid])
        if queue[mid].status == "PASS":
            hi = mid
        else:  # an error counts as a failure
            lo = mid + 1
    for i, c in enumerate(queue):
        if c.status != "pending":
            continue
        if stopped:
            c.skip("not tried: --max-minutes reached")
        elif i > hi:
            c.skip(f"bigger than {queue[hi].name}, which passes (not trained)")
        else:
            failed = next(f for f in queue[i + 1:] if f.status in ("FAIL", "error"))
            c.skip(f"assumed to fail: smaller than {failed.name}, which fails (--order bisect; not trained)")
    return stopped


def _not_tried(candidates: list[Candidate], why: str) -> None:
    for c in candidates:
        if c.status == "pending":
            c.skip(f"not tried: {why}")


def run_probed(c: Candidate, scfg: SearchConfig, resume: bool, listener: Listener) -> None:
    """--probe-steps N: the candidate's first N steps (its own schedule, `TrainConfig.stop_after`), gated.
    A probe that passes the gate is the candidate's result; one whose drop stays within
    --probe-max-drop trains on, from the probe's checkpoint, to --steps; any other fails there."""
    steps = c.cfg.train.steps
    if not scfg.probe_steps or scfg.probe_steps >= steps or finished_report(c, c.cfg, resume) is not None:
        return run_candidate(c, c.cfg, resume, listener)   # (a finished run is read back, probe and all)
    train = dataclasses.replace(c.cfg.train, stop_after=scfg.probe_steps,
                                checkpoint_every=c.cfg.train.checkpoint_every or scfg.probe_steps)
    run_candidate(c, dataclasses.replace(c.cfg, train=train), resume, listener)
    c.probe = {"steps": scfg.probe_steps, "status": c.status, "rows": c.rows, "why": c.why}
    if c.status == "PASS":
        c.why = f"passes after the probe's {scfg.probe_steps} of {steps} steps"
    elif c.status == "FAIL" and not within_probe(c.rows, scfg.probe_max_drop):
        c.why = f"probe ({scfg.probe_steps} of {steps} steps) beyond --probe-max-drop: {c.why}"
    elif c.status == "FAIL":  # promising: the same run continues from the probe's last step
        cfg = dataclasses.replace(c.cfg, train=dataclasses.replace(train, stop_after=0, resume=True))
        run_candidate(c, cfg, resume, listener, continuing=True)


def within_probe(rows: list[dict], probe_max_drop: str | None) -> bool:
    """Every gate row's drop within --probe-max-drop (default: 3x the drop its gate allows)."""
    from tritpress.analyzers.quality.gate import Tolerance

    for r in rows:
        if r["margin"] is None:
            return False
        drop = r["allowed"] - r["margin"]
        limit = Tolerance.parse(probe_max_drop).allowed(r["baseline"]) if probe_max_drop else 3 * r["allowed"]
        if drop > limit:
            return False
    return bool(rows)


def run_candidate(c: Candidate, cfg: CompressConfig, resume: bool, listener: Listener,
                  continuing: bool = False) -> None:
    """One ordinary pipeline run of `cfg` (the candidate's settings, maybe stopped early) in NAME/,
    or, with --resume, its finished report read back (one that trained as far as `cfg` asks).
    `continuing`: the run goes on from the probe's checkpoint."""
    key = settings_key(cfg)
    started = c.folder / CANDIDATE_NAME
    same = started.is_file() and read_json_file(started, "candidate record").get("config") == key
    report = finished_report(c, cfg, resume)
    if report is not None:
        listener.note(f"search: {c.name}: finished before, read from {c.folder / REPORT_NAME}")
    else:
        listener.note(f"search: {c.name}: training to step {cfg.train.last_step} ({c.estimated_bytes / 1e6:.3f} MB, "
                      f"{c.ratio:g}x)")
        write_json(started, {"name": c.name, "config": key})
        # a checkpoint of other settings is not continued: the run starts over
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=continuing or (resume and same)))
        t0 = time.monotonic()
        try:
            report = compress(run_cfg, listener)
        except TritpressError as e:
            c.status, c.why = "error", str(e)
            listener.note(f"search: {c.name}: error: {e}")
            return
        c.wall_s = round((c.wall_s or 0.0) * continuing + time.monotonic() - t0, 1)
    take_report(c, report)
    listener.note(f"search: {c.name}: {c.status}{f' ({c.why})' if c.why else ''}")


def finished_report(c: Candidate, cfg: CompressConfig, resume: bool) -> dict | None:
    """With --resume, the candidate's report.json when it holds a verdict for these settings, trained
    as far as `cfg` asks (a probe's report is not the finished run's)."""
    started, path = c.folder / CANDIDATE_NAME, c.folder / REPORT_NAME
    if not (resume and started.is_file() and path.is_file()):
        return None
    if read_json_file(started, "candidate record").get("config") != settings_key(cfg):
        return None
    report = read_json_file(path, "report")
    trained = (report.get("training") or {}).get("steps", 0)
    return report if "evaluation" in report and trained == cfg.train.last_step else None


def take_report(c: Candidate, report: dict) -> None:
    """The verdict, the bytes and the gate rows of a finished candidate run."""
    evaluation = report.get("evaluation") or {}
    c.why = ""   # (a probe's reasons do not carry over to the run it continued into)
    c.bytes = report["size"]["file_bytes"]
    c.ratio = report["size"].get("ratio_vs_fp32", c.ratio)
    c.wall_s = c.wall_s if c.wall_s is not None else sum((report.get("timings_s") or {}).values())
    c.rows = [_row(r) for r in evaluation.get("rows", [])]
    c.status = "PASS" if evaluation.get("passed") else "FAIL"
    failing = [r for r in c.rows if r["status"] != "PASS"]
    if evaluation.get("errors"):
        c.why = "; ".join(f"{k}: {v}" for k, v in evaluation["errors"].items())
    elif failing:
        c.why = "; ".join(f"{r['task']} {r['metric']} Δ {r['delta']:+.3g}, allowed drop {r['allowed']:.3g}"
                          for r in failing)
    elif not c.rows:
        c.why = evaluation.get("note", "no gate rows")


def _row(r: dict) -> dict:
    """A gate row, with `allowed` (the drop the tolerance allows) and `margin` (allowed - drop:
    below 0 fails), so candidates compare on one number."""
    from tritpress.analyzers.quality.gate import Tolerance

    allowed = Tolerance.parse(r["tolerance"]).allowed(r["baseline"])
    drop = r["delta"] if r["lower_is_better"] else -r["delta"]
    keep = ("task", "metric", "baseline", "compressed", "delta", "delta_ci95", "tolerance", "status", "lower_is_better")
    return {**{k: r.get(k) for k in keep}, "allowed": allowed,
            "margin": allowed - drop if math.isfinite(drop) else None}  # None: no finite score (JSON has no inf)


# ------------------------------------------------------------------ outputs


def finish(cfg: CompressConfig, scfg: SearchConfig, candidates: list[Candidate], stopped: str | None,
           out: Path, clock: Budget) -> SearchResult:
    """search.json, frontier.md and .png, and the winner's files in OUT."""
    from tritpress.analyzers.frontier import closest_line, write_frontier

    passing = [c for c in candidates if c.status == "PASS"]
    winner = min(passing, key=lambda c: c.bytes) if passing else None
    closest = None if winner else closest_candidate(candidates)
    record = {"model": cfg.model, "tasks": cfg.tasks, "search": dataclasses.asdict(scfg),
              "fp32_bytes": next((c.fp32_bytes for c in candidates if c.fp32_bytes), None),
              "candidates": [c.to_dict() for c in candidates], "winner": winner.name if winner else None,
              "closest": closest.name if closest else None, "stopped": stopped,
              "wall_s": round(clock.elapsed_s(), 1), "files": {}}
    record["message"] = winner_line(winner) if winner else closest_line(record)
    if winner:
        record["files"].update(copy_winner(winner, out))
    record["files"].update(write_frontier(record, out / FRONTIER_MD, out / FRONTIER_PNG),
                           search=str(out / SEARCH_NAME))
    write_json(out / SEARCH_NAME, record)
    return SearchResult(candidates, winner, closest, stopped, record, out)


def winner_line(c: Candidate) -> str:
    return (f"smallest passing: {c.name}, {c.bytes / 1e6:.3f} MB, {c.ratio:g}x smaller than fp32 "
            f"({c.folder})")


def closest_candidate(candidates: list[Candidate]) -> Candidate | None:
    """No candidate passed: the trained one nearest to passing (its worst gate row's margin), else
    the sized one nearest to the size target (the smallest)."""
    trained = [c for c in candidates if c.rows]
    if trained:
        return max(trained, key=lambda c: min(-math.inf if r["margin"] is None else r["margin"] for r in c.rows))
    sized = [c for c in candidates if c.estimated_bytes]
    return min(sized, key=lambda c: c.estimated_bytes) if sized else None


def copy_winner(c: Candidate, out: Path) -> dict:
    """The winner's packed file, report (and model.onnx) copied into OUT, each written atomically."""
    files = {}
    for name, key in ((PACKED_NAME, "packed"), (REPORT_NAME, "report"), (ONNX_NAME, "onnx")):
        src = c.folder / name
        if src.is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(src, tmp)
            files[key] = str(out / name)
    return files

