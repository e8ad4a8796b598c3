"""Checks of values a user types (output paths, devices), run before the work starts.

Each raises `ConfigError` with one sentence naming the value and the fix, so that a CLI command
or an API call fails in a second, not after minutes of profiling. No dependencies beyond the
standard library (torch is imported only by `device`).
"""
from __future__ import annotations

import os
from pathlib import Path

from moe_trace.errors import ConfigError


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def _check_parents(p: Path, what: str) -> None:
    """The nearest existing ancestor of `p` must be a directory we may create entries in."""
    base = _nearest_existing(p.parent if p.parent != Path("") else Path("."))
    if not base.is_dir():
        raise ConfigError(f"{what} {p}: {base} is a file, not a directory; pass a path inside a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {p}: cannot write in {base} (permission denied); pass a writable path")


def _as_path(path, what: str) -> Path:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}")
    if str(path) == "":
        raise ConfigError(f"{what} is empty; pass a path")
    return Path(path)


def output_file(path, what: str = "output file") -> Path:
    """`path` as a Path if a file can be written there: not a directory, and the nearest existing
    ancestor a writable directory (missing parents are created when writing)."""
    p = _as_path(path, what)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory; pass a file name (a path inside it, for example)")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {p} is not writable (permission denied); pass another path")
    _check_parents(p, what)
    return p


def output_dir(path, what: str = "output directory") -> Path:
    """`path` as a Path if a directory can be created or written there."""
    p = _as_path(path, what)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {p} is a file, not a directory; pass a directory (it is created if missing)")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {p} is not writable (permission denied); pass a writable directory")
        return p
    _check_parents(p, what)
    return p


def device(spec, what: str = "--device"):
    """`torch.device(spec)` if it names a device this machine has (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what} {spec!r} is not a device; use cpu, cuda, cuda:1, ...") from None
    if dev.type in ("cpu", "meta"):
        return dev
    mod = getattr(torch, dev.type, None)
    available = getattr(mod, "is_available", None)
    if available is None or not available():
        raise ConfigError(f"{what} {spec}: {dev.type.upper()} is not available on this machine; use --device cpu")
    count = getattr(mod, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ConfigError(f"{what} {spec}: this machine has {count()} {dev.type} device(s) "
                          f"(indices 0..{count() - 1})")
    return dev


__all__ = ["output_file", "output_dir", "device"]
