"""Quantized bases (QLoRA): a quantizer, and inits whose adapter repairs the quantization error.

A 4-bit (or lower) base computes ``Q(W)·x`` instead of ``W·x``; the error on the task is
``E·x`` with ``E = W − Q(W)`` (d×k).  What matters is not ``E`` itself but the part of it that
the task's inputs excite, so the adapter can start by cancelling that part: with ``M`` the
layer's input second moment ``E[xxᵀ]`` (k×k, shrunk by the chosen estimator) and ``c`` LoRA's
scaling, minimise over rank-``r`` factors::

    E_x ‖(W − Q(W) − c·B·A)·x‖² = ‖(E − c·B·A)·M^{1/2}‖_F²

whose minimiser is the top-``r`` SVD of ``E·M^{1/2}`` mapped back with ``M^{-1/2}``
(Eckart–Young in the ``M``-weighted norm; CLoQ, Deng et al. 2025, arXiv 2501.18475).  The
data-free variant takes the top-``r`` SVD of ``E`` itself (LoftQ's one-step form, Li et al.
2023, arXiv 2310.08659), so the two differ only by the data.

The quantizer is blockwise absmax "normal float" (NF-k, Dettmers et al. 2023, arXiv
2305.14314): each block of ``block_size`` consecutive weights (row-major, as bitsandbytes
flattens them) is divided by its largest magnitude and rounded to the nearest of ``2^k``
levels placed at quantiles of a standard normal; for ``k = 4`` these are bitsandbytes'
``nf4`` levels.  :func:`quantize` returns the *dequantized* weight ``Q(W)``: a plain
``nn.Linear`` holding it computes what a quantized layer computes (up to the compute dtype).

Example
-------
>>> import torch
>>> from covinit.quant import quantize
>>> w = torch.randn(8, 64, dtype=torch.float64)
>>> q = quantize(w, bits=4)
>>> bool((q - w).norm() < 0.2 * w.norm())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from covinit.inits import (
    _REGISTRY,
    InitContext,
    LoRAInit,
    _estimate,
    _matrix_powers,
    _option,
    _split_svd,
)

__all__ = ["nf_levels", "quant_residual", "quant_svd", "quantize", "repair", "weighted_error"]

#: Lowest quantile of the NF levels' positive half, bitsandbytes' and QLoRA's choice
#: ``(1/(2·15) + 1/(2·16))`` mirrored: it keeps the extreme levels at ±1 after normalising.
NF_OFFSET = 0.9677083

#: Bit widths the NF quantizer supports: 1 bit has no zero level, above 8 the levels'
#: quantile spacing is below fp32's resolution near 0 and nobody quantizes there.
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8)


def nf_levels(bits: int) -> Tensor:
    """The ``2^bits`` normal-float levels in [-1, 1], ascending, float64.

    Asymmetric, with an exact zero (QLoRA's construction): ``2^(bits−1)`` positive levels at
    standard-normal quantiles of ``linspace(NF_OFFSET, 0.5, 2^(bits−1)+1)`` (the last, 0.5,
    dropped), ``2^(bits−1) − 1`` negative levels mirrored from ``linspace(NF_OFFSET, 0.5,
    2^(bits−1))``, and 0; divided by the largest so the extremes are ±1.

    Parameters
    ----------
    bits : int
        In ``ALLOWED_BITS``.

    Returns
    -------
    Tensor, shape (2**bits,), float64
    """
    _check_bits(bits)
    half = 2 ** (bits - 1)
    p_pos = torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(p_pos)
    neg = -torch.special.ndtri(p_neg)
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return levels / levels.abs().max()


def _check_bits(bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported by the normal-float quantizer; "
                         f"allowed: {list(ALLOWED_BITS)}")


def quantize(weight: Tensor, bits: int = 4, block_size: int = 64) -> Tensor:
    """Blockwise absmax normal-float quantization, returned dequantized: ``Q(W)``.

    Parameters
    ----------
    weight : Tensor, shape (d, k)
        Floating weight (any dtype; computed in float32 like bitsandbytes, returned in
        ``weight``'s dtype).
    bits : int, default=4
        Bits per weight (``ALLOWED_BITS``); 4 gives bitsandbytes' ``nf4`` levels.
    block_size : int, default=64
        Consecutive weights (row-major) sharing one absmax scale; bitsandbytes and
        transformers' ``BitsAndBytesConfig`` use 64.  ``d·k`` need not be a multiple: the last
        block is shorter.

    Returns
    -------
    Tensor, shape (d, k)
        The dequantized weight; ``weight − quantize(weight)`` is the quantization error ``E``.

    Raises
    ------
    ValueError
        For unsupported ``bits``, a non-positive ``block_size``, a weight that is not 2-D or
        not finite.
    TypeError
        For a non-floating weight (an already packed quantized weight, for instance).
    """
    _check_bits(bits)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError("quantize needs a floating weight tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} (a packed quantized "
                        "weight must be dequantized first)")
    if weight.dim() != 2:
        raise ValueError(f"quantize needs a 2-D weight (d, k), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("quantize got a weight with NaN/Inf values")
    flat = weight.detach().to(torch.float32).reshape(-1)  # (d·k,)
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, block_size)  # (nb, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (nb, 1)
    # An all-zero block has scale 0: any level times 0 is 0, so divide by 1 instead.
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = nf_levels(bits).to(torch.float32)  # (L,)
    # Nearest level via the midpoints between neighbours (bucketize is O(n log L)).
    mids = (levels[1:] + levels[:-1]) / 2  # (L−1,)
    codes = torch.bucketize(normed, mids)  # (nb, block) indices into levels
    deq = (levels[codes] * absmax).reshape(-1)[: flat.numel()]
    return deq.reshape(weight.shape).to(weight.dtype)


def weighted_error(error: Tensor, second_moment: Tensor | None = None) -> float:
    """``tr(E·M·Eᵀ)`` = ``E_x‖E·x‖²`` for inputs with second moment ``M`` (``‖E‖_F²`` without).

    Parameters
    ----------
    error : Tensor, shape (d, k)
    second_moment : Tensor, shape (k, k), optional

    Returns
    -------
    float
    """
    e = error.to(torch.float64)
    if second_moment is None:
        return float((e * e).sum())
    return float(((e @ second_moment.to(torch.float64)) * e).sum())


def repair(error: Tensor, rank: int, scaling: float, m_half: Tensor | None = None,
           m_neg_half: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rank-``r`` factors with ``c·B·A`` the best approximation of ``error`` in the
    ``M``-weighted norm (plain Frobenius without ``M``).

    With ``E·M^{1/2} = U S Vᵀ``::

        B = U_r √(S_r/c)                  (d, r)
        A = √(S_r/c) V_rᵀ M^{-1/2}        (r, k)

    so ``c·B·A·M^{1/2} = U_r S_r V_rᵀ``, the Eckart–Young optimum of ``‖(E − X)·M^{1/2}‖_F``
    over rank-``r`` ``X``.  ``√S`` is split evenly between the factors (as PiSSA / LoftQ).

    Parameters
    ----------
    error : Tensor, shape (d, k), float64
    rank : int
    scaling : float
        LoRA's ``c`` (α/r or α/√r).
    m_half, m_neg_half : Tensor, shape (k, k), optional
        ``M^{1/2}`` and ``M^{-1/2}``; both or neither.

    Returns
    -------
    (a, b) : Tensor (r, k), Tensor (d, r), float64
    """
    e = error.to(torch.float64)
    weighted = e if m_half is None else e @ m_half
    b, root, v_r = _split_svd(weighted, rank, scaling, minor=False)
    a = root[:, None] * (v_r.T if m_neg_half is None else v_r.T @ m_neg_half)
    return a, b


def _int_option(ctx: InitContext, key: str, default: int, low: int) -> int:
    value = _option(ctx, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"option {key}= must be an int >= {low}, got {value!r} "
                         f"(layer {ctx.name!r})")
    return value


#: ``keep=`` values: which alternation round the strategy returns.
KEEP = ("best", "last")


def _quant_options(ctx: InitContext) -> tuple[int, int, int, str]:
    bits = _option(ctx, "bits", 4)
    try:
        _check_bits(bits)
    except ValueError as err:
        raise ValueError(f"layer {ctx.name!r}: {err}") from None
    keep = _option(ctx, "keep", "best")
    if keep not in KEEP:
        raise ValueError(f"option keep= must be one of {list(KEEP)}, got {keep!r} "
                         f"(layer {ctx.name!r})")
    return (bits, _int_option(ctx, "block_size", 64, 1),
            _int_option(ctx, "iterations", 1, 1), keep)


#: Relative Frobenius distance under which the layer's base counts as ``Q(W)`` (float32
#: rounding of the same codes and scales) or as ``W`` itself (a plain base, up to bf16).
_SAME_GRID, _SAME_WEIGHT = 1e-5, 1e-2


def _given_weight(ctx: InitContext, source: object) -> Tensor:
    """Layer ``ctx.name``'s full-precision weight (d, k), float64, from ``full_precision=``:
    an unquantized model (the layer found by canonical name) or a mapping
    ``{name or name + ".weight": Tensor (d, k)}``."""
    from torch import nn

    from covinit._linear import is_conv1d
    from covinit.adapters import find_linear_layers

    if isinstance(source, nn.Module):
        layers = find_linear_layers(source)
        layer = layers.get(ctx.name)
        if layer is None:
            raise ValueError(f"full_precision= model has no linear layer {ctx.name!r}; "
                             f"its layers: {', '.join(list(layers)[:8])}...")
        weight = layer.weight.T if is_conv1d(layer) else layer.weight  # Conv1D: (k, d)
    elif isinstance(source, Mapping):
        weight = source.get(ctx.name, source.get(f"{ctx.name}.weight"))
        if weight is None:
            raise ValueError(f"full_precision= mapping has no entry {ctx.name!r} or "
                             f"{ctx.name + '.weight'!r}")
    else:
        raise TypeError("option full_precision= must be the unquantized nn.Module or a "
                        f"mapping name -> weight (d, k), got {type(source).__name__} "
                        f"(layer {ctx.name!r})")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() \
            or tuple(weight.shape) != ctx.shape:
        raise ValueError(f"full_precision= weight for layer {ctx.name!r} must be a floating "
                         f"tensor of shape {ctx.shape}, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    return weight.detach().to("cpu", torch.float64)


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _full_weight(ctx: InitContext, bits: int, block_size: int) -> Tensor:
    """The full-precision ``W`` (d, k), float64, that the layer's base quantizes.

    Without ``full_precision=``, the base itself; refused when the base is already on the
    ``bits``-bit grid (a bitsandbytes ``Linear4bit`` read dequantized): its quantization
    error is gone, ``E = 0`` and there would be nothing to repair.  With it, the given weight,
    checked against the base: the base must be that weight (a plain layer) or its
    quantization in this format (a real quantized layer), else the formats differ.
    """
    base = ctx.weight.to(torch.float64)
    source = _option(ctx, "full_precision", None)
    if source is None:
        if _relative(quantize(base, bits, block_size), base) <= _SAME_GRID:
            raise ValueError(
                f"layer {ctx.name!r} (d, k = {ctx.shape}): its base is already quantized "
                f"({bits}-bit NF, block {block_size}; e.g. a bitsandbytes Linear4bit), so its "
                "quantization error is unknown; pass full_precision=<the unquantized model or "
                "a mapping name -> weight>")
        return base
    w = _given_weight(ctx, source)
    on_grid = _relative(base, quantize(w, bits, block_size)) <= _SAME_GRID
    if not on_grid and _relative(base, w) > _SAME_WEIGHT:
        raise ValueError(
            f"layer {ctx.name!r}: its base is neither the full_precision= weight nor that "
            f"weight's {bits}-bit NF quantization with block_size={block_size} (relative "
            f"distance {_relative(base, quantize(w, bits, block_size)):.3g}); pass the model "
            "it was quantized from and bits/block_size matching its quantization (nf4 "
            "without double quantization: bits=4 and its block size; fp4 and double-quantized "
            "bases are not on covinit's grid); after an earlier residual init of this layer, "
            "covinit.restore_base(model) first")
    return w


def _alternate(ctx: InitContext, m_half: Tensor | None, m_neg_half: Tensor | None,
               m: Tensor | None) -> LoRAInit:
    """LoftQ-style alternation, weighted by ``M`` when given: ``Q_t = Q(W − c·B_{t−1}·A_{t−1})``,
    then ``(B_t, A_t)`` = the weighted repair of ``W − Q_t``.  With ``keep="best"`` each
    round's objective ``tr((W − Q_t − c·B_t·A_t)·M·(…)ᵀ)`` is computed and the best round
    kept: re-quantizing minimises an elementwise error, not the weighted one, so later rounds
    need not improve.  ``keep="last"`` returns the last round, as PEFT's ``loftq_init`` does."""
    bits, block_size, iterations, keep = _quant_options(ctx)
    w = _full_weight(ctx, bits, block_size)
    best: tuple[float, LoRAInit] | None = None
    target = w
    for _ in range(iterations):
        q = quantize(target, bits, block_size)  # (d, k)
        a, b = repair(w - q, ctx.rank, ctx.scaling, m_half, m_neg_half)
        delta = ctx.scaling * (b @ a)  # (d, k)
        score = weighted_error(w - q - delta, m) if keep == "best" else 0.0
        if best is None or score < best[0] or keep == "last":
            best = (score, LoRAInit(a, b, q))
        target = w - delta
    assert best is not None
    return best[1]


_CONTRACT = """
    Step-0 contract (``preserves="approximate"``): the base is replaced by the dequantized
    ``Q(W0)`` (what a ``bits``-bit layer computes), so the model is *not* unchanged: the
    adapted layer ``Q(W0) + c·B·A`` approximates the full-precision ``W0`` with a measured
    error (``covinit.quant.weighted_error``), which is what these strategies minimise.  On a
    plain ``nn.Linear`` this simulates a quantized base exactly up to the compute dtype.  On
    a bitsandbytes nf4 ``Linear4bit`` base (PEFT's ``lora.Linear4bit``) pass
    ``full_precision=``: the written ``Q(W0)`` is re-quantized by the layer and, being on
    its grid, comes back unchanged (tested to float32 rounding).  No residual offset is
    recorded (``W0`` is not ``Q(W0) + c·B·A``): where the layer's base comes back unchanged,
    ``export_lora`` and PEFT's ``save_pretrained`` give ``(A, B)`` for that quantized base,
    as a QLoRA adapter is given; where the base changed (a plain layer, or ``iterations``
    moving the codes), ``export_lora`` refuses and ``covinit.save_lora`` keeps the new base.
    A bitsandbytes int8 (``Linear8bitLt``) base is refused: it would re-round the NF grid.

    Options
    -------
    bits : int, default=4
        Quantizer bit width, one of ``ALLOWED_BITS`` (4 = ``nf4``).
    block_size : int, default=64
        Weights per absmax scale (bitsandbytes' default).
    iterations : int, default=1
        Rounds of LoftQ-style alternation (re-quantize ``W0 − c·B·A``, repair again); with
        the default ``keep="best"`` the round with the smallest {norm} error is kept, so
        more rounds never do worse on it.
        ``1`` is the closed form.
    keep : {"best", "last"}, default="best"
        Which round to return: the one with the smallest {norm} error, or the last one
        (PEFT's ``loftq_init`` returns its last round; with ``keep="last"``,
        ``iterations=5`` and ``quant-svd`` this is LoftQ's algorithm with ``T = 5``, except
        that ``c = α/r`` is accounted for: PEFT's factors ignore it, see its issue #1982).
    full_precision : nn.Module or mapping, optional
        The full-precision weights ``W0``: the unquantized model (layers by canonical name)
        or ``{name: Tensor (d, k)}``.  Needed when the base is already quantized (a
        bitsandbytes ``Linear4bit``, read dequantized): then ``E = W0 − Q(W0)`` comes from
        these weights and the written base ``Q(W0)`` is re-quantized into the layer in its
        own format, which leaves it unchanged when ``bits``/``block_size`` match it (nf4
        without double quantization; checked: a base that is neither ``W0`` nor ``Q(W0)``
        is refused).

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k) = ``Q(W0)`` (of the kept round).
"""


@_REGISTRY.register(
    "quant-residual",
    "quantized base Q(W0); A, B = top-r SVD of (W0−Q)·M^(1/2) mapped back (CLoQ, data-aware)",
    needs=("input",), preserves="approximate",
    options=("bits", "block_size", "iterations", "keep", "full_precision"),
)
def quant_residual(ctx: InitContext) -> LoRAInit:
    """Quantize the base and start the adapter at the data-weighted best repair of the error.

    With ``E = W0 − Q(W0)``, ``M`` the estimator's estimate of the input second moment
    ``E[xxᵀ]`` (uncentred: the bias stays in full precision, the error acts on raw ``x``) and
    ``c`` LoRA's scaling, ``(B, A)`` minimise ``E_x‖(E − c·B·A)·x‖² = ‖(E − c·B·A)·M^{1/2}‖_F²``
    (:func:`repair`; CLoQ, arXiv 2501.18475).  With few calibration positions the empirical
    ``M`` is rank-deficient and the optimum fits only the directions seen; a shrinkage
    estimator (the default ``ledoit_wolf``) pulls ``M`` towards ``μI``, i.e. towards the
    data-free repair, by the amount the sample supports.
    """
    m = _estimate(ctx, "input", center=False)
    m_half, m_neg_half = _matrix_powers(m, 0.5, ctx.name, "input")
    dense = m_half @ m_half  # (k, k): M itself, as the estimator's floor/clamp left it
    return _alternate(ctx, m_half, m_neg_half, dense)


@_REGISTRY.register(
    "quant-svd",
    "quantized base Q(W0); A, B = top-r SVD of W0−Q (LoftQ one-step, data-free)",
    needs=(), preserves="approximate",
    options=("bits", "block_size", "iterations", "keep", "full_precision"),
)
def quant_svd(ctx: InitContext) -> LoRAInit:
    """Quantize the base and start the adapter at the best Frobenius repair of the error.

    ``(B, A)`` minimise ``‖E − c·B·A‖_F`` with ``E = W0 − Q(W0)`` (LoftQ, arXiv 2310.08659,
    one step; ``iterations`` > 1 alternates as LoftQ does).  The data-free control for
    ``quant-residual``: the same quantizer and split, without ``M``.
    """
    return _alternate(ctx, None, None, None)


def _doc(fn: Any, norm: str) -> None:
    fn.__doc__ = (fn.__doc__ or "") + _CONTRACT.replace("{norm}", norm)


_doc(quant_residual, "``M``-weighted")
_doc(quant_svd, "Frobenius")
del _doc
