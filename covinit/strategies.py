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


# ---------------------------------------------------------------------- covariance-informed
# Shared helpers.  Strategies below read the layer's covariance estimates through
# ``ctx.input_estimate(center=...)`` / ``ctx.output_estimate(center=...)``: with
# ``center=True`` the estimate is of the covariance E[(x−m)(x−m)ᵀ], with ``center=False`` of
# the second moment E[xxᵀ] (what a layer's output W·x depends on, as in CorDA / SVD-LLM).

#: Relative eigenvalue floor for negative powers of a covariance (as
#: :meth:`covinit.estimators.Estimate.inv_sqrt`): a numerical guard for rank-deficient
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


def _norm_option(ctx: InitContext, default: str | float, named: dict[str, float]) -> float:
    """The ``scale=`` option as a target norm: a name from ``named`` or a positive float."""
    value = _option(ctx, "scale", default)
    if isinstance(value, str):
        if value not in named:
            raise ValueError(f"option scale={value!r} is not allowed for layer {ctx.name!r}; "
                             f"allowed: {sorted(named)} or a positive float")
        return named[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"option scale= must be one of {sorted(named)} or a positive finite "
                         f"float, got {value!r} (layer {ctx.name!r})")
    return float(value)


def _estimate(ctx: InitContext, side: str, center: bool) -> Any:
    get = ctx.input_estimate if side == "input" else ctx.output_estimate
    if get is None:
        raise ValueError(f"layer {ctx.name!r} has no {side}-side covariance estimate; "
                         f"calibrate with sides including {side!r}")
    return get(center=center)


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
    scale : {"unit", "kaiming"} or float, default="unit"
        Row norm of A: ``"unit"`` (1, as EVA's orthonormal components), ``"kaiming"``
        (1/√3, the expected row norm of PEFT's Kaiming-uniform A, so that only the
        directions differ from the default init) or a positive float.  With ``B = 0`` the
        first step's gradient on B is proportional to this norm.
    center : bool, default=True
        Principal directions of the centred covariance (as EVA's incremental PCA, which
        centres) or, with ``False``, of the second moment ``E[xxᵀ]``.

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r) zero; ``ΔW = 0`` at step 0.
    """
    norm = _norm_option(ctx, "unit", {"unit": 1.0, "kaiming": KAIMING_ROW_NORM})
    est = _estimate(ctx, "input", _bool_option(ctx, "center", True))
    _, vectors = est.top(ctx.rank)  # (k, r)
    vectors, _ = _fix_signs(vectors.to(torch.float64))
    return LoRAInit(norm * vectors.T.contiguous(), _zeros_b(ctx))


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
    scale : float, default=1.0
        Multiplies A (the hidden activations' standard deviation).
    center : bool, default=True
        Whiten the centred covariance, or with ``False`` the second moment (then
        ``A·x`` has unit second moment).

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r) zero; ``ΔW = 0`` at step 0.
    """
    factor = _norm_option(ctx, 1.0, {})
    est = _estimate(ctx, "input", _bool_option(ctx, "center", True))
    lam_all, _ = _spectrum(est, ctx.name, "input")
    values, vectors = est.top(ctx.rank)  # (r,), (k, r)
    vectors, _ = _fix_signs(vectors.to(torch.float64))
    lam = values.to(torch.float64).clamp_min(EIGEN_FLOOR * float(lam_all[0]))
    a = (factor * lam.rsqrt())[:, None] * vectors.T  # (r, k)
    return LoRAInit(a.contiguous(), _zeros_b(ctx))


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
    scale : "unit" or float, default="unit"
        Column norm of B.
    center : bool, default=True
        Centred output covariance (the bias does not matter) or, with ``False``, the output
        second moment.

    Returns
    -------
    LoRAInit
        ``a`` (r, k) zero, ``b`` (d, r); ``ΔW = 0`` at step 0.
    """
    norm = _norm_option(ctx, "unit", {"unit": 1.0})
    est = _estimate(ctx, "output", _bool_option(ctx, "center", True))
    _, vectors = est.top(ctx.rank)  # (d, r)
    vectors, _ = _fix_signs(vectors.to(torch.float64))
    _, k = ctx.shape
    return LoRAInit(torch.zeros(ctx.rank, k, dtype=torch.float64),
                    norm * vectors.contiguous())


def _cov_svd(ctx: InitContext, minor: bool) -> LoRAInit:
    p = _power_option(ctx)
    est = _estimate(ctx, "input", _bool_option(ctx, "center", False))
    c_pos, c_neg = _matrix_powers(est, p, ctx.name, "input")  # (k, k) each
    w = ctx.weight.to(torch.float64)
    b, root, v_r = _split_svd(w @ c_pos, ctx.rank, ctx.scaling, minor)  # W0·Σ^p = U S Vᵀ
    a = root[:, None] * (v_r.T @ c_neg)  # √(S_r/c)·V_rᵀ·Σ^{-p}, (r, k)
    return LoRAInit(a, b, w - ctx.scaling * (b @ a))


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

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k): the model's function is unchanged.
"""


@_REGISTRY.register(
    "cov-svd",
    "CorDA/SVD-LLM-like: top-r SVD of W0·Σx^(1/2) mapped back with Σx^(-1/2), residual base",
    needs=("input",), preserves="function", options=("center", "power"),
)
def cov_svd(ctx: InitContext) -> LoRAInit:
    """Principal components of ``W0`` as it acts on the task's inputs into the adapter."""
    return _cov_svd(ctx, minor=False)


@_REGISTRY.register(
    "cov-minor",
    "CorDA KPM-like: bottom-r SVD of W0·Σx^(1/2) into the adapter, residual base",
    needs=("input",), preserves="function", options=("center", "power"),
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
    needs=("input", "output"), preserves="function", options=("center", "power"),
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

    Returns
    -------
    LoRAInit
        ``a`` (r, k), ``b`` (d, r), ``base`` (d, k): the model's function is unchanged.
    """
    p = _power_option(ctx)
    center = _bool_option(ctx, "center", False)
    x_pos, x_neg = _matrix_powers(_estimate(ctx, "input", center), p, ctx.name, "input")
    y_pos, y_neg = _matrix_powers(_estimate(ctx, "output", center), p, ctx.name, "output")
    w = ctx.weight.to(torch.float64)
    u_root, root, v_r = _split_svd(y_pos @ w @ x_pos, ctx.rank, ctx.scaling, minor=False)
    b = y_neg @ u_root  # (d, r)
    a = root[:, None] * (v_r.T @ x_neg)  # (r, k)
    return LoRAInit(a, b, w - ctx.scaling * (b @ a))
