"""Baseline strategies: kaiming, gaussian, zero, pissa — distributions, PEFT parity, contract."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ADAPTER_KINDS

from covinit import find_adapters, initialize, strategies
from covinit.inits import InitContext, LoRAInit, get_strategy

BASELINES = ("kaiming", "gaussian", "zero", "pissa")
TARGETS = ("query", "dense", "head")


def _ctx(d: int, k: int, rank: int, scaling: float = 2.0, seed: int = 0) -> InitContext:
    weight = torch.randn(d, k, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    return InitContext(name="layer", weight=weight, rank=rank, scaling=scaling,
                       generator=torch.Generator().manual_seed(seed))


def _run(name: str, ctx: InitContext) -> LoRAInit:
    return get_strategy(name).fn(ctx)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_registered_names_and_tags():
    listed = strategies()
    for name in BASELINES:
        assert listed.get(name)
        entry = get_strategy(name)
        assert entry.tags["needs"] == ()
    assert get_strategy("pissa").tags["preserves"] == "function"
    assert get_strategy("kaiming").tags["preserves"] == "zero-delta"
    with pytest.raises(ValueError, match=r"valid names: .*kaiming.*pissa"):
        get_strategy("kaimin")


def test_kaiming_is_uniform_with_peft_bound():
    k = 256
    result = _run("kaiming", _ctx(64, k, 16))
    bound = 1 / math.sqrt(k)  # kaiming_uniform_(a=√5): gain √(1/3), bound gain·√(3/k)
    assert result.a.shape == (16, k) and result.a.dtype == torch.float64
    assert result.a.abs().max() <= bound
    assert result.a.abs().max() > 0.99 * bound
    assert float(result.a.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(result.b) == 0 and result.b.shape == (64, 16)
    assert result.base is None


def test_gaussian_has_peft_std():
    result = _run("gaussian", _ctx(64, 256, 16))
    assert float(result.a.std()) == pytest.approx(1 / 16, rel=0.05)
    assert abs(float(result.a.mean())) < 0.01 / 16 * 10
    assert torch.count_nonzero(result.b) == 0 and result.base is None


def test_zero_is_zero_and_cannot_train(make_tiny, adapt):
    result = _run("zero", _ctx(8, 6, 2))
    assert torch.count_nonzero(result.a) == 0 and torch.count_nonzero(result.b) == 0
    model = adapt("covinit", make_tiny(), ["query"], rank=2)
    initialize(model, strategy="zero")
    loss = model(torch.randn(4, 12)).square().sum()
    loss.backward()
    layer = model.block.query
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) == 0


@pytest.mark.parametrize("name", ["kaiming", "gaussian"])
def test_random_strategies_follow_the_generator(name):
    first, again = _run(name, _ctx(8, 6, 2, seed=1)), _run(name, _ctx(8, 6, 2, seed=1))
    other = _run(name, _ctx(8, 6, 2, seed=2))
    assert torch.equal(first.a, again.a)
    assert not torch.equal(first.a, other.a)


@pytest.mark.parametrize("scaling", [0.5, 2.0, 8 / math.sqrt(4)])
def test_pissa_is_truncated_svd_with_residual(scaling):
    ctx = _ctx(10, 7, 3, scaling=scaling)
    result = _run("pissa", ctx)
    u, s, vh = torch.linalg.svd(ctx.weight)
    top = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    delta = scaling * result.b @ result.a
    assert torch.allclose(delta, top, atol=1e-12)
    assert torch.allclose(result.base + delta, ctx.weight, atol=1e-12)
    # A and B carry equal shares: AAᵀ = BᵀB = diag(S_r)/scaling
    assert torch.allclose(result.a @ result.a.T, torch.diag(s[:3]) / scaling, atol=1e-12)
    assert torch.allclose(result.b.T @ result.b, torch.diag(s[:3]) / scaling, atol=1e-12)


def _peft_pissa(make_tiny, adapt, rank, alpha, use_rslora):
    model = adapt("peft", make_tiny(), TARGETS, rank=rank, alpha=alpha, use_rslora=use_rslora,
                  init_lora_weights="pissa")
    out = {}
    for name, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        out[name] = (adapter.scaling * b.double() @ a.double(), adapter.base_weight().double())
    return out


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ["covinit", "peft"])
def test_pissa_matches_peft(kind, use_rslora, make_tiny, adapt):
    rank, alpha = 4, 6
    reference = _peft_pissa(make_tiny, adapt, rank, alpha, use_rslora)
    model = adapt(kind, make_tiny(), TARGETS, rank=rank, alpha=alpha, use_rslora=use_rslora)
    x = torch.randn(5, 12)
    with torch.no_grad():
        before = model(x)
    info = initialize(model, strategy="pissa")
    adapters = find_adapters(model)
    assert set(adapters) == set(reference)
    for name, adapter in adapters.items():
        a, b = adapter.get_lora()
        delta = adapter.scaling * b.double() @ a.double()
        want_delta, want_base = reference[name]
        assert torch.allclose(delta, want_delta, atol=1e-5), name
        assert torch.allclose(adapter.base_weight().double(), want_base, atol=1e-5), name
        assert info[name]["residual"]
        assert info[name]["delta_norm"] == pytest.approx(float(torch.linalg.norm(delta)),
                                                         rel=1e-5)
    with torch.no_grad():
        assert _rel(model(x), before) < 1e-5


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize("name", BASELINES)
def test_contract_zero_delta_or_same_output(name, kind, use_rslora, make_tiny, adapt):
    """Either ΔW = B·A = 0 at step 0, or the adapted model's output equals the original's."""
    model = adapt(kind, make_tiny(), TARGETS, rank=3, alpha=5, use_rslora=use_rslora)
    x = torch.randn(6, 2, 12)
    with torch.no_grad():
        original = make_tiny()(x)
    info = initialize(model, strategy=name, seed=3)
    with torch.no_grad():
        adapted = model(x)
    preserves = get_strategy(name).tags["preserves"]
    for layer, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        if preserves == "zero-delta":
            assert torch.count_nonzero(b @ a) == 0, layer
            assert info[layer]["delta_norm"] == 0.0
        else:
            assert info[layer]["delta_norm"] > 0.1, layer
    assert _rel(adapted, original) < 1e-5
    if preserves == "zero-delta":
        assert torch.equal(adapted, original)
