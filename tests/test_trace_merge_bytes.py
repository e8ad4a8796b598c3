"""merge's byte path (trace/merge_bytes.py) against its per-event path (`byte_path=False`): the same
events after parsing, on Kineto-layout files and on files built to defeat the byte path's proof; and
a test that fails when the byte path silently stops being used."""
from __future__ import annotations

import json
import math
import os

import orjson
import pytest

from moe_trace.errors import TraceError
from moe_trace.trace import merge as M
from moe_trace.trace import merge_bytes
from moe_trace.trace.io import Source
from tests.test_trace_fixtures import tmpdir
from tests.test_trace_merge_odd import BASE, _events, _kineto

HOSTILE = '"pid": 1, "tid": 2, "ts": 3'

needs_msgspec = pytest.mark.skipif(not merge_bytes.AVAILABLE and os.environ.get("CI") != "true",
                                   reason="msgspec is not installed here (CI installs it: a core dependency)")


def _write_ranks(d, per_rank, shift_ns=1_234_567, compact=False):
    for rank, events in enumerate(per_rank):
        text = _kineto(events, BASE + rank * shift_ns, {"distributedInfo": {"rank": rank}})
        if compact:  # moe-trace's own layout: one compact event per line
            head, _, rest = text.partition('"traceEvents": [\n')
            body = rest.rsplit("\n]", 1)[0]
            text = head + '"traceEvents": [\n' + ",\n".join(
                orjson.dumps(e).decode() for e in orjson.loads("[" + body + "]")) + '\n], "traceName": "x"}\n'
        (d / f"r{rank}.pt.trace.json").write_text(text, encoding="utf-8")


def _both(d, name):
    """(byte-path output, per-event output, LAST_STATS of the byte-path run), parsed."""
    fast = M.merge_traces(d, d.parent / f"{name}_fast.json")
    stats = dict(M.LAST_STATS)
    slow = M.merge_traces(d, d.parent / f"{name}_slow.json", byte_path=False)
    assert M.LAST_STATS["byte_regions"] == M.LAST_STATS["split_regions"] == 0
    return orjson.loads(fast.read_bytes()), orjson.loads(slow.read_bytes()), stats


def _assert_same(a, b):
    assert a["moe_trace"] == b["moe_trace"]
    ea, eb = a["traceEvents"], b["traceEvents"]
    assert len(ea) == len(eb)
    for x, y in zip(ea, eb):
        if x != y:
            x, y = dict(x), dict(y)
            tx, ty = x.pop("ts"), y.pop("ts")
            assert x == y
            assert math.isclose(tx, ty, rel_tol=1e-15, abs_tol=1e-9), (tx, ty)


@needs_msgspec
@pytest.mark.parametrize("chunk", [None, 4096])
def test_byte_path_gives_the_per_event_events_on_kineto_files(monkeypatch, chunk):
    d = tmpdir(f"merge_bytes_kineto_{chunk}")
    _write_ranks(d, [_events(0, odd=False), _events(1, odd=False)])
    if chunk:  # many small regions
        monkeypatch.setattr(M, "Source", lambda p, progress=False: Source(p, progress, chunk=chunk))
    fast, slow, stats = _both(d, f"kineto{chunk}")
    _assert_same(fast, slow)
    # the byte path did the work: every region, the metadata events at the start split off
    assert stats["byte_regions"] + stats["split_regions"] >= (2 if chunk is None else 20), stats
    assert stats["event_regions"] == stats["ijson_batches"] == 0, stats
    ts = [e["ts"] for e in fast["traceEvents"] if e.get("name") == "aten::op0"]
    assert ts[0] == 1_000_001.125 and 1_000_002.125 + 1234.567 in [round(t, 3) for t in ts]  # rank 1 re-based


@needs_msgspec
def test_hostile_strings_are_not_rewritten():
    d = tmpdir("merge_bytes_hostile")
    per_rank = []
    for rank in range(2):
        ev = _events(rank, odd=False)
        ev.insert(10, {"ph": "X", "cat": "cpu_op", "name": HOSTILE, "pid": 4000 + rank, "tid": 1, "ts": 1_000_010.5,
                       "dur": 1, "args": {"note": HOSTILE, "list": [HOSTILE, {"k": HOSTILE}]}})
        ev.insert(20, {"ph": "X", "cat": "cpu_op", "name": "n", "pid": 4000 + rank, "tid": 1, "ts": 1_000_011.5,
                       "dur": 1, "args": {HOSTILE: HOSTILE}})
        per_rank.append(ev)
    _write_ranks(d, per_rank)
    fast, slow, stats = _both(d, "hostile")
    _assert_same(fast, slow)
    assert stats["event_regions"] == 0 and stats["byte_regions"] + stats["split_regions"] == 2, stats
    texts = [e for e in fast["traceEvents"] if e.get("name") == HOSTILE]
    assert len(texts) == 2 and all(e["args"] == {"note": HOSTILE, "list": [HOSTILE, {"k": HOSTILE}]} for e in texts)
    assert sum(HOSTILE in e.get("args", {}) for e in fast["traceEvents"]) == 2


@needs_msgspec
@pytest.mark.parametrize("case", ["quote_in_string", "duplicate_pid", "nested_pid_ts", "no_room", "string_pid",
                                  "exponent_ts", "four_decimals"])
def test_regions_that_fail_the_proof_fall_back_and_stay_right(case):
    d = tmpdir(f"merge_bytes_fallback_{case}")
    per_rank = [_events(0, odd=False), _events(1, odd=False)]
    odd = {
        # a key-like text that does contain the bytes "pid": the count is off
        "quote_in_string": '{"ph": "X", "cat": "cpu_op", "name": "x\\"pid", "pid": 4001, "tid": 1, "ts": 1000005.5, "dur": 1}',
        # the last key wins (orjson and msgspec alike); the byte path must not rewrite only the first one
        "duplicate_pid": '{"ph": "X", "cat": "cpu_op", "name": "d", "pid": 4001, "tid": 1, "pid": 77, "ts": 1000005.5}',
        "nested_pid_ts": {"ph": "X", "cat": "cpu_op", "name": "n", "pid": 4001, "tid": 1, "ts": 1000005.5,
                          "args": {"pid": 1, "tid": 2, "ts": 3}},
        # compact layout and a ts that gets one digit longer: no room to write it in place
        "no_room": '{"ph":"X","cat":"cpu_op","name":"c","pid":4001,"tid":1,"ts":999.5,"dur":1}',
        "string_pid": {"ph": "X", "cat": "cpu_op", "name": "s", "pid": "4001", "tid": 1, "ts": 1000005.5},
        "exponent_ts": '{"ph": "X", "cat": "cpu_op", "name": "e", "pid": 4001, "tid": 1, "ts": 1.0000055e6}',
        "four_decimals": {"ph": "X", "cat": "cpu_op", "name": "f", "pid": 4001, "tid": 1, "ts": 1000005.0625},
    }[case]
    per_rank[1].insert(50, odd)
    _write_ranks(d, per_rank, shift_ns=9_000_000_000 if case == "no_room" else 1_234_567)
    fast, slow, stats = _both(d, case)
    _assert_same(fast, slow)
    assert stats["event_regions"] == 1 and stats["byte_regions"] + stats["split_regions"] == 1, stats
    if case == "duplicate_pid":
        pids = {e["pid"] for e in fast["traceEvents"] if e.get("name") == "d"}
        assert len(pids) == 1 and pids != {e["pid"] for e in fast["traceEvents"] if e.get("name") == "aten::op0"
                                           and e["ts"] > 1_001_000}


@needs_msgspec
def test_compact_layout_takes_the_byte_path():
    d = tmpdir("merge_bytes_compact")
    # no whitespace to grow into: a 1 ms shift keeps every ts as long as it was (1.234567 ms would add digits)
    _write_ranks(d, [_events(0, odd=False), _events(1, odd=False)], shift_ns=1_000_000, compact=True)
    fast, slow, stats = _both(d, "compact")
    _assert_same(fast, slow)
    assert stats["event_regions"] == 0 and stats["byte_regions"] + stats["split_regions"] == 2, stats


@needs_msgspec
@pytest.mark.parametrize("damage", ["trailing_comma", "bad_utf8", "raw_newline_in_string", "unclosed", "lone_surrogate"])
def test_a_damaged_event_in_the_middle_gives_one_trace_error(monkeypatch, damage):
    d = tmpdir(f"merge_bytes_damaged_{damage}")
    ev = _events(0, odd=False) * 8  # ~4000 events, ~1.2 MB
    _write_ranks(d, [ev, _events(1, odd=False)])
    p = d / "r0.pt.trace.json"
    data = p.read_bytes()
    mid = data.index(b'"dur": 2.0', len(data) // 2)
    bad = {"trailing_comma": b'"dur": [2.0,]', "bad_utf8": b'"dur": "\xff\xfe"',
           "raw_newline_in_string": b'"dur": "a\nb"', "unclosed": b'"dur": [2.0',
           "lone_surrogate": b'"dur": "\\ud800"'}[damage]
    p.write_bytes(data[:mid] + bad + data[mid + len(b'"dur": 2.0'):])
    monkeypatch.setattr(M, "Source", lambda p, progress=False: Source(p, progress, chunk=64 << 10))
    if damage == "lone_surrogate":  # orjson and msgspec reject it, ijson reads it: both paths give that output
        fast, slow, stats = _both(d, "lone_surrogate")
        _assert_same(fast, slow)
        assert stats["ijson_batches"] and stats["byte_regions"] + stats["split_regions"] >= 3, stats
        return
    out = d.parent / f"damaged_{damage}.json"
    with pytest.raises(TraceError, match="r0.pt.trace.json") as err:
        M.merge_traces(d, out)
    assert "\n" not in str(err.value)
    assert M.LAST_STATS["byte_regions"] + M.LAST_STATS["split_regions"] >= 3  # regions before it took the byte path
    assert not out.exists()
    assert not [q for q in d.parent.iterdir() if q.name.startswith(out.name)]  # no scratch / tmp left


@needs_msgspec
def test_a_summary_larger_than_its_room_is_copied_in_front(monkeypatch):
    d = tmpdir("merge_bytes_reserve")
    _write_ranks(d, [_events(0, odd=False), _events(1, odd=False)])
    want = orjson.loads(M.merge_traces(d, d.parent / "reserve_a.json").read_bytes())
    monkeypatch.setattr(M, "_SUMMARY_SLACK", -(1 << 20))  # no room: the scratch-file copy
    out = M.merge_traces(d, d.parent / "reserve_b.json")
    assert orjson.loads(out.read_bytes()) == want
    assert not [q for q in d.parent.iterdir() if q.name.startswith("reserve_b.json.")]


def test_per_event_path_alone_without_msgspec(monkeypatch):
    """Where msgspec is missing merge still works (every region through orjson)."""
    d = tmpdir("merge_bytes_none")
    _write_ranks(d, [_events(0, odd=False), _events(1, odd=False)])
    monkeypatch.setattr(merge_bytes, "AVAILABLE", False)
    out = M.merge_traces(d, d.parent / "none.json")
    assert M.LAST_STATS["byte_regions"] == 0 and M.LAST_STATS["event_regions"] == 2
    names = {e["args"]["name"] for e in json.loads(out.read_bytes())["traceEvents"] if e.get("name") == "process_name"}
    assert names == {"rank0 host", "rank0 GPU 0", "rank1 host", "rank1 GPU 0"}


def _random_events(rng, rank: int, n: int) -> list:
    """Kineto-like events with one of many odd shapes or layouts every ~30 (raw strings for what json.dumps
    cannot write: duplicate keys)."""
    host = 4000 + rank
    out = [{"ph": "M", "name": "process_labels", "pid": 0, "tid": 0, "args": {"labels": "GPU 0"}}]
    t = 1_000_000.0
    for i in range(n):
        t += rng.choice([0.5, 1.125, 2.0, 3.001, 0.004])
        if rng.random() > 0.03:
            cat, pid = rng.choice([("cpu_op", host), ("cuda_runtime", host), ("kernel", 0), ("gpu_memcpy", 0)])
            if rng.random() < 0.3:
                out.append({"ph": rng.choice("sf"), "id": i, "pid": pid, "tid": 7, "ts": round(t, 3), "cat": "ac2g",
                            "name": "ac2g"})
            else:
                out.append({"ph": "X", "cat": cat, "name": rng.choice(["a", HOSTILE, "é中"]), "pid": pid, "tid": 7,
                            "ts": round(t, 3), "dur": 1.5, "args": {"External id": i, "s": HOSTILE}})
            continue
        ts = rng.choice([round(t, 3), int(t), round(t, 1), round(t, 5), str(round(t, 3))])
        pid = rng.choice([host, 0, 1, 12345678, "Spans", -1])
        cat = rng.choice(["cpu_op", "kernel", "user_annotation", "ac2g", "odd", None])
        ph = rng.choice(["X", "i", "C", "s", "f", "b", "M"])
        ev = {"ph": ph, **({"cat": cat} if cat else {}), "name": rng.choice(["a", HOSTILE, 'q"pid']),
              "pid": pid, "tid": rng.choice([1, 7, "x"]), "ts": ts}
        if ph in ("s", "f", "b"):
            ev = {"ph": ph, "id": rng.choice([i, i * 1000, 7, f"{i:x}"]), **{k: v for k, v in ev.items() if k != "ph"}}
        if rng.random() < 0.5:
            ev["args"] = rng.choice([{"pid": 5, "ts": 6}, {"a": [{"ph": "X", "pid": 1, "ts": 2}]}, {"id": 3}])
        if rng.random() < 0.2:
            ev.pop(rng.choice(["pid", "ts", "cat", "ph"]), None)
        if rng.random() < 0.1:
            ev["bind_id"] = i
        layout = rng.random()
        if layout < 0.3:
            out.append(orjson.dumps(ev).decode())
        elif layout < 0.5 and "pid" in ev:  # a duplicate key (the last one wins)
            text = json.dumps(ev, indent=4)
            out.append(text[:-1].rstrip() + f',\n    "pid": {rng.choice([3, host])}\n}}')
        else:
            out.append(ev)
    return out


@needs_msgspec
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_events_both_paths_agree(monkeypatch, seed):
    import random

    rng = random.Random(seed)
    d = tmpdir(f"merge_bytes_random_{seed}")
    _write_ranks(d, [_random_events(rng, r, 600) for r in range(3)], shift_ns=rng.choice([1_234_567, 1_000_000, 999]))
    monkeypatch.setattr(M, "Source", lambda p, progress=False: Source(p, progress, chunk=rng.choice([2048, 8192])))
    fast, slow, stats = _both(d, f"random{seed}")
    _assert_same(fast, slow)
    assert stats["byte_regions"] + stats["split_regions"] > 0, stats


def test_uncached_writer_writes_every_byte(tmp_path):
    from moe_trace.trace.io import Uncached

    data = [os.urandom(n) for n in (1, 70_000, 5, 200_000, 65_536, 3)] * 5
    with open(tmp_path / "x.bin", "wb") as fh:
        sink = Uncached(fh, every=64 << 10)
        for d in data:
            assert sink.write(d) == len(d)
        sink.write(memoryview(b"tail"))
        sink.close()
        assert sink._fd is not None  # fdatasync + posix_fadvise worked here (the tmp file system has them)
    assert (tmp_path / "x.bin").read_bytes() == b"".join(data) + b"tail"
