"""Model surgery: put covinit's :class:`~covinit.lora.LoRALinear` into a model, and read the
adapter tensors of any supported LoRA layer back out.

Example
-------
>>> from torch import nn
>>> from covinit import add_lora
>>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> model = add_lora(model, ["0"], rank=4, alpha=8)
>>> model[0].lora_A.shape, model[0].lora_B.shape, model[0].scaling
(torch.Size([4, 16]), torch.Size([32, 4]), 2.0)
>>> [n for n, p in model.named_parameters() if p.requires_grad]
['0.lora_A', '0.lora_B']
"""

from __future__ import annotations

from torch import Tensor, nn

from covinit._linear import linear_shape
from covinit.adapters import find_adapters, find_linear_layers, plain_root
from covinit.lora import LoRALinear, check_rank
from covinit.selection import Targets, target_matcher

__all__ = ["add_lora", "lora_state_dict", "mark_only_lora_as_trainable", "set_submodule"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_lora(
    model: nn.Module,
    targets: Targets,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Wrap the matching linear layers of ``model`` in :class:`LoRALinear`, in place.

    Parameters
    ----------
    model : nn.Module
        Any model with ``nn.Linear`` / ``Conv1D`` layers.
    targets : list of str, str or callable
        Which layers to adapt, by qualified module name:

        * a list of name suffixes (``["query", "value"]`` matches ``...attention.self.query``;
          a suffix matches whole dotted components only),
        * a regular expression string matched against the full name with ``re.fullmatch``
          (as PEFT does), e.g. ``r".*\\.attention\\..*"``,
        * a callable ``(name, module) -> bool``.

        Only linear-like layers are candidates.
    rank, alpha, dropout, use_rslora
        See :class:`LoRALinear`.

    Returns
    -------
    nn.Module
        ``model`` itself, with every parameter frozen except the LoRA factors.

    Raises
    ------
    ValueError
        If nothing matches (the message lists the available linear layers), if a matching
        layer already carries a LoRA adapter (covinit's, PEFT's or loralib-style), or if the
        rank is invalid for a layer.
    """
    match = target_matcher(targets)
    adapted = find_adapters(model)
    for name, adapter in adapted.items():
        if match(name, adapter.module):
            raise ValueError(
                f"layer {name!r} already has a LoRA adapter ({type(adapter.module).__name__}); "
                "refusing to wrap it twice"
            )
    candidates = {name: m for name, m in find_linear_layers(model).items()
                  if name not in adapted}
    chosen = [name for name, m in candidates.items() if match(name, m)]
    if not chosen:
        listing = ", ".join(candidates) or "(none)"
        done = f" (already adapted: {', '.join(adapted)})" if adapted else ""
        raise ValueError(
            f"targets {targets!r} match no linear layer; available: {listing}{done}"
        )
    # Validate every rank before touching the model, so a bad rank leaves it unchanged.
    for name in chosen:
        check_rank(rank, name, *linear_shape(candidates[name]))
    for name in chosen:
        wrapper = LoRALinear(candidates[name], rank, alpha, dropout, use_rslora, name=name)
        set_submodule(plain_root(model), name, wrapper)
    mark_only_lora_as_trainable(model)
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except the ``lora_A``/``lora_B`` of covinit layers."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of every covinit, PEFT or loralib-style layer, keyed by canonical name.

    Keys are ``"<layer>.lora_A"`` (r, k), ``"<layer>.lora_B"`` (d, r) and, for layers whose
    base weight was replaced through the adapter protocol (a residual strategy),
    ``"<layer>.base_weight"`` (d, k, ``nn.Linear`` orientation).  ``<layer>`` is the name
    of the layer in the plain, un-adapted model (see :func:`covinit.find_adapters`).
    Tensors are detached copies.
    """
    state: dict[str, Tensor] = {}
    for name, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        state[f"{name}.lora_A"] = a
        state[f"{name}.lora_B"] = b
        if adapter.base_replaced:
            state[f"{name}.base_weight"] = adapter.base_weight().contiguous().clone()
    return state
