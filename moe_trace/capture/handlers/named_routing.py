"""Stacked experts whose call spells routing differently from transformers 5's
`experts(hidden, top_k_index, top_k_weights)`: transformers 4.x GPT-OSS
(`experts(hidden, router_indices=..., routing_weights=[T,E])`), Qwen3-VL-MoE / Qwen3-Omni-MoE
(`experts(hidden, routing_weights [T,E], router_indices)`). Recognised by the experts' parameter
names; the indices are the integer tensor of the call, the weights its other float tensor
(one of the same shape as the indices when there are several, else the dense [T,E] one).

Their inference path runs every expert on every token (`torch.bmm` over all E experts, weighted by
the dense routing weights) where the source says so: Qwen3-VL-MoE / Qwen3-Omni-MoE whenever not
training, GPT-OSS off the CPU; FLOPs then count all E experts per token, as for Llama 4."""
from __future__ import annotations

import inspect

import torch

from .generic import GenericHandler

INDEX_NAMES = ("router_indices", "top_experts")


def names_routing_the_4x_way(module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(n in params for n in INDEX_NAMES)


def runs_densely(experts, device: str) -> bool:
    """Whether the 4.x experts' eval path computes all experts densely on `device` (from its source)."""
    try:
        src = inspect.getsource(type(experts).forward)
    except (OSError, TypeError):
        return False
    if "torch.bmm" not in src:
        return False
    if 'device.type == "cpu" or self.training' in src:
        return not device.startswith("cpu")
    return "if self.training" in src


def routing_from_call(args: tuple, kwargs: dict):
    """(indices [T,k], weights [T,k] or [T,E]) among an experts call's tensors (the first one is the input)."""
    tensors = [a for a in args[1:] if torch.is_tensor(a)]
    tensors += [v for k, v in kwargs.items() if torch.is_tensor(v) and k not in ("hidden_states", "x")]
    idx = next((t for t in tensors if not t.is_floating_point()), None)
    floats = [t for t in tensors if t.is_floating_point()]
    if idx is None or not floats:
        return None
    idx = idx.reshape(-1, idx.shape[-1])
    same = [t for t in floats if t.numel() == idx.numel()]
    w = (same or floats)[0]
    return idx, w.reshape(idx.shape[0], -1)


class NamedRoutingHandler(GenericHandler):
    name = "named_routing"

    def match(self, name, module, model):
        for _, child in module.named_children():
            if names_routing_the_4x_way(child):
                binding = super().match(name, module, model)
                if binding is not None and names_routing_the_4x_way(binding.experts[0]):
                    if runs_densely(binding.experts[0], binding.info.device):
                        binding.info.dense_experts = True
                        binding.info.sources["dense_experts"] = "module (4.x eval path: bmm over all experts)"
                    return binding
                return None
        return None

    def routing_from_experts(self, args, kwargs):
        return routing_from_call(args, kwargs)
