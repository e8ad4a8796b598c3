"""End to end: real `tensorboard --logdir` on localhost + headless Chromium (DevTools over a pipe).

The log dir holds a run recorded with `moe_trace.profile(mode="kineto")` on a tiny model, a larger
synthetic run, and a broken one. Screenshots land in the test's tmp dir.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tb_dashboard_bench", ROOT / "benchmarks" / "tb_dashboard_bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules.setdefault("tb_dashboard_bench", bench)
spec.loader.exec_module(bench)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bench.find_chromium() is None,
                       reason="headless Chromium not installed (apt-get install chromium); .ci/run installs it"),
]

SYN_LAYERS, SYN_EXPERTS = 12, 32


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    import moe_trace
    from moe_trace.models import build_tiny_model, example_inputs

    root = tmp_path_factory.mktemp("tb_logdir")
    model = build_tiny_model("olmoe")
    inputs = example_inputs(model)
    with moe_trace.profile(model, mode="kineto", logdir=str(root / "tiny_olmoe")) as run:
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert run.trace_files  # written in the background: wait before TensorBoard scans the logdir
    bench.write_run(root / "synthetic", bench.make_run_data(SYN_LAYERS, SYN_EXPERTS, 4, name="synthetic"))
    bench.write_run(root / "untimed", bench.make_run_data(4, 8, 2, prompt_tokens=16, decode_steps=2, timed=False))
    # issue 15: a report.json next to the trace of the same run (what `moe-trace demo` writes) is not a
    # second run; a stats run's report.json, a sweep, a comparison and a GPU trace are runs of their own
    run.report().to_json(root / "tiny_olmoe" / "report.json")
    with moe_trace.profile(model, mode="stats") as stats:
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    stats.report().to_json(root / "stats_only" / "report.json")
    from moe_trace.experiments.benchmark import SimpleBenchmark, compare_document
    from moe_trace.experiments.sweep import run_sweep

    run_sweep(model, "top-k", [1, 2, 4], repeats=1, warmup=0, max_new_tokens=2, out_dir=root / "sweep", plots=False,
              progress=False)
    bench_ = SimpleBenchmark(model, None, max_new_tokens=2, repeats=1, warmup=0, progress=False)
    df = bench_.run({"base": None, "top1": "topk:1", "knee": "kneedle"}, [inputs["input_ids"][:1]])
    (root / "cmp").mkdir()
    (root / "cmp" / "compare.json").write_text(json.dumps(compare_document(df, {"model": "tiny"})))
    gpu = ROOT / "tests" / "data" / "gpu_olmoe_tiny_full.pt.trace.json.gz"
    if gpu.exists():
        (root / "gpu").mkdir()
        (root / "gpu" / gpu.name).write_bytes(gpu.read_bytes())
    bad = root / "broken"
    bad.mkdir()
    (bad / "w.pt.trace.json").write_text('{"moe_trace": {"schema": "moe-trace/trace/1"}, "traceEvents": [{"ph": ')
    return root


@pytest.fixture(scope="module")
def tb(logdir):
    with bench.TensorBoardProcess(logdir) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser():
    with bench.Chromium(watch=True) as b:
        yield b


def _attr(page, el_id, attr):
    return page.eval(f"document.getElementById({json.dumps(el_id)}).getAttribute({json.dumps(attr)})")


def _open(browser, tb, run, **params):
    page = browser.new_page()
    page.navigate(bench.plugin_url(tb.url, run, **params))
    page.wait_for(bench.PAINTED, timeout=90)
    return page


def _local_only(page, tb):
    urls = [u for u in page.requested_urls() if u.startswith(("http:", "https:", "ws:", "wss:"))]
    return [u for u in urls if not u.startswith(tb.url + "/")]


def test_tensorboard_lists_the_plugin(tb):
    entry = tb.listing["moe_trace"]
    assert entry["enabled"] is True and entry["tab_name"] == "MoE"
    assert entry["loading_mechanism"]["type"] == "IFRAME"


def test_dashboard_shows_profiled_run(browser, tb, logdir, tmp_path):
    from moe_trace.trace import analyze

    rep = analyze(logdir / "tiny_olmoe").to_dict()
    page = _open(browser, tb, "tiny_olmoe")
    try:
        assert page.eval("document.body.getAttribute('data-state')") == "ok"
        assert int(_attr(page, "chart-heatmap", "data-rows")) == rep["model"]["num_moe_layers"]
        assert int(_attr(page, "chart-heatmap", "data-cols")) == rep["model"]["num_experts"]
        # the heatmap's z values are the report's counts
        z = page.eval("JSON.stringify(document.getElementById('chart-heatmap').data[0].z)")
        assert json.loads(z) == [layer["expert_counts"] for layer in rep["layers"]]
        kv = page.eval("document.getElementById('moe-kv').innerText")
        assert f"{rep['totals']['tokens']:,}" in kv and rep["model"]["family"] in kv
        phase_rows = page.eval("document.getElementById('moe-phase-table').innerText")
        assert str(rep["phases"]["decode"]["tokens"]) in phase_rows
        for chart in ("k", "balance", "latency", "flops"):
            assert int(_attr(page, f"chart-{chart}", "data-traces")) > 0, chart
            assert page.eval(f"document.querySelectorAll('#chart-{chart} .main-svg').length") > 0, chart
        assert page.eval("document.getElementById('moe-cmp').classList.contains('hidden')")
        assert page.console_errors() == []
        assert _local_only(page, tb) == [], "the page fetched something that is not the TensorBoard server"
        shot = page.screenshot(tmp_path / "dashboard.png")
        assert shot.stat().st_size > 10_000
    finally:
        page.close()


def test_controls_redraw(browser, tb):
    page = _open(browser, tb, "synthetic")
    try:
        assert int(_attr(page, "chart-heatmap", "data-rows")) == SYN_LAYERS
        assert int(_attr(page, "chart-heatmap", "data-cols")) == SYN_EXPERTS
        page.eval("document.body.setAttribute('data-painted', '0');"
                  "document.querySelector('#moe-phase button[data-value=decode]').click();"
                  "document.querySelector('#moe-mode button[data-value=share]').click(); true")
        page.wait_for(bench.PAINTED)
        assert _attr(page, "chart-heatmap", "data-phase") == "decode"
        assert _attr(page, "chart-heatmap", "data-mode") == "share"
        row_sums = json.loads(page.eval(
            "JSON.stringify(document.getElementById('chart-heatmap').data[0].z.map(r => r.reduce((a, b) => a + b, 0)))"))
        assert all(abs(s - 100) < 1e-6 for s in row_sums)
    finally:
        page.close()


def test_compare_two_runs(browser, tb, tmp_path):
    page = _open(browser, tb, "synthetic", compare="tiny_olmoe")
    try:
        assert not page.eval("document.getElementById('moe-cmp').classList.contains('hidden')")
        assert int(_attr(page, "chart-cmp-heat", "data-rows-a")) == SYN_LAYERS
        assert int(_attr(page, "chart-cmp-heat", "data-rows-b")) == 3
        table = page.eval("document.getElementById('moe-compare-table').innerText")
        head = page.eval("document.querySelector('#moe-compare-table thead').innerText")
        assert "synthetic" in head and "tiny_olmoe" in head and "A:" not in head     # run names, not A/B
        page.screenshot(tmp_path / "compare.png")
    finally:
        page.close()


def test_expert_parallel_panel_equals_report(browser, tb, logdir):
    """The EP panel's per-rank assignments equal Report(ep_size=N) in Python, by default (a what-if
    with the largest split <= 8 below E) and after picking another N, also per phase."""
    from moe_trace.trace import analyze

    page = _open(browser, tb, "tiny_olmoe")
    try:
        E = analyze(logdir / "tiny_olmoe").to_dict()["model"]["num_experts"]
        default = max(n for n in range(2, 9) if E % n == 0 and n < E)
        assert int(_attr(page, "chart-ep", "data-ep-size")) == default
        assert _attr(page, "chart-ep", "data-ep-source") == "what-if"
        want = analyze(logdir / "tiny_olmoe", ep_size=default).to_dict()["expert_parallel"]
        assert _attr(page, "chart-ep", "data-ep-loads") == ",".join(str(r["assignments"]) for r in want["ranks"])
        page.eval("document.body.setAttribute('data-painted', '0');"
                  "document.querySelector('#moe-ep button[data-value=\"2\"]').click(); true")
        page.wait_for(bench.PAINTED)
        page.eval("document.body.setAttribute('data-painted', '0');"
                  "document.querySelector('#moe-phase button[data-value=decode]').click(); true")
        page.wait_for(bench.PAINTED)
        want = analyze(logdir / "tiny_olmoe", ep_size=2).to_dict()["expert_parallel"]
        assert int(_attr(page, "chart-ep", "data-ep-size")) == 2
        assert _attr(page, "chart-ep", "data-ep-loads") == ",".join(map(str, want["phases"]["decode"]["assignments"]))
        assert page.console_errors() == []
    finally:
        page.close()


def test_run_without_timing(browser, tb):
    page = _open(browser, tb, "untimed")
    try:
        assert page.eval("document.body.getAttribute('data-state')") == "ok"
        note = page.eval("document.getElementById('moe-latency-note')")
        assert page.eval("!document.getElementById('moe-latency-note').classList.contains('hidden')"), note
        assert page.eval("document.getElementById('chart-latency').classList.contains('hidden')")
        assert int(_attr(page, "chart-heatmap", "data-rows")) == 4
    finally:
        page.close()


def test_broken_run_shows_error(browser, tb, tmp_path):
    page = _open(browser, tb, "broken")
    try:
        assert page.eval("document.body.getAttribute('data-state')") == "error"
        msg = page.eval("document.getElementById('moe-error').innerText")
        assert 'Run "broken" could not be loaded' in msg
        assert page.eval("document.getElementById('moe-main').classList.contains('hidden')")
        # the plugin still serves the good runs
        status, body = tb.get("/data/plugin/moe_trace/report?run=synthetic")
        assert status == 200 and json.loads(body)["report"]["model"]["num_moe_layers"] == SYN_LAYERS
        page.screenshot(tmp_path / "broken.png")
    finally:
        page.close()


def test_inside_tensorboard_ui(browser, tb, tmp_path):
    """The whole TensorBoard page: the MoE tab's iframe paints the dashboard."""
    ms, page = bench.time_tb_ui(browser, tb.url, timeout=120)
    try:
        assert ms > 0
        page.screenshot(tmp_path / "tensorboard.png", full_page=False)
    finally:
        page.close()


def test_settings_card_roofline_and_trace_download(browser, tb, logdir):
    """Issue 15: the settings card shows the run's workload and versions, k panels name the selector,
    the roofline table holds the report's numbers, compare has a k row with one format per row, and
    each trace can be downloaded (the bytes of the file on disk)."""
    import torch

    from moe_trace.trace import analyze

    rep = analyze(logdir / "tiny_olmoe").to_dict()
    page = _open(browser, tb, "tiny_olmoe", compare="synthetic")
    try:
        kv = page.eval("document.getElementById('moe-settings-kv').innerText")
        w = rep["settings"]["workload"]
        assert "BATCH" in kv.upper() and "kineto" in kv and torch.__version__ in kv and rep["settings"]["date"] in kv
        batch = page.eval("document.querySelector('#moe-settings-kv [data-key=Batch] b').innerText")
        assert batch == str(w["batch"])
        assert "model's own top-k" in page.eval("document.querySelector('#moe-k h2 .sub').innerText")
        dec = page.eval("document.querySelector('#moe-roofline-table tr[data-phase=decode]').innerText").split("\t")
        r = rep["roofline"]["phases"]["decode"]
        assert dec[2] == r["reads_source"] and dec[5] == f"{r['achieved_tbps']:.3f}"
        assert int(_attr(page, "chart-roofline", "data-traces")) > 0
        krow = page.eval("document.querySelector('#moe-compare-table tr[data-row=\"decode k\"]').innerText").split("\t")
        assert krow[1] == "2.000" and len(krow[2].split(".")[1]) == 3        # k row, one format (3 decimals)
        href = page.eval("document.querySelector('#moe-downloads a').getAttribute('href')")
        status, body = tb.get("/data/plugin/moe_trace/" + href)
        f = next((logdir / "tiny_olmoe").glob("*.pt.trace.json.gz"))
        assert status == 200 and body == f.read_bytes()
        bad, _ = tb.get("/data/plugin/moe_trace/trace?run=tiny_olmoe&file=..%2F..%2Fetc%2Fpasswd")
        assert bad == 404
        assert page.console_errors() == []
    finally:
        page.close()


def test_step_timeline_and_drift(browser, tb, logdir):
    """The step timeline draws one column per recorded forward; the drift heatmap's values equal the
    total variation distance computed here from the trace's per-step counters and the report."""
    import numpy as np

    from moe_trace.trace import analyze, read_trace

    rep = analyze(logdir / "tiny_olmoe").to_dict()
    f = next((logdir / "tiny_olmoe").glob("*.pt.trace.json.gz"))
    steps = [s for s in read_trace(f).step_timeline() if s.get("recorded", True)]
    page = _open(browser, tb, "tiny_olmoe")
    try:
        assert int(_attr(page, "chart-steps", "data-cols")) == len(steps) == 4       # prefill + 3 decode
        assert int(_attr(page, "chart-drift", "data-rows")) == rep["model"]["num_moe_layers"]
        z = json.loads(page.eval("JSON.stringify(document.getElementById('chart-drift').data[0].z)"))
        for i, layer in enumerate(rep["layers"]):
            ref = np.asarray(layer["expert_counts"], float) / sum(layer["expert_counts"])
            for j, s in enumerate(steps):
                c = np.asarray(s["layers"][layer["index"]]["expert_tokens"], float)
                assert z[i][j] == pytest.approx(0.5 * np.abs(c / c.sum() - ref).sum())
        assert page.console_errors() == []
    finally:
        page.close()


def test_report_sweep_and_compare_runs_are_listed_and_drawn(browser, tb, logdir, tmp_path):
    """Issue 15: a stats run's report.json, a sweep and a comparison are runs with the panels their data
    allows; the report.json next to tiny_olmoe's trace (same run) is no second run."""
    status, body = tb.get("/data/plugin/moe_trace/runs")
    kinds = {r["name"]: r["kind"] for r in json.loads(body)["runs"]}
    assert kinds["tiny_olmoe"] == "moe" and kinds["stats_only"] == "report"
    assert kinds["sweep"] == "sweep" and kinds["cmp"] == "compare"
    assert not [n for n in kinds if n.startswith("tiny_olmoe@")]          # one run, the trace
    rep = json.loads((logdir / "stats_only" / "report.json").read_text())
    page = _open(browser, tb, "stats_only")
    try:
        assert page.eval("document.body.getAttribute('data-state')") == "ok"
        z = json.loads(page.eval("JSON.stringify(document.getElementById('chart-heatmap').data[0].z)"))
        assert z == [layer["expert_counts"] for layer in rep["layers"]]
        assert page.eval("!document.getElementById('moe-latency-note').classList.contains('hidden')")  # stats: no ms
        assert page.eval("document.getElementById('moe-steps').classList.contains('hidden')")         # no trace
        src = page.eval("document.querySelector('#moe-settings-kv [data-key=Source] b').innerText")
        assert "report.json" in src
        href = page.eval("document.querySelector('#moe-downloads a').getAttribute('href')")
        status, body = tb.get("/data/plugin/moe_trace/" + href)
        assert status == 200 and body == (logdir / "stats_only" / "report.json").read_bytes()
        assert page.eval("document.getElementById('moe-sweep').classList.contains('hidden')")
        assert not page.eval("document.querySelector('#moe-phase button').disabled")
        page.wait_for("document.getElementById('moe-timeline') !== null", timeout=30)
        assert _attr(page, "moe-timeline", "aria-disabled") == "true"          # no trace: no Timeline view
        assert page.console_errors() == []
        page.screenshot(tmp_path / "stats_only.png")
    finally:
        page.close()
    sweep = json.loads((logdir / "sweep" / "sweep_top_k.json").read_text())
    page = _open(browser, tb, "sweep")
    try:
        assert page.eval("document.body.getAttribute('data-state')") == "ok"
        assert page.eval("document.getElementById('moe-heatmap').classList.contains('hidden')")
        assert page.eval("document.querySelector('#moe-phase button').disabled")      # report-only controls off
        rows = page.eval("document.querySelectorAll('#moe-sweep-table tbody tr').length")
        assert rows == len(sweep["summary"]) == 3
        routing = json.loads(page.eval("JSON.stringify(document.getElementById('chart-sweep-routing').data.map(t => t.y))"))
        assert routing[0] == [r["k_mean_mean"] for r in sweep["summary"]] == [1.0, 2.0, 4.0]   # k against the knob
        assert routing[1] == [r["active_experts_mean_mean"] for r in sweep["summary"]]
        assert routing[2] == [r["flops_per_token_mean"] for r in sweep["summary"]]
        lat = json.loads(page.eval("JSON.stringify(document.getElementById('chart-sweep-latency').data.map(t => t.y))"))
        assert lat[2] == [r["total_ms_mean"] for r in sweep["summary"]]
        assert page.console_errors() == []
        page.screenshot(tmp_path / "sweep.png")
    finally:
        page.close()
    doc = json.loads((logdir / "cmp" / "compare.json").read_text())
    page = _open(browser, tb, "cmp")
    try:
        head = page.eval("document.querySelector('#moe-cmpdoc-table thead').innerText")
        assert head.strip().split("\t")[1:] == ["base", "top1", "knee"]
        from moe_trace.experiments.benchmark import format_compare
        import pandas as pd

        df = pd.DataFrame(doc["configs"]).set_index("config")
        text = {l.split("  ")[0].strip(): l.split()[-3:] for l in format_compare(df, width=200).splitlines()[1:]}
        for key, label in (("k_mean", "k (mean experts/token)"), ("tokens_match", "tokens = base"),
                           ("flops_per_token", "MFLOP/token"), ("k_mean_vs_base", "k vs base")):
            cells = page.eval(f"document.querySelector('#moe-cmpdoc-table tr[data-row={key}]').innerText").split("\t")
            assert cells[0] == label and cells[1:] == text[label], key      # the CLI's numbers, its formats
        assert int(_attr(page, "chart-cmpdoc", "data-traces")) == 3
        assert page.console_errors() == []
        page.screenshot(tmp_path / "compare_doc.png")
    finally:
        page.close()


def test_step_timeline_gpu_time_per_forward(browser, tb, logdir):
    """Per forward the GPU time of the router / experts / shared ranges (the H200 trace of tests/data),
    equal to the reader's step timeline; a CPU trace says it has no GPU time (host time shown)."""
    from moe_trace.trace import read_trace

    if not (logdir / "gpu").exists():
        pytest.skip("tests/data GPU trace not committed")
    f = next((logdir / "gpu").glob("*.pt.trace.json.gz"))
    steps = [s for s in read_trace(f).step_timeline() if s["recorded"]]
    page = _open(browser, tb, "gpu")
    try:
        assert _attr(page, "chart-step-time", "data-source") == "gpu"
        ys = json.loads(page.eval("JSON.stringify(document.getElementById('chart-step-time').data.map(t => t.y))"))
        for i, part in enumerate(("router", "experts", "shared")):
            assert ys[i] == pytest.approx([s["gpu_ms"][part] for s in steps])
        assert page.eval("document.getElementById('moe-steps-note').classList.contains('hidden')")
        assert page.console_errors() == []
    finally:
        page.close()
    page = _open(browser, tb, "tiny_olmoe")
    try:
        assert _attr(page, "chart-step-time", "data-source") == "cpu"
        note = page.eval("document.getElementById('moe-steps-note').innerText")
        assert "No GPU kernels" in note
    finally:
        page.close()
