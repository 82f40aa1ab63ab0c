"""Text → calibration batches: read a user's text file, tokenize it into a ``DataLoader``.

Model-agnostic helpers that the command line uses and that any script can reuse:

- :func:`read_text_dataset` / :func:`read_labelled_dataset`: a ``.txt``, ``.jsonl``,
  ``.csv`` or ``.tsv`` file → texts (or ``(text, label)`` pairs);
- :func:`text_classification_loader`: texts or pairs → padded batches, one example per row;
- :func:`causal_lm_loader`: one long text → fixed-length token blocks;
- :func:`quiet_transformers`: silence transformers' load reports while a model loads.

The tokenizer is any ``transformers`` tokenizer (called as ``tokenizer(texts, ...)``);
``transformers`` itself is imported only by :func:`quiet_transformers`.

Examples
--------
>>> from covinit.data import read_text_dataset, text_classification_loader  # doctest: +SKIP
>>> texts = read_text_dataset("reviews.csv", text_column="body")             # doctest: +SKIP
>>> loader = text_classification_loader(tokenizer, texts, batch_size=16,
...                                     max_length=128)                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = [
    "Batch",
    "Example",
    "causal_lm_loader",
    "quiet_transformers",
    "read_labelled_dataset",
    "read_text_dataset",
    "text_classification_loader",
]

#: A labelled example: ``(text, class index)``.
Example = tuple[str, int]
#: A batch as the loaders yield it: ``input_ids`` / ``attention_mask`` (B, T), maybe ``labels``.
Batch = dict[str, torch.Tensor]

_SUFFIXES = ".txt (one text per line), .jsonl (objects with a text field) or .csv/.tsv " \
            "(a text column)"


# --------------------------------------------------------------------------- files
def read_text_dataset(path: str | os.PathLike[str], text_column: str | None = None
                      ) -> list[str]:
    """Read a user's text file for calibration or training.

    Formats, chosen by suffix:

    - ``.txt``: one example per non-blank line (join with ``"\\n"`` for a causal LM).
    - ``.jsonl``: one JSON object per line; the text is field ``text_column`` (default
      ``"text"``).  Lines that are bare JSON strings are taken as they are.
    - ``.csv`` / ``.tsv``: a header row; the text is column ``text_column`` (default
      ``"text"``).

    Parameters
    ----------
    path : path-like
    text_column : str, optional
        Field/column holding the text (JSONL/CSV only); default ``"text"``.

    Returns
    -------
    list of str
        Non-empty texts, in file order.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        On an unsupported suffix, a missing column (the message lists the available ones),
        a malformed line, or a file with no text.
    """
    path = Path(path)
    records = _records(path)
    if path.suffix.lower() == ".txt":
        if text_column is not None:
            raise ValueError(f"text_column applies to .jsonl/.csv files, not {path.name}")
        texts = [str(record) for _, record in records]
    else:
        texts = [_text(path, where, record, text_column or "text") for where, record in records]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} contains no text")
    return texts


def read_labelled_dataset(path: str | os.PathLike[str], label_column: str,
                          text_column: str | None = None) -> list[Example]:
    """Read ``(text, label)`` pairs from a ``.jsonl``, ``.csv`` or ``.tsv`` file.

    For a sequence classifier whose calibration needs a loss (the gradient side): the batches
    of :func:`text_classification_loader` then carry ``labels``.

    Parameters
    ----------
    path : path-like
    label_column : str
        Field/column holding the class index: an integer ≥ 0 (``3`` or ``"3"``).
    text_column : str, optional
        Field/column holding the text; default ``"text"``.

    Returns
    -------
    list of (str, int)
        Examples with a non-empty text, in file order.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For a ``.txt`` file (it has no label column), a missing field or column, a label that
        is not an integer ≥ 0, or a file with no text.
    """
    path = Path(path)
    records = _records(path)
    if path.suffix.lower() == ".txt":
        raise ValueError(f"{path.name}: a .txt file has no label column; use .jsonl or "
                         ".csv/.tsv for labelled examples")
    pairs = [(_text(path, where, record, text_column or "text"),
              _label(path, where, record, label_column)) for where, record in records]
    pairs = [(text, label) for text, label in pairs if text.strip()]
    if not pairs:
        raise ValueError(f"{path} contains no text")
    return pairs


def _records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` per line or row: a str (``.txt``, bare JSON string) or a dict;
    ``where`` is ``"path:line"`` for messages."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [(f"{path}:{i}", line) for i, line in enumerate(lines, start=1)]
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [(f"{path}:{i}", _json_record(path, i, line))
                    for i, line in enumerate(lines, start=1) if line.strip()]
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                if not reader.fieldnames:
                    raise ValueError(f"{path}: no header row; columns: (none)")
                # Row 1 is the header: data rows start at 2 (a spreadsheet's numbering).
                return [(f"{path}:{i}", row) for i, row in enumerate(reader, start=2)]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    raise ValueError(f"unsupported file type {path.suffix!r} for {path}; use {_SUFFIXES}")


def _json_record(path: Path, lineno: int, line: str) -> Any:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(record, (str, dict)):
        raise ValueError(
            f"{path}:{lineno}: expected a JSON object or string, got {type(record).__name__}")
    return record


def _field(path: Path, where: str, record: Any, column: str) -> Any:
    if isinstance(record, str):
        raise ValueError(f"{where}: a bare string has no field {column!r}")
    if column not in record:
        names = ", ".join(str(k) for k in record if k is not None) or "(none)"
        hint = " (choose one with text_column= or label_column=)"
        if path.suffix.lower() in (".csv", ".tsv"):  # one header for the whole file
            raise ValueError(f"{path}: no column {column!r}; columns: {names}{hint}")
        raise ValueError(f"{where}: no field {column!r}; fields: {names}{hint}")
    return record[column]


def _text(path: Path, where: str, record: Any, column: str) -> str:
    if isinstance(record, str):  # a bare JSON string is the text itself
        return record
    value = _field(path, where, record, column)
    if value is None:  # an empty CSV cell at the end of a short row
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {column!r} must be a string, got "
                         f"{type(value).__name__}")
    return value


def _label(path: Path, where: str, record: Any, column: str) -> int:
    value = _field(path, where, record, column)
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.isdigit():
        return int(text)
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    raise ValueError(f"{where}: label {column!r} must be an integer >= 0 (a class index), "
                     f"got {value!r}")


# --------------------------------------------------------------------------- loaders
def _check_loader_args(batch_size: int, length: int, length_name: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"{length_name} must be an int >= 2, got {length!r}")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_examples(examples: Sequence[Example] | Sequence[str]) -> bool:
    """True for ``(text, label)`` pairs, False for plain texts; TypeError for a mixture."""
    if len(examples) == 0:
        raise ValueError("examples is empty")
    labelled = not isinstance(examples[0], str)
    for i, ex in enumerate(examples):
        ok = (isinstance(ex, (tuple, list)) and len(ex) == 2 and isinstance(ex[0], str)
              and isinstance(ex[1], (int, np.integer))) if labelled else isinstance(ex, str)
        if not ok:
            want = "(text, int label) pairs" if labelled else "strings"
            raise TypeError(f"examples[{i}] = {ex!r:.80}: expected all {want}")
    return labelled


def text_classification_loader(
    tokenizer: Any,
    examples: Sequence[Example] | Sequence[str],
    batch_size: int,
    max_length: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    drop_last: bool = False,
) -> DataLoader:
    """Batches of tokenized text for a sequence classifier (or label-free calibration).

    Each batch is padded to its longest example (at most ``max_length`` tokens, longer texts
    are truncated), which keeps short-snippet batches cheap.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Must have a pad token.
    examples : sequence of (str, int) or of str
        Labelled pairs, or plain texts (batches then carry no ``labels``).
    batch_size, max_length : int
    shuffle : bool, default=False
        Reshuffle every epoch with a generator seeded by ``seed`` (deterministic sequence of
        epochs).
    seed : int, default=0
    drop_last : bool, default=False
        Drop the final incomplete batch.

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``{"input_ids": (B, T) int64, "attention_mask": (B, T) int64,
        "labels": (B,) int64}`` with ``T <= max_length`` (``labels`` for pairs only).
    """
    _check_loader_args(batch_size, max_length, "max_length")
    labelled = _check_examples(examples)
    if tokenizer.pad_token is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token; set one before batching")

    def collate(items: list[Any]) -> Batch:
        texts = [it[0] for it in items] if labelled else list(items)
        enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch = {"input_ids": enc["input_ids"].long(),  # (B, T)
                 "attention_mask": enc["attention_mask"].long()}
        if labelled:
            batch["labels"] = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
        return batch

    return DataLoader(list(examples), batch_size=batch_size, shuffle=shuffle,
                      generator=_generator(seed) if shuffle else None, collate_fn=collate,
                      drop_last=drop_last)


def causal_lm_loader(
    tokenizer: Any,
    text: str,
    seq_len: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    drop_last: bool = False,
) -> DataLoader:
    """Fixed-length token blocks of ``text`` for causal-LM training or calibration.

    The whole text is tokenized once without special tokens and cut into consecutive,
    non-overlapping blocks of ``seq_len`` tokens; the final partial block is dropped, so no
    padding is needed.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
    text : str
    seq_len, batch_size : int
    shuffle : bool, default=False
        Reshuffle the blocks every epoch with a generator seeded by ``seed``.
    seed : int, default=0
    drop_last : bool, default=False

    Returns
    -------
    torch.utils.data.DataLoader
        Yields ``{"input_ids": (B, seq_len) int64, "attention_mask": (B, seq_len) ones,
        "labels": (B, seq_len) == input_ids}`` (the model shifts labels itself).

    Raises
    ------
    ValueError
        If ``text`` has fewer than ``seq_len`` tokens.
    """
    _check_loader_args(batch_size, seq_len, "seq_len")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    # verbose=False: a whole book is longer than model_max_length, which is fine here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)

    def collate(items: list[torch.Tensor]) -> Batch:
        input_ids = torch.stack(items)  # (B, seq_len)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "labels": input_ids.clone()}

    return DataLoader(list(blocks), batch_size=batch_size, shuffle=shuffle,
                      generator=_generator(seed) if shuffle else None, collate_fn=collate,
                      drop_last=drop_last)


# --------------------------------------------------------------------------- transformers
@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration of a load.

    The reports say what a caller documents anyway (a fresh classifier head, a GGUF being
    dequantized) and would clutter every log.

    Raises
    ------
    ImportError
        If ``transformers`` is not installed (``pip install 'covinit[hf]'``).
    """
    try:
        tf_logging = importlib.import_module("transformers").utils.logging
    except ImportError:
        raise ImportError("loading a Hugging Face model needs transformers: "
                          "pip install 'covinit[hf]'") from None
    level = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()
