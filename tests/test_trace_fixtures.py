"""Shared builders for the trace tests: synthetic RunData + a real torch.profiler CPU trace (no tests here)."""
from __future__ import annotations

import functools
import gzip
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from moe_trace.analysis import LayerInfo, RunData

NUM_LAYERS = 3
NUM_EXPERTS = 8
TOP_K = 2
STEPS = [("prefill", 6), ("decode", 2), ("decode", 2), ("decode", 2)]  # (phase, tokens) of step 0, 1, ...

_TMP = Path(tempfile.mkdtemp(prefix="moe_trace_test_trace_"))


def layers(device: str = "cpu") -> list[LayerInfo]:
    out = []
    for i in range(NUM_LAYERS):
        out.append(LayerInfo(index=i, name=f"model.layers.{i}.mlp", family="qwen2_moe", num_experts=NUM_EXPERTS,
                             top_k=TOP_K, hidden_size=64, expert_dim=32,
                             shared_expert_dim=48 if i != 1 else 0,  # layer 1 has no shared expert
                             device=device))
    return out


def make_run(seed: int = 0, device: str = "cpu", steps=STEPS, extra_unrecorded: int = 0):
    """RunData whose totals are the sum of `steps` (plus `extra_unrecorded` decode steps that no trace holds).

    Returns (run, step_entries) where step_entries are write_trace's `steps` argument.
    """
    rng = np.random.default_rng(seed)
    lay = layers(device)
    run = RunData.empty({"family": "qwen2_moe", "name": "tiny-test"}, lay, max_k=TOP_K)
    run.settings = {"mode": "kineto"}
    entries = []
    all_steps = list(steps) + [("decode", 2)] * extra_unrecorded
    for n, (phase, tokens) in enumerate(all_steps):
        entry = {"step": n, "phase": phase, "tokens": tokens, "layers": {}}
        for i, layer in enumerate(lay):
            k_used = rng.integers(1, TOP_K + 1, size=tokens)  # some tokens use fewer experts
            counts = np.zeros(NUM_EXPERTS, dtype=np.int64)
            for k in k_used:
                for e in rng.choice(NUM_EXPERTS, size=int(k), replace=False):
                    counts[e] += 1
            kh = np.bincount(k_used, minlength=TOP_K + 1).astype(np.int64)
            c = run.counts[phase][i]
            c.tokens += tokens
            c.calls += 1
            c.expert_counts = c.expert_counts + counts
            c.k_hist = c.k_hist + kh
            c.excluded += int(tokens * TOP_K - counts.sum())
            c.top1_prob_sum += 0.5 * tokens
            c.entropy_sum += 1.0 * tokens
            entry["layers"][layer.index] = {"expert_counts": counts.tolist(), "k_hist": kh.tolist()}
        run.forward_calls[phase] += 1
        run.forward_tokens[phase] += tokens
        if n < len(steps):
            entries.append(entry)
    return run, entries


@functools.lru_cache(maxsize=None)
def raw_cpu_trace_path(ops_per_range: int = 4) -> Path:
    """A real torch.profiler CPU trace with moe_trace step and layer ranges (exported once per session)."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    x = torch.randn(16, 16)
    path = _TMP / f"raw_cpu_{ops_per_range}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Profiler won't be using warmup"
        sched = schedule(wait=0, warmup=0, active=len(STEPS), repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=sched,
                 on_trace_ready=lambda p: p.export_chrome_trace(str(path))) as prof:
        for n, (phase, _tokens) in enumerate(STEPS):
            with record_function(f"moe_trace/{phase}#{n}"):
                for i in range(NUM_LAYERS):
                    y = x @ x  # attention stand-in, outside the MoE ranges
                    parts = ("router", "experts", "shared") if i != 1 else ("router", "experts")
                    for part in parts:
                        with record_function(f"moe_trace/{phase}/L{i:03d}/{part}"):
                            for _ in range(ops_per_range):
                                y = torch.relu(y @ x)
            prof.step()
    return path


def raw_cpu_trace(**kw) -> dict:
    return json.loads(raw_cpu_trace_path(**kw).read_text())


def tmpdir(name: str) -> Path:
    d = _TMP / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def synthetic_gpu_raw(seed: int = 0, rank: int | None = None, base_ns: int = 1_790_857_026_000_000_000,
                      host_pid: int = 4242, devices=(0,)) -> dict:
    """A small Kineto-shaped trace of a GPU run: CPU ranges plus kernels and GPU annotations per device.

    Layer i runs on devices[i % len(devices)] (a device_map split). Timestamps are Kineto-style floats
    with 3 decimals; GPU annotations are padded by 1 ns like Kineto does.
    """
    rnd = random.Random(seed)
    ev: list[dict] = [
        {"ph": "M", "name": "process_name", "ts": 0.0, "pid": host_pid, "tid": 0, "args": {"name": "python"}},
        {"ph": "M", "name": "process_labels", "ts": 0.0, "pid": host_pid, "tid": 0, "args": {"labels": "CPU"}},
    ]
    for d in devices:
        ev.append({"ph": "M", "name": "process_name", "ts": 0.0, "pid": d, "tid": 0, "args": {"name": "python"}})
        ev.append({"ph": "M", "name": "process_labels", "ts": 0.0, "pid": d, "tid": 0, "args": {"labels": f"GPU {d}"}})
    t = 4_532_332_491_000_000  # ns
    gpu_t = {d: t for d in devices}
    ext = 0
    corr = 0

    def us(ns: int) -> float:
        return round(ns / 1000.0, 3)

    for n, (phase, _tok) in enumerate(STEPS):
        step_start = t
        t += 5_000
        for i in range(NUM_LAYERS):
            dev = devices[i % len(devices)]
            parts = ("router", "experts", "shared") if i != 1 else ("router", "experts")
            for part in parts:
                ext += 1
                r_start = t
                k_first = k_last = None
                for _ in range(3):
                    corr += 1
                    launch = t + 1_000
                    ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": host_pid,
                               "tid": host_pid, "ts": us(launch), "dur": 4.0,
                               "args": {"External id": ext, "cbid": 211, "correlation": corr}})
                    ks = max(gpu_t[dev] + 1_000, launch + 3_000)
                    kd = rnd.randint(5_000, 20_000)
                    ev.append({"ph": "X", "cat": "kernel", "name": f"void kern_{part}<float>(int)", "pid": dev,
                               "tid": 7, "ts": us(ks), "dur": us(kd),
                               "args": {"External id": ext, "device": dev, "stream": 7, "correlation": corr,
                                        "grid": [32, 1, 1], "block": [128, 1, 1]}})
                    ev.append({"ph": "s", "id": corr, "pid": host_pid, "tid": host_pid, "ts": us(launch),
                               "cat": "ac2g", "name": "ac2g"})
                    ev.append({"ph": "f", "id": corr, "pid": dev, "tid": 7, "ts": us(ks), "cat": "ac2g",
                               "name": "ac2g", "bp": "e"})
                    gpu_t[dev] = ks + kd
                    k_first = ks if k_first is None else k_first
                    k_last = ks + kd
                    t = launch + 6_000
                t += 1_000
                name = f"moe_trace/{phase}/L{i:03d}/{part}"
                ev.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": host_pid, "tid": host_pid,
                           "ts": us(r_start), "dur": us(t - r_start), "args": {"External id": ext}})
                ev.append({"ph": "X", "cat": "gpu_user_annotation", "name": name, "pid": dev, "tid": 7,
                           "ts": us(k_first - 1), "dur": us(k_last - k_first + 2), "args": {"External id": ext}})
                t += 1_000
        t += 5_000
        ev.append({"ph": "X", "cat": "user_annotation", "name": f"ProfilerStep#{n}", "pid": host_pid,
                   "tid": host_pid, "ts": us(step_start - 1_000), "dur": us(t - step_start + 2_000), "args": {}})
        ev.append({"ph": "X", "cat": "user_annotation", "name": f"moe_trace/{phase}#{n}", "pid": host_pid,
                   "tid": host_pid, "ts": us(step_start), "dur": us(t - step_start), "args": {}})
        t = max(t, max(gpu_t.values())) + 20_000
    raw = {"schemaVersion": 1, "deviceProperties": [{"id": d, "name": "NVIDIA H100"} for d in devices]}
    if rank is not None:
        raw["distributedInfo"] = {"backend": "nccl", "rank": rank, "world_size": 2}
    raw.update({"displayTimeUnit": "ms", "baseTimeNanoseconds": base_ns, "traceEvents": ev,
                "traceName": "synthetic"})
    return raw


def gzip_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())
