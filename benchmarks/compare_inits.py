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

Quantized bases (issue 17): ``--regime nf4`` (``nf3``, ``nf2``) quantizes every linear layer of
the task's ``all_targets`` first (simulated NF-k) and compares QLoRA (``kaiming``), LoftQ and
CLoQ (:data:`QUANT_METHODS`) from that same model; the summary adds the share of the
full-precision gap each restores, against the ``base`` regime's Kaiming runs (``--reference``).

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
import textwrap
import time
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
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
from _tasks import TASKS, TaskData, get_task, quantize_base

import covinit
from covinit.inits import get_strategy

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
def quick_methods() -> list[str]:
    """``make demo``: Kaiming next to covinit's default strategy with its options (or, were
    the default Kaiming, the drop-in candidate ``input-pca@empirical+matched``), at one rate."""
    from covinit.calibration import DEFAULT_OPTIONS, DEFAULT_STRATEGY

    if DEFAULT_STRATEGY == "kaiming":
        return ["kaiming", "input-pca@empirical+matched"]
    options = {k: v for k, v in DEFAULT_OPTIONS.items() if k != "estimator"}
    label = f"{DEFAULT_STRATEGY}@{DEFAULT_OPTIONS['estimator']}" + "".join(
        f"+{v}" for v in options.values())
    return ["kaiming", label]


FRACTIONS = (0.25, 0.5, 1.0)

FIELDS = [
    "task", "regime", "config", "method", "family", "strategy", "estimator", "options",
    "preserves", "seed", "lr", "s_lr", "steps", "status", "note", "calib_s", "init_s",
    "train_s", "base_val_loss", "step0_val_loss", "final_val_loss", "final_val_metric",
    "val_auc", "test_loss", "test_metric", "curve_steps", "curve_val_loss",
    "curve_val_metric", "train_loss", "finished",
]
#: Settings that change what a run measures; runs.csv rows are reused only on a match.
CONFIG_KEYS = ("targets", "rank", "alpha", "steps", "batch_size", "max_length", "n_train",
               "n_val", "n_val_curve", "n_test", "n_calib", "calib_batch_size", "folds",
               "eval_points", "eva_max_passes", "heldout_fraction")
#: Settings that change what a run measures only when set: in the config id only then, so
#: adding one leaves every existing configuration's id (and its runs.csv rows) valid.
OPTIONAL_CONFIG_KEYS = ("quantize",)
#: Quantized-base methods (issue 17): QLoRA, LoftQ one step, LoftQ's algorithm (T = 5, its
#: last round, as PEFT's ``loftq_init``), CLoQ with the shrunk second moment.
QUANT_METHODS = ("kaiming,quant-svd,quant-svd+iterations=5+keep=last,"
                 "quant-residual@ledoit_wolf")
#: What each quantized-base method is, for the summary.
QUANT_NAMES = {
    "kaiming": "QLoRA (Kaiming A, B = 0)",
    "quant-svd": "LoftQ one step (top-r SVD of W − Q, data-free)",
    "quant-svd+iterations=5+keep=last": (
        "LoftQ algorithm (T = 5 alternations, last round kept), run by covinit on CPU: "
        "PEFT's own code needs CUDA"),
    "quant-residual@ledoit_wolf": "CLoQ (top-r SVD of (W − Q)·M^½, Ledoit-Wolf M)",
}


def _quant_regime(bits: int) -> dict[str, Any]:
    """A quantized-base regime: the base settings, every linear layer the task's
    ``all_targets`` cover quantized to ``bits``-bit NF (block 64), the quantized-base
    methods (:data:`QUANT_METHODS`)."""
    return {"quantize": {"bits": bits, "block_size": 64, "layers": "all"},
            "strategies": QUANT_METHODS}


#: Named regimes (DESIGN.md §9): overrides of a task's full settings.  ``epochs`` sets the
#: steps from the training-set size; ``targets: "all"`` takes the task's ``all_targets``;
#: ``quantize`` simulates a quantized base (:func:`_tasks.quantize_base`; its ``layers:
#: "all"`` is the task's ``all_targets``).
REGIMES: dict[str, dict[str, Any]] = {
    "base": {},
    "low-data": {"n_train": 256, "epochs": 4},
    "long": {"epochs": 3},
    "r4": {"rank": 4, "alpha": 8.0},
    "r32": {"rank": 32, "alpha": 64.0},
    "all-linear": {"targets": "all"},
    "nf4": _quant_regime(4),
    "nf3": _quant_regime(3),
    "nf2": _quant_regime(2),
}
#: Regime keys that also apply in ``--quick`` mode (which otherwise ignores the regime): a
#: quick run of a quantized regime must still quantize, and run its own methods.
QUICK_REGIME_KEYS = ("quantize", "strategies")
#: Keys that make a regime a variant of another (its full-precision reference).
VARIANT_KEYS = ("quantize", "strategies")


def reference_regime(regime: str) -> str | None:
    """The full-precision regime a quantized ``regime`` is compared with: the one whose
    overrides equal ``regime``'s without :data:`VARIANT_KEYS` (``nf4`` → ``base``); None for
    a regime that does not quantize."""
    own = REGIMES[regime]
    if "quantize" not in own:
        return None
    rest = {k: v for k, v in own.items() if k not in VARIANT_KEYS}
    return next((name for name, over in REGIMES.items() if over == rest), None)


# ---------------------------------------------------------------------------- methods
#: ``+NAME`` shorthands in a method label: the strategy option they set.
LABEL_OPTIONS: dict[str, tuple[str, Any]] = {
    "matched": ("scale", "matched"), "matched-unit": ("scale", "matched-unit"),
    "unit": ("scale", "unit"), "kaiming": ("scale", "kaiming"), "stable": ("scale", "stable"),
    "residual": ("residual", True), "center": ("center", True),
}


@dataclass(frozen=True)
class Method:
    """One init to compare.

    Attributes
    ----------
    label : str
        ``"cov-svd@ledoit_wolf+matched"``, ``"kaiming"``, ``"peft:eva"``.
    family : {"covinit", "peft"}
    name : str
        covinit strategy name, or PEFT init (a key of :data:`PEFT_INITS`).
    estimator : str
        Covariance estimator ("" when the init uses no calibration statistics).
    preserves : str
        ``"zero-delta"`` (ΔW = 0), ``"function"`` (residual base, same outputs) or
        ``"changes"``: the contract the step-0 loss is checked against.
    options : tuple of (str, object)
        Strategy options from the label (``+matched`` → ``("scale", "matched")``).
    """

    label: str
    family: str
    name: str
    estimator: str
    preserves: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def scale(self) -> Any:
        """The ``scale=`` the strategy runs with (its own default when not in the label)."""
        given = dict(self.options).get("scale")
        if given is not None or self.family != "covinit":
            return given
        return "matched" if self.name in GRAD_MATCHED_DEFAULT else None

    @property
    def needs_gradient(self) -> bool:
        """Needs the calibration's gradient side: a gradient strategy, or ``scale="matched"``
        on an init whose B ≠ 0 (only B = 0 inits have a closed form without G)."""
        if self.family != "covinit":
            return False
        needs = get_strategy(self.name).tags.get("needs") or ()
        return "gradient" in needs or (self.scale == "matched"
                                       and self.name not in ("input-pca", "input-whiten"))

    @property
    def needs_calibration(self) -> bool:
        return self.family == "covinit" and (bool(get_strategy(self.name).tags.get("needs"))
                                             or self.scale in ("matched", "matched-unit"))

    @property
    def needs_lr(self) -> bool:
        """``scale="matched"`` with both factors non-zero (residual inits): the gain matches
        the step's second-order term too, which depends on the rate, so each rate gets its
        own init (``lr=`` = the run's rate)."""
        if self.family != "covinit" or self.scale != "matched":
            return False
        tags = get_strategy(self.name).tags
        residual = tags.get("preserves") == "function" or dict(self.options).get("residual")
        return bool(residual) and "lr" in (tags.get("options") or ())

    def init_options(self, lr: float | None) -> dict[str, Any]:
        """Keyword options for ``covinit.initialize``."""
        opts = dict(self.options)
        if self.needs_lr and lr is not None:
            opts["lr"] = lr
        return opts


#: Gradient strategies whose ``scale`` defaults to ``"matched"``.
GRAD_MATCHED_DEFAULT = ("grad-svd", "grad-whiten", "kfac")


def _parse_option(token: str, label: str, allowed: Sequence[str]) -> tuple[str, Any]:
    if "=" in token:
        key, _, raw = token.partition("=")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw in ("true", "false"):
            value = raw == "true"
    elif token in LABEL_OPTIONS:
        key, value = LABEL_OPTIONS[token]
    else:
        raise ValueError(f"unknown option {token!r} in {label!r}; allowed: "
                         f"{', '.join('+' + k for k in LABEL_OPTIONS)} or +KEY=VALUE")
    if key not in allowed:
        raise ValueError(f"option {key!r} (from {token!r}) is not accepted by {label!r}; "
                         f"its options: {sorted(allowed) or 'none'}")
    return key, value


def parse_method(label: str) -> Method:
    """A :class:`Method` from ``STRATEGY[@ESTIMATOR][+OPTION...]`` or ``peft:INIT``
    (``ValueError`` listing what is allowed).

    Options: ``+matched``, ``+matched-unit``, ``+unit``, ``+kaiming``, ``+stable`` (the
    ``scale=`` option), ``+residual``, ``+center`` or ``+KEY=VALUE``; they are checked
    against the strategy's accepted options and kept in the label in the given order.
    """
    label = label.strip()
    if label.startswith("peft:"):
        name = label[5:]
        if name not in PEFT_INITS:
            raise ValueError(f"unknown PEFT init {name!r} in {label!r}; allowed: "
                             f"{', '.join('peft:' + n for n in PEFT_INITS)}")
        return Method(label, "peft", name, "", PEFT_INITS[name][0])
    head, *tokens = label.split("+")
    name, _, est = head.partition("@")
    entry = get_strategy(name)  # ValueError with the valid names
    allowed = tuple(entry.tags.get("options") or ())
    options = tuple(_parse_option(tok, label, allowed) for tok in tokens)
    if len({k for k, _ in options}) != len(options):
        raise ValueError(f"an option is given twice in {label!r}")
    probe = Method(label, "covinit", name, "", "", options)
    uses_stats = bool(entry.tags.get("needs")) or probe.scale in ("matched", "matched-unit")
    if uses_stats:
        est = est or "ledoit_wolf"
        if est not in covinit.estimators():
            raise ValueError(f"unknown estimator {est!r} in {label!r}; allowed: "
                             f"{', '.join(covinit.estimators())}")
    elif est:
        raise ValueError(f"strategy {name!r} uses no calibration, so {label!r} takes no "
                         "@estimator")
    canonical = (f"{name}@{est}" if uses_stats else name) + "".join("+" + x for x in tokens)
    return Method(canonical, "covinit", name, est if uses_stats else "",
                  str(entry.tags.get("preserves", "changes")), options)


def recorded_methods(methods: Sequence[Method], rows: Sequence[Mapping[str, str]]
                     ) -> list[Method]:
    """The methods a summary covers: every method with runs in ``rows`` (one configuration
    of runs.csv), in the order of their first run, then those of ``methods`` not run yet.

    A call that runs a few methods (``--strategies kaiming,X``) on a configuration that
    earlier calls filled would otherwise rewrite ``summary.md`` with only its own methods
    and hide the others' results.  A label that no longer parses (a strategy renamed since)
    is left out with a printed warning, never silently.
    """
    given = {m.label: m for m in methods}
    out: dict[str, Method] = {}
    for label in dict.fromkeys(row["method"] for row in rows):
        try:
            out[label] = given[label] if label in given else parse_method(label)
        except ValueError as err:
            print(f"summary: leaving out runs.csv's method {label!r}: {err}")
    out.update({label: m for label, m in given.items() if label not in out})
    return list(out.values())


def full_methods() -> list[str]:
    """Every covinit strategy (the ``zero`` control left out) × its estimators, then PEFT's.

    Data-free strategies run once; PCA-type ones with ``empirical`` and ``spatpca``; the
    others (whitening, ``Σ^{±1/2}``: where shrinkage acts) with ``empirical`` and
    ``ledoit_wolf``.
    """
    labels = []
    for name in covinit.strategies():
        # quant-* replace the base by a quantized one: compared in the nf4/nf3/nf2 regimes
        # (QUANT_METHODS) and, at step 0, in benchmarks/quant_init.py.
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
                 "quick": quick_methods}
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
                    calibration: Any, lr: float | None = None) -> tuple[nn.Module, float, str]:
    """LoRA model for ``seed`` initialized by a covinit strategy; ``(model, init s, note)``.

    ``lr``: the run's rate, passed as ``lr=`` where :attr:`Method.needs_lr`.
    """
    model = covinit.add_lora(data.fresh_model(seed), s["targets"], rank=s["rank"],
                             alpha=s["alpha"])
    for name in data.head:
        model.get_submodule(name).requires_grad_(True)
    options = {**method.init_options(lr), **quant_options(method, data, s)}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = covinit.initialize(model, calibration if method.needs_calibration else None,
                                  strategy=method.name,
                                  estimator=method.estimator or "ledoit_wolf", seed=seed,
                                  **options)
    init_s = time.perf_counter() - start
    fallbacks = sorted(n for n, i in info.items() if "fallback" in i)
    note = f"kaiming fallback on {fallbacks}" if fallbacks else ""
    if caught and not fallbacks:
        note = "; ".join(sorted({str(w.message)[:120] for w in caught}))
    return model, init_s, note


#: Options a quantized regime sets on the strategies that take ``full_precision=``.
QUANT_OPTIONS = ("bits", "block_size", "full_precision")


def quant_options(method: Method, data: TaskData, s: dict[str, Any]) -> dict[str, Any]:
    """In a quantized regime, the options of a ``quant-*`` strategy: the regime's ``bits``
    and ``block_size``, and ``full_precision=`` the weights the base was quantized from (so
    it repairs the base every method shares, and refuses a target the regime did not
    quantize).  Empty for other methods and regimes.

    Raises
    ------
    ValueError
        When the method's label sets one of :data:`QUANT_OPTIONS` itself.
    """
    quant = s.get("quantize")
    if quant is None or method.family != "covinit" \
            or "full_precision" not in (get_strategy(method.name).tags.get("options") or ()):
        return {}
    clash = sorted(set(QUANT_OPTIONS) & set(dict(method.options)))
    if clash:
        raise ValueError(f"{method.label!r} sets {clash}, which the quantized regime sets "
                         f"({quant['bits']}-bit NF, block {quant['block_size']}, the "
                         "full-precision weights): drop them from the label")
    return {"bits": quant["bits"], "block_size": quant["block_size"],
            "full_precision": data.full_precision}


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


def curve_area(steps: Sequence[int], losses: Sequence[float]) -> float:
    """Area under the validation-loss curve per step: the trapezoid rule over the evaluated
    steps divided by the last step (a mean loss over training; lower = converged faster)."""
    if len(steps) < 2 or steps[-1] <= steps[0]:
        return math.nan
    area = sum((steps[i + 1] - steps[i]) * (losses[i] + losses[i + 1]) / 2
               for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def train(model: nn.Module, data: TaskData, s: dict[str, Any], seed: int,
          lr: float) -> dict[str, Any]:
    """AdamW on the trainable parameters for ``s["steps"]`` steps; curves and final metrics.

    The curve is evaluated on ``data.validation_curve`` (a fixed subset), the final
    validation loss on the full ``data.validation``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    marks = set(eval_steps(s["steps"], s["eval_points"]))
    curve_steps, curve_loss, curve_metric, train_loss = [], [], [], []
    subset = data.validation_curve or data.validation
    loss0, metric0 = data.evaluate(model, subset)
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
            v_loss, v_metric = data.evaluate(model, subset)
            curve_steps.append(step)
            curve_loss.append(v_loss)
            curve_metric.append(v_metric)
    train_s = time.perf_counter() - start
    if status == "ok":
        final_loss, final_metric = data.evaluate(model, data.validation)
        test_loss, test_metric = data.evaluate(model, data.test)
        auc = curve_area(curve_steps, curve_loss)
    else:
        final_loss = final_metric = test_loss = test_metric = auc = math.nan
    model.eval()
    return {"status": status, "train_s": train_s, "step0_val_loss": loss0,
            "final_val_loss": final_loss, "final_val_metric": final_metric,
            "val_auc": auc, "test_loss": test_loss, "test_metric": test_metric,
            "curve_steps": json.dumps(curve_steps),
            "curve_val_loss": json.dumps([round(x, 6) for x in curve_loss]),
            "curve_val_metric": json.dumps([round(x, 6) for x in curve_metric]),
            "train_loss": json.dumps([round(x, 5) for x in train_loss])}


# ---------------------------------------------------------------------------- driver
def config_id(task: str, s: dict[str, Any]) -> str:
    """Short hash of the settings that change what a run measures (:data:`CONFIG_KEYS`, and
    :data:`OPTIONAL_CONFIG_KEYS` where set)."""
    keys = {k: s.get(k) for k in CONFIG_KEYS}
    keys.update({k: s[k] for k in OPTIONAL_CONFIG_KEYS if s.get(k) is not None})
    blob = json.dumps({"task": task, **keys}, sort_keys=True)
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
    """Learning rate with the lowest mean final *validation* loss over ``sweep_seeds``,
    among the rates every sweep seed has finished (None when none has): a rate that one
    seed happened to reach first must not win on that seed alone."""
    by_lr = losses_by_lr(rows, sweep_seeds, complete=True)
    if not by_lr:
        return None
    return min(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), lr))


def losses_by_lr(rows: list[dict[str, Any]], sweep_seeds: Sequence[int],
                 label: str | None = None, complete: bool = False) -> dict[float, list[float]]:
    """``{lr: [final validation loss per sweep seed]}`` of the runs that did not fail
    (a diverged run counts as ``inf``), for one method when ``label`` is given; with
    ``complete``, only the rates that every sweep seed has run."""
    need = set(sweep_seeds)
    return {lr: list(v.values()) for lr, v in sweep_grid(rows, sweep_seeds, label).items()
            if not complete or need <= v.keys()}


def sweep_grid(rows: list[dict[str, Any]], sweep_seeds: Sequence[int],
               label: str | None = None, failed: bool = False) -> dict[float, dict[int, float]]:
    """``{lr: {sweep seed: final validation loss}}`` (a diverged run counts as ``inf``), for
    one method when ``label`` is given; the failed runs too with ``failed``."""
    grid: dict[float, dict[int, float]] = {}
    for r in rows:
        if ((label is None or r["method"] == label) and int(r["seed"]) in sweep_seeds
                and (failed or r["status"] != "failed")):
            grid.setdefault(float(r["lr"]), {})[int(r["seed"])] = _final_loss(r)
    return grid


#: A method counts as swept when every sweep seed ran at least this many rates; fewer is a
#: method run at Kaiming's rate only (its "own" rate is then Kaiming's, not a tuned one).
MIN_SWEPT_RATES = 3

#: A rate is "as good as the best" within this relative margin of the method's best mean
#: final validation loss (5 %: about the seed-to-seed spread of the MiniLM tasks).
SENSITIVITY_MARGIN = 0.05


def _step_change(lrs: Sequence[float], means: Sequence[float], best: int, side: int) -> str:
    """Mean loss one grid point below (``side`` −1) or above (+1) the best, minus the best;
    "–" off the grid or when that neighbour is not one ×2 step away."""
    i = best + side
    if not 0 <= i < len(lrs) or not math.isclose(lrs[i] / lrs[best], 2.0 ** side,
                                                 rel_tol=1e-6):
        return "–"
    return f"{means[i] - means[best]:+.4f}" if math.isfinite(means[i]) else "diverged"


def sensitivity_table(rows: list[dict[str, Any]], methods: list[Method],
                      sweep_seeds: Sequence[int]) -> list[str]:
    """Markdown rows answering "which is least sensitive to the rate?" from the sweep.

    Per method with every sweep seed at ≥ 3 rates: its best rate on the grid, the change of
    the mean final validation loss one ×2 step below and above it, and the widest run of
    adjacent grid rates, containing the best, whose mean stays within
    :data:`SENSITIVITY_MARGIN` of the best (its span as hi/lo: a wider band is a method
    that forgives a mistuned rate); and each sweep seed's own best rate, which says whether
    the choice of the rate is firmer than the seed noise ("agree") or not."""
    lines = []
    for m in methods:
        by_lr = losses_by_lr(rows, sweep_seeds, m.label, complete=True)
        if len(by_lr) < MIN_SWEPT_RATES:
            continue
        lrs = sorted(by_lr)
        picks = seed_picks(rows, sweep_seeds, m.label, lrs)
        each = ", ".join(f"{x:g}" for x in picks)
        means = [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
        best = min(range(len(lrs)), key=lambda i: (means[i], lrs[i]))
        ok = [math.isfinite(v) and v <= means[best] * (1 + SENSITIVITY_MARGIN) for v in means]
        lo = hi = best
        while lo > 0 and ok[lo - 1]:
            lo -= 1
        while hi < len(lrs) - 1 and ok[hi + 1]:
            hi += 1
        edge = " (grid edge)" if best in (0, len(lrs) - 1) else ""
        lines.append(f"| `{m.label}` | {len(lrs)} ({lrs[0]:g}…{lrs[-1]:g}) | "
                     f"{lrs[best]:g}{edge} | {means[best]:.4f} | "
                     f"{_step_change(lrs, means, best, -1)} | "
                     f"{_step_change(lrs, means, best, +1)} | "
                     f"{lrs[lo]:g}…{lrs[hi]:g} (×{lrs[hi] / lrs[lo]:g}) | "
                     f"{'agree' if set(picks) == {lrs[best]} else each} |")
    if not lines:
        return []
    return [f"Over the sweep seeds {list(sweep_seeds)} (mean final validation loss per rate; "
            f"the band: adjacent rates within {SENSITIVITY_MARGIN:.0%} of the best; each "
            "seed's best: the rate every sweep seed alone would pick, in seed order):", "",
            "| method | rates swept | best rate | best mean final val | Δ at ½× | Δ at 2× | "
            f"band within {SENSITIVITY_MARGIN:.0%} | each seed's best |",
            "|---|---|---|---|---|---|---|---|", *lines, ""]


def seed_picks(rows: list[dict[str, Any]], sweep_seeds: Sequence[int], label: str,
               lrs: Sequence[float]) -> list[float]:
    """The rate among ``lrs`` with the lowest final validation loss for each sweep seed
    alone, in the order of ``sweep_seeds`` (ties to the lower rate)."""
    loss: dict[int, dict[float, float]] = {}
    for lr, by_seed in sweep_grid(rows, sweep_seeds, label).items():
        if any(math.isclose(lr, x) for x in lrs):
            for seed, value in by_seed.items():
                loss.setdefault(seed, {})[lr] = value
    return [min(loss[s], key=lambda lr: (loss[s][lr], lr)) for s in sweep_seeds if s in loss]


def attempted_lrs(rows: list[dict[str, Any]], sweep_seeds: Sequence[int]) -> list[float]:
    """The rates (ascending) that every sweep seed has run, whatever the outcome.

    A rate only some sweep seeds reached (a sweep interrupted while growing past an edge)
    is not yet tried: counting it would stop the growth there and leave it unfinished.
    """
    need = set(sweep_seeds)
    return sorted(lr for lr, by_seed in sweep_grid(rows, sweep_seeds, failed=True).items()
                  if need <= by_seed.keys())


def edge_extension(tried: Sequence[float], best: float, ratio: float) -> float | None:
    """The next rate beyond the grid when ``best`` is its smallest or largest value."""
    if math.isclose(best, min(tried)):
        return best / ratio
    if math.isclose(best, max(tried)):
        return best * ratio
    return None


def grid_ratio(lrs: Sequence[float]) -> float | None:
    """The step between neighbours of a geometric rate grid (2.0 for a ×2 grid); None for
    a single rate, which has no edge to grow past."""
    return (max(lrs) / min(lrs)) ** (1 / (len(lrs) - 1)) if len(lrs) > 1 else None


#: The methods a drop-in is measured against, in order of preference.
REFERENCES = ("kaiming", "peft:true")


def recorded_reference_lr(rows: list[dict[str, Any]], lrs: Sequence[float],
                          sweep_seeds: Sequence[int], extend: int) -> float | None:
    """The reference's chosen rate from its *finished* sweep in ``rows``; None when no
    reference was run.

    Lets a drop-in call that leaves the reference out of its methods run beside the call
    that sweeps it (two processes split one configuration's methods).  Finished means every
    grid rate on every sweep seed and no pending step past an edge (at most ``extend``).

    Raises
    ------
    ValueError
        When the reference's sweep is not finished.
    """
    ratio = grid_ratio(lrs)
    for label in REFERENCES:
        mine = [r for r in rows if r["method"] == label]
        if not mine:
            continue
        by_lr = losses_by_lr(mine, sweep_seeds, complete=True)
        missing = [lr for lr in lrs if not any(math.isclose(lr, x) for x in by_lr)]
        if missing:
            raise ValueError(f"the drop-in phase needs {label}'s rate, but its sweep on seeds "
                             f"{list(sweep_seeds)} lacks {', '.join(f'{x:g}' for x in missing)}"
                             f"; run {label} first (or name it in --strategies)")
        best = select_lr(mine, sweep_seeds)
        beyond = sum(1 for x in by_lr if not min(lrs) <= x <= max(lrs))
        nxt = edge_extension(sorted(by_lr), best, ratio) if ratio and best else None
        if nxt is not None and beyond < extend:
            raise ValueError(f"{label}'s best rate {best:g} is on its grid's edge and its sweep "
                             f"would grow to {nxt:g}; finish {label}'s sweep first")
        return best
    return None


def sweep_seeds_of(s: dict[str, Any], sweep_all: bool = False) -> list[int]:
    """The seeds the rate grid is swept on (the first ``s["sweep_seeds"]``, default 1)."""
    seeds = list(s["seeds"])
    return seeds if sweep_all else seeds[: max(1, int(s.get("sweep_seeds", 1)))]


def run_all(task_name: str, s: dict[str, Any], methods: list[Method], out: Path,
            sweep_all: bool, extend: int = 2, regime: str = "base",
            phases: Sequence[str] = ("dropin", "sweep", "seeds")) -> Path:
    """Run every (method, seed, lr) not yet in ``out/runs.csv``; return the CSV path.

    Phases, in order (a run needed by several is done once; an interrupted call resumes):

    ``dropin``
        Kaiming's rate sweep on the sweep seeds (grown past an edge), then every method at
        Kaiming's chosen rate on every seed: "can I keep my learning rate?".  Methods without
        Kaiming take its rate from its finished sweep in runs.csv
        (:func:`recorded_reference_lr`), so another process may run Kaiming.
    ``sweep``
        every method's own rate sweep on the sweep seeds (grown past an edge up to
        ``extend`` times).
    ``seeds``
        every method at its own chosen rate on the other seeds.

    Calibration: covinit's statistics pass is shared by every data-driven method; with a
    gradient side (some method needs it) it runs once per seed, because the gradient
    depends on the seed's fresh head.  Methods with ``lr=`` (:attr:`Method.needs_lr`) get
    one init per rate.
    """
    csv_path = out / "runs.csv"
    cfg = config_id(task_name, s)
    done = [r for r in read_rows(csv_path) if r["config"] == cfg]
    have = {(r["method"], int(r["seed"]), float(r["lr"])) for r in done}
    failed = {r["method"] for r in done if r["status"] == "failed"}
    seeds, lrs = list(s["seeds"]), [float(x) for x in s["lrs"]]
    sweep_seeds = sweep_seeds_of(s, sweep_all)
    ratio = grid_ratio(lrs)
    gradient = any(m.needs_gradient for m in methods)
    sides = ("input", "output", "gradient") if gradient else ("input", "output")
    scaling = float(s["alpha"]) / int(s["rank"])
    data: TaskData | None = None
    calibrations: dict[int, tuple[Any, float]] = {}
    base_loss: dict[int, float] = {}

    def task_data() -> TaskData:
        nonlocal data
        if data is None:  # built lazily: a finished configuration loads no model
            print(f"[{task_name}/{regime}] building model and data ...", flush=True)
            data = get_task(task_name).build(s)
            print(f"[{task_name}/{regime}] {data.sizes}", flush=True)
            quant = s.get("quantize")
            if quant is not None:
                names = quantize_base(data, quant["layers"], quant["bits"],
                                      quant["block_size"])
                print(f"[{task_name}/{regime}] base quantized: {len(names)} linear layers "
                      f"({', '.join(quant['layers'])}) to {quant['bits']}-bit NF, block "
                      f"{quant['block_size']} (simulated: dequantized weights)", flush=True)
        return data

    def calibrate_for(seed: int) -> tuple[Any, float]:
        key = seed if gradient else -1  # activations do not depend on the head's seed
        if key not in calibrations:
            # Keep one: a SmolLM2 calibration with a gradient side and folds is GBs, and one
            # per seed grew a process to 18 GB (OOM-killed with two on 24 GB).  A seed is
            # revisited only in a later phase, where calibrating again costs seconds.
            calibrations.clear()
            d = task_data()
            model = d.fresh_model(seed) if gradient else d.base
            start = time.perf_counter()
            cal = covinit.calibrate(model, d.calibration, targets=s["targets"], sides=sides,
                                    folds=s["folds"], show_progress=False)
            calibrations[key] = (cal, time.perf_counter() - start)
            print(f"[{task_name}/{regime}] covinit.calibrate (sides {sides}, seed "
                  f"{seed if gradient else 'any'}): {len(cal.layer_names)} layers, "
                  f"{calibrations[key][1]:.1f} s", flush=True)
        return calibrations[key]

    def record_failure(row: dict[str, Any], todo: list[float], e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:400]
        print(f"  {row['method']} seed {row['seed']}: FAILED {msg}", flush=True)
        for lr in todo:
            append_row(csv_path, {**row, "lr": lr, "status": "failed", "note": msg,
                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, FIELDS)
            done.append({k: str(v) for k, v in {**row, "lr": lr, "status": "failed"}.items()})
        failed.add(row["method"])

    def prepare(method: Method, seed: int, lr: float | None) -> tuple[nn.Module, float, float,
                                                                        str]:
        d = task_data()
        if method.family == "covinit":
            cal, c_s = calibrate_for(seed) if method.needs_calibration else (None, 0.0)
            model, init_s, note = prepare_covinit(method, d, s, seed, cal, lr)
            if method.needs_calibration and gradient and not method.needs_gradient:
                note = (note + "; " if note else "") + "calibration had a gradient side"
            return model, c_s, init_s, note
        model, init_s, note = prepare_peft(method, d, s, seed)
        if method.name in PEFT_DATA_PASS:  # PEFT's data pass is its calibration
            return model, init_s, 0.0, note
        return model, 0.0, init_s, note

    def run_group(method: Method, seed: int, todo: Sequence[float]) -> None:
        todo = [lr for lr in todo if (method.label, seed, lr) not in have]
        if not todo or method.label in failed:
            return
        d = task_data()
        if seed not in base_loss:
            base_loss[seed] = d.evaluate(d.fresh_model(seed), d.validation_curve or [])[0]
        row = {"task": task_name, "regime": regime, "config": cfg, "method": method.label,
               "family": method.family, "strategy": method.name,
               "estimator": method.estimator, "options": json.dumps(dict(method.options)),
               "preserves": method.preserves, "seed": seed, "steps": s["steps"],
               "base_val_loss": base_loss[seed]}
        shared = None
        for lr in todo:
            try:
                if shared is None or method.needs_lr:
                    shared = prepare(method, seed, lr)
            except Exception as e:  # record why it could not run, keep going
                record_failure(row, [x for x in todo if (method.label, seed, x) not in have],
                               e)
                return
            model, c_s, init_s, note = shared
            result = train(copy.deepcopy(model), d, s, seed, lr)
            full = {**row, **result, "lr": lr, "s_lr": scaling * lr, "note": note,
                    "calib_s": round(c_s, 3), "init_s": round(init_s, 3),
                    "train_s": round(result["train_s"], 2),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            append_row(csv_path, full, FIELDS)
            have.add((method.label, seed, lr))
            done.append({k: str(v) for k, v in full.items()})
            print(f"  {method.label:<32} seed {seed} lr {lr:g}: val loss "
                  f"{result['step0_val_loss']:.4f} -> {result['final_val_loss']:.4f}, AUC "
                  f"{result['val_auc']:.4f}, test {d.metric} {result['test_metric']:.4f} "
                  f"({result['status']}, {result['train_s']:.0f} s)", flush=True)

    def sweep(method: Method) -> float | None:
        """Grid on the sweep seeds, grown past an edge; the chosen rate."""
        for seed in sweep_seeds:
            run_group(method, seed, lrs)
        for _ in range(extend if ratio else 0):
            # A best rate on the grid's edge says the grid missed the optimum: try one more
            # step beyond it, so no init is judged at a rate chosen for another.
            rows = [r for r in done if r["method"] == method.label]
            tried = attempted_lrs(rows, sweep_seeds)
            best = select_lr(rows, sweep_seeds)
            nxt = None if best is None else edge_extension(tried, best, ratio)
            if nxt is None or any(math.isclose(nxt, x) for x in tried):
                break
            for seed in sweep_seeds:
                run_group(method, seed, [nxt])
        return select_lr([r for r in done if r["method"] == method.label], sweep_seeds)

    ref = next((m for m in methods if m.label in REFERENCES), None)
    if "dropin" in phases:
        # Without the reference among the methods, its finished sweep in runs.csv decides.
        ref_lr = (sweep(ref) if ref is not None
                  else recorded_reference_lr(done, lrs, sweep_seeds, extend))
        if ref_lr is None:
            print(f"[{task_name}/{regime}] drop-in skipped: no finished "
                  f"{' or '.join(REFERENCES)} sweep in this configuration", flush=True)
        else:
            for seed in seeds:
                for method in methods:
                    run_group(method, seed, [ref_lr])
    if "sweep" in phases:
        for method in methods:
            sweep(method)
    if "seeds" in phases:
        for method in methods:
            best = select_lr([r for r in done if r["method"] == method.label], sweep_seeds)
            if best is None:
                continue
            for seed in seeds:
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
    return next((k for k in REFERENCES if "rows" in stats.get(k, {})), None)


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
        if lr is None:  # a sweep still running: no rate has every sweep seed yet
            stats[m.label] = {"method": m, "failed": "no rate finished on every sweep seed "
                                                    f"{list(sweep_seeds)} yet"}
            continue
        # In seed order: "seeds" and every per-run list below pair up by position.
        at = sorted((r for r in mine if float(r["lr"]) == lr and r["status"] != "failed"),
                    key=lambda r: int(r["seed"]))
        stats[m.label] = {
            "method": m, "lr": lr, "rows": at,
            "rates": len(losses_by_lr(mine, sweep_seeds, complete=True)),
            "seeds": sorted(int(r["seed"]) for r in at),
            "calib_s": [_float(r, "calib_s") for r in at],
            "init_s": [_float(r, "init_s") for r in at],
            "step0": [_float(r, "step0_val_loss") for r in at],
            "base": [_float(r, "base_val_loss") for r in at],
            "val_at": {f: [_at(r, round(steps * f)) for r in at] for f in FRACTIONS},
            "final_val": [_float(r, "final_val_loss") for r in at],
            "auc": [_float(r, "val_auc") for r in at],
            "test_loss": [_float(r, "test_loss") for r in at],
            "test_metric": [_float(r, "test_metric") for r in at],
            "diverged": sum(r["status"] != "ok" for r in at),
        }
    ref_label = reference_label(stats)
    ref = stats[ref_label] if ref_label else None
    target = None
    if ref:
        # Steps-to-reach compares curves, so the target is Kaiming's final *curve* loss
        # (the subset the curve is evaluated on), not the full-set final loss.
        target = mean_std([_curve(r)[1][-1] for r in ref["rows"]])[0]
        for st in stats.values():
            if "rows" in st:
                st["reach"] = [steps_to_reach(r, target) for r in st["rows"]]
    for st in stats.values():
        st["ref_loss"] = target
    if ref:
        # A user who tuned the rate for Kaiming and switches init keeps that rate: each
        # method's runs at Kaiming's lr*, every seed it has there.
        for label, st in stats.items():
            at_ref = sorted((r for r in rows if r["method"] == label
                             and math.isclose(float(r["lr"]), ref["lr"])
                             and r["status"] != "failed"), key=lambda r: int(r["seed"]))
            st["ref_lr"] = ref["lr"]
            st["at_ref"] = {"seeds": [int(r["seed"]) for r in at_ref],
                            "final_val": [_final_loss(r) for r in at_ref],
                            "auc": [_float(r, "val_auc") for r in at_ref]}
            st["at_ref_lr"] = [_final_loss(r) for r in at_ref
                               if int(r["seed"]) in sweep_seeds]
    return stats


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) and finite else math.nan


def paired_interval(deltas: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the paired-t confidence interval of the mean difference.

    ``mean ± t_{(1+level)/2, n−1} · sd / √n`` over the per-seed differences (``sd`` with
    ddof = 1); NaN bounds for fewer than two differences.
    """
    from scipy.stats import t as student_t

    vals = [float(d) for d in deltas]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean, sd = mean_std(vals)
    if n < 2 or not math.isfinite(sd):
        return mean, math.nan, math.nan
    half = float(student_t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def fmt_interval(deltas: Sequence[float], digits: int = 4) -> str:
    """``"+0.0123 [−0.0010, +0.0256] (5)"``; a bold ``**`` marks an interval clear of 0."""
    if not deltas:
        return "–"
    mean, lo, hi = paired_interval(deltas)
    if not math.isfinite(lo):
        return f"{mean:+.{digits}f} ({len(deltas)})"
    text = f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] ({len(deltas)})"
    return f"**{text}**" if hi < 0 or lo > 0 else text


def paired_delta(st: dict[str, Any], ref: dict[str, Any], key: str,
                 skip: Collection[int] = ()) -> list[float]:
    """``st[key] − ref[key]`` per seed both ran (a seed fixes data order and random draws
    for every method, so paired differences cancel the shared part of the noise), leaving
    out the seeds in ``skip`` (the sweep seeds, whose noise chose the rates compared)."""
    theirs = dict(zip(ref.get("seeds", []), ref.get(key, []), strict=True))
    return [v - theirs[seed] for seed, v in zip(st.get("seeds", []), st.get(key, []),
                                                  strict=True)
            if seed in theirs and seed not in skip]


def ratio_interval(num: Sequence[float], den: Sequence[float],
                   level: float = 0.95) -> tuple[float, float, float]:
    """``(ratio, low, high)``: the ratio of paired means ``mean(num)/mean(den)`` and its
    Fieller confidence interval.

    The interval holds every ``ρ`` that a paired t-test does not reject as the mean of
    ``num − ρ·den`` being 0: ``(ā − ρ·b̄)² ≤ t²·(s_aa − 2ρ·s_ab + ρ²·s_bb)/n`` (sample
    (co)variances with ddof = 1, ``t = t_{(1+level)/2, n−1}``), a quadratic in ``ρ``.  When
    ``den``'s mean is not itself resolved from 0 at that level the set is unbounded:
    ``(−inf, +inf)`` bounds.  NaN bounds for fewer than two pairs.

    Parameters
    ----------
    num, den : sequence of float, shape (n,)
        Paired per-seed numerators and denominators.
    level : float, default=0.95
    """
    from scipy.stats import t as student_t

    a = [float(x) for x in num]
    b = [float(x) for x in den]
    if len(a) != len(b):
        raise ValueError(f"ratio_interval needs paired values, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    a_bar, b_bar = sum(a) / n, sum(b) / n
    ratio = a_bar / b_bar if b_bar != 0 else math.nan
    if n < 2:
        return ratio, math.nan, math.nan
    s_aa = sum((x - a_bar) ** 2 for x in a) / (n - 1)
    s_bb = sum((y - b_bar) ** 2 for y in b) / (n - 1)
    s_ab = sum((x - a_bar) * (y - b_bar) for x, y in zip(a, b, strict=True)) / (n - 1)
    q = float(student_t.ppf((1 + level) / 2, n - 1)) ** 2 / n
    qa, qb, qc = b_bar ** 2 - q * s_bb, a_bar * b_bar - q * s_ab, a_bar ** 2 - q * s_aa
    if qa <= 0:  # the denominator's interval contains 0: no finite bound
        return ratio, -math.inf, math.inf
    root = math.sqrt(max(qb * qb - qa * qc, 0.0))  # ≥ 0: ratio itself is in the set
    return ratio, (qb - root) / qa, (qb + root) / qa


def fmt_share(num: Sequence[float], den: Sequence[float]) -> str:
    """``"48 % [21 %, 75 %] (5)"``: :func:`ratio_interval` as percentages; bold when the
    interval excludes 0; "gap not resolved" when it is unbounded."""
    if not num:
        return "–"
    ratio, lo, hi = ratio_interval(num, den)
    if not math.isfinite(ratio):
        return f"– (gap 0) ({len(num)})"
    if math.isnan(lo):
        return f"{100 * ratio:.0f} % ({len(num)})"
    if math.isinf(lo):
        return f"{100 * ratio:.0f} % [unbounded: gap not resolved] ({len(num)})"
    text = f"{100 * ratio:.0f} % [{100 * lo:.0f} %, {100 * hi:.0f} %] ({len(num)})"
    return f"**{text}**" if lo > 0 or hi < 0 else text


def _by_seed(rows: list[dict[str, Any]], label: str, lr: float | None,
             key: str) -> dict[int, float]:
    """``seed -> row[key]`` for ``label``'s finished runs at ``lr`` (any rate: None)."""
    out: dict[int, float] = {}
    for r in rows:
        if r["method"] == label and r["status"] == "ok" and (
                lr is None or math.isclose(float(r["lr"]), lr)):
            out.setdefault(int(r["seed"]), _float(r, key))
    return out


def gap_pairs(rows: list[dict[str, Any]], fp_rows: list[dict[str, Any]], label: str,
              ref_label: str, lr: float | None, key: str) -> tuple[list[float], list[float]]:
    """Per seed where ``label``, the quantized base's ``ref_label`` (QLoRA) and the
    full-precision ``ref_label`` all ran at ``lr`` (any rate: None, for step 0):
    ``(QLoRA − method, QLoRA − full precision)`` of ``key``, in seed order.  Their ratio
    of means is the share of the full-precision gap the method restores."""
    mine = _by_seed(rows, label, lr, key)
    qlora = _by_seed(rows, ref_label, lr, key)
    full = _by_seed(fp_rows, ref_label, lr, key)
    seeds = sorted(set(mine) & set(qlora) & set(full))
    return ([qlora[x] - mine[x] for x in seeds], [qlora[x] - full[x] for x in seeds])


def _highlights(stats: dict[str, dict[str, Any]], n_covinit: int = 3) -> list[str]:
    """Methods drawn in colour: the Kaiming baselines, the best covinit methods and the best
    PEFT data-driven one by mean final validation loss, and every quantized-base method
    (:data:`QUANT_NAMES`) that ran."""
    ok = {k: v for k, v in stats.items() if "rows" in v}
    by_val = sorted(ok, key=lambda k: _mean(ok[k]["final_val"]))
    cov = [k for k in by_val if ok[k]["method"].needs_calibration][:n_covinit]
    peft = [k for k in by_val if k in PEFT_DATA_DRIVEN][:1]
    shown = [k for k in REFERENCES if k in ok] + cov + peft
    return shown + [k for k in QUANT_NAMES if k in ok and k not in shown]


def plot(stats: dict[str, dict[str, Any]], path: Path, title: str, metric: str,
         reference_curve: tuple[list[int], list[float], str] | None = None) -> None:
    """Validation curves (highlighted methods in colour, the rest grey) and, per method, the
    final validation loss and test metric as mean ± std bars; ``reference_curve`` (steps,
    mean losses, label) is drawn in black (a quantized regime's full-precision Kaiming)."""
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
    if reference_curve is not None:
        ax_v.plot(reference_curve[0], reference_curve[1], color="k", linewidth=1.6,
                  linestyle="-.", zorder=4, label=reference_curve[2])
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


def plot_lr_sensitivity(rows: list[dict[str, Any]], methods: list[Method], path: Path,
                        sweep_seeds: Sequence[int], title: str) -> None:
    """Final validation loss against the rate, one line per method: mean ± std over the
    sweep seeds (diverged runs drawn at the top of the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("tab10")
    finite = [_float(r, "final_val_loss") for r in rows if r["status"] == "ok"]
    if not finite:
        plt.close(fig)
        return
    swept: set[float] = set()
    for i, m in enumerate(methods):
        by_lr = losses_by_lr(rows, sweep_seeds, m.label)
        if not by_lr:
            continue
        lrs = sorted(by_lr)
        swept.update(lrs)
        stats = [mean_std([v for v in by_lr[x] if math.isfinite(v)]) for x in lrs]
        mu = [m_ if math.isfinite(m_) else max(finite) for m_, _ in stats]
        sd = [s_ if math.isfinite(s_) else 0.0 for _, s_ in stats]
        ax.errorbar(lrs, mu, yerr=sd, marker="o", capsize=3, color=cmap(i % 10),
                    linestyle="--" if m.family == "peft" else "-", label=m.label)
    ax.set_xscale("log")
    # Ticks at the swept rates themselves (a ×2 grid): log-axis minor labels such as
    # "3×10⁻⁴" name rates nobody ran and overlap.
    ax.set_xticks(sorted(swept), [f"{x:.3g}" for x in sorted(swept)], fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="learning rate", ylabel="final validation loss",
           title=f"{textwrap.fill(title, 80)}\nmean ± std over sweep seeds "
                 f"{list(sweep_seeds)}")
    ax.title.set_fontsize(10)  # a long task name must not run off the figure
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def full_precision_rows(task_name: str, s: dict[str, Any],
                        reference: Path | None) -> tuple[list[dict[str, Any]], str]:
    """A quantized regime's full-precision reference: the rows of ``reference/runs.csv``
    whose config is this one's without quantization (same settings otherwise), and that
    config id.  Empty when the file or the rows are missing."""
    cfg = config_id(task_name, {**s, "quantize": None})
    if reference is None:
        return [], cfg
    return [r for r in read_rows(reference / "runs.csv") if r["config"] == cfg], cfg


def gap_section(rows: list[dict[str, Any]], fp_rows: list[dict[str, Any]],
                stats: dict[str, dict[str, Any]], s: dict[str, Any], reference: Path | None,
                fp_cfg: str, metric: str) -> list[str]:
    """The summary's "share of the full-precision gap restored" section (quantized
    regimes): at step 0, at QLoRA's tuned rate and at each method's own rate."""
    quant = s["quantize"]
    ref_label = reference_label(stats)
    where = (f"`{reference.relative_to(ROOT) if reference.is_relative_to(ROOT) else reference}"
             f"/runs.csv`" if reference is not None else "(no reference folder)")
    lines = ["## How much of the full-precision gap does each init restore?", "",
             f"Base: every linear layer matching {', '.join(quant['layers'])} quantized to "
             f"{quant['bits']}-bit NF, block {quant['block_size']} (simulated: a plain layer "
             "holding the dequantized weight, the same forward math as a bitsandbytes "
             "layer); every init starts from this same quantized model, the `quant-*` ones "
             "with the full-precision weights (`full_precision=`).  Full precision: the "
             f"Kaiming runs in {where} with config `{fp_cfg}` (these settings without "
             "quantization).  Share restored = (QLoRA − method) / (QLoRA − full precision) "
             "of the validation loss, paired by seed at the same rate; 95% Fieller interval "
             "of that ratio of paired means (unbounded when the gap itself is not resolved "
             "from 0); **bold** when it excludes 0.", ""]
    fp_ok = [r for r in fp_rows if r["method"] == ref_label and r["status"] == "ok"]
    if ref_label is None or not fp_ok:
        lines += [f"No full-precision `{ref_label or 'kaiming'}` runs found in {where} with "
                  f"config `{fp_cfg}`: run that regime's Kaiming at the same settings first "
                  "(see benchmarks/results/PLAN.md).", ""]
        return lines
    q_lr = stats[ref_label]["lr"]
    gap0 = gap_pairs(rows, fp_rows, ref_label, ref_label, None, "step0_val_loss")[1]
    gap_f = gap_pairs(rows, fp_rows, ref_label, ref_label, q_lr, "final_val_loss")[1]
    lines += [f"- The gap, QLoRA − full precision (paired by seed): step-0 validation loss "
              f"{fmt_interval(gap0)}; final validation loss at QLoRA's lr* = {q_lr:g} "
              f"{fmt_interval(gap_f)}.",
              "- Step 0 is the curve's validation subset before training (for a classifier "
              "with a fresh head, the head's loss: it shows little of the encoder's "
              "quantization damage; benchmarks/quant_init.py measures that).", "",
              f"| method | what | step-0 share [95% CI] (n) | final share at QLoRA's lr* "
              f"{q_lr:g} [95% CI] (n) | final share at own lr* [95% CI] (n) |",
              "|---|---|---|---|---|"]
    for label, st in stats.items():
        if "rows" not in st:
            continue
        what = QUANT_NAMES.get(label, "")
        if label == ref_label:
            lines.append(f"| `{label}` | {what} | 0 (ref.) | 0 (ref.) | 0 (ref.) |")
            continue
        step0 = gap_pairs(rows, fp_rows, label, ref_label, None, "step0_val_loss")
        at_q = gap_pairs(rows, fp_rows, label, ref_label, q_lr, "final_val_loss")
        own = gap_pairs(rows, fp_rows, label, ref_label, st["lr"], "final_val_loss")
        lines.append(f"| `{label}` | {what} | {fmt_share(*step0)} | {fmt_share(*at_q)} | "
                     f"{fmt_share(*own)} (lr {st['lr']:g}) |")
    return [*lines, ""]


def _reference_curve(fp_rows: list[dict[str, Any]], label: str | None,
                     lr: float | None) -> tuple[list[int], list[float], str] | None:
    """Mean validation curve of the full-precision ``label`` runs at ``lr``."""
    runs = [r for r in fp_rows if r["method"] == label and r["status"] == "ok"
            and lr is not None and math.isclose(float(r["lr"]), lr)]
    if not runs:
        return None
    curves = [_curve(r) for r in runs]
    steps = curves[0][0]
    same = [c[1] for c in curves if c[0] == steps]
    mean = [sum(v) / len(same) for v in zip(*same, strict=True)]
    return steps, mean, f"full precision {label} (lr {lr:g}, {len(same)} seeds)"


def write_summary(task_name: str, s: dict[str, Any], methods: list[Method], out: Path,
                  sweep_all: bool, started: dict[str, str], quick: bool,
                  regime: str = "base", reference: Path | None = None) -> Path | None:
    """``summary.md``, ``learning_curves.png`` and ``lr_sensitivity.png`` from every matching
    row of runs.csv; the summary's path, or None when runs.csv holds no run of this
    configuration.

    ``reference``: for a quantized regime, the folder whose ``runs.csv`` holds the
    full-precision Kaiming runs (:func:`full_precision_rows`)."""
    task = get_task(task_name)
    cfg = config_id(task_name, s)
    rows = [r for r in read_rows(out / "runs.csv") if r["config"] == cfg]
    if not rows:  # nothing to summarize (a drop-in skipped for want of Kaiming's rate)
        return None
    methods = recorded_methods(methods, rows)
    seeds = list(s["seeds"])
    sweep_seeds = sweep_seeds_of(s, sweep_all)
    stats = summarize(rows, methods, s, sweep_seeds)
    ref_label = reference_label(stats)
    ref = stats[ref_label] if ref_label else None
    metric = started.get("metric", "metric")
    steps = int(s["steps"])
    scaling = float(s["alpha"]) / int(s["rank"])
    what = f"{task.description} [{regime}]: LoRA r={s['rank']}, {steps} steps"
    fp_rows, fp_cfg = (full_precision_rows(task_name, s, reference) if s.get("quantize")
                       else ([], ""))
    plot(stats, out / "learning_curves.png", what + " (lr chosen on validation)", metric,
         _reference_curve(fp_rows, ref_label, ref["lr"] if ref else None))
    plot_lr_sensitivity(rows, methods, out / "lr_sensitivity.png", sweep_seeds, what)

    head_ref = ("| method | Δ final val [95% CI] (n) | Δ val AUC [95% CI] (n) | final val |")
    head_own = ("| method | lr* | s·lr* | seeds | Δ final val [95% CI] (n) | Δ val AUC [95% CI] "
                "(n) | Δ final val, seeds past the sweep | final val | steps to Kaiming's final "
                f"| test {metric} | calib s | init s |")
    ref_lr = f"{ref['lr']:g}" if ref else "–"
    lines = [f"# compare_inits: {task_name} / {regime}{' (quick)' if quick else ''}", "",
             f"{task.description}.  {started.get('sizes', '')}.", "",
             f"- Command: `{started['command']}`",
             f"- Started {started['time']}, summary written {time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"- Machine: {machine()}; load average now {load_average()} (2 shared cores: "
             "seconds are inflated accordingly; runs.csv dates every run)",
             f"- Settings: regime `{regime}`, targets {s['targets']}, rank {s['rank']}, α "
             f"{s['alpha']:g} (s = α/r = {scaling:g}), {steps} steps × batch "
             f"{s['batch_size']}, AdamW (no weight decay), ×2 lr grid {s['lrs']} (grown past "
             f"an edge), sweep seeds {sweep_seeds}, seeds {seeds}, calibration "
             f"{s['n_calib']} examples; validation curve every {steps // int(s['eval_points'])}"
             f" steps on {s.get('n_val_curve', s['n_val'])} examples, final on all; config id "
             f"`{cfg}`." + (f"  Quantized base: {s['quantize']['bits']}-bit NF (below)."
                            if s.get("quantize") else ""),
             "- Statistics: Δ = method − Kaiming per seed (paired: a seed fixes the data order,"
             " head and dropout for every method); 95% interval = paired t over seeds "
             "(mean ± t₀.₉₇₅,ₙ₋₁·sd/√n); **bold** when it excludes 0. AUC = area under the "
             "validation-loss curve / steps (a mean loss over training). At the own rates, "
             f"the sweep seeds {list(sweep_seeds)} chose both rates compared, so their Δ "
             "favours each method by the noise that picked its rate; \"seeds past the sweep\" "
             "is the Δ without them.", ""]
    if ref:
        lines += [f"## Can I keep my learning rate? (every method at Kaiming's lr* = {ref_lr}, "
                  f"s·lr = {scaling * ref['lr']:g})", "", head_ref,
                  "|" + "---|" * (head_ref.count("|") - 1)]
        for label, st in stats.items():
            if "at_ref" not in st:
                continue
            a = st["at_ref"]
            dv = [] if label == ref_label else paired_delta(a, ref["at_ref"], "final_val")
            da = [] if label == ref_label else paired_delta(a, ref["at_ref"], "auc")
            lines.append(f"| `{label}` | {'ref.' if label == ref_label else fmt_interval(dv)} | "
                         f"{'ref.' if label == ref_label else fmt_interval(da)} | "
                         f"{fmt_mean_std(a['final_val'])} |")
        lines.append("")
    lines += ["## Which init is best at its own tuned rate?", "", head_own,
              "|" + "---|" * (head_own.count("|") - 1)]
    for label, st in stats.items():
        if "failed" in st:
            lines.append(f"| `{label}` | failed: {st['failed'][:150]} |" + " – |" * 10)
            continue
        reach = st.get("reach", [])
        got = [r for r in reach if r is not None]
        reach_s = (f"{sum(got) / len(got):.0f} ({len(got)}/{len(reach)} seeds)" if got else
                   f"not reached (0/{len(reach)})" if reach else "–")
        own = ref is not None and label != ref_label
        dv = paired_delta(st, ref, "final_val") if own else []
        da = paired_delta(st, ref, "auc") if own else []
        # The sweep seeds chose both rates, so their Δ flatters whichever rate their noise
        # favoured; the other seeds give the unbiased (if wider) estimate.
        dh = paired_delta(st, ref, "final_val", skip=sweep_seeds) if own else []
        div = f" ({st['diverged']} diverged)" if st["diverged"] else ""
        # Too few rates on the sweep seeds: the rate is Kaiming's (drop-in), not tuned.
        swept = ("" if st["rates"] >= MIN_SWEPT_RATES or label == ref_label
                 else " (not swept)")
        lines.append(
            f"| `{label}` | {st['lr']:g}{swept} | {scaling * st['lr']:g} | "
            f"{len(st['seeds'])}{div} | "
            f"{fmt_interval(dv) if own else 'ref.'} | {fmt_interval(da) if own else 'ref.'} | "
            f"{fmt_interval(dh) if own else 'ref.'} | "
            f"{fmt_mean_std(st['final_val'])} | {reach_s} | {fmt_mean_std(st['test_metric'])} | "
            f"{_mean(st['calib_s']):.1f} | {_mean(st['init_s']):.2f} |")
    if s.get("quantize"):
        lines += ["", *gap_section(rows, fp_rows, stats, s, reference, fp_cfg, metric)]
    missing = [m.label for m in methods if m.label not in stats]
    train_s = [_float(r, "train_s") for r in rows if r["status"] == "ok"]
    lines += ["", "## Which is least sensitive to the rate?", "",
              *sensitivity_table(rows, methods, sweep_seeds),
              "See `lr_sensitivity.png`: final validation loss against the rate, mean ± std "
              "over the sweep seeds.", ""]
    if missing:
        lines += [f"Not run yet (resume with the same command): {', '.join(missing)}.", ""]
    lines += [
        "## Notes", "",
        "- Methods: the command's, plus every method that runs.csv holds for this "
        "configuration (earlier commands may have run other methods with other flags).",
        "- Labels: `STRATEGY@ESTIMATOR+OPTION` (covinit; `+matched`: `scale=\"matched\"`); "
        "`grad-svd`, `grad-whiten`, `kfac` default to `scale=\"matched\"`; `lora-ga` is "
        "covinit's faithful LoRA-GA (the paper's stable scale), `peft:lora_ga` is PEFT's port "
        "(singular values in B): two different inits.",
        "- Residual strategies with `+matched` take `lr=` = the run's rate: one init per rate.",
        "- With a gradient side in the shared calibration (once per seed: the gradient depends "
        "on the seed's fresh head), `input-pca`/`input-whiten` `+matched` use the exact "
        "gradient-based gain, not the closed form.",
        "- `calib s`: covinit's calibration pass (shared, counted for each method) or PEFT's "
        "own pre-processing; `init s`: estimator + strategy.",
        f"- Steps to Kaiming's final: first curve point at or below Kaiming's mean final curve "
        f"loss (resolution {steps // int(s['eval_points'])} steps).",
        f"- Runs so far: {len(rows)}; training time per run {fmt_mean_std(train_s, 0)} s, "
        f"{sum(train_s) / 3600:.1f} h in all (plus evaluation).",
    ]
    if task.budget and not quick:
        # The task's budget line describes its base regime; say what this regime changes.
        over = ", ".join(f"{k}={v}" for k, v in REGIMES.get(regime, {}).items()
                         if k not in VARIANT_KEYS)  # a quantized base has its own section
        lines.append(f"- {task.budget}" if not over else
                     f"- The task's base regime: {task.budget} Regime `{regime}` changes "
                     f"{over} (the settings above are this regime's).")
    if quick:
        lines += ["- Quick mode is a smoke run (few steps, one seed, one rate): it shows the "
                  "pipeline, not evidence.", f"- {full_benchmark_line()}"]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def full_benchmark_line() -> str:
    """What the full benchmark found: the ``**Default`` line of
    ``benchmarks/results/default_strategy.md`` (written by ``choose_default.py``)."""
    path = RESULTS / "default_strategy.md"
    found = next((ln for ln in path.read_text(encoding="utf-8").splitlines()
                  if ln.startswith("**Default")), None) if path.is_file() else None
    return ("The full benchmark (benchmarks/results/default_strategy.md): " + found if found
            else "The full benchmark has not chosen a default yet (benchmarks/choose_default.py).")


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
    p.add_argument("--regime", default="base", choices=list(REGIMES),
                   help="named configuration (see REGIMES): low-data, long, r4, r32, "
                        "all-linear; nf4, nf3, nf2: a quantized base (QLoRA, LoftQ, CLoQ)")
    p.add_argument("--reference", default=None,
                   help="quantized regimes: folder whose runs.csv holds the full-precision "
                        "Kaiming runs (default benchmarks/results/<task>-base, or "
                        "<task>/quick with --quick)")
    p.add_argument("--phases", default="dropin,sweep,seeds",
                   help="comma-separated subset, run in this order: dropin (every method at "
                        "Kaiming's rate, all seeds), sweep (own rate grids), seeds (own rate, "
                        "all seeds)")
    p.add_argument("--sweep-seeds", type=int, default=None,
                   help="how many of the first seeds sweep the rate grid")
    p.add_argument("--extend-lr-grid", type=int, default=2,
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
             "strategies": args.strategies, "sweep_seeds": args.sweep_seeds}
    regime = dict(REGIMES[getattr(args, "regime", "base")])
    if args.quick:
        regime = {k: v for k, v in regime.items() if k in QUICK_REGIME_KEYS}
    if regime.get("targets") == "all":
        regime["targets"] = list(s.get("all_targets", s["targets"]))
    if "quantize" in regime:
        quant = dict(regime["quantize"])
        if quant["layers"] == "all":
            quant["layers"] = list(s.get("all_targets", s["targets"]))
        regime["quantize"] = quant
    epochs = regime.pop("epochs", None)
    s.update(regime)
    if epochs is not None:  # steps from the (regime's) training-set size
        s["steps"] = max(1, round(epochs * int(s["n_train"]) / int(s["batch_size"])))
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
        print("quick list:", ", ".join(quick_methods()))
        print("regimes:", ", ".join(REGIMES))
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
    quantized = "quantize" in REGIMES[args.regime]
    out = (Path(args.out) if args.out
           else RESULTS / f"{args.task}-{args.regime}" / "quick" if args.quick and quantized
           else RESULTS / args.task / "quick" if args.quick
           else RESULTS / f"{args.task}-{args.regime}")
    reference = None
    if quantized:  # the full-precision runs the gap is measured against
        fp_regime = reference_regime(args.regime)
        reference = (Path(args.reference) if args.reference
                     else RESULTS / args.task / "quick" if args.quick
                     else RESULTS / f"{args.task}-{fp_regime}" if fp_regime else None)
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
        phases = [x.strip() for x in args.phases.split(",") if x.strip()]
        unknown = set(phases) - {"dropin", "sweep", "seeds"}
        if unknown:
            parser.error(f"unknown phases {sorted(unknown)}; allowed: dropin, sweep, seeds")
        run_all(args.task, s, methods, out, args.sweep_all_seeds, args.extend_lr_grid,
                args.regime, phases)
    # Facts the summary needs from the task without rebuilding it.
    data_facts = _task_facts(args.task, s)
    started.update(data_facts)
    path = write_summary(args.task, s, methods, out, args.sweep_all_seeds, started, args.quick,
                         args.regime, reference)
    if path is None:
        print(f"[{task.name}] no run of this configuration in {out / 'runs.csv'} yet: no "
              "summary written")
        return 0
    print(f"[{task.name}] wrote {out / 'runs.csv'}, {path}, {out / 'learning_curves.png'} "
          f"in {time.perf_counter() - t0:.0f} s")
    print(path.read_text(encoding="utf-8"))
    return 0


def _task_facts(task_name: str, s: dict[str, Any]) -> dict[str, str]:
    """Metric name, its direction and the data-size line (cheap: no model is loaded)."""
    metric = "perplexity" if task_name.startswith("smollm2") else "accuracy"
    sizes = {
        "minilm-rt": (f"Rotten Tomatoes (fixed split, seed 0): {s['n_train']} train, "
                      f"{s['n_val']} validation, {s['n_test']} test; the first {s['n_calib']} "
                      f"train examples calibrate; max_length {s['max_length']}"),
        "smollm2-hamlet": (f"Hamlet: up to {s['n_train']} train blocks of {s['max_length']} "
                           f"tokens, {s['n_val']} validation / {s['n_test']} test blocks from "
                           f"the held-out end of the play; {s['n_calib']} calibration blocks"),
    }.get(task_name, f"{s['n_train']} train, {s['n_val']} validation, {s['n_test']} test, "
                     f"{s['n_calib']} calibration examples")
    return {"metric": metric, "higher_is_better": "0" if metric == "perplexity" else "1",
            "sizes": sizes}


if __name__ == "__main__":
    sys.exit(main())
