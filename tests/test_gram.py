"""Upper-triangle Gram updates (covinit._gram): the BLAS and the panel paths against a dense
product, and the BLAS thread limit the collector holds while it runs."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_info
from torch import nn

from covinit._gram import add_gram, add_upper, blas_threads, new_upper, panels, symmetrize
from covinit.collect import Collector

BACKENDS = pytest.mark.parametrize("blas", [True, False], ids=["blas", "panels"])


@pytest.fixture(autouse=True)
def one_thread():
    """The default path takes the BLAS on one torch thread only: test it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _garbage(k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((k, k), float("nan"), dtype=dtype)


@BACKENDS
@pytest.mark.parametrize("k", [1, 5, 127, 128, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_overwrite_then_add_equals_the_dense_gram(blas: bool, k: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(k)
    y1 = torch.randn(37, k, generator=gen, dtype=torch.float64)
    y2 = torch.randn(5, k, generator=gen, dtype=torch.float64) + 3
    out = _garbage(k, dtype)  # overwrite ignores old contents, even NaN
    add_gram(out, y1.to(dtype), overwrite=True, blas=blas)
    add_gram(out, y2.to(dtype), blas=blas)
    full = symmetrize(out)
    assert torch.equal(full, full.T)
    ref = (y1.T @ y1 + y2.T @ y2).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(full, ref, rtol=tol, atol=tol * float(ref.abs().max()))


@BACKENDS
def test_only_the_panels_are_written(blas: bool):
    k = 300
    y = torch.randn(20, k, dtype=torch.float64)
    out = _garbage(k, torch.float64)
    add_gram(out, y, overwrite=True, blas=blas)
    written = ~torch.isnan(out)
    below = torch.ones(k, k, dtype=torch.bool)
    for i, j in panels(k):
        below[i:j, i:] = False
    assert not written[below].any()  # below the panels: never touched
    assert written.triu().sum() == k * (k + 1) // 2  # the whole upper triangle


def test_new_upper_add_upper_and_symmetrize_in_place():
    for k in (5, 300):
        y = torch.randn(64, k, dtype=torch.float64)
        acc = new_upper(k)
        add_gram(acc, y)
        pending = torch.empty(k, k, dtype=torch.float32)
        add_gram(pending, y[:10].float(), overwrite=True)
        add_upper(acc, pending)  # a float32 pending sum into the float64 one
        copy = symmetrize(acc)
        same = symmetrize(acc, in_place=True)
        assert same.data_ptr() == acc.data_ptr()
        assert torch.equal(same, copy) and torch.equal(same, same.T)
        ref = y.T @ y + (y[:10].float().T @ y[:10].float()).double()
        torch.testing.assert_close(same, ref, rtol=1e-6, atol=1e-5)  # float32 part


@BACKENDS
def test_converted_strided_and_inference_inputs(blas: bool):
    k = 200
    base = torch.randn(30, 2 * k, dtype=torch.float64)
    y = base[:, ::2]  # not contiguous
    assert not y.is_contiguous()
    with torch.inference_mode():
        out = new_upper(k, dtype=torch.float32)  # an inference tensor
        add_gram(out, y, blas=blas)  # float64 rows into a float32 matrix
    torch.testing.assert_close(symmetrize(out), (y.T @ y).float(), rtol=1e-5, atol=1e-3)


def test_default_path_is_the_blas_on_one_thread_only(monkeypatch: pytest.MonkeyPatch):
    from covinit import _gram

    calls: list[int] = []
    real = _gram._syrk
    monkeypatch.setattr(_gram, "_syrk", lambda *a: (calls.append(1), real(*a)))
    y = torch.randn(16, 200, dtype=torch.float64)
    for threads, expected in ((1, 1), (2, 0)):
        torch.set_num_threads(threads)
        calls.clear()
        out = new_upper(200)
        add_gram(out, y)
        assert len(calls) == expected
        torch.testing.assert_close(symmetrize(out), y.T @ y)


def _blas_threads_now() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_blas_threads_limits_and_restores():
    before = _blas_threads_now()
    with blas_threads(1):
        assert set(_blas_threads_now()) == {1}
    assert _blas_threads_now() == before


def test_collector_holds_torch_thread_count_and_restores_it_on_error():
    before = _blas_threads_now()
    layer = nn.Linear(4, 3)
    threads = torch.get_num_threads()
    seen: list[list[int]] = []
    layer.register_forward_hook(lambda *a: seen.append(_blas_threads_now()))
    with pytest.raises(RuntimeError, match="boom"), Collector({"l": layer}, ("input",)):
        layer(torch.randn(2, 4))
        raise RuntimeError("boom")
    assert seen and set(seen[0]) == {threads}  # torch's count, whatever it is
    assert _blas_threads_now() == before
