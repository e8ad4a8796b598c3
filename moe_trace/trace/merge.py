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

import gzip
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import orjson

from moe_trace.checks import output_file
from moe_trace.errors import TraceError

from .reader import read_metadata, trace_files
from .io import no_gc

from .format import GPU_CATS as _GPU_CATS, HOST_CATS as _HOST_CATS, MERGED_PREFIX, MERGED_SCHEMA, META_KEY


def merge_traces(inputs: str | os.PathLike | Iterable[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """Merge a directory of traces (recursively) or a list of trace files into `out_path`."""
    out = output_file(out_path, "merge output")  # checked before any input is read
    if isinstance(inputs, (str, os.PathLike)):
        files = trace_files(inputs)
    else:
        files = [Path(p) for p in inputs]
        if not files:
            raise TraceError("merge_traces got an empty list of files; pass a directory or trace files")
        for p in files:
            if not p.is_file():
                raise TraceError(f"trace file {p} does not exist; pass existing .pt.trace.json[.gz] files")
    files = [p for p in files if p.resolve() != out.resolve()]
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

    def events_iter():
        for k, info in enumerate(infos):
            offset = (info["base"] - min_base) / 1000.0 if info["base"] is not None and min_base is not None else 0.0
            events = _load_events(info["path"])
            pmap, names = _pid_map(events, info["label"], next_pid)
            pid_names.update(names)
            files_summary.append({"path": str(info["path"]), "label": info["label"], "dist_rank": info["rank"],
                                  "base_time_ns": info["base"], "offset_us": offset,
                                  "pids": {str(o): n for o, n in pmap.items()}})
            if isinstance(info["mt"].get("run"), dict):
                parts.append({"file": str(info["path"]), "label": info["label"], "dist_rank": info["rank"],
                              "run": info["mt"]["run"], "steps": info["mt"].get("steps", []),
                              "process": info["mt"].get("process", {}), "slim": info["mt"].get("slim"),
                              "pids": sorted(pmap.values())})
            for pid, name in names.items():
                yield {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}
                yield {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
            for ev in events:
                out = _remap(ev, pmap, offset, k, nfiles)
                if out is not None:
                    yield out
            del events

    # the summary needs the pid maps pass 2 builds: events go to a scratch file first
    with no_gc():
        return _write_merged(out, events_iter, lambda: {
            "schema": MERGED_SCHEMA, "base_time_ns": min_base, "files": files_summary, "parts": parts,
            "pid_names": {str(k): v for k, v in pid_names.items()}})


def _write_merged(out: Path, events_iter, summary_fn) -> Path:
    """Events go to a scratch file first, so the summary (built while they are written) can lead the file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    scratch = out.with_name(out.name + f".events{os.getpid()}")
    dumps = orjson.dumps
    opts = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    try:
        with open(scratch, "wb") as fh:
            first = True
            batch: list[bytes] = []
            for ev in events_iter():
                batch.append(dumps(ev, option=opts))
                if len(batch) >= 65536:
                    fh.write((b"" if first else b",\n") + b",\n".join(batch))
                    first = False
                    batch.clear()
            if batch:
                fh.write((b"" if first else b",\n") + b",\n".join(batch))
        head = b'{\n"moe_trace": ' + dumps(summary_fn(), option=opts) + b',\n"traceEvents": [\n'
        with open(tmp, "wb") as fh:
            sink = gzip.GzipFile(filename="", mode="wb", fileobj=fh, compresslevel=3, mtime=0) \
                if out.name.endswith(".gz") else fh
            try:
                sink.write(head)
                with open(scratch, "rb") as src:
                    while chunk := src.read(4 << 20):
                        sink.write(chunk)
                sink.write(b"\n]\n}\n")
            finally:
                if sink is not fh:
                    sink.close()
        os.replace(tmp, out)
    except OSError as exc:
        raise TraceError(f"cannot write the merged trace {out} ({exc.strerror or exc}); pass a writable path "
                         "with free space") from None
    finally:
        for p in (tmp, scratch):
            if p.exists():
                p.unlink()
    return out


def _load_events(path: Path) -> list:
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with no_gc():
            obj = orjson.loads(data)
    except EOFError:
        raise TraceError(f"{path} is a truncated gzip file; re-run the profiling or leave it out of the merge") from None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise TraceError(f"{path} cannot be read as a JSON trace ({exc}); leave it out of the merge") from None
    events = obj.get("traceEvents") if isinstance(obj, dict) else obj if isinstance(obj, list) else None
    if not isinstance(events, list):
        raise TraceError(f"{path} is not a Chrome trace (no traceEvents array); leave it out of the merge")
    return events


def _pid_map(events: list, label: str, next_pid: list[int]) -> tuple[dict, dict[int, str]]:
    """Original pid -> new unique int, and the new pids' names."""
    kinds: dict[Any, str] = {}
    gpu_label: dict[Any, str] = {}
    rank = {"other": 0, "host": 1, "gpu": 2}

    def mark(pid, kind: str) -> None:
        if rank[kind] > rank[kinds.get(pid, "other")] or pid not in kinds:
            kinds[pid] = kind

    for ev in events:
        if not isinstance(ev, dict) or "pid" not in ev:
            continue
        pid = ev["pid"]
        try:
            hash(pid)
        except TypeError:
            continue
        cat = ev.get("cat")
        if cat in _GPU_CATS:
            mark(pid, "gpu")
        elif cat in _HOST_CATS:
            mark(pid, "host")
        elif ev.get("ph") == "M" and ev.get("name") == "process_labels":
            labels = (ev.get("args") or {}).get("labels")
            if isinstance(labels, str) and labels.startswith("GPU"):
                mark(pid, "gpu")
                gpu_label[pid] = labels
            elif labels == "CPU":
                mark(pid, "host")
            else:
                mark(pid, "other")
        else:
            mark(pid, "other")
    order = {"host": 0, "gpu": 1, "other": 2}
    pmap: dict = {}
    names: dict[int, str] = {}
    for pid in sorted(kinds, key=lambda p: (order[kinds[p]], str(type(p)), p if isinstance(p, (int, float)) else str(p))):
        new = next_pid[0]
        next_pid[0] += 1
        pmap[pid] = new
        kind = kinds[pid]
        if kind == "gpu":
            names[new] = f"{label} {gpu_label.get(pid) or f'GPU {pid}'}"
        elif kind == "host":
            names[new] = f"{label} host"
        else:
            names[new] = f"{label} {pid if pid != '' else 'trace'}"
    return pmap, names


def _remap(ev: Any, pmap: dict, offset: float, k: int, nfiles: int) -> dict | None:
    if not isinstance(ev, dict):
        return None
    ph = ev.get("ph")
    if ph == "M" and ev.get("name") in ("process_name", "process_sort_index"):
        return None  # replaced by ours
    out = dict(ev)
    if "pid" in out:
        try:
            out["pid"] = pmap.get(out["pid"], out["pid"])
        except TypeError:
            pass
    ts = out.get("ts")
    if ts is not None and not isinstance(ts, bool):
        try:
            out["ts"] = float(ts) + offset
        except (TypeError, ValueError):
            pass
    if ph in ("s", "t", "f"):
        for key in ("id", "bind_id"):
            if key in out:
                out[key] = _uniq_flow_id(out[key], k, nfiles)
    elif ph in ("b", "e", "n"):
        if "id" in out:
            out["id"] = _uniq_id(out["id"], k, nfiles)
        if isinstance(out.get("id2"), dict):
            out["id2"] = {kk: _uniq_id(v, k, nfiles) for kk, v in out["id2"].items()}
    elif "bind_id" in out:
        out["bind_id"] = _uniq_flow_id(out["bind_id"], k, nfiles)
    return out


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
