"""TensorBoard plugin: every run with a moe-trace report is listed (issue 15, deliverable 4).

report.json of stats / timing runs, sweep results and comparisons are runs next to the kineto
traces; a report of the same run as a trace next to it is not a second run. Driven through the
plugin's HTTP routes (werkzeug test client, no socket)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.plugins import base_plugin  # noqa: E402
from werkzeug.test import Client  # noqa: E402

import moe_trace  # noqa: E402
from moe_trace.models import build_tiny_model, example_inputs  # noqa: E402
from tb_plugin import data as tbdata  # noqa: E402
from tb_plugin.plugin import MoeTracePlugin  # noqa: E402


def _profile(model, mode, **kw):
    with moe_trace.profile(model, mode=mode, **kw) as run, torch.no_grad():
        model.generate(**example_inputs(model, batch=2, prompt_len=6), max_new_tokens=3, min_new_tokens=3,
                       do_sample=False)
    return run


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from moe_trace.cli.main import main
    from moe_trace.experiments.sweep import run_sweep

    root = tmp_path_factory.mktemp("tb_runs")
    model = build_tiny_model("olmoe").eval()
    docs = {}
    for mode in ("stats", "timing"):
        rep = _profile(model, mode).report()
        rep.to_json(root / mode / "report.json")
        docs[mode] = rep
    kin = _profile(model, "kineto", logdir=root / "kineto")            # what `moe-trace demo` writes:
    kin.report().to_json(root / "kineto" / "report.json")              # a trace and the same run's report
    docs["kineto"] = kin
    other = _profile(model, "stats").report()                          # another run's report in that folder
    other.to_json(root / "mixed" / "report.json")
    mixed_kin = _profile(model, "kineto", logdir=root / "mixed")
    docs["mixed_report"], docs["mixed_kineto"] = other, mixed_kin
    twice = _profile(model, "stats").report()                          # two copies of one report: one run
    twice.to_json(root / "copies" / "report.json")
    twice.to_json(root / "copies" / "report.backup.json")
    docs["copies"] = twice
    docs["sweep"] = run_sweep(model, "top-k", [1, 2], repeats=1, warmup=0, max_new_tokens=2, out_dir=root / "sweep",
                              plots=False, progress=False)
    assert main(["compare", "--config", "base=model", "--config", "top1=topk:1", "--max-new-tokens", "2",
                 "--no-progress", "--warmup", "0", "--json", str(root / "cmp" / "compare.json")]) == 0
    (root / "cmp" / "notes.json").write_text('{"schema": "something/else", "x": 1}')  # not moe-trace's: ignored
    return root, docs


@pytest.fixture(scope="module")
def apps(tree):
    return MoeTracePlugin(base_plugin.TBContext(logdir=str(tree[0]))).get_plugin_apps()


def _get(apps, route, query=""):
    resp = Client(apps[route]).get(route + (f"?{query}" if query else ""))
    return resp.status_code, resp.get_data()


def _report(apps, name):
    code, body = _get(apps, "/report", "run=" + quote(name, safe=""))
    return code, json.loads(body)


def test_every_kind_of_run_is_listed(apps, tree):
    root, docs = tree
    code, body = _get(apps, "/runs")
    runs = {r["name"]: r for r in json.loads(body)["runs"]}
    rid = lambda r: r.report().run_id  # noqa: E731
    want = {"stats": "report", "timing": "report", "kineto": "moe", "sweep": "sweep", "cmp": "compare",
            "copies": "report", f"mixed@{rid(docs['mixed_kineto'])}": "moe", f"mixed@{docs['mixed_report'].run_id}": "report"}
    assert {n: r["kind"] for n, r in runs.items()} == want
    # a report next to a trace of the SAME run is not a second run: the trace (the richer source) is served
    code, p = _report(apps, "kineto")
    assert code == 200 and p["kind"] == "moe" and "step_timeline" in p and "source" not in p
    assert p["report"]["run_id"] == rid(docs["kineto"])


@pytest.mark.parametrize("mode", ["stats", "timing"])
def test_report_runs_serve_the_file(apps, tree, mode):
    root, docs = tree
    code, p = _report(apps, mode)
    assert code == 200 and p["kind"] == "report" and p["source"] == {"kind": "report", "file": "report.json"}
    assert p["report"] == json.loads((root / mode / "report.json").read_text())
    assert p["report"]["layers"][0]["expert_counts"] == docs[mode].to_dict()["layers"][0]["expert_counts"]
    assert "step_timeline" not in p                                     # no trace: no timeline
    timed = p["report"]["timing_source"] is not None
    assert timed == (mode == "timing")
    if timed:
        assert p["report"]["phases"]["decode"]["time_ms"]["experts_ms"] > 0
    # its JSON file is the run's download; nothing else of the folder is
    code, body = _get(apps, "/trace", f"run={mode}&file=report.json")
    assert code == 200 and body == (root / mode / "report.json").read_bytes()
    assert _get(apps, "/trace", f"run={mode}&file=layers.csv")[0] == 404


def test_several_runs_in_one_folder_each_listed(apps, tree):
    root, docs = tree
    code, p = _report(apps, f"mixed@{docs['mixed_report'].run_id}")
    assert code == 200 and p["kind"] == "report" and p["report"]["run_id"] == docs["mixed_report"].run_id
    code, q = _report(apps, f"mixed@{docs['mixed_kineto'].report().run_id}")
    assert code == 200 and q["kind"] == "moe" and q["report"]["run_id"] == docs["mixed_kineto"].report().run_id
    code, alias = _report(apps, "mixed")                               # the folder's own name: its trace run
    assert code == 200 and alias["report"]["run_id"] == q["report"]["run_id"]
    code, c = _report(apps, "copies")                                  # copies of one report: one run
    assert code == 200 and c["report"]["run_id"] == docs["copies"].run_id


def test_sweep_and_compare_runs(apps, tree):
    root, docs = tree
    code, p = _report(apps, "sweep")
    assert code == 200 and p["kind"] == "sweep" and "report" not in p
    assert p["sweep"]["summary"] == json.loads(json.dumps(docs["sweep"].summary))
    assert [r["k_mean_mean"] for r in p["sweep"]["summary"]] == [1.0, 2.0]   # top-k 1, 2: k = the knob
    code, c = _report(apps, "cmp")
    assert code == 200 and c["kind"] == "compare"
    doc = json.loads((root / "cmp" / "compare.json").read_text())
    assert c["compare"] == doc and doc["schema"] == "moe-trace/compare/1" and doc["baseline"] == "base"
    assert [x["config"] for x in doc["configs"]] == ["base", "top1"]
    top1 = doc["configs"][1]
    assert top1["k_mean"] == 1.0 and top1["selector"] == "topk:k=1"
    assert doc["configs"][0]["k_mean"] == 2.0 and top1["k_mean_vs_base"] == -1.0
    from moe_trace.experiments.benchmark import COMPARE_ROWS

    assert [(r["key"], r["label"], r["format"]) for r in doc["rows"]] == list(COMPARE_ROWS)


def _bad_dir(tmp_path, name, text: bytes):
    d = tmp_path / "logs" / "bad"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(text)
    return tmp_path / "logs"


SECRET = b"SECRET-BYTES-42"


@pytest.mark.parametrize("text,why", [
    (b'{"schema": "moe-trace/report/1", "run_id": "x-0", "model": {"name": "' + SECRET + b'"', "not valid JSON"),
    (b'{"schema": "moe-trace/report/1", "run_id": "x-0", "note": "' + SECRET + b'"}', "has no 'model'"),
    (b'{"schema": "moe-trace/sweep/1", "experiment": {}, "summary": {"' + SECRET + b'": 1}}', "has no 'summary'"),
    (b'{"schema": "moe-trace/compare/1", "configs": [' + b"[" * 50 + b"]" * 50 + b'], "rows": []}',
     None),  # odd but valid: served
    (b'{"schema": "moe-trace/compare/1", "configs": [' + b"[" * 5000 + b"]" * 5000 + b'], "rows": []}',
     "nests JSON too deeply"),
    (b'{"schema": "moe-trace/sweep/1", "experiment": {}, "summary": [{"total_ms_std": NaN}]}', None),
    (b'{"schema": "moe-trace/report/1", "model": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "too deeply"),
])
def test_damaged_json_runs_are_one_line_errors_without_file_bytes(tmp_path, text, why):
    logdir = _bad_dir(tmp_path, "report.json", text)
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(logdir))).get_plugin_apps()
    runs = json.loads(_get(apps, "/runs")[1])["runs"]
    assert [r["name"] for r in runs] == ["bad"]
    code, body = _get(apps, "/report", "run=bad")
    assert SECRET not in body
    p = json.loads(body)
    if why is None:
        assert code == 200 and p["kind"] in ("compare", "sweep")
        return
    assert code == 422 and why in p["error"] and "report.json" in p["error"] and "\n" not in p["error"]
    assert str(tmp_path) not in p["error"]                                # relative to the log dir


def test_oversized_json_is_refused_before_reading(tmp_path, monkeypatch):
    logdir = _bad_dir(tmp_path, "report.json", b'{"schema": "moe-trace/report/1", "run_id": "x-0", "model": {}, '
                      b'"phases": {}, "layers": [], "pad": "' + b"x" * 5000 + b'"}')
    monkeypatch.setattr(tbdata, "MAX_JSON_BYTES", 1000)
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(logdir))).get_plugin_apps()
    code, body = _get(apps, "/report", "run=bad")
    assert code == 422 and "over the" in json.loads(body)["error"]


def test_json_runs_keep_the_path_rules(tmp_path):
    """A report JSON linked from outside the log dir is neither listed nor read; a FIFO named
    report.json never blocks the scan; a link inside the log dir is served."""
    outside = tmp_path / "outside"
    outside.mkdir()
    model = build_tiny_model("olmoe").eval()
    rep = _profile(model, "stats").report()
    rep.to_json(outside / "report.json")
    logdir = tmp_path / "logs"
    (logdir / "out").mkdir(parents=True)
    os.symlink(outside / "report.json", logdir / "out" / "report.json")
    os.symlink(outside, logdir / "outdir")
    (logdir / "fifo").mkdir()
    os.mkfifo(logdir / "fifo" / "report.json")
    (logdir / "good").mkdir()
    rep.to_json(logdir / "good" / "report.json")
    (logdir / "in").mkdir()
    os.symlink(logdir / "good" / "report.json", logdir / "in" / "r.json")
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(logdir))).get_plugin_apps()
    names = [r["name"] for r in json.loads(_get(apps, "/runs")[1])["runs"]]
    assert names == ["good", "in"]
    assert _get(apps, "/report", "run=out")[0] == 404 and _get(apps, "/trace", "run=good&file=../outside/report.json")[0] == 404
    assert _report(apps, "in")[1]["report"]["run_id"] == rep.run_id


def test_report_json_changes_reload(tmp_path):
    model = build_tiny_model("olmoe").eval()
    logdir = tmp_path / "logs"
    a = _profile(model, "stats").report()
    a.to_json(logdir / "r" / "report.json")
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(logdir))).get_plugin_apps()
    assert _report(apps, "r")[1]["report"]["run_id"] == a.run_id
    b = _profile(model, "timing").report()
    b.to_json(logdir / "r" / "report.json")
    st = (logdir / "r" / "report.json").stat()
    os.utime(logdir / "r" / "report.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert _report(apps, "r")[1]["report"]["run_id"] == b.run_id


def test_compare_json_option_checked_before_the_runs(tmp_path, capsys):
    from moe_trace.cli.main import main

    (tmp_path / "file").write_text("x")
    assert main(["compare", "--config", "base=model", "--json", str(tmp_path / "file" / "c.json")]) == 2
    err = capsys.readouterr()
    assert "--json" in err.err and "compare on" not in err.out               # refused before any run


def test_what_the_demo_writes_is_one_run_per_mode(tmp_path, capsys):
    """`moe-trace demo` in each mode: stats / timing leave a report.json (a report run), kineto a trace
    and the same run's report.json (one run: the trace)."""
    from moe_trace.cli.main import main

    for mode in ("stats", "timing", "kineto"):
        assert main(["demo", "--mode", mode, "--logdir", str(tmp_path / mode), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert (tmp_path / "kineto" / "report.json").exists()
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(tmp_path))).get_plugin_apps()
    runs = {r["name"]: r["kind"] for r in json.loads(_get(apps, "/runs")[1])["runs"]}
    assert runs == {"stats": "report", "timing": "report", "kineto": "moe"}
    for mode in ("stats", "timing"):
        code, p = _report(apps, mode)
        assert code == 200 and p["report"]["settings"]["mode"] == mode
        assert (p["report"]["timing_source"] is not None) == (mode == "timing")


def test_profile_with_a_logdir_in_stats_and_timing_writes_a_listed_report(tmp_path):
    """`profile(model, "stats"/"timing", logdir=D)` writes `{worker}.{run_id}.report.json` (never
    replacing another run's), also when the body raises; TensorBoard lists each run with its counts."""
    model = build_tiny_model("olmoe").eval()
    d = tmp_path / "logs" / "direct"
    runs = [_profile(model, mode, logdir=d) for mode in ("stats", "timing", "stats")]
    files = [r.report_file for r in runs]
    assert len(set(files)) == 3 and all(f.parent == d and f.name.endswith(f"{r.run_id}.report.json")
                                        for f, r in zip(files, (r.report() for r in runs)))
    for f, r in zip(files, runs):
        assert json.loads(f.read_text()) == json.loads(r.report().to_json())
    with pytest.raises(RuntimeError):
        with moe_trace.profile(model, "stats", logdir=d) as failed, torch.no_grad():
            model(**example_inputs(model, batch=1, prompt_len=4))
            raise RuntimeError("the body failed")
    assert json.loads(failed.report_file.read_text())["settings"]["incomplete"] is True
    assert _profile(model, "stats").report_file is None                  # no logdir: nothing written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(moe_trace.errors.ConfigError, match="logdir"):    # checked before the work
        moe_trace.profile(model, "stats", logdir=tmp_path / "afile" / "sub").__enter__()
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(tmp_path / "logs"))).get_plugin_apps()
    listed = {r["name"]: r["kind"] for r in json.loads(_get(apps, "/runs")[1])["runs"]}
    want = {f"direct@{r.report().run_id}" for r in runs + [failed]}
    assert set(listed) == want and set(listed.values()) == {"report"}
    for r in runs:
        code, p = _report(apps, f"direct@{r.report().run_id}")
        assert code == 200 and p["report"]["layers"] == r.report().to_dict()["layers"]
