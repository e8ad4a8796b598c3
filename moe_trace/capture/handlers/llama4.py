"""Llama 4: the router returns `(scores [T,E] dense: sigmoid at the top-k, 0 elsewhere, logits [T,E])`
and the experts run densely over all E experts (`experts(hidden[E*T, H])`). Routing is the
top-k of the logits; FLOPs count every expert for every token."""
from __future__ import annotations

import inspect

import torch

from .generic import GenericHandler, find_router, shared_children, stacked_experts_dims


def _single_input(module) -> bool:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) == 1


class DenseExpertsHandler(GenericHandler):
    name = "llama4"
    supports_selectors = False

    def match(self, name, module, model):
        for ename, experts in module.named_children():
            dims = stacked_experts_dims(experts)
            if dims is None or not _single_input(experts):
                continue
            e, h, i, gated = dims
            router = find_router(module, {id(experts)}, e, h)
            if router is None:
                continue
            shared = shared_children(module, {id(experts), id(router[1])})
            return self.bind(name, module, model, router[0], router[1], ename, experts, shared,
                             e, h, i, gated, dense_experts=True)
        return None

    def logits_from_router(self, output):
        return output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None

    def routing_from_router(self, binding, output):
        scores, logits = output[0], output[1]
        idx = torch.topk(logits, binding.info.top_k, dim=-1).indices
        return idx, torch.gather(scores, -1, idx)

    def routing_from_experts(self, args, kwargs):
        return None
