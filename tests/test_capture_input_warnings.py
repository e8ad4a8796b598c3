"""Issue 16 items in capture: values that cannot be used as given are named, never silent."""
from __future__ import annotations

import pytest
import torch

import moe_trace
from moe_trace.models import build_tiny_model


def _ids():
    return torch.randint(3, 200, (2, 4))


def test_selector_returning_nan_is_named():
    m = build_tiny_model("olmoe").eval()

    def half_nan(probs):
        k = torch.full(probs.shape[:-1], 2.0)
        k[0] = float("nan")
        return k

    with pytest.warns(RuntimeWarning, match=r"returned 3 non-finite k value\(s\) \(e\.g\. nan\)"):
        with torch.no_grad(), moe_trace.profile(m, selector=half_nan) as run:
            m(input_ids=_ids())
    assert any("non-finite" in n for n in run.report().to_dict()["notes"])


def test_topk_beyond_the_experts_names_the_value_used():
    from moe_trace.selectors import middleware

    middleware._WARNED.clear()
    m = build_tiny_model("olmoe").eval()
    with pytest.warns(UserWarning, match=r"k=100 is more than the 8 experts of layer 0; using k=8"):
        with torch.no_grad(), moe_trace.profile(m, selector="topk:100") as run:
            m(input_ids=_ids())
    assert run.report().to_dict()["layers"][0]["k_max"] == 8


def test_schedule_whose_window_is_never_reached_warns(tmp_path):
    m = build_tiny_model("olmoe").eval()
    with pytest.warns(RuntimeWarning, match="active window was never reached in 2 model forward"):
        with torch.no_grad(), moe_trace.profile(m, "kineto", logdir=tmp_path,
                                                schedule={"wait": 5, "warmup": 1, "active": 1}) as run:
            m(input_ids=_ids())
            m(input_ids=_ids())
    assert run.trace_files == []
    assert any("never reached" in n for n in run.report().to_dict()["notes"])
