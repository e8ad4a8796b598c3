"""Interleaved A/B of `read_trace` between two checkouts (CPU seconds of one read, best of 3 per launch).

    python benchmarks/reader_ab.py OLD_CHECKOUT NEW_CHECKOUT TRACE [--rounds 5]

Each round runs OLD then NEW in fresh subprocesses on the same file (e.g. the moe-trace full trace
that `benchmarks/trace_parse_bench.py --keep --workdir DIR` leaves in DIR); prints every sample and
the medians, and the NEW/OLD ratio of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from moe_trace.trace.reader import read_trace
read_trace(sys.argv[2], progress=False)
ts = []
for _ in range(3):
    t = time.process_time(); read_trace(sys.argv[2], progress=False); ts.append(time.process_time() - t)
print(min(ts))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("trace")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    got: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(a.rounds):
        for k in ("old", "new"):
            out = subprocess.run([sys.executable, "-c", _CHILD, getattr(a, k), a.trace], capture_output=True,
                                 text=True, check=True).stdout
            got[k].append(float(out.strip().splitlines()[-1]))
    for k, v in got.items():
        print(f"{k}: median {statistics.median(v):.4f} s  ({', '.join(f'{x:.4f}' for x in v)})")
    print(f"new/old: {statistics.median(got['new']) / statistics.median(got['old']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
