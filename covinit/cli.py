"""The ``covinit`` command line: calibrate, report, compare, list strategies and estimators.

::

    covinit calibrate --model minilm --data rotten-tomatoes --out cal.safetensors
    covinit report cal.safetensors --out report/ --model minilm
    covinit compare --quick                      # forwards to benchmarks/compare_inits.py
    covinit strategies
    covinit estimators

Installed as a console script (``pyproject.toml``); ``python -m covinit`` is the same.
Usage errors exit with status 2 (argparse), runtime errors (a bad file, a layer that does
not exist, ...) print one line ``covinit: error: ...`` on stderr and exit with status 1
(``COVINIT_TRACEBACK=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "compare_script", "main"]

_PROG = "covinit"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show meaningful defaults and keep the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help  # "(default: None)" says nothing
        return super()._get_help_string(action)


# ---------------------------------------------------------------------- model and data
def _offline() -> None:
    # Everything covinit's zoo loads ships in pip packages; never reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_model(spec: str, task: str = "auto") -> tuple[Any, Any, bool]:
    """``(model, tokenizer, causal)`` for a zoo name or a local Hugging Face folder.

    Parameters
    ----------
    spec : str
        ``"minilm"``, ``"smollm2"`` (:data:`covinit.zoo.MODELS`) or a directory holding a
        ``config.json`` and tokenizer files.
    task : {"auto", "base", "sequence-classification", "causal-lm"}
        For a directory: which ``transformers`` class to build.  ``auto`` uses the class
        named in the config's ``architectures`` (so a calibration matches the model you will
        fine-tune), else ``AutoModel``.
    """
    from covinit import zoo

    _offline()
    if spec in zoo.MODELS:
        model, tokenizer = zoo.MODELS[spec]()
        return model, tokenizer, spec == "smollm2"
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--model {spec!r} is neither a known model ({', '.join(zoo.MODELS)}) "
                         "nor an existing directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {spec}: no config.json in that directory (expected a "
                         "Hugging Face model folder written by save_pretrained)")
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    classes = {"base": "AutoModel", "sequence-classification":
               "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}
    if task == "auto":
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
    else:
        cls = getattr(transformers, classes[task])
    model = cls.from_pretrained(str(path))
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    causal = task == "causal-lm" or "CausalLM" in type(model).__name__
    return model, tokenizer, causal


def build_loader(spec: str, tokenizer: Any, *, batch_size: int, max_length: int,
                 text_column: str | None = None, seed: int = 0) -> Any:
    """Calibration batches for a zoo dataset name or a text file (.txt, .jsonl, .csv, .tsv).

    ``rotten-tomatoes`` and files give one padded example per text (padding is masked out of
    the statistics); ``hamlet`` gives consecutive blocks of ``max_length`` tokens of the play's
    training part.
    """
    from covinit import zoo

    if getattr(tokenizer, "pad_token", None) is None:
        # Decoder tokenizers often have none; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if spec == "hamlet":
        train_text, _ = zoo.hamlet()
        return zoo.causal_lm_loader(tokenizer, train_text, max_length, batch_size)
    if spec == "rotten-tomatoes":
        texts = [text for text, _ in zoo.rotten_tomatoes(seed=seed)["train"]]
    elif Path(spec).exists():
        texts = zoo.read_text_dataset(spec, text_column)
    else:
        raise ValueError(f"--data {spec!r} is neither a known dataset ({', '.join(zoo.DATASETS)}) "
                         "nor an existing file (.txt, .jsonl, .csv, .tsv)")
    return zoo.text_classification_loader(tokenizer, texts, batch_size, max_length)


def _drop_labels(model: Any, batch: Any) -> Any:
    """Calibration needs activations only; labels would also make the model compute a loss
    (and a (B, T) causal-LM label tensor does not fit a sequence classifier)."""
    return model(**{key: value for key, value in batch.items() if key != "labels"})


# ---------------------------------------------------------------------- verbs
def _cmd_calibrate(args: argparse.Namespace) -> int:
    from covinit import zoo
    from covinit.calibration import calibrate

    model, tokenizer, _ = load_model(args.model, args.task)
    targets = args.targets or zoo.DEFAULT_TARGETS.get(args.model)
    if not targets:
        raise ValueError(f"--targets is required for model {args.model!r} (layer name "
                         "suffixes such as query value, or 'all' for every linear layer)")
    if targets == ["all"]:
        targets = lambda name, module: True  # every linear layer
    elif len(targets) == 1 and any(ch in targets[0] for ch in "*[]()|^$\\+?"):
        targets = targets[0]  # one regular expression, matched against the full name
    loader = build_loader(args.data, tokenizer, batch_size=args.batch_size,
                          max_length=args.max_length, text_column=args.text_column,
                          seed=args.seed)
    cal = calibrate(model, loader, targets=targets, sides=tuple(args.sides),
                    forward_fn=_drop_labels, max_batches=args.max_batches,
                    device=args.device, show_progress=not args.quiet, folds=args.folds,
                    precision=args.precision)
    cal.info.update({"model": args.model, "data": args.data,
                     "targets": " ".join(args.targets or zoo.DEFAULT_TARGETS[args.model])})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out)
    print(f"calibrated {len(cal.layer_names)} layers ({', '.join(cal.sides)}) on "
          f"{cal.info['batches']} batches / {cal.info['positions']} positions in "
          f"{cal.info['seconds']:.1f} s -> {out}")
    return 0


def _geometry(spec: str | None) -> Any:
    if spec is None:
        return None
    if spec == "chain":
        return "chain"
    if spec.startswith("grid:"):
        try:
            rows, cols = (int(v) for v in spec[5:].split(","))
        except ValueError:
            raise ValueError(f"--geometry {spec!r}: expected grid:ROWS,COLS") from None
        return ("grid", rows, cols)
    raise ValueError(f"--geometry {spec!r}: expected 'chain' or 'grid:ROWS,COLS'")


def _cmd_report(args: argparse.Namespace) -> int:
    from covinit.calibration import Calibration
    from covinit.report import report

    cal = Calibration.load(args.calibration)
    model = None
    if args.model is not None:
        spec = cal.info.get("model") if args.model == "recorded" else args.model
        if spec is None:
            raise ValueError("--model recorded: the calibration file records no model")
        model, _, _ = load_model(spec, args.task)
    spatpca: Any = None
    if args.no_spatpca:
        spatpca = False
    elif args.geometry is not None:
        spatpca = {"geometry": _geometry(args.geometry)}
    if isinstance(spatpca, dict) and cal.n_folds < 2:
        raise ValueError("--geometry needs a calibration with folds (covinit calibrate "
                         "--folds 5) to cross-validate the smooth PCA")
    layers = args.layers if args.layers is None or len(args.layers) > 1 else args.layers[0]
    spatpca_layers = None if args.spatpca_layers < 0 else args.spatpca_layers
    from tqdm.auto import tqdm

    with tqdm(desc="report", unit="side", leave=False, disable=args.quiet) as bar:
        rep = report(cal, model, args.out, rank=args.rank, estimators=args.estimators,
                     layers=layers, sides=args.sides, rank_budget=args.rank_budget,
                     spatpca=spatpca, spatpca_layers=spatpca_layers,
                     figures=not args.no_figures, max_figures=args.max_figures,
                     progress=lambda _message: bar.update(1))
    if not args.quiet:
        print(rep.table())
    print(f"report of {len(rep.summaries)} layer sides in {rep.seconds:.1f} s: {rep.html}, "
          f"{rep.markdown}, {rep.json} ({len(rep.figures)} figures)")
    return 0


def compare_script() -> Path:
    """Where ``covinit compare`` looks for the benchmark: ``$COVINIT_COMPARE_SCRIPT``, else
    ``benchmarks/compare_inits.py`` of the source checkout covinit is imported from."""
    override = os.environ.get("COVINIT_COMPARE_SCRIPT")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "benchmarks" / "compare_inits.py"


def _cmd_compare(rest: Sequence[str]) -> int:
    script = compare_script()
    if not script.is_file():
        if any(flag in rest for flag in ("-h", "--help")):
            print(f"usage: {_PROG} compare [ARGS ...]\n\n{_COMPARE_HELP}")
        raise ValueError(f"the comparison benchmark {script} was not found; it ships with the "
                         "source repository (benchmarks/), not with the installed package: run "
                         "covinit from a checkout or set COVINIT_COMPARE_SCRIPT")
    _offline()
    # A child process: the benchmark owns its argv, exit status and global torch settings.
    return subprocess.call([sys.executable, str(script), *rest])


def _list(entries: dict[str, str], extra: dict[str, str] | None = None) -> None:
    width = max(map(len, entries))
    for name, description in entries.items():
        tag = f" [{extra[name]}]" if extra and extra.get(name) else ""
        print(f"{name.ljust(width)}  {description}{tag}")


def _cmd_strategies(args: argparse.Namespace) -> int:
    from covinit.strategies import get_strategy, strategies

    found = strategies()
    tags = {}
    for name in found:
        entry = get_strategy(name)
        facts = []
        needs = entry.tags.get("needs")
        if needs:
            facts.append("needs " + "+".join(needs) + " statistics")
        if entry.tags.get("preserves"):
            facts.append(f"preserves {entry.tags['preserves']}")
        tags[name] = ", ".join(facts)
    _list(found, tags)
    return 0


def _cmd_estimators(args: argparse.Namespace) -> int:
    from covinit.estimators import estimators

    _list(estimators())
    return 0


# ---------------------------------------------------------------------- parser
_COMPARE_HELP = """\
Run benchmarks/compare_inits.py (every init strategy, same model, data, rank, steps and seeds)
with the remaining arguments; `covinit compare --help` shows the benchmark's own options."""


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``covinit`` (one subparser per verb)."""
    parser = argparse.ArgumentParser(
        prog=_PROG, formatter_class=_Formatter,
        description="Covariance-informed LoRA initialization: calibrate a frozen model on task "
                    "data, inspect what calibration found, compare init strategies.",
        epilog="examples:\n"
               "  covinit calibrate --model minilm --data rotten-tomatoes --out cal.safetensors\n"
               "  covinit report cal.safetensors --out report --model minilm\n"
               "  covinit strategies")
    from covinit import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    cal = verbs.add_parser(
        "calibrate", formatter_class=_Formatter,
        help="collect activation statistics of a model on data into a .safetensors file",
        description="Run a frozen model over task data once and save every target layer's "
                    "input/output activation statistics (float64 moments) as safetensors.",
        epilog="examples:\n"
               "  covinit calibrate --model minilm --data rotten-tomatoes --out cal.safetensors\n"
               "  covinit calibrate --model smollm2 --data hamlet --targets q_proj v_proj "
               "--folds 5 --out cal.safetensors\n"
               "  covinit calibrate --model ./my-bert --data texts.jsonl --text-column body "
               "--targets all --out cal.safetensors")
    cal.add_argument("--model", required=True,
                     help="minilm, smollm2, or a Hugging Face model directory")
    cal.add_argument("--task", default="auto",
                     choices=("auto", "base", "sequence-classification", "causal-lm"),
                     help="model class for a directory (auto: the config's architecture)")
    cal.add_argument("--data", required=True,
                     help="rotten-tomatoes, hamlet, or a file: .txt (one text per line), "
                          ".jsonl / .csv / .tsv (a text column)")
    cal.add_argument("--text-column", default=None,
                     help="field / column holding the text in a .jsonl or .csv file "
                          "(default: text)")
    cal.add_argument("--targets", nargs="+", default=None,
                     help="layer name suffixes (query value), one regular expression matched "
                          "against the full name, or 'all' (default for minilm/smollm2: the "
                          "attention projections)")
    cal.add_argument("--out", required=True, help="output .safetensors file")
    cal.add_argument("--max-batches", type=_positive, default=32,
                     help="stop after this many batches")
    cal.add_argument("--batch-size", type=_positive, default=16, help="examples per batch")
    cal.add_argument("--max-length", type=_at_least_two, default=128,
                     help="tokens per example (hamlet: block length)")
    cal.add_argument("--folds", type=_positive, default=None,
                     help="keep M per-fold summaries (needed by the spatpca estimator's "
                          "cross-validation)")
    cal.add_argument("--sides", nargs="+", choices=("input", "output"),
                     default=["input", "output"], help="activations to summarise")
    cal.add_argument("--precision", choices=("float64", "mixed"), default="float64",
                     help="mixed: float32 Gram products (about half the cost, ~1e-7 relative)")
    cal.add_argument("--device", default=None, help="e.g. cuda:0 (default: the model's)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the dataset split")
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.set_defaults(func=_cmd_calibrate)

    rep = verbs.add_parser(
        "report", formatter_class=_Formatter,
        help="write figures, an HTML page and a Markdown summary of a calibration",
        description="Per layer and side: eigenvalue spectra (empirical vs shrunk), explained "
                    "variance at the LoRA rank, effective rank, condition number, shrinkage, "
                    "SpatPCA parameters and loadings (with folds), principal angles to W0's "
                    "singular subspace (with --model). Writes OUT/report.html (self-contained), "
                    "OUT/report.md, OUT/summary.json and OUT/figures/*.png.",
        epilog="examples:\n"
               "  covinit report cal.safetensors --out report\n"
               "  covinit report cal.safetensors --out report --model recorded --rank 16\n"
               "  covinit report cal.safetensors --out report --layers 'layer\\.0\\.' "
               "--geometry chain")
    rep.add_argument("calibration", help="file written by covinit calibrate")
    rep.add_argument("--out", required=True, help="output directory")
    rep.add_argument("--model", default=None,
                     help="minilm, smollm2, a model directory, or 'recorded' (the one named in "
                          "the file); enables principal angles to W0")
    rep.add_argument("--task", default="auto",
                     choices=("auto", "base", "sequence-classification", "causal-lm"),
                     help="model class for a directory (auto: the config's architecture)")
    rep.add_argument("--rank", type=_positive, default=8, help="LoRA rank to mark")
    rep.add_argument("--rank-budget", type=_positive, default=None,
                     help="mark ranks allocated from this total budget (EVA-style)")
    rep.add_argument("--estimators", nargs="+", default=["empirical", "ledoit_wolf", "oas"],
                     help="spectra to draw (see covinit estimators)")
    rep.add_argument("--layers", nargs="+", default=None,
                     help="layer names, or one regex searched in each name")
    rep.add_argument("--sides", nargs="+", choices=("input", "output"), default=None,
                     help="default: every side the file holds")
    rep.add_argument("--geometry", default=None,
                     help="smooth-PCA feature geometry: chain or grid:ROWS,COLS")
    rep.add_argument("--spatpca-layers", type=int, default=4,
                     help="smooth PCA on the first N layers (with folds); -1 = all")
    rep.add_argument("--no-spatpca", action="store_true", help="skip smooth PCA")
    rep.add_argument("--no-figures", action="store_true", help="numbers and pages only")
    rep.add_argument("--max-figures", type=_positive, default=None,
                     help="per-side figures for the first N layer sides only")
    rep.add_argument("--quiet", action="store_true", help="do not print the table")
    rep.set_defaults(func=_cmd_report)

    # Parsed by hand in main() (everything after the verb goes to the benchmark); listed
    # here for the top-level help.
    verbs.add_parser("compare", help="compare init strategies (runs benchmarks/compare_inits.py)",
                     description=_COMPARE_HELP, add_help=False)

    st = verbs.add_parser("strategies", help="list init strategies",
                          description="List the registered LoRA init strategies with one-line "
                                      "descriptions and what calibration statistics they need.")
    st.set_defaults(func=_cmd_strategies)
    es = verbs.add_parser("estimators", help="list covariance estimators",
                          description="List the registered covariance estimators.")
    es.set_defaults(func=_cmd_estimators)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``covinit`` console script; returns the exit status.

    Usage errors raise ``SystemExit(2)`` from argparse; ``ValueError``, ``TypeError``,
    ``ImportError``, ``OSError`` and ``RuntimeError`` from the work itself are printed as one
    line ``covinit: error: ...`` and give status 1 (set ``COVINIT_TRACEBACK=1`` to get the
    traceback instead).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "compare":
            return _cmd_compare(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except (ValueError, TypeError, ImportError, OSError, RuntimeError) as err:
        if os.environ.get("COVINIT_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
