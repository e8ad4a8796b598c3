"""Runs under a log dir, their reports, and a cache that reloads when their files change.

No TensorBoard import here, so this module is usable (and testable) on its own.

A *run* is what moe-trace wrote under the log dir:

* a directory's `*.pt.trace.json[.gz]` files of one `profile()` run (kineto mode; the richest source:
  report, step timeline, downloads);
* a report JSON (`schema` `moe-trace/report/N`: `moe-trace demo` / `run` / `analyze --json`,
  `Report.to_json`) of a stats or timing run. One whose `run_id` is the run id of traces in the same
  directory is that run's copy and is not listed again (the traces are the richer source);
* a sweep result (`moe-trace/sweep/N`, `moe-trace sweep --out`) and a comparison
  (`moe-trace/compare/N`, `moe-trace compare --json`).

JSON files are recognised by their first key (`{"schema": "moe-trace/..."`, how moe-trace writes
them), read from a checked regular file inside the log dir, at most `MAX_JSON_BYTES`.

A run's name is its directory relative to the log dir with `/` separators (`"."` for the log dir
itself); a directory with several runs lists each as `{dir}@{label}`. Run names from requests are
never joined to the file system: they are looked up in the set of discovered runs, so nothing
outside the log dir can be reached by a request.
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
MAX_JSON_BYTES = 256 << 20   # a report / sweep / compare JSON larger than this is an error, not read
JSON_HEAD_BYTES = 64 << 10
#: schema prefix of a moe-trace JSON document -> the run kind it makes
JSON_KINDS = {"moe-trace/report/": "report", "moe-trace/sweep/": "sweep", "moe-trace/compare/": "compare"}
_JSON_HEAD_RE = re.compile(rb'\A\s*\{\s*"schema"\s*:\s*"(moe-trace/(?:report|sweep|compare)/)[0-9]+"')
# a report's second key is its run id (Report.to_dict order)
_REPORT_ID_RE = re.compile(rb'\A\s*\{\s*"schema"\s*:\s*"moe-trace/report/[0-9]+"\s*,\s*"run_id"\s*:\s*'
                           rb'"([A-Za-z0-9_.:+\-]{1,200})"')


def is_json_candidate(name: str) -> bool:
    """A file name that may hold a moe-trace report / sweep / compare JSON (trace files are not)."""
    return name.endswith(".json") and not TRACE_RE.search(name)


def peek_json_kind(path: str) -> tuple[str, str | None] | None:
    """(kind, report run id or None) of a moe-trace JSON document from its first bytes, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(JSON_HEAD_BYTES)
    except OSError:
        return None
    m = _JSON_HEAD_RE.match(head)
    if not m:
        return None
    kind = JSON_KINDS[m.group(1).decode()]
    rid = None
    if kind == "report":
        r = _REPORT_ID_RE.match(head)
        rid = r.group(1).decode() if r else None
    return kind, rid

Provider = Callable[[str], dict]


class RunNameError(ValueError):
    """A run name that is malformed or would point outside the log dir (HTTP 400)."""


class UnknownRunError(KeyError):
    """A well-formed run name that is not a run under the log dir (HTTP 404)."""


# -- the data provider ------------------------------------------------------------------------

def default_provider(run_dir: str, files: list[str] | None = None) -> dict:
    """The report of one run, as `Report.to_dict()` plus `"step_timeline"` (per process: the recorded
    steps with their per-layer counters and the GPU / host time of their router / experts / shared
    ranges, see docs/trace-format.md; `gpu_ranges` False for a CPU trace, whose steps have `gpu_ms`
    None; the store serves it next to the report, as `/report`'s `step_timeline`).

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
                                    "gpu_ranges": d.has_gpu_ranges(),
                                    "unattributed_gpu_ms": (d.step_gpu_unattributed_ms or [None])[0],
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
    source: str = "trace"  # "trace" (trace files) or a JSON kind: "report" | "sweep" | "compare"


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
    def _trace_files(self, path: str, names: tuple[str, ...] | None = None,
                     want: Callable[[str], bool] | None = None) -> list[os.DirEntry]:
        """The trace files directly in `path` (only `names` when given; `want` picks other file names)
        that are regular files inside the log dir (a symlink must resolve inside it; FIFOs, sockets,
        directories are skipped)."""
        want = want or (lambda n: bool(TRACE_RE.search(n)))
        out = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    if names is not None and e.name not in names:
                        continue
                    try:
                        if not (want(e.name) and e.is_file()):
                            continue
                        if not _inside(os.path.realpath(e.path), self.logdir):
                            continue
                    except OSError:
                        continue
                    out.append(e)
        except OSError:
            return []
        return sorted(out, key=lambda e: e.name)

    def run_files(self, run: "_Run") -> list[os.DirEntry]:
        """The checked files of a run: its trace files, or its JSON document."""
        if run.source == "trace":
            return self._trace_files(run.path, run.files)
        return self._trace_files(run.path, run.files, want=is_json_candidate)

    def _json_head(self, e: os.DirEntry) -> tuple[str, str | None] | None:
        """`peek_json_kind` of a JSON file, cached by mtime/size."""
        try:
            st = e.stat()
        except OSError:
            return None
        sig = ("json", st.st_mtime_ns, st.st_size)
        hit = self._heads.get(e.path)
        if hit is not None and hit[0] == sig:
            return hit[1]
        info = peek_json_kind(e.path)
        if len(self._heads) > 100_000:
            self._heads.clear()
        self._heads[e.path] = (sig, info)
        return info

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
        for each (and `name` as an unlisted alias of the newest: its newest trace run if it has one).

        Runs are the trace files grouped by run, then the moe-trace JSON documents: a report whose
        run id is the id of traces here is their copy and is left out (the traces say more)."""
        entries = self._trace_files(dirpath)
        units: list[tuple] = []  # (group key, label, started, file names, source)
        trace_ids = set()
        if entries:
            groups: dict[tuple, list] = {}
            for e in entries:
                key, label, started, _kind = self._head(e)
                g = groups.setdefault(key, [label, 0.0, []])
                g[1] = max(g[1], started)
                g[2].append(e.name)
                if key[0] == "run" and len(key) > 1:
                    trace_ids.add(key[1])
            moe = {k: g for k, g in groups.items() if k != ("plain",)}
            for k, g in moe.items():
                units.append((k, g[0], g[1], tuple(g[2]), "trace"))
            plain = groups.get(("plain",))
        else:
            plain = None
        reports: dict[str, tuple] = {}
        for e in self._trace_files(dirpath, want=is_json_candidate):
            info = self._json_head(e)
            if info is None:
                continue
            kind, rid = info
            try:
                mtime = e.stat().st_mtime
            except OSError:
                continue
            if kind == "report" and rid is not None:
                if rid in trace_ids:
                    continue  # the same run's traces are listed: they are the richer source
                old = reports.get(rid)
                if old is None or mtime > old[2]:  # copies of one report: one run, the newest file
                    reports[rid] = (("json", rid), _safe_label(rid), mtime, (e.name,), kind)
                continue
            stem = e.name[:-len(".json")]
            units.append((("json", e.name), _safe_label(stem), mtime, (e.name,), kind))
        units.extend(reports.values())
        if not units:
            if plain is not None:  # only plain torch.profiler traces: listed as plain
                found[name] = (dirpath, None, False, "trace")
            return
        if len(units) == 1 and plain is None:
            k, _label, _t, files, source = units[0]
            found[name] = (dirpath, None if source == "trace" else files, False, source)
            return
        if len(units) == 1 and units[0][4] == "trace":  # one run next to plain files (as before)
            found[name] = (dirpath, None, False, "trace")
            return
        if plain is not None:  # plain torch.profiler files next to several runs: listed as plain
            units.append((("plain",), "plain", -1.0, tuple(plain[2]), "trace"))
        from moe_trace.trace.runs import unique_labels

        labels = unique_labels([u[1] for u in units], ["" for _ in units])
        traced = [u for u in units if u[4] == "trace" and u[0] != ("plain",)]
        newest = max(traced or units, key=lambda u: u[2])
        for u, label in zip(units, labels):
            sub = f"{name}@{label}" if name != "." else f"@{label}"
            found[sub] = (dirpath, u[3], False, u[4])
        found[name] = (dirpath, newest[3], True, newest[4])

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
            if any(TRACE_RE.search(f) or is_json_candidate(f) for f in filenames):
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
                for name, (path, files, alias, source) in found.items():
                    run = self._runs.get(name)
                    if run is None or run.path != path or run.files != files or run.alias != alias \
                            or run.source != source:
                        self._runs[name] = _Run(name, path, files=files, alias=alias, source=source)
            self._scanned_at = time.monotonic()

    def has_runs(self) -> bool:
        """Cheap: true once any trace file or moe-trace JSON document is found (cached for `scan_ttl_s`)."""
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
        for e in self.run_files(run):
            try:
                st = e.stat()
            except OSError:
                continue
            sig.append((e.name, st.st_mtime_ns, st.st_size))
        return tuple(sig)

    def _kind(self, run: _Run, sig: tuple) -> str:
        """"moe" (some file has the moe_trace key), "plain" (none has) or "unknown" (cached per signature)."""
        if run.source != "trace":
            return run.source
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
            e.error = "no *.pt.trace.json[.gz] files in this run" if run.source == "trace" else \
                "the run's JSON file is gone"
        else:
            try:
                if run.source != "trace":  # a report / sweep / compare JSON document
                    report = load_json_run(os.path.join(run.path, sig[0][0]), run.source, sig[0][0])
                elif _takes_files(provider):  # the checked files only: nothing outside the log dir
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
        if e.error:
            payload = {"run": run.name, "error": e.error}
        elif run.source in ("sweep", "compare"):  # not a Report: served under its own key
            payload = {"run": run.name, "kind": run.source, run.source: e.report,
                       "source": {"kind": run.source, "file": sig[0][0]}}
        else:
            payload = {"run": run.name, "kind": "moe" if run.source == "trace" else "report", "report": e.report}
            if run.source == "report":
                payload["source"] = {"kind": "report", "file": sig[0][0]}
        if not e.error and e.timeline is not None:
            payload["step_timeline"] = e.timeline
        e.body = dumps(payload)
        e.body_gz = gzip.compress(e.body, compresslevel=3, mtime=0)
        e.load_s = time.perf_counter() - t0
        return e


def _json_error(rel: str, what: str) -> Exception:
    from moe_trace.errors import TraceError

    return TraceError(f"{rel} {what}; write it again with moe-trace (report.to_json, moe-trace sweep --out, "
                      "moe-trace compare --json)")


#: what a document of each kind must hold (key -> type) for the dashboard to draw it
_JSON_NEEDS = {"report": {"model": dict, "phases": dict, "layers": list},
               "sweep": {"experiment": dict, "summary": list},
               "compare": {"configs": list, "rows": list}}


def load_json_run(path: str, kind: str, rel: str) -> dict:
    """The document of a report / sweep / compare run, checked: a regular file of at most
    MAX_JSON_BYTES, strict JSON, an object whose `schema` is of `kind` and which has the keys the
    dashboard draws. Errors are one TraceError naming `rel` (never the file's bytes)."""
    import orjson

    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not _stat_is_file(st):
                raise _json_error(rel, "is not a regular file")
            if st.st_size > MAX_JSON_BYTES:
                raise _json_error(rel, f"is {st.st_size / 2**20:.0f} MiB, over the {MAX_JSON_BYTES >> 20} MiB the "
                                       "dashboard reads")
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise _json_error(rel, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # NaN / Infinity (a sweep's statistics of one sample) are not strict JSON; Python reads them
            doc = json.loads(raw)
        except RecursionError:
            raise _json_error(rel, "nests JSON too deeply to be a moe-trace document") from None
        except ValueError:
            raise _json_error(rel, "is not valid JSON (a half-written or damaged file?)") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    prefix = next((p for p, k in JSON_KINDS.items() if k == kind), "")
    if not isinstance(schema, str) or not schema.startswith(prefix):
        raise _json_error(rel, f"is not a moe-trace {kind} document (its schema is not {prefix}N)")
    for key, typ in _JSON_NEEDS[kind].items():
        if not isinstance(doc.get(key), typ):
            raise _json_error(rel, f"has no {key!r} {'object' if typ is dict else 'list'}")
    return doc


def _stat_is_file(st) -> bool:
    import stat

    return stat.S_ISREG(st.st_mode)


def trace_download(store: "RunStore", name: Any, file: Any) -> tuple[str, str]:
    """(path, file name) of one file of run `name` for download (a trace for Perfetto, or the run's
    JSON document): `file` must be one of the files the store lists for that run (names, never joined
    paths), a regular file inside the log dir. RunNameError / UnknownRunError otherwise."""
    run = store._get_run(name)
    if not isinstance(file, str) or not file:
        raise RunNameError("missing trace file name")
    names = {e.name: e.path for e in store.run_files(run)}
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
