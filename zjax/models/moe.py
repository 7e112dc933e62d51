"""Mixture-of-Experts: DeepSpeed's gating (top-1, top-2, top-k) and an MoE feed-forward layer.

The gating follows ``deepspeed.moe.sharded_moe`` (``top1gating``, ``top2gating``,
``topkgating``; in float32): softmax gates over the router's logits; an expert's
*capacity* is ``C = ceil(S / E * capacity_factor * k)``, at least ``min_capacity``, for
``S`` tokens, ``E`` experts and top-``k`` routing; the load-balancing loss is
``E * sum_e me_e * ce_e`` (``me``: mean gate of expert e, ``ce``: the fraction of tokens
whose *first* choice is e; for k > 2 ``E^2 / k * mean(me * ce)`` over all k choices), computed
before any token is dropped; ``counts`` are the tokens routed to each expert before
capacity (DeepSpeed's ``exp_counts``).

- top-1: the argmax of the gates (of logits plus Gumbel noise under
  ``noisy_gate_policy='RSample'``); an expert over capacity keeps ``C`` of its tokens,
  chosen at random under ``use_rts`` (random token selection), else the first ``C`` in
  token order; the combine weight is the token's gate (not renormalized).
- top-2: the first choice as top-1 (without noise); the second is the argmax of the other
  experts' logits, plus Gumbel noise under ``second_expert_sampling`` (DeepSpeed's
  ``top2_2nd_expert_sampling``, default on); slots are filled first choices first, and a
  token's two gates are renormalized to sum to 1 over the choices kept.
- top-k (k > 2): the k largest gates; an expert over capacity keeps its ``C`` tokens of
  largest gate (``drop_policy='probs'``) or the first ``C`` (``'position'``); gates are
  renormalized over the choices kept.

``drop_tokens=False`` keeps every token. DeepSpeed then sizes the buffers by the largest
expert count of the step, a shape that changes per step; under ``jit`` shapes are static,
so the capacity is the worst case, ``S`` (an expert receives a token at most once).

Dispatch here is the dense GShard form: ``dispatch [S, E, C]`` one-hot masks gather each
expert's ``[C, d]`` slots (``einsum('sec,sd->ecd')``), the experts run batched over ``E``,
and ``combine [S, E, C]`` weights bring their outputs back (``einsum('sec,ecd->sd')``).

``dispatch='ragged'`` is the dropless alternative: each token's choices sorted by expert and
multiplied by grouped matmuls (``lax.ragged_dot``), no capacity slots. ``dispatch='auto'``
picks it where it can run and pays (``resolve_dispatch``), dense slots elsewhere.

Expert parallelism: ``moe_ffn(..., expert_axis=...)`` inside a region manual over the axis
(two all-to-alls per layer forward); the NNX ``MoE`` enters that region itself under a mesh
with an ``expert`` axis (the train step splits the batch over it too), and splits each
expert's hidden width over ``tensor`` (partial sums, summed once). Auxiliary-loss-free
balancing (DeepSeek-V3): a per-expert selection bias (``route(bias=)``, ``MoE(balance_bias=True)``)
that the train step moves by ``-model.moe.bias_update_rate * sign(load - mean load)``.
Not built: ragged dispatch across devices (a ragged all-to-all; dropless expert parallelism
uses dense dispatch with the worst-case capacity). The reference GPT's ``model.moe`` block
uses this layer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from zjax.errors import ConfigError

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
DROP_POLICIES = ("probs", "position")
DISPATCHES = ("dense", "ragged", "auto")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """DeepSpeed's ``TopKGate`` settings (``deepspeed.moe.layer.MoE``'s arguments, same names and
    defaults; ``second_expert_sampling`` is its ``top2_2nd_expert_sampling``)."""

    num_experts: int
    top_k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: str | None = None
    use_rts: bool = True
    second_expert_sampling: bool = True
    drop_policy: str = "probs"
    dispatch: str = "dense"

    def __post_init__(self):
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts={self.num_experts}: use at least 1 expert")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k}: use 1 <= top_k <= num_experts={self.num_experts}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor={self.capacity_factor}, eval_capacity_factor="
                              f"{self.eval_capacity_factor}: use positive factors (1.0 = an even share)")
        if self.min_capacity < 0:
            raise ConfigError(f"moe.min_capacity={self.min_capacity}: use 0 or more")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ConfigError(f"moe.noisy_gate_policy={self.noisy_gate_policy!r}: use none, Jitter or RSample")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"moe.drop_policy={self.drop_policy!r}: use probs or position")
        if self.dispatch not in DISPATCHES:
            raise ConfigError(f"moe.dispatch={self.dispatch!r}: use dense (capacity slots), ragged (grouped matmuls) "
                              "or auto")
        if self.dispatch == "ragged" and self.drop_tokens:
            raise ConfigError("moe.dispatch='ragged' runs every token's experts (dropless): set moe.drop_tokens: false, "
                              "or use dispatch: dense for capacity and token dropping")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Where each token goes, and what the gate reports.

    Attributes:
      weights: ``[S, E]`` float32, token s's combine weight for expert e (0 where not routed or dropped).
      combine: ``[S, E, C]`` float32, token s's weight at slot c of expert e (0 where it is not);
        None when the slots were not asked for (``route(..., slots=False)``).
      dispatch: ``[S, E, C]`` bool, ``combine > 0`` as DeepSpeed's ``dispatch_mask`` (or None).
      aux_loss: DeepSpeed's ``l_aux`` (before any coefficient).
      z_loss: ``mean(logsumexp(logits)^2)`` (ST-MoE's router z-loss, before any coefficient).
      counts: ``[E]`` int32, tokens routed to each expert before capacity (``exp_counts``).
      dropped: int32, token-to-expert assignments capacity dropped.
      balance: with a per-expert selection ``bias`` (auxiliary-loss-free balancing), a term whose
        value is 0 and whose gradient with respect to ``bias`` is each expert's load minus the
        mean load (add it to the loss: the train step moves ``bias`` by ``-rate * sign(gradient)``,
        DeepSeek-V3's update); 0 without a bias.
    """

    weights: jax.Array
    combine: jax.Array | None
    dispatch: jax.Array | None
    aux_loss: jax.Array
    z_loss: jax.Array
    counts: jax.Array
    dropped: jax.Array
    balance: jax.Array | float = 0.0

    @property
    def capacity(self) -> int:
        return self.combine.shape[-1]

    def top(self, k: int) -> tuple[jax.Array, jax.Array]:
        """Each token's ``k`` experts and weights, ``([S, k] int32, [S, k] float32)`` (dropless: its choices)."""
        weight, expert = jax.lax.top_k(self.weights, k)
        return expert.astype(jnp.int32), weight


def capacity(tokens: int, experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's ``_capacity``: ``ceil(S / E * capacity_factor * k)``, at least ``min_capacity``.

    Example:
      >>> capacity(64, 8, 1, 1.0, 4), capacity(64, 8, 2, 1.25, 4), capacity(8, 8, 1, 1.0, 4)
      (8, 20, 4)
    """
    return max(math.ceil((tokens / experts) * (capacity_factor * k)), min_capacity)


def _gumbel(key, shape):
    return jax.random.gumbel(key, shape, jnp.float32)


def _rank_in_column(priority: jax.Array) -> jax.Array:
    """Per column, each row's rank by ``priority``, highest first (0 = highest; ties by row)."""
    order = jnp.argsort(-priority, axis=0, stable=True)
    return jnp.argsort(order, axis=0, stable=True)


def _slots(locations: jax.Array, mask: jax.Array, cap: int) -> jax.Array:
    """``[S, E]`` slot indices of kept assignments -> ``[S, E, C]`` one-hot (zero where not kept)."""
    return jax.nn.one_hot(jnp.where(mask, locations, cap), cap, dtype=jnp.float32)


def route(logits: jax.Array, cfg: GateConfig, *, train: bool = True, key: jax.Array | None = None,
          slots: bool = True, bias: jax.Array | None = None) -> Routing:
    """The gate's decisions for ``logits [S, E]`` (any float dtype; computed in float32).

    ``slots=False`` skips the ``[S, E, C]`` slot tensors (the grouped-matmul path needs only
    ``weights``; dropless, C = S would make them S^2 E).

    ``key`` feeds the random parts (RSample noise, random token selection, the second
    expert's Gumbel sampling); they are skipped without a key, and outside training
    (``train=False``, which also switches to ``eval_capacity_factor``).

    ``bias [E]`` (auxiliary-loss-free balancing, DeepSeek-V3): the experts are *chosen* by
    ``gates + bias`` (top-2: both choices; noise and sampling are not applied), while the
    combine weights stay the unbiased gates; ``Routing.balance`` carries the load imbalance
    to the bias's gradient.
    """
    logits = logits.astype(jnp.float32)
    s, e = logits.shape
    if e != cfg.num_experts:
        raise ConfigError(f"the router gives {e} logits per token but moe.num_experts={cfg.num_experts}")
    k = cfg.top_k
    factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    cap = capacity(s, e, k, factor, cfg.min_capacity) if cfg.drop_tokens else s
    keys = list(jax.random.split(key, 3)) if (key is not None and train) else [None] * 3
    gates = jax.nn.softmax(logits, axis=-1)
    me = jnp.mean(gates, axis=0)
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))

    chosen = None if bias is None else gates + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if k == 1:
        noisy = logits + _gumbel(keys[0], logits.shape) if cfg.noisy_gate_policy == "RSample" and keys[0] is not None \
            else gates
        noisy = noisy if chosen is None else chosen
        mask = jax.nn.one_hot(jnp.argmax(noisy, axis=-1), e, dtype=jnp.int32)
        counts = mask.sum(0)
        aux = jnp.sum(me * jnp.mean(mask.astype(jnp.float32), axis=0)) * e
        if cfg.drop_tokens:
            if cfg.use_rts and keys[1] is not None:
                priority = jnp.where(mask > 0, jax.random.uniform(keys[1], mask.shape), -1.0)
            else:  # first come, first served
                priority = jnp.where(mask > 0, -jnp.arange(s, dtype=jnp.float32)[:, None], -jnp.inf)
            mask = mask * (_rank_in_column(priority) < cap)
        weights = gates * mask
        combine = weights[..., None] * _slots(jnp.cumsum(mask, axis=0) - 1, mask > 0, cap) if slots else None
        kept = mask.sum()
    elif k == 2:
        first = jnp.argmax(gates if chosen is None else chosen, axis=-1)
        mask1 = jax.nn.one_hot(first, e, dtype=jnp.int32)
        second_logits = logits + _gumbel(keys[2], logits.shape) \
            if cfg.second_expert_sampling and keys[2] is not None else logits
        second_logits = second_logits if chosen is None else chosen
        mask2 = jax.nn.one_hot(jnp.argmax(jnp.where(mask1 > 0, -jnp.inf, second_logits), axis=-1), e,
                               dtype=jnp.int32)
        loc1 = jnp.cumsum(mask1, axis=0) - 1
        loc2 = jnp.cumsum(mask2, axis=0) - 1 + mask1.sum(0, keepdims=True)
        aux = jnp.mean(me * jnp.mean(mask1.astype(jnp.float32), axis=0)) * e * e
        counts = (mask1 + mask2).sum(0)
        if cfg.drop_tokens:
            mask1 = mask1 * (loc1 < cap)
            mask2 = mask2 * (loc2 < cap)
        g1 = jnp.sum(gates * mask1, axis=-1)
        g2 = jnp.sum(gates * mask2, axis=-1)
        denom = jnp.maximum(g1 + g2, jnp.finfo(jnp.float32).eps)
        weights = (g1 / denom)[:, None] * mask1 + (g2 / denom)[:, None] * mask2
        combine = ((g1 / denom)[:, None, None] * mask1[..., None] * _slots(loc1, mask1 > 0, cap)
                   + (g2 / denom)[:, None, None] * mask2[..., None] * _slots(loc2, mask2 > 0, cap)) if slots else None
        kept = mask1.sum() + mask2.sum()
    else:
        _, top_idx = jax.lax.top_k(gates if chosen is None else chosen, k)
        mask = jnp.sum(jax.nn.one_hot(top_idx, e, dtype=jnp.int32), axis=1)
        counts = mask.sum(0)
        aux = jnp.mean(me * jnp.mean(mask.astype(jnp.float32), axis=0)) * e * e / k
        if cfg.drop_tokens:
            if cfg.drop_policy == "probs":
                mask = mask * (_rank_in_column(jnp.where(mask > 0, gates, -1.0)) < cap)
            else:
                mask = mask * (jnp.cumsum(mask, axis=0) - 1 < cap)
        weights = gates * mask
        weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
        combine = weights[..., None] * _slots(jnp.cumsum(mask, axis=0) - 1, mask > 0, cap) if slots else None
        kept = mask.sum()
    balance = 0.0
    if bias is not None:  # value 0; d/d bias = each expert's load minus the mean load
        load = jax.lax.stop_gradient(counts.astype(jnp.float32))
        balance = jnp.sum((load - jnp.mean(load)) * (bias - jax.lax.stop_gradient(bias)).astype(jnp.float32))
    return Routing(weights, combine, None if combine is None else combine > 0, aux, z_loss,
                   counts.astype(jnp.int32), (counts.sum() - kept).astype(jnp.int32), balance)


# --- the layer -------------------------------------------------------------------------------


def expert_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Each expert's SwiGLU MLP on its slots: ``x [E, C, d]``, ``w_gate/w_up [E, d, f]``, ``w_down [E, f, d]``."""
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x, w_gate)) * jnp.einsum("ecd,edf->ecf", x, w_up)
    return jnp.einsum("ecf,efd->ecd", h, w_down)


def moe_ffn(x: jax.Array, params: dict, cfg: GateConfig, *, train: bool = True, key: jax.Array | None = None,
            expert_axis: str | None = None, mlp_axis: str | None = None) -> tuple[jax.Array, Routing]:
    """The MoE feed-forward (functional form): ``x [..., d]`` -> ``(y [..., d], routing)``.

    ``params``: ``router [d, E]``; the experts' ``w_gate``/``w_up`` ``[E, d, f]`` and ``w_down``
    ``[E, f, d]``; optionally ``residual`` (PR-MoE, DeepSpeed's ``use_residual``: a dense MLP
    ``{w_gate, w_up [d, f], w_down [f, d]}`` mixed with the experts by ``coefficient [d, 2]``,
    softmax weights per token), ``shared`` (DeepSeek-style shared experts: a dense MLP of the
    same form whose output is added) and ``expert_bias [E]`` (auxiliary-loss-free balancing:
    the experts are chosen by gate + bias, see ``route``).

    ``expert_axis``: inside a region manual over that mesh axis (size ``E_p``), expert
    parallelism: the experts' weights are this device's ``E / E_p`` experts, ``x`` its own
    tokens (routed alone, as DeepSpeed routes each rank's). The slots ``[E, C, d]`` go to
    their experts' devices in one all-to-all (device j receives ``[E / E_p, E_p * C, d]``:
    its experts' slots from every device) and come back in a second; the backward pass runs
    the two transposed. Expert weights never move. ``mlp_axis``: the manual axis the experts'
    (and dense MLPs') hidden width ``f`` is split over (tensor parallelism inside each expert):
    each MLP's output is summed over it once.
    """
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    gate_in = tokens.astype(jnp.float32)
    if cfg.noisy_gate_policy == "Jitter" and train and key is not None:
        key, jitter = jax.random.split(key)
        gate_in = gate_in * jax.random.uniform(jitter, gate_in.shape, minval=1.0 - 1e-2, maxval=1.0 + 1e-2)
    logits = gate_in @ params["router"].astype(jnp.float32)
    if resolve_dispatch(cfg, expert_axis) == "ragged":
        if expert_axis is not None:
            raise ConfigError("moe.dispatch='ragged' with expert parallelism is not built yet (it needs a ragged "
                              "all-to-all); use dispatch: dense with a worst-case capacity (drop_tokens: false)")
        routing = route(logits, cfg, train=train, key=key, slots=False, bias=params.get("expert_bias"))
        y = _ragged_experts(tokens, routing, params, cfg.top_k)
        return _sum_over(_dense_parts(y, tokens, params), mlp_axis).reshape(shape), routing
    routing = route(logits, cfg, train=train, key=key, bias=params.get("expert_bias"))
    slots = jnp.einsum("sec,sd->ecd", routing.dispatch.astype(tokens.dtype), tokens)
    # Under mlp_axis every MLP output here is this shard's partial sum (row-parallel w_down); they
    # are combined, mixed and added as partial sums and summed over the shards once, at the end.
    if expert_axis is None:
        out = expert_mlp(slots, params["w_gate"], params["w_up"], params["w_down"])
    else:
        local = params["w_gate"].shape[0]
        if local * jax.lax.axis_size(expert_axis) != cfg.num_experts:
            raise ConfigError(f"moe.num_experts={cfg.num_experts} experts do not split into this device's {local} "
                              f"over the {jax.lax.axis_size(expert_axis)} devices of {expert_axis!r}; use a "
                              f"num_experts divisible by mesh.{expert_axis}")
        mine = jax.lax.all_to_all(slots, expert_axis, split_axis=0, concat_axis=1, tiled=True)
        out = expert_mlp(mine, params["w_gate"], params["w_up"], params["w_down"])
        out = jax.lax.all_to_all(out, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    y = jnp.einsum("sec,ecd->sd", routing.combine.astype(out.dtype), out)
    return _sum_over(_dense_parts(y, tokens, params), mlp_axis).reshape(shape), routing


def resolve_dispatch(cfg: GateConfig, expert_axis: str | None = None, backend: str | None = None) -> str:
    """The dispatch ``moe_ffn`` runs: ``cfg.dispatch``, or for ``auto`` grouped matmuls (``ragged``)
    where they pay and can run (dropless, no expert axis, on a GPU or TPU, where ``ragged_dot``
    is a grouped-matmul kernel) and capacity slots (``dense``) elsewhere.

    Example:
      >>> cfg = GateConfig(8, drop_tokens=False, dispatch="auto")
      >>> resolve_dispatch(cfg, backend="gpu"), resolve_dispatch(cfg, backend="cpu"), resolve_dispatch(cfg, "expert", "tpu")
      ('ragged', 'dense', 'dense')
    """
    if cfg.dispatch != "auto":
        return cfg.dispatch
    from pallas_kernels import dispatch

    here = dispatch.backend() if backend is None else backend
    return "ragged" if not cfg.drop_tokens and expert_axis is None and here in ("gpu", "tpu") else "dense"


def _sum_over(x: jax.Array, axis: str | None) -> jax.Array:
    return x if axis is None else jax.lax.psum(x, axis)


def _ragged_experts(tokens: jax.Array, routing: Routing, params: dict, k: int) -> jax.Array:
    """Dropless grouped matmuls (``lax.ragged_dot``): every token's k choices sorted by expert,
    each expert's rows multiplied by its own weights, the results weighted back per token."""
    expert, weight = routing.top(k)
    flat = expert.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = tokens[order // k]
    sizes = jnp.bincount(flat, length=params["w_gate"].shape[0]).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(rows, params["w_gate"], sizes)) * jax.lax.ragged_dot(rows, params["w_up"], sizes)
    out = jax.lax.ragged_dot(h, params["w_down"], sizes)
    out = jnp.zeros_like(out).at[order].set(out).reshape(tokens.shape[0], k, -1)
    return jnp.einsum("skd,sk->sd", out, weight.astype(out.dtype))


def _dense_parts(y: jax.Array, tokens: jax.Array, params: dict) -> jax.Array:
    """PR-MoE's residual MLP mixed in and the shared experts added, where ``params`` has them
    (linear in the MLPs' outputs, so it takes and gives partial sums over a split hidden width)."""
    if "residual" in params:
        r = params["residual"]
        dense = expert_mlp(tokens[None], r["w_gate"][None], r["w_up"][None], r["w_down"][None])[0]
        coef = jax.nn.softmax(tokens.astype(jnp.float32) @ params["coefficient"].astype(jnp.float32), axis=-1)
        y = y * coef[:, :1].astype(y.dtype) + dense * coef[:, 1:].astype(y.dtype)
    if "shared" in params:
        sh = params["shared"]
        y = y + expert_mlp(tokens[None], sh["w_gate"][None], sh["w_up"][None], sh["w_down"][None])[0]
    return y


def _init(rngs: nnx.Rngs, shape, fan_in: int, dtype, axes, std: float | None = None):
    std = 1.0 / math.sqrt(fan_in) if std is None else std
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * std
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


class MoE(nnx.Module):
    """An MoE feed-forward block as an NNX module (``moe_ffn`` on its parameters).

    ``MoE(d_model, d_ff, GateConfig(...), rngs=nnx.Rngs(0), use_residual=False, shared_experts=0,
    balance_bias=False)``; calling it on ``x [..., d_model]`` returns ``(y, routing)``.
    ``balance_bias``: a per-expert selection bias ``expert_bias`` (zeros; auxiliary-loss-free
    balancing): add ``routing.balance`` to the loss and set ``model.moe.bias_update_rate``; the
    train step then moves it by ``-rate * sign(load - mean load)`` each step instead of the
    optimizer. Parameters carry logical axes
    (``experts``, ``embed``, ``mlp``) for the sharding rules. ``init_std``/``out_std``: the
    normal init's deviation of the input and output projections (default 1/sqrt(fan-in)).
    ``deterministic`` (set by ``module.eval()``): gate as outside training (no noise, no
    random selection, ``eval_capacity_factor``).
    """

    def __init__(self, d_model: int, d_ff: int, cfg: GateConfig, *, rngs: nnx.Rngs, use_residual: bool = False,
                 shared_experts: int = 0, param_dtype: Any = jnp.float32, init_std: float | None = None,
                 out_std: float | None = None, balance_bias: bool = False):
        e = cfg.num_experts
        self.cfg = cfg
        self.deterministic = False
        self.router = _init(rngs, (d_model, e), d_model, param_dtype, ("embed", None), init_std)
        self.w_gate = _init(rngs, (e, d_model, d_ff), d_model, param_dtype, ("experts", "embed", "mlp"), init_std)
        self.w_up = _init(rngs, (e, d_model, d_ff), d_model, param_dtype, ("experts", "embed", "mlp"), init_std)
        self.w_down = _init(rngs, (e, d_ff, d_model), d_ff, param_dtype, ("experts", "mlp", "embed"), out_std)
        self.residual = nnx.data(None)
        self.coefficient = nnx.data(None)
        self.shared = nnx.data(None)
        if use_residual:
            self.residual = _dense(rngs, d_model, d_ff, param_dtype, init_std, out_std)
            self.coefficient = _init(rngs, (d_model, 2), d_model, param_dtype, ("embed", None), init_std)
        if shared_experts:
            self.shared = _dense(rngs, d_model, d_ff * shared_experts, param_dtype, init_std, out_std)
        self.expert_bias = nnx.data(None)
        if balance_bias:
            self.expert_bias = nnx.Param(jnp.zeros((e,), param_dtype), out_sharding=(None,), eager_sharding=False)

    def __call__(self, x: jax.Array, *, train: bool | None = None, key: jax.Array | None = None,
                 x_axes: tuple | None = None):
        """``(y, routing)`` for ``x [..., d_model]`` whose logical axes are ``x_axes`` (default
        ``("batch", ..., "embed")``). Under a mesh with an ``expert`` (or ``tensor``) axis the
        layer runs in a region manual over it (``zjax.parallel.sharding.per_shard``): each
        device routes its own rows and the experts' slots travel by two all-to-alls. The routing
        returned then holds what the devices report together (``aux_loss``/``z_loss`` their
        mean, ``counts``/``dropped`` their sum; ``weights``, ``combine`` and ``dispatch`` None)."""
        from zjax.parallel.sharding import per_shard, split_axis

        train = not self.deterministic if train is None else train
        params = {"router": self.router[...], "w_gate": self.w_gate[...], "w_up": self.w_up[...],
                  "w_down": self.w_down[...]}
        axes = {"router": ("embed", None), "w_gate": ("experts", "embed", "mlp"), "w_up": ("experts", "embed", "mlp"),
                "w_down": ("experts", "mlp", "embed")}
        dense_axes = {"w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed")}
        if self.residual is not None:
            params["residual"] = {k: v[...] for k, v in self.residual.items()}
            params["coefficient"] = self.coefficient[...]
            axes["residual"], axes["coefficient"] = dense_axes, ("embed", None)
        if self.shared is not None:
            params["shared"] = {k: v[...] for k, v in self.shared.items()}
            axes["shared"] = dense_axes
        if self.expert_bias is not None:
            params["expert_bias"], axes["expert_bias"] = self.expert_bias[...], (None,)
        leaves, tree = jax.tree.flatten(params)
        leaf_axes = tree.flatten_up_to(axes)
        x_axes = x_axes if x_axes is not None else ("batch", *[None] * (x.ndim - 2), "embed")
        key = jax.random.key(0) if key is None else key  # unused unless training draws noise
        random = train and (self.cfg.use_rts or self.cfg.noisy_gate_policy or self.cfg.second_expert_sampling)
        cfg = self.cfg

        def local(x, key_data, *leaves):
            expert_axis = split_axis("experts")
            y, routing = moe_ffn(x, jax.tree.unflatten(tree, leaves), cfg, train=train,
                                 key=jax.random.wrap_key_data(key_data) if random else None,
                                 expert_axis=expert_axis, mlp_axis=split_axis("mlp"))
            stats = (routing.aux_loss, routing.z_loss, routing.counts, routing.dropped,
                     jnp.asarray(routing.balance, jnp.float32))
            if expert_axis is not None:  # each device routed its own rows
                n = jax.lax.axis_size(expert_axis)
                stats = (jax.lax.psum(stats[0], expert_axis) / n, jax.lax.psum(stats[1], expert_axis) / n,
                         jax.lax.psum(stats[2], expert_axis), jax.lax.psum(stats[3], expert_axis),
                         jax.lax.psum(stats[4], expert_axis))
            mlp_axis = split_axis("mlp")
            if mlp_axis is not None:  # the tensor shards routed the same rows: one copy of each figure
                t = jax.lax.axis_size(mlp_axis)
                stats = tuple(jax.lax.psum(x, mlp_axis) // t if jnp.issubdtype(x.dtype, jnp.integer)
                              else jax.lax.pmean(x, mlp_axis) for x in stats)
            return y, *stats

        y, aux, z, counts, dropped, balance = per_shard(local, (x_axes, None, *leaf_axes), [x_axes] + [None] * 5)(
            x, jax.random.key_data(key), *leaves)
        return y, Routing(None, None, None, aux, z, counts, dropped, balance)


def _dense(rngs, d_model, d_ff, dtype, init_std=None, out_std=None) -> nnx.Dict:
    return nnx.Dict(w_gate=_init(rngs, (d_model, d_ff), d_model, dtype, ("embed", "mlp"), init_std),
                    w_up=_init(rngs, (d_model, d_ff), d_model, dtype, ("embed", "mlp"), init_std),
                    w_down=_init(rngs, (d_ff, d_model), d_ff, dtype, ("mlp", "embed"), out_std))
