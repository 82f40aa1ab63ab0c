"""save_lora / load_lora: exact round trips and loud failures on bad files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ADAPTER_KINDS
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from covinit import LoRALinear, add_lora, find_adapters, initialize, load_lora, save_lora

TARGETS = ["query", "dense", "head"]


def _trained(make_tiny, strategy="pissa", **kwargs) -> nn.Module:
    model = add_lora(make_tiny(), TARGETS, **kwargs)
    initialize(model, strategy=strategy, seed=4)
    with torch.no_grad():  # move B away from its init, as training would
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.add_(0.01 * torch.randn_like(m.lora_B))
    return model


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["covinit"]), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(path, meta, tensors):
    save_file(tensors, str(path), metadata={"covinit": json.dumps(meta)})


@pytest.mark.parametrize("strategy", ["kaiming", "pissa"])
def test_round_trip_onto_fresh_model_is_exact(tmp_path, make_tiny, strategy):
    model = _trained(make_tiny, strategy, rank=3, alpha=5, use_rslora=True, dropout=0.1)
    path = tmp_path / "adapter.safetensors"
    save_lora(model, path)
    meta, tensors = _read(path)
    replaced = {n for n, lm in meta["layers"].items() if lm["base_replaced"]}
    assert replaced == (set(meta["layers"]) if strategy == "pissa" else set())
    assert sorted(tensors) == sorted(
        [f"{n}.{s}" for n in meta["layers"] for s in ("lora_A", "lora_B")]
        + [f"{n}.{s}" for n in replaced for s in ("base_weight", "offset_P", "offset_Q")])
    assert all(lm["offset_rank"] == (3 if n in replaced else 0)
               for n, lm in meta["layers"].items())
    assert meta["layers"]["head"]["scaling"] == pytest.approx(5 / 3**0.5)
    fresh = load_lora(make_tiny(), path)
    assert isinstance(fresh.block.query, LoRALinear)
    assert fresh.block.query.use_rslora and fresh.block.query.dropout == 0.1
    model.eval()
    fresh.eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
    # Saving the loaded model again gives the same file contents.
    again = tmp_path / "again.safetensors"
    save_lora(fresh, again)
    meta2, tensors2 = _read(again)
    assert meta2 == meta and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_round_trip_onto_existing_adapters(tmp_path, make_tiny, adapt, kind):
    source = adapt(kind, make_tiny(), TARGETS, rank=2, alpha=4)
    initialize(source, strategy="pissa")
    path = tmp_path / "a.safetensors"
    save_lora(source, path)
    target = adapt(kind, make_tiny(), TARGETS, rank=2, alpha=4)
    load_lora(target, path)
    for name, adapter in find_adapters(target).items():
        want = find_adapters(source)[name]
        for got_t, want_t in zip(adapter.get_lora(), want.get_lora(), strict=True):
            assert torch.equal(got_t, want_t)
        assert torch.equal(adapter.base_weight(), want.base_weight())
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_peft_file_loads_onto_plain_model(tmp_path, make_tiny, adapt):
    source = adapt("peft", make_tiny(), TARGETS, rank=2, alpha=3, use_rslora=True)
    initialize(source, strategy="gaussian")
    with torch.no_grad():
        for adapter in find_adapters(source).values():
            a, b = adapter.get_lora()
            adapter.set_lora(a, torch.randn_like(b))
    path = tmp_path / "p.safetensors"
    save_lora(source, path)
    plain = load_lora(make_tiny(), path)
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.allclose(plain(x), source(x), atol=1e-6)
    assert plain.head.scaling == pytest.approx(3 / 2**0.5)


# ---------------------------------------------------------------------- refusals
@pytest.fixture
def saved(tmp_path, make_tiny):
    path = tmp_path / "adapter.safetensors"
    save_lora(_trained(make_tiny, rank=2), path)
    return path


def _refused(model, path, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_lora(model, path)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_other_model_is_refused(saved, make_tiny):
    wider = nn.Sequential()
    wider.block = make_tiny().block
    wider.head = nn.Linear(12, 7)
    _refused(wider, saved, r"layer 'head' has shape \(5, 12\) in the saved model but \(7, 12\)")
    other = nn.Sequential(nn.Linear(12, 5))
    _refused(other, saved, r"layer 'block\.query' of the saved model does not exist")
    extra = make_tiny()
    extra.extra = nn.Linear(3, 3)
    _refused(extra, saved, r"this model has linear layer 'extra'")
    load_lora(extra, saved, strict=False)  # allowed when asked
    assert isinstance(extra.head, LoRALinear)


def test_rank_or_scaling_mismatch_with_existing_adapter(saved, make_tiny):
    _refused(add_lora(make_tiny(), ["head"], rank=3), saved,
             r"'head' has rank 2 in the file but its adapter in the model has rank 3")
    _refused(add_lora(make_tiny(), ["head"], rank=2, alpha=3), saved,
             r"'head' has scaling 8.0 in the file but 1.5 in the model")


def test_wrong_tensor_shape_is_refused(saved, make_tiny):
    meta, tensors = _read(saved)
    tensors["head.lora_B"] = torch.zeros(5, 3)
    _rewrite(saved, meta, tensors)
    _refused(make_tiny(), saved, r"tensor 'head\.lora_B' has shape \(5, 3\), expected \(5, 2\)")


def test_files_without_offsets_still_load(saved, make_tiny):
    """Files written before save_lora kept the residual offset: no ``offset_rank``, no
    offset tensors; they load (residual base included), only without the record."""
    from covinit.residual import residual_offset

    meta, tensors = _read(saved)
    for lm in meta["layers"].values():
        del lm["offset_rank"]
    _rewrite(saved, meta, {k: v for k, v in tensors.items() if ".offset_" not in k})
    model = load_lora(make_tiny(), saved)
    assert torch.equal(model.head.base_layer.weight, tensors["head.base_weight"])
    assert residual_offset(model.head) is None


def test_missing_and_extra_tensors_are_refused(saved, make_tiny):
    meta, tensors = _read(saved)
    assert meta["layers"]["head"]["offset_rank"] == 2  # the saved model is residual
    _rewrite(saved, meta, {k: v for k, v in tensors.items() if k != "head.offset_Q"})
    _refused(make_tiny(), saved, r"tensor 'head\.offset_Q' is missing")
    _rewrite(saved, meta, {k: v for k, v in tensors.items() if k != "head.base_weight"})
    _refused(make_tiny(), saved, r"tensor 'head\.base_weight' is missing")
    _rewrite(saved, meta, {**tensors, "stowaway": torch.zeros(1)})
    _refused(make_tiny(), saved, r"unexpected tensors \['stowaway'\]")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"]["head"].update(scaling=2.0),
     r"'head': scaling 2.0 is inconsistent with alpha=16.0, rank=2"),
    (lambda m: m["layers"]["head"].update(rank=4, scaling=4.0),
     r"tensor 'head\.lora_A' has shape \(2, 12\), expected \(4, 12\)"),
    (lambda m: m["fingerprint"]["layers"].update(head=[5, 13]),
     "does not match its checksum"),
    (lambda m: m.update(version=99), "version 99 is not supported"),
    (lambda m: m.update(format="other"), "format is not 'covinit.lora'"),
    (lambda m: m["layers"]["head"].update(out_features=6),
     r"'head' is \(6, 12\) in the layer metadata but \[5, 12\]"),
    (lambda m: m["layers"]["head"].update(offset_rank=3),
     r"tensor 'head\.offset_P' has shape \(5, 2\), expected \(5, 3\)"),
    (lambda m: m["layers"]["head"].update(offset_rank=-1), "invalid offset_rank -1"),
    (lambda m: m["layers"]["head"].update(offset_rank=0),
     r"unexpected tensors \['head\.offset_P', 'head\.offset_Q'\]"),
])
def test_tampered_metadata_is_refused(saved, make_tiny, edit, match):
    meta, tensors = _read(saved)
    edit(meta)
    _rewrite(saved, meta, tensors)
    _refused(make_tiny(), saved, match)


def test_unreadable_files_are_refused(saved, tmp_path, make_tiny):
    data = saved.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _refused(make_tiny(), truncated, "not a readable safetensors file")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    _refused(make_tiny(), plain, "no covinit metadata")
    garbled = tmp_path / "garbled.safetensors"
    save_file({"x": torch.zeros(2)}, str(garbled), metadata={"covinit": "{not json"})
    _refused(make_tiny(), garbled, "not valid JSON")
    nan = tmp_path / "nan.safetensors"
    meta, tensors = _read(saved)
    tensors["head.lora_A"][0, 0] = float("nan")
    _rewrite(nan, meta, tensors)
    _refused(make_tiny(), nan, r"'head\.lora_A' contains NaN")


def test_save_without_adapters_is_refused(tmp_path, make_tiny):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(make_tiny(), tmp_path / "x.safetensors")


def test_merged_target_is_refused(saved, make_tiny):
    model = add_lora(make_tiny(), ["head"], rank=2)
    model.head.merge()
    _refused(model, saved, r"'head' is merged")


def test_save_refuses_a_rank_that_load_cannot_rebuild(make_tiny, adapt, tmp_path):
    model = adapt("peft", make_tiny(), ["head"], rank=8)  # head is 12 -> 5: r > min(d, k)
    path = tmp_path / "too-wide.safetensors"
    with pytest.raises(ValueError, match=r"rank 8 > min\(d, k\) = 5"):
        save_lora(model, path)
    assert not path.exists()


def test_public_writer_is_what_save_lora_writes(tmp_path, make_tiny):
    """layer_metadata + write_adapter_file (export_lora's writer) give save_lora's file, and
    a writer that edits an entry consistently gets a file load_lora accepts."""
    from covinit.lora_io import layer_metadata, write_adapter_file
    from covinit.surgery import lora_state_dict

    model = _trained(make_tiny, "kaiming", rank=2, alpha=4)
    save_lora(model, tmp_path / "saved.safetensors")
    adapters = find_adapters(model)
    tensors = {k: t.detach().contiguous() for k, t in lora_state_dict(model).items()}
    layers = {name: layer_metadata(adapter) for name, adapter in adapters.items()}
    write_adapter_file(model, tensors, layers, tmp_path / "written.safetensors")
    saved, written = _read(tmp_path / "saved.safetensors"), _read(tmp_path / "written.safetensors")
    assert saved[0] == written[0]
    assert all(torch.equal(saved[1][k], written[1][k]) for k in saved[1])
    # Twice the head's B at half its α: the same function, another consistent entry.
    tensors["head.lora_B"] = tensors["head.lora_B"] * 2
    layers["head"]["alpha"] = layers["head"]["alpha"] / 2
    layers["head"]["scaling"] = layers["head"]["scaling"] / 2
    write_adapter_file(model, tensors, layers, tmp_path / "edited.safetensors")
    fresh = load_lora(make_tiny(), tmp_path / "edited.safetensors")
    assert fresh.head.alpha == layers["head"]["alpha"]
    x = torch.randn(4, 12)
    torch.testing.assert_close(fresh(x), model(x))
