"""Does covariance-informed LoRA init win?  Every strategy, same model, data, rank and steps.

For one task (``benchmarks/_tasks.py``: ``minilm-rt``, ``smollm2-hamlet``, ``tiny``) it
trains LoRA from each init — every covinit strategy with the covariance estimators that
matter for it, and PEFT's own inits run through PEFT (``init_lora_weights=True``,
``"gaussian"``, ``"pissa"``, ``"olora"``, EVA, CorDA IPM/KPM, LoRA-GA) — under identical
conditions, and writes ``benchmarks/results/<task>/``:

``runs.csv``
    every run (method × learning rate × seed): calibration and init seconds, the base
    model's and the step-0 validation loss, the validation curve, per-step training loss,
    final validation and test loss/metric.  Finished runs are skipped on the next call,
    so an interrupted run resumes.
``summary.md``
    the table (learning rate chosen on validation, test reported at it, mean ± std over
    seeds), the issue's targets met or not, the exact command, machine and load average.
``learning_curves.png``
    validation loss (and smoothed training loss) per method, mean ± std band over seeds.

Fairness: one base model, one calibration set (the first training examples) for every
data-driven init, the same rank, α, targets, steps, batches in the same order and dropout
masks for a seed.  Learning rates are swept per method on the first seed (a grid that grows
by one step past an edge where a method's best rate lies); the other seeds run at the chosen
rate (``--sweep-all-seeds`` sweeps every seed).  Calibration seconds
(covinit's shared pass, or PEFT's own pre-processing) are reported apart from training.

Usage::

    python benchmarks/compare_inits.py --task minilm-rt --quick      # < 5 min on 2 cores
    python benchmarks/compare_inits.py --task minilm-rt              # full, resumable
    python benchmarks/compare_inits.py --task smollm2-hamlet --strategies kaiming,peft:eva
    python benchmarks/compare_inits.py --list                        # tasks and methods

Methods are ``STRATEGY`` or ``STRATEGY@ESTIMATOR`` (covinit) and ``peft:INIT`` with INIT in
``true, gaussian, pissa, olora, eva, corda-ipm, corda-kpm, lora_ga``; ``--strategies full``
(every covinit strategy × its estimators, then PEFT's, in :data:`PRIORITY` order), ``lean``
(without covinit's duplicates of PEFT's gaussian/pissa), ``core`` (one estimator per covinit
strategy, every PEFT init but gaussian: for tasks too costly for ``lean``) or ``quick``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    append_row,
    command_line,
    fmt_mean_std,
    load_average,
    machine,
    mean_std,
    read_rows,
)
from _tasks import TASKS, TaskData, get_task

import covinit
from covinit.strategies import get_strategy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: PEFT inits: name -> (what it does to the model at step 0, one line).
PEFT_INITS: dict[str, tuple[str, str]] = {
    "true": ("zero-delta", "init_lora_weights=True (Kaiming-uniform A, B = 0)"),
    "gaussian": ("zero-delta", "init_lora_weights='gaussian'"),
    "pissa": ("function", "init_lora_weights='pissa' (SVD of W0, residual base)"),
    "olora": ("function", "init_lora_weights='olora' (QR of W0, residual base)"),
    "eva": ("zero-delta", "EVA: initialize_lora_eva_weights, rho=1 (uniform rank)"),
    "corda-ipm": ("function", "CorDA instruction-previewed mode (preprocess_corda, batch 1)"),
    "corda-kpm": ("function", "CorDA knowledge-preserved mode (preprocess_corda, batch 1)"),
    "lora_ga": ("function", "LoRA-GA (preprocess_loraga on the calibration batches)"),
}
#: PEFT inits that run over the calibration data (their seconds are calibration seconds).
PEFT_DATA_PASS = ("eva", "corda-ipm", "corda-kpm", "lora_ga")
#: The PEFT inits that use data: the issue's comparison set for target 2 (and PiSSA).
PEFT_DATA_DRIVEN = ("peft:eva", "peft:corda-ipm", "peft:corda-kpm", "peft:pissa")
#: Strategies whose factors are eigenvectors only: shrinkage towards μI does not change them
#: (empirical = ledoit_wolf = oas), so they are compared as empirical vs spatpca.
PCA_TYPE = {"input-pca", "output-pca"}
#: Run order of the full list: the learning-rate sweep goes method by method, so a partial
#: run (the full one takes hours on a loaded 2-core machine) compares the reference, the
#: main covinit strategies and the PEFT data-driven inits first.
PRIORITY = ["kaiming", "peft:true", "input-pca@empirical", "cov-svd@ledoit_wolf", "peft:eva",
            "peft:corda-ipm", "peft:pissa", "input-whiten@ledoit_wolf", "input-pca@spatpca",
            "two-sided@ledoit_wolf", "peft:corda-kpm", "peft:lora_ga", "peft:olora",
            "cov-svd@empirical", "input-whiten@empirical", "output-pca@empirical",
            "output-pca@spatpca", "two-sided@empirical", "cov-minor@ledoit_wolf",
            "cov-minor@empirical", "gaussian", "peft:gaussian", "pissa"]
QUICK_METHODS = ["kaiming", "input-pca@empirical", "cov-svd@ledoit_wolf", "peft:pissa",
                 "peft:corda-ipm"]
FRACTIONS = (0.25, 0.5, 1.0)

FIELDS = [
    "task", "config", "method", "family", "strategy", "estimator", "preserves", "seed", "lr",
    "steps", "status", "note", "calib_s", "init_s", "train_s", "base_val_loss",
    "step0_val_loss", "final_val_loss", "final_val_metric", "test_loss", "test_metric",
    "curve_steps", "curve_val_loss", "curve_val_metric", "train_loss", "finished",
]
#: Settings that change what a run measures; runs.csv rows are reused only on a match.
CONFIG_KEYS = ("targets", "rank", "alpha", "steps", "batch_size", "max_length", "n_train",
               "n_val", "n_test", "n_calib", "calib_batch_size", "folds", "eval_points",
               "eva_max_passes")


# ---------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One init to compare.

    Attributes
    ----------
    label : str
        ``"cov-svd@ledoit_wolf"``, ``"kaiming"``, ``"peft:eva"``.
    family : {"covinit", "peft"}
    name : str
        covinit strategy name, or PEFT init (a key of :data:`PEFT_INITS`).
    estimator : str
        Covariance estimator ("" when the init uses no calibration statistics).
    preserves : str
        ``"zero-delta"`` (ΔW = 0), ``"function"`` (residual base, same outputs) or
        ``"changes"``: the contract the step-0 loss is checked against.
    """

    label: str
    family: str
    name: str
    estimator: str
    preserves: str

    @property
    def needs_calibration(self) -> bool:
        return self.family == "covinit" and bool(get_strategy(self.name).tags.get("needs"))


def parse_method(label: str) -> Method:
    """A :class:`Method` from its label (``ValueError`` listing what is allowed)."""
    label = label.strip()
    if label.startswith("peft:"):
        name = label[5:]
        if name not in PEFT_INITS:
            raise ValueError(f"unknown PEFT init {name!r} in {label!r}; allowed: "
                             f"{', '.join('peft:' + n for n in PEFT_INITS)}")
        return Method(label, "peft", name, "", PEFT_INITS[name][0])
    name, _, est = label.partition("@")
    entry = get_strategy(name)  # ValueError with the valid names
    needs = bool(entry.tags.get("needs"))
    if needs:
        est = est or "ledoit_wolf"
        if est not in covinit.estimators():
            raise ValueError(f"unknown estimator {est!r} in {label!r}; allowed: "
                             f"{', '.join(covinit.estimators())}")
    elif est:
        raise ValueError(f"strategy {name!r} uses no calibration, so {label!r} takes no "
                         "@estimator")
    return Method(f"{name}@{est}" if needs else name, "covinit", name, est if needs else "",
                  str(entry.tags.get("preserves", "changes")))


def full_methods() -> list[str]:
    """Every covinit strategy (the ``zero`` control left out) × its estimators, then PEFT's.

    Data-free strategies run once; PCA-type ones with ``empirical`` and ``spatpca``; the
    others (whitening, ``Σ^{±1/2}``: where shrinkage acts) with ``empirical`` and
    ``ledoit_wolf``.
    """
    labels = []
    for name in covinit.strategies():
        # quant-* replace the base by a quantized one: compared in benchmarks/quant_init.py.
        if name == "zero" or get_strategy(name).tags.get("preserves") == "approximate":
            continue
        if not get_strategy(name).tags.get("needs"):
            labels.append(name)
        elif name in PCA_TYPE:
            labels += [f"{name}@empirical", f"{name}@spatpca"]
        else:
            labels += [f"{name}@empirical", f"{name}@ledoit_wolf"]
    labels += [f"peft:{n}" for n in PEFT_INITS]
    rank = {label: i for i, label in enumerate(PRIORITY)}
    return sorted(labels, key=lambda m: rank.get(m, len(PRIORITY)))  # stable: new ones last


def lean_methods() -> list[str]:
    """:func:`full_methods` without covinit's ``gaussian`` and ``pissa``: the same algorithms
    as ``peft:gaussian`` / ``peft:pissa`` (the tests check ``pissa`` matches PEFT's run for
    run), so a costly task runs them once, through PEFT."""
    return [m for m in full_methods() if m not in ("gaussian", "pissa")]


def core_methods() -> list[str]:
    """:func:`lean_methods` with one estimator per covinit strategy — ``empirical`` for the
    PCA-type ones, ``ledoit_wolf`` where shrinkage acts — and without ``peft:gaussian``:
    every algorithm once, for a task where each run costs minutes."""
    def keep(label: str) -> bool:
        name, _, est = label.partition("@")
        return not est or est == ("empirical" if name in PCA_TYPE else "ledoit_wolf")
    return [m for m in lean_methods() if m != "peft:gaussian" and keep(m)]


def choose_methods(spec: str | Sequence[str]) -> list[Method]:
    """``"full"``, ``"lean"``, ``"core"``, ``"quick"``, a comma-separated list, or a list of
    labels."""
    if isinstance(spec, str):
        named = {"full": full_methods, "lean": lean_methods, "core": core_methods,
                 "quick": lambda: QUICK_METHODS}
        labels = named[spec]() if spec in named else [s for s in spec.split(",") if s.strip()]
    else:
        labels = list(spec)
    methods = [parse_method(s) for s in labels]
    if len({m.label for m in methods}) != len(methods):
        raise ValueError(f"duplicate methods in {labels}")
    return methods


# ---------------------------------------------------------------------------- init
class _CappedCycle:
    """A loader that EVA may cycle at most ``passes`` times (it has no step cap of its own)."""

    class Exhausted(RuntimeError):
        pass

    def __init__(self, batches: list[dict[str, torch.Tensor]], passes: int) -> None:
        self.batches, self.passes, self.seen = batches, passes, 0

    def __iter__(self) -> Iterable[dict[str, torch.Tensor]]:
        for batch in self.batches:
            self.seen += 1
            if self.seen > self.passes * len(self.batches):
                raise self.Exhausted(f"EVA did not converge within {self.passes} passes over "
                                     f"the {len(self.batches)} calibration batches")
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


def _eva_positions(batch: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
    """Indices (n, 2) of the positions EVA may use: ``attention_mask`` (and, with
    ``use_label_mask``, token labels ≠ the mask value).

    PEFT's default reads ``input_ids`` even when ``attention_mask`` is given, which fails on
    models fed ``inputs_embeds`` (the ``tiny`` task); the positions are the same otherwise.
    """
    mask = batch["attention_mask"].bool()  # (B, T)
    labels = batch.get("labels")
    if config.eva_config.use_label_mask and labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != config.eva_config.label_mask_value)
    return mask.nonzero()


def prepare_covinit(method: Method, data: TaskData, s: dict[str, Any], seed: int,
                    calibration: Any) -> tuple[nn.Module, float, str]:
    """LoRA model for ``seed`` initialized by a covinit strategy; ``(model, init s, note)``."""
    model = covinit.add_lora(data.fresh_model(seed), s["targets"], rank=s["rank"],
                             alpha=s["alpha"])
    for name in data.head:
        model.get_submodule(name).requires_grad_(True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = covinit.initialize(model, calibration if method.needs_calibration else None,
                                  strategy=method.name,
                                  estimator=method.estimator or "ledoit_wolf", seed=seed)
    init_s = time.perf_counter() - start
    fallbacks = sorted(n for n, i in info.items() if "fallback" in i)
    note = f"kaiming fallback on {fallbacks}" if fallbacks else ""
    if caught and not fallbacks:
        note = "; ".join(sorted({str(w.message)[:120] for w in caught}))
    return model, init_s, note


def prepare_peft(method: Method, data: TaskData, s: dict[str, Any],
                 seed: int) -> tuple[nn.Module, float, str]:
    """PEFT model for ``seed`` initialized by PEFT itself; ``(model, seconds, note)``.

    The seconds include PEFT's data pass (EVA's SVDs, CorDA's covariance collection,
    LoRA-GA's gradients): PEFT has no separate calibration object to time.
    """
    from peft import EvaConfig, LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig, LoraGAConfig

    model = data.fresh_model(seed)
    common = {"r": s["rank"], "lora_alpha": s["alpha"], "target_modules": list(s["targets"]),
              "lora_dropout": 0.0, "modules_to_save": list(data.head) or None}
    torch.manual_seed(seed)  # PEFT's random parts (A, LoRA-GA's svd_lowrank) use torch's RNG
    start = time.perf_counter()
    note = ""
    name = method.name
    if name in ("true", "gaussian", "pissa", "olora"):
        init: bool | str = True if name == "true" else name
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=init, **common))
    elif name == "eva":
        from peft import initialize_lora_eva_weights

        config = LoraConfig(init_lora_weights="eva",
                            eva_config=EvaConfig(rho=1.0, use_label_mask=data.eva_label_mask),
                            **common)
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
        loader = _CappedCycle(data.calibration, s["eva_max_passes"])
        initialize_lora_eva_weights(peft_model, dataloader=loader, show_progress_bar=False,
                                    prepare_model_inputs_fn=_eva_positions)
        note = f"converged after {loader.seen} batches ({loader.seen / len(loader):.1f} passes)"
    elif name.startswith("corda-"):
        from peft.tuners.lora.corda import preprocess_corda

        config = LoraConfig(init_lora_weights="corda",
                            corda_config=CordaConfig(corda_method=name[6:]), **common)

        @torch.no_grad()
        def run_model() -> None:
            for batch in data.calibration_singles:
                model(**batch)

        preprocess_corda(model, config, run_model=run_model)
        peft_model = get_peft_model(model, config)
        note = f"{len(data.calibration_singles)} calibration examples, batch size 1"
    elif name == "lora_ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        config = LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **common)

        def train_step() -> None:
            with warnings.catch_warnings():
                # PEFT's gradient-count hook on frozen inputs; expected, not ours to fix.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for batch in data.calibration:
                    model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        peft_model = get_peft_model(model, config)
        note = f"gradients of {len(data.calibration)} calibration batches"
    else:  # parse_method only lets PEFT_INITS through
        raise AssertionError(name)
    return peft_model.eval(), time.perf_counter() - start, note


# ---------------------------------------------------------------------------- training
def eval_steps(steps: int, points: int) -> list[int]:
    """Steps at which validation runs: 0, every ``steps/points``, and 25/50/100 %."""
    marks = {0, steps} | {round(steps * f) for f in FRACTIONS}
    marks |= {round(steps * i / points) for i in range(1, points + 1)}
    return sorted(m for m in marks if 0 <= m <= steps)


def train(model: nn.Module, data: TaskData, s: dict[str, Any], seed: int,
          lr: float) -> dict[str, Any]:
    """AdamW on the trainable parameters for ``s["steps"]`` steps; curves and final metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    marks = set(eval_steps(s["steps"], s["eval_points"]))
    curve_steps, curve_loss, curve_metric, train_loss = [], [], [], []
    loss0, metric0 = data.evaluate(model, data.validation)
    curve_steps.append(0)
    curve_loss.append(loss0)
    curve_metric.append(metric0)
    torch.manual_seed(seed)  # same dropout masks for every method at this seed
    batches = data.batches(seed)
    model.train()
    status = "ok"
    start = time.perf_counter()
    for step in range(1, s["steps"] + 1):
        loss = model(**next(batches)).loss
        if not torch.isfinite(loss):
            status = f"diverged at step {step}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_loss.append(loss.item())
        if step in marks:
            v_loss, v_metric = data.evaluate(model, data.validation)
            curve_steps.append(step)
            curve_loss.append(v_loss)
            curve_metric.append(v_metric)
    train_s = time.perf_counter() - start
    if status == "ok":
        test_loss, test_metric = data.evaluate(model, data.test)
    else:
        test_loss = test_metric = math.nan
    model.eval()
    return {"status": status, "train_s": train_s, "step0_val_loss": loss0,
            "final_val_loss": curve_loss[-1] if status == "ok" else math.nan,
            "final_val_metric": curve_metric[-1] if status == "ok" else math.nan,
            "test_loss": test_loss, "test_metric": test_metric,
            "curve_steps": json.dumps(curve_steps),
            "curve_val_loss": json.dumps([round(x, 6) for x in curve_loss]),
            "curve_val_metric": json.dumps([round(x, 6) for x in curve_metric]),
            "train_loss": json.dumps([round(x, 5) for x in train_loss])}


# ---------------------------------------------------------------------------- driver
def config_id(task: str, s: dict[str, Any]) -> str:
    """Short hash of the settings that change what a run measures."""
    blob = json.dumps({"task": task, **{k: s[k] for k in CONFIG_KEYS}}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _float(row: dict[str, Any], key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def _final_loss(row: dict[str, Any]) -> float:
    value = _float(row, "final_val_loss")
    return value if math.isfinite(value) else math.inf


def select_lr(rows: list[dict[str, Any]], sweep_seeds: Sequence[int]) -> float | None:
    """Learning rate with the lowest mean final *validation* loss over ``sweep_seeds``."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if int(r["seed"]) in sweep_seeds and r["status"] != "failed":
            by_lr.setdefault(float(r["lr"]), []).append(_final_loss(r))
    if not by_lr:
        return None
    return min(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), lr))


def edge_extension(tried: Sequence[float], best: float, ratio: float) -> float | None:
    """The next rate beyond the grid when ``best`` is its smallest or largest value."""
    if math.isclose(best, min(tried)):
        return best / ratio
    if math.isclose(best, max(tried)):
        return best * ratio
    return None


def run_all(task_name: str, s: dict[str, Any], methods: list[Method], out: Path,
            sweep_all: bool, extend: int = 1) -> Path:
    """Run every (method, seed, lr) not yet in ``out/runs.csv``; return the CSV path.

    ``extend``: how many times the rate grid may grow by one geometric step past an edge
    on which a method's best rate lies.
    """
    csv_path = out / "runs.csv"
    cfg = config_id(task_name, s)
    done = [r for r in read_rows(csv_path) if r["config"] == cfg]
    have = {(r["method"], int(r["seed"]), float(r["lr"])) for r in done}
    failed = {r["method"] for r in done if r["status"] == "failed"}
    seeds, lrs = list(s["seeds"]), [float(x) for x in s["lrs"]]
    sweep_seeds = seeds if sweep_all else seeds[:1]

    print(f"[{task_name}] building model and data ...", flush=True)
    data = get_task(task_name).build(s)
    print(f"[{task_name}] {data.sizes}", flush=True)
    calibration, calib_s = None, 0.0
    base_loss: dict[int, float] = {}

    def calibrate_once() -> tuple[Any, float]:
        nonlocal calibration, calib_s
        if calibration is None:
            start = time.perf_counter()
            calibration = covinit.calibrate(data.base, data.calibration, targets=s["targets"],
                                            folds=s["folds"], show_progress=False)
            calib_s = time.perf_counter() - start
            print(f"[{task_name}] covinit.calibrate: {len(calibration.layer_names)} layers, "
                  f"{calib_s:.1f} s", flush=True)
        return calibration, calib_s

    def run_group(method: Method, seed: int, todo: list[float]) -> None:
        todo = [lr for lr in todo if (method.label, seed, lr) not in have]
        if not todo or method.label in failed:
            return
        if seed not in base_loss:
            base_loss[seed] = data.evaluate(data.fresh_model(seed), data.validation)[0]
        row = {"task": task_name, "config": cfg, "method": method.label,
               "family": method.family, "strategy": method.name, "estimator": method.estimator,
               "preserves": method.preserves, "seed": seed, "steps": s["steps"],
               "base_val_loss": base_loss[seed]}
        try:
            if method.family == "covinit":
                cal, c_s = calibrate_once() if method.needs_calibration else (None, 0.0)
                model, init_s, note = prepare_covinit(method, data, s, seed, cal)
            else:
                c_s = 0.0
                model, init_s, note = prepare_peft(method, data, s, seed)
                if method.name in PEFT_DATA_PASS:  # PEFT's data pass is its calibration
                    c_s, init_s = init_s, 0.0
        except Exception as e:  # record why it could not run, keep going
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:400]
            print(f"  {method.label} seed {seed}: FAILED {msg}", flush=True)
            for lr in todo:
                append_row(csv_path, {**row, "lr": lr, "status": "failed", "note": msg,
                                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, FIELDS)
            failed.add(method.label)
            return
        for lr in todo:
            result = train(copy.deepcopy(model), data, s, seed, lr)
            full = {**row, **result, "lr": lr, "note": note, "calib_s": round(c_s, 3),
                    "init_s": round(init_s, 3), "train_s": round(result["train_s"], 2),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            append_row(csv_path, full, FIELDS)
            have.add((method.label, seed, lr))
            done.append({k: str(v) for k, v in full.items()})
            print(f"  {method.label:<24} seed {seed} lr {lr:g}: val loss "
                  f"{result['step0_val_loss']:.4f} -> {result['final_val_loss']:.4f}, test "
                  f"{data.metric} {result['test_metric']:.4f} ({result['status']}, "
                  f"{result['train_s']:.0f} s)", flush=True)

    # Phase 1: the learning-rate sweep on the sweep seeds, every method (so a partial run
    # already compares all methods); phase 2: the other seeds at each method's chosen rate.
    ratio = (max(lrs) / min(lrs)) ** (1 / (len(lrs) - 1)) if len(lrs) > 1 else None
    for method in methods:
        for seed in sweep_seeds:
            run_group(method, seed, lrs)
        for _ in range(extend if ratio else 0):
            # A best rate on the grid's edge says the grid missed the optimum: try one more
            # step beyond it, so no init is judged at a rate chosen for another.
            rows = [r for r in done if r["method"] == method.label]
            tried = sorted({float(r["lr"]) for r in rows if int(r["seed"]) in sweep_seeds})
            best = select_lr(rows, sweep_seeds)
            nxt = None if best is None else edge_extension(tried, best, ratio)
            if nxt is None or any(math.isclose(nxt, t) for t in tried):
                break
            for seed in sweep_seeds:
                run_group(method, seed, [nxt])
    for method in methods:
        rows = [r for r in done if r["method"] == method.label]
        best = select_lr(rows, sweep_seeds)
        if best is None:
            continue
        for seed in seeds:
            if seed not in sweep_seeds:
                run_group(method, seed, [best])
    return csv_path


# ---------------------------------------------------------------------------- summary
def _curve(row: dict[str, Any]) -> tuple[list[int], list[float]]:
    return json.loads(row["curve_steps"]), json.loads(row["curve_val_loss"])


def _at(row: dict[str, Any], step: int) -> float:
    steps, losses = _curve(row)
    if not steps:
        return math.nan
    i = min(range(len(steps)), key=lambda j: abs(steps[j] - step))
    return losses[i] if row["status"] == "ok" or steps[i] <= step else math.nan


def steps_to_reach(row: dict[str, Any], target: float) -> int | None:
    """First evaluated step > 0 whose validation loss is ≤ ``target`` (None if never).

    The curve is stored rounded to 6 decimals, hence the 1e-6 slack (so the reference run
    itself reaches its own final loss).
    """
    for step, loss in zip(*_curve(row), strict=True):
        if step > 0 and loss <= target + 1e-6:
            return step
    return None


def reference_label(stats: dict[str, dict[str, Any]]) -> str | None:
    """The Kaiming baseline every comparison is made against: covinit's ``kaiming`` if it
    has runs, else PEFT's default (``peft:true``), else None."""
    return next((k for k in ("kaiming", "peft:true") if "rows" in stats.get(k, {})), None)


def summarize(rows: list[dict[str, Any]], methods: list[Method], s: dict[str, Any],
              sweep_seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per method, at its chosen learning rate: the statistics the table shows."""
    stats: dict[str, dict[str, Any]] = {}
    steps = int(s["steps"])
    for m in methods:
        mine = [r for r in rows if r["method"] == m.label]
        if not mine:
            continue
        if all(r["status"] == "failed" for r in mine):
            stats[m.label] = {"method": m, "failed": mine[0]["note"]}
            continue
        lr = select_lr(mine, sweep_seeds)
        at = [r for r in mine if float(r["lr"]) == lr and r["status"] != "failed"]
        stats[m.label] = {
            "method": m, "lr": lr, "rows": at, "seeds": sorted(int(r["seed"]) for r in at),
            "calib_s": [_float(r, "calib_s") for r in at],
            "init_s": [_float(r, "init_s") for r in at],
            "step0": [_float(r, "step0_val_loss") for r in at],
            "base": [_float(r, "base_val_loss") for r in at],
            "val_at": {f: [_at(r, round(steps * f)) for r in at] for f in FRACTIONS},
            "final_val": [_float(r, "final_val_loss") for r in at],
            "test_loss": [_float(r, "test_loss") for r in at],
            "test_metric": [_float(r, "test_metric") for r in at],
            "diverged": sum(r["status"] != "ok" for r in at),
        }
    ref_label = reference_label(stats)
    ref = stats[ref_label] if ref_label else None
    target = None
    if ref:
        target = mean_std(ref["final_val"])[0]
        for st in stats.values():
            if "rows" in st:
                st["reach"] = [steps_to_reach(r, target) for r in st["rows"]]
    for st in stats.values():
        st["ref_loss"] = target
    if ref:
        # A user who tuned the rate for Kaiming and switches init keeps that rate: how does
        # each method do there (sweep seeds only; empty where Kaiming's lr* came from its own
        # grid extension and the method never ran at it)?
        for label, st in stats.items():
            at_ref = [_final_loss(r) for r in rows if r["method"] == label
                      and math.isclose(float(r["lr"]), ref["lr"])
                      and int(r["seed"]) in sweep_seeds and r["status"] != "failed"]
            st["at_ref_lr"] = at_ref
    return stats


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) and finite else math.nan


def targets_report(stats: dict[str, dict[str, Any]], s: dict[str, Any],
                   higher_is_better: bool) -> list[str]:
    """The issue's three targets for the best covinit method (chosen on validation)."""
    ok = {k: v for k, v in stats.items() if "rows" in v}
    # Only the covariance-informed strategies: kaiming/gaussian/pissa use no data.
    cov = {k: v for k, v in ok.items() if v["method"].needs_calibration}
    ref_label = reference_label(stats)
    if not cov or ref_label is None:
        return ["- not evaluated: needs the Kaiming baseline and a covinit strategy"]
    ref = ok[ref_label]
    best_label = min(cov, key=lambda k: _mean(cov[k]["final_val"]))
    best = cov[best_label]
    lines = [f"Best covariance-informed covinit method by mean final **validation** loss: "
             f"`{best_label}` (lr {best['lr']:g}); reference `{ref_label}`"
             f" final validation loss {best['ref_loss']:.4f}."]
    reach = best.get("reach", [])
    half = 0.5 * int(s["steps"])
    met1 = bool(reach) and all(r is not None and r <= half for r in reach)
    lines.append(f"1. Reaches Kaiming's final validation loss in ≤ 50 % of the steps "
                 f"({half:g}) on every seed: **{'met' if met1 else 'not met'}** "
                 f"(steps per seed: {reach}; evaluated every "
                 f"{int(s['steps']) // int(s['eval_points'])} steps).")
    peft = {k: ok[k] for k in PEFT_DATA_DRIVEN if k in ok}
    mine = _mean(best["test_metric"])
    if peft:
        pick = max if higher_is_better else min
        best_peft = pick(peft, key=lambda k: _mean(peft[k]["test_metric"]))
        theirs = _mean(peft[best_peft]["test_metric"])
        met2 = mine >= theirs if higher_is_better else mine <= theirs
        lines.append(f"2. Final test metric ≥ the best PEFT data-driven init "
                     f"(`{best_peft}`, {theirs:.4f}): {mine:.4f} → "
                     f"**{'met' if met2 else 'not met'}**.")
    else:
        lines.append("2. Final test metric vs PEFT data-driven inits: not evaluated (none ran).")
    if len(best["test_metric"]) > 1 and len(ref["test_metric"]) > 1:
        sd_mine, sd_ref = mean_std(best["test_metric"])[1], mean_std(ref["test_metric"])[1]
        lines.append(f"3. Seed-to-seed std of the test metric below Kaiming's: {sd_mine:.4f} "
                     f"vs {sd_ref:.4f} → **{'met' if sd_mine < sd_ref else 'not met'}**.")
    else:
        lines.append("3. Seed-to-seed std: not evaluated (needs ≥ 2 seeds at the chosen rate).")
    return lines


def paired_delta(st: dict[str, Any], ref: dict[str, Any], key: str) -> list[float]:
    """``st[key] − ref[key]`` per seed both ran (a seed fixes data order and random draws
    for every method, so paired differences cancel the shared part of the noise)."""
    theirs = dict(zip(ref.get("seeds", []), ref.get(key, []), strict=True))
    return [v - theirs[seed] for seed, v in zip(st.get("seeds", []), st.get(key, []),
                                                  strict=True) if seed in theirs]


def _highlights(stats: dict[str, dict[str, Any]], n_covinit: int = 3) -> list[str]:
    """Methods drawn in colour: the Kaiming baselines, the best covinit methods and the best
    PEFT data-driven one by mean final validation loss."""
    ok = {k: v for k, v in stats.items() if "rows" in v}
    by_val = sorted(ok, key=lambda k: _mean(ok[k]["final_val"]))
    cov = [k for k in by_val if ok[k]["method"].needs_calibration][:n_covinit]
    peft = [k for k in by_val if k in PEFT_DATA_DRIVEN][:1]
    return [k for k in ("kaiming", "peft:true") if k in ok] + cov + peft


def plot(stats: dict[str, dict[str, Any]], path: Path, title: str, metric: str) -> None:
    """Validation curves (highlighted methods in colour, the rest grey) and, per method, the
    final validation loss and test metric as mean ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = {k: st for k, st in stats.items() if "rows" in st}
    shown = _highlights(stats)
    fig, (ax_v, ax_l, ax_m) = plt.subplots(
        1, 3, figsize=(17, 0.9 + 0.28 * max(len(ok), 12)),
        gridspec_kw={"width_ratios": [1.4, 1, 1]})
    cmap = plt.get_cmap("tab10")
    colour = {label: cmap(i % 10) for i, label in enumerate(shown)}
    for label, st in ok.items():
        runs = [r for r in st["rows"] if r["status"] == "ok"]
        if not runs:
            continue
        steps = np.array(_curve(runs[0])[0])
        vals = np.array([_curve(r)[1] for r in runs])  # (seeds, points)
        mu = vals.mean(0)
        if label not in colour:
            ax_v.plot(steps, mu, color="0.75", linewidth=0.8, zorder=1)
            continue
        sd = vals.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mu)
        dashed = st["method"].family != "covinit"
        ax_v.plot(steps, mu, color=colour[label], linestyle="--" if dashed else "-",
                  linewidth=1.8, zorder=3, label=f"{label} (lr {st['lr']:g}, {len(runs)} seeds)")
        ax_v.fill_between(steps, mu - sd, mu + sd, color=colour[label], alpha=0.15, zorder=2)
    ref = next(iter(stats.values()), {}).get("ref_loss")
    if ref is not None:
        ax_v.axhline(ref, color="k", linewidth=0.8, linestyle=":",
                     label="Kaiming final val loss")
    ax_v.plot([], [], color="0.75", label="other methods")
    ax_v.set(xlabel="step", ylabel="validation loss",
             title="validation loss, mean ± std over seeds")
    ax_v.legend(fontsize=8)

    order = sorted(ok, key=lambda k: _mean(ok[k]["final_val"]))
    y = np.arange(len(order))
    for ax, key, name in ((ax_l, "final_val", "final validation loss"),
                          (ax_m, "test_metric", f"test {metric}")):
        pairs = [mean_std(ok[k][key]) for k in order]
        ax.barh(y, [m for m, _ in pairs], xerr=[sd for _, sd in pairs], capsize=2,
                color=[colour.get(k, "0.7") for k in order], alpha=0.85)
        lo = min(m - sd for m, sd in pairs)
        hi = max(m + sd for m, sd in pairs)
        ax.set_xlim(lo - 0.15 * (hi - lo), hi + 0.15 * (hi - lo))
        if "kaiming" in ok:
            ax.axvline(mean_std(ok["kaiming"][key])[0], color="k", linewidth=0.8,
                       linestyle=":")
        ax.set_yticks(y, order if ax is ax_l else [""] * len(order), fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel=name, title=f"{name} at lr*, mean ± std")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(task_name: str, s: dict[str, Any], methods: list[Method], out: Path,
                  sweep_all: bool, started: dict[str, str], quick: bool) -> Path:
    """``summary.md`` and ``learning_curves.png`` from every matching row of runs.csv."""
    task = get_task(task_name)
    cfg = config_id(task_name, s)
    rows = [r for r in read_rows(out / "runs.csv") if r["config"] == cfg]
    seeds = list(s["seeds"])
    sweep_seeds = seeds if sweep_all else seeds[:1]
    stats = summarize(rows, methods, s, sweep_seeds)
    ref_label = reference_label(stats)
    ref = stats[ref_label] if ref_label else None
    data_line = started.get("sizes", "")
    higher = started.get("higher_is_better", "1") == "1"
    metric = started.get("metric", "metric")
    steps = int(s["steps"])
    plot(stats, out / "learning_curves.png",
         f"{task.description}: LoRA r={s['rank']}, {steps} steps (lr chosen on validation)",
         metric)

    head = (f"| method | preserves | lr* | seeds | calib s | init s | step-0 val loss "
            f"(base) | val loss @25% | @50% | @100% | Δ final val vs Kaiming (paired) | "
            f"final val at Kaiming's lr* | steps to Kaiming final | test loss | "
            f"test {metric} |")
    lines = [f"# compare_inits: {task_name}{' (quick)' if quick else ''}", "",
             f"{task.description}.  {data_line}.", "",
             f"- Command: `{started['command']}`",
             f"- Started {started['time']}, summary written {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"- Machine: {machine()}",
             (f"- Load average when this summary was rewritten: {load_average()} (not "
              "the runs' load; runs.csv dates every run)"
              if started.get("summary_only") else
              f"- Load average at start / end: {started['load']} / {load_average()} "
              "(2 cores shared with other jobs: seconds are inflated accordingly)"),
             f"- Settings: targets {s['targets']}, rank {s['rank']}, α {s['alpha']:g}, "
             f"{steps} steps × batch {s['batch_size']}, AdamW (no weight decay), lr grid "
             f"{s['lrs']}, seeds {seeds}, calibration {s['n_calib']} examples "
             f"(batch {s['calib_batch_size']}, {s['folds']} folds for spatpca), validation "
             f"every {steps // int(s['eval_points'])} steps; config id `{cfg}`.",
             "- Protocol: the lr grid grows by one step (same ratio) past an edge on which a "
             "method's best rate lies; "
             f"lr* = lowest final validation loss on seed(s) {sweep_seeds}; other "
             "seeds run at lr*; test is reported at lr* only (never used for selection). "
             "Mean ± sample std over the seeds at lr*.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for label, st in stats.items():
        m = st["method"]
        if "failed" in st:
            lines.append(f"| `{label}` | {m.preserves} | – | – | – | – | – | – | – | – | – | – | "
                         f"– | – | failed: {st['failed'][:150]} |")
            continue
        reach = st.get("reach", [])
        got = [r for r in reach if r is not None]
        reach_s = ("–" if not reach else
                   f"{sum(got) / len(got):.0f} ({100 * sum(got) / len(got) / steps:.0f} %)"
                   + ("" if len(got) == len(reach) else f", {len(got)}/{len(reach)} seeds")
                   if got else f"not reached (0/{len(reach)})")
        div = f" ({st['diverged']} diverged)" if st["diverged"] else ""
        delta = paired_delta(st, ref, "final_val") if ref and label != ref_label else []
        delta_s = f"{fmt_mean_std(delta)} ({len(delta)})" if delta else "–"
        lines.append(
            f"| `{label}` | {m.preserves} | {st['lr']:g} | {len(st['seeds'])}{div} | "
            f"{_mean(st['calib_s']):.1f} | {_mean(st['init_s']):.2f} | "
            f"{_mean(st['step0']):.4f} ({_mean(st['base']):.4f}) | "
            f"{fmt_mean_std(st['val_at'][0.25])} | {fmt_mean_std(st['val_at'][0.5])} | "
            f"{fmt_mean_std(st['val_at'][1.0])} | {delta_s} | "
            f"{fmt_mean_std(st.get('at_ref_lr', []))} | {reach_s} | "
            f"{fmt_mean_std(st['test_loss'])} | "
            f"{fmt_mean_std(st['test_metric'])} |")
    missing = [m.label for m in methods if m.label not in stats]
    train_s = [_float(r, "train_s") for r in rows if r["status"] == "ok"]
    finished = sorted(r["finished"] for r in rows) or ["–"]
    lines += ["", "## Targets (issue 6)", "", *targets_report(stats, s, higher), ""]
    twins = []
    for ours, theirs in (("kaiming", "peft:true"), ("gaussian", "peft:gaussian"),
                         ("pissa", "peft:pissa")):
        a, b = stats.get(ours, {}), stats.get(theirs, {})
        if "final_val" in a and "final_val" in b:
            gap = abs(_mean(a["final_val"]) - _mean(b["final_val"]))
            twins.append(f"`{ours}` vs `{theirs}` {gap:.4f}")
    if twins:
        lines += ["Noise scale: the same algorithm run by covinit and by PEFT (different "
                  "random draws where it has any) differs in mean final validation loss by "
                  + ", ".join(twins) + "; smaller gaps between methods are not evidence.", ""]
    if missing:
        lines += [f"Not run yet (resume with the same command): {', '.join(missing)}.", ""]
    lines += [
        "## Notes", "",
        "- `calib s`: covinit's one calibration pass (shared by all its data-driven "
        "strategies, counted for each) or PEFT's own pre-processing (EVA's incremental SVD "
        "until convergence, CorDA's covariance pass at batch size 1, LoRA-GA's gradients). "
        "`init s`: covinit's estimator + strategy time (spatpca's cross-validation is here).",
        "- `step-0 val loss (base)`: validation loss right after init vs the base model's; "
        "equal where the init preserves the model (`zero-delta` or `function`).",
        "- `input-pca` / `output-pca` run with `empirical` and `spatpca` only: shrinkage "
        "towards μI leaves eigenvectors unchanged, so `ledoit_wolf` gives the same factors "
        "as `empirical`.",
        "- EVA runs with `rho=1` (every layer keeps rank r, as all other methods) and "
        f"`use_label_mask={metric == 'perplexity'}` (token-level labels only for the LM);"
        f" it may cycle the calibration data at most {s['eva_max_passes']} times.",
        "- `final val at Kaiming's lr*`: the method's final validation loss on the sweep "
        "seed(s) at the rate chosen for Kaiming — what a user who keeps a Kaiming-tuned "
        "rate would see.",
        "- Steps-to-reach is measured at the validation points only (resolution "
        f"{steps // int(s['eval_points'])} steps).",
        f"- Runs so far: {len(rows)}, finished between {finished[0]} and {finished[-1]}; "
        f"training time per run {fmt_mean_std(train_s, 0)} s, "
        f"{sum(train_s) / 60:.0f} min in all (plus evaluation and model copies; measured "
        "under the load above).",
    ]
    if task.budget and not quick:
        lines.append(f"- {task.budget}")
    if quick:
        lines.append("- Quick mode is a smoke run (few steps, one seed, a few methods): its "
                     "numbers show the pipeline works, they are not evidence for or against "
                     "any init.")
    if task_name == "smollm2-hamlet":
        lines.append("- SmolLM2's base weights are dequantized Q4_1: they carry 4-bit "
                     "quantization noise.")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="minilm-rt", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--quick", action="store_true",
                   help="the task's quick settings: few steps, 1 seed, a few methods")
    p.add_argument("--strategies", default=None,
                   help="'full', 'lean', 'core', 'quick' or comma-separated methods "
                        "(STRATEGY[@ESTIMATOR] or peft:INIT); default: the task's list")
    p.add_argument("--estimators", default=None,
                   help="comma-separated estimators: keep only data-driven covinit methods "
                        "using one of them (data-free and PEFT methods are kept)")
    p.add_argument("--targets", default=None, help="comma-separated layer name suffixes")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lrs", default=None, help="comma-separated learning-rate grid (≥ 3 advised)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds")
    p.add_argument("--n-calib", type=int, default=None, help="calibration examples / blocks")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--eval-points", type=int, default=None,
                   help="validation evaluations during training (besides step 0)")
    p.add_argument("--extend-lr-grid", type=int, default=1,
                   help="times a method's rate grid may grow by one step past an edge where "
                        "its best rate lies (0: never)")
    p.add_argument("--sweep-all-seeds", action="store_true",
                   help="sweep the lr grid on every seed (default: the first seed only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=None,
                   help="results folder (default benchmarks/results/<task>[/quick])")
    p.add_argument("--summary-only", action="store_true",
                   help="rewrite summary.md and the plot from runs.csv without running")
    p.add_argument("--list", action="store_true", help="list tasks and methods, then exit")
    return p


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The task's settings for the mode, overridden by the flags that were given."""
    task = get_task(args.task)
    s = dict(task.full)
    if args.quick:
        s.update(task.quick)
    floats = lambda text: [float(x) for x in text.split(",") if x.strip()]
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]
    given = {"targets": args.targets and [t.strip() for t in args.targets.split(",")],
             "rank": args.rank, "alpha": args.alpha, "steps": args.steps,
             "batch_size": args.batch_size, "lrs": args.lrs and floats(args.lrs),
             "seeds": args.seeds and ints(args.seeds), "n_calib": args.n_calib,
             "n_train": args.n_train, "eval_points": args.eval_points,
             "strategies": args.strategies}
    s.update({k: v for k, v in given.items() if v is not None})
    for key in ("rank", "steps", "batch_size", "n_calib", "eval_points"):
        if int(s[key]) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if not s["lrs"] or not s["seeds"]:
        raise ValueError("--lrs and --seeds need at least one value each")
    s["eval_points"] = min(int(s["eval_points"]), int(s["steps"]))
    return s


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, task in TASKS.items():
            print(f"{name:<16} {task.description}")
        print("\nmethods (full list):", ", ".join(full_methods()))
        print("quick list:", ", ".join(QUICK_METHODS))
        return 0
    try:
        s = settings_from(args)
        methods = choose_methods(s["strategies"])
    except ValueError as e:
        parser.error(str(e))
    if args.estimators:
        keep = {e.strip() for e in args.estimators.split(",")}
        methods = [m for m in methods if not m.estimator or m.estimator in keep]
    torch.set_num_threads(args.threads)
    # PEFT's get_peft_model calls a transformers API that warns once per model built; the
    # warning concerns PEFT's code, not the benchmark, and would repeat in every run's output.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    out = Path(args.out) if args.out else RESULTS / args.task / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    script = "benchmarks/compare_inits.py"
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--summary-only"]
    started = {"command": command_line([script, *given]),
               "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load": load_average()}
    if args.summary_only:
        # The runs happened earlier (see runs.csv's `finished` column); say so.
        started["time"] += " (summary rewritten from runs.csv with --summary-only)"
        started["summary_only"] = "1"
    t0 = time.perf_counter()
    task = get_task(args.task)
    if not args.summary_only:
        run_all(args.task, s, methods, out, args.sweep_all_seeds, args.extend_lr_grid)
    # Facts the summary needs from the task without rebuilding it.
    data_facts = _task_facts(args.task, s)
    started.update(data_facts)
    path = write_summary(args.task, s, methods, out, args.sweep_all_seeds, started, args.quick)
    print(f"[{task.name}] wrote {out / 'runs.csv'}, {path}, {out / 'learning_curves.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    print(path.read_text(encoding="utf-8"))
    return 0


def _task_facts(task_name: str, s: dict[str, Any]) -> dict[str, str]:
    """Metric name, its direction and the data-size line (cheap: no model is loaded)."""
    metric = {"smollm2-hamlet": "perplexity"}.get(task_name, "accuracy")
    sizes = {
        "minilm-rt": (f"Rotten Tomatoes (fixed split, seed 0): {s['n_train']} train, "
                      f"{s['n_val']} validation, {s['n_test']} test; the first {s['n_calib']} "
                      f"train examples calibrate; max_length {s['max_length']}"),
        "smollm2-hamlet": (f"Hamlet: up to {s['n_train']} train blocks of {s['max_length']} "
                           f"tokens, {s['n_val']} validation / {s['n_test']} test blocks from "
                           f"the held-out last 10 %; {s['n_calib']} calibration blocks"),
    }.get(task_name, f"{s['n_train']} train, {s['n_val']} validation, {s['n_test']} test, "
                     f"{s['n_calib']} calibration examples")
    return {"metric": metric, "higher_is_better": "0" if metric == "perplexity" else "1",
            "sizes": sizes}


if __name__ == "__main__":
    sys.exit(main())
