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

import math
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


# ---------------------------------------------------------------------- baseline strategies
def _zeros_b(ctx: InitContext) -> Tensor:
    d, _ = ctx.shape
    return torch.zeros(d, ctx.rank, dtype=torch.float64)


@_REGISTRY.register(
    "kaiming", "PEFT's default: A Kaiming-uniform (a=√5), B = 0 (Hu et al. 2021)",
    needs=(), preserves="zero-delta", options=(),
)
def kaiming(ctx: InitContext) -> LoRAInit:
    """``A ~ U(-1/√k, 1/√k)`` (``kaiming_uniform_`` with ``a=√5``, as PEFT and loralib), ``B = 0``.

    Returns
    -------
    LoRAInit
        ``a`` (r, k) random, ``b`` (d, r) zero, so ``ΔW = 0`` at step 0.
    """
    _, k = ctx.shape
    a = torch.empty(ctx.rank, k, dtype=torch.float64)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=ctx.generator)
    return LoRAInit(a, _zeros_b(ctx))


@_REGISTRY.register(
    "gaussian", "PEFT's 'gaussian': A ~ N(0, std=1/r), B = 0",
    needs=(), preserves="zero-delta", options=(),
)
def gaussian(ctx: InitContext) -> LoRAInit:
    """``A ~ N(0, σ²)`` with ``σ = 1/r`` (PEFT's ``init_lora_weights="gaussian"``), ``B = 0``.

    PEFT uses the *standard deviation* ``1/r`` (variance ``1/r²``); matched here so that the
    baseline is PEFT's.

    Returns
    -------
    LoRAInit
        ``a`` (r, k) random, ``b`` (d, r) zero, so ``ΔW = 0`` at step 0.
    """
    _, k = ctx.shape
    a = torch.empty(ctx.rank, k, dtype=torch.float64)
    torch.nn.init.normal_(a, std=1.0 / ctx.rank, generator=ctx.generator)
    return LoRAInit(a, _zeros_b(ctx))


@_REGISTRY.register(
    "zero", "control: A = 0 and B = 0 (training cannot move the adapter)",
    needs=(), preserves="zero-delta", options=(),
)
def zero(ctx: InitContext) -> LoRAInit:
    """``A = 0``, ``B = 0``: a control, not a usable init.

    With both factors zero every gradient of the adapter is zero too (``∂L/∂A ∝ Bᵀ`` and
    ``∂L/∂B ∝ A``), so plain gradient descent never moves it; it measures what the base model
    does with the adapter switched off under identical training.
    """
    _, k = ctx.shape
    return LoRAInit(torch.zeros(ctx.rank, k, dtype=torch.float64), _zeros_b(ctx))


@_REGISTRY.register(
    "pissa", "PiSSA: A, B from the top-r SVD of W0, residual base (Meng et al. 2024)",
    needs=(), preserves="function", options=(),
)
def pissa(ctx: InitContext) -> LoRAInit:
    """Principal singular components of ``W0`` into the adapter, the rest into the base.

    With ``W0 = U S Vᵀ`` (float64) and ``c`` = LoRA's scaling::

        A = √(S_r / c) · V_rᵀ      (r, k)
        B = U_r · √(S_r / c)       (d, r)
        base = W0 − c·B·A = W0 − U_r S_r V_rᵀ

    the same convention as PEFT's ``init_lora_weights="pissa"`` (singular values divided by
    the scaling before the square root), so ``c·B·A`` and the layer's output are unchanged.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k).
    """
    w = ctx.weight.to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (d, m), (m,), (m, k)
    root = torch.sqrt(s[: ctx.rank] / ctx.scaling)  # (r,)
    a = root[:, None] * vh[: ctx.rank]  # (r, k)
    b = u[:, : ctx.rank] * root[None, :]  # (d, r)
    return LoRAInit(a, b, w - ctx.scaling * (b @ a))
