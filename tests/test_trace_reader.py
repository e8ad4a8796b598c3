"""read_trace / analyze: the report round-trips, timing from ranges, both parsers, every error case, CLI."""
from __future__ import annotations

import gzip
import json

import numpy as np
import orjson
import pytest

from moe_trace.analysis import PHASES, Report
from moe_trace.cli.main import main
from moe_trace.errors import TraceError
from moe_trace.trace import analyze, read_trace, write_trace
from moe_trace.trace import validate_trace as validate
from tests.test_trace_fixtures import (NUM_LAYERS, STEPS, make_run, raw_cpu_trace_path, synthetic_gpu_raw,
                                       tmpdir)


def _same_counts(a: Report, b: Report) -> None:
    da, db = a.to_dict(), b.to_dict()
    for key in ("model", "settings"):
        assert da[key] == db[key]
    for p in PHASES:
        for k in ("forward_calls", "tokens", "flops", "flops_per_token"):
            assert da["phases"][p][k] == db["phases"][p][k]
    assert da["totals"] == db["totals"]
    for la, lb in zip(da["layers"], db["layers"], strict=True):
        for k in ("index", "name", "device", "tokens", "expert_counts", "k_hist", "k_mean", "flops", "cv", "gini",
                  "excluded", "top1_prob_mean", "router_entropy_mean"):
            assert la[k] == lb[k], k
        for p in PHASES:
            assert la["phases"][p]["expert_counts"] == lb["phases"][p]["expert_counts"]
            assert la["phases"][p]["flops"] == lb["phases"][p]["flops"]


@pytest.fixture(scope="module")
def cpu_trace():
    d = tmpdir("reader_cpu")
    run, steps = make_run(extra_unrecorded=2)  # totals include 2 steps the profiler did not record
    path = write_trace(raw_cpu_trace_path(), run, steps, d / "host_1.pt.trace.json.gz")
    return run, steps, path


def test_cpu_roundtrip_report_equals_run_report(cpu_trace):
    run, _steps, path = cpu_trace
    td = read_trace(path)
    assert td.parser == "fast" and td.is_moe
    _same_counts(td.report(), Report(run))
    assert td.timing_source == "kineto_cpu"
    r = td.report().to_dict()
    assert r["timing_source"] == "kineto_cpu"
    for layer in r["layers"]:
        t = layer["time_ms"]
        assert t["router_ms"] > 0 and t["experts_ms"] > 0
        assert (t["shared_ms"] is None) == (layer["index"] == 1)  # layer 1 has no shared expert
    assert [s["step"] for s in td.steps] == list(range(len(STEPS)))
    assert all(s["recorded"] and s["host_ms"] > 0 for s in td.steps)
    assert analyze(path).to_dict()["layers"][0]["expert_counts"] == r["layers"][0]["expert_counts"]


def test_counters_per_step_sum_to_recorded_totals(cpu_trace):
    run, steps, path = cpu_trace
    td = read_trace(path)
    assert sorted(td.counters) == list(range(len(STEPS)))
    for i in range(NUM_LAYERS):
        total = np.sum([td.counters[n][i]["expert_tokens"] for n in td.counters], axis=0)
        want = np.sum([s["layers"][i]["expert_counts"] for s in steps], axis=0)
        assert total.tolist() == want.tolist()
        for n in td.counters:
            assert td.counters[n][i]["active_experts"] == int((np.array(steps[n]["layers"][i]["expert_counts"]) > 0).sum())


def test_gpu_trace_timing_from_gpu_annotations_and_kernel_summary():
    d = tmpdir("reader_gpu")
    raw = synthetic_gpu_raw(devices=(0, 1))
    run, steps = make_run(device="cuda:0")
    run.layers[1].device = "cuda:1"
    path = write_trace(raw, run, steps, d / "g.pt.trace.json.gz", slim=False)
    td = read_trace(path)
    assert td.timing_source == "kineto_gpu"
    _same_counts(td.report(), Report(run))
    # GPU time of a range = its gpu_user_annotation span (padded 1 ns each side by Kineto)
    ann = [e for e in raw["traceEvents"] if e.get("cat") == "gpu_user_annotation"
           and e["name"].startswith("moe_trace/prefill/L000/router")]
    got = td.report().to_dict()["layers"][0]["phases"]["prefill"]["time_ms"]["router_ms"]
    assert got == pytest.approx(sum(e["dur"] for e in ann) / 1000.0)
    kern = {0: 0.0, 1: 0.0}
    for e in raw["traceEvents"]:
        if e.get("cat") == "kernel":
            kern[e["pid"]] += e["dur"] / 1000.0
    assert td.summary.devices["GPU 0"]["kernel_ms"] == pytest.approx(kern[0])
    assert td.summary.devices["GPU 1"]["kernel_ms"] == pytest.approx(kern[1])
    assert td.summary.profiler_steps == len(STEPS)
    devs = {x["device"]: x for x in td.report().to_dict()["devices"]}
    assert set(devs) == {"cuda:0", "cuda:1"} and devs["cuda:1"]["layers"] == 1


def test_uncompressed_compact_and_bare_layouts_agree(cpu_trace):
    """Fast path (.json, .json.gz) and the ijson fallback (compact one-line JSON) give the same data."""
    run, _steps, path = cpu_trace
    d = tmpdir("reader_layouts")
    obj = json.loads(gzip.decompress(path.read_bytes()))
    (d / "plain.pt.trace.json").write_bytes(gzip.decompress(path.read_bytes()))
    (d / "compact.json").write_bytes(orjson.dumps(obj))  # no newline anywhere
    (d / "indented.json").write_text(json.dumps(obj, indent=1))
    a = read_trace(path)
    for name, parser in (("plain.pt.trace.json", "fast"), ("compact.json", "ijson"), ("indented.json", "fast")):
        b = read_trace(d / name)
        assert b.parser == parser, name
        _same_counts(b.report(), a.report())
        assert b.report().to_dict()["layers"] == a.report().to_dict()["layers"]
        assert b.counters == a.counters
    (d / "bare.json").write_text(json.dumps(obj["traceEvents"], indent=1))
    bare = read_trace(d / "bare.json")
    assert not bare.is_moe and bare.range_ms == a.range_ms


def test_plain_trace_summary_and_analyze_error():
    td = read_trace(raw_cpu_trace_path())
    assert not td.is_moe and td.runs == []
    assert td.summary.profiler_steps == len(STEPS)
    assert "prefill/L000/router" in td.summary.range_ms
    assert "no GPU activity" in str(td.summary)
    with pytest.raises(TraceError, match="without moe-trace metadata"):
        analyze(raw_cpu_trace_path())


def test_directory_of_ranks(cpu_trace):
    d = tmpdir("reader_ranks")
    for rank in (1, 0):
        run, steps = make_run(seed=rank, device="cuda:0")
        raw = synthetic_gpu_raw(seed=rank, rank=rank)
        write_trace(raw, run, steps, d / f"rank{rank}" / f"rank{rank}_host_{rank}.pt.trace.json.gz")
    (d / "notes.txt").write_text("not a trace")
    rep = analyze(d)
    assert len(rep.parts) == 2
    r0, _ = make_run(seed=0, device="cuda:0")
    r1, _ = make_run(seed=1, device="cuda:0")
    _same_counts(Report(rep.parts[0]), Report(r0))  # ordered by rank, not by file name
    _same_counts(rep, Report([r0, r1]))
    assert [x["device"] for x in rep.to_dict()["devices"]] == ["rank0/cuda:0", "rank1/cuda:0"]


@pytest.mark.parametrize("case", ["missing", "empty_dir", "no_traces_dir", "empty_file", "truncated_gzip",
                                  "corrupt_gzip", "truncated_json", "invalid_json", "not_chrome", "scalar"])
def test_errors_are_one_sentence_trace_errors(case, cpu_trace):
    d = tmpdir(f"reader_err_{case}")
    _run, _steps, good = cpu_trace
    target = d / "t.pt.trace.json.gz"
    expect = {"missing": "does not exist", "empty_dir": "no \\*\\.pt\\.trace\\.json", "no_traces_dir": "no \\*",
              "empty_file": "empty", "truncated_gzip": "truncated gzip", "corrupt_gzip": "corrupt gzip",
              "truncated_json": "truncated", "invalid_json": "not valid JSON", "not_chrome": "not a Chrome trace",
              "scalar": "not a Chrome trace"}[case]
    if case == "missing":
        target = d / "nope.pt.trace.json.gz"
    elif case == "empty_dir":
        target = d
    elif case == "no_traces_dir":
        (d / "x.json").write_text("{}")
        target = d
    elif case == "empty_file":
        target.write_bytes(b"")
    elif case == "truncated_gzip":
        data = good.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif case == "corrupt_gzip":
        data = bytearray(good.read_bytes())
        data[20:60] = b"\x00" * 40
        target.write_bytes(bytes(data))
    elif case == "truncated_json":
        text = gzip.decompress(good.read_bytes())
        target = d / "t.pt.trace.json"
        target.write_bytes(text[: len(text) * 2 // 3])
    elif case == "invalid_json":
        target = d / "t.pt.trace.json"
        target.write_text("this is not json {")
    elif case == "not_chrome":
        target = d / "t.pt.trace.json"
        target.write_text(json.dumps({"hello": [1, 2, 3], "world": {"a": 1}}, indent=1))
    elif case == "scalar":
        target = d / "t.pt.trace.json"
        target.write_text("42")
    with pytest.raises(TraceError, match=expect) as info:
        analyze(target)
    msg = str(info.value)
    assert "\n" not in msg and str(target.name) in msg or case in ("empty_dir", "no_traces_dir")
    assert ";" in msg  # problem; fix


def test_cli_analyze(cpu_trace, capsys):
    _run, _steps, path = cpu_trace
    d = tmpdir("reader_cli")
    assert main(["analyze", str(path), "--json", str(d / "r.json"), "--csv", str(d / "r.csv"), "--per-device"]) == 0
    out = capsys.readouterr().out
    assert "moe-trace report" in out and "per device" in out and "timing: kineto_cpu" in out
    assert json.loads((d / "r.json").read_text())["schema"] == "moe-trace/report/1"
    assert (d / "r.csv").read_text().startswith("layer,")
    assert main(["analyze", str(d / "missing.pt.trace.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-trace: error:") and err.count("\n") == 1
    assert main(["analyze", str(raw_cpu_trace_path())]) == 2
    cap = capsys.readouterr()
    assert "trace summary" in cap.out and "without moe-trace metadata" in cap.err


def test_progress_bar_and_python_backend_fallback(cpu_trace, monkeypatch, capsys):
    import ijson

    from moe_trace.trace import ijson_path

    _run, _steps, path = cpu_trace
    assert read_trace(path, progress=True).is_moe  # tqdm bar on stderr
    assert "reading" in capsys.readouterr().err
    d = tmpdir("reader_backend")
    (d / "compact.json").write_bytes(orjson.dumps(json.loads(gzip.decompress(path.read_bytes()))))

    def no_c(name):
        raise ImportError("no yajl here")

    monkeypatch.setattr(ijson_path, "_IJSON", None)
    monkeypatch.setattr(ijson, "get_backend", no_c)
    with pytest.warns(UserWarning, match="yajl2_c"):
        td = read_trace(d / "compact.json")
    assert td.parser == "ijson" and td.report().to_dict()["layers"] == read_trace(path).report().to_dict()["layers"]


def test_profiler_windows_of_one_process_sum_timing_not_counts():
    d = tmpdir("reader_windows")
    run, steps = make_run(device="cuda:0")
    raw = synthetic_gpu_raw()
    proc = {"dist_rank": None, "hostname": "node1", "pid": 77, "run_id": "r1"}
    for n in range(2):  # same raw twice: each window's file holds the same ranges here
        write_trace(raw, run, steps, d / f"node1_77{'.%d' % n if n else ''}.pt.trace.json.gz",
                    process=dict(proc, window=n))
    single = read_trace(d / "node1_77.pt.trace.json.gz").report().to_dict()
    rep = analyze(d)
    assert len(rep.parts) == 1
    _same_counts(rep, Report(run))
    got = rep.to_dict()
    for a, b in zip(got["layers"], single["layers"]):
        for k, v in b["time_ms"].items():
            assert a["time_ms"][k] == (None if v is None else pytest.approx(2 * v))


def test_end_to_end_with_profile_kineto_mode():
    """moe_trace.profile(mode="kineto") -> trace file -> analyze() == run.report() (counts, FLOPs)."""
    import torch

    import moe_trace
    from tests.conftest import tiny_qwen2_moe

    model = tiny_qwen2_moe()
    d = tmpdir("reader_e2e")
    inp = torch.randint(2, 200, (2, 6))
    with moe_trace.profile(model, mode="kineto", logdir=d) as run:
        model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=4, do_sample=False)
    assert run.trace_files  # the trace is written in the background; trace_files waits for it
    files = list(d.glob("*.pt.trace.json.gz"))
    assert files and all(validate(f) == [] for f in files)
    _same_counts(analyze(d), run.report())
    td = read_trace(files[0])
    assert td.timing_source == "kineto_cpu"
    want = run.run_data
    for i in range(len(want.layers)):
        total = np.sum([td.counters[n][want.layers[i].index]["expert_tokens"] for n in td.counters], axis=0)
        assert total.tolist() == (want.counts["prefill"][i].expert_counts + want.counts["decode"][i].expert_counts).tolist()


def test_cli_analyze_ep_size_what_if(cpu_trace, capsys):
    run, _steps, path = cpu_trace
    E = run.layers[0].num_experts
    d = tmpdir("reader_ep")
    assert main(["analyze", str(path), "--ep-size", "2", "--json", str(d / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "expert parallel (what-if, 2 ranks)" in out
    ep = json.loads((d / "r.json").read_text())["expert_parallel"]
    totals = [sum(int(run.counts[p][i].expert_counts[lo:lo + E // 2].sum()) for p in PHASES
                  for i in range(len(run.layers))) for lo in (0, E // 2)]
    assert [r["assignments"] for r in ep["ranks"]] == totals
    bad = next(n for n in range(2, E + 2) if E % n)
    assert main(["analyze", str(path), "--ep-size", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "does not divide" in err and err.count("\n") == 1
