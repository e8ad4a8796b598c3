"""Bad input, fuzzed (issue 16): every case ends in one clear error, checked before the work.

CLI: exit 2, one `error:` line naming the value, no traceback, nothing written. Python API: a
`MoeTraceError` subclass (never a raw TypeError / OSError from deep inside). The tables are bounded:
every case fails before any model runs, so the whole file takes a few seconds.
"""
from __future__ import annotations

import functools
import re

import pytest

import moe_trace
from moe_trace.analysis import LayerCounts, LayerInfo, Report, RunData
from moe_trace.cli.main import main
from moe_trace.errors import ConfigError, MoeTraceError


def _run(layer_device: str = "cuda:0") -> RunData:
    layer = LayerInfo(index=0, name="m.l0", family="olmoe", num_experts=4, top_k=2, hidden_size=8, expert_dim=4,
                      device=layer_device)
    run = RunData.empty({"family": "olmoe"}, [layer])
    run.counts["prefill"][0] = LayerCounts(tokens=2, calls=1, expert_counts=[1, 1, 1, 1], k_hist=[0, 0, 2])
    run.forward_calls["prefill"] = 1
    run.forward_tokens["prefill"] = 2
    return run


def synthetic_events() -> list[dict]:
    """One step; one router kernel (10 us) under a MoE GPU range; one 500 us attention kernel outside."""
    return [
        {"ph": "X", "cat": "user_annotation", "name": "moe_trace/prefill#0", "pid": 7, "tid": 1, "ts": 0,
         "dur": 1000},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "moe_trace/prefill/L000/router", "pid": 0, "tid": 7,
         "ts": 10, "dur": 12, "args": {"External id": 3}},
        {"ph": "X", "cat": "kernel", "name": "router_mm", "pid": 0, "tid": 7, "ts": 11, "dur": 10,
         "args": {"device": 0, "stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "attention", "pid": 0, "tid": 7, "ts": 30, "dur": 500,
         "args": {"device": 0, "stream": 7}},
    ]


def write_synthetic(path, slim: bool):
    from moe_trace.trace import write_trace

    steps = [{"step": 0, "phase": "prefill", "tokens": 2,
              "layers": {0: {"expert_counts": [1, 1, 1, 1], "k_hist": [0, 0, 2]}}}]
    return write_trace({"traceEvents": synthetic_events()}, _run(), steps, path, slim=slim)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    (d / "afile").write_text("hi\n")
    (d / "adir").mkdir()
    (d / "prompts.txt").write_text("one\ntwo\n")
    trace = write_synthetic(d / "run" / "t.pt.trace.json", slim=True)
    from moe_trace.models import save_tiny_checkpoint

    save_tiny_checkpoint("olmoe", d / "ckpt")  # no tokenizer: every `run` case must fail before needing one
    logs = d / "rlogs"
    assert main(["routing-log", "--out", str(logs), "--max-samples", "4", "--max-length", "8", "--no-progress"]) == 0
    return {"file": str(d / "afile"), "dir": str(d / "adir"), "missing": str(d / "missing"), "trace": str(trace),
            "tracedir": str(trace.parent), "rlog": str(logs), "ckpt": str(d / "ckpt"), "prompts": str(d / "prompts.txt"), "root": d}


# (argv, a substring the one error line must contain). {file} is an existing plain file, {dir} an
# existing empty directory, {missing} a path that does not exist.
CLI_CASES = [
    # counts and enums
    (["demo", "--batch", "0"], "--batch"),
    (["demo", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["demo", "--mode", "bogus"], "invalid choice"),
    (["demo", "--family", "nope"], "unknown model family 'nope'"),
    (["analyze", "{trace}", "--ep-size", "0"], "ep_size"),
    (["analyze", "{trace}", "--ep-size", "3"], "divisor of 4"),
    (["sweep", "bogus", "--values", "1"], "unknown knob 'bogus'"),
    (["sweep", "top-k", "--values", "0"], "out of range"),
    (["sweep", "top-k", "--values", "1", "--repeats", "0"], "--repeats"),
    (["sweep", "top-k", "--values", "1", "--warmup", "-1"], "--warmup"),
    (["sweep", "top-k", "--values", "1", "--selector", "bogus"], "unknown selector 'bogus'"),
    (["compare", "--config", "x"], "NAME=SPEC"),
    (["compare", "--config", "a=top_k=0"], "top_k"),
    (["compare", "--config", "a=foo=1"], "unknown key(s) foo"),
    (["routing-log", "--max-samples", "0"], "--max-samples"),
    (["routing-log", "--shard-tokens", "0", "--format", "columnar", "--out", "{root}/col"], "--shard-tokens"),
    (["routing-log", "--device", "bogus"], "--device 'bogus'"),
    (["routing-log", "--format", "bogus"], "invalid choice"),
    (["routing-log", "--family", "nope"], "unknown model family 'nope'"),
    (["routing-log", "--text-field", "t", "--prompts", "{prompts}", "--out", "{root}/tf"], "--text-field 't'"),
    (["routing-analyze", "{rlog}", "--dpi", "0"], "dpi"),
    (["routing-analyze", "{rlog}", "--kernel", "nope"], "unknown kernel 'nope'"),
    (["routing-analyze", "{rlog}", "--layers", "99", "--out", "{root}/ra"], "layer(s) 99 not in the routing logs"),
    (["routing-analyze", "{rlog}", "--max-fit-points", "0"], "--max-fit-points"),
    (["routing-analyze", "{rlog}", "--per-expert-max", "0"], "--per-expert-max"),
    (["routing-analyze", "{rlog}", "--max-tokens", "-5"], "--max-tokens"),
    (["routing-analyze", "{rlog}", "--bandwidth", "-1", "--out", "{root}/ra"], "bandwidth"),
    (["routing-analyze", "{rlog}", "--tail", "bogus"], "invalid choice"),
    # missing files, directories where files are expected and the reverse
    (["inspect", "{missing}"], "does not exist"),
    (["inspect", "{file}"], "cannot read a transformers config"),
    (["analyze", "{missing}"], "does not exist"),
    (["analyze", "{dir}"], "no *.pt.trace.json"),
    (["analyze", "{file}"], "not valid JSON"),
    (["merge", "{missing}", "-o", "{root}/m.json"], "does not exist"),
    (["merge", "{dir}", "-o", "{root}/m.json"], "no *.pt.trace.json"),
    (["sweep-plot", "{missing}"], "cannot read sweep results"),
    (["sweep-plot", "{dir}"], "cannot read sweep results"),
    (["sweep-plot", "{trace}", "--out", "{file}/figs"], "is a file, not a directory"),
    (["sweep", "top-k", "--values", "1", "--prompts", "{missing}"], "cannot read prompts file"),
    (["sweep", "top-k", "--values", "1", "--model", "{file}"], "not a checkpoint directory"),
    (["routing-log", "--prompts", "{missing}"], "does not exist"),
    (["routing-log", "--model", "{missing}"], "local checkpoint directory"),
    (["routing-analyze", "{missing}"], "no such file or directory"),
    (["routing-analyze", "{dir}"], "no routing logs"),
    (["routing-analyze", "{file}"], "not a readable routing log"),
    (["routing-analyze", "{rlog}", "--kde-models", "{missing}", "--out", "{root}/ra"], "no KDE model files"),
    # outputs that cannot be written: refused before the work
    (["routing-log", "--out", "{file}/x", "--max-samples", "1"], "is a file, not a directory"),
    (["routing-log", "--out", "{file}", "--max-samples", "1"], "is a file, not a directory"),
    (["routing-log", "--out", "{dir}", "--max-samples", "1", "--format", "json"], None),  # a directory: fine
    (["routing-analyze", "{rlog}", "--out", "{file}/x"], "is a file, not a directory"),
    (["analyze", "{trace}", "--json", "{file}/r.json"], "is a file, not a directory"),
    (["compare", "--config", "a=model", "--out", "{file}/x.csv"], "is a file, not a directory"),
    (["run", "{ckpt}", "--logdir", "{file}"], "is a file, not a directory"),
    (["run", "{ckpt}", "--logdir", "{file}/x", "--mode", "stats"], "is a file, not a directory"),
    (["run", "{ckpt}", "--device-map", "bogus"], "--device-map 'bogus'"),
    (["run", "{ckpt}", "--batch-size", "0"], "--batch-size"),
    (["run", "{file}"], "not a checkpoint directory"),
    (["compare", "--config", "a=model", "--device", "bogus"], "--device 'bogus'"),
    (["sweep", "top-k", "--values", "1", "--device", "bogus"], "--device 'bogus'"),
    (["analyze", "{trace}", "--csv", "{file}/r.csv"], "is a file, not a directory"),
    (["analyze", "{trace}", "--json", "{dir}"], "is a directory"),
    (["analyze", "{trace}", "--csv", "{dir}"], "is a directory"),
    (["analyze", "{missing}", "--ep-size", "0"], "ep_size"),  # the argument first, before any file is read
    (["merge", "{tracedir}", "-o", "{file}/m.json"], "is a file, not a directory"),
    (["merge", "{tracedir}", "-o", "{dir}"], "is a directory"),
]
CLI_CASES = [c for c in CLI_CASES if c[1] is not None]


def _cli(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.mark.parametrize("argv,needle", CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_and_exit_2(argv, needle, places, capsys):
    argv = [a.format(**places) for a in argv]
    rc = _cli(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out[-400:], err[-400:])
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if "error:" in l]
    assert len(errors) == 1, err
    if lines[-1].startswith("moe-trace: error:"):  # ours: exactly one line
        assert len(lines) == 1, err
    else:  # argparse: its usage lines, then one error line
        assert lines[-1].startswith("moe-trace ") and all(l.startswith(("usage:", " ")) for l in lines[:-1]), err
    assert needle in errors[0], errors[0]
    assert len(errors[0]) < 600  # names the value, does not dump a list or a file


REFUSED_FIRST = [
    ["routing-log", "--out", "{file}/x", "--max-samples", "1"],
    ["routing-analyze", "{rlog}", "--out", "{file}/x"],
    ["analyze", "{trace}", "--json", "{file}/r.json"],
    ["analyze", "{trace}", "--per-device", "--csv", "{dir}"],
    ["merge", "{tracedir}", "-o", "{file}/m.json"],
    ["compare", "--config", "a=model", "--out", "{file}/x.csv"],
    ["run", "{ckpt}", "--logdir", "{file}/x", "--mode", "timing"],
]


@pytest.mark.parametrize("argv", REFUSED_FIRST, ids=[" ".join(a)[:60] for a in REFUSED_FIRST])
def test_outputs_refused_before_the_work(argv, places, capsys):
    """Nothing ran (no samples logged, no report printed, no progress bar) when the output place is bad."""
    assert _cli([a.format(**places) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, (out, err)


def test_outputs_never_overwrite_the_inputs(tmp_path, capsys):
    """`merge -o` onto an input trace and `analyze --json` onto the trace it reads would destroy the
    user's data: refused; re-merging over an earlier merged file still works."""
    d = tmp_path / "runs"
    a = write_synthetic(d / "a.pt.trace.json", slim=True)
    write_synthetic(d / "b" / "b.pt.trace.json", slim=False)
    before = a.read_bytes()
    for argv in (["merge", str(d), "-o", str(a)], ["analyze", str(a), "--json", str(a)],
                 ["analyze", str(d), "--csv", str(a)], ["analyze", str(a), "--json", str(tmp_path / "r"),
                                                        "--csv", str(tmp_path / "r")]):
        assert _cli(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and ("overwritten" in err or "destroy" in err
                                                              or "same file" in err), err
        assert a.read_bytes() == before
    merged = d / "all.pt.trace.json"
    for _ in range(2):  # the second merge replaces the first one's output, which is not an input
        assert _cli(["merge", str(d), "-o", str(merged)]) == 0
    assert a.read_bytes() == before and "moe-trace/merged" in merged.read_text()[:2000]


# -- item: honest labels (analyze --per-device on slim and full traces) --------------------------

def test_per_device_says_which_kernels_it_counts(tmp_path, capsys):
    """One 10 us router kernel under a MoE range + one 500 us attention kernel outside: the slim
    trace keeps only the first, and every place that shows the figure says so."""
    from moe_trace.trace import read_trace
    from moe_trace.trace.merge import merge_traces

    slim = write_synthetic(tmp_path / "slim" / "t.pt.trace.json", slim=True)
    full = write_synthetic(tmp_path / "full" / "t.pt.trace.json", slim=False)
    s, f = read_trace(slim).summary, read_trace(full).summary
    assert (f.devices["GPU 0"]["kernels"], f.devices["GPU 0"]["kernel_ms"]) == (2, pytest.approx(0.51))
    assert (s.devices["GPU 0"]["kernels"], s.devices["GPU 0"]["kernel_ms"]) == (1, pytest.approx(0.01))
    assert (f.kernel_scope, s.kernel_scope) == ("all", "moe_ranges")
    assert s.to_dict()["kernel_scope"] == "moe_ranges" and "only kernels inside MoE ranges" in str(s)
    assert f.to_dict()["kernel_scope"] == "all" and "all kernels" in str(f)

    assert main(["analyze", str(slim), "--per-device", "--no-progress"]) == 0
    out = capsys.readouterr().out
    heading = next(l for l in out.splitlines() if l.startswith("GPU activity"))
    assert "only kernels inside MoE ranges" in heading and "slim=False" in heading, heading
    assert "all kernels" not in out
    row = out.splitlines()[-1].split()
    assert row[:4] == ["GPU", "0", "1", "0.010"] and row[-1] == "-"  # no busy % from a partial count
    assert main(["analyze", str(full), "--per-device", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "GPU activity in the trace: all kernels of the profiled steps" in out
    assert out.splitlines()[-1].split()[:4] == ["GPU", "0", "2", "0.510"]

    merged = merge_traces(tmp_path / "slim", tmp_path / "merged.json")  # a merged slim trace says so too
    assert read_trace(merged).summary.kernel_scope == "moe_ranges"


# -- item: errors that say what is wrong ---------------------------------------------------------

def _nan_trace(path, literal="NaN"):
    path.write_text('{"traceEvents": [\n'
                    '{"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 0, "ts": 1, "dur": 2},\n'
                    '{"ph": "X", "cat": "kernel", "name": "k2", "pid": 0, "tid": 0, "ts": ' + literal + ', "dur": 2}\n'
                    ']}\n')
    return path


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_literal_error_gives_line_and_column(literal, tmp_path, capsys):
    d = tmp_path / literal
    d.mkdir()
    f = _nan_trace(d / "t.pt.trace.json", literal)
    assert main(["analyze", str(f), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "line 3, column 70" in err and "NaN and Infinity are not JSON" in err, err
    assert main(["merge", str(d), "-o", str(tmp_path / f"m{literal}.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.search(r"line 3,? column 7[01]", err), err  # orjson points past a minus


def test_nan_position_across_chunks(tmp_path):
    """The position is exact past the first 4 MiB chunk (the error is in the second one)."""
    from moe_trace.errors import TraceError
    from moe_trace.trace import read_trace

    ev = ",\n".join('{"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 0, "ts": %d, "dur": 2}' % i
                    for i in range(60000))
    text = '{"traceEvents": [\n' + ev + ',\n{"ph": "X", "cat": "kernel", "name": "k", "ts": NaN}\n]}'
    at = text.index("NaN")
    assert at > 4 << 20
    (tmp_path / "big.json").write_text(text)
    with pytest.raises(TraceError) as ei:
        read_trace(tmp_path / "big.json", progress=False)
    line, col = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
    assert f"line {line}, column {col} (byte {at})" in str(ei.value)


def test_gzip_of_garbage_quotes_no_bytes(tmp_path, capsys):
    import gzip
    import random

    d = tmp_path / "g"
    d.mkdir()
    (d / "t.pt.trace.json.gz").write_bytes(gzip.compress(random.Random(0).randbytes(400)))
    for argv in (["analyze", str(d), "--no-progress"], ["merge", str(d), "-o", str(tmp_path / "m.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert err.isascii() and err.strip().isprintable() and "\\x" not in err and len(err) < 400, err


# -- Python API ----------------------------------------------------------------------------------

def _report():
    return Report(_run())


API_CASES = [
    ("profile observers=5", lambda p: _profile(observers=5), "observers must be a list"),
    ("profile slim='no'", lambda p: _profile(mode="kineto", logdir=str(p["root"] / "k"), slim="no"), "slim"),
    ("profile record_shapes=3", lambda p: _profile(mode="kineto", logdir=str(p["root"] / "k"), record_shapes=3),
     "record_shapes"),
    ("profile cuda_events='x'", lambda p: _profile(cuda_events="x"), "cuda_events"),
    ("profile schedule='x'", lambda p: _profile(mode="kineto", logdir=str(p["root"] / "k"), schedule="x"),
     "schedule must be"),
    ("profile schedule wait=-1", lambda p: _profile(mode="kineto", logdir=str(p["root"] / "k"),
                                                    schedule={"wait": -1, "active": 1}), "schedule['wait']"),
    ("profile schedule active=0", lambda p: _profile(mode="kineto", logdir=str(p["root"] / "k"),
                                                     schedule={"active": 0}), "schedule['active']"),
    ("profile schedule typo", lambda p: _profile(mode="kineto", logdir=str(p["root"] / "k"),
                                                 schedule={"actve": 2}), "unknown key(s) actve"),
    ("profile logdir=5", lambda p: _profile(mode="kineto", logdir=5), "logdir must be a directory path"),
    ("profile logdir is a file", lambda p: _profile(mode="kineto", logdir=p["file"]), "is a file, not a directory"),
    ("profile logdir under a file", lambda p: _profile(mode="kineto", logdir=p["file"] + "/x"),
     "is a file, not a directory"),
    ("analyze(None)", lambda p: moe_trace.analyze(None), "got NoneType"),
    ("analyze(5)", lambda p: moe_trace.analyze(5), "got int"),
    ("analyze('')", lambda p: moe_trace.analyze(""), "empty"),
    ("analyze ep_size=True before reading", lambda p: moe_trace.analyze(p["missing"], ep_size=True), "ep_size"),
    ("read_trace(None)", lambda p: _read_trace(None), "got NoneType"),
    ("merge_traces(None)", lambda p: _merge(None, p["root"] / "m.json"), "got NoneType"),
    ("RunData.from_dict('x')", lambda p: RunData.from_dict("x"), "got str"),
    ("merge_traces output under a file", lambda p: _merge(p["tracedir"], p["file"] + "/m.json"), "is a file"),
    ("Report([])", lambda p: Report([]), "at least one RunData"),
    ("Report(None)", lambda p: Report(None), "got NoneType"),
    ("Report('x')", lambda p: Report("x"), "got str"),
    ("Report([1])", lambda p: Report([1]), "must be RunData, got int"),
    ("Report ranks too long", lambda p: Report(_run(), ranks=[0, 1]), "2 entries for 1"),
    ("Report ranks not ints", lambda p: Report(_run(), ranks=["a"]), "ints or None"),
    ("Report ep_size=True", lambda p: Report(_run(), ep_size=True), "ep_size"),
    ("Report ep_size=0", lambda p: Report(_run(), ep_size=0), "ep_size"),
    ("to_json into a directory", lambda p: _report().to_json(p["dir"]), "is a directory"),
    ("to_json under a file", lambda p: _report().to_json(p["file"] + "/r.json"), "is a file, not a directory"),
    ("to_csv into a directory", lambda p: _report().to_csv(p["dir"]), "is a directory"),
    ("to_csv under a file", lambda p: _report().to_csv(p["file"] + "/r.csv"), "is a file, not a directory"),
    ("to_json(5)", lambda p: _report().to_json(5), "must be a path"),
    ("AnalysisConfig max_fit_points=0", lambda p: _analysis_cfg(p, max_fit_points=0), "max_fit_points"),
    ("AnalysisConfig max_tokens=-1", lambda p: _analysis_cfg(p, max_tokens_per_dataset=-1), "max_tokens_per_dataset"),
    ("run_analysis output under a file", lambda p: _analysis_cfg(p, output_dir=p["file"] + "/x"),
     "is a file, not a directory"),
    ("run_logging shard_tokens=0", lambda p: _logging(p, shard_tokens=0), "shard_tokens"),
    ("run_logging out under a file", lambda p: _logging(p, out=p["file"] + "/x"), "is a file, not a directory"),
]


@functools.lru_cache(maxsize=1)
def _demo_model():
    from moe_trace.routing.pipeline import build_demo_model

    return build_demo_model()


def _profile(**kw):
    """profile() of a model that must never run: every case fails on entry, before the work."""
    import torch

    model = _demo_model()
    ran = []
    hook = model.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with moe_trace.profile(model, **kw):
            model(input_ids=torch.tensor([[1, 2]]))
    finally:
        hook.remove()
        assert not ran, "the model ran before the bad option was refused"


def _read_trace(path):
    from moe_trace.trace import read_trace

    return read_trace(path)


def _merge(src, out):
    from moe_trace.trace.merge import merge_traces

    return merge_traces(src, out)


def _analysis_cfg(p, **kw):
    from moe_trace.routing import AnalysisConfig, run_analysis

    return run_analysis([p["rlog"]], AnalysisConfig(**{"output_dir": str(p["root"] / "ra2"), "progress": False, **kw}))


def _logging(p, out=None, **kw):
    from moe_trace.routing.pipeline import build_demo_model, run_logging

    return run_logging(build_demo_model(), [("d", "hello")], out or str(p["root"] / "rl2"), **kw)


@pytest.mark.parametrize("label,call,needle", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_one_clear_error(label, call, needle, places):
    with pytest.raises(MoeTraceError) as ei:
        call(places)
    assert needle in str(ei.value), str(ei.value)
    assert "\n" not in str(ei.value)


def test_report_still_takes_what_it_took(places):
    run = _run()
    assert Report(run).to_dict()["model"]["num_experts"] == 4
    assert Report([run, _run()], ranks=[0, None]).ranks == [0, 1]
    assert Report((r for r in [run])).parts == [run]
    out = places["root"] / "new" / "sub" / "r.json"  # missing parents are created
    Report(run).to_json(out)
    assert out.is_file()
    with pytest.raises(ConfigError):
        Report(run, ep_size=2.0)


# -- item: run names in TensorBoard --------------------------------------------------------------

def test_tensorboard_lists_and_serves_odd_run_names(tmp_path):
    """Folders named with a backslash, a newline, spaces or unicode are listed and every listed run's
    /report answers 200 (issue 16: listed but 400 before)."""
    import json
    from urllib.parse import quote

    pytest.importorskip("tensorboard")
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from tb_plugin.plugin import MoeTracePlugin

    names = ["back\\slash", "new\nline", "tab\there", "sp ace", "ünï", "plain"]
    for n in names:
        write_synthetic(tmp_path / n / "t.pt.trace.json", slim=True)
    apps = MoeTracePlugin(base_plugin.TBContext(logdir=str(tmp_path))).get_plugin_apps()
    listed = json.loads(Client(apps["/runs"]).get("/runs").get_data())["runs"]
    got = {r["name"] for r in listed}
    for n in names:
        assert any(g == n or g.startswith(n + "@") for g in got), (n, got)
    for r in listed:
        resp = Client(apps["/report"]).get("/report?run=" + quote(r["name"], safe=""))
        assert resp.status_code == 200, (r["name"], resp.status_code, resp.get_data()[:200])
        assert json.loads(resp.get_data())["report"]["model"]["num_experts"] == 4
