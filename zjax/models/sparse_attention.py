"""Block-sparse attention with DeepSpeed's sparsity layouts.

DeepSpeed's sparse attention (``deepspeed/ops/sparse_attention``) splits the ``[seq, seq]``
score matrix into ``block x block`` tiles and computes only the tiles a *layout* marks: an
int ``[num_heads, num_blocks, num_blocks]`` array built by a ``SparsityConfig`` subclass
(``deepspeed/ops/sparse_attention/sparsity_config.py``). This module has the same layouts
and an attention that computes exactly masked dense attention over them:

- one frozen dataclass per DeepSpeed config class, each with a ``mode`` and DeepSpeed's
  parameters (keyword arguments, DeepSpeed's names) and defaults: ``DenseSparsity`` (``"dense"``, ``DenseSparsityConfig``),
  ``FixedSparsity`` (``"fixed"``), ``VariableSparsity`` (``"variable"``),
  ``BigBirdSparsity`` (``"bigbird"``), ``BSLongformerSparsity`` (``"bslongformer"``) and
  ``LocalSlidingWindowSparsity`` (``"local"``). They check their values when built and
  raise ``zjax.errors.ConfigError`` naming the key, the value and what would work;
  ``sparsity_config(mode, **fields)`` builds one by name.
- ``make_layout(config, seq_len)``: the layout DeepSpeed's ``make_layout`` gives, in numpy
  (``int64`` 0/1, as DeepSpeed's ``torch.int64``). The code follows DeepSpeed's functions
  line by line (vectorized where DeepSpeed loops over cells). One difference on purpose:
  the random blocks of ``variable`` and ``bigbird`` come from
  ``np.random.default_rng(config.seed)`` instead of Python's unseeded ``random``, so a
  seed gives one layout on every host and every run.
- ``block_sparse_attention(q, k, v, layout, block=...)``: softmax attention where query
  ``t`` of head ``h`` sees key ``s`` iff ``layout[h, t // block, s // block]`` (and, with
  ``causal``, ``s <= t``). ``impl="xla"`` is masked dense attention (the reference);
  ``"interpret"`` and ``"pallas"`` run JAX's splash attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``), which skips the empty blocks
  of its own tiling forward and backward.
- ``map_deepspeed_sparse_attention(block)``: a DeepSpeed ``sparse_attention`` config block
  to one of the dataclasses.

DeepSpeed's ``"unidirectional"`` is a property of the *layout* (no block above the
diagonal, triangular blocks inside local windows); it does not mask tokens inside a
diagonal block, DeepSpeed users pass an ``attn_mask`` for that. Here ``causal=True`` is
that token-level mask.

Example:
  >>> import jax, jax.numpy as jnp
  >>> config = FixedSparsity(num_heads=2, block=16, num_local_blocks=2)
  >>> layout = make_layout(config, seq_len=64)
  >>> layout.shape
  (2, 4, 4)
  >>> layout[0].tolist()
  [[1, 1, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
  >>> q = jax.random.normal(jax.random.key(0), (1, 64, 2, 8))
  >>> block_sparse_attention(q, q, q, layout, block=16).shape
  (1, 64, 2, 8)
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

from pallas_kernels import dispatch
from zjax.config.sparsity import (  # the configs and layouts, re-exported
    ATTENTIONS, DEEPSPEED_KEYS, SPLASH_BLOCK, BigBirdSparsity, BSLongformerSparsity, DenseSparsity, FixedSparsity,
    LocalSlidingWindowSparsity, SparsityConfig, VariableSparsity, _check_int, _log_once, make_layout,
    map_deepspeed_sparse_attention, sparsity_config,
)
from zjax.errors import ConfigError

__all__ = ["ATTENTIONS", "DEEPSPEED_KEYS", "SPLASH_BLOCK", "BigBirdSparsity", "BSLongformerSparsity", "DenseSparsity",
           "FixedSparsity", "LocalSlidingWindowSparsity", "SparsityConfig", "VariableSparsity", "block_sparse_attention",
           "make_layout", "map_deepspeed_sparse_attention", "sparsity_config"]


# --------------------------------------------------------------------------- attention

def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout, *, block: int,
                           causal: bool = False, scale: float | None = None,
                           impl: str = "auto") -> jax.Array:
    """Softmax attention over the blocks a sparsity layout marks.

    Query ``t`` of head ``h`` attends key ``s`` iff ``layout[h, t // block, s // block]``
    is nonzero and, with ``causal``, ``s <= t``: exactly
    ``softmax(where(mask, q k^T * scale, -inf)) v``.

    Args:
      q: ``[batch, seq, heads, head_dim]``.
      k: ``[batch, seq, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (query head
        ``h`` reads kv head ``h // (heads // kv_heads)``).
      v: like ``k``.
      layout: ``[heads or 1, seq // block, seq // block]``, e.g. from ``make_layout``
        (a layout of one head serves every head). The kernel paths need it concrete
        (a numpy array, not traced); the ``"xla"`` path also takes a traced one.
      block: the layout's block side in tokens.
      causal: also mask keys after the query (DeepSpeed's ``unidirectional`` layouts
        mask only whole blocks; this masks the tokens inside the diagonal blocks).
      scale: multiplies the scores; default ``1 / sqrt(head_dim)``.
      impl: ``"xla"``: masked dense attention (the mask is the layout broadcast over
        ``block x block`` tiles, never materialised per token); computes every block.
        ``"interpret"``: JAX's splash attention kernel in Pallas interpret mode (any
        backend; slow, for tests). ``"pallas"``: the same kernel compiled, TPU only (splash
        attention is a Mosaic kernel; on GPU there is no kernel and this raises).
        ``"auto"``: ``"pallas"`` on TPU with a concrete layout, else ``"xla"``.
        The kernel's tiles are ``SPLASH_BLOCK`` = 128 tokens (``block`` when that is a
        multiple of 128, up to 512); it skips every tile the layout leaves empty, in the
        forward and in its own backward kernels (``dq``, ``dk``/``dv``), and reads a
        partly filled tile's token mask from memory. The sequence is padded to whole
        tiles and the padding masked.

    Returns:
      ``[batch, seq, heads, head_dim]`` in ``q``'s dtype (scores and softmax in float32).
      A query row that sees no key (a layout row with no block, or only blocks after
      it under ``causal``) gets zeros, and its gradients are zero; never NaN.

    Raises:
      ConfigError: shapes that do not fit one another, the layout or ``block``; an unknown
        ``impl``; ``"pallas"`` off TPU; a traced layout on a kernel path.
    """
    layout_shape = _check_inputs(q, k, v, layout, block)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    impl = _resolve_impl(impl, layout)
    if impl == "xla":
        return _xla_attention(q, k, v, jnp.asarray(layout), block, causal, scale)
    heads = q.shape[2]
    layout = np.broadcast_to(np.asarray(layout) != 0, (heads,) + layout_shape[1:])
    return _splash_attention(q, k, v, layout, block, causal, scale, interpret=impl == "interpret")


def _check_inputs(q, k, v, layout, block) -> tuple[int, ...]:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ConfigError(f"block_sparse_attention: q {q.shape}, k {k.shape}, v {v.shape}; need q "
                          "[batch, seq, heads, head_dim] and k, v both [batch, seq, kv_heads, head_dim]")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ConfigError(f"block_sparse_attention: q {q.shape} and k {k.shape} differ in batch, "
                          "seq or head_dim (self-attention: one sequence for queries and keys)")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ConfigError(f"block_sparse_attention: kv_heads={kv_heads} must divide heads={heads}")
    _check_int("block", block, 1)
    seq = q.shape[1]
    shape = tuple(np.shape(layout))
    if seq % block:
        raise ConfigError(f"block_sparse_attention: seq={seq} is not a multiple of block={block}; "
                          "pad the sequence or use the block the layout was made with")
    nb = seq // block
    if len(shape) != 3 or shape[0] not in (1, heads) or shape[1:] != (nb, nb):
        raise ConfigError(f"block_sparse_attention: layout of shape {shape} does not fit seq={seq}, "
                          f"block={block}, heads={heads}; need [{heads} or 1, {nb}, {nb}] "
                          f"(make_layout(config, seq_len={seq}, num_heads={heads}) with block {block})")
    return shape


def _resolve_impl(impl: str, layout) -> str:
    if impl not in dispatch.IMPLS:
        raise ConfigError(f"block_sparse_attention: impl={impl!r} is not an implementation; use one "
                          f"of {dispatch.IMPLS}")
    traced = isinstance(layout, jax.core.Tracer)
    here = dispatch.backend()
    if impl == "auto":
        if here == "tpu" and not traced:
            return "pallas"
        reason = ("the layout is traced" if traced else
                  f"splash attention is a TPU kernel and the backend is {here!r}")
        _log_once(f"block_sparse_attention: impl='auto' uses masked dense XLA attention ({reason})")
        return "xla"
    if impl == "pallas" and here != "tpu":
        raise ConfigError(f"block_sparse_attention: impl='pallas' runs splash attention, a TPU "
                          f"(Mosaic) kernel, but the default backend is {here!r}; use impl='xla' "
                          "(masked dense attention) or impl='interpret' (the kernel interpreted)")
    if impl != "xla" and traced:
        raise ConfigError(f"block_sparse_attention: impl={impl!r} needs the layout as a concrete "
                          "array (the kernel's block lists are built from it in numpy); build it "
                          "with make_layout outside jit and close over it, or use impl='xla'")
    return impl


def _xla_attention(q, k, v, layout, block, causal, scale):
    """Masked dense attention, the reference: scores ``[batch, kv_heads, groups, nb, block,
    nb, block]`` masked by the layout broadcast over each tile."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups, nb = heads // kv_heads, seq // block
    qg = q.reshape(batch, nb, block, kv_heads, groups, head_dim)
    kb = k.reshape(batch, nb, block, kv_heads, head_dim)
    scores = jnp.einsum("bitkgd,bjskd->bkgitjs", qg, kb, preferred_element_type=jnp.float32) * scale
    allowed = jnp.broadcast_to(layout != 0, (heads, nb, nb)).reshape(kv_heads, groups, nb, 1, nb, 1)
    if causal:
        tokens = jnp.arange(seq).reshape(nb, block)
        allowed = allowed & (tokens[:, :, None, None] >= tokens[None, None, :, :])
    scores = jnp.where(allowed, scores, -jnp.inf)
    # Softmax over the (key block, key) axes; a row with no key keeps max 0 and sum 0.
    peak = jnp.max(scores, axis=(-2, -1), keepdims=True)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    probs = jnp.exp(scores - peak)  # exactly 0 where masked, with a 0 gradient
    total = jnp.sum(probs, axis=(-2, -1), keepdims=True)
    probs = probs / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgitjs,bjskd->bitkgd", probs.astype(v.dtype), v.reshape(kb.shape),
                     preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


@dataclasses.dataclass(frozen=True, eq=True)
class _LayoutTokenMask(splash_masks.Mask):
    """One head's token mask ``[padded, padded]`` as a splash attention ``Mask``, computed
    from its block layout on demand (splash's mask processing reads it tile by tile; no
    ``[seq, seq]`` array exists). Equal layouts give equal (and equally hashed) masks,
    which splash processes and stores once.

    A row that sees no key (padding, or an empty layout row) is given its own position as
    a key so that the kernel's softmax stays finite; ``block_sparse_attention`` zeroes
    those rows' output, so that key gets a zero gradient.
    """

    layout_bytes: bytes
    nb: int
    block: int
    seq: int
    padded: int
    causal: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.padded, self.padded)

    @functools.cached_property
    def _layout(self) -> np.ndarray:
        return np.frombuffer(self.layout_bytes, np.bool_).reshape(self.nb, self.nb)

    @functools.cached_property
    def empty_rows(self) -> np.ndarray:
        return ~_rows_with_keys(self._layout, self.block, self.seq, self.padded, self.causal)

    def __getitem__(self, idx) -> np.ndarray:
        rows, cols = idx
        squeeze = []
        if isinstance(rows, (int, np.integer)):
            rows, squeeze = slice(rows, rows + 1), squeeze + [0]
        if isinstance(cols, (int, np.integer)):
            cols, squeeze = slice(cols, cols + 1), squeeze + [1]
        r = np.arange(self.padded)[rows][:, None]
        c = np.arange(self.padded)[cols][None, :]
        real = (r < self.seq) & (c < self.seq)
        mask = real & self._layout[np.minimum(r // self.block, self.nb - 1),
                                   np.minimum(c // self.block, self.nb - 1)]
        if self.causal:
            mask &= c <= r
        mask |= self.empty_rows[r] & (c == r)
        return mask.squeeze(tuple(squeeze)) if squeeze else mask


def _rows_with_keys(layout: np.ndarray, block: int, seq: int, padded: int, causal: bool) -> np.ndarray:
    """bool ``[padded]``: whether each query row (of one head) sees any key."""
    nb = layout.shape[0]
    rows = np.arange(padded)
    block_row = np.minimum(rows // block, nb - 1)
    if causal:
        # the first key block of each block row; a row sees a key iff it starts at or before it
        first = np.where(layout.any(axis=1), layout.argmax(axis=1), nb) * block
        seen = first[block_row] <= rows
    else:
        seen = layout.any(axis=1)[block_row]
    return seen & (rows < seq)


def _splash_tile(block: int) -> int:
    return block if block % SPLASH_BLOCK == 0 and block <= 4 * SPLASH_BLOCK else SPLASH_BLOCK


@functools.lru_cache(maxsize=32)
def _splash_kernel(layout_bytes: bytes, heads: int, nb: int, block: int, seq: int, causal: bool,
                   interpret: bool):
    """The splash kernel for one layout (cached: building its block lists walks every tile),
    the padded length, and bool ``[seq, heads]``: whether each query row sees a key."""
    tile = _splash_tile(block)
    padded = -(-seq // tile) * tile
    layout = np.frombuffer(layout_bytes, np.bool_).reshape(heads, nb, nb)
    per_head = [_LayoutTokenMask(np.ascontiguousarray(layout[h]).tobytes(), nb, block, seq, padded,
                                 causal) for h in range(heads)]
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                              block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                              block_q_dq=tile, block_kv_dq=tile)
    kernel = splash.make_splash_mha(splash_masks.MultiHeadMask(per_head), head_shards=1,
                                    q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    seen = ~np.stack([m.empty_rows[:seq] for m in per_head], axis=1)
    return kernel, padded, seen


def _splash_attention(q, k, v, layout: np.ndarray, block, causal, scale, *, interpret):
    """``block_sparse_attention`` through splash attention (its own custom VJP)."""
    batch, seq, heads, head_dim = q.shape
    nb = seq // block
    kernel, padded, seen = _splash_kernel(np.ascontiguousarray(layout).tobytes(), heads, nb, block,
                                          seq, bool(causal), bool(interpret))

    def heads_first(x):  # [batch, seq, h, d] -> [batch, h, padded, d]
        return jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                           heads_first(v))
    out = out.transpose(0, 2, 1, 3)[:, :seq]
    # Rows that see no key ran on a stand-in key: zero them (their cotangent is then zero too).
    return jnp.where(seen[None, :, :, None], out, 0).astype(q.dtype)
