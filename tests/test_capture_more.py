"""The 4.x legacy layout through profile(), local checkpoints through the CLI, and kineto schedules."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moe_trace
from moe_trace.capture import find_bindings
from moe_trace.models import build_legacy_model, example_inputs, save_tiny_checkpoint
from tests.conftest import ReferenceRouting

pytestmark = pytest.mark.tf4  # also run on transformers 4.57 (.ci/run)
NEEDS_5X = pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                              reason="transformers 5 layout (stacked experts, set_experts_implementation)")


def test_legacy_layout_counts_match_tokens_each_expert_received():
    """4.x blocks loop over an nn.ModuleList: the rows each expert module receives are an independent
    count of its assignments (top-k is recomputed from the gate's logits by the handler)."""
    model = build_legacy_model(seed=0)
    bindings = find_bindings(model)
    assert len(bindings) == 3 and bindings[0].info.handler == "legacy_modulelist"
    assert (bindings[0].info.num_experts, bindings[0].info.top_k, bindings[0].info.hidden_size) == (8, 2, 64)
    received = [[0] * 8 for _ in bindings]
    handles = []
    for li, b in enumerate(bindings):
        for e, expert in enumerate(b.experts):
            def hook(mod, args, li=li, e=e):
                received[li][e] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
            handles.append(expert.register_forward_pre_hook(hook))
    inputs = example_inputs(model)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)
        with moe_trace.profile(model, mode="timing") as run:
            out = model.generate(**inputs, **gen)
    for h in handles:
        h.remove()
    assert torch.equal(out, ref)
    d = run.report().to_dict()
    # the reference hooks ran during both generates
    assert [[2 * x for x in l["expert_counts"]] for l in d["layers"]] == received
    assert all(l["time_ms"]["experts_ms"] > 0 for l in d["layers"])


def test_inspect_and_demo_on_a_locally_saved_checkpoint(tmp_path):
    ckpt = save_tiny_checkpoint("qwen2_moe", tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-m", "moe_trace", "inspect", str(ckpt)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "qwen2_moe" in out.stdout and "meta" in out.stdout
    rows = [l for l in out.stdout.splitlines() if ".mlp" in l]
    assert len(rows) == len(moe_trace.detect(__import__("moe_trace.models", fromlist=["load_checkpoint"])
                                              .load_checkpoint(ckpt)))
    demo = subprocess.run([sys.executable, "-m", "moe_trace", "demo", "--model", str(ckpt), "--mode", "stats",
                           "--max-new-tokens", "3", "--logdir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "moe-trace report: qwen2_moe" in demo.stdout
    assert (tmp_path / "run" / "report.json").exists()


def test_kineto_schedule_bounds_the_trace_but_not_the_report(tmp_path):
    from moe_trace.models import build_tiny_model
    from moe_trace.trace import validate_trace

    model = build_tiny_model("olmoe")
    inputs = example_inputs(model)
    with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=tmp_path,
                                            schedule=dict(wait=1, warmup=1, active=3, repeat=1)) as run:
        model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert len(run.trace_files) == 1 and validate_trace(run.trace_files[0]) == []
    import gzip
    import json

    events = json.loads(gzip.decompress(run.trace_files[0].read_bytes()))["traceEvents"]
    step_ranges = {e["name"] for e in events if e.get("cat") == "user_annotation"
                   and "#" in e.get("name", "") and e["name"].startswith("moe_trace/")}
    counter_ts = {e["ts"] for e in events if e.get("ph") == "C"}
    live = run.report().to_dict()
    rebuilt = moe_trace.analyze(tmp_path).to_dict()
    assert [l["expert_counts"] for l in rebuilt["layers"]] == [l["expert_counts"] for l in live["layers"]]
    assert live["phases"]["decode"]["forward_calls"] == 7
    assert 0 < len(step_ranges) <= 3  # only the active window's steps are in the trace ...
    assert len(counter_ts) == len(step_ranges)  # ... and carry counters; the report covers all 8


def test_cuda_event_timer_logic_on_cpu(monkeypatch):
    """The CUDA-event tier's bookkeeping, with stand-in events (CI has no GPU)."""
    from moe_trace.capture import timing

    class FakeEvent:
        clock = 0.0
        made = 0

        def __init__(self, enable_timing=True):
            self.t = None
            FakeEvent.made += 1

        def record(self, stream=None):
            FakeEvent.clock += 1.5
            self.t = FakeEvent.clock

        def elapsed_time(self, end):
            return end.t - self.t

    class FakeStream:
        made = []

        def __init__(self, stream_id, device_index, device_type):
            FakeStream.made.append(stream_id)

    current = [(7, 0, 1)]
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(timing.torch._C, "_cuda_getCurrentStream", lambda index: current[0], raising=False)
    monkeypatch.setitem(timing._event_pool, 0, [])
    synced = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: synced.append(1))
    t = timing.PartTimer()
    dev = torch.device("cuda", 0)
    for phase, layer, part in [(0, 0, "router"), (0, 0, "experts"), (1, 0, "router"), (1, 1, "shared")]:
        t.start(id(part) + layer, phase, layer, part, dev)
        t.stop(id(part) + layer)
    t.stop(12345)  # a stop without a start is ignored
    out, source = t.resolve(2)
    assert source == "cuda_events" and synced == [1]  # one sync, at the end
    assert out["prefill"][0] == {"router_ms": 1.5, "experts_ms": 1.5, "shared_ms": None}
    assert out["decode"][0]["router_ms"] == 1.5 and out["decode"][1]["shared_ms"] == 1.5
    assert out["decode"][1]["router_ms"] is None
    assert FakeEvent.made == 8 and FakeStream.made == [7]  # one stream object while the stream stays
    # a second run reuses the pooled events; a changed current stream is picked up
    t = timing.PartTimer()
    t.start(1, 1, 0, "router", dev)
    current[0] = (9, 0, 1)
    t.stop(1)
    out, _ = t.resolve(1)
    assert FakeEvent.made == 8 and FakeStream.made == [7, 7, 9] and out["decode"][0]["router_ms"] == 1.5


def test_no_host_sync_inside_profiled_forwards(monkeypatch):
    """Inside the forwards (hooks, queueing, per-forward flush) nothing may read a tensor back to the
    host: .item(), .tolist(), .cpu(), .numpy(), bool() and synchronize are made to raise."""
    from moe_trace.models import build_tiny_model

    model = build_tiny_model("qwen2_moe")  # has shared experts too
    ids = example_inputs(model)["input_ids"]
    forbidden = ["item", "tolist", "cpu", "numpy", "__bool__"]
    with torch.no_grad(), moe_trace.profile(model, mode="stats") as run:
        model(ids)  # warm: the model's own first-call work
        with monkeypatch.context() as m:
            def boom(*a, **k):
                raise AssertionError("host sync inside a profiled forward")
            for name in forbidden:
                m.setattr(torch.Tensor, name, boom)
            m.setattr(torch.cuda, "synchronize", boom)
            model(ids)
            model(ids[:, -1:])  # a decode-shaped forward
    d = run.report().to_dict()
    assert d["phases"]["prefill"]["forward_calls"] == 2 and d["phases"]["decode"]["forward_calls"] == 1


@NEEDS_5X
def test_detection_cache_is_invalidated_and_never_shared():
    from moe_trace.models import build_tiny_model

    model = build_tiny_model("olmoe")
    a = moe_trace.detect(model)
    b = moe_trace.detect(model)
    assert [l.name for l in a] == [l.name for l in b] and a[0] is not b[0]
    a[0].num_experts = 999  # a caller mutating its records must not leak into later runs
    assert moe_trace.detect(model)[0].num_experts == 8
    model.set_experts_implementation("eager")
    assert moe_trace.detect(model)[0].experts_implementation == "eager"  # read anew on every call
    model.model.layers[0].mlp = torch.nn.Identity()  # module tree changed: detection runs again
    assert len(moe_trace.detect(model)) == len(a) - 1


def test_per_device_rows_use_the_real_rank():
    import numpy as np

    from moe_trace.analysis import LayerCounts, LayerInfo, Report, RunData

    layer = LayerInfo(index=0, name="l0", family="olmoe", num_experts=2, top_k=1, hidden_size=4, expert_dim=2,
                      device="cuda:0")
    parts = []
    for rank in (3, 5):
        run = RunData.empty({"family": "olmoe"}, [layer])
        run.counts["prefill"][0] = LayerCounts(tokens=2, calls=1, expert_counts=np.array([1, 1]),
                                               k_hist=np.array([0, 2]))
        parts.append(run)
    d = Report(parts, ranks=[3, 5]).to_dict()
    assert [x["device"] for x in d["devices"]] == ["rank3/cuda:0", "rank5/cuda:0"]
    assert d["layers"][0]["expert_counts"] == [2, 2]


@NEEDS_5X
def test_stats_counts_at_the_router_with_one_hook_per_layer():
    """When the experts get the router's very tensors, counting moves to the router after the first
    forward and the experts lose moe-trace's hook; counts still equal the experts-input reference."""
    from moe_trace.models import build_tiny_model

    model = build_tiny_model("olmoe")
    blocks = [b for b in find_bindings(model)]
    ids = example_inputs(model)["input_ids"]
    ref = ReferenceRouting(model, [b.experts[0] for b in blocks])
    with torch.no_grad(), moe_trace.profile(model, mode="stats") as run:
        model(ids)
        assert [len(b.experts[0]._forward_pre_hooks) for b in blocks] == [1] * len(blocks)  # the reference's only
        assert all(len(b.router._forward_hooks) == 1 for b in blocks)
        model(ids[:, -1:])
        model(ids[:, -1:])
    ref.remove()
    assert all(len(b.experts[0]._forward_pre_hooks) == 0 and len(b.router._forward_hooks) == 0 for b in blocks)
    d = run.report().to_dict()
    for layer in d["layers"]:
        calls = ref.calls[layer["index"]]
        idx = torch.cat([c[0].reshape(-1) for c in calls])
        assert layer["expert_counts"] == torch.bincount(idx, minlength=8).tolist()
        assert (layer["calls"], layer["phases"]["prefill"]["calls"], layer["phases"]["decode"]["calls"]) == (3, 1, 2)


@NEEDS_5X
def test_a_block_that_changes_routing_after_the_router_is_counted_at_the_experts():
    """A block that zeroes each token's second weight between router and experts: the experts see k=1,
    so counting must stay at the experts (the router's own tensors would say k=2)."""
    from moe_trace.models import build_tiny_model

    model = build_tiny_model("olmoe")
    for layer in model.model.layers:
        mlp = layer.mlp

        def forward(hidden, mlp=mlp):
            b, s, h = hidden.shape
            flat = hidden.view(-1, h)
            _, w, idx = mlp.gate(flat)
            w = w * torch.tensor([1.0, 0.0], dtype=w.dtype)
            return mlp.experts(flat, idx, w).reshape(b, s, h)
        mlp.forward = forward
    ids = example_inputs(model)["input_ids"]
    with torch.no_grad(), moe_trace.profile(model, mode="stats") as run:
        model(ids)
        model(ids[:, -1:])
    d = run.report().to_dict()
    tokens = ids.numel() + ids.shape[0]
    for layer in d["layers"]:
        assert layer["k_hist"] == {"1": tokens} and sum(layer["expert_counts"]) == tokens


def test_counters_defer_decode_forwards_and_flush_when_capturing():
    """Decode forwards are counted in batches; mixed shapes, partial forwards and a capture flush all
    give the counts a direct numpy count gives."""
    import numpy as np

    from moe_trace.capture.counters import MAX_DEFERRED_FORWARDS, DeviceCounters, Pending

    g = torch.Generator().manual_seed(0)
    dc = DeviceCounters(torch.device("cpu"), [4, 6])
    from moe_trace.analysis.rundata import PHASES

    want = np.zeros((len(PHASES), 2, dc.bins), dtype=np.int64)  # 6 experts, excluded bin 6, dropped bin 7
    want_k = np.zeros((len(PHASES), 2, dc.bins), dtype=np.int64)

    def fwd(phase, tokens, layers=(0, 1), capturing=False):
        for local in layers:
            idx = torch.randint(-1, 7, (tokens, 2), generator=g)
            w = torch.rand(tokens, 2, generator=g).masked_fill(torch.rand(tokens, 2, generator=g) < 0.2, 0)
            dc.queue(Pending(local, phase, idx, w, torch.randn(tokens, 6, generator=g), False))
            E = dc.num_experts[local]
            valid = (w.numpy() != 0) & (idx.numpy() >= 0) & (idx.numpy() < E)
            for t in range(tokens):
                for s in range(2):
                    want[phase, local, idx[t, s].item() if valid[t, s] else 6] += 1
                want_k[phase, local, valid[t].sum()] += 1
        dc.end_forward(capturing)

    fwd(0, 5)
    assert dc.pending  # small: kept for a later batched count
    fwd(1, 1)
    fwd(1, 1, layers=(1,))          # a partial forward
    fwd(1, 3)
    fwd(1, 1, capturing=True)       # capturing a CUDA graph: counted at once
    assert not dc.pending
    for _ in range(MAX_DEFERRED_FORWARDS):
        fwd(1, 1)
    assert len(dc.pending) < 2 * MAX_DEFERRED_FORWARDS  # bounded: flushed when full
    counts, k_hist, _conf, _padding, _calls = dc.read()
    np.testing.assert_array_equal(counts, want)
    np.testing.assert_array_equal(k_hist, want_k)
