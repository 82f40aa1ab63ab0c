"""Residual inits and PEFT's ordinary saving (issue 14, items 1 and 5).

A residual strategy rewrites base weights.  These tests check, on real PEFT models built from
tiny random Llama (``nn.Linear``) and GPT-2 (``Conv1D``) configs, that PEFT's own
``save_pretrained``, ``Trainer`` checkpoints, ``trainer.save_model`` and resuming from a
checkpoint give the trained model back on an untouched base; that
:func:`covinit.restore_base` gives ``disable_adapter`` / ``unload`` / a second adapter the
original weights; and that a bf16 residual init rounds once.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from covinit import add_lora, calibrate, find_adapters, initialize, restore_base
from covinit.residual import residual_offset

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 64
# (builder, LoRA targets): Llama's projections are nn.Linear, GPT-2's are HF Conv1D.
MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1)), ["q_proj", "v_proj", "o_proj"]),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32)),
        ["c_attn", "c_proj"]),
}


def _base(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same tiny random model every call (seeded), in eval mode."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = MODELS[kind][0]().to(dtype).eval()
    torch.random.set_rng_state(state)
    return model


def _batches(n: int = 3, seed: int = 1) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 12), generator=g)} for _ in range(n)]


def _peft_model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODELS[kind][1],
                             fan_in_fan_out=kind == "gpt2")
    return peft.get_peft_model(_base(kind, dtype), config)


def _train(model: nn.Module, steps: int = 4, lr: float = 2e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for batch in _batches(steps, seed=5):
        opt.zero_grad()
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        opt.step()
    model.eval()


def _logits(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(input_ids=_batches(1, seed=9)[0]["input_ids"]).logits.float()


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy", ["cov-svd", "two-sided"])
def test_save_pretrained_after_a_residual_init_loads_onto_the_untouched_base(
        kind, strategy, tmp_path):
    model = _peft_model(kind)
    calibrate(model, _batches(), strategy=strategy, show_progress=False)
    _train(model)
    trained = _logits(model)
    assert _max_diff(trained, _logits(_base(kind))) > 0.05  # training moved the model
    model.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(_base(kind), tmp_path)
    # Before the fix: max |Δ logit| 0.1-0.6 here (0.5 on MiniLM), no warning.
    assert _max_diff(_logits(fresh), trained) < 1e-5
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert set(config["rank_pattern"].values()) == {8}  # r + r: [A; A0], [B, −B0]
    # The live model is untouched: still rank 4 on its residual base, still trainable.
    assert {a.rank for a in find_adapters(model).values()} == {4}
    assert _max_diff(_logits(model), trained) == 0.0


def test_save_pretrained_after_a_residual_init_on_dora_keeps_the_trained_magnitude(tmp_path):
    """DoRA normalises W0 + s·B·A column-wise; the folded adapter gives the same matrix on
    the untouched base, and PEFT saves the trained magnitude as it is (before: refused)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODELS["llama"][1],
                             use_dora=True)
    model = peft.get_peft_model(_base("llama"), config)
    calibrate(model, _batches(), strategy="cov-svd", show_progress=False)
    _train(model)
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(_base("llama"), tmp_path)
    assert _max_diff(_logits(fresh), trained) < 1e-5


@pytest.mark.slow
def test_save_pretrained_on_minilm(tmp_path):
    """The issue's own case: MiniLM, cov-svd, a classifier head in modules_to_save."""
    import zoo

    try:
        zoo.load_minilm()
    except ImportError as err:  # the model package is optional
        pytest.skip(str(err))

    def fresh_base() -> nn.Module:
        torch.manual_seed(0)  # the classifier head is random: the same one every time
        return zoo.load_minilm()[0].eval()

    _, tok = zoo.load_minilm()
    texts = ["a quietly moving film", "dull, overlong and badly acted", "fine", "a mess"]
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    model = peft.get_peft_model(fresh_base(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    calibrate(model, [batch], strategy="cov-svd", show_progress=False)
    labels = torch.tensor([1, 0, 1, 0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path)
    fresh = peft.PeftModel.from_pretrained(fresh_base(), tmp_path)
    with torch.no_grad():
        assert _max_diff(fresh(**batch).logits, trained) < 1e-5


def test_only_the_initialized_instance_is_hooked(tmp_path):
    model = _peft_model("llama")
    other = _peft_model("llama")
    initialize(model, strategy="pissa")
    assert "save_pretrained" in vars(model)
    assert "save_pretrained" not in vars(other)  # PEFT's class is not patched
    assert type(model).save_pretrained is peft.PeftModel.save_pretrained
    # A non-residual re-init restores W0 and drops the record: PEFT's own save is right.
    initialize(model, strategy="kaiming")
    assert not any(residual_offset(m) is not None for m in model.modules())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not config.get("rank_pattern")


def test_path_initial_model_conversion_is_refused(tmp_path):
    model = _peft_model("llama")
    initialize(model, strategy="pissa")
    with pytest.raises(ValueError, match=r"already\s+writes the converted adapter"):
        model.save_pretrained(tmp_path / "a", path_initial_model_for_weight_conversion=str(
            tmp_path / "init"))


def test_initializing_the_inner_lora_model_warns_with_the_call_to_use():
    model = _peft_model("llama")
    with pytest.warns(UserWarning, match=r"covinit\.export_lora\(peft_model, directory, "
                                         r"format='peft'\)") as record:
        initialize(model.base_model, strategy="pissa")
    assert {w.filename for w in record} == {__file__}  # points at the call, not at covinit


def test_saving_another_active_adapter_is_refused(tmp_path):
    model = _peft_model("llama")
    initialize(model, strategy="pissa")
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("other")
    with pytest.raises(ValueError, match=r"set_adapter\('default'\).*restore_base"):
        model.save_pretrained(tmp_path)


# ---------------------------------------------------------------------- Trainer
def _trainer(model: nn.Module, out: str, steps: int, callbacks: list | None = None):
    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = transformers.TrainingArguments(
        output_dir=out, max_steps=steps, save_steps=2, per_device_train_batch_size=4,
        learning_rate=2e-2, report_to=[], use_cpu=True, logging_strategy="no",
        disable_tqdm=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Data(),
                                callbacks=callbacks)


def test_trainer_checkpoints_save_model_and_resume(tmp_path):
    from covinit.callbacks import ExportAdapterCallback

    model = _peft_model("llama")
    calibrate(model, _batches(), strategy="cov-svd", show_progress=False)
    trainer = _trainer(model, str(tmp_path / "run"), 4,
                       callbacks=[ExportAdapterCallback()])
    trainer.train()
    model.eval()
    trained = _logits(model)
    final = tmp_path / "run" / "checkpoint-4"
    for path in (final, final / "adapter-for-original-base"):
        fresh = peft.PeftModel.from_pretrained(_base("llama"), path)
        assert _max_diff(_logits(fresh), trained) < 1e-5, path
    trainer.save_model(str(tmp_path / "final"))
    fresh = peft.PeftModel.from_pretrained(_base("llama"), tmp_path / "final")
    assert _max_diff(_logits(fresh), trained) < 1e-5

    # Resume: the same init in a new process, then checkpoint-2's converted adapter is split
    # back into the residual model's rank-4 factors; two more steps reach the same model.
    again = _peft_model("llama")
    calibrate(again, _batches(), strategy="cov-svd", show_progress=False)
    _trainer(again, str(tmp_path / "run"), 4).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    again.eval()
    assert {a.rank for a in find_adapters(again).values()} == {4}
    assert _max_diff(_logits(again), trained) < 1e-4


def test_resuming_into_a_different_init_is_refused(tmp_path):
    model = _peft_model("llama")
    calibrate(model, _batches(), strategy="cov-svd", show_progress=False)
    _train(model, steps=1)
    model.save_pretrained(tmp_path)
    other = _peft_model("llama")
    initialize(other, strategy="pissa")  # a different residual init
    with pytest.raises(ValueError, match="step-0 part differs"):
        other.load_adapter(str(tmp_path), "default", is_trainable=True)


# ---------------------------------------------------------------------- restore_base
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_restore_base_gives_disable_unload_and_a_second_adapter_the_original_base(
        kind, tmp_path):
    untouched = _logits(_base(kind))
    model = _peft_model(kind)
    calibrate(model, _batches(), strategy="two-sided", show_progress=False)
    _train(model)
    trained = _logits(model)
    with model.disable_adapter():
        assert _max_diff(_logits(model), untouched) > 0.05  # the rewritten base (the bug)
    assert sorted(restore_base(model)) == sorted(find_adapters(model))
    assert _max_diff(_logits(model), trained) < 1e-5  # same function
    with model.disable_adapter():
        assert _max_diff(_logits(model), untouched) < 1e-5
    model.save_pretrained(tmp_path / "restored")  # PEFT's own save, no record left
    fresh = peft.PeftModel.from_pretrained(_base(kind), tmp_path / "restored")
    assert _max_diff(_logits(fresh), trained) < 1e-5
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=MODELS[kind][1],
                                                fan_in_fan_out=kind == "gpt2"))
    model.set_adapter("second")  # B = 0: the second adapter sees W0
    assert _max_diff(_logits(model), untouched) < 1e-5
    assert _max_diff(_logits(copy.deepcopy(model).unload()), untouched) < 1e-5
    assert restore_base(model) == []  # nothing left to restore


def test_restore_base_on_covinit_layers_and_without_a_record():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 6))
    w0 = net[0].weight.detach().clone()
    model = add_lora(net, ["0", "2"], rank=3)
    initialize(model, strategy="pissa", layers=["0"])
    x = torch.randn(5, 12)
    before = model(x)
    assert restore_base(model) == ["0"]
    assert model[0].rank == 6 and model[2].rank == 3
    assert not model[0].base_replaced
    assert torch.allclose(model[0].base_layer.weight, w0, atol=1e-6)
    assert torch.allclose(model(x), before, atol=1e-5)
    pissa = peft.get_peft_model(_base("llama"), peft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="rewrote its base weight"):
        restore_base(pissa)


# ---------------------------------------------------------------------- bf16
def _structured_layer(dtype: torch.dtype) -> Callable[[], nn.Module]:
    """A 64→48 layer whose weight has a dominant rank-4 part (as trained weights do), so a
    residual init moves most of W0 into the adapter."""
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(48, 4, generator=g), torch.randn(4, 64, generator=g)
    w = u @ v / 4 + 0.02 * torch.randn(48, 64, generator=g)

    def make() -> nn.Module:
        layer = nn.Linear(64, 48, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        return nn.Sequential(layer).to(dtype)

    return make


@pytest.mark.parametrize("kind", ["covinit", "peft"])
def test_bf16_residual_init_rounds_once(kind):
    make = _structured_layer(torch.bfloat16)
    plain = make()
    w0 = plain[0].weight.detach().to(torch.float64)
    if kind == "covinit":
        model = add_lora(make(), ["0"], rank=4, alpha=8)
    else:
        model = peft.get_peft_model(make(), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["0"]), autocast_adapter_dtype=False)
    info = initialize(model, strategy="pissa")
    adapter = find_adapters(model)["0"]
    a, b = (t.to(torch.float64) for t in adapter.get_lora())
    assert a.dtype == torch.float64 and adapter.get_lora()[0].dtype == torch.bfloat16
    effective = adapter.base_weight().to(torch.float64) + info["0"]["scaling"] * b @ a
    err = float(torch.linalg.norm(effective - w0) / torch.linalg.norm(w0))
    # One rounding of the small residual base: 6.6e-5 here.  Rounding the base and the
    # factors separately (before the fix) left 2.1e-3: bf16's relative step (2^-8) on the
    # part moved into the adapter.
    assert err < 5e-4
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        out, ref = model(x).to(torch.float64), plain(x).to(torch.float64)
    # The forward itself adds two bf16 results; it stays within a few bf16 steps.
    assert float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref)) < 1e-2
