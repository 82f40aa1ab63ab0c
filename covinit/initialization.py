"""Apply a registered init strategy to every LoRA layer of a model.

:func:`initialize` is the one place where strategies meet layers: it finds the adapters
(covinit's, PEFT's or loralib-style, through :mod:`covinit.adapters`), builds an
:class:`~covinit.inits.InitContext` per layer — the base weight as a float64 copy, the
layer's scaling, a generator seeded from ``seed`` and the layer name, and lazy covariance
estimates from a calibration — runs the strategy, checks what it returned and writes it.

It reads in four stages: :func:`_resolve` checks the arguments against the registries, the
model and the calibration (a :class:`_Request`); :func:`_plan_layer` fixes each layer's
rank, weight ``W0`` and estimates (a :class:`_LayerPlan`); :func:`_compute` runs and checks
the strategy for every layer (a :class:`_LayerWrite` each) before :func:`_apply` writes
anything, so an error leaves the model as it was.

Example
-------
>>> import torch
>>> from torch import nn
>>> from covinit import add_lora, initialize
>>> model = add_lora(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), ["0", "2"],
...                  rank=2)
>>> x = torch.randn(3, 16)
>>> before = model(x)
>>> info = initialize(model, strategy="pissa")
>>> sorted(info), info["0"]["residual"]
(['0', '2'], True)
>>> torch.allclose(model(x), before, atol=1e-5)
True
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from covinit._registry import Entry
from covinit.adapters import (
    LoRAAdapter,
    check_original_base,
    describe_skipped,
    find_adapters,
    find_skipped_adapters,
    mark_initialized,
    quantized_kind,
    skipped_warning,
)
from covinit.allocation import allocate_ranks, rank_cap
from covinit.collect import ALL_SIDES, SIDES, CalibrationLike
from covinit.distributed import storage_ptr
from covinit.inits import InitContext, LoRAInit, get_strategy
from covinit.peft_saving import hook_peft_save, update_peft_patterns
from covinit.residual import original_weight, record_offset, residual_offset
from covinit.selection import Targets, select
from covinit.stats import Moments

__all__ = ["initialize", "layer_seed"]

#: ``stacklevel`` of the warnings, which point at the caller of :func:`initialize`: they are
#: raised two calls below it (``_plan_layer`` ← ``_compute``, ``_hook_saving`` ← ``_apply``).
_CALLER = 4


def layer_seed(seed: int, name: str) -> int:
    """Seed of one layer's generator: stable across runs, processes and Python versions.

    ``zlib.crc32(name, seed mod 2³²)`` (Python's ``hash`` is salted per process).  torch's
    CPU generator keeps only 32 bits of a seed, so the result is 32-bit; for a fixed layer
    name, CRC-32 is a bijection of its start value, so distinct seeds (mod 2³²) never collide.
    """
    return zlib.crc32(name.encode("utf-8"), int(seed) % 2**32)


def initialize(model: nn.Module, calibration: CalibrationLike | None = None, *,
               strategy: str = "kaiming", estimator: str = "ledoit_wolf",
               rank: int | None = None, seed: int = 0,
               layers: Targets | None = None,
               estimator_options: Mapping[str, Any] | None = None,
               rank_budget: int | None = None, max_rank: int | None = None,
               **options: Any) -> dict[str, dict[str, Any]]:
    """Initialize the LoRA factors (and, for residual strategies, the base) of every adapter.

    Parameters
    ----------
    model : nn.Module
        A model with LoRA layers: :func:`covinit.add_lora`, a PEFT model, or loralib-style.
    calibration : covinit.Calibration, optional
        Activation statistics of the same model on task data (see :func:`covinit.calibrate`);
        required by strategies that use covariances (``covinit.strategies()`` lists them).
        Any :class:`~covinit.collect.CalibrationLike` object works.
    strategy : str, default="kaiming"
        A name from ``covinit.strategies()``.
    estimator : str, default="ledoit_wolf"
        Covariance estimator (``covinit.estimators()``), used only by strategies that need
        calibration statistics.
    rank : int, optional
        Expected rank of every selected adapter; ``None`` keeps each adapter's own rank.
        A different value raises ``ValueError`` (to change ranks, see ``rank_budget``).
    seed : int, default=0
        Seed for random parts; each layer's generator is seeded with
        :func:`layer_seed` ``(seed, name)``, so results do not depend on layer order.
    layers : list of str, str or callable, optional
        The adapters to initialize, as :mod:`covinit.selection` reads them; default all.
    estimator_options : mapping, optional
        Keyword arguments for the estimator (e.g. a fixed shrinkage).
    rank_budget : int, optional
        Total rank to distribute over the selected layers by the explained-variance ratio
        of their input covariance estimates (as EVA; :func:`covinit.allocation.allocate_ranks`,
        at least 1 per layer; needs input-side statistics).  Adapters are resized with their
        **scaling kept** (α adjusted; PEFT models get ``rank_pattern`` / ``alpha_pattern``
        entries), which replaces ``lora_A`` / ``lora_B``: create the optimizer afterwards.
    max_rank : int, optional
        Per-layer cap for ``rank_budget``; default twice the layer's current rank (EVA's
        ``rho=2``), at most ``min(d, k)``.
    **options
        Strategy options, passed as ``InitContext.options``.

    Returns
    -------
    dict
        Per layer: ``{"strategy", "rank", "scaling", "residual" (bool: base replaced),
        "delta_norm" (‖scaling·B·A‖_F at step 0), "a_norm", "b_norm"}``, and
        ``"fallback"`` (the reason) where a layer fell back to ``kaiming``.

    Warns
    -----
    UserWarning
        For each layer whose statistics cannot support the strategy (fewer usable positions
        than the rank, or constant activations): it gets ``kaiming`` instead.

    Raises
    ------
    ValueError
        Unknown strategy, estimator, layer or strategy option; rank mismatch; calibration
        (or a layer / side of it) missing for a strategy that needs it; a residual strategy
        on a weight tied to another parameter; a strategy result of wrong shape or non-finite.

    Notes
    -----
    All layers are computed and checked before any is written, so an error leaves the model
    as it was (the new factors and bases of all selected layers are held in memory at once).
    Strategies run on CPU in float64; results are cast to each layer's dtype and device and
    copied in place, so an existing optimizer stays valid (unless ``rank_budget`` resizes).
    """
    request = _resolve(model, calibration, strategy, estimator, rank=rank, seed=seed,
                       layers=layers, rank_budget=rank_budget, options=options)
    estimates = _Estimates(calibration, estimator, estimator_options or {})
    ranks = {name: adapter.rank for name, adapter in request.adapters.items()}
    if rank_budget is not None:
        ranks = _allocate(request.adapters, estimates, rank_budget, max_rank)
    writes, info = _compute(model, request, estimates, ranks)
    _apply(model, writes, patterns=rank_budget is not None)
    return info


# ---------------------------------------------------------------------- stage 1: resolve
@dataclass(frozen=True)
class _Request:
    """One call's checked arguments: the strategy, the selected layers and their data."""

    strategy: Entry[Any]
    adapters: dict[str, LoRAAdapter]
    calibration: CalibrationLike | None
    seed: int
    options: dict[str, Any]

    @property
    def needs(self) -> tuple[str, ...]:
        """The calibration sides the strategy reads (its ``needs`` tag)."""
        return tuple(self.strategy.tags.get("needs", ()))


def _resolve(model: nn.Module, calibration: CalibrationLike | None, strategy: str,
             estimator: str, *, rank: int | None, seed: int,
             layers: Targets | None, rank_budget: int | None,
             options: Mapping[str, Any]) -> _Request:
    """Check every argument against the registries, the model and the calibration (the
    errors :func:`initialize` documents), before anything is computed."""
    entry = get_strategy(strategy)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    allowed = entry.tags.get("options")
    if allowed is not None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"strategy {strategy!r} got unknown options {unknown}; "
                             f"allowed: {sorted(allowed) or 'none'}")
    adapters = find_adapters(model, dora=True)  # DoRA magnitudes follow every write
    skipped = find_skipped_adapters(model)
    if not adapters:
        kinds = f" (only {describe_skipped(skipped)}, left as PEFT initialized them)" \
            if skipped else ""
        raise ValueError(f"model has no LoRA layers covinit initializes{kinds}; add them first "
                         "with covinit.add_lora(...) or peft.get_peft_model(...)")
    if skipped:
        warnings.warn(skipped_warning(skipped), UserWarning, stacklevel=3)  # initialize's caller
    chosen = _select(adapters, layers)
    check_original_base(chosen, "initialize")
    _check_ranks(chosen, rank, rank_budget)
    request = _Request(entry, chosen, calibration, seed, dict(options))
    if calibration is not None:
        calibration.check_model(model)
    _check_sides(request, rank_budget is not None)
    from covinit.covariance import estimators  # lazy: estimators are optional for baselines

    # Checked even when the strategy needs no estimate: a typo must not pass silently.
    if estimator not in estimators():
        raise ValueError(f"unknown estimator {estimator!r}; valid names: "
                         f"{', '.join(estimators())}")
    return request


def _select(adapters: dict[str, LoRAAdapter], layers: Targets | None
            ) -> dict[str, LoRAAdapter]:
    """The adapters ``layers`` selects (all when None), by :func:`covinit.selection.select`."""
    if layers is None:
        return adapters
    modules = {name: adapter.module for name, adapter in adapters.items()}
    return {name: adapters[name] for name in select(modules, layers, what="adapted")}


def _check_ranks(chosen: Mapping[str, LoRAAdapter], rank: int | None,
                 rank_budget: int | None) -> None:
    if rank_budget is not None and rank is not None:
        raise ValueError("pass either rank= (a check of the existing ranks) or rank_budget= "
                         "(a new allocation), not both")
    if rank is None:
        return
    for name, adapter in chosen.items():
        if rank != adapter.rank:
            raise ValueError(
                f"rank={rank} differs from layer {name!r}'s adapter rank {adapter.rank}; "
                "rank= only checks ranks: create the adapters with the rank you want, "
                "or pass rank_budget= to reallocate ranks from the calibration"
            )


def _check_sides(request: _Request, budget: bool) -> None:
    """Every side the strategy (and ``rank_budget=``: the input side) reads is calibrated,
    exactly (not as a sketch), for every selected layer."""
    calibration, needs = request.calibration, request.needs
    required = tuple(dict.fromkeys(needs + (("input",) if budget else ())))
    for side in required:
        what = f"strategy {request.strategy.name!r}" if side in needs else "rank_budget="
        if calibration is None:
            raise ValueError(f"{what} needs {side}-side calibration statistics; "
                             "pass calibration=covinit.calibrate(model, loader, ...)")
        for name in request.adapters:
            if _has_side(calibration, name, side):
                continue
            if _sketched(calibration, name, side):
                raise ValueError(
                    f"layer {name!r} {side} was calibrated as a bounded-memory sketch, "
                    f"but {what} needs its exact moments; calibrate with a larger "
                    "sketch_above= (or without it), or use a data-free strategy")
            raise ValueError(f"calibration has no {side}-side statistics for layer "
                             f"{name!r}, needed by {what}; calibrate with "
                             f"sides including {side!r} and this layer as a target")


def _has_side(calibration: CalibrationLike, name: str, side: str) -> bool:
    """Whether ``calibration`` holds exact moments of ``name``'s ``side`` (a side collected
    as a bounded-memory sketch has none: see :func:`_sketched`)."""
    return (side in getattr(calibration, "sides", SIDES) and name in calibration.layer_names
            and not _sketched(calibration, name, side)
            and calibration.moments(name, side) is not None)


def _sketched(calibration: CalibrationLike, name: str, side: str) -> bool:
    sketch = getattr(calibration, "sketch", None)
    return (sketch is not None and name in calibration.layer_names
            and sketch(name, side) is not None)


# ---------------------------------------------------------------------- stage 2: plan
class _Estimates:
    """Lazy covariance estimates from one calibration, cached across layers.

    The cache is keyed by the identity of the calibration's :class:`~covinit.stats.Moments`
    and ``center`` (and, for ``spatpca``, the number of components), so layers that share
    one input summary (q/k/v) share one estimate.
    """

    def __init__(self, calibration: CalibrationLike | None, estimator: str,
                 options: Mapping[str, Any]) -> None:
        self.calibration = calibration
        self.estimator = estimator
        self.options = dict(options)
        self._cache: dict[tuple, tuple[Any, Any]] = {}

    def for_layer(self, name: str, rank: int) -> dict[str, Callable[..., Any] | None]:
        """``side -> get(center=True)`` for every side (and ``"gradient"``), or None where
        the calibration holds no exact moments of it."""
        cal = self.calibration
        return {side: (self.lazy(name, side, rank)
                       if cal is not None and _has_side(cal, name, side) else None)
                for side in ALL_SIDES}

    def lazy(self, name: str, side: str, rank: int) -> Callable[..., Any]:
        """A callable ``get(center=True)`` returning the (cached) estimate of one layer side.

        ``center=True`` estimates the covariance, ``center=False`` the uncentred second
        moment ``E[xxᵀ]``.  ``spatpca`` is asked for ``min(rank, k − 1)`` components unless
        the estimator options fix ``rank``.
        """

        def get(center: bool = True) -> Any:
            return self._estimate(name, side, rank, center)

        return get

    def _estimate(self, name: str, side: str, rank: int, center: bool) -> Any:
        from covinit.covariance import estimate  # lazy: estimators are optional for baselines

        cal, estimator = self.calibration, self.estimator
        assert cal is not None  # getters exist only with a calibration
        moments = cal.moments(name, side)
        options = dict(self.options)
        if estimator == "spatpca" and "rank" not in options:
            options["rank"] = max(1, min(rank, moments.k - 1))
        key = (id(moments), bool(center), options.get("rank") if estimator == "spatpca" else None)
        if key not in self._cache:
            folds = cal.folds(name, side)
            # Strategies work on CPU in float64 (ctx.weight is a CPU copy): statistics
            # collected on an accelerator are moved here, once per summary.
            used = moments.to("cpu")
            folds = None if folds is None else [f.to("cpu") for f in folds]
            if not center:
                used = _uncentred(used)
                folds = None if folds is None else [_uncentred(f) for f in folds]
            try:
                result = estimate(used, estimator, folds=folds, **options)
            except ValueError as err:  # the estimator cannot know which layer it was given
                raise ValueError(f"layer {name!r} {side}: estimator {estimator!r} failed: "
                                 f"{err}") from err
            # The original object is kept in the entry so that its id stays unique.
            self._cache[key] = (moments, result)
        return self._cache[key][1]


def _uncentred(moments: Moments) -> Moments:
    """The same rows summarised about 0: ``m2 = Σxxᵀ``, ``q = Σ‖x‖⁴`` (the second moment,
    to which every estimator applies unchanged, as ``assume_centered=True`` in sklearn)."""
    return moments.recentered(torch.zeros_like(moments.mean))


def _allocate(chosen: Mapping[str, LoRAAdapter], estimates: _Estimates, budget: int,
              max_rank: int | None) -> dict[str, int]:
    """Per-layer ranks from the input covariance spectra (see ``rank_budget=``)."""
    spectra: dict[str, Tensor] = {}
    caps: dict[str, int] = {}
    for name, adapter in chosen.items():
        caps[name] = cap = rank_cap(adapter.rank, adapter.out_features, adapter.in_features,
                                    max_rank)
        # Centred, as EVA's incremental PCA; for spatpca, as many components as the cap.
        spectra[name] = estimates.lazy(name, "input", cap)(center=True).eigenvalues
    return allocate_ranks(spectra, budget, min_rank=1, max_rank=caps)


@dataclass(frozen=True)
class _LayerPlan:
    """What one layer's init is computed from."""

    name: str
    adapter: LoRAAdapter
    rank: int
    #: The requested strategy, or ``kaiming`` where the layer's statistics cannot carry it.
    strategy: Entry[Any]
    #: Why the layer fell back to ``kaiming``, or None.
    fallback: str | None
    #: ``W0`` (d, k) float64 on CPU: the strategy's own copy.
    weight: Tensor
    #: ``W0`` (d, k) float64 on the layer's device where an earlier residual init is recorded
    #: (the base to restore if this init is not residual), else None.
    original: Tensor | None
    #: ``side -> get(center=True)`` or None, for ``InitContext``.
    estimates: Mapping[str, Callable[..., Any] | None]


def _plan_layer(request: _Request, estimates: _Estimates, name: str, rank: int) -> _LayerPlan:
    """Check the rank, start from the original weight, and fall back to ``kaiming`` (with a
    warning) where the layer's statistics cannot carry the strategy."""
    adapter = request.adapters[name]
    entry, needs = request.strategy, request.needs
    d, k = adapter.out_features, adapter.in_features
    if rank > min(d, k) and (needs or entry.tags.get("preserves") in ("function",
                                                                        "approximate")):
        # PEFT and loralib accept r > min(d, k); a decomposition has only min(d, k)
        # directions to give, so the strategy could not fill A and B.
        raise ValueError(f"strategy {entry.name!r} needs rank <= min(d, k) = {min(d, k)} "
                         f"but layer {name!r} (d={d}, k={k}) has rank {rank}; recreate the "
                         "adapter with a smaller rank or use 'kaiming' / 'gaussian'")
    if (entry.tags.get("preserves") == "approximate"
            and quantized_kind(adapter.base_layer) == "8bit"):
        # The quantized-base strategies write an NF-k (4-bit-style) grid; an int8 layer
        # would store that grid re-rounded to int8, worse than the int8 base it replaced.
        raise ValueError(f"strategy {entry.name!r} writes an NF-k quantized base, but layer "
                         f"{name!r} (d={d}, k={k}) is a bitsandbytes 8-bit (Linear8bitLt) "
                         "base; use it on a 4-bit (nf4) base or a full-precision layer, or "
                         "a residual strategy such as 'pissa' on the int8 base")
    # A layer an earlier residual init changed starts again from the original weight
    # W0 = base + P·Q, so re-initializing never drops that init's c·B0·A0 silently.
    w0 = original_weight(adapter)
    recorded = residual_offset(adapter.module) is not None
    used, reason = entry, None
    if needs:
        assert request.calibration is not None  # _check_sides refused the call otherwise
        reason = _unusable(request.calibration, name, needs, rank)
        if reason is not None:
            warnings.warn(f"layer {name!r}: {reason}; strategy {entry.name!r} falls back to "
                          "'kaiming' for this layer", UserWarning, stacklevel=_CALLER)
            used = get_strategy("kaiming")
    return _LayerPlan(name=name, adapter=adapter, rank=rank, strategy=used, fallback=reason,
                      weight=w0.to("cpu"), original=w0 if recorded else None,
                      estimates=estimates.for_layer(name, rank))


def _unusable(calibration: CalibrationLike, name: str, sides: Iterable[str], rank: int
              ) -> str | None:
    """Why a layer's statistics cannot support a rank-``rank`` covariance init, or None.

    Too few positions (fewer than the rank: at most ``n`` directions carry data), or
    constant activations (zero spread: every direction is arbitrary and whitening divides
    by zero).
    """
    for side in sides:
        m = calibration.moments(name, side)
        if m.n < rank:
            return (f"only {m.n} usable calibration position(s) on the {side} side, fewer than "
                    f"the rank {rank}")
        spread = float(torch.trace(m.m2)) / m.n
        level = float(m.mean @ m.mean)
        if not spread > max(1e-12 * level, torch.finfo(torch.float64).tiny):
            return (f"its {side} activations are constant over all {m.n} calibration "
                    "position(s)")
    return None


def _matched_inputs(calibration: CalibrationLike | None, name: str,
                    estimates: Mapping[str, Any]) -> dict[str, Callable[[], Tensor] | None]:
    """Lazy ``gradient`` (G, (d, k)) and ``input_moment`` (empirical E[xxᵀ], (k, k)) of one
    layer for the strategies (float64 on CPU), or ``None`` where the side is missing."""
    def grad() -> Tensor:
        return calibration.gradient(name).to("cpu", torch.float64)

    def moment() -> Tensor:
        return calibration.moments(name, "input").to("cpu").second_moment()

    return {"gradient": grad if estimates["gradient"] is not None else None,
            "input_moment": moment if estimates["input"] is not None else None}


# ---------------------------------------------------------------------- stage 3: compute, check
@dataclass(frozen=True)
class _LayerWrite:
    """What :func:`_apply` writes into one layer, in the layer's dtypes and device."""

    adapter: LoRAAdapter
    rank: int
    a: Tensor  # (r, k)
    b: Tensor  # (d, r)
    #: The new base (d, k), or None to keep the layer's base.
    base: Tensor | None
    #: Whether ``base`` is a residual ``W0 − c·B·A`` (recorded, so exports can fold it).
    residual: bool
    #: Whether ``base`` replaces ``W0`` (a residual, or an approximating strategy's own base
    #: such as ``Q(W0)``); False when the original ``W0`` is restored.
    replaced: bool = False


def _compute(model: nn.Module, request: _Request, estimates: _Estimates,
             ranks: Mapping[str, int]) -> tuple[list[_LayerWrite], dict[str, dict[str, Any]]]:
    """Run the strategy on every selected layer and check what it returned; nothing is
    written, so an error here leaves the model as it was."""
    tied = _tied_names(model)
    writes: list[_LayerWrite] = []
    info: dict[str, dict[str, Any]] = {}
    for name in request.adapters:
        plan = _plan_layer(request, estimates, name, ranks[name])
        adapter = plan.adapter
        ctx = InitContext(
            name=name,
            weight=plan.weight,
            rank=plan.rank,
            scaling=float(adapter.scaling),
            generator=torch.Generator().manual_seed(layer_seed(request.seed, name)),
            input_estimate=plan.estimates["input"],
            output_estimate=plan.estimates["output"],
            options=dict(request.options) if plan.strategy is request.strategy else {},
            gradient_estimate=plan.estimates["gradient"],
            **_matched_inputs(request.calibration, name, plan.estimates),
        )
        d, k = adapter.out_features, adapter.in_features
        result = _check_result(plan.strategy.fn(ctx), plan.strategy.name, name, d, k, plan.rank)
        if result.base is not None:
            ptr = storage_ptr(adapter.base_layer.weight)
            if ptr in tied:
                raise ValueError(
                    f"strategy {request.strategy.name!r} replaces the base weight of layer "
                    f"{name!r}, but that weight is tied to {tied[ptr]}; a residual would "
                    "change those too"
                )
        writes.append(_layer_write(plan, result))
        info[name] = _summary(plan, result)
    return writes, info


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """``data_ptr -> parameter names`` for every parameter storage registered more than once
    (an FSDP2 ``DTensor`` by its local shard; empty storages, pointer 0, never count)."""
    names: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(storage_ptr(param), []).append(pname)
    return {ptr: ns for ptr, ns in names.items() if len(ns) > 1 and ptr != 0}


def _check_result(result: object, strategy: str, name: str, d: int, k: int, r: int) -> LoRAInit:
    if not isinstance(result, LoRAInit):
        raise TypeError(f"strategy {strategy!r} returned {type(result).__name__} for layer "
                        f"{name!r}; expected covinit.inits.LoRAInit")
    expected = {"A": (result.a, (r, k)), "B": (result.b, (d, r)), "base": (result.base, (d, k))}
    for label, (value, shape) in expected.items():
        if value is None and label == "base":
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"strategy {strategy!r} returned a non-floating {label} for layer "
                            f"{name!r}: {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"strategy {strategy!r} returned {label} of shape "
                             f"{tuple(value.shape)} for layer {name!r} (d={d}, k={k}, r={r}); "
                             f"expected {shape}")
        if not torch.isfinite(value).all():
            raise ValueError(f"strategy {strategy!r} returned non-finite values in {label} for "
                             f"layer {name!r}")
    return result


def _layer_write(plan: _LayerPlan, result: LoRAInit) -> _LayerWrite:
    """The checked ``result`` cast to the layer's dtypes and device."""
    adapter = plan.adapter
    a_now, b_now = adapter.get_lora()
    a = result.a.to(dtype=a_now.dtype, device=a_now.device)
    b = result.b.to(dtype=b_now.dtype, device=b_now.device)
    replaced = result.base is not None
    # An approximating strategy (a quantized base Q(W0)) writes its own base: W0 is not
    # base + c·B·A, so no offset is recorded and exports give (A, B) for that base, as a
    # QLoRA adapter is given for its quantized base.
    residual = replaced and plan.strategy.tags.get("preserves") != "approximate"
    new_base = _rounded_residual(result, a, b, adapter.scaling) if replaced else plan.original
    w0 = adapter.base_weight()
    base = None if new_base is None else new_base.to(dtype=w0.dtype, device=w0.device)
    return _LayerWrite(adapter=adapter, rank=plan.rank, a=a, b=b, base=base, residual=residual,
                       replaced=replaced)


def _rounded_residual(result: LoRAInit, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """The strategy's base, corrected for the rounding of its factors, in float64 (d, k).

    The layer computes ``base + c·B̃·Ã`` with ``Ã``, ``B̃`` the factors rounded to the
    adapter's dtype; taking ``base + c·(B·A − B̃·Ã)`` in float64 keeps ``base + c·B̃·Ã``
    equal to what the strategy meant, so the only rounding left is the base's own, once, to
    the weight's dtype (in bf16 the residual is small, so is its rounding error).
    """
    f64 = torch.float64
    lhs = torch.cat([result.b.to(f64), -b.to(device="cpu", dtype=f64)], dim=1)  # (d, 2r)
    rhs = torch.cat([result.a.to(f64), a.to(device="cpu", dtype=f64)], dim=0)  # (2r, k)
    return result.base.to(f64) + scaling * (lhs @ rhs)


def _summary(plan: _LayerPlan, result: LoRAInit) -> dict[str, Any]:
    """One layer's entry of :func:`initialize`'s return value."""
    scaling = float(plan.adapter.scaling)
    a64, b64 = result.a.to(torch.float64), result.b.to(torch.float64)
    # ‖c·B·A‖_F² = c²·tr((BᵀB)(AAᵀ)): r×r products, never the d×k matrix.
    delta_sq = torch.trace((b64.T @ b64) @ (a64 @ a64.T)).clamp_min(0.0)
    out = {
        "strategy": plan.strategy.name,
        "rank": plan.rank,
        "scaling": scaling,
        "residual": result.base is not None,
        "delta_norm": float(scaling * delta_sq.sqrt()),
        "a_norm": float(torch.linalg.norm(a64)),
        "b_norm": float(torch.linalg.norm(b64)),
    }
    if plan.fallback is not None:
        out["fallback"] = plan.fallback
    return out


# ---------------------------------------------------------------------- stage 4: apply
def _apply(model: nn.Module, writes: list[_LayerWrite], *, patterns: bool) -> None:
    """Write every layer (A, B, base, residual record), then PEFT's rank patterns (after a
    ``rank_budget=`` reallocation) and its save hook (after a residual init)."""
    for w in writes:
        adapter = w.adapter
        if w.rank != adapter.rank:
            adapter.resize(w.rank)
        if w.base is not None:
            approximating = w.replaced and not w.residual
            before = adapter.base_weight() if approximating else None
            was_replaced = adapter.base_replaced
            adapter.set_base_weight(w.base, replaced=w.replaced)
            if before is not None and torch.equal(before, adapter.base_weight()):
                # A quantized layer took Q(W0) back onto its own grid bit for bit: the base
                # the user loaded is unchanged, so exports and saves need not carry it
                # (rewriting the same codes is the only way to reset the flag).
                adapter.set_base_weight(before, replaced=was_replaced)
            # Remember W0 = base + c·B0·A0 (or forget it when W0 itself was restored, or
            # replaced by an approximating base), so export_lora can target the original.
            record_offset(adapter, w.b if w.residual else None, w.a if w.residual else None)
        adapter.set_lora(w.a, w.b)
        mark_initialized(adapter)  # lets calibrate tell these factors from trained ones
    if patterns:
        update_peft_patterns(model, {w.adapter.name: w.adapter for w in writes})
    _hook_saving(model, [w.adapter for w in writes if w.residual])


def _hook_saving(model: nn.Module, residual: list[LoRAAdapter]) -> None:
    """After a residual init on PEFT layers: make the PeftModel's own ``save_pretrained``
    write adapters for the original base (:func:`covinit.peft_saving.hook_peft_save`), or, when
    ``model`` is not the PeftModel itself, say which call does."""
    names = {getattr(adapter, "adapter_name", None) for adapter in residual} - {None}
    if not names:
        return
    name = sorted(names)[0]
    if not hook_peft_save(model, name):
        warnings.warn(
            f"initialize rewrote base weights of PEFT adapter {name!r} (layers "
            f"{[a.name for a in residual][:3]}...) on a {type(model).__name__}, not a PeftModel, "
            "so PEFT's save_pretrained would write an adapter that needs the rewritten base; "
            "save it with covinit.export_lora(peft_model, directory, format='peft'), or call "
            "covinit.restore_base(peft_model) before saving (or initialize the PeftModel "
            "itself, whose save_pretrained covinit then converts)", UserWarning,
            stacklevel=_CALLER)
