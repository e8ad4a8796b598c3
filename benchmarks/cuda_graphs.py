"""Does `stats` counting survive CUDA graphs?  (GPU only)

1. Manual capture: one decode forward captured with `torch.cuda.graph` while `profile(stats)` is
   active, then replayed N times: do the device counters grow with replays?
2. `torch.compile(mode="reduce-overhead")` + static cache generate under `profile(stats)`: do the
   counts equal an eager run's?

    python benchmarks/cuda_graphs.py
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_trace  # noqa: E402
from moe_trace.models import build_tiny_model  # noqa: E402


def _where(exc: BaseException) -> str:
    import traceback

    frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)]
    return " <- ".join(reversed(frames[-4:]))


IMPL = "batched_mm"  # transformers' grouped_mm path copies from the host: not capturable by hand


def control_capture() -> dict:
    """The same capture with no profiling: is the model itself capturable this way?"""
    model = build_tiny_model("olmoe", device="cuda")
    model.set_experts_implementation(IMPL)
    ids = torch.randint(3, 256, (2, 1), device="cuda")
    with torch.no_grad():
        model(ids, use_cache=False)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                model(ids, use_cache=False)
            return {"captured": True}
        except Exception as exc:
            return {"captured": False, "error": f"{type(exc).__name__}: {exc}"[:200], "where": _where(exc)}


def manual_capture(replays: int = 10) -> dict:
    model = build_tiny_model("olmoe", device="cuda")
    model.set_experts_implementation(IMPL)
    ids = torch.randint(3, 256, (2, 1), device="cuda")
    out = {}
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        with moe_trace.profile(model) as run:
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g):
                    model(ids, use_cache=False)
                for _ in range(replays):
                    g.replay()
                torch.cuda.synchronize()
                out["captured"] = True
            except Exception as exc:  # report what breaks
                out["captured"] = False
                out["error"] = f"{type(exc).__name__}: {exc}"[:200]
                out["where"] = _where(exc)
    if out["captured"]:
        d = run.report().to_dict()
        layer = d["layers"][0]["phases"]["decode"]
        out["host_tokens"] = layer["tokens"]
        out["device_assignments"] = layer["assignments"]
        out["assignments_per_forward"] = 2 * model.config.num_experts_per_tok
        out["replays"] = replays
    return out


def compiled_generate(control: bool = False) -> dict:
    """`control=True`: the same compiled generate with moe-trace never touching the model."""
    import contextlib

    model = build_tiny_model("olmoe", device="cuda")
    ids = torch.randint(3, 256, (2, 8), device="cuda")
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        with moe_trace.profile(model) if not control else contextlib.nullcontext() as eager_run:
            eager = model.generate(ids, **gen)
        out = {}
        try:
            model.generation_config.cache_implementation = "static"
            model.forward = torch.compile(model.forward, mode="reduce-overhead")
            model.generate(ids, **gen)  # compile + warm up
            print("compiled and warmed up", flush=True)
            if control:
                out["ran"] = True
                out["tokens_equal_eager"] = bool(torch.equal(model.generate(ids, **gen), eager))
                return out
            with moe_trace.profile(model) as run:
                comp = model.generate(ids, **gen)
            out["ran"] = True
            out["tokens_equal_eager"] = bool(torch.equal(comp, eager))
            a = [l["expert_counts"] for l in run.report().to_dict()["layers"]]
            b = [l["expert_counts"] for l in eager_run.report().to_dict()["layers"]]
            out["counts_equal_eager"] = a == b
            out["compiled_tokens_seen"] = run.report().to_dict()["layers"][0]["tokens"]
            out["eager_tokens_seen"] = eager_run.report().to_dict()["layers"][0]["tokens"]
        except Exception as exc:
            out["ran"] = False
            out["error"] = f"{type(exc).__name__}: {exc}"[:400]
        finally:  # why compilation is slow under hooks: dynamo breaks the graph at Python-side state
            from torch._dynamo.utils import counters

            breaks = counters.get("graph_break", {})
            out["graph_breaks"] = sum(breaks.values())
            out["graph_break_reasons"] = [str(k)[:160] for k, _ in sorted(breaks.items(), key=lambda kv: -kv[1])[:3]]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-manual", action="store_true", help="skip the manual torch.cuda.graph capture checks")
    ap.add_argument("--compile", action="store_true",
                    help="also a torch.compile(mode='reduce-overhead') generate under profile(stats)")
    ap.add_argument("--compile-control", action="store_true",
                    help="also the same compiled generate without moe-trace (does it crash without us?)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("CUDA graphs need a GPU: CUDA is not available on this machine")
    if not args.skip_manual:
        print("control_capture:", json.dumps(control_capture()), flush=True)
        print("manual_capture:", json.dumps(manual_capture()), flush=True)
    if args.compile_control:
        print("compiled_generate (no moe-trace):", json.dumps(compiled_generate(control=True)), flush=True)
    if args.compile:
        print("compiled_generate:", json.dumps(compiled_generate()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
