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
