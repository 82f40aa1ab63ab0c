"""Faults mid-way leave the user's model exactly as it was (issue 8).

"Exactly" is :func:`_state.snapshot`: state dict bitwise, every module's hook dicts, train /
eval flags, requires_grad flags and parameter identities.  The plain-model forward_fn case
is in test_calibration; here the same holds for LoRA models of all three implementations,
where calibrate also initializes, for faults raised by the dataloader, by the user's
forward_fn, by our own checks and by a strategy.

Ranks that see different numbers of batches (including none) are covered by
test_distributed (two gloo processes, "uneven" and "one-empty" layouts).
"""

from __future__ import annotations

import pytest
import torch
from _state import snapshot
from conftest import ADAPTER_KINDS
from torch import Tensor, nn

from covinit import calibrate, find_adapters, initialize
from covinit._registry import Entry
from covinit.inits import _REGISTRY, LoRAInit

TARGETS = ["query", "dense", "head"]


class Boom(Exception):
    pass


def _prepared(make_tiny, adapt, kind: str) -> nn.Module:
    """A model in a state a user could have: mixed train/eval flags, a frozen weight, a hook
    of their own, and LoRA factors that are not at their init values."""
    model = make_tiny() if kind == "plain" else adapt(kind, make_tiny(), TARGETS, rank=2)
    model.train()
    model.block.eval()
    model.head.register_forward_hook(lambda m, i, o: None)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model


def _batches(n: int = 4) -> list[Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(6, 12, generator=gen) for _ in range(n)]


def _init_kwargs(kind: str) -> dict:
    # overwrite=True: _prepared's factors are not at their init values (as if trained).
    return {} if kind == "plain" else {"strategy": "input-pca", "seed": 1, "overwrite": True}


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("source", ["dataloader", "forward_fn"])
@pytest.mark.parametrize("kind", ["plain", *ADAPTER_KINDS])
def test_fault_mid_calibration_leaves_model_exactly_as_it_was(make_tiny, adapt, kind, source,
                                                              exc):
    model = _prepared(make_tiny, adapt, kind)
    before = snapshot(model)
    data = _batches()

    def loader():
        for i, x in enumerate(data):
            if source == "dataloader" and i == 2:
                raise exc("disk gone")
            yield x

    def forward_fn(m: nn.Module, x: Tensor) -> Tensor:
        out = m(x)
        if source == "forward_fn" and x is data[2]:
            raise exc("user code failed")
        return out

    with pytest.raises(exc):
        calibrate(model, loader(), targets=TARGETS if kind == "plain" else None,
                  forward_fn=forward_fn, show_progress=False, **_init_kwargs(kind))
    assert snapshot(model) == before


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_non_finite_activation_mid_calibration_leaves_lora_model_unchanged(make_tiny, adapt,
                                                                          kind):
    model = _prepared(make_tiny, adapt, kind)
    before = snapshot(model)
    data = _batches()
    data[3] = data[3].clone()
    data[3][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'block\.query' input activation at batch 3"):
        calibrate(model, data, show_progress=False, strategy="cov-svd", overwrite=True)
    assert snapshot(model) == before


@pytest.fixture
def failing_strategy(monkeypatch):
    """Registers ``fails-on-head``: a valid residual init for every layer but ``head``, where
    it raises the exception class stored in ``state["exc"]``."""
    state: dict = {"exc": Boom, "seen": []}

    def fn(ctx):
        state["seen"].append(ctx.name)
        if ctx.name == "head":
            raise state["exc"]("strategy failed on head")
        d, k = ctx.shape
        a = torch.ones(ctx.rank, k, dtype=torch.float64)
        b = torch.ones(d, ctx.rank, dtype=torch.float64)
        return LoRAInit(a, b, ctx.weight - ctx.scaling * b @ a)

    monkeypatch.setitem(_REGISTRY._entries, "fails-on-head", Entry(
        "fails-on-head", fn, "test", {"needs": ("input",), "preserves": "function",
                                      "options": ()}))
    return state


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_exception_during_initialize_writes_nothing(make_tiny, adapt, failing_strategy, kind,
                                                    exc):
    """The other layers' residual bases and factors were computed before ``head`` failed;
    none of them may have been written (all layers are planned before any is written)."""
    failing_strategy["exc"] = exc
    cal = calibrate(make_tiny(), _batches(), targets=TARGETS, show_progress=False)
    model = _prepared(make_tiny, adapt, kind)
    before = snapshot(model)
    with pytest.raises(exc, match="strategy failed on head"):
        initialize(model, cal, strategy="fails-on-head")
    assert failing_strategy["seen"] == ["block.query", "block.dense", "head"]
    assert snapshot(model) == before


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_exception_during_the_initialize_step_of_calibrate_restores_everything(
        make_tiny, adapt, failing_strategy, kind):
    model = _prepared(make_tiny, adapt, kind)
    before = snapshot(model)
    with pytest.raises(Boom, match="strategy failed on head"):
        calibrate(model, _batches(), show_progress=False, strategy="fails-on-head",
                  overwrite=True)
    assert snapshot(model) == before


def test_too_few_positions_for_the_rank_refused_before_initializing(make_tiny, adapt):
    model = _prepared(make_tiny, adapt, "covinit")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'block\.query' kept only 1 usable position\(s\) "
                                         r"but rank 2 was requested"):
        calibrate(model, [torch.randn(1, 12)], show_progress=False, strategy="input-pca",
                  overwrite=True)
    assert snapshot(model) == before


def test_successful_calibration_changes_only_the_lora_factors(make_tiny, adapt):
    """The positive control for the snapshots above: a run that succeeds changes the LoRA
    factors and nothing else (no hook, flag, mode or base weight)."""
    model = _prepared(make_tiny, adapt, "peft")
    before = snapshot(model)
    calibrate(model, _batches(), show_progress=False, strategy="input-pca", seed=1,
              overwrite=True)
    after = snapshot(model)
    assert after != before
    changed = {k for k in before.state if not torch.equal(before.state[k], after.state[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert (after.hooks, after.modes, after.flags, after.params) == (
        before.hooks, before.modes, before.flags, before.params)
    assert set(find_adapters(model)) == {"block.query", "block.dense", "head"}


# ------------------------------------------------------------------ distributed
def _failing_rank_worker(rank: int, store: str, out: str) -> None:
    import json
    from pathlib import Path

    from _gloo import gloo_group

    # A finite timeout: if the healthy rank were left waiting, the test fails instead of hanging.
    with gloo_group(store, rank, timeout_s=60):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3)).eval()
        gen = torch.Generator().manual_seed(rank)
        data = [torch.randn(5, 4, generator=gen) for _ in range(3 if rank == 0 else 2)]
        if rank == 1:
            data[1][0, 0] = float("nan")  # rank 1 fails at its second batch
        before = snapshot(model)
        try:
            calibrate(model, data, targets=["0"], show_progress=False)
            result = {"error": None}
        except Exception as err:  # recorded for the parent process to check
            result = {"error": type(err).__name__, "message": str(err)}
        result["unchanged"] = snapshot(model) == before
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_a_failing_rank_stops_the_others_instead_of_leaving_them_waiting(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_failing_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
             join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r1["error"] == "ValueError"
    assert r1["message"].startswith("layer '0' input activation at batch 1 contains 1 NaN/Inf")
    assert r0 == {"error": "RuntimeError", "unchanged": True,
                  "message": "calibration failed on rank(s) [1]; rank 0 stops too (see the "
                             "error on rank 1)"}
    assert r1["unchanged"]
