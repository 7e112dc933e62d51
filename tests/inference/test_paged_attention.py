"""Paged attention: the Pallas kernel (interpret mode) and the XLA path equal dense causal
attention over each sequence's keys, for decode blocks, prefill chunks and a mix of both, GQA and MQA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference
from pallas_kernels.paged_attention import paged_attention

PAGE = 4
HEAD_DIM = 16


def scatter_into_pages(keys, values, page_tables, num_pages, layers=1):
    """Pages ``[layers, num_pages, PAGE, kv_heads, d]`` holding each sequence's keys and values
    (``[len, kv_heads, d]`` per sequence, per layer) at the pages its table lists; other pages noise."""
    kv_heads = keys[0].shape[-2]
    noise = jax.random.normal(jax.random.key(99), (2, layers, num_pages, PAGE, kv_heads, HEAD_DIM))
    k_pages, v_pages = np.array(noise[0]), np.array(noise[1])
    for layer in range(layers):
        for seq, (k, v) in enumerate(zip(keys, values)):
            for pos in range(k.shape[1]):
                page = page_tables[seq][pos // PAGE]
                k_pages[layer, page, pos % PAGE] = k[layer, pos]
                v_pages[layer, page, pos % PAGE] = v[layer, pos]
    return jnp.asarray(k_pages), jnp.asarray(v_pages)


_causal_reference = jax.jit(functools.partial(attention_reference, causal=True))


def dense_expected(q_rows, k, v, positions):
    """Each query row ``[heads, d]`` at ``positions[i]`` attending over ``k[:pos + 1]`` (dense, causal).

    One causal attention over the whole sequence ``k``, the rows placed at their positions: row
    ``pos`` of a causal mask is ``k[:pos + 1]`` (one program per sequence length, where a call per
    row compiled one per prefix)."""
    rows = np.asarray(q_rows)
    placed = np.zeros((k.shape[0],) + rows.shape[1:], rows.dtype)
    for row, pos in zip(rows, positions):
        if pos >= 0:
            placed[pos] = row
    full = np.asarray(_causal_reference(jnp.asarray(placed)[None], k[None], v[None])[0])
    return jnp.asarray(np.stack([full[pos] if pos >= 0 else np.zeros_like(row) for row, pos in zip(rows, positions)]))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (2, 2)])
def test_mixed_decode_and_prefill_blocks_equal_dense_attention(heads, kv_heads):
    # three sequences of lengths 11, 6 and 3 in a pool of 10 pages (page 0 the null page)
    lengths = [11, 6, 3]
    tables = np.array([[7, 2, 9, 0], [3, 5, 0, 0], [8, 0, 0, 0]], np.int32)
    key = jax.random.key(heads * 10 + kv_heads)
    kk, kv_, kq = jax.random.split(key, 3)
    keys = [jax.random.normal(jax.random.fold_in(kk, s), (2, n, kv_heads, HEAD_DIM)) for s, n in enumerate(lengths)]
    values = [jax.random.normal(jax.random.fold_in(kv_, s), (2, n, kv_heads, HEAD_DIM)) for s, n in enumerate(lengths)]
    k_pages, v_pages = scatter_into_pages(keys, values, tables, 10, layers=2)
    # block 0: a prefill chunk of sequence 0 (positions 5..8, the keys of the chunk already in the
    # cache); block 1: its last positions 9, 10 and two padding rows; block 2: a decode token of
    # sequence 1; block 3: a decode token of sequence 2; block 4: all padding
    block_q = 4
    slots = np.array([0, 0, 1, 2, 0], np.int32)
    positions = np.array([[5, 6, 7, 8], [9, 10, -1, -1], [5, -1, -1, -1], [2, -1, -1, -1], [-1] * 4], np.int32)
    q = jax.random.normal(kq, (len(slots), block_q, heads, HEAD_DIM))
    layer = 1
    expected = jnp.stack([dense_expected(q[b], keys[s][layer], values[s][layer], positions[b])
                          for b, s in enumerate(slots)])
    for impl in ("xla", "interpret"):
        out = paged_attention(q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(slots), jnp.asarray(positions),
                              layer=jnp.int32(layer), impl=impl)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_four_dim_pages_and_bfloat16():
    tables = np.array([[2, 1]], np.int32)
    keys = [jax.random.normal(jax.random.key(1), (1, 7, 1, HEAD_DIM))]
    values = [jax.random.normal(jax.random.key(2), (1, 7, 1, HEAD_DIM))]
    k_pages, v_pages = scatter_into_pages(keys, values, tables, 3)
    q = jax.random.normal(jax.random.key(3), (1, 2, 2, HEAD_DIM))
    positions = np.array([[5, 6]], np.int32)
    expected = dense_expected(q[0], keys[0][0], values[0][0], positions[0])[None]
    args = (jnp.asarray(tables), jnp.zeros(1, jnp.int32), jnp.asarray(positions))
    for impl in ("xla", "interpret"):
        out = paged_attention(q, k_pages[0], v_pages[0], *args, impl=impl)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        low = paged_attention(q.astype(jnp.bfloat16), k_pages[0].astype(jnp.bfloat16),
                              v_pages[0].astype(jnp.bfloat16), *args, impl=impl)
        assert low.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(low), expected, atol=3e-2)


def test_shape_errors_name_the_arguments():
    q = jnp.zeros((1, 2, 3, HEAD_DIM))
    pages = jnp.zeros((3, PAGE, 2, HEAD_DIM))
    table, slots, positions = jnp.zeros((1, 2), jnp.int32), jnp.zeros(1, jnp.int32), jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="kv_heads=2 dividing heads=3"):
        paged_attention(q, pages, pages, table, slots, positions)
    with pytest.raises(ValueError, match="give layer exactly"):
        paged_attention(jnp.zeros((1, 2, 2, HEAD_DIM)), pages[None], pages[None], table, slots, positions)
    with pytest.raises(ValueError, match="impl='nope'"):
        paged_attention(jnp.zeros((1, 2, 2, HEAD_DIM)), pages, pages, table, slots, positions, impl="nope")
