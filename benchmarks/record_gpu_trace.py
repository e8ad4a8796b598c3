"""Record the small GPU traces committed under tests/data/ (CI checks HTA / torch-tb-profiler on them).

A tiny random-weight OLMoE (3 layers) on CUDA, greedy, prompt 16, 4 new tokens (5 forwards: 5
ProfilerStep#N), recorded with `moe_trace.profile(mode="kineto")` twice: slim (the default) and
full. Writes `gpu_olmoe_tiny_slim.pt.trace.json.gz` and `gpu_olmoe_tiny_full.pt.trace.json.gz` to
--out (a few hundred KB together) and prints their sizes and validate_trace's verdict.

    python benchmarks/record_gpu_trace.py --out $OUT        # then copy $OUT/gpu_*.gz to tests/data/
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402
from moe_trace.models import build_tiny_model  # noqa: E402
from moe_trace.trace import validate_trace  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new", type=int, default=4)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_tiny_model("olmoe", device=args.device).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 16), device=args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(**inputs, **gen)  # warm-up (CUDA context, cuBLAS handles)
        for slim in (True, False):
            tmp = Path(tempfile.mkdtemp(prefix="moe_rec_"))
            with moe_trace.profile(model, mode="kineto", logdir=tmp, slim=slim) as run:
                model.generate(**inputs, **gen)
            src = run.trace_files[0]
            dst = out / f"gpu_olmoe_tiny_{'slim' if slim else 'full'}.pt.trace.json.gz"
            shutil.copy(src, dst)
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"{dst}: {dst.stat().st_size / 1e3:.1f} KB, validate_trace: {validate_trace(dst) or 'ok'}",
                  flush=True)


if __name__ == "__main__":
    main()
