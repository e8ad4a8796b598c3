"""The transformers 4.x layout: an `nn.Linear` gate returning logits next to an `nn.ModuleList` of
expert MLPs (4.x Mixtral, OLMoE, Qwen2-MoE). Top-k happens inside the block, so routing is
recomputed from the gate's logits (softmax -> top-k, the rule those blocks use)."""
from __future__ import annotations

import torch
from torch import nn

from .. import sizes
from .generic import GenericHandler, shared_children


class LegacyModuleListHandler(GenericHandler):
    name = "legacy_modulelist"
    supports_selectors = False

    def match(self, name, module, model):
        for ename, experts in module.named_children():
            if not isinstance(experts, nn.ModuleList) or len(experts) < 2:
                continue
            kinds = {type(m) for m in experts}
            if len(kinds) != 1:
                continue
            e = len(experts)
            gate = next(((n, c) for n, c in module.named_children()
                         if isinstance(c, nn.Linear) and c.out_features == e), None)
            if gate is None:
                continue
            hidden = gate[1].in_features
            dims = sizes.mlp_dims(experts[0], hidden)
            if dims is None:
                continue
            shared = shared_children(module, {id(experts), id(gate[1])})
            binding = self.bind(name, module, model, gate[0], gate[1], ename, experts, shared,
                                e, hidden, dims[0], dims[1])
            k = getattr(module, "top_k", None)
            if isinstance(k, int):
                binding.info.top_k = k
                binding.info.sources["top_k"] = "module"
            binding.experts = list(experts)  # each expert MLP is called (and timed) on its own
            return binding
        return None

    def routing_from_router(self, binding, output):
        logits = output[0] if isinstance(output, (tuple, list)) else output
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, binding.info.top_k, dim=-1)
        return idx, w

    def routing_from_experts(self, args, kwargs):
        return None
