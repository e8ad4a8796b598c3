"""A byte-level `merge` prototype, measured region by region against merge's per-event path (not used by merge).

Superseded by merge's byte path (moe_trace/trace/merge_bytes.py: msgspec + numpy instead of Python's
`re` + SQLite); kept to reproduce the figures in docs/benchmarks.md, "merge vs analyze".

Question (issue 12): can `moe-trace merge` re-map events without building a Python object per event,
to get near `analyze`'s throughput? This prototype splits each region of whole events (the reader's
`fastpath.regions_of`) with one regular expression at the head of every event in Kineto's key order
(`"ph"`, `"cat"` + `"name"` or a flow's `"id"`, `"pid"`, `"tid"`, `"ts"`), re-maps the pieces
column-wise (pid through a dict of the few distinct `"pid":..,"tid":..,"ts":` pieces, ts as
`repr(float(ts) + offset)` (the per-event path's float64 sum), flow ids with integer arithmetic) and
joins them again; every other byte is copied. It only takes a region it can prove it handles like
the per-event path: SQLite's `json_each` (stdlib sqlite3, strict RFC 8259, in C) checks the region is
valid JSON whose elements are all objects with a top-level "ph", as many as matched heads, and none
of "ph" "pid" "ts" "cat" "id.." "bind_id", a `\\u` escape or NUL occurs outside the matched heads.

For every region the script checks that the prototype's output parses to exactly the per-event path's
events (with the same pid map), then times, interleaved on the same region (CPU seconds, GC off as in
merge): the per-event path by stage (orjson.loads / re-map / dumps / freeing the dicts), the prototype
by stage (split, key checks, SQLite, rewrite + join), and the prototype without the SQLite check.

    python benchmarks/merge_byte_path.py [--mb 60] [--regions 12] [--file X.pt.trace.json]

Result on the 2-core box (docs/benchmarks.md, "merge: byte-level prototype"): the prototype is not
faster than the per-event path: strict validation in C costs about what orjson.loads costs, and the
regex split alone is ~1.5 us per event.
"""
from __future__ import annotations

import argparse
import gc
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from moe_trace.trace import fastpath, merge  # noqa: E402
from moe_trace.trace.format import GPU_CATS, HOST_CATS  # noqa: E402
from moe_trace.trace.io import Source  # noqa: E402

_WS = rb"[ \t\n\r]*+"
_STR = rb'"[^"\\\x00-\x1f]*+(?:\\[^u][^"\\\x00-\x1f]*+)*+"'  # no \u escapes (orjson rejects lone surrogates)
_PLAIN = rb'"[^"\\\x00-\x1f]*+"'
_PIDV = rb'-?[0-9]{1,15}+(?![0-9.eE])|' + _PLAIN
_TSV = rb'-?[0-9]{1,16}+(?:\.[0-9]{1,17}+)?+(?![0-9.eE])'
_C = _WS + rb"," + _WS
_K = lambda key: rb'"' + key + rb'"' + _WS + rb":" + _WS  # noqa: E731
# groups (all always take part, so the split has no None): 1 from `{` to a flow's `"id":` or to the end
# of `"name"`, 2 the flow id (else empty), 3 `"pid": .., "tid": .., "ts":` (few distinct values: re-mapped
# through a dict), 4 ts, 5 a flow's `"cat"` right after ts (else empty)
_HEAD = re.compile(
    rb"(\{" + _WS + _K(rb"ph") + rb'"'
    rb'(?:[XiIBEC]"' + _C + _K(rb"cat") + _PLAIN + rb"(?:" + _C + _K(rb"name") + _STR + rb")?"
    rb'|[sft]"' + _C + _K(rb"id") + rb"))"
    rb"([0-9]{1,15}+(?![0-9.eE])|)"
    rb"(" + _C + _K(rb"pid") + rb"(?:" + _PIDV + rb")" + _C + _K(rb"tid") + rb"(?:" + _PIDV + rb")" + _C + _K(rb"ts") + rb")"
    rb"(" + _TSV + rb")"
    rb"(" + _C + _K(rb"cat") + _PLAIN + rb"|)")
_G = 6  # slots per event in the split: the text before it, then the 5 groups
_CAT = re.compile(rb'"cat"' + _WS + rb":" + _WS + rb'"([^"]*)"')
_PID = re.compile(rb'("pid"' + _WS + rb":" + _WS + rb")(" + _PIDV + rb")")
_KEYS = (b"\x00", b'"ph"', b'"pid"', b'"ts"', b'"cat"', b'"id', b'"bind_id"')  # `"id` also finds "id2"
_KIND_RANK = {"other": 0, "host": 1, "gpu": 2}


class Validator:
    """Strict JSON check + element counts of an array body, in C (sqlite3's JSON functions)."""

    def __init__(self):
        import sqlite3

        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        # elements, objects, objects with a top-level "ph" (with no "ph" outside the matched heads this proves that
        # every match starts a top-level event: none is an object nested in an event)
        self._sql = "SELECT count(*), total(type = 'object'), total(json_type(value, '$.ph') IS NOT NULL) FROM json_each(?)"
        self._db.execute(self._sql, ("[1]",)).fetchone()  # raises when this SQLite has no JSON functions
        self._error = sqlite3.Error

    def objects(self, region: bytes) -> int | None:
        """How many elements `[region]` has when it is strict JSON whose elements are all objects with a
        top-level "ph" key, else None."""
        try:
            text = region.decode("utf-8")
        except UnicodeDecodeError:
            return None
        try:
            n, objs, with_ph = self._db.execute(self._sql, ("[" + text + "]",)).fetchone()
        except self._error:
            return None
        return n if n == objs == with_ph else None

    def close(self) -> None:
        self._db.close()


def convert(region: bytes, check, pids, offset: float, k: int, nfiles: int) -> tuple[bytes, int] | None:
    """(`region` re-mapped, number of events), or None when it must take the per-event path.
    `pids` is merge's _PidMap; it is updated exactly as the per-event path would update it."""
    parts = _HEAD.split(region)
    m = (len(parts) - 1) // _G
    if not m or parts[0].strip():
        return None
    # outside the matched heads (the rest of each event and the separators) none of the keys the re-map
    # reads may occur, not even nested or inside a string (then the region simply takes the other path)
    rest = b"".join(parts[0::_G])
    if any(key in rest for key in _KEYS) or (b"\\" in rest and b"\\u" in rest):
        return None
    if check.objects(region) != m:  # strict JSON, m top-level objects: each match is one event's head
        return None
    flow_ids = parts[2::_G]
    tails = parts[5::_G]
    mids = parts[3::_G]
    new = _see_pids(pids, mids, parts[1::_G], tails)
    parts[3::_G] = map(new.__getitem__, mids)
    if offset:
        # the same float64 sum as the per-event path (float(ts) + offset), written as repr (shortest round trip)
        parts[4::_G] = ",".join(map(repr, [float(t) + offset for t in parts[4::_G]])).encode().split(b",")
    if nfiles > 1 and flow_ids.count(b"") != m:
        parts[2::_G] = [b"%d" % (int(x) * nfiles + k) if x else x for x in flow_ids]
    return b"".join(parts), m


def _pid_value(tok: bytes):
    return tok[1:-1].decode() if tok[:1] == b'"' else int(tok)


def _see_pids(pids, mids: list, heads: list, tails: list) -> dict:
    """Number new pids in the order they are first seen and raise each pid's kind to the highest kind of
    its events (what the per-event path does for events that are not metadata); the re-mapped text of
    each distinct `"pid": .., "tid": .., "ts":` piece."""
    new = {}
    for mid in dict.fromkeys(mids):
        m = _PID.search(mid)
        pid = _pid_value(m.group(2))
        got = pids.map.get(pid)
        if got is None:
            got = pids.get(pid)
        new[mid] = mid[:m.start(2)] + b"%d" % got + mid[m.end(2):]
    kinds = pids.kinds
    for mid, head, tail in set(zip(mids, heads, tails)):
        m = _CAT.search(tail) or _CAT.search(head)
        cat = m.group(1).decode() if m else None
        kind = "gpu" if cat in GPU_CATS else "host" if cat in HOST_CATS else "other"
        pid = _pid_value(_PID.search(mid).group(2))
        old = kinds.get(pid)
        if old is None or _KIND_RANK[kind] > _KIND_RANK[old]:
            kinds[pid] = kind
    return new


def _per_event(region, pids, offset, k, n, acc):
    t0 = time.process_time()
    events = orjson.loads(b"[" + region + b"]")
    t1 = time.process_time()
    batch = merge._remap_batch(events, pids, offset, k, n)
    t2 = time.process_time()
    out = merge._dump_lines(batch)
    t3 = time.process_time()
    del events, batch
    t4 = time.process_time()
    for key, dt in (("loads", t1 - t0), ("re-map", t2 - t1), ("dumps", t3 - t2), ("free", t4 - t3)):
        acc[key] = acc.get(key, 0.0) + dt
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=60.0, help="size of the generated raw trace (MB)")
    ap.add_argument("--file", default=None, help="a trace in Kineto layout instead of a generated one")
    ap.add_argument("--regions", type=int, default=12, help="regions to time (after the first)")
    args = ap.parse_args(argv)
    if args.file:
        path = Path(args.file)
    else:
        from benchmarks.trace_parse_bench import generate_raw_trace

        path = Path(tempfile.mkdtemp(prefix="moe_trace_bytepath_")) / "raw.pt.trace.json"
        generate_raw_trace(path, args.mb)
    src = Source(path)
    regions = [r for r in fastpath.regions_of(src) if not isinstance(r, dict)][1:args.regions + 1]
    if not args.file:
        shutil.rmtree(path.parent, ignore_errors=True)
    check = Validator()

    class _Trusting:  # the prototype with SQLite's check replaced by the head count
        m = 0

        def objects(self, region):
            return self.m

    gc.disable()
    offset, k, n = 1234.567, 1, 2
    slow: dict = {}
    fast = {"validating": 0.0, "no SQLite": 0.0, "SQLite alone": 0.0}
    for region in regions:
        p_slow, p_fast = merge._PidMap("a", [1]), merge._PidMap("a", [1])
        want = _per_event(region, p_slow, offset, k, n, slow)
        t0 = time.process_time()
        got = convert(region, check, p_fast, offset, k, n)
        t1 = time.process_time()
        _Trusting.m = region.count(b'"ph"')
        convert(region, _Trusting(), merge._PidMap("a", [1]), offset, k, n)
        t2 = time.process_time()
        check.objects(region)
        t3 = time.process_time()
        fast["validating"] += t1 - t0
        fast["no SQLite"] += t2 - t1
        fast["SQLite alone"] += t3 - t2
        assert got is not None, "the prototype refused a region of the generated trace"
        assert orjson.loads(b"[" + got[0] + b"]") == orjson.loads(b"[" + want + b"]") and p_fast.map == p_slow.map
    mb = sum(map(len, regions)) / 1e6
    total = sum(slow.values())
    print(f"{len(regions)} regions, {mb:.1f} MB, outputs equal")
    print(f"per-event path      {mb / total:6.0f} MB per CPU s  (" +
          ", ".join(f"{key} {v / mb * 1e3:.2f}" for key, v in slow.items()) + " ms/MB)")
    for key, v in fast.items():
        print(f"prototype {key:<10}{mb / v:6.0f} MB per CPU s  (x{total / v:.2f} of per-event)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
