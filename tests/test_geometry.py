"""Roughness matrices: SpatPCA's own fixtures, PSD, null spaces, spec parsing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from covinit.geometry import chain, graph_laplacian, grid, knn_laplacian, roughness, thin_plate

F64 = torch.float64


def spatpca_fixture(d: int) -> torch.Tensor:
    """egpivo/SpatPCA tests/testthat/test-RcppExports.R: ``expand.grid`` of
    ``seq(-5, 5, length = 2)`` in d dimensions (row order does not change the norm)."""
    return torch.tensor(list(itertools.product([-5.0, 5.0], repeat=d)), dtype=F64)


def spatpca_form(coords: torch.Tensor) -> torch.Tensor:
    """SpatPCA's computation: ``Lp·E·Lp`` with ``Lp`` the block of ``(L + 1e-8·I)⁻¹``."""
    k, d = coords.shape
    r = torch.cdist(coords, coords)
    if d == 1:
        e = r**3 / 12
    elif d == 2:
        e = torch.where(r > 0, r**2 * torch.log(r.clamp_min(1e-300)), 0.0) / (8 * math.pi)
    else:
        e = -r / (8 * math.pi)
    t = torch.cat([torch.ones(k, 1, dtype=F64), coords], 1)
    big = torch.zeros(k + d + 1, k + d + 1, dtype=F64)
    big[:k, :k], big[:k, k:], big[k:, :k] = e, t, t.T
    lp = torch.linalg.inv(big + 1e-8 * torch.eye(k + d + 1, dtype=F64))[:k, :k]
    return lp.T @ e @ lp


@pytest.mark.parametrize(("d", "norm"), [(2, 0.362588), (3, 8.191034)])
def test_thin_plate_reproduces_spatpca_test_values(d, norm):
    omega = thin_plate(spatpca_fixture(d))
    assert abs(float(torch.linalg.matrix_norm(omega)) - norm) <= 1e-6


@pytest.mark.parametrize("d", [1, 2, 3])
def test_thin_plate_matches_spatpca_form_psd_and_null_space(d):
    # A jittered regular layout (well separated points keep L well conditioned, so the
    # 1e-8 jitter of SpatPCA's form is negligible).
    side = {1: 25, 2: 5, 3: 3}[d]
    g = torch.Generator().manual_seed(d)
    base = torch.tensor(list(itertools.product(range(side), repeat=d)), dtype=F64)
    coords = base + 0.3 * (torch.rand(base.shape, generator=g, dtype=F64) - 0.5)
    k = coords.shape[0]
    omega = thin_plate(coords if d > 1 else coords[:, 0])
    torch.testing.assert_close(omega, omega.T, rtol=0, atol=0)
    scale = float(omega.abs().max())
    torch.testing.assert_close(omega, spatpca_form(coords), rtol=0, atol=1e-5 * scale)
    lam = torch.linalg.eigvalsh(omega)
    assert float(lam[0]) >= -1e-9 * float(lam[-1])
    # Constant and linear trends are not rough.
    null = torch.cat([torch.ones(k, 1, dtype=F64), coords], 1)
    assert float((omega @ null).abs().max()) <= 1e-8 * scale * float(null.abs().max())
    # … and that is all the null space: rank k − (d + 1).
    assert int((lam > 1e-9 * float(lam[-1])).sum()) == k - (d + 1)


def test_thin_plate_rejects_bad_coordinates():
    with pytest.raises(ValueError, match=r"shape \(k,\) or \(k, d\)"):
        thin_plate(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 4"):
        thin_plate(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="singular"):
        thin_plate(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))


def test_chain_is_second_differences_with_linear_null_space():
    k = 12
    omega = chain(k)
    f = torch.randn(k, dtype=F64)
    d2 = f[:-2] - 2 * f[1:-1] + f[2:]
    assert float(f @ omega @ f) == pytest.approx(float(d2 @ d2), rel=1e-12)
    idx = torch.arange(k, dtype=F64)
    assert float((omega @ torch.ones(k, dtype=F64)).abs().max()) == 0.0
    assert float((omega @ idx).abs().max()) < 1e-12
    assert float(torch.linalg.eigvalsh(omega)[0]) > -1e-12
    assert torch.equal(chain(2), torch.zeros(2, 2, dtype=F64))


def test_grid_null_space_and_reduction_to_chain():
    rows, cols = 4, 6
    omega = grid(rows, cols)
    r, c = torch.meshgrid(torch.arange(rows, dtype=F64), torch.arange(cols, dtype=F64),
                          indexing="ij")
    for f in (torch.ones(rows * cols, dtype=F64), r.flatten(), c.flatten()):
        assert float((omega @ f).abs().max()) < 1e-12
    lam = torch.linalg.eigvalsh(omega)
    assert float(lam[0]) > -1e-12
    assert int((lam > 1e-9).sum()) == rows * cols - 3
    # The product r·c is the first thing the mixed term sees.
    rc = (r * c).flatten()
    assert float(rc @ omega @ rc) > 1.0
    assert torch.equal(grid(1, 7), chain(7))


def test_graph_laplacian_and_knn():
    a = torch.tensor([[0, 1, 0], [1, 0, 2], [0, 2, 0]], dtype=F64)
    lap = graph_laplacian(a)
    torch.testing.assert_close(lap, torch.tensor([[1, -1, 0], [-1, 3, -2], [0, -2, 2]],
                                                 dtype=F64))
    with pytest.raises(ValueError, match="symmetric"):
        graph_laplacian(torch.triu(a))
    with pytest.raises(ValueError, match="non-negative"):
        graph_laplacian(-a)
    # Columns 0/1 and 2/3 point the same way (up to sign): each pair is joined.
    w = torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.1, -0.2, 1.0, 3.0], [0.0, 0.0, 0.1, 0.3]])
    lap = knn_laplacian(w, n_neighbors=1)
    expected = torch.tensor([[1, -1, 0, 0], [-1, 1, 0, 0], [0, 0, 1, -1], [0, 0, -1, 1]],
                            dtype=F64)
    torch.testing.assert_close(lap, expected)
    with pytest.raises(ValueError, match=r"n_neighbors must be an int in 1\.\.3"):
        knn_laplacian(w, n_neighbors=4)


def test_roughness_specs():
    k = 12
    torch.testing.assert_close(roughness("chain", k), chain(k))
    torch.testing.assert_close(roughness(("chain",), k), chain(k))
    torch.testing.assert_close(roughness(("grid", 3, 4), k), grid(3, 4))
    coords = np.linspace(0, 1, k)
    torch.testing.assert_close(roughness(("coords", coords), k), thin_plate(coords))
    w = torch.randn(5, k)
    torch.testing.assert_close(roughness(("knn", w, 3), k), knn_laplacian(w, 3))
    eye = torch.eye(k, dtype=F64)
    torch.testing.assert_close(roughness(eye, k), eye)
    torch.testing.assert_close(roughness(("adjacency", 1 - eye), k), graph_laplacian(1 - eye))
    with pytest.raises(ValueError, match="12 features"):
        roughness(("grid", 3, 5), k)
    with pytest.raises(ValueError, match=r"shape \(12, 12\)"):
        roughness(torch.eye(5), k)
    with pytest.raises(ValueError, match="unknown geometry spec"):
        roughness(("spiral",), k)
    with pytest.raises(TypeError, match="geometry must be"):
        roughness(3, k)
