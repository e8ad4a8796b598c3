"""Per-step GPU time of the router / experts / shared ranges (the step timeline, issue 15).

Independent checks: the steps' times add up to the phase totals the report already has; each step's
GPU time equals a sum computed here straight from the raw events (the GPU spans whose External id is
a CPU range inside that step's `moe_trace/<phase>#N` range); a CPU trace says it has no GPU time."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

import moe_trace
from moe_trace.analysis import PHASES
from moe_trace.models import build_tiny_model, example_inputs
from moe_trace.trace import read_trace
from moe_trace.trace.writer import write_trace
from tests.test_trace_fixtures import STEPS, make_run, synthetic_gpu_raw, tmpdir

DATA = Path(__file__).parent / "data"
PARTS = ("router", "experts", "shared")


def _phase_totals(rep: dict, phases=PHASES) -> dict:
    return {p: sum((rep["phases"][ph].get("time_ms") or {}).get(f"{p}_ms") or 0.0 for ph in phases) for p in PARTS}


def _step_sums(steps, key="gpu_ms", phases=PHASES) -> dict:
    return {p: sum(s[key][p] for s in steps if s[key] is not None and s["phase"] in phases) for p in PARTS}


def _by_hand(events: list[dict]) -> dict[int, dict[str, float]]:
    """Per step: GPU ms of each part, from the raw events alone."""
    import re

    steps = [(e["ts"], e["ts"] + e["dur"], int(re.match(r"moe_trace/\w+#(\d+)$", e["name"]).group(1)))
             for e in events if e.get("cat") == "user_annotation" and re.match(r"moe_trace/\w+#\d+$", str(e.get("name")))]
    step_of_ext = {}
    for e in events:
        if e.get("cat") == "user_annotation" and re.match(r"moe_trace/\w+/L\d+/\w+$", str(e.get("name"))):
            for t0, t1, n in steps:
                if t0 <= e["ts"] <= t1:
                    step_of_ext[e["args"]["External id"]] = n
    out: dict[int, dict[str, float]] = {}
    for e in events:
        if e.get("cat") == "gpu_user_annotation" and re.match(r"moe_trace/\w+/L\d+/\w+$", str(e.get("name"))):
            n = step_of_ext[e["args"]["External id"]]
            part = e["name"].rsplit("/", 1)[1]
            out.setdefault(n, dict.fromkeys(PARTS, 0.0))[part] += e["dur"] / 1000.0
    return out


@pytest.mark.parametrize("name", ["gpu_olmoe_tiny_full.pt.trace.json.gz", "gpu_olmoe_tiny_slim.pt.trace.json.gz"])
def test_real_gpu_trace_steps_sum_to_the_phase_totals(name):
    """H200 traces (tests/data): every GPU range span is placed in its step, per phase and in all."""
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{name} not committed")
    td = read_trace(path)
    assert td.timing_source == "kineto_gpu" and td.has_gpu_ranges()
    steps = [s for s in td.step_timeline() if s["recorded"]]
    assert steps and all(s["gpu_ms"] is not None for s in steps)
    assert td.step_gpu_unattributed_ms == [0.0]
    rep = td.report().to_dict()
    for phases in (PHASES, ("prefill",), ("decode",)):
        want, got = _phase_totals(rep, phases), _step_sums(steps, phases=phases)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), phases
    assert _step_sums(steps)["experts"] > 0
    hand = _by_hand(json.loads(gzip.decompress(path.read_bytes()))["traceEvents"])
    for s in steps:
        assert s["gpu_ms"] == pytest.approx(hand.get(s["step"], dict.fromkeys(PARTS, 0.0)), abs=1e-9), s["step"]


@pytest.mark.parametrize("slim", [False, True])
def test_synthetic_two_gpu_trace_per_step_times(slim):
    """Layers on two GPUs (a device_map split): each step's GPU time = the raw events' sum, and the steps
    add up to the report's phase totals; the host time of the ranges is there too."""
    d = tmpdir(f"steptimes_{slim}")
    raw = synthetic_gpu_raw(devices=(0, 1))
    run, steps = make_run(device="cuda:0")
    run.layers[1].device = "cuda:1"
    path = write_trace(raw, run, steps, d / "g.pt.trace.json.gz", slim=slim)
    td = read_trace(path)
    tl = td.step_timeline()
    assert [s["step"] for s in tl] == list(range(len(STEPS)))
    hand = _by_hand(raw["traceEvents"])
    for s in tl:
        assert s["gpu_ms"] == pytest.approx(hand[s["step"]], abs=1e-6)
        assert s["cpu_ms"]["router"] > 0 and s["cpu_ms"]["experts"] > 0
    assert _step_sums(tl) == pytest.approx(_phase_totals(td.report().to_dict()), rel=1e-9)


def test_cpu_trace_says_it_has_no_gpu_time(tmp_path):
    """A CPU run's trace: no GPU ranges, so every step's gpu_ms is None (not zeros); the ranges' host
    time per step adds up to the report's (kineto_cpu) phase totals."""
    model = build_tiny_model("olmoe").eval()
    with moe_trace.profile(model, mode="kineto", logdir=tmp_path) as run, torch.no_grad():
        model.generate(**example_inputs(model, batch=2, prompt_len=6), max_new_tokens=3, min_new_tokens=3,
                       do_sample=False)
    (f,) = run.trace_files
    td = read_trace(f)
    assert td.timing_source == "kineto_cpu" and not td.has_gpu_ranges()
    tl = [s for s in td.step_timeline() if s["recorded"]]
    assert len(tl) == 3 and all(s["gpu_ms"] is None for s in tl)
    assert td.step_gpu_unattributed_ms == [None]
    assert _step_sums(tl, "cpu_ms") == pytest.approx(_phase_totals(td.report().to_dict()), rel=1e-9)
    # and the plugin serves it so
    from tb_plugin.data import default_provider

    out = default_provider(str(tmp_path))
    (proc,) = out["step_timeline"]
    assert proc["gpu_ranges"] is False and all(s["gpu_ms"] is None for s in proc["steps"])
