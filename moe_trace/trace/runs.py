"""Group read trace files into runs and combine one run's files into a `Report`.

A *run* is one `moe_trace.profile()` run: the files of all its ranks (one `run_id`, shared by the
ranks of a torchrun job, see `format.job_token`) and, per process, one file per profiler window.
Files of different models never share a run. Files from before run ids: a file without a rank is
a run of its own (with the other windows of its process), files with a rank that belong to one job
(same world size and model) form one run, as before.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from moe_trace.analysis import PHASES, Report, RunData
from moe_trace.errors import TraceError

from .format import MERGED_PREFIX, META_KEY
from .result import TraceData, no_meta_msg


@dataclass
class Run:
    """The files of one run, and a label for it (its run id; for older files a name made from them)."""

    id: str
    files: list[TraceData] = field(default_factory=list)
    legacy: bool = False

    @property
    def model(self) -> str:
        m = self.files[0].runs[0].model if self.files and self.files[0].runs else {}
        return str(m.get("name") or m.get("family") or "?")

    @property
    def started(self) -> float:
        """When the run started (its metadata; the newest file's mtime for older files)."""
        t = [d.started_at for d in self.files if d.started_at is not None]
        if t:
            return min(t)
        return max((_mtime(d.path) for d in self.files), default=0.0)

    def describe(self) -> str:
        return f"{self.id} ({self.model}, {len(self.files)} file{'s' if len(self.files) != 1 else ''})"


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _model_sig(mt: dict) -> tuple:
    run = mt.get("run")
    if not isinstance(run, dict):
        parts = mt.get("parts")
        run = parts[0].get("run") if isinstance(parts, list) and parts and isinstance(parts[0], dict) else {}
        run = run if isinstance(run, dict) else {}
    model = run.get("model") if isinstance(run.get("model"), dict) else {}
    layers = run.get("layers") if isinstance(run.get("layers"), list) else []
    return (str(model.get("name")), str(model.get("family")),
            tuple(str(l.get("name")) + "/" + str(l.get("num_experts")) for l in layers if isinstance(l, dict)))


def group_runs(datas: list[TraceData]) -> list[Run]:
    """The runs among `datas` (files with moe-trace metadata only), newest first."""
    groups: dict[tuple, Run] = {}
    for d in datas:
        kl = run_key(d.metadata, d.path) if d.is_moe else None
        if kl is None:
            continue
        key, rid = kl
        run = groups.get(key)
        if run is None:
            run = groups[key] = Run(id=str(rid), legacy=key[0] != "run")
        run.files.append(d)
    runs = list(groups.values())
    for r, label in zip(runs, unique_labels([r.id for r in runs], [r.model for r in runs])):
        r.id = label
    runs.sort(key=lambda r: (-r.started, r.id))
    return runs


def _str_or_none(x):
    return x if isinstance(x, str) and x else None


def run_key(meta: dict, path) -> tuple[tuple, str] | None:
    """(group key, label) of a file from its top-level metadata; None without moe-trace metadata.

    New files: their run id (and model). A merged file goes with the run its first part came from.
    Older files: a job's ranks by world size (and model), else the windows of one process."""
    mt = meta.get(META_KEY)
    if not isinstance(mt, dict):
        return None
    sig = _model_sig(mt)
    rid = _str_or_none(mt.get("run_id"))
    p = mt.get("process") if isinstance(mt.get("process"), dict) else {}
    merged = str(mt.get("schema", "")).startswith(MERGED_PREFIX) or "parts" in mt
    if merged and rid is None:
        parts = mt.get("parts") if isinstance(mt.get("parts"), list) else []
        p = parts[0].get("process") if parts and isinstance(parts[0], dict) and \
            isinstance(parts[0].get("process"), dict) else {}
        if not p:
            return ("merged", str(path)), _stem(path)
    if rid is not None:
        return ("run", rid, sig), rid
    if p.get("dist_rank") is not None and p.get("world_size"):
        return ("job", str(p.get("world_size")), sig), f"job-{p.get('world_size')}ranks"
    if merged:
        return ("merged", str(path)), _stem(path)
    return (("proc", str(p.get("hostname")), str(p.get("pid")), str(p.get("run_id")), sig, "" if p else str(path)),
            str(_str_or_none(p.get("run_id")) or _stem(path)))


def unique_labels(labels: list[str], models: list[str]) -> list[str]:
    """Labels made unique: a run id shared by two models gets `/{model}`, remaining clashes `.{k}`."""
    count: dict[str, int] = {}
    for x in labels:
        count[x] = count.get(x, 0) + 1
    out = [f"{x}/{m}" if count[x] > 1 else x for x, m in zip(labels, models)]
    seen: dict[str, int] = {}
    for i, x in enumerate(out):
        k = seen.get(x, 0)
        seen[x] = k + 1
        if k:
            out[i] = f"{x}.{k}"
    return out


def _stem(p) -> str:
    name = Path(p).name
    for suffix in (".pt.trace.json.gz", ".pt.trace.json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def select_run(runs: list[Run], run: str | None, path: str | os.PathLike = "", *, warn: bool = True) -> Run:
    """The run named `run` (its id or a unique prefix of it), or the newest with a warning naming the others."""
    if not runs:
        raise TraceError(f"no trace with moe-trace metadata under {path}")
    if run is not None:
        hit = [r for r in runs if r.id == run] or [r for r in runs if r.id.startswith(str(run))]
        if len(hit) != 1:
            what = "matches several runs" if hit else "is not a run"
            raise TraceError(f"--run {run!r} {what} under {path}; the runs there are: "
                             + ", ".join(r.describe() for r in runs[:20]))
        return hit[0]
    chosen = runs[0]
    others = [r for r in runs[1:] if not (r.files[0].merged and not chosen.files[0].merged)]
    if warn and others:
        warnings.warn(f"{path} holds {len(runs)} runs; analyzing the newest, {chosen.describe()}; the others: "
                      + ", ".join(r.describe() for r in others[:10]) + (" ..." if len(others) > 10 else "")
                      + " (pick one with --run ID / run=ID, or --all-runs / all_runs=True)", stacklevel=3)
    return chosen


def check_moe(datas: list[TraceData], path: str | os.PathLike = "") -> None:
    """TraceError when no file has moe-trace metadata; a warning naming the plain ones that are skipped."""
    moe = [d for d in datas if d.is_moe]
    if not moe:
        if len(datas) == 1:
            raise TraceError(no_meta_msg(datas[0].path))
        raise TraceError(f"none of the {len(datas)} trace files under {path} has moe-trace metadata (no top-level "
                         "'moe_trace' key); record them with moe_trace.profile(mode='kineto')")
    skipped = [d for d in datas if not d.is_moe]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} trace file(s) without moe-trace metadata: "
                      + ", ".join(str(d.path) for d in skipped[:3]), stacklevel=3)


def run_report(run: Run, ep_size: int | None = None) -> Report:
    """Combine the files of one run: per-process files by rank, windows of a process with each other
    (counts from the latest window: every file holds the run's totals so far; range times summed;
    windows written into the user's own profiler's files hold their own steps: counts added)."""
    moe = run.files
    single = [d for d in moe if not d.merged]
    if single and len(single) < len(moe):
        warnings.warn("skipped merged trace file(s) next to per-process ones (they hold the same counts)", stacklevel=3)
        moe = single
    groups: dict[tuple, list[TraceData]] = {}
    for d in moe:
        p = d.process
        key = (p.get("hostname"), p.get("pid"), p.get("dist_rank"), p.get("run_id"),
               str(d.path) if d.merged or not p else "")
        groups.setdefault(key, []).append(d)
    chosen: list[tuple[TraceData, list[RunData]]] = []
    for group in groups.values():
        if len(group) > 1 and all(_attached(d) for d in group):
            chosen.append(_attached_windows(group))
            continue
        latest = max(group, key=_calls)
        runs = latest.runs
        if len(group) > 1:
            if group[0].process.get("run_id") is None:
                warnings.warn(f"{len(group)} trace files come from one process ({', '.join(str(d.path) for d in group[:3])}); "
                              f"counts are taken from {latest.path}, range times are summed", stacklevel=3)
            runs = [_with_summed_timing(latest.runs[0], [d.runs[0] for d in group])]
        chosen.append((latest, runs))
    chosen.sort(key=lambda dr: (dr[0].rank if dr[0].rank is not None else 1 << 30, str(dr[0].path)))
    parts = [r for _, runs in chosen for r in runs]
    ranks = [d.rank for d, runs in chosen for _ in runs]  # per-device rows carry the process's real rank
    return Report(parts, ranks=ranks, ep_size=ep_size, run_id=None if run.legacy else run.id)


def _attached(d: TraceData) -> bool:
    """A file moe-trace wrote into while attached to the user's own profiler: it holds the counts of
    its own window's steps only (not the run's totals so far)."""
    return bool(d.runs) and bool(d.runs[0].settings.get("attached_profiler"))


def _attached_windows(group: list[TraceData]) -> tuple[TraceData, list[RunData]]:
    """The windows of one process attached to the user's profiler: each distinct window once (a
    window exported twice has one window number), counts and range times added."""
    by_window: dict[object, TraceData] = {}
    for d in sorted(group, key=lambda d: str(d.path)):
        by_window.setdefault(d.process.get("window"), d)
    files = [by_window[w] for w in sorted(by_window, key=lambda w: (w is None, w if isinstance(w, int) else 0))]
    run = files[0].runs[0]
    for d in files[1:]:
        run = run.merged(d.runs[0])
    return files[0], [run]


def _with_summed_timing(base: RunData, runs: list[RunData]) -> RunData:
    timed = [r for r in runs if r.timing]
    if not timed:
        return base
    timing = {p: [{k: _add(*(r.timing[p][i].get(k) for r in timed if p in r.timing and i < len(r.timing[p])))
                   for k in ("router_ms", "experts_ms", "shared_ms")} for i in range(len(base.layers))]
              for p in PHASES}
    sources = {r.timing_source for r in timed}
    return RunData(model=base.model, layers=base.layers, counts=base.counts, forward_calls=base.forward_calls,
                   forward_tokens=base.forward_tokens, timing=timing,
                   timing_source=sources.pop() if len(sources) == 1 else None, peak_memory=base.peak_memory,
                   settings=base.settings, run_id=base.run_id, padding_tokens=base.padding_tokens)


def _add(*vals):
    vals = [v for v in vals if v is not None]
    return float(sum(vals)) if vals else None


def _calls(d: TraceData) -> int:
    return sum(sum(r.forward_calls.values()) for r in d.runs)
