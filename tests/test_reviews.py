"""The fine-food sentiment data (`data.source: reviews`, read from r-cran-modeldata without R) and the encoder text
batching it shares with the mlm and tag sources: buckets, masks, pairs, per-token labels, resume, multi-host slices,
padding that never changes a classifier's predictions, and `prepare` naming the package when it is missing."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve.config import load_config
from fastserve.data import encoder_text as et
from fastserve.data.__main__ import prepare
from fastserve.data.packages import MissingPackage, debian_path
from fastserve.data.reviews import PACKAGE, load_reviews
from fastserve.models import build_model


@pytest.fixture(scope="module")
def modeldata():
    try:
        debian_path("/usr/lib/R/site-library/modeldata/data/Rdata.rdb", PACKAGE, "tests/test_reviews.py")
    except MissingPackage as e:
        pytest.skip(str(e))


class WordTokenizer:
    """Stands in for any fastserve tokenizer: one id per whitespace word (id = 10 + word length), BERT specials."""
    pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4
    vocab_size = 64

    def encode(self, text):
        return [10 + min(len(w), 50) for w in text.split()]


def test_reader_gives_the_documented_rows_and_columns(modeldata):
    from fastserve.data.rdata_files import read_r_object

    train, test = read_r_object("modeldata", "training_data"), read_r_object("modeldata", "testing_data")
    assert train.shape == (4000, 3) and test.shape == (1000, 3)
    assert list(train.columns) == ["product", "review", "score"] == list(test.columns)
    assert set(map(str, train["score"])) == {"great", "other"}
    splits = load_reviews()
    assert [len(splits[s][0]) for s in ("train", "validation", "test")] == [3500, 500, 1000]
    assert splits["validation"][0][-1] == str(train["review"].iloc[-1])      # the last rows are the validation
    assert int(np.sum(splits["test"][1] == 0)) == int(np.sum(test["score"] == "great")) == 658


def test_prepare_names_the_package_when_missing(modeldata, tmp_path):
    with pytest.raises(MissingPackage, match="apt-get install r-cran-modeldata"):
        prepare("reviews", [f"r_library={tmp_path}"])
    assert "3,500 train, 500 validation, 1,000 test" in prepare("reviews", [])


def test_batches_pad_to_the_smallest_bucket_with_a_mask_and_resume():
    rng = np.random.default_rng(0)
    texts = [" ".join("w" * int(k) for k in rng.integers(1, 9, n)) for n in rng.integers(1, 40, 50)]
    enc = et.encode_texts(WordTokenizer(), texts, max_len=32)
    assert enc.lengths.max() == 32 and all(x[0] == 2 and x[-1] == 3 for x in enc.ids)
    labels = rng.integers(0, 2, 50).astype(np.int32)
    buckets = et.length_buckets(32)
    assert buckets == [8, 16, 24, 32]
    it = et.TextBatches(enc, labels, 8, seed=1, buckets=buckets, pad_id=0)
    batches = [next(it) for _ in range(6)]         # 6 batches per epoch: crosses into the second epoch
    for b in batches:
        real = b["mask"].sum(1)
        assert b["inputs"].shape[1] == min(x for x in buckets if x >= real.max())
        assert (b["inputs"][~b["mask"]] == 0).all() and (b["inputs"][:, 0] == 2).all()
        assert b["labels"].shape == (8,) and (b["weights"] == 1).all()
    # resume: a new iterator set to a saved position gives the same batches
    again = et.TextBatches(enc, labels, 8, seed=1, buckets=buckets, pad_id=0)
    again.set_state({"epoch": 0, "index": 4})
    for want in batches[4:]:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)
    # two hosts: each pads its half to the global batch's bucket; together they are the one-host batch
    halves = [next(et.TextBatches(enc, labels, 8, 1, buckets, 0, True, i, 2)) for i in range(2)]
    assert all((np.concatenate([h[k] for h in halves]) == batches[0][k]).all() for k in batches[0])


def test_length_grouped_batches_pad_less_cover_each_example_once_per_epoch_and_resume():
    rng = np.random.default_rng(2)
    texts = [" ".join("w" for _ in range(int(n))) for n in rng.integers(1, 63, 203)]
    enc = et.encode_texts(WordTokenizer(), texts, max_len=64)
    labels = np.arange(203, dtype=np.int32)          # the label names the example
    buckets = [8, 16, 24, 32, 48, 64]

    def epoch(it, n=25):
        bs = [next(it) for _ in range(n)]
        return bs, sum(b["inputs"].size for b in bs)

    plain, plain_tokens = epoch(et.TextBatches(enc, labels, 8, 3, buckets, 0))
    grouped_it = et.TextBatches(enc, labels, 8, 3, buckets, 0, group_by_length=5)
    grouped, grouped_tokens = epoch(grouped_it)
    assert grouped_it.get_state() == {"epoch": 1, "index": 0}     # 25 batches of 8 = one epoch (3 dropped)
    seen = np.concatenate([b["labels"] for b in grouped])
    assert len(set(seen.tolist())) == 200                         # every kept example exactly once
    assert grouped_tokens < 0.8 * plain_tokens                     # similar lengths share a batch
    for b in grouped:
        real = b["mask"].sum(1)
        assert b["inputs"].shape[1] == min(x for x in buckets if x >= real.max())
    # epoch 2 is another grouping; a resumed iterator continues exactly
    second = [next(grouped_it) for _ in range(3)]
    assert not all((a["labels"] == b["labels"]).all() for a, b in zip(second, grouped[:3]))
    again = et.TextBatches(enc, labels, 8, 3, buckets, 0, group_by_length=5)
    again.set_state({"epoch": 1, "index": 0})
    for want in second:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)


def test_heldout_batches_cover_every_example_once_and_pairs_and_token_labels():
    enc = et.encode_texts(WordTokenizer(), ["a bb", "ccc dddd eeeee", "f"] * 3, max_len=8)
    held = et.heldout_text_batches(enc, np.arange(9) % 2, 4, [4, 8], 0)
    assert [b["inputs"].shape for b in held] == [(4, 8), (4, 8), (4, 4)]
    assert np.concatenate([b["weights"] for b in held]).tolist() == [1] * 9 + [0] * 3
    assert not held[-1]["mask"][1:].any()          # padding examples are empty
    # pairs: [CLS] a [SEP] b [SEP], token types 0…0 1…1, the longer side cut first
    pair = et.encode_texts(WordTokenizer(), ["a b c d e f"], 7, pairs=["x y"])
    assert pair.ids[0].tolist() == [2, 11, 11, 3, 11, 11, 3] and pair.token_types[0].tolist() == [0] * 4 + [1] * 3
    b = next(et.TextBatches(pair, None, 1, 0, [8], 0))
    assert b["token_types"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0] and "labels" not in b
    # per-token labels: ignored at the specials and the padding, weight 1 where a token has one
    words = et.encode_texts(WordTokenizer(), ["a bb ccc", "dd"], 8)
    tags = et.wrap_token_labels([[5, 6, 7], [8]], words.lengths)
    tb = et.heldout_text_batches(words, tags, 2, [8], 0)[0]
    assert tb["labels"][0].tolist() == [-100, 5, 6, 7, -100, -100, -100, -100]
    assert tb["weights"].sum(1).tolist() == [3, 1]


def test_padding_changes_no_prediction_of_a_classifier():
    cfg = dataclasses.replace(load_config(None, ["model.name=encoder"]).model, vocab_size=64, num_classes=2,
                              d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    enc = et.encode_texts(WordTokenizer(), ["a bb ccc", "dddd e", "ff ggg hhhh iiiii j k"], 16)
    labels = np.zeros(3, np.int32)
    short = et.heldout_text_batches(enc, labels, 4, [16], 0)[0]
    long = et.heldout_text_batches(enc, labels, 4, [64], 0)[0]
    a = model(jnp.asarray(short["inputs"]), mask=jnp.asarray(short["mask"]))
    b = model(jnp.asarray(long["inputs"]), mask=jnp.asarray(long["mask"]))
    np.testing.assert_allclose(np.asarray(a)[:3], np.asarray(b)[:3], atol=1e-5)


def review_ids(texts, max_len, vocab):
    """Whitespace words hashed into `vocab` - 1 ids (0 stays padding), cut / padded to max_len."""
    import zlib

    out = np.zeros((len(texts), max_len), np.int32)
    for i, text in enumerate(texts):
        ids = [1 + zlib.crc32(w.lower().encode()) % (vocab - 1) for w in text.split()][:max_len]
        out[i, :len(ids)] = ids
    return out


def test_bilstm_sentiment_in_the_keras_like_api(modeldata):
    """configs/sentiment_bilstm.yaml's layer list, written with fs.models.Sequential, fits real reviews."""
    import fastserve as fs

    splits = load_reviews()
    x, y = review_ids(splits["train"][0][:256], 48, 2000), splits["train"][1][:256]
    model = fs.models.Sequential()
    model.add(fs.layers.Embedding(2000, 16, mask_zero=True, input_shape=(48,)))
    model.add(fs.layers.Bidirectional(fs.layers.LSTM(8)))
    model.add(fs.layers.Dropout(0.3))
    model.add(fs.layers.Dense(2, activation="softmax"))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    probs = model.predict(review_ids(splits["test"][0][:8], 48, 2000), verbose=0)
    assert probs.shape == (8, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
