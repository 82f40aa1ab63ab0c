"""Tests of covinit.reporting: the numbers against hand computations, and the files it writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.covariance import OAS, LedoitWolf
from torch import nn

import covinit
from covinit.allocation import allocate_ranks
from covinit.calibration import Calibration, calibrate
from covinit.covariance import estimate
from covinit.reporting import (
    condition_number,
    effective_rank,
    format_table,
    participation_ratio,
    principal_angles,
    report,
)


def _two_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batches(seed: int = 1, n: int = 4, rows: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3, 0.1], dtype=torch.float64)
    return [torch.randn(rows, 6, generator=g, dtype=torch.float64) * scales + 1.0
            for _ in range(n)]


@pytest.fixture
def tiny() -> tuple[nn.Module, list[torch.Tensor], Calibration]:
    model = _two_layer()
    data = _batches()
    cal = calibrate(model, data, targets=["0", "2"], show_progress=False)
    return model, data, cal


# ---------------------------------------------------------------------- spectral helpers
def test_effective_rank_and_participation_ratio_by_hand() -> None:
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert participation_ratio(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert participation_ratio([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    lam = np.array([4.0, 2.0, 1.0, 1.0])
    p = lam / lam.sum()
    assert effective_rank(lam) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert participation_ratio(lam) == pytest.approx(64.0 / 22.0)
    assert participation_ratio(lam) <= effective_rank(lam)
    assert effective_rank(np.zeros(3)) == 0.0 and participation_ratio(np.zeros(3)) == 0.0
    # negative rounding noise is clamped, not fed to the logarithm
    assert effective_rank([1.0, -1e-17]) == pytest.approx(1.0)


def test_condition_number() -> None:
    assert condition_number([8.0, 2.0, 0.5]) == pytest.approx(16.0)
    assert condition_number(torch.tensor([0.5, 8.0])) == pytest.approx(16.0)  # any order
    assert condition_number([1.0, 0.0]) == math.inf
    assert condition_number([1.0, 1e-18]) == math.inf  # numerically singular
    with pytest.raises(ValueError, match="empty"):
        condition_number([])


def test_principal_angles_known_values() -> None:
    for theta in (0.0, 1e-9, 0.3, math.pi / 2):
        u = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
        v = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]], dtype=torch.float64)
        got = float(principal_angles(u, v)[0])
        # tiny angles come from the sines: arccos alone would return ~1e-8 for 1e-9
        assert got == pytest.approx(theta, abs=1e-15, rel=1e-6)
    q = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0]
    mixed = q @ torch.randn(4, 4, dtype=torch.float64)  # same span, other basis
    assert float(principal_angles(q, mixed).max()) < 1e-7
    with pytest.raises(ValueError, match="same k"):
        principal_angles(torch.ones(3, 1), torch.ones(4, 1))


# ---------------------------------------------------------------------- report numbers
def test_numbers_match_a_hand_computation(tiny, tmp_path) -> None:
    _model, data, cal = tiny
    rep = report(cal, None, tmp_path, rank=2, figures=False)
    x = torch.cat(data).numpy()  # the first layer's inputs, exactly
    s = rep.summaries[0]
    assert (s.layer, s.side, s.k, s.n, s.rank, s.rank_source) == ("0", "input", 6, 160, 2,
                                                                   "fixed")
    lam = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)))[::-1]
    np.testing.assert_allclose(s.spectra["empirical"], lam, rtol=1e-10)
    assert s.condition["empirical"] == pytest.approx(lam[0] / lam[-1], rel=1e-9)
    p = lam / lam.sum()
    assert s.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert s.participation_ratio == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-10)
    assert s.explained == pytest.approx(lam[:2].sum() / lam.sum(), rel=1e-10)
    lw, oas = LedoitWolf().fit(x), OAS().fit(x)
    assert s.shrinkage["ledoit_wolf"] == pytest.approx(lw.shrinkage_, rel=1e-8)
    assert s.shrinkage["oas"] == pytest.approx(oas.shrinkage_, rel=1e-8)
    lam_lw = np.sort(np.linalg.eigvalsh(lw.covariance_))[::-1]
    np.testing.assert_allclose(s.spectra["ledoit_wolf"], lam_lw, rtol=1e-8)
    assert s.condition["ledoit_wolf"] == pytest.approx(lam_lw[0] / lam_lw[-1], rel=1e-8)
    assert s.condition["ledoit_wolf"] < s.condition["empirical"]  # shrinkage conditions
    assert s.angles_deg is None and s.spatpca is None
    # the output side of the last layer is (n, 3): full rank, rank capped at min(d, k) = 3
    last = rep.summaries[-1]
    assert (last.layer, last.side, last.k) == ("2", "output", 3)


def test_other_estimators_use_their_own_spectra(tiny, tmp_path) -> None:
    _, _, cal = tiny
    rep = report(cal, None, tmp_path, rank=2, figures=False,
                 estimators=("ledoit_wolf", "nonlinear"))
    s = rep.summaries[0]
    assert list(s.spectra) == ["empirical", "ledoit_wolf", "nonlinear"]
    want = estimate(cal.moments("0", "input"), "nonlinear").eigenvalues.numpy()
    np.testing.assert_allclose(s.spectra["nonlinear"], want)


def _model_with_known_weight(r: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor,
                                                             torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    u = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
    sing = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        model[0].weight.copy_((u * sing) @ v[:, :6].T)
    return model, u, v


@pytest.mark.parametrize("offset, expected", [(0, 0.0), (3, 90.0)])
def test_principal_angle_zero_when_data_lie_in_w0s_top_subspace(tmp_path, offset,
                                                                expected) -> None:
    r = 3
    model, _, v = _model_with_known_weight(r)
    g = torch.Generator().manual_seed(2)
    basis = v[:, offset:offset + r]  # offset 0: W0's top-r right singular vectors
    data = [torch.randn(50, r, generator=g, dtype=torch.float64) @ basis.T * 2.0 + 0.5
            for _ in range(3)]
    cal = calibrate(model, data, targets=["0"], sides=("input",), show_progress=False)
    rep = report(cal, model, tmp_path, rank=r, figures=False)
    (s,) = rep.summaries
    assert s.angles_deg is not None and len(s.angles_deg) == r
    assert max(s.angles_deg) == pytest.approx(expected, abs=1e-6)
    assert s.max_angle_deg == max(s.angles_deg)


def test_output_side_angles_use_left_singular_vectors(tmp_path) -> None:
    model, _u, v = _model_with_known_weight(2)
    g = torch.Generator().manual_seed(3)
    # inputs along v_1, v_2 → outputs along u_1, u_2 (W0·v_i = s_i·u_i), plus the bias
    data = [torch.randn(40, 2, generator=g, dtype=torch.float64) @ v[:, :2].T
            for _ in range(2)]
    cal = calibrate(model, data, targets=["0"], show_progress=False)
    rep = report(cal, model, tmp_path, rank=2, figures=False)
    out = next(s for s in rep.summaries if s.side == "output")
    assert out.max_angle_deg == pytest.approx(0.0, abs=1e-6)


def test_residual_model_is_compared_with_the_original_w0(tiny, tmp_path) -> None:
    model, _data, cal = tiny
    plain = report(cal, model, tmp_path / "plain", rank=2, figures=False)
    adapted = covinit.add_lora(_two_layer(), ["0", "2"], rank=2, alpha=4)
    covinit.initialize(adapted, strategy="pissa")  # base becomes W0 − c·B·A
    rep = report(cal, adapted, tmp_path / "pissa", rank=2, figures=False)
    for a, b in zip(plain.summaries, rep.summaries, strict=True):
        np.testing.assert_allclose(a.angles_deg, b.angles_deg, atol=1e-6)
        assert b.rank_source == "adapter"


def test_rank_budget_marks_the_allocation(tiny, tmp_path) -> None:
    _, _, cal = tiny
    rep = report(cal, None, tmp_path, rank=2, rank_budget=5, figures=False)
    spectra = {n: estimate(cal.moments(n, "input"), "ledoit_wolf").eigenvalues
               for n in cal.layer_names}
    caps = {"0": 4, "2": 3}  # 2·rank, at most min(d, k)
    want = allocate_ranks(spectra, 5, min_rank=1, max_rank=caps)
    got = {s.layer: s.rank for s in rep.summaries if s.side == "input"}
    assert got == want and sum(got.values()) == 5
    assert all(s.rank_source == "budget" for s in rep.summaries)
    assert "*" in format_table(rep.summaries)


def test_spatpca_with_folds_and_with_fixed_parameters(tmp_path) -> None:
    model = _two_layer()
    data = _batches(n=6)
    cal = calibrate(model, data, targets=["0"], sides=("input",), folds=3,
                    show_progress=False)
    rep = report(cal, None, tmp_path, rank=2, figures=False)  # auto: folds present
    (s,) = rep.summaries
    assert s.spatpca is not None and s.loadings is not None
    assert s.loadings.shape == (6, 2)
    assert set(s.spatpca) >= {"tau1", "tau2", "gamma", "noise", "angle_to_pca_deg"}
    want = estimate(cal.moments("0", "input"), "spatpca", folds=cal.folds("0", "input"),
                    rank=2)
    assert s.spatpca["tau1"] == want.params["tau1"]
    assert s.spatpca["gamma"] == want.params["gamma"]
    # no folds: fixed parameters fit without cross-validation; the defaults cannot
    plain = calibrate(model, data, targets=["0"], sides=("input",), show_progress=False)
    fixed = report(plain, None, tmp_path / "fixed", rank=2, figures=False,
                   spatpca={"tau1": 0.0, "gamma": 0.0})
    assert fixed.summaries[0].spatpca["angle_to_pca_deg"] == pytest.approx(0.0, abs=1e-5)
    assert report(plain, None, tmp_path / "none", figures=False).summaries[0].spatpca is None
    with pytest.raises(ValueError, match="folds"):
        report(plain, None, tmp_path / "bad", rank=2, figures=False, spatpca=True)
    off = report(cal, None, tmp_path / "off", rank=2, figures=False, spatpca=False)
    assert off.summaries[0].spatpca is None


# ---------------------------------------------------------------------- files
def test_writes_png_html_markdown_json(tiny, tmp_path) -> None:
    model, _, cal = tiny
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    rep = report(path, model, tmp_path / "out", rank=2, title="tiny <report>")
    assert [p.name for p in rep.figures] == ["overview.png", "0__input.png", "0__output.png",
                                             "2__input.png", "2__output.png"]
    for png in rep.figures:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = rep.html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 5
    assert 'src="figures/' not in page  # self-contained
    assert "tiny &lt;report&gt;" in page and "∠W0" in page
    md = rep.markdown.read_text(encoding="utf-8")
    assert md.startswith("# tiny <report>")
    assert "| layer | side | k |" in md and "![0 input](figures/0__input.png)" in md
    doc = json.loads(rep.json.read_text(encoding="utf-8"))
    assert [(d["layer"], d["side"]) for d in doc["layers"]] == \
        [(s.layer, s.side) for s in rep.summaries]
    assert doc["layers"][0]["figure"] == "figures/0__input.png"


def test_figure_limits(tiny, tmp_path) -> None:
    _, _, cal = tiny
    none = report(cal, None, tmp_path / "a", rank=2, figures=False)
    assert none.figures == [] and "base64" not in none.html.read_text(encoding="utf-8")
    one = report(cal, None, tmp_path / "b", rank=2, max_figures=1, layers=["2"],
                 sides=["input"])
    assert [p.name for p in one.figures] == ["overview.png", "2__input.png"]
    assert [(s.layer, s.side) for s in one.summaries] == [("2", "input")]


def test_format_table(tiny, tmp_path) -> None:
    model, _, cal = tiny
    rep = report(cal, model, tmp_path, rank=2, figures=False)
    lines = format_table(rep.summaries).splitlines()
    assert lines[0].split()[:5] == ["layer", "side", "k", "n", "r"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(rep.summaries)
    assert rep.table() == "\n".join(lines)
    assert format_table([]) == "(no layer sides)"


def test_errors_name_the_problem(tiny, tmp_path) -> None:
    _model, _, cal = tiny
    with pytest.raises(ValueError, match="unknown estimator 'bogus'"):
        report(cal, None, tmp_path, estimators=("bogus",), figures=False)
    with pytest.raises(ValueError, match="layer 'nope' was not calibrated"):
        report(cal, None, tmp_path, layers=["nope"], figures=False)
    with pytest.raises(ValueError, match="matches no calibrated layer"):
        report(cal, None, tmp_path, layers="^zzz", figures=False)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        report(cal, None, tmp_path, rank=0, figures=False)
    with pytest.raises(ValueError, match="does not match the model"):
        report(cal, nn.Sequential(nn.Linear(6, 5)), tmp_path, figures=False)
    only_in = calibrate(_two_layer(), _batches(), targets=["0"], sides=("input",),
                        show_progress=False)
    with pytest.raises(ValueError, match="side 'output' is not in the calibration"):
        report(only_in, None, tmp_path, sides=["output"], figures=False)


def test_grid_geometry_loadings_are_drawn_as_images(tmp_path) -> None:
    model = _two_layer()
    cal = calibrate(model, _batches(n=6), targets=["0"], sides=("input",), folds=3,
                    show_progress=False)
    rep = report(cal, None, tmp_path, rank=2, spatpca={"geometry": ("grid", 2, 3)})
    (s,) = rep.summaries
    assert s.spatpca["grid"] == [2, 3] and s.spatpca["geometry"] == "grid"
    assert (tmp_path / "figures" / "0__input.png").read_bytes()[:4] == b"\x89PNG"
    chain = report(cal, None, tmp_path / "chain", rank=2, figures=False)
    assert chain.summaries[0].spatpca["grid"] is None


def test_package_stages_and_docstring_example() -> None:
    """covinit.reporting is a package of stages; covinit.report is its function."""
    import doctest
    import importlib

    package = importlib.import_module("covinit.reporting")
    assert covinit.report is package.report is report
    result = doctest.testmod(package, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
    for stage in ("plan", "summaries", "figures", "render"):
        assert importlib.import_module(f"covinit.reporting.{stage}").__all__
