"""moe-trace inside the user's own torch.profiler: attach, never a second profiler, never a crash."""
from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, record_function, schedule, tensorboard_trace_handler

import moe_trace
from moe_trace.errors import ConfigError, ProfileStateError
from moe_trace.models import build_tiny_model


def _ids(b=2, s=5, seed=0):
    return torch.randint(3, 200, (b, s), generator=torch.Generator().manual_seed(seed))


def _gen(model, ids, n):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)


def _counts(d):
    return [l["expert_counts"] for l in d["layers"]]


def _user_events(path):
    from moe_trace.trace.io import load_json

    return load_json(path)["traceEvents"]


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("gzip", [False, True])
def test_attached_run_writes_into_the_users_tensorboard_files(tmp_path, explicit, gzip):
    model = build_tiny_model("olmoe").eval()
    ids = _ids()
    with torch.no_grad():
        plain = _gen(model, ids, 4)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU],
                                on_trace_ready=tensorboard_trace_handler(str(tmp_path), use_gzip=gzip)) as prof:
        with record_function("user/before"):
            torch.ones(3).sum()
        kw = {"profiler": prof} if explicit else {"mode": "kineto"}
        with torch.no_grad(), moe_trace.profile(model, **kw) as run:
            out = _gen(model, ids, 4)
        with record_function("user/after"):
            torch.ones(3).sum()
    assert torch.equal(out, plain)
    files = list(tmp_path.glob("*.pt.trace.json*"))
    assert len(files) == 1 and files[0].name.endswith(".gz") == gzip   # the user's file, nothing else
    names = {e.get("name") for e in _user_events(files[0])}
    assert {"user/before", "user/after"} <= names                       # the user's events kept
    assert any(str(n).startswith("moe_trace/prefill/L000/") for n in names)  # moe-trace ranges in it
    assert any(e.get("ph") == "C" and str(e.get("name")).startswith("moe_trace/L") for e in _user_events(files[0]))
    live = run.report().to_dict()
    back = moe_trace.analyze(tmp_path).to_dict()
    assert _counts(back) == _counts(live)
    assert back["phases"]["prefill"]["tokens"] == live["phases"]["prefill"]["tokens"] == 10
    assert back["phases"]["decode"]["forward_calls"] == live["phases"]["decode"]["forward_calls"] == 3
    assert run.trace_files == files


def test_users_schedule_rules_and_analyze_equals_the_profiled_steps(tmp_path):
    """The user's schedule (wait 1, warmup 1, active 3) and prof.step() after each forward: the trace
    holds forwards 2..4; its counts equal a plain reference hook's counts of exactly those forwards."""
    from tests.conftest import ReferenceRouting

    model = build_tiny_model("olmoe").eval()
    ids = _ids()
    from moe_trace.capture import find_bindings

    bindings = find_bindings(model)
    ref = ReferenceRouting(model, [b.experts[0] for b in bindings])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = schedule(wait=1, warmup=1, active=3, repeat=1)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], schedule=sched,
                                on_trace_ready=tensorboard_trace_handler(str(tmp_path))) as prof:
        with torch.no_grad(), moe_trace.profile(model, profiler=prof) as run:
            for n in range(6):  # one prefill-shaped forward, then decode-shaped ones
                model(ids if n == 0 else _ids(2, 1, seed=n))
                prof.step()
    ref.remove()
    back = moe_trace.analyze(tmp_path).to_dict()
    assert back["phases"]["prefill"]["forward_calls"] == 0 and back["phases"]["decode"]["forward_calls"] == 3
    for i, b in enumerate(bindings):
        want = np.zeros(b.info.num_experts, dtype=np.int64)
        for idx, _ in ref.calls[i][2:5]:
            want += np.bincount(idx.reshape(-1).numpy(), minlength=b.info.num_experts)
        assert back["layers"][i]["expert_counts"] == want.tolist()
    # the live report of the profiled steps is the same, and the whole block's report is the run's
    window = moe_trace.Report(run.kineto.windows[0][1]).to_dict()
    assert _counts(window) == _counts(back)
    assert run.report().to_dict()["phases"]["decode"]["forward_calls"] == 5


def test_two_moe_trace_kineto_sessions_raise_never_crash(tmp_path):
    a, b = build_tiny_model("olmoe").eval(), build_tiny_model("qwen2_moe").eval()
    with torch.no_grad(), moe_trace.profile(a, "kineto", logdir=tmp_path / "a"):
        with pytest.raises(ProfileStateError, match="another moe-trace kineto session"):
            with moe_trace.profile(b, "kineto", logdir=tmp_path / "b"):
                pass
        errors = []

        def other():
            try:
                with torch.no_grad(), moe_trace.profile(b, "kineto", logdir=tmp_path / "c"):
                    b(_ids())
            except ProfileStateError as e:
                errors.append(e)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1
        a(_ids())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in b.modules())
    with torch.no_grad(), moe_trace.profile(b, "kineto", logdir=tmp_path / "d") as run:  # free again
        b(_ids())
    assert run.trace_files


def test_two_threads_never_crash_the_interpreter(tmp_path):
    code = f"""
import threading, torch, moe_trace
from moe_trace.errors import ProfileStateError
from moe_trace.models import build_tiny_model
torch.set_num_threads(1)
ms = [build_tiny_model("olmoe").eval() for _ in range(2)]
res = []
def go(i):
    try:
        with torch.no_grad(), moe_trace.profile(ms[i], "kineto", logdir=r"{tmp_path}/t%d" % i):
            for _ in range(3):
                ms[i](torch.randint(3, 200, (1, 4)))
        res.append("ok")
    except ProfileStateError:
        res.append("busy")
ts = [threading.Thread(target=go, args=(i,)) for i in range(2)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sorted(res))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() in ("['busy', 'ok']", "['ok', 'ok']")


def test_profiler_argument_must_be_a_running_profiler():
    model = build_tiny_model("olmoe").eval()
    with pytest.raises(ConfigError, match="torch.profiler.profile"):
        moe_trace.profile(model, profiler="yes")
    prof = torch.profiler.profile(activities=[ProfilerActivity.CPU])
    with pytest.raises(ConfigError, match="running"):
        with moe_trace.profile(model, profiler=prof):
            pass
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _reference_sums(ref, bindings, forwards):
    out = []
    for i, b in enumerate(bindings):
        want = np.zeros(b.info.num_experts, dtype=np.int64)
        for n in forwards:
            idx, _ = ref.calls[i][n]
            want += np.bincount(idx.reshape(-1).numpy(), minlength=b.info.num_experts)
        out.append(want.tolist())
    return out


def _scheduled_run(model, tmp_path, n_forwards, **sched_kw):
    """The user's own schedule and tensorboard_trace_handler; moe-trace's block (kineto mode, no
    profiler= argument) entered while the schedule is in its wait phase; the user's prof.step() after
    every forward, and the user's own ranges around each. Forwards alternate prefill / decode shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = schedule(**sched_kw)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU], schedule=sched,
                                on_trace_ready=tensorboard_trace_handler(str(tmp_path))) as prof:
        assert not torch._C._autograd._profiler_enabled()  # wait phase: torch is not recording yet
        with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=tmp_path / "unused") as run:
            assert run.attached
            for n in range(n_forwards):
                with record_function(f"user/forward{n}"):
                    model(_ids(2, 5 if n % 2 == 0 else 1, seed=n))
                prof.step()
    return run


def test_attaches_to_a_users_profiler_entered_in_its_wait_phase(tmp_path):
    from tests.conftest import ReferenceRouting

    model = build_tiny_model("olmoe").eval()
    from moe_trace.capture import find_bindings

    bindings = find_bindings(model)
    ref = ReferenceRouting(model, [b.experts[0] for b in bindings])
    run = _scheduled_run(model, tmp_path, 5, wait=1, warmup=1, active=2, repeat=1)
    ref.remove()
    files = sorted(tmp_path.glob("*.pt.trace.json*"))
    assert len(files) == 1 and not (tmp_path / "unused").exists()   # the user's file only
    names = {e.get("name") for e in _user_events(files[0])}
    assert {"user/forward2", "user/forward3"} <= names and "user/forward1" not in names  # user's ranges kept
    assert any(str(n).startswith("moe_trace/prefill/L000/") for n in names)
    back = moe_trace.analyze(tmp_path).to_dict()
    live = moe_trace.Report(run.kineto.windows[0][1]).to_dict()
    assert _counts(back) == _counts(live) == _reference_sums(ref, bindings, [2, 3])
    for p in ("prefill", "decode"):
        assert back["phases"][p]["forward_calls"] == live["phases"][p]["forward_calls"] == 1
        assert back["phases"][p]["tokens"] == live["phases"][p]["tokens"] == (10 if p == "prefill" else 2)
    assert run.trace_files == files
    assert run.report().to_dict()["phases"]["prefill"]["forward_calls"] == 3  # the whole block


@pytest.mark.parametrize("repeat", [2, 0])
def test_several_windows_of_the_users_profiler_add_up_in_analyze(tmp_path, repeat):
    """Two active windows (steps 2-3 and 6-7; repeat=0 cycles until the profiler exits in a wait step):
    one file per window, each holding its own steps; analyze of the directory groups them as one run
    and equals the live report summed over the recorded steps, and a reference hook's counts."""
    from tests.conftest import ReferenceRouting

    model = build_tiny_model("olmoe").eval()
    from moe_trace.capture import find_bindings

    bindings = find_bindings(model)
    ref = ReferenceRouting(model, [b.experts[0] for b in bindings])
    run = _scheduled_run(model, tmp_path, 9, wait=1, warmup=1, active=2, repeat=repeat)
    ref.remove()
    files = sorted(tmp_path.glob("*.pt.trace.json*"))
    assert len(files) == 2 and len(run.kineto.windows) == 2
    want = _reference_sums(ref, bindings, [2, 3, 6, 7])
    windows = [moe_trace.Report(w[1]).to_dict() for w in run.kineto.windows]
    summed = [np.sum([_counts(w)[i] for w in windows], axis=0).tolist() for i in range(len(bindings))]
    back = moe_trace.analyze(tmp_path).to_dict()
    assert _counts(back) == summed == want
    assert back["phases"]["prefill"]["forward_calls"] == back["phases"]["decode"]["forward_calls"] == 2
    assert back["phases"]["prefill"]["tokens"] == 20 and back["phases"]["decode"]["tokens"] == 4
    for f, w in zip(sorted(files, key=lambda f: f.stat().st_mtime_ns), windows):  # each file: its own window
        assert _counts(moe_trace.analyze(f).to_dict()) == _counts(w)
    # a later, unrelated profiler's export gets nothing of the finished session
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as other:
        with record_function("moe_trace/prefill#6"):  # a step name of the session
            torch.ones(2).sum()
    other.export_chrome_trace(str(tmp_path / "other.json"))
    assert not any(e.get("cat") == "moe_trace" for e in _user_events(tmp_path / "other.json"))


def test_a_session_whose_profiler_is_gone_is_let_go(tmp_path):
    import gc

    from moe_trace.capture import recorders

    model = build_tiny_model("olmoe").eval()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU],
                                schedule=schedule(wait=5, warmup=0, active=1)) as prof:
        with torch.no_grad(), moe_trace.profile(model, mode="kineto") as first:  # found in its wait step
            model(_ids())  # in the wait step: never exported, so the session stays attached
    assert first.attached and first.kineto in recorders._ATTACHED
    del prof
    gc.collect()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof2:
        with torch.no_grad(), moe_trace.profile(model, profiler=prof2) as second:
            model(_ids())
    assert first.kineto not in recorders._ATTACHED and second.trace_files == []


@pytest.mark.parametrize("explicit", [True, False])
def test_two_blocks_in_one_window_of_the_users_profiler_stay_two_runs(tmp_path, explicit):
    """Two moe-trace blocks one after the other inside ONE window of the user's profiler: their step
    names never collide, each block is its own run in analyze (all_runs: each equals its live report
    and a reference hook of its own forwards), and the default analyze takes the newest with a warning."""
    from moe_trace.capture import find_bindings
    from moe_trace.trace.format import STEP_RE
    from moe_trace.trace.reader import read_trace
    from tests.conftest import ReferenceRouting

    model = build_tiny_model("olmoe").eval()
    bindings = find_bindings(model)
    ref = ReferenceRouting(model, [b.experts[0] for b in bindings])
    runs = []
    with torch.profiler.profile(activities=[ProfilerActivity.CPU],
                                on_trace_ready=tensorboard_trace_handler(str(tmp_path))) as prof:
        for n, seed in ((3, 0), (4, 1)):  # 3 forwards, then 4 forwards of other prompts
            kw = {"profiler": prof} if explicit else {"mode": "kineto"}
            with torch.no_grad(), moe_trace.profile(model, **kw) as run:
                _gen(model, _ids(seed=seed), n)
            runs.append(run)
    ref.remove()
    wants = [_reference_sums(ref, bindings, range(0, 3)), _reference_sums(ref, bindings, range(3, 7))]
    lives = [r.report().to_dict() for r in runs]
    assert [_counts(l) for l in lives] == wants and wants[0] != wants[1]
    ids = [r.kineto.run_id for r in runs]
    assert ids[0] != ids[1]
    files = sorted(tmp_path.glob("*.pt.trace.json*"))
    # the user's file holds the first block; the second block's counters went into a copy of it
    assert len(files) == 2 and runs[0].trace_files[0] in files and runs[1].trace_files[0] in files
    assert ids[1] in runs[1].trace_files[0].name
    for f in files:  # one user window, both blocks' step ranges in it: every moe-trace step name once
        steps = [e["name"] for e in _user_events(f)
                 if e.get("cat") == "user_annotation" and STEP_RE.match(str(e.get("name")))]
        assert len(steps) == 7 and len(set(steps)) == 7
    every = moe_trace.analyze(tmp_path, all_runs=True)
    assert set(every) == set(ids)
    for rid, live, want in zip(ids, lives, wants):
        back = every[rid].to_dict()
        assert _counts(back) == _counts(live) == want
        for p in ("prefill", "decode"):
            assert back["phases"][p]["forward_calls"] == live["phases"][p]["forward_calls"]
            assert back["phases"][p]["tokens"] == live["phases"][p]["tokens"]
    # each run's per-step counters (matched to its step ranges) add up to its own counts only
    for run, want in zip(runs, wants):
        assert len(run.trace_files) == 1
        tl = read_trace(run.trace_files[0]).step_timeline()
        got = [np.sum([s["layers"][i]["expert_tokens"] for s in tl if s["layers"]], axis=0).tolist()
               for i in range(len(bindings))]
        assert got == want
    with pytest.warns(UserWarning, match="run"):
        newest = moe_trace.analyze(tmp_path).to_dict()
    assert _counts(newest) == wants[1]


def test_two_blocks_in_one_plain_export_of_the_users_profiler(tmp_path):
    """The same with the user's own export_chrome_trace to a plain `.json` name: the second block's
    counts go into `mine.{run_id}.json`; each file analyzes to its own block's live report."""
    model = build_tiny_model("olmoe").eval()
    runs = []
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        for n, seed in ((2, 0), (3, 1)):
            with torch.no_grad(), moe_trace.profile(model, profiler=prof) as run:
                _gen(model, _ids(seed=seed), n)
            runs.append(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not add its counters"
        prof.export_chrome_trace(str(tmp_path / "mine.json"))
    second = tmp_path / f"mine.{runs[1].kineto.run_id}.json"
    assert runs[0].trace_files == [tmp_path / "mine.json"] and runs[1].trace_files == [second]
    for run, f in zip(runs, (tmp_path / "mine.json", second)):
        assert _counts(moe_trace.analyze(f).to_dict()) == _counts(run.report().to_dict())
    assert _counts(runs[0].report().to_dict()) != _counts(runs[1].report().to_dict())
