"""covinit demo: calibrate a real pretrained model on real task data, compare init strategies.

Every strategy in one table (``make demo`` runs the benchmark's quick mode instead, with its
lr sweep and PEFT's baselines).  all-MiniLM-L6-v2 (22.7M parameters) learns Rotten Tomatoes
sentiment through LoRA on every layer's query / key / value / attention-output projections:

1. load the model (the random classifier head is seeded) and a fixed, seeded data split;
2. ``covinit.calibrate`` the frozen model once on a few hundred training snippets: streaming
   input/output covariance statistics of the 24 target layers;
3. for every strategy in ``covinit.strategies()`` (the table grows as strategies are added):
   re-create the same LoRA model, ``covinit.initialize`` it (with the calibration when the
   strategy needs one), train the same steps on the same batches with the same dropout
   masks, and report the validation loss at step 0 (equal for all: every strategy keeps the
   model's function at step 0), the mean training loss over the run (lower = learns faster),
   the final validation loss and accuracy, and the seconds spent.

``zero`` (A = B = 0) is the control: its adapter cannot move, so only the classifier head
trains.  The run is deterministic for a given ``--seed`` on a given machine.

Usage::

    python examples/demo.py                      # a few minutes on 2 cores
    python examples/demo.py --quick              # seconds: smoke test
    python examples/demo.py --strategies kaiming,pissa --steps 100
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
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
from tqdm.auto import tqdm

import covinit
from covinit.inits import get_strategy

# ----------------------------------------------------------------------------- settings
PARSER = p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
)
p.add_argument("--steps", type=int, default=40, help="training steps per strategy")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--max-length", type=int, default=64, help="tokens per snippet (truncated)")
p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--alpha", type=float, default=16.0)
p.add_argument("--n-train", type=int, default=2048, help="training examples")
p.add_argument("--n-val", type=int, default=384, help="validation examples")
p.add_argument("--n-calib", type=int, default=256,
               help="calibration examples (the first of the training split)")
p.add_argument("--estimator", default="ledoit_wolf",
               help="covariance estimator for strategies that use calibration")
p.add_argument("--strategies", default=None,
               help="comma-separated subset of covinit.strategies() (default: all)")
p.add_argument("--seed", type=int, default=0, help="data split, head, LoRA init, batch order")
p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
p.add_argument("--quick", action="store_true",
               help="tiny settings for a smoke test (well under a minute): 4 steps of batch 8, "
                    "max_length 32, 64 train, 32 validation and 32 calibration examples")
QUICK = {"steps": 4, "batch_size": 8, "max_length": 32, "n_train": 64, "n_val": 32,
         "n_calib": 32}

TARGETS = zoo.DEFAULT_TARGETS["minilm"]  # query, key, value, attention.output.dense


# ----------------------------------------------------------------------------- helpers
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags from ``argv``; ``--quick`` overrides the sizes with :data:`QUICK`."""
    args = PARSER.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("steps", "batch_size", "max_length", "rank", "n_train", "n_val", "n_calib"):
        if getattr(args, key) < 1:
            PARSER.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.n_calib > args.n_train:
        PARSER.error(f"--n-calib ({args.n_calib}) must not exceed --n-train ({args.n_train}): "
                     "calibration uses the first training examples")
    return args


def choose_strategies(spec: str | None) -> list[str]:
    """Names to run, in registry order; unknown names are a usage error."""
    available = list(covinit.strategies())
    if spec is None:
        return available
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in available]
    if unknown:
        PARSER.error(f"unknown strategies {unknown}; available: {', '.join(available)}")
    return wanted


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over every example of ``loader``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in loader:
        out = model(**batch)
        n = batch["labels"].shape[0]
        total_loss += out.loss.item() * n
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        count += n
    return total_loss / count, correct / count


def cycle(loader: Any):
    """Batches forever, epoch after epoch (the seeded loader reshuffles each epoch)."""
    while True:
        yield from loader


def run_strategy(args: argparse.Namespace, name: str, base: nn.Module, tokenizer: Any,
                 train: list, val_loader: Any, calibration: Any) -> dict[str, Any]:
    """Fresh LoRA copy of ``base`` → initialize with ``name`` → train → evaluate."""
    entry = get_strategy(name)
    needs = tuple(entry.tags.get("needs", ()))
    model = covinit.add_lora(copy.deepcopy(base), TARGETS, rank=args.rank, alpha=args.alpha)
    # The classifier head is new (random): it trains along with LoRA, as PEFT's
    # modules_to_save=["classifier"] does, identically for every strategy.
    model.classifier.requires_grad_(True)

    start = time.perf_counter()
    covinit.initialize(model, calibration if needs else None, strategy=name,
                       estimator=args.estimator, seed=args.seed)
    init_s = time.perf_counter() - start
    loss0, acc0 = evaluate(model, val_loader)

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # Same batches and the same dropout masks for every strategy.
    torch.manual_seed(args.seed)
    train_loader = zoo.text_classification_loader(tokenizer, train, args.batch_size,
                                                  args.max_length, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    model.train()
    start = time.perf_counter()
    batches = cycle(train_loader)
    losses = []
    bar = tqdm(range(args.steps), desc=f"{name:>16}", leave=False, file=sys.stderr)
    for _ in bar:
        loss = model(**next(batches)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    train_s = time.perf_counter() - start
    loss1, acc1 = evaluate(model, val_loader)
    return {"strategy": name, "needs": needs, "init_s": init_s, "loss0": loss0, "acc0": acc0,
            "train_loss": sum(losses) / len(losses), "loss": loss1, "acc": acc1,
            "train_s": train_s}


def print_table(rows: list[dict[str, Any]], calib_s: float) -> None:
    header = (f"{'strategy':<16} {'calib':>5} {'calib s':>7} {'init s':>6} {'val loss @0':>11} "
              f"{'mean train loss':>15} {'val loss':>8} {'val acc':>7} {'train s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        label = r["strategy"] + (" (control)" if r["strategy"] == "zero" else "")
        if "error" in r:
            print(f"{label:<16} FAILED: {r['error']}")
            continue
        uses = bool(r["needs"])
        print(f"{label:<16} {'yes' if uses else 'no':>5} "
              f"{f'{calib_s:.1f}' if uses else '-':>7} {r['init_s']:>6.2f} "
              f"{r['loss0']:>11.4f} {r['train_loss']:>15.4f} {r['loss']:>8.4f} "
              f"{r['acc']:>7.3f} {r['train_s']:>7.1f}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = choose_strategies(args.strategies)
    t0 = time.perf_counter()

    data = zoo.rotten_tomatoes(seed=args.seed, n_train=args.n_train, n_val=args.n_val)
    train, val = data["train"], data["validation"]
    torch.manual_seed(args.seed)  # the random classifier head, shared by every strategy
    base, tokenizer = zoo.load_minilm(num_labels=2)
    val_loader = zoo.text_classification_loader(tokenizer, val, 64, args.max_length)
    print(f"all-MiniLM-L6-v2 + LoRA r={args.rank} α={args.alpha:g} on {len(TARGETS)} "
          f"projections × 6 layers | Rotten Tomatoes: {len(train)} train, {len(val)} "
          f"validation, {args.n_calib} calibration | {args.steps} steps × batch "
          f"{args.batch_size}, max_length {args.max_length}, AdamW lr {args.lr:g} | "
          f"seed {args.seed}, {torch.get_num_threads()} threads")

    # One calibration pass over the frozen pretrained model serves every strategy: the
    # statistics of the base layers do not depend on the LoRA init (B = 0 or ΔW-preserving),
    # and the canonical layer names are the same with and without LoRA.
    calib_loader = zoo.text_classification_loader(tokenizer, train[:args.n_calib],
                                                  args.batch_size, args.max_length)
    start = time.perf_counter()
    # The gradient side (one backward per batch, the loss from the batches' labels) only when
    # a chosen strategy reads it: grad-svd, grad-whiten, kfac, lora-ga.
    needed = {side for name in names for side in get_strategy(name).tags.get("needs", ())}
    sides = ("input", "output", "gradient") if "gradient" in needed else ("input", "output")
    calibration = covinit.calibrate(base, calib_loader, targets=TARGETS, sides=sides)
    calib_s = time.perf_counter() - start
    positions = calibration.info.get("positions", "?")
    print(f"calibrated {len(calibration.layer_names)} layers ({', '.join(sides)}) on "
          f"{args.n_calib} examples = {positions} token positions in {calib_s:.1f} s")

    rows = []
    for name in tqdm(names, desc="strategies", file=sys.stderr):
        try:
            rows.append(run_strategy(args, name, base, tokenizer, train, val_loader, calibration))
        except Exception as e:  # report every strategy, then fail the run
            rows.append({"strategy": name, "error": f"{type(e).__name__}: {e}"})
    print()
    print_table(rows, calib_s)
    ok = [r for r in rows if "error" not in r]
    if ok:
        best = min(ok, key=lambda r: r["loss"])
        print(f"\nlowest final validation loss: {best['strategy']} ({best['loss']:.4f}, "
              f"accuracy {best['acc']:.3f}); chance-level loss is ln 2 = {math.log(2):.4f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
