"""Quickstart: covinit's own LoRA core on all-MiniLM-L6-v2 + Rotten Tomatoes.

The whole workflow in four calls, then a comparison with PEFT's default (Kaiming) init:

1. ``covinit.add_lora(model, targets, rank=8)`` puts LoRA layers on the attention projections;
2. ``covinit.calibrate(model, loader, strategy=...)`` runs the frozen model over a few
   batches of task data once, collects each adapted layer's activation covariance, and
   initializes A and B from it (here ``input-pca``: A = the top-r eigenvectors of each
   layer's input covariance, B = 0, so the model is unchanged at step 0);
3. train (plain PyTorch, AdamW; the LoRA factors and the new classifier head);
4. evaluate, and do the same with ``strategy="kaiming"`` on the same data, steps and seed.

Runs in about two minutes on 2 CPU cores::

    python examples/quickstart.py
    python examples/quickstart.py --strategy cov-svd --steps 80
    python examples/quickstart.py --steps 2 --n-train 32 --n-val 16 --n-calib 16   # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--strategy", default="input-pca", help="a name from covinit.strategies()")
p.add_argument("--estimator", default="ledoit_wolf", help="covariance estimator")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--steps", type=int, default=60, help="training steps per run")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--max-length", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--n-train", type=int, default=1024)
p.add_argument("--n-val", type=int, default=256)
p.add_argument("--n-calib", type=int, default=128, help="calibration examples")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)

TARGETS = zoo.DEFAULT_TARGETS["minilm"]  # query, key, value, attention.output.dense


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    model.eval()
    loss = correct = count = 0.0
    for batch in loader:
        out = model(**batch)
        n = batch["labels"].shape[0]
        loss += out.loss.item() * n
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        count += n
    return loss / count, correct / count


def run(args: argparse.Namespace, strategy: str, data: dict, tokenizer, val_loader) -> dict:
    torch.manual_seed(args.seed)  # same random classifier head for every run
    model, _ = zoo.load_minilm(num_labels=2)
    model = covinit.add_lora(model, TARGETS, rank=args.rank, alpha=2 * args.rank)
    model.classifier.requires_grad_(True)  # the head is new: train it with the adapters

    calib_loader = zoo.text_classification_loader(tokenizer, data["train"][:args.n_calib],
                                                  args.batch_size, args.max_length)
    start = time.perf_counter()
    if get_strategy(strategy).tags.get("needs"):
        # Calibration + initialization in one call, before any optimizer exists.
        covinit.calibrate(model, calib_loader, strategy=strategy, estimator=args.estimator,
                          seed=args.seed, show_progress=False)
    else:  # data-free strategies (kaiming, pissa, ...) need no calibration pass
        covinit.initialize(model, strategy=strategy, seed=args.seed)
    init_s = time.perf_counter() - start
    loss0, _ = evaluate(model, val_loader)

    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad],
                                  lr=args.lr)
    train_loader = zoo.text_classification_loader(tokenizer, data["train"], args.batch_size,
                                                  args.max_length, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    torch.manual_seed(args.seed)  # same dropout masks
    model.train()
    losses, step, start = [], 0, time.perf_counter()
    while step < args.steps:
        for batch in train_loader:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step == args.steps:
                break
    train_s = time.perf_counter() - start
    loss1, acc1 = evaluate(model, val_loader)
    return {"strategy": strategy, "init_s": init_s, "loss0": loss0,
            "train_loss": sum(losses) / len(losses), "loss": loss1, "acc": acc1,
            "train_s": train_s}


def main(argv: list[str] | None = None) -> int:
    args = p.parse_args(argv)
    for key in ("rank", "steps", "batch_size", "max_length", "n_train", "n_val", "n_calib"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.strategy not in covinit.strategies():
        p.error(f"unknown strategy {args.strategy!r}; choose from "
                f"{', '.join(covinit.strategies())}")
    torch.set_num_threads(args.threads)
    data = zoo.rotten_tomatoes(seed=args.seed, n_train=args.n_train, n_val=args.n_val)
    _, tokenizer = zoo.load_minilm()
    val_loader = zoo.text_classification_loader(tokenizer, data["validation"], 64,
                                                args.max_length)
    print(f"MiniLM + LoRA r={args.rank} on {len(TARGETS)} projections × 6 layers; Rotten "
          f"Tomatoes {args.n_train} train / {args.n_val} validation; {args.steps} steps × "
          f"batch {args.batch_size}; calibration on {args.n_calib} examples")
    rows = [run(args, name, data, tokenizer, val_loader)
            for name in dict.fromkeys(["kaiming", args.strategy])]
    print(f"\n{'strategy':<14} {'init s':>6} {'val loss @0':>11} {'mean train loss':>15} "
          f"{'val loss':>8} {'val acc':>7} {'train s':>7}")
    for r in rows:
        print(f"{r['strategy']:<14} {r['init_s']:>6.2f} {r['loss0']:>11.4f} "
              f"{r['train_loss']:>15.4f} {r['loss']:>8.4f} {r['acc']:>7.3f} "
              f"{r['train_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
