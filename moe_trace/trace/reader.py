"""Streaming reader of Kineto / moe-trace Chrome traces (`.json` or `.json.gz`): the public API.

Never loads a whole file: bytes come in 4 MiB chunks from `io.Source` (gzip inflated in a helper
thread) and memory stays flat whatever the file size. The parts, one job each (docs/design.md):

* `fastpath`   regular expressions over newline-separated events (Kineto's and moe-trace's layout)
* `ijson_path` any other layout and every malformed file, streamed by ijson (C backend)
* `aggregate`  running totals of the events both parsers hand over
* `metadata`   checks of the `moe_trace` key (every damage is one TraceError)
* `build`      TraceData from the totals and the checked metadata
* `runs`       grouping files into runs and one run's files into a Report

Public: `read_trace(path) -> TraceData`, `read_traces(path) -> list[TraceData]`,
`analyze(path) -> Report`. Numbers and design notes: docs/analyze.md.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from moe_trace.analysis import Report
from moe_trace.analysis.report import check_ep_size
from moe_trace.errors import ConfigError, TraceError

from . import fastpath, ijson_path
from .aggregate import Aggregate, BadEvent
from .pending import wait_for
from .build import build
from .format import TRACE_FILE_RE
from .io import Source, head_meta, os_problem, peek_header
from .result import PlainTraceSummary, TraceData
from .runs import Run, check_moe, group_runs, run_report, select_run

__all__ = ["read_trace", "read_traces", "trace_files", "read_metadata", "analyze", "report_of", "reports_of",
           "runs_of", "TraceData", "PlainTraceSummary", "Run"]


def read_trace(path: str | os.PathLike, *, progress: bool | None = None) -> TraceData:
    """Stream one trace file. `progress`: tqdm bar on stderr (default: files over 50 MB)."""
    path = _as_path(path)
    if not path.exists():
        raise TraceError(f"trace file {path} does not exist; pass a .pt.trace.json[.gz] file or the logdir "
                         "that moe_trace.profile(mode='kineto') wrote")
    if path.is_dir():
        raise TraceError(f"{path} is a directory; read_trace takes one file (use analyze() or read_traces() "
                         "for a directory)")
    t0 = time.perf_counter()
    agg = Aggregate()
    src = None
    try:
        src = Source(path, progress)
        try:
            meta = fastpath.parse(src, agg)
            parser = "fast"
        except fastpath.Fallback:
            agg = Aggregate()
            src.close()
            src = Source(path, progress)
            meta = ijson_path.parse(src, agg)
            parser = "ijson"
    except OSError as exc:  # permissions, I/O errors, a vanished file
        raise os_problem(path, exc) from None
    except BadEvent as exc:
        raise TraceError(f"{path} is damaged: {exc}; pass a trace written by torch.profiler or moe-trace") from None
    except RecursionError:
        raise TraceError(f"{path} nests JSON too deeply to be a trace; pass a trace written by torch.profiler "
                         "or moe-trace") from None
    finally:
        if src is not None:
            src.close()
    return build(path, meta, agg, parser, src.bytes_out, time.perf_counter() - t0)


def _as_path(path) -> Path:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"a trace path must be a str or os.PathLike, got {type(path).__name__}; pass a "
                          ".pt.trace.json[.gz] file or the logdir of moe_trace.profile(mode='kineto')")
    if str(path) == "":
        raise ConfigError("the trace path is empty; pass a .pt.trace.json[.gz] file or a logdir ('.' for the "
                          "current directory)")
    return Path(path)


def read_traces(path: str | os.PathLike, *, progress: bool | None = None) -> list[TraceData]:
    """A trace file, or every `*.pt.trace.json[.gz]` under a directory (recursively), read."""
    return [read_trace(p, progress=progress) for p in trace_files(path)]


def trace_files(path: str | os.PathLike, *, warn: bool = True) -> list[Path]:
    """`path` itself, or the trace files under the directory `path` (recursively, not following links to
    directories). Subdirectories that cannot be listed are named in a warning. Waits first for the
    traces this process is still writing there (kineto mode writes in the background)."""
    path = _as_path(path)
    wait_for(path)
    if not path.exists():
        raise TraceError(f"{path} does not exist; pass a .pt.trace.json[.gz] file or the logdir that "
                         "moe_trace.profile(mode='kineto') wrote")
    if path.is_file():
        return [path]
    unreadable: list[str] = []
    files: list[Path] = []
    for dirpath, _dirs, names in os.walk(path, onerror=lambda e: unreadable.append(e.filename or str(e))):
        for n in names:
            if TRACE_FILE_RE.search(n):
                p = Path(dirpath) / n
                if p.is_file():
                    files.append(p)
                elif not p.exists() and not p.is_symlink():
                    continue
                else:
                    unreadable.append(str(p))
    files.sort()
    if unreadable and warn:
        warnings.warn(f"skipped {len(unreadable)} unreadable director{'y' if len(unreadable) == 1 else 'ies'} or "
                      f"file(s) under {path}: " + ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
                      + " (check their permissions)", stacklevel=2)
    if not files:
        raise TraceError(f"no *.pt.trace.json or *.pt.trace.json.gz files under {path}; point to the logdir "
                         "of moe_trace.profile(mode='kineto', logdir=...) or to one trace file")
    return files


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level keys before `traceEvents` (Kineto and moe-trace put their metadata there), cheaply."""
    try:
        head = peek_header(path)
    except OSError as exc:
        raise os_problem(path, exc) from None
    return head_meta(head) if head else {}


def analyze(path: str | os.PathLike, *, progress: bool | None = None, ep_size: int | None = None,
            run: str | None = None, all_runs: bool = False) -> Report | dict[str, Report]:
    """Report of a trace file or of a directory of them (one RunData per process, ordered by rank).

    A directory with several runs: the newest is reported and a warning names the others; `run` picks
    one by id (or a unique prefix), `all_runs=True` returns `{run id: Report}` for every run, newest
    first. `ep_size`: also report the load per expert-parallel rank for that many ranks (see Report)."""
    check_ep_size(ep_size)  # before reading: a bad argument fails in a second
    if run is not None and (all_runs or not isinstance(run, str) or not run):
        from moe_trace.errors import ConfigError

        raise ConfigError("pass either run='<run id>' (a non-empty string) or all_runs=True, not both"
                          if all_runs else f"run must be a run id string, got {run!r}")
    datas = read_traces(path, progress=progress)
    if all_runs:
        return reports_of(datas, path, ep_size=ep_size)
    return report_of(datas, path, ep_size=ep_size, run=run)


def runs_of(datas: list[TraceData], path: str | os.PathLike = "") -> list[Run]:
    """The runs among read traces, newest first (TraceError when none has moe-trace metadata)."""
    check_moe(datas, path)
    return group_runs(datas)


def report_of(datas: list[TraceData], path: str | os.PathLike = "", ep_size: int | None = None,
              run: str | None = None) -> Report:
    """The Report of one run among read traces: `run` (an id), else the newest (a warning names the others)."""
    return run_report(select_run(runs_of(datas, path), run, path), ep_size=ep_size)


def reports_of(datas: list[TraceData], path: str | os.PathLike = "", ep_size: int | None = None) -> dict[str, Report]:
    """`{run id: Report}` for every run among read traces, newest first."""
    return {r.id: run_report(r, ep_size=ep_size) for r in runs_of(datas, path)}
