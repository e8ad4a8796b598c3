"""Hostile and damaged trace files: one TraceError each (CLI: exit 2, one line), non-finite numbers that
survive, nesting rejected in linear time, unreadable entries named in a warning."""
from __future__ import annotations

import copy
import gzip
import json
import math
import os
import time
import warnings

import orjson
import pytest
import torch

import moe_trace
from moe_trace.analysis import Report
from moe_trace.cli.main import main
from moe_trace.errors import TraceError
from moe_trace.models import build_tiny_model
from moe_trace.trace import analyze, read_trace, write_trace
from moe_trace.trace.reader import trace_files
from tests.test_trace_fixtures import make_run, synthetic_gpu_raw


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid trace as a dict (its moe_trace key is what the cases damage)."""
    d = tmp_path_factory.mktemp("damage_base")
    run, steps = make_run(device="cuda:0")
    path = write_trace(synthetic_gpu_raw(), run, steps, d / "ok.pt.trace.json")
    return json.loads(path.read_text()), run


def _set(path: str, value):
    def f(mt):
        *head, last = path.split(".")
        obj = mt
        for k in head:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        if value is _DEL:
            del obj[int(last) if isinstance(obj, list) else last]
        else:
            obj[int(last) if isinstance(obj, list) else last] = value(obj[int(last) if isinstance(obj, list) else last]) \
                if callable(value) else value
    return f


_DEL = object()

DAMAGE = {  # what a user (or a bad tool, or bit rot) can do to the metadata; each must be one TraceError
    "count list one entry short": _set("run.counts.prefill", lambda v: v[:-1]),
    "counts missing": _set("run.counts", _DEL),
    "num_experts a string": _set("run.layers.0.num_experts", "8"),
    "layers a dict": _set("run.layers", {"0": {}}),
    "pid a list": _set("process.pid", [1, 2]),
    "zero experts": _set("run.layers.0.num_experts", 0),
    "negative tokens": _set("run.counts.decode.1.tokens", -5),
    "expert_counts one short": _set("run.counts.prefill.0.expert_counts", lambda v: v[:-1]),
    "expert count a string": _set("run.counts.prefill.0.expert_counts.0", "3"),
    "negative expert count": _set("run.counts.prefill.0.expert_counts.2", -1),
    "fractional expert count": _set("run.counts.prefill.0.expert_counts.1", 1.5),
    "k_hist empty": _set("run.counts.prefill.0.k_hist", []),
    "forward_calls a list": _set("run.forward_calls", [1, 2]),
    "timing rows one short": _set("run.timing", {"prefill": [], "decode": []}),
    "timing a string": _set("run.timing", "fast"),
    "run missing": _set("run", _DEL),
    "run a list": _set("run", []),
    "steps a dict": _set("steps", {"0": 1}),
    "step number a string": _set("steps.0.step", "zero"),
    "phase unknown": _set("steps.0.phase", "warmup"),
    "top_k above num_experts": _set("run.layers.0.top_k", 99),
    "layer name missing": _set("run.layers.1.name", _DEL),
    "settings a string": _set("run.settings", "fast"),
    "schema a number": _set("schema", 3),
    "tokens huge": _set("run.counts.prefill.0.tokens", 1e300),
    "top1 sum an object": _set("run.counts.prefill.0.top1_prob_sum", {"x": 1}),
    "run_id a number": _set("run_id", 12),
    "dist_rank negative": _set("process.dist_rank", -1),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_every_damaged_metadata_is_one_trace_error(base, case, tmp_path, capsys):
    trace, _run = base
    bad = copy.deepcopy(trace)
    bad["moe_trace"].setdefault("run_id", "r1-0")
    DAMAGE[case](bad["moe_trace"])
    path = tmp_path / "bad.pt.trace.json"
    # one event per line, as the writer lays it out (the fast path), and compact (the ijson fallback)
    body = b",\n".join(orjson.dumps(e) for e in bad["traceEvents"])
    meta = {k: v for k, v in bad.items() if k != "traceEvents"}
    path.write_bytes(orjson.dumps(meta)[:-1] + b', "traceEvents": [\n' + body + b"\n]}")
    compact = tmp_path / "bad2.pt.trace.json.gz"
    compact.write_bytes(gzip.compress(orjson.dumps(bad)))
    for p in (path, compact):
        with pytest.raises(TraceError) as err:
            read_trace(p)
        msg = str(err.value)
        assert str(p) in msg and "damaged moe-trace metadata" in msg and "\n" not in msg, msg
        assert main(["analyze", str(p)]) == 2
        cap = capsys.readouterr()
        assert cap.err.startswith("moe-trace: error:") and cap.err.count("\n") == 1 and "Traceback" not in cap.err


def test_the_undamaged_base_reads(base, tmp_path):
    trace, run = base
    p = tmp_path / "ok.pt.trace.json"
    p.write_bytes(orjson.dumps(trace))
    assert [l["expert_counts"] for l in read_trace(p).report().to_dict()["layers"]] == \
        [l["expert_counts"] for l in Report(run).to_dict()["layers"]]


def test_non_finite_router_statistics_survive_the_trace(tmp_path):
    model = build_tiny_model("olmoe")
    with torch.no_grad():
        model.model.layers[-1].mlp.gate.weight.fill_(float("inf"))  # the last: the layers before stay finite
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=tmp_path) as run:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                       do_sample=False)
    live = run.report().to_dict()
    assert math.isnan(live["layers"][-1]["top1_prob_mean"])  # the run itself has a NaN statistic
    rebuilt = analyze(tmp_path)
    got = rebuilt.to_dict()
    assert math.isnan(got["layers"][-1]["top1_prob_mean"])
    assert [l["expert_counts"] for l in got["layers"]] == [l["expert_counts"] for l in live["layers"]]
    for a, b in zip(got["layers"][:-1], live["layers"][:-1]):  # the other layers are intact
        assert math.isfinite(a["top1_prob_mean"]) and a["top1_prob_mean"] == pytest.approx(b["top1_prob_mean"])
    # strict JSON: null for NaN, and a strict parser reads it back
    text = rebuilt.to_json(tmp_path / "report.json")

    def no_constants(c):
        raise ValueError(f"non-strict JSON constant {c}")

    back = json.loads(text, parse_constant=no_constants)
    assert back["layers"][-1]["top1_prob_mean"] is None and back["run_id"] == run.report().run_id
    assert json.loads(run.report().to_json(), parse_constant=no_constants)["layers"][-1]["top1_prob_mean"] is None
    # the trace itself is strict JSON too (NaN written as the string "NaN")
    raw = gzip.decompress(run.trace_files[0].read_bytes())
    assert b"NaN" in raw
    json.loads(raw, parse_constant=no_constants)
    assert main(["analyze", str(tmp_path)]) == 0


def _nested(kind: str, n: int) -> bytes:
    if kind == "arrays in traceEvents":
        return b'{"traceEvents": [' + b"[" * n + b"]" * n + b"]}"
    if kind == "objects in an event":
        return b'{"traceEvents": [{"ph": "X", "args": ' + b'{"a":' * n + b"1" + b"}" * n + b"}]}"
    if kind == "arrays in the metadata":
        return b'{"moe_trace": ' + b"[" * n + b"]" * n + b', "traceEvents": []}'
    if kind == "unclosed arrays":
        return b'{"traceEvents": [\n' + b"[" * n
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["arrays in traceEvents", "objects in an event", "arrays in the metadata",
                                  "unclosed arrays"])
def test_deep_nesting_is_rejected_in_linear_time(kind, tmp_path, capsys):
    from tb_plugin.data import RunStore

    # CPU seconds of this process (all threads): the bound is on the work done, not on how loaded the box is
    times = []
    for size in (1 << 17, 1 << 20):  # 128 KB and 1 MB
        d = tmp_path / f"s{size}"
        d.mkdir()
        p = d / "deep.pt.trace.json"
        p.write_bytes(_nested(kind, size // 6 if kind == "objects in an event" else size // 2))
        t0 = time.process_time()
        try:
            td = read_trace(p)
        except TraceError as err:
            assert str(p) in str(err) and "\n" not in str(err)
        else:  # valid JSON whose nesting sits where the fast path never parses: read, and nothing in it
            assert kind == "objects in an event" and not td.is_moe and not td.summary.devices
        times.append(time.process_time() - t0)
        t0 = time.process_time()
        assert main(["analyze", str(p)]) == 2
        assert time.process_time() - t0 < 1.0
        err = capsys.readouterr().err
        assert err.startswith("moe-trace: error:") and err.count("\n") == 1
        t0 = time.process_time()
        entry = RunStore(str(d)).get(".")
        assert entry.error and time.process_time() - t0 < 1.0
        assert b"[[[" not in entry.body and b"{\\\"a" not in entry.body
    assert times[1] < 1.0, times


def test_unreadable_directories_and_files_are_named_in_a_warning(base, tmp_path, monkeypatch, capsys):
    trace, run = base
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.pt.trace.json").write_bytes(orjson.dumps(trace))
    (tmp_path / "locked").mkdir()
    os.symlink(tmp_path / "gone.json", tmp_path / "ok" / "dangling.pt.trace.json")
    real_scandir = os.scandir

    def scandir(path="."):  # root reads any directory, so refuse this one the way a 0700 dir of another user does
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as rec:
        files = trace_files(tmp_path)
    assert files == [tmp_path / "ok" / "a.pt.trace.json"]
    msg = str(rec[0].message)
    assert "locked" in msg and "dangling.pt.trace.json" in msg
    assert main(["analyze", str(tmp_path)]) == 0
    assert "moe-trace: warning: skipped 2 unreadable" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["merge", str(tmp_path), "-o", str(tmp_path / "m.json")]) == 0
    assert "skipped 2 unreadable" in capsys.readouterr().err


def test_damaged_events_fuzz(base, tmp_path):
    """Random damage to events (types of pid, ts, dur, name, args, cat, ph, id): a report or one TraceError."""
    import random

    trace, _run = base
    vals = [[1, 2], {"a": 1}, "x", None, True, -1, 1e308, "NaN", [], {}]
    fields = ["pid", "tid", "ts", "dur", "name", "args", "cat", "ph", "id"]
    rng = random.Random(0)
    path = tmp_path / "ev.pt.trace.json"
    outcomes = {"report": 0, "error": 0}
    for _ in range(120):
        t = copy.deepcopy(trace)
        for _ in range(3):
            rng.choice(t["traceEvents"])[rng.choice(fields)] = rng.choice(vals)
        meta = {k: v for k, v in t.items() if k != "traceEvents"}
        lines = orjson.dumps(meta)[:-1] + b', "traceEvents": [\n' + \
            b",\n".join(orjson.dumps(e) for e in t["traceEvents"]) + b"\n]}"
        for data in (lines, orjson.dumps(t)):
            path.write_bytes(data)
            try:
                read_trace(path).report().to_dict()
                outcomes["report"] += 1
            except TraceError as exc:
                assert str(path) in str(exc) and "\n" not in str(exc)
                outcomes["error"] += 1
    assert outcomes["report"] and outcomes["error"]  # both happen: harmless damage reads, real damage is named


def test_null_statistics_of_older_writers_read_as_nan(base, tmp_path):
    trace, run = base
    t = copy.deepcopy(trace)
    t["moe_trace"]["run"]["counts"]["prefill"][1]["top1_prob_sum"] = None  # what versions before 0.x wrote for NaN
    t["moe_trace"]["run"]["counts"]["decode"][0]["entropy_sum"] = "Infinity"
    p = tmp_path / "old.pt.trace.json"
    p.write_bytes(orjson.dumps(t))
    td = read_trace(p)
    assert math.isnan(td.runs[0].counts["prefill"][1].top1_prob_sum)
    assert td.runs[0].counts["decode"][0].entropy_sum == math.inf
    got = td.report().to_dict()
    assert [l["expert_counts"] for l in got["layers"]] == [l["expert_counts"] for l in Report(run).to_dict()["layers"]]
