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

**PEFT's ordinary saving.**  On a ``PeftModel``, :func:`covinit.initialize` also calls
:func:`hook_peft_save`: that instance's ``save_pretrained`` (what ``Trainer`` checkpoints and
``trainer.save_model`` call) writes the folded adapter, and its ``load_adapter`` splits such an
adapter back when resuming the same residual init.  :func:`restore_base` makes the fold
permanent: base ``W0`` again, adapter at rank ``r + m``, so ``disable_adapter()``,
``unload()`` and further adapters see the original weights.

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

import json
import math
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from covinit.adapters import LoRAAdapter, find_adapters, model_fingerprint
from covinit.lora import LoRALinear

__all__ = [
    "OFFSET_BUFFERS",
    "export_lora",
    "hook_peft_save",
    "record_offset",
    "residual_offset",
    "restore_base",
    "store_offset",
    "update_peft_patterns",
]

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


def _folded(adapter: LoRAAdapter, a: Tensor | None = None, b: Tensor | None = None
            ) -> tuple[Tensor, Tensor, bool]:
    """``(A' (r', k), B' (d, r'), folded?)`` applying to the original base at the same
    scaling, from the adapter's current factors or from ``a`` (r, k), ``b`` (d, r) (the
    same layer's factors as PEFT saved them)."""
    if a is None or b is None:
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
        _write_peft(model, adapters, os.fspath(path))


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


def _write_peft(model: nn.Module, adapters: dict[str, LoRAAdapter], path: str) -> None:
    """PEFT's own ``save_pretrained`` (class method: the model's residual save hook is not
    involved) for the active adapter, then :func:`_convert_peft_dir` on what it wrote."""
    adapter_name = _single_adapter_name(adapters)
    type(model).save_pretrained(model, path, selected_adapters=[adapter_name])
    out = path if adapter_name == "default" else os.path.join(path, adapter_name)
    _convert_peft_dir(model, adapters, out)


def _single_adapter_name(adapters: dict[str, LoRAAdapter]) -> str:
    names = {getattr(adapter, "adapter_name", None) for adapter in adapters.values()}
    if len(names) != 1 or None in names:
        raise ValueError("format='peft' exports one active PEFT LoRA adapter; found "
                         f"{sorted(map(str, names))}")
    return str(names.pop())


def _convert_peft_dir(model: nn.Module, adapters: dict[str, LoRAAdapter], out: str) -> None:
    """Rewrite the adapter PEFT just saved in ``out`` so it applies to the original base.

    Each layer's factors are read back from ``adapter_model.safetensors`` (so a
    ``state_dict=`` given to ``save_pretrained`` is respected) and folded with the layer's
    residual record; ``adapter_config.json`` gets per-layer ``rank_pattern`` /
    ``alpha_pattern`` entries and ``init_lora_weights: true`` (the factors are final values:
    loading must not run an init such as PiSSA on the fresh base again), everything else
    PEFT wrote (modules_to_save, auto mapping, base model name) is kept.  The safetensors
    header records, under ``"covinit_folded"``, each folded layer's ``[r, m]`` (trained rank,
    step-0 rank; ``m = 0`` after an SVD refactor) so the file can be split again.
    """
    from safetensors.torch import load_file

    weights = os.path.join(out, "adapter_model.safetensors")
    tensors = load_file(weights)
    config_path = os.path.join(out, "adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    rank_pattern: dict[str, int] = dict(config.get("rank_pattern") or {})
    alpha_pattern: dict[str, float] = dict(config.get("alpha_pattern") or {})
    split: dict[str, list[int]] = {}
    for name, adapter in adapters.items():
        keys = [f"base_model.model.{name}.lora_{x}.weight" for x in ("A", "B")]
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise ValueError(f"PEFT's saved adapter in {out!r} has no {missing[0]!r}; cannot "
                             f"convert layer {name!r}")
        a, b, was_folded = _folded(adapter, tensors[keys[0]], tensors[keys[1]])
        rank = int(a.shape[0])
        tensors[keys[0]], tensors[keys[1]] = a.contiguous(), b.contiguous()
        # Explicit per-layer entries: PEFT matches pattern keys as regexes anchored at the
        # end of the module name, so a full name selects exactly that layer.
        rank_pattern[name] = rank
        alpha_pattern[name] = _alpha(adapter.scaling, rank, _rslora(adapter, model))
        if was_folded:
            r = adapter.rank
            split[name] = [r, rank - r] if rank == r + _offset_rank(adapter) else [rank, 0]
    config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  init_lora_weights=True)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, weights, metadata={"format": "pt", _SPLIT_KEY: json.dumps(split)})


def _offset_rank(adapter: LoRAAdapter) -> int:
    offset = residual_offset(adapter.module)
    return 0 if offset is None else int(offset[1].shape[0])


# ---------------------------------------------------------------------- PEFT's own saving
#: safetensors header key of a converted PEFT adapter: ``{layer: [r, m]}``.
_SPLIT_KEY = "covinit_folded"
#: Attribute of a PeftModel instance naming the adapter its residual records belong to.
_HOOKED = "_covinit_residual_adapter"


def hook_peft_save(model: nn.Module, adapter_name: str) -> bool:
    """Make ``model.save_pretrained`` (and ``model.load_adapter``) of this one PeftModel
    handle the residual init of adapter ``adapter_name``.

    Called by :func:`covinit.initialize` when a residual strategy rewrites base weights of a
    PEFT model.  Only this instance changes (two bound methods in its ``__dict__``; PEFT's
    classes are untouched): its ``save_pretrained`` runs PEFT's own and then rewrites the
    adapter it wrote with the folded factors (see :func:`export_lora`), so
    ``model.save_pretrained(d)``, ``Trainer`` checkpoints and ``trainer.save_model`` all
    write an adapter that ``PeftModel.from_pretrained(untouched_base, d)`` loads with the
    trained model's outputs.  Its ``load_adapter`` (what ``Trainer`` calls to resume from a
    checkpoint) splits such a converted adapter back into the residual model's factors.
    Once no layer holds a residual record (:func:`restore_base`), both are PEFT's own again.

    Returns
    -------
    bool
        Whether ``model`` is a ``PeftModel`` (the hooks are installed); False otherwise.
    """
    if not _is_peft(model):
        return False
    model.__dict__[_HOOKED] = adapter_name
    model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)
    model.__dict__["load_adapter"] = types.MethodType(_load_adapter, model)
    return True


def _residual_adapters(model: nn.Module) -> dict[str, LoRAAdapter] | None:
    """The active adapters while some layer still holds covinit's residual record, else
    None (nothing to convert: PEFT's own save is right)."""
    if not any(residual_offset(module) is not None for module in model.modules()):
        return None
    recorded = model.__dict__.get(_HOOKED)
    adapters = find_adapters(model)
    names = {getattr(adapter, "adapter_name", None) for adapter in adapters.values()}
    if names != {recorded}:
        raise ValueError(
            f"covinit's residual init belongs to PEFT adapter {recorded!r}, but the active "
            f"adapter is {sorted(map(str, names))}: call model.set_adapter({recorded!r}) "
            "before saving, or covinit.restore_base(model) first to put the original base "
            "weights back (then any adapter saves and loads as PEFT's own)")
    return adapters


def _save_pretrained(self: nn.Module, save_directory: str, safe_serialization: bool = True,
                     selected_adapters: list[str] | None = None,
                     save_embedding_layers: str | bool = "auto", is_main_process: bool = True,
                     path_initial_model_for_weight_conversion: str | None = None,
                     **kwargs: Any) -> None:
    """PEFT's ``save_pretrained``, writing adapters that apply to the untouched base."""
    adapters = _residual_adapters(self)
    if adapters is None:
        type(self).save_pretrained(
            self, save_directory, safe_serialization=safe_serialization,
            selected_adapters=selected_adapters, save_embedding_layers=save_embedding_layers,
            is_main_process=is_main_process,
            path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
            **kwargs)
        return
    if path_initial_model_for_weight_conversion is not None:
        raise ValueError(
            "path_initial_model_for_weight_conversion is for PEFT's own PiSSA/CorDA/OLoRA "
            "inits; this model was initialized by covinit, whose save_pretrained already "
            "writes the converted adapter: call save_pretrained(save_directory) without it")
    for name, adapter in adapters.items():
        if getattr(adapter.module, "merged", False):
            raise ValueError(f"layer {name!r} is merged; unmerge it before saving")
    # safetensors always: the converted file is read back and rewritten (never pickle).
    type(self).save_pretrained(
        self, save_directory, safe_serialization=True, selected_adapters=selected_adapters,
        save_embedding_layers=save_embedding_layers, is_main_process=is_main_process,
        **kwargs)
    adapter_name = self.__dict__[_HOOKED]
    if not is_main_process or (selected_adapters is not None
                               and adapter_name not in selected_adapters):
        return
    out = (save_directory if adapter_name == "default"
           else os.path.join(save_directory, adapter_name))
    _convert_peft_dir(self, adapters, out)


def _load_adapter(self: nn.Module, model_id: str | os.PathLike[str],
                  adapter_name: str = "default", *args: Any, **kwargs: Any) -> Any:
    """PEFT's ``load_adapter``; a covinit-converted adapter loaded into the residual
    adapter it came from (``Trainer``'s resume) is split back into its rank-r factors."""
    split = _split_record(os.fspath(model_id), kwargs.get("subfolder"))
    if (split is None or adapter_name != self.__dict__.get(_HOOKED)
            or adapter_name not in self.peft_config):
        return type(self).load_adapter(self, model_id, adapter_name, *args, **kwargs)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _unfold_dir(self, os.fspath(model_id), tmp, split)
        return type(self).load_adapter(self, tmp, adapter_name, *args, **kwargs)


def _split_record(path: str, subfolder: str | None) -> dict[str, list[int]] | None:
    """``{layer: [r, m]}`` from a converted adapter's header, or None (not one, or remote)."""
    from safetensors import safe_open

    weights = os.path.join(path, subfolder or "", "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return None
    with safe_open(weights, framework="pt") as f:
        header = f.metadata() or {}
    return json.loads(header[_SPLIT_KEY]) if _SPLIT_KEY in header else None


def _unfold_dir(model: nn.Module, src: str, dst: str, split: dict[str, list[int]]) -> None:
    """Write into ``dst`` the adapter of ``src`` with each folded layer's ``[A; A0]``,
    ``[B, −B0]`` cut back to ``(A, B)``, after checking that ``(A0, B0)`` is this model's
    residual record (so the rank-r factors mean the same on this model's base)."""
    import shutil

    from safetensors.torch import load_file

    adapters = find_adapters(model)
    tensors = load_file(os.path.join(src, "adapter_model.safetensors"))
    with open(os.path.join(src, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for name, (r, m) in split.items():
        adapter = adapters.get(name)
        offset = None if adapter is None else residual_offset(adapter.module)
        if adapter is None or offset is None or m == 0 or adapter.rank != r:
            raise ValueError(
                f"{src!r}: layer {name!r} holds a covinit-converted adapter (rank {r} + "
                f"{m}), which applies to the original base weights; this model's layer is "
                "not the residual init it came from.  Load it onto an untouched base with "
                "PeftModel.from_pretrained(base, path)")
        ka, kb = (f"base_model.model.{name}.lora_{x}.weight" for x in ("A", "B"))
        a, b = tensors[ka], tensors[kb]
        p, q = (t.to(torch.float64) for t in offset)
        step0 = (-b[:, r:].to(torch.float64) * adapter.scaling, a[r:].to(torch.float64))
        gap = float(torch.linalg.norm(step0[0] @ step0[1] - p @ q) / torch.linalg.norm(p @ q))
        if gap > 1e-3:
            raise ValueError(
                f"{src!r}: layer {name!r}: the adapter's step-0 part differs from this "
                f"model's residual init (relative difference {gap:.2g}); initialize the model "
                "exactly as before (same calibration, strategy and seed) to resume, or load "
                "the adapter onto an untouched base with PeftModel.from_pretrained")
        tensors[ka], tensors[kb] = a[:r].contiguous(), b[:, :r].contiguous()
        config["rank_pattern"][name] = r
        config["alpha_pattern"][name] = _alpha(adapter.scaling, r, _rslora(adapter, model))
    for entry in os.listdir(src):  # anything else PEFT reads (tokenizer files are harmless)
        if os.path.isfile(os.path.join(src, entry)):
            shutil.copy(os.path.join(src, entry), os.path.join(dst, entry))
    with open(os.path.join(dst, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})


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
        a, b, _ = _folded(adapter)  # raises for a replaced base without a record
        p, q = residual_offset(adapter.module)  # type: ignore[misc]
        base = adapter.base_weight()
        w0 = base.to(torch.float64) + p.to(torch.float64) @ q.to(torch.float64)  # (d, k)
        plan.append((adapter, a, b, w0.to(base.dtype)))
    for adapter, a, b, w0 in plan:
        if int(a.shape[0]) != adapter.rank:
            adapter.resize(int(a.shape[0]))
        adapter.set_base_weight(w0, replaced=False)
        record_offset(adapter, None, None)
        adapter.set_lora(a, b)
    update_peft_patterns(model, {adapter.name: adapter for adapter, *_ in plan})
    return [adapter.name for adapter, *_ in plan]


def update_peft_patterns(model: nn.Module, adapters: Mapping[str, LoRAAdapter]) -> None:
    """Write each PEFT layer's rank and α into its config's ``rank_pattern`` /
    ``alpha_pattern`` (keys: full module names), so ``save_pretrained`` reloads them."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    for name, adapter in adapters.items():
        adapter_name = getattr(adapter, "adapter_name", None)
        config = configs.get(adapter_name)
        if config is None:
            continue
        module = adapter.module
        config.rank_pattern = {**(config.rank_pattern or {}), name: adapter.rank}
        config.alpha_pattern = {**(config.alpha_pattern or {}),
                                name: module.lora_alpha[adapter_name]}
