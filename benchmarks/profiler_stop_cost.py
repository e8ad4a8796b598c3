"""Cost of torch.profiler's own stop and save, with and without `trace_only` (torch >= 2.13).

Interleaved A/B on the tiny OLMoE (CPU): the same generate under a plain `torch.profiler.profile`, then
`__exit__` (the stop) and `export_chrome_trace` (the save) timed apart; medians of --reps; the two
files' sizes are compared (trace_only must not change what is exported).

    python benchmarks/profiler_stop_cost.py [--reps 6] [--new 48]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_trace.capture.recorders import trace_only_config  # noqa: E402
from moe_trace.models import build_tiny_model  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--new", type=int, default=48)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    cfg = trace_only_config(False)
    if not cfg:
        print(f"torch {torch.__version__} has no trace_only: nothing to compare")
        return
    m = build_tiny_model("olmoe", num_hidden_layers=8).eval()
    ids = torch.randint(3, 100, (1, 16))
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    out = Path(tempfile.mkdtemp()) / "t.json"
    res: dict[str, list] = {"default": [], "trace_only": []}
    with torch.no_grad():
        m.generate(input_ids=ids, **gen)
        for rep in range(args.reps):
            for name in (("default", "trace_only") if rep % 2 == 0 else ("trace_only", "default")):
                gc.collect()
                p = profile(activities=[ProfilerActivity.CPU], **(cfg if name == "trace_only" else {}))
                p.__enter__()
                m.generate(input_ids=ids, **gen)
                t1 = time.perf_counter()
                p.__exit__(None, None, None)
                t2 = time.perf_counter()
                p.export_chrome_trace(str(out))
                t3 = time.perf_counter()
                res[name].append((t2 - t1, t3 - t2, os.path.getsize(out)))
    for name, rs in res.items():
        print(f"{name:10s} stop {statistics.median(r[0] for r in rs):.3f} s  save {statistics.median(r[1] for r in rs):.3f} s"
              f"  file {rs[-1][2]} bytes")


if __name__ == "__main__":
    main()
