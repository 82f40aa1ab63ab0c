"""Step-0 logit change of residual inits in bfloat16 (issue 14, item 5).

A residual init (``pissa``, ``cov-svd``, ...) rewrites a layer as ``base + c·B·A`` with
``base = W0 − c·B·A``; in exact arithmetic the model is unchanged.  In bf16 it is not: the
base and the factors are rounded, and the forward adds two bf16 partial results.  This script
loads SmolLM2-135M in bf16, puts PEFT LoRA (r 8, α 16) on the attention projections, applies
covinit's residual strategies and PEFT's own PiSSA, and prints max |Δ logit| against the same
bf16 model without LoRA, next to the bf16 model's own distance from its fp32 logits.

Run: ``HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python
benchmarks/residual_bf16.py``
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import peft
import torch
import zoo

import covinit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="calibration blocks of 64 tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp32, tok = zoo.load_smollm2(cache_dir=CACHE)
    fp32.eval()
    train, held = zoo.hamlet(heldout_fraction=0.1)
    calib = list(zoo.causal_lm_loader(tok, train, 64, 2))[: args.blocks // 2]
    probe = next(iter(zoo.causal_lm_loader(tok, held, 128, 2)))["input_ids"]
    with torch.no_grad():
        ref32 = fp32(input_ids=probe).logits.float()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    with torch.no_grad():
        ref = bf16(input_ids=probe).logits.float()
    originals = {name: m.weight.detach().double() for name, m in bf16.named_modules()
                 if isinstance(m, torch.nn.Linear)}

    def row(label: str, out: torch.Tensor, against: torch.Tensor, weight: str = "–") -> None:
        diff = out - against
        rel = float(diff.norm() / against.norm())
        top1 = float((out.argmax(-1) == against.argmax(-1)).float().mean())
        print(f"| {label} | {weight} | {diff.abs().max():.3f} | {diff.abs().mean():.4f} | "
              f"{rel:.2e} | {top1:.3f} |")

    print("| step-0 model vs bf16 base | weight error (median over layers) | max abs Δ logit | "
          "mean abs Δ logit | relative RMS | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    row("bf16 base vs fp32 base (bf16's own noise)", ref, ref32)

    def weight_error(model: torch.nn.Module) -> str:
        """‖base + c·B·A − W0‖ / ‖W0‖ of each adapted layer, W0 the bf16 weight."""
        errors = []
        for name, adapter in covinit.find_adapters(model).items():
            a, b = (t.double() for t in adapter.get_lora())
            effective = adapter.base_weight().double() + adapter.scaling * b @ a
            w0 = originals[name]
            errors.append(float((effective - w0).norm() / w0.norm()))
        return f"{torch.tensor(errors).median():.1e}"

    def measure(label: str, model: torch.nn.Module) -> None:
        with torch.no_grad():
            out = model(input_ids=probe).logits.float()
        row(label, out, ref, weight_error(model))

    for strategy in ("pissa", "cov-svd", "two-sided"):
        model = peft.get_peft_model(copy.deepcopy(bf16), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=TARGETS))
        covinit.calibrate(model, calib, strategy=strategy, show_progress=False)
        measure(f"covinit {strategy} (PEFT)", model)
    model = covinit.add_lora(copy.deepcopy(bf16), TARGETS, rank=8, alpha=16)
    covinit.calibrate(model, calib, strategy="cov-svd", show_progress=False)
    measure("covinit cov-svd (own layer)", model)
    model = peft.get_peft_model(copy.deepcopy(bf16), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="pissa"))
    measure("PEFT pissa", model)


if __name__ == "__main__":
    main()
