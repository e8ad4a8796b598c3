"""Worker processes for the slim export's passes over a large raw Kineto file, and the `Follower`.

The passes (export.py) cost Python per event and each region of whole events is independent of the
others. So on a machine with cores to spare the parent reads the regions as before and hands them, in
turn, to `python -c <bootstrap>` subprocesses (fresh interpreters that import only this package's
trace modules: no torch, no CUDA, the user's `__main__` is never re-run), and takes their results back
in region order: the same events, the same order, the same bytes as the serial passes. Any problem with
a worker (it cannot start, dies, answers nonsense) makes the caller run the serial pass instead; a
layout the fast path does not know raises `Fallback` as it does serially. A `Follower` is one (or, on
a machine with many cores, two) such workers that run pass 1 on the raw file while torch's save is still
writing it (docs/trace-format.md, "Pass 1 while torch writes the file").

How many: `MOE_TRACE_EXPORT_WORKERS` (0 = never), else up to 8, one per spare core (the cores this
process may run on, divided among the ranks of a torchrun job on the node, less one for the parent),
and no more than fit in a fifth of the raw file's size (`WORKER_SHARE`) at `WORKER_BYTES` each (a worker's peak RSS is
~60 MB; the serial export's own peak is ~0.7x the raw file): from a 640 MB raw file on. Memory and
speed, measured: docs/benchmarks.md ("export worker processes").

Wire format, both ways: an 12-byte header (JSON length, blob length), a JSON object, a byte blob.
"""
from __future__ import annotations

import contextlib
import os
import select
import struct
import subprocess
import sys
import threading
import time
from array import array
from itertools import accumulate, chain
from pathlib import Path
from queue import Queue
from typing import Iterator

import orjson

MAX_WORKERS = 8
#: a worker's peak RSS, rounded up (measured ~60 MB on a 150 MB H200 trace); the workers together may
#: add at most WORKER_SHARE of the raw file's size to the export's peak (the parent takes ~0.7x, the
#: follower ~25 MB: the process tree stays within the raw file's size; docs/benchmarks.md)
WORKER_BYTES = 64 << 20
WORKER_SHARE = 0.2
#: seconds a worker may take to start (it says "ready") and to answer one region
START_TIMEOUT = 20.0
ANSWER_TIMEOUT = 300.0
#: cores per rank from which a `Follower` runs by default: it is one more process (20 MB idle, 25 MB at
#: its peak with the slim passes' 256 KB regions, docs/benchmarks.md) that pays off only where a core is
#: idle during the save
FOLLOW_CORES = 4
_HEAD = struct.Struct(">IQ")


class WorkerFailed(Exception):
    """A worker could not do its part: the caller runs the serial pass."""


def _env_workers() -> int | None:
    """`MOE_TRACE_EXPORT_WORKERS` as a number (an unreadable value: 0), or None when unset."""
    env = os.environ.get("MOE_TRACE_EXPORT_WORKERS", "").strip()
    if not env:
        return None
    try:
        return max(0, int(env))
    except ValueError:
        return 0


def _cores_per_rank() -> int:
    """The cores this process may run on, divided among the torchrun ranks of the node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return cpus // ranks


def export_workers(size: int) -> int:
    """How many worker processes a slim pass over a raw file of `size` bytes uses (0: serial)."""
    env = _env_workers()
    if env is not None:
        return env
    n = min(MAX_WORKERS, _cores_per_rank() - 1, int(size * WORKER_SHARE // WORKER_BYTES))
    return n if n >= 2 else 0


def follow_enabled() -> bool:
    """Whether a `Follower` runs pass 1 during the save: unless worker processes are switched off
    (`MOE_TRACE_EXPORT_WORKERS=0`), when FOLLOW_CORES or more cores are there per rank (or when
    `MOE_TRACE_EXPORT_WORKERS` asks for workers)."""
    env = _env_workers()
    return env > 0 if env is not None else _cores_per_rank() >= FOLLOW_CORES


def follow_parts() -> int:
    """How many processes a `Follower` uses: 2 from 2 x FOLLOW_CORES cores per rank on (one core's
    pass 1 can be slower than Kineto's save: docs/benchmarks.md), else 1."""
    return 2 if _cores_per_rank() >= 2 * FOLLOW_CORES else 1


def workers_for(path: Path) -> "Workers | None":
    try:
        n = export_workers(Path(path).stat().st_size)
    except OSError:
        return None
    return Workers(n) if n else None


def _send(fh, head: dict, blob: bytes = b"") -> None:
    h = orjson.dumps(head)
    for part in (_HEAD.pack(len(h), len(blob)), h, blob):
        view = memoryview(part)
        while view:  # the parent's pipes are unbuffered: a write may take only part
            n = fh.write(view)
            view = view[n:] if n is not None else view[len(view):]
    fh.flush()


def _read_exact(fh, n: int) -> bytes:
    parts, left = [], n
    while left:
        got = fh.read(left)
        if not got:
            raise EOFError
        parts.append(got)
        left -= len(got)
    return b"".join(parts)


def _recv(fh, timeout: float | None = None) -> tuple[dict, bytes] | None:
    """One message, or None at a clean end of the stream. With `timeout`, `fh` is an unbuffered pipe
    (no bytes wait in a Python buffer that `select` cannot see)."""
    if timeout is not None and not select.select([fh], [], [], timeout)[0]:
        raise TimeoutError
    first = fh.read(_HEAD.size)
    if not first:
        return None
    raw = first + (_read_exact(fh, _HEAD.size - len(first)) if len(first) < _HEAD.size else b"")
    hl, bl = _HEAD.unpack(raw)
    h = _read_exact(fh, hl)
    blob = _read_exact(fh, bl) if bl else b""
    return orjson.loads(h), blob


#: a worker imports only the trace modules it runs (export, fastpath, io, format, errors): package stubs
#: stand in for `moe_trace` and `moe_trace.trace`, whose __init__ would import numpy and the analysis
#: (a worker is then ~13 MB instead of ~35 MB)
_BOOT = """
import sys, types
root = sys.argv[1]
for name, sub in (("moe_trace", "/moe_trace"), ("moe_trace.trace", "/moe_trace/trace")):
    m = types.ModuleType(name)
    m.__path__ = [root + sub]
    sys.modules[name] = m
from moe_trace.trace.workers import _serve
_serve()
"""


class Workers:
    """A few worker subprocesses; `read_selected` / `resolve_slim` run export's passes through them."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []
        self._waiting = False  # spawned, "ready" not yet read

    def spawn(self) -> "Workers":
        """Start the processes without waiting for them (`__enter__` waits until each is ready)."""
        if self.procs:
            return self
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", _BOOT, root], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=root, close_fds=True, bufsize=0))
            self._waiting = True
        except OSError:
            self.close()
        return self

    def __enter__(self) -> "Workers":
        self.spawn()
        if self._waiting:
            self._waiting = False
            try:
                for p in self.procs:  # each says it is ready: a python that cannot run us never hangs the export
                    got = _recv(p.stdout, START_TIMEOUT)
                    if not got or got[0].get("ready") != 1:
                        raise EOFError
            except (OSError, EOFError, ValueError):
                self.close()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the pipes (each worker then exits); they are reaped in a daemon thread, not waited for."""
        procs, self.procs = self.procs, []
        for p in procs:
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        if procs:
            threading.Thread(target=_reap, args=(procs,), name="moe-trace-export-reap", daemon=True).start()

    def _map(self, tasks: Iterator[tuple[dict, bytes]]) -> Iterator[tuple[dict, bytes]]:
        """Results of `tasks` in order, task i done by worker i mod n. A feeder thread writes the tasks
        (and runs the iterator, i.e. reads the file) while this thread reads the results in order; each
        worker answers its tasks in the order it got them, so this never deadlocks."""
        if len(self.procs) != self.n:
            raise WorkerFailed
        sent: Queue = Queue()
        problem: list[BaseException] = []

        def feed():
            try:
                for i, (head, blob) in enumerate(tasks):
                    _send(self.procs[i % self.n].stdin, head, blob)
                    sent.put(i)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
                problem.append(exc)
            finally:
                sent.put(None)

        t = threading.Thread(target=feed, name="moe-trace-export-feed", daemon=True)
        t.start()
        procs = list(self.procs)
        done = False
        try:
            while True:
                i = sent.get()
                if i is None:
                    break
                try:
                    got = _recv(procs[i % self.n].stdout, ANSWER_TIMEOUT)
                except (OSError, EOFError, ValueError):  # TimeoutError is an OSError
                    got = None
                if got is None or "error" in got[0]:
                    raise WorkerFailed
                yield got
            done = not problem
        finally:
            if not done:  # answers may be left in the pipes (or the feeder blocked on them): never reuse
                self.close()
            t.join()
        if problem:
            if isinstance(problem[0], (OSError, ValueError)):  # a pipe closed under the feeder (Fallback is neither)
                raise WorkerFailed
            raise problem[0]

    def _regions(self, path: Path, meta: dict, starts: list | None = None) -> Iterator[bytes]:
        from .fastpath import regions_of
        from .io import SLIM_CHUNK, Source

        src = Source(path, chunk=SLIM_CHUNK)
        regions = regions_of(src, starts if not src.gz else None)
        meta["head"] = next(regions)
        for region in regions:
            if isinstance(region, dict):
                meta["tail"] = region
            else:
                yield region

    def read_selected(self, path: Path):
        """export.read_selected(path, slim=True) through the workers; None when they failed."""
        meta: dict = {"tail": {}}
        events: list = []
        index: list = []
        starts: list[int] = []  # each region's offset, known before the region is sent
        try:
            for n, (res, blob) in enumerate(self._map(({"op": "pass1", "base": 0}, r)
                                                      for r in self._regions(path, meta, starts))):
                _take_pass1(res, blob, n, events, index, starts[n] if starts else -1)
        except (WorkerFailed, ValueError):  # ValueError: a HostIndex of the wrong size
            return None
        return meta["head"], events, meta["tail"], index

    def resolve_slim(self, path: Path, want: dict, corr: set, ext: set, index: list, parsed: dict, links: list) -> bool:
        """The per-region part of export.resolve_slim through the workers (fills `parsed` and `links`);
        False when they failed. Raises Fallback as the serial pass does."""
        from .fastpath import Fallback

        if len(self.procs) != self.n:
            return False
        sets = orjson.dumps({"corr": [str(c) for c in corr], "ext": [str(x) for x in ext]})  # ints of any size
        stubs_of: list = []

        def tasks():
            for n, region in enumerate(self._regions(path, {})):
                stubs = want.pop(n, None) or []
                stubs_of.append(stubs)
                if n >= len(index):
                    raise Fallback
                yield {"op": "pass2", "stubs": [(w.index, w.get("ts"), w.cat) for w in stubs],
                       "region_bytes": len(region)}, region + index[n].to_bytes()

        try:
            for p in self.procs:  # the workers are idle (pass 1 is done): this cannot block on an answer
                _send(p.stdin, {"op": "sets"}, sets)
        except (OSError, ValueError):
            self.close()
            return False
        try:
            for n, (res, blob) in enumerate(self._map(tasks())):
                if res.get("fallback"):
                    raise Fallback
                lens = res.get("kept")
                if not isinstance(lens, list) or len(lens) != len(stubs_of[n]) or sum(lens) > len(blob):
                    raise WorkerFailed
                at = 0
                for w, k in zip(stubs_of[n], lens):
                    parsed[id(w)] = blob[at:at + k]
                    at += k
                stubs_of[n] = None
                if at < len(blob):
                    links.append(blob[at:])
        except WorkerFailed:
            return False
        if want:
            raise Fallback
        return True


def _take_pass1(res: dict, blob: bytes, n: int, events: list, index: list, base: int | None = None) -> None:
    """Add a worker's pass-1 answer for region `n` (`_pass1_reply`) to `events` and `index`. `base`: the
    region's offset in the file, for a worker that saw the region only (its index's spans are from 0)."""
    from .export import HostIndex, decode_heads, stubbed
    from .fastpath import Fallback

    if res.get("fallback"):
        raise Fallback
    lens, evs = res.get("bytes"), res.get("events")
    if not (isinstance(lens, list) and len(lens) == 4 and all(type(x) is int and x >= 0 for x in lens)
            and sum(lens) <= len(blob) and isinstance(evs, list)):
        raise WorkerFailed
    h, i, g, d = lens
    heads = decode_heads(blob[:h])
    ix = HostIndex.from_bytes(blob[h:h + i])
    gpu = _ints(blob[h + i:h + i + g])  # (position in evs, index in the region) of each GPU event
    pos, at = gpu[0::2], gpu[1::2]
    if len(gpu) != 2 * len(heads) or (heads and (min(pos) < 0 or max(pos) >= len(evs))):
        raise WorkerFailed
    if base is not None:
        ix.base = base if base >= 0 and ix.base >= 0 else -1
    index.append(ix)
    done = None
    if res.get("done"):  # the serialized GPU events (a follower's), one after another
        sizes = _ints(blob[h + i + g:h + i + g + d])
        if len(sizes) != len(heads) or (heads and min(sizes) <= 0) or sum(lens) + sum(sizes) != len(blob):
            raise WorkerFailed
        k = sum(lens)
        done = [blob[a:a + m] for a, m in zip(accumulate(sizes, initial=k), sizes)]
    events.extend(stubbed(evs, list(zip(pos, at)), heads, n, done))


def _ints(blob: bytes) -> array:
    a = array("q")
    a.frombytes(blob)  # ValueError for a length that is no multiple of 8: a worker's nonsense
    return a


def _pass1_reply(region: bytes, serialize: bool = False, base: int = -1) -> tuple[dict, bytes]:
    """A worker's answer for one region: the parsed events in the head, the GPU events' heads (JSON),
    the region's `HostIndex`, their places and (`serialize`) sizes as int64 arrays, then their bytes."""
    from .export import encode_heads, pass1_region

    evs, gpu, heads, index, done = pass1_region(region, serialize, base)
    parts = [encode_heads(heads), index.to_bytes(), array("q", chain.from_iterable(gpu)).tobytes(),
             array("q", map(len, done)).tobytes() if done is not None else b""]
    head = {"events": evs, "bytes": [len(p) for p in parts], "done": done is not None}
    return head, b"".join(parts + (done or []))


class Follower:
    """Slim pass 1 on a raw trace WHILE the profiler writes it: a worker process reads the file as it
    grows (Kineto's `export_chrome_trace` writes `<path>.tmp` in order, then renames it to `<path>`;
    the C++ save holds the GIL, so the parent could not read it meanwhile). `start` before the save,
    `finish` after it: pass 1's answer, as `export.read_selected` gives it, or None when the worker
    failed (the caller then reads the file itself; the raw file is the profiler's own, untouched). The
    worker keeps its answers in `<path>.pass1` until the save is over (removed by `finish`).

    `parts` > 1 worker processes share the work: each reads every byte (the same regions) and runs pass 1
    on every `parts`-th region (worker i on regions i, i + parts, ...; answers in `<path>.pass1.{i}`), so
    the follower keeps up with a save faster than one core's pass 1 (`follow_parts`)."""

    def __init__(self, path: Path, parts: int = 1):
        self.path = Path(path)
        self.parts = max(1, parts)
        self.pool = Workers(self.parts)
        self.done_at: float | None = None  # `time.perf_counter()` when the worker had done its last region

    def spawn(self) -> "Follower":
        """Start the worker process now (e.g. before the profiler's stop, which its start-up then overlaps);
        `start` later."""
        self.pool.spawn()
        return self

    def start(self) -> "Follower | None":
        self.pool.__enter__()
        if len(self.pool.procs) != self.parts:
            return None
        try:
            for i, p in enumerate(self.pool.procs):
                _send(p.stdin, {"op": "follow", "paths": [str(self.path) + ".tmp", str(self.path)], "part": i,
                                "parts": self.parts})
        except (OSError, ValueError):
            self.pool.close()
            return None
        return self

    def close(self) -> None:
        self.pool.close()

    def finish(self, saved: bool = True):
        """(head, events, tail, HostIndex per region) of the saved file, or None."""
        from .fastpath import Fallback

        spills = [Path(_spill(self.path, i, self.parts)) for i in range(self.parts)]
        try:
            if not saved or len(self.pool.procs) != self.parts:
                return None
            try:
                size = self.path.stat().st_size
                for p in self.pool.procs:
                    _send(p.stdin, {"op": "done", "size": size})
                got = [_recv(p.stdout, ANSWER_TIMEOUT) for p in self.pool.procs]
                if not all(g and isinstance(g[0].get("regions"), int) and isinstance(g[0].get("head"), dict)
                           for g in got):
                    return None
                first = got[0][0]
                if any((g[0]["regions"], g[0]["head"], g[0].get("tail")) != (first["regions"], first["head"],
                                                                             first.get("tail")) for g in got) \
                        or [g[0].get("answers") for g in got] != list(map(str, spills)):
                    return None  # every part saw the same file, each kept its own answers
                head, tail, events, index = first["head"], first.get("tail") or {}, [], []
                at = [g[0].get("at") for g in got]
                self.done_at = max(at) if all(isinstance(a, float) for a in at) else None
                with contextlib.ExitStack() as files:
                    fhs = [files.enter_context(open(sp, "rb")) for sp in spills]
                    for n in range(first["regions"]):  # region n is in part n mod parts, in order
                        ans = _recv(fhs[n % self.parts])
                        if ans is None:
                            return None
                        _take_pass1(*ans, n, events, index)
            except (OSError, EOFError, ValueError, WorkerFailed, Fallback):
                return None  # the caller's own pass 1 gives the precise answer (or the Fallback) again
            return head, events, tail, index
        finally:
            self.close()
            for sp in spills:
                sp.unlink(missing_ok=True)


class _GrowingFile:
    """`io.Source`'s chunks of a file another process is still writing: the same chunks (`CHUNK` bytes
    each from offset 0, so the same regions as a later `Source` of the whole file), each given once it
    is complete; the parent's "done" message (read by `_wait`) gives the finished file's size."""

    def __init__(self, fh, inp):
        self.fh, self.inp = fh, inp
        self.final: int | None = None

    def _wait(self) -> None:
        """Until the writer's "done" arrives or ~5 ms pass."""
        if self.final is None and select.select([self.inp], [], [], 0.005)[0]:
            got = _recv(self.inp)
            if got is None or got[0].get("op") != "done" or not isinstance(got[0].get("size"), int):
                raise EOFError
            self.final = got[0]["size"]

    def chunks(self) -> Iterator[bytes]:
        from .io import SLIM_CHUNK

        pos = 0
        while True:
            if self.final is None and os.fstat(self.fh.fileno()).st_size - pos < SLIM_CHUNK:
                self._wait()
                continue
            data = self.fh.read(SLIM_CHUNK)
            if not data:
                if self.final is not None and pos != self.final:
                    raise EOFError  # the file is not the size the writer saw
                return
            pos += len(data)
            yield data


def _spill(raw, part: int, parts: int) -> str:
    """Where follower process `part` of `parts` keeps its answers for the raw file `raw`."""
    return f"{raw}.pass1" + (f".{part}" if parts > 1 else "")


def _follow(paths: list[str], inp, out, part: int = 0, parts: int = 1) -> None:
    """The worker's side of `Follower`: open the file being written (`paths`: the temporary name, then
    the final one) and run pass 1 on each region as it completes, from the first byte (on regions `part`,
    `part + parts`, ... of them); the answers are sent after the writer's "done"."""
    from .fastpath import regions_of

    src = _GrowingFile(None, inp)
    while src.fh is None:
        for name in paths if src.final is None else paths[-1:]:
            try:
                src.fh = open(name, "rb")
                break
            except OSError:
                if src.final is not None:
                    raise
        if src.fh is None:
            src._wait()
    spill = _spill(paths[-1], part, parts)  # the answers wait on disk, not in this process (its peak stays small)
    with src.fh, open(spill, "wb") as keep:
        starts: list[int] = []
        regions = regions_of(src, starts)
        head = next(regions)
        tail: dict = {}
        n = 0
        for region in regions:
            if isinstance(region, dict):
                tail = region
            else:
                if n % parts == part:
                    _send(keep, *_pass1_reply(region, serialize=True, base=starts[n]))
                n += 1
    _send(out, {"regions": n, "head": head, "tail": tail, "answers": spill, "at": time.perf_counter()})


def _reap(procs: list) -> None:
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _serve() -> None:
    """The worker's loop: one task in, one answer out, until its stdin closes."""
    from .export import HostIndex, pass2_region
    from .fastpath import Fallback
    from .io import no_gc

    # stdin unbuffered: a follower selects on it, and a Python buffer could hide a message from select
    inp, out = sys.stdin.buffer.raw, sys.stdout.buffer
    _send(out, {"ready": 1})
    corr: set = set()
    ext: set = set()
    with no_gc():
        while True:
            got = _recv(inp)
            if got is None:
                return
            head, blob = got
            got = None
            try:
                if head.get("op") == "pass1":  # base 0: spans from the region's start (the parent knows where it is)
                    _send(out, *_pass1_reply(blob, base=0 if head.get("base") == 0 else -1))
                elif head.get("op") == "follow":  # one task for the worker's life: then it exits
                    _follow(head["paths"], inp, out, int(head.get("part", 0)), int(head.get("parts", 1)))
                    return
                elif head.get("op") == "sets":  # before a worker's first pass-2 region; no answer
                    sets = orjson.loads(blob)
                    del blob
                    corr, ext = {int(c) for c in sets["corr"]}, {int(x) for x in sets["ext"]}
                    continue
                elif head.get("op") == "pass2":
                    at = head["region_bytes"]
                    kept, links = pass2_region(blob[:at], [tuple(s) for s in head["stubs"]], corr, ext,
                                               HostIndex.from_bytes(blob[at:]))
                    _send(out, {"kept": [len(k) for k in kept]}, b"".join(kept) + links)
                else:
                    _send(out, {"error": "unknown op"})
            except Fallback:
                _send(out, {"fallback": True})
            except Exception as exc:  # noqa: BLE001 - the parent runs the serial pass
                _send(out, {"error": type(exc).__name__})


if __name__ == "__main__":
    _serve()
