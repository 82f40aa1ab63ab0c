"""Quantized bases at step 0: how much of the full-precision model each LoRA init restores.

For every linear layer of the encoder (MiniLM) or decoder (SmolLM2) the base weight ``W`` is
replaced by its ``bits``-bit normal-float quantization ``Q(W)`` (``covinit.quant.quantize``;
4 bits = bitsandbytes' nf4 codes, block 64) and a rank-``r`` adapter is initialized by:

- ``qlora``            : Kaiming A, B = 0 (QLoRA: the adapter starts at zero);
- ``quant-svd``        : top-r SVD of ``W − Q`` (LoftQ one step, data-free);
- ``quant-svd@iter5``  : LoftQ's alternation, 5 rounds;
- ``quant-residual``   : top-r SVD of ``(W − Q)·M^{1/2}`` mapped back (CLoQ), ``M`` the
  Ledoit-Wolf-shrunk input second moment from the calibration data;
- ``quant-residual@empirical`` : the same with the unshrunk sample ``M``;
- ``peft:loftq``       : PEFT's ``init_lora_weights="loftq"`` (tried; its failure is recorded).

The quantized base is **simulated**: a plain ``nn.Linear`` holding ``Q(W)`` in float32, the same
forward math as a bitsandbytes ``Linear4bit`` with float32 compute (see README, "Quantized
bases").  Measured, per bit width:

- layer output error on held-out positions: for each layer ``‖(W − Q − c·B·A)·x‖ / ‖W·x‖``
  over the *full-precision* model's inputs to that layer on held-out data, computed exactly
  from their second moment; reported as the mean over layers (and on the calibration
  positions, to show in- vs out-of-sample);
- model validation loss: SmolLM2, causal-LM cross-entropy on held-out Hamlet blocks; MiniLM,
  the cross-entropy of a logistic-regression probe fitted on the full-precision model's
  mean-pooled embeddings of Rotten Tomatoes training snippets, evaluated on validation snippets
  (plus the relative error of those embeddings); "restored" is the share of the
  qlora → full-precision loss gap closed; 95 % intervals from a paired bootstrap over
  held-out examples (blocks).

Run::

    python benchmarks/quant_init.py --model minilm            # ~3 min here
    python benchmarks/quant_init.py --model smollm2           # ~10 min here
    python benchmarks/quant_init.py --model minilm --quick    # smoke run, < 1 min

Outputs (``--out``, default ``benchmarks/results/quant``): ``<model>.csv`` (one row per bit
width × method), ``<model>.png`` and ``<model>.md`` (table, command, machine, load).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import zoo

import covinit
from covinit import add_lora, calibrate, find_adapters, initialize
from covinit.quant import quantize

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_CACHE = ROOT / ".cache" / "smollm2"
METHODS = ("qlora", "quant-svd", "quant-svd@iter5", "quant-residual",
           "quant-residual@empirical", "peft:loftq")
FIELDS = ["model", "bits", "method", "status", "layer_err_heldout", "layer_err_calib",
          "embed_err", "val_loss", "val_loss_ci_lo", "val_loss_ci_hi", "delta_vs_qlora",
          "delta_ci_lo", "delta_ci_hi", "restored", "metric", "seconds", "note"]

Batch = dict[str, Tensor]


# ---------------------------------------------------------------------- tasks
class Task:
    """A base model, its target layers, calibration and held-out batches, and a per-example
    loss ``losses(model) -> (n,)`` on the held-out set."""

    name: str
    base: nn.Module
    targets: list[str]
    calibration: list[Batch]
    heldout: list[Batch]
    metric: str

    def losses(self, model: nn.Module) -> tuple[Tensor, Tensor | None]:
        """Per-example held-out losses (n,) and, where defined, embeddings (n, h)."""
        raise NotImplementedError


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, h)


class MiniLMTask(Task):
    """all-MiniLM-L6-v2 on Rotten Tomatoes; a linear probe fitted on full-precision
    embeddings gives the validation loss (the encoder's pretrained head is its embedding)."""

    metric = "probe cross-entropy"

    def __init__(self, quick: bool, n_calib: int | None = None) -> None:
        torch.manual_seed(0)
        model, tok = zoo.load_minilm(num_labels=2)
        self.name = "minilm"
        self.base = model.bert.eval()
        self.targets = ["attention.self.query", "attention.self.key", "attention.self.value",
                        "attention.output.dense", "intermediate.dense", "output.dense"]
        sizes = (256, 64, 128) if quick else (2048, 256, 1024)
        n_train, default_calib, n_val = sizes
        n_calib = default_calib if n_calib is None else n_calib
        data = zoo.rotten_tomatoes(seed=0, n_train=n_train, n_val=n_val)
        loader = zoo.text_classification_loader
        self.calibration = list(loader(tok, data["train"][:n_calib], min(32, n_calib), 64))
        self.train = list(loader(tok, data["train"], 64, 64))
        self.heldout = list(loader(tok, data["validation"], 64, 64))
        self.probe = self._fit_probe()

    @torch.no_grad()
    def _embed(self, model: nn.Module, batches: Iterable[Batch]) -> tuple[Tensor, Tensor]:
        feats, labels = [], []
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            feats.append(_mean_pool(out.last_hidden_state, b["attention_mask"]))
            labels.append(b["labels"])
        return torch.cat(feats).double(), torch.cat(labels)

    def _fit_probe(self) -> Any:
        from sklearn.linear_model import LogisticRegression

        x, y = self._embed(self.base, self.train)
        return LogisticRegression(C=1.0, max_iter=2000).fit(x.numpy(), y.numpy())

    def losses(self, model: nn.Module) -> tuple[Tensor, Tensor | None]:
        x, y = self._embed(model, self.heldout)
        logp = torch.from_numpy(self.probe.predict_log_proba(x.numpy()))  # (n, 2)
        return -logp.gather(1, y[:, None]).squeeze(1), x


class SmolLM2Task(Task):
    """SmolLM2-135M-Instruct (weights: dequantized Q4_1) on Hamlet; held-out block losses."""

    metric = "causal-LM cross-entropy"

    def __init__(self, quick: bool, n_calib: int | None = None) -> None:
        model, tok = zoo.load_smollm2(cache_dir=SMOLLM2_CACHE)
        self.name = "smollm2"
        self.base = model.eval()
        self.targets = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        train, held = zoo.hamlet(heldout_fraction=0.1)
        default_calib, n_val, length = (4, 8, 64) if quick else (16, 32, 128)
        n_calib = default_calib if n_calib is None else n_calib
        calib = list(zoo.causal_lm_loader(tok, train, length, 4))[: max(1, n_calib // 4)]
        self.calibration = calib
        self.heldout = list(zoo.causal_lm_loader(tok, held, length, 1))[:n_val]

    @torch.no_grad()
    def losses(self, model: nn.Module) -> tuple[Tensor, Tensor | None]:
        out = []
        for b in self.heldout:
            ids = b["input_ids"]  # (1, T)
            logits = model(input_ids=ids).logits[:, :-1]  # (1, T−1, V)
            out.append(nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                                   ids[:, 1:].flatten()))
        return torch.stack(out).double(), None


# ---------------------------------------------------------------------- methods
def _suffix_targets(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n.endswith(s) for s in suffixes)]


def build(task: Task, method: str, bits: int, cal: Any, rank: int, alpha: float) -> nn.Module:
    """A copy of the base with adapters on every target, initialized by ``method`` over a
    ``bits``-bit base."""
    if method == "peft:loftq":
        return _peft_loftq(task, bits, rank, alpha)
    model = add_lora(copy.deepcopy(task.base), _suffix_targets(task.base, task.targets),
                     rank=rank, alpha=alpha)
    name, _, variant = method.partition("@")
    if name == "qlora":
        initialize(model, strategy="kaiming")
        for adapter in find_adapters(model).values():
            adapter.set_base_weight(quantize(adapter.base_weight(), bits))
        return model
    options: dict[str, Any] = {"bits": bits}
    estimator = "ledoit_wolf"
    if variant.startswith("iter"):
        options["iterations"] = int(variant[4:])
    elif variant:
        estimator = variant
    initialize(model, cal if name == "quant-residual" else None, strategy=name,
               estimator=estimator, **options)
    return model


def _peft_loftq(task: Task, bits: int, rank: int, alpha: float) -> nn.Module:
    """PEFT's LoftQ (``init_lora_weights="loftq"``); raises what PEFT raises on this machine."""
    from peft import LoftQConfig, LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=task.targets,
                        init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=bits))
    return get_peft_model(copy.deepcopy(task.base), config)


# ---------------------------------------------------------------------- measurements
def _second_moments(cal: Any, names: Iterable[str]) -> dict[str, Tensor]:
    """Uncentred input second moment ``Σxxᵀ/n`` (k, k) per layer, float64."""
    out = {}
    for name in names:
        m = cal.moments(name, "input")
        about0 = m.recentered(torch.zeros_like(m.mean))
        out[name] = about0.m2 / about0.n
    return out


def layer_errors(model: nn.Module, base: nn.Module, moments: dict[str, Tensor]) -> float:
    """Mean over layers of ``‖(W − base − c·B·A)·x‖ / ‖W·x‖`` under the given moments."""
    originals = dict(base.named_modules())
    rels = []
    for name, adapter in find_adapters(model).items():
        w = originals[name].weight.detach().double()  # (d, k)
        a, b = (t.double() for t in adapter.get_lora())
        effective = adapter.base_weight().double() + adapter.scaling * (b @ a)
        m = moments[name]
        err = w - effective
        rels.append(math.sqrt(float(((err @ m) * err).sum()) / float(((w @ m) * w).sum())))
    return sum(rels) / len(rels)


def bootstrap(values: Tensor, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` (n,) over resampled examples."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.numel(), (reps, values.numel()), generator=gen)
    means = values[idx].mean(dim=1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


# ---------------------------------------------------------------------- driver
def run(task: Task, bits_list: Sequence[int], methods: Sequence[str], rank: int,
        alpha: float) -> list[dict[str, Any]]:
    names = _suffix_targets(task.base, task.targets)
    t0 = time.perf_counter()
    cal = calibrate(task.base, task.calibration, targets=names, sides=("input",),
                    show_progress=False)
    held = calibrate(task.base, task.heldout, targets=names, sides=("input",),
                     show_progress=False)
    m_cal, m_held = _second_moments(cal, names), _second_moments(held, names)
    full_losses, full_embed = task.losses(task.base)
    print(f"{task.name}: {len(names)} layers, statistics in {time.perf_counter() - t0:.1f} s; "
          f"full-precision held-out loss {float(full_losses.mean()):.4f}", flush=True)
    rows: list[dict[str, Any]] = [{
        "model": task.name, "bits": 32, "method": "full-precision", "status": "ok",
        "layer_err_heldout": 0.0, "layer_err_calib": 0.0, "embed_err": 0.0,
        "val_loss": float(full_losses.mean()), "metric": task.metric,
    }]
    lo, hi = bootstrap(full_losses)
    rows[0].update(val_loss_ci_lo=lo, val_loss_ci_hi=hi)
    for bits in bits_list:
        reference: Tensor | None = None
        for method in methods:
            row: dict[str, Any] = {"model": task.name, "bits": bits, "method": method,
                                   "metric": task.metric}
            start = time.perf_counter()
            try:
                model = build(task, method, bits, cal, rank, alpha)
            except Exception as err:
                row.update(status="failed", note=f"{type(err).__name__}: {err}"[:300])
                rows.append(row)
                print(f"  {bits} bits {method:26s} failed: {row['note']}", flush=True)
                continue
            losses, embed = task.losses(model)
            row.update(status="ok", val_loss=float(losses.mean()),
                       layer_err_heldout=layer_errors(model, task.base, m_held),
                       layer_err_calib=layer_errors(model, task.base, m_cal),
                       seconds=round(time.perf_counter() - start, 1))
            row["val_loss_ci_lo"], row["val_loss_ci_hi"] = bootstrap(losses)
            if embed is not None and full_embed is not None:
                row["embed_err"] = float((embed - full_embed).norm() / full_embed.norm())
            if method == "qlora":
                reference = losses
            if reference is not None:
                diff = losses - reference
                row["delta_vs_qlora"] = float(diff.mean())
                row["delta_ci_lo"], row["delta_ci_hi"] = bootstrap(diff)
                gap = float(reference.mean() - full_losses.mean())
                row["restored"] = float(-diff.mean()) / gap if gap > 0 else float("nan")
            rows.append(row)
            print(f"  {bits} bits {method:26s} loss {row['val_loss']:.4f}  layer err "
                  f"held-out {row['layer_err_heldout']:.4f} calib {row['layer_err_calib']:.4f}"
                  f"  restored {row.get('restored', float('nan')):+.2f}  "
                  f"({row['seconds']} s)", flush=True)
    return rows


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def write_summary(path: Path, rows: list[dict[str, Any]], argv: Sequence[str],
                  seconds: float | None) -> None:
    name, metric = rows[0]["model"], rows[0]["metric"]
    load = (f"Load average at the end: {_common.load_average()}; wall time {seconds:.0f} s."
            if seconds is not None else "Summary rewritten from the CSV (--from-csv): the run's "
            "load is not recorded here.")
    lines = [f"# Quantized bases at step 0: {name}", "",
             f"Command: `{_common.command_line(argv)}`  ", f"Machine: {_common.machine()}  ",
             load,
             "", "Quantized base simulated: a plain nn.Linear holding the dequantized "
             "NF-k weight (bitsandbytes' nf4 codes at 4 bits, block 64), float32 compute.",
             f"Validation loss: {metric}; intervals: 95 % paired bootstrap over held-out "
             "examples.", "",
             "| bits | method | held-out layer err | calib layer err | embedding err | "
             "val loss [95 % CI] | Δ vs qlora [95 % CI] | gap restored |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['bits']} | `{r['method']}` | failed: {r.get('note', '')} "
                         "| | | | | |")
            continue
        ci = (f"{_fmt(r['val_loss'])} [{_fmt(r.get('val_loss_ci_lo'))}, "
              f"{_fmt(r.get('val_loss_ci_hi'))}]")
        delta = (f"{_fmt(r['delta_vs_qlora'])} [{_fmt(r['delta_ci_lo'])}, "
                 f"{_fmt(r['delta_ci_hi'])}]" if "delta_vs_qlora" in r else "")
        restored = f"{100 * r['restored']:.0f} %" if "restored" in r else ""
        lines.append(f"| {r['bits']} | `{r['method']}` | {_fmt(r['layer_err_heldout'])} | "
                     f"{_fmt(r['layer_err_calib'])} | {_fmt(r.get('embed_err'))} | {ci} | "
                     f"{delta} | {restored} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["bits"] != 32]
    bits = sorted({r["bits"] for r in ok}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in ok)]
    full = next(r for r in rows if r["method"] == "full-precision")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        pos = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(bits))]
        by_bits = {r["bits"]: r for r in ok if r["method"] == method}
        err = [by_bits[b]["layer_err_heldout"] if b in by_bits else float("nan") for b in bits]
        loss = [by_bits[b]["val_loss"] if b in by_bits else float("nan") for b in bits]
        lo = [by_bits[b]["val_loss"] - by_bits[b]["val_loss_ci_lo"] if b in by_bits else 0
              for b in bits]
        hi = [by_bits[b]["val_loss_ci_hi"] - by_bits[b]["val_loss"] if b in by_bits else 0
              for b in bits]
        axes[0].bar(pos, err, width, label=method)
        axes[1].bar(pos, loss, width, yerr=[lo, hi], capsize=2, label=method)
    axes[1].axhline(full["val_loss"], color="k", ls="--", lw=1, label="full precision")
    for ax, title in zip(axes, ("held-out layer output error (mean rel.)",
                                f"held-out {rows[0]['metric']}"), strict=True):
        ax.set_xticks(range(len(bits)), [f"{b} bits" for b in bits])
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['model']}: LoRA inits over a quantized base, step 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row back to numbers (empty cells dropped)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value == "":
            continue
        if key == "bits":
            out[key] = int(value)
        elif key in ("model", "method", "status", "metric", "note"):
            out[key] = value
        else:
            out[key] = float(value)
    return out


def _recorded_command(stem: Path) -> list[str]:
    """The run's command from its existing summary (so a rewrite keeps it), else generic."""
    md = stem.with_suffix(".md")
    if md.is_file():
        for line in md.read_text(encoding="utf-8").splitlines():
            if line.startswith("Command: `python "):
                return line.split("`")[1].split()[1:]
    return ["benchmarks/quant_init.py", "--model", str(stem.name).split("-")[0]]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--bits", default="4,3,2", help="comma-separated bit widths")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--quick", action="store_true", help="smaller data, bits 4 and 2")
    p.add_argument("--n-calib", type=int, default=None,
                   help="calibration examples (MiniLM snippets, SmolLM2 blocks); default "
                        "256 / 16 (quick: 64 / 4); few of them show what shrinkage does")
    p.add_argument("--tag", default="", help="suffix of the output files' names")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quant")
    p.add_argument("--from-csv", type=Path, default=None,
                   help="only rewrite the .md and .png from an existing CSV of this script")
    args = p.parse_args(argv)
    if args.from_csv is not None:
        rows = [_parse(r) for r in _common.read_rows(args.from_csv)]
        stem = args.from_csv.with_suffix("")
        write_summary(stem.with_suffix(".md"), rows, _recorded_command(stem), None)
        plot(stem.with_suffix(".png"), rows)
        return 0
    torch.manual_seed(0)
    start = time.perf_counter()
    builders: dict[str, Callable[[bool, int | None], Task]] = {
        "minilm": MiniLMTask, "smollm2": SmolLM2Task}
    with zoo.quiet_transformers():
        task = builders[args.model](args.quick, args.n_calib)
    bits = [int(b) for b in args.bits.split(",")] if not args.quick else [4, 2]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    rows = run(task, bits, methods, args.rank, args.alpha)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    _common.write_rows(args.out / f"{task.name}{suffix}.csv", rows, FIELDS)
    write_summary(args.out / f"{task.name}{suffix}.md", rows,
                  sys.argv if argv is None else ["benchmarks/quant_init.py", *argv],
                  time.perf_counter() - start)
    plot(args.out / f"{task.name}{suffix}.png", rows)
    print(f"wrote {args.out}/{task.name}{suffix}.{{csv,md,png}} "
          f"(covinit {covinit.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
