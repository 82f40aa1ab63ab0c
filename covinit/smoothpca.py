"""Smoothness-regularised sparse PCA in the style of SpatPCA (README: "Covariance estimators").

Wang, W.-T. and Huang, H.-C. (2017). Regularized principal component analysis for spatial
data. *Journal of Computational and Graphical Statistics* 26(1), 14-25; R package SpatPCA.

Problem, for a covariance ``S`` (k×k), a roughness matrix ``Ω`` (:mod:`covinit.geometry`)
and a rank ``r``::

    minimise  −tr(ΦᵀSΦ) + τ1·tr(ΦᵀΩΦ) + τ2·Σ|φ_ij|   subject to  ΦᵀΦ = I_r.

ADMM with the splits ``Φ = C`` (C on the Stiefel manifold) and ``Φ = R`` (R carries the L1
term; only when τ2 > 0), multipliers ``Λ2`` and ``Λ1``::

    Φ ← (2(τ1Ω − S) + m·ρ·I)⁻¹ (ρC − Λ2 [+ ρR − Λ1])      (m = number of splits)
    R ← soft(Φ + Λ1/ρ, τ2/ρ)
    C ← U·Vᵀ  from the thin SVD of Φ + Λ2/ρ
    Λ1 ← Λ1 + ρ(Φ − R);  Λ2 ← Λ2 + ρ(Φ − C)

``ρ = 10·(λ_max(S) + τ1·λ_max(Ω))`` keeps the system positive definite and the non-convex
iteration stable (SpatPCA uses ``10·λ_max(S)``; the τ1 term matters once the roughness
penalty dominates); the Cholesky factor is computed once per (τ1, τ2) and reused by every
iteration.  Iterations stop when the residuals ``‖Φ − C‖``, ``‖C − C_prev‖`` (and the R
ones) divided by ``√(k·r)`` fall below ``tol``.

With τ2 = 0 the problem is an eigenproblem: Φ spans the top-r eigenvectors of ``S − τ1Ω``
(Ky Fan).  :func:`pca_state` computes that exactly, with ``Λ2 = −2(τ1Ω − S)Φ``, which is a
fixed point of the ADMM; τ1 = τ2 = 0 is ordinary PCA.  The estimator therefore solves the
τ1 path exactly and runs the ADMM only for τ2 > 0, warm-started from the τ2 = 0 solution and
along the ascending τ2 grid.  (Started elsewhere, e.g. from plain PCA with τ1 > 0, the ADMM
converges to the same solution; the tests check that.)

τ1, τ2 and the eigenvalue shrinkage γ are chosen by M-fold cross-validation from per-fold
moments only (SpatPCA's order: τ1 with τ2 = 0, then τ2 at the chosen τ1, then γ).  The τ
scores are the held-out reconstruction error
``Σ_folds ‖X_val(I − ΦΦᵀ)‖²_F = tr G − 2tr(ΦᵀGΦ) + tr(ΦᵀGΦ·ΦᵀΦ)`` with ``G`` the validation
fold's co-moment about the training mean; γ's score is ``‖S_val − Σ̂(γ)‖²_F``.  τ1 and τ2
are picked by the one-standard-error rule by default (``select="one_se"``; SpatPCA's plain
minimum is ``select="min"``), so a penalty is switched on only when the folds agree.

The covariance returned is low rank plus isotropic noise: with ``λ̃`` the eigenvalues of
``ΦᵀSΦ`` (eigenvectors ``V``), SpatPCA's noise level ``σ²`` (see :func:`low_rank_plus_noise`)
and ``Σ̂ = ΦV·diag((λ̃ − σ² − γ)⁺)·VᵀΦᵀ + σ²I``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from covinit.geometry import roughness
from covinit.stats import Moments, merge_all

__all__ = ["ADMMState", "SmoothPCAFit", "SmoothPCAResult", "default_rho", "lambda_max",
           "low_rank_plus_noise", "pca_state", "smooth_pca", "spatpca"]


@dataclass(frozen=True)
class ADMMState:
    """Iterates of the ADMM, reusable as a warm start.

    Attributes
    ----------
    phi, c : Tensor, shape (k, r)
    lam2 : Tensor, shape (k, r)
        Multiplier of ``Φ = C``.
    r, lam1 : Tensor, shape (k, r), or None
        Sparse split and its multiplier (None until a τ2 > 0 fit).
    """

    phi: Tensor
    c: Tensor
    lam2: Tensor
    r: Tensor | None = None
    lam1: Tensor | None = None


@dataclass(frozen=True)
class SmoothPCAResult:
    """Outcome of :func:`smooth_pca`.

    Attributes
    ----------
    components : Tensor, shape (k, r)
        Φ at the last iterate (orthonormal up to the stopping tolerance).
    state : ADMMState
        For warm starts.
    iterations : int
    converged : bool
    objective : list of float
        ``−tr(CᵀSC) + τ1·tr(CᵀΩC) + τ2·Σ|C|`` at each iterate's feasible point ``C``
        (only when ``track_objective=True``).
    """

    components: Tensor
    state: ADMMState
    iterations: int
    converged: bool
    objective: list[float] = field(default_factory=list)


def _objective(s: Tensor, omega: Tensor, x: Tensor, tau1: float, tau2: float) -> float:
    val = -torch.sum(x * (s @ x)) + tau1 * torch.sum(x * (omega @ x)) + tau2 * x.abs().sum()
    return float(val)


def _polar(x: Tensor) -> Tensor:
    """Nearest matrix with orthonormal columns, ``U·Vᵀ`` from the thin SVD."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def pca_state(s: Tensor, rank: int, tau1: float = 0.0, omega: Tensor | None = None) -> ADMMState:
    """ADMM start at the exact τ2 = 0 solution: the top-``rank`` eigenvectors of ``S − τ1Ω``.

    Minimising ``tr(Φᵀ(τ1Ω − S)Φ)`` over ``ΦᵀΦ = I`` is an eigenproblem (Ky Fan), so with
    τ2 = 0 no iteration is needed; ``Λ2 = −2(τ1Ω − S)Φ`` makes it a fixed point of the ADMM.
    With τ1 = 0 this is ordinary PCA.
    """
    a = s if omega is None or tau1 == 0.0 else s - tau1 * omega  # (k, k), = −(τ1Ω − S)
    lam, vec = torch.linalg.eigh(0.5 * (a + a.T))
    phi = vec.flip(1)[:, :rank].contiguous()
    return ADMMState(phi=phi, c=phi.clone(), lam2=2.0 * phi * lam.flip(0)[:rank])


def lambda_max(a: Tensor, iters: int = 60) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration, O(iters·k²).

    Only scales are derived from it (ρ, the default τ1 grid), so a few digits suffice, and
    it avoids a k³ decomposition per call.  The start vector is fixed pseudo-random, so the
    result is deterministic.
    """
    k = a.shape[0]
    g = torch.Generator(device="cpu").manual_seed(12345)
    v = torch.randn(k, generator=g, dtype=torch.float64).to(a.device)
    top = 0.0
    for _ in range(iters):
        w = a @ v
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        top = float(v @ w)
        v = w / norm
    return max(top, float(v @ (a @ v)))


def default_rho(s: Tensor, omega: Tensor | None = None, tau1: float = 0.0) -> float:
    """ADMM step ``10·(λ_max(S) + τ1·λ_max(Ω))`` (1 for zero matrices).

    SpatPCA uses ``10·λ_max(S)``; the ``τ1`` term keeps the non-convex iteration stable when
    the roughness penalty dominates (the C-update behaves like a gradient step of size
    ``2/ρ`` on ``tr(Φᵀ(τ1Ω − S)Φ)``, which needs ``ρ`` above that matrix's norm).
    """
    top = lambda_max(s)
    if omega is not None and tau1 > 0.0:
        top += tau1 * lambda_max(omega)
    return 10.0 * top if top > 0 else 1.0


def smooth_pca(s: Tensor, omega: Tensor, rank: int, tau1: float = 0.0, tau2: float = 0.0, *,
               rho: float | None = None, init: ADMMState | None = None, max_iter: int = 1000,
               tol: float = 1e-7, track_objective: bool = False) -> SmoothPCAResult:
    """Solve the smooth sparse PCA problem (module docstring) by ADMM.

    Parameters
    ----------
    s : Tensor, shape (k, k), float64
        Covariance.
    omega : Tensor, shape (k, k), float64
        Roughness matrix, symmetric PSD.
    rank : int
        Number of components r, ``1 ≤ r ≤ k``.
    tau1, tau2 : float, default=0
        Roughness and L1 weights (≥ 0), in the units of ``S``.
    rho : float, optional
        ADMM step; default :func:`default_rho`.  Must exceed ``2·λ_max(S)``.
    init : ADMMState, optional
        Warm start; default :func:`pca_state`.
    max_iter : int, default=1000
    tol : float, default=1e-7
        Stopping threshold on the RMS residuals.
    track_objective : bool, default=False
        Record the objective at every iterate.

    Returns
    -------
    SmoothPCAResult
    """
    k = s.shape[0]
    if s.shape != (k, k) or omega.shape != (k, k):
        raise ValueError(f"S and Ω must both be ({k}, {k}), got {tuple(s.shape)} and "
                         f"{tuple(omega.shape)}")
    if not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(f"rank must be an int in 1..{k}, got {rank!r}")
    if tau1 < 0 or tau2 < 0:
        raise ValueError(f"tau1 and tau2 must be ≥ 0, got {tau1}, {tau2}")
    rho = default_rho(s, omega, tau1) if rho is None else float(rho)
    state = pca_state(s, rank, tau1, omega) if init is None else init
    sparse = tau2 > 0.0
    phi, c, lam2 = state.phi, state.c, state.lam2
    r = state.r if state.r is not None else phi.clone()
    lam1 = state.lam1 if state.lam1 is not None else torch.zeros_like(phi)

    splits = 2 if sparse else 1
    system = 2.0 * (tau1 * omega - s)
    system.diagonal().add_(splits * rho)
    chol, info = torch.linalg.cholesky_ex(0.5 * (system + system.T))
    if int(info) != 0:
        raise ValueError(f"ADMM system is not positive definite: rho={rho:.3g} must exceed "
                         f"2·λ_max(S)")
    scale = math.sqrt(k * rank)
    history: list[float] = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (it is reported)
        rhs = rho * c - lam2
        if sparse:
            rhs = rhs + rho * r - lam1
        phi = torch.cholesky_solve(rhs, chol)
        c_old, r_old = c, r
        c = _polar(phi + lam2 / rho)
        lam2 = lam2 + rho * (phi - c)
        err = max(float((phi - c).norm()), float((c - c_old).norm()))
        if sparse:
            v = phi + lam1 / rho
            r = torch.sign(v) * (v.abs() - tau2 / rho).clamp_min(0.0)
            lam1 = lam1 + rho * (phi - r)
            err = max(err, float((phi - r).norm()), float((r - r_old).norm()))
        if not math.isfinite(err):
            raise ValueError(f"ADMM diverged (rho={rho:.3g}, tau1={tau1:.3g}, "
                             f"tau2={tau2:.3g}); use a larger rho")
        if track_objective:
            history.append(_objective(s, omega, c, tau1, tau2))
        if err / scale <= tol:
            converged = True
            break
    new_state = ADMMState(phi=phi, c=c, lam2=lam2, r=r if sparse else state.r,
                          lam1=lam1 if sparse else state.lam1)
    return SmoothPCAResult(phi, new_state, it, converged, history)


def low_rank_plus_noise(phi: Tensor, s: Tensor, gamma: float) -> tuple[Tensor, Tensor, float]:
    """SpatPCA's covariance from components: shrunk eigenvalues and a noise level.

    With ``λ̃_1 ≥ … ≥ λ̃_r`` the eigenvalues of ``ΦᵀSΦ`` and ``t = tr S``: start from
    ``L = r`` and ``σ² = (t − Σ_{j≤L} λ̃_j + L·γ)/(k − L)``; while ``λ̃_L − γ < σ²``, drop
    the L-th component and recompute (at ``L = 1``: ``σ² = (t − λ̃_1 + γ)/(k − 1)``); if even
    ``λ̃_1 − γ < σ²``, or ``λ̃_1 ≤ γ``, use ``σ² = t/k``.  Signal eigenvalues are
    ``(λ̃ − σ² − γ)⁺``.

    Parameters
    ----------
    phi : Tensor, shape (k, r), orthonormal columns, r < k
    s : Tensor, shape (k, k)
    gamma : float
        Eigenvalue shrinkage, ≥ 0.

    Returns
    -------
    vectors : Tensor, shape (k, r)
        ``Φ·V`` ordered by decreasing ``λ̃``.
    signal : Tensor, shape (r,)
        ``(λ̃ − σ² − γ)⁺`` (descending).
    noise : float
        ``σ²``.
    """
    k, rank = phi.shape
    small = phi.T @ s @ phi
    lam, vec = torch.linalg.eigh(0.5 * (small + small.T))
    lam, vec = lam.flip(0), vec.flip(1)
    total = float(torch.trace(s))
    lams = [float(v) for v in lam]
    if lams[0] > gamma:
        ell = rank
        kept = sum(lams)
        noise = (total - kept + ell * gamma) / (k - ell)
        while lams[ell - 1] - gamma < noise:
            if ell == 1:
                noise = (total - lams[0] + gamma) / (k - 1)
                break
            kept -= lams[ell - 1]
            ell -= 1
            noise = (total - kept + ell * gamma) / (k - ell)
        if lams[0] - gamma < noise:
            noise = total / k
    else:
        noise = total / k
    signal = (lam - noise - gamma).clamp_min(0.0)
    return phi @ vec, signal, noise


def _residual_score(g: Tensor, phi: Tensor) -> float:
    """``‖X(I − ΦΦᵀ)‖²_F`` from the co-moment ``G = XᵀX``."""
    gp = g @ phi
    small = phi.T @ gp
    return float(torch.trace(g) - 2.0 * torch.trace(small) + torch.sum(small * (phi.T @ phi)))


@dataclass(frozen=True)
class SmoothPCAFit:
    """What the ``spatpca`` estimator returns (see :func:`spatpca`).

    Attributes
    ----------
    components : Tensor, shape (k, r)
        Smooth principal directions, ordered by explained variance.
    eigenvalues : Tensor, shape (r,)
        Their covariance eigenvalues, signal plus noise.
    noise : float
        Isotropic noise eigenvalue σ² of the other k − r directions.
    params : dict
        ``rank``, ``tau1``, ``tau2``, ``gamma``, ``noise``, ``rho``, ``geometry``,
        ``iterations``, ``converged`` and, when cross-validated, the grids and CV scores.
    """

    components: Tensor
    eigenvalues: Tensor
    noise: float
    params: dict[str, Any]


def _grid(value: Any, name: str) -> list[float] | None:
    if value is None:
        return None
    vals = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise ValueError(f"spatpca: {name} must be a non-negative number or a non-empty "
                         f"sequence of them, got {value!r}")
    return sorted(set(vals))


def _tau1_fits(s: Tensor, omega: Tensor, rank: int, tau1s: Sequence[float]) -> list[ADMMState]:
    """Exact τ2 = 0 solutions along the τ1 grid (one eigendecomposition each)."""
    return [pca_state(s, rank, t1, omega) for t1 in tau1s]


def _tau2_path(s: Tensor, omega: Tensor, rank: int, tau1: float, tau2s: Sequence[float],
               start: ADMMState, lam_s: float, lam_omega: float,
               opts: dict[str, Any]) -> list[SmoothPCAResult]:
    """ADMM fits along an ascending τ2 grid at fixed τ1, each warm-started from the last."""
    rho = 10.0 * (lam_s + tau1 * lam_omega) or 1.0
    out, state = [], start
    for t2 in tau2s:
        if t2 == 0.0:
            res = SmoothPCAResult(state.phi, state, 0, True)
        else:
            res = smooth_pca(s, omega, rank, tau1, t2, rho=rho, init=state, **opts)
        state = res.state
        out.append(res)
    return out


def _select(scores: list[list[float]], rule: str) -> int:
    """Index into an ascending grid chosen from per-fold CV scores ``scores[fold][i]``.

    ``"min"``: the minimum of the summed score (SpatPCA).  ``"one_se"``: the smallest grid
    value whose summed score exceeds the minimum by at most one standard error of the
    paired per-fold differences, ``√M·std_m(score_m(i) − score_m(best))`` — the
    one-standard-error rule (Breiman et al. 1984), so that a regulariser is only switched
    on when every fold agrees it helps, not on a tie within noise.
    """
    m, g = len(scores), len(scores[0])
    totals = [sum(f[i] for f in scores) for i in range(g)]
    best = min(range(g), key=totals.__getitem__)
    if rule == "min" or m < 2:
        return best
    for i in range(best + 1):
        diffs = torch.tensor([f[i] - f[best] for f in scores], dtype=torch.float64)
        if float(diffs.sum()) <= math.sqrt(m) * float(diffs.std()):
            return i
    return best


def spatpca(moments: Moments, folds: Sequence[Moments] | None = None, *,
            rank: int | None = None, geometry: Any = "chain", tau1: Any = None,
            tau2: Any = 0.0, gamma: Any = None, select: str = "one_se", max_iter: int = 1000,
            tol: float = 1e-6) -> SmoothPCAFit:
    """The ``spatpca`` estimator: CV-tuned smooth sparse PCA plus a noise floor.

    Parameters
    ----------
    moments : Moments
        All rows (k features); ``S = M2/n``.
    folds : sequence of Moments, optional
        M ≥ 2 disjoint fold summaries whose union is ``moments`` (calibrate with
        ``folds=M``).  Required whenever a parameter is cross-validated.
    rank : int, optional
        Number of components r, ``1 ≤ r < k``; default ``min(8, k − 1)``.
    geometry : Tensor or tuple, default="chain"
        Ω or a spec for :func:`covinit.geometry.roughness` (``("chain",)``,
        ``("grid", rows, cols)``, ``("coords", array)``, ``("adjacency", A)``,
        ``("knn", W0, n_neighbors)``).
    tau1 : float or sequence of float, optional
        Roughness weight(s), in units of S.  Default: the grid
        ``{0} ∪ λ_max(S)/λ_max(Ω)·geomspace(1e-2, 1e6, 10)``, which needs ``folds``.  A
        single value fits without CV.
    tau2 : float or sequence of float, default=0
        L1 weight(s), in units of S; a sequence is cross-validated at the chosen τ1.
    gamma : float or sequence of float, optional
        Eigenvalue shrinkage; default with folds: ``{0} ∪ geomspace(λ1/1e4, λ1, 10)`` with
        ``λ1 = λ_max(S)`` (SpatPCA's grid); without folds: 0.
    select : {"one_se", "min"}, default="one_se"
        How τ1 and τ2 are picked from the CV scores (see :func:`_select`); ``"min"`` is
        SpatPCA's rule.  γ always takes the minimum.
    max_iter, tol
        ADMM limits for τ2 > 0, see :func:`smooth_pca`.

    Returns
    -------
    SmoothPCAFit

    Raises
    ------
    ValueError
        If a parameter must be cross-validated but ``folds`` is missing, or the folds do not
        add up to ``moments``.

    Notes
    -----
    With τ2 = 0 the constrained problem is the eigenproblem of ``S − τ1Ω`` and is solved
    exactly (:func:`pca_state`); the ADMM runs for τ2 > 0, warm-started from that solution
    and along the ascending τ2 grid.
    """
    rank, grids, needs_cv = _check_spatpca(moments, folds, rank, tau1, tau2, gamma, select)
    omega = roughness(geometry, moments.k).to(moments.m2.device)
    geometry_name = "matrix" if isinstance(geometry, Tensor) else (
        geometry if isinstance(geometry, str) else str(geometry[0]))
    opts = {"max_iter": max_iter, "tol": tol}
    s_all = moments.covariance()
    lam_all, lam_omega = lambda_max(s_all), lambda_max(omega)
    params: dict[str, Any] = {"rank": rank, "geometry": geometry_name, "select": select}
    if needs_cv:
        assert folds is not None
        chosen = _cross_validate(folds, omega, rank, grids, select, lam_all, lam_omega, opts,
                                 params)
    else:
        chosen = _Chosen(tau1=grids.tau1[0], tau2=grids.tau2[0],
                         gamma=grids.gamma[0] if grids.gamma is not None else 0.0)
    # Final fit on all rows: exact at τ1, then the ADMM along the τ2 path up to the choice.
    tau2_path = [t for t in (grids.tau2 if needs_cv else [chosen.tau2])
                 if 0.0 < t <= chosen.tau2]
    state = pca_state(s_all, rank, chosen.tau1, omega)
    iterations, converged = 0, True
    if tau2_path:
        fits = _tau2_path(s_all, omega, rank, chosen.tau1, tau2_path, state, lam_all, lam_omega,
                          opts)
        state = fits[-1].state
        iterations = sum(f.iterations for f in fits)
        converged = all(f.converged for f in fits)
    vec, signal, noise = low_rank_plus_noise(state.phi, s_all, chosen.gamma)
    params.update(tau1=chosen.tau1, tau2=chosen.tau2, gamma=chosen.gamma, noise=noise,
                  iterations=iterations, converged=converged)
    return SmoothPCAFit(vec, signal + noise, noise, params)


@dataclass(frozen=True)
class _Grids:
    """The candidate values of spatpca's tuning parameters (``None``: the default grid)."""

    tau1: list[float] | None
    tau2: list[float]
    gamma: list[float] | None


@dataclass(frozen=True)
class _Chosen:
    """The tuning parameters spatpca fits with on all rows."""

    tau1: float
    tau2: float
    gamma: float


def _check_spatpca(moments: Moments, folds: Sequence[Moments] | None, rank: int | None,
                   tau1: Any, tau2: Any, gamma: Any, select: str
                   ) -> tuple[int, _Grids, bool]:
    """Validate :func:`spatpca`'s arguments: ``(rank, grids, needs_cv)``."""
    k = moments.k
    if k < 2:
        raise ValueError(f"spatpca needs at least 2 features, got k={k}")
    rank = min(8, k - 1) if rank is None else rank
    if not isinstance(rank, int) or not 1 <= rank < k:
        raise ValueError(f"spatpca: rank must be an int in 1..{k - 1} (one direction must be "
                         f"left for the noise), got {rank!r}")
    if select not in ("one_se", "min"):
        raise ValueError(f"spatpca: select must be 'one_se' or 'min', got {select!r}")
    grids = _Grids(_grid(tau1, "tau1"), _grid(tau2, "tau2") or [0.0], _grid(gamma, "gamma"))
    needs_cv = grids.tau1 is None or len(grids.tau1) > 1 or len(grids.tau2) > 1 \
        or (grids.gamma is not None and len(grids.gamma) > 1)
    if needs_cv and (folds is None or len(folds) < 2):
        raise ValueError(
            "spatpca cross-validates tau1 (default grid), tau2 or gamma and needs per-fold "
            "moments: calibrate with folds=M (e.g. calibrate(model, data, folds=5)) and pass "
            "folds=calibration.folds(layer, side), or give single values for tau1, tau2 and "
            "gamma to fit without cross-validation")
    if folds is not None and needs_cv and sum(f.n for f in folds) != moments.n:
        raise ValueError(f"spatpca: the folds hold {sum(f.n for f in folds)} rows, the moments "
                         f"{moments.n}; they must partition the same rows")
    return rank, grids, needs_cv


def _cross_validate(folds: Sequence[Moments], omega: Tensor, rank: int, grids: _Grids,
                    select: str, lam_all: float, lam_omega: float, opts: dict[str, Any],
                    params: dict[str, Any]) -> _Chosen:
    """M-fold CV of τ1 (at τ2 = 0), then τ2 at the chosen τ1, then γ; records the scores in
    ``params``."""
    train, vals = [], []
    for i in range(len(folds)):
        tr = merge_all([f for j, f in enumerate(folds) if j != i])
        train.append(tr)
        vals.append(folds[i].recentered(tr.mean))  # held-out rows about the train mean
    s_tr = [t.covariance() for t in train]
    lam_tr = [lambda_max(s) for s in s_tr]
    tau1s = grids.tau1
    if tau1s is None:
        base = lam_all / max(lam_omega, 1e-300)
        tau1s = [0.0] + [base * 10 ** (-2 + 8 * i / 9) for i in range(10)]
    # τ1 at τ2 = 0: exact solutions on every fold.
    states1 = [_tau1_fits(s, omega, rank, tau1s) for s in s_tr]
    cv1 = [[_residual_score(v.m2, st.phi) for st in sts] for v, sts in zip(vals, states1,
                                                                            strict=True)]
    i1 = _select(cv1, select)
    fold_states = [sts[i1] for sts in states1]
    params.update(tau1_grid=tau1s, cv_tau1=[sum(c[i] for c in cv1) for i in range(len(tau1s))])
    # τ2 path at the chosen τ1.
    tau2s, i2 = grids.tau2, 0
    if len(tau2s) > 1:
        paths = [_tau2_path(s, omega, rank, tau1s[i1], tau2s, st, lam, lam_omega, opts)
                 for s, st, lam in zip(s_tr, fold_states, lam_tr, strict=True)]
        cv2 = [[_residual_score(v.m2, r.components) for r in path]
               for v, path in zip(vals, paths, strict=True)]
        i2 = _select(cv2, select)
        fold_states = [path[i2].state for path in paths]
        params.update(tau2_grid=tau2s, cv_tau2=[sum(c[i] for c in cv2)
                                                for i in range(len(tau2s))])
    # γ on the fold components: ‖S_val − Σ̂(γ)‖²_F.
    gammas = grids.gamma
    if gammas is None:
        gammas = [0.0] + [lam_all * 10 ** (-4 + 4 * i / 9) for i in range(10)]
    cv3 = [0.0] * len(gammas)
    for st, s, v in zip(fold_states, s_tr, vals, strict=True):
        s_val = v.m2 / v.n
        for gi, g in enumerate(gammas):
            vec, sig, noise = low_rank_plus_noise(st.phi, s, g)
            est = (vec * sig) @ vec.T
            est.diagonal().add_(noise)
            cv3[gi] += float(((s_val - est) ** 2).sum())
    ig = min(range(len(gammas)), key=cv3.__getitem__)
    params.update(gamma_grid=gammas, cv_gamma=cv3)
    return _Chosen(tau1=tau1s[i1], tau2=tau2s[i2], gamma=gammas[ig])
