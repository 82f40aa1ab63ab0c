"""Layer selection: which layers a call acts on, spelled the same way everywhere.

``add_lora(targets=)``, ``calibrate(targets=)``, ``initialize(layers=)`` and
``report(layers=)`` all take a :data:`Targets`, with one meaning:

* a list of name suffixes — ``"query"`` selects ``encoder.layer.0.attention.self.query``; a
  suffix covers whole dotted components only, and an exact name is a suffix of itself.
  Every entry must select at least one layer, so a typo cannot silently shrink the
  selection;
* a regular expression string, matched against the whole name with :func:`re.fullmatch`
  (as PEFT's ``target_modules``);
* a callable ``(name, module) -> bool``, or ``(name) -> bool``: a callable whose signature
  takes a single positional argument is called with the name only.

:func:`select` resolves a selection against the candidates of a call and raises an error
naming what was asked and listing what exists; :func:`target_matcher` is the predicate
underneath, for callers that walk a model themselves.

Example
-------
>>> from covinit.selection import select
>>> layers = {"block.query": None, "block.key": None, "head": None}
>>> select(layers, ["query", "head"])
['block.query', 'head']
>>> select(layers, r"block\\..*")
['block.query', 'block.key']
>>> select(layers, lambda name: name.endswith("key"))
['block.key']
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import nn

__all__ = ["Targets", "select", "target_matcher"]

Targets = Sequence[str] | str | Callable[[str, nn.Module], bool] | Callable[[str], bool]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _takes_name_only(fn: Callable[..., bool]) -> bool:
    """True for a callable of the name alone: exactly one positional parameter, no ``*args``.

    Callables ``inspect`` cannot read (some builtins) are taken as ``(name, module)``.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return False
    positional = [p for p in params if p.kind in _POSITIONAL]
    if not positional:
        raise TypeError(f"a layer selector callable takes (name) or (name, module); "
                        f"{fn!r} takes no positional argument")
    return len(positional) == 1


def _is_suffix(suffix: str, name: str) -> bool:
    """``suffix`` is ``name`` or its last dotted components."""
    return name == suffix or name.endswith("." + suffix)


def _as_spec(targets: Targets | Iterable[str]) -> Targets:
    """A list spelled as any iterable of names (a set, a generator) becomes a tuple."""
    if isinstance(targets, str) or callable(targets) or isinstance(targets, Sequence):
        return targets
    if isinstance(targets, Iterable):
        return tuple(targets)
    return targets


def target_matcher(targets: Targets) -> Callable[[str, nn.Module | None], bool]:
    """Turn ``targets`` into a predicate ``(name, module) -> bool``.

    Parameters
    ----------
    targets : list of str, str or callable
        See the module docstring: name suffixes, a regular expression matched with
        ``re.fullmatch``, or a callable ``(name, module) -> bool`` / ``(name) -> bool``.
        The predicate does not check that every list entry matches: :func:`select` does.

    Returns
    -------
    callable
        ``(name, module) -> bool``; ``module`` may be None where the caller has no module
        (a calibration file without its model).

    Raises
    ------
    TypeError
        For anything else (including an empty list), or a callable without a positional
        parameter.
    ValueError
        For an invalid regular expression.
    """
    targets = _as_spec(targets)
    if callable(targets) and not isinstance(targets, str):
        if _takes_name_only(targets):
            by_name = targets
            return lambda name, _module: bool(by_name(name))  # type: ignore[call-arg]
        return targets  # type: ignore[return-value]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"layer selection {targets!r} is not a valid regular expression: "
                             f"{err}") from None
        return lambda name, _module: pattern.fullmatch(name) is not None
    if isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets):
        suffixes = tuple(targets)
        return lambda name, _module: any(_is_suffix(s, name) for s in suffixes)
    raise TypeError(
        "a layer selection (targets= / layers=) must be a non-empty list of name suffixes, a "
        "regular expression string (matched with re.fullmatch), or a callable "
        f"(name, module) -> bool or (name) -> bool; got {targets!r}"
    )


def select(candidates: Mapping[str, nn.Module | None], targets: Targets | Iterable[str], *,
           what: str = "found") -> list[str]:
    """The names among ``candidates`` that ``targets`` selects, in the candidates' order.

    Parameters
    ----------
    candidates : mapping
        ``name -> module`` (or ``name -> None`` where there is no module, e.g. the layers of
        a calibration file).  A two-argument callable receives the value as ``module``.
    targets : list of str, str or callable
        See the module docstring.  Any iterable of names counts as a list.
    what : str, default="found"
        Past participle saying where the candidates come from, used in errors:
        ``"calibrated"``, ``"adapted"``, ``"found"`` (``"layer 'x' was not calibrated"``).

    Returns
    -------
    list of str
        At least one name.

    Raises
    ------
    ValueError
        A list entry that selects nothing (all such entries are named), a regular expression
        or callable that selects nothing, or an invalid regular expression; the message
        lists the candidates.
    TypeError
        A selection of another type (see :func:`target_matcher`).

    Examples
    --------
    >>> select({"0": None, "2": None}, ["1"], what="calibrated")
    Traceback (most recent call last):
    ...
    ValueError: layer '1' was not calibrated (...); layers calibrated: 0, 2
    """
    spec = _as_spec(targets)
    match = target_matcher(spec)
    chosen = [name for name, module in candidates.items() if match(name, module)]
    listing = ", ".join(candidates) or "(none)"
    if isinstance(spec, str) or callable(spec):
        if not chosen:
            kind = "regex" if isinstance(spec, str) else "selector"
            how = " (re.fullmatch of the whole name)" if isinstance(spec, str) else ""
            raise ValueError(f"layers {kind} {spec!r} matches no {what} layer{how}; "
                             f"layers {what}: {listing}")
        return chosen
    missing = [entry for entry in spec if not any(_is_suffix(entry, n) for n in chosen)]
    if missing:
        names = ", ".join(repr(entry) for entry in missing)
        subject = f"layer {names} was" if len(missing) == 1 else f"layers {names} were"
        raise ValueError(f"{subject} not {what} (an entry is a layer's name or a dotted suffix "
                         f"of it); layers {what}: {listing}")
    return chosen
