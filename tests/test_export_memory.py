"""The kineto export's memory: on a GPU-heavy raw trace (the committed H200 recording, replicated by
benchmarks/export_memory.py) the byte path writes exactly what the object path (every event a dict)
writes, in the same order; a slim trace parses only the GPU events it keeps (the dropped ones stay
`GpuWork` stubs) and what pass 1 keeps alive is a fraction of the raw file."""
from __future__ import annotations

import gzip
import json
import tracemalloc

import orjson
import pytest

from benchmarks.export_memory import build_raw
from moe_trace.analysis import RunData
from moe_trace.errors import TraceError
from moe_trace.trace import export, write_trace
from moe_trace.trace import writer as writer_mod
from moe_trace.trace.format import GPU_WORK_CATS
from tests.test_trace_fixtures import tmpdir


@pytest.fixture(scope="module")
def raw3():
    d = tmpdir("export_memory")
    spec = build_raw(d / "raw.json", 0, copies=3)
    return d, spec


def _events(path) -> list:
    return orjson.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


@pytest.mark.parametrize("slim", [True, False])
def test_byte_path_equals_object_path_on_the_h200_trace(raw3, slim, monkeypatch):
    d, spec = raw3
    run = RunData.from_dict(spec["run"])
    raw_obj = json.loads((d / "raw.json").read_bytes())
    by_obj = write_trace(raw_obj, run, spec["steps"], d / f"obj{slim}.json.gz", slim=slim, process=spec["process"])
    monkeypatch.setattr(writer_mod, "_load_raw", lambda *a, **k: pytest.fail("the byte path loaded the raw file"))
    by_bytes = write_trace(d / "raw.json", run, spec["steps"], d / f"bytes{slim}.json.gz", slim=slim,
                           process=spec["process"])
    a, b = _events(by_obj), _events(by_bytes)
    assert a == b  # same events, same values, same order
    kernels = [e for e in raw_obj["traceEvents"] if e.get("cat") == "kernel"]
    kept = [e for e in b if e.get("cat") == "kernel"]
    if slim:  # the recording has kernels outside moe-trace's ranges: slim drops some and keeps some
        assert 0 < len(kept) < len(kernels)
        assert all(set(e["args"]) <= writer_mod.SLIM_GPU_ARGS for e in kept)
        corr = {e["args"]["correlation"] for e in b if e.get("cat") in GPU_WORK_CATS}
        launches = {e["args"]["correlation"] for e in b if e.get("cat") in ("cuda_runtime", "cuda_driver")}
        assert launches == corr  # each kept launch launched kept GPU work, and each kept kernel has its launch
    else:
        assert len(kept) == len(kernels)


def test_slim_parses_only_the_gpu_events_it_keeps(raw3, monkeypatch):
    monkeypatch.setenv("MOE_TRACE_EXPORT_WORKERS", "0")  # this process's passes (workers: test_export_workers.py)
    d, spec = raw3
    run = RunData.from_dict(spec["run"])
    raw = d / "raw.json"
    tracemalloc.start()
    try:
        head, selected, tail, _ = export.read_selected(raw, slim=True)
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    n_gpu = sum(1 for e in json.loads(raw.read_bytes())["traceEvents"]
                if e.get("cat") in GPU_WORK_CATS and e.get("ph") == "X")
    stubs = [e for e in selected if isinstance(e, export.GpuWork)]
    assert len(stubs) == n_gpu and not any(isinstance(e, dict) and e.get("cat") in GPU_WORK_CATS for e in selected)
    assert retained < 0.3 * raw.stat().st_size, (retained, raw.stat().st_size)
    del selected, stubs

    seen = []
    real = export.slim_args
    monkeypatch.setattr(export, "slim_args", lambda e: seen.append(e.get("cat")) or real(e))
    out = _events(write_trace(raw, run, spec["steps"], d / "s.json.gz", process=spec["process"]))
    kept_gpu = sum(1 for e in out if e.get("cat") in GPU_WORK_CATS)
    assert sum(1 for c in seen if c in GPU_WORK_CATS) == kept_gpu < n_gpu


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_raw_file_changed_between_the_passes_is_an_error(raw3, monkeypatch, workers):
    monkeypatch.setenv("MOE_TRACE_EXPORT_WORKERS", workers)
    d, spec = raw3
    run = RunData.from_dict(spec["run"])
    raw = d / "changed.json"
    raw.write_bytes((d / "raw.json").read_bytes())
    real = export.read_selected

    def then_change(path, slim=True, *rest):
        got = real(path, slim, *rest)
        data = raw.read_bytes()
        k = data.index(b'"cat": "kernel"')  # one more event early in the file: pass 2 finds other events
        k = data.rindex(b"{", 0, k)
        raw.write_bytes(data[:k] + b'{"ph": "i", "cat": "x", "name": "x", "pid": 1, "tid": 1, "ts": 1},\n' + data[k:])
        return got

    monkeypatch.setattr(writer_mod, "read_selected", then_change)
    with pytest.raises(TraceError, match="changed while it was being written"):
        write_trace(raw, run, spec["steps"], d / "c.json.gz", process=spec["process"])


def test_a_full_trace_streams_the_raw_file_into_the_output(raw3, monkeypatch):
    d, spec = raw3
    run = RunData.from_dict(spec["run"])
    pulled = []
    real_all, real_write = writer_mod.all_events, writer_mod.atomic_write

    def all_events(*a, **k):
        for region in real_all(*a, **k):
            pulled.append(len(region))
            yield region

    def atomic_write(out, parts, **k):
        assert not pulled, "the raw file's regions were read into memory before the output was written"
        return real_write(out, parts, **k)

    monkeypatch.setattr(writer_mod, "all_events", all_events)
    monkeypatch.setattr(writer_mod, "atomic_write", atomic_write)
    out = write_trace(d / "raw.json", run, spec["steps"], d / "f.json.gz", slim=False, process=spec["process"])
    assert len(pulled) > 1 and len(_events(out)) > 30_000
