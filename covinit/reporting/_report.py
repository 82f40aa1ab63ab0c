""":func:`report`: plan → summaries → figures → pages (re-exported as ``covinit.report``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from covinit.calibration_data import Calibration
from covinit.reporting.figures import write_figures
from covinit.reporting.plan import plan_report
from covinit.reporting.render import Report, report_context, write_pages
from covinit.reporting.summaries import summarise
from covinit.selection import Targets

__all__ = ["report"]


def report(
    calibration: Calibration | str | os.PathLike[str], model: nn.Module | None = None,
    out_dir: str | os.PathLike[str] = "covinit-report", *, rank: int = 8,
    estimators: Sequence[str] = ("empirical", "ledoit_wolf", "oas"),
    layers: Targets | Iterable[str] | None = None, sides: Sequence[str] | None = None,
    rank_budget: int | None = None, max_rank: int | None = None,
    allocation_estimator: str = "ledoit_wolf", spatpca: bool | Mapping[str, Any] | None = None,
    spatpca_layers: int | Iterable[str] | None = 4, figures: bool = True,
    max_figures: int | None = None, title: str | None = None, dpi: int = 80,
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
        subspaces and, for LoRA models, marks each adapter's own rank and its first step.
    out_dir : path, default="covinit-report"
        Created if needed; ``report.html``, ``report.md``, ``summary.json``, ``figures/*.png``
        are (over)written.
    rank : int, default=8
        LoRA rank to mark where neither an adapter nor ``rank_budget`` gives one.
    estimators : sequence of str, default=("empirical", "ledoit_wolf", "oas")
        Spectra drawn and condition numbers computed (any of ``covinit.estimators()``
        except ``spatpca``, which ``spatpca=`` controls).
    layers : list of str, str or callable, optional
        Layers to report, default all; selected as ``targets=`` is (:mod:`covinit.selection`:
        name suffixes, a ``re.fullmatch`` regex, or a callable of the name or of ``(name,
        module)``, the module being None without a model).
    sides : sequence of {"input", "output", "gradient"}, optional
        Default: every side the calibration holds.
    rank_budget, max_rank : int, optional
        Mark the ranks :func:`covinit.allocation.allocate_ranks` gives these layers under
        this total budget, each capped at ``max_rank`` (default twice its rank, as
        ``initialize``; :func:`covinit.allocation.rank_cap`).
    allocation_estimator : str, default="ledoit_wolf"
        Estimator whose input spectra drive the allocation.
    spatpca : bool or mapping, optional
        Smooth PCA (:func:`covinit.smoothpca.spatpca`): ``None`` runs it on per-fold
        statistics, ``False`` never, ``True`` or its options (``geometry``, ``tau1``, ``tau2``,
        ``gamma``, ``select``) always (without folds: single values of ``tau1``, ``gamma``).
    spatpca_layers : int or list of str, optional, default=4
        Layers that get smooth PCA: the first ``n`` reported, the named ones, or all (None);
        limited as cross-validation costs a k×k eigendecomposition per τ1 grid point and fold.
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
    plan = plan_report(calibration, model, rank=rank, estimator_names=estimators,
                       layers=layers, sides=sides, rank_budget=rank_budget, max_rank=max_rank,
                       allocation_estimator=allocation_estimator, spatpca=spatpca,
                       spatpca_layers=spatpca_layers, dpi=dpi)
    out = Path(out_dir)
    summaries, skipped = summarise(plan, progress)
    images, figure_paths = (write_figures(summaries, out / "figures", plan.dpi, max_figures)
                            if figures else ({}, []))
    seconds = time.perf_counter() - start
    pages = write_pages(out, title or "covinit calibration report", report_context(plan),
                        summaries, skipped, images)
    return Report(summaries, out, *pages, figure_paths, skipped, seconds)
