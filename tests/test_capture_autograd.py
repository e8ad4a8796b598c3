"""Forwards with grad on, a backward inside the block, activation checkpointing."""
from __future__ import annotations

import pytest
import torch

import moe_trace
from moe_trace.models import build_tiny_model


def _step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


def _counts(run):
    d = run.report().to_dict()
    return [l["phases"]["prefill"]["expert_counts"] for l in d["layers"]], d


@pytest.mark.parametrize("mode", ["stats", "timing"])
def test_grad_forward_and_backward_are_counted_exactly_and_change_nothing(mode):
    torch.manual_seed(0)
    model = build_tiny_model("qwen2_moe").train()
    ids = torch.randint(3, 200, (2, 6))
    loss0, g0 = _step(model, ids)
    with moe_trace.profile(model, mode) as run:
        loss1, g1 = _step(model, ids)
        loss2, _ = _step(model, ids)
    assert torch.equal(loss0, loss1) and torch.equal(loss1, loss2)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    counts, d = _counts(run)
    with torch.no_grad(), moe_trace.profile(model) as ref:  # the same forward without grad
        model(input_ids=ids)
    ref_counts, _ = _counts(ref)
    assert counts == [[2 * x for x in row] for row in ref_counts]
    assert d["phases"]["prefill"]["forward_calls"] == 2 and d["phases"]["prefill"]["tokens"] == 24


def test_counters_hold_no_graph_between_forwards():
    model = build_tiny_model("olmoe").train()
    ids = torch.randint(3, 200, (2, 6))
    with moe_trace.profile(model) as run:
        for _ in range(3):
            model(input_ids=ids).logits.sum().backward()
            for dc in run.counters.devices.values():
                assert dc.pending == []  # counted at the end of the forward: no queued graph tensors
                assert not dc.conf.requires_grad and not dc._hist.requires_grad
    assert run.report().to_dict()["phases"]["prefill"]["tokens"] == 36


@pytest.mark.parametrize("selector", [None, "topk:1"])
def test_activation_checkpointing_recompute_is_not_counted_twice(selector):
    """With checkpointing the MoE blocks run again inside backward; they are neither counted again
    nor routed differently (a selector routes the recompute the same way: equal gradients)."""
    torch.manual_seed(0)
    model = build_tiny_model("olmoe").train()
    ids = torch.randint(3, 200, (2, 6))
    kw = {"selector": selector} if selector else {}
    with moe_trace.profile(model, **kw) as plain:
        loss0, g0 = _step(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with moe_trace.profile(model, "timing", **kw) as ckpt:
        loss1, g1 = _step(model, ids)
    assert torch.equal(loss0, loss1)
    assert all(torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7) for k in g0)
    assert _counts(ckpt)[0] == _counts(plain)[0]
    assert [l["tokens"] for l in ckpt.report().to_dict()["layers"]] == [12] * 3
