"""Write a moe-trace Kineto trace: the profiler's own Chrome trace plus MoE counters and metadata.

`write_trace(raw, run, steps, out_path)` takes what `torch.profiler.profile.export_chrome_trace`
wrote, adds the top-level `"moe_trace"` key and one set of counter events per MoE layer and recorded
step (docs/design.md, docs/trace-format.md), optionally drops the bulky host-side events (slim),
and writes the result once (gzip when the name ends in `.gz`). The layout is one event per line
after a small header of metadata keys, which keeps the file readable by HTA (it greps
`"rank": N` line by line) and lets the streaming reader find event boundaries cheaply.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import operator
import os
import re
import socket
import time
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import orjson

from moe_trace.analysis import RunData
from moe_trace.errors import TraceError

from .format import (COUNTER_CAT, GPU_USER_ANNOTATION, GPU_WORK_CATS, META_KEY, NAME_PREFIX,
                     RANGE_RE, SCHEMA, SLIM_CATS, SLIM_GPU_ARGS, STEP_RE, USER_ANNOTATION, counter_name, expert_key,
                     trace_file_name, worker_name)
from .export import (FULL_READ_CATS, ORJSON_OPTS as _ORJSON_OPTS, SLIM_READ_CATS, FullDrops, GpuWork, all_events,
                     dumps_batches, dumps_events, host_link_kept, is_raw_path, joined, read_selected, resolve_slim,
                     slim_select)
from .fastpath import Fallback
from .io import atomic_write, load_json, no_gc, write_under_free_name
from .metadata import encode_nonfinite
from .workers import workers_for

_DEVICE_RE = re.compile(r"^([a-z_]+)(?::(\d+))?$")

__all__ = ["write_trace", "write_run_traces", "write_chrome_trace", "device_pid", "no_gc", "SCHEMA", "COUNTER_CAT",
           "SLIM_CATS", "SLIM_GPU_ARGS"]


def write_trace(raw: dict | str | os.PathLike, run: RunData, steps: list[dict], out_path: str | os.PathLike,
                *, slim: bool = True, process: dict | None = None, compresslevel: int = 3,
                overwrite: bool = True, pass1: tuple | None = None, marks: dict | None = None) -> Path:
    """Write `raw` (a Chrome-trace dict or the path of one) with moe-trace counters to `out_path`.

    `steps`: `{"step", "phase", "tokens", "layers": {layer_index: {"expert_counts", "k_hist"}}}` for
    the steps the profiler recorded. `run`: the whole run's totals. `slim=True` keeps only the
    moe-trace and ProfilerStep ranges, GPU activity (kernels, memcpy, memset, GPU annotations),
    metadata events and the counters. `overwrite=False`: raise FileExistsError instead of replacing
    an existing file. `pass1`: a slim raw file's pass 1, already done (`workers.Follower`, while the
    profiler wrote the file). `marks`: gets the `time.perf_counter()` at the end of pass 1 ("pass1"), of
    the slim selection ("selected") and of pass 2 ("resolved") (benchmarks/kineto_speed.py). Returns the
    path written.
    """
    with no_gc():
        return _write_trace(raw, run, steps, out_path, slim=slim, process=process, compresslevel=compresslevel,
                            overwrite=overwrite, pass1=pass1, marks={} if marks is None else marks)


def _write_trace(raw, run, steps, out_path, *, slim, process, compresslevel, overwrite, pass1, marks) -> Path:
    # no workers when pass 1 is done and pass 2 can read its spans (export.read_spans)
    spans = pass1 is not None and all(getattr(ix, "has_spans", False) for ix in pass1[3])
    pool = workers_for(raw) if slim and is_raw_path(raw) and Path(raw).is_file() and not spans else None
    with pool or contextlib.nullcontext():  # worker processes for the two slim passes (workers.py)
        return _write_trace_with(raw, run, steps, out_path, slim=slim, process=process, compresslevel=compresslevel,
                                 overwrite=overwrite, workers=pool, pass1=pass1, marks=marks)


def _write_trace_with(raw, run, steps, out_path, *, slim, process, compresslevel, overwrite, workers,
                      pass1, marks) -> Path:
    path = None
    if is_raw_path(raw):
        path = Path(raw)
        if not path.is_file():
            raise TraceError(f"raw trace {path} does not exist; pass the file export_chrome_trace wrote or its dict")
        try:  # the byte path (export.py): only metadata, annotations and GPU events are parsed
            got = pass1 if slim and pass1 is not None else read_selected(path, slim, workers)
            head, selected, tail, side = got  # slim: a HostIndex per region; full: its FullDrops
            trace = {**head, **tail}
        except Fallback:
            path = None
    if path is None:  # a dict, or a layout the byte path does not know: load it whole
        trace = _load_raw(raw)
        events = trace.get("traceEvents")
        if not isinstance(events, list):
            raise TraceError("the raw trace has no traceEvents list; pass the dict or file that "
                             "torch.profiler's export_chrome_trace wrote")
        selected = [e for e in events if isinstance(e, dict) and _selected(e, slim)]
    marks["pass1"] = time.perf_counter()

    step_ts, host_pid = _scan(selected)  # reads M / annotation events (a GpuWork stub answers get() too)
    if host_pid is None:
        host_pid = (process or {}).get("pid") or os.getpid()
    counters, gpu_pids = _counter_events(run, steps, step_ts, host_pid)

    if slim:
        kept, corr, ext = slim_select(selected)
        selected = None  # the byte path's stubs of dropped GPU events go here
        live = {e.get("pid") for e in kept if e.get("ph") != "M"} | {c["pid"] for c in counters}
        if corr or ext:
            live.add(host_pid)
        kept = [e for e in kept if e.get("ph") != "M" or e.get("pid") in live]
        marks["selected"] = time.perf_counter()
        if path is not None:  # pass 2: parse the kept GPU events, copy their launches' and ops' bytes
            try:
                kept, links = resolve_slim(path, kept, corr, ext, side, workers)
                if workers is not None:
                    workers.close()
            except Fallback:
                raise TraceError(f"raw trace {raw} changed while it was being written; re-export it") from None
            marks["resolved"] = time.perf_counter()
            body = itertools.chain(dumps_batches(kept, _ORJSON_OPTS), links)  # streamed into the file
        else:
            body = [dumps_events(kept, _ORJSON_OPTS),
                    dumps_events([e for e in events if isinstance(e, dict) and host_link_kept(e, corr, ext)],
                                 _ORJSON_OPTS)]
        meta_events = kept
    else:
        if path is not None:
            body = all_events(path, side)
        else:
            drops = FullDrops.of_events(events)
            body = [dumps_events([e for e in events if not (isinstance(e, dict) and drops.dropped(e))], _ORJSON_OPTS)]
        meta_events = selected
    named = {e.get("pid") for e in meta_events
             if type(e) is dict and e.get("ph") == "M" and e.get("name") == "process_name"}
    extra_meta = []
    for pid in sorted(gpu_pids - named):
        extra_meta.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"GPU {pid}"}})
    if host_pid not in named and any(c["pid"] == host_pid for c in counters):
        extra_meta.append({"ph": "M", "name": "process_name", "pid": host_pid, "tid": 0, "args": {"name": "host"}})

    meta = {k: v for k, v in trace.items() if k != "traceEvents"}
    meta.pop(META_KEY, None)
    proc = _process_info(process, trace, host_pid)
    run_id = proc.pop("job_run_id", None) or run.run_id
    meta[META_KEY] = {
        "schema": SCHEMA,
        **({"run_id": run_id, "started_at": proc.pop("started_at", None) or time.time()} if run_id else {}),
        "run": _no_rank_keys(encode_nonfinite(run.to_dict())),
        "steps": [{"step": int(s["step"]), "phase": s["phase"], "tokens": int(s.get("tokens", 0))} for s in steps],
        "process": proc,
        "slim": bool(slim),
    }
    # a chain, not a list: a full trace's body is a stream of the raw file's regions (never all in memory)
    parts = itertools.chain([dumps_events(extra_meta, _ORJSON_OPTS)], body, [dumps_events(counters, _ORJSON_OPTS)])
    try:
        return atomic_write(out_path, _document(meta, joined(parts)), compresslevel=compresslevel, overwrite=overwrite)
    except Fallback:
        raise TraceError(f"raw trace {raw} changed while it was being written; re-export it") from None


def _selected(e: dict, slim: bool) -> bool:
    """The events the writer reads (export.read_selected finds the same ones in bytes)."""
    cat = e.get("cat")
    return e.get("ph") == "M" or (isinstance(cat, str) and cat in (SLIM_READ_CATS if slim else FULL_READ_CATS))


def _no_rank_keys(obj: Any) -> Any:
    """No key named "rank" in the moe_trace header (HTA takes the first `"rank": N` of the file as the
    file's rank): a nested `rank` becomes `dist_rank`."""
    if isinstance(obj, dict):
        return {("dist_rank" if k == "rank" else k): _no_rank_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_rank_keys(v) for v in obj]
    return obj


def _document(meta: dict, events: Iterable[bytes]) -> Iterator[bytes]:
    """`{**meta, "traceEvents": [events]}` in moe-trace's layout, as a stream of byte parts."""
    yield b"{\n"
    for k, v in meta.items():
        if k == "traceEvents":
            continue
        yield json.dumps(k).encode() + b": " + _dump_meta(v) + b",\n"
    yield b'"traceEvents": [\n'
    yield from events
    yield b"\n]\n}\n"


def write_run_traces(raws: list, run: RunData, steps: list[dict], logdir: str | os.PathLike, *, slim: bool = True,
                     process: dict, started_at: float | None = None, compresslevel: int = 3,
                     pass1: dict | None = None, marks: dict | None = None) -> list[Path]:
    """Write the trace files of one `profile()` run (one per profiler window) into `logdir`.

    Names: `{worker}.{run_id}[.{window}].pt.trace.json.gz` (format.trace_file_name); an existing file
    is never replaced (a `-{k}` is added to the run id part instead), so no run overwrites another's
    files, in one process or across processes. Returns the paths written."""
    logdir = Path(logdir)
    worker = worker_name(process)
    run_id = run.run_id
    out: list[Path] = []
    for n, raw in enumerate(raws):
        proc = dict(process, window=n, started_at=started_at)
        out.append(write_under_free_name(run_id, lambda tag: write_trace(
            raw, run, steps, logdir / trace_file_name(worker, tag, n), slim=slim, process=proc,
            compresslevel=compresslevel, overwrite=False,
            pass1=pass1.get(raw) if pass1 and is_raw_path(raw) else None, marks=marks), logdir))
    return out


def write_chrome_trace(meta: dict, events: Iterable[dict], out_path: str | os.PathLike, *,
                       compresslevel: int = 3, overwrite: bool = True) -> Path:
    """Serialize `{**meta, "traceEvents": events}` in moe-trace's layout (atomic replace).

    Small metadata values go through `json.dumps` (so `distributedInfo` reads `"rank": 0` with the
    space HTA's rank regex wants), large ones and the events through orjson, one event per line.
    """
    parts = [b"{\n"]
    for k, v in meta.items():
        if k == "traceEvents":
            continue
        parts.append(json.dumps(k).encode() + b": " + _dump_meta(v) + b",\n")
    parts.append(b'"traceEvents": [\n')
    try:
        body = dumps_events(events, _ORJSON_OPTS)
    except TypeError as exc:  # e.g. an object orjson cannot serialize in an event's args
        raise TraceError(f"an event of the trace cannot be written as JSON ({exc}); check the args "
                         "of your record_function ranges and counters") from None
    parts.append(body)
    parts.append(b"\n]\n}\n")
    return atomic_write(out_path, parts, compresslevel=compresslevel, overwrite=overwrite)


# -- helpers ---------------------------------------------------------------------------------------

def _load_raw(raw: dict | str | os.PathLike) -> dict:
    if isinstance(raw, dict):
        return raw
    path = Path(raw)
    if not path.is_file():
        raise TraceError(f"raw trace {path} does not exist; pass the file export_chrome_trace wrote or its dict")
    obj = load_json(path)
    if not isinstance(obj, dict):
        if isinstance(obj, list):
            return {"traceEvents": obj}
        raise TraceError(f"raw trace {path} is not a Chrome trace; pass the file export_chrome_trace wrote")
    return obj


def _scan(events: list[dict]) -> tuple[dict[tuple[str, int], Any], int | None]:
    """ts of each `moe_trace/{phase}#{step}` range (first one wins) and the host process pid."""
    step_ts: dict[tuple[str, int], Any] = {}
    host_pid = None
    fallback_pid = None
    for e in compress(events, map(is_not, map(type, events), repeat(GpuWork))):  # a GPU stub is none of these
        cat = e.get("cat")
        if cat == USER_ANNOTATION:
            name = e.get("name")
            if isinstance(name, str) and name.startswith(NAME_PREFIX):
                m = STEP_RE.match(name)
                if m:
                    key = (m.group(1), int(m.group(2)))
                    if key not in step_ts:
                        step_ts[key] = e.get("ts")
                    if host_pid is None and _is_int(e.get("pid")):
                        host_pid = e["pid"]
            if fallback_pid is None and _is_int(e.get("pid")):
                fallback_pid = e["pid"]
        elif cat == "cpu_op" and fallback_pid is None and _is_int(e.get("pid")):
            fallback_pid = e["pid"]
        elif e.get("ph") == "M" and e.get("name") == "process_labels" and fallback_pid is None:
            if (e.get("args") or {}).get("labels") == "CPU" and _is_int(e.get("pid")):
                fallback_pid = e["pid"]
    return step_ts, host_pid if host_pid is not None else fallback_pid


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def device_pid(device: str, host_pid: int) -> int:
    """The pid Kineto gives a device: the ordinal for an accelerator ("cuda:1" -> 1), else the host pid."""
    m = _DEVICE_RE.match(str(device).strip())
    if not m or m.group(1) in ("cpu", "meta", "disk"):
        return host_pid
    return int(m.group(2) or 0)


def _counter_events(run: RunData, steps: list[dict], step_ts: dict, host_pid: int) -> tuple[list[dict], set]:
    """The three counter events of each MoE layer at each recorded step's `ts`, and the GPU pids they use.
    Per-layer names and pids are worked out once and the args dicts built in C (`dict(zip(...))`): a
    Qwen3-30B-A3B-sized run has ~200 k expert args per 32 steps."""
    pos = {l.index: l for l in run.layers}
    per_layer: dict[int, tuple] = {}  # layer -> (pid, its three counter names)
    out: list[dict] = []
    gpu_pids: set = set()
    for s in steps:
        key = (s["phase"], int(s["step"]))
        ts = step_ts.get(key)
        if ts is None:
            continue  # the profiler did not record this step's range: nothing to anchor counters to
        for li, rec in sorted((s.get("layers") or {}).items(), key=lambda kv: int(kv[0])):
            li = int(li)
            got = per_layer.get(li)
            if got is None:
                layer = pos.get(li)
                pid = device_pid(layer.device if layer is not None else "cpu", host_pid)
                if pid != host_pid:
                    gpu_pids.add(pid)
                got = per_layer[li] = (pid, *(counter_name(li, m) for m in ("expert_tokens", "k_mean",
                                                                            "active_experts")))
            pid, tokens_name, k_name, active_name = got
            counts = np.asarray(rec.get("expert_counts", []), dtype=np.int64)
            kh = np.asarray(rec.get("k_hist", []), dtype=np.float64)
            n = kh.sum()
            k_mean = float((np.arange(len(kh)) * kh).sum() / n) if n > 0 else 0.0
            if not math.isfinite(k_mean):
                k_mean = 0.0
            out.append({"ph": "C", "cat": COUNTER_CAT, "name": tokens_name, "pid": pid, "ts": ts,
                        "args": dict(zip(_expert_keys(len(counts)), counts.tolist()))})
            out.append({"ph": "C", "cat": COUNTER_CAT, "name": k_name, "pid": pid, "ts": ts,
                        "args": {"k_mean": k_mean}})
            out.append({"ph": "C", "cat": COUNTER_CAT, "name": active_name, "pid": pid,
                        "ts": ts, "args": {"active_experts": int(np.count_nonzero(counts > 0))}})
    return out, gpu_pids


@functools.lru_cache(maxsize=8)
def _expert_keys(n: int) -> tuple[str, ...]:
    """`expert_key(e)` of experts 0 .. n-1."""
    return tuple(map(expert_key, range(n)))


def _kernels_under_moe_ranges(events: list) -> list:
    """Slim traces keep GPU work only inside MoE ranges (the GPU spans of the router / experts / shared
    ranges, `RANGE_RE`, on the same device and stream; not those of the step ranges, which cover the whole
    forward); a trace with no such spans (CPU-only, or compiled layers) keeps what it has. Overlapping
    spans count as their union. The test runs on arrays (a slim export's ~70 k kernels per 100 MB of raw
    trace), with `float` on each time as the dict path had."""
    from .export import _UNSET

    is_stub = list(map(is_, map(type, events), repeat(GpuWork)))  # the byte path's GpuWork stubs, in C
    spans: dict[tuple, list[tuple[float, float]]] = {}
    work, keys, ts, dur = [], [], [], []  # the object path's GPU work dicts
    for n in compress(range(len(events)), map(operator.not_, is_stub)):
        e = events[n]
        cat = e.get("cat")
        if cat in GPU_WORK_CATS:
            work.append(n)
            keys.append((e.get("pid"), e.get("tid")))
            ts.append(e["ts"])
            dur.append(e.get("dur", 0))
        elif cat == GPU_USER_ANNOTATION and RANGE_RE.match(str(e.get("name", ""))):
            t = float(e["ts"])
            spans.setdefault((e.get("pid"), e.get("tid")), []).append((t, t + float(e.get("dur", 0))))
    if not spans:
        return events
    stub_at = list(compress(range(len(events)), is_stub))
    stubs = list(compress(events, is_stub))
    work += stub_at
    keys += [(None if p is _UNSET else p, None if t is _UNSET else t) for p, t in map(attrgetter("pid", "tid"), stubs)]
    stub_ts = list(map(attrgetter("ts"), stubs))
    if any(map(is_, stub_ts, repeat(_UNSET))):  # a kernel without ts: what its ["ts"] raises
        raise KeyError("ts")
    ts += stub_ts
    dur += [0 if d is _UNSET else d for d in map(attrgetter("dur"), stubs)]
    ts_a = np.array(list(map(float, ts)), dtype=np.float64)
    end_a = ts_a + np.array(list(map(float, dur)), dtype=np.float64)
    keep = np.zeros(len(work), dtype=bool)
    code_of = {k: c for c, k in enumerate(dict.fromkeys(keys))}  # each (pid, tid) a number, in C
    codes = np.fromiter(map(code_of.__getitem__, keys), dtype=np.int64, count=len(keys))
    for key, iv in spans.items():
        if key not in code_of:
            continue
        at = np.flatnonzero(codes == code_of[key])
        iv.sort()
        merged: list[list[float]] = []
        for a, b in iv:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        starts = np.array([a for a, _ in merged])
        ends = np.array([b for _, b in merged])
        i = np.searchsorted(starts, ts_a[at], side="right") - 1
        keep[at] = (i >= 0) & (end_a[at] <= ends[np.maximum(i, 0)])
    mask = np.ones(len(events), dtype=bool)
    mask[np.asarray(work, dtype=np.int64)[~keep]] = False
    return list(compress(events, mask.tolist()))


def _process_info(process: dict | None, trace: dict, host_pid) -> dict:
    dist = trace.get("distributedInfo") if isinstance(trace.get("distributedInfo"), dict) else {}
    info = {"dist_rank": dist.get("rank"), "world_size": dist.get("world_size"),
            "hostname": trace.get("host_name") or socket.gethostname(), "pid": host_pid}
    if process:
        process = dict(process)
        if "rank" in process:  # no key named "rank" in the file: HTA greps for `"rank":`
            process.setdefault("dist_rank", process.pop("rank"))
        info.update(process)
    return info


def _dump_meta(v: Any) -> bytes:
    try:
        text = json.dumps(v, allow_nan=False)
        if len(text) < 4096:
            return text.encode()
    except (TypeError, ValueError):
        pass
    return orjson.dumps(v, option=_ORJSON_OPTS, default=str)
