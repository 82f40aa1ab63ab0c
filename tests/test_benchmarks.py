"""Smoke tests of the benchmark scripts on the ``tiny`` task (seconds, no real model).

They run ``benchmarks/compare_inits.py`` and ``benchmarks/synthetic.py`` end to end with
quick-like settings and check that the CSV, summary and plot are written, that a second call
resumes instead of re-running, and that every init keeps the model's step-0 loss equal to
the base model's where its contract (``get_strategy(name).tags["preserves"]``, or PEFT's
documented behaviour) says the model is unchanged.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

compare_inits = pytest.importorskip("compare_inits")
choose_default = pytest.importorskip("choose_default")
synthetic = pytest.importorskip("synthetic")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from covinit.inits import get_strategy  # noqa: E402

PRESERVING = ("zero-delta", "function")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _close(a: str, b: str, rel: float = 1e-5) -> bool:
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=1e-6)


def test_compare_inits_tiny_every_method(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    argv = ["--task", "tiny", "--quick", "--strategies", "full", "--steps", "4",
            "--lrs", "0.01,0.03", "--extend-lr-grid", "0", "--out", str(out)]
    assert compare_inits.main(argv) == 0

    rows = _rows(out / "runs.csv")
    methods = compare_inits.full_methods()
    assert {r["method"] for r in rows} == set(methods)
    assert len(rows) == 2 * len(methods)  # every method × both learning rates, one seed
    failed = [(r["method"], r["note"]) for r in rows if r["status"] != "ok"]
    assert not failed
    assert (out / "learning_curves.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "python benchmarks/compare_inits.py --task tiny" in summary
    assert "load average" in summary
    assert (out / "lr_sensitivity.png").stat().st_size > 10_000
    for label in methods:
        assert f"| `{label}` |" in summary

    for r in rows:
        if r["family"] == "covinit":
            assert r["preserves"] == get_strategy(r["strategy"]).tags["preserves"]
        if r["preserves"] in PRESERVING:
            assert _close(r["step0_val_loss"], r["base_val_loss"]), (
                f"{r['method']}: step-0 loss {r['step0_val_loss']} != base "
                f"{r['base_val_loss']}")
        # The curve starts at the recorded step-0 loss and ends at the final one.
        steps = [int(s) for s in r["curve_steps"].strip("[]").split(",")]
        assert steps[0] == 0 and steps[-1] == 4

    # covinit's pissa is PEFT's algorithm: same step-0 model, same training, same numbers
    # (what lets the 'lean' method list run it once).
    for lr in ("0.01", "0.03"):
        ours, theirs = (next(r for r in rows if r["method"] == m and r["lr"] == lr)
                        for m in ("pissa", "peft:pissa"))
        assert _close(ours["final_val_loss"], theirs["final_val_loss"], rel=1e-4)

    # Resume: the same command runs nothing new.
    assert compare_inits.main(argv) == 0
    assert len(_rows(out / "runs.csv")) == len(rows)


def test_compare_inits_extra_seed_runs_at_chosen_lr(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    argv = ["--task", "tiny", "--quick", "--strategies", "kaiming,input-pca@empirical",
            "--steps", "4", "--lrs", "0.001,0.03", "--seeds", "0,1", "--sweep-seeds", "1",
            "--extend-lr-grid", "1", "--phases", "sweep,seeds", "--out", str(out)]
    assert compare_inits.main(argv) == 0
    rows = _rows(out / "runs.csv")
    for method in ("kaiming", "input-pca@empirical"):
        sweep = {float(r["lr"]): float(r["final_val_loss"]) for r in rows
                 if r["method"] == method and r["seed"] == "0"}
        best = min(sweep, key=sweep.__getitem__)
        # With two rates the best is always on an edge, so the grid grew by one step (×30
        # or ÷30) in that direction.
        assert len(sweep) == 3
        extra = (set(sweep) - {0.001, 0.03}).pop()
        assert math.isclose(extra, 0.9) or math.isclose(extra, 0.001 / 30)
        later = [float(r["lr"]) for r in rows if r["method"] == method and r["seed"] == "1"]
        assert later == [best]
    # The own-rate table's held-out column pairs seed 1 only (seed 0 chose the rates).
    summary = (out / "summary.md").read_text(encoding="utf-8")
    own = summary.split("## Which init is best at its own tuned rate?")[1]
    assert "seeds past the sweep" in own.splitlines()[2]
    row = next(line for line in own.splitlines() if line.startswith("| `input-pca@empirical`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    seed1 = {r["method"]: float(r["final_val_loss"]) for r in rows if r["seed"] == "1"}
    assert cells[6] == f"{seed1['input-pca@empirical'] - seed1['kaiming']:+.4f} (1)"


def test_compare_inits_resumes_a_sweep_interrupted_past_its_edge(tmp_path: Path) -> None:
    """A rate past the grid's edge that only one sweep seed reached is finished on resume,
    not taken as tried (which left it one seed short and the chosen rate unchecked)."""
    out = tmp_path / "tiny"
    argv = ["--task", "tiny", "--quick", "--strategies", "kaiming", "--steps", "4",
            "--lrs", "0.001,0.03", "--seeds", "0,1", "--sweep-seeds", "2",
            "--extend-lr-grid", "1", "--phases", "sweep", "--out", str(out)]
    assert compare_inits.main(argv) == 0
    rows = _rows(out / "runs.csv")
    extra = ({float(r["lr"]) for r in rows} - {0.001, 0.03}).pop()
    assert sorted(int(r["seed"]) for r in rows if float(r["lr"]) == extra) == [0, 1]
    # Interrupt: seed 1 never ran the rate past the edge.
    kept = [r for r in rows if not (float(r["lr"]) == extra and r["seed"] == "1")]
    with (out / "runs.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    assert compare_inits.attempted_lrs(kept, [0, 1]) == [0.001, 0.03]
    assert compare_inits.main(argv) == 0
    again = _rows(out / "runs.csv")
    assert sorted(int(r["seed"]) for r in again if float(r["lr"]) == extra) == [0, 1]
    assert len(again) == len(rows)


def test_parse_method_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="peft:eva"):
        compare_inits.parse_method("peft:nope")
    with pytest.raises(ValueError, match="estimator"):
        compare_inits.parse_method("input-pca@nope")
    with pytest.raises(ValueError, match="no calibration"):
        compare_inits.parse_method("kaiming@empirical")
    assert compare_inits.parse_method("cov-svd").estimator == "ledoit_wolf"


def test_named_method_lists_nest() -> None:
    """core ⊂ lean ⊂ full; core runs every covinit strategy and PEFT init (but gaussian) once."""
    full, lean, core = (compare_inits.choose_methods(n) for n in ("full", "lean", "core"))
    labels = [[m.label for m in ms] for ms in (full, lean, core)]
    assert set(labels[2]) < set(labels[1]) < set(labels[0])
    strategies = [m.label.partition("@")[0] for m in core if not m.label.startswith("peft:")]
    assert len(strategies) == len(set(strategies))  # one estimator each
    assert set(strategies) == set(labels[1][i].partition("@")[0] for i in range(len(lean))
                                  if not labels[1][i].startswith("peft:"))
    assert {m.label for m in core if m.label.startswith("peft:")} == (
        {m.label for m in lean if m.label.startswith("peft:")} - {"peft:gaussian"})


def test_paired_delta_matches_seeds() -> None:
    ref = {"seeds": [0, 1, 2], "final_val": [0.5, 0.6, 0.7]}
    st = {"seeds": [2, 0], "final_val": [0.65, 0.45]}
    got = compare_inits.paired_delta(st, ref, "final_val")
    assert got == pytest.approx([-0.05, -0.05])
    # Leaving out the sweep seeds: only seed 2 is past them.
    assert compare_inits.paired_delta(st, ref, "final_val", skip=[0, 1]) == pytest.approx([-0.05])


def _verdict(rel: float, lo: float, hi: float, data: bool = True,
             family: str = "covinit") -> dict:
    return {"rel": rel, "at": (rel, lo, hi), "own": (rel, lo, hi), "n_at": 5, "n_own": 5,
            "win": hi < 0, "lose": lo > 0, "data": data, "family": family}


def test_choose_default_rule() -> None:
    kaiming = _verdict(0.0, 0.0, 0.0, data=False) | {"win": False, "lose": False}
    # a wins t1 and loses nothing; b wins nothing; c wins t1 but loses t2; a PEFT method
    # never becomes covinit's default, however good.
    per_task = {
        "t1": {"kaiming": kaiming, "a": _verdict(-0.02, -0.03, -0.01),
               "b": _verdict(-0.01, -0.03, 0.01), "c": _verdict(-0.05, -0.06, -0.04),
               "peft:x": _verdict(-0.09, -0.1, -0.08, family="peft")},
        "t2": {"kaiming": kaiming, "a": _verdict(0.001, -0.01, 0.01),
               "b": _verdict(-0.002, -0.01, 0.01), "c": _verdict(0.03, 0.02, 0.04),
               "peft:x": _verdict(-0.09, -0.1, -0.08, family="peft")},
    }
    assert choose_default.choose(per_task)[0] == "a"
    # d would win t1 and t2, but has one seed at Kaiming's rate on t2 (still running): no
    # candidate yet, and the sentence names it
    per_task["t1"]["d"] = _verdict(-0.2, -0.3, -0.1)
    per_task["t2"]["d"] = _verdict(float("nan"), float("nan"), float("nan")) | {"n_at": 1}
    assert choose_default.choose(per_task)[0] == "a"
    per_task["t1"]["a"] = _verdict(-0.02, -0.05, 0.01)  # interval holds 0: nobody wins
    label, why = choose_default.choose(per_task)
    assert label == "kaiming" and "closest on average" in why and "nan" not in why
    assert "not yet run at Kaiming's rate on ≥ 2 seeds of every configuration: `d`" in why
    # e wins t1 but never ran on t2: not a candidate either, and named as unmeasured
    per_task["t1"]["e"] = _verdict(-0.2, -0.3, -0.1)
    label, why = choose_default.choose(per_task)
    assert label == "kaiming" and "configuration: `d`, `e`" in why


def test_choose_default_evidence_table_both_rates(tmp_path: Path) -> None:
    """The long evidence table: per method, paired Δ of final loss and curve area at
    Kaiming's rate and at its own, the own rate marked "not swept" when the method ran at
    Kaiming's rate only; the CSV's numbers are the paired-t intervals of the raw deltas."""
    def row(method: str, lr: float, seed: int, final: float, auc: float) -> dict:
        return {"task": "minilm-rt", "regime": "base", "config": "c", "method": method,
                "seed": seed, "lr": lr, "status": "ok", "steps": 4, "curve_steps": "[0, 4]",
                "curve_val_loss": f"[0.7, {final}]", "final_val_loss": final, "val_auc": auc,
                "test_metric": 0.7, "test_loss": final, "calib_s": 0, "init_s": 0,
                "step0_val_loss": 0.7, "base_val_loss": 0.7}

    rows = [row("kaiming", lr, seed, loss + 0.01 * seed, 0.65)
            for lr, loss in ((2e-3, 0.60), (5e-4, 0.65)) for seed in (0, 1)]
    rows += [row("kaiming", 1e-3, seed, 0.50 + 0.01 * seed, 0.60) for seed in range(3)]
    # input-pca: Kaiming's rate only; grad-whiten: swept over 3 rates, best 5e-4.
    rows += [row("input-pca@empirical+matched", 1e-3, seed, 0.49 + 0.012 * seed, 0.58)
             for seed in range(3)]
    gw = {5e-4: 0.45, 1e-3: 0.55, 2e-3: 0.70}
    rows += [row("grad-whiten@ledoit_wolf", lr, seed, v + 0.02 * seed, v + 0.1)
             for lr, v in gw.items() for seed in (0, 1)]
    rows += [row("grad-whiten@ledoit_wolf", 5e-4, 2, 0.49, 0.55),
             row("grad-whiten@ledoit_wolf", 1e-3, 2, 0.57, 0.65)]
    # Kaiming checked at grad-whiten's rate on seed 2: that makes seed 2 no sweep seed, so
    # grad-whiten's own rate still comes from its 3 rates on seeds 0-1.
    rows.append(row("kaiming", 5e-4, 2, 0.70, 0.75))
    path = tmp_path / "runs.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=compare_inits.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    per_task = {k: choose_default.verdicts(v)
                for k, v in choose_default.folder_stats(path).items()}
    choose_default.write_evidence_csv(per_task, tmp_path / "e.csv")
    got = {r["method"]: r for r in _rows(tmp_path / "e.csv")}
    assert list(got) == ["kaiming", "input-pca@empirical+matched", "grad-whiten@ledoit_wolf"]
    ipca, gwr = got["input-pca@empirical+matched"], got["grad-whiten@ledoit_wolf"]
    assert (ipca["rates_swept"], ipca["own_lr"], gwr["rates_swept"]) == ("1", "0.001", "3")
    assert float(gwr["own_lr"]) == 5e-4 and float(gwr["kaiming_lr"]) == 1e-3
    kaiming_at = [0.50, 0.51, 0.52]
    want = compare_inits.paired_interval([0.49 + 0.012 * s - k
                                          for s, k in enumerate(kaiming_at)])
    assert [float(ipca[f"final_val_at_{x}"]) for x in ("mean", "low", "high")] == \
        pytest.approx(want, abs=1e-6)
    assert ipca["final_val_own_mean"] == ipca["final_val_at_mean"]  # the same runs
    own = [0.45 - 0.50, 0.47 - 0.51, 0.49 - 0.52]  # grad-whiten at 5e-4 vs Kaiming at 1e-3
    assert float(gwr["final_val_own_mean"]) == pytest.approx(sum(own) / 3, abs=1e-6)
    assert float(gwr["auc_at_mean"]) == pytest.approx(0.65 - 0.60, abs=1e-6)
    # Seeds past the sweep (0-1): seed 2 only, the one whose noise chose no rate.
    assert float(gwr["final_val_held_mean"]) == pytest.approx(own[2], abs=1e-6)
    assert gwr["final_val_held_n"] == "1"
    text = choose_default.report(per_task, "kaiming", "why", [])
    assert "| `input-pca@empirical+matched` | 0.001 (not swept) |" in text
    assert "| `grad-whiten@ledoit_wolf` | 0.0005 (3 rates) |" in text
    assert "minilm-rt/base (Kaiming's lr* 0.001)" in text


def test_choose_default_rate_choice_counts_agreement_and_flattery() -> None:
    """The rate-choice line: sweeps whose seeds alone agree on the rate, within one ×2 step,
    and the mean (± s.e.) of own-rate Δ on the sweep seeds minus on the seeds past them."""
    def v(picks: list[float], sweep: list[float], held: list[float]) -> dict:
        return {"picks": picks, "final_val_sweep": sweep, "final_val_held": held}

    per_task = {"t1": {"kaiming": v([1e-3, 1e-3], [0.0], [0.0]),  # the reference: skipped
                       "a": v([1e-3, 1e-3], [-0.02, -0.04], [0.0, 0.01, -0.01]),
                       "b": v([5e-4, 1e-3], [-0.01, -0.01], [0.01, 0.01, 0.01])},
                "t2": {"a": v([2.5e-4, 1e-3], [0.02, 0.02], [0.02, 0.03, 0.01]),
                       "c": v([], [], [])}}  # not swept: skipped
    text = choose_default.rate_choice(per_task)
    gaps = [-0.03, -0.02, 0.0]
    se = float(np.std(gaps, ddof=1)) / math.sqrt(3)
    assert text.startswith("Rate choice: in 1 of 3 own-rate sweeps")
    assert "(2 within one ×2 step)" in text
    assert f"{-0.05 / 3:+.4f} ± {se:.4f} (mean ± s.e. over 3;" in text
    assert choose_default.rate_choice({"t": {"c": v([], [], [])}}) == ""


def test_choose_default_figure(tmp_path: Path) -> None:
    """The figure of the evidence: one panel per configuration, methods missing from one
    configuration and undefined intervals (one seed) are skipped, not drawn as zero."""
    kaiming = _verdict(0.0, 0.0, 0.0, data=False)
    one_seed = _verdict(-0.01, float("nan"), float("nan")) | {"n_at": 1}
    per_task = {"t1": {"kaiming": kaiming, "a": _verdict(-0.02, -0.03, -0.01), "b": one_seed},
                "t2": {"kaiming": kaiming, "a": _verdict(0.03, 0.02, 0.04)}}
    choose_default.plot(per_task, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 10_000


def test_paired_interval_matches_scipy_paired_t() -> None:
    from scipy import stats

    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 9):
        a, b = rng.normal(0.5, 0.1, n), rng.normal(0.52, 0.1, n)
        mean, lo, hi = compare_inits.paired_interval(list(a - b))
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert mean == pytest.approx(float(np.mean(a - b)), rel=1e-12)
        assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-10)
    mean, lo, hi = compare_inits.paired_interval([0.1])
    assert mean == 0.1 and math.isnan(lo) and math.isnan(hi)
    assert "**" in compare_inits.fmt_interval([-0.1, -0.11, -0.12])  # clear of 0: bold
    assert "**" not in compare_inits.fmt_interval([-0.1, 0.1, 0.0])


def test_curve_area_is_the_trapezoid_mean() -> None:
    steps, losses = [0, 4, 8, 16, 32], [0.7, 0.65, 0.6, 0.5, 0.45]
    want = np.trapezoid(losses, steps) / 32
    assert compare_inits.curve_area(steps, losses) == pytest.approx(want, rel=1e-12)
    assert compare_inits.curve_area([0, 10], [1.0, 1.0]) == pytest.approx(1.0)
    assert math.isnan(compare_inits.curve_area([0], [0.3]))


def test_sensitivity_table_band_and_neighbours() -> None:
    def row(method: str, lr: float, seed: int, loss: float) -> dict[str, str]:
        return {"method": method, "lr": str(lr), "seed": str(seed), "status": "ok",
                "final_val_loss": str(loss)}

    # Mean losses on the ×2 grid 1e-4…1.6e-3: 0.60, 0.52, 0.50 (best), 0.515, 0.70.
    means = {1e-4: 0.60, 2e-4: 0.52, 4e-4: 0.50, 8e-4: 0.515, 1.6e-3: 0.70}
    rows = [row("kaiming", lr, seed, v + (0.01 if seed else -0.01))
            for lr, v in means.items() for seed in (0, 1)]
    rows.append(row("kaiming", 3.2e-3, 0, 0.4))  # one sweep seed only: not a grid point
    rows += [row("input-pca@empirical", lr, 0, 0.5) for lr in (1e-4, 2e-4)]  # 2 rates
    methods = [compare_inits.parse_method(m) for m in ("kaiming", "input-pca@empirical")]
    lines = compare_inits.sensitivity_table(rows, methods, [0, 1])
    body = [line for line in lines if line.startswith("| `")]
    assert len(body) == 1  # input-pca swept < 3 rates on every seed: no row
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert cells[2] == "0.0004" and cells[3] == "0.5000"
    assert cells[4] == "+0.0200" and cells[5] == "+0.0150"
    # 0.52 and 0.515 are within 5 % of 0.50, 0.60 and 0.70 are not
    assert cells[6] == "0.0002…0.0008 (×4)"
    assert cells[7] == "agree"  # both seeds alone pick 4e-4 (a shift of ±0.01 each)
    assert compare_inits.sensitivity_table([], methods, [0, 1]) == []
    # Seed 0 alone picks 2e-4, seed 1 alone 8e-4; their mean picks 4e-4: the cell names both.
    split = {0: {1e-4: 0.6, 2e-4: 0.48, 4e-4: 0.49, 8e-4: 0.55},
             1: {1e-4: 0.6, 2e-4: 0.56, 4e-4: 0.50, 8e-4: 0.49}}
    noisy = [row("peft:eva", lr, seed, v) for seed, d in split.items() for lr, v in d.items()]
    lines = compare_inits.sensitivity_table(noisy, [compare_inits.parse_method("peft:eva")],
                                            [0, 1])
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert cells[2] == "0.0004" and cells[7] == "0.0002, 0.0008"


def test_select_lr_needs_every_sweep_seed_at_a_rate() -> None:
    def row(lr: float, seed: int, loss: float, status: str = "ok") -> dict[str, str]:
        return {"method": "kaiming", "lr": str(lr), "seed": str(seed), "status": status,
                "final_val_loss": str(loss)}

    rows = [row(1e-3, 0, 0.50), row(1e-3, 1, 0.52), row(2e-3, 0, 0.49), row(2e-3, 1, 0.55)]
    assert compare_inits.select_lr(rows, [0, 1]) == 1e-3  # mean 0.51 < 0.52
    # A rate only seed 0 has reached (a sweep still running) cannot win on that seed alone,
    # nor can one whose other seed's run failed; seed 2 is not a sweep seed.
    rows += [row(4e-3, 0, 0.30), row(5e-4, 0, 0.31), row(5e-4, 1, 0.3, "failed"),
             row(1e-3, 2, 0.90)]
    assert compare_inits.select_lr(rows, [0, 1]) == 1e-3
    assert compare_inits.select_lr(rows, [0]) == 4e-3
    assert compare_inits.select_lr(rows[-3:-1], [0, 1]) is None
    # A diverged run (no final loss) still completes its rate, as an infinite loss.
    assert compare_inits.select_lr([row(1e-3, 0, 0.5), row(1e-3, 1, math.nan),
                                    row(2e-3, 0, 0.6), row(2e-3, 1, 0.6)], [0, 1]) == 2e-3


def test_method_labels_carry_options() -> None:
    m = compare_inits.parse_method("cov-svd@ledoit_wolf+matched")
    assert (m.name, m.estimator, dict(m.options)) == ("cov-svd", "ledoit_wolf",
                                                       {"scale": "matched"})
    assert m.needs_lr and m.needs_gradient and m.init_options(2e-3) == {"scale": "matched",
                                                                       "lr": 2e-3}
    m = compare_inits.parse_method("input-pca@empirical+matched")
    assert not m.needs_lr and not m.needs_gradient and m.init_options(1e-3) == {
        "scale": "matched"}
    assert compare_inits.parse_method("output-pca@empirical+matched").needs_gradient
    m = compare_inits.parse_method("kfac")  # matched by default, B = 0: no lr
    assert m.label == "kfac@ledoit_wolf" and m.needs_gradient and not m.needs_lr
    assert compare_inits.parse_method("grad-svd+residual").needs_lr
    m = compare_inits.parse_method("pissa+matched")  # data-free strategy made data-driven
    assert m.needs_calibration and m.needs_gradient and m.estimator == "ledoit_wolf"
    assert compare_inits.parse_method("cov-svd+power=1").options == (("power", 1),)
    assert not compare_inits.parse_method("lora-ga").needs_lr  # stable scale
    with pytest.raises(ValueError, match="not accepted"):
        compare_inits.parse_method("kaiming+matched")
    with pytest.raises(ValueError, match="unknown option"):
        compare_inits.parse_method("input-pca+fast")
    with pytest.raises(ValueError, match="twice"):
        compare_inits.parse_method("input-pca+matched+unit")


def test_regimes_set_steps_and_targets() -> None:
    args = compare_inits.build_parser().parse_args(["--task", "tiny", "--regime", "low-data"])
    s = compare_inits.settings_from(args)
    assert s["n_train"] == 256 and s["steps"] == 4 * 256 // s["batch_size"]
    args = compare_inits.build_parser().parse_args(["--task", "minilm-rt", "--regime",
                                                    "all-linear"])
    s = compare_inits.settings_from(args)
    assert "intermediate.dense" in s["targets"] and "output.dense" in s["targets"]
    args = compare_inits.build_parser().parse_args(["--task", "minilm-rt", "--regime", "r32"])
    assert compare_inits.settings_from(args)["rank"] == 32


def test_dropin_phase_resumes_a_partial_csv(tmp_path: Path) -> None:
    """Gradient and matched methods end to end on the tiny task; a CSV cut after a few rows
    continues where it stopped, and the rows it keeps are not run again."""
    out = tmp_path / "tiny"
    methods = "kaiming,kfac@ledoit_wolf,cov-svd@ledoit_wolf+matched,input-pca@empirical+matched"
    argv = ["--task", "tiny", "--strategies", methods, "--steps", "3", "--lrs", "0.01,0.02,0.04",
            "--seeds", "0,1,2", "--sweep-seeds", "2", "--phases", "dropin",
            "--extend-lr-grid", "0", "--out", str(out)]
    assert compare_inits.main(argv) == 0
    rows = _rows(out / "runs.csv")
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    ref_lr = compare_inits.select_lr([r for r in rows if r["method"] == "kaiming"], [0, 1])
    at_ref = {(r["method"], r["seed"]) for r in rows if float(r["lr"]) == ref_lr}
    assert at_ref == {(m, str(s)) for m in methods.split(",") for s in range(3)
                      for m in [compare_inits.parse_method(m).label]}
    for r in rows:
        assert float(r["s_lr"]) == pytest.approx(2.0 * float(r["lr"]))  # α/r = 8/4
        assert 0 < float(r["val_auc"]) < 2
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "Can I keep my learning rate?" in summary and "paired t" in summary
    # Cut the CSV after 5 runs: the same command runs exactly the missing ones.
    text = (out / "runs.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "runs.csv").write_text("".join(text[:6]), encoding="utf-8")
    assert compare_inits.main(argv) == 0
    again = _rows(out / "runs.csv")
    assert len(again) == len(rows)
    assert again[:5] == rows[:5]
    key = lambda r: (r["method"], r["seed"], r["lr"])
    assert sorted(map(key, again)) == sorted(map(key, rows))
    # Deterministic: a re-run row equals the original one.
    first = {key(r): r["final_val_loss"] for r in rows}
    assert all(_close(r["final_val_loss"], first[key(r)]) for r in again[5:])
    # A later call naming fewer methods still summarizes every method runs.csv holds.
    few = [*argv[:argv.index("--strategies") + 1], "kaiming,input-pca@empirical+matched",
           *argv[argv.index("--strategies") + 2:], "--summary-only"]
    assert compare_inits.main(few) == 0
    summary = (out / "summary.md").read_text(encoding="utf-8")
    for label in methods.split(","):
        assert f"| `{compare_inits.parse_method(label).label}` |" in summary


def test_dropin_without_kaiming_takes_its_rate_from_the_csv(tmp_path: Path) -> None:
    """Two processes split a configuration: one sweeps Kaiming, the other runs a method at
    Kaiming's recorded rate; an unfinished Kaiming sweep is an error, not a guess."""
    out = tmp_path / "tiny"
    base = ["--task", "tiny", "--steps", "3", "--lrs", "0.01,0.02,0.04", "--seeds", "0,1,2",
            "--sweep-seeds", "2", "--phases", "dropin", "--out", str(out)]
    other = [*base, "--strategies", "input-pca@empirical+matched", "--extend-lr-grid", "0"]
    assert compare_inits.main(other) == 0  # nothing recorded yet: the drop-in is skipped
    assert not (out / "runs.csv").exists()
    assert compare_inits.main([*base, "--strategies", "kaiming", "--extend-lr-grid", "0"]) == 0
    kaiming = _rows(out / "runs.csv")
    ref_lr = compare_inits.select_lr(kaiming, [0, 1])
    assert compare_inits.main(other) == 0
    mine = [r for r in _rows(out / "runs.csv") if r["method"] != "kaiming"]
    assert sorted(int(r["seed"]) for r in mine) == [0, 1, 2]
    assert all(float(r["lr"]) == ref_lr for r in mine)

    lrs = [0.01, 0.02, 0.04]
    with pytest.raises(ValueError, match=r"lacks 0\.04"):  # a grid rate not run on seed 1
        compare_inits.recorded_reference_lr(
            [r for r in kaiming if not (r["seed"] == "1" and float(r["lr"]) == 0.04)],
            lrs, [0, 1], extend=0)
    edge = [{**r, "final_val_loss": str(float(r["lr"]))} for r in kaiming]  # best: 0.01
    with pytest.raises(ValueError, match=r"would grow to 0\.005"):
        compare_inits.recorded_reference_lr(edge, lrs, [0, 1], extend=1)
    assert compare_inits.recorded_reference_lr(edge, lrs, [0, 1], extend=0) == 0.01
    assert compare_inits.recorded_reference_lr([], lrs, [0, 1], extend=2) is None


def test_recorded_methods_keeps_run_order_and_names_what_it_drops(capsys) -> None:
    given = [compare_inits.parse_method(x) for x in ("kaiming", "pissa")]
    rows = [{"method": m} for m in ("cov-svd@ledoit_wolf+matched", "kaiming", "gone@empirical",
                                    "cov-svd@ledoit_wolf+matched")]
    got = compare_inits.recorded_methods(given, rows)
    assert [m.label for m in got] == ["cov-svd@ledoit_wolf+matched", "kaiming", "pissa"]
    assert got[1] is given[0] and got[0].scale == "matched"
    assert "leaving out runs.csv's method 'gone@empirical'" in capsys.readouterr().out


def test_synthetic_smallest_setting(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    methods = ["kaiming", "input-pca@spatpca", "input-whiten@empirical", "cov-svd@ledoit_wolf"]
    argv = ["--quick", "--variants", "n<k,smooth", "--seeds", "0", "--steps", "8",
            "--strategies", ",".join(methods), "--out", str(out)]
    assert synthetic.main(argv) == 0
    rows = _rows(out / "runs.csv")
    assert {r["method"] for r in rows} == set(methods)
    assert {r["variant"] for r in rows} == {"n<k", "smooth"}
    assert (out / "synthetic.png").stat().st_size > 10_000
    assert "## smooth" in (out / "summary.md").read_text(encoding="utf-8")
    for r in rows:
        assert r["status"] == "ok"
        assert r["preserves"] == get_strategy(r["method"].split("@")[0]).tags["preserves"]
        if r["preserves"] in PRESERVING:
            assert _close(r["step0_loss"], r["base_loss"], rel=1e-4)
        # The base layer is W0, so its relative excess error is ~1 by construction.
        assert 0.8 < float(r["base_loss"]) < 1.2


def test_calibration_speed_median_ratio_pairs_rounds() -> None:
    """The median of per-round ratios pairs each round's time with that round's floor (a
    slow round slows both), unlike the ratio of the two best rounds."""
    speed = pytest.importorskip("calibration_speed")
    times = {"b_floor_fp32_gram[in+out]": [10.0, 20.0, 11.0],
             "c_covinit[in+out,float64]": [12.0, 21.0, 11.5],
             "b_floor_fp32_gram[in]": [5.0, 5.0], "c_covinit[in,mixed]": [4.0, 6.0],
             "a_forward": [1.0, 1.0, 1.0]}
    assert speed.median_ratio("c_covinit[in+out,float64]", times) == pytest.approx(
        sorted([1.2, 1.05, 11.5 / 11.0])[1])
    assert speed.median_ratio("c_covinit[in,mixed]", times) == pytest.approx(1.0)
    assert speed.median_ratio("b_floor_fp32_gram[in]", times) == 1.0
    assert speed.median_ratio("a_forward", times) is None
    assert speed.median_ratio("c_covinit[in,mixed]", {"b_floor_fp32_gram[in]": [5.0],
                                                       "c_covinit[in,mixed]": [4.0]}) is None
    rows = [speed.Row("m", "a_forward", 1.0, 0.0),
            speed.Row("m", "b_floor_fp32_gram[in]", 5.0, 0.0, median_ratio=1.0),
            speed.Row("m", "c_covinit[in,mixed]", 4.0, 0.0, median_ratio=1.0)]
    table = {t["method"]: t for t in speed.ratios(rows)}
    assert table["c_covinit[in,mixed]"]["x_floor"] == 0.8
    assert table["c_covinit[in,mixed]"]["x_floor_median"] == 1.0
    assert table["a_forward"]["x_floor_median"] == ""
    assert table["c_covinit[in,mixed]"]["x_floor_user"] == ""  # rows from before the column


def test_calibration_speed_splits_user_and_kernel_time() -> None:
    """The compute-only ratio uses user CPU time; a timed call reports its CPU times."""
    speed = pytest.importorskip("calibration_speed")
    rows = [speed.Row("m", "a_forward", 1.0, 0.0, user_s=1.0, sys_s=0.1),
            speed.Row("m", "b_floor_fp32_gram[in]", 5.0, 0.0, user_s=4.0, sys_s=1.0),
            speed.Row("m", "c_covinit[in,float64]", 6.0, 0.0, user_s=4.2, sys_s=1.8)]
    table = {t["method"]: t for t in speed.ratios(rows)}
    assert table["c_covinit[in,float64]"]["x_floor"] == 1.2
    assert table["c_covinit[in,float64]"]["x_floor_user"] == 1.05
    assert table["a_forward"]["x_floor_user"] == ""
    t = speed.timed(lambda: sum(i * i for i in range(300_000)))
    assert t.out > 0 and t.seconds > 0 and t.user_s > 0 and t.sys_s >= 0


def test_calibration_speed_append_keeps_each_rows_rounds(tmp_path: Path, monkeypatch) -> None:
    """``--append`` merges runs made with different ``--repeats``: each row keeps the rounds
    it was measured with (the header once claimed the last command's count for all)."""
    speed = pytest.importorskip("calibration_speed")
    monkeypatch.setattr(speed, "RESULTS", tmp_path)
    first = [speed.Row("m1", "a_forward", 1.0, 0.0, rounds=2),
             speed.Row("m1", "b_floor_fp32_gram[in]", 5.0, 0.0, rounds=2),
             speed.Row("m1", "e_peft_corda(bs=1)", 9.0, 0.0)]
    speed.write_rows(tmp_path / "s.csv", speed.ratios(first), list(speed.ratios(first)[0]))
    rows, _ = speed.merged([speed.Row("m2", "a_forward", 2.0, 0.0, rounds=1)], "s")
    by = {(r.model, r.method): r.rounds for r in rows}
    assert by == {("m1", "a_forward"): 2, ("m1", "b_floor_fp32_gram[in]"): 2,
                  ("m1", "e_peft_corda(bs=1)"): None, ("m2", "a_forward"): 1}
    assert speed.first_touch(1 / 64).seconds > 0


def test_choose_default_budget_counts_every_timed_run() -> None:
    """The budget line: runs and hours summed from ``train_s``; a diverged run spent its
    time and counts, a row without a time (or a non-finite one) does not."""
    rows = [{"train_s": "3600", "status": "ok"}, {"train_s": 1800.0, "status": "diverged"},
            {"train_s": "", "status": "ok"}, {"train_s": "nan", "status": "ok"},
            {"status": "ok"}]
    runs, hours = choose_default.budget(rows)
    assert runs == 2 and hours == pytest.approx(1.5)
    assert choose_default.budget([]) == (0, 0.0)
