"""The earlier profiler's routing-analysis helpers, over moe-trace runs and `Report`s.

    results = quick_test(model, prompts, tokenizer, max_new_tokens=30, selector="kneedle")
    compare_routing_behavior(results)     # prints ✓ / ❌ and returns a dict
    print_routing_stats(results[0]["report"])
    get_k_statistics(report)              # {"k_mean", "k_std", "k_min", "k_max", "per_layer", ...}
    per_device_summary(report)            # {device: {...}}
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from moe_trace.analysis.metrics import k_stats
from moe_trace.analysis.report import Report
from moe_trace.analysis.rundata import PHASES
from moe_trace.errors import ConfigError


def _report(obj: Any) -> Report:
    """A Report from a Report, a ProfileRun, a RunData, a quick_test result dict or a report dict."""
    from moe_trace.analysis.rundata import RunData

    if isinstance(obj, Report):
        return obj
    if isinstance(obj, RunData):
        return Report(obj)
    if isinstance(obj, dict) and "report" in obj:
        return _report(obj["report"])
    rep = getattr(obj, "report", None)
    if callable(rep):
        return rep()
    raise ConfigError(f"expected a moe_trace Report (or a run / quick_test result), got {type(obj).__name__}")


def _hist_add(total: dict[int, int], hist: dict[str, int]) -> None:
    for k, n in hist.items():
        total[int(k)] = total.get(int(k), 0) + int(n)


def _hist_array(h: dict[int, int]) -> np.ndarray:
    if not h:
        return np.zeros(1, dtype=np.int64)
    arr = np.zeros(max(h) + 1, dtype=np.int64)
    for k, n in h.items():
        arr[k] = n
    return arr


# ---------------------------------------------------------------------------------------------
def get_k_statistics(report: Any, phase: str | None = None) -> dict[str, Any]:
    """k statistics over every (token, MoE layer) routing decision, and per layer.

    Returns ``{"total_samples", "k_mean", "k_std", "k_min", "k_max", "k_hist", "per_layer":
    {layer_name: {"index", "samples", "k_mean", "k_std", "k_min", "k_max", "k_hist"}}}``; `phase`
    ("prefill" / "decode") restricts to one phase.
    """
    if phase is not None and phase not in PHASES:
        raise ConfigError(f"phase must be one of {', '.join(PHASES)} or None, got {phase!r}")
    d = _report(report).to_dict()
    total: dict[int, int] = {}
    per_layer = {}
    for layer in d["layers"]:
        block = layer if phase is None else layer["phases"][phase]
        hist = {int(k): int(n) for k, n in block["k_hist"].items()}
        _hist_add(total, block["k_hist"])
        st = k_stats(_hist_array(hist))
        per_layer[layer["name"]] = {"index": layer["index"], "samples": int(sum(hist.values())),
                                    "k_mean": st["k_mean"], "k_std": st["k_std"], "k_min": st["k_min"],
                                    "k_max": st["k_max"], "k_hist": st["k_hist"]}
    st = k_stats(_hist_array(total))
    return {"total_samples": int(sum(total.values())), "k_mean": st["k_mean"], "k_std": st["k_std"],
            "k_min": st["k_min"], "k_max": st["k_max"], "k_hist": st["k_hist"], "per_layer": per_layer}


def print_routing_stats(report: Any, file=None) -> dict[str, Any]:
    """Pretty-print the k statistics (the seed's format); returns `get_k_statistics(report)`."""
    s = get_k_statistics(report)
    line = "=" * 80
    out = [line, "ROUTING STATISTICS", line, f"Total samples: {s['total_samples']}", "",
           "Aggregate K Statistics:",
           f"  Mean k: {s['k_mean']:.2f}", f"  Std k:  {s['k_std']:.2f}",
           f"  Min k:  {float(s['k_min']):.1f}", f"  Max k:  {float(s['k_max']):.1f}", "",
           "Per-Layer Statistics:"]
    for name, l in s["per_layer"].items():
        out += [f"  {name}:", f"    Mean k: {l['k_mean']:.2f}", f"    Std k:  {l['k_std']:.2f}",
                f"    Min k:  {float(l['k_min']):.1f}", f"    Max k:  {float(l['k_max']):.1f}",
                f"    Samples: {l['samples']}"]
    out.append(line)
    print("\n".join(out), file=file)
    return s


def per_device_summary(report: Any) -> dict[str, dict[str, Any]]:
    """Per device: layers, tokens, FLOPs, timed ms (None unless mode="timing"), peak memory and k."""
    d = _report(report).to_dict()
    out = {}
    for dev in d["devices"]:
        hist: dict[int, int] = {}
        for p in PHASES:
            _hist_add(hist, dev["phases"][p]["k_hist"])
        st = k_stats(_hist_array(hist))
        ms = [dev.get(k) for k in ("router_ms", "experts_ms", "shared_ms")]
        out[dev["device"]] = {
            "layers": dev["layers"], "tokens": dev["tokens"], "flops": dev["flops"]["total"],
            "flops_breakdown": dict(dev["flops"]),
            "router_ms": dev.get("router_ms"), "experts_ms": dev.get("experts_ms"), "shared_ms": dev.get("shared_ms"),
            "latency_ms": float(sum(m for m in ms if m is not None)) if any(m is not None for m in ms) else None,
            "peak_memory_bytes": dev.get("peak_memory_bytes"),
            "k_mean": st["k_mean"], "k_std": st["k_std"], "k_hist": st["k_hist"],
            "tokens_by_phase": {p: dev["phases"][p]["tokens"] for p in PHASES},
        }
    return out


def print_device_stats(report: Any, file=None) -> dict[str, dict[str, Any]]:
    """One line per device (layers, tokens, GFLOPs, share of FLOPs, ms, memory, k); returns the summary."""
    s = per_device_summary(report)
    total = sum(v["flops"] for v in s.values()) or 1
    lines = ["=" * 80, "PER-DEVICE STATISTICS", "=" * 80]
    for dev, v in s.items():
        ms = "-" if v["latency_ms"] is None else f"{v['latency_ms']:.3f} ms"
        mem = "-" if v["peak_memory_bytes"] is None else f"{v['peak_memory_bytes'] / 2**20:.1f} MiB"
        lines.append(f"  {dev:<14} layers {v['layers']:>3}  tokens {v['tokens']:>8}  GFLOPs {v['flops'] / 1e9:>9.4f} "
                     f"({100 * v['flops'] / total:5.1f}%)  time {ms}  peak mem {mem}  k_mean {v['k_mean']:.2f}")
    if len(s) > 1:
        shares = np.array([v["flops"] for v in s.values()], dtype=float)
        lines.append(f"  load imbalance (max/mean FLOPs): {shares.max() / shares.mean():.3f}")
    print("\n".join(lines), file=file)
    return s


# ---------------------------------------------------------------------------------------------
def quick_test(model: Any, prompts: Sequence[Any], tokenizer: Any = None, max_new_tokens: int = 30,
               selector: Any = None, *, verbose: bool = True) -> list[dict[str, Any]]:
    """Generate for each prompt under its own `moe_trace.profile` run.

    Returns one dict per prompt: ``prompt``, ``input_tokens``, ``output_tokens``, ``text`` (decoded
    with `tokenizer`, else None), ``output_ids``, ``prefill_ms``, ``decode_ms``, ``k_stats``
    (`get_k_statistics`), ``expert_counts`` ({layer name: counts}) and ``report`` (its `Report`).
    """
    from .selectors import resolve_selector
    from .sweep import measure_generate, model_facts, prepare_inputs

    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    prompts = list(prompts)
    sel = resolve_selector(selector)
    facts = model_facts(model)
    inputs = prepare_inputs(model, prompts, tokenizer)
    results = []
    for n, (prompt, inp) in enumerate(zip(prompts, inputs)):
        rec = measure_generate(model, inp, max_new_tokens=max_new_tokens, selector=sel, layers=facts.layers,
                               generate_kwargs={"min_new_tokens": 1}, keep_output=True)
        report = rec["report"]
        ids = rec["output_ids"]
        text = None
        if tokenizer is not None and hasattr(tokenizer, "decode"):
            text = tokenizer.decode(ids[0, rec["prompt_tokens"]:], skip_special_tokens=True)
        d = report.to_dict()
        res = {"prompt": prompt if isinstance(prompt, str) else f"input {n}",
               "input_tokens": rec["prompt_tokens"], "output_tokens": rec["new_tokens"], "text": text,
               "output_ids": ids, "prefill_ms": rec["prefill_ms"], "decode_ms": rec["decode_ms"],
               "k_stats": get_k_statistics(report),
               "expert_counts": {l["name"]: list(l["expert_counts"]) for l in d["layers"]},
               "report": report}
        results.append(res)
        if verbose:
            print(f"[{n}] {res['prompt'][:60]!r}: {res['input_tokens']} -> {res['output_tokens']} tokens, "
                  f"k_mean {res['k_stats']['k_mean']:.2f}")
    return results


def _distribution(counts: Sequence[int]) -> np.ndarray:
    a = np.asarray(counts, dtype=np.float64)
    s = a.sum()
    return a / s if s > 0 else a


def _js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats) of two distributions."""
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * np.log(a[mask] / b[mask])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def compare_routing_behavior(results: Sequence[Any], atol: float = 1e-9, verbose: bool = True) -> dict[str, Any]:
    """Do different prompts route differently? Compares, for each pair of prompts, every MoE layer's
    expert-usage distribution (counts / total) and the k distributions.

    Returns ``{"num_prompts", "routing_differs", "identical_pairs", "differing_pairs",
    "mean_js_divergence", "max_js_divergence", "k_means", "k_distributions_differ", "per_pair"}`` and
    prints "✓ SUCCESS ..." or "❌ PROBLEM ..." like the earlier profiler.
    """
    items = []
    for r in results:
        rep = _report(r)
        d = rep.to_dict()
        name = r.get("prompt") if isinstance(r, dict) else None
        ks = get_k_statistics(rep)
        items.append({"name": name, "layers": {l["name"]: _distribution(l["expert_counts"]) for l in d["layers"]},
                      "k_mean": ks["k_mean"], "k_dist": _distribution(_hist_array(
                          {int(k): v for k, v in ks["k_hist"].items()}))})
    if len(items) < 2:
        raise ConfigError("compare_routing_behavior needs the results of at least two prompts")
    per_pair = []
    for (i, a), (j, b) in itertools.combinations(enumerate(items), 2):
        names = sorted(set(a["layers"]) & set(b["layers"]))
        js = [_js(a["layers"][n], b["layers"][n]) for n in names]
        same = all(np.allclose(a["layers"][n], b["layers"][n], atol=atol, rtol=0) for n in names)
        ka, kb = a["k_dist"], b["k_dist"]
        width = max(len(ka), len(kb))
        k_same = np.allclose(np.pad(ka, (0, width - len(ka))), np.pad(kb, (0, width - len(kb))), atol=atol, rtol=0)
        per_pair.append({"a": i, "b": j, "identical": bool(same), "k_identical": bool(k_same),
                         "mean_js_divergence": float(np.mean(js)) if js else 0.0})
    identical = sum(p["identical"] for p in per_pair)
    differs = identical < len(per_pair)
    js_all = [p["mean_js_divergence"] for p in per_pair]
    out = {"num_prompts": len(items), "routing_differs": bool(differs), "identical_pairs": int(identical),
           "differing_pairs": int(len(per_pair) - identical), "mean_js_divergence": float(np.mean(js_all)),
           "max_js_divergence": float(np.max(js_all)), "k_means": [it["k_mean"] for it in items],
           "k_distributions_differ": not all(p["k_identical"] for p in per_pair), "per_pair": per_pair}
    if verbose:
        print("=" * 80)
        print("ROUTING BEHAVIOR COMPARISON")
        print("=" * 80)
        for n, it in enumerate(items):
            print(f"  [{n}] {str(it['name'] or f'result {n}')[:50]!r}: k_mean {it['k_mean']:.3f}")
        print(f"  pairs with identical expert usage: {identical}/{len(per_pair)}; "
              f"mean JS divergence {out['mean_js_divergence']:.4f}")
        if differs:
            print("✓ SUCCESS: Different prompts produce DIFFERENT routing behavior")
        else:
            print("❌ PROBLEM: All prompts produce IDENTICAL routing behavior!")
    return out
