"""What counts as a linear layer: ``nn.Linear`` and Hugging Face's ``Conv1D``.

The lowest floor of the package: it imports nothing from covinit, so every module that must
recognise or measure a linear layer (the LoRA layer, adapter discovery, hooks) can use it
without import cycles.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["is_conv1d", "is_linear", "linear_shape"]


def _conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is already imported.

    A model built from ``Conv1D`` layers has necessarily imported transformers, so looking in
    ``sys.modules`` finds the class without making transformers an import-time dependency.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a plain linear map covinit can wrap (``nn.Linear`` or ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return True
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (weight stored as (in, out))."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d, k)`` = (out_features, in_features) of an ``nn.Linear`` or ``Conv1D``.

    Raises
    ------
    TypeError
        If ``module`` is neither.
    """
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        k, d = module.weight.shape  # Conv1D stores its weight as (in, out)
        return d, k
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")

