"""merge on traces with odd content, checked against the rules re-implemented here from merge.py's
docstring (pids unique per rank, ts moved onto the earliest base, flow / async ids made unique, the
inputs' process names replaced, non-objects dropped), and damaged inputs: one TraceError."""
from __future__ import annotations

import gzip
import json

import pytest

from moe_trace.errors import TraceError
from moe_trace.trace import merge as M
from moe_trace.trace.io import Source
from tests.test_trace_fixtures import tmpdir

BASE = 1_790_857_026_000_000_000


def _kineto(events: list, base: int | None, extra_head: dict | None = None) -> str:
    """Events in torch's export layout (one key per line, `,\\n` between events)."""
    head = {"schemaVersion": 1, **({"baseTimeNanoseconds": base} if base is not None else {}), **(extra_head or {})}
    body = ",\n".join(e if isinstance(e, str) else json.dumps(e, indent=4, ensure_ascii=False) for e in events)
    return json.dumps(head)[:-1] + ', "traceEvents": [\n' + body + '\n], "traceName": "x"}\n'


def _events(rank: int, odd: bool) -> list:
    host, gpu = 4000 + rank, 0
    ev = [{"ph": "M", "name": "process_name", "pid": host, "tid": 0, "args": {"name": "python"}},
          {"ph": "M", "name": "process_labels", "pid": gpu, "tid": 0, "args": {"labels": "GPU 0"}},
          {"ph": "M", "name": "thread_name", "pid": host, "tid": host, "args": {"name": "main"}}]
    t = 1_000_000.0 + rank
    for i in range(120):
        t += 1.125
        ev.append({"ph": "X", "cat": "cpu_op", "name": f"aten::op{i % 7}", "pid": host, "tid": host,
                   "ts": round(t, 3), "dur": 1.5, "args": {"External id": i, "Input Dims": [[1, 2], []],
                                                           "Concrete Inputs": ["", "[1, 2]"]}})
        ev.append({"ph": "X", "cat": "kernel", "name": "gemm<float, 4>", "pid": gpu, "tid": 7,
                   "ts": round(t + 3, 3), "dur": 2.0, "args": {"correlation": i, "grid": [1, 2, 3]}})
        ev.append({"ph": "s", "id": 100 + i, "pid": host, "tid": host, "ts": round(t, 3), "cat": "ac2g", "name": "ac2g"})
        ev.append({"ph": "f", "id": 100 + i, "pid": gpu, "tid": 7, "ts": round(t + 3, 3), "cat": "ac2g", "name": "ac2g",
                   "bp": "e"})
        if i % 10 == 0:
            ev.append({"ph": "C", "cat": "moe_trace", "name": "moe_trace/L000", "pid": gpu, "tid": 0, "ts": t,
                       "args": {"tokens": i}})
        if not odd:
            continue
        j = i // 20
        if i == 60:  # a pid first seen by a flow (kind "other"), later by a kernel: it becomes a GPU
            ev.append({"ph": "f", "id": 7, "pid": 5, "tid": 7, "ts": t, "cat": "ac2g", "name": "ac2g", "bp": "e"})
        if i == 70:
            ev.append({"ph": "X", "cat": "kernel", "name": "late", "pid": 5, "tid": 7, "ts": t, "dur": 1.0})
        odd_ev = [
            # escapes, unicode (raw and \u-escaped), nested args, odd numbers
            {"ph": "X", "cat": "cpu_op", "name": 'quote " back \\ slash \t tab é 中文 🙂', "pid": host, "tid": host,
             "ts": t, "dur": 0, "args": {"deep": {"a": [{"b": [[{"c": None}]]}], "e": -0.0, "f": 1e-7, "g": 1234567890123456789}}},
            json.dumps({"ph": "X", "cat": "cpu_op", "name": "ascii \u00e9\u4e2d", "pid": host, "tid": host, "ts": t,
                        "dur": 1}, indent=4),  # ensure_ascii: \u escapes
            # pid as a string, as an int in a string, negative; ts as int and as string; no ts; no pid
            {"ph": "X", "cat": "python_function", "name": "py", "pid": "Spans", "tid": "x", "ts": int(t), "dur": 1},
            {"ph": "X", "cat": "user_annotation", "name": "ua", "pid": str(host), "tid": 1, "ts": str(t), "dur": 1},
            {"ph": "i", "cat": "instant", "name": "neg", "pid": -3, "tid": 0, "ts": t, "s": "t"},
            {"ph": "X", "cat": "cpu_op", "name": "no ts", "pid": host, "tid": host, "dur": 1},
            {"ph": "X", "name": "no pid", "ts": t},
            # other key orders, async ids, bind_id, string flow ids, a second pid key inside args
            {"name": "order", "ph": "X", "pid": host, "tid": host, "ts": t, "cat": "cuda_runtime", "dur": 1},
            {"ph": "b", "cat": "async", "name": "a", "id": f"0x{j:x}", "pid": host, "tid": 1, "ts": t},
            {"ph": "e", "cat": "async", "name": "a", "id2": {"local": j}, "pid": host, "tid": 1, "ts": t + 1},
            {"ph": "X", "cat": "cpu_op", "name": "bound", "pid": host, "tid": host, "ts": t, "dur": 1, "bind_id": j},
            {"ph": "s", "id": 3, "pid": 6, "tid": 1, "ts": t, "cat": "kernel", "name": "a flow's cat makes a GPU"},
            {"ph": "s", "id": f"{j:x}", "pid": host, "tid": host, "ts": t, "cat": "ac2g", "name": "hexflow"},
            {"ph": "X", "cat": "cpu_op", "name": "inner pid", "pid": host, "tid": host, "ts": t, "dur": 1,
             "args": {"pid": 1, "ts": 2}},
            # an event-shaped object nested in an event without ph / pid / ts: must stay as it is
            {"name": "carrier", "args": {"list": [{"x": 1}, {"ph": "X", "cat": "kernel", "name": "n", "pid": gpu,
                                                            "tid": 1, "ts": 5.0}]}},
            # a process_labels event after the pid has been seen on the GPU (first-seen order matters)
            {"ph": "M", "name": "process_labels", "pid": 9, "tid": 0, "args": {"labels": "GPU 9"}},
            {"ph": "X", "cat": "kernel", "name": "k9", "pid": 9, "tid": 1, "ts": t, "dur": 1},
            # the inputs' own names (replaced by merge's) and a non-object element (dropped)
            {"ph": "M", "name": "process_sort_index", "pid": host, "tid": 0, "args": {"sort_index": 777777}},
            "17",
        ]
        if i % 3 == 0:  # one odd event every ~14 normal ones: most regions hold one odd event or none
            ev.append(odd_ev[(i // 3) % len(odd_ev)])
    return ev


def _expected(ev: dict, offset: float, k: int, n: int) -> dict:
    """`ev` as merge must write it, except its pid (checked separately)."""
    ev = dict(ev)
    ts = ev.get("ts")
    if isinstance(ts, (int, float, str)) and not isinstance(ts, bool):
        ev["ts"] = float(ts) + offset
    ph = ev.get("ph")

    def flow(x):
        if isinstance(x, str):
            x = int(x, 16)
        return x * n + k

    def uniq(x):
        return x * n + k if isinstance(x, int) else f"r{k}:{x}"

    if ph in ("s", "t", "f"):
        for key in ("id", "bind_id"):
            if key in ev:
                ev[key] = flow(ev[key])
    elif ph in ("b", "e", "n"):
        if "id" in ev:
            ev["id"] = uniq(ev["id"])
        if isinstance(ev.get("id2"), dict):
            ev["id2"] = {a: uniq(v) for a, v in ev["id2"].items()}
    elif "bind_id" in ev:
        ev["bind_id"] = flow(ev["bind_id"])
    return ev


def test_merge_of_odd_traces_follows_the_rules(monkeypatch):
    d = tmpdir("merge_odd")
    inputs = []
    for rank in range(3):  # three ranks, different base times (every ts is re-based), one gzip input
        events = _events(rank, odd=True)
        inputs.append((events, rank * 1_234.567))
        text = _kineto(events, BASE + rank * 1_234_567, {"distributedInfo": {"rank": rank}})
        p = d / f"r{rank}.pt.trace.json"
        if rank == 2:
            (d / (p.name + ".gz")).write_bytes(gzip.compress(text.encode()))
        else:
            p.write_text(text, encoding="utf-8")
    # small regions: the odd events sit in different regions of the fast path's splitter
    monkeypatch.setattr(M, "Source", lambda p, progress=False: Source(p, progress, chunk=1024))
    out = M.merge_traces(d, d.parent / "merge_odd_out.json")
    obj = json.loads(out.read_bytes())
    ev = obj["traceEvents"]
    ours = [e for e in ev if e.get("ph") == "M" and e.get("name") in ("process_name", "process_sort_index")]
    got = [e for e in ev if e not in ours]
    want, pid_in = [], []
    for k, (events, offset) in enumerate(inputs):
        for e in events:
            e = json.loads(e) if isinstance(e, str) else e
            if not isinstance(e, dict) or (e.get("ph") == "M" and e.get("name") in ("process_name", "process_sort_index")):
                continue
            want.append(_expected(e, offset, k, 3))
            pid_in.append((k, e.get("pid", "none")))
    assert len(got) == len(want)
    pid_map: dict = {}
    for g, w, key in zip(got, want, pid_in):
        assert {a: v for a, v in g.items() if a != "pid"} == {a: v for a, v in w.items() if a != "pid"}
        if key[1] == "none":
            assert "pid" not in g
        else:
            assert pid_map.setdefault(key, g["pid"]) == g["pid"] and isinstance(g["pid"], int)
    assert len(set(pid_map.values())) == len(pid_map)  # one new pid per (rank, pid): 4000 and "4000" differ
    assert pid_map[(0, 4000)] != pid_map[(0, "4000")]
    names = {e["pid"]: e["args"]["name"] for e in ours if e["name"] == "process_name"}
    assert set(names) == set(pid_map.values())
    assert len(ours) == 2 * len(names)  # one process_name + process_sort_index each; the inputs' own are gone
    assert not [e for e in ours if e["args"] == {"sort_index": 777777} or e["args"] == {"name": "python"}]
    assert names[pid_map[(0, 4000)]] == "rank0 host" and names[pid_map[(1, 0)]] == "rank1 GPU 0"
    assert names[pid_map[(0, -3)]] == "rank0 -3"
    assert names[pid_map[(1, 5)]] == "rank1 GPU 5"  # first seen by a flow, then by a kernel
    assert names[pid_map[(0, 6)]] == "rank0 GPU 6"  # seen only by a flow of a GPU category
    assert names[pid_map[(2, 9)]] == "rank2 GPU 9"  # its process_labels
    flows = [e["id"] for e in ev if e.get("ph") == "s" and e.get("name") == "ac2g"]
    assert len(flows) == 360 == len(set(flows))
    assert obj["moe_trace"]["base_time_ns"] == BASE


def test_damaged_inputs_give_one_trace_error(monkeypatch):
    d = tmpdir("merge_damaged")
    good = _kineto(_events(0, odd=False), BASE)
    cases = {
        "garbage": good[:3000] + "}}]]{{ not json" + good[3000:],
        "truncated": good[: len(good) // 2],
        "bad_number": good.replace('"dur": 1.5', '"dur": 1.5.5', 1),
        # NaN / Infinity (json.dumps writes them; strict parsers, orjson and ijson included, do not read them)
        "nan": good.replace('"dur": 2.0', '"dur": NaN', 1),
        "infinity": good.replace('"dur": 2.0', '"dur": -Infinity', 1),
    }
    monkeypatch.setattr(M, "Source", lambda p, progress=False: Source(p, progress, chunk=2048))
    for name, text in cases.items():
        sub = d / name
        sub.mkdir()
        (sub / "r0.pt.trace.json").write_text(text)
        (sub / "r1.pt.trace.json").write_text(good)
        with pytest.raises(TraceError, match="r0.pt.trace.json") as err:
            M.merge_traces(sub, d / f"{name}_out.json")
        assert "\n" not in str(err.value) and "}}]]" not in str(err.value)  # one line, no file bytes
        if name in ("nan", "infinity"):
            assert "NaN and Infinity are not JSON" in str(err.value)
        assert not (d / f"{name}_out.json").exists()
        assert not [p for p in d.iterdir() if ".tmp" in p.name or ".events" in p.name]  # no scratch left


def test_byte_path_benchmark_runs_and_checks_its_outputs(tmp_path, capsys):
    from benchmarks import merge_byte_path

    assert merge_byte_path.main(["--mb", "9", "--regions", "1"]) == 0
    assert "outputs equal" in capsys.readouterr().out
