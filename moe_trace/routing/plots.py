"""Router-logit plots (matplotlib, Agg canvas, PNG). Each function draws one figure for one layer
and returns the file it wrote. No pyplot global state is touched, so this works headless and
next to a user's own pyplot session.

Directory layout under a plot root (the seed pipeline's, plus `pvalue_by_kth`)::

    basic/expert_weights_sum/  basic/expert_choice_counts/  basic/router_softmax/  basic/router_raw_logits/
    per_expert/per_expert_softmax/layer_NNN/  per_expert/per_expert_raw_logits/layer_NNN/
    kde/kde_cumulative_density/  kde/trimmed_comparison/  kde/kernel_comparison/
    pvalue/pvalue_basic/  pvalue/pvalue_vs_uniform/  pvalue/pvalue_by_kth/  pvalue/pvalue_by_popularity/
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

SUBDIRS = {
    "weights_sum": "basic/expert_weights_sum",
    "choice_counts": "basic/expert_choice_counts",
    "softmax": "basic/router_softmax",
    "raw_logits": "basic/router_raw_logits",
    "per_expert_softmax": "per_expert/per_expert_softmax",
    "per_expert_raw_logits": "per_expert/per_expert_raw_logits",
    "kde_cumulative": "kde/kde_cumulative_density",
    "trimmed": "kde/trimmed_comparison",
    "kernels": "kde/kernel_comparison",
    "pvalue_basic": "pvalue/pvalue_basic",
    "pvalue_uniform": "pvalue/pvalue_vs_uniform",
    "pvalue_kth": "pvalue/pvalue_by_kth",
    "pvalue_popularity": "pvalue/pvalue_by_popularity",
}
MAX_POINTS = 1_000_000  # values drawn into one histogram (a seeded subsample beyond)


def layer_file(root: str | Path, kind: str, layer: int, expert: int | None = None) -> Path:
    base = Path(root) / SUBDIRS[kind]
    if expert is None:
        return base / f"layer_{layer:03d}.png"
    return base / f"layer_{layer:03d}" / f"expert_{expert:03d}.png"


def _figure(w: float = 7.0, h: float = 4.5, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _sub(x: np.ndarray, n: int = MAX_POINTS, seed: int = 0) -> np.ndarray:
    x = np.asarray(x).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size > n:
        x = x[np.random.default_rng(seed).choice(x.size, n, replace=False)]
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# basic
# ---------------------------------------------------------------------------------------------
def plot_weight_sums(weights: np.ndarray, layer: int, path: Path, dpi: int = 300, title: str = "") -> Path:
    fig, ax = _figure()
    s = np.asarray(weights, dtype=np.float64).sum(axis=1)
    a = ax[0, 0]
    a.hist(_sub(s), bins=60, color="tab:blue", alpha=0.85, histtype="stepfilled")
    a.set_xlabel(f"sum of the top-{weights.shape[1]} expert weights")
    a.set_ylabel("tokens")
    a.set_title(f"{title}layer {layer}: expert weight sum per token (mean {s.mean():.3f})" if s.size else
                f"layer {layer}: no tokens")
    return _save(fig, path, dpi)


def plot_choice_counts(counts: np.ndarray, layer: int, path: Path, dpi: int = 300, title: str = "") -> Path:
    counts = np.asarray(counts)
    fig, ax = _figure(max(7.0, min(20.0, 0.12 * len(counts))), 4.5)
    a = ax[0, 0]
    a.bar(np.arange(len(counts)), counts, color="tab:orange", width=0.85)
    if counts.sum():
        a.axhline(counts.mean(), color="k", lw=1, ls="--", label="uniform")
        a.legend()
    a.set_xlabel("expert")
    a.set_ylabel("times chosen")
    a.set_title(f"{title}layer {layer}: expert choice counts ({int(counts.sum())} assignments)")
    return _save(fig, path, dpi)


def plot_value_hist(values: np.ndarray, layer: int, path: Path, xlabel: str, what: str, dpi: int = 300,
                    log: bool = False, title: str = "", color: str = "tab:green") -> Path:
    fig, ax = _figure()
    v = _sub(values)
    a = ax[0, 0]
    a.hist(v, bins=100, color=color, alpha=0.85, log=log, histtype="stepfilled")
    a.set_xlabel(xlabel)
    a.set_ylabel("count")
    if v.size:
        a.set_title(f"{title}layer {layer}: {what} (mean {v.mean():.3g}, sd {v.std():.3g})")
    return _save(fig, path, dpi)


def plot_softmax(logits: np.ndarray, layer: int, path: Path, dpi: int = 300, title: str = "") -> Path:
    return plot_value_hist(softmax(logits), layer, path, "router softmax probability (all experts)",
                           "router softmax distribution", dpi=dpi, log=True, title=title, color="tab:purple")


def plot_raw_logits(logits: np.ndarray, layer: int, path: Path, dpi: int = 300, title: str = "") -> Path:
    return plot_value_hist(logits, layer, path, "raw router logit (all experts)", "raw router logit distribution",
                           dpi=dpi, title=title)


# ---------------------------------------------------------------------------------------------
# kde
# ---------------------------------------------------------------------------------------------
def _ecdf(v: np.ndarray):
    v = np.sort(v)
    return v, np.arange(1, v.size + 1) / max(v.size, 1)


def plot_kde_cumulative(model, values_by_set: Mapping[str, np.ndarray], layer: int, path: Path,
                        dpi: int = 300, title: str = "") -> Path:
    """Left: histograms of the logits with the KDE density; right: the KDE's CDF table against the
    empirical CDF of each set (train / test datasets)."""
    fig, ax = _figure(12, 4.5, ncols=2)
    a, b = ax[0]
    lo, hi = model.grid[0], model.grid[-1]
    xs = np.linspace(lo, hi, 400)
    for i, (name, v) in enumerate(values_by_set.items()):
        v = _sub(v, 200_000, seed=i)
        if not v.size:
            continue
        a.hist(v, bins=80, density=True, alpha=0.35, label=name, histtype="stepfilled")
        ex, ey = _ecdf(v)
        b.plot(ex, ey, lw=1.2, label=f"{name} (empirical)")
    a.plot(xs, np.gradient(model.cdf(xs), xs), color="k", lw=1.5, label=f"KDE ({model.kernel})")
    b.plot(model.grid, model.cdf_table, color="k", lw=1.5, ls="--", label="KDE CDF table")
    a.set_xlabel("router logit")
    a.set_ylabel("density")
    b.set_xlabel("router logit")
    b.set_ylabel("cumulative probability")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    a.set_title(f"{title}layer {layer}: logit density")
    b.set_title(f"layer {layer}: KDE cumulative density (bw {model.bandwidth:.3g})")
    return _save(fig, path, dpi)


def plot_trimmed_comparison(logits_by_set: Mapping[str, np.ndarray], trims: Sequence[int], layer: int, path: Path,
                            models: Mapping[int, object] | None = None, dpi: int = 300, title: str = "") -> Path:
    """One panel per trim level (0 = untrimmed): each set's trimmed-logit histogram and, where
    given, the KDE fitted on it."""
    from .kde import trim_logits

    levels = [0, *[t for t in trims if t > 0]]
    fig, ax = _figure(4.0 * len(levels), 4.0, ncols=len(levels))
    for j, t in enumerate(levels):
        a = ax[0, j]
        for i, (name, lg) in enumerate(logits_by_set.items()):
            if lg is None or not len(lg) or 2 * t >= lg.shape[-1]:
                continue
            v = _sub(trim_logits(lg, t), 200_000, seed=i)
            a.hist(v, bins=60, density=True, alpha=0.4, label=name, histtype="stepfilled")
        m = (models or {}).get(t)
        if m is not None:
            xs = np.linspace(m.grid[0], m.grid[-1], 400)
            a.plot(xs, np.gradient(m.cdf(xs), xs), color="k", lw=1.2, label="KDE (train)")
        a.set_title(f"{title}layer {layer}: " + ("untrimmed" if t == 0 else f"trimmed {t}"), fontsize=9)
        a.set_xlabel("router logit")
        a.legend(fontsize=6)
    ax[0, 0].set_ylabel("density")
    return _save(fig, path, dpi)


def plot_kernel_comparison(models: Mapping[str, object], values: np.ndarray, layer: int, path: Path,
                           dpi: int = 300, title: str = "") -> Path:
    """The density of each kernel's model (scikit-learn `score_samples`) over the fit data's histogram."""
    fig, ax = _figure(12, 4.5, ncols=2)
    a, b = ax[0]
    v = _sub(values, 200_000)
    if v.size:
        a.hist(v, bins=100, density=True, color="0.8", label="data", histtype="stepfilled")
    first = next(iter(models.values()))
    xs = np.linspace(first.grid[0], first.grid[-1], 300)
    ex, ey = _ecdf(_sub(v, 20_000)) if v.size else (np.zeros(0), np.zeros(0))
    for name, m in models.items():
        a.plot(xs, m.pdf(xs), lw=1.2, label=f"{name} (bw {m.bandwidth:.3g})")
        if ex.size:
            b.plot(ex, m.cdf(ex) - ey, lw=1.0, label=name)
    b.axhline(0.0, color="k", lw=0.8, ls=":")
    b.set_ylabel("KDE CDF - empirical CDF")
    a.set_title(f"{title}layer {layer}: KDE kernels (density)")
    b.set_title(f"layer {layer}: KDE kernels, CDF error vs the fit data")
    a.set_xlabel("router logit")
    b.set_xlabel("router logit")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------------------------------
# p-values
# ---------------------------------------------------------------------------------------------
def plot_pvalue_basic(p_by_set: Mapping[str, np.ndarray], layer: int, path: Path, dpi: int = 300,
                      title: str = "") -> Path:
    fig, ax = _figure()
    a = ax[0, 0]
    bins = np.linspace(0, 1, 41)
    for i, (name, p) in enumerate(p_by_set.items()):
        p = _sub(p, seed=i)
        if p.size:
            a.hist(p, bins=bins, density=True, histtype="step", lw=1.5, label=f"{name} (n={p.size})")
    a.axhline(1.0, color="k", ls="--", lw=1, label="uniform")
    a.set_xlabel("p-value")
    a.set_ylabel("density")
    a.set_title(f"{title}layer {layer}: p-values of router logits")
    a.legend(fontsize=7)
    return _save(fig, path, dpi)


def plot_pvalue_vs_uniform(p_by_set: Mapping[str, np.ndarray], layer: int, path: Path,
                           ks: Mapping[str, dict] | None = None, dpi: int = 300, title: str = "") -> Path:
    """Q-Q plot of p-values against U(0,1) quantiles, with the KS statistic per set."""
    fig, ax = _figure(6, 6)
    a = ax[0, 0]
    for i, (name, p) in enumerate(p_by_set.items()):
        p = np.sort(_sub(p, 100_000, seed=i))
        if not p.size:
            continue
        q = (np.arange(1, p.size + 1) - 0.5) / p.size
        lab = name
        if ks and name in ks:
            lab += f" (KS D={ks[name]['ks_statistic']:.3f})"
        a.plot(q, p, lw=1.3, label=lab)
    a.plot([0, 1], [0, 1], color="k", ls="--", lw=1, label="uniform")
    a.set_xlim(0, 1)
    a.set_ylim(0, 1)
    a.set_xlabel("uniform quantile")
    a.set_ylabel("p-value quantile")
    a.set_title(f"{title}layer {layer}: p-values vs uniform")
    a.legend(fontsize=7)
    return _save(fig, path, dpi)


def plot_pvalue_by_kth(pk: np.ndarray, layer: int, path: Path, top_k: int | None = None, dpi: int = 300,
                       title: str = "") -> Path:
    """Empirical CDF of the p-values of each token's 1st, 2nd, ... best logit (selected ones solid)."""
    fig, ax = _figure()
    a = ax[0, 0]
    for k in range(pk.shape[1]):
        p = np.sort(_sub(pk[:, k], 200_000, seed=k))
        if not p.size:
            continue
        ls = "-" if top_k is None or k < top_k else ":"
        a.plot(p, np.arange(1, p.size + 1) / p.size, ls=ls, lw=1.2, label=f"k={k + 1} (median {np.median(p):.2g})")
    a.plot([0, 1], [0, 1], color="k", ls="--", lw=0.8)
    a.set_xlabel("p-value")
    a.set_ylabel("cumulative fraction of tokens")
    a.set_title(f"{title}layer {layer}: p-value of the k-th best expert's logit")
    a.legend(fontsize=6, ncol=2)
    return _save(fig, path, dpi)


def plot_pvalue_by_popularity(p: np.ndarray, counts: np.ndarray, layer: int, path: Path, dpi: int = 300,
                              title: str = "") -> Path:
    """Per expert, ordered from most to least chosen: median and 10-90% range of the p-values of its logits."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")
    pp = np.asarray(p)[:, order]
    fig, ax = _figure(max(7.0, min(20.0, 0.12 * len(order))), 4.5)
    a = ax[0, 0]
    x = np.arange(len(order))
    if pp.shape[0]:
        q10, q50, q90 = np.nanquantile(pp, [0.1, 0.5, 0.9], axis=0)
        a.fill_between(x, q10, q90, alpha=0.3, color="tab:blue", label="10-90%")
        a.plot(x, q50, color="tab:blue", lw=1.5, label="median")
    a.axhline(0.5, color="k", ls="--", lw=0.8)
    a.set_ylim(0, 1)
    a.set_xlabel("expert rank by popularity (most chosen first)")
    a.set_ylabel("p-value")
    a2 = a.twinx()
    a2.plot(x, counts[order], color="tab:orange", lw=1, label="choices")
    a2.set_ylabel("times chosen", color="tab:orange")
    a.legend(fontsize=7, loc="upper left")
    a.set_title(f"{title}layer {layer}: p-values by expert popularity")
    return _save(fig, path, dpi)
