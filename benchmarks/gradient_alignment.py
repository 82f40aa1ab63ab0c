"""Why do the gradient-covariance inits not beat Kaiming?  Where the trained update lives.

Issue 12 (b): at their own tuned rates ``grad-whiten`` and ``kfac`` do not beat Kaiming on
the MiniLM tasks.  This script measures, per target layer, on the tasks' ``base`` settings
(``compare_inits.py``'s task, calibration, init and training code, imported):

1. **Where the trained update lives.**  Kaiming LoRA trained at the task's tuned rate gives
   ``ΔW_T = s·B_T·A_T`` (d, k).  For each init's *input* subspace (the row space of its A:
   ``grad-whiten``, ``kfac``, ``input-pca``, ``grad-svd``, Kaiming's own ``A_0``, random) the
   fraction of ``ΔW_T`` an adapter with A frozen in that subspace could express: plain
   (``‖ΔW_T·P‖²/‖ΔW_T‖²``) and in the data metric (``‖ΔW_T·M^½‖²`` = the update's effect on
   the layer's outputs over the calibration inputs, M = E[xxᵀ]; the best ``B·A`` with that
   row space, see :func:`captured_fraction`).  The same for the *output* subspace (the
   column space of B of the residual variants: the top-r left singular directions of
   ``G``, ``G·M^-½``, ``Σδ^-½·G·M^-½``; ``output-pca``'s B).  And the overlap
   ``‖P_init·P_T‖²_F / r`` (mean cos² of the principal angles) of A's row space with
   ``ΔW_T``'s.
2. **Does the step-0 gradient point where training goes?**  ``G_T`` recomputed on the
   trained model: overlaps of the top-r right singular subspaces of ``G_0``, ``G_T`` and
   ``ΔW_T``, the cosine between ``−G`` and ``ΔW_T``, and how stable ``G_0``'s top subspace is
   across the calibration folds (noise) and how much of ``‖G_0‖²`` its top r carry.
3. **The head hypothesis.**  The classifier head is freshly random at step 0, so
   ``G_0 = Σ δ·xᵀ`` back-propagates through a random head.  A *warm* head — multinomial
   logistic regression (L2 ``--head-l2``, L-BFGS, float64) on the frozen model's head inputs
   over one epoch of the training batches — gives ``G_warm``; the same overlaps for
   ``grad-whiten`` / ``kfac`` computed from it.  ``--warm-train`` also trains, at the same
   rate and seed, Kaiming and ``grad-whiten`` (from ``G_warm``) starting from the warm head
   (LP-then-LoRA): one seed, not evidence.

Writes ``benchmarks/results/gradient_alignment/<task>.csv`` (one row per layer and seed),
``<task>.json`` (the run's facts), and, from every task present, ``summary.md`` and
``alignment.png``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/gradient_alignment.py --task minilm-rt,minilm-bbc \\
        --threads 1
    python benchmarks/gradient_alignment.py --summary-only        # rewrite summary and figure
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_inits as ci
from _common import command_line, fmt_mean_std, load_average, machine, read_rows, write_rows
from _tasks import TaskData

import covinit
from covinit.adapters import find_adapters
from covinit.reporting.summaries import principal_angles

__all__ = [
    "INPUT_INITS",
    "OUTPUT_INITS",
    "captured_fraction",
    "fit_head",
    "kaiming_lr",
    "main",
    "orthonormal_basis",
    "psd_sqrt",
    "run_task",
    "subspace_overlap",
    "write_summary",
]

OUT = ci.RESULTS / "gradient_alignment"
#: Sides of every calibration here: output for ``output-pca``, gradient for G.
SIDES = ("input", "output", "gradient")
#: Inits whose A row space is compared (label -> compare_inits method).  The residual
#: variants with a fixed float scale give A *and* B (B's columns: the left singular
#: directions), and skip ``scale="matched"``, which changes the sizes, not the subspaces.
INPUT_INITS: dict[str, str] = {
    "grad-whiten": "grad-whiten@ledoit_wolf+residual+scale=1.0",
    "kfac": "kfac@ledoit_wolf+residual+scale=1.0",
    "grad-svd": "grad-svd@ledoit_wolf+residual+scale=1.0",
    "input-pca": "input-pca@empirical",
}
#: Inits whose B column space is compared: the residual gradient inits' B, and output-pca's.
OUTPUT_INITS: dict[str, str] = {
    "grad-whiten": INPUT_INITS["grad-whiten"],
    "kfac": INPUT_INITS["kfac"],
    "grad-svd": INPUT_INITS["grad-svd"],
    "output-pca": "output-pca@empirical",
}
#: Inits recomputed from the warm-head gradient (item 3).
WARM_INITS = ("grad-whiten", "kfac")
#: Random subspaces averaged per layer for the random baseline.
N_RANDOM = 16


# ---------------------------------------------------------------------------- linear algebra
def orthonormal_basis(span: Tensor, tol: float = 1e-10) -> Tensor:
    """Orthonormal basis (k, q) of the column space of ``span`` (k, m), q its numerical rank.

    Singular values below ``tol`` times the largest are dropped, so a rank-deficient
    update (a trained ``B`` with a zero column) gets the basis of what it spans.
    """
    u, sv, _ = torch.linalg.svd(span.to(torch.float64), full_matrices=False)
    if sv.numel() == 0 or not float(sv[0]) > 0.0:
        raise ValueError(f"orthonormal_basis: the span of shape {tuple(span.shape)} is zero")
    return u[:, sv > tol * sv[0]]


def psd_sqrt(m: Tensor) -> Tensor:
    """Symmetric square root (k, k) of a positive semi-definite ``m`` (k, k), float64
    (eigenvalues clamped at 0: rounding can make the smallest ones slightly negative)."""
    lam, vec = torch.linalg.eigh(m.to(torch.float64))
    return (vec * lam.clamp_min(0.0).sqrt()) @ vec.T


def captured_fraction(update: Tensor, basis: Tensor, side: str = "input",
                      metric_sqrt: Tensor | None = None) -> float:
    """The share of ``update``'s energy that a LoRA adapter confined to a subspace can express.

    ``side="input"``: ``basis`` (r, k) holds A's rows; the adapter's updates are ``B·basis``
    for any B.  The best one in the data metric, ``min_B ‖(ΔW − B·A)·M^½‖_F``, projects the
    whitened update ``ΔW·M^½`` onto the row space of ``A·M^½``, so the captured share is::

        ‖ΔW·M^½·P_{A·M^½}‖²_F / ‖ΔW·M^½‖²_F       (M^½ = identity: plain ‖ΔW·P_A‖²/‖ΔW‖²)

    ``side="output"``: ``basis`` (d, r) holds B's columns; updates ``basis·A`` for any A,
    captured ``‖P_B·ΔW·M^½‖² / ‖ΔW·M^½‖²``.

    Parameters
    ----------
    update : Tensor, shape (d, k)
    basis : Tensor, shape (r, k) for ``side="input"``, (d, r) for ``side="output"``
    side : {"input", "output"}
    metric_sqrt : Tensor, shape (k, k), optional
        ``M^½`` of the input second moment (:func:`psd_sqrt`); ``None``: the plain metric.

    Returns
    -------
    float
        In [0, 1]: 1 when the update lies in the subspace, ``r/k`` in expectation for a
        random subspace in the plain metric.

    Raises
    ------
    ValueError
        On a side other than ``"input"``/``"output"``, mismatched shapes, or a zero update.
    """
    d, k = update.shape
    w = update.to(torch.float64)
    if metric_sqrt is not None:
        if tuple(metric_sqrt.shape) != (k, k):
            raise ValueError(f"metric_sqrt must be (k, k) = ({k}, {k}), got "
                             f"{tuple(metric_sqrt.shape)}")
        w = w @ metric_sqrt.to(torch.float64)  # (d, k): the update's effect on the data
    total = float(w.pow(2).sum())
    if not total > 0.0:
        raise ValueError(f"captured_fraction: the update of shape {(d, k)} is zero")
    if side == "input":
        if basis.ndim != 2 or basis.shape[1] != k:
            raise ValueError(f"an input-side basis must be (r, k={k}), got {tuple(basis.shape)}")
        rows = basis.to(torch.float64)
        if metric_sqrt is not None:
            rows = rows @ metric_sqrt.to(torch.float64)  # (r, k): A·M^½
        q = orthonormal_basis(rows.T)  # (k, q)
        kept = float((w @ q).pow(2).sum())
    elif side == "output":
        if basis.ndim != 2 or basis.shape[0] != d:
            raise ValueError(f"an output-side basis must be (d={d}, r), got "
                             f"{tuple(basis.shape)}")
        q = orthonormal_basis(basis)  # (d, q)
        kept = float((q.T @ w).pow(2).sum())
    else:
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    return min(1.0, kept / total)


def subspace_overlap(u: Tensor, v: Tensor) -> float:
    """``‖Q_uᵀ·Q_v‖²_F / min(r, s)``: the mean cos² of the principal angles between
    ``span(u)`` (k, r) and ``span(v)`` (k, s); 1 for the same subspace, ``max(r, s)/k`` in
    expectation against a random one."""
    cos = torch.cos(principal_angles(u, v))
    return float(cos.pow(2).mean())


def _mean_angle_deg(u: Tensor, v: Tensor) -> float:
    return float(torch.rad2deg(principal_angles(u, v)).mean())


def _top_right(m: Tensor, r: int) -> Tensor:
    """Top-``r`` right singular vectors (k, r) of ``m`` (d, k)."""
    return torch.linalg.svd(m.to(torch.float64), full_matrices=False)[2][:r].T


def _top_left(m: Tensor, r: int) -> Tensor:
    """Top-``r`` left singular vectors (d, r) of ``m`` (d, k)."""
    return torch.linalg.svd(m.to(torch.float64), full_matrices=False)[0][:, :r]


def _cos(a: Tensor, b: Tensor) -> float:
    """Frobenius cosine of two matrices of one shape."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


# ---------------------------------------------------------------------------- model pieces
def lora_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, float]]:
    """``{layer: (A (r, k), B (d, r), scaling)}`` of every adapter, float64 copies."""
    out = {}
    for name, adapter in find_adapters(model).items():
        a, b = adapter.get_lora()
        out[name] = (a.detach().to(torch.float64).clone(), b.detach().to(torch.float64).clone(),
                     float(adapter.scaling))
    return out


def init_factors(label: str, data: TaskData, s: dict[str, Any], seed: int,
                 calibration: Any) -> dict[str, tuple[Tensor, Tensor, float]]:
    """The factors ``compare_inits``' init of ``label`` writes (one fresh LoRA model)."""
    model, _, note = ci.prepare_covinit(ci.parse_method(label), data, s, seed, calibration)
    if "fallback" in note:  # a subspace that is Kaiming's would be mislabelled
        raise RuntimeError(f"{label}: {note}")
    return lora_factors(model)


def calibrate(model: nn.Module, data: TaskData, s: dict[str, Any],
              sides: Sequence[str] = SIDES) -> Any:
    """``covinit.calibrate`` as ``compare_inits`` runs it (same batches, targets, folds);
    on a LoRA model statistics only (``init=False``): ``G`` of the model as it is."""
    options: dict[str, Any] = {"init": False} if find_adapters(model) else {}
    return covinit.calibrate(model, data.calibration, targets=s["targets"], sides=sides,
                             folds=s["folds"], show_progress=False, **options)


@contextlib.contextmanager
def path_gradient(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Accumulate ``Σ_steps ∂L/∂W = Σ δ·xᵀ`` (d, k) of every adapted layer's base weight
    over each backward pass inside the block (the training run): where the loss pulled the
    full weight along the trajectory, whatever subspace LoRA's A confines the update to.

    Forward hooks on the adapted modules register a gradient hook on their output, so only
    passes with gradients count (evaluation under ``no_grad`` does not); hooks are removed
    on exit, also on errors.  Yields ``{layer: G_path}``, float64, filled as training runs.
    """
    acc: dict[str, Tensor] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def forward(_module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if not output.requires_grad:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)  # (n, k)

            def backward(grad: Tensor) -> None:
                delta = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64)  # (n, d)
                g = delta.T @ x  # (d, k)
                acc[name] = acc[name] + g if name in acc else g
            output.register_hook(backward)
        return forward

    try:
        for name, adapter in find_adapters(model).items():
            handles.append(adapter.module.register_forward_hook(hook(name)))
        yield acc
    finally:
        for h in handles:
            h.remove()


def head_module(data: TaskData, model: nn.Module) -> nn.Linear:
    """The task's single fresh ``nn.Linear`` head (``ValueError`` otherwise)."""
    if len(data.head) != 1 or not isinstance(model.get_submodule(data.head[0]), nn.Linear):
        raise ValueError(f"the warm head needs one nn.Linear head module; task head: "
                         f"{data.head}")
    return model.get_submodule(data.head[0])


@torch.no_grad()
def head_features(data: TaskData, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs of the head (n, h) and labels (n,) over one epoch of ``seed``'s training
    batches, the frozen base model in eval mode (no dropout), float64."""
    model = data.fresh_model(seed)
    feats: list[Tensor] = []
    handle = head_module(data, model).register_forward_pre_hook(
        lambda _m, args: feats.append(args[0].detach().to(torch.float64)))
    labels = []
    try:
        for batch in data.train_loader(seed):
            model(**batch)
            labels.append(batch["labels"])
    finally:
        handle.remove()
    return torch.cat(feats), torch.cat(labels)


def fit_head(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-3,
             max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression: ``min mean CE(x·Wᵀ + b, y) + ½·l2·‖W‖²_F``.

    Parameters
    ----------
    x : Tensor, shape (n, h)
    y : Tensor, shape (n,), int64 in ``[0, n_classes)``
    n_classes : int
    l2 : float, default=1e-3
        Keeps the weights finite where the classes separate.
    max_iter : int, default=500
        L-BFGS iterations (strong Wolfe line search), from W = 0, b = 0.

    Returns
    -------
    weight : Tensor, shape (n_classes, h), float64
    bias : Tensor, shape (n_classes,), float64
    """
    x = x.to(torch.float64)
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (nn.functional.cross_entropy(x @ weight.T + bias, y)
                + 0.5 * l2 * weight.pow(2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def warm_task(data: TaskData, weight: Tensor, bias: Tensor) -> TaskData:
    """``data`` whose fresh models carry the fitted head (same for every seed)."""
    def set_head(model: nn.Module, seed: int) -> None:
        head = head_module(data, model)
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight.dtype))
            head.bias.copy_(bias.to(head.bias.dtype))
    return dataclasses.replace(data, reseed_head=set_head)


def kaiming_lr(task: str, s: dict[str, Any]) -> float:
    """Kaiming's tuned rate from ``benchmarks/results/<task>-base/runs.csv``
    (:func:`compare_inits.select_lr` over the sweep seeds, rows of this configuration)."""
    path = ci.RESULTS / f"{task}-base" / "runs.csv"
    cfg = ci.config_id(task, s)
    rows = [r for r in read_rows(path) if r["config"] == cfg and r["method"] == "kaiming"]
    lr = ci.select_lr(rows, ci.sweep_seeds_of(s))
    if lr is None:
        raise ValueError(f"no Kaiming runs of configuration {cfg} in {path}: pass --lr")
    return lr


# ---------------------------------------------------------------------------- measurement
def _warm_head(data: TaskData, s: dict[str, Any], seed: int, head_l2: float,
               facts: dict[str, Any], log: Callable[[str], None]
               ) -> tuple[TaskData, covinit.Calibration, dict[str, Any]]:
    """Item 3: the task with a head fitted on frozen features, its step-0 calibration and
    the gradient inits from it; the head's fit goes into ``facts``."""
    x, y = head_features(data, seed)
    n_classes = head_module(data, data.base).out_features
    weight, bias = fit_head(x, y, n_classes, head_l2)
    facts["warm_head_train_acc"] = float(((x @ weight.T + bias).argmax(1) == y).double().mean())
    warm_data = warm_task(data, weight, bias)
    facts["warm_head_val_loss"] = warm_data.evaluate(warm_data.fresh_model(seed),
                                                     data.validation)[0]
    facts["random_head_val_loss"] = data.evaluate(data.fresh_model(seed), data.validation)[0]
    cal_w = calibrate(warm_data.fresh_model(seed), warm_data, s)
    warm = {INPUT_INITS[t]: init_factors(INPUT_INITS[t], warm_data, s, seed, cal_w)
            for t in WARM_INITS}
    log(f"warm head: train acc {facts['warm_head_train_acc']:.3f}, val loss "
        f"{facts['warm_head_val_loss']:.4f} (random head {facts['random_head_val_loss']:.4f})")
    return warm_data, cal_w, warm


def _layer_metrics(name: str, dw: Tensor, m_sqrt: Tensor, rank: int,
                   a0: Tensor, inits: Mapping[str, tuple[Tensor, Tensor, float]],
                   g0: Tensor, gt: Tensor, gpath: Tensor, g0_folds: Sequence[Tensor] | None,
                   gw: Tensor | None, warm: Mapping[str, tuple[Tensor, Tensor, float]],
                   gen: torch.Generator) -> dict[str, float]:
    """Every per-layer figure (module docstring) for one layer; ``inits[label] = (A, B, s)``
    of that layer."""
    d, k = dw.shape
    row: dict[str, float] = {"d": d, "k": k, "norm_dw": float(dw.norm()),
                             "norm_dw_data": float((dw @ m_sqrt).norm())}
    dw_rows = _top_right(dw, rank)  # (k, r): ΔW_T's row space (rank ≤ r)
    dw_cols = _top_left(dw, rank)  # (d, r)

    path_rows = _top_right(gpath, rank)  # (k, r): where the loss pulled W along the run

    def input_side(tag: str, a: Tensor) -> None:
        row[f"in_plain_{tag}"] = captured_fraction(dw, a, "input")
        row[f"in_data_{tag}"] = captured_fraction(dw, a, "input", m_sqrt)
        row[f"in_overlap_{tag}"] = subspace_overlap(a.T, dw_rows)
        row[f"in_angle_{tag}"] = _mean_angle_deg(a.T, dw_rows)
        row[f"in_path_{tag}"] = subspace_overlap(a.T, path_rows)
        row[f"in_pathcap_{tag}"] = captured_fraction(gpath, a, "input")

    def output_side(tag: str, b: Tensor) -> None:
        row[f"out_plain_{tag}"] = captured_fraction(dw, b, "output")
        row[f"out_data_{tag}"] = captured_fraction(dw, b, "output", m_sqrt)
        row[f"out_overlap_{tag}"] = subspace_overlap(b, dw_cols)

    for tag, label in INPUT_INITS.items():
        input_side(tag, inits[label][0])
    input_side("kaiming-A0", a0)
    for tag, label in OUTPUT_INITS.items():
        output_side(tag, inits[label][1])
    # Random r-dim subspaces: the plain capture is r/k in expectation, the data one is not.
    rand_in = [torch.randn(rank, k, generator=gen, dtype=torch.float64) for _ in range(N_RANDOM)]
    rand_out = [torch.randn(d, rank, generator=gen, dtype=torch.float64) for _ in range(N_RANDOM)]
    for key, vals in {
        "in_plain_random": [captured_fraction(dw, a, "input") for a in rand_in],
        "in_data_random": [captured_fraction(dw, a, "input", m_sqrt) for a in rand_in],
        "in_overlap_random": [subspace_overlap(a.T, dw_rows) for a in rand_in],
        "in_angle_random": [_mean_angle_deg(a.T, dw_rows) for a in rand_in],
        "in_path_random": [subspace_overlap(a.T, path_rows) for a in rand_in],
        "in_pathcap_random": [captured_fraction(gpath, a, "input") for a in rand_in],
        "out_plain_random": [captured_fraction(dw, b, "output") for b in rand_out],
        "out_data_random": [captured_fraction(dw, b, "output", m_sqrt) for b in rand_out],
        "out_overlap_random": [subspace_overlap(b, dw_cols) for b in rand_out],
    }.items():
        row[key] = sum(vals) / len(vals)
    row["r_over_k"] = rank / k
    # Item 2: the gradient at step 0 and at the end, against the update.
    v0, vt = _top_right(g0, rank), _top_right(gt, rank)
    sv0 = torch.linalg.svdvals(g0.to(torch.float64))
    row["g0_topr_energy"] = float(sv0[:rank].pow(2).sum() / sv0.pow(2).sum())
    row["g0_gT_overlap"] = subspace_overlap(v0, vt)
    row["g0_gT_left_overlap"] = subspace_overlap(_top_left(g0, rank), _top_left(gt, rank))
    row["g0_dw_overlap"] = subspace_overlap(v0, dw_rows)
    row["gT_dw_overlap"] = subspace_overlap(vt, dw_rows)
    row["cos_negg0_dw"] = _cos(-g0, dw)
    row["path_dw_overlap"] = subspace_overlap(path_rows, dw_rows)
    row["g0_path_overlap"] = subspace_overlap(v0, path_rows)
    row["cos_g0_path"] = _cos(g0, gpath)
    row["cos_negpath_dw"] = _cos(-gpath, dw)
    row["cos_neggT_dw"] = _cos(-gt, dw)
    row["cos_g0_gT"] = _cos(g0, gt)
    if g0_folds:
        vf = [_top_right(g, rank) for g in g0_folds]
        pairs = [subspace_overlap(vf[i], vf[j])
                 for i in range(len(vf)) for j in range(i + 1, len(vf))]
        row["g0_fold_overlap"] = sum(pairs) / len(pairs)
    # Item 3: the warm-head gradient.
    if gw is not None:
        vw = _top_right(gw, rank)
        row["gwarm_dw_overlap"] = subspace_overlap(vw, dw_rows)
        row["gwarm_gT_overlap"] = subspace_overlap(vw, vt)
        row["gwarm_g0_overlap"] = subspace_overlap(vw, v0)
        row["cos_neggwarm_dw"] = _cos(-gw, dw)
        for tag in WARM_INITS:
            a, b, _ = warm[INPUT_INITS[tag]]
            input_side(f"{tag}-warm", a)
            output_side(f"{tag}-warm", b)
    return row


def run_task(task: str, seed: int, lr: float | None = None, head_l2: float = 1e-3,
             warm_train: bool = False, log: Callable[[str], None] = print
             ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure one task and seed; ``(rows per layer, facts)``.

    ``lr``: the training rate (default :func:`kaiming_lr`).  ``warm_train``: also the
    LP-then-LoRA runs of item 3 (two more trainings).
    """
    s = ci.settings_from(ci.build_parser().parse_args(["--task", task]))
    lr = kaiming_lr(task, s) if lr is None else float(lr)  # before s changes its config id
    # The validation curve is not needed here; evaluation runs without gradients or dropout
    # (eval mode), so fewer points leave the training trajectory unchanged.
    s["eval_points"] = 1
    t0 = time.perf_counter()
    facts: dict[str, Any] = {"task": task, "seed": seed, "lr": lr, "rank": s["rank"],
                             "alpha": s["alpha"], "steps": s["steps"],
                             "targets": list(s["targets"]), "head_l2": head_l2}
    data = ci.get_task(task).build(s)
    log(f"[{task}] {data.sizes}; Kaiming at lr {lr:g}, seed {seed}")

    # Step 0: the calibration compare_inits shares (random head of this seed), and the inits.
    cal0 = calibrate(data.fresh_model(seed), data, s)
    labels = dict.fromkeys([*INPUT_INITS.values(), *OUTPUT_INITS.values()])
    inits = {label: init_factors(label, data, s, seed, cal0) for label in labels}
    log(f"[{task}] step-0 calibration and inits: {time.perf_counter() - t0:.0f} s")

    # Kaiming, trained as compare_inits trains it.
    model, _, _ = ci.prepare_covinit(ci.parse_method("kaiming"), data, s, seed, None)
    a0 = {n: f[0] for n, f in lora_factors(model).items()}
    trained = copy.deepcopy(model)
    with path_gradient(trained) as g_path:
        result = ci.train(trained, data, s, seed, lr)
    facts["kaiming_final_val_loss"] = result["final_val_loss"]
    facts["kaiming_train_s"] = round(result["train_s"], 1)
    log(f"[{task}] Kaiming: val loss {result['step0_val_loss']:.4f} -> "
        f"{result['final_val_loss']:.4f} ({result['status']}, {result['train_s']:.0f} s)")
    final = lora_factors(trained)
    cal_t = calibrate(trained, data, s, sides=("input", "gradient"))

    # Item 3: a warm head on frozen features (a task with a fresh head; a causal LM's
    # output layer is pretrained, so its step-0 gradient has no random head to blame).
    warm_data, cal_w, warm = (_warm_head(data, s, seed, head_l2, facts, log) if data.head
                              else (None, None, {}))

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in cal0.layer_names:
        a_t, b_t, scaling = final[name]
        dw = scaling * b_t @ a_t  # (d, k); B_0 = 0, so this is the whole update
        m_sqrt = psd_sqrt(cal0.moments(name, "input").second_moment())
        metrics = _layer_metrics(
            name, dw, m_sqrt, s["rank"], a0[name],
            {label: f[name] for label, f in inits.items()},
            cal0.gradient(name), cal_t.gradient(name), g_path[name], cal0.gradient_folds(name),
            None if cal_w is None else cal_w.gradient(name),
            {label: f[name] for label, f in warm.items()}, gen)
        rows.append({"task": task, "seed": seed, "lr": lr, "layer": name, **metrics})

    if warm_train and warm_data is not None:
        facts["measure_s"] = round(time.perf_counter() - t0, 1)
        for label, method, cal in (("kaiming", "kaiming", None),
                                   ("grad-whiten", "grad-whiten@ledoit_wolf", cal_w)):
            m, _, _ = ci.prepare_covinit(ci.parse_method(method), warm_data, s, seed, cal, lr)
            res = ci.train(m, warm_data, s, seed, lr)
            facts[f"warm_{label}_final_val_loss"] = res["final_val_loss"]
            log(f"[{task}] warm head + {method}: val loss {res['step0_val_loss']:.4f} -> "
                f"{res['final_val_loss']:.4f} ({res['train_s']:.0f} s)")
    facts["wall_s"] = round(time.perf_counter() - t0, 1)
    return rows, facts


# ---------------------------------------------------------------------------- summary
#: Input-side columns of the summary: (key prefix, header).
IN_COLUMNS = [
    ("in_data", "ΔW_T captured, data metric ‖·M^½‖²"),
    ("in_plain", "ΔW_T captured, plain"),
    ("in_overlap", "overlap with ΔW_T's row space"),
    ("in_angle", "mean principal angle to ΔW_T's (°)"),
    ("in_path", "overlap with ΣG_t's top-r row space"),
    ("in_pathcap", "ΣG_t captured, plain"),
]
#: Output-side columns.
OUT_COLUMNS = [
    ("out_data", "ΔW_T captured, data metric"),
    ("out_plain", "ΔW_T captured, plain"),
    ("out_overlap", "overlap with ΔW_T's column space"),
]
#: Gradient figures (items 2 and 3): (key, what it is).
ITEM2 = [
    ("g0_topr_energy", "share of ‖G_0‖²_F in its top r singular values"),
    ("g0_fold_overlap", "G_0's top-r right subspace, mean overlap between the 4 calibration "
     "folds"),
    ("g0_gT_overlap", "top-r right subspaces of G_0 and G_T (end of training)"),
    ("g0_gT_left_overlap", "top-r left subspaces of G_0 and G_T"),
    ("cos_g0_gT", "cosine of G_0 and G_T (Frobenius)"),
    ("g0_path_overlap", "G_0 vs ΣG_t (the gradient summed over the training steps), "
     "top-r right subspaces"),
    ("cos_g0_path", "cosine of G_0 and ΣG_t"),
    ("g0_dw_overlap", "G_0's top-r right subspace vs ΔW_T's row space"),
    ("gT_dw_overlap", "G_T's top-r right subspace vs ΔW_T's row space"),
    ("path_dw_overlap", "ΣG_t's top-r right subspace vs ΔW_T's row space"),
    ("cos_negg0_dw", "cosine of −G_0 and ΔW_T"),
    ("cos_neggT_dw", "cosine of −G_T and ΔW_T"),
    ("cos_negpath_dw", "cosine of −ΣG_t and ΔW_T"),
    ("gwarm_g0_overlap", "warm-head G vs G_0, top-r right subspaces"),
    ("gwarm_gT_overlap", "warm-head G vs G_T, top-r right subspaces"),
    ("gwarm_dw_overlap", "warm-head G's top-r right subspace vs ΔW_T's row space"),
    ("cos_neggwarm_dw", "cosine of −G_warm and ΔW_T"),
]
TAGS_IN = ["grad-whiten", "kfac", "grad-svd", "input-pca", "kaiming-A0", "random",
           "grad-whiten-warm", "kfac-warm"]
TAGS_OUT = ["grad-whiten", "kfac", "grad-svd", "output-pca", "random", "grad-whiten-warm",
            "kfac-warm"]


def _values(rows: list[dict[str, str]], key: str) -> list[float]:
    vals = [float(r[key]) for r in rows if r.get(key, "") not in ("", None)]
    return [v for v in vals if math.isfinite(v)]


def _cell(rows: list[dict[str, str]], key: str, digits: int = 3) -> str:
    return fmt_mean_std(_values(rows, key), digits)


def _load(out: Path) -> dict[str, tuple[list[dict[str, str]], dict[str, Any]]]:
    """``{task: (rows, facts)}`` of every task written to ``out``."""
    found = {}
    for csv_path in sorted(out.glob("*.csv")):
        meta = csv_path.with_suffix(".json")
        facts = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
        found[csv_path.stem] = (read_rows(csv_path), facts)
    return found


def write_summary(out: Path) -> Path:
    """``summary.md`` and ``alignment.png`` from every ``<task>.csv`` / ``.json`` in ``out``."""
    found = _load(out)
    tasks = list(found)
    lines = ["# Where does the trained LoRA update live? (issue 12 (b): the \"why\")", "",
             "Kaiming LoRA trained at the task's tuned rate (compare_inits `base` settings, "
             "each task's rank, steps and target layers below); "
             "ΔW_T = s·B_T·A_T per layer.  Each figure: mean ± std over the layers (and "
             "seeds).  M = E[xxᵀ] of the layer's inputs on the step-0 calibration; the data "
             "metric weighs an update by its effect on the layer's outputs, ‖ΔW·M^½‖.  "
             "`random`: the mean over 16 random r-dim subspaces per layer (plain capture "
             "r/k in expectation); `kaiming-A0`: the row space Kaiming's A started in; "
             "`-warm`: computed from the gradient through a warm head (logistic regression "
             "on frozen features) instead of the random step-0 head.", ""]
    for task in tasks:
        rows, f = found[task]
        seeds = sorted({r["seed"] for r in rows})
        lines += [f"## {task}", "",
                  f"- Command: `{f.get('command', '?')}`",
                  f"- Machine: {f.get('machine', '?')}; load average at start "
                  f"{f.get('load_start', '?')}, at end {f.get('load_end', '?')} (2 cores "
                  "shared with two benchmark processes: seconds are inflated)",
                  f"- Wall time: {f.get('wall_s', '?')} s"
                  + (f" ({f['measure_s']} s measuring, the rest the LP-then-LoRA runs)"
                     if "measure_s" in f else "") + f"; seeds {', '.join(seeds)}; "
                  f"lr {f.get('lr', '?')} (Kaiming's tuned rate), {len(rows)} layer rows; "
                  f"rank {f.get('rank', '?')}, α {f.get('alpha', '?')}, {f.get('steps', '?')} "
                  f"steps, targets {', '.join(f.get('targets', []))}; r/k = "
                  f"{_cell(rows, 'r_over_k', 4)}",
                  f"- Kaiming final validation loss here: "
                  f"{_fmt(f.get('kaiming_final_val_loss'))} (train {f.get('kaiming_train_s')}"
                  " s)." + (f"  Warm head (L2 {f.get('head_l2')}): train accuracy "
                            f"{_fmt(f.get('warm_head_train_acc'))}, validation loss of the "
                            f"frozen model with it {_fmt(f.get('warm_head_val_loss'))} "
                            f"(random head {_fmt(f.get('random_head_val_loss'))})"
                            if "warm_head_train_acc" in f else
                            "  No fresh head (a causal LM): no warm-head figures."), ""]
        if "warm_kaiming_final_val_loss" in f:
            lines += [f"- LP-then-LoRA (one seed, **not evidence**): from the warm head at lr "
                      f"{f.get('lr')}, Kaiming {_fmt(f['warm_kaiming_final_val_loss'])}, "
                      f"grad-whiten (warm-head G) "
                      f"{_fmt(f['warm_grad-whiten_final_val_loss'])} final validation loss "
                      f"(Kaiming from the random head: "
                      f"{_fmt(f.get('kaiming_final_val_loss'))})", ""]
        lines += ["Input side: the row space of A (r × k) each init starts in.", "",
                  "| init | " + " | ".join(h for _, h in IN_COLUMNS) + " |",
                  "|---|" + "---|" * len(IN_COLUMNS)]
        for tag in TAGS_IN:
            lines.append(f"| `{tag}` | " + " | ".join(
                _cell(rows, f"{key}_{tag}", 1 if key == "in_angle" else 3)
                for key, _ in IN_COLUMNS) + " |")
        lines += ["", "Output side: the column space of B (d × r) of the residual variants "
                  "(top-r left singular directions of G, G·M^-½, Σδ^-½·G·M^-½) and of "
                  "`output-pca`.", "",
                  "| init | " + " | ".join(h for _, h in OUT_COLUMNS) + " |",
                  "|---|" + "---|" * len(OUT_COLUMNS)]
        for tag in TAGS_OUT:
            lines.append(f"| `{tag}` | " + " | ".join(
                _cell(rows, f"{key}_{tag}") for key, _ in OUT_COLUMNS) + " |")
        lines += ["", "| gradient figure | mean ± std over layers |", "|---|---|"]
        lines += [f"| `{key}`: {what} | {_cell(rows, key)} |" for key, what in ITEM2]
        lines.append("")
    lines += ["## How to read it", "",
              "- A capture near `random` means the init starts LoRA in a subspace no closer "
              "to where the trained update lies than chance; near `kaiming-A0` means it is "
              "as close as Kaiming's own random start (whose A moves with training).",
              "- Kaiming's A rotates little over the run (`kaiming-A0` overlap with ΔW_T's "
              "row space), so ΔW_T's row space partly records where Kaiming *started*; "
              "ΣG_t (the full weight's gradient summed over the training steps, hooked "
              "during the same run) is not confined to A's row space: its columns are the "
              "less biased target.",
              "- The data metric weighs input directions by their variance; `grad-whiten` / "
              "`kfac` rows are M^-½-weighted (low-variance directions amplified), which is "
              "why they can fall below `random` there while being above it in the plain "
              "metric.",
              "- `g0_fold_overlap` low: G_0's top directions are calibration noise; "
              "`g0_gT_overlap` low: the gradient turns during training, so the step-0 "
              "direction cannot say where training ends up.", ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    if tasks:
        _plot(found, out / "alignment.png")
    return path


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "–"


def _plot(found: Mapping[str, tuple[list[dict[str, str]], dict[str, Any]]],
          path: Path) -> None:
    """Captured share (data metric) per init, input and output side, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(found)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for col, task in enumerate(tasks):
        rows = found[task][0]
        for row_i, (prefix, tags) in enumerate((("in_data", TAGS_IN), ("out_data", TAGS_OUT))):
            ax = axes[row_i][col]
            means, stds, names = [], [], []
            for t in tags:
                vals = _values(rows, f"{prefix}_{t}")
                if vals:
                    m = sum(vals) / len(vals)
                    sd = (sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5
                    means.append(m), stds.append(sd), names.append(t)
            colors = ["tab:gray" if n == "random" else "tab:blue" if n == "kaiming-A0"
                      else "tab:orange" if n.endswith("-warm") else "tab:green" for n in names]
            ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
            ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            side = "A row space (input)" if prefix == "in_data" else "B column space (output)"
            ax.set_title(f"{task}: share of ‖ΔW_T·M^½‖² in the init's {side}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="minilm-rt,minilm-bbc",
                   help="comma-separated tasks of benchmarks/_tasks.py")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--lr", type=float, default=None,
                   help="training rate (default: Kaiming's tuned rate from "
                        "benchmarks/results/<task>-base/runs.csv)")
    p.add_argument("--head-l2", type=float, default=1e-3,
                   help="L2 penalty of the warm head's logistic regression")
    p.add_argument("--warm-train", action="store_true",
                   help="also train Kaiming and grad-whiten from the warm head (one seed each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(OUT), help="results folder")
    p.add_argument("--summary-only", action="store_true",
                   help="rewrite summary.md and the figure from the CSVs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if not args.summary_only:
        given = sys.argv[1:] if argv is None else argv
        command = command_line(["benchmarks/gradient_alignment.py", *given])
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        for task in [t.strip() for t in args.task.split(",") if t.strip()]:
            start, load_start = time.perf_counter(), load_average()
            rows, facts = [], {}
            for seed in seeds:
                task_rows, task_facts = run_task(task, seed, args.lr, args.head_l2,
                                                 args.warm_train and seed == seeds[0])
                rows += task_rows
                facts = {**task_facts, **facts}  # the first seed's facts
            facts.update({"command": command, "machine": machine(), "load_start": load_start,
                          "load_end": load_average(),
                          "wall_s": round(time.perf_counter() - start, 1)})
            fields = list(dict.fromkeys(k for r in rows for k in r))
            write_rows(out / f"{task}.csv", rows, fields)
            (out / f"{task}.json").write_text(json.dumps(facts, indent=1), encoding="utf-8")
    path = write_summary(out)
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
