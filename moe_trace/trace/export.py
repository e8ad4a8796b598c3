"""The byte path of `write_trace`: a raw Kineto file becomes a moe-trace file without parsing it whole.

torch.profiler's `export_chrome_trace` writes events separated by `},\\n{` (reader's fastpath).
Two streaming passes over the raw file (regions of whole events, a few MB each; never the whole file
in memory). A slim trace's passes decode each region with msgspec (C): strict JSON, and for each
event only its head (`_Head`: ph, cat, pid, tid, ts, dur and the args' `correlation` /
`External id`) becomes a small struct, alive for that region only; everything else is validated and
skipped. No dict is built for an event the slim trace drops.

1. pass 1 (`pass1_region`) gives the events the writer must read: metadata (`M`) and user
   annotations, parsed (orjson, from their bytes), and every GPU kernel / memcpy / memset as the
   fields of its head only (`GpuWork`: pid, tid, ts, dur, the two ids, and where it is). This gives
   the step ranges the counters are anchored to, the host pid, the process names and which kernels
   a slim trace keeps (`slim_select`: inside a MoE range) with their correlations / External ids.
2. pass 2 (`pass2_region`, while the output is written) parses the kept GPU events from their bytes
   and copies, for every kept kernel, the bytes of its runtime launch event (`cuda_runtime` /
   `cuda_driver` with the kernel's correlation) and of the `cpu_op` that launched it (the kernel's
   External id). Serialized events are joined a batch at a time (`dumps_batches`). Peak memory: see
   docs/benchmarks.md ("export memory"); benchmarks/export_memory.py measures it.

A full trace's passes use regular expressions (only annotations and flow ends are read) and copy
every raw event except two kinds that no viewer can place (`full_drops`):
flow events (`s`/`t`/`f`) whose other end is not in the file — Kineto writes a flow end `f` on
host runtime calls that launch nothing (`cudaOccupancy*`, `cudaDeviceGetAttribute`, ...) and a
flow start on launches whose kernel fell outside the window; catapult warns "Found flow phase f ...
but no flow start found" for each, Perfetto counts `flow_end_without_start` — and Kineto's
`overhead` events with a pid outside 0..2^32-1 (`Activity Buffer Request`, pid -1), which
Perfetto's `CoerceToUint32` puts on pid 0, the GPU 0 process. A slim trace keeps no flows.

A layout this path does not recognise (a region that is not strict JSON, an event that is not an
object, a `ph` / `cat` that is not a string, `args` that are not an object; or msgspec missing)
raises `fastpath.Fallback`; `write_trace` then loads the file with orjson and runs the same selection
on dicts (`slim_select`, `host_link_kept`), so both paths write the same events
(tests/test_kineto_export.py compares them).
"""
from __future__ import annotations

import operator
import os
import re
import struct
from array import array
from bisect import bisect_left
from itertools import accumulate, compress, count, repeat
from operator import add, and_, is_, itemgetter, not_, or_
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import orjson

try:  # a core dependency; without it a slim export takes the object path (Fallback)
    import msgspec
except ImportError:  # pragma: no cover - a platform with no msgspec wheel
    msgspec = None

from .fastpath import Fallback, _SEP, regions_of
from .format import (GPU_USER_ANNOTATION, GPU_WORK_CATS, NAME_PREFIX, PROFILER_STEP_PREFIX, SLIM_CATS, SLIM_GPU_ARGS,
                     USER_ANNOTATION)
from moe_trace.errors import TraceError

from .io import CHUNK, SLIM_CHUNK, Source
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
_HIT_FULL = _hit_re(FULL_READ_CATS)


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

_UNSET = msgspec.UNSET if msgspec is not None else object()
_ID = Union[int, float, str, bool, None]  # hashable JSON values; anything else: Fallback

if msgspec is not None:
    class _Ids(msgspec.Struct, gc=False):
        correlation: _ID = _UNSET
        external: _ID = msgspec.field(default=_UNSET, name="External id")

    class _Head(msgspec.Struct, gc=False):
        """What pass 1 reads of every event (a GPU kernel's head is all slim's selection needs; a launch's
        or op's head gives its place in the `HostIndex`); absent keys stay UNSET."""
        ph: Union[str, None] = _UNSET
        cat: Union[str, None] = _UNSET
        pid: Any = _UNSET
        tid: Any = _UNSET
        ts: Any = _UNSET
        dur: Any = _UNSET
        args: _Ids = msgspec.field(default_factory=_Ids)

    _HEADS = msgspec.json.Decoder(list[_Head])
    _RAWS = msgspec.json.Decoder(list[msgspec.Raw])  # each event's bytes (views of the region: no copy)
    _ENCODE = msgspec.json.Encoder().encode

_CAT = operator.attrgetter("cat")
_PH = operator.attrgetter("ph")
_PID = operator.attrgetter("pid")
_TID = operator.attrgetter("tid")
_TS = operator.attrgetter("ts")
_DUR = operator.attrgetter("dur")
_CORR = operator.attrgetter("args.correlation")
_EXT = operator.attrgetter("args.external")


_IS_X = frozenset({"X"}).__contains__
_IS_M = frozenset({"M"}).__contains__
_IS_READ = SLIM_READ_CATS.__contains__
_IS_HOST = HOST_LINK_CATS.__contains__
_IS_GPU = GPU_WORK_CATS.__contains__
_IS_OP = frozenset({"cpu_op"}).__contains__


def _where(flags) -> list[int]:
    """Indices of the true items of `flags` (an iterable), in C."""
    return list(compress(count(), flags))


def _pick(seq: list, at: list[int]) -> list:
    """`[seq[i] for i in at]`, in C."""
    if not at:
        return []
    got = itemgetter(*at)(seq)
    return list(got) if len(at) > 1 else [got]


def _int_ids(heads: list, at: list[int], getter) -> tuple[list[int], list]:
    """(index, id) of the heads at `at` whose id (`getter`) is a plain int: no other id can be kept."""
    ids = list(map(getter, _pick(heads, at)))
    if set(map(type, ids)) <= {int}:
        return at, ids
    keep = [k for k, x in enumerate(ids) if type(x) is int]
    return [at[k] for k in keep], [ids[k] for k in keep]


def _document(region: bytes) -> bytes:
    """`[region]`, for `_decode`; Fallback without msgspec, or when the region is not UTF-8 (msgspec
    validates the UTF-8 of the strings it reads, not of those it skips: checked here, once a region)."""
    if msgspec is None:
        raise Fallback
    try:
        if not region.isascii():
            region.decode("utf-8")
    except UnicodeDecodeError:
        raise Fallback from None
    return b"[" + region + b"]"


def _decode(decoder, doc: bytes) -> list:
    """`decoder` applied to a region's `_document`; Fallback when it is not strict JSON of the layout the
    heads read."""
    try:
        return decoder.decode(doc)
    except msgspec.DecodeError:  # a ValidationError is a DecodeError
        raise Fallback from None


def _loads_raws(raws: list) -> list:
    """The events of `raws` (msgspec.Raw or bytes) parsed, one orjson call."""
    try:
        return orjson.loads(b"[" + b",".join(raws) + b"]")
    except orjson.JSONDecodeError:  # pragma: no cover - msgspec read the same bytes as strict JSON
        raise Fallback from None


def encode_heads(heads: list) -> bytes:
    """GPU heads of pass 1 as JSON (a worker's answer; `decode_heads` gives them back, absent keys absent)."""
    return _ENCODE(heads)


def decode_heads(blob: bytes) -> list:
    """`encode_heads`' heads back; ValueError when `blob` is not such a list (a worker's nonsense)."""
    try:
        return _HEADS.decode(blob)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a list of event heads: {exc}") from None


class HostIndex:
    """Where a region's launches and ops are, from pass 1's heads, so that pass 2 does not read every head
    again: (index in the region, correlation) of each `cuda_runtime` / `cuda_driver` X event and (index,
    External id) of each `cpu_op` X event whose id is an int (no other id can be kept: `host_link_kept`).

    Where the region's events lie one after another with one separator (Kineto's layout), also their
    bytes' place (`*_span`: the starts, from the region's start, then the lengths; `gpu_at`: the GPU
    events that `gpu_span` places) and the region's offset in the file (`base`, -1 when not known): pass 2
    then reads only the kept events' bytes (`read_spans`)."""

    __slots__ = ("size", "rt_at", "rt_corr", "op_at", "op_ext", "rt_span", "op_span", "gpu_at", "gpu_span", "base")
    _LENS = struct.Struct("<q9Q")
    _ARRAYS = ("rt_at", "rt_corr", "op_at", "op_ext", "rt_span", "op_span", "gpu_at", "gpu_span")

    def __init__(self, size: int, rt_at=(), rt_corr=(), op_at=(), op_ext=(), rt_span=(), op_span=(), gpu_at=(),
                 gpu_span=(), base: int = -1):
        self.size = size  # events in the region (pass 2 finds the same number, or the file changed)
        self.base = base
        try:
            for name, a in zip(self._ARRAYS, (rt_at, rt_corr, op_at, op_ext, rt_span, op_span, gpu_at, gpu_span)):
                setattr(self, name, array("q", a))
        except OverflowError:  # an id beyond 64 bits: the object path compares it
            raise Fallback from None

    @classmethod
    def of(cls, heads: list, host: list[int], cats: list, spans: list | None = None, gpu: list[int] = ()
           ) -> "HostIndex":
        """The index of the events `heads[i]`, i in `host` (the X events with a host-link cat; `cats`:
        every head's cat). `spans`: the events' (starts, lengths) in the region (`event_spans`), or None;
        `gpu`: the indices of the region's GPU events (ascending), whose spans `gpu_span` holds. A `*_span`
        array holds the starts of its events, then their lengths."""
        is_op = list(map(_IS_OP, _pick(cats, host)))
        rts = list(compress(host, map(not_, is_op)))
        rt_at, rt_corr = _int_ids(heads, rts, _CORR)
        op_at, op_ext = _int_ids(heads, list(compress(host, is_op)), _EXT)
        got = cls(len(heads), rt_at, rt_corr, op_at, op_ext)
        if spans is not None:
            got.rt_span, got.op_span, got.gpu_span = (array("q", _pick(spans[0], at) + _pick(spans[1], at))
                                                      for at in (rt_at, op_at, gpu))
            got.gpu_at = array("q", gpu)
        return got

    @property
    def has_spans(self) -> bool:
        return self.base >= 0 and len(self.rt_span) == 2 * len(self.rt_at) and len(self.op_span) == 2 * len(self.op_at)

    def gpu_spans(self, stubs: list) -> list[tuple[int, int]] | None:
        """(offset in the file, length) of each of the region's `GpuWork` `stubs`, or None without spans."""
        at, span, n = self.gpu_at, self.gpu_span, len(self.gpu_at)
        if self.base < 0 or len(span) != 2 * n:
            return None
        out = []
        for w in stubs:
            k = bisect_left(at, w.index)
            if k == n or at[k] != w.index:
                return None
            out.append((self.base + span[k], span[n + k]))
        return out

    def hits(self, corr: set, ext: set) -> list[int]:
        """Indices of the events whose id is in `corr` (launches) / `ext` (ops), in region order."""
        return [h[0] for h in self.hit_spans(corr, ext)]

    def hit_spans(self, corr: set, ext: set) -> list[tuple[int, int, int, bool, int]]:
        """(index, start, length, is an op, id) of the events whose id is in `corr` (launches) / `ext`
        (ops), in region order (start and length -1 without spans)."""
        out = []
        for op, at, ids, span, want in ((False, self.rt_at, self.rt_corr, self.rt_span, corr),
                                        (True, self.op_at, self.op_ext, self.op_span, ext)):
            n = len(at) if len(span) == 2 * len(at) else 0
            for k in _where(map(want.__contains__, ids)):
                out.append((at[k], span[k], span[n + k], op, ids[k]) if n else (at[k], -1, -1, op, ids[k]))
        out.sort()
        return out

    def to_bytes(self) -> bytes:
        arrays = [getattr(self, name) for name in self._ARRAYS]
        return self._LENS.pack(self.base, self.size, *map(len, arrays)) + b"".join(a.tobytes() for a in arrays)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "HostIndex":
        base, size, *lens = cls._LENS.unpack_from(blob)
        if cls._LENS.size + 8 * sum(lens) != len(blob) or len(lens) != len(cls._ARRAYS):
            raise ValueError("host index of the wrong size")
        out, at = [], cls._LENS.size
        for n in lens:
            a = array("q")
            a.frombytes(blob[at:at + 8 * n])
            out.append(a)
            at += 8 * n
        return cls(size, *out, base=base)


class GpuWork(msgspec.Struct if msgspec is not None else object, **({"gc": False} if msgspec is not None else {})):
    """A GPU kernel / memcpy / memset (`ph` X) of a slim pass 1: only what slim's selection reads (pid, tid,
    ts, dur, correlation, External id: the event's `_Head`; an absent one is `msgspec.UNSET`) and where it
    is (region number, index of the event in the region); the kept ones are parsed in pass 2
    (`resolve_slim`), the dropped ones never become dicts. `get` / `[]` answer like the event's dict for
    the keys `slim_select` reads. A msgspec Struct: made in C, ~60 k of them per 100 MB of raw trace."""

    cat: Any
    pid: Any
    tid: Any
    ts: Any
    dur: Any
    corr: Any
    ext: Any
    region: int
    index: int
    done: Any = None  # the event as a slim trace writes it, when pass 1 serialized it (`Follower`)

    def get(self, key: str, default=None):
        if key == "ph":
            return "X"
        v = getattr(self, key, _UNSET) if key in ("cat", "pid", "tid", "ts", "dur") else _UNSET
        return default if v is _UNSET else v

    def __getitem__(self, key: str):
        v = self.get(key, _UNSET)
        if v is _UNSET:
            raise KeyError(key)
        return v


def read_selected(path: Path, slim: bool = True, workers: "Workers | None" = None
                  ) -> tuple[dict, list, dict, "FullDrops | list[HostIndex]"]:
    """Pass 1: (metadata before traceEvents, the M / annotation (/ GPU, for slim) events in file order,
    keys after the array, and for a full trace what it drops: `FullDrops`; for a slim one each region's
    `HostIndex`). For a slim trace the GPU kernels / memcpys / memsets come as `GpuWork` stubs
    (selection reads them; `resolve_slim` parses the kept ones), everything else as parsed dicts. With `workers` (workers.py; the writer starts them
    for a large raw file on a machine with cores to spare) a slim pass runs its regions in them: same
    result."""
    if slim and workers is not None:
        got = workers.read_selected(path)
        if got is not None:
            return got
    src = Source(path, chunk=SLIM_CHUNK if slim else CHUNK)
    starts: list[int] = []
    regions = regions_of(src, starts if slim and not src.gz else None)
    head = next(regions)
    tail: dict = {}
    events: list = []
    side: "list[HostIndex] | FullDrops" = [] if slim else FullDrops()
    n = -1
    for region in regions:
        if isinstance(region, dict):
            tail = region
            continue
        n += 1
        if slim:
            evs, gpu, heads, index, _ = pass1_region(region, base=starts[n] if starts else -1)
            events.extend(stubbed(evs, gpu, heads, n))
            side.append(index)
        else:
            side.scan(region)
            events.extend(_annotations(region))
    if not slim:
        side.settle()
    return head, events, tail, side


def stubbed(events: list, gpu: list, heads: list, n: int, done: list | None = None) -> list:
    """`pass1_region`'s answer for region `n` with a `GpuWork` in each GPU event's place."""
    works = map(GpuWork, map(_CAT, heads), map(_PID, heads), map(_TID, heads), map(_TS, heads), map(_DUR, heads),
                map(_CORR, heads), map(_EXT, heads), repeat(n), map(itemgetter(1), gpu),
                repeat(None) if done is None else done)
    for (pos, _), w in zip(gpu, works):
        events[pos] = w
    return events


def _annotations(region: bytes) -> list:
    """A full pass 1 on one region: its M events and user annotations, parsed, in order."""
    spans = [(s, e) for _, s, e in _hits(region, _HIT_FULL)]
    out = []
    for b in range(0, len(spans), _BATCH):
        out.extend(_loads_raws([region[s:e] for s, e in spans[b:b + _BATCH]]))
    return out


def pass1_region(region: bytes, serialize: bool = False, base: int = -1
                 ) -> tuple[list, list[tuple[int, int]], list, HostIndex, list | None]:
    """Slim pass 1 on one region: (the events it reads, in order, with None in each GPU kernel / memcpy /
    memset's place; (position in that list, index of the event in the region) of each of those; their
    `_Head`s; the region's `HostIndex`; with `serialize`, each of those GPU events as a slim trace
    writes it (`slim_bytes`), else None). M events and user annotations are parsed from their bytes, a
    batch at a time. `serialize` is for the `Follower`, whose time is free: it moves pass 2's parsing of
    the kept GPU events into the save, at the cost of holding the dropped ones' bytes too. `base`: the
    region's offset in the raw file (-1: unknown; the index then has no spans)."""
    doc = _document(region)
    heads = _decode(_HEADS, doc)
    # C-level scans over every head (map / compress); Python only for the events pass 1 reads
    cats = list(map(_CAT, heads))
    phs = list(map(_PH, heads))
    x = list(map(_IS_X, phs))
    host = _where(map(and_, x, map(_IS_HOST, cats)))
    sel = _where(map(or_, map(_IS_READ, cats), map(_IS_M, phs)))  # + M events
    is_gpu = _pick(list(map(and_, x, map(_IS_GPU, cats))), sel)
    out: list = [None] * len(sel)
    at = _where(is_gpu)
    gpu = list(zip(at, _pick(sel, at)))  # (position in out, index in the region)
    gpu_heads = _pick(heads, [i for _, i in gpu])
    at = _where(map(not_, is_gpu))
    parse = list(zip(at, _pick(sel, at)))
    done = [] if serialize else None
    raws = _decode(_RAWS, doc) if parse or gpu or (base >= 0 and host) else None
    spans = event_spans(region, raws) if base >= 0 and raws else None
    index = HostIndex.of(heads, host, cats, spans, [i for _, i in gpu])
    if spans is not None or (base >= 0 and not host and not gpu):  # (nothing of the region is indexed)
        index.base = base
    del cats, phs, x, spans
    if parse or (serialize and gpu):
        for b in range(0, len(parse), _BATCH):
            part = parse[b:b + _BATCH]
            for (pos, _), e in zip(part, _loads_raws([raws[i] for _, i in part])):
                out[pos] = e
        if serialize:
            for b in range(0, len(gpu), _BATCH):
                done += slim_bytes([raws[i] for _, i in gpu[b:b + _BATCH]])
    return out, gpu, gpu_heads, index, done


def event_spans(region: bytes, raws: list) -> tuple[list[int], list[int]] | None:
    """(starts, lengths) in `region` of its events (`raws`, msgspec's cut of it), or None when they do
    not lie one after another joined by one separator (checked: the join is the region)."""
    lens = list(map(len, raws))
    if len(raws) == 1:
        return ([0], lens) if len(region) == lens[0] else None
    k = region.find(b"{", lens[0])
    sep = region[lens[0]:k]
    if k < 0 or sep.join(raws) != region:
        return None
    return list(accumulate(map(add, lens, repeat(len(sep))), initial=0)), lens


def read_spans(path: Path, want: dict, corr: set, ext: set, index: list) -> tuple[dict, list[bytes]] | None:
    """Pass 2 from pass 1's spans (`HostIndex.has_spans` for every region; `want`: region -> its kept
    `GpuWork`s that pass 1 did not serialize): ({id(stub): its bytes as written}, the
    launch / op bytes to keep per region), reading only those events' bytes. None when a span is
    missing or the bytes there are not the events pass 1 saw (the caller reads the regions instead)."""
    if not all(ix.has_spans for ix in index) or any(n >= len(index) for n in want):
        return None
    parsed: dict = {}
    links: list[bytes] = []
    try:
        with open(path, "rb") as fh:
            fd = fh.fileno()
            for n, ix in enumerate(index):
                stubs = want.get(n) or []
                hits = ix.hit_spans(corr, ext) if corr or ext else []
                if not hits and not stubs:
                    continue
                gpu = ix.gpu_spans(stubs)
                if gpu is None:
                    return None
                lo = min([ix.base + h[1] for h in hits] + [s for s, _ in gpu])
                hi = max([ix.base + h[1] + h[2] for h in hits] + [s + k for s, k in gpu])
                data = os.pread(fd, hi - lo, lo)  # at most one region's bytes
                if stubs:
                    got = slim_bytes([data[s - lo:s - lo + k] for s, k in gpu], [(w.ts, w.cat) for w in stubs])
                    for w, e in zip(stubs, got):
                        parsed[id(w)] = e
                if hits:
                    off = ix.base - lo
                    evs = [data[off + h[1]:off + h[1] + h[2]] for h in hits]
                    if not _same_hosts(evs, hits):
                        return None
                    links.append(b",\n".join(evs))
    except (OSError, Fallback):
        return None
    return parsed, links


def _same_hosts(evs: list[bytes], hits: list) -> bool:
    """Whether `evs` (the bytes at `hits`' spans) are the launches / ops pass 1 indexed there."""
    try:
        heads = _HEADS.decode(b"[" + b",".join(evs) + b"]")
    except msgspec.DecodeError:
        return False
    for (_, _, _, op, want), h in zip(hits, heads):
        if (h.ph != "X" or (h.cat == "cpu_op") != op or h.cat not in HOST_LINK_CATS
                or type(got := h.args.external if op else h.args.correlation) is not int or got != want):
            return False
    return len(heads) == len(hits)


def resolve_slim(path: Path, kept: list, corr: set, ext: set, index: list, workers: "Workers | None" = None
                 ) -> tuple[list, list[bytes]]:
    """Pass 2 of a slim trace: `kept` with each `GpuWork` replaced by its event, args slimmed, serialized
    (bytes; `dumps_events` writes them as they are), and the bytes of the host events `host_link_kept`
    would keep, in file order (one or more events per item). Raises `Fallback` when the file changed
    since pass 1. `index`: pass 1's `HostIndex` of each region."""
    want: dict[int, list[GpuWork]] = {}
    for e in kept:
        if isinstance(e, GpuWork) and e.done is None:
            want.setdefault(e.region, []).append(e)
    parsed: dict[int, dict] = {}
    links: list[bytes] = []

    def answer() -> list:
        return [(e.done if e.done is not None else parsed[id(e)]) if isinstance(e, GpuWork) else e for e in kept]

    if want or corr or ext:
        got = read_spans(path, want, corr, ext, index)
        if got is not None:
            parsed, links = got
            return answer(), links
        if workers is not None:
            if workers.resolve_slim(path, dict(want), corr, ext, index, parsed, links):
                return answer(), links
            parsed, links = {}, []
        regions = regions_of(Source(path, chunk=SLIM_CHUNK))
        next(regions)
        n = -1
        for region in regions:
            if isinstance(region, dict):
                continue
            n += 1
            stubs = want.pop(n, None) or []
            if n >= len(index):
                raise Fallback
            got, blob = pass2_region(region, [(w.index, w.get("ts"), w.cat) for w in stubs], corr, ext, index[n])
            for w, e in zip(stubs, got):
                parsed[id(w)] = e
            if blob:
                links.append(blob)
        if want:
            raise Fallback
    return answer(), links


def slim_bytes(raws: list, expect: list | None = None) -> list[bytes]:
    """Each GPU event of `raws` (msgspec.Raw / bytes; one orjson call) with its args slimmed, serialized as
    the writer writes it. `expect`: the (ts, cat) pass 1 saw for each (Fallback when one differs)."""
    dumps = orjson.dumps
    got = []
    for k, e in enumerate(_loads_raws(raws)):
        if not isinstance(e, dict) or (expect is not None and (e.get("ts"), e.get("cat")) != expect[k]):
            raise Fallback
        # a copy of the exact size: orjson's result keeps a buffer of at least 4 KB (72 k kernels: 290 MB)
        got.append(memoryview(dumps(slim_args(e), option=ORJSON_OPTS)).tobytes())
    return got


def slim_args(e: dict) -> dict:
    """A GPU event with only the args a slim trace keeps (`SLIM_GPU_ARGS`)."""
    if e.get("cat") in SLIM_CATS and e.get("cat") != GPU_USER_ANNOTATION and isinstance(e.get("args"), dict):
        e = dict(e, args={k: v for k, v in e["args"].items() if k in SLIM_GPU_ARGS})
    return e


def pass2_region(region: bytes, stubs: list[tuple], corr: set, ext: set, index: HostIndex
                 ) -> tuple[list[bytes], bytes]:
    """Pass 2 on one region: the kept GPU events (`stubs`: (index, ts, cat) from pass 1) parsed, args
    slimmed and serialized as the writer writes them (bytes: a kept kernel costs its output bytes, not a
    dict, until the file is written), and the bytes of the launches / ops to keep (pass 1's `index` of
    the region), joined by `,\n` (b"" when none). Raises `Fallback` when an event is not what pass 1
    saw there."""
    raws = _decode(_RAWS, _document(region))
    if len(raws) != index.size:
        raise Fallback
    got = []
    for b in range(0, len(stubs), _BATCH):
        part = stubs[b:b + _BATCH]
        got += slim_bytes([raws[w[0]] for w in part], [(w[1], w[2]) for w in part])
    hits = index.hits(corr, ext) if corr or ext else []
    return got, b",\n".join([raws[i] for i in hits])


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
    kernel's launch and launching op). The byte path's `GpuWork` stubs (most events) are passed over
    in C; only the parsed dicts are looked at one by one."""
    from .writer import _kernels_under_moe_ranges

    kept = list(selected)
    keep = list(map(is_, map(type, kept), repeat(GpuWork)))  # a stub of a kernel / memcpy / memset (ph X)
    for n in compress(range(len(kept)), map(not_, keep)):
        e = kept[n]
        ph = e.get("ph")
        if ph == "M":
            keep[n] = True
        elif ph == "X":
            cat = e.get("cat")
            if cat in SLIM_CATS:
                kept[n] = slim_args(e)
                keep[n] = True
            elif cat == USER_ANNOTATION and _keep_annotation(e):
                keep[n] = True
    kept = _kernels_under_moe_ranges(list(compress(kept, keep)))
    stubs = list(compress(kept, map(is_, map(type, kept), repeat(GpuWork))))
    corr, ext = set(map(_STUB_CORR, stubs)), set(map(_STUB_EXT, stubs))
    for e in kept:
        if type(e) is not GpuWork and e.get("cat") in GPU_WORK_CATS:
            args = e.get("args") or {}
            corr.add(args.get("correlation"))
            ext.add(args.get("External id"))
    return kept, _positive_ints(corr), _positive_ints(ext)


_STUB_CORR = operator.attrgetter("corr")
_STUB_EXT = operator.attrgetter("ext")


def _positive_ints(ids: set) -> set:
    """The ids that are ints > 0 (a kernel's correlation / External id; absent: UNSET on a stub, None in
    a dict's args), in C when all are."""
    ids.discard(_UNSET)
    ids.discard(None)
    if set(map(type, ids)) <= {int} and (not ids or min(ids) > 0):
        return ids
    return {c for c in ids if isinstance(c, int) and c > 0}


def host_link_kept(e: dict, corr: set, ext: set) -> bool:
    """A host event a slim trace keeps: the launch of a kept kernel, or the op that launched one."""
    cat = e.get("cat")
    if not isinstance(cat, str) or cat not in HOST_LINK_CATS or e.get("ph") != "X":
        return False
    args = e.get("args")
    if not isinstance(args, dict):
        return False
    x = args.get("External id") if cat == "cpu_op" else args.get("correlation")
    return type(x) is int and x in (ext if cat == "cpu_op" else corr)  # as in HostIndex.of: plain ints only


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
        try:
            batch.append(e if type(e) is bytes else dumps(e, option=option))
        except TypeError as exc:  # e.g. an int beyond 64 bits in a raw event's args
            raise TraceError(f"an event of the trace cannot be written as JSON ({exc}); the raw trace holds a "
                             "value JSON writers refuse: re-export it, or check your ranges' args") from None
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
