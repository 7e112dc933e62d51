"""PPO with four models (zjax.rlhf.ppo): the reward rises to the KL-regularized optimum that theory
gives, the first update's importance ratio is exactly 1 under ZeRO-3 and tensor parallelism, and
one PPO iteration is the same on one device and under every ZeRO stage."""
import functools
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zjax
from zjax.models.gpt import GPT
from zjax.rlhf import ppo

V, T, TARGET, B = 16, 8, 3, 64
MODEL = {"vocab_size": V, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "max_seq_len": 16,
         "tie_embeddings": False}
PROMPTS = np.zeros((B, 1), np.int32)


def score(tokens, mask):
    """The fraction of the answer's tokens equal to the target."""
    return (np.asarray(tokens)[:, 1:] == TARGET).mean(1)


def config(*overrides, lr=3e-3):
    return zjax.load_config({"zero": {"stage": 0}, "precision": {"compute_dtype": "float32"},
                             "batch": {"global_batch_size": B}, "optimizer": {"lr": lr, "weight_decay": 0.0},
                             "schedule": {"type": "constant", "warmup_steps": 0}, "model": MODEL,
                             "data": {"seq_len": 16}}, list(overrides))


def steps(cfg, devices, settings):
    """The actor (a GPT whose untied head starts at zero: a uniform policy) and the critic."""
    actor_model = GPT(cfg.model, rngs=nnx.Rngs(0))
    actor_model.lm_head[...] = jnp.zeros_like(actor_model.lm_head[...])
    actor = zjax.make_train_step(cfg, ppo.actor_loss(settings), model=actor_model, devices=devices)
    critic = zjax.make_train_step(cfg, ppo.critic_loss(settings), model=ppo.ValueModel(cfg.model, rngs=nnx.Rngs(1)),
                                  devices=devices)
    return actor, critic


@functools.lru_cache(maxsize=1)
def one_device():
    cfg = config()
    return cfg, *steps(cfg, jax.devices()[:1], ppo.PPOSettings(max_new_tokens=T))


def run(beta, iterations, engine=None):
    cfg, actor, critic = one_device()
    trainer = ppo.PPOTrainer(actor, actor.init(), critic, critic.init(), score, cfg.model,
                             ppo.PPOSettings(kl_coef=beta, max_new_tokens=T), max_prompt_len=1, engine=engine)
    history = [trainer.iteration(PROMPTS) for _ in range(iterations)]
    return trainer, history


def optimum(beta):
    """Per token, the KL-regularized optimum's probability of the target: pi* ~ pi_ref exp(score / beta)
    with a uniform reference and score = (1/T) sum of indicator(token = target) factorizes over tokens."""
    e = np.exp(1.0 / (T * beta))
    return e / (e + V - 1)


def test_ppo_reward_rises_to_the_closed_form_optimum():
    engine, found = None, {}
    for beta, iterations in ((0.05, 70), (0.1, 70), (0.0, 50), (-0.1, 40)):
        trainer, history = run(beta, iterations, engine)
        engine = trainer.engine
        found[beta] = (np.mean([h["score"] for h in history[-10:]]), np.mean([h["kl"] for h in history[-10:]]))
        assert history[0]["score"] < 0.15  # the uniform policy's 1/16, up to sampling
    for beta in (0.05, 0.1):
        assert abs(found[beta][0] - optimum(beta)) <= 0.05, (beta, found[beta], optimum(beta))
    assert found[0.05][1] > found[0.1][1] > 0  # the per-sequence KL falls as beta rises
    assert found[0.0][0] >= 0.95
    # negative control: with the KL penalty's sign flipped the score runs away from the optimum
    assert abs(found[-0.1][0] - optimum(0.1)) > 0.05


@pytest.mark.parametrize("overrides", [("zero.stage=3",), ("zero.stage=1", "mesh.tensor=2")],
                         ids=["zero3", "zero1-tensor2"])
def test_the_first_update_starts_at_ratio_one(overrides):
    """The training-sharded forward gives the engine's sampling log-probs (rel 1e-5), so the first
    update sees ratio 1: no clipping, zero approximate KL."""
    cfg = config(*overrides)
    actor, critic = steps(cfg, jax.devices(), ppo.PPOSettings(max_new_tokens=T))
    trainer = ppo.PPOTrainer(actor, actor.init(), critic, critic.init(), score, cfg.model,
                             ppo.PPOSettings(max_new_tokens=T), max_prompt_len=4)
    # prompts of 1 to 4 tokens: each row is prompt, response, padding; the mask is over the targets
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, V, rng.integers(1, 5)).tolist() for _ in range(B)]
    batch, metrics = trainer.rollout(prompts, seed=0)
    for row, prompt, mask in zip(batch["tokens"], prompts, batch["mask"]):
        assert row[:len(prompt)].tolist() == prompt and mask[:len(prompt) - 1].sum() == 0
        assert mask[len(prompt) - 1:len(prompt) - 1 + T].sum() == T  # no stop token: T tokens each
    metrics.update(trainer.update(batch))
    assert metrics["sample_logp_rel_gap"] <= 1e-5
    # release_memory: the engine's weights and KV cache leave the devices after the rollout
    released = ppo.PPOSettings(max_new_tokens=T, release_memory=True)
    trainer.settings = released
    cache = [weakref.ref(x) for x in jax.tree.leaves(trainer.engine.cache)]
    trainer.engine.release()
    gc.collect()
    assert all(ref() is None for ref in cache)  # the KV cache's buffers are gone
    first, _ = trainer.rollout(prompts, seed=1)
    assert trainer.engine.params is None and trainer.engine.cache is None
    again, _ = trainer.rollout(prompts, seed=1)  # load_params brings them back: the same samples
    np.testing.assert_array_equal(again["tokens"], first["tokens"])
    assert metrics["actor_clip_fraction"] == 0.0 and abs(metrics["actor_approx_kl"]) <= 1e-10
    assert metrics["relayout_s"] > 0 and metrics["generate_s"] > 0 and metrics["train_s"] > 0


def test_one_ppo_iteration_is_the_same_on_one_device_and_under_every_zero_stage():
    cfg, actor, critic = one_device()
    reference = ppo.PPOTrainer(actor, actor.init(), critic, critic.init(), score, cfg.model,
                               ppo.PPOSettings(max_new_tokens=T), max_prompt_len=1)
    tokens_1, _ = reference.rollout(PROMPTS, seed=7)
    reference.update(tokens_1)
    expected = jax.device_get(reference.actor_state.params)
    for stage in (0, 1, 2, 3):
        cfg_s = config(f"zero.stage={stage}")
        actor_s, critic_s = steps(cfg_s, jax.devices(), ppo.PPOSettings(max_new_tokens=T))
        trainer = ppo.PPOTrainer(actor_s, actor_s.init(), critic_s, critic_s.init(), score, cfg_s.model,
                                 ppo.PPOSettings(max_new_tokens=T), max_prompt_len=1, engine=reference.engine)
        batch, _ = trainer.rollout(PROMPTS, seed=7)
        # sampling from ZeRO-3 shards draws the single-device tokens (the same seeds)
        np.testing.assert_array_equal(batch["tokens"], tokens_1["tokens"])
        trainer.update(batch)
        got = jax.device_get(trainer.actor_state.params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"zero.stage={stage}")


def test_grpo_reward_rises_to_the_closed_form_optimum():
    """GRPO with leave-one-out advantages and the k2 KL term in the loss has the gradient of
    E[score] - beta * KL(pi || pi_ref): the same optimum as PPO's (GRPOSettings says why the
    group-std normalization would move it)."""
    cfg = config()
    engine, found = None, {}
    for beta, iterations in ((0.05, 120), (0.1, 120), (0.0, 50)):  # its KL term pulls back more slowly
        settings = ppo.GRPOSettings(group_size=8, kl_coef=beta, kl_kind="k2", advantage="rloo", max_new_tokens=T)
        model = GPT(cfg.model, rngs=nnx.Rngs(0))
        model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
        actor = zjax.make_train_step(cfg, ppo.grpo_actor_loss(settings), model=model, devices=jax.devices()[:1])
        trainer = ppo.GRPOTrainer(actor, actor.init(), score, cfg.model, settings, max_prompt_len=1, engine=engine)
        engine = trainer.engine
        history = [trainer.iteration(PROMPTS) for _ in range(iterations)]
        found[beta] = (np.mean([h["score"] for h in history[-20:]]), np.mean([h["kl"] for h in history[-20:]]))
    for beta in (0.05, 0.1):
        assert abs(found[beta][0] - optimum(beta)) <= 0.05, (beta, found[beta], optimum(beta))
    assert found[0.05][1] > found[0.1][1] > 0
    assert found[0.0][0] >= 0.95


def test_ema_and_ptx():
    """The EMA follows ema <- d * ema + (1 - d) * params after every update; PPO-ptx's LM term on a
    pretraining batch pulls the policy toward that batch (its loss falls faster than without)."""
    cfg, _, critic = one_device()
    pretraining = np.full((B, 9), 5, np.int32)  # the "pretraining text": the token 5 throughout
    ptx = {"tokens": pretraining, "mask": np.ones((B, 8), np.float32)}

    def lm(trainer):
        return float(jnp.mean(trainer.actor.per_example(trainer.actor_state, {"tokens": pretraining},
                                                        ppo.target_logprobs)))

    found, engine = {}, None
    for coef in (0.0, 1.0):
        settings = ppo.PPOSettings(max_new_tokens=T, ema_decay=0.5, ptx_coef=coef)
        model = GPT(cfg.model, rngs=nnx.Rngs(0))
        model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
        ptx_actor = zjax.make_train_step(cfg, ppo.actor_loss(settings), model=model, devices=jax.devices()[:1])
        trainer = ppo.PPOTrainer(ptx_actor, ptx_actor.init(), critic, critic.init(), score, cfg.model, settings,
                                 max_prompt_len=1, engine=engine)
        engine = trainer.engine
        before = lm(trainer)
        params = [jax.device_get(trainer.actor_state.params)]
        for _ in range(2):
            metrics = trainer.iteration(PROMPTS, ptx=ptx)
            params.append(jax.device_get(trainer.actor_state.params))
        found[coef] = lm(trainer) - before
        expected = jax.tree.map(lambda p0, p1, p2: 0.5 * (0.5 * p0 + 0.5 * p1) + 0.5 * p2, *params)
        for a, b in zip(jax.tree.leaves(jax.device_get(trainer.ema_state().params)), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert "actor_ptx_loss" in metrics
    assert found[1.0] > found[0.0] + 0.05, found  # the log-likelihood of the pretraining batch rose more

