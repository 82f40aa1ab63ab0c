"""First stage of :func:`covinit.report`: check the options and fix what will be reported.

:func:`plan_report` turns the arguments of :func:`covinit.report` into a :class:`ReportPlan`
— the layers (:func:`covinit.selection.select`), sides, estimators, the rank marked on each
layer (:func:`covinit.allocation.rank_cap` and :func:`~covinit.allocation.allocate_ranks`
under a budget, as ``initialize(rank_budget=)``), which layers get smooth PCA, and what the
model contributes (its original weights W0 and its LoRA factors) — before anything is
computed, so every mistake is reported before the first eigendecomposition.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from covinit.adapters import find_adapters, find_linear_layers
from covinit.allocation import allocate_ranks, rank_cap
from covinit.calibration_data import Calibration
from covinit.covariance import estimate, estimators
from covinit.residual import original_weight
from covinit.selection import Targets, select

__all__ = ["ReportPlan", "plan_report"]


@dataclass
class ReportPlan:
    """What :func:`covinit.report` reports, fixed before any number is computed.

    Attributes
    ----------
    calibration : Calibration
    layers : list of str
        Selected layers, in the calibration's order.
    sides : list of str
        ``"input"`` / ``"output"`` / ``"gradient"`` sides to summarise.
    estimators : list of str
        Spectra to draw; ``"empirical"`` first (the effective rank & co. are defined on it).
    ranks : dict
        ``layer -> (rank, source)``, source one of ``"fixed"``, ``"adapter"``, ``"budget"``.
    rank, rank_budget : int, int or None
        As passed (shown in the page's context).
    spatpca_layers : set of str
        Layers that get smooth PCA.
    spatpca_options : dict
        Options passed on to the ``spatpca`` estimator.
    weights : dict
        ``layer -> W0 (d, k)`` float64 on CPU, the original weight (empty without a model).
    factors : dict
        ``layer -> (A (r, k), B (d, r))`` float64 on CPU for the adapted layers.
    with_model : bool
        Whether a model was given.
    dpi : int
        Resolution of the figures.
    """

    calibration: Calibration
    layers: list[str]
    sides: list[str]
    estimators: list[str]
    ranks: dict[str, tuple[int, str]]
    rank: int
    rank_budget: int | None
    spatpca_layers: set[str] = field(default_factory=set)
    spatpca_options: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict, repr=False)
    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    with_model: bool = False
    dpi: int = 80


def check_int(value: object, name: str, low: int = 1) -> int:
    """``value`` if it is an int ``>= low`` (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def plan_report(calibration: Calibration | str | os.PathLike[str], model: nn.Module | None, *,
                rank: int,
                estimator_names: Sequence[str], layers: Targets | Iterable[str] | None,
                sides: Sequence[str] | str | None, rank_budget: int | None,
                max_rank: int | None, allocation_estimator: str,
                spatpca: bool | Mapping[str, Any] | None,
                spatpca_layers: int | Iterable[str] | None, dpi: int = 80) -> ReportPlan:
    """Check :func:`covinit.report`'s options and resolve them into a :class:`ReportPlan`.

    Parameters are :func:`covinit.report`'s (``estimator_names`` is its ``estimators``);
    ``calibration`` may be a path, loaded here.

    Raises
    ------
    ValueError
        Unknown layer / side / estimator, bad rank or budget, a model that does not match
        the calibration.
    """
    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    rank = check_int(rank, "rank")
    if rank_budget is not None:
        check_int(rank_budget, "rank_budget")
    if max_rank is not None:
        check_int(max_rank, "max_rank")
    dpi = check_int(dpi, "dpi", 10)
    est_names = _estimator_names(estimator_names, allocation_estimator)
    chosen_sides = _sides(cal, sides)
    if model is not None:
        cal.check_model(model)
    candidates: dict[str, nn.Module | None] = dict.fromkeys(cal.layer_names)
    if model is not None:  # a (name, module) selector sees the model's layers
        linears = find_linear_layers(model)
        candidates = {name: linears.get(name) for name in cal.layer_names}
    names = cal.layer_names if layers is None else select(candidates, layers,
                                                          what="calibrated")
    adapters = find_adapters(model) if model is not None else {}
    ranks = _resolve_ranks(cal, names, rank, adapters, rank_budget, max_rank,
                           allocation_estimator)
    sp_layers, sp_options = _spatpca_plan(cal, names, spatpca, spatpca_layers)
    return ReportPlan(
        calibration=cal, layers=names, sides=chosen_sides, estimators=est_names, ranks=ranks,
        rank=rank, rank_budget=rank_budget, spatpca_layers=sp_layers,
        spatpca_options=sp_options,
        weights=_original_weights(model, names) if model is not None else {},
        factors={n: _factors(adapters[n]) for n in names if n in adapters},
        with_model=model is not None, dpi=dpi)


def _estimator_names(names: Sequence[str], allocation_estimator: str) -> list[str]:
    known = estimators()
    chosen = list(dict.fromkeys(names))
    for name in [*chosen, allocation_estimator]:
        if name not in known or name == "spatpca":
            valid = ", ".join(n for n in known if n != "spatpca")
            raise ValueError(f"unknown estimator {name!r} for the report's spectra; valid: "
                             f"{valid} (smooth PCA is controlled by spatpca=)")
    if not chosen:
        raise ValueError("estimators must name at least one estimator")
    if "empirical" not in chosen:
        chosen.insert(0, "empirical")  # effective rank & co. are defined on it
    return chosen


def _sides(cal: Calibration, sides: Sequence[str] | str | None) -> list[str]:
    chosen = list(cal.sides) if sides is None else [sides] if isinstance(sides, str) \
        else list(sides)
    for side in chosen:
        if side not in cal.sides:
            raise ValueError(f"side {side!r} is not in the calibration, which holds "
                             f"{list(cal.sides)}")
    return chosen


def _resolve_ranks(cal: Calibration, names: list[str], rank: int,
                   adapters: Mapping[str, Any], rank_budget: int | None,
                   max_rank: int | None, allocation_estimator: str,
                   ) -> dict[str, tuple[int, str]]:
    """``layer -> (rank, source)``: the adapter's, the fixed one, or a budget's allocation."""
    if rank_budget is None:
        return {n: (adapters[n].rank, "adapter") if n in adapters else (rank, "fixed")
                for n in names}
    if "input" not in cal.sides:
        raise ValueError("rank_budget= allocates from input-side spectra, but the calibration "
                         "has no input side; calibrate with sides including 'input'")
    spectra: dict[str, Tensor] = {}
    caps: dict[str, int] = {}
    for n in names:
        k, d = cal.shapes[n]
        caps[n] = rank_cap(adapters[n].rank if n in adapters else rank, d, k, max_rank)
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


def _original_weights(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """``name -> W0 (d, k)`` float64 on CPU: the original weight, also under a residual."""
    adapters = find_adapters(model)
    linears = find_linear_layers(model)
    out: dict[str, Tensor] = {}
    for name in names:
        if name in adapters:
            out[name] = original_weight(adapters[name]).to("cpu")
        elif name in linears:
            module = linears[name]
            w = module.weight.detach().to("cpu", torch.float64)
            out[name] = w if isinstance(module, nn.Linear) else w.T  # Conv1D stores (k, d)
    return out


def _factors(adapter: Any) -> tuple[Tensor, Tensor]:
    """``(A (r, k), B (d, r))`` of an adapter, float64 on CPU."""
    a, b = adapter.get_lora()
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
