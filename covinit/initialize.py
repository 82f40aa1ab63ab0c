"""Apply a registered init strategy to every LoRA layer of a model.

:func:`initialize` is the one place where strategies meet layers: it finds the adapters
(covinit's, PEFT's or loralib-style, through :mod:`covinit.adapters`), builds an
:class:`~covinit.strategies.InitContext` per layer — the base weight as a float64 copy, the
layer's scaling, a generator seeded from ``seed`` and the layer name, and lazy covariance
estimates from a calibration — runs the strategy, checks what it returned and writes it.

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

import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from covinit.adapters import LoRAAdapter, find_adapters
from covinit.strategies import InitContext, LoRAInit, get_strategy

__all__ = ["SIDES", "initialize", "layer_seed"]

SIDES = ("input", "output")


def layer_seed(seed: int, name: str) -> int:
    """Seed of one layer's generator: stable across runs, processes and Python versions.

    ``zlib.crc32(name, seed mod 2³²)`` (Python's ``hash`` is salted per process).  torch's
    CPU generator keeps only 32 bits of a seed, so the result is 32-bit; for a fixed layer
    name, CRC-32 is a bijection of its start value, so distinct seeds (mod 2³²) never collide.
    """
    return zlib.crc32(name.encode("utf-8"), int(seed) % 2**32)


def _select(adapters: dict[str, LoRAAdapter],
            layers: Iterable[str] | Callable[[str], bool] | None) -> dict[str, LoRAAdapter]:
    if layers is None:
        return adapters
    if callable(layers):
        chosen = {n: a for n, a in adapters.items() if layers(n)}
    else:
        if isinstance(layers, str):
            layers = [layers]
        wanted = list(layers)
        unknown = [n for n in wanted if n not in adapters]
        if unknown:
            raise ValueError(f"layers {unknown} have no LoRA adapter; adapted layers: "
                             f"{', '.join(adapters)}")
        chosen = {n: adapters[n] for n in wanted}
    if not chosen:
        raise ValueError(f"layers selects no adapted layer; adapted layers: {', '.join(adapters)}")
    return chosen


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """``data_ptr -> parameter names`` for every parameter storage registered more than once."""
    names: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param.data_ptr(), []).append(pname)
    return {ptr: ns for ptr, ns in names.items() if len(ns) > 1}


def _lazy_estimate(calibration: Any, name: str, side: str, estimator: str,
                   estimator_options: Mapping[str, Any],
                   cache: dict[int, tuple[Any, Any]]) -> Callable[[], Any]:
    """A zero-argument callable returning the (cached) estimate for one layer and side.

    The cache is keyed by the identity of the calibration's :class:`~covinit.stats.Moments`,
    so layers that share one input summary (q/k/v) share one estimate.
    """

    def get() -> Any:
        from covinit.estimators import estimate  # lazy: estimators are optional for baselines

        moments = calibration.moments(name, side)
        key = id(moments)
        if key not in cache:
            folds = calibration.folds(name, side)
            cache[key] = (moments, estimate(moments, estimator, folds=folds, **estimator_options))
        return cache[key][1]

    return get


def _has_side(calibration: Any, name: str, side: str) -> bool:
    return name in calibration.layer_names and calibration.moments(name, side) is not None


def _check_result(result: object, strategy: str, name: str, d: int, k: int, r: int) -> LoRAInit:
    if not isinstance(result, LoRAInit):
        raise TypeError(f"strategy {strategy!r} returned {type(result).__name__} for layer "
                        f"{name!r}; expected covinit.strategies.LoRAInit")
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


def initialize(
    model: nn.Module,
    calibration: Any = None,
    *,
    strategy: str = "kaiming",
    estimator: str = "ledoit_wolf",
    rank: int | None = None,
    seed: int = 0,
    layers: Iterable[str] | Callable[[str], bool] | None = None,
    estimator_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Initialize the LoRA factors (and, for residual strategies, the base) of every adapter.

    Parameters
    ----------
    model : nn.Module
        A model with LoRA layers: :func:`covinit.add_lora`, a PEFT model, or loralib-style.
    calibration : covinit.Calibration, optional
        Activation statistics of the same model on task data (see :func:`covinit.calibrate`);
        required by strategies that use covariances (``covinit.strategies()`` lists them).
    strategy : str, default="kaiming"
        A name from ``covinit.strategies()``.
    estimator : str, default="ledoit_wolf"
        Covariance estimator (``covinit.estimators()``), used only by strategies that need
        calibration statistics.
    rank : int, optional
        Expected rank of every selected adapter; ``None`` keeps each adapter's own rank.
        Changing ranks is not supported here yet: a different value raises ``ValueError``.
    seed : int, default=0
        Seed for random parts; each layer's generator is seeded with
        :func:`layer_seed` ``(seed, name)``, so results do not depend on layer order.
    layers : list of str or callable, optional
        Canonical names of the adapters to initialize (or a predicate on the name); default
        all of them.
    estimator_options : mapping, optional
        Keyword arguments for the estimator (e.g. a fixed shrinkage).
    **options
        Strategy options, passed as ``InitContext.options``.

    Returns
    -------
    dict
        Per layer: ``{"strategy", "rank", "scaling", "residual" (bool: base replaced),
        "delta_norm" (‖scaling·B·A‖_F at step 0), "a_norm", "b_norm"}``.

    Raises
    ------
    ValueError
        Unknown strategy, unknown layer, rank mismatch, unknown strategy option, missing
        calibration (or a layer / side it lacks) for a strategy that needs it, a residual
        strategy on a layer whose weight is tied to another parameter, or a strategy result
        with a wrong shape or non-finite values.

    Notes
    -----
    All layers are computed and checked before any is written, so an error leaves the model
    as it was.  That holds the new factors (and residual bases) of all selected layers in
    memory at once, in the layers' dtypes.  Strategies run on CPU in float64; results are
    cast to each layer's dtype and device.  ``requires_grad`` flags and parameter objects
    are unchanged (values are copied in place), so an existing optimizer stays valid.
    """
    entry = get_strategy(strategy)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    allowed = entry.tags.get("options")
    if allowed is not None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"strategy {strategy!r} got unknown options {unknown}; "
                             f"allowed: {sorted(allowed) or 'none'}")
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no LoRA layers; add them first with covinit.add_lora(...) "
                         "or peft.get_peft_model(...)")
    chosen = _select(adapters, layers)
    if rank is not None:
        for name, adapter in chosen.items():
            if rank != adapter.rank:
                raise ValueError(
                    f"rank={rank} differs from layer {name!r}'s adapter rank {adapter.rank}; "
                    "changing ranks is not supported by initialize() yet: create the adapters "
                    "with the rank you want (or pass rank=None)"
                )
    needs = tuple(entry.tags.get("needs", ()))
    if calibration is not None:
        calibration.check_model(model)
    for side in needs:
        if calibration is None:
            raise ValueError(f"strategy {strategy!r} needs {side}-side calibration statistics; "
                             "pass calibration=covinit.calibrate(model, loader, ...)")
        for name in chosen:
            if not _has_side(calibration, name, side):
                raise ValueError(f"calibration has no {side}-side statistics for layer "
                                 f"{name!r}, needed by strategy {strategy!r}; calibrate with "
                                 f"sides including {side!r} and this layer as a target")
    if needs:
        from covinit.estimators import estimators

        if estimator not in estimators():
            raise ValueError(f"unknown estimator {estimator!r}; valid names: "
                             f"{', '.join(estimators())}")

    est_options = dict(estimator_options or {})
    cache: dict[int, tuple[Any, Any]] = {}
    tied = _tied_names(model)
    planned: list[tuple[LoRAAdapter, Tensor, Tensor, Tensor | None]] = []
    info: dict[str, dict[str, Any]] = {}
    for name, adapter in chosen.items():
        d, k, r = adapter.out_features, adapter.in_features, adapter.rank
        w0 = adapter.base_weight()
        estimates = {
            side: (_lazy_estimate(calibration, name, side, estimator, est_options, cache)
                   if calibration is not None and _has_side(calibration, name, side) else None)
            for side in SIDES
        }
        ctx = InitContext(
            name=name,
            weight=w0.to(device="cpu", dtype=torch.float64, copy=True),
            rank=r,
            scaling=float(adapter.scaling),
            generator=torch.Generator().manual_seed(layer_seed(seed, name)),
            input_estimate=estimates["input"],
            output_estimate=estimates["output"],
            options=dict(options),
        )
        result = _check_result(entry.fn(ctx), strategy, name, d, k, r)
        if result.base is not None:
            ptr = adapter.base_layer.weight.data_ptr()
            if ptr in tied:
                raise ValueError(
                    f"strategy {strategy!r} replaces the base weight of layer {name!r}, but that "
                    f"weight is tied to {tied[ptr]}; a residual would change those too"
                )
        a_now, b_now = adapter.get_lora()
        a = result.a.to(dtype=a_now.dtype, device=a_now.device)
        b = result.b.to(dtype=b_now.dtype, device=b_now.device)
        base = (None if result.base is None
                else result.base.to(dtype=w0.dtype, device=w0.device))
        planned.append((adapter, a, b, base))
        a64, b64 = result.a.to(torch.float64), result.b.to(torch.float64)
        # ‖c·B·A‖_F² = c²·tr((BᵀB)(AAᵀ)): r×r products, never the d×k matrix.
        delta_sq = torch.trace((b64.T @ b64) @ (a64 @ a64.T)).clamp_min(0.0)
        info[name] = {
            "strategy": strategy,
            "rank": r,
            "scaling": float(adapter.scaling),
            "residual": result.base is not None,
            "delta_norm": float(adapter.scaling * delta_sq.sqrt()),
            "a_norm": float(torch.linalg.norm(a64)),
            "b_norm": float(torch.linalg.norm(b64)),
        }
    for adapter, a, b, base in planned:
        if base is not None:
            adapter.set_base_weight(base)
        adapter.set_lora(a, b)
    return info
