"""Which init should ``covinit.calibrate`` use by default?  One written-down rule, applied to
every finished ``compare_inits.py`` configuration (task × regime) under
``benchmarks/results/*/runs.csv`` (validation only; test never enters the choice).

Per configuration and method, the *paired* differences of final validation loss against
Kaiming over the seeds both ran (a seed fixes data order, head and random draws), with a 95%
paired-t interval (``compare_inits.paired_interval``), twice: at **Kaiming's chosen rate**
(the drop-in question: a user keeps the rate their recipe was tuned with) and at the
method's **own** chosen rate.

- A method **wins** a configuration when the interval at Kaiming's rate lies below 0.
- It **loses** one when either interval lies above 0.

The default is the covariance-informed covinit strategy that ran on every configuration,
loses none, and wins the most (ties: lowest mean relative Δ at Kaiming's rate).  With no
winner, ``kaiming`` stays the default: a data pass is not worth a gain the seeds cannot tell
from noise.

Beside the choice it writes the evidence as one long table (Markdown, and the same numbers
as CSV next to it): per configuration and method, the paired Δ of final validation loss and
of the validation-curve area at Kaiming's rate and at the method's own, with the own rate
and how many rates its sweep ran ("not swept": it ran at Kaiming's rate only).

Usage::

    python benchmarks/choose_default.py                       # every results folder
    python benchmarks/choose_default.py --only minilm-rt-base --out /tmp/default.md
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_inits
from _common import command_line, read_rows

REFERENCE = "kaiming"


def _quantized(regime: str) -> bool:
    """A quantized-base regime (``nf4``, ...): its methods start from another model, so it
    says nothing about the default for a full-precision base."""
    return "quantize" in compare_inits.REGIMES.get(regime, {})


def _interval_era(csv_path: Path) -> list[dict[str, Any]]:
    """The rows of a runs.csv written by the interval-era ``compare_inits`` (a ``regime``
    column; the earlier protocol's folders have none)."""
    return [r for r in read_rows(csv_path) if r.get("regime")]


def folder_stats(csv_path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"task/regime": compare_inits.summarize(...)}`` for each configuration in a runs.csv
    written by the interval-era ``compare_inits``, quantized regimes left out."""
    rows = [r for r in _interval_era(csv_path) if not _quantized(r["regime"])]
    out = {}
    for cfg in sorted({r["config"] for r in rows}):
        mine = [r for r in rows if r["config"] == cfg]
        ref_rates: dict[int, set[float]] = {}
        for r in mine:
            if r["method"] == REFERENCE:
                ref_rates.setdefault(int(r["seed"]), set()).add(float(r["lr"]))
        sweep = _sweep_seeds(ref_rates)
        if not sweep:
            continue
        labels = list(dict.fromkeys(r["method"] for r in mine))
        methods = [compare_inits.parse_method(label) for label in labels]
        stats = compare_inits.summarize(mine, methods, {"steps": int(mine[0]["steps"])}, sweep)
        out[f"{mine[0]['task']}/{mine[0]['regime']}"] = {
            k: {**v, "sweep_seeds": sweep, "picks": _picks(mine, sweep, k)}
            for k, v in stats.items() if "rows" in v}
    return out


def budget(rows: Sequence[dict[str, Any]]) -> tuple[int, float]:
    """``(runs, hours)``: the training runs and their training time (``train_s``) in
    ``rows``.  A diverged run counts too (it spent its time); a row without a time does not."""
    seconds = [t for t in (compare_inits._float(r, "train_s") for r in rows) if math.isfinite(t)]
    return len(seconds), sum(seconds) / 3600


def _sweep_seeds(ref_rates: dict[int, set[float]]) -> list[int]:
    """The seeds Kaiming's rate grid was swept on, from the rates each seed ran.

    A sweep seed ran a grid: at least ``MIN_SWEPT_RATES`` rates, or as many as any seed did
    where the grid is smaller. Seeds that ran Kaiming at one extra rate beside its chosen
    one (a check at a rate another method chose) are not sweep seeds: counting them would
    leave only the rates those checks ran "complete" and move every method's own rate.
    """
    top = max((len(rates) for rates in ref_rates.values()), default=0)
    return sorted(seed for seed, rates in ref_rates.items()
                  if len(rates) > 1 and (len(rates) >= compare_inits.MIN_SWEPT_RATES
                                         or len(rates) == top))


def verdicts(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: relative paired Δ intervals at Kaiming's rate and at its own, win/lose."""
    ref = stats[REFERENCE]
    norm = sum(ref["at_ref"]["final_val"]) / max(1, len(ref["at_ref"]["final_val"]))
    out = {}
    for label, st in stats.items():
        # per-seed Δ in the task's own units, of final loss and curve area, at both rates
        deltas = {f"{key}_{where}": compare_inits.paired_delta(mine, theirs, key)
                  for key in ("final_val", "auc")
                  for where, mine, theirs in (("at", st["at_ref"], ref["at_ref"]),
                                              ("own", st, ref))}
        # The sweep seeds chose the rates the own-rate Δ compares; without them it is unbiased.
        sweep = st.get("sweep_seeds")
        past = [seed for seed in st.get("seeds", []) if sweep is None or seed not in sweep]
        deltas["final_val_held"] = ([] if sweep is None else
                                    compare_inits.paired_delta(st, ref, "final_val", sweep))
        deltas["final_val_sweep"] = ([] if sweep is None else
                                     compare_inits.paired_delta(st, ref, "final_val", past))
        at = [d / norm for d in deltas["final_val_at"]]
        own = [d / norm for d in deltas["final_val_own"]]
        ci_at, ci_own = compare_inits.paired_interval(at), compare_inits.paired_interval(own)
        is_ref = label == REFERENCE
        out[label] = {"at": ci_at, "own": ci_own, "n_at": len(at), "n_own": len(own),
                      "rel": ci_at[0] if not is_ref else 0.0,
                      "win": not is_ref and ci_at[2] < 0,
                      "lose": not is_ref and (ci_at[1] > 0 or ci_own[1] > 0),
                      "data": st["method"].needs_calibration,
                      "family": st["method"].family,
                      "lr": st["lr"], "ref_lr": ref["lr"], "rates": st.get("rates", 0),
                      "picks": st.get("picks", []), **deltas}
    return out


def _picks(rows: list[dict[str, Any]], sweep: Sequence[int], label: str) -> list[float]:
    """Each sweep seed's own best rate on the method's swept grid ([] when not swept)."""
    lrs = sorted(compare_inits.losses_by_lr(rows, sweep, label, complete=True))
    if len(lrs) < compare_inits.MIN_SWEPT_RATES:
        return []
    return compare_inits.seed_picks(rows, sweep, label, lrs)


def rate_choice(per_task: dict[str, dict[str, dict[str, Any]]]) -> str:
    """How firm the own rates are, over every swept (configuration, method) but Kaiming:
    how often every sweep seed alone picks the same rate, and how much lower the own-rate
    Δ is on the sweep seeds than on the seeds past them (mean ± standard error over the
    pairs with both) — the flattery of choosing a rate on the seeds that then judge it."""
    swept = [v for methods in per_task.values() for label, v in methods.items()
             if label != REFERENCE and len(v.get("picks", [])) > 1]
    if not swept:
        return ""
    agree = sum(len(set(v["picks"])) == 1 for v in swept)
    near = sum(max(v["picks"]) / min(v["picks"]) <= 2 * (1 + 1e-9) for v in swept)
    gaps = [statistics.fmean(v["final_val_sweep"]) - statistics.fmean(v["final_val_held"])
            for v in swept if v.get("final_val_sweep") and v.get("final_val_held")]
    text = (f"Rate choice: in {agree} of {len(swept)} own-rate sweeps every sweep seed alone "
            f"picks the same rate ({near} within one ×2 step)")
    if len(gaps) > 1:
        se = statistics.stdev(gaps) / math.sqrt(len(gaps))
        text += (f"; own-rate Δ final on the sweep seeds minus on the seeds past them: "
                 f"{statistics.fmean(gaps):+.4f} ± {se:.4f} (mean ± s.e. over {len(gaps)}; "
                 "below 0: choosing the rates on the seeds that judge them flatters the method)")
    return text


def choose(per_task: dict[str, dict[str, dict[str, Any]]]) -> tuple[str, str]:
    """The default and the sentence that explains it."""
    tasks = list(per_task)
    candidates, unmeasured = [], []
    for label in sorted(set().union(*per_task.values())):
        rows = [per_task[t][label] for t in tasks if label in per_task[t]]
        if rows[0]["family"] != "covinit" or not rows[0]["data"] or any(r["lose"] for r in rows):
            continue
        # "Ran everywhere": an interval at Kaiming's rate (≥ 2 paired seeds) on every
        # configuration; rows at other rates alone (a configuration still running) or a
        # configuration it never ran on do not count.
        if len(rows) < len(tasks) or any(r["n_at"] < 2 for r in rows):
            unmeasured.append(label)
            continue
        wins = sum(r["win"] for r in rows)
        candidates.append((-wins, sum(r["rel"] for r in rows) / len(rows), label, wins))
    winners = [c for c in sorted(candidates) if c[3] > 0]
    if winners:
        _, rel, label, wins = winners[0]
        return label, (f"`{label}` wins {wins} of {len(tasks)} configuration(s) (95% interval "
                       f"at Kaiming's rate below 0), loses none, mean relative Δ "
                       f"{100 * rel:+.2f} %")
    best = sorted(candidates)[0] if candidates else None
    why = ("no covariance-informed covinit strategy's 95% interval at Kaiming's rate lies "
           "below 0 on any configuration without losing one")
    if best:
        why += (f" (closest on average: `{best[2]}`, mean relative Δ {100 * best[1]:+.2f} %, "
                "within noise)")
    if unmeasured:
        why += (f"; {len(unmeasured)} strateg{'y' if len(unmeasured) == 1 else 'ies'} not yet "
                "run at Kaiming's rate on ≥ 2 seeds of every configuration: "
                + ", ".join(f"`{x}`" for x in unmeasured))
    return REFERENCE, why + "; `kaiming` stays the default"


def plot(per_task: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """One panel per configuration: each method's relative Δ final validation loss against
    Kaiming with its 95% interval, at Kaiming's rate (filled) and at its own (open)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(per_task)
    labels = sorted({m for v in per_task.values() for m in v if m != REFERENCE})
    cols = min(4, len(tasks))  # rows of four panels: eight configurations in one row
    rows = math.ceil(len(tasks) / cols)  # made a figure too wide to read
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, rows * (0.42 * len(labels) + 1.4)),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for y, label in enumerate(labels):
            v = per_task[task].get(label)
            if v is None:
                continue
            for key, dy, style in (("at", -0.15, "o"), ("own", 0.15, "s")):
                mean, lo, hi = (100 * x for x in v[key])
                if not math.isfinite(mean):
                    continue
                color = ("tab:green" if hi < 0 else "tab:red" if lo > 0 else "tab:gray"
                         ) if math.isfinite(lo) else "tab:gray"
                if math.isfinite(lo):
                    ax.plot([lo, hi], [y + dy] * 2, color=color, linewidth=1.5)
                ax.plot(mean, y + dy, style, color=color,
                        markerfacecolor=color if key == "at" else "white")
        ax.axvline(0, color="k", linewidth=0.8)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("Δ final val vs Kaiming (%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for row in axes:
        row[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0][0].invert_yaxis()  # shared: every panel lists the methods top-down
    fig.suptitle("Paired Δ with 95% interval: ● at Kaiming's rate, □ at the method's own "
                 "(green: below 0, red: above 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(ci: tuple[float, float, float], n: int) -> str:
    if not math.isfinite(ci[0]):
        return "–"
    if not math.isfinite(ci[1]):
        return f"{100 * ci[0]:+.2f} % ({n})"
    return f"{100 * ci[0]:+.2f} % [{100 * ci[1]:+.2f}, {100 * ci[2]:+.2f}] ({n})"


#: The quantities of the long table, each a paired Δ against Kaiming: final validation loss
#: and curve area, at Kaiming's rate and at the method's own, and the final loss at the own
#: rate on the seeds that did not choose the rates (``held``).
EVIDENCE = ("final_val_at", "auc_at", "final_val_own", "auc_own", "final_val_held")


def _ordered(per_task: dict[str, dict[str, dict[str, Any]]]
             ) -> list[tuple[str, str, dict[str, Any]]]:
    """``(configuration, method, verdict)``: Kaiming first, then by mean relative Δ."""
    return [(task, label, methods[label]) for task, methods in per_task.items()
            for label in sorted(methods, key=lambda m: (m != REFERENCE, methods[m]["rel"]))]


def _rate(v: dict[str, Any]) -> str:
    """The method's own rate and how it was found (a sweep, or only Kaiming's rate run)."""
    rates = v.get("rates", 0)
    swept = rates >= compare_inits.MIN_SWEPT_RATES
    return f"{v.get('lr', math.nan):g} ({f'{rates} rates' if swept else 'not swept'})"


def _verdict_word(v: dict[str, Any]) -> str:
    return "win" if v["win"] else "lose" if v["lose"] else ""


def report(per_task: dict[str, dict[str, dict[str, Any]]], default: str, why: str,
           argv: Sequence[str], facts: Sequence[str] = ()) -> str:
    tasks = list(per_task)
    head = ("| configuration | method | own lr* | Δ final val at Kaiming's lr | Δ AUC at "
            "Kaiming's lr | Δ final val at own lr | Δ AUC at own lr | Δ final val at own lr, "
            "seeds past the sweep | relative Δ final at "
            "Kaiming's lr | verdict |")
    lines = ["# Default strategy of `covinit.calibrate`", "",
             f"- Command: `{command_line(['benchmarks/choose_default.py', *argv])}`",
             f"- Written {time.strftime('%Y-%m-%d %H:%M:%S')} from the runs.csv of: "
             + ", ".join(f"`{t}`" for t in tasks),
             "- Rule (validation only): paired Δ final validation loss vs Kaiming, relative to "
             "Kaiming's mean, 95% paired-t interval over seeds. A method wins a configuration "
             "when the interval at Kaiming's rate is below 0, loses it when the interval at "
             "Kaiming's rate or at its own rate is above 0; the default is the "
             "covariance-informed covinit strategy that ran everywhere, loses nothing and wins "
             "the most; with no winner, `kaiming`.",
             "- The table: every configuration and method, Δ = method − Kaiming paired by "
             "seed, mean [95% paired-t interval] (seeds), **bold** when the interval excludes "
             "0; AUC = mean validation loss over training. \"own lr*\" is the method's "
             "chosen rate and the number of rates its sweep ran on every sweep seed (\"not "
             "swept\": it ran at Kaiming's rate only, so both columns are the same runs). The "
             "sweep seeds chose both rates of the own-rate Δ and flatter it by the noise that "
             "picked them; \"seeds past the sweep\" leaves them out (fewer seeds, no such "
             "bias). "
             "Also in the CSV beside this file.", *(f"- {fact}." for fact in facts if fact),
             "",
             f"**Default: `{default}`** — {why}.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    last = None
    for task, label, v in _ordered(per_task):
        shown = f"{task} (Kaiming's lr* {v.get('ref_lr', math.nan):g})" if task != last else ""
        last = task
        if label == REFERENCE:
            cells = ["ref."] * (len(EVIDENCE) + 1) + [""]
        else:
            cells = [compare_inits.fmt_interval(v.get(k, []), 3) for k in EVIDENCE]
            cells += [_cell(v["at"], v["n_at"]), _verdict_word(v)]
        lines.append(f"| {shown} | `{label}` | {_rate(v)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_evidence_csv(per_task: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """The long table as numbers: per configuration and method, both rates, each Δ's mean,
    95% interval and number of paired seeds (``relative_at``: Δ final / Kaiming's mean)."""
    fields = ["configuration", "method", "kaiming_lr", "own_lr", "rates_swept", "verdict"]
    for key in (*EVIDENCE, "relative_at"):
        fields += [f"{key}_mean", f"{key}_low", f"{key}_high", f"{key}_n"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for task, label, v in _ordered(per_task):
            row: dict[str, Any] = {
                "configuration": task, "method": label, "kaiming_lr": v.get("ref_lr"),
                "own_lr": v.get("lr"), "rates_swept": v.get("rates", 0),
                "verdict": _verdict_word(v)}
            for key in EVIDENCE:
                deltas = v.get(key, [])
                row.update(_interval_fields(key, compare_inits.paired_interval(deltas),
                                            len(deltas)))
            row.update(_interval_fields("relative_at", v["at"], v["n_at"]))
            writer.writerow(row)


def _interval_fields(key: str, ci: Sequence[float], n: int) -> dict[str, Any]:
    mean, low, high = (round(x, 6) for x in ci)
    return {f"{key}_mean": mean, f"{key}_low": low, f"{key}_high": high, f"{key}_n": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", default=str(compare_inits.RESULTS),
                   help="folder holding <task>-<regime>/runs.csv")
    p.add_argument("--only", default=None, help="comma-separated result folder names")
    p.add_argument("--out", default=None, help="Markdown output, the figure beside it with "
                   "the suffix .png (default: <results>/default_strategy.md)")
    args = p.parse_args(argv)
    results = Path(args.results)
    only = {x.strip() for x in args.only.split(",")} if args.only else None
    per_task = {}
    every: list[dict[str, Any]] = []
    for csv_path in sorted(results.glob("*/runs.csv")):
        if only is not None and csv_path.parent.name not in only:
            continue
        every += _interval_era(csv_path)
        for key, stats in folder_stats(csv_path).items():
            if REFERENCE in stats:
                per_task[key] = verdicts(stats)
    if not per_task:
        p.error(f"no finished interval-era configuration with {REFERENCE!r} runs in {results}")
    default, why = choose(per_task)
    runs, hours = budget(every)
    q_runs, q_hours = budget([r for r in every if _quantized(r["regime"])])
    spent = (f"{runs:,} training runs, {hours:.1f} h of training time (the sum of `train_s`, "
             f"evaluation not counted) in the runs.csv read, quantized bases included "
             f"({q_runs:,} runs, {q_hours:.1f} h)")
    text = report(per_task, default, why, sys.argv[1:] if argv is None else argv,
                  [f"Budget: {spent}", rate_choice(per_task)])
    out = Path(args.out) if args.out else results / "default_strategy.md"
    out.write_text(text, encoding="utf-8")
    write_evidence_csv(per_task, out.with_suffix(".csv"))
    plot(per_task, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
