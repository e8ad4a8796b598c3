"""File handling for traces: plain or gzip, chunked reading, header peek, atomic write, `no_gc`.

Every reader and writer of trace files goes through here, so a file is opened, decompressed and
reported on (one `TraceError` sentence, never file bytes) the same way everywhere.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import gc
import gzip
import os
import queue
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import orjson

from moe_trace.errors import TraceError

CHUNK = 4 << 20
#: the chunk of a slim export's passes (export.py, workers.py): a region of ~256 KB keeps a pass's transient
#: structs small (a follower's peak RSS 25 MB instead of 72 MB at 4 MB regions) and is no slower
#: (docs/benchmarks.md, "The follower from the first byte")
SLIM_CHUNK = 256 << 10
PROGRESS_BYTES = 50 * 1000 * 1000
MAX_HEADER = 64 << 20
TE_KEY = re.compile(rb'"traceEvents"\s*:\s*\[')


@contextlib.contextmanager
def no_gc():
    """Pause the cyclic GC while millions of acyclic event dicts are created (3x faster loads)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_trace(path: str | os.PathLike):
    """A binary file object of the trace's JSON bytes (gunzipped when the file is gzip)."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def gzip_problem(path, exc: BaseException) -> TraceError:
    """One sentence for a gzip stream that cannot be inflated (no bytes of the file in it)."""
    if isinstance(exc, EOFError):
        return TraceError(f"{path} is a truncated gzip file (the stream ends early, so the writer was probably "
                          "killed); re-run the profiling to get a complete trace")
    why = "bad gzip header" if isinstance(exc, gzip.BadGzipFile) else \
        "bad compressed data or checksum" if isinstance(exc, zlib.error) or "CRC" in str(exc) else type(exc).__name__
    return TraceError(f"{path} is a corrupt gzip file ({why}); re-run the profiling or pass the uncompressed .json")


def os_problem(path, exc: OSError, what: str = "cannot be read") -> TraceError:
    return TraceError(f"{path} {what} ({exc.strerror or type(exc).__name__}); check the path and its permissions")


def load_json(path: str | os.PathLike):
    """The whole JSON document of a (small or medium) file, plain or gzip; TraceError when unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        with no_gc():
            return orjson.loads(data)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise gzip_problem(path, exc) from None
    except orjson.JSONDecodeError as exc:
        raise TraceError(f"{path} cannot be read as JSON ({exc.msg} at byte {exc.pos}); pass a Chrome trace written "
                         "by torch.profiler or moe-trace") from None
    except OSError as exc:
        raise os_problem(path, exc) from None


class Source:
    """Decompressed chunks of a file (gzip is inflated in a helper thread), with an optional progress bar."""

    def __init__(self, path: Path, progress: bool | None = False, chunk: int = CHUNK):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.gz = self.size >= 2 and is_gzip(self.path)
        self.chunk = chunk
        self.bytes_out = 0
        self._bar = None
        if progress is None:
            progress = self._estimate() > PROGRESS_BYTES
        if progress:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.size, unit="B", unit_scale=True, desc=f"reading {self.path.name}",
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
                data = fh.read(self.chunk)
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
                        data = gz.read(self.chunk)
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
                elif isinstance(val, (EOFError, gzip.BadGzipFile, zlib.error)) or \
                        (isinstance(val, OSError) and val.errno is None):
                    raise gzip_problem(self.path, val)
                else:
                    raise val
        finally:
            stop.set()


def peek_header(path: str | os.PathLike, limit: int = MAX_HEADER) -> bytes | None:
    """The decompressed bytes up to and including `"traceEvents": [` (where Kineto, torch.profiler's
    add_metadata_json and moe-trace put their metadata keys), or None when that key is not within
    `limit` bytes. Raises TraceError when the file cannot be read."""
    src = Source(Path(path), False, chunk=min(CHUNK, max(64 << 10, limit)))
    buf = b""
    it = src.chunks()
    try:
        for data in it:
            start = max(0, len(buf) - 32)
            buf += data
            m = TE_KEY.search(buf, start)
            if m:
                return buf[:m.end()]
            if len(buf) > limit:
                return None
        return None
    except OSError as exc:
        raise os_problem(path, exc) from None
    finally:
        it.close()
        src.close()


_T = TypeVar("_T")


def write_under_free_name(run_id: str, write: Callable[[str], _T], where: str | os.PathLike,
                          error: type[Exception] = TraceError) -> _T:
    """`write(tag)` with tag = `run_id`, then `{run_id}-1`, `{run_id}-2`, ... while it raises
    FileExistsError (an `atomic_write(..., overwrite=False)` inside), so no run replaces another's file."""
    for k in range(1000):
        try:
            return write(run_id if k == 0 else f"{run_id}-{k}")
        except FileExistsError:
            continue
    raise error(f"cannot find a free file name for run {run_id} in {where}; clean up the logdir")


def atomic_write(out: str | os.PathLike, parts: Iterable[bytes], *, gz: bool | None = None,
                 compresslevel: int = 3, overwrite: bool = True) -> Path:
    """Write `parts` to `out` through a temporary file in the same directory, then rename it into place
    (readers never see half a file). `gz`: gzip (default: when the name ends in .gz). `overwrite=False`:
    never replace an existing file; a TraceError with errno EEXIST semantics (`FileExistsError` inside)
    is raised instead, so the caller can pick another name."""
    out = Path(out)
    gz = out.name.endswith(".gz") if gz is None else gz
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TraceError(f"cannot create the directory {out.parent} ({exc.strerror or exc}); pass a writable "
                         "directory") from None
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            sink = ParallelGzip(fh, compresslevel) if gz else fh
            try:
                for p in parts:
                    sink.write(p)
                if sink is not fh:
                    sink.close()
            finally:
                if sink is not fh:
                    sink.abort()
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)  # fails with EEXIST instead of replacing
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if out.exists():  # no hard links on this file system: check, then rename
                    raise FileExistsError(str(out)) from None
                os.replace(tmp, out)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(str(out)) from None
        raise TraceError(f"cannot write {out} ({exc.strerror or exc}); pass a writable path with free space") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return out


GZ_BLOCK = 1 << 20
_WINDOW = 1 << 15  # deflate's window: each block is primed with the previous block's last 32 KB


def _deflate_block(block: bytes, level: int, primer: bytes, last: bool) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, **({"zdict": primer} if primer else {}))
    return c.compress(block) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class _Block:
    """One block's deflate, done by a helper thread (`ParallelGzip`)."""
    __slots__ = ("args", "out", "exc", "done")

    def __init__(self, *args):
        self.args, self.out, self.exc, self.done = args, None, None, threading.Event()

    def run(self) -> None:
        try:
            self.out = _deflate_block(*self.args)
        except BaseException as exc:  # noqa: BLE001 - raised by result() in the writer's thread
            self.exc = exc
        finally:
            self.args = None
            self.done.set()

    def result(self) -> bytes:
        self.done.wait()
        if self.exc is not None:
            raise self.exc
        return self.out


def _deflate_loop(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        job.run()


class ParallelGzip:
    """A gzip writer with `gzip.GzipFile(filename="", mode="wb", mtime=0)`'s format (one member) whose
    deflate runs in helper threads, `GZ_BLOCK` bytes at a time, as pigz does: each block is a raw deflate
    stream primed with the previous block's last 32 KB and ended by a sync flush, so the blocks join into
    one stream. zlib releases the GIL while it deflates, so compressing overlaps the caller's work (and
    runs on several cores). The bytes written depend only on the data and the level, never on how the
    caller splits its writes or on the thread count. A short output (one block) is deflated inline at
    `close()`; `abort()` drops what is pending (after an error). Its threads are plain ones, not a
    `concurrent.futures` pool, which refuses work once the interpreter has begun to exit (when a
    background trace writer may still be going)."""

    def __init__(self, fh, compresslevel: int = 3, threads: int | None = None):
        self._fh, self._level = fh, compresslevel
        if threads is None:  # up to 4, within this rank's share of the node's cores
            from .workers import _cores_per_rank

            threads = min(4, _cores_per_rank())
        self._threads = max(1, threads)
        self._buf = bytearray()
        self._crc = self._size = 0
        self._primer = b""
        self._pending: collections.deque = collections.deque()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._helpers: list[threading.Thread] = []
        xfl = 2 if compresslevel == 9 else 4 if compresslevel == 1 else 0  # as gzip.GzipFile writes it
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes((xfl, 255)))

    def write(self, data) -> int:
        n = len(data)
        self._crc = zlib.crc32(data, self._crc)
        self._size += n
        view = memoryview(data).cast("B")
        if self._buf:
            take = GZ_BLOCK - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < GZ_BLOCK:
                return n
            self._submit(bytes(self._buf))
            self._buf = bytearray()
        while len(view) >= GZ_BLOCK:
            self._submit(bytes(view[:GZ_BLOCK]))
            view = view[GZ_BLOCK:]
        self._buf += view
        return n

    def _submit(self, block: bytes) -> None:
        if len(self._helpers) < self._threads and len(self._pending) >= len(self._helpers):
            t = threading.Thread(target=_deflate_loop, args=(self._jobs,), name="moe-trace-gzip", daemon=True)
            t.start()
            self._helpers.append(t)
        job = _Block(block, self._level, self._primer, False)
        self._primer = block[-_WINDOW:]
        self._pending.append(job)
        self._jobs.put(job)
        while self._pending and (len(self._pending) > 2 * self._threads or self._pending[0].done.is_set()):
            self._fh.write(self._pending.popleft().result())  # in order; at most 2 blocks a thread held

    def close(self) -> None:
        """Deflate the rest, write it and the trailer (CRC-32, size) and stop the threads."""
        last = _deflate_block(bytes(self._buf), self._level, self._primer, True)
        self._buf = bytearray()
        while self._pending:
            self._fh.write(self._pending.popleft().result())
        self._fh.write(last + struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
        self.abort()

    def abort(self) -> None:
        """Stop the helper threads (after the blocks they hold); what is not written is dropped."""
        for _ in self._helpers:
            self._jobs.put(None)
        for t in self._helpers:
            t.join()
        self._helpers.clear()
        self._pending.clear()


class Uncached:
    """A file object for writing a large output without keeping it in the page cache (like `dd
    oflag=nocache`): every `every` bytes a helper thread makes what was written so far durable
    (`fdatasync`, overlapping the caller's work) and drops it from the cache. Writing GBs then reuses a
    few MB of cache pages instead of taking new ones (on the CI VM new pages cost the kernel up to
    ~3 ms of CPU per MB written) and leaves the user's cache alone. `close()` waits for the helper
    (call it before the file is closed). Where `posix_fadvise` is missing: a plain pass-through."""

    def __init__(self, fh, every: int = 32 << 20):
        self._fh, self._every = fh, every
        self._fd = fh.fileno() if hasattr(os, "posix_fadvise") else None
        self._pos = self._mark = 0
        self._helper: threading.Thread | None = None

    def write(self, data) -> int:
        n = self._fh.write(data)
        self._pos += len(data)
        if (self._fd is not None and self._pos - self._mark >= self._every
                and (self._helper is None or not self._helper.is_alive())):
            self._fh.flush()
            self._mark = self._pos
            self._helper = threading.Thread(target=self._drop, args=(self._fd, self._pos), daemon=True)
            self._helper.start()
        return n

    def _drop(self, fd: int, upto: int) -> None:
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, upto, os.POSIX_FADV_DONTNEED)
        except OSError:  # a file system without them: just write
            self._fd = None

    def close(self) -> None:
        if self._helper is not None:
            self._helper.join()
            self._helper = None


MAX_DEPTH = 128
_ESC = re.compile(rb"\\.", re.S)


class NestingGuard:
    """Rejects JSON nested deeper than `max_depth` (a trace needs < 20 levels), in time linear in the
    bytes fed: strings are masked out (escapes first), then brackets are counted with numpy. Without
    it a file of nested brackets costs the ijson fallback quadratic time."""

    def __init__(self, path, max_depth: int = MAX_DEPTH):
        self.path, self.max_depth = path, max_depth
        self.depth = 0
        self.in_str = 0
        self._carry = b""

    def feed(self, data: bytes) -> None:
        import numpy as np

        if self._carry:
            data, self._carry = self._carry + data, b""
        if data.endswith(b"\\"):
            n = len(data) - len(data.rstrip(b"\\"))
            if n % 2:  # the escaped byte comes with the next chunk
                data, self._carry = data[:-1], b"\\"
        if b"\\" in data:
            data = _ESC.sub(b"", data)
        a = np.frombuffer(data, np.uint8)
        if not a.size:
            return
        quotes = np.cumsum(a == 34, dtype=np.int32)
        brackets = np.flatnonzero(((a == 91) | (a == 123) | (a == 93) | (a == 125)) & ((quotes + self.in_str) & 1 == 0))
        self.in_str = int((int(quotes[-1]) + self.in_str) & 1)
        if not brackets.size:
            return
        b = a[brackets]
        depth = self.depth + np.cumsum(np.where((b == 91) | (b == 123), 1, -1), dtype=np.int64)
        if int(depth.max()) > self.max_depth:
            raise TraceError(f"{self.path} nests JSON arrays/objects more than {self.max_depth} levels deep (a trace "
                             "needs fewer than 20); it is not a trace written by torch.profiler or moe-trace")
        self.depth = int(depth[-1])


def head_meta(head: bytes) -> dict:
    """The top-level keys before `traceEvents` in `head` (the bytes up to `"traceEvents": [`), or {}."""
    m = TE_KEY.search(head)
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
