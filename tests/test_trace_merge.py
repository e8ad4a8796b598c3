"""merge_traces: one valid Perfetto timeline with unique, named pids and re-based timestamps."""
from __future__ import annotations

import gzip
import json

import pytest

from moe_trace.analysis import Report
from moe_trace.cli.main import main
from moe_trace.errors import TraceError
from moe_trace.trace import analyze, merge_traces, read_trace, validate_trace, write_trace
from tests.test_trace_fixtures import make_run, raw_cpu_trace_path, synthetic_gpu_raw, tmpdir

BASE = 1_790_857_026_000_000_000


@pytest.fixture(scope="module")
def rank_dir():
    d = tmpdir("merge_ranks")
    runs = []
    for rank in (0, 1):
        run, steps = make_run(seed=rank, device="cuda:0")
        run.layers[1].device = "cuda:1"
        raw = synthetic_gpu_raw(seed=rank, rank=rank, base_ns=BASE + rank * 2_000_000, devices=(0, 1))
        write_trace(raw, run, steps, d / f"rank{rank}_node_77.pt.trace.json.gz", slim=(rank == 0))
        runs.append((run, raw))
    return d, runs


def _load(p):
    data = p.read_bytes()
    return json.loads(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def test_merge_validates_with_unique_named_pids_and_rebased_ts(rank_dir):
    d, runs = rank_dir
    out = merge_traces(d, d.parent / "merged_out" / "merged.json.gz")
    assert validate_trace(out) == []
    obj = _load(out)
    assert set(obj) == {"traceEvents", "moe_trace"}
    ev = obj["traceEvents"]
    assert all(isinstance(e["pid"], int) for e in ev if "pid" in e)
    names = {e["pid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names.values()) == ["rank0 GPU 0", "rank0 GPU 1", "rank0 host",
                                      "rank1 GPU 0", "rank1 GPU 1", "rank1 host"]
    assert len(set(names)) == 6
    # rank 1's base is 2 ms later: its events move by +2000 us, rank 0's stay
    for rank, (_run, raw) in enumerate(runs):
        src = next(e for e in raw["traceEvents"] if e.get("name") == "moe_trace/prefill#0")
        host = next(p for p, n in names.items() if n == f"rank{rank} host")
        got = next(e for e in ev if e.get("name") == "moe_trace/prefill#0" and e["pid"] == host)
        assert got["ts"] == pytest.approx(src["ts"] + rank * 2000.0, abs=1e-3)
    # counters moved to the right rank's GPU pid
    gpu1 = {p for p, n in names.items() if n.endswith("GPU 1")}
    assert {e["pid"] for e in ev if e["ph"] == "C" and e["name"].startswith("moe_trace/L001")} == gpu1
    # flow ids stay pairwise unique across ranks (rank 1 is full, so it has flows; rank 0 is slim)
    starts = [e["id"] for e in ev if e["ph"] == "s"]
    assert starts and len(starts) == len(set(starts))
    mt = obj["moe_trace"]
    assert mt["schema"] == "moe-trace/merged/1" and mt["base_time_ns"] == BASE
    assert [f["label"] for f in mt["files"]] == ["rank0", "rank1"]
    assert "rank" not in _keys(mt)  # HTA greps for '"rank":'


def _keys(x) -> set:
    if isinstance(x, dict):
        return set(x) | {k for v in x.values() for k in _keys(v)}
    if isinstance(x, list):
        return {k for v in x for k in _keys(v)}
    return set()


def test_merged_file_analyzes_like_the_directory(rank_dir):
    d, runs = rank_dir
    out = merge_traces(sorted(d.glob("*.gz")), d.parent / "merged_out2" / "m.json")
    td = read_trace(out)
    assert td.merged and len(td.runs) == 2
    direct = analyze(d).to_dict()
    merged = td.report().to_dict()
    # counts and per-rank timing both survive the merge (times up to float rounding of the re-based ts)
    for a, b in zip(merged["layers"], direct["layers"], strict=True):
        assert {k: v for k, v in a.items() if k not in ("time_ms", "phases")} == \
            {k: v for k, v in b.items() if k not in ("time_ms", "phases")}
        for k, v in b["time_ms"].items():
            assert a["time_ms"][k] == (None if v is None else pytest.approx(v, rel=1e-6))  # pytest 9.2: approx(None) raises
    assert [x["device"] for x in merged["devices"]] == [x["device"] for x in direct["devices"]]
    for a, b in zip(merged["devices"], direct["devices"]):
        assert a["tokens"] == b["tokens"] and a["flops"] == b["flops"]
        assert a["experts_ms"] == pytest.approx(b["experts_ms"], rel=1e-6)
    assert Report([r for r, _ in runs]).to_dict()["totals"] == merged["totals"]
    assert set(td.summary.devices) == {"rank0 GPU 0", "rank0 GPU 1", "rank1 GPU 0", "rank1 GPU 1"}


def test_merge_plain_cpu_traces_by_file_order_and_cli(capsys):
    d = tmpdir("merge_plain")
    raw = raw_cpu_trace_path()
    for n in range(2):
        (d / f"w{n}.pt.trace.json").write_bytes(raw.read_bytes())
    out = d.parent / "merge_plain_out.json"
    assert main(["merge", str(d), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    obj = _load(out)
    assert validate_trace(obj) == []
    names = sorted(e["args"]["name"] for e in obj["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name")
    assert "rank0 host" in names and "rank1 host" in names
    assert main(["merge", str(d / "nothing_here"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_merge_errors():
    d = tmpdir("merge_err")
    with pytest.raises(TraceError, match="no \\*"):
        merge_traces(d, d / "o.json")
    with pytest.raises(TraceError, match="empty list"):
        merge_traces([], d / "o.json")
    (d / "bad.pt.trace.json").write_text('{"a": 1}')
    with pytest.raises(TraceError, match="not a Chrome trace"):
        merge_traces(d, d / "o.json")
    assert not (d / "o.json").exists()


def test_merged_files_are_not_merged_again(rank_dir):
    d, _runs = rank_dir
    d2 = tmpdir("merge_again")
    for p in d.glob("*.gz"):
        (d2 / p.name).write_bytes(p.read_bytes())
    merge_traces(d2, d2 / "all.pt.trace.json.gz")  # lands inside the directory it merges
    with pytest.warns(UserWarning, match="already a merged trace"):
        again = merge_traces(d2, d2.parent / "again.json")
    assert [f["label"] for f in _load(again)["moe_trace"]["files"]] == ["rank0", "rank1"]
    with pytest.warns(UserWarning, match="merged"):
        rep = analyze(d2)  # per-rank files win over the merged one
    assert len(rep.parts) == 2
