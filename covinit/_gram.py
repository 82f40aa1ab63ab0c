"""Symmetric rank-n updates ``C += YᵀY`` that compute one triangle ("upper" matrices).

A Gram matrix is symmetric, but a GEMM computes both halves.  The collectors keep their
co-moments as *upper matrices*: only the entries on and above the diagonal are meaningful
while the sums grow, and :func:`symmetrize` completes the matrix once, when it is read.

On the CPU with torch on one thread, :func:`add_gram` calls the ``?syrk`` routine of SciPy's
BLAS (half the flops of a GEMM, in one call) instead of 8 row-panel GEMMs through torch (the
way other devices take).  ``benchmarks/gram_speed.py`` on this project's 2-core machine
(``benchmarks/results/gram_speed.md``), one thread, widths 192–1,536, 128–4,096 rows: float64
5–27 % less time than the panels (0.95–1.20× the floor's float32 ``XᵀX``), float32 15–43 %
less.  At 2 threads the 2-core machine gave no stable answer (two runs of the script: float32
``ssyrk`` slower than the panels at 5 of 9 shapes in one, faster at all 9 in the other), so
more threads keep the panels until a machine with more cores decides it.  SciPy's BLAS keeps its own
thread pool: :func:`blas_threads` matches it to torch's thread count while a collector runs.

The storage of an upper matrix is the row panels of :func:`panels`: blocks ``[i:j, i:]``.
What lies left of the diagonal inside a diagonal block is unspecified (the BLAS leaves it
alone, the panel GEMMs write it), and nothing below the panels is ever written or read, so
a fresh matrix needs no k×k fill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from scipy.linalg import blas as scipy_blas
from threadpoolctl import threadpool_limits
from torch import Tensor

__all__ = ["add_gram", "add_upper", "blas_threads", "new_upper", "panels", "symmetrize"]

_SYRK = {torch.float64: scipy_blas.dsyrk, torch.float32: scipy_blas.ssyrk}


class Buffers(Protocol):
    """Scratch space: ``take(purpose, numel, dtype, device)`` returns a flat tensor of at
    least ``numel`` elements whose contents are undefined."""

    def take(self, purpose: str, numel: int, dtype: torch.dtype, device: torch.device
             ) -> Tensor: ...


def panels(k: int) -> list[tuple[int, int]]:
    """Row panels ``[i, j)`` of a k×k upper matrix: blocks ``[i:j, i:]`` are its storage.

    A function of k alone: writers and readers of one matrix must agree on it.
    """
    if k < 128:
        return [(0, k)]
    b = -(-k // 8)
    return [(i, min(i + b, k)) for i in range(0, k, b)]


def new_upper(k: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """A zero upper matrix (k, k): only the panel blocks are zeroed."""
    out = torch.empty(k, k, dtype=dtype, device=device)
    for i, j in panels(k):
        out[i:j, i:].zero_()
    return out


def add_upper(out: Tensor, other: Tensor, overwrite: bool = False) -> None:
    """``out += other`` (or ``out = other``) on the panel blocks of two upper matrices
    (k, k); ``other`` may have another dtype (a float32 pending sum into float64)."""
    for i, j in panels(out.shape[0]):
        if overwrite:
            out[i:j, i:].copy_(other[i:j, i:])
        else:
            out[i:j, i:].add_(other[i:j, i:])


def add_gram(out: Tensor, y: Tensor, overwrite: bool = False,
             work: Buffers | None = None, blas: bool | None = None) -> None:
    """``out += yᵀy`` (or ``out = yᵀy``) on the upper matrix ``out`` (k, k), in place.

    Parameters
    ----------
    out : Tensor, shape (k, k), float64 or float32
        An upper matrix (:func:`new_upper`); with ``overwrite`` its old contents are ignored,
        even uninitialised NaN/Inf.
    y : Tensor, shape (n, k)
        Rows; converted to ``out``'s dtype (into ``work``'s buffer when given) if needed.
    overwrite : bool
        Write ``yᵀy`` instead of adding it.
    work : Buffers, optional
        Scratch space for a converted or made-contiguous copy of ``y``.
    blas : bool, optional
        None (default): the BLAS ``?syrk`` where it measured faster, a CPU matrix with torch
        on one thread.  True: the BLAS for any contiguous float32/float64 CPU matrix; False:
        the panel GEMMs that other devices run (both for tests and
        ``benchmarks/gram_speed.py``).
    """
    n, k = y.shape
    dtype = out.dtype
    if y.dtype != dtype or (out.device.type == "cpu" and not y.is_contiguous()):
        if work is None:
            y = y.to(dtype).contiguous()
        else:
            y = work.take("gemm", n * k, dtype, y.device).view(n, k).copy_(y)
    beta = 0.0 if overwrite else 1.0
    if blas is None:
        blas = torch.get_num_threads() == 1
    if blas and out.device.type == "cpu" and dtype in _SYRK and out.is_contiguous():
        _syrk(out, y, beta)
        return
    yt = y.T  # one view, sliced per panel (a batch-1 call is 128 rows: views add up)
    for i, j in panels(k):
        # beta=0 ignores the block's old contents
        out[i:j, i:].addmm_(yt[i:j], y[:, i:], beta=beta)


def _syrk(out: Tensor, y: Tensor, beta: float) -> None:
    """``out = beta·out + yᵀy`` on ``out``'s upper triangle with the BLAS, in place.

    ``out``'s buffer read as a Fortran (column-major) array is ``outᵀ``, whose lower
    triangle is ``out``'s upper one; ``y`` (n, k) row-major read as Fortran is ``yᵀ`` (k, n),
    so ``?syrk`` with ``trans=0`` computes ``yᵀ·y``.  The lower-triangle form was the faster
    one in the measurement of the module docstring.
    """
    c = out.detach().numpy().T
    result = _SYRK[out.dtype](1.0, y.detach().numpy().T, beta=beta, c=c, lower=1,
                              overwrite_c=1)
    if not np.shares_memory(result, c):  # the wrapper copied: write the result back
        out.copy_(torch.from_numpy(np.ascontiguousarray(result.T)))


def symmetrize(upper: Tensor, in_place: bool = False) -> Tensor:
    """The full symmetric matrix from an upper matrix (k, k), copied panel by panel (a
    whole-matrix transpose is cache-hostile and ~3× slower at k = 1536).

    ``in_place`` writes the lower part into ``upper`` itself (only entries outside the
    panels' meaningful triangle are overwritten); the result is exactly symmetric.
    """
    out = upper if in_place else torch.empty_like(upper)
    for i, j in panels(upper.shape[0]):
        block = upper[i:j, i:]  # (j−i, k−i)
        if not in_place:
            out[i:j, j:] = block[:, j - i:]
        out[j:, i:j] = block[:, j - i:].T  # the part below the diagonal block
        diag = torch.triu(block[:, : j - i])
        out[i:j, i:j] = diag + torch.triu(diag, 1).T
    return out


@contextmanager
def blas_threads(threads: int | None = None) -> Iterator[None]:
    """Limit SciPy's (and NumPy's) BLAS to ``threads`` threads (default: torch's thread
    count) inside the block, restoring the previous limits on exit.

    :func:`add_gram` runs in SciPy's BLAS, whose thread pool does not follow
    ``torch.set_num_threads``: without the limit it would use every core while torch was
    told to use fewer.
    """
    limits: Any = threadpool_limits(limits=threads or torch.get_num_threads(),
                                    user_api="blas")
    try:
        yield
    finally:
        limits.restore_original_limits()
