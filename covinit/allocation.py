"""Distribute a total LoRA rank budget across layers by explained variance (as EVA does).

Each layer's input covariance estimate has eigenvalues ``λ_1 ≥ … ≥ λ_k``; component ``i``
explains the fraction ``λ_i / Σ_j λ_j`` of the layer's input variance.  Pool the fractions
of all layers, and give the budget to the largest ones (Paischer et al. 2024, "EVA"): a
layer whose inputs concentrate in a few directions gets few ranks, one whose inputs
spread out gets more.  Every layer keeps at least ``min_rank`` and at most its cap.

Example
-------
>>> import torch
>>> from covinit.allocation import allocate_ranks
>>> spectra = {"a": torch.tensor([8.0, 1.0, 1.0]), "b": torch.tensor([4.0, 3.0, 3.0])}
>>> allocate_ranks(spectra, 4, max_rank=3)
{'a': 1, 'b': 3}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["allocate_ranks", "explained_variance_ratio", "rank_cap"]


def explained_variance_ratio(eigenvalues: Tensor) -> Tensor:
    """``λ_i / Σ_j λ_j`` in descending order (negative rounding noise clamped to 0).

    Parameters
    ----------
    eigenvalues : Tensor, shape (k,)

    Returns
    -------
    Tensor, shape (k,), float64
        Zeros if every eigenvalue is zero (constant inputs).
    """
    lam = eigenvalues.detach().to(torch.float64).clamp_min(0.0).sort(descending=True).values
    total = float(lam.sum())
    return lam / total if total > 0.0 else torch.zeros_like(lam)


def rank_cap(rank: int, d: int, k: int, max_rank: int | None = None) -> int:
    """The most ranks a budget may give one layer: ``min(max_rank or 2·rank, d, k)``.

    The one cap rule of ``initialize(rank_budget=)`` and ``report(rank_budget=)``: without
    ``max_rank`` a layer may grow to twice its own rank (its adapter's, or the rank asked
    for), never past the ``min(d, k)`` directions its weight has.

    Parameters
    ----------
    rank : int
        The layer's own rank.
    d, k : int
        out_features, in_features of the layer (W0 is (d, k)).
    max_rank : int, optional
        One cap for every layer, replacing ``2·rank``; must be an int >= 1.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        ``max_rank`` not an int >= 1.

    Examples
    --------
    >>> rank_cap(8, 768, 768), rank_cap(8, 768, 768, max_rank=12), rank_cap(8, 10, 768)
    (16, 12, 10)
    """
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int)
                                 or max_rank < 1):
        raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
    return min(2 * rank if max_rank is None else max_rank, d, k)


def allocate_ranks(
    spectra: Mapping[str, Tensor],
    budget: int,
    *,
    min_rank: int = 1,
    max_rank: int | Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Per-layer ranks summing to ``budget``, by pooled explained-variance ratio.

    Parameters
    ----------
    spectra : mapping
        ``layer -> eigenvalues (k,)`` of its input covariance estimate (any order).
    budget : int
        Total rank over all layers, ``len(spectra)·min_rank ≤ budget ≤ Σ caps``.
    min_rank : int, default=1
        Rank every layer keeps whatever its spectrum (its adapter stays in the model).
    max_rank : int or mapping, optional
        Cap per layer (one int for all, or ``layer -> cap``); always at most ``k``.
        Default ``k``.

    Returns
    -------
    dict
        ``layer -> rank`` in the order of ``spectra``.

    Raises
    ------
    ValueError
        Empty ``spectra``, a budget outside the feasible range (the message gives it), a
        cap below ``min_rank``.

    Notes
    -----
    Greedy over the pooled ratios, which is optimal for this additive objective: it
    maximises the summed explained-variance ratio of the chosen components subject to the
    per-layer bounds.  Ties go to the layer listed first.
    """
    if not spectra:
        raise ValueError("allocate_ranks needs at least one layer")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"rank budget must be an int, got {type(budget).__name__}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise ValueError(f"min_rank must be an int >= 0, got {min_rank!r}")
    names = list(spectra)
    ratios = {name: explained_variance_ratio(spectra[name]) for name in names}
    caps: dict[str, int] = {}
    for name in names:
        k = ratios[name].numel()
        cap = max_rank.get(name, k) if isinstance(max_rank, Mapping) else (
            k if max_rank is None else max_rank)
        if isinstance(cap, bool) or not isinstance(cap, int):
            raise TypeError(f"max_rank for layer {name!r} must be an int, got {cap!r}")
        cap = min(cap, k)
        if cap < min_rank:
            raise ValueError(f"layer {name!r}: rank cap {cap} (k={k}) is below "
                             f"min_rank={min_rank}")
        caps[name] = cap
    low, high = min_rank * len(names), sum(caps.values())
    if not low <= budget <= high:
        raise ValueError(f"rank budget {budget} is infeasible for {len(names)} layers: it must "
                         f"be in [{low}, {high}] (min_rank={min_rank} each, caps summing to "
                         f"{high})")
    ranks = {name: min_rank for name in names}
    # Candidates beyond each layer's guaranteed min_rank, largest ratio first; the sort
    # is stable, so equal ratios keep layer order, then component order.
    pool = [(float(ratios[name][i]), order, i, name)
            for order, name in enumerate(names) for i in range(min_rank, caps[name])]
    pool.sort(key=lambda item: (-item[0], item[1], item[2]))
    for _, _, _, name in pool[: budget - low]:
        ranks[name] += 1
    return ranks
