"""The adapter protocol over covinit, PEFT and loralib-style layers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ADAPTER_KINDS, LINEAR_NAMES, LoralibStyleLinear, TinyNet
from torch import nn

from covinit import LoRAAdapter, add_lora, find_adapters
from covinit.adapters import find_linear_layers, model_fingerprint

TARGETS = ("query", "dense")


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_canonical_names_and_protocol(kind, make_tiny, adapt):
    model = adapt(kind, make_tiny(), TARGETS, rank=3, alpha=6)
    adapters = find_adapters(model)
    assert list(adapters) == ["block.query", "block.dense"]
    for adapter in adapters.values():
        assert isinstance(adapter, LoRAAdapter)
    q = adapters["block.query"]
    assert (q.out_features, q.in_features, q.rank) == (16, 12, 3)
    assert q.scaling == pytest.approx(2.0)
    a, b = q.get_lora()
    assert a.shape == (3, 12) and b.shape == (16, 3)
    assert torch.count_nonzero(b) == 0
    assert torch.equal(q.base_weight(), make_tiny().block.query.weight)
    assert not q.base_replaced


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_fingerprint_is_the_plain_models(kind, make_tiny, adapt):
    plain = model_fingerprint(make_tiny())
    assert plain["layers"] == {"block.query": [16, 12], "block.dense": [12, 16], "head": [5, 12]}
    assert model_fingerprint(adapt(kind, make_tiny(), TARGETS)) == plain
    other = nn.Sequential(nn.Linear(12, 16))
    assert model_fingerprint(other)["sha256"] != plain["sha256"]


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_set_lora_changes_output_as_formula(kind, make_tiny, adapt):
    model = adapt(kind, make_tiny(), TARGETS, rank=2, alpha=2, use_rslora=True)
    q = find_adapters(model)["block.query"]
    a, b = torch.randn(2, 12), torch.randn(16, 2)
    q.set_lora(a, b)
    got_a, got_b = q.get_lora()
    assert torch.equal(got_a, a) and torch.equal(got_b, b)
    layer = find_linear_layers(model)["block.query"]
    x = torch.randn(4, 12)
    expected = x @ (make_tiny().block.query.weight + q.scaling * b @ a).T + layer.bias
    assert q.scaling == pytest.approx(2 / 2**0.5)
    seen = {}  # the adapted layer's output, captured by a hook on the wrapper
    handle = q.module.register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert torch.allclose(seen["y"], expected, atol=1e-5)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_set_base_weight_keeps_parameter_dtype_device(kind, make_tiny, adapt):
    model = adapt(kind, make_tiny(), TARGETS, rank=2)
    q = find_adapters(model)["block.query"]
    layer = find_linear_layers(model)["block.query"]
    param = layer.weight
    new = torch.randn(16, 12, dtype=torch.float64)
    q.set_base_weight(new)
    assert layer.weight is param and param.dtype == torch.float32
    assert torch.equal(q.base_weight(), new.float())
    assert q.base_replaced and find_adapters(model)["block.query"].base_replaced
    assert not find_adapters(model)["block.dense"].base_replaced


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_shape_errors_name_the_layer(kind, make_tiny, adapt):
    q = find_adapters(adapt(kind, make_tiny(), TARGETS, rank=2))["block.query"]
    with pytest.raises(ValueError, match=r"LoRA A for layer 'block\.query' must have shape"):
        q.set_lora(torch.zeros(3, 12), torch.zeros(16, 2))
    with pytest.raises(ValueError, match=r"LoRA B for layer 'block\.query'"):
        q.set_lora(torch.zeros(2, 12), torch.zeros(12, 2))
    with pytest.raises(ValueError, match=r"base weight for layer 'block\.query'"):
        q.set_base_weight(torch.zeros(12, 16))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        q.set_lora(torch.zeros(2, 12), [[0.0]])


def test_find_linear_layers_gives_the_base_computation(make_tiny, adapt):
    plain = find_linear_layers(make_tiny())
    assert list(plain) == list(LINEAR_NAMES)
    for kind in ("covinit", "peft"):
        model = adapt(kind, make_tiny(), TARGETS, rank=2)
        layers = find_linear_layers(model)
        assert list(layers) == list(LINEAR_NAMES)
        for adapter in find_adapters(model).values():
            assert layers[adapter.name] is adapter.base_layer
            assert type(adapter.base_layer) is nn.Linear


def test_peft_structure_survives_writes(make_tiny, adapt):
    model = adapt("peft", make_tiny(), TARGETS, rank=2)
    keys = sorted(model.state_dict())
    q = find_adapters(model)["block.query"]
    q.set_base_weight(torch.zeros(16, 12))
    q.set_lora(torch.ones(2, 12), torch.ones(16, 2))
    assert sorted(model.state_dict()) == keys
    peft_layer = model.base_model.model.block.query
    assert peft_layer.base_layer.weight.abs().sum() == 0
    assert torch.equal(peft_layer.lora_A["default"].weight, torch.ones(2, 12))
    assert peft_layer.lora_B["default"].weight.requires_grad


def test_peft_conv1d_fan_in_fan_out():
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class GPTish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(nf=9, nx=6)  # weight (6, 9)

        def forward(self, x):
            return self.c_attn(x)

    model = GPTish()
    w0 = model.c_attn.weight.detach().clone()
    config = LoraConfig(target_modules=["c_attn"], r=2, lora_alpha=4, fan_in_fan_out=True)
    peft_model = get_peft_model(model, config)
    q = find_adapters(peft_model)["c_attn"]
    assert (q.out_features, q.in_features) == (9, 6)
    assert torch.equal(q.base_weight(), w0.T)
    new = torch.randn(9, 6)
    q.set_base_weight(new)
    assert torch.equal(peft_model.base_model.model.c_attn.base_layer.weight, new.T)


def test_loralib_fan_in_fan_out():
    base = nn.Linear(6, 9)
    layer = LoralibStyleLinear.from_linear(base, 2, 2.0, fan_in_fan_out=True)
    model = nn.Sequential(layer)
    q = find_adapters(model)["0"]
    assert (q.out_features, q.in_features) == (9, 6)
    assert torch.equal(q.base_weight(), base.weight)
    assert model_fingerprint(model)["layers"] == {"0": [9, 6]}
    assert q.base_layer is layer


def test_merged_layers_refuse_writes(make_tiny, adapt):
    model = adapt("peft", make_tiny(), TARGETS, rank=2)
    model.base_model.model.block.query.merge()
    q = find_adapters(model)["block.query"]
    with pytest.raises(ValueError, match=r"'block\.query' while its adapter is merged"):
        q.set_lora(torch.zeros(2, 12), torch.zeros(16, 2))
    cov = add_lora(make_tiny(), ["query"], rank=2)
    cov.block.query.merge()
    with pytest.raises(ValueError, match="merged"):
        find_adapters(cov)["block.query"].set_base_weight(torch.zeros(16, 12))


def test_peft_multiple_active_adapters_and_dora_are_refused(make_tiny, adapt):
    from peft import LoraConfig

    model = adapt("peft", make_tiny(), TARGETS, rank=2)
    model.add_adapter("second", LoraConfig(target_modules=list(TARGETS), r=2))
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="2 active adapters"):
        find_adapters(model)
    dora = adapt("peft", make_tiny(), TARGETS, rank=2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        find_adapters(dora)


def test_peft_active_adapter_decides_the_layers(make_tiny, adapt):
    from peft import LoraConfig

    model = adapt("peft", make_tiny(), TARGETS, rank=2)
    model.add_adapter("head_only", LoraConfig(target_modules=["head"], r=3))
    assert list(find_adapters(model)) == ["block.query", "block.dense"]
    model.set_adapter("head_only")
    adapters = find_adapters(model)
    assert list(adapters) == ["head"] and adapters["head"].rank == 3


def test_add_lora_refuses_peft_and_loralib_layers(make_tiny, adapt):
    for kind in ("peft", "loralib"):
        model = adapt(kind, make_tiny(), TARGETS, rank=2)
        with pytest.raises(ValueError, match=r"'block\.query' already has a LoRA adapter"):
            add_lora(model, ["query"], rank=2)


def test_plain_model_has_no_adapters():
    assert find_adapters(TinyNet()) == {}


def test_covinit_imports_without_peft_or_transformers():
    code = ("import sys, covinit, torch; m = covinit.add_lora(torch.nn.Sequential("
            "torch.nn.Linear(4, 4)), ['0'], rank=2); covinit.initialize(m); "
            "assert 'peft' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(k for k in sys.modules if k.startswith(('peft', 'transformers')))[:3]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
