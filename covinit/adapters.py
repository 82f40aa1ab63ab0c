"""One protocol for reading and writing any LoRA layer, whoever implemented it.

Init strategies produce ``A``, ``B`` and maybe a residual base weight; this module writes
them into covinit's :class:`~covinit.lora.LoRALinear`, PEFT's ``LoraLayer`` (``lora.Linear``,
including ``Conv1D`` bases with ``fan_in_fan_out``) or loralib-style layers without the
strategies knowing which.  All shapes use ``nn.Linear`` orientation: the base weight is
``(d, k)`` = (out_features, in_features), ``A`` is ``(r, k)`` and ``B`` is ``(d, r)``.

Layers are named by their **canonical name**: the qualified name the layer has in the plain,
un-adapted model.  A PEFT model's ``base_model.model.`` prefix is dropped and wrappers are not
descended into, so ``bert.encoder.layer.0.attention.self.query`` names the same layer in the
plain model, after :func:`covinit.add_lora` and after ``peft.get_peft_model``.

PEFT is imported only if the model could contain PEFT layers (``peft`` already imported), so
covinit works without it.

Sharded models (FSDP2 ``fully_shard``): :func:`find_adapters` reshards the model's FSDP modules
first, so adapters hold the ``DTensor`` parameters; reads all-gather them and writes scatter
rank 0's full tensor (:mod:`covinit.distributed`), so every rank must make the same calls in
the same order.  Changing a rank (new parameters FSDP does not manage) and DoRA's magnitude
are refused on sharded layers.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from covinit._bnb import QuantizedBase, canonical_4bit, quantized_kind
from covinit._linear import is_linear, linear_shape
from covinit.distributed import copy_full_, full_tensor, is_sharded, reshard_fsdp
from covinit.lora import LoRALinear

__all__ = [
    "PEFT_BASE_REWRITING_INITS",
    "LoRAAdapter",
    "check_original_base",
    "describe_skipped",
    "factors_digest",
    "find_adapters",
    "find_linear_layers",
    "find_skipped_adapters",
    "fingerprint_digest",
    "is_inert",
    "mark_initialized",
    "matches_initialized",
    "model_fingerprint",
    "plain_root",
    "quantized_kind",
    "skipped_warning",
]

# Attribute set on PEFT / loralib modules whose base weight covinit replaced (covinit's own
# layer has a real ``base_replaced`` attribute); save_lora uses it to decide what to save.
_REPLACED_FLAG = "_covinit_base_replaced"
# Attribute holding ``{adapter name: factors_digest}`` of the factors covinit's last init wrote
# (a plain attribute: it follows deepcopy, not state_dict or save_pretrained).
_INIT_DIGEST = "_covinit_init_digest"

#: PEFT ``init_lora_weights`` values (prefixes) that rewrite the base weight to
#: ``W0 − c·B0·A0`` when PEFT creates the adapter (checked against PEFT 0.21's
#: ``LoraLayer.update_layer``).  Neither PEFT nor covinit keeps W0 afterwards.
PEFT_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@runtime_checkable
class LoRAAdapter(Protocol):
    """What an init strategy needs from one LoRA layer.

    Attributes
    ----------
    name : str
        Canonical layer name.
    module : nn.Module
        The adapted layer itself (the wrapper).
    base_layer : nn.Module
        The module whose forward computes ``W0·x (+ bias)``: hook it to collect the layer's
        inputs and outputs.  For loralib-style layers, which compute base and adapter in one
        module, this is the layer itself, so its outputs include ``scaling·B·A·x``.
    in_features, out_features : int
        ``k`` and ``d``.
    rank : int
        ``r``.
    scaling : float
        LoRA's output scale (α/r or α/√r).
    base_replaced : bool
        Whether :meth:`set_base_weight` has replaced ``W0`` through covinit.
    """

    name: str
    module: nn.Module
    base_layer: nn.Module
    in_features: int
    out_features: int
    rank: int
    scaling: float
    base_replaced: bool

    def base_weight(self) -> Tensor:
        """Base weight ``(d, k)``: a detached view (transposed if stored (k, d)); don't mutate.
        For a sharded (FSDP2) layer, a gathered copy."""
        ...

    def set_base_weight(self, weight: Tensor, replaced: bool = True) -> None:
        """Overwrite the base weight in place from a ``(d, k)`` tensor (dtype/device kept).

        ``replaced=False`` marks the write as a restore of the original ``W0`` (so
        :func:`covinit.save_lora` need not store it)."""
        ...

    def get_lora(self) -> tuple[Tensor, Tensor]:
        """Copies of ``(A (r, k), B (d, r))``."""
        ...

    def set_lora(self, a: Tensor, b: Tensor) -> None:
        """Write ``A (r, k)``, ``B (d, r)`` in place (dtype/device of the parameters kept)."""
        ...

    def resize(self, rank: int) -> None:
        """Change the rank, keeping :attr:`scaling` (α adjusted); A, B become new parameters
        (A Kaiming-uniform, B = 0), so the layer computes ``W0·x`` until they are set."""
        ...


# ---------------------------------------------------------------------- shared helpers
def _check_new_rank(name: str, rank: object, d: int, k: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(d, k):
        raise ValueError(f"cannot resize layer {name!r} (d={d}, k={k}) to rank {rank!r}; "
                         f"allowed: 1 <= rank <= {min(d, k)}")


def _check_shape(name: str, label: str, value: Tensor, expected: tuple[int, ...]) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{label} for layer {name!r} must be a torch.Tensor, "
                        f"got {type(value).__name__}")
    if tuple(value.shape) != expected:
        raise ValueError(f"{label} for layer {name!r} must have shape {expected}, "
                         f"got {tuple(value.shape)}")


def _plain_weight(name: str, weight: object) -> Tensor:
    """The base weight if it is a plain floating tensor we can write into."""
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        raise TypeError(
            f"layer {name!r}: the base weight is {type(weight).__name__} "
            f"({getattr(weight, 'dtype', '?')}); covinit reads and writes plain floating-point "
            "2-D weights and bitsandbytes Linear4bit / Linear8bitLt bases only (other quantized "
            "bases are not supported)"
        )
    return weight


class _ParamAdapter:
    """Adapter over a base weight and two parameters ``A (r, k)``, ``B (d, r)``.

    Subclasses say where these live.  ``transposed`` means the base weight is stored
    ``(k, d)`` (Conv1D / ``fan_in_fan_out``).
    """

    def __init__(self, name: str, module: nn.Module, base_layer: nn.Module, weight: Tensor,
                 lora_a: Tensor, lora_b: Tensor, scaling: float, transposed: bool) -> None:
        self.name = name
        self.module = module
        self.base_layer = base_layer
        # A bitsandbytes base is read dequantized and written re-quantized (QuantizedBase).
        self._quant = QuantizedBase(name, base_layer) if quantized_kind(base_layer) else None
        self._weight = weight if self._quant else _plain_weight(name, weight)
        self._a = lora_a
        self._b = lora_b
        self.scaling = float(scaling)
        self._transposed = bool(transposed)
        self.rank, self.in_features = (int(s) for s in lora_a.shape)
        self.out_features = int(lora_b.shape[0])
        stored = (self.in_features, self.out_features) if transposed else (
            self.out_features, self.in_features)
        shape = self._quant.shape if self._quant else tuple(weight.shape)
        if tuple(lora_b.shape) != (self.out_features, self.rank) or shape != stored:
            raise ValueError(
                f"layer {name!r}: inconsistent LoRA shapes: base weight {tuple(weight.shape)} "
                f"(transposed={transposed}), A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}"
            )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, d={self.out_features}, "
                f"k={self.in_features}, rank={self.rank}, scaling={self.scaling:g})")

    @property
    def base_replaced(self) -> bool:
        return bool(getattr(self.module, _REPLACED_FLAG, False))

    def _check_unmerged(self, action: str) -> None:
        if getattr(self.module, "merged", False):
            raise ValueError(f"cannot {action} layer {self.name!r} while its adapter is merged "
                             "into the base weight; unmerge it first")

    @property
    def sharded(self) -> bool:
        """Whether the factors are FSDP2 shards (``DTensor``)."""
        return is_sharded(self._a) or is_sharded(self._weight)

    def _check_unsharded(self, action: str) -> None:
        if self.sharded:
            raise ValueError(
                f"cannot {action} layer {self.name!r} (d={self.out_features}, "
                f"k={self.in_features}, rank={self.rank}): its parameters are FSDP2 shards "
                "(DTensor) and new LoRA parameters would not be sharded by fully_shard; keep "
                "the ranks fixed (no rank_budget=; restore_base changes ranks too), or "
                "calibrate and initialize before fully_shard")

    def base_weight(self) -> Tensor:
        self._check_unmerged("read the base weight of")
        if self._quant:
            return self._quant.read()
        w = full_tensor(self._weight)
        return w.T if self._transposed else w

    def set_base_weight(self, weight: Tensor, replaced: bool = True) -> None:
        self._check_unmerged("set the base weight of")
        _check_shape(self.name, "base weight", weight, (self.out_features, self.in_features))
        if self._quant:
            self._quant.write(weight)
        else:
            copy_full_(self._weight, weight.T if self._transposed else weight)
        setattr(self.module, _REPLACED_FLAG, replaced)

    def get_lora(self) -> tuple[Tensor, Tensor]:
        return full_tensor(self._a).clone(), full_tensor(self._b).clone()

    def set_lora(self, a: Tensor, b: Tensor) -> None:
        self._check_unmerged("set the LoRA factors of")
        _check_shape(self.name, "LoRA A", a, (self.rank, self.in_features))
        _check_shape(self.name, "LoRA B", b, (self.out_features, self.rank))
        copy_full_(self._a, a)
        copy_full_(self._b, b)


class _CovinitAdapter(_ParamAdapter):
    """covinit's own :class:`LoRALinear` (delegates so its own checks and flags apply; a
    sharded layer is read and written through :mod:`covinit.distributed` instead, since
    :class:`LoRALinear` copies into plain tensors only)."""

    def __init__(self, name: str, layer: LoRALinear) -> None:
        super().__init__(name, layer, layer.base_layer, layer.base_layer.weight, layer.lora_A,
                         layer.lora_B, layer.scaling, layer.fan_in_fan_out)
        self._layer = layer

    @property
    def base_replaced(self) -> bool:
        return self._layer.base_replaced

    def base_weight(self) -> Tensor:
        self._check_unmerged("read the base weight of")
        return super().base_weight() if self.sharded else self._layer.base_weight()

    def set_base_weight(self, weight: Tensor, replaced: bool = True) -> None:
        _check_shape(self.name, "base weight", weight, (self.out_features, self.in_features))
        if not self.sharded:
            self._layer.set_base_weight(weight, replaced)
            return
        self._check_unmerged("set the base weight of")
        copy_full_(self._weight, weight.T if self._transposed else weight)
        self._layer.base_replaced = replaced

    def set_lora(self, a: Tensor, b: Tensor) -> None:
        _check_shape(self.name, "LoRA A", a, (self.rank, self.in_features))
        _check_shape(self.name, "LoRA B", b, (self.out_features, self.rank))
        if self.sharded:
            super().set_lora(a, b)
        else:
            self._layer.set_lora(a, b)

    def resize(self, rank: int) -> None:
        self._check_unsharded("resize")
        self._layer.resize(rank)
        self._a, self._b, self.rank = self._layer.lora_A, self._layer.lora_B, self._layer.rank


class _PeftAdapter(_ParamAdapter):
    """PEFT ``lora.Linear``, for its (single) active adapter; ``peft_init`` is its config's
    ``init_lora_weights`` (None when the config is not reachable).

    With ``dora=True`` a DoRA adapter is accepted (see :func:`find_adapters`): PEFT's DoRA
    layer computes ``diag(m / ‖W + s·B·A‖_row)·(W + s·B·A)·x + bias``, which is plain LoRA's
    ``(W + s·B·A)·x + bias`` exactly when the magnitude ``m`` equals those row norms — what
    PEFT sets when it creates the adapter.  Every write through this adapter (base, factors,
    rank) therefore recomputes ``m`` from the new ``W``, ``B``, ``A`` with PEFT's own routines,
    so a strategy's step-0 promise holds for DoRA as for LoRA.
    """

    def __init__(self, name: str, layer: nn.Module, adapter: str, peft_init: object = None,
                 dora: bool = False) -> None:
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        is_dora = _is_dora_variant(variant) and adapter in layer.lora_magnitude_vector
        if variant is not None or layer.use_dora.get(adapter, False):
            if not is_dora:
                raise ValueError(
                    f"PEFT layer {name!r}: adapter {adapter!r} is the LoRA variant "
                    f"{type(variant).__name__ if variant is not None else 'DoRA'}, whose "
                    "output is not base + scaling·B·A; covinit initializes plain LoRA and DoRA "
                    "only")
            if not dora:
                raise ValueError(
                    f"PEFT layer {name!r}: adapter {adapter!r} is a DoRA adapter; this "
                    "operation reads or writes A, B and the base only, not DoRA's magnitude "
                    "vector. covinit.calibrate / covinit.initialize handle DoRA; save a DoRA "
                    "model with PEFT's save_pretrained")
        base = layer.get_base_layer()
        super().__init__(name, layer, base, base.weight, layer.lora_A[adapter].weight,
                         layer.lora_B[adapter].weight, layer.scaling[adapter],
                         bool(getattr(layer, "fan_in_fan_out", False)))
        if is_dora and self.sharded:
            raise ValueError(
                f"PEFT layer {name!r}: adapter {adapter!r} is a DoRA adapter under FSDP2 "
                "fully_shard; covinit does not recompute DoRA's magnitude vector on sharded "
                "parameters. Calibrate and initialize before fully_shard (the statistics "
                "merge over ranks without it), then shard the model")
        if is_dora and self._quant:
            raise ValueError(
                f"PEFT layer {name!r}: adapter {adapter!r} is a DoRA adapter over a "
                f"bitsandbytes {self._quant.bits}-bit base; covinit does not recompute DoRA's "
                "magnitude over a quantized base. Use plain LoRA (use_dora=False) on quantized "
                "bases")
        self.adapter_name = adapter
        self.peft_init = peft_init
        self.dora = is_dora

    def magnitude(self) -> Tensor | None:
        """DoRA's magnitude vector ``m`` (d,) (a detached view), or None for plain LoRA."""
        return self.module.lora_magnitude_vector[self.adapter_name].weight.detach() \
            if self.dora else None

    def dora_row_norms(self) -> Tensor:
        """``‖W + s·B·A‖`` per output row (d,), computed as PEFT's DoRA forward computes it."""
        layer, name = self.module, self.adapter_name
        dora = layer.lora_magnitude_vector[name]
        with torch.no_grad():
            # get_lora_weight is what DoRA's forward uses, so m / norm is exactly 1 there.
            lora_weight = dora.get_lora_weight(lora_A=layer.lora_A[name],
                                               lora_B=layer.lora_B[name])
            return dora.get_weight_norm(weight=self._weight.detach(),
                                        lora_weight=lora_weight.detach(), scaling=self.scaling)

    def _refresh_magnitude(self) -> None:
        if not self.dora:
            return
        dora = self.module.lora_magnitude_vector[self.adapter_name]
        norm = self.dora_row_norms()
        with torch.no_grad():
            dora.weight.copy_(norm)
        dora._cache_clear()  # PEFT caches norms in eval mode when its caching is enabled

    def set_base_weight(self, weight: Tensor, replaced: bool = True) -> None:
        super().set_base_weight(weight, replaced)
        self._refresh_magnitude()

    def set_lora(self, a: Tensor, b: Tensor) -> None:
        super().set_lora(a, b)
        self._refresh_magnitude()

    @property
    def base_rewritten_by_peft(self) -> bool:
        """Whether PEFT's own init replaced the base weight (so W0 is unknown)."""
        init = self.peft_init
        return isinstance(init, str) and init.lower().startswith(PEFT_BASE_REWRITING_INITS)

    @property
    def base_replaced(self) -> bool:
        return super().base_replaced or self.base_rewritten_by_peft

    def resize(self, rank: int) -> None:
        self._check_unmerged("resize")
        self._check_unsharded("resize")
        layer, name = self.module, self.adapter_name
        _check_new_rank(self.name, rank, self.out_features, self.in_features)
        old_a, old_b = layer.lora_A[name], layer.lora_B[name]
        new_a = nn.Linear(self.in_features, rank, bias=False)
        new_b = nn.Linear(rank, self.out_features, bias=old_b.bias is not None)
        new_a.to(dtype=old_a.weight.dtype, device=old_a.weight.device)
        new_b.to(dtype=old_b.weight.dtype, device=old_b.weight.device)
        with torch.no_grad():
            new_b.weight.zero_()
            if old_b.bias is not None:
                new_b.bias.copy_(old_b.bias)
        for new, old in ((new_a, old_a), (new_b, old_b)):
            new.requires_grad_(old.weight.requires_grad)
        layer.lora_A[name], layer.lora_B[name] = new_a, new_b
        # Keep PEFT's scaling: α' = c·r' (or c·√r' with rsLoRA); r, lora_alpha are what
        # PEFT's save/merge code reads.
        rslora = bool(layer.use_rslora.get(name, False))
        layer.r[name] = rank
        layer.lora_alpha[name] = self.scaling * (math.sqrt(rank) if rslora else rank)
        self._a, self._b, self.rank = new_a.weight, new_b.weight, rank
        self._refresh_magnitude()


class _LoralibAdapter(_ParamAdapter):
    """loralib-style ``Linear``: an ``nn.Linear`` subclass with ``lora_A``/``lora_B`` parameters.

    Its forward computes base and adapter together, so :attr:`base_layer` is the layer itself.
    """

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__(name, layer, layer, layer.weight, layer.lora_A, layer.lora_B,
                         layer.scaling, bool(getattr(layer, "fan_in_fan_out", False)))

    def resize(self, rank: int) -> None:
        self._check_unmerged("resize")
        self._check_unsharded("resize")
        layer = self.module
        _check_new_rank(self.name, rank, self.out_features, self.in_features)
        old_a, old_b = layer.lora_A, layer.lora_B
        layer.lora_A = nn.Parameter(old_a.new_empty(rank, self.in_features),
                                    requires_grad=old_a.requires_grad)
        layer.lora_B = nn.Parameter(old_b.new_zeros(self.out_features, rank),
                                    requires_grad=old_b.requires_grad)
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
        # loralib scales by lora_alpha / r; keep the scaling.
        rslora = bool(getattr(layer, "use_rslora", False))
        if hasattr(layer, "r"):
            layer.r = rank
        if hasattr(layer, "lora_alpha"):
            layer.lora_alpha = self.scaling * (math.sqrt(rank) if rslora else rank)
        self._a, self._b, self.rank = layer.lora_A, layer.lora_B, rank


# ---------------------------------------------------------------------- discovery
def _peft_linear_class() -> type | None:
    # A model can only contain PEFT layers if peft has been imported.
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora.layer import Linear

    return Linear


def _is_dora_variant(variant: object) -> bool:
    """Whether a PEFT ``lora_variant`` entry (class or instance) is DoRA for linear layers."""
    if variant is None or "peft" not in sys.modules:
        return False
    from peft.tuners.lora.variants import DoraLinearVariant

    return variant is DoraLinearVariant or isinstance(variant, DoraLinearVariant)


def _peft_lora_layer_class() -> type | None:
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


def _unwrap_saved_module(module: nn.Module) -> nn.Module:
    """For PEFT's ``ModulesToSaveWrapper`` (``modules_to_save=``, e.g. a classifier head),
    the module its forward runs — the active adapter's trainable copy, else the original —
    so the layer keeps its plain-model name; any other module as is."""
    if "peft" not in sys.modules:
        return module
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(module, ModulesToSaveWrapper):
        return module
    active = [a for a in module.active_adapters if a in module.modules_to_save]
    if active and not getattr(module, "disable_adapters", False):
        return module.modules_to_save[active[0]]
    return module.original_module


def _is_loralib_style(module: nn.Module) -> bool:
    a = getattr(module, "lora_A", None)
    b = getattr(module, "lora_B", None)
    return (isinstance(module, nn.Linear) and isinstance(a, nn.Parameter)
            and isinstance(b, nn.Parameter) and a.ndim == 2 and b.ndim == 2
            and isinstance(getattr(module, "scaling", None), (int, float)))


def plain_root(model: nn.Module) -> nn.Module:
    """The plain model inside PEFT wrappers (``PeftModel`` → ``LoraModel`` → model)."""
    if "peft" in sys.modules:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner

        if isinstance(model, PeftModel):
            model = model.base_model
        if isinstance(model, BaseTuner):
            model = model.model
    return model


def _walk(module: nn.Module, prefix: str = "", seen: set[int] | None = None,
          ) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(canonical name, module, kind)`` for adapters and plain linear layers.

    ``kind`` is ``"covinit"``, ``"peft"``, ``"peft-other"`` (a PEFT layer covinit does not
    initialize, e.g. an embedding adapter: see :func:`find_skipped_adapters`), ``"loralib"``
    or ``"linear"``.  Adapters are not descended into, so their base layers are not reported
    separately.  Shared modules are reported once, under their first name.
    """
    seen = set() if seen is None else seen
    peft_linear, peft_layer = _peft_linear_class(), _peft_lora_layer_class()
    for child_name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        name = f"{prefix}.{child_name}" if prefix else child_name
        child = _unwrap_saved_module(child)
        if isinstance(child, LoRALinear):
            yield name, child, "covinit"
        elif peft_linear is not None and isinstance(child, peft_linear):
            yield name, child, "peft"
        elif (peft_layer is not None and isinstance(child, peft_layer)
              and quantized_kind(child.get_base_layer())):
            # PEFT's lora.Linear4bit / Linear8bitLt: base + scaling·B·A like lora.Linear.
            yield name, child, "peft"
        elif peft_layer is not None and isinstance(child, peft_layer):
            yield name, child, "peft-other"
        elif _is_loralib_style(child):
            yield name, child, "loralib"
        elif is_linear(child):
            yield name, child, "linear"
        else:
            yield from _walk(child, name, seen)


def _active_peft_adapter(name: str, module: nn.Module) -> str | None:
    """The one active adapter of a PEFT layer if this layer carries it, else None."""
    active = list(module.active_adapters)
    if len(active) != 1:
        raise ValueError(f"PEFT layer {name!r} has {len(active)} active adapters "
                         f"{active}; activate exactly one (model.set_adapter(name))")
    # With several adapters on different targets, the active one may not be here.
    carried = [*getattr(module, "lora_A", {}), *getattr(module, "lora_embedding_A", {})]
    return active[0] if active[0] in carried else None


def find_adapters(model: nn.Module, *, dora: bool = False) -> dict[str, LoRAAdapter]:
    """Every LoRA layer of ``model`` behind the :class:`LoRAAdapter` protocol.

    Parameters
    ----------
    model : nn.Module
        A model adapted with :func:`covinit.add_lora`, a PEFT model (``PeftModel`` or
        ``LoraModel``; its active adapter is used) or a model with loralib-style layers.
    dora : bool, default=False
        Also accept PEFT DoRA adapters (``use_dora=True``).  Their adapters recompute DoRA's
        magnitude vector after every write, as PEFT does when it creates the adapter, so
        writes through them are *initializations*; callers that copy factors in or out
        (saving, loading, export) keep the default, because ``A`` and ``B`` alone do not
        describe a DoRA layer.

    Returns
    -------
    dict
        ``canonical name -> adapter`` in module order.  PEFT adapters other than
        ``lora.Linear`` (embeddings, convolutions; see :func:`find_skipped_adapters`), and
        PEFT layers that do not carry the active adapter, are not included.

    Raises
    ------
    ValueError
        For a PEFT layer with several active adapters, a DoRA adapter without ``dora=True``,
        or another LoRA variant.

    Examples
    --------
    >>> from torch import nn
    >>> from covinit import add_lora, find_adapters
    >>> model = add_lora(nn.Sequential(nn.Linear(8, 8)), ["0"], rank=2)
    >>> list(find_adapters(model))
    ['0']
    """
    # FSDP2 leaves the root's parameters unsharded after a forward; the adapters must hold
    # the sharded DTensors, or what they write would be lost (covinit.distributed).
    reshard_fsdp(model)
    found: dict[str, LoRAAdapter] = {}
    configs = getattr(model, "peft_config", None)
    configs = configs if isinstance(configs, dict) else {}
    for name, module, kind in _walk(plain_root(model)):
        if kind == "covinit":
            found[name] = _CovinitAdapter(name, module)  # type: ignore[arg-type]
        elif kind == "peft":
            active = _active_peft_adapter(name, module)
            if active is not None:
                init = getattr(configs.get(active), "init_lora_weights", None)
                found[name] = _PeftAdapter(name, module, active, init, dora=dora)
        elif kind == "loralib":
            found[name] = _LoralibAdapter(name, module)
    return found


def find_skipped_adapters(model: nn.Module) -> dict[str, str]:
    """PEFT LoRA layers that carry the active adapter but that covinit does not initialize.

    These are PEFT's LoRA layers other than ``lora.Linear`` — ``lora.Embedding`` above all
    (``target_modules=["embed_tokens", ...]``), also convolutions.  covinit leaves them as
    PEFT initialized them.  For an embedding that is ``A = 0``, ``B ~ N(0, 1)`` (PEFT 0.21's
    ``reset_lora_parameters``), so ``ΔW = 0`` at step 0; a covariance-informed rule has little
    to add there, because an embedding's input is a one-hot token id, whose covariance is
    diagonal (the token frequencies): its eigenvectors are single tokens, not directions.

    Returns
    -------
    dict
        ``canonical name -> PEFT layer class name`` (e.g. ``"Embedding"``), in module order.
    """
    skipped: dict[str, str] = {}
    for name, module, kind in _walk(plain_root(model)):
        if kind == "peft-other" and _active_peft_adapter(name, module) is not None:
            skipped[name] = type(module).__name__
    return skipped


def describe_skipped(skipped: Mapping[str, str]) -> str:
    """``'a' (Embedding), 'b' (Conv2d)`` for :func:`find_skipped_adapters`' result."""
    return ", ".join(f"{name!r} ({kind})" for name, kind in skipped.items())


def skipped_warning(skipped: Mapping[str, str]) -> str:
    """The one warning text for LoRA layers covinit leaves as PEFT initialized them."""
    return (f"covinit leaves PEFT LoRA layer(s) {describe_skipped(skipped)} as PEFT "
            "initialized them (embeddings: A = 0, B ~ N(0, 1), so ΔW = 0 at step 0): an "
            "embedding's input is a one-hot token id, whose covariance is diagonal, so "
            "covariance strategies do not apply")


# ---------------------------------------------------------------------- initial state
def _digest_key(adapter: LoRAAdapter) -> str:
    return str(getattr(adapter, "adapter_name", ""))


def factors_digest(adapter: LoRAAdapter) -> str:
    """SHA-256 of the adapter's current ``A``, ``B`` (and DoRA magnitude): bytes, dtypes and
    shapes, so any change of a value — one optimizer step — changes it."""
    h = hashlib.sha256()
    a, b = adapter.get_lora()
    magnitude = getattr(adapter, "magnitude", None)
    parts = [a, b] + ([m] if callable(magnitude) and (m := magnitude()) is not None else [])
    for t in parts:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def mark_initialized(adapter: LoRAAdapter) -> None:
    """Record that ``adapter``'s current factors are an initialization covinit just wrote.

    :func:`covinit.initialize` calls it after writing each layer; :func:`matches_initialized`
    later tells whether the factors are still those (not trained, not loaded over).
    """
    module = adapter.module
    record = dict(getattr(module, _INIT_DIGEST, None) or {})
    record[_digest_key(adapter)] = factors_digest(adapter)
    setattr(module, _INIT_DIGEST, record)


def matches_initialized(adapter: LoRAAdapter) -> bool | None:
    """Whether the factors are still those :func:`mark_initialized` recorded.

    Returns
    -------
    bool or None
        ``True`` unchanged, ``False`` changed since (trained, loaded over, cast to another
        dtype), ``None`` nothing recorded (covinit did not initialize this layer in this
        process: a fresh PEFT model, a reloaded one, a copy made with ``save_pretrained``).
    """
    record = getattr(adapter.module, _INIT_DIGEST, None) or {}
    digest = record.get(_digest_key(adapter))
    return None if digest is None else digest == factors_digest(adapter)


def is_inert(adapter: LoRAAdapter) -> bool:
    """Whether the adapter adds nothing to its layer's output: ``B·A = 0`` exactly (``B`` or
    ``A`` all zero) and, for DoRA, the magnitude equals ``‖W‖`` per row (to float rounding).

    That is the state PEFT (``init_lora_weights=True`` / ``"gaussian"``), loralib and
    :func:`covinit.add_lora` create, and the step-0 state of every ``B = 0`` or ``A = 0``
    strategy.  Overwriting such factors cannot lose training: there is none in them.
    """
    a, b = adapter.get_lora()
    if bool(a.any()) and bool(b.any()):
        return False
    if not getattr(adapter, "dora", False):
        return True
    magnitude = adapter.magnitude()  # type: ignore[attr-defined]
    norms = adapter.dora_row_norms()  # type: ignore[attr-defined]
    tol = 8 * torch.finfo(norms.dtype).eps
    return bool(torch.allclose(magnitude.to(norms.dtype), norms, rtol=tol, atol=0.0))


def check_original_base(adapters: Mapping[str, LoRAAdapter], action: str) -> None:
    """Refuse PEFT layers whose base weight PEFT's own init rewrote.

    Statistics and inits are defined relative to the original ``W0``; after PEFT's
    ``init_lora_weights="pissa"`` (or CorDA, OLoRA, LoftQ, LoRA-GA) the base is
    ``W0 − c·B0·A0`` and nothing records ``B0·A0`` once training has moved ``B`` and ``A``.

    Raises
    ------
    ValueError
        Naming the first such layer and its PEFT init.
    """
    for name, adapter in adapters.items():
        if getattr(adapter, "base_rewritten_by_peft", False):
            init = getattr(adapter, "peft_init", None)
            raise ValueError(
                f"cannot {action} layer {name!r}: PEFT's init_lora_weights={init!r} rewrote its "
                "base weight to W0 - c*B0*A0, so the original W0 is unknown to covinit; create "
                "the PEFT model with init_lora_weights=True and let covinit "
                "initialize it (covinit's 'pissa' and 'cov-svd' strategies are residual too)")


def find_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear map of ``model`` by canonical name, adapted or not.

    Returns
    -------
    dict
        ``canonical name -> module computing W0·x``: the layer itself for plain
        ``nn.Linear`` / ``Conv1D``, the base layer for covinit and PEFT adapters, the layer
        itself for loralib-style adapters.  This is what calibration hooks.
    """
    layers: dict[str, nn.Module] = {}
    for name, module, kind in _walk(plain_root(model)):
        if kind in ("covinit", "peft"):
            layers[name] = module.base_layer if kind == "covinit" else module.get_base_layer()
            if quantized_kind(layers[name]) == "4bit":
                canonical_4bit(layers[name])  # hooks then see the float32 forward
        elif kind in ("loralib", "linear"):
            layers[name] = module
        elif kind == "peft-other":
            base = module.get_base_layer()
            if is_linear(base):
                layers[name] = base
    return layers


def model_fingerprint(model: nn.Module) -> dict[str, object]:
    """A description of ``model``'s linear layers that survives adding or removing LoRA.

    Returns
    -------
    dict
        ``{"layers": {canonical name: [d, k]}, "sha256": hex digest of that mapping}``.
        Two models with the same fingerprint have the same linear layers under the same
        names and shapes; calibrations and adapter files record it to refuse other models.
    """
    layers: dict[str, list[int]] = {}
    for name, module in find_linear_layers(model).items():
        if _is_loralib_style(module):
            # An nn.Linear subclass that may store its weight (k, d): read d, k off A and B.
            layers[name] = [int(module.lora_B.shape[0]), int(module.lora_A.shape[1])]
        else:
            layers[name] = [int(s) for s in linear_shape(module)]
    return {"layers": layers, "sha256": fingerprint_digest(layers)}


def fingerprint_digest(layers: dict[str, list[int]]) -> str:
    """SHA-256 of a ``{name: [d, k]}`` mapping, independent of key order."""
    blob = json.dumps(layers, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
