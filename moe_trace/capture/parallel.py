"""The parallel layout of a model that transformers loaded with tensor / expert parallelism.

Read once at `profile()` entry (no sync): which ranks hold the same batch (TP ranks do, so a report
that combines ranks counts their routing once) and, under expert parallelism, which experts this
rank holds (transformers shards the stacked expert weights contiguously along the expert dim).
"""
from __future__ import annotations

from typing import Any

from torch import nn


def _mesh_ranks(mesh) -> list[int] | None:
    try:
        import torch.distributed as dist

        return sorted(dist.get_process_group_ranks(mesh.get_group()))
    except Exception:
        return None


def _sub_mesh(model: nn.Module, name: str):
    manager = getattr(model, "_mesh_manager", None)
    get = getattr(manager, "get_mesh", None)
    if callable(get):
        try:
            return get(name)
        except Exception:
            return None
    mesh = getattr(model, "_device_mesh", None)
    try:
        return mesh[name] if mesh is not None else None
    except Exception:
        return None


def parallel_layout(model: nn.Module, experts: list[nn.Module]) -> dict[str, Any] | None:
    """{tp_size, ep_size, fsdp_size, rank, world_size, batch_group, ep_rank, experts_per_ep_rank};
    None when torch.distributed is not initialised."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:
        return None
    cfg = getattr(getattr(model, "config", None), "distributed_config", None)

    def size(name: str) -> int:
        for v in (getattr(model, f"_{name}_size", None), getattr(cfg, f"{name}_size", None)):
            if isinstance(v, int) and v > 0:
                return v
        return 1

    tp, ep, fsdp = size("tp"), size("ep"), size("fsdp")
    batch_group = rank
    if tp > 1:
        ranks = _mesh_ranks(_sub_mesh(model, "tp")) if _sub_mesh(model, "tp") is not None else None
        batch_group = ranks[0] if ranks else rank - rank % tp
    ep_rank = per_rank = None
    sharded = [m for m in experts if getattr(m, "_is_expert_parallel", False)]
    if ep > 1 or sharded:
        mesh = _sub_mesh(model, "ep")
        ep_rank = mesh.get_local_rank() if mesh is not None and hasattr(mesh, "get_local_rank") else rank % max(ep, 1)
        local = getattr(sharded[0], "num_experts", None) if sharded else None
        per_rank = int(local) if isinstance(local, int) else None
        if ep <= 1 and mesh is not None:
            ep = mesh.size()
    return {"tp_size": tp, "ep_size": ep, "fsdp_size": fsdp, "dist_rank": rank, "world_size": world,
            "batch_group": int(batch_group), "ep_rank": None if ep_rank is None else int(ep_rank),
            "experts_per_ep_rank": per_rank}
