"""`merge`'s byte path: re-map a region of whole events without a Python dict per event.

For a region of the fast path's splitter (`fastpath.regions_of`: whole events separated by `,\n`),
`remap_region` gives the region with every event's pid, ts and flow id re-written the way merge's
per-event path re-writes them, or None when it cannot prove that it would (the caller then takes
the per-event path for that region). The proof:

1. msgspec (C) decodes `[region]` as strict JSON (the UTF-8 of skipped strings is checked apart)
   into small structs of the fields merge reads, validating and skipping everything else: every
   element must be an object whose `ph` is one of `_PHASES` or a flow phase (so never the metadata
   events merge replaces, nor async events), with an int `pid`, a number `ts`, a string `cat` or
   none, an int `id` exactly when it is a flow (`s` / `t` / `f`) and no `bind_id`. Their cats give the
   pid kinds exactly as the per-event path computes them.
2. The bytes `"pid"` occur exactly once per event (likewise `"ts"`, and `"id"` once per flow). As
   every event has one such top-level key, each occurrence IS an event's top-level key: none is
   nested, inside a string or a duplicate key. (A quote inside a JSON string is escaped, so text like
   `"pid": 5` in a name or in args is `\"pid\": 5` and no occurrence; where one would be, the count
   is off and the region takes the per-event path.) Occurrences in byte order are events in order.
3. Each occurrence is followed by `:` and a plain non-negative decimal (ts: at most 3 decimals);
   numpy parses them column by column, computes the new values (pid through merge's map, numbered
   in the order first seen; ts + the file's offset in exact integer nanoseconds; id * nfiles + k)
   and writes them in place, padded with spaces (the whitespace and comma after a value give room
   for a longer one). When a new value does not fit, the region takes the per-event path.
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import Union

import numpy as np

from .fastpath import _SEP
from .format import GPU_CATS, HOST_CATS

try:  # a core dependency; without it (a platform with no wheel) merge uses the per-event path
    import msgspec
except ImportError:  # pragma: no cover - exercised by tests through AVAILABLE
    msgspec = None

AVAILABLE = msgspec is not None

_FLOW = frozenset(("s", "t", "f"))
# the phases the byte path takes (merge treats them alike: pid, ts, and for flows the id); metadata ("M":
# the inputs' process_name ... are replaced), async ("b" "e" "n": string ids) and any other: per-event path
_PHASES = "XiIBECPONDRc"
_WS = np.zeros(256, bool)
_WS[[9, 10, 13, 32]] = True
_DIGIT = np.full(256, -1, np.int64)
_DIGIT[48:58] = np.arange(10)
_POW10 = 10 ** np.arange(19, dtype=np.int64)
_IN_NUMBER = np.zeros(256, bool)
_IN_NUMBER[list(b"0123456789.eE+-")] = True
_CLOSE = b"]" + b" " * 64  # gathers past the region's end read spaces
_MAX_INT_DIGITS = 15
_MAX_SPAN = 24  # whitespace + comma after a value that can be re-used as room


def _decoder():
    class Event(msgspec.Struct, gc=False, tag_field="ph"):
        pid: int
        ts: float  # an int or a float (not a string, bool or null)
        cat: str = None  # absent, or a string
        id: None = None  # only flows may carry one (merge re-maps only theirs)
        bind_id: None = None  # merge would re-map it

    class Flow(msgspec.Struct, gc=False, tag_field="ph"):
        pid: int
        ts: float
        id: int
        cat: str = None
        bind_id: None = None

    types = [msgspec.defstruct(f"Event_{t}", [], bases=(Event,), tag=t, tag_field="ph") for t in _PHASES]
    flows = [msgspec.defstruct(f"Flow_{t}", [], bases=(Flow,), tag=t, tag_field="ph") for t in sorted(_FLOW)]
    return msgspec.json.Decoder(list[Union[tuple(types + flows)]]), {c: c.__struct_config__.tag for c in types + flows}, flows


_KIND_CODE = {**{c: 1 for c in HOST_CATS}, **{c: 2 for c in GPU_CATS}}  # else 0: merge's "other" / "host" / "gpu"
_KIND_NAME = ("other", "host", "gpu")


class Parser:
    """A msgspec decoder of event heads (the fields the byte path needs; the rest is validated and skipped)."""

    def __init__(self):
        self._dec, _, self._flows = _decoder()
        self._cat = operator.attrgetter("cat")

    def elements(self, doc: memoryview, region: bytes) -> tuple[int, int, np.ndarray] | None:
        """(number of events, number of flow events, the kind code of each event's cat) or None when `doc`
        (`[region]`) is not strict JSON whose elements all have the head the byte path needs."""
        try:
            if not region.isascii():
                region.decode("utf-8")  # msgspec does not check the UTF-8 of the strings it skips
            heads = self._dec.decode(doc)
        except (msgspec.DecodeError, UnicodeDecodeError):  # invalid JSON or another head (ValidationError)
            return None
        n = len(heads)
        classes = list(map(type, heads))
        nflow = sum(map(classes.count, self._flows))
        kind = np.fromiter(map(_KIND_CODE.get, map(self._cat, heads), repeat(0, n)), np.int64, n)
        return n, nflow, kind


def _find(buf: bytes, needle: bytes) -> np.ndarray:
    """Start offsets of every occurrence of the 5-byte `needle` (a quoted key) in `buf`."""
    v = int.from_bytes(needle[:4], "little")
    found = []
    for j in range(4):
        words = np.frombuffer(buf, dtype="<u4", count=(len(buf) - j) // 4, offset=j)
        found.append(np.flatnonzero(words == v) * 4 + j)
    pos = np.sort(np.concatenate(found))
    if len(needle) > 4:
        a = np.frombuffer(buf, np.uint8)
        pos = pos[a[np.minimum(pos + 4, len(a) - 1)] == needle[4]]
    return pos


def _skip_ws(a: np.ndarray, s: np.ndarray, most: int) -> np.ndarray:
    for _ in range(most):
        w = _WS[a[s]]
        if not w.any():
            break
        s = s + w
    return s


def _digit_run(a: np.ndarray, s: np.ndarray, live: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """(value, number of digits) of the decimal digits at `s` in the rows where `live` (at most `most`)."""
    val = np.zeros(len(s), np.int64)
    nd = np.zeros(len(s), np.int64)
    for j in range(most):
        d = _DIGIT[a[s + j]]
        live = live & (d >= 0)
        if not live.any():
            break
        val = np.where(live, val * 10 + d, val)
        nd += live
    return val, nd


class _Values:
    """The plain non-negative decimal values after the keys at `pos` (numpy, column by column)."""

    def __init__(self, a: np.ndarray, pos: np.ndarray, keylen: int, frac: bool):
        s = _skip_ws(a, pos + keylen, 4)
        ok = a[s] == 58  # ':'
        s = _skip_ws(a, s + 1, 8)
        val, nd = _digit_run(a, s, np.ones(len(s), bool), _MAX_INT_DIGITS + 1)
        ok &= (nd >= 1) & (nd <= _MAX_INT_DIGITS)
        ok &= (a[s] != 48) | (nd == 1)  # no leading zero (msgspec already rejects it)
        end = s + nd
        fd = None
        if frac:
            dot = a[end] == 46
            fv, fd = _digit_run(a, end + 1, dot, 4)
            ok &= ~dot | ((fd >= 1) & (fd <= 3))
            val = val * 1000 + fv * _POW10[3 - np.minimum(fd, 3)]  # in thousandths
            end = end + np.where(dot, fd + 1, 0)
        # the JSON is valid, so the number ends here unless it goes on (more decimals, an exponent)
        ok &= ~_IN_NUMBER[a[end]]
        self.ok = bool(ok.all())
        self.a, self.start, self.end, self.value, self.decimals = a, s, end, val, fd

    def room(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For `rows`: (has a comma, end of the comma, start of the next token) of the whitespace, one comma
        and whitespace after the number (room for a longer value); next token not `"` or `}`: no room."""
        a, p = self.a, self.end[rows]
        comma = np.zeros(len(p), bool)
        comma_end = p.copy()
        for _ in range(_MAX_SPAN):
            c = a[p]
            isc = (c == 44) & ~comma
            comma |= isc
            step = _WS[c] | isc
            if not step.any():
                break
            p = p + step
            comma_end = np.where(isc, p, comma_end)
        last = a[p]
        ok = np.where(comma, last == 34, last == 125)  # a key follows the comma, or the object ends
        return comma, comma_end, np.where(ok, p, 0)


def _key_values(buf: bytearray, a: np.ndarray, key: bytes, count: int, frac: bool) -> _Values | None:
    """The values of `key` when it occurs exactly `count` times (once per event that has it), all plain numbers."""
    pos = _find(buf, key)
    if len(pos) != count:
        return None
    v = _Values(a, pos, len(key), frac)
    return v if v.ok else None


def _digits(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.searchsorted(_POW10, x, side="right"), 1)


def _write(out: np.ndarray, v: _Values, new: np.ndarray, frac: bool) -> bool:
    """Write `new` (ints; thousandths when `frac`: up to 3 decimals, trailing zeros dropped) over the values
    in place, padded with spaces; a longer one moves the comma after it into the whitespace that follows.
    False if one does not fit. Rows are written in groups of one layout (new length, width overwritten,
    decimals, comma moved), column by column: a few groups per region."""
    ip = new // 1000 if frac else new
    nd = _digits(ip)
    if frac:
        f = new % 1000
        fdn = np.where(f == 0, 0, np.where(f % 100 == 0, 1, np.where(f % 10 == 0, 2, 3)))
        fdn = np.maximum(fdn, v.decimals)  # as many decimals as before (Kineto's 3): one layout for all rows
        length = nd + fdn + (fdn > 0)
    else:
        fdn = np.zeros(len(new), np.int64)
        length = nd
    width = v.end - v.start
    comma = np.zeros(len(new), bool)
    grow = np.flatnonzero(length > width)
    if len(grow):
        c, c_end, nxt = v.room(grow)
        if bool((length[grow] + c > nxt - v.start[grow]).any()):
            return False
        width[grow] = c_end - v.start[grow]
        comma[grow] = c
    key = ((length * 128 + width) * 4 + fdn) * 2 + comma
    groups = [None] if key.min() == key.max() else np.unique(key).tolist()
    for g in groups:
        if g is None:
            rows, g = slice(None), int(key[0])
        else:
            rows = np.flatnonzero(key == g)
        moved, g = g & 1, g >> 1
        fd, g = g & 3, g >> 2
        wd, ln = g % 128, g // 128
        s, x = v.start[rows], ip[rows]
        nd_g = ln - (fd + 1 if fd else 0)
        lead = 0  # leading digits that stay as they are (a ts moved by a few ms keeps most of its digits)
        if frac and wd == ln and not moved:
            was = v.value[rows] // 1000
            k = 0
            while k < nd_g and not bool((was // _POW10[k] == x // _POW10[k]).all()):
                k += 1
            lead = nd_g - k
        for j in range(lead, nd_g):
            out[s + j] = (x // _POW10[nd_g - 1 - j]) % 10 + 48
        if fd:
            fr = f[rows]
            out[s + nd_g] = 46
            for q in range(fd):
                out[s + nd_g + 1 + q] = (fr // _POW10[2 - q]) % 10 + 48
        j = ln
        if moved:
            out[s + ln] = 44
            j += 1
        for j in range(j, wd):
            out[s + j] = 32
    return True


def metadata_cut(region: bytes) -> tuple[int, int] | None:
    """Kineto writes its metadata events ("ph": "M") first: the (end, start) offsets of the separator
    after the last `"M"` of a region's first half, so that the metadata can take the per-event path and
    the rest the byte path; None when there is none. The caller proves the cut is between two events (the
    head parses as whole events)."""
    i = region.rfind(b'"M"', 0, len(region) // 2)
    if i < 0:
        return None
    m = _SEP.search(region, i)
    return (m.start() + 1, m.end() - 1) if m else None


def remap_region(region: bytes, parser: Parser, pids, offset_ns: int, k: int, nfiles: int) -> tuple[memoryview, int] | None:
    """(`region` re-mapped, number of events), or None when it must take the per-event path.
    `pids` is merge's _PidMap; it is updated exactly as the per-event path would update it."""
    buf = bytearray(b"[")  # positions below are offsets in buf; the new values are written into it
    buf += region
    buf += _CLOSE
    got = parser.elements(memoryview(buf)[:len(region) + 2], region)
    if got is None:
        return None
    n, nflow, kind = got
    a = np.frombuffer(buf, np.uint8)
    pv = _key_values(buf, a, b'"pid"', n, False)
    if pv is None:
        return None
    tv = iv = None
    if offset_ns:  # else ts stays as it is (msgspec checked it is a number: the per-event path's float(ts))
        tv = _key_values(buf, a, b'"ts"', n, True)
        if tv is None:
            return None
    if nflow and nfiles > 1:
        iv = _key_values(buf, a, b'"id"', nflow, False)
        if iv is None:
            return None
    # the pid map: numbered in the order first seen, kinds raised to the highest kind of their events
    uniq, first_at, inv = np.unique(pv.value, return_index=True, return_inverse=True)
    kinds, rank = pids.kinds, pids._RANK
    for pid in uniq[np.argsort(first_at)].tolist():
        if pid not in pids.map:
            pids.get(pid)
    pairs = np.unique(inv * 3 + kind)
    for i, code in zip((pairs // 3).tolist(), (pairs % 3).tolist()):
        pid, name = int(uniq[i]), _KIND_NAME[code]
        old = kinds.get(pid)
        if old is None or rank[name] > rank[old]:
            kinds[pid] = name
    if not _write(a, pv, np.array([pids.map[p] for p in uniq.tolist()], np.int64)[inv], False):
        return None
    if tv is not None and not _write(a, tv, tv.value + offset_ns, True):
        return None
    if iv is not None and not _write(a, iv, iv.value * nfiles + k, False):
        return None
    return memoryview(buf)[1:len(region) + 1], n
