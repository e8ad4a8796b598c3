"""Aria in transformers 4.x: `experts` is an `AriaGroupedExpertsMLP` holding `fc1` [E, H, 2I] and
`fc2` [E, I, H] grouped GEMMs, called as `experts(permuted_tokens, tokens_per_expert)`; the router
is an `nn.Linear(H, E)` whose logits the block top-k's (then softmax over the top-k). Routing is
recomputed from the router's logits with that rule. (transformers 5 Aria uses the common layout.)"""
from __future__ import annotations

import torch
from torch import nn

from .generic import GenericHandler, shared_children


def _grouped(module: nn.Module):
    w = getattr(module, "weight", None)
    return w if isinstance(w, nn.Parameter) and w.dim() == 3 else None


class GroupedGemmExpertsHandler(GenericHandler):
    name = "aria_grouped_gemm"
    supports_selectors = False

    def match(self, name, module, model):
        experts, router = getattr(module, "experts", None), getattr(module, "router", None)
        fc1, fc2 = getattr(experts, "fc1", None), getattr(experts, "fc2", None)
        if not isinstance(router, nn.Linear) or fc1 is None or fc2 is None:
            return None
        w1, w2 = _grouped(fc1), _grouped(fc2)
        if w1 is None or w2 is None:
            return None
        e, hidden, first_out = w1.shape
        inter = w2.shape[1]
        if router.out_features != e or router.in_features != hidden or w2.shape[0] != e:
            return None
        shared = shared_children(module, {id(experts), id(router)})
        binding = self.bind(name, module, model, "router", router, "experts", experts, shared,
                            e, hidden, inter, first_out == 2 * inter)
        k = getattr(getattr(module, "config", None), "moe_topk", None)
        if isinstance(k, int):
            binding.info.top_k = k
        return binding

    def logits_from_router(self, output):
        return output if torch.is_tensor(output) else None

    def routing_from_router(self, binding, output):
        top, idx = torch.topk(output, binding.info.top_k, dim=-1)
        return idx, torch.softmax(top.float(), dim=-1)

    def routing_from_experts(self, args, kwargs):
        return None
