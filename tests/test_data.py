"""Tests for fastserve.data: corpus, tokenizer, packing and batch iterators."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fastserve.data import (
    LMBatches,
    Tokenizer,
    eval_batches,
    load_or_train_tokenizer,
    load_texts,
    pack_documents,
    split_documents,
    train_tokenizer,
)
from fastserve.data import tokenizer as tokenizer_module

TRICKY_TEXTS = [
    "a  b   c",  # runs of spaces
    "  leading spaces",
    "trailing spaces  ",
    "tab\tseparated\t\tfields\t",
    "line one\nline two\n\n\nafter blank lines\n",
    "windows\r\nline\r\n",
    "unicode: héllo wörld, 世界, emoji 😀, ñ, ß, Ω",
    "def f(x):\n    if x > 10:\n\treturn x ** 2  # comment\n    return [i for i in range(x)]\n",
    "numbers 1234567890 3.14159 -42",
    " ",
    "\n",
    "",
    "<s></s><pad> literal special-looking text",
]


@pytest.fixture(scope="module")
def pydoc_docs() -> list[str]:
    return load_texts("pydoc")


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory, pydoc_docs) -> tuple[Tokenizer, str]:
    """The one tokenizer trained for this module, and the file it was written to."""
    path = str(tmp_path_factory.mktemp("tok") / "spm.model")
    return train_tokenizer(pydoc_docs, 1000, path), path


@pytest.fixture(scope="module")
def tok(tok_file) -> Tokenizer:
    return tok_file[0]


# --- corpus -----------------------------------------------------------------


def test_pydoc_corpus_loads_deterministically(pydoc_docs):
    from pydoc_data.topics import topics

    assert len(pydoc_docs) == 79
    assert all(isinstance(d, str) and d.strip() for d in pydoc_docs)
    assert pydoc_docs == [topics[k] for k in sorted(topics)]
    assert load_texts("pydoc") == pydoc_docs
    assert sum(len(d) for d in pydoc_docs) > 400_000


def test_text_source_globs_sorted_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay  é\n", encoding="utf-8")
    (tmp_path / "c.md").write_text("sea", encoding="utf-8")
    assert load_texts("text", [str(tmp_path / "*.txt")]) == ["ay  é\n", "bee\n"]
    # Explicit paths keep their order; a file named twice is read once.
    got = load_texts("text", [str(tmp_path / "c.md"), str(tmp_path / "*")])
    assert got == ["sea", "ay  é\n", "bee\n"]

    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_texts("text", [missing])
    with pytest.raises(FileNotFoundError, match=r"\*\.json"):
        load_texts("text", [str(tmp_path / "*.json")])
    with pytest.raises(ValueError, match="bogus.*pydoc"):
        load_texts("bogus")
    with pytest.raises(ValueError):
        load_texts("text", [])


def test_split_deterministic_and_disjoint(pydoc_docs):
    train, held = split_documents(pydoc_docs, 0.1, seed=0)
    assert (train, held) == split_documents(pydoc_docs, 0.1, seed=0)
    assert len(held) == round(79 * 0.1) and len(train) + len(held) == 79
    # Two pydoc topics share a text, so check disjointness on unique labels.
    labels = [f"doc{i}" for i in range(79)]
    train, held = split_documents(labels, 0.1, seed=0)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(labels)
    assert train == [d for d in labels if d in set(train)]  # original order kept
    assert split_documents(labels, 0.1, seed=1)[1] != held

    docs = ["a", "b", "c"]
    assert len(split_documents(docs, 0.01, seed=0)[1]) == 1  # never an empty eval set
    assert len(split_documents(docs, 0.99, seed=0)[0]) == 1  # never an empty train set
    assert split_documents(docs, 0.0, seed=0) == (docs, [])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="eval_fraction"):
            split_documents(docs, bad, seed=0)


# --- tokenizer --------------------------------------------------------------


def test_tokenizer_ids_and_file(tok_file):
    tok, path = tok_file
    assert tok.vocab_size == 1000
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    proto = tok.model_proto
    assert isinstance(proto, bytes) and len(proto) > 1000
    text = "def main():\n    return 0\n"
    assert Tokenizer.from_bytes(proto).encode(text) == tok.encode(text)
    # The file on disk is the same model, and no temp file was left beside it.
    assert os.listdir(os.path.dirname(path)) == ["spm.model"]
    assert Tokenizer.from_file(path).model_proto == proto


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text


def test_decode_is_concatenative(tok):
    # Streaming output decodes token slices separately; no space may be lost at a cut.
    text = "def f(x):\n    return  x  # done\n the end"
    ids = tok.encode(text)
    assert all(tok.decode(ids[:k]) + tok.decode(ids[k:]) == text for k in range(len(ids) + 1))


def test_encode_batch_and_compression(tok, pydoc_docs):
    assert tok.encode_batch(TRICKY_TEXTS) == [tok.encode(t) for t in TRICKY_TEXTS]
    assert tok.encode_batch([]) == []
    # A trained vocabulary must compress English well below one token per char.
    doc = pydoc_docs[0]
    assert len(tok.encode(doc)) < 0.5 * len(doc)
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"


def test_train_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], 100, str(tmp_path / "t.model"))
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(["some text"], 1000, str(tmp_path / "t.model"), model_type="wordpiece")
    assert not (tmp_path / "t.model").exists()


def test_cache_reuse_and_retrain(tmp_path, pydoc_docs, monkeypatch):
    texts = pydoc_docs[:20]
    workdir = str(tmp_path / "work")
    model = os.path.join(workdir, "tokenizer.model")
    first = load_or_train_tokenizer("", texts, 500, "bpe", workdir)
    assert first.vocab_size == 500
    mtime = os.stat(model).st_mtime_ns
    with open(os.path.join(workdir, "tokenizer.json")) as f:
        digest = json.load(f)["sha256"]

    def no_training(*args, **kwargs):
        raise AssertionError("cache hit must not retrain")

    with monkeypatch.context() as m:
        m.setattr(tokenizer_module, "train_tokenizer", no_training)
        again = load_or_train_tokenizer("", texts, 500, "bpe", workdir)
    assert os.stat(model).st_mtime_ns == mtime
    assert again.model_proto == first.model_proto

    other = load_or_train_tokenizer("", texts, 600, "bpe", workdir)
    assert other.vocab_size == 600
    assert Tokenizer.from_file(model).vocab_size == 600
    with open(os.path.join(workdir, "tokenizer.json")) as f:
        meta = json.load(f)
    assert meta["vocab_size"] == 600 and meta["sha256"] != digest

    # Changed corpus, same settings: retrain too.
    calls = []
    real = tokenizer_module.train_tokenizer
    monkeypatch.setattr(tokenizer_module, "train_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_or_train_tokenizer("", texts[:-1], 600, "bpe", workdir)
    assert calls == [1]

    # An explicit path is loaded as is, and a missing one is named.
    assert load_or_train_tokenizer(model, [], 123, "bpe", "unused").vocab_size == 600
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_or_train_tokenizer(str(tmp_path / "missing.model"), texts, 500, "bpe", workdir)


# --- packing ----------------------------------------------------------------


def test_pack_loses_no_token(tok, pydoc_docs):
    docs = pydoc_docs[:5]
    seq_len = 64
    rows = pack_documents(docs, tok, seq_len)
    stream = np.concatenate([[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs])
    assert rows.dtype == np.int32 and rows.shape == ((len(stream) - 1) // seq_len, seq_len + 1)
    rebuilt = np.concatenate([rows[:, :-1].ravel(), rows[-1:, -1]])
    np.testing.assert_array_equal(rebuilt, stream[: len(rebuilt)])
    assert len(stream) - len(rebuilt) < seq_len  # only the incomplete tail is dropped
    np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])  # rows overlap by one token
    assert (rows == tok.eos_id).sum() == (rebuilt == tok.eos_id).sum() >= 4


def test_pack_too_little_text(tok):
    n = len(tok.encode("hello")) + 2  # bos + eos
    with pytest.raises(ValueError, match=rf"{n} tokens.*need at least 1001"):
        pack_documents(["hello"], tok, 1000)
    assert pack_documents(["hello"], tok, n - 1).shape == (1, n)


# --- iterators --------------------------------------------------------------


def _rows(n: int = 23, width: int = 9) -> np.ndarray:
    # Row r starts with r * width, so a row's first token identifies it.
    return np.arange(n * width, dtype=np.int32).reshape(n, width)


def _take(it: LMBatches, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"inputs", "targets", "weights"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_shapes_and_epochs():
    rows = _rows()
    it = LMBatches(rows, global_batch=4, seed=7)
    assert it.batches_per_epoch == 5  # 23 // 4, remainder dropped
    first = _take(it, 5)
    b = first[0]
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (4, 8)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert (b["weights"] == 1.0).all()
    ids = np.concatenate([x["inputs"][:, 0] // 9 for x in first])
    assert len(set(ids.tolist())) == 20  # no row repeats within an epoch
    np.testing.assert_array_equal(ids, np.random.default_rng([7, 0]).permutation(23)[:20])
    assert it.get_state() == {"epoch": 1, "index": 0}
    second = np.concatenate([x["inputs"][:, 0] // 9 for x in _take(it, 5)])
    assert not np.array_equal(ids, second)  # a new permutation each epoch

    plain = LMBatches(rows, global_batch=4, seed=7, shuffle=False)
    np.testing.assert_array_equal(next(plain)["inputs"][:, 0] // 9, [0, 1, 2, 3])


def test_batches_deterministic_and_seeded():
    rows = _rows()
    _assert_same(_take(LMBatches(rows, 4, seed=3), 12), _take(LMBatches(rows, 4, seed=3), 12))
    a = next(LMBatches(rows, 4, seed=3))["inputs"]
    b = next(LMBatches(rows, 4, seed=4))["inputs"]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("steps", [2, 4, 5, 9])  # mid-epoch, before/at/after a boundary
def test_batches_exact_resume(steps):
    rows = _rows()
    it = LMBatches(rows, 4, seed=11)
    _take(it, steps)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 7)
    resumed = LMBatches(rows, 4, seed=11)
    resumed.set_state(state)
    assert resumed.get_state() == state
    _assert_same(_take(resumed, 7), expected)
    with pytest.raises(ValueError, match="invalid iterator state"):
        resumed.set_state({"epoch": 0, "index": 5})


def test_process_slices_concatenate_to_global_batch():
    rows = _rows()
    full = _take(LMBatches(rows, 4, seed=5), 8)
    parts = [_take(LMBatches(rows, 4, seed=5, process_index=p, process_count=2), 8) for p in range(2)]
    for step, batch in enumerate(full):
        for key in batch:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
        assert parts[0][step]["inputs"].shape == (2, 8)


def test_batches_validation():
    with pytest.raises(ValueError, match=r"23 rows.*global_batch 32"):
        LMBatches(_rows(), 32, seed=0)
    with pytest.raises(ValueError, match=r"global_batch 4 .*process_count 3"):
        LMBatches(_rows(), 4, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"global_batch 5 .*process_count 2"):
        eval_batches(_rows(), 5, process_count=2)


def test_eval_batches_pad_with_zero_weight():
    rows = _rows(10)
    batches = eval_batches(rows, 4)
    assert len(batches) == 3
    assert all(b["inputs"].shape == (4, 8) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[:10], rows[:, :-1])
    np.testing.assert_array_equal(np.concatenate([b["targets"] for b in batches])[:10], rows[:, 1:])
    last = batches[-1]
    np.testing.assert_array_equal(last["weights"][:, 0], [1, 1, 0, 0])
    assert (last["weights"][:2] == 1).all() and (last["weights"][2:] == 0).all()
    assert (last["inputs"][2:] == 0).all() and (last["targets"][2:] == 0).all()
    assert sum(float(b["weights"].sum()) for b in batches) == 10 * 8

    exact = eval_batches(_rows(8), 4)
    assert len(exact) == 2 and all((b["weights"] == 1).all() for b in exact)
    assert eval_batches(np.zeros((0, 9), np.int32), 4) == []

    halves = [eval_batches(rows, 4, process_index=p, process_count=2) for p in range(2)]
    for step, batch in enumerate(batches):
        for key in batch:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
