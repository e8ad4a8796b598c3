"""Find every MoE layer of a model by structure, using the registered handlers."""
from __future__ import annotations

import copy
import dataclasses
import weakref

from torch import nn

from moe_trace.analysis.rundata import LayerInfo
from moe_trace.errors import NoMoELayersError, UnknownArchitectureError

from . import sizes
from .handlers.base import MoEBinding, registered_handlers, registry_version
from .versions import check_transformers

# model -> (key, bindings). Matching every module against every handler costs ~30 ms on a 16-layer
# model; a `with profile(model)` inside a loop should not pay it each time.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def find_bindings(model: nn.Module) -> list[MoEBinding]:
    """Bind every MoE layer of `model`, in module order; raise a clear error when there is none.

    Cached per model while its module tree and the handler registry are unchanged; each call gets
    fresh `LayerInfo` copies with the device and experts implementation read anew."""
    if not isinstance(model, nn.Module):
        raise NoMoELayersError(f"expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    check_transformers()  # an unsupported version is one clear error here, not an AttributeError later
    registered_handlers()  # fills the registry before its version is read
    key = (registry_version(), tuple(id(m) for m in model.modules()))
    hit = _CACHE.get(model)
    if hit is None or hit[0] != key:
        _CACHE[model] = hit = (key, _match_all(model))
    return [_fresh(b) for b in hit[1]]


def _fresh(b: MoEBinding) -> MoEBinding:
    impl = getattr(getattr(b.experts[0], "config", None), "_experts_implementation", None) if b.experts else None
    info = dataclasses.replace(b.info, shared=list(b.info.shared), sources=dict(b.info.sources),
                              device=sizes.module_device(b.experts[0] if b.experts else b.block),
                              experts_implementation=impl if isinstance(impl, str) else b.info.experts_implementation)
    out = copy.copy(b)
    out.info = info
    return out


def _match_all(model: nn.Module) -> list[MoEBinding]:
    handlers = registered_handlers()
    bindings: list[MoEBinding] = []
    claimed: list[str] = []
    searched = 0
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        searched += 1
        for handler in handlers:
            binding = handler.match(name, module, model)
            if binding is not None:
                bindings.append(binding)
                claimed.append(name)
                break
    if not bindings:
        suspects = _unclaimed_expert_like(model, claimed)
        if suspects:
            raise UnknownArchitectureError(
                f"{type(model).__name__} has modules that look like MoE experts ({', '.join(suspects[:3])}"
                f"{', ...' if len(suspects) > 3 else ''}) but no handler understands their layer. "
                "Write a moe_trace.MoEHandler for it and call moe_trace.register_handler(YourHandler) "
                "(see docs/handlers.md).")
        raise NoMoELayersError(
            f"no MoE layer found in {type(model).__name__}: searched {searched} modules for a router "
            "(an [E, hidden] projection) next to experts stacked as [E, ...] weights or an nn.ModuleList "
            "of expert MLPs. If this model is a Mixture-of-Experts, register a handler with "
            "moe_trace.register_handler (see docs/handlers.md).")
    for i, b in enumerate(bindings):
        b.info.index = i
        b.info.expert_bytes, b.info.router_bytes, b.info.shared_bytes = weight_bytes(b)
    return bindings


def weight_bytes(b: MoEBinding) -> tuple[int, int, int]:
    """(bytes of one routed expert, of the router, of the shared experts) from the modules' own tensors
    (numel x element size, also on the meta device; this rank's shards under tensor / expert parallel)."""
    def total(modules) -> int:
        seen: dict[int, int] = {}
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                seen.setdefault(id(t), t.numel() * t.element_size())
        return sum(seen.values())

    experts = total(b.experts)
    # experts this rank holds: stacked [E_local, ...] weights, a list of expert modules, else all
    stacked = sizes.stacked_params(b.experts[0]) if len(b.experts) == 1 else {}
    held = min(p.shape[0] for p in stacked.values()) if stacked else (len(b.experts) if len(b.experts) > 1
                                                                       else b.info.num_experts)
    return (experts // max(held, 1), total([b.router] if b.router is not None else []), total(b.shared))


class LayerList(list):
    """The `LayerInfo`s of a model: a plain list whose repr is the table `moe-trace inspect` prints."""

    def __repr__(self) -> str:
        return format_layers(list(self))

    __str__ = __repr__


def detect(model: nn.Module) -> LayerList:
    """The MoE layers of `model`: index, name, family, sizes (and where each size came from), device.
    A list of `LayerInfo`; printing it shows a table."""
    return LayerList(b.info for b in find_bindings(model))


def _unclaimed_expert_like(model: nn.Module, claimed: list[str]) -> list[str]:
    out = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        stacked = sizes.stacked_params(module)
        if stacked and min(p.shape[0] for p in stacked.values()) >= 2:
            out.append(name)
    return out


def format_layers(layers: list[LayerInfo]) -> str:
    """A readable table of detected layers (what `moe-trace inspect` prints)."""
    if not layers:
        return "no MoE layers"
    head = f"{'idx':>3}  {'name':<40} {'family':<14} {'E':>4} {'k':>3} {'H':>6} {'I':>6} {'shared':>6}  {'device':<8} handler"
    rows = [head]
    for l in layers:
        rows.append(f"{l.index:>3}  {l.name:<40} {l.family:<14} {l.num_experts:>4} {l.top_k:>3} "
                    f"{l.hidden_size:>6} {l.expert_dim:>6} {l.shared_expert_dim:>6}  {l.device:<8} {l.handler}")
    src = layers[0].sources
    rows.append("sizes from: " + ", ".join(f"{k}={v}" for k, v in src.items()))
    return "\n".join(rows)
