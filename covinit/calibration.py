"""Run a model over task data once and keep each target layer's activation statistics.

:func:`calibrate` drives :class:`covinit.collect.Collector` over a dataloader and returns a
:class:`~covinit.calibration_data.Calibration` (the container and its file live in
:mod:`covinit.calibration_data`): exact float64 :class:`~covinit.stats.Moments` per layer
and side ("input" = the rows ``x`` the layer multiplies, "output" = ``W0·x + b``), optional
per-fold summaries for cross-validation, and a fingerprint of the model's linear layers.

:func:`calibrate` runs in named stages: resolve the arguments into a plan (layers, adapters,
limits) → build the collector (memory checked before any batch) → one pass over the data
(hooks, modes, flags, ranks' agreement and merge) → check the pass (never-called or fully
masked layers) → build the :class:`Calibration` → initialize the adapters.

Notes
-----
Which adapters :func:`calibrate` re-initializes (README: "Calibration").  Adapters that are
no longer at their initial state are refused unless ``overwrite=True``: re-initializing them
would silently throw their training away.  An adapter counts as initial when (1) its factors
are still those covinit's last init wrote (a SHA-256 of A, B recorded in memory by
:func:`covinit.initialize`), or, with no such record, (2) they still equal the step-0 factors
of covinit's residual init recorded with the layer (``W0 = base + c·B0·A0``), or (3) the
adapter adds nothing (``B·A = 0`` with the base untouched: PEFT's
``init_lora_weights=True`` / ``"gaussian"``, loralib, ``add_lora``).  Anything else (trained,
loaded from a trained adapter, PEFT's random ``init_lora_weights=False``) is treated as
trained.

PEFT LoRA layers covinit does not initialize (embedding adapters,
``target_modules=["embed_tokens", ...]``, and convolutions) keep PEFT's own init
(embeddings: ``A = 0``, ``B ~ N(0, 1)``, so ``ΔW = 0``), with one ``UserWarning`` per call
naming them (see :func:`covinit.adapters.find_skipped_adapters` for why).

The model runs in eval mode (set by flag: loralib's ``train()``/``eval()`` would merge
``B·A`` into the weight) under ``torch.no_grad()`` (with the gradient side: with gradients
enabled, and a backward pass that writes no parameter's ``.grad``); its train/eval modes and
``requires_grad`` flags are restored and every hook is removed afterwards, also when an
exception (or ``KeyboardInterrupt``) escapes.  Under an initialized ``torch.distributed``
group each rank reads its own shard and the summaries are merged once at the end.

Calibrating a large model (``max_memory=``, :mod:`covinit.budget`): the target layers are
split into groups whose statistics fit the budget (layers fed one tensor, found on the first
batch, stay together) and the data is read once per group; a finished group's statistics
move to CPU memory, which holds them all in the end (the budget bounds what collecting holds
on the device, e.g. a GPU, not the returned :class:`Calibration`), announced before the first pass
(on stderr, and as the progress bar's "pass 2/5: ..." description) and recorded in
``info["memory_plan"]``.  Each pass is the ordinary one on its group, held to the first
pass's batches, so the statistics are bitwise those of a single pass.  More than one pass
needs a re-iterable dataloader (a list, an unshuffled ``DataLoader``): a one-shot iterator or
a shuffling ``DataLoader`` is refused before the first pass (ValueError), and so is a layer
whose statistics alone exceed the budget (unless ``sketch_above=`` makes it fit).

Example
-------
>>> import torch
>>> from torch import nn
>>> from covinit import calibrate
>>> model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
>>> data = [torch.randn(8, 6) for _ in range(3)]
>>> cal = calibrate(model, data, targets=["0"], show_progress=False)
>>> cal.layer_names, cal.moments("0", "input").n
(['0'], 24)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from covinit import distributed
from covinit.adapters import (
    LoRAAdapter,
    check_original_base,
    describe_skipped,
    find_adapters,
    find_linear_layers,
    find_skipped_adapters,
    is_inert,
    matches_initialized,
    model_fingerprint,
    quantized_kind,
    skipped_warning,
)
from covinit.budget import CalibrationPlan, plan_calibration
from covinit.calibration_data import FORMAT, Calibration
from covinit.collect import (
    GRADIENT,
    PRECISIONS,
    SIDES,
    CalibrationLike,
    Collector,
    GradientCalibrationLike,
    StreamResult,
    Targets,
    call_model,
    match_layers,
    move_to_device,
)
from covinit.initialization import initialize
from covinit.residual import residual_offset
from covinit.sketch import Sketch
from covinit.stats import sum_in_order

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_STRATEGY",
    "FORMAT",
    "Calibration",
    "CalibrationLike",
    "GradientCalibrationLike",
    "calibrate",
]

#: What :func:`calibrate` initializes a LoRA model with when no ``strategy=`` is given, with
#: :data:`DEFAULT_OPTIONS` (``input-pca@empirical+matched`` in the benchmark's labels).  Chosen
#: by the rule in ``benchmarks/choose_default.py`` (paired 95 % intervals of the final
#: validation loss vs Kaiming, at Kaiming's rate and at each method's own, over every
#: full-precision benchmark configuration): the one covariance-informed strategy that wins a
#: configuration (SmolLM2 + ChatterBot, 5 seeds) and loses none — see the README's results
#: ("Does covariance-informed init win?").  It reads only the input side (a forward pass) and
#: starts with ``B = 0`` (the model is unchanged at step 0), at Kaiming's step size.
DEFAULT_STRATEGY = "input-pca"
#: Options that come with :data:`DEFAULT_STRATEGY` when the caller names no strategy (each one
#: the caller sets, e.g. ``estimator=``, wins).
DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType({"estimator": "empirical",
                                                       "scale": "matched"})

# ---------------------------------------------------------------------- calibrate
def calibrate(
    model: nn.Module, dataloader: Iterable[Any], *, targets: Targets | None = None,
    sides: Sequence[str] = SIDES, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None, max_batches: int | None = None,
    max_tokens: int | None = None, device: torch.device | str | None = None,
    show_progress: bool = True, folds: int | None = None, precision: str = "float64",
    sketch_above: int | None = None, sketch_size: int = 256, strategy: str | None = None,
    estimator: str | None = None, init: bool = True, overwrite: bool = False,
    max_memory: int | str | None = None, **init_options: Any,
) -> Calibration:
    """Collect activation statistics of a model's linear layers on task data.

    On a plain model ``targets`` selects the layers.  On a model holding LoRA layers (covinit's,
    PEFT's, DoRA, loralib-style) the layers under them are calibrated, then initialized in place
    by :func:`covinit.initialization.initialize` unless ``init=False``; trained adapters are
    refused unless ``overwrite=True``; PEFT embedding / convolution adapters keep PEFT's init
    (one ``UserWarning``).  Modes, flags and hooks are restored even on errors (module notes).

    Parameters
    ----------
    model : nn.Module
    dataloader : iterable
        Batches: dicts (keyword arguments), tuples (positional) or tensors.  Positions with
        ``attention_mask == 0`` and token-level ``labels == -100`` are left out.
    targets : list of str, str or callable, optional
        Layers (:func:`covinit.collect.match_layers`): required on a plain model, a filter of
        the adapted layers on a LoRA model.
    sides : sequence of {"input", "output", "gradient"}, default=("input", "output")
        ``"gradient"`` (needs ``"input"``; not with ``sketch_above``) adds a backward pass per
        batch and keeps the moments of ``δ = ∂L/∂y`` and ``G`` (:meth:`Calibration.gradient`).
    forward_fn, loss_fn : callable, optional
        ``forward_fn(model, batch)`` replaces the default call; ``loss_fn(outputs, batch)``
        gives the gradient side's scalar loss (default: ``outputs.loss``).
    max_batches, max_tokens : int, optional
        Stop after this many batches / once this many positions were kept.
    device : torch.device or str, optional
        Where batches go; default: the device of the model's first parameter.
    show_progress : bool, default=True
        A tqdm bar over batches, with positions per second.
    folds : int, optional
        Per-fold summaries (batch ``i`` → fold ``i % folds``) for cross-validation.
    precision : {"float64", "mixed"}, default="float64"
        Exact (~1e-13), or the ``yᵀy`` product in float32 (~1e-7 of the spread, half the cost).
    sketch_above : int, optional; sketch_size : int, default=256
        Sides at least ``sketch_above`` wide keep a k×``sketch_size``
        :class:`~covinit.sketch.Sketch` instead of the exact k×k summary (not with ``folds``).
    max_memory : int or str, optional
        Statistics budget, e.g. ``"8GB"``: more passes over the data if needed (module notes).
    strategy, estimator : str, optional
        The init on a LoRA model (default :data:`DEFAULT_STRATEGY` + :data:`DEFAULT_OPTIONS`).
    init, overwrite : bool, default=True, False
        ``init=False``: statistics only (A, B, DoRA magnitudes and base stay bit-identical);
        ``overwrite=True``: re-initialize adapters no longer at their initial state.
    **init_options
        Further keyword arguments of :func:`covinit.initialization.initialize` (``rank=``, …).

    Returns
    -------
    Calibration

    Raises
    ------
    ValueError
        No batches; ``targets`` missing or matching nothing; a target never called or with
        every position masked; NaN/Inf activations; fewer kept positions than the rank;
        trained adapters without ``overwrite``; only embedding adapters and no ``targets``.
    TypeError
        A batch the default call cannot handle; init options on a plain model or with
        ``init=False``.
    """
    request = _InitRequest(init, strategy, estimator, overwrite, dict(init_options))
    plan = _resolve(model, targets, sides, loss_fn, request, max_batches=max_batches,
                    max_tokens=max_tokens, folds=folds, precision=precision, device=device,
                    sketch=(sketch_above, sketch_size), max_memory=max_memory)
    run = _collect_in_passes(model, dataloader, plan, forward_fn, loss_fn, show_progress)
    _check_pass(run, list(plan.layers))
    cal = _build(run, plan)
    if plan.adapters and init:
        _initialize(model, cal, plan)
    return cal


@dataclass(frozen=True)
class _InitRequest:
    """The initialization half of :func:`calibrate`'s arguments."""

    init: bool
    strategy: str | None
    estimator: str | None
    overwrite: bool
    options: dict[str, Any]

    def given(self) -> list[str]:
        """Names of the initialization options the caller passed (for error messages)."""
        flags = {"strategy": self.strategy is not None, "estimator": self.estimator is not None,
                 "overwrite": bool(self.overwrite)}
        return sorted([*self.options, *(name for name, given in flags.items() if given)])


@dataclass(frozen=True)
class _Plan:
    """What :func:`calibrate` resolved from its arguments before reading any data."""

    layers: dict[str, nn.Module]  # canonical name -> module whose forward is hooked
    adapters: dict[str, LoRAAdapter]  # the adapters over ``layers`` (empty: a plain model)
    skipped: dict[str, str]  # PEFT adapters covinit leaves alone: name -> kind
    targeted: bool  # targets= was given
    request: _InitRequest
    device: torch.device | None
    fingerprint: dict[str, Any]
    n_folds: int
    max_batches: int | None
    max_tokens: int | None
    sides: tuple[str, ...]  # as given
    precision: str
    sketch_above: int | None
    sketch_size: int
    max_memory: int | str | None
    label: str = "calibrate"  # the progress bar's description


@dataclass(frozen=True)
class _Pass:
    """What one pass over the data collected (merged over ranks when distributed)."""

    results: dict[tuple[str, str], StreamResult]
    shared: dict[str, str]  # layer -> owner whose input summary it shares
    batches: int
    positions: int
    seconds: float
    own_batches: int  # this rank's batches (``batches`` is summed over ranks)
    shapes: dict[str, tuple[int, int]]  # layer -> (k, d)
    sides: tuple[str, ...]  # as collected (gradient last)
    memory_plan: dict[str, Any] | None = None  # CalibrationPlan.info() under max_memory=


def _resolve(model: nn.Module, targets: Targets | None, sides: Sequence[str],
             loss_fn: Callable[..., Tensor] | None, request: _InitRequest, *,
             max_batches: int | None, max_tokens: int | None, folds: int | None,
             precision: str, device: torch.device | str | None,
             sketch: tuple[int | None, int], max_memory: int | str | None) -> _Plan:
    """Stage 1: check the arguments and choose the layers (and adapters) to calibrate."""
    max_batches = _positive_int(max_batches, "max_batches")
    max_tokens = _positive_int(max_tokens, "max_tokens")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    n_folds = _positive_int(folds, "folds") or 1
    if loss_fn is not None and GRADIENT not in sides:
        raise ValueError(f"loss_fn is only used by the gradient side; sides={tuple(sides)!r} "
                         "does not include 'gradient'")
    adapters = find_adapters(model, dora=True)
    skipped = find_skipped_adapters(model)
    if not request.init and request.given():
        raise TypeError(f"init=False collects statistics only, but initialization options "
                        f"{request.given()} were given; drop them or leave init=True")
    layers = (_adapted_layers(model, adapters, targets, request) if adapters
              else _plain_layers(model, targets, skipped, request))
    return _Plan(
        layers=layers, adapters={name: adapters[name] for name in layers if name in adapters},
        skipped=skipped, targeted=targets is not None, request=request,
        device=torch.device(device) if device is not None else _model_device(model),
        fingerprint=model_fingerprint(model), n_folds=n_folds, max_batches=max_batches,
        max_tokens=max_tokens, sides=tuple(sides), precision=precision,
        sketch_above=sketch[0], sketch_size=sketch[1], max_memory=max_memory)


def _adapted_layers(model: nn.Module, adapters: Mapping[str, LoRAAdapter],
                    targets: Targets | None, request: _InitRequest) -> dict[str, nn.Module]:
    """The base layers under ``adapters`` (those ``targets`` matches), refusing rewritten
    bases and, when they would be re-initialized, trained adapters."""
    base_layers = find_linear_layers(model)
    layers = {name: base_layers[name] for name in adapters}
    if targets is not None:
        chosen = match_layers(model, targets)
        layers = {name: module for name, module in layers.items() if name in chosen}
        if not layers:
            raise ValueError(f"targets {targets!r} match no LoRA layer; adapted layers: "
                             f"{', '.join(adapters)}")
    check_original_base({name: adapters[name] for name in layers}, "calibrate")
    if request.init and not request.overwrite:
        _refuse_trained({name: adapters[name] for name in layers})
    return layers


def _plain_layers(model: nn.Module, targets: Targets | None, skipped: Mapping[str, str],
                  request: _InitRequest) -> dict[str, nn.Module]:
    """The layers ``targets`` selects in a model without LoRA layers covinit initializes."""
    if targets is None and skipped:
        raise ValueError(
            f"the model's LoRA layers are all of kinds covinit does not initialize "
            f"({describe_skipped(skipped)}); they keep PEFT's own init (embeddings: A = 0, "
            "B ~ N(0, 1), so the model is unchanged at step 0). Pass targets= to collect "
            "statistics of linear layers")
    if targets is None:
        available = ", ".join(find_linear_layers(model)) or "(none)"
        raise ValueError("the model has no LoRA layers, so calibrate needs targets= "
                         f"(name suffixes, a regex or a callable); available: {available}")
    if request.given():
        raise TypeError(f"initialization options {request.given()} need a model with LoRA "
                        "layers; call covinit.add_lora (or PEFT) first")
    return match_layers(model, targets)


def _make_collector(plan: _Plan) -> Collector:
    """The hooks' state for one pass, refused before any batch when it cannot fit in
    memory."""
    if plan.sketch_above is not None and plan.n_folds > 1:
        raise ValueError("folds need exact summaries; use either folds= or sketch_above=")
    collector = Collector(plan.layers, plan.sides, precision=plan.precision,
                          folds=plan.n_folds, sketch_above=plan.sketch_above,
                          sketch_size=plan.sketch_size,
                          offsets=_output_offsets(plan.adapters, plan.layers))
    _check_memory(collector, plan.device)
    return collector


def _collect(model: nn.Module, dataloader: Iterable[Any], plan: _Plan, collector: Collector,
             forward_fn: Callable[[nn.Module, Any], Any] | None,
             loss_fn: Callable[[Any, Any], Tensor] | None, show_progress: bool) -> _Pass:
    """Stage 3: one pass over the data with the hooks in place, then every hook removed and
    the modes and ``requires_grad`` flags restored (also on errors); ranks agree and merge."""
    start = time.perf_counter()
    try:
        with _calibration_mode(model), collector:
            batches, positions = _run_batches(model, dataloader, plan, collector, forward_fn,
                                              loss_fn, show_progress)
        # Reduces the rows still staged: a NaN among them fails this rank here, before the
        # ranks agree, so the others stop instead of waiting in the merge.
        results = collector.results()
    except BaseException:
        try:  # let the other ranks stop instead of waiting in the merge
            _agree_ranks_ok(ok=False)
        except Exception:  # the error to report is the one being handled
            pass
        raise
    finally:
        collector.remove()
    seconds = time.perf_counter() - start
    _agree_ranks_ok(ok=True)
    shared, own = collector.shared_inputs(), batches
    if distributed.is_distributed():
        results, shared, (batches, positions) = _merge_ranks(
            results, shared, list(plan.layers), [batches, positions])
    return _Pass(results, shared, batches, positions, seconds, own, collector.shapes,
                 collector.sides)


# ---------------------------------------------------------------------- memory budget
def _plan_passes(model: nn.Module, dataloader: Iterable[Any], plan: _Plan,
                 forward_fn: Callable[[nn.Module, Any], Any] | None, show_progress: bool
                 ) -> CalibrationPlan:
    """Stage 2: group the layers into passes (one without a budget), announced before any
    pass.  Layers fed one tensor must share a pass (see :mod:`covinit.budget`): when more
    than one pass is needed they are found on the first batch by :func:`_probe_sharing`.
    """
    def make(units: Sequence[Sequence[str]]) -> CalibrationPlan:
        return plan_calibration(plan.layers, sides=plan.sides, max_memory=plan.max_memory,
                                folds=plan.n_folds, sketch_above=plan.sketch_above,
                                sketch_size=plan.sketch_size, units=units,
                                precision=plan.precision)

    budget = make([[name] for name in plan.layers])  # refuses a layer alone over budget
    if budget.passes > 1:
        _require_reiterable(dataloader, budget.passes)
        budget = make(_probe_sharing(model, dataloader, plan, forward_fn))
    if plan.max_memory is not None and show_progress and (
            not distributed.is_distributed() or torch.distributed.get_rank() == 0):
        print(f"covinit.calibrate: {budget.describe().splitlines()[0]}", file=sys.stderr)
    return budget


def _require_reiterable(dataloader: Iterable[Any], passes: int) -> None:
    """Refuse, before the first pass, data that cannot be read ``passes`` times alike."""
    if iter(dataloader) is dataloader:  # generators, iter(...), file objects
        raise ValueError(
            f"max_memory needs {passes} or more passes over the data, but the dataloader is "
            f"a one-shot iterator ({type(dataloader).__name__}) that can be read only once; "
            "pass a list of batches or a torch DataLoader, or raise max_memory")
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(dataloader, DataLoader) and isinstance(dataloader.sampler, RandomSampler):
        raise ValueError(
            f"max_memory needs {passes} or more passes over the data, but the DataLoader "
            "shuffles (shuffle=True), so every pass would see other batches; use "
            "shuffle=False for calibration")


def _probe_sharing(model: nn.Module, dataloader: Iterable[Any], plan: _Plan,
                   forward_fn: Callable[[nn.Module, Any], Any] | None) -> list[list[str]]:
    """Layers fed the same tensor in one forward pass of the first batch (the tensors the
    collector would reduce once), as units in the model's order; one forward, no statistics.

    A tensor is recognised as the collector does (storage pointer, shape, strides, dtype,
    version, still alive); matching also an observed output covers a layer feeding the next.
    """
    batch = next(iter(dataloader), None)
    if batch is None:  # the first pass reports the empty dataloader
        return [[name] for name in plan.layers]
    owner = {name: name for name in plan.layers}

    def root(name: str) -> str:
        while owner[name] != name:
            name = owner[name]
        return name

    seen: dict[tuple[Any, ...], tuple[Any, int, str]] = {}

    def record(name: str, tensor: Any) -> None:
        if not isinstance(tensor, Tensor) or tensor.is_inference():  # the collector's rule
            return
        key = (tensor.data_ptr(), tensor.device, tensor.dtype, tuple(tensor.shape),
               tensor.stride(), tensor.storage_offset())
        entry = seen.get(key)
        if entry is not None and entry[0]() is not None and entry[1] == tensor._version:
            owner[root(name)] = root(entry[2])
        else:
            seen[key] = (weakref.ref(tensor), tensor._version, name)

    def hook(name: str) -> Callable[..., None]:
        def observe(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
            record(name, args[0] if args else next(iter(kwargs.values()), None))
            if "output" in plan.sides:
                record(name, output)
        return observe

    handles = []
    try:
        with _calibration_mode(model):
            for name, module in plan.layers.items():
                handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
            call_model(model, move_to_device(batch, plan.device), forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    units: dict[str, list[str]] = {}
    for name in plan.layers:
        units.setdefault(root(name), []).append(name)
    return list(units.values())


def _collect_in_passes(
    model: nn.Module, dataloader: Iterable[Any], plan: _Plan,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    loss_fn: Callable[[Any, Any], Tensor] | None, show_progress: bool,
) -> _Pass:
    """Stage 3: plan the passes (:func:`_plan_passes`), then one pass (:func:`_collect`) per
    group of layers, the later ones held to the first one's batches; returns their union."""
    budget = _plan_passes(model, dataloader, plan, forward_fn, show_progress)
    memory_plan = budget.info() if plan.max_memory is not None else None
    runs: list[_Pass] = []
    for index, group in enumerate(budget.groups):
        limits: dict[str, Any] = {}
        if runs:  # the same batches as pass 1, wherever its limits stopped it
            limits = {"max_batches": runs[0].own_batches, "max_tokens": None}
        label = budget.label(index) if budget.passes > 1 else "calibrate"
        part = dataclasses.replace(plan, layers={n: plan.layers[n] for n in group.layers},
                                   label=label, **limits)
        run = _collect(model, dataloader, part, _make_collector(part), forward_fn, loss_fn,
                       show_progress)
        if runs and run.batches != runs[0].batches:
            raise ValueError(
                f"pass {index + 1}/{budget.passes} read {run.batches} batches but pass 1 read "
                f"{runs[0].batches}; with max_memory the dataloader must give the same "
                "batches on every pass")
        if budget.passes > 1:  # free the device for the next group
            _offload(run.results)
        runs.append(run)
        if run.batches == 0:  # stage 4 reports the empty dataloader
            break
    first = runs[0]
    results = {key: res for run in runs for key, res in run.results.items()}
    shapes = {n: kd for run in runs for n, kd in run.shapes.items()}
    # in the model's order, as one pass gives them
    return _Pass({(n, side): results[n, side] for n in plan.layers if n in shapes
                  for side in first.sides},
                 {layer: o for run in runs for layer, o in run.shared.items()},
                 first.batches, first.positions, sum(run.seconds for run in runs),
                 first.own_batches, {n: shapes[n] for n in plan.layers if n in shapes},
                 first.sides, memory_plan)


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (bitsandbytes 8-bit layers: training mode) and ``torch.no_grad()`` for a
    pass; modes and ``requires_grad`` flags are restored afterwards, also on errors."""
    modes = {module: module.training for module in model.modules()}
    flags = {param: param.requires_grad for param in model.parameters()}
    try:
        # Eval mode by flag, not model.eval(): some LoRA layers (loralib's merge_weights)
        # merge B·A into the weight inside train()/eval(), which calibration must not do.
        for module in modes:
            # bitsandbytes' Linear8bitLt quantizes its inputs to int8 in eval mode and
            # computes x·Q(W)ᵀ in training mode: calibrate on what training computes.
            module.training = quantized_kind(module) == "8bit"
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        for param, flag in flags.items():
            param.requires_grad_(flag)


def _run_batches(model: nn.Module, dataloader: Iterable[Any], plan: _Plan,
                 collector: Collector, forward_fn: Callable[[nn.Module, Any], Any] | None,
                 loss_fn: Callable[[Any, Any], Tensor] | None, show_progress: bool
                 ) -> tuple[int, int]:
    """Feed the batches to ``collector`` up to the batch / position limits; returns
    ``(batches, kept positions)`` of this rank."""
    rank0 = not distributed.is_distributed() or torch.distributed.get_rank() == 0
    batches = positions = 0
    start = time.perf_counter()
    with _progress(_length(dataloader, plan.max_batches), show_progress and rank0,
                   plan.label) as bar:
        for index, batch in enumerate(dataloader):
            if plan.max_batches is not None and index >= plan.max_batches:
                break
            batch = move_to_device(batch, plan.device)
            try:
                positions += collector.run_batch(model, batch, index, forward_fn, loss_fn)
            except RuntimeError as err:
                _note_device(err, plan.device, model)
                raise
            batches += 1
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(1)
            bar.set_postfix(pos_per_s=f"{positions / elapsed:,.0f}", refresh=False)
            if plan.max_tokens is not None and positions >= plan.max_tokens:
                break
    return batches, positions


def _offload(results: Mapping[tuple[str, str], StreamResult]) -> None:
    """Move a finished pass's summaries to CPU memory (exact copies), so that the device
    holds one group's statistics at a time."""
    cpu = torch.device("cpu")
    for res in results.values():
        # total is folds[0] itself without folds (and cross its G): keep one copy
        total, res.total = res.total, res.total.to(cpu)
        res.folds = [res.total if fold is total else fold.to(cpu)  # type: ignore[misc]
                     for fold in res.folds]
        if res.cross is not None:
            cross, res.cross = res.cross, res.cross.to(cpu)
            res.cross_folds = [res.cross if g is cross else g.to(cpu)
                               for g in res.cross_folds or []]


def _check_pass(run: _Pass, names: Sequence[str]) -> None:
    """Stage 4: refuse a pass without batches, or with a layer never called or whose every
    position was masked out."""
    if run.batches == 0:
        raise ValueError("the dataloader yielded no batches; calibration needs data")

    def calls(name: str) -> int:
        return max(run.results[name, side].calls for side in run.sides)

    for name in names:
        if calls(name) == 0:
            called = [n for n in names if calls(n)]
            raise ValueError(
                f"target layer {name!r} was never called during calibration ({run.batches} "
                f"batches); check forward_fn and targets. Layers that were called: "
                f"{', '.join(called) or '(none)'}")
        for side in run.sides:
            if run.results[name, side].total.n == 0:
                raise ValueError(
                    f"target layer {name!r} ({side}) was called {calls(name)} time(s) but "
                    "every position was masked out (attention_mask == 0 or labels == -100)")


def _build(run: _Pass, plan: _Plan) -> Calibration:
    """Stage 5: the :class:`Calibration` of a checked pass (with the memory plan, if any)."""
    folded = plan.n_folds > 1
    stats = {key: res.total for key, res in run.results.items()}
    fold_stats = {key: res.folds for key, res in run.results.items()} if folded else None
    for layer, owner in run.shared.items():  # identical by construction: keep one object
        stats[layer, "input"] = stats[owner, "input"]
        if fold_stats is not None:
            fold_stats[layer, "input"] = fold_stats[owner, "input"]
    info: dict[str, Any] = {
        "batches": run.batches, "positions": run.positions, "precision": plan.precision,
        "seconds": round(run.seconds, 3),
        "world_size": torch.distributed.get_world_size() if distributed.is_distributed() else 1}
    if run.memory_plan is not None:
        info["memory_plan"] = run.memory_plan
    gradient = {name: res for (name, side), res in run.results.items() if side == GRADIENT}
    gradients = {name: res.cross for name, res in gradient.items() if res.cross is not None}
    gradient_folds = {name: res.cross_folds for name, res in gradient.items()
                      if res.cross_folds is not None} if folded else None
    return Calibration(stats, dict(run.shapes), plan.fingerprint, folds=fold_stats,
                       shared_inputs=run.shared, info=info, gradients=gradients,
                       gradient_folds=gradient_folds)


def _initialize(model: nn.Module, cal: Calibration, plan: _Plan) -> None:
    """Stage 6: initialize exactly the calibrated adapters with the requested strategy."""
    request = plan.request
    if plan.skipped:
        warnings.warn(skipped_warning(plan.skipped), UserWarning,
                      stacklevel=3)  # calibrate's caller
    _check_ranks(cal, plan.adapters, request.options.get("rank"))
    kwargs: dict[str, Any] = dict(request.options)
    kwargs["strategy"] = request.strategy or DEFAULT_STRATEGY
    if request.strategy is None:  # the default comes with its own options
        for key, value in DEFAULT_OPTIONS.items():
            kwargs.setdefault(key, value)
    if plan.targeted:  # initialize exactly the adapters that were calibrated
        kwargs.setdefault("layers", list(plan.layers))
    if request.estimator is not None:
        kwargs["estimator"] = request.estimator
    with warnings.catch_warnings():  # calibrate named the skipped layers above already
        warnings.filterwarnings("ignore", message="covinit leaves PEFT LoRA layer")
        initialize(model, cal, **kwargs)


# ---------------------------------------------------------------------- calibrate's helpers

def _positive_int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _model_device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    if param is None:
        param = next(model.buffers(), None)
    return None if param is None else param.device


def _memory_bytes(device: torch.device | None) -> int | None:
    """Total memory of ``device`` (physical RAM for the CPU), or None where unknown."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device is None or device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # not POSIX
            return None
    return None


def _check_memory(collector: Collector, device: torch.device | None) -> None:
    """Refuse, before any forward pass, exact statistics that cannot fit in the device's
    memory at all (e.g. an LM head's output side: 49152² float64 = 18 GiB per fold): the
    alternative is an out-of-memory kill after the first batch, with no message.

    Counts what :meth:`covinit.collect.Collector.memory_needs` reports: ``(folds + 1)`` k×k
    float64 matrices per exact stream (the accumulators plus the first batch's temporary),
    and for the gradient side also ``(folds + 1)`` d×k ``G``; sketched streams are left out.
    """
    total = _memory_bytes(device)
    if total is None:
        return
    needs = collector.memory_needs()
    need = sum(needs.values())
    if need <= total:
        return
    (name, side), biggest = max(needs.items(), key=lambda item: item[1])
    width = collector.width(name, side)
    raise ValueError(
        f"the exact statistics would need {_size(need)} but the {device or 'cpu'} device has "
        f"{_size(total)}; the largest is layer {name!r} {side} (width {width}: "
        f"{_size(biggest)}). Use sketch_above= (bounded memory), drop that side with sides=, "
        "or calibrate fewer targets")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _agree_ranks_ok(ok: bool) -> None:
    """In a distributed run, exchange whether every rank got through its batches.

    A rank that failed calls this from its exception handler (and then re-raises its own
    error); the others, which would otherwise wait forever in the summaries' all-gather,
    raise instead.  A no-op outside ``torch.distributed``.
    """
    if not distributed.is_distributed():
        return
    statuses = distributed.all_gather_ints([int(ok)])
    failed = [rank for rank, (flag,) in enumerate(statuses) if not flag]
    if ok and failed:
        raise RuntimeError(f"calibration failed on rank(s) {failed}; rank "
                           f"{torch.distributed.get_rank()} stops too (see the error on "
                           f"rank {failed[0]})")


def _note_device(err: RuntimeError, device: torch.device | None, model: nn.Module) -> None:
    """Add a note to a forward error when ``device=`` sent the batch where the model is not
    (the type is kept: the user's own errors pass through unchanged)."""
    here = _model_device(model)
    if device is not None and here is not None and device != here:
        err.add_note(f"calibrate moved the batch to device={str(device)!r} but the model's "
                     f"first parameter is on {str(here)!r}; pass device=None to follow the "
                     "model, or move the model")


def _progress(total: int | None, show: bool, desc: str = "calibrate") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, unit="batch", desc=desc, leave=False)


def _merge_ranks(results: dict[tuple[str, str], StreamResult], shared: dict[str, str],
                 names: list[str], counts: list[int]
                 ) -> tuple[dict[tuple[str, str], StreamResult], dict[str, str], list[int]]:
    """All-gather every summary and merge in rank order (identical on every rank)."""
    merged: dict[tuple[str, str], StreamResult] = {}
    for key, res in results.items():
        folds = []
        for fold in res.folds:
            parts = (distributed.all_gather_sketch(fold) if isinstance(fold, Sketch)
                     else distributed.all_gather_moments(fold))
            total = parts[0]
            for part in parts[1:]:
                total = total.merge(part)
            folds.append(total)
        total = folds[0]
        for fold in folds[1:]:
            total = total.merge(fold)
        merged[key] = StreamResult(total, folds, res.calls)
        if res.cross_folds is not None:  # G: a sum, added in rank order then fold order
            cross = [sum_in_order(distributed.all_gather_tensor(g)) for g in res.cross_folds]
            merged[key].cross_folds, merged[key].cross = cross, sum_in_order(cross)
    calls = distributed.all_gather_ints([res.calls for res in results.values()])
    for i, key in enumerate(results):
        merged[key].calls = sum(c[i] for c in calls)
    # Keep an input alias only where every rank that saw data for the layer found it (-2:
    # no rows here, no vote; two empty summaries are equal anyway).
    votes = distributed.all_gather_ints([
        -2 if (n, "input") not in results or results[n, "input"].total.n == 0
        else names.index(shared[n]) if n in shared else -1 for n in names])
    agreed = {}
    for i, n in enumerate(names):
        cast = {v[i] for v in votes if v[i] != -2}
        if len(cast) == 1 and cast.pop() >= 0:
            agreed[n] = names[votes[next(r for r, v in enumerate(votes) if v[i] >= 0)][i]]
    totals = [sum(c) for c in zip(*distributed.all_gather_ints(counts), strict=True)]
    return merged, agreed, totals


def _output_offsets(adapters: Mapping[str, Any], layers: Mapping[str, nn.Module]
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """``name -> (P (d, m), Q (m, k))`` such that ``hooked output + x·Qᵀ·Pᵀ = W0·x (+ bias)``.

    Output statistics describe the original ``W0``: a residual init done before left the
    base at ``W0 − P0·Q0`` (recorded by :func:`covinit.residual.record_offset`), and a
    loralib-style layer is hooked as a whole, so its output also holds ``c·B·A·x``.
    """
    offsets = {}
    for name, adapter in adapters.items():
        if name not in layers:
            continue
        ps, qs = [], []
        if (recorded := residual_offset(adapter.module)) is not None:
            ps.append(recorded[0])
            qs.append(recorded[1])
        if layers[name] is adapter.module:  # base and adapter in one forward
            a, b = adapter.get_lora()
            if bool(b.any()):
                ps.append(b.to(torch.float64) * -adapter.scaling)
                qs.append(a.to(torch.float64))
        if ps:  # one (P, Q) pair: both terms at once, in float64 like the statistics
            offsets[name] = (torch.cat([p.to(torch.float64) for p in ps], dim=1),
                             torch.cat([q.to(torch.float64) for q in qs], dim=0))
    return offsets


def _trained_reason(adapter: Any) -> str | None:
    """Why ``adapter`` is no longer at its initial state, or None if it is.

    Initial means (see :func:`calibrate`): the factors covinit's last init wrote, unchanged;
    or, with the base untouched, an adapter that adds nothing (``B·A = 0``); or, with a
    recorded residual offset ``P = c·B0``, ``Q = A0``, factors that still match it.
    """
    recorded = matches_initialized(adapter)
    if recorded:
        return None
    offset = residual_offset(adapter.module)
    if offset is None and is_inert(adapter):  # nothing in it to lose
        return None
    if recorded is False:
        return "its factors changed since covinit initialized them"
    if offset is not None:
        a, b = adapter.get_lora()
        p, q = (t.detach().to("cpu", torch.float64) for t in offset)
        if p.shape == b.shape and q.shape == a.shape:
            # The record is c·B0 in ≥ float32, A0 as written: what one rounding allows.
            tol = 4 * torch.finfo(torch.promote_types(b.dtype, torch.float32)).eps
            cb, a64 = b.to("cpu", torch.float64) * adapter.scaling, a.to("cpu", torch.float64)
            if (torch.linalg.norm(cb - p) <= tol * torch.linalg.norm(p)
                    and torch.linalg.norm(a64 - q) <= tol * torch.linalg.norm(q)):
                return None
        return "its factors differ from the residual init recorded for the layer"
    return "B·A is not zero and covinit has no record of initializing it"


def _refuse_trained(adapters: Mapping[str, Any]) -> None:
    """Refuse to re-initialize adapters that are no longer at their initial state.

    Raises
    ------
    ValueError
        Naming the first layers (and how many there are) with the first one's reason.
    """
    trained = {name: why for name, adapter in adapters.items()
               if (why := _trained_reason(adapter)) is not None}
    if not trained:
        return
    names = list(trained)
    shown = ", ".join(repr(n) for n in names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ValueError(
        f"calibrate would re-initialize {len(names)} LoRA layer(s) that are no longer at their "
        f"initial state ({shown}; {names[0]!r}: {trained[names[0]]}), which would throw their "
        "training away. Pass init=False to collect statistics only (A, B and the base stay "
        "untouched), or overwrite=True to re-initialize them anyway")


def _check_ranks(cal: Calibration, adapters: Mapping[str, Any], rank: Any) -> None:
    """Refuse a calibration in which *no* layer kept as many positions as its LoRA rank.

    That means the data was far too small for any data-driven init.  When only some layers
    are short (a layer called on few batches, say), :func:`covinit.initialization.initialize`
    falls back to ``kaiming`` for those layers with a warning instead.
    """
    short: list[tuple[str, int, int]] = []
    for name, adapter in adapters.items():
        r = rank if isinstance(rank, int) and not isinstance(rank, bool) else adapter.rank
        kept = [m.n for side in cal.sides if (m := cal.summary(name, side)) is not None]
        if kept and min(kept) < r:
            short.append((name, min(kept), r))
    if short and len(short) == len(adapters):
        name, n, r = short[0]
        raise ValueError(
            f"layer {name!r} kept only {n} usable position(s) but rank {r} was requested, "
            f"and so did every other calibrated layer ({len(short)} in all); feed more data "
            f"(at least {r}, better {10 * r}) or lower the rank")



def _length(dataloader: Iterable[Any], max_batches: int | None) -> int | None:
    """How many batches the pass will read, where known (for the progress bar)."""
    try:
        total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore
    except TypeError:
        total = None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    return total
