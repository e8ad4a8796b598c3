"""Turn what the parsers aggregated, and the checked metadata, into a `TraceData`."""
from __future__ import annotations

import math
from pathlib import Path

from moe_trace.analysis import PARTS, PHASES, RunData

from . import metadata
from .aggregate import Aggregate, pidkey
from .format import COUNTER_RE, META_KEY
from .result import PlainTraceSummary, TraceData


def build(path: Path, meta: dict, agg: Aggregate, parser: str, nbytes: int, seconds: float) -> TraceData:
    """The TraceData of one file (raises TraceError when its moe-trace metadata is damaged)."""
    mt = None
    runs: list[RunData] = []
    pid_part: dict = {}
    if META_KEY in meta:
        mt, runs, pid_part = metadata.check(path, meta[META_KEY])
        meta = dict(meta, **{META_KEY: mt})
    nparts = max(1, len(runs))
    if mt is not None and isinstance(mt.get("pid_names"), dict):
        for k, v in mt["pid_names"].items():
            agg.names[pidkey(k)] = str(v)

    def part_of(pid) -> int:
        return pid_part.get(pid, 0)

    # timing per part / phase / layer / range part (ms)
    spans_gpu: dict[tuple, list] = {}
    for (pid, _ext), (t0, t1, phase, layer, prt, dur) in agg.spans.items():
        acc = spans_gpu.setdefault((pid, phase, layer, prt), [0.0, 0])
        acc[0] += dur if dur is not None else t1 - t0  # dur: exact when the instance has one span
        acc[1] += 1
    for key, (us, n) in agg.gpu.items():
        acc = spans_gpu.setdefault(key, [0.0, 0])
        acc[0] += us
        acc[1] += n
    gpu_t: list[dict] = [{} for _ in range(nparts)]
    cpu_t: list[dict] = [{} for _ in range(nparts)]
    for src, dst in ((spans_gpu, gpu_t), (agg.cpu, cpu_t)):
        for (pid, phase, layer, prt), (us, n) in src.items():
            d = dst[part_of(pid)]
            acc = d.setdefault((phase, layer, prt), [0.0, 0])
            acc[0] += us
            acc[1] += n
    timing_source = None
    for i, run in enumerate(runs):
        table = gpu_t[i] or cpu_t[i]
        if not table:
            continue
        src_name = "kineto_gpu" if gpu_t[i] else "kineto_cpu"
        run.timing = {p: [{f"{prt}_ms": (table[(p, l.index, prt)][0] / 1000.0 if (p, l.index, prt) in table else None)
                           for prt in PARTS} for l in run.layers] for p in PHASES}
        run.timing_source = src_name
        timing_source = src_name if timing_source in (None, src_name) else "mixed"

    range_ms: dict[str, dict] = {}
    for src, k in ((gpu_t, "gpu_ms"), (cpu_t, "cpu_ms")):
        for d in src:
            for (phase, layer, prt), (us, n) in sorted(d.items()):
                r = range_ms.setdefault(f"{phase}/L{layer:03d}/{prt}", {"gpu_ms": None, "cpu_ms": None, "count": 0})
                r[k] = (r[k] or 0.0) + us / 1000.0
                r["count"] = max(r["count"], n)

    # steps and counters
    ts_step: dict[tuple, int] = {}
    seen: dict[tuple, dict] = {}
    for (pid, n), s in agg.steps.items():
        part = part_of(pid)
        ts_step[(part, s["ts"])] = n
        seen.setdefault((part, n), s)
    part_counters: list[dict] = [{} for _ in range(nparts)]
    for name, pid, ts, args in agg.counters:
        m = COUNTER_RE.match(name) if isinstance(name, str) else None
        if not m:
            continue
        part = part_of(pid)
        step = ts_step.get((part, ts))
        if step is None:
            step = _nearest_step(ts, [(t, n) for (pt, t), n in ts_step.items() if pt == part])
        layer, metric = int(m.group(1)), m.group(2)
        rec = part_counters[part].setdefault(step, {}).setdefault(layer, {})
        if metric == "expert_tokens":
            vals = [v for _, v in sorted(args.items())]
            rec["expert_tokens"] = vals if all(type(v) is int for v in vals) else [_count(v) for v in vals]
        else:
            v = next(iter(args.values()), None)
            rec[metric] = _count(v) if metric == "active_experts" else _value(v)
    steps: list[dict] = []
    meta_steps = (mt or {}).get("steps") or []
    listed = set()
    for s in meta_steps:
        if not isinstance(s, dict) or "step" not in s:
            continue
        n = s["step"]
        listed.add(n)
        hit = seen.get((0, n))
        steps.append({"step": n, "phase": s.get("phase"), "tokens": s.get("tokens"), "recorded": hit is not None,
                      "ts": hit["ts"] if hit else None, "host_ms": hit["dur"] / 1000.0 if hit else None})
    for (part, n), s in sorted(seen.items()):
        if part == 0 and n not in listed:
            steps.append({"step": n, "phase": s["phase"], "tokens": None, "recorded": True, "ts": s["ts"],
                          "host_ms": s["dur"] / 1000.0})

    part_step_ms, unattributed = _step_range_ms(agg, part_of, nparts)

    # plain summary
    devices = {}
    for pid, d in sorted(agg.devices.items(), key=lambda kv: str(kv[0])):
        name = agg.names.get(pid) if pid_part or isinstance(pid, str) else None
        label = name or (f"GPU {pid}" if isinstance(pid, int) else str(pid))
        devices[label] = {"pid": pid, "kernels": d[0], "kernel_ms": d[1] / 1000.0, "memcpy_ms": d[3] / 1000.0,
                          "memset_ms": d[5] / 1000.0, "memcpys": d[2], "memsets": d[4],
                          "span_ms": (d[7] - d[6]) / 1000.0}
    pst = list(agg.pstep.values())
    dist = meta.get("distributedInfo") if isinstance(meta.get("distributedInfo"), dict) else {}
    rank = (mt or {}).get("process", {}).get("dist_rank") if mt else None
    if rank is None:
        rank = dist.get("rank")
    summary = PlainTraceSummary(path=str(path), devices=devices, profiler_steps=len(agg.pstep),
                                profiler_step_ms=(sum(pst) / len(pst) / 1000.0) if pst else None,
                                user_annotations=agg.user_annotations, range_ms=range_ms,
                                rank=rank if isinstance(rank, int) else None, kernel_scope=_kernel_scope(mt))
    return TraceData(path=path, metadata=meta, runs=runs, steps=steps,
                     counters=part_counters[0] if part_counters else {}, part_counters=part_counters,
                     range_ms=range_ms, summary=summary, timing_source=timing_source, parser=parser,
                     bytes=nbytes, seconds=seconds, event_count=agg.events, part_step_ms=part_step_ms,
                     step_gpu_unattributed_ms=unattributed)


def _step_range_ms(agg: Aggregate, part_of, nparts: int) -> tuple[list[dict], list[float | None]]:
    """Per part: {step: {"gpu_ms": {router, experts, shared} | None, "cpu_ms": {...}}}, and per part the
    GPU range time no step could be given (None when the part has no GPU ranges).

    A CPU range belongs to the step whose `moe_trace/<phase>#N` range holds its start; its GPU span
    (the `gpu_user_annotation` with the same External id, as Kineto links them) goes with it. GPU time
    per span is what the phase totals add up (`dur`, or first start to last end over streams), so the
    steps' GPU times sum to the report's range times (plus the unattributed rest)."""
    import bisect

    windows: list[list[tuple[float, float, int]]] = [[] for _ in range(nparts)]
    for (pid, n), st in agg.steps.items():
        try:
            windows[part_of(pid)].append((float(st["ts"]), float(st["ts"]) + float(st["dur"]), n))
        except (TypeError, ValueError, IndexError):
            continue
    for w in windows:
        w.sort()
    starts = [[w[0] for w in ws] for ws in windows]
    out: list[dict] = [{} for _ in range(nparts)]
    has_gpu = [False] * nparts
    unattributed = [0.0] * nparts

    def rec(part: int, n: int) -> dict:
        r = out[part].get(n)
        if r is None:
            r = out[part][n] = {"gpu_ms": None, "cpu_ms": {p: 0.0 for p in PARTS}}
        return r

    def step_of(part: int, ts: float) -> int | None:
        i = bisect.bisect_right(starts[part], ts) - 1
        if i < 0:
            return None
        t0, t1, n = windows[part][i]
        return n if ts <= t1 else None

    owner: dict[tuple, int] = {}  # (part, External id) -> step
    for pid, ext, ts, dur, prt in agg.ranges:
        part = part_of(pid)
        if part >= nparts or prt not in PARTS:
            continue
        n = step_of(part, ts)
        if n is None:
            continue
        rec(part, n)["cpu_ms"][prt] += dur / 1000.0
        if ext is not None:
            owner[(part, ext)] = n
    for (pid, ext), (t0, t1, _phase, _layer, prt, dur) in agg.spans.items():
        part = part_of(pid)
        if part >= nparts or prt not in PARTS:
            continue
        has_gpu[part] = True
        us = dur if dur is not None else t1 - t0
        n = owner.get((part, ext))
        if n is None:
            unattributed[part] += us / 1000.0
            continue
        r = rec(part, n)
        if r["gpu_ms"] is None:
            r["gpu_ms"] = {p: 0.0 for p in PARTS}
        r["gpu_ms"][prt] += us / 1000.0
    for pid, _phase, _layer, prt in agg.gpu:  # GPU ranges without an External id: no step to give them
        part = part_of(pid)
        if part < nparts:
            has_gpu[part] = True
            unattributed[part] += agg.gpu[(pid, _phase, _layer, prt)][0] / 1000.0
    for part in range(nparts):
        if has_gpu[part]:  # a step whose ranges launched no kernel ran 0 ms on the GPU
            for r in out[part].values():
                if r["gpu_ms"] is None:
                    r["gpu_ms"] = {p: 0.0 for p in PARTS}
    return out, [u if g else None for u, g in zip(unattributed, has_gpu)]


def _nearest_step(ts: float, pairs: list[tuple[float, int]]) -> int | None:
    """The step whose range starts last at or before `ts` (counters are written at the step's start)."""
    best = None
    for t, n in pairs:
        if t <= ts and (best is None or t > best[0]):
            best = (t, n)
    return best[1] if best else None


def _count(v) -> int | None:
    """A counter value that should be a count: an int, or None when the event holds something else."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return int(v)


def _value(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _kernel_scope(mt: dict | None) -> str:
    """"moe_ranges" when the writer slimmed the trace (for a merged trace: any of its files), else "all"."""
    if not isinstance(mt, dict):
        return "all"
    parts = mt.get("parts") if isinstance(mt.get("parts"), list) else [mt]
    return "moe_ranges" if any(isinstance(p, dict) and p.get("slim") is True for p in parts) else "all"
