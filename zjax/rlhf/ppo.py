"""PPO with four models, as DeepSpeed-Chat runs it, on zjax's train steps and inference engine.

The actor and the critic are two ``make_train_step`` instances, each with its own config (ZeRO
stage, precision, optimizer); the reference and reward models are frozen copies: a
``TrainState`` without optimizer state, run through ``TrainStep.per_example`` in the same
sharded layout (no optimizer state, gathered a layer at a time under ZeRO-3). The hybrid engine
is one ``zjax.inference.Engine``: before each rollout the actor's parameters are re-laid out
from the training layout onto the engine's mesh (``Engine.load_params``; under ZeRO-3 that
gathers them once per rollout), the prompts are generated with the paged KV cache and continuous
batching, and the engine keeps only those weights and its cache between rollouts (or frees both,
``release_memory``: DeepSpeed-Chat's ``release_inference_cache``).

One iteration (``PPOTrainer.iteration``):

1. rollout: sample a response of at most ``max_new_tokens`` for every prompt (a stop token ends
   it and is part of it); the response mask is 1 on its tokens;
2. score: ``reward_fn(tokens, mask) -> [B]`` (a reward model's ``per_example``, or any
   function), the actor's log-probs from the training-sharded forward (``old_logp``, equal to
   the engine's sampling log-probs), the reference's, the critic's values;
3. rewards: ``-kl_coef * (logp - ref_logp)`` per token plus the score clipped to
   ``±clip_reward_value`` at the last response token (DeepSpeed-Chat's ``compute_rewards``),
   GAE with ``gamma``, ``lam`` (``get_advantages_and_returns``);
4. ``ppo_epochs`` updates of the actor (clipped surrogate, ``cliprange``) and of the critic
   (clipped value loss, ``cliprange_value``) on the whole rollout.

Defaults are DeepSpeed-Chat's (``kl_ctl`` 0.1, ``clip_reward_value`` 5, ``cliprange`` 0.2,
``cliprange_value`` 0.2, ``gamma`` 1, ``lam`` 0.95).

The rollout layout (shared with ``zjax.rlhf.preference``): prompts may have any lengths up to
``max_prompt_len``; each row of ``tokens [B, L]`` (``L = max_prompt_len + max_new_tokens``) is
its prompt, its response and padding, and every per-token array (``mask``, log-probs, values,
rewards, advantages) is ``[B, L - 1]`` over the *targets* ``tokens[:, 1:]``: ``mask`` is 1 where
the target is a response token. The model reads ``tokens[:, :-1]`` (causal, so the right padding
changes nothing before it); no prompt is padded on the left.

Beyond DeepSpeed-Chat's loop: an exponential moving average of the actor (``ema_decay``, its
``enable_ema``), PPO-ptx (``ptx_coef``: InstructGPT's pretraining term ``ptx_coef * LM loss`` on a
batch of pretraining tokens, added to the actor's loss in the same step, where DeepSpeed-Chat
takes a second optimizer step with ``unsup_coef``), and advantage whitening as an option.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zjax.rlhf import losses


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """DeepSpeed-Chat's PPO settings and their defaults, plus EMA and PPO-ptx (off by default)."""

    kl_coef: float = 0.1
    clip_reward_value: float = 5.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    whiten_advantages: bool = False
    ema_decay: float | None = None  # DeepSpeed-Chat's enable_ema uses 0.992
    release_memory: bool = False  # DeepSpeed-Chat's release_inference_cache
    ptx_coef: float = 0.0  # DeepSpeed-Chat's unsup_coef (27.8 there, with its own step)


class ValueModel(nnx.Module):
    """A critic (or reward model): the reference GPT's trunk and a scalar head per position."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        from zjax.models.gpt import GPT

        self.gpt = GPT(cfg, rngs=rngs, param_dtype=param_dtype)
        self.value_head = nnx.Param(jnp.zeros((cfg.d_model,), param_dtype), out_sharding=("embed",),
                                    eager_sharding=False)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Values ``[B, T]`` of ``tokens [B, T]`` (float32)."""
        hidden = self.gpt.hidden(tokens)
        return jnp.einsum("btd,d->bt", hidden, self.value_head[...], preferred_element_type=jnp.float32)


def target_logprobs(model, batch: dict) -> jax.Array:
    """The GPT's log-probs ``[B, L-1]`` of ``batch["tokens"][:, 1:]`` (every target; the mask
    picks the response's)."""
    tokens = batch["tokens"]
    return losses.token_logprobs(model(tokens[:, :-1]), tokens[:, 1:])


def target_values(model, batch: dict) -> jax.Array:
    """A ``ValueModel``'s values ``[B, L-1]``: of the state before each target token
    (DeepSpeed-Chat's ``values[:, start:]``, ``start = prompt_len - 1``)."""
    return model(batch["tokens"][:, :-1])


def lm_loss(model, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The token mean of ``-log p(tokens[:, 1:])`` where ``mask [B, L-1]`` is 1 (SFT, PPO-ptx)."""
    logp = losses.token_logprobs(model(tokens[:, :-1]), tokens[:, 1:])
    return -losses.masked_mean(logp, mask)


def actor_loss(settings: PPOSettings) -> Callable:
    """The actor's train-step loss on a rollout batch (``tokens``, ``old_logp``, ``advantages``,
    ``mask``; with ``ptx_coef`` also ``ptx_tokens`` and ``ptx_mask``): the clipped surrogate as a
    token mean (plus ``ptx_coef`` times the pretraining batch's LM loss), weighted by the tokens."""
    def loss_fn(model, batch):
        loss, metrics = losses.ppo_policy_loss(target_logprobs(model, batch), batch["old_logp"],
                                               batch["advantages"], batch["mask"], clip_eps=settings.cliprange)
        if settings.ptx_coef and "ptx_tokens" in batch:
            ptx = lm_loss(model, batch["ptx_tokens"], batch["ptx_mask"])
            loss = loss + settings.ptx_coef * ptx
            metrics = {**metrics, "ptx_loss": ptx}
        return loss, {"weight": jnp.sum(batch["mask"].astype(jnp.float32)), **metrics}

    return loss_fn


def critic_loss(settings: PPOSettings) -> Callable:
    """The critic's train-step loss on a rollout batch (``tokens``, ``old_values``, ``returns``,
    ``mask``): the clipped value loss as a token mean, weighted by the tokens."""
    def loss_fn(model, batch):
        loss, metrics = losses.value_loss(target_values(model, batch), batch["old_values"], batch["returns"],
                                          batch["mask"], clip_range=settings.cliprange_value)
        return loss, {"weight": jnp.sum(batch["mask"].astype(jnp.float32)),
                      **{f"value_{k}": v for k, v in metrics.items()}}

    return loss_fn


def frozen(state):
    """A frozen copy of a train state: its parameters only (no optimizer state), for
    ``TrainStep.per_example`` (the reference model is the actor's initial state, frozen)."""
    return jax.tree.map(jnp.copy, state.replace(opt_state=None))


@functools.partial(jax.jit, donate_argnums=0)
def _ema_update(ema, current, decay):
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema, current)


def _trained_fields(state) -> dict:
    """The fields of a train state that hold trained values (the master and the replicated copy;
    frozen params never change)."""
    return {"master": state.master, "replicated": state.replicated}


class _Trainer:
    """What PPO and GRPO share: the hybrid engine, the iteration (a rollout, then updates), EMA."""

    def _setup(self, actor, actor_state, model_cfg, settings, max_prompt_len, engine_kw, engine, ref_state):
        from zjax.inference.engine import Engine

        if max_prompt_len + settings.max_new_tokens > model_cfg.max_seq_len:
            raise ValueError(f"max_prompt_len={max_prompt_len} + max_new_tokens={settings.max_new_tokens} is above "
                             f"model.max_seq_len={model_cfg.max_seq_len}; shorten one of them")
        self.actor, self.actor_state, self.settings = actor, actor_state, settings
        self.max_prompt_len = max_prompt_len
        self.ref_state = frozen(actor_state) if ref_state is None else ref_state
        self.iterations = 0
        # the actor's EMA in its training layout (sharded like the master)
        self.ema = None if settings.ema_decay is None else jax.tree.map(jnp.copy, _trained_fields(actor_state))
        if engine is None:
            kw = dict(max_seqs=actor.global_batch_size, max_seq_len=max_prompt_len + settings.max_new_tokens)
            kw["token_budget"] = max(kw["max_seqs"], 64)
            kw.update(engine_kw or {})
            engine = Engine.from_params(jax.device_get(actor_state.params), model_cfg, **kw)
        self.engine = engine

    def _track_ema(self) -> None:
        if self.ema is not None:
            self.ema = _ema_update(self.ema, _trained_fields(self.actor_state), jnp.float32(self.settings.ema_decay))

    def ema_state(self):
        """The actor's state with the EMA's parameters (``ema_decay``; None without it): its
        ``params``, a checkpoint of it, or ``Engine.load_params(ema_state().params)``."""
        return None if self.ema is None else self.actor_state.replace(**self.ema)

    def iteration(self, prompts, seed: int | None = None, ptx: dict | None = None) -> dict:
        """One rollout (sampling seeds from ``seed``, default the iteration number) and its
        updates; the metrics. ``ptx``: a pretraining batch (``tokens`` and ``mask``) for PPO-ptx."""
        seed = self.iterations if seed is None else seed
        batch, metrics = self.rollout(prompts, seed)
        if ptx is not None:
            batch = {**batch, "ptx_tokens": np.asarray(ptx["tokens"]), "ptx_mask": np.asarray(ptx["mask"])}
        metrics.update(self.update(batch))
        self.iterations += 1
        return metrics

    def _generate(self, prompts, seed: int) -> tuple:
        prompts = _as_rows(prompts, self.max_prompt_len)
        if len(prompts) != self.actor.global_batch_size:
            raise ValueError(f"{len(prompts)} prompts; the rollout is the actor's global batch, "
                             f"{self.actor.global_batch_size}")
        return prompts, generate(self.engine, self.actor_state, prompts, seed, self.settings, self.max_prompt_len)


class PPOTrainer(_Trainer):
    """DeepSpeed-Chat's PPO loop over zjax train steps (see the module docstring).

    Args:
      actor, critic: ``TrainStep``s made with ``actor_loss(settings)`` / ``critic_loss(settings)``
        and models ``GPT`` / ``ValueModel``; their global batch is the rollout size.
      actor_state, critic_state: their initial states; the reference is ``frozen(actor_state)``
        unless ``ref_state`` is given.
      reward_fn: ``reward_fn(tokens [B, L], mask [B, L-1]) -> [B]`` scores (numpy or jax), e.g. a
        reward model's ``preference.sequence_scores`` through ``per_example``.
      model_cfg: the actor's model config (the engine's).
      settings: ``PPOSettings``.
      max_prompt_len: the longest prompt a rollout may hold.
      engine_kw: keyword arguments of the hybrid engine (``zjax.inference.Engine``).
      engine: an existing engine for this model to reuse (its compiled pass; e.g. a second
        trainer of the same shapes); it gets the actor's weights at every rollout.
    """

    def __init__(self, actor, actor_state, critic, critic_state, reward_fn, model_cfg, settings: PPOSettings,
                 max_prompt_len: int, *, ref_state=None, engine_kw: dict | None = None, engine=None):
        self._setup(actor, actor_state, model_cfg, settings, max_prompt_len, engine_kw, engine, ref_state)
        self.critic, self.critic_state = critic, critic_state
        self.reward_fn = reward_fn

    def rollout(self, prompts, seed: int) -> tuple[dict, dict]:
        """Generates, scores and computes advantages for ``prompts`` (token lists, or a ``[B, P]``
        array); returns the batch for the updates and the rollout's metrics (times included)."""
        s = self.settings
        _, (tokens, mask, sample_logp, times) = self._generate(prompts, seed)
        t2 = time.perf_counter()
        batch = {"tokens": tokens}
        old_logp = self.actor.per_example(self.actor_state, batch, target_logprobs)
        ref_logp = self.actor.per_example(self.ref_state, batch, target_logprobs)
        values = self.critic.per_example(self.critic_state, batch, target_values)
        score = jnp.asarray(self.reward_fn(tokens, mask), jnp.float32)
        rewards, advantages, returns = _advantages(old_logp, ref_logp, score, jnp.asarray(mask), values,
                                                   s.kl_coef, s.clip_reward_value, s.gamma, s.lam,
                                                   s.whiten_advantages)
        t3 = time.perf_counter()
        host = jax.device_get({"old_logp": old_logp, "ref_logp": ref_logp, "values": values, "score": score,
                               "advantages": advantages, "returns": returns})
        metrics = {**_rollout_metrics(host, mask, sample_logp, s.kl_coef), **times, "score_s": t3 - t2}
        update = {"tokens": tokens, "mask": mask, "old_logp": host["old_logp"], "advantages": host["advantages"],
                  "old_values": host["values"], "returns": host["returns"]}
        return update, metrics

    def update(self, batch: dict) -> dict:
        """``ppo_epochs`` actor and critic steps on one rollout; their last metrics."""
        out = {}
        t0 = time.perf_counter()
        critic_batch = {k: v for k, v in batch.items() if not k.startswith("ptx_")}
        for _ in range(self.settings.ppo_epochs):
            self.actor_state, actor_metrics = self.actor(self.actor_state, batch)
            self.critic_state, critic_metrics = self.critic(self.critic_state, critic_batch)
        self._track_ema()
        host = jax.device_get((actor_metrics, critic_metrics))
        out.update({f"actor_{k}": float(v) for k, v in host[0].items()})
        out.update({f"critic_{k}": float(v) for k, v in host[1].items()})
        out["train_s"] = time.perf_counter() - t0
        return out


def _as_rows(prompts, max_prompt_len: int) -> list[list[int]]:
    rows = [[int(t) for t in p] for p in (prompts.tolist() if isinstance(prompts, np.ndarray) else prompts)]
    for i, row in enumerate(rows):
        if not 0 < len(row) <= max_prompt_len:
            raise ValueError(f"prompt {i} has {len(row)} tokens; prompts hold 1 to max_prompt_len={max_prompt_len}")
    return rows


def generate(engine, actor_state, prompts: list, seed: int, s, max_prompt_len: int) -> tuple:
    """The hybrid engine's rollout: the actor's weights re-laid out onto ``engine``, then one
    sampled response per prompt (request ``i`` seeded ``seed * B + i``). Returns ``(tokens
    [B, L], mask [B, L-1], sampling log-probs [B, L-1], times)`` in the rollout layout (module
    docstring), ``L = max_prompt_len + max_new_tokens``."""
    from zjax.inference.sampling import SamplingParams

    batch_size = len(prompts)
    t0 = time.perf_counter()
    engine.load_params(actor_state.params)  # training layout -> the engine's
    jax.block_until_ready(engine.params)
    t1 = time.perf_counter()
    sampling = [SamplingParams(temperature=s.temperature, max_tokens=s.max_new_tokens, seed=seed * batch_size + i,
                               stop_token_ids=tuple(s.stop_tokens), logprobs=True) for i in range(batch_size)]
    completions = engine.generate(prompts, sampling)
    if s.release_memory:  # the engine's weights and KV cache leave the devices until the next rollout
        engine.release()
    t2 = time.perf_counter()
    length = max_prompt_len + s.max_new_tokens
    tokens = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length - 1), np.float32)
    sample_logp = np.zeros((batch_size, length - 1), np.float32)
    for i, (prompt, c) in enumerate(zip(prompts, completions)):
        p, n = len(prompt), len(c.token_ids)
        tokens[i, :p], tokens[i, p:p + n] = prompt, c.token_ids
        mask[i, p - 1:p - 1 + n], sample_logp[i, p - 1:p - 1 + n] = 1.0, c.logprobs
    return tokens, mask, sample_logp, {"relayout_s": t1 - t0, "generate_s": t2 - t1}


def _rollout_metrics(host: dict, mask: np.ndarray, sample_logp: np.ndarray, kl_coef: float) -> dict:
    kl = ((host["old_logp"] - host["ref_logp"]) * mask).sum(1)
    return {
        "score": float(np.mean(host["score"])),
        "kl": float(np.mean(kl)),  # per sequence, k1 on the sampled tokens
        "reward": float(np.mean(host["score"] - kl_coef * kl)),
        "response_length": float(mask.sum(1).mean()),
        # the training-layout forward against the engine's sampling log-probs: 0 up to rounding
        "sample_logp_gap": float(np.max(np.abs(host["old_logp"] - sample_logp) * mask)),
        "sample_logp_rel_gap": float(np.max(np.abs(host["old_logp"] - sample_logp) * mask
                                            / np.maximum(np.abs(sample_logp), 1e-6))),
    }


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """GRPO (DeepSeekMath; TRL's GRPOTrainer): ``group_size`` responses per prompt, each scored
    against its group (``advantage``: ``grpo`` = (score - group mean) / group std; ``dr_grpo`` =
    score - group mean; ``rloo`` = score - the mean of the others), the KL to the reference as a
    loss term (``kl_coef``, estimator ``kl_kind``), PPO's clip, ``ppo_epochs`` updates per rollout.

    Which fixed point each reaches: the loss's gradient is that of ``E[score] - kl_coef *
    KL(pi || pi_ref)`` (per sequence, both as token means) when the advantage is unbiased
    (``rloo``) and the KL term's gradient is the KL's (``k2``: ``E[(log pi - log ref) grad log
    pi]``); ``dr_grpo``'s baseline includes the sample itself, scaling the score's gradient by
    (G - 1) / G, and ``grpo`` divides it by the group's spread, so they optimize other trade-offs."""

    group_size: int = 8
    kl_coef: float = 0.04
    kl_kind: str = "k3"
    cliprange: float = 0.2
    cliprange_high: float | None = None
    advantage: str = "grpo"
    agg: str = "token-mean"
    ppo_epochs: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    ema_decay: float | None = None
    release_memory: bool = False  # DeepSpeed-Chat's release_inference_cache


def grpo_actor_loss(settings: GRPOSettings) -> Callable:
    """The policy's train-step loss on a GRPO rollout (``tokens``, ``old_logp``, ``ref_logp``,
    ``advantages [B]``, ``mask``), weighted by the tokens."""
    def loss_fn(model, batch):
        loss, metrics = losses.grpo_loss(target_logprobs(model, batch), batch["old_logp"], batch["ref_logp"],
                                         batch["advantages"], batch["mask"], clip_eps=settings.cliprange,
                                         clip_eps_high=settings.cliprange_high, kl_coef=settings.kl_coef,
                                         kl_kind=settings.kl_kind, agg=settings.agg)
        return loss, {"weight": jnp.sum(batch["mask"].astype(jnp.float32)), **metrics}

    return loss_fn


class GRPOTrainer(_Trainer):
    """GRPO over a zjax train step: no critic; each prompt (repeat it ``group_size`` times in a
    row in ``prompts``) gets a group of sampled responses whose scores, normalized in the group,
    are every token's advantage; the reference is a frozen state run through ``per_example``;
    generation goes through the hybrid engine as in ``PPOTrainer``."""

    def __init__(self, actor, actor_state, reward_fn, model_cfg, settings: GRPOSettings, max_prompt_len: int, *,
                 ref_state=None, engine_kw: dict | None = None, engine=None):
        if settings.advantage not in ("grpo", "dr_grpo", "rloo"):
            raise ValueError(f"advantage={settings.advantage!r}: use grpo, dr_grpo or rloo")
        if actor.global_batch_size % settings.group_size:
            raise ValueError(f"group_size={settings.group_size} does not divide the rollout (the actor's global "
                             f"batch, {actor.global_batch_size})")
        self._setup(actor, actor_state, model_cfg, settings, max_prompt_len, engine_kw, engine, ref_state)
        self.reward_fn = reward_fn

    def rollout(self, prompts, seed: int) -> tuple[dict, dict]:
        s = self.settings
        rows, (tokens, mask, sample_logp, times) = self._generate(prompts, seed)
        groups = [rows[i:i + s.group_size] for i in range(0, len(rows), s.group_size)]
        if any(row != group[0] for group in groups for row in group):
            raise ValueError(f"GRPO's prompts come in groups of group_size={s.group_size} equal rows")
        t2 = time.perf_counter()
        batch = {"tokens": tokens}
        old_logp = self.actor.per_example(self.actor_state, batch, target_logprobs)
        ref_logp = self.actor.per_example(self.ref_state, batch, target_logprobs)
        score = jnp.asarray(self.reward_fn(tokens, mask), jnp.float32)
        if s.advantage == "rloo":
            advantages = losses.rloo_advantages(score, s.group_size)
        else:
            advantages = losses.grpo_advantages(score, s.group_size, normalize_std=s.advantage == "grpo")
        host = jax.device_get({"old_logp": old_logp, "ref_logp": ref_logp, "score": score, "advantages": advantages})
        metrics = {**_rollout_metrics(host, mask, sample_logp, 0.0), **times, "score_s": time.perf_counter() - t2}
        return {"tokens": tokens, "mask": mask, "old_logp": host["old_logp"], "ref_logp": host["ref_logp"],
                "advantages": host["advantages"]}, metrics

    def update(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        for _ in range(self.settings.ppo_epochs):
            self.actor_state, metrics = self.actor(self.actor_state, batch)
        self._track_ema()
        out = {f"actor_{k}": float(v) for k, v in jax.device_get(metrics).items()}
        out["train_s"] = time.perf_counter() - t0
        return out


@jax.jit
def _advantages_impl(old_logp, ref_logp, score, mask, values, kl_coef, clip_reward_value, gamma, lam):
    rewards = losses.kl_penalized_rewards(old_logp, ref_logp, score, mask, kl_coef=kl_coef,
                                          clip_reward_value=clip_reward_value)
    advantages, returns = losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
    return rewards, advantages, returns


def _advantages(old_logp, ref_logp, score, mask, values, kl_coef, clip_reward_value, gamma, lam, whiten):
    rewards, advantages, returns = _advantages_impl(old_logp, ref_logp, score, mask, values, jnp.float32(kl_coef),
                                                    jnp.float32(clip_reward_value), jnp.float32(gamma),
                                                    jnp.float32(lam))
    if whiten:
        advantages = losses.masked_whiten(advantages, mask)
    return rewards, advantages, returns
