"""torch.compile'd models: drop exactly the compiled code that involves the profiled model.

Dynamo does not guard on module hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`), so code
compiled before `profile()` runs without moe-trace's hooks (zero routing), and code compiled inside
the block keeps calling them after it. The session therefore drops, at entry and at exit, the
compiled code of the frames that can reach the model — never the whole dynamo cache, so the user's
other compiled functions keep theirs:

- code whose file defines a class of one of the model's modules (its MRO included), lies in the
  transformers package, or holds a forward that was compiled onto a module instance
  (`m.forward = torch.compile(...)`);
- code of a function that uses a global, or closes over a variable, that is the model or one of
  its modules (a compiled ``step = torch.compile(lambda x: model(x))``);
- at exit also every code compiled while the block ran (it may hold moe-trace's hooks).

The next call retraces (one recompile per shape; inductor's on-disk caches keep that short). A
compiled frame that reaches the model some other way is not seen: its layers record no routing, and
the session's silent-layer warning says so.
"""
from __future__ import annotations

import gc
import os
import sys
import types
from typing import Any

from torch import nn


def _dynamo_loaded() -> bool:
    return "torch._dynamo.convert_frame" in sys.modules


def compiled_codes() -> dict[int, tuple[types.CodeType, tuple[str, ...]]]:
    """{id: (code, compile ids of its cache entries)} for every code object dynamo holds compiled
    entries for (nothing when dynamo was never imported)."""
    if not _dynamo_loaded():
        return {}
    from torch._dynamo import convert_frame
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    out: dict[int, tuple[types.CodeType, tuple[str, ...]]] = {}
    for ref in list(convert_frame.input_codes.seen) + list(convert_frame.output_codes.seen):
        code = ref()
        if code is None or id(code) in out:
            continue
        entries = _debug_get_cache_entry_list(code)
        if entries:
            out[id(code)] = (code, tuple(str(e.compile_id) for e in entries))
    return out


def _unwrap(fn: Any) -> Any:
    for _ in range(8):
        nxt = getattr(fn, "_torchdynamo_orig_callable", None) or getattr(fn, "__wrapped__", None) \
            or getattr(fn, "__func__", None)
        if nxt is None or nxt is fn:
            break
        fn = nxt
    return fn


def _model_files(model: nn.Module) -> tuple[set[str], tuple[str, ...]]:
    """Source files of the model's module classes and instance forwards; package dirs (transformers)."""
    files: set[str] = set()
    seen: set[type] = set()
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls in seen:
                continue
            seen.add(cls)
            f = getattr(sys.modules.get(cls.__module__), "__file__", None)
            if f:
                files.add(os.path.realpath(f))
        for name in ("forward", "__call__", "_compiled_call_impl"):
            fn = _unwrap(m.__dict__.get(name))
            code = getattr(fn, "__code__", None)
            if code is not None:
                files.add(os.path.realpath(code.co_filename))
    dirs = []
    tf = sys.modules.get("transformers")
    if getattr(tf, "__file__", None):
        dirs.append(os.path.dirname(os.path.realpath(tf.__file__)) + os.sep)
    return files, tuple(dirs)


def _names(code: types.CodeType) -> set[str]:
    """Global (and attribute) names a code object and its nested functions use."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out |= _names(c)
    return out


def _holds_model(fn: types.FunctionType, ids: set[int]) -> bool:
    """The function uses a global that is the model (or one of its modules), or closes over one."""
    g = fn.__globals__ if isinstance(fn.__globals__, dict) else {}
    values = [g[n] for n in _names(fn.__code__) if n in g]
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return any(id(v) in ids or id(getattr(v, "__self__", None)) in ids for v in values)


def related_codes(model: nn.Module, codes: dict[int, tuple[types.CodeType, Any]]) -> list[types.CodeType]:
    """The compiled codes (of `codes`) that can reach `model` (see the module docstring). Code
    objects compare by content, so everything here goes by id."""
    if not codes:
        return []
    files, dirs = _model_files(model)
    out, rest = [], []
    for code, _ in codes.values():
        f = os.path.realpath(code.co_filename)
        (out if f in files or f.startswith(dirs) else rest).append(code)
    if rest:
        ids = {id(m) for m in model.modules()}
        by_id = {id(c): c for c in rest}
        hit = set()
        for fn in gc.get_referrers(*rest):
            if isinstance(fn, types.FunctionType) and id(fn.__code__) in by_id and _holds_model(fn, ids):
                hit.add(id(fn.__code__))
        out += [by_id[i] for i in hit]
    return out


def drop(codes: list[types.CodeType]) -> None:
    """Drop dynamo's compiled entries of these code objects (they retrace on their next call)."""
    if not codes:
        return
    from torch._dynamo import convert_frame
    from torch._dynamo.eval_frame import reset_code

    with convert_frame.compile_lock:
        for code in codes:
            reset_code(code)


class CompiledGuard:
    """Entry / exit bookkeeping of one session (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.dropped_at_entry = 0
        self._at_entry: dict[int, tuple[types.CodeType, tuple[str, ...]]] = {}

    def enter(self) -> None:
        codes = compiled_codes()
        stale = related_codes(self.model, codes)
        drop(stale)
        self.dropped_at_entry = len(stale)
        gone = {id(c) for c in stale}
        self._at_entry = {i: v for i, v in codes.items() if i not in gone}

    def exit(self) -> None:
        # every code compiled (or recompiled) while the block ran may hold moe-trace's hooks; the
        # related codes of before were dropped at entry, so nothing else can reach the model
        codes = compiled_codes()
        drop([c for i, (c, ids) in codes.items() if self._at_entry.get(i, (None, None))[1] != ids])
        self._at_entry = {}
