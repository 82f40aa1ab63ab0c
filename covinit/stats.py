"""Exact, mergeable streaming moments of activations (README: "How it works", "Calibration").

A :class:`Moments` summarises the rows ``x`` (each of width ``k``) seen so far by

* ``n``    — the number of rows,
* ``mean`` — their mean ``m`` (k,),
* ``m2``   — the centred co-moment ``Σ (x−m)(x−m)ᵀ`` (k, k),
* ``t``    — the third-order term ``Σ ‖x−m‖² (x−m)`` (k,),
* ``q``    — the fourth-order term ``Σ ‖x−m‖⁴`` (scalar).

``t`` and ``q`` are what Ledoit-Wolf's shrinkage intensity needs; ``t`` is only there so
that ``q`` can be merged.  Everything is kept in float64 and merged with the pairwise
update of Chan, Golub & LeVeque (1979), extended to the higher terms by re-centring each
summary on the merged mean first.  Raw-moment formulas (``Σ xxᵀ − n·mmᵀ``) are never used:
they cancel catastrophically when the mean is large compared with the spread.

Memory is O(k²) whatever the number of rows.

Plain sums, such as the gradient–input cross-moment ``G = Σ δ·xᵀ`` of the "gradient" side,
merge by addition; :func:`sum_in_order` adds them in a fixed order so that every rank and
every rerun gets the same bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Moments", "merge_all", "require_float64", "sum_in_order", "unpack_state"]


def unpack_state(state: dict[str, Tensor], keys: tuple[str, ...], kind: str
                 ) -> tuple[Tensor, ...]:
    """``state[key]`` for each key, or a ``ValueError`` naming the first missing one."""
    try:
        return tuple(state[key] for key in keys)
    except KeyError as err:
        raise ValueError(f"{kind} state is missing {err.args[0]!r}") from None


def require_float64(kind: str, fields: dict[str, Tensor]) -> None:
    """Raise a ``ValueError`` naming the first of ``fields`` that is not float64."""
    for key, value in fields.items():
        if value.dtype != torch.float64:
            raise ValueError(f"{kind} field {key!r} has dtype {value.dtype}, expected float64")


@dataclass(frozen=True)
class Moments:
    """Centred moments of a set of rows, up to fourth order (see module docstring).

    Instances are immutable; :meth:`merge` returns a new summary.

    Attributes
    ----------
    n : int
        Number of rows summarised.
    mean : Tensor, shape (k,), float64
    m2 : Tensor, shape (k, k), float64
    t : Tensor, shape (k,), float64
    q : Tensor, shape (), float64
    """

    n: int
    mean: Tensor
    m2: Tensor
    t: Tensor
    q: Tensor

    #: Keys of :meth:`state`.
    FIELDS = ("n", "mean", "m2", "t", "q")

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, k: int, device: torch.device | str | None = None) -> Moments:
        """Summary of zero rows of width ``k``."""
        z = torch.zeros(k, dtype=torch.float64, device=device)
        return cls(0, z, torch.zeros(k, k, dtype=torch.float64, device=device), z.clone(),
                   torch.zeros((), dtype=torch.float64, device=device))

    @classmethod
    def from_batch(cls, x: Tensor, gemm_dtype: torch.dtype = torch.float64) -> Moments:
        """Summarise the rows of ``x``.

        Parameters
        ----------
        x : Tensor, shape (n, k)
            Rows, any floating or integer dtype, any device.
        gemm_dtype : torch.dtype, default=torch.float64
            Dtype of the one ``XcᵀXc`` product (the dominant cost).  The batch is centred
            in float64 first, so float32 here loses only the product's own rounding
            (relative ~1e-7), never the mean; the result is accumulated in float64.

        Returns
        -------
        Moments
        """
        if x.ndim != 2:
            raise ValueError(f"expected rows of shape (n, k), got {tuple(x.shape)}")
        n, k = x.shape
        if n == 0:
            return cls.empty(k, x.device)
        x64 = x.to(torch.float64)
        mean = x64.mean(dim=0)
        xc = x64 - mean  # (n, k)
        if gemm_dtype == torch.float64:
            m2 = xc.T @ xc
        else:
            xg = xc.to(gemm_dtype)
            m2 = (xg.T @ xg).to(torch.float64)
        sq = (xc * xc).sum(dim=1)  # (n,) ‖x−m‖²
        t = xc.T @ sq  # (k,)
        q = (sq * sq).sum()
        return cls(n, mean, m2, t, q)

    @classmethod
    def from_shifted_sums(cls, n: int, shift: Tensor, s1: Tensor, s2: Tensor, s3: Tensor,
                          s4: Tensor, overwrite: bool = False) -> Moments:
        """Summary from power sums about an arbitrary fixed centre ``c``.

        With ``y = x − c`` over the rows, the inputs are ``s1 = Σ y`` (k,), ``s2 = Σ y yᵀ``
        (k, k), ``s3 = Σ ‖y‖² y`` (k,) and ``s4 = Σ ‖y‖⁴`` (scalar), all float64.  With
        ``δ = s1 / n`` (the mean's offset from ``c``)::

            M2 = s2 − n·δδᵀ
            T  = s3 − tr(s2)·δ − 2·s2·δ + 2n‖δ‖²·δ
            Q  = s4 − 4·δᵀs3 + 4·δᵀs2·δ + 2‖δ‖²·tr(s2) − 3n‖δ‖⁴

        This is how streams accumulate cheaply (one in-place GEMM per batch about a centre
        close to the mean); it is exact as long as ``‖δ‖`` stays small compared with the
        spread, which :mod:`covinit.collect` guarantees by re-centring when it would not.

        ``overwrite=True`` lets ``M2`` take ``s2``'s storage (the caller gives ``s2`` up): no
        new k×k matrix, which matters where fresh memory is slow to touch (a 1536-wide
        co-moment is 19 MB).
        """
        if n == 0:
            return cls.empty(shift.shape[0], shift.device)
        d = s1 / n
        dd = d @ d
        tr = torch.trace(s2)
        s2d = s2 @ d
        t = s3 - tr * d - 2.0 * s2d + (2.0 * n) * dd * d
        q = s4 - 4.0 * (d @ s3) + 4.0 * (d @ s2d) + 2.0 * dd * tr - (3.0 * n) * dd * dd
        m2 = s2 if overwrite else s2.clone()
        _add_scaled_outer(m2, d, -float(n))
        return cls(n, shift + d, m2, t, q)

    # ------------------------------------------------------------------ algebra
    @property
    def k(self) -> int:
        """Row width."""
        return self.mean.shape[0]

    def recentered(self, new_mean: Tensor) -> Moments:
        """The same rows summarised about ``new_mean`` instead of their own mean.

        The result is *not* a valid summary on its own (its ``mean`` field holds the new
        centre, about which ``Σ(x−c)`` is not zero); it exists to add two summaries that
        share a centre.  Uses, with ``d = new_mean − mean``::

            M2' = M2 + n·ddᵀ
            T'  = T − tr(M2)·d − 2·M2·d − n‖d‖²·d
            Q'  = Q − 4·dᵀT + 4·dᵀM2·d + 2‖d‖²·tr(M2) + n‖d‖⁴
        """
        d = new_mean - self.mean
        t, q = self._higher_about(d)
        m2 = self.m2.clone()
        _add_scaled_outer(m2, d, float(self.n))
        return Moments(self.n, new_mean, m2, t, q)

    def _higher_about(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """``(T', Q')`` of :meth:`recentered` for the offset ``d`` (k,): vectors and
        matrix-vector products only, no k×k temporary."""
        n = self.n
        tr = torch.trace(self.m2)
        m2d = self.m2 @ d
        dd = d @ d
        t = self.t - tr * d - 2.0 * m2d - n * dd * d
        q = self.q - 4.0 * (d @ self.t) + 4.0 * (d @ m2d) + 2.0 * dd * tr + n * dd * dd
        return t, q

    def merge(self, other: Moments) -> Moments:
        """Summary of the union of both row sets (exact up to float64 rounding).

        The co-moment is Chan et al.'s ``M2a + M2b + (na·nb/n)·ΔΔᵀ`` (Δ the difference of
        the means), written into one new k×k matrix: re-centring each side's ``M2`` first
        would make five k×k temporaries, and fresh memory is slow to touch (a 1536-wide
        co-moment is 19 MB).  ``T`` and ``Q`` are re-centred on the merged mean.
        """
        if self.k != other.k:
            raise ValueError(f"cannot merge moments of width {self.k} and {other.k}")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        ta, qa = self._higher_about(mean - self.mean)
        tb, qb = other._higher_about(mean - other.mean)
        m2 = torch.add(self.m2, other.m2)
        _add_scaled_outer(m2, delta, self.n * other.n / n)
        return Moments(n, mean, m2, ta + tb, qa + qb)

    def __add__(self, other: Moments) -> Moments:
        return self.merge(other)

    # ------------------------------------------------------------------ views
    def covariance(self) -> Tensor:
        """Empirical covariance ``M2 / n`` (divide by n, as scikit-learn does), (k, k)."""
        if self.n == 0:
            raise ValueError("covariance of an empty summary")
        return self.m2 / self.n

    def second_moment(self) -> Tensor:
        """Uncentred second moment ``E[xxᵀ] = M2/n + m·mᵀ`` (k, k): what a layer's output
        ``W·x`` depends on (CorDA, SVD-LLM, the matched scale, K-FAC's input factor)."""
        if self.n == 0:
            raise ValueError("the second moment of an empty summary is undefined")
        return self.m2 / self.n + torch.outer(self.mean, self.mean)

    def to(self, device: torch.device | str) -> Moments:
        """The same summary on another device (``self`` if it is already there)."""
        if self.mean.device == torch.device(device):
            return self
        return Moments(self.n, self.mean.to(device), self.m2.to(device), self.t.to(device),
                       self.q.to(device))

    def state(self) -> dict[str, Tensor]:
        """Plain tensors for saving (``n`` as an int64 scalar tensor)."""
        return {"n": torch.tensor(self.n, dtype=torch.int64), "mean": self.mean, "m2": self.m2,
                "t": self.t, "q": self.q}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> Moments:
        """Inverse of :meth:`state`; validates shapes and dtypes."""
        n, mean, m2, t, q = unpack_state(state, cls.FIELDS, "moments")
        k = mean.shape[0] if mean.ndim == 1 else -1
        shapes = {"n": (n.shape, ()), "mean": (mean.shape, (k,)), "m2": (m2.shape, (k, k)),
                  "t": (t.shape, (k,)), "q": (q.shape, ())}
        for key, (got, want) in shapes.items():
            if k < 0 or tuple(got) != want:
                raise ValueError(f"moments field {key!r} has shape {tuple(got)}, expected {want}")
        require_float64("moments", {"mean": mean, "m2": m2, "t": t, "q": q})
        if n.dtype != torch.int64 or int(n) < 0:
            raise ValueError(f"moments count must be a non-negative int64, got {n}")
        return cls(int(n), mean, m2, t, q)


def _add_scaled_outer(m: Tensor, v: Tensor, c: float) -> None:
    """``m += c·vvᵀ`` in place, entry by entry as ``c·(vᵢ·vⱼ)`` so that a symmetric ``m``
    stays exactly symmetric; column block by column block, so that no k×k temporary is made
    (m (k, k), v (k,))."""
    k = m.shape[1]
    width = max(1, min(256, k))
    block = torch.empty(m.shape[0], width, dtype=m.dtype, device=m.device)
    for j in range(0, k, width):
        part = block[:, : min(width, k - j)]
        torch.outer(v, v[j:j + width], out=part).mul_(c)
        m[:, j:j + width].add_(part)


def merge_all(parts: Iterable[Moments]) -> Moments:
    """Merge many summaries pairwise as a balanced tree (rounding error grows as log n).

    Raises
    ------
    ValueError
        If ``parts`` is empty.
    """
    items = list(parts)
    if not items:
        raise ValueError("merge_all needs at least one summary")
    while len(items) > 1:
        paired = [items[i].merge(items[i + 1]) for i in range(0, len(items) - 1, 2)]
        if len(items) % 2:
            paired.append(items[-1])
        items = paired
    return items[0]


def sum_in_order(parts: Sequence[Tensor]) -> Tensor:
    """``parts[0] + parts[1] + …``, left to right, as a new tensor on ``parts[0]``'s device.

    A fixed order makes the rounding reproducible: the distributed merge sums ranks in rank
    order, so every rank holds the same bits.

    Parameters
    ----------
    parts : sequence of Tensor
        Summands of one shape, e.g. per-fold cross-moments ``G`` (d, k) float64.

    Raises
    ------
    ValueError
        If ``parts`` is empty or the shapes differ.
    """
    if not parts:
        raise ValueError("sum_in_order needs at least one tensor")
    total = parts[0].clone()
    for part in parts[1:]:
        if part.shape != total.shape:
            raise ValueError(f"cannot add a tensor of shape {tuple(part.shape)} to one of "
                             f"shape {tuple(total.shape)}")
        total += part.to(total.device)
    return total
