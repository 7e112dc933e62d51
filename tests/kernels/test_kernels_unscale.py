"""unscale_and_check (interpret mode) equals the jnp reference bit for bit and reports
any inf or nan in fp16, bf16 and fp32 gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import unscale_and_check, unscale_and_check_reference

SCALE = 2.0 ** 16
BITS = {2: np.uint16, 4: np.uint32}
# Compiled once for every test that passes gradients of the same shapes.
unscale_interpret = jax.jit(functools.partial(unscale_and_check, impl="interpret"))


def gradients(seed=0):
    """Scaled gradients of odd shapes and every half and single dtype, all finite."""
    keys = jax.random.split(jax.random.key(seed), 5)
    return {
        "embed": jax.random.normal(keys[0], (7, 24)).astype(jnp.float16) * 1000,
        "blocks": [jax.random.normal(keys[1], (3, 5, 9)).astype(jnp.bfloat16) * SCALE,
                   jax.random.normal(keys[2], (300, 129)) * SCALE],  # two kernel blocks
        "bias": jax.random.normal(keys[3], (1,)).astype(jnp.float16),
        "scalar": jnp.float32(3.0) * SCALE,
        "empty": jnp.zeros((0, 4), jnp.bfloat16),
        "step": jnp.int32(5),
    }


def assert_bit_identical(got, want):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape, path
        g, w = np.asarray(g), np.asarray(w)
        bits = BITS.get(g.dtype.itemsize)
        if bits is not None and jnp.issubdtype(g.dtype, jnp.floating):
            g, w = g.view(bits), w.view(bits)
        np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


def test_finite_gradients_unscale_bit_identically_to_the_reference():
    grads = gradients()
    out, finite = unscale_interpret(grads, SCALE)
    ref, ref_finite = unscale_and_check_reference(grads, SCALE)
    assert finite.dtype == jnp.bool_ and finite.shape == () and bool(finite) and bool(ref_finite)
    assert_bit_identical(out, ref)
    np.testing.assert_allclose(out["blocks"][1], grads["blocks"][1] / SCALE, rtol=1e-7)
    assert int(out["step"]) == 5


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
@pytest.mark.parametrize("where", [("embed",), ("blocks", 0), ("blocks", 1), ("bias",)],
                         ids=["fp16", "bf16", "fp32-second-block", "fp16-size-1"])
def test_one_bad_element_anywhere_is_reported(where, bad):
    grads = gradients()
    leaf = grads[where[0]] if len(where) == 1 else grads[where[0]][where[1]]
    index = tuple(s - 1 for s in leaf.shape)  # the last element, in the last block
    bad_leaf = leaf.at[index].set(bad)
    if len(where) == 1:
        grads[where[0]] = bad_leaf
    else:
        grads[where[0]][where[1]] = bad_leaf
    out, finite = unscale_interpret(grads, SCALE)
    ref, ref_finite = unscale_and_check_reference(grads, SCALE)
    assert not bool(finite) and not bool(ref_finite)
    assert_bit_identical(out, ref)


def test_overflow_of_the_unscaling_itself_is_reported():
    # 60000 is a finite fp16; divided by a scale of 0.5 it exceeds fp16's maximum.
    grads = {"w": jnp.array([60000.0, 1.0], jnp.float16)}
    out, finite = unscale_and_check(grads, 0.5, impl="interpret")
    assert not bool(finite) and np.isinf(np.asarray(out["w"][0], np.float32))


def test_traced_scale_matches_the_reference():
    grads = gradients(seed=1)
    out, finite = jax.jit(functools.partial(unscale_and_check, impl="interpret"))(grads, jnp.float32(SCALE))
    ref, ref_finite = unscale_and_check_reference(grads, SCALE)
    assert_bit_identical(out, ref)
    assert bool(finite) == bool(ref_finite)


def test_pallas_on_cpu_raises_and_bad_scale_names_the_argument():
    with pytest.raises(ValueError, match=r"unscale_and_check: impl='pallas'.*'cpu'.*'interpret'"):
        unscale_and_check({"w": jnp.ones(3)}, SCALE, impl="pallas")
    with pytest.raises(ValueError, match=r"scale has shape \(2,\)"):
        unscale_and_check({"w": jnp.ones(3)}, jnp.ones(2), impl="interpret")
