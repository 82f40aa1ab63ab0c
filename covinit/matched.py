"""Matched scale: size an init so that Adam's first step moves the layer as much as Kaiming's.

README: "Matched scale".  For a LoRA layer ``y = W0·x + s·B·A·x`` (``s`` = LoRA's scaling) with
``G = Σ_t δ_t·x_tᵀ`` (d, k) the gradient of the loss with respect to the layer's weight
(``δ_t = ∂L/∂y_t``), the adapter's gradients are::

    ∂L/∂B = s·G·Aᵀ   (d, r)          ∂L/∂A = s·Bᵀ·G   (r, k)

Adam's first step is ``−lr·g/(|g| + eps)`` per entry (``m̂ = g``, ``v̂ = g²``), i.e.
``−lr·sign(g)`` wherever ``|g| ≫ eps``.  To first order in ``lr`` the layer's output on a
position ``x`` moves by ``s·(ΔB·A + B·ΔA)·x``, so over the calibration positions, with
``M = E[xxᵀ]`` (k, k, uncentred: what the layer multiplies)::

    E‖Δy‖² = s²·lr²·tr(P·M·Pᵀ),   P = sign(G·Aᵀ)·A + B·sign(Bᵀ·G)            (1)

— computable exactly from ``G`` and ``M``, for any init (:func:`first_step_energy`).
For Kaiming's init (``A`` with i.i.d. entries of variance ``c = 1/(3k)``, ``B = 0``) its
expectation over ``A`` is (:func:`kaiming_step_energy`)::

    E_A[tr(P·M·Pᵀ)] = c·( r·d'·tr(M) + r(r−1)·(2/π)·Σ_i ĝ_iᵀ·M·ĝ_i )          (2)

with ``ĝ_i`` the unit-normalised non-zero rows of ``G`` and ``d'`` their number.  The first
term is the diagonal of ``sign(G·Aᵀ)ᵀ·sign(G·Aᵀ)`` (``d'`` on every entry) against
``E[a_jᵀ·M·a_j] = c·tr(M)``; the second are the pairs of columns ``j ≠ l``, independent,
each with ``E[sign(g_iᵀa)·a] = √(2c/π)·ĝ_i`` (exact for Gaussian ``a``, the central-limit
value for Kaiming's uniform entries).  It matters: when the gradient's rows share
directions the input carries (a transformer's large-mean features) the columns of Kaiming's
first ``ΔB`` agree in sign and its step is several times the diagonal term alone.

Every factor enters (1) homogeneously: scaling the non-zero factors by ``γ`` (``A`` for a
``B = 0`` init, ``B`` for ``A = 0``, both for a residual init) leaves the signs unchanged
and scales the energy by ``γ²``.  The matched gain is therefore ``γ = √(E_K / E_S)``
(:func:`matched_gain`), exact to first order in ``lr`` for every kind of init.

Without the gradient side, only ``B = 0`` inits have a closed form: if the columns of the
first ``ΔB`` are taken as uncorrelated in sign, (1) is ``d·tr(A·M·Aᵀ)`` and (2) is
``c·r·d·tr(M)``, so the match is ``E‖A·x‖² = r·tr(M)/(3k)`` for the whole layer, or
``a_iᵀ·M·a_i = tr(M)/(3k)`` for every hidden unit (:func:`closed_form_gain`).  This omits
the sign correlation of (2) and is the weaker form; see the README for measured gaps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "closed_form_gain",
    "first_step_energy",
    "kaiming_step_energy",
    "matched_gain",
    "step_ratio",
]


def _check(grad: Tensor | None, moment: Tensor, d: int | None = None) -> None:
    k = moment.shape[0]
    if moment.shape != (k, k):
        raise ValueError(f"the input second moment must be square (k, k), got "
                         f"{tuple(moment.shape)}")
    if grad is not None and (grad.ndim != 2 or grad.shape[1] != k
                             or (d is not None and grad.shape[0] != d)):
        raise ValueError(f"the gradient must have shape (d, k) = ({d if d else 'd'}, {k}), "
                         f"got {tuple(grad.shape)}")


def kaiming_step_energy(grad: Tensor | None, moment: Tensor, rank: int,
                        d: int | None = None) -> float:
    """Expected ``tr(P·M·Pᵀ)`` of Kaiming's first Adam step, formula (2), per ``s²·lr²``.

    Parameters
    ----------
    grad : Tensor, shape (d, k), or None
        ``G = Σ δ·xᵀ``; ``None`` gives the diagonal term alone, ``c·r·d·tr(M)`` (needs ``d``).
    moment : Tensor, shape (k, k)
        ``M = E[xxᵀ]`` over the calibration positions.
    rank : int
        LoRA rank ``r``.
    d : int, optional
        Output width; required without ``grad``.

    Returns
    -------
    float
    """
    moment = moment.to(torch.float64)
    k = moment.shape[0]
    _check(grad, moment, d)
    c = 1.0 / (3.0 * k)
    trace = float(torch.trace(moment))
    if grad is None:
        if d is None:
            raise ValueError("kaiming_step_energy without a gradient needs d=")
        return c * rank * d * trace
    grad = grad.to(torch.float64)
    norms = grad.norm(dim=1)  # (d,)
    live = norms > 0  # Adam does not move a row whose gradient is exactly zero
    unit = grad[live] / norms[live, None]  # (d', k)
    cross = float(((unit @ moment) * unit).sum())  # Σ_i ĝ_iᵀ·M·ĝ_i
    return c * (rank * int(live.sum()) * trace + rank * (rank - 1) * (2.0 / math.pi) * cross)


def _step_terms(a: Tensor, b: Tensor, grad: Tensor, moment: Tensor,
                ) -> tuple[float, float, float]:
    """``(p, q, t)`` with ``P = S_B·A + B·S_A``, ``Q = S_B·S_A`` (``S_B = sign(G·Aᵀ)``,
    ``S_A = sign(Bᵀ·G)``): ``p = tr(P·M·Pᵀ)``, ``q = tr(P·M·Qᵀ)``, ``t = tr(Q·M·Qᵀ)``.

    Adam's first step changes ``B·A`` by ``−lr·P + lr²·Q`` exactly (in the sign regime), so
    the output energy is ``s²·lr²·(p − 2·lr·q + lr²·t)``.  Computed through r×k and r×r
    products, never a d×k matrix.
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    grad, moment = grad.to(torch.float64), moment.to(torch.float64)
    _check(grad, moment, b.shape[0])
    sb = torch.sign(grad @ a.T)  # (d, r): the sign of ∂L/∂B
    sa = torch.sign(b.T @ grad)  # (r, k): the sign of ∂L/∂A
    am, sam = a @ moment, sa @ moment  # (r, k) each
    sbsb, bsb = sb.T @ sb, b.T @ sb  # (r, r) each
    ama, sama, samsa = am @ a.T, sam @ a.T, sam @ sa.T  # (r, r): A·M·Aᵀ, S_A·M·Aᵀ, S_A·M·S_Aᵀ
    own_b = (sbsb * ama).sum()  # tr(S_B·A·M·Aᵀ·S_Bᵀ)
    mixed = (bsb * sama).sum()  # tr(S_B·A·M·S_Aᵀ·Bᵀ)
    own_a = ((b.T @ b) * samsa).sum()  # tr(B·S_A·M·S_Aᵀ·Bᵀ)
    p = own_b + 2.0 * mixed + own_a
    q = (sbsb * sama).sum() + (bsb * samsa).sum()  # tr(S_B·A·M·Q̃ᵀ) + tr(B·S_A·M·Q̃ᵀ)
    t = (sbsb * samsa).sum()  # tr(S_B·S_A·M·S_Aᵀ·S_Bᵀ)
    return float(p), float(q), float(t)


def first_step_energy(a: Tensor, b: Tensor, grad: Tensor, moment: Tensor) -> float:
    """``tr(P·M·Pᵀ)`` with ``P = sign(G·Aᵀ)·A + B·sign(Bᵀ·G)``, formula (1), per ``s²·lr²``.

    The first-order (small-``lr``) energy of the first Adam step; exact for inits with
    ``A = 0`` or ``B = 0``, where the second-order term ``ΔB·ΔA`` vanishes.

    Parameters
    ----------
    a : Tensor, shape (r, k)
    b : Tensor, shape (d, r)
    grad : Tensor, shape (d, k)
    moment : Tensor, shape (k, k)

    Returns
    -------
    float
    """
    return _step_terms(a, b, grad, moment)[0]


def step_ratio(a: Tensor, b: Tensor, grad: Tensor, moment: Tensor) -> float:
    """``√(first_step_energy / kaiming_step_energy)``: how many times Kaiming's expected
    first-step output change (RMS over the calibration positions) this init's step is.

    Returns
    -------
    float
        ``nan`` when Kaiming's step is zero (a layer whose gradient is zero).
    """
    ref = kaiming_step_energy(grad, moment, a.shape[0], b.shape[0])
    if not ref > 0:
        return math.nan
    return math.sqrt(max(first_step_energy(a, b, grad, moment), 0.0) / ref)


def matched_gain(a: Tensor, b: Tensor, grad: Tensor, moment: Tensor, layer: str,
                 lr: float | None = None) -> float:
    """``γ``: the factor for the init's non-zero factors (see module doc).

    ``γ = √(E_K / p)`` to first order in ``lr`` (``lr=None``).  With ``lr`` (the rate the
    adapter will be trained at) and both factors non-zero, the second-order term of the
    step, ``lr²·S_B·S_A``, is kept (Kaiming's step has none: its ``ΔA = 0``): ``γ`` is the
    larger root of ``γ²·p − 2γ·lr·q + lr²·t = E_K``.  It matters where a factor's entries
    are not large against ``lr`` (wide layers, whose matched entries are ~``1/√(3k)``).

    Raises
    ------
    ValueError
        When the init's first step would not move the layer's output (``E_S = 0``: a zero
        gradient, or factors orthogonal to it), so no gain can match; names the layer.
    """
    ref = kaiming_step_energy(grad, moment, a.shape[0], b.shape[0])
    own, q, t = _step_terms(a, b, grad, moment)
    if not (own > 0 and ref > 0):
        raise ValueError(f"layer {layer!r}: the first Adam step of this init would not move "
                         f"the layer's output on the calibration data (energy {own:.3g}, "
                         f"Kaiming's {ref:.3g}); scale='matched' is undefined here")
    if lr is None or t == 0.0:
        return math.sqrt(ref / own)
    # p·t ≥ q² (Cauchy-Schwarz in the M inner product), so the discriminant is ≥ p·E_K > 0.
    disc = (lr * q) ** 2 - own * (lr * lr * t - ref)
    return (lr * q + math.sqrt(max(disc, 0.0))) / own


def closed_form_gain(a: Tensor, moment: Tensor, layer: str, per_unit: bool = False) -> Tensor:
    """Gain for a ``B = 0`` init without gradient statistics (the closed form).

    Whole layer: one ``γ`` with ``γ²·tr(A·M·Aᵀ) = r·tr(M)/(3k)``; per unit: one ``γ_i``
    per row with ``γ_i²·a_iᵀ·M·a_i = tr(M)/(3k)``.

    Parameters
    ----------
    a : Tensor, shape (r, k)
    moment : Tensor, shape (k, k)
    layer : str
        For error messages.
    per_unit : bool, default=False

    Returns
    -------
    Tensor, shape (r, 1)
        Multiply ``A`` by it (all entries equal without ``per_unit``).

    Raises
    ------
    ValueError
        When a row (or ``A``) carries no energy on the calibration inputs.
    """
    a, moment = a.to(torch.float64), moment.to(torch.float64)
    r, k = a.shape
    _check(None, moment)
    target = float(torch.trace(moment)) / (3.0 * k)  # Kaiming's E[(a·x)²] per unit
    unit = ((a @ moment) * a).sum(dim=1)  # (r,) a_iᵀ·M·a_i
    own = unit if per_unit else unit.sum().expand(r) / r
    if not bool((own > 0).all()) or not target > 0:
        raise ValueError(f"layer {layer!r}: A carries no energy on the calibration inputs "
                         "(a_iᵀ·M·a_i = 0); scale='matched' is undefined here")
    return (target / own).sqrt()[:, None]
