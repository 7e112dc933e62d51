"""SwiGLU and GeGLU Pallas kernels (interpret mode) match the jnp reference.

Tolerances, relative to the largest magnitude of the reference: float32 1e-5 for outputs
and gradients, bfloat16 2e-2.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import (geglu, geglu_reference, shard_over_batch, swiglu,
                            swiglu_reference)

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
KERNELS = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}


def inputs(shape, f, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    d = shape[-1]
    x = jax.random.normal(keys[0], shape).astype(dtype)
    w_gate = (jax.random.normal(keys[1], (d, f)) / np.sqrt(d)).astype(dtype)
    w_up = (jax.random.normal(keys[2], (d, f)) / np.sqrt(d)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (*shape[:-1], f))
    return x, w_gate, w_up, cotangent


def output_and_grads(fn, x, w_gate, w_up, cotangent):
    def f(x, w_gate, w_up):
        out, vjp = jax.vjp(fn, x, w_gate, w_up)
        return out, vjp(cotangent.astype(out.dtype))
    return jax.jit(f)(x, w_gate, w_up)


def assert_close(got, want, tol, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    want32 = np.float32(want)
    err = np.abs(np.float32(got) - want32).max()
    bound = tol * np.abs(want32).max()
    assert err <= bound, (name, err, bound)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype,shape,f,block_sizes", [
    (jnp.float32, (7, 24), 40, None),              # odd everything, one padded tile
    (jnp.float32, (3, 11, 24), 40, (16, 16, 16)),  # 3 row blocks x 3 f blocks x 2 d chunks
    (jnp.bfloat16, (2, 5, 32), 48, (16, 16, 16)),
], ids=["f32-odd", "f32-many-tiles", "bf16"])
def test_forward_and_gradients_match_reference(kernel, dtype, shape, f, block_sizes):
    fused, reference = KERNELS[kernel]
    x, w_gate, w_up, cotangent = inputs(shape, f, dtype)
    out, grads = output_and_grads(
        functools.partial(fused, impl="interpret", block_sizes=block_sizes), x, w_gate, w_up,
        cotangent)
    ref, ref_grads = output_and_grads(reference, x, w_gate, w_up, cotangent)
    assert out.shape == (*shape[:-1], f) and out.dtype == dtype
    assert_close(out, ref, TOLERANCE[dtype], "out")
    for name, g, r in zip(("dx", "dw_gate", "dw_up"), grads, ref_grads):
        assert_close(g, r, TOLERANCE[dtype], name)


def test_geglu_is_tanh_gelu_of_the_gate():
    x, w_gate, w_up, _ = inputs((4, 16), 16, jnp.float32)
    want = jax.nn.gelu(x @ w_gate) * (x @ w_up)
    np.testing.assert_allclose(geglu(x, w_gate, w_up, impl="interpret"), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, jax.nn.gelu(x @ w_gate, approximate=False) * (x @ w_up),
                           rtol=1e-6, atol=1e-7)


def test_mixed_dtypes_promote_like_a_matmul():
    x, w_gate, w_up, _ = inputs((5, 16), 16, jnp.float32)
    out = swiglu(x.astype(jnp.bfloat16), w_gate, w_up, impl="interpret")
    assert out.dtype == jnp.float32
    grads = jax.grad(lambda x: swiglu(x, w_gate, w_up, impl="interpret").sum())(
        x.astype(jnp.bfloat16))
    assert grads.dtype == jnp.bfloat16


@pytest.mark.parametrize("kernel", KERNELS)
def test_pallas_on_cpu_raises_and_auto_uses_the_reference(kernel):
    fused, reference = KERNELS[kernel]
    x, w_gate, w_up, _ = inputs((7, 24), 40, jnp.float32)
    with pytest.raises(ValueError, match=rf"{kernel}: impl='pallas'.*'cpu'.*'interpret'.*'xla'"):
        fused(x, w_gate, w_up, impl="pallas")
    np.testing.assert_array_equal(fused(x, w_gate, w_up), reference(x, w_gate, w_up))


def test_wrong_weight_shapes_name_the_argument():
    x = jnp.ones((2, 16))
    with pytest.raises(ValueError, match=r"w_gate has shape \(8, 4\).*\(16, f\)"):
        swiglu(x, jnp.ones((8, 4)), jnp.ones((8, 4)), impl="interpret")
    with pytest.raises(ValueError, match=r"w_up has shape \(16, 5\).*\(16, 4\)"):
        swiglu(x, jnp.ones((16, 4)), jnp.ones((16, 5)), impl="interpret")


def test_per_shard_on_8_devices_equals_unsharded_without_gathering():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, w_gate, w_up, cotangent = inputs((8, 3, 24), 40, jnp.float32)
    fused = functools.partial(swiglu, impl="interpret")
    sharded_fn = shard_over_batch(fused, mesh, batched=(True, False, False))
    placed = (jax.device_put(x, NamedSharding(mesh, P("data"))),
              *(jax.device_put(w, NamedSharding(mesh, P())) for w in (w_gate, w_up)))
    plain, plain_grads = output_and_grads(fused, x, w_gate, w_up, cotangent)
    sharded, sharded_grads = output_and_grads(sharded_fn, *placed, cotangent)
    np.testing.assert_allclose(sharded, plain, rtol=1e-6, atol=1e-6)
    for s, p in zip(sharded_grads, plain_grads):
        np.testing.assert_allclose(s, p, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(sharded_fn).lower(*placed).compile().as_text()
    assert not re.search(r"all-gather|collective-permute|all-to-all", hlo)
