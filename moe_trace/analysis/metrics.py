"""Load-balance, k and FLOPs metrics computed from raw counts (numpy only)."""
from __future__ import annotations

import numpy as np

from .rundata import LayerCounts, LayerInfo


def balance(expert_counts: np.ndarray) -> dict[str, float | int]:
    """CV, Gini, normalized entropy and max/mean of a per-expert load vector.

    Defined as 0 (perfectly balanced, nothing to report) when no token was routed.
    """
    x = np.asarray(expert_counts, dtype=np.float64)
    n = len(x)
    total = x.sum()
    active = int((x > 0).sum())
    if n == 0 or total <= 0:
        return {"active_experts": 0, "dead_experts": n, "cv": 0.0, "gini": 0.0,
                "entropy_norm": 0.0, "max_over_mean": 0.0}
    mean = total / n
    cv = float(x.std() / mean)
    xs = np.sort(x)
    # Gini = sum_i (2i - n - 1) x_(i) / (n * sum x), i = 1..n on sorted values
    idx = np.arange(1, n + 1)
    gini = float(((2 * idx - n - 1) * xs).sum() / (n * total))
    p = x / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    entropy_norm = entropy / np.log(n) if n > 1 else 1.0
    return {"active_experts": active, "dead_experts": n - active, "cv": cv, "gini": gini,
            "entropy_norm": float(entropy_norm), "max_over_mean": float(x.max() / mean)}


def k_stats(k_hist: np.ndarray) -> dict[str, object]:
    """Mean / std / min / max of k from a histogram indexed by k; `hist` keeps non-zero bins."""
    h = np.asarray(k_hist, dtype=np.float64)
    n = h.sum()
    hist = {str(k): int(c) for k, c in enumerate(k_hist) if c}
    if n <= 0:
        return {"k_mean": 0.0, "k_std": 0.0, "k_min": 0, "k_max": 0, "k_hist": hist}
    ks = np.arange(len(h))
    mean = float((ks * h).sum() / n)
    std = float(np.sqrt(((ks - mean) ** 2 * h).sum() / n))
    nzk = ks[h > 0]
    return {"k_mean": mean, "k_std": std, "k_min": int(nzk.min()), "k_max": int(nzk.max()), "k_hist": hist}


def flops(layer: LayerInfo, counts: LayerCounts) -> dict[str, int]:
    """Analytic FLOPs of one layer for the counted tokens and assignments.

    router 2*H*E per token (or the router's own matrices when they differ: skip/zero-expert columns,
    router MLPs, product keys); each (token, expert) assignment (every expert for dense-experts layers) 2*H*I*3 for gated experts (gate, up and
    down projections) or 2*H*I*2 without a gate; shared experts 2*H*Is*(3|2) per token.
    """
    h = layer.hidden_size
    router = (layer.router_flops_per_token or 2 * h * layer.num_experts) * int(counts.tokens)
    if layer.dense_experts:
        assignments = int(counts.tokens) * layer.num_experts
    else:
        assignments = int(np.asarray(counts.expert_counts).sum())
    experts = 2 * (layer.expert_hidden_size or h) * layer.expert_dim * (3 if layer.gated else 2) * assignments
    shared = 2 * h * layer.shared_expert_dim * (3 if layer.shared_gated else 2) * int(counts.tokens)
    return {"router": router, "experts": experts, "shared": shared, "total": router + experts + shared}


def add_flops(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in ("router", "experts", "shared", "total")}


ZERO_FLOPS = {"router": 0, "experts": 0, "shared": 0, "total": 0}
