"""Profiler ranges: the `user_annotation` events of `record_function`, at a fifth of its cost, and the
gate that records host ops only where a slim trace keeps them.

`torch.autograd.profiler.record_function` enters and leaves through two dispatcher ops
(`profiler::_record_function_enter_new` / `_record_function_exit`) and a ScriptObject: ~13 µs per range
with the profiler on (CPU box). `torch._C._autograd._record_function_with_args_enter/exit` (pybind, in
torch since 1.10) start the same RecordFunction, scope USER_SCOPE, so Kineto writes the same
`user_annotation` event (and, on CUDA, the `gpu_user_annotation` span of the kernels it launched):
~2.5 µs per range. moe-trace opens a few ranges per MoE layer and forward. While dynamo traces
(torch.compile), `record_function` is used: dynamo knows it, not the pybind pair.
"""
from __future__ import annotations

import os
import sys
import threading

import torch

_enter = getattr(torch._C._autograd, "_record_function_with_args_enter", None)
_exit = getattr(torch._C._autograd, "_record_function_with_args_exit", None)
_record_function = torch.autograd.profiler.record_function
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
# torch's per-thread RecordFunction switch (at::enableRecordFunction): off, no op of this thread reaches
# the profiler; a RecordFunction started while it was on still ends (and is recorded) when it is off
_switch = getattr(torch._C._autograd, "_enable_record_function", None)
_ident = threading.get_ident

#: the open RecordGate (at most one: torch runs one profiler per process, moe-trace one own session)
_GATE: "RecordGate | None" = None


class RecordGate:
    """While moe-trace's own profiler records a slim trace: the host ops of the thread that runs the
    model reach the profiler only inside moe-trace's MoE ranges (`inside=True`, a CUDA run: there are the
    ops that launch the kernels a slim trace keeps) or not at all (`inside=False`: a CPU-only slim trace
    keeps no op). The events a slim trace would drop are then never recorded, so the profiler's stop, its
    save and moe-trace's passes have less to do; the ranges, the steps and all GPU activity (CUPTI) are
    recorded as before. Nothing the model computes changes.

    torch's switch is per thread: the gate acts in the thread that opened it (ops of other threads are
    recorded as usual; intra-op threads inherit the switch). When dynamo starts compiling, the gate closes
    for good (compiled code's ranges are dispatcher ops that the switch would hide, and a compiled layer
    has no MoE range, so its slim trace keeps every kernel). `MOE_TRACE_RECORD_GATE=0` turns it off."""

    __slots__ = ("inside", "thread", "depth", "_hook")

    def __init__(self, inside: bool):
        self.inside = inside
        self.thread = _ident()
        self.depth = 0  # MoE ranges open (inside=True: the switch is on while > 0)
        self._hook = None

    @classmethod
    def open(cls, inside: bool) -> "RecordGate | None":
        """Turn the switch off in this thread; None (nothing done) where the gate cannot be kept exact:
        torch without the switch, one already open, dynamo not loaded (its compile callback is how the gate
        learns of compiled code; importing dynamo costs ~1 s, and a transformers model has loaded it) or
        without a compile-start callback, or MOE_TRACE_RECORD_GATE=0."""
        global _GATE
        if _switch is None or _enter is None or _GATE is not None or os.environ.get("MOE_TRACE_RECORD_GATE") == "0":
            return None
        if "torch._dynamo" not in sys.modules:
            return None
        try:
            from torch._dynamo.callback import callback_handler
            register = callback_handler.register_start_callback
        except (ImportError, AttributeError):
            return None
        gate = cls(inside)

        def on_compile_start(*_args, **_kwargs) -> None:
            if _ident() == gate.thread:
                gate.close()

        gate._hook = on_compile_start
        register(on_compile_start)
        _switch(False)
        _GATE = gate
        return gate

    def close(self) -> None:
        """Everything is recorded again (idempotent; in the gate's thread)."""
        global _GATE
        if _GATE is not self:
            return
        _GATE = None
        _switch(True)
        hook, self._hook = self._hook, None
        try:
            from torch._dynamo.callback import callback_handler
            callback_handler.remove_start_callback(hook)
        except (ImportError, AttributeError, ValueError):
            pass


class ProfilerRange:
    """`with ProfilerRange(name):` = `with record_function(name):` (the same trace event). `span=True`: a
    MoE range (router / experts / shared), inside which an open `RecordGate` records host ops."""

    __slots__ = ("name", "span", "_h", "_g")

    def __init__(self, name: str, span: bool = False):
        self.name = name
        self.span = span
        self._h = None
        self._g = None

    def __enter__(self) -> "ProfilerRange":
        if _enter is not None and not _is_compiling():
            g = _GATE
            if g is not None and g.thread == _ident():
                _switch(True)
                self._h = _enter(self.name)
                if self.span:
                    g.depth += 1
                    self._g = g
                if not (g.inside and g.depth):
                    _switch(False)
            else:
                self._h = _enter(self.name)
        else:
            rf = _record_function(self.name)
            rf.__enter__()
            self._h = rf
        return self

    def __exit__(self, *exc) -> None:
        h, self._h = self._h, None
        if h is None:
            return
        if isinstance(h, _record_function):
            h.__exit__(None, None, None)
            return
        _exit(h)
        g, self._g = self._g, None
        if g is not None:
            g.depth -= 1
            if g.depth == 0 and _GATE is g and g.thread == _ident():
                _switch(False)
