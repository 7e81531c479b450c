"""The Keras-style Sequential API on fastserve's core: the seed snippet as written, summary counts, validation_split
holding out the tail, Keras's loss definitions, clear errors before training, save → load, a YAML layer list through
`python -m fastserve.train`, and `import fastserve` staying light."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastserve as fs
from fastserve.tasks.keras_loss import per_example_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear_rule(n, seed, classes=10):
    """784-dim inputs whose class is a fixed linear rule of a 16-dim latent (class means + noise): learnable."""
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, n)
    means = np.random.default_rng(100).standard_normal((classes, 16)).astype(np.float32) * 1.5
    lift = np.random.default_rng(101).standard_normal((16, 784)).astype(np.float32) / 4
    z = means[y] + r.standard_normal((n, 16)).astype(np.float32)
    x = z @ lift + 0.1 * r.standard_normal((n, 784)).astype(np.float32)
    return x.astype(np.float32), np.eye(classes, dtype=np.float32)[y], y.astype(np.int32)


def small_model(n_in=12, classes=4, seed=0, final="softmax"):
    model = fs.models.Sequential(seed=seed)
    model.add(fs.layers.Dense(16, activation="relu", input_shape=(n_in,)))
    model.add(fs.layers.Dense(classes, activation=final))
    return model


def small_data(n=64, n_in=12, classes=4, seed=0):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, n_in)).astype(np.float32)
    ids = np.argmax(x[:, :classes], axis=1).astype(np.int32)
    return x, np.eye(classes, dtype=np.float32)[ids], ids


def test_the_seed_snippet_runs_as_written_and_learns(capsys):
    x_train, y_train, _ = linear_rule(1024, 1)
    x_val, y_val, _ = linear_rule(256, 2)
    x_test, _, test_ids = linear_rule(128, 3)
    # --- the snippet, verbatim
    model = fs.models.Sequential()
    model.add(fs.layers.Dense(128, activation='relu', input_shape=(784,)))
    model.add(fs.layers.Dense(64, activation='relu'))
    model.add(fs.layers.Dense(10, activation='softmax'))
    model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
    history = model.fit(x_train, y_train, batch_size=32, epochs=10, validation_data=(x_val, y_val))
    predictions = model.predict(x_test)
    # ---
    h = history.history
    assert set(h) == {"loss", "accuracy", "val_loss", "val_accuracy"} and all(len(v) == 10 for v in h.values())
    assert h["loss"][-1] < h["loss"][0] / 5
    assert h["val_accuracy"][-1] >= 0.95, h            # measured: 1.0 (untrained: 0.11)
    assert predictions.shape == (128, 10)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-5)   # the final softmax is applied
    assert (predictions.argmax(1) == test_ids).mean() >= 0.95
    assert "Epoch 10/10" in capsys.readouterr().out


def test_summary_counts_equal_a_hand_count():
    model = fs.models.Sequential(name="cnn")
    model.add(fs.layers.Conv2D(8, 3, padding="same", activation="relu", input_shape=(8, 8, 1)))
    model.add(fs.layers.BatchNormalization())
    model.add(fs.layers.MaxPool2D(2))
    model.add(fs.layers.Dropout(0.25))
    model.add(fs.layers.Flatten())
    model.add(fs.layers.Dense(10, activation="softmax"))
    s = model.summary(print_fn=None)
    conv, bn, dense = 3 * 3 * 1 * 8 + 8, 4 * 8, 4 * 4 * 8 * 10 + 10          # BN: scale, bias + mean, var
    assert [(r[0], r[1], r[2], r[3]) for r in s.rows] == [
        ("conv2d", "Conv2D", (None, 8, 8, 8), conv), ("batch_normalization", "BatchNormalization", (None, 8, 8, 8), bn),
        ("max_pool2d", "MaxPooling2D", (None, 4, 4, 8), 0), ("dropout", "Dropout", (None, 4, 4, 8), 0),
        ("flatten", "Flatten", (None, 128), 0), ("dense", "Dense", (None, 10), dense)]
    assert (s.total, s.trainable, s.non_trainable) == (conv + bn + dense, conv + 16 + dense, 16)
    assert "Total params: 1,402" in s.text and "dense (Dense)" in s.text
    # the built module holds exactly those arrays: params = trainable, batch-norm statistics = non-trainable
    from fastserve.core.state import abstract_model_split
    _, params, axes, state, _ = abstract_model_split(model.config)
    import jax
    assert sum(p.size for p in jax.tree.leaves(params)) == s.trainable
    assert sum(p.size for p in jax.tree.leaves(state)) == s.non_trainable
    assert axes["layers"]["dense"]["kernel"] == ("dense_in", "dense_out")
    assert axes["layers"]["conv2d"]["conv"]["kernel"] == (None, None, "conv_in", "conv_out")
    mlp = fs.models.Sequential([fs.layers.Dense(128, input_shape=(784,)), fs.layers.Dense(10)])
    assert mlp.count_params() == 784 * 128 + 128 + 128 * 10 + 10


def test_validation_split_holds_out_the_tail_and_never_trains_on_it():
    x, onehot, _ = small_data(80)
    cut = 60                                         # ceil(80 · 0.75): the last 20 examples are held out
    bad = onehot.copy()
    bad[cut:] = np.roll(bad[cut:], 1, axis=1)        # the tail's labels contradict the rule
    runs = []
    for kwargs in ({"x": x, "y": bad, "validation_split": 0.25},
                   {"x": x[:cut], "y": onehot[:cut], "validation_data": (x[cut:], bad[cut:])}):
        model = small_model()
        model.compile(optimizer=fs.keras.optimizers.Adam(0.03), loss="categorical_crossentropy", metrics=["accuracy"])
        runs.append(model.fit(batch_size=16, epochs=6, verbose=0, **kwargs).history)
    # identical training losses: the split run saw exactly the first 60 examples, batch for batch
    assert runs[0]["loss"] == runs[1]["loss"] and runs[0]["val_loss"] == runs[1]["val_loss"]
    assert runs[0]["accuracy"][-1] > 0.6 and runs[0]["val_accuracy"][-1] < 0.4


def test_losses_match_their_keras_definitions():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = rng.integers(0, 4, 5)
    onehot = np.eye(4, dtype=np.float32)[ids]
    eps = 1e-7
    cce = -(onehot * np.log(np.clip(probs, eps, 1 - eps))).sum(1)           # keras.losses.categorical_crossentropy
    for loss, y in (("categorical_crossentropy", onehot), ("sparse_categorical_crossentropy", ids)):
        np.testing.assert_allclose(per_example_loss(loss, y, probs, logits=False), cce, rtol=1e-5)
        np.testing.assert_allclose(per_example_loss(loss, y, logits, logits=True), cce, rtol=1e-5)
    p = 1 / (1 + np.exp(-logits))
    t = (rng.random((5, 4)) > 0.5).astype(np.float32)
    bce = -(t * np.log(np.clip(p, eps, 1 - eps)) + (1 - t) * np.log(np.clip(1 - p, eps, 1 - eps))).mean(1)
    np.testing.assert_allclose(per_example_loss("binary_crossentropy", t, p, logits=False), bce, rtol=1e-5)
    np.testing.assert_allclose(per_example_loss("binary_crossentropy", t, logits, logits=True), bce, rtol=1e-5)
    np.testing.assert_allclose(per_example_loss("mse", t, logits, logits=False), ((t - logits) ** 2).mean(1), rtol=1e-6)
    np.testing.assert_allclose(per_example_loss("mae", t, logits, logits=False), np.abs(t - logits).mean(1), rtol=1e-6)
    # through a model: evaluate() (the loss from logits, folded) equals the Keras formula on predict()'s softmax
    x, onehot, ids = small_data(37)                  # 37: a last partial batch, padded with weight-0 rows
    model = small_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy", "mse"])
    loss, acc, mse = model.evaluate(x, onehot, batch_size=16, verbose=0)
    pred = model.predict(x, batch_size=16)
    np.testing.assert_allclose(loss, -(onehot * np.log(np.clip(pred, eps, 1 - eps))).sum(1).mean(), rtol=1e-5)
    assert acc == pytest.approx((pred.argmax(1) == ids).mean())
    assert mse == pytest.approx(((pred - onehot) ** 2).mean(), rel=1e-5)
    reg = small_model(final="linear")                 # mse on a linear output: the outputs as they are
    reg.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    out = reg.predict(x)
    np.testing.assert_allclose(reg.evaluate(x, onehot, verbose=0), [((out - onehot) ** 2).mean(),
                                                                     np.abs(out - onehot).mean()], rtol=1e-5)


def test_sparse_and_categorical_give_the_same_loss_and_training():
    x, onehot, ids = small_data(48)
    hist = []
    for loss, y in (("categorical_crossentropy", onehot), ("sparse_categorical_crossentropy", ids)):
        model = small_model(seed=3)
        model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
        before = model.evaluate(x, y, verbose=0)
        hist.append((before, model.fit(x, y, batch_size=16, epochs=2, verbose=0).history))
    np.testing.assert_allclose(hist[0][0], hist[1][0], rtol=1e-6)
    np.testing.assert_allclose(hist[0][1]["loss"], hist[1][1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(hist[0][1]["accuracy"], hist[1][1]["accuracy"])


def test_bad_input_fails_clearly_before_training():
    x, onehot, ids = small_data(32)
    model = small_model()
    with pytest.raises(ValueError, match="unknown loss 'categorical_crossentropi'; did you mean 'categorical_crossentropy'"):
        model.compile(optimizer="adam", loss="categorical_crossentropi")
    with pytest.raises(ValueError, match="unknown metric 'acuracy'; did you mean 'accuracy'"):
        model.compile(optimizer="adam", loss="mse", metrics=["acuracy"])
    with pytest.raises(ValueError, match="unknown optimizer 'adma'; did you mean"):
        model.compile(optimizer="adma", loss="mse")
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(ValueError, match=r"takes inputs of shape \(None, 12\).*'dense'.*got an array of shape \(32, 13\)"):
        model.fit(np.zeros((32, 13), np.float32), onehot, verbose=0)
    with pytest.raises(ValueError, match=r"look like class ids: use loss='sparse_categorical_crossentropy'"):
        model.fit(x, ids, verbose=0)
    with pytest.raises(ValueError, match=r"labels of shape \(32, 5\) do not match the model's output \(None, 4\)"):
        model.fit(x, np.zeros((32, 5), np.float32), verbose=0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"labels range over \[0, 7\] but the model outputs 4 classes"):
        model.fit(x, np.where(np.arange(32) == 5, 7, ids), verbose=0)
    assert model._state is None                      # nothing was built or trained
    with pytest.raises(fs.layers.LayerError, match=r"layer 2 'conv2d' \(Conv2D\) cannot take input of shape \(4,\)"):
        model.add(fs.layers.Conv2D(4, 3))
    with pytest.raises(fs.layers.LayerError, match="unknown activation 'sofmax'; did you mean 'softmax'"):
        fs.layers.Dense(3, activation="sofmax")
    from fastserve.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"model.layers: layer 1 'max_pool2d' \(MaxPooling2D\) cannot take input"):
        load_config(None, ["model.name=sequential", "model.input_shape=[8]", "model.layers=[{dense: 4}, max_pool2d]"])


def test_save_load_predict_and_early_stopping(tmp_path):
    x, onehot, _ = small_data(64)
    model = fs.models.Sequential(seed=1)
    model.add(fs.layers.Dense(16, activation="gelu", input_shape=(12,)))
    model.add(fs.layers.BatchNormalization())
    model.add(fs.layers.Dropout(0.1))
    model.add(fs.layers.Dense(4, activation="softmax"))
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    stop = fs.keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=1, restore_best_weights=True)
    history = model.fit(x, onehot, batch_size=16, epochs=10, verbose=0, callbacks=[stop])
    # the loss falls, so in "max" mode epoch 1 is no improvement on epoch 0: stop, and put epoch 0's weights back
    assert len(history.history["loss"]) == 2 and model.stop_training and stop.best_epoch == 0
    for restored, best in zip(model.get_weights(), stop.best_weights):
        np.testing.assert_array_equal(restored, best)
    model.save(str(tmp_path / "m"))
    loaded = fs.models.load_model(str(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    np.testing.assert_allclose(loaded.evaluate(x, onehot, verbose=0), model.evaluate(x, onehot, verbose=0))
    assert [w.shape for w in loaded.get_weights()] == [w.shape for w in model.get_weights()]
    loaded.fit(x, onehot, epochs=1, verbose=0)       # compiled, with its optimizer state: trains on


def test_a_yaml_layer_list_trains_through_the_cli(tmp_path):
    x, _, ids = linear_rule(640, 5, classes=4)
    np.savez(tmp_path / "train.npz", x=x[:, :64], y=ids)
    cfg = tmp_path / "seq.yaml"
    cfg.write_text(f"""
model:
  name: sequential
  input_shape: [64]
  layers:
    - dense: {{units: 32, activation: relu}}
    - layer_normalization
    - dropout: 0.1
    - dense: {{units: 4, activation: softmax}}
data: {{source: arrays, path: {tmp_path / 'train.npz'}, validation_split: 0.2, batch_size: 32}}
train: {{task: {{name: keras_loss, loss: sparse_categorical_crossentropy, metrics: [accuracy]}}, steps: 60,
        eval_every: 60, workdir: {tmp_path / 'run'}}}
optimizer: {{name: adam, learning_rate: 3.0e-3, warmup_steps: 0}}
mesh: {{data: 1}}
log: {{progress: false, tensorboard: false, peak_flops: 1.0e9}}
checkpoint: {{every: 1000}}
""")
    out = subprocess.run([sys.executable, "-m", "fastserve.train", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "512 train / 128 held-out examples" in out.stdout
    final = out.stdout.split("final held-out")[-1]
    assert float(final.split("accuracy ")[1].split()[0].rstrip(",")) >= 0.9, out.stdout[-1500:]   # measured 1.0
    # the trained work dir loads as a Keras model too (config.yaml + checkpoints)
    model = fs.models.load_model(str(tmp_path / "run"), compile=False)
    assert model.predict(x[:8, :64]).shape == (8, 4)


def test_import_fastserve_stays_light():
    code = ("import sys, fastserve as fs\nassert 'jax' not in sys.modules\n"
            "d = fs.layers.Dense(3, activation='relu', input_shape=(4,))\nassert 'jax' not in sys.modules\n"
            "print(d.to_dict())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "{'dense': {'units': 3, 'activation': 'relu'}}" in out.stdout


def test_full_batches_skip_the_example_mask_and_padded_batches_keep_it():
    """fit runs full batches through a step without batch norm's example mask (faster) and only a padded batch
    through the masked one: on a full batch both give the same loss, gradients and running statistics; on a padded
    batch the mask is what keeps the padding rows out of the statistics."""
    import jax
    from flax import nnx

    from fastserve.core.steps import make_loss_fn
    from fastserve.keras.fitting import FullBatchKerasLoss
    from fastserve.tasks.keras_loss import KerasLoss, KerasLossConfig

    model = fs.models.Sequential([fs.layers.Conv2D(4, 3, padding="same", use_bias=False, input_shape=(6, 6, 1)),
                                  fs.layers.BatchNormalization(), fs.layers.Activation("relu"), fs.layers.Flatten(),
                                  fs.layers.Dense(3, activation="softmax")])
    net = model.config.build(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    r = np.random.default_rng(0)
    batch = {"inputs": r.standard_normal((8, 6, 6, 1)).astype(np.float32),
             "labels": np.eye(3, dtype=np.float32)[r.integers(0, 3, 8)], "weights": np.ones(8, np.float32)}
    cfg = KerasLossConfig(loss="categorical_crossentropy", metrics=["accuracy"])

    def run(task, b):
        fn = jax.value_and_grad(make_loss_fn(graphdef, task), has_aux=True)
        (loss, (sums, state)), grads = fn(params, rest, b, jax.random.key(0), {})
        return loss, state, grads

    masked, full = run(KerasLoss(cfg), batch), run(FullBatchKerasLoss(cfg), batch)
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    padded = {**batch, "inputs": batch["inputs"].copy(), "weights": (np.arange(8) < 5).astype(np.float32)}
    padded["inputs"][5:] = 0.0
    kept, ignored = run(KerasLoss(cfg), padded)[1], run(FullBatchKerasLoss(cfg), padded)[1]
    assert not np.allclose(jax.tree.leaves(kept)[0], jax.tree.leaves(ignored)[0])   # the mask changes the stats


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 7, 7, 3), (3, 6, 9, 2)])
def test_pooling_equals_nnx_in_value_and_gradient(shape):
    """pool2d's reshape form for windows that tile the input (and its fallback) against nnx's reduce_window."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fastserve.models.layers import pool2d

    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    for window, strides, padding in [((2, 2), (2, 2), "VALID"), ((2, 2), (2, 2), "SAME"), ((3, 3), (3, 3), "VALID"),
                                     ((3, 3), (2, 2), "SAME"), ((2, 3), (2, 3), "SAME")]:
        for kind in ("max", "avg"):
            def ref(v):
                if kind == "max":
                    return nnx.max_pool(v, window, strides=strides, padding=padding)
                return nnx.avg_pool(v, window, strides=strides, padding=padding, count_include_pad=False)

            ours = lambda v: pool2d(v, window, strides, padding, kind)  # noqa: E731
            assert ours(x).shape == ref(x).shape
            np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6)
            grads = [jax.grad(lambda v: jnp.sum(jnp.sin(f(v))))(x) for f in (ours, ref)]
            np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
