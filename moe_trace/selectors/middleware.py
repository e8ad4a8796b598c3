"""The router middleware: a selector's per-token k turned into the routing the experts receive.

One implementation serves both ways in: ``profile(model, selector=...)`` (bound to every MoE layer
by the capture session) and ``profile(model, router_middleware=selector_middleware(...))``. It runs
inside the experts' pre-hook, fully on the device: no host sync, no per-token Python.

Weights of the kept experts (``weights=``; docs/selectors.md "Router middleware"):

- ``"mass"`` (default): the kept experts' probabilities rescaled so that each token's weights sum
  to what the family's own top-k weights summed to. Normalised families stay normalised, scaled
  ones (``routed_scaling_factor``, ``norm_topk_prob=False``) keep their scale, and ``topk`` with the
  model's own k is the model's own routing (returned untouched).
- ``"renormalize"``: the kept probabilities divided by their sum (each token's weights sum to 1).
- ``"probs"``: the kept probabilities as they are.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch

from moe_trace.errors import ConfigError

from .core import CallableSelector, Selector, _pos_int, resolve_selector

Middleware = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
WEIGHT_MODES = ("mass", "renormalize", "probs")
_WARNED: set[tuple[int, int]] = set()  # (k asked, experts): warned once per process

__all__ = ["Middleware", "WEIGHT_MODES", "SelectorMiddleware", "selector_middleware", "apply_k"]


def _topk_slots(probs: torch.Tensor, k: torch.Tensor, cap: int):
    vals, idx = torch.topk(probs, cap, dim=-1, sorted=True)
    k = k.to(device=probs.device, dtype=torch.int64).clamp(1, cap)
    keep = torch.arange(cap, device=probs.device) < k.unsqueeze(-1)
    return vals, idx, keep


def apply_k(probs: torch.Tensor, k: torch.Tensor, cap: int, *, renormalize: bool,
            sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`cap` experts per token with slots ``>= k[t]`` padded.

    Returns ``(weights[T, cap], indices[T, cap])``: weights in probs' dtype (0 in padded slots; kept
    slots renormalised to sum 1 when `renormalize`), indices int64 in descending probability order
    (`sentinel` in padded slots). `k` is clamped to ``[1, cap]``. All tensor ops, no host sync.
    """
    num_experts = probs.shape[-1]
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or not 1 <= int(cap) <= num_experts:
        raise ConfigError(f"apply_k: cap must be an integer in [1, {num_experts}] (the number of experts), got {cap!r}")
    vals, idx, keep = _topk_slots(probs, k, int(cap))
    weights = torch.where(keep, vals, torch.zeros_like(vals))
    if renormalize:
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    indices = torch.where(keep, idx, torch.full_like(idx, int(sentinel)))
    return weights, indices


def _selector_cap(sel: Selector, num_experts: int) -> int:
    """Largest k of `sel` for `num_experts` experts; a wrapped callable may carry `max_k` / `k` / `cap`."""
    if isinstance(sel, CallableSelector) and sel.max_k is None:
        for attr in ("max_k", "k", "cap"):
            v = getattr(sel.fn, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return min(v, num_experts)
    return sel.cap(num_experts)


class SelectorMiddleware:
    """Router middleware ``(scores[T,E], weights[T,k], indices[T,k]) -> (weights[T,cap], indices[T,cap])``.

    probs = softmax(scores) in fp32 (or the scores themselves when the router outputs probabilities);
    k = selector(probs); the ``cap`` most probable experts fill the slots, slots ``>= k[t]`` get
    weight 0 and the index `sentinel`. ``sentinel=None``: the index E (the "no expert" the eager
    experts skip) or, on fused kernels that cannot skip it (`bind(..., eager=False)`), the token's
    top-1 expert with weight 0. Weights follow `weights` (see the module docstring).
    """

    def __init__(self, selector: Any, cap: int | None = None, renormalize: bool | None = None, *,
                 weights: str | None = None, sentinel: int | None = None):
        sel = resolve_selector(selector)
        if sel is None:
            raise ConfigError("selector_middleware needs a selector")
        if renormalize is not None and weights is not None:
            raise ConfigError("selector_middleware: pass renormalize= or weights=, not both")
        mode = weights if weights is not None else (
            "mass" if renormalize is None else ("renormalize" if renormalize else "probs"))
        if mode not in WEIGHT_MODES:
            raise ConfigError(f"selector_middleware: weights={mode!r} is unknown; choose one of {', '.join(WEIGHT_MODES)}")
        self.selector = sel
        self._cap = _pos_int("selector_middleware", cap, "cap")
        self.weights = mode
        self.sentinel = sentinel

    @property
    def renormalize(self) -> bool:
        return self.weights == "renormalize"

    @property
    def name(self) -> str:
        return getattr(self.selector, "spec", None) or repr(self.selector)

    def cap(self, num_experts: int) -> int:
        """Slots per token for a router with `num_experts` experts (k never exceeds this)."""
        c = _selector_cap(self.selector, num_experts)
        if self._cap is not None:
            c = min(c, self._cap)
        return max(c, 1)

    def bind(self, num_experts: int, *, top_k: int | None = None, probs_in: bool = False, eager: bool = True,
             label: str = "layer") -> Middleware:
        """The middleware of one MoE layer: `num_experts` routed experts (scores beyond are ignored),
        router scores that are probabilities (`probs_in`), experts that skip the sentinel (`eager`)."""
        if self.weights == "mass" and top_k is not None and getattr(self.selector, "fixed_k", None) == top_k:
            return lambda scores, weights, indices: (weights, indices)
        E = int(num_experts)
        cap = self.cap(E)
        asked = getattr(self.selector, "fixed_k", None) or getattr(self.selector, "max_k", None)
        if isinstance(asked, int) and asked > E and (asked, E) not in _WARNED:
            _WARNED.add((asked, E))
            warnings.warn(f"selector {getattr(self.selector, 'spec', self.selector)}: k={asked} is more than the "
                          f"{E} experts of {label}; using k={min(asked, E)}", UserWarning, stacklevel=3)

        def apply(scores: torch.Tensor | None, weights: torch.Tensor | None, indices: torch.Tensor | None):
            if scores is None:
                raise RuntimeError(f"{label}: the router's scores were not seen before its experts ran")
            lead = scores.shape[:-1]
            s = scores.float()[..., :E].reshape(-1, E)
            probs = s if probs_in else torch.softmax(s, dim=-1)
            k = self.selector(probs)
            vals, top_i, keep = _topk_slots(probs, k, cap)
            new_w = torch.where(keep, vals, torch.zeros_like(vals))
            if self.weights == "renormalize" or (self.weights == "mass" and weights is None):
                new_w = new_w / new_w.sum(-1, keepdim=True).clamp_min(torch.finfo(new_w.dtype).tiny)
            elif self.weights == "mass":
                orig = weights.float().reshape(-1, weights.shape[-1])
                if indices is not None and orig.shape != indices.reshape(-1, indices.shape[-1]).shape:  # dense [T, E]
                    ix = indices.reshape(-1, indices.shape[-1]).to(torch.int64)
                    orig = torch.gather(orig, -1, ix.clamp(0, orig.shape[-1] - 1))
                new_w = new_w / new_w.sum(-1, keepdim=True).clamp_min(1e-20) * orig.sum(-1, keepdim=True)
            if self.sentinel is not None:
                pad = torch.full_like(top_i, int(self.sentinel))
            else:
                pad = torch.full_like(top_i, E) if eager else top_i[:, :1].expand_as(top_i)
            new_i = torch.where(keep, top_i, pad)
            if weights is not None:
                new_w = new_w.to(weights.dtype)
            if indices is not None:
                new_i = new_i.to(indices.dtype)
            return new_w.reshape(*lead, cap), new_i.reshape(*lead, cap)

        return apply

    def __call__(self, logits: torch.Tensor, weights: torch.Tensor | None = None,
                 indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unbound use: E = the scores' last dimension, scores are logits, the sentinel is E."""
        return self.bind(logits.shape[-1])(logits, weights, indices)

    def __repr__(self) -> str:
        return f"selector_middleware({self.selector!r}, cap={self._cap}, weights={self.weights!r})"


def selector_middleware(selector: Any, cap: int | None = None, renormalize: bool | None = None, *,
                        weights: str | None = None, sentinel: int | None = None) -> SelectorMiddleware:
    """Turn a selector (object, name or callable) into a router middleware; see `SelectorMiddleware`.
    ``renormalize=True`` is ``weights="renormalize"``, ``renormalize=False`` is ``weights="probs"``."""
    return SelectorMiddleware(selector, cap=cap, renormalize=renormalize, weights=weights, sentinel=sentinel)
