"""Dynamic-k selectors (`core`) and the one router middleware built from them (`middleware`).

Sits below capture: imports only torch, numpy and `moe_trace.errors`. See docs/selectors.md.
"""
from .core import (SELECTORS, CallableSelector, CumSum, Entropy, GapRatio, Kneedle, Selector, TopK, cumsum,
                   cumsum_selector, entropy, entropy_selector, gap_ratio, gap_ratio_selector, kneedle,
                   kneedle_selector, resolve_selector, topk, topk_selector, ModelTopK)
from .middleware import WEIGHT_MODES, Middleware, SelectorMiddleware, apply_k, selector_middleware

__all__ = [
    "Selector", "TopK", "Kneedle", "CumSum", "Entropy", "GapRatio", "CallableSelector",
    "topk", "kneedle", "cumsum", "entropy", "gap_ratio",
    "SELECTORS", "resolve_selector", "apply_k", "selector_middleware", "SelectorMiddleware",
    "Middleware", "WEIGHT_MODES",
    "kneedle_selector", "cumsum_selector", "entropy_selector", "gap_ratio_selector", "topk_selector", "ModelTopK",
]
