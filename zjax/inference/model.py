"""The reference GPT (``zjax.models.gpt``) as pure functions of its params dict, for serving.

``logits`` recomputes a whole causal batch, as ``GPT.__call__`` does; ``forward`` runs one
*packed pass* over a paged KV cache: a flat buffer of ``token_budget`` tokens (padded), each
with its sequence slot and position, drawn from any mix of sequences: single decode tokens
and chunks of prompts. Each layer writes the pass's keys and values into the cache pages of
their slot, then every token attends over its own sequence's cached keys at positions up to
its own (so a prompt chunk is causal within itself and sees the chunks before it).

Attention runs over *query blocks*: ``block_rows [n_blocks, block_q]`` lists, per block, the
flat indices of up to ``block_q`` tokens of one sequence (``token_budget`` pads a row);
``pallas_kernels.paged_attention`` takes the blocks (see there). The scheduler
(``zjax.inference.engine``) builds the blocks: a decode token is a block of its own, a chunk
of ``n`` prompt tokens fills ``ceil(n / block_q)`` blocks.

Params are ``nnx.to_pure_dict(nnx.state(gpt, nnx.Param))``; the layers' leaves are stacked
(leading ``n_layers`` axis) and run under ``lax.scan``. LoRA adapters (``model.lora``) are fused
into their weights (``gpt.fuse_lora``; the engine fuses once, when it places the params). Every
weight matmul goes through ``dot``, so a weight may be a quantized pytree with a ``dot(x)`` method.
"""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels.attention import attention_reference
from pallas_kernels.norms import rms_norm_reference
from pallas_kernels.paged_attention import paged_attention, paged_attention_impl
from zjax.inference.kv_cache import KVCache
from zjax.models.gpt import apply_rotary, fuse_lora, rotary_angles
from zjax.parallel.sharding import shard


class Batch(NamedTuple):
    """One packed pass (every array a fixed shape, so one compiled program serves every pass).

    Attributes:
      tokens: int32 ``[token_budget]``; padding tokens are any id.
      positions: int32 ``[token_budget]``, each token's position in its sequence; -1 pads.
      slots: int32 ``[token_budget]``, each token's sequence slot (a row of ``page_table``).
      page_table: int32 ``[max_seqs, max_pages_per_seq]``, the cache pages of each slot in
        order (0, the null page, where none).
      block_rows: int32 ``[n_blocks, block_q]``: the flat indices of each query block's tokens,
        all of one sequence; ``token_budget`` pads.
      block_slots: int32 ``[n_blocks]``, the slot of each block.
      logit_index: int32 ``[n_logits]``, the flat indices whose logits ``forward`` returns.
    """

    tokens: jax.Array
    positions: jax.Array
    slots: jax.Array
    page_table: jax.Array
    block_rows: jax.Array
    block_slots: jax.Array
    logit_index: jax.Array


def dot(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w``: a quantized weight (a pytree with a ``dot`` method that is not an array)
    computes it itself, ``w.dot(x)``; an array accumulates in float32 (and returns float32)."""
    if isinstance(w, (jax.Array, np.ndarray)) or not hasattr(w, "dot"):
        return jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return w.dot(x)


def logits(params: dict, cfg: Any, tokens: jax.Array) -> jax.Array:
    """Float32 logits ``[B, T, vocab]`` of int ``tokens [B, T]``, causal, without a cache.

    Equals ``GPT(cfg)(tokens)`` for the same params.

    Example:
      >>> from types import SimpleNamespace
      >>> from flax import nnx
      >>> from zjax.models.gpt import make_gpt
      >>> cfg = SimpleNamespace(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
      ...     d_ff=32, max_seq_len=8, rope_theta=1e4, tie_embeddings=True, norm_eps=1e-6)
      >>> params = nnx.to_pure_dict(nnx.state(make_gpt(cfg), nnx.Param))
      >>> logits(params, cfg, jnp.zeros((1, 4), jnp.int32)).shape
      (1, 4, 64)
    """
    check_supported(cfg)
    params = fuse_lora(params, cfg)
    batch, length = tokens.shape
    x = jnp.take(params["embedding"], tokens, axis=0)
    cos, sin = rope_table(cfg)
    rope = (cos[:length], sin[:length])

    def layer(x, p):
        q, k, v = _project_qkv(_norm(x, p["attn_norm"], cfg), p["attn"], cfg, rope)
        out = attention_reference(q, k, v, causal=True)
        x = x + dot(out.reshape(batch, length, -1), p["attn"]["wo"]).astype(x.dtype)
        return x + _mlp(_norm(x, p["mlp_norm"], cfg), p["mlp"]).astype(x.dtype), None

    x, _ = lax.scan(layer, x, params["blocks"])
    return _output(params, _norm(x, params["final_norm"], cfg))


def forward(params: dict, cfg: Any, cache: KVCache, batch: Batch, *, impl: str = "xla") -> tuple[jax.Array, KVCache]:
    """One packed pass: float32 logits ``[n_logits, vocab]`` at ``batch.logit_index`` and the
    cache with the pass's keys and values written.

    Args:
      params: the GPT's params dict.
      cfg: its model config.
      cache: the paged cache (``zjax.inference.kv_cache``).
      batch: the pass (``Batch``).
      impl: ``pallas_kernels.paged_attention``'s implementation.
    """
    check_supported(cfg)
    params = fuse_lora(params, cfg)
    page_size = cache.page_size
    valid = batch.positions >= 0
    positions = jnp.where(valid, batch.positions, 0)
    cos, sin = rope_table(cfg)
    rope = (cos[positions], sin[positions])
    # where each token's key and value go; padding goes to the null page
    pages = jnp.where(valid, batch.page_table[batch.slots, positions // page_size], 0)
    offsets = jnp.where(valid, positions % page_size, 0)
    block_positions = jnp.append(batch.positions, -1)[batch.block_rows]
    n_tokens = batch.tokens.shape[0]

    x = jnp.take(params["embedding"], batch.tokens, axis=0)[None]  # [1, N, d]

    def layer(carry, p):
        x, k_cache, v_cache, index = carry
        q, k, v = _project_qkv(_norm(x, p["attn_norm"], cfg), p["attn"], cfg, rope)
        k_cache = k_cache.at[index, pages, offsets].set(k[0].astype(k_cache.dtype))
        v_cache = v_cache.at[index, pages, offsets].set(v[0].astype(v_cache.dtype))
        q_blocks = jnp.concatenate([q[0], jnp.zeros_like(q[0, :1])])[batch.block_rows]
        out = _paged_attention(q_blocks, k_cache, v_cache, batch.page_table, batch.block_slots, block_positions,
                               index, impl, cfg.n_kv_heads)
        # each real token sits in one block row; padding rows land on the dropped row N
        out = jnp.zeros((n_tokens + 1,) + out.shape[2:], out.dtype).at[batch.block_rows].set(out)[:n_tokens]
        out = shard(out, (None, "heads", None))
        x = x + dot(out.reshape(1, n_tokens, -1), p["attn"]["wo"]).astype(x.dtype)
        x = x + _mlp(_norm(x, p["mlp_norm"], cfg), p["mlp"]).astype(x.dtype)
        return (x, k_cache, v_cache, index + 1), None

    (x, k_cache, v_cache, _), _ = lax.scan(layer, (x, cache.k, cache.v, jnp.int32(0)), params["blocks"])
    hidden = _norm(x[0][batch.logit_index], params["final_norm"], cfg)
    return _output(params, hidden), KVCache(k_cache, v_cache)


def head_dim_of(cfg: Any) -> int:
    """The attention heads' width: ``cfg.head_dim`` when the config sets one, else ``d_model / n_heads``."""
    return getattr(cfg, "head_dim", None) or cfg.d_model // cfg.n_heads


def rope_table(cfg: Any) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` ``[max_seq_len, head_dim // 2]`` of the GPT's rotary embedding (with
    ``cfg.rope_scaling`` when the config has one)."""
    scaling = getattr(cfg, "rope_scaling", None)
    kwargs = {}
    if scaling is not None:
        if "scaling" not in inspect.signature(rotary_angles).parameters:
            raise ValueError(f"model.rope_scaling={scaling!r} but this zjax's rotary_angles takes no scaling")
        kwargs["scaling"] = scaling
    return rotary_angles(cfg.max_seq_len, head_dim_of(cfg), float(cfg.rope_theta), **kwargs)


def check_supported(cfg: Any) -> None:
    """Raises ``ValueError`` for a model this module does not serve (MoE layers, sparse attention)."""
    moe = getattr(cfg, "moe", None)
    if moe is not None and getattr(moe, "num_experts", 0) > 0:
        raise ValueError(f"model.moe.num_experts={moe.num_experts}: zjax.inference serves dense models only; "
                         "use a config with moe.num_experts: 0")
    if getattr(cfg, "sparse_attention", None) is not None:
        raise ValueError("model.sparse_attention is set: zjax.inference serves dense attention only; "
                         "unset model.sparse_attention")


def _paged_attention(q, k_cache, v_cache, page_table, slots, positions, layer, impl, n_kv_heads):
    """``paged_attention``; a Pallas kernel under tensor parallelism runs per shard of the kv heads
    (inside jit a kernel call would gather its inputs and run replicated)."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else mesh.shape.get("tensor", 1)
    if paged_attention_impl(impl) == "xla" or shards == 1 or n_kv_heads % shards:
        return paged_attention(q, k_cache, v_cache, page_table, slots, positions, layer=layer, impl=impl)
    heads, pages = P(None, None, "tensor", None), P(None, None, None, "tensor", None)
    return jax.shard_map(lambda q, k, v, t, s, p, layer: paged_attention(q, k, v, t, s, p, layer=layer, impl=impl),
                         mesh=mesh, in_specs=(heads, pages, pages, P(), P(), P(), P()), out_specs=heads,
                         check_vma=False)(q, k_cache, v_cache, page_table, slots, positions, layer)


def _norm(x: jax.Array, p: dict, cfg: Any) -> jax.Array:
    return rms_norm_reference(x, p["scale"], eps=float(cfg.norm_eps))


def _project_qkv(h, p, cfg, rope):
    """Rotated ``q [B, T, heads, hd]``, ``k`` and ``v`` ``[B, T, kv_heads, hd]`` (plus the
    biases when the params have them)."""
    batch, length, _ = h.shape
    hd = head_dim_of(cfg)

    def project(w, bias):
        out = dot(h, p[w])
        if bias in p:
            out = out + p[bias].astype(out.dtype)
        return out.astype(h.dtype).reshape(batch, length, -1, hd)

    q = apply_rotary(project("wq", "bq"), rope)
    k = apply_rotary(project("wk", "bk"), rope)
    v = project("wv", "bv")
    return shard(q, (None, None, "heads", None)), shard(k, (None, None, "kv_heads", None)), \
        shard(v, (None, None, "kv_heads", None))


def _mlp(h, p):
    gate = dot(h, p["w_gate"])
    up = dot(h, p["w_up"])
    return dot((jax.nn.silu(gate) * up).astype(h.dtype), p["w_down"])


def _output(params, hidden):
    """Float32 logits: ``hidden @ lm_head`` (the embedding, transposed, when tied)."""
    if "lm_head" in params:
        return dot(hidden, params["lm_head"]).astype(jnp.float32)
    return jnp.einsum("...d,vd->...v", hidden, params["embedding"], preferred_element_type=jnp.float32)

