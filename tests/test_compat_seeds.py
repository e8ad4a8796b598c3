"""One test per code block of the seed documents (shared/seeds/000 and 001), run against the facade
`moe_trace.compat` with a tiny model and a word-level tokenizer (no download)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import moe_trace
from moe_trace.compat import MOEProfiler, MoEProfiler, SimpleBenchmark, selectors
from moe_trace.models import build_tiny_model, example_inputs
from moe_trace.models.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("olmoe")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(256)


def _gen(model, n=4):
    with torch.no_grad():
        return model.generate(**example_inputs(model, batch=2, prompt_len=6), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)


def test_seed000_basic_usage_times_by_default(model):
    profiler = MOEProfiler(model)                          # auto-detects, starts
    _gen(model)
    df = profiler.get_metrics_df()
    report = profiler.generate_report()
    assert profiler.report.to_dict()["timing_source"] is not None     # "CUDA-accurate timing" is on
    assert "experts_ms" in df.columns and "router" in report.splitlines()[1]


def test_seed000_custom_selection_all_five_selectors(model):
    for name in ("topk_selector", "kneedle_selector", "cumsum_selector", "entropy_selector", "gap_ratio_selector"):
        sel = getattr(selectors, name)
        profiler = MOEProfiler(model, selection_fn=sel, mode="stats")
        _gen(model, n=2)
        d = profiler.report.to_dict()
        if name == "topk_selector":                        # the model's own top-k: routing unchanged
            assert d["settings"]["selector"] is None and all(l["k_min"] == l["k_max"] == 2 for l in d["layers"])
        else:
            assert d["settings"]["selector"] == sel.name


def test_seed000_multi_gpu_block(model):
    profiler = MOEProfiler(model, enable_multi_gpu=True)
    _gen(model)
    summary = profiler.get_per_device_summary()
    profiler.print_device_stats()
    assert "PER-DEVICE" in profiler.generate_report() and summary["cpu"]["layers"] == 3


def test_seed000_quick_test_then_stats_aggregate_its_samples(model, tokenizer, capsys):
    profiler = MOEProfiler(model, mode="stats")
    prompts = ["Hello, how are you?", "Explain quantum computing.", "Write Python code for sorting."]
    results = profiler.quick_test(prompts, tokenizer, max_new_tokens=5)
    stats = profiler.print_routing_stats()
    out = capsys.readouterr().out
    # every (token, layer) decision of every prompt: per-prompt k histograms summed
    per_prompt = sum(r["k_stats"]["total_samples"] for r in results)
    assert stats["total_samples"] == per_prompt > 0 and f"Total samples: {per_prompt}" in out
    k = profiler.get_k_statistics()
    assert k["k_mean"] == pytest.approx(2.0) and set(k["per_layer"]) == {l.name for l in moe_trace.detect(model)}


def test_seed000_compare_routing_behavior(model, tokenizer, capsys):
    profiler = MOEProfiler(model, selection_fn=selectors.kneedle_selector, mode="stats")
    results = profiler.quick_test(["Hello", "Explain quantum computing in detail please"], tokenizer, max_new_tokens=3)
    comparison = profiler.compare_routing_behavior(results)
    assert isinstance(comparison, dict) and ("SUCCESS" in capsys.readouterr().out or comparison)


def test_seed000_migration_v1_keywords(model):
    with pytest.warns(DeprecationWarning, match="v1 size keywords"):
        profiler = MOEProfiler(model, num_experts=8, expert_dim=14336, mode="stats")
    _gen(model)
    layer = profiler.report.to_dict()["layers"][0]
    h = model.config.hidden_size
    assert layer["flops"]["experts"] == 2 * h * 14336 * 3 * layer["assignments"]   # the override is used
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(moe_trace.ConfigError, match="have 8 experts"):
            MOEProfiler(model, num_experts=16)


def test_seed001_quick_start_counts_only_between_start_and_stop(model, tmp_path, capsys):
    profiler = MoEProfiler(model)
    _gen(model)                                            # before start(): not counted
    profiler.start()
    ids = example_inputs(model, batch=1, prompt_len=5)
    with torch.no_grad():
        model(**ids)
    profiler.stop()
    _gen(model)                                            # after stop(): not counted
    profiler.print_summary()
    profiler.save_csv(tmp_path / "olmoe_metrics.csv")
    d = profiler.report.to_dict()
    assert d["totals"]["tokens"] == 5 and d["phases"]["prefill"]["forward_calls"] == 1
    assert "moe-trace report" in capsys.readouterr().out and (tmp_path / "olmoe_metrics.csv").exists()


def test_seed001_get_metrics_get_summary_names(model):
    profiler = MoEProfiler(model, mode="stats")
    profiler.start()
    _gen(model)
    profiler.stop()
    metrics = profiler.get_metrics()
    for layer_name, m in metrics.items():
        summary = m.get_summary()
        assert {"flops_total", "flops_router", "flops_expert", "k_mean", "active_experts", "expert_load_std",
                "expert_load_gini", "expert_load_entropy", "router_confidence"} <= set(summary)
        counts = np.asarray(m["expert_counts"], dtype=float)
        assert summary["expert_load_std"] == pytest.approx(counts.std())               # independent
        assert summary["flops_total"] == summary["flops_router"] + summary["flops_expert"] + summary["flops_shared"]
        assert 0.0 <= summary["router_confidence"] <= 1.0


def test_seed001_simple_benchmark_run_config_and_compare(model, tokenizer):
    benchmark = SimpleBenchmark(model, tokenizer, max_new_tokens=2)
    texts = ["Hello", "Explain how machine learning works in detail."]
    benchmark.run_config("baseline", texts)
    benchmark.run_config("custom", texts, "topk:1")
    comparison = benchmark.compare()
    assert list(comparison.index) == ["baseline", "custom"] and comparison.loc["custom", "k_mean"] == 1.0


def test_seed001_sequence_length_loop(model, tokenizer):
    tokens = {}
    for name, text in {"short": "Hello", "long": "Provide a comprehensive explanation of transformer"}.items():
        profiler = MoEProfiler(model, mode="stats")
        profiler.start()
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            model(**inputs)
        profiler.stop()
        tokens[name] = profiler.report.to_dict()["totals"]["tokens"]
        assert tokens[name] == inputs["input_ids"].numel()
    assert tokens["long"] > tokens["short"]
