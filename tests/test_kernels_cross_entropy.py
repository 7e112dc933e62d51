"""Chunked cross entropy equals the full-logits one, values and gradients, any chunk size.

Tolerances: float32 2e-5 relative to the largest magnitude (the chunked log-sum-exp
adds in a different order); bfloat16 inputs 2e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cross_entropy_reference, softmax_cross_entropy


def loss_and_grads(loss_fn, hidden, w_vocab, labels, cotangent):
    def f(hidden, w_vocab):
        out, vjp = jax.vjp(lambda h, w: loss_fn(h, w, labels), hidden, w_vocab)
        return out, vjp(cotangent)
    return jax.jit(f)(hidden, w_vocab)


@pytest.mark.parametrize("dtype,chunk,tol", [
    (jnp.float32, None, 2e-5),   # default chunk: the whole (small) vocabulary
    (jnp.float32, 16, 2e-5),     # 101 = 6 chunks of 16 + a last chunk shifted to overlap
    (jnp.float32, 1, 2e-5),
    (jnp.bfloat16, 32, 2e-2),
])
def test_matches_full_logits(dtype, chunk, tol):
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (3, 5, 24), dtype)
    w_vocab = (jax.random.normal(keys[1], (24, 101)) * 0.5).astype(dtype)
    labels = jax.random.randint(keys[2], (3, 5), 0, 101)
    cotangent = jax.random.normal(keys[3], (3, 5))
    loss, grads = loss_and_grads(lambda h, w, l: softmax_cross_entropy(h, w, l, chunk=chunk),
                                 hidden, w_vocab, labels, cotangent)
    ref, ref_grads = loss_and_grads(cross_entropy_reference, hidden, w_vocab, labels, cotangent)
    assert loss.dtype == jnp.float32 and loss.shape == labels.shape
    np.testing.assert_allclose(loss, ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        g, r = np.float32(g), np.float32(r)
        assert np.abs(g - r).max() <= tol * max(1.0, np.abs(r).max())


def test_uniform_logits_give_log_vocab():
    loss = softmax_cross_entropy(jnp.ones((4, 8)), jnp.zeros((8, 1000)), jnp.arange(4), chunk=300)
    np.testing.assert_allclose(loss, np.log(1000.0), rtol=1e-6)


def test_chunked_loop_never_holds_full_logits():
    hidden, w_vocab = jnp.ones((64, 32)), jnp.ones((32, 4096))
    labels = jnp.zeros(64, jnp.int32)

    def temp_bytes(chunk):
        grad = jax.grad(lambda h, w: softmax_cross_entropy(h, w, labels, chunk=chunk).sum(),
                        argnums=(0, 1))
        return jax.jit(grad).lower(hidden, w_vocab).compile().memory_analysis().temp_size_in_bytes

    full_logits = 64 * 4096 * 4
    assert temp_bytes(256) < full_logits <= temp_bytes(4096)


@pytest.mark.parametrize("kwargs,match", [
    (dict(chunk=0), r"chunk=0 must be in \[1, vocab=10\]"),
    (dict(impl="fused"), "impl='fused'"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        softmax_cross_entropy(jnp.ones((2, 4)), jnp.ones((4, 10)), jnp.zeros(2, jnp.int32), **kwargs)
