"""`ProfileOptions`: every argument of `moe_trace.profile(model, mode, **options)`, checked once.

`profile()` builds one of these (unknown keywords are a `ConfigError`), and the session reads it;
nothing else in capture looks at keyword arguments.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from moe_trace.checks import output_dir
from moe_trace.errors import ConfigError

MODES = ("stats", "timing", "kineto")
DEFAULT_LOGDIR = Path("runs") / "moe_trace"


@dataclass
class ProfileOptions:
    """Options of one profiling session (docs/capture.md lists them with examples).

    mode: "stats" (routing counters on the device), "timing" (+ CUDA-event timing of router /
        experts / shared per layer and phase), "kineto" (+ torch.profiler traces with MoE counters).
    logdir: where kineto traces go (default ``runs/moe_trace``). In stats / timing mode a given
        logdir gets the run's report (``{worker}.{run_id}.report.json``, listed by TensorBoard's MoE
        tab); without one nothing is written.
    selector: a dynamic-k selector (name like "cumsum:0.8", a `moe_trace.selectors.Selector` or a
        callable probs -> k) applied to every MoE layer; changes what the model computes.
    router_middleware: a callable ``(scores, weights, indices) -> (weights, indices)`` (e.g.
        `moe_trace.selectors.selector_middleware(...)`); exclusive with `selector`.
    observers: objects following `moe_trace.capture.observers` (phase / step / routing callbacks).
    log_router_logits: a path, True, a dict of options or a `RouterLogger` (docs/routing.md).
    schedule: a `torch.profiler.schedule` callable or its keyword arguments as a dict (kineto).
    slim: slim traces (kineto; docs/trace-format.md).
    record_shapes, with_stack: passed to torch.profiler (kineto).
    cuda_events: CUDA-event timing; default on in "timing" mode only.
    profiler: your running `torch.profiler.profile`: moe-trace attaches to it (its ranges, per-step
        counters and metadata go into the files your `on_trace_ready` writes) instead of starting
        one; implies mode="kineto". A profiler already running when the block starts is attached to
        in kineto mode without this argument too.
    """

    mode: str = "stats"
    logdir: str | os.PathLike | None = None
    selector: Any = None
    router_middleware: Callable | None = None
    observers: list = field(default_factory=list)
    log_router_logits: Any = None
    schedule: Callable | dict | None = None
    slim: bool = True
    record_shapes: bool = False
    with_stack: bool = False
    cuda_events: bool | None = None
    profiler: Any = None

    def __post_init__(self) -> None:
        if self.profiler is not None:
            from torch.profiler import profile as _torch_profile

            if not isinstance(self.profiler, _torch_profile):
                raise ConfigError(f"profiler= must be a torch.profiler.profile, got {type(self.profiler).__name__}")
            if self.mode == "timing" and self.cuda_events is None:
                self.cuda_events = True
            if self.mode in ("stats", "timing"):
                self.mode = "kineto"
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.selector is not None and self.router_middleware is not None:
            raise ConfigError("pass either selector= or router_middleware=, not both")
        if self.router_middleware is not None and not callable(self.router_middleware):
            raise ConfigError("router_middleware must be a callable (logits, weights, indices) -> (weights, indices)")
        if self.observers is not None and (isinstance(self.observers, (str, bytes, dict))
                                           or not hasattr(self.observers, "__iter__")):
            raise ConfigError(f"observers must be a list of observer objects, got {type(self.observers).__name__} "
                              "(wrap a single one: observers=[obs])")
        self.observers = list(self.observers or ())
        for name in ("slim", "record_shapes", "with_stack", "cuda_events"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool) and v not in (0, 1):
                raise ConfigError(f"{name} must be True or False, got {v!r}")
        self.schedule = _checked_schedule(self.schedule)
        if self.logdir is not None:
            if not isinstance(self.logdir, (str, os.PathLike)) or str(self.logdir) == "":
                raise ConfigError(f"logdir must be a directory path (str or os.PathLike), got {self.logdir!r}")
            self.logdir = Path(self.logdir)
        elif self.mode == "kineto":
            self.logdir = DEFAULT_LOGDIR
        if self.logdir is not None:
            output_dir(self.logdir, "logdir")  # a file in the way fails here, not after the profiled work
        # CUDA-event (host-clock on CPU) timing: on in "timing" mode; kineto can add it to compare with the trace
        self.cuda_events = (self.mode == "timing") if self.cuda_events is None else bool(self.cuda_events)

    @classmethod
    def from_call(cls, mode: str = "stats", **kwargs: Any) -> "ProfileOptions":
        """`profile(model, mode, **kwargs)` arguments; an unknown keyword is a `ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"profile() got unknown option(s) {', '.join(unknown)}; "
                              f"its options: {', '.join(sorted(known - {'mode'}))}")
        return cls(mode=mode, **kwargs)

    @property
    def kineto(self) -> bool:
        return self.mode == "kineto"


_SCHEDULE_KEYS = ("wait", "warmup", "active", "repeat", "skip_first")


def _checked_schedule(sched):
    """None, a callable (a `torch.profiler.schedule`), or its keyword arguments as a dict, checked."""
    if sched is None or callable(sched):
        return sched
    if not isinstance(sched, dict):
        raise ConfigError(f"schedule must be a torch.profiler.schedule(...) or a dict of its arguments "
                          f"(wait, warmup, active, repeat, skip_first), got {type(sched).__name__}")
    unknown = sorted(set(sched) - set(_SCHEDULE_KEYS))
    if unknown:
        raise ConfigError(f"schedule has unknown key(s) {', '.join(map(str, unknown))}; "
                          f"its keys: {', '.join(_SCHEDULE_KEYS)}")
    for k, v in sched.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"schedule[{k!r}] must be an integer >= 0, got {v!r}")
    if sched.get("active", 1) < 1:
        raise ConfigError(f"schedule['active'] must be >= 1 (steps recorded per window), got {sched['active']}")
    return {"wait": 0, "warmup": 0, "active": 1, **sched}  # torch requires wait, warmup and active
