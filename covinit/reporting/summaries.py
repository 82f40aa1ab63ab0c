"""The numbers of a calibration report, per layer side: pure computation, no drawing.

:func:`summarise` computes one :class:`SideSummary` per layer side of a
:class:`~covinit.reporting.plan.ReportPlan` (the definitions are in :mod:`covinit.reporting`);
the spectral helpers :func:`effective_rank`, :func:`participation_ratio`,
:func:`condition_number` and :func:`principal_angles` work on any spectrum or basis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from covinit.covariance import estimate, ledoit_wolf_shrinkage, oas_shrinkage
from covinit.matched import closed_form_gain, step_ratio
from covinit.reporting.plan import ReportPlan
from covinit.stats import Moments

__all__ = [
    "SideSummary",
    "condition_number",
    "effective_rank",
    "format_value",
    "jsonable",
    "participation_ratio",
    "principal_angles",
    "summarise",
]

_AFFINE = ("empirical", "ledoit_wolf", "oas")



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
    """The numbers found for one layer side (:mod:`covinit.reporting` defines them).

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
        expected one; None where it cannot be computed.
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
        return jsonable(out)


# ---------------------------------------------------------------------- how numbers are shown
def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_value(value: Any, digits: int = 3) -> str:
    """A table cell: ``"-"`` for None, ``digits`` significant digits for a float."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}g}"
    return str(value)


# ---------------------------------------------------------------------- per layer side
@dataclass
class _Caches:
    """Decompositions shared across sides: q/k/v share one input summary, and a layer's
    input and output sides share one SVD of W0."""

    eig: dict[int, tuple[np.ndarray, Tensor]] = field(default_factory=dict)
    svd: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def summarise(plan: ReportPlan, progress: Callable[[str], None] | None = None,
              ) -> tuple[list[SideSummary], dict[str, str]]:
    """One :class:`SideSummary` per layer side of ``plan``, in layer order, input first.

    Parameters
    ----------
    plan : ReportPlan
    progress : callable, optional
        Called with ``"layer side"`` before each side.

    Returns
    -------
    summaries : list of SideSummary
    skipped : dict
        ``"layer/side" -> reason`` for sides without a k×k summary (a bounded-memory sketch).

    Raises
    ------
    ValueError
        If every selected side was skipped, or smooth PCA cannot be fitted.
    """
    cal = plan.calibration
    summaries: list[SideSummary] = []
    skipped: dict[str, str] = {}
    caches = _Caches()
    for layer in plan.layers:
        for side in plan.sides:
            if progress is not None:
                progress(f"{layer} {side}")
            try:
                moments = cal.moments(layer, side)
            except ValueError as err:  # a bounded-memory sketch: no k×k summary
                skipped[f"{layer}/{side}"] = str(err)
                continue
            if moments is not None:
                summaries.append(_summarise_side(plan, layer, side, moments, caches))
    if not summaries:
        raise ValueError("nothing to report: every selected layer side was skipped "
                         f"({'; '.join(skipped.values()) or 'no sides'})")
    return summaries, skipped


def _summarise_side(plan: ReportPlan, layer: str, side: str, m: Moments,
                    caches: _Caches) -> SideSummary:
    cal = plan.calibration
    k_in, d_out = cal.shapes[layer]
    r_layer, source = plan.ranks[layer]
    r = min(r_layer, d_out, k_in)
    if id(m) not in caches.eig:
        lam_t, vec_t = torch.linalg.eigh(m.covariance())
        caches.eig[id(m)] = (lam_t.flip(0).cpu().numpy(), vec_t.flip(1).cpu())
    lam, vec = caches.eig[id(m)]
    s_lw, mu = ledoit_wolf_shrinkage(m)
    s_oas, _ = oas_shrinkage(m)
    spectra: dict[str, np.ndarray] = {}
    for name in plan.estimators:
        if name == "empirical":
            spectra[name] = lam
        elif name in _AFFINE:  # same eigenvectors, eigenvalues mapped affinely
            s = s_lw if name == "ledoit_wolf" else s_oas
            spectra[name] = (1.0 - s) * lam + s * mu
        else:
            spectra[name] = estimate(m, name).eigenvalues.cpu().numpy()
    ratio = np.clip(lam, 0.0, None)
    total = ratio.sum()
    summary = SideSummary(
        layer=layer, side=side, k=m.k, n=m.n, rank=r, rank_source=source,
        effective_rank=effective_rank(lam), participation_ratio=participation_ratio(lam),
        explained=float(ratio[:r].sum() / total) if total > 0 else 0.0,
        condition={name: condition_number(v) for name, v in spectra.items()},
        shrinkage={"ledoit_wolf": s_lw, "oas": s_oas},
        shared_with=cal.shared_inputs.get(layer) if side == "input" else None,
        spectra=spectra)
    if layer in plan.weights:
        summary.angles_deg = _angles_to_w0(plan, layer, side, vec[:, :r], caches)
    if side == "input" and layer in plan.factors:
        summary.step_ratio = _step_ratio(plan, layer, m, *plan.factors[layer])
    if layer in plan.spatpca_layers and m.k >= 2:
        summary.spatpca, summary.loadings = _spatpca(plan, layer, side, m, vec, r)
    return summary


def _angles_to_w0(plan: ReportPlan, layer: str, side: str, top: Tensor,
                  caches: _Caches) -> list[float]:
    """Principal angles (degrees) between ``top`` (k, r) and W0's top-r singular vectors:
    right ones for the input side, left ones for the output side."""
    if layer not in caches.svd:
        u_w, _, vh_w = torch.linalg.svd(plan.weights[layer], full_matrices=False)
        caches.svd[layer] = (u_w, vh_w.T)
    u_w, v_w = caches.svd[layer]
    basis = v_w if side == "input" else u_w
    angles = principal_angles(top, basis[:, :top.shape[1]])
    return [float(a) for a in torch.rad2deg(angles)]


def _step_ratio(plan: ReportPlan, layer: str, moments: Moments, a: Tensor, b: Tensor,
                ) -> float | None:
    """First Adam step over Kaiming's expected one (see :mod:`covinit.matched`), or None."""
    cal = plan.calibration
    moment = moments.to("cpu").second_moment()
    if "gradient" in cal.sides and cal.moments(layer, "gradient") is not None:
        return step_ratio(a, b, cal.gradient(layer).to("cpu", torch.float64), moment)
    if bool(b.any()) or not bool(a.any()):
        return None  # B ≠ 0 steps along sign(Bᵀ·G): no closed form without G
    return float(1.0 / closed_form_gain(a, moment, layer)[0, 0])


def _spatpca(plan: ReportPlan, layer: str, side: str, m: Moments, vec: Tensor, r: int,
             ) -> tuple[dict[str, Any], np.ndarray]:
    """SpatPCA's parameters (and the angle to the plain top-r subspace) and its loadings."""
    options = dict(plan.spatpca_options)
    r_sp = min(int(options.pop("rank", r)), m.k - 1)
    fit = estimate(m, "spatpca", folds=plan.calibration.folds(layer, side), rank=r_sp,
                   **options)
    comps = fit.top(r_sp)[1].cpu()
    p = fit.params
    numbers = {
        "rank": r_sp, "tau1": float(p["tau1"]), "tau2": float(p["tau2"]),
        "gamma": float(p["gamma"]), "noise": float(p["noise"]),
        "geometry": p.get("geometry"),
        "grid": _grid_shape(plan.spatpca_options.get("geometry"), m.k),
        "angle_to_pca_deg": float(torch.rad2deg(
            principal_angles(comps, vec[:, :r_sp]).max())),
    }
    return numbers, comps.numpy()


def _grid_shape(geometry: Any, k: int) -> list[int] | None:
    """``[rows, cols]`` of a ``("grid", rows, cols)`` geometry spec that fits ``k``."""
    if isinstance(geometry, tuple | list) and len(geometry) == 3 and geometry[0] == "grid" \
            and int(geometry[1]) * int(geometry[2]) == k:
        return [int(geometry[1]), int(geometry[2])]
    return None
