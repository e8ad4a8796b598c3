"""Exceptions raised by moe-trace. Each message names the problem and the fix."""


class MoeTraceError(Exception):
    """Base class of every error moe-trace raises on purpose."""


class NoMoELayersError(MoeTraceError):
    """The model has no module that looks like an MoE layer."""


class UnknownArchitectureError(MoeTraceError):
    """Something looks like an MoE layer but no handler understands it."""


class ProfileStateError(MoeTraceError):
    """`profile` used wrongly: nested or concurrent on one model, report before exit, ..."""


class ConfigError(MoeTraceError):
    """A bad argument: unknown mode, selector, knob value, ..."""


class TraceError(MoeTraceError):
    """A trace file or log directory that cannot be read (missing, empty, truncated, not a trace)."""


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of `exc`'s message, for quoting inside a one-line error: parsers such as
    yajl (ijson) append the offending bytes on later lines, and those never belong in a message."""
    arg = exc.args[0] if len(exc.args) == 1 else str(exc)
    if isinstance(arg, (bytes, bytearray)):
        arg = bytes(arg).decode("utf-8", "replace")
    text = str(arg).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= limit else line[:limit - 3] + "..."


class UnsupportedTransformersError(MoeTraceError):
    """The installed transformers is outside the supported range (or too old for one family)."""
