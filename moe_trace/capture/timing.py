"""Per-layer, per-part timers: CUDA events on GPUs (resolved once at the end), host clock on CPU.

Host cost matters at batch 1, where decode is launch-bound: events come from a per-device pool
that is refilled when a run resolves, and each device's current stream is looked up with one
C call and reused while it stays the same (`torch.cuda.current_stream` builds a new Python object).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from moe_trace.analysis.rundata import PARTS, PHASES

#: Events kept for reuse per device (enough for a few thousand timed parts).
POOL_LIMIT = 1 << 15
_event_pool: dict[int, list[torch.cuda.Event]] = defaultdict(list)


class PartTimer:
    """Collects (phase, layer, part) intervals. `start`/`stop` never synchronize."""

    def __init__(self):
        self._open: dict[int, tuple] = {}
        self._cuda: list[tuple[int, int, str, torch.cuda.Event, torch.cuda.Event, int]] = []
        self._host: dict[tuple[int, int, str], float] = defaultdict(float)
        self._streams: dict[int, tuple[tuple, torch.cuda.Stream]] = {}
        self.uses_cuda = False
        self.uses_host = False

    def _record(self, index: int) -> torch.cuda.Event:
        raw = torch._C._cuda_getCurrentStream(index)
        cached = self._streams.get(index)
        if cached is None or cached[0] != raw:
            cached = (raw, torch.cuda.Stream(stream_id=raw[0], device_index=raw[1], device_type=raw[2]))
            self._streams[index] = cached
        pool = _event_pool[index]
        ev = pool.pop() if pool else torch.cuda.Event(enable_timing=True)
        ev.record(cached[1])
        return ev

    def start(self, key: int, phase: int, layer: int, part: str, device: torch.device) -> None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._open[key] = (phase, layer, part, self._record(index), index)
        else:
            self._open[key] = (phase, layer, part, time.perf_counter(), None)

    def stop(self, key: int) -> None:
        entry = self._open.pop(key, None)
        if entry is None:
            return
        phase, layer, part, start, index = entry
        if index is not None:
            self._cuda.append((phase, layer, part, start, self._record(index), index))
            self.uses_cuda = True
        else:
            self._host[(phase, layer, part)] += (time.perf_counter() - start) * 1e3
            self.uses_host = True

    def resolve(self, num_layers: int) -> tuple[dict[str, list[dict[str, float | None]]], str]:
        """Milliseconds per phase and layer: {phase: [{"router_ms", "experts_ms", "shared_ms"}]}."""
        totals: dict[tuple[int, int, str], float] = defaultdict(float, self._host)
        if self._cuda:
            torch.cuda.synchronize()
            for phase, layer, part, s, e, index in self._cuda:
                totals[(phase, layer, part)] += s.elapsed_time(e)
                pool = _event_pool[index]
                if len(pool) < POOL_LIMIT:
                    pool += (s, e)
        out = {}
        for p, phase in enumerate(PHASES):
            out[phase] = [{f"{part}_ms": totals.get((p, i, part)) for part in PARTS} for i in range(num_layers)]
        source = "cuda_events" if self.uses_cuda and not self.uses_host else (
            "host_clock" if not self.uses_cuda else "cuda_events+host_clock")
        self._cuda.clear()
        return out, source
