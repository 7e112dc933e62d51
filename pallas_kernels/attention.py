"""Flash attention as Pallas kernels: online softmax forward, recompute-in-blocks backward.

Layout is ``jax.nn.dot_product_attention``'s: q ``[batch, q_len, heads, head_dim]``,
k and v ``[batch, kv_len, kv_heads, head_dim]`` with ``kv_heads`` dividing ``heads``
(query head ``h`` reads kv head ``h // (heads // kv_heads)``). Lengths are padded to
whole blocks and the padding masked out. One program handles one (batch, head, block);
it walks the blocks of the other sequence in a loop, so the largest score tile is
``[block_q, block_kv]`` and no ``[q_len, kv_len]`` array exists.

The forward kernel saves the float32 log-sum-exp of every query row; the backward pass
is two kernels that recompute the probabilities block by block: one over query blocks
(``dq``), one over key blocks (``dk``, ``dv`` per query head, summed over each group of
query heads outside the kernel).

On TPU, ``impl="pallas"`` (and ``"auto"``) runs the upstream Mosaic kernel,
``jax.experimental.pallas.ops.tpu.flash_attention``, through ``_tpu_flash_attention``:
it takes ``[batch, heads, len, head_dim]``, needs as many kv heads as query heads
(grouped kv heads are repeated), and key blocks that are multiples of 128 lanes, so
lengths are padded to whole blocks and padded keys are put in a segment of their own.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.dispatch import (
    MASKED, MIN_BLOCK, NUM_STAGES, block_size, dot_unsupported, fit_blocks, match_cotangent,
    pallas_call, resolve_impl, round_up, smem_unsupported,
)

# The upstream TPU kernel's key blocks and (above it) head_dim are multiples of 128 lanes.
_TPU_LANES = 128


class BlockSizes(NamedTuple):
    """Rows of queries and of keys one program holds at a time (powers of two >= 16 on GPU)."""

    block_q: int = 128
    block_kv: int = 128


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                    segment_ids: jax.Array | None = None, scale: float | None = None,
                    impl: str = "auto", block_sizes: BlockSizes | tuple | None = None) -> jax.Array:
    """Softmax attention ``softmax(q k^T * scale + mask) v`` without the score matrix.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``kv_heads`` divides ``heads``.
      v: like ``k``.
      causal: query ``t`` sees keys ``s <= t`` (positions counted from 0 in both, as in
        ``jax.nn.dot_product_attention``).
      segment_ids: int ``[batch, len]`` for queries and keys alike (needs
        ``q_len == kv_len``); a query sees only keys of its own segment.
      scale: multiplies the scores; default ``1 / sqrt(head_dim)``.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``).
      block_sizes: ``BlockSizes(block_q, block_kv)`` or a pair; by default the largest
        (128 at most) whose tiles fit a Triton program's shared memory at this head_dim
        and dtype. On GPU (and in interpret mode) they are cut down to the (padded)
        sequence length and must be powers of two >= 16; on TPU they must be multiples
        of 128 (default 128 each).

    Returns:
      ``[batch, q_len, heads, head_dim]`` in ``q``'s dtype. A query that sees no key
      gets zeros.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
      >>> out = flash_attention(q, q, q, causal=True, impl="interpret")
      >>> ref = jax.nn.dot_product_attention(q, q, q, is_causal=True)
      >>> bool(jnp.allclose(out, ref, atol=1e-5))
      True
    """
    _check_shapes(q, k, v, segment_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    here = dispatch.backend()
    impl = resolve_impl("flash_attention", impl, _unsupported(q, block_sizes, here))
    if impl == "xla":
        return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale)
    if impl == "pallas" and here == "tpu":
        return _tpu_flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale,
                                    block_sizes=block_sizes)
    block_q, block_kv = _block_sizes(q.shape[1], k.shape[1], block_sizes, q.shape[-1],
                                     q.dtype.itemsize)
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
        has_segments = False
    else:
        segment_ids = segment_ids.astype(jnp.int32)
        has_segments = True
    return _flash(q, k, v, segment_ids, causal, scale, block_q, block_kv, has_segments,
                  impl == "interpret")


def block_impl(q: jax.Array, impl: str) -> str:
    """What ring attention's blocks run with for ``impl``: ``"pallas"`` or ``"interpret"``
    (this module's kernels with explicit positions), or ``"xla"`` (also on TPU, whose
    upstream kernel takes no positions)."""
    impl = resolve_impl("flash_attention", impl, _unsupported(q, None, dispatch.backend()))
    return "xla" if impl == "pallas" and dispatch.backend() == "tpu" else impl


def flash_block_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, scale: float,
                        interpret: bool):
    """One ring-attention block: attention of queries at positions ``q_pos`` (``[batch, q_len]``,
    any order) over keys at ``kv_pos``, a query seeing keys of its own segment (``q_seg``,
    ``kv_seg``) and, when ``causal``, at or before its position. Returns this block's
    normalized output and float32 log-sum-exp ``[batch, heads, q_len]`` (``MASKED`` where a
    query sees no key), which the caller merges across blocks."""
    block_q, block_kv = _block_sizes(q.shape[1], k.shape[1], None, q.shape[-1], q.dtype.itemsize)
    out, lse = _forward_call(
        q, k, v, _pad_len(q_seg.astype(jnp.int32), block_q, value=-1),
        _pad_len(kv_seg.astype(jnp.int32), block_kv, value=-2), _pad_len(q_pos.astype(jnp.int32), block_q),
        _pad_len(kv_pos.astype(jnp.int32), block_kv), causal, scale, block_q, block_kv, True, interpret)
    return out, lse[:, :, :q.shape[1]]


def flash_block_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout, lse, delta, *, causal: bool,
                         scale: float, interpret: bool):
    """The gradients one ring-attention block contributes, given every query row's final
    log-sum-exp and ``delta = sum(dout * out)`` over the whole ring (``[batch, heads, q_len]``):
    ``(dq, dk, dv)``, float32."""
    block_q, block_kv = _block_sizes(q.shape[1], k.shape[1], None, q.shape[-1], q.dtype.itemsize)
    dq, dk, dv = _backward_call(
        q, k, v, _pad_len(q_seg.astype(jnp.int32), block_q, value=-1),
        _pad_len(kv_seg.astype(jnp.int32), block_kv, value=-2), _pad_len(q_pos.astype(jnp.int32), block_q),
        _pad_len(kv_pos.astype(jnp.int32), block_kv), dout.astype(q.dtype), _pad_len(lse, block_q, axis=2),
        _pad_len(delta, block_q, axis=2), causal, scale, block_q, block_kv, True, interpret)
    return dq.astype(jnp.float32), dk, dv


def attention_reference(q, k, v, *, causal=False, segment_ids=None, scale=None):
    """The jnp attention the kernel is tested against: float32 scores and softmax."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        mask = mask & jnp.tril(jnp.ones((q_len, kv_len), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    mask = mask[:, None, None]
    scores = jnp.where(mask, scores, MASKED)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def _check_shapes(q, k, v, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape}; need q "
                         "[batch, q_len, heads, head_dim] and k, v both "
                         "[batch, kv_len, kv_heads, head_dim]")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: q {q.shape} and k {k.shape} differ in batch or "
                         "head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"flash_attention: kv_heads={k.shape[2]} must divide "
                         f"heads={q.shape[2]}")
    if segment_ids is not None and (segment_ids.shape != q.shape[:2] or q.shape[1] != k.shape[1]):
        raise ValueError(f"flash_attention: segment_ids {segment_ids.shape} must be "
                         f"[batch, len] = {q.shape[:2]} with q_len == kv_len "
                         f"(kv_len is {k.shape[1]})")


def _unsupported(q, block_sizes, backend) -> str | None:
    if backend == "tpu":
        for b in block_sizes or ():
            if b % _TPU_LANES:
                return (f"block size {b} in block_sizes={tuple(block_sizes)} is not a multiple "
                        f"of {_TPU_LANES} (the TPU kernel's lanes)")
        return None
    if block_sizes is None:
        if _default_blocks(q.shape[-1], q.dtype.itemsize) is None:
            return smem_unsupported(_smem_bytes(q.shape[-1], q.dtype.itemsize, MIN_BLOCK, MIN_BLOCK),
                                    f"blocks of head_dim {q.shape[-1]}")
        return dot_unsupported(None, head_dim=q.shape[-1])
    block_q, block_kv = BlockSizes(*block_sizes)
    return (dot_unsupported(None, head_dim=q.shape[-1], block_q=block_q, block_kv=block_kv)
            or smem_unsupported(_smem_bytes(q.shape[-1], q.dtype.itemsize, block_q, block_kv),
                                f"block_sizes={tuple(block_sizes)} at head_dim {q.shape[-1]}"))


def _block_sizes(q_len, kv_len, block_sizes, head_dim, itemsize) -> tuple[int, int]:
    block_q, block_kv = BlockSizes(*(block_sizes or _default_blocks(head_dim, itemsize)))
    return block_size(block_q, q_len), block_size(block_kv, kv_len)


def _default_blocks(head_dim: int, itemsize: int) -> tuple[int, int] | None:
    """The largest blocks whose tiles fit a Triton program's shared memory."""
    candidates = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16))
    return fit_blocks(candidates, functools.partial(_smem_bytes, head_dim, itemsize))


def _smem_bytes(head_dim, itemsize, block_q, block_kv) -> int:
    """Shared memory of the largest of the three kernels: two resident tiles (q and dO, or
    k and v) and two streamed ones, ``NUM_STAGES`` deep."""
    resident, streamed = max((block_q, block_kv), (block_kv, block_q))
    return itemsize * head_dim * 2 * (resident + NUM_STAGES * streamed)


def _tpu_flash_attention(q, k, v, *, causal, segment_ids, scale, block_sizes=None):
    """Our layout and semantics through the upstream TPU (Mosaic) flash attention kernel.

    Called by ``flash_attention`` on TPU; tests call it directly on CPU under
    ``pltpu.force_tpu_interpret_mode()``. The upstream kernel has its own custom VJP.
    Arguments as in ``flash_attention`` (``scale`` already resolved to a float).
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu

    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    block_q, block_kv = BlockSizes(*(block_sizes or ()))
    q_pad, kv_pad = round_up(q_len, block_q), round_up(kv_len, block_kv)
    # Zero columns change no score and give output columns that are sliced off.
    d_pad = head_dim if head_dim <= _TPU_LANES else round_up(head_dim, _TPU_LANES)

    def to_upstream(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - head_dim)))
        return x.transpose(0, 2, 1, 3)

    # Grouped kv heads: the kernel wants one kv head per query head; autodiff of the
    # repeat sums each group's gradients back onto its kv head.
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    v = jnp.repeat(v, heads // kv_heads, axis=2)
    segments = None
    if segment_ids is not None or kv_pad != kv_len:
        q_seg = (jnp.zeros((batch, q_len), jnp.int32) if segment_ids is None
                 else segment_ids.astype(jnp.int32))
        kv_seg = jnp.zeros((batch, kv_len), jnp.int32) if segment_ids is None else q_seg
        # Ids below every real one: padded keys match no query, padded queries no key.
        lowest = jnp.min(q_seg)
        segments = tpu.SegmentIds(
            q=jnp.pad(q_seg, ((0, 0), (0, q_pad - q_len)), constant_values=lowest - 1),
            kv=jnp.pad(kv_seg, ((0, 0), (0, kv_pad - kv_len)), constant_values=lowest - 2))
    blocks = tpu.BlockSizes(
        block_q=block_q, block_k_major=block_kv, block_k=block_kv, block_b=1,
        block_q_major_dkv=block_q, block_k_major_dkv=block_kv, block_k_dkv=block_kv,
        block_q_dkv=block_q, block_k_major_dq=block_kv, block_k_dq=block_kv, block_q_dq=block_q)
    out = tpu.flash_attention(to_upstream(q, q_pad), to_upstream(k, kv_pad),
                              to_upstream(v, kv_pad), segment_ids=segments, causal=causal,
                              sm_scale=scale, block_sizes=blocks)
    return out[:, :, :q_len, :head_dim].transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, segment_ids, causal, scale, block_q, block_kv, has_segments, interpret):
    return _flash_fwd(q, k, v, segment_ids, causal, scale, block_q, block_kv, has_segments,
                      interpret)[0]


def _flash_fwd(q, k, v, segment_ids, causal, scale, block_q, block_kv, has_segments, interpret):
    q_seg = _pad_len(segment_ids, block_q, value=-1)
    kv_seg = (_pad_len(segment_ids, block_kv, value=-2) if segment_ids.shape[1] == k.shape[1]
              else jnp.zeros((k.shape[0], round_up(k.shape[1], block_kv)), jnp.int32))
    out, lse = _forward_call(q, k, v, q_seg, kv_seg, None, None, causal, scale, block_q, block_kv,
                             has_segments, interpret)
    return out, (q, k, v, segment_ids, out, lse)


def _forward_call(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, scale, block_q, block_kv, has_segments,
                  interpret):
    """The forward kernel on padded segment ids (and, for ring blocks, padded positions):
    ``(out [batch, q_len, heads, head_dim], lse [batch, heads, q_pad] float32)``."""
    batch, q_len, heads, head_dim = q.shape
    groups = heads // k.shape[2]
    qp, kp, vp = _pad_len(q, block_q), _pad_len(k, block_kv), _pad_len(v, block_kv)
    q_pad, kv_pad = qp.shape[1], kp.shape[1]
    explicit = q_pos is not None
    kernel = functools.partial(
        _forward_kernel, scale=scale, causal=causal, has_segments=has_segments,
        block_q=block_q, block_kv=block_kv, kv_len=k.shape[1], kv_blocks=kv_pad // block_kv, explicit=explicit,
        interpret=interpret)
    kv_full = pl.BlockSpec((None, kv_pad, None, head_dim), lambda b, h, i: (b, 0, h // groups, 0))
    q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
    rows = [pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)), pl.BlockSpec((None, kv_pad), lambda b, h, i: (b, 0))]
    out, lse = pallas_call(
        kernel,
        grid=(batch, heads, q_pad // block_q),
        in_specs=[*rows, *(rows if explicit else []), q_block, kv_full, kv_full],
        out_specs=[q_block, pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)],
        interpret=interpret,
        name="zjax_flash_attention_fwd",
    )(q_seg, kv_seg, *((q_pos, kv_pos) if explicit else ()), qp, kp, vp)
    return out[:, :q_len], lse


def _flash_bwd(causal, scale, block_q, block_kv, has_segments, interpret, residuals, dout):
    q, k, v, segment_ids, out, lse = residuals
    q_seg = _pad_len(segment_ids, block_q, value=-1)
    kv_seg = (_pad_len(segment_ids, block_kv, value=-2) if segment_ids.shape[1] == k.shape[1]
              else jnp.zeros((k.shape[0], round_up(k.shape[1], block_kv)), jnp.int32))
    # delta_t = sum_d dO * O: the row term of the softmax gradient, O(len) memory.
    delta = _pad_len(jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32),
                                out.astype(jnp.float32)), block_q, axis=2)
    dq, dk, dv = _backward_call(q, k, v, q_seg, kv_seg, None, None, dout, lse, delta, causal, scale, block_q,
                                block_kv, has_segments, interpret)
    return (match_cotangent(dq, q), match_cotangent(dk.astype(k.dtype), k),
            match_cotangent(dv.astype(v.dtype), v), None)


def _backward_call(q, k, v, q_seg, kv_seg, q_pos, kv_pos, dout, lse, delta, causal, scale, block_q, block_kv,
                   has_segments, interpret):
    """The two backward kernels given every query row's log-sum-exp and delta (``[batch,
    heads, q_pad]``): ``(dq in q's dtype, dk and dv float32)``."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    qp, kp, vp = _pad_len(q, block_q), _pad_len(k, block_kv), _pad_len(v, block_kv)
    q_pad, kv_pad = qp.shape[1], kp.shape[1]
    dop = _pad_len(dout, block_q)
    explicit = q_pos is not None
    positions = (q_pos, kv_pos) if explicit else ()
    common = dict(scale=scale, causal=causal, has_segments=has_segments, block_q=block_q,
                  block_kv=block_kv, kv_len=kv_len, explicit=explicit, interpret=interpret)

    q_block = pl.BlockSpec((None, block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
    row_block = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    kv_full = pl.BlockSpec((None, kv_pad, None, head_dim), lambda b, h, i: (b, 0, h // groups, 0))
    rows = [pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)), pl.BlockSpec((None, kv_pad), lambda b, h, i: (b, 0))]
    dq = pallas_call(
        functools.partial(_dq_kernel, kv_blocks=kv_pad // block_kv, **common),
        grid=(batch, heads, q_pad // block_q),
        in_specs=[*rows, *(rows if explicit else []), q_block, kv_full, kv_full, q_block, row_block, row_block],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        interpret=interpret,
        name="zjax_flash_attention_dq",
    )(q_seg, kv_seg, *positions, qp, kp, vp, dop, lse, delta)

    q_full = pl.BlockSpec((None, q_pad, None, head_dim), lambda b, h, j: (b, 0, h, 0))
    row_full = pl.BlockSpec((None, None, q_pad), lambda b, h, j: (b, h, 0))
    kv_block = pl.BlockSpec((None, block_kv, None, head_dim),
                            lambda b, h, j: (b, j, h // groups, 0))
    per_head = pl.BlockSpec((None, block_kv, None, head_dim), lambda b, h, j: (b, j, h, 0))
    per_head_shape = jax.ShapeDtypeStruct((batch, kv_pad, heads, head_dim), jnp.float32)
    cols = [pl.BlockSpec((None, q_pad), lambda b, h, j: (b, 0)), pl.BlockSpec((None, block_kv), lambda b, h, j: (b, j))]
    dk, dv = pallas_call(
        functools.partial(_dkv_kernel, q_blocks=q_pad // block_q, **common),
        grid=(batch, heads, kv_pad // block_kv),
        in_specs=[*cols, *(cols if explicit else []), q_full, kv_block, kv_block, q_full, row_full, row_full],
        out_specs=[per_head, per_head],
        out_shape=[per_head_shape, per_head_shape],
        interpret=interpret,
        name="zjax_flash_attention_dkv",
    )(q_seg, kv_seg, *positions, qp, kp, vp, dop, lse, delta)
    # Query heads of one group share a kv head: add their contributions up.
    dk = dk[:, :kv_len].reshape(batch, kv_len, kv_heads, groups, head_dim).sum(3)
    dv = dv[:, :kv_len].reshape(batch, kv_len, kv_heads, groups, head_dim).sum(3)
    return dq[:, :q_len], dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_len(x, block, value=0, axis=1):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, round_up(x.shape[axis], block) - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _mask(q_pos, kv_pos, kv_idx, q_seg, kv_seg, *, causal, has_segments, kv_len):
    mask = kv_idx[None, :] < kv_len
    if causal:
        mask = mask & (q_pos[:, None] >= kv_pos[None, :])
    if has_segments:
        mask = mask & (q_seg[:, None] == kv_seg[None, :])
    return mask


def _dot_t(a, b):
    """``a @ b.T`` accumulated in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """``a.T @ b`` accumulated in float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _position_refs(refs, explicit: bool):
    """``(q_seg, kv_seg, q_pos or None, kv_pos or None, *rest)`` of a kernel's refs: with
    ``explicit`` positions (ring attention's blocks) two position refs follow the segments."""
    if explicit:
        return refs
    return (*refs[:2], None, None, *refs[2:])


def _positions(pos_ref, rows, start, size):
    """Each row's position: read from ``pos_ref`` (explicit) or counted from ``start``."""
    if pos_ref is None:
        return start + jax.lax.broadcasted_iota(jnp.int32, (size,), 0)
    return pos_ref[...] if rows is None else pos_ref[rows]


def _traced(bound, interpret: bool):
    """A loop bound the interpreter sees as traced: in interpret mode inside ``shard_map``
    (vma checks), a ``fori_loop`` with static bounds is a scan whose carry must start with
    the varying axes its body gives it (jax 0.10.2 raises); a traced bound makes it a
    while loop, as the causal kernels' bounds already are. Compiled kernels keep theirs."""
    return bound + 0 * pl.program_id(0) if interpret and isinstance(bound, int) else bound


def _forward_kernel(*refs, scale, causal, has_segments, block_q, block_kv, kv_len, kv_blocks,
                    explicit=False, interpret=False):
    q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = \
        _position_refs(refs, explicit)
    i = pl.program_id(2)
    q = q_ref[...]
    q_seg = q_seg_ref[...]
    q_pos = _positions(q_pos_ref, None, i * block_q, block_q)

    def visit(j, carry):
        running_max, denom, acc = carry
        keys = pl.ds(j * block_kv, block_kv)
        kv_idx = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
        kv_pos = _positions(kv_pos_ref, keys, j * block_kv, block_kv)
        mask = _mask(q_pos, kv_pos, kv_idx, q_seg, kv_seg_ref[keys], causal=causal,
                     has_segments=has_segments, kv_len=kv_len)
        s = jnp.where(mask, _dot_t(q, k_ref[keys, :]) * scale, MASKED)
        new_max = jnp.maximum(running_max, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - new_max[:, None]), 0.0)
        correction = jnp.exp(running_max - new_max)
        denom = denom * correction + p.sum(axis=1)
        v = v_ref[keys, :]
        acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
        return new_max, denom, acc

    init = (jnp.full((block_q,), MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, q.shape[1]), jnp.float32))
    stop = kv_blocks if explicit else _kv_stop(i, causal, block_q, block_kv, kv_blocks)
    running_max, denom, acc = jax.lax.fori_loop(0, _traced(stop, interpret), visit, init)
    seen = denom > 0
    o_ref[...] = (acc / jnp.where(seen, denom, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, running_max + jnp.log(jnp.where(seen, denom, 1.0)), MASKED)


def _dq_kernel(*refs, scale, causal, has_segments, block_q, block_kv, kv_len, kv_blocks, explicit=False,
               interpret=False):
    q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = \
        _position_refs(refs, explicit)
    i = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...]
    q_pos = _positions(q_pos_ref, None, i * block_q, block_q)

    def visit(j, dq):
        keys = pl.ds(j * block_kv, block_kv)
        kv_idx = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
        kv_pos = _positions(kv_pos_ref, keys, j * block_kv, block_kv)
        mask = _mask(q_pos, kv_pos, kv_idx, q_seg, kv_seg_ref[keys], causal=causal,
                     has_segments=has_segments, kv_len=kv_len)
        k, v = k_ref[keys, :], v_ref[keys, :]
        p = jnp.where(mask, jnp.exp(_dot_t(q, k) * scale - lse[:, None]), 0.0)
        ds = p * (_dot_t(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    stop = kv_blocks if explicit else _kv_stop(i, causal, block_q, block_kv, kv_blocks)
    dq = jax.lax.fori_loop(0, _traced(stop, interpret), visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, causal, has_segments, block_q, block_kv, kv_len, q_blocks, explicit=False,
                interpret=False):
    (q_seg_ref, kv_seg_ref, q_pos_ref, kv_pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
     dv_ref) = _position_refs(refs, explicit)
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...]
    kv_idx = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    kv_pos = _positions(kv_pos_ref, None, j * block_kv, block_kv)

    def visit(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q_pos = _positions(q_pos_ref, rows, i * block_q, block_q)
        mask = _mask(q_pos, kv_pos, kv_idx, q_seg_ref[rows], kv_seg, causal=causal,
                     has_segments=has_segments, kv_len=kv_len)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p = jnp.where(mask, jnp.exp(_dot_t(q, k) * scale - lse_ref[rows][:, None]), 0.0)
        dv = dv + _t_dot(p.astype(do.dtype), do)
        ds = p * (_dot_t(do, v) - delta_ref[rows][:, None])
        return dk + _t_dot(ds.astype(q.dtype), q), dv

    # Causal: query blocks that end before this key block starts see none of it.
    start = (j * block_kv) // block_q if causal and not explicit else 0
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(start, _traced(q_blocks, interpret), visit, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _kv_stop(i, causal, block_q, block_kv, kv_blocks):
    """Key blocks a query block visits: all, or (causal) those starting at or before its last row."""
    if not causal:
        return kv_blocks
    return jnp.minimum(kv_blocks, ((i + 1) * block_q + block_kv - 1) // block_kv)
