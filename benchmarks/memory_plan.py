"""Memory budget (issue 16): the pass plan of a Llama-2-7B-shaped model, and a scaled analogue.

1. The plan: a Llama-2-7B config (hidden 4096, intermediate 11008, 32 layers, all 7
   projections) built on torch's meta device (no weights, no data) and planned with
   :func:`covinit.budget.plan_calibration` at 8 GB and 24 GB: input side only, inputs and
   outputs, and inputs and outputs with the 11008-wide sides sketched (ℓ = 256).
2. The scaled analogue: a random Llama (hidden 512, intermediate 1376, 8 layers, the same 7
   projections) calibrated end to end (inputs and outputs, float64) in one pass and under a
   budget of a quarter of the planned statistics (≥ 3 passes); every summary is compared
   bitwise, and wall time and peak resident memory are measured, each run in a fresh process.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/memory_plan.py [--quick]

Writes ``benchmarks/results/memory/{plan_7b,scaled}.csv`` and ``memory.md`` (``*_quick`` with
``--quick``).  The cores are shared: the load average is recorded with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import transformers
from _common import command_line, load_average, machine, write_rows
from calibration_speed import PeakRSS

from covinit import Calibration, calibrate
from covinit.budget import plan_calibration

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUT = Path(__file__).resolve().parent / "results" / "memory"
PLAN_FIELDS = ["sides", "sketch_above", "budget_gb", "passes", "total_gb", "largest_pass_gb",
               "sketched_sides"]
SCALED_FIELDS = ["mode", "budget_mb", "passes", "seconds", "peak_rss_mib", "bitwise_equal"]


def plan_7b() -> list[dict[str, object]]:
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    rows = []
    for sides, sketch in ((("input",), None), (("input", "output"), None),
                          (("input", "output"), 11008)):
        for budget in ("8GB", "24GB"):
            plan = plan_calibration(model, TARGETS, sides, max_memory=budget,
                                    sketch_above=sketch)
            rows.append({"sides": "+".join(sides), "sketch_above": sketch or "",
                         "budget_gb": budget[:-2], "passes": plan.passes,
                         "total_gb": f"{plan.total_bytes / 1e9:.1f}",
                         "largest_pass_gb": f"{max(g.bytes for g in plan.groups) / 1e9:.2f}",
                         "sketched_sides": len(plan.sketched)})
            print(plan.describe().splitlines()[0], f"[{'+'.join(sides)}, sketch={sketch}]")
    return rows


def scaled_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=8, num_attention_heads=8,
                                      num_key_value_heads=8, vocab_size=1000)
    return transformers.LlamaForCausalLM(config).eval()


def scaled_batches(n: int, length: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 1000, (4, length), generator=gen),
             "attention_mask": torch.ones(4, length, dtype=torch.long)} for _ in range(n)]


def child(budget: int | None, batches: int, length: int, out: str) -> None:
    """One calibration in this (fresh) process; prints its seconds and peak RSS as JSON."""
    model, data = scaled_model(), scaled_batches(batches, length)
    start = time.perf_counter()
    with PeakRSS() as rss:
        cal = calibrate(model, data, targets=TARGETS, show_progress=False, max_memory=budget)
    seconds = time.perf_counter() - start
    cal.save(out)
    passes = cal.info.get("memory_plan", {}).get("passes", 1)
    print(json.dumps({"seconds": seconds, "peak_rss_mib": rss.mib, "passes": passes}))


def bitwise_equal(a: Calibration, b: Calibration) -> bool:
    if a.layer_names != b.layer_names or a.shared_inputs != b.shared_inputs:
        return False
    for layer in a.layer_names:
        for side in ("input", "output"):
            sa, sb = a.moments(layer, side).state(), b.moments(layer, side).state()
            if not all(torch.equal(v, sb[k]) for k, v in sa.items()):
                return False
    return True


def scaled(batches: int, length: int) -> list[dict[str, object]]:
    total = plan_calibration(scaled_model(), TARGETS, max_memory=None).total_bytes
    rows, cals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, budget in (("one pass", None), ("budget = total/4", total // 4)):
            path = f"{tmp}/{len(cals)}.safetensors"
            cmd = [sys.executable, __file__, "--child", str(budget or 0), "--batches",
                   str(batches), "--length", str(length), "--out", path]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                               text=True).stdout.strip().splitlines()[-1])
            cals.append(Calibration.load(path))
            rows.append({"mode": mode, "budget_mb": f"{budget / 1e6:.0f}" if budget else "",
                         "passes": result["passes"], "seconds": f"{result['seconds']:.1f}",
                         "peak_rss_mib": f"{result['peak_rss_mib']:.0f}"})
            print(rows[-1])
    same = bitwise_equal(*cals)
    for row in rows:
        row["bitwise_equal"] = same
    return rows, total


def write_md(plan: list[dict[str, object]], rows: list[dict[str, object]], total: int,
             args: argparse.Namespace, suffix: str) -> None:
    lines = ["# Memory budget: pass plans and a scaled analogue (issue 16)", "",
             f"Command: `{command_line()}`  ", f"Machine: {machine()}  ",
             f"Load average at the end: {load_average()} (shared cores: timings are rough)", "",
             "## Llama-2-7B shape on the meta device (plan only, no weights, no data)", "",
             "Counted per stream while collecting: accumulator + a batch's temporary "
             "(2·8·w² bytes; the gradient side would add its d×k G), sketches 3·8·w·ℓ.", "",
             "| " + " | ".join(PLAN_FIELDS) + " |", "|" + "---|" * len(PLAN_FIELDS)]
    lines += ["| " + " | ".join(str(r[f]) for f in PLAN_FIELDS) + " |" for r in plan]
    lines += ["", f"## Scaled analogue: random Llama, hidden 512, 8 layers, {args.batches} "
              f"batches × 4 × {args.length} tokens, inputs + outputs, float64", "",
              f"Planned statistics of one pass: {total / 1e6:.0f} MB.", "",
              "| " + " | ".join(SCALED_FIELDS) + " |", "|" + "---|" * len(SCALED_FIELDS)]
    lines += ["| " + " | ".join(str(r[f]) for f in SCALED_FIELDS) + " |" for r in rows]
    lines += ["", "Peak RSS is what the calibration added to the process.  Finished passes "
              "move their statistics to CPU memory, so on a CPU-only run the returned "
              "Calibration holds all statistics in the end; the budget bounds the device "
              "(e.g. GPU) memory used while collecting.", ""]
    (OUT / f"memory{suffix}.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = args.batches or (2 if args.quick else 6)
    if args.child is not None:
        child(args.child or None, args.batches, args.length, args.out)
        return
    suffix = "_quick" if args.quick else ""
    plan = plan_7b()
    rows, total = scaled(args.batches, args.length)
    write_rows(OUT / f"plan_7b{suffix}.csv", plan, PLAN_FIELDS)
    write_rows(OUT / f"scaled{suffix}.csv", rows, SCALED_FIELDS)
    write_md(plan, rows, total, args, suffix)


if __name__ == "__main__":
    main()
