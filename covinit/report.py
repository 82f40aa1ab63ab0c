"""Look inside a calibration: spectra, effective ranks, shrinkage, smooth PCA, PiSSA angles.

:func:`report` turns a :class:`~covinit.calibration.Calibration` (and optionally the model it
was collected on) into one PNG figure per layer side, an overview figure, one
self-contained HTML page (the images are base64-embedded, no network needed), a Markdown
summary and a JSON file with the numbers.  :func:`format_table` prints the same numbers as
a terminal table.

What is reported, per layer and side (``"input"`` = the rows ``x`` the layer multiplies,
``"output"`` = ``W0·x + b``), with ``S = M2/n`` the empirical covariance, ``λ_1 ≥ … ≥ λ_k``
its eigenvalues and ``p_i = λ_i⁺ / Σ_j λ_j⁺``:

effective rank
    ``exp(−Σ p_i·log p_i)``, the exponential of the spectral entropy (Roy & Vetterli 2007):
    ``k`` for an isotropic spectrum, 1 when one direction carries all the variance.
participation ratio
    ``(Σ λ_i)² / Σ λ_i²``, the same idea weighted towards the large eigenvalues; always
    ``≤`` the effective rank.
explained variance at r
    ``Σ_{i≤r} p_i``: the share of the side's variance in its top-``r`` directions, ``r``
    being the LoRA rank (marked on the curve).
condition number
    ``λ_1 / λ_k`` of each estimator's spectrum; ``inf`` when ``λ_k ≤ k·ε·λ_1`` (a singular
    empirical covariance, e.g. fewer positions than features).  Shrinkage is what makes it
    finite.
shrinkage
    Ledoit-Wolf's and OAS's intensity ``s`` in ``(1−s)·S + s·μ·I`` (see
    :mod:`covinit.estimators`).  Shrinking towards ``μI`` maps the eigenvalues affinely,
    ``λ ↦ (1−s)·λ + s·μ``, and keeps the eigenvectors, so the spectra drawn for these
    estimators come from one eigendecomposition.
SpatPCA
    With per-fold statistics (``calibrate(..., folds=M)``) or fixed ``tau1`` / ``tau2`` /
    ``gamma``: the cross-validated roughness weight τ1, L1 weight τ2, eigenvalue shrinkage
    γ, noise level σ² and a heatmap of the smooth loadings Φ (k, r) (:mod:`covinit.smoothpca`).
principal angles to W0 (with a model)
    Between the top-``r`` eigenvectors of the side's covariance (the directions EVA-like
    ``input-pca`` puts into A) and W0's top-``r`` right singular vectors (input side) or
    left singular vectors (output side) — the subspaces PiSSA uses.  0° means the data and
    the weights agree; 90° means the data's main directions are ones W0 ignores.  For a
    layer whose base a residual strategy replaced, W0 is the *original* weight, restored from
    :mod:`covinit.export`'s record (without a record — a model reloaded from a file — the
    current base is used).
first-step ratio (with a LoRA model, input side)
    How far Adam's first step would move the layer's output, as a multiple of Kaiming's
    expected first step at the same rate (RMS over the calibration positions), from the
    adapter's current A and B: exact (first order in lr) with a gradient side, the closed
    form ``√(tr(A·M·Aᵀ) / (r·tr(M)/(3k)))`` for ``B = 0`` adapters without one
    (:mod:`covinit.matched`).  1.0 is what ``scale="matched"`` aims at.
rank
    The LoRA rank marked on the curves: ``rank=``, or each adapter's own rank when the model
    has LoRA layers, or the allocation :func:`covinit.allocation.allocate_ranks` makes from
    the input spectra when ``rank_budget=`` is given (as ``initialize(rank_budget=...)``).

Example
-------
>>> import tempfile, torch
>>> from torch import nn
>>> from covinit import calibrate, report
>>> model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
>>> cal = calibrate(model, [torch.randn(32, 6) for _ in range(3)], targets=["0", "2"],
...                 show_progress=False)
>>> rep = report(cal, model, tempfile.mkdtemp(), rank=2, figures=False)
>>> [(s.layer, s.side) for s in rep.summaries][:2]
[('0', 'input'), ('0', 'output')]
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from covinit.calibration import Calibration

__all__ = [
    "Report",
    "SideSummary",
    "condition_number",
    "effective_rank",
    "format_table",
    "participation_ratio",
    "principal_angles",
    "report",
]

_AFFINE = ("empirical", "ledoit_wolf", "oas")
_COLORS = {"empirical": "#444444", "ledoit_wolf": "#1f77b4", "oas": "#ff7f0e",
           "nonlinear": "#2ca02c", "spatpca": "#d62728"}


# ---------------------------------------------------------------------- spectral numbers
def _spectrum(eigenvalues: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    lam = np.asarray(torch.as_tensor(eigenvalues, dtype=torch.float64).cpu(), dtype=np.float64)
    if lam.ndim != 1:
        raise ValueError(f"eigenvalues must be a 1-D array, got shape {lam.shape}")
    return lam


def effective_rank(eigenvalues: Tensor | np.ndarray | Sequence[float]) -> float:
    """``exp(−Σ p_i·log p_i)`` with ``p_i = λ_i⁺ / Σ λ_j⁺`` (Roy & Vetterli 2007).

    Parameters
    ----------
    eigenvalues : array-like, shape (k,)
        Any order; negative rounding noise is clamped to 0.

    Returns
    -------
    float
        In ``[1, k]``; 0.0 for an all-zero spectrum (constant activations).
    """
    lam = np.clip(_spectrum(eigenvalues), 0.0, None)
    total = lam.sum()
    if not total > 0.0:
        return 0.0
    p = lam[lam > 0.0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def participation_ratio(eigenvalues: Tensor | np.ndarray | Sequence[float]) -> float:
    """``(Σ λ_i)² / Σ λ_i²`` of the clamped spectrum; 0.0 for an all-zero spectrum.

    Parameters
    ----------
    eigenvalues : array-like, shape (k,)
    """
    lam = np.clip(_spectrum(eigenvalues), 0.0, None)
    sq = float(np.sum(lam * lam))
    return float(lam.sum()) ** 2 / sq if sq > 0.0 else 0.0


def condition_number(eigenvalues: Tensor | np.ndarray | Sequence[float]) -> float:
    """``λ_max / λ_min``; ``inf`` when ``λ_min ≤ k·ε·λ_max`` (numerically singular).

    Parameters
    ----------
    eigenvalues : array-like, shape (k,)
        Any order.
    """
    lam = _spectrum(eigenvalues)
    if lam.size == 0:
        raise ValueError("condition_number of an empty spectrum")
    top, low = float(lam.max()), float(lam.min())
    if not top > 0.0 or low <= lam.size * np.finfo(np.float64).eps * top:
        return math.inf
    return top / low


def principal_angles(u: Tensor, v: Tensor) -> Tensor:
    """Principal angles between ``span(u)`` and ``span(v)``, in radians, ascending.

    Björck & Golub (1973): with orthonormal bases ``Qu``, ``Qv`` the cosines are the singular
    values of ``Quᵀ·Qv``.  Small angles are taken from the sines, the singular values of
    ``Qv − Qu·(Quᵀ·Qv)``, because ``arccos`` near 1 loses half the digits.

    Parameters
    ----------
    u : Tensor, shape (k, r)
    v : Tensor, shape (k, s)
        Any full-column-rank bases (orthonormalised here).

    Returns
    -------
    Tensor, shape (min(r, s),), float64
    """
    if u.ndim != 2 or v.ndim != 2 or u.shape[0] != v.shape[0]:
        raise ValueError(f"principal_angles needs two (k, r) bases with the same k, got "
                         f"{tuple(u.shape)} and {tuple(v.shape)}")
    qu = torch.linalg.qr(u.to(torch.float64))[0]
    qv = torch.linalg.qr(v.to(torch.float64))[0]
    if qu.shape[1] > qv.shape[1]:
        qu, qv = qv, qu
    cross = qu.T @ qv  # (r, s) with r ≤ s
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending → angles ascending
    angles = torch.arccos(cos)
    if qu.shape[1] == qv.shape[1]:
        sin = torch.linalg.svdvals(qv - qu @ cross).clamp(0.0, 1.0).flip(0)  # ascending
        small = cos * cos > 0.5
        angles = torch.where(small, torch.arcsin(sin), angles)
    return angles


# ---------------------------------------------------------------------- results
@dataclass
class SideSummary:
    """The numbers :func:`report` found for one layer side (module docstring defines them).

    Attributes
    ----------
    layer, side : str
    k : int
        Width of the side (in_features for ``"input"``, out_features for ``"output"``).
    n : int
        Positions summarised.
    rank : int
        LoRA rank marked (capped at ``min(d, k)``).
    rank_source : {"fixed", "adapter", "budget"}
    effective_rank, participation_ratio : float
        Of the empirical spectrum.
    explained : float
        Explained-variance ratio of the top ``rank`` empirical directions.
    condition : dict
        ``estimator -> λ_max/λ_min``.
    shrinkage : dict
        ``{"ledoit_wolf": s, "oas": s}``.
    angles_deg : list of float or None
        Principal angles (ascending, degrees) to W0's top-``rank`` singular subspace; None
        without a model.
    spatpca : dict or None
        ``tau1``, ``tau2``, ``gamma``, ``noise``, ``rank``, ``angle_to_pca_deg`` (largest
        principal angle between the smooth and the plain top-r subspace).
    shared_with : str or None
        Layer whose input summary this one shares (q/k/v see the same tensor).
    step_ratio : float or None
        Input side of an adapted layer: the first Adam step's output change over Kaiming's
        expected one (module docstring); None where it cannot be computed.
    figure : str or None
        Path of the figure, relative to the report folder.
    spectra : dict
        ``estimator -> eigenvalues (k,) descending`` (not written to JSON).
    loadings : ndarray or None
        SpatPCA components, shape (k, r) (not written to JSON).
    """

    layer: str
    side: str
    k: int
    n: int
    rank: int
    rank_source: str
    effective_rank: float
    participation_ratio: float
    explained: float
    condition: dict[str, float]
    shrinkage: dict[str, float]
    angles_deg: list[float] | None = None
    spatpca: dict[str, Any] | None = None
    shared_with: str | None = None
    step_ratio: float | None = None
    figure: str | None = None
    spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    loadings: np.ndarray | None = field(default=None, repr=False)

    @property
    def max_angle_deg(self) -> float | None:
        """Largest principal angle to W0's subspace (degrees), or None without a model."""
        return max(self.angles_deg) if self.angles_deg else None

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields, JSON-serialisable (``inf`` as the string ``"inf"``)."""
        out = {key: getattr(self, key) for key in (
            "layer", "side", "k", "n", "rank", "rank_source", "effective_rank",
            "participation_ratio", "explained", "condition", "shrinkage", "angles_deg",
            "spatpca", "shared_with", "step_ratio", "figure")}
        return _jsonable(out)


@dataclass
class Report:
    """What :func:`report` wrote.

    Attributes
    ----------
    summaries : list of SideSummary
        In layer order, input before output.
    out_dir : Path
    html, markdown, json : Path
        ``report.html`` (self-contained), ``report.md``, ``summary.json``.
    figures : list of Path
        PNG files (``overview.png`` and one per layer side), empty with ``figures=False``.
    skipped : dict
        ``"layer/side" -> reason`` for sides that could not be summarised (sketched).
    seconds : float
    """

    summaries: list[SideSummary]
    out_dir: Path
    html: Path
    markdown: Path
    json: Path
    figures: list[Path]
    skipped: dict[str, str]
    seconds: float

    def table(self) -> str:
        """:func:`format_table` of :attr:`summaries`."""
        return format_table(self.summaries)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------------- table
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"
    return str(value)


def _table(summaries: list[SideSummary], max_layer_width: int) -> tuple[list[str],
                                                                        list[list[str]]]:
    """Header and cell strings shared by the terminal, HTML and Markdown tables."""
    with_angles = any(r.angles_deg is not None for r in summaries)
    with_sp = any(r.spatpca is not None for r in summaries)
    with_step = any(r.step_ratio is not None for r in summaries)
    header = ["layer", "side", "k", "n", "r", "eff.rank", "PR", "expl@r", "cond", "cond LW",
              "LW s", "OAS s"]
    if with_angles:
        header.append("∠W0 °")
    if with_step:
        header.append("step/K")
    if with_sp:
        header += ["τ1", "τ2", "γ"]
    rows = []
    for r in summaries:
        name = r.layer if len(r.layer) <= max_layer_width else "…" + r.layer[
            -(max_layer_width - 1):]
        mark = {"budget": "*", "adapter": "a"}.get(r.rank_source, "")
        line = [name, r.side, str(r.k), str(r.n), f"{r.rank}{mark}", f"{r.effective_rank:.1f}",
                f"{r.participation_ratio:.1f}", f"{100 * r.explained:.1f}%",
                _fmt(r.condition.get("empirical")), _fmt(r.condition.get("ledoit_wolf")),
                _fmt(r.shrinkage.get("ledoit_wolf")), _fmt(r.shrinkage.get("oas"))]
        if with_angles:
            angle = r.max_angle_deg
            line.append("-" if angle is None else f"{angle:.1f}")
        if with_step:
            line.append(_fmt(r.step_ratio))
        if with_sp:
            sp = r.spatpca or {}
            line += [_fmt(sp.get("tau1")), _fmt(sp.get("tau2")), _fmt(sp.get("gamma"))]
        rows.append(line)
    return header, rows


def format_table(summaries: Iterable[SideSummary], *, max_layer_width: int = 48) -> str:
    """A plain-text table of :class:`SideSummary` rows, one per layer side.

    Columns: layer, side, k, n, r (``*`` = allocated by a budget, ``a`` = the adapter's),
    effective rank, participation ratio, explained variance at r, condition numbers of the
    empirical and Ledoit-Wolf estimates, LW and OAS shrinkage; with a model the largest
    principal angle to W0's subspace; with smooth PCA τ1, τ2, γ.

    Parameters
    ----------
    summaries : iterable of SideSummary
    max_layer_width : int, default=48
        Longer layer names are shortened from the left (``…layer.5.attention.self.query``).

    Returns
    -------
    str
        Header, a rule, and one line per summary (no trailing newline).
    """
    rows = list(summaries)
    if not rows:
        return "(no layer sides)"
    header, cells = _table(rows, max_layer_width)
    table = [header, *cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for i, row in enumerate(table):
        padded = [cell.ljust(w) if j < 2 else cell.rjust(w)
                  for j, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(padded).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------- model weights
def _original_weights(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """``name -> W0 (d, k)`` float64 on CPU: the original weight, also under a residual."""
    from covinit.adapters import find_adapters, find_linear_layers
    from covinit.export import residual_offset

    adapters = find_adapters(model)
    linears = find_linear_layers(model)
    out: dict[str, Tensor] = {}
    for name in names:
        if name in adapters:
            adapter = adapters[name]
            w = adapter.base_weight().detach().to("cpu", torch.float64)
            replaced = getattr(adapter, "base_replaced", False)
            offset = residual_offset(adapter.module) if replaced else None
            if offset is not None:  # W0 = residual base + P·Q (see covinit.export)
                p, q = offset
                w = w + p.detach().to("cpu", torch.float64) @ q.detach().to("cpu",
                                                                            torch.float64)
            out[name] = w
        elif name in linears:
            module = linears[name]
            w = module.weight.detach().to("cpu", torch.float64)
            out[name] = w if isinstance(module, nn.Linear) else w.T  # Conv1D stores (k, d)
    return out


def _lora_factors(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """``name -> (A (r, k), B (d, r))`` float64 on CPU for the adapted layers among names."""
    from covinit.adapters import find_adapters

    adapters = find_adapters(model)
    return {n: tuple(t.detach().to("cpu", torch.float64) for t in adapters[n].get_lora())
            for n in names if n in adapters}  # type: ignore[misc]


def _step_ratio(cal: Calibration, layer: str, moments: Any, a: Tensor, b: Tensor,
                ) -> float | None:
    """First Adam step over Kaiming's expected one (see the module docstring), or None."""
    from covinit.matched import closed_form_gain, second_moment, step_ratio

    moment = second_moment(moments)
    if "gradient" in cal.sides and cal.moments(layer, "gradient") is not None:
        return step_ratio(a, b, cal.gradient(layer).to("cpu", torch.float64), moment)
    if bool(b.any()) or not bool(a.any()):
        return None  # B ≠ 0 steps along sign(Bᵀ·G): no closed form without G
    return float(1.0 / closed_form_gain(a, moment, layer)[0, 0])


# ---------------------------------------------------------------------- main entry
def _check_int(value: object, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _select_layers(cal: Calibration, layers: Iterable[str] | str | None) -> list[str]:
    names = cal.layer_names
    if layers is None:
        return names
    if isinstance(layers, str):
        pattern = re.compile(layers)
        chosen = [n for n in names if pattern.search(n)]
        if not chosen:
            raise ValueError(f"layers regex {layers!r} matches no calibrated layer; calibrated: "
                             f"{', '.join(names)}")
        return chosen
    chosen = list(layers)
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"layer {unknown[0]!r} was not calibrated; calibrated layers: "
                         f"{', '.join(names)}")
    return [n for n in names if n in set(chosen)]


def _resolve_ranks(cal: Calibration, names: list[str], rank: int, model: nn.Module | None,
                   rank_budget: int | None, max_rank: int | None,
                   allocation_estimator: str) -> dict[str, tuple[int, str]]:
    from covinit.adapters import find_adapters

    adapters = find_adapters(model) if model is not None else {}
    if rank_budget is None:
        return {n: (adapters[n].rank, "adapter") if n in adapters else (rank, "fixed")
                for n in names}
    from covinit.allocation import allocate_ranks
    from covinit.estimators import estimate

    if "input" not in cal.sides:
        raise ValueError("rank_budget= allocates from input-side spectra, but the calibration "
                         "has no input side; calibrate with sides including 'input'")
    spectra: dict[str, Tensor] = {}
    caps: dict[str, int] = {}
    for n in names:
        k, d = cal.shapes[n]
        own = adapters[n].rank if n in adapters else rank
        caps[n] = min(2 * own if max_rank is None else max_rank, d, k)
        spectra[n] = estimate(cal.moments(n, "input"), allocation_estimator).eigenvalues
    ranks = allocate_ranks(spectra, rank_budget, min_rank=1, max_rank=caps)
    return {n: (r, "budget") for n, r in ranks.items()}


def _spatpca_plan(cal: Calibration, names: list[str], spatpca: bool | Mapping[str, Any] | None,
                  spatpca_layers: int | Iterable[str] | None) -> tuple[set[str], dict[str, Any]]:
    if spatpca is False:
        return set(), {}
    options = dict(spatpca) if isinstance(spatpca, Mapping) else {}
    if spatpca is None and cal.n_folds < 2:
        return set(), {}
    if spatpca_layers is None:
        chosen = set(names)
    elif isinstance(spatpca_layers, int) and not isinstance(spatpca_layers, bool):
        chosen = set(names[:max(spatpca_layers, 0)])
    else:
        chosen = set(spatpca_layers)  # type: ignore[arg-type]
        unknown = chosen - set(names)
        if unknown:
            raise ValueError(f"spatpca_layers names {sorted(unknown)[0]!r}, which is not among "
                             f"the reported layers")
    return chosen, options


def report(
    calibration: Calibration | str | os.PathLike[str],
    model: nn.Module | None = None,
    out_dir: str | os.PathLike[str] = "covinit-report",
    *,
    rank: int = 8,
    estimators: Sequence[str] = ("empirical", "ledoit_wolf", "oas"),
    layers: Iterable[str] | str | None = None,
    sides: Sequence[str] | None = None,
    rank_budget: int | None = None,
    max_rank: int | None = None,
    allocation_estimator: str = "ledoit_wolf",
    spatpca: bool | Mapping[str, Any] | None = None,
    spatpca_layers: int | Iterable[str] | None = 4,
    figures: bool = True,
    max_figures: int | None = None,
    title: str | None = None,
    dpi: int = 80,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Write a calibration report: PNG figures, a self-contained HTML page, Markdown, JSON.

    Parameters
    ----------
    calibration : Calibration or path
        A calibration, or the path of a file written by :meth:`Calibration.save`.
    model : nn.Module, optional
        The calibrated model (plain or with LoRA layers); checked with
        :meth:`Calibration.check_model`.  Enables the principal angles to W0's singular
        subspaces and, for LoRA models, marks each adapter's own rank.
    out_dir : path, default="covinit-report"
        Created if needed; ``report.html``, ``report.md``, ``summary.json`` and
        ``figures/*.png`` are (over)written.
    rank : int, default=8
        LoRA rank to mark where neither an adapter nor ``rank_budget`` gives one.
    estimators : sequence of str, default=("empirical", "ledoit_wolf", "oas")
        Spectra drawn and condition numbers computed (any of ``covinit.estimators()``
        except ``spatpca``, which is controlled by ``spatpca=``).
    layers : list of str or str, optional
        Layers to report (names, or a regex searched in each name); default all.
    sides : sequence of {"input", "output"}, optional
        Default: every side the calibration holds.
    rank_budget : int, optional
        Mark the ranks :func:`covinit.allocation.allocate_ranks` gives these layers under
        this total budget (caps ``max_rank``, default twice the rank, as ``initialize``).
    max_rank : int, optional
    allocation_estimator : str, default="ledoit_wolf"
        Estimator whose input spectra drive the allocation.
    spatpca : bool or mapping, optional
        Smooth PCA (:func:`covinit.smoothpca.spatpca`).  ``None``: run it when the
        calibration holds per-fold statistics; ``False``: never; ``True`` or a mapping of
        its options (``geometry``, ``tau1``, ``tau2``, ``gamma``, ``select``): always (without
        folds, give single values of ``tau1`` and ``gamma``).
    spatpca_layers : int or list of str, optional, default=4
        Which layers get smooth PCA: the first ``n`` reported layers, the named ones, or all
        (``None``).  Cross-validation costs one k×k eigendecomposition per τ1 grid point and
        fold, so it is limited by default.
    figures : bool, default=True
        Draw figures (False: numbers, tables and pages only — fast).
    max_figures : int, optional
        Draw per-side figures for the first ``max_figures`` layer sides only.
    title : str, optional
    dpi : int, default=80
    progress : callable, optional
        Called with a short message per layer side (e.g. ``print``).

    Returns
    -------
    Report

    Raises
    ------
    ValueError
        Unknown layer / side / estimator, bad rank or budget, a model that does not match
        the calibration, or smooth PCA requested without folds and without fixed parameters.
    """
    start = time.perf_counter()
    from covinit.estimators import estimate, ledoit_wolf_shrinkage, oas_shrinkage
    from covinit.estimators import estimators as known_estimators

    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    rank = _check_int(rank, "rank")
    if rank_budget is not None:
        _check_int(rank_budget, "rank_budget")
    if max_rank is not None:
        _check_int(max_rank, "max_rank")
    dpi = _check_int(dpi, "dpi", 10)
    known = known_estimators()
    est_names = list(dict.fromkeys(estimators))
    for name in [*est_names, allocation_estimator]:
        if name not in known or name == "spatpca":
            valid = ", ".join(n for n in known if n != "spatpca")
            raise ValueError(f"unknown estimator {name!r} for the report's spectra; valid: "
                             f"{valid} (smooth PCA is controlled by spatpca=)")
    if not est_names:
        raise ValueError("estimators must name at least one estimator")
    if "empirical" not in est_names:
        est_names.insert(0, "empirical")  # effective rank & co. are defined on it
    sides = list(cal.sides) if sides is None else [sides] if isinstance(sides, str) \
        else list(sides)
    for side in sides:
        if side not in cal.sides:
            raise ValueError(f"side {side!r} is not in the calibration, which holds "
                             f"{list(cal.sides)}")
    if model is not None:
        cal.check_model(model)
    names = _select_layers(cal, layers)
    ranks = _resolve_ranks(cal, names, rank, model, rank_budget, max_rank,
                           allocation_estimator)
    sp_layers, sp_options = _spatpca_plan(cal, names, spatpca, spatpca_layers)
    weights = _original_weights(model, names) if model is not None else {}
    factors = _lora_factors(model, names) if model is not None else {}
    svd_cache: dict[str, tuple[Tensor, Tensor]] = {}
    eig_cache: dict[int, tuple[np.ndarray, Tensor]] = {}

    out = Path(out_dir)
    fig_dir = out / "figures"
    out.mkdir(parents=True, exist_ok=True)
    if figures:
        fig_dir.mkdir(exist_ok=True)
    summaries: list[SideSummary] = []
    skipped: dict[str, str] = {}
    images: dict[str, bytes] = {}
    shared = cal.shared_inputs
    for layer in names:
        k_in, d_out = cal.shapes[layer]
        r_layer, source = ranks[layer]
        for side in sides:
            if progress is not None:
                progress(f"{layer} {side}")
            try:
                m = cal.moments(layer, side)
            except ValueError as err:  # a bounded-memory sketch: no k×k summary
                skipped[f"{layer}/{side}"] = str(err)
                continue
            if m is None:
                continue
            k = m.k
            r = min(r_layer, d_out, k_in)
            if id(m) not in eig_cache:
                lam_t, vec = torch.linalg.eigh(m.covariance())
                eig_cache[id(m)] = (lam_t.flip(0).cpu().numpy(), vec.flip(1).cpu())
            lam, vec = eig_cache[id(m)]
            s_lw, mu = ledoit_wolf_shrinkage(m)
            s_oas, _ = oas_shrinkage(m)
            spectra: dict[str, np.ndarray] = {}
            for name in est_names:
                if name == "empirical":
                    spectra[name] = lam
                elif name in _AFFINE:  # same eigenvectors, eigenvalues mapped affinely
                    s = s_lw if name == "ledoit_wolf" else s_oas
                    spectra[name] = (1.0 - s) * lam + s * mu
                else:
                    spectra[name] = estimate(m, name).eigenvalues.cpu().numpy()
            ratio = np.clip(lam, 0.0, None)
            total = ratio.sum()
            explained = float(ratio[:r].sum() / total) if total > 0 else 0.0
            summary = SideSummary(
                layer=layer, side=side, k=k, n=m.n, rank=r, rank_source=source,
                effective_rank=effective_rank(lam), participation_ratio=participation_ratio(lam),
                explained=explained,
                condition={name: condition_number(v) for name, v in spectra.items()},
                shrinkage={"ledoit_wolf": s_lw, "oas": s_oas},
                shared_with=shared.get(layer) if side == "input" else None,
                spectra=spectra)
            if layer in weights:
                if layer not in svd_cache:
                    u_w, _, vh_w = torch.linalg.svd(weights[layer], full_matrices=False)
                    svd_cache[layer] = (u_w, vh_w.T)
                u_w, v_w = svd_cache[layer]
                basis = v_w if side == "input" else u_w
                angles = principal_angles(vec[:, :r], basis[:, :r])
                summary.angles_deg = [float(a) for a in torch.rad2deg(angles)]
            if side == "input" and layer in factors:
                summary.step_ratio = _step_ratio(cal, layer, m, *factors[layer])
            if layer in sp_layers and k >= 2:
                options = dict(sp_options)
                r_sp = min(int(options.pop("rank", r)), k - 1)
                fit = estimate(m, "spatpca", folds=cal.folds(layer, side), rank=r_sp,
                               **options)
                comps = fit.top(r_sp)[1].cpu()
                p = fit.params
                summary.spatpca = {
                    "rank": r_sp, "tau1": float(p["tau1"]), "tau2": float(p["tau2"]),
                    "gamma": float(p["gamma"]), "noise": float(p["noise"]),
                    "geometry": p.get("geometry"),
                    "grid": _grid_shape(sp_options.get("geometry"), k),
                    "angle_to_pca_deg": float(torch.rad2deg(
                        principal_angles(comps, vec[:, :r_sp]).max())),
                }
                summary.loadings = comps.numpy()
            summaries.append(summary)
    if not summaries:
        raise ValueError("nothing to report: every selected layer side was skipped "
                         f"({'; '.join(skipped.values()) or 'no sides'})")

    figure_paths: list[Path] = []
    if figures:
        overview = _overview_png(summaries, dpi)
        images["overview"] = overview
        (fig_dir / "overview.png").write_bytes(overview)
        figure_paths.append(fig_dir / "overview.png")
        for i, summary in enumerate(summaries):
            if max_figures is not None and i >= max_figures:
                break
            png = _side_png(summary, dpi)
            fname = f"{_slug(summary.layer)}__{summary.side}.png"
            (fig_dir / fname).write_bytes(png)
            summary.figure = f"figures/{fname}"
            images[summary.figure] = png
            figure_paths.append(fig_dir / fname)

    title = title or "covinit calibration report"
    context = _context(cal, model, rank, rank_budget, est_names, sp_options, len(sp_layers))
    html_path, md_path, json_path = out / "report.html", out / "report.md", out / "summary.json"
    seconds = time.perf_counter() - start
    html_path.write_text(_html(title, context, summaries, skipped, images), encoding="utf-8")
    md_path.write_text(_markdown(title, context, summaries, skipped), encoding="utf-8")
    json_path.write_text(json.dumps(
        {"title": title, "context": _jsonable(context),
         "layers": [s.to_dict() for s in summaries], "skipped": skipped}, indent=1),
        encoding="utf-8")
    return Report(summaries, out, html_path, md_path, json_path, figure_paths, skipped,
                  seconds)


# ---------------------------------------------------------------------- pages
def _grid_shape(geometry: Any, k: int) -> list[int] | None:
    """``[rows, cols]`` of a ``("grid", rows, cols)`` geometry spec that fits ``k``."""
    if isinstance(geometry, tuple | list) and len(geometry) == 3 and geometry[0] == "grid" \
            and int(geometry[1]) * int(geometry[2]) == k:
        return [int(geometry[1]), int(geometry[2])]
    return None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "layer"


def _context(cal: Calibration, model: nn.Module | None, rank: int, budget: int | None,
             est_names: list[str], sp_options: Mapping[str, Any], n_sp: int) -> dict[str, Any]:
    info = dict(cal.info)
    ctx: dict[str, Any] = {
        "layers": len(cal.layer_names), "sides": list(cal.sides), "folds": cal.n_folds,
        "positions": info.get("positions"), "batches": info.get("batches"),
        "precision": info.get("precision"), "calibration seconds": info.get("seconds"),
        "model fingerprint": str(cal.fingerprint.get("sha256", ""))[:16],
        "estimators": ", ".join(est_names), "rank": rank if budget is None else
        f"budget {budget}", "principal angles": "yes" if model is not None else
        "no (pass the model)",
        "smooth PCA": f"{n_sp} layer(s)" + (f", options {dict(sp_options)}" if sp_options
                                            else "") if n_sp else "no",
    }
    for key in ("model", "data", "targets"):
        if key in info:
            ctx[key] = info[key]
    return ctx


_DEFINITIONS = [
    ("eff.rank", "exp of the spectral entropy, exp(−Σ p·log p), p = λ/Σλ (1 … k)"),
    ("PR", "participation ratio (Σλ)²/Σλ²"),
    ("expl@r", "share of the variance in the top-r directions (r = LoRA rank; "
               "* = allocated by a budget, a = the adapter's own)"),
    ("cond / cond LW", "λ_max/λ_min of the empirical / Ledoit-Wolf covariance "
                       "(inf = singular)"),
    ("LW s / OAS s", "shrinkage intensity s of (1−s)·S + s·μ·I"),
    ("∠W0", "largest principal angle between the top-r data directions and W0's top-r "
            "singular subspace (PiSSA's); 0° = same directions"),
    ("step/K", "first Adam step's output change over Kaiming's expected one (1 = "
               "scale='matched'; exact with a gradient side, closed form for B = 0 without)"),
    ("τ1, τ2, γ", "SpatPCA's cross-validated roughness, sparsity and eigenvalue shrinkage"),
]


def _html(title: str, context: Mapping[str, Any], summaries: list[SideSummary],
          skipped: Mapping[str, str], images: Mapping[str, bytes]) -> str:
    esc = html.escape

    def img(key: str, alt: str) -> str:
        data = base64.b64encode(images[key]).decode("ascii")
        return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'

    head, table_rows = _table(summaries, max_layer_width=10_000)
    body_rows = []
    for summary, cells in zip(summaries, table_rows, strict=True):
        anchor = f"{_slug(summary.layer)}__{summary.side}"
        first = (f'<a href="#{anchor}">{esc(cells[0])}</a>' if summary.figure
                 else esc(cells[0]))
        tds = [f"<td>{first}</td>"] + [f"<td>{esc(c)}</td>" for c in cells[1:]]
        body_rows.append("<tr>" + "".join(tds) + "</tr>")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;"
        "color:#222;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}"
        "th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}"
        "img{max-width:100%;border:1px solid #eee;margin:6px 0}"
        "dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:13px}"
        "dt{font-weight:600}code{background:#f4f4f4;padding:0 3px}</style></head><body>",
        f"<h1>{esc(title)}</h1>", "<dl>",
        *(f"<dt>{esc(str(k))}</dt><dd>{esc(str(v))}</dd>" for k, v in context.items()
          if v is not None),
        "</dl>", "<h2>Summary</h2>", "<table><thead><tr>",
        *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>", *body_rows,
        "</tbody></table>", "<h3>Columns</h3><dl>",
        *(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in _DEFINITIONS), "</dl>",
    ]
    if skipped:
        parts.append("<h3>Skipped</h3><ul>")
        parts += [f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in skipped.items()]
        parts.append("</ul>")
    if "overview" in images:
        parts += ["<h2>Overview</h2>", img("overview", "overview across layers")]
    figs = [s for s in summaries if s.figure]
    if figs:
        parts.append("<h2>Layers</h2>")
    for s in figs:
        anchor = f"{_slug(s.layer)}__{s.side}"
        extra = f" (input shared with <code>{esc(s.shared_with)}</code>)" if s.shared_with \
            else ""
        parts += [f'<h3 id="{anchor}"><code>{esc(s.layer)}</code> · {esc(s.side)}{extra}</h3>',
                  img(s.figure, f"{s.layer} {s.side}")]  # type: ignore[arg-type]
    parts.append("</body></html>")
    return "\n".join(parts)


def _markdown(title: str, context: Mapping[str, Any], summaries: list[SideSummary],
              skipped: Mapping[str, str]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in context.items() if v is not None]
    lines += ["", "## Summary", ""]
    header, rows = _table(summaries, max_layer_width=10_000)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---", ":---"] + ["---:"] * (len(header) - 2)) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += ["", "## Columns", ""]
    lines += [f"- **{k}**: {v}" for k, v in _DEFINITIONS]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()]
    figs = [s for s in summaries if s.figure]
    if figs:
        lines += ["", "## Figures", "", "![overview](figures/overview.png)", ""]
        lines += [f"![{s.layer} {s.side}]({s.figure})" for s in figs]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- figures
def _new_figure(width: float, height: float) -> Any:
    """A figure on its own Agg canvas: no pyplot, so no global backend or state changes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("covinit.report's figures need matplotlib: pip install "
                          "'covinit[bench]', or pass figures=False (tables and pages only)"
                          ) from None

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _plain_log_ticks(ax: Any, axis: str) -> None:
    """Log-scale ticks labelled as plain numbers, without minor ticks: mathtext labels
    (10^k) and the minor-tick artists were most of the drawing time of a figure."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_locator(NullLocator())  # minor ticks: many artists, little information


def _short(name: str, parts: int = 4) -> str:
    return ".".join(name.split(".")[-parts:])


def _side_png(s: SideSummary, dpi: int) -> bytes:
    """Spectra, explained-variance curve and (when fitted) SpatPCA loadings of one side."""
    panels = 3 if s.loadings is not None else 2
    grid = (s.spatpca or {}).get("grid")
    if s.loadings is not None and grid is not None:
        # Features on a 2-D grid: each loading vector is drawn as an image of that grid.
        n_img = s.loadings.shape[1]
        per_row = math.ceil(n_img / 2)
        fig = _new_figure(9.2 + 1.25 * per_row, 3.5)
        spec = fig.add_gridspec(2, 2 + per_row, width_ratios=[3.0, 3.0] + [1.0] * per_row)
        axes = [fig.add_subplot(spec[:, 0]), fig.add_subplot(spec[:, 1])]
        axes += [fig.add_subplot(spec[j // per_row, 2 + j % per_row]) for j in range(n_img)]
    else:
        fig = _new_figure(4.6 * panels, 3.5)
        axes = list(fig.subplots(1, panels))
    idx = np.arange(1, s.k + 1)
    ax = axes[0]
    drawn = False
    for name, lam in s.spectra.items():
        y = np.where(lam > 0.0, lam, np.nan)  # log scale: zero/negative eigenvalues unshown
        if np.isfinite(y).any():
            ax.plot(idx, y, label=name, color=_COLORS.get(name), lw=1.2,
                    ls="-" if name == "empirical" else "--")
            drawn = True
    if drawn:
        ax.set_yscale("log")
        _plain_log_ticks(ax, "y")
        ax.legend(fontsize=7)
        # Null-space eigenvalues (n < k, centring) are rounding noise at 1e-30: do not let
        # them squash the informative part of the spectrum.
        top = max(float(np.nanmax(v)) for v in s.spectra.values())
        low = min((float(v[v > 0].min()) for v in s.spectra.values() if (v > 0).any()),
                  default=top)
        ax.set_ylim(bottom=0.5 * max(low, 1e-10 * top))
    ax.axvline(s.rank, color="#888888", ls=":", lw=1)
    if s.k > 64:
        ax.set_xscale("log")
        _plain_log_ticks(ax, "x")
    ax.set_title(f"eigenvalues (k={s.k}, n={s.n})", fontsize=9)
    ax.set_xlabel("component", fontsize=8)
    ax.tick_params(labelsize=7)

    ax = axes[1]
    lam = np.clip(s.spectra["empirical"], 0.0, None)
    total = lam.sum()
    cum = np.cumsum(lam) / total if total > 0 else np.zeros_like(lam)
    ax.plot(idx, cum, color="#444444", lw=1.2)
    ax.axvline(s.rank, color="#d62728", ls="--", lw=1)
    ax.plot([s.rank], [cum[s.rank - 1]], "o", color="#d62728")
    how = {"budget": " (budget)", "adapter": " (adapter)"}.get(s.rank_source, "")
    ax.annotate(f"r={s.rank}{how}: {100 * cum[s.rank - 1]:.1f}%", (s.rank, cum[s.rank - 1]),
                textcoords="offset points", xytext=(6, -12), fontsize=8, color="#d62728")
    if s.effective_rank >= 1:
        ax.axvline(s.effective_rank, color="#1f77b4", ls=":", lw=1,
                   label=f"effective rank {s.effective_rank:.1f}")
        ax.legend(fontsize=7, loc="lower right")
    if s.k > 64:
        ax.set_xscale("log")
        _plain_log_ticks(ax, "x")
    ax.set_ylim(0, 1.02)
    ax.set_title("cumulative explained variance", fontsize=9)
    ax.set_xlabel("components", fontsize=8)
    ax.tick_params(labelsize=7)

    caption = None
    if s.loadings is not None and s.spatpca is not None and grid is not None:
        rows, cols = grid
        bound = float(np.abs(s.loadings).max()) or 1.0
        for j, ax in enumerate(axes[2:]):
            ax.imshow(s.loadings[:, j].reshape(rows, cols), cmap="RdBu_r", vmin=-bound,
                      vmax=bound, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"Φ{j + 1}", fontsize=8)
        sp = s.spatpca
        caption = (f"SpatPCA loadings on the {rows}×{cols} grid: τ1={_fmt(sp['tau1'])}, "
                   f"τ2={_fmt(sp['tau2'])}, γ={_fmt(sp['gamma'])}")
    elif s.loadings is not None and s.spatpca is not None:
        ax = axes[2]
        load = s.loadings.T  # (r, k)
        bound = float(np.abs(load).max()) or 1.0
        image = ax.imshow(load, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound,
                          interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.05)
        sp = s.spatpca
        ax.set_title(f"SpatPCA loadings: τ1={_fmt(sp['tau1'])}, τ2={_fmt(sp['tau2'])}, "
                     f"γ={_fmt(sp['gamma'])}", fontsize=9)
        ax.set_xlabel(f"feature ({sp.get('geometry')} geometry)", fontsize=8)
        ax.set_ylabel("component", fontsize=8)
        ax.tick_params(labelsize=7)
    notes = [f"LW s={s.shrinkage['ledoit_wolf']:.3g}", f"OAS s={s.shrinkage['oas']:.3g}",
             f"cond={_fmt(s.condition.get('empirical'))}"]
    if s.max_angle_deg is not None:
        notes.append(f"max ∠(top-{s.rank}, W0's) = {s.max_angle_deg:.1f}°")
    fig.suptitle(f"{s.layer} · {s.side}    " + "   ".join(notes), fontsize=9)
    # Fixed margins: tight_layout measures every tick label and took ~half the time.
    fig.subplots_adjust(left=0.07 if panels == 2 else 0.05, right=0.97 if panels == 2 else 0.94,
                        bottom=0.14, top=0.84, wspace=0.25)
    if caption is not None:  # under the loading images, once their position is final
        fig.text(axes[2].get_position().x0, 0.03, caption, fontsize=8)
    return _png(fig, dpi)


def _overview_png(summaries: list[SideSummary], dpi: int) -> bytes:
    """Effective rank, shrinkage and angles to W0 across layers, one line per side."""
    layers = list(dict.fromkeys(s.layer for s in summaries))
    pos = {name: i for i, name in enumerate(layers)}
    with_angles = any(s.angles_deg is not None for s in summaries)
    rows = 3 if with_angles else 2
    fig = _new_figure(max(8.0, 0.22 * len(layers) + 3), 2.3 * rows + 1.4)
    axes = fig.subplots(rows, 1, sharex=True)
    styles = {"input": ("o", "#1f77b4"), "output": ("s", "#ff7f0e")}
    for side, (marker, color) in styles.items():
        mine = [s for s in summaries if s.side == side]
        if not mine:
            continue
        x = [pos[s.layer] for s in mine]
        axes[0].plot(x, [s.effective_rank / s.k for s in mine], marker, color=color, ms=4,
                     label=f"{side}: eff.rank / k")
        axes[0].plot(x, [s.explained for s in mine], marker, color=color, ms=4,
                     mfc="none", label=f"{side}: explained @ r")
        axes[1].plot(x, [s.shrinkage["ledoit_wolf"] for s in mine], marker, color=color, ms=4,
                     label=f"{side}: Ledoit-Wolf")
        axes[1].plot(x, [s.shrinkage["oas"] for s in mine], marker, color=color, ms=4,
                     mfc="none", label=f"{side}: OAS")
        if with_angles:
            got = [s for s in mine if s.max_angle_deg is not None]
            axes[2].plot([pos[s.layer] for s in got], [s.max_angle_deg for s in got], marker,
                         color=color, ms=4, label=f"{side}: largest angle")
            axes[2].plot([pos[s.layer] for s in got],
                         [float(np.mean(s.angles_deg)) for s in got], marker, color=color,
                         ms=4, mfc="none", label=f"{side}: mean angle")
    axes[0].set_ylabel("fraction", fontsize=8)
    axes[0].set_title("effective rank / width and explained variance at the LoRA rank",
                      fontsize=9)
    axes[1].set_ylabel("s", fontsize=8)
    axes[1].set_title("shrinkage intensity", fontsize=9)
    if with_angles:
        axes[2].set_ylabel("degrees", fontsize=8)
        axes[2].set_ylim(0, 92)
        axes[2].set_title("principal angles: top-r data directions vs W0's top-r singular "
                          "subspace (PiSSA)", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=7, ncols=2, loc="best")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(range(len(layers)))
    axes[-1].set_xticklabels([_short(n) for n in layers], rotation=90, fontsize=6)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.35 / height, bottom=1.3 / height,
                        hspace=0.35)
    return _png(fig, dpi)
