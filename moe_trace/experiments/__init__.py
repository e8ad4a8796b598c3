"""Routing experiments: dynamic-k selectors, router middleware, knob sweeps and the seed-style API.

`selectors` needs only torch; the sweep / benchmark / analysis helpers import the capture layer and
are loaded on first use (``moe_trace.experiments.run_sweep`` etc.).
"""
from __future__ import annotations

import importlib

from .selectors import (Selector, apply_k, cumsum, entropy, gap_ratio, kneedle, resolve_selector,
                        selector_middleware, topk)

_LAZY = {
    "run_sweep": "sweep", "KNOBS": "sweep", "summarize_samples": "sweep",
    "SimpleBenchmark": "benchmark",
    "quick_test": "analysis", "compare_routing_behavior": "analysis", "print_routing_stats": "analysis",
    "get_k_statistics": "analysis", "per_device_summary": "analysis",
    "plot_sweep": "plots",
}

__all__ = ["Selector", "apply_k", "cumsum", "entropy", "gap_ratio", "kneedle", "resolve_selector",
           "selector_middleware", "topk", *_LAZY]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'moe_trace.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
