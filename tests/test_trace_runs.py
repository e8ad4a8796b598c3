"""Run identity: every profile() run has a run id (report, trace metadata, file name); runs never mix,
never overwrite each other; older traces without run ids keep working."""
from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch

import moe_trace
from moe_trace.analysis import Report
from moe_trace.cli.main import main
from moe_trace.errors import TraceError
from moe_trace.models import build_tiny_model
from moe_trace.trace import analyze, read_metadata, read_trace, write_trace
from moe_trace.trace.format import job_token, new_run_id, trace_file_name
from moe_trace.trace.writer import write_run_traces
from tests.test_trace_fixtures import make_run, synthetic_gpu_raw


def _counts(rep) -> list:
    d = rep.to_dict() if isinstance(rep, Report) else rep
    return [l["expert_counts"] for l in d["layers"]]


def _generate(model, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=g)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                   min_new_tokens=tokens, do_sample=False)


@pytest.fixture(scope="module")
def olmoe():
    return build_tiny_model("olmoe")


def test_two_runs_in_one_logdir_never_mix(olmoe, tmp_path, capsys):
    runs = []
    for n, tokens in enumerate((2, 5)):
        with torch.no_grad(), moe_trace.profile(olmoe, mode="kineto", logdir=tmp_path) as run:
            _generate(olmoe, tokens, seed=n)
        runs.append(run)
    a, b = (r.report() for r in runs)
    assert a.run_id and b.run_id and a.run_id != b.run_id
    assert a.to_dict()["run_id"] == a.run_id and b.to_dict()["run_id"] == b.run_id
    # the run id is in the file name and the metadata; each run has its own file
    files = sorted(tmp_path.glob("*.pt.trace.json.gz"))
    assert len(files) == 2 and {f for r in runs for f in r.trace_files} == set(files)
    for r in runs:
        (f,) = r.trace_files
        assert f".{r.report().run_id}." in f.name
        assert read_metadata(f)["moe_trace"]["run_id"] == r.report().run_id
    # analyze: the newest run, and a warning naming the other
    with pytest.warns(UserWarning, match=f"holds 2 runs.*{a.run_id}"):
        newest = analyze(tmp_path)
    assert newest.run_id == b.run_id and _counts(newest) == _counts(b)
    assert newest.to_dict()["phases"]["prefill"]["forward_calls"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _counts(analyze(tmp_path, run=a.run_id)) == _counts(a)
        assert _counts(analyze(tmp_path, run=a.run_id[:8])) == _counts(a)  # a unique prefix
        both = analyze(tmp_path, all_runs=True)
    assert list(both) == [b.run_id, a.run_id] and _counts(both[a.run_id]) == _counts(a)
    assert _counts(moe_trace.analyze(tmp_path, run=a.run_id)) == _counts(a)  # the top-level API too
    assert list(moe_trace.analyze(tmp_path, all_runs=True)) == [b.run_id, a.run_id]
    with pytest.raises(TraceError, match="is not a run"):
        analyze(tmp_path, run="nope")
    with pytest.raises(moe_trace.ConfigError, match="not both"):
        moe_trace.analyze(tmp_path, run=a.run_id, all_runs=True)
    # the CLI: the warning on stderr, --run, --all-runs, one line for a bad id
    assert main(["analyze", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    cap = capsys.readouterr()
    assert f"moe-trace: warning: {tmp_path} holds 2 runs" in cap.err and a.run_id in cap.err
    assert main(["analyze", str(tmp_path), "--run", a.run_id]) == 0
    assert capsys.readouterr().err == ""
    assert main(["analyze", str(tmp_path), "--all-runs", "--json", str(tmp_path / "all.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("== run ") == 2
    assert (tmp_path / f"all.{a.run_id}.json").exists() and (tmp_path / f"all.{b.run_id}.json").exists()
    assert main(["analyze", str(tmp_path), "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-trace: error:") and err.count("\n") == 1


def test_scheduled_windows_combine_only_within_their_run(olmoe, tmp_path):
    sched = dict(wait=0, warmup=0, active=2, repeat=2)
    with torch.no_grad(), moe_trace.profile(olmoe, mode="kineto", logdir=tmp_path, schedule=sched) as first:
        _generate(olmoe, 5)
    assert len(first.trace_files) == 2  # two windows, one run id
    with torch.no_grad(), moe_trace.profile(olmoe, mode="kineto", logdir=tmp_path) as second:
        _generate(olmoe, 3, seed=1)
    rid = first.report().run_id
    assert {read_trace(f).run_id for f in first.trace_files} == {rid}
    assert [f.name.count(rid) for f in first.trace_files] == [1, 1]
    with pytest.warns(UserWarning, match="holds 2 runs"):
        newest = analyze(tmp_path)
    assert _counts(newest) == _counts(second.report())
    windows = analyze(tmp_path, run=rid)
    assert _counts(windows) == _counts(first.report())  # counts from the latest window, not summed
    assert len(windows.parts) == 1


def test_different_models_never_combine_even_with_one_run_id(olmoe, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_TRACE_RUN_ID", "samejob")
    qwen = build_tiny_model("qwen2_moe")
    reports = {}
    for name, model in (("olmoe", olmoe), ("qwen", qwen)):
        with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=tmp_path) as run:
            _generate(model, 2)
        reports[name] = run.report()
    ids = {r.run_id for r in reports.values()}
    assert all(i.startswith("samejob") for i in ids)
    both = analyze(tmp_path, all_runs=True)
    assert len(both) == 2
    fams = sorted(r.to_dict()["model"]["family"] for r in both.values())
    assert fams == ["olmoe", "qwen2_moe"]
    for r in both.values():
        want = reports["olmoe" if r.to_dict()["model"]["family"] == "olmoe" else "qwen"]
        assert _counts(r) == _counts(want)
        assert r.to_dict()["totals"] == want.to_dict()["totals"]


def test_no_run_overwrites_another(tmp_path):
    run, steps = make_run()
    run.run_id = "abc123-0"
    raw = synthetic_gpu_raw()
    proc = {"dist_rank": None, "hostname": "h", "pid": 7, "run_id": run.run_id}
    first = write_run_traces([raw], run, steps, tmp_path, process=proc)
    again = write_run_traces([raw, raw], run, steps, tmp_path, process=proc)  # same id, same process
    names = [p.name for p in first + again]
    assert names == ["h_7.abc123-0.pt.trace.json.gz", "h_7.abc123-0-1.pt.trace.json.gz",
                     "h_7.abc123-0.1.pt.trace.json.gz"]
    assert len({p.stat().st_ino for p in first + again}) == 3
    assert trace_file_name("rank1_h_7", "x-0", 2) == "rank1_h_7.x-0.2.pt.trace.json.gz"
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]  # no temporary file left behind


def test_ranks_of_one_job_share_the_run_id_without_collectives():
    base = {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
    r0, r1 = job_token(base), job_token(dict(base, LOCAL_RANK="1"))
    assert r0 == r1 and r0[1] == "torchrun-local" and str(os.getppid()) in r0[0]
    assert job_token(dict(base, TORCHELASTIC_RESTART_COUNT="1")) != r0  # a restarted job is a new run
    elastic = dict(base, TORCHELASTIC_RUN_ID="a1b2")
    assert job_token(elastic) == job_token(dict(elastic, LOCAL_RANK="1")) == ("a1b2/0", "torchelastic")
    assert job_token(dict(base, TORCHELASTIC_RUN_ID="none"))[1] == "torchrun-local"  # torchrun's default id
    multi = dict(base, WORLD_SIZE="4", LOCAL_WORLD_SIZE="2")
    assert job_token(multi) == job_token(dict(multi, LOCAL_RANK="1")) and job_token(multi)[1] == "torchrun-master"
    assert job_token({})[1] == "uuid" and job_token({}) != job_token({})  # plain processes: each its own job
    assert job_token({"MOE_TRACE_RUN_ID": "mine"}) == ("mine", "env")
    a, b = new_run_id(elastic), new_run_id(elastic)  # the n-th profile() run of a process: -n
    assert a.split("-")[0] == b.split("-")[0] and int(b.split("-")[1]) == int(a.split("-")[1]) + 1
    assert socket.gethostname()  # (the local token names the host: ranks on two hosts never share one)


def test_old_traces_without_run_id_keep_working(tmp_path):
    raw = synthetic_gpu_raw()
    one, steps = make_run(seed=1)
    two, _ = make_run(seed=2)
    assert one.run_id is None
    # two plain processes (no rank): two runs, never added up
    write_trace(raw, one, steps, tmp_path / "a" / "h_1.pt.trace.json.gz", process={"hostname": "h", "pid": 1})
    write_trace(raw, two, steps, tmp_path / "a" / "h_2.pt.trace.json.gz", process={"hostname": "h", "pid": 2})
    assert "run_id" not in read_metadata(tmp_path / "a" / "h_1.pt.trace.json.gz")["moe_trace"]
    both = analyze(tmp_path / "a", all_runs=True)
    assert sorted(_counts(r) for r in both.values()) == sorted([_counts(Report(one)), _counts(Report(two))])
    assert all(r.to_dict()["run_id"] is None for r in both.values())
    # two ranks of one job: one run, counts added up as before
    for rank, run in enumerate((one, two)):
        write_trace(raw, run, steps, tmp_path / "b" / f"rank{rank}_h_{rank}.pt.trace.json.gz",
                    process={"hostname": "h", "pid": rank, "dist_rank": rank, "world_size": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        job = analyze(tmp_path / "b")
    assert len(job.parts) == 2 and _counts(job) == _counts(Report([one, two]))
