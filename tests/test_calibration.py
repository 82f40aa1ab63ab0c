"""Tests for covinit.calibrate and Calibration: results, errors, state restoration, files."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dense import assert_matches, dense
from sklearn.covariance import LedoitWolf
from torch import Tensor, nn

import covinit
from covinit import Calibration, calibrate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class Encoder(nn.Module):
    """HF-style: ``forward(input_ids, attention_mask=None, labels=None)``, q/k/v share input."""

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.drop = nn.Dropout(0.5)
        self.dense = nn.Linear(width, width)
        self.pooler = nn.Linear(width, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids) * 2 + 1  # (B, T, k)
        h = self.drop(F.gelu(self.query(h) * self.key(h)) + self.value(h))
        h = self.dense(h)
        return self.pooler(h[:, 0])  # (B, 3): a layer with 2-D input


def batches(n: int = 4, seed: int = 0) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b, t = 2 + i % 3, 3 + 2 * i
        am = torch.ones(b, t, dtype=torch.long)
        am[0, t - 1 - i % 2:] = 0  # right padding
        labels = torch.randint(0, 11, (b, t), generator=gen)
        labels[:, 0] = -100
        out.append({"input_ids": torch.randint(0, 11, (b, t), generator=gen),
                    "attention_mask": am, "labels": labels})
    return out


def hidden_rows(model: Encoder, data: list[dict[str, Tensor]],
                layer: nn.Module | None = None) -> np.ndarray:
    """The rows q/k/v see (or ``layer``'s outputs on them), masked positions left out.

    ``layer`` runs on each batch's (B, T, k) tensor, exactly as in the forward pass: a float32
    GEMM's rounding depends on its shape and the CPU's kernel, so outputs recomputed on the
    stacked rows differ from the hooked ones in the last bits on some machines."""
    rows = []
    with torch.no_grad():
        for b in data:
            h = model.embed(b["input_ids"]) * 2 + 1
            h = h if layer is None else layer(h)
            rows.append(h[(b["attention_mask"] != 0) & (b["labels"] != -100)])
    return torch.cat(rows).double().numpy()


def test_calibrate_plain_model_matches_dense_with_masks():
    model = Encoder().eval()
    data = batches()
    cal = calibrate(model, data, targets=["query", "key", "value", "pooler"],
                    show_progress=False)
    assert cal.layer_names == ["query", "key", "value", "pooler"]
    assert cal.shared_inputs == {"key": "query", "value": "query"}
    ref = dense(hidden_rows(model, data))
    for layer in ("query", "key", "value"):
        assert_matches(cal.moments(layer, "input"), ref)
    assert_matches(cal.moments("query", "output"), dense(hidden_rows(model, data, model.query)))
    # the pooler's (B, k) input matches no (B, T) mask: every sequence counts
    assert cal.moments("pooler", "input").n == sum(b["input_ids"].shape[0] for b in data)
    assert cal.info["batches"] == 4 and cal.info["positions"] == ref["n"]


def test_ledoit_wolf_shrinkage_from_calibration_equals_sklearn():
    from test_stats import ledoit_wolf_shrinkage

    model = Encoder().eval()
    data = batches(6)
    cal = calibrate(model, data, targets=["query"], sides=("input",), show_progress=False)
    expected = LedoitWolf().fit(hidden_rows(model, data)).shrinkage_
    got = ledoit_wolf_shrinkage(cal.moments("query", "input"))
    assert got == pytest.approx(expected, rel=1e-12)
    assert cal.moments("query", "output") is None


def test_batch_size_and_order_do_not_change_statistics():
    # float64 layers: a float32 GEMM rounds differently for other batch shapes on some CPUs
    # (AVX-512 kernels), which would test torch's kernels, not covinit's merges
    model = Encoder().double().eval()
    ids = torch.randint(0, 11, (12, 5))
    whole = [{"input_ids": ids}]
    split = [{"input_ids": ids[i:j]} for i, j in [(7, 12), (0, 1), (1, 7)]]
    a = calibrate(model, whole, targets=["dense"], show_progress=False)
    b = calibrate(model, split, targets=["dense"], show_progress=False)
    for side in ("input", "output"):
        ma, mb = a.moments("dense", side), b.moments("dense", side)
        assert ma.n == mb.n == 60
        assert (ma.m2 - mb.m2).abs().max() <= 1e-10 * ma.m2.abs().max()


def test_tuple_tensor_and_forward_fn_batches(tiny_model):
    xs = [torch.randn(3, 4, 12) for _ in range(2)]
    by_tensor = calibrate(tiny_model, xs, targets=["head"], show_progress=False)
    by_tuple = calibrate(tiny_model, [(x,) for x in xs], targets=["head"], show_progress=False)
    by_fn = calibrate(tiny_model, [{"pixels": x} for x in xs], targets=["head"],
                      forward_fn=lambda m, b: m(b["pixels"]), show_progress=False)
    for cal in (by_tuple, by_fn):
        assert torch.equal(cal.moments("head").m2, by_tensor.moments("head").m2)
    assert by_tensor.moments("head").n == 24


def test_max_batches_and_max_tokens(tiny_model):
    xs = [torch.randn(5, 12) for _ in range(6)]
    assert calibrate(tiny_model, xs, targets=["head"], max_batches=2,
                     show_progress=False).moments("head").n == 10
    assert calibrate(tiny_model, xs, targets=["head"], max_tokens=11,
                     show_progress=False).moments("head").n == 15
    with pytest.raises(ValueError, match="max_batches must be a positive int"):
        calibrate(tiny_model, xs, targets=["head"], max_batches=0)


def test_folds_kept_and_merge_to_total(tiny_model):
    xs = [torch.randn(n, 12) for n in (2, 3, 4, 5)]
    cal = calibrate(tiny_model, xs, targets=["query"], folds=2, show_progress=False)
    folds = cal.folds("block.query", "input")
    assert [f.n for f in folds] == [6, 8] and cal.n_folds == 2
    assert_matches(folds[0] + folds[1], dense(torch.cat(xs).double().numpy()))
    assert_matches(cal.moments("block.query"), dense(torch.cat(xs).double().numpy()))
    assert calibrate(tiny_model, xs, targets=["query"], show_progress=False).folds(
        "block.query") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_give_float64_statistics(make_tiny, dtype):
    model = make_tiny(dtype=dtype)
    xs = [torch.randn(6, 12).to(dtype) for _ in range(2)]
    cal = calibrate(model, xs, targets=["query"], show_progress=False)
    m = cal.moments("block.query", "output")
    assert m.m2.dtype == torch.float64
    with torch.no_grad():
        ys = torch.cat([model.block.query(x) for x in xs]).double().numpy()
    assert_matches(m, dense(ys))


def test_train_mode_with_dropout_uses_eval_function_and_is_restored():
    model = Encoder().train()
    model.query.eval()  # a mixed state must come back exactly
    model.key.weight.requires_grad_(False)
    data = batches(2)
    cal = calibrate(model, data, targets=["dense"], show_progress=False)
    assert model.training and not model.query.training and model.drop.training
    assert not model.key.weight.requires_grad and model.dense.weight.requires_grad
    model.eval()  # dropout off: the statistics above must be those of this function
    again = calibrate(model, data, targets=["dense"], show_progress=False)
    assert torch.equal(cal.moments("dense").m2, again.moments("dense").m2)


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_exception_in_forward_fn_leaves_model_untouched(exc):
    model = Encoder().train()
    model.value.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []

    def forward_fn(m, b):
        seen.append(m.training)
        m(**b)
        if len(seen) == 2:
            raise exc("stop")

    with pytest.raises(exc):
        calibrate(model, batches(), targets=["query", "dense"], forward_fn=forward_fn,
                  show_progress=False)
    assert seen == [False, False]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_exception_in_dataloader_removes_hooks(tiny_model):
    def loader():
        yield torch.randn(2, 12)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        calibrate(tiny_model, loader(), targets=["head"], show_progress=False)
    assert not tiny_model.head._forward_hooks


def test_calibrate_twice_gives_the_same_result(tiny_model):
    xs = [torch.randn(4, 12) for _ in range(2)]
    a = calibrate(tiny_model, xs, targets=["head"], show_progress=False)
    b = calibrate(tiny_model, xs, targets=["head"], show_progress=False)
    assert torch.equal(a.moments("head").m2, b.moments("head").m2)


# ------------------------------------------------------------------ errors
def test_error_empty_dataloader(tiny_model):
    with pytest.raises(ValueError, match="no batches"):
        calibrate(tiny_model, [], targets=["head"], show_progress=False)


def test_error_targets_required_and_must_match(tiny_model):
    with pytest.raises(ValueError, match=r"needs targets=.*available: block\.query"):
        calibrate(tiny_model, [torch.randn(2, 12)], show_progress=False)
    with pytest.raises(ValueError,
                       match=r"layer 'nothing' was not found.*layers found: block\.query"):
        calibrate(tiny_model, [torch.randn(2, 12)], targets=["nothing"], show_progress=False)


def test_error_target_never_called():
    model = Encoder()
    with pytest.raises(ValueError, match=r"'pooler' was never called.*called: query"):
        calibrate(model, batches(1), targets=["query", "pooler"],
                  forward_fn=lambda m, b: m.query(m.embed(b["input_ids"])),
                  show_progress=False)


def test_error_all_positions_masked():
    data = [{"input_ids": torch.ones(2, 3, dtype=torch.long),
             "attention_mask": torch.zeros(2, 3, dtype=torch.long)}]
    with pytest.raises(ValueError, match=r"'query' .*every position was masked"):
        calibrate(Encoder(), data, targets=["query"], show_progress=False)


def test_error_nan_activation_names_layer_and_batch(tiny_model):
    xs = [torch.randn(2, 12), torch.randn(2, 12), torch.full((2, 12), float("nan"))]
    with pytest.raises(ValueError, match=r"'block\.query' input activation at batch 2"):
        calibrate(tiny_model, xs, targets=["query"], show_progress=False)
    assert not tiny_model.block.query._forward_hooks


def test_error_bad_batch_type(tiny_model):
    with pytest.raises(TypeError, match="batch of type int"):
        calibrate(tiny_model, [3], targets=["head"], show_progress=False)


def test_error_init_options_on_plain_model(tiny_model):
    with pytest.raises(TypeError, match="need a model with LoRA layers"):
        calibrate(tiny_model, [torch.randn(2, 12)], targets=["head"], strategy="pissa",
                  show_progress=False)


# ------------------------------------------------------------------ LoRA models
@pytest.mark.parametrize("kind", ["covinit", "peft", "loralib"])
def test_lora_model_calibrates_base_layers_and_initializes(make_tiny, adapt, kind):
    plain = make_tiny()
    xs = [torch.randn(8, 12) for _ in range(3)]
    ref = calibrate(plain, xs, targets=["query", "head"], show_progress=False)
    model = adapt(kind, make_tiny(), ["query", "head"], rank=2)
    adapters = covinit.find_adapters(model)
    before = {n: a.get_lora()[0].clone() for n, a in adapters.items()}
    cal = calibrate(model, xs, show_progress=False, seed=123)
    assert cal.layer_names == ["block.query", "head"]
    for name in cal.layer_names:
        assert torch.equal(cal.moments(name, "input").m2, ref.moments(name, "input").m2)
        assert not torch.equal(adapters[name].get_lora()[0], before[name])  # re-initialized
    cal.check_model(plain)  # the fingerprint ignores LoRA wrappers


def test_lora_model_with_targets_touches_only_those(make_tiny, adapt):
    model = adapt("covinit", make_tiny(), ["query", "head"], rank=2)
    head_a = model.head.lora_A.detach().clone()
    query_a = model.block.query.lora_A.detach().clone()
    cal = calibrate(model, [torch.randn(8, 12)], targets=["query"], show_progress=False,
                    seed=5)
    assert cal.layer_names == ["block.query"]
    assert torch.equal(model.head.lora_A, head_a)
    assert not torch.equal(model.block.query.lora_A, query_a)


def test_lora_rank_larger_than_positions(make_tiny, adapt):
    model = adapt("covinit", make_tiny(), ["query"], rank=4)
    before = model.block.query.lora_A.detach().clone()
    with pytest.raises(ValueError, match=r"'block\.query' kept only 3 usable position.*rank 4"):
        calibrate(model, [torch.randn(3, 12)], show_progress=False)
    assert torch.equal(model.block.query.lora_A, before)


def test_lora_layer_short_of_positions_falls_back_to_kaiming(make_tiny, adapt):
    # The head only runs on the first (3-row) batch, so it keeps fewer positions than the
    # rank while block.query has plenty: calibrate initializes query from the data and falls
    # back to kaiming on the head, with a warning naming the layer and the count.
    model = adapt("covinit", make_tiny(), ["query", "head"], rank=4)
    calls = iter(range(100))

    def forward_fn(m, x):
        h = m.block(x)
        return m.head(h) if next(calls) == 0 else h

    xs = [torch.randn(3, 12), torch.randn(8, 12)]
    with pytest.warns(UserWarning, match=r"'head'.*3"):
        calibrate(model, xs, forward_fn=forward_fn, strategy="input-pca", show_progress=False)
    a = model.block.query.lora_A.detach()
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)  # unit-row PCA
    assert torch.isfinite(model.head.lora_A).all()
    assert not torch.equal(model.head.lora_A, torch.zeros_like(model.head.lora_A))


def test_default_init_follows_the_written_rule(make_tiny, adapt):
    # No strategy named: calibrate initializes with DEFAULT_STRATEGY and DEFAULT_OPTIONS (the
    # benchmark's input-pca@empirical+matched): the same factors as naming them, B = 0.
    from covinit.calibration import DEFAULT_OPTIONS, DEFAULT_STRATEGY

    assert (DEFAULT_STRATEGY, dict(DEFAULT_OPTIONS)) == (
        "input-pca", {"estimator": "empirical", "scale": "matched"})
    xs = [torch.randn(8, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    by_default = adapt("covinit", make_tiny(), ["query", "head"], rank=4)
    named = adapt("covinit", make_tiny(), ["query", "head"], rank=4)
    calibrate(by_default, xs, show_progress=False)
    calibrate(named, xs, strategy="input-pca", estimator="empirical", scale="matched",
              show_progress=False)
    unit = adapt("covinit", make_tiny(), ["query", "head"], rank=4)
    calibrate(unit, xs, strategy="input-pca", estimator="empirical", show_progress=False)
    for name in ("block.query", "head"):
        got, want = by_default.get_submodule(name), named.get_submodule(name)
        torch.testing.assert_close(got.lora_A, want.lora_A, atol=0, rtol=0)
        assert torch.count_nonzero(got.lora_B) == 0
        # matched, not unit rows: the scale differs from the plain strategy's
        assert not torch.allclose(got.lora_A, unit.get_submodule(name).lora_A)
    # an option the caller sets wins over the default's
    unit_default = adapt("covinit", make_tiny(), ["query", "head"], rank=4)
    calibrate(unit_default, xs, scale="unit", show_progress=False)
    torch.testing.assert_close(unit_default.block.query.lora_A, unit.block.query.lora_A,
                               atol=0, rtol=0)


# ------------------------------------------------------------------ files
def test_save_load_round_trip(tmp_path):
    model = Encoder().eval()
    cal = calibrate(model, batches(), targets=["query", "key", "dense"], folds=2,
                    show_progress=False)
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    back = Calibration.load(path, model=model)
    assert back.layer_names == cal.layer_names and back.shared_inputs == {"key": "query"}
    assert back.n_folds == 2 and back.info == cal.info
    for layer in cal.layer_names:
        for side in ("input", "output"):
            a, b = cal.moments(layer, side), back.moments(layer, side)
            assert a.n == b.n and all(torch.equal(getattr(a, f), getattr(b, f))
                                      for f in ("mean", "m2", "t", "q"))
            assert [f.n for f in cal.folds(layer, side)] == [f.n for f in back.folds(layer, side)]
    assert back.moments("key", "input") is back.moments("query", "input")


def test_load_into_other_model_names_first_mismatch(tmp_path):
    cal = calibrate(Encoder(), batches(1), targets=["query"], show_progress=False)
    cal.save(tmp_path / "c.safetensors")
    other = Encoder(width=6)
    with pytest.raises(ValueError, match=r"layer 'query' has \(d, k\) = \(6, 6\) in the model "
                                         r"but \(8, 8\)"):
        Calibration.load(tmp_path / "c.safetensors", model=other)
    with pytest.raises(ValueError, match=r"'query' .* is not in the model"):
        cal.check_model(nn.Sequential(nn.Linear(8, 8)))
    bigger = Encoder()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="the model has layer 'extra'"):
        cal.check_model(bigger)


def test_load_rejects_truncated_tampered_and_foreign_files(tmp_path):
    cal = calibrate(Encoder(), batches(1), targets=["query"], show_progress=False)
    path = tmp_path / "c.safetensors"
    cal.save(path)
    blob = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Calibration.load(tmp_path / "trunc.safetensors")
    tampered = bytearray(blob)
    tampered[-3] ^= 0xFF  # flip bits in the last tensor's data
    (tmp_path / "tamper.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(ValueError, match="checksum mismatch"):
        Calibration.load(tmp_path / "tamper.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a covinit calibration"):
        Calibration.load(tmp_path / "other.safetensors")


def test_load_rejects_wrong_dtype_even_with_matching_checksum(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from covinit.calibration_data import _digest

    cal = calibrate(Encoder(), batches(1), targets=["query"], show_progress=False)
    cal.save(tmp_path / "c.safetensors")
    with safe_open(tmp_path / "c.safetensors", framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["query/input/m2"] = tensors["query/input/m2"].float()
    header = json.loads(meta["covinit"])
    header["sha256"] = _digest(tensors)
    meta["covinit"] = json.dumps(header)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"'m2' has dtype torch\.float32, expected float64"):
        Calibration.load(tmp_path / "bad.safetensors")


def test_unknown_layer_and_side_errors():
    cal = calibrate(Encoder(), batches(1), targets=["query"], show_progress=False)
    with pytest.raises(ValueError, match="calibrated layers: query"):
        cal.moments("nope")
    with pytest.raises(ValueError, match="side must be one of"):
        cal.moments("query", "inputs")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_statistics_match_cpu(dtype):
    data = batches(3)
    model = Encoder().to(dtype).eval()
    gpu_model = copy.deepcopy(model).cuda()
    cpu = calibrate(model, data, targets=["query", "dense"], show_progress=False)
    gpu = calibrate(gpu_model, data, targets=["query", "dense"], show_progress=False)
    for layer in ("query", "dense"):
        for side in ("input", "output"):
            a, b = cpu.moments(layer, side), gpu.moments(layer, side)
            assert b.m2.device.type == "cuda" and b.m2.dtype == torch.float64
            assert a.n == b.n
            # the model itself runs on another device: only its own rounding may differ
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (a.m2 - b.m2.cpu()).abs().max() <= tol * a.m2.abs().max()


# ------------------------------------------------------------------ bounded memory
def test_sketch_mode_for_wide_layers(tmp_path):
    from covinit.sketch import Sketch

    model = Encoder(width=8).eval()
    data = batches(3)
    cal = calibrate(model, data, targets=["query", "pooler"], sketch_above=8, sketch_size=4,
                    show_progress=False)
    sk = cal.sketch("query", "input")
    ref = Sketch.from_batch(torch.from_numpy(hidden_rows(model, data)), 4, seed=0)
    assert sk.n == ref.n and (sk.y - ref.y).abs().max() <= 1e-10 * ref.y.abs().max()
    assert cal.sketch("pooler", "output") is None  # width 3 < 8: exact
    assert cal.moments("pooler", "output").n == sum(b["input_ids"].shape[0] for b in data)
    with pytest.raises(ValueError, match=r"bounded-memory sketch.*\.sketch\('query', 'input'\)"):
        cal.moments("query", "input")
    cal.save(tmp_path / "s.safetensors")
    back = Calibration.load(tmp_path / "s.safetensors", model=model)
    assert torch.equal(back.sketch("query", "input").y, sk.y)
    assert torch.equal(back.moments("pooler", "output").m2, cal.moments("pooler", "output").m2)
    with pytest.raises(ValueError, match="either folds= or sketch_above="):
        calibrate(model, data, targets=["query"], sketch_above=8, folds=2, show_progress=False)


# ------------------------------------------------------------------ real model
@pytest.mark.slow
def test_minilm_qkv_share_one_input_summary():
    zoo = pytest.importorskip("zoo")
    model, tokenizer = zoo.load_minilm()
    enc = tokenizer(["a quietly moving film", "dull, overlong and badly acted"],
                    padding=True, return_tensors="pt")
    cal = calibrate(model, [dict(enc)], targets=["query", "key", "value", "attention.output.dense"],
                    show_progress=False)
    shared = cal.shared_inputs
    for i in range(6):
        prefix = f"bert.encoder.layer.{i}.attention"
        assert shared[f"{prefix}.self.key"] == f"{prefix}.self.query"
        assert shared[f"{prefix}.self.value"] == f"{prefix}.self.query"
        assert f"{prefix}.output.dense" not in shared
    n = int(enc["attention_mask"].sum())
    assert cal.moments("bert.encoder.layer.0.attention.self.query").n == n


def test_sketched_lora_model_initializes_data_free_and_refuses_data_strategies(make_tiny,
                                                                               adapt):
    model = adapt("covinit", make_tiny(), ["query"], rank=2)
    xs = [torch.randn(8, 12) for _ in range(3)]
    cal = calibrate(model, xs, sketch_above=12, sketch_size=6, strategy="kaiming",
                    show_progress=False)
    assert cal.sketch("block.query", "input") is not None  # kaiming needs no statistics
    before = model.block.query.lora_A.detach().clone()
    # a data strategy, named or the default (input-pca), is refused with the layer named
    for strategy in ("input-pca", None):
        with pytest.raises(ValueError, match=r"'block\.query' input was calibrated as a "
                                             r"bounded-memory sketch.*strategy 'input-pca'"):
            calibrate(model, xs, sketch_above=12, sketch_size=6, strategy=strategy,
                      show_progress=False)
    assert torch.equal(model.block.query.lora_A, before)


def test_summary_reads_either_kind_and_a_sketched_short_layer_is_refused_for_its_rank(
        make_tiny, adapt):
    """``Calibration.summary`` gives exact Moments or a Sketch (what ``_check_ranks`` counts
    positions with, instead of reading the private table)."""
    model = Encoder(width=8).eval()
    cal = calibrate(model, batches(2), targets=["query", "pooler"], sketch_above=8,
                    sketch_size=4, show_progress=False)
    assert cal.summary("query", "input") is cal.sketch("query", "input") is not None
    assert cal.summary("pooler", "output") is cal.moments("pooler", "output")
    with pytest.raises(ValueError, match="'nope' was not calibrated"):
        cal.summary("nope")
    lora = adapt("covinit", make_tiny(), ["query"], rank=4)
    with pytest.raises(ValueError, match=r"'block\.query' kept only 2 usable position"):
        calibrate(lora, [torch.randn(2, 12)], sketch_above=12, sketch_size=2,
                  show_progress=False)


def test_calibration_and_the_tests_fakes_satisfy_the_protocol(tmp_path):
    """``CalibrationLike`` lists what initialize reads: covinit's Calibration (made or
    loaded) and the tests' independent fakes implement it; an object without ``folds`` does
    not, so the check is not vacuous."""
    from _gradfake import GradCalibration
    from test_initialize import FakeCalibration

    from covinit.calibration import CalibrationLike, GradientCalibrationLike

    model = Encoder(width=8).eval()
    cal = calibrate(model, batches(2), targets=["query"], show_progress=False)
    cal.save(tmp_path / "c.safetensors")
    for real in (cal, Calibration.load(tmp_path / "c.safetensors")):
        assert isinstance(real, CalibrationLike) and isinstance(real, GradientCalibrationLike)
    fake = FakeCalibration({("query", "input"): cal.moments("query")})
    assert isinstance(fake, CalibrationLike) and not isinstance(fake, GradientCalibrationLike)
    grad = GradCalibration({"q": {"x": torch.randn(5, 3, dtype=torch.float64),
                                  "y": torch.randn(5, 2, dtype=torch.float64),
                                  "delta": torch.randn(5, 2, dtype=torch.float64)}})
    assert isinstance(grad, GradientCalibrationLike)

    class NoFolds:
        layer_names = ("query",)

        def moments(self, layer: str, side: str = "input") -> None:
            return None

        def check_model(self, model: nn.Module) -> None:
            return None

    assert not isinstance(NoFolds(), CalibrationLike)


def test_forward_under_inference_mode_gives_the_same_statistics():
    model = Encoder().eval()

    def forward_fn(m, batch):
        with torch.inference_mode():  # inference tensors carry no version counter
            return m(**batch)

    ref = calibrate(model, batches(), targets=["query", "key"], show_progress=False)
    cal = calibrate(model, batches(), targets=["query", "key"], forward_fn=forward_fn,
                    show_progress=False)
    for name in ref.layer_names:
        for side in ("input", "output"):
            torch.testing.assert_close(cal.moments(name, side).m2, ref.moments(name, side).m2,
                                       rtol=1e-12, atol=1e-12)


def test_loralib_layers_that_merge_on_eval_are_not_merged_by_calibrate(make_tiny):
    """Real loralib (merge_weights=True) merges B·A into the weight inside ``eval()`` and
    unmerges in ``train()``; calibrate switches modes by flag, so nothing merges."""
    from conftest import LoralibStyleLinear

    class MergingLoralib(LoralibStyleLinear):
        def train(self, mode: bool = True):
            super().train(mode)
            if mode == self.merged:  # eval() merges, train() unmerges
                with torch.no_grad():
                    sign = -1.0 if self.merged else 1.0
                    self.weight.add_(sign * self.scaling * (self.lora_B @ self.lora_A))
                self.merged = not mode
            return self

        def forward(self, x):
            y = torch.nn.functional.linear(x, self.weight, self.bias)
            return y if self.merged else y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    model = make_tiny()
    model.block.query = MergingLoralib.from_linear(model.block.query, 2, 4.0)
    model.train()
    calibrate(model, [torch.randn(8, 12)], strategy="input-pca", show_progress=False)
    assert model.training and model.block.query.training
    assert not model.block.query.merged  # still trainable: the adapter is in the forward
