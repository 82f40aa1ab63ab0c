"""Tests of covinit.selection: one layer selector for add_lora, calibrate, initialize, report."""

from __future__ import annotations

import doctest
import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import covinit.selection
from covinit import add_lora, calibrate, report
from covinit.selection import select, target_matcher

LAYERS = {"encoder.0.query": nn.Linear(4, 4), "encoder.0.key": nn.Linear(4, 2),
          "encoder.10.query": nn.Linear(4, 4), "head": nn.Linear(4, 3)}


def _by_suffix(names: list[str], suffixes: list[str]) -> list[str]:
    """Reference: a suffix selects a name when the name's last dotted components equal it."""
    out = []
    for name in names:
        parts = name.split(".")
        if any(parts[len(parts) - len(s.split(".")):] == s.split(".") for s in suffixes):
            out.append(name)
    return out


# ---------------------------------------------------------------------- name suffixes
def test_suffixes_cover_whole_dotted_components() -> None:
    assert select(LAYERS, ["query"]) == ["encoder.0.query", "encoder.10.query"]
    assert select(LAYERS, ["0.query", "head"]) == ["encoder.0.query", "head"]
    assert select(LAYERS, ["head", "encoder.0.key"]) == ["encoder.0.key", "head"]  # module order
    with pytest.raises(ValueError, match="layer 'uery' was not found"):
        select(LAYERS, ["uery"])  # part of a component is no suffix


def test_every_entry_must_select_something() -> None:
    """A typo cannot shrink the selection silently, and every typo is named at once."""
    with pytest.raises(ValueError, match=r"layer 'qurey' was not calibrated.*layers "
                                         r"calibrated: encoder\.0\.query, encoder\.0\.key"):
        select(LAYERS, ["query", "qurey"], what="calibrated")
    with pytest.raises(ValueError, match=r"layers 'qurey', 'haed' were not adapted"):
        select(LAYERS, ["qurey", "query", "haed"], what="adapted")


def test_any_iterable_of_names_is_a_list() -> None:
    assert select(LAYERS, {"head"}) == ["head"]
    assert select(LAYERS, (n for n in ["key"])) == ["encoder.0.key"]


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.lists(st.sampled_from(["a", "b", "ab", "0", "1"]), min_size=1,
                               max_size=4).map(".".join), min_size=1, max_size=6, unique=True),
       pick=st.lists(st.lists(st.sampled_from(["a", "b", "ab", "0", "1"]), min_size=1,
                              max_size=2).map(".".join), min_size=1, max_size=3))
def test_suffix_selection_matches_a_reference(names: list[str], pick: list[str]) -> None:
    candidates = dict.fromkeys(names)
    want = _by_suffix(names, pick)
    missing = [s for s in pick if not _by_suffix(names, [s])]
    if missing:
        with pytest.raises(ValueError, match=re.escape(repr(missing[0]))):
            select(candidates, pick)
    else:
        assert select(candidates, pick) == want


# ---------------------------------------------------------------------- regular expressions
def test_regex_is_matched_against_the_whole_name() -> None:
    assert select(LAYERS, r"encoder\.\d+\.query") == ["encoder.0.query", "encoder.10.query"]
    assert select(LAYERS, r".*\.0\..*") == ["encoder.0.query", "encoder.0.key"]
    # re.search would find "encoder" in every name: fullmatch finds none
    with pytest.raises(ValueError, match=r"regex 'encoder' matches no calibrated layer "
                                         r"\(re\.fullmatch.*layers calibrated: encoder"):
        select(LAYERS, "encoder", what="calibrated")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select(LAYERS, "encoder.(")


# ---------------------------------------------------------------------- callables
def test_two_argument_callable_sees_the_module() -> None:
    seen = []

    def wide(name: str, module: nn.Module) -> bool:
        seen.append(name)
        return module.out_features >= 3

    assert select(LAYERS, wide) == ["encoder.0.query", "encoder.10.query", "head"]
    assert seen == list(LAYERS)
    assert select(LAYERS, lambda name, module=None: module is LAYERS["head"]) == ["head"]
    assert select(LAYERS, lambda *args: args[0] == "head") == ["head"]  # *args: (name, module)


def test_one_argument_callable_gets_the_name_only() -> None:
    assert select(LAYERS, lambda name: name.startswith("encoder.1")) == ["encoder.10.query"]
    assert select({"0": None, "a": None}, str.isdigit) == ["0"]  # unbound method of the name
    ends = functools.partial(lambda suffix, name: name.endswith(suffix), "key")
    assert select(LAYERS, ends) == ["encoder.0.key"]
    assert target_matcher(lambda name: name == "head")("head", None) is True


def test_callable_errors() -> None:
    with pytest.raises(ValueError, match=r"selector .* matches no adapted layer; layers "
                                         r"adapted: encoder\.0\.query"):
        select(LAYERS, lambda name: False, what="adapted")
    with pytest.raises(TypeError, match="takes no positional argument"):
        select(LAYERS, lambda: True)


# ---------------------------------------------------------------------- other input
@pytest.mark.parametrize("bad", [[], 3, [1, 2], None])
def test_other_types_are_refused(bad) -> None:
    with pytest.raises(TypeError, match=r"targets= / layers=.* list of name suffixes, a"):
        select(LAYERS, bad)


def test_no_candidates_says_so() -> None:
    with pytest.raises(ValueError, match=r"layers found: \(none\)"):
        select({}, ["query"])


def test_docstring_examples_run() -> None:
    result = doctest.testmod(covinit.selection, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------- used by the library
def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                         nn.Linear(3, 2))


def test_add_lora_takes_a_one_argument_callable() -> None:
    model = add_lora(_net(), lambda name: name in ("0", "4"), rank=1)
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n] == \
        ["0.lora_A", "4.lora_A"]


def test_report_layers_take_every_form(tmp_path) -> None:
    model = _net()
    data = [torch.randn(16, 6) for _ in range(2)]
    cal = calibrate(model, data, targets=["0", "2", "4"], sides=("input",),
                    show_progress=False)

    def layers(spec, with_model=False) -> list[str]:
        rep = report(cal, model if with_model else None, tmp_path, rank=1, layers=spec,
                     figures=False)
        return [s.layer for s in rep.summaries]

    assert layers(["4", "0"]) == ["0", "4"]
    assert layers("[24]") == ["2", "4"]
    assert layers(lambda name: name != "2") == ["0", "4"]
    assert layers(lambda name, module: module is None) == ["0", "2", "4"]  # no model
    assert layers(lambda name, module: module.in_features < 6, with_model=True) == ["2", "4"]
    with pytest.raises(ValueError, match="regex '9' matches no calibrated layer"):
        layers("9")
