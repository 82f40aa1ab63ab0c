"""Merge per-rank calibration summaries once, at the end (README: "Calibration").

Each rank of a ``torch.distributed`` job hooks its own shard of the data and keeps its own
:class:`~covinit.stats.Moments`; nothing is communicated inside the hooks.  At the end every
summary is packed into one fixed-size float64 vector ``[n, q, mean (k), t (k), m2 (k·k)]``
and exchanged with ``all_gather`` of plain tensors (not ``all_gather_object``, which pickles),
one layer side at a time so that the buffer stays ``world_size × (k² + 2k + 2)``.  Every rank
then merges the gathered summaries in rank order with Chan's update, so all ranks hold the
same, exact result — the single-process result on the union of the shards, to rounding.

Ranks may see different numbers of batches, or none: an empty summary packs as ``n = 0``
and merges as the identity.  Counts travel as float64, exact below 2⁵³ rows.

Plain sums (the gradient side's cross-moment ``G = Σ δ·xᵀ``, d×k) are gathered with
:func:`all_gather_tensor` and added in rank order — not all-reduced, whose summation order
is the backend's — so that every rank holds the same bits.

**Sharded models (FSDP2).**  Under ``torch.distributed.fsdp.fully_shard`` the parameters are
``DTensor`` shards; forward hooks still see full activations (FSDP all-gathers the weights for
the forward), so statistics need nothing new.  What reads or writes a weight goes through
:func:`full_tensor` (an all-gather: every rank must call it, in the same order) and
:func:`copy_full_` (rank 0's full tensor is scattered with the parameter's own device mesh
and placements, so every rank keeps exactly its shard).  :func:`reshard_fsdp` puts the
sharded parameters back first: FSDP keeps the root's parameters unsharded after a forward,
and a write into that unsharded copy would be lost at the next reshard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from covinit.sketch import Sketch
from covinit.stats import Moments

__all__ = [
    "all_gather_ints",
    "all_gather_moments",
    "all_gather_sketch",
    "all_gather_tensor",
    "copy_full_",
    "full_tensor",
    "is_distributed",
    "is_sharded",
    "pack_moments",
    "reshard_fsdp",
    "storage_ptr",
    "unpack_moments",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """The device collectives of the default group expect (CUDA for NCCL, else CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pack_moments(m: Moments, device: torch.device | None = None) -> Tensor:
    """One flat float64 vector ``[n, q, mean, t, m2.ravel()]`` of length ``k² + 2k + 2``."""
    device = m.mean.device if device is None else device
    head = torch.tensor([float(m.n)], dtype=torch.float64, device=device)
    return torch.cat([head, m.q.reshape(1).to(device), m.mean.to(device), m.t.to(device),
                      m.m2.reshape(-1).to(device)])


def unpack_moments(flat: Tensor, k: int) -> Moments:
    """Inverse of :func:`pack_moments`.

    Raises
    ------
    ValueError
        If ``flat`` does not have length ``k² + 2k + 2``.
    """
    if flat.shape != (k * k + 2 * k + 2,):
        raise ValueError(f"packed moments of width {k} need {k * k + 2 * k + 2} values, "
                         f"got shape {tuple(flat.shape)}")
    n = int(flat[0].item())
    if n == 0:
        return Moments.empty(k, flat.device)
    return Moments(n, flat[2:2 + k].clone(), flat[2 + 2 * k:].reshape(k, k).clone(),
                   flat[2 + k:2 + 2 * k].clone(), flat[1].clone())


def all_gather_moments(m: Moments) -> list[Moments]:
    """Every rank's summary of the same layer side, in rank order.

    All ranks must call this collectively with summaries of the same width ``k``.  The
    result lives on ``m``'s device.
    """
    device = _comm_device()
    flat = pack_moments(m, device)
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    return [unpack_moments(p, m.k).to(m.mean.device) for p in parts]


def all_gather_tensor(t: Tensor) -> list[Tensor]:
    """Every rank's tensor (same shape and dtype on all ranks), in rank order, on ``t``'s
    device; e.g. the per-rank cross-moments ``G`` (d, k) float64, to be summed in order."""
    device = _comm_device()
    mine = t.detach().to(device).contiguous()
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [p.to(t.device) for p in parts]


def all_gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's list of ints (all ranks pass lists of the same length), in rank order."""
    device = _comm_device()
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return [[int(v) for v in p.tolist()] for p in parts]


def all_gather_sketch(s: Sketch) -> list[Sketch]:
    """Every rank's sketch of the same layer side, in rank order (packed as
    ``[n, trace, mean (k), y (k·ℓ)]``; all ranks share the seed and hence ``Ω``)."""
    device = _comm_device()
    k, size = s.k, s.size
    head = torch.tensor([float(s.n)], dtype=torch.float64, device=device)
    flat = torch.cat([head, s.trace.reshape(1).to(device), s.mean.to(device),
                      s.y.reshape(-1).to(device)])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    out = []
    for p in parts:
        p = p.to(s.mean.device)
        n = int(p[0].item())
        out.append(Sketch.empty(k, size, s.seed, p.device) if n == 0 else
                   Sketch(n, p[2:2 + k].clone(), p[2 + k:].reshape(k, size).clone(),
                          p[1].clone(), s.seed))
    return out


# ---------------------------------------------------------------------- sharded parameters
def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (e.g. a parameter of a ``fully_shard`` module)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor, detached: a ``DTensor`` is all-gathered (a collective: every rank
    must call this for the same tensors in the same order), a plain tensor is returned as
    its detached self (a view, not a copy).  Shape: ``t``'s global shape."""
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


def copy_full_(param: Tensor, value: Tensor) -> None:
    """Overwrite ``param`` in place with the full tensor ``value`` (same global shape; cast
    to ``param``'s dtype and device).

    For a ``DTensor`` parameter, rank 0's ``value`` is distributed with the parameter's own
    device mesh and placements (``distribute_tensor``, a collective), so every rank keeps
    its own shard of the same tensor even if the ranks' ``value`` differ by rounding; the
    parameter object (and an optimizer's reference to it) stays the same.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"cannot copy a tensor of shape {tuple(value.shape)} into a "
                         f"parameter of shape {tuple(param.shape)}")
    with torch.no_grad():
        if not is_sharded(param):
            param.copy_(value)
            return
        from torch.distributed.tensor import distribute_tensor

        local = param.to_local()
        full = value.detach().to(dtype=local.dtype, device=local.device).contiguous()
        local.copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())


def storage_ptr(t: Tensor) -> int:
    """``data_ptr`` of the storage ``t`` (or, for a ``DTensor``, its local shard) uses:
    a ``DTensor`` reports 0 itself, which would make all of them look tied."""
    return (t.to_local() if is_sharded(t) else t).data_ptr()


def reshard_fsdp(model: nn.Module) -> int:
    """Reshard every FSDP2 module of ``model`` (``fully_shard``), so that its registered
    parameters are the sharded ``DTensor`` ones; returns how many modules were FSDP2 modules.

    FSDP2 keeps the root module's parameters unsharded after a forward (no reshard after
    the root's forward by default) and does not all-gather again while they are; values
    written into the sharded parameters would not be seen, and values written into the
    unsharded copies would be lost.  Resharding first (no communication) avoids both: the
    next forward all-gathers what was written.
    """
    if not dist.is_available():
        return 0
    from torch.distributed.fsdp import FSDPModule

    count = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
            count += 1
    return count
