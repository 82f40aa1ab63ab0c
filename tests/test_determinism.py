"""Determinism (issue 8): same data and seed ⇒ bitwise-identical A, B (and residual bases) on
CPU for every strategy, also in another process; statistics and initializations independent
of batch size and batch order (statistics to 1e-10).

Covered elsewhere: the raw statistics of one encoder under re-batching (test_calibration),
per-layer seeding (test_initialize), sign conventions (test_strategies_cov).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyNet, adapt_model
from torch import Tensor

import covinit
from covinit import calibrate, find_adapters, initialize
from covinit.inits import _REGISTRY

TARGETS = ["query", "dense", "head"]
# Strategies on gradient statistics: tests/test_strategies_grad.py (own calibration).
STRATEGIES = [n for n in covinit.strategies() if "gradient" not in _REGISTRY.get(n).tags["needs"]]
RANDOM = [e.name for e in _REGISTRY if e.name in ("kaiming", "gaussian")]


def _data(seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A large common offset and unequal scales: the regime where order effects would show.
    return torch.randn(96, 12, generator=gen) * torch.linspace(0.1, 3.0, 12) + 50.0


def _model(kind: str = "covinit", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)  # weights of TinyNet
    return adapt_model(kind, TinyNet().to(dtype).eval(), TARGETS, rank=3)


def _run(strategy: str, batches: list[Tensor], seed: int = 5, kind: str = "covinit",
         estimator: str = "ledoit_wolf") -> dict[str, list[Tensor]]:
    dtype = batches[0].dtype
    cal = calibrate(_model(kind, dtype), batches, show_progress=False)
    model = _model(kind, dtype)
    initialize(model, cal, strategy=strategy, seed=seed, estimator=estimator)
    return {name: [*a.get_lora(), a.base_weight()] for name, a in find_adapters(model).items()}


def _bitwise(x: dict[str, list[Tensor]], y: dict[str, list[Tensor]]) -> bool:
    return x.keys() == y.keys() and all(
        torch.equal(a, b) for n in x for a, b in zip(x[n], y[n], strict=True))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_data_and_seed_give_bitwise_identical_factors(strategy):
    batches = list(_data().split(32))
    first = _run(strategy, batches)
    torch.manual_seed(999)  # a different global RNG state: must not matter
    torch.randn(17)
    assert _bitwise(first, _run(strategy, batches))


@pytest.mark.parametrize("kind", ["peft", "loralib"])
def test_other_adapter_implementations_are_deterministic_and_agree(kind):
    batches = list(_data().split(32))
    for strategy in ("gaussian", "cov-svd"):
        ours = _run(strategy, batches)
        theirs = _run(strategy, batches, kind=kind)
        assert _bitwise(theirs, _run(strategy, batches, kind=kind))
        assert _bitwise(ours, theirs)  # same layers, same seeds ⇒ same numbers


@pytest.mark.parametrize("strategy", RANDOM)
def test_seed_changes_random_parts_and_only_those(strategy):
    batches = list(_data().split(32))
    a, b = _run(strategy, batches, seed=5), _run(strategy, batches, seed=6)
    for name in a:
        assert not torch.equal(a[name][0], b[name][0])  # A drawn from the layer's generator
        assert torch.equal(a[name][1], b[name][1])  # B = 0 either way


@pytest.mark.parametrize("strategy", ["input-pca", "cov-svd", "two-sided"])
def test_deterministic_strategies_do_not_depend_on_the_seed(strategy):
    batches = list(_data().split(32))
    assert _bitwise(_run(strategy, batches, seed=5), _run(strategy, batches, seed=6))


def test_statistics_independent_of_batch_size_and_order():
    """A float64 model, so that the model's own rounding (fp32 GEMMs round differently for
    different batch shapes, ~1e-7) is not mistaken for the statistics'."""
    x = _data().double()
    splits = [x.split(96), x.split(1), x.split(7), list(reversed(x.split(13))),
              [x[torch.randperm(96, generator=torch.Generator().manual_seed(4))]]]
    cals = [calibrate(_model(dtype=torch.float64), list(s), show_progress=False)
            for s in splits]
    for layer in cals[0].layer_names:
        for side in ("input", "output"):
            ref = cals[0].moments(layer, side)
            for cal in cals[1:]:
                m = cal.moments(layer, side)
                assert m.n == ref.n == 96
                for key in ("mean", "m2", "t", "q"):
                    got, want = getattr(m, key), getattr(ref, key)
                    scale = float(want.abs().max())
                    assert float((got - want).abs().max()) <= 1e-10 * scale, (layer, side, key)


@pytest.mark.parametrize("estimator", ["empirical", "ledoit_wolf", "oas", "nonlinear"])
@pytest.mark.parametrize("strategy", ["input-pca", "input-whiten", "cov-svd", "two-sided"])
def test_factors_independent_of_batch_size_and_order(strategy, estimator):
    """The factors follow the statistics: batchings that change them only by rounding give
    the same A, B (signs are fixed, the spectrum is well separated by the unequal scales).
    Float64 model: see the test above."""
    x = _data().double()
    ref = _run(strategy, list(x.split(96)), estimator=estimator)
    other = _run(strategy, list(reversed(x.split(5))), estimator=estimator)
    # Linear shrinkage bounds the condition number of Σ^(-1/2); without it, the uncentred
    # second moment of these inputs (mean 50, spreads 0.1–3) has κ ~ 1e6 and the statistics'
    # 1e-16-level differences come out amplified to ~1e-7 in cov-svd / two-sided.
    tol = 1e-9 if estimator in ("ledoit_wolf", "oas") else 1e-5
    for name in ref:
        for a, b in zip(ref[name], other[name], strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(a.abs().max()))


_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import test_determinism as t
out = {{}}
for s in ("gaussian", "input-whiten", "cov-minor"):
    res = t._run(s, list(t._data().split(32)))
    out[s] = {{n: [v.double().flatten().tolist() for v in vs] for n, vs in res.items()}}
print(json.dumps(out))
"""


def test_bitwise_identical_in_another_process_with_another_hash_seed():
    """Per-layer seeds are CRC-32 based, not Python's salted hash: a fresh interpreter with a
    different PYTHONHASHSEED reproduces the factors bit for bit."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for strategy, layers in theirs.items():
        mine = _run(strategy, list(_data().split(32)))
        for name, values in layers.items():
            for got, want in zip(values, mine[name], strict=True):
                assert torch.equal(torch.tensor(got, dtype=torch.float64),
                                   want.double().flatten()), (strategy, name)
