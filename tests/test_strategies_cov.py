"""Covariance-informed strategies: contracts, planted subspaces, whitening, fallbacks.

The contract test runs every registered strategy on covinit's and PEFT's layers, with
LoRA's α/r and rsLoRA's α/√r.  The other tests check what each strategy claims against a
naive transcription of its formula on data with known structure.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet
from torch import Tensor, nn

from covinit import add_lora, calibrate, find_adapters, initialize, strategies
from covinit.covariance import estimate
from covinit.inits import InitContext, get_strategy
from covinit.stats import Moments

COV_STRATEGIES = ("input-pca", "input-whiten", "output-pca", "cov-svd", "cov-minor",
                  "two-sided")
TARGETS = ["query", "dense", "head"]
TARGETS_FULL = ["block.query", "block.dense", "head"]


def _data(seed: int = 1, batches: int = 4, rows: int = 64) -> list[Tensor]:
    """Anisotropic inputs with a non-zero mean (so centred and uncentred moments differ)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g) * torch.logspace(0, -1.5, 12)[:, None]
    return [torch.randn(rows, 12, generator=g) @ mix + 0.5 for _ in range(batches)]


def _angles_deg(u: Tensor, v: Tensor) -> Tensor:
    """Principal angles (degrees) between the column spans of u and v."""
    qu, _ = torch.linalg.qr(u.double())
    qv, _ = torch.linalg.qr(v.double())
    s = torch.linalg.svdvals(qu.T @ qv).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(s))


def _context(x: Tensor, weight: Tensor, rank: int, scaling: float = 2.0,
             estimator: str = "empirical", y: Tensor | None = None,
             **options) -> InitContext:
    """A hand-built context over raw rows x (n, k) (and outputs y (n, d))."""
    def lazy(rows: Tensor | None):
        if rows is None:
            return None
        m = Moments.from_batch(rows)

        def get(center: bool = True):
            used = m if center else m.recentered(torch.zeros_like(m.mean))
            return estimate(used, estimator)
        return get

    return InitContext(name="layer", weight=weight.double(), rank=rank, scaling=scaling,
                       generator=torch.Generator().manual_seed(0), input_estimate=lazy(x),
                       output_estimate=lazy(y), options=options)


# ---------------------------------------------------------------------- registry
def test_registered_with_tags():
    names = strategies()
    for name in COV_STRATEGIES:
        assert name in names
        tags = get_strategy(name).tags
        assert tags["preserves"] in ("zero-delta", "function")
        assert set(tags["needs"]) <= {"input", "output"} and tags["needs"]
    assert get_strategy("two-sided").tags["needs"] == ("input", "output")
    assert get_strategy("cov-svd").tags["preserves"] == "function"
    assert get_strategy("input-pca").tags["preserves"] == "zero-delta"


# ---------------------------------------------------------------------- the contract
@pytest.fixture(scope="module")
def calibration():
    torch.manual_seed(0)
    return calibrate(TinyNet().eval(), _data(), targets=TARGETS, show_progress=False)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_r", "rslora"])
@pytest.mark.parametrize("kind", ["covinit", "peft", "loralib"])
# Quantized-base strategies (preserves="approximate") promise a measured error: test_quant.py.
# Strategies on gradient statistics: test_strategies_grad.py (a gradient-side calibration).
@pytest.mark.parametrize("strategy", sorted(n for n in strategies()
                                            if get_strategy(n).tags["preserves"] != "approximate"
                                            and "gradient" not in get_strategy(n).tags["needs"]))
def test_contract(strategy, kind, use_rslora, calibration, make_tiny, adapt):
    """ΔW = 0, or the residual base keeps the output to 1e-5 relative, on every layer kind."""
    model = adapt(kind, make_tiny(), TARGETS, rank=3, alpha=5.0, use_rslora=use_rslora)
    x = torch.cat(_data(seed=2, batches=1))
    with torch.no_grad():
        before = model(x)
    preserves = get_strategy(strategy).tags["preserves"]
    info = initialize(model, calibration, strategy=strategy, seed=3)
    with torch.no_grad():
        after = model(x)
    rel = float((after - before).norm() / before.norm())
    assert rel < 1e-5, f"{strategy}: output moved by {rel:.2e}"
    for name, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert info[name]["residual"] == (preserves == "function")
        if preserves == "zero-delta":
            assert torch.count_nonzero(b.double() @ a.double()) == 0
        elif strategy != "zero":
            assert info[name]["delta_norm"] > 0  # the adapter holds a real part of W0
        expected = 5.0 / math.sqrt(3) if use_rslora else 5.0 / 3
        assert adapter.scaling == pytest.approx(expected)


@pytest.mark.parametrize("strategy", COV_STRATEGIES)
def test_every_estimator_gives_finite_factors(strategy, calibration, make_tiny):
    model = add_lora(make_tiny(), TARGETS, rank=3)
    for est in ("empirical", "ledoit_wolf", "oas", "nonlinear"):
        initialize(model, calibration, strategy=strategy, estimator=est)
        for adapter in find_adapters(model).values():
            a, b = adapter.get_lora()
            assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_residual_factors_reconstruct_w0(calibration, make_tiny):
    """base + c·B·A = W0 for the residual strategies, including power=1 and centred."""
    for strategy, opts in (("cov-svd", {}), ("cov-svd", {"power": 1.0}),
                           ("cov-minor", {"center": True}), ("two-sided", {"power": 0.25})):
        model = add_lora(make_tiny(), TARGETS, rank=2)
        w0 = {n: a.base_weight().double().clone() for n, a in find_adapters(model).items()}
        initialize(model, calibration, strategy=strategy, **opts)
        for name, adapter in find_adapters(model).items():
            a, b = (t.double() for t in adapter.get_lora())
            got = adapter.base_weight().double() + adapter.scaling * b @ a
            assert torch.allclose(got, w0[name], atol=1e-5 * w0[name].abs().max()), name


# ---------------------------------------------------------------------- what each computes
def test_input_pca_recovers_planted_subspace():
    """Inputs = planted r-dim signal + isotropic noise: A's rows span the planted subspace."""
    g = torch.Generator().manual_seed(0)
    k, r, n = 40, 3, 4000
    basis, _ = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))
    x = (torch.randn(n, r, generator=g, dtype=torch.float64) * torch.tensor([5.0, 4.0, 3.0])
         ) @ basis.T + torch.randn(n, k, generator=g, dtype=torch.float64) + 2.0
    w = torch.randn(8, k, generator=g)
    for est in ("empirical", "ledoit_wolf", "oas"):
        init = get_strategy("input-pca").fn(_context(x, w, r, estimator=est))
        assert torch.count_nonzero(init.b) == 0 and init.base is None
        assert torch.allclose(init.a.norm(dim=1), torch.ones(r, dtype=torch.float64))
        assert _angles_deg(init.a.T, basis).max() < 5.0


def test_output_pca_recovers_planted_subspace(make_tiny):
    """A layer whose outputs live near an r-dim subspace: B's columns span it."""
    g = torch.Generator().manual_seed(0)
    k, d, r = 24, 30, 2
    out_basis, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
    layer = nn.Linear(k, d)
    with torch.no_grad():
        layer.weight.copy_(out_basis @ torch.randn(r, k, generator=g)
                           + 0.01 * torch.randn(d, k, generator=g))
        layer.bias.fill_(3.0)  # a constant offset: the centred covariance ignores it
    model = nn.Sequential(layer)
    data = [torch.randn(256, k, generator=g) for _ in range(4)]
    cal = calibrate(model, data, targets=["0"], show_progress=False)
    add_lora(model, ["0"], rank=r)
    initialize(model, cal, strategy="output-pca")
    a, b = find_adapters(model)["0"].get_lora()
    assert torch.count_nonzero(a) == 0
    assert _angles_deg(b, out_basis).max() < 5.0
    assert torch.allclose(b.norm(dim=0), torch.ones(r), atol=1e-6)


def test_input_pca_scale_option():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64)
    w = torch.randn(6, 10, generator=g)
    fn = get_strategy("input-pca").fn
    unit = fn(_context(x, w, 3)).a
    kaiming = fn(_context(x, w, 3, scale="kaiming")).a
    custom = fn(_context(x, w, 3, scale=0.25)).a
    assert torch.allclose(kaiming, unit / math.sqrt(3))
    assert torch.allclose(custom, unit * 0.25)
    with pytest.raises(ValueError, match=r"scale='huge'.*allowed"):
        fn(_context(x, w, 3, scale="huge"))
    with pytest.raises(ValueError, match="positive finite"):
        fn(_context(x, w, 3, scale=-1.0))


def test_input_whiten_gives_unit_variance_on_calibration_data(make_tiny):
    """Empirical estimate: cov(A·(x−m)) = I exactly; shrunk: diag(λ_S / λ_Σ)."""
    model = make_tiny()
    data = _data(seed=5)
    cal = calibrate(model, data, targets=["query"], show_progress=False)
    x = torch.cat(data).double()
    xc = x - x.mean(dim=0)
    for est in ("empirical", "ledoit_wolf"):
        lora = add_lora(make_tiny(), ["query"], rank=4)
        initialize(lora, cal, strategy="input-whiten", estimator=est)
        a, b = find_adapters(lora)["block.query"].get_lora()
        assert torch.count_nonzero(b) == 0
        h = xc @ a.double().T  # (n, r) hidden activations on the calibration data
        cov = h.T @ h / h.shape[0]
        if est == "empirical":
            torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), atol=1e-5,
                                       rtol=0)
        else:
            fitted = estimate(cal.moments("block.query", "input"), "ledoit_wolf")
            sample = estimate(cal.moments("block.query", "input"), "empirical")
            ratio = sample.eigenvalues[:4] / fitted.eigenvalues[:4]
            torch.testing.assert_close(cov, torch.diag(ratio), atol=1e-5, rtol=1e-5)
            assert fitted.shrinkage > 0


def test_uncentred_second_moment_is_exact():
    """center=False estimates E[xxᵀ] (empirical: XᵀX/n), via Moments.recentered(0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) + 3.0
    ctx = _context(x, torch.randn(4, 6, generator=g), 2)
    est = ctx.input_estimate(center=False)
    torch.testing.assert_close(est.covariance, x.T @ x / x.shape[0])
    # Ledoit-Wolf on it is sklearn's LedoitWolf(assume_centered=True).
    sklearn = pytest.importorskip("sklearn.covariance")
    lw = sklearn.LedoitWolf(assume_centered=True).fit(x.numpy())
    m = Moments.from_batch(x).recentered(torch.zeros(6, dtype=torch.float64))
    ours = estimate(m, "ledoit_wolf")
    assert ours.shrinkage == pytest.approx(lw.shrinkage_, rel=1e-9)
    torch.testing.assert_close(ours.covariance, torch.from_numpy(lw.covariance_))


def test_cov_svd_matches_its_formula():
    """Naive transcription: SVD of W0·C^{1/2} (C = XᵀX/n), top and bottom r."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 8) + 1
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    c = x.T @ x / x.shape[0]
    lam, vec = torch.linalg.eigh(c)
    c_half = vec @ torch.diag(lam.sqrt()) @ vec.T
    u, s, vh = torch.linalg.svd(w @ c_half)
    scaling = 2.0
    for strategy, sel in (("cov-svd", slice(0, 2)), ("cov-minor", slice(4, 6))):
        init = get_strategy(strategy).fn(_context(x, w, 2, scaling=scaling))
        want = u[:, sel] @ torch.diag(s[sel]) @ vh[sel] @ torch.linalg.inv(c_half)
        torch.testing.assert_close(scaling * init.b @ init.a, want, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(init.base + scaling * init.b @ init.a, w)
        # B's columns are the left singular vectors, scaled by √(S/c).
        torch.testing.assert_close(init.b.norm(dim=0), (s[sel] / scaling).sqrt())


def test_cov_svd_power_one_is_corda_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g, dtype=torch.float64) + 0.3
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    c = x.T @ x / x.shape[0]
    u, s, vh = torch.linalg.svd(w @ c)
    init = get_strategy("cov-svd").fn(_context(x, w, 3, scaling=1.0, power=1))
    want = u[:, :3] @ torch.diag(s[:3]) @ vh[:3] @ torch.linalg.inv(c)
    torch.testing.assert_close(init.b @ init.a, want, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="power= must be a number in"):
        get_strategy("cov-svd").fn(_context(x, w, 3, power=2))


def test_two_sided_matches_its_formula():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, 7, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 7)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = x @ w.T + 0.1 * torch.randn(600, 5, generator=g, dtype=torch.float64)

    def half(m: Tensor) -> tuple[Tensor, Tensor]:
        lam, vec = torch.linalg.eigh(m)
        return vec @ torch.diag(lam.sqrt()) @ vec.T, vec @ torch.diag(lam.rsqrt()) @ vec.T

    cx, cx_inv = half(x.T @ x / 600)
    cy, cy_inv = half(y.T @ y / 600)
    u, s, vh = torch.linalg.svd(cy @ w @ cx)
    init = get_strategy("two-sided").fn(_context(x, w, 2, scaling=0.5, y=y))
    want = cy_inv @ u[:, :2] @ torch.diag(s[:2]) @ vh[:2] @ cx_inv
    torch.testing.assert_close(0.5 * init.b @ init.a, want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(init.base + 0.5 * init.b @ init.a, w)


def test_signs_are_deterministic():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, generator=g)
    for name in ("input-pca", "cov-svd"):
        a = get_strategy(name).fn(_context(x, w, 2)).a
        b = get_strategy(name).fn(_context(-x, w, 2)).a  # same covariance, same result
        torch.testing.assert_close(a, b)
        rows = a.abs().argmax(dim=1)
        if name == "input-pca":
            assert (a.gather(1, rows[:, None]) > 0).all()


def test_spatpca_works_for_pca_strategies(make_tiny):
    """spatpca's Φ becomes A (its rank follows the LoRA rank; folds drive the CV)."""
    model = make_tiny()
    cal = calibrate(model, _data(seed=7, batches=6), targets=["query"], folds=3,
                    show_progress=False)
    lora = add_lora(make_tiny(), ["query"], rank=3)
    initialize(lora, cal, strategy="input-pca", estimator="spatpca")
    a, _ = find_adapters(lora)["block.query"].get_lora()
    fit = estimate(cal.moments("block.query", "input"), "spatpca",
                   folds=cal.folds("block.query", "input"), rank=3)
    assert _angles_deg(a.T, fit.top(3)[1]).max() < 1e-3
    initialize(lora, cal, strategy="input-whiten", estimator="spatpca")
    initialize(lora, cal, strategy="output-pca", estimator="spatpca")
    initialize(lora, cal, strategy="cov-svd", estimator="spatpca", center=True)
    initialize(lora, cal, strategy="two-sided", estimator="spatpca")  # uncentred folds too


# ---------------------------------------------------------------------- errors and fallbacks
def test_unknown_and_bad_options(calibration, make_tiny):
    model = add_lora(make_tiny(), TARGETS, rank=2)
    with pytest.raises(ValueError, match=r"unknown options \['residual'\]"):
        initialize(model, calibration, strategy="cov-svd", residual=True)
    with pytest.raises(TypeError, match="center= must be a bool"):
        initialize(model, calibration, strategy="input-pca", center="yes")
    with pytest.raises(ValueError, match="needs input-side calibration"):
        initialize(model, strategy="input-pca")


def test_too_few_positions_fall_back_to_kaiming(make_tiny):
    data = [torch.randn(2, 12)]  # 2 positions < rank 3
    cal = calibrate(make_tiny(), data, targets=TARGETS, show_progress=False)
    model = add_lora(make_tiny(), TARGETS, rank=3)
    x = torch.randn(5, 12)
    before = model(x).detach()
    with pytest.warns(UserWarning) as record:
        info = initialize(model, cal, strategy="cov-svd")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 3
    for message, name in zip(messages, sorted(TARGETS_FULL), strict=True):
        assert message.startswith(f"layer {name!r}: only 2 usable calibration position(s) on "
                                  "the input side, fewer than the rank 3; strategy 'cov-svd' "
                                  "falls back to 'kaiming'")
    assert {i["strategy"] for i in info.values()} == {"kaiming"}
    assert all("fallback" in i for i in info.values())
    assert torch.equal(model(x).detach(), before)


def test_constant_inputs_fall_back_to_kaiming(make_tiny):
    data = [torch.full((16, 12), 0.7), torch.full((16, 12), 0.7)]
    cal = calibrate(make_tiny(), data, targets=["query"], show_progress=False)
    model = add_lora(make_tiny(), ["query"], rank=2)
    for strategy in COV_STRATEGIES:
        with pytest.warns(UserWarning, match=r"'block\.query'.*constant over all 32"):
            info = initialize(model, cal, strategy=strategy)
        assert info["block.query"]["strategy"] == "kaiming"
        a, b = find_adapters(model)["block.query"].get_lora()
        assert torch.isfinite(a).all() and torch.count_nonzero(b) == 0


@pytest.mark.parametrize("kind", ["covinit", "peft"])
@pytest.mark.parametrize("strategy", ["input-whiten", "two-sided"])
def test_calibrate_collects_and_initializes_in_one_call(kind, strategy, make_tiny, adapt):
    model = adapt(kind, make_tiny(), TARGETS, rank=3, alpha=6.0)
    x = torch.cat(_data(seed=4, batches=1))
    with torch.no_grad():
        before = model(x)
    cal = calibrate(model, _data(), strategy=strategy, estimator="oas", show_progress=False)
    with torch.no_grad():
        after = model(x)
    assert float((after - before).norm() / before.norm()) < 1e-5
    # The same calibration applied again through initialize gives the same factors.
    got = {n: a.get_lora() for n, a in find_adapters(model).items()}
    fresh = adapt(kind, make_tiny(), TARGETS, rank=3, alpha=6.0)
    initialize(fresh, cal, strategy=strategy, estimator="oas")
    for name, adapter in find_adapters(fresh).items():
        a, b = adapter.get_lora()
        torch.testing.assert_close(a, got[name][0])
        torch.testing.assert_close(b, got[name][1])
