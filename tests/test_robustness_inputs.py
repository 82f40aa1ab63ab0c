"""Robustness to adversarial inputs along collect → estimate → initialize (issue 8).

Each case either works (and the result is checked against its definition) or fails with a
specific error type and message; where it fails, the model is shown to be unchanged.
Cases already covered elsewhere are not repeated: NaN messages (test_calibration /
test_collect), non-contiguous and (…, k) leading shapes in the collector (test_collect),
all-constant inputs and n < r for one strategy (test_strategies_cov).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _dense import assert_matches, dense
from _loss import GRADIENT
from _state import snapshot
from torch import Tensor, nn

from covinit import add_lora, calibrate, find_adapters, initialize, load_lora, save_lora
from covinit.inits import _REGISTRY
from covinit.stats import Moments

COV_STRATEGIES = [e.name for e in _REGISTRY if e.tags["needs"]]
RESIDUAL = [e.name for e in _REGISTRY if e.tags["preserves"] == "function"]
SHRINKING = ("empirical", "ledoit_wolf", "oas")


def _cal(model: nn.Module, data, targets, **kw):
    return calibrate(model, data, targets=targets, show_progress=False, **kw)


def _assert_contract(model: nn.Module, x: Tensor, before: Tensor, info: dict) -> None:
    """Finite factors, and the model's function kept (zero delta or exact residual)."""
    for adapter in find_adapters(model).values():
        a, b = adapter.get_lora()
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-4, atol=1e-4)
    assert all(np.isfinite(i["delta_norm"]) for i in info.values())


# ------------------------------------------------------------------ non-finite activations
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused_and_model_untouched(tiny_model, bad):
    data = [torch.randn(3, 12) for _ in range(3)]
    data[1][2, 5] = bad
    tiny_model.train()
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match=r"layer 'block\.query' input activation at batch 1 "
                                         r"contains 1 NaN/Inf value\(s\) out of 36"):
        _cal(tiny_model, data, ["query", "head"])
    assert snapshot(tiny_model) == before


def test_fp16_overflow_inside_the_model_is_named():
    """The model itself overflows (fp16 max 65504): the first layer whose *output* is Inf
    is named, with the dtype hint; the finite input side of the same layer is not blamed."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).half()
    with torch.no_grad():
        model[0].weight.fill_(300.0)
    x = torch.full((2, 4), 100.0, dtype=torch.float16)  # 4·300·100 = 1.2e5 > 65504
    with pytest.raises(ValueError, match=r"layer '0' output activation at batch 0 contains 8 "
                                         r"NaN/Inf.*fp16 overflow\?"):
        _cal(model, [x], ["0"])
    assert not model[0]._forward_hooks


def test_float64_overflow_in_our_statistics_is_named():
    """Finite activations whose fourth moment exceeds float64 (only possible for float64
    models: 1e80⁴ = 1e320) are refused with their peak value, not stored as Inf."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.tensor([[1e80, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer '0' input activation at batch 0: values up to "
                                         r"1e\+80 overflow the float64 fourth-moment"):
        _cal(model, [x], ["0"], sides=("input",))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_enormous_finite_activations_give_finite_statistics_and_factors(dtype):
    """Activations near the dtype's maximum (bf16/fp32: ~3e38) overflow nothing in float64
    (q ~ (k·1e76)² = 1e153): statistics, estimates and A are finite and exact."""
    model = nn.Sequential(nn.Linear(4, 3)).to(dtype)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 4, generator=gen) * 1e37).to(dtype)
    cal = _cal(model, [x], ["0"], sides=("input",))
    assert_matches(cal.moments("0", "input"), dense(x.double().numpy()))
    lora = add_lora(model, ["0"], rank=2)
    info = initialize(lora, cal, strategy="input-pca")
    a, _ = find_adapters(lora)["0"].get_lora()
    assert torch.isfinite(a.float()).all() and info["0"]["strategy"] == "input-pca"


def test_statistics_too_big_for_the_device_are_refused_before_any_forward(monkeypatch):
    """An LM head's output side (49152² float64 = 18 GiB per fold) would be an out-of-memory
    kill after the first batch; here the device's memory is pretended to be 2 MiB, and a
    300-wide output side needs 2·300²·8 B = 1.4 MiB plus its staging buffer of 600 rows
    (1.4 MiB), and the input side 1.6 MiB the same way."""
    import covinit.calibration as calibration_module

    monkeypatch.setattr(calibration_module, "_memory_bytes", lambda device: 2 * 2**20)
    model = nn.Sequential(nn.Linear(230, 300))
    calls = []

    def forward_fn(m: nn.Module, x: Tensor) -> Tensor:
        calls.append(1)
        return m(x)

    before = snapshot(model)
    with pytest.raises(ValueError, match=r"the exact statistics would need 4\.4 MiB but the "
                                         r"cpu device has 2\.0 MiB; the largest is layer '0' "
                                         r"output \(width 300: 2\.7 MiB\)\. Use sketch_above="):
        _cal(model, [torch.randn(4, 230)], ["0"], forward_fn=forward_fn)
    assert calls == [] and snapshot(model) == before
    # Either remedy from the message fits: one side only, or a bounded-memory sketch.
    assert _cal(model, [torch.randn(4, 230)], ["0"], sides=("input",)).moments("0").n == 4
    sketched = _cal(model, [torch.randn(4, 230)], ["0"], sketch_above=256, sketch_size=8)
    assert sketched.sketch("0", "output").n == 4


# ------------------------------------------------------------------ degenerate covariances
@pytest.mark.parametrize("estimator", SHRINKING)
def test_duplicated_constant_and_too_few_rows_still_give_valid_factors(make_tiny, estimator):
    """Inputs with a duplicated feature, a constant feature and n = 7 < k = 12 (exactly
    rank-deficient covariance: rank n − 1 = 6 of 12): every covariance strategy gives finite
    factors and keeps the model's function."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 12, generator=gen)
    x[:, 3] = x[:, 0]
    x[:, 7] = 2.5
    cal = _cal(make_tiny(), [x], ["query"], **GRADIENT)  # every strategy's sides
    assert torch.linalg.matrix_rank(cal.moments("block.query").m2) == 6
    probe = torch.randn(5, 12, generator=gen)
    before = make_tiny()(probe).detach()
    # Quantized-base strategies move the output by design (test_quant.py checks them).
    for strategy in [s for s in COV_STRATEGIES
                     if _REGISTRY.get(s).tags["preserves"] != "approximate"]:
        # A fresh adapter each time: re-initializing over a residual init is another case
        # (test_reinitializing_after_a_residual_init_keeps_the_function).
        model = add_lora(make_tiny(), ["query"], rank=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # n ≥ r and not constant: no fallback
            info = initialize(model, cal, strategy=strategy, estimator=estimator)
        assert info["block.query"]["strategy"] == strategy
        _assert_contract(model, probe, before, info)


@pytest.mark.parametrize("strategy", COV_STRATEGIES)
def test_fewer_rows_than_rank_falls_back_for_every_strategy(make_tiny, strategy):
    cal = _cal(make_tiny(), [torch.randn(3, 12)], ["query"], **GRADIENT)  # n = 3 < r = 4
    model = add_lora(make_tiny(), ["query"], rank=4)
    with pytest.warns(UserWarning, match=r"layer 'block\.query': only 3 usable calibration "
                                         r"position\(s\) on the (input|output|gradient) side, "
                                         r"fewer than the rank 4"):
        info = initialize(model, cal, strategy=strategy)
    assert info["block.query"]["strategy"] == "kaiming"
    assert torch.count_nonzero(find_adapters(model)["block.query"].get_lora()[1]) == 0


def test_single_row_in_total_is_constant_and_falls_back(make_tiny):
    """One position: the covariance is exactly zero, so even rank 1 falls back (constant)."""
    cal = _cal(make_tiny(), [torch.randn(1, 12)], ["query"])
    assert cal.moments("block.query").n == 1
    assert torch.count_nonzero(cal.moments("block.query").m2) == 0
    model = add_lora(make_tiny(), ["query"], rank=1)
    with pytest.warns(UserWarning, match=r"'block\.query'.*constant over all 1 calibration"):
        info = initialize(model, cal, strategy="input-pca")
    assert info["block.query"]["fallback"]


def test_estimator_error_names_the_layer_and_leaves_model_unchanged(make_tiny):
    """nonlinear shrinkage needs ≥ 12 rows; the error says which layer and side failed."""
    cal = _cal(make_tiny(), [torch.randn(8, 12)], ["query"])
    model = add_lora(make_tiny(), ["query"], rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'block\.query' input: estimator 'nonlinear' "
                                         r"failed: nonlinear shrinkage needs an effective "
                                         r"sample size n ≥ 12"):
        initialize(model, cal, strategy="input-pca", estimator="nonlinear")
    assert snapshot(model) == before


# ------------------------------------------------------------------ batch shapes and masks
def test_fully_masked_batch_among_others_is_skipped_exactly():
    model = nn.Sequential(nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(1)
    data = [{"input": torch.randn(2, 4, 5, generator=gen),
             "attention_mask": torch.ones(2, 4, dtype=torch.long)} for _ in range(3)]
    data[1]["attention_mask"].zero_()

    def forward_fn(m: nn.Module, b: dict) -> Tensor:
        return m(b["input"])

    cal = _cal(model, data, ["0"], forward_fn=forward_fn)
    kept = torch.cat([data[0]["input"].reshape(-1, 5), data[2]["input"].reshape(-1, 5)])
    assert_matches(cal.moments("0", "input"), dense(kept.double().numpy()))
    assert cal.info["positions"] == 16 and cal.info["batches"] == 3


def test_batches_of_one_row_equal_one_big_batch():
    # float64: in float32 a (1, 5) and a (9, 5) product round differently on some CPUs
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.randn(9, 5, dtype=torch.float64) * 3 + 40
    ones = _cal(model, list(x[:, None, :]), ["0"])  # nine batches of shape (1, 5)
    whole = _cal(model, [x], ["0"])
    for side in ("input", "output"):
        a, b = ones.moments("0", side), whole.moments("0", side)
        assert a.n == b.n == 9
        torch.testing.assert_close(a.m2, b.m2, rtol=1e-10, atol=1e-10 * float(b.m2.abs().max()))
        torch.testing.assert_close(a.q, b.q, rtol=1e-10, atol=0)


def test_same_rows_as_2d_and_4d_inputs_and_non_contiguous_give_equal_statistics():
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(2, 3, 4, 6)  # (B, H, W, k), e.g. a channels-last conv feature map
    flat = x.reshape(-1, 6)
    strided = torch.randn(6, 24).T  # (24, 6) with strides (1, 24)
    strided.copy_(flat)
    assert not strided.is_contiguous()
    results = [_cal(model, [v], ["0"]).moments("0", "input") for v in (x, flat, strided)]
    for m in results[1:]:
        assert m.n == 24
        torch.testing.assert_close(m.m2, results[0].m2, rtol=1e-12, atol=1e-12)


def test_integer_rows_are_summarised_in_float64():
    x = torch.randint(-1000, 1000, (20, 4), generator=torch.Generator().manual_seed(0))
    m = Moments.from_batch(x)  # int64 rows: exact in float64 (|x| < 2⁵³)
    assert m.m2.dtype == torch.float64
    assert_matches(m, dense(x.numpy()), rtol=1e-13)
    with pytest.raises(ValueError, match=r"expected rows of shape \(n, k\), got \(20,\)"):
        Moments.from_batch(x[:, 0])


# ------------------------------------------------------------------ tied and shared modules
class TiedLM(nn.Module):
    """SmolLM2-like: the LM head's weight is the input embedding (V=20, D=8)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.lm_head(torch.tanh(self.proj(self.embed(input_ids))))


def _token_batches(n: int = 3) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, 20, (2, 7), generator=gen),
             "attention_mask": torch.ones(2, 7, dtype=torch.long)} for _ in range(n)]


def _tied_model() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM().eval()


@pytest.mark.parametrize("strategy", RESIDUAL)
def test_residual_strategy_on_tied_lm_head_is_refused_and_nothing_changes(strategy):
    cal = _cal(_tied_model(), _token_batches(), ["proj", "lm_head"], **GRADIENT)
    model = add_lora(_tied_model(), ["proj", "lm_head"], rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"strategy '{strategy}' replaces the base weight of "
                                         r"layer 'lm_head', but that weight is tied to "
                                         r"\['embed\.weight', 'lm_head\.base_layer\.weight'\]"):
        initialize(model, cal, strategy=strategy)
    assert snapshot(model) == before  # 'proj' was computed first but not written
    assert model.lm_head.base_layer.weight is model.embed.weight


def test_zero_delta_strategies_on_tied_lm_head_keep_the_tie_through_save_and_load(tmp_path):
    data = _token_batches()
    cal = _cal(_tied_model(), data, ["proj", "lm_head"])
    model = add_lora(_tied_model(), ["proj", "lm_head"], rank=2)
    before = model(**data[0]).detach()
    info = initialize(model, cal, strategy="input-pca")
    assert {i["strategy"] for i in info.values()} == {"input-pca"}
    assert model.lm_head.base_layer.weight is model.embed.weight
    torch.testing.assert_close(model(**data[0]).detach(), before)
    save_lora(model, tmp_path / "a.safetensors")
    fresh = add_lora(_tied_model(), ["proj", "lm_head"], rank=2)
    load_lora(fresh, tmp_path / "a.safetensors")
    assert fresh.lm_head.base_layer.weight is fresh.embed.weight
    for name, adapter in find_adapters(model).items():
        for mine, theirs in zip(adapter.get_lora(), find_adapters(fresh)[name].get_lora(),
                                strict=True):
            assert torch.equal(mine, theirs)


class SharedTwice(nn.Module):
    """One Linear applied twice per forward (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.shared(torch.tanh(self.shared(x))))


def test_module_called_twice_per_forward_summarises_both_calls_and_initializes():
    torch.manual_seed(0)
    model = SharedTwice().eval()
    xs = [torch.randn(4, 6) for _ in range(2)]
    cal = _cal(model, xs, ["shared"], sides=("input",))
    with torch.no_grad():
        rows = torch.cat([r for x in xs for r in (x, torch.tanh(model.shared(x)))])
    assert_matches(cal.moments("shared", "input"), dense(rows.double().numpy()))
    lora = add_lora(model, ["shared"], rank=2)
    before = lora(xs[0]).detach()
    info = initialize(lora, cal, strategy="input-whiten")
    assert info["shared"]["strategy"] == "input-whiten"
    _assert_contract(lora, xs[0], before, info)


@pytest.mark.slow
def test_smollm2_tied_lm_head_refuses_residual_and_accepts_input_pca():
    """The real case: SmolLM2's ``lm_head.weight`` is ``model.embed_tokens.weight``."""
    import zoo

    model, tokenizer = zoo.load_smollm2()
    targets = ["lm_head", "model.layers.0.self_attn.q_proj"]
    batch = tokenizer(["To be, or not to be, that is the question."], return_tensors="pt")
    # Input side only: the LM head's output side would be a 49152² float64 co-moment (19 GB).
    cal = calibrate(model, [dict(batch)], targets=targets, sides=("input",),
                    show_progress=False)
    lora = add_lora(model, targets, rank=4)
    embed = lora.model.embed_tokens.weight
    assert lora.lm_head.base_layer.weight is embed
    saved = embed.detach().clone()
    q_before = lora.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"replaces the base weight of layer 'lm_head', but "
                                         r"that weight is tied to \['model\.embed_tokens\."
                                         r"weight', 'lm_head\.base_layer\.weight'\]"):
        initialize(lora, strategy="pissa")  # q_proj is planned first, not written either
    assert torch.equal(embed, saved)
    assert torch.equal(lora.model.layers[0].self_attn.q_proj.base_layer.weight, q_before)
    info = initialize(lora, cal, strategy="input-pca")
    assert {i["strategy"] for i in info.values()} == {"input-pca"}
    assert lora.lm_head.base_layer.weight is embed and torch.equal(embed, saved)
