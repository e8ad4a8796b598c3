"""A/B of `stats` mode vs an uninstrumented generate on the CPU tiny model (no GPU needed).

Interleaved: each of `--reps` pairs runs base then stats; prints the medians and their ratio.
Run two checkouts side by side to compare versions:

    python benchmarks/stats_ab_cpu.py
    PYTHONPATH=/path/to/other/checkout python benchmarks/stats_ab_cpu.py
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

import moe_trace
from moe_trace.models import build_tiny_model, example_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new", type=int, default=16)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    model = build_tiny_model("olmoe")
    inputs = example_inputs(model, batch=2, prompt_len=8)
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    def base():
        t = time.perf_counter()
        model.generate(**inputs, **gen)
        return time.perf_counter() - t

    def stats():
        t = time.perf_counter()
        with moe_trace.profile(model):
            model.generate(**inputs, **gen)
        return time.perf_counter() - t

    with torch.no_grad():
        for _ in range(3):
            base(), stats()
        b, s = [], []
        for _ in range(args.reps):
            b.append(base())
            s.append(stats())
    mb, ms = statistics.median(b), statistics.median(s)
    print(f"base {mb * 1e3:.1f} ms  stats {ms * 1e3:.1f} ms  ratio {ms / mb:.3f}  ({moe_trace.__file__})")


if __name__ == "__main__":
    main()
