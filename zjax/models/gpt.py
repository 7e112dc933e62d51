"""A Llama-style decoder in Flax NNX whose layers run through ``zjax.layers.scan_layers``.

Token embedding, ``n_layers`` identical blocks (pre-RMSNorm causal self-attention with
rotary embeddings and grouped KV heads; pre-RMSNorm SwiGLU MLP), a final RMSNorm and a
tied or untied output projection.

The blocks' parameters are stacked: every leaf under ``blocks`` has a leading
``n_layers`` axis and the logical axis ``"layers"``. The model computes in the dtype of
the parameters it is given; norm statistics, softmax, logits and the loss are float32.
Parameters carry logical axis names in the flax ``out_sharding`` metadata, stored with
``eager_sharding=False`` so that creating a model never needs a mesh; sharding rules map
the names to mesh axes later.

LoRA (``model.lora``, DeepSpeed-Chat's ``lora_dim``/``lora_module_name``): with ``rank`` > 0 every
targeted projection ``W`` gets two ``nnx.LoRAParam`` adapters ``<name>_lora_a [d_in, r]`` and
``<name>_lora_b [r, d_out]`` and the layer reads ``W + alpha / r x A @ B`` (summed in float32,
in ``W``'s dtype), formed before the tensor-parallel region, so tensor parallelism and ZeRO-3's
per-layer gathers treat the adapters like any layer parameter. Train only them with
``make_train_step(..., trainable=nnx.LoRAParam)`` (DeepSpeed-Chat's ``only_optimize_lora``);
``fuse_lora`` folds them into plain GPT params (the inference engine does it itself). Under a
bfloat16 compute dtype the fused weight is rounded to bfloat16, so an update below half a
bfloat16 step of ``W`` does not show in the forward pass (the frozen ``W`` is bfloat16 then anyway).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

import pallas_kernels
from pallas_kernels.dispatch import backend
from zjax.compression.quantization import in_region, quantize_input, region_args
from zjax.errors import ConfigError
from zjax.config import remat
from zjax.config.schema import LORA_PROJECTIONS, check_rope_scaling
from zjax.layers import scan_layers, tiled, tiles
from zjax.models import moe as moe_lib
from zjax.models import sparse_attention as sparse_lib
from zjax.parallel.sequence import attention, zigzag_order
from zjax.parallel.sharding import per_shard, region_spec, shard, split_axis

# The logical axes of the hidden states between layers (zjax.shard places them by the rules):
# ``residual_length`` is split over ``tensor`` under Megatron sequence parallelism.
ACTIVATION_AXES = ("batch", "residual_length", "embed")
TOKEN_AXES = ("batch", "length")
# Tagged activations that tensor parallelism splits T ways (the heads' and the MLP's), and
# those that Megatron sequence parallelism splits too (the residual stream's); zjax plan reads them.
TENSOR_SPLIT_ACTIVATIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "mlp_gate", "mlp_up", "mlp_hidden")
SEQUENCE_SPLIT_ACTIVATIONS = ("attn_norm", "mlp_norm", "layer_input")
# The tags this model puts on its activations (what remat policies name).
ACTIVATION_NAMES = remat.ACTIVATION_NAMES

KERNELS = pallas_kernels.IMPLS
# What the model runs through pallas_kernels when ``kernels`` is not ``xla``.
MODEL_KERNELS = ("rms_norm", "flash_attention", "swiglu", "softmax_cross_entropy")


INIT_STD = 0.02


class GPT(nnx.Module):
    """Decoder-only transformer; ``model(tokens) -> float32 logits [B, T, vocab]``.

    Args:
      cfg: an object with ``vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff,
        max_seq_len, rope_theta, tie_embeddings, norm_eps``; optionally ``head_dim`` (None:
        ``d_model // n_heads``), ``qkv_bias`` (biases ``bq, bk, bv`` on the q/k/v projections),
        ``rope_scaling`` (transformers' ``linear`` or ``llama3``) and ``lora`` (``rank``,
        ``alpha``, ``targets``: LoRA adapters, see the module docstring), as ``model`` of the config.
      rngs: initialisation randomness.
      param_dtype: dtype the parameters are created in.
      kernels: ``xla`` (plain XLA), or ``auto``/``pallas``/``interpret``: RMSNorm,
        attention, the MLP's SwiGLU gate and the loss's cross-entropy through
        ``pallas_kernels`` with that ``impl``. The fused SwiGLU keeps the gate and up
        projections inside the kernel, so ``mlp_gate`` and ``mlp_up`` are not tagged
        then (a remat policy naming them saves nothing there; ``mlp_hidden`` is).

    Example:
      >>> from types import SimpleNamespace
      >>> cfg = SimpleNamespace(vocab_size=256, d_model=32, n_layers=2, n_heads=4,
      ...     n_kv_heads=2, d_ff=64, max_seq_len=16, rope_theta=10000.0,
      ...     tie_embeddings=True, norm_eps=1e-5)
      >>> model = GPT(cfg, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 8), jnp.int32)).shape
      (2, 8, 256)
    """

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, param_dtype=jnp.float32, kernels: str = "xla"):
        _check_config(cfg)
        if kernels not in KERNELS:
            raise ConfigError(f"kernels={kernels!r} is not a kernel choice; use one of {', '.join(KERNELS)}")
        if kernels == "pallas":
            _check_pallas_backend()
        self.kernels = kernels
        self.vocab_size = cfg.vocab_size
        self.max_seq_len = cfg.max_seq_len
        self.head_dim = attention_head_dim(cfg)
        self.rope_theta = float(cfg.rope_theta)
        scaling = _rope_scaling(getattr(cfg, "rope_scaling", None))
        self.rope_scaling = nnx.static(None if scaling is None else tuple(sorted(scaling.items())))
        self.tie_embeddings = bool(cfg.tie_embeddings)
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                INIT_STD, param_dtype)

        # MoE on every k-th layer (model.moe.every): the stack is of groups of k layers, k - 1
        # dense blocks then one MoE block (Megatron-DeepSpeed's expert_interval)
        every = _moe_config(cfg).every if _moe_config(cfg) is not None else 1
        if cfg.n_layers % every:
            raise ConfigError(f"model.moe.every={every} does not divide model.n_layers={cfg.n_layers}; use an "
                              "interval that divides the layers (every k-th layer is an MoE layer)")

        @nnx.split_rngs(splits=cfg.n_layers // every)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            if every == 1:
                return Block(cfg, rngs=rngs, param_dtype=param_dtype)
            return BlockGroup(cfg, every, rngs=rngs, param_dtype=param_dtype)

        self.blocks = make_blocks(rngs)
        # the MoE routers' randomness (noise, random token selection): one stream the train
        # step reseeds every step; each layer folds in its index
        self.moe = _moe_config(cfg) is not None
        self.router_rngs = nnx.data(nnx.Rngs(router=0) if self.moe else None)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        if not self.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                  INIT_STD, param_dtype)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Float32 logits ``[B, T, vocab]`` for int ``tokens [B, T]``.

        ``segment_ids [B, T]`` keeps packed documents from attending to each other.
        """
        return jnp.einsum("btd,dv->btv", self.hidden(tokens, segment_ids), self.output_weights(),
                          preferred_element_type=jnp.float32)

    def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
        """The final-normed hidden states ``[B, T, d_model]`` (what the output projection reads).

        ``positions`` ``[T]``: each token's position when the sequence was reordered (ring
        attention's zig-zag order); default ``0..T-1``.
        """
        return self.hidden_and_aux(tokens, segment_ids, positions)[0]

    def hidden_and_aux(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                       positions: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """``hidden`` and the MoE layers' report: ``{"loss": aux_loss_coef x load balancing +
        router_z_loss x z-loss, summed over the layers}`` (0 without MoE), with MoE also
        ``"dropped"`` and ``"assignments"``: token-to-expert assignments capacity dropped, of all."""
        seq_len = tokens.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"tokens have length {seq_len}, longer than model.max_seq_len="
                             f"{self.max_seq_len}; raise max_seq_len or shorten the batch")
        embed = per_shard(functools.partial(_embed, vocab_size=self.vocab_size), (TOKEN_AXES, ("vocab", "embed")),
                          ACTIVATION_AXES)
        x = shard(embed(tokens, self.embedding[...]), ACTIVATION_AXES)
        positions = jnp.arange(seq_len, dtype=jnp.int32) if positions is None else positions
        scaling = None if self.rope_scaling is None else dict(self.rope_scaling)
        cos, sin = rotary_angles(self.max_seq_len, self.head_dim, self.rope_theta, scaling)
        rope = (cos[positions], sin[positions], positions)

        # The stacked state goes to scan_layers untouched: the train step may hand it
        # placeholder leaves that only scan_layers knows how to turn into arrays.
        block_def, block_state = nnx.split(self.blocks)

        if not self.moe:
            def layer(h, layer_state):
                return shard(nnx.merge(block_def, layer_state)(h, rope, segment_ids, self.kernels), ACTIVATION_AXES)

            x = scan_layers(layer, x, block_state)
            return self.final_norm(x, self.kernels), {"loss": jnp.float32(0)}

        def moe_layer(carry, layer_state):
            h, stats, key = carry
            key, sub = jax.random.split(key)
            h, layer_stats = nnx.merge(block_def, layer_state)(h, rope, segment_ids, self.kernels, key=sub)
            return shard(h, ACTIVATION_AXES), stats + layer_stats, key

        x, stats, _ = scan_layers(moe_layer, (x, jnp.zeros(3, jnp.float32), self.router_rngs.router()), block_state)
        return self.final_norm(x, self.kernels), {"loss": stats[0], "dropped": stats[1], "assignments": stats[2]}

    def token_nll(self, inputs: jax.Array, targets: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Float32 next-token negative log-likelihood ``[B, T]`` of ``targets`` given ``inputs``
        (``token_nll_and_aux`` also returns the MoE layers' auxiliary loss)."""
        return self.token_nll_and_aux(inputs, targets, segment_ids)[0]

    def token_nll_and_aux(self, inputs: jax.Array, targets: jax.Array,
                          segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Float32 next-token negative log-likelihood ``[B, T]`` of ``targets`` given ``inputs``,
        and the MoE layers' report (``hidden_and_aux``).

        Under tensor parallelism the vocabulary stays split: each shard computes its part
        of the logits and the log-sum-exp and target logit are summed over the shards
        (Megatron's vocabulary-parallel cross-entropy); the logits are never gathered.
        Otherwise, with ``kernels`` other than ``xla``, the fused cross-entropy kernel
        computes it in vocabulary chunks.
        """
        order = zigzag_order(inputs.shape[1])
        if order is not None:
            # ring attention: each device holds two chunks of the sequence (zig-zag) so that
            # causal attention gives every device the same work; the loss comes back in order
            inputs, targets = inputs[:, order], targets[:, order]
            segment_ids = None if segment_ids is None else segment_ids[:, order]
            nll, aux = self._token_nll(inputs, targets, segment_ids, order)
            return nll[:, np.argsort(order)], aux
        return self._token_nll(inputs, targets, segment_ids, None)

    def _token_nll(self, inputs, targets, segment_ids, positions):
        hidden, aux = self.hidden_and_aux(inputs, segment_ids=segment_ids, positions=positions)
        weights = self.output_weights()
        if self.kernels != "xla" and not any(region_spec(("embed", "vocab"), weights.shape)):
            return tiled(lambda w, h, t: pallas_kernels.softmax_cross_entropy(h, w, t, impl=self.kernels),
                         tiles("loss"), weights, hidden, targets, what="tiling.loss_tiles"), aux
        nll = functools.partial(_vocab_parallel_nll, vocab_size=self.vocab_size)
        return per_shard(nll, (ACTIVATION_AXES, ("embed", "vocab"), TOKEN_AXES), TOKEN_AXES)(
            hidden, weights, targets), aux

    def output_weights(self) -> jax.Array:
        """The ``[d_model, vocab]`` output projection (the embedding, transposed, when tied)."""
        return self.embedding[...].T if self.tie_embeddings else self.lm_head[...]


def gpt_loss(model: GPT, batch: dict) -> tuple[jax.Array, dict]:
    """Mean next-token cross entropy (float32) and the number of target tokens counted.

    Args:
      model: a ``GPT``.
      batch: ``{"tokens": int [B, T+1]}``, optionally ``"segment_ids"`` and
        ``"loss_mask"`` of the same shape. Inputs are ``tokens[:, :-1]``, targets
        ``tokens[:, 1:]``; a target counts where ``loss_mask`` is nonzero and, with
        segment ids, where it belongs to the same document as its input. Or the same
        already shifted (``zjax.data.loader.shift_tokens``): ``{"inputs", "targets"}`` ``[B, T]``,
        optionally ``"segment_ids"`` (the inputs') and ``"loss_mask"`` (the targets'),
        which a sequence split over devices splits alike.

    Returns:
      ``(loss, {"weight": float32 number of counted targets})``; with MoE layers the loss
      includes their auxiliary loss (``model.moe``'s coefficients) and the dict their
      ``moe_dropped_fraction`` (of token-to-expert assignments, over the layers).
    """
    inputs, targets, segment_ids, counted = shifted_batch(batch)
    nll, aux = model.token_nll_and_aux(inputs, targets, segment_ids)
    weight = counted.sum()
    loss = (nll * counted).sum() / jnp.maximum(weight, 1.0) + aux["loss"]
    if "dropped" in aux:  # reported by the train step as a metric
        return loss, {"weight": weight, "moe_dropped_fraction": aux["dropped"] / jnp.maximum(aux["assignments"], 1.0)}
    return loss, {"weight": weight}


def shifted_batch(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """``(inputs, targets, segment_ids, counted)`` of a ``gpt_loss`` batch: ``counted`` (float32)
    is 1 where a target counts (its ``loss_mask``, its input's document)."""
    segment_ids = batch.get("segment_ids")
    if "inputs" in batch:
        inputs, targets = batch["inputs"], batch["targets"]
        counted = jnp.ones(targets.shape, jnp.float32)
        if "loss_mask" in batch:
            counted = counted * (batch["loss_mask"] != 0)
        return inputs, targets, segment_ids, counted
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    counted = jnp.ones(targets.shape, jnp.float32)
    if "loss_mask" in batch:
        counted = counted * (batch["loss_mask"][:, 1:] != 0)
    if segment_ids is not None:
        counted = counted * (segment_ids[:, 1:] == segment_ids[:, :-1])
        segment_ids = segment_ids[:, :-1]
    return inputs, targets, segment_ids, counted


def make_gpt(cfg_model: Any, seed: int = 0, param_dtype=jnp.float32, kernels: str = "xla") -> GPT:
    """A ``GPT`` initialised from integer ``seed``."""
    return GPT(cfg_model, rngs=nnx.Rngs(seed), param_dtype=param_dtype, kernels=kernels)


def _check_pallas_backend() -> None:
    """``kernels=pallas`` fails here, naming the key, rather than as a traceback while tracing."""
    here = backend()
    missing = [k for k in MODEL_KERNELS if here not in pallas_kernels.KERNEL_BACKENDS[k]]
    if missing:
        raise ConfigError(
            f"kernels='pallas': the {here!r} backend has no Pallas kernel for {', '.join(missing)}; use "
            "kernels=auto (Pallas where the backend has a kernel, XLA elsewhere), kernels=interpret (the "
            "Pallas kernels in interpret mode, slow) or kernels=xla"
        )


def logical_axes(module: nnx.Module) -> dict:
    """Logical axis names of every parameter, as a tuple per parameter.

    The result has the structure of ``nnx.to_pure_dict(nnx.state(module, nnx.Param))``
    with a tuple such as ``("layers", "embed", "mlp")`` in place of each array (pass the
    params tree first to ``jax.tree.map`` so the tuples arrive whole). Works on an
    abstract model from ``nnx.eval_shape`` too.
    """
    axes: dict = {}
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        shape = variable.get_value().shape
        if names is None or len(names) != len(shape):
            raise ValueError(f"parameter {'/'.join(map(str, path))} has logical axes "
                             f"{names!r} for shape {shape}; every parameter needs one "
                             "name per dimension")
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(names)
    return axes


def _moe_config(cfg: Any):
    """``cfg.moe`` when it asks for MoE layers (``num_experts`` > 0), else None."""
    moe = getattr(cfg, "moe", None)
    return moe if moe is not None and moe.num_experts > 0 else None


def attention_head_dim(cfg: Any) -> int:
    """The width of one attention head: ``cfg.head_dim``, or ``d_model // n_heads`` when it is
    None or absent."""
    head_dim = getattr(cfg, "head_dim", None)
    return cfg.d_model // cfg.n_heads if head_dim is None else int(head_dim)


def count_params(cfg: Any) -> int:
    """The number of parameters ``GPT(cfg)`` creates."""
    head_dim = attention_head_dim(cfg)
    attention = cfg.d_model * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    if getattr(cfg, "qkv_bias", False):
        attention += head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.d_model * cfg.d_ff
    moe = _moe_config(cfg)
    moe_layers = 0
    moe_mlp = mlp
    if moe is not None:
        width = moe.d_ff or cfg.d_ff
        moe_mlp = cfg.d_model * moe.num_experts + 3 * cfg.d_model * width * moe.num_experts
        moe_mlp += (3 * cfg.d_model * width + 2 * cfg.d_model) if moe.use_residual else 0
        moe_mlp += 3 * cfg.d_model * width * moe.shared_experts
        moe_layers = cfg.n_layers // moe.every
    block = attention + 2 * cfg.d_model + _lora_count(cfg, head_dim)
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    layers = cfg.n_layers * block + (cfg.n_layers - moe_layers) * mlp + moe_layers * moe_mlp
    return embeddings + layers + cfg.d_model


def _lora_count(cfg: Any, head_dim: int) -> int:
    """The LoRA adapters' parameters in one layer: ``rank x (d_in + d_out)`` per targeted projection."""
    targets = lora_targets(cfg)
    q, kv = cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim
    widths = {"attn/wq": cfg.d_model + q, "attn/wk": cfg.d_model + kv, "attn/wv": cfg.d_model + kv,
              "attn/wo": q + cfg.d_model, "mlp/w_gate": cfg.d_model + cfg.d_ff, "mlp/w_up": cfg.d_model + cfg.d_ff,
              "mlp/w_down": cfg.d_ff + cfg.d_model}
    return sum(_lora_config(cfg).rank * widths[t] for t in targets)


class BlockGroup(nnx.Module):
    """``every`` consecutive layers when only every k-th is MoE (``model.moe.every``): ``every - 1``
    dense blocks, then one MoE block (layers k, 2k, ... counted from 1, as Megatron-DeepSpeed's
    ``expert_interval``). Called like an MoE ``Block``."""

    def __init__(self, cfg: Any, every: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.dense = nnx.List([Block(cfg, rngs=rngs, param_dtype=param_dtype, moe=False) for _ in range(every - 1)])
        self.moe = Block(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, rope, segment_ids, kernels="xla", key=None):
        for block in self.dense:
            x = block(x, rope, segment_ids, kernels)
        return self.moe(x, rope, segment_ids, kernels, key=key)


class Block(nnx.Module):
    """One pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, param_dtype=jnp.float32, moe: bool = True):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        moe = _moe_config(cfg) if moe else None
        self.aux_coefs = (moe.aux_loss_coef, moe.router_z_loss) if moe is not None else None
        if moe is None:
            self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)
        else:
            gate = moe_lib.GateConfig(
                moe.num_experts, top_k=moe.top_k, capacity_factor=moe.capacity_factor,
                eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
                drop_tokens=moe.drop_tokens, noisy_gate_policy=moe.noisy_gate_policy, use_rts=moe.use_rts,
                second_expert_sampling=moe.second_expert_sampling, drop_policy=moe.drop_policy,
                dispatch=moe.dispatch)
            self.mlp = moe_lib.MoE(cfg.d_model, moe.d_ff or cfg.d_ff, gate, rngs=rngs, use_residual=moe.use_residual,
                                   shared_experts=moe.shared_experts, param_dtype=param_dtype, init_std=INIT_STD,
                                   out_std=INIT_STD / math.sqrt(2 * cfg.n_layers),
                                   balance_bias=moe.bias_update_rate > 0)

    def __call__(self, x, rope, segment_ids, kernels="xla", key=None):
        """``x + attn(norm(x))`` then ``+ mlp(norm(...))``; with an MoE MLP, ``(x, [aux loss, dropped
        assignments, assignments])``."""
        x = x + self.attn(checkpoint_name(self.attn_norm(x, kernels), "attn_norm"), rope, segment_ids, kernels)
        h = checkpoint_name(self.mlp_norm(x, kernels), "mlp_norm")
        if self.aux_coefs is None:
            return x + self.mlp(h, kernels)
        y, routing = self.mlp(h, key=key, x_axes=ACTIVATION_AXES)
        # routing.balance is 0 (the selection bias's load gradient, with bias_update_rate > 0)
        aux = self.aux_coefs[0] * routing.aux_loss + self.aux_coefs[1] * routing.z_loss + routing.balance
        assignments = routing.counts.sum().astype(jnp.float32)
        return x + y.astype(x.dtype), jnp.stack([aux, routing.dropped.astype(jnp.float32), assignments])


class Attention(nnx.Module):
    """Causal self-attention with rotary embeddings and grouped KV heads."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = attention_head_dim(cfg)
        q_width = cfg.n_heads * self.head_dim
        kv_width = cfg.n_kv_heads * self.head_dim
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        self.wq = _param(rngs, (cfg.d_model, q_width), ("embed", "heads"), INIT_STD, param_dtype)
        self.wk = _param(rngs, (cfg.d_model, kv_width), ("embed", "kv_heads"), INIT_STD,
                         param_dtype)
        self.wv = _param(rngs, (cfg.d_model, kv_width), ("embed", "kv_heads"), INIT_STD,
                         param_dtype)
        self.wo = _param(rngs, (q_width, cfg.d_model), ("heads", "embed"), out_std, param_dtype)
        # Qwen2's q/k/v biases, split under tensor parallelism like their weights' columns
        self.qkv_bias = bool(getattr(cfg, "qkv_bias", False))
        if self.qkv_bias:
            self.bq = _zeros((q_width,), ("heads",), param_dtype)
            self.bk = _zeros((kv_width,), ("kv_heads",), param_dtype)
            self.bv = _zeros((kv_width,), ("kv_heads",), param_dtype)
        _add_lora(self, cfg, "attn", rngs, param_dtype)
        block = getattr(cfg, "sparse_attention", None)
        self.sparsity = nnx.static(None if block is None else sparse_lib.map_deepspeed_sparse_attention(
            dict(block), num_heads=cfg.n_heads))

    def __call__(self, x, rope, segment_ids, kernels="xla"):
        """``segment_ids`` ``[B, T]`` (or None) keeps packed documents apart.

        Under tensor parallelism each shard runs its own heads (q/k/v column-parallel, the
        output projection row-parallel) and the shards' outputs are summed once; under
        sequence parallelism each device holds its part of the sequence and
        ``zjax.parallel.sequence.attention`` combines the parts.
        """
        weight_axes = (("embed", "heads"), ("embed", "kv_heads"), ("embed", "kv_heads"), ("heads", "embed"))
        weights = tuple(_adapted(self, name) for name in ("wq", "wk", "wv", "wo"))
        if self.qkv_bias:
            weight_axes += (("heads",), ("kv_heads",), ("kv_heads",))
            weights += (self.bq[...], self.bk[...], self.bv[...])

        extra = region_args()  # activation quantization's step, when active

        def local(x, *args):
            *weights, cos, sin, positions, segment_ids = args[:len(args) - len(extra)]
            with in_region(args[len(args) - len(extra):]):
                return self._attend(x, *weights, cos=cos, sin=sin, positions=positions, segment_ids=segment_ids,
                                    kernels=kernels)

        return per_shard(local, (ACTIVATION_AXES, *weight_axes, ("length", None), ("length", None), ("length",),
                                 TOKEN_AXES, *(None for _ in extra)), ACTIVATION_AXES)(x, *weights, *rope,
                                                                                        segment_ids, *extra)

    def _attend(self, x, wq, wk, wv, wo, bq=None, bk=None, bv=None, *, cos, sin, positions, segment_ids, kernels):
        hd = self.head_dim
        tp = split_axis("heads")
        x = _gather_sequence(x)
        batch, seq_len, _ = x.shape
        q = quantize_input(x, "blocks/attn/wq") @ wq
        k = quantize_input(x, "blocks/attn/wk") @ wk
        v = quantize_input(x, "blocks/attn/wv") @ wv
        if bq is not None:
            q, k, v = q + bq.astype(q.dtype), k + bk.astype(k.dtype), v + bv.astype(v.dtype)
        q = checkpoint_name(q, "q_proj")
        k = checkpoint_name(k, "k_proj")
        v = checkpoint_name(v, "v_proj")
        n_q, n_kv = q.shape[-1] // hd, k.shape[-1] // hd
        if tp is not None and (n_q != self.n_heads or k.shape[-1] != self.n_kv_heads * hd):
            shards = jax.lax.axis_size(tp)
            if self.n_heads % shards:
                raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by the tensor axis size {shards} "
                                  f"(mesh.tensor); use a tensor size that divides the number of heads")
            if n_q == self.n_heads or self.n_kv_heads % shards:
                # Fewer KV heads than shards (n_kv_heads % tensor != 0): the KV projections are split
                # by columns like any weight; their outputs are gathered and each shard takes, per
                # query head, the KV head of its group (attention then runs as multi-head).
                if k.shape[-1] != self.n_kv_heads * hd:
                    k = jax.lax.all_gather(k, tp, axis=-1, tiled=True)
                    v = jax.lax.all_gather(v, tp, axis=-1, tiled=True)
                first = jax.lax.axis_index(tp) * n_q if n_q != self.n_heads else 0
                heads = (first + jnp.arange(n_q)) // (self.n_heads // self.n_kv_heads)
                k = jnp.take(k.reshape(batch, seq_len, self.n_kv_heads, hd), heads, axis=2).reshape(batch, seq_len, -1)
                v = jnp.take(v.reshape(batch, seq_len, self.n_kv_heads, hd), heads, axis=2).reshape(batch, seq_len, -1)
                n_kv = n_q
        q = apply_rotary(q.reshape(batch, seq_len, n_q, hd), (cos, sin))
        k = apply_rotary(k.reshape(batch, seq_len, n_kv, hd), (cos, sin))
        v = v.reshape(batch, seq_len, n_kv, hd)
        if self.sparsity is None:
            out = attention(q, k, v, causal=True, segment_ids=segment_ids, impl=kernels, positions=positions)
        else:
            out = self._sparse(q, k, v, segment_ids, tp, kernels)
        out = checkpoint_name(out.reshape(batch, seq_len, -1), "attn_out")
        split = _split_over("heads", wo.shape[0], self.n_heads * hd)
        out = quantize_input(out, "blocks/attn/wo", axis_name=split)
        return _sum_shards(checkpoint_name(out @ wo, "attn_proj"), split)


    def _sparse(self, q, k, v, segment_ids, tp, kernels):
        """Causal attention over the ``model.sparse_attention`` layout (DeepSpeed's SparsityConfig)."""
        seq_len, n_q = q.shape[1], q.shape[2]
        if segment_ids is not None or split_axis("length") is not None:
            raise ConfigError("model.sparse_attention runs on whole, unpacked sequences: it takes neither packed "
                              "documents (segment_ids) nor mesh.sequence > 1; unset one of them")
        layout = sparse_lib.make_layout(self.sparsity, seq_len, num_heads=self.n_heads)
        impl = kernels if kernels in ("xla", "interpret") else "auto"
        if layout.shape[0] > 1 and n_q != self.n_heads:  # tensor parallelism: this shard's heads' layouts
            layout = jax.lax.dynamic_slice_in_dim(jnp.asarray(layout), jax.lax.axis_index(tp) * n_q, n_q, 0)
            impl = "xla"  # the kernel paths need a concrete layout
        return sparse_lib.block_sparse_attention(q, k, v, layout, block=self.sparsity.block, causal=True, impl=impl)


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``; under tensor parallelism gate and
    up are column-parallel and down row-parallel (one sum over the shards)."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        self.d_ff = cfg.d_ff
        self.w_gate = _param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), INIT_STD,
                             param_dtype)
        self.w_up = _param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), INIT_STD, param_dtype)
        self.w_down = _param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), out_std,
                             param_dtype)
        _add_lora(self, cfg, "mlp", rngs, param_dtype)

    def __call__(self, x, kernels="xla"):
        extra = region_args()  # activation quantization's step, when active

        def local(x, w_gate, w_up, w_down, *extra):
            with in_region(extra):
                return self._feed_forward(x, w_gate, w_up, w_down, kernels=kernels)

        return per_shard(local, (ACTIVATION_AXES, ("embed", "mlp"), ("embed", "mlp"), ("mlp", "embed"),
                                 *(None for _ in extra)),
                         ACTIVATION_AXES)(x, *(_adapted(self, name) for name in ("w_gate", "w_up", "w_down")), *extra)

    def _feed_forward(self, x, w_gate, w_up, w_down, *, kernels):
        def feed_forward(weights, x):
            w_gate, w_up, w_down = weights
            if kernels != "xla":
                # The fused kernel never writes the gate and up projections: only its output
                # can carry a checkpoint name.
                hidden = pallas_kernels.swiglu(x, w_gate, w_up, impl=kernels)
            else:
                gate = checkpoint_name(quantize_input(x, "blocks/mlp/w_gate") @ w_gate, "mlp_gate")
                up = checkpoint_name(quantize_input(x, "blocks/mlp/w_up") @ w_up, "mlp_up")
                hidden = jax.nn.silu(gate) * up
            hidden = quantize_input(checkpoint_name(hidden, "mlp_hidden"), "blocks/mlp/w_down",
                                    axis_name=_split_over("mlp", w_down.shape[0], self.d_ff))
            return checkpoint_name(hidden @ w_down, "mlp_out")

        # ALST: with tiling.mlp_tiles > 1 no [S, d_ff] activation exists whole
        out = tiled(feed_forward, tiles("mlp"), (w_gate, w_up, w_down), _gather_sequence(x),
                    what="tiling.mlp_tiles")
        return _sum_shards(out, _split_over("mlp", w_down.shape[0], self.d_ff))


# --- inside per_shard regions (whole arrays without tensor parallelism) ------------------------


def _megatron_sp() -> str | None:
    """The tensor axis the residual stream is split over along the sequence (Megatron sequence
    parallelism), or None; a residual stream split like the attention's own sequence
    (``mesh.sequence``) stays split."""
    sp = split_axis("residual_length")
    return None if sp is None or sp == split_axis("length") else sp


def _gather_sequence(x: jax.Array) -> jax.Array:
    """Megatron sequence parallelism: the residual stream arrives split along the sequence
    over the tensor group; the column-parallel matmuls need all of it."""
    sp = _megatron_sp()
    return x if sp is None else jax.lax.all_gather(x, sp, axis=1, tiled=True)


def _sum_shards(partial: jax.Array, over: str | None) -> jax.Array:
    """A row-parallel output: partial sums over the tensor axis ``over`` (None: the output is
    already whole) summed (all-reduce), or with sequence parallelism summed and split along
    the sequence (reduce-scatter)."""
    sp = _megatron_sp()
    if over is not None:
        if sp is not None:
            return jax.lax.psum_scatter(partial, over, scatter_dimension=1, tiled=True)
        return jax.lax.psum(partial, over)
    if sp is not None:  # every shard has the whole result: keep its part of the sequence
        n = partial.shape[1] // jax.lax.axis_size(sp)
        return jax.lax.dynamic_slice_in_dim(partial, jax.lax.axis_index(sp) * n, n, axis=1)
    return partial


def _split_over(name: str, local: int, whole: int) -> str | None:
    """The tensor axis a dimension of logical ``name`` is split over here (its local size
    ``local`` is below its size ``whole``), else None."""
    return split_axis(name) if local != whole else None


def _embed(tokens: jax.Array, table: jax.Array, *, vocab_size: int) -> jax.Array:
    """Vocabulary-parallel embedding: each shard looks up the tokens in its rows (zero
    elsewhere) and the shards' results are summed."""
    rows = table.shape[0]
    tp = _split_over("vocab", rows, vocab_size)
    if tp is None:
        return _sum_shards(jnp.take(table, tokens, axis=0), None)
    ids = tokens - jax.lax.axis_index(tp) * rows
    here = (ids >= 0) & (ids < rows)
    looked_up = jnp.take(table, jnp.clip(ids, 0, rows - 1), axis=0) * here[..., None].astype(table.dtype)
    return _sum_shards(looked_up, tp)


def _vocab_parallel_nll(hidden: jax.Array, weights: jax.Array, targets: jax.Array, *, vocab_size: int) -> jax.Array:
    """Cross-entropy with the vocabulary split over the tensor shards: each shard's logits stay
    on it; the max, the sum of exponentials and the target's logit are combined across shards."""
    rows = weights.shape[-1]
    tp = _split_over("vocab", rows, vocab_size)

    def nll(weights, hidden, targets):
        logits = jnp.einsum("btd,dv->btv", hidden, weights, preferred_element_type=jnp.float32)
        if tp is None:
            lse = jax.nn.logsumexp(logits, axis=-1)
            return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        peak = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), tp)
        lse = jnp.log(jax.lax.psum(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1), tp)) + peak
        ids = targets - jax.lax.axis_index(tp) * rows
        here = (ids >= 0) & (ids < rows)
        picked = jnp.take_along_axis(logits, jnp.clip(ids, 0, rows - 1)[..., None], axis=-1)[..., 0]
        return lse - jax.lax.psum(jnp.where(here, picked, 0.0), tp)

    # ALST: with tiling.loss_tiles > 1 no [S, vocab] logits exist whole
    return tiled(nll, tiles("loss"), weights, _gather_sequence(hidden), targets, what="tiling.loss_tiles")


class RMSNorm(nnx.Module):
    """Root-mean-square norm with statistics in float32; returns the input's dtype."""

    def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("embed",),
                               eager_sharding=False)

    def __call__(self, x, kernels="xla"):
        # kernels="xla" is pallas_kernels' jnp reference
        return pallas_kernels.rms_norm(x, self.scale[...], eps=self.eps, impl=kernels)


def rotary_angles(seq_len: int, head_dim: int, theta: float,
                  scaling: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of shape ``[seq_len, head_dim // 2]`` for positions ``0..seq_len-1``.

    ``scaling``: transformers' ``rope_scaling`` (``model.rope_scaling``): None or
    ``{"rope_type": "default"}``; ``{"rope_type": "linear", "factor": f}`` (the frequencies
    divided by ``f``, i.e. positions interpolated); ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1:
    wavelengths above ``original / low_freq_factor`` divided by ``factor``, below
    ``original / high_freq_factor`` kept, smoothly interpolated between), as transformers'
    ``_compute_linear_scaling_rope_parameters`` and ``_compute_llama3_parameters``.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    scaling = _rope_scaling(scaling)
    kind = None if scaling is None else scaling["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def _rope_scaling(scaling: Any) -> dict | None:
    """``model.rope_scaling`` checked and normalised (``check_rope_scaling``), or a ConfigError."""
    try:
        return check_rope_scaling(scaling)
    except ValueError as err:
        raise ConfigError(f"model.rope_scaling={scaling!r}: {err}") from None


def apply_rotary(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates the halves of the last axis of ``x [B, T, ..., head_dim]`` by position."""
    cos, sin = rope
    shape = (1, cos.shape[0]) + (1,) * (x.ndim - 3) + (cos.shape[1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _param(rngs: nnx.Rngs, shape, names, std, dtype) -> nnx.Param:
    value = jax.random.normal(rngs.params(), shape, dtype) * jnp.asarray(std, dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _zeros(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=names, eager_sharding=False)


# --- LoRA (model.lora) ----------------------------------------------------------------------------

LORA_SUFFIXES = ("_lora_a", "_lora_b")
# folded into a layer's key for its adapters' draws, so that they leave the base weights' draws as
# they are without LoRA (nnx's streams fold in their counts 0, 1, 2, ...)
_LORA_FOLD = 0x7FFFFFFF


def _lora_config(cfg: Any):
    """``cfg.lora`` when it asks for adapters (``rank`` > 0), else None."""
    lora = getattr(cfg, "lora", None)
    return lora if lora is not None and lora.rank > 0 else None


def lora_targets(cfg: Any) -> tuple[str, ...]:
    """The projections (``LORA_PROJECTIONS`` names, ``attn/wq`` ...) ``cfg.lora`` adapts; () without LoRA."""
    lora = _lora_config(cfg)
    if lora is None:
        return ()
    return tuple(name for name in LORA_PROJECTIONS if any(re.search(p, name) for p in lora.targets))


def _add_lora(module: nnx.Module, cfg: Any, prefix: str, rngs: nnx.Rngs, dtype) -> None:
    """Gives ``module``'s targeted weights ``W [d_in, d_out]`` (``prefix/name``) their adapters:
    ``<name>_lora_a [d_in, r]`` uniform in ``±1/sqrt(r)`` (DeepSpeed-Chat's ``kaiming_uniform_(a=√5)``
    of its ``[d_in, r]`` right weight, whose fan-in torch takes as ``r``) and ``<name>_lora_b
    [r, d_out]`` zeros, with ``W``'s logical axes on their outer dimensions. The draws come from
    the ``params`` stream's key without advancing it: the base weights stay those of the same
    seed without LoRA."""
    names = [t.split("/")[1] for t in lora_targets(cfg) if t.startswith(prefix + "/")]
    if not names:
        return
    rank = _lora_config(cfg).rank
    stream = rngs.params
    key = jax.random.fold_in(jax.random.fold_in(stream.key[...], _LORA_FOLD), stream.count[...])
    bound = 1 / math.sqrt(rank)
    for name in names:
        weight = getattr(module, name)
        (d_in, d_out), (in_axis, out_axis) = weight.get_value().shape, weight.get_metadata()["out_sharding"]
        a = jax.random.uniform(jax.random.fold_in(key, LORA_PROJECTIONS.index(f"{prefix}/{name}")),
                               (d_in, rank), dtype, -bound, bound)
        setattr(module, name + "_lora_a", nnx.LoRAParam(a, out_sharding=(in_axis, None), eager_sharding=False))
        setattr(module, name + "_lora_b", nnx.LoRAParam(jnp.zeros((rank, d_out), dtype), out_sharding=(None, out_axis),
                                                        eager_sharding=False))
    module.lora_scale = float(_lora_config(cfg).alpha) / rank


def _adapted(module: nnx.Module, name: str) -> jax.Array:
    """The weight ``name`` of ``module`` as the layer reads it: with adapters ``W + scale x A @ B``."""
    weight = getattr(module, name)[...]
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return weight
    return lora_fused(weight, a[...], getattr(module, name + "_lora_b")[...], module.lora_scale)


def lora_fused(weight, a, b, scale: float) -> jax.Array:
    """``weight + scale x a @ b`` in ``weight``'s dtype, summed in float32; batched over leading
    (``layers``) axes."""
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return (jnp.asarray(weight).astype(jnp.float32) + scale * delta).astype(weight.dtype)


def fuse_lora(params: dict, cfg: Any) -> dict:
    """Plain GPT params from LoRA ones: every weight with adapters ``<name>_lora_a/_lora_b`` becomes
    ``W + alpha / rank x A @ B`` (``lora_fused``, per layer of a stack) and the adapters are dropped.

    Args:
      params: the GPT's ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (stacked or not; host
        or device arrays); params without adapters come back as they are.
      cfg: the model config the params were made with (``model.lora`` gives the scaling).

    Returns:
      Params a GPT of the same config with ``lora.rank`` 0 takes, computing what the LoRA model does.
    """
    lora = _lora_config(cfg)

    def walk(node, path):
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if isinstance(key, str) and key.endswith(LORA_SUFFIXES):
                continue
            where = "/".join((*path, str(key)))
            a, b = node.get(f"{key}_lora_a"), node.get(f"{key}_lora_b")
            if a is None and b is None:
                out[key] = walk(value, (*path, str(key)))
                continue
            if lora is None:
                raise ConfigError(f"params {where} has LoRA adapters but the model config's lora.rank is 0; give "
                                  "the config the params were trained with (its model.lora)")
            if a is None or b is None or np.shape(a)[-1] != lora.rank or np.shape(b)[-2] != lora.rank:
                raise ConfigError(f"params {where}: its adapters {key}_lora_a {np.shape(a)} and {key}_lora_b "
                                  f"{np.shape(b)} do not have model.lora.rank={lora.rank}; give the config the "
                                  "params were trained with")
            if not isinstance(value, (jax.Array, np.ndarray)):
                raise ConfigError(f"params {where} is not an array ({type(value).__name__}): fuse the LoRA adapters "
                                  "(zjax.models.gpt.fuse_lora) before quantizing")
            out[key] = lora_fused(value, a, b, float(lora.alpha) / lora.rank)
        return out

    return walk(params, ())


def _check_config(cfg: Any) -> None:
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and cfg.d_model % cfg.n_heads:
        raise ConfigError(f"model.d_model={cfg.d_model} must be divisible by "
                          f"model.n_heads={cfg.n_heads}, or set model.head_dim")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={cfg.n_kv_heads} must divide "
                          f"model.n_heads={cfg.n_heads}, e.g. 1 or {cfg.n_heads}")
    if head_dim is not None and (head_dim <= 0 or head_dim % 2):
        raise ConfigError(f"rotary embeddings need an even, positive head dim; model.head_dim={head_dim}")
    if head_dim is None and (cfg.d_model // cfg.n_heads) % 2:
        raise ConfigError(f"rotary embeddings need an even head dim; model.d_model="
                          f"{cfg.d_model} / model.n_heads={cfg.n_heads} is odd")
    _rope_scaling(getattr(cfg, "rope_scaling", None))
    _check_lora(cfg)


def _check_lora(cfg: Any) -> None:
    """``model.lora`` as the schema checks it, for configs that are not a ``ModelConfig``."""
    lora = _lora_config(cfg)
    if lora is None:
        return
    for pattern in lora.targets:
        if not any(re.search(pattern, name) for name in LORA_PROJECTIONS):
            raise ConfigError(f"model.lora.targets: {pattern!r} matches none of the projections "
                              f"{', '.join(LORA_PROJECTIONS)}; use a regular expression that re.search finds in one")
    mlp = [t for t in lora_targets(cfg) if t.startswith("mlp/")]
    if mlp and _moe_config(cfg) is not None:
        raise ConfigError(f"model.lora.targets={list(lora.targets)} adapts the MLP projections {', '.join(mlp)}, but "
                          "the model has MoE layers: LoRA does not adapt MoE experts; target the attention only "
                          "(model.lora.targets: ['attn/'])")
