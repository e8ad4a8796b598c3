"""The slim export's worker processes (moe_trace/trace/workers.py): on a GPU-heavy raw trace (the
committed H200 recording, replicated) the passes run through worker subprocesses write exactly the
file the serial passes write; a worker that cannot start, dies or hangs never changes the file or
hangs the export (the serial pass runs); a damaged raw file gets the serial path's answer; and how
many workers a machine gets follows its spare cores and the ranks sharing the node."""
from __future__ import annotations

import gzip
import re
import subprocess
import sys
import time

import orjson
import pytest

from benchmarks.export_memory import build_raw
from moe_trace.analysis import RunData
from moe_trace.errors import TraceError
from moe_trace.trace import export, write_trace
from moe_trace.trace import workers as workers_mod
from tests.test_trace_fixtures import tmpdir


@pytest.fixture(scope="module")
def raw():
    d = tmpdir("export_workers")
    spec = build_raw(d / "raw.json", 0, copies=5)  # ~12 MB: 3 regions of the fast path
    return d, spec


def _write(d, spec, name, workers: int, monkeypatch, raw_path=None):
    monkeypatch.setenv("MOE_TRACE_EXPORT_WORKERS", str(workers))
    run = RunData.from_dict(spec["run"])
    return write_trace(raw_path or d / "raw.json", run, spec["steps"], d / name, slim=True, process=spec["process"])


def _without_start_time(path) -> bytes:
    return re.sub(rb'"started_at":[0-9.e+]+', b"", gzip.decompress(path.read_bytes()))


class _Count:
    def __init__(self, monkeypatch):
        self.used = {"read_selected": 0, "resolve_slim": 0}
        for name in self.used:
            orig = getattr(workers_mod.Workers, name)

            def wrapped(self_, *a, _orig=orig, _name=name, **k):
                got = _orig(self_, *a, **k)
                if got not in (None, False):
                    self.used[_name] += 1
                return got

            monkeypatch.setattr(workers_mod.Workers, name, wrapped)


@pytest.mark.parametrize("spans", [True, False])
def test_workers_write_the_file_the_serial_passes_write(raw, monkeypatch, spans):
    """Pass 1 goes through the workers; pass 2 reads the kept events at the spans pass 1 found (Kineto's
    layout), or, where it has none, goes through the workers too."""
    d, spec = raw
    serial = _write(d, spec, "serial.pt.trace.json.gz", 0, monkeypatch)
    count = _Count(monkeypatch)
    if not spans:
        monkeypatch.setattr(export, "read_spans", lambda *a, **k: None)
    pooled = _write(d, spec, "pooled.pt.trace.json.gz", 2, monkeypatch)
    assert count.used == {"read_selected": 1, "resolve_slim": 0 if spans else 1}
    assert _without_start_time(pooled) == _without_start_time(serial)
    events = orjson.loads(gzip.decompress(pooled.read_bytes()))["traceEvents"]
    assert sum(e.get("cat") == "kernel" for e in events) > 0 and sum(e.get("cat") == "cpu_op" for e in events) > 0


def test_the_serial_pass_runs_when_workers_cannot_start_or_die(raw, monkeypatch):
    d, spec = raw
    serial = _write(d, spec, "serial2.pt.trace.json.gz", 0, monkeypatch)
    real_popen = subprocess.Popen
    for argv in (["-c", "pass"],                                      # exits at once
                 ["-c", "import sys; sys.stdout.write('x'); sys.stdout.flush()"],  # speaks nonsense
                 ["-c", "import time; time.sleep(30)"]):               # never says it is ready
        monkeypatch.setattr(workers_mod, "START_TIMEOUT", 1.0)
        monkeypatch.setattr(workers_mod.subprocess, "Popen",
                            lambda cmd, *a, _argv=argv, **k: real_popen([sys.executable, *_argv], *a, **k))
        count = _Count(monkeypatch)
        out = _write(d, spec, "fallback.pt.trace.json.gz", 2, monkeypatch)
        assert count.used == {"read_selected": 0, "resolve_slim": 0}, argv
        assert _without_start_time(out) == _without_start_time(serial), argv
    monkeypatch.setattr(workers_mod.subprocess, "Popen", real_popen)


def test_a_worker_dying_in_the_middle_gives_the_serial_result(raw, monkeypatch):
    d, spec = raw
    serial = _write(d, spec, "serial3.pt.trace.json.gz", 0, monkeypatch)
    real_recv = workers_mod._recv
    calls = {"n": 0}

    def flaky(fh, timeout=None):
        got = real_recv(fh, timeout)
        if got is not None and "events" in got[0]:
            calls["n"] += 1
            if calls["n"] == 2:  # the second region's answer never comes
                raise EOFError
        return got

    monkeypatch.setattr(workers_mod, "_recv", flaky)
    out = _write(d, spec, "dying.pt.trace.json.gz", 2, monkeypatch)
    assert calls["n"] >= 2
    assert _without_start_time(out) == _without_start_time(serial)


def test_a_damaged_raw_file_gets_the_serial_answer(raw, monkeypatch):
    d, spec = raw
    data = (d / "raw.json").read_bytes()
    k = data.index(b'"cat": "kernel"', len(data) // 2)
    bad = d / "damaged.json"
    bad.write_bytes(data[:k] + b'"cat": "kernel", "ts": [}' + data[k + 15:])
    answers = []
    for n in (0, 2):
        with pytest.raises(TraceError) as err:
            _write(d, spec, f"damaged{n}.pt.trace.json.gz", n, monkeypatch, raw_path=bad)
        answers.append(str(err.value))
    assert answers[0] == answers[1]


def test_a_worker_answers_a_region_as_the_serial_pass(raw):
    """The worker process itself (no mocking): pass 1 and pass 2 of one region over the pipe."""
    d, _ = raw
    data = (d / "raw.json").read_bytes()
    from moe_trace.trace.fastpath import regions_of
    from moe_trace.trace.io import Source

    region = next(r for r in regions_of(Source(d / "raw.json")) if isinstance(r, bytes))
    with workers_mod.Workers(1) as pool:
        assert len(pool.procs) == 1
        (p1, blob1), = pool._map(iter([({"op": "pass1"}, region)]))
        serial, gpu, heads, index, done = export.pass1_region(region)
        assert p1["events"] == serial and gpu and done is None and p1["done"] is False
        hl, il, gl, dl = p1["bytes"]
        assert export.decode_heads(blob1[:hl]) == heads and {h.cat for h in heads} <= {"kernel", "gpu_memcpy", "gpu_memset"}
        assert blob1[hl:hl + il] == index.to_bytes() and len(index.rt_at) and len(index.op_at)
        places = workers_mod._ints(blob1[hl + il:hl + il + gl])
        assert list(zip(places[0::2], places[1::2])) == gpu and dl == 0 and len(blob1) == hl + il + gl
        stubs = [(i, h.ts, h.cat) for (pos, i), h in zip(gpu, heads)][:50]
        corr = sorted({h.args.correlation for h in heads if isinstance(h.args.correlation, int)})[:40]
        workers_mod._send(pool.procs[0].stdin, {"op": "sets"},
                          orjson.dumps({"corr": [str(c) for c in corr], "ext": []}))
        (p2, blob), = pool._map(iter([({"op": "pass2", "stubs": stubs, "region_bytes": len(region)},
                                       region + index.to_bytes())]))
        kept, links = export.pass2_region(region, stubs, set(corr), set(), index)
        assert p2["kept"] == [len(k) for k in kept] and blob == b"".join(kept) + links and links
    assert data  # the file is untouched


def _machine(monkeypatch, cpus, ranks, env) -> None:
    """A machine with `cpus` cores, `ranks` torchrun ranks on the node and MOE_TRACE_EXPORT_WORKERS=`env`."""
    monkeypatch.setattr(workers_mod.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    for k, v in (("LOCAL_WORLD_SIZE", ranks), ("MOE_TRACE_EXPORT_WORKERS", env)):
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)


@pytest.mark.parametrize("cpus, ranks, size, env, expected", [
    (16, None, 1200 << 20, None, 3),    # an H200 box, a 1.2 GB raw trace (512 new tokens): 0.2 x 1.2 GB / 64 MB
    (16, None, 150 << 20, None, 0),     # 150 MB: 2 workers would add more than a fifth of the raw size
    (16, None, 400 << 20, None, 0),
    (16, None, 640 << 20, None, 2),     # from 640 MB on
    (16, None, 4000 << 20, None, 8),
    (16, "8", 1200 << 20, None, 0),     # 8 torchrun ranks share the node: 16 // 8 - 1 = 1 -> serial
    (16, "2", 4000 << 20, None, 7),
    (2, None, 1200 << 20, None, 0),     # the CI box: no core to spare
    (2, None, 10 << 20, "3", 3),        # forced
    (16, None, 1200 << 20, "0", 0),     # switched off
    (16, None, 1200 << 20, "many", 0),  # unreadable -> off
])
def test_how_many_workers(monkeypatch, cpus, ranks, size, env, expected):
    _machine(monkeypatch, cpus, ranks, env)
    assert workers_mod.export_workers(size) == expected


def _grow(src: bytes, tmp, final, piece: int = 1 << 20, pause: float = 0.01) -> None:
    """Write `src` as Kineto's save does: `<final>.tmp` in order, a piece at a time, then rename it."""
    import os
    import time

    with open(tmp, "wb") as fh:
        for k in range(0, len(src), piece):
            fh.write(src[k:k + piece])
            fh.flush()
            time.sleep(pause)
    os.replace(tmp, final)


def _same_pass1(a, b) -> None:
    (ha, ea, ta, ia), (hb, eb, tb, ib) = a, b
    assert ha == hb and ta == tb and len(ea) == len(eb) > 0
    for x, y in zip(ea, eb):
        if isinstance(x, export.GpuWork):  # the follower's also carry their serialized event (`done`)
            assert isinstance(y, export.GpuWork) and type(x.done) is bytes and y.done is None
            assert [getattr(x, s) for s in x.__slots__ if s != "done"] == \
                [getattr(y, s) for s in y.__slots__ if s != "done"]
        else:
            assert x == y
    assert [i.to_bytes() for i in ia] == [i.to_bytes() for i in ib]


@pytest.mark.parametrize("where, parts", [("tmp_then_rename", 1), ("final_name", 1), ("after_the_save", 1),
                                         ("tmp_then_rename", 2), ("after_the_save", 3)])
def test_a_follower_reads_the_raw_file_while_it_is_written(raw, tmp_path, where, parts):
    """`Follower`: pass 1 on a file that grows a MB at a time (from its first byte, in the slim passes'
    256 KB chunks) equals pass 1 on the finished file; also when the writer uses the final name directly,
    when the follower only looks after the save, and when 2 or 3 processes share the regions."""
    import threading

    d, _ = raw
    data = (d / "raw.json").read_bytes()
    final = tmp_path / "raw0.json"
    tmp = tmp_path / "raw0.json.tmp"
    if where == "after_the_save":
        final.write_bytes(data)
        f = workers_mod.Follower(final, parts).start()
    else:
        f = workers_mod.Follower(final, parts).start()
        assert f is not None
        t = threading.Thread(target=_grow, args=(data, tmp if where == "tmp_then_rename" else final, final))
        t.start()
        t.join()
    got = f.finish(True)
    assert got is not None and len(got[3]) > parts  # (more regions than processes)
    assert not list(tmp_path.glob("*.pass1*"))  # no answers left on disk
    _same_pass1(got, export.read_selected(final, True, None))
    d, spec = raw  # and the file written from it is the one the writer's own passes write
    run = RunData.from_dict(spec["run"])
    a = write_trace(final, run, spec["steps"], tmp_path / "a.pt.trace.json.gz", process=spec["process"], pass1=got)
    b = write_trace(final, run, spec["steps"], tmp_path / "b.pt.trace.json.gz", process=spec["process"])
    assert _without_start_time(a) == _without_start_time(b)


@pytest.mark.parametrize("parts", [1, 2])
def test_a_follower_that_fails_leaves_the_pass_to_the_writer(raw, tmp_path, parts):
    d, _ = raw
    final = tmp_path / "raw0.json"
    f = workers_mod.Follower(final, parts).start()
    f.pool.procs[-1].kill()  # (one of them) dies before the save
    final.write_bytes((d / "raw.json").read_bytes())
    assert f.finish(True) is None
    assert not list(tmp_path.glob("*.pass1*"))
    f = workers_mod.Follower(final).start()
    assert f.finish(False) is None  # the save raised: nothing is read
    damaged = tmp_path / "raw1.json"  # a layout the fast path refuses: the writer's own pass says why
    damaged.write_bytes(b'{"traceEvents": 5}')
    f = workers_mod.Follower(damaged).start()
    assert f.finish(True) is None


@pytest.mark.parametrize("parts", [1, 2])
def test_a_kineto_run_uses_the_followers_pass_1(tmp_path, monkeypatch, parts):
    """End to end: the writer gets pass 1 from the follower (the run's timings say so), and the file
    equals the one written from the same raw file with the writer's own pass 1."""
    import torch

    import moe_trace
    from moe_trace.models import build_tiny_model, example_inputs
    from moe_trace.trace import writer as writer_mod

    monkeypatch.delenv("MOE_TRACE_EXPORT_WORKERS", raising=False)
    monkeypatch.setattr(workers_mod, "follow_enabled", lambda: True)
    monkeypatch.setattr(workers_mod, "follow_parts", lambda: parts)
    seen = {}
    real = writer_mod.write_run_traces

    def spy(raws, run, steps, logdir, **k):
        seen["pass1"] = k.get("pass1")
        out = real(raws, run, steps, logdir, **k)
        seen["again"] = real(raws, run, steps, tmp_path / "again", **dict(k, pass1=None))
        return out

    monkeypatch.setattr(writer_mod, "write_run_traces", spy)
    spawned = []
    real_spawn = workers_mod.Follower.spawn
    monkeypatch.setattr(workers_mod.Follower, "spawn",
                        lambda f: spawned.append(time.perf_counter()) or seen.update(parts=f.parts) or real_spawn(f))
    m = build_tiny_model("olmoe").eval()
    with torch.no_grad(), moe_trace.profile(m, mode="kineto", logdir=tmp_path / "run") as run:
        m.generate(**example_inputs(m), max_new_tokens=3, do_sample=False)
    files = run.trace_files
    assert seen["pass1"] and run.export_timings["pass1_followed"] > 0
    tm = run.export_timings  # the marks benchmarks/kineto_speed.py splits the tail with, in their order
    order = ["saved", "follower_done", "pass1_followed", "pass1", "selected", "resolved", "written"]
    assert [tm[k] for k in order] == sorted(tm[k] for k in order)
    assert 0 <= tm["tail_thread_cpu"] <= tm["written"] - tm["saved"] + 0.05
    # its process was started before the profiler's stop (whose time its start-up overlaps)
    assert len(spawned) == 1 and spawned[0] < run.export_timings["profiler_stopped"] and seen["parts"] == parts
    a = orjson.loads(gzip.decompress(files[0].read_bytes()))
    b = orjson.loads(gzip.decompress(seen["again"][0].read_bytes()))
    assert a["traceEvents"] == b["traceEvents"] and len(a["traceEvents"]) > 10


@pytest.mark.parametrize("cpus, ranks, env, expected, parts", [
    (16, None, None, True, 2),    # an H200 box: the follower runs during the save, in two processes
    (2, None, None, False, 1),    # the CI box: no core idle during the save
    (16, "8", None, False, 1),    # 8 ranks on 16 cores
    (16, "4", None, True, 1),     # 4 cores a rank: one process
    (16, "2", None, True, 2),
    (2, None, "3", True, 1),      # workers asked for
    (16, None, "0", False, 2),    # all worker processes off (then no follower at all)
])
def test_when_a_follower_runs(monkeypatch, cpus, ranks, env, expected, parts):
    _machine(monkeypatch, cpus, ranks, env)
    assert workers_mod.follow_enabled() is expected and workers_mod.follow_parts() == parts


def test_a_follower_spawned_at_the_stop_is_closed_when_no_export_follows(tmp_path, monkeypatch):
    """The follower's process starts before the profiler's stop; when the export never runs (here the
    writer thread cannot start), closing the recorder ends that process: no worker outlives the run."""
    import torch

    import moe_trace
    from moe_trace.capture import recorders
    from moe_trace.models import build_tiny_model, example_inputs

    monkeypatch.delenv("MOE_TRACE_EXPORT_WORKERS", raising=False)
    monkeypatch.setattr(workers_mod, "follow_enabled", lambda: True)
    made = []
    real_spawn = workers_mod.Follower.spawn

    def spawn(f):
        real_spawn(f)
        made.append((f, list(f.pool.procs)))
        return f

    monkeypatch.setattr(workers_mod.Follower, "spawn", spawn)

    def no_export(self, *a, **k):
        raise RuntimeError("no writer thread")

    monkeypatch.setattr(recorders.KinetoRecorder, "export_async", no_export)
    m = build_tiny_model("olmoe").eval()
    with pytest.raises(RuntimeError, match="no writer thread"):
        with torch.no_grad(), moe_trace.profile(m, mode="kineto", logdir=tmp_path / "run"):
            m.generate(**example_inputs(m), max_new_tokens=2, do_sample=False)
    (f, procs), = made
    assert f.pool.procs == [] and len(procs) == 1
    assert procs[0].wait(timeout=30) is not None  # its pipes closed: it exits


def test_no_workers_start_when_pass_1_is_given_with_spans(raw, monkeypatch):
    """A follower's pass 1 with spans leaves pass 2 nothing to do in workers: none start."""
    d, spec = raw
    serial = _write(d, spec, "serial4.pt.trace.json.gz", 0, monkeypatch)
    pass1 = export.read_selected(d / "raw.json", True)
    assert all(ix.has_spans for ix in pass1[3])
    started = []
    monkeypatch.setattr(workers_mod.Workers, "spawn", lambda self: started.append(self) or self)
    monkeypatch.setenv("MOE_TRACE_EXPORT_WORKERS", "2")
    out = write_trace(d / "raw.json", RunData.from_dict(spec["run"]), spec["steps"], d / "given.pt.trace.json.gz",
                      slim=True, process=spec["process"], pass1=pass1)
    assert started == [] and _without_start_time(out) == _without_start_time(serial)
