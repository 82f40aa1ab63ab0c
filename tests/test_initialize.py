"""initialize(): contexts, seeding, calibration plumbing, validation and atomicity."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from conftest import ADAPTER_KINDS
from torch import nn

from covinit import add_lora, find_adapters, initialize
from covinit._registry import Entry
from covinit.initialization import layer_seed
from covinit.inits import InitContext, LoRAInit, get_strategy
from covinit.stats import Moments

TARGETS = ["query", "dense", "head"]
# The module (the package attribute ``covinit.initialize`` is the function of that name).
init_module = importlib.import_module("covinit.initialization")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _use_strategy(monkeypatch, fn, **tags) -> None:
    """Make initialize() see ``fn`` as strategy "probe" without touching the global registry."""
    real = get_strategy

    def fake(name):
        return Entry("probe", fn, "test strategy", tags) if name == "probe" else real(name)

    monkeypatch.setattr(init_module, "get_strategy", fake)


class FakeCalibration:
    """Implements the calibration interface initialize() uses, from given Moments."""

    def __init__(self, stats: dict[tuple[str, str], Moments], folds=None) -> None:
        self.stats = stats
        self._folds = folds or {}
        self.checked = 0

    @property
    def layer_names(self) -> list[str]:
        return sorted({layer for layer, _ in self.stats})

    def moments(self, layer: str, side: str = "input") -> Moments | None:
        return self.stats.get((layer, side))

    def folds(self, layer: str, side: str = "input"):
        return self._folds.get((layer, side))

    def check_model(self, model: nn.Module) -> None:
        self.checked += 1


# ---------------------------------------------------------------------- basic behaviour
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_kaiming_reinitializes_a_and_keeps_output(kind, make_tiny, adapt):
    model = adapt(kind, make_tiny(), TARGETS, rank=2)
    before = {n: a.get_lora() for n, a in find_adapters(model).items()}
    x = torch.randn(3, 12)
    with torch.no_grad():
        y = model(x)
    info = initialize(model, seed=5)
    assert list(info) == ["block.query", "block.dense", "head"]
    for name, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        assert not torch.equal(a, before[name][0])
        assert torch.count_nonzero(b) == 0
        assert info[name] == {"strategy": "kaiming", "rank": 2, "scaling": adapter.scaling,
                              "residual": False, "delta_norm": 0.0,
                              "a_norm": pytest.approx(float(torch.linalg.norm(a.double())),
                                                      rel=1e-6),
                              "b_norm": 0.0}
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_seeding_is_per_layer_and_reproducible(make_tiny):
    def a_of(seed, layers=None):
        model = add_lora(make_tiny(), TARGETS, rank=2)
        initialize(model, strategy="gaussian", seed=seed, layers=layers)
        return {n: ad.get_lora()[0] for n, ad in find_adapters(model).items()}

    first, again, other = a_of(0), a_of(0), a_of(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert all(not torch.equal(first[n], other[n]) for n in first)
    # A layer's init does not depend on which other layers are initialized.
    assert torch.equal(a_of(0, layers=["head"])["head"], first["head"])


def test_layer_seed_value_is_stable():
    import zlib

    # crc32, not Python's per-process salted hash; 32 bits, all torch's generator keeps.
    assert layer_seed(0, "block.query") == zlib.crc32(b"block.query")
    assert layer_seed(3, "block.query") == zlib.crc32(b"block.query", 3)
    assert 0 <= layer_seed(-1, "x") < 2**32
    assert len({layer_seed(s, "head") for s in range(1000)}) == 1000


def test_layers_selection_and_errors(make_tiny):
    model = add_lora(make_tiny(), ["query", "head"], rank=2)
    info = initialize(model, layers=["head"])
    assert list(info) == ["head"]
    assert list(initialize(model, layers=lambda n: n.startswith("block"))) == ["block.query"]
    with pytest.raises(ValueError, match=r"layer 'block\.dense' was not adapted.*head"):
        initialize(model, layers=["block.dense"])
    with pytest.raises(ValueError, match="matches no adapted layer"):
        initialize(model, layers=lambda n: False)


def test_rank_option_is_checked(make_tiny):
    model = add_lora(make_tiny(), ["query"], rank=2)
    assert initialize(model, rank=2)["block.query"]["rank"] == 2
    with pytest.raises(ValueError, match=r"rank=3 differs from layer 'block\.query'.*rank 2"):
        initialize(model, rank=3)


def test_argument_errors(make_tiny):
    model = add_lora(make_tiny(), ["query"], rank=2)
    with pytest.raises(ValueError, match="unknown strategy 'nope'; valid names: kaiming"):
        initialize(model, strategy="nope")
    with pytest.raises(ValueError, match=r"unknown options \['scale'\]; allowed: none"):
        initialize(model, strategy="kaiming", scale=2.0)
    with pytest.raises(TypeError, match="seed"):
        initialize(model, seed=1.5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        initialize(make_tiny())


def test_works_under_no_grad_and_keeps_parameters(make_tiny):
    model = add_lora(make_tiny(), ["query", "head"], rank=2)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():
        initialize(model, strategy="pissa")
    assert dict(model.named_parameters()) == params  # same objects: the optimizer stays valid
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    loss = model(torch.randn(4, 12)).square().mean()
    loss.backward()
    opt.step()
    assert model.head.lora_A.grad is not None


def test_dtype_and_device_are_kept(make_tiny):
    model = add_lora(make_tiny(dtype=torch.float64), ["query"], rank=2)
    initialize(model, strategy="pissa")
    layer = model.block.query
    assert layer.lora_A.dtype == torch.float64 and layer.base_layer.weight.dtype == torch.float64
    model16 = add_lora(make_tiny(dtype=torch.bfloat16), ["query"], rank=2)
    initialize(model16, strategy="pissa")
    assert model16.block.query.lora_B.dtype == torch.bfloat16


def test_context_contents(monkeypatch, make_tiny):
    seen: dict[str, InitContext] = {}

    def probe(ctx: InitContext) -> LoRAInit:
        seen[ctx.name] = ctx
        d, k = ctx.shape
        return LoRAInit(torch.zeros(ctx.rank, k), torch.zeros(d, ctx.rank))

    _use_strategy(monkeypatch, probe, needs=(), options=("scale",))
    model = add_lora(make_tiny(), ["query"], rank=3, alpha=6, use_rslora=True)
    initialize(model, strategy="probe", scale=0.5)
    ctx = seen["block.query"]
    assert ctx.weight.dtype == torch.float64 and ctx.weight.shape == (16, 12)
    assert torch.equal(ctx.weight, model.block.query.base_layer.weight.double())
    ctx.weight.zero_()  # a copy: the model's weight is untouched
    assert torch.count_nonzero(model.block.query.base_layer.weight) > 0
    assert ctx.rank == 3 and ctx.scaling == pytest.approx(6 / 3**0.5)
    assert ctx.options == {"scale": 0.5}
    assert ctx.input_estimate is None and ctx.output_estimate is None


# ---------------------------------------------------------------------- calibration plumbing
def _moments(k: int, n: int = 50, seed: int = 0) -> Moments:
    return Moments.from_batch(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))


def _fake_estimators(monkeypatch) -> list[tuple]:
    """Replace covinit.covariance by a recorder (initialize imports it lazily)."""
    calls: list[tuple] = []

    def estimate(moments, name="ledoit_wolf", *, folds=None, **options):
        calls.append((moments, name, folds, options))
        return types.SimpleNamespace(covariance=moments.covariance(), name=name)

    fake = types.ModuleType("covinit.covariance")
    fake.estimate = estimate
    fake.estimators = lambda: {"ledoit_wolf": "", "oas": ""}
    monkeypatch.setitem(sys.modules, "covinit.covariance", fake)
    return calls


def test_estimates_are_lazy_cached_and_shared(monkeypatch, make_tiny):
    calls = _fake_estimators(monkeypatch)
    got: dict[str, object] = {}

    def probe(ctx: InitContext) -> LoRAInit:
        got[ctx.name] = ctx.input_estimate()
        ctx.input_estimate()  # cached: no second estimator call
        assert ctx.output_estimate is not None  # available, never called
        d, k = ctx.shape
        return LoRAInit(torch.zeros(ctx.rank, k), torch.zeros(d, ctx.rank))

    _use_strategy(monkeypatch, probe, needs=("input",))
    shared = _moments(12)
    fold_list = [_moments(12, seed=1), _moments(12, seed=2)]
    calib = FakeCalibration(
        {("block.query", "input"): shared, ("block.query", "output"): _moments(16),
         ("head", "input"): shared, ("head", "output"): _moments(5)},
        folds={("block.query", "input"): fold_list},
    )
    model = add_lora(make_tiny(), ["query", "head"], rank=2)
    initialize(model, calib, strategy="probe", estimator="oas",
               estimator_options={"shrinkage": 0.1})
    assert calib.checked == 1
    assert len(calls) == 1  # q and head share one input summary → one estimate
    moments, name, folds, options = calls[0]
    assert moments is shared and name == "oas" and folds == fold_list
    assert options == {"shrinkage": 0.1}
    assert got["block.query"] is got["head"]


def test_unused_estimates_cost_nothing(monkeypatch, make_tiny):
    calls = _fake_estimators(monkeypatch)
    calib = FakeCalibration({("block.query", "input"): _moments(12)})
    model = add_lora(make_tiny(), ["query"], rank=2)
    initialize(model, calib, strategy="kaiming")
    assert calls == [] and calib.checked == 1


def test_missing_calibration_is_a_clear_error(monkeypatch, make_tiny):
    _fake_estimators(monkeypatch)
    _use_strategy(monkeypatch, lambda ctx: None, needs=("input", "output"))
    model = add_lora(make_tiny(), ["query", "head"], rank=2)
    with pytest.raises(ValueError, match="'probe' needs input-side calibration statistics"):
        initialize(model, strategy="probe")
    partial = FakeCalibration({("block.query", "input"): _moments(12),
                               ("head", "input"): _moments(12)})
    with pytest.raises(ValueError, match=r"no output-side statistics for layer 'block\.query'"):
        initialize(model, partial, strategy="probe")
    lacking = FakeCalibration({("block.query", "input"): _moments(12),
                               ("block.query", "output"): _moments(16)})
    with pytest.raises(ValueError, match="no input-side statistics for layer 'head'"):
        initialize(model, lacking, strategy="probe")
    full = FakeCalibration({(n, s): _moments(12) for n in ("block.query", "head")
                            for s in ("input", "output")})
    with pytest.raises(ValueError, match="unknown estimator 'nope'; valid names: ledoit_wolf"):
        initialize(model, full, strategy="probe", estimator="nope")


def test_check_model_is_enforced(make_tiny):
    class Refusing(FakeCalibration):
        def check_model(self, model):
            raise ValueError("calibration does not match the model")

    model = add_lora(make_tiny(), ["query"], rank=2)
    with pytest.raises(ValueError, match="does not match"):
        initialize(model, Refusing({}))


# ---------------------------------------------------------------------- validation, atomicity
@pytest.mark.parametrize("bad, message", [
    (lambda d, k, r: LoRAInit(torch.zeros(r + 1, k), torch.zeros(d, r)),
     r"returned A of shape \(3, 12\) for layer 'head' \(d=5, k=12, r=2\); expected \(2, 12\)"),
    (lambda d, k, r: LoRAInit(torch.zeros(r, k), torch.zeros(d, r), torch.zeros(k, d)),
     r"returned base of shape \(12, 5\) for layer 'head'"),
    (lambda d, k, r: LoRAInit(torch.full((r, k), float("nan")), torch.zeros(d, r)),
     r"non-finite values in A for layer 'head'"),
    (lambda d, k, r: (torch.zeros(r, k), torch.zeros(d, r)),
     r"returned tuple for layer 'head'"),
])
def test_bad_results_are_refused_and_nothing_changes(monkeypatch, make_tiny, bad, message):
    def probe(ctx: InitContext) -> LoRAInit:
        d, k = ctx.shape
        if ctx.name == "head":
            return bad(d, k, ctx.rank)
        return LoRAInit(torch.ones(ctx.rank, k), torch.ones(d, ctx.rank), torch.zeros(d, k))

    _use_strategy(monkeypatch, probe, needs=())
    model = add_lora(make_tiny(), ["query", "head"], rank=2)
    state = _state(model)
    with pytest.raises((ValueError, TypeError), match=message):
        initialize(model, strategy="probe")
    assert _same_state(model, state)  # block.query was computed first but not written


def test_residual_on_tied_weight_is_refused(make_tiny):
    model = make_tiny()
    model.tied = nn.Linear(12, 5)
    model.tied.weight = model.head.weight  # tie, as embeddings and LM heads are
    add_lora(model, ["head"], rank=2)
    state = _state(model)
    with pytest.raises(ValueError, match=r"'head'.*tied to \['head\.base_layer\.weight', "
                                         r"'tied\.weight'\]"):
        initialize(model, strategy="pissa")
    assert _same_state(model, state)
    initialize(model, strategy="kaiming")  # no residual: allowed


def test_fallback_warning_points_at_the_caller(make_tiny):
    """The warning names the line that called initialize (so pytest's filter for covinit's
    own warnings, and a user's traceback, see the call, not covinit's internals)."""
    calib = FakeCalibration({("block.query", "input"): _moments(12, n=1)})
    model = add_lora(make_tiny(), ["query"], rank=2)
    with pytest.warns(UserWarning, match="falls back to 'kaiming'") as record:
        initialize(model, calib, strategy="input-pca")
    assert [w.filename for w in record] == [__file__]
