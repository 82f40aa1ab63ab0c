"""Quantized-base regimes of ``benchmarks/compare_inits.py`` (issue 17): the regime quantizes
exactly the intended layers, the ``quant-*`` inits get the full-precision weights, the share of
the full-precision gap is computed as stated (Fieller interval checked against a brute-force
scan of paired t-tests), and the existing regimes' config ids do not move.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

compare_inits = pytest.importorskip("compare_inits")
_tasks = pytest.importorskip("_tasks")
pytest.importorskip("matplotlib")

from covinit.quant import quantize  # noqa: E402


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _settings(*argv: str) -> dict:
    return compare_inits.settings_from(compare_inits.build_parser().parse_args(list(argv)))


# ---------------------------------------------------------------------- config ids
#: The ids of the committed runs.csv files the background processes resume from.
COMMITTED = {"minilm-rt": "5a1ce69581", "minilm-bbc": "0c3d08a33e"}


def _old_config_id(task: str, s: dict) -> str:
    """The config id as computed before the quantized regimes existed."""
    blob = json.dumps({"task": task, **{k: s.get(k) for k in compare_inits.CONFIG_KEYS}},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def test_existing_config_ids_do_not_move() -> None:
    for task, cfg in COMMITTED.items():
        s = _settings("--task", task, "--regime", "base")
        assert compare_inits.config_id(task, s) == cfg
    for task in compare_inits.TASKS:
        for regime, over in compare_inits.REGIMES.items():
            if "quantize" in over:
                continue
            for quick in ((), ("--quick",)):
                s = _settings("--task", task, "--regime", regime, *quick)
                assert "quantize" not in s
                assert compare_inits.config_id(task, s) == _old_config_id(task, s), regime


def test_quantized_regime_differs_and_points_at_its_reference() -> None:
    s = _settings("--task", "minilm-rt", "--regime", "nf3")
    base = _settings("--task", "minilm-rt", "--regime", "base")
    assert s["quantize"] == {"bits": 3, "block_size": 64, "layers": _tasks.MINILM_ALL}
    assert s["targets"] == base["targets"]  # LoRA targets as in base: same config otherwise
    assert s["strategies"] == compare_inits.QUANT_METHODS
    assert compare_inits.config_id("minilm-rt", s) != COMMITTED["minilm-rt"]
    # The full-precision reference is base's config exactly.
    assert compare_inits.config_id("minilm-rt", {**s, "quantize": None}) == COMMITTED["minilm-rt"]
    assert compare_inits.reference_regime("nf4") == "base"
    assert compare_inits.reference_regime("r32") is None
    # --quick keeps the quantization (and the methods), drops the rest of the regime.
    q = _settings("--task", "minilm-rt", "--regime", "nf4", "--quick")
    assert q["quantize"]["bits"] == 4 and q["steps"] == _tasks.MINILM_QUICK["steps"]
    assert q["strategies"] == compare_inits.QUANT_METHODS
    # Every quantized method label parses (LoftQ's T = 5, last round, as an option label).
    labels = [m.label for m in compare_inits.choose_methods(compare_inits.QUANT_METHODS)]
    assert labels == list(compare_inits.QUANT_NAMES)
    loftq = compare_inits.parse_method("quant-svd+iterations=5+keep=last")
    assert dict(loftq.options) == {"iterations": 5, "keep": "last"}


# ---------------------------------------------------------------------- quantization
def _tiny_bert_task() -> object:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    return _tasks.TaskData(base=model, head=["classifier"], train_loader=lambda seed: [],
                           calibration=[], calibration_singles=[], validation=[], test=[],
                           metric="accuracy", higher_is_better=True, sizes="")


def test_quantize_base_touches_exactly_the_intended_layers() -> None:
    """MiniLM's ``all_targets`` on a BERT: the six encoder projections of every layer are
    Q(W) (the NF quantizer's output), the pooler and the classifier stay full precision, and
    ``full_precision`` holds the original weights of exactly those layers."""
    data = _tiny_bert_task()
    before = {n: p.detach().clone() for n, p in data.base.named_parameters()}
    names = _tasks.quantize_base(data, _tasks.MINILM_ALL, bits=3)
    suffixes = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense")
    want = [n for n, m in data.base.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)]
    assert sorted(names) == sorted(want) and len(want) == 2 * 6
    assert sorted(data.full_precision) == sorted(want)
    for name, p in data.base.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer in want and name.endswith("weight"):
            torch.testing.assert_close(p.detach(), quantize(before[name], 3), rtol=0, atol=0)
            torch.testing.assert_close(data.full_precision[layer], before[name], rtol=0,
                                       atol=0)
            assert not torch.equal(p.detach(), before[name])
        else:  # biases, embeddings, norms, pooler, classifier
            assert torch.equal(p.detach(), before[name]), name
    # A fresh per-seed model copies the quantized base.
    fresh = data.fresh_model(1)
    torch.testing.assert_close(fresh.bert.encoder.layer[0].output.dense.weight,
                               quantize(before["bert.encoder.layer.0.output.dense.weight"], 3))
    with pytest.raises(ValueError, match="already quantized"):
        _tasks.quantize_base(data, _tasks.MINILM_ALL, bits=3)


def test_quant_strategies_get_the_regime_quantizer() -> None:
    data = _tiny_bert_task()
    _tasks.quantize_base(data, _tasks.MINILM_ALL, bits=2)
    s = _settings("--task", "minilm-rt", "--regime", "nf2")
    got = compare_inits.quant_options(compare_inits.parse_method("quant-residual"), data, s)
    assert got == {"bits": 2, "block_size": 64, "full_precision": data.full_precision}
    assert compare_inits.quant_options(compare_inits.parse_method("kaiming"), data, s) == {}
    assert compare_inits.quant_options(compare_inits.parse_method("quant-svd"), data,
                                       _settings("--task", "minilm-rt")) == {}
    with pytest.raises(ValueError, match=r"'quant-svd\+bits=4' sets \['bits'\], which the "
                                         r"quantized regime sets \(2-bit NF"):
        compare_inits.quant_options(compare_inits.parse_method("quant-svd+bits=4"), data, s)


# ---------------------------------------------------------------------- gap restored
def _brute_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """The ρ a two-sided paired t-test at 5 % does not reject, by scanning a fine grid."""
    from scipy.stats import ttest_1samp

    grid = [i / 2000 for i in range(-4000, 6001)]  # ρ in [−2, 3], step 5e-4
    kept = [r for r in grid
            if ttest_1samp([x - r * y for x, y in zip(a, b, strict=True)], 0.0).pvalue >= 0.05]
    return min(kept), max(kept)


def test_ratio_interval_is_the_set_a_paired_t_test_keeps() -> None:
    gen = torch.Generator().manual_seed(3)
    for n in (3, 5, 8):
        den = (0.10 + 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)).tolist()
        num = [0.5 * d + 0.02 * float(e)
               for d, e in zip(den, torch.randn(n, generator=gen, dtype=torch.float64),
                               strict=True)]
        ratio, lo, hi = compare_inits.ratio_interval(num, den)
        assert ratio == pytest.approx(sum(num) / sum(den), rel=1e-12)
        b_lo, b_hi = _brute_interval(num, den)
        assert lo == pytest.approx(b_lo, abs=6e-4) and hi == pytest.approx(b_hi, abs=6e-4)
        assert lo < ratio < hi
    # A gap not resolved from 0: no finite bound.
    _, lo, hi = compare_inits.ratio_interval([0.01, -0.02, 0.015], [0.01, -0.012, 0.004])
    assert lo == -math.inf and hi == math.inf
    assert "unbounded" in compare_inits.fmt_share([0.01, -0.02, 0.015], [0.01, -0.012, 0.004])
    # One seed: the ratio, no interval.
    ratio, lo, hi = compare_inits.ratio_interval([0.03], [0.06])
    assert ratio == pytest.approx(0.5) and math.isnan(lo) and math.isnan(hi)
    assert compare_inits.fmt_share([0.03], [0.06]) == "50 % (1)"


def _row(method: str, seed: int, lr: float, final: float, step0: float) -> dict[str, str]:
    return {"method": method, "seed": str(seed), "lr": str(lr), "status": "ok",
            "final_val_loss": str(final), "step0_val_loss": str(step0)}


def test_gap_pairs_pair_method_qlora_and_full_precision_by_seed_and_rate() -> None:
    quant = [_row("kaiming", 0, 1e-3, 0.60, 0.70), _row("kaiming", 1, 1e-3, 0.62, 0.71),
             _row("kaiming", 2, 1e-3, 0.64, 0.72), _row("kaiming", 0, 2e-3, 0.90, 0.70),
             _row("cloq", 0, 1e-3, 0.55, 0.66), _row("cloq", 1, 1e-3, 0.58, 0.69),
             _row("cloq", 2, 1e-3, 0.50, 0.60)]
    full = [_row("kaiming", 0, 1e-3, 0.50, 0.68), _row("kaiming", 1, 1e-3, 0.54, 0.69),
            _row("kaiming", 1, 2e-3, 0.10, 0.69)]  # seed 2 has no full-precision run
    num, den = compare_inits.gap_pairs(quant, full, "cloq", "kaiming", 1e-3, "final_val_loss")
    assert num == pytest.approx([0.05, 0.04]) and den == pytest.approx([0.10, 0.08])
    assert compare_inits.ratio_interval(num, den)[0] == pytest.approx(0.09 / 0.18)
    # Step 0 pairs by seed at any rate.
    num0, den0 = compare_inits.gap_pairs(quant, full, "cloq", "kaiming", None, "step0_val_loss")
    assert num0 == pytest.approx([0.04, 0.02]) and den0 == pytest.approx([0.02, 0.02])
    # No full-precision run at the rate: nothing to pair.
    assert compare_inits.gap_pairs(quant, full, "cloq", "kaiming", 4e-3,
                                   "final_val_loss") == ([], [])


# ---------------------------------------------------------------------- end to end
def test_quantized_regime_end_to_end_on_tiny(tmp_path: Path) -> None:
    """Full-precision Kaiming first, then the nf2 regime's four inits on the same settings:
    every run finishes, QLoRA starts from the quantized model, the repairs move step 0 off
    it, and the summary reports the share of the gap against the reference folder."""
    common = ["--task", "tiny", "--steps", "4", "--lrs", "0.01", "--seeds", "0,1",
              "--phases", "dropin", "--extend-lr-grid", "0"]
    fp, q = tmp_path / "fp", tmp_path / "nf2"
    assert compare_inits.main([*common, "--strategies", "kaiming", "--out", str(fp)]) == 0
    assert compare_inits.main([*common, "--regime", "nf2", "--out", str(q),
                               "--reference", str(fp)]) == 0
    rows = _rows(q / "runs.csv")
    labels = [m.label for m in compare_inits.choose_methods(compare_inits.QUANT_METHODS)]
    assert sorted({r["method"] for r in rows}) == sorted(labels)
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
    assert len(rows) == 2 * len(labels)
    full = {r["seed"]: float(r["step0_val_loss"]) for r in _rows(fp / "runs.csv")}
    for r in rows:
        assert r["regime"] == "nf2" and r["config"] != _rows(fp / "runs.csv")[0]["config"]
        step0 = float(r["step0_val_loss"])
        if r["method"] == "kaiming":  # B = 0 on the quantized base: its loss, not fp's
            assert step0 == pytest.approx(float(r["base_val_loss"]), rel=1e-6)
            assert step0 != pytest.approx(full[r["seed"]], rel=1e-6)
        else:  # a repair changes the model at step 0
            assert step0 != pytest.approx(float(r["base_val_loss"]), rel=1e-6)
    summary = (q / "summary.md").read_text(encoding="utf-8")
    assert "How much of the full-precision gap does each init restore?" in summary
    assert "LoftQ algorithm (T = 5 alternations, last round kept)" in summary
    table = [ln for ln in summary.splitlines() if ln.startswith("| `quant-residual")]
    assert len(table) == 3 and " % " in table[-1]  # drop-in, own rate, then the share
    # benchmarks/quant_finetune.py: the same shares, side by side, from the same rows
    quant_finetune = pytest.importorskip("quant_finetune")
    table = quant_finetune.configuration("tiny", "nf2", common[2:8], q, fp)
    assert sorted(r["method"] for r in table) == sorted(set(labels) - {"kaiming"})
    for r in table:
        num, den = compare_inits.gap_pairs(rows, _rows(fp / "runs.csv"), r["method"],
                                           "kaiming", 0.01, "final_val_loss")
        assert r["n"] == 2 and r["share_final"] == compare_inits.ratio_interval(num, den)
        assert r["delta_final"][0] == pytest.approx(-sum(num) / 2)
    quant_finetune.write(table, tmp_path / "figure", "test")
    md = (tmp_path / "figure" / "finetune.md").read_text(encoding="utf-8")
    assert md.count("| tiny | 2 |") == len(table)
    assert (tmp_path / "figure" / "finetune.png").stat().st_size > 0
    assert quant_finetune.configuration("tiny", "nf2", common[2:8], q, tmp_path / "none") == []
    # Without a reference folder the section says what is missing instead of failing.
    assert compare_inits.main([*common, "--regime", "nf2", "--out", str(q), "--summary-only",
                               "--reference", str(tmp_path / "none")]) == 0
    assert "No full-precision `kaiming` runs found" in (q / "summary.md").read_text(
        encoding="utf-8")


def test_choose_default_leaves_quantized_regimes_out(tmp_path: Path) -> None:
    """The default strategy is chosen for full-precision bases: an nf4 configuration (other
    methods, another starting model) must not enter the choice."""
    choose_default = pytest.importorskip("choose_default")
    path = tmp_path / "runs.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=compare_inits.FIELDS)
        writer.writeheader()
        for lr in (1e-3, 2e-3):
            for regime in ("nf4", "base"):
                writer.writerow({"task": "minilm-rt", "regime": regime, "config": regime,
                                 "method": "kaiming", "seed": 0, "lr": lr, "status": "ok",
                                 "steps": 4, "curve_steps": "[0, 4]",
                                 "curve_val_loss": "[0.7, 0.6]", "final_val_loss": 0.6,
                                 "val_auc": 0.65, "test_metric": 0.7, "test_loss": 0.6,
                                 "calib_s": 0, "init_s": 0, "step0_val_loss": 0.7,
                                 "base_val_loss": 0.7})
    assert list(choose_default.folder_stats(path)) == ["minilm-rt/base"]
