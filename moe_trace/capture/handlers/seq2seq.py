"""Encoder-decoder MoE with expert capacity: SwitchTransformers (top-1) and NLLB-MoE (top-2).

Block (`*SparseMLP`): a `router` whose `classifier` is an `nn.Linear(H, E)` and `experts`, a
`ModuleDict` of E dense MLPs (`expert_0` ...; `wi`/`wo` or `fc1`/`fc2`). The router returns its
dispatch after the capacity limit, in both transformers 4.57 and 5.x:

- SwitchTransformers: `(dispatch one-hot [B,S,E] int, top-1 prob [B,S,1], logits [B,S,E])`; a token
  whose one-hot row is all zero overflowed its expert's capacity (per sequence) and is *dropped*
  (it skips the experts; the residual carries it);
- NLLB-MoE: `(top-1 mask [T,E], combine weights [T,E], logits [T,E])` (4.x: no logits); a token's
  top-1 / top-2 choice with a zero combine weight is *dropped* (capacity, padding, or
  `second_expert_policy="random"`).

Routing is read at the router's output: dispatched slots are counted per expert, dropped slots go
to `LayerCounts.dropped` (never to an expert). Layers are labelled with their stack (`encoder` /
`decoder`, also part of the module name). Each expert MLP is hooked on its own (timing, kineto).

Note (transformers 5.x, observed on 5.24): `NllbMoeExperts.forward` one-hot-encodes the router's
[T,E] mask as if it held indices, so it runs `expert_0` / `expert_1` for every token instead of the
dispatched experts. moe-trace reports the router's dispatch (what NLLB-MoE routes); the experts'
actual FLOPs on 5.x differ (transformers 4.57 runs the dispatched experts).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import sizes
from ..counters import DROPPED_INDEX
from .generic import GenericHandler


def stack_of(name: str) -> str | None:
    """`encoder` / `decoder` from a module path of an encoder-decoder model."""
    parts = name.split(".")
    for label in ("decoder", "encoder"):
        if label in parts:
            return label
    return None


class CapacityRoutedHandler(GenericHandler):
    name = "seq2seq_capacity"
    supports_selectors = False

    def match(self, name, module, model):
        router, experts = getattr(module, "router", None), getattr(module, "experts", None)
        classifier = getattr(router, "classifier", None)
        if not (isinstance(classifier, nn.Linear) and isinstance(experts, (nn.ModuleDict, nn.ModuleList))):
            return None
        members = list(experts.values()) if isinstance(experts, nn.ModuleDict) else list(experts)
        members = [m for m in members if any(p.dim() == 2 for p in m.parameters())]  # not NLLB's token dropout
        e, hidden = classifier.out_features, classifier.in_features
        if len(members) != e or e < 2 or len({type(m) for m in members}) != 1:
            return None
        dims = sizes.mlp_dims(members[0], hidden)
        if dims is None:
            return None
        binding = self.bind(name, module, model, "router", router, "experts", experts, [], e, hidden, dims[0], dims[1])
        top_k = 2 if hasattr(router, "second_expert_policy") else 1
        binding.info.top_k = top_k
        binding.info.sources["top_k"] = "module (NLLB-MoE top-2 router)" if top_k == 2 else "module (Switch top-1 router)"
        binding.info.stack = stack_of(name)
        binding.experts = members
        return binding

    def logits_from_router(self, output):
        if isinstance(output, (tuple, list)) and len(output) >= 3 and torch.is_tensor(output[2]):
            return output[2].reshape(-1, output[2].shape[-1])
        return None

    def routing_from_router(self, binding, output):
        mask, probs = output[0], output[1]
        E = mask.shape[-1]
        mask = mask.reshape(-1, E)
        if probs.shape[-1] == 1:  # Switch: top-1, dropped when the one-hot row is empty
            routed = mask.amax(-1, keepdim=True) > 0
            idx = torch.where(routed, mask.argmax(-1, keepdim=True), DROPPED_INDEX)
            return idx, probs.reshape(-1, 1).float() * routed
        weights = probs.reshape(-1, E).float()  # NLLB: dispatched slots carry a non-zero combine weight
        w, idx = torch.topk(weights, binding.info.top_k, dim=-1)
        return torch.where(w > 0, idx, DROPPED_INDEX), w

    def routing_from_experts(self, args, kwargs):
        return None
