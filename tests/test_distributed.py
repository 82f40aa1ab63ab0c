"""Tests for covinit.distributed: two gloo processes give the single-process calibration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from _dense import assert_matches
from _gloo import gloo_group
from torch import Tensor, nn

from covinit import Calibration, calibrate
from covinit.distributed import pack_moments, unpack_moments
from covinit.stats import Moments


class Net(nn.Module):
    """q/k share their input (an alias that must survive the merge); (B, T, 6) → (B, T, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.out(torch.tanh(self.q(x)) * self.k(x))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def all_batches() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(5):
        b, t = 1 + i % 3, 4 + i
        am = (torch.rand(b, t, generator=gen) > 0.25).long()
        out.append({"x": torch.randn(b, t, 6, generator=gen) * (1 + i) + 100,
                    "attention_mask": am})
    return out


# Each rank's shard: uneven, and in the second layout rank 1 reads nothing at all.
SHARDS = {"uneven": [[0, 2, 3, 4], [1]], "one-empty": [[0, 1, 2, 3, 4], []]}


def _worker(rank: int, store: str, layout: str, out: str) -> None:
    with gloo_group(store, rank):
        data = [all_batches()[i] for i in SHARDS[layout][rank]]
        cal = calibrate(make_net(), data, targets=["q", "k", "out"], folds=2,
                        show_progress=False)
        cal.save(Path(out) / f"rank{rank}.safetensors")
        sketched = calibrate(make_net(), data, targets=["q"], sketch_above=6, sketch_size=3,
                             show_progress=False)
        sketched.save(Path(out) / f"rank{rank}_sketch.safetensors")


@pytest.mark.parametrize("layout", list(SHARDS))
def test_two_gloo_processes_equal_single_process(tmp_path, layout):
    mp.spawn(_worker, args=(str(tmp_path / "store"), layout, str(tmp_path)), nprocs=2,
             join=True)
    single = calibrate(make_net(), [all_batches()[i] for shard in SHARDS[layout]
                                    for i in shard],
                       targets=["q", "k", "out"], show_progress=False)
    ranks = [Calibration.load(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for cal in ranks:
        assert cal.shared_inputs == {"k": "q"}
        assert cal.info["world_size"] == 2 and cal.info["batches"] == 5
        for layer in ("q", "k", "out"):
            for side in ("input", "output"):
                m, ref = cal.moments(layer, side), single.moments(layer, side)
                assert_matches(m, {"n": ref.n, "mean": ref.mean.numpy(), "m2": ref.m2.numpy(),
                                   "t": ref.t.numpy(), "q": ref.q.numpy(), "t_scale": 0.0})
                folds = cal.folds(layer, side)
                assert sum(f.n for f in folds) == m.n
    single_sketch = calibrate(make_net(), [all_batches()[i] for shard in SHARDS[layout]
                                           for i in shard],
                              targets=["q"], sketch_above=6, sketch_size=3, show_progress=False)
    for r in range(2):
        got = Calibration.load(tmp_path / f"rank{r}_sketch.safetensors").sketch("q", "output")
        want = single_sketch.sketch("q", "output")
        assert got.n == want.n and (got.y - want.y).abs().max() <= 1e-10 * want.y.abs().max()
    # every rank ends with the same bits
    a, b = (c.moments("out", "input") for c in ranks)
    assert torch.equal(a.m2, b.m2) and torch.equal(a.q, b.q)


def test_pack_unpack_round_trip():
    m = Moments.from_batch(torch.randn(7, 3, dtype=torch.float64))
    back = unpack_moments(pack_moments(m), 3)
    assert back.n == 7 and torch.equal(back.m2, m.m2) and torch.equal(back.t, m.t)
    assert unpack_moments(pack_moments(Moments.empty(3)), 3).n == 0
    with pytest.raises(ValueError, match="need 17 values"):
        unpack_moments(torch.zeros(5, dtype=torch.float64), 3)


def test_not_distributed_by_default():
    from covinit.distributed import is_distributed

    assert not is_distributed()
    assert os.environ.get("WORLD_SIZE") in (None, "1")
