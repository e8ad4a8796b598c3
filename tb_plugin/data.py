"""Runs under a log dir, their reports, and a cache that reloads when trace files change.

No TensorBoard import here, so this module is usable (and testable) on its own.

A *run* is a directory under the log dir that holds `*.pt.trace.json[.gz]` files (what
`moe_trace.profile(mode="kineto", logdir=...)` writes). Its name is its path relative to the log
dir with `/` separators, `"."` for the log dir itself. Run names from requests are never joined to
the file system: they are looked up in the set of discovered runs, so nothing outside the log dir
can be reached by a request.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

from moe_trace.trace.format import META_KEY, TRACE_FILE_RE as TRACE_RE  # noqa: E402
from moe_trace.trace.io import peek_header  # noqa: E402
MAX_RUN_NAME = 1024
MAX_DIRS_SCANNED = 20_000

Provider = Callable[[str], dict]


class RunNameError(ValueError):
    """A run name that is malformed or would point outside the log dir (HTTP 400)."""


class UnknownRunError(KeyError):
    """A well-formed run name that is not a run under the log dir (HTTP 404)."""


# -- the data provider ------------------------------------------------------------------------

def default_provider(run_dir: str, files: list[str] | None = None) -> dict:
    """The report of one run, as `Report.to_dict()` plus `"step_timeline"` (per process: the recorded
    steps with their per-layer counters, see docs/trace-format.md; the store serves it next to the
    report, as `/report`'s `step_timeline`).

    `files`: the run's trace files (the store passes them, checked to lie inside the log dir); by
    default the trace files directly in `run_dir` that are not symlinks to elsewhere. A sub-directory
    with traces is a run of its own (as TensorBoard treats run directories).
    """
    from moe_trace.trace.reader import read_trace, runs_of
    from moe_trace.trace.runs import run_report, select_run

    if files is None:
        root = os.path.realpath(run_dir)
        files = [os.path.join(run_dir, n) for n in sorted(os.listdir(run_dir))
                 if TRACE_RE.search(n) and _inside(os.path.realpath(os.path.join(run_dir, n)), root)]
    datas = [read_trace(f, progress=False) for f in files]
    run = select_run(runs_of(datas, run_dir), None, run_dir)
    out = run_report(run).to_dict()
    out = dict(out, step_timeline=[{"file": os.path.basename(str(d.path)), "rank": d.rank,
                                    "steps": d.step_timeline()} for d in run.files if not d.merged])
    return out


_provider: Provider = default_provider


def set_provider(fn: Provider | None) -> None:
    """Replace how a run directory becomes a report dict (tests); `None` restores the default."""
    global _provider
    _provider = fn or default_provider


def get_provider() -> Provider:
    return _provider


# -- run names --------------------------------------------------------------------------------

def check_run_name(name: Any) -> str:
    """Return `name` if it is a well-formed run name, else raise RunNameError.

    Run names are looked up in the set of discovered runs and never joined to the file system, so
    any name a directory can have is served (backslashes, newlines, `~`, `@`, ...); rejected are only
    names no scan can produce: not a string, empty, too long, a NUL, absolute, or with empty, `.` or
    `..` components."""
    if not isinstance(name, str) or not name:
        raise RunNameError("missing run name")
    if len(name) > MAX_RUN_NAME:
        raise RunNameError("run name too long")
    if "\x00" in name:
        raise RunNameError("run name has forbidden characters")
    if name.startswith("/"):
        raise RunNameError("run name must be relative to the log dir")
    if name != ".":
        parts = name.split("@", 1)[0].split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise RunNameError("run name must not contain empty, '.' or '..' components")
    return name


HEADER_PEEK_BYTES = 4 << 20
_MOE_RE = re.compile(rb'"' + META_KEY.encode() + rb'"\s*:')


def peek_moe_key(path: str) -> bool | None:
    """Whether the trace's top-level keys before `traceEvents` include `moe_trace` (how moe-trace and
    torch.profiler's add_metadata_json write them): True / False, or None when the head cannot be read
    or has no `traceEvents` within 4 MiB (then only a full read can tell)."""
    try:
        head = peek_header(path, HEADER_PEEK_BYTES)
    except Exception:  # unreadable, corrupt gzip: only a full read can say what is wrong
        return None
    return None if head is None else bool(_MOE_RE.search(head))


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


# -- the store ----------------------------------------------------------------------------------

@dataclass
class _Entry:
    signature: tuple
    report: dict | None = None
    error: str | None = None
    body: bytes = b""
    body_gz: bytes = b""
    loaded_at: float = 0.0
    load_s: float = 0.0
    timeline: list | None = None  # per process: the recorded steps with their per-layer counters


@dataclass
class _Run:
    name: str
    path: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    entry: _Entry | None = None
    kind: tuple | None = None  # (signature, "moe" | "plain" | "unknown")
    files: tuple[str, ...] | None = None  # names of its files in `path`; None: every trace file there
    alias: bool = False  # a directory's own name when it holds several runs: the newest (not listed)


class RunStore:
    """Discovers runs under `logdir` and caches one report per run, keyed by its files' mtime/size."""

    def __init__(self, logdir: str | None, provider: Provider | None = None, scan_ttl_s: float = 2.0,
                 max_parallel_loads: int = 2):
        self.logdir = os.path.realpath(os.path.expanduser(logdir)) if logdir else None
        self._provider = provider
        self._scan_ttl_s = scan_ttl_s
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._scanned_at = -math.inf
        self._load_slots = threading.BoundedSemaphore(max_parallel_loads)
        self._heads: dict[str, tuple] = {}
        self.unreadable: list[str] = []

    # discovery -------------------------------------------------------------------------------
    def _trace_files(self, path: str, names: tuple[str, ...] | None = None) -> list[os.DirEntry]:
        """The trace files directly in `path` (only `names` when given) that are regular files inside
        the log dir (a symlink must resolve inside it; FIFOs, sockets, directories are skipped)."""
        out = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    if names is not None and e.name not in names:
                        continue
                    try:
                        if not (TRACE_RE.search(e.name) and e.is_file()):
                            continue
                        if not _inside(os.path.realpath(e.path), self.logdir):
                            continue
                    except OSError:
                        continue
                    out.append(e)
        except OSError:
            return []
        return sorted(out, key=lambda e: e.name)

    def _head(self, e: os.DirEntry) -> tuple:
        """(group key, label, started, kind) of one trace file from its header, cached by mtime/size."""
        try:
            st = e.stat()
        except OSError:
            return (("unreadable", e.name), _safe_label(e.name), 0.0, "unknown")
        sig = (st.st_mtime_ns, st.st_size)
        hit = self._heads.get(e.path)
        if hit is not None and hit[0] == sig:
            return hit[1]
        try:
            head = peek_header(e.path, HEADER_PEEK_BYTES)
        except Exception:  # unreadable or corrupt: a run of its own, whose load says what is wrong
            head = None
        info: tuple
        if head is None:
            info = (("unknown", e.name), _safe_label(e.name), st.st_mtime, "unknown")
        else:
            from moe_trace.trace.io import head_meta
            from moe_trace.trace.runs import run_key

            meta = head_meta(head)
            kl = run_key(meta, e.path) if meta or not _MOE_RE.search(head) else None
            if kl is None:
                kind = "moe" if _MOE_RE.search(head) else "plain"
                info = (("plain",) if kind == "plain" else ("unknown", e.name), "plain" if kind == "plain"
                        else _safe_label(e.name), st.st_mtime, kind)
            else:
                mt = meta.get(META_KEY) if isinstance(meta.get(META_KEY), dict) else {}
                t = mt.get("started_at")
                started = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else st.st_mtime
                info = (kl[0], _safe_label(kl[1]), started, "moe")
        if len(self._heads) > 100_000:
            self._heads.clear()
        self._heads[e.path] = (sig, info)
        return info

    def _dir_runs(self, name: str, dirpath: str, found: dict) -> None:
        """The runs of one directory: its own name when it holds one run, else `{name}@{run label}`
        for each (and `name` as an unlisted alias of the newest)."""
        entries = self._trace_files(dirpath)
        if not entries:  # only links to elsewhere, FIFOs, dangling links: nothing to read here
            return
        groups: dict[tuple, list] = {}
        for e in entries:
            key, label, started, _kind = self._head(e)
            g = groups.setdefault(key, [label, 0.0, []])
            g[1] = max(g[1], started)
            g[2].append(e.name)
        moe = {k: g for k, g in groups.items() if k != ("plain",)}
        if len(moe) <= 1:
            found[name] = (dirpath, None, False)
            return
        if ("plain",) in groups:  # plain torch.profiler files next to several runs: listed as plain
            moe[("plain",)] = groups[("plain",)]
        from moe_trace.trace.runs import unique_labels

        keys = list(moe)
        labels = unique_labels([moe[k][0] for k in keys], ["" for _ in keys])
        newest = max(keys, key=lambda k: (moe[k][1] if k != ("plain",) else -1.0))
        for k, label in zip(keys, labels):
            sub = f"{name}@{label}" if name != "." else f"@{label}"
            found[sub] = (dirpath, tuple(moe[k][2]), False)
        found[name] = (dirpath, tuple(moe[newest][2]), True)

    def _scan(self) -> dict[str, tuple]:
        found: dict[str, tuple] = {}
        self.unreadable = []
        if not self.logdir or not os.path.isdir(self.logdir):
            return found
        n = 0

        def onerror(exc: OSError) -> None:
            rel = os.path.relpath(exc.filename, self.logdir) if exc.filename else "?"
            self.unreadable.append(rel)
            logger.warning("moe_trace plugin: cannot read %s under the log dir (%s); its runs are not listed",
                           rel, exc.strerror or type(exc).__name__)

        for dirpath, dirnames, filenames in os.walk(self.logdir, followlinks=False, onerror=onerror):
            n += 1
            if n > MAX_DIRS_SCANNED:
                logger.warning("moe_trace plugin: stopped scanning %s after %d dirs", self.logdir, n)
                break
            dirnames.sort()
            if any(TRACE_RE.search(f) for f in filenames):
                rel = os.path.relpath(dirpath, self.logdir)
                name = "." if rel == "." else rel.replace(os.sep, "/")
                self._dir_runs(name, dirpath, found)
        return found

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._scanned_at < self._scan_ttl_s:
            return
        with self._scan_lock:
            if not force and time.monotonic() - self._scanned_at < self._scan_ttl_s:
                return
            found = self._scan()
            with self._lock:
                for name in list(self._runs):
                    if name not in found:
                        del self._runs[name]
                for name, (path, files, alias) in found.items():
                    run = self._runs.get(name)
                    if run is None or run.path != path or run.files != files or run.alias != alias:
                        self._runs[name] = _Run(name, path, files=files, alias=alias)
            self._scanned_at = time.monotonic()

    def has_runs(self) -> bool:
        """Cheap: true once any trace file is found (cached for `scan_ttl_s`)."""
        self.refresh()
        return bool(self._runs)

    def run_names(self) -> list[str]:
        """The listed runs (a directory that holds several runs lists each, not the directory)."""
        self.refresh()
        with self._lock:
            return sorted(n for n, r in self._runs.items() if not r.alias)

    def _get_run(self, name: Any) -> _Run:
        name = check_run_name(name)
        run = self._runs.get(name)
        if run is None:
            self.refresh(force=True)
            run = self._runs.get(name)
        if run is None:
            raise UnknownRunError(name)
        real = os.path.realpath(run.path)
        if not self.logdir or not _inside(real, self.logdir):
            raise RunNameError("run is outside the log dir")
        return run

    def run_dir(self, name: Any) -> str:
        return self._get_run(name).path

    # listing ---------------------------------------------------------------------------------
    def signature(self, run: _Run) -> tuple:
        sig = []
        for e in self._trace_files(run.path, run.files):
            try:
                st = e.stat()
            except OSError:
                continue
            sig.append((e.name, st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def _kind(self, run: _Run, sig: tuple) -> str:
        """"moe" (some file has the moe_trace key), "plain" (none has) or "unknown" (cached per signature)."""
        if run.kind is not None and run.kind[0] == sig:
            return run.kind[1]
        seen = [peek_moe_key(os.path.join(run.path, f[0])) for f in sig]
        kind = "moe" if any(v is True for v in seen) else ("plain" if seen and all(v is False for v in seen) else "unknown")
        run.kind = (sig, kind)
        return kind

    def list_runs(self, include_plain: bool = False) -> list[dict[str, Any]]:
        """Runs with their files' count, size and mtime; plain torch.profiler runs (no moe_trace key in
        any file) are left out unless `include_plain`."""
        out = []
        for name in self.run_names():
            run = self._runs.get(name)
            if run is None:
                continue
            sig = self.signature(run)
            kind = self._kind(run, sig)
            if kind == "plain" and not include_plain:
                continue
            item: dict[str, Any] = {
                "name": name,
                "files": len(sig),
                "bytes": sum(s[2] for s in sig),
                "mtime": max((s[1] for s in sig), default=0) / 1e9,
                "status": "unloaded",
                "kind": kind,
            }
            e = run.entry
            if e is not None and e.signature == sig:
                item["status"] = "error" if e.error else "ok"
                if e.error:
                    item["error"] = e.error
                elif e.report:
                    m = e.report.get("model", {})
                    item["model"] = m.get("name") or m.get("family")
            out.append(item)
        return out

    def warm_up(self, max_runs: int = 4) -> threading.Thread:
        """Load the newest `max_runs` moe runs in a background thread (imports and parsing happen
        before the dashboard asks for them)."""
        def work():
            try:
                runs = sorted((r for r in self.list_runs() if r["kind"] != "plain"), key=lambda r: -r["mtime"])
                for r in runs[:max_runs]:
                    self.get(r["name"])
            except Exception:  # warm-up is best effort
                logger.debug("moe_trace plugin: warm-up failed", exc_info=True)

        t = threading.Thread(target=work, name="moe_trace-warmup", daemon=True)
        t.start()
        return t

    # reports ---------------------------------------------------------------------------------
    def get(self, name: Any) -> _Entry:
        """The (cached) report entry of run `name`; loads or reloads it when its files changed."""
        run = self._get_run(name)
        sig = self.signature(run)
        e = run.entry
        if e is not None and e.signature == sig:
            return e
        with run.lock:  # one load per run; concurrent requests for it wait here
            sig = self.signature(run)
            e = run.entry
            if e is not None and e.signature == sig:
                return e
            with self._load_slots:
                e = self._load(run, sig)
            run.entry = e
            return e

    def _load(self, run: _Run, sig: tuple) -> _Entry:
        t0 = time.perf_counter()
        e = _Entry(signature=sig, loaded_at=time.time())
        provider = self._provider or get_provider()
        if not sig:
            e.error = "no *.pt.trace.json[.gz] files in this run"
        else:
            try:
                if _takes_files(provider):  # the checked files only: nothing outside the log dir
                    report = provider(run.path, files=[os.path.join(run.path, f[0]) for f in sig])
                else:  # a provider of the older one-argument kind
                    report = provider(run.path)
                if not isinstance(report, dict):
                    raise TypeError(f"provider returned {type(report).__name__}, not a dict")
                timeline = report.pop("step_timeline", None) if "step_timeline" in report else None
                e.report = report
                e.timeline = timeline
            except Exception as exc:  # a bad or half-written trace must not break the plugin
                logger.info("moe_trace plugin: run %r failed to load", run.name, exc_info=True)
                e.error = _describe(exc)
                if self.logdir:  # show paths relative to the log dir, not the server's file system
                    e.error = e.error.replace(self.logdir + os.sep, "")
        payload = {"run": run.name, "error": e.error} if e.error else {"run": run.name, "report": e.report}
        if not e.error and e.timeline is not None:
            payload["step_timeline"] = e.timeline
        e.body = dumps(payload)
        e.body_gz = gzip.compress(e.body, compresslevel=3, mtime=0)
        e.load_s = time.perf_counter() - t0
        return e


def trace_download(store: "RunStore", name: Any, file: Any) -> tuple[str, str]:
    """(path, file name) of one trace file of run `name` for download (Perfetto): `file` must be one of
    the files the store lists for that run (names, never joined paths), a regular file inside the log
    dir. RunNameError / UnknownRunError otherwise."""
    run = store._get_run(name)
    if not isinstance(file, str) or not file:
        raise RunNameError("missing trace file name")
    names = {e.name: e.path for e in store._trace_files(run.path, run.files)}
    if file not in names:
        raise UnknownRunError(file)
    path = names[file]
    if not store.logdir or not _inside(os.path.realpath(path), store.logdir):
        raise RunNameError("trace file is outside the log dir")
    return path, file


def _describe(exc: BaseException) -> str:
    """The error text a client sees: moe-trace's own one-sentence messages (they name the file and the
    problem, never its bytes); anything else only by its type (details go to the server log)."""
    try:
        from moe_trace.errors import MoeTraceError
    except ImportError:  # pragma: no cover
        MoeTraceError = ()  # type: ignore[assignment]
    if isinstance(exc, MoeTraceError):
        msg = str(exc).strip() or exc.__class__.__name__
        return f"{exc.__class__.__name__}: {msg}"[:2000]
    if isinstance(exc, (json.JSONDecodeError, EOFError, gzip.BadGzipFile, UnicodeError)) or "JSON" in type(exc).__name__:
        return f"{exc.__class__.__name__}: unreadable trace (bad or half-written file?)"
    return f"{exc.__class__.__name__}: the run could not be loaded (details in the TensorBoard log)"


def _takes_files(fn: Callable) -> bool:
    import inspect

    try:
        return "files" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _safe_label(x: Any) -> str:
    """A run label for a TensorBoard run name: file-name safe characters only (ids come from files)."""
    out = re.sub(r"[^A-Za-z0-9_.:+-]", "_", str(x))[:96]
    return out if out.strip(".") else "_" + out


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars/arrays -> Python, unknown -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist())
    return str(obj)


def dumps(obj: Any) -> bytes:
    try:
        import orjson

        return orjson.dumps(obj, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    except ImportError:  # pragma: no cover - orjson is a dependency
        return json.dumps(_clean(obj), allow_nan=False, separators=(",", ":")).encode()
    except TypeError:
        return json.dumps(_clean(obj), allow_nan=False, separators=(",", ":")).encode()
