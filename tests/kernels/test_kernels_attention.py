"""Flash attention (Pallas, interpret mode) matches jnp attention and jax.nn's, values and grads.

Each case is compared with ``attention_reference`` run on the same inputs (values and
gradients of q, k, v) and, for values, with ``jax.nn.dot_product_attention``.
Tolerances, as a fraction of the largest reference magnitude (at least 1): float32
1e-5 for outputs and 5e-5 for gradients; bfloat16 2e-2 for both (bf16 has 8 bits of
mantissa, and both sides round probabilities to bf16 before the value product).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, flash_attention

TOLERANCE = {jnp.float32: (1e-5, 5e-5), jnp.bfloat16: (2e-2, 2e-2)}

CASES = {
    # name: (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, blocks, dtype)
    "len7-gqa-d32": (2, 7, 7, 4, 2, 32, False, False, None, jnp.float32),
    "len1-causal": (1, 1, 1, 2, 2, 32, True, False, None, jnp.float32),
    "len100-mqa-d64-causal-segments": (2, 100, 100, 4, 1, 64, True, True, (32, 16), jnp.float32),
    "q37-kv50-d128": (1, 37, 50, 2, 1, 128, False, False, (16, 32), jnp.float32),
    "len257-causal": (1, 257, 257, 2, 2, 32, True, False, (64, 64), jnp.float32),
    "bf16-len100-gqa-causal-segments": (2, 100, 100, 4, 2, 32, True, True, (16, 32), jnp.bfloat16),
}


def inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, segments, dtype):
    keys = jax.random.split(jax.random.key(q_len * 31 + head_dim), 5)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), dtype)
    # Three packed documents per row, of random lengths.
    segment_ids = (jnp.sort(jax.random.randint(keys[3], (batch, q_len), 0, 3), axis=1)
                   if segments else None)
    cotangent = jax.random.normal(keys[4], q.shape, jnp.float32)
    return q, k, v, segment_ids, cotangent


def output_and_grads(attention, q, k, v, segment_ids, cotangent):
    def f(q, k, v, segment_ids):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids), q, k, v)
        return out, vjp(cotangent.astype(out.dtype))
    return jax.jit(f)(q, k, v, segment_ids)


def assert_close(actual, expected, tol, what):
    actual, expected = np.float32(actual), np.float32(expected)
    err = float(np.abs(actual - expected).max())
    bound = tol * max(1.0, float(np.abs(expected).max()))
    assert err <= bound, f"{what}: max error {err} > {bound}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_reference_and_jax_nn(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, blocks, dtype = case
    q, k, v, segment_ids, cotangent = inputs(batch, q_len, kv_len, heads, kv_heads, head_dim,
                                             segments, dtype)

    def flash(q, k, v, segment_ids):
        return flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               impl="interpret", block_sizes=blocks)

    def reference(q, k, v, segment_ids):
        return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids)

    out, grads = output_and_grads(flash, q, k, v, segment_ids, cotangent)
    ref, ref_grads = output_and_grads(reference, q, k, v, segment_ids, cotangent)
    out_tol, grad_tol = TOLERANCE[dtype]
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, out_tol, "output vs reference")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert_close(g, r, grad_tol, f"d{name}")

    mask = None if segment_ids is None else (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    upstream = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    assert_close(out, upstream, out_tol, "output vs jax.nn.dot_product_attention")


def test_packed_documents_do_not_see_each_other():
    q, k, v, _, _ = inputs(1, 16, 16, 2, 2, 32, False, jnp.float32)
    segment_ids = jnp.array([[0] * 8 + [1] * 8])
    attend = jax.jit(lambda q, k, v, s: flash_attention(q, k, v, causal=True, segment_ids=s,
                                                          impl="interpret"))
    packed = attend(q, k, v, segment_ids)
    second = attend(q[:, 8:], k[:, 8:], v[:, 8:], segment_ids[:, 8:])
    np.testing.assert_allclose(packed[:, 8:], second, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k=jnp.ones((1, 4, 3, 32))), "kv_heads=3 must divide heads=4"),
    (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), r"segment_ids \(1, 5\)"),
    (dict(impl="triton"), "impl='triton'"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = dict(q=jnp.ones((1, 4, 4, 32)), k=jnp.ones((1, 4, 2, 32)), v=None, impl="interpret")
    args.update(kwargs)
    args["v"] = args["k"]
    with pytest.raises(ValueError, match=match):
        flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_memory_grows_linearly_with_length():
    def temp_bytes(seq):
        shape = jax.ShapeDtypeStruct((1, seq, 2, 32), jnp.float32)
        grad = jax.grad(lambda q, k, v: flash_attention(q, k, v, causal=True,
                                                        impl="interpret").sum(), argnums=(0, 1, 2))
        return jax.jit(grad).lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(256), temp_bytes(1024)
    assert long < 5 * short                # 4x the length: linear is 4x, quadratic 16x
    assert long < 2 * 1024 * 1024 * 4      # less than the [heads, len, len] fp32 scores
