"""scale="matched": the first Adam step of every non-zero init moves the layer like Kaiming's.

The formulas of :mod:`covinit.matched` are checked against brute force and Monte Carlo; the
claim itself against real ``torch.optim.AdamW`` steps through autograd (not the formulas) on
a synthetic layer and on real MiniLM layers with PEFT LoRA, with gradient statistics from an
independent hook-based collector (``tests/_gradfake.py``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _gradfake import GradCalibration, adam_step_energy
from torch import Tensor, nn

from covinit import add_lora, initialize
from covinit.matched import (
    _step_terms,
    closed_form_gain,
    first_step_energy,
    kaiming_step_energy,
    matched_gain,
    step_ratio,
)
from covinit.stats import Moments

LR = 1e-3
#: (strategy, options) for every init that starts with a non-zero factor.
MATCHED_CASES = [
    ("input-pca", {}), ("input-whiten", {}), ("output-pca", {}), ("cov-svd", {"lr": LR}),
    ("cov-minor", {"lr": LR}), ("two-sided", {"lr": LR}), ("pissa", {"lr": LR}),
    ("grad-svd", {}), ("grad-whiten", {}), ("kfac", {}), ("kfac", {"residual": True, "lr": LR}),
    ("lora-ga", {"lr": LR}),
]
IDS = [f"{s}{'-residual' if o.get('residual') else ''}" for s, o in MATCHED_CASES]


def _structured(seed: int = 0, d: int = 20, k: int = 16, n: int = 400) -> tuple[Tensor, Tensor]:
    """G with rows sharing two directions, one the inputs' mean (as real gradients do), and
    M with a large mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2, k) + 1.5
    basis = torch.randn(2, k, generator=g, dtype=torch.float64)
    basis[0] = 1.0  # the inputs' mean direction, as G = Σ δ·xᵀ inherits it
    grad = torch.randn(d, 2, generator=g, dtype=torch.float64) @ basis \
        + 0.2 * torch.randn(d, k, generator=g, dtype=torch.float64)
    return grad, x.T @ x / n


# ---------------------------------------------------------------------- the formulas
def test_step_terms_match_brute_force():
    """p, q, t against the d×k matrices, and the exact Adam-sign step energy."""
    grad, m = _structured()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 16, generator=g, dtype=torch.float64)
    b = torch.randn(20, 3, generator=g, dtype=torch.float64)
    sb, sa = torch.sign(grad @ a.T), torch.sign(b.T @ grad)
    p_mat, q_mat = sb @ a + b @ sa, sb @ sa
    p, q, t = _step_terms(a, b, grad, m)
    assert p == pytest.approx(float(torch.trace(p_mat @ m @ p_mat.T)), rel=1e-12)
    assert q == pytest.approx(float(torch.trace(p_mat @ m @ q_mat.T)), rel=1e-12)
    assert t == pytest.approx(float(torch.trace(q_mat @ m @ q_mat.T)), rel=1e-12)
    assert first_step_energy(a, b, grad, m) == p
    lr = 0.05
    delta = (b - lr * sb) @ (a - lr * sa) - b @ a  # one sign step on both factors
    assert float(torch.trace(delta @ m @ delta.T)) == pytest.approx(
        lr * lr * (p - 2 * lr * q + lr * lr * t), rel=1e-10)


def test_kaiming_expectation_matches_monte_carlo():
    """Formula (2) against 3000 Kaiming-uniform draws; the diagonal term alone is far off
    when the gradient's rows share directions (so the cross term is needed)."""
    grad, m = _structured(d=40, k=64)
    r, gen = 8, torch.Generator().manual_seed(2)
    draws = []
    for _ in range(3000):
        a = torch.empty(r, 64, dtype=torch.float64)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        draws.append(first_step_energy(a, torch.zeros(40, r, dtype=torch.float64), grad, m))
    mc = sum(draws) / len(draws)
    assert kaiming_step_energy(grad, m, r) == pytest.approx(mc, rel=0.03)
    diagonal = kaiming_step_energy(None, m, r, d=40)
    assert diagonal < 0.6 * mc


def test_gains_hit_their_targets():
    grad, m = _structured()
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64)
    zero_b = torch.zeros(20, 4, dtype=torch.float64)
    target = float(torch.trace(m)) / (3 * 16)
    whole = a * closed_form_gain(a, m, "L")
    assert float(torch.trace(whole @ m @ whole.T)) == pytest.approx(4 * target, rel=1e-12)
    unit = a * closed_form_gain(a, m, "L", per_unit=True)
    torch.testing.assert_close(((unit @ m) * unit).sum(dim=1),
                               torch.full((4,), target, dtype=torch.float64))
    gamma = matched_gain(a, zero_b, grad, m, "L")
    assert step_ratio(gamma * a, zero_b, grad, m) == pytest.approx(1.0, rel=1e-12)
    b = torch.randn(20, 4, generator=g, dtype=torch.float64)
    lr = 0.01
    gamma = matched_gain(a, b, grad, m, "L", lr=lr)  # second-order root
    p, q, t = _step_terms(gamma * a, gamma * b, grad, m)
    assert p - 2 * lr * q + lr * lr * t == pytest.approx(kaiming_step_energy(grad, m, 4),
                                                         rel=1e-10)
    with pytest.raises(ValueError, match=r"layer 'L'.*would not move"):
        matched_gain(a, zero_b, torch.zeros(20, 16, dtype=torch.float64), m, "L")


def test_second_moment_is_uncentred():
    x = torch.randn(50, 5, dtype=torch.float64) + 2.0
    torch.testing.assert_close(Moments.from_batch(x).second_moment(), x.T @ x / 50)


# ---------------------------------------------------------------------- real Adam steps
K, D = 32, 24


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(K, D), nn.Tanh(), nn.Linear(D, 3))


def _task() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(K, K, generator=g) * torch.logspace(0, -1.5, K)[:, None]
    return torch.randn(256, K, generator=g) @ mix + 1.0, torch.randint(0, 3, (256,), generator=g)


def _ce(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def synthetic():
    batch = _task()
    cal = GradCalibration.collect(_net(), [batch], _ce, targets=["0"])

    def energy(strategy: str, seed: int = 0, calibration=cal, **options) -> float:
        model = add_lora(_net(), ["0"], rank=4, alpha=8.0)
        initialize(model, calibration, strategy=strategy, seed=seed, **options)
        return adam_step_energy(model, batch, _ce, lr=LR)["0"]

    kaiming = sum(energy("kaiming", seed=s) for s in range(16)) / 16
    return cal, energy, kaiming


@pytest.mark.parametrize(("strategy", "options"), MATCHED_CASES, ids=IDS)
def test_matched_step_is_kaimings_on_a_synthetic_layer(strategy, options, synthetic):
    _, energy, kaiming = synthetic
    ratio = math.sqrt(energy(strategy, scale="matched", **options) / kaiming)
    assert 0.75 < ratio < 1.25, f"{strategy}: step {ratio:.2f}× Kaiming's"


def test_unmatched_steps_are_not_kaimings(synthetic):
    """Without the matched scale the same inits step several times further (the test
    above would fail without it)."""
    _, energy, kaiming = synthetic
    for strategy in ("input-pca", "cov-svd", "lora-ga"):
        assert math.sqrt(energy(strategy) / kaiming) > 2.0, strategy


def test_closed_form_without_gradient_side(synthetic):
    """B = 0 inits match without a gradient side (closed form); A = 0 and residual inits
    refuse with an error that says what to collect."""
    cal, energy, kaiming = synthetic
    no_grad = GradCalibration(cal.rows, sides=("input", "output"))
    for mode in ("matched", "matched-unit"):
        ratio = math.sqrt(energy("input-pca", calibration=no_grad, scale=mode) / kaiming)
        assert 0.75 < ratio < 1.25, (mode, ratio)
    model = add_lora(_net(), ["0"], rank=4)
    for strategy in ("output-pca", "cov-svd", "pissa"):
        with pytest.raises(ValueError, match=r"layer '0' needs gradient statistics.*"
                                             r"sides including 'gradient'"):
            initialize(model, no_grad, strategy=strategy, scale="matched")
    with pytest.raises(ValueError, match=r"scale='matched-unit' is not allowed.*\['matched'\]"):
        initialize(model, cal, strategy="cov-svd", scale="matched-unit")
    with pytest.raises(ValueError, match="closed form for B = 0 inits; layer '0'"):
        initialize(model, cal, strategy="kfac", residual=True, scale="matched-unit")
    with pytest.raises(ValueError, match="lr= must be a positive"):
        initialize(model, cal, strategy="pissa", scale="matched", lr=-1.0)


@pytest.mark.parametrize("strategy", ["pissa", "cov-svd", "two-sided"])
def test_matched_residual_keeps_the_function(strategy, synthetic):
    """A←γA, B←γB, base = W0 − c·γ²·B·A: the output is unchanged at step 0."""
    cal, _, _ = synthetic
    x = _task()[0][:32]
    model = add_lora(_net(), ["0"], rank=4)
    with torch.no_grad():
        before = model(x)
    info = initialize(model, cal, strategy=strategy, scale="matched", lr=LR)
    with torch.no_grad():
        after = model(x)
    assert float((after - before).norm() / before.norm()) < 1e-5
    plain = add_lora(_net(), ["0"], rank=4)
    assert info["0"]["residual"]
    assert info["0"]["delta_norm"] < initialize(plain, cal, strategy=strategy)["0"]["delta_norm"]


# ---------------------------------------------------------------------- real MiniLM
MINILM_LAYERS = [f"bert.encoder.layer.{i}.{name}" for i in (0, 5) for name in (
    "attention.self.query", "attention.self.value", "intermediate.dense", "output.dense")]


def _mask(batch: dict) -> Tensor:
    return batch["attention_mask"].bool()


def _loss(model: nn.Module, batch: dict) -> Tensor:
    return model(**batch).loss


@pytest.fixture(scope="module")
def minilm():
    from peft import LoraConfig, get_peft_model

    try:
        import zoo  # benchmarks/zoo.py, on the test path
    except ImportError:  # before it moved out of the library
        from covinit import zoo  # type: ignore[no-redef]

    torch.manual_seed(0)
    try:
        model, tok = zoo.load_minilm()
    except ImportError as err:  # the model package is optional
        pytest.skip(str(err))
    train = zoo.rotten_tomatoes(seed=0, n_train=16)["train"]
    batch = next(iter(zoo.text_classification_loader(tok, train, batch_size=16, max_length=32,
                                                      shuffle=False, seed=0)))
    cal = GradCalibration.collect(model, [batch], _loss, targets=MINILM_LAYERS, keep=_mask)

    def energy(strategy: str, seed: int = 0, calibration=cal, **options) -> dict[str, float]:
        config = LoraConfig(r=8, lora_alpha=8, target_modules=MINILM_LAYERS)
        peft_model = get_peft_model(copy.deepcopy(model), config)
        initialize(peft_model, calibration, strategy=strategy, seed=seed, **options)
        return adam_step_energy(peft_model, batch, _loss, lr=LR, keep=_mask)

    runs = [energy("kaiming", seed=s) for s in range(6)]
    kaiming = {n: sum(r[n] for r in runs) / len(runs) for n in MINILM_LAYERS}
    return cal, energy, kaiming


def _ratios(energies: dict[str, float], kaiming: dict[str, float]) -> dict[str, float]:
    return {n: math.sqrt(energies[n] / kaiming[n]) for n in kaiming}


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "options"), MATCHED_CASES, ids=IDS)
def test_matched_step_is_kaimings_on_minilm(strategy, options, minilm):
    """One real AdamW step (lr 1e-3, PEFT LoRA r 8) on 8 MiniLM layers: every layer's output
    change within 25% of Kaiming's (mean of 6 seeds)."""
    _, energy, kaiming = minilm
    ratios = _ratios(energy(strategy, scale="matched", **options), kaiming)
    bad = {n: round(v, 2) for n, v in ratios.items() if not 0.75 < v < 1.25}
    assert not bad, f"{strategy}: {bad}"


@pytest.mark.slow
def test_closed_form_on_minilm(minilm):
    """Without the gradient side the B = 0 closed form stays within 25% on MiniLM too,
    while unit rows step 5-16× further."""
    cal, energy, kaiming = minilm
    no_grad = GradCalibration(cal.rows, sides=("input", "output"))
    for mode in ("matched", "matched-unit"):
        ratios = _ratios(energy("input-pca", calibration=no_grad, scale=mode), kaiming)
        assert all(0.75 < v < 1.25 for v in ratios.values()), (mode, ratios)
    assert min(_ratios(energy("input-pca", calibration=no_grad), kaiming).values()) > 3.0


# ---------------------------------------------------------------------- covinit.calibrate, report
def _tiny_batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(32, 12, generator=g) + 0.3 for _ in range(3)]


def _tiny_loss(outputs: Tensor, batch: Tensor) -> Tensor:
    return nn.functional.cross_entropy(outputs, batch[:, 0].gt(0).long())


def _gradient_calibration(model: nn.Module):
    import inspect

    from covinit import calibrate

    if "loss_fn" not in inspect.signature(calibrate).parameters:
        pytest.skip("covinit.calibrate has no gradient side yet")
    return calibrate(model, _tiny_batches(), targets=["query", "dense", "head"],
                     sides=("input", "output", "gradient"), loss_fn=_tiny_loss,
                     show_progress=False)


def test_covinit_calibration_feeds_the_strategies(make_tiny):
    """covinit's own gradient side gives the same G as the hook reference, and every
    matched strategy runs on it."""
    cal = _gradient_calibration(make_tiny())
    ref = GradCalibration.collect(make_tiny(), _tiny_batches(),
                                  lambda m, b: _tiny_loss(m(b), b))
    for name in ("block.query", "block.dense", "head"):
        torch.testing.assert_close(cal.gradient(name).double(), ref.gradient(name),
                                   rtol=1e-6, atol=1e-9)
    for strategy, options in MATCHED_CASES:
        if strategy == "lora-ga":
            options = {**options, "scale": "matched"}
            model = add_lora(make_tiny(), ["query", "dense", "head"], rank=2)
        else:
            options = {"scale": "matched", **options}
            model = add_lora(make_tiny(), ["query", "dense", "head"], rank=3)
        initialize(model, cal, strategy=strategy, **options)


def test_report_shows_the_step_ratio(make_tiny, tmp_path):
    from covinit import report

    cal = _gradient_calibration(make_tiny())
    model = add_lora(make_tiny(), ["query", "dense", "head"], rank=3)
    initialize(model, cal, strategy="input-pca")
    unit = {s.layer: s.step_ratio for s in report(cal, model, tmp_path, figures=False).summaries
            if s.side == "input"}
    assert all(v > 1.5 for v in unit.values()), unit
    initialize(model, cal, strategy="input-pca", scale="matched")
    rep = report(cal, model, tmp_path, figures=False)
    matched = [s.step_ratio for s in rep.summaries if s.side == "input"]
    assert matched == pytest.approx([1.0] * 3, rel=1e-6)  # A stored in float32
    assert all(s.step_ratio is None for s in rep.summaries if s.side != "input")
    assert "step/K" in rep.table()
    import json

    rows = json.loads(rep.json.read_text())["layers"]
    assert [r["step_ratio"] for r in rows if r["side"] == "input"] == pytest.approx(matched)
    # Without a model there is no adapter to measure: no column.
    assert "step/K" not in report(cal, None, tmp_path, figures=False).table()
