"""Preference training (zjax.rlhf.preference): a reward model learns synthetic preferences, PPO
against it raises the preferred behaviour, DPO starts at ln 2 and moves the policy the right way."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zjax
from zjax.models.gpt import GPT
from zjax.rlhf import ppo, preference

V, T, TARGET, B = 16, 8, 3, 64
MODEL = {"vocab_size": V, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 16,
         "tie_embeddings": False}


def config(lr=3e-3, batch=B):
    return zjax.load_config({"zero": {"stage": 0}, "precision": {"compute_dtype": "float32"},
                             "batch": {"global_batch_size": batch}, "optimizer": {"lr": lr, "weight_decay": 0.0},
                             "schedule": {"type": "constant", "warmup_steps": 0}, "model": MODEL,
                             "data": {"seq_len": 16}})


def pairs(n, seed):
    """n preference pairs: two answers of T tokens, each target-heavy by a random density; the one
    with more target tokens is chosen (ties are redrawn)."""
    rng = np.random.default_rng(seed)
    chosen, rejected = [], []
    while len(chosen) < n:
        a, b = (np.where(rng.random(T) < rng.uniform(0, 0.6), TARGET, rng.integers(0, V, T)) for _ in range(2))
        ca, cb = (a == TARGET).sum(), (b == TARGET).sum()
        if ca != cb:
            chosen.append(a if ca > cb else b)
            rejected.append(b if ca > cb else a)
    return preference.pair_batch([[0]] * n, chosen, rejected, length=T + 1)


@functools.lru_cache(maxsize=1)
def reward_model():
    cfg = config()
    step = zjax.make_train_step(cfg, preference.reward_loss, model=ppo.ValueModel(cfg.model, rngs=nnx.Rngs(5)),
                                devices=jax.devices()[:1])
    state = step.init()
    for k in range(200):
        state, metrics = step(state, pairs(B, seed=k))
    return step, ppo.frozen(state)


def test_the_reward_model_ranks_held_out_pairs():
    step, state = reward_model()
    held_out = pairs(B, seed=10_000)
    scores = preference.sequence_scores
    chosen = step.per_example(state, {"tokens": held_out["chosen"], "mask": held_out["chosen_mask"]}, scores)
    rejected = step.per_example(state, {"tokens": held_out["rejected"], "mask": held_out["rejected_mask"]}, scores)
    assert float(jnp.mean(chosen > rejected)) >= 0.95


def test_ppo_against_the_learned_reward_raises_the_preferred_behaviour():
    rm_step, rm_state = reward_model()
    scores = preference.sequence_scores

    def reward_fn(tokens, mask):
        return rm_step.per_example(rm_state, {"tokens": tokens, "mask": mask}, scores)

    cfg = config()
    settings = ppo.PPOSettings(kl_coef=0.05, max_new_tokens=T)
    model = GPT(cfg.model, rngs=nnx.Rngs(0))
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    actor = zjax.make_train_step(cfg, ppo.actor_loss(settings), model=model, devices=jax.devices()[:1])
    critic = zjax.make_train_step(cfg, ppo.critic_loss(settings), model=ppo.ValueModel(cfg.model, rngs=nnx.Rngs(1)),
                                  devices=jax.devices()[:1])
    trainer = ppo.PPOTrainer(actor, actor.init(), critic, critic.init(), reward_fn, cfg.model, settings, max_prompt_len=1)
    prompts = np.zeros((B, 1), np.int32)
    fraction = []
    for _ in range(100):
        batch, _ = trainer.rollout(prompts, trainer.iterations)
        fraction.append(float((batch["tokens"][:, 1:] == TARGET).mean()))
        trainer.update(batch)
        trainer.iterations += 1
        if np.mean(fraction[-5:]) >= 0.3 and len(fraction) >= 5:
            break
    assert np.mean(fraction[:3]) < 0.12  # about 1/16 at the start
    assert np.mean(fraction[-5:]) >= 0.3, fraction


def test_dpo_starts_at_ln2_and_prefers_the_chosen():
    cfg = config(lr=1e-2, batch=32)
    model = GPT(cfg.model, rngs=nnx.Rngs(0))
    step = zjax.make_train_step(cfg, preference.dpo_loss_fn(beta=0.1), model=model, devices=jax.devices()[:1])
    state = step.init()
    ref = ppo.frozen(state)
    first = preference.reference_logps(step, ref, pairs(32, seed=0))
    assert abs(float(step.evaluate(state, first)) - math.log(2)) <= 1e-6
    logps = preference._pair_logps()
    before = jax.device_get(step.per_example(state, first, logps))
    for k in range(30):
        state, metrics = step(state, preference.reference_logps(step, ref, pairs(32, seed=k)))
    after = jax.device_get(step.per_example(state, first, logps))
    # the policy moved toward the chosen answers and away from the rejected ones, relative to the reference
    assert (after[:, 0] - before[:, 0]).mean() > (after[:, 1] - before[:, 1]).mean()
    assert float(metrics["reward_accuracy"]) > 0.8 and float(metrics["loss"]) < math.log(2)


def test_sft_learns_the_responses_only():
    """SFT's loss is the responses' cross entropy: ln V for the uniform policy at the start, and the
    prompts' tokens (varied lengths, masked out) are not learned."""
    cfg = config(lr=1e-2, batch=32)
    model = GPT(cfg.model, rngs=nnx.Rngs(0))
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    step = zjax.make_train_step(cfg, preference.sft_loss, model=model, devices=jax.devices()[:1])
    state = step.init()
    rng = np.random.default_rng(0)

    def batch():
        prompts = [[9] * int(rng.integers(1, 5)) for _ in range(32)]  # prompts of the token 9 only
        return preference.sequence_batch(prompts, [[TARGET] * 4] * 32, length=10)

    first = batch()
    assert abs(float(step.evaluate(state, first)) - math.log(V)) <= 1e-5  # float32 logsumexp
    for _ in range(20):
        state, metrics = step(state, batch())
    assert float(metrics["loss"]) < 0.5
    logp = np.asarray(step.per_example(state, first, ppo.target_logprobs))
    prompt_targets = (first["tokens"][:, 1:] == 9) & (first["mask"] == 0)
    # the prompt's own continuation (9 after 9) stayed near uniform; the response's became likely
    assert logp[prompt_targets].mean() < math.log(0.5) < logp[first["mask"] > 0].mean()
