"""The co-moment product alone: ways to compute ``YᵀY`` against the calibration's floor.

For rows ``Y`` (n, k) at the widths of the benchmark models (192, 576, 1536: SmolLM2's k/v
outputs, hidden size, MLP width) and calls of 128, 1,024 and 4,096 rows, it times

  * ``fp32_full``   — float32 ``addmm_`` of the whole matrix: the floor's own product,
  * ``f64_full``    — float64 ``YᵀY`` of the whole matrix,
  * ``f64_panels``  — float64 upper triangle as 8 row-panel GEMMs (covinit's path on devices
    other than the CPU, and its CPU path before the BLAS ``?syrk`` one),
  * ``f64_syrk``    — float64 upper triangle with SciPy's BLAS ``dsyrk``
    (:func:`covinit._gram.add_gram`'s path on the CPU with torch on one thread),
  * ``f32_panels`` / ``f32_syrk`` — the same in float32 (``precision="mixed"``),

best of interleaved rounds, milliseconds per call, and the ratio to ``fp32_full``.  Torch and
the BLAS get the same thread count.  Written to ``benchmarks/results/gram_speed.{csv,md}``:

    .venv/bin/python benchmarks/gram_speed.py --threads 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import command_line, load_average, machine, write_rows

from covinit._gram import add_gram, blas_threads, new_upper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIDTHS = (192, 576, 1536)
ROWS = (128, 1024, 4096)


def methods(n: int, k: int) -> dict[str, Callable[[], object]]:
    """The products to time on one (n, k) shape, each writing into its own k×k matrix."""
    gen = torch.Generator().manual_seed(0)
    y64 = torch.randn(n, k, generator=gen, dtype=torch.float64)
    y32 = y64.float()
    full32 = torch.zeros(k, k)
    up64, up32 = new_upper(k), new_upper(k, dtype=torch.float32)
    return {
        "fp32_full": lambda: full32.addmm_(y32.T, y32),
        "f64_full": lambda: torch.mm(y64.T, y64),
        "f64_panels": lambda: add_gram(up64, y64, blas=False),
        "f64_syrk": lambda: add_gram(up64, y64, blas=True),
        "f32_panels": lambda: add_gram(up32, y32, blas=False),
        "f32_syrk": lambda: add_gram(up32, y32, blas=True),
    }


def per_call_ms(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=float, default=2e9,
                        help="flops of float32 products per timing (sets the calls per round)")
    parser.add_argument("--output", default="gram_speed")
    args = parser.parse_args(argv)
    load = load_average()
    table = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        with blas_threads(threads):
            for k in args.widths:
                for n in args.rows:
                    fns = methods(n, k)
                    calls = max(3, int(args.work / (2 * n * k * k)))
                    best = dict.fromkeys(fns, float("inf"))
                    for fn in fns.values():
                        fn()  # warm-up
                    for _ in range(args.rounds):  # interleaved: load bursts hit every method
                        for name, fn in fns.items():
                            best[name] = min(best[name], per_call_ms(fn, calls))
                    floor = best["fp32_full"]
                    for name, ms in best.items():
                        table.append({"threads": threads, "k": k, "n": n, "method": name,
                                      "ms": round(ms, 4), "x_fp32_full": round(ms / floor, 3)})
                    print(f"t{threads} k={k:<5} n={n:<5} " + "  ".join(
                        f"{name} {ms:.3f}" for name, ms in best.items()), flush=True)
    write_rows(RESULTS / f"{args.output}.csv", table, list(table[0]))
    names = list(dict.fromkeys(r["method"] for r in table))  # a group's rows, in order
    lines = ["# The co-moment product: ms per call and × the float32 full GEMM", "",
             f"Command: `{command_line(['benchmarks/gram_speed.py', *(argv or sys.argv[1:])])}`"
             "  ", f"Machine: {machine()}; load average before: {load}, after: "
             f"{load_average()}; best of {args.rounds} interleaved rounds", "",
             "| threads | k | rows | " + " | ".join(names) + " |",
             "|---:|---:|---:|" + "---:|" * len(names)]
    for i in range(0, len(table), len(names)):
        group = table[i:i + len(names)]
        head = group[0]
        lines.append(f"| {head['threads']} | {head['k']} | {head['n']} | " + " | ".join(
            f"{r['ms']:.3f} ({r['x_fp32_full']:.2f}×)" for r in group) + " |")
    with (RESULTS / f"{args.output}.md").open("w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
