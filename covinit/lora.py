"""covinit's own LoRA layer (the functions that put it into a model are in
:mod:`covinit.surgery`).

:class:`LoRALinear` wraps an *existing* ``nn.Linear`` (or Hugging Face ``Conv1D``) without
copying its weight: the wrapped module stays reachable as ``.base_layer``, so a model's state
dict keeps ``...query.base_layer.weight`` next to the new ``...query.lora_A`` and
``...query.lora_B``.  The layer computes (Hu et al. 2021)::

    y = base_layer(x) + scaling · (dropout(x) @ Aᵀ) @ Bᵀ,  scaling = α/r  (rsLoRA: α/√r)

in two thin matrix products, never forming the d×k matrix ``B·A``.

The base may also be a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (both ``nn.Linear``
subclasses): its forward is bitsandbytes' own, :meth:`LoRALinear.base_weight` returns the
dequantized ``Q(W)`` and :meth:`LoRALinear.set_base_weight` re-quantizes (see
:mod:`covinit._bnb`); the factors are then float (the dequantized weight's dtype).

Example
-------
>>> import torch
>>> from torch import nn
>>> layer = LoRALinear(nn.Linear(16, 32), rank=4, alpha=8)
>>> layer.lora_A.shape, layer.lora_B.shape, layer.scaling
(torch.Size([4, 16]), torch.Size([32, 4]), 2.0)
>>> torch.equal(layer(torch.ones(2, 16)), layer.base_layer(torch.ones(2, 16)))  # B = 0
True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from covinit._bnb import QuantizedBase, quantized_kind
from covinit._linear import is_conv1d, is_linear, linear_shape

__all__ = ["LoRALinear", "check_rank", "scaling_for"]


def scaling_for(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoRA's output scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_rank(rank: object, name: str, d: int, k: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank for layer {name!r} must be an int, got {type(rank).__name__}")
    if not 0 < rank <= min(d, k):
        raise ValueError(
            f"rank {rank} is invalid for layer {name!r} of shape (d={d}, k={k}); "
            f"allowed: 1 <= rank <= min(d, k) = {min(d, k)}"
        )
    return rank


# ---------------------------------------------------------------------- the layer
class LoRALinear(nn.Module):
    """A low-rank adapter around an existing linear layer.

    Parameters
    ----------
    base_layer : nn.Linear, transformers Conv1D, or bitsandbytes Linear4bit / Linear8bitLt
        The layer to adapt.  It is kept as ``self.base_layer`` (not copied) and left as is;
        :func:`add_lora` is what freezes it.  A bitsandbytes layer must hold quantized
        weights already (loaded with ``BitsAndBytesConfig``, or moved to its device).
    rank : int, default=8
        ``r``, with ``1 <= r <= min(d, k)``.
    alpha : float, default=16
        LoRA's ``α``; the adapter's output is scaled by :attr:`scaling`.
    dropout : float, default=0.0
        Dropout probability on the adapter's input, in ``[0, 1)``.
    use_rslora : bool, default=False
        Scale by ``α/√r`` instead of ``α/r``.
    name : str, optional
        Layer name used in error messages.

    Attributes
    ----------
    lora_A : nn.Parameter, shape (r, k)
        Initialised as PEFT's default (Kaiming-uniform with ``a=√5``).
    lora_B : nn.Parameter, shape (d, r)
        Initialised to zero, so a fresh layer computes exactly ``base_layer(x)``.
    merged : bool
        Whether ``scaling·B·A`` is currently added into the base weight.
    base_replaced : bool
        Whether :meth:`set_base_weight` replaced ``W0`` (e.g. with a strategy's residual);
        :func:`covinit.save_lora` then saves the base weight too.

    Notes
    -----
    ``A`` and ``B`` take the base weight's dtype and device (over a bitsandbytes base, the
    dtype of its dequantized weight: the original dtype for 4-bit, float32 for 8-bit).
    Shapes: ``d`` = out_features, ``k`` = in_features; input ``x`` is ``(..., k)`` and the
    output ``(..., d)``.

    Over a bitsandbytes base the layer cannot be merged (re-quantizing ``W + c·B·A`` would
    lose the adapter's precision, and unmerging would not give ``W`` back); export the
    adapter instead (:func:`covinit.export_lora`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        name: str = "<layer>",
    ) -> None:
        super().__init__()
        if isinstance(base_layer, LoRALinear):
            raise ValueError(f"layer {name!r} already has a covinit LoRA adapter")
        if not is_linear(base_layer):
            raise TypeError(
                f"layer {name!r}: LoRALinear wraps nn.Linear or transformers Conv1D, "
                f"got {type(base_layer).__name__}"
            )
        d, k = linear_shape(base_layer)
        rank = check_rank(rank, name, d, k)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
            raise ValueError(f"alpha for layer {name!r} must be a positive number, got {alpha!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout for layer {name!r} must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.in_features = k
        self.out_features = d
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.name = name
        self.merged = False
        self.base_replaced = False
        # A bitsandbytes base stores codes; reads dequantize them, writes re-quantize.
        self._quant = QuantizedBase(name, base_layer) if quantized_kind(base_layer) else None
        weight = base_layer.weight
        dtype = self._quant.dtype if self._quant else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, k, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(d, rank, dtype=dtype, device=weight.device))
        # Same default as PEFT and loralib: A as nn.Linear's own init, B = 0 (so ΔW = 0).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout = float(dropout)

    # ------------------------------------------------------------------ views
    @property
    def scaling(self) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA)."""
        return scaling_for(self.alpha, self.rank, self.use_rslora)

    @property
    def weight(self) -> Tensor:
        """The base layer's stored weight parameter (as stored: ``(k, d)`` for Conv1D)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias, shape (d,), or None."""
        return self.base_layer.bias

    def base_weight(self) -> Tensor:
        """The base weight in ``nn.Linear`` orientation, shape (d, k).

        A detached view of the stored parameter (transposed for Conv1D), not a copy: do not
        modify it in place; use :meth:`set_base_weight`.  While :attr:`merged`, it includes
        ``scaling·B·A``.  Over a bitsandbytes base, a new tensor holding the dequantized
        ``Q(W)``.
        """
        if self._quant is not None:
            return self._quant.read()
        w = self.base_layer.weight.detach()
        return w.T if self.fan_in_fan_out else w

    def set_base_weight(self, weight: Tensor, replaced: bool = True) -> None:
        """Overwrite the base weight in place (keeps the parameter, its dtype and device).

        Over a bitsandbytes base, ``weight`` is re-quantized in the layer's format, so the
        base then holds ``Q(weight)``: exact only for a weight on the layer's grid.

        Parameters
        ----------
        weight : Tensor, shape (d, k)
            New base weight in ``nn.Linear`` orientation, any floating dtype.
        replaced : bool, default=True
            Sets :attr:`base_replaced`; ``False`` when the original ``W0`` is restored.
        """
        self._require_unmerged("set the base weight of")
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"base weight for layer {self.name!r} must have shape {expected}, "
                f"got {tuple(weight.shape)}"
            )
        if self._quant is not None:
            self._quant.write(weight)
        else:
            with torch.no_grad():
                self.base_weight().copy_(weight)
        self.base_replaced = replaced

    def get_lora(self) -> tuple[Tensor, Tensor]:
        """Copies of ``(A (r, k), B (d, r))``."""
        return self.lora_A.detach().clone(), self.lora_B.detach().clone()

    def set_lora(self, a: Tensor, b: Tensor) -> None:
        """Write ``A (r, k)`` and ``B (d, r)`` in place (parameters, dtype and device kept)."""
        self._require_unmerged("set the LoRA factors of")
        for label, value, param in (("A", a, self.lora_A), ("B", b, self.lora_B)):
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"LoRA {label} for layer {self.name!r} must have shape "
                    f"{tuple(param.shape)}, got {tuple(value.shape)}"
                )
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)

    def resize(self, rank: int) -> None:
        """Change the rank to ``rank``, keeping :attr:`scaling` (``alpha`` is adjusted).

        ``lora_A`` and ``lora_B`` are replaced by *new* parameters of shapes (rank, k) and
        (d, rank), initialised as in the constructor (Kaiming-uniform A, zero B), so the
        layer's output is ``base_layer(x)`` afterwards.  An optimizer holding the old
        parameters must be re-created.  Used by rank allocation (``rank_budget=``).
        """
        self._require_unmerged("resize")
        rank = check_rank(rank, self.name, self.out_features, self.in_features)
        scaling = self.scaling
        self.alpha = scaling * (math.sqrt(rank) if self.use_rslora else rank)
        self.rank = rank
        old_a, old_b = self.lora_A, self.lora_B
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=old_a.dtype,
                                               device=old_a.device),
                                   requires_grad=old_a.requires_grad)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=old_b.dtype,
                                               device=old_b.device),
                                   requires_grad=old_b.requires_grad)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> Tensor:
        """``scaling · B·A``, shape (d, k), in at least float32 (for merging and inspection)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        a = self.lora_A.detach().to(dtype)
        b = self.lora_B.detach().to(dtype)
        return (b @ a) * self.scaling

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Add ``scaling·B·A`` into the base weight; :meth:`forward` then skips the adapter.

        The sum is formed in at least float32 and rounded once to the base dtype, so
        ``merge(); unmerge()`` restores the weight to that dtype's precision.
        """
        if self.merged:
            raise ValueError(f"layer {self.name!r} is already merged")
        if self._quant is not None:
            raise ValueError(
                f"cannot merge layer {self.name!r} (d={self.out_features}, "
                f"k={self.in_features}): its base is a bitsandbytes {self._quant.bits}-bit "
                "layer, and re-quantizing W + scaling·B·A would round the adapter away "
                "(unmerge could not restore W); export the adapter (covinit.export_lora) and "
                "merge it into the full-precision model")
        self._add_delta(+1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ``scaling·B·A`` from the base weight again."""
        if not self.merged:
            raise ValueError(f"layer {self.name!r} is not merged")
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        w = self.base_weight()
        delta = self.delta_weight()
        with torch.no_grad():
            w.copy_((w.to(delta.dtype) + sign * delta).to(w.dtype))

    def _require_unmerged(self, action: str) -> None:
        if self.merged:
            raise ValueError(f"cannot {action} layer {self.name!r} while it is merged; "
                             "call unmerge() first")

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """``base_layer(x) + scaling·(dropout(x) @ Aᵀ) @ Bᵀ``; x (..., k) → (..., d)."""
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.T  # (..., r)
        return y + (h @ self.lora_B.T * self.scaling).to(y.dtype)  # (..., d)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
                f"use_rslora={self.use_rslora}, dropout={self.dropout:g}, merged={self.merged}")
