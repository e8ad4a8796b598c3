"""`MOEProfiler`: the earlier profiler's API on top of `moe_trace.profile`.

    profiler = MOEProfiler(model, selection_fn=selectors.kneedle_selector)   # profiling starts here
    model.generate(**inputs, max_new_tokens=50)
    df = profiler.get_metrics_df()        # stops the run (first report call) and reads its counters
    print(profiler.generate_report())

As in the earlier profiler, profiling starts at construction. The run stops at `stop()`, at the end
of a `with MOEProfiler(model) as p:` block, or at the first call that needs results
(`get_metrics_df`, `generate_report`, `print_summary`, ...). `start()` after a stop begins a new
run; results then cover every run so far (counts added layer by layer).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from moe_trace.analysis.report import Report
from moe_trace.analysis.rundata import RunData
from moe_trace.errors import ProfileStateError

__all__ = ["MOEProfiler", "MoEProfiler"]


class MOEProfiler:
    """Seed-compatible facade. `selection_fn`: a selector (object, name like "kneedle" / "cumsum:0.8",
    or callable probs -> k); `enable_multi_gpu` adds the per-device section to `generate_report()`
    (per-device numbers are always collected); `mode` is `moe_trace.profile`'s mode."""

    def __init__(self, model: Any, selection_fn: Any = None, enable_multi_gpu: bool = False, *,
                 mode: str = "stats", **profile_kwargs: Any):
        from moe_trace.experiments.selectors import resolve_selector

        self.model = model
        self.selection_fn = resolve_selector(selection_fn)
        self.enable_multi_gpu = bool(enable_multi_gpu)
        self.mode = mode
        self._profile_kwargs = profile_kwargs
        self._run = None
        self._parts: list[RunData] = []
        self._report: Report | None = None
        self.start()

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

    def get_metrics(self) -> dict[str, dict[str, Any]]:
        """{layer name: that layer's metrics dict} (the report's layer entries)."""
        return {l["name"]: l for l in self.report.to_dict()["layers"]}

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
        since one model cannot be profiled twice at once); see `experiments.analysis.quick_test`."""
        from moe_trace.experiments.analysis import quick_test

        self.stop()
        return quick_test(self.model, prompts, tokenizer, max_new_tokens, selector=self.selection_fn, verbose=verbose)

    @staticmethod
    def compare_routing_behavior(results: Sequence[Any], verbose: bool = True) -> dict[str, Any]:
        from moe_trace.experiments.analysis import compare_routing_behavior

        return compare_routing_behavior(results, verbose=verbose)

    def __repr__(self) -> str:
        state = "running" if self._run is not None else "stopped"
        return f"MOEProfiler({type(self.model).__name__}, selector={self.selection_fn!r}, {state}, runs={len(self._parts)})"


MoEProfiler = MOEProfiler
