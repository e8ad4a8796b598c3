"""What reading a trace gives: `TraceData` (one file) and `PlainTraceSummary` (any Kineto trace)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_trace.analysis import Report, RunData
from moe_trace.errors import TraceError

from .format import MERGED_PREFIX, META_KEY


def kernel_scope_text(scope: str) -> str:
    """What a kernel count / kernel time of `PlainTraceSummary.devices` covers, in words."""
    if scope == "moe_ranges":
        return "only kernels inside MoE ranges (slim trace; profile with slim=False for all)"
    return "all kernels of the profiled steps"


@dataclass
class PlainTraceSummary:
    """What any Kineto trace tells without moe-trace metadata: GPU activity per device, steps, ranges."""

    path: str
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    profiler_steps: int = 0
    profiler_step_ms: float | None = None
    user_annotations: int = 0
    range_ms: dict[str, dict[str, Any]] = field(default_factory=dict)
    rank: int | None = None
    #: which GPU work `devices` counts: "all" (every kernel / memcpy / memset of the profiled steps) or
    #: "moe_ranges" (a slim trace keeps only the work inside MoE router / experts / shared ranges)
    kernel_scope: str = "all"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rank": self.rank, "devices": self.devices, "kernel_scope": self.kernel_scope,
                "kernel_scope_text": kernel_scope_text(self.kernel_scope), "profiler_steps": self.profiler_steps,
                "profiler_step_ms": self.profiler_step_ms, "user_annotations": self.user_annotations,
                "range_ms": self.range_ms}

    def __str__(self) -> str:
        lines = [f"trace summary: {self.path}" + (f" (rank {self.rank})" if self.rank is not None else "")]
        step = f", mean {self.profiler_step_ms:.3f} ms (host)" if self.profiler_step_ms is not None else ""
        lines.append(f"  profiler steps {self.profiler_steps}{step}; user annotations {self.user_annotations}")
        if self.devices:
            lines.append(f"  GPU work: {kernel_scope_text(self.kernel_scope)}")
            lines.append(f"  {'device':<16} {'kernels':>8} {'kernel ms':>11} {'memcpy ms':>10} {'memset ms':>10} "
                         f"{'span ms':>10} {'busy':>6}")
            for name, d in self.devices.items():
                busy = f"{100 * d['kernel_ms'] / d['span_ms']:.1f}%" if d["span_ms"] and self.kernel_scope == "all" \
                    else "-"
                lines.append(f"  {name:<16} {d['kernels']:>8} {d['kernel_ms']:>11.3f} {d['memcpy_ms']:>10.3f} "
                             f"{d['memset_ms']:>10.3f} {d['span_ms']:>10.3f} {busy:>6}")
        else:
            lines.append("  no GPU activity (a CPU-only trace)")
        if self.range_ms:
            lines.append(f"  moe_trace ranges: {len(self.range_ms)} (phase/layer/part), e.g.")
            for key in list(self.range_ms)[:6]:
                r = self.range_ms[key]
                t = " ".join(f"{k} {r[k]:.3f}" for k in ("gpu_ms", "cpu_ms") if r.get(k) is not None)
                lines.append(f"    {key:<24} x{r['count']:<5} {t}")
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class TraceData:
    """One trace file, read. `runs` holds one RunData per process (several for a merged trace)."""

    path: Path
    metadata: dict[str, Any]
    runs: list[RunData]
    steps: list[dict[str, Any]]
    counters: dict[int, dict[int, dict[str, Any]]]
    part_counters: list[dict[int, dict[int, dict[str, Any]]]]
    range_ms: dict[str, dict[str, Any]]
    summary: PlainTraceSummary
    timing_source: str | None
    parser: str
    bytes: int
    seconds: float
    event_count: int
    #: per part: {step: {"gpu_ms": {"router", "experts", "shared"} | None, "cpu_ms": {...}}} (build._step_range_ms)
    part_step_ms: list[dict[int, dict[str, Any]]] = field(default_factory=list)
    #: per part: GPU range ms no step could be given (None: the part has no GPU ranges, e.g. a CPU trace)
    step_gpu_unattributed_ms: list[float | None] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        return bool(self.runs)

    @property
    def run(self) -> RunData | None:
        if not self.runs:
            return None
        return self.runs[0] if len(self.runs) == 1 else Report(self.runs).run

    @property
    def process(self) -> dict[str, Any]:
        mt = self.metadata.get(META_KEY)
        p = mt.get("process") if isinstance(mt, dict) else None
        return dict(p) if isinstance(p, dict) else {}

    @property
    def run_id(self) -> str | None:
        """The id of the `profile()` run that wrote this file (None: a file from before run ids)."""
        mt = self.metadata.get(META_KEY)
        rid = mt.get("run_id") if isinstance(mt, dict) else None
        return rid if isinstance(rid, str) and rid else None

    @property
    def started_at(self) -> float | None:
        """Wall-clock start of the run (seconds since the epoch), None for older files."""
        mt = self.metadata.get(META_KEY)
        t = mt.get("started_at") if isinstance(mt, dict) else None
        return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None

    @property
    def rank(self) -> int | None:
        r = self.process.get("dist_rank")
        if r is None and isinstance(self.metadata.get("distributedInfo"), dict):
            r = self.metadata["distributedInfo"].get("rank")
        return int(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else None

    @property
    def merged(self) -> bool:
        mt = self.metadata.get(META_KEY)
        return isinstance(mt, dict) and str(mt.get("schema", "")).startswith(MERGED_PREFIX)

    def has_gpu_ranges(self, part: int = 0) -> bool:
        """Whether the trace holds GPU spans of moe-trace ranges (False for a CPU run's trace)."""
        u = self.step_gpu_unattributed_ms
        return part < len(u) and u[part] is not None

    def step_timeline(self, part: int = 0) -> list[dict[str, Any]]:
        """The recorded steps of one process (`part` of a merged trace) with their per-layer counters
        and range times: `[{"step", "phase", "tokens", "ts" (µs, trace clock), "host_ms", "gpu_ms":
        {"router", "experts", "shared"} | None, "cpu_ms": {...}, "layers": {layer index:
        {"expert_tokens": [n per expert], "k_mean": float, "active_experts": int}}}]`, by step
        (docs/trace-format.md). `gpu_ms` is the GPU time of the step's router / experts / shared
        ranges summed over layers, None when the trace has no GPU ranges (a CPU trace); `cpu_ms` the
        host time of the same ranges. Steps the metadata lists but the profiler did not record have
        `ts`/`host_ms`/`gpu_ms` None and no layers."""
        counters = self.part_counters[part] if part < len(self.part_counters) else {}
        times = self.part_step_ms[part] if part < len(self.part_step_ms) else {}
        gpu = self.has_gpu_ranges(part)

        def t(n, recorded=True):
            r = times.get(n)
            if r is None:
                zero = {"router": 0.0, "experts": 0.0, "shared": 0.0}
                return {"gpu_ms": dict(zero) if gpu and recorded else None, "cpu_ms": dict(zero) if recorded else None}
            return {"gpu_ms": dict(r["gpu_ms"]) if r["gpu_ms"] is not None else None, "cpu_ms": dict(r["cpu_ms"])}

        out = []
        for s in (self.steps if part == 0 else []):
            out.append(dict(s, **t(s["step"], s.get("recorded", True)),
                            layers={int(k): dict(v) for k, v in sorted(counters.get(s["step"], {}).items())}))
        if part:
            for n, layers in sorted((k, v) for k, v in counters.items() if k is not None):
                out.append({"step": n, "phase": None, "tokens": None, "recorded": True, "ts": None,
                            "host_ms": None, **t(n), "layers": {int(k): dict(v) for k, v in sorted(layers.items())}})
        return out

    def report(self) -> Report:
        if not self.runs:
            raise TraceError(no_meta_msg(self.path))
        return Report(self.runs)


def no_meta_msg(path) -> str:
    return (f"{path} is a plain torch.profiler trace without moe-trace metadata (no top-level 'moe_trace' key); "
            "record it with moe_trace.profile(mode='kineto') to get MoE counts (read_trace() still gives its "
            "kernel summary)")

