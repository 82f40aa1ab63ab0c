"""The :class:`Calibration` object: per-layer statistics, their views, and their file.

A :class:`Calibration` holds what :func:`covinit.calibrate` collected: exact float64
:class:`~covinit.stats.Moments` (or a :class:`~covinit.sketch.Sketch` for a sketched layer)
per layer and side, optional per-fold summaries for cross-validation, the gradient side's
cross-moments, and a fingerprint of the model's linear layers so that the statistics are
never applied to another model.  Calibrations are saved as safetensors plus JSON metadata
(never pickle) with a SHA-256 of every tensor, so truncated or edited files are refused on
load.  :meth:`Calibration.load` reads the file → verifies its checksums → rebuilds the
statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from covinit.adapters import model_fingerprint
from covinit.collect import ALL_SIDES, GRADIENT
from covinit.sketch import Sketch
from covinit.stats import Moments, require_float64

__all__ = ["FORMAT", "Calibration"]

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
