"""Run a model over task data once and keep each target layer's activation statistics.

:func:`calibrate` drives :class:`covinit.collect.Collector` over a dataloader and returns a
:class:`Calibration`: exact float64 :class:`~covinit.stats.Moments` per layer and side
("input" = the rows ``x`` the layer multiplies, "output" = ``W0·x + b``), optional per-fold
summaries for cross-validation, and a fingerprint of the model's linear layers so that the
statistics are never applied to another model.  Calibrations are saved as safetensors plus
JSON metadata (never pickle) with a SHA-256 of every tensor, so truncated or edited files
are refused on load.

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

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from covinit import distributed
from covinit.collect import (
    ALL_SIDES,
    GRADIENT,
    PRECISIONS,
    SIDES,
    Collector,
    StreamResult,
    Targets,
    match_layers,
    move_to_device,
)
from covinit.sketch import Sketch
from covinit.stats import Moments, require_float64, sum_in_order

__all__ = ["DEFAULT_STRATEGY", "FORMAT", "Calibration", "calibrate"]

#: What :func:`calibrate` initializes a LoRA model with when no ``strategy=`` is given.  Chosen
#: by ``benchmarks/choose_default.py`` from the real-task benchmark (validation loss, paired
#: over seeds): no covariance-informed strategy beat Kaiming beyond the seed-to-seed spread on
#: MiniLM/Rotten Tomatoes or SmolLM2/Hamlet, and the data-driven ones want a 3–10× lower
#: learning rate than a Kaiming-tuned one — see the README's results.
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
        positions, ``δ_t = ∂L/∂y_t`` (DESIGN.md §8).

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
        from covinit.adapters import model_fingerprint

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
        from safetensors import safe_open

        path = Path(path)
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
            header = json.loads(meta["covinit"])
            version = header["format_version"]
            shapes = {name: tuple(shape) for name, shape in header["layers"].items()}
            sides = tuple(header["sides"])
            n_folds = int(header["folds"])
            shared = dict(header["shared_inputs"])
            sketched = set(header.get("sketched", []))
            digest = header["sha256"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed covinit metadata ({err})") from None
        if version != _FORMAT_VERSION:
            raise ValueError(f"{path}: calibration format version {version} is not supported "
                             f"(this covinit reads version {_FORMAT_VERSION})")
        if _digest(tensors) != digest:
            raise ValueError(f"{path}: checksum mismatch; the file was modified or corrupted")
        if header.get("header_sha256") != _header_digest(header):
            raise ValueError(f"{path}: metadata checksum mismatch; the layers, fingerprint or "
                             "other metadata were modified")
        if any(s not in ALL_SIDES for s in sides):
            raise ValueError(f"{path}: unknown sides {sides}")
        expected: set[str] = set()
        stats: dict[tuple[str, str], Moments] = {}
        folds: dict[tuple[str, str], list[Moments]] = {}
        gradients: dict[str, Tensor] = {}
        gradient_folds: dict[str, list[Tensor]] = {}

        def fields(prefix: str, keys: tuple[str, ...]) -> dict[str, Tensor]:
            names = {f: f"{prefix}/{f}" for f in keys}
            expected.update(names.values())
            missing = [key for key in names.values() if key not in tensors]
            if missing:
                raise ValueError(f"{path}: missing tensor {missing[0]!r}")
            return {f: tensors[key] for f, key in names.items()}

        def read(prefix: str, width: int, sketch: bool = False) -> Moments | Sketch:
            summary: Moments | Sketch
            if sketch:
                summary = Sketch.from_state(fields(prefix, Sketch.FIELDS))
            else:
                summary = Moments.from_state(fields(prefix, Moments.FIELDS))
                if not all(bool(torch.isfinite(v).all()) for v in summary.state().values()):
                    raise ValueError(f"{path}: {prefix} holds NaN/Inf values")
            if summary.k != width:
                raise ValueError(f"{path}: {prefix} has width {summary.k}, expected {width}")
            return summary

        def read_cross(prefix: str, shape: tuple[int, int]) -> Tensor:
            cross = fields(prefix, ("cross",))["cross"]
            if tuple(cross.shape) != shape:
                raise ValueError(f"{path}: {prefix}/cross has shape {tuple(cross.shape)}, "
                                 f"expected (d, k) = {shape}")
            require_float64(prefix, {"cross": cross})
            if not bool(torch.isfinite(cross).all()):
                raise ValueError(f"{path}: {prefix}/cross holds NaN/Inf values")
            return cross

        for layer, (k, d) in shapes.items():
            for side in sides:
                source = shared.get(layer, layer) if side == "input" else layer
                width = k if side == "input" else d
                if source != layer:
                    continue
                if f"{layer}/{side}" in sketched:
                    stats[layer, side] = read(f"{layer}/{side}/sketch", width, sketch=True)
                    continue
                stats[layer, side] = read(f"{layer}/{side}", width)
                if n_folds:
                    folds[layer, side] = [read(f"{layer}/{side}/fold{i}", width)
                                          for i in range(n_folds)]
                    if sum(f.n for f in folds[layer, side]) != stats[layer, side].n:
                        raise ValueError(f"{path}: fold counts of {layer}/{side} do not add "
                                         "up to the total")
                if side == GRADIENT:
                    gradients[layer] = read_cross(f"{layer}/{side}", (d, k))
                    if n_folds:
                        gradient_folds[layer] = [read_cross(f"{layer}/{side}/fold{i}", (d, k))
                                                 for i in range(n_folds)]
        for layer, owner in shared.items():
            if (owner, "input") not in stats or shapes.get(layer, (None,))[0] != \
                    shapes[owner][0]:
                raise ValueError(f"{path}: layer {layer!r} shares the input of {owner!r}, "
                                 "which is not stored with the same width")
            stats[layer, "input"] = stats[owner, "input"]
            if n_folds:
                folds[layer, "input"] = folds[owner, "input"]
        extra = sorted(set(tensors) - expected)
        if extra:
            raise ValueError(f"{path}: unexpected tensor {extra[0]!r}")
        ordered = {(layer, side): stats[layer, side] for layer in shapes for side in sides}
        cal = cls(ordered, shapes, header.get("fingerprint", {}), folds=folds or None,
                  shared_inputs=shared, info=header.get("info", {}), gradients=gradients,
                  gradient_folds=gradient_folds or None)
        if model is not None:
            cal.check_model(model)
        return cal


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
    width = collector._streams[name, side].k
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


def _progress(total: int | None, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, unit="batch", desc="calibrate", leave=False)


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
    base at ``W0 − P0·Q0`` (recorded by :func:`covinit.export.record_offset`), and a
    loralib-style layer is hooked as a whole, so its output also holds ``c·B·A·x``.
    """
    from covinit.export import residual_offset

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


def calibrate(
    model: nn.Module,
    dataloader: Iterable[Any],
    *,
    targets: Targets | None = None,
    sides: Sequence[str] = SIDES,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    max_batches: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
    show_progress: bool = True,
    folds: int | None = None,
    precision: str = "float64",
    sketch_above: int | None = None,
    sketch_size: int = 256,
    strategy: str | None = None,
    estimator: str | None = None,
    init: bool = True,
    overwrite: bool = False,
    **init_options: Any,
) -> Calibration:
    """Collect activation statistics of a model's linear layers on task data.

    On a model that holds LoRA layers (covinit's, PEFT's — DoRA included — or loralib-style),
    the layers under those adapters are calibrated and then **initialized in place** by
    :func:`covinit.initialize.initialize` with ``strategy``, ``estimator`` and
    ``init_options``; ``init=False`` collects statistics only.  On a plain model, ``targets``
    selects the layers and only statistics are collected.

    Adapters that are no longer at their initial state are refused unless ``overwrite=True``:
    re-initializing them would silently throw their training away.  An adapter counts as
    initial when (1) its factors are still those covinit's last init wrote (a SHA-256 of A, B
    recorded in memory by :func:`covinit.initialize`), or, with no such record, (2) they
    still equal the step-0 factors of covinit's residual init recorded with the layer
    (``W0 = base + c·B0·A0``), or (3) the adapter adds nothing (``B·A = 0`` with the base
    untouched: PEFT's ``init_lora_weights=True`` / ``"gaussian"``, loralib, ``add_lora``).
    Anything else (trained, loaded from a trained adapter, PEFT's random
    ``init_lora_weights=False``) is treated as trained.

    PEFT LoRA layers covinit does not initialize — embedding adapters
    (``target_modules=["embed_tokens", ...]``) and convolutions — keep PEFT's own init
    (embeddings: ``A = 0``, ``B ~ N(0, 1)``, so ``ΔW = 0``), with one ``UserWarning``
    naming them (see :func:`covinit.adapters.find_skipped_adapters` for why).

    The model runs in eval mode under ``torch.no_grad()`` (with the gradient side: with
    gradients enabled, and a backward pass that writes no parameter's ``.grad``); its
    train/eval modes and ``requires_grad`` flags are restored and every hook is removed
    afterwards, also when an exception (or ``KeyboardInterrupt``) escapes.  Under an
    initialized ``torch.distributed`` group, each rank reads its own shard and the summaries
    are merged once at the end.

    Parameters
    ----------
    model : nn.Module
    dataloader : iterable
        Batches: dicts (passed as keyword arguments, HF style), tuples/lists (positional) or
        tensors.  Positions with ``attention_mask == 0`` and, for token-level labels,
        ``labels == -100`` are left out.
    targets : list of str, str or callable, optional
        Layers to calibrate (see :func:`covinit.collect.match_layers`).  Required on a plain
        model; on a LoRA model it restricts calibration to the matching adapters.
    sides : sequence of {"input", "output", "gradient"}, default=("input", "output")
        Which statistics to keep.  ``"gradient"`` (opt-in; needs ``"input"`` too, else a
        ``ValueError``) adds a backward pass per batch and keeps, per layer, the moments of
        the output gradients ``δ = ∂L/∂y`` (read with ``cal.moments(layer, "gradient")``)
        and ``G = Σ δ·xᵀ`` (``cal.gradient(layer)``), over the same kept positions as the
        activations.  ``δ`` is exactly ``∂L/∂y`` for the loss as computed: a mean-reduced
        loss scales it with 1/(positions in the batch).  Not combinable with
        ``sketch_above``.
    forward_fn : callable, optional
        ``forward_fn(model, batch)`` replaces the default call.
    loss_fn : callable, optional
        Gradient side only: ``loss_fn(outputs, batch)`` → scalar loss.  Default: the model's
        own ``outputs.loss`` (Hugging Face models compute it when the batch has
        ``labels``); a batch that gives no loss raises a ``ValueError``.
    max_batches, max_tokens : int, optional
        Stop after this many batches / once this many positions were kept (checked after
        each batch).
    device : torch.device or str, optional
        Where batches are moved; default the device of the model's first parameter.
    show_progress : bool, default=True
        A tqdm bar over batches with positions per second.
    folds : int, optional
        Keep ``folds`` summaries per layer side (batch ``i`` → fold ``i % folds``) for
        cross-validation; their merge is the total.
    precision : {"float64", "mixed"}, default="float64"
        ``"float64"`` is exact (~1e-13 relative).  ``"mixed"`` centres in float64 but runs the
        ``yᵀy`` product in float32 (~1e-7 relative to the spread, about half the cost).
    sketch_above : int, optional
        Bounded-memory mode: layer sides at least this wide keep a k×``sketch_size``
        randomized :class:`~covinit.sketch.Sketch` (read with :meth:`Calibration.sketch`)
        instead of the exact k×k summary.  Not combinable with ``folds``.
    sketch_size : int, default=256
        Sketch width ℓ (use ℓ ≥ 2r + 10; see :mod:`covinit.sketch` for measured errors).
    strategy : str, optional
        The init :func:`covinit.initialize.initialize` applies on a LoRA model; default
        :data:`DEFAULT_STRATEGY` (``"kaiming"``, the benchmark's choice).  Pass e.g.
        ``"output-pca"`` or ``"input-pca"`` (with a 3–4× lower learning rate) to use the
        statistics.
    estimator : str, optional
        Passed to :func:`covinit.initialize.initialize` (default: its own).
    init : bool, default=True
        On a LoRA model, initialize the calibrated adapters.  ``False`` collects statistics
        only (e.g. for :mod:`covinit.report` on a trained model): A, B, DoRA magnitudes and
        base weights stay bit-identical, and initialization options are refused.
    overwrite : bool, default=False
        Re-initialize adapters even when they are no longer at their initial state (see
        above); without it such adapters raise ``ValueError`` before any data is read.
    **init_options
        Further keyword arguments for :func:`covinit.initialize.initialize` (e.g.
        ``rank=``, ``seed=``); only valid on a LoRA model.

    Returns
    -------
    Calibration

    Raises
    ------
    ValueError
        Empty dataloader; ``targets`` missing on a plain model or matching nothing (lists the
        layers that exist); a target never called; a target that kept no position; NaN/Inf
        in an activation (names the layer and batch); fewer kept positions than the LoRA rank;
        adapters that are no longer at their initial state (names them) without
        ``overwrite=True``; a model whose only LoRA layers are ones covinit does not
        initialize (embeddings), without ``targets``.
    TypeError
        A batch type the default call cannot handle; initialization options on a plain model
        or with ``init=False``.

    Warns
    -----
    UserWarning
        Once per call, naming the PEFT LoRA layers (embeddings, convolutions) that keep
        PEFT's own init.
    """
    from covinit.adapters import (
        check_original_base,
        find_adapters,
        find_linear_layers,
        find_skipped_adapters,
        model_fingerprint,
    )

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
    if not init and (strategy is not None or estimator is not None or init_options
                     or overwrite):
        raise TypeError(f"init=False collects statistics only, but initialization options "
                        f"{_given_options(strategy, estimator, init_options, overwrite)} were "
                        "given; drop them or leave init=True")
    if adapters:
        base_layers = find_linear_layers(model)
        layers = {name: base_layers[name] for name in adapters}
        if targets is not None:
            chosen = match_layers(model, targets)
            layers = {name: module for name, module in layers.items() if name in chosen}
            if not layers:
                raise ValueError(f"targets {targets!r} match no LoRA layer; adapted layers: "
                                 f"{', '.join(adapters)}")
        check_original_base({name: adapters[name] for name in layers}, "calibrate")
        if init and not overwrite:
            _refuse_trained({name: adapters[name] for name in layers})
    else:
        if targets is None and skipped:
            raise ValueError(
                f"the model's LoRA layers are all of kinds covinit does not initialize "
                f"({_describe(skipped)}); they keep PEFT's own init (embeddings: A = 0, "
                "B ~ N(0, 1), so the model is unchanged at step 0). Pass targets= to collect "
                "statistics of linear layers")
        if targets is None:
            available = ", ".join(find_linear_layers(model)) or "(none)"
            raise ValueError("the model has no LoRA layers, so calibrate needs targets= "
                             f"(name suffixes, a regex or a callable); available: {available}")
        if strategy is not None or estimator is not None or init_options or overwrite:
            raise TypeError(
                f"initialization options "
                f"{_given_options(strategy, estimator, init_options, overwrite)} need a model "
                "with LoRA layers; call covinit.add_lora (or PEFT) first")
        layers = match_layers(model, targets)
    device = torch.device(device) if device is not None else _model_device(model)
    fingerprint = model_fingerprint(model)

    modes = {module: module.training for module in model.modules()}
    flags = {param: param.requires_grad for param in model.parameters()}
    if sketch_above is not None and n_folds > 1:
        raise ValueError("folds need exact summaries; use either folds= or sketch_above=")
    offsets = _output_offsets(adapters, layers)
    collector = Collector(layers, sides, precision=precision, folds=n_folds,
                          sketch_above=sketch_above, sketch_size=sketch_size, offsets=offsets)
    _check_memory(collector, device)
    try:
        total = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore
    except TypeError:
        total = None
    if total is not None and max_batches is not None:
        total = min(total, max_batches)
    rank0 = not distributed.is_distributed() or torch.distributed.get_rank() == 0
    n_batches = n_positions = 0
    start = time.perf_counter()
    try:
        # Eval mode by flag, not model.eval(): some LoRA layers (loralib's merge_weights)
        # merge B·A into the weight inside train()/eval(), which calibration must not do.
        for module in modes:
            module.training = False
        with torch.no_grad(), collector, _progress(total, show_progress and rank0) as bar:
            for index, batch in enumerate(dataloader):
                if max_batches is not None and index >= max_batches:
                    break
                batch = move_to_device(batch, device)
                try:
                    n_positions += collector.run_batch(model, batch, index, forward_fn,
                                                       loss_fn)
                except RuntimeError as err:
                    _note_device(err, device, model)
                    raise
                n_batches += 1
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.update(1)
                bar.set_postfix(pos_per_s=f"{n_positions / elapsed:,.0f}", refresh=False)
                if max_tokens is not None and n_positions >= max_tokens:
                    break
    except BaseException:
        try:  # let the other ranks stop instead of waiting in the merge
            _agree_ranks_ok(ok=False)
        except Exception:  # the error to report is the one being handled
            pass
        raise
    finally:
        collector.remove()
        for module, mode in modes.items():
            module.training = mode
        for param, flag in flags.items():
            param.requires_grad_(flag)
    seconds = time.perf_counter() - start
    _agree_ranks_ok(ok=True)

    results = collector.results()
    shared = collector.shared_inputs()
    names = list(layers)
    if distributed.is_distributed():
        results, shared, (n_batches, n_positions) = _merge_ranks(
            results, shared, names, [n_batches, n_positions])
    if n_batches == 0:
        raise ValueError("the dataloader yielded no batches; calibration needs data")
    for name in names:
        calls = max(results[name, side].calls for side in collector.sides)
        if calls == 0:
            called = [n for n in names if max(results[n, s].calls for s in collector.sides)]
            raise ValueError(
                f"target layer {name!r} was never called during calibration ({n_batches} "
                f"batches); check forward_fn and targets. Layers that were called: "
                f"{', '.join(called) or '(none)'}")
        for side in collector.sides:
            if results[name, side].total.n == 0:
                raise ValueError(
                    f"target layer {name!r} ({side}) was called {calls} time(s) but every "
                    "position was masked out (attention_mask == 0 or labels == -100)")

    stats = {key: res.total for key, res in results.items()}
    fold_stats = {key: res.folds for key, res in results.items()} if n_folds > 1 else None
    for layer, owner in shared.items():  # identical by construction: keep one object
        stats[layer, "input"] = stats[owner, "input"]
        if fold_stats is not None:
            fold_stats[layer, "input"] = fold_stats[owner, "input"]
    info = {"batches": n_batches, "positions": n_positions, "precision": precision,
            "seconds": round(seconds, 3),
            "world_size": torch.distributed.get_world_size()
            if distributed.is_distributed() else 1}
    gradients = {name: res.cross for (name, side), res in results.items()
                 if side == GRADIENT and res.cross is not None}
    gradient_folds = {name: res.cross_folds for (name, side), res in results.items()
                      if side == GRADIENT and res.cross_folds is not None} \
        if n_folds > 1 else None
    cal = Calibration(stats, collector.shapes, fingerprint, folds=fold_stats,
                      shared_inputs=shared, info=info, gradients=gradients,
                      gradient_folds=gradient_folds)
    if adapters and init:
        if skipped:
            warnings.warn(
                f"covinit leaves PEFT LoRA layer(s) {_describe(skipped)} as PEFT initialized "
                "them (embeddings: A = 0, B ~ N(0, 1), so ΔW = 0 at step 0): an embedding's "
                "input is a one-hot token id, whose covariance is diagonal, so covariance "
                "strategies do not apply", UserWarning, stacklevel=2)
        _check_ranks(cal, {name: adapters[name] for name in layers}, init_options.get("rank"))
        from covinit.initialize import initialize

        kwargs: dict[str, Any] = dict(init_options)
        kwargs["strategy"] = strategy or DEFAULT_STRATEGY
        if targets is not None:  # initialize exactly the adapters that were calibrated
            kwargs.setdefault("layers", list(layers))
        if estimator is not None:
            kwargs["estimator"] = estimator
        initialize(model, cal, **kwargs)
    return cal


def _given_options(strategy: str | None, estimator: str | None, options: Mapping[str, Any],
                   overwrite: bool) -> list[str]:
    """Names of the initialization options a caller passed (for error messages)."""
    flags = {"strategy": strategy is not None, "estimator": estimator is not None,
             "overwrite": bool(overwrite)}
    return sorted([*options, *(name for name, given in flags.items() if given)])


def _describe(layers: Mapping[str, str]) -> str:
    """``'a' (Embedding), 'b' (Conv2d)`` for ``{name: kind}``."""
    return ", ".join(f"{name!r} ({kind})" for name, kind in layers.items())


def _trained_reason(adapter: Any) -> str | None:
    """Why ``adapter`` is no longer at its initial state, or None if it is.

    Initial means (see :func:`calibrate`): the factors covinit's last init wrote, unchanged;
    or, with the base untouched, an adapter that adds nothing (``B·A = 0``); or, with a
    recorded residual offset ``P = c·B0``, ``Q = A0``, factors that still match it.
    """
    from covinit.adapters import is_inert, matches_initialized
    from covinit.export import residual_offset

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
    are short (a layer called on few batches, say), :func:`covinit.initialize.initialize`
    falls back to ``kaiming`` for those layers with a warning instead.
    """
    short: list[tuple[str, int, int]] = []
    for name, adapter in adapters.items():
        r = rank if isinstance(rank, int) and not isinstance(rank, bool) else adapter.rank
        kept = [m.n for side in cal.sides if (m := cal._stats.get((name, side))) is not None]
        if kept and min(kept) < r:
            short.append((name, min(kept), r))
    if short and len(short) == len(adapters):
        name, n, r = short[0]
        raise ValueError(
            f"layer {name!r} kept only {n} usable position(s) but rank {r} was requested, "
            f"and so did every other calibrated layer ({len(short)} in all); feed more data "
            f"(at least {r}, better {10 * r}) or lower the rank")
