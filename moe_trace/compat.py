"""`MOEProfiler`: the earlier profiler's API on top of `moe_trace.profile`.

    profiler = MOEProfiler(model, selection_fn=selectors.kneedle_selector)   # profiling starts here
    model.generate(**inputs, max_new_tokens=50)
    df = profiler.get_metrics_df()        # stops the run (first report call) and reads its counters
    print(profiler.generate_report())

As in the earlier profiler (seed 000), `MOEProfiler` starts profiling at construction and times
router / experts / shared with CUDA events (`mode="timing"`; pass `mode="stats"` for counters only).
The run stops at `stop()`, at the end of a `with MOEProfiler(model) as p:` block, or at the first call
that needs results (`get_metrics_df`, `generate_report`, `print_summary`, ...). `start()` after a stop
begins a new run; results then cover every run so far (counts added layer by layer), `quick_test`
runs included. `MoEProfiler` (seed 001's name) counts only between `start()` and `stop()`.

    from moe_trace.compat import MOEProfiler, MoEProfiler, SimpleBenchmark, selectors
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from moe_trace import selectors
from moe_trace.analysis.report import Report
from moe_trace.analysis.rundata import RunData
from moe_trace.errors import ConfigError, ProfileStateError
from moe_trace.experiments.benchmark import SimpleBenchmark

__all__ = ["MOEProfiler", "MoEProfiler", "LayerMetrics", "SimpleBenchmark", "selectors"]

# the v1 profiler's size keywords (seed 000's migration table): accepted, deprecated, used as overrides
V1_KEYWORDS = {"num_experts": "num_experts", "expert_dim": "expert_dim", "hidden_size": "hidden_size",
               "hidden_dim": "hidden_size", "top_k": "top_k", "k": "top_k"}


class LayerMetrics(dict):
    """One layer's report entry (a dict) with the seed's `get_summary()`."""

    def get_summary(self) -> dict[str, Any]:
        """The seed's metric names: flops_total / flops_router / flops_expert (and flops_shared), k_mean,
        k_std, active_experts, expert_load_std / _cv / _gini / _entropy (normalized), router_confidence
        (1 - normalized router entropy: higher is more confident), tokens, and ms when timed."""
        import numpy as np

        counts = np.asarray(self["expert_counts"], dtype=np.float64)
        e = max(len(counts), 2)
        out = {"tokens": self["tokens"], "flops_total": self["flops"]["total"], "flops_router": self["flops"]["router"],
               "flops_expert": self["flops"]["experts"], "flops_shared": self["flops"]["shared"],
               "k_mean": self["k_mean"], "k_std": self["k_std"], "active_experts": self["active_experts"],
               "expert_load_std": float(counts.std()) if len(counts) else 0.0, "expert_load_cv": self["cv"],
               "expert_load_gini": self["gini"], "expert_load_entropy": self["entropy_norm"],
               "router_confidence": (1.0 - self["router_entropy_mean"] / math.log(e)) if self["tokens"] else 0.0,
               "router_top1_prob": self["top1_prob_mean"]}
        t = self.get("time_ms")
        if t:
            out.update({"router_ms": t.get("router_ms"), "experts_ms": t.get("experts_ms"),
                        "shared_ms": t.get("shared_ms"),
                        "latency_ms": sum(v for v in t.values() if v is not None)})
        return out


class MOEProfiler:
    """Seed-compatible facade. `selection_fn`: a selector (object, name like "kneedle" / "cumsum:0.8",
    or callable probs -> k); `enable_multi_gpu` adds the per-device section to `generate_report()`
    (per-device numbers are always collected); `mode` is `moe_trace.profile`'s mode."""

    autostart = True

    def __init__(self, model: Any, selection_fn: Any = None, enable_multi_gpu: bool = False, *,
                 mode: str = "timing", **profile_kwargs: Any):
        from moe_trace.selectors import resolve_selector

        self.overrides = self._v1_overrides(model, profile_kwargs)
        self.model = model
        self.selection_fn = resolve_selector(selection_fn)
        self.enable_multi_gpu = bool(enable_multi_gpu)
        self.mode = mode
        self._profile_kwargs = profile_kwargs
        self._run = None
        self._parts: list[RunData] = []
        self._report: Report | None = None
        if self.autostart:
            self.start()

    @staticmethod
    def _v1_overrides(model: Any, kwargs: dict) -> dict[str, int]:
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in V1_KEYWORDS}
        if not given:
            return {}
        warnings.warn(f"MOEProfiler({', '.join(f'{k}={v}' for k, v in given.items())}): the v1 size keywords are "
                      "deprecated; sizes are detected from the model (they are used as overrides for now)",
                      DeprecationWarning, stacklevel=3)
        out = {}
        for k, v in given.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"MOEProfiler({k}={v!r}): must be a positive integer")
            out[V1_KEYWORDS[k]] = v
        if "num_experts" in out:
            from moe_trace.capture import detect

            found = {l.num_experts for l in detect(model)}
            if found != {out["num_experts"]}:
                raise ConfigError(f"MOEProfiler(num_experts={out['num_experts']}): the model's MoE layers have "
                                  f"{', '.join(map(str, sorted(found)))} experts; drop num_experts (it is detected)")
        return out

    # -- lifecycle ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._run is not None

    def start(self) -> "MOEProfiler":
        """Begin profiling (a no-op while already running)."""
        if self._run is not None:
            return self
        from moe_trace.capture.session import profile

        kwargs = dict(self._profile_kwargs)
        if self.selection_fn is not None:
            kwargs["selector"] = self.selection_fn
        run = profile(self.model, self.mode, **kwargs)
        run.__enter__()
        self._run = run
        return self

    def stop(self) -> "MOEProfiler":
        """Stop profiling and keep the run's data (a no-op when not running)."""
        run, self._run = self._run, None
        if run is not None:
            run.__exit__(None, None, None)
            self._parts.append(run.run_data)
            self._report = None
        return self

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "MOEProfiler":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop()
        return False

    def __del__(self):  # never leave hooks on a model that outlives the profiler
        try:
            if self._run is not None:
                self._run.__exit__(None, None, None)
        except Exception:
            pass

    # -- results ------------------------------------------------------------------------------
    @property
    def run_data(self) -> RunData:
        self.stop()
        if not self._parts:
            raise ProfileStateError("nothing recorded: run the model while the profiler is started")
        run = self._parts[0]
        for other in self._parts[1:]:
            run = run.merged(other)
        if self.overrides:
            sizes = {k: v for k, v in self.overrides.items() if k != "num_experts"}
            run = dataclasses.replace(run, layers=[dataclasses.replace(l, **sizes) for l in run.layers])
        return run

    @property
    def report(self) -> Report:
        """The `moe_trace.Report` of everything recorded (stops a running profiler first)."""
        if self._report is None or self._run is not None:
            self._report = Report(self.run_data)
        return self._report

    def get_report(self) -> Report:
        return self.report

    def get_metrics_df(self):
        """One row per (MoE layer, phase) with counts, k, balance, FLOPs (and ms in timing mode)."""
        return self.report.to_dataframe()

    def get_metrics(self) -> dict[str, LayerMetrics]:
        """{layer name: `LayerMetrics`}: the report's layer entry, with `.get_summary()` (seed names)."""
        return {l["name"]: LayerMetrics(l) for l in self.report.to_dict()["layers"]}

    def generate_report(self) -> str:
        """The text report; with `enable_multi_gpu`, followed by the per-device breakdown."""
        import io

        from moe_trace.experiments.analysis import print_device_stats

        text = str(self.report)
        if self.enable_multi_gpu:
            buf = io.StringIO()
            print_device_stats(self.report, file=buf)
            text += "\n" + buf.getvalue().rstrip()
        return text

    def print_summary(self) -> None:
        print(self.generate_report())

    def save_csv(self, path: str | Path) -> Path:
        self.report.to_csv(path)
        return Path(path)

    def save_json(self, path: str | Path) -> Path:
        self.report.to_json(path)
        return Path(path)

    def get_per_device_summary(self) -> dict[str, dict[str, Any]]:
        from moe_trace.experiments.analysis import per_device_summary

        return per_device_summary(self.report)

    def print_device_stats(self) -> dict[str, dict[str, Any]]:
        from moe_trace.experiments.analysis import print_device_stats

        return print_device_stats(self.report)

    def get_k_statistics(self) -> dict[str, Any]:
        from moe_trace.experiments.analysis import get_k_statistics

        return get_k_statistics(self.report)

    def print_routing_stats(self) -> dict[str, Any]:
        from moe_trace.experiments.analysis import print_routing_stats

        return print_routing_stats(self.report)

    # -- routing analysis -----------------------------------------------------------------------
    def quick_test(self, prompts: Sequence[Any], tokenizer: Any = None, max_new_tokens: int = 30,
                   verbose: bool = True) -> list[dict[str, Any]]:
        """Each prompt in its own run with this profiler's selector (stops this profiler first,
        since one model cannot be profiled twice at once); see `experiments.analysis.quick_test`.
        The runs join this profiler's results, so `print_routing_stats()` / `get_k_statistics()`
        afterwards aggregate every prompt's samples."""
        from moe_trace.experiments.analysis import quick_test

        self.stop()
        results = quick_test(self.model, prompts, tokenizer, max_new_tokens, selector=self.selection_fn,
                             verbose=verbose)
        for r in results:
            self._parts.extend(r["report"].parts)
        self._report = None
        return results

    @staticmethod
    def compare_routing_behavior(results: Sequence[Any], verbose: bool = True) -> dict[str, Any]:
        from moe_trace.experiments.analysis import compare_routing_behavior

        return compare_routing_behavior(results, verbose=verbose)

    def __repr__(self) -> str:
        state = "running" if self._run is not None else "stopped"
        return f"MOEProfiler({type(self.model).__name__}, selector={self.selection_fn!r}, {state}, runs={len(self._parts)})"


class MoEProfiler(MOEProfiler):
    """Seed 001's profiler: nothing is counted until `start()`, and nothing after `stop()`."""

    autostart = False
