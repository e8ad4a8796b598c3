"""The reader's fallback: stream any valid Chrome-trace layout with ijson (C backend `yajl2_c`).

Used for every layout the fast path does not recognise and for every malformed file, so errors come
from a real JSON parser. A `NestingGuard` rejects hostile nesting before ijson builds it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from moe_trace.errors import TraceError, short_reason

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
        # where `tail` starts in the stream: byte offset, newlines before it, offset of the last one
        self._base = 0
        self._lines = 0
        self._last_nl = -1
        self._read_at = 0  # offset in _buf of the last slice handed to ijson

    def _fill(self) -> bool:
        data = next(self._it, None)
        if data is None:
            return False
        self._guard.feed(data)
        if not self._head_done:
            self.head += data[: self.HEAD - len(self.head)]
            self._head_done = len(self.head) >= self.HEAD or TE_KEY.search(self.head) is not None
        old = self._prev
        k = old.rfind(b"\n")
        if k >= 0:
            self._last_nl = self._base + k
        self._lines += old.count(b"\n")
        self._base += len(old)
        self._prev = self._buf
        self._buf, self._off = data, 0
        return True

    def locate(self, message) -> tuple[int, int, int] | None:
        """(line, column, byte offset), 1-based line and column, of the error yajl reported in
        `message` (its second line quotes ~30 bytes each side of the error, its third points at it
        with `^`), found in the bytes ijson was last handed; None when it cannot be pinned down."""
        raw = message if isinstance(message, (bytes, bytearray)) else str(message).encode("utf-8", "surrogateescape")
        lines = bytes(raw).split(b"\n")
        if len(lines) < 3 or b"^" not in lines[2]:
            return None
        caret = lines[2].index(b"^")
        before, after = lines[1][:caret].lstrip(b" "), lines[1][caret:]
        pattern = before + after
        if not pattern.strip():
            return None
        window = self.tail
        norm = window.replace(b"\n", b" ").replace(b"\r", b" ")
        lo = max(0, len(self._prev) + self._read_at - len(pattern) - 64)
        i = norm.find(pattern, lo)
        if i < 0:
            i = norm.find(pattern)
        if i < 0:
            return None
        at = max(0, i + len(before) - 1)  # yajl points just past the byte it failed on
        while at > 0 and window[at - 1:at].isalpha() or at > 0 and window[at - 1:at] == b"-":
            at -= 1  # to the start of a bare word such as NaN or -Infinity
        k = window.rfind(b"\n", 0, at)
        last_nl = self._base + k if k >= 0 else self._last_nl
        line = self._lines + window.count(b"\n", 0, at) + 1
        return line, self._base + at - last_nl, self._base + at

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
        self._read_at = self._off
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
        raise _json_error(src, stream, exc, "pass a Chrome trace written by torch.profiler or moe-trace") from None
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


def _json_error(src: Source, stream: "_Stream", exc: Exception, advice: str) -> TraceError:
    """One sentence for a JSON syntax error: where (line, column, byte), why, never the file's bytes."""
    msg = short_reason(exc)  # yajl appends the offending bytes: never echo them
    if "premature EOF" in msg or "Incomplete" in msg:
        return TraceError(f"{src.path} ends in the middle of the JSON (truncated, the writer was probably "
                          "killed); re-run the profiling to get a complete trace")
    where = stream.locate(exc.args[0]) if len(exc.args) == 1 else None
    at = f" at line {where[0]}, column {where[1]} (byte {where[2]})" if where else ""
    hint = ""
    if where is not None:
        bad = stream.tail[where[2] - stream._base:where[2] - stream._base + 9]
        if bad.startswith((b"NaN", b"Infinity", b"-Infinity")):
            hint = "; NaN and Infinity are not JSON (strict writers write null)"
    return TraceError(f"{src.path} is not valid JSON{at} ({msg}{hint}); {advice}")


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




def event_batches(src: Source, size: int = 16384):
    """The events of `src` in lists of up to `size` (for streaming consumers such as merge)."""
    ij = _ijson()
    stream = _Stream(src)
    lead = stream.peek().lstrip()[:1]
    prefix = "item" if lead == b"[" else "traceEvents.item"
    batch: list = []
    n = 0
    try:
        for ev in ij.items(stream, prefix, use_float=True, buf_size=1 << 18):
            n += 1
            batch.append(ev)
            if len(batch) >= size:
                yield batch
                batch = []
    except ij.common.JSONError as exc:
        raise _json_error(src, stream, exc, "leave it out or re-run the profiling") from None
    if n == 0 and prefix == "traceEvents.item" and not _has_trace_events(src.path, {}):
        raise TraceError(f"{src.path} is JSON but not a Chrome trace (no traceEvents array); pass a trace written "
                         "by torch.profiler's export_chrome_trace or by moe-trace")
    if batch:
        yield batch
