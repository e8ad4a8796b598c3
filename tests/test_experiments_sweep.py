"""Knob sweeps: validation before work, the block mask, timing, statistics, JSON structure, plots, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_trace.errors import ConfigError
from moe_trace.experiments import sweep as sw
from moe_trace.experiments.sweep import (KNOBS, LATENCIES, STATS, SweepResult, describe, fit_line, mask_blocks,
                                         run_sweep, summarize_samples)


@pytest.fixture(scope="module")
def model():
    from moe_trace.models import build_tiny_model

    return build_tiny_model("olmoe")


@pytest.fixture(scope="module")
def inputs(model):
    from moe_trace.models import example_inputs

    return [example_inputs(model, batch=1, prompt_len=5, seed=s) for s in range(2)]


# ---------------------------------------------------------------------------------------------
# pure parts
def test_describe_and_fit():
    d = describe([1.0, 2.0, 3.0, 4.0])
    assert d["mean"] == 2.5 and d["p50"] == 2.5
    assert d["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    # 95% interval of the mean: t(0.975, 3) * s / sqrt(4), checked against scipy
    from scipy import stats

    lo, hi = stats.t.interval(0.95, 3, loc=2.5, scale=np.std([1, 2, 3, 4], ddof=1) / 2)
    assert d["ci95_low"] == pytest.approx(lo, rel=1e-3) and d["ci95_high"] == pytest.approx(hi, rel=1e-3)
    assert d["p90"] is None and d["p99"] is None          # 4 samples do not resolve a tail
    ten = describe(list(range(10)))
    assert ten["p90"] == pytest.approx(np.percentile(range(10), 90)) and ten["p99"] is None
    assert describe(list(range(100)))["p99"] == pytest.approx(np.percentile(range(100), 99))
    assert describe([]) == {s: None for s in STATS}
    f = fit_line([1, 2, 3, 4], [3, 5, 7, 9])
    assert f["slope"] == pytest.approx(2) and f["intercept"] == pytest.approx(1) and f["r2"] == pytest.approx(1)
    assert fit_line([2, 2], [1, 3]) is None


def test_summarize_samples_order_and_keys():
    samples = []
    for v in (4, 1):
        for r in range(3):
            samples.append({"value": v, "prefill_ms": v * 10 + r, "decode_ms": v + r, "total_ms": v * 11 + 2 * r,
                            "ms_per_output_token": 1.0, "prompt_tokens": 5, "new_tokens": 3, "decode_steps": 2,
                            "decode_forward_ms": 1.0, "k_mean": v, "k_mean_prefill": v, "k_mean_decode": v,
                            "active_experts_mean": 4, "flops_total": 100 * v, "flops_prefill": 60 * v,
                            "flops_decode": 40 * v, "flops_per_token": 10 * v})
    rows = summarize_samples(samples, "top-k", [4, 1])
    assert [r["value"] for r in rows] == [4, 1] and all(r["n"] == 3 for r in rows)
    for lat in LATENCIES:
        for s in STATS:
            assert f"{lat}_{s}" in rows[0]
    assert rows[0]["prefill_ms_mean"] == 41.0 and rows[1]["prefill_ms_p50"] == 11.0
    assert rows[1]["flops_ratio"] == pytest.approx(0.25)
    assert rows[1]["k_mean_mean"] == 1.0


def test_knob_names():
    assert sw.normalize_knob("top_k") == "top-k"
    assert sw.normalize_knob("max_new_tokens") == "output-tokens"
    for k in KNOBS:
        assert sw.normalize_knob(k) == k
    with pytest.raises(ConfigError, match="valid knobs"):
        sw.normalize_knob("depth")


def test_bad_input_fails_before_any_work(model, inputs, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a generate ran before validation finished")

    monkeypatch.setattr(sw, "measure_generate", boom)
    bad = [("nope", [1]), ("top-k", [0, 2]), ("top-k", [9]), ("top-k", ["x"]), ("top-k", [1.5]),
           ("active-layers", [0]), ("active-layers", [4]), ("output-tokens", [0]),
           ("output-tokens", [10 ** 7]), ("prompt-length", [10 ** 7]), ("flops-scaling", [2, 2]),
           ("top-k", [])]
    for knob, values in bad:
        with pytest.raises(ConfigError):
            run_sweep(model, knob, values, inputs, progress=False)
    with pytest.raises(ConfigError):
        run_sweep(model, "top-k", [1], inputs, repeats=0, progress=False)
    with pytest.raises(ConfigError):
        run_sweep(model, "top-k", [1], inputs, selector="kneedle", progress=False)
    with pytest.raises(ConfigError):
        run_sweep(model, "output-tokens", [1], inputs, selector="bogus", progress=False)
    with pytest.raises(ConfigError, match="value\\(s\\) 0, 9"):
        run_sweep(model, "top-k", [0, 1, 9], inputs, progress=False)


# ---------------------------------------------------------------------------------------------
def test_mask_blocks_skips_and_restores(model, inputs):
    name, blocks = sw.find_decoder_blocks(model)
    assert name.endswith("layers") and len(blocks) == model.config.num_hidden_layers
    ran = []
    handles = [b.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    ids = inputs[0]["input_ids"]
    try:
        with torch.no_grad():
            full = model(ids).logits
            with mask_blocks(model, 1):
                assert all("forward" in b.__dict__ for b in list(blocks)[1:])
                ran.clear()
                masked = model(ids).logits
                assert ran == [0]
            assert all("forward" not in b.__dict__ for b in blocks)
            ran.clear()
            again = model(ids).logits
            assert ran == [0, 1, 2]
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(full, again) and not torch.allclose(full, masked)
    # the masked model equals running embed -> block 0 -> norm -> head by hand
    with torch.no_grad():
        emb = model.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        pe = model.model.rotary_emb(emb, pos)
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=None,
                                  past_key_values=None, position_ids=pos)
        h = blocks[0](emb, position_embeddings=pe, attention_mask=mask, position_ids=pos)
        ref = model.lm_head(model.model.norm(h))
    torch.testing.assert_close(masked, ref)
    # restored even when the body raises
    with pytest.raises(RuntimeError):
        with mask_blocks(model, 2):
            raise RuntimeError("x")
    assert all("forward" not in b.__dict__ for b in blocks)


def test_forward_timer_splits_prefill_and_decode(model, inputs):
    timer = sw.ForwardTimer(model)
    with torch.no_grad(), timer:
        model.generate(**inputs[0], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    timer.synchronize()
    t = timer.result()
    assert len(timer.marks) == 4 and t["decode_steps"] == 3
    assert t["prefill_ms"] > 0 and t["decode_ms"] >= t["decode_forward_ms"] > 0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_measure_generate_matches_plain_generate(model, inputs):
    with torch.no_grad():
        ref = model.generate(**inputs[1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    rec = sw.measure_generate(model, inputs[1], max_new_tokens=4, keep_output=True)
    assert torch.equal(rec["output_ids"], ref)
    assert rec["new_tokens"] == 4 and rec["prompt_tokens"] == 5 and rec["decode_steps"] == 3
    assert rec["k_mean"] == pytest.approx(2.0)
    d = rec["report"].to_dict()
    assert d["phases"]["prefill"]["forward_calls"] == 1 and d["phases"]["decode"]["forward_calls"] == 3
    assert rec["flops_total"] == d["totals"]["flops"]["total"] > 0


# ---------------------------------------------------------------------------------------------
def _check_structure(result: SweepResult, knob: str, values: list[int], n_per: int):
    data = json.loads(result.to_json())
    assert set(data) >= {"schema", "experiment", "summary", "all_samples"}
    assert data["experiment"]["knob"] == knob and data["experiment"]["values"] == values
    assert [r["value"] for r in data["summary"]] == values
    assert len(data["all_samples"]) == len(values) * n_per
    assert [s["sample_id"] for s in data["all_samples"]] == list(range(len(values) * n_per))
    for row in data["summary"]:
        assert row["n"] == n_per
        for lat in LATENCIES:
            assert row[f"{lat}_p90"] is None if n_per < 10 else row[f"{lat}_p50"] <= row[f"{lat}_p90"] + 1e-9
            if n_per > 1:
                assert row[f"{lat}_ci95_low"] <= row[f"{lat}_mean"] <= row[f"{lat}_ci95_high"]
    for s in data["all_samples"]:
        assert s["prefill_ms"] > 0 and s["total_ms"] >= s["prefill_ms"]
        assert {"value", "repeat", "input_id", "prompt_tokens", "new_tokens", "k_mean", "flops_total"} <= set(s)
    return data


def test_sweep_top_k(model, inputs, tmp_path):
    result = run_sweep(model, "top-k", [1, 4], inputs, repeats=1, warmup=0, max_new_tokens=3,
                       out_dir=tmp_path, plots=False, progress=False)
    data = _check_structure(result, "top-k", [1, 4], 2)
    assert [r["k_mean_mean"] for r in data["summary"]] == [1.0, 4.0]
    assert data["summary"][1]["flops_total_mean"] > data["summary"][0]["flops_total_mean"]
    assert json.loads((tmp_path / "sweep_top_k.json").read_text()) == data
    assert result.to_dataframe().shape[0] == 2 and result.to_dataframe("samples").shape[0] == 4


def test_sweep_active_layers_output_and_prompt_length(model, inputs):
    r = run_sweep(model, "active-layers", [1, 3], inputs[:1], repeats=1, warmup=0, max_new_tokens=3, progress=False)
    data = _check_structure(r, "active-layers", [1, 3], 1)
    # one active block: the MoE FLOPs are a third of all three blocks'
    assert data["summary"][0]["flops_total_mean"] * 3 == data["summary"][1]["flops_total_mean"]
    assert all("forward" not in b.__dict__ for b in sw.find_decoder_blocks(model)[1])

    r = run_sweep(model, "output-tokens", [1, 4], inputs[:1], repeats=1, warmup=0, progress=False)
    data = _check_structure(r, "output-tokens", [1, 4], 1)
    assert [s["new_tokens"] for s in data["all_samples"]] == [1, 4]
    assert [s["decode_steps"] for s in data["all_samples"]] == [0, 3]

    r = run_sweep(model, "prompt-length", [3, 12], inputs[:1], repeats=1, warmup=0, max_new_tokens=2, progress=False)
    data = _check_structure(r, "prompt-length", [3, 12], 1)
    assert [s["prompt_tokens"] for s in data["all_samples"]] == [3, 12]


def test_sweep_flops_scaling_with_plots(model, inputs, tmp_path):
    r = run_sweep(model, "flops-scaling", [1, 8], inputs[:1], repeats=2, warmup=0, max_new_tokens=2,
                  out_dir=tmp_path, progress=False)
    data = _check_structure(r, "flops-scaling", [1, 8], 2)
    assert set(data["fit"]) >= {"prefill", "decode", "total"}
    assert data["fit"]["prefill"]["n"] == 4
    assert data["summary"][1]["flops_ratio"] > 1
    figs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figs == ["flops_scaling_flops_scaling.png", "flops_scaling_latency_breakdown.png",
                    "flops_scaling_latency_vs_knob.png", "flops_scaling_routing_vs_knob.png"]
    from PIL import Image

    with Image.open(tmp_path / "figures" / "flops_scaling_latency_breakdown.png") as im:
        assert round(im.info["dpi"][0]) == 300
    assert SweepResult.load(tmp_path / "sweep_flops_scaling.json").summary == data["summary"]


def test_prepare_inputs_variants(model):
    a = sw.prepare_inputs(model, "hello world")
    assert a[0]["input_ids"].shape == (1, 11)
    b = sw.prepare_inputs(model, torch.tensor([5, 6, 7]))
    assert b[0]["input_ids"].tolist() == [[5, 6, 7]]
    assert len(sw.prepare_inputs(model, None)) == 2
    assert sw.with_prompt_length({"input_ids": torch.tensor([[1, 2, 3]])}, 7)["input_ids"].tolist() == \
        [[1, 2, 3, 1, 2, 3, 1]]
    with pytest.raises(ConfigError):
        sw.prepare_inputs(model, [])
    with pytest.raises(ConfigError):
        sw.prepare_inputs(model, [3.5])


def test_cli_sweep_and_errors(tmp_path, capsys):
    from moe_trace.cli.main import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("first prompt\nsecond\n")
    rc = main(["sweep", "top-k", "--values", "1,2", "--prompts", str(prompts), "--repeats", "1", "--warmup", "0",
               "--max-new-tokens", "2", "--out", str(tmp_path / "o"), "--no-plots", "--no-progress", "--device", "cpu"])
    assert rc == 0
    data = json.loads((tmp_path / "o" / "sweep_top_k.json").read_text())
    assert len(data["all_samples"]) == 4 and data["experiment"]["model"]["name"] == "tiny:olmoe"
    assert rc == 0 and "sweep top-k" in capsys.readouterr().out
    assert main(["sweep", "nope", "--values", "1"]) == 2
    assert "valid knobs" in capsys.readouterr().err
    assert main(["sweep", "top-k", "--values", "99", "--device", "cpu", "--no-progress"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["sweep", "top-k", "--values", "1", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert main(["sweep-plot", str(tmp_path / "o" / "sweep_top_k.json"), "--out", str(tmp_path / "f")]) == 0
    assert len(list((tmp_path / "f").glob("*.png"))) == 3   # latency breakdown, latency vs knob, routing vs knob
