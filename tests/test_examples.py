"""Smoke tests: every example runs end to end with tiny settings (real models and data)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_quickstart() -> None:
    out = _run("quickstart.py", "--steps", "1", "--n-train", "16", "--n-val", "8",
               "--n-calib", "8", "--batch-size", "4", "--max-length", "16", "--threads", "1")
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("kaiming ", "input-pca "))}
    assert set(rows) == {"kaiming", "input-pca"}
    # both inits leave the model unchanged at step 0 (B = 0): same validation loss
    assert rows["kaiming"][2] == rows["input-pca"][2]


@pytest.mark.slow
def test_peft_trainer_with_save_and_reload() -> None:
    out = _run("peft_trainer.py", "--max-steps", "1", "--n-train", "16", "--n-val", "8",
               "--n-calib", "8", "--batch-size", "4", "--max-length", "16", "--threads", "1")
    lines = out.splitlines()
    calibrated = next(i for i, line in enumerate(lines) if line.startswith("calibrated 24 PEFT"))
    optimizer = next(i for i, line in enumerate(lines) if line.startswith("[Trainer] building"))
    assert calibrated < optimizer and lines[optimizer].endswith("calibrated values: True")
    assert "reloaded via save_pretrained" in out
    diff = float(re.search(r"max \|Δlogit\| = (\S+)", out).group(1))
    assert diff < 1e-4


@pytest.mark.slow
def test_smollm2_residual_export() -> None:
    out = _run("smollm2_residual.py", "--layers", "1", "--steps", "1", "--batch-size", "1",
               "--seq-len", "16", "--calib-batches", "1", "--threads", "1")
    step0 = float(re.search(r"step-0 logits relative change (\S+)", out).group(1))
    assert step0 < 1e-4
    assert "rank [16]" in out  # r = 8 plus the folded step-0 part
    exported = float(re.search(r"relative (\S+)$", out.splitlines()[-1]).group(1))
    assert exported < 1e-4


@pytest.mark.slow
def test_smooth_pca_digits(tmp_path) -> None:
    out = _run("smooth_pca_digits.py", "--out", str(tmp_path), "--pretrain-steps", "20",
               "--steps", "5", "--n-calib", "20", "--n-train", "20", "--rank", "3")
    assert re.search(r"SpatPCA \(2-D grid Ω, 5-fold CV\): τ1=\S+, τ2=\S+, γ=\S+", out)
    assert (tmp_path / "loadings.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report" / "report.html").is_file()
    for label in ("kaiming", "input-pca (PCA)", "input-pca (SpatPCA)"):
        assert any(line.startswith(label) for line in out.splitlines())
