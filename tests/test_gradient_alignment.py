"""``benchmarks/gradient_alignment.py``: the subspace measures against brute force, the
path-gradient hook against autograd, the warm head's optimality, and a smoke run on ``tiny``."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

ga = pytest.importorskip("gradient_alignment")
pytest.importorskip("matplotlib")

import covinit  # noqa: E402


def _spd(k: int, gen: torch.Generator) -> Tensor:
    """A full-rank, ill-conditioned second moment (k, k)."""
    x = torch.randn(4 * k, k, generator=gen, dtype=torch.float64)
    x = x * torch.logspace(0, -1.5, k, dtype=torch.float64)  # anisotropic inputs
    return x.T @ x / (4 * k)


def _brute_force(update: Tensor, basis: Tensor, side: str, m: Tensor | None) -> float:
    """1 − min ‖(ΔW − fit)·M^½‖² / ‖ΔW·M^½‖² by an explicit least-squares fit of the free
    factor (B for input-side A rows, A for output-side B columns)."""
    k = update.shape[1]
    root = torch.eye(k, dtype=torch.float64) if m is None else ga.psd_sqrt(m)
    target = update @ root  # (d, k)
    if side == "input":  # min_B ‖B·(A·M^½) − ΔW·M^½‖: solve (A·M^½)ᵀ·Bᵀ = (ΔW·M^½)ᵀ
        design = (basis @ root).T  # (k, r)
        free = torch.linalg.lstsq(design, target.T).solution  # (r, d)
        fit = (design @ free).T
    else:  # min_A ‖B·A·M^½ − ΔW·M^½‖ over C = A·M^½: solve B·C = ΔW·M^½
        free = torch.linalg.lstsq(basis, target).solution  # (r, k)
        fit = basis @ free
    return 1.0 - float((target - fit).pow(2).sum() / target.pow(2).sum())


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("metric", [False, True])
def test_captured_fraction_matches_brute_force(side: str, metric: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    d, k, r = 9, 14, 3
    m = _spd(k, gen) if metric else None
    root = None if m is None else ga.psd_sqrt(m)
    shape = (r, k) if side == "input" else (d, r)
    for _ in range(5):
        update = torch.randn(d, k, generator=gen, dtype=torch.float64)
        basis = torch.randn(*shape, generator=gen, dtype=torch.float64)
        got = ga.captured_fraction(update, basis, side, root)
        assert got == pytest.approx(_brute_force(update, basis, side, m), abs=1e-10)


@pytest.mark.parametrize("side", ["input", "output"])
def test_update_planted_in_the_subspace_is_captured_fully(side: str) -> None:
    gen = torch.Generator().manual_seed(1)
    d, k, r = 10, 16, 4
    a = torch.randn(r, k, generator=gen, dtype=torch.float64)
    b = torch.randn(d, r, generator=gen, dtype=torch.float64)
    update = b @ a  # rows in span(a), columns in span(b)
    basis = a if side == "input" else b
    root = ga.psd_sqrt(_spd(k, gen))
    assert ga.captured_fraction(update, basis, side) == pytest.approx(1.0, abs=1e-12)
    assert ga.captured_fraction(update, basis, side, root) == pytest.approx(1.0, abs=1e-12)
    # An update orthogonal to the subspace: nothing captured (plain metric).
    q = torch.linalg.qr(basis.T if side == "input" else basis, mode="complete")[0]
    outside = q[:, r:r + 1]  # a direction orthogonal to the basis
    ortho = (torch.randn(d, 1, generator=gen, dtype=torch.float64) @ outside.T
             if side == "input" else outside @ torch.randn(1, k, generator=gen,
                                                            dtype=torch.float64))
    assert ga.captured_fraction(ortho, basis, side) == pytest.approx(0.0, abs=1e-12)


def test_random_subspace_captures_r_over_k() -> None:
    gen = torch.Generator().manual_seed(2)
    d, k, r, n = 12, 20, 5, 400
    update = torch.randn(d, k, generator=gen, dtype=torch.float64)
    got = [ga.captured_fraction(update, torch.randn(r, k, generator=gen, dtype=torch.float64))
           for _ in range(n)]
    # mean of Beta(r/2, (k−r)/2)-like shares: r/k, standard error ≈ 0.2/√n
    assert sum(got) / n == pytest.approx(r / k, abs=0.03)


def test_captured_fraction_rejects_bad_input() -> None:
    update = torch.ones(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="side must be"):
        ga.captured_fraction(update, torch.ones(1, 4), "left")
    with pytest.raises(ValueError, match=r"\(r, k=4\)"):
        ga.captured_fraction(update, torch.ones(1, 3), "input")
    with pytest.raises(ValueError, match="is zero"):
        ga.captured_fraction(torch.zeros(3, 4), torch.ones(1, 4), "input")


def test_subspace_overlap_extremes() -> None:
    eye = torch.eye(6, dtype=torch.float64)
    assert ga.subspace_overlap(eye[:, :2], eye[:, :2] @ torch.tensor(
        [[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)) == pytest.approx(1.0)
    assert ga.subspace_overlap(eye[:, :2], eye[:, 2:4]) == pytest.approx(0.0, abs=1e-12)
    # one of two directions shared: mean cos² = 1/2
    assert ga.subspace_overlap(eye[:, :2], eye[:, 1:3]) == pytest.approx(0.5)


def test_path_gradient_equals_autograd_of_the_base_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model = covinit.add_lora(model, ["0", "2"], rank=2, alpha=4.0)
    covinit.initialize(model, strategy="gaussian", seed=0)  # B ≠ 0: δ passes the adapter
    bases = {name: adapter.module for name, adapter in ga.find_adapters(model).items()}
    weights = {name: next(p for n, p in mod.named_parameters() if n.endswith("weight")
                          and "lora" not in n) for name, mod in bases.items()}
    for w in weights.values():
        w.requires_grad_(True)
    x = torch.randn(2, 7, 5)
    expected = {name: torch.zeros_like(w, dtype=torch.float64) for name, w in weights.items()}
    with ga.path_gradient(model) as acc:
        for _ in range(2):  # two steps: sums
            for w in weights.values():
                w.grad = None
            model(x).pow(2).mean().backward()
            for name, w in weights.items():
                expected[name] += w.grad.to(torch.float64)
        with torch.no_grad():
            model(x)  # no gradient pass: not counted
    assert set(acc) == set(expected)
    for name in expected:
        torch.testing.assert_close(acc[name], expected[name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # hooks removed on exit
        model(x)
    assert all(not m._forward_hooks for m in bases.values())


def test_fit_head_is_stationary() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(200, generator=gen, dtype=torch.float64) > 0).long()
    y[x[:, 1] > 1.0] = 2
    weight, bias = ga.fit_head(x, y, 3, l2=1e-2)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * 1e-2 * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert float(gw.abs().max()) < 1e-6 and float(gb.abs().max()) < 1e-6


def test_smoke_tiny(tmp_path: Path) -> None:
    assert ga.main(["--task", "tiny", "--lr", "0.01", "--out", str(tmp_path)]) == 0
    with (tmp_path / "tiny.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["fc1", "fc2"]
    for row in rows:
        for key, value in row.items():
            if key.startswith(("in_data", "in_plain", "out_data", "out_plain", "in_overlap")):
                assert 0.0 <= float(value) <= 1.0 + 1e-12, key
        assert math.isclose(float(row["r_over_k"]), 4 / int(row["k"]))
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "## tiny" in text and "`grad-whiten-warm`" in text
    assert (tmp_path / "alignment.png").stat().st_size > 0


def test_smoke_without_a_fresh_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task with no fresh head (the causal-LM tasks) skips the warm-head item and says so;
    every other figure is still measured."""
    import dataclasses

    tiny = ga.ci.get_task("tiny")
    headless = dataclasses.replace(tiny, build=lambda s: dataclasses.replace(tiny.build(s),
                                                                             head=[]))
    monkeypatch.setattr(ga.ci, "get_task", lambda name: headless)
    assert ga.main(["--task", "tiny", "--lr", "0.01", "--out", str(tmp_path)]) == 0
    with (tmp_path / "tiny.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["g0_gT_overlap"]) >= 0 for r in rows)
    assert not any(key.startswith("gwarm") for key in rows[0])
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "No fresh head" in text and "Warm head (L2" not in text
