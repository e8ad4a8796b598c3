"""Kineto export: the byte path equals the object path, slim keeps each kept kernel's launch and op,
one ProfilerStep#N per forward, the background writer (waits, errors, interpreter exit), no stray
"rank" keys in the header."""
from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from moe_trace.trace import validate_trace, write_trace
from moe_trace.trace import writer as writer_mod
from tests.test_trace_fixtures import make_run, raw_cpu_trace_path, synthetic_gpu_raw, tmpdir

ROOT = Path(__file__).resolve().parent.parent


def gpu_raw_with_ops(seed: int = 0) -> dict:
    """synthetic_gpu_raw plus what real Kineto GPU traces have around each launch: the aten op that
    launched the kernel (a cpu_op enclosing the cudaLaunchKernel, with the kernel's External id), one
    kernel outside every MoE range (with its launch and op), and ops that launch nothing."""
    raw = synthetic_gpu_raw(seed=seed)
    ev = raw["traceEvents"]
    out = []
    for e in ev:
        if e.get("cat") == "cuda_runtime":
            op_ext = 100_000 + e["args"]["correlation"]
            e["args"]["External id"] = op_ext
            out.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": e["pid"], "tid": e["tid"],
                        "ts": round(e["ts"] - 0.5, 3), "dur": 5.0,
                        "args": {"External id": op_ext, "Record function id": 0, "Sequence number": 1}})
            out.append({"ph": "X", "cat": "cpu_op", "name": "aten::empty", "pid": e["pid"], "tid": e["tid"],
                        "ts": round(e["ts"] - 0.4, 3), "dur": 0.1, "args": {"External id": op_ext + 500_000}})
        elif e.get("cat") == "kernel":
            e["args"]["External id"] = 100_000 + e["args"]["correlation"]
        out.append(e)
    host = ev[0]["pid"]
    last = max(e["ts"] + e.get("dur", 0) for e in ev if e.get("ph") == "X")
    # attention-like work outside any MoE range: a slim trace drops all three
    out += [{"ph": "X", "cat": "cpu_op", "name": "aten::bmm", "pid": host, "tid": host, "ts": last + 10, "dur": 6.0,
             "args": {"External id": 999_001}},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": host, "tid": host, "ts": last + 11,
             "dur": 4.0, "args": {"External id": 999_001, "cbid": 211, "correlation": 999_002}},
            {"ph": "X", "cat": "kernel", "name": "void attn<float>()", "pid": 0, "tid": 7, "ts": last + 20,
             "dur": 9.0, "args": {"External id": 999_001, "device": 0, "stream": 7, "correlation": 999_002}}]
    # what Kineto (torch 2.11, CUDA) also writes: a flow end on a runtime call that launches nothing
    # (no flow start anywhere), a launch whose kernel fell outside the window (a start without an end),
    # and CUPTI's buffer overhead on pid -1
    out += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamIsCapturing", "pid": host, "tid": host,
             "ts": last + 30, "dur": 1.0, "args": {"External id": 999_001, "cbid": 317, "correlation": 999_010}},
            {"ph": "f", "id": 999_010, "pid": host, "tid": host, "ts": last + 30, "cat": "ac2g", "name": "ac2g",
             "bp": "e"},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": host, "tid": host, "ts": last + 32,
             "dur": 2.0, "args": {"External id": 999_001, "cbid": 211, "correlation": 999_011}},
            {"ph": "s", "id": 999_011, "pid": host, "tid": host, "ts": last + 32, "cat": "ac2g", "name": "ac2g"},
            {"ph": "X", "cat": "overhead", "name": "Activity Buffer Request", "pid": -1, "tid": 0, "ts": last + 1,
             "dur": 900.0}]
    raw["traceEvents"] = out
    return raw


def kineto_quirk(e: dict) -> bool:
    """The raw events of gpu_raw_with_ops that no trace keeps (a full one drops just these)."""
    return (e.get("ph") in ("s", "f") and e.get("id") in (999_010, 999_011)) or e.get("pid") == -1


def _read(path: Path) -> dict:
    data = path.read_bytes()
    return orjson.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def _canon(events) -> list[bytes]:
    return sorted(orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in events)


PROCESS = {"pid": 4242, "hostname": "h", "dist_rank": None, "started_at": 1.0e9}


@pytest.mark.parametrize("slim", [True, False])
@pytest.mark.parametrize("which", ["cpu", "gpu"])
def test_byte_path_writes_what_the_object_path_writes(which, slim, monkeypatch):
    d = tmpdir(f"kexport_{which}_{slim}")
    if which == "cpu":
        raw_path = raw_cpu_trace_path()
        run, steps = make_run()
    else:
        raw_path = d / "raw.json"  # a layout with one key per line, like Kineto's own export
        raw_path.write_text(json.dumps(gpu_raw_with_ops(), indent=2))
        run, steps = make_run(device="cuda:0")
    raw_obj = json.loads(raw_path.read_text())
    by_obj = write_trace(raw_obj, run, steps, d / "obj.pt.trace.json", slim=slim, process=dict(PROCESS))

    def no_load(*a, **k):  # the byte path must not load the raw file whole
        raise AssertionError("write_trace loaded the raw trace whole")

    monkeypatch.setattr(writer_mod, "_load_raw", no_load)
    by_bytes = write_trace(raw_path, run, steps, d / "bytes.pt.trace.json.gz", slim=slim, process=dict(PROCESS))
    a, b = _read(by_obj), _read(by_bytes)
    assert {k: v for k, v in a.items() if k != "traceEvents"} == {k: v for k, v in b.items() if k != "traceEvents"}
    assert _canon(a["traceEvents"]) == _canon(b["traceEvents"])
    assert validate_trace(b) == []
    if not slim:  # a full trace holds every raw event, unchanged, plus moe-trace's counters
        # except flow events without their other end and pid -1 overhead (export.FullDrops)
        assert _canon(e for e in b["traceEvents"] if e.get("cat") != "moe_trace"
                      and not (e.get("ph") == "M" and e.get("args", {}).get("name") in ("host", "GPU 0"))) == \
            _canon(e for e in raw_obj["traceEvents"] if not kineto_quirk(e))
        if which == "gpu":
            assert sum(map(kineto_quirk, raw_obj["traceEvents"])) == 3 and not any(map(kineto_quirk, b["traceEvents"]))
            assert any(e.get("ph") == "f" for e in b["traceEvents"])  # paired flows stay
            assert validate_trace(raw_obj) != []  # the raw trace has the problems the writer removes


def test_slim_keeps_the_launch_and_the_op_of_every_kept_kernel():
    d = tmpdir("kexport_links")
    raw = gpu_raw_with_ops()
    raw_path = d / "raw.json"
    raw_path.write_text(json.dumps(raw, indent=2))
    run, steps = make_run(device="cuda:0")
    ev = _read(write_trace(raw_path, run, steps, d / "s.pt.trace.json.gz"))["traceEvents"]
    kernels = [e for e in ev if e.get("cat") == "kernel"]
    launches = {e["args"]["correlation"]: e for e in ev if e.get("cat") == "cuda_runtime"}
    ops = {e["args"]["External id"]: e for e in ev if e.get("cat") == "cpu_op"}
    moe_kernels = [e for e in raw["traceEvents"] if e.get("cat") == "kernel" and e["name"].startswith("void kern_")]
    assert len(kernels) == len(moe_kernels) > 0  # the kernels inside MoE ranges, not the attention one
    assert sorted(launches) == sorted(k["args"]["correlation"] for k in kernels)
    assert sorted(ops) == sorted(k["args"]["External id"] for k in kernels)
    assert all(o["name"] == "aten::mm" for o in ops.values())  # the launching op, not its neighbours
    for k in kernels:  # the launch sits inside its op on the host thread
        op, la = ops[k["args"]["External id"]], launches[k["args"]["correlation"]]
        assert op["ts"] <= la["ts"] and la["ts"] + la["dur"] <= op["ts"] + op["dur"]
    steps_kept = sorted(e["name"] for e in ev if e.get("name", "").startswith("ProfilerStep#"))
    assert steps_kept == sorted(f"ProfilerStep#{n}" for n in range(len(steps)))
    assert validate_trace(ev) == []


def test_no_rank_key_but_distributed_info_in_the_header():
    """HTA takes the first `"rank": N` of a file as its rank: only distributedInfo may have one (a
    TP/EP run's settings.parallel says dist_rank)."""
    d = tmpdir("kexport_rank")
    raw = synthetic_gpu_raw(rank=1)
    run, steps = make_run(device="cuda:0")
    run.settings["parallel"] = {"tp_size": 2, "ep_size": 2, "fsdp_size": 1, "rank": 0, "world_size": 2,
                                "batch_group": 0, "ep_rank": 0, "experts_per_ep_rank": 4}
    for src in (raw, _dump(d / "raw.json", raw)):
        text = gzip.decompress(write_trace(src, run, steps, d / "r.pt.trace.json.gz").read_bytes())
        assert re.findall(rb'"rank":\s*(\d+)', text) == [b"1"]
        head = text[:text.index(b'"traceEvents"')]
        assert re.search(rb'"dist_rank":\s*0\b', head)  # the parallel layout's own rank, renamed (process says 1)
    # (a real TP/EP run's settings.parallel: tests/test_parallel_transformers.py::test_settings_parallel)


def _dump(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


def _generate(model, n=4):
    from moe_trace.models import example_inputs

    inputs = example_inputs(model)
    model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.fixture(scope="module")
def tiny():
    from moe_trace.models import build_tiny_model

    return build_tiny_model("olmoe").eval()


@pytest.mark.parametrize("schedule", [None, {"wait": 1, "warmup": 1, "active": 2, "repeat": 1}])
@pytest.mark.parametrize("slim", [True, False])
def test_one_profiler_step_per_forward(tiny, tmp_path, schedule, slim):
    import torch

    import moe_trace

    with torch.no_grad(), moe_trace.profile(tiny, mode="kineto", logdir=tmp_path, slim=slim, schedule=schedule) as run:
        _generate(tiny, 4)  # 5 forwards
    (f,) = run.trace_files
    ev = _read(f)["traceEvents"]
    names = [e["name"] for e in ev if e.get("cat") == "user_annotation"]
    ps = sorted(int(n.split("#")[1]) for n in names if n.startswith("ProfilerStep#"))
    ours = sorted(int(n.split("#")[1]) for n in names if re.match(r"^moe_trace/(prefill|decode)#\d+$", n))
    assert ps == ours == ([0, 1, 2, 3] if schedule is None else [2, 3]), names
    for n in ours:  # each ProfilerStep holds its forward's moe_trace step range
        p = next(e for e in ev if e.get("name") == f"ProfilerStep#{n}")
        s = next(e for e in ev if re.match(rf"^moe_trace/(prefill|decode)#{n}$", e.get("name", "")))
        assert p["ts"] <= s["ts"] and s["ts"] + s["dur"] <= p["ts"] + p["dur"] + 1e-3
    assert validate_trace(ev) == []


def test_writer_runs_in_the_background_and_readers_wait(tiny, tmp_path):
    import torch

    import moe_trace

    with torch.no_grad(), moe_trace.profile(tiny, mode="kineto", logdir=tmp_path) as run:
        _generate(tiny, 3)
    stopped = run.export_timings["profiler_stopped"]
    assert stopped > 0
    rep = moe_trace.analyze(tmp_path)  # no trace_files call first: the reader waits for the writer
    assert rep.to_dict()["layers"][0]["expert_counts"] == run.report().to_dict()["layers"][0]["expert_counts"]
    t = run.export_timings
    assert stopped <= t["saved"] <= t["written"]
    assert [p.name for p in run.trace_files] == [p.name for p in tmp_path.glob("*.pt.trace.json.gz")]


def test_writer_error_is_raised_by_trace_files_and_report(tiny, tmp_path, monkeypatch):
    import torch

    import moe_trace
    from moe_trace.errors import TraceError

    def broken(*a, **k):
        raise TraceError("disk full (test)")

    monkeypatch.setattr(writer_mod, "write_run_traces", broken)
    with torch.no_grad(), moe_trace.profile(tiny, mode="kineto", logdir=tmp_path) as run:
        _generate(tiny, 2)
    for _ in range(2):  # raised every time it is asked, never lost
        with pytest.raises(TraceError, match="disk full"):
            run.trace_files
        with pytest.raises(TraceError, match="disk full"):
            run.report()
    assert not list(tmp_path.iterdir())


def test_interpreter_exit_waits_and_reports(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import moe_trace
        from moe_trace.models import build_tiny_model, example_inputs
        from moe_trace.errors import TraceError
        from moe_trace.trace import writer
        m = build_tiny_model("olmoe").eval()
        inputs = example_inputs(m)
        with torch.no_grad(), moe_trace.profile(m, mode="kineto", logdir={str(tmp_path / 'ok')!r}):
            m.generate(**inputs, max_new_tokens=2, do_sample=False)
        real = writer.write_run_traces
        def broken(raws, run, steps, logdir, **k):
            if str(logdir).endswith("bad"):
                raise TraceError("disk full (test)")
            return real(raws, run, steps, logdir, **k)
        writer.write_run_traces = broken  # the first run's writer may still be going
        with torch.no_grad(), moe_trace.profile(m, mode="kineto", logdir={str(tmp_path / 'bad')!r}):
            m.generate(**inputs, max_new_tokens=2, do_sample=False)
        # exit without asking for trace_files or report()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "ok").glob("*.pt.trace.json.gz"))) == 1
    assert "moe-trace: error: writing the kineto trace failed: disk full (test)" in proc.stderr


def test_a_trace_written_while_the_interpreter_exits_is_whole(tmp_path):
    """The script ends right after its `with` block while the writer is still going: the trace is written
    whole (its gzip deflated in many blocks by helper threads, which must start during the exit)."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        import moe_trace
        from moe_trace.models import build_tiny_model, example_inputs
        from moe_trace.trace import io, writer
        io.GZ_BLOCK = 4096  # a tiny trace in many blocks
        real = writer.write_run_traces
        def slow(*a, **k):
            time.sleep(1.0)  # still writing when the interpreter begins to exit
            return real(*a, **k)
        writer.write_run_traces = slow
        m = build_tiny_model("olmoe").eval()
        with torch.no_grad(), moe_trace.profile(m, mode="kineto", logdir={str(tmp_path)!r}):
            m.generate(**example_inputs(m), max_new_tokens=3, do_sample=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr[-3000:]
    (f,) = tmp_path.glob("*.pt.trace.json.gz")
    text = gzip.decompress(f.read_bytes())
    assert len(text) > 3 * 4096  # several blocks
    doc = json.loads(text)
    assert any(e.get("cat") == "moe_trace" and e.get("ph") == "C" for e in doc["traceEvents"])
    from moe_trace.trace import read_trace

    assert read_trace(f).counters  # our reader too


def test_profiler_range_writes_what_record_function_writes(tmp_path):
    """moe-trace's ranges (capture/ranges.py, the pybind enter/exit pair) are the same user_annotation
    events record_function writes: same category, nesting, one event per range."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moe_trace.capture.ranges import ProfilerRange

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with ProfilerRange("moe_trace/decode/L000/experts"):
            with torch.autograd.profiler.record_function("inner_rf"):
                torch.ones(4).sum()
        r = ProfilerRange("moe_trace/decode#7").__enter__()
        r.__exit__(None, None, None)
        r.__exit__(None, None, None)  # a second exit is a no-op (cleanup paths may close twice)
    path = tmp_path / "r.json"
    prof.export_chrome_trace(str(path))
    ev = json.loads(path.read_text())["traceEvents"]
    got = {e["name"]: e for e in ev if e.get("ph") == "X" and e["name"] in
           ("moe_trace/decode/L000/experts", "inner_rf", "moe_trace/decode#7")}
    assert sorted(got) == ["inner_rf", "moe_trace/decode#7", "moe_trace/decode/L000/experts"]
    assert {e["cat"] for e in got.values()} == {"user_annotation"}
    outer, inner = got["moe_trace/decode/L000/experts"], got["inner_rf"]
    assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    assert sum(e.get("name") == "moe_trace/decode#7" for e in ev) == 1


@pytest.mark.parametrize("with_stack", [False, True])
def test_own_profiler_stops_with_trace_only_where_torch_has_it(tiny, tmp_path, monkeypatch, with_stack):
    """moe-trace's own profiler skips torch's per-event objects at its stop (torch >= 2.13 `trace_only`;
    benchmarks/profiler_stop_cost.py), not with with_stack (torch would turn it off with a warning), and
    the trace still holds every step's ranges."""
    import warnings

    import torch
    import torch.profiler

    import moe_trace

    seen = []
    real = torch.profiler.profile

    def spy(*a, **k):
        cfg = k.get("experimental_config")
        seen.append(getattr(cfg, "trace_only", None))
        return real(*a, **k)

    monkeypatch.setattr(torch.profiler, "profile", spy)
    has = "trace_only" in (torch._C._profiler._ExperimentalConfig.__init__.__doc__ or "")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "Disabling trace_only" warning
        with torch.no_grad(), moe_trace.profile(tiny, mode="kineto", logdir=tmp_path, with_stack=with_stack) as run:
            _generate(tiny, 2)
    assert seen == [True if has and not with_stack else None]
    names = [e.get("name", "") for e in _read(run.trace_files[0])["traceEvents"]]
    steps = sum(bool(re.match(r"^moe_trace/(prefill|decode)#\d+$", n)) for n in names)
    assert steps >= 2 and sum(n.startswith("ProfilerStep#") for n in names) == steps


@pytest.mark.parametrize("damage", ["cat_number", "cat_list", "args_string", "corr_string", "ext_list", "ph_number",
                                    "not_an_object", "bad_utf8_in_a_dropped_op", "huge_id"])
def test_odd_raw_events_give_the_object_paths_answer_or_one_error(damage):
    """A slim export's msgspec heads refuse what they do not know (the region goes to the object path):
    the file written equals the one written from the parsed dict, or both are refused with a TraceError."""
    from moe_trace.errors import TraceError

    d = tmpdir(f"kexport_odd_{damage}")
    raw = gpu_raw_with_ops()
    ev = raw["traceEvents"]
    op = next(i for i, e in enumerate(ev) if e.get("cat") == "cpu_op" and e["name"] == "aten::empty")
    launch = next(i for i, e in enumerate(ev) if e.get("cat") == "cuda_runtime")
    kernel = next(i for i, e in enumerate(ev) if e.get("cat") == "kernel")
    if damage == "cat_number":
        ev[op]["cat"] = 7
    elif damage == "cat_list":
        ev[op]["cat"] = ["cpu_op"]
    elif damage == "args_string":
        ev[op]["args"] = "External id"
    elif damage == "corr_string":
        ev[launch]["args"]["correlation"] = str(ev[launch]["args"]["correlation"])
    elif damage == "ext_list":
        ev[op]["args"]["External id"] = [1]
    elif damage == "ph_number":
        ev[op]["ph"] = 1
    elif damage == "not_an_object":
        ev.insert(op, [1, 2])
    elif damage == "huge_id":
        ev[kernel]["args"]["External id"] = ev[op]["args"]["External id"] = 2 ** 70
    text = json.dumps(raw, indent=2).encode()
    if damage == "bad_utf8_in_a_dropped_op":
        text = text.replace(b'"aten::empty"', b'"aten::\xff"', 1)
    raw_path = d / "raw.json"
    raw_path.write_bytes(text)
    run, steps = make_run(device="cuda:0")
    if damage == "bad_utf8_in_a_dropped_op":  # not JSON: one error
        with pytest.raises(TraceError):
            write_trace(raw_path, run, steps, d / "bytes.pt.trace.json.gz", process=dict(PROCESS))
        return
    if damage == "huge_id":  # no JSON writer takes an int beyond 64 bits: one error, not a TypeError
        with pytest.raises(TraceError, match="cannot be written as JSON"):
            write_trace(json.loads(text), run, steps, d / "obj.pt.trace.json", process=dict(PROCESS))
    # the object path on a file reads it with orjson (which reads an int beyond 64 bits as a float)
    by_obj = write_trace(orjson.loads(text), run, steps, d / "obj.pt.trace.json", process=dict(PROCESS))
    by_bytes = write_trace(raw_path, run, steps, d / "bytes.pt.trace.json.gz", process=dict(PROCESS))
    a, b = _read(by_obj), _read(by_bytes)
    assert _canon(a["traceEvents"]) == _canon(b["traceEvents"])
    assert any(e.get("cat") == "kernel" for e in b["traceEvents"])


def _raw_file(d: Path, irregular: bool = False, gz: bool = False) -> tuple[Path, dict]:
    """gpu_raw_with_ops in Kineto's layout (one key per line); `irregular`: every other event after a
    separator of another width (still one event per line start, as the byte path needs); `gz`: gzipped."""
    raw = gpu_raw_with_ops()
    text = json.dumps(raw, indent=2)
    if irregular:
        parts = text.split("},\n    {")
        text = "".join(p + ("},\n    {" if k % 2 else "},\n      {") for k, p in enumerate(parts[:-1])) + parts[-1]
    path = d / ("irregular.json" if irregular else "raw.json")
    if gz:
        path = path.with_suffix(".json.gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path, raw


@pytest.mark.parametrize("layout", ["kineto", "irregular", "gzip"])
def test_pass_2_reads_the_kept_events_where_pass_1_saw_them(layout, monkeypatch):
    """Kineto's layout: pass 2 reads only the kept kernels', launches' and ops' bytes (pass 1's spans),
    never a whole region; a layout whose separators vary, or a gzipped raw file (no offsets to read at),
    has no spans and reads the regions. All write what the object path writes."""
    irregular = layout != "kineto"
    from moe_trace.trace import export

    d = tmpdir(f"kexport_spans_{layout}")
    raw_path, raw = _raw_file(d, layout == "irregular", layout == "gzip")
    run, steps = make_run(device="cuda:0")
    by_obj = write_trace(raw, run, steps, d / "obj.pt.trace.json", process=dict(PROCESS))
    used = {"regions": 0, "spans": 0}
    real_region, real_spans = export.pass2_region, export.read_spans

    def region(*a, **k):
        used["regions"] += 1
        return real_region(*a, **k)

    def spans(*a, **k):
        got = real_spans(*a, **k)
        used["spans"] += got is not None
        return got

    monkeypatch.setattr(export, "pass2_region", region)
    monkeypatch.setattr(export, "read_spans", spans)
    by_bytes = write_trace(raw_path, run, steps, d / "bytes.pt.trace.json.gz", process=dict(PROCESS))
    assert used == ({"regions": 1, "spans": 0} if irregular else {"regions": 0, "spans": 1})
    a, b = _read(by_obj)["traceEvents"], _read(by_bytes)["traceEvents"]
    assert _canon(a) == _canon(b)
    assert {"kernel", "cuda_runtime", "cpu_op"} <= {e.get("cat") for e in b}


def test_event_spans_are_each_events_bytes():
    from moe_trace.trace import export

    events = [{"ph": "X", "cat": "kernel", "ts": n, "args": {"s": "}, {" * n}} for n in range(5)]
    region = b",\n  ".join(json.dumps(e, indent=1).encode() for e in events)
    raws = export._decode(export._RAWS, export._document(region))
    starts, lens = export.event_spans(region, raws)
    assert [json.loads(region[s:s + k]) for s, k in zip(starts, lens)] == events
    assert export.event_spans(region.replace(b",\n  {", b",\n {", 1), raws) is None  # one other separator
    one = json.dumps(events[0]).encode()
    assert export.event_spans(one, export._decode(export._RAWS, export._document(one))) == ([0], [len(one)])


@pytest.mark.parametrize("what", ["launch", "op", "kernel"])
def test_bytes_that_changed_after_pass_1_are_not_taken_from_the_spans(what):
    """A kept launch / op / kernel whose bytes changed after pass 1 (same length, another id or ts):
    pass 2 does not trust the spans; the region pass then answers (its own checks apply)."""
    from moe_trace.trace import export

    d = tmpdir(f"kexport_spans_changed_{what}")
    raw_path, _ = _raw_file(d)
    head, selected, tail, index = export.read_selected(raw_path, True)
    kept, corr, ext = export.slim_select(selected)
    want = {}
    for e in kept:
        if isinstance(e, export.GpuWork):
            want.setdefault(e.region, []).append(e)
    assert export.read_spans(raw_path, want, corr, ext, index) is not None
    data = raw_path.read_bytes()
    if what in ("launch", "op"):  # the kept launch / op with the smallest id: its id, one more (or less)
        cat, key, x = ("cuda_runtime", "correlation", min(corr)) if what == "launch" else ("cpu_op", "External id", min(ext))
        s = next(ix.base + s for ix in index for _, s, _, op, i in ix.hit_spans(corr, ext)
                 if i == x and op == (what == "op"))
        assert f'"cat": "{cat}"'.encode() in data[s:data.index(b"}", s)]
        old = f'"{key}": {x}'.encode()
        k = data.index(old, s)
        new = f'"{key}": {x + 1 if len(str(x + 1)) == len(str(x)) else x - 1}'.encode()
    else:
        w = next(e for e in kept if isinstance(e, export.GpuWork))
        (s, n), = index[w.region].gpu_spans([w])
        ev = data[s:s + n]
        old = b'"ts": ' + json.dumps(w.ts).encode()
        k = s + ev.index(old)
        new = b'"ts": ' + json.dumps(w.ts).encode()[:-1] + (b"1" if json.dumps(w.ts)[-1] != "1" else b"2")
    assert len(new) == len(old) and new != old
    raw_path.write_bytes(data[:k] + new + data[k + len(old):])
    assert export.read_spans(raw_path, want, corr, ext, index) is None
