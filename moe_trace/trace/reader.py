"""Streaming reader of Kineto / moe-trace Chrome traces (`.json` or `.json.gz`).

Never loads a whole file: the bytes are read in 4 MiB chunks (gzip is inflated in a helper thread),
and memory stays flat whatever the file size. Two parsers:

* **fast path** (used whenever the file is laid out like Kineto, torch.profiler or moe-trace write
  it, i.e. with a newline between events): each chunk is cut at the last `},\\n{` event boundary
  (a newline can never sit inside a JSON string, so such a boundary is always structural), one
  regular expression finds the `"cat": "<category>"` keys of the few categories analysis needs
  (kernels, memcpy/memset, user and GPU annotations, moe-trace counters; ~15% of the events of a
  full trace), and the fields that follow are read with an anchored expression; only events of an
  unusual key order and the counters are sliced out and parsed with orjson. cpu_op, cuda_runtime,
  python_function and flow events are never parsed.
* **ijson fallback** (C backend `yajl2_c`): any layout the fast path does not recognise, and every
  malformed file (so errors come from a real JSON parser) is streamed with
  `ijson.items(f, "traceEvents.item")`.

Public: `read_trace(path) -> TraceData`, `read_traces(path) -> list[TraceData]`,
`analyze(path) -> Report`. Numbers and design notes: docs/analyze.md.
"""
from __future__ import annotations

import gzip
import json
import os
import queue
import re
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson

from moe_trace.analysis import PARTS, PHASES, Report, RunData
from moe_trace.errors import TraceError

CHUNK = 4 << 20
PROGRESS_BYTES = 50 * 1000 * 1000
MAX_HEADER = 64 << 20
MAX_PIECE = 16 << 20
TRACE_GLOBS = ("*.pt.trace.json", "*.pt.trace.json.gz")

_RANGE_RE = re.compile(r"^moe_trace/(prefill|decode)/L(\d+)/(router|experts|shared)$")
_STEP_RE = re.compile(r"^moe_trace/(prefill|decode)#(\d+)$")
_PSTEP_RE = re.compile(r"^ProfilerStep#(\d+)$")
_COUNTER_RE = re.compile(r"^moe_trace/L(\d+) (expert_tokens|k_mean|active_experts)$")

_HIT = re.compile(rb'"cat"\s*:\s*"(kernel|gpu_user_annotation|user_annotation|gpu_memcpy|gpu_memset|moe_trace)"')
_SEP = re.compile(rb"\}[ \t\r]*,[ \t\r]*\n[ \t\r\n]*\{")
_STR = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_VAL = rb'(?:-?[0-9][0-9.eE+\-]*|"[^"\\]*")'
_FIELDS = re.compile(rb'\s*,\s*"name"\s*:\s*(' + _STR + rb')\s*,\s*"pid"\s*:\s*(' + _VAL + rb'|' + _STR + rb')'
                     rb'\s*,\s*"tid"\s*:\s*(?:' + _VAL + rb'|' + _STR + rb')\s*,\s*"ts"\s*:\s*(' + _VAL + rb')'
                     rb'\s*,\s*"dur"\s*:\s*(' + _VAL + rb')')
_EXTID = re.compile(rb'\s*,\s*"args"\s*:\s*\{\s*"External id"\s*:\s*(-?[0-9]+)')
# one scan finds a hit and, in the usual key order, its fields and the GPU annotation's External id
_SCAN = re.compile(_HIT.pattern + rb"(?:" + _FIELDS.pattern + rb"(?:" + _EXTID.pattern + rb")?)?")
_TE_KEY = re.compile(rb'"traceEvents"\s*:\s*\[')
_DEVICE_CATS = {"kernel": 0, "gpu_memcpy": 1, "gpu_memset": 2}
_DEVICE_CATS_B = {k.encode(): v for k, v in _DEVICE_CATS.items()}


# -- results ---------------------------------------------------------------------------------------

@dataclass
class PlainTraceSummary:
    """What any Kineto trace tells without moe-trace metadata: GPU activity per device, steps, ranges."""

    path: str
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    profiler_steps: int = 0
    profiler_step_ms: float | None = None
    user_annotations: int = 0
    range_ms: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rank": self.rank, "devices": self.devices, "profiler_steps": self.profiler_steps,
                "profiler_step_ms": self.profiler_step_ms, "user_annotations": self.user_annotations,
                "range_ms": self.range_ms}

    def __str__(self) -> str:
        lines = [f"trace summary: {self.path}" + (f" (rank {self.rank})" if self.rank is not None else "")]
        step = f", mean {self.profiler_step_ms:.3f} ms (host)" if self.profiler_step_ms is not None else ""
        lines.append(f"  profiler steps {self.profiler_steps}{step}; user annotations {self.user_annotations}")
        if self.devices:
            lines.append(f"  {'device':<16} {'kernels':>8} {'kernel ms':>11} {'memcpy ms':>10} {'memset ms':>10} "
                         f"{'span ms':>10} {'busy':>6}")
            for name, d in self.devices.items():
                busy = f"{100 * d['kernel_ms'] / d['span_ms']:.1f}%" if d["span_ms"] else "-"
                lines.append(f"  {name:<16} {d['kernels']:>8} {d['kernel_ms']:>11.3f} {d['memcpy_ms']:>10.3f} "
                             f"{d['memset_ms']:>10.3f} {d['span_ms']:>10.3f} {busy:>6}")
        else:
            lines.append("  no GPU activity (a CPU-only trace)")
        if self.range_ms:
            lines.append(f"  moe_trace ranges: {len(self.range_ms)} (phase/layer/part), e.g.")
            for key in list(self.range_ms)[:6]:
                r = self.range_ms[key]
                t = " ".join(f"{k} {r[k]:.3f}" for k in ("gpu_ms", "cpu_ms") if r.get(k) is not None)
                lines.append(f"    {key:<24} x{r['count']:<5} {t}")
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class TraceData:
    """One trace file, read. `runs` holds one RunData per process (several for a merged trace)."""

    path: Path
    metadata: dict[str, Any]
    runs: list[RunData]
    steps: list[dict[str, Any]]
    counters: dict[int, dict[int, dict[str, Any]]]
    part_counters: list[dict[int, dict[int, dict[str, Any]]]]
    range_ms: dict[str, dict[str, Any]]
    summary: PlainTraceSummary
    timing_source: str | None
    parser: str
    bytes: int
    seconds: float
    event_count: int

    @property
    def is_moe(self) -> bool:
        return bool(self.runs)

    @property
    def run(self) -> RunData | None:
        if not self.runs:
            return None
        return self.runs[0] if len(self.runs) == 1 else Report(self.runs).run

    @property
    def process(self) -> dict[str, Any]:
        mt = self.metadata.get("moe_trace")
        return dict(mt.get("process") or {}) if isinstance(mt, dict) else {}

    @property
    def rank(self) -> int | None:
        r = self.process.get("dist_rank")
        if r is None and isinstance(self.metadata.get("distributedInfo"), dict):
            r = self.metadata["distributedInfo"].get("rank")
        return int(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else None

    @property
    def merged(self) -> bool:
        mt = self.metadata.get("moe_trace")
        return isinstance(mt, dict) and str(mt.get("schema", "")).startswith("moe-trace/merged")

    def report(self) -> Report:
        if not self.runs:
            raise TraceError(_no_meta_msg(self.path))
        return Report(self.runs)


# -- public API ------------------------------------------------------------------------------------

def read_trace(path: str | os.PathLike, *, progress: bool | None = None) -> TraceData:
    """Stream one trace file. `progress`: tqdm bar on stderr (default: files over 50 MB)."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace file {path} does not exist; pass a .pt.trace.json[.gz] file or the logdir "
                         "that moe_trace.profile(mode='kineto') wrote")
    if path.is_dir():
        raise TraceError(f"{path} is a directory; read_trace takes one file (use analyze() or read_traces() "
                         "for a directory)")
    t0 = time.perf_counter()
    agg = _Agg()
    src = None
    try:
        src = _Source(path, progress)
        try:
            meta = _parse_fast(src, agg)
            parser = "fast"
        except _Fallback:
            agg = _Agg()
            src.close()
            src = _Source(path, progress)
            meta = _parse_ijson(src, agg)
            parser = "ijson"
    except OSError as exc:  # permissions, I/O errors, a vanished file
        raise TraceError(f"{path} cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    finally:
        if src is not None:
            src.close()
    return _build(path, meta, agg, parser, src.bytes_out, time.perf_counter() - t0)


def read_traces(path: str | os.PathLike, *, progress: bool | None = None) -> list[TraceData]:
    """A trace file, or every `*.pt.trace.json[.gz]` under a directory (recursively), read."""
    return [read_trace(p, progress=progress) for p in trace_files(path)]


def trace_files(path: str | os.PathLike) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path} does not exist; pass a .pt.trace.json[.gz] file or the logdir that "
                         "moe_trace.profile(mode='kineto') wrote")
    if path.is_file():
        return [path]
    files = sorted({p for g in TRACE_GLOBS for p in path.rglob(g) if p.is_file()})
    if not files:
        raise TraceError(f"no *.pt.trace.json or *.pt.trace.json.gz files under {path}; point to the logdir "
                         "of moe_trace.profile(mode='kineto', logdir=...) or to one trace file")
    return files


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level keys before `traceEvents` (Kineto and moe-trace put their metadata there), cheaply."""
    try:
        src = _Source(Path(path), False)
    except OSError as exc:
        raise TraceError(f"{path} cannot be read ({exc.strerror or exc}); check the path") from None
    it = src.chunks()
    buf = b""
    try:
        for data in it:
            buf += data
            if _TE_KEY.search(buf):
                return _head_meta(buf)
            if len(buf) > MAX_HEADER:
                break
        return {}
    finally:
        it.close()
        src.close()


def analyze(path: str | os.PathLike, *, progress: bool | None = None, ep_size: int | None = None) -> Report:
    """Report of a trace file or of a directory of them (one RunData per process, ordered by rank).
    `ep_size`: also report the load per expert-parallel rank for that many ranks (see Report)."""
    return report_of(read_traces(path, progress=progress), path, ep_size=ep_size)


def report_of(datas: list[TraceData], path: str | os.PathLike = "", ep_size: int | None = None) -> Report:
    """Combine read traces into one Report: per-process files by rank; merged files only if alone."""
    moe = [d for d in datas if d.is_moe]
    if not moe:
        if len(datas) == 1:
            raise TraceError(_no_meta_msg(datas[0].path))
        raise TraceError(f"none of the {len(datas)} trace files under {path} has moe-trace metadata (no top-level "
                         "'moe_trace' key); record them with moe_trace.profile(mode='kineto')")
    skipped = [d for d in datas if not d.is_moe]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} trace file(s) without moe-trace metadata: "
                      + ", ".join(str(d.path) for d in skipped[:3]), stacklevel=2)
    single = [d for d in moe if not d.merged]
    if single and len(single) < len(moe):
        warnings.warn("skipped merged trace file(s) next to per-process ones (they hold the same counts)", stacklevel=2)
        moe = single
    # A process writes one file per profiler window (schedule with repeat); every file holds the run's
    # totals so far and the ranges of its own window: counts from the latest, timing summed.
    groups: dict[tuple, list[TraceData]] = {}
    for d in moe:
        p = d.process
        key = (p.get("hostname"), p.get("pid"), p.get("dist_rank"), p.get("run_id"),
               str(d.path) if d.merged or not p else "")
        groups.setdefault(key, []).append(d)
    chosen: list[tuple[TraceData, list[RunData]]] = []
    for group in groups.values():
        latest = max(group, key=_calls)
        runs = latest.runs
        if len(group) > 1:
            if group[0].process.get("run_id") is None:
                warnings.warn(f"{len(group)} trace files come from one process ({', '.join(str(d.path) for d in group[:3])}); "
                              f"counts are taken from {latest.path}, range times are summed", stacklevel=2)
            runs = [_with_summed_timing(latest.runs[0], [d.runs[0] for d in group])]
        chosen.append((latest, runs))
    chosen.sort(key=lambda dr: (dr[0].rank if dr[0].rank is not None else 1 << 30, str(dr[0].path)))
    parts = [r for _, runs in chosen for r in runs]
    ranks = [d.rank for d, runs in chosen for _ in runs]  # per-device rows carry the process's real rank
    return Report(parts, ranks=ranks, ep_size=ep_size)


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
                   settings=base.settings)


def _add(*vals):
    vals = [v for v in vals if v is not None]
    return float(sum(vals)) if vals else None


def _calls(d: TraceData) -> int:
    return sum(sum(r.forward_calls.values()) for r in d.runs)


def _no_meta_msg(path) -> str:
    return (f"{path} is a plain torch.profiler trace without moe-trace metadata (no top-level 'moe_trace' key); "
            "record it with moe_trace.profile(mode='kineto') to get MoE counts (read_trace() still gives its "
            "kernel summary)")


# -- byte source -----------------------------------------------------------------------------------

class _Fallback(Exception):
    """The fast path does not recognise this layout: re-read with ijson."""


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


class _Source:
    """Decompressed chunks of a file, with progress and one-sentence errors."""

    def __init__(self, path: Path, progress: bool | None):
        self.path = path
        self.size = path.stat().st_size
        self.gz = self.size >= 2 and _is_gzip(path)
        self.bytes_out = 0
        self._bar = None
        if progress is None:
            progress = self._estimate() > PROGRESS_BYTES
        if progress:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                 leave=False, dynamic_ncols=True)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self._bar = None
        self._pos = 0

    def _estimate(self) -> int:
        if not self.gz or self.size < 18:
            return self.size
        with open(self.path, "rb") as fh:  # gzip ISIZE: uncompressed size mod 2**32
            fh.seek(-4, 2)
            isize = int.from_bytes(fh.read(4), "little")
        return max(isize, self.size)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _advance(self, pos: int) -> None:
        if self._bar is not None and pos > self._pos:
            self._bar.update(pos - self._pos)
        self._pos = pos

    def chunks(self) -> Iterator[bytes]:
        if self.size == 0:
            raise TraceError(f"{self.path} is empty (0 bytes); the profiler did not write it completely — re-run "
                             "the profiling")
        gen = self._gz_chunks() if self.gz else self._plain_chunks()
        for data, pos in gen:
            self.bytes_out += len(data)
            self._advance(pos)
            yield data

    def _plain_chunks(self):
        with open(self.path, "rb") as fh:
            while True:
                data = fh.read(CHUNK)
                if not data:
                    return
                yield data, fh.tell()

    def _gz_chunks(self):
        q: queue.Queue = queue.Queue(maxsize=3)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                with open(self.path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    while not stop.is_set():
                        data = gz.read(CHUNK)
                        if not data:
                            break
                        if not put(("data", (data, raw.tell()))):
                            return
                put(("end", None))
            except BaseException as exc:  # handed to the consumer
                put(("error", exc))

        t = threading.Thread(target=work, name="moe-trace-gunzip", daemon=True)
        t.start()
        try:
            while True:
                kind, val = q.get()
                if kind == "data":
                    yield val
                elif kind == "end":
                    return
                else:
                    raise self._gz_error(val)
        finally:
            stop.set()

    def _gz_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, EOFError):
            return TraceError(f"{self.path} is a truncated gzip file (the stream ends early, so the writer was "
                              "probably killed); re-run the profiling to get a complete trace")
        if isinstance(exc, (gzip.BadGzipFile, zlib.error, OSError)):
            return TraceError(f"{self.path} is a corrupt gzip file ({exc}); re-run the profiling or pass the "
                              "uncompressed .json")
        return exc


# -- fast path -------------------------------------------------------------------------------------

def _parse_fast(src: _Source, agg: "_Agg") -> dict:
    it = src.chunks()
    buf = b""
    eof = False

    def more() -> bool:
        nonlocal buf, eof
        for data in it:
            buf += data
            return True
        eof = True
        return False

    while not eof and not buf.strip():
        more()
    head = buf.lstrip()[:1]
    if head == b"[":
        bare = True
        meta: dict = {}
        buf = buf[buf.find(b"[") + 1:]
    elif head == b"{":
        bare = False
        searched = 0
        while True:
            m = _TE_KEY.search(buf, max(0, searched - 64))
            if m:
                break
            if eof or len(buf) > MAX_HEADER:
                raise _Fallback
            searched = len(buf)
            more()
        try:
            meta = orjson.loads(buf[:m.start()] + b'"traceEvents":[]}')
        except orjson.JSONDecodeError:
            raise _Fallback from None
        if not isinstance(meta, dict):
            raise _Fallback
        meta.pop("traceEvents", None)
        buf = buf[m.end():]
    else:
        raise _Fallback  # empty or not JSON: let ijson produce the precise error
    agg.set_metadata(meta)
    buf = buf.lstrip()
    while True:
        if not eof:
            more()
        if eof:
            region, tail = _split_tail(buf, bare)
            if region:
                _process_piece(region, agg)
            meta.update(tail)
            return meta
        cut = _last_sep(buf)
        if cut is None:
            if len(buf) > MAX_PIECE:
                raise _Fallback  # no newline between events (compact JSON): ijson
            continue
        _process_piece(buf[:cut[0]], agg)
        buf = buf[cut[1]:]


def _last_sep(buf: bytes) -> tuple[int, int] | None:
    n = len(buf)
    w = 1 << 16
    while True:
        start = max(0, n - w)
        last = None
        for last in _SEP.finditer(buf, start):
            pass
        if last is not None:
            return last.start() + 1, last.end() - 1
        if start == 0:
            return None
        w *= 4


_ARR_END = re.compile(rb"\}\s*(\])\s*[,}]")


def _split_tail(buf: bytes, bare: bool) -> tuple[bytes, dict]:
    """Split the last bytes into (events region, top-level keys after the traceEvents array)."""
    if bare:
        p = buf.rfind(b"]")
        region = buf[:p].rstrip() if p >= 0 and not buf[p + 1:].strip() else None
        if region is None or (region and not region.endswith(b"}")):
            raise _Fallback
        return region, {}
    p = buf.rfind(b"]")
    if p >= 0:  # usual case: a short tail like `], "traceName": "..."}`
        got = _try_tail(buf, p)
        if got is not None:
            return got
    for n, m in enumerate(_ARR_END.finditer(buf)):  # a long tail with arrays of its own (merged traces)
        if n >= 256:
            break
        got = _try_tail(buf, m.start(1))
        if got is not None:
            return got
    raise _Fallback  # truncated or malformed: ijson says exactly what is wrong


def _try_tail(buf: bytes, p: int) -> tuple[bytes, dict] | None:
    tail = buf[p + 1:]
    if tail.lstrip()[:1] not in (b"}", b","):
        return None
    try:
        obj = orjson.loads(b'{"traceEvents":0' + tail)
    except orjson.JSONDecodeError:
        return None
    region = buf[:p].rstrip()
    if not isinstance(obj, dict) or (region and not region.endswith(b"}")):
        return None
    obj.pop("traceEvents", None)
    return region, obj


def _str(raw: bytes) -> str:
    if b"\\" in raw:
        return json.loads(raw)
    return raw[1:-1].decode("utf-8", "replace")


def _num(raw: bytes) -> float:
    if raw[:1] == b'"':
        raw = raw[1:-1]
    return float(raw)


def _pidval(raw: bytes):
    if raw[0] == 34:
        return _pidkey(_str(raw))
    try:
        return int(raw)
    except ValueError:
        f = float(raw)
        return int(f) if f.is_integer() else f


def _process_piece(piece: bytes, agg: "_Agg") -> None:
    """Aggregate the interesting events of `piece` (whole events, starting at `{`)."""
    last_end = -1  # end of the last event parsed with orjson
    last_hit = -1  # position of the last counted hit
    dev_cats = _DEVICE_CATS_B
    devices = agg.devices
    annotation = agg.annotation
    n = 0
    for m in _SCAN.finditer(piece):
        p = m.start()
        if p < last_end:
            continue
        cat, raw, pid, ts, dur, ext = m.groups()
        if dur is not None and cat != b"moe_trace":
            try:
                ts = float(ts) if ts[0] != 34 else float(ts[1:-1])  # 34 = '"'
                dur = float(dur) if dur[0] != 34 else float(dur[1:-1])
                pid = int(pid) if pid[0] != 34 and pid.isdigit() else _pidval(pid)
            except ValueError:
                raise _Fallback from None
            code = dev_cats.get(cat)
            if code is not None:  # _Agg.device_activity inlined: this loop runs once per kernel event
                d = devices.get(pid)
                if d is None:
                    d = devices[pid] = [0, 0.0, 0, 0.0, 0, 0.0, ts, ts + dur]
                d[2 * code] += 1
                d[2 * code + 1] += dur
                if ts < d[6]:
                    d[6] = ts
                if ts + dur > d[7]:
                    d[7] = ts + dur
            elif cat == b"gpu_user_annotation":
                annotation(True, raw, pid, ts, dur, int(ext) if ext is not None else None)
            else:
                annotation(False, raw, pid, ts, dur, None)
            n += 1
            last_hit = p
            continue
        s, e = _bounds(piece, p)
        try:  # parses only if [s, e) is exactly one event, so the bounds are verified
            ev = orjson.loads(piece[s:e])
        except orjson.JSONDecodeError:
            raise _Fallback from None
        if s <= last_hit:
            continue  # a second hit inside an event already counted
        if isinstance(ev, dict):
            agg.add_event(ev)
        last_end, last_hit = e, p
    agg.events += n


def _bounds(piece: bytes, p: int) -> tuple[int, int]:
    k = p
    s = 0
    for _ in range(4096):
        k = piece.rfind(b"},", 0, k)
        if k < 0:
            s = 0
            break
        sm = _SEP.match(piece, k)
        if sm:
            s = sm.end() - 1
            break
    else:
        raise _Fallback
    me = _SEP.search(piece, p)
    return s, (me.start() + 1 if me else len(piece))


# -- ijson fallback --------------------------------------------------------------------------------

_IJSON = None


def _ijson():
    global _IJSON
    if _IJSON is None:
        import ijson

        try:
            _IJSON = ijson.get_backend("yajl2_c")
        except Exception:  # noqa: BLE001 - any import problem of the C extension
            warnings.warn("ijson's C backend (yajl2_c) is not available; reading traces with the pure-Python "
                          "backend is ~20x slower (pip install --force-reinstall ijson)", stacklevel=3)
            _IJSON = ijson
    return _IJSON


class _Stream:
    """File-like view of the chunks for ijson; keeps the head (up to traceEvents) and the last chunks."""

    HEAD = 64 << 20

    def __init__(self, src: _Source):
        self._it = src.chunks()
        self._buf = b""
        self._off = 0
        self.head = bytearray()
        self._head_done = False
        self._prev = b""

    def _fill(self) -> bool:
        data = next(self._it, None)
        if data is None:
            return False
        if not self._head_done:
            self.head += data[: self.HEAD - len(self.head)]
            self._head_done = len(self.head) >= self.HEAD or _TE_KEY.search(self.head) is not None
        self._prev = self._buf
        self._buf, self._off = data, 0
        return True

    @property
    def tail(self) -> bytes:
        return self._prev + self._buf

    def peek(self) -> bytes:
        while self._off >= len(self._buf):
            if not self._fill():
                return b""
        return self._buf[self._off:self._off + 4096]

    def read(self, n: int = -1) -> bytes:
        while self._off >= len(self._buf):
            if not self._fill():
                return b""
        end = len(self._buf) if n is None or n < 0 else self._off + n
        out = self._buf[self._off:end]
        self._off += len(out)
        return out


def _parse_ijson(src: _Source, agg: "_Agg") -> dict:
    ij = _ijson()
    stream = _Stream(src)
    lead = stream.peek().lstrip()[:1]
    prefix = "item" if lead == b"[" else "traceEvents.item"
    n = 0
    try:
        for ev in ij.items(stream, prefix, use_float=True, buf_size=1 << 18):
            if n == 0 and prefix == "traceEvents.item":
                agg.set_metadata(_head_meta(bytes(stream.head)))
            n += 1
            if isinstance(ev, dict):
                agg.add_event(ev)
            agg.events += 1
    except ij.common.JSONError as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "premature EOF" in msg or "Incomplete" in msg:
            raise TraceError(f"{src.path} ends in the middle of the JSON (truncated, the writer was probably "
                             "killed); re-run the profiling to get a complete trace") from None
        raise TraceError(f"{src.path} is not valid JSON ({msg}); pass a Chrome trace written by torch.profiler "
                         "or moe-trace") from None
    if prefix == "item":
        return {}
    meta = _head_meta(bytes(stream.head))
    if n == 0 and not _has_trace_events(src.path, meta):
        raise TraceError(f"{src.path} is JSON but not a Chrome trace (no traceEvents array); pass a trace written "
                         "by torch.profiler's export_chrome_trace or by moe-trace")
    try:
        _, tail = _split_tail(stream.tail, False)
        meta.update(tail)
    except _Fallback:
        pass
    return meta


def _head_meta(head: bytes) -> dict:
    m = _TE_KEY.search(head)
    if not m:
        return {}
    try:
        meta = orjson.loads(head[:m.start()] + b'"traceEvents":[]}')
    except orjson.JSONDecodeError:
        return {}
    if isinstance(meta, dict):
        meta.pop("traceEvents", None)
        return meta
    return {}


def _has_trace_events(path: Path, meta: dict) -> bool:
    """Is there a top-level traceEvents array (the file parsed as JSON but gave no event)?"""
    ij = _ijson()
    src = _Source(path, False)
    try:
        for prefix, event, _value in ij.parse(_Stream(src), buf_size=1 << 18):
            if prefix == "":
                if event in ("start_map", "map_key"):
                    continue
                return False  # end of the top-level object, or the top level is not an object
            if prefix == "traceEvents":
                if event == "start_array":
                    return True
        return False
    except ij.common.JSONError:
        return False
    finally:
        src.close()


# -- aggregation -----------------------------------------------------------------------------------

class _Agg:
    """Running totals; memory bounded by the number of distinct ranges and GPU annotation instances."""

    def __init__(self):
        self.devices: dict[Any, list] = {}  # pid -> [kernels, kernel_us, memcpy_n, memcpy_us, memset_n, memset_us, t0, t1]
        self.cpu: dict[tuple, list] = {}  # (pid, phase, layer, part) -> [us, n]
        self.gpu: dict[tuple, list] = {}
        self.spans: dict[tuple, list] = {}  # (pid, external id) -> [t0, t1, phase, layer, part, dur|None]
        self.steps: dict[tuple, dict] = {}  # (pid, step) -> {phase, ts, dur}
        self.pstep: dict[int, float] = {}
        self.user_annotations = 0
        self.counters: list[tuple] = []  # (name, pid, ts, args)
        self.names: dict[Any, str] = {}
        self.events = 0
        self._parsed: dict[bytes | str, tuple | None] = {}

    def set_metadata(self, meta: dict) -> None:
        mt = meta.get("moe_trace")
        if isinstance(mt, dict) and isinstance(mt.get("pid_names"), dict):
            for k, v in mt["pid_names"].items():
                self.names[_pidkey(k)] = str(v)

    def device_activity(self, code: int, pid, ts: float, dur: float) -> None:
        d = self.devices.get(pid)
        if d is None:
            d = self.devices[pid] = [0, 0.0, 0, 0.0, 0, 0.0, ts, ts + dur]
        d[2 * code] += 1
        d[2 * code + 1] += dur
        if ts < d[6]:
            d[6] = ts
        if ts + dur > d[7]:
            d[7] = ts + dur

    def _classify(self, raw) -> tuple | None:
        """('range', phase, layer, part) | ('step', phase, n) | ('pstep', n) | None, cached per name."""
        c = self._parsed.get(raw, False)
        if c is not False:
            return c
        name = _str(raw) if isinstance(raw, bytes) else raw
        c = None
        if isinstance(name, str):
            m = _RANGE_RE.match(name)
            if m:
                c = ("range", m.group(1), int(m.group(2)), m.group(3))
            else:
                m = _STEP_RE.match(name)
                if m:
                    c = ("step", m.group(1), int(m.group(2)))
                else:
                    m = _PSTEP_RE.match(name)
                    if m:
                        c = ("pstep", int(m.group(1)))
        if len(self._parsed) < 100_000:
            self._parsed[raw] = c
        return c

    def annotation(self, gpu: bool, raw, pid, ts: float, dur: float, ext) -> None:
        if not gpu:
            self.user_annotations += 1
        c = self._classify(raw)
        if c is None:
            return
        kind = c[0]
        if kind == "range":
            _, phase, layer, part = c
            if gpu:
                if ext is not None:
                    s = self.spans.get((pid, ext))
                    if s is None:  # one range instance: its spans on several streams are unioned
                        self.spans[(pid, ext)] = [ts, ts + dur, phase, layer, part, dur]
                    else:
                        s[0] = min(s[0], ts)
                        s[1] = max(s[1], ts + dur)
                        s[5] = None
                    return
                acc = self.gpu.setdefault((pid, phase, layer, part), [0.0, 0])
            else:
                acc = self.cpu.setdefault((pid, phase, layer, part), [0.0, 0])
            acc[0] += dur
            acc[1] += 1
        elif gpu:
            return
        elif kind == "step":
            key = (pid, c[2])
            if key not in self.steps:
                self.steps[key] = {"phase": c[1], "ts": ts, "dur": dur}
        else:
            self.pstep.setdefault(c[1], dur)

    def add_event(self, ev: dict) -> None:
        cat = ev.get("cat")
        if cat not in _WANTED_CATS:
            if ev.get("ph") == "M" and ev.get("name") == "process_name":
                args = ev.get("args")
                if isinstance(args, dict) and isinstance(args.get("name"), str):
                    self.names.setdefault(_pidkey(ev.get("pid")), args["name"])
            return
        ph = ev.get("ph")
        if ph == "X":
            code = _DEVICE_CATS.get(cat) if isinstance(cat, str) else None
            try:
                ts = _fnum(ev.get("ts"))
                dur = _fnum(ev.get("dur"))
            except (TypeError, ValueError):
                return
            if code is not None:
                self.device_activity(code, _pidkey(ev.get("pid")), ts, dur)
            elif cat in ("user_annotation", "gpu_user_annotation"):
                gpu = cat == "gpu_user_annotation"
                args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
                ext = args.get("External id") if gpu else None
                self.annotation(gpu, ev.get("name"), _pidkey(ev.get("pid")), ts, dur,
                                ext if isinstance(ext, int) else None)
        elif ph == "C" and cat == "moe_trace":
            try:
                ts = _fnum(ev.get("ts"))
            except (TypeError, ValueError):
                return
            args = ev.get("args")
            if isinstance(args, dict):
                self.counters.append((ev.get("name"), _pidkey(ev.get("pid")), ts, args))


_WANTED_CATS = frozenset(_DEVICE_CATS) | {"user_annotation", "gpu_user_annotation", "moe_trace"}


def _fnum(x) -> float:
    if isinstance(x, bool):
        raise TypeError
    return float(x)


def _pidkey(x):
    if isinstance(x, str):
        try:
            return int(x)
        except ValueError:
            return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


# -- building TraceData ----------------------------------------------------------------------------

def _build(path: Path, meta: dict, agg: _Agg, parser: str, nbytes: int, seconds: float) -> TraceData:
    mt = meta.get("moe_trace") if isinstance(meta.get("moe_trace"), dict) else None
    runs: list[RunData] = []
    pid_part: dict = {}
    if mt is not None:
        try:
            if isinstance(mt.get("parts"), list):  # a merged trace
                for i, part in enumerate(mt["parts"]):
                    runs.append(RunData.from_dict(part["run"]))
                    for pid in part.get("pids", []):
                        pid_part[_pidkey(pid)] = i
            elif isinstance(mt.get("run"), dict):
                runs.append(RunData.from_dict(mt["run"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"{path} has a damaged 'moe_trace' metadata key ({exc!r}); re-write the trace with "
                             "this moe-trace version") from None
    nparts = max(1, len(runs))
    if mt is not None and isinstance(mt.get("pid_names"), dict):
        for k, v in mt["pid_names"].items():
            agg.names[_pidkey(k)] = str(v)

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
        m = _COUNTER_RE.match(name) if isinstance(name, str) else None
        if not m:
            continue
        part = part_of(pid)
        step = ts_step.get((part, ts))
        if step is None:
            step = _nearest_step(ts, [(t, n) for (pt, t), n in ts_step.items() if pt == part])
        layer, metric = int(m.group(1)), m.group(2)
        rec = part_counters[part].setdefault(step, {}).setdefault(layer, {})
        if metric == "expert_tokens":
            rec["expert_tokens"] = [int(v) for _, v in sorted(args.items())]
        else:
            v = next(iter(args.values()), None)
            rec[metric] = v
    steps: list[dict] = []
    meta_steps = (mt or {}).get("steps") or []
    listed = set()
    for s in meta_steps:
        if not isinstance(s, dict) or "step" not in s:
            continue
        n = int(s["step"])
        listed.add(n)
        hit = seen.get((0, n))
        steps.append({"step": n, "phase": s.get("phase"), "tokens": s.get("tokens"), "recorded": hit is not None,
                      "ts": hit["ts"] if hit else None, "host_ms": hit["dur"] / 1000.0 if hit else None})
    for (part, n), s in sorted(seen.items()):
        if part == 0 and n not in listed:
            steps.append({"step": n, "phase": s["phase"], "tokens": None, "recorded": True, "ts": s["ts"],
                          "host_ms": s["dur"] / 1000.0})

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
                                rank=rank if isinstance(rank, int) else None)
    return TraceData(path=path, metadata=meta, runs=runs, steps=steps,
                     counters=part_counters[0] if part_counters else {}, part_counters=part_counters,
                     range_ms=range_ms, summary=summary, timing_source=timing_source, parser=parser,
                     bytes=nbytes, seconds=seconds, event_count=agg.events)


def _nearest_step(ts: float, pairs: list[tuple[float, int]]) -> int | None:
    """The step whose range starts last at or before `ts` (counters are written at the step's start)."""
    best = None
    for t, n in pairs:
        if t <= ts and (best is None or t > best[0]):
            best = (t, n)
    return best[1] if best else None
