"""Which init should ``covinit.calibrate`` use by default?  One written-down rule, applied to
the finished ``compare_inits.py`` runs of every real task (validation only; test never
enters the choice).

Per task and method, at the method's chosen rate: the *paired* difference of final
validation loss against Kaiming over the seeds both ran (a seed fixes data order and random
draws), relative to Kaiming's mean loss.  A method **wins** a task when
``mean + std < 0`` of those differences (better by more than the seed-to-seed spread) and
**loses** it when ``mean − std > 0``.

The default is the covariance-informed covinit strategy that ran on every task, loses none,
and wins the most (ties: lowest mean relative difference).  If none wins a task, ``kaiming``
stays the default: a data pass and a retuned learning rate are not worth a gain the seeds
cannot tell from noise.

The table also shows each method's final validation loss at *Kaiming's* chosen rate (sweep
seed), relative to Kaiming — what a user who switches init but keeps a Kaiming-tuned rate gets.

Usage::

    python benchmarks/choose_default.py                 # minilm-rt and smollm2-hamlet
    python benchmarks/choose_default.py --tasks minilm-rt --out /tmp/default.md
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_inits
from _common import command_line, mean_std, read_rows

REAL_TASKS = ("minilm-rt", "smollm2-hamlet")
REFERENCE = "kaiming"


def task_stats(task_name: str, results: Path) -> dict[str, dict[str, Any]]:
    """``compare_inits.summarize`` over ``results/<task>/runs.csv`` with the task's full
    settings (the rows of other configurations are ignored)."""
    task = compare_inits.get_task(task_name)
    s = dict(task.full)
    cfg = compare_inits.config_id(task_name, s)
    rows = [r for r in read_rows(results / task_name / "runs.csv") if r["config"] == cfg]
    methods = compare_inits.choose_methods(s["strategies"])
    stats = compare_inits.summarize(rows, methods, s, [s["seeds"][0]])
    return {k: v for k, v in stats.items() if "rows" in v}


def verdicts(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: relative paired Δ (mean, std, n), win/lose, and the loss at Kaiming's rate."""
    ref = stats[REFERENCE]
    ref_mean = mean_std(ref["final_val"])[0]
    ref_at = mean_std(ref.get("at_ref_lr", []))[0]
    out = {}
    for label, st in stats.items():
        delta = [d / ref_mean for d in compare_inits.paired_delta(st, ref, "final_val")]
        mu, sd = mean_std(delta) if label != REFERENCE else (0.0, 0.0)
        at = mean_std(st.get("at_ref_lr", []))[0]
        out[label] = {"rel": mu, "sd": sd, "n": len(delta),
                      "win": label != REFERENCE and len(delta) > 1 and mu + sd < 0,
                      "lose": label != REFERENCE and len(delta) > 1 and mu - sd > 0,
                      "at_ref": at / ref_at - 1 if math.isfinite(at) else math.nan,
                      "data": st["method"].needs_calibration,
                      "family": st["method"].family}
    return out


def choose(per_task: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
    """The default and the sentence that explains it."""
    tasks = list(per_task)
    common = set.intersection(*(set(v) for v in per_task.values()))
    candidates = []
    for label in sorted(common):
        rows = [per_task[t][label] for t in tasks]
        if rows[0]["family"] != "covinit" or not rows[0]["data"] or any(r["lose"] for r in rows):
            continue
        wins = sum(r["win"] for r in rows)
        candidates.append((-wins, sum(r["rel"] for r in rows) / len(rows), label, wins))
    winners = [c for c in sorted(candidates) if c[3] > 0]
    if winners:
        _, rel, label, wins = winners[0]
        return label, (f"`{label}` wins {wins} of {len(tasks)} task(s) beyond the seed spread, "
                       f"loses none, mean relative Δ {100 * rel:+.2f} %")
    best = sorted(candidates)[0] if candidates else None
    why = ("no covariance-informed covinit strategy beats Kaiming by more than the "
           "seed-to-seed spread on any task")
    if best:
        why += (f" (closest on average: `{best[2]}`, mean relative Δ {100 * best[1]:+.2f} %, "
                "within noise)")
    return REFERENCE, why + "; `kaiming` stays the default"


def report(per_task: dict[str, dict[str, dict[str, Any]]], default: str, why: str,
           argv: Sequence[str]) -> str:
    tasks = list(per_task)
    labels = sorted(set().union(*per_task.values()),
                    key=lambda m: sum(per_task[t].get(m, {}).get("rel", math.inf)
                                      for t in tasks))
    head = ("| method | " + " | ".join(f"{t}: Δ val vs Kaiming (paired, rel.) | {t}: at "
                                       "Kaiming's lr" for t in tasks) + " |")
    lines = ["# Default strategy of `covinit.calibrate`", "",
             f"- Command: `{command_line(['benchmarks/choose_default.py', *argv])}`",
             f"- Written {time.strftime('%Y-%m-%d %H:%M:%S')} from "
             + ", ".join(f"`benchmarks/results/{t}/runs.csv`" for t in tasks),
             "- Rule (validation only): a method wins a task when mean + std of its paired "
             "relative Δ final validation loss vs Kaiming is < 0, loses it when mean − std "
             "> 0; the default is the covariance-informed covinit strategy that loses no "
             "task and wins the most; with no winner, `kaiming`.", "",
             f"**Default: `{default}`** — {why}.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for label in labels:
        cells = []
        for t in tasks:
            v = per_task[t].get(label)
            if v is None:
                cells += ["–", "–"]
                continue
            mark = " **win**" if v["win"] else " *lose*" if v["lose"] else ""
            delta = ("ref." if label == REFERENCE else
                     f"{100 * v['rel']:+.2f} ± {100 * v['sd']:.2f} % ({v['n']}){mark}")
            at = "–" if not math.isfinite(v["at_ref"]) else f"{100 * v['at_ref']:+.1f} %"
            cells += [delta, at]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default=",".join(REAL_TASKS), help="comma-separated tasks")
    p.add_argument("--results", default=str(compare_inits.RESULTS),
                   help="folder holding <task>/runs.csv")
    p.add_argument("--out", default=None, help="Markdown output (default: "
                   "<results>/default_strategy.md)")
    args = p.parse_args(argv)
    results = Path(args.results)
    per_task = {}
    for t in (t.strip() for t in args.tasks.split(",") if t.strip()):
        stats = task_stats(t, results)
        if REFERENCE not in stats:
            p.error(f"task {t!r} has no finished {REFERENCE!r} runs in {results / t}")
        per_task[t] = verdicts(stats)
    default, why = choose(per_task)
    text = report(per_task, default, why, sys.argv[1:] if argv is None else argv)
    out = Path(args.out) if args.out else results / "default_strategy.md"
    out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
