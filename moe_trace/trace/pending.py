"""Trace files still being written by this process (kineto mode writes them in a background thread).

`register(logdir, wait)` is called by the writer's owner (capture's `KinetoRecorder`); `wait_for(path)`
makes every reader in this process (`trace_files`, hence `analyze`, `read_traces`, `merge_traces`)
wait for the writers whose logdir is `path`, inside it or around it, so a file that `profile()` is
still writing is never missed or read half-done. A writer's error is raised by `wait`.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

_lock = threading.Lock()
_pending: dict[int, tuple[Path, Callable[[], object]]] = {}


def _norm(p: str | os.PathLike) -> Path:
    try:
        return Path(p).resolve()
    except OSError:
        return Path(os.path.abspath(p))


def register(logdir: str | os.PathLike, wait: Callable[[], object]) -> int:
    """Announce a writer for `logdir`; returns a token for `done`."""
    token = id(wait)
    with _lock:
        _pending[token] = (_norm(logdir), wait)
    return token


def done(token: int) -> None:
    with _lock:
        _pending.pop(token, None)


def wait_for(path: str | os.PathLike | None = None) -> None:
    """Wait for the writers whose logdir is related to `path` (all of them when None)."""
    target = None if path is None else _norm(path)
    with _lock:
        todo = list(_pending.values())
    for logdir, wait in todo:
        if target is None or target == logdir or logdir in target.parents or target in logdir.parents:
            wait()
