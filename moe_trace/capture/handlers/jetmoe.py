"""JetMoE: `JetMoeParallelExperts` pairs (`input_linear`, `output_linear`, each one 3-D weight) and a
router returning 5 expert-sorted tensors with the logits last. Routing = top-k of the logits.
Covers both the MLP MoE and the mixture-of-attention (MoA) blocks."""
from __future__ import annotations

import torch
from torch import nn

from .generic import GenericHandler, find_router


def _single_3d(module: nn.Module):
    ps = [p for p in module.parameters(recurse=False) if p.dim() == 3]
    return ps[0] if len(ps) == 1 else None


class JetMoeHandler(GenericHandler):
    name = "jetmoe"
    supports_selectors = False

    def match(self, name, module, model):
        parts = [(n, c, _single_3d(c)) for n, c in module.named_children()]
        parts = [(n, c, w) for n, c, w in parts if w is not None]
        if len(parts) != 2:
            return None
        (n_in, m_in, w_in), (n_out, m_out, w_out) = parts
        e, first_out, hidden = w_in.shape
        if w_out.shape[0] != e or w_out.shape[1] != hidden:
            return None
        inter = w_out.shape[2]
        router = find_router(module, {id(m_in), id(m_out)}, e, hidden)
        if router is None:
            return None
        binding = self.bind(name, module, model, router[0], router[1], n_in, m_in, [],
                            e, hidden, inter, first_out == 2 * inter)
        binding.experts = [m_in, m_out]
        binding.info.experts = f"{name}.{n_in}"
        return binding

    def logits_from_router(self, output):
        return output[-1] if isinstance(output, (tuple, list)) else None

    def routing_from_experts(self, args, kwargs):
        return None

    def routing_from_router(self, binding, output):
        w, idx = torch.topk(output[-1], binding.info.top_k, dim=-1)
        return idx, torch.softmax(w.float(), dim=-1)
