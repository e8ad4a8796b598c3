"""One-command GPU re-check of issue 13's capture guarantees (random-weight models, no downloads).

Checks, each printed as PASS / FAIL with its numbers (exit status 1 when any fails):

1. tokens identical with profiling on and off (stats, timing, kineto) at batch 1;
2. with --deterministic (torch.use_deterministic_algorithms): tokens identical at batch 16 with a
   LEFT-PADDED batch (prompt lengths differ), and the counts equal a plain reference hook on the
   experts with the pad rows dropped (padding-aware counting);
3. accelerate `cpu_offload(model, execution_device=cuda)`: counters live on the execution device,
   tokens equal the non-offloaded model's and counts equal the reference hook;
4. moe-trace attached to the user's own torch.profiler (tensorboard_trace_handler): the user's file
   holds moe-trace's counters, `analyze(dir)` counts equal the live report;
5. grad on: loss and gradients equal with and without profiling, counts equal a no-grad run;
6. torch.compile with inductor (default, and mode="reduce-overhead": CUDA graphs), compiled before
   the block (stats) and inside it (kineto): counts equal the top-k of the router logits that the
   compiled forward returns (and analyze); the difference from the uncompiled model is printed (in
   bf16 inductor's rounding routes a few near-tied tokens elsewhere; in fp32 it is 0);
7. the user's profiler in its wait phase (schedule wait=1, warmup=1, active=2, repeat=2) found
   without profiler=: two windows, analyze(dir) = the live windows summed.

    python benchmarks/capture_checks.py                       # H200: OLMoE shapes, 4 layers, bf16
    python benchmarks/capture_checks.py --tiny --device cpu   # a CPU dry run (CI-sized)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="olmoe-1b-7b", help="reference model shapes (random weights)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the reference model")
    ap.add_argument("--tiny", action="store_true", help="the tiny random OLMoE instead")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new", type=int, default=16, help="new tokens per generate")
    ap.add_argument("--no-deterministic", action="store_true", help="skip the batch-16 deterministic check")
    ap.add_argument("--no-compile", action="store_true", help="skip the inductor checks (6)")
    args = ap.parse_args(argv)
    if not args.no_deterministic:  # before CUDA initialises
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    import moe_trace
    from benchmarks.common import reference_counter

    dev = args.device
    dtype = torch.float32 if args.tiny else torch.bfloat16

    def build():
        torch.manual_seed(0)
        if args.tiny:
            from moe_trace.models import build_tiny_model

            return build_tiny_model("olmoe", device=dev).eval()
        from moe_trace.models.reference import build_reference_model

        return build_reference_model(args.model, num_hidden_layers=args.layers, dtype=dtype, device=dev).eval()

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    model = build()
    vocab = model.config.get_text_config().vocab_size
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    tmp = Path(tempfile.mkdtemp(prefix="moe_capture_checks_"))

    def generate(m, inputs, mode=None, **kw):
        with torch.no_grad():
            if mode is None:
                out = m.generate(**inputs, **gen)
                sync()
                return out, None
            with moe_trace.profile(m, mode, **kw) as run:
                out = m.generate(**inputs, **gen)
                sync()
        return out, run.report().to_dict()

    def counts(d):
        return [l["expert_counts"] for l in d["layers"]]

    def ref_counts(m, inputs, drop_pad: bool):
        """Plain hooks on the experts (moe_trace-independent); the prefill call's pad rows dropped."""
        seen, handles = reference_counter(m)
        mask = inputs["attention_mask"].reshape(-1).bool()
        state = {"first": True}
        if drop_pad:
            for h in handles:
                h.remove()
            seen = [torch.zeros_like(s) for s in seen]
            from moe_trace.capture import find_bindings

            bindings = find_bindings(m)

            def make(i, E):
                def hook(mod, a, k):
                    idx = k.get("top_k_index", a[1] if len(a) > 1 else None)
                    if idx.shape[0] == mask.numel():
                        idx = idx[mask.to(idx.device)]
                    idx = idx.reshape(-1)
                    seen[i].index_add_(0, idx.clamp(0, E), torch.ones_like(idx))
                return hook
            handles = [b.experts[0].register_forward_pre_hook(make(i, b.info.num_experts), with_kwargs=True)
                       for i, b in enumerate(bindings)]
        try:
            with torch.no_grad():
                m.generate(**inputs, **gen)
        finally:
            for h in handles:
                h.remove()
        return [s[:-1].tolist() for s in seen]

    # 1. batch 1: on == off
    ids = torch.randint(3, vocab, (1, 64), device=dev)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base, _ = generate(model, inp)
    for mode in ("stats", "timing", "kineto"):
        kw = {"logdir": tmp / f"b1_{mode}"} if mode == "kineto" else {}
        out, d = generate(model, inp, mode, **kw)
        check(f"batch 1 tokens identical, {mode}", torch.equal(out, base),
              f"(equal fraction {(out == base).float().mean().item():.4f})")
    ref = ref_counts(model, inp, drop_pad=False)
    check("batch 1 counts = reference hook", counts(d) == ref)

    # 2. deterministic, batch 16, left padded
    if not args.no_deterministic:
        torch.use_deterministic_algorithms(True)
        lens = [8 + 3 * (i % 6) for i in range(16)]
        S = max(lens)
        ids = torch.zeros(16, S, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for b, n in enumerate(lens):
            ids[b, S - n:] = torch.randint(3, vocab, (n,), device=dev)
            mask[b, S - n:] = 1
        inp = {"input_ids": ids, "attention_mask": mask}
        base, _ = generate(model, inp)
        again, _ = generate(model, inp)
        check("batch 16 deterministic: uninstrumented repeats itself", torch.equal(base, again))
        for mode in ("stats", "timing", "kineto"):
            kw = {"logdir": tmp / f"b16_{mode}"} if mode == "kineto" else {}
            out, d = generate(model, inp, mode, **kw)
            check(f"batch 16 (left-padded, deterministic) tokens identical, {mode}", torch.equal(out, base),
                  f"(equal fraction {(out == base).float().mean().item():.4f})")
        pre = d["phases"]["prefill"]
        check("batch 16 padding: prefill tokens = mask sum, padding_tokens = pads",
              pre["tokens"] == sum(lens) and pre["padding_tokens"] == 16 * S - sum(lens),
              f"(tokens {pre['tokens']} vs {sum(lens)}, padding {pre['padding_tokens']} vs {16 * S - sum(lens)})")
        check("batch 16 counts = reference hook without pad rows", counts(d) == ref_counts(model, inp, True))
        torch.use_deterministic_algorithms(False)

    # 3. cpu_offload with the GPU as execution device
    try:
        import accelerate

        ids = torch.randint(3, vocab, (2, 32), device=dev)
        inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        plain_out, plain = generate(model, inp, "stats")
        off = build().to("cpu")
        accelerate.cpu_offload(off, execution_device=torch.device(dev))
        for mode in ("stats", "kineto"):
            kw = {"logdir": tmp / f"off_{mode}"} if mode == "kineto" else {}
            out, d = generate(off, inp, mode, **kw)
            devices = sorted({l["device"] for l in d["layers"]})
            want = torch.device(dev).type
            check(f"cpu_offload({dev}) {mode}: counters on the execution device",
                  all(torch.device(x).type == want for x in devices), f"(devices {devices})")
            check(f"cpu_offload({dev}) {mode}: tokens = non-offloaded model", torch.equal(out.to(plain_out.device), plain_out))
        check(f"cpu_offload({dev}): counts = reference hook", counts(d) == ref_counts(off, inp, False))
        del off
    except ImportError:
        check("cpu_offload", False, "(accelerate is not installed)")

    # 4. attached to the user's own profiler
    from torch.profiler import ProfilerActivity, record_function, tensorboard_trace_handler

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    user_dir = tmp / "user_tb"
    ids = torch.randint(3, vocab, (2, 32), device=dev)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.profiler.profile(activities=acts, on_trace_ready=tensorboard_trace_handler(str(user_dir))) as prof:
        with record_function("user/mine"):
            torch.ones(8, device=dev).sum()
        out, live = generate(model, inp, "kineto", profiler=prof)
    files = list(user_dir.glob("*.pt.trace.json*"))
    back = moe_trace.analyze(user_dir).to_dict() if files else None
    check("own profiler: one user file with moe-trace counters, analyze = live",
          len(files) == 1 and back is not None and counts(back) == counts(live), f"(files {len(files)})")

    # 5. grad on
    model.train()
    ids = torch.randint(3, vocab, (2, 32), device=dev)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out.loss.detach(), g

    torch.use_deterministic_algorithms(not args.no_deterministic)
    l0, g0 = step()
    with moe_trace.profile(model) as run:
        l1, g1 = step()
    model.eval()
    with torch.no_grad(), moe_trace.profile(model) as ref_run:
        model(input_ids=ids)
    check("grad on: loss and gradients unchanged", torch.equal(l0, l1) and all(torch.equal(g0[k], g1[k]) for k in g0))
    check("grad on: counts = no-grad run", counts(run.report().to_dict()) == counts(ref_run.report().to_dict()))

    # 6. inductor (default and reduce-overhead), compiled before / inside the block. The reference is the
    # compiled run's own routing: top-k of the router logits the compiled forward returns
    # (output_router_logits=True). In bf16 inductor's fused kernels round differently from eager, so a
    # few near-tied tokens route to other experts than in the uncompiled model (shown, not failed).
    if not args.no_compile:
        ids = torch.randint(3, vocab, (2, 32), device=dev)
        cfg = model.config.get_text_config()
        k_, n_exp = cfg.num_experts_per_tok, cfg.num_experts

        def routed(outs):
            per = None
            for o in outs:
                c = [torch.bincount(torch.topk(rl.float(), k_, dim=-1).indices.reshape(-1), minlength=n_exp)
                     for rl in o.router_logits]
                per = c if per is None else [a + b for a, b in zip(per, c)]
            return [x.tolist() for x in per]

        fwd = dict(input_ids=ids, use_cache=False, output_router_logits=True)
        with torch.no_grad():
            eager_out = model(**fwd)
            with moe_trace.profile(model) as ref_run:
                for _ in range(3):
                    model(**fwd)
        eager = counts(ref_run.report().to_dict())
        check("eager: counts = top-k of the returned router logits", eager == routed([eager_out] * 3))
        eager_forward = model.forward

        def info(outs, got):
            dc = sum(abs(a - b) for x, y in zip(got, eager) for a, b in zip(x, y))
            dl = max((o.logits.float() - eager_out.logits.float()).abs().max().item() for o in outs)
            return f"(|compiled - eager| counts {dc}, logits max diff {dl:.4f})"

        for cmode in ("default", "reduce-overhead"):
            t = time.perf_counter()
            model.forward = torch.compile(eager_forward, mode=cmode)
            with torch.no_grad():
                model(**fwd)
                with moe_trace.profile(model) as run:
                    outs = [model(**fwd) for _ in range(3)]
            sync()
            got = counts(run.report().to_dict())
            check(f"inductor {cmode} compiled before: counts = compiled run's router-logit top-k",
                  got == routed(outs), f"{info(outs, got)} ({time.perf_counter() - t:.0f} s)")
            model.forward = eager_forward
            with torch.no_grad(), moe_trace.profile(model, "kineto", logdir=tmp / f"ind_{cmode}") as run:
                model.forward = torch.compile(eager_forward, mode=cmode)
                outs = [model(**fwd) for _ in range(3)]
            sync()
            back = moe_trace.analyze(tmp / f"ind_{cmode}").to_dict()
            got = counts(run.report().to_dict())
            check(f"inductor {cmode} compiled inside (kineto): counts = router-logit top-k = analyze",
                  got == routed(outs) == counts(back), info(outs, got))
            model.forward = eager_forward
            torch.compiler.reset()

    # 7. the user's profiler found in its wait phase, two windows
    from torch.profiler import schedule as _schedule

    user_dir = tmp / "user_windows"
    with torch.profiler.profile(activities=acts, schedule=_schedule(wait=1, warmup=1, active=2, repeat=2),
                                on_trace_ready=tensorboard_trace_handler(str(user_dir))) as prof:
        with torch.no_grad(), moe_trace.profile(model, "kineto", logdir=tmp / "unused") as run:
            for n in range(9):
                model(input_ids=torch.randint(3, vocab, (2, 16 if n % 2 == 0 else 1), device=dev))
                prof.step()
    files = list(user_dir.glob("*.pt.trace.json*"))
    wins = [counts(moe_trace.Report(w[1]).to_dict()) for w in run.kineto.windows]
    summed = [[sum(x) for x in zip(*(w[i] for w in wins))] for i in range(len(wins[0]))] if wins else None
    back = moe_trace.analyze(user_dir).to_dict() if files else None
    check("own profiler in its wait phase: attached, 2 windows, analyze = live windows summed",
          run.attached and len(files) == 2 and back is not None and counts(back) == summed, f"(files {len(files)})")

    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {time.perf_counter() - t_start:.0f} s "
          f"on {torch.cuda.get_device_name() if dev.startswith('cuda') else 'cpu'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
