"""The MoE tab's "Timeline" view end to end: real `tensorboard --logdir` + headless Chromium, offline.

Every kind of trace the tests write (kineto full, slim, scheduled; a Kineto-shaped GPU trace full and
slim; a merged trace; the committed GPU traces under tests/data/) is opened in catapult's
trace_viewer_full.html (torch-tb-profiler's copy) with the webcomponents.js polyfill moe-trace ships.
Each imports with zero import warnings, and the model holds moe-trace's counters and MoE ranges.
Needs chromium and torch-tb-profiler (extra `tbprofiler`) or MOE_TRACE_TRACE_VIEWER pointing at a
trace_viewer_full.html; skipped without them, except in CI (CI=true).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tb_dashboard_bench", ROOT / "benchmarks" / "tb_dashboard_bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules.setdefault("tb_dashboard_bench", bench)
spec.loader.exec_module(bench)

from tb_plugin import timeline  # noqa: E402

POLYFILL_SHA256 = "3858273ab39b299e7c2227f0830534afafaabf4a572c9ea73c2076fecbd8978c"  # npm webcomponents.js@0.7.24


def _viewer() -> str | None:
    p = timeline.viewer_path()
    if p is None:  # the side venv of tests/test_peer_tools.py has torch-tb-profiler too
        exe = os.environ.get("MOE_TRACE_TOOLS_PYTHON")
        if exe:
            for cand in Path(exe).parent.parent.glob("lib/python*/site-packages/torch_tb_profiler/static/"
                                                            "trace_viewer_full.html"):
                return str(cand)
    return p


VIEWER = _viewer()
_missing = [w for w, ok in (("chromium", bench.find_chromium() is not None),
                            ("torch-tb-profiler's trace_viewer_full.html", VIEWER is not None)) if not ok]
if _missing and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    raise RuntimeError(f"CI=true but {', '.join(_missing)} missing (.ci/run installs both)")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(_missing), reason=f"{', '.join(_missing)} not installed "
                                                         "(apt-get install chromium; pip install moe-trace[tbprofiler])")]


def test_polyfill_is_the_npm_release_with_its_license():
    vendor = ROOT / "tb_plugin" / "static" / "vendor"
    assert hashlib.sha256((vendor / "webcomponents.min.js").read_bytes()).hexdigest() == POLYFILL_SHA256
    lic = (vendor / "LICENSE-webcomponents.txt").read_text()
    assert "BSD" in lic and "0.7.24" in lic and "Polymer Authors" in lic


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    import torch

    import moe_trace
    from moe_trace.models import build_tiny_model, example_inputs
    from moe_trace.trace import merge_traces, write_trace
    from tests.test_kineto_export import gpu_raw_with_ops
    from tests.test_trace_fixtures import make_run, synthetic_gpu_raw

    root = tmp_path_factory.mktemp("timeline_logdir")
    model = build_tiny_model("olmoe").eval()
    inputs = example_inputs(model)
    for name, kw in (("tiny_full", {"slim": False}), ("tiny_slim", {}),
                     ("tiny_sched", {"schedule": {"wait": 1, "warmup": 1, "active": 2}})):
        with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=root / name, **kw) as run:
            model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert run.trace_files
    raw = root / "raw_gpu.json.tmp"
    raw.write_text(json.dumps(gpu_raw_with_ops(), indent=2))
    run_data, steps = make_run(device="cuda:0")
    for slim in (False, True):
        write_trace(raw, run_data, steps, root / f"gpu_{'slim' if slim else 'full'}" / "host_4242.pt.trace.json.gz",
                    slim=slim)
    ranks = root / "ranks_tmp"
    for r in (0, 1):
        write_trace(synthetic_gpu_raw(seed=r, rank=r), run_data, steps, ranks / f"rank{r}_h_1.pt.trace.json.gz",
                    process={"dist_rank": r, "pid": 4242 + r, "hostname": "h"})
    merge_traces(ranks, root / "merged" / "merged.pt.trace.json.gz")
    shutil.rmtree(ranks)
    raw.unlink()
    data = ROOT / "tests" / "data"
    for p in sorted(data.glob("gpu_*.pt.trace.json.gz")) if data.is_dir() else []:
        d = root / p.name.split(".")[0]
        d.mkdir()
        shutil.copy(p, d / p.name)
    return root


@pytest.fixture(scope="module")
def tb(logdir):
    old = os.environ.get(timeline.VIEWER_ENV)
    os.environ[timeline.VIEWER_ENV] = VIEWER
    try:
        with bench.TensorBoardProcess(logdir) as proc:
            yield proc
    finally:
        if old is None:
            os.environ.pop(timeline.VIEWER_ENV, None)
        else:
            os.environ[timeline.VIEWER_ENV] = old


@pytest.fixture(scope="module")
def browser():
    with bench.Chromium(watch=True) as b:
        yield b


def _runs(logdir: Path) -> list[str]:
    return sorted(p.name for p in logdir.iterdir() if p.is_dir())


def test_every_trace_imports_without_warnings_and_shows_counters_and_ranges(tb, browser, logdir):
    names = _runs(logdir)
    assert {"tiny_full", "tiny_slim", "tiny_sched", "gpu_full", "gpu_slim", "merged"} <= set(names)
    for name in names:
        page = browser.new_page()
        page.navigate(f"{tb.url}/data/plugin/moe_trace/timeline?run={name}")
        page.wait_for("window.moeTimeline && window.moeTimeline.state !== 'loading'", timeout=120)
        got = json.loads(page.eval("JSON.stringify(window.moeTimeline)"))
        assert got["state"] == "done", (name, got["error"])
        assert got["warnings"] == [], (name, got["warnings"][:5])
        assert any(c.startswith("moe_trace/L000 expert_tokens") for c in got["counters"]), (name, got["counters"][:9])
        assert any(c.startswith("moe_trace/L000 k_mean") for c in got["counters"]), name
        assert any(s.endswith("/L000/experts") for s in got["slices"]), (name, got["slices"][:9])
        assert any(s.startswith("moe_trace/prefill") for s in got["slices"]) or name == "tiny_sched", name
        urls = [u for u in page.requested_urls() if u.startswith(("http:", "https:", "ws:", "wss:"))]
        assert urls and all(u.startswith(tb.url + "/") for u in urls), [u for u in urls if not u.startswith(tb.url)]
        if name == names[0]:  # the same importer does warn on a trace it cannot place (so the check can fail)
            n = page.eval("""(async () => { const m = new tr.Model(); const o = new tr.importer.ImportOptions();
              o.showImportWarnings = false; await new tr.importer.Import(m, o).importTracesWithProgressDialog(
              [JSON.stringify({traceEvents: [{ph: "E", ts: 1, pid: 1, tid: 1, name: "x"},
                                             {ph: "C", ts: 2, pid: 1, name: "c", args: {v: "high"}}]})]);
              return m.importWarnings.length; })()""", timeout=60)
            assert n > 0
        page.close()


def test_dashboard_has_a_timeline_link(tb, browser):
    page = browser.new_page()
    page.navigate(bench.plugin_url(tb.url, "tiny_slim"))
    page.wait_for(bench.PAINTED, timeout=90)
    page.wait_for("!!document.getElementById('moe-timeline')", timeout=30)
    href = page.eval("document.getElementById('moe-timeline').getAttribute('href')")
    assert href == "timeline?run=tiny_slim"
    assert page.eval("document.getElementById('moe-timeline').getAttribute('aria-disabled')") is None
    page.close()


def test_bad_runs_and_files_are_refused(tb):
    assert tb.get("/data/plugin/moe_trace/timeline_trace?run=nope")[0] == 404
    assert tb.get("/data/plugin/moe_trace/timeline_trace?run=../etc")[0] in (400, 404)
    code, body = tb.get("/data/plugin/moe_trace/timeline_trace?run=tiny_slim")
    assert code == 200 and len(json.loads(body)["files"]) == 1
    assert tb.get("/data/plugin/moe_trace/timeline_trace?run=tiny_slim&file=1")[0] == 404
    assert tb.get("/data/plugin/moe_trace/timeline_trace?run=tiny_slim&file=x")[0] == 404
    code, body = tb.get("/data/plugin/moe_trace/timeline_info")
    assert code == 200 and json.loads(body)["available"] is True
