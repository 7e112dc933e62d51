"""Attention over a sequence split across devices (the ``sequence`` mesh axis).

``attention(q, k, v, causal=..., segment_ids=..., impl=...)`` is softmax attention in
``jax.nn.dot_product_attention``'s layout (q ``[batch, len, heads, head_dim]``, k and v
``[batch, len, kv_heads, head_dim]``). Called inside a ``zjax.parallel.sharding.per_shard``
region whose ``length`` axis is split over ``sequence`` (the rule ``length: sequence``
and ``mesh.sequence`` > 1), it sees this device's part of the sequence and combines the
parts by the config's ``sequence_parallel``:

- ``ulysses`` (DeepSpeed-Ulysses): an all-to-all turns the sequence-split q, k, v into
  head-split whole sequences, attention runs on whole sequences for 1/P of the heads, and
  a second all-to-all turns the output back (4 all-to-alls forward). KV heads that do not
  divide by P are repeated to one per query head first (they then move as much as q).
- ``ring``: K/V blocks (with their positions and segment ids) rotate around the axis P - 1
  times while an online softmax accumulates each device's output; a custom VJP rotates
  them (and their gradients) again in the backward pass, so only this device's blocks are
  saved. Positions may be in any order: a model puts its sequence in ``zigzag`` order
  (``zigzag_order``) so that causal attention gives every device the same work.
- ``all_gather``: K and V (and the segment ids) are all-gathered; each device attends its
  queries, at their global positions, to the whole sequence (the simple baseline).

Elsewhere (no mesh, ``sequence`` of size 1) it is plain attention; with ``impl`` other
than ``xla`` the flash-attention kernel computes it where queries and keys are the same
positions (always for ``ulysses``), and ring attention runs the flash kernels per block with
explicit positions, carrying each block's log-sum-exp (``all_gather`` stays XLA's).
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import pallas_kernels
from zjax.errors import ConfigError
from zjax.parallel.sharding import current_rules, model_parallel_axes, split_axis

MODES = ("ulysses", "all_gather", "ring")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("zjax_sequence_parallel", default="ulysses")


@contextlib.contextmanager
def sequence_parallel(mode: str):
    """Sets how ``attention`` combines a split sequence while tracing (the train step sets the config's)."""
    if mode not in MODES:
        raise ConfigError(f"sequence_parallel={mode!r}: use one of {', '.join(MODES)}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              segment_ids: jax.Array | None = None, impl: str = "xla", mode: str | None = None,
              positions: jax.Array | None = None) -> jax.Array:
    """Softmax attention of this device's queries over the whole (maybe split) sequence.

    Args:
      q: ``[batch, len, heads, head_dim]`` (this device's part of the sequence in a region).
      k: ``[batch, len, kv_heads, head_dim]``, ``kv_heads`` dividing ``heads``.
      v: like ``k``.
      causal: a query sees keys at its position and before.
      segment_ids: int ``[batch, len]``; a query sees only keys of its own segment.
      impl: ``xla`` or a ``pallas_kernels`` impl for the flash-attention kernel.
      mode: ``ulysses``, ``all_gather`` or ``ring``; default the config's ``sequence_parallel``.
      positions: int ``[len]`` (or ``[batch, len]``), the global positions of this device's
        tokens for ``ring`` when the sequence was reordered (``zigzag``); default contiguous.

    Returns:
      ``[batch, len, heads, head_dim]`` in ``q``'s dtype.

    Example:
      >>> q = jnp.ones((1, 4, 2, 8))
      >>> attention(q, q, q).shape
      (1, 4, 2, 8)
    """
    seq = split_axis("length")
    if seq is None:
        return _attend(q, k, v, causal, segment_ids, segment_ids, 0, impl)
    mode = mode or _MODE.get()
    if mode not in MODES:
        raise ConfigError(f"sequence_parallel={mode!r}: use one of {', '.join(MODES)}")
    if mode == "ring":
        if positions is None:
            positions = lax.axis_index(seq) * q.shape[1] + jnp.arange(q.shape[1], dtype=jnp.int32)
        pos = jnp.broadcast_to(positions, q.shape[:2])
        return ring_attention(q, k, v, pos, pos, segment_ids, segment_ids, seq, causal, impl)
    whole_ids = None if segment_ids is None else lax.all_gather(segment_ids, seq, axis=1, tiled=True)
    if mode == "all_gather":
        k = lax.all_gather(k, seq, axis=1, tiled=True)
        v = lax.all_gather(v, seq, axis=1, tiled=True)
        return _attend(q, k, v, causal, segment_ids, whole_ids, lax.axis_index(seq) * q.shape[1], "xla")
    shards = lax.axis_size(seq)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % shards:
        raise ConfigError(f"sequence_parallel=ulysses needs the heads on a device ({heads}, after tensor "
                          f"parallelism) to divide by mesh.sequence={shards}; use sequence_parallel: all_gather "
                          "or a sequence size that divides the heads")
    if kv_heads % shards:
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
    q, k, v = (lax.all_to_all(x, seq, 2, 1, tiled=True) for x in (q, k, v))
    out = _attend(q, k, v, causal, whole_ids, whole_ids, 0, impl)
    return lax.all_to_all(out, seq, 1, 2, tiled=True)


def _attend(q, k, v, causal, q_ids, kv_ids, q_offset, impl):
    """Attention of queries at positions ``q_offset + i`` over keys at ``j``."""
    if impl != "xla" and q.shape[1] == k.shape[1] and isinstance(q_offset, int) and q_offset == 0:
        return pallas_kernels.flash_attention(q, k, v, causal=causal, segment_ids=q_ids, impl=impl)
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    grouped = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    mask = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        mask = mask & ((q_offset + jnp.arange(q_len))[:, None] >= jnp.arange(kv_len)[None, :])[None]
    if q_ids is not None:
        mask = mask & (q_ids[:, :, None] == kv_ids[:, None, :])
    scores = jnp.where(mask[:, None, None], scores / math.sqrt(head_dim), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, q_len, heads, head_dim)


# --- ring attention ---------------------------------------------------------------------------


def zigzag(length: int, shards: int) -> np.ndarray:
    """The zig-zag order of ``length`` positions over ``shards`` devices: the sequence in
    ``2 * shards`` chunks, device ``p`` holding chunks ``p`` and ``2 * shards - 1 - p``, so
    that under a causal mask every device has the same work (Brandon et al., Striped /
    zig-zag ring attention). ``x[:, zigzag(...)]`` reorders a sequence; positions go with it."""
    chunk = length // (2 * shards)
    order = []
    for p in range(shards):
        order.extend(range(p * chunk, (p + 1) * chunk))
        order.extend(range((2 * shards - 1 - p) * chunk, (2 * shards - p) * chunk))
    # a host constant: its inverse (np.argsort) costs nothing in the compiled step
    return np.asarray(order, np.int32)


def _varying_axes(x) -> frozenset | None:
    """The manual axes ``x`` varies over, or None when nothing tracks them (no vma checks)."""
    kind = getattr(jax.typeof(x), "manual_axis_type", None)
    return None if kind is None else frozenset(kind.varying)


def _varying(tree, axis: str, like=()):
    """``tree``'s arrays marked as varying over ``axis`` and every axis they or ``like``'s
    arrays vary over, as a loop carry that the loop makes varying must start (shard_map's
    vma checks)."""
    leaves = jax.tree.leaves(tree)
    found = [_varying_axes(x) for x in leaves + jax.tree.leaves(like)]
    if any(v is None for v in found):
        return tree  # not under vma checks: nothing to mark
    axes = {axis}.union(*found)

    def mark(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(mark, tree)


def zigzag_order(length: int) -> np.ndarray | None:
    """The zig-zag order a model should put its sequence in before a region that runs ring
    attention (``sequence_parallel: ring`` with the ``length`` axis split over a mesh axis
    of size P, and ``length`` a multiple of 2P); None otherwise (keep the order)."""
    if _MODE.get() != "ring":
        return None
    shards = model_parallel_axes().get(current_rules().get("length"), 1)
    if shards == 1 or length % (2 * shards):
        return None
    return zigzag(length, shards)


def ring_attention(q, k, v, q_pos, kv_pos, q_ids, kv_ids, axis: str, causal: bool, impl: str = "xla"):
    """Attention of this device's queries over every device's K/V block, the blocks rotated
    around ``axis`` (P - 1 permutes forward); a custom VJP rotates them again in the backward
    pass instead of keeping them, so what is saved is this device's q, k, v, output and
    log-sum-exp: O(S/P). ``*_pos`` are the tokens' global positions (any order, e.g. zig-zag);
    ``*_ids`` segment ids or None. With ``impl`` other than ``xla`` each block runs the
    flash-attention kernels with explicit positions (``pallas_kernels.attention.flash_block_*``):
    the forward merges the blocks' outputs by their log-sum-exps, the backward hands each
    block the final log-sum-exp."""
    impl = "xla" if impl == "xla" else pallas_kernels.attention.block_impl(q, impl)
    if impl != "xla":
        return _ring_flash(q, k, v, q_pos, kv_pos, q_ids, kv_ids, axis, causal, impl == "interpret")
    shards = lax.axis_size(axis)
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_ids = jnp.zeros(q_pos.shape, jnp.int32) if q_ids is None else q_ids
    kv_ids = jnp.zeros(kv_pos.shape, jnp.int32) if kv_ids is None else kv_ids

    def block_scores(q, k, q_pos, kp, q_ids, kid):
        b, t, h, d = q.shape
        g = h // k.shape[2]
        s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, k.shape[2], g, d), k,
                       preferred_element_type=jnp.float32) * scale
        mask = q_ids[:, :, None] == kid[:, None, :]
        if causal:
            mask = mask & (q_pos[:, :, None] >= kp[:, None, :])
        return jnp.where(mask[:, None, None], s, -jnp.inf)

    def forward(q, k, v, q_pos, kv_pos, q_ids, kv_ids):
        b, t, h, d = q.shape
        kvh = k.shape[2]
        out = jnp.zeros((b, kvh, h // kvh, t, d), jnp.float32)
        peak = jnp.full((b, kvh, h // kvh, t), -jnp.inf, jnp.float32)
        total = jnp.zeros((b, kvh, h // kvh, t), jnp.float32)
        def accumulate(carry, block):
            out, peak, total = carry
            kb, vb, kp, kid = block
            s = block_scores(q, kb, q_pos, kp, q_ids, kid)
            new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
            safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
            p = jnp.exp(s - safe[..., None])
            correction = jnp.exp(jnp.where(jnp.isfinite(peak), peak - safe, -jnp.inf))
            total = total * correction + jnp.sum(p, axis=-1)
            out = out * correction[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p.astype(vb.dtype), vb,
                                                           preferred_element_type=jnp.float32)
            return out, new_peak, total

        def step(carry, _):
            # one block at a time (a loop, so XLA cannot keep every block's scores alive at once)
            acc, block = carry
            acc = accumulate(acc, block)
            return (acc, tuple(lax.ppermute(x, axis, perm) for x in block)), None

        block = _varying((k, v, kv_pos, kv_ids), axis, like=(q, k, v))
        acc = _varying((out, peak, total), axis, like=(q, k, v))
        (acc, block), _ = lax.scan(step, (acc, block), None, length=shards - 1)
        out, peak, total = accumulate(acc, block)
        safe_total = jnp.where(total > 0, total, 1.0)
        lse = jnp.where(total > 0, jnp.log(safe_total) + jnp.where(jnp.isfinite(peak), peak, 0.0), -jnp.inf)
        o = (out / safe_total[..., None]) * (total > 0)[..., None]
        return o, lse

    def to_bthd(o, like):
        b, kvh, g, t, d = o.shape
        return jnp.moveaxis(o, 3, 1).reshape(b, t, kvh * g, d).astype(like.dtype)

    @jax.custom_vjp
    def attend(q, k, v, q_pos, kv_pos, q_ids, kv_ids):
        return to_bthd(forward(q, k, v, q_pos, kv_pos, q_ids, kv_ids)[0], q)

    def fwd(q, k, v, q_pos, kv_pos, q_ids, kv_ids):
        o, lse = forward(q, k, v, q_pos, kv_pos, q_ids, kv_ids)
        return to_bthd(o, q), (q, k, v, o, lse, q_pos, kv_pos, q_ids, kv_ids)

    def bwd(res, d_out):
        q, k, v, o, lse, q_pos, kv_pos, q_ids, kv_ids = res
        b, t, h, d = q.shape
        kvh = k.shape[2]
        do = jnp.moveaxis(d_out.reshape(b, t, kvh, h // kvh, d), 1, 3).astype(jnp.float32)  # b k g t d
        delta = jnp.sum(do * o, axis=-1)  # b k g t
        qg = q.reshape(b, t, kvh, h // kvh, d)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

        def step(carry, _):
            dq, kb, vb, kp, kid, dk, dv = carry
            s = block_scores(q, kb, q_pos, kp, q_ids, kid)
            p = jnp.where(jnp.isfinite(s), jnp.exp(s - finite_lse[..., None]), 0.0)  # b k g t s
            dv = dv + jnp.einsum("bkgts,bkgtd->bskd", p, do)
            dp = jnp.einsum("bkgtd,bskd->bkgts", do, vb.astype(jnp.float32))
            ds = p * (dp - delta[..., None]) * scale
            dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb.astype(jnp.float32))
            dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, qg.astype(jnp.float32))
            # the block and its gradient travel on together; after P hops both are home
            return (dq, *(lax.ppermute(x, axis, perm) for x in (kb, vb, kp, kid, dk, dv))), None

        carry = _varying((jnp.zeros(qg.shape, jnp.float32), k, v, kv_pos, kv_ids,
                          jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)), axis,
                         like=(q, k, v, d_out))
        (dq, _, _, _, _, dk, dv), _ = lax.scan(step, carry, None, length=shards)
        return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None

    attend.defvjp(fwd, bwd)
    return attend(q, k, v, q_pos, kv_pos, q_ids, kv_ids)


def _ring_flash(q, k, v, q_pos, kv_pos, q_ids, kv_ids, axis: str, causal: bool, interpret: bool):
    """``ring_attention`` with the flash-attention kernels per block."""
    from pallas_kernels.attention import flash_block_backward, flash_block_forward
    from pallas_kernels.dispatch import MASKED

    shards = lax.axis_size(axis)
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_ids = jnp.zeros(q_pos.shape, jnp.int32) if q_ids is None else q_ids
    kv_ids = jnp.zeros(kv_pos.shape, jnp.int32) if kv_ids is None else kv_ids
    kernel = dict(causal=causal, scale=scale, interpret=interpret)

    def rows(w):  # [b, h, t] -> [b, t, h, 1]
        return jnp.moveaxis(w, 1, 2)[..., None]

    def forward(q, k, v, q_pos, kv_pos, q_ids, kv_ids):
        b, t, h, d = q.shape

        def merge(acc, block):
            out, lse = acc
            kb, vb, kp, kid = block
            block_out, block_lse = flash_block_forward(q, kb, vb, q_pos, kp, q_ids, kid, **kernel)
            new = jnp.logaddexp(lse, block_lse)
            out = out * rows(jnp.exp(lse - new)) + block_out.astype(jnp.float32) * rows(jnp.exp(block_lse - new))
            return out, new

        def step(carry, _):
            acc, block = carry
            return (merge(acc, block), tuple(lax.ppermute(x, axis, perm) for x in block)), None

        block = _varying((k, v, kv_pos, kv_ids), axis, like=(q, k, v))
        acc = _varying((jnp.zeros((b, t, h, d), jnp.float32), jnp.full((b, h, t), MASKED, jnp.float32)), axis,
                       like=(q, k, v))
        (acc, block), _ = lax.scan(step, (acc, block), None, length=shards - 1)
        out, lse = merge(acc, block)
        return out.astype(q.dtype), lse

    @jax.custom_vjp
    def attend(q, k, v, q_pos, kv_pos, q_ids, kv_ids):
        return forward(q, k, v, q_pos, kv_pos, q_ids, kv_ids)[0]

    def fwd(q, k, v, q_pos, kv_pos, q_ids, kv_ids):
        out, lse = forward(q, k, v, q_pos, kv_pos, q_ids, kv_ids)
        return out, (q, k, v, out, lse, q_pos, kv_pos, q_ids, kv_ids)

    def bwd(res, d_out):
        q, k, v, out, lse, q_pos, kv_pos, q_ids, kv_ids = res
        delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))

        def step(carry, _):
            dq, kb, vb, kp, kid, dk, dv = carry
            dq_b, dk_b, dv_b = flash_block_backward(q, kb, vb, q_pos, kp, q_ids, kid, d_out, lse, delta, **kernel)
            # the block and its gradient travel on together; after P hops both are home
            moved = (kb, vb, kp, kid, dk + dk_b, dv + dv_b)
            return (dq + dq_b, *(lax.ppermute(x, axis, perm) for x in moved)), None

        carry = _varying((jnp.zeros(q.shape, jnp.float32), k, v, kv_pos, kv_ids,
                          jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)), axis,
                         like=(q, k, v, d_out))
        (dq, _, _, _, _, dk, dv), _ = lax.scan(step, carry, None, length=shards)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None

    attend.defvjp(fwd, bwd)
    return attend(q, k, v, q_pos, kv_pos, q_ids, kv_ids)
