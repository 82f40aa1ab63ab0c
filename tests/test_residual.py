"""covinit.residual: the record of a residual init, W0 = base + P·Q, and the folded adapter.

References are independent of the module: W0 is the weight cloned before any init, and a
folded adapter is checked through the d×k products it must reproduce.
"""

from __future__ import annotations

import ast
import doctest
import math
from pathlib import Path

import pytest
import torch
from conftest import ADAPTER_KINDS
from hypothesis import given
from hypothesis import strategies as st

import covinit.residual
from covinit import add_lora, find_adapters, initialize
from covinit.lora import scaling_for
from covinit.residual import (
    OFFSET_BUFFERS,
    alpha_for,
    folded_lora,
    offset_rank,
    original_weight,
    record_offset,
    residual_offset,
    store_offset,
)

PACKAGE = Path(covinit.residual.__file__).parent


def _w0(model) -> dict[str, torch.Tensor]:
    return {name: a.base_weight().detach().to(torch.float64, copy=True)
            for name, a in find_adapters(model).items()}


def _delta(adapter, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return adapter.scaling * b.to(torch.float64) @ a.to(torch.float64)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_original_weight_is_w0_after_residual_inits(kind, make_tiny, adapt):
    model = adapt(kind, make_tiny(), ["query", "head"], rank=2)
    want = _w0(model)
    for name, adapter in find_adapters(model).items():  # no record: the base itself, a copy
        got = original_weight(adapter)
        assert got.dtype == torch.float64 and torch.equal(got, want[name])
        got.add_(1.0)
        assert torch.equal(adapter.base_weight().to(torch.float64), want[name])
    initialize(model, strategy="pissa")
    initialize(model, strategy="pissa", seed=3)  # a second init starts again from W0
    for name, adapter in find_adapters(model).items():
        assert adapter.base_replaced and offset_rank(adapter) == 2
        assert not torch.allclose(adapter.base_weight().to(torch.float64), want[name])
        torch.testing.assert_close(original_weight(adapter), want[name], rtol=0, atol=1e-6)


def test_original_weight_sums_in_float64_on_a_bf16_base(make_tiny):
    model = add_lora(make_tiny(dtype=torch.bfloat16), ["head"], rank=2)
    adapter = find_adapters(model)["head"]
    p = torch.randn(5, 2, dtype=torch.float64)
    q = torch.randn(2, 12, dtype=torch.float64)
    store_offset(adapter, p, q)
    assert residual_offset(model.head)[0].dtype == torch.float32  # at least float32 kept
    base = adapter.base_weight().to(torch.float64)
    want = base + p.float().double() @ q.float().double()
    assert torch.equal(original_weight(adapter), want)


def test_record_is_non_persistent_and_cleared(make_tiny):
    model = add_lora(make_tiny(), ["head"], rank=2)
    adapter = find_adapters(model)["head"]
    keys = set(model.state_dict())
    b0, a0 = torch.randn(5, 2), torch.randn(2, 12)
    record_offset(adapter, b0, a0)
    p, q = residual_offset(model.head)
    torch.testing.assert_close(p, (b0.double() * adapter.scaling).float())  # P = c·B0
    assert torch.equal(q, a0)
    assert set(model.state_dict()) == keys
    assert set(OFFSET_BUFFERS) <= set(dict(model.head.named_buffers()))
    record_offset(adapter, None, None)
    assert residual_offset(model.head) is None and offset_rank(adapter) == 0


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_folded_lora_applies_to_the_original_base(kind, make_tiny, adapt):
    model = adapt(kind, make_tiny(), ["query", "head"], rank=2)
    want = _w0(model)
    initialize(model, strategy="pissa")
    g = torch.Generator().manual_seed(1)
    for name, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        a, b = a + 0.1 * torch.randn(a.shape, generator=g), b + 0.1 * torch.randn(b.shape,
                                                                                  generator=g)
        a2, b2, folded = folded_lora(adapter, a, b)  # as a trained adapter would be
        assert folded and a2.shape == (4, a.shape[1]) and b2.shape == (b.shape[0], 4)
        assert a2.dtype == a.dtype and b2.dtype == b.dtype
        trained = adapter.base_weight().to(torch.float64) + _delta(adapter, a, b)
        torch.testing.assert_close(want[name] + _delta(adapter, a2, b2), trained, rtol=0,
                                   atol=1e-5)


def test_folded_lora_leaves_an_original_base_alone(make_tiny):
    model = add_lora(make_tiny(), ["head"], rank=2)
    initialize(model, strategy="gaussian")
    adapter = find_adapters(model)["head"]
    a, b, folded = folded_lora(adapter)
    assert not folded
    assert all(torch.equal(x, y) for x, y in zip((a, b), adapter.get_lora(), strict=True))


def test_folded_lora_refactors_past_min_d_k(make_tiny):
    """head is (5, 12): rank 4 + 4 > 5, so the folded product is refactored at rank 5."""
    model = add_lora(make_tiny(), ["head"], rank=4)
    want = _w0(model)["head"]
    initialize(model, strategy="pissa")
    adapter = find_adapters(model)["head"]
    with torch.no_grad():
        model.head.lora_B.add_(0.1)
    a2, b2, folded = folded_lora(adapter)
    assert folded and a2.shape == (5, 12) and b2.shape == (5, 5)
    a, b = adapter.get_lora()
    trained = adapter.base_weight().to(torch.float64) + _delta(adapter, a, b)
    torch.testing.assert_close(want + _delta(adapter, a2, b2), trained, rtol=0, atol=1e-5)


def test_folded_lora_refuses_a_replaced_base_without_record(make_tiny):
    model = add_lora(make_tiny(), ["head"], rank=2)
    adapter = find_adapters(model)["head"]
    adapter.set_base_weight(adapter.base_weight() * 0.5)  # replaced outside initialize
    with pytest.raises(ValueError, match=r"layer 'head': its base weight was replaced, but "
                                         r"covinit has no record"):
        folded_lora(adapter)


@given(st.floats(0.01, 100.0), st.integers(1, 512), st.booleans())
def test_alpha_for_inverts_scaling_for(scaling, rank, rslora):
    alpha = alpha_for(scaling, rank, rslora)
    assert math.isclose(scaling_for(alpha, rank, rslora), scaling, rel_tol=1e-12)


def test_docstring_example_runs():
    result = doctest.testmod(covinit.residual, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _covinit_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("covinit"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("covinit"))
    return found


@pytest.mark.parametrize(("module", "above"), [
    # The record sits under everything that reads it (calibration, initialize, lora_io,
    # export, the report): it imports only the adapter layer.
    ("residual", {"covinit.adapters"}),
    ("peft_saving", {"covinit.adapters", "covinit.lora", "covinit.residual"}),
])
def test_the_record_sits_low_in_the_import_graph(module, above):
    assert _covinit_imports(module) <= above


def test_initialize_imports_nothing_that_calls_it_or_saves():
    """initialize sits below calibration (which calls it) and below saving and export."""
    banned = {"covinit.calibration", "covinit.export", "covinit.lora_io", "covinit.report",
              "covinit.reporting", "covinit.cli", "covinit"}
    assert not _covinit_imports("initialization") & banned
