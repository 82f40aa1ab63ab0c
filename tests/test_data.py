"""Tests for covinit.data: reading users' text files, text → batches, quiet transformers loads.

Real text and a real tokenizer (MiniLM's WordPiece, Rotten Tomatoes, Hamlet) come from
benchmarks/zoo.py; the helpers under test are the package's own.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import zoo

from covinit.data import (
    causal_lm_loader,
    quiet_transformers,
    read_labelled_dataset,
    read_text_dataset,
    text_classification_loader,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def splits() -> dict[str, list[tuple[str, int]]]:
    return zoo.rotten_tomatoes(seed=0)


@pytest.fixture(scope="module")
def bert_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(zoo.minilm_path())


# --------------------------------------------------------------------------- user files


def test_read_txt(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\n\n  \nsecond line\r\nthird\n", encoding="utf-8")
    assert read_text_dataset(f) == ["first line", "second line", "third"]
    with pytest.raises(ValueError, match="text_column"):
        read_text_dataset(f, text_column="x")


def test_read_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    rows = [{"text": "hello", "label": 1}, {"text": "world", "label": 0}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + '\n\n"bare string"\n')
    assert read_text_dataset(f) == ["hello", "world", "bare string"]
    g = tmp_path / "b.jsonl"
    g.write_text(json.dumps({"review": "x", "stars": 3}) + "\n")
    assert read_text_dataset(g, text_column="review") == ["x"]
    with pytest.raises(ValueError, match=r"b\.jsonl:1: no field 'text'; fields: review, stars"):
        read_text_dataset(g)
    with pytest.raises(ValueError, match="must be a string"):
        read_text_dataset(g, text_column="stars")
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: not valid JSON"):
        read_text_dataset(bad)
    arr = tmp_path / "d.jsonl"
    arr.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_text_dataset(arr)


def test_read_csv_and_tsv(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('id,text\n1,"a, quoted\nmultiline text"\n2,plain\n3,\n', encoding="utf-8")
    assert read_text_dataset(f) == ["a, quoted\nmultiline text", "plain"]
    with pytest.raises(ValueError, match="no column 'body'; columns: id, text"):
        read_text_dataset(f, text_column="body")
    t = tmp_path / "a.tsv"
    t.write_text("sentence\tlabel\nsome words\t1\n")
    assert read_text_dataset(t, text_column="sentence") == ["some words"]


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_text_dataset(tmp_path / "missing.txt")
    other = tmp_path / "a.parquet"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.parquet'.*\.txt"):
        read_text_dataset(other)
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="contains no text"):
        read_text_dataset(empty)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_dataset(binary)


# --------------------------------------------------------------------------- dataloaders


def test_text_classification_loader_shapes_and_masks(bert_tokenizer, splits):
    examples = splits["train"][:70]
    loader = text_classification_loader(bert_tokenizer, examples, batch_size=32,
                                             max_length=24)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [32, 32, 6]
    seen = []
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == mask.shape and ids.dtype == mask.dtype == torch.long
        assert ids.shape[1] <= 24
        # Padding to the longest: some row fills the batch, padded positions hold [PAD].
        assert mask.sum(1).max() == ids.shape[1]
        assert torch.all(ids[mask == 0] == bert_tokenizer.pad_token_id)
        assert torch.all(ids[mask == 1] != bert_tokenizer.pad_token_id)
        seen += b["labels"].tolist()
    assert seen == [label for _, label in examples]  # no shuffle: order kept
    first = bert_tokenizer(examples[0][0], truncation=True, max_length=24)["input_ids"]
    row = batches[0]["input_ids"][0][batches[0]["attention_mask"][0] == 1]
    assert row.tolist() == first


def test_text_classification_loader_shuffle_is_seeded(bert_tokenizer, splits):
    examples = splits["train"][:64]

    def order(seed):
        loader = text_classification_loader(bert_tokenizer, examples, 16, 32,
                                                shuffle=True, seed=seed)
        return [tuple(b["input_ids"][:, 1].tolist()) for b in loader]

    assert order(3) == order(3)
    assert order(3) != order(4)
    loader = text_classification_loader(bert_tokenizer, examples, 16, 32, shuffle=True,
                                            seed=3, drop_last=True)
    labels = sorted(label for b in loader for label in b["labels"].tolist())
    assert labels == sorted(label for _, label in examples)


def test_text_classification_loader_unlabelled_and_errors(bert_tokenizer):
    loader = text_classification_loader(bert_tokenizer, ["a b c", "d"], 4, 8)
    (batch,) = list(loader)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(TypeError, match=r"examples\[1\]"):
        text_classification_loader(bert_tokenizer, [("a", 1), "b"], 4, 8)
    with pytest.raises(ValueError, match="empty"):
        text_classification_loader(bert_tokenizer, [], 4, 8)
    with pytest.raises(ValueError, match="batch_size"):
        text_classification_loader(bert_tokenizer, ["a"], 0, 8)
    with pytest.raises(ValueError, match="max_length"):
        text_classification_loader(bert_tokenizer, ["a"], 2, 1)


def test_causal_lm_loader_blocks(bert_tokenizer):
    _, text = zoo.hamlet(0.05)
    ids = bert_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    seq_len, batch_size = 50, 8
    loader = causal_lm_loader(bert_tokenizer, text, seq_len, batch_size)
    n_blocks = len(ids) // seq_len
    assert len(loader.dataset) == n_blocks
    batches = list(loader)
    flat = []
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].shape[1] == seq_len
        assert torch.equal(b["labels"], b["input_ids"])
        assert b["labels"].data_ptr() != b["input_ids"].data_ptr()  # safe to edit labels
        assert torch.all(b["attention_mask"] == 1)
        flat += b["input_ids"].flatten().tolist()
    assert flat == ids[: n_blocks * seq_len]  # consecutive, non-overlapping blocks

    def first_tokens(seed):
        shuffled = causal_lm_loader(bert_tokenizer, text, seq_len, batch_size,
                                        shuffle=True, seed=seed)
        return [b["input_ids"][:, 0].tolist() for b in shuffled]

    assert first_tokens(0) == first_tokens(0) != first_tokens(1)
    with pytest.raises(ValueError, match="fewer than seq_len=50"):
        causal_lm_loader(bert_tokenizer, "too short", seq_len, batch_size)
    with pytest.raises(TypeError, match="text must be a str"):
        causal_lm_loader(bert_tokenizer, ["a list"], seq_len, batch_size)


def test_read_labelled_jsonl_csv_tsv(tmp_path):
    f = tmp_path / "a.jsonl"
    rows = [{"text": "good", "label": 1}, {"text": "  ", "label": 0}, {"text": "bad", "label": "0"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_labelled_dataset(f, "label") == [("good", 1), ("bad", 0)]  # blank text dropped
    c = tmp_path / "a.csv"
    c.write_text("body,stars\nfine film,4\n\"long, dull\",1\n", encoding="utf-8")
    assert read_labelled_dataset(c, "stars", text_column="body") == [("fine film", 4),
                                                                     ("long, dull", 1)]
    t = tmp_path / "a.tsv"
    t.write_text("text\tlabel\nsome words\t 2 \n")
    assert read_labelled_dataset(t, "label") == [("some words", 2)]
    # the pairs batch with labels
    assert read_text_dataset(c, text_column="body") == ["fine film", "long, dull"]


@pytest.mark.parametrize(("content", "suffix", "message"), [
    ('{"text": "a", "label": "pos"}\n', ".jsonl", r"a\.jsonl:1: label 'label' must be an "
                                                   r"integer >= 0 \(a class index\), got 'pos'"),
    ('{"text": "a", "label": -1}\n', ".jsonl", "got -1"),
    ('{"text": "a", "label": true}\n', ".jsonl", "got True"),
    ('{"text": "a", "label": 1.5}\n', ".jsonl", "got 1.5"),
    ('{"text": "a"}\n', ".jsonl", r"a\.jsonl:1: no field 'label'; fields: text"),
    ('"bare"\n', ".jsonl", "a bare string has no field 'label'"),
    ("text,y\na,1\nb,x\n", ".csv", r"a\.csv:3: label 'label'|no column 'label'; columns: text, y"),
    ("one\ntwo\n", ".txt", "a .txt file has no label column"),
])
def test_read_labelled_errors(tmp_path, content, suffix, message):
    f = tmp_path / f"a{suffix}"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_labelled_dataset(f, "label")


def test_labelled_pairs_from_a_file_batch_with_labels(tmp_path, bert_tokenizer):
    f = tmp_path / "a.csv"
    f.write_text("text,label\na fine film,1\na dull one,0\nso so,1\n")
    (batch,) = list(text_classification_loader(bert_tokenizer, read_labelled_dataset(f, "label"),
                                               4, 8))
    assert batch["labels"].tolist() == [1, 0, 1] and batch["input_ids"].shape[0] == 3


def test_quiet_transformers_restores_the_verbosity():
    transformers = pytest.importorskip("transformers")
    logging = transformers.utils.logging
    before = logging.get_verbosity()
    logging.set_verbosity_info()
    try:
        with pytest.raises(RuntimeError, match="boom"), quiet_transformers():
            assert logging.get_verbosity() == logging.ERROR
            assert not logging.is_progress_bar_enabled()
            raise RuntimeError("boom")
        assert logging.get_verbosity() == logging.INFO  # restored on an exception too
        assert logging.is_progress_bar_enabled()
    finally:
        logging.set_verbosity(before)
