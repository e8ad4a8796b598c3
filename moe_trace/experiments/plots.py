"""Figures of a sweep (PNG, 300 dpi): stacked prefill/decode bars, latency vs knob, k / active experts /
FLOPs vs knob, FLOPs scaling; and of a comparison (`plot_compare`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DPI = 300
_LABELS = {
    "top-k": "experts per token (top-k)",
    "active-layers": "active decoder blocks",
    "output-tokens": "output tokens (max_new_tokens)",
    "prompt-length": "prompt length (tokens)",
    "flops-scaling": "experts per token (top-k)",
}


def _data(result: Any) -> dict[str, Any]:
    from .sweep import SweepResult

    if isinstance(result, (str, Path)):
        return SweepResult.load(result).data
    if isinstance(result, SweepResult):
        return result.data
    return result


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_latency_breakdown(result: Any, path: str | Path) -> Path:
    """Stacked bars of mean prefill and decode latency per setting (error bar: std of the total)."""
    plt = _plt()
    d = _data(result)
    knob = d["experiment"]["knob"]
    rows = d["summary"]
    labels = ["+".join(map(str, r["value"])) if isinstance(r["value"], (list, tuple)) else str(r["value"]) for r in rows]
    pre = np.array([r["prefill_ms_mean"] for r in rows])
    dec = np.array([r["decode_ms_mean"] for r in rows])
    std = np.array([r["total_ms_std"] or 0.0 for r in rows])
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(rows) + 2), 3.6))
    ax.bar(x, pre, color="#4C72B0", label="prefill")
    ax.bar(x, dec, bottom=pre, color="#DD8452", label="decode")
    ax.errorbar(x, pre + dec, yerr=std, fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set_xticks(x, labels)
    ax.set_xlabel(_LABELS.get(knob, knob))
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"prefill / decode latency vs {knob}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, plt, path)


def _x(rows: list[dict]) -> tuple[np.ndarray, list[str] | None]:
    """Numeric x of the knob values; block sets (lists) are placed by position and labelled."""
    if any(isinstance(r["value"], (list, tuple)) for r in rows):
        return np.arange(len(rows), dtype=float), ["+".join(map(str, r["value"])) if isinstance(r["value"], (list, tuple))
                                                   else str(r["value"]) for r in rows]
    return np.array([r["value"] for r in rows], dtype=float), None


def _col(rows: list[dict], key: str) -> np.ndarray | None:
    vals = [r.get(key) for r in rows]
    return None if any(v is None for v in vals) else np.array(vals, dtype=float)


def plot_latency_vs_knob(result: Any, path: str | Path) -> Path:
    """Mean prefill, decode and total latency vs the knob (band: 95% interval of the mean; dashed: p90
    where at least 10 samples per setting support it)."""
    plt = _plt()
    d = _data(result)
    knob = d["experiment"]["knob"]
    rows = d["summary"]
    x, labels = _x(rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for lat, color in (("prefill_ms", "#4C72B0"), ("decode_ms", "#DD8452"), ("total_ms", "#55A868")):
        ax.plot(x, _col(rows, f"{lat}_mean"), marker="o", color=color, label=lat.replace("_ms", ""))
        lo, hi = _col(rows, f"{lat}_ci95_low"), _col(rows, f"{lat}_ci95_high")
        if lo is not None and hi is not None:
            ax.fill_between(x, lo, hi, color=color, alpha=0.2)
        p90 = _col(rows, f"{lat}_p90")
        if p90 is not None:
            ax.plot(x, p90, linestyle="--", color=color, linewidth=0.8)
    if labels:
        ax.set_xticks(x, labels)
    ax.set_xlabel(_LABELS.get(knob, knob))
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"latency vs {knob} (mean; band: 95% CI; dashed: p90 if n >= 10)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def plot_routing_vs_knob(result: Any, path: str | Path) -> Path:
    """k (mean experts per token), mean active experts per layer and FLOPs per token vs the knob."""
    plt = _plt()
    d = _data(result)
    knob = d["experiment"]["knob"]
    rows = d["summary"]
    x, labels = _x(rows)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, key, ylabel, scale in ((axes[0], "k_mean_mean", "k (experts / token)", 1.0),
                                   (axes[1], "active_experts_mean_mean", "active experts / layer", 1.0),
                                   (axes[2], "flops_per_token_mean", "MFLOP / token (MoE layers)", 1e-6)):
        y = _col(rows, key)
        if y is not None:
            ax.plot(x, y * scale, marker="o", color="#8172B3")
        if labels:
            ax.set_xticks(x, labels)
        ax.set_xlabel(_LABELS.get(knob, knob))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"routing vs {knob}")
    return _save(fig, plt, path)


def plot_compare(df: Any, path: str | Path) -> Path:
    """A comparison (`SimpleBenchmark.compare()` / `moe-trace compare`): total ms, k and MFLOP/token per config."""
    plt = _plt()
    names = [str(n) for n in df.index]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 1.2 * len(names) * 3), 3.4))
    for ax, col, ylabel, scale, color in ((axes[0], "total_ms", "total latency (ms)", 1.0, "#55A868"),
                                          (axes[1], "k_mean", "k (experts / token)", 1.0, "#8172B3"),
                                          (axes[2], "flops_per_token", "MFLOP / token", 1e-6, "#C44E52")):
        ax.bar(x, np.asarray(df[col], dtype=float) * scale, color=color)
        ax.set_xticks(x, names, rotation=20)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"comparison (base: {names[0]})")
    return _save(fig, plt, path)


def plot_flops_scaling(result: Any, path: str | Path) -> Path:
    """Measured latency of every sample vs the report's theoretical MoE GFLOPs, with fitted lines."""
    plt = _plt()
    d = _data(result)
    samples = d["all_samples"]
    fit = d.get("fit") or {}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, phase, color in ((axes[0], "prefill", "#4C72B0"), (axes[1], "decode", "#DD8452")):
        x = np.array([s[f"flops_{phase}"] / 1e9 for s in samples])
        y = np.array([s[f"{phase}_ms"] for s in samples])
        ax.scatter(x, y, s=12, color=color, alpha=0.7, label="samples")
        f = fit.get(phase)
        if f:
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, f["slope"] * xs + f["intercept"], color="black", linewidth=1,
                    label=f"fit: {f['slope']:.3g} ms/GFLOP + {f['intercept']:.3g} ms (r²={f['r2']:.3f})")
        ax.set_xlabel(f"theoretical MoE GFLOPs ({phase})")
        ax.set_ylabel(f"{phase} latency (ms)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("measured latency vs theoretical FLOPs")
    return _save(fig, plt, path)


def plot_sweep(result: Any, out_dir: str | Path) -> list[Path]:
    """Every figure for one sweep under `out_dir`; returns their paths."""
    d = _data(result)
    slug = d["experiment"]["knob"].replace("-", "_")
    out = Path(out_dir)
    paths = [plot_latency_breakdown(d, out / f"{slug}_latency_breakdown.png"),
             plot_latency_vs_knob(d, out / f"{slug}_latency_vs_knob.png"),
             plot_routing_vs_knob(d, out / f"{slug}_routing_vs_knob.png")]
    if d["experiment"]["knob"] == "flops-scaling" or d.get("fit"):
        paths.append(plot_flops_scaling(d, out / f"{slug}_flops_scaling.png"))
    return paths


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
