"""Pure, jittable building blocks of RLHF: PPO (as in DeepSpeed-Chat), DPO, GRPO and RLOO.

Every function takes and returns ``jax.Array``s, computes in float32 (inputs in bf16 or
fp16 are upcast first), has no side effects and runs under ``jax.jit`` (string options
such as ``kind`` or ``agg`` and integer sizes such as ``group_size`` are static).

Conventions, shared by every function here:

* Shapes: ``B`` rows (sequences) by ``T`` response positions; ``V`` is the vocabulary.
* ``mask`` is a ``[B, T]`` float or bool array, 1 (True) where a position is a valid
  response token and 0 elsewhere (prompt, padding, tool output). It may have holes
  (``[1, 0, 1]``). Values at invalid positions never reach a loss, a mean or a gradient:
  they are selected away with ``jnp.where`` (not multiplied by 0), so padding that holds
  ``inf`` or ``nan`` log-probabilities is harmless.
* Per-token log-probabilities are ``log pi(token_t | prefix)``, shape ``[B, T]``; aligning
  logits with the tokens they predict (``logits[:, :-1]`` against ``tokens[:, 1:]``) is the
  caller's job.
* Losses are to be minimized and return ``(loss, metrics)`` where ``metrics`` is a dict of
  float32 scalars under ``jax.lax.stop_gradient``.

Where the references disagree, the choice made here is stated in the function's docstring
with the reference it follows: DeepSpeed-Chat (DeepSpeedExamples
``applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py``), TRL (``trl/trainer/dpo_trainer.py``,
``trl/trainer/grpo_trainer.py``, ``trl/experimental/ppo/ppo_trainer.py``), verl
(``verl/trainer/ppo/core_algos.py``, ``verl/utils/torch_functional.py``) and OpenRLHF
(``openrlhf/models/loss.py``, ``openrlhf/models/utils.py``).

Example: one PPO step's losses from a rollout (DeepSpeed-Chat's recipe):

    >>> import jax.numpy as jnp
    >>> mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    >>> logp = ref_logp = jnp.log(jnp.full((2, 3), 0.5))
    >>> values = jnp.zeros((2, 3))
    >>> rewards = kl_penalized_rewards(logp, ref_logp, jnp.array([1.0, -1.0]), mask)
    >>> adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    >>> adv.tolist()
    [[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]
    >>> loss, metrics = ppo_policy_loss(logp, logp, masked_whiten(adv, mask), mask)
    >>> round(float(loss), 6), float(metrics["clip_fraction"])
    (0.0, 0.0)
"""
from numbers import Number

import jax
import jax.numpy as jnp

__all__ = [
    "KL_KINDS",
    "AGG_MODES",
    "DPO_KINDS",
    "token_logprobs",
    "sequence_logprobs",
    "kl_estimate",
    "kl_penalized_rewards",
    "gae",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "aggregate",
    "ppo_policy_loss",
    "value_loss",
    "dpo_loss",
    "grpo_advantages",
    "grpo_loss",
    "rloo_advantages",
]

#: Accepted ``kind`` names of ``kl_estimate``: Schulman's k1/k2/k3 and verl's aliases.
KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")
#: Accepted ``agg`` names of ``aggregate`` (verl's ``loss_agg_mode`` names).
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
#: Accepted ``kind`` names of ``dpo_loss``.
DPO_KINDS = ("sigmoid", "ipo", "hinge")

# Log-ratios are clamped to this range before exp() (verl compute_policy_loss_vanilla and
# kl_penalty, OpenRLHF PolicyLoss): exp(20) ~ 4.9e8 stays finite in float32.
_MAX_LOG_RATIO = 20.0


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _mask(mask, shape=None):
    m = jnp.asarray(mask).astype(bool)
    return m if shape is None else jnp.broadcast_to(m, shape)


def _safe_div(num, den):
    """``num / den`` where ``den > 0``, else 0; finite gradients either way."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _masked_sum(x, m, axis=None):
    return jnp.sum(jnp.where(m, x, 0.0), axis=axis)


def _valid(x, m):
    """``x`` in float32 with invalid positions set to 0 (their gradient is 0, never nan)."""
    return jnp.where(m, _f32(x), 0.0)


def token_logprobs(logits, tokens):
    """Log-softmax of ``logits`` gathered at ``tokens``, in float32.

    Equivalent to DeepSpeed-Chat's ``gather_log_probs`` (and TRL's ``selective_log_softmax``)
    but computed as ``logits[token] - logsumexp(logits)`` so the full ``[B, T, V]``
    log-softmax is never materialized twice.

    Args:
      logits: ``[B, T, V]`` (any float dtype; upcast to float32). Any leading shape works.
      tokens: ``[B, T]`` integer ids, the tokens these logits predict.

    Returns:
      ``[B, T]`` float32 log-probabilities ``log softmax(logits)[..., tokens]``.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5]]]))
      >>> jnp.exp(token_logprobs(logits, jnp.array([[1, 0]]))).round(6).tolist()
      [[0.75, 0.5]]
    """
    logits = _f32(logits)
    tokens = jnp.asarray(tokens)
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(token_logps, mask):
    """Sum of per-token log-probabilities over each row's valid tokens.

    This is the sequence log-likelihood ``log pi(y | x)`` that DPO compares (TRL
    ``DPOTrainer``: ``per_token_logps`` summed over the completion mask).

    Args:
      token_logps: ``[B, T]`` per-token log-probabilities.
      mask: ``[B, T]`` float or bool, 1 on valid tokens.

    Returns:
      ``[B]`` float32 sums; 0 for a row without valid tokens.

    Example:
      >>> import jax.numpy as jnp
      >>> sequence_logprobs(jnp.array([[-1.0, -2.0, jnp.nan]]), jnp.array([[1, 1, 0]])).tolist()
      [-3.0]
    """
    token_logps = _f32(token_logps)
    return _masked_sum(token_logps, _mask(mask, token_logps.shape), axis=-1)


def kl_estimate(logp, ref_logp, kind="k3"):
    """Per-token estimators of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    With ``d = ref_logp - logp = log(pi_ref / pi)`` at the sampled token (Schulman,
    "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

    * ``"k1"`` (alias ``"kl"``): ``-d = logp - ref_logp``. Unbiased, high variance, can be
      negative per token.
    * ``"abs"``: ``|logp - ref_logp|`` (verl ``kl_penalty``).
    * ``"k2"`` (alias ``"mse"``): ``0.5 * d**2``. Biased, non-negative.
    * ``"k3"`` (alias ``"low_var_kl"``): ``exp(d) - d - 1``. Unbiased, non-negative, low
      variance; the estimator in GRPO's loss (DeepSeekMath; TRL ``GRPOTrainer``). ``d`` is
      clamped to ``[-20, 20]`` before ``exp`` (verl ``kl_penalty`` does the same) and the
      value is computed as ``expm1(d) - d`` so it stays ``>= 0`` in float32.

    The names and aliases follow verl ``kl_penalty`` and OpenRLHF ``compute_approx_kl``.
    Neither masks: multiply or ``aggregate`` with a mask afterwards.

    Args:
      logp: ``[...]`` log-probabilities of the sampled tokens under ``pi``.
      ref_logp: same shape, under ``pi_ref``.
      kind: one of ``KL_KINDS``.

    Returns:
      float32 array of ``logp``'s shape.

    Raises:
      ValueError: ``kind`` is not one of ``KL_KINDS`` (the message names it).

    Example:
      >>> import jax.numpy as jnp
      >>> [round(float(kl_estimate(jnp.log(0.5), jnp.log(0.25), k)), 4) for k in ("k1", "k2", "k3")]
      [0.6931, 0.2402, 0.1931]
    """
    logp = _f32(logp)
    ref_logp = _f32(ref_logp)
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind == "abs":
        return jnp.abs(logp - ref_logp)
    if kind in ("k2", "mse"):
        return 0.5 * jnp.square(logp - ref_logp)
    if kind in ("k3", "low_var_kl"):
        d = jnp.clip(ref_logp - logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return jnp.maximum(jnp.expm1(d) - d, 0.0)
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KL_KINDS}")


def kl_penalized_rewards(logp, ref_logp, score, mask, kl_coef=0.1, clip_reward_value=5.0, kl_kind="k1"):
    """Token rewards for PPO-RLHF: a KL penalty on every token plus the score at the end.

    DeepSpeed-Chat's ``DeepSpeedPPOTrainer.compute_rewards``::

        rewards[b, t] = -kl_coef * (logp[b, t] - ref_logp[b, t])           valid t
        rewards[b, last_b] += clip(score[b], -clip_reward_value, clip_reward_value)

    where ``last_b`` is the last valid token of row ``b`` (for a contiguous response mask
    this is DeepSpeed-Chat's ``ends - 1``; with holes it is the highest valid index).
    Rewards are 0 at invalid positions, and a row without valid tokens gets no score.
    DeepSpeed-Chat's defaults: ``kl_ctl = 0.1``, ``clip_reward_value = 5``.

    Args:
      logp: ``[B, T]`` log-probabilities of the sampled tokens under the rollout policy.
      ref_logp: ``[B, T]`` the same tokens under the reference (SFT) policy.
      score: ``[B]`` reward-model scores, one per sequence.
      mask: ``[B, T]`` float or bool, 1 on valid response tokens.
      kl_coef: the KL coefficient (DeepSpeed-Chat's ``kl_ctl``, TRL's ``kl_coef``).
      clip_reward_value: the score is clipped to ``[-clip_reward_value, clip_reward_value]``;
        ``None`` disables clipping.
      kl_kind: the per-token KL estimator (see ``kl_estimate``); DeepSpeed-Chat uses
        ``"k1"``, TRL's PPO offers ``"k1"`` or ``"k3"``.

    Returns:
      ``[B, T]`` float32 rewards.

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.zeros((2, 4))
      >>> kl_penalized_rewards(z, z, jnp.array([9.0, -2.0]), jnp.array([[1, 1, 1, 0], [1, 0, 1, 0]])).tolist()
      [[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, -2.0, 0.0]]
    """
    logp = _f32(logp)
    b, t = logp.shape
    m = _mask(mask, (b, t))
    kl = kl_estimate(_valid(logp, m), _valid(ref_logp, m), kl_kind)
    rewards = jnp.where(m, 0.0 - kl_coef * kl, 0.0)
    score = _f32(score)
    if clip_reward_value is not None:
        score = jnp.clip(score, -clip_reward_value, clip_reward_value)
    last = (t - 1) - jnp.argmax(m[:, ::-1], axis=-1)
    has_valid = jnp.any(m, axis=-1)
    at_last = jax.nn.one_hot(last, t, dtype=jnp.float32)
    return rewards + at_last * jnp.where(has_valid, score, 0.0)[:, None]


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2016) with a reverse ``lax.scan``.

    The recursion runs over each row's valid tokens only, from the last to the first::

        delta_t = rewards_t + gamma * V_next - values_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + values_t

    where ``V_next`` and ``A_next`` are the value and advantage of the next *valid* token
    of the row, and 0 after the last valid token (the episode ends there). An invalid
    position (padding, or a hole such as the 0 in ``[1, 0, 1]``) is skipped: it passes
    ``V_next`` and ``A_next`` through unchanged, its reward is ignored, and its advantage
    and return are 0.

    This is verl's ``compute_gae_advantage_return`` rule (holes carry ``nextvalues`` and
    ``lastgaelam`` through), with outputs zeroed off the mask; for a contiguous response
    mask it equals DeepSpeed-Chat's ``get_advantages_and_returns`` after its
    ``old_values[i, ends[i]:] = 0`` and TRL's PPO loop. Unlike verl, the advantages are not
    whitened here: call ``masked_whiten`` (as TRL and verl do) if you want that. The
    references compute GAE without gradients; wrap the inputs in ``jax.lax.stop_gradient``
    or call this outside the differentiated function.

    Special cases: ``lam = 1`` gives the discounted Monte-Carlo return minus the value;
    ``lam = 0`` gives the one-step TD error ``delta_t``.

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. from ``kl_penalized_rewards``).
      values: ``[B, T]`` critic values ``V(s_t)`` of the rollout.
      mask: ``[B, T]`` float or bool, 1 on valid tokens.
      gamma: discount factor (DeepSpeed-Chat: 1.0).
      lam: GAE lambda (DeepSpeed-Chat: 0.95).

    Returns:
      ``(advantages, returns)``, both ``[B, T]`` float32, 0 at invalid positions.

    Example:
      >>> import jax.numpy as jnp
      >>> adv, ret = gae(jnp.array([[0.0, 0.0, 1.0]]), jnp.full((1, 3), 0.5), jnp.ones((1, 3)), 1.0, 0.5)
      >>> adv.tolist(), ret.tolist()
      ([[0.125, 0.25, 0.5]], [[0.625, 0.75, 1.0]])
    """
    m = _mask(mask, jnp.shape(rewards))
    rewards = _valid(rewards, m)
    values = _valid(values, m)
    gamma = _f32(gamma)
    lam = _f32(lam)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, valid = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        carry = (jnp.where(valid, v, next_value), jnp.where(valid, adv, next_adv))
        return carry, jnp.where(valid, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[:-1], jnp.float32)
    # Time-major for the scan: [T, B].
    _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, m.T), reverse=True)
    adv = adv.T
    return adv, jnp.where(m, adv + values, 0.0)


def masked_mean(x, mask, axis=None):
    """Mean of ``x`` over the positions where ``mask`` is 1.

    As TRL's and verl's ``masked_mean`` (``sum(x * mask) / sum(mask)``), except that invalid
    positions are selected away (``nan`` there does not leak) and an empty mask gives 0
    instead of ``nan``.

    Args:
      x: array, e.g. ``[B, T]``.
      mask: float or bool array broadcastable to ``x``'s shape.
      axis: axis or axes to reduce; ``None`` reduces everything.

    Returns:
      float32 array of ``x``'s shape reduced over ``axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0, 100.0], [3.0, jnp.nan, 5.0]])
      >>> m = jnp.array([[1, 1, 0], [1, 0, 1]])
      >>> float(masked_mean(x, m)), masked_mean(x, m, axis=1).tolist()
      (2.75, [1.5, 4.0])
    """
    x = _f32(x)
    m = _mask(mask, x.shape)
    return _safe_div(_masked_sum(x, m, axis), jnp.sum(m, axis=axis, dtype=jnp.float32))


def masked_var(x, mask, unbiased=True):
    """Variance of ``x`` over the positions where ``mask`` is 1 (all axes reduced).

    As TRL's and verl's ``masked_var``: the mean of squared deviations from the masked
    mean, times Bessel's correction ``n / (n - 1)`` when ``unbiased`` (``n`` valid
    positions). Where those raise for ``n <= 1``, this returns 0 (no spread to measure),
    so it stays jittable.

    Args:
      x: array, e.g. ``[B, T]``.
      mask: float or bool array broadcastable to ``x``'s shape.
      unbiased: apply Bessel's correction.

    Returns:
      float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> x, m = jnp.array([1.0, 2.0, 3.0, 50.0]), jnp.array([1, 1, 1, 0])
      >>> float(masked_var(x, m)), round(float(masked_var(x, m, unbiased=False)), 6)
      (1.0, 0.666667)
    """
    x = _f32(x)
    m = _mask(mask, x.shape)
    n = jnp.sum(m, dtype=jnp.float32)
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(x - mean), m)
    if unbiased:
        var = var * _safe_div(n, n - 1.0)
    return var


def masked_whiten(x, mask, shift_mean=True):
    """Normalize ``x`` to mean 0 and variance 1 over the positions where ``mask`` is 1.

    As TRL's and verl's ``masked_whiten``: ``(x - mean) * rsqrt(var + 1e-8)`` with the
    masked mean and the unbiased masked variance; ``shift_mean=False`` adds the mean back
    (only the scale changes; TRL uses this to whiten rewards). The same affine map is
    applied at every position, valid or not: multiply by the mask if you need zeros there.

    Args:
      x: array, e.g. ``[B, T]`` advantages.
      mask: float or bool array broadcastable to ``x``'s shape.
      shift_mean: subtract the mean (True) or keep it (False).

    Returns:
      float32 array of ``x``'s shape.

    Example:
      >>> import jax.numpy as jnp
      >>> masked_whiten(jnp.array([1.0, 2.0, 3.0, 9.0]), jnp.array([1, 1, 1, 0])).round(4).tolist()
      [-1.0, 0.0, 1.0, 7.0]
    """
    x = _f32(x)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def aggregate(loss_mat, mask, agg="token-mean", max_len=None):
    """Reduce a ``[B, T]`` per-token loss to a scalar (verl ``agg_loss``).

    * ``"token-mean"``: sum over all valid tokens of the batch / number of valid tokens.
      Every token weighs the same, so long sequences weigh more (DAPO; DeepSpeed-Chat's
      ``actor_loss_fn`` and ``critic_loss_fn``; TRL GRPO ``loss_type="bnpo"``/``"dapo"``).
    * ``"seq-mean-token-mean"``: per row, sum / that row's valid-token count; then the mean
      over rows. Every sequence weighs the same (original GRPO; TRL ``loss_type="grpo"``).
    * ``"seq-mean-token-sum"``: per row, the sum over valid tokens; then the mean over rows.
    * ``"seq-mean-token-sum-norm"``: per row, the sum over valid tokens divided by the
      constant ``max_len`` (default ``T``, the padded length); then the mean over *all* ``B``
      rows, i.e. ``total / (B * max_len)``. The normalizer does not depend on the data, which
      removes GRPO's length bias (Dr. GRPO; TRL ``loss_type="dr_grpo"`` divides by
      ``B * max_completion_length``; verl's mode of this name divides by ``max_len`` only).

    The two seq-mean-over-valid modes average over rows that have at least one valid token
    (rows without any are left out, as in current verl); an all-invalid batch gives 0.

    Args:
      loss_mat: ``[B, T]`` per-token losses.
      mask: ``[B, T]`` float or bool, 1 on valid tokens.
      agg: one of ``AGG_MODES``.
      max_len: the constant of ``"seq-mean-token-sum-norm"``; ``None`` means ``T``.

    Returns:
      float32 scalar.

    Raises:
      ValueError: ``agg`` is not one of ``AGG_MODES`` (the message names it).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
      >>> m = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
      >>> [round(float(aggregate(x, m, a)), 6) for a in AGG_MODES]
      [1.6, 2.5, 4.0, 1.0]
    """
    loss_mat = _f32(loss_mat)
    m = _mask(mask, loss_mat.shape)
    if agg == "token-mean":
        return masked_mean(loss_mat, m)
    row_sum = _masked_sum(loss_mat, m, axis=-1)
    row_count = jnp.sum(m, axis=-1, dtype=jnp.float32)
    if agg == "seq-mean-token-sum-norm":
        norm = loss_mat.shape[-1] if max_len is None else max_len
        return jnp.mean(row_sum) / norm
    if agg == "seq-mean-token-mean":
        per_row = _safe_div(row_sum, row_count)
    elif agg == "seq-mean-token-sum":
        per_row = row_sum
    else:
        raise ValueError(f"unknown loss aggregation agg {agg!r}; expected one of {AGG_MODES}")
    return masked_mean(per_row, row_count > 0)


def _check_dual_clip(dual_clip):
    if isinstance(dual_clip, Number) and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (dual-clip PPO's constant c), got {dual_clip}")


def _clipped_surrogate(logp, old_logp, advantages, m, clip_eps, clip_eps_high, dual_clip):
    """Per-token PPO-clip loss matrix and its metrics; invalid positions hold 0."""
    logp = _valid(logp, m)
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else _valid(old_logp, m)
    advantages = _f32(advantages)
    if advantages.ndim == 1:  # per-sequence [B] -> every token of the row
        advantages = advantages[:, None]
    adv = _valid(jnp.broadcast_to(advantages, logp.shape), m)
    ratio = jnp.exp(jnp.clip(logp - old_logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    high = clip_eps if clip_eps_high is None else clip_eps_high
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = jnp.maximum(loss_unclipped, loss_clipped)
    metrics = {
        "clip_fraction": masked_mean(loss_clipped > loss_unclipped, m),
        # k3 estimate of KL(pi_old || pi) from tokens sampled from pi_old: r - 1 - log r.
        "approx_kl": masked_mean(kl_estimate(old_logp, logp, "k3"), m),
        "ratio_mean": masked_mean(ratio, m),
    }
    if dual_clip is not None:
        _check_dual_clip(dual_clip)
        loss_dual = -adv * dual_clip
        metrics["dual_clip_fraction"] = masked_mean((adv < 0) & (loss > loss_dual), m)
        loss = jnp.where(adv < 0, jnp.minimum(loss, loss_dual), loss)
    return jnp.where(m, loss, 0.0), metrics


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                    agg="token-mean"):
    """PPO's clipped surrogate policy loss (DeepSpeed-Chat ``actor_loss_fn``, verl, OpenRLHF).

    Per valid token, with ``r = exp(logp - old_logp)`` and advantage ``A``::

        loss_t = max(-A * r, -A * clip(r, 1 - clip_eps, 1 + clip_eps_high))

    then ``aggregate(loss, mask, agg)``. The default (``"token-mean"``) is exactly
    DeepSpeed-Chat's ``sum(max(...) * mask) / mask.sum()``.

    * ``clip_eps_high`` (default ``clip_eps``) makes the clip range asymmetric ("clip-higher",
      DAPO; verl ``clip_ratio_high``, OpenRLHF ``clip_eps_high``).
    * ``dual_clip = c > 1`` (Dual-clip PPO, Ye et al. 2020; verl ``clip_ratio_c``, OpenRLHF
      ``dual_clip``) additionally caps the loss of negative-advantage tokens at ``-A * c``, so
      a token whose ratio has grown far beyond ``c`` cannot dominate the loss:
      ``loss_t = min(loss_t, -A * c)`` where ``A < 0``.
    * The log-ratio is clamped to ``[-20, 20]`` before ``exp`` (verl, OpenRLHF).
    * ``old_logp=None`` means on-policy: ``old_logp = stop_gradient(logp)`` (ratio 1, the
      gradient is the plain policy gradient ``-A * grad logp``).

    Args:
      logp: ``[B, T]`` log-probabilities of the rollout tokens under the policy being trained.
      old_logp: ``[B, T]`` the same under the rollout policy, or ``None``.
      advantages: ``[B, T]`` per-token advantages, e.g. whitened ``gae`` output, or ``[B]``
        (``[B, 1]``) per-sequence ones, broadcast over each row's tokens.
      mask: ``[B, T]`` float or bool, 1 on valid tokens.
      clip_eps: the clip range ``epsilon`` (low side; both sides unless ``clip_eps_high``).
      clip_eps_high: the high-side clip range, ``None`` for ``clip_eps``.
      dual_clip: the dual-clip constant ``c > 1``, or ``None`` for standard PPO.
      agg: the aggregation mode, see ``aggregate``.

    Returns:
      ``(loss, metrics)``: the scalar loss and a dict of float32 scalars:
      ``"clip_fraction"`` (share of valid tokens where the clipped term is the larger one,
      i.e. the gradient is cut: TRL/verl ``pg_clipfrac``), ``"approx_kl"`` (masked mean of the
      k3 estimate of ``KL(pi_old || pi)``, ``r - 1 - log r``), ``"ratio_mean"``, and with
      ``dual_clip`` also ``"dual_clip_fraction"`` (verl ``pg_clipfrac_lower``).

    Raises:
      ValueError: ``dual_clip`` is a number ``<= 1``, or ``agg`` is unknown.

    Example:
      >>> import jax.numpy as jnp
      >>> logp, m = jnp.log(jnp.array([[1.5, 0.5]])), jnp.ones((1, 2))
      >>> loss, metrics = ppo_policy_loss(logp, jnp.zeros((1, 2)), jnp.array([[1.0, -1.0]]), m)
      >>> round(float(loss), 4), float(metrics["clip_fraction"])
      (-0.2, 1.0)
    """
    logp = _f32(logp)
    m = _mask(mask, logp.shape)
    loss_mat, metrics = _clipped_surrogate(logp, old_logp, advantages, m, clip_eps, clip_eps_high, dual_clip)
    loss = aggregate(loss_mat, m, agg)
    return loss, jax.lax.stop_gradient(metrics)


def value_loss(values, old_values, returns, mask, clip_range=0.2, agg="token-mean"):
    """PPO's clipped value loss (DeepSpeed-Chat ``critic_loss_fn``, verl ``compute_value_loss``).

    Per valid token::

        v_clip = clip(values, old_values - clip_range, old_values + clip_range)
        loss_t = max((values - returns)**2, (v_clip - returns)**2)

    and the loss is ``0.5 * aggregate(loss, mask, agg)``. ``clip_range=None`` gives the plain
    ``0.5 * (values - returns)**2``.

    Args:
      values: ``[B, T]`` critic values being trained.
      old_values: ``[B, T]`` the critic's values at rollout time.
      returns: ``[B, T]`` targets, e.g. ``gae``'s returns.
      mask: ``[B, T]`` float or bool, 1 on valid tokens.
      clip_range: DeepSpeed-Chat's ``cliprange_value`` (0.2), or ``None``.
      agg: the aggregation mode, see ``aggregate``.

    Returns:
      ``(loss, metrics)``: the scalar loss and ``{"clip_fraction": share of valid tokens where
      the clipped error is the larger one (verl/TRL vf_clipfrac)}``.

    Example:
      >>> import jax.numpy as jnp
      >>> loss, metrics = value_loss(jnp.array([[1.0]]), jnp.array([[0.0]]), jnp.array([[2.0]]), jnp.ones((1, 1)))
      >>> round(float(loss), 4), float(metrics["clip_fraction"])
      (1.62, 1.0)
    """
    m = _mask(mask, jnp.shape(values))
    values = _valid(values, m)
    old_values = _valid(old_values, m)
    returns = _valid(returns, m)
    loss1 = jnp.square(values - returns)
    if clip_range is None:
        loss2 = loss1
    else:
        loss2 = jnp.square(jnp.clip(values, old_values - clip_range, old_values + clip_range) - returns)
    loss = 0.5 * aggregate(jnp.maximum(loss1, loss2), m, agg)
    return loss, jax.lax.stop_gradient({"clip_fraction": masked_mean(loss2 > loss1, m)})


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             label_smoothing=0.0, kind="sigmoid"):
    """Direct Preference Optimization loss on sequence log-probabilities (TRL ``dpo_loss``).

    With the implicit rewards ``r_c = beta * (policy_chosen - ref_chosen)`` and
    ``r_r = beta * (policy_rejected - ref_rejected)`` and ``h = (r_c - r_r) / beta``:

    * ``"sigmoid"`` (DPO, Rafailov et al. 2023; with ``label_smoothing = eps`` the
      conservative DPO / cDPO of TRL and the DPO reference code)::

          loss = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)

      At ``h = 0`` (policy equal to reference) this is exactly ``ln 2`` for every ``eps``.
    * ``"ipo"`` (IPO, Azar et al. 2023, eq. 17): ``(h - 1 / (2 * beta))**2``. TRL feeds IPO
      *length-averaged* log-probabilities (sequence sum / completion length); pass those if
      you want TRL's IPO.
    * ``"hinge"`` (SLiC): ``relu(1 - beta * h)``.

    The loss is the mean over the batch. ``label_smoothing`` applies to ``"sigmoid"`` only.

    Args:
      policy_chosen_logps: ``[B]`` ``log pi(y_chosen | x)``, e.g. ``sequence_logprobs``.
      policy_rejected_logps: ``[B]`` ``log pi(y_rejected | x)``.
      ref_chosen_logps: ``[B]`` the same under the reference policy.
      ref_rejected_logps: ``[B]``.
      beta: the KL-regularization temperature (IPO's ``tau``).
      label_smoothing: the assumed label-flip probability in ``[0, 0.5)``.
      kind: one of ``DPO_KINDS``.

    Returns:
      ``(loss, metrics)``: the scalar loss and batch means of ``"chosen_reward"`` (``r_c``),
      ``"rejected_reward"`` (``r_r``), ``"margin"`` (``r_c - r_r``) and ``"reward_accuracy"``
      (share of pairs with ``r_c > r_r``), as TRL logs them.

    Raises:
      ValueError: unknown ``kind``, or a nonzero ``label_smoothing`` with a kind other than
        ``"sigmoid"``.

    Example:
      >>> import jax.numpy as jnp
      >>> lp = jnp.array([-5.0, -7.0])
      >>> loss, metrics = dpo_loss(lp, lp, lp, lp)
      >>> round(float(loss), 6), float(metrics["margin"])
      (0.693147, 0.0)
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"unknown DPO loss kind {kind!r}; expected one of {DPO_KINDS}")
    if kind != "sigmoid" and isinstance(label_smoothing, Number) and label_smoothing != 0:
        raise ValueError(f"label_smoothing applies to the 'sigmoid' DPO loss only, not kind {kind!r}")
    chosen_logratio = _f32(policy_chosen_logps) - _f32(ref_chosen_logps)
    rejected_logratio = _f32(policy_rejected_logps) - _f32(ref_rejected_logps)
    h = chosen_logratio - rejected_logratio
    if kind == "sigmoid":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    elif kind == "ipo":
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        losses = jax.nn.relu(1.0 - beta * h)
    chosen_reward = beta * chosen_logratio
    rejected_reward = beta * rejected_logratio
    metrics = {
        "reward_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "chosen_reward": jnp.mean(chosen_reward),
        "rejected_reward": jnp.mean(rejected_reward),
        "margin": jnp.mean(chosen_reward - rejected_reward),
    }
    return jnp.mean(losses), jax.lax.stop_gradient(metrics)


def _groups(scores, group_size):
    scores = _f32(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be [B], got shape {scores.shape}")
    if not (isinstance(group_size, int) and group_size >= 1) or scores.shape[0] % group_size:
        raise ValueError(f"group_size must be a positive int dividing the batch {scores.shape[0]}, got {group_size}")
    s = scores.reshape(-1, group_size)
    # Shift by each group's first score: exact zeros for an all-equal group, and
    # better-conditioned float32 sums.
    return s - s[:, :1]


def grpo_advantages(scores, group_size, eps=1e-6, normalize_std=True, unbiased=False):
    """GRPO's outcome advantages: each score normalized within its group.

    ``scores[g * group_size:(g + 1) * group_size]`` are the rewards of the ``group_size``
    responses sampled for prompt ``g`` (consecutive rows form a group, as TRL's
    ``num_generations`` layout)::

        A_i = (s_i - mean_g) / (std_g + eps)        normalize_std=True  (GRPO)
        A_i =  s_i - mean_g                          normalize_std=False (Dr. GRPO)

    ``std_g`` is the *population* standard deviation (``unbiased=False``, divide by
    ``group_size``), so each group's advantages have mean 0 and standard deviation 1 (up to
    ``eps``). TRL (``nanstd``, eps 1e-4) and verl (``torch.std``, eps 1e-6) use the
    Bessel-corrected std (divide by ``group_size - 1``), which makes the advantages smaller
    by ``sqrt((G - 1) / G)``; pass ``unbiased=True`` to match them. A group whose scores are
    all equal carries no signal and gets advantages of exactly 0. The result is per
    sequence: broadcast it over the tokens (``grpo_loss`` does).

    Args:
      scores: ``[B]`` rewards, ``B = groups * group_size``.
      group_size: responses per prompt ``G`` (static int).
      eps: added to the std before dividing.
      normalize_std: divide by the group std (GRPO) or not (Dr. GRPO).
      unbiased: Bessel-corrected std (TRL, verl) instead of the population std.

    Returns:
      ``[B]`` float32 advantages.

    Raises:
      ValueError: ``scores`` is not 1-D, or ``group_size`` does not divide ``B``.

    Example:
      >>> import jax.numpy as jnp
      >>> grpo_advantages(jnp.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4).round(4).tolist()
      [1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    """
    d = _groups(scores, group_size)
    centered = d - jnp.mean(d, axis=1, keepdims=True)
    if normalize_std:
        dof = max(group_size - 1, 1) if unbiased else group_size
        std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / dof)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def rloo_advantages(scores, group_size):
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024; verl, TRL ``RLOOTrainer``).

    Each response's baseline is the mean score of the *other* ``group_size - 1`` responses to
    the same prompt (consecutive rows form a group)::

        A_i = s_i - (sum_g - s_i) / (G - 1)  =  G / (G - 1) * (s_i - mean_g)

    Args:
      scores: ``[B]`` rewards, ``B = groups * group_size``.
      group_size: responses per prompt ``G >= 2`` (static int).

    Returns:
      ``[B]`` float32 advantages (sum to 0 within each group).

    Raises:
      ValueError: ``group_size < 2`` or it does not divide ``B``.

    Example:
      >>> import jax.numpy as jnp
      >>> rloo_advantages(jnp.array([1.0, 0.0, 0.0, 3.0, 3.0, 3.0]), 3).tolist()
      [1.0, -0.5, -0.5, 0.0, 0.0, 0.0]
    """
    if not (isinstance(group_size, int) and group_size >= 2):
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    d = _groups(scores, group_size)
    baseline = (jnp.sum(d, axis=1, keepdims=True) - d) / (group_size - 1)
    return (d - baseline).reshape(-1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, clip_eps_high=None, kl_coef=0.04,
              kl_kind="k3", agg="token-mean"):
    """GRPO's loss: the PPO-clip surrogate on group advantages plus a KL term in the loss.

    Per valid token (DeepSeekMath's GRPO; TRL ``GRPOTrainer._compute_loss``; verl with
    ``use_kl_loss``)::

        loss_t = max(-A * r, -A * clip(r, 1 - clip_eps, 1 + clip_eps_high))
                 + kl_coef * kl_estimate(logp, ref_logp, kl_kind)

    with ``r = exp(logp - old_logp)`` and the per-sequence advantage ``A`` (from
    ``grpo_advantages`` or ``rloo_advantages``) broadcast to every token of its row. Unlike
    PPO-RLHF, the KL to the reference is a loss term, not a reward penalty. Then
    ``aggregate(loss, mask, agg)``:

    * ``"token-mean"`` (default): DAPO's token-level mean (TRL ``"dapo"``/``"bnpo"``).
    * ``"seq-mean-token-mean"``: the original GRPO objective (TRL ``"grpo"``).
    * ``"seq-mean-token-sum-norm"``: Dr. GRPO (TRL ``"dr_grpo"``); pair it with
      ``grpo_advantages(..., normalize_std=False)``.

    A group whose scores are all equal has ``A = 0`` and, with ``kl_coef = 0``, contributes
    neither loss nor gradient. ``old_logp=None`` means a single update per rollout
    (``old_logp = stop_gradient(logp)``, TRL's ``num_iterations=1``); ``ref_logp=None`` is
    allowed when ``kl_coef == 0`` (no reference model).

    Args:
      logp: ``[B, T]`` log-probabilities under the policy being trained.
      old_logp: ``[B, T]`` under the rollout policy, or ``None``.
      ref_logp: ``[B, T]`` under the reference policy, or ``None`` when ``kl_coef == 0``.
      advantages: ``[B]`` per-sequence advantages (``[B, T]`` per-token ones also work).
      mask: ``[B, T]`` float or bool, 1 on valid tokens.
      clip_eps: low (and default high) clip range.
      clip_eps_high: high clip range (DAPO clip-higher, e.g. 0.28), ``None`` for ``clip_eps``.
      kl_coef: the KL coefficient (DeepSeekMath/TRL ``beta``; 0.04 in DeepSeekMath).
      kl_kind: the KL estimator, see ``kl_estimate`` (``"k3"`` in GRPO).
      agg: the aggregation mode, see ``aggregate``.

    Returns:
      ``(loss, metrics)``: the scalar loss and a dict of float32 scalars: ``"clip_fraction"``,
      ``"approx_kl"`` and ``"ratio_mean"`` (as ``ppo_policy_loss``), ``"kl"`` (masked mean of
      the KL estimate to the reference; 0 without ``ref_logp``) and ``"pg_loss"`` (the
      surrogate part of the loss alone).

    Raises:
      ValueError: ``ref_logp`` is ``None`` with a nonzero ``kl_coef``, or unknown ``agg``
        or ``kl_kind``.

    Example:
      >>> import jax.numpy as jnp
      >>> logp, m = jnp.full((4, 3), -1.0), jnp.ones((4, 3))
      >>> adv = grpo_advantages(jnp.array([1.0, 0.0, 1.0, 0.0]), 4)
      >>> loss, metrics = grpo_loss(logp, logp, logp, adv, m)
      >>> round(float(loss), 4), float(metrics["kl"])
      (0.0, 0.0)
    """
    logp = _f32(logp)
    m = _mask(mask, logp.shape)
    pg_mat, metrics = _clipped_surrogate(logp, old_logp, advantages, m, clip_eps, clip_eps_high, None)
    if ref_logp is None:
        if not (isinstance(kl_coef, Number) and kl_coef == 0):
            raise ValueError(f"grpo_loss needs ref_logp for the KL term (kl_coef={kl_coef}); pass kl_coef=0 "
                             "to train without a reference model")
        kl_mat = jnp.zeros_like(logp)
    else:
        kl_mat = jnp.where(m, kl_estimate(_valid(logp, m), _valid(ref_logp, m), kl_kind), 0.0)
    loss = aggregate(pg_mat + kl_coef * kl_mat, m, agg)
    metrics["kl"] = masked_mean(kl_mat, m)
    metrics["pg_loss"] = aggregate(pg_mat, m, agg)
    return loss, jax.lax.stop_gradient(metrics)
