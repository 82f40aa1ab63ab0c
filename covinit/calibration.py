"""Run a model over task data once and keep each target layer's activation statistics.

:func:`calibrate` drives :class:`covinit.collect.Collector` over a dataloader and returns a
:class:`Calibration`: exact float64 :class:`~covinit.stats.Moments` per layer and side
("input" = the rows ``x`` the layer multiplies, "output" = ``W0·x + b``), optional per-fold
summaries for cross-validation, and a fingerprint of the model's linear layers so that the
statistics are never applied to another model.  Calibrations are saved as safetensors plus
JSON metadata (never pickle) with a SHA-256 of every tensor, so truncated or edited files
are refused on load.

:func:`calibrate` runs in named stages: resolve the arguments into a plan (layers, adapters,
limits) → build the collector (memory checked before any batch) → one pass over the data
(hooks, modes, flags, ranks' agreement and merge) → check the pass (never-called or fully
masked layers) → build the :class:`Calibration` → initialize the adapters.
:meth:`Calibration.load` reads the file → verifies its checksums → rebuilds the statistics.

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
import hashlib
import json
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
from covinit.collect import (
    ALL_SIDES,
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
from covinit.stats import Moments, require_float64, sum_in_order

__all__ = [
    "DEFAULT_STRATEGY",
    "FORMAT",
    "Calibration",
    "CalibrationLike",
    "GradientCalibrationLike",
    "calibrate",
]

#: What :func:`calibrate` initializes a LoRA model with when no ``strategy=`` is given.  Chosen
#: by the rule in ``benchmarks/choose_default.py`` (paired 95 % intervals of the final
#: validation loss vs Kaiming, at Kaiming's rate and at each method's own): on MiniLM with
#: Rotten Tomatoes and BBC News no covariance-informed strategy's interval lies below 0 —
#: see the README's results ("Does covariance-informed init win?").
DEFAULT_STRATEGY = "kaiming"

FORMAT = "covinit.calibration"
_FORMAT_VERSION = 1


class Calibration:
    """Per-layer, per-side activation statistics of one model on one dataset.

    Built by :func:`calibrate` or :meth:`load`; read with :meth:`moments` / :meth:`folds`.

    Parameters
    ----------
    stats : dict
        ``(layer, side) -> Moments`` (or :class:`~covinit.sketch.Sketch` for layers collected
        in bounded-memory mode); layers whose inputs were the same tensor (q/k/v) may
        hold the same object.
    shapes : dict
        ``layer -> (k, d)`` = (in_features, out_features) of every calibrated layer.
    fingerprint : dict
        :func:`covinit.adapters.model_fingerprint` of the calibrated model.
    folds : dict, optional
        ``(layer, side) -> list of Moments`` whose in-order merge is ``stats``' entry.
    shared_inputs : dict, optional
        ``layer -> owner layer`` whose input summary it shares.
    info : dict, optional
        Free-form JSON-serialisable facts (batches, positions, precision, seconds).
    gradients : dict, optional
        ``layer -> G`` (d, k) float64, ``G = Σ δ·xᵀ``, for every layer with a
        ``(layer, "gradient")`` summary (the moments of ``δ``), and only those.
    gradient_folds : dict, optional
        ``layer -> list of G`` per fold, whose in-order sum is ``gradients``' entry.
    """

    def __init__(self, stats: Mapping[tuple[str, str], Moments | Sketch],
                 shapes: Mapping[str, tuple[int, int]], fingerprint: Mapping[str, Any], *,
                 folds: Mapping[tuple[str, str], list[Moments]] | None = None,
                 shared_inputs: Mapping[str, str] | None = None,
                 info: Mapping[str, Any] | None = None,
                 gradients: Mapping[str, Tensor] | None = None,
                 gradient_folds: Mapping[str, list[Tensor]] | None = None) -> None:
        self._stats = dict(stats)
        self._shapes = {name: (int(k), int(d)) for name, (k, d) in shapes.items()}
        self._folds = dict(folds) if folds else None
        self._shared = dict(shared_inputs or {})
        self.fingerprint: dict[str, Any] = dict(fingerprint)
        self.info: dict[str, Any] = dict(info or {})
        self.sides: tuple[str, ...] = tuple(s for s in ALL_SIDES
                                            if any(key[1] == s for key in self._stats))
        self._gradients = dict(gradients or {})
        self._gradient_folds = dict(gradient_folds) if gradient_folds else None
        _check_gradients(self._stats, self._shapes, self._gradients, self._gradient_folds)

    # -------------------------------------------------------------- reading
    @property
    def layer_names(self) -> list[str]:
        """Calibrated layers, in module order."""
        return list(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """``layer -> (in_features k, out_features d)``."""
        return dict(self._shapes)

    @property
    def shared_inputs(self) -> dict[str, str]:
        """``layer -> owner`` for layers whose input summary is the owner's (same tensor)."""
        return dict(self._shared)

    @property
    def n_folds(self) -> int:
        """Number of fold summaries kept per layer side (1 without folds)."""
        if not self._folds:
            return 1
        return len(next(iter(self._folds.values())))

    def _check_key(self, layer: str, side: str) -> None:
        if layer not in self._shapes:
            raise ValueError(f"layer {layer!r} was not calibrated; calibrated layers: "
                             f"{', '.join(self._shapes)}")
        if side not in ALL_SIDES:
            raise ValueError(f"side must be one of {ALL_SIDES}, got {side!r}")

    def moments(self, layer: str, side: str = "input") -> Moments | None:
        """The summary of ``layer``'s ``side`` activations, or ``None`` if that side was not
        collected.

        ``side="gradient"`` gives the moments of the output gradients ``δ = ∂L/∂y`` (width
        d) over the kept positions; see :meth:`gradient` for the cross-moment ``G``.

        Raises
        ------
        ValueError
            For a layer that was not calibrated (the message lists those that were) or a side
            other than "input" / "output" / "gradient".
        """
        self._check_key(layer, side)
        found = self._stats.get((layer, side))
        if isinstance(found, Sketch):
            raise ValueError(
                f"layer {layer!r} {side} was collected as a bounded-memory sketch (width "
                f"{found.k} >= sketch_above); read it with .sketch({layer!r}, {side!r})")
        return found

    def summary(self, layer: str, side: str = "input") -> Moments | Sketch | None:
        """Whatever was kept of ``layer``'s ``side``: exact :class:`~covinit.stats.Moments`,
        a bounded-memory :class:`~covinit.sketch.Sketch`, or ``None`` if that side was not
        collected.  Both kinds carry the count ``n`` of kept positions.

        Raises
        ------
        ValueError
            As :meth:`moments`, for a layer or side that does not exist.
        """
        self._check_key(layer, side)
        return self._stats.get((layer, side))

    def sketch(self, layer: str, side: str = "input") -> Sketch | None:
        """The bounded-memory sketch of ``layer``'s ``side``, or ``None`` if that side was
        collected exactly (or not at all)."""
        self._check_key(layer, side)
        found = self._stats.get((layer, side))
        return found if isinstance(found, Sketch) else None

    def folds(self, layer: str, side: str = "input") -> list[Moments] | None:
        """Per-fold summaries (batch ``i`` → fold ``i % M``), or ``None`` without folds."""
        self._check_key(layer, side)
        if self._folds is None:
            return None
        found = self._folds.get((layer, side))
        return None if found is None else list(found)

    def gradient(self, layer: str) -> Tensor:
        """The gradient–input cross-moment of ``layer``: ``G = Σ_t δ_t·x_tᵀ`` over the kept
        positions, ``δ_t = ∂L/∂y_t`` (README: "Init strategies", the gradient strategies).

        A sum, not a mean: its count is ``moments(layer, "gradient").n``, and it is
        ``∂L/∂W`` of the summed batch losses.  ``δ`` is the gradient of the loss as computed
        (a mean-reduced loss scales it with 1/positions per batch), of the model as it is:
        with a non-zero adapter ``B·A`` it includes the adapter's effect on the forward pass.

        Returns
        -------
        Tensor, shape (d, k), float64

        Raises
        ------
        ValueError
            For a layer that was not calibrated, or a calibration without the gradient side.
        """
        self._check_key(layer, GRADIENT)
        if layer not in self._gradients:
            raise ValueError(
                f"layer {layer!r} has no gradient statistics: this calibration holds sides "
                f"{self.sides}; calibrate with sides=('input', 'gradient') (and batches with "
                "labels, or loss_fn=)")
        return self._gradients[layer]

    def gradient_folds(self, layer: str) -> list[Tensor] | None:
        """``G`` of each fold (batch ``i`` → fold ``i % M``), or ``None`` without folds.

        Raises
        ------
        ValueError
            As :meth:`gradient`.
        """
        self.gradient(layer)
        if self._gradient_folds is None:
            return None
        return list(self._gradient_folds[layer])

    def __repr__(self) -> str:
        n = next((m.n for m in self._stats.values()), 0)
        return (f"Calibration(layers={len(self._shapes)}, sides={self.sides}, positions={n}, "
                f"folds={self.n_folds}, shared_inputs={len(self._shared)})")

    def to(self, device: torch.device | str) -> Calibration:
        """The same statistics on another device."""
        stats = {key: m.to(device) for key, m in self._stats.items()}
        folds = None if self._folds is None else \
            {key: [m.to(device) for m in ms] for key, ms in self._folds.items()}
        gradient_folds = None if self._gradient_folds is None else \
            {name: [g.to(device) for g in gs] for name, gs in self._gradient_folds.items()}
        return Calibration(stats, self._shapes, self.fingerprint, folds=folds,
                           shared_inputs=self._shared, info=self.info,
                           gradients={name: g.to(device) for name, g in self._gradients.items()},
                           gradient_folds=gradient_folds)

    # -------------------------------------------------------------- model check
    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose linear layers differ from the calibrated model's.

        Compares :func:`covinit.adapters.model_fingerprint` (canonical layer names and
        ``(d, k)`` shapes; adding LoRA layers does not change it).

        Raises
        ------
        ValueError
            Naming the first layer that is missing, extra, or of another shape.
        """
        mine: dict[str, list[int]] = self.fingerprint.get("layers", {})
        theirs: dict[str, list[int]] = model_fingerprint(model)["layers"]
        for name, shape in mine.items():
            if name not in theirs:
                raise ValueError(
                    f"calibration does not match the model: layer {name!r} (d, k) = "
                    f"{tuple(shape)} is not in the model")
            if list(theirs[name]) != list(shape):
                raise ValueError(
                    f"calibration does not match the model: layer {name!r} has (d, k) = "
                    f"{tuple(theirs[name])} in the model but {tuple(shape)} in the calibration")
        for name, shape in theirs.items():
            if name not in mine:
                raise ValueError(
                    f"calibration does not match the model: the model has layer {name!r} "
                    f"(d, k) = {tuple(shape)} that the calibrated model did not have")

    # -------------------------------------------------------------- files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file: every summary once, plus JSON metadata.

        Tensors are named ``"{layer}/{side}/{field}"`` (folds: ``".../fold{i}/{field}"``);
        shared input summaries are stored once under their owner.  The gradient side adds
        ``"{layer}/gradient/cross"`` (``G``, d×k; per fold ``".../fold{i}/cross"``), covered
        by the same checksum.
        """
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        sketched = []
        for (layer, side), m in self._stats.items():
            if side == "input" and layer in self._shared:
                continue
            if isinstance(m, Sketch):
                sketched.append(f"{layer}/{side}")
                for name, value in m.state().items():
                    tensors[f"{layer}/{side}/sketch/{name}"] = value.detach().cpu().contiguous()
                continue
            for name, value in m.state().items():
                tensors[f"{layer}/{side}/{name}"] = value.detach().cpu().contiguous()
            for i, fold in enumerate((self._folds or {}).get((layer, side), [])):
                for name, value in fold.state().items():
                    tensors[f"{layer}/{side}/fold{i}/{name}"] = value.detach().cpu().contiguous()
            if side == GRADIENT:
                tensors[f"{layer}/{side}/cross"] = self._gradients[layer].detach().cpu()\
                    .contiguous()
                for i, g in enumerate((self._gradient_folds or {}).get(layer, [])):
                    tensors[f"{layer}/{side}/fold{i}/cross"] = g.detach().cpu().contiguous()
        header = {
            "format_version": _FORMAT_VERSION,
            "layers": {name: list(shape) for name, shape in self._shapes.items()},
            "sides": list(self.sides),
            "folds": self.n_folds if self._folds else 0,
            "shared_inputs": self._shared,
            "sketched": sketched,
            "fingerprint": self.fingerprint,
            "info": self.info,
            "sha256": _digest(tensors),
        }
        header["header_sha256"] = _header_digest(header)
        save_file(tensors, os.fspath(path),
                  metadata={"format": FORMAT, "covinit": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: nn.Module | None = None) -> Calibration:
        """Read a file written by :meth:`save`, validating it; with ``model``, also
        :meth:`check_model`.

        Raises
        ------
        ValueError
            If the file is not a readable safetensors file, not a covinit calibration, was
            modified (checksum), or holds tensors of the wrong dtype or shape.
        """
        path = Path(path)
        header, tensors = _read_file(path)
        _verify_checksums(path, header, tensors)
        cal = cls(**_Rebuild(path, header, tensors).arguments())
        if model is not None:
            cal.check_model(model)
        return cal


# ---------------------------------------------------------------------- file reading
_Summary = TypeVar("_Summary", Moments, Sketch)


@dataclass(frozen=True)
class _Header:
    """The JSON metadata of a calibration file (see :meth:`Calibration.save`), parsed."""

    raw: dict[str, Any]  # as stored: the metadata checksum covers it
    shapes: dict[str, tuple[int, int]]  # layer -> (k, d)
    sides: tuple[str, ...]
    n_folds: int  # 0 without folds
    shared: dict[str, str]  # layer -> owner of its input summary
    sketched: frozenset[str]  # "{layer}/{side}" stored as sketches
    digest: str  # SHA-256 of the tensors


def _read_file(path: Path) -> tuple[_Header, dict[str, Tensor]]:
    """Stage 1 of :meth:`Calibration.load`: the file's tensors and parsed metadata, after
    checking that it is a covinit calibration of a version this code reads."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a covinit calibration file "
                         f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        raw = json.loads(meta["covinit"])
        version = raw["format_version"]
        header = _Header(
            raw=raw, shapes={name: tuple(shape) for name, shape in raw["layers"].items()},
            sides=tuple(raw["sides"]), n_folds=int(raw["folds"]),
            shared=dict(raw["shared_inputs"]), sketched=frozenset(raw.get("sketched", [])),
            digest=raw["sha256"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed covinit metadata ({err})") from None
    if version != _FORMAT_VERSION:
        raise ValueError(f"{path}: calibration format version {version} is not supported "
                         f"(this covinit reads version {_FORMAT_VERSION})")
    return header, tensors


def _verify_checksums(path: Path, header: _Header, tensors: Mapping[str, Tensor]) -> None:
    """Stage 2 of :meth:`Calibration.load`: refuse edited tensors or metadata."""
    if _digest(tensors) != header.digest:
        raise ValueError(f"{path}: checksum mismatch; the file was modified or corrupted")
    if header.raw.get("header_sha256") != _header_digest(header.raw):
        raise ValueError(f"{path}: metadata checksum mismatch; the layers, fingerprint or "
                         "other metadata were modified")
    if any(s not in ALL_SIDES for s in header.sides):
        raise ValueError(f"{path}: unknown sides {header.sides}")


class _Rebuild:
    """Stage 3 of :meth:`Calibration.load`: the statistics of a verified file, each tensor
    checked for presence, width, dtype and finiteness, and none left over."""

    def __init__(self, path: Path, header: _Header, tensors: Mapping[str, Tensor]) -> None:
        self.path, self.header, self.tensors = path, header, tensors
        self.expected: set[str] = set()  # every tensor name read so far
        self.stats: dict[tuple[str, str], Moments | Sketch] = {}
        self.folds: dict[tuple[str, str], list[Moments]] = {}
        self.gradients: dict[str, Tensor] = {}
        self.gradient_folds: dict[str, list[Tensor]] = {}

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of :class:`Calibration` for the whole file."""
        h = self.header
        for layer, (k, d) in h.shapes.items():
            for side in h.sides:
                if side != "input" or h.shared.get(layer, layer) == layer:  # owners only
                    self._side(layer, side, k, d)
        self._alias_shared()
        extra = sorted(set(self.tensors) - self.expected)
        if extra:
            raise ValueError(f"{self.path}: unexpected tensor {extra[0]!r}")
        ordered = {(layer, side): self.stats[layer, side] for layer in h.shapes
                   for side in h.sides}
        return {"stats": ordered, "shapes": h.shapes,
                "fingerprint": h.raw.get("fingerprint", {}), "folds": self.folds or None,
                "shared_inputs": h.shared, "info": h.raw.get("info", {}),
                "gradients": self.gradients, "gradient_folds": self.gradient_folds or None}

    def _side(self, layer: str, side: str, k: int, d: int) -> None:
        """Read one stored layer side: its summary, folds and (gradient side) ``G``."""
        width = k if side == "input" else d
        prefix, n_folds = f"{layer}/{side}", self.header.n_folds
        if prefix in self.header.sketched:
            sketch = Sketch.from_state(self._fields(f"{prefix}/sketch", Sketch.FIELDS))
            self.stats[layer, side] = self._check_width(f"{prefix}/sketch", sketch, width)
            return
        self.stats[layer, side] = self._moments(prefix, width)
        if n_folds:
            self.folds[layer, side] = [self._moments(f"{prefix}/fold{i}", width)
                                       for i in range(n_folds)]
            if sum(f.n for f in self.folds[layer, side]) != self.stats[layer, side].n:
                raise ValueError(f"{self.path}: fold counts of {prefix} do not add up to the "
                                 "total")
        if side == GRADIENT:
            self.gradients[layer] = self._cross(prefix, (d, k))
            if n_folds:
                self.gradient_folds[layer] = [self._cross(f"{prefix}/fold{i}", (d, k))
                                              for i in range(n_folds)]

    def _alias_shared(self) -> None:
        """Point every layer that shares an input summary at its owner's object."""
        shapes = self.header.shapes
        for layer, owner in self.header.shared.items():
            if (owner, "input") not in self.stats or shapes.get(layer, (None,))[0] != \
                    shapes[owner][0]:
                raise ValueError(f"{self.path}: layer {layer!r} shares the input of {owner!r}, "
                                 "which is not stored with the same width")
            self.stats[layer, "input"] = self.stats[owner, "input"]
            if self.header.n_folds:
                self.folds[layer, "input"] = self.folds[owner, "input"]

    def _fields(self, prefix: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
        names = {f: f"{prefix}/{f}" for f in keys}
        self.expected.update(names.values())
        missing = [key for key in names.values() if key not in self.tensors]
        if missing:
            raise ValueError(f"{self.path}: missing tensor {missing[0]!r}")
        return {f: self.tensors[key] for f, key in names.items()}

    def _moments(self, prefix: str, width: int) -> Moments:
        moments = Moments.from_state(self._fields(prefix, Moments.FIELDS))
        if not all(bool(torch.isfinite(v).all()) for v in moments.state().values()):
            raise ValueError(f"{self.path}: {prefix} holds NaN/Inf values")
        return self._check_width(prefix, moments, width)

    def _check_width(self, prefix: str, summary: _Summary, width: int) -> _Summary:
        if summary.k != width:
            raise ValueError(f"{self.path}: {prefix} has width {summary.k}, expected {width}")
        return summary

    def _cross(self, prefix: str, shape: tuple[int, int]) -> Tensor:
        cross = self._fields(prefix, ("cross",))["cross"]
        if tuple(cross.shape) != shape:
            raise ValueError(f"{self.path}: {prefix}/cross has shape {tuple(cross.shape)}, "
                             f"expected (d, k) = {shape}")
        require_float64(prefix, {"cross": cross})
        if not bool(torch.isfinite(cross).all()):
            raise ValueError(f"{self.path}: {prefix}/cross holds NaN/Inf values")
        return cross


def _check_gradients(stats: Mapping[tuple[str, str], Moments | Sketch],
                     shapes: Mapping[str, tuple[int, int]], gradients: Mapping[str, Tensor],
                     gradient_folds: Mapping[str, list[Tensor]] | None) -> None:
    """Refuse cross-moments ``G`` that do not pair with a gradient summary of their layer,
    or whose shape is not that layer's (d, k) or dtype not float64."""
    with_side = {layer for layer, side in stats if side == GRADIENT}
    if set(gradients) != with_side:
        odd = sorted(set(gradients) ^ with_side)[0]
        raise ValueError(f"layer {odd!r}: a gradient side needs both the δ moments and the "
                         "cross-moment G; got only one of them")
    for layer, g in gradients.items():
        k, d = shapes[layer]
        parts = [g, *((gradient_folds or {}).get(layer, []))]
        for part in parts:
            if tuple(part.shape) != (d, k) or part.dtype != torch.float64:
                raise ValueError(f"layer {layer!r}: G must be a float64 (d, k) = {(d, k)} "
                                 f"tensor, got {part.dtype} {tuple(part.shape)}")
        if gradient_folds is not None and layer not in gradient_folds:
            raise ValueError(f"layer {layer!r}: per-fold G missing")


def _header_digest(header: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata other than the checksums themselves (canonical JSON), so
    that an edited fingerprint or layer table is refused like an edited tensor."""
    body = {key: value for key, value in header.items()
            if key not in ("sha256", "header_sha256")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(value.dtype).encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
        The init on a LoRA model (default :data:`DEFAULT_STRATEGY`) and its estimator.
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
