"""Block-sparse attention (``zjax.models.sparse_attention``): DeepSpeed's layouts, and an
attention that is masked dense attention.

What this proves:

- every sparsity mode builds the layout DeepSpeed's ``sparsity_config.py`` builds: cells
  derived by hand from DeepSpeed's functions (fixed's block-diagonal windows and their
  last block as a global column, its short last window and per-head global patterns;
  variable's listed window sizes and global ranges; bigbird's band, global row/column 0
  and random blocks; bslongformer's band and global blocks; local's sliding window), and
  ``unidirectional`` leaves nothing above the diagonal;
- random blocks follow ``seed``: the same seed gives the same layout, another seed other
  random blocks;
- ``block_sparse_attention`` equals masked dense attention written independently here
  (a per-token mask from ``np.kron``), forward and gradients wrt q, k and v at rel 1e-5
  in float32, for every mode, with one layout per head or one for all, causal or not,
  and with grouped KV heads; a row that sees no key gives zeros, never NaN;
- the splash-attention kernel path (``impl="interpret"``) gives the same values and
  gradients, pads a sequence that is not a whole number of its 128-token tiles, and its
  block mask skips the tiles the layout leaves empty;
- a DeepSpeed ``sparse_attention`` block maps onto the configs with DeepSpeed's defaults;
- mistakes raise ``ConfigError`` naming the key, the value and what would work.
"""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zjax.errors import ConfigError
from zjax.models import sparse_attention as sa
from zjax.models.sparse_attention import (
    BigBirdSparsity, BSLongformerSparsity, DenseSparsity, FixedSparsity, LocalSlidingWindowSparsity,
    VariableSparsity, block_sparse_attention, make_layout, map_deepspeed_sparse_attention,
)


def upper_is_empty(layout):
    return not np.triu(layout, k=1).any()


# ----------------------------------------------------------------------------- layouts

def test_dense_is_every_block():
    layout = make_layout(DenseSparsity(num_heads=3, block=16), 64)
    assert layout.shape == (3, 4, 4) and layout.dtype == np.int64 and layout.all()


def test_fixed_windows_and_global_columns():
    layout = make_layout(FixedSparsity(num_heads=2, block=16, num_local_blocks=4), 128)[0]
    expected = np.zeros((8, 8), int)
    expected[0:4, 0:4] = expected[4:8, 4:8] = 1  # windows of num_local_blocks blocks
    expected[:, 3] = expected[:, 7] = 1  # each window's last block is a global column
    np.testing.assert_array_equal(layout, expected)


def test_fixed_unidirectional_is_lower_triangular():
    layout = make_layout(FixedSparsity(num_heads=1, block=16, num_local_blocks=4,
                                       attention="unidirectional"), 128)[0]
    assert upper_is_empty(layout)
    assert layout[2, 0] and layout[2, 2] and not layout[2, 3]  # a window's lower triangle
    assert layout[3:, 3].all() and not layout[:3, 3].any()  # the global column from its row down
    assert not layout[4, 2] and layout[5, 4]


def test_fixed_horizontal_global_rows_see_everything():
    layout = make_layout(FixedSparsity(num_heads=1, block=16, num_local_blocks=4,
                                       horizontal_global_attention=True), 128)[0]
    assert layout[3].all() and layout[7].all()
    assert not layout[2, 5]


def test_fixed_two_global_blocks_per_window():
    layout = make_layout(FixedSparsity(num_heads=1, block=8, num_local_blocks=4,
                                       num_global_blocks=2), 64)[0]
    assert layout[:, [2, 3, 6, 7]].all()
    assert not layout[0, 5] and not layout[6, 1]


def test_fixed_short_last_window():
    # 6 blocks, windows of 4: windows [0, 4) and [4, 6); the short window's global block is
    # min(end + first_global, num_blocks - num_global_blocks) = min(4 + 3, 5) = 5
    layout = make_layout(FixedSparsity(num_heads=1, block=16, num_local_blocks=4), 96)[0]
    expected = np.zeros((6, 6), int)
    expected[0:4, 0:4] = expected[4:6, 4:6] = 1
    expected[:, 3] = expected[:, 5] = 1
    np.testing.assert_array_equal(layout, expected)


def test_fixed_global_patterns_per_head():
    config = FixedSparsity(num_heads=5, block=16, num_local_blocks=4, different_layout_per_head=True,
                           num_different_global_patterns=4)
    layout = make_layout(config, 128)
    # head h's global block is 4 - (1 + h % 4) in each window: 3, 2, 1, 0, then 3 again
    for h, col in enumerate([3, 2, 1, 0, 3]):
        assert layout[h][:, [col, col + 4]].all(), h
        others = [c for c in range(4) if c != col]
        assert not layout[h][4:, others].any(), h
    np.testing.assert_array_equal(layout[4], layout[0])


def test_one_layout_for_all_heads_unless_asked():
    same = make_layout(FixedSparsity(num_heads=3, block=16), 128)
    assert (same == same[0]).all()


def test_variable_windows_and_global_blocks():
    config = VariableSparsity(num_heads=1, block=16, local_window_blocks=[1, 2],
                              global_block_indices=[5])
    layout = make_layout(config, 7 * 16)[0]
    expected = np.zeros((7, 7), int)
    # windows of 1, then 2, then the last size repeats: [0], [1, 3), [3, 5), [5, 7)
    for start, end in [(0, 1), (1, 3), (3, 5), (5, 7)]:
        expected[start:end, start:end] = 1
    expected[:, 5] = 1  # a global column, no global row (horizontal_global_attention off)
    np.testing.assert_array_equal(layout, expected)


def test_variable_global_ranges_horizontal_and_unidirectional():
    ranges = dict(global_block_indices=[2], global_block_end_indices=[4])
    layout = make_layout(VariableSparsity(num_heads=1, block=16, horizontal_global_attention=True,
                                          **ranges), 128)[0]
    assert layout[:, 2:4].all() and layout[2:4, :].all()
    uni = make_layout(VariableSparsity(num_heads=1, block=16, attention="unidirectional", **ranges), 128)[0]
    # DeepSpeed fills a global range's columns from the range's first row down, so cell
    # (2, 3) lies above the diagonal; everything else is lower triangular
    assert uni[2:, 2:4].all() and not uni[:2, 2:4].any() and uni[2, 3]
    uni[2, 3] = 0
    assert upper_is_empty(uni)


def test_bigbird_band_global_and_random():
    config = BigBirdSparsity(num_heads=1, block=16, num_random_blocks=0, num_sliding_window_blocks=3,
                             num_global_blocks=1)
    layout = make_layout(config, 128)[0]
    expected = np.zeros((8, 8), int)
    for row in range(8):
        expected[row, max(0, row - 1):row + 2] = 1
    expected[0, :] = expected[:, 0] = 1
    np.testing.assert_array_equal(layout, expected)
    uni = make_layout(BigBirdSparsity(num_heads=1, block=16, num_random_blocks=2,
                                      attention="unidirectional", seed=3), 128)[0]
    assert upper_is_empty(uni)


def test_bigbird_random_blocks_per_row():
    # no band beyond the diagonal, no global block: each row is its diagonal and 2 random blocks
    config = BigBirdSparsity(num_heads=4, block=8, num_random_blocks=2, num_sliding_window_blocks=1,
                             num_global_blocks=0, different_layout_per_head=True, seed=0)
    layout = make_layout(config, 16 * 8)
    counts = layout.sum(-1)
    assert ((counts == 2) | (counts == 3)).all() and (counts == 3).any()
    assert all(np.diagonal(layout[h]).all() for h in range(4))
    assert not (layout == layout[0]).all()  # heads draw their own random blocks


def test_same_seed_same_layout_other_seed_other_random_blocks():
    config = BigBirdSparsity(num_heads=2, block=8, num_random_blocks=2, seed=7)
    first = make_layout(config, 256)
    np.testing.assert_array_equal(first, make_layout(config, 256))
    other = make_layout(BigBirdSparsity(num_heads=2, block=8, num_random_blocks=2, seed=8), 256)
    assert not np.array_equal(first, other)
    band = make_layout(BigBirdSparsity(num_heads=2, block=8, num_random_blocks=0), 256)
    assert (first >= band).all() and (other >= band).all()  # only the random blocks differ
    variable = VariableSparsity(num_heads=1, block=8, num_random_blocks=1, seed=7)
    np.testing.assert_array_equal(make_layout(variable, 256), make_layout(variable, 256))


def test_bslongformer_band_and_global_blocks():
    config = BSLongformerSparsity(num_heads=1, block=16, num_sliding_window_blocks=3,
                                  global_block_indices=[0, 6])
    layout = make_layout(config, 128)[0]
    expected = np.zeros((8, 8), int)
    for row in range(8):
        expected[row, max(0, row - 1):row + 2] = 1
    expected[[0, 6], :] = expected[:, [0, 6]] = 1
    np.testing.assert_array_equal(layout, expected)
    uni = make_layout(BSLongformerSparsity(num_heads=1, block=16, global_block_indices=[1],
                                           global_block_end_indices=[3], attention="unidirectional"), 128)[0]
    np.testing.assert_array_equal(uni, np.tril(np.maximum(_band(8, 1), _globals(8, 1, 3))))


def _band(n, w):
    rows, cols = np.indices((n, n))
    return (abs(rows - cols) <= w).astype(int)


def _globals(n, start, end):
    out = np.zeros((n, n), int)
    out[start:end, :] = out[:, start:end] = 1
    return out


def test_local_sliding_window():
    uni = make_layout(LocalSlidingWindowSparsity(num_heads=2, block=16, num_sliding_window_blocks=5), 128)[0]
    rows, cols = np.indices((8, 8))
    np.testing.assert_array_equal(uni, ((cols <= rows) & (cols >= rows - 2)).astype(int))
    bi = make_layout(LocalSlidingWindowSparsity(num_heads=2, block=16, num_sliding_window_blocks=5,
                                                attention="bidirectional"), 128)[0]
    np.testing.assert_array_equal(bi, _band(8, 2))


# ----------------------------------------------------------------------------- attention

B, S, H, D, BLOCK = 2, 128, 4, 16, 16

LAYOUT_CONFIGS = {
    "dense": lambda per_head, att: DenseSparsity(block=BLOCK, different_layout_per_head=per_head),
    "fixed": lambda per_head, att: FixedSparsity(
        block=BLOCK, different_layout_per_head=per_head, num_local_blocks=4, num_global_blocks=1,
        attention=att, num_different_global_patterns=4 if per_head else 1),
    "variable": lambda per_head, att: VariableSparsity(
        block=BLOCK, different_layout_per_head=per_head, num_random_blocks=1, local_window_blocks=[2, 3],
        global_block_indices=[1], attention=att, seed=1),
    "bigbird": lambda per_head, att: BigBirdSparsity(
        block=BLOCK, different_layout_per_head=per_head, num_random_blocks=1, attention=att, seed=2),
    "bslongformer": lambda per_head, att: BSLongformerSparsity(
        block=BLOCK, different_layout_per_head=per_head, global_block_indices=[3], attention=att),
    "local": lambda per_head, att: LocalSlidingWindowSparsity(
        block=BLOCK, different_layout_per_head=per_head, attention=att),
}


def reference(q, k, v, token_mask):
    """Masked dense attention, written out: per-token mask ``[heads, S, S]``, k and v repeated
    to every query head; a row with no key gives zeros."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(token_mask, scores, -1e30)
    probs = jnp.where(token_mask.any(-1, keepdims=True), jax.nn.softmax(scores, axis=-1), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def token_mask(layout, block, causal, heads=H):
    mask = np.kron(np.broadcast_to(layout, (heads,) + layout.shape[1:]), np.ones((block, block))) > 0
    if causal:
        mask &= np.tril(np.ones(mask.shape[1:], bool))
    return mask


def inputs(kv_heads, seq=S, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, seq, H, D))
    k = jax.random.normal(keys[1], (B, seq, kv_heads, D))
    v = jax.random.normal(keys[2], (B, seq, kv_heads, D))
    weights = jax.random.normal(keys[3], (B, seq, H, D))  # a cotangent that mixes every output
    return q, k, v, weights


@jax.jit
def reference_and_grads(q, k, v, weights, mask):
    return _with_grads(lambda q, k, v: reference(q, k, v, mask), q, k, v, weights)


def _with_grads(run, q, k, v, weights):
    loss = lambda q, k, v: jnp.sum(run(q, k, v) * weights)
    return run(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@functools.partial(jax.jit, static_argnames=("block", "causal"))
def _xla_and_grads(q, k, v, weights, layout, *, block, causal):
    # the layout traced: one compilation serves every layout of a shape
    run = lambda q, k, v: block_sparse_attention(q, k, v, layout, block=block, causal=causal, impl="xla")
    return _with_grads(run, q, k, v, weights)


def sparse_and_grads(q, k, v, weights, layout, *, block, causal, impl):
    if impl == "xla":
        return _xla_and_grads(q, k, v, weights, layout, block=block, causal=causal)
    run = lambda q, k, v: block_sparse_attention(q, k, v, layout, block=block, causal=causal, impl=impl)
    return jax.jit(lambda q, k, v: _with_grads(run, q, k, v, weights))(q, k, v)


def assert_same(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("mode", list(LAYOUT_CONFIGS))
def test_xla_equals_masked_dense_attention(mode, per_head, causal):
    attention = "unidirectional" if causal else "bidirectional"
    layout = make_layout(LAYOUT_CONFIGS[mode](per_head, attention), S, num_heads=H)
    if per_head and mode in ("variable", "bigbird", "fixed"):
        assert not (layout == layout[0]).all()
    q, k, v, weights = inputs(kv_heads=2)
    got = sparse_and_grads(q, k, v, weights, layout, block=BLOCK, causal=causal, impl="xla")
    assert_same(got, reference_and_grads(q, k, v, weights, token_mask(layout, BLOCK, causal)))


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_xla_grouped_kv_heads(kv_heads):
    layout = make_layout(LAYOUT_CONFIGS["bigbird"](True, "bidirectional"), S, num_heads=H)
    q, k, v, weights = inputs(kv_heads)
    got = sparse_and_grads(q, k, v, weights, layout, block=BLOCK, causal=True, impl="xla")
    assert_same(got, reference_and_grads(q, k, v, weights, token_mask(layout, BLOCK, True)))


def test_a_row_without_keys_gives_zeros_not_nan():
    layout = make_layout(LocalSlidingWindowSparsity(block=BLOCK, num_sliding_window_blocks=1), S,
                         num_heads=H)
    layout[1, 2, :] = 0  # head 1's third block row sees nothing
    layout[2, 0, :] = 0
    layout[2, 0, 3] = 1  # head 2's first rows see only a later block: nothing under causal
    q, k, v, weights = inputs(kv_heads=2)
    out, grads = got = sparse_and_grads(q, k, v, weights, layout, block=BLOCK, causal=True, impl="xla")
    assert not np.asarray(out[:, 2 * BLOCK:3 * BLOCK, 1]).any()
    assert not np.asarray(out[:, :BLOCK, 2]).any()
    assert not np.asarray(grads[0][:, 2 * BLOCK:3 * BLOCK, 1]).any()
    assert_same(got, reference_and_grads(q, k, v, weights, token_mask(layout, BLOCK, True)))


def test_one_head_layout_serves_every_head():
    layout = make_layout(FixedSparsity(num_heads=1, block=BLOCK), S)
    q, k, v, _ = inputs(kv_heads=4)
    one = block_sparse_attention(q, k, v, layout, block=BLOCK, impl="xla")
    every = block_sparse_attention(q, k, v, np.repeat(layout, H, 0), block=BLOCK, impl="xla")
    np.testing.assert_array_equal(np.asarray(one), np.asarray(every))


def test_kernel_interpret_equals_masked_dense_attention():
    # 160 tokens: padded to 256, two 128-token tiles; variable layout per head, an empty row,
    # causal, one kv head for four query heads
    seq, block = 160, 16
    config = VariableSparsity(block=block, different_layout_per_head=True, num_random_blocks=1,
                              local_window_blocks=[2, 3], attention="unidirectional", seed=4)
    layout = make_layout(config, seq, num_heads=H)
    layout[3, 5, :] = 0
    q, k, v, weights = inputs(kv_heads=1, seq=seq)
    got = sparse_and_grads(q, k, v, weights, layout, block=block, causal=True, impl="interpret")
    assert_same(got, reference_and_grads(q, k, v, weights, token_mask(layout, block, True)))
    assert not np.asarray(got[0][:, 5 * block:6 * block, 3]).any()


def test_kernel_skips_empty_tiles():
    # blocks of 64 in 128-token tiles: fixed unidirectional windows of 2 blocks with their
    # second block global; tile (0, 1) is empty, (0, 0) and (1, 1) hold windows, (1, 0) the
    # first window's global column
    seq, block = 256, 64
    layout = make_layout(FixedSparsity(block=block, num_local_blocks=2, attention="unidirectional"),
                         seq, num_heads=2)
    kernel, padded, _ = sa._splash_kernel(np.ascontiguousarray(layout != 0).tobytes(), 2, 4, block,
                                          seq, True, True)
    tiles = np.asarray(kernel.fwd_mask_info.block_mask)[0]
    assert padded == 256 and tiles[0, 1] == 0 and (tiles[[0, 1, 1], [0, 0, 1]] > 0).all()
    q, k, v, weights = inputs(kv_heads=2, seq=seq)
    got = sparse_and_grads(q[..., :2, :], k[..., :1, :], v[..., :1, :], weights[..., :2, :], layout,
                           block=block, causal=True, impl="interpret")
    want = reference_and_grads(q[..., :2, :], k[..., :1, :], v[..., :1, :], weights[..., :2, :],
                               token_mask(layout, block, True, heads=2))
    assert_same(got, want)


# ----------------------------------------------------------------------------- DeepSpeed keys

def test_map_deepspeed_block_with_defaults():
    fixed = map_deepspeed_sparse_attention({"block": 32, "num_local_blocks": 8, "num_global_blocks": 2,
                                            "attention": "unidirectional"}, num_heads=8)
    assert fixed == FixedSparsity(num_heads=8, block=32, num_local_blocks=8, num_global_blocks=2,
                                  attention="unidirectional")  # mode defaults to fixed
    variable = map_deepspeed_sparse_attention({
        "mode": "variable", "num_random_blocks": 2, "local_window_blocks": [4, 8],
        "global_block_indices": [0, 4], "global_block_end_indices": [2, 6],
        "horizontal_global_attention": True})
    assert variable.local_window_blocks == (4, 8) and variable.global_block_end_indices == (2, 6)
    # DeepSpeed's JSON default for bigbird's random blocks is 0 (its class says 1)
    assert map_deepspeed_sparse_attention({"mode": "bigbird"}).num_random_blocks == 0
    assert map_deepspeed_sparse_attention({"mode": "dense", "block": 8}) == DenseSparsity(block=8)


def test_map_deepspeed_ignores_another_modes_key_as_deepspeed_does(caplog):
    with caplog.at_level(logging.WARNING, logger="zjax"):
        config = map_deepspeed_sparse_attention({"mode": "bigbird", "num_local_blocks": 4})
    assert isinstance(config, BigBirdSparsity)
    assert "num_local_blocks is ignored with mode 'bigbird'" in caplog.text


def test_map_deepspeed_unknown_key_names_the_nearest():
    with pytest.raises(ConfigError, match="sparse_attention.num_local_block: .*did you mean 'num_local_blocks'"):
        map_deepspeed_sparse_attention({"mode": "fixed", "num_local_block": 4})
    with pytest.raises(ConfigError, match="mode='bigbrd'.*did you mean 'bigbird'"):
        map_deepspeed_sparse_attention({"mode": "bigbrd"})


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("build, match", [
    (lambda: FixedSparsity(num_local_blocks=6, num_global_blocks=4),
     r"num_local_blocks=6: must be divisible by num_global_blocks=4.*\[1, 2, 3, 6\]"),
    (lambda: FixedSparsity(attention="unidirectional", horizontal_global_attention=True),
     "horizontal_global_attention=True: only bidirectional"),
    (lambda: VariableSparsity(attention="unidirectional", horizontal_global_attention=True),
     "horizontal_global_attention=True: only bidirectional"),
    (lambda: FixedSparsity(num_different_global_patterns=2),
     "num_different_global_patterns=2: .*different_layout_per_head: true"),
    (lambda: FixedSparsity(num_local_blocks=4, different_layout_per_head=True, num_different_global_patterns=5),
     "num_different_global_patterns=5: can be at most .* = 4"),
    (lambda: BigBirdSparsity(attention="unidirection"), "attention='unidirection'.*did you mean 'unidirectional'"),
    (lambda: BSLongformerSparsity(global_block_indices=[0, 4], global_block_end_indices=[2]),
     "global_block_end_indices=\\[2\\]: must have as many entries"),
    (lambda: VariableSparsity(global_block_indices=[3], global_block_end_indices=[3]),
     "start 3 >= end 3"),
    (lambda: VariableSparsity(local_window_blocks=[]), "local_window_blocks=\\(\\)|local_window_blocks=\\[\\]"),
    (lambda: FixedSparsity(block=0), "block=0: must be an integer >= 1"),
    (lambda: sa.sparsity_config("local", window=3), "local.*did you mean|sparse_attention.window"),
])
def test_config_errors_name_key_value_and_fix(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_layout_errors():
    with pytest.raises(ConfigError, match=r"block=16 with seq_len=100: .*pad the sequence to 96 or 112"):
        make_layout(FixedSparsity(num_heads=2), 100)
    with pytest.raises(ConfigError, match="num_heads=None"):
        make_layout(FixedSparsity(), 64)
    with pytest.raises(ConfigError, match="num_sliding_window_blocks=5: is more than the 4 blocks"):
        make_layout(BigBirdSparsity(num_heads=1, num_sliding_window_blocks=5), 64)
    with pytest.raises(ConfigError, match="num_random_blocks=5: is more than the 4 blocks"):
        make_layout(VariableSparsity(num_heads=1, num_random_blocks=5), 64)


def test_attention_errors():
    q, k, v, _ = inputs(kv_heads=2)
    layout = make_layout(FixedSparsity(num_heads=H), S)
    with pytest.raises(ConfigError, match=r"layout of shape \(4, 8, 8\) does not fit .*block=32"):
        block_sparse_attention(q, k, v, layout, block=32, impl="xla")
    with pytest.raises(ConfigError, match="kv_heads=3 must divide heads=4"):
        block_sparse_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), layout, block=16)
    with pytest.raises(ConfigError, match="impl='pallas' runs splash attention, a TPU"):
        block_sparse_attention(q, k, v, layout, block=16, impl="pallas")
    with pytest.raises(ConfigError, match="impl='triton' is not an implementation"):
        block_sparse_attention(q, k, v, layout, block=16, impl="triton")
    traced = jax.jit(lambda lay: block_sparse_attention(q, k, v, lay, block=16, impl="interpret"))
    with pytest.raises(ConfigError, match="needs the layout as a concrete array"):
        traced(layout)


# --- the reference GPT's model.sparse_attention ------------------------------------------------


def _gpt_logits(*overrides):
    from flax import nnx

    from gpt_helpers import tiny_config, token_batches
    from zjax.models.gpt import make_gpt

    cfg = tiny_config("precision.compute_dtype=float32", *overrides)
    tokens = jnp.asarray(token_batches(1, 2, 32)[0]["tokens"][:, :-1])
    return nnx.jit(lambda m, t: m(t))(make_gpt(cfg.model, seed=0), tokens)


def test_the_gpt_attends_over_the_layout_a_dense_layout_changes_nothing():
    dense = _gpt_logits()
    np.testing.assert_allclose(_gpt_logits("model.sparse_attention={mode: dense, block: 8}"), dense,
                               rtol=1e-5, atol=1e-5)
    # a local window of 1 block of 8 tokens: every token sees at most its own block
    local = _gpt_logits("model.sparse_attention={mode: local, block: 8, num_sliding_window_blocks: 1}")
    assert float(jnp.max(jnp.abs(local - dense))) > 1e-3
    # the first block sees only itself under any causal layout that keeps the diagonal
    np.testing.assert_allclose(local[:, :8], dense[:, :8], rtol=1e-5, atol=1e-5)


def test_the_sparse_gpt_trains_split_over_tensor_like_on_data_alone():
    """One layout per head (variable with a random block: every head's differs) with the heads split
    over tensor=2: each shard takes its heads' layouts; the run equals data=8's."""
    from gpt_helpers import gpt_train, token_batches

    block = ("model.sparse_attention={mode: variable, block: 8, different_layout_per_head: true, "
             "num_random_blocks: 1, local_window_blocks: [1], global_block_indices: [0]}")

    def losses(*overrides):
        train, state = gpt_train("precision.compute_dtype=float32", "zero.stage=3", block, *overrides)
        out = []
        for batch in token_batches(3, 16, 32):
            state, metrics = train(state, batch)
            out.append(float(metrics["loss"]))
        return np.array(out)

    np.testing.assert_allclose(losses("mesh.tensor=2"), losses(), rtol=1e-5)
