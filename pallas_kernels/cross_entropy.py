"""Cross entropy over the vocabulary in chunks, so full float32 logits never exist.

Two implementations of the same chunked computation, each with a ``jax.custom_vjp``:

- a Pallas kernel (``impl="pallas" | "interpret"``), written in the Triton style of the
  other kernels here. The forward kernel runs one program per block of rows and walks
  the vocabulary chunk by chunk with an online max and log-sum-exp, saving only the
  float32 log-sum-exp of every row. The backward pass is two kernels that recompute
  each chunk's logits from it: one per row block (``d hidden``, summed over chunks),
  one per vocabulary chunk (``d w_vocab``, summed over row blocks). Rows and the
  vocabulary are padded to whole blocks; padded columns are masked out.
- an XLA ``lax.fori_loop`` over vocabulary chunks (``impl="xla"``, and ``"auto"``
  where the kernel cannot run), whose last chunk is shifted left to stay inside the
  vocabulary instead of padding ``w_vocab``.

Either way the largest temporary is a ``[rows, chunk]`` (kernel: ``[block_rows,
chunk]``) tile of logits instead of ``[rows, vocab]``. The kernel's programs hold whole
``d_model`` rows (``[block_rows, d_model]`` and ``[d_model, chunk]`` tiles), so the
default blocks shrink with ``d_model`` to fit a Triton program's shared memory, and a
``d_model`` for which even 16x16 blocks do not fit is served by the XLA loop under
``"auto"`` (splitting the contraction into chunks as well would lift that limit).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    MASKED, MIN_BLOCK, NUM_STAGES, block_size, dot_unsupported, fit_blocks, match_cotangent,
    pallas_call, resolve_impl, round_up, smem_unsupported,
)

DEFAULT_CHUNK = 8192
# The kernel's (block_rows, chunk) from largest to smallest: the first whose tiles fit a
# Triton program's shared memory at the call's d_model is the default; both are then
# clamped to the call's (padded) shape.
KERNEL_BLOCKS = ((64, 128), (32, 128), (32, 64), (16, 64), (32, 32), (16, 32), (16, 16))


def softmax_cross_entropy(hidden: jax.Array, w_vocab: jax.Array, labels: jax.Array,
                          impl: str = "auto", chunk: int | None = None, *,
                          block_rows: int | None = None) -> jax.Array:
    """Per-token ``logsumexp(hidden @ w_vocab) - (hidden @ w_vocab)[label]`` in float32.

    Args:
      hidden: ``[..., d_model]`` final hidden states (any float dtype).
      w_vocab: ``[d_model, vocab]`` output projection (for tied embeddings pass
        ``embedding.T``).
      labels: int ``[...]`` target ids in ``[0, vocab)``.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``):
        the Pallas kernel, or the chunked XLA loop for ``"xla"``.
      chunk: vocabulary columns per step, in ``[1, vocab]``; default
        ``min(vocab, 8192)`` for the XLA loop and, for the kernel, the largest of
        ``KERNEL_BLOCKS`` that fits shared memory at this ``d_model`` (128 at most; on
        GPU the kernel's chunk must be a power of two of at least 16). ``chunk=vocab``
        in the XLA loop is the full-logits computation.
      block_rows: the kernel's rows per program; by default chosen with ``chunk`` (64 at
        most), clamped to the number of rows (ignored by the XLA loop).

    Returns:
      float32 ``[...]``: the loss of every token (mask and average it yourself).

    Example:
      >>> import jax.numpy as jnp
      >>> h, w = jnp.ones((2, 4)), jnp.zeros((4, 10))
      >>> softmax_cross_entropy(h, w, jnp.array([1, 2]), chunk=3)
      Array([2.3025851, 2.3025851], dtype=float32)
      >>> softmax_cross_entropy(h, w, jnp.array([1, 2]), impl="interpret", chunk=3)
      Array([2.3025851, 2.3025851], dtype=float32)
    """
    d_model, vocab = w_vocab.shape
    if hidden.shape[-1] != d_model or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"softmax_cross_entropy: hidden {hidden.shape}, w_vocab "
                         f"{w_vocab.shape}, labels {labels.shape}; need hidden [..., d], "
                         "w_vocab [d, vocab], labels [...]")
    if chunk is not None and not 0 < int(chunk) <= vocab:
        raise ValueError(f"softmax_cross_entropy: chunk={chunk} must be in [1, vocab={vocab}]")
    if block_rows is not None and not int(block_rows) > 0:
        raise ValueError(f"softmax_cross_entropy: block_rows={block_rows} must be a positive "
                         "int, or None for the default")
    rows = math.prod(labels.shape)
    hidden2 = hidden.reshape(rows, d_model)
    labels1 = labels.reshape(rows).astype(jnp.int32)
    itemsize = jnp.result_type(hidden, w_vocab).itemsize
    fitted = _default_blocks(d_model, itemsize) or (MIN_BLOCK, MIN_BLOCK)
    kernel_chunk = int(chunk) if chunk else block_size(fitted[1], vocab)
    kernel_rows = int(block_rows) if block_rows else block_size(fitted[0], rows)
    impl = resolve_impl("softmax_cross_entropy", impl,
                        _unsupported(hidden, w_vocab, kernel_chunk, kernel_rows))
    if impl == "xla":
        loss = _chunked(hidden2, w_vocab, labels1, min(vocab, DEFAULT_CHUNK) if chunk is None
                        else int(chunk))
    else:
        loss = _kernel(hidden2, w_vocab, labels1, kernel_chunk, kernel_rows,
                       impl == "interpret")
    return loss.reshape(labels.shape)


def cross_entropy_reference(hidden, w_vocab, labels):
    """The full-logits jnp cross entropy both implementations are tested against."""
    logits = jnp.einsum("...d,dv->...v", hidden, w_vocab, preferred_element_type=jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logit


def _unsupported(hidden, w_vocab, chunk, block_rows) -> str | None:
    dtype, d_model = jnp.result_type(hidden, w_vocab), hidden.shape[-1]
    return (dot_unsupported(dtype, d_model=d_model, chunk=chunk, block_rows=block_rows)
            or smem_unsupported(_smem_bytes(d_model, dtype.itemsize, block_rows, chunk),
                                f"blocks of {block_rows} rows x {chunk} columns at d_model {d_model}"))


def _default_blocks(d_model: int, itemsize: int) -> tuple[int, int] | None:
    return fit_blocks(KERNEL_BLOCKS, functools.partial(_smem_bytes, d_model, itemsize))


def _smem_bytes(d_model, itemsize, block_rows, chunk) -> int:
    """A program's resident ``[block_rows, d]`` tile, its streamed ``[d, chunk]`` tiles
    (``NUM_STAGES`` deep) and its float32 accumulator (``d hidden`` or ``d w_vocab``)."""
    return itemsize * d_model * (block_rows + NUM_STAGES * chunk) + 4 * d_model * max(block_rows, chunk)


# ---------------------------------------------------------------- the Pallas kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel(hidden, w_vocab, labels, chunk, block_rows, interpret):
    return _kernel_fwd(hidden, w_vocab, labels, chunk, block_rows, interpret)[0]


def _kernel_fwd(hidden, w_vocab, labels, chunk, block_rows, interpret):
    rows, (d, vocab) = hidden.shape[0], w_vocab.shape
    hp, wp, lp = _padded(hidden, w_vocab, labels, chunk, block_rows)
    rows_p, vocab_p = hp.shape[0], wp.shape[1]
    row_vector = pl.BlockSpec((block_rows,), lambda i: (i,))
    lse, label_logit = pallas_call(
        functools.partial(_forward_kernel, chunk=chunk, vocab=vocab,
                          dtype=jnp.result_type(hidden, w_vocab)),
        grid=(rows_p // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, d), lambda i: (i, 0)), row_vector,
                  pl.BlockSpec((d, vocab_p), lambda i: (0, 0))],
        out_specs=[row_vector, row_vector],
        out_shape=[jax.ShapeDtypeStruct((rows_p,), jnp.float32)] * 2,
        interpret=interpret,
        name="zjax_cross_entropy_fwd",
    )(hp, lp, wp)
    return (lse - label_logit)[:rows], (hidden, w_vocab, labels, lse)


def _kernel_bwd(chunk, block_rows, interpret, residuals, dloss):
    hidden, w_vocab, labels, lse = residuals
    rows, (d, vocab) = hidden.shape[0], w_vocab.shape
    hp, wp, lp = _padded(hidden, w_vocab, labels, chunk, block_rows)
    rows_p, vocab_p = hp.shape[0], wp.shape[1]
    # Padded rows get a zero cotangent, so they add nothing to d w_vocab.
    dlp = jnp.pad(dloss.astype(jnp.float32), (0, rows_p - rows))
    common = dict(chunk=chunk, vocab=vocab, dtype=jnp.result_type(hidden, w_vocab))

    row_vector = pl.BlockSpec((block_rows,), lambda i: (i,))
    dhidden = pallas_call(
        functools.partial(_dhidden_kernel, **common),
        grid=(rows_p // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, d), lambda i: (i, 0)), row_vector, row_vector,
                  row_vector, pl.BlockSpec((d, vocab_p), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((block_rows, d), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(hp.shape, hidden.dtype),
        interpret=interpret,
        name="zjax_cross_entropy_dhidden",
    )(hp, lp, lse, dlp, wp)

    all_rows = pl.BlockSpec((rows_p,), lambda j: (0,))
    dw = pallas_call(
        functools.partial(_dw_kernel, block_rows=block_rows, **common),
        grid=(vocab_p // chunk,),
        in_specs=[pl.BlockSpec((rows_p, d), lambda j: (0, 0)), all_rows, all_rows, all_rows,
                  pl.BlockSpec((d, chunk), lambda j: (0, j))],
        out_specs=pl.BlockSpec((d, chunk), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct(wp.shape, w_vocab.dtype),
        interpret=interpret,
        name="zjax_cross_entropy_dw",
    )(hp, lp, lse, dlp, wp)
    return (match_cotangent(dhidden[:rows], hidden), match_cotangent(dw[:, :vocab], w_vocab),
            None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _padded(hidden, w_vocab, labels, chunk, block_rows):
    """Rows padded to whole row blocks (label -1 matches no column), vocab to whole chunks."""
    rows, vocab = hidden.shape[0], w_vocab.shape[1]
    pad_rows = round_up(rows, block_rows) - rows
    return (jnp.pad(hidden, ((0, pad_rows), (0, 0))),
            jnp.pad(w_vocab, ((0, 0), (0, round_up(vocab, chunk) - vocab))),
            jnp.pad(labels, (0, pad_rows), constant_values=-1))


def _tile_logits(h, w_ref, c, chunk, vocab, dtype):
    """Float32 logits of vocabulary chunk ``c`` for the rows ``h`` (padding masked), the
    chunk's vocabulary ids ``[1, chunk]`` and its columns of ``w_vocab`` in ``dtype``."""
    w = w_ref[:, pl.ds(pl.multiple_of(c * chunk, chunk), chunk)].astype(dtype)
    logits = jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32)
    ids = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return jnp.where(ids < vocab, logits, MASKED), ids, w


def _forward_kernel(h_ref, labels_ref, w_ref, lse_ref, label_logit_ref, *, chunk, vocab, dtype):
    h, labels = h_ref[...], labels_ref[...]

    def visit(c, carry):
        running_max, sum_exp, label_logit = carry
        logits, ids, _ = _tile_logits(h, w_ref, c, chunk, vocab, dtype)
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.exp(
            logits - new_max[:, None]).sum(axis=1)
        label_logit += jnp.where(ids == labels[:, None], logits, 0.0).sum(axis=1)
        return new_max, sum_exp, label_logit

    block_rows = h.shape[0]
    init = (jnp.full((block_rows,), MASKED, jnp.float32), jnp.zeros((block_rows,), jnp.float32),
            jnp.zeros((block_rows,), jnp.float32))
    running_max, sum_exp, label_logit = jax.lax.fori_loop(0, w_ref.shape[1] // chunk, visit, init)
    lse_ref[...] = running_max + jnp.log(sum_exp)
    label_logit_ref[...] = label_logit


def _dlogits(logits, ids, labels, lse, dloss):
    """``(softmax - onehot(label)) * dloss``, float32; zero on masked columns."""
    return (jnp.exp(logits - lse[:, None]) - (ids == labels[:, None])) * dloss[:, None]


def _dhidden_kernel(h_ref, labels_ref, lse_ref, dloss_ref, w_ref, dh_ref, *, chunk, vocab, dtype):
    h, labels, lse, dloss = h_ref[...], labels_ref[...], lse_ref[...], dloss_ref[...]

    def visit(c, dh):
        logits, ids, w = _tile_logits(h, w_ref, c, chunk, vocab, dtype)
        dlogits = _dlogits(logits, ids, labels, lse, dloss).astype(dtype)
        # dlogits @ w.T, accumulated in float32
        return dh + jax.lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    dh = jax.lax.fori_loop(0, w_ref.shape[1] // chunk, visit,
                           jnp.zeros(h.shape, jnp.float32))
    dh_ref[...] = dh.astype(dh_ref.dtype)


def _dw_kernel(h_ref, labels_ref, lse_ref, dloss_ref, w_ref, dw_ref, *, chunk, block_rows,
               vocab, dtype):
    j = pl.program_id(0)
    w = w_ref[...].astype(dtype)
    ids = j * chunk + jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)

    def visit(i, dw):
        rows = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
        h = h_ref[rows, :].astype(dtype)
        logits = jnp.where(ids < vocab, jnp.dot(h, w, preferred_element_type=jnp.float32),
                           MASKED)
        dlogits = _dlogits(logits, ids, labels_ref[rows], lse_ref[rows], dloss_ref[rows])
        # h.T @ dlogits, accumulated in float32
        return dw + jax.lax.dot_general(h, dlogits.astype(dtype), (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    dw = jax.lax.fori_loop(0, h_ref.shape[0] // block_rows, visit,
                           jnp.zeros(w.shape, jnp.float32))
    dw_ref[...] = dw.astype(dw_ref.dtype)


# ---------------------------------------------------------------- the XLA loop


def _chunk_logits(hidden, w_vocab, c, chunk):
    """Logits of chunk ``c``, their vocabulary ids, and which columns are this chunk's own.

    The last chunk is shifted left to stay inside the vocabulary (no padded copy of
    ``w_vocab``); the columns it shares with the chunk before are masked out.
    """
    vocab = w_vocab.shape[1]
    first = c * chunk
    start = jnp.minimum(first, vocab - chunk)
    w = jax.lax.dynamic_slice_in_dim(w_vocab, start, chunk, axis=1)
    ids = start + jnp.arange(chunk)
    logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
    return logits, ids, ids >= first, start, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, w_vocab, labels, chunk):
    return _chunked_fwd(hidden, w_vocab, labels, chunk)[0]


def _chunked_fwd(hidden, w_vocab, labels, chunk):
    rows = hidden.shape[0]

    def visit(c, carry):
        running_max, sum_exp, label_logit = carry
        logits, ids, own, _, _ = _chunk_logits(hidden, w_vocab, c, chunk)
        logits = jnp.where(own, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        sum_exp = sum_exp * jnp.exp(running_max - new_max) + jnp.exp(
            logits - new_max[:, None]).sum(axis=1)
        hit = own & (ids == labels[:, None])
        label_logit = label_logit + jnp.where(hit, logits, 0.0).sum(axis=1)
        return new_max, sum_exp, label_logit

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    running_max, sum_exp, label_logit = jax.lax.fori_loop(
        0, -(-w_vocab.shape[1] // chunk), visit, init)
    lse = running_max + jnp.log(sum_exp)
    return lse - label_logit, (hidden, w_vocab, labels, lse)


def _chunked_bwd(chunk, residuals, dloss):
    hidden, w_vocab, labels, lse = residuals

    def visit(c, carry):
        dhidden, dw = carry
        logits, ids, own, start, w = _chunk_logits(hidden, w_vocab, c, chunk)
        probs = jnp.exp(logits - lse[:, None]) - (ids == labels[:, None])
        dlogits = jnp.where(own, probs * dloss[:, None], 0.0)
        dhidden = dhidden + jnp.dot(dlogits.astype(w.dtype), w.T,
                                    preferred_element_type=jnp.float32)
        dw_chunk = jnp.dot(hidden.T, dlogits.astype(hidden.dtype),
                           preferred_element_type=jnp.float32)
        # Added, not written: the shifted last chunk overlaps columns already done.
        dw = jax.lax.dynamic_update_slice_in_dim(
            dw, jax.lax.dynamic_slice_in_dim(dw, start, chunk, axis=1) + dw_chunk, start, axis=1)
        return dhidden, dw

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(w_vocab.shape, jnp.float32))
    dhidden, dw = jax.lax.fori_loop(0, -(-w_vocab.shape[1] // chunk), visit, init)
    return dhidden.astype(hidden.dtype), dw.astype(w_vocab.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
