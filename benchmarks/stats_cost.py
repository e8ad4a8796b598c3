"""Where does `stats` (or `--mode timing`) spend host time? cProfile of one profiled generate vs an unprofiled one.

    python3 benchmarks/stats_cost.py --model olmoe-1b-7b
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402
from moe_trace.models.reference import build_reference_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--mode", default="stats", choices=("stats", "timing"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_reference_model(args.model, dtype=torch.bfloat16, device="cuda").eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 128), device="cuda")
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
               do_sample=False, pad_token_id=0)

    def base():
        model.generate(ids, **gen)
        torch.cuda.synchronize()

    def stats():
        with moe_trace.profile(model, mode=args.mode) as run:
            model.generate(ids, **gen)
            torch.cuda.synchronize()
        return run

    with torch.no_grad():
        for _ in range(2):
            base(), stats()
        walls = {"base": [], "stats": []}
        for _ in range(5):
            for name, fn in (("base", base), ("stats", stats)):
                t = time.perf_counter()
                fn()
                walls[name].append(time.perf_counter() - t)
        print({k: sorted(v)[2] for k, v in walls.items()}, "median s")
        for name, fn in (("base", base), ("stats", stats)):
            pr = cProfile.Profile()
            pr.enable()
            fn()
            pr.disable()
            s = io.StringIO()
            st = pstats.Stats(pr, stream=s)
            print(f"== {name}: total {st.total_tt:.3f} s of profiled host time")
            st.sort_stats("tottime").print_stats(12)
            if name == "stats":
                st.sort_stats("cumtime").print_stats("moe_trace", 12)
            print("\n".join(l for l in s.getvalue().splitlines() if l.strip())[:6000])


if __name__ == "__main__":
    main()
