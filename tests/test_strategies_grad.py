"""Strategies on gradient statistics: grad-svd, grad-whiten, kfac, lora-ga.

Step-0 contract on covinit's, PEFT's and loralib-style layers; each formula against a naive
transcription; a planted linear-teacher task whose right update is known; clear errors.
Gradient statistics come from the independent collector in ``tests/_gradfake.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from _gradfake import GradCalibration, adam_step_energy
from conftest import TinyNet
from torch import Tensor, nn

from covinit import add_lora, find_adapters, initialize
from covinit.covariance import estimate
from covinit.inits import InitContext, get_strategy
from covinit.stats import Moments

GRAD_STRATEGIES = ("grad-svd", "grad-whiten", "kfac", "lora-ga")
TARGETS = ["query", "dense", "head"]


def _angles_deg(u: Tensor, v: Tensor) -> Tensor:
    qu, _ = torch.linalg.qr(u.double())
    qv, _ = torch.linalg.qr(v.double())
    return torch.rad2deg(torch.arccos(torch.linalg.svdvals(qu.T @ qv).clamp(-1.0, 1.0)))


def _tiny_data(seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g) * torch.logspace(0, -1.5, 12)[:, None]
    return [(torch.randn(64, 12, generator=g) @ mix + 0.5, torch.randint(0, 5, (64,), generator=g))
            for _ in range(3)]


def _ce(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def tiny_cal() -> GradCalibration:
    torch.manual_seed(0)
    return GradCalibration.collect(TinyNet().eval(), _tiny_data(), _ce)


def test_registered_with_tags():
    for name in GRAD_STRATEGIES:
        tags = get_strategy(name).tags
        assert "gradient" in tags["needs"] and "scale" in tags["options"]
    assert get_strategy("kfac").tags["needs"] == ("input", "gradient")
    assert get_strategy("lora-ga").tags["preserves"] == "function"
    assert get_strategy("grad-whiten").tags["preserves"] == "zero-delta"


# ---------------------------------------------------------------------- the contract
CASES = [(s, {}) for s in GRAD_STRATEGIES] + [
    (s, {"residual": True}) for s in ("grad-svd", "grad-whiten", "kfac")]


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_r", "rslora"])
@pytest.mark.parametrize("kind", ["covinit", "peft", "loralib"])
@pytest.mark.parametrize(("strategy", "options"), CASES,
                         ids=[f"{s}{'-residual' if o else ''}" for s, o in CASES])
def test_contract(strategy, options, kind, use_rslora, tiny_cal, make_tiny, adapt):
    """ΔW = 0 (B = 0), or a residual base that keeps the output to 1e-5 relative."""
    model = adapt(kind, make_tiny(), TARGETS, rank=2, alpha=5.0, use_rslora=use_rslora)
    x = _tiny_data(seed=2)[0][0]
    with torch.no_grad():
        before = model(x)
    info = initialize(model, tiny_cal, strategy=strategy, seed=3, **options)
    with torch.no_grad():
        after = model(x)
    assert float((after - before).norm() / before.norm()) < 1e-5
    residual = strategy == "lora-ga" or bool(options.get("residual"))
    for name, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert info[name]["residual"] == residual
        assert (info[name]["delta_norm"] > 0) == residual
        if not residual:
            assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0


def test_same_data_and_seed_give_identical_factors(tiny_cal, make_tiny):
    for strategy in GRAD_STRATEGIES:
        runs = []
        for _ in range(2):
            model = add_lora(make_tiny(), TARGETS, rank=2)
            initialize(model, tiny_cal, strategy=strategy, seed=1)
            runs.append([t for a in find_adapters(model).values() for t in a.get_lora()])
        assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True)), strategy


# ---------------------------------------------------------------------- formulas
def _context(x: Tensor, delta: Tensor, weight: Tensor, rank: int, estimator: str = "empirical",
             scaling: float = 2.0, **options) -> InitContext:
    def lazy(rows: Tensor):
        m = Moments.from_batch(rows)

        def get(center: bool = True):
            return estimate(m if center else m.recentered(torch.zeros_like(m.mean)), estimator)
        return get

    return InitContext(name="layer", weight=weight.double(), rank=rank, scaling=scaling,
                       generator=torch.Generator().manual_seed(0), input_estimate=lazy(x),
                       options=options, gradient=lambda: delta.T @ x,
                       gradient_estimate=lazy(delta), input_moment=lambda: x.T @ x / len(x))


def _powers(m: Tensor) -> tuple[Tensor, Tensor]:
    lam, vec = torch.linalg.eigh(m)
    return vec @ torch.diag(lam.sqrt()) @ vec.T, vec @ torch.diag(lam.rsqrt()) @ vec.T


@pytest.fixture(scope="module")
def rows() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 8) + 1
    delta = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64) + 0.3 * x[:, :6]
    return x, delta, torch.randn(6, 8, generator=g, dtype=torch.float64)


def _same_rows(a: Tensor, want: Tensor) -> None:
    """Rows equal up to a factor each (sign convention and the matched scale)."""
    cos = ((a * want).sum(dim=1) / (a.norm(dim=1) * want.norm(dim=1))).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-9, rtol=0)


def test_grad_svd_whiten_kfac_match_their_formulas(rows):
    x, delta, w = rows
    grad, m = delta.T @ x, x.T @ x / len(x)
    _, m_neg = _powers(m)
    _, d_neg = _powers(delta.T @ delta / len(delta))
    for name, left, right in (("grad-svd", torch.eye(6, dtype=torch.float64),
                               torch.eye(8, dtype=torch.float64)),
                              ("grad-whiten", torch.eye(6, dtype=torch.float64), m_neg),
                              ("kfac", d_neg, m_neg)):
        _, _, vh = torch.linalg.svd(left @ grad @ right)
        init = get_strategy(name).fn(_context(x, delta, w, 2))
        assert init.base is None and torch.count_nonzero(init.b) == 0
        _same_rows(init.a, vh[:2] @ right)
    # Whitened rows: A·M·Aᵀ = I before the scale (scale=1.0 keeps the formula's size).
    a = get_strategy("grad-whiten").fn(_context(x, delta, w, 2, scale=1.0)).a
    torch.testing.assert_close(a @ m @ a.T, torch.eye(2, dtype=torch.float64))


def test_kfac_residual_balances_and_reconstructs(rows):
    x, delta, w = rows
    _, d_neg = _powers(delta.T @ delta / len(delta))
    _, m_neg = _powers(x.T @ x / len(x))
    u, _, _ = torch.linalg.svd(d_neg @ (delta.T @ x) @ m_neg)
    init = get_strategy("kfac").fn(_context(x, delta, w, 2, residual=True))
    _same_rows(init.b.T, (d_neg @ u[:, :2]).T)
    torch.testing.assert_close(init.b.norm(dim=0), init.a.norm(dim=1))
    torch.testing.assert_close(init.base + 2.0 * init.b @ init.a, w)


def test_lora_ga_is_the_published_init(rows):
    """A = V[:, :r]ᵀ, B = U[:, r:2r], both × d^(1/4)/√16, base = W0 − c·B·A."""
    x, delta, w = rows
    u, _, vh = torch.linalg.svd(delta.T @ x)
    init = get_strategy("lora-ga").fn(_context(x, delta, w, 2, scaling=0.5))
    factor = 6 ** 0.25 / 4.0
    torch.testing.assert_close(init.a.abs(), (factor * vh[:2]).abs())
    torch.testing.assert_close(init.b.abs(), (factor * u[:, 2:4]).abs())
    torch.testing.assert_close(init.base + 0.5 * init.b @ init.a, w)
    other = get_strategy("lora-ga").fn(_context(x, delta, w, 2, scaling=0.5, gamma=4.0))
    torch.testing.assert_close(other.a, init.a * 2.0)
    with pytest.raises(ValueError, match=r"2·rank <= min\(d, k\) = 6; layer 'layer'"):
        get_strategy("lora-ga").fn(_context(x, delta, w, 4))


# ---------------------------------------------------------------------- planted teacher
def test_planted_teacher_subspace_and_first_step():
    """A linear teacher W* = W0 + U·Vᵀ (rank 3) on correlated inputs: the right rows of A
    span V.  grad-whiten and kfac recover it within a few degrees (grad-svd is tilted by
    the input covariance: G = −ΔW·M·n), and their first AdamW step lowers the loss at least
    as much as Kaiming's mean step at the same rate."""
    g = torch.Generator().manual_seed(0)
    k, d, r, n = 24, 16, 3, 2048
    rot, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    x = (torch.randn(n, k, generator=g) * torch.linspace(0.3, 2.0, k)) @ rot.T + 0.2
    v, _ = torch.linalg.qr(torch.randn(k, r, generator=g))
    student = nn.Linear(k, d, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.randn(d, k, generator=g) / math.sqrt(k))
    teacher = student.weight.detach() + torch.randn(d, r, generator=g) @ v.T
    y = x @ teacher.T + 0.01 * torch.randn(n, d, generator=g)
    batch = (x, y)

    def mse(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * (model(b[0]) - b[1]).pow(2).sum(dim=1).mean()

    plain = nn.Sequential(student)
    cal = GradCalibration.collect(plain, [batch], mse)
    lr = 1e-3

    def first_step(strategy: str, seed: int = 0, estimator: str = "ledoit_wolf",
                   ) -> tuple[float, Tensor]:
        model = add_lora(nn.Sequential(nn.Linear(k, d, bias=False)), ["0"], rank=r)
        with torch.no_grad():
            find_adapters(model)["0"].base_layer.weight.copy_(student.weight)
        initialize(model, cal, strategy=strategy, seed=seed, estimator=estimator)
        a, _ = find_adapters(model)["0"].get_lora()
        with torch.no_grad():
            start = float(mse(model, batch))
        adam_step_energy(model, batch, mse, lr=lr)
        with torch.no_grad():
            return start - float(mse(model, batch)), a

    kaiming = sum(first_step("kaiming", s)[0] for s in range(8)) / 8
    for strategy in ("grad-whiten", "kfac"):
        # Exact with the empirical M; Ledoit-Wolf shrinks M by ~2% here (n = 2048, k = 24),
        # which tilts the weakly excited directions a little.
        for estimator, limit in (("empirical", 1.0), ("ledoit_wolf", 5.0)):
            drop, a = first_step(strategy, estimator=estimator)
            assert _angles_deg(a.T, v).max() < limit, (strategy, estimator)
            assert drop >= kaiming > 0, (strategy, estimator, drop, kaiming)
    _, a = first_step("grad-svd")
    assert _angles_deg(a.T, v).max() > 20.0  # G's rows are ΔW·M: tilted by the inputs


# ---------------------------------------------------------------------- errors
def test_missing_gradient_side_is_a_clear_error(tiny_cal, make_tiny):
    no_grad = GradCalibration(tiny_cal.rows, sides=("input", "output"))
    model = add_lora(make_tiny(), TARGETS, rank=2)
    for strategy in GRAD_STRATEGIES:
        with pytest.raises(ValueError, match=r"no gradient-side statistics for layer "
                                             r"'block.query', needed by strategy"):
            initialize(model, no_grad, strategy=strategy)
    with pytest.raises(ValueError, match="unknown options"):
        initialize(model, tiny_cal, strategy="grad-svd", power=0.5)
