"""The reader's fallback: stream any valid Chrome-trace layout with ijson (C backend `yajl2_c`).

Used for every layout the fast path does not recognise and for every malformed file, so errors come
from a real JSON parser. A `NestingGuard` rejects hostile nesting before ijson builds it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from moe_trace.errors import TraceError

from .aggregate import Aggregate
from .fastpath import Fallback, split_tail
from .io import TE_KEY, NestingGuard, Source, head_meta

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

    def __init__(self, src: Source):
        self._it = src.chunks()
        self._buf = b""
        self._off = 0
        self.head = bytearray()
        self._head_done = False
        self._prev = b""
        self._guard = NestingGuard(src.path)

    def _fill(self) -> bool:
        data = next(self._it, None)
        if data is None:
            return False
        self._guard.feed(data)
        if not self._head_done:
            self.head += data[: self.HEAD - len(self.head)]
            self._head_done = len(self.head) >= self.HEAD or TE_KEY.search(self.head) is not None
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


def parse(src: Source, agg: Aggregate) -> dict:
    """Aggregate every event of `src` into `agg`; the top-level metadata keys. Raises TraceError."""
    ij = _ijson()
    stream = _Stream(src)
    lead = stream.peek().lstrip()[:1]
    prefix = "item" if lead == b"[" else "traceEvents.item"
    n = 0
    try:
        for ev in ij.items(stream, prefix, use_float=True, buf_size=1 << 18):
            if n == 0 and prefix == "traceEvents.item":
                agg.set_metadata(head_meta(bytes(stream.head)))
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
    meta = head_meta(bytes(stream.head))
    if n == 0 and not _has_trace_events(src.path, meta):
        raise TraceError(f"{src.path} is JSON but not a Chrome trace (no traceEvents array); pass a trace written "
                         "by torch.profiler's export_chrome_trace or by moe-trace")
    try:
        _, tail = split_tail(stream.tail, False)
        meta.update(tail)
    except Fallback:
        pass
    return meta


def _has_trace_events(path: Path, meta: dict) -> bool:
    """Is there a top-level traceEvents array (the file parsed as JSON but gave no event)?"""
    ij = _ijson()
    src = Source(path, False)
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


