"""The seed-style MOEProfiler facade on moe_trace.profile."""
from __future__ import annotations

import pytest
import torch

import moe_trace
from moe_trace.compat import MOEProfiler, MoEProfiler
from moe_trace.errors import ConfigError, ProfileStateError
from moe_trace.experiments import selectors


@pytest.fixture(scope="module")
def model():
    from moe_trace.models import build_tiny_model

    return build_tiny_model("olmoe")


@pytest.fixture(scope="module")
def inputs(model):
    from moe_trace.models import example_inputs

    return example_inputs(model, batch=2, prompt_len=6, seed=4)


def _gen(model, inputs, n=3):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_starts_at_construction_and_stops_on_first_report(model, inputs, tmp_path, capsys):
    profiler = MOEProfiler(model)
    assert profiler.running and not _no_hooks(model)
    _gen(model, inputs)
    df = profiler.get_metrics_df()                       # first report call stops the run
    assert not profiler.running and _no_hooks(model)
    assert set(df["phase"]) == {"all", "prefill", "decode"} and len(df) == 3 * 3
    # the same numbers as a plain moe_trace.profile run
    with moe_trace.profile(model) as run:
        _gen(model, inputs)
    assert [l["expert_counts"] for l in profiler.report.to_dict()["layers"]] == \
        [l["expert_counts"] for l in run.report().to_dict()["layers"]]
    text = profiler.generate_report()
    assert "moe-trace report" in text and "PER-DEVICE" not in text
    profiler.print_summary()
    assert "moe-trace report" in capsys.readouterr().out
    path = profiler.save_csv(tmp_path / "m.csv")
    assert path.read_text().splitlines()[0].startswith("layer,name,device,phase")
    metrics = profiler.get_metrics()
    assert list(metrics) == [l.name for l in moe_trace.detect(model)]
    _gen(model, inputs)                                  # not profiled any more
    assert profiler.report.to_dict()["phases"]["prefill"]["forward_calls"] == 1


def test_start_stop_context_and_selector(model, inputs, capsys):
    with MOEProfiler(model, selection_fn=selectors.kneedle_selector, enable_multi_gpu=True) as p:
        assert p.running
        p.start()                                        # no-op while running
        _gen(model, inputs)
    assert not p.running and _no_hooks(model)
    assert p.report.to_dict()["settings"]["selector"] == "kneedle"
    first_tokens = p.report.to_dict()["totals"]["tokens"]
    p.start()
    _gen(model, inputs)
    p.stop()
    assert p.report.to_dict()["totals"]["tokens"] == 2 * first_tokens      # runs add up
    assert "PER-DEVICE STATISTICS" in p.generate_report()
    dev = p.get_per_device_summary()
    assert list(dev) == ["cpu"] and dev["cpu"]["layers"] == 3
    p.print_device_stats()
    k = p.get_k_statistics()
    assert set(k) >= {"k_mean", "k_std", "k_min", "k_max", "per_layer"} and 1 <= k["k_min"] <= k["k_max"] <= 8
    p.print_routing_stats()
    assert "ROUTING STATISTICS" in capsys.readouterr().out
    assert issubclass(MoEProfiler, MOEProfiler) and not MoEProfiler.autostart


def test_seed_flow_quick_test(model, capsys):
    profiler = MOEProfiler(model, selection_fn="cumsum:0.6")
    results = profiler.quick_test(["Hello, how are you?", "Explain quantum computing.", "Sort a list"],
                                  None, max_new_tokens=2)
    assert not profiler.running and _no_hooks(model)
    assert len(results) == 3 and all(r["report"].to_dict()["settings"]["selector"] == "cumsum" for r in results)
    cmp = profiler.compare_routing_behavior(results)
    assert cmp["routing_differs"] and "✓ SUCCESS" in capsys.readouterr().out


def test_errors(model):
    with pytest.raises(ConfigError, match="valid selectors"):
        MOEProfiler(model, selection_fn="nonsense")
    assert _no_hooks(model)
    p = MOEProfiler(model)
    with pytest.raises(ProfileStateError):
        MOEProfiler(model)                               # one model, one run at a time
    p.stop()
    empty = p.report.to_dict()                            # stopped before any forward: zero counts
    assert empty["totals"]["tokens"] == 0
    assert _no_hooks(model)
