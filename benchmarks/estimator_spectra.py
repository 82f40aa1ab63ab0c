"""Eigenvalue spectra of the covariance estimators on one real MiniLM layer (README figure).

Calibrates all-MiniLM-L6-v2 on Rotten Tomatoes training snippets and takes the input
statistics of ``encoder.layer.3.output.dense`` (the FFN down-projection, k = 1536 GELU
features), twice: with all calibration tokens (n > k) and with the first ``--few`` tokens
(n < k, where the empirical covariance is singular).  Plots the sorted eigenvalues of
``empirical``, ``ledoit_wolf``, ``oas`` and ``nonlinear`` on a log scale.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/estimator_spectra.py

Writes ``benchmarks/results/estimator_spectra.png`` and ``estimator_spectra.csv`` (shrinkage
intensities, condition numbers).
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import zoo  # benchmarks/zoo.py: this script's folder is on sys.path

from covinit import calibrate
from covinit.covariance import estimate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAYER = "encoder.layer.3.output.dense"
NAMES = ("empirical", "ledoit_wolf", "oas", "nonlinear")
STYLE = {"empirical": "k-", "ledoit_wolf": "C0--", "oas": "C1:", "nonlinear": "C3-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256, help="calibration snippets")
    parser.add_argument("--few", type=int, default=600, help="token budget of the n < k panel")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = zoo.load_minilm()
    train = zoo.rotten_tomatoes(seed=0, n_train=args.examples)["train"]
    loader = zoo.text_classification_loader(tokenizer, train, batch_size=32, max_length=64)
    panels = []
    for budget in (None, args.few):
        cal = calibrate(model, loader, targets=[LAYER], sides=("input",), max_tokens=budget,
                        show_progress=False)
        (layer,) = cal.layer_names
        m = cal.moments(layer, "input")
        assert m is not None
        panels.append((layer, m))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    rows = []
    for ax, (layer, m) in zip(axes, panels, strict=True):
        for name in NAMES:
            est = estimate(m, name)
            lam = est.eigenvalues.clamp_min(1e-12).numpy()
            ax.semilogy(range(1, len(lam) + 1), lam, STYLE[name], lw=1.4,
                        label=name + ("" if est.shrinkage is None
                                      else f" (s = {est.shrinkage:.3f})"))
            low = float(est.eigenvalues[-1])
            cond = float(est.eigenvalues[0]) / low if low > 0 else float("inf")  # singular
            rows.append({"layer": layer, "n": m.n, "k": m.k, "estimator": name,
                         "shrinkage": "" if est.shrinkage is None else f"{est.shrinkage:.5f}",
                         "lambda_max": f"{float(est.eigenvalues[0]):.5g}",
                         "lambda_min": f"{float(est.eigenvalues[-1]):.5g}",
                         "condition": f"{cond:.4g}"})
        ax.set_title(f"layer 3 FFN down-proj inputs: n = {m.n} tokens, k = {m.k}", fontsize=10)
        ax.set_xlabel("eigenvalue index")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("eigenvalue (clamped at 1e-12)")
    fig.suptitle("all-MiniLM-L6-v2 on Rotten Tomatoes: covariance estimators' spectra")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "estimator_spectra.png", dpi=120)
    with open(RESULTS / "estimator_spectra.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(r)
    print(f"wrote {RESULTS / 'estimator_spectra.png'}")


if __name__ == "__main__":
    main()
