"""Chunked cross entropy equals the full-logits one, values and gradients, any chunk size:
the XLA loop (``impl="xla"``, what ``"auto"`` runs on CPU) and the Pallas kernel in
interpret mode.

Tolerances, relative to the largest magnitude (at least 1): the XLA loop float32 2e-5
(the chunked log-sum-exp adds in a different order); the kernel float32 1e-5; bfloat16
inputs 2e-2 for both.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import cross_entropy_reference, shard_over_batch, softmax_cross_entropy


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


@pytest.mark.parametrize("dtype,shape,vocab,chunk,block_rows,tol", [
    # 1000 = 3 chunks of 256 + a padded one; 15 rows = one padded block of 16
    (jnp.float32, (3, 5), 1000, 256, None, 1e-5),
    # 40 rows = 2 blocks of 16 + a padded one; 101 = 6 chunks of 16 + a padded one
    (jnp.float32, (40,), 101, 16, 16, 1e-5),
    (jnp.bfloat16, (3, 5), 1000, 256, None, 2e-2),
], ids=["f32-vocab1000-chunk256", "f32-many-blocks", "bf16"])
def test_pallas_kernel_matches_full_logits(dtype, shape, vocab, chunk, block_rows, tol):
    keys = jax.random.split(jax.random.key(1), 4)
    hidden = jax.random.normal(keys[0], (*shape, 32), dtype)
    w_vocab = (jax.random.normal(keys[1], (32, vocab)) * 0.5).astype(dtype)
    labels = jax.random.randint(keys[2], shape, 0, vocab)
    cotangent = jax.random.normal(keys[3], shape)
    loss, grads = loss_and_grads(
        lambda h, w, l: softmax_cross_entropy(h, w, l, impl="interpret", chunk=chunk,
                                              block_rows=block_rows),
        hidden, w_vocab, labels, cotangent)
    ref, ref_grads = loss_and_grads(cross_entropy_reference, hidden, w_vocab, labels, cotangent)
    assert loss.dtype == jnp.float32 and loss.shape == labels.shape
    assert np.abs(loss - ref).max() <= tol * max(1.0, np.abs(ref).max())
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        g, r = np.float32(g), np.float32(r)
        assert np.abs(g - r).max() <= tol * max(1.0, np.abs(r).max())


def test_pallas_kernel_runs_under_jit_as_three_kernels():
    hidden, w_vocab, labels = jnp.ones((4, 16)), jnp.ones((16, 40)), jnp.zeros(4, jnp.int32)
    grad = jax.grad(lambda h, w: softmax_cross_entropy(h, w, labels, impl="interpret").sum(),
                    argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(grad)(hidden, w_vocab))
    for name in ("zjax_cross_entropy_fwd", "zjax_cross_entropy_dhidden", "zjax_cross_entropy_dw"):
        assert name in jaxpr


def test_pallas_kernel_per_shard_on_8_devices_equals_unsharded_without_gathering():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    keys = jax.random.split(jax.random.key(2), 4)
    hidden = jax.random.normal(keys[0], (8, 3, 16))
    w_vocab = jax.random.normal(keys[1], (16, 40))
    labels = jax.random.randint(keys[2], (8, 3), 0, 40)
    cotangent = jax.random.normal(keys[3], (8, 3))
    kernel = functools.partial(softmax_cross_entropy, impl="interpret", chunk=16)
    sharded_fn = shard_over_batch(kernel, mesh, batched=(True, False, True))
    placed = [jax.device_put(a, NamedSharding(mesh, spec))
              for a, spec in ((hidden, P("data")), (w_vocab, P()), (labels, P("data")))]
    plain, plain_grads = loss_and_grads(kernel, hidden, w_vocab, labels, cotangent)
    sharded, sharded_grads = loss_and_grads(sharded_fn, *placed, cotangent)
    np.testing.assert_allclose(sharded, plain, rtol=1e-6, atol=1e-6)
    for s, p in zip(sharded_grads, plain_grads):
        np.testing.assert_allclose(s, p, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(sharded_fn).lower(*placed).compile().as_text()
    assert not re.search(r"all-gather|collective-permute|all-to-all", hlo)


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
    (dict(impl="interpret", block_rows=0), "block_rows=0 must be a positive int"),
    (dict(impl="pallas"), r"softmax_cross_entropy: impl='pallas'.*'cpu'.*'interpret'"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        softmax_cross_entropy(jnp.ones((2, 4)), jnp.ones((4, 10)), jnp.zeros(2, jnp.int32), **kwargs)
