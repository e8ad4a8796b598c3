"""Sweeps that measure: every setting warmed up, repetitions interleaved, spread in the summary, a
warning when the spread exceeds the effect, block sets and an importance order for the block mask,
routing plots, and a comparison plot."""
from __future__ import annotations

import json

import pytest
import torch

from moe_trace.errors import ConfigError
from moe_trace.experiments import sweep as sw
from moe_trace.models import build_tiny_model


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("olmoe")


def test_warmup_per_setting_and_interleaved_order(model, monkeypatch):
    calls = []
    real = sw.measure_generate

    def spy(m, inp, **kw):
        calls.append(kw["selector"].k)
        return real(m, inp, **kw)

    monkeypatch.setattr(sw, "measure_generate", spy)
    res = sw.run_sweep(model, "top-k", [1, 2, 4], repeats=3, warmup=1, max_new_tokens=2, plots=False,
                       progress=False, inputs=[torch.tensor([[5, 6, 7, 8]])])
    assert calls[:3] == [1, 2, 4]                                   # one untimed warm-up per setting
    assert calls[3:] == [1, 2, 4, 2, 4, 1, 4, 1, 2]                 # rotated per repetition
    assert [s["value"] for s in res.all_samples] == calls[3:]
    assert res["experiment"]["interleaved"] is True


def test_noise_warning_when_spread_exceeds_effect():
    rows = [{"prefill_ms_mean": 10.0, "prefill_ms_std": 5.0, "decode_ms_mean": 10.0, "decode_ms_std": 0.1,
             "total_ms_mean": 20.0, "total_ms_std": 5.0},
            {"prefill_ms_mean": 11.0, "prefill_ms_std": 4.0, "decode_ms_mean": 30.0, "decode_ms_std": 0.1,
             "total_ms_mean": 41.0, "total_ms_std": 4.0}]
    w = sw.noise_warnings(rows, "top-k")
    assert len(w) == 1 and w[0].startswith("prefill_ms") and "exceeds" in w[0]


def test_sweep_result_carries_warnings_and_the_cli_prints_them(model, tmp_path, capsys, monkeypatch):
    from moe_trace.cli.main import main

    monkeypatch.setattr(sw, "noise_warnings", lambda rows, knob: ["total_ms: spread exceeds effect (test)"])
    assert main(["sweep", "top-k", "--values", "1", "2", "--repeats", "2", "--max-new-tokens", "2", "--no-progress",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "moe-trace: warning: total_ms: spread exceeds effect" in out and "total_ms_ci95_low" in out
    assert json.loads((tmp_path / "sweep_top_k.json").read_text())["warnings"]


def test_block_sets_and_importance_order_mask_the_right_blocks(model):
    _, blocks = sw.find_decoder_blocks(model)
    ran = []
    hs = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    ids = torch.tensor([[5, 6, 7]])
    try:
        for active, order, want in (((0, 2), None, {0, 2}), (2, [2, 0, 1], {2, 0}), (1, None, {0})):
            ran.clear()
            with torch.no_grad(), sw.mask_blocks(model, active, order=order):
                model(ids)
            # a masked block's forward is shadowed: its MoE block (mlp) does not run
            assert set(ran) == want, (active, order, ran)
    finally:
        for h in hs:
            h.remove()
    assert all("forward" not in b.__dict__ for b in blocks)       # restored
    with pytest.raises(ConfigError, match="distinct block indices"):
        sw.check_block_order([0, 0, 1], 3)
    with pytest.raises(ConfigError, match=r"indices must be in \[0, 2\]"):
        sw.active_block_set((0, 7), 3)


def test_active_layers_sweep_with_sets_and_order(model, tmp_path):
    res = sw.run_sweep(model, "active-layers", [(0, 2), "1+2", 1], repeats=1, warmup=0, max_new_tokens=2,
                       progress=False, out_dir=tmp_path, block_order=[2, 1, 0])
    assert [r["value"] for r in res.summary] == [[0, 2], [1, 2], 1]
    assert [s["active_layers"] for s in res.all_samples] == [2, 2, 2, 2, 1, 1]   # 2 default prompts each
    assert res["experiment"]["block_order"] == [2, 1, 0]
    assert (tmp_path / "figures" / "active_layers_routing_vs_knob.png").exists()
    with pytest.raises(ConfigError, match="active-layers knob only"):
        sw.run_sweep(model, "top-k", [1], block_order=[0, 1, 2], progress=False)


def test_compare_draws_a_plot(tmp_path, capsys):
    from moe_trace.cli.main import main

    png = tmp_path / "cmp.png"
    assert main(["compare", "--config", "base=model", "--config", "top1=topk:1", "--max-new-tokens", "2",
                 "--no-progress", "--warmup", "0", "--plot", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size[0] > 1000 and f"wrote {png}" in capsys.readouterr().out
