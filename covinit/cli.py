"""The ``covinit`` command line: calibrate, init, report, list strategies and estimators.

::

    covinit calibrate --model ./my-bert --data texts.jsonl --out cal.safetensors
    covinit calibrate --model ./SmolLM2-135M.Q4_1.gguf --data book.txt --out cal.safetensors
    covinit init --model ./my-llama --data texts.txt --strategy cov-svd --out adapter/
    covinit report cal.safetensors --out report/ --model recorded
    covinit strategies
    covinit estimators

Models and data are local paths only: ``--model`` is a Hugging Face model folder (written by
``save_pretrained``) or a ``.gguf`` file, ``--data`` a ``.txt``/``.jsonl``/``.csv``/``.tsv``
file (:mod:`covinit.data`).  Installed as a console script (``pyproject.toml``); ``python -m
covinit`` is the same.  Usage errors exit with status 2: argparse's own (a missing or
malformed option), and one line ``covinit: error: ...`` for arguments that cannot work (no
``--targets`` where no default is known, a model folder without a tokenizer and no
``--tokenizer``, a ``--device`` this torch cannot use, statistics larger than
``--max-stats-size``).  Runtime errors (a bad file, a layer that does not exist, ...) print
one line ``covinit: error: ...`` on stderr and exit with status 1 (``COVINIT_TRACEBACK=1``
shows the traceback instead).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from covinit.collect import ALL_SIDES

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DEFAULT_MAX_STATS_SIZE",
    "StatsSize",
    "build_loader",
    "build_parser",
    "load_model",
    "load_tokenizer",
    "main",
    "output_embedding_layers",
    "resolve_device",
    "statistics_size",
]

_PROG = "covinit"

#: Default of ``--max-stats-size``: the float64 statistics a run may hold (bytes, 2 GB).
DEFAULT_MAX_STATS_SIZE = 2 * 10**9


class _UsageError(ValueError):
    """Arguments that cannot work together: one line on stderr and exit status 2."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show meaningful defaults and keep the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help  # "(default: None)" says nothing
        return super()._get_help_string(action)


# ---------------------------------------------------------------------- model and data
def _offline() -> None:
    # The command line reads local folders and files only; never reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ImportError("--model needs transformers to load a Hugging Face model: "
                          "pip install 'covinit[hf]'") from None


# Any of these in a folder means save_pretrained wrote a tokenizer there.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
_TASKS = ("auto", "base", "sequence-classification", "causal-lm")
_TASK_CLASSES = {"base": "AutoModel", "sequence-classification":
                 "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}


def load_tokenizer(spec: str) -> Any:
    """The tokenizer in folder ``spec`` (``--tokenizer``, or a model folder's own).

    Parameters
    ----------
    spec : str
        A directory written by ``tokenizer.save_pretrained`` (a model folder usually is one).

    Raises
    ------
    ValueError
        If ``spec`` is not a directory.
    _UsageError
        If the directory holds no tokenizer files.
    """
    _offline()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--tokenizer {spec!r} is not a directory (expected a folder written "
                         "by tokenizer.save_pretrained)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise _UsageError(f"{spec} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, "
                          "...); pass --tokenizer with a folder that has them")
    from covinit.data import quiet_transformers

    with quiet_transformers():
        return _transformers().AutoTokenizer.from_pretrained(str(path))


def _model_source(spec: str) -> tuple[Path, dict[str, str]]:
    """``(folder, from_pretrained keywords)`` for ``--model``: a folder, or a .gguf file read
    by transformers from its folder (``gguf_file=``)."""
    path = Path(spec)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"--model {spec}: no such GGUF file")
        return path.parent, {"gguf_file": path.name}
    if not path.is_dir():
        raise ValueError(f"--model {spec!r} is neither a Hugging Face model folder nor a .gguf "
                         "file")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {spec}: no config.json in that directory (expected a "
                         "Hugging Face model folder written by save_pretrained)")
    return path, {}


def load_model(spec: str, task: str = "auto", tokenizer: str | None = None, *,
               with_tokenizer: bool = True, quiet: bool = False) -> tuple[Any, Any, bool]:
    """``(model, tokenizer, causal)`` for a local Hugging Face folder or a ``.gguf`` file.

    Parameters
    ----------
    spec : str
        A directory holding a ``config.json`` (and tokenizer files, unless ``tokenizer`` is
        given), or a ``.gguf`` file: transformers dequantizes it to float32 on every load
        (nothing is cached) and reads its tokenizer from the file.
    task : {"auto", "base", "sequence-classification", "causal-lm"}
        Which ``transformers`` class to build.  ``auto`` uses the class named in the config's
        ``architectures`` (so a calibration matches the model you will fine-tune), else
        ``AutoModelForCausalLM`` for a GGUF file and ``AutoModel`` for a folder.
    tokenizer : str, optional
        A folder to take the tokenizer from instead (see :func:`load_tokenizer`).
    with_tokenizer : bool, default=True
        False: return ``None`` for the tokenizer (``covinit report`` needs weights only).
    quiet : bool, default=False
        Silence transformers' load reports and progress bars.
    """
    from covinit.data import quiet_transformers

    _offline()
    folder, gguf = _model_source(spec)
    tf = _transformers()
    # The tokenizer first: a folder without one fails before the weights are read.
    tok = None
    if with_tokenizer:
        if tokenizer is not None or not gguf:
            tok = load_tokenizer(tokenizer or spec)
        else:
            with quiet_transformers():
                tok = tf.AutoTokenizer.from_pretrained(str(folder), **gguf)
    config = tf.AutoConfig.from_pretrained(str(folder), **gguf)
    if task == "auto":
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(tf, arch, None) if arch else None
        cls = cls or (tf.AutoModelForCausalLM if gguf else tf.AutoModel)
    else:
        cls = getattr(tf, _TASK_CLASSES[task])
    with quiet_transformers() if quiet else contextlib.nullcontext():
        model = cls.from_pretrained(str(folder), **gguf)
    model.eval()
    causal = task == "causal-lm" or "CausalLM" in type(model).__name__
    return model, tok, causal


def resolve_device(spec: str | None) -> torch.device | None:
    """``--device`` as a ``torch.device`` this torch can use now, or None when not given.

    Raises
    ------
    _UsageError
        For a string that is no device, a CUDA device on a torch without CUDA or without
        that GPU index, or a backend (mps, xpu, ...) that is not available; checked before
        anything is loaded, so the user gets one line instead of torch's traceback.
    """
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise _UsageError(f"--device {spec!r} is not a device (e.g. cpu, cuda, cuda:1, "
                          "mps)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise _UsageError(f"--device {spec}: CUDA is not available ({why}, torch "
                              f"{torch.__version__}); use --device cpu or leave --device out")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise _UsageError(f"--device {spec}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
        return device
    # mps lives under torch.backends, the other accelerators (xpu, ...) under torch.
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise _UsageError(f"--device {spec}: {device.type} is not available in this torch "
                          f"build ({torch.__version__}); use --device cpu or leave it out")
    return device


def output_embedding_layers(model: nn.Module) -> list[str]:
    """Linear layers that produce vocabulary logits: ``--targets all`` leaves them out.

    That is the model's output embedding (``model.get_output_embeddings()``, the LM head)
    and any linear layer whose weight is the same ``Parameter`` as an embedding's (a tied
    head).  Their output side is vocabulary-wide: 30,522² float64 statistics are 7.45 GB.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    list of str
        Canonical layer names (as :func:`covinit.collect.match_layers` uses), in module order.
    """
    from torch import nn

    from covinit.adapters import find_linear_layers

    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):  # some wrappers do not implement it
        head = None
    embeddings = {id(module.weight) for module in model.modules()
                  if isinstance(module, nn.Embedding)}
    return [name for name, module in find_linear_layers(model).items()
            if module is head or id(getattr(module, "weight", None)) in embeddings]


def _peft_default_targets(model: Any) -> list[str] | None:
    """PEFT's default LoRA targets for the model's architecture (what
    ``LoraConfig(target_modules=None)`` adapts), or None where PEFT has none."""
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return None
    found = mapping.get(getattr(getattr(model, "config", None), "model_type", None))
    return list(found) if found else None


def _select_layers(model: Any, targets: list[str] | None, spec: str, quiet: bool
                   ) -> tuple[dict[str, Any], Any]:
    """``(layers by name, the selection as PEFT's target_modules)`` for ``--targets``.

    Without ``--targets``: PEFT's default for the architecture, else a usage error.  ``all``
    is every linear layer but the output embeddings (:func:`output_embedding_layers`); name
    those to include them.
    """
    from covinit.collect import match_layers

    if targets is None:
        targets = _peft_default_targets(model)
        if not targets:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise _UsageError(f"--targets is required for model {spec!r} (no default for "
                              f"{kind!r}): layer name suffixes such as query value, one "
                              "regular expression, or 'all' for every linear layer")
        if not quiet:
            print(f"{_PROG}: --targets not given: using {' '.join(targets)}", file=sys.stderr)
    if targets == ["all"]:
        heads = output_embedding_layers(model)
        layers = match_layers(model, lambda name, _module: name not in heads)
        if heads and not quiet:
            print(f"{_PROG}: --targets all leaves out the output embedding layer(s) "
                  f"{', '.join(heads)}; name them in --targets to include them",
                  file=sys.stderr)
        return layers, list(layers)
    if len(targets) == 1 and any(ch in targets[0] for ch in "*[]()|^$\\+?"):
        pattern = targets[0]  # one regular expression, fullmatched as PEFT does
        return match_layers(model, pattern), pattern
    return match_layers(model, targets), list(targets)


# ---------------------------------------------------------------------- statistics size
class StatsSize(NamedTuple):
    """Estimated float64 statistics of one layer side (bytes)."""

    layer: str
    side: str
    width: int
    memory: int
    file: int


def statistics_size(layers: Mapping[str, Any], sides: Sequence[str], folds: int = 1,
                    precision: str = "float64") -> list[StatsSize]:
    """Upper bounds on the memory and file size of calibrating ``layers``, before any batch.

    Per layer side of width w (k inputs, d outputs; the gradient side is d wide and adds the
    d×k cross-moment G, so w² reads d·(d + k) there) the w×w co-moment dominates:
    ``(folds + 1)·8·w²`` bytes while collecting (the accumulators plus a batch's temporary,
    as :func:`covinit.calibrate` counts before it starts, plus a small staging buffer of rows)
    and ``8·w²`` per summary in the
    file (the total, plus one per fold with ``folds > 1``).  Layers that share an input
    (q/k/v) store it once, so the file can be smaller.

    Parameters
    ----------
    layers : mapping of str to nn.Module
        Linear layers by name (:func:`covinit.collect.match_layers`).
    sides : sequence of {"input", "output", "gradient"}
    folds : int, default=1
    precision : {"float64", "mixed"}, default="float64"
        ``"mixed"`` adds each fold's float32 pending co-moment (``4·w²``) to the memory.

    Returns
    -------
    list of StatsSize
        One entry per layer and side, in layer order.
    """
    from covinit.collect import Collector, side_bytes

    collector = Collector(layers, sides, folds=folds)  # shapes only: no hook, no matrix yet
    stored = folds + 1 if folds > 1 else 1
    rows = []
    for name, (k, d) in collector.shapes.items():
        for side in collector.sides:
            rows.append(StatsSize(name, side, collector.width(name, side),
                                  side_bytes(k, d, side, folds + 1, precision, staging=True),
                                  side_bytes(k, d, side, stored)))
    return rows


def _gb(n_bytes: float) -> str:
    # Decimal units, as the flag takes them (and as a file manager shows a file).
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


def _check_size(rows: Sequence[StatsSize], limit: int | None, *, file: bool) -> None:
    """Refuse statistics above ``--max-stats-size``, naming the largest layer sides."""
    memory = sum(row.memory for row in rows)
    on_disk = sum(row.file for row in rows) if file else 0
    if limit is None or max(memory, on_disk) <= limit:
        return
    largest = sorted(rows, key=lambda row: row.memory, reverse=True)[:3]
    named = ", ".join(f"{row.layer} {row.side} (width {row.width}: {_gb(row.memory)})"
                      for row in largest)
    disk = f" and {_gb(on_disk)} on disk" if file else ""
    raise _UsageError(
        f"the statistics would take about {_gb(memory)} of memory{disk}, above "
        f"--max-stats-size {_gb(limit)}; largest: {named}. Choose fewer --targets or "
        "--sides, or raise the bound (e.g. --max-stats-size 16GB; 0 = no limit)")


def _stats_size_arg(text: str) -> int | None:
    """``--max-stats-size``: bytes with an optional unit (kB, MB, GB, TB, KiB, MiB, GiB,
    TiB; B), ``0`` for no limit."""
    from covinit.budget import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 500MB, 2GB or 8GiB (0 = no "
                                         f"limit), got {text!r}") from None
    return value or None


def _memory_arg(text: str) -> int:
    """``--max-memory``: a positive size with an optional unit, as ``--max-stats-size``."""
    from covinit.budget import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 512MiB, 8GB or "
                                         f"24GiB, got {text!r}")
    return value


def build_loader(spec: str, tokenizer: Any, *, batch_size: int, max_length: int,
                 text_column: str | None = None, label_column: str | None = None) -> Any:
    """Calibration batches of a text file: one padded example per text (padding is masked
    out of the statistics), with labels when ``label_column`` is given.

    Parameters
    ----------
    spec : str
        A ``.txt`` (one text per line), ``.jsonl``, ``.csv`` or ``.tsv`` file
        (:func:`covinit.data.read_text_dataset`).
    tokenizer : transformers.PreTrainedTokenizerBase
        Given the EOS token as pad token when it has none.
    batch_size, max_length : int
    text_column, label_column : str, optional
        Field/column of the text (default ``text``) and of an integer class label.

    Returns
    -------
    torch.utils.data.DataLoader
        ``{"input_ids", "attention_mask": (B, T)}`` (and ``"labels": (B,)``) batches.
    """
    from covinit.data import read_labelled_dataset, read_text_dataset, text_classification_loader

    if not Path(spec).is_file():
        raise ValueError(f"--data {spec!r} is not a file (expected .txt, one text per line, or "
                         ".jsonl / .csv / .tsv with a text column)")
    if getattr(tokenizer, "pad_token", None) is None:
        # Decoder tokenizers often have none; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    texts: list[Any] = (read_text_dataset(spec, text_column) if label_column is None
                        else list(read_labelled_dataset(spec, label_column, text_column)))
    return text_classification_loader(tokenizer, texts, batch_size, max_length)


def _drop_labels(model: Any, batch: Any) -> Any:
    """Calibration needs activations only; labels would also make the model compute a loss
    (and a (B, T) causal-LM label tensor does not fit a sequence classifier)."""
    return model(**{key: value for key, value in batch.items() if key != "labels"})


def _next_token_loss(model: Any, batch: Any) -> Any:
    """The gradient side of a causal LM: its own next-token loss on the batch's text (labels
    = input ids, padding -100), whatever labels the data carried."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**{**batch, "labels": labels})


def _forward_fn(sides: Sequence[str], causal: bool) -> Any:
    """How calibration calls the model: without labels unless the gradient side needs a loss
    (a causal LM's next-token loss; other models the labels of the data, ``--label-column``)."""
    if "gradient" not in sides:
        return _drop_labels
    return _next_token_loss if causal else None


# ---------------------------------------------------------------------- verbs
def _prepare(args: argparse.Namespace, sides: Sequence[str], *, file: bool
             ) -> tuple[Any, Any, bool, dict[str, Any], Any, str, Any]:
    """What calibrate and init share, cheapest checks first: ``(model, tokenizer, causal,
    layers, PEFT targets, targets as recorded, device)``, the model on ``--device``."""
    device = resolve_device(args.device)
    model, tokenizer, causal = load_model(args.model, args.task, args.tokenizer,
                                         quiet=args.quiet)
    layers, peft_targets = _select_layers(model, args.targets, args.model, args.quiet)
    recorded = "all" if args.targets == ["all"] else (
        peft_targets if isinstance(peft_targets, str) else " ".join(peft_targets))
    sizes = statistics_size(layers, sides, args.folds or 1, args.precision)
    if args.max_memory is not None:
        # The budget bounds what collecting holds at once (calibrate plans the passes and
        # refuses a layer alone over it); what stays is the finished summaries, file-sized.
        sizes = [row._replace(memory=row.file) for row in sizes]
    _check_size(sizes, args.max_stats_size, file=file)
    if device is not None:
        # calibrate(device=) moves the batches only; the weights must be there too.
        model.to(device)
    return model, tokenizer, causal, layers, peft_targets, recorded, device


def _loader(args: argparse.Namespace, tokenizer: Any) -> Any:
    return build_loader(args.data, tokenizer, batch_size=args.batch_size,
                        max_length=args.max_length, text_column=args.text_column,
                        label_column=args.label_column)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from covinit.calibration import calibrate

    model, tokenizer, causal, layers, _, recorded, device = _prepare(args, args.sides,
                                                                     file=True)
    chosen = frozenset(layers)
    cal = calibrate(model, _loader(args, tokenizer),
                    targets=lambda name, _module: name in chosen, sides=tuple(args.sides),
                    forward_fn=_forward_fn(args.sides, causal), max_batches=args.max_batches,
                    device=device, show_progress=not args.quiet, folds=args.folds,
                    precision=args.precision, max_memory=args.max_memory)
    cal.info.update({"model": args.model, "data": args.data, "targets": recorded})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cal.save(out)
    print(f"calibrated {len(cal.layer_names)} layers ({', '.join(cal.sides)}) on "
          f"{cal.info['batches']} batches / {cal.info['positions']} positions in "
          f"{cal.info['seconds']:.1f} s -> {out} ({_gb(out.stat().st_size)})")
    return 0


def _peft_task_type(model: Any, causal: bool) -> str | None:
    # SEQ_CLS makes PEFT save the classification head with the adapter (modules_to_save),
    # so a fresh base with another random head still reproduces the logits.
    if causal:
        return "CAUSAL_LM"
    return "SEQ_CLS" if "ForSequenceClassification" in type(model).__name__ else None


def _cmd_init(args: argparse.Namespace) -> int:
    from covinit.adapters import find_adapters
    from covinit.calibration import DEFAULT_STRATEGY, calibrate
    from covinit.inits import get_strategy

    try:
        import peft
    except ImportError:
        raise ImportError("covinit init writes a PEFT adapter and needs peft: "
                          "pip install peft") from None
    # The sides the strategy reads (kaiming reads none: the input side is the cheapest).
    strategy = args.strategy or DEFAULT_STRATEGY
    sides = args.sides or list(get_strategy(strategy).tags.get("needs") or ["input"])
    if "gradient" in sides and "input" not in sides:  # G = Σ δ·xᵀ is collected with x
        sides = ["input", *sides]
    model, tokenizer, causal, layers, peft_targets, _, device = _prepare(args, sides,
                                                                         file=False)
    config = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank,
                             use_rslora=args.rslora, target_modules=peft_targets,
                             task_type=_peft_task_type(model, causal))
    with warnings.catch_warnings():
        # transformers deprecates an API that PEFT calls while wrapping the model.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        model = peft.get_peft_model(model, config)
    adapted = find_adapters(model)
    if set(adapted) != set(layers) - _saved_whole(model):
        raise RuntimeError(f"PEFT adapted {sorted(adapted)} for --targets {peft_targets!r}, "
                           f"not the selected layers {sorted(layers)}")
    cal = calibrate(model, _loader(args, tokenizer), sides=tuple(sides),
                    forward_fn=_forward_fn(sides, causal), max_batches=args.max_batches,
                    device=device, show_progress=not args.quiet, folds=args.folds,
                    precision=args.precision, strategy=args.strategy, estimator=args.estimator,
                    seed=args.seed, max_memory=args.max_memory)
    from covinit.export import export_lora

    out = Path(args.out)
    export_lora(model, out, format="peft")
    written = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    folded = sum(rank != args.rank for rank in (written.get("rank_pattern") or {}).values())
    note = f"; {folded} residual layers written with their step-0 part folded in" if folded \
        else ""
    print(f"initialized {len(adapted)} LoRA layers (rank {args.rank}, {strategy}) on "
          f"{cal.info['batches']} batches / {cal.info['positions']} positions -> {out}{note}; "
          "load it with peft.PeftModel.from_pretrained(base, OUT) onto the original model")
    return 0


def _saved_whole(model: Any) -> set[str]:
    """Layers PEFT trains whole instead of adapting (``modules_to_save``: a classifier head
    that ``--targets all`` also selected)."""
    from peft.utils import ModulesToSaveWrapper

    return {name for name, module in model.base_model.model.named_modules()
            if isinstance(module, ModulesToSaveWrapper)}


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
    from covinit.calibration_data import Calibration
    from covinit.reporting import report

    cal = Calibration.load(args.calibration)
    model = None
    if args.model is not None:
        spec = cal.info.get("model") if args.model == "recorded" else args.model
        if spec is None:
            raise ValueError("--model recorded: the calibration file records no model")
        model, _, _ = load_model(spec, args.task, with_tokenizer=False, quiet=args.quiet)
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


def _list(entries: dict[str, str], extra: dict[str, str] | None = None) -> None:
    width = max(map(len, entries))
    for name, description in entries.items():
        tag = f" [{extra[name]}]" if extra and extra.get(name) else ""
        print(f"{name.ljust(width)}  {description}{tag}")


def _cmd_strategies(args: argparse.Namespace) -> int:
    from covinit.inits import get_strategy, strategies

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
    from covinit.covariance import estimators

    _list(estimators())
    return 0


# ---------------------------------------------------------------------- parser
def _version() -> str:
    """The installed distribution's version (the package root is not imported: modules sit
    below it)."""
    try:
        return importlib.metadata.version("covinit")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"


def _add_run_arguments(sub: argparse.ArgumentParser) -> None:
    """Model, data, layer and device options shared by ``calibrate`` and ``init``."""
    sub.add_argument("--model", required=True, metavar="PATH",
                     help="a Hugging Face model folder (save_pretrained) or a .gguf file "
                          "(dequantized to float32 on every load)")
    sub.add_argument("--task", default="auto", choices=_TASKS,
                     help="model class (auto: the config's architecture; causal-lm for GGUF)")
    sub.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="a folder with tokenizer files, for a model folder saved without "
                          "them (default: the model's own)")
    sub.add_argument("--data", required=True, metavar="FILE",
                     help="a text file: .txt (one text per line), .jsonl / .csv / .tsv (a "
                          "text column)")
    sub.add_argument("--text-column", default=None,
                     help="field / column holding the text in a .jsonl or .csv file "
                          "(default: text)")
    sub.add_argument("--label-column", default=None,
                     help="field / column of an integer class label: batches carry labels "
                          "(the gradient side of a classifier needs them)")
    sub.add_argument("--targets", nargs="+", default=None,
                     help="layer name suffixes (query value), one regular expression matched "
                          "against the full name, or 'all' (every linear layer except the "
                          "output embedding / LM head; name it to include it). Default: "
                          "PEFT's default for the model's architecture")
    sub.add_argument("--max-batches", type=_positive, default=32,
                     help="stop after this many batches")
    sub.add_argument("--batch-size", type=_positive, default=16, help="examples per batch")
    sub.add_argument("--max-length", type=_at_least_two, default=128,
                     help="tokens per example (longer texts are truncated)")
    sub.add_argument("--folds", type=_positive, default=None,
                     help="keep M per-fold summaries (needed by the spatpca estimator's "
                          "cross-validation)")
    sub.add_argument("--precision", choices=("float64", "mixed"), default="float64",
                     help="mixed: float32 Gram products (about half the cost, ~1e-7 relative)")
    sub.add_argument("--max-stats-size", type=_stats_size_arg, default=DEFAULT_MAX_STATS_SIZE,
                     metavar="SIZE",
                     help="refuse (before loading data) statistics estimated above this "
                          "size in memory or on disk: 500MB, 2GB, 8GiB; 0 = no limit "
                          f"(default: {_gb(DEFAULT_MAX_STATS_SIZE)})")
    sub.add_argument("--max-memory", type=_memory_arg, default=None, metavar="SIZE",
                     help="memory budget for the statistics while collecting, e.g. 8GB, "
                          "512MiB (kB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB = powers "
                          "of 1024): the target layers are planned into groups that fit and "
                          "the data is read once per group (the plan is printed first; the "
                          "statistics equal one pass's). Then --max-stats-size checks the "
                          "finished statistics only. Default: one pass, no budget")
    sub.add_argument("--device", default=None,
                     help="move the model and batches there, e.g. cuda:0 (default: where the "
                          "model loads, the CPU)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar and no notes")


def _add_calibrate(verbs: Any) -> None:
    cal = verbs.add_parser(
        "calibrate", formatter_class=_Formatter,
        help="collect activation statistics of a model on data into a .safetensors file",
        description="Run a frozen model over task data once and save every target layer's "
                    "input/output activation statistics (float64 moments) as safetensors.",
        epilog="examples:\n"
               "  covinit calibrate --model ./my-bert --data texts.jsonl --text-column body "
               "--targets all --out cal.safetensors\n"
               "  covinit calibrate --model ./SmolLM2.Q4_1.gguf --data book.txt --targets "
               "q_proj v_proj --folds 5 --out cal.safetensors")
    _add_run_arguments(cal)
    cal.add_argument("--out", required=True, help="output .safetensors file")
    cal.add_argument("--sides", nargs="+", choices=ALL_SIDES, default=["input", "output"],
                     help="statistics to keep; gradient (with input) adds a backward pass: "
                          "a causal LM's next-token loss, else the data's labels "
                          "(--label-column)")
    cal.set_defaults(func=_cmd_calibrate)


def _add_init(verbs: Any) -> None:
    from covinit.calibration import DEFAULT_OPTIONS, DEFAULT_STRATEGY
    from covinit.covariance import estimators
    from covinit.inits import strategies

    ini = verbs.add_parser(
        "init", formatter_class=_Formatter,
        help="add PEFT LoRA to a model, initialize it from data, write the adapter folder",
        description="Add PEFT LoRA layers to the target layers, calibrate them on task data, "
                    "initialize them with a strategy and write a PEFT adapter directory "
                    "(adapter_config.json + adapter_model.safetensors) that "
                    "peft.PeftModel.from_pretrained(base, OUT) applies to the original, "
                    "untouched base model. Residual strategies (pissa, cov-svd, cov-minor, "
                    "two-sided) are written with their step-0 part folded in (rank 2r).",
        epilog="examples:\n"
               "  covinit init --model ./my-bert --data reviews.csv --label-column label "
               "--strategy input-pca --out adapter\n"
               "  covinit init --model ./my-llama --data texts.txt --targets q_proj v_proj "
               "--strategy cov-svd --rank 16 --out adapter")
    _add_run_arguments(ini)
    ini.add_argument("--out", required=True, help="output adapter directory")
    default = "@".join([DEFAULT_STRATEGY, DEFAULT_OPTIONS["estimator"]]) + "".join(
        f", {k}={v}" for k, v in DEFAULT_OPTIONS.items() if k != "estimator")
    ini.add_argument("--strategy", default=None, choices=list(strategies()),
                     help=f"init strategy (see covinit strategies; default: covinit's, "
                          f"{default})")
    ini.add_argument("--estimator", default=None, choices=list(estimators()),
                     help="covariance estimator for the strategy (default: covinit.initialize's)")
    ini.add_argument("--rank", type=_positive, default=8, help="LoRA rank r")
    ini.add_argument("--alpha", type=float, default=None,
                     help="LoRA alpha (default: 2 × rank)")
    ini.add_argument("--rslora", action="store_true", help="scale by alpha/√r (rsLoRA)")
    ini.add_argument("--sides", nargs="+", choices=ALL_SIDES, default=None,
                     help="activations to summarise (default: those the strategy needs)")
    ini.add_argument("--seed", type=int, default=0, help="seed of the strategy's random factors")
    ini.set_defaults(func=_cmd_init)


def _add_report(verbs: Any) -> None:
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
               "  covinit report cal.safetensors --out report --layers '.*layer\\.0\\..*' "
               "--geometry chain")
    rep.add_argument("calibration", help="file written by covinit calibrate")
    rep.add_argument("--out", required=True, help="output directory")
    rep.add_argument("--model", default=None,
                     help="a model folder, a .gguf file, or 'recorded' (the one named in the "
                          "file); enables principal angles to W0")
    rep.add_argument("--task", default="auto", choices=_TASKS,
                     help="model class (auto: the config's architecture; causal-lm for GGUF)")
    rep.add_argument("--rank", type=_positive, default=8, help="LoRA rank to mark")
    rep.add_argument("--rank-budget", type=_positive, default=None,
                     help="mark ranks allocated from this total budget (EVA-style)")
    rep.add_argument("--estimators", nargs="+", default=["empirical", "ledoit_wolf", "oas"],
                     help="spectra to draw (see covinit estimators)")
    rep.add_argument("--layers", nargs="+", default=None,
                     help="layer name suffixes, or one regex matched against the whole name")
    rep.add_argument("--sides", nargs="+", choices=ALL_SIDES, default=None,
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


def _add_listings(verbs: Any) -> None:
    st = verbs.add_parser("strategies", help="list init strategies",
                          description="List the registered LoRA init strategies with one-line "
                                      "descriptions and what calibration statistics they need.")
    st.set_defaults(func=_cmd_strategies)
    es = verbs.add_parser("estimators", help="list covariance estimators",
                          description="List the registered covariance estimators.")
    es.set_defaults(func=_cmd_estimators)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``covinit`` (one subparser per verb)."""
    parser = argparse.ArgumentParser(
        prog=_PROG, formatter_class=_Formatter,
        description="Covariance-informed LoRA initialization: calibrate a frozen model on task "
                    "data, initialize a LoRA adapter from it, inspect what calibration found.",
        epilog="examples:\n"
               "  covinit calibrate --model ./my-bert --data texts.txt --out cal.safetensors\n"
               "  covinit init --model ./my-llama --data texts.txt --strategy cov-svd "
               "--out adapter\n"
               "  covinit report cal.safetensors --out report --model recorded\n"
               "  covinit strategies")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_calibrate(verbs)
    _add_init(verbs)
    _add_report(verbs)
    _add_listings(verbs)
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

    Usage errors exit with status 2: argparse's own (``SystemExit(2)`` with the usage), and
    arguments that cannot work (see the module docstring) as one line ``covinit: error:
    ...``.  ``ValueError``, ``TypeError``, ``ImportError``, ``OSError`` and
    ``RuntimeError`` from the work itself are printed as one line ``covinit: error: ...``
    and give status 1 (set ``COVINIT_TRACEBACK=1`` to get the traceback instead).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except (ValueError, TypeError, ImportError, OSError, RuntimeError) as err:
        if os.environ.get("COVINIT_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 2 if isinstance(err, _UsageError) else 1
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
