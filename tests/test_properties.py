"""Property-based tests (hypothesis) over shapes, ranks, masks and scales (issue 8).

Already property-tested elsewhere, not repeated: Moments merges vs the dense definitions
(test_stats), the collector vs dense with masks and leading shapes (test_collect), estimator
symmetry / PSD / batch-order invariance (test_estimators).  Here:

* the strategies' contract end to end (calibrate → initialize on a float64 model): shapes,
  finite values, the function kept at step 0 (``B·A = 0`` exactly, or
  ``base + c·B·A = W0``), fallback exactly when the statistics cannot support the rank,
  bitwise reproducibility;
* equivariances that any covariance pipeline must have: scaling the data by ``s`` scales the
  estimates by ``s²`` and leaves shrinkage and principal directions alone; shifting it
  leaves centred estimates alone; input-side strategies' products ``c·B·A`` are unchanged
  by a data scale (they depend on directions, or on ``W0`` and ``Σ`` only through
  ``W0·Σ^p·Σ^(-p)``);
* Moments algebra: re-centring there and back is the identity, state round trips.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from _loss import GRADIENT
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from covinit import add_lora, calibrate, estimate, find_adapters, initialize
from covinit.inits import _REGISTRY
from covinit.stats import Moments

# Quantized-base strategies (preserves="approximate") promise a measured error: test_quant.py.
ALL_STRATEGIES = [e.name for e in _REGISTRY if e.tags["preserves"] != "approximate"]
LINEAR_ESTIMATORS = ["empirical", "ledoit_wolf", "oas"]
# 30 examples each keeps the file ~2 s; COVINIT_HYPOTHESIS_EXAMPLES=400 for a deeper search.
SETTINGS = settings(max_examples=int(os.environ.get("COVINIT_HYPOTHESIS_EXAMPLES", "30")),
                    deadline=None)


def _rows(n: int, k: int, seed: int, scale: float, offset: float) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen, dtype=torch.float64)
    return (torch.randn(n, k, generator=gen, dtype=torch.float64) @ mix) * scale + offset


def _layer(d: int, k: int, seed: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed + 1)
    layer = nn.Linear(k, d).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d, k, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(d, generator=gen, dtype=torch.float64))
    return nn.Sequential(layer).eval()


def _calibrate(model: nn.Module, x: Tensor, mask: Tensor | None):
    batch = {"x": x[None], "attention_mask": None if mask is None else mask[None].long()}
    return calibrate(model, [batch], targets=["0"], show_progress=False,
                     forward_fn=lambda m, b: m(b["x"]), **GRADIENT)


def _init(model: nn.Module, cal, **kw) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = initialize(model, cal, **kw)
    return info, [str(w.message) for w in caught]


# ------------------------------------------------------------------ strategy contracts
@SETTINGS
@given(d=st.integers(1, 7), k=st.integers(1, 7), rank_frac=st.floats(0, 1),
       n=st.integers(1, 24), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       offset=st.sampled_from([0.0, 10.0]), keep=st.sampled_from([1.0, 0.5]),
       strategy=st.sampled_from(ALL_STRATEGIES), estimator=st.sampled_from(LINEAR_ESTIMATORS),
       seed=st.integers(0, 2**20))
def test_every_strategy_keeps_its_contract(d, k, rank_frac, n, scale, offset, keep, strategy,
                                           estimator, seed):
    r = 1 + int(rank_frac * (min(d, k) - 1))
    # LoRA-GA takes B from singular vectors r..2r-1: a documented, tested refusal otherwise.
    assume(strategy != "lora-ga" or 2 * r <= min(d, k))
    x = _rows(n, k, seed, scale, offset)
    mask = None
    if keep < 1.0:
        mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < keep
        mask[0] = True  # at least one kept position (all masked is a tested error)
    base = _layer(d, k, seed)
    cal = _calibrate(base, x, mask)
    kept = int(mask.sum()) if mask is not None else n
    assert cal.moments("0", "input").n == kept

    model = add_lora(_layer(d, k, seed), ["0"], rank=r)
    info, warned = _init(model, cal, strategy=strategy, estimator=estimator, seed=seed)
    entry = _REGISTRY.get(strategy)
    adapter = find_adapters(model)["0"]
    a, b = adapter.get_lora()
    assert a.shape == (r, k) and b.shape == (d, r)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # Fallback happens exactly when the statistics cannot support the rank.
    if info["0"]["strategy"] != strategy:
        assert entry.tags["needs"] and info["0"]["strategy"] == "kaiming"
        assert len(warned) == 1 and ("fewer than the rank" in warned[0]
                                     or "constant over all" in warned[0])
        assert "fewer than the rank" not in warned[0] or kept < r
    else:
        assert not warned
        assert kept >= r or not entry.tags["needs"]
    probe = _rows(5, k, seed + 7, scale, offset)
    with torch.no_grad():
        want = base(probe)
        got = model(probe)
    if info["0"]["residual"]:
        assert entry.tags["preserves"] == "function"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    else:
        assert torch.count_nonzero(b @ a) == 0 or torch.count_nonzero(b) == 0
        assert torch.equal(got, want)
    # Same inputs and seed: bitwise the same factors.
    again = add_lora(_layer(d, k, seed), ["0"], rank=r)
    _init(again, cal, strategy=strategy, estimator=estimator, seed=seed)
    for mine, theirs in zip(adapter.get_lora(), find_adapters(again)["0"].get_lora(),
                            strict=True):
        assert torch.equal(mine, theirs)


@SETTINGS
@given(d=st.integers(2, 6), k=st.integers(2, 6), n=st.integers(12, 30),
       s=st.sampled_from([1e-3, 0.5, 7.0, 1e3]),
       strategy=st.sampled_from(["input-pca", "input-whiten", "cov-svd", "cov-minor"]),
       estimator=st.sampled_from(["ledoit_wolf", "oas"]), seed=st.integers(0, 2**20))
def test_input_strategies_do_not_depend_on_the_data_scale(d, k, n, s, strategy, estimator,
                                                          seed):
    """Calibrating on ``s·x`` instead of ``x``: ``input-pca``'s A (unit rows along the
    principal directions) is unchanged, ``input-whiten``'s A = Λ_r^(-1/2)·U_rᵀ is divided by
    ``s``, and the residual strategies' ``c·B·A`` (the part of ``W0`` moved into the adapter)
    is unchanged."""
    x = _rows(n, k, seed, 1.0, 0.0)
    out = []
    for data in (x, s * x):
        model = add_lora(_layer(d, k, seed), ["0"], rank=1)
        _init(model, _calibrate(_layer(d, k, seed), data, None), strategy=strategy,
              estimator=estimator)
        a, b = find_adapters(model)["0"].get_lora()
        out.append((a, b @ a))
    (a1, p1), (a2, p2) = out
    torch.testing.assert_close(p2, p1, rtol=1e-7, atol=1e-9 * float(p1.abs().max()))
    if strategy == "input-pca":
        torch.testing.assert_close(a2, a1, rtol=1e-7, atol=1e-9)
    if strategy == "input-whiten":
        torch.testing.assert_close(a2 * s, a1, rtol=1e-7, atol=1e-9 * float(a1.abs().max()))


# ------------------------------------------------------------------ estimator equivariances
@SETTINGS
@given(n=st.integers(2, 40), k=st.integers(1, 10), s=st.sampled_from([1e-4, 0.3, 5.0, 1e4]),
       shift=st.sampled_from([0.0, 3.0, -1e3]), seed=st.integers(0, 2**20),
       name=st.sampled_from([*LINEAR_ESTIMATORS, "nonlinear"]))
def test_estimates_scale_as_s_squared_and_ignore_shifts(n, k, s, shift, seed, name):
    assume(name != "nonlinear" or n - 1 >= 12)
    x = _rows(n, k, seed, 1.0, 0.0)
    base = estimate(Moments.from_batch(x), name)
    scaled = estimate(Moments.from_batch(s * x + shift), name)
    cov = base.covariance
    tol = 1e-8 * float(cov.abs().max()) + 1e-300
    torch.testing.assert_close(scaled.covariance / s**2, cov, rtol=1e-7, atol=tol)
    if base.shrinkage is not None:
        assert scaled.shrinkage == pytest.approx(base.shrinkage, abs=1e-7)
    values, _ = base.top(k)
    assert bool((values[:-1] >= values[1:]).all())
    torch.testing.assert_close(scaled.eigenvalues / s**2, base.eigenvalues, rtol=1e-7,
                               atol=tol)


@SETTINGS
@given(sizes=st.lists(st.integers(1, 12), min_size=2, max_size=4), k=st.integers(1, 8),
       seed=st.integers(0, 2**20), shift=st.sampled_from([0.0, 1.0, 1e4]),
       target=st.sampled_from([0.0, -2.0, 1e3]))
def test_recentering_commutes_with_merging_and_state_round_trips(sizes, k, seed, shift,
                                                                 target):
    """Summaries re-centred on a common point add up to the merged summary re-centred there
    (what ``initialize`` relies on for the uncentred second moment), and survive
    ``state`` → ``from_state`` bitwise."""
    parts = [Moments.from_batch(_rows(n, k, seed + i, 1.0 + i, shift))
             for i, n in enumerate(sizes)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    centre = torch.full((k,), target, dtype=torch.float64)
    whole = merged.recentered(centre)
    pieces = [p.recentered(centre) for p in parts]
    for field in ("m2", "t", "q"):
        total = sum(getattr(p, field) for p in pieces)
        want = getattr(whole, field)
        torch.testing.assert_close(total, want, rtol=1e-9,
                                   atol=1e-9 * float(want.abs().max()) + 1e-300)
    restored = Moments.from_state(merged.state())
    assert restored.n == merged.n == sum(sizes)
    assert all(torch.equal(getattr(restored, f), getattr(merged, f))
               for f in ("mean", "m2", "t", "q"))


@SETTINGS
@given(n=st.integers(3, 30), k=st.integers(1, 8), seed=st.integers(0, 2**20),
       dup=st.integers(0, 7), const=st.floats(-5, 5))
def test_shrinkage_estimates_stay_positive_definite_on_degenerate_data(n, k, seed, dup, const):
    """Duplicated and constant features, n < k: Ledoit-Wolf / OAS stay strictly positive
    definite (unless all spread is zero), so Σ^(-1/2) is finite.  (n ≥ 3: with two rows the
    centred rows are ±v, every xxᵀ equals S and Ledoit-Wolf's intensity is exactly 0, as in
    scikit-learn.)"""
    x = _rows(n, k, seed, 1.0, 0.0)
    if k > 1:
        x[:, dup % k] = x[:, (dup + 1) % k]
    x[:, 0] = const
    m = Moments.from_batch(x)
    assume(float(torch.trace(m.m2)) > 1e-12)
    for name in ("ledoit_wolf", "oas"):
        est = estimate(m, name)
        lam = est.eigenvalues
        assert float(lam[-1]) > 0.0, (name, est.shrinkage)
        assert torch.isfinite(est.inv_sqrt()).all()
        if float(lam[-1]) > 1e-8 * float(lam[0]):  # above the inverse's relative floor
            eye = est.sqrt() @ est.inv_sqrt()
            torch.testing.assert_close(eye, torch.eye(k, dtype=torch.float64), rtol=0,
                                       atol=1e-6)
