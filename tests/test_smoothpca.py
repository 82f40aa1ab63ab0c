"""Smooth sparse PCA (SpatPCA style): ADMM behaviour, reductions, recovery, cross-validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from covinit.covariance import estimate
from covinit.geometry import chain
from covinit.smoothpca import low_rank_plus_noise, pca_state, smooth_pca, spatpca
from covinit.stats import Moments, merge_all

F64 = torch.float64


def planted(component: torch.Tensor, n: int, seed: int, signal: float = 3.0,
            batches: int = 5) -> tuple[Moments, list[Moments]]:
    """Rows ``signal·z·v + white noise`` on k features; per-batch moments as folds."""
    g = torch.Generator().manual_seed(seed)
    k = component.numel()
    x = signal * torch.randn(n, 1, generator=g, dtype=F64) * component \
        + torch.randn(n, k, generator=g, dtype=F64)
    folds = [Moments.from_batch(b) for b in x.chunk(batches)]
    return merge_all(folds), folds


def smooth_bump(k: int) -> torch.Tensor:
    t = torch.linspace(0, 1, k, dtype=F64)
    v = torch.exp(-(((t - 0.4) / 0.12) ** 2))
    return v / v.norm()


def rough_direction(k: int, seed: int = 1) -> torch.Tensor:
    v = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return v / v.norm()


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    return math.degrees(math.acos(min(1.0, abs(float(u @ v)))))


def sine_data(k: int = 120, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Covariance of 6 smooth sine components plus white noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, k, dtype=F64)
    basis, _ = torch.linalg.qr(torch.stack([torch.sin(math.pi * j * t) for j in range(1, 7)], 1))
    x = (torch.randn(n, 6, generator=g, dtype=F64) * torch.linspace(4, 1.5, 6, dtype=F64)) \
        @ basis.T + torch.randn(n, k, generator=g, dtype=F64)
    return Moments.from_batch(x).covariance()


# ---------------------------------------------------------------------- ADMM
def test_admm_from_pca_converges_monotonically_to_the_exact_solution():
    s = sine_data()
    k, r = s.shape[0], 4
    omega = chain(k)
    tau1 = 3 * float(torch.linalg.eigvalsh(s)[-1]) / 16
    res = smooth_pca(s, omega, r, tau1, init=pca_state(s, r), tol=1e-9, max_iter=5000,
                     track_objective=True)
    assert res.converged
    obj = np.array(res.objective)
    assert obj[0] - obj[-1] > 1.0  # the iteration really moves
    assert np.diff(obj).max() <= 1e-9 * abs(obj).max()  # non-increasing
    phi = res.components
    torch.testing.assert_close(phi.T @ phi, torch.eye(r, dtype=F64), rtol=0, atol=1e-6)
    exact = pca_state(s, r, tau1, omega).phi
    torch.testing.assert_close(phi @ phi.T, exact @ exact.T, rtol=0, atol=1e-5)


def test_admm_with_sparsity_is_monotone_orthonormal_and_sparse():
    s = sine_data(k=60, n=150)
    k, r = s.shape[0], 3
    omega = chain(k)
    lam = float(torch.linalg.eigvalsh(s)[-1])
    tau1, tau2 = 10 * lam / 16, 0.05 * lam
    res = smooth_pca(s, omega, r, tau1, tau2, tol=1e-8, max_iter=4000, track_objective=True)
    obj = np.array(res.objective)
    assert np.diff(obj).max() <= 1e-6 * abs(obj).max()
    phi = res.components
    torch.testing.assert_close(phi.T @ phi, torch.eye(r, dtype=F64), rtol=0, atol=1e-6)
    assert res.state.r is not None and int((res.state.r == 0).sum()) > 0.2 * k * r
    # L1 lowers Σ|φ| compared with the smooth-only solution.
    smooth_only = pca_state(s, r, tau1, omega).phi
    assert float(phi.abs().sum()) < float(smooth_only.abs().sum())


def test_zero_penalties_reduce_to_ordinary_pca():
    m, _ = planted(smooth_bump(40), 100, seed=3)
    s = m.covariance()
    fit = spatpca(m, rank=3, tau1=0.0, tau2=0.0, gamma=0.0)
    _, vec = torch.linalg.eigh(s)
    top = vec[:, -3:]
    torch.testing.assert_close(fit.components @ fit.components.T, top @ top.T, rtol=0,
                               atol=1e-10)
    # and the ADMM itself has PCA as a fixed point
    res = smooth_pca(s, chain(40), 3, 0.0, 0.0, init=pca_state(s, 3))
    assert res.iterations == 1 and res.converged
    torch.testing.assert_close(res.components @ res.components.T, top @ top.T, rtol=0,
                               atol=1e-10)


def test_admm_input_validation():
    s = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.5"):
        smooth_pca(s, chain(5), 6)
    with pytest.raises(ValueError, match="must be ≥ 0"):
        smooth_pca(s, chain(5), 2, -1.0)
    with pytest.raises(ValueError, match="positive definite"):
        smooth_pca(2 * s, chain(5), 2, rho=1.0)


# ---------------------------------------------------------------------- low rank + noise
def test_low_rank_plus_noise_keeps_trace_and_orders_components():
    s = sine_data(k=60)
    phi = pca_state(s, 4).phi
    vec, signal, noise = low_rank_plus_noise(phi, s, 0.0)
    cov = (vec * signal) @ vec.T + noise * torch.eye(60, dtype=F64)
    assert float(torch.trace(cov)) == pytest.approx(float(torch.trace(s)), rel=1e-12)
    assert torch.all(signal[:-1] >= signal[1:]) and noise > 0
    # γ shrinks the signal eigenvalues
    _, shrunk, _ = low_rank_plus_noise(phi, s, 1.0)
    assert torch.all(shrunk <= signal + 1e-12)


# ---------------------------------------------------------------------- recovery and CV
def test_recovers_planted_smooth_component_better_than_pca():
    truth = smooth_bump(80)
    m, folds = planted(truth, 120, seed=0)
    est = estimate(m, "spatpca", folds=folds, rank=1)
    _, smooth = est.top(1)
    _, plain = estimate(m, "empirical").top(1)
    a_smooth, a_plain = angle(smooth[:, 0], truth), angle(plain[:, 0], truth)
    assert est.params["tau1"] > 0
    assert a_smooth < 0.5 * a_plain, (a_smooth, a_plain)


def test_cv_picks_zero_roughness_on_white_noise_structure():
    m, folds = planted(rough_direction(80), 120, seed=0)
    est = estimate(m, "spatpca", folds=folds, rank=1)
    assert est.params["tau1"] == 0.0
    scores = est.params["cv_tau1"]
    assert scores[-1] > scores[0]  # heavy smoothing is clearly worse


def test_cv_over_tau2_and_gamma_grids():
    m, folds = planted(smooth_bump(40), 100, seed=2)
    lam = float(torch.linalg.eigvalsh(m.covariance())[-1])
    est = estimate(m, "spatpca", folds=folds, rank=2, tau2=[0.0, 0.01 * lam, 0.1 * lam],
                   gamma=[0.0, 0.1, 1.0], max_iter=300)
    p = est.params
    assert p["tau2"] in p["tau2_grid"] and len(p["cv_tau2"]) == 3
    assert p["gamma"] in (0.0, 0.1, 1.0) and len(p["cv_gamma"]) == 3
    assert p["tau1"] in p["tau1_grid"]


def test_estimate_object_from_spatpca():
    m, folds = planted(smooth_bump(50), 100, seed=4)
    est = estimate(m, "spatpca", folds=folds, rank=3, geometry=("coords", np.linspace(0, 1, 50)))
    values, vectors = est.top(3)
    cov = est.covariance
    lam, vec = est.eigenvalues, est.eigenvectors
    torch.testing.assert_close((vec * lam) @ vec.T, cov, rtol=0, atol=1e-10)
    torch.testing.assert_close(vec.T @ vec, torch.eye(50, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(cov @ vectors, vectors * values, rtol=0, atol=1e-8)
    noise = est.params["noise"]
    assert torch.all(lam[3:] == noise) and float(values[-1]) >= noise
    inv_root = est.inv_sqrt()
    torch.testing.assert_close(inv_root @ cov @ inv_root, torch.eye(50, dtype=F64), rtol=0,
                               atol=1e-8)


def test_cv_without_folds_asks_for_them():
    m, _ = planted(smooth_bump(30), 60, seed=0)
    with pytest.raises(ValueError, match="folds=M"):
        estimate(m, "spatpca")
    with pytest.raises(ValueError, match="folds=M"):
        estimate(m, "spatpca", tau1=[0.0, 1.0])
    fit = estimate(m, "spatpca", tau1=0.5, rank=2)  # fixed τ1: no CV, γ = 0
    assert fit.params["tau1"] == 0.5 and fit.params["gamma"] == 0.0


def test_spatpca_option_validation():
    m, folds = planted(smooth_bump(30), 60, seed=0)
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.29"):
        estimate(m, "spatpca", tau1=0.0, rank=30)
    with pytest.raises(ValueError, match="partition"):
        estimate(m, "spatpca", folds=folds[:3])
    with pytest.raises(ValueError, match="non-negative"):
        estimate(m, "spatpca", tau1=-1.0)
    with pytest.raises(ValueError, match="select"):
        estimate(m, "spatpca", tau1=0.0, select="best")
