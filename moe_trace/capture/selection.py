"""Turning a selector (router probabilities -> per-token k) into new experts' routing.

Runs inside the experts' pre-hook, fully on the device: no host sync, no per-token Python.
"""
from __future__ import annotations

from typing import Callable

import torch

from moe_trace.analysis.rundata import LayerInfo

Middleware = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def selector_cap(selector, layer: LayerInfo) -> int:
    """Slots handed to the experts: the selector's own cap (`max_k` or `k`), at most E."""
    for attr in ("max_k", "k", "cap"):
        v = getattr(selector, attr, None)
        if isinstance(v, int) and v > 0:
            return min(v, layer.num_experts)
    return layer.num_experts


def selector_middleware(selector, layer: LayerInfo, *, probs_in: bool, pad_with_sentinel: bool) -> Middleware:
    """Middleware `(scores, weights, indices) -> (weights, indices)` that applies `selector`.

    The k[t] most probable experts are kept (probabilities = softmax of the router logits over the
    E routed experts); their weights are the probabilities rescaled so each token's weights sum to
    what the family's own weights summed to (normalised families stay normalised, scaled ones keep
    their scale). Unused slots get weight 0 and the index E (the "no expert" sentinel the eager path
    skips) or, on kernels that cannot skip it, the token's top-1 expert with weight 0.
    A `topk` selector with the model's own k returns the routing untouched.
    """
    cap = selector_cap(selector, layer)
    E = layer.num_experts
    fixed = getattr(selector, "fixed_k", None)
    if fixed is not None and fixed == layer.top_k:
        return lambda scores, weights, indices: (weights, indices)

    def apply(scores: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        if scores is None:
            raise RuntimeError(f"layer {layer.index}: the router's scores were not seen before its experts ran")
        s = scores.float()[..., :E]
        probs = s if probs_in else torch.softmax(s, dim=-1)
        k = selector(probs).to(torch.int64).clamp(1, cap)                    # [T]
        top_p, top_i = torch.topk(probs, cap, dim=-1)
        keep = torch.arange(cap, device=probs.device).unsqueeze(0) < k.unsqueeze(1)
        orig = weights.float()
        if orig.shape != indices.shape:  # dense [T, E] weights
            orig = torch.gather(orig, -1, indices.to(torch.int64).clamp(0, orig.shape[-1] - 1))
        new_w = torch.where(keep, top_p, torch.zeros_like(top_p))
        new_w = new_w / new_w.sum(-1, keepdim=True).clamp_min(1e-20) * orig.sum(-1, keepdim=True)
        pad = torch.full_like(top_i, E) if pad_with_sentinel else top_i[:, :1].expand_as(top_i)
        new_i = torch.where(keep, top_i, pad)
        return new_w.to(weights.dtype), new_i.to(indices.dtype)

    return apply


def resolve_selector(spec):
    """A selector object from a name ("kneedle", "cumsum:0.8", "topk:4"), an object, or a callable."""
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, str):
        return spec
    from moe_trace.experiments.selectors import resolve_selector as _resolve  # lazy: experiments sits above

    return _resolve(spec)
