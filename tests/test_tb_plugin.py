"""The TensorBoard plugin's backend: routes (werkzeug test client), run discovery, path safety, bad
traces, caching and concurrency. Fast: synthetic runs written with moe_trace.trace.write_trace."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend import application  # noqa: E402
from tensorboard.plugins import base_plugin  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from moe_trace.trace import analyze  # noqa: E402
from tb_plugin import data as tbdata  # noqa: E402
from tb_plugin.plugin import PLUGIN_NAME, MoeTracePlugin, plotly_js_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("tb_dashboard_bench", ROOT / "benchmarks" / "tb_dashboard_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tb_dashboard_bench", mod)
    spec.loader.exec_module(mod)
    return mod


bench = _bench()

LAYERS, EXPERTS = 4, 8


def small_run(seed=0, **kw):
    kw.setdefault("num_layers", LAYERS)
    kw.setdefault("num_experts", EXPERTS)
    kw.setdefault("top_k", 2)
    kw.setdefault("prompt_tokens", 32)
    kw.setdefault("decode_steps", 3)
    return bench.make_run_data(seed=seed, **kw)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """a/ and nested/b/ (good runs), bad/ (truncated trace), plain/ (torch trace, no moe_trace key),
    empty/ (no traces), notes.txt."""
    root = tmp_path_factory.mktemp("logdir")
    bench.write_run(root / "a", small_run(0, name="run-a"))
    bench.write_run(root / "nested" / "b", small_run(1, name="run-b", num_layers=3))
    full = gzip.decompress(bench.write_run(root / "bad", small_run(2)).read_bytes())
    (root / "bad" / "host_4242.pt.trace.json.gz").write_bytes(gzip.compress(full[: len(full) // 2]))
    (root / "plain").mkdir()
    (root / "plain" / "w.pt.trace.json").write_text(json.dumps(
        {"schemaVersion": 1, "traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1,
                                              "ts": 0, "dur": 5}]}))
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a trace")
    return root


def make_plugin(logdir):
    return MoeTracePlugin(base_plugin.TBContext(logdir=str(logdir) if logdir else None))


@pytest.fixture(scope="module")
def plugin(logdir):
    return make_plugin(logdir)


@pytest.fixture(scope="module")
def apps(plugin):
    return plugin.get_plugin_apps()


def get(apps, route, query="", headers=None):
    resp = Client(apps[route]).get(route + (f"?{query}" if query else ""), headers=headers or {})
    return resp


def get_json(apps, route, query=""):
    resp = get(apps, route, query)
    return resp.status_code, json.loads(resp.get_data())


# -- registration ----------------------------------------------------------------------------------

def test_plugin_metadata():
    assert MoeTracePlugin.plugin_name == PLUGIN_NAME == "moe_trace"
    meta = make_plugin(None).frontend_metadata()
    assert meta.es_module_path == "/index.js"
    assert meta.tab_name == "MoE"
    assert meta.element_name is None


def test_entry_point_declared_and_loadable():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    value = project["entry-points"]["tensorboard_plugins"]["moe_trace"]
    assert value == "tb_plugin.plugin:MoeTracePlugin"
    mod, attr = value.split(":")
    assert getattr(importlib.import_module(mod), attr) is MoeTracePlugin
    assert issubclass(MoeTracePlugin, base_plugin.TBPlugin)


def test_routes(apps):
    assert set(apps) == {"/index.js", "/style.css", "/plotly.min.js", "/runs", "/report", "/trace", "/timeline",
                         "/timeline_info", "/timeline_link.js", "/timeline_trace", "/trace_viewer_full.html",
                         "/webcomponents.min.js"}


def test_plugin_entry_page_through_tensorboard(plugin):
    """TensorBoard's own app lists the plugin as an iframe tab and serves its entry page."""
    app = application.TensorBoardWSGI([plugin])
    c = Client(app)
    listing = json.loads(c.get("/data/plugins_listing").get_data())
    assert listing["moe_trace"]["enabled"] is True
    assert listing["moe_trace"]["tab_name"] == "MoE"
    assert listing["moe_trace"]["loading_mechanism"]["type"] == "IFRAME"
    page = c.get("/data/plugin_entry.html?name=moe_trace").get_data(as_text=True)
    assert 'import("./index.js")' in page and 'href="plugin/moe_trace/"' in page
    assert c.get("/data/plugin/moe_trace/index.js").status_code == 200


# -- is_active ------------------------------------------------------------------------------------

def test_is_active(logdir, tmp_path):
    assert make_plugin(logdir).is_active() is True
    assert make_plugin(tmp_path).is_active() is False          # a log dir without traces
    assert make_plugin(tmp_path / "missing").is_active() is False
    assert make_plugin(None).is_active() is False


def test_is_active_is_cheap(tmp_path):
    for i in range(300):  # a log dir with many ordinary files and one trace deep down
        (tmp_path / f"d{i % 30}").mkdir(exist_ok=True)
        (tmp_path / f"d{i % 30}" / f"events.out.tfevents.{i}").write_bytes(b"x")
    p = make_plugin(tmp_path)
    assert p.is_active() is False
    deep = tmp_path / "d7" / "x" / "y"
    deep.mkdir(parents=True)
    (deep / "w.pt.trace.json.gz").write_bytes(b"")
    p = make_plugin(tmp_path)
    t = time.perf_counter()
    assert p.is_active() is True
    for _ in range(100):  # later calls come from the cache
        p.is_active()
    assert time.perf_counter() - t < 0.5


# -- runs and reports ----------------------------------------------------------------------------

def test_runs_listing(apps):
    code, body = get_json(apps, "/runs")
    assert code == 200
    assert [r["name"] for r in body["runs"]] == ["a", "bad", "nested/b"]
    assert body["plain_runs"] == ["plain"]
    a = body["runs"][0]
    assert a["files"] == 1 and a["bytes"] > 0 and a["kind"] == "moe"


def test_report_matches_analyze(apps, logdir):
    code, body = get_json(apps, "/report", "run=a")
    assert code == 200 and body["run"] == "a"
    expected = json.loads(json.dumps(analyze(logdir / "a").to_dict()))
    assert body["report"] == expected
    rep = body["report"]
    assert rep["model"]["num_moe_layers"] == LAYERS and rep["model"]["num_experts"] == EXPERTS
    assert len(rep["layers"]) == LAYERS and len(rep["layers"][0]["expert_counts"]) == EXPERTS
    assert rep["timing_source"] == "kineto_gpu" and {d["device"] for d in rep["devices"]} == {"cuda:0", "cuda:1"}


def test_nested_run_is_its_own(apps):
    code, body = get_json(apps, "/report", "run=" + quote("nested/b", safe=""))
    assert code == 200 and body["report"]["model"]["num_moe_layers"] == 3


def test_parent_run_does_not_fold_in_subdir_runs(tmp_path):
    bench.write_run(tmp_path, small_run(0, num_layers=2))
    bench.write_run(tmp_path / "child", small_run(1, num_layers=5))
    apps = make_plugin(tmp_path).get_plugin_apps()
    assert [r["name"] for r in get_json(apps, "/runs")[1]["runs"]] == [".", "child"]
    assert get_json(apps, "/report", "run=.")[1]["report"]["model"]["num_moe_layers"] == 2
    assert get_json(apps, "/report", "run=child")[1]["report"]["model"]["num_moe_layers"] == 5


def test_report_is_gzipped_when_accepted(apps):
    resp = get(apps, "/report", "run=a", headers={"Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(resp.get_data()))["run"] == "a"


# -- safety -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "../../etc", "..", "../", "/etc", "/etc/passwd", "a/../../etc", "a/..", "./a", "a//b", "~root",
    "C:\\Windows", "..\\..\\etc", "a\x00b", "", "nested/b/../../..", "%2e%2e/etc",
])
def test_bad_run_names_are_4xx(apps, name):
    code, body = get_json(apps, "/report", "run=" + quote(name, safe=""))
    assert 400 <= code < 500, name
    assert "error" in body and "report" not in body


def test_missing_run_param_is_400(apps):
    assert get(apps, "/report").status_code == 400


def test_unknown_and_non_run_dirs_are_404(apps):
    for name in ("nope", "empty", "nested", "plain/x", "notes.txt"):
        code, body = get_json(apps, "/report", "run=" + quote(name, safe=""))
        assert code == 404 and body["error"] == "no such run", name


def test_symlinks_out_of_logdir_are_not_followed(tmp_path):
    outside = tmp_path / "outside"
    bench.write_run(outside / "secret", small_run(0))
    logdir = tmp_path / "logdir"
    logdir.mkdir()
    bench.write_run(logdir / "ok", small_run(1))
    os.symlink(outside / "secret", logdir / "linkdir")                  # a symlinked run directory
    (logdir / "ok2").mkdir()
    os.symlink(outside / "secret" / "host_4242.pt.trace.json.gz", logdir / "ok2" / "w.pt.trace.json.gz")
    apps = make_plugin(logdir).get_plugin_apps()
    names = [r["name"] for r in get_json(apps, "/runs")[1]["runs"]]
    assert "linkdir" not in names
    assert get_json(apps, "/report", "run=linkdir")[0] == 404
    # ok2 holds only a symlink pointing outside: its file is ignored, so no data leaks
    code, body = get_json(apps, "/report", "run=ok2")
    assert "report" not in body and code in (404, 422)


def test_check_run_name():
    assert tbdata.check_run_name("a/b-c_d.e") == "a/b-c_d.e"
    assert tbdata.check_run_name(".") == "."
    for bad in (None, 3, "", "x" * 2000, "a/./b", "a\x00b", "/etc", "a//b", "../x"):
        with pytest.raises(tbdata.RunNameError):
            tbdata.check_run_name(bad)
    for odd in ("a\nb", "a\\b", "~root", "C:x", "r@run1"):  # names a directory can have: served as listed
        assert tbdata.check_run_name(odd) == odd


# -- bad traces ----------------------------------------------------------------------------------------

def test_bad_trace_is_an_error_for_that_run_only(apps):
    code, body = get_json(apps, "/report", "run=bad")
    assert code == 422
    assert "truncated" in body["error"] or "JSON" in body["error"]
    assert str(Path("/")) + "tmp" not in body["error"]  # no server paths
    runs = {r["name"]: r for r in get_json(apps, "/runs")[1]["runs"]}
    assert runs["bad"]["status"] == "error" and runs["a"]["status"] in ("ok", "unloaded")
    assert get_json(apps, "/report", "run=a")[0] == 200


@pytest.mark.parametrize("content", [b"", b"{", b"not json at all", b'{"traceEvents": []}', b"\x1f\x8b\x08garbage"])
def test_garbage_traces(tmp_path, content):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "w.pt.trace.json").write_bytes(content)
    apps = make_plugin(tmp_path).get_plugin_apps()
    code, body = get_json(apps, "/report", "run=r")
    assert code == 422 and body["error"]


def test_half_written_then_complete(tmp_path):
    good = bench.write_run(tmp_path / "src", small_run(0))
    raw = gzip.decompress(good.read_bytes())
    run = tmp_path / "logdir" / "live"
    run.mkdir(parents=True)
    target = run / "host.pt.trace.json"
    target.write_bytes(raw[: len(raw) // 3])
    apps = make_plugin(tmp_path / "logdir").get_plugin_apps()
    code, body = get_json(apps, "/report", "run=live")
    assert code == 422
    target.write_bytes(raw)  # the writer finished: size and mtime change, the cache reloads
    code, body = get_json(apps, "/report", "run=live")
    assert code == 200 and body["report"]["model"]["num_moe_layers"] == LAYERS


# -- caching --------------------------------------------------------------------------------------------

def test_cache_reloads_only_when_files_change(tmp_path):
    bench.write_run(tmp_path / "r", small_run(0))
    calls = []

    def provider(run_dir):
        calls.append(run_dir)
        return tbdata.default_provider(run_dir)

    store = tbdata.RunStore(str(tmp_path), provider=provider)
    e1 = store.get("r")
    e2 = store.get("r")
    assert e1 is e2 and len(calls) == 1
    path = tmp_path / "r" / "host_4242.pt.trace.json.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    e3 = store.get("r")
    assert e3 is not e1 and len(calls) == 2
    tokens = e3.report["totals"]["tokens"]
    second = bench.write_run(tmp_path / "r", small_run(5), worker="host_2", pid=2)  # another run's file appears
    os.utime(second, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # and it is the newest
    store.refresh(force=True)
    # two runs (old files without a run id, no rank: one run per process): listed apart, never added up
    assert store.run_names() == ["r@host_2", "r@host_4242"]
    e4 = store.get("r@host_2")
    assert len(calls) == 3 and e4.report["totals"]["tokens"] == analyze(second).to_dict()["totals"]["tokens"] == tokens
    assert store.get("r").report == e4.report  # the directory's name: its newest run


def test_new_runs_are_discovered(tmp_path):
    apps = make_plugin(tmp_path).get_plugin_apps()
    assert get_json(apps, "/runs")[1]["runs"] == []
    bench.write_run(tmp_path / "later", small_run(0))
    # an unknown name forces a rescan, so a fresh run is served at once
    assert get_json(apps, "/report", "run=later")[0] == 200


def test_concurrent_requests_load_once(tmp_path):
    bench.write_run(tmp_path / "r", small_run(0))
    calls = []
    gate = threading.Event()

    def slow(run_dir):
        calls.append(1)
        gate.wait(2)
        return tbdata.default_provider(run_dir)

    store = tbdata.RunStore(str(tmp_path), provider=slow)
    with ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(store.get, "r") for _ in range(8)]
        time.sleep(0.2)
        gate.set()
        entries = [f.result() for f in futs]
    assert len(calls) == 1 and all(e is entries[0] for e in entries)


# -- static assets -------------------------------------------------------------------------------------

def test_static_assets(apps):
    js = get(apps, "/index.js")
    assert js.status_code == 200 and js.mimetype == "application/javascript"
    assert re.search(rb"export\s+async\s+function\s+render\s*\(", js.get_data())
    css = get(apps, "/style.css")
    assert css.status_code == 200 and css.mimetype == "text/css"


def test_plotly_served_from_installed_package(apps):
    resp = get(apps, "/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert resp.status_code == 200 and resp.mimetype == "application/javascript"
    assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(resp.get_data()) == Path(plotly_js_path()).read_bytes()
    plain = get(apps, "/plotly.min.js")
    assert plain.get_data() == Path(plotly_js_path()).read_bytes()
    assert "max-age" in resp.headers.get("Cache-Control", "")


def test_no_network_urls_in_frontend():
    static = ROOT / "tb_plugin" / "static"
    for f in static.iterdir():
        if f.is_dir():
            continue  # vendor/: third-party files shipped as released (tests/test_tb_timeline_e2e.py)
        text = f.read_text()
        # no CDN, no web fonts, no absolute URLs of any kind
        assert not re.search(r"https?://|//cdn|googleapis|gstatic|@import|url\(", text), f.name
    js = (static / "index.js").read_text()
    fetched = set(re.findall(r'(?:src|href) = "([^"]+)"|getJson\(`?"?([a-z]+)', js))
    assert fetched  # relative names only: resolved against the plugin's own route prefix


# -- under load ----------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_50_concurrent_requests(plugin):
    """TensorBoard's WSGI app with the plugin, served threaded by werkzeug on localhost; 50 clients."""
    import http.client

    app = application.TensorBoardWSGI([plugin])
    server = make_server("127.0.0.1", _free_port(), app, threaded=True)
    port = server.server_port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    cases = [("/data/plugin/moe_trace/report?run=a", 200), ("/data/plugin/moe_trace/runs", 200),
             ("/data/plugin/moe_trace/report?run=bad", 422),
             ("/data/plugin/moe_trace/report?run=" + quote("../../etc/passwd", safe=""), 400),
             ("/data/plugin/moe_trace/report?run=nope", 404), ("/data/plugin/moe_trace/index.js", 200),
             ("/data/plugin/moe_trace/report?run=" + quote("nested/b", safe=""), 200)]

    def one(i):
        path, want = cases[i % len(cases)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
            r = conn.getresponse()
            body = r.read()
            if r.getheader("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if path.endswith("runs") or "report" in path:
                json.loads(body)
            return r.status == want
        finally:
            conn.close()

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(50) as ex:
            results = list(ex.map(one, range(250)))
        elapsed = time.perf_counter() - t
    finally:
        server.shutdown()
        thread.join(5)
    assert all(results), f"{results.count(False)} of {len(results)} requests failed"
    assert elapsed < 20
