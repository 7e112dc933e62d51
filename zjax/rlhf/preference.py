"""Training on demonstrations and preference pairs: SFT, a reward model (Bradley-Terry) and DPO,
each a train-step loss.

A pair batch holds, for B prompts, the chosen and the rejected sequence (prompt + response,
right-padded to one length L) and their response masks over the target positions (``[B, L-1]``:
1 where ``tokens[:, 1:]`` is a response token). ``pair_batch`` builds one from token lists.

- ``reward_loss``: a ``ValueModel`` scores a sequence at its last response token; the loss is
  ``-log sigmoid(r_chosen - r_rejected)`` (DeepSpeed-Chat's reward model, InstructGPT's), its
  ``accuracy`` the fraction of pairs ranked right. ``sequence_scores`` reads the scores (for
  PPO's ``reward_fn`` through ``TrainStep.per_example``).
- ``sft_loss``: supervised fine-tuning on prompt + response rows (``sequence_batch``), the
  response tokens' cross entropy.
- ``dpo_loss_fn``: DPO on the policy's sequence log-probs against the reference's, which
  ``reference_logps`` computes once per batch from a frozen state (``ppo.frozen``) through
  ``per_example``; at the start (policy = reference) the loss is exactly ln 2.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zjax.rlhf import losses
from zjax.rlhf.ppo import lm_loss


def sequence_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], length: int,
                   pad: int = 0, what: str = "response") -> dict:
    """``{"tokens" [B, length], "mask" [B, length - 1]}``: each row its prompt, its response and
    ``pad``; the mask is 1 on the targets (``tokens[:, 1:]``) that are response tokens."""
    tokens = np.full((len(prompts), length), pad, np.int32)
    mask = np.zeros((len(prompts), length - 1), np.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row = list(prompt) + list(response)
        if len(row) > length or len(response) == 0 or len(prompt) == 0:
            raise ValueError(f"row {i}: prompt + {what} has {len(row)} tokens (length {length}), or an empty prompt "
                             f"or {what}; raise the length or shorten it")
        tokens[i, :len(row)] = row
        mask[i, len(prompt) - 1:len(row) - 1] = 1.0
    return {"tokens": tokens, "mask": mask}


def pair_batch(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
               rejected: Sequence[Sequence[int]], length: int, pad: int = 0) -> dict:
    """``{"chosen", "rejected"}`` ``[B, length]`` token arrays and ``{"chosen_mask",
    "rejected_mask"}`` ``[B, length - 1]`` (1 on the targets that are response tokens)."""
    out = {}
    for name, responses in (("chosen", chosen), ("rejected", rejected)):
        rows = sequence_batch(prompts, responses, length, pad, what=f"{name} response")
        out[name], out[f"{name}_mask"] = rows["tokens"], rows["mask"]
    return out


def _sequence_logps(model, tokens, mask):
    logp = losses.token_logprobs(model(tokens[:, :-1]), tokens[:, 1:])
    return losses.sequence_logprobs(logp, mask)


@functools.lru_cache(maxsize=None)
def _pair_logps() -> Callable:
    def fn(model, batch):
        return jnp.stack([_sequence_logps(model, batch["chosen"], batch["chosen_mask"]),
                          _sequence_logps(model, batch["rejected"], batch["rejected_mask"])], axis=1)

    return fn


def reference_logps(step, ref_state, batch: dict) -> dict:
    """``batch`` with ``ref_chosen`` and ``ref_rejected`` ``[B]``: the frozen reference's sequence
    log-probs, computed in the training layout by ``step.per_example``."""
    both = jax.device_get(step.per_example(ref_state, batch, _pair_logps()))
    return {**batch, "ref_chosen": both[:, 0], "ref_rejected": both[:, 1]}


def dpo_loss_fn(beta: float = 0.1, label_smoothing: float = 0.0, kind: str = "sigmoid") -> Callable:
    """The policy's train-step loss on a pair batch with ``reference_logps``: DPO's mean over the
    pairs (weight = pairs), with ``reward_accuracy`` and ``margin`` as metrics."""
    def loss_fn(model, batch):
        chosen = _sequence_logps(model, batch["chosen"], batch["chosen_mask"])
        rejected = _sequence_logps(model, batch["rejected"], batch["rejected_mask"])
        loss, metrics = losses.dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=beta,
                                        label_smoothing=label_smoothing, kind=kind)
        return loss, {"weight": jnp.float32(chosen.shape[0]), **metrics}

    return loss_fn


def _last_scores(model, tokens, mask):
    """A ``ValueModel``'s value at the last response token of each row (``mask`` over targets)."""
    values = model(tokens)  # [B, L]
    last = jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1]) + 1, 0), axis=1)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def reward_loss(model, batch):
    """The reward model's train-step loss on a pair batch: ``-log sigmoid(r_chosen - r_rejected)``
    over the pairs, ``accuracy`` the fraction with ``r_chosen > r_rejected``."""
    chosen = _last_scores(model, batch["chosen"], batch["chosen_mask"])
    rejected = _last_scores(model, batch["rejected"], batch["rejected_mask"])
    margin = chosen - rejected
    return jnp.mean(-jax.nn.log_sigmoid(margin)), {
        "weight": jnp.float32(margin.shape[0]), "accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "chosen_score": jnp.mean(chosen), "rejected_score": jnp.mean(rejected)}


def sequence_scores(model, batch: dict) -> jax.Array:
    """A reward model's scores ``[B]`` of ``batch["tokens"] [B, L]`` at the last response token
    (``batch["mask"] [B, L-1]`` over the targets: the rollout layout of ``zjax.rlhf.ppo``); a
    ``per_example`` function, e.g. PPO's ``reward_fn``."""
    return _last_scores(model, batch["tokens"], batch["mask"])


def sft_loss(model, batch: dict):
    """Supervised fine-tuning's train-step loss on a ``sequence_batch``: the token mean of the
    response tokens' negative log-likelihood (weight = the tokens). For DeepSpeed-Chat's step 1,
    which trains on every token of prompt + answer, build the batch with ``mask`` all ones up to
    the padding."""
    return lm_loss(model, batch["tokens"], batch["mask"]), {"weight": jnp.sum(batch["mask"].astype(jnp.float32))}
