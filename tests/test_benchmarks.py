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

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

compare_inits = pytest.importorskip("compare_inits")
choose_default = pytest.importorskip("choose_default")
synthetic = pytest.importorskip("synthetic")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from covinit.strategies import get_strategy  # noqa: E402

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
    assert "Load average" in summary
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
            "--steps", "4", "--lrs", "0.001,0.03", "--seeds", "0,1", "--out", str(out)]
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


def _verdict(rel: float, sd: float, data: bool = True, family: str = "covinit") -> dict:
    return {"rel": rel, "sd": sd, "n": 3, "win": rel + sd < 0, "lose": rel - sd > 0,
            "at_ref": 0.0, "data": data, "family": family}


def test_choose_default_rule() -> None:
    kaiming = _verdict(0.0, 0.0, data=False) | {"win": False, "lose": False}
    # a wins t1 and loses nothing; b wins nothing; c wins t1 but loses t2; a PEFT method
    # never becomes covinit's default, however good.
    per_task = {
        "t1": {"kaiming": kaiming, "a": _verdict(-0.02, 0.01), "b": _verdict(-0.01, 0.02),
               "c": _verdict(-0.05, 0.01), "peft:x": _verdict(-0.09, 0.01, family="peft")},
        "t2": {"kaiming": kaiming, "a": _verdict(0.001, 0.01), "b": _verdict(-0.002, 0.01),
               "c": _verdict(0.03, 0.01), "peft:x": _verdict(-0.09, 0.01, family="peft")},
    }
    assert choose_default.choose(per_task)[0] == "a"
    per_task["t1"]["a"] = _verdict(-0.02, 0.03)  # now within noise: nobody wins
    label, why = choose_default.choose(per_task)
    assert label == "kaiming" and "closest on average" in why


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
