"""Calibration speed: covinit.calibrate against its floor and against PEFT's EVA and CorDA.

On all-MiniLM-L6-v2 (Rotten Tomatoes snippets) and SmolLM2-135M (Hamlet blocks), with the same
data, the same target layers and the same process, it times

  (a) a plain forward pass over the calibration data,
  (b) forward + float32 ``XᵀX`` per target layer and side (the floor for exact statistics:
      the same masked rows, one GEMM each, no sharing, no higher moments),
  (c) ``covinit.calibrate`` (float64 and mixed precision; inputs+outputs and inputs only),
  (d) PEFT's EVA ``get_eva_state_dict`` (incremental PCA until its components converge),
  (e) PEFT's CorDA ``preprocess_corda`` (its hook needs batch size 1; includes its SVDs),

and reports seconds, ratios and the peak resident memory added during each run (sampled from
/proc every 5 ms).  The machine's load average is printed because the cores are shared.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/calibration_speed.py
    ... --quick          # (a)-(c) on less data (< 2 minutes), written to *_quick.{csv,md}

SmolLM2's weights are dequantized Q4_1 (4-bit noise), cached as safetensors in ``.cache/``.

``--models bert-random`` adds issue 16's shape: a MiniLM-shaped BERT with random weights
(hidden 384, 6 layers, FFN 1536), 32,768 positions of random tokens in batches of 1, 16 and 64
sequences of 128, with 1 and 2 torch threads, inputs of ``query/key/value/dense`` only; CorDA
runs once, at 2 threads (EVA is left out there).  Written to ``calibration_speed_shapes``:

    ... benchmarks/calibration_speed.py --models bert-random --output calibration_speed_shapes

``--smollm2-blocks N`` calibrates SmolLM2 on N blocks instead of 16 (the excess over the floor
that grows with the positions), named ``smollm2[N blocks]``; ``--sides in+out`` skips the
inputs-only rows:

    ... benchmarks/calibration_speed.py --models smollm2 --smollm2-blocks 64 --sides in+out \
        --no-baselines --append

``--bert-threads`` / ``--bert-batch-sizes`` run part of that sweep and ``--append`` merges it
into the existing results of the same ``--output`` (rows of the configurations re-run are
replaced), so that a sweep can be measured in parts, each while the machine is quiet.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import zoo
from _common import (  # benchmarks/ is on sys.path as a script
    load_average,
    machine,
    read_rows,
    write_rows,
)
from torch import Tensor, nn

import covinit
from covinit.collect import batch_masks, match_layers, rows_of

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Settings: (examples or blocks, batch size, sequence length) per model, full and quick.
MINILM = {"full": (128, 32, 64), "quick": (64, 32, 64)}
SMOLLM2 = {"full": (16, 8, 128), "quick": (2, 2, 128)}
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                  "output.dense"]  # every encoder linear (3-D inputs; pooler/classifier left out)
# Issue 16's configuration: (positions, sequence length), batch sizes and torch threads swept.
BERT_RANDOM = {"full": (32768, 128), "quick": (4096, 128)}
BERT_BATCH_SIZES = (1, 16, 64)
BERT_THREADS = (1, 2)
BERT_TARGETS = ["query", "key", "value", "dense"]  # every linear of the encoder and the pooler
# CorDA's hook squeezes dim 0, which leaves the pooler's (1, 384) input a vector it cannot
# take: CorDA gets the encoder's layers only (covinit keeps the pooler: slightly more work).
BERT_CORDA_TARGETS = r".*encoder\..*\.(query|key|value|dense)"
SMOLLM2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# EVA loops until convergence with no cap; we stop it after this many passes over the data
# (--eva-max-passes).  Its real cost is the time to converge, so the full run allows enough
# passes to converge and says in the table whether it did.
EVA_MAX_PASSES = {"full": 10, "quick": 1}


# ---------------------------------------------------------------------- measurement
class PeakRSS:
    """Peak resident set size above the starting value while the block runs (MiB)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self.start = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass
class Row:
    model: str
    method: str
    seconds: float
    peak_mib: float
    note: str = ""
    #: Median over rounds of this round's time ÷ the same round's floor (b/c rows of a
    #: multi-round run; None otherwise): steadier than the ratio of two best rounds.
    median_ratio: float | None = None
    #: CPU seconds of the best round in user and kernel mode (all threads; None for rows
    #: measured before these columns existed).  Kernel time here is mostly page faults.
    user_s: float | None = None
    sys_s: float | None = None
    #: Interleaved rounds this row's time is the best of (None: one run, or a row saved
    #: before the column existed).  ``--append`` merges runs made with different counts.
    rounds: int | None = None


@dataclass
class Timing:
    """One timed call: wall seconds, peak extra RSS (MiB), CPU user/kernel seconds."""

    seconds: float
    peak_mib: float
    user_s: float
    sys_s: float
    out: Any = None


def release_memory() -> None:
    """Return freed heap memory to the OS so each run's peak RSS starts from a clean base."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed(fn: Callable[[], Any]) -> Timing:
    """Run ``fn`` once after :func:`release_memory`, timing wall clock, RSS and CPU."""
    release_memory()
    before = resource.getrusage(resource.RUSAGE_SELF)
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Timing(seconds, mem.mib, after.ru_utime - before.ru_utime,
                  after.ru_stime - before.ru_stime, out)


def first_touch(gib: float = 1.0) -> Timing:
    """Allocate ``gib`` GiB of float64 and write it once: what memory the process has not
    touched yet costs here.  Every method pays this for each byte of its peak beyond memory
    it reuses; float64 statistics are twice the floor's float32 ones, so it explains most
    of the ``sys s`` gap (on this project's VM: 0.3–2.3 s of kernel time per GiB, varying
    from call to call)."""
    def touch() -> None:
        torch.empty(int(gib * 2**27), dtype=torch.float64).fill_(1.0)

    return timed(touch)


# ---------------------------------------------------------------------- methods
def forward_all(model: nn.Module, batches: list[dict[str, Tensor]]) -> None:
    with torch.no_grad():
        for b in batches:
            model(**b)


def forward_with_gram(model: nn.Module, batches: list[dict[str, Tensor]],
                      layers: dict[str, nn.Module], sides: tuple[str, ...]) -> None:
    """(b): the same masked rows, one float32 ``XᵀX`` per layer and side, accumulated."""
    grams: dict[tuple[str, str], Tensor] = {}
    masks: list[Tensor] = []

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            for side, t in (("input", args[0]), ("output", out)):
                if side in sides:
                    x = rows_of(t, masks).float()
                    g = grams.get((name, side))
                    if g is None:
                        grams[name, side] = x.T @ x
                    else:
                        g.addmm_(x.T, x)
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for b in batches:
                masks[:] = batch_masks(b)
                model(**b)
    finally:
        for h in handles:
            h.remove()


def eva(model: nn.Module, batches: list[dict[str, Tensor]], targets: list[str],
        rank: int, max_passes: int) -> str:
    from peft import EvaConfig, LoraConfig
    from peft.tuners.lora.eva import get_eva_state_dict

    class Stop(Exception):
        pass

    calls = 0
    cap = max_passes * len(batches)

    def forward_fn(m: nn.Module, inputs: dict[str, Tensor]) -> Any:
        # EVA cycles the data (itertools.cycle) until its components converge, with no cap:
        # count forward passes here, where every replayed batch goes through.
        nonlocal calls
        calls += 1
        if calls > cap:
            raise Stop
        return m(**inputs)

    config = LoraConfig(r=rank, target_modules=targets, init_lora_weights="eva",
                        eva_config=EvaConfig(use_label_mask=False))
    try:
        get_eva_state_dict(model, batches, peft_config=config, forward_fn=forward_fn,
                           show_progress_bar=False)
    except Stop:
        # EVA registers its hooks outside any try/finally: when stopped, they stay attached.
        # Nothing else hooks this model here, so clearing every forward hook is safe.
        for m in model.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        return f"stopped unconverged after {max_passes} passes (lower bound)"
    return f"converged after {calls} batches ({calls / len(batches):.1f} passes)"


def corda(model: nn.Module, singles: list[dict[str, Tensor]], targets: list[str] | str,
          rank: int) -> str:
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(r=rank, target_modules=targets, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="ipm"))

    def run_model() -> None:
        with torch.no_grad():
            for b in singles:
                model(**b)

    preprocess_corda(model, config, run_model=run_model)
    for m in model.modules():  # drop what it attached, so the next method starts clean
        for attr in ("eigens", "covariance_matrix", "sample_count", "mean", "std"):
            if hasattr(m, attr) and not isinstance(getattr(type(m), attr, None), property):
                try:
                    delattr(m, attr)
                except AttributeError:
                    pass
    return f"{len(singles)} batches of size 1"


# ---------------------------------------------------------------------- data
def minilm_setup(mode: str) -> tuple[nn.Module, list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    n, bs, length = MINILM[mode]
    torch.manual_seed(0)
    model, tok = zoo.load_minilm()
    texts = [text for text, _ in zoo.rotten_tomatoes(seed=0)["train"][:n]]
    loader = zoo.text_classification_loader(tok, texts, batch_size=bs, max_length=length)
    singles = zoo.text_classification_loader(tok, texts, batch_size=1, max_length=length)
    return model, list(loader), list(singles)


def smollm2_setup(mode: str, blocks: int | None = None
                  ) -> tuple[nn.Module, list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """SmolLM2 on Hamlet blocks; ``blocks`` overrides the mode's count (``--smollm2-blocks``)."""
    n, bs, length = SMOLLM2[mode]
    n = blocks or n
    model, tok = zoo.load_smollm2(cache_dir=ROOT / ".cache" / "smollm2")
    train, _ = zoo.hamlet()
    blocks = list(zoo.causal_lm_loader(tok, train, seq_len=length, batch_size=1))[:n]
    batches = [{k: torch.cat([b[k] for b in blocks[i:i + bs]]) for k in blocks[0]}
               for i in range(0, n, bs)]
    return model, batches, blocks


def bert_random_setup(mode: str, batch_size: int
                      ) -> tuple[nn.Module, list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """MiniLM-shaped BERT with seeded random weights and random tokens, no padding."""
    from transformers import BertConfig, BertModel

    positions, length = BERT_RANDOM[mode]
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)
    model = BertModel(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (positions // length, length), generator=gen)

    def split(size: int) -> list[dict[str, Tensor]]:
        return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
                for chunk in ids.split(size)]

    return model, split(batch_size), split(1)


# ---------------------------------------------------------------------- driver
def bench_model(name: str, setup: Callable[[str], Any], targets: list[str], mode: str,
                repeats: int, baselines: bool, rank: int, eva_passes: int,
                sides_list: tuple[tuple[str, ...], ...] = (("input", "output"), ("input",)),
                eva_baseline: bool = True, baseline_targets: Any = None) -> list[Row]:
    model, batches, singles = setup(mode)
    model.eval()
    layers = match_layers(model, targets)
    positions = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"\n== {name}: {len(layers)} target layers, {len(batches)} batches, "
          f"{positions} positions", flush=True)
    methods: dict[str, Callable[[], Any]] = {"a_forward": lambda: forward_all(model, batches)}
    for sides in sides_list:
        tag = "in+out" if "output" in sides else "in"
        methods[f"b_floor_fp32_gram[{tag}]"] = (
            lambda sides=sides: forward_with_gram(model, batches, layers, sides))
        for precision in ("float64", "mixed"):
            methods[f"c_covinit[{tag},{precision}]"] = (
                lambda sides=sides, precision=precision: covinit.calibrate(
                    model, batches, targets=targets, sides=sides, precision=precision,
                    show_progress=False) and "")
    forward_all(model, batches[:1])  # warm-up: allocator, kernels, lazy init
    # Rounds over all methods, best time per method: the cores are shared, and interleaving
    # spreads any burst of outside load over every method instead of one.
    best: dict[str, Timing] = {}
    peaks: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    for round_ in range(repeats):
        for method, fn in methods.items():
            t = timed(fn)
            if method not in best or t.seconds < best[method].seconds:
                best[method] = t
            peaks[method] = max(peaks.get(method, 0.0), t.peak_mib)
            times.setdefault(method, []).append(t.seconds)
            print(f"  round {round_ + 1} {method:<30} {t.seconds:8.2f} s  {t.peak_mib:8.1f} MiB"
                  f"  user {t.user_s:6.2f} s  sys {t.sys_s:5.2f} s", flush=True)
    rows = [Row(name, method, t.seconds, peaks[method],
                median_ratio=median_ratio(method, times), user_s=t.user_s, sys_s=t.sys_s,
                rounds=repeats)
            for method, t in best.items()]
    if baselines:
        runs = [("d_peft_eva", lambda: eva(model, batches, targets, rank, eva_passes)),
                ("e_peft_corda(bs=1)",
                 lambda: corda(model, singles, baseline_targets or targets, rank))]
        for method, fn in runs[0 if eva_baseline else 1:]:
            t = timed(fn)
            rows.append(Row(name, method, t.seconds, t.peak_mib, t.out, user_s=t.user_s,
                            sys_s=t.sys_s))
            print(f"  {method:<38} {t.seconds:8.2f} s  {t.peak_mib:8.1f} MiB  {t.out}",
                  flush=True)
    return rows


def bench_bert_random(mode: str, repeats: int, baselines: bool, rank: int,
                      threads_list: tuple[int, ...] = BERT_THREADS,
                      batch_sizes: tuple[int, ...] = BERT_BATCH_SIZES) -> list[Row]:
    """Issue 16's shape swept over torch threads and batch sizes (inputs only); CorDA once,
    at 2 threads and batch size 16 (its own pass is always batch size 1)."""
    rows: list[Row] = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for bs in batch_sizes:
            rows += bench_model(
                f"bert-random[t{threads},bs{bs}]",
                lambda mode, bs=bs: bert_random_setup(mode, bs), BERT_TARGETS, mode, repeats,
                baselines and threads == 2 and bs == 16, rank, 0, sides_list=(("input",),),
                eva_baseline=False, baseline_targets=BERT_CORDA_TARGETS)
    return rows


def _floor_of(method: str) -> str:
    """The floor method a (b)/(c) method is compared with: the one for the same sides."""
    tag = "in" if "[in," in method or method.endswith("[in]") else "in+out"
    return f"b_floor_fp32_gram[{tag}]"


def median_ratio(method: str, times: dict[str, list[float]]) -> float | None:
    """Median over rounds of ``times[method][i] / times[floor][i]`` (a round runs every
    method once, so a burst of outside load hits both sides of its ratio); None for a
    method without a floor or for fewer than two rounds."""
    floor = times.get(_floor_of(method))
    if method[0] not in "bc" or not floor or len(floor) < 2:
        return None
    return statistics.median(t / f for t, f in zip(times[method], floor, strict=True))


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        same = {x.method: x for x in rows if x.model == r.model}
        floor = same.get(_floor_of(r.method)) if r.method[0] in "bc" else None
        user_floor = floor.user_s if floor is not None else None
        out.append({"model": r.model, "method": r.method, "seconds": round(r.seconds, 3),
                    "x_forward": round(r.seconds / same["a_forward"].seconds, 3),
                    "x_floor": round(r.seconds / floor.seconds, 3) if floor else "",
                    "x_floor_median": "" if r.median_ratio is None else round(r.median_ratio, 3),
                    "user_s": "" if r.user_s is None else round(r.user_s, 2),
                    "sys_s": "" if r.sys_s is None else round(r.sys_s, 2),
                    # compute alone: CPU time in user mode against the floor's
                    "x_floor_user": round(r.user_s / user_floor, 3)
                    if r.user_s is not None and user_floor else "",
                    "peak_extra_mib": round(r.peak_mib, 1),
                    "rounds": "" if r.rounds is None else r.rounds, "note": r.note})
    return out


def merged(rows: list[Row], stem: str) -> tuple[list[Row], list[str]]:
    """``rows`` merged into the results saved under ``stem`` (rows of the same models are
    replaced, the others kept in order), and the commands that measured the kept ones."""
    new = {r.model for r in rows}
    saved = read_rows(RESULTS / f"{stem}.csv")
    def number(r: dict[str, str], key: str) -> float | None:
        return float(r[key]) if r.get(key) else None

    old = [Row(r["model"], r["method"], float(r["seconds"]), float(r["peak_extra_mib"]),
               r["note"], number(r, "x_floor_median"), number(r, "user_s"), number(r, "sys_s"),
               int(r["rounds"]) if r.get("rounds") else None)
           for r in saved if r["model"] not in new]
    md = RESULTS / f"{stem}.md"
    commands = []
    if md.is_file() and old:
        line = next((x for x in md.read_text().splitlines() if x.startswith("Command")), "")
        commands = re.findall(r"`([^`]*)`", line)
    # a re-measured configuration keeps its place in the table
    order = list(dict.fromkeys([r["model"] for r in saved] + [r.model for r in rows]))
    return sorted(old + rows, key=lambda r: order.index(r.model)), commands


def write(table: list[dict[str, Any]], rows: list[Row], args: argparse.Namespace,
          load: tuple[float, float, float], command: str, earlier: list[str],
          touch: Timing) -> None:
    stem = args.output + ("_quick" if args.quick else "")
    write_rows(RESULTS / f"{stem}.csv", table, list(table[0]))
    commands = "; then ".join(f"`{c}`" for c in [*earlier, command])
    lines = [
        "# Calibration speed",
        "",
        f"Command{'s' if earlier else ''}: {commands}  ",
        f"Machine: {machine()}; load average before: "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: {load_average()} "
        "(bert-random rows: threads and batch size in the model name)  ",
        "Times are the best of the `rounds` column's interleaved rounds (EVA and CorDA: one "
        "run; empty: not recorded when the row was measured); `× floor` compares with "
        "(b) for the same sides; `median` is the median over rounds of each round's ratio to "
        "that round's floor. SmolLM2's weights are dequantized Q4_1 (4-bit noise).",
        "",
        "`user s` / `sys s`: CPU seconds of the best round in user and kernel mode (kernel time "
        "is mostly page faults); `× floor, user`: user time against the floor's (the compute "
        f"alone). Writing 1 GiB of fresh memory took {touch.seconds:.2f} s "
        f"({touch.sys_s:.2f} s in the kernel) at the start of the last command: the price "
        "of every byte of a method's peak memory beyond what it reuses.",
        "",
        "| model | method | seconds | × forward | × floor | × floor, median | user s | sys s "
        "| × floor, user | peak extra MiB | rounds | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in table:
        lines.append(f"| {t['model']} | {t['method']} | {t['seconds']:.2f} | {t['x_forward']} "
                     f"| {t['x_floor']} | {t['x_floor_median']} | {t['user_s']} | {t['sys_s']} "
                     f"| {t['x_floor_user']} | {t['peak_extra_mib']} | {t['rounds']} "
                     f"| {t['note']} |")
    lines += ["", "Speed-ups of covinit (inputs only, the statistics EVA and CorDA collect):", ""]
    for model in dict.fromkeys(r.model for r in rows):
        same = {r.method: r.seconds for r in rows if r.model == model}
        for precision in ("float64", "mixed"):
            c = same.get(f"c_covinit[in,{precision}]")
            parts = [f"{base} {same[key] / c:.1f}×" for base, key in
                     (("vs EVA", "d_peft_eva"), ("vs CorDA", "e_peft_corda(bs=1)"))
                     if key in same and c]
            if parts:
                lines.append(f"- {model}, {precision}: " + ", ".join(parts))
        corda = same.get("e_peft_corda(bs=1)")
        floor = same.get("b_floor_fp32_gram[in]")
        if corda and floor:
            # 3× faster than CorDA needs covinit at CorDA/3: below the floor's time or not?
            lines.append(f"- {model}: CorDA ÷ 3 = {corda / 3:.2f} s against the floor's "
                         f"{floor:.2f} s ({corda / 3 / floor:.2f}× the floor)")
    if args.note:
        lines += ["", args.note]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data (< 2 minutes)")
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"],
                        choices=["minilm", "smollm2", "bert-random"])
    parser.add_argument("--output", default="calibration_speed",
                        help="results file stem under benchmarks/results (default "
                             "calibration_speed; _quick is appended in --quick mode)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds of (a)-(c), best kept (default 3, quick 1)")
    parser.add_argument("--no-baselines", action="store_true", help="skip EVA and CorDA")
    parser.add_argument("--baselines", action="store_true",
                        help="run EVA and CorDA in --quick mode too (they have fixed costs of "
                             "minutes: CorDA's per-layer SVDs, EVA's incremental SVDs)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--note", default="",
                        help="a line written under the table (e.g. what else ran meanwhile)")
    parser.add_argument("--bert-threads", type=int, nargs="+", default=list(BERT_THREADS),
                        help="bert-random: torch threads to sweep (default 1 2)")
    parser.add_argument("--bert-batch-sizes", type=int, nargs="+",
                        default=list(BERT_BATCH_SIZES),
                        help="bert-random: batch sizes to sweep (default 1 16 64)")
    parser.add_argument("--append", action="store_true",
                        help="merge into the existing results of --output, replacing the rows "
                             "of the configurations measured now")
    parser.add_argument("--smollm2-blocks", type=int, default=None,
                        help="SmolLM2: calibrate on this many Hamlet blocks of 128 tokens "
                             "(default 16, quick 2); the model is named smollm2[N blocks]")
    parser.add_argument("--sides", nargs="+", choices=["in+out", "in"], default=["in+out", "in"],
                        help="which statistics (b) and (c) collect (default both settings)")
    parser.add_argument("--eva-max-passes", type=int, default=None,
                        help="stop EVA after this many passes over the data (default 10, "
                             "quick 1); a stopped run is reported as a lower bound")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats = args.repeats or (1 if args.quick else 3)
    mode = "quick" if args.quick else "full"
    load = os.getloadavg()
    command = "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python " + " ".join(
        ["benchmarks/calibration_speed.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"threads: {args.threads}; mode: {mode}", flush=True)
    touch = first_touch()
    print(f"first touch of 1 GiB: {touch.seconds:.2f} s (kernel {touch.sys_s:.2f} s)",
          flush=True)
    rows: list[Row] = []
    specs = {"minilm": (minilm_setup, MINILM_TARGETS),
             "smollm2": (partial(smollm2_setup, blocks=args.smollm2_blocks), SMOLLM2_TARGETS)}
    sides_list = tuple(("input", "output") if s == "in+out" else ("input",) for s in args.sides)
    baselines = not args.no_baselines and (args.baselines or not args.quick)
    for name in args.models:
        if name == "bert-random":
            rows += bench_bert_random(mode, repeats, baselines, args.rank,
                                      tuple(args.bert_threads), tuple(args.bert_batch_sizes))
            torch.set_num_threads(args.threads)
            continue
        setup, targets = specs[name]
        label = (f"smollm2[{args.smollm2_blocks} blocks]"
                 if name == "smollm2" and args.smollm2_blocks else name)
        rows += bench_model(label, setup, targets, mode, repeats, baselines, args.rank,
                            args.eva_max_passes or EVA_MAX_PASSES[mode], sides_list=sides_list)
    earlier: list[str] = []
    if args.append:
        rows, earlier = merged(rows, args.output + ("_quick" if args.quick else ""))
    table = ratios(rows)
    write(table, rows, args, load, command, earlier, touch)
    print("\nload average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    for t in table:
        print(f"  {t['model']:<8} {t['method']:<34} {t['seconds']:8.2f} s  "
              f"×fwd {t['x_forward']:<7} ×floor {t['x_floor']!s:<6} "
              f"(median {t['x_floor_median']!s:<6}) {t['peak_extra_mib']} MiB")


if __name__ == "__main__":
    main()
