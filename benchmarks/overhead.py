"""Overhead of moe-trace's modes vs an uninstrumented generate, and kineto mode vs plain torch.profiler.

Interleaved A/B: every repetition runs each variant once, in a rotating order, after a warm-up;
the table reports medians of the repetitions and the ratio of each variant's median to the
uninstrumented median (kineto also to plain torch.profiler's). Also checks that every variant
generated the same tokens and that the report counts equal a plain reference hook, and compares
per-layer GPU time from the trace with the CUDA-event tier.

    python benchmarks/overhead.py --model olmoe-1b-7b --batch 1 --prompt 128 --new 64 --reps 5
    python benchmarks/overhead.py --tiny --device cpu --reps 2      # a CPU dry run of the script
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402
from benchmarks.common import reference_counter  # noqa: E402

VARIANTS = ("base", "stats", "timing", "kineto", "torch_profiler")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args):
    if args.tiny:
        from moe_trace.models import build_tiny_model

        return build_tiny_model("olmoe", device=args.device, num_hidden_layers=args.layers or 3)
    from moe_trace.models.reference import build_reference_model

    return build_reference_model(args.model, num_hidden_layers=args.layers, dtype=torch.bfloat16, device=args.device)


def run_variant(name, model, inputs, gen, device, tmp: Path):
    """One timed generate; returns (seconds, tokens, extra)."""
    extra = {}
    gc.collect()  # garbage of earlier variants (trace parsing) must not be collected inside this timing
    sync(device)
    if name == "base":
        t0 = time.perf_counter()
        out = model.generate(**inputs, **gen)
        sync(device)
        return time.perf_counter() - t0, out, extra
    if name == "torch_profiler":
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        path = tmp / "plain.pt.trace.json.gz"
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            out = model.generate(**inputs, **gen)
            sync(device)
        prof.export_chrome_trace(str(path))  # both profiler variants are timed up to a written trace
        dt = time.perf_counter() - t0
        extra["trace_bytes"] = path.stat().st_size
        extra["trace_bytes_uncompressed"] = _uncompressed(path)
        return dt, out, extra
    logdir = tmp / name
    shutil.rmtree(logdir, ignore_errors=True)
    t0 = time.perf_counter()
    with moe_trace.profile(model, mode=name, logdir=logdir) as run:
        out = model.generate(**inputs, **gen)
        sync(device)
    dt = time.perf_counter() - t0  # includes reading counters (and, for kineto, writing the trace)
    extra["report"] = run.report().to_dict()
    if name == "kineto":
        f = run.trace_files[0]
        extra["trace_bytes"] = f.stat().st_size
        extra["trace_bytes_uncompressed"] = _uncompressed(f)
        extra["analyzed"] = moe_trace.analyze(logdir).to_dict()
    return dt, out, extra


def _uncompressed(path: Path) -> int:
    with gzip.open(path, "rb") as f:
        return sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))


def same_run_checks(model, inputs, gen, tmp: Path) -> dict:
    """Untimed checks, each inside ONE generate: reference counts from plain hooks vs the report, and
    per-layer GPU time from the trace vs CUDA events recorded in the same run."""
    seen, hs = reference_counter(model)
    logdir = tmp / "check"
    shutil.rmtree(logdir, ignore_errors=True)
    try:
        with moe_trace.profile(model, mode="kineto", logdir=logdir, cuda_events=True) as run:
            model.generate(**inputs, **gen)
    finally:
        for h in hs:
            h.remove()
    rep = run.report().to_dict()
    ref = [s[:-1].cpu().tolist() for s in seen]
    out = {"counts_equal_reference": all(l["expert_counts"] == r for l, r in zip(rep["layers"], ref))}
    # stats mode counts at the router after the first forward: check it against the experts' inputs too
    seen, hs = reference_counter(model)
    try:
        with moe_trace.profile(model, mode="stats") as srun:
            model.generate(**inputs, **gen)
    finally:
        for h in hs:
            h.remove()
    out["stats_counts_equal_reference"] = all(
        l["expert_counts"] == s[:-1].cpu().tolist() for l, s in zip(srun.report().to_dict()["layers"], seen))
    trace = moe_trace.analyze(logdir).to_dict()
    out["analyze_counts_equal_report"] = [l["expert_counts"] for l in trace["layers"]] == \
        [l["expert_counts"] for l in rep["layers"]]
    out["trace_timing_source"] = trace["timing_source"]
    out["event_timing_source"] = rep["timing_source"]
    for part in ("router_ms", "experts_ms", "shared_ms"):
        a = sum((l.get("time_ms") or {}).get(part) or 0 for l in trace["layers"])
        b = sum((l.get("time_ms") or {}).get(part) or 0 for l in rep["layers"])
        if a or b:
            out[part] = {"trace": round(a, 3), "cuda_events": round(b, 3), "ratio": round(a / b, 4) if b else None}
            # per phase: prefill is GPU-bound (events and trace spans measure the same kernels); decode at
            # small batch is launch-bound (an event pair also holds the GPU's wait for the host)
            for phase in ("prefill", "decode"):
                pa = sum((l["phases"][phase].get("time_ms") or {}).get(part) or 0 for l in trace["layers"])
                pb = sum((l["phases"][phase].get("time_ms") or {}).get(part) or 0 for l in rep["layers"])
                out[part][phase] = round(pa / pb, 4) if pb else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (memory)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny random OLMoE (CPU dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None, help="write all timings here")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True): the uninstrumented run repeats itself exactly, "
                         "so every variant's tokens can be compared exactly (also at batch 16)")
    args = ap.parse_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    variants = args.variants.split(",")
    torch.manual_seed(0)
    model = build(args).eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt), device=args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    tmp = Path(tempfile.mkdtemp(prefix="moe_bench_"))
    times = {v: [] for v in variants}
    extras = {}
    tokens = {}
    with torch.no_grad():
        for v in variants:  # warm-up: one untimed run of each variant
            run_variant(v, model, inputs, gen, args.device, tmp)
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                dt, out, extra = run_variant(v, model, inputs, gen, args.device, tmp)
                times[v].append(dt)
                tokens.setdefault(v, []).append(out)
                extras[v] = extra
                print(f"rep {rep} {v:<15} {dt:8.3f} s", flush=True)
        checks = same_run_checks(model, inputs, gen, tmp)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    gen_tokens = args.batch * args.new
    print(f"\n## {args.model if not args.tiny else 'tiny-olmoe'}  batch {args.batch}  prompt {args.prompt}  "
          f"new {args.new}  reps {args.reps}  device {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    print("| variant | median s | min s | max s | × base | × torch.profiler | trace bytes/token (gz) | trace bytes/token (json) |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        tb = extras[v].get("trace_bytes")
        tu = extras[v].get("trace_bytes_uncompressed")
        vs_prof = f"{med[v] / med['torch_profiler']:.3f}" if "torch_profiler" in med and v in ("kineto", "torch_profiler") else ""
        print(f"| {v} | {med[v]:.3f} | {min(times[v]):.3f} | {max(times[v]):.3f} | {med[v] / med['base']:.3f} | {vs_prof} | "
              f"{'' if tb is None else f'{tb / gen_tokens:.0f}'} | {'' if tu is None else f'{tu / gen_tokens:.0f}'} |")
    # correctness: the uninstrumented run itself may be non-deterministic (bf16 kernels), so compare
    # each variant's tokens with the base tokens of the same repetition and report base-vs-base too.
    base_det = all(torch.equal(t, tokens["base"][0]) for t in tokens["base"])
    same = {v: sum(bool(torch.equal(a, b)) for a, b in zip(tokens[v], tokens["base"])) for v in variants}
    match = {v: float(torch.stack([(a == b).float().mean() for a, b in zip(tokens[v], tokens["base"])]).mean())
             for v in variants}
    base_vs_first = float(torch.stack([(t == tokens["base"][0]).float().mean() for t in tokens["base"]]).mean())
    print(f"\nuninstrumented runs identical to each other: {base_det} "
          f"(mean fraction of tokens equal to the first uninstrumented run: {base_vs_first:.4f})")
    print("runs with tokens identical to the same repetition's base:", {v: f"{same[v]}/{args.reps}" for v in variants})
    print("mean fraction of equal tokens vs base:", {v: round(m, 4) for v, m in match.items()})
    print("same-run checks:", json.dumps(checks))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times, "median": med, "same_tokens": same,
                                                "base_deterministic": base_det, "checks": checks}))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
