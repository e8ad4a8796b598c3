"""The record gate (capture/ranges.py): a slim kineto run records host ops only where its trace keeps
them, writes the same trace as with every op recorded, and leaves torch's RecordFunction switch on."""
from __future__ import annotations

import collections
import json
import gzip

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import moe_trace
from moe_trace.capture import ranges
from moe_trace.capture.ranges import ProfilerRange, RecordGate
from moe_trace.models import build_tiny_model
from moe_trace.trace.io import load_json
from moe_trace.trace.writer import _kernels_under_moe_ranges


def _ops_recorded() -> list[str]:
    """Names of the aten ops a fresh profiler records for one matmul in this thread."""
    x = torch.randn(8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        x @ x
    return [e.name for e in p.events()]


def _exported(p, tmp_path) -> dict:
    """{name: dur} of the X events of the profiler's exported trace (what moe-trace's writer reads)."""
    p.export_chrome_trace(str(tmp_path / "raw.json"))
    return {e["name"]: e["dur"] for e in load_json(tmp_path / "raw.json")["traceEvents"] if e.get("ph") == "X"}


@pytest.mark.parametrize("inside", [True, False])
def test_gate_records_ops_only_inside_moe_ranges(inside, tmp_path):
    x = torch.randn(16, 16)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        gate = RecordGate.open(inside=inside)
        assert gate is not None and ranges._GATE is gate
        with ProfilerRange("ProfilerStep#0"):
            torch.sigmoid(x)                               # outside every MoE range: never recorded
            with ProfilerRange("moe_trace/decode/L000/router", span=True):
                torch.relu(x)                              # inside: recorded when inside=True
                with ProfilerRange("moe_trace/decode/L000/experts", span=True):
                    torch.tanh(x)
                torch.exp(x)
            torch.abs(x)
        gate.close()
        torch.neg(x)                                       # gate closed: recorded again
    durs = _exported(p, tmp_path)
    names = list(durs)
    assert {"ProfilerStep#0", "moe_trace/decode/L000/router", "moe_trace/decode/L000/experts"} <= set(names)
    assert "aten::sigmoid" not in names and "aten::abs" not in names
    assert ("aten::relu" in names) == ("aten::tanh" in names) == ("aten::exp" in names) == inside
    assert "aten::neg" in names
    assert durs["ProfilerStep#0"] >= durs["moe_trace/decode/L000/router"] > 0  # ends recorded while off
    assert ranges._GATE is None and "aten::mm" in _ops_recorded()


def test_gate_can_be_turned_off_and_opens_once(monkeypatch):
    monkeypatch.setenv("MOE_TRACE_RECORD_GATE", "0")
    assert RecordGate.open(inside=True) is None
    monkeypatch.delenv("MOE_TRACE_RECORD_GATE")
    gate = RecordGate.open(inside=True)
    try:
        assert RecordGate.open(inside=True) is None  # one gate at a time
    finally:
        gate.close()
    gate.close()  # idempotent
    assert "aten::mm" in _ops_recorded()


def test_gate_closes_when_dynamo_compiles():
    """Compiled code's ranges are dispatcher ops the switch would hide: the gate closes at compile start."""
    torch._dynamo.reset()
    fn = torch.compile(lambda t: torch.cos(t) + 1, backend="eager")
    gate = RecordGate.open(inside=True)
    try:
        fn(torch.randn(4))
        assert ranges._GATE is None
    finally:
        gate.close()
    assert "aten::mm" in _ops_recorded()


def _ids(b=2, s=6):
    return torch.randint(3, 200, (b, s), generator=torch.Generator().manual_seed(0))


def _run(tmp_path, name, monkeypatch, gate: bool, **kw):
    if not gate:
        monkeypatch.setenv("MOE_TRACE_RECORD_GATE", "0")
    model = build_tiny_model("olmoe", num_hidden_layers=2).eval()
    ids = _ids()
    seen = []

    def gen():
        seen.append(ranges._GATE)
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                              min_new_tokens=4, do_sample=False, pad_token_id=0)

    with moe_trace.profile(model, mode="kineto", logdir=tmp_path / name, **kw) as run:
        out = gen()
    monkeypatch.delenv("MOE_TRACE_RECORD_GATE", raising=False)
    return out, run, seen[0]


def _shape(path):
    """The trace's events without times and ids: (ph, cat, name) counts, and the counters' values."""
    ev = load_json(path)["traceEvents"]
    kinds = collections.Counter((e.get("ph"), e.get("cat"), e.get("name")) for e in ev if e.get("ph") != "M")
    counters = sorted(json.dumps([e["name"], e["args"]], sort_keys=True) for e in ev if e.get("ph") == "C")
    return kinds, counters


def test_slim_trace_is_the_same_with_the_gate(tmp_path, monkeypatch):
    a, run_a, gate_a = _run(tmp_path, "gated", monkeypatch, gate=True)
    b, run_b, gate_b = _run(tmp_path, "all", monkeypatch, gate=False)
    assert gate_a is not None and not gate_a.inside and gate_b is None  # CPU-only: no op inside either
    assert torch.equal(a, b)
    assert _shape(run_a.trace_files[0]) == _shape(run_b.trace_files[0])
    da, db = run_a.report().to_dict(), run_b.report().to_dict()
    counted = ("forward_calls", "tokens", "padding_tokens", "flops")  # time_ms differs run to run
    assert [{k: ph[k] for k in counted} for ph in da["phases"].values()] == \
        [{k: ph[k] for k in counted} for ph in db["phases"].values()]
    routed = ("expert_counts", "k_hist", "tokens", "calls", "top1_prob_mean")
    assert [{k: la[k] for k in routed} for la in da["layers"]] == [{k: lb[k] for k in routed} for lb in db["layers"]]
    assert ranges._GATE is None and "aten::mm" in _ops_recorded()


def test_full_traces_and_stack_traces_record_every_op(tmp_path, monkeypatch):
    for kw in ({"slim": False}, {"with_stack": True}):
        _, run, gate = _run(tmp_path, str(sorted(kw)), monkeypatch, gate=True, **kw)
        assert gate is None
        if kw.get("slim") is False:
            names = {e.get("name") for e in load_json(run.trace_files[0])["traceEvents"]}
            assert "aten::mm" in names and "aten::embedding" in names  # ops outside the MoE ranges too


def test_gate_is_closed_when_the_body_raises(tmp_path):
    model = build_tiny_model("olmoe", num_hidden_layers=2).eval()
    ids = _ids()
    with pytest.raises(RuntimeError, match="boom"):
        with moe_trace.profile(model, mode="kineto", logdir=tmp_path / "raised"):
            model(input_ids=ids)
            assert ranges._GATE is not None
            raise RuntimeError("boom")
    assert ranges._GATE is None and "aten::mm" in _ops_recorded()


def test_slim_keeps_gpu_work_of_the_moe_ranges_only():
    """On the committed H200 recording: a kernel is kept iff it lies in the union of the router / experts
    GPU spans of its stream (the step ranges' spans, which cover the whole forward, do not count)."""
    from pathlib import Path

    ev = json.loads(gzip.decompress((Path(__file__).parent / "data" / "gpu_olmoe_tiny_full.pt.trace.json.gz")
                                    .read_bytes()))["traceEvents"]
    kernels = [e for e in ev if e.get("ph") == "X" and e.get("cat") == "kernel"]
    spans = [(e["ts"], e["ts"] + e["dur"], e["tid"]) for e in ev if e.get("cat") == "gpu_user_annotation"
             and ("/router" in e["name"] or "/experts" in e["name"])]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") == "gpu_user_annotation" and "#" in e["name"]]
    expect = [k for k in kernels if any(a <= k["ts"] and k["ts"] + k["dur"] <= b and t == k["tid"] for a, b, t in spans)]
    kept = [e for e in _kernels_under_moe_ranges(ev) if e.get("cat") == "kernel"]
    assert kept == expect and 0 < len(kept) < len(kernels)
    in_steps_only = [k for k in kernels if k not in expect and any(a <= k["ts"] <= b for a, b in steps)]
    assert in_steps_only  # the old rule kept some of these (a step span was the latest span started)
    # overlapping spans count as their union
    pid, tid = kernels[0]["pid"], kernels[0]["tid"]
    span = lambda ts, dur: {"ph": "X", "cat": "gpu_user_annotation", "name": "moe_trace/decode/L000/experts",
                            "pid": pid, "tid": tid, "ts": ts, "dur": dur}
    k = dict(kernels[0], ts=150.0, dur=20.0)
    assert k in _kernels_under_moe_ranges([span(100.0, 100.0), dict(span(140.0, 5.0), name="moe_trace/decode/L000/shared"), k])
