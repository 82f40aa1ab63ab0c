"""Covariance estimators over streamed moments, in one registry (README: "Covariance estimators").

Every estimator is a function ``(moments, folds, **options) -> Estimate`` of the sufficient
statistics of one layer side (:class:`covinit.stats.Moments`); none needs the raw samples.
With ``S = M2/n`` (divide by n, as scikit-learn does), ``μ = tr(S)/k``:

``empirical``
    ``Σ = S``.
``ledoit_wolf`` (Ledoit & Wolf 2004, scikit-learn's form)
    ``β = (Q/n − ‖S‖²_F)/(n·k)``, ``δ = ‖S − μI‖²_F/k``, ``s = min(β, δ)/δ``,
    ``Σ = (1−s)·S + s·μ·I``.
``oas`` (Chen, Wiesel, Eldar & Hero 2010, scikit-learn ≥ 1.3's form)
    ``α = ‖S‖²_F/k²``, ``s = min((α + μ²)/((n+1)(α − μ²/k)), 1)``, same convex combination.
``nonlinear`` (Ledoit & Wolf 2020, analytical nonlinear shrinkage)
    keeps the eigenvectors of S and replaces each eigenvalue by a kernel (Epanechnikov,
    bandwidth ``n^{-1/3}``) estimate of its optimal value; see :func:`analytical_shrinkage`.
``spatpca`` (Wang & Huang 2017)
    smoothness-regularised sparse PCA plus an isotropic noise floor; see
    :mod:`covinit.smoothpca`.  Needs per-fold moments for cross-validation.

Shrinking towards ``μI`` does not move eigenvectors: it moves eigenvalues, and so inverses,
whitening and ``Σ^{±1/2}``.  The eigendecomposition is computed once, lazily, and shared by
:meth:`Estimate.top`, :meth:`Estimate.sqrt` and friends; for the three shrink-to-``μI``
estimators it is the decomposition of S with the eigenvalues mapped affinely, so asking
for it costs one ``eigh``.

Example
-------
>>> import torch
>>> from covinit.stats import Moments
>>> from covinit.covariance import estimate
>>> m = Moments.from_batch(torch.randn(50, 20, dtype=torch.float64))
>>> est = estimate(m, "ledoit_wolf")
>>> values, vectors = est.top(4)
>>> vectors.shape
torch.Size([20, 4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from covinit._registry import Registry
from covinit.stats import Moments

__all__ = ["Estimate", "analytical_shrinkage", "estimate", "estimators", "ledoit_wolf_shrinkage",
           "oas_shrinkage"]

#: Default relative eigenvalue floor of :meth:`Estimate.inv_sqrt`.
INV_SQRT_FLOOR = 1e-10


class Estimate:
    """A covariance estimate with a lazily computed, cached eigendecomposition.

    Built by the estimators; users get one from :func:`estimate`.  Internally it is one of
    three forms, whichever the estimator produces cheapest: ``scale·M2 + shift·I`` (the
    shrink-to-``μI`` estimators; eigenvectors are those of S), an explicit spectrum
    ``V·diag(λ)·Vᵀ`` (nonlinear shrinkage), or low rank plus noise ``U·diag(λ−σ²)·Uᵀ + σ²I``
    (smooth PCA).

    Attributes
    ----------
    name : str
        Estimator that produced it.
    n : int
        Number of rows the moments summarise.
    mean : Tensor, shape (k,), float64
        Their mean.
    shrinkage : float or None
        Intensity ``s`` in ``(1−s)·S + s·μ·I`` (``ledoit_wolf``, ``oas``; 0 for
        ``empirical``), else None.
    params : dict
        Parameters used or tuned (e.g. ``mu``, ``tau1``, ``tau2``, ``gamma``, ``rank``).
    """

    def __init__(self, *, name: str, n: int, mean: Tensor, k: int, shrinkage: float | None,
                 params: dict[str, Any], base: Tensor | None = None, scale: float = 1.0,
                 shift: float = 0.0, values: Tensor | None = None,
                 vectors: Tensor | None = None, noise: float | None = None) -> None:
        self.name = name
        self.n = n
        self.mean = mean
        self.shrinkage = shrinkage
        self.params = params
        self._k = k
        self._base = base  # M2 of the affine form scale·M2 + shift·I (shared, never written)
        self._scale, self._shift = scale, shift
        self._values, self._vectors = values, vectors  # explicit (partial) spectrum
        self._noise = noise  # σ² of the low-rank-plus-noise form
        self._cov: Tensor | None = None
        self._eig: tuple[Tensor, Tensor] | None = None
        # Matrix powers by (p, floor): layers sharing one input (q/k/v) share one estimate,
        # so a strategy needing Σ^{±1/2} for each of them pays for the k×k products once.
        self._powers: dict[tuple[float, float], Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def _affine(cls, base: Tensor, scale: float, shift: float, **kw: Any) -> Estimate:
        return cls(base=base, scale=scale, shift=shift, k=base.shape[0], **kw)

    @classmethod
    def _spectral(cls, values: Tensor, vectors: Tensor, **kw: Any) -> Estimate:
        return cls(values=values, vectors=vectors, k=vectors.shape[0], **kw)

    @classmethod
    def _low_rank(cls, values: Tensor, vectors: Tensor, noise: float, **kw: Any) -> Estimate:
        return cls(values=values, vectors=vectors, noise=noise, k=vectors.shape[0], **kw)

    # ------------------------------------------------------------------ views
    @property
    def k(self) -> int:
        """Number of features."""
        return self._k

    @property
    def covariance(self) -> Tensor:
        """The estimate Σ, shape (k, k), float64, symmetric."""
        if self._cov is None:
            if self._base is not None:
                cov = self._scale * self._base
                cov.diagonal().add_(self._shift)
            elif self._noise is None:
                assert self._values is not None and self._vectors is not None
                cov = (self._vectors * self._values) @ self._vectors.T
            else:
                assert self._values is not None and self._vectors is not None
                u = self._vectors
                cov = (u * (self._values - self._noise)) @ u.T
                cov.diagonal().add_(self._noise)
            self._cov = 0.5 * (cov + cov.T)
        return self._cov

    def _eigh(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            if self._base is not None:
                # Shrinkage towards μI: same eigenvectors, affinely mapped eigenvalues.  The
                # decomposition of −M2 comes out in descending order of M2's eigenvalues,
                # which saves flipping (copying) the k×k eigenvectors afterwards.
                lam, vec = torch.linalg.eigh(torch.neg(self._base))
                self._eig = (lam.neg_().mul_(self._scale).add_(self._shift), vec)
            elif self._noise is None:
                assert self._values is not None and self._vectors is not None
                self._eig = (self._values, self._vectors)
            else:
                assert self._values is not None and self._vectors is not None
                u, r = self._vectors, self._vectors.shape[1]
                # Any orthonormal basis of span(U)^⊥ carries the noise eigenvalue σ².
                q, _ = torch.linalg.qr(u, mode="complete")
                vec = torch.cat([u, q[:, r:]], dim=1)
                rest = torch.full((self._k - r,), self._noise, dtype=torch.float64,
                                  device=u.device)
                self._eig = (torch.cat([self._values, rest]), vec)
        return self._eig

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of Σ in descending order, shape (k,), float64."""
        return self._eigh()[0]

    @property
    def eigenvectors(self) -> Tensor:
        """Orthonormal eigenvectors of Σ as columns, matching :attr:`eigenvalues`, (k, k)."""
        return self._eigh()[1]

    def top(self, r: int) -> tuple[Tensor, Tensor]:
        """The ``r`` leading eigenpairs.

        Parameters
        ----------
        r : int
            Number of components, ``1 ≤ r ≤ k``.

        Returns
        -------
        values : Tensor, shape (r,), descending
        vectors : Tensor, shape (k, r), orthonormal columns
        """
        if not isinstance(r, int) or not 1 <= r <= self._k:
            raise ValueError(f"top(r) needs an int r in 1..{self._k}, got {r!r}")
        if self._noise is not None and self._vectors is not None \
                and r <= self._vectors.shape[1]:
            # Low-rank form: the smooth components, even where γ tied them with the noise.
            return self._values[:r], self._vectors[:, :r]  # type: ignore[index]
        lam, vec = self._eigh()
        return lam[:r], vec[:, :r]

    def _power(self, p: float, rel_floor: float) -> tuple[Tensor, Tensor]:
        """(V, f(λ)) with ``f(λ) = max(λ, floor)^p``."""
        lam, vec = self._eigh()
        top = float(lam[0]) if lam.numel() else 0.0
        if p < 0:
            if not top > 0.0:
                raise ValueError(f"{self.name} estimate has no positive eigenvalue; "
                                 f"Σ^{p} is undefined")
            lam = lam.clamp_min(rel_floor * top)
        else:
            lam = lam.clamp_min(0.0)
        return vec, lam.pow(p)

    def power(self, p: float, rel_floor: float = INV_SQRT_FLOOR) -> Tensor:
        """Symmetric matrix power ``Σ^p``, (k, k), computed once per ``(p, rel_floor)``.

        The returned tensor is cached and shared: do not modify it in place.

        For ``p > 0`` negative rounding noise in the eigenvalues is clamped to 0; for
        ``p < 0`` eigenvalues below ``rel_floor · λ_max`` are raised to that floor first (see
        :meth:`inv_sqrt`).

        Raises
        ------
        ValueError
            If ``p < 0`` and Σ has no positive eigenvalue.
        """
        key = (float(p), rel_floor if p < 0 else 0.0)
        if key not in self._powers:
            vec, f = self._power(*key)
            self._powers[key] = (vec * f) @ vec.T
        return self._powers[key]

    def sqrt(self) -> Tensor:
        """Symmetric square root ``Σ^{1/2}`` (negative rounding noise clamped to 0), (k, k)."""
        return self.power(0.5)

    def inv_sqrt(self, rel_floor: float = INV_SQRT_FLOOR) -> Tensor:
        """Symmetric inverse square root ``Σ^{-1/2}``, (k, k).

        Eigenvalues below ``rel_floor · λ_max`` are raised to that floor first, so the
        result is finite even for a rank-deficient empirical covariance (n < k, or
        collinear features).  The floor is a numerical guard, not a regulariser: on such
        data use ``ledoit_wolf``, ``oas`` or ``nonlinear``, whose estimates are well
        conditioned, instead of relying on it.

        Parameters
        ----------
        rel_floor : float, default=1e-10
            Relative eigenvalue floor.

        Raises
        ------
        ValueError
            If Σ has no positive eigenvalue.
        """
        return self.power(-0.5, rel_floor)

    def matmul_sqrt(self, m: Tensor) -> Tensor:
        """``M @ Σ^{1/2}`` without forming ``Σ^{1/2}``.

        Parameters
        ----------
        m : Tensor, shape (..., k)

        Returns
        -------
        Tensor, shape (..., k), float64
        """
        vec, f = self._power(0.5, 0.0)
        return ((self._check_m(m) @ vec) * f) @ vec.T

    def matmul_inv_sqrt(self, m: Tensor, rel_floor: float = INV_SQRT_FLOOR) -> Tensor:
        """``M @ Σ^{-1/2}`` with the eigenvalue floor of :meth:`inv_sqrt`.

        Parameters
        ----------
        m : Tensor, shape (..., k)
        rel_floor : float, default=1e-10

        Returns
        -------
        Tensor, shape (..., k), float64
        """
        vec, f = self._power(-0.5, rel_floor)
        return ((self._check_m(m) @ vec) * f) @ vec.T

    def _check_m(self, m: Tensor) -> Tensor:
        if not isinstance(m, Tensor):
            raise TypeError(f"expected a Tensor, got {type(m).__name__}")
        if m.ndim < 1 or m.shape[-1] != self._k:
            raise ValueError(f"expected a matrix with last dimension {self._k}, got shape "
                             f"{tuple(m.shape)}")
        return m.to(torch.float64)

    def __repr__(self) -> str:
        s = "None" if self.shrinkage is None else f"{self.shrinkage:.4g}"
        return f"Estimate(name={self.name!r}, k={self._k}, n={self.n}, shrinkage={s})"


# ---------------------------------------------------------------------- registry
EstimatorFn = Callable[..., Estimate]
_REGISTRY: Registry[EstimatorFn] = Registry("estimator")


def estimators() -> dict[str, str]:
    """Registered estimators: ``{name: one-line description}``."""
    return _REGISTRY.describe()


def estimate(moments: Moments, name: str = "ledoit_wolf", *,
             folds: Sequence[Moments] | None = None, **options: Any) -> Estimate:
    """Estimate a covariance from streamed moments.

    Parameters
    ----------
    moments : Moments
        Summary of all rows (k features).
    name : str, default="ledoit_wolf"
        One of :func:`estimators`: ``empirical``, ``ledoit_wolf``, ``oas``, ``nonlinear``,
        ``spatpca``.
    folds : sequence of Moments, optional
        Per-fold summaries whose merge is ``moments`` (kept by calibration with
        ``folds=M``); only ``spatpca`` uses them, for cross-validation.
    **options
        Estimator options (``nonlinear``: ``ddof``; ``spatpca``: see
        :func:`covinit.smoothpca.spatpca`).

    Returns
    -------
    Estimate

    Raises
    ------
    TypeError
        If ``moments`` is not a :class:`Moments` or an option is unknown.
    ValueError
        For an unknown estimator name or an empty summary.
    """
    if not isinstance(moments, Moments):
        raise TypeError(f"estimate() needs covinit.stats.Moments, got {type(moments).__name__}")
    entry = _REGISTRY.get(name)
    if moments.n < 1:
        raise ValueError(f"estimator {name!r} needs at least one row, the summary is empty "
                         f"(k={moments.k})")
    if folds is not None:
        folds = list(folds)
        for i, f in enumerate(folds):
            if not isinstance(f, Moments) or f.k != moments.k:
                raise ValueError(f"fold {i} must be Moments of width {moments.k}")
    return entry.fn(moments, folds, **options)


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"estimator {name!r} takes no options, got {sorted(options)}")


def _common(m: Moments, name: str) -> dict[str, Any]:
    return {"name": name, "n": m.n, "mean": m.mean}


# ---------------------------------------------------------------------- shrink to μI
@_REGISTRY.register("empirical", "maximum-likelihood covariance M2/n (no shrinkage)")
def _empirical(m: Moments, folds: list[Moments] | None, **options: Any) -> Estimate:
    _no_options("empirical", options)
    return Estimate._affine(m.m2, 1.0 / m.n, 0.0, shrinkage=0.0, params={},
                            **_common(m, "empirical"))


def _trace_and_fro2(m: Moments) -> tuple[float, float]:
    """``tr(S)`` and ``‖S‖²_F`` of ``S = M2/n`` without forming S (one read of M2 each)."""
    n = m.n
    return float(torch.trace(m.m2)) / n, (float(torch.linalg.vector_norm(m.m2)) / n) ** 2


def ledoit_wolf_shrinkage(m: Moments) -> tuple[float, float]:
    """Ledoit-Wolf intensity from streamed moments, scikit-learn's form.

    Returns
    -------
    shrinkage : float in [0, 1]
    mu : float
        ``tr(S)/k``.
    """
    n, k = m.n, m.k
    trace, fro2 = _trace_and_fro2(m)
    mu = trace / k
    if k == 1:  # one feature: every shrinkage gives the same estimate; sklearn reports 0
        return 0.0, mu
    beta = (float(m.q) / n - fro2) / (n * k)
    # ‖S − μI‖²_F = ‖S‖²_F − 2μ·tr S + kμ² = ‖S‖²_F − kμ²
    delta = (fro2 - k * mu * mu) / k
    beta = min(beta, delta)
    if beta <= 0.0 or delta <= 0.0:
        return 0.0, mu
    return beta / delta, mu


def oas_shrinkage(m: Moments) -> tuple[float, float]:
    """Oracle-approximating shrinkage intensity, scikit-learn ≥ 1.3's form.

    scikit-learn (``sklearn/covariance/_shrunk_covariance.py``, function ``_oas``, 1.9.1
    installed here) drops the ``2/p`` factor of Chen et al.'s Eq. 23 and uses
    ``α = mean(S²)``, ``num = α + μ²``, ``den = (n+1)(α − μ²/k)``, ``s = min(num/den, 1)``
    (1 when ``den = 0``); for one feature it returns 0.

    Returns
    -------
    shrinkage : float in [0, 1]
    mu : float
    """
    n, k = m.n, m.k
    trace, fro2 = _trace_and_fro2(m)
    mu = trace / k
    if k == 1:
        return 0.0, mu
    alpha = fro2 / (k * k)
    num = alpha + mu * mu
    den = (n + 1) * (alpha - mu * mu / k)
    return (1.0 if den == 0 else min(num / den, 1.0)), mu


def _shrunk(m: Moments, name: str, fn: Callable[[Moments], tuple[float, float]]) -> Estimate:
    shrinkage, mu = fn(m)
    return Estimate._affine(m.m2, (1.0 - shrinkage) / m.n, shrinkage * mu,
                            shrinkage=shrinkage, params={"mu": mu}, **_common(m, name))


@_REGISTRY.register("ledoit_wolf", "Ledoit-Wolf (2004) linear shrinkage towards μI "
                    "(= sklearn LedoitWolf)")
def _ledoit_wolf(m: Moments, folds: list[Moments] | None, **options: Any) -> Estimate:
    _no_options("ledoit_wolf", options)
    return _shrunk(m, "ledoit_wolf", ledoit_wolf_shrinkage)


@_REGISTRY.register("oas", "oracle-approximating linear shrinkage towards μI (= sklearn OAS)")
def _oas(m: Moments, folds: list[Moments] | None, **options: Any) -> Estimate:
    _no_options("oas", options)
    return _shrunk(m, "oas", oas_shrinkage)


# ---------------------------------------------------------------------- nonlinear
_SQRT5 = math.sqrt(5.0)


def _hilbert_kernel(x: Tensor) -> Tensor:
    """``π·h``-scaled Hilbert transform of the Epanechnikov kernel ``3/(4√5)·(1 − x²/5)⁺``.

    The paper's closed form ``−3x/(10π) + 3/(4√5π)·(1 − x²/5)·log|(√5 − x)/(√5 + x)|`` adds
    two terms of size O(|x|) whose sum is O(1/|x|): evaluated as written it loses about
    ``ε·x²`` relative precision, which reaches 1e-6 for eigenvalue ratios of 1e4.  For
    ``|x| ≥ 10`` the cancellation is done analytically: with ``u = √5/x`` (artanh series),
    the value is ``−3/(√5π)·Σ_{m≥0} u^{2m+1}/((2m+1)(2m+3))``.
    """
    big = x.abs() >= 10.0
    xs = torch.where(big, 1.0, x)  # closed form only where it is accurate
    near = (xs.abs() - _SQRT5).abs() == 0.0
    xs = torch.where(near, 0.0, xs)  # dodge log(0); fixed below
    log_term = torch.log(((_SQRT5 - xs) / (_SQRT5 + xs)).abs())
    closed = (-3.0 / 10.0 / math.pi) * xs \
        + (3.0 / 4.0 / _SQRT5 / math.pi) * (1.0 - xs * xs / 5.0) * log_term
    # At |x| = √5 the log term's factor (1 − x²/5) vanishes: the limit is −3x/(10π).
    closed = torch.where(near, (-3.0 / 10.0 / math.pi) * x, closed)
    u = _SQRT5 / torch.where(big, x, 10.0)
    u2 = u * u
    series = torch.zeros_like(x)
    power = u
    for m in range(14):  # |u| ≤ 0.224: the 14th term is below 1e-17 of the first
        series = series + power / ((2 * m + 1) * (2 * m + 3))
        power = power * u2
    return torch.where(big, (-3.0 / _SQRT5 / math.pi) * series, closed)


def analytical_shrinkage(lam: Tensor, n: int, block: int = 1024) -> Tensor:
    """Ledoit & Wolf (2020) analytical nonlinear shrinkage of sample eigenvalues.

    Ledoit, O. and Wolf, M. (2020). Analytical nonlinear shrinkage of large-dimensional
    covariance matrices. *Annals of Statistics* 48(5), 3043-3065, Eqs. (4.3)-(4.9) and
    Appendix C (the null eigenvalues when p > n).

    With the ``r`` positive sample eigenvalues ``λ_j``, bandwidth ``h = n^{-1/3}``,
    ``h_j = h·λ_j`` and ``x_ij = (λ_i − λ_j)/h_j``: the density estimate
    ``f̃_i = mean_j 3/(4√5)·(1 − x_ij²/5)⁺ / h_j``, its Hilbert transform
    ``H̃_i = mean_j [−3x/(10π) + 3/(4√5π)(1 − x²/5)·log|(√5 − x)/(√5 + x)|]_{x_ij} / h_j``, and
    with ``c = p/n``:

    * full rank (``r = p ≤ n``): ``d_i = λ_i / ((πcλ_i f̃_i)² + (1 − c − πcλ_i H̃_i)²)``;
    * otherwise: ``d_i = λ_i / (π²λ_i²(f̃_i² + H̃_i²))`` for the positive eigenvalues and, for
      the ``p − r`` null ones, ``d_0 = 1/(π·(p−r)/r·H̃_0)`` with
      ``H̃_0 = (1/π)(3/(10h²) + 3/(4√5h)(1 − 1/(5h²))·log((1+√5h)/(1−√5h)))·mean(1/λ)``.

    The paper's null branch has ``r = n``.  Here ``r`` is the numerical rank of S, which is
    ``n`` when p > n and the rows are in general position; a smaller rank (collinear
    features, repeated rows) is treated the same way, with ``r`` degrees of freedom, instead
    of dividing by zero eigenvalues.

    Parameters
    ----------
    lam : Tensor, shape (p,), float64
        Sample eigenvalues of ``S = XcᵀXc/n`` in ascending order.
    n : int
        Effective sample size (rows minus one when the data were demeaned), ≥ 12: the
        null-branch term needs ``√5·h < 1``.
    block : int, default=1024
        Rows of the r×r kernel matrices formed at a time (bounds memory).

    Returns
    -------
    Tensor, shape (p,), float64
        Shrunk eigenvalues, in the order of ``lam``.
    """
    p = lam.numel()
    if n < 12:
        raise ValueError(f"nonlinear shrinkage needs an effective sample size n ≥ 12 (kernel "
                         f"bandwidth n^(-1/3) < 1/√5), got n={n}")
    top = float(lam[-1]) if p else 0.0
    if not top > 0.0:
        return torch.zeros_like(lam)
    tol = max(p, n) * torch.finfo(torch.float64).eps * top
    r = min(int((lam > tol).sum()), n)
    pos = lam[p - r:]  # (r,) the non-null eigenvalues
    h = n ** (-1.0 / 3.0)
    hj = h * pos  # (r,) per-eigenvalue bandwidths
    f = torch.empty_like(pos)
    hf = torch.empty_like(pos)
    for i0 in range(0, r, block):
        x = (pos[i0:i0 + block, None] - pos[None, :]) / hj[None, :]  # (b, r)
        f[i0:i0 + block] = (3.0 / 4.0 / _SQRT5) * ((1.0 - x * x / 5.0).clamp_min(0.0)
                                                    / hj).mean(dim=1)
        hf[i0:i0 + block] = (_hilbert_kernel(x) / hj).mean(dim=1)
    if r == p:
        c = p / n
        d = pos / ((math.pi * c * pos * f) ** 2 + (1.0 - c - math.pi * c * pos * hf) ** 2)
        return d
    d1 = pos / (math.pi**2 * pos * pos * (f * f + hf * hf))
    # H̃_0 = Hilbert transform at 0, i.e. the kernel at x = −1/h; equals the paper's
    # (1/π)(3/(10h²) + 3/(4√5h)(1 − 1/(5h²))·log((1+√5h)/(1−√5h)))·mean(1/λ).
    x0 = torch.tensor(-1.0 / h, dtype=lam.dtype)
    hf0 = float(_hilbert_kernel(x0)) / h * float((1.0 / pos).mean())
    d0 = 1.0 / (math.pi * (p - r) / r * hf0)
    return torch.cat([torch.full((p - r,), d0, dtype=lam.dtype, device=lam.device), d1])


@_REGISTRY.register("nonlinear", "Ledoit-Wolf (2020) analytical nonlinear shrinkage of the "
                    "eigenvalues (handles k > n)")
def _nonlinear(m: Moments, folds: list[Moments] | None, *, ddof: int = 1,
               **options: Any) -> Estimate:
    """Nonlinear shrinkage; ``ddof`` (default 1, the paper's convention) is the number of
    degrees of freedom spent on the mean: the effective sample size is ``n − ddof`` and
    ``S = M2/(n − ddof)`` (so the scale differs from ``empirical`` by ``n/(n−1)``)."""
    _no_options("nonlinear", options)
    if ddof not in (0, 1):
        raise ValueError(f"nonlinear: ddof must be 0 or 1, got {ddof!r}")
    n_eff = m.n - ddof
    s = m.m2 / n_eff
    lam, vec = torch.linalg.eigh(0.5 * (s + s.T))
    d = analytical_shrinkage(lam, n_eff)
    # The shrinkage function need not be monotone: sort to keep "descending" true.
    order = torch.argsort(d, descending=True, stable=True)
    return Estimate._spectral(d[order], vec[:, order], shrinkage=None,
                              params={"n_effective": n_eff, "ddof": ddof},
                              **_common(m, "nonlinear"))


# ---------------------------------------------------------------------- smooth PCA
@_REGISTRY.register("spatpca", "SpatPCA-style smooth (τ1) and sparse (τ2) PCA, CV-tuned, "
                    "low rank + noise", needs_folds=True)
def _spatpca(m: Moments, folds: list[Moments] | None, **options: Any) -> Estimate:
    from covinit.smoothpca import spatpca  # late: smoothpca is the heavier module

    fit = spatpca(m, folds, **options)
    return Estimate._low_rank(fit.eigenvalues, fit.components, fit.noise, shrinkage=None,
                              params=fit.params, **_common(m, "spatpca"))
