"""Token tagging: BIO spans and span F1 against hand-computed cases, the on-device span counts against the host
rule, the tag loss reading only labelled tokens, and the KJV Strong's tagging data."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastserve.data import strongs
from fastserve.data.encoder_text import IGNORE_LABEL
from fastserve.data.packages import MissingPackage
from fastserve.tasks.spans import bio_spans, bio_tag_names, span_counts, span_f1
from fastserve.tasks.tag import Tagging

TAGS = bio_tag_names(["W", "ADD"])   # O B-W I-W B-ADD I-ADD


def test_spans_follow_the_conlleval_rules():
    assert bio_spans(["B-W", "I-W", "O", "B-ADD", "B-W", "I-ADD"]) == {(0, 1, "W"), (3, 3, "ADD"), (4, 4, "W"),
                                                                     (5, 5, "ADD")}
    assert bio_spans(["I-W", "I-W", "O", "I-ADD", "B-W", "B-W", "I-W"]) == {(0, 1, "W"), (3, 3, "ADD"), (4, 4, "W"),
                                                                          (5, 6, "W")}
    assert bio_spans(["O", "O"]) == set()
    with pytest.raises(ValueError, match="X-W"):
        bio_spans(["X-W"])


def test_span_f1_by_hand():
    gold = ["B-W", "I-W", "O", "B-W", "B-ADD", "I-ADD"]
    pred = ["B-W", "O", "O", "B-W", "B-ADD", "I-ADD"]   # the first span cut short: 2 of 3 right, 2 of 3 found
    g, p = bio_spans(gold), bio_spans(pred)
    assert (len(g & p), len(p), len(g)) == (2, 3, 3)
    assert span_f1(2, 3, 3) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert span_f1(0, 0, 4) == (0.0, 0.0, 0.0)
    # on the device, with non-word positions ([CLS], continuation pieces, padding) between the words
    ids = lambda tags: [TAGS.index(t) for t in tags]  # noqa: E731
    words = np.array([[0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0]], bool)
    gold_row = np.full(words.shape, 2, np.int32)       # I-W under non-words: must be skipped, not continue spans
    pred_row = np.full(words.shape, 4, np.int32)
    gold_row[words], pred_row[words] = ids(gold), ids(pred)
    counts = span_counts(jnp.asarray(pred_row), jnp.asarray(gold_row), jnp.asarray(words))
    assert [float(c) for c in counts] == [2.0, 3.0, 3.0]


def test_device_span_counts_equal_the_host_rule_on_random_sequences():
    rng = np.random.default_rng(0)
    b, t = 64, 40
    gold = rng.integers(0, len(TAGS), (b, t)).astype(np.int32)
    pred = np.where(rng.random((b, t)) < 0.7, gold, rng.integers(0, len(TAGS), (b, t))).astype(np.int32)
    words = rng.random((b, t)) < 0.7
    expected = [0, 0, 0]
    for row in range(b):
        g = bio_spans([TAGS[c] for c in gold[row][words[row]]])
        p = bio_spans([TAGS[c] for c in pred[row][words[row]]])
        expected = [expected[0] + len(g & p), expected[1] + len(p), expected[2] + len(g)]
    got = span_counts(jnp.asarray(pred), jnp.asarray(gold), jnp.asarray(words))
    assert [int(c) for c in got] == expected and expected[0] > 100


def tiny_tagger():
    from fastserve.config import load_config

    cfg = dataclasses.replace(load_config(None, ["model.name=encoder"]).model, vocab_size=50, num_classes=len(TAGS),
                              d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16, head="tag", dropout=0.0)
    with nnx.use_eager_sharding(False):
        model = cfg.build(nnx.Rngs(0))
    model.eval()
    return model


def test_tag_loss_reads_only_labelled_tokens():
    model = tiny_tagger()
    rng = np.random.default_rng(1)
    inputs = rng.integers(5, 50, (2, 12)).astype(np.int32)
    mask = np.arange(12)[None] < np.array([[9], [12]])
    labels = rng.integers(0, len(TAGS), (2, 12)).astype(np.int32)
    weights = (rng.random((2, 12)) < 0.6) & mask
    weights[:, 0] = False                                  # [CLS]
    labels[~weights] = IGNORE_LABEL
    batch = {"inputs": inputs, "mask": mask, "labels": labels, "weights": weights.astype(np.float32)}
    task = Tagging()
    loss, sums = task.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None, {})
    logits = np.asarray(model(jnp.asarray(inputs), mask=jnp.asarray(mask)))
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[weights], labels[weights]).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(sums["weight"]) == weights.sum()
    # labels under weight 0 and tokens under padding change nothing
    other = dict(batch, labels=np.where(weights, labels, 3).astype(np.int32),
                 inputs=np.where(mask, inputs, 7).astype(np.int32))
    loss2, sums2 = task.loss(model, {k: jnp.asarray(v) for k, v in other.items()}, None, {})
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    assert float(sums2["correct"]) == float(sums["correct"])
    summary = task.summarize({k: np.asarray(v, np.float64) for k, v in sums.items()})
    assert set(summary) >= {"loss", "accuracy", "span_f1", "span_precision", "span_recall"}


def test_verse_markup_becomes_word_tags():
    markup = ('And the <w lemma="strong:H0776">earth</w> <w lemma="strong:H1961">was</w> without; and '
              '<w lemma="strong:H2822">darkness</w> <transChange type="added">it was</transChange> '
              '<w lemma="strong:H8313">shall burn them up</w>.<note placement="foot">Heb. between</note>')
    words, tags, spaced = strongs.tag_verse(markup)
    assert words == ["And", "the", "earth", "was", "without", ";", "and", "darkness", "it", "was", "shall", "burn",
                     "them", "up", "."]
    assert tags == ["O", "O", "B-W", "B-W", "O", "O", "O", "B-W", "B-ADD", "I-ADD", "B-W", "I-W", "I-W", "I-W", "O"]
    assert spaced[:3] == [False, True, True] and spaced[5] is False


def test_first_word_piece_carries_the_tag():
    class Tok:
        unk_id = 1

        def encode(self, text):
            return [10 + ord(c) % 50 for c in text]       # one piece per character
    verse = strongs.TaggedVerse("Gen", ["God", "said", "."], ["B-W", "B-W", "O"], [False, True, False])
    ids, labels = strongs.word_pieces(Tok(), verse)
    assert len(ids) == 3 + 5 + 1
    assert labels == [1, IGNORE_LABEL, IGNORE_LABEL, 1, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL, 0]


def test_prepare_names_the_missing_package(monkeypatch, tmp_path):
    from fastserve.data import sword
    from fastserve.data.__main__ import prepare

    monkeypatch.setattr(sword, "SWORD_ROOT", tmp_path / "sword")
    monkeypatch.setenv("FASTSERVE_DATA", str(tmp_path / "cache"))    # no cached conversion to fall back on
    with pytest.raises(MissingPackage, match="apt-get install sword-text-kjv"):
        prepare("strongs", [])


def test_genesis_1_2_from_the_installed_kjv():
    from fastserve.data import sword

    try:
        verses = sword.verses(strongs.MODULE)
    except MissingPackage as e:
        pytest.skip(str(e))
    words, tags, _ = strongs.tag_verse(verses[1].markup)
    pairs = dict(zip(words[:14], tags[:14]))
    assert (verses[1].book, verses[1].chapter, verses[1].verse) == ("Gen", 1, 2)
    assert words[11:13] == ["darkness", "was"] and tags[11:13] == ["B-W", "B-ADD"]   # "darkness *was* upon"
    assert pairs["earth"] == "B-W" and pairs["the"] == "O" and pairs[","] == "O"
