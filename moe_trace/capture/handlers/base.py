"""What an architecture handler is, and the registry of handlers.

A handler recognises MoE layers by structure and tells the capture layer three things:
which modules are the router, the experts and the shared experts (`MoEBinding`); how to read
routing (logits, top-k indices, weights) out of those modules' inputs and outputs; and, for
selectors, how to hand modified routing back to the experts in the family's own format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from moe_trace.analysis.rundata import LayerInfo


@dataclass
class MoEBinding:
    """One MoE layer: its modules plus a `LayerInfo` describing sizes."""

    info: LayerInfo
    handler: "MoEHandler"
    block: nn.Module
    router: nn.Module | None
    experts: list[nn.Module]
    shared: list[nn.Module] = field(default_factory=list)


class MoEHandler:
    """Base class. Subclasses override `match` and, where the family differs, the routing readers.

    Defaults implement the common transformers-5 structure: the router returns
    `(logits, top_k_weights, top_k_index)` and the experts are called as
    `experts(hidden, top_k_index, top_k_weights)`.
    """

    name: ClassVar[str] = "base"
    #: True when the router's first output already holds probabilities (gemma4).
    router_outputs_probs: ClassVar[bool] = False
    #: Whether `profile(selector=...)` can change this family's routing.
    supports_selectors: ClassVar[bool] = True

    def match(self, name: str, module: nn.Module, model: nn.Module) -> MoEBinding | None:
        """Return a binding when `module` (named `name` in `model`) is an MoE layer, else None."""
        raise NotImplementedError

    # -- routing readers (called inside hooks: must not sync) --------------------------------
    def logits_from_router(self, output: Any) -> torch.Tensor | None:
        """The [T, E'] router scores used for confidence (logits, or probs if `router_outputs_probs`)."""
        if isinstance(output, (tuple, list)):
            return output[0]
        return output if torch.is_tensor(output) else None

    def routing_from_router(self, binding: MoEBinding, output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices [T,k], weights [T,k]) when routing is counted at the router; None to count at the experts."""
        return None

    def routing_from_experts(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices [T,k], weights [T,k] or [T,E]) from the experts' call."""
        idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        w = kwargs.get("top_k_weights", args[2] if len(args) > 2 else None)
        if idx is None or w is None:
            return None
        return idx, w

    def replace_experts_routing(self, args: tuple, kwargs: dict, indices: torch.Tensor,
                                weights: torch.Tensor) -> tuple[tuple, dict]:
        """The experts' call arguments with routing replaced (used by selectors and middleware)."""
        args = list(args)
        if "top_k_index" in kwargs:
            kwargs = dict(kwargs, top_k_index=indices)
        else:
            args[1] = indices
        if "top_k_weights" in kwargs:
            kwargs = dict(kwargs, top_k_weights=weights)
        else:
            args[2] = weights
        return tuple(args), kwargs


_REGISTRY: list[MoEHandler] = []
_VERSION = [0]  # bumped on every (un)registration: detection caches depend on it


def registry_version() -> int:
    return _VERSION[0]


def register_handler(handler: MoEHandler | type[MoEHandler], *, first: bool = True) -> MoEHandler:
    """Register a handler for a custom MoE module. User handlers are tried before the built-in ones."""
    inst = handler() if isinstance(handler, type) else handler
    if not isinstance(inst, MoEHandler):
        raise TypeError("register_handler takes a moe_trace.MoEHandler subclass or instance")
    _REGISTRY.insert(0, inst) if first else _REGISTRY.append(inst)
    _VERSION[0] += 1
    return inst


def unregister_handler(handler: MoEHandler | type[MoEHandler]) -> None:
    """Remove a handler registered with `register_handler` (by instance or class)."""
    for h in list(_REGISTRY):
        if h is handler or type(h) is handler:
            _REGISTRY.remove(h)
            _VERSION[0] += 1


def registered_handlers() -> list[MoEHandler]:
    from . import builtin_handlers  # noqa: F401  (fills the registry once)

    return list(_REGISTRY)
