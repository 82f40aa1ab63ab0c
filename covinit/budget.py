"""A memory budget for calibrating large models: plan the target layers into passes.

Exact float64 statistics grow with the square of a layer's width: the input side of a
Llama-2-7B ``down_proj`` (k = 11008) is ``8·k² ≈ 0.97 GB``, twice that while collecting
(accumulator plus a batch's temporary), and every linear layer of the model together needs
tens of GB.  :func:`plan_calibration` splits the target layers into groups whose statistics
fit in ``max_memory``; :func:`covinit.calibrate` (``max_memory=``) then runs one pass over the
data per group.  Each pass is the ordinary single-pass collection restricted to its group's
layers, so every summary is bitwise the one a single pass would give, provided that

* layers fed the same tensor (q/k/v, gate/up, a layer's output feeding the next) are in one
  group: they share one reduction per batch, and a reduction accumulated into its own stream
  rounds differently from one shared with other streams.  :func:`sharing_units` guesses those
  units from the module tree (same parent module and same input width, which also keeps
  Llama's ``o_proj`` with q/k/v, harmlessly); :func:`covinit.calibrate` finds them exactly
  on the first batch before it plans;
* every pass sees the same batches in the same order (a re-iterable dataloader without
  shuffling): fold ``i % folds`` and the position limits depend on the batch index.

The budget counts the statistics only, not the model's weights, activations or the
gradient side's backward graph.  Sides at least ``sketch_above`` wide are counted as
bounded-memory :class:`~covinit.sketch.Sketch` es (k×ℓ, not k×k): with a budget the widest
layers can be sketched and the rest kept exact.

Example
-------
>>> import torch
>>> from torch import nn
>>> from covinit.budget import plan_calibration
>>> model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 512))
>>> plan = plan_calibration(model, ["0", "2"], ("input",), max_memory="5MB")
>>> plan.passes, [group.layers for group in plan.groups]
(2, [('0',), ('2',)])
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from covinit.collect import SIDES, Collector, Targets, match_layers, side_bytes

__all__ = [
    "CalibrationPlan",
    "PassGroup",
    "parse_size",
    "plan_calibration",
    "sharing_units",
]

_SCALES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
           "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string with an optional unit: ``"8GB"`` (10⁹), ``"8GiB"`` (2³⁰),
    ``"500mb"``, ``"1.5GB"``, ``"123"``.

    Raises
    ------
    ValueError
        Negative numbers, unknown units, or anything else.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size must be >= 0 bytes, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size in bytes (int) or a string such as '8GB' or "
                         f"'8GiB', got {value!r}")
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*", value, flags=re.IGNORECASE)
    unit = match.group(2).lower().rstrip("b") if match else ""
    if match is None or unit not in _SCALES:
        raise ValueError(f"expected a size such as '500MB', '8GB' or '8GiB', got {value!r}")
    return int(float(match.group(1)) * _SCALES[unit])


def _gb(n_bytes: float) -> str:
    # decimal units, as max_memory="8GB" reads
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes:.0f} B"


@dataclass(frozen=True)
class PassGroup:
    """The layers one pass over the data collects.

    Attributes
    ----------
    layers : tuple of str
        In the model's order.
    sides : int
        Layer sides (streams) collected in this pass.
    bytes : int
        Their statistics while collecting (exact and sketched).
    """

    layers: tuple[str, ...]
    sides: int
    bytes: int


@dataclass(frozen=True)
class CalibrationPlan:
    """Which layers each pass of a budgeted calibration collects (:func:`plan_calibration`).

    Attributes
    ----------
    groups : tuple of PassGroup
        One per pass, in order.
    max_memory : int or None
        The budget in bytes (``None``: no budget, one pass).
    sketched : tuple of (str, str)
        ``(layer, side)`` kept as bounded-memory sketches (width ≥ ``sketch_above``).
    units : tuple of tuple of str
        Layers that must share a pass (fed the same tensor).
    """

    groups: tuple[PassGroup, ...]
    max_memory: int | None
    sketched: tuple[tuple[str, str], ...]
    units: tuple[tuple[str, ...], ...]

    @property
    def passes(self) -> int:
        """Number of passes over the data."""
        return len(self.groups)

    @property
    def total_bytes(self) -> int:
        """The statistics of every group together (what one pass would hold)."""
        return sum(group.bytes for group in self.groups)

    def label(self, index: int) -> str:
        """Progress text of pass ``index`` (0-based), e.g. ``"pass 2/5: 64 layer sides,
        7.60 GB"``."""
        group = self.groups[index]
        return f"pass {index + 1}/{self.passes}: {group.sides} layer sides, {_gb(group.bytes)}"

    def describe(self) -> str:
        """A table of the plan: one line per pass, then the totals."""
        budget = "none" if self.max_memory is None else _gb(self.max_memory)
        lines = [f"{self.passes} pass(es) over the data, budget {budget}, statistics "
                 f"{_gb(self.total_bytes)} in all, {len(self.sketched)} side(s) sketched",
                 f"{'pass':>4}  {'layers':>6}  {'sides':>5}  {'memory':>9}  first .. last layer"]
        for i, group in enumerate(self.groups):
            lines.append(f"{i + 1:>4}  {len(group.layers):>6}  {group.sides:>5}  "
                         f"{_gb(group.bytes):>9}  {group.layers[0]} .. {group.layers[-1]}")
        return "\n".join(lines)

    def info(self) -> dict[str, Any]:
        """The plan as JSON-ready values (recorded in ``Calibration.info["memory_plan"]``)."""
        return {"max_memory": self.max_memory, "passes": self.passes,
                "groups": [list(group.layers) for group in self.groups],
                "bytes": [group.bytes for group in self.groups],
                "sketched": [f"{layer}/{side}" for layer, side in self.sketched]}


def sharing_units(layers: Mapping[str, nn.Module]) -> list[list[str]]:
    """Layers that may be fed the same tensor, guessed from the module tree: same parent
    module and same input width (q/k/v; gate/up).  Without data this is the best guess;
    :func:`covinit.calibrate` observes the real sharing on a batch instead.

    Parameters
    ----------
    layers : mapping of str to nn.Module
        Linear layers by name.

    Returns
    -------
    list of list of str
        A partition of ``layers`` in the model's order.
    """
    shapes = Collector(layers, ("input",)).shapes  # widths only: no hook, no matrix
    units: dict[tuple[str, int], list[str]] = {}
    for name, (k, _) in shapes.items():
        units.setdefault((name.rpartition(".")[0], k), []).append(name)
    return list(units.values())


def plan_calibration(
    model: nn.Module | Mapping[str, nn.Module], targets: Targets | None = None,
    sides: Sequence[str] = SIDES, *, max_memory: int | str | None, folds: int = 1,
    sketch_above: int | None = None, sketch_size: int = 256,
    units: Sequence[Sequence[str]] | None = None, precision: str = "float64",
) -> CalibrationPlan:
    """Split the target layers into passes whose statistics fit in ``max_memory``.

    Works without data and without weights (a model built under ``torch.device("meta")``):
    only the layers' widths are read.  Units of layers that must share a pass are placed
    whole, first-fit in the model's order (so the first layer is in pass 1).

    Parameters
    ----------
    model : nn.Module or mapping of str to nn.Module
        A model (``targets`` selects its layers, :func:`covinit.collect.match_layers`) or the
        layers themselves.
    targets : list of str, str or callable, optional
        Required with a model.
    sides : sequence of {"input", "output", "gradient"}, default=("input", "output")
    max_memory : int, str or None
        Bytes or a size such as ``"8GB"`` / ``"24GiB"``; ``None`` plans one pass.
    folds : int, default=1
        Fold summaries multiply the exact statistics by ``folds + 1`` (with the temporary).
    sketch_above : int, optional; sketch_size : int, default=256
        Sides at least ``sketch_above`` wide are counted as sketches: ``3·8·w·ℓ`` bytes (the
        sketch, a batch's part and the test matrix Ω).
    units : sequence of sequence of str, optional
        Layers to keep in one pass; default :func:`sharing_units`.
    precision : {"float64", "mixed"}, default="float64"
        ``"mixed"`` also counts each fold's float32 pending co-moment (``4·w²`` bytes, see
        :func:`covinit.collect.side_bytes`).

    Returns
    -------
    CalibrationPlan

    Raises
    ------
    ValueError
        A unit (one layer, or layers sharing an input) whose statistics alone exceed the
        budget, naming it, its size, the budget and what to do; a non-positive budget.
    """
    layers = dict(model) if isinstance(model, Mapping) else _target_layers(model, targets)
    budget = None if max_memory is None else parse_size(max_memory)
    if budget is not None and budget <= 0:
        raise ValueError(f"max_memory must be a positive size, got {max_memory!r}")
    # shapes, checked sides and precision only: no hook, no matrix
    collector = Collector(layers, sides, folds=folds, precision=precision)
    need, sketched = _layer_bytes(collector, sketch_above, sketch_size)
    found = sharing_units(layers) if units is None else _check_units(units, layers)
    groups: list[_Group] = []
    for unit in found:
        size = sum(need[name] for name in unit)
        if budget is not None and size > budget:
            raise ValueError(_too_big(unit, size, budget, collector, sketch_above))
        slot = next((g for g in groups if budget is None or g.bytes + size <= budget), None)
        if slot is None:
            slot = _Group()
            groups.append(slot)
        slot.names.extend(unit)
        slot.bytes += size
    order = {name: i for i, name in enumerate(layers)}
    n_sides = len(collector.sides)
    return CalibrationPlan(
        groups=tuple(PassGroup(tuple(sorted(g.names, key=order.__getitem__)),
                               n_sides * len(g.names), g.bytes) for g in groups),
        max_memory=budget, sketched=tuple(sketched), units=tuple(tuple(u) for u in found))


@dataclass
class _Group:
    names: list[str] = field(default_factory=list)
    bytes: int = 0


def _target_layers(model: nn.Module, targets: Targets | None) -> dict[str, nn.Module]:
    if targets is None:
        raise ValueError("plan_calibration needs targets= with a model (name suffixes, a "
                         "regex or a callable), or a mapping of layers instead of the model")
    return match_layers(model, targets)


def _layer_bytes(collector: Collector, sketch_above: int | None, sketch_size: int
                 ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Bytes each layer's sides hold while collecting, and the sides counted as sketches."""
    need: dict[str, int] = {}
    sketched: list[tuple[str, str]] = []
    for name, (k, d) in collector.shapes.items():
        need[name] = 0
        for side in collector.sides:
            width = collector.width(name, side)
            if sketch_above is not None and width >= sketch_above:
                sketched.append((name, side))
                need[name] += 3 * 8 * width * min(sketch_size, width)
            else:
                need[name] += side_bytes(k, d, side, collector.n_folds + 1,
                                         collector.precision, staging=True)
    return need, sketched


def _check_units(units: Sequence[Sequence[str]], layers: Mapping[str, nn.Module]
                 ) -> list[list[str]]:
    """``units`` as lists, checked to be a partition of ``layers``."""
    seen = [name for unit in units for name in unit]
    if sorted(seen) != sorted(layers):
        missing = sorted(set(layers) - set(seen))
        extra = sorted(set(seen) - set(layers))
        raise ValueError(f"units must partition the target layers once each; missing "
                         f"{missing}, unknown or repeated {extra or 'none'}")
    order = {name: i for i, name in enumerate(layers)}
    out = [sorted(unit, key=order.__getitem__) for unit in units if unit]
    return sorted(out, key=lambda unit: order[unit[0]])


def _too_big(unit: Sequence[str], size: int, budget: int, collector: Collector,
             sketch_above: int | None) -> str:
    widths = {f"{name} {side}": collector.width(name, side)
              for name in unit for side in collector.sides}
    widest = max(widths.values())
    what = (f"layer {unit[0]!r} needs" if len(unit) == 1 else
            f"layers {', '.join(map(repr, unit))} (fed the same tensor, so collected in one "
            "pass) need")
    if "gradient" in collector.sides or collector.n_folds > 1:
        sketch = "drop the gradient side and folds= to allow sketch_above="
    else:
        sketch = f"pass sketch_above={widest} (or lower) to keep the widest sides as sketches"
    return (f"{what} {_gb(size)} of statistics while collecting, more than max_memory="
            f"{_gb(budget)} (widths {widths}, sketch_above={sketch_above}). Raise max_memory, "
            f"{sketch}, or drop sides with sides=")
