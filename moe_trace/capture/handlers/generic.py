"""The common transformers-5 MoE structure (64 of 70 families).

Recognised by structure: a module (the block) with a child holding experts stacked along a
leading dimension E (3-D parameters) and a child router whose single weight matrix is [E', H]
with E <= E' (E' > E: skip or zero experts, as zaya and longcat_flash have). Routing is read at the
experts' call `experts(hidden, top_k_index, top_k_weights)`, exactly what the kernels consume.
"""
from __future__ import annotations

from torch import nn

from moe_trace.analysis.rundata import LayerInfo

from .. import sizes
from .base import MoEBinding, MoEHandler


def _matrices(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.dim() >= 2 and min(p.shape) > 1]


def find_router(block: nn.Module, exclude: set[int], num_experts: int, hidden: int | None = None
                ) -> tuple[str, nn.Module] | None:
    """The child of `block` that routes: its only matrix is the [E, H] projection; else one [E', H]
    with E < E' <= 2E (skip / zero experts); else a child that declares `top_k` / `num_experts` or is
    named like a router (routers with their own MLP, as zaya's)."""
    children = [(n, c) for n, c in block.named_children() if id(c) not in exclude]
    single = [(n, c, tuple(_matrices(c)[0].shape)) for n, c in children if len(_matrices(c)) == 1]
    for rule in (lambda s: s[0] == num_experts, lambda s: num_experts < s[0] <= 2 * num_experts):
        for n, c, shape in single:
            if len(shape) == 2 and rule(shape) and (hidden is None or shape[1] == hidden):
                return n, c
    for n, c in children:
        if _matrices(c) and (hasattr(c, "top_k") or hasattr(c, "num_experts") or n in ("gate", "router")):
            return n, c
    return None


def shared_children(block: nn.Module, exclude: set[int]) -> list[tuple[str, nn.Module]]:
    """Children named like shared experts that are MLPs (a 1-output shared gate is not one)."""
    out = []
    for cname, child in block.named_children():
        if id(child) in exclude or "shared" not in cname.lower():
            continue
        if isinstance(child, nn.Linear) and child.out_features == 1:
            continue
        if any(p.dim() >= 2 for p in child.parameters()):
            out.append((cname, child))
    return out


def stacked_experts_dims(experts: nn.Module) -> tuple[int, int, int, bool] | None:
    """(E, H, I, gated) from 3-D expert weights: gate_up [E,2I,H] / down [E,H,I], or transposed, or up-only."""
    params = sizes.stacked_params(experts)
    if not params:
        return None
    e = min(p.shape[0] for p in params.values())
    down = _first(params, ("down_proj", "w2"))
    first = _first(params, ("gate_up_proj", "up_proj", "w1"))
    if down is None or first is None:
        ordered = list(params.values())
        if len(ordered) < 2:
            return None
        first, down = ordered[0], ordered[-1]
    # down maps I -> H: [E, H, I] (normal) or [E, I, H] (transposed); first maps H -> (2)I.
    d1, d2 = down.shape[1], down.shape[2]
    f1, f2 = first.shape[1], first.shape[2]
    if f2 in (d1,) and f1 in (d2, 2 * d2):  # normal: first [E, (2)I, H], down [E, H, I]
        hidden, inter, first_out = d1, d2, f1
    elif f1 == d2 and f2 in (d1, 2 * d1):  # transposed: first [E, H, (2)I], down [E, I, H]
        hidden, inter, first_out = d2, d1, f2
    else:
        return None
    gated = bool(getattr(experts, "has_gate", first_out == 2 * inter))
    return e, hidden, inter, gated


def _first(params: dict, names: tuple[str, ...]):
    for n in names:
        if n in params:
            return params[n]
    return None


class GenericHandler(MoEHandler):
    name = "generic"

    def match(self, name, module, model):
        for ename, experts in module.named_children():
            dims = stacked_experts_dims(experts)
            if dims is None:
                continue
            e_mod, h_mod, i_mod, gated = dims
            e_attr = getattr(experts, "num_experts", None)
            # under expert parallelism transformers sets `num_experts` to the per-rank count; routing
            # ids stay global, as do the (DTensor) weights' shapes
            if getattr(experts, "_is_expert_parallel", False):
                e_attr = None
            num_experts_module = e_attr if isinstance(e_attr, int) and e_attr <= e_mod else e_mod
            router = find_router(module, {id(experts)}, num_experts_module)
            if router is None:
                continue
            rname, rmod = router
            shared = shared_children(module, {id(experts), id(rmod)})
            return self.bind(name, module, model, rname, rmod, ename, experts, shared,
                             num_experts_module, h_mod, i_mod, gated)
        return None

    def bind(self, name, block, model, rname, router, ename, experts, shared, e_mod, h_mod, i_mod, gated,
             dense_experts: bool = False) -> MoEBinding:
        config = sizes.text_config(getattr(experts, "config", None) or getattr(model, "config", None))
        src: dict[str, str] = {}
        num_experts = sizes.resolve("num_experts", config, e_mod, src)
        k_mod = getattr(router, "top_k", None)
        top_k = sizes.resolve("top_k", config, k_mod if isinstance(k_mod, int) else None, src)
        mats = _matrices(router) if router is not None else []
        h_router = mats[0].shape[-1] if mats else h_mod
        router_flops = sum(2 * m.shape[-1] * m.shape[-2] * (m.shape[0] if m.dim() == 3 else 1) for m in mats)
        hidden = sizes.resolve("hidden_size", config, h_router, src)
        # experts may work in their own width (muse_spark projects H -> moe_hidden_size around them)
        expert_hidden = h_mod if h_mod != hidden else 0
        expert_dim = sizes.resolve("expert_dim", config, i_mod, src)
        src["gated"] = "module"
        if router_flops and router_flops != 2 * hidden * num_experts:
            src["router_flops"] = "module (router matrices)"
        else:
            router_flops = 0
        sdim, sgated = 0, True
        for _, smod in shared:
            dims = sizes.mlp_dims(smod, hidden)
            if dims:
                sdim += dims[0]
                sgated = dims[1]
        src["shared_expert_dim"] = "module" if shared else "none"
        prefix = f"{name}." if name else ""
        impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        info = LayerInfo(
            index=-1, name=name, family=_family(model), num_experts=num_experts, top_k=top_k,
            hidden_size=hidden, router_flops_per_token=router_flops, expert_dim=expert_dim, expert_hidden_size=expert_hidden, shared_expert_dim=sdim, gated=gated,
            shared_gated=sgated, dense_experts=dense_experts, device=sizes.module_device(experts),
            router=prefix + rname if rname else None, experts=prefix + ename,
            shared=[prefix + s for s, _ in shared], handler=self.name,
            experts_implementation=impl if isinstance(impl, str) else None, sources=src,
        )
        return MoEBinding(info=info, handler=self, block=block, router=router, experts=[experts],
                          shared=[m for _, m in shared])


def _family(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    text = sizes.text_config(cfg)
    return str(getattr(text, "model_type", None) or getattr(cfg, "model_type", None) or type(model).__name__)
