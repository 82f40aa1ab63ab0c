"""A residual strategy on a causal LM, exported onto the untouched base model.

SmolLM2-135M-Instruct (Llama architecture) learns Hamlet through covinit's LoRA layers on
the attention projections:

1. ``covinit.add_lora`` + ``covinit.calibrate(model, loader, strategy="cov-svd")``: the
   top-r directions of ``W0·Σx^{1/2}`` (input covariance shrunk by Ledoit-Wolf) move from
   the base weight into the adapter — the base becomes the residual ``W0 − c·B·A`` and the
   model's logits are unchanged at step 0 (checked);
2. a few AdamW steps on Hamlet (held-out loss before / after);
3. ``covinit.export_lora(model, path)``: the adapter, with the step-0 part folded in
   (rank ``2r``), so that it applies to the **original** weights; a freshly loaded,
   untouched SmolLM2 + ``covinit.load_lora`` reproduces the trained model's logits.

SmolLM2's weights are dequantized Q4_1 (4-bit quantization noise); the first load converts
the GGUF and caches it (~15 s).  A few minutes on 2 CPU cores::

    python examples/smollm2_residual.py
    python examples/smollm2_residual.py --strategy two-sided --layers 8
    python examples/smollm2_residual.py --layers 2 --steps 1 --batch-size 1 --seq-len 16 \\
        --calib-batches 1                                                   # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# zoo (the demo models and data) lives beside the benchmarks, not in the covinit package:
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import torch
import zoo

import covinit
from covinit.inits import get_strategy

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--strategy", default="cov-svd",
               help="a residual strategy: cov-svd, cov-minor, two-sided or pissa")
p.add_argument("--estimator", default="ledoit_wolf")
p.add_argument("--layers", type=int, default=30, help="adapt the first N decoder layers")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--lr", type=float, default=5e-4)
p.add_argument("--calib-batches", type=int, default=4)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    model.eval()
    return sum(model(**b).loss.item() for b in batches) / len(batches)


def main(argv: list[str] | None = None) -> int:
    args = p.parse_args(argv)
    entry = get_strategy(args.strategy) if args.strategy in covinit.strategies() else None
    if entry is None or entry.tags.get("preserves") != "function":
        residual = [n for n in covinit.strategies()
                    if get_strategy(n).tags.get("preserves") == "function"]
        p.error(f"--strategy must be a residual strategy: {', '.join(residual)}")
    for key in ("layers", "rank", "steps", "batch_size", "calib_batches"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    start = time.perf_counter()
    model, tokenizer = zoo.load_smollm2()
    n_layers = min(args.layers, model.config.num_hidden_layers)
    targets = [f"model.layers.{i}.self_attn.{proj}" for i in range(n_layers)
               for proj in PROJECTIONS]
    train_text, heldout_text = zoo.hamlet()
    train = zoo.causal_lm_loader(tokenizer, train_text, args.seq_len, args.batch_size,
                                 shuffle=True, seed=args.seed, drop_last=True)
    heldout = list(zoo.causal_lm_loader(tokenizer, heldout_text, args.seq_len,
                                        args.batch_size))[:4]
    probe = heldout[0]
    reference = logits_of(model, probe)  # the plain pretrained model
    loss_base = heldout_loss(model, heldout)
    print(f"SmolLM2-135M loaded in {time.perf_counter() - start:.1f} s; LoRA r={args.rank} on "
          f"{len(targets)} projections of {n_layers} layers; held-out loss {loss_base:.4f}")

    # 1. LoRA + calibration + residual initialization
    covinit.add_lora(model, targets, rank=args.rank, alpha=2 * args.rank)
    calib = zoo.causal_lm_loader(tokenizer, train_text, args.seq_len, args.batch_size)
    needs = tuple(entry.tags.get("needs", ()))
    start = time.perf_counter()
    if needs:
        covinit.calibrate(model, calib, strategy=args.strategy, estimator=args.estimator,
                          sides=needs, max_batches=args.calib_batches, seed=args.seed)
    else:  # pissa: the weights alone
        covinit.initialize(model, strategy=args.strategy, seed=args.seed)
    init_s = time.perf_counter() - start
    step0 = logits_of(model, probe)
    rel = ((step0 - reference).norm() / reference.norm()).item()
    print(f"{args.strategy}: calibrated and initialized in {init_s:.1f} s; step-0 logits "
          f"relative change {rel:.1e} (residual base + adapter = original model)")

    # 2. train
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad],
                                  lr=args.lr)
    model.train()
    start, step = time.perf_counter(), 0
    while step < args.steps:
        for batch in train:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == args.steps:
                break
    loss_trained = heldout_loss(model, heldout)
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s; held-out loss "
          f"{loss_base:.4f} -> {loss_trained:.4f}")
    trained = logits_of(model, probe)

    # 3. export onto the untouched base
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        covinit.export_lora(model, path)
        size = os.path.getsize(path)
        fresh, _ = zoo.load_smollm2()  # original weights, nothing residual
        covinit.load_lora(fresh, path)
    exported = logits_of(fresh, probe)
    ranks = {a.rank for a in covinit.find_adapters(fresh).values()}
    diff = (exported - trained).abs().max().item()
    rel = ((exported - trained).norm() / trained.norm()).item()
    print(f"export_lora: {size / 1e6:.1f} MB, rank {sorted(ranks)} (r + r folded step-0 "
          f"part) on the untouched base; logits vs the trained model: max |Δ| {diff:.2e}, "
          f"relative {rel:.1e}")
    return 0 if rel < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
