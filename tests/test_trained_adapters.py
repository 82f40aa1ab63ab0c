"""calibrate on LoRA models that are not fresh: trained adapters, statistics only, embedding
adapters and DoRA (issue 14, items 2 and 3).

Every test runs on a real PEFT model built from a transformers config (tiny random Llama and
BERT), plus real MiniLM where it is cheap.  Expected values come from the plain model (the
step-0 promise), from a hook on the base layer (statistics) or from DoRA's formula written
out by hand — never from the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import covinit
from covinit.adapters import (
    find_adapters,
    find_skipped_adapters,
    is_inert,
    mark_initialized,
    matches_initialized,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64
ATTN = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
Q = {"llama": "model.layers.0.self_attn.q_proj",
     "bert": "bert.encoder.layer.0.attention.self.query"}


def _tiny(arch: str) -> nn.Module:
    """A tiny random model from a config: 1 layer, hidden 16 (seeded, eval mode)."""
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


def _peft(arch: str, targets: list[str] | None = None, **config: object) -> nn.Module:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or ATTN[arch], **config)
    return peft.get_peft_model(_tiny(arch), cfg).eval()


def _data(n_batches: int = 3, seed: int = 1) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=gen)}
            for _ in range(n_batches)]


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _train(model: nn.Module, data: list[dict[str, Tensor]], steps: int = 3,
           lr: float = 1e-2) -> None:
    """A few AdamW steps on a next-token / sum-of-logits loss (any loss moves A and B)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        logits = model(**data[step % len(data)]).logits
        loss = logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(before: dict[str, Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed


# ------------------------------------------------------------------ item 2: trained adapters
@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("strategy", [None, "cov-svd"])
def test_calibrate_refuses_to_reinitialize_a_trained_peft_adapter(arch, strategy):
    model = _peft(arch)
    data = _data()
    covinit.calibrate(model, data, strategy=strategy, show_progress=False)
    _train(model, data)
    trained, state = _logits(model, data[0]), _state(model)
    with pytest.raises(ValueError, match=rf"no longer at their initial state \('{Q[arch]}'.*"
                                         r"init=False.*overwrite=True"):
        covinit.calibrate(model, data, show_progress=False)
    _assert_bit_identical(state, model)  # refused before anything was written
    assert torch.equal(_logits(model, data[0]), trained)


def test_a_trained_adapter_covinit_never_initialized_is_refused(tmp_path):
    """PEFT's own init (B = 0), trained; then the same adapter reloaded with
    ``PeftModel.from_pretrained``: no covinit record either way."""
    model = _peft("llama")
    data = _data()
    _train(model, data)
    with pytest.raises(ValueError, match="B·A is not zero and covinit has no record"):
        covinit.calibrate(model, data, show_progress=False)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(_tiny("llama"), tmp_path / "adapter",
                                              is_trainable=True)
    with pytest.raises(ValueError, match="no longer at their initial state"):
        covinit.calibrate(reloaded, data, show_progress=False)


def test_one_tiny_step_is_enough_to_count_as_trained():
    model = _peft("llama")
    data = _data()
    covinit.calibrate(model, data, strategy="pissa", show_progress=False)
    _train(model, data, steps=1, lr=1e-7)
    with pytest.raises(ValueError, match="changed since covinit initialized them"):
        covinit.calibrate(model, data, show_progress=False)


def test_statistics_only_leaves_a_trained_model_bit_identical_and_matches_a_hook():
    model = _peft("llama")
    data = _data()
    covinit.calibrate(model, data, show_progress=False)
    _train(model, data)
    state, logits = _state(model), _logits(model, data[0])
    modes = {name: m.training for name, m in model.named_modules()}
    # Independent reference: the rows the q_proj base layer multiplies, from a plain hook.
    rows: list[Tensor] = []
    base = find_adapters(model)[Q["llama"]].base_layer
    handle = base.register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].detach().reshape(-1, 16).double()))
    try:
        for batch in data:
            _logits(model, batch)
    finally:
        handle.remove()
    x = torch.cat(rows)
    cal = covinit.calibrate(model, data, init=False, show_progress=False)
    _assert_bit_identical(state, model)
    assert torch.equal(_logits(model, data[0]), logits)
    assert {name: m.training for name, m in model.named_modules()} == modes
    moments = cal.moments(Q["llama"], "input")
    assert moments.n == x.shape[0]
    torch.testing.assert_close(moments.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    xc = x - x.mean(0)
    torch.testing.assert_close(moments.m2, xc.T @ xc, rtol=1e-10, atol=1e-10)
    assert cal.layer_names == list(find_adapters(model))


def test_statistics_only_refuses_initialization_options():
    model = _peft("llama")
    with pytest.raises(TypeError, match=r"init=False collects statistics only.*"
                                        r"\['overwrite', 'seed', 'strategy'\]"):
        covinit.calibrate(model, _data(), init=False, strategy="pissa", seed=1, overwrite=True,
                          show_progress=False)


def test_overwrite_reinitializes_a_trained_adapter():
    model = _peft("llama")
    data = _data()
    plain = _logits(_tiny("llama"), data[0])
    covinit.calibrate(model, data, strategy="cov-svd", show_progress=False)
    _train(model, data)
    assert (_logits(model, data[0]) - plain).abs().max() > 1e-3
    covinit.calibrate(model, data, strategy="cov-svd", overwrite=True, show_progress=False)
    # Starts again from the original W0 (the residual record), so step 0 is the plain model.
    torch.testing.assert_close(_logits(model, data[0]), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("first", ["kaiming", "output-pca", "pissa", "two-sided"])
def test_before_training_calibrate_still_initializes_and_reinitializes(first):
    model = _peft("llama")
    data = _data()
    plain = _logits(_tiny("llama"), data[0])
    covinit.calibrate(model, data, strategy=first, show_progress=False)
    a0, _ = find_adapters(model)[Q["llama"]].get_lora()
    covinit.calibrate(model, data, strategy="input-pca", show_progress=False)
    a1, b1 = find_adapters(model)[Q["llama"]].get_lora()
    assert not torch.equal(a0, a1) and not b1.any()  # input-pca: data-driven A, B = 0
    torch.testing.assert_close(_logits(model, data[0]), plain, rtol=0, atol=1e-5)


def test_residual_init_without_the_digest_is_recognised_by_its_offset_record():
    """A copy whose digest attribute was lost still carries the residual record P = c·B0."""
    model = _peft("llama")
    data = _data()
    covinit.calibrate(model, data, strategy="pissa", show_progress=False)
    for adapter in find_adapters(model).values():
        del adapter.module._covinit_init_digest
        assert matches_initialized(adapter) is None
    covinit.calibrate(model, data, strategy="kaiming", show_progress=False)  # still initial
    covinit.calibrate(model, data, strategy="pissa", show_progress=False)
    for adapter in find_adapters(model).values():
        del adapter.module._covinit_init_digest
    _train(model, data, steps=1, lr=1e-5)
    with pytest.raises(ValueError, match="differ from the residual init recorded"):
        covinit.calibrate(model, data, show_progress=False)


def test_peft_random_init_false_counts_as_not_initial():
    """``init_lora_weights=False`` draws both A and B at random: ΔW ≠ 0, like a trained one."""
    model = _peft("llama", init_lora_weights=False)
    with pytest.raises(ValueError, match="no longer at their initial state"):
        covinit.calibrate(model, _data(), show_progress=False)
    covinit.calibrate(model, _data(), overwrite=True, show_progress=False)


def test_digest_and_inert_rules_on_each_adapter_kind(make_tiny, adapt):
    for kind in ("covinit", "peft", "loralib"):
        model = adapt(kind, make_tiny(), ["query"], rank=2)
        adapter = find_adapters(model)["block.query"]
        assert is_inert(adapter) and matches_initialized(adapter) is None
        mark_initialized(adapter)
        assert matches_initialized(adapter) is True
        a, b = adapter.get_lora()
        b[0, 0] = 1e-30  # the smallest change still counts
        adapter.set_lora(a, b)
        assert matches_initialized(adapter) is False and not is_inert(adapter)


# ------------------------------------------------------------------ item 3: embeddings
def test_embedding_adapters_are_named_in_a_warning_and_keep_peft_init():
    model = _peft("llama", ["embed_tokens", "q_proj"])
    data = _data()
    embed = model.base_model.model.model.embed_tokens
    a0 = embed.lora_embedding_A["default"].detach().clone()
    b0 = embed.lora_embedding_B["default"].detach().clone()
    assert find_skipped_adapters(model) == {"model.embed_tokens": "Embedding"}
    with pytest.warns(UserWarning, match=r"'model\.embed_tokens' \(Embedding\) as PEFT "
                                         r"initialized them.*A = 0") as caught:
        cal = covinit.calibrate(model, data, strategy="input-pca", show_progress=False)
    # Attributed to the caller of calibrate (stacklevel), not to covinit's own stages.
    assert [w.filename for w in caught] == [__file__]
    assert cal.layer_names == [Q["llama"]]
    assert not a0.any()  # PEFT 0.21: A = 0, so ΔW = 0 at step 0
    assert torch.equal(embed.lora_embedding_A["default"], a0)
    assert torch.equal(embed.lora_embedding_B["default"], b0)
    torch.testing.assert_close(_logits(model, data[0]), _logits(_tiny("llama"), data[0]))


def test_initialize_names_embedding_adapters_too():
    """initialize called directly warns once, at its caller, and refuses an embedding-only
    model with an error naming the embedding (before: silent, and 'no LoRA layers')."""
    model = _peft("llama", ["embed_tokens", "q_proj"])
    cal = covinit.calibrate(model, _data(), init=False, show_progress=False)
    with pytest.warns(UserWarning, match=r"'model\.embed_tokens' \(Embedding\) as PEFT "
                                         r"initialized them") as caught:
        info = covinit.initialize(model, cal, strategy="input-pca")
    assert [w.filename for w in caught] == [__file__]
    assert list(info) == [Q["llama"]]
    with pytest.raises(ValueError, match=r"no LoRA layers covinit initializes \(only "
                                         r"'model\.embed_tokens' \(Embedding\)"):
        covinit.initialize(_peft("llama", ["embed_tokens"]))


def test_embedding_only_model_gets_an_error_that_names_the_embedding():
    model = _peft("llama", ["embed_tokens"])
    with pytest.raises(ValueError, match=r"all of kinds covinit does not initialize "
                                         r"\('model\.embed_tokens' \(Embedding\)\).*targets="):
        covinit.calibrate(model, _data(), show_progress=False)
    cal = covinit.calibrate(model, _data(), targets=["q_proj"], show_progress=False)
    assert cal.layer_names == [Q["llama"]]


# ------------------------------------------------------------------ DoRA
def _dora_output_by_hand(layer: nn.Module, x: Tensor) -> Tensor:
    """DoRA (Liu et al. 2024, eq. 5): ``m / ‖W + s·B·A‖_row · (W + s·B·A)·x + bias``."""
    w = layer.get_base_layer().weight.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    m = layer.lora_magnitude_vector["default"].weight.double()
    v = w + layer.scaling["default"] * b @ a
    bias = layer.get_base_layer().bias
    y = x.double() @ (v * (m / torch.linalg.norm(v, dim=1))[:, None]).T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("strategy", ["kaiming", "input-pca", "cov-svd", "two-sided"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_dora_step0_contract(arch, strategy):
    model = _peft(arch, use_dora=True)
    data = _data()
    plain = _logits(_tiny(arch), data[0])
    layer = model.get_submodule(f"base_model.model.{Q[arch]}")
    magnitude = layer.lora_magnitude_vector["default"].weight
    covinit.calibrate(model, data, strategy=strategy, show_progress=False)
    assert layer.lora_magnitude_vector["default"].weight is magnitude  # optimizer stays valid
    torch.testing.assert_close(_logits(model, data[0]), plain, rtol=0, atol=1e-5)
    # The magnitude is the row norm of the new W + s·B·A, and the layer is DoRA's formula.
    adapter = find_adapters(model, dora=True)[Q[arch]]
    w = adapter.base_weight().double()
    a, b = (t.double() for t in adapter.get_lora())
    expected = torch.linalg.norm(w + adapter.scaling * b @ a, dim=1)
    torch.testing.assert_close(magnitude.detach().double(), expected, rtol=1e-6, atol=0)
    x = torch.randn(5, adapter.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), _dora_output_by_hand(layer, x),
                                   rtol=1e-5, atol=1e-5)
    if strategy == "cov-svd":  # a residual DoRA layer: the base changed, the output did not
        assert not torch.equal(layer.get_base_layer().weight,
                               _tiny(arch).get_submodule(Q[arch]).weight)


def test_dora_trains_after_init_and_is_then_refused_by_calibrate():
    model = _peft("llama", use_dora=True)
    data = _data()
    covinit.calibrate(model, data, strategy="cov-svd", show_progress=False)
    _train(model, data)
    with pytest.raises(ValueError, match="no longer at their initial state"):
        covinit.calibrate(model, data, show_progress=False)
    state = _state(model)
    covinit.calibrate(model, data, init=False, show_progress=False)
    _assert_bit_identical(state, model)


def test_dora_magnitude_training_alone_counts_as_trained():
    model = _peft("llama", use_dora=True)
    layer = model.get_submodule(f"base_model.model.{Q['llama']}")
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.01)
    with pytest.raises(ValueError, match="no longer at their initial state"):
        covinit.calibrate(model, _data(), show_progress=False)


def test_dora_still_refused_where_a_and_b_alone_are_copied(tmp_path):
    model = _peft("llama", use_dora=True)
    with pytest.raises(ValueError, match=r"DoRA adapter.*save_pretrained"):
        covinit.save_lora(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="DoRA adapter"):
        find_adapters(model)


def test_other_lora_variants_stay_refused_with_their_name():
    cfg = peft.LoraConfig(r=4, target_modules=ATTN["llama"], use_dora=True)
    model = peft.get_peft_model(_tiny("llama"), cfg)
    layer = model.get_submodule(f"base_model.model.{Q['llama']}")
    layer.lora_variant["default"] = object()  # stands for a variant covinit does not know
    with pytest.raises(ValueError, match=r"LoRA variant object.*plain LoRA and DoRA only"):
        find_adapters(model, dora=True)


# ------------------------------------------------------------------ real MiniLM
@pytest.mark.slow
def test_minilm_trained_adapter_is_refused_and_statistics_only_is_exact():
    zoo = pytest.importorskip("zoo")
    try:
        base, tokenizer = zoo.load_minilm()
    except ImportError as err:
        pytest.skip(str(err))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    enc = tokenizer(["a quietly moving film", "dull, overlong and badly acted"],
                    padding=True, return_tensors="pt")
    data = [dict(enc)]
    covinit.calibrate(model, data, show_progress=False)
    _train(model, data * 2, steps=2, lr=1e-3)
    state = _state(model)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query"):
        covinit.calibrate(model, data, show_progress=False)
    cal = covinit.calibrate(model, data, init=False, show_progress=False)
    _assert_bit_identical(state, model)
    assert cal.moments("bert.encoder.layer.0.attention.self.query").n == int(
        enc["attention_mask"].sum())
    assert math.isfinite(float(cal.moments("bert.encoder.layer.5.attention.self.value",
                                           "output").m2.trace()))
    copy.deepcopy(model)  # the digest record is a plain attribute: deepcopy keeps working
