"""Init strategies: pure functions ``InitContext -> LoRAInit`` in one registry (DESIGN.md §4).

A strategy sees one layer at a time: its frozen weight ``W0`` (d×k, in ``nn.Linear``
orientation), the rank, LoRA's scaling (α/r or α/√r), a seeded generator and, when it
needs them, covariance estimates of the layer's inputs and outputs on the task data.  It
returns ``A`` (r×k), ``B`` (d×r) and optionally a residual base weight.  The adapted layer
then computes ``x @ W.T + scaling · (x @ A.T) @ B.T`` with ``W = base or W0``.

Contract, checked by the tests for every strategy: either ``B·A = 0`` at step 0, or
``base + scaling·B·A == W0`` to fp32 precision, so the model's function is unchanged.

Adding a strategy touches this file only::

    @_REGISTRY.register("name", "one line", needs=("input",), preserves="zero-delta")
    def name(ctx: InitContext) -> LoRAInit: ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from covinit._registry import Registry

__all__ = ["InitContext", "LoRAInit", "get_strategy", "strategies"]


@dataclass(frozen=True)
class LoRAInit:
    """What a strategy returns for one layer.

    Attributes
    ----------
    a : Tensor, shape (r, k), float64
    b : Tensor, shape (d, r), float64
    base : Tensor, shape (d, k), float64, or None
        Residual base weight replacing ``W0``; ``None`` keeps ``W0``.
    """

    a: Tensor
    b: Tensor
    base: Tensor | None = None


@dataclass
class InitContext:
    """Everything a strategy may use for one layer.

    Attributes
    ----------
    name : str
        Layer name, for error messages.
    weight : Tensor, shape (d, k), float64
        The frozen base weight ``W0`` (a copy; strategies must not modify it).
    rank : int
        LoRA rank ``r``.
    scaling : float
        LoRA's output scaling (``alpha / r`` or ``alpha / sqrt(r)`` for rsLoRA).
    generator : torch.Generator
        Seeded CPU generator for random parts.
    input_estimate, output_estimate : callable or None
        Zero-argument callables returning the covariance estimate of the layer's inputs
        (k×k) / outputs (d×d); ``None`` when the calibration has no such side.  Lazy, so
        strategies that do not need them cost nothing.
    options : dict
        Strategy-specific options (e.g. ``scale=``).
    """

    name: str
    weight: Tensor
    rank: int
    scaling: float
    generator: torch.Generator
    input_estimate: Callable[[], Any] | None = None
    output_estimate: Callable[[], Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, k)`` of the base weight."""
        d, k = self.weight.shape
        return d, k


Strategy = Callable[[InitContext], LoRAInit]
_REGISTRY: Registry[Strategy] = Registry("strategy")


def strategies() -> dict[str, str]:
    """Registered init strategies, ``name -> one-line description``."""
    return _REGISTRY.describe()


def get_strategy(name: str):  # -> Entry[Strategy]
    """Registry entry for ``name`` (raises ``ValueError`` listing the valid names)."""
    return _REGISTRY.get(name)
