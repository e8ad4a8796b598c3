"""Profiler ranges: the `user_annotation` events of `record_function`, at a fifth of its cost.

`torch.autograd.profiler.record_function` enters and leaves through two dispatcher ops
(`profiler::_record_function_enter_new` / `_record_function_exit`) and a ScriptObject: ~13 µs per range
with the profiler on (CPU box). `torch._C._autograd._record_function_with_args_enter/exit` (pybind, in
torch since 1.10) start the same RecordFunction, scope USER_SCOPE, so Kineto writes the same
`user_annotation` event (and, on CUDA, the `gpu_user_annotation` span of the kernels it launched):
~2.5 µs per range. moe-trace opens a few ranges per MoE layer and forward. While dynamo traces
(torch.compile), `record_function` is used: dynamo knows it, not the pybind pair.
"""
from __future__ import annotations

import torch

_enter = getattr(torch._C._autograd, "_record_function_with_args_enter", None)
_exit = getattr(torch._C._autograd, "_record_function_with_args_exit", None)
_record_function = torch.autograd.profiler.record_function
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


class ProfilerRange:
    """`with ProfilerRange(name):` = `with record_function(name):` (the same trace event)."""

    __slots__ = ("name", "_h")

    def __init__(self, name: str):
        self.name = name
        self._h = None

    def __enter__(self) -> "ProfilerRange":
        if _enter is not None and not _is_compiling():
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
        else:
            _exit(h)
