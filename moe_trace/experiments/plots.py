"""Figures of a sweep (PNG, 300 dpi): stacked prefill/decode bars, latency vs knob, FLOPs scaling."""
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
    labels = [str(r["value"]) for r in rows]
    pre = np.array([r["prefill_ms_mean"] for r in rows])
    dec = np.array([r["decode_ms_mean"] for r in rows])
    std = np.array([r["total_ms_std"] for r in rows])
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


def plot_latency_vs_knob(result: Any, path: str | Path) -> Path:
    """Mean prefill, decode and total latency vs the knob (band: p50..p90; dashed: p99)."""
    plt = _plt()
    d = _data(result)
    knob = d["experiment"]["knob"]
    rows = d["summary"]
    x = np.array([r["value"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for lat, color in (("prefill_ms", "#4C72B0"), ("decode_ms", "#DD8452"), ("total_ms", "#55A868")):
        mean = np.array([r[f"{lat}_mean"] for r in rows])
        p50 = np.array([r[f"{lat}_p50"] for r in rows])
        p90 = np.array([r[f"{lat}_p90"] for r in rows])
        p99 = np.array([r[f"{lat}_p99"] for r in rows])
        ax.plot(x, mean, marker="o", color=color, label=lat.replace("_ms", ""))
        ax.fill_between(x, p50, p90, color=color, alpha=0.2)
        ax.plot(x, p99, linestyle="--", color=color, linewidth=0.8)
    ax.set_xlabel(_LABELS.get(knob, knob))
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"latency vs {knob} (mean; band p50-p90; dashed p99)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
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
             plot_latency_vs_knob(d, out / f"{slug}_latency_vs_knob.png")]
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
