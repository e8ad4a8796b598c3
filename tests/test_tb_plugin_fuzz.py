"""Fuzz of the TensorBoard plugin's routes and run scanner: traversal, symlinks in and out, odd run
names, damaged and half-written files, FIFOs. Bounded (a fixed seed, a few hundred requests, a time
limit), in-process through werkzeug's test client (no socket; the served test binds 127.0.0.1 only)."""
from __future__ import annotations

import builtins
import gzip
import json
import os
import random
import time
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("tensorboard")
from tensorboard.plugins import base_plugin  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from moe_trace.trace.writer import write_run_traces  # noqa: E402
from tb_plugin.plugin import MoeTracePlugin  # noqa: E402
from tests.test_tb_plugin import bench, small_run  # noqa: E402

SECRET = "TOPSECRET-0xC0FFEE"
ODD = ["back\\slash", "new\nline", "~tilde", "sp ace", "uni\u2713", "at@sign", "pct%2e%2e", "C:drive", "-dash"]


def _write(run_dir: Path, seed: int, run_id: str | None = None, pid: int = 4242, name: str = "m") -> Path:
    run = small_run(seed, name=name)
    if run_id is None:
        return bench.write_run(run_dir, run, worker=f"host_{pid}", pid=pid)
    run.run_id = run_id
    raw, steps = bench.synthetic_kineto(run, host_pid=pid)
    (path,) = write_run_traces([raw], run, steps, run_dir, process={"hostname": "host", "pid": pid, "run_id": run_id})
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    outside, logdir = base / "outside", base / "logdir"
    # outside the log dir: a valid trace whose model name and bytes must never be served
    secret = _write(outside / "s", 9, name=SECRET)
    (outside / "s" / "raw.txt").write_text(SECRET * 100)
    good = _write(logdir / "good", 0)
    _write(logdir / "multi", 1, run_id="aaaa11112222-0", pid=1)
    _write(logdir / "multi", 2, run_id="bbbb33334444-0", pid=2)
    for i, name in enumerate(ODD):
        _write(logdir / name, 3 + i)
    # symlinks out: a directory, a file, a file inside an otherwise good run
    os.symlink(outside / "s", logdir / "linkdir")
    (logdir / "linkfile").mkdir()
    os.symlink(secret, logdir / "linkfile" / "w.pt.trace.json.gz")
    os.symlink(secret, logdir / "good" / "zz_out.pt.trace.json.gz")
    os.symlink(outside / "s" / "raw.txt", logdir / "good" / "zz_txt.pt.trace.json")
    # symlink in: a file pointing at another run's file inside the log dir is fine
    (logdir / "linkin").mkdir()
    os.symlink(good, logdir / "linkin" / "w.pt.trace.json.gz")
    # damaged, half-written, hostile, special files
    (logdir / "damaged").mkdir()
    (logdir / "damaged" / "a.pt.trace.json").write_text('{"moe_trace": {"run": {"layers": {}}}, ' + f'"x": "{SECRET}", '
                                                        + '"traceEvents": []}')
    (logdir / "garbage").mkdir()
    (logdir / "garbage" / "a.pt.trace.json.gz").write_bytes(b"\x1f\x8b" + SECRET.encode() * 10)
    (logdir / "writing").mkdir()
    full = gzip.decompress(good.read_bytes())
    (logdir / "writing" / "w.pt.trace.json.gz").write_bytes(gzip.compress(full)[: len(full) // 7])
    (logdir / "writing" / ".w2.pt.trace.json.gz.tmp77.1").write_bytes(b"{")  # a writer's temporary file
    (logdir / "deep").mkdir()
    (logdir / "deep" / "d.pt.trace.json").write_bytes(b'{"traceEvents": [' + b"[" * 300_000 + b"]" * 300_000 + b"]}")
    (logdir / "fifo").mkdir()
    os.mkfifo(logdir / "fifo" / "f.pt.trace.json")  # reading it would block forever
    (logdir / "dangling").mkdir()
    os.symlink(base / "nowhere", logdir / "dangling" / "x.pt.trace.json")
    # report / sweep / compare JSON runs (issue 15): good ones, links out, damaged, hostile, a FIFO
    report = _report_doc("fuzzmodel")
    (outside / "s" / "report.json").write_text(json.dumps(dict(report, model=dict(report["model"], name=SECRET))))
    (logdir / "rep").mkdir()
    (logdir / "rep" / "report.json").write_text(json.dumps(report))
    (logdir / "rep" / "sweep_top_k.json").write_text(json.dumps({"schema": "moe-trace/sweep/1", "experiment": {"knob": "top-k"},
                                                                 "summary": [{"value": 1, "k_mean_mean": 1.0}]}))
    (logdir / "rep" / "compare.json").write_text(json.dumps({"schema": "moe-trace/compare/1", "configs": [{"config": "a"}],
                                                             "rows": []}))
    (logdir / "replink").mkdir()
    os.symlink(outside / "s" / "report.json", logdir / "replink" / "report.json")
    os.symlink(outside / "s" / "report.json", logdir / "rep" / "zz_out.json")
    (logdir / "repbad").mkdir()
    (logdir / "repbad" / "report.json").write_text('{"schema": "moe-trace/report/1", "run_id": "r-1", "model": {"x": "'
                                                   + SECRET + '"}, "phases": ')
    (logdir / "repbad" / "sweep.json").write_text('{"schema": "moe-trace/sweep/1", "summary": "' + SECRET + '"}')
    (logdir / "repfifo").mkdir()
    os.mkfifo(logdir / "repfifo" / "report.json")
    (logdir / "good" / "report.json").write_text(json.dumps(dict(report, run_id="zzzz99998888-0")))
    return base, logdir


def _report_doc(name: str) -> dict:
    import moe_trace
    from moe_trace.models import build_tiny_model, example_inputs

    model = build_tiny_model("olmoe").eval()
    with moe_trace.profile(model, "stats") as run:
        model(**{k: v for k, v in example_inputs(model, batch=1, prompt_len=4).items()})
    d = run.report().to_dict()
    return json.loads(json.dumps(dict(d, model=dict(d["model"], name=name)), default=str))


def _get(app, route, query=""):
    resp = Client(app).get(route + (f"?{query}" if query else ""))
    return resp.status_code, resp.get_data()


def test_routes_and_scanner_fuzz(tree, monkeypatch):
    base, logdir = tree
    root = os.path.realpath(logdir)
    opened: list[str] = []
    real_open = builtins.open

    def tracking_open(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", tracking_open)
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(logdir))).get_plugin_apps()
    t0 = time.perf_counter()
    code, body = _get(apps["/runs"], "/runs")
    assert code == 200
    listing = json.loads(body)
    names = [r["name"] for r in listing["runs"]] + listing["plain_runs"]
    # every run of a folder is listed as its own run; odd names are listed; links out and FIFOs are not
    assert "multi@aaaa11112222-0" in names and "multi@bbbb33334444-0" in names and "multi" not in names
    for name in ODD:
        assert name in names, name
    assert "linkdir" not in names and "linkfile" not in names and "fifo" not in names
    assert {"good", "linkin", "damaged", "garbage", "writing", "deep"} - {"good"} <= set(names)
    # JSON runs: each document of a folder listed; links out and a FIFO are not; damaged ones are (as errors)
    assert {"rep@compare", "rep@sweep_top_k", "repbad@r-1", "repbad@sweep"} <= set(names), names
    assert not [n for n in names if n.startswith(("replink", "repfifo"))] and "rep@zz_out" not in names
    assert "good@zzzz99998888-0" in names  # a report of another run next to a trace: its own run
    for name in ("repbad@r-1", "repbad@sweep"):
        code, body = _get(apps["/report"], "/report", "run=" + quote(name, safe=""))
        assert code == 422 and "TraceError" in json.loads(body)["error"], body
    # every listed name is served (never 400): 200 for good runs, 422 with a one-sentence error otherwise
    for name in names:
        code, body = _get(apps["/report"], "/report", "run=" + quote(name, safe=""))
        assert code in (200, 422), (name, code, body[:200])
        assert SECRET.encode() not in body, name
        payload = json.loads(body)
        assert payload["run"] == name
        if code == 422:
            assert "\n" not in payload["error"] and len(payload["error"]) < 600, payload["error"]
    good_name = next(n for n in names if n.startswith("good@") and "zzzz" not in n)
    assert json.loads(_get(apps["/report"], "/report", "run=" + quote(good_name, safe=""))[1])["report"]["totals"]["tokens"] > 0
    assert json.loads(_get(apps["/report"], "/report", "run=good")[1])["report"]["totals"]["tokens"] > 0
    assert json.loads(_get(apps["/report"], "/report", "run=linkin")[1])["report"]  # symlink in: served
    two = [json.loads(_get(apps["/report"], "/report", "run=" + quote(f"multi@{r}", safe=""))[1])
           for r in ("aaaa11112222-0", "bbbb33334444-0")]
    assert two[0]["report"]["run_id"] == "aaaa11112222-0" and two[1]["report"]["run_id"] == "bbbb33334444-0"
    assert two[0]["report"]["totals"] == json.loads(_get(apps["/report"], "/report", "run=good")[1])["report"][
        "totals"]  # each run alone (same shape of run), not the sum of both
    # random requests: traversal, encodings, junk, and near-misses of real names
    rng = random.Random(12)
    attacks = ["..", "../..", "../outside/s", "/etc/passwd", str(base / "outside" / "s"), "linkdir", "linkfile",
               "good/../../outside/s", "good/zz_out.pt.trace.json.gz", "%2e%2e%2f", "good\x00", "good/", "./good",
               "multi@../../outside", "multi@", "@", "." * 3, "\\..\\..", "good@zz", "fifo", "dangling", ""]
    alphabet = "ab./\\@%~:\n\x01\u2713" + "".join(chr(rng.randrange(32, 127)) for _ in range(20))
    for i in range(300):
        r = rng.random()
        if r < 0.4:
            name = rng.choice(attacks)
        elif r < 0.7:
            name = rng.choice(names) + rng.choice(["", "/..", "@x", "/", "\x00", "/../good"])
        else:
            name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        query = rng.choice(["run=" + quote(name, safe=""), "run=" + quote(name, safe="") + "&run=good", "x=1", ""])
        route = rng.choice(["/report", "/report", "/runs", "/trace"])
        if route == "/trace":  # downloads: a listed run with file names near the real ones, or junk
            f = rng.choice(["report.json", "zz_out.json", "../s/report.json", "compare.json", "w.pt.trace.json.gz",
                            "zz_out.pt.trace.json.gz", "/etc/passwd", "..", "", "sweep_top_k.json", "raw.txt"])
            query = "run=" + quote(rng.choice(names + attacks), safe="") + "&file=" + quote(f, safe="")
        code, body = _get(apps[route], route, query)
        assert code in (200, 400, 404, 422), (route, query, code)
        assert SECRET.encode() not in body, (route, query)
        if route != "/trace" or code != 200:
            json.loads(body)
        assert time.perf_counter() - t0 < 60, "fuzz took too long"
    # nothing outside the log dir was ever opened (symlinks included), and no file bytes were echoed
    outside = [p for p in opened if not (p == root or p.startswith(root + os.sep))
               and not p.startswith(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
    assert not [p for p in outside if p.startswith(str(base))], outside
