"""Layer sizes: config first, then module introspection, then defaults (each value says its source)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Config attribute names per quantity, most specific first.
CONFIG_KEYS = {
    "num_experts": ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts", "num_routed_experts"),
    "top_k": ("num_experts_per_tok", "moe_top_k", "top_k_experts", "num_experts_per_token", "top_k", "moe_k"),
    "hidden_size": ("hidden_size", "d_model", "n_embd"),
    "expert_dim": ("moe_intermediate_size", "expert_intermediate_size", "ffn_hidden_size",
                   "intermediate_size"),
}
DEFAULTS = {"num_experts": 8, "top_k": 2, "hidden_size": 4096, "expert_dim": 14336}


def text_config(config: Any) -> Any:
    """The decoder's config inside composite (multimodal) configs."""
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return config


def from_config(config: Any, quantity: str) -> int | None:
    if config is None:
        return None
    for cfg in (config, getattr(config, "ffn_config", None)):
        if cfg is None:
            continue
        for key in CONFIG_KEYS[quantity]:
            val = getattr(cfg, key, None)
            if isinstance(val, int) and not isinstance(val, bool) and val > 0:
                return val
    return None


def resolve(quantity: str, config: Any, module_value: int | None, sources: dict[str, str],
            prefer_module: bool = False) -> int:
    """Pick a size: config, then module, then default. A config value that the module's real
    tensor shapes contradict is not used (that would give silently wrong FLOPs)."""
    cfg = from_config(config, quantity)
    if cfg is not None and (module_value is None or cfg == module_value) and not prefer_module:
        sources[quantity] = "config"
        return cfg
    if module_value is not None:
        sources[quantity] = "module" if cfg is None or cfg == module_value else f"module (config said {cfg})"
        return module_value
    if cfg is not None:
        sources[quantity] = "config"
        return cfg
    sources[quantity] = "default"
    return DEFAULTS[quantity]


def linear_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every linear map inside `module`: nn.Linear layers, else 2-D weights, and 3-D
    weights as a stack of maps ([n, out, in]: n maps, as stacked shared experts keep them)."""
    shapes = []
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            shapes.append((sub.in_features, sub.out_features))
    if not shapes:
        for p in module.parameters():
            if p.dim() == 2:
                shapes.append((p.shape[1], p.shape[0]))
            elif p.dim() == 3:
                shapes.extend([(p.shape[2], p.shape[1])] * p.shape[0])
    return shapes


def mlp_dims(module: nn.Module, hidden: int) -> tuple[int, bool] | None:
    """(intermediate size, gated) of a dense MLP from its linear maps, or None if it is not one.
    Stacked MLPs report their summed width (n_shared * I)."""
    shapes = linear_shapes(module)
    if not shapes:
        return None
    total = sum(i * o for i, o in shapes)
    downs = [i for i, o in shapes if o == hidden and i != hidden] or [i for i, o in shapes if o == hidden]
    if not downs:
        return None
    inter = sum(downs)
    if total == 3 * hidden * inter:
        return inter, True
    if total == 2 * hidden * inter:
        return inter, False
    # unusual layout: express its cost as a gated MLP of equivalent width
    return max(1, round(total / (3 * hidden))), True


def module_device(module: nn.Module) -> str:
    """Where the module computes: its tensors' device, or for weights offloaded by accelerate (on the
    meta device between forwards) the execution device of its (or its parent's) offload hook."""
    dev = None
    for t in list(module.parameters())[:1] or list(module.buffers())[:1]:
        dev = str(t.device)
    if dev in (None, "meta"):
        hook = getattr(module, "_hf_hook", None)
        exe = getattr(hook, "execution_device", None)
        if exe is None:
            for sub in getattr(hook, "hooks", ()) or ():  # SequentialHook
                exe = getattr(sub, "execution_device", None) or exe
        if exe is not None:
            return str(torch.device(exe) if not isinstance(exe, int) else torch.device("cuda", exe))
    return dev or "cpu"


def stacked_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Direct 3-D parameters (experts stacked along dim 0) of `module`."""
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
