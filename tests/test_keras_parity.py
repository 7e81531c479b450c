"""fastserve's Sequential and Keras 3 (JAX backend) take the same training steps: the same layers, Keras's initial
weights copied across, dropout off and no shuffling, so only float rounding may tell them apart. Pins the defaults
users porting Keras code rely on (batch norm's momentum, epsilon and running statistics, Adam's bias
correction, the loss's "sum over batch size" reduction, a padded last batch) — experiments/bench_vision.py's
`--same-work` runs the same check on its full CNN."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

import fastserve as fs  # noqa: E402


def conv_net(lib) -> list:
    return [lib.Conv2D(8, 3, padding="same", use_bias=False), lib.BatchNormalization(momentum=0.9),
            lib.Activation("relu"), lib.MaxPool2D(2), lib.Flatten(), lib.Dropout(0.0),
            lib.Dense(16, activation="relu"), lib.Dense(3, activation="softmax")]


@pytest.mark.slow
def test_a_conv_net_trains_step_for_step_as_keras_does():
    if keras.backend.backend() != "jax":
        pytest.skip(f"keras runs on {keras.backend.backend()}, not jax")
    r = np.random.default_rng(0)
    x = r.random((80, 8, 8, 1), np.float32)                       # 80 = 2 full batches of 32 + a padded one of 16
    y = np.eye(3, dtype=np.float32)[(x[:, :4].mean((1, 2, 3)) > x[:, 4:].mean((1, 2, 3))).astype(int)
                                    + (x.mean((1, 2, 3)) > 0.5)]
    keras.utils.set_random_seed(0)
    k = keras.Sequential([keras.Input((8, 8, 1)), *conv_net(keras.layers)])
    f = fs.models.Sequential([fs.layers.Input(shape=(8, 8, 1)), *conv_net(fs.layers)], seed=0)
    k.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", metrics=["accuracy"])
    f.compile(optimizer=fs.keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", metrics=["accuracy"])
    f.set_weights(k.get_weights())
    for _ in range(3):
        lf = f.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False).history["loss"][-1]
        lk = k.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False).history["loss"][-1]
        assert abs(lf - lk) <= 1e-3 * abs(lk), (lf, lk)
    for a, b in zip(f.get_weights(), k.get_weights()):   # kernels, BN scale / bias / running mean / variance
        np.testing.assert_allclose(a, b, atol=2e-3 * max(np.abs(b).max(), 1e-3))
    np.testing.assert_allclose(f.predict(x, verbose=0), np.asarray(k.predict(x, verbose=0)), atol=2e-3)


def test_adam_takes_keras_steps_for_tiny_gradients_too():
    """Keras adds epsilon to √v before the bias correction: a gradient of 1e-6 moves a weight ~0.24 of a full step
    at step 1 in Keras, ~0.9 in optax's form; ours follows Keras for gradients from 1e-7 to 1."""
    import jax.numpy as jnp
    import optax
    grads = [np.array([1e-7, 1e-6, 1e-5, 1e-3, -1.0], np.float32) * s for s in (1.0, 0.5, -2.0)]
    w = keras.Variable(np.zeros(5, np.float32))
    opt = keras.optimizers.Adam(1e-3)
    opt.build([w])
    tx, _ = fs.keras.optimizers.Adam(1e-3).build(total_steps=3)
    params = jnp.zeros(5)
    state = tx.init(params)
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(g)], [w])
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(params), np.asarray(w.value), rtol=1e-5, atol=1e-10)
    assert abs(float(params[1])) < 0.5e-3         # the damped step optax's own adam would not take


@pytest.mark.parametrize("name,options", [("adam", {}), ("adamw", {}), ("sgd", {"momentum": 0.9}), ("rmsprop", {}),
                                          ("rmsprop", {"momentum": 0.9}), ("adagrad", {}), ("adamax", {}),
                                          ("nadam", {}), ("lion", {})])
def test_every_named_optimizer_takes_keras_steps(name, options):
    """Six steps on a kernel and a bias, gradients from 1e-7 to 10: the total update equals Keras's own optimizer's
    (AdamW decays the bias too, as Keras's does; Nadam follows Keras's momentum schedule)."""
    import jax.numpy as jnp
    import optax
    r = np.random.default_rng(0)
    scales = np.array([1e-7, 1e-5, 1e-3, 1e-1, 1, 3, 10, 0.3], np.float32)
    start = {"kernel": r.standard_normal((2, 8)).astype(np.float32), "bias": r.standard_normal(8).astype(np.float32)}
    grads = [{k: (r.standard_normal(v.shape) * scales).astype(np.float32) for k, v in start.items()} for _ in range(6)]
    keras_cls = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop", "adagrad": "Adagrad",
                 "adamax": "Adamax", "nadam": "Nadam", "lion": "Lion"}[name]
    opt = getattr(keras.optimizers, keras_cls)(learning_rate=1e-2, **options)
    ws = {k: keras.Variable(v.copy()) for k, v in start.items()}
    opt.build(list(ws.values()))
    tx, _ = fs.keras.optimizers.Optimizer(name, {"learning_rate": 1e-2, **options}).build(total_steps=10)
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = tx.init(params)
    for g in grads:
        opt.apply([keras.ops.convert_to_tensor(g[k]) for k in ws], list(ws.values()))
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
    for k in start:
        ours, theirs = np.asarray(params[k]) - start[k], np.asarray(ws[k].value) - start[k]
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max(axis=0).min())
