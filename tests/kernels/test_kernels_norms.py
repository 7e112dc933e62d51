"""RMSNorm and LayerNorm Pallas kernels (interpret mode) match the jnp reference.

Tolerances: float32 outputs and gradients to 1e-5 / 1e-4 absolute; bfloat16 outputs to
one bf16 step near 2 (2e-2) and gradients to 2e-2 of their largest magnitude.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

TOLERANCE = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (2e-2, 2e-2)}


def rms(x, scale, bias, impl):
    return rms_norm(x, scale, eps=1e-6, impl=impl)


def ln(x, scale, bias, impl):
    return layer_norm(x, scale, bias, eps=1e-5, impl=impl)


def output_and_grads(norm, impl, x, scale, bias, cotangent):
    def f(x, scale, bias):
        out, vjp = jax.vjp(lambda *a: norm(*a, impl), x, scale, bias)
        return out, vjp(cotangent.astype(out.dtype))
    return jax.jit(f)(x, scale, bias)


@pytest.mark.parametrize("norm", [rms, ln], ids=["rms_norm", "layer_norm"])
@pytest.mark.parametrize("dtype,shape", [
    (jnp.float32, (3, 7, 16)),      # leading dims flattened to 21 rows, one block
    (jnp.float32, (300, 256)),      # two blocks of 256 rows, the second padded
    (jnp.bfloat16, (2, 5, 64)),
], ids=["f32-small", "f32-two-blocks", "bf16"])
def test_forward_and_gradients_match_reference(norm, dtype, shape):
    keys = jax.random.split(jax.random.key(0), 4)
    x = (jax.random.normal(keys[0], shape) * 3 + 1).astype(dtype)
    scale = (1 + 0.1 * jax.random.normal(keys[1], shape[-1:])).astype(dtype)
    bias = (0.1 * jax.random.normal(keys[2], shape[-1:])).astype(dtype)
    cotangent = jax.random.normal(keys[3], shape)
    out, grads = output_and_grads(norm, "interpret", x, scale, bias, cotangent)
    ref, ref_grads = output_and_grads(norm, "xla", x, scale, bias, cotangent)
    out_tol, grad_tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=out_tol, rtol=out_tol)
    for name, g, r in zip(("dx", "dscale", "dbias"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        bound = grad_tol * max(1.0, float(jnp.abs(r.astype(jnp.float32)).max()))
        err = float(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)).max())
        assert err <= bound, (name, err, bound)


def test_rms_norm_statistics_are_float32():
    # Rows of bf16 whose squares overflow fp16 and whose mean loses bits in bf16.
    x = jnp.full((4, 32), 300.0, jnp.bfloat16).at[:, 0].set(301.0)
    out = rms_norm(x, jnp.ones(32, jnp.bfloat16), impl="interpret")
    np.testing.assert_array_equal(np.float32(out), np.float32(rms_norm_reference(x, jnp.ones(32, jnp.bfloat16))))


def test_layer_norm_of_a_known_row():
    out = layer_norm(jnp.array([[1.0, 2.0, 3.0, 6.0]]), jnp.full(4, 2.0), jnp.ones(4), eps=0.0,
                     impl="interpret")
    # mean 3, variance (4 + 1 + 0 + 9) / 4
    np.testing.assert_allclose(out, [[-2, -1, 0, 3]] / np.sqrt(3.5) * 2 + 1, rtol=1e-6)


def test_wrong_scale_shape_names_the_argument():
    with pytest.raises(ValueError, match=r"scale has shape \(8,\).*\(16,\)"):
        rms_norm(jnp.ones((2, 16)), jnp.ones(8), impl="interpret")
