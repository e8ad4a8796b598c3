"""Phases by generation progress: prefill / decode / verify inside generate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_trace
from moe_trace.analysis.rundata import PHASES
from moe_trace.models import build_tiny_model


class Shapes:
    """A plain model pre-hook (independent of moe-trace): the positions of every top-level forward
    and the experts' index tensors seen during it."""

    def __init__(self, model):
        self.positions = []
        self.h = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        self.positions.append(int(x.shape[1]))

    def remove(self):
        self.h.remove()


def _gen(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


def test_a_one_token_prompt_is_prefill():
    model = build_tiny_model("olmoe").eval()
    ids = torch.tensor([[17], [42]])
    with moe_trace.profile(model) as run:
        _gen(model, ids, 4)
    d = run.report().to_dict()
    assert d["phases"]["prefill"]["forward_calls"] == 1 and d["phases"]["prefill"]["tokens"] == 2
    assert d["phases"]["decode"]["forward_calls"] == 3 and d["phases"]["verify"]["forward_calls"] == 0


def test_use_cache_false_is_one_prefill_and_n_minus_1_decode_with_recomputed_tokens():
    model = build_tiny_model("olmoe").eval()
    ids = torch.randint(3, 200, (2, 5))
    shapes = Shapes(model)
    plain = _gen(model, ids, 4, use_cache=False)
    with moe_trace.profile(model) as run:
        out = _gen(model, ids, 4, use_cache=False)
    shapes.remove()
    assert torch.equal(out, plain)
    d = run.report().to_dict()
    assert d["phases"]["prefill"]["forward_calls"] == 1 and d["phases"]["decode"]["forward_calls"] == 3
    assert d["phases"]["prefill"]["tokens"] == 2 * 5
    assert shapes.positions[4:] == [5, 6, 7, 8]  # plain run first, then the profiled one
    assert d["phases"]["decode"]["tokens"] == 2 * (6 + 7 + 8)  # the recomputed sequences
    assert any("use_cache=False" in n for n in d["notes"])


def test_prompt_lookup_verification_forwards_are_verify(tmp_path):
    model = build_tiny_model("olmoe").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 8]])
    shapes = Shapes(model)
    plain = _gen(model, ids, 8, prompt_lookup_num_tokens=3)
    n_plain = len(shapes.positions)
    with moe_trace.profile(model, "kineto", logdir=tmp_path) as run:
        out = _gen(model, ids, 8, prompt_lookup_num_tokens=3)
    shapes.remove()
    assert torch.equal(out, plain)
    pos = shapes.positions[n_plain:]
    d = run.report().to_dict()
    verify = [p for p in pos[1:] if p > 1]
    decode = [p for p in pos[1:] if p == 1]
    assert verify, "prompt lookup found no candidates: the test needs a repeating prompt"
    # the first forward scores the prompt (plus the first candidates): before the first new token
    assert pos[0] >= ids.shape[1]
    assert d["phases"]["prefill"]["forward_calls"] == 1 and d["phases"]["prefill"]["tokens"] == pos[0]
    assert d["phases"]["verify"]["forward_calls"] == len(verify) and d["phases"]["verify"]["tokens"] == sum(verify)
    assert d["phases"]["decode"]["forward_calls"] == len(decode)
    for l in d["layers"]:
        assert l["phases"]["verify"]["tokens"] == sum(verify)
    # carried through the trace: analyze gives the same phases, and the text report lists verify
    back = moe_trace.analyze(tmp_path).to_dict()
    for p in PHASES:
        assert back["phases"][p]["forward_calls"] == d["phases"][p]["forward_calls"]
        assert [l["phases"][p]["expert_counts"] for l in back["layers"]] == \
            [l["phases"][p]["expert_counts"] for l in d["layers"]]
    assert "verify" in str(run.report())
    assert set(run.report().to_dataframe().phase) == {"all", "prefill", "decode", "verify"}


def test_old_reports_without_verify_still_load():
    from moe_trace.analysis import Report, RunData

    model = build_tiny_model("olmoe").eval()
    with torch.no_grad(), moe_trace.profile(model) as run:
        model(torch.randint(3, 200, (1, 4)))
    d = run.run_data.to_dict()
    for key in ("counts", "forward_calls", "forward_tokens", "padding_tokens"):
        d[key].pop("verify", None)
    d["timing"] = None
    rep = Report(RunData.from_dict(d)).to_dict()
    assert rep["phases"]["verify"]["forward_calls"] == 0
    assert rep["phases"]["prefill"]["tokens"] == 4
