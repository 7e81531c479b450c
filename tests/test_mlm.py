"""Masked-LM pretraining: the 80/10/10 masking statistics, what masking may never choose, the mlm_text data source
(segments within documents, the fields the task needs, NSP pairs), a tiny training run, and `prepare` naming the
package that is missing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve.data import english_corpora, mlm_text
from fastserve.data.packages import MissingPackage
from fastserve.tasks.mlm import choose_and_corrupt

MASK, V = 4, 30_000


def synthetic(b=256, t=512, seed=0):
    """Random ids with [CLS] at 0, [SEP] at the end of each row's random length, padding (0) after."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(10, V, (b, t)).astype(np.int32)
    lengths = rng.integers(t // 4, t + 1, b)
    mask = np.arange(t)[None] < lengths[:, None]
    inputs[:, 0] = 2
    inputs[np.arange(b), lengths - 1] = 3
    inputs[~mask] = 0
    maskable = mask & ~np.isin(inputs, [0, 2, 3])
    return inputs, mask, maskable


def test_masking_statistics_are_80_10_10_of_15_percent_and_never_touch_specials_or_padding():
    inputs, mask, maskable = synthetic()
    corrupted, chosen = choose_and_corrupt(jax.random.key(1), jnp.asarray(inputs), jnp.asarray(maskable),
                                           jnp.full((len(inputs),), MASK, jnp.int32), V)
    corrupted, chosen = np.asarray(corrupted), np.asarray(chosen)
    n = chosen.sum()
    assert n > 10_000
    assert abs(n / maskable.sum() - 0.15) < 0.01
    assert not chosen[~maskable].any()                          # specials and padding are never chosen …
    np.testing.assert_array_equal(corrupted[~chosen], inputs[~chosen])   # … nor changed
    to_mask = (corrupted == MASK) & chosen
    kept = (corrupted == inputs) & chosen
    randomized = chosen & ~to_mask & ~kept
    assert abs(to_mask.sum() / n - 0.8) < 0.02
    assert abs(randomized.sum() / n - 0.1) < 0.015
    assert abs(kept.sum() / n - 0.1) < 0.015
    assert corrupted[randomized].min() >= 0 and corrupted[randomized].max() < V
    # another key (the next step, the next epoch) chooses other positions
    _, other = choose_and_corrupt(jax.random.key(2), jnp.asarray(inputs), jnp.asarray(maskable),
                                  jnp.full((len(inputs),), MASK, jnp.int32), V)
    assert (np.asarray(other) != chosen).sum() > n // 2


def test_segments_pack_passages_within_documents():
    groups = mlm_text.pack_segments([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]], budget=5)
    assert groups == [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9, 10]], [[11, 12], [13]]]


class Tok:
    """A tiny tokenizer with BERT specials: one id per character."""
    pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4
    vocab_size = 200

    def encode(self, text):
        return [10 + (ord(c) % 190) for c in text]


def test_pairs_get_next_sentence_labels_and_token_types():
    docs = [[Tok().encode(f"doc{d} sentence {s}.") for s in range(6)] for d in range(4)]
    encoded, labels = mlm_text.pair_segments(docs, Tok(), seq_len=64, seed=0)
    assert len(encoded) == len(labels) > 4 and set(labels.tolist()) == {0, 1}
    for ids, types in zip(encoded.ids, encoded.token_types):
        assert ids[0] == Tok.cls_id and ids[-1] == Tok.sep_id and (ids == Tok.sep_id).sum() == 2
        first_sep = int(np.argmax(ids == Tok.sep_id))
        assert (types[:first_sep + 1] == 0).all() and (types[first_sep + 1:] == 1).all()
    batch = mlm_text.add_mlm_fields({"inputs": np.stack([encoded.ids[0]]), "mask": np.ones((1, len(encoded.ids[0])), bool),
                                     "labels": labels[:1]}, [0, 1, 2, 3, 4], Tok.mask_id)
    assert batch["nsp_labels"].tolist() == labels[:1].tolist() and batch["mask_token"].tolist() == [Tok.mask_id]
    assert not batch["maskable"][0, 0] and not batch["maskable"][0, -1] and batch["maskable"][0, 1]


def test_prepare_names_the_missing_package(monkeypatch, tmp_path):
    from fastserve.data.__main__ import prepare

    monkeypatch.setattr(english_corpora, "GCIDE_DICT", str(tmp_path / "gcide.dict.dz"))
    with pytest.raises(MissingPackage, match="apt-get install dict-gcide"):
        prepare("mlm_text", ["corpus=[gcide]"])


TINY_MLM = [
    "model.name=encoder", "model.head=mlm", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.d_ff=128", "model.max_seq_len=64", "model.dropout=0.0", "train.task=mlm", "data.source=mlm_text",
    "data.corpus=[pydoc]", "data.seq_len=64", "data.buckets=[64]", "data.batch_size=16", "data.eval_segments=64",
    "data.eval_fraction=0.1", "tokenizer.vocab_size=600", "tokenizer.specials=bert", "train.steps=60",
    "train.eval_every=60", "optimizer.learning_rate=3e-3", "optimizer.warmup_steps=5", "log.every=20",
    "log.progress=false", "log.tensorboard=false", "log.peak_flops=1e9", "mesh.data=1"]


@pytest.mark.slow   # ~20 s of CPU: a real (tiny) run through the trainer, on CPython's embedded docs
def test_a_tiny_mlm_run_lowers_the_held_out_masked_loss(tmp_path):
    from fastserve.config import load_config
    from fastserve.core.trainer import train

    workdir = tmp_path / "run"
    results = train(load_config(None, [*TINY_MLM, f"train.workdir={workdir}"]))
    with open(workdir / "metrics.jsonl") as f:
        evals = {r["step"]: r for r in map(json.loads, f) if r["split"] == "eval"}
    assert evals[0]["masked_tokens"] == evals[60]["masked_tokens"] > 300   # the same fixed held-out masks
    assert evals[0]["loss"] > 6.0 and evals[0]["accuracy"] < 0.01           # untrained: ~ln(600)
    assert evals[60]["loss"] < evals[0]["loss"] - 0.5 and evals[60]["accuracy"] > 0.02
    assert results["eval"]["perplexity"] == pytest.approx(np.exp(evals[60]["mlm_loss"]), rel=1e-6)


def test_nsp_adds_each_pairs_cross_entropy_weighted_by_its_masked_tokens():
    import dataclasses

    import optax
    from flax import nnx

    from fastserve.config import load_config
    from fastserve.tasks.mlm import MaskedLM, MLMConfig

    cfg = dataclasses.replace(load_config(None, ["model.name=encoder"]).model, vocab_size=60, d_model=32, n_layers=1,
                              n_heads=4, d_ff=64, max_seq_len=24, head="mlm", nsp=True, dropout=0.0)
    with nnx.use_eager_sharding(False):
        model = cfg.build(nnx.Rngs(0))
    model.eval()
    inputs, mask, maskable = synthetic(4, 24, seed=3)
    inputs = inputs % 60
    batch = {"inputs": inputs, "mask": mask, "maskable": maskable, "mask_token": np.full(4, MASK, np.int32),
             "token_types": (np.arange(24)[None] >= 10).astype(np.int32).repeat(4, 0),
             "nsp_labels": np.array([0, 1, 1, 0], np.int32)}
    task = MaskedLM(MLMConfig(nsp=True, mask_prob=0.5))
    loss, sums = task.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None, {})
    corrupted, chosen = choose_and_corrupt(jax.random.fold_in(jax.random.key(0), 0x6D6C6D), jnp.asarray(inputs),
                                           jnp.asarray(maskable), jnp.full((4,), MASK, jnp.int32), 60, 0.5)
    mlm_logits, nsp_logits = model(corrupted, mask=jnp.asarray(mask), token_types=jnp.asarray(batch["token_types"]))
    chosen = np.asarray(chosen)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(mlm_logits, jnp.asarray(inputs)))
    nsp_ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(nsp_logits, jnp.asarray(batch["nsp_labels"])))
    expected = (ce * chosen).sum() + (nsp_ce * chosen.sum(axis=1)).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(sums["nsp_weight"]) == 4 and float(sums["weight"]) == chosen.sum() > 0
    summary = task.summarize({k: np.asarray(v, np.float64) for k, v in sums.items()})
    assert summary["nsp_loss"] == pytest.approx(float(nsp_ce.mean()), rel=1e-5)
    assert summary["perplexity"] == pytest.approx(np.exp((ce * chosen).sum() / chosen.sum()), rel=1e-5)
