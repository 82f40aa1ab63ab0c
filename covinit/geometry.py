"""Roughness matrices Ω over a feature geometry, for smooth PCA (README: "Covariance estimators").

The smooth PCA of :mod:`covinit.smoothpca` penalises ``τ1·tr(ΦᵀΩΦ)``: ``φᵀΩφ`` measures how
rough a direction ``φ`` (one weight per feature) is over some arrangement of the features.
Transformer features have no coordinates of their own, so several arrangements are offered:

* :func:`thin_plate` — the thin-plate spline roughness over user coordinates in 1-D, 2-D or
  3-D (Green & Silverman 1994; the form used by the R package SpatPCA, Wang & Huang 2017):
  with ``η(r) = r³/12`` (1-D), ``r²·log r / (8π)`` (2-D), ``−r/(8π)`` (3-D),
  ``E_ij = η(‖s_i − s_j‖)``, ``T = [1, s]`` and ``L = [[E, T], [Tᵀ, 0]]``, Ω is the top-left
  k×k block of ``L⁻¹``.  Its null space holds the constant and the linear trends.
* :func:`chain` — squared second differences along the feature index (the discrete 1-D
  analogue, same null space).
* :func:`grid` — squared second differences on a (rows, cols) layout, with the mixed term,
  a discrete ``∫ f_xx² + 2f_xy² + f_yy²``; null space: constant and the two linear trends.
* :func:`graph_laplacian` / :func:`knn_laplacian` — ``D − A`` for a user adjacency, or for the
  symmetric k-nearest-neighbour graph of the columns of a weight matrix (features whose
  weight columns point the same way are neighbours: a data-free geometry).

:func:`roughness` turns a short spec such as ``("grid", 16, 24)`` into a matrix.

All matrices are symmetric positive semi-definite, float64, shape (k, k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["chain", "graph_laplacian", "grid", "knn_laplacian", "roughness", "thin_plate"]


def _as_tensor(x: Any, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(x, np.ndarray | list | tuple):
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    raise TypeError(f"{what} must be a Tensor or an array, got {type(x).__name__}")


def thin_plate(coords: Tensor | np.ndarray) -> Tensor:
    """Thin-plate spline roughness matrix over feature coordinates.

    Parameters
    ----------
    coords : Tensor or ndarray, shape (k,) or (k, d), d in {1, 2, 3}
        One location per feature.  Locations must be distinct and, for d ≥ 2, not all on
        one line / plane (otherwise ``L`` is singular).

    Returns
    -------
    Tensor, shape (k, k), float64
        Ω, the top-left block of ``L⁻¹`` (module docstring), symmetrised.

    Raises
    ------
    ValueError
        For a wrong shape, fewer than d + 2 locations, or a singular ``L``.

    Notes
    -----
    SpatPCA computes ``Lp·E·Lp`` with ``Lp`` the block of ``(L + 1e-8·I)⁻¹``; without the
    jitter ``A·E·A = A`` for the exact block ``A`` (from ``L·L⁻¹ = I`` and ``Tᵀ·A = 0``), so
    both agree to the jitter's size.  Here the block is obtained from one solve.
    """
    s = _as_tensor(coords, "coords")
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[1] not in (1, 2, 3):
        raise ValueError(f"coords must have shape (k,) or (k, d) with d in 1..3, got "
                         f"{tuple(s.shape)}")
    k, d = s.shape
    if k < d + 2:
        raise ValueError(f"thin-plate spline over {d}-D coordinates needs at least {d + 2} "
                         f"locations, got {k}")
    r = torch.cdist(s, s)  # (k, k)
    if d == 1:
        e = r**3 / 12.0
    elif d == 2:
        # r² log r → 0 as r → 0; log(0) would give nan on the diagonal.
        e = torch.where(r > 0, r * r * torch.log(torch.where(r > 0, r, 1.0)), 0.0)
        e = e / (8.0 * math.pi)
    else:
        e = -r / (8.0 * math.pi)
    t = torch.cat([torch.ones(k, 1, dtype=torch.float64), s], dim=1)  # (k, d+1)
    m = k + d + 1
    big = torch.zeros(m, m, dtype=torch.float64)
    big[:k, :k] = e
    big[:k, k:] = t
    big[k:, :k] = t.T
    rhs = torch.zeros(m, k, dtype=torch.float64)
    rhs[:k] = torch.eye(k, dtype=torch.float64)
    try:
        sol = torch.linalg.solve(big, rhs)  # first k columns of L⁻¹
    except RuntimeError as err:  # singular L: repeated or collinear locations
        raise ValueError(f"thin-plate system is singular for these {k} locations "
                         f"(repeated points, or all on a line/plane?): {err}") from None
    omega = sol[:k]
    return 0.5 * (omega + omega.T)


def _second_difference(k: int) -> Tensor:
    """(k−2, k) matrix of second differences ``f[i] − 2f[i+1] + f[i+2]``."""
    if k < 3:
        return torch.zeros(0, k, dtype=torch.float64)
    d = torch.zeros(k - 2, k, dtype=torch.float64)
    idx = torch.arange(k - 2)
    d[idx, idx] = 1.0
    d[idx, idx + 1] = -2.0
    d[idx, idx + 2] = 1.0
    return d


def chain(k: int) -> Tensor:
    """Second-difference roughness ``DᵀD`` along the feature index 0..k−1.

    Parameters
    ----------
    k : int
        Number of features (≥ 1; for k < 3 the matrix is zero: nothing can be rough).

    Returns
    -------
    Tensor, shape (k, k), float64
        Pentadiagonal, PSD, null space = {constant, linear trend}.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"chain geometry needs a positive int k, got {k!r}")
    d = _second_difference(k)
    return d.T @ d


def grid(rows: int, cols: int) -> Tensor:
    """Discrete thin-plate roughness on a ``rows × cols`` layout (row-major feature order).

    ``Ω = (I⊗D_c)ᵀ(I⊗D_c) + (D_r⊗I)ᵀ(D_r⊗I) + 2·(Δ_r⊗Δ_c)ᵀ(Δ_r⊗Δ_c)`` with ``D`` second
    and ``Δ`` first differences: the discrete ``∫ f_xx² + 2f_xy² + f_yy²``.

    Parameters
    ----------
    rows, cols : int
        Layout; feature ``i`` sits at ``(i // cols, i % cols)``.

    Returns
    -------
    Tensor, shape (rows·cols, rows·cols), float64
        PSD; null space = {constant, row trend, column trend}.
    """
    for name, v in (("rows", rows), ("cols", cols)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"grid geometry needs positive int {name}, got {v!r}")
    eye_r = torch.eye(rows, dtype=torch.float64)
    eye_c = torch.eye(cols, dtype=torch.float64)
    dxx = torch.kron(eye_r, _second_difference(cols))
    dyy = torch.kron(_second_difference(rows), eye_c)
    first_r = torch.diff(eye_r, dim=0)  # (rows−1, rows) first differences
    first_c = torch.diff(eye_c, dim=0)
    dxy = torch.kron(first_r, first_c)
    return dxx.T @ dxx + dyy.T @ dyy + 2.0 * (dxy.T @ dxy)


def graph_laplacian(adjacency: Tensor | np.ndarray) -> Tensor:
    """Graph Laplacian ``D − A`` of a symmetric, non-negative weighted adjacency.

    Parameters
    ----------
    adjacency : Tensor or ndarray, shape (k, k)
        Edge weights; the diagonal is ignored.

    Returns
    -------
    Tensor, shape (k, k), float64
        PSD; its null space holds the indicator of each connected component.

    Raises
    ------
    ValueError
        If the matrix is not square, not symmetric, or has negative weights.
    """
    a = _as_tensor(adjacency, "adjacency")
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be square (k, k), got {tuple(a.shape)}")
    if bool((a < 0).any()):
        raise ValueError("adjacency weights must be non-negative")
    if not torch.allclose(a, a.T, rtol=1e-12, atol=1e-12):
        raise ValueError("adjacency must be symmetric")
    a = a.clone()
    a.fill_diagonal_(0.0)
    return torch.diag(a.sum(dim=1)) - a


def knn_laplacian(weight: Tensor | np.ndarray, n_neighbors: int = 8) -> Tensor:
    """Laplacian of the k-NN graph of a weight matrix's columns (cosine similarity).

    Input feature ``j`` of a linear layer is described by column ``W[:, j]``; two features
    are joined when either is among the other's ``n_neighbors`` most similar columns
    (absolute cosine: a sign flip is the same direction).  Edges have weight 1.

    Parameters
    ----------
    weight : Tensor or ndarray, shape (d, k)
        ``nn.Linear`` orientation: ``k`` input features.
    n_neighbors : int, default=8
        Neighbours per feature, in ``1..k−1``.

    Returns
    -------
    Tensor, shape (k, k), float64
    """
    w = _as_tensor(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must have shape (d, k), got {tuple(w.shape)}")
    k = w.shape[1]
    if not isinstance(n_neighbors, int) or not 1 <= n_neighbors <= k - 1:
        raise ValueError(f"n_neighbors must be an int in 1..{k - 1}, got {n_neighbors!r}")
    cols = w / w.norm(dim=0).clamp_min(1e-300)
    sim = (cols.T @ cols).abs()  # (k, k)
    sim.fill_diagonal_(-1.0)  # never your own neighbour
    nearest = sim.topk(n_neighbors, dim=1).indices  # (k, n_neighbors)
    adj = torch.zeros(k, k, dtype=torch.float64)
    adj.scatter_(1, nearest, 1.0)
    adj = torch.maximum(adj, adj.T)
    return graph_laplacian(adj)


def roughness(spec: Any, k: int) -> Tensor:
    """Resolve a geometry spec into a roughness matrix for ``k`` features.

    Parameters
    ----------
    spec : Tensor, ndarray or tuple
        * a (k, k) matrix — used as Ω as is (must be symmetric);
        * ``("chain",)`` or ``"chain"`` — :func:`chain`;
        * ``("grid", rows, cols)`` with ``rows·cols == k`` — :func:`grid`;
        * ``("coords", array (k,) or (k, d))`` — :func:`thin_plate`;
        * ``("adjacency", array (k, k))`` — :func:`graph_laplacian`;
        * ``("knn", weight (d, k), n_neighbors)`` — :func:`knn_laplacian`.
    k : int
        Number of features the matrix must match.

    Returns
    -------
    Tensor, shape (k, k), float64
    """
    kinds = "chain, grid, coords, adjacency, knn"
    if isinstance(spec, Tensor | np.ndarray):
        omega = _as_tensor(spec, "geometry")
        if tuple(omega.shape) != (k, k):
            raise ValueError(f"roughness matrix must have shape ({k}, {k}), got "
                             f"{tuple(omega.shape)}")
        if not torch.allclose(omega, omega.T, rtol=1e-10, atol=1e-12):
            raise ValueError("roughness matrix must be symmetric")
        return omega
    if isinstance(spec, str):
        spec = (spec,)
    if not isinstance(spec, Sequence) or not spec or not isinstance(spec[0], str):
        raise TypeError(f"geometry must be a (k, k) matrix or a tuple whose first item is one "
                        f"of {kinds}; got {spec!r}")
    kind, args = spec[0], tuple(spec[1:])
    if kind == "chain" and not args:
        return chain(k)
    if kind == "grid" and len(args) == 2:
        rows, cols = args
        if rows * cols != k:
            raise ValueError(f"grid ({rows}, {cols}) has {rows * cols} cells, layer has {k} "
                             f"features")
        return grid(rows, cols)
    if kind == "coords" and len(args) == 1:
        s = _as_tensor(args[0], "coords")
        if s.shape[0] != k:
            raise ValueError(f"coords have {s.shape[0]} rows, layer has {k} features")
        return thin_plate(s)
    if kind == "adjacency" and len(args) == 1:
        omega = graph_laplacian(args[0])
        if omega.shape[0] != k:
            raise ValueError(f"adjacency is {omega.shape[0]}×{omega.shape[0]}, layer has {k} "
                             f"features")
        return omega
    if kind == "knn" and len(args) in (1, 2):
        w = _as_tensor(args[0], "weight")
        if w.ndim != 2 or w.shape[1] != k:
            raise ValueError(f"knn geometry needs a weight of shape (d, {k}), got "
                             f"{tuple(w.shape)}")
        return knn_laplacian(w, *args[1:])
    raise ValueError(f"unknown geometry spec {spec!r}; valid: ('chain',), ('grid', rows, cols), "
                     f"('coords', array), ('adjacency', matrix), ('knn', weight, n_neighbors)")
