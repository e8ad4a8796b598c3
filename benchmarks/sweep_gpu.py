"""Knob sweeps on a full-size random-weight model on a GPU (tables in docs/experiments.md).

    python3 benchmarks/sweep_gpu.py --model olmoe-1b-7b --out OUT
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_trace.experiments.sweep import run_sweep  # noqa: E402
from moe_trace.models.reference import build_reference_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--out", default="runs/sweep_gpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_reference_model(args.model, dtype=torch.bfloat16, device="cuda").eval()
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), device="cuda")
    inputs = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    for knob, values in (("top-k", [1, 2, 4, 8, 16, 32]), ("active-layers", [4, 8, 12, 16])):
        res = run_sweep(model, knob, values, inputs, repeats=args.repeats, warmup=1, max_new_tokens=args.new,
                        out_dir=Path(args.out) / knob, plots=False, progress=False, model_name=args.model)
        print(f"\n## {args.model} {knob}  batch {args.batch} prompt {args.prompt} new {args.new} repeats {args.repeats}")
        print("| value | prefill ms mean / p90 | decode ms/token mean / p90 | k mean | GFLOP/token | FLOPs × | latency × |")
        print("|---|---|---|---|---|---|---|")
        for r in res.summary:
            steps = max(r.get("decode_steps_mean") or 1, 1)
            print(f"| {r['value']} | {r['prefill_ms_mean']:.1f} / {r['prefill_ms_p90']:.1f} | "
                  f"{r['decode_ms_mean'] / steps:.2f} / {r['decode_ms_p90'] / steps:.2f} | {r['k_mean_mean']:.2f} | "
                  f"{r['flops_per_token_mean'] / 1e9:.3f} | {r.get('flops_ratio', float('nan')):.3f} | "
                  f"{r.get('latency_ratio', float('nan')):.3f} |", flush=True)
        (Path(args.out) / f"{knob}.summary.json").write_text(json.dumps(res.summary, default=str))


if __name__ == "__main__":
    main()
