"""covinit as a PEFT plug-in, trained with ``transformers.Trainer``.

1. ``peft.get_peft_model(minilm, LoraConfig(...))`` — an ordinary PEFT LoRA model;
2. ``covinit.calibrate(peft_model, loader, strategy=...)`` — one pass of the frozen model over
   task data; the PEFT layers' ``lora_A`` / ``lora_B`` are overwritten in place (the
   parameter objects stay the same);
3. ``transformers.Trainer(...).train()`` — the Trainer builds its optimizer inside
   ``train()``, i.e. after calibration: a ``create_optimizer`` hook below prints that moment
   and checks the adapters still hold the calibrated values;
4. ``save_pretrained`` and ``PeftModel.from_pretrained`` onto a fresh base; the reloaded
   model's logits are compared with the trained one's.  Residual strategies (``pissa``,
   ``cov-svd``, ...) also change the base weights, which ``save_pretrained`` does not save:
   for them the adapter is written with ``covinit.export_lora(model, dir, format="peft")``,
   which folds the residual into the adapter so it applies to the untouched base.

About a minute on 2 CPU cores::

    python examples/peft_trainer.py
    python examples/peft_trainer.py --strategy cov-svd
    python examples/peft_trainer.py --max-steps 2 --n-train 32 --n-calib 16   # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# zoo (the demo models and data) lives beside the benchmarks, not in the covinit package:
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import torch
import zoo
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import covinit

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--strategy", default="input-pca", help="a name from covinit.strategies()")
p.add_argument("--estimator", default="ledoit_wolf")
p.add_argument("--rank", type=int, default=8)
p.add_argument("--max-steps", type=int, default=40)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--max-length", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--n-train", type=int, default=640)
p.add_argument("--n-val", type=int, default=128)
p.add_argument("--n-calib", type=int, default=128)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=2)


class CalibratedTrainer(Trainer):
    """A Trainer that shows when its optimizer is built, and with which LoRA values."""

    def __init__(self, *args, calibrated: dict[str, torch.Tensor], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calibrated = calibrated  # lora_A per layer right after covinit.calibrate

    def create_optimizer(self, *args, **kwargs):
        adapters = covinit.find_adapters(self.model)
        same = all(torch.equal(adapters[name].get_lora()[0], a)
                   for name, a in self.calibrated.items())
        print(f"[Trainer] building the optimizer over {len(adapters)} PEFT LoRA layers; "
              f"lora_A still holds the calibrated values: {same}")
        return super().create_optimizer(*args, **kwargs)


@torch.no_grad()
def logits_and_accuracy(model, loader) -> tuple[torch.Tensor, float]:
    model.eval()
    outs, correct, count = [], 0, 0
    for batch in loader:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        outs.append(logits)
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        count += batch["labels"].shape[0]
    return torch.cat(outs), correct / count


def main(argv: list[str] | None = None) -> int:
    args = p.parse_args(argv)
    if args.strategy not in covinit.strategies():
        p.error(f"unknown strategy {args.strategy!r}; choose from "
                f"{', '.join(covinit.strategies())}")
    for key in ("rank", "max_steps", "batch_size", "n_train", "n_val", "n_calib"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    data = zoo.rotten_tomatoes(seed=args.seed, n_train=args.n_train, n_val=args.n_val)

    def fresh_base():
        torch.manual_seed(args.seed)  # the random classifier head
        return zoo.load_minilm(num_labels=2)

    base, tokenizer = fresh_base()
    config = LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank,
                        target_modules=["query", "key", "value", "attention.output.dense"])
    model = get_peft_model(base, config)  # SEQ_CLS: the classifier head trains and is saved

    # 1. calibrate + initialize, before any optimizer exists
    calib = zoo.text_classification_loader(tokenizer, data["train"][:args.n_calib],
                                           args.batch_size, args.max_length)
    cal = covinit.calibrate(model, calib, strategy=args.strategy, estimator=args.estimator,
                            seed=args.seed)
    print(f"calibrated {len(cal.layer_names)} PEFT layers on {cal.info['positions']} token "
          f"positions in {cal.info['seconds']:.1f} s; strategy {args.strategy!r}")
    calibrated = {name: a.get_lora()[0] for name, a in covinit.find_adapters(model).items()}

    # 2. a plain Trainer run (its optimizer is built inside train())
    def collate(items):
        enc = tokenizer([t for t, _ in items], padding="longest", truncation=True,
                        max_length=args.max_length, return_tensors="pt")
        return {**enc, "labels": torch.tensor([label for _, label in items])}

    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=os.path.join(tmp, "trainer"), use_cpu=True, report_to="none",
            max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10,
            save_strategy="no", remove_unused_columns=False, seed=args.seed,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = CalibratedTrainer(model=model, args=training, train_dataset=data["train"],
                                    data_collator=collate, calibrated=calibrated)
        result = trainer.train()
        print(f"trained {result.global_step} steps, mean training loss "
              f"{result.training_loss:.4f}")

        val = zoo.text_classification_loader(tokenizer, data["validation"], 64,
                                             args.max_length)
        logits, acc = logits_and_accuracy(model, val)

        # 3. save and reload onto a fresh, untouched base
        out = os.path.join(tmp, "adapter")
        residual = any(getattr(a, "base_replaced", False)
                       for a in covinit.find_adapters(model).values())
        if residual:
            covinit.export_lora(model, out, format="peft")
            how = "covinit.export_lora(format='peft') (residual strategy: folded)"
        else:
            model.save_pretrained(out)
            how = "save_pretrained"
        reloaded = PeftModel.from_pretrained(fresh_base()[0], out)
        logits2, acc2 = logits_and_accuracy(reloaded, val)
    diff = (logits - logits2).abs().max().item()
    print(f"validation accuracy {acc:.3f}; reloaded via {how}: accuracy {acc2:.3f}, "
          f"max |Δlogit| = {diff:.2e}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
