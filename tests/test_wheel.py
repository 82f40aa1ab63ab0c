"""Every ``covinit`` verb works from a built, installed wheel, outside the source checkout.

The wheel is built from a copy of the package sources (``pip wheel --no-deps
--no-build-isolation``) and installed with ``pip install --no-deps --target SITE``; the
commands then run from a working directory outside the repository with ``PYTHONPATH=SITE``.
The dependencies (torch, transformers, peft) come from the running environment: a truly fresh
virtual environment with a full torch install is too slow for CI.  What this catches is a
package that only works next to its checkout: a module left out of the wheel, a path
computed from ``__file__`` into ``benchmarks/``, data files that were never packaged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _tiny_hf import save_tiny

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _copy_sources(dest: Path) -> Path:
    """What the build needs, without the checkout's build/ and egg-info leftovers (a stale
    build/lib could put a deleted module back into the wheel)."""
    shutil.copytree(ROOT / "covinit", dest / "covinit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _check(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel file, installation folder)``."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(tmp / "src")
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", "--quiet", "-w", str(tmp / "dist"), str(src)])
    (wheel,) = (tmp / "dist").glob("covinit-*.whl")
    _check([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
            "--quiet", "--target", str(tmp / "site"), str(wheel)])
    return wheel, tmp / "site"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Outside the checkout: a tiny random Llama with a tokenizer, and a small text file."""
    work = tmp_path_factory.mktemp("work")
    save_tiny(work / "model", "llama")
    (work / "texts.txt").write_text(
        "\n".join(f"line {i}: to be or not to be, that is the question" for i in range(8)),
        encoding="utf-8")
    return work


def test_the_wheel_holds_the_package_and_no_demo_assets(site) -> None:
    wheel, _ = site
    names = zipfile.ZipFile(wheel).namelist()
    assert "covinit/data.py" in names and "covinit/cli.py" in names
    assert not [n for n in names if n.endswith("zoo.py") or n.startswith("benchmarks/")]
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "covinit = covinit.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


# PeftModel.from_pretrained calls a transformers API that warns (PEFT's code, not covinit's).
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_every_verb_runs_from_the_installed_wheel(site, workdir) -> None:
    _, target = site
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    def covinit(*args: str) -> str:
        return _check([sys.executable, "-m", "covinit", *args], cwd=workdir, env=env).stdout

    where = _check([sys.executable, "-c", "import covinit.cli, covinit; print(covinit.__file__)"],
                   cwd=workdir, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(target.resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT)

    version = covinit("--version").strip()
    assert version == "covinit " + json.loads(_check(
        [sys.executable, "-c", "import importlib.metadata as m, json; "
                               "print(json.dumps(m.version('covinit')))"],
        cwd=workdir, env=env).stdout)
    assert "cov-svd" in covinit("strategies")
    assert covinit("estimators").startswith("empirical")

    run = ["--model", "model", "--data", "texts.txt", "--targets", "q_proj", "v_proj",
           "--max-batches", "2", "--batch-size", "4", "--max-length", "12", "--quiet"]
    assert "calibrated 4 layers" in covinit("calibrate", *run, "--out", "cal.safetensors")
    out = covinit("report", "cal.safetensors", "--out", "report", "--model", "recorded",
                  "--rank", "2", "--no-spatpca", "--max-figures", "1", "--quiet")
    assert "report of 8 layer sides" in out
    assert (workdir / "report" / "report.html").is_file()
    assert (workdir / "report" / "figures" / "overview.png").is_file()
    out = covinit("init", *run, "--strategy", "input-pca", "--rank", "2", "--out", "adapter")
    assert "initialized 4 LoRA layers (rank 2, input-pca)" in out

    import torch
    import transformers
    from peft import PeftModel

    base = transformers.LlamaForCausalLM.from_pretrained(str(workdir / "model")).eval()
    ids = torch.arange(3, 13).view(1, 10)
    with torch.no_grad():
        want = base(ids).logits
        loaded = PeftModel.from_pretrained(base, str(workdir / "adapter")).eval()
        got = loaded(ids).logits
    factors = {k: v for k, v in loaded.state_dict().items() if ".lora_A" in k}
    assert len(factors) == 4 and all(v.abs().sum() > 0 for v in factors.values())
    assert torch.allclose(got, want, atol=1e-5, rtol=0)  # input-pca: B = 0 at step 0


def test_console_script_of_the_wheel(site, workdir) -> None:
    _, target = site
    script = target / "bin" / "covinit"
    if not script.is_file():
        pytest.skip("pip wrote no console script into --target")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = _check([str(script), "--version"], cwd=workdir, env=env)
    assert done.stdout.startswith("covinit ")
