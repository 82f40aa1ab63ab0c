"""Forward hooks that stream layer activations into exact float64 summaries (README:
"Calibration").

The pieces, in the order :func:`covinit.calibrate` uses them:

* :func:`match_layers` — which layers to hook, by the same target rules as
  :func:`covinit.add_lora` (name suffixes, a regular expression, or a callable).
* :func:`batch_masks` / :func:`call_model` / :func:`move_to_device` — turn one batch of a
  dataloader into a model call plus the masks of positions to keep (``attention_mask != 0``
  and, for token-level labels, ``labels != -100``).  Encoder-decoder models get the encoder's
  mask on encoder layers and on cross-attention inputs (the encoder's output), the
  decoder's (``labels``, ``decoder_attention_mask``) elsewhere — :func:`seq2seq_masks`.
* :class:`Collector` — registers one forward hook per layer; each call reduces the layer's
  input and/or output rows (any leading shape: (B, T, k), (B, k), (B, H, W, k)) to power
  sums about a per-stream centre with one GEMM and accumulates them in place.

Why power sums about a centre instead of a Chan merge per batch: the merge costs several
k×k passes per batch and layer, the in-place ``addmm_`` none.  The centre is the first
batch's mean; if a later batch's mean drifts from it by more than a few standard deviations
in any feature (the regime where ``Σyyᵀ − nδδᵀ`` would cancel), the stream is folded into an
exact :class:`~covinit.stats.Moments` with Chan's update and restarted about the new mean.
The result equals the dense float64 reference to ~1e-13 relative, whatever the mean.

Cost: the GEMM ``yᵀy`` dominates (n·k² per layer side and batch).  Only its upper triangle
is computed (the BLAS ``?syrk`` on the CPU, :func:`covinit._gram.add_gram`), which makes the
float64 product about as fast as a plain float32 ``XᵀX``; from the second batch on, layers
whose reductions nobody shares accumulate straight into their sums, with no k×k temporary.

Staging: besides the product, each reduction costs ~20 small tensor ops and two host syncs
(centring, the low sums, the drift and finiteness tests): at batch size 1 (128 rows a call,
25 reductions per batch on a MiniLM-shaped BERT) on 2 threads, 8% of the whole run.  From the
second batch on, a call of at most half :func:`_stage_rows` rows is copied into its stream's
staging buffer, and the buffer is reduced as one block when full, when the fold changes, and
before anything reads the sums (:meth:`Collector.results`).  The power sums of a block are
the sums of its calls', so the statistics are the same to float64 rounding.  Layers fed one
tensor (q/k/v) take the rows their owner staged: one reduction per block for all of them.
Non-finite rows are found when their block is reduced, before any sum is touched, and the
error names the layer and the batch.

``precision="mixed"`` centres float32 rows in float32 about the float32-rounded centre (one
pass over the rows instead of a float64 copy, a subtraction and a float32 copy) and runs the
product in float32 *in place* into a float32 pending co-moment per accumulator, as the floor
does; the pending sum is added into the float64 one every :data:`_FLUSH_ROWS` rows and before
anything reads, merges, folds or re-centres the sums.  Adding each call's product into a
float64 k×k matrix instead cost more than the product itself at 128 rows a call (batch size 1).

Layers fed the very same tensor in one forward pass (q/k/v projections, gate/up projections)
reduce it once: a tensor is recognised by its storage pointer, shape, strides, dtype and
version counter while a weak reference shows it is still alive, so its memory cannot have
been reused by another tensor.  No activation is hashed or copied for this.

The "gradient" side (opt-in; README: "Init strategies", the gradient strategies) runs
forward + backward on each batch and keeps, per layer, the :class:`~covinit.stats.Moments`
of ``δ = ∂L/∂y`` (d-dim rows over the kept positions) and the cross-moment
``G = Σ_t δ_t·x_tᵀ`` (d×k float64, a plain sum, merged by addition).  The forward hook
passes the layer's output through an identity autograd node (:class:`_Tap`) whose backward
sees ``δ``; the backward is run with
``torch.autograd.grad(loss, [anchor])`` for one scalar leaf every tap hangs off, so no
parameter's ``.grad`` is written (nor computed: autograd prunes the weight gradients) and no
``requires_grad`` flag is touched.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from covinit._gram import add_gram, add_upper, blas_threads, new_upper, symmetrize
from covinit.adapters import find_linear_layers
from covinit.selection import Targets, select
from covinit.sketch import Sketch, sketch_matrix
from covinit.stats import Moments, sum_in_order

__all__ = [
    "ALL_SIDES",
    "GRADIENT",
    "PRECISIONS",
    "SIDES",
    "CalibrationLike",
    "Collector",
    "GradientCalibrationLike",
    "StreamResult",
    "batch_masks",
    "call_model",
    "match_layers",
    "move_to_device",
    "rows_of",
    "seq2seq_masks",
    "side_bytes",
]

#: The activation sides (what :func:`covinit.calibrate` collects by default).
SIDES = ("input", "output")
#: The opt-in side of output gradients ``δ = ∂L/∂y`` and the cross-moment ``G = Σ δ·xᵀ``.
GRADIENT = "gradient"
#: Every side a :class:`Collector` / :class:`~covinit.Calibration` can hold, in order.
ALL_SIDES = (*SIDES, GRADIENT)
PRECISIONS = ("float64", "mixed")



@runtime_checkable
class CalibrationLike(Protocol):
    """What :func:`covinit.initialize` reads from a calibration: :class:`covinit.Calibration`
    is one, and so is any object with these members (e.g. a test's reference statistics).

    It lives here, below both :mod:`covinit.calibration` (which calls ``initialize``) and
    :mod:`covinit.initialization` (which reads calibrations), so neither imports the other's
    module for it.  ``initialize`` also reads, where present, ``sides`` (default
    :data:`SIDES`) and ``sketch(layer, side)`` (a :class:`~covinit.sketch.Sketch` or None);
    the gradient strategies need :class:`GradientCalibrationLike`.
    """

    @property
    def layer_names(self) -> list[str]:
        """Calibrated layers, in module order."""
        ...

    def moments(self, layer: str, side: str = "input") -> Moments | None:
        """Exact summary of ``layer``'s ``side`` rows (width k for "input", d otherwise), or
        None where that side was not collected."""
        ...

    def folds(self, layer: str, side: str = "input") -> list[Moments] | None:
        """Per-fold summaries whose in-order merge is :meth:`moments`, or None."""
        ...

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when ``model``'s linear layers are not the calibrated ones."""
        ...


@runtime_checkable
class GradientCalibrationLike(CalibrationLike, Protocol):
    """A :class:`CalibrationLike` that may hold the gradient side (``"gradient" in sides``)."""

    sides: tuple[str, ...]

    def gradient(self, layer: str) -> Tensor:
        """``G = Σ δ·xᵀ``, shape (d, k), float64, of ``layer``."""
        ...


# A batch whose mean sits further than sqrt(_DRIFT) standard deviations from the stream's
# centre (in any feature) triggers a re-centre: the cancellation in s2 − nδδᵀ then costs at
# most log10(_DRIFT) ≈ 1.8 of float64's ~16 digits.
_DRIFT = 64.0

# Recent activations whose reductions are kept for reuse within one forward pass.
_CACHE_ENTRIES = 4

# Mixed precision: rows summed in an accumulator's float32 pending co-moment before it is added
# into the float64 one.  Each in-place addition rounds to float32 relative to the pending sum,
# so the error grows like sqrt(calls between flushes)·2⁻²⁴; 4096 rows keep it at the size of
# one float32 product over a batch of 32 sequences of 128 (~1e-7 of the spread), while the
# float64 k×k read-modify-write is paid once per 4096 rows instead of once per call.
_FLUSH_ROWS = 4096
# A float32 product of at least this many rows is added into the float64 sums at once, through
# a scratch matrix shared by every stream of that width, instead of through the stream's own
# pending co-moment: the add then costs ≤ ~4 % of the product, and a stream fed only such
# products never allocates its k×k float32 pending sum (1.1 GB on SmolLM2's in+out streams,
# whose first touch cost more than the adds it saved; on this machine's VM, measured).
_DIRECT_ROWS = 1024

# Staging (see the module docstring): a stream's small calls are copied into a buffer and
# reduced together, in blocks of up to _stage_rows(k) rows (measured, 2 threads, batch 1:
# 1.17× → 1.08× the floor; blocks of k or 4k rows, or twice the product, did no better).
# Blocks stop growing once their product n·k² reaches _STAGE_WORK (wide layers' calls are big
# products already: a 7B model's 4096-wide streams stage 64 rows) and at
# _STAGE_ROWS_PER_WIDTH·k rows, so that a buffer never holds more than two k×k float64
# co-moments' worth of bytes.
_STAGE_WORK = 2**30
_STAGE_ROWS_PER_WIDTH = 2
# Only calls of which at least this many fit in a block are staged: a bigger call would fill
# the block on its own, and staging it only copies its rows (and keeps a buffer per stream:
# 480 MB on SmolLM2's 1,024-row calls, whose faulting-in cost more than the copies saved).
_STAGE_MIN_CALLS = 2


def _stage_rows(k: int) -> int:
    """Rows of a width-k stream's staging buffer: calls of at least this many rows are
    reduced on their own."""
    return min(_STAGE_ROWS_PER_WIDTH * k, _STAGE_WORK // (k * k))


def side_bytes(k: int, d: int, side: str, copies: int = 1, precision: str = "float64",
               staging: bool = False) -> int:
    """Bytes of ``copies`` exact float64 summaries of one side of a k-in, d-out layer.

    The w×w co-moment dominates (w = k for "input", d otherwise); the gradient side also
    keeps ``G = Σ δ·xᵀ`` (d×k), so it counts ``8·d·(d + k)``.  While collecting a stream
    holds ``folds + 1`` copies (one accumulator per fold plus a batch's temporary); with
    ``precision="mixed"`` each of the ``copies − 1`` accumulators also holds a float32 pending
    w×w co-moment (``4·w²``; the temporary, float32 there, is still counted as a float64
    copy).  ``staging=True`` (while collecting) adds the stream's staging buffer,
    ``_stage_rows(w)·w`` values at 8 bytes (the activations' dtype, float64 at most; a few
    MB at most, see :data:`_STAGE_WORK`).  The one formula behind
    :meth:`Collector.memory_needs`, the command line's size check and the memory budget's
    planner (:mod:`covinit.budget`); a file holds ``copies`` summaries of the default
    precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    width = k if side == "input" else d
    exact = copies * 8 * width * (width + (k if side == GRADIENT else 0))
    pending = max(copies - 1, 0) * 4 * width * width if precision == "mixed" else 0
    stage = 8 * _stage_rows(width) * width if staging else 0
    return exact + pending + stage



# ---------------------------------------------------------------------- layer selection
def match_layers(model: nn.Module, targets: Targets) -> dict[str, nn.Module]:
    """The linear layers of ``model`` selected by ``targets``, by canonical name.

    Candidates are ``nn.Linear`` and Hugging Face ``Conv1D`` layers; in a model that holds
    LoRA layers the candidate for an adapter is the module computing ``W0·x`` under it (see
    :func:`covinit.adapters.find_linear_layers`), named by the layer's name in the plain model.

    Parameters
    ----------
    model : nn.Module
    targets : list of str, str or callable
        See :mod:`covinit.selection`.  With a list, every entry must match at least one layer,
        so a typo cannot silently shrink the selection.

    Returns
    -------
    dict
        ``canonical name -> module`` in module order.

    Raises
    ------
    ValueError
        If nothing matches, or a list entry matches nothing; the message lists the layers
        that exist.

    Examples
    --------
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> list(match_layers(model, ["2"]))
    ['2']
    """
    candidates = find_linear_layers(model)
    return {name: candidates[name] for name in select(candidates, targets)}


def _features(name: str, module: nn.Module) -> tuple[int, int]:
    """``(k, d)`` = (in_features, out_features) of a linear-like layer."""
    from covinit._linear import linear_shape

    try:
        d, k = linear_shape(module)
    except TypeError:
        raise TypeError(
            f"layer {name!r} is a {type(module).__name__}; calibration hooks nn.Linear or "
            "transformers Conv1D layers only"
        ) from None
    return k, d


# ---------------------------------------------------------------------- batches
def move_to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists and tuples recursed)."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()}) \
            if type(batch) is dict else {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def batch_masks(batch: Any) -> list[Tensor]:
    """Boolean masks of the positions to keep, one per distinct position shape.

    For a mapping batch: ``attention_mask != 0`` and, when ``labels`` are token-level
    (at least 2-D), ``labels != -100``; the two are combined when their shapes agree and kept
    apart otherwise (an encoder-decoder's labels index the decoder's positions).  Sequence
    labels of shape (B,) are not a mask.  Tuples and tensors carry no mask.

    Returns
    -------
    list of Tensor
        Boolean masks, e.g. one (B, T) mask; empty when every position counts.
    """
    if not isinstance(batch, Mapping):
        return []
    masks: list[Tensor] = []
    attention = batch.get("attention_mask")
    if isinstance(attention, Tensor):
        masks.append(attention != 0)
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.ndim >= 2 and not labels.is_floating_point():
        keep = labels != -100
        if masks and masks[0].shape == keep.shape:
            masks[0] = masks[0] & keep
        else:
            masks.append(keep)
    return masks


def seq2seq_masks(batch: Any) -> tuple[list[Tensor], list[Tensor]]:
    """Masks of an encoder-decoder batch: ``(encoder, decoder)``.

    The encoder keeps ``attention_mask != 0``; the decoder keeps ``labels != -100`` and
    ``decoder_attention_mask != 0`` (combined when their shapes agree).  Kept apart, so that
    an encoder input and labels of the same length cannot be confused.

    Returns
    -------
    tuple of (list of Tensor, list of Tensor)
        Boolean masks, each list empty when every position of that side counts.
    """
    if not isinstance(batch, Mapping):
        return [], []
    encoder = [m != 0 for m in [batch.get("attention_mask")] if isinstance(m, Tensor)]
    decoder = batch_masks({"attention_mask": batch.get("decoder_attention_mask"),
                           "labels": batch.get("labels")})
    return encoder, decoder


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder of a Hugging Face encoder-decoder model (PEFT-wrapped or not), else None."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or not callable(get_encoder):
        return None
    encoder = get_encoder()
    return encoder if isinstance(encoder, nn.Module) else None


def call_model(model: nn.Module, batch: Any,
               forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> Any:
    """Run ``model`` on one batch: ``forward_fn(model, batch)`` if given, else by batch type.

    A mapping is passed as keyword arguments, a list or tuple as positional arguments, a
    tensor as the single argument.

    Raises
    ------
    TypeError
        For any other batch type when no ``forward_fn`` is given.
    """
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    if isinstance(batch, Tensor):
        return model(batch)
    raise TypeError(
        f"cannot call the model on a batch of type {type(batch).__name__}; batches must be a "
        "dict (passed as keyword arguments), a tuple/list (positional) or a tensor, or pass "
        "forward_fn=lambda model, batch: ..."
    )


def _loss_of(outputs: Any, batch: Any, index: int,
             loss_fn: Callable[[Any, Any], Tensor] | None) -> Tensor:
    """The scalar loss whose gradient the "gradient" side records: ``loss_fn(outputs,
    batch)`` if given, else the model's own ``outputs.loss`` (Hugging Face models compute it
    when the batch has ``labels``)."""
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
        source = "loss_fn(outputs, batch)"
    else:
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        source = "the model's outputs.loss"
        if loss is None:
            has_labels = isinstance(batch, Mapping) and batch.get("labels") is not None
            why = ("the batch has 'labels' but the model returned no .loss" if has_labels
                   else "the batch has no 'labels' and no loss_fn was given")
            raise ValueError(
                f"the gradient side needs a loss, but batch {index} gave none: {why}; add "
                "labels to the batches or pass loss_fn=lambda outputs, batch: <scalar loss>")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the gradient side needs a scalar loss; {source} at batch {index} "
                         f"gave {got}")
    if not loss.requires_grad:
        raise ValueError(
            f"the loss from {source} at batch {index} does not require grad, so it depends on "
            "no calibrated layer's output (computed under torch.no_grad(), or from detached "
            "outputs?)")
    return loss.reshape(())


def rows_of(x: Tensor, masks: Sequence[Tensor]) -> Tensor:
    """The kept rows of an activation ``x`` of shape (*lead, k), as (n, k).

    The first mask whose shape equals the leading dimensions of ``x`` (or their first
    dimensions, or their flattened count) selects the rows; with no such mask — e.g. a
    pooler's (B, k) input against a (B, T) mask — every row is kept.
    """
    k = x.shape[-1]
    lead = x.shape[:-1]
    for mask in masks:
        if mask.device != x.device:
            mask = mask.to(x.device)
        fits = mask.shape == lead or (len(lead) > mask.ndim and lead[: mask.ndim] == mask.shape)
        if not fits and len(lead) == 1 and lead[0] == mask.numel() and mask.ndim > 1:
            mask, fits = mask.reshape(-1), True  # flattened positions
        if fits:
            if bool(mask.all()):  # nothing masked (no padding): a view, not a gathered copy
                break
            return x[mask].reshape(-1, k)
    return x.reshape(-1, k)


# ---------------------------------------------------------------------- accumulation
@dataclass
class _Reduction:
    """One batch of rows reduced to power sums about ``shift_after`` (``s2``: an "upper"
    matrix, see :mod:`covinit._gram`; float32 in mixed precision)."""

    shift_before: Tensor | None
    shift_after: Tensor
    n: int
    s1: Tensor
    s2: Tensor | None
    s3: Tensor
    s4: Tensor
    serial: int


@dataclass
class _Accumulator:
    """Power sums about ``shift`` plus everything folded away before the last re-centre.

    ``s2`` is an "upper" matrix (:mod:`covinit._gram`): only its row panels are ever written
    or read, and only their triangle on and above the diagonal is meaningful; the rest is
    left uninitialised on purpose, to save a k×k fill per stream.

    In mixed precision, float32 co-moments go to ``pending`` (a float32 "upper" matrix, about
    the same centre) and reach ``s2`` at :meth:`flush`: every :data:`_FLUSH_ROWS` rows and
    before ``s2`` is read (:meth:`_fold`, called by :meth:`moments` and on a re-centre).
    ``pending_rows == 0`` means ``pending`` holds nothing (its contents are stale).
    """

    k: int
    shift: Tensor | None = None
    n: int = 0
    s1: Tensor | None = None
    s2: Tensor | None = None
    s3: Tensor | None = None
    s4: Tensor | None = None
    done: Moments | None = None
    # s2 is a reduction's own tensor, possibly still read by layers sharing that reduction in
    # this forward pass: copy before writing (cleared at the end of each batch).
    borrowed: bool = False
    # (centre, (1e-14·|centre|)²): the drift test's floor, computed once per centre
    _floor: tuple[Tensor, Tensor] | None = None
    pending: Tensor | None = None
    pending_rows: int = 0

    def drift_floor(self) -> Tensor:
        """``(1e-14·|shift|)²`` (k,): a few ulps of the centre, for :func:`_reduce`'s test."""
        assert self.shift is not None
        if self._floor is None or self._floor[0] is not self.shift:
            self._floor = (self.shift, (1e-14 * self.shift.abs()) ** 2)
        return self._floor[1]

    def variance_bound(self) -> Tensor:
        """``diag(s2)`` (k,) float64 with the pending rows included: the drift test's
        variance term (float32 rounding of the pending part is harmless in a bound)."""
        assert self.s2 is not None
        diag = torch.diagonal(self.s2)
        if self.pending_rows:
            assert self.pending is not None
            return diag + torch.diagonal(self.pending)
        return diag

    def flush(self) -> None:
        """Add the float32 pending co-moment into the float64 ``s2``."""
        if not self.pending_rows:
            return
        assert self.s2 is not None and self.pending is not None
        if self.borrowed:
            self.s2, self.borrowed = self.s2.clone(), False
        add_upper(self.s2, self.pending)
        self.pending_rows = 0

    def _pending_buffer(self, device: torch.device) -> Tensor:
        if self.pending is None or self.pending.device != device:
            self.pending = torch.empty(self.k, self.k, dtype=torch.float32, device=device)
        return self.pending

    def add_gram(self, y: Tensor, work: _Workspace | None) -> None:
        """``pending += yᵀy`` in float32, in place (mixed precision, ``y`` (n, k) centred
        about ``shift``): the floor's own ``addmm_``, no k×k float64 traffic per call.  A
        product of :data:`_DIRECT_ROWS` rows or more goes into ``s2`` at once instead."""
        if self._direct(y.shape[0]) and work is not None:
            assert self.s2 is not None and not self.borrowed  # prepare() made it writable
            scratch = work.take("product", self.k * self.k, torch.float32, y.device)
            add_gram(scratch.view(self.k, self.k), y, overwrite=True, work=work)
            add_upper(self.s2, scratch.view(self.k, self.k))
            return
        pending = self._pending_buffer(y.device)
        add_gram(pending, y, overwrite=not self.pending_rows, work=work)
        self._pended(y.shape[0])

    @staticmethod
    def _direct(n: int) -> bool:
        """Add a float32 product of ``n`` rows straight into ``s2`` (about the same centre as
        ``pending``, so what is pending stays valid and is flushed as before)."""
        return n >= _DIRECT_ROWS

    def _pended(self, n: int) -> None:
        self.pending_rows += n
        if self.pending_rows >= _FLUSH_ROWS:
            self.flush()

    def _fold(self) -> None:
        self.flush()
        if self.n:
            assert self.shift is not None and self.s1 is not None
            # An owned co-moment is finished in its own storage (no fresh k×k matrices)
            # (an inference tensor may only be written inside inference mode)
            owned = not self.borrowed and (not self.s2.is_inference()
                                           or torch.is_inference_mode_enabled())
            part = Moments.from_shifted_sums(self.n, self.shift, self.s1,
                                             symmetrize(self.s2, in_place=owned), self.s3,
                                             self.s4, overwrite=True)
            self.done = part if self.done is None else self.done.merge(part)
        self.n, self.s1, self.s2, self.s3, self.s4 = 0, None, None, None, None
        self.borrowed = False

    def can_take(self, red: _Reduction) -> bool:
        return self.n == 0 or self.shift is red.shift_before or self.shift is red.shift_after

    def prepare(self, red: _Reduction, adopt: bool = False) -> None:
        """Move to ``red``'s centre (folding what was summed about the old one) and make sure
        the sums exist and may be written, so that ``red`` can be added.  With ``adopt`` a
        fresh accumulator starts from ``red``'s own co-moment instead of zeros."""
        if self.shift is not red.shift_after:
            self._fold()
            self.shift = red.shift_after
        if self.s1 is None:
            device = red.s1.device
            self.s1 = torch.zeros(self.k, dtype=torch.float64, device=device)
            self.s3 = torch.zeros(self.k, dtype=torch.float64, device=device)
            self.s4 = torch.zeros((), dtype=torch.float64, device=device)
            if red.s2 is not None and adopt and red.s2.dtype == torch.float64:
                self.s2, self.borrowed = red.s2, True
                return
            self.s2 = new_upper(self.k, device)
            if red.s2 is not None:  # a float32 s2 is widened by the copy
                add_upper(self.s2, red.s2, overwrite=True)
            return
        if (red.s2 is not None and red.s2.dtype == torch.float32
                and not self._direct(red.n)):  # mixed: a small shared product waits
            add_upper(self._pending_buffer(red.s2.device), red.s2,
                       overwrite=not self.pending_rows)
            self._pended(red.n)
            return
        if self.borrowed:  # s2 is about to be written (without red.s2: by a direct product)
            self.s2, self.borrowed = self.s2.clone(), False
        if red.s2 is not None:  # float64, or a big float32 product widened by the add
            add_upper(self.s2, red.s2)

    def take(self, red: _Reduction, adopt: bool = False) -> None:
        """Add ``red`` (whose ``s2`` is ``None`` when it was already added in place)."""
        fresh = self.s1 is None or self.shift is not red.shift_after
        self.prepare(red, adopt=adopt)
        if fresh:
            self.s1.copy_(red.s1)
            self.s3.copy_(red.s3)
            self.s4.copy_(red.s4)
        else:
            self.s1.add_(red.s1)
            self.s3.add_(red.s3)
            self.s4.add_(red.s4)
        self.n += red.n

    def moments(self, device: torch.device | None = None) -> Moments:
        self._fold()
        if self.done is None:
            return Moments.empty(self.k, device)
        return self.done


class _Workspace:
    """Scratch buffers reused across a collector's calls, one per purpose and device.

    The centred rows of a call (n×k float64, 100 MB at 8192×1536) are dropped as soon as they
    are reduced; allocating them afresh each call costs the kernel's zeroing of new pages,
    measured at a third of the GEMM's cost beyond the float32 floor.  A buffer only grows.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, purpose: str, numel: int, dtype: torch.dtype, device: torch.device
             ) -> Tensor:
        """A flat buffer of at least ``numel`` elements (its contents are undefined)."""
        key = (purpose, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def clear(self) -> None:
        self._buffers.clear()


class _NonFinite(Exception):
    """Raised by :func:`_reduce` for rows with NaN/Inf (or a fourth moment that overflows),
    before the accumulator is touched; the collector turns it into a ``ValueError`` that
    names the layer."""


def _reduce(rows: Tensor, acc: _Accumulator, gemm_dtype: torch.dtype, serial: int,
            direct: bool = False, work: _Workspace | None = None) -> _Reduction:
    """Reduce ``rows`` (n, k) to power sums about ``acc``'s centre, re-centring on drift.

    With ``direct`` the co-moment is accumulated straight into ``acc`` (no k×k temporary)
    and the returned reduction has no ``s2``, so it cannot be shared with another layer.
    The centred rows live in ``work`` (when given) only until this call returns.  Raises
    :class:`_NonFinite`, leaving ``acc`` as it was, when the rows' fourth moment is not finite.

    Besides the ``yᵀy`` GEMM the centred rows ``y`` (n, k) are written once and read twice
    (``‖y‖²`` per row, then ``s1`` and ``s3`` as one (2, n)·(n, k) product).

    Mixed precision (``gemm_dtype`` float32) on rows narrower than float64: ``y`` is centred
    in float32 about the float32-rounded centre, which is the centre the float64 sums are
    kept about, so ``y`` differs from the exact ``x − centre`` by one float32 rounding of
    ``y`` itself (~6e-8 of ``|y|``, not of ``|x|``); its low sums are taken in float32 per
    call and accumulated in float64.
    """
    n, k = rows.shape
    before = acc.shift
    # float64 rows keep float64 centring: a float32 centre could sit far from their mean
    dtype = torch.float64 if rows.dtype == torch.float64 else gemm_dtype
    if before is None:
        # Any centre near the mean keeps the sums exact (what is left, δ = s1/n, is folded
        # in by from_shifted_sums): a float32 mean of float32 rows is 7× faster than a
        # float64-accumulated one, whose cast per element cost 2 % of a SmolLM2 pass.
        shift = (rows.mean(dim=0).double() if rows.dtype == torch.float32
                 else rows.mean(dim=0, dtype=torch.float64))
        if dtype != torch.float64:
            shift = shift.to(dtype).double()
    else:
        shift = before
    y = _centred(rows, shift, dtype, work)
    s1, s3, s4 = _low_sums(y)
    if not bool(torch.isfinite(s4)):  # before anything is written into acc
        raise _NonFinite
    if before is not None and acc.n:
        # Drift test, per feature: the offset² of the sums' mean from the centre, with this
        # batch added (union = u/N, N = acc.n + n), against a lower bound of their variance
        # (the batch's Σy² is at least s1²/n), plus a few ulps of the centre so that constant
        # features never trigger it.  That ratio is what s2 − n·δδᵀ cancels; bounding the old
        # variance alone re-centred every call of a stream fed one row per batch (a pooler at
        # batch size 1).  union² > D·var + floor, multiplied out to use few tensor ops:
        # u² > D·N/(1+D)·(diag(s2) + s1²/n) + floor·N²/(1+D).
        total = acc.n + n
        u = acc.s1 + s1
        bound = torch.addcmul(acc.variance_bound(), s1, s1, value=1.0 / n)
        bound.mul_(_DRIFT * total / (1 + _DRIFT)).add_(acc.drift_floor(),
                                                        alpha=total * total / (1 + _DRIFT))
        if bool((u * u > bound).any()):
            offset = s1 / n  # (k,) the batch mean's offset: its own mean becomes the centre
            shift = shift + offset
            if dtype == torch.float64:
                y.sub_(offset)
            else:  # about the new float32 centre, from the rows (not y: one rounding only)
                shift = shift.to(dtype).double()
                y = _centred(rows, shift, dtype, work)
            s1, s3, s4 = _low_sums(y)
    if not direct:
        s2 = torch.empty(k, k, dtype=gemm_dtype, device=y.device)  # its panels only, by add_gram
        add_gram(s2, y, overwrite=True, work=work)
        return _Reduction(before, shift, n, s1, s2, s3, s4, serial)
    red = _Reduction(before, shift, n, s1, None, s3, s4, serial)
    acc.prepare(red)
    if gemm_dtype == torch.float64:
        add_gram(acc.s2, y, work=work)
    else:
        acc.add_gram(y, work)
    acc.take(red)
    return red


def _centred(rows: Tensor, shift: Tensor, dtype: torch.dtype, work: _Workspace | None
             ) -> Tensor:
    """``rows − shift`` (n, k) in ``dtype``, written into ``work``'s buffer when given.

    float64: a copy then an in-place subtraction (~2× faster than a type-promoting
    subtraction).  float32: one subtraction of the float32 ``shift`` (exactly the float64
    one, which :func:`_reduce` rounded), whose only rounding is that of the result.
    """
    n, k = rows.shape
    if work is None:
        y = torch.empty(n, k, dtype=dtype, device=rows.device)
    else:
        y = work.take("rows", n * k, dtype, rows.device).view(n, k)
    if dtype == torch.float64:
        return y.copy_(rows).sub_(shift)
    return torch.sub(rows, shift.to(dtype), out=y)


def _low_sums(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ y, Σ ‖y‖²·y, Σ ‖y‖⁴)`` of centred rows ``y`` (n, k): float64 shapes (k,), (k,),
    (); computed in ``y``'s dtype (float32 in mixed precision, summed in float64 across
    calls by the accumulator)."""
    sq = torch.linalg.vector_norm(y, dim=1).square_()  # (n,) ‖y‖², one pass, no n×k temporary
    weights = torch.stack((torch.ones_like(sq), sq))  # (2, n)
    # (2, n)·(n, k), not yᵀ·(n, 2): MKL runs the row form ~10× faster (one read of y)
    s13 = (weights @ y).double()  # (2, k): s1 and s3
    return s13[0], s13[1], (sq @ sq).double()


@dataclass
class StreamResult:
    """What one layer side collected.

    Attributes
    ----------
    total : Moments or Sketch
        Summary of every kept row (the merge of ``folds``); a :class:`~covinit.sketch.Sketch`
        for layers wider than the collector's ``sketch_above``.
    folds : list of Moments or Sketch
        Per-fold summaries (batch ``i`` → fold ``i % M``); a single entry without folds.
    calls : int
        How many times the layer was called.
    cross : Tensor, shape (d, k), float64, optional
        Gradient side only: ``G = Σ δ·xᵀ`` over the kept positions (the sum of
        ``cross_folds``); its count is ``total.n``.
    cross_folds : list of Tensor, optional
        Gradient side only: ``G`` of each fold.
    """

    total: Moments | Sketch
    folds: list[Moments] | list[Sketch]
    calls: int
    cross: Tensor | None = None
    cross_folds: list[Tensor] | None = None


@dataclass
class _Stream:
    name: str
    side: str
    k: int
    accs: list[_Accumulator]
    calls: int = 0
    serials: list[int] = field(default_factory=list)
    # Whether another layer reused one of this stream's reductions (then its reductions
    # keep their own s2); streams that never shared accumulate in place from batch 1 on.
    shares: bool = False
    sketches: list[Sketch] | None = None  # bounded-memory mode for wide layers
    stage: _Stage = field(default_factory=lambda: _Stage())


@dataclass
class _Stage:
    """Rows of one stream waiting to be reduced as one block into ``acc`` (see
    :data:`_STAGE_WORK`); ``rows[:n]`` hold them, in the activations' dtype.  Layers fed the
    very same tensors (q/k/v) are ``takers``: the block's one reduction is added to each."""

    rows: Tensor | None = None  # (_stage_rows(k), k) buffer, reused
    n: int = 0
    acc: _Accumulator | None = None
    # (first row, batch index, serial) of each staged call
    calls: list[tuple[int, int, int]] = field(default_factory=list)
    takers: dict[int, _Taker] = field(default_factory=dict)  # id(stream) -> taker
    block: int = 0  # blocks reduced so far: tells a cache entry whether its rows are here

    def span(self, call: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of staged call ``call``."""
        lo = self.calls[call][0]
        return lo, self.calls[call + 1][0] if call + 1 < len(self.calls) else self.n


@dataclass
class _Taker:
    """A stream that saw some of another stream's staged calls (by index), into ``acc``."""

    stream: _Stream
    acc: _Accumulator
    calls: list[int] = field(default_factory=list)


@dataclass
class _CacheEntry:
    ref: weakref.ref  # type: ignore[type-arg]
    version: int
    reductions: list[_Reduction]
    # the tensor's rows staged by a stream that shares: (stream, its stage's block, call)
    staged: tuple[_Stream, int, int] | None = None


@dataclass
class _Pending:
    """One call of a layer whose output gradient the backward pass will deliver."""

    name: str
    x: Tensor  # the layer's input, detached (kept alive until the backward)
    version: int  # x's version counter at the call, to refuse an input changed in place
    masks: Sequence[Tensor]
    shape: tuple[int, ...]  # of the output
    dtype: torch.dtype
    device: torch.device
    seen: bool = False


class _Tap(torch.autograd.Function):
    """Identity on a layer's output ``y`` whose backward hands ``δ = ∂L/∂y`` to a callback.

    ``anchor`` is a scalar leaf requiring grad, so the tap is in the graph even when nothing
    upstream requires grad (frozen weights, integer inputs); differentiating with respect to
    the anchor alone runs every tap's backward without computing any parameter's gradient.
    The output is a copy: a model may modify a layer's output in place, which autograd
    forbids on views made inside a custom Function.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, anchor: Tensor,  # type: ignore[override]
                sink: Callable[[Tensor], None]) -> Tensor:
        ctx.sink = sink
        ctx.anchor_like = (anchor.dtype, anchor.device)
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor  # type: ignore[override]
                 ) -> tuple[Tensor | None, Tensor, None]:
        ctx.sink(grad)
        dtype, device = ctx.anchor_like
        return (grad if ctx.needs_input_grad[0] else None,
                torch.zeros((), dtype=dtype, device=device), None)


class Collector:
    """Forward hooks streaming the inputs/outputs of linear layers into float64 summaries.

    Use as a context manager; hooks are removed on exit, whatever happened inside.

    Parameters
    ----------
    layers : dict
        ``name -> module`` to hook (``nn.Linear`` / ``Conv1D``, or a LoRA layer's base layer).
    sides : sequence of {"input", "output", "gradient"}
        Which statistics to keep.  ``"gradient"`` (needs ``"input"`` too, and a loss: see
        :meth:`run_batch`) runs a backward pass per batch and keeps the moments of the output
        gradients ``δ = ∂L/∂y`` (width d) and the cross-moment ``G = Σ δ·xᵀ`` (d×k).
    precision : {"float64", "mixed"}
        ``"float64"``: everything in float64 (exact to ~1e-13).  ``"mixed"``: float32 rows are
        centred in float32 about a float32 centre, and the ``yᵀy`` GEMM (and the ``δᵀx``
        product of ``G``) runs in float32, in place into a float32 pending sum added to the
        float64 one every 4096 rows (relative error ~1e-7 of the spread, about half the
        time; float64 rows are centred in float64); the sums are float64 either way.
    folds : int
        Number of fold accumulators per stream (batch ``i`` goes to fold ``i % folds``).
    sketch_above : int, optional
        Streams at least this wide keep a k×``sketch_size`` :class:`~covinit.sketch.Sketch`
        instead of the k×k co-moment (bounded memory, approximate top eigenpairs).
    sketch_size, sketch_seed : int
        Sketch width ℓ and the seed of its Gaussian test matrix.
    offsets : mapping, optional
        ``name -> (P (d, m), Q (m, k))``: the layer's output side records ``y + x·Qᵀ·Pᵀ``
        instead of its output ``y``.  :func:`covinit.calibrate` uses it so that statistics
        describe the original ``W0`` after a residual init (base ``W0 − P0·Q0``) and on
        loralib-style layers whose hooked output includes ``c·B·A·x``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 2))
    >>> with Collector({"0": model[0]}, ("input",)) as col:
    ...     col.run_batch(model, torch.randn(5, 3), index=0)
    5
    >>> col.results()[("0", "input")].total.n
    5
    """

    def __init__(self, layers: Mapping[str, nn.Module], sides: Sequence[str] = SIDES, *,
                 precision: str = "float64", folds: int = 1, sketch_above: int | None = None,
                 sketch_size: int = 256, sketch_seed: int = 0,
                 offsets: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> None:
        if isinstance(sides, str):
            sides = (sides,)
        sides = tuple(sides)
        if not sides or any(s not in ALL_SIDES for s in sides) or len(set(sides)) != len(sides):
            raise ValueError(f"sides must be a non-empty subset of {ALL_SIDES}, got {sides!r}")
        if GRADIENT in sides:
            if "input" not in sides:
                raise ValueError(
                    f"sides {sides!r}: the gradient side needs the input side too (G = Σ δ·xᵀ "
                    "is used together with the input statistics); pass sides=('input', "
                    "'gradient')")
            if sketch_above is not None:
                raise ValueError("the gradient side keeps exact d×d and d×k statistics and "
                                 "cannot be combined with sketch_above=; drop one of them")
            # Gradient streams last, so that the rows of a batch are counted in its forward.
            sides = (*(s for s in sides if s != GRADIENT), GRADIENT)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
            raise ValueError(f"folds must be a positive int, got {folds!r}")
        if sketch_above is not None and (isinstance(sketch_above, bool)
                                         or not isinstance(sketch_above, int)
                                         or sketch_above < 1):
            raise ValueError(f"sketch_above must be a positive int or None, got {sketch_above!r}")
        if isinstance(sketch_size, bool) or not isinstance(sketch_size, int) or sketch_size < 1:
            raise ValueError(f"sketch_size must be a positive int, got {sketch_size!r}")
        self.sketch_above, self.sketch_size, self.sketch_seed = (sketch_above, sketch_size,
                                                                 sketch_seed)
        self._omegas: dict[tuple[int, torch.device], Tensor] = {}
        self.layers = dict(layers)
        self.sides = sides
        self.offsets = {name: pq for name, pq in (offsets or {}).items() if name in self.layers}
        self.precision = precision
        self.gemm_dtype = torch.float64 if precision == "float64" else torch.float32
        self.n_folds = folds
        self.shapes = {name: _features(name, m) for name, m in self.layers.items()}
        self._streams: dict[tuple[str, str], _Stream] = {}
        for name, (k, d) in self.shapes.items():
            for side in sides:
                width = k if side == "input" else d
                stream = _Stream(name, side, width, [_Accumulator(width) for _ in range(folds)])
                if sketch_above is not None and width >= sketch_above:
                    if sketch_size > width:
                        raise ValueError(f"sketch_size {sketch_size} exceeds the width {width} "
                                         f"of layer {name!r} {side}")
                    stream.sketches = [Sketch.empty(width, sketch_size, sketch_seed)
                                       for _ in range(folds)]
                self._streams[name, side] = stream
        self._handles: list[Any] = []
        self._blas: AbstractContextManager[None] | None = None
        self._cache: dict[tuple[Any, ...], _CacheEntry] = {}
        self._work = _Workspace()
        self._masks: list[Tensor] = []
        # Encoder-decoder models: the encoder's masks, the layers inside the encoder and the
        # (pointer, shape) of the encoder's output in this batch (the cross-attention input).
        self._encoder_masks: list[Tensor] | None = None
        self._encoder_out: tuple[int, tuple[int, ...]] | None = None
        # (model, its encoder or None, hooked layers inside it): found once per model.
        self._layout: tuple[nn.Module, nn.Module | None, set[str]] | None = None
        self._batch = 0
        self._serial = 0
        self._batches_done = 0
        self._producers: dict[int, _Stream] = {}
        self._borrowed: list[_Accumulator] = []
        self._rows_this_batch = 0
        self._first = next(iter(self._streams), None)
        # Gradient side: G of each layer and fold (allocated at its first δ), the calls
        # waiting for their δ in this batch, and the scalar leaf every tap hangs off.
        self._cross: dict[str, list[Tensor | None]] = {
            name: [None] * folds for name in self.layers} if GRADIENT in sides else {}
        self._pending: list[_Pending] = []
        self._anchor: Tensor | None = None

    # -------------------------------------------------------------- hooks
    def __enter__(self) -> Collector:
        try:
            # the co-moments' products run in SciPy's BLAS: at torch's thread count
            self._blas = blas_threads()
            self._blas.__enter__()
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(
                    self._make_hook(name), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this collector registered (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._blas is not None:
            self._blas.__exit__(None, None, None)
            self._blas = None
        self._cache.clear()
        self._work.clear()
        self._layout = None  # holds the model

    def _make_hook(self, name: str) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> Tensor | None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            masks = self._masks_for(name, x)
            if "input" in self.sides:
                self._observe(name, "input", x, masks)
            if "output" in self.sides:
                seen = output
                if name in self.offsets and isinstance(output, Tensor):
                    seen = _with_offset(output, x, *self.offsets[name])
                self._observe(name, "output", seen, masks)
            if GRADIENT in self.sides:
                return self._tap(name, x, output, masks)
            return None
        return hook

    def _tap(self, name: str, x: Tensor, y: Any, masks: Sequence[Tensor]) -> Tensor:
        """``y`` routed through a :class:`_Tap`, so that the backward delivers its ``δ``."""
        if not isinstance(y, Tensor) or y.shape[-1:] != (self.shapes[name][1],):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"layer {name!r} gradient: expected an output of shape "
                             f"(..., {self.shapes[name][1]}), got {got}")
        if self._anchor is None:
            self._anchor = torch.zeros((), device=y.device, requires_grad=True)
        call = _Pending(name, x.detach(), x._version, masks, tuple(y.shape), y.dtype,
                        y.device)
        self._pending.append(call)
        return _Tap.apply(y, self._anchor, lambda delta: self._observe_gradient(call, delta))

    def _observe_gradient(self, call: _Pending, delta: Tensor) -> None:
        """Stream one call's ``δ`` (same leading shape as its input) into the δ moments and
        ``G += δᵀx`` over the kept positions."""
        call.seen = True
        if call.x._version != call.version:
            raise ValueError(
                f"layer {call.name!r} gradient: its input was modified in place after the "
                "layer ran, so G = Σ δ·xᵀ cannot use it; calibrate the gradient side on a "
                "model that does not overwrite linear layers' inputs")
        self._observe(call.name, GRADIENT, delta, call.masks)
        rows_d = rows_of(delta.detach(), call.masks)  # (n, d)
        if rows_d.shape[0] == 0:
            return
        rows_x = rows_of(call.x, call.masks)  # (n, k)
        fold = self._batch % self.n_folds
        cross = self._cross[call.name][fold]
        if cross is None:
            d, k = rows_d.shape[1], rows_x.shape[1]
            cross = torch.zeros(d, k, dtype=torch.float64, device=rows_d.device)
            self._cross[call.name][fold] = cross
        dtype = self.gemm_dtype
        rows_x = rows_x.to(device=rows_d.device, dtype=dtype)
        if dtype == torch.float64:
            cross.addmm_(rows_d.to(dtype).T, rows_x)
        else:  # float32 product, float64 sum
            cross.add_(rows_d.to(dtype).T @ rows_x)

    def _masks_for(self, name: str, x: Any) -> list[Tensor]:
        """The masks for one call of layer ``name`` on input ``x``."""
        if self._encoder_masks is None:
            return self._masks
        assert self._layout is not None  # set by run_batch before any hook fires
        if name in self._layout[2]:
            return self._encoder_masks
        if (isinstance(x, Tensor) and self._encoder_out is not None
                and (x.data_ptr(), tuple(x.shape)) == self._encoder_out):
            return self._encoder_masks + self._masks  # cross-attention keys/values
        # Decoder positions first; a cross-attention input the encoder hook did not see
        # (encoder_outputs= given) still finds the encoder's mask by its shape.
        return self._masks + self._encoder_masks

    def _observe(self, name: str, side: str, x: Any, masks: Sequence[Tensor]) -> None:
        stream = self._streams[name, side]
        stream.calls += 1
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != stream.k:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"layer {name!r} {side}: expected an activation of shape (..., {stream.k}), "
                f"got {got}"
            )
        if x.is_meta:  # statistics need values; the forward ran on placeholder weights
            raise ValueError(
                f"layer {name!r} {side}: the activation is on the meta device, so the model's "
                "weights were never loaded (created under device='meta' or "
                "init_empty_weights); load or materialise them before calibrating"
            )
        if stream.sketches is not None:
            self._observe_sketch(stream, x, masks)
            return
        acc = stream.accs[self._batch % self.n_folds]
        key = (x.data_ptr(), x.device, x.dtype, tuple(x.shape), x.stride(),
               x.storage_offset())
        # Inference-mode tensors have no version counter, so their reductions are not shared
        # (each layer reduces its own input: correct, only slower for q/k/v).
        cacheable = not x.is_inference()
        entry = self._cache.get(key) if cacheable else None
        if entry is not None and (entry.ref() is None or entry.version != x._version):
            # A dead tensor's memory reused by this one (or the tensor changed in place):
            # drop the stale entry, so the new one is inserted as the most recent instead of
            # inheriting the stale entry's place near the front of the eviction order.
            del self._cache[key]
            entry = None
        red = None
        if entry is not None:
            if entry.staged is not None and self._take_staged(stream, acc, *entry.staged):
                return
            red = next((r for r in entry.reductions if acc.can_take(r)), None)
        if red is None:
            rows = rows_of(x.detach(), masks)
            if rows.shape[0] == 0:
                return
            self._serial += 1
            serial = self._serial  # this call's (a flush below takes later ones)
            # After one full batch every sharing pattern has been seen once: small calls are
            # staged and reduced in blocks, and layers whose reductions nobody reused
            # accumulate in place, without a k×k temporary.
            staging = self._batches_done > 0
            direct = staging and not stream.shares
            if staging and self._stage(stream, acc, rows, serial):
                stream.serials.append(serial)
                if (name, side) == self._first:
                    self._rows_this_batch += rows.shape[0]
                if stream.shares and cacheable:
                    self._remember(key, x, _CacheEntry(
                        weakref.ref(x), x._version, [],
                        (stream, stream.stage.block, len(stream.stage.calls) - 1)))
                return
            self._flush(stream)
            try:
                red = _reduce(rows, acc, self.gemm_dtype, serial, direct=direct,
                              work=self._work)
            except _NonFinite:
                self._raise_non_finite_earliest(stream, rows)
            self._producers[red.serial] = stream
            if not direct:
                acc.take(red, adopt=True)  # the producer keeps the reduction's own s2
                if acc.borrowed:
                    self._borrowed.append(acc)
                if entry is None and cacheable:
                    entry = self._remember(key, x, _CacheEntry(weakref.ref(x), x._version, []))
                if entry is not None:
                    entry.reductions.append(red)
        else:
            self._flush(stream)
            acc.take(red)
            self._producers[red.serial].shares = True
        stream.serials.append(red.serial)
        if (name, side) == self._first:
            self._rows_this_batch += red.n

    def _remember(self, key: tuple[Any, ...], x: Tensor, entry: _CacheEntry) -> _CacheEntry:
        """Cache ``entry`` for the tensor ``x`` under ``key`` (replacing any older one)."""
        self._cache.pop(key, None)
        self._cache[key] = entry
        # Layers sharing an input are called back to back (q, k, v; gate, up), so a few
        # recent entries find them while bounding the temporaries held.
        while len(self._cache) > _CACHE_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        return entry

    def _take_staged(self, stream: _Stream, acc: _Accumulator, owner: _Stream, block: int,
                     call: int) -> bool:
        """Let ``stream`` take ``owner``'s staged call ``call`` (the same tensor) when its
        rows are still staged; False when they were reduced since."""
        stage = owner.stage
        if stage.block != block:
            return False
        taker = stage.takers.setdefault(id(stream), _Taker(stream, acc))
        if taker.acc is not acc:
            return False
        taker.calls.append(call)
        stream.serials.append(stage.calls[call][2])
        if (stream.name, stream.side) == self._first:
            lo, hi = stage.span(call)
            self._rows_this_batch += hi - lo
        return True

    def _stage(self, stream: _Stream, acc: _Accumulator, rows: Tensor, serial: int) -> bool:
        """Copy call ``serial``'s ``rows`` (n, k) into ``stream``'s staging buffer for
        ``acc``, reducing the staged block first when they do not fit or belong elsewhere
        (another fold, dtype or device); False, with nothing staged, for a call too big to
        share a block with another (:data:`_STAGE_MIN_CALLS`)."""
        stage, n = stream.stage, rows.shape[0]
        size = _stage_rows(stream.k)
        if stage.n and (stage.acc is not acc or stage.n + n > size
                        or stage.rows.dtype != rows.dtype or stage.rows.device != rows.device):
            self._flush(stream)
        if n * _STAGE_MIN_CALLS > size:
            return False
        if stage.rows is None or stage.rows.dtype != rows.dtype \
                or stage.rows.device != rows.device:
            stage.rows = torch.empty(size, stream.k, dtype=rows.dtype, device=rows.device)
        stage.rows[stage.n:stage.n + n].copy_(rows)
        stage.calls.append((stage.n, self._batch, serial))
        stage.n += n
        stage.acc = acc
        return True

    def _flush(self, stream: _Stream) -> None:
        """Reduce ``stream``'s staged rows into their accumulator and its takers'; on NaN/Inf
        they stay staged (never merged) and the error names the layer and the batch."""
        stage = stream.stage
        if not stage.n:
            return
        assert stage.rows is not None and stage.acc is not None
        rows, acc = stage.rows[:stage.n], stage.acc
        # rows staged under torch.inference_mode() (so were the sums): write them there too
        with torch.inference_mode(rows.is_inference()):
            self._reduce_staged(stream, rows, acc)
        stage.n, stage.acc, stage.block = 0, None, stage.block + 1
        stage.calls.clear()
        stage.takers.clear()

    def _reduce_staged(self, stream: _Stream, rows: Tensor, acc: _Accumulator) -> None:
        """One reduction of ``stream``'s staged ``rows`` into ``acc``, added to each taker
        that saw every staged call (others reduce the rows of their calls themselves)."""
        stage = stream.stage
        takers = list(stage.takers.values())
        self._serial += 1
        try:
            red = _reduce(rows, acc, self.gemm_dtype, self._serial, direct=not takers,
                          work=self._work)
        except _NonFinite:
            bad = (~torch.isfinite(rows)).any(dim=1).nonzero()
            first = int(bad[0]) if len(bad) else 0  # none: the fourth moment overflowed
            starts = [start for start, _, _ in stage.calls]
            batch = stage.calls[bisect.bisect_right(starts, first) - 1][1]
            # that batch's calls are contiguous: report its rows only
            lo = next(start for start, b, _ in stage.calls if b == batch)
            hi = next((start for start, b, _ in stage.calls if b > batch), stage.n)
            self._raise_non_finite(stream.name, stream.side, rows[lo:hi], batch)
        if takers:
            acc.take(red, adopt=True)
            every = list(range(len(stage.calls)))
            for taker in takers:
                if taker.calls == every and taker.acc.can_take(red):
                    taker.acc.take(red)
                    continue
                # it saw only some of the calls (or re-centred since): reduce its own rows
                part = torch.cat([rows[slice(*stage.span(c))] for c in taker.calls])
                self._serial += 1
                _reduce(part, taker.acc, self.gemm_dtype, self._serial, direct=True,
                        work=self._work)
                taker.stream.serials.append(self._serial)  # no longer the owner's sums
            if acc.s2 is red.s2:  # no other stream reads the reduction's co-moment now
                acc.borrowed = False

    def _observe_sketch(self, stream: _Stream, x: Tensor, masks: Sequence[Tensor]) -> None:
        """Bounded-memory path: merge this call's rows into the stream's :class:`Sketch`."""
        rows = rows_of(x.detach(), masks)
        if rows.shape[0] == 0:
            return
        key = (stream.k, rows.device)
        omega = self._omegas.get(key)
        if omega is None:
            omega = self._omegas[key] = sketch_matrix(stream.k, self.sketch_size,
                                                      self.sketch_seed, rows.device)
        part = Sketch.from_batch(rows, self.sketch_size, self.sketch_seed, omega=omega)
        if not bool(torch.isfinite(part.trace)):
            self._raise_non_finite(stream.name, stream.side, rows, self._batch)
        fold = self._batch % self.n_folds
        assert stream.sketches is not None
        stream.sketches[fold] = stream.sketches[fold].merge(part, omega)
        if (stream.name, stream.side) == self._first:
            self._rows_this_batch += part.n

    def _raise_non_finite_earliest(self, stream: _Stream, rows: Tensor) -> NoReturn:
        """Report ``stream``'s non-finite ``rows`` of this batch, unless a staged layer
        earlier in the forward holds the batch's first one (a NaN spreads downstream):
        reducing the staged rows, which would happen anyway, reports that layer instead."""
        for other in self._streams.values():
            if other is not stream:
                self._flush(other)
        self._raise_non_finite(stream.name, stream.side, rows, self._batch)

    @staticmethod
    def _raise_non_finite(name: str, side: str, rows: Tensor, batch: int) -> NoReturn:
        finite = torch.isfinite(rows)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"layer {name!r} {side} activation at batch {batch} contains "
                f"{bad} NaN/Inf value(s) out of {rows.numel()}; check the model's dtype "
                "(fp16 overflow?) and the data"
            ) from None
        peak = float(rows.abs().max())
        raise ValueError(
            f"layer {name!r} {side} activation at batch {batch}: values up to {peak:.3g} "
            "overflow the float64 fourth-moment statistics"
        ) from None

    # -------------------------------------------------------------- driving
    def run_batch(self, model: nn.Module, batch: Any, index: int,
                  forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                  loss_fn: Callable[[Any, Any], Tensor] | None = None) -> int:
        """Run one batch through ``model`` with the hooks active.

        With the gradient side, the forward runs with gradients enabled (whatever the
        caller's grad mode) and is followed by a backward pass of the batch's loss that only
        reaches the hooked layers' outputs: parameters' ``.grad`` are neither computed nor
        written.  ``δ`` is exactly ``∂L/∂y`` of the loss as computed, so a mean-reduced loss
        makes it scale with 1/(positions in the batch); a layer whose output does not reach
        the loss (or ran under ``torch.no_grad()``) gets ``δ = 0`` at its kept positions.

        Parameters
        ----------
        model : nn.Module
        batch : dict, tuple, list or Tensor
        index : int
            Batch index (selects the fold and appears in error messages).
        forward_fn : callable, optional
            ``forward_fn(model, batch)`` replaces the default call.
        loss_fn : callable, optional
            Gradient side only: ``loss_fn(outputs, batch)`` → scalar loss; default the
            model's own ``outputs.loss`` (a Hugging Face model given ``labels``).

        Returns
        -------
        int
            Rows the first stream kept in this batch (the batch's usable positions).

        Raises
        ------
        ValueError
            Gradient side: no loss (no labels and no ``loss_fn``), a non-scalar loss, a loss
            that does not require grad, or a call under ``torch.inference_mode()``.
        """
        self._batch = index
        self._rows_this_batch = 0
        self._cache.clear()
        if self._layout is None or self._layout[0] is not model:
            encoder = _encoder_of(model)
            inside = {id(m) for m in encoder.modules()} if encoder is not None else set()
            self._layout = (model, encoder, {n for n, m in self.layers.items()
                                             if id(m) in inside})
        encoder = self._layout[1]
        handle = None
        if encoder is None:
            self._masks = batch_masks(batch)
        else:
            self._encoder_masks, self._masks = seq2seq_masks(batch)
            handle = encoder.register_forward_hook(self._see_encoder_output)
        try:
            if GRADIENT in self.sides:
                self._forward_backward(model, batch, index, forward_fn, loss_fn)
            else:
                call_model(model, batch, forward_fn)
        finally:
            self._pending.clear()  # drops the inputs and the graph with this batch
            self._anchor = None
            if handle is not None:
                handle.remove()
            self._encoder_masks, self._encoder_out = None, None
            self._cache.clear()
            self._producers.clear()
            for acc in self._borrowed:  # nothing else holds those reductions any more
                acc.borrowed = False
            self._borrowed.clear()
            self._masks = []
        self._batches_done += 1
        return self._rows_this_batch

    def _forward_backward(self, model: nn.Module, batch: Any, index: int,
                          forward_fn: Callable[[nn.Module, Any], Any] | None,
                          loss_fn: Callable[[Any, Any], Tensor] | None) -> None:
        """Forward with the taps, then ``δ`` of every tapped call (see :meth:`run_batch`)."""
        if torch.is_inference_mode_enabled():
            raise ValueError("the gradient side needs a backward pass, which "
                             "torch.inference_mode() forbids; calibrate outside it")
        with torch.enable_grad():
            outputs = call_model(model, batch, forward_fn)
            loss = _loss_of(outputs, batch, index, loss_fn)
            del outputs  # keep only the loss's graph alive through the backward
            if self._anchor is not None:
                # allow_unused: a loss that reaches no tap leaves the anchor unused
                torch.autograd.grad(loss, [self._anchor], allow_unused=True)
        for call in self._pending:
            if not call.seen:  # the loss does not depend on this call's output
                self._observe_gradient(call, torch.zeros(call.shape, dtype=call.dtype,
                                                         device=call.device))

    # -------------------------------------------------------------- results
    def _see_encoder_output(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output if isinstance(output, Tensor) else output[0]
        self._encoder_out = (hidden.data_ptr(), tuple(hidden.shape))

    def width(self, name: str, side: str) -> int:
        """Width of layer ``name``'s ``side`` rows: k for "input", d for "output" and
        "gradient"."""
        return self._streams[name, side].k

    def calls(self, name: str) -> int:
        """How many times layer ``name`` was called so far."""
        return max(self._streams[name, side].calls for side in self.sides)

    def results(self) -> dict[tuple[str, str], StreamResult]:
        """``(name, side) -> StreamResult``; summaries live on the activations' device."""
        with blas_threads():  # the last staged blocks are reduced here, after the hooks
            for stream in self._streams.values():  # NaN/Inf raises before anything returns
                self._flush(stream)
                stream.stage.rows = None  # the buffer is made again if more batches follow
        out: dict[tuple[str, str], StreamResult] = {}
        for key, stream in self._streams.items():
            if stream.sketches is not None:
                total_sketch = stream.sketches[0]
                for part in stream.sketches[1:]:
                    total_sketch = total_sketch.merge(part)
                out[key] = StreamResult(total_sketch, list(stream.sketches), stream.calls)
                continue
            device = next((a.shift.device for a in stream.accs if a.shift is not None), None)
            folds = [acc.moments(device) for acc in stream.accs]
            total = folds[0] if len(folds) == 1 else _merge_in_order(folds)
            out[key] = StreamResult(total, folds, stream.calls)
            if key[1] == GRADIENT:
                out[key].cross_folds = self._cross_folds(key[0], device)
                out[key].cross = sum_in_order(out[key].cross_folds)
        return out

    def _cross_folds(self, name: str, device: torch.device | None) -> list[Tensor]:
        """``G`` of each fold of layer ``name``, zeros for a fold that saw no position."""
        k, d = self.shapes[name]
        if device is None:  # no δ at all (e.g. this rank read no batch): the layer's device
            device = next(self.layers[name].parameters(), torch.empty(0)).device
        return [torch.zeros(d, k, dtype=torch.float64, device=device) if g is None else g
                for g in self._cross[name]]

    def memory_needs(self) -> dict[tuple[str, str], int]:
        """Bytes of the exact float64 statistics per ``(layer, side)``: per stream, one k×k
        co-moment per fold plus the first batch's temporary, in mixed precision a float32
        pending k×k per fold, and the staging buffer; a gradient side adds its d×k ``G`` per
        fold plus the product's temporary.  Sketched streams are left out (k×ℓ)."""
        needs = {}
        for (name, side), stream in self._streams.items():
            if stream.sketches is not None:
                continue
            needs[name, side] = side_bytes(*self.shapes[name], side, self.n_folds + 1,
                                           self.precision, staging=True)
        return needs

    def shared_inputs(self) -> dict[str, str]:
        """``layer -> owner`` for input streams that saw exactly the same reductions as an
        earlier layer's in every call (q/k/v fed one tensor): their summaries are identical."""
        owners: dict[tuple[int, ...], str] = {}
        shared: dict[str, str] = {}
        if "input" not in self.sides:
            return shared
        for name in self.layers:
            serials = tuple(self._streams[name, "input"].serials)
            if not serials:
                continue
            owner = owners.setdefault(serials, name)
            if owner != name:
                shared[name] = owner
        return shared


def _with_offset(y: Tensor, x: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """``y + x·Qᵀ·Pᵀ`` (…, d), in P's dtype or wider: the output the original
    ``W0 = base + P·Q`` gives, from the hooked output ``y`` (…, d) and its input ``x`` (…, k)."""
    dtype = torch.promote_types(y.dtype, p.dtype)
    return y.to(dtype) + (x.to(dtype) @ q.to(dtype).T) @ p.to(dtype).T


def _merge_in_order(parts: Iterable[Moments]) -> Moments:
    total: Moments | None = None
    for part in parts:
        total = part if total is None else total.merge(part)
    assert total is not None
    return total

