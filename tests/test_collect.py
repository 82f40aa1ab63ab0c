"""Tests for covinit.collect: hooks, masks, leading shapes, shared inputs, batch calling."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dense import assert_matches, dense
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from covinit.collect import (
    Collector,
    batch_masks,
    call_model,
    match_layers,
    move_to_device,
    rows_of,
)
from covinit.selection import target_matcher


class QKV(nn.Module):
    """q/k/v fed the very same tensor, then ``out`` fed a new one; input (..., 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.out = nn.Linear(8, 8)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        h = self.q(x) + self.k(x)
        return self.out(F.relu(h)) + self.v(x).sum(-1, keepdim=True)


def collect(model: nn.Module, batches, layers=None, sides=("input", "output"), **kw):
    layers = layers or {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad(), Collector(layers, sides, **kw) as col:
        for i, b in enumerate(batches):
            col.run_batch(model, b, i)
    return col


def recorded(model: nn.Module, batches) -> dict[str, list[Tensor]]:
    """The raw (unmasked) activations each layer sees, via a plain recording hook."""
    seen: dict[str, list[Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(mod, args, out, name=name):
                seen.setdefault(name + ":input", []).append(args[0].detach().clone())
                seen.setdefault(name + ":output", []).append(out.detach().clone())
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            call_model(model, b)
    for h in hooks:
        h.remove()
    return seen


# ------------------------------------------------------------------ matching
def test_match_layers_suffix_regex_callable(tiny_model):
    assert list(match_layers(tiny_model, ["query", "head"])) == ["block.query", "head"]
    assert list(match_layers(tiny_model, r"block\..*")) == ["block.query", "block.dense"]
    assert list(match_layers(tiny_model, lambda n, m: m.out_features == 5)) == ["head"]
    # a suffix matches whole dotted components only
    with pytest.raises(ValueError, match=r"layers found: block\.query, block\.dense, head"):
        match_layers(tiny_model, ["uery"])


def test_match_layers_each_suffix_must_match(tiny_model):
    with pytest.raises(ValueError, match="layer 'qurey' was not found"):
        match_layers(tiny_model, ["query", "qurey"])


def test_target_matcher_rejects_bad_targets():
    with pytest.raises(TypeError, match="name suffixes"):
        target_matcher([])
    with pytest.raises(TypeError, match="name suffixes"):
        target_matcher(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="regular expression"):
        target_matcher("(")


def test_match_layers_finds_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(6, 4), nn.ReLU())
    layers = match_layers(model, ["0"])
    assert list(layers) == ["0"]
    x = torch.randn(3, 5, 4)
    col = collect(model, [x], layers=layers)
    res = col.results()
    assert res["0", "input"].total.k == 4 and res["0", "output"].total.k == 6
    assert_matches(res["0", "output"].total, dense(model[0](x).detach().reshape(-1, 6).numpy()))


# ------------------------------------------------------------------ batches
def test_batch_masks_combine_attention_and_token_labels():
    am = torch.tensor([[1, 1, 0], [1, 1, 1]])
    labels = torch.tensor([[-100, 3, 4], [5, -100, 6]])
    (mask,) = batch_masks({"attention_mask": am, "labels": labels})
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    # sequence labels (B,) are not a mask
    (mask,) = batch_masks({"attention_mask": am, "labels": torch.tensor([0, 1])})
    assert mask.tolist() == am.bool().tolist()
    # decoder labels of another length stay a separate mask
    masks = batch_masks({"attention_mask": am, "labels": torch.tensor([[1, -100]] * 2)})
    assert [m.shape for m in masks] == [(2, 3), (2, 2)]
    assert batch_masks((torch.ones(2),)) == [] and batch_masks(torch.ones(2)) == []


def _tiny_seq2seq(arch: str) -> tuple[nn.Module, dict[str, str]]:
    """A random tiny T5 or BART and its layer names by role."""
    transformers = pytest.importorskip("transformers")
    if arch == "t5":
        config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                       num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config)
        names = {"encoder": "encoder.block.0.layer.0.SelfAttention.q",
                 "decoder": "decoder.block.0.layer.0.SelfAttention.q",
                 "cross_q": "decoder.block.0.layer.1.EncDecAttention.q",
                 "cross_k": "decoder.block.0.layer.1.EncDecAttention.k", "head": "lm_head"}
    else:
        config = transformers.BartConfig(vocab_size=40, d_model=16, encoder_layers=1,
                                         decoder_layers=1, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=32,
                                         decoder_ffn_dim=32, max_position_embeddings=32)
        model = transformers.BartForConditionalGeneration(config)
        names = {"encoder": "model.encoder.layers.0.self_attn.q_proj",
                 "decoder": "model.decoder.layers.0.self_attn.q_proj",
                 "cross_q": "model.decoder.layers.0.encoder_attn.q_proj",
                 "cross_k": "model.decoder.layers.0.encoder_attn.k_proj", "head": "lm_head"}
    return model.eval(), names


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("decoder_mask", [False, True])
def test_encoder_decoder_masks_follow_the_side(arch, decoder_mask):
    """Encoder input and labels of the same length: the encoder's padding mask on encoder
    layers and cross-attention keys, ``labels != -100`` (and ``decoder_attention_mask``)
    on decoder positions — never the two combined."""
    model, names = _tiny_seq2seq(arch)
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, 5, 6, 7], [3, 4, 5, 6, 7, 8]])
    batch = {"input_ids": torch.randint(3, 40, (2, 6)), "attention_mask": am, "labels": labels}
    keep_decoder = labels != -100
    if decoder_mask:
        batch["decoder_attention_mask"] = torch.tensor([[1] * 6, [1, 1, 1, 1, 1, 0]])
        keep_decoder = keep_decoder & batch["decoder_attention_mask"].bool()
    layers = {role: model.get_submodule(name) for role, name in names.items()}
    with Collector(layers, ("input",)) as col, torch.no_grad():
        col.run_batch(model, batch, index=0)
    counts = {role: col.results()[role, "input"].total.n for role in names}
    n_enc, n_dec = int(am.sum()), int(keep_decoder.sum())
    assert (n_enc, n_dec) == (10, 9 - decoder_mask)
    assert counts == {"encoder": n_enc, "cross_k": n_enc, "decoder": n_dec, "cross_q": n_dec,
                      "head": n_dec}


def test_call_model_by_batch_type():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    expected = model(x)
    assert torch.equal(call_model(model, x), expected)
    assert torch.equal(call_model(model, (x,)), expected)
    assert torch.equal(call_model(model, [x]), expected)
    assert torch.equal(call_model(model, {"input": x}), expected)
    assert torch.equal(call_model(model, {"z": x}, lambda m, b: m(b["z"])), expected)
    with pytest.raises(TypeError, match="batch of type str"):
        call_model(model, "tokens")


def test_move_to_device_recurses():
    batch = {"a": torch.ones(2), "b": (torch.zeros(1), [torch.ones(1)]), "c": "text"}
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["c"] == "text" and isinstance(moved["b"], tuple)
    assert move_to_device(batch, None) is batch


def test_rows_of_leading_shapes():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert rows_of(x, [mask]).tolist() == [x[0, 0].tolist(), x[0, 2].tolist(),
                                            x[1, 2].tolist()]
    assert rows_of(x.reshape(6, 4), [mask]).shape == (3, 4)  # flattened positions
    assert rows_of(x[:, 0], [mask]).shape == (2, 4)  # pooler-like (B, k): every row
    img = torch.randn(2, 3, 5, 4)  # (B, H, W, k): no mask fits → all rows
    assert rows_of(img, [torch.ones(2, 7, dtype=torch.bool)]).shape == (30, 4)
    assert rows_of(img, [mask]).shape == (3 * 5, 4)  # mask over the first dims


# ------------------------------------------------------------------ statistics
def test_masked_uneven_batches_match_dense():
    model = QKV()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b, t in [(3, 5), (1, 7), (4, 2)]:
        am = (torch.rand(b, t, generator=gen) > 0.3).long()
        labels = torch.randint(0, 5, (b, t), generator=gen)
        labels[torch.rand(b, t, generator=gen) > 0.7] = -100
        batches.append({"x": torch.randn(b, t, 8, generator=gen) * 3 + 2,
                        "attention_mask": am, "labels": labels})
    col = collect(model, batches)
    raw = recorded(model, batches)
    keep = [(b["attention_mask"] != 0) & (b["labels"] != -100) for b in batches]
    for (name, side), res in col.results().items():
        rows = torch.cat([a[m] for a, m in zip(raw[f"{name}:{side}"], keep, strict=True)])
        assert_matches(res.total, dense(rows.double().numpy()))
        assert res.calls == 3


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8), (2, 2, 3, 8)])
def test_any_leading_shape(shape):
    model = QKV()
    batches = [torch.randn(*shape) for _ in range(3)]
    col = collect(model, batches)
    raw = recorded(model, batches)
    for (name, side), res in col.results().items():
        rows = torch.cat([a.reshape(-1, a.shape[-1]) for a in raw[f"{name}:{side}"]])
        assert_matches(res.total, dense(rows.double().numpy()))
        assert torch.equal(res.total.m2, res.total.m2.T)


def test_batch_order_does_not_matter():
    model = QKV()
    batches = [torch.randn(n, 8) * (i + 1) + 10 * i for i, n in enumerate([5, 1, 9, 3])]
    a = collect(model, batches).results()
    b = collect(model, batches[::-1]).results()
    for key in a:
        for f in ("mean", "m2", "t", "q"):
            x, y = getattr(a[key].total, f), getattr(b[key].total, f)
            assert (x - y).abs().max() <= 1e-10 * max(float(x.abs().max()), 1e-300)


def test_drifting_mean_is_recentred():
    # The mean jumps by 1e6 spreads between batches: power sums about the first batch's
    # mean would cancel ~12 digits; the re-centring keeps the dense reference.
    lin = nn.Linear(3, 2)
    model = nn.Sequential(lin)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(50, 3, generator=gen, dtype=torch.float64) * 1e-3 + 1e3 * i
               for i in range(4)]
    model = model.double()
    col = collect(model, batches, sides=("input",))
    assert_matches(col.results()["0", "input"].total, dense(torch.cat(batches).numpy()))


def test_single_row_batches_are_not_recentred_every_call(monkeypatch):
    # A pooler at batch size 1 feeds one row per batch: the stream's variance before the
    # second row is 0, and a drift test against it alone folded (k×k work) on every call.
    # The test bounds the cancellation of the sums with the batch added, which stays exact.
    import covinit.collect as collect_mod

    folds = []
    original = collect_mod._Accumulator._fold

    def counting(self):
        folds.append(self.n)
        original(self)

    monkeypatch.setattr(collect_mod._Accumulator, "_fold", counting)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(1, 6, generator=gen, dtype=torch.float64) + 50.0 for _ in range(40)]
    model = nn.Sequential(nn.Linear(6, 2)).double()
    col = collect(model, batches, sides=("input",))
    assert_matches(col.results()["0", "input"].total, dense(torch.cat(batches).numpy()))
    assert sum(n > 0 for n in folds) <= 2  # the final fold, not one per batch


def test_unmasked_rows_are_a_view():
    # No padding: the rows are the activation itself, not a gathered copy.
    x = torch.randn(2, 5, 4)
    rows = rows_of(x, [torch.ones(2, 5, dtype=torch.bool)])
    assert rows.shape == (10, 4) and rows.data_ptr() == x.data_ptr()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False
    assert rows_of(x, [mask]).shape == (9, 4)


def test_large_mean_fp32_model():
    lin = nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(200, 4, generator=gen) + 1e3 for _ in range(5)]
    col = collect(nn.Sequential(lin), batches, sides=("input",))
    x = torch.cat(batches).double().numpy()
    np.testing.assert_allclose(col.results()["0", "input"].total.covariance().numpy(),
                               np.cov(x.T, bias=True), rtol=1e-10, atol=1e-12)


def test_mixed_precision_is_close():
    model = QKV()
    batches = [torch.randn(64, 8) * 2 + 30 for _ in range(3)]
    exact = collect(model, batches).results()
    mixed = collect(model, batches, precision="mixed").results()
    for key in exact:
        e, m = exact[key].total, mixed[key].total
        # float32 rows centred in float32 about the float32-rounded centre, float32 product:
        # rounding ~ 1e-7 of the spread, never of the mean (here 15 spreads from zero).
        spread = float(torch.diagonal(e.m2).max() / e.n) ** 0.5
        assert (e.mean - m.mean).abs().max() <= 1e-6 * spread
        assert (e.m2 - m.m2).abs().max() <= 1e-5 * e.m2.abs().max()


def test_folds_merge_to_total():
    model = QKV()
    batches = [torch.randn(n, 8) for n in [3, 4, 5, 6, 7]]
    res = collect(model, batches, folds=3).results()["out", "input"]
    assert [f.n for f in res.folds] == [3 + 6, 4 + 7, 5]
    raw = recorded(model, batches)["out:input"]
    assert_matches(res.folds[0], dense(torch.cat([raw[0], raw[3]]).double().numpy()))
    assert_matches(res.total, dense(torch.cat(raw).double().numpy()))


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), n_batches=st.integers(1, 4),
       scale=st.sampled_from([1e-3, 1.0, 1e2]), offset=st.sampled_from([0.0, 1e3, -50.0]),
       masked=st.booleans(), precision=st.sampled_from(["float64", "mixed"]),
       seed=st.integers(0, 2**31 - 1))
def test_property_collector_equals_dense(lead, n_batches, scale, offset, masked, precision,
                                         seed):
    gen = torch.Generator().manual_seed(seed)
    model = QKV().double()
    batches, kept = [], []
    for _ in range(n_batches):
        x = torch.randn(*lead, 8, generator=gen, dtype=torch.float64) * scale + offset
        batch = {"x": x}
        mask = torch.ones(lead, dtype=torch.bool)
        if masked and len(lead) >= 1:
            mask = torch.rand(*lead, generator=gen) > 0.4
            batch["attention_mask"] = mask.long()
        batches.append(batch)
        kept.append(x[mask])
    rows = torch.cat(kept)
    col = collect(model, batches, sides=("input",), precision=precision)
    got = col.results()["q", "input"].total
    assert got.n == rows.shape[0]
    if got.n == 0:
        return
    ref = dense(rows.numpy())
    # exact path: 1e-10 of the field's size; mixed: float32 rounding of the centred product
    tol = 1e-10 if precision == "float64" else 1e-5
    np.testing.assert_allclose(got.mean.numpy(), ref["mean"], rtol=0,
                               atol=1e-12 * (abs(offset) + scale))
    np.testing.assert_allclose(got.m2.numpy(), ref["m2"], rtol=0,
                               atol=tol * max(np.abs(ref["m2"]).max(), 1e-300)
                               + 1e-13 * abs(offset) * scale * ref["n"])


# ------------------------------------------------------------------ shared inputs
def test_shared_input_detected_and_reduced_once(monkeypatch):
    import covinit.collect as collect_mod

    calls = []
    original = collect_mod._reduce
    def counting(rows, *args, **kwargs):
        calls.append(rows.shape)
        return original(rows, *args, **kwargs)

    monkeypatch.setattr(collect_mod, "_reduce", counting)
    model = QKV()
    col = collect(model, [torch.randn(4, 8), torch.randn(2, 3, 8)], sides=("input",))
    assert col.shared_inputs() == {"k": "q", "v": "q"}
    res = col.results()  # reduces out's staged second call
    assert len(calls) == 2 * 2  # per batch: q's input once, out's input once
    assert torch.equal(res["q", "input"].total.m2, res["v", "input"].total.m2)


def test_sharing_survives_a_stale_cache_entry_at_the_same_address():
    """A tensor changed in place (or a dead one's memory reused) leaves a stale cache entry
    under the same key; the fresh entry must become the most recent one, not inherit the
    stale one's place at the front of the eviction order (which made q/k/v sharing on real
    MiniLM depend on the allocator)."""
    from covinit.collect import _CACHE_ENTRIES

    class Busy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.ModuleList(nn.Linear(8, 8) for _ in range(_CACHE_ENTRIES - 1))
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            h = x.clone()
            outs = [layer(h) for layer in self.pre]  # h's entry, then outputs fill the cache
            h.mul_(1.0)  # same address, new version: h's entry is now stale
            return self.q(h) + self.k(h) + sum(outs)

    col = collect(Busy(), [torch.randn(5, 8)], sides=("input", "output"))
    assert col.shared_inputs() == {"pre.1": "pre.0", "pre.2": "pre.0", "k": "q"}


def test_equal_but_distinct_tensors_are_not_shared():
    class Copies(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x.clone()) + self.b(x.clone())

    col = collect(Copies(), [torch.randn(5, 4)], sides=("input",))
    assert col.shared_inputs() == {}


def test_sharing_that_changes_between_batches_is_not_an_alias():
    class Switch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)
            self.step = 0

        def forward(self, x: Tensor) -> Tensor:
            self.step += 1
            return self.a(x) + self.b(x if self.step == 1 else x * 2)

    model = Switch()
    batches = [torch.randn(5, 4), torch.randn(6, 4)]
    col = collect(model, batches, sides=("input",))
    assert col.shared_inputs() == {}
    b_rows = torch.cat([batches[0], batches[1] * 2]).double().numpy()
    assert_matches(col.results()["b", "input"].total, dense(b_rows))


def test_layer_called_twice_per_forward_sees_both_calls():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    batches = [torch.randn(3, 4), torch.randn(5, 4)]
    col = collect(model, batches)
    raw = recorded(model, batches)
    res = col.results()
    assert res["lin", "input"].calls == 4
    assert_matches(res["lin", "input"].total, dense(torch.cat(raw["lin:input"]).double().numpy()))
    assert_matches(res["lin", "output"].total,
                   dense(torch.cat(raw["lin:output"]).double().numpy()))


def test_wide_layer_panels_give_exactly_symmetric_comoment():
    lin = nn.Linear(300, 2)  # k = 300 ≥ 128: the panelled GEMM path
    batches = [torch.randn(40, 300) + 3, torch.randn(7, 300)]
    for precision in ("float64", "mixed"):
        m = collect(nn.Sequential(lin), batches, sides=("input",),
                    precision=precision).results()["0", "input"].total
        assert torch.equal(m.m2, m.m2.T)
        if precision == "float64":
            assert_matches(m, dense(torch.cat(batches).double().numpy()))


def test_reused_reduction_survives_producer_called_again():
    # a(x), a(z), b(x): b reuses a's first reduction after a accumulated a second call, so a
    # must not have written into the co-moment it shares (copy-on-write).
    class Order(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(130, 2), nn.Linear(130, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x) + self.a(x * 3 + 1) + self.b(x)

    model = Order()
    batches = [torch.randn(20, 130), torch.randn(9, 130)]
    col = collect(model, batches, sides=("input",))
    res = col.results()
    b_rows = torch.cat(batches).double().numpy()
    a_rows = torch.cat([torch.cat([x, x * 3 + 1]) for x in batches]).double().numpy()
    assert_matches(res["b", "input"].total, dense(b_rows))
    assert_matches(res["a", "input"].total, dense(a_rows))


def test_non_contiguous_activation():
    lin = nn.Linear(4, 2)
    x = torch.randn(4, 6, 3).transpose(0, 2)[..., :4]  # (3, 6, 4), non-contiguous view
    assert not x.is_contiguous()
    col = collect(nn.Sequential(lin), [x], sides=("input",))
    assert_matches(col.results()["0", "input"].total, dense(x.reshape(-1, 4).double().numpy()))


def test_huge_bf16_activations_stay_finite_in_float64():
    # bf16 reaches 3e38; its fourth powers summed over k need ~1e160, far inside float64
    lin = nn.Linear(6, 3).to(torch.bfloat16)
    x = (torch.randn(10, 6) * 1e37).to(torch.bfloat16)
    col = collect(nn.Sequential(lin), [x], sides=("input",))
    m = col.results()["0", "input"].total
    assert bool(torch.isfinite(m.q)) and float(m.q) > 1e150
    assert_matches(m, dense(x.double().numpy()))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activation_names_layer_and_batch(bad):
    model = QKV()
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"layer 'q' input activation at batch 1 .*NaN/Inf"):
        collect(model, [torch.randn(3, 8), x]).results()  # batch 1's rows are staged


def test_hooks_removed_after_exception():
    model = QKV()
    with pytest.raises(ValueError), torch.no_grad(), Collector({"q": model.q}) as col:
        col.run_batch(model, torch.full((2, 8), float("nan")), 0)
    assert not model.q._forward_hooks


def test_invalid_options():
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="sides"):
        Collector({"l": lin}, ("inputs",))
    with pytest.raises(ValueError, match="precision"):
        Collector({"l": lin}, precision="float16")
    with pytest.raises(ValueError, match="folds"):
        Collector({"l": lin}, folds=0)
    with pytest.raises(TypeError, match=r"nn\.Linear or transformers Conv1D"):
        Collector({"c": nn.Conv2d(1, 1, 1)})


# ------------------------------------------------------------------ mixed precision
class WideQKV(nn.Module):
    """q/k/v fed one (…, 160) tensor (k ≥ 128: the panelled product), ``out`` a new one."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(160, 160), nn.Linear(160, 160), nn.Linear(160, 8)
        self.out = nn.Linear(160, 4)

    def forward(self, x: Tensor) -> Tensor:
        # q, k, v back to back: the sharing cache keeps a few recent tensors only
        h = torch.relu(self.q(x) + self.k(x)) + self.v(x).sum(-1, keepdim=True)
        return self.out(h).sum(-1)


def assert_mixed_close(mom, ref: dict, tol: float = 1e-5) -> None:
    """Mixed precision's documented error: the mean within ``tol`` of the spread (not of the
    mean), m2/t/q within ``tol`` of their size, the count exact.  Rows far from the stream's
    centre (a drifting mean, up to the drift test's bound of 8 spreads) need a larger ``tol``:
    the float32 product rounds relative to the second moment about the centre."""
    assert mom.n == ref["n"]
    spread = float(np.sqrt(np.diag(ref["m2"]).max() / ref["n"]))
    np.testing.assert_allclose(mom.mean.numpy(), ref["mean"], rtol=0, atol=tol * spread)
    for key in ("m2", "t", "q"):
        scale = max(np.abs(ref[key]).max(), ref["t_scale"] if key == "t" else 0.0)
        np.testing.assert_allclose(getattr(mom, key).numpy(), ref[key], rtol=0,
                                   atol=tol * scale, err_msg=key)


def _count_folds(monkeypatch) -> list[int]:
    import covinit.collect as collect_mod

    folds: list[int] = []
    original = collect_mod._Accumulator._fold

    def counting(self):
        folds.append(self.n)
        original(self)

    monkeypatch.setattr(collect_mod._Accumulator, "_fold", counting)
    return folds


@pytest.mark.parametrize("flush", [None, 100])
def test_mixed_batch_one_stream_with_folds_matches_dense(flush, monkeypatch):
    # Batch size 1 (16 rows a call) into 3 folds, pending float32 sums flushed every 100 rows
    # or only at the end (4096 > 640 rows): every fold and the total against the dense
    # reference; a pending sum lost, added twice or flushed into another fold breaks it.
    import covinit.collect as collect_mod

    if flush is not None:
        monkeypatch.setattr(collect_mod, "_FLUSH_ROWS", flush)
    torch.manual_seed(0)
    model = WideQKV()
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(1, 16, 160, generator=gen) * 2 + 30 for _ in range(40)]
    col = collect(model, batches, precision="mixed", folds=3)
    res = col.results()
    raw = recorded(model, batches)
    assert col.shared_inputs() == {"k": "q", "v": "q"}
    for name in ("q", "v", "out"):
        for side in ("input", "output"):
            rows = [r.reshape(-1, r.shape[-1]).double() for r in raw[f"{name}:{side}"]]
            for fold in range(3):
                assert_mixed_close(res[name, side].folds[fold],
                                   dense(torch.cat(rows[fold::3]).numpy()))
            assert_mixed_close(res[name, side].total, dense(torch.cat(rows).numpy()))
    # the shared input's consumers add the same float32 products in the same order
    assert torch.equal(res["q", "input"].total.m2, res["v", "input"].total.m2)


def test_mixed_big_products_skip_the_pending_sums(monkeypatch):
    # Calls of _DIRECT_ROWS rows or more (here 48 ≥ 32) are added into the float64 sums at
    # once, the shared q/k/v input included: no stream allocates its float32 pending sum,
    # and the statistics match the dense reference as the pending path does.
    import covinit.collect as collect_mod

    monkeypatch.setattr(collect_mod, "_DIRECT_ROWS", 32)
    torch.manual_seed(0)
    model = WideQKV()
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randn(3, 16, 160, generator=gen) * 2 + 30 for _ in range(6)]
    col = collect(model, batches, precision="mixed")
    accumulators = [acc for stream in col._streams.values() for acc in stream.accs]
    assert accumulators and all(acc.pending is None for acc in accumulators)
    res, raw = col.results(), recorded(model, batches)
    for name in ("q", "v", "out"):
        for side in ("input", "output"):
            rows = torch.cat([r.reshape(-1, r.shape[-1]).double() for r in raw[f"{name}:{side}"]])
            assert_mixed_close(res[name, side].total, dense(rows.numpy()))


def test_mixed_recentres_mid_stream_with_pending_rows(monkeypatch):
    # The mean jumps by 1000 spreads after the first single-sequence batch; once the sums'
    # mean sits 8 spreads from the centre (~66 batches later) the stream re-centres while
    # every row is still in the pending float32 sum (never flushed before): the re-centre
    # must flush them about the old centre first and centre the batch about the new
    # float32-rounded centre.  Rows up to 8 spreads off-centre: the looser tolerance.
    import covinit.collect as collect_mod

    monkeypatch.setattr(collect_mod, "_FLUSH_ROWS", 10**6)
    folds = _count_folds(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(1, 16, 160, generator=gen) + (1e3 if i >= 1 else 0.0)
               for i in range(90)]
    model = nn.Sequential(nn.Linear(160, 3))
    col = collect(model, batches, sides=("input",), precision="mixed")
    rows = torch.cat(batches).reshape(-1, 160).double().numpy()
    assert_mixed_close(col.results()["0", "input"].total, dense(rows), tol=1e-4)
    assert sum(n > 0 for n in folds) == 2  # the re-centre and the final fold


def test_mixed_single_rows_are_not_recentred_every_call(monkeypatch):
    # One row per batch, all 300 in the pending sum (never flushed before the end): the drift
    # test's variance must include the pending rows, or it re-centres ~1 call in 10.
    folds = _count_folds(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(1, 140, generator=gen) + 50.0 for _ in range(300)]
    col = collect(nn.Sequential(nn.Linear(140, 2)), batches, sides=("input",),
                  precision="mixed")
    assert_mixed_close(col.results()["0", "input"].total,
                       dense(torch.cat(batches).double().numpy()))
    assert sum(n > 0 for n in folds) <= 2


def test_mixed_gradient_side_matches_float64(monkeypatch):
    # δ streams go through the same pending sums; G = Σ δ·xᵀ through its own float32 product.
    import covinit.collect as collect_mod

    monkeypatch.setattr(collect_mod, "_FLUSH_ROWS", 40)
    torch.manual_seed(1)
    model = WideQKV()
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randn(1, 16, 160, generator=gen) + 3 for _ in range(12)]
    layers = {"q": model.q, "out": model.out}
    runs = {}
    for precision in ("float64", "mixed"):
        with Collector(layers, ("input", "gradient"), precision=precision, folds=2) as col:
            for i, b in enumerate(batches):
                col.run_batch(model, b, i, loss_fn=lambda out, _batch: out.square().mean())
        runs[precision] = col.results()
    for key, exact in runs["float64"].items():
        got = runs["mixed"][key]
        for e, m in zip([exact.total, *exact.folds], [got.total, *got.folds], strict=True):
            ref = {"n": e.n, "mean": e.mean.numpy(), "m2": e.m2.numpy(), "t": e.t.numpy(),
                   "q": e.q.numpy(), "t_scale": float(e.t.abs().max())}
            assert_mixed_close(m, ref)
        if key[1] == "gradient":
            assert (got.cross - exact.cross).abs().max() <= 1e-5 * exact.cross.abs().max()


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.integers(0, 40), min_size=1, max_size=25),
       flush=st.sampled_from([1, 7, 50, 4096]), folds=st.integers(1, 3),
       offset=st.sampled_from([0.0, 30.0, -1e3]), jump=st.sampled_from([0.0, 1e4]),
       seed=st.integers(0, 2**31 - 1), direct=st.sampled_from([1, 20, 1024]))
def test_property_mixed_equals_dense(rows, flush, folds, offset, jump, seed, direct):
    # float32 rows of any count per call (0 included), flushes anywhere, folds, products
    # added directly or through the pending sum interleaved (``direct``: the row count from
    # which a product skips the pending sum), and a jump of the mean halfway (rows up to 8
    # spreads off-centre, or a re-centre with pending rows): within the documented error.
    import covinit.collect as collect_mod

    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(n, 140, generator=gen) + offset + (jump if i >= len(rows) // 2
                                                               else 0.0)
               for i, n in enumerate(rows)]
    saved = collect_mod._FLUSH_ROWS, collect_mod._DIRECT_ROWS
    collect_mod._FLUSH_ROWS, collect_mod._DIRECT_ROWS = flush, direct
    try:
        col = collect(nn.Sequential(nn.Linear(140, 2)), batches, sides=("input",),
                      precision="mixed", folds=folds)
    finally:
        collect_mod._FLUSH_ROWS, collect_mod._DIRECT_ROWS = saved
    res = col.results()["0", "input"]
    tol = 1e-4 if jump else 1e-5
    for fold in range(folds):
        part = torch.cat([torch.empty(0, 140), *batches[fold::folds]]).double()
        if part.shape[0] >= 2:
            assert_mixed_close(res.folds[fold], dense(part.numpy()), tol)
    total = torch.cat(batches).double()
    if total.shape[0] >= 2:
        assert_mixed_close(res.total, dense(total.numpy()), tol)


# ------------------------------------------------------------------ staging
@contextlib.contextmanager
def staged_rows(rows: int | None):
    """Stage up to ``rows`` rows per stream; 0 reduces every call on its own (the path
    without staging), None keeps the collector's own sizes."""
    import covinit.collect as collect_mod

    saved = collect_mod._stage_rows
    if rows is not None:
        collect_mod._stage_rows = lambda k: rows
    try:
        yield
    finally:
        collect_mod._stage_rows = saved


def assert_same(a, b, rtol: float = 1e-12) -> None:
    """Two summaries of the same rows equal to float64 rounding (per field's size; ``t``,
    whose summands cancel, per their size's bound √(q·max diag m2), by Cauchy-Schwarz)."""
    assert a.n == b.n
    for f in ("mean", "m2", "t", "q"):
        x, y = getattr(a, f), getattr(b, f)
        scale = float(y.abs().max())
        if f == "t":
            scale = max(scale, float(b.q * torch.diagonal(b.m2).max()) ** 0.5)
        assert (x - y).abs().max() <= rtol * max(scale, 1e-300), f


class Staged(nn.Module):
    """q/k/v fed one tensor, ``v`` only on some calls (``share`` decides), and ``out`` (a
    stream nobody shares); optionally NaN in ``out``'s input at one batch."""

    def __init__(self, share=lambda step: True, nan_at: int | None = None) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.out = nn.Linear(8, 3)
        self.share, self.nan_at, self.step = share, nan_at, 0

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = torch.tanh(self.q(x) + self.k(x))
        v = self.v(x if self.share(self.step) else x * 2)
        if self.step == self.nan_at:
            h = h.clone()
            h.view(-1, 8)[0, 1] = float("nan")
        self.step += 1
        return self.out(h).sum(-1) + v.sum(-1)


def staged_batches(sizes, seed, offset=0.0, jump=0.0, masked=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(sizes):
        x = torch.randn(1, t, 8, generator=gen, dtype=dtype) + offset + (
            jump if i >= len(sizes) // 2 else 0.0)
        batch = {"x": x}
        if masked:
            batch["attention_mask"] = (torch.rand(1, t, generator=gen) > 0.3).long()
        out.append(batch)
    return out


def kept_rows(model, batches, sides=("input",)) -> dict[tuple[str, str], list[Tensor]]:
    """The kept rows of every layer side, per batch (calls of a batch concatenated)."""
    raw = recorded(model, batches)
    calls = len(raw["q:input"]) // len(batches)
    out = {}
    for key in raw:
        name, side = key.split(":")
        if side in sides:
            per_batch = []
            for i, b in enumerate(batches):
                mask = b.get("attention_mask", torch.ones(b["x"].shape[:-1])) != 0
                parts = raw[key][i * calls:(i + 1) * calls]
                per_batch.append(torch.cat([p[mask] for p in parts]).double())
            out[name, side] = per_batch
    return out


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=14),
       stage=st.sampled_from([1, 3, 8, 20]), folds=st.integers(1, 3),
       precision=st.sampled_from(["float64", "mixed"]), offset=st.sampled_from([0.0, 1e3]),
       jump=st.sampled_from([0.0, 1e4]), masked=st.booleans(),
       partial=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_staged_equals_unstaged_and_dense(sizes, stage, folds, precision, offset,
                                                   jump, masked, partial, seed):
    # Batch-1 calls of 0-9 rows staged in blocks of `stage` rows, in folds, with a mean that
    # jumps (a re-centre inside a block), padding, and v sharing q/k's input on some batches
    # only (a taker that saw part of a block): each fold equals the dense reference and the
    # path without staging to float64 rounding (mixed: float32 rounding of the product).
    dtype = torch.float64 if precision == "float64" else torch.float32
    batches = staged_batches(sizes, seed, offset, jump, masked, dtype)
    share = (lambda step: step % 3 != 1) if partial else (lambda step: True)
    runs = {}
    for rows in (stage, 0):
        torch.manual_seed(0)
        model = Staged(share).to(dtype)
        with staged_rows(rows):
            col = collect(model, batches, sides=("input", "output"), precision=precision,
                          folds=folds)
            runs[rows] = col.results()
    torch.manual_seed(0)
    kept = kept_rows(Staged(share).to(dtype), batches, ("input", "output"))
    for key, per_batch in kept.items():
        got, plain = runs[stage][key], runs[0][key]
        for fold in range(folds):
            part = torch.cat([torch.empty(0, per_batch[0].shape[1], dtype=torch.float64),
                              *per_batch[fold::folds]])
            assert got.folds[fold].n == plain.folds[fold].n == part.shape[0]
            if part.shape[0] < 2:
                continue
            if precision == "float64":
                assert_same(got.folds[fold], plain.folds[fold], rtol=1e-11)
                assert_matches(got.folds[fold], dense(part.numpy()))
            else:
                assert_mixed_close(got.folds[fold], dense(part.numpy()),
                                   tol=1e-4 if jump else 1e-5)


def count_reductions(monkeypatch) -> list[int]:
    """The rows of every reduction the collector runs from now on, in order."""
    import covinit.collect as collect_mod

    reduced: list[int] = []
    original = collect_mod._reduce

    def counting(rows, *args, **kwargs):
        reduced.append(rows.shape[0])
        return original(rows, *args, **kwargs)

    monkeypatch.setattr(collect_mod, "_reduce", counting)
    return reduced


def test_staged_qkv_share_one_reduction_per_block(monkeypatch):
    # After the first batch q stages its input and k, v take each staged call: one reduction
    # per block for all three, identical sums, and still reported as shared.
    reduced = count_reductions(monkeypatch)
    torch.manual_seed(0)
    model = Staged()
    batches = staged_batches([5] * 9, seed=1)
    with staged_rows(20):
        col = collect(model, batches, sides=("input",))
        res = col.results()
    assert col.shared_inputs() == {"k": "q", "v": "q"}
    # batch 0 per call (q, out), then blocks of 4 calls (20 rows) for q and for out
    assert reduced == [5, 5] + [20] * 4
    for name in ("k", "v"):
        assert torch.equal(res[name, "input"].total.m2, res["q", "input"].total.m2)
    rows = torch.cat([b["x"].reshape(-1, 8) for b in batches]).double().numpy()
    assert_matches(res["q", "input"].total, dense(rows))


@pytest.mark.parametrize(("rows", "blocks"), [(12, [12] * 4), (10, [20, 20])])
def test_only_calls_that_share_a_block_are_staged(monkeypatch, rows, blocks):
    # A 20-row block: 12-row calls cannot share one, so they are reduced per call (no copy,
    # no buffer); 10-row calls are staged two per block.  Same sums either way.
    reduced = count_reductions(monkeypatch)
    model = nn.Sequential(nn.Linear(8, 3)).double()
    batches = [torch.randn(rows, 8, dtype=torch.float64) + 2 for _ in range(5)]
    with staged_rows(20):
        col = collect(model, batches, sides=("input",))
        buffer = col._streams["0", "input"].stage.rows  # before results() drops it
        res = col.results()
    assert reduced == [rows, *blocks]  # the first batch always on its own
    assert (buffer is None) == (rows == 12)  # 12-row calls: never copied, no buffer
    assert_matches(res["0", "input"].total, dense(torch.cat(batches).numpy()))


def test_results_mid_stream_reduces_staged_rows_once():
    # results() reduces what is staged; later batches stage again; nothing is counted twice.
    torch.manual_seed(0)
    model = Staged()
    batches = staged_batches([4, 6, 3, 5, 7, 2], seed=2)
    kept = kept_rows(model, batches, ("input", "output"))
    with staged_rows(50), torch.no_grad(), Collector(
            {n: getattr(model, n) for n in ("q", "k", "v", "out")}) as col:
        counts = [col.run_batch(model, b, i) for i, b in enumerate(batches[:3])]
        early = col.results()
        counts += [col.run_batch(model, b, i + 3) for i, b in enumerate(batches[3:])]
    late = col.results()
    assert counts == [b["x"].shape[1] for b in batches]  # positions, staged or not
    for key, per_batch in kept.items():
        assert_matches(early[key].total, dense(torch.cat(per_batch[:3]).numpy()))
        assert_matches(late[key].total, dense(torch.cat(per_batch).numpy()))
    assert col.results()["out", "input"].total.n == 27  # a third call: nothing left staged


def test_nan_in_a_staged_row_names_the_layer_and_batch_and_is_never_merged():
    torch.manual_seed(0)
    model = Staged(nan_at=3)
    batches = staged_batches([4] * 6, seed=3)
    with staged_rows(100):
        col = collect(model, batches, sides=("input",))  # batch 3's rows are still staged
        for _ in range(2):  # the rows stay staged: asking again raises again
            with pytest.raises(ValueError, match=r"layer 'out' input activation at batch 3 "
                                                 r"contains 1 NaN/Inf value\(s\) out of 32"):
                col.results()


def test_staged_gradient_side_equals_unstaged():
    # δ streams (and the input streams beside them) staged over batch-1 calls, two folds.
    torch.manual_seed(0)
    model = WideQKV().double()
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(1, 6, 160, generator=gen, dtype=torch.float64) + 2
               for _ in range(9)]
    layers = {"q": model.q, "out": model.out}
    runs = {}
    for rows in (40, 0):
        with staged_rows(rows), Collector(layers, ("input", "gradient"), folds=2) as col:
            for i, b in enumerate(batches):
                col.run_batch(model, b, i, loss_fn=lambda out, _batch: out.square().mean())
            runs[rows] = col.results()
    for key, plain in runs[0].items():
        got = runs[40][key]
        for a, b in zip([got.total, *got.folds], [plain.total, *plain.folds], strict=True):
            assert_same(a, b, rtol=1e-11)
        if key[1] == "gradient":
            assert torch.equal(got.cross, plain.cross)  # G is not staged


def test_exception_during_a_batch_leaves_what_the_unstaged_path_leaves():
    # The model fails after q/k/v ran in batch 4: their rows of that batch count, out's do
    # not, staged or not.
    class Failing(Staged):
        def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            if self.step == 4:
                self.q(x), self.k(x), self.v(x)
                raise RuntimeError("boom")
            return super().forward(x, attention_mask)

    batches = staged_batches([5] * 6, seed=4)
    runs = {}
    for rows in (30, 0):
        torch.manual_seed(0)
        model = Failing()
        with staged_rows(rows), torch.no_grad(), Collector(
                {n: getattr(model, n) for n in ("q", "v", "out")}, ("input",)) as col:
            with pytest.raises(RuntimeError, match="boom"):
                for i, b in enumerate(batches):
                    col.run_batch(model, b, i)
            runs[rows] = col.results()
    for key, plain in runs[0].items():
        assert runs[30][key].total.n == plain.total.n == (25 if key[0] != "out" else 20)
        assert runs[30][key].calls == plain.calls
        assert_same(runs[30][key].total, plain.total)


def test_staging_buffer_is_sized_by_the_product_and_counted():
    from covinit.collect import _stage_rows, side_bytes

    assert _stage_rows(384) >= 6 * 128  # batch size 1 at MiniLM's width: blocks of 6 calls
    assert _stage_rows(4096) <= 64  # a 7B-wide stream stages (almost) nothing
    # never more bytes (at float64) than two co-moments
    assert all(8 * _stage_rows(k) * k <= 2 * 8 * k * k for k in (1, 8, 64, 384, 1536, 11008))
    needs = Collector({"l": nn.Linear(300, 2)}, ("input",)).memory_needs()
    assert needs["l", "input"] == 2 * 8 * 300**2 + 8 * _stage_rows(300) * 300
    assert needs["l", "input"] == side_bytes(300, 2, "input", 2, staging=True)
