"""Compiled models, and a loud warning for layers that saw forwards but recorded no routing."""
from __future__ import annotations

import pytest
import torch

import moe_trace
from moe_trace.models import build_tiny_model


def _model():
    return build_tiny_model("olmoe", num_hidden_layers=2).eval()


def _counts(run):
    return [l["expert_counts"] for l in run.report().to_dict()["layers"]]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_model_compiled_before_profile_is_counted_exactly(backend):
    m = _model()
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = m(input_ids=ids).logits
    with torch.no_grad(), moe_trace.profile(m) as ref:
        m(input_ids=ids)
    m.forward = torch.compile(m.forward, backend=backend)
    with torch.no_grad():
        m(input_ids=ids)  # warmed up: compiled without moe-trace's hooks
    with torch.no_grad(), moe_trace.profile(m) as run:
        got_logits = m(input_ids=ids).logits
    assert _counts(run) == _counts(ref)
    assert [l["tokens"] for l in run.report().to_dict()["layers"]] == [10, 10]
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    assert not run.report().to_dict()["notes"]
    assert not any(x._forward_hooks or x._forward_pre_hooks for x in m.modules())
    torch.compiler.reset()


def test_a_layer_that_saw_forwards_but_recorded_nothing_is_a_loud_warning(capsys):
    m = build_tiny_model("olmoe").eval()
    m.model.layers[1].mlp.forward = lambda hidden_states: hidden_states  # bypasses router and experts
    with pytest.warns(RuntimeWarning, match=r"MoE layer\(s\) 1 saw 1 model forward"):
        with torch.no_grad(), moe_trace.profile(m) as run:
            m(input_ids=torch.randint(3, 200, (1, 4)))
    d = run.report().to_dict()
    assert any("recorded no routing" in n and "1" in n for n in d["notes"])
    assert "recorded no routing" in capsys.readouterr().err
    assert [l["tokens"] for l in d["layers"]] == [4, 0, 4]
