"""The transformers 4.x layout: an `nn.ModuleList` of expert MLPs next to a router child, with
top-k done in the block or the router (4.x Mixtral, OLMoE, Qwen-MoE, Jamba, MiniMax, PhiMoE,
DeepSeek-V2/V3, Dots1, GLM-4-MoE, LongCat-Flash, Ernie-4.5, HunYuan, ...).

Routing is read at the router's output, in the two forms 4.x routers have:
- `(topk_indices [T,k] int, topk_weights [T,k])` (DeepSeek-V2/V3, Dots1, GLM-4(V)-MoE, LongCat): used
  as is (indices >= the routed experts are LongCat's zero experts: excluded);
- logits `[T,E]` (an `nn.Linear` gate, or HunYuan's gate module): the block's rule is recomputed,
  softmax -> top-k, with Ernie-4.5's `moe_statics` correction bias added for the choice.
Extra `nn.Identity` members of the list (LongCat's zero experts) are not computing experts.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import sizes
from .generic import GenericHandler, find_router, shared_children


def _computing_experts(experts: nn.ModuleList) -> int | None:
    """How many leading members are expert MLPs (all of one type); trailing Identity modules are zero experts."""
    mods = list(experts)
    n = len(mods)
    while n and isinstance(mods[n - 1], nn.Identity):
        n -= 1
    if n < 2 or len({type(m) for m in mods[:n]}) != 1:
        return None
    return n


class LegacyModuleListHandler(GenericHandler):
    name = "legacy_modulelist"
    supports_selectors = False

    def match(self, name, module, model):
        for ename, experts in module.named_children():
            if not isinstance(experts, nn.ModuleList):
                continue
            e = _computing_experts(experts)
            if e is None:
                continue
            router = find_router(module, {id(experts)}, e)
            if router is None:
                continue
            mats = [p for p in router[1].parameters() if p.dim() == 2]
            if not mats or not (e <= mats[0].shape[0] <= len(experts)):
                continue
            hidden = mats[0].shape[1]
            dims = sizes.mlp_dims(experts[0], hidden)
            if dims is None:
                continue
            shared = shared_children(module, {id(experts), id(router[1])})
            binding = self.bind(name, module, model, router[0], router[1], ename, experts, shared,
                                e, hidden, dims[0], dims[1])
            for owner in (module, router[1]):
                k = getattr(owner, "top_k", None)
                if isinstance(k, int) and k > 0:
                    binding.info.top_k = k
                    binding.info.sources["top_k"] = "module"
                    break
            binding.experts = list(experts)[:e]  # each expert MLP is called (and timed) on its own
            return binding
        return None

    def logits_from_router(self, output):
        return output if torch.is_tensor(output) else None

    def routing_from_router(self, binding, output):
        if isinstance(output, (tuple, list)) and len(output) >= 2 and torch.is_tensor(output[0]) \
                and not output[0].is_floating_point():
            return output[0], output[1]  # (topk_indices, topk_weights)
        logits = output[0] if isinstance(output, (tuple, list)) else output
        logits = logits.reshape(-1, logits.shape[-1])
        probs = torch.softmax(logits.float(), dim=-1)
        statics = getattr(binding.block, "moe_statics", None)  # Ernie-4.5: a bias on the choice only
        choice = statics(probs) if isinstance(statics, nn.Module) else probs
        idx = torch.topk(choice, binding.info.top_k, dim=-1).indices
        return idx, torch.gather(probs, -1, idx)

    def routing_from_experts(self, args, kwargs):
        return None
