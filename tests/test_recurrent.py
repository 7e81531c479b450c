"""Recurrent layers (fastserve/models/recurrent.py): every cell equals a float64 NumPy transcription of Keras'
equations; padded steps neither update the state nor show in the outputs, whatever they hold; Bidirectional's
backward half is the backward layer run on each row's reversed valid part; go_backwards follows Keras; gradients flow
under jax.jit through one scan; dropout follows the mode; every parameter names logical axes of the rules table."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve import parallel
from fastserve.models.recurrent import GRU, LSTM, Bidirectional, SimpleRNN

F, H, B, T = 5, 4, 3, 7
KINDS = {
    "simple": (SimpleRNN, {}),
    "lstm": (LSTM, {}),
    "gru": (GRU, {}),
    "gru_reset_before": (GRU, {"reset_after": False}),
}


def randomize(layer, seed):
    """Random weights *and* biases (NumPy-drawn: no initializer to compile) into every parameter of `layer`."""
    rng = np.random.default_rng(seed)
    params = nnx.state(layer, nnx.Param)
    nnx.update(layer, jax.tree.map(lambda v: jnp.asarray(rng.normal(0, 0.5, v.shape), jnp.float32), params))
    return layer


def make(kind, seed=0, **kw):
    """A layer of `kind` with random weights. Built abstractly: compiling the Keras initializers (orthogonal's QR)
    for every shape would cost more than all the checks; they run in the layout and Bidirectional tests."""
    cls, extra = KINDS[kind]
    return randomize(nnx.eval_shape(lambda: cls(F, H, rngs=nnx.Rngs(0), **extra, **kw)), seed)


@nnx.jit
def _call(layer, x, mask, rngs):
    return layer(x, mask, rngs=rngs)


def call(layer, x, mask=None, rngs=None):
    """layer(x, mask) under one jit: one compile per layer configuration and shape (the suite stays fast)."""
    out = _call(layer, jnp.asarray(x), None if mask is None else jnp.asarray(mask), rngs)
    return jax.tree.map(np.asarray, out)


def twin(layer, **changes):
    """A layer of the same type and weights with some constructor arguments changed."""
    other = nnx.eval_shape(lambda: type(layer)(**dict(layer.get_config(), **changes), rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(layer, nnx.Param))
    return other


# ---------------------------------------------------------------------------------------- NumPy reference

def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def weights(layer):
    c = layer.cell
    return (np.asarray(c.kernel.get_value(), np.float64), np.asarray(c.recurrent_kernel.get_value(), np.float64),
            np.asarray(c.bias.get_value(), np.float64))


def ref_step(kind, w, state, x):
    W, U, b = w
    if kind == "simple":
        return (np.tanh(x @ W + state[0] @ U + b),)
    if kind == "lstm":
        h, c = state
        z = x @ W + h @ U + b
        i, f, g, o = z[:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:]
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        return sigmoid(o) * np.tanh(c), c
    h = state[0]
    if kind == "gru":            # reset_after: bias [2, 3H] = input bias, recurrent bias
        mx, mh = x @ W + b[0], h @ U + b[1]
        z = sigmoid(mx[:H] + mh[:H])
        r = sigmoid(mx[H:2 * H] + mh[H:2 * H])
        hh = np.tanh(mx[2 * H:] + r * mh[2 * H:])
    else:                        # reset_after=False: bias [3H], reset applied to h before its matmul
        mx = x @ W + b
        z = sigmoid(mx[:H] + h @ U[:, :H])
        r = sigmoid(mx[H:2 * H] + h @ U[:, H:2 * H])
        hh = np.tanh(mx[2 * H:] + (r * h) @ U[:, 2 * H:])
    return (z * h + (1 - z) * hh,)


def reference(kind, layer, x, mask=None, go_backwards=False):
    """Keras' RNN loop, one row and one step at a time: (outputs [B, T, H] in processing order, final states)."""
    w = weights(layer)
    x = np.asarray(x, np.float64)
    n_states = 2 if kind == "lstm" else 1
    outs, finals = np.zeros((x.shape[0], x.shape[1], H)), []
    for i in range(x.shape[0]):
        state = tuple(np.zeros(H) for _ in range(n_states))
        order = range(x.shape[1])[::-1] if go_backwards else range(x.shape[1])
        for k, t in enumerate(order):
            if mask is None or mask[i, t]:
                state = ref_step(kind, w, state, x[i, t])
                outs[i, k] = state[0]
        finals.append(state)
    return outs, [np.stack(s) for s in zip(*finals)]


def padded_batch(lengths, seed=1, fill=np.nan):
    """x [B, T, F] whose padded steps hold `fill`, and its right-padding mask."""
    x = np.asarray(jax.random.normal(jax.random.key(seed), (len(lengths), T, F)))
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    return np.where(mask[..., None], x, fill).astype(np.float32), mask


# ---------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_numpy_reference(kind, return_sequences):
    layer = make(kind, return_sequences=return_sequences, return_state=True)
    x = jax.random.normal(jax.random.key(2), (B, T, F))
    out, *states = call(layer, x)
    ref_out, ref_states = reference(kind, layer, x)
    expected = ref_out if return_sequences else ref_states[0]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert len(states) == len(ref_states)
    for s, r in zip(states, ref_states):
        np.testing.assert_allclose(s, r, atol=1e-5)


def test_keras_layouts_and_initial_biases():
    shapes = {name: {k: v.get_value().shape for k, v in nnx.to_flat_state(nnx.state(make(name), nnx.Param))}
              for name in KINDS}
    assert shapes["lstm"] == {("cell", "kernel"): (F, 4 * H), ("cell", "recurrent_kernel"): (H, 4 * H),
                              ("cell", "bias"): (4 * H,)}
    assert shapes["gru"][("cell", "bias")] == (2, 3 * H)
    assert shapes["gru_reset_before"][("cell", "bias")] == (3 * H,)
    assert shapes["simple"][("cell", "recurrent_kernel")] == (H, H)
    bias = np.asarray(LSTM(F, H, rngs=nnx.Rngs(0)).cell.bias.get_value())   # unit_forget_bias: f quarter is 1
    np.testing.assert_array_equal(bias, np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])
    assert not np.asarray(LSTM(F, H, rngs=nnx.Rngs(0), unit_forget_bias=False).cell.bias.get_value()).any()


@pytest.mark.parametrize("kind", list(KINDS))
def test_masking_equals_rows_run_alone(kind):
    lengths = [T, 4, 1, 0]
    x, mask = padded_batch(lengths)                       # NaN on every padded step
    layer = make(kind, return_sequences=True)
    out = call(layer, x, mask)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference(kind, layer, x, mask)[0], atol=1e-5)   # the masked reference agrees
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(out[i, n:], 0)       # padded positions output zeros
        if n:
            np.testing.assert_allclose(out[i, :n], call(layer, x[i:i + 1, :n])[0], atol=1e-6)


def test_masked_final_states_are_the_last_valid_steps():
    """return_sequences=False gives the state after the last valid step (LSTM: h and c); none valid: zeros."""
    lengths = [T, 4, 1, 0]
    x, mask = padded_batch(lengths, seed=11)
    layer = make("lstm", return_state=True)
    last, h, c = call(layer, x, mask)
    np.testing.assert_array_equal(last, h)
    assert np.isfinite(h).all() and np.isfinite(c).all()
    alone = twin(layer, return_sequences=True, return_state=False)
    for i, n in enumerate(lengths):
        if n == 0:
            assert not h[i].any() and not c[i].any()
            continue
        np.testing.assert_allclose(h[i], call(alone, x[i:i + 1, :n])[0, -1], atol=1e-6)
        _, (rh, rc) = reference("lstm", layer, x[i:i + 1, :n])
        np.testing.assert_allclose(h[i], rh[0], atol=1e-5)
        np.testing.assert_allclose(c[i], rc[0], atol=1e-5)


def test_go_backwards_follows_keras():
    layer = make("lstm", return_sequences=True, go_backwards=True)
    forward = twin(layer, go_backwards=False)
    x = jax.random.normal(jax.random.key(3), (B, T, F))
    out = call(layer, x)
    np.testing.assert_allclose(out, call(forward, jnp.flip(x, 1)), atol=1e-6)       # outputs in processing order
    np.testing.assert_allclose(out, reference("lstm", layer, x, go_backwards=True)[0], atol=1e-5)
    # right-padded: the padding (at the start of the reversed row) is skipped, the final state is that of the
    # reversed valid part run alone
    lengths = [T, 4, 1]
    xp, mask = padded_batch(lengths, seed=4)
    last = call(twin(layer, return_sequences=False), xp, mask)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(last[i], call(forward, jnp.flip(xp[i:i + 1, :n], 1))[0, -1], atol=1e-6)


@pytest.mark.parametrize("kind,merge_mode", [("lstm", "concat"), ("gru", "sum"), ("simple", "mul")])
def test_bidirectional_masked_equals_reversed_valid_part(kind, merge_mode):
    lengths = [T, 4, 1]
    x, mask = padded_batch(lengths, seed=5)
    # LSTM: the backward twin Bidirectional builds itself (fresh Keras-initialized weights); the others: given
    backward = None if kind == "lstm" else make(kind, seed=1, return_sequences=True, go_backwards=True)
    bi = Bidirectional(make(kind, return_sequences=True), merge_mode, rngs=nnx.Rngs(7), backward_layer=backward)
    assert bi.backward_layer.go_backwards and not bi.forward_layer.go_backwards
    assert not np.allclose(bi.forward_layer.cell.kernel.get_value(), bi.backward_layer.cell.kernel.get_value())
    out = call(bi, x, mask)
    assert out.shape == (len(lengths), T, bi.output_features)
    merge = {"concat": lambda a, b: np.concatenate([a, b], -1), "sum": np.add, "mul": np.multiply}[merge_mode]
    backward = twin(bi.backward_layer, go_backwards=False)   # the backward weights, plain forward-in-time
    for i, n in enumerate(lengths):
        row = x[i:i + 1, :n]
        fw = np.asarray(call(bi.forward_layer, row))[0]
        bw = np.asarray(call(backward, jnp.flip(row, 1)))[0, ::-1]   # reversed valid part, re-aligned to positions
        np.testing.assert_allclose(out[i, :n], merge(fw, bw), atol=1e-6)
        np.testing.assert_array_equal(out[i, n:], 0)


def test_bidirectional_last_states_ave():
    lengths = [T, 4, 1]
    x, mask = padded_batch(lengths, seed=6)
    bi = Bidirectional(make("gru", return_sequences=False), "ave", rngs=nnx.Rngs(8),
                       backward_layer=make("gru", seed=1, return_sequences=False, go_backwards=True))
    out = call(bi, x, mask)
    forward = twin(bi.forward_layer, return_sequences=True)
    backward = twin(bi.backward_layer, go_backwards=False, return_sequences=True)
    for i, n in enumerate(lengths):
        row = x[i:i + 1, :n]
        expected = (call(forward, row)[0, -1] + call(backward, jnp.flip(row, 1))[0, -1]) / 2
        np.testing.assert_allclose(out[i], expected, atol=1e-6)


def test_grads_flow_under_jit_through_one_scan():
    model = Bidirectional(LSTM(F, H, rngs=nnx.Rngs(0), return_sequences=True), rngs=nnx.Rngs(1))
    x, mask = padded_batch([T, 4, 2], fill=3.0)          # finite padding (NaN padding would poison weight grads)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, x, mask):
        y = nnx.merge(graphdef, params)(x, mask)
        return jnp.sum(y ** 2)

    grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x, mask)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g.get_value())
        assert np.isfinite(g).all() and np.abs(g).sum() > 0, path
    dx = np.asarray(dx)
    assert (dx[~mask] == 0).all() and (np.abs(dx[mask]).sum(-1) > 0).all()   # padded steps contribute nothing
    # one loop whatever T: a scan per direction, and the program does not grow with the sequence length
    jaxprs = [jax.make_jaxpr(loss)(params, jnp.zeros((2, t, F)), jnp.ones((2, t), bool)) for t in (5, 50)]
    assert [str(j).count("scan[") for j in jaxprs] == [2, 2]
    assert len(jaxprs[0].eqns) == len(jaxprs[1].eqns)


def test_dropout_follows_mode_and_keeps_masking():
    layer = make("gru", return_sequences=True, dropout=0.5, recurrent_dropout=0.3)
    x, mask = padded_batch([T, 4, 1], seed=9, fill=0.0)
    layer.eval()
    a, b = call(layer, x, mask), call(layer, x, mask)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, call(twin(layer, dropout=0.0, recurrent_dropout=0.0), x, mask), atol=1e-6)
    layer.train()
    c = call(layer, x, mask, nnx.Rngs(dropout=0))
    d = call(layer, x, mask, nnx.Rngs(dropout=1))
    assert not np.allclose(c, a) and not np.allclose(c, d)
    np.testing.assert_array_equal(c[1, 4:], 0)
    # input dropout: one mask per sequence — each input feature is dropped at every step of a row or at none
    probe = nnx.eval_shape(lambda: SimpleRNN(F, H, rngs=nnx.Rngs(0), dropout=0.5, return_sequences=True,
                                             activation="linear", use_bias=False))
    probe.cell.recurrent_kernel.set_value(jnp.zeros((H, H)))
    probe.cell.kernel.set_value(jnp.eye(F, H))             # output unit j = input feature j (j < H)
    probe.train()
    y = np.asarray(call(probe, jnp.ones((8, T, F)), rngs=nnx.Rngs(dropout=2)))
    assert ((y == 0).all(axis=1) | (y == 2).all(axis=1)).all() and (y == 0).any() and (y == 2).any()


def test_params_name_logical_axes_of_the_rules_table():
    rules = dict(parallel.LOGICAL_RULES)
    bidirectional = nnx.eval_shape(lambda: Bidirectional(GRU(F, H, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)))
    models = [make(kind) for kind in KINDS] + [bidirectional, make("lstm", use_bias=False)]
    for model in models:
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = v.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == v.get_value().ndim, (path, axes)
            assert all(a is None or a in rules for a in axes), (path, axes)
            parallel.logical_to_spec(axes)
