"""The fast path of the reader: regular expressions over newline-separated events.

Used whenever a file is laid out like Kineto, torch.profiler or moe-trace write it, i.e. with a
newline between events: each chunk is cut at the last `},\\n{` event boundary (a newline can never
sit inside a JSON string, so such a boundary is always structural), one regular expression finds
the `"cat": "<category>"` keys of the few categories analysis needs (kernels, memcpy/memset, user
and GPU annotations, moe-trace counters; ~15% of the events of a full trace), and the fields that
follow are read with an anchored expression; only events of an unusual key order and the counters
are sliced out and parsed with orjson. cpu_op, cuda_runtime, python_function and flow events are
never parsed. Anything else raises `Fallback` and the file is re-read by `ijson_path`.
"""
from __future__ import annotations

import re

import orjson

from .aggregate import Aggregate, pidkey, str_of
from .format import COUNTER_CAT, DEVICE_CATS, GPU_USER_ANNOTATION, READ_CATS
from .io import MAX_HEADER, TE_KEY, Source

MAX_PIECE = 16 << 20

# the categories analysis reads, the most frequent first (alternatives are tried in order)
_HIT_ORDER = ("kernel", "gpu_user_annotation", "user_annotation", "gpu_memcpy", "gpu_memset", COUNTER_CAT)
assert set(_HIT_ORDER) == READ_CATS
_HIT = re.compile(rb'"cat"\s*:\s*"(' + b"|".join(c.encode() for c in _HIT_ORDER) + rb')"')
_SEP = re.compile(rb"\}[ \t\r]*,[ \t\r]*\n[ \t\r\n]*\{")
_STR = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_VAL = rb'(?:-?[0-9][0-9.eE+\-]*|"[^"\\]*")'
_FIELDS = re.compile(rb'\s*,\s*"name"\s*:\s*(' + _STR + rb')\s*,\s*"pid"\s*:\s*(' + _VAL + rb'|' + _STR + rb')'
                     rb'\s*,\s*"tid"\s*:\s*(?:' + _VAL + rb'|' + _STR + rb')\s*,\s*"ts"\s*:\s*(' + _VAL + rb')'
                     rb'\s*,\s*"dur"\s*:\s*(' + _VAL + rb')')
_EXTID = re.compile(rb'\s*,\s*"args"\s*:\s*\{\s*"External id"\s*:\s*(-?[0-9]+)')
# one scan finds a hit and, in the usual key order, its fields and the annotation's External id
_SCAN = re.compile(_HIT.pattern + rb"(?:" + _FIELDS.pattern + rb"(?:" + _EXTID.pattern + rb")?)?")
_DEVICE_CATS_B = {k.encode(): v for k, v in DEVICE_CATS.items()}
_COUNTER_B = COUNTER_CAT.encode()
_GPU_ANN_B = GPU_USER_ANNOTATION.encode()


class Fallback(Exception):
    """The fast path does not recognise this layout: re-read with ijson."""


def parse(src: Source, agg: Aggregate) -> dict:
    """Aggregate every event of `src` into `agg`; the top-level metadata keys. Raises Fallback."""
    regions = regions_of(src)
    meta = next(regions)
    agg.set_metadata(meta)
    for region in regions:
        if isinstance(region, dict):  # the keys after the traceEvents array
            meta.update(region)
        else:
            _process_piece(region, agg)
    return meta


def regions_of(src: Source, starts: list | None = None):
    """The top-level keys before `traceEvents` (a dict), then byte regions of whole events separated by
    `,\\n` (each a valid JSON array body), then the keys after the events array (a dict). `starts`: a
    list that gets the offset in the (uncompressed) stream of each region, as it is yielded."""
    it = src.chunks()
    buf = b""
    eof = False
    at = 0  # offset of buf[0] in the stream

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
        k = buf.find(b"[") + 1
        buf, at = buf[k:], at + k
    elif head == b"{":
        bare = False
        searched = 0
        while True:
            m = TE_KEY.search(buf, max(0, searched - 64))
            if m:
                break
            if eof or len(buf) > MAX_HEADER:
                raise Fallback
            searched = len(buf)
            more()
        try:
            meta = orjson.loads(buf[:m.start()] + b'"traceEvents":[]}')
        except orjson.JSONDecodeError:
            raise Fallback from None
        if not isinstance(meta, dict):
            raise Fallback
        meta.pop("traceEvents", None)
        buf, at = buf[m.end():], at + m.end()
    else:
        raise Fallback  # empty or not JSON: let ijson produce the precise error
    yield meta
    n = len(buf)
    buf = buf.lstrip()
    at += n - len(buf)
    while True:
        if not eof:
            more()
        if eof:
            region, tail = split_tail(buf, bare)
            if region:
                if starts is not None:
                    starts.append(at)
                yield region
            yield tail
            return
        cut = _last_sep(buf)
        if cut is None:
            if len(buf) > MAX_PIECE:
                raise Fallback  # no newline between events (compact JSON): ijson
            continue
        if starts is not None:
            starts.append(at)
        yield buf[:cut[0]]
        buf, at = buf[cut[1]:], at + cut[1]


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


def split_tail(buf: bytes, bare: bool) -> tuple[bytes, dict]:
    """Split the last bytes into (events region, top-level keys after the traceEvents array)."""
    if bare:
        p = buf.rfind(b"]")
        region = buf[:p].rstrip() if p >= 0 and not buf[p + 1:].strip() else None
        if region is None or (region and not region.endswith(b"}")):
            raise Fallback
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
    raise Fallback  # truncated or malformed: ijson says exactly what is wrong


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


def _pidval(raw: bytes):
    if raw[0] == 34:
        return pidkey(str_of(raw))
    try:
        return int(raw)
    except ValueError:
        f = float(raw)
        return int(f) if f.is_integer() else f


def _process_piece(piece: bytes, agg: Aggregate) -> None:
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
        if dur is not None and cat != _COUNTER_B:
            try:
                ts = float(ts) if ts[0] != 34 else float(ts[1:-1])  # 34 = '"'
                dur = float(dur) if dur[0] != 34 else float(dur[1:-1])
                pid = int(pid) if pid[0] != 34 and pid.isdigit() else _pidval(pid)
            except ValueError:
                raise Fallback from None
            code = dev_cats.get(cat)
            if code is not None:  # Aggregate.device_activity inlined: this loop runs once per kernel event
                d = devices.get(pid)
                if d is None:
                    d = devices[pid] = [0, 0.0, 0, 0.0, 0, 0.0, ts, ts + dur]
                d[2 * code] += 1
                d[2 * code + 1] += dur
                if ts < d[6]:
                    d[6] = ts
                if ts + dur > d[7]:
                    d[7] = ts + dur
            elif cat == _GPU_ANN_B:
                annotation(True, raw, pid, ts, dur, int(ext) if ext is not None else None)
            else:  # a CPU range's External id ties its GPU span to it (per-step GPU time)
                annotation(False, raw, pid, ts, dur, int(ext) if ext is not None else None)
            n += 1
            last_hit = p
            continue
        s, e = _bounds(piece, p)
        try:  # parses only if [s, e) is exactly one event, so the bounds are verified
            ev = orjson.loads(piece[s:e])
        except orjson.JSONDecodeError:
            raise Fallback from None
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
        raise Fallback
    me = _SEP.search(piece, p)
    return s, (me.start() + 1 if me else len(piece))


