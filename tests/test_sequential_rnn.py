"""Recurrent layers in the Keras-style Sequential API: SimpleRNN / LSTM / GRU / Bidirectional specs (shapes, Keras's
parameter counts, YAML forms), the Keras snippet `Embedding(mask_zero=True) → Bidirectional(LSTM) → Dense` learning
a sequence task, and Keras's masking: trailing padding changes no prediction."""
import math

import numpy as np
import pytest
from flax import nnx

import fastserve as fs
from fastserve import layers as L
from fastserve.models.sequential import SequentialConfig

T = 40


def token_task(n, seed, length=T):
    """Sequences of ids 1..19 with 5..35 real steps then 0-padding; label: whether token 7 appears."""
    r = np.random.default_rng(seed)
    x = np.zeros((n, length), np.int32)
    for i, n_real in enumerate(np.minimum(r.integers(5, 36, n), length)):
        x[i, :n_real] = r.integers(1, 20, n_real)
    return x, (x == 7).any(axis=1).astype(np.int32)


def lstm_count(f, h):
    return 4 * (f * h + h * h + h)


def gru_count(f, h, reset_after=True):
    return 3 * (f * h + h * h) + (2 if reset_after else 1) * 3 * h


def rnn_count(f, h):
    return f * h + h * h + h


def test_summary_shapes_and_counts_equal_keras_formulas():
    model = fs.models.Sequential()
    model.add(fs.layers.Embedding(100, 12, mask_zero=True, input_shape=(30,)))
    model.add(fs.layers.SimpleRNN(8, return_sequences=True))
    model.add(fs.layers.GRU(6, return_sequences=True))
    model.add(fs.layers.GRU(7, return_sequences=True, reset_after=False))
    model.add(fs.layers.Bidirectional(fs.layers.LSTM(5, return_sequences=True)))
    model.add(fs.layers.Bidirectional(fs.layers.GRU(4), merge_mode="sum"))
    model.add(fs.layers.Dense(3, activation="softmax"))
    s = model.summary(print_fn=None)
    assert [r[2] for r in s.rows] == [(None, 30, 12), (None, 30, 8), (None, 30, 6), (None, 30, 7), (None, 30, 10),
                                      (None, 4), (None, 3)]
    want = [100 * 12, rnn_count(12, 8), gru_count(8, 6), gru_count(6, 7, False), 2 * lstm_count(7, 5),
            2 * gru_count(10, 4), 4 * 3 + 3]
    assert [r[3] for r in s.rows] == want
    assert [r[1] for r in s.rows][-2:] == ["Bidirectional", "Dense"]
    assert s.total == s.trainable == sum(want) and s.non_trainable == 0
    # the built module holds exactly those parameters, named and shaped as Keras's (shapes only: no compile)
    net = nnx.eval_shape(lambda: model.config.build(nnx.Rngs(0)))
    params = {".".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(net, nnx.Param))}
    for name, n in zip(["embedding", "simple_rnn", "gru", "gru_1", "bidirectional", "bidirectional_1", "dense"], want):
        assert sum(math.prod(v) for k, v in params.items() if k.split(".")[1] == name) == n, name
    assert params["layers.simple_rnn.cell.recurrent_kernel"] == (8, 8)
    assert params["layers.gru.cell.bias"] == (2, 18) and params["layers.gru_1.cell.bias"] == (21,)
    assert params["layers.bidirectional.backward_layer.cell.kernel"] == (7, 20)


def test_shape_errors_and_yaml_forms():
    with pytest.raises(L.LayerError, match="lstm.*timesteps, features"):
        L.plan((10,), [L.LSTM(4)])
    with pytest.raises(L.LayerError, match="units"):
        L.GRU(0)
    with pytest.raises(L.LayerError, match="merge_mode"):
        L.Bidirectional(L.LSTM(4), merge_mode="max")
    with pytest.raises(L.LayerError, match="SimpleRNN, LSTM or GRU"):
        L.Bidirectional(L.Dense(4))
    assert L.layer_from_dict({"lstm": {"units": 16}}) == L.LSTM(16)
    assert L.layer_from_dict({"LSTM": 16}) == L.LSTM(16)
    bi = L.layer_from_dict({"bidirectional": {"layer": {"lstm": {"units": 16}}}})
    assert bi == L.Bidirectional(L.LSTM(16))
    assert bi.to_dict() == {"bidirectional": {"layer": {"lstm": {"units": 16}}}}
    for spec in (L.GRU(5, reset_after=False, return_sequences=True), L.SimpleRNN(3, activation="relu"),
                 L.Bidirectional(L.GRU(2, go_backwards=True), merge_mode="ave"), L.Embedding(9, 4, mask_zero=True),
                 L.GlobalAveragePooling1D()):
        assert L.layer_from_dict(spec.to_dict()) == spec
    cfg = SequentialConfig(input_shape=[40], layers=[{"embedding": {"input_dim": 50, "output_dim": 8,
                                                                    "mask_zero": True}},
                                                     {"bidirectional": {"layer": {"lstm": {"units": 16}}}},
                                                     {"dense": {"units": 2, "activation": "softmax"}}])
    assert not list(cfg.checks()) and cfg.output_shape == (2,)
    assert fs.models.Sequential.from_config(cfg).config == cfg       # model → YAML → model


@pytest.fixture(scope="module")
def trained():
    x, y = token_task(2048, 0)
    # --- the snippet, verbatim
    model = fs.models.Sequential()
    model.add(fs.layers.Embedding(1000, 32, mask_zero=True, input_shape=(40,)))   # mask_zero: token 0 is padding
    model.add(fs.layers.Bidirectional(fs.layers.LSTM(16)))
    model.add(fs.layers.Dense(2, activation='softmax'))
    model.compile(optimizer='adam', loss='sparse_categorical_crossentropy', metrics=['accuracy'])
    history = model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    # ---
    return model, history


def test_the_keras_rnn_snippet_learns_a_sequence_task(trained, tmp_path):
    model, history = trained
    x_test, y_test = token_task(512, 1)
    majority = max(y_test.mean(), 1 - y_test.mean())                     # ≈ 0.6
    loss, acc = model.evaluate(x_test, y_test, verbose=0)
    h = history.history
    assert h["loss"][-1] < h["loss"][0] / 3, h                          # measured: 0.63 → 0.04
    assert acc >= max(0.9, majority + 0.2), (acc, majority)             # measured: 1.0
    model.save(str(tmp_path))                                           # the nested YAML form round-trips
    loaded = fs.models.load_model(str(tmp_path))
    assert isinstance(loaded.layers[1], fs.layers.Bidirectional) and loaded.layers[0].mask_zero
    np.testing.assert_allclose(loaded.predict(x_test[:64], verbose=0), model.predict(x_test[:64], verbose=0),
                               atol=1e-6)


def test_padding_changes_no_prediction_with_mask_zero(trained):
    model = trained[0]
    x, _ = token_task(64, 2, length=T)
    x[:, 25:] = 0                                                       # ≤ 25 real steps: ≥ 15 trailing pads
    short = x[:, :30]                                                   # the same rows with ≥ 5 trailing pads
    p15 = model.predict(x, verbose=0)
    specs = [fs.layers.Embedding(1000, 32, mask_zero=True), fs.layers.Bidirectional(fs.layers.LSTM(16)),
             fs.layers.Dense(2, activation="softmax")]
    twin = fs.models.Sequential(seed=1)
    twin.add(fs.layers.Input(shape=(30,)))
    for s in specs:
        twin.add(s)
    twin.set_weights(model.get_weights())
    np.testing.assert_allclose(twin.predict(short, verbose=0), p15, atol=1e-5)
    # the test can fail: without mask_zero the backward LSTM reads the padding first and the outputs move
    specs[0] = fs.layers.Embedding(1000, 32)
    bare = fs.models.Sequential(seed=1)
    bare.add(fs.layers.Input(shape=(30,)))
    for s in specs:
        bare.add(s)
    bare.set_weights(model.get_weights())
    assert np.abs(bare.predict(short, verbose=0) - p15).max() > 1e-3


def test_the_mask_passes_through_dense_and_reaches_a_masked_mean():
    """return_sequences layers and a Dense pass the mask on; GRU(go_backwards), a return_sequences Bidirectional and
    GlobalAveragePooling1D consume it: untrained weights, 5 vs 15 trailing pads, the same outputs."""
    def build(n):
        m = fs.models.Sequential(seed=3)
        m.add(fs.layers.Embedding(30, 8, mask_zero=True, input_shape=(n,)))
        m.add(fs.layers.SimpleRNN(6, return_sequences=True))
        m.add(fs.layers.Dense(5, activation="tanh"))
        m.add(fs.layers.Bidirectional(fs.layers.GRU(4, return_sequences=True, go_backwards=True), merge_mode="ave"))
        m.add(fs.layers.GlobalAveragePooling1D())
        m.add(fs.layers.Dense(3, activation="softmax"))
        return m
    x, _ = token_task(16, 4, length=20)
    x[:, 15:] = 0
    a, b = build(20), build(30)
    b.set_weights(a.get_weights())
    pa = a.predict(x, verbose=0)
    np.testing.assert_allclose(b.predict(np.pad(x, ((0, 0), (0, 10))), verbose=0), pa, atol=1e-5)
    assert np.std(pa[:, 0]) > 1e-4                                      # not a constant output
