"""moe-trace's own host time inside a profiled generate, measured in the same run as its wall time.

At batch 1 decode is host-bound, so the host time moe-trace adds is the time it adds. Wall-clock
A/B ratios on a shared machine swing by ±40% between repetitions; this number does not: every hook,
`profile()` entry and exit is wrapped with `perf_counter_ns` (top-level calls only), and the sum is
divided by the profiled generate's wall time. Not counted: `nn.Module`'s slower call path when a
module has hooks (~2-3 µs per hooked call on the CPU box).

    python3 benchmarks/self_time.py --model olmoe-1b-7b --reps 5
    python3 benchmarks/self_time.py --tiny --device cpu --reps 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402
from moe_trace.capture.session import ProfileRun  # noqa: E402

ACC: dict[str, int] = defaultdict(int)
_depth = [0]


def _timed(fn, key):
    def wrapper(*a, **k):
        if _depth[0]:
            return fn(*a, **k)
        _depth[0] += 1
        t = time.perf_counter_ns()
        try:
            return fn(*a, **k)
        finally:
            ACC[key] += time.perf_counter_ns() - t
            _depth[0] -= 1
    return wrapper


def instrument() -> None:
    """Wrap every hook moe-trace installs, and profile() entry / exit."""
    for name in ("_router_post", "_experts_pre", "_part_pre", "_part_post"):
        factory = getattr(ProfileRun, name)

        def make(*a, _factory=factory, _name=name, **k):
            return _timed(_factory(*a, **k), _name)
        setattr(ProfileRun, name, make)
    for name in ("_model_pre", "_model_post", "__enter__", "__exit__"):
        setattr(ProfileRun, name, _timed(getattr(ProfileRun, name), name))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        from moe_trace.models import build_tiny_model

        model = build_tiny_model("olmoe", device=args.device)
    else:
        from moe_trace.models.reference import build_reference_model

        model = build_reference_model(args.model, dtype=torch.bfloat16, device=args.device)
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt), device=args.device)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
               do_sample=False, pad_token_id=0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    instrument()
    print(f"## moe-trace host time inside profiled generates: {args.model if not args.tiny else 'tiny-olmoe'}, "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, {args.reps} reps")
    print("| mode | wall s (median) | moe-trace host ms (median) | share of wall | per forward µs | largest parts (ms) |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for mode in ("stats", "timing"):
            walls, selfs, parts = [], [], defaultdict(list)
            for rep in range(args.reps + 1):  # the first is a warm-up
                ACC.clear()
                sync()
                t = time.perf_counter()
                with moe_trace.profile(model, mode=mode) as run:
                    model.generate(ids, **gen)
                    sync()
                wall = time.perf_counter() - t
                if rep:
                    walls.append(wall)
                    selfs.append(sum(ACC.values()) / 1e6)
                    for k, v in ACC.items():
                        parts[k].append(v / 1e6)
            forwards = sum(run.run_data.forward_calls.values())
            med_self = statistics.median(selfs)
            top = sorted(((statistics.median(v), k) for k, v in parts.items()), reverse=True)[:4]
            print(f"| {mode} | {statistics.median(walls):.3f} | {med_self:.1f} | "
                  f"{100 * statistics.median(s / w / 1e3 for s, w in zip(selfs, walls)):.2f}% | "
                  f"{1e3 * med_self / forwards:.0f} | " + ", ".join(f"{k} {v:.1f}" for v, k in top) + " |")


if __name__ == "__main__":
    main()
