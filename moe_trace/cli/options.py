"""What every sub-command shares: the help formatter (defaults shown) and checks made before any work."""
from __future__ import annotations

import argparse

from moe_trace.errors import ConfigError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help text (unless the text already names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def check_device(device: str | None, option: str = "--device") -> None:
    """One clear error for a device this machine does not have (before loading anything)."""
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{option} {device}: not a device name ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {device}: CUDA is not available on this machine; use {option} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta") and not getattr(torch, dev.type, None):
        raise ConfigError(f"{option} {device}: device type {dev.type} is not available here")


def check_out_dir(path: str | None, option: str = "--out") -> None:
    """An output directory that cannot be created (it, or a folder above it, is a file): one error, early."""
    if not path:
        return
    from pathlib import Path

    p = Path(path)
    for q in [p, *p.parents]:
        if q.exists():
            if not q.is_dir():
                where = "is a file" if q == p else f"is under {q}, which is a file"
                raise ConfigError(f"{option} {path} {where}; give a directory")
            return
