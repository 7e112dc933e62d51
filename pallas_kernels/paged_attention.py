"""Attention of query blocks over a paged KV cache (decode and chunked prefill alike).

The cache is a pool of pages, ``k_pages``/``v_pages`` ``[num_pages, page_size, kv_heads,
head_dim]`` (or with a leading layers axis, picked by ``layer``); a sequence slot's pages
are listed in order in its row of ``page_table [slots, pages_per_seq]``, so its key at
position ``p`` is ``k_pages[page_table[slot, p // page_size], p % page_size]``.

Queries come in *blocks*: ``q [n_blocks, block_q, heads, head_dim]``, each block holding
up to ``block_q`` query tokens of one sequence slot (``slots [n_blocks]``) with their
positions (``positions [n_blocks, block_q]``; -1 marks a padding row, whose output is
zeros). A query sees its slot's keys at positions up to its own. A decode step is blocks
of one real row; a prefill chunk of ``n`` tokens (whose keys the caller wrote into the
cache first) is ``ceil(n / block_q)`` blocks, causal within itself by position. Blocks of
different sequences mix freely in one call: the layout of a packed (SplitFuse) pass.

The Pallas kernel runs one program per (block, kv head): it holds the block's rows for the
kv head's whole group of query heads, ``[block_q * group, head_dim]``, and walks the slot's
pages up to the block's last position with an online softmax (flash-decoding's inner loop;
the pages of one sequence are not split over programs). Grouped query heads thus read each
page once. The ``xla`` path gathers the slot's pages and runs a dense masked softmax.
Under ``impl="auto"`` the kernel is used nowhere yet: it has run in interpret mode only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import MASKED, pallas_call, resolve_impl

# Why impl="auto" takes the XLA path on every backend (see the module docstring).
_AUTO_USES_XLA = "the paged-attention kernel has not yet run compiled on a GPU (interpret mode only)"


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    slots: jax.Array, positions: jax.Array, *, layer: jax.Array | int | None = None,
                    scale: float | None = None, impl: str = "auto") -> jax.Array:
    """Softmax attention of each query row over its sequence's cached keys up to its position.

    Args:
      q: ``[n_blocks, block_q, heads, head_dim]``.
      k_pages: ``[num_pages, page_size, kv_heads, head_dim]``, or ``[n_layers, num_pages, ...]``
        with ``layer``; ``kv_heads`` divides ``heads`` (query head ``h`` reads kv head
        ``h // (heads // kv_heads)``).
      v_pages: like ``k_pages``.
      page_table: int ``[n_slots, pages_per_seq]``, each slot's pages in order.
      slots: int ``[n_blocks]``, the slot each block's queries belong to.
      positions: int ``[n_blocks, block_q]``, each query's position in its sequence; -1 pads.
        A query at position ``p`` needs its slot's keys ``0..p`` in the cache.
      layer: with 5-D pages, the layer to read (an int or a traced int32 scalar).
      scale: multiplies the scores; default ``1 / sqrt(head_dim)``.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (``pallas_kernels.dispatch``).

    Returns:
      ``[n_blocks, block_q, heads, head_dim]`` in ``q``'s dtype; zeros on padding rows.

    Example:
      >>> import jax.numpy as jnp
      >>> k = jnp.ones((3, 4, 1, 16))          # 3 pages of 4 tokens, 1 kv head
      >>> q = jnp.ones((1, 2, 2, 16))          # one block, 2 rows, 2 query heads
      >>> table = jnp.array([[2, 1]])          # slot 0: page 2 then page 1
      >>> out = paged_attention(q, k, k, table, jnp.array([0]), jnp.array([[4, 5]]), impl="interpret")
      >>> out.shape
      (1, 2, 2, 16)
    """
    _check_shapes(q, k_pages, v_pages, page_table, slots, positions, layer)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    impl = paged_attention_impl(impl)
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    layer = jnp.asarray(layer, jnp.int32)
    if impl == "xla":
        return paged_attention_reference(q, k_pages, v_pages, page_table, slots, positions, layer=layer,
                                         scale=scale)
    return _paged_call(q, k_pages, v_pages, page_table, slots, positions, layer, scale, impl == "interpret")


def paged_attention_impl(impl: str) -> str:
    """What ``impl`` resolves to here: ``"pallas"``, ``"interpret"`` or ``"xla"``."""
    return resolve_impl("paged_attention", impl, _AUTO_USES_XLA if impl == "auto" else None)


def paged_attention_reference(q, k_pages, v_pages, page_table, slots, positions, *, layer=None, scale=None):
    """The XLA path: gathers each block's pages, then a dense masked softmax in float32."""
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    n_blocks, block_q, heads, head_dim = q.shape
    kv_heads = k_pages.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    pages = page_table[slots]                                   # [n_blocks, pages_per_seq]
    k = k_pages[layer, pages].reshape(n_blocks, -1, kv_heads, head_dim)
    v = v_pages[layer, pages].reshape(n_blocks, -1, kv_heads, head_dim)
    kv_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    mask = (kv_pos[None, None, :] <= positions[:, :, None])[:, None, None]  # [n_blocks, 1, 1, block_q, kv]
    qg = q.reshape(n_blocks, block_q, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, MASKED)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(q.dtype), v.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def _check_shapes(q, k_pages, v_pages, page_table, slots, positions, layer):
    if q.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.ndim not in (4, 5):
        raise ValueError(f"paged_attention: q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}; need q "
                         "[n_blocks, block_q, heads, head_dim] and k_pages, v_pages both [num_pages, page_size, "
                         "kv_heads, head_dim] (or with a leading layers axis)")
    if (k_pages.ndim == 5) != (layer is not None):
        raise ValueError(f"paged_attention: k_pages has {k_pages.ndim} dims and layer={layer!r}; give layer exactly "
                         "when the pages have a leading layers axis")
    heads, head_dim = q.shape[2], q.shape[3]
    kv_heads = k_pages.shape[-2]
    if k_pages.shape[-1] != head_dim or heads % kv_heads:
        raise ValueError(f"paged_attention: q {q.shape} and k_pages {k_pages.shape} need the same head_dim and "
                         f"kv_heads={kv_heads} dividing heads={heads}")
    if slots.shape != q.shape[:1] or positions.shape != q.shape[:2] or page_table.ndim != 2:
        raise ValueError(f"paged_attention: slots {slots.shape}, positions {positions.shape}, page_table "
                         f"{page_table.shape}; need slots [n_blocks], positions [n_blocks, block_q] for q {q.shape} "
                         "and page_table [n_slots, pages_per_seq]")


def _paged_call(q, k_pages, v_pages, page_table, slots, positions, layer, scale, interpret):
    n_blocks, block_q, heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[2], k_pages.shape[3]
    group = heads // kv_heads
    rows = block_q * group
    # rows of one program: the block's queries for a kv head's group of query heads, token-major
    qr = q.reshape(n_blocks, block_q, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qr = qr.reshape(n_blocks, kv_heads, rows, head_dim)
    row_pos = jnp.repeat(positions.astype(jnp.int32), group, axis=1)
    pages = page_table[slots].astype(jnp.int32)
    pages_per_seq = pages.shape[1]
    # Triton blocks are powers of two: pad the page list with the null page (never visited)
    pages = jnp.pad(pages, ((0, 0), (0, pl.next_power_of_2(pages_per_seq) - pages_per_seq)))
    kernel = functools.partial(_paged_kernel, scale=scale, page_size=page_size, pages_per_seq=pages_per_seq)
    out = pallas_call(
        kernel,
        grid=(n_blocks, kv_heads),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h: (0,)),
            pl.BlockSpec((None, pages.shape[1]), lambda b, h: (b, 0)),
            pl.BlockSpec((None, rows), lambda b, h: (b, 0)),
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0)),
            pl.BlockSpec(k_pages.shape, lambda b, h: (0, 0, 0, 0, 0)),
            pl.BlockSpec(v_pages.shape, lambda b, h: (0, 0, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        interpret=interpret,
        name="zjax_paged_attention",
    )(layer.reshape(1), pages, row_pos, qr, k_pages, v_pages)
    out = out.reshape(n_blocks, kv_heads, block_q, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(q.shape)


def _paged_kernel(layer_ref, pages_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, scale, page_size, pages_per_seq):
    h = pl.program_id(1)
    layer = layer_ref[0]
    q = q_ref[...]
    q_pos = pos_ref[...]
    # the pages holding keys 0..(the block's last position); none for an all-padding block
    n_pages = jnp.minimum((jnp.max(q_pos) + page_size) // page_size, pages_per_seq)

    def visit(j, carry):
        running_max, denom, acc = carry
        page = pages_ref[j]
        k = k_ref[layer, page, :, h, :].astype(q.dtype)
        v = v_ref[layer, page, :, h, :].astype(q.dtype)
        kv_pos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (page_size,), 0)
        mask = kv_pos[None, :] <= q_pos[:, None]
        s = jnp.where(mask, _dot_t(q, k) * scale, MASKED)
        new_max = jnp.maximum(running_max, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - new_max[:, None]), 0.0)
        correction = jnp.exp(running_max - new_max)
        denom = denom * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
        return new_max, denom, acc

    rows = q.shape[0]
    init = (jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, q.shape[1]), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, n_pages, visit, init)
    o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)


def _dot_t(a, b):
    """``a @ b.T`` accumulated in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
