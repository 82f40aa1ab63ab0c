"""Bounded-memory randomized sketch of a co-moment, for very wide layers (README: "Calibration").

For a layer of width ``k`` the exact co-moment costs ``k²`` float64 numbers (128 MiB at
k = 4096).  A :class:`Sketch` keeps ``Y = M2·Ω`` instead, ``k×ℓ`` with a fixed Gaussian test
matrix ``Ω`` (k×ℓ) drawn from a seed, plus the count, the mean and the exact trace of ``M2``.
``Y`` is linear in the data, so sketches of disjoint row sets merge exactly (the same
re-centring as Chan's update: ``Y = Ya + Yb + (na·nb/n)·δ(δᵀΩ)``), across batches and ranks,
in any order.

The top eigenpairs of ``M2`` are recovered with the stabilised Nyström approximation of
Tropp, Yurtsever, Udell & Cevher (2017, "Fixed-rank approximation of a positive-semidefinite
matrix from streaming data", NeurIPS): ``M2 ≈ Y (ΩᵀY)⁺ Yᵀ``.  It is exact when ``M2`` has
rank below ``ℓ``; otherwise the error grows with the mass of the spectrum's tail relative to
the weakest wanted eigenvalue (Halko, Martinsson & Tropp 2011).  Measured in
``tests/test_sketch.py`` (k = 256, top 5, unit noise floor): strong spikes give 3 % eigenvalue
error at ℓ = 64; weak spikes need ℓ = 128 for 6 % (43 % at ℓ = 32).  Prefer the exact
:class:`~covinit.stats.Moments` whenever ``k²`` float64 fits in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from covinit.stats import require_float64, unpack_state

__all__ = ["Sketch", "sketch_matrix"]


def sketch_matrix(k: int, size: int, seed: int, device: torch.device | str | None = None
                ) -> Tensor:
    """The Gaussian test matrix ``Ω`` (k, size), float64, identical for a given seed on every
    device and rank (drawn on the CPU, then moved)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, size, generator=gen, dtype=torch.float64).to(device)


@dataclass(frozen=True)
class Sketch:
    """``Y = M2·Ω`` of the rows seen so far, with their count, mean and ``tr(M2)``.

    Attributes
    ----------
    n : int
    mean : Tensor, shape (k,), float64
    y : Tensor, shape (k, size), float64
        Centred co-moment times the test matrix.
    trace : Tensor, shape (), float64
        ``tr(M2) = Σ ‖x − m‖²`` (exact; gives the total variance and the error of the top part).
    seed : int
        Seed of ``Ω`` (see :func:`sketch_matrix`).
    """

    n: int
    mean: Tensor
    y: Tensor
    trace: Tensor
    seed: int

    #: Keys of :meth:`state`.
    FIELDS = ("n", "mean", "y", "trace", "seed")

    @property
    def k(self) -> int:
        """Row width."""
        return self.mean.shape[0]

    @property
    def size(self) -> int:
        """Sketch size ℓ."""
        return self.y.shape[1]

    def omega(self) -> Tensor:
        """The test matrix ``Ω`` (k, ℓ) on this sketch's device."""
        return sketch_matrix(self.k, self.size, self.seed, self.y.device)

    @classmethod
    def empty(cls, k: int, size: int, seed: int = 0, device: torch.device | str | None = None
              ) -> Sketch:
        """Sketch of zero rows."""
        if not 0 < size <= k:
            raise ValueError(f"sketch size must be in 1..k={k}, got {size}")
        z = torch.zeros(k, dtype=torch.float64, device=device)
        return cls(0, z, torch.zeros(k, size, dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.float64, device=device), seed)

    @classmethod
    def from_batch(cls, x: Tensor, size: int, seed: int = 0,
                   omega: Tensor | None = None) -> Sketch:
        """Sketch the rows of ``x`` (n, k); ``omega`` may pass a cached :func:`sketch_matrix`."""
        if x.ndim != 2:
            raise ValueError(f"expected rows of shape (n, k), got {tuple(x.shape)}")
        n, k = x.shape
        if n == 0:
            return cls.empty(k, size, seed, x.device)
        if not 0 < size <= k:
            raise ValueError(f"sketch size must be in 1..k={k}, got {size}")
        omega = sketch_matrix(k, size, seed, x.device) if omega is None else omega
        mean = x.mean(dim=0, dtype=torch.float64)
        xc = x.to(torch.float64) - mean  # (n, k)
        y = xc.T @ (xc @ omega)  # (k, ℓ): two thin products, 2·n·k·ℓ
        return cls(n, mean, y, (xc * xc).sum(), seed)

    def merge(self, other: Sketch, omega: Tensor | None = None) -> Sketch:
        """Sketch of the union of both row sets (exact: the sketch is linear)."""
        if (self.k, self.size, self.seed) != (other.k, other.size, other.seed):
            raise ValueError(
                f"cannot merge sketches of (k, size, seed) = {(self.k, self.size, self.seed)} "
                f"and {(other.k, other.size, other.seed)}")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        omega = self.omega() if omega is None else omega
        n = self.n + other.n
        delta = other.mean - self.mean
        w = self.n * other.n / n
        mean = self.mean + delta * (other.n / n)
        y = self.y + other.y + w * torch.outer(delta, delta @ omega)
        return Sketch(n, mean, y, self.trace + other.trace + w * (delta @ delta), self.seed)

    def __add__(self, other: Sketch) -> Sketch:
        return self.merge(other)

    def top(self, r: int) -> tuple[Tensor, Tensor]:
        """Approximate top-``r`` eigenpairs of the covariance ``M2 / n``.

        Returns
        -------
        values : Tensor, shape (r,), descending
        vectors : Tensor, shape (k, r), orthonormal columns

        Raises
        ------
        ValueError
            If the sketch is empty or ``r`` is not in ``1..size``.
        """
        if self.n == 0:
            raise ValueError("eigenpairs of an empty sketch")
        if not 0 < r <= self.size:
            raise ValueError(f"r must be in 1..size={self.size}, got {r}")
        omega = self.omega()
        # Shift by a tiny multiple of ‖Y‖ so that the core ΩᵀY is positive definite in floating
        # point (Tropp et al. 2017, Alg. 3), then remove the shift from the eigenvalues.
        nu = torch.finfo(torch.float64).eps * max(float(torch.linalg.matrix_norm(self.y)),
                                                   1e-300) * self.k
        y = self.y + nu * omega
        core = omega.T @ y
        core = (core + core.T) / 2
        chol = torch.linalg.cholesky(core)  # (ℓ, ℓ) lower
        f = torch.linalg.solve_triangular(chol, y.T, upper=False).T  # Y·C⁻ᵀ, (k, ℓ)
        u, s, _ = torch.linalg.svd(f, full_matrices=False)
        values = (s[:r] ** 2 - nu).clamp_min(0) / self.n
        return values, u[:, :r]

    def to(self, device: torch.device | str) -> Sketch:
        """The same sketch on another device."""
        return Sketch(self.n, self.mean.to(device), self.y.to(device), self.trace.to(device),
                      self.seed)

    def state(self) -> dict[str, Tensor]:
        """Plain tensors for saving (``n`` and ``seed`` as int64 scalars)."""
        return {"n": torch.tensor(self.n, dtype=torch.int64), "mean": self.mean, "y": self.y,
                "trace": self.trace, "seed": torch.tensor(self.seed, dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> Sketch:
        """Inverse of :meth:`state`; validates shapes and dtypes."""
        n, mean, y, trace, seed = unpack_state(state, cls.FIELDS, "sketch")
        if mean.ndim != 1 or y.ndim != 2 or y.shape[0] != mean.shape[0] or trace.shape != ():
            raise ValueError(f"sketch fields have inconsistent shapes: mean {tuple(mean.shape)}"
                             f", y {tuple(y.shape)}, trace {tuple(trace.shape)}")
        require_float64("sketch", {"mean": mean, "y": y, "trace": trace})
        return cls(int(n), mean, y, trace, int(seed))
