"""Layer selection: which layers a call acts on, spelled the same way everywhere.

``add_lora(targets=)``, ``calibrate(targets=)``, ``initialize(layers=)`` and
``report(layers=)`` all take a :data:`Targets` and resolve it here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["Targets", "target_matcher"]

Targets = Sequence[str] | str | Callable[[str, nn.Module], bool]


def target_matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    """Turn ``targets`` into a predicate ``(name, module) -> bool``.

    Parameters
    ----------
    targets : list of str, str or callable
        * a list of name suffixes: ``"query"`` matches ``...attention.self.query``; a suffix
          matches whole dotted components only,
        * a regular expression string matched against the full name with ``re.fullmatch``
          (as PEFT does),
        * a callable ``(name, module) -> bool``.

    Raises
    ------
    TypeError
        For anything else (including an empty list).
    ValueError
        For an invalid regular expression.
    """
    if callable(targets) and not isinstance(targets, str):
        return targets
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets {targets!r} is not a valid regular expression: {err}") \
                from None
        return lambda name, _module: pattern.fullmatch(name) is not None
    if isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        suffixes = tuple(targets)
        return lambda name, _module: any(name == s or name.endswith("." + s) for s in suffixes)
    raise TypeError(
        "targets must be a non-empty list of name suffixes, a regular expression string "
        f"(matched with re.fullmatch), or a callable (name, module) -> bool; got {targets!r}"
    )

