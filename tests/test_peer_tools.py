"""HTA 0.5.0 and torch-tb-profiler 0.4.3 read moe-trace's traces: what each tool shows, asserted.

The tools live in a side virtualenv (HTA needs pandas < 3; `.ci/run` builds it from
`.ci/tools-constraints.txt` and exports MOE_TRACE_TOOLS_PYTHON). `tests/peer_tools.py` runs their
parsers there, once, on every trace this module writes (a tiny-model kineto run, full and slim; a
Kineto-shaped GPU trace through `write_trace`, full and slim) plus the GPU traces committed under
tests/data/ (recorded on an H200 with benchmarks/record_gpu_trace.py). Locally the test skips when
the side venv is missing; in CI (CI=true, or MOE_TRACE_TOOLS_PYTHON set as .ci/run does) a
missing venv fails it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
GPU_TRACES = sorted(DATA.glob("gpu_*.pt.trace.json.gz")) if DATA.is_dir() else []


def tools_python() -> str | None:
    exe = os.environ.get("MOE_TRACE_TOOLS_PYTHON") or \
        str(Path(os.environ.get("TMPDIR", "/tmp")) / "moe-trace-tools" / "bin" / "python")
    return exe if Path(exe).is_file() else None


@pytest.fixture(scope="module")
def tools():
    exe = tools_python()
    if exe is None:
        if os.environ.get("MOE_TRACE_TOOLS_PYTHON") or os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the peer-tools virtualenv is missing (MOE_TRACE_TOOLS_PYTHON="
                        f"{os.environ.get('MOE_TRACE_TOOLS_PYTHON')!r}, CI={os.environ.get('CI')!r}): "
                        ".ci/run builds it")
        pytest.skip("peer-tools virtualenv (HTA, torch-tb-profiler) not built; .ci/run builds it, or set "
                    "MOE_TRACE_TOOLS_PYTHON")
    return exe


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    import torch

    import moe_trace
    from moe_trace.models import build_tiny_model, example_inputs
    from moe_trace.trace import write_trace
    from tests.test_trace_fixtures import make_run, synthetic_gpu_raw

    root = tmp_path_factory.mktemp("peer_tools")
    model = build_tiny_model("olmoe")
    inputs = example_inputs(model)
    out = {}
    for slim in (False, True):
        logdir = root / f"cpu_{'slim' if slim else 'full'}"
        with torch.no_grad(), moe_trace.profile(model, mode="kineto", logdir=logdir, slim=slim) as run:
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        out[f"cpu_{'slim' if slim else 'full'}"] = run.trace_files[0]
    run_data, steps = make_run(device="cuda:0")
    for slim in (False, True):
        p = root / f"syn_gpu_{'slim' if slim else 'full'}.pt.trace.json.gz"
        write_trace(synthetic_gpu_raw(), run_data, steps, p, slim=slim)
        out[p.name.split(".")[0]] = p
    for p in GPU_TRACES:
        out[p.name.split(".")[0]] = p
    return out


@pytest.fixture(scope="module")
def shown(tools, traces):
    names = list(traces)
    proc = subprocess.run([tools, str(ROOT / "tests" / "peer_tools.py"), *[str(traces[n]) for n in names]],
                          capture_output=True, text=True, timeout=600, cwd=str(ROOT),
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_TOOLS_JSON ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(line[len("PEER_TOOLS_JSON "):])
    return {n: res[str(traces[n])] for n in names}


def _ok(entry: dict, tool: str) -> dict:
    got = entry[tool]
    assert "error" not in got, got.get("traceback") or got["error"]
    return got


def test_full_cpu_trace(shown):
    tbp = _ok(shown["cpu_full"], "tbp")
    assert tbp["operator_rows"] > 0 and ({"aten::_grouped_mm", "aten::mm"} & set(tbp["operators"]))
    assert tbp["steps"] and all(s["total_us"] > 0 for s in tbp["steps"])
    hta = _ok(shown["cpu_full"], "hta")
    assert hta["ranks"] == [0] and hta["rows"] > 100
    assert "moe_trace/prefill#0" in hta["moe_annotations"]
    assert any(n.endswith("/L000/experts") for n in hta["moe_annotations"])


def test_gpu_trace_full(shown):
    hta = _ok(shown["syn_gpu_full"], "hta")
    assert hta["kernel_rows"] > 0 and hta["kernels_with_launch"] == hta["kernel_rows"]
    assert hta["kernel_breakdown"]["kernels"] > 0
    tbp = _ok(shown["syn_gpu_full"], "tbp")
    assert tbp["has_kernel"] and tbp["kernel_rows"] > 0


@pytest.mark.skipif(not GPU_TRACES, reason="no GPU trace committed under tests/data/ yet "
                                           "(benchmarks/record_gpu_trace.py records one on a GPU)")
def test_committed_gpu_traces(shown):
    for p in GPU_TRACES:
        entry = shown[p.name.split(".")[0]]
        hta = _ok(entry, "hta")
        assert hta["kernel_rows"] > 0 and hta["kernels_with_launch"] > 0
        assert any(n.startswith("moe_trace/") for n in hta["moe_annotations"])
        tbp = _ok(entry, "tbp")
        assert tbp["has_kernel"] and tbp["kernel_rows"] > 0 and tbp["avg_step_us"] > 0
