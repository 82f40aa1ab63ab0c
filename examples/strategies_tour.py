"""A tour of every init strategy on two real pretrained models, one call each.

For all-MiniLM-L6-v2 (covinit's own LoRA layers, Rotten Tomatoes snippets) and
SmolLM2-135M-Instruct (PEFT's LoRA layers — covinit as a plug-in — on Hamlet):

1. ``covinit.calibrate`` the plain model once on a handful of batches (input and output
   statistics of every target layer, 3 folds so ``spatpca`` can cross-validate);
2. for every strategy in ``covinit.strategies()``: ``covinit.initialize(model, calibration,
   strategy=name)`` on a fresh copy of the LoRA model — one call — and check the promise:
   the logits on held-out text are unchanged at step 0 (relative change printed);
3. three extras: ``input-pca`` with the ``spatpca`` estimator, ``rank_budget=`` (EVA-style
   rank allocation), and ``export_lora`` of a trained ``cov-svd`` adapter reloaded onto the
   original base;
4. for SmolLM2, ``covinit.calibrate(peft_model, loader, strategy="cov-svd")``: collection and
   initialization in one call.

SmolLM2's weights are dequantized Q4_1 (4-bit quantization noise); its first load converts
the GGUF and caches it (~15 s).  Runs in about two minutes on 2 cores::

    python examples/strategies_tour.py
    python examples/strategies_tour.py --models minilm --rank 4
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# zoo (the demo models and data) lives beside the benchmarks, not in the covinit package:
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import torch
import zoo
from torch import nn

import covinit
from covinit.inits import get_strategy

PARSER = p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--models", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--alpha", type=float, default=16.0)
p.add_argument("--calib-batches", type=int, default=4, help="calibration batches per model")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--spatpca-layers", type=int, default=4,
               help="layers for the spatpca-estimator example (it cross-validates per layer)")


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**_inputs(batch)).logits.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _one_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-3) -> float:
    """One SGD step of the model's own loss on the trainable (LoRA) parameters."""
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def tour(name: str, base: nn.Module, lora_model: nn.Module, make_fresh_base: Any,
         calib_loader: Any, heldout: dict[str, torch.Tensor], targets: list[str],
         args: argparse.Namespace) -> None:
    print(f"\n=== {name}: {len(covinit.find_adapters(lora_model))} LoRA layers, rank "
          f"{args.rank} ({type(next(iter(covinit.find_adapters(lora_model).values()))).__name__})")
    start = time.perf_counter()
    cal = covinit.calibrate(base, calib_loader, targets=targets, folds=3, show_progress=False)
    print(f"calibrate: {cal} in {time.perf_counter() - start:.1f} s")
    reference = _logits(lora_model, heldout)

    print(f"{'strategy':<14}{'promise':<12}{'residual':>9}{'|c·B·A|_F (mean)':>19}"
          f"{'Δlogits (rel)':>16}{'seconds':>9}")
    for strategy in covinit.strategies():
        model = copy.deepcopy(lora_model)
        start = time.perf_counter()
        info = covinit.initialize(model, cal, strategy=strategy, seed=args.seed)  # one call
        seconds = time.perf_counter() - start
        change = _rel(_logits(model, heldout), reference)
        delta = sum(i["delta_norm"] for i in info.values()) / len(info)
        residual = sum(i["residual"] for i in info.values())
        promise = get_strategy(strategy).tags.get("preserves", "?")
        print(f"{strategy:<14}{promise:<12}{residual:>9}{delta:>19.3g}{change:>16.2e}"
              f"{seconds:>9.2f}")
        del model

    model = copy.deepcopy(lora_model)
    # spatpca cross-validates a grid per distinct input (~1-3 s each here): a few layers.
    chosen = list(covinit.find_adapters(model))[: args.spatpca_layers]
    start = time.perf_counter()
    covinit.initialize(model, cal, strategy="input-pca", estimator="spatpca", layers=chosen)
    print(f"input-pca + spatpca estimator on {len(chosen)} layers: Δlogits "
          f"{_rel(_logits(model, heldout), reference):.1e}, {time.perf_counter() - start:.1f} s")

    model = copy.deepcopy(lora_model)
    n_layers = len(covinit.find_adapters(model))
    info = covinit.initialize(model, cal, strategy="input-pca", rank_budget=args.rank * n_layers)
    ranks = sorted(i["rank"] for i in info.values())
    print(f"rank_budget={args.rank * n_layers}: ranks min {ranks[0]}, median "
          f"{ranks[len(ranks) // 2]}, max {ranks[-1]} (sum {sum(ranks)})")

    model = copy.deepcopy(lora_model)
    covinit.initialize(model, cal, strategy="cov-svd")
    loss = _one_step(model, heldout)
    trained = _logits(model, heldout)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        covinit.export_lora(model, path)
        reloaded = covinit.load_lora(make_fresh_base(), path)
        ranks = {a.rank for a in covinit.find_adapters(reloaded).values()}
        change = _rel(_logits(reloaded, heldout), trained)
        print(f"cov-svd, 1 step (loss {loss:.3f}), export_lora → original base: ranks "
              f"{sorted(ranks)}, Δlogits vs trained model {change:.1e}")
        if hasattr(model, "peft_config"):  # a PEFT model: also a PEFT-loadable directory
            from peft import PeftModel

            covinit.export_lora(model, tmp, format="peft")
            reloaded = PeftModel.from_pretrained(make_fresh_base(), tmp)
            change = _rel(_logits(reloaded, heldout), trained)
            print(f"  format='peft' → PeftModel.from_pretrained(original base): Δlogits "
                  f"{change:.1e}")


def minilm(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)  # the classifier head is random: seed it
    base, tok = zoo.load_minilm()
    splits = zoo.rotten_tomatoes(seed=args.seed, n_train=256, n_val=64)
    loader = zoo.text_classification_loader(tok, splits["train"][: 16 * args.calib_batches],
                                            batch_size=16, max_length=32)
    heldout = next(iter(zoo.text_classification_loader(tok, splits["validation"][:16],
                                                       batch_size=16, max_length=32)))
    targets = ["query", "value"]
    lora_model = covinit.add_lora(copy.deepcopy(base), targets, rank=args.rank,
                                  alpha=args.alpha)

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    tour("all-MiniLM-L6-v2 (covinit LoRA)", base, lora_model, fresh, loader, heldout, targets,
         args)


def smollm2(args: argparse.Namespace) -> None:
    from peft import LoraConfig, get_peft_model

    base, tok = zoo.load_smollm2()
    train_text, heldout_text = zoo.hamlet()
    loader = zoo.causal_lm_loader(tok, train_text, seq_len=64, batch_size=4)
    calib = [b for _, b in zip(range(args.calib_batches), loader, strict=False)]
    heldout = next(iter(zoo.causal_lm_loader(tok, heldout_text, seq_len=64, batch_size=4)))
    targets = ["q_proj", "v_proj"]
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets)
    lora_model = get_peft_model(copy.deepcopy(base), config)

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    tour("SmolLM2-135M-Instruct (PEFT LoRA)", base, lora_model, fresh, calib, heldout, targets,
         args)

    model = get_peft_model(copy.deepcopy(base), config)
    reference = _logits(model, heldout)
    start = time.perf_counter()
    covinit.calibrate(model, calib, strategy="cov-svd", show_progress=False)  # one call
    print(f"covinit.calibrate(peft_model, loader, strategy='cov-svd'): Δlogits "
          f"{_rel(_logits(model, heldout), reference):.1e}, {time.perf_counter() - start:.1f} s")


def main() -> None:
    args = PARSER.parse_args()
    torch.set_num_threads(args.threads)
    runners = {"minilm": minilm, "smollm2": smollm2}
    for name in args.models.split(","):
        if name not in runners:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(runners)}")
        start = time.perf_counter()
        runners[name](args)
        print(f"({name}: {time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
