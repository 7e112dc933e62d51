"""RLHF building blocks: pure, jittable losses and advantage estimators in ``jax.numpy``.

``losses`` holds PPO as in DeepSpeed-Chat (``kl_penalized_rewards``, ``gae``,
``ppo_policy_loss``, ``value_loss``), DPO (``dpo_loss``), GRPO (``grpo_advantages``,
``grpo_loss``), RLOO (``rloo_advantages``) and their shared pieces (``token_logprobs``,
``sequence_logprobs``, ``kl_estimate``, ``masked_mean``, ``masked_var``, ``masked_whiten``,
``aggregate``). See ``zjax.rlhf.losses`` for the conventions (shapes, masks, float32).
"""
from zjax.rlhf.losses import (
    AGG_MODES,
    DPO_KINDS,
    KL_KINDS,
    aggregate,
    dpo_loss,
    gae,
    grpo_advantages,
    grpo_loss,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    rloo_advantages,
    sequence_logprobs,
    token_logprobs,
    value_loss,
)

__all__ = [
    "AGG_MODES",
    "DPO_KINDS",
    "KL_KINDS",
    "aggregate",
    "dpo_loss",
    "gae",
    "grpo_advantages",
    "grpo_loss",
    "kl_estimate",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_policy_loss",
    "rloo_advantages",
    "sequence_logprobs",
    "token_logprobs",
    "value_loss",
]
