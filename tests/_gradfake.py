"""An independent gradient-side calibration for the strategy tests, and a one-step probe.

:class:`GradCalibration` implements the calibration interface :func:`covinit.initialize`
reads (``sides``, ``layer_names``, ``moments``, ``folds``, ``gradient``, ``check_model``)
from plain autograd: forward hooks on each target's base ``nn.Linear`` keep its inputs ``x``
and outputs, a tensor hook keeps ``δ = ∂L/∂y``, and ``G = Σ δ·xᵀ`` is summed in float64.
It does not use covinit's collector, so the strategies are tested against a reference that
shares no code with the statistics they are usually given.

:func:`adam_step_energy` takes one real ``torch.optim.AdamW`` step on the LoRA factors and
measures each layer's output change ``c·(B'A' − BA)·x`` on the same positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from covinit import find_adapters
from covinit.stats import Moments

Keep = Callable[[Any], Tensor | None]


def _linear_layers(model: nn.Module, targets: Sequence[str] | None) -> dict[str, nn.Linear]:
    """``name -> nn.Linear`` (the base layer of an adapter, under its canonical name)."""
    adapters = find_adapters(model)
    if adapters:
        layers = {n: a.base_layer for n, a in adapters.items()}
    else:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets is not None:
        layers = {n: m for n, m in layers.items()
                  if any(n == t or n.endswith("." + t) for t in targets)}
    return layers


def capture(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor],
            targets: Sequence[str] | None = None, keep: Keep | None = None,
            ) -> dict[str, dict[str, Tensor]]:
    """Run forward + backward on each batch; per layer the kept rows of ``x`` (n, k), ``y``
    (n, d) and ``δ`` (n, d), float64, concatenated over batches.  Parameter ``.grad`` is
    cleared afterwards."""
    layers = _linear_layers(model, targets)
    rows: dict[str, dict[str, list[Tensor]]] = {n: {"x": [], "y": [], "delta": []}
                                                 for n in layers}
    mask: list[Tensor | None] = [None]

    def flat(t: Tensor) -> Tensor:
        t = t.detach().to(torch.float64)
        if mask[0] is not None:
            return t[mask[0]]
        return t.reshape(-1, t.shape[-1])

    def hook(name: str):
        def fn(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            rows[name]["x"].append(flat(args[0]))
            rows[name]["y"].append(flat(out))
            if out.requires_grad:  # a frozen first layer's output has no gradient
                out.register_hook(lambda g: rows[name]["delta"].append(flat(g)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for batch in batches:
            mask[0] = None if keep is None else keep(batch)
            loss_fn(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {n: {key: torch.cat(v) for key, v in r.items() if v} for n, r in rows.items()}


class GradCalibration:
    """Calibration interface over captured rows (see module docstring)."""

    def __init__(self, rows: dict[str, dict[str, Tensor]], sides: Sequence[str] = (
            "input", "output", "gradient")) -> None:
        self.rows = rows
        self.sides = tuple(sides)
        self._moments = {(n, side): Moments.from_batch(r[key]) for n, r in rows.items()
                         for side, key in (("input", "x"), ("output", "y"),
                                           ("gradient", "delta")) if side in self.sides}

    @classmethod
    def collect(cls, model: nn.Module, batches: Iterable[Any],
                loss_fn: Callable[[nn.Module, Any], Tensor], targets: Sequence[str] | None = None,
                keep: Keep | None = None, sides: Sequence[str] = ("input", "output", "gradient"),
                ) -> GradCalibration:
        return cls(capture(model, batches, loss_fn, targets, keep), sides)

    @property
    def layer_names(self) -> list[str]:
        return list(self.rows)

    def moments(self, layer: str, side: str = "input") -> Moments | None:
        return self._moments.get((layer, side))

    def folds(self, layer: str, side: str = "input") -> None:
        return None

    def gradient(self, layer: str) -> Tensor:
        r = self.rows[layer]
        return r["delta"].T @ r["x"]  # G = Σ δ·xᵀ, (d, k)

    def second_moment(self, layer: str) -> Tensor:
        x = self.rows[layer]["x"]
        return x.T @ x / x.shape[0]

    def check_model(self, model: nn.Module) -> None:
        pass


def adam_step_energy(model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor],
                     lr: float, keep: Keep | None = None, weight_decay: float = 0.01,
                     ) -> dict[str, float]:
    """One ``AdamW`` step on every LoRA factor; per layer the mean over the batch's kept
    positions of ``‖c·(B'A' − BA)·x‖²`` (the layer's own output change, inputs held fixed).
    The model's factors are left stepped."""
    adapters = find_adapters(model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    before = {n: tuple(t.detach().double().clone() for t in a.get_lora())
              for n, a in adapters.items()}
    rows = capture(model, [batch], loss_fn, list(adapters), keep)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    opt.zero_grad()
    loss_fn(model, batch).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out = {}
    for name, adapter in adapters.items():
        a0, b0 = before[name]
        a1, b1 = (t.detach().double() for t in adapter.get_lora())
        delta = adapter.scaling * (b1 @ a1 - b0 @ a0)  # (d, k)
        x = rows[name]["x"]
        out[name] = float((x @ delta.T).pow(2).sum() / x.shape[0])
    return out
