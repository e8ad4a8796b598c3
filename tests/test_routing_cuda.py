"""RouterLogger on CUDA: pinned async copies, no host sync inside on_route, counts equal the report.

Skipped without a GPU. Also runs as a script: `python tests/test_routing_cuda.py DIR`.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model():
    from moe_trace.routing.pipeline import build_demo_model

    return build_demo_model().to("cuda", torch.bfloat16)


@pytest.mark.parametrize("fmt", ["columnar", "json"])
def test_cuda_profile_counts_equal_report(tmp_path, fmt):
    import moe_trace
    from moe_trace.routing.logfile import load_logs
    from moe_trace.routing.logger import RouterLogger

    m = _model()
    ids = torch.randint(3, 256, (4, 16), device="cuda", generator=None)
    lg = RouterLogger(tmp_path / fmt, format=fmt, flush_every=2, logits_dtype="float16").attach(m)
    with torch.no_grad(), moe_trace.profile(m, observers=[lg]) as run:
        m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                   pad_token_id=0)
        m(input_ids=ids, labels=ids)
    rep = run.report().to_dict()
    log = load_logs(tmp_path / fmt)
    assert log.sample_num_tokens.tolist() == [16 + 7] * 4 + [16] * 4
    assert np.isfinite(log.sample_loss[4:]).all()
    for i, l in enumerate(log.layers):
        assert l.expert_counts().tolist() == rep["layers"][i]["expert_counts"]


def test_cuda_run_logging(tmp_path):
    from moe_trace.routing.logfile import load_logs
    from moe_trace.routing.pipeline import load_prompts, run_logging

    st = run_logging(_model(), load_prompts(None), tmp_path / "r", max_length=64)
    log = load_logs(tmp_path / "r")
    rep = st["report"].to_dict()
    assert log.num_samples == 30
    for i, l in enumerate(log.layers):
        assert l.expert_counts().tolist() == rep["layers"][i]["expert_counts"]


def test_cuda_on_route_does_not_sync(tmp_path):
    from moe_trace.analysis import LayerInfo
    from moe_trace.routing.logfile import load_logs
    from moe_trace.routing.logger import RouterLogger

    layers = [LayerInfo(index=i, name=str(i), family="x", num_experts=64, top_k=6, hidden_size=1, expert_dim=1)
              for i in range(4)]
    lg = RouterLogger(tmp_path / "s", layers=layers, flush_every=4, format="columnar")
    x = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16)
    w, idx = x.float().softmax(-1).topk(6)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for step in range(40):
        if step % 10 == 0:
            lg.begin_sample(step // 10)
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
        try:
            for layer in layers:
                lg.on_route(layer, "prefill" if step % 10 == 0 else "decode", step, x, w, idx)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        lg.on_step_end(step, "decode")
    host_s = time.perf_counter() - t
    lg.close()
    log = load_logs(tmp_path / "s")
    assert log.sample_num_tokens.tolist() == [4096 * 10] * 4
    np.testing.assert_array_equal(log.layers[0].logits[:4096], x.float().cpu().numpy())
    print(f"on_route + on_step_end, 40 steps x 4 layers x 4096 tokens: {host_s:.3f}s host time")


if __name__ == "__main__":
    import pathlib
    import tempfile

    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    for name, fn in [("a", lambda p: test_cuda_profile_counts_equal_report(p, "columnar")),
                     ("b", lambda p: test_cuda_profile_counts_equal_report(p, "json")),
                     ("c", test_cuda_run_logging), ("d", test_cuda_on_route_does_not_sync)]:
        p = root / name
        p.mkdir(parents=True, exist_ok=True)
        fn(p)
        print("ok", name)
