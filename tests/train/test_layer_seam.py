"""``zjax.layer``, the seam for blocks a Python loop calls: outside a train step it is the block
itself; inside, gradients through it equal the plain block's (NNX modules with dropout RNG state,
callable pytrees in the Equinox style, and functions), at every remat policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

import zjax
from zjax import layers


class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(8, 8, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return x + self.dropout(jnp.tanh(self.linear(x)))


class EquinoxStyle(struct.PyTreeNode):
    """A callable pytree whose fields are its parameters, as an Equinox module is."""

    w: jax.Array
    b: jax.Array

    def __call__(self, x):
        return jnp.tanh(x @ self.w + self.b)


def test_outside_a_train_step_it_is_the_block():
    block = EquinoxStyle(jnp.eye(3) * 2, jnp.ones(3))
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(zjax.layer(block)(x), block(x))
    np.testing.assert_array_equal(zjax.layer(lambda p, x: x * p)(3.0, x), x * 3.0)


def test_nnx_state_updates_come_back_out():
    """The dropout RNG counter advances through the seam as it does without it: two calls, two masks."""
    plain, seamed = Block(nnx.Rngs(0, dropout=1)), Block(nnx.Rngs(0, dropout=1))
    x = jnp.ones((4, 8))
    for _ in range(2):
        np.testing.assert_array_equal(zjax.layer(seamed)(x), plain(x))
    assert not np.array_equal(zjax.layer(seamed)(x), zjax.layer(seamed)(x))


@pytest.mark.parametrize("policy", ["none", "full", "dots"])
def test_gradients_through_the_seam_equal_the_blocks(policy):
    block = EquinoxStyle(jax.random.normal(jax.random.key(0), (8, 8)), jnp.zeros(8))
    x = jax.random.normal(jax.random.key(1), (4, 8))

    def loss(block, x, seam):
        for _ in range(3):
            x = (zjax.layer(block) if seam else block)(x)
        return jnp.sum(x ** 2)

    want = jax.grad(loss, argnums=(0, 1))(block, x, False)
    with layers.layer_context(policy, calls=[]):
        got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(block, x, True)
    # jitted against op-by-op float32: the same math rounded in another order (a wrong gradient is O(1) off)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_block_that_is_not_callable_is_refused():
    with pytest.raises(TypeError, match="needs a callable block"):
        zjax.layer({"w": jnp.ones(2)})


def test_an_nnx_block_with_dropout_differentiates_through_the_seam():
    """Under a remat policy the dropout key and counter go in and out of the checkpointed block."""
    def grads(seam):
        graphdef, params, rest = nnx.split(Block(nnx.Rngs(0, dropout=1)), nnx.Param, ...)
        rest = nnx.to_pure_dict(rest)  # the RNG variables are made inside the trace, as NNX requires

        def loss(params, x):
            block = nnx.merge(graphdef, params, rest)
            for _ in range(2):
                x = (zjax.layer(block) if seam else block)(x)
            return jnp.sum(x ** 2)

        with layers.layer_context("full", calls=[]):
            return jax.jit(jax.grad(loss))(params, jnp.ones((4, 8)))

    for a, b in zip(jax.tree.leaves(grads(True)), jax.tree.leaves(grads(False))):
        np.testing.assert_allclose(a, b, rtol=1e-6)
