"""Look inside a calibration: spectra, effective ranks, shrinkage, smooth PCA, PiSSA angles.

:func:`report` turns a :class:`~covinit.calibration.Calibration` (and optionally the model it
was collected on) into one PNG figure per layer side, an overview figure, one
self-contained HTML page (the images are base64-embedded, no network needed), a Markdown
summary and a JSON file with the numbers.  :func:`format_table` prints the same numbers as
a terminal table.

The work runs in named stages, one module each: :mod:`~covinit.reporting.plan` checks the
options and fixes what is reported (:class:`~covinit.reporting.plan.ReportPlan`),
:mod:`~covinit.reporting.summaries` computes the numbers (:class:`SideSummary`),
:mod:`~covinit.reporting.figures` draws them and :mod:`~covinit.reporting.render` writes the
pages (:class:`Report`).

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
    :mod:`covinit.covariance`).  Shrinking towards ``μI`` maps the eigenvalues affinely,
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
    :mod:`covinit.residual`'s record (without a record — a model reloaded from a file — the
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

from covinit.reporting._report import report
from covinit.reporting.plan import ReportPlan
from covinit.reporting.render import Report, format_table
from covinit.reporting.summaries import (
    SideSummary,
    condition_number,
    effective_rank,
    participation_ratio,
    principal_angles,
)

__all__ = [
    "Report",
    "ReportPlan",
    "SideSummary",
    "condition_number",
    "effective_rank",
    "format_table",
    "participation_ratio",
    "principal_angles",
    "report",
]
