"""Tests for covinit.stats: exact streaming moments against a dense float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _dense import assert_matches, dense
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.covariance import LedoitWolf

from covinit.stats import Moments, merge_all


def ledoit_wolf_shrinkage(m: Moments) -> float:
    """DESIGN.md §3's Ledoit-Wolf shrinkage from the summary alone (scikit-learn's form)."""
    n, k = m.n, m.k
    s = m.m2 / n
    mu = torch.trace(s) / k
    beta = (m.q / n - (s * s).sum()) / (n * k)
    delta = ((s - mu * torch.eye(k, dtype=s.dtype)) ** 2).sum() / k
    beta = torch.minimum(beta, delta)
    return 0.0 if float(beta) == 0 else float(beta / delta)


def test_from_batch_matches_dense():
    x = torch.randn(37, 6, dtype=torch.float64) * torch.linspace(0.1, 5, 6) + 3
    assert_matches(Moments.from_batch(x), dense(x.numpy()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_uneven_batches_any_order(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 2, 30, 5, 11]
    parts = [torch.randn(s, 5, generator=gen, dtype=torch.float64) * (i + 1) + i
             for i, s in enumerate(sizes)]
    ref = dense(torch.cat(parts).numpy())
    sums = [Moments.from_batch(p) for p in parts]
    sequential = sums[0]
    for s in sums[1:]:
        sequential = sequential + s
    reverse = sums[-1]
    for s in reversed(sums[:-1]):
        reverse = s.merge(reverse)
    shuffled = merge_all([sums[i] for i in torch.randperm(len(sums), generator=gen).tolist()])
    for mom in (sequential, reverse, merge_all(sums), shuffled):
        assert_matches(mom, ref)


def test_merge_is_exactly_symmetric_and_leaves_its_inputs_alone():
    # k = 300 > the 256-column block of the in-place rank-1 update: two blocks
    gen = torch.Generator().manual_seed(3)
    a_rows = torch.randn(400, 300, generator=gen, dtype=torch.float64) + 2
    b_rows = torch.randn(90, 300, generator=gen, dtype=torch.float64) * 3 - 1
    a, b = Moments.from_batch(a_rows), Moments.from_batch(b_rows)
    before = [t.clone() for t in (a.m2, a.t, a.q, b.m2, b.t, b.q)]
    total = a.merge(b)
    assert torch.equal(total.m2, total.m2.T)
    for old, new in zip(before, (a.m2, a.t, a.q, b.m2, b.t, b.q), strict=True):
        assert torch.equal(old, new)
    assert_matches(total, dense(torch.cat([a_rows, b_rows]).numpy()))
    # recentering both sides on the merged mean and adding is the same summary
    ra, rb = a.recentered(total.mean), b.recentered(total.mean)
    torch.testing.assert_close(ra.m2 + rb.m2, total.m2, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ra.t + rb.t, total.t, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ra.q + rb.q, total.q, rtol=1e-12, atol=1e-6)


def test_empty_is_identity():
    m = Moments.from_batch(torch.randn(4, 3, dtype=torch.float64))
    e = Moments.empty(3)
    assert (m + e) is m and (e + m) is m
    assert Moments.from_batch(torch.empty(0, 3)).n == 0


def test_from_shifted_sums_matches_dense():
    x = torch.randn(40, 4, dtype=torch.float64) * 2 + 7
    c = torch.tensor([6.5, 7.2, 8.0, 6.9], dtype=torch.float64)
    y = x - c
    sq = (y * y).sum(1)
    mom = Moments.from_shifted_sums(40, c, y.sum(0), y.T @ y, y.T @ sq, (sq * sq).sum())
    assert_matches(mom, dense(x.numpy()))


def test_from_shifted_sums_overwrite_reuses_s2_and_stays_symmetric():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 300, generator=gen, dtype=torch.float64) + 4  # 2 column blocks
    c = x[0].clone()
    y = x - c
    sq = (y * y).sum(1)
    s2 = y.T @ y
    s2 = (s2 + s2.T) / 2  # exactly symmetric input, as the collector hands it over
    args = (50, c, y.sum(0), s2, y.T @ sq, (sq * sq).sum())
    ref = Moments.from_shifted_sums(*args)
    given = s2.clone()
    mom = Moments.from_shifted_sums(*args[:3], given, *args[4:], overwrite=True)
    assert mom.m2.data_ptr() == given.data_ptr()  # no new k×k matrix
    assert torch.equal(mom.m2, ref.m2) and torch.equal(mom.m2, mom.m2.T)  # bit for bit
    assert torch.equal(mom.mean, ref.mean) and torch.equal(mom.t, ref.t)
    assert_matches(mom, dense(x.numpy()))


def test_large_mean_fp32_data_keeps_covariance():
    # Mean 1e3, spread 1, fp32 storage: Σxxᵀ − n·mmᵀ would cancel ~6 digits in float64 and
    # everything in float32; centring per batch keeps the covariance exact.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2000, 4, generator=gen) + 1e3).to(torch.float32)
    ref = dense(x.double().numpy())
    total = merge_all([Moments.from_batch(c) for c in x.split(300)])
    np.testing.assert_allclose(total.covariance().numpy(), ref["m2"] / 2000, atol=1e-12)
    raw = x.T @ x / 2000 - torch.outer(x.mean(0), x.mean(0))  # the formula we must not use
    assert (raw - torch.from_numpy(ref["m2"] / 2000).float()).abs().max() > 1e-2


def test_fp32_gemm_is_close_but_not_exact():
    x = torch.randn(500, 8, dtype=torch.float64) + 50
    exact = Moments.from_batch(x)
    mixed = Moments.from_batch(x, gemm_dtype=torch.float32)
    # float32 rounding of the centred product: ~1e-7 relative to the spread, never the mean.
    rel = (mixed.m2 - exact.m2).abs().max() / exact.m2.abs().max()
    assert 0 < rel < 1e-6


def test_ledoit_wolf_shrinkage_equals_sklearn():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(60, 10, generator=gen, dtype=torch.float64) @ torch.randn(
        10, 10, generator=gen, dtype=torch.float64) + 4
    streamed = merge_all([Moments.from_batch(c) for c in x.split([5, 17, 1, 37])])
    expected = LedoitWolf().fit(x.numpy()).shrinkage_
    assert ledoit_wolf_shrinkage(streamed) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_state_round_trip_and_validation():
    m = Moments.from_batch(torch.randn(9, 3, dtype=torch.float64))
    back = Moments.from_state(m.state())
    assert back.n == m.n and torch.equal(back.m2, m.m2) and torch.equal(back.q, m.q)
    bad = m.state()
    bad["m2"] = bad["m2"][:2]
    with pytest.raises(ValueError, match="'m2' has shape"):
        Moments.from_state(bad)
    bad = m.state()
    bad["t"] = bad["t"].float()
    with pytest.raises(ValueError, match="dtype"):
        Moments.from_state(bad)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=6), k=st.integers(1, 6),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), offset=st.sampled_from([0.0, 1e2, -1e4]),
       seed=st.integers(0, 2**31 - 1))
def test_property_merge_equals_dense(sizes, k, scale, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(s, k, generator=gen, dtype=torch.float64) * scale + offset
             for s in sizes]
    total = merge_all([Moments.from_batch(p) for p in parts])
    ref = dense(torch.cat(parts).numpy())
    assert total.n == ref["n"]
    np.testing.assert_allclose(total.mean.numpy(), ref["mean"], rtol=1e-12,
                               atol=1e-12 * scale)
    # Both sides round the data's centring at ~eps·|offset|; that bounds what can agree.
    atol = ref["n"] * (1e-10 * scale**2 + 1e-13 * abs(offset) * scale)
    np.testing.assert_allclose(total.m2.numpy(), ref["m2"], rtol=1e-9, atol=atol)
