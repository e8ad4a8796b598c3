"""On-device routing counters: preallocated buffers filled with `index_add_`, read once at the end.

Hooks only *queue* each layer's routing tensors (no kernel, no sync); `flush()` runs at the end of
every model forward and counts all queued layers of a device in one batch of ~20 kernels (stacked
over layers) instead of ~20 kernels per layer. Nothing here calls `.item()`, `.cpu()` or synchronizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_trace.analysis.rundata import PHASES

# Flush early when queued logits exceed this many elements (bounds the extra memory held).
MAX_PENDING_ELEMENTS = 1 << 25


@dataclass
class Pending:
    local: int          # layer position on this device
    phase: int
    indices: torch.Tensor   # [T, k]
    weights: torch.Tensor   # [T, k]
    scores: torch.Tensor | None  # [T, E'] logits (or probabilities when `is_probs`)
    is_probs: bool


class DeviceCounters:
    """Counters of the MoE layers that live on one device."""

    def __init__(self, device: torch.device, num_experts: list[int]):
        self.device = device
        self.L = len(num_experts)
        self.E = max(num_experts)
        self.bins = self.E + 1  # last bin: assignments to no computing expert (excluded)
        P = len(PHASES)
        # one buffer, two regions: expert counts, then the k histogram (one index_add_ fills both)
        self._size = P * self.L * self.bins
        self._hist = torch.zeros(2 * self._size, dtype=torch.int64, device=device)
        self.counts = self._hist[: self._size]
        self.k_hist = self._hist[self._size:]
        self._ones = torch.ones(1024, dtype=torch.int64, device=device)
        self.conf = torch.zeros(P, self.L, 2, dtype=torch.float64, device=device)
        self._num_experts = torch.tensor(num_experts, dtype=torch.int64, device=device).view(-1, 1, 1)
        # offsets of layer l of phase p in the flat buffers, for the all-layers-in-order fast path
        base = torch.arange(self.L, dtype=torch.int64, device=device) * self.bins
        self._offsets = [(base + p * self.L * self.bins).view(-1, 1, 1) for p in range(P)]
        self.num_experts = num_experts
        self.pending: list[Pending] = []
        self._pending_elems = 0

    def queue(self, item: Pending) -> None:
        self.pending.append(item)
        self._pending_elems += item.indices.numel() + (item.scores.numel() if item.scores is not None else 0)
        if self._pending_elems > MAX_PENDING_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        items, self.pending, self._pending_elems = self.pending, [], 0
        same = (len(items) == self.L and all(it.local == i for i, it in enumerate(items))
                and len({(it.phase, tuple(it.indices.shape), tuple(it.weights.shape)) for it in items}) == 1)
        if same:
            self._count(items, self._offsets[items[0].phase], self._num_experts)
        else:
            for it in items:
                off = it.phase * self.L * self.bins + it.local * self.bins
                self._count([it], off, self.num_experts[it.local])
        self._confidence(items, same)

    def _count(self, items: list[Pending], offsets, num_experts) -> None:
        idx = torch.stack([it.indices for it in items])                           # [n, T, k]
        if idx.dtype != torch.int64:
            idx = idx.to(torch.int64)
        w = torch.stack([_as_topk_weights(it.weights, it.indices) for it in items])
        valid = (w != 0) & (idx >= 0) & (idx < num_experts)
        slot = torch.where(valid, idx, self.E) + offsets                          # counts region
        k_off = offsets.reshape(-1, 1) if torch.is_tensor(offsets) else offsets
        k = valid.sum(-1) + (k_off + self._size)                                  # k-histogram region
        flat = torch.cat([slot.reshape(-1), k.reshape(-1)])
        if flat.numel() > self._ones.numel():
            self._ones = torch.ones(2 * flat.numel(), dtype=torch.int64, device=self.device)
        self._hist.index_add_(0, flat, self._ones[: flat.numel()])

    def _confidence(self, items: list[Pending], same: bool) -> None:
        with_scores = [it for it in items if it.scores is not None]
        if not with_scores:
            return
        groups: dict[tuple, list[Pending]] = {}
        for it in with_scores:
            groups.setdefault((it.phase, tuple(it.scores.shape), it.is_probs), []).append(it)
        for (phase, _, is_probs), its in groups.items():
            s = torch.stack([it.scores for it in its])                            # [n, T, E']
            p = s.float() if is_probs else torch.softmax(s, dim=-1, dtype=torch.float32)
            top1 = p.amax(-1).sum(-1)                                             # [n]
            ent = torch.special.entr(p).sum((-2, -1))                             # [n]
            if same and len(its) == self.L:
                self.conf[phase, :, 0] += top1
                self.conf[phase, :, 1] += ent
            else:
                for j, it in enumerate(its):
                    self.conf[phase, it.local, 0] += top1[j]
                    self.conf[phase, it.local, 1] += ent[j]

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Device copies of the running counts (no sync); per-step deltas come from differences."""
        self.flush()
        snap = self._hist.clone()
        return snap[: self._size], snap[self._size:]

    def read(self):
        """Host copies: counts [P, L, E+1], k_hist [P, L, E+1], conf [P, L, 2]. Syncs once."""
        self.flush()
        P = len(PHASES)
        counts = self.counts.view(P, self.L, self.bins).cpu().numpy()
        k_hist = self.k_hist.view(P, self.L, self.bins).cpu().numpy()
        conf = self.conf.cpu().numpy()
        return counts, k_hist, conf


def _as_topk_weights(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Weights per selected slot; some families pass dense [T, E] weights (DeepSeek-V2 style)."""
    if weights.shape == indices.shape:
        return weights
    return torch.gather(weights.reshape(indices.shape[0], -1), -1, indices.to(torch.int64).clamp(0, weights.shape[-1] - 1))
