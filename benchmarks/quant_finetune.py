"""Quantized bases after fine-tuning (issue 17): every quantized configuration in one table
and one figure.

For each quantized regime of ``compare_inits.py`` that has run (``benchmarks/results/
<task>-nf<k>/runs.csv``) and its full-precision reference (``<task>-base``, the same
settings without quantization), per init at QLoRA's tuned rate:

* Δ final validation loss against QLoRA (paired t over seeds, 95 %),
* the share of the QLoRA → full-precision validation-loss gap it restores at step 0 and
  after fine-tuning (95 % Fieller interval of the ratio of paired means),

computed by ``compare_inits``' own functions, so these are the numbers of each regime's
``summary.md``, side by side.  Writes ``benchmarks/results/quant/finetune.{md,csv,png}``.

Usage::

    python benchmarks/quant_finetune.py
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import compare_inits
from _common import command_line, read_rows

RESULTS = Path(__file__).resolve().parent / "results"
#: Legend names (what each method is: compare_inits.QUANT_NAMES).
SHORT = {"quant-svd": "LoftQ, one step (quant-svd)",
         "quant-svd+iterations=5+keep=last": "LoftQ, 5 rounds (quant-svd, iterations=5)",
         "quant-residual@ledoit_wolf": "CLoQ (quant-residual, Ledoit-Wolf)"}

#: ``(task, regime, flags)``: the flags of the command that ran each configuration (see
#: ``benchmarks/results/PLAN.md``); ``--lrs``, ``--seeds`` and ``--sweep-seeds`` choose the
#: rows a summary reads, not the configuration.
CONFIGS: list[tuple[str, str, list[str]]] = [
    ("minilm-rt", "nf4", []),
    ("minilm-rt", "nf3", []),
    ("smollm2-hamlet", "nf4", ["--lrs", "0.0005,0.001,0.002", "--seeds", "0,1,2,3,4",
                               "--sweep-seeds", "1"]),
    ("smollm2-hamlet", "nf3", ["--lrs", "0.001,0.002,0.004", "--seeds", "0,1,2,3,4",
                               "--sweep-seeds", "1"]),
]


def configuration(task: str, regime: str, flags: Sequence[str], out: Path,
                  reference: Path) -> list[dict[str, Any]]:
    """One row per init of the quantized ``task``/``regime`` whose runs are in
    ``out/runs.csv`` (full-precision Kaiming runs in ``reference/runs.csv``).

    Each row: ``task, bits, method, lr, n``; the per-seed values ``deltas`` (method −
    QLoRA, final), ``gaps`` (QLoRA − full precision, final) and the ``(QLoRA − method,
    QLoRA − full precision)`` pairs ``step0_pairs`` / ``final_pairs`` of
    :func:`compare_inits.gap_pairs`; and their triples ``(mean or ratio, low, high)``
    ``delta_final``, ``share_step0``, ``share_final``, ``gap_final``.  Empty when QLoRA or
    the reference has no run.
    """
    args = compare_inits.build_parser().parse_args(
        ["--task", task, "--regime", regime, *flags])
    s = compare_inits.settings_from(args)
    cfg = compare_inits.config_id(task, s)
    rows = [r for r in read_rows(out / "runs.csv") if r["config"] == cfg] \
        if (out / "runs.csv").exists() else []
    methods = compare_inits.choose_methods(s["strategies"])
    stats = compare_inits.summarize(rows, methods, s, compare_inits.sweep_seeds_of(s))
    ref = compare_inits.reference_label(stats)
    fp_rows, _ = compare_inits.full_precision_rows(task, s, reference)
    if ref is None or not fp_rows:
        return []
    q_lr = stats[ref]["lr"]
    gap = compare_inits.gap_pairs(rows, fp_rows, ref, ref, q_lr, "final_val_loss")[1]
    table = []
    for label, st in stats.items():
        if "rows" not in st or label == ref:
            continue
        step0 = compare_inits.gap_pairs(rows, fp_rows, label, ref, None, "step0_val_loss")
        final = compare_inits.gap_pairs(rows, fp_rows, label, ref, q_lr, "final_val_loss")
        deltas = [-x for x in final[0]]
        table.append({
            "task": task, "bits": s["quantize"]["bits"], "method": label, "lr": q_lr,
            "n": len(final[0]), "deltas": deltas, "gaps": gap, "step0_pairs": step0,
            "final_pairs": final,
            "delta_final": compare_inits.paired_interval(deltas),
            "share_step0": compare_inits.ratio_interval(*step0),
            "share_final": compare_inits.ratio_interval(*final),
            "gap_final": compare_inits.paired_interval(gap),
        })
    return table


def write(table: list[dict[str, Any]], out: Path, command: str) -> None:
    """``finetune.csv``, ``finetune.md`` and ``finetune.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ("delta_final", "share_step0", "share_final", "gap_final")
    with (out / "finetune.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["task", "bits", "method", "lr", "n",
                    *[f"{k}_{p}" for k in keys for p in ("value", "low", "high")]])
        for r in table:
            w.writerow([r["task"], r["bits"], r["method"], r["lr"], r["n"],
                        *[f"{v:.6g}" for k in keys for v in r[k]]])
    lines = ["# Quantized bases after fine-tuning", "",
             f"Command: `{command}`. From each quantized regime's `runs.csv` (compare_inits.py) "
             "and its full-precision `base` runs: every init at QLoRA's tuned rate, paired by "
             "seed. Δ = method − QLoRA, final validation loss, 95 % paired t. Share = (QLoRA − "
             "method) / (QLoRA − full precision) of the validation loss, 95 % Fieller interval; "
             "**bold** when the interval excludes 0. Step 0 for MiniLM is a fresh classifier "
             "head's loss and shows little of the encoder's damage "
             "(`benchmarks/quant_init.py` measures that).", "",
             "| task | bits | QLoRA − full precision, final | method | n | Δ final vs QLoRA "
             "| share at step 0 | share after fine-tuning |", "|---|---|---|---|---|---|---|---|"]
    # the regimes' own summary formats (compare_inits), so the numbers read the same there
    fmt_delta = partial(compare_inits.fmt_interval, digits=3)
    for r in table:
        lines.append(f"| {r['task']} | {r['bits']} | {fmt_delta(r['gaps'])} | "
                     f"`{r['method']}` | {r['n']} | {fmt_delta(r['deltas'])} | "
                     f"{compare_inits.fmt_share(*r['step0_pairs'])} | "
                     f"{compare_inits.fmt_share(*r['final_pairs'])} |")
    (out / "finetune.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(table, out / "finetune.png")


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Share of the gap restored after fine-tuning, one panel per task, bars per bit width
    and init, 95 % intervals (an unbounded interval is drawn to the axis edge, hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in table))
    methods = list(dict.fromkeys(r["method"] for r in table))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5.5 * max(1, len(tasks)), 4),
                             squeeze=False, sharey=True)
    lim = (-100.0, 150.0)
    width = 0.8 / max(1, len(methods))
    for ax, task in zip(axes[0], tasks, strict=False):
        mine = [r for r in table if r["task"] == task]
        bits = sorted({r["bits"] for r in mine}, reverse=True)
        for j, m in enumerate(methods):
            for i, b in enumerate(bits):
                row = next((r for r in mine if r["method"] == m and r["bits"] == b), None)
                if row is None:
                    continue
                ratio, lo, hi = (100 * v for v in row["share_final"])
                x = i + (j - (len(methods) - 1) / 2) * width
                unbounded = math.isinf(lo)
                ax.bar(x, ratio, width, color=f"C{j}", hatch="//" if unbounded else None,
                       label=SHORT.get(m, m) if i == 0 else None, alpha=0.85)
                if not math.isnan(lo):
                    low, high = (lim if unbounded else (max(lo, lim[0]), min(hi, lim[1])))
                    ax.plot([x, x], [low, high], color="black", lw=1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(bits)), [f"{b} bits" for b in bits])
        ax.set_ylim(*lim)
        ax.set_title(task)
    axes[0][0].set_ylabel("share of the QLoRA → full-precision gap\nrestored after "
                          "fine-tuning (%)")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Quantized base: final validation loss, init vs QLoRA (95 % Fieller)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="folder of the regime folders")
    p.add_argument("--out", default=str(RESULTS / "quant"))
    args = p.parse_args(argv)
    results = Path(args.results)
    table: list[dict[str, Any]] = []
    for task, regime, flags in CONFIGS:
        reference = results / f"{task}-{compare_inits.reference_regime(regime)}"
        table += configuration(task, regime, flags, results / f"{task}-{regime}", reference)
    command = command_line(["benchmarks/quant_finetune.py",
                            *(sys.argv[1:] if argv is None else argv)])
    write(table, Path(args.out), command)
    print((Path(args.out) / "finetune.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
