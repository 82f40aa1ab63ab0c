"""Save and load LoRA adapters as safetensors with JSON metadata (never pickle).

A file holds, for every adapted layer (canonical name, see :func:`covinit.find_adapters`):

* ``"<layer>.lora_A"`` (r, k) and ``"<layer>.lora_B"`` (d, r), in the adapter's dtype;
* ``"<layer>.base_weight"`` (d, k) only if covinit replaced that layer's base weight (a
  residual strategy such as ``pissa``), since the adapter is meaningless without it;
* ``"<layer>.offset_P"`` (d, m) and ``"<layer>.offset_Q"`` (m, k) with it, when covinit knows
  the original weight ``W0 = base + P·Q`` (so :func:`covinit.export_lora` still works after
  a reload);

and, in the safetensors header under the key ``"covinit"``, a JSON document with the format
version, per-layer ``rank``, ``alpha``, ``scaling``, ``use_rslora``, ``dropout``, shapes and
whether the base was replaced, plus the :func:`~covinit.adapters.model_fingerprint` of the
model it came from.  :func:`load_lora` checks all of it before touching the model.

Example
-------
>>> import tempfile, os, torch
>>> from torch import nn
>>> from covinit import add_lora, initialize, save_lora, load_lora
>>> def make():
...     torch.manual_seed(0)
...     return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
>>> model = add_lora(make(), ["0"], rank=2)
>>> _ = initialize(model, strategy="pissa")
>>> path = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
>>> save_lora(model, path)
>>> fresh = load_lora(make(), path)
>>> x = torch.randn(4, 8)
>>> torch.equal(fresh(x), model(x))
True
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from covinit._linear import linear_shape
from covinit.adapters import (
    LoRAAdapter,
    find_adapters,
    find_linear_layers,
    fingerprint_digest,
    model_fingerprint,
    plain_root,
)
from covinit.lora import LoRALinear, scaling_for
from covinit.residual import record_offset, residual_offset, store_offset
from covinit.surgery import lora_state_dict, mark_only_lora_as_trainable, set_submodule

__all__ = ["FORMAT", "VERSION", "layer_metadata", "load_lora", "save_lora", "write_adapter_file"]

FORMAT = "covinit.lora"
VERSION = 1
_META_KEY = "covinit"
_SUFFIXES = ("lora_A", "lora_B", "base_weight")
_OFFSET_SUFFIXES = ("offset_P", "offset_Q")


def _saved_offset(adapter: LoRAAdapter) -> tuple[Tensor, Tensor] | None:
    """The residual offset worth saving: only on a replaced base."""
    return residual_offset(adapter.module) if adapter.base_replaced else None


def layer_metadata(adapter: LoRAAdapter) -> dict[str, Any]:
    """One layer's entry in the file's metadata (see the module docstring), as
    :func:`save_lora` writes it; a writer of other factors edits the entry (rank, α, ...)
    before :func:`write_adapter_file`."""
    module = adapter.module
    own = isinstance(module, LoRALinear)
    a, _ = adapter.get_lora()
    offset = _saved_offset(adapter)
    return {
        "rank": adapter.rank,
        "in_features": adapter.in_features,
        "out_features": adapter.out_features,
        "scaling": float(adapter.scaling),
        # Only covinit's layer records α and rsLoRA; for others α is derived on load as
        # scaling·rank, which reproduces the same scaling.
        "alpha": module.alpha if own else None,
        "use_rslora": module.use_rslora if own else None,
        "dropout": module.dropout if own else 0.0,
        "base_replaced": bool(adapter.base_replaced),
        "offset_rank": int(offset[1].shape[0]) if offset is not None else 0,
        "dtype": str(a.dtype).removeprefix("torch."),
        "kind": type(module).__name__,
    }


def save_lora(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write every LoRA adapter of ``model`` (and residual bases) to a safetensors file.

    Parameters
    ----------
    model : nn.Module
        A model with covinit, PEFT or loralib-style LoRA layers.
    path : str or path-like
        Output file (conventionally ``*.safetensors``); overwritten if it exists.

    Raises
    ------
    ValueError
        If ``model`` has no LoRA layers, or a layer's rank exceeds ``min(d, k)`` (possible
        with PEFT or loralib layers; covinit's own layer cannot hold it).

    Notes
    -----
    A base weight is saved only where it was replaced (``adapter.base_replaced``): by
    :func:`covinit.initialize` with a residual strategy, by :func:`load_lora`, or by PEFT's
    own base-rewriting inits (``init_lora_weights="pissa"``, CorDA, OLoRA, LoftQ, LoRA-GA,
    read from the PEFT model's config).  A base changed by any other means is not detected.
    """
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no LoRA layers to save")
    for name, adapter in adapters.items():
        # PEFT and loralib accept r > min(d, k); covinit's layer (which load_lora builds)
        # does not, so refuse here rather than write a file that cannot be loaded.
        d, k = adapter.out_features, adapter.in_features
        if adapter.rank > min(d, k):
            raise ValueError(f"layer {name!r} (d={d}, k={k}) has rank {adapter.rank} > "
                             f"min(d, k) = {min(d, k)}, which covinit.load_lora cannot "
                             "rebuild; use a rank <= min(d, k), or PEFT's save_pretrained")
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in lora_state_dict(model).items()}
    for name, adapter in adapters.items():
        if (offset := _saved_offset(adapter)) is not None:
            for suffix, t in zip(_OFFSET_SUFFIXES, offset, strict=True):
                tensors[f"{name}.{suffix}"] = t.detach().to("cpu").contiguous()
    layers = {name: layer_metadata(adapter) for name, adapter in adapters.items()}
    write_adapter_file(model, tensors, layers, path)


def write_adapter_file(model: nn.Module, tensors: dict[str, Tensor],
                       layers: dict[str, dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write ``tensors`` with the header :func:`load_lora` reads: format, version, ``model``'s
    fingerprint and the per-layer entries ``layers`` (from :func:`layer_metadata`).

    Parameters
    ----------
    model : nn.Module
        The model the adapters belong to (its fingerprint goes into the header).
    tensors : dict
        ``"<layer>.lora_A"`` (r, k), ``"<layer>.lora_B"`` (d, r) and, per the entries,
        ``"<layer>.base_weight"`` (d, k), ``"<layer>.offset_P"`` (d, m),
        ``"<layer>.offset_Q"`` (m, k); CPU, contiguous.
    layers : dict
        ``name -> entry``; the shapes above must match each entry's ``rank`` /
        ``offset_rank`` (:func:`load_lora` checks them).
    path : str or path-like
        Output file, overwritten if it exists.
    """
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": model_fingerprint(model),
            "layers": layers}
    save_file(tensors, os.fspath(path), metadata={_META_KEY: json.dumps(meta)})


# ---------------------------------------------------------------------- reading and checking
def _read(path: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if _META_KEY not in header:
        raise ValueError(f"{path}: no covinit metadata in the safetensors header; "
                         "was it written by covinit.save_lora?")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: covinit metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: format version {meta.get('version')!r} is not supported "
                         f"(this covinit reads version {VERSION})")
    return meta, tensors


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_file(path: str, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Internal consistency of a file: metadata vs itself and vs the tensors."""
    fp = meta.get("fingerprint")
    layers = meta.get("layers")
    if not isinstance(fp, dict) or not isinstance(fp.get("layers"), dict) or not isinstance(
            layers, dict) or not layers:
        raise ValueError(f"{path}: metadata lacks the 'fingerprint' or 'layers' section")
    if fingerprint_digest(fp["layers"]) != fp.get("sha256"):
        raise ValueError(f"{path}: model fingerprint does not match its checksum (file edited?)")
    expected_keys: set[str] = set()
    for name, lm in layers.items():
        if not isinstance(lm, dict):
            raise ValueError(f"{path}: metadata of layer {name!r} is not an object")
        r, k, d = lm.get("rank"), lm.get("in_features"), lm.get("out_features")
        if not (_int(r) and _int(k) and _int(d) and 0 < r <= min(d, k)):
            raise ValueError(f"{path}: layer {name!r} has invalid rank/shape metadata "
                             f"(rank={r!r}, in_features={k!r}, out_features={d!r})")
        if fp["layers"].get(name) != [d, k]:
            raise ValueError(f"{path}: layer {name!r} is ({d}, {k}) in the layer metadata but "
                             f"{fp['layers'].get(name)} in the model fingerprint")
        scaling = lm.get("scaling")
        if not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(f"{path}: layer {name!r} has invalid scaling {scaling!r}")
        alpha, rs = lm.get("alpha"), lm.get("use_rslora")
        if alpha is not None:
            if not isinstance(alpha, (int, float)) or alpha <= 0 or not isinstance(rs, bool):
                raise ValueError(f"{path}: layer {name!r} has invalid alpha/use_rslora "
                                 f"({alpha!r}, {rs!r})")
            if not math.isclose(scaling_for(alpha, r, rs), scaling, rel_tol=1e-12):
                raise ValueError(f"{path}: layer {name!r}: scaling {scaling} is inconsistent "
                                 f"with alpha={alpha}, rank={r}, use_rslora={rs}")
        dropout = lm.get("dropout", 0.0)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{path}: layer {name!r} has invalid dropout {dropout!r}")
        shapes = {"lora_A": (r, k), "lora_B": (d, r)}
        if lm.get("base_replaced"):
            shapes["base_weight"] = (d, k)
        m = lm.get("offset_rank", 0)  # absent in files written before offsets were saved
        if not _int(m) or m < 0 or (m and not lm.get("base_replaced")):
            raise ValueError(f"{path}: layer {name!r} has invalid offset_rank {m!r}")
        if m:
            shapes.update(zip(_OFFSET_SUFFIXES, ((d, m), (m, k)), strict=True))
        for suffix, shape in shapes.items():
            key = f"{name}.{suffix}"
            expected_keys.add(key)
            if key not in tensors:
                raise ValueError(f"{path}: tensor {key!r} is missing")
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"expected {shape} (rank={r}, d={d}, k={k})")
            if not t.is_floating_point():
                raise ValueError(f"{path}: tensor {key!r} has non-floating dtype {t.dtype}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {key!r} contains NaN or Inf")
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:5]} not described by the metadata")


def _check_model(path: str, meta: dict[str, Any], model: nn.Module, strict: bool) -> None:
    """The file's layers exist in ``model`` with the same shapes (and, if strict, all layers)."""
    ours = model_fingerprint(model)["layers"]
    theirs = meta["fingerprint"]["layers"]
    names = theirs if strict else meta["layers"]
    for name in names:
        if name not in ours:
            raise ValueError(f"{path}: layer {name!r} of the saved model does not exist in this "
                             "model (adapter saved from another model?)")
        if ours[name] != theirs[name]:
            raise ValueError(f"{path}: layer {name!r} has shape {tuple(theirs[name])} in the "
                             f"saved model but {tuple(ours[name])} here")
    if strict:
        missing = [name for name in ours if name not in theirs]
        if missing:
            raise ValueError(f"{path}: this model has linear layer {missing[0]!r} that the saved "
                             "model did not (another model?); pass strict=False to load anyway")


def load_lora(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True,
              ) -> nn.Module:
    """Load an adapter file written by :func:`save_lora` into ``model``, in place.

    Layers that already carry a LoRA adapter (covinit, PEFT or loralib-style) must have the
    saved rank and scaling; plain linear layers are wrapped in :class:`~covinit.LoRALinear`
    first, and then, as :func:`covinit.add_lora` does, every non-LoRA parameter is frozen.
    Saved residual base weights replace the layers' base weights.

    Parameters
    ----------
    model : nn.Module
        The model the file was saved from, or a fresh copy of its base model.
    path : str or path-like
        A file written by :func:`save_lora`.
    strict : bool, default=True
        Require the model's linear layers (names and shapes) to be exactly the saved model's.
        With ``False`` only the adapted layers are compared.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        Unreadable or truncated file, missing or edited metadata, missing, extra or
        wrongly-shaped tensors, a different model, or an adapter with another rank or
        scaling.  Raised before anything in the model changes.
    """
    path = os.fspath(path)
    meta, tensors = _read(path)
    _check_file(path, meta, tensors)
    _check_model(path, meta, model, strict)
    adapters = find_adapters(model)
    linears = find_linear_layers(model)
    for name, lm in meta["layers"].items():
        if name in adapters:
            adapter = adapters[name]
            if adapter.rank != lm["rank"]:
                raise ValueError(f"{path}: layer {name!r} has rank {lm['rank']} in the file but "
                                 f"its adapter in the model has rank {adapter.rank}")
            if not math.isclose(adapter.scaling, lm["scaling"], rel_tol=1e-12):
                raise ValueError(f"{path}: layer {name!r} has scaling {lm['scaling']} in the file "
                                 f"but {adapter.scaling} in the model")
            if getattr(adapter.module, "merged", False):
                raise ValueError(f"{path}: layer {name!r} is merged; unmerge before loading")
        else:
            # _check_model guarantees the name exists with the right shape.
            assert linear_shape(linears[name]) == (lm["out_features"], lm["in_features"])
    wrapped = False
    for name, lm in meta["layers"].items():
        if name not in adapters:
            alpha = lm["alpha"] if lm["alpha"] is not None else lm["scaling"] * lm["rank"]
            rslora = bool(lm["use_rslora"]) if lm["alpha"] is not None else False
            layer = LoRALinear(linears[name], lm["rank"], alpha, lm.get("dropout", 0.0), rslora,
                               name=name)
            set_submodule(plain_root(model), name, layer)
            wrapped = True
    adapters = find_adapters(model)
    for name, lm in meta["layers"].items():
        adapter = adapters[name]
        if lm["base_replaced"]:
            adapter.set_base_weight(tensors[f"{name}.base_weight"])
        adapter.set_lora(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
        record_offset(adapter, None, None)  # a record from before the load is stale
        if lm.get("offset_rank", 0):
            store_offset(adapter, *(tensors[f"{name}.{x}"] for x in _OFFSET_SUFFIXES))
    if wrapped:
        mark_only_lora_as_trainable(model)
    return model
