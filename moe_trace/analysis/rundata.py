"""Plain data that a profiling run (or a trace) yields: layers, raw counts per phase, timings.

`RunData` is the one hand-off between capture, the trace format and analysis: capture fills it from
GPU buffers at the end of a run, the trace reader rebuilds it from a trace file, and
`moe_trace.analysis.report.Report` turns it into metrics. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moe_trace.errors import ConfigError

# prefill: every forward before the first new token; decode: one new position per sequence; verify:
# several candidate positions scored at once (assisted / speculative / prompt-lookup decoding)
PHASES = ("prefill", "decode", "verify")
PARTS = ("router", "experts", "shared")


@dataclass
class LayerInfo:
    """One detected MoE layer and its sizes (`sources` says where each size came from)."""

    index: int
    name: str
    family: str
    num_experts: int
    top_k: int
    hidden_size: int
    expert_dim: int
    expert_hidden_size: int = 0  # width the experts work in when it differs from hidden_size (muse_spark)
    shared_expert_dim: int = 0
    router_flops_per_token: int = 0  # 0: the standard 2*H*E; else the router's own matrices (zaya, doge, ...)
    gated: bool = True
    shared_gated: bool = True
    dense_experts: bool = False  # every token runs through all experts (llama4): FLOPs count E, not k
    device: str = "cpu"
    router: str | None = None
    experts: str | None = None
    shared: list[str] = field(default_factory=list)
    handler: str = "generic"
    experts_implementation: str | None = None
    stack: str | None = None  # "encoder" / "decoder" in encoder-decoder models, else None
    sources: dict[str, str] = field(default_factory=dict)
    # weight bytes from the modules' own tensors (0: unknown); the roofline's bytes read per forward
    expert_bytes: int = 0  # one routed expert
    router_bytes: int = 0
    shared_bytes: int = 0  # all shared experts (and their gate) of the layer

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerInfo":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class LayerCounts:
    """Raw counts of one MoE layer in one phase.

    `expert_counts[e]` = (token, expert) assignments to routed expert e; `k_hist[k]` = tokens that
    used k computing experts; `excluded` = assignment slots that pointed at no computing expert
    (skip/zero experts, padding sentinels, experts of other expert-parallel ranks); `dropped` =
    slots the router chose but did not dispatch because the expert was full (capacity-limited
    routers: SwitchTransformers, NLLB-MoE); they are in neither `expert_counts` nor `k_hist`'s k.
    """

    tokens: int = 0
    calls: int = 0
    expert_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    k_hist: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    excluded: int = 0
    dropped: int = 0
    top1_prob_sum: float = 0.0
    entropy_sum: float = 0.0
    # sum over forwards of the distinct experts that got a token in that forward (the expert weights
    # read); 0 when not recorded (stats / timing mode: the roofline then estimates it)
    expert_reads: int = 0
    padding_tokens: int = 0  # positions whose attention mask was 0: not routed, not in any count above

    @classmethod
    def empty(cls, num_experts: int, max_k: int) -> "LayerCounts":
        return cls(expert_counts=np.zeros(num_experts, dtype=np.int64),
                   k_hist=np.zeros(max_k + 1, dtype=np.int64))

    def __add__(self, other: "LayerCounts") -> "LayerCounts":
        n = max(len(self.k_hist), len(other.k_hist))
        kh = np.zeros(n, dtype=np.int64)
        kh[: len(self.k_hist)] += self.k_hist
        kh[: len(other.k_hist)] += other.k_hist
        return LayerCounts(
            tokens=self.tokens + other.tokens,
            calls=self.calls + other.calls,
            expert_counts=self.expert_counts + other.expert_counts,
            k_hist=kh,
            excluded=self.excluded + other.excluded,
            dropped=self.dropped + other.dropped,
            top1_prob_sum=self.top1_prob_sum + other.top1_prob_sum,
            entropy_sum=self.entropy_sum + other.entropy_sum,
            expert_reads=self.expert_reads + other.expert_reads,
            padding_tokens=self.padding_tokens + other.padding_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": int(self.tokens),
            "calls": int(self.calls),
            "expert_counts": [int(x) for x in self.expert_counts],
            "k_hist": [int(x) for x in self.k_hist],
            "excluded": int(self.excluded),
            "dropped": int(self.dropped),
            "top1_prob_sum": float(self.top1_prob_sum),
            "entropy_sum": float(self.entropy_sum),
            "expert_reads": int(self.expert_reads),
            "padding_tokens": int(self.padding_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerCounts":
        return cls(
            tokens=int(d.get("tokens", 0)),
            calls=int(d.get("calls", 0)),
            expert_counts=np.asarray(d.get("expert_counts", []), dtype=np.int64),
            k_hist=np.asarray(d.get("k_hist", [0]), dtype=np.int64),
            excluded=int(d.get("excluded", 0)),
            dropped=int(d.get("dropped", 0)),
            top1_prob_sum=float(d.get("top1_prob_sum", 0.0)),
            entropy_sum=float(d.get("entropy_sum", 0.0)),
            expert_reads=int(d.get("expert_reads", 0) or 0),
            padding_tokens=int(d.get("padding_tokens", 0)),
        )


@dataclass
class RunData:
    """Everything a run recorded. `counts[phase][i]` belongs to `layers[i]`.

    `timing[phase][i]` is `{"router_ms", "experts_ms", "shared_ms"}` (floats, None when not timed);
    `timing_source` says how: "cuda_events", "host_clock" (CPU fallback), "kineto_gpu" or
    "kineto_cpu" (rebuilt from a trace's GPU annotations or CPU ranges).
    """

    model: dict[str, Any]
    layers: list[LayerInfo]
    counts: dict[str, list[LayerCounts]]
    forward_calls: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})
    forward_tokens: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PHASES})  # real tokens
    timing: dict[str, list[dict[str, float | None]]] | None = None
    timing_source: str | None = None
    peak_memory: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # the profile() run that recorded it (shared by the ranks of a job)
    padding_tokens: dict[str, int] = field(default_factory=dict)  # per phase: positions with attention mask 0

    @classmethod
    def empty(cls, model: dict[str, Any], layers: list[LayerInfo], max_k: int | None = None) -> "RunData":
        counts = {
            p: [LayerCounts.empty(l.num_experts, max_k if max_k is not None else l.num_experts) for l in layers]
            for p in PHASES
        }
        return cls(model=model, layers=layers, counts=counts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layers": [l.to_dict() for l in self.layers],
            "counts": {p: [c.to_dict() for c in cs] for p, cs in self.counts.items()},
            "forward_calls": dict(self.forward_calls),
            "forward_tokens": dict(self.forward_tokens),
            "timing": self.timing,
            "timing_source": self.timing_source,
            "peak_memory": dict(self.peak_memory),
            "settings": self.settings,
            "run_id": self.run_id,
            "padding_tokens": dict(self.padding_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunData":
        if not isinstance(d, dict):
            raise ConfigError(f"RunData.from_dict takes the dict RunData.to_dict() gives (a report's or trace's "
                              f"'run'), got {type(d).__name__}")
        return cls(
            model=dict(d.get("model", {})),
            layers=[LayerInfo.from_dict(x) for x in d.get("layers", [])],
            counts=_counts_with_every_phase(d),
            forward_calls={p: int(v) for p, v in d.get("forward_calls", {}).items()},
            forward_tokens={p: int(v) for p, v in d.get("forward_tokens", {}).items()},
            timing=_timing_with_every_phase(d.get("timing"), len(d.get("layers", []) or [])),
            timing_source=d.get("timing_source"),
            peak_memory={k: int(v) for k, v in d.get("peak_memory", {}).items()},
            settings=dict(d.get("settings", {})),
            run_id=d.get("run_id") if isinstance(d.get("run_id"), str) else None,
            padding_tokens={p: int(v) for p, v in (d.get("padding_tokens") or {}).items()},
        )

    def merged(self, other: "RunData") -> "RunData":
        """Counts of two runs of the same model added layer by layer (e.g. two data-parallel ranks)."""
        if [l.name for l in self.layers] != [l.name for l in other.layers]:
            raise ValueError("cannot combine runs of different models: their MoE layers differ")
        counts = {p: [a + b for a, b in zip(self.counts[p], other.counts[p])] for p in self.counts}
        timing = None
        if self.timing and other.timing:
            timing = {
                p: [
                    {k: _add_opt(ta.get(k), tb.get(k)) for k in ("router_ms", "experts_ms", "shared_ms")}
                    for ta, tb in zip(self.timing[p], other.timing[p])
                ]
                for p in self.timing
            }
        peak = dict(self.peak_memory)
        for k, v in other.peak_memory.items():
            peak[k] = max(peak.get(k, 0), v)
        return RunData(
            model=self.model,
            layers=self.layers,
            counts=counts,
            forward_calls={p: self.forward_calls.get(p, 0) + other.forward_calls.get(p, 0) for p in PHASES},
            forward_tokens={p: self.forward_tokens.get(p, 0) + other.forward_tokens.get(p, 0) for p in PHASES},
            timing=timing,
            timing_source=self.timing_source if self.timing_source == other.timing_source else None,
            peak_memory=peak,
            settings=self.settings,
            run_id=self.run_id if self.run_id == other.run_id else None,
            padding_tokens={p: self.padding_tokens.get(p, 0) + other.padding_tokens.get(p, 0) for p in PHASES},
        )


def _add_opt(a: float | None, b: float | None) -> float | None:
    if a is None and b is None:
        return None
    return (a or 0.0) + (b or 0.0)


def _counts_with_every_phase(d: dict[str, Any]) -> dict[str, list[LayerCounts]]:
    """Counts per phase of a `to_dict()`; a phase it lacks (a report or trace from before the phase
    existed, e.g. "verify") gets zero counts."""
    raw = d.get("counts", {}) or {}
    counts = {p: [LayerCounts.from_dict(c) for c in cs] for p, cs in raw.items()}
    layers = d.get("layers", []) or []
    for p in PHASES:
        if p not in counts:
            counts[p] = [LayerCounts.empty(int(l.get("num_experts", 0)), int(l.get("top_k", 0) or 0)) for l in layers]
    return counts


def _timing_with_every_phase(timing: Any, n_layers: int) -> Any:
    if not isinstance(timing, dict):
        return timing
    out = dict(timing)
    for p in PHASES:
        if p not in out:
            out[p] = [{f"{part}_ms": None for part in PARTS} for _ in range(n_layers)]
    return out

