"""Merge per-rank traces into one timeline for Perfetto.

Each file's timestamps are moved onto one absolute clock with its `baseTimeNanoseconds` (Kineto
writes `ts` relative to that base; the earliest base is subtracted again so the numbers stay small),
its pids become unique integers named `rank{r} host` / `rank{r} GPU {n}` with `process_name`
metadata events, and flow / async ids are made unique per file. The output holds `traceEvents`
only (the other top-level keys of the inputs differ per rank and Perfetto does not use them) plus a
`moe_trace` summary key (schema `moe-trace/merged/1`) before the events: per file its rank, base
time, offset and pid map, and for moe-trace files their RunData, so `moe_trace.analyze()` of the
merged file still gives the report.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import orjson

from moe_trace.checks import output_file
from moe_trace.errors import ConfigError, TraceError

from . import fastpath, ijson_path, merge_bytes
from .io import ParallelGzip, Source, Uncached, no_gc, os_problem
from .reader import read_metadata, trace_files

from .format import GPU_CATS as _GPU_CATS, HOST_CATS as _HOST_CATS, MERGED_PREFIX, MERGED_SCHEMA, META_KEY


_SUMMARY_SLACK = 64 << 10  # room for the pid maps (~60 bytes per pid) in front of the events

# which path re-mapped the regions of the last merge_traces call (tests check the byte path is used)
LAST_STATS: dict[str, int] = {}


def merge_traces(inputs: str | os.PathLike | Iterable[str | os.PathLike], out_path: str | os.PathLike, *,
                 byte_path: bool = True) -> Path:
    """Merge a directory of traces (recursively) or a list of trace files into `out_path`.
    `byte_path=False` re-maps every event through orjson dicts (the reference path; same events)."""
    out = output_file(out_path, "merge output")  # checked before any input is read
    if isinstance(inputs, (str, os.PathLike)):
        files = trace_files(inputs)
    elif isinstance(inputs, (bytes, dict)) or not hasattr(inputs, "__iter__"):
        raise ConfigError(f"merge_traces takes a directory or a list of trace files, got {type(inputs).__name__}")
    else:
        files = [Path(p) for p in inputs]
        if not files:
            raise TraceError("merge_traces got an empty list of files; pass a directory or trace files")
        for p in files:
            if not p.is_file():
                raise TraceError(f"trace file {p} does not exist; pass existing .pt.trace.json[.gz] files")
    if out.exists() and any(p.resolve() == out.resolve() for p in files):
        mt = read_metadata(out).get(META_KEY)
        if not (isinstance(mt, dict) and str(mt.get("schema", "")).startswith(MERGED_PREFIX)):
            raise ConfigError(f"merge output {out} is one of the input traces and would be overwritten; pass another "
                              "name (an earlier merged file may be replaced)")
    files = [p for p in files if p.resolve() != out.resolve()]  # an earlier merge output: not an input
    if not files:
        raise TraceError(f"nothing to merge: the only trace found is the output {out}")

    # pass 1: metadata only (ranks, base times)
    infos = []
    for order, p in enumerate(files):
        meta = read_metadata(p)
        mt = meta.get(META_KEY) if isinstance(meta.get(META_KEY), dict) else {}
        if str(mt.get("schema", "")).startswith(MERGED_PREFIX):
            warnings.warn(f"skipping {p}: it is already a merged trace", stacklevel=2)
            continue
        rank = (mt.get("process") or {}).get("dist_rank")
        if rank is None and isinstance(meta.get("distributedInfo"), dict):
            rank = meta["distributedInfo"].get("rank")
        base = meta.get("baseTimeNanoseconds")
        infos.append({"path": p, "meta": meta, "mt": mt, "order": order,
                      "rank": int(rank) if isinstance(rank, (int, float)) and not isinstance(rank, bool) else None,
                      "base": int(base) if isinstance(base, (int, float)) and not isinstance(base, bool) else None})
    if not infos:
        raise TraceError("nothing to merge: every input is itself a merged trace")
    for n, info in enumerate(infos):
        if info["rank"] is None:
            info["rank"] = n  # file order
    infos.sort(key=lambda i: (i["rank"], i["order"]))
    seen: dict[int, int] = {}
    for info in infos:
        k = seen.get(info["rank"], 0)
        seen[info["rank"]] = k + 1
        info["label"] = f"rank{info['rank']}" + (f".{k}" if k else "")
    bases = [i["base"] for i in infos if i["base"] is not None]
    min_base = min(bases) if bases else None
    missing = [str(i["path"]) for i in infos if i["base"] is None]
    if missing and len(infos) > 1:
        warnings.warn(f"{len(missing)} file(s) have no baseTimeNanoseconds (older PyTorch); their timestamps are "
                      f"used as they are, so ranks may not line up: {', '.join(missing[:3])}", stacklevel=2)

    # pass 2: events, one file at a time
    nfiles = len(infos)
    next_pid = [1]
    pid_names: dict[int, str] = {}
    files_summary = []
    parts = []
    run_ids: set = set()

    LAST_STATS.update(byte_regions=0, split_regions=0, event_regions=0, ijson_batches=0)

    def events_iter():
        parser = merge_bytes.Parser() if merge_bytes.AVAILABLE and byte_path else None
        for k, info in enumerate(infos):
            offset_ns = info["base"] - min_base if info["base"] is not None and min_base is not None else 0
            offset = offset_ns / 1000.0
            pids = _PidMap(info["label"], next_pid)

            def fast(region: bytes):
                """([bytes of the re-mapped events], count) for a region, or None: the per-event path."""
                got = merge_bytes.remap_region(region, parser, pids, offset_ns, k, nfiles)
                if got is not None:
                    LAST_STATS["byte_regions"] += 1
                    return [got[0]], got[1]
                cut = merge_bytes.metadata_cut(region)
                if cut is None:
                    return None
                try:  # Kineto's metadata events first: they take the per-event path, the rest the byte path
                    head = orjson.loads(b"[" + region[:cut[0]] + b"]")
                except orjson.JSONDecodeError:
                    return None
                parts = [_dump_lines(_remap_batch(head, pids, offset, k, nfiles))]
                got = merge_bytes.remap_region(region[cut[1]:], parser, pids, offset_ns, k, nfiles)
                if got is None:
                    try:
                        tail = orjson.loads(b"[" + region[cut[1]:] + b"]")
                    except orjson.JSONDecodeError:
                        raise fastpath.Fallback from None
                    LAST_STATS["event_regions"] += 1
                    return parts + [_dump_lines(_remap_batch(tail, pids, offset, k, nfiles))], len(head) + len(tail)
                LAST_STATS["split_regions"] += 1
                return [p for p in parts if p] + [got[0]], len(head) + got[1]

            for batch in _event_batches(info["path"], fast if parser is not None else None):
                yield batch if isinstance(batch, (bytes, memoryview)) else _remap_batch(batch, pids, offset, k, nfiles)
            names = pids.names()
            pid_names.update(names)
            files_summary.append({"path": str(info["path"]), "label": info["label"], "dist_rank": info["rank"],
                                  "base_time_ns": info["base"], "offset_us": offset,
                                  "pids": {str(o): n for o, n in pids.map.items()}})
            if isinstance(info["mt"].get("run"), dict):
                parts.append({"file": str(info["path"]), "label": info["label"], "dist_rank": info["rank"],
                              "run": info["mt"]["run"], "steps": info["mt"].get("steps", []),
                              "process": info["mt"].get("process", {}), "slim": info["mt"].get("slim"),
                              "pids": sorted(pids.map.values())})
                if isinstance(info["mt"].get("run_id"), str):
                    run_ids.add(info["mt"]["run_id"])
            # after the events: pids are numbered as they are first seen, names need all the events
            yield [ev for pid, name in names.items() for ev in (
                {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}},
                {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                 "args": {"sort_index": pids.sort_index[pid]}})]

    # the summary needs the pid maps pass 2 builds: room for it before the events (its RunData parts are
    # known now; the pid maps take a few dozen bytes per pid)
    reserve = len(orjson.dumps([i["mt"] for i in infos], option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
                               default=str)) + sum(len(str(i["path"])) for i in infos) * 2 + 400 * nfiles + _SUMMARY_SLACK
    with no_gc():
        return _write_merged(out, events_iter, lambda: {
            "schema": MERGED_SCHEMA, "base_time_ns": min_base, "files": files_summary, "parts": parts,
            **({"run_id": next(iter(run_ids))} if len(run_ids) == 1 else {}),
            "pid_names": {str(k): v for k, v in pid_names.items()}}, reserve)


def _write_merged(out: Path, events_iter, summary_fn, reserve: int = 0) -> Path:
    """The summary (built while the events are written) leads the file. Plain output: the events follow
    `reserve` bytes of spaces that the summary overwrites at the end (JSON allows whitespace there); gzip
    output, or a summary larger than `reserve`: the events go to a scratch file that is copied behind it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    scratch = out.with_name(out.name + f".events{os.getpid()}")
    dumps = orjson.dumps
    opts = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    gz = out.name.endswith(".gz")
    lead = b"{\n" + b" " * max(reserve, 0) + b'\n"traceEvents": [\n'
    try:
        with open(tmp if not gz else scratch, "wb") as fh:
            sink = Uncached(fh)
            try:
                if not gz:
                    sink.write(lead)
                first = True
                for batch in events_iter():
                    if not batch:
                        continue
                    sink.write(b"" if first else b",\n")
                    sink.write(batch if isinstance(batch, (bytes, memoryview)) else _dump_lines(batch))
                    first = False
            finally:
                sink.close()
            summary = b'"moe_trace": ' + dumps(summary_fn(), option=opts) + b","
            if not gz:
                fh.write(b"\n]\n}\n")
                if 0 < reserve and len(summary) <= reserve:
                    fh.seek(2)
                    fh.write(summary)
        if gz or len(summary) > reserve:
            if not gz:
                os.replace(tmp, scratch)
            with open(tmp, "wb") as fh:
                sink = ParallelGzip(fh, 3) if gz else fh
                try:
                    sink.write(b"{\n" + summary + b'\n"traceEvents": [\n')
                    with open(scratch, "rb") as src:
                        if not gz:
                            src.seek(len(lead))
                        while chunk := src.read(4 << 20):
                            sink.write(chunk)
                    if gz:
                        sink.write(b"\n]\n}\n")
                        sink.close()
                finally:
                    if sink is not fh:
                        sink.abort()
        os.replace(tmp, out)
    except OSError as exc:
        raise TraceError(f"cannot write the merged trace {out} ({exc.strerror or exc}); pass a writable path "
                         "with free space") from None
    finally:
        for p in (tmp, scratch):
            if p.exists():
                p.unlink()
    return out


def _event_batches(path: Path, fast=None):
    """The events of one input, a few MB of JSON at a time: per region of the fast path's splitter either
    `fast(region)`'s re-mapped bytes (when it returns (bytes, n)) or the parsed events (a list); ijson
    for other layouts."""
    try:
        src = Source(path, False)
        done = 0  # events already handed over when the fast path gives up: ijson skips them
        try:
            regions = fastpath.regions_of(src)
            next(regions)  # the metadata before the events array
            for region in regions:
                if isinstance(region, dict):  # the keys after the array
                    continue
                got = fast(region) if fast is not None else None
                if got is not None:
                    done += got[1]
                    yield from got[0]
                    continue
                try:
                    events = orjson.loads(b"[" + region + b"]")
                except orjson.JSONDecodeError:
                    raise fastpath.Fallback from None
                LAST_STATS["event_regions"] = LAST_STATS.get("event_regions", 0) + 1
                done += len(events)
                yield events
            return
        except fastpath.Fallback:
            pass
        finally:
            src.close()
        src = Source(path, False)
        try:
            for batch in ijson_path.event_batches(src):
                if done >= len(batch):
                    done -= len(batch)
                    continue
                LAST_STATS["ijson_batches"] = LAST_STATS.get("ijson_batches", 0) + 1
                yield batch[done:]
                done = 0
        finally:
            src.close()
    except OSError as exc:
        raise os_problem(path, exc) from None


class _PidMap:
    """Original pid -> new unique int (numbered as first seen), with the kind each pid shows."""

    _RANK = {"other": 0, "host": 1, "gpu": 2}
    _ORDER = {"host": 0, "gpu": 1, "other": 2}

    def __init__(self, label: str, next_pid: list[int]):
        self.label, self._next = label, next_pid
        self.map: dict = {}
        self.kinds: dict = {}
        self.gpu_label: dict = {}
        self.sort_index: dict[int, int] = {}

    def get(self, pid, default=None):
        new = self.map.get(pid)
        if new is None:
            new = self.map[pid] = self._next[0]
            self._next[0] += 1
        return new

    def _mark(self, pid, kind: str) -> None:
        if pid not in self.kinds or self._RANK[kind] > self._RANK[self.kinds[pid]]:
            self.kinds[pid] = kind

    def see(self, ev) -> None:
        if not isinstance(ev, dict) or "pid" not in ev:
            return
        pid = ev["pid"]
        try:
            hash(pid)
        except TypeError:
            return
        cat = ev.get("cat")
        if cat in _GPU_CATS:
            self._mark(pid, "gpu")
        elif cat in _HOST_CATS:
            self._mark(pid, "host")
        elif ev.get("ph") == "M" and ev.get("name") == "process_labels":
            labels = (ev.get("args") or {}).get("labels") if isinstance(ev.get("args"), dict) else None
            if isinstance(labels, str) and labels.startswith("GPU"):
                self._mark(pid, "gpu")
                self.gpu_label[pid] = labels
            elif labels == "CPU":
                self._mark(pid, "host")
            else:
                self._mark(pid, "other")
        else:
            self._mark(pid, "other")

    def names(self) -> dict[int, str]:
        out: dict[int, str] = {}
        order = sorted(self.map, key=lambda p: (self._ORDER[self.kinds.get(p, "other")], str(type(p)),
                                                p if isinstance(p, (int, float)) else str(p)))
        base = min(self.map.values(), default=0)
        for i, pid in enumerate(order):
            new = self.map[pid]
            self.sort_index[new] = base + i
            kind = self.kinds.get(pid, "other")
            if kind == "gpu":
                out[new] = f"{self.label} {self.gpu_label.get(pid) or f'GPU {pid}'}"
            elif kind == "host":
                out[new] = f"{self.label} host"
            else:
                out[new] = f"{self.label} {pid if pid != '' else 'trace'}"
        return out


def _dump_lines(batch: list) -> bytes:
    """`batch` as JSON events separated by `,\\n` (the layout the streaming reader's fast path reads).
    One orjson call for the batch; when `},{` occurs inside a value (not only between events) each
    event is dumped on its own instead."""
    blob = orjson.dumps(batch, option=orjson.OPT_SERIALIZE_NUMPY)
    if blob.count(b"},{") == len(batch) - 1:
        return blob[1:-1].replace(b"},{", b"},\n{")
    return b",\n".join([orjson.dumps(e, option=orjson.OPT_SERIALIZE_NUMPY) for e in batch])


_FLOW = frozenset(("s", "t", "f"))
_ASYNC = frozenset(("b", "e", "n"))
_OURS = frozenset(("process_name", "process_sort_index"))


def _remap_batch(batch: list, pids: "_PidMap", offset: float, k: int, nfiles: int) -> list:
    """Remap a batch of parsed events in place (pid, ts, flow and async ids); drops non-objects and the
    inputs' process_name / process_sort_index events (replaced by ours)."""
    out = []
    append = out.append
    kinds = pids.kinds
    pmap = pids.map
    see = pids.see
    new_pid = pids.get
    for ev in batch:
        if type(ev) is not dict:
            continue
        ph = ev.get("ph")
        if ph == "M" and ev.get("name") in _OURS:
            see(ev)
            continue
        pid = ev.get("pid", _NO)
        if pid is not _NO:
            try:
                kind = kinds.get(pid)
                if kind != "gpu":  # a pid's kind only goes up (other < host < gpu): look only while it can
                    cat = ev.get("cat")
                    if cat in _GPU_CATS:
                        kinds[pid] = "gpu"
                    elif kind is None or kind == "other" or (ph == "M" and ev.get("name") == "process_labels"):
                        see(ev)
                new = pmap.get(pid)
                ev["pid"] = new if new is not None else new_pid(pid)
            except TypeError:  # an unhashable pid stays as it is
                pass
        ts = ev.get("ts")
        if ts is not None:
            t = type(ts)
            if t is float or t is int:
                ev["ts"] = ts + offset if offset else float(ts)
            elif t is not bool:
                try:
                    ev["ts"] = float(ts) + offset
                except (TypeError, ValueError):
                    pass
        if ph in _FLOW:
            for key in ("id", "bind_id"):
                if key in ev:
                    ev[key] = _uniq_flow_id(ev[key], k, nfiles)
        elif ph in _ASYNC:
            if "id" in ev:
                ev["id"] = _uniq_id(ev["id"], k, nfiles)
            if isinstance(ev.get("id2"), dict):
                ev["id2"] = {kk: _uniq_id(v, k, nfiles) for kk, v in ev["id2"].items()}
        elif "bind_id" in ev:
            ev["bind_id"] = _uniq_flow_id(ev["bind_id"], k, nfiles)
        append(ev)
    return out


_NO = object()


def _uniq_flow_id(x: Any, k: int, n: int) -> Any:
    if isinstance(x, str):  # Perfetto reads string flow ids as hex
        try:
            x = int(x, 16)
        except ValueError:
            return f"{k:x}{x}"
    if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        return x * n + k
    return x


def _uniq_id(x: Any, k: int, n: int) -> Any:
    if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        return x * n + k
    if isinstance(x, str):
        return f"r{k}:{x}"
    return x
