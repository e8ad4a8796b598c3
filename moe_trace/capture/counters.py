"""On-device routing counters: preallocated buffers filled with `index_add_`, read once at the end.

Hooks only *queue* each layer's routing tensors (no kernel, no sync). At the end of a model forward
`end_forward()` either counts the queue or, while it is small, leaves it for later: decode steps are
batched, so one flush of ~20 kernels counts up to `MAX_DEFERRED_FORWARDS` forwards of all layers
(stacked over forwards and layers). A flush happens at once while a CUDA graph is being captured (so
the counting kernels are in the graph and replay with it), when the queue grows past
`DEFER_ELEMENTS`, and before every read. Nothing here calls `.item()`, `.cpu()` or synchronizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe_trace.analysis.rundata import PHASES

# An index handlers use for a slot the router chose but could not dispatch (expert capacity):
# counted in `LayerCounts.dropped`, never as routed and never in the k histogram.
DROPPED_INDEX = -2

# Flush early (inside a forward) when queued tensors exceed this many elements (bounds held memory).
MAX_PENDING_ELEMENTS = 1 << 25
# At the end of a forward, count at once when the queue holds more elements than this or more forwards.
DEFER_ELEMENTS = 1 << 20
MAX_DEFERRED_FORWARDS = 32


@dataclass
class Pending:
    local: int          # layer position on this device
    phase: int
    indices: torch.Tensor   # [T, k]
    weights: torch.Tensor   # [T, k]
    scores: torch.Tensor | None  # [T, E'] logits (or probabilities when `is_probs`)
    is_probs: bool
    mask: torch.Tensor | None = None  # attention mask of the forward's new positions [B, S] (T == B*S)


class DeviceCounters:
    """Counters of the MoE layers that live on one device."""

    def __init__(self, device: torch.device, num_experts: list[int]):
        self.device = device
        self.L = len(num_experts)
        self.E = max(num_experts)
        # bin E: assignments to no computing expert (excluded); bin E+1: slots dropped by capacity
        self.bins = self.E + 2
        P = len(PHASES)
        # one buffer, five regions (one index_add_ fills them all): expert counts [P, L, E+2], the k
        # histogram [P, L, E+2], padding positions [P, L] (attention mask 0: not routed tokens), one
        # trash slot where the assignments of padding positions go, and the routing calls [P, L]
        # counted inside compiled code (`count_now`; eager calls are counted on the host)
        self._size = P * self.L * self.bins
        self._pad_base = 2 * self._size
        self._trash = self._pad_base + P * self.L
        self._calls_base = self._trash + 1
        self._hist = torch.zeros(self._calls_base + P * self.L, dtype=torch.int64, device=device)
        self.counts = self._hist[: self._size]
        self.k_hist = self._hist[self._size: 2 * self._size]
        self.padding = self._hist[self._pad_base: self._trash]
        self._ones = torch.ones(1024, dtype=torch.int64, device=device)
        self.conf = torch.zeros(P, self.L, 2, dtype=torch.float64, device=device)
        self.num_experts = num_experts
        self._num_experts = torch.tensor(num_experts, dtype=torch.int64, device=device)
        self._tiled: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for p in range(P):  # one forward's offsets exist up front (CUDA-graph capture flushes every forward)
            self._tiled_offsets(p, 1)
        self._forwards: list[list[Pending | tuple]] = [[]]   # queued items, one list per forward
        self._pending_elems = 0
        self.phase = 0                       # phase of the current forward (set by the session)
        self.mask: torch.Tensor | None = None  # attention mask of the current forward's new positions
        self.probs = [False] * self.L        # per layer: router scores are probabilities already
        self.calls = np.zeros((P, self.L), dtype=np.int64)   # routing calls counted per phase and layer

    @property
    def pending(self) -> list[Pending | tuple]:
        return [it for fw in self._forwards for it in fw]

    def queue(self, item: Pending) -> None:
        if torch.compiler.is_compiling():
            self.count_now(item)
            return
        self._forwards[-1].append(item)
        self._pending_elems += item.indices.numel() + (item.scores.numel() if item.scores is not None else 0)
        if self._pending_elems > MAX_PENDING_ELEMENTS:
            self.flush()

    def count_now(self, item: Pending | tuple) -> None:
        """Count one routing call at once with in-place device ops only: the path inside
        torch.compile'd code, where the Python queue would make dynamo guard on (and recompile for)
        its changing length. The counting ops become part of the compiled graph (no sync)."""
        it = item if isinstance(item, Pending) else self._from_router_output(*item)
        it = self._with_mask(it, {})
        off = it.phase * self.L * self.bins + it.local * self.bins
        pad = self._pad_base + it.phase * self.L + it.local
        self._count([it], off, off + self._size, self.num_experts[it.local], pad,
                    calls=self._calls_base + it.phase * self.L + it.local)
        self._confidence([it], None)

    def queue_router_output(self, local: int, output: tuple) -> None:
        """The hot path: a standard router output `(logits, top_k_weights, top_k_index)` kept as is;
        it becomes a `Pending` at flush time (one tuple append per layer inside the forward)."""
        if torch.compiler.is_compiling():
            self.count_now((local, self.phase, output, self.mask))
            return
        self._forwards[-1].append((local, self.phase, output, self.mask))
        self._pending_elems += output[0].numel()
        if self._pending_elems > MAX_PENDING_ELEMENTS:
            self.flush()

    def end_forward(self, capturing: bool = False) -> None:
        """Close the current forward's queue; count now if capturing a CUDA graph or the queue is large
        (the session also asks for a count at once when grad is on, so no autograd graph is kept)."""
        if not self._forwards[-1]:
            return
        if capturing or self._pending_elems > DEFER_ELEMENTS or len(self._forwards) >= MAX_DEFERRED_FORWARDS:
            self.flush()
        else:
            self._forwards.append([])

    def flush(self) -> None:
        with torch.no_grad():  # counting is never part of the user's autograd graph
            self._flush()

    def _flush(self) -> None:
        flat_masks: dict[int, torch.Tensor] = {}  # one flattened mask per forward (the originals stay alive)
        forwards = [[self._with_mask(it if isinstance(it, Pending) else self._from_router_output(*it), flat_masks)
                     for it in fw] for fw in self._forwards if fw]
        self._forwards, self._pending_elems = [[]], 0
        if not forwards:
            return
        # forwards that routed every layer in order with one shape are counted together
        groups: dict[tuple, list[Pending]] = {}
        for fw in forwards:
            sig = {_signature(it) for it in fw}
            if len(fw) == self.L and len(sig) == 1 and all(it.local == n for n, it in enumerate(fw)):
                groups.setdefault(sig.pop(), []).extend(fw)
                self.calls[fw[0].phase] += 1
            else:
                for it in fw:
                    self.calls[it.phase, it.local] += 1
                    off = it.phase * self.L * self.bins + it.local * self.bins
                    pad = self._pad_base + it.phase * self.L + it.local
                    self._count([it], off, off + self._size, self.num_experts[it.local], pad)
                    self._confidence([it], None)
        for items in groups.values():
            offsets, k_offsets, num_experts, pad = self._tiled_offsets(items[0].phase, len(items) // self.L)
            self._count(items, offsets, k_offsets, num_experts, pad)
            self._confidence(items, items[0].phase)

    def _from_router_output(self, local: int, phase: int, output: tuple, mask=None) -> Pending:
        logits, weights, indices = output
        scores = logits
        if scores.dim() != 2 or scores.shape[0] != indices.shape[0]:
            rows = max(indices.shape[0], 1)
            scores = scores.reshape(indices.shape[0], -1) if scores.numel() % rows == 0 else None
        return Pending(local, phase, indices, weights, scores, self.probs[local], mask)

    def _with_mask(self, it: Pending, cache: dict[int, torch.Tensor]) -> Pending:
        """Flatten the item's mask to its rows ([T] bool; host metadata decides, no sync); a mask whose
        size is not the item's row count (a router that sees other rows) is dropped."""
        m = it.mask
        if m is None:
            return it
        if m.numel() != it.indices.shape[0]:
            it.mask = None
            return it
        flat = cache.get(id(m))
        if flat is None:
            flat = m.reshape(-1).to(self.device, non_blocking=True) != 0
            cache[id(m)] = flat
        it.mask = flat
        return it

    def _tiled_offsets(self, phase: int, n: int):
        """Offsets [n*L,1,1] of every layer of `n` whole forwards in the flat buffers (cached on the device)."""
        key = (phase, n)
        if key not in self._tiled:
            layers = torch.arange(self.L, dtype=torch.int64, device=self.device)
            base = layers * self.bins + phase * self.L * self.bins
            off = base.repeat(n).view(-1, 1, 1)
            ne = self._num_experts.repeat(n).view(-1, 1, 1)
            pad = (layers + self._pad_base + phase * self.L).repeat(n).view(-1, 1)
            self._tiled[key] = (off, off.view(-1, 1) + self._size, ne, pad)
        return self._tiled[key]

    def _count(self, items: list[Pending], offsets, k_offsets, num_experts, pad_offsets, calls=None) -> None:
        idx = torch.stack([it.indices for it in items])                           # [n, T, k]
        if idx.dtype != torch.int64:
            idx = idx.to(torch.int64)
        w = torch.stack([_as_topk_weights(it.weights, it.indices) for it in items])
        valid = (w != 0) & (idx >= 0) & (idx < num_experts)
        slot = torch.where(valid, idx, torch.where(idx == DROPPED_INDEX, self.E + 1, self.E)) + offsets
        k = valid.sum(-1) + k_offsets                                             # k-histogram region
        if items[0].mask is not None:  # padding positions: no assignment, no k, one padding count
            real = _stack_masks(items)                                            # [n, T]
            slot = torch.where(real.unsqueeze(-1), slot, self._trash)
            k = torch.where(real, k, pad_offsets)
        flat = torch.cat([slot.reshape(-1), k.reshape(-1)])
        if calls is not None:  # compiled code: the call is counted on the device too; no shared state
            flat = torch.cat([flat, flat.new_full((1,), calls)])
            self._hist.index_add_(0, flat, torch.ones_like(flat))
            return
        if flat.numel() > self._ones.numel():
            self._ones = torch.ones(2 * flat.numel(), dtype=torch.int64, device=self.device)
        self._hist.index_add_(0, flat, self._ones[: flat.numel()])

    def _confidence(self, items: list[Pending], whole_phase: int | None) -> None:
        """Sums of the top-1 probability and the routing entropy; `whole_phase`: items are whole forwards."""
        if items[0].scores is None:
            return
        s = torch.stack([it.scores for it in items])                              # [n, T, E']
        p = s.float() if items[0].is_probs else torch.softmax(s, dim=-1, dtype=torch.float32)
        top1 = p.amax(-1)                                                         # [n, T]
        ent = torch.special.entr(p).sum(-1)                                       # [n, T]
        if items[0].mask is not None:
            real = _stack_masks(items).to(top1.dtype)
            top1, ent = top1 * real, ent * real
        top1, ent = top1.sum(-1), ent.sum(-1)                                     # [n]
        if whole_phase is not None:
            both = torch.stack([top1, ent], -1).view(-1, self.L, 2).sum(0)        # [L, 2]
            self.conf[whole_phase] += both
        else:
            it = items[0]
            self.conf[it.phase, it.local, 0] += top1[0]
            self.conf[it.phase, it.local, 1] += ent[0]

    def snapshot(self) -> tuple:
        """Device copies of the running counts, k histogram, padding and confidence sums (no sync),
        plus a host copy of the call counts and a device copy of those counted in compiled code;
        per-step and per-window counts come from differences."""
        self.flush()
        snap = self._hist.clone()
        return (snap[: self._size], snap[self._size: 2 * self._size], snap[self._pad_base: self._trash],
                self.conf.clone(), self.calls.copy(), snap[self._calls_base:])

    def read(self):
        """Host copies: counts [P, L, E+2], k_hist [P, L, E+2], conf [P, L, 2], padding [P, L] and
        routing calls [P, L] (eager + compiled). Syncs once."""
        self.flush()
        P = len(PHASES)
        hist = self._hist.cpu().numpy()
        counts = hist[: self._size].reshape(P, self.L, self.bins)
        k_hist = hist[self._size: 2 * self._size].reshape(P, self.L, self.bins)
        padding = hist[self._pad_base: self._trash].reshape(P, self.L)
        calls = self.calls + hist[self._calls_base:].reshape(P, self.L)
        conf = self.conf.cpu().numpy()
        return counts, k_hist, conf, padding, calls


def _signature(it: Pending) -> tuple:
    return (it.phase, tuple(it.indices.shape), tuple(it.weights.shape),
            None if it.scores is None else tuple(it.scores.shape), it.is_probs, it.mask is not None)


def _stack_masks(items: list[Pending]) -> torch.Tensor:
    """[n, T] bool masks of the items; items of one forward share one mask tensor (stacked once)."""
    first = items[0].mask
    if all(it.mask is first for it in items):
        return first.unsqueeze(0).expand(len(items), -1)
    return torch.stack([it.mask for it in items])


def _as_topk_weights(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Weights per selected slot; some families pass dense [T, E] weights (DeepSeek-V2 style)."""
    if weights.shape == indices.shape:
        return weights
    return torch.gather(weights.reshape(indices.shape[0], -1), -1, indices.to(torch.int64).clamp(0, weights.shape[-1] - 1))
