"""The record of a residual init: what a layer's original weight was, and the folded adapter.

A residual strategy (``pissa``, ``cov-svd``, ``cov-minor``, ``two-sided``) replaces a
layer's base weight ``W0`` by ``W0 − c·B0·A0`` and starts the adapter at ``(A0, B0)``.
:func:`covinit.initialize` records, on each layer whose base it replaces, the offset from
the original weight as two *non-persistent buffers* (:data:`OFFSET_BUFFERS`):
``covinit_offset_P`` (d, m) ``= c·B0`` and ``covinit_offset_Q`` (m, k) ``= A0``, so that

    W0 = base + P·Q                                      (:func:`original_weight`)

Buffers move with ``model.to(...)`` but stay out of ``state_dict()`` (the model's
checkpoints are unchanged).  Storing ``c·B0`` instead of ``B0`` keeps the record valid when
the rank (and so the scaling convention) of the adapter changes later.  Initializing a
recorded layer again starts from ``W0``, so a record always describes one residual init.
:func:`covinit.save_lora` writes the record and :func:`covinit.load_lora` reads it back.

After training to ``(A, B)`` the layer computes ``(W0 − c·B0·A0 + c·B·A)·x``; folding the
step-0 part into the adapter (:func:`folded_lora`, the conversion PEFT applies to PiSSA /
CorDA adapters) gives factors for the untouched ``W0``::

    A' = [A; A0]   (r+m, k)        B' = [B, −B0]   (d, r+m)

so that ``W0 + c·B'·A' = W0 − c·B0·A0 + c·B·A``.  The rank grows; ``α`` follows so that the
scaling ``c`` stays the same (:func:`alpha_for`).

Example
-------
>>> import torch
>>> from torch import nn
>>> from covinit import add_lora, find_adapters, initialize
>>> from covinit.residual import folded_lora, original_weight
>>> model = add_lora(nn.Sequential(nn.Linear(8, 16)), ["0"], rank=2)
>>> w0 = model[0].base_layer.weight.detach().clone()
>>> _ = initialize(model, strategy="pissa")
>>> adapter = find_adapters(model)["0"]
>>> torch.allclose(original_weight(adapter).float(), w0, atol=1e-6)
True
>>> a, b, folded = folded_lora(adapter)
>>> tuple(a.shape), tuple(b.shape), folded
((4, 8), (16, 4), True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from covinit.adapters import LoRAAdapter

__all__ = [
    "OFFSET_BUFFERS",
    "alpha_for",
    "folded_lora",
    "offset_rank",
    "original_weight",
    "record_offset",
    "residual_offset",
    "store_offset",
]

#: Names of the buffers holding ``P = c·B0`` (d, m) and ``Q = A0`` (m, k).
OFFSET_BUFFERS = ("covinit_offset_P", "covinit_offset_Q")


def residual_offset(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(P (d, m), Q (m, k))`` with ``W0 = base + P·Q``, or None if nothing was recorded."""
    p = getattr(module, OFFSET_BUFFERS[0], None)
    q = getattr(module, OFFSET_BUFFERS[1], None)
    if p is None or q is None:
        return None
    return p, q


def offset_rank(adapter: LoRAAdapter) -> int:
    """``m``, the rank of ``adapter``'s recorded offset ``P·Q`` (0 without a record)."""
    offset = residual_offset(adapter.module)
    return 0 if offset is None else int(offset[1].shape[0])


def record_offset(adapter: LoRAAdapter, b0: Tensor | None, a0: Tensor | None) -> None:
    """Record that ``adapter``'s base weight just became ``W0 − scaling·b0·a0``.

    Called by :func:`covinit.initialize` when a residual strategy writes a new base, and with
    ``b0 = a0 = None`` when the original ``W0`` is back (the record is then removed).

    Parameters
    ----------
    adapter : LoRAAdapter
    b0 : Tensor, shape (d, r), or None
    a0 : Tensor, shape (r, k), or None
    """
    module = adapter.module
    if b0 is None or a0 is None:
        for name in OFFSET_BUFFERS:
            module._buffers.pop(name, None)
        return
    store_offset(adapter, b0.detach().to(torch.float64) * adapter.scaling, a0.detach())


def store_offset(adapter: LoRAAdapter, p: Tensor, q: Tensor) -> None:
    """Keep ``W0 = base + P·Q`` on ``adapter``'s module (what :func:`record_offset` computes,
    or what :func:`covinit.load_lora` reads back from a file).

    The buffers take the base weight's device and at least float32 precision.

    Parameters
    ----------
    adapter : LoRAAdapter
    p : Tensor, shape (d, m)
    q : Tensor, shape (m, k)
    """
    module = adapter.module
    weight = adapter.base_weight()
    dtype = torch.promote_types(weight.dtype, torch.float32)
    p = p.to(device=weight.device, dtype=dtype)
    q = q.to(device=weight.device, dtype=dtype)
    for name, value in zip(OFFSET_BUFFERS, (p, q), strict=True):
        if name in module._buffers:
            module._buffers[name] = value
        else:
            module.register_buffer(name, value, persistent=False)


def original_weight(adapter: LoRAAdapter) -> Tensor:
    """The layer's original weight ``W0`` (d, k) in float64, on the base weight's device.

    ``base + P·Q`` where a residual init is recorded (the sum in float64, so the only
    rounding is the buffers' own), else the base weight itself.  Always a new tensor.
    """
    base = adapter.base_weight().detach().to(torch.float64, copy=True)  # (d, k)
    offset = residual_offset(adapter.module)
    if offset is None:
        return base
    p, q = (t.detach().to(device=base.device, dtype=torch.float64) for t in offset)
    return base + p @ q


def folded_lora(adapter: LoRAAdapter, a: Tensor | None = None, b: Tensor | None = None
                ) -> tuple[Tensor, Tensor, bool]:
    """Factors that apply to the original base ``W0`` at the same scaling.

    Parameters
    ----------
    adapter : LoRAAdapter
    a : Tensor, shape (r, k), optional
    b : Tensor, shape (d, r), optional
        The layer's factors as saved elsewhere (e.g. by PEFT); default the adapter's own.

    Returns
    -------
    a_folded : Tensor, shape (r', k)
    b_folded : Tensor, shape (d, r')
        ``[A; A0]`` and ``[B, −B0]`` (``r' = r + m``) in the dtypes of ``a`` and ``b``; where
        ``r + m > min(d, k)`` the product is refactored exactly by an SVD at rank
        ``min(d, k)``.  The factors unchanged (``r' = r``) for a layer whose base is the
        original one.
    folded : bool
        Whether the step-0 part was folded in.

    Raises
    ------
    ValueError
        A replaced base without a record of the original weight (replaced outside
        :func:`covinit.initialize`, by PEFT's own base-rewriting inits, or loaded from a file
        written before covinit saved the record).
    """
    if a is None or b is None:
        a, b = adapter.get_lora()
    if not adapter.base_replaced:
        return a, b, False
    offset = residual_offset(adapter.module)
    if offset is None:
        raise ValueError(_no_record_message(adapter))
    p, q = offset
    b_extra = -(p.to(torch.float64) / adapter.scaling)
    a_new = torch.cat([a.to(torch.float64), q.to(torch.float64)], dim=0)  # (r+m, k)
    b_new = torch.cat([b.to(torch.float64), b_extra], dim=1)  # (d, r+m)
    d, k = adapter.out_features, adapter.in_features
    if a_new.shape[0] > min(d, k):
        # A rank above min(d, k) is not a valid LoRA rank (and never needed): B'·A' is a
        # d×k matrix, so its exact SVD refactors it at rank min(d, k).
        u, s, vh = torch.linalg.svd(b_new @ a_new, full_matrices=False)
        root = s.sqrt()
        a_new, b_new = root[:, None] * vh, u * root
    return a_new.to(a.dtype), b_new.to(b.dtype), True


def _no_record_message(adapter: LoRAAdapter) -> str:
    if getattr(adapter, "base_rewritten_by_peft", False):
        return (f"layer {adapter.name!r}: PEFT's init_lora_weights="
                f"{getattr(adapter, 'peft_init', None)!r} rewrote its base weight and kept no "
                "record of the original; export it with PEFT's own tools (save_pretrained "
                "with path_initial_model_for_weight_conversion), or covinit.save_lora, which "
                "saves the rewritten base too")
    return (f"layer {adapter.name!r}: its base weight was replaced, but covinit has no record "
            "of the original weight (replaced outside covinit.initialize, or loaded from a "
            "file written before covinit saved that record); export the adapter with "
            "covinit.save_lora instead, which saves the residual base too")


def alpha_for(scaling: float, rank: int, rslora: bool) -> float:
    """The ``α`` that gives a rank-``rank`` adapter the scaling ``scaling``: ``scaling·rank``,
    or ``scaling·√rank`` for rsLoRA (the inverse of :func:`covinit.lora.scaling_for`)."""
    return scaling * (math.sqrt(rank) if rslora else rank)
