"""Core capture: counts against an independent reference, FLOPs against FlopCounterMode, exact
restoration of the model, and the errors a user hits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import moe_trace
from moe_trace.capture import find_bindings
from tests.conftest import ReferenceRouting, generate, prompt, routing_reference, set_experts_implementation, tiny_olmoe, tiny_qwen2_moe

pytestmark = pytest.mark.tf4  # also run on transformers 4.57 (.ci/run)


def hook_state(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_detect_olmoe_sizes(olmoe):
    layers = moe_trace.detect(olmoe)
    assert [l.name for l in layers] == [f"model.layers.{i}.mlp" for i in range(3)]
    l0 = layers[0]
    assert (l0.index, l0.num_experts, l0.top_k, l0.hidden_size, l0.expert_dim, l0.shared_expert_dim) == (0, 8, 2, 64, 32, 0)
    assert l0.family == "olmoe" and l0.device == "cpu" and l0.gated
    assert l0.sources["expert_dim"] == "config"


def test_detect_shared_expert_from_module():
    layers = moe_trace.detect(tiny_qwen2_moe())
    assert layers[0].shared_expert_dim == 48 and layers[0].shared == ["model.layers.0.mlp.shared_expert"]
    assert layers[0].expert_dim == 32  # moe_intermediate_size, not the dense intermediate_size


@pytest.mark.parametrize("mode", ["stats", "timing"])
def test_counts_match_reference_and_tokens_unchanged(mode):
    model = tiny_olmoe()
    ids = prompt(batch=2, length=6)
    n = 5
    ref_tokens = generate(model, ids, n)
    ref = routing_reference(model, find_bindings(model))
    with moe_trace.profile(model, mode=mode) as run:
        out = generate(model, ids, n)
    ref.remove()
    assert torch.equal(out, ref_tokens)
    d = run.report().to_dict()
    B, P = ids.shape
    assert d["phases"]["prefill"]["tokens"] == B * P
    assert d["phases"]["decode"]["tokens"] == B * (n - 1)
    assert d["phases"]["prefill"]["forward_calls"] == 1 and d["phases"]["decode"]["forward_calls"] == n - 1
    for layer in d["layers"]:
        for phase in ("prefill", "decode"):
            counts, khist, tokens = ref.counts(layer["index"], 8, phase)
            got = layer["phases"][phase]
            assert got["expert_counts"] == counts.tolist()
            if khist is not None:  # 4.x: rows per expert module (no k)
                assert got["k_hist"] == khist and got["tokens"] == tokens
        assert layer["tokens"] == B * P + B * (n - 1)
        assert layer["expert_counts"] == [a + b for a, b in zip(layer["phases"]["prefill"]["expert_counts"],
                                                                layer["phases"]["decode"]["expert_counts"])]
    if mode == "timing":
        assert d["timing_source"] == "host_clock"
        assert all(l["phases"]["prefill"]["time_ms"]["router_ms"] > 0 for l in d["layers"])
        assert all(l["phases"]["decode"]["time_ms"]["experts_ms"] > 0 for l in d["layers"])
    else:
        assert d["timing_source"] is None


def test_router_confidence_matches_recomputed_logits(olmoe):
    ids = prompt()
    with torch.no_grad():
        out = olmoe(ids, output_router_logits=True)
    with moe_trace.profile(olmoe) as run, torch.no_grad():
        olmoe(ids)
    d = run.report().to_dict()
    for i, logits in enumerate(out.router_logits):
        p = torch.softmax(logits.double(), -1)
        top1 = p.max(-1).values.mean().item()
        ent = (-(p * p.log()).sum(-1)).mean().item()
        assert d["layers"][i]["phases"]["prefill"]["top1_prob_mean"] == pytest.approx(top1, rel=1e-5)
        assert d["layers"][i]["phases"]["prefill"]["router_entropy_mean"] == pytest.approx(ent, rel=1e-5)


def flop_counter_parts(model, bindings, ids, whole_block: bool = False, call_kwargs: dict | None = None):
    """FLOPs counted by torch's FlopCounterMode inside each layer's router / experts / shared modules.

    `whole_block`: the experts' matmuls run in the block's own body (doge's embedding experts), so the
    experts' share is the block's FLOPs minus its router and shared modules."""
    names = {id(m): n for n, m in model.named_modules()}
    fc = FlopCounterMode(display=False)
    with fc:  # not under no_grad: torch's ModuleTracker fails on dbrx's parameter views there
        model(ids, **(call_kwargs or {}))
    counts = {k.split(".", 1)[1] if "." in k else "": sum(v.values()) for k, v in fc.get_flop_counts().items()}
    parts = []
    for b in bindings:
        router = counts.get(names[id(b.router)], 0)
        experts = sum(counts.get(names[id(e)], 0) for e in b.experts)
        shared = sum(counts.get(names[id(s)], 0) for s in b.shared)
        if whole_block:
            experts = counts.get(names[id(b.block)], 0) - router - shared
        parts.append({"router": router, "experts": experts, "shared": shared, "total": router + experts + shared})
    return parts


@pytest.mark.parametrize("build", [tiny_olmoe, tiny_qwen2_moe], ids=["olmoe", "qwen2_moe"])
def test_flops_equal_flop_counter_mode_on_eager_path(build):
    model = build()
    set_experts_implementation(model, "eager")
    ids = prompt(batch=2, length=7)
    bindings = find_bindings(model)
    expected = flop_counter_parts(model, bindings, ids)
    with moe_trace.profile(model) as run, torch.no_grad():
        model(ids)
    d = run.report().to_dict()
    for layer, exp in zip(d["layers"], expected):
        assert layer["phases"]["prefill"]["flops"] == exp
    assert d["phases"]["prefill"]["flops"]["total"] == sum(e["total"] for e in expected)
    assert d["totals"]["flops"]["total"] == sum(l["flops"]["total"] for l in d["layers"])


def test_model_restored_exactly_also_when_body_raises(olmoe):
    before_hooks = hook_state(olmoe)
    before_state = {k: v.clone() for k, v in olmoe.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with moe_trace.profile(olmoe, mode="timing"):
            generate(olmoe, prompt(), 2)
            raise RuntimeError("boom")
    assert hook_state(olmoe) == before_hooks
    assert not hasattr(olmoe, "_moe_trace_active_run")
    after = olmoe.state_dict()
    assert all(torch.equal(before_state[k], after[k]) for k in before_state)
    with moe_trace.profile(olmoe) as run:  # usable again
        generate(olmoe, prompt(), 2)
    assert run.report().to_dict()["phases"]["prefill"]["tokens"] == 12


def test_nested_profile_is_a_clear_error(olmoe):
    with moe_trace.profile(olmoe):
        with pytest.raises(moe_trace.ProfileStateError, match="already being profiled"):
            with moe_trace.profile(olmoe):
                pass
    assert hook_state(olmoe) == {n: (0, 0) for n, _ in olmoe.named_modules()}


def test_report_inside_block_is_an_error(olmoe):
    with moe_trace.profile(olmoe) as run:
        with pytest.raises(moe_trace.ProfileStateError, match="after the `with` block"):
            run.report()


def test_unknown_mode():
    with pytest.raises(moe_trace.ConfigError, match="unknown mode 'fast'.*stats, timing, kineto"):
        moe_trace.profile(tiny_olmoe(), mode="fast")


def test_non_moe_model_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(moe_trace.NoMoELayersError, match="no MoE layer found in LlamaForCausalLM.*register_handler"):
        moe_trace.detect(model)


class OddExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 8))

    def forward(self, x):
        return x


class OddMoE(nn.Module):
    """Stacked expert weights but a router the built-in handlers do not recognise."""

    def __init__(self):
        super().__init__()
        self.scorer = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
        self.bank = OddExperts()

    def forward(self, x):
        scores = self.scorer(x)
        idx = scores.topk(2, -1).indices
        w = torch.ones_like(idx, dtype=x.dtype)
        return self.bank(x), idx, w


def test_unknown_structure_error_and_custom_handler():
    model = nn.Sequential(OddMoE())
    with pytest.raises(moe_trace.UnknownArchitectureError, match="register_handler"):
        moe_trace.detect(model)

    class OddHandler(moe_trace.MoEHandler):
        name = "odd"
        supports_selectors = False

        def match(self, name, module, model):
            if not isinstance(module, OddMoE):
                return None
            from moe_trace.capture.handlers.generic import GenericHandler

            b = GenericHandler.bind(self, name, module, model, "scorer", module.scorer, "bank", module.bank, [], 4, 8, 8, True)
            b.experts = []  # routing is read from the block's output instead
            return b

        def logits_from_router(self, output):
            return output

    handler = moe_trace.register_handler(OddHandler)
    try:
        layers = moe_trace.detect(model)
        assert len(layers) == 1 and layers[0].handler == "odd" and layers[0].num_experts == 4
    finally:
        moe_trace.unregister_handler(handler)
    with pytest.raises(moe_trace.UnknownArchitectureError):
        moe_trace.detect(model)


def test_report_outputs(tmp_path, olmoe):
    with moe_trace.profile(olmoe) as run:
        generate(olmoe, prompt(), 3)
    report = run.report()
    report.to_json(tmp_path / "r.json")
    report.to_csv(tmp_path / "layers.csv")
    import json

    d = json.loads((tmp_path / "r.json").read_text())
    assert d["schema"] == "moe-trace/report/1"
    assert d["model"] == {"family": "olmoe", "name": d["model"]["name"], "num_moe_layers": 3, "num_experts": 8,
                          "top_k": 2, "hidden_size": 64, "expert_dim": 32, "shared_expert_dim": 0}
    df = report.to_dataframe()
    assert len(df) == 3 * 3 and set(df.phase) == {"all", "prefill", "decode"}
    assert (tmp_path / "layers.csv").read_text().splitlines()[0].startswith("layer,name,device,phase")
    text = str(report)
    assert "olmoe" in text and "prefill" in text and "decode" in text
    dev = d["devices"]
    assert len(dev) == 1 and dev[0]["device"] == "cpu" and dev[0]["layers"] == 3
    assert dev[0]["flops"]["total"] == d["totals"]["flops"]["total"]
    assert dev[0]["tokens"] == sum(l["tokens"] for l in d["layers"])


def test_balance_metrics_reference():
    from moe_trace.analysis.metrics import balance

    x = np.array([10, 0, 5, 5])
    b = balance(x)
    mean = x.mean()
    assert b["cv"] == pytest.approx(x.std() / mean)
    # Gini by the mean-absolute-difference definition
    gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * mean)
    assert b["gini"] == pytest.approx(gini)
    p = x[x > 0] / x.sum()
    assert b["entropy_norm"] == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert b["max_over_mean"] == pytest.approx(2.0)
    assert (b["active_experts"], b["dead_experts"]) == (3, 1)
