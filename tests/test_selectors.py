"""Selectors vs independent references (kneed row by row, plain numpy loops), edge inputs, no host sync."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from moe_trace.errors import ConfigError
from moe_trace.experiments import selectors as S
from moe_trace.experiments.selectors import (apply_k, cumsum, entropy, gap_ratio, kneedle, resolve_selector,
                                             selector_middleware, topk)


# ---------------------------------------------------------------------------------------------
# independent references (one token at a time, numpy / kneed)
def ref_kneedle(row: np.ndarray, S_: float, cap: int, fallback: int | None = None) -> int:
    kneed = pytest.importorskip("kneed")
    y = np.sort(row.astype(np.float64))[::-1]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        kl = kneed.KneeLocator(np.arange(len(y)), y, curve="convex", direction="decreasing",
                               S=S_, interp_method="interp1d")
    k = kl.knee
    if k is None:
        k = cap if fallback is None else min(fallback, cap)
    return int(min(max(k, 1), cap))


def ref_cumsum(row: np.ndarray, thr: float, cap: int) -> int:
    y = np.sort(row.astype(np.float64))[::-1]
    total = 0.0
    for v in y:
        total += v
    acc = 0.0
    for j, v in enumerate(y):
        acc += v
        if acc / total >= thr:
            return min(max(j + 1, 1), cap)
    return cap


def ref_entropy(row: np.ndarray, cap: int, scale: float = 1.0) -> int:
    p = row.astype(np.float64)
    p = p / p.sum()
    h = 0.0
    for v in p:
        if v > 0:
            h -= v * math.log(v)
    return int(min(max(round(scale * math.exp(h)), 1), cap))


def ref_gap_ratio(row: np.ndarray, cap: int) -> int:
    y = np.sort(row.astype(np.float64))[::-1]
    if len(y) < 2:
        return 1
    best, best_i = -1.0, 0
    tiny = np.finfo(np.float64).tiny
    for i in range(min(cap, len(y) - 1)):
        r = y[i] / max(y[i + 1], tiny)
        if r > best:
            best, best_i = r, i
    return best_i + 1


def random_probs(t: int, e: int, temp: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(t, e, generator=g) * temp, dim=-1)


def edge_probs(e: int) -> torch.Tensor:
    rows = [torch.full((e,), 1.0 / e)]                                   # uniform
    one_hot = torch.zeros(e)
    one_hot[e // 2] = 1.0
    rows.append(one_hot)                                                  # one-hot
    ties = torch.zeros(e)
    ties[: max(1, e // 4)] = 1.0
    rows.append(ties / ties.sum())                                        # flat top, zero tail
    two = torch.full((e,), 0.1)
    two[:2] = 5.0
    rows.append(two / two.sum())                                          # two ties on top
    steps = torch.tensor([4.0] * 2 + [2.0] * 2 + [1.0] * (e - 4)) if e > 4 else torch.arange(e, 0, -1).float()
    rows.append(steps / steps.sum())                                      # staircase with ties
    return torch.stack(rows)


SHAPES = [(3, 1.0), (8, 0.5), (8, 3.0), (16, 1.0), (64, 2.0), (64, 8.0)]


def _inputs(e: int, temp: float) -> torch.Tensor:
    return torch.cat([random_probs(64, e, temp, seed=e * 31 + int(temp * 10)), edge_probs(e)])


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("e,temp", SHAPES)
@pytest.mark.parametrize("s_", [0.5, 1.0, 2.0])
def test_kneedle_matches_kneed(e, temp, s_):
    probs = _inputs(e, temp)
    for max_k in (None, 4):
        sel = kneedle(max_k=max_k, S=s_)
        k = sel(probs)
        cap = sel.cap(e)
        expected = [ref_kneedle(r, s_, cap) for r in probs.numpy()]
        assert k.tolist() == expected


def test_kneedle_no_knee_fallback():
    flat = torch.full((3, 8), 1 / 8)
    assert kneedle()(flat).tolist() == [8, 8, 8]
    assert kneedle(fallback=2)(flat).tolist() == [2, 2, 2]
    assert kneedle(max_k=4, fallback=6)(flat).tolist() == [4, 4, 4]
    assert kneedle()(torch.tensor([[0.7, 0.3]])).tolist() == [2]     # E=2 never has a knee
    assert kneedle()(torch.tensor([[1.0]])).tolist() == [1]
    # a clear elbow: two big, six small
    p = torch.tensor([[0.45, 0.45, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01]])
    assert kneedle()(p).tolist() == [ref_kneedle(p[0].numpy(), 1.0, 8)] == [2]


@pytest.mark.parametrize("e,temp", SHAPES)
@pytest.mark.parametrize("thr", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_cumsum_matches_loop(e, temp, thr):
    probs = _inputs(e, temp)
    for max_k in (None, 3):
        sel = cumsum(thr, max_k=max_k)
        cap = sel.cap(e)
        assert sel(probs).tolist() == [ref_cumsum(r, thr, cap) for r in probs.numpy()]


@pytest.mark.parametrize("e,temp", SHAPES)
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_entropy_matches_loop(e, temp, scale):
    probs = _inputs(e, temp)
    for max_k in (None, 5):
        sel = entropy(max_k=max_k, scale=scale)
        cap = sel.cap(e)
        assert sel(probs).tolist() == [ref_entropy(r, cap, scale) for r in probs.numpy()]


@pytest.mark.parametrize("e,temp", SHAPES)
def test_gap_ratio_matches_loop(e, temp):
    probs = _inputs(e, temp)
    for max_k in (None, 2, 6):
        sel = gap_ratio(max_k=max_k)
        cap = sel.cap(e)
        assert sel(probs).tolist() == [ref_gap_ratio(r, cap) for r in probs.numpy()]


def test_edge_values():
    e = 8
    uniform = torch.full((1, e), 1 / e)
    one_hot = torch.zeros(1, e)
    one_hot[0, 3] = 1
    assert cumsum(0.9)(uniform).tolist() == [8]
    assert cumsum(0.9)(one_hot).tolist() == [1]
    assert entropy()(uniform).tolist() == [8]
    assert entropy()(one_hot).tolist() == [1]
    assert gap_ratio()(one_hot).tolist() == [1]
    assert gap_ratio()(uniform).tolist() == [1]          # all ratios 1: ties go to the smallest k
    p = torch.tensor([[0.3, 0.3, 0.3, 0.04, 0.03, 0.03]])
    assert gap_ratio()(p).tolist() == [3]
    p = torch.tensor([[0.3, 0.3, 0.3, 0.05, 0.05, 0, 0, 0]])
    assert gap_ratio()(p).tolist() == [5]                # a gap to exact zero is the largest ratio
    assert topk(2)(uniform).tolist() == [2]
    assert topk(20)(uniform).tolist() == [8]             # capped at E


def test_shapes_dtype_and_bounds():
    probs = random_probs(24, 16, 2.0, 1).reshape(2, 12, 16)
    for sel in (topk(3), kneedle(), cumsum(0.7), entropy(), gap_ratio(), kneedle(max_k=4)):
        k = sel(probs)
        assert k.shape == (2, 12) and k.dtype == torch.int64
        assert int(k.min()) >= 1 and int(k.max()) <= sel.cap(16)
    empty = torch.zeros(0, 16)
    for sel in (topk(3), kneedle(), cumsum(), entropy(), gap_ratio()):
        assert sel(empty).shape == (0,)
    # half-precision input works (computed in float64 internally)
    assert kneedle()(probs.half()).shape == (2, 12)


def test_no_host_sync(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("host sync inside a selector")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    monkeypatch.setattr(torch, "nonzero", boom)
    monkeypatch.setattr(torch.Tensor, "nonzero", boom)
    probs = random_probs(32, 16, 2.0, 3)
    logits = torch.randn(32, 16)
    for sel in (topk(2), kneedle(), kneedle(max_k=4, S=2.0), cumsum(0.8), entropy(), gap_ratio(max_k=5)):
        k = sel(probs)
        w, i = apply_k(probs, k, sel.cap(16), renormalize=True, sentinel=16)
        selector_middleware(sel, renormalize=True)(logits, w, i)


def test_apply_k():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]])
    k = torch.tensor([2, 1])
    w, i = apply_k(probs, k, 3, renormalize=False, sentinel=4)
    assert i.tolist() == [[1, 3, 4], [0, 4, 4]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.25, 0.0], [0.7, 0.0, 0.0]]))
    w, i = apply_k(probs, k, 3, renormalize=True, sentinel=-1)
    assert i.tolist() == [[1, 3, -1], [0, -1, -1]]
    torch.testing.assert_close(w, torch.tensor([[2 / 3, 1 / 3, 0.0], [1.0, 0.0, 0.0]]))
    # k is clamped to [1, cap]
    w, i = apply_k(probs, torch.tensor([0, 9]), 2, renormalize=False, sentinel=4)
    assert i.tolist() == [[1, 4], [0, 1]] or i.tolist() == [[1, 4], [0, 2]] or i.tolist() == [[1, 4], [0, 3]]
    with pytest.raises(ConfigError):
        apply_k(probs, k, 5, renormalize=False, sentinel=4)
    with pytest.raises(ConfigError):
        apply_k(probs, k, 0, renormalize=False, sentinel=4)


def test_middleware_matches_model_topk():
    """topk(k) middleware reproduces an OLMoE-style router (softmax, top-k, optional renorm)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 8, generator=g, dtype=torch.float32).to(torch.bfloat16)
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    vals, idx = torch.topk(probs, 2, dim=-1)
    for renorm in (False, True):
        ref_w = vals / vals.sum(-1, keepdim=True) if renorm else vals
        mw = selector_middleware("topk:2", renormalize=renorm)
        w, i = mw(logits, ref_w.to(logits.dtype), idx)
        assert w.dtype == torch.bfloat16 and i.dtype == idx.dtype
        assert torch.equal(i, idx)
        torch.testing.assert_close(w, ref_w.to(torch.bfloat16))
    # dynamic selector: padded slots point at E with weight 0
    mw = selector_middleware(kneedle(max_k=4), renormalize=True)
    assert mw.cap(8) == 4
    w, i = mw(logits, vals, idx)
    k = kneedle(max_k=4)(probs)
    assert w.shape == (40, 4)
    assert torch.equal((i != 8).sum(-1), k)
    assert torch.all(w[i == 8] == 0)
    torch.testing.assert_close(w.float().sum(-1), torch.ones(40), atol=1e-2, rtol=0)
    assert selector_middleware("cumsum:0.5", cap=2).cap(8) == 2


def test_resolve_selector():
    assert resolve_selector("kneedle") == kneedle()
    assert resolve_selector("cumsum:0.8") == cumsum(0.8)
    assert resolve_selector("topk:4") == topk(4)
    assert resolve_selector("top-k:4") == topk(4)
    assert resolve_selector("kneedle:max_k=8,S=2") == kneedle(max_k=8, S=2.0)
    assert resolve_selector("cumsum:0.7,4") == cumsum(0.7, max_k=4)
    assert resolve_selector("entropy:scale=0.5") == entropy(scale=0.5)
    assert resolve_selector("gap_ratio:3") == gap_ratio(3)
    assert resolve_selector("kneedle_selector") == kneedle()
    assert resolve_selector(S.cumsum_selector) is S.cumsum_selector
    assert resolve_selector(None) is None
    for sel in (kneedle(max_k=8, S=2.0), cumsum(0.8), topk(3), entropy(4, 0.5), gap_ratio(2)):
        assert resolve_selector(sel.spec) == sel
    fn = resolve_selector(lambda p: torch.full(p.shape[:-1], 3))
    assert fn(torch.rand(5, 8)).tolist() == [3] * 5
    assert resolve_selector(lambda p: 100)(torch.rand(2, 8)).tolist() == [8, 8]   # clamped to E
    for bad in ("nope", "topk", "topk:0", "topk:x", "cumsum:1.5", "cumsum:0", "kneedle:S=-1",
                "cumsum:foo=1", "gap_ratio:1,2", "entropy:scale=0", 42):
        with pytest.raises(ConfigError) as ei:
            resolve_selector(bad)
        if bad == "nope":
            assert "kneedle" in str(ei.value) and "cumsum" in str(ei.value)
