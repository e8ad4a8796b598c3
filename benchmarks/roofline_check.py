"""Check the report's roofline figures against an independent bandwidth measurement, in one command.

1. Independent bandwidth of this device: a large device-to-device copy (`dst.copy_(src)`, bytes copied
   per second and DRAM traffic = 2x that) and a read-only pass (`src.sum()`, bytes read per second),
   each the median of --reps timed with CUDA events after a warm-up.
2. moe-trace's roofline: generate with `profile(mode="kineto")` (GPU range times from the trace) and
   `profile(mode="timing")` (CUDA events); the report's achieved TB/s per phase, and the experts-only
   rate (expert bytes read / experts ms) per layer, next to the measured read bandwidth.

At batch 1 decode a large MoE (Mixtral's 352 MB bf16 experts) is bound by reading expert weights, so the
experts-only rate should come close to the read bandwidth (<= ~1.0 of it) — a rate above it would
mean the byte count is wrong.

    python benchmarks/roofline_check.py                                   # H200: Mixtral-8x7B shapes, 8 layers
    python benchmarks/roofline_check.py --model olmoe-1b-7b --layers 16
    python benchmarks/roofline_check.py --tiny --device cpu --copy-mib 64   # a CPU dry run of the script
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402


def _timed(fn, device: str, reps: int, warmup: int = 3) -> list[float]:
    """Seconds per call of fn, reps times (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def bandwidth(device: str, nbytes: int, reps: int) -> dict:
    n = nbytes // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy = statistics.median(_timed(lambda: dst.copy_(src), device, reps))
    read = statistics.median(_timed(lambda: src.sum(dtype=torch.float32), device, reps))
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"bytes": n * 2, "copy_tbps": n * 2 / copy / 1e12, "copy_dram_traffic_tbps": 2 * n * 2 / copy / 1e12,
            "read_tbps": n * 2 / read / 1e12, "copy_s": copy, "read_s": read}


def build(args):
    if args.tiny:
        from moe_trace.models import build_tiny_model

        return build_tiny_model("olmoe", device=args.device)
    from moe_trace.models.reference import build_reference_model

    return build_reference_model(args.model, num_hidden_layers=args.layers, dtype=torch.bfloat16, device=args.device)


def roofline_of(model, inputs, gen, mode: str, peak) -> dict:
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.generate(**inputs, **gen)  # warm-up (kernels, allocator)
        with moe_trace.profile(model, mode=mode, logdir=tmp) as run:
            model.generate(**inputs, **gen)
        d = run.report(peak=peak).to_dict()
    rf = d["roofline"]
    experts = {}
    for p in ("prefill", "decode"):
        rates = []
        for info, row, layer in zip(run.run_data.layers, rf["layers"], d["layers"]):
            ms = (layer["phases"][p].get("time_ms") or {}).get("experts_ms")
            reads = row["phases"][p]["expert_reads"]
            if ms:
                rates.append(reads * info.expert_bytes / (ms / 1e3) / 1e12)
        experts[p] = {"median_tbps": statistics.median(rates) if rates else None,
                      "max_tbps": max(rates) if rates else None, "layers": rates}
    return {"timing_source": d["timing_source"], "peak": rf["peak"], "phases": rf["phases"],
            "experts_only": experts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-8x7b", help="reference model (moe_trace.models.list_references())")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (memory)")
    ap.add_argument("--tiny", action="store_true", help="the tiny random OLMoE (CPU dry run)")
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--batch", type=int, default=1, help="prompts per generate")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="new tokens")
    ap.add_argument("--copy-mib", type=int, default=4096, help="size of the copied buffer")
    ap.add_argument("--reps", type=int, default=20, help="timed copies / reads (median)")
    ap.add_argument("--peak-tbps", type=float, default=None, help="override the table's peak bandwidth")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the table's peak compute")
    ap.add_argument("--json", default=None, help="write everything here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here (use --tiny --device cpu for a dry run)")
    peak = None
    if args.peak_tbps or args.peak_tflops:
        peak = {k: v for k, v in (("tbps", args.peak_tbps), ("tflops", args.peak_tflops)) if v}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bw = bandwidth(args.device, args.copy_mib << 20, args.reps)
    torch.manual_seed(0)
    model = build(args).eval()
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt), device=args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    result = {"device": name, "model": "tiny-olmoe" if args.tiny else args.model, "layers": args.layers,
              "batch": args.batch, "prompt": args.prompt, "new": args.new, "bandwidth": bw,
              "kineto": roofline_of(model, inputs, gen, "kineto", peak),
              "timing": roofline_of(model, inputs, gen, "timing", peak)}
    print(f"## roofline check on {name}: {result['model']} ({args.layers} layers), batch {args.batch}, "
          f"prompt {args.prompt}, new {args.new}")
    print(f"independent: copy {bw['copy_tbps']:.3f} TB/s copied ({bw['copy_dram_traffic_tbps']:.3f} TB/s DRAM traffic), "
          f"read-only {bw['read_tbps']:.3f} TB/s, {bw['bytes'] / 2**30:.2f} GiB, median of {args.reps}")
    print("| timing | phase | GB read | GFLOP | ms | TB/s (report) | share of peak | experts-only TB/s median (max) "
          "| experts-only / read bw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in ("kineto", "timing"):
        r = result[mode]
        for p in ("prefill", "decode"):
            ph, ex = r["phases"][p], r["experts_only"][p]
            ratio = ex["median_tbps"] / bw["read_tbps"] if ex["median_tbps"] else None
            share = f"{100 * ph['bandwidth_share']:.1f}%" if ph.get("bandwidth_share") is not None else "-"
            print(f"| {r['timing_source']} | {p} | {ph['bytes'] / 1e9:.3f} | {ph['flops'] / 1e9:.2f} | "
                  f"{(ph['time_ms'] or 0):.2f} | {ph['achieved_tbps'] or 0:.3f} | {share} | "
                  f"{ex['median_tbps'] or 0:.3f} ({ex['max_tbps'] or 0:.3f}) | {ratio if ratio is None else round(ratio, 3)} |")
    print(f"peak used: {result['kineto']['peak']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
