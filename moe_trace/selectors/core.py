"""Dynamic-k expert selectors: router probabilities -> experts kept per token.

A *selector* maps router probabilities ``probs[..., E]`` (all tokens at once) to the number of
experts each token keeps, ``k[...]`` (int64, ``1 <= k <= cap``). Every built-in selector is a few
vectorised torch ops on the device: no per-token Python loop and no host sync (no ``.item()``,
``.tolist()``, ``nonzero()`` or Python branching on tensor values), so it can run inside a router
hook on the GPU without stalling the stream. The rules are defined precisely in docs/selectors.md.

    >>> sel = resolve_selector("cumsum:0.8")
    >>> k = sel(torch.softmax(logits, -1))                       # k[T]
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from moe_trace.errors import ConfigError

__all__ = [
    "Selector", "TopK", "Kneedle", "CumSum", "Entropy", "GapRatio", "CallableSelector",
    "topk", "kneedle", "cumsum", "entropy", "gap_ratio",
    "SELECTORS", "resolve_selector",
    "kneedle_selector", "cumsum_selector", "entropy_selector", "gap_ratio_selector", "topk_selector", "ModelTopK",
]


# ---------------------------------------------------------------------------------------------
# validation helpers (host-side, on Python arguments only)
def _pos_int(name: str, value: Any, what: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name}: {what} must be a positive integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{name}: {what} must be >= 1, got {value}")
    return int(value)


def _float(name: str, value: Any, what: str, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {what} must be a number, got {value!r}") from None
    if math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ConfigError(f"{name}: {what} must lie in {rng}, got {value!r}")
    return v


def _sorted_desc(probs: torch.Tensor) -> torch.Tensor:
    return torch.sort(probs.to(torch.float64), dim=-1, descending=True).values


# ---------------------------------------------------------------------------------------------
class Selector:
    """Base class: ``sel(probs[..., E]) -> k[...]`` (int64 on probs' device, 1 <= k <= sel.cap(E)).

    Attributes the capture layer reads: ``max_k`` (int or None: the upper bound on k before the
    number of experts caps it) and, for `TopK`, ``k`` and ``fixed_k``. Subclasses implement
    ``_select(probs[T, E], cap) -> k[T]`` with tensor ops only; the base class flattens leading
    dimensions, clamps to ``[1, cap]`` and casts to int64.
    """

    name = "selector"
    fixed_k: int | None = None

    def __init__(self, max_k: int | None = None):
        self.max_k = _pos_int(self.name, max_k, "max_k")

    # -- public -------------------------------------------------------------------------------
    def cap(self, num_experts: int) -> int:
        """Largest k this selector can return for a router with `num_experts` experts."""
        cap = int(num_experts)
        if self.max_k is not None:
            cap = min(cap, self.max_k)
        return max(cap, 1)

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        if not isinstance(probs, torch.Tensor) or probs.dim() < 1:
            raise ConfigError(f"{self.name}: expected router probabilities as a tensor [T, E], got {type(probs).__name__}")
        lead = probs.shape[:-1]
        num_experts = probs.shape[-1]
        if num_experts < 1:
            raise ConfigError(f"{self.name}: router probabilities have no experts (shape {tuple(probs.shape)})")
        cap = self.cap(num_experts)
        flat = probs.reshape(-1, num_experts)
        k = self._select(flat, cap)
        return k.clamp(1, cap).to(torch.int64).reshape(lead)

    @property
    def params(self) -> dict[str, Any]:
        return {}

    @property
    def spec(self) -> str:
        """A string that `resolve_selector` turns back into an equal selector, e.g. ``cumsum:threshold=0.9``."""
        items = [f"{k}={v}" for k, v in self.params.items() if v is not None]
        return self.name + (":" + ",".join(items) if items else "")

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.params.items())))

    # -- implementation -------------------------------------------------------------------------
    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TopK(Selector):
    """Fixed k for every token (``min(k, E)``): the model's own routing when k equals its top_k."""

    name = "topk"

    def __init__(self, k: int):
        self.k = _pos_int("topk", k, "k", allow_none=False)
        self.max_k = self.k
        self.fixed_k = self.k

    @property
    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:
        return torch.full(probs.shape[:-1], cap, dtype=torch.int64, device=probs.device)


@lru_cache(maxsize=None)
def _kneedle_step(num_experts: int) -> float:
    """``abs(mean(diff(x_normalized)))`` exactly as kneed computes it (depends on E only; host numpy)."""
    x = np.arange(num_experts).astype(float)
    xn = (x - x.min()) / (x.max() - x.min())
    return float(np.abs(np.diff(xn).mean()))


class Kneedle(Selector):
    """Knee (Satopää et al. 2011, offline) of the descending-sorted probability curve.

    k = ``kneed.KneeLocator(range(E), sorted_probs, curve="convex", direction="decreasing", S=S,
    interp_method="interp1d").knee``, row by row: the 0-based position of the elbow, i.e. the number
    of experts *before* the point where the curve flattens (at least 1). No knee (flat curve,
    E <= 2, no threshold crossing) -> ``fallback`` (default: the cap, i.e. keep ``max_k`` / all).
    """

    name = "kneedle"

    def __init__(self, max_k: int | None = None, S: float = 1.0, fallback: int | None = None):
        super().__init__(max_k)
        self.S = _float("kneedle", S, "S (sensitivity)", 0.0, float("inf"))
        self.fallback = _pos_int("kneedle", fallback, "fallback")

    @property
    def params(self) -> dict[str, Any]:
        return {"max_k": self.max_k, "S": self.S, "fallback": self.fallback}

    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:
        t, e = probs.shape
        dev = probs.device
        fb = min(self.fallback, cap) if self.fallback is not None else cap
        if e < 3:  # the difference curve is [0] or [0, 0]: never a knee
            return torch.full((t,), fb, dtype=torch.int64, device=dev)
        y = _sorted_desc(probs)                                   # [T, E] float64, descending
        ymin, ymax = y[:, -1:], y[:, :1]
        yn = (y - ymin) / (ymax - ymin)                           # NaN for a flat row (0/0)
        yn = yn.amax(dim=-1, keepdim=True) - yn                   # convex/decreasing -> knee form
        # kneed's x_normalized for x = 0..E-1 is (i - 0) / (E - 1): the same IEEE division on the device
        xn = torch.arange(e, dtype=torch.float64, device=dev) / (e - 1)
        d = yn - xn                                               # difference curve [T, E]
        # local extrema as scipy.signal.argrelextrema(order=1, mode="clip") finds them
        left = torch.cat([d[:, :1], d[:, :-1]], dim=1)
        right = torch.cat([d[:, 1:], d[:, -1:]], dim=1)
        is_max = (d >= left) & (d >= right)
        is_min = (d <= left) & (d <= right)
        # kneed walks the curve: at a local max it arms detection with threshold
        # d[max] - S*step; at a local min (checked after the max) it disarms. State at i is set by
        # the last extremum at or before i.
        pos = torch.arange(e, device=dev).expand(t, e)
        last = torch.where(is_max | is_min, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        seen = last >= 0
        last_c = last.clamp(min=0)
        armed = seen & torch.gather(is_max & ~is_min, 1, last_c)
        thr = torch.gather(d, 1, last_c) - self.S * _kneedle_step(e)
        hit = armed[:, :-1] & (d[:, 1:] < thr[:, :-1])           # i = 0..E-2 (kneed stops at E-1)
        found = hit.any(dim=1)
        first = hit.to(torch.int8).argmax(dim=1, keepdim=True)     # first True (argmax takes the first)
        knee_idx = torch.gather(last_c[:, :-1], 1, first).squeeze(1)
        return torch.where(found, knee_idx, torch.full_like(knee_idx, fb))


class CumSum(Selector):
    """Smallest k whose sorted cumulative mass (fraction of the row's total) reaches `threshold`."""

    name = "cumsum"

    def __init__(self, threshold: float = 0.9, max_k: int | None = None):
        super().__init__(max_k)
        self.threshold = _float("cumsum", threshold, "threshold", 0.0, 1.0, lo_open=True)

    @property
    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "max_k": self.max_k}

    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:
        cs = _sorted_desc(probs).cumsum(dim=-1)
        frac = cs / cs[:, -1:]
        return (frac < self.threshold).sum(dim=-1) + 1


class Entropy(Selector):
    """Perplexity of the routing distribution: k = round(scale * exp(H(p))), H in nats."""

    name = "entropy"

    def __init__(self, max_k: int | None = None, scale: float = 1.0):
        super().__init__(max_k)
        self.scale = _float("entropy", scale, "scale", 0.0, float("inf"), lo_open=True)

    @property
    def params(self) -> dict[str, Any]:
        return {"max_k": self.max_k, "scale": self.scale}

    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:
        p = probs.to(torch.float64)
        p = p / p.sum(dim=-1, keepdim=True)
        h = -torch.xlogy(p, p).sum(dim=-1)
        k = torch.round(self.scale * torch.exp(h))
        return torch.nan_to_num(k, nan=1.0).clamp(1, cap)


class GapRatio(Selector):
    """Cut at the largest ratio between consecutive sorted probabilities: k = argmax_i s_i/s_{i+1} + 1.

    Only cuts that give k <= cap are considered; ties go to the smallest k; a zero denominator is
    replaced by the smallest positive float64 (so a gap to zero is the largest possible ratio).
    """

    name = "gap_ratio"

    def __init__(self, max_k: int | None = None):
        super().__init__(max_k)

    @property
    def params(self) -> dict[str, Any]:
        return {"max_k": self.max_k}

    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:
        t, e = probs.shape
        if e < 2:
            return torch.ones(t, dtype=torch.int64, device=probs.device)
        s = _sorted_desc(probs)
        n = min(cap, e - 1)
        num = s[:, :n]
        den = s[:, 1:n + 1].clamp_min(torch.finfo(torch.float64).tiny)
        ratio = torch.nan_to_num(num / den, nan=0.0)
        return ratio.argmax(dim=-1) + 1


class CallableSelector(Selector):
    """Wraps any callable ``probs -> k``; the result is cast to int64 and clamped to [1, E]."""

    name = "callable"

    def __init__(self, fn: Callable[[torch.Tensor], Any], max_k: int | None = None):
        self.fn = fn
        self.max_k = _pos_int("callable selector", max_k, "max_k")
        self.name = getattr(fn, "__name__", type(fn).__name__)

    @property
    def params(self) -> dict[str, Any]:
        return {"fn": self.fn, "max_k": self.max_k}

    @property
    def spec(self) -> str:
        return self.name

    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:
        k = self.fn(probs)
        if not isinstance(k, torch.Tensor):
            k = torch.as_tensor(k, device=probs.device)
        k = k.to(device=probs.device)
        if k.shape != probs.shape[:-1]:
            k = k.expand(probs.shape[:-1]) if k.dim() == 0 else k.reshape(probs.shape[:-1])
        if not k.is_floating_point():
            return k.to(torch.int64)
        bad = ~torch.isfinite(k)  # counted on the device (no sync); read once by `non_finite()`
        n = bad.sum()
        self._non_finite = n if getattr(self, "_non_finite", None) is None else self._non_finite + n
        self._example = k.reshape(-1)[bad.reshape(-1).to(torch.int8).argmax()]  # device index: no sync
        return torch.where(bad, torch.ones_like(k), k).round().to(torch.int64)

    def non_finite(self) -> tuple[int, float | None]:
        """(count, one example) of non-finite k values returned so far (they were used as k=1). Syncs."""
        n = getattr(self, "_non_finite", None)
        if n is None:
            return 0, None
        return int(n), float(self._example)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallableSelector) and other.fn is self.fn and other.max_k == self.max_k

    def __hash__(self) -> int:
        return hash(("callable", id(self.fn)))


# ---------------------------------------------------------------------------------------------
# factories (the public names)
def topk(k: int) -> TopK:
    """Every token keeps its `k` most probable experts."""
    return TopK(k)


def kneedle(max_k: int | None = None, S: float = 1.0, fallback: int | None = None) -> Kneedle:
    """k at the knee of the descending-sorted probabilities (kneed's convex/decreasing rule)."""
    return Kneedle(max_k=max_k, S=S, fallback=fallback)


def cumsum(threshold: float = 0.9, max_k: int | None = None) -> CumSum:
    """Smallest k whose cumulative sorted probability mass reaches `threshold`."""
    return CumSum(threshold=threshold, max_k=max_k)


def entropy(max_k: int | None = None, scale: float = 1.0) -> Entropy:
    """k = round(scale * exp(entropy)): the perplexity of the routing distribution."""
    return Entropy(max_k=max_k, scale=scale)


def gap_ratio(max_k: int | None = None) -> GapRatio:
    """Cut where the ratio between consecutive sorted probabilities is largest."""
    return GapRatio(max_k=max_k)


# name -> (factory, positional parameter names)
SELECTORS: dict[str, tuple[Callable[..., Selector], tuple[str, ...]]] = {
    "topk": (topk, ("k",)),
    "kneedle": (kneedle, ("max_k", "S", "fallback")),
    "cumsum": (cumsum, ("threshold", "max_k")),
    "entropy": (entropy, ("max_k", "scale")),
    "gap_ratio": (gap_ratio, ("max_k",)),
}
_ALIASES = {"top_k": "topk", "top-k": "topk", "gap-ratio": "gap_ratio", "gapratio": "gap_ratio",
            "knee": "kneedle", "cumulative": "cumsum"}

class ModelTopK(Selector):
    """The model's own top-k routing (the seed's `selectors.topk_selector`): `resolve_selector` turns
    it into None, so profiling with it changes nothing."""

    name = "model_topk"

    def __init__(self):
        self.max_k = None

    def _select(self, probs: torch.Tensor, cap: int) -> torch.Tensor:
        raise ConfigError("topk_selector is the model's own routing; it is not applied as a selector "
                          "(pass it to profile(selector=...) or MOEProfiler, which leave routing unchanged)")


# the earlier profiler's module-level selectors (`selectors.kneedle_selector`, ...)
topk_selector = ModelTopK()
kneedle_selector = kneedle()
cumsum_selector = cumsum()
entropy_selector = entropy()
gap_ratio_selector = gap_ratio()


def _valid_names() -> str:
    return ", ".join(SELECTORS)


def _parse_value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("none", ""):
        return None
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        raise ConfigError(f"selector parameter {t!r} is not a number") from None


def resolve_selector(spec: Any) -> Selector | None:
    """A `Selector` from a name string, a selector object or any callable ``probs -> k``.

    Strings: ``"name"`` or ``"name:v1,v2"`` (positional) or ``"name:key=v,..."``; e.g. ``"kneedle"``,
    ``"cumsum:0.8"``, ``"topk:4"``, ``"kneedle:max_k=8,S=2"``. ``None`` gives ``None`` (no selector).
    Unknown names or bad parameters raise `ConfigError` naming the valid choices.
    """
    if spec is None or isinstance(spec, ModelTopK):
        return None
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        key = name.strip().lower()
        if key.endswith("_selector"):
            key = key[: -len("_selector")]
        key = _ALIASES.get(key, key)
        if key not in SELECTORS:
            raise ConfigError(f"unknown selector {name!r}; valid selectors: {_valid_names()} "
                              f"(optionally with parameters, e.g. 'cumsum:0.8', 'topk:4', 'kneedle:max_k=8')")
        factory, positional = SELECTORS[key]
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if rest.strip():
            for part in rest.split(","):
                if "=" in part:
                    k, _, v = part.partition("=")
                    k = k.strip()
                    if k not in positional:
                        raise ConfigError(f"selector {key!r} has no parameter {k!r}; its parameters: "
                                          f"{', '.join(positional)}")
                    kwargs[k] = _parse_value(v)
                else:
                    if kwargs:
                        raise ConfigError(f"selector spec {spec!r}: positional values must come before key=value ones")
                    args.append(_parse_value(part))
        if len(args) > len(positional):
            raise ConfigError(f"selector {key!r} takes at most {len(positional)} values "
                              f"({', '.join(positional)}), got {len(args)} in {spec!r}")
        if key == "topk" and not args and "k" not in kwargs:
            raise ConfigError("selector 'topk' needs k, e.g. 'topk:4'")
        for pname, v in zip(positional, args):
            if pname in kwargs:
                raise ConfigError(f"selector spec {spec!r} gives {pname!r} twice")
            kwargs[pname] = v
        return factory(**kwargs)
    if callable(spec):
        return CallableSelector(spec)
    raise ConfigError(f"a selector must be a name ({_valid_names()}), a Selector or a callable probs -> k; "
                      f"got {type(spec).__name__}")


