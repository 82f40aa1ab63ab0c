"""Shared fixtures: a tiny model with named linear layers, seeding, and LoRA builders.

``adapt(kind, model, targets, rank, alpha, use_rslora)`` puts LoRA layers of one of three
implementations into a model — covinit's own, PEFT's, or a loralib-style layer defined here
(loralib itself is not installed) — so that a test can run once per implementation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread by default: the test matrices are small, and on a busy 2-core machine
# multi-threaded LAPACK spins; a 1536×384 SVD measured 0.07 s on 1 thread vs 10 s on 2 under
# load.  Override with COVINIT_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("COVINIT_TEST_THREADS", "1")))

ADAPTER_KINDS = ("covinit", "peft", "loralib")


class TinyBlock(nn.Module):
    """``x + dense(gelu(query(x)))``: two named linear layers, (..., 12) → (..., 12)."""

    def __init__(self, width: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.query = nn.Linear(width, hidden)
        self.dense = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dense(F.gelu(self.query(x)))


class TinyNet(nn.Module):
    """A tiny model with named linear layers ``block.query`` (16×12), ``block.dense`` (12×16)
    and ``head`` (5×12); input (..., 12), output (..., 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = TinyBlock()
        self.head = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))


LINEAR_NAMES = ("block.query", "block.dense", "head")


class LoralibStyleLinear(nn.Linear):
    """A stand-in for ``loralib.Linear``: an ``nn.Linear`` subclass holding ``lora_A`` (r, k)
    and ``lora_B`` (d, r) as parameters, ``scaling`` and ``merged``, computing base and adapter
    in one forward.  With ``fan_in_fan_out`` the weight is stored (k, d), as loralib does for
    GPT-2 style layers."""

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 1.0,
                 fan_in_fan_out: bool = False, use_rslora: bool = False) -> None:
        super().__init__(in_features, out_features)
        self.r = r
        self.lora_alpha = lora_alpha
        self.fan_in_fan_out = fan_in_fan_out
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.merged = False
        self.lora_A = nn.Parameter(self.weight.new_empty(r, in_features))
        self.lora_B = nn.Parameter(self.weight.new_zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.detach().T.contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, *,
                    fan_in_fan_out: bool = False, use_rslora: bool = False) -> LoralibStyleLinear:
        layer = cls(linear.in_features, linear.out_features, r, lora_alpha, fan_in_fan_out,
                    use_rslora).to(dtype=linear.weight.dtype)
        with torch.no_grad():
            w = linear.weight.T if fan_in_fan_out else linear.weight
            layer.weight.copy_(w)
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.T if self.fan_in_fan_out else self.weight
        y = F.linear(x, w, self.bias)
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def _suffix_match(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def adapt_model(kind: str, model: nn.Module, targets: Sequence[str], rank: int = 4,
                alpha: float = 8.0, use_rslora: bool = False, **peft_kwargs) -> nn.Module:
    """Put LoRA layers of implementation ``kind`` into ``model`` (covinit, peft or loralib)."""
    if kind == "covinit":
        from covinit import add_lora

        return add_lora(model, list(targets), rank=rank, alpha=alpha, use_rslora=use_rslora)
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(target_modules=list(targets), r=rank, lora_alpha=alpha,
                            use_rslora=use_rslora, **peft_kwargs)
        return get_peft_model(model, config)
    if kind == "loralib":
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and _suffix_match(name, targets):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, LoralibStyleLinear.from_linear(
                    module, rank, alpha, use_rslora=use_rslora))
        return model
    raise ValueError(f"unknown adapter kind {kind!r}; valid: {ADAPTER_KINDS}")


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def make_tiny() -> Callable[..., TinyNet]:
    """Factory: ``make_tiny(seed=0, dtype=torch.float32)`` gives identical fresh models."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = TinyNet().to(dtype).eval()
        torch.random.set_rng_state(gen_state)
        return model

    return make


@pytest.fixture
def tiny_model(make_tiny: Callable[..., TinyNet]) -> TinyNet:
    """A fresh :class:`TinyNet` (seed 0, float32, eval mode)."""
    return make_tiny()


@pytest.fixture
def adapt() -> Callable[..., nn.Module]:
    """The :func:`adapt_model` builder (covinit / PEFT / loralib-style LoRA layers)."""
    return adapt_model
