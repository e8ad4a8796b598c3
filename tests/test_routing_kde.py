"""KDE models of router logits: references (scipy / scikit-learn), p-values under the null, files."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
from scipy import stats

from moe_trace.errors import ConfigError, TraceError
from moe_trace.routing import kde as K


def _null_logits(n: int, e: int, seed: int) -> np.ndarray:
    """Synthetic router logits: per-expert offsets plus gaussian noise (a skewed pooled distribution)."""
    rng = np.random.default_rng(seed)
    offsets = np.linspace(-1.5, 2.0, e)
    return offsets[None, :] + rng.gamma(2.0, 0.5, size=(n, e))


def test_gaussian_density_matches_scipy_gaussian_kde():
    x = np.random.default_rng(0).normal(1.0, 2.0, 3000)
    ref = stats.gaussian_kde(x)  # Scott's rule, factor * std(ddof=1)
    m = K.LogitKDE.fit(x, "gaussian", "scott", max_points=None)
    assert m.bandwidth == pytest.approx(ref.factor * np.std(x, ddof=1), rel=1e-12)
    g = np.linspace(-6, 8, 57)
    np.testing.assert_allclose(m.pdf(g), ref(g), rtol=1e-6, atol=1e-12)
    # the exact CDF equals scipy's integral of the same KDE
    ref_cdf = np.array([ref.integrate_box_1d(-np.inf, v) for v in g])
    np.testing.assert_allclose(m.cdf(g, exact=True), ref_cdf, atol=1e-9)
    np.testing.assert_allclose(m.cdf(g), ref_cdf, atol=2e-4)  # the lookup table


def test_silverman_matches_scipy():
    x = np.random.default_rng(1).normal(size=500)
    ref = stats.gaussian_kde(x, bw_method="silverman")
    m = K.LogitKDE.fit(x, "gaussian", "silverman", max_points=None)
    assert m.bandwidth == pytest.approx(ref.factor * np.std(x, ddof=1), rel=1e-12)


def test_cdf_of_standard_normal_sample_is_near_norm_cdf():
    x = np.random.default_rng(2).standard_normal(20000)
    g = np.linspace(-3, 3, 61)
    for kernel in K.DEFAULT_KERNELS:
        m = K.LogitKDE.fit(x, kernel)
        assert np.abs(m.cdf(g) - stats.norm.cdf(g)).max() < 0.01, kernel
        assert m.cdf(-50.0) == 0.0 and m.cdf(50.0) == 1.0


@pytest.mark.parametrize("kernel", K.KERNELS)
def test_cdf_table_is_the_integral_of_the_sklearn_density(kernel):
    x = np.random.default_rng(3).normal(size=2000)
    m = K.LogitKDE.fit(x, kernel)
    g = np.linspace(-2.5, 2.5, 41)
    np.testing.assert_allclose(m.cdf(g), m.cdf(g, exact=True), atol=1e-4)
    eps = 1e-5
    num = (m.cdf(g + eps, exact=True) - m.cdf(g - eps, exact=True)) / (2 * eps)
    np.testing.assert_allclose(num, m.pdf(g), rtol=2e-3, atol=2e-3)
    # every kernel gets the gaussian-equivalent width: same kernel standard deviation
    sd = m.bandwidth * K.KERNEL_STD[kernel]
    assert sd == pytest.approx(len(x) ** -0.2 * np.std(x, ddof=1), rel=1e-9)


def test_pvalues_are_uniform_under_the_null():
    train = _null_logits(3000, 8, seed=10)
    test = _null_logits(400, 8, seed=11)
    m = K.LogitKDE.fit(train, "gaussian")
    p = m.pvalue(test)
    assert stats.kstest(p.ravel(), "uniform").pvalue > 0.01
    # lower / two-sided tails too
    assert stats.kstest(m.pvalue(test, tail="lower").ravel(), "uniform").pvalue > 0.01
    assert stats.kstest(m.pvalue(test, tail="two-sided").ravel(), "uniform").pvalue > 0.01
    # trimmed models: p-values of trimmed new logits
    for t in (1, 2):
        mt = K.LogitKDE.fit(K.trim_logits(train, t), "gaussian", trim=t)
        assert stats.kstest(mt.pvalue(K.trim_logits(test, t)), "uniform").pvalue > 0.01
    # and they are not uniform when the distribution moved
    assert stats.kstest(m.pvalue(test + 0.3).ravel(), "uniform").pvalue < 1e-6
    ks = K.ks_uniform(p)
    assert ks["n"] == p.size and 0.4 < ks["mean"] < 0.6


def test_kth_best_pvalues_order():
    train = _null_logits(2000, 8, seed=4)
    m = K.LogitKDE.fit(train)
    pk = K.kth_best_pvalues(m, _null_logits(300, 8, seed=5), 4)
    assert pk.shape == (300, 4)
    assert (np.diff(pk, axis=1) >= 0).all()  # the best logit has the smallest upper-tail p-value


def test_trim_logits():
    x = np.array([[5.0, 1.0, 3.0, 2.0, 4.0, 0.0]])
    assert sorted(K.trim_logits(x, 1)) == [1.0, 2.0, 3.0, 4.0]
    assert sorted(K.trim_logits(x, 2)) == [2.0, 3.0]
    assert K.trim_logits(x, 0).shape == (6,)
    with pytest.raises(ConfigError):
        K.trim_logits(x, 3)


def test_subsampling_and_bad_input():
    x = np.random.default_rng(6).normal(size=50000)
    m = K.LogitKDE.fit(np.append(x, [np.nan, np.inf]), max_points=1000, seed=3)
    assert len(m.data) == 1000 and m.meta["n_source"] == 50000
    with pytest.raises(ConfigError):
        K.LogitKDE.fit(x, "triangle")
    with pytest.raises(ConfigError):
        K.LogitKDE.fit([np.nan])
    with pytest.raises(ConfigError):
        K.LogitKDE.fit(x, bandwidth="wide")
    m2 = K.LogitKDE.fit(x[:100], bandwidth=0.5)
    assert m2.bandwidth == 0.5


def test_save_load_round_trip_without_pickles(tmp_path):
    x = _null_logits(500, 8, seed=7)
    m = K.LogitKDE.fit(x, "epanechnikov", layer=3, trim=0, train="lambada")
    path = m.save(tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as z:  # loads without pickle
        assert set(z.files) == {"meta", "data", "grid", "cdf"}
        assert all(z[k].dtype != object for k in z.files)
    m2 = K.LogitKDE.load(path)
    assert (m2.kernel, m2.bandwidth, m2.layer, m2.meta["train"]) == ("epanechnikov", m.bandwidth, 3, "lambada")
    g = np.linspace(-3, 5, 33)
    np.testing.assert_array_equal(m2.cdf(g), m.cdf(g))
    np.testing.assert_allclose(m2.pdf(g), m.pdf(g))

    # a file holding a pickled object array is refused, not unpickled
    bad = tmp_path / "bad.npz"
    np.savez(bad, meta=np.array([{"kernel": "gaussian"}], dtype=object), data=x.ravel(), grid=g, cdf=g)
    with pytest.raises(TraceError):
        K.LogitKDE.load(bad)
    with pytest.raises(TraceError):
        K.LogitKDE.load(tmp_path / "missing.npz")


def test_model_set_files(tmp_path):
    x = _null_logits(400, 8, seed=8)
    ms = K.ModelSet()
    for layer in (0, 1):
        for m in K.fit_layer_models(x, layer, kernels=("gaussian", "tophat"), trims=(1, 2, 4)):
            ms.add(m)
    assert ms.trims(0) == [0, 1, 2]  # trim 4 of 8 experts leaves nothing: skipped
    files = {p.name for p in ms.save(tmp_path, "tiny")}
    assert {"tiny_distribution_model_layer_0.npz", "tiny_distribution_model_layer_0_trimmed_2.npz",
            "tiny_distribution_model_layer_1_gaussian.npz", "tiny_distribution_model_layer_1_tophat.npz"} <= files
    for f in tmp_path.glob("*.npz"):  # no pickled member anywhere
        with zipfile.ZipFile(f) as zf:
            for name in zf.namelist():
                header = zf.read(name)[:128]
                assert b"'|O'" not in header and b"'O'" not in header
    back = K.ModelSet.load(tmp_path)
    assert back.layers == [0, 1] and back.kernels(1) == ["gaussian", "tophat"]
    np.testing.assert_array_equal(back.main(1).cdf_table, ms.main(1).cdf_table)
    with pytest.raises(TraceError):
        K.ModelSet.load(tmp_path / "nothing")
