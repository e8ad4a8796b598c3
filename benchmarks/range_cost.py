"""Cost of one profiler range with the profiler on: torch's record_function vs moe-trace's ProfilerRange
(capture/ranges.py). Best of 7 x 3000 ranges, each variant measured twice, interleaved.

    python benchmarks/range_cost.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_trace.capture.ranges import ProfilerRange  # noqa: E402

NAME = "moe_trace/decode/L000/router"


def record_function(n: int) -> None:
    for _ in range(n):
        r = torch.autograd.profiler.record_function(NAME)
        r.__enter__()
        r.__exit__(None, None, None)


def profiler_range(n: int) -> None:
    for _ in range(n):
        r = ProfilerRange(NAME).__enter__()
        r.__exit__(None, None, None)


def main() -> None:
    best: dict[str, float] = {}
    with profile(activities=[ProfilerActivity.CPU]):
        for f in (record_function, profiler_range, record_function, profiler_range):
            for _ in range(7):
                t = time.perf_counter()
                f(3000)
                best[f.__name__] = min(best.get(f.__name__, 1e9), (time.perf_counter() - t) / 3000 * 1e6)
    print(", ".join(f"{k}: {v:.2f} us per range" for k, v in best.items()))


if __name__ == "__main__":
    main()
