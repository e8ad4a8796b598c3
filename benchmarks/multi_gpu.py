"""Several GPUs: one process over 2 GPUs (device_map), and one replica per rank under torchrun.

    python benchmarks/multi_gpu.py device-map --layers 8 --out OUT       # one process, layers split over GPUs
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py ranks --out OUT   # one replica per GPU, a trace per rank
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py parallel --mode tp|ep --ckpt CKPT --out OUT
                                                        # transformers' own tensor / expert parallel (NCCL)
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py parallel --mode ep --device cpu --tiny --out OUT
                                                        # the same on CPU (gloo) with the tiny OLMoE: a dry run

Checks: tokens identical with profiling on/off, report counts equal a plain reference hook, the
report and the trace split per device, analyze() of the per-rank traces combines them, merge()
gives one valid timeline. `parallel` loads a checkpoint with a transformers DistributedConfig
(tp: tp_plan="auto"; ep: tp_size=ep_size=world size); both ranks run the same batch, so analyze()
must count it once, and under EP it reports the assignments per expert-parallel rank.
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


def _parallel_checkpoint(args, rank: int) -> Path:
    """Rank 0 saves the random-weight checkpoint once (marker file `READY` when complete); the other
    ranks wait for the marker: there is no process group before from_pretrained creates it."""
    import shutil
    import time

    if args.ckpt:
        ckpt = Path(args.ckpt)
    else:
        ckpt = Path(args.out) / ("ckpt_tiny_olmoe" if args.tiny else f"ckpt_{args.model}_{args.layers}L")
    ready = ckpt / "READY"
    if rank == 0 and not ready.exists():
        tmp = ckpt.with_name(ckpt.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if args.tiny:
            from moe_trace.models import save_tiny_checkpoint

            save_tiny_checkpoint("olmoe", tmp, num_hidden_layers=args.layers)
        else:
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu"
            model = build_reference_model(args.model, num_hidden_layers=args.layers, dtype=torch.bfloat16, device=dev)
            model.save_pretrained(tmp)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
        ready.write_text("ok\n")
    deadline = time.monotonic() + args.ckpt_wait
    while not ready.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"rank {rank}: no {ready} after {args.ckpt_wait} s (rank 0 builds the checkpoint)")
        time.sleep(1.0)
    return ckpt


def _global_num_experts(config) -> int:
    cfg = config.get_text_config()
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    raise SystemExit("cannot tell the number of experts from the config")


def _expert_parallel_reference(per_layer: list[list[int]], n: int) -> list[int]:
    """Assignments per EP rank, contiguous placement, from reference bincounts (independent of moe-trace)."""
    width = len(per_layer[0]) // n
    return [sum(sum(c[r * width:(r + 1) * width]) for c in per_layer) for r in range(n)]


def parallel_run(args) -> dict | None:
    """transformers tensor parallel (tp) or expert parallel (ep, beside TP) over the torchrun ranks."""
    import shutil
    import time

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig
    from transformers.utils import logging as hf_logging

    from moe_trace.capture import find_bindings

    hf_logging.disable_progress_bar()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    ckpt = _parallel_checkpoint(args, rank)
    logdir = Path(args.out) / f"parallel_{args.mode}"
    if rank == 0:  # before from_pretrained: no rank can write a trace until every rank joined the group
        shutil.rmtree(logdir, ignore_errors=True)
    dcfg = (DistributedConfig(tp_plan="auto") if args.mode == "tp"
            else DistributedConfig(tp_size=world, ep_size=world))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), distributed_config=dcfg).eval()
    load_s = time.perf_counter() - t0
    device = torch.device(f"cuda:{local_rank}") if args.device == "cuda" else torch.device("cpu")
    model_device = next(model.parameters()).device
    if model_device.type != device.type:
        raise SystemExit(f"rank {rank}: transformers placed the model on {model_device}, not {args.device} "
                         "(it picks the accelerator itself; for --device cpu on a GPU host set CUDA_VISIBLE_DEVICES=)")
    assert dist.is_initialized() and dist.get_rank() == rank, "from_pretrained did not join the torchrun group"
    num_experts = _global_num_experts(model.config)
    g = torch.Generator().manual_seed(100)  # the same prompts on every rank: TP/EP ranks share one batch
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (args.batch, args.prompt), generator=g)
    ids = ids.to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    # reference: plain pre-hooks on the experts modules, counted on the device over GLOBAL expert ids
    # (bin E collects ids outside [0, E)); moe-trace is not involved
    bindings = find_bindings(model)
    seen = [torch.zeros(num_experts + 1, dtype=torch.int64, device=model_device) for _ in bindings]

    def make(i):
        def hook(mod, a, kw):
            idx = kw.get("top_k_index", a[1] if len(a) > 1 else None)
            if hasattr(idx, "full_tensor"):  # a DTensor: the global routing
                idx = idx.full_tensor()
            idx = idx.reshape(-1).long()
            seen[i].index_add_(0, idx.clamp(0, num_experts), torch.ones_like(idx))
        return hook

    with torch.no_grad():
        base = model.generate(**inputs, **gen)
        handles = [b.experts[0].register_forward_pre_hook(make(i), with_kwargs=True) for i, b in enumerate(bindings)]
        try:
            t0 = time.perf_counter()
            with moe_trace.profile(model, mode="kineto", logdir=logdir) as run:
                out = model.generate(**inputs, **gen)
            gen_s = time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()
    rep = run.report().to_dict()
    mine = {
        "rank": rank,
        "tokens": out.cpu().tolist(),
        "on_off_identical": bool(torch.equal(out, base)),
        "reference": [s[:-1].cpu().tolist() for s in seen],
        "reference_out_of_range": int(sum(int(s[-1]) for s in seen)),
        "counts": [l["expert_counts"] for l in rep["layers"]],
        "parallel": run.run_data.settings.get("parallel"),
        "experts_per_module": int(getattr(bindings[0].experts[0], "num_experts", -1)),
        "model_device": str(model_device),
        "load_s": round(load_s, 2),
        "gen_s": round(gen_s, 3),
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    dist.barrier()  # every rank's trace is written (profile() exit) before rank 0 reads them
    result = None
    if rank == 0:
        files = sorted(p.name for p in logdir.glob("*.pt.trace.json.gz"))
        combined = moe_trace.analyze(logdir).to_dict()
        counts = [l["expert_counts"] for l in combined["layers"]]
        merged = Path(args.out) / f"parallel_{args.mode}_merged.json.gz"
        merge_traces(logdir, merged)
        ep = combined.get("expert_parallel")
        ref0 = everyone[0]["reference"]
        result = {
            "mode": args.mode,
            "world_size": world,
            "model": "tiny-olmoe" if args.tiny else args.model,
            "layers": len(combined["layers"]),
            "num_experts": num_experts,
            "batch": [args.batch, args.prompt, args.new],
            "model_devices": [m["model_device"] for m in everyone],
            "parallel": [m["parallel"] for m in everyone],
            "experts_per_module": [m["experts_per_module"] for m in everyone],
            "tokens_identical_across_ranks": all(m["tokens"] == everyone[0]["tokens"] for m in everyone),
            "tokens_identical_profiling_on_off": all(m["on_off_identical"] for m in everyone),
            "counts_equal_reference_all_ranks": all(m["counts"] == m["reference"] and m["reference_out_of_range"] == 0
                                                    for m in everyone),
            "reference_identical_across_ranks": all(m["reference"] == ref0 for m in everyone),
            "analyze_counts_batch_once": counts == everyone[0]["counts"],
            "analyze_counts_summed_over_ranks": counts == [[world * x for x in c] for c in everyone[0]["counts"]],
            "tokens": {"analyze_total": combined["totals"]["tokens"], "rank0_total": rep["totals"]["tokens"],
                       "forward_calls": {p: combined["phases"][p]["forward_calls"] for p in combined["phases"]}},
            "timing_source": combined["timing_source"],
            "devices": [{"device": d["device"], "tokens": d["tokens"], "router_ms": _r(d["router_ms"]),
                         "experts_ms": _r(d["experts_ms"])} for d in combined["devices"]],
            "expert_parallel": None if not ep else {
                "ep_size": ep["ep_size"], "source": ep["source"],
                "ranks": [[r["ep_rank"], r["experts"], r["assignments"], round(r["share"], 4)] for r in ep["ranks"]],
                "imbalance": _r(ep["imbalance"]),
                "per_layer_imbalance_max": _r(max((x for x in ep["per_layer_imbalance"] if x is not None),
                                                  default=None)),
                "phases": {p: v["assignments"] for p, v in ep["phases"].items()},
                "matches_reference": [r["assignments"] for r in ep["ranks"]]
                                     == _expert_parallel_reference(ref0, ep["ep_size"]),
            },
            "trace_files": files,
            "merged_valid": validate_trace(merged) == [],
            "merged_bytes": merged.stat().st_size,
            "load_s": [m["load_s"] for m in everyone],
            "profiled_generate_s": [m["gen_s"] for m in everyone],
        }
        if args.what_if_ep:
            try:
                wi = moe_trace.analyze(logdir, ep_size=args.what_if_ep).to_dict()["expert_parallel"]
                result["what_if"] = {"ep_size": wi["ep_size"], "source": wi["source"],
                                     "assignments": [r["assignments"] for r in wi["ranks"]],
                                     "imbalance": _r(wi["imbalance"]),
                                     "matches_reference": [r["assignments"] for r in wi["ranks"]]
                                                          == _expert_parallel_reference(ref0, wi["ep_size"])}
            except Exception as exc:  # report it, keep the rest of the summary
                result["what_if"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(moe_trace.analyze(logdir))
    dist.barrier()
    dist.destroy_process_group()
    return result


def _r(x, nd: int = 3):
    return None if x is None else round(float(x), nd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["device-map", "ranks", "parallel"])
    ap.add_argument("--model", default="olmoe-1b-7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--out", default="runs/multi_gpu")
    par = ap.add_argument_group("parallel (transformers DistributedConfig under torchrun)")
    par.add_argument("--mode", choices=["tp", "ep"], default="tp",
                     help="tp: tp_plan='auto'; ep: tp_size=ep_size=world size (EP needs TP or FSDP beside it)")
    par.add_argument("--ckpt", default=None,
                     help="checkpoint dir shared by the ranks; rank 0 saves it (bf16, random weights) if missing")
    par.add_argument("--ckpt-wait", type=float, default=1800.0, help="seconds the other ranks wait for it")
    par.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                     help="cpu: a dry run with gloo (transformers picks the backend from the accelerator: "
                          "on a GPU host also set CUDA_VISIBLE_DEVICES=)")
    par.add_argument("--tiny", action="store_true", help="the tiny random OLMoE (8 experts) instead of --model")
    par.add_argument("--what-if-ep", type=int, default=None,
                     help="also analyze(logdir, ep_size=N): the load per rank of an N-way expert placement")
    args = ap.parse_args()
    if args.what == "parallel" and args.tiny and args.layers == ap.get_default("layers"):
        args.layers = 3
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run_fn = {"device-map": device_map_run, "ranks": ranks_run, "parallel": parallel_run}[args.what]
    result = run_fn(args)
    if result is not None:
        text = json.dumps(result, indent=1)
        if args.what == "parallel":  # compact: one line per key
            print("\n".join(f"{k}: {json.dumps(v)}" for k, v in result.items()))
        else:
            print(text)
        name = f"parallel_{args.mode}" if args.what == "parallel" else args.what
        (Path(args.out) / f"{name}.json").write_text(text)


if __name__ == "__main__":
    main()
