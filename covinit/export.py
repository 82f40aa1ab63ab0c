"""Export adapters that apply to the original, unmodified base model.

A residual strategy (``pissa``, ``cov-svd``, ``cov-minor``, ``two-sided``) replaces a layer's
base weight ``W0`` by ``W0 − c·B0·A0`` and starts the adapter at ``(A0, B0)``.  After
training to ``(A, B)`` the layer computes ``(W0 − c·B0·A0 + c·B·A)·x``.  Shipping that needs
the residual base, unless the step-0 part is folded into the adapter (the conversion PEFT
applies to PiSSA / CorDA adapters)::

    A' = [A; A0]   (2r, k)        B' = [B, −B0]   (d, 2r)

so that ``W0 + c·B'·A' = W0 − c·B0·A0 + c·B·A``.  The rank doubles; ``α`` is adjusted so that
the scaling ``c`` stays the same (``α' = 2α`` for ``α/r``, ``√2·α`` for rsLoRA's ``α/√r``).

**Where the step-0 factors live.**  :func:`covinit.initialize` records, on each layer whose
base it replaces, the offset from the original weight as two *non-persistent buffers*:
``covinit_offset_P`` (d, m) ``= c·B0`` and ``covinit_offset_Q`` (m, k) ``= A0``, so that
``W0 = base + P·Q``.  Buffers move with ``model.to(...)`` but stay out of ``state_dict()``
(the model's checkpoints are unchanged).  Storing ``c·B0`` instead of ``B0`` keeps the
record valid when the rank (and so the scaling convention) of the adapter changes later.
Initializing a recorded layer again starts from the original ``W0 = base + P·Q`` (see
:func:`covinit.initialize`), so a record always describes one residual initialization.
The record lives in memory only: a model reloaded with :func:`covinit.load_lora` from a
file holding a residual base has no record, and :func:`export_lora` refuses that layer.

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

import copy
import json
import math
import os
import sys
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from covinit.adapters import LoRAAdapter, find_adapters, model_fingerprint
from covinit.lora import LoRALinear

__all__ = ["OFFSET_BUFFERS", "export_lora", "record_offset", "residual_offset", "store_offset"]

#: Names of the buffers holding ``P = c·B0`` (d, m) and ``Q = A0`` (m, k).
OFFSET_BUFFERS = ("covinit_offset_P", "covinit_offset_Q")


def residual_offset(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(P (d, m), Q (m, k))`` with ``W0 = base + P·Q``, or None if nothing was recorded."""
    p = getattr(module, OFFSET_BUFFERS[0], None)
    q = getattr(module, OFFSET_BUFFERS[1], None)
    if p is None or q is None:
        return None
    return p, q


def record_offset(adapter: LoRAAdapter, b0: Tensor | None, a0: Tensor | None) -> None:
    """Record that ``adapter``'s base weight just became ``W0 − scaling·b0·a0``.

    Called by :func:`covinit.initialize` when a residual strategy writes a new base, and with
    ``b0 = a0 = None`` when it restores the original ``W0`` (the record is then removed).

    Parameters
    ----------
    adapter : LoRAAdapter
    b0 : Tensor, shape (d, r), or None
    a0 : Tensor, shape (r, k), or None
    """
    module = adapter.module
    if b0 is None or a0 is None:
        for name in OFFSET_BUFFERS:
            module._buffers.pop(name, None)
        return
    store_offset(adapter, b0.detach().to(torch.float64) * adapter.scaling, a0.detach())


def store_offset(adapter: LoRAAdapter, p: Tensor, q: Tensor) -> None:
    """Keep ``W0 = base + P·Q`` on ``adapter``'s module (what :func:`record_offset` computes,
    or what :func:`covinit.load_lora` reads back from a file).

    Parameters
    ----------
    adapter : LoRAAdapter
    p : Tensor, shape (d, m)
    q : Tensor, shape (m, k)
    """
    module = adapter.module
    weight = adapter.base_weight()
    dtype = torch.promote_types(weight.dtype, torch.float32)
    p = p.to(device=weight.device, dtype=dtype)
    q = q.to(device=weight.device, dtype=dtype)
    for name, value in zip(OFFSET_BUFFERS, (p, q), strict=True):
        if name in module._buffers:
            module._buffers[name] = value
        else:
            module.register_buffer(name, value, persistent=False)


def _is_peft(model: nn.Module) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _folded(adapter: LoRAAdapter) -> tuple[Tensor, Tensor, bool]:
    """``(A' (r', k), B' (d, r'), folded?)`` applying to the original base at the same
    scaling."""
    a, b = adapter.get_lora()
    if not adapter.base_replaced:
        return a, b, False
    offset = residual_offset(adapter.module)
    if offset is None:
        if getattr(adapter, "base_rewritten_by_peft", False):
            raise ValueError(
                f"layer {adapter.name!r}: PEFT's init_lora_weights={adapter.peft_init!r} "
                "rewrote its base weight and kept no record of the original; export it with "
                "PEFT's own tools (save_pretrained with "
                "path_initial_model_for_weight_conversion), or covinit.save_lora, which saves "
                "the rewritten base too")
        raise ValueError(
            f"layer {adapter.name!r}: its base weight was replaced, but covinit has no record "
            "of the original weight (replaced outside covinit.initialize, or loaded from a "
            "file written before covinit saved that record); export the adapter with "
            "covinit.save_lora instead, which saves the residual base too")
    p, q = offset
    b_extra = -(p.to(torch.float64) / adapter.scaling)
    a_new = torch.cat([a.to(torch.float64), q.to(torch.float64)], dim=0)  # (r+m, k)
    b_new = torch.cat([b.to(torch.float64), b_extra], dim=1)  # (d, r+m)
    d, k = adapter.out_features, adapter.in_features
    if a_new.shape[0] > min(d, k):
        # A rank above min(d, k) is not a valid LoRA rank (and never needed): B'·A' is a
        # d×k matrix, so its exact SVD refactors it at rank min(d, k).
        u, s, vh = torch.linalg.svd(b_new @ a_new, full_matrices=False)
        root = s.sqrt()
        a_new, b_new = root[:, None] * vh, u * root
    return a_new.to(a.dtype), b_new.to(b.dtype), True


def _rslora(adapter: LoRAAdapter, model: nn.Module) -> bool:
    module = adapter.module
    if isinstance(module, LoRALinear):
        return module.use_rslora
    flags = getattr(module, "use_rslora", None)
    if isinstance(flags, dict):
        return bool(flags.get(getattr(adapter, "adapter_name", ""), False))
    return bool(flags)


def _alpha(scaling: float, rank: int, rslora: bool) -> float:
    return scaling * (math.sqrt(rank) if rslora else rank)


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
    folded = {name: _folded(adapter) for name, adapter in adapters.items()}
    if format == "covinit":
        _write_covinit(model, adapters, folded, os.fspath(path))
    else:
        if not _is_peft(model):
            raise ValueError("format='peft' needs a peft.PeftModel; for covinit or "
                             "loralib-style layers use format='covinit'")
        _write_peft(model, adapters, folded, os.fspath(path))


def _write_covinit(model: nn.Module, adapters: dict[str, LoRAAdapter],
                   folded: dict[str, tuple[Tensor, Tensor, bool]], path: str) -> None:
    from covinit import lora_io

    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, adapter in adapters.items():
        a, b, was_folded = folded[name]
        rank = int(a.shape[0])
        tensors[f"{name}.lora_A"] = a.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = b.detach().cpu().contiguous()
        meta = lora_io._layer_meta(adapter)
        meta["rank"] = rank
        meta["base_replaced"] = False
        meta["offset_rank"] = 0  # the export applies to the original base: no offset
        meta["folded_residual"] = was_folded
        if meta["alpha"] is not None:
            meta["alpha"] = _alpha(adapter.scaling, rank, bool(meta["use_rslora"]))
        layers[name] = meta
    meta_doc = {"format": lora_io.FORMAT, "version": lora_io.VERSION,
                "fingerprint": model_fingerprint(model), "layers": layers}
    save_file(tensors, path, metadata={lora_io._META_KEY: json.dumps(meta_doc)})


def _write_peft(model: nn.Module, adapters: dict[str, LoRAAdapter],
                folded: dict[str, tuple[Tensor, Tensor, bool]], path: str) -> None:
    names = {getattr(adapter, "adapter_name", None) for adapter in adapters.values()}
    if len(names) != 1 or None in names:
        raise ValueError("format='peft' exports one active PEFT LoRA adapter; found "
                         f"{sorted(map(str, names))}")
    adapter_name = names.pop()
    config = copy.deepcopy(model.peft_config[adapter_name])
    from peft import get_peft_model_state_dict

    # PEFT's own state dict carries everything else the adapter needs (modules_to_save such
    # as a classification head, LoRA biases); only the factors are replaced.
    tensors = {key: t.detach().cpu().contiguous() for key, t in
               get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
    rank_pattern: dict[str, int] = dict(config.rank_pattern or {})
    alpha_pattern: dict[str, float] = dict(config.alpha_pattern or {})
    for name, adapter in adapters.items():
        a, b, _ = folded[name]
        rank = int(a.shape[0])
        prefix = f"base_model.model.{name}"
        for key in (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"):
            if key not in tensors:
                raise ValueError(f"PEFT's state dict has no {key!r}; cannot export layer "
                                 f"{name!r}")
        tensors[f"{prefix}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().cpu().contiguous()
        # Explicit per-layer entries: PEFT matches pattern keys as regexes anchored at the
        # end of the module name, so a full name selects exactly that layer.
        rank_pattern[name] = rank
        alpha_pattern[name] = _alpha(adapter.scaling, rank, _rslora(adapter, model))
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    # The exported factors are final values: loading must not run an init (PiSSA, CorDA,
    # EVA) on the fresh base again.
    config.init_lora_weights = True
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
