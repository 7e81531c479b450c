"""The LM task's loss and accuracy, computed in one pass over the logits (no separate argmax)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastserve.tasks.lm import token_cross_entropy


def test_fused_cross_entropy_and_accuracy_equal_the_plain_ones():
    logits = jax.random.normal(jax.random.key(0), (3, 11, 50)) * 3
    targets = jax.random.randint(jax.random.key(1), (3, 11), 0, 50)
    targets = targets.at[0, :4].set(jnp.argmax(logits[0, :4], -1))          # some tokens predicted right
    weights = (jnp.arange(11)[None] < jnp.array([[11], [7], [9]])).astype(jnp.float32)
    batch = {"targets": targets, "weights": weights}
    loss, sums = token_cross_entropy(logits, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(loss, jnp.sum(ce * weights), rtol=1e-6)
    correct = (jnp.argmax(logits, -1) == targets) * weights
    assert float(sums["correct"]) == float(jnp.sum(correct)) >= 4
    assert float(sums["weight"]) == 27
    grad = jax.grad(lambda x: token_cross_entropy(x, batch)[0])(logits)
    np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights))(logits), atol=1e-6)
