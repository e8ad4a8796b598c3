"""validate_trace: Perfetto's JSON rules."""
from __future__ import annotations

import pytest

from moe_trace.trace import validate_trace
from tests.test_trace_fixtures import raw_cpu_trace_path, synthetic_gpu_raw, tmpdir


def _x(name, ts, dur, pid=1, tid=1, **kw):
    return {"ph": "X", "cat": "c", "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, **kw}


def _ok_events():
    return [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "host"}},
        {"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": 1, "ts": 0, "args": {"sort_index": 3}},
        _x("outer", 0.0, 10.0), _x("inner", 1.0, 2.0), _x("inner2", 3.0, 7.0), _x("touching", 10.0, 5.0),
        _x("other thread", 5.0, 20.0, tid=2), _x("zero", 15.0, 0.0),
        {"ph": "C", "name": "moe_trace/L000 expert_tokens", "pid": 1, "ts": "1.5", "args": {"e000": 3, "e001": 0.5}},
        {"ph": "i", "s": "g", "name": "mark", "pid": "Traces", "tid": "x", "ts": 2},
        {"ph": "s", "id": 7, "pid": 1, "tid": 1, "ts": 1.0, "cat": "ac2g", "name": "ac2g"},
        {"ph": "f", "id": 7, "pid": 0, "tid": 7, "ts": 2.0, "cat": "ac2g", "name": "ac2g", "bp": "e"},
        _x("kernel", 2.0, 1.0, pid=0, tid=7),  # a flow end binds to the slice enclosing its ts
        {"ph": "b", "id": "0x1", "pid": 1, "ts": 1.0, "cat": "a", "name": "async"},
        {"ph": "e", "id2": {"local": "0x1"}, "pid": 1, "ts": 2.0, "cat": "a", "name": "async"},
        {"ph": "B", "pid": 1, "tid": 3, "ts": 1.0, "name": "b"}, {"ph": "E", "pid": 1, "tid": 3, "ts": 2.0},
        _x("grid args are fine", 30.0, 1.0, args={"grid": [1, 2, 3]}),
        # accepted by Perfetto's importer (docs/trace-format.md), so accepted here
        {"ph": "C", "name": "numeric strings", "pid": 1, "ts": 3, "args": {"v": "2.5", "w": "1e3"}},
        {"ph": "M", "name": "process_sort_index", "pid": 1, "args": {"sort_index": 2.0}},
        {"ph": "M", "name": "process_labels", "pid": 1, "args": {"labels": "CPU"}},
        {"ph": "M", "name": "process_color", "pid": 1, "args": {"x": 1}},  # unknown names: skipped
        {"ph": "P", "name": "ProfileChunk", "id": "0x2", "pid": 1, "tid": 1, "ts": 4, "args": {"data": {}}},
        {"ph": "T", "name": "Running", "pid": 1, "tid": 1, "ts": 4, "dur": 1, "args": {"cpu": 0}},
        _x("array fields are fine", 40.0, 1.0, stack=["a"]),
        _x("float pid", 41.0, 1.0, pid=2.0, tid=2 ** 32 - 1, tts="12", tdur=0.5),
        {},  # an empty object is skipped silently
        _x("flow host", 49.0, 5.0),
        {"ph": "s", "id": "0xFF", "pid": 1, "tid": 1, "ts": 50.0, "cat": "c", "name": "hexflow"},
        {"ph": "f", "id": "ff", "pid": 1, "tid": 1, "ts": 51.0, "cat": "c", "name": "hexflow", "bp": "e"},
        _x("v2 flow", 60.0, 1.0, bind_id="0x10", flow_out=True),
        {"ph": "i", "s": "weird", "pid": 1, "tid": 1, "ts": 2, "name": "thread instant"},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "ts": "not read", "args": {"name": "main"}},
    ]


def test_valid_trace_and_bare_array():
    assert validate_trace({"traceEvents": _ok_events(), "anything": {"x": 1}}) == []
    assert validate_trace(_ok_events()) == []
    assert validate_trace(synthetic_gpu_raw(devices=(0, 1))) == []
    assert validate_trace(raw_cpu_trace_path()) == []


def test_flow_ends_pair_with_an_earlier_start_inside_slices():
    host = [_x("launch", 10.0, 5.0), _x("kernel", 20.0, 5.0, pid=0, tid=7)]
    s = {"ph": "s", "id": 5, "pid": 1, "tid": 1, "ts": 11.0, "cat": "ac2g", "name": "ac2g"}
    f = {"ph": "f", "id": 5, "pid": 0, "tid": 7, "ts": 21.0, "cat": "ac2g", "name": "ac2g", "bp": "e"}
    assert validate_trace(host + [s, f]) == []
    assert validate_trace(host + [f, s]) == []  # file order does not matter, time does
    probs = validate_trace(host + [f])  # Kineto's flow end on a runtime call that launched nothing
    assert len(probs) == 1 and "without an earlier 's'" in probs[0] and "flow_end_without_start" in probs[0]
    early = [_x("early kernel", 8.0, 2.0, pid=0, tid=7), s, dict(f, ts=9.0)]  # ends before it starts
    assert ["without an earlier 's'" in p for p in validate_trace(host + early)] == [True]
    assert "without an earlier 's'" in validate_trace(host + [s, dict(f, name="other")])[0]  # keyed by name too
    assert "not inside an X slice" in validate_trace(host + [dict(s, ts=30.0), dict(f, ts=31.0)])[0]
    assert validate_trace(host + [s, dict(f, ts=40.0, bp=None)]) == []  # no bp: binds to the next slice
    assert validate_trace(host + [s]) == []  # a start alone is no problem for either importer


@pytest.mark.parametrize("bad, expect", [
    ({"ph": "C", "name": "c", "pid": 1, "ts": 1, "args": {"v": "high"}}, "non-numeric args value"),
    ({"ph": "C", "name": "c", "pid": 1, "ts": 1, "args": {"v": True}}, "non-numeric args value"),
    ({"ph": "C", "name": "c", "pid": 1, "ts": 1, "args": [1]}, "'args' is not an object"),
    ({"ph": "C", "name": "c", "pid": 1, "ts": 1}, "without an object 'args'"),
    ({"ph": "C", "name": "c", "pid": 1, "ts": 1, "args": {"v": "nan"}}, "non-numeric args value"),
    ({"ph": "Z", "name": "z", "pid": 1, "ts": 1}, "unknown phase 'Z'"),
    ({"ph": "S", "name": "p", "pid": 1, "ts": 1, "id": 1}, "ignored by Perfetto"),
    ({"ph": "T", "name": "Running", "pid": 1, "tid": 1, "ts": 1}, "T (thread state) event without 'dur'"),
    ({"name": "no ph", "pid": 1, "ts": 1}, "missing or non-string 'ph'"),
    (_x("nulldur", 1.0, None), "non-numeric 'dur'"),
    ({"ph": "X", "name": "nodur", "pid": 1, "tid": 1, "ts": 1}, "numeric 'dur' >= 0"),
    (_x("negdur", 1.0, -1.0), "numeric 'dur' >= 0"),
    (_x("strts", "soon", 1.0), "'ts' is not numeric"),
    (_x("strts2", "1.5x", 1.0), "'ts' is not numeric"),
    (_x("strdur", 1.0, "long"), "non-numeric 'dur' (Perfetto's tokenizer stops here"),
    (_x("tts", 1.0, 1.0, tts="soon"), "non-numeric 'tts'"),
    (_x("tdur", 1.0, 1.0, tdur=None), "non-numeric 'tdur'"),
    (_x("bigpid", 1.0, 1.0, pid=2 ** 32), "'pid' is outside 0..2^32-1 (Perfetto maps it to 0)"),
    (_x("bigtid", 1.0, 1.0, tid=2 ** 40), "'tid' is outside 0..2^32-1"),
    (_x("fracpid", 1.0, 1.0, pid=1.5), "'pid' is not an integer"),
    ({"ph": "X", "name": "nots", "pid": 1, "tid": 1, "dur": 1}, "missing 'ts'"),
    (_x("boolpid", 1.0, 1.0, pid=True), "'pid' is not a number or a string"),
    (_x("negtid", 1.0, 1.0, tid=-3), "'tid' is outside 0..2^32-1"),
    ({"ph": "M", "name": "process_name", "pid": 1, "args": {}}, "without args.name"),
    ({"ph": "M", "name": "process_name", "pid": 1, "args": {"name": 3}}, "non-empty string args.name"),
    ({"ph": "M", "name": "process_sort_index", "pid": 1, "args": {"sort_index": "1"}}, "args.sort_index"),
    ({"ph": "b", "pid": 1, "ts": 1, "name": "a"}, "without 'id' or 'id2'"),
    ({"ph": "s", "pid": 1, "tid": 1, "ts": 1, "name": "f"}, "flow 's' event without 'id'"),
    ({"ph": "s", "pid": 1, "tid": 1, "ts": 1, "name": "f", "bind_id": 3}, "flow 's' event without 'id'"),
    ({"ph": "t", "pid": 1, "tid": 1, "ts": 1, "name": "f", "id": "flow-7"}, "not an integer or a hex string"),
    ({"ph": "f", "pid": 1, "tid": 1, "ts": 1, "name": "f", "id": 1.5}, "not an integer or a hex string"),
    (_x("v2", 1.0, 1.0, bind_id="zz", flow_in=True), "'bind_id' is not an integer or a hex string"),
    (_x("v2", 1.0, 1.0, bind_id=3), "flow_without_direction"),
    ({"ph": "i", "pid": 1, "ts": 1, "name": "i"}, "thread-scoped instant without 'tid'"),
    ({"ph": "i", "s": "p", "tid": 1, "ts": 1, "name": "i"}, "process-scoped instant without 'pid'"),
    ({"ph": "E", "pid": 1, "tid": 9, "ts": 1}, "E event without an open B"),
    ({"ph": "B", "pid": 1, "tid": 9, "ts": 1, "name": "open"}, "never closed"),
    ("not an object", "not an object"),
])
def test_rejects(bad, expect):
    problems = validate_trace({"traceEvents": _ok_events() + [bad]})
    assert len(problems) == 1, problems
    assert expect in problems[0]


def test_overlap_pairs_are_counted():
    ev = [_x("a", 0.0, 10.0), _x("b", 5.0, 10.0), _x("c", 8.0, 10.0), _x("d", 30.0, 1.0),
          _x("other tid", 5.0, 10.0, tid=2)]
    problems = validate_trace({"traceEvents": ev})
    assert len(problems) == 1
    assert "partially overlapping X events on one thread: 3 pairs" in problems[0]  # a-b, a-c, b-c
    # nanosecond precision: a child ending 1 ns after its parent overlaps, one ending exactly at it nests
    assert validate_trace([_x("p", 4532332491716.851, 10.0), _x("c", 4532332491717.0, 9.851)]) == []
    assert "1 pair" in validate_trace([_x("p", 4532332491716.851, 10.0), _x("c", 4532332491717.0, 9.852)])[0]


def test_top_level_and_file_errors():
    assert validate_trace({"events": []}) == ["top level: an object without a traceEvents array"]
    assert "aborts" in validate_trace({"traceEvents": {}})[0]
    assert validate_trace({"traceEvents": [], "displayTimeUnit": "ns", "systemTraceEvents": ""}) == []
    for key in ("displayTimeUnit", "systemTraceEvents"):
        assert validate_trace({"traceEvents": [], key: 1}) == [
            f"top level: {key} is not a string (Perfetto aborts the import)"]
    assert "neither" in validate_trace(3)[0]
    d = tmpdir("validate_files")
    (d / "bad.json").write_text("{nope")
    assert "not readable" in validate_trace(d / "bad.json")[0]
    assert "not found" in validate_trace(d / "missing.json")[0]
