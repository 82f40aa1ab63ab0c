"""Rank allocation under a total budget, and resized adapters that save and reload."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet
from torch import Tensor

from covinit import add_lora, calibrate, find_adapters, initialize, load_lora, save_lora
from covinit.allocation import allocate_ranks, explained_variance_ratio, rank_cap
from covinit.covariance import estimate

TARGETS = ["query", "dense", "head"]
NAMES = ["block.query", "block.dense", "head"]


def _brute_force(spectra: dict[str, Tensor], budget: int, caps: dict[str, int]) -> float:
    """Best total explained-variance ratio over every feasible allocation (min rank 1)."""
    import itertools

    ratios = {n: explained_variance_ratio(s) for n, s in spectra.items()}
    best = -1.0
    for ranks in itertools.product(*(range(1, caps[n] + 1) for n in spectra)):
        if sum(ranks) == budget:
            total = sum(float(ratios[n][:r].sum()) for n, r in zip(spectra, ranks, strict=True))
            best = max(best, total)
    return best


def test_explained_variance_ratio():
    ratio = explained_variance_ratio(torch.tensor([1.0, 3.0, -1e-18, 0.0]))
    torch.testing.assert_close(ratio, torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64))
    assert torch.count_nonzero(explained_variance_ratio(torch.zeros(3))) == 0


def test_allocation_is_optimal_and_within_bounds():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        spectra = {f"l{i}": torch.rand(6, generator=g) ** (1 + 4 * torch.rand(1, generator=g))
                   for i in range(3)}
        caps = {name: int(torch.randint(1, 7, (1,), generator=g)) for name in spectra}
        budget = int(torch.randint(3, sum(caps.values()) + 1, (1,), generator=g))
        ranks = allocate_ranks(spectra, budget, max_rank=caps)
        assert list(ranks) == list(spectra)
        assert sum(ranks.values()) == budget
        assert all(1 <= ranks[n] <= caps[n] for n in spectra)
        got = sum(float(explained_variance_ratio(spectra[n])[: ranks[n]].sum()) for n in spectra)
        assert got == pytest.approx(_brute_force(spectra, budget, caps), abs=1e-12), trial


def test_allocation_prefers_spread_out_spectra():
    flat = torch.ones(8)  # every direction explains 1/8
    peaked = torch.tensor([100.0] + [1.0] * 7)  # one direction explains 93%
    ranks = allocate_ranks({"peaked": peaked, "flat": flat}, 8)
    assert ranks == {"peaked": 1, "flat": 7}


def test_allocation_errors():
    spectra = {"a": torch.ones(4), "b": torch.ones(4)}
    with pytest.raises(ValueError, match=r"rank budget 1 is infeasible for 2 layers: it must be "
                                         r"in \[2, 6\]"):
        allocate_ranks(spectra, 1, max_rank=3)
    with pytest.raises(ValueError, match=r"infeasible.*\[2, 6\]"):
        allocate_ranks(spectra, 7, max_rank=3)
    with pytest.raises(TypeError, match="must be an int"):
        allocate_ranks(spectra, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one layer"):
        allocate_ranks({}, 2)
    with pytest.raises(ValueError, match=r"layer 'a': rank cap 0 \(k=4\) is below min_rank=1"):
        allocate_ranks(spectra, 2, max_rank={"a": 0})


def test_rank_cap_is_twice_the_rank_within_the_weight():
    assert rank_cap(4, 100, 50) == 8  # 2·rank
    assert rank_cap(4, 100, 6) == 6 and rank_cap(4, 5, 100) == 5  # min(d, k) directions
    assert rank_cap(4, 100, 50, max_rank=3) == 3  # max_rank replaces 2·rank, may be lower
    assert rank_cap(4, 100, 50, max_rank=80) == 50
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"max_rank must be an int >= 1, got {bad!r}"):
            rank_cap(4, 10, 10, max_rank=bad)  # type: ignore[arg-type]


def test_docstring_examples_run():
    import doctest

    import covinit.allocation

    result = doctest.testmod(covinit.allocation)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- through initialize
def _data(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g) * torch.logspace(0, -2, 12)[:, None]
    return [torch.randn(64, 12, generator=g) @ mix for _ in range(4)]


@pytest.fixture(scope="module")
def calibration():
    torch.manual_seed(0)
    return calibrate(TinyNet().eval(), _data(), targets=TARGETS, show_progress=False)


def _expected_ranks(calibration, budget: int, caps: dict[str, int]) -> dict[str, int]:
    spectra = {n: estimate(calibration.moments(n, "input"), "ledoit_wolf").eigenvalues
               for n in NAMES}
    return allocate_ranks(spectra, budget, max_rank=caps)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_r", "rslora"])
@pytest.mark.parametrize("kind", ["covinit", "peft", "loralib"])
def test_rank_budget_resizes_and_keeps_scaling(kind, use_rslora, calibration, make_tiny, adapt):
    model = adapt(kind, make_tiny(), TARGETS, rank=4, alpha=8.0, use_rslora=use_rslora)
    scalings = {n: a.scaling for n, a in find_adapters(model).items()}
    x = torch.randn(7, 12)
    before = model(x).detach()
    info = initialize(model, calibration, strategy="cov-svd", rank_budget=9)
    want = _expected_ranks(calibration, 9, {"block.query": 8, "block.dense": 8, "head": 5})
    assert {n: info[n]["rank"] for n in NAMES} == want
    assert len(set(want.values())) > 1  # the budget is really redistributed
    for name, adapter in find_adapters(model).items():
        assert adapter.rank == want[name]
        assert adapter.scaling == pytest.approx(scalings[name])
        a, b = adapter.get_lora()
        assert a.shape == (want[name], adapter.in_features)
        assert b.shape == (adapter.out_features, want[name])
        assert a.requires_grad is False  # get_lora copies; the parameters are trainable:
        params = dict(model.named_parameters())
        assert any(p.requires_grad and p.shape == a.shape for p in params.values())
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=1e-5)


def test_rank_budget_cap_and_errors(calibration, make_tiny):
    model = add_lora(make_tiny(), TARGETS, rank=2)
    info = initialize(model, calibration, strategy="input-pca", rank_budget=6, max_rank=2)
    assert [info[n]["rank"] for n in NAMES] == [2, 2, 2]
    with pytest.raises(ValueError, match="infeasible"):
        initialize(model, calibration, rank_budget=100)
    with pytest.raises(ValueError, match=r"either rank= .* or rank_budget="):
        initialize(model, calibration, rank=2, rank_budget=6)
    with pytest.raises(ValueError, match="rank_budget= needs input-side calibration"):
        initialize(model, strategy="kaiming", rank_budget=6)


@pytest.mark.parametrize("max_rank", [None, 3])
def test_report_marks_the_ranks_initialize_gives(calibration, make_tiny, tmp_path, max_rank):
    """report(rank_budget=) and initialize(rank_budget=) share one cap rule (rank_cap)."""
    from covinit.reporting import report

    model = add_lora(make_tiny(), TARGETS, rank=4)
    marked = report(calibration, model, tmp_path, rank_budget=8, max_rank=max_rank,
                    sides=["input"], figures=False)
    info = initialize(model, calibration, strategy="input-pca", rank_budget=8,
                      max_rank=max_rank)
    assert {s.layer: s.rank for s in marked.summaries} == {n: info[n]["rank"] for n in NAMES}


def test_covinit_resized_model_saves_and_reloads(calibration, make_tiny, tmp_path):
    model = add_lora(make_tiny(), TARGETS, rank=4, alpha=8.0, use_rslora=True)
    initialize(model, calibration, strategy="cov-svd", rank_budget=9)
    with torch.no_grad():
        model.head.lora_B.add_(0.05)  # stands for training
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    fresh = load_lora(make_tiny(), path)
    for name, adapter in find_adapters(fresh).items():
        assert adapter.rank == find_adapters(model)[name].rank
        assert adapter.module.use_rslora
    x = torch.randn(5, 12)
    torch.testing.assert_close(fresh(x), model(x))


def test_peft_resized_model_saves_and_reloads(calibration, make_tiny, adapt, tmp_path):
    from peft import PeftModel

    model = adapt("peft", make_tiny(), TARGETS, rank=4, alpha=8.0)
    initialize(model, calibration, strategy="input-pca", rank_budget=7)
    ranks = {n: a.rank for n, a in find_adapters(model).items()}
    config = model.peft_config["default"]
    assert config.rank_pattern == ranks
    assert config.alpha_pattern == {n: 2.0 * r for n, r in ranks.items()}  # scaling 8/4 kept
    with torch.no_grad():
        for adapter in find_adapters(model).values():
            adapter.module.lora_B["default"].weight.normal_(0, 0.1)  # stands for training
    model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(make_tiny(), tmp_path)
    assert {n: a.rank for n, a in find_adapters(fresh).items()} == ranks
    for name, adapter in find_adapters(fresh).items():
        assert adapter.scaling == pytest.approx(2.0), name
    x = torch.randn(5, 12)
    torch.testing.assert_close(fresh(x), model(x))
    assert math.isclose(sum(ranks.values()), 7)
