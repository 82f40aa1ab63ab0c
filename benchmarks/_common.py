"""Helpers shared by the benchmark scripts: machine description, CSV rows, mean ± std.

Benchmarks on a shared machine are only comparable with the load they ran under, so every
summary states the load average and the machine next to its exact command.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "append_row",
    "command_line",
    "fmt_mean_std",
    "load_average",
    "machine",
    "mean_std",
    "read_rows",
    "write_rows",
]


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``"1.52 1.80 1.91"``."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> str:
    """One line: CPU architecture, cores, torch version and threads, Python version."""
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this process (``python SCRIPT ARGS``), shell-quoted."""
    args = list(sys.argv if argv is None else argv)
    return " ".join(["python", *(shlex.quote(a) for a in args)])


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts (empty list if the file does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> None:
    """Write ``rows`` (missing keys empty) to ``path`` with header ``fields``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def append_row(path: Path, row: Mapping[str, Any], fields: Sequence[str]) -> None:
    """Append one row, writing the header first when the file is new.

    Each finished run is appended (and flushed) at once, so an interrupted benchmark loses
    at most the run in progress and can resume from the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="raise")
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value, NaN for none)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def fmt_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``"mean ± std"`` (just ``"mean"`` for one value, ``"–"`` for none)."""
    if not values:
        return "–"
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


if __name__ == "__main__":  # pragma: no cover - a convenience for reading the machine line
    print(machine(), "| load", load_average(), "|", Path.cwd())
