"""Init strategies: pure functions ``InitContext -> LoRAInit`` in one registry.

README: "Init strategies" has the table, the formulas and the defaults.

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
        Callables ``get(center=True)`` returning the covariance estimate of the layer's
        inputs (k×k) / outputs (d×d); ``None`` when the calibration has no such side.
        Lazy, so strategies that do not need them cost nothing.
    options : dict
        Strategy-specific options (e.g. ``scale=``).
    gradient : callable or None
        Zero-argument callable returning ``G = Σ_t δ_t·x_tᵀ`` (d, k), float64 on CPU, the
        loss gradient with respect to the layer's weight over the calibration data
        (``δ = ∂L/∂y``); ``None`` without a gradient side.
    gradient_estimate : callable or None
        ``get(center=True)``: the covariance estimate of ``δ`` (d×d), like
        ``output_estimate``; ``None`` without a gradient side.
    input_moment : callable or None
        Zero-argument callable returning the *empirical* input second moment ``E[xxᵀ]``
        (k, k), float64 on CPU, over the calibration positions (what ``scale="matched"``
        measures output changes with; no estimator applied).
    """

    name: str
    weight: Tensor
    rank: int
    scaling: float
    generator: torch.Generator
    input_estimate: Callable[..., Any] | None = None
    output_estimate: Callable[..., Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    gradient: Callable[[], Tensor] | None = None
    gradient_estimate: Callable[..., Any] | None = None
    input_moment: Callable[[], Tensor] | None = None

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
    needs=(), preserves="function", options=("scale", "lr"),
)
def pissa(ctx: InitContext) -> LoRAInit:
    """Principal singular components of ``W0`` into the adapter, the rest into the base.

    With ``W0 = U S Vᵀ`` (float64) and ``c`` = LoRA's scaling::

        A = √(S_r / c) · V_rᵀ      (r, k)
        B = U_r · √(S_r / c)       (d, r)
        base = W0 − c·B·A = W0 − U_r S_r V_rᵀ

    the same convention as PEFT's ``init_lora_weights="pissa"`` (singular values divided by
    the scaling before the square root), so ``c·B·A`` and the layer's output are unchanged.

    Options
    -------
    scale : "matched" or float, default=1.0
        ``γ`` with ``A←γA``, ``B←γB``, ``base = W0 − c·γ²·B·A`` (still exact);
        ``"matched"`` picks ``γ`` so that the first Adam step moves the layer's output as
        much as Kaiming's expected first step (needs input and gradient sides; not PiSSA
        as published, which keeps ``γ = 1``).
    lr : float, optional
        The training rate: with it, ``scale="matched"`` also matches the step's second-order
        term ``ΔB·ΔA`` (both factors move); without, the rate-free first-order gain.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k).
    """
    scale = _scale_option(ctx, 1.0, {}, ("matched",))
    w = ctx.weight.to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (d, m), (m,), (m, k)
    root = torch.sqrt(s[: ctx.rank] / ctx.scaling)  # (r,)
    a = root[:, None] * vh[: ctx.rank]  # (r, k)
    b = u[:, : ctx.rank] * root[None, :]  # (d, r)
    return _scaled(ctx, _residual(ctx, a, b), scale)


# ---------------------------------------------------------------------- covariance-informed
# Shared helpers.  Strategies below read the layer's covariance estimates through
# ``ctx.input_estimate(center=...)`` / ``ctx.output_estimate(center=...)``: with
# ``center=True`` the estimate is of the covariance E[(x−m)(x−m)ᵀ], with ``center=False`` of
# the second moment E[xxᵀ] (what a layer's output W·x depends on, as in CorDA / SVD-LLM).

#: Relative eigenvalue floor for negative powers of a covariance (as
#: :meth:`covinit.covariance.Estimate.inv_sqrt`): a numerical guard for rank-deficient
#: empirical estimates, not a regulariser — shrinkage estimators never reach it.
EIGEN_FLOOR = 1e-10

#: Row norm of PEFT's default Kaiming-uniform A: entries ~ U(−1/√k, 1/√k) have variance
#: 1/(3k), so a row of k of them has expected squared norm 1/3.
KAIMING_ROW_NORM = 1.0 / math.sqrt(3.0)


def _option(ctx: InitContext, key: str, default: Any) -> Any:
    return ctx.options.get(key, default)


def _bool_option(ctx: InitContext, key: str, default: bool) -> bool:
    value = _option(ctx, key, default)
    if not isinstance(value, bool):
        raise TypeError(f"option {key}= must be a bool, got {value!r} (layer {ctx.name!r})")
    return value


def _power_option(ctx: InitContext) -> float:
    value = _option(ctx, "power", 0.5)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"option power= must be a number in (0, 1], got {value!r} "
                         f"(layer {ctx.name!r})")
    return float(value)


def _scale_option(ctx: InitContext, default: str | float, named: dict[str, float],
                  matched: tuple[str, ...] = ()) -> str | float:
    """The ``scale=`` option: a name from ``named`` (returned as its number), one of the
    ``matched`` modes (returned as the name, for :func:`_match`) or a positive float."""
    value = _option(ctx, "scale", default)
    allowed = sorted(named) + list(matched)
    if isinstance(value, str):
        if value in matched:
            return value
        if value not in named:
            raise ValueError(f"option scale={value!r} is not allowed for layer {ctx.name!r}; "
                             f"allowed: {allowed} or a positive float")
        return named[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"option scale= must be one of {allowed} or a positive finite "
                         f"float, got {value!r} (layer {ctx.name!r})")
    return float(value)


def _estimate(ctx: InitContext, side: str, center: bool) -> Any:
    get = {"input": ctx.input_estimate, "output": ctx.output_estimate,
           "gradient": ctx.gradient_estimate}[side]
    if get is None:
        raise ValueError(f"layer {ctx.name!r} has no {side}-side covariance estimate; "
                         f"calibrate with sides including {side!r}")
    return get(center=center)


def _gradient(ctx: InitContext) -> Tensor:
    """``G`` (d, k), float64, checked: present, of the layer's shape, not all zero."""
    if ctx.gradient is None:
        raise ValueError(f"layer {ctx.name!r} has no gradient statistics G = Σ δ·xᵀ; "
                         "calibrate with sides including 'gradient'")
    grad = ctx.gradient().to("cpu", torch.float64)
    if tuple(grad.shape) != ctx.shape:
        raise ValueError(f"layer {ctx.name!r}: gradient statistics of shape "
                         f"{tuple(grad.shape)} do not match the weight's (d, k) = {ctx.shape}")
    if not bool(grad.any()):
        raise ValueError(f"layer {ctx.name!r}: the loss gradient G is zero on the calibration "
                         "data (the layer does not affect the loss?): its directions are "
                         "undefined")
    return grad


# ---------------------------------------------------------------------- matched scale
#: ``scale=`` modes that size an init against Kaiming's first Adam step (see
#: :mod:`covinit.matched` and the README's "matched scale" section).
MATCHED = ("matched", "matched-unit")


def _residual(ctx: InitContext, a: Tensor, b: Tensor) -> LoRAInit:
    """``LoRAInit(a, b, W0 − c·b·a)``: the adapter's part moved out of the base."""
    w = ctx.weight.to(torch.float64)
    return LoRAInit(a, b, w - ctx.scaling * (b @ a))


def _match(ctx: InitContext, init: LoRAInit, mode: str) -> LoRAInit:
    """Rescale ``init``'s non-zero factors so that its first Adam step moves the layer's
    output as much as Kaiming's expected first step (``mode`` from :data:`MATCHED`).

    With gradient statistics the gain is exact (:func:`covinit.matched.matched_gain`) for
    every kind of init; a residual init keeps ``base = W0 − c·γ²·B·A``.  Without them only
    ``B = 0`` inits have a closed form (:func:`covinit.matched.closed_form_gain`);
    ``"matched-unit"`` is the closed form's per-unit variant and always ignores G.
    """
    from covinit.matched import closed_form_gain, matched_gain

    if ctx.input_moment is None:
        raise ValueError(f"scale={mode!r} on layer {ctx.name!r} needs the input side's second "
                         "moment E[xxᵀ]; calibrate with sides including 'input'")
    moment = ctx.input_moment().to("cpu", torch.float64)
    b_zero = init.base is None and not bool(init.b.any())
    if mode == "matched-unit" or (mode == "matched" and ctx.gradient is None and b_zero):
        if not b_zero:
            raise ValueError(f"scale={mode!r} is the closed form for B = 0 inits; layer "
                             f"{ctx.name!r} starts with B ≠ 0: use scale='matched' with a "
                             "gradient side")
        return LoRAInit(init.a * closed_form_gain(init.a, moment, ctx.name,
                                                  per_unit=mode == "matched-unit"), init.b)
    if ctx.gradient is None:
        raise ValueError(
            f"scale='matched' on layer {ctx.name!r} needs gradient statistics: an init with "
            "B ≠ 0 takes its first Adam step along sign(Bᵀ·G), which the activations alone do "
            "not determine; calibrate with sides including 'gradient' (or use a B = 0 "
            "strategy, which has a closed form)")
    gamma = matched_gain(init.a, init.b, _gradient(ctx), moment, ctx.name, _lr_option(ctx))
    if init.base is None:
        return LoRAInit(gamma * init.a, gamma * init.b)
    return _residual(ctx, gamma * init.a, gamma * init.b)


def _lr_option(ctx: InitContext) -> float | None:
    """``lr=``: the training rate, for the second-order term of ``scale="matched"`` on inits
    with both factors non-zero (``None``: the first-order, rate-free gain)."""
    value = _option(ctx, "lr", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"option lr= must be a positive finite float, got {value!r} "
                         f"(layer {ctx.name!r})")
    return float(value)


def _scaled(ctx: InitContext, init: LoRAInit, scale: str | float) -> LoRAInit:
    """Apply a ``scale=`` value: a matched mode, or a float multiplying every factor (the
    base of a residual init follows, ``W0 − c·s²·B·A``)."""
    if isinstance(scale, str):
        return _match(ctx, init, scale)
    if scale == 1.0:
        return init
    if init.base is None:
        return LoRAInit(scale * init.a, scale * init.b)
    return _residual(ctx, scale * init.a, scale * init.b)


def _fix_signs(vectors: Tensor, partner: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Make each column's largest-magnitude entry positive (eigen/singular vectors are only
    defined up to sign; a fixed sign makes results reproducible across LAPACK builds).

    ``partner`` (the matching right singular vectors, as columns) is flipped alongside.
    """
    idx = vectors.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(vectors.gather(0, idx[None, :])).squeeze(0)  # (r,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * signs, None if partner is None else partner * signs


def _spectrum(est: Any, name: str, side: str) -> tuple[Tensor, Tensor]:
    """``(λ (k,) descending, clamped at 0, V (k, k))`` of an estimate, float64, checked."""
    lam = est.eigenvalues.to(torch.float64).clamp_min(0.0)
    vec = est.eigenvectors.to(torch.float64)
    if not (lam.numel() and float(lam[0]) > 0.0):
        raise ValueError(f"the {side} covariance estimate of layer {name!r} is zero (constant "
                         "activations?): its directions are undefined")
    return lam, vec


def _matrix_powers(est: Any, p: float, name: str, side: str) -> tuple[Tensor, Tensor]:
    """``(Σ^p, Σ^{-p})``, symmetric (k, k), with the relative eigenvalue floor for ``−p``."""
    _spectrum(est, name, side)  # a zero estimate gets an error naming the layer
    return (est.power(p).to(torch.float64),
            est.power(-p, EIGEN_FLOOR).to(torch.float64))


def _split_svd(m: Tensor, rank: int, scaling: float, minor: bool,
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_r √(S_r/c), √(S_r/c), V_r)`` for the top (or bottom) ``r`` singular triplets of
    ``m``, with the signs of the left vectors fixed.  Shapes (d, r), (r,), (k, r)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # (d, q), (q,), (q, k)
    sel = slice(s.numel() - rank, s.numel()) if minor else slice(0, rank)
    u_r, v_r = _fix_signs(u[:, sel], vh[sel].T)
    assert v_r is not None
    root = torch.sqrt(s[sel] / scaling)
    return u_r * root, root, v_r


@_REGISTRY.register(
    "input-pca",
    "EVA-like: A = top-r eigenvectors of the input covariance, B = 0 (Paischer et al. 2024)",
    needs=("input",), preserves="zero-delta", options=("scale", "center"),
)
def input_pca(ctx: InitContext) -> LoRAInit:
    """Rows of A along the leading principal directions of the layer's inputs; ``B = 0``.

    With ``Σx = U Λ Uᵀ`` (the estimator's estimate)::

        A = s · U_rᵀ      (r, k), rows of norm s
        B = 0             (d, r)

    The eigenvectors do not depend on shrinkage towards ``μI`` (any of ``empirical``,
    ``ledoit_wolf``, ``oas`` gives the same A); ``nonlinear`` can reorder them and
    ``spatpca`` gives smooth / sparse components Φ.

    Options
    -------
    scale : {"unit", "kaiming", "matched", "matched-unit"} or float, default="unit"
        Row norm of A: ``"unit"`` (1, as EVA's orthonormal components), ``"kaiming"``
        (1/√3, the expected row norm of PEFT's Kaiming-uniform A, so that only the
        directions differ from the default init) or a positive float.  With ``B = 0`` the
        first step's gradient on B is proportional to this norm.  ``"matched"``: A scaled
        so that Adam's first step moves the layer's output as much as Kaiming's expected
        first step — exactly with a gradient side, else by the closed form
        ``E‖A·x‖² = r·tr(M)/(3k)``; ``"matched-unit"``: every hidden unit
        ``a_iᵀ·M·a_i = tr(M)/(3k)`` (:mod:`covinit.matched`).
    center : bool, default=True
        Principal directions of the centred covariance (as EVA's incremental PCA, which
        centres) or, with ``False``, of the second moment ``E[xxᵀ]``.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r) zero; ``ΔW = 0`` at step 0.
    """
    scale = _scale_option(ctx, "unit", {"unit": 1.0, "kaiming": KAIMING_ROW_NORM}, MATCHED)
    est = _estimate(ctx, "input", _bool_option(ctx, "center", True))
    _, vectors = est.top(ctx.rank)  # (k, r)
    vectors, _ = _fix_signs(vectors.to(torch.float64))
    return _scaled(ctx, LoRAInit(vectors.T.contiguous(), _zeros_b(ctx)), scale)


@_REGISTRY.register(
    "input-whiten",
    "A = shrunk Λ_r^(-1/2)·U_rᵀ: the adapter's hidden activations get unit variance, B = 0",
    needs=("input",), preserves="zero-delta", options=("scale", "center"),
)
def input_whiten(ctx: InitContext) -> LoRAInit:
    """A whitens the inputs' leading principal components; ``B = 0``.

    With ``Σx = U Λ Uᵀ`` the estimator's (shrunk) estimate::

        A = s · Λ_r^{-1/2} U_rᵀ      (r, k)
        B = 0

    so the adapter's hidden activations ``h = A·(x − m)`` have covariance
    ``s²·Λ_r^{-1/2} U_rᵀ S U_r Λ_r^{-1/2}``, which is ``s²·I`` for the empirical estimate
    and ``s²·diag(λ_i(S)/λ_i(Σ))`` for a shrunk one.  Shrinkage keeps ``Λ_r^{-1/2}``
    bounded when the sample eigenvalues are tiny (few positions, wide layers); eigenvalues
    below ``EIGEN_FLOOR·λ_1`` are floored only as a guard against an exactly singular
    empirical estimate.

    Options
    -------
    scale : {"matched", "matched-unit"} or float, default=1.0
        A float multiplies A (the hidden activations' standard deviation); the matched
        modes are as for ``input-pca``.
    center : bool, default=True
        Whiten the centred covariance, or with ``False`` the second moment (then
        ``A·x`` has unit second moment).

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r) zero; ``ΔW = 0`` at step 0.
    """
    scale = _scale_option(ctx, 1.0, {}, MATCHED)
    est = _estimate(ctx, "input", _bool_option(ctx, "center", True))
    lam_all, _ = _spectrum(est, ctx.name, "input")
    values, vectors = est.top(ctx.rank)  # (r,), (k, r)
    vectors, _ = _fix_signs(vectors.to(torch.float64))
    lam = values.to(torch.float64).clamp_min(EIGEN_FLOOR * float(lam_all[0]))
    a = lam.rsqrt()[:, None] * vectors.T  # (r, k)
    return _scaled(ctx, LoRAInit(a.contiguous(), _zeros_b(ctx)), scale)


@_REGISTRY.register(
    "output-pca",
    "B = top-r eigenvectors of the output covariance, A = 0",
    needs=("output",), preserves="zero-delta", options=("scale", "center"),
)
def output_pca(ctx: InitContext) -> LoRAInit:
    """Columns of B along the leading principal directions of the layer's outputs; ``A = 0``.

    With ``Σy = U Λ Uᵀ``::

        A = 0             (r, k)
        B = s · U_r       (d, r), columns of norm s

    so the first update writes into the output subspace the layer already uses on the task
    (``∂L/∂A = c·Bᵀ·G``, with G the output gradient's correlation with the inputs).

    Options
    -------
    scale : {"unit", "matched"} or float, default="unit"
        Column norm of B.  ``"matched"``: B scaled so that the first Adam step (which moves
        A along ``−sign(Bᵀ·G)``) changes the layer's output as much as Kaiming's expected
        first step; needs a gradient side (:mod:`covinit.matched`).
    center : bool, default=True
        Centred output covariance (the bias does not matter) or, with ``False``, the output
        second moment.

    Returns
    -------
    LoRAInit
        ``a`` (r, k) zero, ``b`` (d, r); ``ΔW = 0`` at step 0.
    """
    scale = _scale_option(ctx, "unit", {"unit": 1.0}, ("matched",))
    est = _estimate(ctx, "output", _bool_option(ctx, "center", True))
    _, vectors = est.top(ctx.rank)  # (d, r)
    vectors, _ = _fix_signs(vectors.to(torch.float64))
    _, k = ctx.shape
    return _scaled(ctx, LoRAInit(torch.zeros(ctx.rank, k, dtype=torch.float64),
                                 vectors.contiguous()), scale)


def _residual_scale(ctx: InitContext) -> str | float:
    """``scale=`` of a residual strategy: a float ``γ`` (A←γA, B←γB, base = W0 − c·γ²·B·A)
    or ``"matched"`` (γ from the first Adam step, needs a gradient side)."""
    return _scale_option(ctx, 1.0, {}, ("matched",))


def _cov_svd(ctx: InitContext, minor: bool) -> LoRAInit:
    scale = _residual_scale(ctx)
    p = _power_option(ctx)
    est = _estimate(ctx, "input", _bool_option(ctx, "center", False))
    c_pos, c_neg = _matrix_powers(est, p, ctx.name, "input")  # (k, k) each
    w = ctx.weight.to(torch.float64)
    b, root, v_r = _split_svd(w @ c_pos, ctx.rank, ctx.scaling, minor)  # W0·Σ^p = U S Vᵀ
    a = root[:, None] * (v_r.T @ c_neg)  # √(S_r/c)·V_rᵀ·Σ^{-p}, (r, k)
    return _scaled(ctx, _residual(ctx, a, b), scale)


_COV_SVD_DOC = """
    With ``C`` the estimator's estimate of the input second moment (``center=False``,
    default) or covariance, and ``p`` = ``power``, decompose ``W0·C^p = U S Vᵀ``, so that
    ``W0 = U S Vᵀ C^{-p}``.  With ``c`` = LoRA's scaling and the {which} ``r`` triplets::

        B = U_r √(S_r/c)             (d, r)
        A = √(S_r/c) V_rᵀ C^{-p}     (r, k)
        base = W0 − c·B·A            (d, k)

    so ``base + c·B·A = W0`` and the layer's output is unchanged at step 0.  The singular
    values measure how much each direction contributes to the layer's output *on the task
    distribution*: ``‖W0·x‖²`` averaged over x is ``tr(W0 C W0ᵀ) = Σ S_i²`` for ``p = 1/2``.
    The shrinkage estimator keeps ``C^{-p}`` well conditioned (CorDA damps instead).

    Options
    -------
    center : bool, default=False
        ``False`` uses the uncentred second moment ``E[xxᵀ]`` (CorDA and SVD-LLM use
        ``XᵀX``), the matrix for which ``E‖(W0 − W)x‖²`` is the weighted error; ``True`` the
        covariance.
    power : float in (0, 1], default=0.5
        ``p``; ``0.5`` is the whitening transform (SVD-LLM), ``1`` CorDA's ``W·C``.
    scale : "matched" or float, default=1.0
        ``γ`` with ``A←γA``, ``B←γB``, ``base = W0 − c·γ²·B·A`` (still exact at step 0);
        ``"matched"`` picks ``γ`` so that the first Adam step moves the layer's output as
        much as Kaiming's expected first step (needs a gradient side).
    lr : float, optional
        The training rate, for ``scale="matched"``: as for ``pissa``.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k): the model's function is unchanged.
"""


@_REGISTRY.register(
    "cov-svd",
    "CorDA/SVD-LLM-like: top-r SVD of W0·Σx^(1/2) mapped back with Σx^(-1/2), residual base",
    needs=("input",), preserves="function", options=("center", "power", "scale", "lr"),
)
def cov_svd(ctx: InitContext) -> LoRAInit:
    """Principal components of ``W0`` as it acts on the task's inputs into the adapter."""
    return _cov_svd(ctx, minor=False)


@_REGISTRY.register(
    "cov-minor",
    "CorDA KPM-like: bottom-r SVD of W0·Σx^(1/2) into the adapter, residual base",
    needs=("input",), preserves="function", options=("center", "power", "scale", "lr"),
)
def cov_minor(ctx: InitContext) -> LoRAInit:
    """The components of ``W0`` that matter *least* on the task's inputs into the adapter.

    Adapting these leaves the principal part, i.e. what the layer does on the task
    distribution, in the frozen base (CorDA's knowledge-preserving mode).  The adapter
    starts small (its factors scale with the smallest singular values).
    """
    return _cov_svd(ctx, minor=True)


cov_svd.__doc__ = (cov_svd.__doc__ or "") + "\n" + _COV_SVD_DOC.replace("{which}", "largest")
cov_minor.__doc__ = (cov_minor.__doc__ or "") + "\n" + _COV_SVD_DOC.replace("{which}", "smallest")


@_REGISTRY.register(
    "two-sided",
    "top-r SVD of Σy^(1/2)·W0·Σx^(1/2) mapped back on both sides, residual base",
    needs=("input", "output"), preserves="function", options=("center", "power", "scale", "lr"),
)
def two_sided(ctx: InitContext) -> LoRAInit:
    """Weight ``W0`` by both the input and the output statistics before the SVD.

    With ``Cx``, ``Cy`` the estimates of the input and output second moments
    (``center=False``, default) or covariances and ``p`` = ``power``::

        Cy^p · W0 · Cx^p = U S Vᵀ
        B = Cy^{-p} U_r √(S_r/c)            (d, r)
        A = √(S_r/c) V_rᵀ Cx^{-p}           (r, k)
        base = W0 − c·B·A

    so ``base + c·B·A = W0``.  The input side weights directions by how much the task's
    inputs excite them, the output side by how much the outputs vary along them.

    Options
    -------
    center : bool, default=False
        Second moments (``False``) or covariances, on both sides.
    power : float in (0, 1], default=0.5
        ``p``, on both sides.
    scale : "matched" or float, default=1.0
        As for ``cov-svd``.
    lr : float, optional
        As for ``cov-svd``.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k): the model's function is unchanged.
    """
    scale = _residual_scale(ctx)
    p = _power_option(ctx)
    center = _bool_option(ctx, "center", False)
    x_pos, x_neg = _matrix_powers(_estimate(ctx, "input", center), p, ctx.name, "input")
    y_pos, y_neg = _matrix_powers(_estimate(ctx, "output", center), p, ctx.name, "output")
    w = ctx.weight.to(torch.float64)
    u_root, root, v_r = _split_svd(y_pos @ w @ x_pos, ctx.rank, ctx.scaling, minor=False)
    b = y_neg @ u_root  # (d, r)
    a = root[:, None] * (v_r.T @ x_neg)  # (r, k)
    return _scaled(ctx, _residual(ctx, a, b), scale)


# ---------------------------------------------------------------------- gradient statistics
# README: "Init strategies".  With G = Σ_t δ_t·x_tᵀ (d, k) the loss gradient of the layer's weight
# over the calibration data, M the input second moment E[xxᵀ] and Σδ = E[δδᵀ] the output gradient's
# (K-FAC's two Kronecker factors, both shrunk by the chosen estimator, uncentred), a B = 0 init
# moves B first, along −sign(c·G·Aᵀ): A decides which output directions the first step can reach and
# how much the loss drops (first order: lr·c·‖G·Aᵀ‖₁).


def _top_pair(m: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(U_r (d, r), V_r (k, r))``: the top-``r`` singular vectors of ``m``, signs fixed."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    u_r, v_r = _fix_signs(u[:, :rank], vh[:rank].T)
    assert v_r is not None
    return u_r, v_r


def _balanced(b: Tensor, a: Tensor) -> Tensor:
    """``B``'s columns rescaled to the norms of ``A``'s rows (``‖b_j‖ = ‖a_j‖``), as an SVD
    split ``√S`` to both sides.  A small factor beside a large one would make Adam's
    second-order term ``ΔB·ΔA`` (entries ~lr²) comparable to ``B·ΔA`` at common rates."""
    tiny = torch.finfo(torch.float64).tiny
    return b * (a.norm(dim=1) / b.norm(dim=0).clamp_min(tiny))[None, :]


def _grad_init(ctx: InitContext, a: Tensor, b: Tensor) -> LoRAInit:
    """``B = 0`` (default) or, with ``residual=True``, ``B`` (columns balanced against A's
    rows) and a residual base; then ``scale=`` (default ``"matched"``)."""
    scale = _scale_option(ctx, "matched", {}, MATCHED)
    if _bool_option(ctx, "residual", False):
        init = _residual(ctx, a, _balanced(b, a))
    else:
        init = LoRAInit(a, _zeros_b(ctx))
    return _scaled(ctx, init, scale)


_GRAD_OPTIONS_DOC = """
    Options
    -------
    scale : {"matched", "matched-unit"} or float, default="matched"
        ``"matched"``: the non-zero factors scaled so that the first Adam step moves the
        layer's output as much as Kaiming's expected first step (exact from G and M,
        :mod:`covinit.matched`); ``"matched-unit"``: every hidden unit of ``A·x`` with
        Kaiming's variance (``B = 0`` only); a float multiplies the factors as written above.
    residual : bool, default=False
        ``False``: ``B = 0``, ``ΔW = 0`` at step 0.  ``True``: ``B`` from the matching left
        factor, each column with the norm of A's matching row, and ``base = W0 − c·B·A``, so
        the model is unchanged at step 0 while both factors move from the first step.
    lr : float, optional
        The training rate, for ``scale="matched"``: as for ``pissa``.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r) zero (or ``b`` and ``base`` with ``residual=True``).
"""


@_REGISTRY.register(
    "grad-svd",
    "A = top-r right singular vectors of the loss gradient G (LoRA-GA / LoRA-One subspace), B = 0",
    needs=("input", "gradient"), preserves="zero-delta", options=("scale", "residual", "lr"),
)
def grad_svd(ctx: InitContext) -> LoRAInit:
    """A along the input directions in which the loss gradient of ``W`` is largest.

    With ``G = U S Vᵀ``::

        A = V_rᵀ      (r, k), orthonormal rows
        B = 0         (or U_r with residual=True)

    The subspace of LoRA-GA (Wang et al. 2024) and LoRA-One; unlike them, ``B = 0`` and the
    scale is matched, so ``ΔW = 0`` at step 0 and the first step is Kaiming-sized.  The
    rows maximise ‖G·Aᵀ‖ for orthonormal A, not for a fixed ``‖A·x‖`` (see ``grad-whiten``).
    """
    u_r, v_r = _top_pair(_gradient(ctx), ctx.rank)
    return _grad_init(ctx, v_r.T.contiguous(), u_r)


@_REGISTRY.register(
    "grad-whiten",
    "A ∝ V_rᵀ·M^(-1/2) from the top-r SVD of G·M^(-1/2): largest first-order loss decrease "
    "per ‖A·x‖, B = 0",
    needs=("input", "gradient"), preserves="zero-delta", options=("scale", "residual", "lr"),
)
def grad_whiten(ctx: InitContext) -> LoRAInit:
    """A along the directions with the largest first-order loss decrease for a given size
    of ``A·x``.

    With ``M`` the estimator's (shrunk) estimate of ``E[xxᵀ]`` and ``G·M^{-1/2} = P S Qᵀ``::

        A = Q_rᵀ·M^{-1/2}      (r, k): A·M·Aᵀ = I, so every hidden unit has unit 2nd moment
        B = 0                  (or ∝ P_r with residual=True)

    ``A`` maximises ``‖G·Aᵀ‖_F`` subject to ``A·M·Aᵀ = I`` (substitute ``Ã = A·M^{1/2}``);
    its rows span the row space of ``G·M^{-1}``, the least-squares solution's, so on a
    linear teacher task they recover the teacher's update where ``grad-svd`` is tilted
    towards the inputs' large directions.  Shrinkage keeps ``M^{-1/2}`` bounded.
    """
    grad = _gradient(ctx)
    _, m_neg = _matrix_powers(_estimate(ctx, "input", False), 0.5, ctx.name, "input")
    p_r, q_r = _top_pair(grad @ m_neg, ctx.rank)
    return _grad_init(ctx, (q_r.T @ m_neg).contiguous(), p_r)


@_REGISTRY.register(
    "kfac",
    "K-FAC natural-gradient directions: top-r SVD of Σδ^(-1/2)·G·M^(-1/2) mapped back, "
    "both sides shrunk, B = 0",
    needs=("input", "gradient"), preserves="zero-delta", options=("scale", "residual", "lr"),
)
def kfac(ctx: InitContext) -> LoRAInit:
    """A from the leading directions of K-FAC's natural gradient ``Σδ^{-1}·G·M^{-1}``.

    K-FAC approximates the Fisher of ``W`` by ``Σδ ⊗ M`` (Martens & Grosse 2015), with both
    factors the estimator's (shrunk) estimates of the uncentred second moments.  With
    ``Σδ^{-1/2}·G·M^{-1/2} = P S Qᵀ``::

        A = Q_rᵀ·M^{-1/2}           (r, k)
        B = 0                       (or ∝ Σδ^{-1/2}·P_r with residual=True)

    so ``Σδ^{-1/2}·P_r·S_r·Q_rᵀ·M^{-1/2}`` is the natural gradient's best rank-r part in
    the Fisher norm.  The d×d gradient side is where shrinkage matters most: a few
    calibration batches leave ``Σδ`` singular when d exceeds their positions.
    """
    grad = _gradient(ctx)
    _, m_neg = _matrix_powers(_estimate(ctx, "input", False), 0.5, ctx.name, "input")
    _, d_neg = _matrix_powers(_estimate(ctx, "gradient", False), 0.5, ctx.name, "gradient")
    p_r, q_r = _top_pair(d_neg @ grad @ m_neg, ctx.rank)
    return _grad_init(ctx, (q_r.T @ m_neg).contiguous(), d_neg @ p_r)


for _fn in (grad_svd, grad_whiten, kfac):
    _fn.__doc__ = (_fn.__doc__ or "") + _GRAD_OPTIONS_DOC

#: LoRA-GA's "stable" scale constant γ (the authors' default ``stable_gamma``).
LORA_GA_GAMMA = 16.0


@_REGISTRY.register(
    "lora-ga",
    "LoRA-GA as published: A = V[:, :r]ᵀ, B = U[:, r:2r] of G, × d^(1/4)/√γ, residual base "
    "(Wang et al. 2024; not PEFT's port)",
    needs=("gradient",), preserves="function", options=("scale", "gamma", "lr"),
)
def lora_ga(ctx: InitContext) -> LoRAInit:
    """LoRA-GA's own init (Wang et al. 2024, arXiv 2407.05000, the authors' code), a baseline.

    With ``G = U S Vᵀ`` and the authors' default direction ``"ArB2r"`` and ``"stable"``
    scale::

        A = V[:, :r]ᵀ · d^{1/4}/√γ       (r, k)
        B = U[:, r:2r] · d^{1/4}/√γ      (d, r)
        base = W0 − c·B·A                (the model is unchanged at step 0)

    with ``d`` = out_features and ``γ`` = ``gamma`` (16).  Singular vectors from an exact SVD
    (the authors use ``torch.svd_lowrank`` with ``q = 4r``, which approximates it); signs
    fixed for reproducibility.  PEFT's ``init_lora_weights="lora_ga"`` is a different init
    (its B carries the singular values): label the two apart.

    Options
    -------
    scale : {"stable", "matched"} or float, default="stable"
        ``"stable"``: the paper's ``d^{1/4}/√γ``; ``"matched"``: both factors rescaled
        from there so the first Adam step is Kaiming-sized (needs an input side); a float
        multiplies the orthonormal factors instead of ``d^{1/4}/√γ``.
    gamma : float, default=16
        LoRA-GA's ``stable_gamma``.
    lr : float, optional
        The training rate, for ``scale="matched"``: as for ``pissa``.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k).

    Raises
    ------
    ValueError
        When ``2·rank > min(d, k)`` (B takes the singular vectors ``r … 2r−1``).
    """
    d, k = ctx.shape
    if 2 * ctx.rank > min(d, k):
        raise ValueError(f"lora-ga takes B from singular vectors r..2r-1, so it needs "
                         f"2·rank <= min(d, k) = {min(d, k)}; layer {ctx.name!r} (d={d}, "
                         f"k={k}) has rank {ctx.rank}")
    gamma = _option(ctx, "gamma", LORA_GA_GAMMA)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (
            math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"option gamma= must be a positive finite float, got {gamma!r} "
                         f"(layer {ctx.name!r})")
    stable = d ** 0.25 / math.sqrt(gamma)
    scale = _scale_option(ctx, "stable", {"stable": stable}, ("matched",))
    u, _, vh = torch.linalg.svd(_gradient(ctx), full_matrices=False)
    a, _ = _fix_signs(vh[: ctx.rank].T)  # (k, r)
    b, _ = _fix_signs(u[:, ctx.rank: 2 * ctx.rank])  # (d, r)
    factor = stable if isinstance(scale, str) else scale
    init = _residual(ctx, factor * a.T.contiguous(), factor * b)
    return _match(ctx, init, scale) if isinstance(scale, str) else init
