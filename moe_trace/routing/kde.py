"""Kernel density models of router logits, CDF lookup tables and p-values.

A `LogitKDE` is a 1-D kernel density estimate (scikit-learn `KernelDensity`) of one MoE layer's
router logits pooled over experts (optionally *trimmed*: each token's `n` highest and `n` lowest
logits dropped first). Its CDF is computed exactly from the kernel's own CDF (a sum over the fit
points) on a grid and stored as a lookup table; `cdf(x)` interpolates in that table and
`pvalue(x)` turns it into a tail probability (upper tail by default: "how unusually high is this
logit"). Under the null (new logits drawn like the fit data) the p-values are uniform.

Bandwidth: `"scott"` / `"silverman"` give the rule-of-thumb width of `scipy.stats.gaussian_kde`
(`factor * std(ddof=1)`, factor `n**-0.2` or `(0.75 n)**-0.2`); for the other kernels it is scaled so
the kernel has the same standard deviation as that gaussian (e.g. a tophat of half-width
`sqrt(3) * h`), which makes kernels comparable. A float is used as scikit-learn's `bandwidth` as is.

Models are saved as `.npz` holding plain arrays plus a JSON string (`meta`); loading uses
`np.load(allow_pickle=False)`, so a model file cannot run code.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from moe_trace.errors import ConfigError, TraceError

MODEL_SCHEMA = "moe-trace/routing-kde/1"
KERNELS = ("gaussian", "tophat", "epanechnikov", "linear", "exponential", "cosine")
DEFAULT_KERNELS = ("gaussian", "tophat", "epanechnikov", "linear")
DEFAULT_TRIMS = (1, 2, 4)
TAILS = ("upper", "lower", "two-sided")

# standard deviation of scikit-learn's kernel at bandwidth 1, and its half-width of support
KERNEL_STD = {
    "gaussian": 1.0,
    "tophat": 1.0 / math.sqrt(3.0),
    "epanechnikov": 1.0 / math.sqrt(5.0),
    "linear": 1.0 / math.sqrt(6.0),
    "exponential": math.sqrt(2.0),
    "cosine": math.sqrt(1.0 - 8.0 / math.pi ** 2),
}
KERNEL_SUPPORT = {"gaussian": 8.5, "tophat": 1.0, "epanechnikov": 1.0, "linear": 1.0, "exponential": 40.0,
                  "cosine": 1.0}


def kernel_cdf(kernel: str, u: np.ndarray) -> np.ndarray:
    """CDF at `u` of scikit-learn's kernel `kernel` with bandwidth 1."""
    u = np.asarray(u, dtype=np.float64)
    if kernel == "gaussian":
        from scipy.special import ndtr

        return ndtr(u)
    if kernel == "exponential":
        return np.where(u < 0, 0.5 * np.exp(np.minimum(u, 0)), 1.0 - 0.5 * np.exp(-np.maximum(u, 0)))
    c = np.clip(u, -1.0, 1.0)
    if kernel == "tophat":
        return (c + 1.0) / 2.0
    if kernel == "epanechnikov":
        return 0.5 + 0.75 * c - 0.25 * c ** 3
    if kernel == "linear":
        return np.where(c < 0, 0.5 * (1.0 + c) ** 2, 1.0 - 0.5 * (1.0 - c) ** 2)
    if kernel == "cosine":
        return 0.5 * (1.0 + np.sin(np.pi * c / 2.0))
    raise ConfigError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")


def rule_bandwidth(data: np.ndarray, rule: str | float, kernel: str = "gaussian") -> float:
    """scikit-learn `bandwidth` for `data` by `rule` ("scott", "silverman" or a float)."""
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if rule <= 0:
            raise ConfigError(f"bandwidth must be > 0, not {rule}")
        return float(rule)
    n = max(len(data), 2)
    if rule == "scott":
        factor = n ** (-1.0 / 5.0)
    elif rule == "silverman":
        factor = (n * 3.0 / 4.0) ** (-1.0 / 5.0)
    else:
        raise ConfigError(f"bandwidth must be 'scott', 'silverman' or a number, not {rule!r}")
    sd = float(np.std(data, ddof=1)) if len(data) > 1 else 0.0
    if not np.isfinite(sd) or sd <= 0:
        sd = max(abs(float(np.mean(data))) * 1e-3, 1e-3) if len(data) else 1.0
    return factor * sd / KERNEL_STD[kernel]


def trim_logits(logits: np.ndarray, n: int) -> np.ndarray:
    """Each row's logits without its `n` highest and `n` lowest values, pooled (1-D)."""
    logits = np.asarray(logits)
    if n <= 0:
        return logits.reshape(-1)
    e = logits.shape[-1]
    if 2 * n >= e:
        raise ConfigError(f"cannot trim {n} experts from each end of {e} experts")
    return np.sort(logits, axis=-1)[..., n: e - n].reshape(-1)


class LogitKDE:
    """A fitted 1-D KDE with an exact-CDF lookup table. Build with `LogitKDE.fit(values, ...)`."""

    def __init__(self, data: np.ndarray, kernel: str, bandwidth: float, grid: np.ndarray, cdf_table: np.ndarray,
                 meta: dict[str, Any] | None = None):
        self.data = np.asarray(data, dtype=np.float64)
        self.kernel = kernel
        self.bandwidth = float(bandwidth)
        self.grid = np.asarray(grid, dtype=np.float64)
        self.cdf_table = np.asarray(cdf_table, dtype=np.float64)
        self.meta = dict(meta or {})
        self._kd = None

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, values: np.ndarray, kernel: str = "gaussian", bandwidth: str | float = "scott", *,
            max_points: int | None = 20000, grid_size: int = 2048, seed: int = 0, **meta: Any) -> "LogitKDE":
        """Fit on `values` (any shape, flattened; NaN/inf dropped). At most `max_points` values are
        used (a seeded random subsample)."""
        if kernel not in KERNELS:
            raise ConfigError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        x = x[np.isfinite(x)]
        n_source = int(x.size)
        if n_source == 0:
            raise ConfigError("cannot fit a KDE on no values")
        if max_points is not None and x.size > max_points:
            rng = np.random.default_rng(seed)
            x = x[rng.choice(x.size, size=int(max_points), replace=False)]
        x = np.sort(x)
        h = rule_bandwidth(x, bandwidth, kernel)
        grid, table = cdf_table(x, kernel, h, grid_size)
        meta = {**meta, "n_source": n_source, "n_fit": int(x.size), "bandwidth_rule": bandwidth, "seed": seed}
        return cls(x, kernel, h, grid, table, meta)

    # -- evaluating -------------------------------------------------------------------------
    @property
    def estimator(self):
        """The scikit-learn `KernelDensity` this model is (fitted on `data` on first use)."""
        if self._kd is None:
            from sklearn.neighbors import KernelDensity

            self._kd = KernelDensity(kernel=self.kernel, bandwidth=self.bandwidth, rtol=1e-8).fit(self.data[:, None])
        return self._kd

    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Density at `x` (scikit-learn `score_samples`)."""
        x = np.asarray(x, dtype=np.float64)
        return np.exp(self.estimator.score_samples(x.reshape(-1, 1))).reshape(x.shape)

    def cdf(self, x: np.ndarray, exact: bool = False) -> np.ndarray:
        """CDF at `x`: interpolated in the lookup table, or summed over the fit points (`exact`)."""
        x = np.asarray(x, dtype=np.float64)
        if exact:
            return exact_cdf(self.data, x.reshape(-1), self.kernel, self.bandwidth).reshape(x.shape)
        return np.interp(x, self.grid, self.cdf_table, left=0.0, right=1.0)

    def pvalue(self, x: np.ndarray, tail: str = "upper", exact: bool = False) -> np.ndarray:
        """P-value of each `x` under this model: `1 - CDF` (upper), `CDF` (lower) or
        `2 * min(CDF, 1 - CDF)` (two-sided)."""
        c = self.cdf(x, exact=exact)
        if tail == "upper":
            return 1.0 - c
        if tail == "lower":
            return c
        if tail == "two-sided":
            return np.minimum(1.0, 2.0 * np.minimum(c, 1.0 - c))
        raise ConfigError(f"tail must be one of {TAILS}, not {tail!r}")

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        return self.estimator.sample(n, random_state=seed).reshape(-1)

    @property
    def layer(self) -> int | None:
        return self.meta.get("layer")

    @property
    def trim(self) -> int:
        return int(self.meta.get("trim", 0))

    def __repr__(self) -> str:
        return (f"LogitKDE(kernel={self.kernel!r}, bandwidth={self.bandwidth:.4g}, n_fit={len(self.data)}, "
                f"layer={self.layer}, trim={self.trim})")

    # -- persistence ------------------------------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        return {"schema": MODEL_SCHEMA, "kernel": self.kernel, "bandwidth": self.bandwidth, **self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (.npz): arrays `data`, `grid`, `cdf` and the JSON string `meta`. No pickles."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.to_meta(), default=_json_default)
        np.savez(path, meta=np.array(meta), data=self.data, grid=self.grid, cdf=self.cdf_table)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LogitKDE":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
                data, grid, table = z["data"], z["grid"], z["cdf"]
        except (OSError, ValueError, KeyError) as exc:
            raise TraceError(f"{path}: not a moe-trace KDE model ({exc})") from exc
        if meta.get("schema") != MODEL_SCHEMA:
            raise TraceError(f"{path}: unknown KDE model schema {meta.get('schema')!r} (expected {MODEL_SCHEMA})")
        kernel = meta.pop("kernel")
        bw = meta.pop("bandwidth")
        meta.pop("schema")
        if kernel not in KERNELS or not (len(grid) == len(table) and len(data)):
            raise TraceError(f"{path}: inconsistent KDE model")
        return cls(data, kernel, bw, grid, table, meta)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def exact_cdf(data: np.ndarray, x: np.ndarray, kernel: str, h: float, block: int = 4_000_000) -> np.ndarray:
    """Mean over `data` of the kernel CDF at `(x - d) / h` (chunked to bound memory)."""
    data = np.asarray(data, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.float64)
    step = max(1, block // max(1, data.size))
    for a in range(0, x.size, step):
        u = (x[a: a + step, None] - data[None, :]) / h
        out[a: a + step] = kernel_cdf(kernel, u).mean(axis=1)
    return out


def binned_cdf(data: np.ndarray, kernel: str, h: float, lo: float, hi: float,
               max_bins: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """The KDE's CDF on a fine uniform grid over [lo, hi] (spacing <= h/16 where the bin budget allows):
    the data linearly binned onto the grid, convolved with the kernel CDF by FFT. O(M log M)."""
    data = np.asarray(data, dtype=np.float64)
    m = int(min(max_bins, max(1024, math.ceil((hi - lo) / (h / 16.0)) + 1)))
    delta = (hi - lo) / (m - 1)
    pos = np.clip((data - lo) / delta, 0, m - 1 - 1e-9)
    i = np.floor(pos).astype(np.int64)
    frac = pos - i
    w = np.bincount(i, 1.0 - frac, minlength=m) + np.bincount(i + 1, frac, minlength=m)[:m]
    w /= data.size
    offs = np.arange(-(m - 1), m) * (delta / h)  # g_j - g_i for j - i = -(m-1) .. m-1
    c = kernel_cdf(kernel, offs)
    n = 1 << int(math.ceil(math.log2(3 * m)))
    full = np.fft.irfft(np.fft.rfft(w, n) * np.fft.rfft(c, n), n)
    cdf = full[m - 1: 2 * m - 1]  # index j + (m-1) holds sum_i w_i c[(j - i) + (m-1)]
    grid = lo + delta * np.arange(m)
    return grid, np.clip(cdf, 0.0, 1.0)


def cdf_table(data: np.ndarray, kernel: str, h: float, size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """A CDF lookup table of `size` points: half uniform over the data range (padded by the kernel's
    support), half at data quantiles, values from `binned_cdf`; monotone, 0 and 1 at the ends."""
    data = np.sort(np.asarray(data, dtype=np.float64))
    pad = KERNEL_SUPPORT[kernel] * h
    lo, hi = data[0] - pad, data[-1] + pad
    fine_x, fine_c = binned_cdf(data, kernel, h, lo, hi)
    half = max(2, size // 2)
    q = np.quantile(data, np.linspace(0.0, 1.0, size - half))
    grid = np.unique(np.concatenate([np.linspace(lo, hi, half), q]))
    table = np.interp(grid, fine_x, fine_c)
    table = np.maximum.accumulate(np.clip(table, 0.0, 1.0))
    table[0] = 0.0 if kernel != "exponential" else table[0]
    table[-1] = 1.0 if kernel != "exponential" else table[-1]
    return grid, table


# ---------------------------------------------------------------------------------------------
# model files: one .npz per (layer, trim, kernel), named like the seed pipeline's pickles
# ---------------------------------------------------------------------------------------------
def model_filename(prefix: str, layer: int, trim: int = 0, kernel: str | None = None) -> str:
    """`{prefix}_distribution_model_layer_{i}.npz`, `..._trimmed_{n}.npz` or `..._{kernel}.npz`."""
    name = f"{prefix}_distribution_model_layer_{layer}"
    if trim:
        name += f"_trimmed_{trim}"
    if kernel:
        name += f"_{kernel}"
    return name + ".npz"


_NAME_RE = re.compile(r"_distribution_model_layer_(\d+)(?:_trimmed_(\d+))?(?:_([a-z]+))?\.npz$")


class ModelSet:
    """KDE models keyed by `(layer, trim, kernel)`, with the main (untrimmed, main kernel) model
    per layer."""

    def __init__(self, models: dict[tuple[int, int, str], LogitKDE] | None = None, main_kernel: str = "gaussian"):
        self.models = dict(models or {})
        self.main_kernel = main_kernel

    def add(self, m: LogitKDE) -> None:
        self.models[(int(m.meta["layer"]), m.trim, m.kernel)] = m

    def get(self, layer: int, trim: int = 0, kernel: str | None = None) -> LogitKDE | None:
        return self.models.get((layer, trim, kernel or self.main_kernel))

    def main(self, layer: int) -> LogitKDE | None:
        return self.get(layer, 0, self.main_kernel)

    @property
    def layers(self) -> list[int]:
        return sorted({k[0] for k in self.models})

    def kernels(self, layer: int, trim: int = 0) -> list[str]:
        return [k for k in KERNELS if (layer, trim, k) in self.models]

    def trims(self, layer: int, kernel: str | None = None) -> list[int]:
        kernel = kernel or self.main_kernel
        return sorted(t for (l, t, k) in self.models if l == layer and k == kernel)

    def save(self, directory: str | os.PathLike, prefix: str) -> list[Path]:
        directory = Path(directory)
        out = []
        for (layer, trim, kernel), m in sorted(self.models.items()):
            if trim == 0 and kernel == self.main_kernel:
                out.append(m.save(directory / model_filename(prefix, layer)))
            if trim == 0:
                out.append(m.save(directory / model_filename(prefix, layer, kernel=kernel)))
            elif kernel == self.main_kernel:
                out.append(m.save(directory / model_filename(prefix, layer, trim)))
            else:
                out.append(m.save(directory / model_filename(prefix, layer, trim, kernel)))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, main_kernel: str = "gaussian") -> "ModelSet":
        directory = Path(directory)
        files = sorted(directory.glob("*_distribution_model_layer_*.npz")) if directory.is_dir() else []
        if not files:
            raise TraceError(f"{directory}: no KDE model files (*_distribution_model_layer_*.npz); "
                             "train some with `moe-trace routing-analyze`")
        ms = cls(main_kernel=main_kernel)
        for f in files:
            m = LogitKDE.load(f)
            if "layer" not in m.meta:
                g = _NAME_RE.search(f.name)
                m.meta["layer"] = int(g.group(1)) if g else 0
            ms.models.setdefault((int(m.meta["layer"]), m.trim, m.kernel), m)
        return ms


def fit_layer_models(logits: np.ndarray, layer: int, *, kernels: Iterable[str] = ("gaussian",),
                     trims: Iterable[int] = DEFAULT_TRIMS, main_kernel: str = "gaussian",
                     bandwidth: str | float = "scott", max_points: int | None = 20000, grid_size: int = 2048,
                     seed: int = 0, **meta: Any) -> list[LogitKDE]:
    """The models of one layer: every kernel untrimmed, and the main kernel trimmed by each of `trims`."""
    out = []
    base = trim_logits(logits, 0)
    for k in dict.fromkeys([main_kernel, *kernels]):
        out.append(LogitKDE.fit(base, k, bandwidth, max_points=max_points, grid_size=grid_size, seed=seed,
                                layer=layer, trim=0, **meta))
    e = logits.shape[-1]
    for t in trims:
        if t <= 0 or 2 * t >= e:
            continue
        out.append(LogitKDE.fit(trim_logits(logits, t), main_kernel, bandwidth, max_points=max_points,
                                grid_size=grid_size, seed=seed, layer=layer, trim=int(t), **meta))
    return out


def kth_best_pvalues(model: LogitKDE, logits: np.ndarray, k_max: int, tail: str = "upper") -> np.ndarray:
    """[N, k_max] p-values of each token's best, 2nd best, ... logit."""
    srt = -np.sort(-np.asarray(logits, dtype=np.float64), axis=-1)[:, :k_max]
    return model.pvalue(srt, tail=tail)


def ks_uniform(p: np.ndarray) -> dict[str, float]:
    """Kolmogorov-Smirnov test of p-values against U(0, 1)."""
    from scipy import stats

    p = np.asarray(p, dtype=np.float64).reshape(-1)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return {"n": 0, "ks_statistic": float("nan"), "ks_pvalue": float("nan"), "mean": float("nan")}
    r = stats.kstest(p, "uniform")
    return {"n": int(p.size), "ks_statistic": float(r.statistic), "ks_pvalue": float(r.pvalue),
            "mean": float(p.mean())}
