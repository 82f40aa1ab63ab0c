"""Covariance estimators: scikit-learn / nonlinshrink oracles, dense transcriptions, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.covariance import OAS, LedoitWolf

import covinit
from covinit.covariance import Estimate, _hilbert_kernel, analytical_shrinkage, estimate, estimators
from covinit.stats import Moments, merge_all

NAMES = ("empirical", "ledoit_wolf", "oas", "nonlinear", "spatpca")


def moments_of(x: np.ndarray, batches: int = 4) -> Moments:
    """Moments streamed over several batches and merged, as calibration does."""
    parts = np.array_split(np.asarray(x, dtype=np.float64), batches)
    return merge_all([Moments.from_batch(torch.tensor(p.copy())) for p in parts
                      if len(p)])


def make_data(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((200, 30))
    if kind == "correlated":  # AR(1) covariance, ρ = 0.9
        k = 40
        cov = 0.9 ** np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
        return rng.multivariate_normal(np.zeros(k), cov, size=150)
    if kind == "rank_deficient":  # n < k
        return rng.standard_normal((20, 50)) @ rng.standard_normal((50, 50))
    if kind == "large_mean":
        return 1e4 + rng.standard_normal((300, 25)) * np.linspace(0.5, 2.0, 25)
    raise AssertionError(kind)


DATA = ("random", "correlated", "rank_deficient", "large_mean")


# ---------------------------------------------------------------------- registry
def test_registry_lists_exactly_the_five_estimators():
    assert tuple(estimators()) == NAMES
    assert covinit.estimators() == estimators()
    assert all(isinstance(d, str) and d for d in estimators().values())


def test_unknown_name_and_bad_inputs():
    m = moments_of(make_data("random"))
    with pytest.raises(ValueError, match="valid names: empirical, ledoit_wolf"):
        estimate(m, "ledoit-wolf")
    with pytest.raises(TypeError, match="Moments"):
        estimate(torch.eye(3), "oas")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        estimate(Moments.empty(4), "empirical")
    with pytest.raises(TypeError, match="takes no options"):
        estimate(m, "ledoit_wolf", alpha=0.1)
    with pytest.raises(ValueError, match="ddof"):
        estimate(m, "nonlinear", ddof=2)


# ---------------------------------------------------------------------- sklearn oracles
@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize(("name", "cls"), [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
def test_matches_sklearn(kind, name, cls):
    x = make_data(kind)
    est = estimate(moments_of(x, batches=5), name)
    ref = cls().fit(x)
    assert est.shrinkage == pytest.approx(ref.shrinkage_, abs=1e-10)
    scale = np.abs(ref.covariance_).max()
    np.testing.assert_allclose(est.covariance.numpy(), ref.covariance_, rtol=0,
                               atol=1e-10 * scale)
    np.testing.assert_allclose(est.mean.numpy(), x.mean(axis=0), rtol=1e-12)


def test_rank_deficient_shrinkage_is_large_and_empirical_is_zero():
    m = moments_of(make_data("rank_deficient"))
    assert estimate(m, "empirical").shrinkage == 0.0
    assert estimate(m, "ledoit_wolf").shrinkage > 0.05
    assert estimate(m, "oas").shrinkage > 0.05


def test_one_feature_matches_sklearn():
    x = np.random.default_rng(1).standard_normal((30, 1)) * 3 + 2
    for name, cls in (("ledoit_wolf", LedoitWolf), ("oas", OAS)):
        est, ref = estimate(moments_of(x), name), cls().fit(x)
        assert est.shrinkage == ref.shrinkage_ == 0.0
        np.testing.assert_allclose(est.covariance.numpy(), ref.covariance_, rtol=1e-12)


# ---------------------------------------------------------------------- Estimate API
@pytest.mark.parametrize("name", ["empirical", "ledoit_wolf", "oas", "nonlinear"])
def test_eigendecomposition_and_powers(name):
    x = make_data("correlated")
    est = estimate(moments_of(x), name)
    lam, vec = est.eigenvalues, est.eigenvectors
    assert torch.all(lam[:-1] >= lam[1:])
    cov = est.covariance
    torch.testing.assert_close((vec * lam) @ vec.T, cov, rtol=0, atol=1e-11 * float(lam[0]))
    torch.testing.assert_close(vec.T @ vec, torch.eye(est.k, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    root = est.sqrt()
    torch.testing.assert_close(root @ root, cov, rtol=0, atol=1e-10 * float(lam[0]))
    inv_root = est.inv_sqrt()
    torch.testing.assert_close(inv_root @ cov @ inv_root, torch.eye(est.k, dtype=torch.float64),
                               rtol=0, atol=1e-8)
    m = torch.randn(7, est.k, dtype=torch.float64)
    torch.testing.assert_close(est.matmul_sqrt(m), m @ root, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.matmul_inv_sqrt(m), m @ inv_root, rtol=1e-10, atol=1e-10)
    values, vectors = est.top(3)
    assert values.shape == (3,) and vectors.shape == (est.k, 3)
    torch.testing.assert_close(cov @ vectors, vectors * values, rtol=0, atol=1e-10 * float(lam[0]))
    with pytest.raises(ValueError, match=r"1\.\.40"):
        est.top(41)
    with pytest.raises(ValueError, match="last dimension 40"):
        est.matmul_sqrt(torch.ones(3, 5))


def test_shrinkage_keeps_eigenvectors_and_maps_eigenvalues_affinely():
    m = moments_of(make_data("random"))
    emp, lw = estimate(m, "empirical"), estimate(m, "ledoit_wolf")
    s, mu = lw.shrinkage, lw.params["mu"]
    torch.testing.assert_close(lw.eigenvalues, (1 - s) * emp.eigenvalues + s * mu)
    overlap = (emp.eigenvectors.T @ lw.eigenvectors).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-12)


def test_inv_sqrt_finite_on_rank_deficient_empirical():
    m = moments_of(make_data("rank_deficient"))
    emp = estimate(m, "empirical")
    assert int((emp.eigenvalues < 1e-10 * emp.eigenvalues[0]).sum()) >= 30  # null space
    w = emp.inv_sqrt()
    assert torch.isfinite(w).all()
    # The floor is 1e-10·λ_max: the largest entry of Σ^{-1/2} is bounded by it.
    assert float(w.abs().max()) <= 1.0 / math.sqrt(1e-10 * float(emp.eigenvalues[0])) + 1e-6
    # Shrinkage estimates are well conditioned without the floor mattering.
    lw = estimate(m, "ledoit_wolf")
    assert float(lw.eigenvalues[-1]) > 1e-3 * float(lw.eigenvalues[0])


def test_inv_sqrt_of_zero_covariance_raises():
    m = Moments.from_batch(torch.ones(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        estimate(m, "empirical").inv_sqrt()


def test_estimate_is_lazy_and_caches_the_decomposition():
    est = estimate(moments_of(make_data("random")), "oas")
    assert est._eig is None
    a = est.eigenvectors
    assert est.eigenvectors is a and isinstance(est, Estimate)
    assert "oas" in repr(est)


# ---------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       shift=st.sampled_from([0.0, 1.0, 1e3]), splits=st.integers(1, 5))
def test_properties_symmetric_psd_bounded_and_batch_order_invariant(n, k, seed, shift, splits):
    rng = np.random.default_rng(seed)
    x = shift + rng.standard_normal((n, k)) @ rng.standard_normal((k, k))
    forward = moments_of(x, splits)
    perm = rng.permutation(n)
    backward = moments_of(x[perm][::-1], splits + 1)
    names = ["empirical", "ledoit_wolf", "oas"] + (["nonlinear"] if n - 1 >= 12 else [])
    for name in names:
        a, b = estimate(forward, name), estimate(backward, name)
        cov = a.covariance
        scale = max(float(cov.abs().max()), 1e-300)
        torch.testing.assert_close(cov, cov.T, rtol=0, atol=0)
        assert float(torch.linalg.eigvalsh(cov)[0]) >= -1e-10 * scale
        if a.shrinkage is not None:
            assert 0.0 <= a.shrinkage <= 1.0
            assert b.shrinkage == pytest.approx(a.shrinkage, abs=1e-9)
        torch.testing.assert_close(b.covariance, cov, rtol=0, atol=1e-9 * scale)


# ---------------------------------------------------------------------- nonlinear
def dense_paper_formula(x: np.ndarray) -> np.ndarray:
    """Ledoit & Wolf (2020), Eqs. (4.3)-(4.9) and (C.4)-(C.8), transcribed directly with
    dense p×p... r×r matrices, demeaning with effective sample size n − 1."""
    n_rows, p = x.shape
    xc = x - x.mean(axis=0)
    n = n_rows - 1
    s = xc.T @ xc / n
    lam, u = np.linalg.eigh(s)
    lam = lam[max(0, p - n):]
    m = len(lam)
    big_l = np.tile(lam[:, None], (1, m))  # L_ij = λ_i
    h = n ** (-1 / 3)
    big_h = h * big_l.T  # H_ij = h·λ_j
    xx = (big_l - big_l.T) / big_h
    f = 3 / 4 / np.sqrt(5) * np.mean(np.maximum(1 - xx**2 / 5, 0) / big_h, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        hf_temp = -3 / 10 / np.pi * xx + 3 / 4 / np.sqrt(5) / np.pi * (1 - xx**2 / 5) \
            * np.log(np.abs((np.sqrt(5) - xx) / (np.sqrt(5) + xx)))
    edge = np.abs(xx) == np.sqrt(5)
    hf_temp[edge] = -3 / 10 / np.pi * xx[edge]
    hf = np.mean(hf_temp / big_h, axis=1)
    if p <= n:
        c = p / n
        d = lam / ((np.pi * c * lam * f) ** 2 + (1 - c - np.pi * c * lam * hf) ** 2)
    else:
        hf0 = 1 / np.pi * (3 / 10 / h**2 + 3 / 4 / np.sqrt(5) / h * (1 - 1 / 5 / h**2)
                           * np.log((1 + np.sqrt(5) * h) / (1 - np.sqrt(5) * h))) * np.mean(1 / lam)
        d0 = 1 / (np.pi * (p - n) / n * hf0)
        d1 = lam / (np.pi**2 * lam**2 * (f**2 + hf**2))
        d = np.concatenate([np.full(p - n, d0), d1])
    return (u * d) @ u.T


def moderate_data(n: int, p: int, seed: int) -> np.ndarray:
    """Population eigenvalues in [1, 10]: small enough a spread that the paper's closed form
    (which loses ~ε·x² to cancellation, x = eigenvalue ratio / bandwidth) is accurate."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((p, p)))
    root = q * np.sqrt(np.linspace(1, 10, p))
    return rng.standard_normal((n, p)) @ root.T + 5.0


@pytest.mark.parametrize(("n", "p"), [(400, 60), (50, 120)])
def test_nonlinear_matches_dense_transcription(n, p):
    x = moderate_data(n, p, seed=p)
    est = estimate(moments_of(x, 3), "nonlinear")
    ref = dense_paper_formula(x)
    np.testing.assert_allclose(est.covariance.numpy(), ref, rtol=0,
                               atol=1e-8 * np.abs(ref).max())
    assert est.params["n_effective"] == n - 1


@pytest.mark.parametrize(("n", "p"), [(400, 60), (50, 120)])
def test_nonlinear_matches_nonlinshrink(n, p):
    nls = pytest.importorskip("nonlinshrink")
    x = moderate_data(n, p, seed=7 * p)
    # nonlinshrink demeans and uses effective n − 1 and S = XcᵀXc/(n − 1): our ddof=1.
    ref = nls.shrink_cov(x)
    est = estimate(moments_of(x), "nonlinear", ddof=1)
    np.testing.assert_allclose(est.covariance.numpy(), ref, rtol=0, atol=1e-8 * np.abs(ref).max())


def test_nonlinear_near_p_equals_n_matches_high_precision_transcription():
    """At p ≈ n the smallest sample eigenvalue is ~1e-4 of the largest and the closed form
    loses ~ε·x² ≈ 1e-3 in float64; compare with the same formula in 30-digit arithmetic."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    x = moderate_data(61, 60, seed=5)
    xc = x - x.mean(axis=0)
    n, p = 60, 60
    lam = np.linalg.eigvalsh(xc.T @ xc / n)  # ascending, all positive
    assert lam[0] < 1e-3 * lam[-1]
    got = analytical_shrinkage(torch.from_numpy(lam), n).numpy()
    h = mp.mpf(n) ** (mp.mpf(-1) / 3)
    r5, c = mp.sqrt(5), mp.mpf(p) / n
    lm = [mp.mpf(float(v)) for v in lam]
    for i, li in enumerate(lm):
        f = hf = mp.mpf(0)
        for lj in lm:
            xx = (li - lj) / (h * lj)
            f += 3 / (4 * r5) * max(1 - xx**2 / 5, 0) / (h * lj)
            hf += (-3 * xx / (10 * mp.pi) + 3 / (4 * r5 * mp.pi) * (1 - xx**2 / 5)
                   * mp.log(abs((r5 - xx) / (r5 + xx)))) / (h * lj)
        f, hf = f / p, hf / p
        d = li / ((mp.pi * c * li * f) ** 2 + (1 - c - mp.pi * c * li * hf) ** 2)
        assert got[i] == pytest.approx(float(d), rel=1e-9)


def test_hilbert_kernel_is_accurate_where_the_closed_form_cancels():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40

    def exact(x: float):
        x = mp.mpf(x)
        r5 = mp.sqrt(5)
        return -3 * x / (10 * mp.pi) + 3 / (4 * r5 * mp.pi) * (1 - x**2 / 5) \
            * mp.log(abs((r5 - x) / (r5 + x)))

    xs = [0.3, -2.0, 9.99, 10.0, -57.3, 1234.5, -1e6]
    got = _hilbert_kernel(torch.tensor(xs, dtype=torch.float64))
    for x, g in zip(xs, got, strict=True):
        assert float(g) == pytest.approx(float(exact(x)), rel=1e-12)
    # At |x| = √5 the closed form has log(0)·0; the limit is −3x/(10π).
    edge = _hilbert_kernel(torch.tensor([math.sqrt(5.0)], dtype=torch.float64))
    assert float(edge[0]) == pytest.approx(-3 * math.sqrt(5.0) / (10 * math.pi))


def test_nonlinear_handles_rank_deficient_inputs_where_nonlinshrink_raises():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((200, 30))
    x = np.concatenate([z, z[:, :10] + z[:, 10:20]], axis=1)  # k=40, rank 30 < n
    nls = pytest.importorskip("nonlinshrink")
    with pytest.raises(ValueError, match="singular"):
        nls.shrink_cov(x)
    est = estimate(moments_of(x), "nonlinear")
    lam = est.eigenvalues
    assert torch.isfinite(est.covariance).all()
    assert float(lam[-1]) > 0  # the 10 null directions get a positive value
    # the 10 null directions share one value d0 (wherever it falls in the sorted spectrum)
    vals = lam.numpy()
    assert max(int(np.isclose(vals, v, rtol=1e-12, atol=0).sum()) for v in vals) == 10


def test_nonlinear_improves_on_sample_covariance_when_k_exceeds_n():
    rng = np.random.default_rng(11)
    p, n = 100, 60
    true = np.diag(np.linspace(1, 4, p))
    x = rng.standard_normal((n, p)) @ np.sqrt(true)
    m = moments_of(x)
    err = {name: np.linalg.norm(estimate(m, name).covariance.numpy() - true)
           for name in ("empirical", "nonlinear", "ledoit_wolf")}
    assert err["nonlinear"] < 0.5 * err["empirical"]


def test_nonlinear_needs_twelve_rows():
    m = moments_of(np.random.default_rng(0).standard_normal((10, 5)), 1)
    with pytest.raises(ValueError, match="n ≥ 12"):
        estimate(m, "nonlinear")


def test_analytical_shrinkage_zero_matrix():
    assert torch.equal(analytical_shrinkage(torch.zeros(4, dtype=torch.float64), 20),
                       torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("p", [0.5, 1.0, -0.5, -1.0])
def test_power_matches_dense_eigendecomposition(p):
    est = estimate(moments_of(make_data("correlated")), "ledoit_wolf")
    lam, vec = np.linalg.eigh(est.covariance.numpy())
    want = (vec * lam**p) @ vec.T  # brute force on the (well-conditioned) shrunk matrix
    np.testing.assert_allclose(est.power(p).numpy(), want, rtol=1e-9, atol=1e-12)
    assert est.power(p) is est.power(p)  # computed once: q/k/v share one estimate
    if p == 0.5:
        torch.testing.assert_close(est.power(p), est.sqrt())
    if p == -0.5:
        torch.testing.assert_close(est.power(p), est.inv_sqrt())
