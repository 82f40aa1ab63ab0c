"""export_lora: adapters of residual strategies, folded to apply to the original base."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TinyNet
from safetensors import safe_open
from torch import Tensor, nn

from covinit import (
    add_lora,
    calibrate,
    export_lora,
    find_adapters,
    initialize,
    load_lora,
    save_lora,
)
from covinit.residual import OFFSET_BUFFERS, residual_offset

TARGETS = ["query", "dense", "head"]


def _data(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g) * torch.logspace(0, -1, 12)[:, None]
    return [torch.randn(64, 12, generator=g) @ mix + 0.3 for _ in range(3)]


@pytest.fixture(scope="module")
def calibration():
    torch.manual_seed(0)
    return calibrate(TinyNet().eval(), _data(), targets=TARGETS, show_progress=False)


def _train(model: nn.Module, steps: int = 5) -> None:
    """A few SGD steps on a fixed regression target (moves every trainable tensor)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(32, 12, generator=g)
    target = torch.randn(32, 5, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["covinit"])


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_r", "rslora"])
@pytest.mark.parametrize("strategy", ["cov-svd", "two-sided", "pissa"])
def test_covinit_round_trip_after_training(strategy, use_rslora, calibration, make_tiny,
                                           tmp_path):
    model = add_lora(make_tiny(), TARGETS, rank=3, alpha=6.0, use_rslora=use_rslora)
    initialize(model, calibration, strategy=strategy)
    _train(model)
    path = tmp_path / "exported.safetensors"
    export_lora(model, path)
    fresh_base = make_tiny()
    fresh = load_lora(fresh_base, path)
    x = torch.randn(16, 12)
    assert _rel(fresh(x), model(x)) < 1e-5
    for name, adapter in find_adapters(fresh).items():
        # 2r = 6, except for head (5×12): its rank is capped at min(d, k) = 5.
        assert adapter.rank == (5 if name == "head" else 6) and not adapter.base_replaced
        assert adapter.scaling == pytest.approx(find_adapters(model)[name].scaling)
        # The fresh base weight is the original one: nothing but the adapter was loaded.
        assert torch.equal(adapter.base_weight(), find_adapters(make_tiny_adapted(make_tiny))
                           [name].base_weight())
    layers = _meta(path)["layers"]
    for name, lm in layers.items():
        r = 5 if name == "head" else 6
        c = 6.0 / math.sqrt(3) if use_rslora else 6.0 / 3
        assert lm["alpha"] == pytest.approx(c * (math.sqrt(r) if use_rslora else r))
        assert lm["folded_residual"]


def make_tiny_adapted(make_tiny) -> nn.Module:
    return add_lora(make_tiny(), TARGETS, rank=1)


def test_non_residual_layers_keep_their_rank(calibration, make_tiny, tmp_path):
    model = add_lora(make_tiny(), TARGETS, rank=3)
    initialize(model, calibration, strategy="input-pca")
    initialize(model, calibration, strategy="cov-svd", layers=["head"])
    _train(model)
    path = tmp_path / "mixed.safetensors"
    export_lora(model, path)
    fresh = load_lora(make_tiny(), path)
    ranks = {n: a.rank for n, a in find_adapters(fresh).items()}
    assert ranks == {"block.query": 3, "block.dense": 3, "head": 5}  # min(5, 2·3)
    x = torch.randn(8, 12)
    assert _rel(fresh(x), model(x)) < 1e-5


def test_repeated_residual_inits_start_from_the_original_weight(calibration, make_tiny,
                                                                 tmp_path):
    model = add_lora(make_tiny(), TARGETS, rank=2)
    x = torch.randn(8, 12)
    want = make_tiny()(x).detach()
    initialize(model, calibration, strategy="cov-svd")
    initialize(model, calibration, strategy="pissa")  # decomposes W0 again, not the residual
    p, q = residual_offset(model.head)
    assert p.shape == (5, 2) and q.shape == (2, 12)  # one record: the last init's
    assert _rel(model(x), want) < 1e-5
    initialize(model, strategy="kaiming")  # restores W0 and forgets the record
    assert residual_offset(model.head) is None
    assert not model.head.base_replaced  # the base is W0 again: nothing to save or refuse
    assert _rel(model(x), want) < 1e-5
    export_lora(model, tmp_path / "restored.safetensors")
    initialize(model, calibration, strategy="cov-svd")
    _train(model)
    path = tmp_path / "twice.safetensors"
    export_lora(model, path)
    fresh = load_lora(make_tiny(), path)
    assert fresh.block.query.rank == 4 and fresh.head.rank == 4
    assert _rel(fresh(x), model(x)) < 1e-5


def test_offsets_are_buffers_outside_the_state_dict(calibration, make_tiny):
    model = add_lora(make_tiny(), TARGETS, rank=2)
    keys = set(model.state_dict())
    initialize(model, calibration, strategy="cov-svd")
    assert set(model.state_dict()) == keys
    model.double()
    p, q = residual_offset(model.block.query)
    assert p.dtype == torch.float64 and q.dtype == torch.float64
    assert set(OFFSET_BUFFERS) <= {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()}


def test_reloaded_residual_adapter_still_exports(calibration, make_tiny, tmp_path):
    """save_lora keeps the offset W0 = base + P·Q, so an adapter reloaded from a file exports
    onto the original base like the one that was trained."""
    model = add_lora(make_tiny(), TARGETS, rank=2)
    initialize(model, calibration, strategy="cov-svd")
    _train(model)
    save_lora(model, tmp_path / "residual.safetensors")  # carries the residual base + offset
    reloaded = load_lora(make_tiny(), tmp_path / "residual.safetensors")
    for name in ("block.query", "block.dense", "head"):
        want, got = residual_offset(model.get_submodule(name)), residual_offset(
            reloaded.get_submodule(name))
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), name
    export_lora(reloaded, tmp_path / "folded.safetensors")
    fresh = load_lora(make_tiny(), tmp_path / "folded.safetensors")
    x = torch.randn(8, 12)
    assert _rel(fresh(x), model(x)) < 1e-5
    # Loading a non-residual file over it drops the stale record.
    plain = add_lora(make_tiny(), TARGETS, rank=2)
    save_lora(plain, tmp_path / "plain.safetensors")
    load_lora(reloaded, tmp_path / "plain.safetensors")
    assert residual_offset(reloaded.head) is None


def test_base_without_record_is_refused(calibration, make_tiny, tmp_path):
    model = add_lora(make_tiny(), TARGETS, rank=2)
    initialize(model, calibration, strategy="kaiming")
    head = find_adapters(model)["block.query"]
    head.set_base_weight(head.base_weight() * 0.5)  # replaced outside covinit.initialize
    with pytest.raises(ValueError, match=r"layer 'block\.query': its base weight was "
                                         r"replaced, but covinit has no record"):
        export_lora(model, tmp_path / "x.safetensors")
    model = add_lora(make_tiny(), TARGETS, rank=2)
    with pytest.raises(ValueError, match="format must be"):
        export_lora(model, tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match=r"needs a peft\.PeftModel"):
        export_lora(model, tmp_path / "x", format="peft")


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_r", "rslora"])
def test_peft_round_trip_after_training(use_rslora, calibration, make_tiny, adapt, tmp_path):
    from peft import PeftModel

    model = adapt("peft", make_tiny(), TARGETS[:2], rank=3, alpha=6.0, use_rslora=use_rslora,
                  modules_to_save=["head"])
    initialize(model, calibration, strategy="cov-svd")
    _train(model)
    x = torch.randn(16, 12)
    # PEFT directory, loaded by PEFT itself onto a fresh base.
    export_lora(model, tmp_path / "peft", format="peft")
    fresh = PeftModel.from_pretrained(make_tiny(), tmp_path / "peft")
    assert {a.rank for a in find_adapters(fresh).values()} == {6}
    assert _rel(fresh(x), model(x)) < 1e-5
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    want_alpha = 6.0 * (math.sqrt(2) if use_rslora else 2)
    assert config["alpha_pattern"] == {"block.query": pytest.approx(want_alpha),
                                       "block.dense": pytest.approx(want_alpha)}
    assert config["init_lora_weights"] is True
    # covinit's file from the same PEFT model, onto a plain base (head not included: it
    # is PEFT's modules_to_save, so compare before the head).
    export_lora(model, tmp_path / "c.safetensors")
    plain = load_lora(make_tiny(), tmp_path / "c.safetensors", strict=False)
    inner = model.base_model.model.block
    assert _rel(plain.block(x), inner(x)) < 1e-5


@pytest.mark.parametrize("kind", ["covinit", "peft", "loralib"])
def test_calibrating_after_a_residual_init_records_the_original_outputs(kind, adapt,
                                                                        make_tiny):
    """A residual base W0 − P·Q outputs something else than W0: the output hook adds x·Qᵀ·Pᵀ
    back, so a second calibration sees the statistics of the first (and re-inits agree)."""
    plain = calibrate(make_tiny(), _data(), targets=TARGETS, show_progress=False)
    model = adapt(kind, make_tiny(), TARGETS, rank=2)
    calibrate(model, _data(), strategy="cov-svd", show_progress=False)
    assert residual_offset(find_adapters(model)["head"].module) is not None
    again = calibrate(model, _data(), strategy="two-sided", show_progress=False)
    for name in ("block.query", "head"):
        for side in ("input", "output"):
            want, got = plain.moments(name, side), again.moments(name, side)
            assert torch.allclose(got.mean, want.mean, rtol=1e-5, atol=1e-6), (name, side)
            assert torch.allclose(got.m2, want.m2, rtol=1e-5, atol=1e-5), (name, side)


@pytest.mark.parametrize("kind", ["covinit", "peft", "loralib"])
def test_output_statistics_describe_w0_after_training(kind, adapt, make_tiny):
    """Non-zero B (a trained adapter): loralib-style layers are hooked whole, so their output
    holds c·B·A·x, which calibration takes out again.  Oracle: the output side of a linear
    layer is W0 applied to its input side (mean W0·μ + b, co-moment W0·M2·W0ᵀ)."""
    original = make_tiny()
    model = adapt(kind, make_tiny(), TARGETS, rank=2)
    for adapter in find_adapters(model).values():
        a, b = adapter.get_lora()
        adapter.set_lora(a, torch.randn_like(b))
    cal = calibrate(model, _data(), strategy="two-sided", overwrite=True, show_progress=False)
    for name in ("block.query", "block.dense", "head"):
        w0 = original.get_submodule(name).weight.double()
        b0 = original.get_submodule(name).bias.double()
        x, y = cal.moments(name, "input"), cal.moments(name, "output")
        assert torch.allclose(y.mean, w0 @ x.mean + b0, rtol=1e-5, atol=1e-5), name
        assert torch.allclose(y.m2, w0 @ x.m2 @ w0.T, rtol=1e-5, atol=1e-4), name
