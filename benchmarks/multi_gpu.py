"""Several GPUs: one process over 2 GPUs (device_map), and one replica per rank under torchrun.

    python benchmarks/multi_gpu.py device-map --layers 8 --out OUT       # one process, layers split over GPUs
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py ranks --out OUT   # one replica per GPU, a trace per rank

Checks: tokens identical with profiling on/off, report counts equal a plain reference hook, the
report and the trace split per device, analyze() of the per-rank traces combines them, merge()
gives one valid timeline.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402
from benchmarks.common import reference_counter  # noqa: E402
from moe_trace.models.reference import build_reference_model  # noqa: E402
from moe_trace.trace import merge_traces, validate_trace  # noqa: E402


def device_map_run(args) -> dict:
    from accelerate import dispatch_model, infer_auto_device_map

    torch.manual_seed(0)
    model = build_reference_model(args.model, num_hidden_layers=args.layers, dtype=torch.bfloat16, device="cpu").eval()
    layer_cls = type(model.model.layers[0]).__name__
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    per_gpu = f"{int(size / 2 / 2**30) + 2}GiB"
    dmap = infer_auto_device_map(model, max_memory={0: per_gpu, 1: "70GiB"}, no_split_module_classes=[layer_cls])
    model = dispatch_model(model, dmap)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt), device="cuda:0")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base = model.generate(**inputs, **gen)
        seen, handles = reference_counter(model)
        logdir = Path(args.out) / "device_map"
        with moe_trace.profile(model, mode="kineto", logdir=logdir, cuda_events=True) as run:
            out = model.generate(**inputs, **gen)
        for h in handles:
            h.remove()
    rep = run.report().to_dict()
    trace = moe_trace.analyze(logdir).to_dict()
    result = {
        "layer_devices": sorted({l["device"] for l in rep["layers"]}),
        "tokens_identical": bool(torch.equal(out, base)),
        "counts_equal_reference": all(l["expert_counts"] == s[:-1].cpu().tolist() for l, s in zip(rep["layers"], seen)),
        "devices_report": [{k: d[k] for k in ("device", "layers", "tokens", "router_ms", "experts_ms", "peak_memory_bytes")}
                           | {"flops": d["flops"]["total"], "k_hist": {p: d["phases"][p]["k_hist"] for p in d["phases"]}}
                           for d in rep["devices"]],
        "devices_trace": [{k: d[k] for k in ("device", "layers", "tokens", "router_ms", "experts_ms")}
                          for d in trace["devices"]],
        "trace_valid": validate_trace(run.trace_files[0]) == [],
        "trace_gpu_pids": sorted(_gpu_pids(run.trace_files[0])),
    }
    print(run.report())
    return result


def _gpu_pids(path) -> set:
    import gzip

    pids = set()
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    for e in data["traceEvents"]:
        if e.get("cat") in ("kernel", "gpu_user_annotation"):
            pids.add(e.get("pid"))
    return pids


def ranks_run(args) -> dict | None:
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    torch.manual_seed(0)
    model = build_reference_model(args.model, num_hidden_layers=args.layers, dtype=torch.bfloat16,
                                  device=f"cuda:{rank}").eval()
    g = torch.Generator().manual_seed(100 + rank)  # different prompts per rank
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), generator=g).to(f"cuda:{rank}")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    logdir = Path(args.out) / "ranks"
    with torch.no_grad():
        base = model.generate(**inputs, **gen)
        with moe_trace.profile(model, mode="kineto", logdir=logdir) as run:
            out = model.generate(**inputs, **gen)
    same = torch.tensor([int(torch.equal(out, base))], device=f"cuda:{rank}")
    dist.all_reduce(same)
    counts = run.report().to_dict()
    mine = torch.tensor([l["expert_counts"] for l in counts["layers"]], device=f"cuda:{rank}")
    total = mine.clone()
    dist.all_reduce(total)
    dist.barrier()
    result = None
    if rank == 0:
        files = sorted(str(p.name) for p in logdir.glob("*.pt.trace.json.gz"))
        combined = moe_trace.analyze(logdir).to_dict()
        merged = Path(args.out) / "merged.json.gz"
        merge_traces(logdir, merged)
        result = {
            "world_size": dist.get_world_size(),
            "trace_files": files,
            "tokens_identical_all_ranks": int(same.item()) == dist.get_world_size(),
            "analyze_sums_ranks": [l["expert_counts"] for l in combined["layers"]] == total.cpu().tolist(),
            "combined_devices": [d["device"] for d in combined["devices"]],
            "merged_valid": validate_trace(merged) == [],
            "merged_bytes": merged.stat().st_size,
        }
    dist.barrier()
    dist.destroy_process_group()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["device-map", "ranks"])
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--out", default="runs/multi_gpu")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = device_map_run(args) if args.what == "device-map" else ranks_run(args)
    if result is not None:
        text = json.dumps(result, indent=1)
        print(text)
        (Path(args.out) / f"{args.what}.json").write_text(text)


if __name__ == "__main__":
    main()
