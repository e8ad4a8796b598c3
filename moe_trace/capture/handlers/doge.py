"""Doge (cross-domain MoE): product-key retrieval experts stored as two `nn.Embedding(E, H)` rows
(`down_embed`, `up_embed`), a `router_gate` over 2*sqrt(E) keys, and the block's own dense MLP as
the shared part. Routing is read at `down_embed`'s input (the selected expert ids [T, k]).
Each assignment costs a dot product and an axpy over H: 4*H FLOPs (expert_dim 1, no gate)."""
from __future__ import annotations

import torch
from torch import nn

from ..versions import require
from .generic import GenericHandler


class ProductKeyEmbeddingHandler(GenericHandler):
    name = "doge"
    supports_selectors = False

    def match(self, name, module, model):
        down, up = getattr(module, "down_embed", None), getattr(module, "up_embed", None)
        gate = getattr(module, "router_gate", None)
        if not (isinstance(down, nn.Embedding) and isinstance(up, nn.Embedding) and isinstance(gate, nn.Linear)):
            return None
        require("doge (DogeCDMoE)", "5.0", "transformers 4.x's Doge decoder layer passes the MoE block's "
                "(hidden, router_logits) tuple to dropout, so the model cannot run")
        e, hidden = down.weight.shape
        shared = [(n, getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")
                  if isinstance(getattr(module, n, None), nn.Linear)]
        b = self.bind(name, module, model, "router_gate", gate, "down_embed", down, [], e, hidden, 1, False)
        b.experts = [down, up]
        if len(shared) == 3:
            b.shared = [m for _, m in shared]
            b.info.shared = [f"{name}.{n}" for n, _ in shared]
            b.info.shared_expert_dim = shared[0][1].out_features
            b.info.shared_gated = True
            b.info.sources["shared_expert_dim"] = "module (the block's dense MLP)"
        b.info.expert_dim = 1
        b.info.sources["expert_dim"] = "module (product-key embedding experts)"
        return b

    def logits_from_router(self, output):
        return None  # product-key logits [2, T, sqrt(E)] are not a distribution over experts

    def routing_from_experts(self, args, kwargs):
        idx = args[0] if args else kwargs.get("input")
        return idx, torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
