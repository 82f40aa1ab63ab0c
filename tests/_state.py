"""Snapshots of everything a user's model holds, to prove that a failed call changed nothing.

``snapshot(model)`` records the state dict (cloned), every module's forward / pre-forward /
backward hook dicts (as the ids of the hook callables), train/eval flags and requires_grad
flags, plus parameter object identities (an optimizer holds those).  Two snapshots compare
equal with ``==`` only if all of that is bitwise the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    hooks: dict[str, dict[str, tuple[Any, ...]]]
    modes: dict[str, bool]
    flags: dict[str, bool]
    params: dict[str, int]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        same_state = self.state.keys() == other.state.keys() and all(
            self.state[k].dtype == other.state[k].dtype
            and self.state[k].shape == other.state[k].shape
            and torch.equal(self.state[k], other.state[k]) for k in self.state)
        return (same_state and self.hooks == other.hooks and self.modes == other.modes
                and self.flags == other.flags and self.params == other.params)


def snapshot(model: nn.Module) -> Snapshot:
    """Everything listed in the module docstring, copied."""
    hooks = {name: {attr: tuple((key, id(fn)) for key, fn in getattr(module, attr).items())
                    for attr in _HOOK_DICTS}
             for name, module in model.named_modules()}
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        hooks=hooks,
        modes={name: module.training for name, module in model.named_modules()},
        flags={name: p.requires_grad for name, p in model.named_parameters()},
        params={name: id(p) for name, p in model.named_parameters()},
    )
