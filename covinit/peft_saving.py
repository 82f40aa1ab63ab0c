"""PEFT's own saving after a residual init: ``save_pretrained``, ``load_adapter``, patterns.

A residual init rewrites base weights, which PEFT's ``save_pretrained`` never writes: the
adapter it saves would need the rewritten base.  On a ``PeftModel``, :func:`covinit.initialize`
calls :func:`hook_peft_save`: that instance's ``save_pretrained`` (what ``Trainer``
checkpoints and ``trainer.save_model`` call) then writes the adapter folded onto the
original base (:func:`covinit.residual.folded_lora`), and its ``load_adapter`` splits such
an adapter back when resuming the same residual init.  :func:`convert_peft_dir` is the
rewrite itself, shared with :func:`covinit.export_lora` (``format="peft"``), and
:func:`update_peft_patterns` keeps a changed per-layer rank and α in PEFT's config so that
``save_pretrained`` reloads it.

Only PEFT's public saving API is used; PEFT's classes are never patched.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from covinit.adapters import LoRAAdapter, find_adapters
from covinit.lora import LoRALinear
from covinit.residual import alpha_for, folded_lora, offset_rank, residual_offset

__all__ = ["convert_peft_dir", "hook_peft_save", "is_peft_model", "update_peft_patterns"]

#: safetensors header key of a converted PEFT adapter: ``{layer: [r, m]}``.
_SPLIT_KEY = "covinit_folded"
#: Attribute of a PeftModel instance naming the adapter its residual records belong to.
_HOOKED = "_covinit_residual_adapter"


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False, without importing PEFT, when PEFT was
    never imported: then no model can be one)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _rslora(adapter: LoRAAdapter) -> bool:
    module = adapter.module
    if isinstance(module, LoRALinear):
        return module.use_rslora
    flags = getattr(module, "use_rslora", None)
    if isinstance(flags, dict):
        return bool(flags.get(getattr(adapter, "adapter_name", ""), False))
    return bool(flags)


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


# ---------------------------------------------------------------------- folding a saved adapter
def _peft_key(name: str, factor: str) -> str:
    return f"base_model.model.{name}.lora_{factor}.weight"


def convert_peft_dir(model: nn.Module, adapters: Mapping[str, LoRAAdapter], out: str) -> None:
    """Rewrite the adapter PEFT just saved in ``out`` so it applies to the original base.

    Each layer's factors are read back from ``adapter_model.safetensors`` (so a
    ``state_dict=`` given to ``save_pretrained`` is respected) and folded with the layer's
    residual record; ``adapter_config.json`` gets per-layer ``rank_pattern`` /
    ``alpha_pattern`` entries and ``init_lora_weights: true`` (the factors are final values:
    loading must not run an init such as PiSSA on the fresh base again), everything else
    PEFT wrote (modules_to_save, auto mapping, base model name) is kept.  The safetensors
    header records, under ``"covinit_folded"``, each folded layer's ``[r, m]`` (trained rank,
    step-0 rank; ``m = 0`` after an SVD refactor) so the file can be split again.

    Parameters
    ----------
    model : nn.Module
        The ``PeftModel`` whose adapter was saved.
    adapters : mapping
        ``name -> LoRAAdapter``: its active adapters (the saved ones).
    out : str
        The folder holding ``adapter_model.safetensors`` and ``adapter_config.json``.

    Raises
    ------
    ValueError
        A layer missing from the saved file, or a replaced base without a record.
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
        keys = [_peft_key(name, x) for x in ("A", "B")]
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise ValueError(f"PEFT's saved adapter in {out!r} has no {missing[0]!r}; cannot "
                             f"convert layer {name!r}")
        a, b, was_folded = folded_lora(adapter, tensors[keys[0]], tensors[keys[1]])
        rank = int(a.shape[0])
        tensors[keys[0]], tensors[keys[1]] = a.contiguous(), b.contiguous()
        # Explicit per-layer entries: PEFT matches pattern keys as regexes anchored at the
        # end of the module name, so a full name selects exactly that layer.
        rank_pattern[name] = rank
        alpha_pattern[name] = alpha_for(adapter.scaling, rank, _rslora(adapter))
        if was_folded:
            r = adapter.rank
            split[name] = [r, rank - r] if rank == r + offset_rank(adapter) else [rank, 0]
    config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                  init_lora_weights=True)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, weights, metadata={"format": "pt", _SPLIT_KEY: json.dumps(split)})


# ---------------------------------------------------------------------- the save hook
def hook_peft_save(model: nn.Module, adapter_name: str) -> bool:
    """Make ``model.save_pretrained`` (and ``model.load_adapter``) of this one PeftModel
    handle the residual init of adapter ``adapter_name``.

    Called by :func:`covinit.initialize` when a residual strategy rewrites base weights of a
    PEFT model.  Only this instance changes (two bound methods in its ``__dict__``; PEFT's
    classes are untouched): its ``save_pretrained`` runs PEFT's own and then rewrites the
    adapter it wrote with the folded factors (:func:`convert_peft_dir`), so
    ``model.save_pretrained(d)``, ``Trainer`` checkpoints and ``trainer.save_model`` all
    write an adapter that ``PeftModel.from_pretrained(untouched_base, d)`` loads with the
    trained model's outputs.  Its ``load_adapter`` (what ``Trainer`` calls to resume from a
    checkpoint) splits such a converted adapter back into the residual model's factors.
    Once no layer holds a residual record (:func:`covinit.restore_base`), both are PEFT's
    own again.

    Returns
    -------
    bool
        Whether ``model`` is a ``PeftModel`` (the hooks are installed); False otherwise.
    """
    if not is_peft_model(model):
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
    adapters = find_adapters(model, dora=True)  # reads only: the magnitude is saved as is
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
    convert_peft_dir(self, adapters, out)


# ---------------------------------------------------------------------- resuming
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

    adapters = find_adapters(model, dora=True)  # reads only: the magnitude is saved as is
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
        ka, kb = _peft_key(name, "A"), _peft_key(name, "B")
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
        config["alpha_pattern"][name] = alpha_for(adapter.scaling, r, _rslora(adapter))
    for entry in os.listdir(src):  # anything else PEFT reads (tokenizer files are harmless)
        if os.path.isfile(os.path.join(src, entry)):
            shutil.copy(os.path.join(src, entry), os.path.join(dst, entry))
    with open(os.path.join(dst, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
