"""Shared by the benchmark scripts: an independent reference for routing counts."""
from __future__ import annotations

import torch

from moe_trace.capture import find_bindings


def reference_counter(model):
    """Plain forward-pre-hooks on every experts module that count the `top_k_index` they receive on
    the device (independent of moe-trace's counters). Returns (per-layer [E+1] tensors, handles);
    the last bin collects indices >= E."""
    bindings = find_bindings(model)
    seen = [torch.zeros(b.info.num_experts + 1, dtype=torch.int64, device=b.info.device) for b in bindings]

    def make(i, E):
        def hook(mod, args, kwargs):
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None).reshape(-1)
            seen[i].index_add_(0, idx.clamp(0, E), torch.ones_like(idx))
        return hook

    handles = [b.experts[0].register_forward_pre_hook(make(i, b.info.num_experts), with_kwargs=True)
               for i, b in enumerate(bindings)]
    return seen, handles
