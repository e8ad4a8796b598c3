"""What a profiling session records, one recorder per kind, chosen by the mode:

- `CounterRecorder` (every mode): the on-device routing counters of every MoE layer, grouped per
  device (`counters.DeviceCounters`), read once at the end into `LayerCounts`.
- `timing.PartTimer` ("timing" mode or ``cuda_events=True``): CUDA events around router / experts /
  shared per layer and phase.
- `KinetoRecorder` ("kineto" mode): owns the torch.profiler session — start, one profiler step per
  model forward, stop, export — and the per-step counter snapshots that go into the trace.

The session (session.py) hooks the model and feeds the recorders; recorders never hook anything.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_trace.analysis.rundata import PHASES, LayerCounts, LayerInfo, RunData

from .counters import DeviceCounters


class CounterRecorder:
    """On-device counters of every MoE layer, one `DeviceCounters` per device."""

    def __init__(self, layers: list[LayerInfo], probs: list[bool]):
        self.layers = layers
        by_dev: dict[str, list[int]] = {}
        for info in layers:
            by_dev.setdefault(info.device, []).append(info.index)
        self.devices: dict[str, DeviceCounters] = {}
        self.where: dict[int, tuple[DeviceCounters, int]] = {}
        for dev, idxs in by_dev.items():
            dc = DeviceCounters(torch.device(dev), [layers[i].num_experts for i in idxs])
            self.devices[dev] = dc
            for local, i in enumerate(idxs):
                self.where[i] = (dc, local)
                dc.probs[local] = probs[i]
        self._layer_of = {(id(dc), local): i for i, (dc, local) in self.where.items()}
        for dev in by_dev:
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(torch.device(dev))

    def set_step(self, phase: int, mask: torch.Tensor | None) -> None:
        """Phase and attention mask ([B, S] of the new positions, or None) of the forward that starts."""
        for dc in self.devices.values():
            dc.phase = phase
            dc.mask = mask

    def end_forward(self, capturing: bool) -> None:
        for dc in self.devices.values():
            dc.end_forward(capturing)

    def snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Device copies of the running counts of every device (no sync)."""
        return {dev: dc.snapshot() for dev, dc in self.devices.items()}

    def layer_index(self, dc: DeviceCounters, local: int) -> int:
        return self._layer_of[(id(dc), local)]

    def collect(self) -> dict[str, list[LayerCounts | None]]:
        """Read every device once and build {phase: [LayerCounts per layer]}."""
        counts: dict[str, list[LayerCounts | None]] = {p: [None] * len(self.layers) for p in PHASES}
        for dc in self.devices.values():
            c, k, conf, pad = dc.read()
            for local in range(dc.L):
                i = self.layer_index(dc, local)
                E = self.layers[i].num_experts
                for p, phase in enumerate(PHASES):
                    kh = k[p, local]
                    last = int(np.nonzero(kh)[0].max()) if kh.any() else 0
                    # tokens from the device (one k-histogram entry per token), so they stay right
                    # under CUDA-graph replay, where host-side hooks ran only at capture
                    counts[phase][i] = LayerCounts(
                        tokens=int(kh.sum()), calls=int(dc.calls[p, local]),
                        expert_counts=c[p, local, :E].astype(np.int64),
                        k_hist=kh[: max(last, self.layers[i].top_k) + 1].astype(np.int64),
                        excluded=int(c[p, local, E:dc.E + 1].sum()), dropped=int(c[p, local, dc.E + 1]),
                        padding_tokens=int(pad[p, local]),
                        top1_prob_sum=float(conf[p, local, 0]), entropy_sum=float(conf[p, local, 1]))
        return counts

    def peak_memory(self) -> dict[str, int]:
        return {dev: int(torch.cuda.max_memory_allocated(torch.device(dev)))
                for dev in self.devices if dev.startswith("cuda")}


class KinetoRecorder:
    """The torch.profiler session of a "kineto" run and the trace files it becomes.

    `start()` enters a profiler, `snapshot(...)` and `advance()` are called after every model
    forward (counter snapshot, then ``prof.step()``), `stop()` leaves it and keeps the raw export in a private temp
    dir, `export(run_data, run_id)` writes the moe-trace traces under `logdir` and removes the temp
    dir. `close()` removes the temp dir in any case (idempotent).
    """

    def __init__(self, logdir: Path, counters: CounterRecorder, *, schedule: Any = None, slim: bool = True,
                 record_shapes: bool = False, with_stack: bool = False):
        self.logdir = Path(logdir)
        self.counters = counters
        self.schedule = schedule
        self.slim = slim
        self.record_shapes = record_shapes
        self.with_stack = with_stack
        self.trace_files: list[Path] = []
        self._snapshots: list[tuple[int, int, int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self._raw_traces: list[Path] = []
        self._steps: tuple[int, list] | None = None
        self._prof = None
        self._tmpdir: Path | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    # -- profiler lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU]
        if any(d.startswith("cuda") for d in self.counters.devices) and torch.cuda.is_available():
            acts.append(ProfilerActivity.CUDA)
        sched = self.schedule
        if isinstance(sched, dict):
            sched = schedule(**sched)
        self._sched = sched
        self._tmpdir = Path(tempfile.mkdtemp(prefix="moe_trace_"))
        self._prof = profile(activities=acts, schedule=sched, record_shapes=self.record_shapes,
                             with_stack=self.with_stack,
                             on_trace_ready=self._on_trace_ready if sched is not None else None)
        self._prof.__enter__()

    def snapshot(self, step: int, phase: int, tokens_cum: int) -> None:
        """After a model forward: device copies of the counters (no sync), for per-step counts."""
        self._snapshots.append((step, phase, tokens_cum, self.counters.snapshot()))

    def advance(self) -> None:
        """After a model forward (and its observers): one profiler step."""
        if self._prof is not None:
            self._prof.step()

    def _on_trace_ready(self, prof) -> None:
        path = self._tmpdir / f"raw{len(self._raw_traces)}.json"
        prof.export_chrome_trace(str(path))
        self._raw_traces.append(path)

    def stop(self) -> None:
        prof, self._prof = self._prof, None
        if prof is None:
            return
        prof.__exit__(None, None, None)
        if self._sched is None:
            path = self._tmpdir / "raw0.json"
            prof.export_chrome_trace(str(path))
            self._raw_traces.append(path)

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # -- export -----------------------------------------------------------------------------------
    def export(self, run_data: RunData, run_id: str, started_at: float | None = None) -> list[Path]:
        """Write the moe-trace traces of the raw exports under `logdir` (names: trace/writer.py)."""
        from moe_trace.trace.writer import write_run_traces

        self.trace_files += write_run_traces(self._raw_traces, run_data, self.step_deltas(), self.logdir,
                                             slim=self.slim, process=dict(process_info(), run_id=run_id),
                                             started_at=started_at)
        for raw in self._raw_traces:
            raw.unlink(missing_ok=True)
        return self.trace_files

    def step_deltas(self) -> list[dict[str, Any]]:
        """Per-step counts (differences of successive device snapshots), read in one copy per device
        (computed once: the session's roofline and the trace export both use them)."""
        if self._steps is None or self._steps[0] != len(self._snapshots):
            self._steps = (len(self._snapshots), self._step_deltas())
        return self._steps[1]

    def _step_deltas(self) -> list[dict[str, Any]]:
        if not self._snapshots:
            return []
        layers_info = self.counters.layers
        host: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        n_snap = len(self._snapshots)
        for dev, dc in self.counters.devices.items():
            c, k, pad = (torch.stack([s[3][dev][j] for s in self._snapshots]).cpu().numpy() for j in range(3))
            shape = (n_snap, len(PHASES), dc.L, dc.bins)
            host[dev] = (c.reshape(shape), k.reshape(shape), pad.reshape(n_snap, len(PHASES), dc.L))
        steps = []
        prev_tokens = {p: 0 for p in range(len(PHASES))}
        for n, (step, phase, tokens_cum, _) in enumerate(self._snapshots):
            layers = {}
            padding = 0
            for dev, (c, k, pad) in host.items():
                dc = self.counters.devices[dev]
                dc_c = c[n, phase] - (c[n - 1, phase] if n else 0)
                dc_k = k[n, phase] - (k[n - 1, phase] if n else 0)
                dc_pad = pad[n, phase] - (pad[n - 1, phase] if n else 0)
                padding = max(padding, int(dc_pad.max(initial=0)))
                for local in range(dc.L):
                    i = self.counters.layer_index(dc, local)
                    E = layers_info[i].num_experts
                    layers[i] = {"expert_counts": dc_c[local, :E].tolist(),
                                 "k_hist": dc_k[local].tolist()}
            # a step's tokens leave out its padding positions, like the run's totals
            steps.append({"step": step, "phase": PHASES[phase], "tokens": tokens_cum - prev_tokens[phase] - padding,
                          "layers": layers})
            prev_tokens[phase] = tokens_cum
        return steps


def process_info() -> dict[str, Any]:
    """Rank, world size, host name and pid of this process (trace metadata and file names)."""
    rank = world = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return {"dist_rank": rank, "world_size": world, "hostname": socket.gethostname(), "pid": os.getpid()}
