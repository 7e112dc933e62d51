"""PPO with four models, as DeepSpeed-Chat runs it, on zjax's train steps and inference engine.

The actor and the critic are two ``make_train_step`` instances, each with its own config (ZeRO
stage, precision, optimizer); the reference and reward models are frozen copies: a
``TrainState`` without optimizer state, run through ``TrainStep.per_example`` in the same
sharded layout (no optimizer state, gathered a layer at a time under ZeRO-3). The hybrid engine
is one ``zjax.inference.Engine``: before each rollout the actor's parameters are re-laid out
from the training layout onto the engine's mesh (``Engine.load_params``; under ZeRO-3 that
gathers them once per rollout), the prompts are generated with the paged KV cache and continuous
batching, and the engine keeps only those weights and its cache between rollouts.

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
``cliprange_value`` 0.2, ``gamma`` 1, ``lam`` 0.95). Prompts have one length per rollout
(left-pad them yourselves, e.g. with a BOS token).
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
    """DeepSpeed-Chat's PPO settings and their defaults."""

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


@functools.lru_cache(maxsize=None)
def response_logprobs(prompt_len: int) -> Callable:
    """``fn(model, batch) -> [B, T]``: the GPT's log-probs of the response tokens of
    ``batch["tokens"] [B, prompt_len + T]``."""
    def fn(model, batch):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1])[:, prompt_len - 1:]
        return losses.token_logprobs(logits, tokens[:, prompt_len:])

    return fn


@functools.lru_cache(maxsize=None)
def response_values(prompt_len: int) -> Callable:
    """``fn(model, batch) -> [B, T]``: a ``ValueModel``'s value of the state before each response
    token (DeepSpeed-Chat's ``values[:, start:]`` with ``start = prompt_len - 1``)."""
    def fn(model, batch):
        return model(batch["tokens"][:, :-1])[:, prompt_len - 1:]

    return fn


def actor_loss(prompt_len: int, settings: PPOSettings) -> Callable:
    """The actor's train-step loss on a rollout batch (``tokens``, ``old_logp``,
    ``advantages``, ``mask``): the clipped surrogate as a token mean, weighted by the tokens."""
    logprobs = response_logprobs(prompt_len)

    def loss_fn(model, batch):
        logp = logprobs(model, batch)
        loss, metrics = losses.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"],
                                               clip_eps=settings.cliprange)
        return loss, {"weight": jnp.sum(batch["mask"].astype(jnp.float32)), **metrics}

    return loss_fn


def critic_loss(prompt_len: int, settings: PPOSettings) -> Callable:
    """The critic's train-step loss on a rollout batch (``tokens``, ``old_values``, ``returns``,
    ``mask``): the clipped value loss as a token mean, weighted by the tokens."""
    values_of = response_values(prompt_len)

    def loss_fn(model, batch):
        loss, metrics = losses.value_loss(values_of(model, batch), batch["old_values"], batch["returns"],
                                          batch["mask"], clip_range=settings.cliprange_value)
        return loss, {"weight": jnp.sum(batch["mask"].astype(jnp.float32)),
                      **{f"value_{k}": v for k, v in metrics.items()}}

    return loss_fn


def frozen(state):
    """A frozen copy of a train state: its parameters only (no optimizer state), for
    ``TrainStep.per_example`` (the reference model is the actor's initial state, frozen)."""
    return jax.tree.map(jnp.copy, state.replace(opt_state=None))


class _Trainer:
    """What PPO and GRPO share: the hybrid engine and the iteration (a rollout, then updates)."""

    def _engine(self, actor, actor_state, model_cfg, settings, prompt_len, engine_kw, engine):
        from zjax.inference.engine import Engine

        if engine is not None:
            return engine
        kw = dict(max_seqs=actor.global_batch_size, max_seq_len=prompt_len + settings.max_new_tokens)
        kw["token_budget"] = max(kw["max_seqs"], 64)
        kw.update(engine_kw or {})
        return Engine.from_params(jax.device_get(actor_state.params), model_cfg, **kw)

    def iteration(self, prompts, seed: int | None = None) -> dict:
        """One rollout (sampling seeds from ``seed``, default the iteration number) and its
        updates; the metrics."""
        seed = self.iterations if seed is None else seed
        batch, metrics = self.rollout(prompts, seed)
        metrics.update(self.update(batch))
        self.iterations += 1
        return metrics


class PPOTrainer(_Trainer):
    """DeepSpeed-Chat's PPO loop over zjax train steps (see the module docstring).

    Args:
      actor, critic: ``TrainStep``s made with ``actor_loss(P, settings)`` / ``critic_loss(P,
        settings)`` and models ``GPT`` / ``ValueModel``; their global batch is the rollout size.
      actor_state, critic_state: their initial states; the reference is ``frozen(actor_state)``
        unless ``ref_state`` is given.
      reward_fn: ``reward_fn(tokens [B, P+T], mask [B, T]) -> [B]`` scores (numpy or jax).
      model_cfg: the actor's model config (the engine's).
      settings: ``PPOSettings``.
      engine_kw: keyword arguments of the hybrid engine (``zjax.inference.Engine``).
      engine: an existing engine for this model to reuse (its compiled pass; e.g. a second
        trainer of the same shapes); it gets the actor's weights at every rollout.
    """

    def __init__(self, actor, actor_state, critic, critic_state, reward_fn, model_cfg, settings: PPOSettings,
                 prompt_len: int, *, ref_state=None, engine_kw: dict | None = None, engine=None):
        self.actor, self.critic = actor, critic
        self.actor_state, self.critic_state = actor_state, critic_state
        self.ref_state = frozen(actor_state) if ref_state is None else ref_state
        self.reward_fn = reward_fn
        self.settings = settings
        self.prompt_len = prompt_len
        self._logp = response_logprobs(prompt_len)
        self._values = response_values(prompt_len)
        self.engine = self._engine(actor, actor_state, model_cfg, settings, prompt_len, engine_kw, engine)
        self.iterations = 0

    def rollout(self, prompts, seed: int) -> tuple[dict, dict]:
        """Generates, scores and computes advantages for ``prompts [B, P]``; returns the batch for
        the updates and the rollout's metrics (times included)."""
        s = self.settings
        prompts = np.asarray(prompts, np.int32)
        batch_size, prompt_len = prompts.shape
        if prompt_len != self.prompt_len:
            raise ValueError(f"prompts have length {prompt_len}; this trainer was built for {self.prompt_len}")
        tokens, mask, sample_logp, times = generate(self.engine, self.actor_state, prompts, seed, s)
        t2 = time.perf_counter()
        batch = {"tokens": tokens}
        old_logp = self.actor.per_example(self.actor_state, batch, self._logp)
        ref_logp = self.actor.per_example(self.ref_state, batch, self._logp)
        values = self.critic.per_example(self.critic_state, batch, self._values)
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
        for _ in range(self.settings.ppo_epochs):
            self.actor_state, actor_metrics = self.actor(self.actor_state, batch)
            self.critic_state, critic_metrics = self.critic(self.critic_state, batch)
        host = jax.device_get((actor_metrics, critic_metrics))
        out.update({f"actor_{k}": float(v) for k, v in host[0].items()})
        out.update({f"critic_{k}": float(v) for k, v in host[1].items()})
        out["train_s"] = time.perf_counter() - t0
        return out



def generate(engine, actor_state, prompts: np.ndarray, seed: int, s) -> tuple:
    """The hybrid engine's rollout: the actor's weights re-laid out onto ``engine``, then one
    sampled response per prompt (request ``i`` seeded ``seed * B + i``). Returns ``(tokens
    [B, P + T], mask [B, T], sampling log-probs [B, T], times)``."""
    from zjax.inference.sampling import SamplingParams

    batch_size = prompts.shape[0]
    t0 = time.perf_counter()
    engine.load_params(actor_state.params)  # training layout -> the engine's
    jax.block_until_ready(engine.params)
    t1 = time.perf_counter()
    sampling = [SamplingParams(temperature=s.temperature, max_tokens=s.max_new_tokens, seed=seed * batch_size + i,
                               stop_token_ids=tuple(s.stop_tokens), logprobs=True) for i in range(batch_size)]
    completions = engine.generate([list(p) for p in prompts], sampling)
    t2 = time.perf_counter()
    response = np.zeros((batch_size, s.max_new_tokens), np.int32)
    mask = np.zeros((batch_size, s.max_new_tokens), np.float32)
    sample_logp = np.zeros((batch_size, s.max_new_tokens), np.float32)
    for i, c in enumerate(completions):
        n = len(c.token_ids)
        response[i, :n], mask[i, :n], sample_logp[i, :n] = c.token_ids, 1.0, c.logprobs
    return (np.concatenate([prompts, response], axis=1), mask, sample_logp,
            {"relayout_s": t1 - t0, "generate_s": t2 - t1})


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


def grpo_actor_loss(prompt_len: int, settings: GRPOSettings) -> Callable:
    """The policy's train-step loss on a GRPO rollout (``tokens``, ``old_logp``, ``ref_logp``,
    ``advantages [B]``, ``mask``), weighted by the tokens."""
    logprobs = response_logprobs(prompt_len)

    def loss_fn(model, batch):
        loss, metrics = losses.grpo_loss(logprobs(model, batch), batch["old_logp"], batch["ref_logp"],
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

    def __init__(self, actor, actor_state, reward_fn, model_cfg, settings: GRPOSettings, prompt_len: int, *,
                 ref_state=None, engine_kw: dict | None = None, engine=None):
        if actor.global_batch_size % settings.group_size:
            raise ValueError(f"group_size={settings.group_size} does not divide the rollout (the actor's global "
                             f"batch, {actor.global_batch_size})")
        self.actor, self.actor_state = actor, actor_state
        self.ref_state = frozen(actor_state) if ref_state is None else ref_state
        self.reward_fn, self.settings, self.prompt_len = reward_fn, settings, prompt_len
        self._logp = response_logprobs(prompt_len)
        self.engine = self._engine(actor, actor_state, model_cfg, settings, prompt_len, engine_kw, engine)
        self.iterations = 0

    def rollout(self, prompts, seed: int) -> tuple[dict, dict]:
        s = self.settings
        prompts = np.asarray(prompts, np.int32)
        grouped = prompts.reshape(-1, s.group_size, prompts.shape[1])
        if not (grouped == grouped[:, :1]).all():
            raise ValueError(f"GRPO's prompts come in groups of group_size={s.group_size} equal rows")
        tokens, mask, sample_logp, times = generate(self.engine, self.actor_state, prompts, seed, s)
        t2 = time.perf_counter()
        batch = {"tokens": tokens}
        old_logp = self.actor.per_example(self.actor_state, batch, self._logp)
        ref_logp = self.actor.per_example(self.ref_state, batch, self._logp)
        score = jnp.asarray(self.reward_fn(tokens, mask), jnp.float32)
        if s.advantage == "rloo":
            advantages = losses.rloo_advantages(score, s.group_size)
        elif s.advantage in ("grpo", "dr_grpo"):
            advantages = losses.grpo_advantages(score, s.group_size, normalize_std=s.advantage == "grpo")
        else:
            raise ValueError(f"advantage={s.advantage!r}: use grpo, dr_grpo or rloo")
        host = jax.device_get({"old_logp": old_logp, "ref_logp": ref_logp, "score": score, "advantages": advantages})
        metrics = {**_rollout_metrics(host, mask, sample_logp, 0.0), **times, "score_s": time.perf_counter() - t2}
        return {"tokens": tokens, "mask": mask, "old_logp": host["old_logp"], "ref_logp": host["ref_logp"],
                "advantages": host["advantages"]}, metrics

    def update(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        for _ in range(self.settings.ppo_epochs):
            self.actor_state, metrics = self.actor(self.actor_state, batch)
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
