"""Teacher–student tasks with planted structure: where do shrinkage and smooth PCA matter?

A frozen linear layer ``W0`` (d×k) must learn a rank-r correction ``ΔW* = B*·M·A*`` through
LoRA.  The inputs carry a planted r-dimensional signal subspace ``U`` (k×r) on top of
isotropic noise, ``A* = Uᵀ`` (the task uses exactly the directions the inputs vary along)
and ``B*`` spans the leading output directions of ``W0·U`` (what the frozen layer already
writes on the task's inputs)::

    x = U·diag(√λ)·z + σ·ε          z ~ N(0, I_r), ε ~ N(0, I_k)
    y = (W0 + B*·M·A*)·x + σ_y·η

Calibration sees only ``n_calib`` inputs — few relative to the width — so the estimated
directions and eigenvalues are noisy.  Variants:

``planted``
    random ``U``, ``n_calib = 4k``: enough data; data-driven inits should help plainly.
``n<k``
    random ``U``, weaker signal, ``n_calib = k/4``: the sample covariance is singular and its
    top eigenvalues inflated — where Ledoit-Wolf shrinkage should matter (whitening,
    ``Σ^{±1/2}``).
``smooth``
    ``U`` = low-frequency cosines along a 1-D chain of features, ``n_calib = k/2``, weak
    signal: the sample eigenvectors are rough, the truth is smooth — where SpatPCA's
    roughness penalty (chain geometry, τ chosen by cross-validation) should matter.

Every init runs through covinit (``add_lora`` → ``calibrate`` → ``initialize``), trains
with Adam at each learning rate of a small grid (best chosen on a validation set, test
reported), over several seeds.  The metric is the relative excess test error
``(MSE − σ_y²) / E‖ΔW*·x‖²``: 1 at step 0 (the layer is still W0), 0 when the correction is
learned exactly.  Outputs: ``benchmarks/results/synthetic/{runs.csv, summary.md,
synthetic.png}``.

    python benchmarks/synthetic.py            # about a minute on one core
    python benchmarks/synthetic.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    command_line,
    fmt_mean_std,
    load_average,
    machine,
    mean_std,
    read_rows,
    write_rows,
)
from compare_inits import Method, parse_method

import covinit

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "synthetic"

METHODS = ["kaiming", "gaussian", "pissa", "input-pca@empirical", "input-pca@spatpca",
           "input-whiten@empirical", "input-whiten@ledoit_wolf", "output-pca@empirical",
           "cov-svd@empirical", "cov-svd@ledoit_wolf", "cov-minor@ledoit_wolf",
           "two-sided@empirical", "two-sided@ledoit_wolf"]
QUICK_METHODS = ["kaiming", "pissa", "input-pca@empirical", "input-pca@spatpca",
                 "input-whiten@empirical", "input-whiten@ledoit_wolf", "cov-svd@ledoit_wolf"]
FIELDS = ["variant", "method", "preserves", "seed", "lr", "status", "base_loss", "step0_loss",
          "val_final", "test_at_25", "test_at_50", "test_final", "a_alignment", "init_s",
          "curve_steps", "curve_test", "note"]


@dataclass(frozen=True)
class Variant:
    """One planted-structure problem (see the module docstring)."""

    name: str
    k: int
    d: int
    r: int
    n_calib: int
    signal: float  # λ of each planted direction (noise variance σ² = 1)
    smooth: bool
    description: str


VARIANTS = {
    "planted": Variant("planted", 64, 32, 4, 256, 9.0, False,
                       "random signal subspace, n_calib = 4k"),
    "n<k": Variant("n<k", 64, 32, 4, 16, 3.0, False,
                   "random signal subspace, weaker signal, n_calib = k/4 (singular sample "
                   "covariance)"),
    "smooth": Variant("smooth", 64, 32, 4, 32, 2.0, True,
                      "smooth signal directions along a 1-D feature chain, n_calib = k/2"),
}


@dataclass
class Problem:
    """Sampled instance: weights, subspaces and data splits."""

    w0: Tensor  # (d, k)
    delta: Tensor  # (d, k) = ΔW*
    u: Tensor  # (k, r) planted input subspace, orthonormal
    calib: Tensor  # (n_calib, k)
    train: tuple[Tensor, Tensor]  # (n, k), (n, d)
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    signal_power: float  # E‖ΔW*·x‖² per sample
    noise_y: float  # σ_y²


def make_problem(v: Variant, seed: int, n_train: int = 512, n_eval: int = 512) -> Problem:
    """Draw one instance of variant ``v`` (everything from a generator seeded by ``seed``)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    if v.smooth:
        pos = torch.arange(v.k, dtype=torch.float64) / v.k
        u = torch.stack([torch.cos(math.pi * (j + 1) * pos) for j in range(v.r)], 1)
    else:
        u = torch.randn(v.k, v.r, generator=gen, dtype=torch.float64)
    u, _ = torch.linalg.qr(u)  # (k, r)
    scale = torch.full((v.r,), math.sqrt(v.signal), dtype=torch.float64)
    w0 = torch.randn(v.d, v.k, generator=gen, dtype=torch.float64) / math.sqrt(v.k)
    b_star, _ = torch.linalg.qr(w0 @ u)  # (d, r): the outputs W0 already writes on U
    mix = torch.randn(v.r, v.r, generator=gen, dtype=torch.float64) / math.sqrt(v.r)
    delta = b_star @ mix @ u.T  # (d, k)
    noise_y = 0.01

    def draw(n: int) -> tuple[Tensor, Tensor]:
        z = torch.randn(n, v.r, generator=gen, dtype=torch.float64)
        x = (z * scale) @ u.T + torch.randn(n, v.k, generator=gen, dtype=torch.float64)
        y = x @ (w0 + delta).T + math.sqrt(noise_y) * torch.randn(n, v.d, generator=gen,
                                                                dtype=torch.float64)
        return x.float(), y.float()

    calib, _ = draw(v.n_calib)
    # E‖ΔW*·x‖² = tr(ΔW* Σx ΔW*ᵀ) with Σx = U diag(λ) Uᵀ + I.
    sigma = (u * v.signal) @ u.T + torch.eye(v.k, dtype=torch.float64)
    power = float(torch.trace(delta @ sigma @ delta.T))
    return Problem(w0.float(), delta.float(), u, calib, draw(n_train), draw(n_eval),
                   draw(n_eval), power, noise_y)


def _excess(model: nn.Module, data: tuple[Tensor, Tensor], p: Problem) -> float:
    with torch.no_grad():
        mse = float(((model(data[0]) - data[1]) ** 2).sum(1).mean())
    return (mse - p.noise_y * data[1].shape[1]) / p.signal_power


def alignment(a: Tensor, u: Tensor) -> float:
    """Mean cos² of the principal angles between the row space of A (r×k) and ``U`` (k×r);
    NaN when A = 0."""
    if float(a.abs().max()) == 0.0:
        return math.nan
    q, _ = torch.linalg.qr(a.double().T)  # (k, r)
    return float((torch.linalg.svdvals(u.T @ q) ** 2).mean())


def run_one(v: Variant, p: Problem, method: Method, seed: int, lr: float, steps: int,
            batch: int, folds: int, calibration: Any) -> dict[str, Any]:
    """Fresh LoRA layer over ``W0`` → initialize → Adam → curves."""
    base = nn.Sequential(nn.Linear(v.k, v.d, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(p.w0)
    base_loss = _excess(base, p.test, p)
    model = covinit.add_lora(base, ["0"], rank=v.r, alpha=2.0 * v.r)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = covinit.initialize(
            model, calibration if method.needs_calibration else None, strategy=method.name,
            estimator=method.estimator or "ledoit_wolf", seed=seed)
    init_s = time.perf_counter() - start
    note = "; ".join(sorted({str(w.message)[:100] for w in caught}))
    if "fallback" in info["0"]:
        note = f"kaiming fallback: {info['0']['fallback']}"
    a, _ = covinit.find_adapters(model)["0"].get_lora()
    align = alignment(a.detach(), p.u)
    step0 = _excess(model, p.test, p)
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x, y = p.train
    marks = sorted({0, steps, round(steps / 4), round(steps / 2)}
                   | {round(steps * i / 10) for i in range(1, 11)})
    curve_steps, curve_test = [0], [step0]
    status = "ok"
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = ((model(x[idx]) - y[idx]) ** 2).sum(1).mean()
        if not torch.isfinite(loss):
            status = f"diverged at step {step}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in marks:
            curve_steps.append(step)
            curve_test.append(_excess(model, p.test, p))
    ok = status == "ok"

    def at(frac: float) -> float:
        want = round(steps * frac)
        return curve_test[curve_steps.index(want)] if want in curve_steps else math.nan

    return {"variant": v.name, "method": method.label, "preserves": method.preserves,
            "seed": seed, "lr": lr, "status": status, "base_loss": base_loss,
            "step0_loss": step0, "val_final": _excess(model, p.val, p) if ok else math.inf,
            "test_at_25": at(0.25), "test_at_50": at(0.5),
            "test_final": curve_test[-1] if ok else math.nan, "a_alignment": align,
            "init_s": init_s, "curve_steps": json.dumps(curve_steps),
            "curve_test": json.dumps([round(c, 6) for c in curve_test]), "note": note}


def run(variants: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
        lrs: Sequence[float], steps: int, batch: int, folds: int) -> list[dict[str, Any]]:
    """Every variant × seed × method × learning rate; one calibration per (variant, seed)."""
    chosen = [parse_method(m) for m in methods]
    rows = []
    for vname in variants:
        v = VARIANTS[vname]
        for seed in seeds:
            p = make_problem(v, seed)
            plain = nn.Sequential(nn.Linear(v.k, v.d, bias=False))
            with torch.no_grad():
                plain[0].weight.copy_(p.w0)
            batches = list(p.calib.split(max(1, v.n_calib // (2 * folds))))
            calibration = covinit.calibrate(plain, batches, targets=["0"], folds=folds,
                                            show_progress=False)
            for method in chosen:
                for lr in lrs:
                    rows.append(run_one(v, p, method, seed, lr, steps, batch, folds,
                                        calibration))
        print(f"  variant {vname}: {len(seeds)} seeds × {len(chosen)} methods × {len(lrs)} "
              "learning rates done", flush=True)
    return rows


def _f(row: dict[str, Any], key: str) -> float:
    try:
        return float(row[key])
    except (TypeError, ValueError):
        return math.nan


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (variant, method): lr* by mean validation error over seeds, statistics at lr*."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    keys = list(dict.fromkeys((r["variant"], r["method"]) for r in rows))
    for key in keys:
        mine = [r for r in rows if (r["variant"], r["method"]) == key]
        by_lr: dict[float, list[float]] = {}
        for r in mine:
            val = _f(r, "val_final")
            by_lr.setdefault(float(r["lr"]), []).append(val if math.isfinite(val) else math.inf)
        lr = min(by_lr, key=lambda x: (sum(by_lr[x]) / len(by_lr[x]), x))
        at = [r for r in mine if float(r["lr"]) == lr]
        out[key] = {"lr": lr, "rows": at,
                    **{f: [_f(r, f) for r in at] for f in ("test_at_25", "test_at_50",
                                                          "test_final", "a_alignment",
                                                          "step0_loss", "base_loss",
                                                          "init_s")}}
    return out


def plot(stats: dict[tuple[str, str], dict[str, Any]], path: Path) -> None:
    """Relative excess test error vs step per variant, mean ± std band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = list(dict.fromkeys(v for v, _ in stats))
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.8), squeeze=False)
    cmap = plt.get_cmap("tab20")
    methods = list(dict.fromkeys(m for _, m in stats))
    for ax, vname in zip(axes[0], variants, strict=True):
        for i, m in enumerate(methods):
            st = stats.get((vname, m))
            if not st:
                continue
            runs = [r for r in st["rows"] if r["status"] == "ok"]
            if not runs:
                continue
            steps = np.array(json.loads(runs[0]["curve_steps"]))
            vals = np.array([json.loads(r["curve_test"]) for r in runs])
            mu = vals.mean(0)
            sd = vals.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mu)
            ax.plot(steps, mu, color=cmap(i % 20), label=f"{m} (lr {st['lr']:g})")
            ax.fill_between(steps, np.maximum(mu - sd, 1e-4), mu + sd, color=cmap(i % 20),
                            alpha=0.15)
        ax.set_yscale("log")
        ax.set(title=f"{vname}: {VARIANTS[vname].description}", xlabel="step",
               ylabel="relative excess test error")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(stats: dict[tuple[str, str], dict[str, Any]], out: Path,
                  info: dict[str, Any]) -> Path:
    lines = ["# Synthetic teacher–student benchmark", "",
             "Relative excess test error `(MSE − σ_y²)/E‖ΔW*·x‖²` (1 = still W0, 0 = learned) "
             "of a rank-r LoRA on a frozen linear layer; lr* chosen per method on a validation "
             "set, mean ± std over seeds at lr*.  `A-align`: mean cos² of the principal angles "
             "between the row space of A at init and the planted input subspace (1 = exactly "
             "the signal subspace; a random A gives about r/k).", "",
             f"- Command: `{info['command']}`",
             f"- Machine: {machine()}; load average {info['load']} → {load_average()}; "
             f"wall time {info['seconds']:.0f} s",
             f"- Settings: {info['steps']} Adam steps × batch {info['batch']}, lr grid "
             f"{info['lrs']}, seeds {info['seeds']}, {info['folds']} calibration folds "
             "(spatpca cross-validation; chain geometry)", ""]
    for vname in dict.fromkeys(v for v, _ in stats):
        v = VARIANTS[vname]
        lines += [f"## {vname}: {v.description}", "",
                  f"k = {v.k}, d = {v.d}, r = {v.r}, n_calib = {v.n_calib}, planted "
                  f"eigenvalue {v.signal:g} over unit noise.", "",
                  "| method | lr* | A-align | step-0 (base) | test @25% | @50% | final |",
                  "|---|---|---|---|---|---|---|"]
        ranked = sorted(((m, st) for (vv, m), st in stats.items() if vv == vname),
                        key=lambda t: mean_std(t[1]["test_final"])[0])
        for m, st in ranked:
            align = [a for a in st["a_alignment"] if math.isfinite(a)]
            lines.append(
                f"| `{m}` | {st['lr']:g} | {fmt_mean_std(align, 3) if align else '–'} | "
                f"{mean_std(st['step0_loss'])[0]:.4f} ({mean_std(st['base_loss'])[0]:.4f}) | "
                f"{fmt_mean_std(st['test_at_25'])} | {fmt_mean_std(st['test_at_50'])} | "
                f"{fmt_mean_std(st['test_final'])} |")
        lines.append("")
    lines += ["Rows are sorted by final error (best first).  Read the effect of an estimator "
              "by comparing the same strategy's rows (e.g. `input-whiten@empirical` vs "
              "`@ledoit_wolf`, `input-pca@empirical` vs `@spatpca`)."]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--strategies", default=None, help="comma-separated covinit methods "
                   "(STRATEGY[@ESTIMATOR]); default: all")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--lrs", default="0.003,0.01,0.03,0.1")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="seconds: 2 seeds, 2 learning rates, 20 steps, fewer methods")
    p.add_argument("--out", default=None, help="results folder (default "
                   "benchmarks/results/synthetic[/quick])")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.lrs, args.steps = "0,1", "0.01,0.03", 20
        args.strategies = args.strategies or ",".join(QUICK_METHODS)
    variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = [s for s in variants if s not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    methods = (args.strategies or ",".join(METHODS)).split(",")
    try:
        for m in methods:
            if parse_method(m).family != "covinit":
                raise ValueError(f"{m!r}: synthetic.py compares covinit strategies only")
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    load, t0 = load_average(), time.perf_counter()
    rows = run(variants, methods, seeds, lrs, args.steps, args.batch_size, args.folds)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "runs.csv", rows, FIELDS)
    stats = summarize([dict(r) for r in read_rows(out / "runs.csv")])
    plot(stats, out / "synthetic.png")
    info = {"command": command_line(["benchmarks/synthetic.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
            "load": load, "seconds": time.perf_counter() - t0, "steps": args.steps,
            "batch": args.batch_size, "lrs": lrs, "seeds": seeds, "folds": args.folds}
    path = write_summary(stats, out, info)
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
