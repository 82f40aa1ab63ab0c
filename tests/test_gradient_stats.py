"""The "gradient" side of calibration (DESIGN.md §8): δ = ∂L/∂y moments and G = Σ δ·xᵀ.

The reference is ``torch.autograd`` on a functional transcription of the model: each layer's
output is recomputed from its weights as a tensor of its own, and ``torch.autograd.grad``
of the loss with respect to those tensors gives δ; G and the moments are then the dense
definitions over the kept positions (``_dense.dense``).  Real PEFT/covinit/loralib-style
models are checked against ``retain_grad`` on the plain model's layer outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from _dense import assert_matches, dense
from _gloo import gloo_group
from conftest import ADAPTER_KINDS, adapt_model
from torch import Tensor, nn

from covinit import Calibration, calibrate
from covinit.collect import Collector, _stage_rows
from covinit.distributed import all_gather_tensor
from covinit.stats import sum_in_order

SIDES = ("input", "gradient")


class Net(nn.Module):
    """q/k share their input; ``out`` reads ``tanh(q(x))·k(x)``; token-level cross-entropy
    over labels != -100 (mean-reduced), returned as a dict like a Hugging Face output."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> dict[str, Tensor | None]:
        logits = self.out(torch.tanh(self.q(x)) * self.k(x))  # (B, T, 3)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def make_net(dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype).eval()


def batches(n: int = 5, seed: int = 1, dtype: torch.dtype = torch.float64
            ) -> list[dict[str, Tensor]]:
    """Uneven (B, T), padding (attention_mask 0) and ignored labels (-100)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b, t = 1 + i % 3, 3 + i
        labels = torch.randint(0, 3, (b, t), generator=gen)
        labels[torch.rand(b, t, generator=gen) < 0.2] = -100
        mask = (torch.rand(b, t, generator=gen) > 0.2).long()
        out.append({"x": (torch.randn(b, t, 6, generator=gen) * (1 + i) + 3).to(dtype),
                    "attention_mask": mask, "labels": labels})
    return out


def reference(net: Net, data: list[dict[str, Tensor]], loss_fn=None
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``layer -> (δ rows, G)`` over the kept positions, by torch.autograd on a functional
    copy of ``net`` (no hooks, no covinit)."""
    deltas: dict[str, list[Tensor]] = {"q": [], "k": [], "out": []}
    cross = {name: 0.0 for name in deltas}
    for b in data:
        x = b["x"]
        w = {name: (getattr(net, name).weight.detach(), getattr(net, name).bias.detach())
             for name in deltas}
        yq = (x @ w["q"][0].T + w["q"][1]).requires_grad_()
        yk = (x @ w["k"][0].T + w["k"][1]).requires_grad_()
        h = torch.tanh(yq) * yk
        yo = h @ w["out"][0].T + w["out"][1]
        if loss_fn is None:
            loss = F.cross_entropy(yo.reshape(-1, 3), b["labels"].reshape(-1))
        else:
            loss = loss_fn({"logits": yo}, b)
        gq, gk, go = torch.autograd.grad(loss, [yq, yk, yo])
        keep = b["attention_mask"].bool()
        if "labels" in b:
            keep &= b["labels"] != -100
        for name, g, inp in (("q", gq, x), ("k", gk, x), ("out", go, h.detach())):
            deltas[name].append(g[keep])
            cross[name] = cross[name] + g[keep].T @ inp[keep]
    return {name: (torch.cat(deltas[name]).numpy(), np.asarray(cross[name]))
            for name in deltas}


def assert_cross(got: Tensor, want: np.ndarray, rtol: float = 1e-10) -> None:
    assert got.dtype == torch.float64 and got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=rtol * np.abs(want).max())


# ------------------------------------------------------------------ oracle
@pytest.mark.parametrize("folds", [None, 2])
def test_matches_autograd_oracle_with_masks(folds):
    net, data = make_net(), batches()
    cal = calibrate(net, data, targets=["q", "k", "out"], sides=SIDES, folds=folds,
                    show_progress=False)
    ref = reference(make_net(), data)
    assert cal.sides == SIDES and "gradient" in cal.sides
    kept = sum(int((b["attention_mask"].bool() & (b["labels"] != -100)).sum()) for b in data)
    for name, (rows, g) in ref.items():
        m = cal.moments(name, "gradient")
        assert m.n == kept == cal.moments(name, "input").n
        assert_matches(m, dense(rows))
        assert_cross(cal.gradient(name), g)
        if folds:
            parts = cal.gradient_folds(name)
            assert len(parts) == 2 and sum(f.n for f in cal.folds(name, "gradient")) == kept
            assert_cross(parts[0] + parts[1], g)
        else:
            assert cal.gradient_folds(name) is None
    # q and k share their input summary, never their δ
    assert cal.shared_inputs == {"k": "q"}
    assert not torch.equal(cal.gradient("q"), cal.gradient("k"))


def test_loss_fn_path_and_tuple_batches():
    data = [{k: v for k, v in b.items() if k != "labels"} for b in batches()]
    target = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)

    def loss_fn(outputs, batch):  # a sum-reduced loss the model knows nothing about
        return ((outputs["logits"] - target) ** 2).sum()

    cal = calibrate(make_net(), data, targets=["q", "k", "out"], sides=SIDES,
                    loss_fn=loss_fn, show_progress=False)
    ref = reference(make_net(), data, loss_fn)
    for name, (rows, g) in ref.items():
        assert_matches(cal.moments(name, "gradient"), dense(rows))
        assert_cross(cal.gradient(name), g)

    # positional batches: no masks, loss_fn reads the tuple
    tup = [(b["x"],) for b in data]
    cal2 = calibrate(make_net(), tup, targets=["out"], sides=SIDES,
                     loss_fn=lambda out, batch: out["logits"].square().sum(),
                     show_progress=False)
    assert cal2.moments("out", "gradient").n == sum(b["x"].shape[0] * b["x"].shape[1]
                                                    for b in data)


def test_mean_reduced_loss_records_delta_as_computed():
    """Doubling a batch under a mean-reduced loss halves δ (documented, not corrected)."""
    b = batches(1)[0]
    b["attention_mask"] = torch.ones_like(b["attention_mask"])
    b["labels"] = b["labels"].clamp_min(0)
    twice = {key: torch.cat([v, v]) for key, v in b.items()}
    one = calibrate(make_net(), [b], targets=["out"], sides=SIDES, show_progress=False)
    two = calibrate(make_net(), [twice], targets=["out"], sides=SIDES, show_progress=False)
    torch.testing.assert_close(two.gradient("out"), one.gradient("out"), rtol=1e-12, atol=0)
    torch.testing.assert_close(two.moments("out", "gradient").mean,
                               one.moments("out", "gradient").mean / 2, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ errors
def test_no_labels_and_no_loss_fn_is_a_clear_error():
    data = [{k: v for k, v in b.items() if k != "labels"} for b in batches(2)]
    with pytest.raises(ValueError, match=r"gradient side needs a loss, but batch 0 gave none: "
                                         r"the batch has no 'labels'.*loss_fn="):
        calibrate(make_net(), data, targets=["q"], sides=SIDES, show_progress=False)


def test_argument_errors():
    net, data = make_net(), batches(1)
    with pytest.raises(ValueError, match="needs the input side too"):
        calibrate(net, data, targets=["q"], sides=("gradient",), show_progress=False)
    with pytest.raises(ValueError, match="cannot be combined with sketch_above"):
        calibrate(net, data, targets=["q"], sides=SIDES, sketch_above=4, show_progress=False)
    with pytest.raises(ValueError, match="loss_fn is only used by the gradient side"):
        calibrate(net, data, targets=["q"], loss_fn=lambda o, b: o["loss"],
                  show_progress=False)
    with pytest.raises(ValueError, match=r"scalar loss; loss_fn\(outputs, batch\) at batch 0 "
                                         r"gave \(1, 3, 3\)"):
        calibrate(net, data, targets=["q"], sides=SIDES, loss_fn=lambda o, b: o["logits"],
                  show_progress=False)
    with pytest.raises(ValueError, match="does not require grad"):
        calibrate(net, data, targets=["q"], sides=SIDES,
                  loss_fn=lambda o, b: o["logits"].detach().sum(), show_progress=False)
    with pytest.raises(ValueError, match="inference_mode"), torch.inference_mode():
        calibrate(net, data, targets=["q"], sides=SIDES, show_progress=False)
    plain = calibrate(net, data, targets=["q"], show_progress=False)
    with pytest.raises(ValueError, match=r"layer 'q' has no gradient statistics.*sides="):
        plain.gradient("q")
    assert "gradient" not in plain.sides and plain.moments("q", "gradient") is None
    with pytest.raises(ValueError, match="'nope' was not calibrated"):
        plain.gradient("nope")


def test_input_changed_in_place_after_the_layer_is_refused():
    class Overwrites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = x * 1.0
            y = self.lin(h)
            h.mul_(2.0)  # the layer's input changes after it ran
            return (y * h).sum()

    with pytest.raises(ValueError, match="'lin' gradient: its input was modified in place"):
        calibrate(Overwrites(), [torch.randn(3, 4)], targets=["lin"], sides=SIDES,
                  loss_fn=lambda out, b: out, show_progress=False)


# ------------------------------------------------------------------ state left behind
def test_no_grad_flag_or_mode_left_changed():
    net = make_net()
    net.q.weight.requires_grad_(False)
    net.out.weight.grad = torch.full_like(net.out.weight, 7.0)
    net.train()
    net.k.eval()
    modes = {m: m.training for m in net.modules()}
    flags = {p: p.requires_grad for p in net.parameters()}
    grads = {p: None if p.grad is None else p.grad.clone() for p in net.parameters()}
    before = torch.is_grad_enabled()
    with torch.no_grad():
        calibrate(net, batches(), targets=["q", "k", "out"], sides=SIDES, show_progress=False)
    assert torch.is_grad_enabled() == before
    assert {m: m.training for m in net.modules()} == modes
    assert {p: p.requires_grad for p in net.parameters()} == flags
    for p, g in grads.items():
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    # no hook left behind: a plain forward is not tapped
    assert not net.q._forward_hooks and not net.out._forward_hooks
    out = net(**batches(1)[0])["loss"]
    assert out.grad_fn is not None and "Tap" not in str(out.grad_fn.next_functions)


def test_flags_restored_and_hooks_removed_when_the_loss_fails():
    net = make_net()
    flags = {p: p.requires_grad for p in net.parameters()}

    def bad_loss(outputs, batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(net, batches(), targets=["q"], sides=SIDES, loss_fn=bad_loss,
                  show_progress=False)
    assert {p: p.requires_grad for p in net.parameters()} == flags
    assert all(p.grad is None for p in net.parameters())
    assert not net.q._forward_hooks


def test_layer_off_the_loss_path_gets_zero_delta():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return self.used(x), self.unused(x)

    data = [torch.randn(5, 4) for _ in range(2)]
    cal = calibrate(TwoHeads(), data, targets=["used", "unused"], sides=SIDES,
                    loss_fn=lambda out, b: out[0].sum(), show_progress=False)
    m = cal.moments("unused", "gradient")
    assert m.n == 10 == cal.moments("unused", "input").n
    assert not m.m2.any() and not m.mean.any() and not cal.gradient("unused").any()
    torch.testing.assert_close(cal.moments("used", "gradient").mean,
                               torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------ merging
def test_merge_is_order_and_fold_invariant():
    data = batches(6)
    a = calibrate(make_net(), data, targets=["q", "out"], sides=SIDES, show_progress=False)
    b = calibrate(make_net(), data[::-1], targets=["q", "out"], sides=SIDES, folds=3,
                  show_progress=False)
    for name in ("q", "out"):
        g = a.gradient(name)
        assert (b.gradient(name) - g).abs().max() <= 1e-12 * g.abs().max()
        assert_cross(sum_in_order(b.gradient_folds(name)), g.numpy(), rtol=1e-12)
        ma, mb = a.moments(name, "gradient"), b.moments(name, "gradient")
        assert ma.n == mb.n
        assert_matches(mb, {"n": ma.n, "mean": ma.mean.numpy(), "m2": ma.m2.numpy(),
                            "t": ma.t.numpy(), "q": ma.q.numpy(), "t_scale": 0.0}, rtol=1e-11)


def test_sum_in_order():
    parts = [torch.randn(3, 2, dtype=torch.float64) for _ in range(4)]
    total = sum_in_order(parts)
    assert torch.equal(total, ((parts[0] + parts[1]) + parts[2]) + parts[3])
    assert total is not parts[0] and not torch.equal(parts[0], total)
    with pytest.raises(ValueError, match="at least one"):
        sum_in_order([])
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        sum_in_order([parts[0], torch.zeros(2, 3)])


def test_memory_guard_counts_gradient_statistics():
    net = make_net()
    layers = {"q": net.q, "out": net.out}
    plain = Collector(layers, ("input",), folds=2).memory_needs()
    grad = Collector(layers, SIDES, folds=2).memory_needs()
    stage = {w: 8 * _stage_rows(w) * w for w in (3, 5, 6)}  # each stream's staged rows
    assert plain == {("q", "input"): 8 * 36 * 3 + stage[6], ("out", "input"): 8 * 25 * 3
                     + stage[5]}
    # δ moments d×d and G d×k, each per fold plus one temporary
    assert grad[("q", "gradient")] == 8 * (5 * 5 + 5 * 6) * 3 + stage[5]
    assert grad[("out", "gradient")] == 8 * (3 * 3 + 3 * 5) * 3 + stage[3]
    col = Collector(layers, SIDES)  # the width the guard's message names: k or d
    assert [col.width("q", side) for side in SIDES] == [6, 5]


# ------------------------------------------------------------------ file
def test_save_load_round_trip_and_tamper(tmp_path):
    cal = calibrate(make_net(), batches(), targets=["q", "k", "out"], sides=SIDES, folds=2,
                    show_progress=False)
    path = tmp_path / "g.safetensors"
    cal.save(path)
    back = Calibration.load(path, model=make_net())
    assert back.sides == SIDES and back.shared_inputs == {"k": "q"}
    for name in ("q", "k", "out"):
        assert torch.equal(back.gradient(name), cal.gradient(name))
        assert all(torch.equal(x, y) for x, y in zip(back.gradient_folds(name),
                                                     cal.gradient_folds(name), strict=True))
        assert torch.equal(back.moments(name, "gradient").m2, cal.moments(name, "gradient").m2)
    moved = back.to("cpu")
    assert torch.equal(moved.gradient("out"), cal.gradient("out"))

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["q/gradient/cross"] = tensors["q/gradient/cross"] * 2
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="checksum mismatch"):
        Calibration.load(tmp_path / "bad.safetensors")


def test_constructor_refuses_unpaired_or_misshaped_gradients():
    cal = calibrate(make_net(), batches(2), targets=["out"], sides=SIDES, show_progress=False)
    stats = {key: cal.moments(*key) for key in [("out", "input"), ("out", "gradient")]}
    with pytest.raises(ValueError, match="'out': a gradient side needs both"):
        Calibration(stats, cal.shapes, cal.fingerprint)
    with pytest.raises(ValueError, match=r"G must be a float64 \(d, k\) = \(3, 5\)"):
        Calibration(stats, cal.shapes, cal.fingerprint,
                    gradients={"out": torch.zeros(5, 3, dtype=torch.float64)})


# ------------------------------------------------------------------ distributed
SHARDS = [[0, 2, 3], [1, 4]]


def _worker(rank: int, store: str, out: str) -> None:
    with gloo_group(store, rank):
        data = [batches()[i] for i in SHARDS[rank]]
        cal = calibrate(make_net(), data, targets=["q", "k", "out"], sides=SIDES, folds=2,
                        show_progress=False)
        cal.save(Path(out) / f"rank{rank}.safetensors")
        gathered = all_gather_tensor(torch.full((2, 2), float(rank), dtype=torch.float64))
        torch.save([g.tolist() for g in gathered], Path(out) / f"gather{rank}.pt")


def test_two_gloo_processes_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ref = reference(make_net(), [batches()[i] for shard in SHARDS for i in shard])
    ranks = [Calibration.load(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for cal in ranks:
        assert cal.info["world_size"] == 2 and cal.info["batches"] == 5
        for name, (rows, g) in ref.items():
            assert_matches(cal.moments(name, "gradient"), dense(rows))
            assert_cross(cal.gradient(name), g)
            assert_cross(sum_in_order(cal.gradient_folds(name)), g)
    for name in ref:  # every rank ends with the same bits
        assert torch.equal(ranks[0].gradient(name), ranks[1].gradient(name))
    for r in range(2):
        assert torch.load(tmp_path / f"gather{r}.pt") == [[[0.0, 0.0]] * 2, [[1.0, 1.0]] * 2]


# ------------------------------------------------------------------ LoRA models
def _retain_grad_reference(model: nn.Module, names: list[str], data: list, loss_fn
                           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """δ rows and G of plain ``nn.Linear`` layers by ``retain_grad`` + ``backward`` (every
    position kept: the batches carry no mask)."""
    out: dict[str, tuple[list, Tensor]] = {n: ([], 0.0) for n in names}
    for x in data:
        seen: dict[str, tuple[Tensor, Tensor]] = {}
        handles = []
        for n in names:
            def hook(mod, args, y, n=n, seen=seen):
                y.retain_grad()
                seen[n] = (args[0].detach(), y)
            handles.append(model.get_submodule(n).register_forward_hook(hook))
        try:
            loss_fn(model(x), x).backward()
        finally:
            for h in handles:
                h.remove()
        for n, (inp, y) in seen.items():
            g = y.grad.reshape(-1, y.shape[-1])
            rows, cross = out[n]
            rows.append(g)
            out[n] = (rows, cross + g.T @ inp.reshape(-1, inp.shape[-1]))
    model.zero_grad(set_to_none=True)
    return {n: (torch.cat(rows).numpy(), np.asarray(cross)) for n, (rows, cross) in out.items()}


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_lora_models_see_the_base_layers_delta(kind, make_tiny):
    """With B = 0, the wrapped layer's δ is the plain layer's: checked on covinit's, PEFT's and
    loralib-style layers; no LoRA parameter gets a .grad."""
    names = ["block.query", "block.dense"]
    data = [torch.randn(3, 4, 12, dtype=torch.float64) for _ in range(2)]
    target = torch.randn(5, dtype=torch.float64)

    def loss_fn(out, batch):
        return ((out - target) ** 2).mean()

    ref = _retain_grad_reference(make_tiny(dtype=torch.float64), names, data, loss_fn)
    model = adapt_model(kind, make_tiny(dtype=torch.float64), ["query", "dense"], rank=2)
    cal = calibrate(model, data, sides=SIDES, loss_fn=loss_fn, show_progress=False)
    for n in names:
        rows, g = ref[n]
        assert_matches(cal.moments(n, "gradient"), dense(rows))
        assert_cross(cal.gradient(n), g)
    assert all(p.grad is None for p in model.parameters())


def _tiny_bert(dtype: torch.dtype = torch.float64) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=24,
                                     max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).to(dtype).eval()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_real_peft_bert_matches_plain_model_by_retain_grad():
    """A PEFT LoRA BERT (random weights, from a config), labels (B,) -> the model's own
    loss; δ and G of query/value equal the plain model's by retain_grad to 1e-10."""
    peft = pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(3)
    data = []
    for b, t in ((2, 7), (3, 5)):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 2:] = 0
        data.append({"input_ids": torch.randint(0, 50, (b, t), generator=gen),
                     "attention_mask": mask, "labels": torch.randint(0, 2, (b,), generator=gen)})
    names = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2)
             for p in ("query", "value")]
    # reference: plain model, retain_grad, keep attention_mask positions
    plain = _tiny_bert()
    seen: dict[str, list] = {n: [] for n in names}
    for batch in data:
        outs: dict[str, tuple[Tensor, Tensor]] = {}

        def keep_output(mod, args, y, n, outs=outs):
            y.retain_grad()
            outs[n] = (args[0], y)

        handles = [plain.get_submodule(n).register_forward_hook(
            lambda mod, args, y, n=n: keep_output(mod, args, y, n)) for n in names]
        plain(**batch).loss.backward()
        for h in handles:
            h.remove()
        keep = batch["attention_mask"].bool()
        for n, (x, y) in outs.items():
            seen[n].append((y.grad[keep], x.detach()[keep]))
    model = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(
        target_modules=["query", "value"], r=2, lora_alpha=4))
    flags = {p: p.requires_grad for p in model.parameters()}
    cal = calibrate(model, data, sides=SIDES, show_progress=False)
    for n in names:
        rows = torch.cat([d for d, _ in seen[n]]).numpy()
        g = sum(d.T @ x for d, x in seen[n]).numpy()
        assert cal.moments(n, "gradient").n == 25 == cal.moments(n, "input").n  # 12 + 13
        assert_matches(cal.moments(n, "gradient"), dense(rows))
        assert_cross(cal.gradient(n), g)
    assert all(p.grad is None for p in model.parameters())
    assert {p: p.requires_grad for p in model.parameters()} == flags


def test_real_minilm_gradient_smoke():
    """all-MiniLM-L6-v2 with a fresh classification head: two labelled batches, q/v."""
    zoo = pytest.importorskip("zoo")
    model, tokenizer = zoo.load_minilm()
    texts = ["a quietly moving film", "dull, overlong and badly acted", "a small gem",
             "it never finds its footing, and the jokes fall flat"]
    data = []
    for i in (0, 2):
        enc = dict(tokenizer(texts[i:i + 2], padding=True, return_tensors="pt"))
        enc["labels"] = torch.tensor([1, 0])
        data.append(enc)
    start = time.perf_counter()
    cal = calibrate(model, data, targets=["query", "value"], sides=SIDES, show_progress=False)
    seconds = time.perf_counter() - start
    n = sum(int(b["attention_mask"].sum()) for b in data)
    name = "bert.encoder.layer.3.attention.self.value"
    g = cal.gradient(name)
    assert g.shape == (384, 384) and bool(torch.isfinite(g).all()) and bool(g.any())
    assert cal.moments(name, "gradient").n == n
    assert all(p.grad is None for p in model.parameters())
    assert seconds < 60


def test_mixed_precision_cross_moment_is_close():
    data = batches()
    exact = calibrate(make_net(), data, targets=["q", "out"], sides=SIDES, show_progress=False)
    mixed = calibrate(make_net(), data, targets=["q", "out"], sides=SIDES, precision="mixed",
                      show_progress=False)
    for name in ("q", "out"):
        g = exact.gradient(name)
        assert mixed.gradient(name).dtype == torch.float64
        assert (mixed.gradient(name) - g).abs().max() <= 1e-5 * g.abs().max()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_encoder_decoder_cross_attention_keys_use_the_encoder_mask():
    """Tiny T5 (random, float64), labels -> the model's loss: the cross-attention key
    projection reads the encoder's output, so its δ and G run over the encoder's kept
    positions; the decoder's query over labels != -100.  Reference: retain_grad."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                   num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).double().eval()
    names = {"cross_k": "decoder.block.0.layer.1.EncDecAttention.k",
             "decoder": "decoder.block.0.layer.0.SelfAttention.q"}
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, 3, 5, 6, 7], [3, 4, 5, 6, 7, -100]])
    batch = {"input_ids": torch.randint(3, 40, (2, 6), generator=torch.Generator()
                                        .manual_seed(0)), "attention_mask": am,
             "labels": labels}
    outs: dict[str, tuple[Tensor, Tensor]] = {}

    def keep_output(mod, args, y, role):
        y.retain_grad()
        outs[role] = (args[0].detach(), y)

    handles = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, y, role=role: keep_output(mod, args, y, role))
        for role, n in names.items()]
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    keeps = {"cross_k": am.bool(), "decoder": labels != -100}
    cal = calibrate(model, [batch], targets=list(names.values()), sides=SIDES,
                    show_progress=False)
    for role, n in names.items():
        x, y = outs[role]
        rows = y.grad[keeps[role]]
        assert cal.moments(n, "gradient").n == int(keeps[role].sum()) \
            == cal.moments(n, "input").n
        ref = dense(rows.numpy())
        # Softmax attention makes a key's δ sum to ~0 over positions: compare the mean
        # against the rows' size, since it is itself pure rounding (~1e-18).
        m = cal.moments(n, "gradient")
        np.testing.assert_allclose(m.mean.numpy(), ref["mean"], rtol=0,
                                   atol=1e-10 * float(rows.abs().max()))
        ref["mean"] = m.mean.numpy()
        assert_matches(m, ref)
        assert_cross(cal.gradient(n), (rows.T @ x[keeps[role]]).numpy())
