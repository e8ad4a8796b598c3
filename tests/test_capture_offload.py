"""accelerate offload (cpu_offload, disk_offload): weights on `meta` between forwards, counters on
the execution device, counts equal to the same model without offload."""
from __future__ import annotations

import pytest
import torch

import moe_trace
from moe_trace.models import build_tiny_model

accelerate = pytest.importorskip("accelerate")


def _run(model, mode, tmp_path, **kw):
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    if mode == "kineto":
        kw["logdir"] = tmp_path / "kineto"
    with torch.no_grad(), moe_trace.profile(model, mode, **kw) as run:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                             min_new_tokens=3, do_sample=False, pad_token_id=0)
    return out, run.report().to_dict()


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
@pytest.mark.parametrize("mode", ["stats", "timing", "kineto"])
def test_offloaded_model_counts_equal_the_plain_model(how, mode, tmp_path):
    ref_out, ref = _run(build_tiny_model("qwen2_moe"), "stats", tmp_path)
    model = build_tiny_model("qwen2_moe")
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    out, d = _run(model, mode, tmp_path)
    assert torch.equal(out, ref_out)
    assert [l["expert_counts"] for l in d["layers"]] == [l["expert_counts"] for l in ref["layers"]]
    assert {l["device"] for l in d["layers"]} == {"cpu"}  # the execution device, never "meta"
    if mode == "kineto":
        back = moe_trace.analyze(tmp_path / "kineto").to_dict()
        assert [l["expert_counts"] for l in back["layers"]] == [l["expert_counts"] for l in ref["layers"]]
