"""Cross entropy over the vocabulary in chunks, so full float32 logits never exist.

This one is an XLA implementation (a ``lax.fori_loop`` over vocabulary chunks with a
``jax.custom_vjp``), not a Pallas kernel: the forward pass keeps a running
log-sum-exp and the label's logit; the backward pass recomputes each chunk's logits
and adds its share to ``d hidden`` and writes its slice of ``d w_vocab``. The largest
temporary is ``[rows, chunk]`` instead of ``[rows, vocab]``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import IMPLS, logger

DEFAULT_CHUNK = 8192

_noted: set[str] = set()


def softmax_cross_entropy(hidden: jax.Array, w_vocab: jax.Array, labels: jax.Array,
                          impl: str = "auto", chunk: int | None = None) -> jax.Array:
    """Per-token ``logsumexp(hidden @ w_vocab) - (hidden @ w_vocab)[label]`` in float32.

    Args:
      hidden: ``[..., d_model]`` final hidden states (any float dtype).
      w_vocab: ``[d_model, vocab]`` output projection (for tied embeddings pass
        ``embedding.T``).
      labels: int ``[...]`` target ids in ``[0, vocab)``.
      impl: any of ``"auto" | "pallas" | "interpret" | "xla"``; all run the chunked
        XLA loop (there is no Pallas kernel for this one; ``"pallas"`` and
        ``"interpret"`` say so once in the log).
      chunk: vocabulary columns per step; default ``min(vocab, 8192)``.
        ``chunk=vocab`` is the full-logits computation.

    Returns:
      float32 ``[...]``: the loss of every token (mask and average it yourself).

    Example:
      >>> import jax.numpy as jnp
      >>> h, w = jnp.ones((2, 4)), jnp.zeros((4, 10))
      >>> softmax_cross_entropy(h, w, jnp.array([1, 2]), chunk=3)
      Array([2.3025851, 2.3025851], dtype=float32)
    """
    if impl not in IMPLS:
        raise ValueError(f"softmax_cross_entropy: impl={impl!r} is not an implementation; "
                         f"use one of {IMPLS}")
    if impl in ("pallas", "interpret") and impl not in _noted:
        _noted.add(impl)
        logger.info("softmax_cross_entropy: impl=%r has no Pallas kernel; using the chunked "
                    "XLA loop", impl)
    d_model, vocab = w_vocab.shape
    if hidden.shape[-1] != d_model or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"softmax_cross_entropy: hidden {hidden.shape}, w_vocab "
                         f"{w_vocab.shape}, labels {labels.shape}; need hidden [..., d], "
                         "w_vocab [d, vocab], labels [...]")
    chunk = min(vocab, DEFAULT_CHUNK) if chunk is None else int(chunk)
    if not 0 < chunk <= vocab:
        raise ValueError(f"softmax_cross_entropy: chunk={chunk} must be in [1, vocab={vocab}]")
    rows = math.prod(labels.shape)
    loss = _chunked(hidden.reshape(rows, d_model), w_vocab,
                    labels.reshape(rows).astype(jnp.int32), chunk)
    return loss.reshape(labels.shape)


def cross_entropy_reference(hidden, w_vocab, labels):
    """The full-logits jnp cross entropy the chunked loop is tested against."""
    logits = jnp.einsum("...d,dv->...v", hidden, w_vocab, preferred_element_type=jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logit


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
