"""The hashed dropout mask (fastserve.models.dropout): the keep rate is the asked one, masks are reproducible from
the key and differ between keys, neighbouring entries are independent, and the module keeps nnx.Dropout's
contract (eval is the identity, train scales the kept entries, broadcast_dims share a mask, no key is an error)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fastserve.models.dropout import Dropout, keep_mask


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_keep_rate_reproducibility_and_independence(keep):
    shape = (64, 128, 48)
    n = np.prod(shape)
    a = np.asarray(keep_mask(jax.random.key(0), shape, keep))
    sigma = np.sqrt(keep * (1 - keep) / n)
    assert abs(a.mean() - keep) < 5 * sigma
    np.testing.assert_array_equal(a, np.asarray(keep_mask(jax.random.key(0), shape, keep)))
    b = np.asarray(keep_mask(jax.random.key(1), shape, keep))
    both = keep * keep + (1 - keep) * (1 - keep)                  # agreement of two independent masks
    assert abs((a == b).mean() - both) < 5 * np.sqrt(both * (1 - both) / n)
    for axis in range(3):                                         # neighbours along every axis: P(both kept) = keep²
        x, y = np.moveaxis(a, axis, 0)[1:], np.moveaxis(a, axis, 0)[:-1]
        m = x.size
        assert abs((x & y).mean() - keep * keep) < 5 * np.sqrt(keep * keep * (1 - keep * keep) / m), axis


def test_module_contract():
    drop = Dropout(0.25)
    x = jnp.ones((32, 64, 16))
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)
    drop.train()
    y = np.asarray(drop(x, rngs=nnx.Rngs(dropout=3)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)   # dropped, or kept and scaled
    assert abs(y.mean() - 1.0) < 0.02
    np.testing.assert_array_equal(y, drop(x, rngs=nnx.Rngs(dropout=3)))
    shared = np.asarray(Dropout(0.5, broadcast_dims=(1,))(x, rngs=nnx.Rngs(dropout=0)))
    assert (shared == shared[:, :1]).all() and 0 < (shared == 0).mean() < 1
    with pytest.raises(ValueError, match="rngs"):
        drop(x)
    assert Dropout(0.0)(x) is x
