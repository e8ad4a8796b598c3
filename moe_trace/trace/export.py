"""The byte path of `write_trace`: a raw Kineto file becomes a moe-trace file without parsing it whole.

torch.profiler's `export_chrome_trace` writes events separated by `},\\n{` (reader's fastpath).
Two streaming passes over the raw file (chunks of a few MB, never the whole file in memory):

1. regular expressions find the few events the writer must read: metadata (`M`), user annotations
   and GPU activity (kernels, memcpy, memset, GPU annotations); only these are parsed (orjson, a batch
   of events per call). This gives the step ranges the counters are anchored to, the host pid, the
   process names and, for a slim trace, which kernels it keeps and their `correlation` /
   `External id`. A slim pass keeps each kernel / memcpy / memset only as a `GpuWork` stub (pid, tid,
   ts, dur, the two ids and where its bytes are), never as a dict: most of them are dropped.
2. the output is written while the file is read again: a full trace copies every event's bytes
   as they are; a slim trace parses the kept GPU events from their bytes (`resolve_slim`) and copies,
   for every kept kernel, its runtime launch event (`cuda_runtime`/`cuda_driver` with the kernel's
   correlation) and the `cpu_op` that launched it (the kernel's External id). Host events are found
   by a regular expression over the chunk and their two ids read from their bytes; a dropped
   `cpu_op`, `cuda_runtime` or `python_function` event is never parsed into Python objects.
   Serialized events are joined a batch at a time (`dumps_events`). Peak memory: see
   docs/benchmarks.md ("export memory"); benchmarks/export_memory.py measures it.

A full trace copies every raw event except two kinds that no viewer can place (`full_drops`):
flow events (`s`/`t`/`f`) whose other end is not in the file — Kineto writes a flow end `f` on
host runtime calls that launch nothing (`cudaOccupancy*`, `cudaDeviceGetAttribute`, ...) and a
flow start on launches whose kernel fell outside the window; catapult warns "Found flow phase f ...
but no flow start found" for each, Perfetto counts `flow_end_without_start` — and Kineto's
`overhead` events with a pid outside 0..2^32-1 (`Activity Buffer Request`, pid -1), which
Perfetto's `CoerceToUint32` puts on pid 0, the GPU 0 process. A slim trace keeps no flows.

A layout this path does not recognise raises `fastpath.Fallback`; `write_trace` then loads the
file with orjson and runs the same selection on dicts (`slim_select`), so both paths write the same
events (tests/test_kineto_export.py compares them).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import orjson

from .fastpath import Fallback, _SEP, regions_of
from .format import (GPU_USER_ANNOTATION, GPU_WORK_CATS, NAME_PREFIX, PROFILER_STEP_PREFIX, SLIM_CATS, SLIM_GPU_ARGS,
                     USER_ANNOTATION)
from .io import Source
from .workers import Workers

#: how the writer serializes events
ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

#: host events a slim trace keeps for its kernels: the launch (by correlation) and the op (by External id)
RUNTIME_CATS = frozenset({"cuda_runtime", "cuda_driver"})
HOST_LINK_CATS = RUNTIME_CATS | {"cpu_op"}



#: flow events (phases s, t, f) without nested objects, as Kineto writes them: one match per event
_FLOW_EV = re.compile(rb'\{[^{}]*?"ph"\s*:\s*"([stf])"[^{}]*\}')
_FLOW_PH = re.compile(rb'"ph"\s*:\s*"[stf]"')
_STRV = rb'"((?:[^"\\]|\\.)*)"'
_FLOW_ID = re.compile(rb'"id"\s*:\s*(-?[0-9]+|"(?:[^"\\]|\\.)*")')
_FLOW_CAT = re.compile(rb'"cat"\s*:\s*' + _STRV)
_FLOW_NAME = re.compile(rb'"name"\s*:\s*' + _STRV)
_OVERHEAD = re.compile(rb'"cat"\s*:\s*"(overhead)"')
_AFTER_EVENT = re.compile(rb"[ \t\r\n]*,[ \t\r\n]*")
UINT32_MAX = 2 ** 32 - 1


def _hit_re(cats) -> re.Pattern:
    return re.compile(rb'"cat"\s*:\s*"(' + b"|".join(c.encode() for c in sorted(cats)) + rb')"|"ph"\s*:\s*"(M)"')


#: what pass 1 parses: M events, user annotations and (slim) GPU activity
SLIM_READ_CATS = SLIM_CATS | {USER_ANNOTATION}
FULL_READ_CATS = frozenset({USER_ANNOTATION})
_HIT_SLIM = _hit_re(SLIM_READ_CATS)
_HIT_FULL = _hit_re(FULL_READ_CATS)
_HOST = re.compile(rb'"cat"\s*:\s*"(' + b"|".join(c.encode() for c in sorted(HOST_LINK_CATS)) + rb')"')
_EXT = re.compile(rb'"External id"\s*:\s*(-?[0-9]+)')
_CORR = re.compile(rb'"correlation"\s*:\s*(-?[0-9]+)')


def _bounds(piece: bytes, p: int) -> tuple[int, int]:
    """[start, end) of the event holding position `p` of a region of whole events."""
    k = p
    s = 0
    while True:
        k = piece.rfind(b"},", 0, k)
        if k < 0:
            break
        m = _SEP.match(piece, k)
        if m:
            s = m.end() - 1
            break
    m = _SEP.search(piece, p)
    return s, (m.start() + 1 if m else len(piece))


def _hits(piece: bytes, rx: re.Pattern) -> Iterator[tuple[bytes, int, int]]:
    """(group, start, end) of every event of `piece` that `rx` matches (each event once)."""
    last_end = -1
    for m in rx.finditer(piece):
        p = m.start()
        if p < last_end:
            continue
        s, e = _bounds(piece, p)
        last_end = e
        yield (m.group(1) or m.group(2)), s, e


#: events parsed (or serialized) per orjson call: bounds the transient dicts and buffers of a region
_BATCH = 512


def _loads_each(region: bytes, spans: list[tuple[int, int]]) -> list:
    """The values of `region[s:e]` for each span (one orjson call; each span holds one event)."""
    try:
        got = orjson.loads(b"[" + b",".join([region[s:e] for s, e in spans]) + b"]")
    except orjson.JSONDecodeError:
        raise Fallback from None
    if len(got) != len(spans):
        raise Fallback
    return got


class GpuWork:
    """A GPU kernel / memcpy / memset (`ph` X) of a slim pass 1: only what slim's selection reads (pid, tid,
    ts, dur, correlation, External id) and where its bytes are (region number, start, end); the kept ones
    are parsed in pass 2 (`resolve_slim`), the dropped ones never become dicts that outlive their region.
    `get` / `[]` answer like the event's dict for the keys `slim_select` reads."""

    __slots__ = ("cat", "pid", "tid", "ts", "dur", "corr", "ext", "region", "start", "end")
    _MISSING = object()

    def __init__(self, e: dict, region: int, start: int, end: int):
        m = self._MISSING
        self.cat = e.get("cat")
        self.pid = e.get("pid", m)
        self.tid = e.get("tid", m)
        self.ts = e.get("ts", m)
        self.dur = e.get("dur", m)
        args = e.get("args")
        args = args if isinstance(args, dict) else {}
        self.corr = args.get("correlation")
        self.ext = args.get("External id")
        self.region, self.start, self.end = region, start, end

    def get(self, key: str, default=None):
        if key == "ph":
            return "X"
        v = getattr(self, key, self._MISSING) if key in ("cat", "pid", "tid", "ts", "dur") else self._MISSING
        return default if v is self._MISSING else v

    def __getitem__(self, key: str):
        v = self.get(key, self._MISSING)
        if v is self._MISSING:
            raise KeyError(key)
        return v


def read_selected(path: Path, slim: bool = True, workers: "Workers | None" = None
                  ) -> tuple[dict, list, dict, "FullDrops | None"]:
    """Pass 1: (metadata before traceEvents, the M / annotation (/ GPU, for slim) events in file order,
    keys after the array, and for a full trace what it drops: `FullDrops`). For a slim trace the GPU
    kernels / memcpys / memsets come as `GpuWork` stubs (selection reads them; `resolve_slim` parses
    the kept ones), everything else as parsed dicts. With `workers` (workers.py; the writer starts them
    for a large raw file on a machine with cores to spare) a slim pass runs its regions in them: same
    result."""
    if slim and workers is not None:
        got = workers.read_selected(path)
        if got is not None:
            return got
    rx = _HIT_SLIM if slim else _HIT_FULL
    src = Source(path)
    regions = regions_of(src)
    head = next(regions)
    tail: dict = {}
    events: list = []
    drops = None if slim else FullDrops()
    n = -1
    for region in regions:
        if isinstance(region, dict):
            tail = region
            continue
        n += 1
        if drops is not None:
            drops.scan(region)
        events.extend(pass1_region(region, rx, lambda e, span, n=n: GpuWork(e, n, *span)))
    if drops is not None:
        drops.settle()
    return head, events, tail, drops


def pass1_region(region: bytes, rx: re.Pattern = _HIT_SLIM, stub: Callable | None = None) -> list:
    """The events of one region that pass 1 reads, parsed, in order. For a slim pass, each GPU kernel /
    memcpy / memset becomes `stub(event, (start, end))` (its bytes' place in the region) while its batch
    is parsed, so that only one batch of full GPU dicts is ever alive."""
    out = []
    spans = [(s, e) for _, s, e in _hits(region, rx)]
    slim = rx is _HIT_SLIM and stub is not None
    for b in range(0, len(spans), _BATCH):  # a batch at a time: one batch's dicts alive at once
        part = spans[b:b + _BATCH]
        for e, span in zip(_loads_each(region, part), part):
            if slim and isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in GPU_WORK_CATS:
                out.append(stub(e, span))
            else:
                out.append(e)
    return out


def resolve_slim(path: Path, kept: list, corr: set, ext: set, workers: "Workers | None" = None
                 ) -> tuple[list, list[bytes]]:
    """Pass 2 of a slim trace: `kept` with each `GpuWork` replaced by its event, args slimmed, serialized
    (bytes; `dumps_events` writes them as they are), and the bytes of the host events `host_link_kept`
    would keep, in file order (one or more events per item). Raises `Fallback` when the file changed
    since pass 1."""
    want: dict[int, list[GpuWork]] = {}
    for e in kept:
        if isinstance(e, GpuWork):
            want.setdefault(e.region, []).append(e)
    parsed: dict[int, dict] = {}
    links: list[bytes] = []
    if want or corr or ext:
        corr_b = {str(c).encode() for c in corr}
        ext_b = {str(x).encode() for x in ext}
        if workers is not None:
            if workers.resolve_slim(path, dict(want), corr_b, ext_b, parsed, links):
                return [parsed[id(e)] if isinstance(e, GpuWork) else e for e in kept], links
            parsed, links = {}, []
        regions = regions_of(Source(path))
        next(regions)
        n = -1
        for region in regions:
            if isinstance(region, dict):
                continue
            n += 1
            stubs = want.pop(n, None) or []
            got, blob = pass2_region(region, [(w.start, w.end, w.get("ts"), w.cat) for w in stubs], corr_b, ext_b)
            for w, e in zip(stubs, got):
                parsed[id(w)] = e
            if blob:
                links.append(blob)
        if want:
            raise Fallback
    return [parsed[id(e)] if isinstance(e, GpuWork) else e for e in kept], links


def slim_args(e: dict) -> dict:
    """A GPU event with only the args a slim trace keeps (`SLIM_GPU_ARGS`)."""
    if e.get("cat") in SLIM_CATS and e.get("cat") != GPU_USER_ANNOTATION and isinstance(e.get("args"), dict):
        e = dict(e, args={k: v for k, v in e["args"].items() if k in SLIM_GPU_ARGS})
    return e


def pass2_region(region: bytes, stubs: list[tuple], corr_b: set, ext_b: set) -> tuple[list[bytes], bytes]:
    """Pass 2 on one region: the kept GPU events (`stubs`: (start, end, ts, cat) from pass 1) parsed, args
    slimmed and serialized as the writer writes them (bytes: a kept kernel costs its output bytes, not a
    dict, until the file is written), and the bytes of the launches / ops to keep, joined by `,\\n`
    (b"" when none). Raises `Fallback` when an event is not what pass 1 saw there."""
    dumps = orjson.dumps
    got = []
    for b in range(0, len(stubs), _BATCH):
        part = stubs[b:b + _BATCH]
        for w, e in zip(part, _loads_each(region, [(w[0], w[1]) for w in part])):
            if not isinstance(e, dict) or e.get("ts") != w[2] or e.get("cat") != w[3]:
                raise Fallback
            # a copy of the exact size: orjson's result keeps a buffer of at least 4 KB (72 k kernels: 290 MB)
            got.append(memoryview(dumps(slim_args(e), option=ORJSON_OPTS)).tobytes())
    blob = b",\n".join(_host_link_bytes(region, corr_b, ext_b)) if corr_b or ext_b else b""
    return got, blob


def _flow_key_bytes(ev: bytes) -> tuple:
    i, c, n = _FLOW_ID.search(ev), _FLOW_CAT.search(ev), _FLOW_NAME.search(ev)
    return (c.group(1) if c else None, n.group(1) if n else None, i.group(1) if i else None)


def flow_key(e: dict) -> tuple:
    """(cat, name, id) of a flow event, as catapult and Perfetto pair them (the byte path reads the same
    key from the event's bytes)."""
    def raw(v, quoted):
        if v is None:
            return None
        b = orjson.dumps(v)
        return b[1:-1] if quoted and isinstance(v, str) else b
    return (raw(e.get("cat"), True), raw(e.get("name"), True), raw(e.get("id"), False))


def _bad_pid(pid) -> bool:
    return isinstance(pid, bool) or (isinstance(pid, (int, float)) and not 0 <= pid <= UINT32_MAX)


class FullDrops:
    """What a full trace leaves out of the raw events (see the module docstring): flow events whose
    (cat, name, id) has no start or no end in the file, and `overhead` events with a pid Perfetto maps
    to 0. `scan` each region in pass 1, `settle`, then `keep(region)` in pass 2."""

    def __init__(self):
        self.starts: set = set()
        self.ends: set = set()
        self.orphans: set = set()
        self.overhead: set = set()

    def scan(self, region: bytes) -> None:
        n = 0
        for m in _FLOW_EV.finditer(region):
            n += 1
            (self.starts if m.group(1) == b"s" else self.ends).add(_flow_key_bytes(m.group(0)))
        if n != len(_FLOW_PH.findall(region)):
            raise Fallback  # a flow event with nested objects: the object path reads it
        for _, s, e in _hits(region, _OVERHEAD):
            ev = orjson.loads(region[s:e])
            if isinstance(ev, dict) and _bad_pid(ev.get("pid")):
                self.overhead.add(region[s:e])

    def settle(self) -> None:
        self.orphans = self.starts ^ self.ends
        self.starts = self.ends = set()

    def dropped(self, e: dict) -> bool:
        """The object path's test for one event (the same events `keep` cuts from the bytes)."""
        if e.get("ph") in ("s", "t", "f"):
            return flow_key(e) in self.orphans
        return e.get("cat") == "overhead" and e.get("ph") == "X" and _bad_pid(e.get("pid"))

    @classmethod
    def of_events(cls, events: list) -> "FullDrops":
        d = cls()
        for e in events:
            if isinstance(e, dict) and e.get("ph") in ("s", "t", "f"):
                (d.starts if e["ph"] == "s" else d.ends).add(flow_key(e))
        d.settle()
        return d

    def keep(self, region: bytes) -> bytes:
        """`region` without the dropped events (and their separators)."""
        spans = []
        if self.orphans:
            spans = [(m.start(), m.end()) for m in _FLOW_EV.finditer(region)
                     if _flow_key_bytes(m.group(0)) in self.orphans]
        if self.overhead:
            spans += [(s, e) for _, s, e in _hits(region, _OVERHEAD) if region[s:e] in self.overhead]
        if not spans:
            return region
        spans.sort()
        out = bytearray()
        pos = 0
        for s, e in spans:
            out += region[pos:s]
            m = _AFTER_EVENT.match(region, e)
            if m and m.end() < len(region):
                pos = m.end()
            else:  # the region's last event: drop the separator before it instead
                pos = len(region)
                k = len(out.rstrip())
                del out[k:]
                if out.endswith(b","):
                    del out[-1:]
                del out[len(out.rstrip()):]
        out += region[pos:]
        return bytes(out).strip()


def _keep_annotation(e: dict) -> bool:
    name = e.get("name")
    return isinstance(name, str) and (name.startswith(NAME_PREFIX) or name.startswith(PROFILER_STEP_PREFIX))


def slim_select(selected: Iterable[dict]) -> tuple[list[dict], set, set]:
    """Of the M / annotation / GPU events: what a slim trace keeps (M events of live pids are
    filtered by the caller), and the correlations and External ids of its GPU work (to keep each
    kernel's launch and launching op)."""
    from .writer import _kernels_under_moe_ranges

    kept = []
    for e in selected:
        if isinstance(e, GpuWork):  # the byte path's stub of a kernel / memcpy / memset (ph X)
            kept.append(e)
            continue
        ph = e.get("ph")
        if ph == "M":
            kept.append(e)
        elif ph == "X":
            cat = e.get("cat")
            if cat in SLIM_CATS:
                kept.append(slim_args(e))
            elif cat == USER_ANNOTATION and _keep_annotation(e):
                kept.append(e)
    kept = _kernels_under_moe_ranges(kept)
    corr, ext = set(), set()
    for e in kept:
        if isinstance(e, GpuWork):
            c, x = e.corr, e.ext
        elif e.get("cat") in GPU_WORK_CATS:
            args = e.get("args") or {}
            c, x = args.get("correlation"), args.get("External id")
        else:
            continue
        if isinstance(c, int) and c > 0:
            corr.add(c)
        if isinstance(x, int) and x > 0:
            ext.add(x)
    return kept, corr, ext


def host_link_kept(e: dict, corr: set, ext: set) -> bool:
    """A host event a slim trace keeps: the launch of a kept kernel, or the op that launched one."""
    cat = e.get("cat")
    if cat not in HOST_LINK_CATS or e.get("ph") != "X":
        return False
    args = e.get("args") or {}
    if cat == "cpu_op":
        return args.get("External id") in ext
    return args.get("correlation") in corr


def _host_link_bytes(region: bytes, corr_b: set, ext_b: set) -> Iterator[bytes]:
    for cat, s, e in _hits(region, _HOST):
        if cat == b"cpu_op":
            m = _EXT.search(region, s, e)
            if m and m.group(1) in ext_b:
                yield region[s:e]
        else:
            m = _CORR.search(region, s, e)
            if m and m.group(1) in corr_b:
                yield region[s:e]


def all_events(path: Path, drops: FullDrops | None = None) -> Iterator[bytes]:
    """Pass 2 of a full trace: every event region of the raw file, bytes as they are, less `drops`."""
    src = Source(path)
    regions = regions_of(src)
    next(regions)
    for region in regions:
        if not isinstance(region, dict) and region.strip():
            if drops is not None:
                region = drops.keep(region)
                if not region:
                    continue
            yield region


def dumps_events(events: Iterable, option: int) -> bytes:
    """The events serialized one per line, separated by `,\\n` (an event already serialized, bytes, as it
    is)."""
    return b",\n".join(dumps_batches(events, option))


def dumps_batches(events: Iterable, option: int) -> Iterator[bytes]:
    """`dumps_events` a batch at a time (each part whole events; `joined` puts `,\\n` between parts):
    orjson gives each `dumps` result a buffer of at least 4 KB, so a list of all of them would take
    ~4 KB an event, and a writer that streams its parts never holds the whole output twice."""
    batch = []
    dumps = orjson.dumps
    for e in events:
        batch.append(e if type(e) is bytes else dumps(e, option=option))
        if len(batch) == _BATCH:
            yield b",\n".join(batch)
            batch = []
    if batch:
        yield b",\n".join(batch)


def joined(parts: Iterable[bytes]) -> Iterator[bytes]:
    """`parts` separated by `,\\n` (each part is one or more whole events)."""
    first = True
    for p in parts:
        if not p:
            continue
        if not first:
            yield b",\n"
        first = False
        yield p


def is_raw_path(raw: Any) -> bool:
    return not isinstance(raw, (dict, list))
