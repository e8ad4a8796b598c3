"""Padding-aware counting: positions whose attention mask is 0 are not routed tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_trace
from moe_trace.models import build_tiny_model

LENS = [5, 3, 7]


def _prompts(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (n,), generator=g) for n in LENS]


def _padded(prompts, side):
    S = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        sl = slice(S - len(p), S) if side == "left" else slice(0, len(p))
        ids[b, sl] = p
        mask[b, sl] = 1
    return ids, mask


def _layer_sums(dicts, phase="prefill"):
    keys = ("tokens", "expert_counts", "assignments", "excluded", "padding_tokens")
    out = []
    for layers in zip(*[d["layers"] for d in dicts]):
        row = {}
        for k in keys:
            vals = [l["phases"][phase][k] for l in layers]
            row[k] = np.sum(vals, axis=0).tolist()
        row["k_hist"] = None
        row["top1"] = sum(l["phases"][phase]["top1_prob_mean"] * l["phases"][phase]["tokens"] for l in layers)
        row["flops"] = sum(l["phases"][phase]["flops"]["total"] for l in layers)
        out.append(row)
    return out


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_the_sum_of_each_prompt_alone(family, side):
    model = build_tiny_model(family).eval()
    prompts = _prompts()
    ids, mask = _padded(prompts, side)
    with torch.no_grad(), moe_trace.profile(model) as run:
        model(input_ids=ids, attention_mask=mask)
    batch = run.report().to_dict()
    alone = []
    for p in prompts:
        with torch.no_grad(), moe_trace.profile(model) as r1:
            model(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long))
        alone.append(r1.report().to_dict())
    pads = ids.numel() - sum(LENS)
    assert batch["phases"]["prefill"]["tokens"] == sum(LENS)
    assert batch["phases"]["prefill"]["padding_tokens"] == pads
    ref = _layer_sums(alone)
    for i, (lay, r) in enumerate(zip(batch["layers"], ref)):
        ph = lay["phases"]["prefill"]
        assert ph["tokens"] == sum(LENS) and ph["padding_tokens"] == pads, i
        assert ph["expert_counts"] == r["expert_counts"], (i, ph["expert_counts"], r["expert_counts"])
        assert ph["assignments"] == r["assignments"] and ph["excluded"] == r["excluded"]
        assert ph["k_mean"] == pytest.approx(sum(a["layers"][i]["phases"]["prefill"]["k_mean"] * n
                                                  for a, n in zip(alone, LENS)) / sum(LENS))
        assert ph["top1_prob_mean"] * ph["tokens"] == pytest.approx(r["top1"], rel=1e-4)
        assert ph["flops"]["total"] == r["flops"]
    assert batch["totals"]["flops_per_token"] == pytest.approx(
        sum(a["totals"]["flops"]["total"] for a in alone) / sum(LENS))


def test_left_padded_generate_matches_a_masked_reference_hook():
    """Same run, independent count: plain hooks on the experts record their inputs; pad rows (mask 0
    in the prefill forward) are dropped on the host."""
    from tests.conftest import ReferenceRouting

    model = build_tiny_model("olmoe").eval()
    ids, mask = _padded(_prompts(5), "left")
    bindings = moe_trace.capture.find_bindings(model)
    ref = ReferenceRouting(model, [b.experts[0] for b in bindings])
    n = 4
    with torch.no_grad(), moe_trace.profile(model) as run:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    ref.remove()
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain)
    d = run.report().to_dict()
    keep = mask.reshape(-1).bool()
    for i, b in enumerate(bindings):
        E = b.info.num_experts
        idx, w = ref.calls[i][0]
        counts = np.bincount(idx[keep].reshape(-1).numpy(), minlength=E)
        dec = np.zeros(E, dtype=np.int64)
        for idx_d, _ in ref.calls[i][1:]:
            dec += np.bincount(idx_d.reshape(-1).numpy(), minlength=E)
        assert d["layers"][i]["phases"]["prefill"]["expert_counts"] == counts.tolist()
        assert d["layers"][i]["phases"]["decode"]["expert_counts"] == dec.tolist()
        assert d["layers"][i]["phases"]["prefill"]["padding_tokens"] == int((~keep).sum())
        assert d["layers"][i]["phases"]["decode"]["padding_tokens"] == 0
    assert d["phases"]["prefill"]["tokens"] == int(keep.sum())
    assert d["phases"]["decode"]["tokens"] == ids.shape[0] * (n - 1)


def test_padding_survives_the_trace_and_per_step_tokens_leave_it_out(tmp_path):
    model = build_tiny_model("olmoe").eval()
    ids, mask = _padded(_prompts(), "left")
    with torch.no_grad(), moe_trace.profile(model, "kineto", logdir=tmp_path) as run:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                       do_sample=False, pad_token_id=0)
    live = run.report().to_dict()
    back = moe_trace.analyze(tmp_path).to_dict()
    for p, ph in live["phases"].items():  # the trace adds its own timing; every live key is equal
        assert {k: back["phases"][p][k] for k in ph} == ph
        for lb, ll in zip(back["layers"], live["layers"]):
            assert {k: lb["phases"][p][k] for k in ll["phases"][p]} == ll["phases"][p]
    steps = run.kineto.step_deltas()
    assert [s["tokens"] for s in steps] == [sum(LENS), 3, 3]


def test_masked_counting_does_not_sync(monkeypatch):
    """The model itself syncs on a padded mask (transformers' mask checks), so the guard covers
    moe-trace's own end-of-forward counting only, which with DEFER_ELEMENTS=0 runs every forward."""
    from moe_trace.capture import counters

    model = build_tiny_model("qwen2_moe").eval()
    ids, mask = _padded(_prompts(), "left")
    monkeypatch.setattr(counters, "DEFER_ELEMENTS", 0)  # count inside every forward
    real_end = counters.DeviceCounters.end_forward
    guarded = []

    def end_forward(self, capturing=False):
        with monkeypatch.context() as m:
            def boom(*a, **k):
                raise AssertionError("host sync in moe-trace's counting")
            for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
                m.setattr(torch.Tensor, name, boom)
            m.setattr(torch.cuda, "synchronize", boom)
            real_end(self, capturing)
        guarded.append(self.pending == [])

    monkeypatch.setattr(counters.DeviceCounters, "end_forward", end_forward)
    with torch.no_grad(), moe_trace.profile(model) as run:
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    assert guarded == [True, True]  # both forwards were counted inside the guard
    d = run.report().to_dict()
    assert d["phases"]["prefill"]["padding_tokens"] == 2 * (ids.numel() - sum(LENS))
