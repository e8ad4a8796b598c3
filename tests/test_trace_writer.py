"""write_trace: metadata key, counters, slim filtering, Perfetto validity."""
from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest

from moe_trace.errors import TraceError
from moe_trace.trace import validate_trace, write_trace
from moe_trace.trace.writer import device_pid
from tests.test_trace_fixtures import (NUM_LAYERS, STEPS, make_run, raw_cpu_trace, raw_cpu_trace_path,
                                       synthetic_gpu_raw, tmpdir)


def _load(path):
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return json.loads(data), data


def test_cpu_trace_full_and_slim_validate_and_slim_is_smaller():
    d = tmpdir("writer_cpu")
    run, steps = make_run()
    raw = raw_cpu_trace_path()
    full = write_trace(raw, run, steps, d / "full.pt.trace.json", slim=False)
    slim = write_trace(raw, run, steps, d / "slim.pt.trace.json", slim=True)
    assert validate_trace(raw) == []  # torch's own export is valid Perfetto JSON
    assert validate_trace(full) == []
    assert validate_trace(slim) == []
    fobj, fbytes = _load(full)
    sobj, sbytes = _load(slim)
    assert len(sbytes) < 0.5 * len(fbytes)
    cats = {e.get("cat") for e in sobj["traceEvents"]}
    assert "cpu_op" not in cats and "cpu_op" in {e.get("cat") for e in fobj["traceEvents"]}
    assert not any(e["ph"] in ("s", "f", "t", "i") for e in sobj["traceEvents"])
    names = {e["name"] for e in sobj["traceEvents"] if e.get("cat") == "user_annotation"}
    assert {f"moe_trace/{p}#{n}" for n, (p, _) in enumerate(STEPS)} <= names
    assert any(n.startswith("ProfilerStep#") for n in names)
    assert all(n.startswith(("moe_trace/", "ProfilerStep#")) for n in names)
    for obj, is_slim in ((fobj, False), (sobj, True)):
        mt = obj["moe_trace"]
        assert mt["schema"] == "moe-trace/trace/1" and mt["slim"] is is_slim
        assert mt["run"]["counts"]["prefill"][0]["expert_counts"] == run.counts["prefill"][0].expert_counts.tolist()
        assert [s["step"] for s in mt["steps"]] == list(range(len(STEPS)))
        assert set(mt["process"]) >= {"dist_rank", "world_size", "hostname", "pid"}
        assert obj["baseTimeNanoseconds"] > 0 and "deviceProperties" in obj


def test_counters_at_step_ts_on_host_pid_and_sum_to_totals():
    d = tmpdir("writer_counters")
    run, steps = make_run()
    raw = raw_cpu_trace()
    out = write_trace(raw, run, steps, d / "t.pt.trace.json.gz")
    obj, _ = _load(out)
    ev = obj["traceEvents"]
    step_ts = {e["name"]: e["ts"] for e in ev if e.get("cat") == "user_annotation" and "#" in e["name"]}
    host_pid = next(e["pid"] for e in ev if e.get("cat") == "user_annotation")
    counters = [e for e in ev if e["ph"] == "C"]
    assert len(counters) == 3 * NUM_LAYERS * len(STEPS)
    assert all(c["cat"] == "moe_trace" and c["pid"] == host_pid for c in counters)
    allowed_ts = {step_ts[f"moe_trace/{p}#{n}"] for n, (p, _) in enumerate(STEPS)}
    assert {c["ts"] for c in counters} == allowed_ts
    for i in range(NUM_LAYERS):
        tok = [c for c in counters if c["name"] == f"moe_trace/L{i:03d} expert_tokens"]
        assert len(tok) == len(STEPS)
        assert list(tok[0]["args"]) == [f"e{e:03d}" for e in range(8)]
        total = np.sum([list(c["args"].values()) for c in tok], axis=0)
        want = run.counts["prefill"][i].expert_counts + run.counts["decode"][i].expert_counts
        assert total.tolist() == want.tolist()
        active = [c["args"]["active_experts"] for c in counters if c["name"] == f"moe_trace/L{i:03d} active_experts"]
        assert active == [int((np.array(list(c["args"].values())) > 0).sum()) for c in tok]
        k = [c["args"]["k_mean"] for c in counters if c["name"] == f"moe_trace/L{i:03d} k_mean"]
        assert all(1.0 <= x <= 2.0 for x in k)


def test_gpu_layers_counters_on_device_pid_and_hta_rank_line():
    d = tmpdir("writer_gpu")
    raw = synthetic_gpu_raw(devices=(0, 1), rank=1)
    run, steps = make_run(device="cuda:0")
    run.layers[1].device = "cuda:1"
    out = write_trace(raw, run, steps, d / "g.pt.trace.json.gz")
    obj, text = _load(out)
    assert validate_trace(obj) == []
    counters = [e for e in obj["traceEvents"] if e["ph"] == "C"]
    by_layer = {c["name"].split()[0]: c["pid"] for c in counters}
    assert by_layer == {"moe_trace/L000": 0, "moe_trace/L001": 1, "moe_trace/L002": 0}
    assert obj["distributedInfo"]["rank"] == 1 and obj["moe_trace"]["process"]["dist_rank"] == 1
    # HTA finds the rank with the regex '"rank":\s+(\d+)' on the first matching line
    found = re.findall(rb'"rank":\s+(\d+)', text)
    assert found == [b"1"]
    assert b'"rank":' not in text.replace(b'"rank": 1', b"")
    # the kernels, GPU annotations and memcpy survive slim, and so does every kept kernel's launch
    # (its correlation; HTA keeps only kernels whose launch it finds); flows do not
    cats = {e.get("cat") for e in obj["traceEvents"]}
    assert {"kernel", "gpu_user_annotation", "user_annotation", "cuda_runtime"} <= cats and "ac2g" not in cats
    ev = obj["traceEvents"]
    kernels = {e["args"]["correlation"] for e in ev if e.get("cat") == "kernel"}
    launches = [e["args"]["correlation"] for e in ev if e.get("cat") == "cuda_runtime"]
    assert kernels and sorted(launches) == sorted(kernels)


def test_steps_without_annotation_get_no_counters_and_string_ts_survive():
    d = tmpdir("writer_stringts")
    raw = synthetic_gpu_raw()
    for e in raw["traceEvents"]:  # some Kineto versions write ts/dur as strings
        if "ts" in e and e["ph"] != "M":
            e["ts"] = f"{e['ts']:.3f}"
        if "dur" in e:
            e["dur"] = f"{e['dur']:.3f}"
    raw["traceEvents"] = [e for e in raw["traceEvents"] if e.get("name") != "moe_trace/decode#3"]
    run, steps = make_run(device="cuda:0")
    out = write_trace(raw, run, steps, d / "s.pt.trace.json")
    obj, _ = _load(out)
    assert validate_trace(obj) == []
    counters = [e for e in obj["traceEvents"] if e["ph"] == "C"]
    assert len(counters) == 3 * NUM_LAYERS * (len(STEPS) - 1)
    assert all(isinstance(c["ts"], str) for c in counters)


def test_device_pid_and_bad_input():
    assert device_pid("cuda:3", 99) == 3
    assert device_pid("cuda", 99) == 0
    assert device_pid("cpu", 99) == 99
    assert device_pid("meta", 99) == 99
    d = tmpdir("writer_bad")
    run, steps = make_run()
    with pytest.raises(TraceError, match="does not exist"):
        write_trace(d / "missing.json", run, steps, d / "o.json")
    (d / "bad.json").write_text('{"foo": 1}')
    with pytest.raises(TraceError, match="traceEvents"):
        write_trace(d / "bad.json", run, steps, d / "o.json")
    (d / "trunc.json").write_text('{"traceEvents": [')
    with pytest.raises(TraceError, match="cannot be read"):
        write_trace(d / "trunc.json", run, steps, d / "o.json")
    assert not (d / "o.json").exists()


def test_slim_keeps_only_gpu_work_under_moe_ranges(tmp_path):
    """Slim = the MoE ranges, steps, the kernels under them and the counters (issue #3)."""
    import gzip
    import json

    from moe_trace.analysis import LayerCounts, LayerInfo, RunData
    from moe_trace.trace import validate_trace, write_trace

    layer = LayerInfo(index=0, name="m.l0", family="olmoe", num_experts=4, top_k=2, hidden_size=8,
                      expert_dim=4, device="cuda:0")
    run = RunData.empty({"family": "olmoe"}, [layer])
    run.counts["prefill"][0] = LayerCounts(tokens=2, calls=1, expert_counts=[1, 1, 1, 1], k_hist=[0, 0, 2])
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "moe_trace/prefill#0", "pid": 7, "tid": 1, "ts": 0, "dur": 100},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "moe_trace/prefill/L000/router", "pid": 0, "tid": 7,
         "ts": 10, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "router_mm", "pid": 0, "tid": 7, "ts": 11, "dur": 5,
         "args": {"device": 0, "stream": 7, "grid": [1, 1, 1], "registers per thread": 32}},
        {"ph": "X", "cat": "kernel", "name": "attention", "pid": 0, "tid": 7, "ts": 30, "dur": 5, "args": {}},
        {"ph": "X", "cat": "kernel", "name": "other_stream", "pid": 0, "tid": 8, "ts": 11, "dur": 5, "args": {}},
    ]
    steps = [{"step": 0, "phase": "prefill", "tokens": 2, "layers": {0: {"expert_counts": [1, 1, 1, 1], "k_hist": [0, 0, 2]}}}]
    out = write_trace({"traceEvents": ev}, run, steps, tmp_path / "t.pt.trace.json.gz", slim=True)
    data = json.loads(gzip.decompress(out.read_bytes()))
    kernels = [e for e in data["traceEvents"] if e.get("cat") == "kernel"]
    assert [k["name"] for k in kernels] == ["router_mm"]
    assert kernels[0]["args"] == {"device": 0, "stream": 7}
    assert validate_trace(out) == []
    full = write_trace({"traceEvents": ev}, run, steps, tmp_path / "f.pt.trace.json.gz", slim=False)
    data = json.loads(gzip.decompress(full.read_bytes()))
    assert len([e for e in data["traceEvents"] if e.get("cat") == "kernel"]) == 3
