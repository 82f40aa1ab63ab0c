"""Export adapters that apply to the original, unmodified base model.

A residual strategy (``pissa``, ``cov-svd``, ``cov-minor``, ``two-sided``) replaces a layer's
base weight ``W0`` by ``W0 − c·B0·A0`` and starts the adapter at ``(A0, B0)``.  After
training to ``(A, B)`` the layer computes ``(W0 − c·B0·A0 + c·B·A)·x``.  Shipping that needs
the residual base, unless the step-0 part is folded into the adapter (the conversion PEFT
applies to PiSSA / CorDA adapters)::

    A' = [A; A0]   (2r, k)        B' = [B, −B0]   (d, 2r)

so that ``W0 + c·B'·A' = W0 − c·B0·A0 + c·B·A``.  The rank doubles; ``α`` is adjusted so that
the scaling ``c`` stays the same (``α' = 2α`` for ``α/r``, ``√2·α`` for rsLoRA's ``α/√r``).

The step-0 factors come from the record :func:`covinit.initialize` keeps on each layer whose
base it replaces (:mod:`covinit.residual`: ``W0 = base + P·Q``, ``P = c·B0``, ``Q = A0``).
A layer whose base was replaced without such a record (outside covinit, or loaded from a
file written before covinit saved records) cannot be exported: :func:`export_lora` refuses it.

**PEFT's ordinary saving.**  On a ``PeftModel``, :func:`covinit.initialize` also makes that
instance's ``save_pretrained`` write the folded adapter (:mod:`covinit.peft_saving`).
:func:`restore_base` makes the fold permanent: base ``W0`` again, adapter at rank ``r + m``,
so ``disable_adapter()``, ``unload()`` and further adapters see the original weights.

Example
-------
>>> import os, tempfile, torch
>>> from torch import nn
>>> from covinit import add_lora, export_lora, initialize, load_lora
>>> def make():
...     torch.manual_seed(0)
...     return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
>>> model = add_lora(make(), ["0"], rank=2)
>>> _ = initialize(model, strategy="pissa")
>>> with torch.no_grad():
...     _ = model[0].lora_B.add_(0.1)    # stands for training
>>> path = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
>>> export_lora(model, path)
>>> fresh = load_lora(make(), path)      # the original base, untouched
>>> fresh[0].rank
4
>>> x = torch.randn(4, 8)
>>> torch.allclose(fresh(x), model(x), atol=1e-5)
True
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import Tensor, nn

from covinit.adapters import LoRAAdapter, find_adapters
from covinit.lora_io import layer_metadata, write_adapter_file
from covinit.peft_saving import convert_peft_dir, is_peft_model, update_peft_patterns
from covinit.residual import (
    alpha_for,
    folded_lora,
    original_weight,
    record_offset,
)

__all__ = ["export_lora", "restore_base"]

def export_lora(model: nn.Module, path: str | os.PathLike[str], *,
                format: str = "covinit") -> None:
    """Write ``model``'s adapters so that they apply to the original base weights.

    Layers a residual strategy initialized get rank ``r + m`` (``2r`` after one
    initialization) with ``A' = [A; A0]``, ``B' = [B, −B0]`` and the same scaling (where
    ``r + m > min(d, k)`` the product is refactored exactly by an SVD at rank
    ``min(d, k)``); other layers are written as they are.  No base weight is written.

    Parameters
    ----------
    model : nn.Module
        A model with covinit, PEFT or loralib-style LoRA layers, e.g. after
        ``covinit.initialize(model, calibration, strategy="cov-svd")`` and training.
    path : str or path-like
        ``format="covinit"``: a safetensors file for :func:`covinit.load_lora` (onto a fresh
        base model, whose plain linear layers it wraps).  ``format="peft"``: a directory
        with ``adapter_model.safetensors`` and ``adapter_config.json`` for
        ``peft.PeftModel.from_pretrained(fresh_base, path)``.
    format : {"covinit", "peft"}, default="covinit"
        ``"peft"`` needs a ``peft.PeftModel``; per-layer ranks and alphas are written to the
        config's ``rank_pattern`` / ``alpha_pattern``, and everything else PEFT saves
        (``modules_to_save`` such as a classifier head) is written as PEFT writes it.
        ``"covinit"`` holds the LoRA factors only.

    Raises
    ------
    ValueError
        No LoRA layers; a replaced base without a record of the original weight; a merged
        layer; ``format="peft"`` on a model that is not a ``PeftModel``; an unknown format.
    """
    if format not in ("covinit", "peft"):
        raise ValueError(f"format must be 'covinit' or 'peft', got {format!r}")
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no LoRA layers to export")
    for name, adapter in adapters.items():
        if getattr(adapter.module, "merged", False):
            raise ValueError(f"layer {name!r} is merged; unmerge it before exporting")
    sharded = any(getattr(adapter, "sharded", False) for adapter in adapters.values())
    if sharded and format == "peft":
        raise ValueError("format='peft' on an FSDP2-sharded model (fully_shard): covinit "
                         "exports sharded models with format='covinit' only (call it on every "
                         "rank; rank 0 writes the file), or export before fully_shard")
    folded = {name: folded_lora(adapter) for name, adapter in adapters.items()}
    if format == "covinit":
        # Sharded: every rank gathers the factors (collectives), rank 0 writes the file.
        _write_covinit(model, adapters, folded, os.fspath(path),
                       write=not sharded or dist.get_rank() == 0)
    else:
        if not is_peft_model(model):
            raise ValueError("format='peft' needs a peft.PeftModel; for covinit or "
                             "loralib-style layers use format='covinit'")
        _write_peft(model, adapters, os.fspath(path))


def _write_covinit(model: nn.Module, adapters: dict[str, LoRAAdapter],
                   folded: dict[str, tuple[Tensor, Tensor, bool]], path: str, *,
                   write: bool = True) -> None:
    tensors: dict[str, Tensor] = {}
    layers = {}
    for name, adapter in adapters.items():
        a, b, was_folded = folded[name]
        rank = int(a.shape[0])
        tensors[f"{name}.lora_A"] = a.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = b.detach().cpu().contiguous()
        meta = layer_metadata(adapter)
        meta["rank"] = rank
        meta["base_replaced"] = False
        meta["offset_rank"] = 0  # the export applies to the original base: no offset
        meta["folded_residual"] = was_folded
        if meta["alpha"] is not None:
            meta["alpha"] = alpha_for(adapter.scaling, rank, bool(meta["use_rslora"]))
        layers[name] = meta
    if write:
        write_adapter_file(model, tensors, layers, path)


def _write_peft(model: nn.Module, adapters: dict[str, LoRAAdapter], path: str) -> None:
    """PEFT's own ``save_pretrained`` (class method: the model's residual save hook is not
    involved) for the active adapter, then :func:`~covinit.peft_saving.convert_peft_dir` on
    what it wrote."""
    adapter_name = _single_adapter_name(adapters)
    type(model).save_pretrained(model, path, selected_adapters=[adapter_name])
    out = path if adapter_name == "default" else os.path.join(path, adapter_name)
    convert_peft_dir(model, adapters, out)


def _single_adapter_name(adapters: dict[str, LoRAAdapter]) -> str:
    names = {getattr(adapter, "adapter_name", None) for adapter in adapters.values()}
    if len(names) != 1 or None in names:
        raise ValueError("format='peft' exports one active PEFT LoRA adapter; found "
                         f"{sorted(map(str, names))}")
    return str(names.pop())


# ---------------------------------------------------------------------- restoring W0
def restore_base(model: nn.Module) -> list[str]:
    """Put the original base weights back, folding each residual init into its adapter.

    Every layer a residual strategy initialized gets ``base = W0`` (``base + P·Q``,
    computed in float64 and rounded to the weight's dtype once) and the adapter
    ``A' = [A; A0]``, ``B' = [B, −B0]`` of rank ``r + m`` at the same scaling — the factors
    :func:`export_lora` writes — so the model computes the same function, while
    ``disable_adapter()``, ``unload()``, a second adapter, ``merge_and_unload()`` and PEFT's
    ordinary ``save_pretrained`` all see the untouched ``W0``.  The residual record is
    dropped.  PEFT models get per-layer ``rank_pattern`` / ``alpha_pattern`` entries.

    Parameters
    ----------
    model : nn.Module
        A model with covinit, PEFT or loralib-style LoRA layers (for PEFT, the residual
        adapter must be the active one).

    Returns
    -------
    list of str
        The restored layers (empty if no layer held a residual init).

    Raises
    ------
    ValueError
        No LoRA layers; a merged layer; a replaced base without a record of the original
        weight (e.g. PEFT's own ``init_lora_weights="pissa"``).

    Notes
    -----
    The restored adapters have new ``lora_A`` / ``lora_B`` parameters of rank ``r + m``:
    create the optimizer afterwards (typically: train, then restore before serving or
    adding adapters).  In fp32 the function changes by rounding only (~1e-7 relative); in
    bf16 by one rounding of ``W0`` and of the wider factors.  Dropout, when training, now
    also applies to the ``A0`` rows.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from covinit import add_lora, initialize, restore_base
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = add_lora(nn.Sequential(nn.Linear(8, 16)), ["0"], rank=2)
    >>> w0 = model[0].base_layer.weight.detach().clone()
    >>> _ = initialize(model, strategy="pissa")
    >>> x = torch.randn(4, 8)
    >>> before = model(x)
    >>> restore_base(model)
    ['0']
    >>> model[0].rank, torch.allclose(model[0].base_layer.weight, w0, atol=1e-6)
    (4, True)
    >>> torch.allclose(model(x), before, atol=1e-5)
    True
    """
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no LoRA layers to restore")
    plan: list[tuple[LoRAAdapter, Tensor, Tensor, Tensor]] = []
    for name, adapter in adapters.items():
        if not adapter.base_replaced:
            continue
        if getattr(adapter.module, "merged", False):
            raise ValueError(f"layer {name!r} is merged; unmerge it before restoring its base")
        a, b, _ = folded_lora(adapter)  # raises for a replaced base without a record
        plan.append((adapter, a, b, original_weight(adapter).to(adapter.base_weight().dtype)))
    for adapter, a, b, w0 in plan:
        if int(a.shape[0]) != adapter.rank:
            adapter.resize(int(a.shape[0]))
        adapter.set_base_weight(w0, replaced=False)
        record_offset(adapter, None, None)
        adapter.set_lora(a, b)
    update_peft_patterns(model, {adapter.name: adapter for adapter, *_ in plan})
    return [adapter.name for adapter, *_ in plan]
