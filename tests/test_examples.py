"""Every script in examples/ runs with no arguments on the CPU (built-in tiny model) and does what it says."""
from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, tmp_path, monkeypatch, *args: str) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_every_example_is_tested():
    tested = {"quickstart.py", "local_checkpoint.py", "own_profiler.py", "offload.py", "topk_sweep.py",
              "router_kde.py", "seed_profiler.py", "tensor_parallel.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart(tmp_path, monkeypatch, capsys):
    ns = run_example("quickstart.py", tmp_path, monkeypatch)
    d = ns["report"].to_dict()
    assert d["phases"]["decode"]["forward_calls"] == 7 and d["timing_source"] is not None
    assert (tmp_path / "report.json").exists() and "experts" in capsys.readouterr().out


def test_local_checkpoint(tmp_path, monkeypatch, capsys):
    ns = run_example("local_checkpoint.py", tmp_path, monkeypatch)
    d = ns["run"].report().to_dict()
    # the padded batch: pad positions are not counted (padding-aware counting)
    assert d["phases"]["prefill"]["tokens"] == int(ns["batch"]["attention_mask"].sum())
    assert int(ns["batch"]["attention_mask"].sum()) < ns["batch"]["input_ids"].numel()
    assert "->" in capsys.readouterr().out


def test_own_profiler(tmp_path, monkeypatch):
    """A scheduled loop (wait 1, warmup 1, active 2, tensorboard_trace_handler, prof.step()): the file
    the handler wrote analyzes to the live report of the two recorded generates."""
    import moe_trace

    ns = run_example("own_profiler.py", tmp_path, monkeypatch)
    keys = {e.key for e in ns["moe_rows"]}
    assert any(k.endswith("/experts") for k in keys) and any("/decode/" in k for k in keys)
    files = list(ns["out_dir"].glob("*.pt.trace.json*"))
    assert len(files) == 1                                     # the user's handler wrote one file
    back = moe_trace.analyze(ns["out_dir"]).to_dict()
    assert ns["recorded"].to_dict()["layers"] == back["layers"]
    live = moe_trace.Report(ns["run"].kineto.windows[0][1]).to_dict()   # the recorded steps, live
    assert [l["expert_counts"] for l in back["layers"]] == [l["expert_counts"] for l in live["layers"]]
    assert [l["k_hist"] for l in back["layers"]] == [l["k_hist"] for l in live["layers"]]
    for p in ("prefill", "decode"):
        for key in ("forward_calls", "tokens", "padding_tokens"):
            assert back["phases"][p][key] == live["phases"][p][key], (p, key)
    assert back["phases"]["prefill"]["forward_calls"] == 2 and back["phases"]["decode"]["forward_calls"] == 6
    whole = ns["run"].report().to_dict()                       # the whole block: all 4 generates
    assert whole["phases"]["prefill"]["forward_calls"] == 4
    assert sum(sum(l["expert_counts"]) for l in whole["layers"]) > sum(sum(l["expert_counts"]) for l in back["layers"])


def test_offload_counts_equal_the_unoffloaded_model(tmp_path, monkeypatch):
    import torch

    import moe_trace
    from moe_trace.models import example_inputs, load_checkpoint

    ns = run_example("offload.py", tmp_path, monkeypatch)
    assert "disk" in set(ns["model"].hf_device_map.values())
    plain = load_checkpoint(ns["path"])
    with moe_trace.profile(plain) as ref, torch.no_grad():
        plain.generate(**example_inputs(plain, batch=2, prompt_len=8), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False)
    got = [l["expert_counts"] for l in ns["run"].report().to_dict()["layers"]]
    assert got == [l["expert_counts"] for l in ref.report().to_dict()["layers"]]


def test_topk_sweep(tmp_path, monkeypatch):
    ns = run_example("topk_sweep.py", tmp_path, monkeypatch)
    df = ns["result"].to_dataframe()
    assert list(df["value"]) == [1, 2, 4] and np.allclose(df["k_mean_mean"], [1, 2, 4])


def test_router_kde(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    ns = run_example("router_kde.py", tmp_path, monkeypatch)
    assert ns["p"].shape == (ns["logits"].shape[0] - ns["half"], 2)
    assert ((ns["p"] >= 0) & (ns["p"] <= 1)).all()


def test_seed_profiler(tmp_path, monkeypatch):
    ns = run_example("seed_profiler.py", tmp_path, monkeypatch)
    assert not ns["profiler"].running and len(ns["df"]) == 9


@pytest.mark.slow
def test_tensor_parallel_under_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                     if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(EXAMPLES / "tensor_parallel.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "expert parallel (run, 2 ranks)" in proc.stdout and "rank1/cpu" in proc.stdout
