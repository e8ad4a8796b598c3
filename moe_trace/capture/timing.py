"""Per-layer, per-part timers: CUDA events on GPUs (resolved once at the end), host clock on CPU."""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from moe_trace.analysis.rundata import PARTS, PHASES


class PartTimer:
    """Collects (phase, layer, part) intervals. `start`/`stop` never synchronize."""

    def __init__(self):
        self._open: dict[int, tuple] = {}
        self._cuda: list[tuple[int, int, str, torch.cuda.Event, torch.cuda.Event]] = []
        self._host: dict[tuple[int, int, str], float] = defaultdict(float)
        self.uses_cuda = False
        self.uses_host = False

    def start(self, key: int, phase: int, layer: int, part: str, device: torch.device) -> None:
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(device))
            self._open[key] = (phase, layer, part, ev, device)
        else:
            self._open[key] = (phase, layer, part, time.perf_counter(), device)

    def stop(self, key: int) -> None:
        entry = self._open.pop(key, None)
        if entry is None:
            return
        phase, layer, part, start, device = entry
        if isinstance(start, torch.cuda.Event):
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(device))
            self._cuda.append((phase, layer, part, start, end))
            self.uses_cuda = True
        else:
            self._host[(phase, layer, part)] += (time.perf_counter() - start) * 1e3
            self.uses_host = True

    def resolve(self, num_layers: int) -> tuple[dict[str, list[dict[str, float | None]]], str]:
        """Milliseconds per phase and layer: {phase: [{"router_ms", "experts_ms", "shared_ms"}]}."""
        totals: dict[tuple[int, int, str], float] = defaultdict(float, self._host)
        if self._cuda:
            torch.cuda.synchronize()
            for phase, layer, part, s, e in self._cuda:
                totals[(phase, layer, part)] += s.elapsed_time(e)
        out = {}
        for p, phase in enumerate(PHASES):
            out[phase] = [{f"{part}_ms": totals.get((p, i, part)) for part in PARTS} for i in range(num_layers)]
        source = "cuda_events" if self.uses_cuda and not self.uses_host else (
            "host_clock" if not self.uses_cuda else "cuda_events+host_clock")
        self._cuda.clear()
        return out, source
