"""Misuse along calibrate → initialize → save/load (issue 8): wrong ranks and names, broken
or edited files, repeated calls, devices.  Each case asserts the error type and message, and
that a refused call changed nothing (see ``_state.snapshot``).

Covered elsewhere and not repeated: add_lora's rank checks for covinit layers
(test_lora), calibration / adapter files of another model (test_calibration,
test_lora_io), checksum flips and dtype edits of calibration tensors (test_calibration),
train() mode with dropout (test_calibration).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _loss import GRADIENT
from _state import snapshot
from conftest import TinyNet
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

import covinit
from covinit import (
    Calibration,
    add_lora,
    calibrate,
    estimate,
    find_adapters,
    initialize,
    load_lora,
    save_lora,
)
from covinit.calibration_data import _digest, _header_digest
from covinit.inits import _REGISTRY

TARGETS = ["query", "dense", "head"]


def _cal(model: nn.Module, data, targets=TARGETS, **kw) -> Calibration:
    return calibrate(model, data, targets=targets, show_progress=False, **kw)


def _data(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(16, 12, generator=gen) for _ in range(n)]


# ------------------------------------------------------------------ ranks and names
@pytest.mark.parametrize("rank", [0, -1, 6])
def test_add_lora_rank_outside_one_to_min_dk_is_refused_and_model_unchanged(make_tiny, rank):
    model = make_tiny()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"rank {rank} is invalid for layer 'head' of shape "
                                         r"\(d=5, k=12\); allowed: 1 <= rank <= min\(d, k\) = 5"):
        add_lora(model, ["head"], rank=rank)
    assert snapshot(model) == before


@pytest.mark.parametrize("strategy", [e.name for e in _REGISTRY])
def test_peft_rank_above_min_dk_is_refused_by_decomposing_strategies(make_tiny, adapt, strategy):
    """PEFT accepts r = 7 on a 5×12 layer; a decomposition cannot fill 7 directions, so the
    strategies that decompose refuse it up front (naming the layer), random ones work."""
    cal = _cal(make_tiny(), _data(), **GRADIENT)  # every strategy's sides
    model = adapt("peft", make_tiny(), ["head"], rank=7)
    entry = _REGISTRY.get(strategy)
    if not entry.tags["needs"] and entry.tags["preserves"] == "zero-delta":
        info = initialize(model, cal, strategy=strategy)
        assert info["head"]["rank"] == 7
        return
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"strategy '{strategy}' needs rank <= min\(d, k\) = 5 "
                                         r"but layer 'head' \(d=5, k=12\) has rank 7"):
        initialize(model, cal, strategy=strategy)
    assert snapshot(model) == before


@pytest.mark.parametrize("peft_init", ["pissa", "olora", "pissa_niter_4"])
def test_peft_base_rewriting_init_is_refused_and_saved_with_its_base(make_tiny, adapt,
                                                                    peft_init, tmp_path):
    """PEFT's PiSSA/OLoRA rewrite the base to W0 − c·B0·A0 and keep no record of W0:
    covinit refuses to calibrate or initialize such layers (their statistics and inits would
    be relative to the wrong base), and save_lora saves the rewritten base, so the file
    reloads onto a fresh model with the same function."""
    model = adapt("peft", make_tiny(), TARGETS, rank=2, init_lora_weights=peft_init)
    cal = _cal(make_tiny(), _data())
    before = snapshot(model)
    match = (rf"cannot (calibrate|initialize) layer 'block\.query': PEFT's "
             rf"init_lora_weights='{peft_init}' rewrote its base weight")
    with pytest.raises(ValueError, match=match):
        calibrate(model, _data(), show_progress=False)
    with pytest.raises(ValueError, match=match):
        initialize(model, cal, strategy="kaiming")
    with pytest.raises(ValueError, match=r"PEFT's init_lora_weights=.* rewrote its base"):
        covinit.export_lora(model, tmp_path / "x.safetensors")
    assert snapshot(model) == before
    assert all(a.base_replaced for a in find_adapters(model).values())
    save_lora(model, tmp_path / "a.safetensors")
    fresh = load_lora(make_tiny(), tmp_path / "a.safetensors")
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-5)
    w0 = make_tiny().head.weight
    assert not torch.allclose(fresh.head.base_layer.weight, w0, atol=1e-4)  # base came along


def test_unknown_names_list_the_valid_ones(make_tiny):
    model = add_lora(make_tiny(), ["head"], rank=2)
    cal = _cal(make_tiny(), _data())
    before = snapshot(model)
    valid = ", ".join(covinit.strategies())
    with pytest.raises(ValueError, match=rf"unknown strategy 'pca'; valid names: {valid}$"):
        initialize(model, cal, strategy="pca")
    names = ", ".join(covinit.estimators())
    # A baseline strategy uses no estimator, but a misspelt one is still an error.
    for strategy in ("kaiming", "input-pca"):
        with pytest.raises(ValueError, match=rf"unknown estimator 'ledoitwolf'; valid names: "
                                             rf"{names}$"):
            initialize(model, cal, strategy=strategy, estimator="ledoitwolf")
    with pytest.raises(ValueError, match=rf"unknown estimator 'lw'; valid names: {names}$"):
        estimate(cal.moments("head"), "lw")
    with pytest.raises(TypeError, match="strategy name must be a str, got NoneType"):
        initialize(model, cal, strategy=None)
    assert snapshot(model) == before


# ------------------------------------------------------------------ calibration files
def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _resave(path: Path, meta: dict, tensors: dict, *, fix_checksum: bool) -> Path:
    header = json.loads(meta["covinit"])
    if fix_checksum:  # a careful forger: recompute both checksums, reach the deeper checks
        header["sha256"] = _digest(tensors)
        header["header_sha256"] = _header_digest(header)
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata={**meta, "covinit": json.dumps(header)})
    return out


@pytest.fixture
def cal_file(tmp_path: Path) -> Path:
    path = tmp_path / "cal.safetensors"
    _cal(TinyNet().eval(), _data(), folds=2).save(path)
    return path


@pytest.mark.parametrize("cut", [0, 7, 100, 0.5, -1])
def test_truncated_calibration_file_is_refused(cal_file, cut):
    blob = cal_file.read_bytes()
    end = int(len(blob) * cut) if isinstance(cut, float) else cut
    cal_file.write_bytes(blob[:end])
    with pytest.raises(ValueError, match=r"cal\.safetensors is not a readable safetensors file"):
        Calibration.load(cal_file)


def test_missing_calibration_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Calibration.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(("edit", "message"), [
    # tensor replaced by one of another shape (checksum recomputed)
    (lambda h, t: t.__setitem__("head/input/m2", torch.zeros(11, 11, dtype=torch.float64)),
     r"moments field 'm2' has shape \(11, 11\), expected \(12, 12\)"),
    # a count edited to a negative number
    (lambda h, t: t.__setitem__("head/input/n", torch.tensor(-3)),
     r"moments count must be a non-negative int64, got -3"),
    # an extra tensor smuggled in
    (lambda h, t: t.__setitem__("head/input/extra", torch.zeros(1)),
     r"unexpected tensor 'head/input/extra'"),
    # a fold that no longer adds up to the total
    (lambda h, t: t.__setitem__("head/input/fold0/n", t["head/input/fold0/n"] + 1),
     r"fold counts of head/input do not add up to the total"),
    # metadata: a layer's width edited
    (lambda h, t: h["layers"].__setitem__("head", [12, 4]),
     r"head/output has width 5, expected 4"),
    # metadata: an unknown format version
    (lambda h, t: h.__setitem__("format_version", 99),
     r"calibration format version 99 is not supported"),
    # metadata: NaN written into a tensor
    (lambda h, t: t["head/input/m2"].__setitem__((0, 0), float("nan")),
     r"head/input holds NaN/Inf values"),
])
def test_tampered_calibration_file_is_refused_even_with_a_valid_checksum(cal_file, edit,
                                                                         message):
    meta, tensors = _read(cal_file)
    header = json.loads(meta["covinit"])
    edit(header, tensors)
    edited = _resave(cal_file, {**meta, "covinit": json.dumps(header)}, tensors,
                     fix_checksum=True)
    with pytest.raises(ValueError, match=message):
        Calibration.load(edited)


def test_malformed_metadata_is_refused(cal_file):
    meta, tensors = _read(cal_file)
    save_file(tensors, str(cal_file), metadata={**meta, "covinit": "{not json"})
    with pytest.raises(ValueError, match=r"malformed covinit metadata"):
        Calibration.load(cal_file)


@pytest.mark.parametrize("edit", [
    lambda h: h["fingerprint"]["layers"].__setitem__("extra", [3, 3]),  # "another model"
    lambda h: h["layers"].__setitem__("head", [12, 4]),
    lambda h: h["info"].__setitem__("batches", 99),
    lambda h: h.__setitem__("shared_inputs", {"head": "block.query"}),
])
def test_edited_metadata_is_detected(cal_file, edit):
    meta, tensors = _read(cal_file)
    header = json.loads(meta["covinit"])
    edit(header)
    edited = _resave(cal_file, {**meta, "covinit": json.dumps(header)}, tensors,
                     fix_checksum=False)
    with pytest.raises(ValueError, match=r"edited\.safetensors: metadata checksum mismatch; "
                                         r"the layers, fingerprint or other metadata were "
                                         r"modified"):
        Calibration.load(edited)


# ------------------------------------------------------------------ adapter files
@pytest.fixture
def adapter_file(tmp_path: Path, make_tiny) -> Path:
    model = add_lora(make_tiny(), TARGETS, rank=2)
    initialize(model, strategy="pissa", seed=1)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    return path


@pytest.mark.parametrize("cut", [0, 9, 0.5, -4])
@pytest.mark.parametrize("onto", ["plain", "adapted"])
def test_truncated_adapter_file_is_refused_and_model_unchanged(adapter_file, make_tiny, cut,
                                                               onto):
    blob = adapter_file.read_bytes()
    end = int(len(blob) * cut) if isinstance(cut, float) else cut
    adapter_file.write_bytes(blob[:end])
    model = make_tiny() if onto == "plain" else add_lora(make_tiny(), TARGETS, rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter\.safetensors: not a readable safetensors"):
        load_lora(model, adapter_file)
    assert snapshot(model) == before


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.__setitem__("head.lora_A", t["head.lora_A"].to(torch.int32)),
     r"tensor 'head\.lora_A' has non-floating dtype torch\.int32"),
    (lambda t: t.__setitem__("head.lora_B", torch.zeros(5, 3)),
     r"tensor 'head\.lora_B' has shape \(5, 3\)"),
    (lambda t: t.__setitem__("head.base_weight", torch.full((5, 12), float("inf"))),
     r"tensor 'head\.base_weight' contains NaN or Inf"),
    (lambda t: t.pop("block.dense.lora_A"), r"tensor 'block\.dense\.lora_A' is missing"),
])
@pytest.mark.parametrize("onto", ["plain", "adapted"])
def test_tampered_adapter_tensors_are_refused_before_anything_changes(adapter_file, make_tiny,
                                                                      edit, message, onto):
    meta, tensors = _read(adapter_file)
    edit(tensors)
    save_file(tensors, str(adapter_file), metadata=meta)
    model = make_tiny() if onto == "plain" else add_lora(make_tiny(), TARGETS, rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_lora(model, adapter_file)
    assert snapshot(model) == before


def test_adapter_saved_in_half_precision_is_cast_to_the_layer_dtype(adapter_file, make_tiny):
    """A floating dtype change (e.g. a tool re-saving in fp16) is accepted and cast, as PEFT
    does; the loaded factors are the fp16 values exactly."""
    meta, tensors = _read(adapter_file)
    half = {k: v.half() for k, v in tensors.items()}
    save_file(half, str(adapter_file), metadata=meta)
    model = load_lora(make_tiny(), adapter_file)
    a, b = find_adapters(model)["head"].get_lora()
    assert a.dtype == torch.float32
    assert torch.equal(a, half["head.lora_A"].float()) and torch.equal(
        b, half["head.lora_B"].float())


# ------------------------------------------------------------------ repeated calls
def test_calibrate_twice_does_not_stack_hooks_and_restores_them(make_tiny):
    model = make_tiny()
    user_hook = model.head.register_forward_hook(lambda m, i, o: None)
    before = snapshot(model)
    counts = []

    def forward_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        counts.append(sum(len(mod._forward_hooks) for mod in m.modules()))
        return m(x)

    first = _cal(model, _data(), forward_fn=forward_fn)
    second = _cal(model, _data(), forward_fn=forward_fn)
    assert counts == [4] * 6  # 3 calibration hooks + the user's, in both calls
    assert snapshot(model) == before
    for layer in first.layer_names:
        assert torch.equal(first.moments(layer).m2, second.moments(layer).m2)
    user_hook.remove()


def test_calibrate_twice_on_a_lora_model_reinitializes_from_base_statistics(make_tiny):
    """The second call sees the same base-layer activations (the LoRA branch is not hooked),
    so the same seed gives the same factors."""
    model = add_lora(make_tiny(), TARGETS, rank=2)
    _cal(model, _data(), strategy="input-pca", seed=3)
    first = {n: [t.clone() for t in a.get_lora()] for n, a in find_adapters(model).items()}
    _cal(model, _data(), strategy="input-pca", seed=3)
    for name, adapter in find_adapters(model).items():
        for mine, again in zip(first[name], adapter.get_lora(), strict=True):
            assert torch.equal(mine, again)


# ------------------------------------------------------------------ devices
def test_model_on_meta_device_is_refused_clearly():
    """A model that was never materialised (``device="meta"``, e.g. from an
    ``init_empty_weights`` context) cannot be calibrated."""
    model = nn.Sequential(nn.Linear(4, 3)).to("meta")
    with pytest.raises(ValueError, match=r"layer '0' input: the activation is on the meta "
                                         r"device, so the model's weights were never loaded"):
        _cal(model, [torch.randn(2, 4)], ["0"])
    assert not model[0]._forward_hooks


def test_data_device_different_from_model_names_both_devices():
    """``device="meta"`` stands in for "a device the model is not on" on a CPU-only machine.
    torch's own error type and message are kept; calibrate adds a note naming both devices."""
    model = nn.Sequential(nn.Linear(4, 3))
    before = snapshot(model)
    with pytest.raises(RuntimeError) as info:
        _cal(model, [torch.randn(2, 4)], ["0"], device="meta")
    assert info.value.__notes__ == [
        "calibrate moved the batch to device='meta' but the model's first parameter is on "
        "'cpu'; pass device=None to follow the model, or move the model"]
    assert snapshot(model) == before


def test_user_runtime_errors_get_no_device_note(make_tiny):
    def forward_fn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match=r"^user bug$") as info:
        _cal(make_tiny(), _data(), forward_fn=forward_fn)
    assert not hasattr(info.value, "__notes__")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CPU-only "
                    "machines cannot hold a model and its data on two real devices")
@pytest.mark.parametrize("where", ["model-on-cuda", "data-on-cuda"])
def test_batches_follow_the_model_device(where):
    torch.manual_seed(0)
    cpu_model = TinyNet().eval()
    data = _data()
    ref = _cal(cpu_model, data)
    if where == "model-on-cuda":
        model, batches = TinyNet().eval(), data
        model.load_state_dict(cpu_model.state_dict())
        model.cuda()
    else:
        model, batches = cpu_model, [x.cuda() for x in data]
    cal = _cal(model, batches)
    for layer in ref.layer_names:
        got, want = cal.moments(layer), ref.moments(layer)
        torch.testing.assert_close(got.m2.cpu(), want.m2, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ repeated initialization
@pytest.mark.parametrize("second", ["kaiming", "pissa"])
def test_reinitializing_after_a_residual_init_keeps_the_function(make_tiny, second):
    model = add_lora(make_tiny(), ["head"], rank=2)
    x = torch.randn(4, 12)
    want = make_tiny()(x).detach()
    initialize(model, strategy="pissa")
    torch.testing.assert_close(model(x).detach(), want)  # first init: function kept
    initialize(model, strategy=second)
    torch.testing.assert_close(model(x).detach(), want)


# ------------------------------------------------------------------ writing files
@pytest.mark.parametrize("writer", ["save_lora", "export_lora", "calibration"])
def test_failed_write_raises_and_leaves_model_unchanged(tmp_path, make_tiny, writer):
    model = add_lora(make_tiny(), TARGETS, rank=2)
    cal = _cal(make_tiny(), _data())
    initialize(model, cal, strategy="cov-svd")
    before = snapshot(model)
    target = tmp_path / "missing-dir" / "out.safetensors"
    write = {"save_lora": lambda: save_lora(model, target),
             "export_lora": lambda: covinit.export_lora(model, target),
             "calibration": lambda: cal.save(target)}[writer]
    # safetensors writes a temporary file and renames it, so an existing file at the path
    # would survive a failed write as well.
    with pytest.raises(SafetensorError, match=r"No such file or directory"):
        write()
    assert snapshot(model) == before and not target.exists()
