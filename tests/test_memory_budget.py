"""calibrate(max_memory=): the planner (covinit.budget) and bitwise equality of N passes vs one."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn

from covinit import calibrate
from covinit.budget import parse_size, plan_calibration, sharing_units
from covinit.collect import _stage_rows, side_bytes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def llama_batches(n: int = 5, seed: int = 1) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 40, (2, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # padding is masked out in every pass alike
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def assert_bitwise_equal(a, b) -> None:
    """Every summary, fold, G and the sharing of two calibrations are bitwise equal."""
    assert a.layer_names == b.layer_names and a.shapes == b.shapes
    assert a.shared_inputs == b.shared_inputs
    assert (a.info["batches"], a.info["positions"]) == (b.info["batches"], b.info["positions"])
    sides = [s for s in ("input", "output", "gradient") if a.summary(a.layer_names[0], s)]
    for layer in a.layer_names:
        for side in sides:
            sa, sb = a.summary(layer, side), b.summary(layer, side)
            assert type(sa) is type(sb)
            for key, value in sa.state().items():
                assert torch.equal(value, sb.state()[key]), (layer, side, key)
            folds_a, folds_b = a.folds(layer, side), b.folds(layer, side)
            assert (folds_a is None) == (folds_b is None)
            for fa, fb in zip(folds_a or [], folds_b or [], strict=True):
                assert all(torch.equal(v, fb.state()[k]) for k, v in fa.state().items())
        if "gradient" in sides:
            assert torch.equal(a.gradient(layer), b.gradient(layer)), layer
            for ga, gb in zip(a.gradient_folds(layer) or [], b.gradient_folds(layer) or [],
                              strict=True):
                assert torch.equal(ga, gb)


# ---------------------------------------------------------------------- planner
@pytest.mark.parametrize(("text", "expected"), [
    ("8GB", 8 * 10**9), ("8GiB", 8 * 2**30), ("1.5gb", 15 * 10**8), ("123", 123), (7, 7)])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 apples", "-1", -5, 1.5, None, True])
def test_parse_size_refuses(bad) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_plan_bytes_follow_the_one_formula_and_first_fit() -> None:
    layers = {"a": nn.Linear(30, 20), "b": nn.Linear(20, 30), "c": nn.Linear(10, 10)}
    need = {name: sum(side_bytes(m.in_features, m.out_features, s, 2, staging=True)
                      for s in ("input", "output"))
            for name, m in layers.items()}
    budget = need["a"] + need["c"]  # a alone, b alone; c fits after a (first fit)
    plan = plan_calibration(layers, max_memory=budget, units=[["a"], ["b"], ["c"]])
    assert [g.layers for g in plan.groups] == [("a", "c"), ("b",)]
    assert [g.bytes for g in plan.groups] == [need["a"] + need["c"], need["b"]]
    assert plan.total_bytes == sum(need.values()) and plan.passes == 2
    assert [g.sides for g in plan.groups] == [4, 2]
    assert plan.label(1).startswith("pass 2/2: 2 layer sides, ")
    one = plan_calibration(layers, max_memory=None, units=[["a"], ["b"], ["c"]])
    assert one.passes == 1 and one.groups[0].layers == ("a", "b", "c")


def test_units_stay_together_and_sketched_sides_are_counted_small() -> None:
    block = nn.Module()
    block.attn = nn.Module()
    block.attn.q, block.attn.k, block.attn.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(4, 8)
    layers = dict(block.named_modules())
    layers = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    assert sharing_units(layers) == [["attn.q", "attn.k"], ["attn.o"]]
    exact = plan_calibration(layers, sides=("input",),
                             max_memory=2 * side_bytes(8, 8, "input", 2, staging=True))
    assert [g.layers for g in exact.groups] == [("attn.q", "attn.k"), ("attn.o",)]
    sketched = plan_calibration(layers, sides=("input",), max_memory=10**6, sketch_above=8,
                                sketch_size=2)
    assert sketched.sketched == (("attn.q", "input"), ("attn.k", "input"))
    assert sketched.total_bytes == 2 * 3 * 8 * 8 * 2 + side_bytes(4, 8, "input", 2,
                                                                  staging=True)


def test_a_layer_over_budget_is_named_with_the_budget_and_the_way_out() -> None:
    layers = {"wide": nn.Linear(64, 4), "narrow": nn.Linear(4, 4)}
    # 2·8·64² B of statistics and 8·128·64 B of staged rows
    expected = r"layer 'wide' needs 131\.07 kB .*max_memory=1\.00 kB.*sketch_above=64 "
    with pytest.raises(ValueError, match=expected):
        plan_calibration(layers, sides=("input",), max_memory="1kB", units=[["wide"],
                                                                           ["narrow"]])
    with pytest.raises(ValueError, match="drop the gradient side and folds="):
        plan_calibration(layers, sides=("input", "gradient"), max_memory="1kB")
    plan = plan_calibration(layers, sides=("input",), max_memory="7kB", sketch_above=64,
                            sketch_size=4)
    assert plan.sketched == (("wide", "input"),)


def test_seven_b_plan_on_the_meta_device() -> None:
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    plans = {m: plan_calibration(model, LLAMA_TARGETS, ("input",), max_memory=m)
             for m in ("8GB", "24GB")}
    # accumulators + a batch's temporary, and each stream's staged rows
    per_layer = 2 * 8 * (6 * 4096**2 + 11008**2) + 8 * (6 * _stage_rows(4096) * 4096
                                                        + _stage_rows(11008) * 11008)
    for plan in plans.values():
        assert plan.total_bytes == 32 * per_layer
        assert all(g.bytes <= plan.max_memory for g in plan.groups)
        for group in plan.groups:  # q/k/v/o and gate/up never split
            for unit in plan.units:
                assert set(unit) <= set(group.layers) or not set(unit) & set(group.layers)
    assert plans["8GB"].passes == 15 and plans["24GB"].passes == 5
    assert 11008**2 * 8 / 1e9 == pytest.approx(0.97, abs=0.005)  # the down_proj


# ---------------------------------------------------------------------- N passes == 1 pass
def budget_for(passes: int, model: nn.Module, sides, folds: int = 1) -> int:
    plan = plan_calibration(model, LLAMA_TARGETS, sides, max_memory=None, folds=folds)
    return plan.total_bytes // passes + 1


@pytest.mark.parametrize(("sides", "folds"), [
    (("input", "output"), 1), (("input", "output"), 3), (("input", "gradient"), 2)])
def test_several_passes_give_bitwise_the_statistics_of_one(sides, folds) -> None:
    model, data = tiny_llama(), llama_batches()
    one = calibrate(model, data, targets=LLAMA_TARGETS, sides=sides, folds=folds,
                    show_progress=False)
    many = calibrate(model, data, targets=LLAMA_TARGETS, sides=sides, folds=folds,
                     show_progress=False, max_memory=budget_for(4, model, sides, folds))
    assert many.info["memory_plan"]["passes"] >= 3
    assert "memory_plan" not in one.info
    groups = many.info["memory_plan"]["groups"]
    assert sorted(n for g in groups for n in g) == sorted(one.layer_names)
    assert one.shared_inputs  # q/k/v and gate/up shared their input ...
    for layer, owner in one.shared_inputs.items():  # ... and were collected in one pass
        assert any(layer in g and owner in g for g in groups)
    assert_bitwise_equal(one, many)


def test_max_tokens_and_sketches_under_a_budget() -> None:
    model, data = tiny_llama(), llama_batches(6)
    kwargs = {"targets": LLAMA_TARGETS, "show_progress": False, "max_tokens": 30,
              "sketch_above": 24, "sketch_size": 8}
    one = calibrate(model, data, **kwargs)
    total = plan_calibration(model, LLAMA_TARGETS, max_memory=None, sketch_above=24,
                             sketch_size=8).total_bytes
    many = calibrate(model, data, max_memory=max(total // 4, 20_000), **kwargs)
    assert many.info["memory_plan"]["passes"] >= 3
    assert many.sketch("model.layers.0.mlp.down_proj", "input") is not None
    assert one.info["batches"] == many.info["batches"] < 6
    assert_bitwise_equal(one, many)


class Parallel(nn.Module):
    """A parallel block (GPT-J / Phi style): attention and MLP read the same normed input,
    and ``fc2`` reads ``fc1``'s output directly: sharing across parents and sides."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.mlp = nn.Module(), nn.Module()
        self.attn.q, self.attn.v = nn.Linear(6, 6), nn.Linear(6, 6)
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(6, 9), nn.Linear(9, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.attn.q(h) * self.attn.v(h) + self.mlp.fc2(self.mlp.fc1(h))


def test_sharing_across_parents_and_sides_is_found_on_the_first_batch() -> None:
    model = nn.Sequential(Parallel(), Parallel())
    data = [torch.randn(4, 6) * 3 + 1 for _ in range(4)]
    targets = ["attn.q", "attn.v", "mlp.fc1", "mlp.fc2"]
    one = calibrate(model, data, targets=targets, show_progress=False)
    # one block's statistics and staging buffers (12.1 kB) fit, two do not
    many = calibrate(model, data, targets=targets, show_progress=False, max_memory=13_000)
    assert one.shared_inputs == {"0.attn.v": "0.attn.q", "0.mlp.fc1": "0.attn.q",
                                 "1.attn.v": "1.attn.q", "1.mlp.fc1": "1.attn.q"}
    # fc2 reads fc1's output (whose output side is collected): each block is one unit
    assert many.info["memory_plan"]["groups"] == [
        [f"{b}.{n}" for n in ("attn.q", "attn.v", "mlp.fc1", "mlp.fc2")] for b in (0, 1)]
    assert_bitwise_equal(one, many)


# ---------------------------------------------------------------------- data and restoration
def test_a_one_shot_iterator_is_refused_before_any_pass() -> None:
    model, data = tiny_llama(), llama_batches()
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    budget = budget_for(4, model, ("input", "output"))
    with pytest.raises(ValueError, match=r"needs \d+ or more passes.*one-shot iterator"):
        calibrate(model, iter(data), targets=LLAMA_TARGETS, show_progress=False,
                  max_memory=budget)
    with pytest.raises(ValueError, match="one-shot iterator"):
        calibrate(model, (b for b in data), targets=LLAMA_TARGETS, show_progress=False,
                  max_memory=budget)
    assert calls == []
    # one pass is enough: any iterable still works
    cal = calibrate(model, iter(data), targets=LLAMA_TARGETS, show_progress=False,
                    max_memory="1GB")
    assert cal.info["memory_plan"]["passes"] == 1


def test_a_shuffling_dataloader_is_refused() -> None:
    from torch.utils.data import DataLoader

    model = tiny_llama()
    loader = DataLoader(torch.randint(0, 40, (8, 5)), batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        calibrate(model, loader, targets=LLAMA_TARGETS, show_progress=False,
                  max_memory=budget_for(3, model, ("input", "output")))
    plain = DataLoader(torch.randint(0, 40, (8, 5)), batch_size=2)
    assert_bitwise_equal(
        calibrate(model, plain, targets=LLAMA_TARGETS, show_progress=False),
        calibrate(model, plain, targets=LLAMA_TARGETS, show_progress=False,
                  max_memory=budget_for(3, model, ("input", "output"))))


def test_modes_flags_and_hooks_restored_when_a_later_pass_fails() -> None:
    model, data = tiny_llama(), llama_batches()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []

    def forward_fn(m: nn.Module, batch: dict[str, Tensor]):
        seen.append(1)
        if len(seen) > 2 + len(data):  # the probe, all of pass 1, then fail in pass 2
            raise RuntimeError("boom in pass 2")
        return m(**batch)

    with pytest.raises(RuntimeError, match="boom in pass 2"):
        calibrate(model, data, targets=LLAMA_TARGETS, show_progress=False,
                  forward_fn=forward_fn, max_memory=budget_for(4, model, ("input", "output")))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_the_plan_is_announced_and_the_bar_names_the_pass(capsys) -> None:
    model, data = tiny_llama(), llama_batches(2)
    calibrate(model, data, targets=LLAMA_TARGETS, show_progress=True,
              max_memory=budget_for(3, model, ("input", "output")))
    err = capsys.readouterr().err
    assert "covinit.calibrate: " in err and "pass(es) over the data, budget" in err
    assert "pass 1/" in err  # tqdm's description


def test_calibration_with_a_budget_saves_and_reloads(tmp_path) -> None:
    from covinit import Calibration

    model, data = tiny_llama(), llama_batches(3)
    cal = calibrate(model, data, targets=LLAMA_TARGETS, show_progress=False,
                    max_memory=budget_for(3, model, ("input", "output")))
    cal.save(tmp_path / "cal.safetensors")
    back = Calibration.load(tmp_path / "cal.safetensors", model)
    assert back.info["memory_plan"] == cal.info["memory_plan"]
    assert_bitwise_equal(cal, back)


def test_mixed_precision_counts_each_fold_s_float32_pending_sum() -> None:
    # Mixed precision keeps a float32 w×w pending co-moment per accumulator (fold) beside
    # the float64 one: the one formula, the collector's needs and the planner all count it.
    from covinit.cli import statistics_size
    from covinit.collect import Collector

    assert side_bytes(30, 20, "input", 3, "mixed") == 3 * 8 * 900 + 2 * 4 * 900
    assert side_bytes(30, 20, "gradient", 2, "mixed") == 2 * 8 * 20 * 50 + 4 * 400
    assert side_bytes(30, 20, "output", 1, "mixed") == side_bytes(30, 20, "output")  # a file
    with pytest.raises(ValueError, match="precision"):
        side_bytes(3, 2, "input", 2, "half")
    layers = {"a": nn.Linear(30, 20), "b": nn.Linear(20, 30)}
    needs = Collector(layers, ("input", "gradient"), folds=2, precision="mixed").memory_needs()
    stage = {w: 8 * _stage_rows(w) * w for w in (20, 30)}
    assert needs["a", "input"] == 3 * 8 * 900 + 2 * 4 * 900 + stage[30]
    assert needs["b", "gradient"] == 3 * 8 * 30 * 50 + 2 * 4 * 900 + stage[30]
    mixed = plan_calibration(layers, sides=("input",), max_memory=None, precision="mixed")
    exact = plan_calibration(layers, sides=("input",), max_memory=None)
    assert mixed.total_bytes - exact.total_bytes == 4 * (900 + 400)
    # a budget that fits float64's 2·8·w² but not mixed's extra 4·w² for the first layer
    exact_a = side_bytes(30, 20, "input", 2, staging=True)
    with pytest.raises(ValueError, match=fr"layer 'a' needs {(exact_a + 4 * 900) / 1e3:.2f} kB "
                                         fr".* max_memory={exact_a / 1e3:.2f} kB"):
        plan_calibration(layers, sides=("input",), max_memory=exact_a, precision="mixed",
                         units=[["a"], ["b"]])
    rows = statistics_size(layers, ("input",), folds=1, precision="mixed")
    assert [(r.memory, r.file) for r in rows] == [
        (2 * 8 * 900 + 4 * 900 + stage[30], 8 * 900), (2 * 8 * 400 + 4 * 400 + stage[20],
                                                        8 * 400)]
