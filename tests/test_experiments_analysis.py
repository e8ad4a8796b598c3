"""Selectors inside moe_trace.profile on a tiny model, the seed-style analysis helpers, SimpleBenchmark."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import moe_trace
from moe_trace.errors import ConfigError
from moe_trace.experiments import analysis as an
from moe_trace.experiments.benchmark import SimpleBenchmark
from moe_trace.experiments.selectors import cumsum, entropy, gap_ratio, kneedle, selector_middleware, topk


@pytest.fixture(scope="module")
def model():
    from moe_trace.models import build_tiny_model

    return build_tiny_model("olmoe")


@pytest.fixture(scope="module")
def inputs(model):
    from moe_trace.models import example_inputs

    return example_inputs(model, batch=2, prompt_len=6, seed=3)


def _gen(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


class LogitsObserver:
    def __init__(self):
        self.seen = []

    def on_route(self, layer, phase, step, logits, weights, indices):
        self.seen.append((layer.index, phase, logits.detach().clone()))

    def on_step_end(self, step, phase):
        pass

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
def test_topk_with_model_k_keeps_tokens(model, inputs):
    ref = _gen(model, inputs)
    k = model.config.num_experts_per_tok
    with moe_trace.profile(model, selector=topk(k)) as run:
        out = _gen(model, inputs)
    assert torch.equal(out, ref)
    assert run.report().to_dict()["layers"][0]["k_mean"] == pytest.approx(k)
    # our own middleware (OLMoE does not renormalise its top-k weights) gives the same tokens too
    with moe_trace.profile(model, router_middleware=selector_middleware(topk(k), renormalize=False)) as run:
        out = _gen(model, inputs)
    assert torch.equal(out, ref)
    # and a different k changes what the experts compute
    with moe_trace.profile(model, selector=topk(8)) as run:
        _gen(model, inputs)
    assert run.report().to_dict()["layers"][0]["k_mean"] == pytest.approx(8)
    with torch.no_grad(), moe_trace.profile(model, selector=topk(8)):
        logits8 = model(**inputs).logits
    with torch.no_grad():
        logits = model(**inputs).logits
    assert not torch.allclose(logits8, logits)


@pytest.mark.parametrize("sel", [kneedle(max_k=4), cumsum(0.6), entropy(), gap_ratio(max_k=5)],
                         ids=lambda s: s.name)
def test_report_k_hist_matches_selector(model, inputs, sel):
    obs = LogitsObserver()
    with moe_trace.profile(model, selector=sel, observers=[obs]) as run:
        _gen(model, inputs, n=3)
    d = run.report().to_dict()
    expected = {}
    for layer, phase, logits in obs.seen:
        k = sel(torch.softmax(logits.float(), dim=-1))
        for v in k.tolist():
            key = (layer, phase)
            expected.setdefault(key, {})
            expected[key][str(v)] = expected[key].get(str(v), 0) + 1
    assert len(obs.seen) == len(d["layers"]) * 3        # one routing per layer and forward
    for layer in d["layers"]:
        for phase in ("prefill", "decode"):
            assert layer["phases"][phase]["k_hist"] == expected[(layer["index"], phase)], (layer["index"], phase)
    ks = {int(k) for layer in d["layers"] for k in layer["k_hist"]}
    assert max(ks) <= sel.cap(8)


# ---------------------------------------------------------------------------------------------
def _report(model, inputs, selector=None):
    with moe_trace.profile(model, selector=selector) as run:
        _gen(model, inputs, n=3)
    return run.report()


def test_get_k_statistics_and_print(model, inputs):
    rep = _report(model, inputs, cumsum(0.7))
    s = an.get_k_statistics(rep)
    d = rep.to_dict()
    all_k = []
    for layer in d["layers"]:
        for k, n in layer["k_hist"].items():
            all_k += [int(k)] * n
    assert s["total_samples"] == len(all_k) == sum(l["tokens"] for l in d["layers"])
    assert s["k_mean"] == pytest.approx(np.mean(all_k)) and s["k_std"] == pytest.approx(np.std(all_k))
    assert s["k_min"] == min(all_k) and s["k_max"] == max(all_k)
    assert set(s["per_layer"]) == {l["name"] for l in d["layers"]}
    first = d["layers"][0]
    assert s["per_layer"][first["name"]]["k_mean"] == pytest.approx(first["k_mean"])
    pre = an.get_k_statistics(rep, phase="prefill")
    assert pre["total_samples"] == sum(l["phases"]["prefill"]["tokens"] for l in d["layers"])
    buf = io.StringIO()
    an.print_routing_stats(rep, file=buf)
    text = buf.getvalue()
    assert "ROUTING STATISTICS" in text and f"Mean k: {s['k_mean']:.2f}" in text and first["name"] in text
    with pytest.raises(ConfigError):
        an.get_k_statistics(rep, phase="both")


def test_per_device_summary(model, inputs):
    rep = _report(model, inputs)
    s = an.per_device_summary(rep)
    assert list(s) == ["cpu"]
    d = rep.to_dict()
    assert s["cpu"]["layers"] == len(d["layers"])
    assert s["cpu"]["flops"] == d["totals"]["flops"]["total"]
    assert s["cpu"]["k_mean"] == pytest.approx(2.0) and s["cpu"]["latency_ms"] is None
    buf = io.StringIO()
    an.print_device_stats(rep, file=buf)
    assert "cpu" in buf.getvalue()


def test_quick_test_and_compare(model, capsys):
    prompts = ["Hello, how are you?", "Explain quantum computing in detail.", "Write Python code"]
    results = an.quick_test(model, prompts, None, max_new_tokens=3, selector="kneedle:max_k=4")
    assert len(results) == 3
    for p, r in zip(prompts, results):
        assert r["prompt"] == p and r["input_tokens"] == len(p.encode()) and 1 <= r["output_tokens"] <= 3
        assert isinstance(r["report"], moe_trace.Report)
        assert r["k_stats"]["k_max"] <= 4
    cmp = an.compare_routing_behavior(results)
    out = capsys.readouterr().out
    assert cmp["routing_differs"] and "✓ SUCCESS" in out
    assert cmp["num_prompts"] == 3 and len(cmp["per_pair"]) == 3 and cmp["mean_js_divergence"] > 0
    same = an.compare_routing_behavior([results[0], results[0]])
    assert not same["routing_differs"] and "❌ PROBLEM" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        an.compare_routing_behavior(results[:1])


# ---------------------------------------------------------------------------------------------
def test_simple_benchmark(model):
    from moe_trace.models import example_inputs

    prompts = [example_inputs(model, batch=1, prompt_len=5, seed=s) for s in range(2)]
    bench = SimpleBenchmark(model, max_new_tokens=3, warmup=0)
    with pytest.raises(ConfigError, match="unknown key"):
        bench.run({"a": None, "b": {"topk": 2}}, prompts)
    with pytest.raises(ConfigError):
        bench.run({"a": None, "b": {"top_k": 99}}, prompts)
    with pytest.raises(ConfigError):
        bench.run({"a": None, "b": "nope"}, prompts)
    assert bench.results == {}

    undone = []

    def modify(m):
        return lambda: undone.append(True)

    df = bench.run({"base": None, "own_k": {"top_k": 2}, "top1": "topk:1",
                    "shallow": {"active_layers": 1}, "hook": modify}, prompts)
    assert list(df.index) == ["base", "own_k", "top1", "shallow", "hook"]
    assert df.loc["base", "tokens_match"] == 1.0 and df.loc["own_k", "tokens_match"] == 1.0
    assert df.loc["hook", "tokens_match"] == 1.0 and undone == [True]
    assert df.loc["top1", "k_mean"] == 1.0 and df.loc["top1", "k_mean_vs_base"] == -1.0
    assert df.loc["top1", "flops_per_token_vs_base_%"] < 0
    # one of three blocks active: a third of the MoE FLOPs per generated / prompt token
    assert df.loc["shallow", "flops_per_token"] * 3 == pytest.approx(df.loc["base", "flops_per_token"])
    assert {"prefill_ms", "decode_ms", "total_ms", "total_ms_vs_base_%"} <= set(df.columns)
    assert bench.compare(baseline="top1").loc["top1", "total_ms_vs_base_%"] == 0.0
    with pytest.raises(ConfigError):
        bench.compare(baseline="missing")


def test_cli_compare(capsys, tmp_path):
    from moe_trace.cli.main import main

    rc = main(["compare", "--config", "base=model", "--config", "t1=top_k=1;active_layers=2",
               "--max-new-tokens", "2", "--warmup", "0", "--no-progress", "--device", "cpu",
               "--out", str(tmp_path / "c.csv")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "base" in out and "t1" in out and (tmp_path / "c.csv").exists()
    assert main(["compare", "--config", "broken"]) == 2
