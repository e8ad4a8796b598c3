"""DBRX: experts keep 2-D `w1`/`v1`/`w2` [E*I, H] viewed per expert, the router returns logits only;
top-k happens in the block and reaches the experts as `experts(hidden, top_k_index, top_k_weights)`.
transformers 4.x: the experts count is `moe_num_experts` and the call is
`experts(x, weights [T,E], top_weights [T,k], top_experts [T,k])` (read by type and shape)."""
from __future__ import annotations

from .generic import GenericHandler, find_router, shared_children
from .named_routing import routing_from_call


class DbrxHandler(GenericHandler):
    name = "dbrx"

    def match(self, name, module, model):
        for ename, experts in module.named_children():
            mlp = getattr(experts, "mlp", None)
            e = getattr(experts, "num_experts", getattr(experts, "moe_num_experts", None))
            if mlp is None or not isinstance(e, int) or not all(hasattr(mlp, w) for w in ("w1", "v1", "w2")):
                continue
            w1 = mlp.w1
            if w1.dim() != 2 or w1.shape[0] % e:
                continue
            hidden, inter = w1.shape[1], w1.shape[0] // e
            router = find_router(module, {id(experts)}, e, hidden)
            if router is None:
                continue
            shared = shared_children(module, {id(experts), id(router[1])})
            return self.bind(name, module, model, router[0], router[1], ename, experts, shared,
                             e, hidden, inter, True)
        return None

    def routing_from_experts(self, args, kwargs):
        if len(args) + len(kwargs) > 3:  # 4.x: (x, weights, top_weights, top_experts)
            return routing_from_call(args, kwargs)
        return super().routing_from_experts(args, kwargs)
