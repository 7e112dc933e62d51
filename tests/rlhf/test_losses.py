"""zjax.rlhf.losses: hand-checked values, limits, numpy references and gradients."""
import math
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zjax.rlhf import losses as L

# The tests call jitted functions (string options, sizes and the Python-level checks'
# arguments static): one compilation per function and shape, far fewer than eager mode's
# one per primitive, and every test checks the jitted form.
_STATIC = {
    "kl_estimate": ("kind",),
    "masked_mean": ("axis",),
    "masked_var": ("unbiased",),
    "masked_whiten": ("shift_mean",),
    "aggregate": ("agg", "max_len"),
    "ppo_policy_loss": ("dual_clip", "agg"),
    "value_loss": ("agg",),
    "dpo_loss": ("kind",),
    "grpo_advantages": ("group_size", "normalize_std", "unbiased"),
    "rloo_advantages": ("group_size",),
    "grpo_loss": ("kl_coef", "kl_kind", "agg"),
}
J = SimpleNamespace(**{name: jax.jit(getattr(L, name), static_argnames=_STATIC.get(name, ()))
                       for name in L.__all__ if callable(getattr(L, name))})


def _np_gae(rewards, values, mask, gamma, lam):
    """The documented rule as a plain loop: recurse over valid tokens only, holes carry."""
    b, t = rewards.shape
    adv = np.zeros((b, t))
    ret = np.zeros((b, t))
    for i in range(b):
        next_value, next_adv = 0.0, 0.0
        for j in reversed(range(t)):
            if not mask[i, j]:
                continue
            delta = rewards[i, j] + gamma * next_value - values[i, j]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, j]
            adv[i, j] = next_adv
            ret[i, j] = next_adv + values[i, j]
    return adv, ret


def _np_aggregate(x, mask, agg):
    """``aggregate``'s documented modes in numpy (rows without valid tokens left out of seq-means)."""
    x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
    sums = np.where(mask, x, 0).sum(1)
    counts = mask.sum(1)
    if agg == "token-mean":
        return sums.sum() / max(counts.sum(), 1)
    if agg == "seq-mean-token-sum-norm":
        return sums.sum() / (x.shape[0] * x.shape[1])
    rows = counts > 0
    per_row = sums[rows] / counts[rows] if agg == "seq-mean-token-mean" else sums[rows]
    return per_row.mean() if rows.any() else 0.0


def _random_mask(rng, b, t, p=0.7):
    mask = rng.random((b, t)) < p
    mask[0] = False  # a row without valid tokens
    mask[1] = True  # a full row
    return mask


# ---------------------------------------------------------------- GAE


def test_gae_by_hand():
    adv, ret = J.gae(jnp.array([[0.0, 0.0, 1.0]]), jnp.full((1, 3), 0.5), jnp.ones((1, 3)), gamma=1.0, lam=0.5)
    np.testing.assert_allclose(adv, [[0.125, 0.25, 0.5]], rtol=0, atol=1e-7)
    np.testing.assert_allclose(ret, [[0.625, 0.75, 1.0]], rtol=0, atol=1e-7)


def test_gae_lambda_limits():
    rng = np.random.default_rng(0)
    b, t, gamma = 3, 6, 0.9
    rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    lengths = np.array([6, 4, 1])
    mask = np.arange(t)[None, :] < lengths[:, None]
    # lam = 1: discounted Monte-Carlo return minus the value.
    adv, ret = J.gae(rewards, values, mask, gamma=gamma, lam=1.0)
    mc = np.zeros((b, t))
    for i in range(b):
        for j in range(lengths[i]):
            mc[i, j] = sum(gamma ** (k - j) * rewards[i, k] for k in range(j, lengths[i]))
    np.testing.assert_allclose(adv, np.where(mask, mc - values, 0), atol=1e-5)
    np.testing.assert_allclose(ret, np.where(mask, mc, 0), atol=1e-5)
    # lam = 0: one-step TD errors, with V = 0 after the last valid token.
    adv, _ = J.gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_values = np.concatenate([values[:, 1:], np.zeros((b, 1))], axis=1) * np.concatenate(
        [mask[:, 1:], np.zeros((b, 1), bool)], axis=1)
    np.testing.assert_allclose(adv, np.where(mask, rewards + gamma * next_values - values, 0), atol=1e-5)


def test_gae_masks_with_holes_match_numpy_loop():
    rng = np.random.default_rng(1)
    b, t = 6, 9
    rewards, values = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    mask = _random_mask(rng, b, t)
    rewards[~mask] = np.nan  # never read
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0)]:
        adv, ret = J.gae(rewards, values, mask.astype(np.float32), gamma=gamma, lam=lam)
        want_adv, want_ret = _np_gae(rewards, values, mask, gamma, lam)
        np.testing.assert_allclose(adv, want_adv, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, atol=1e-5)
    # A hole passes the next value and advantage through: [1, 0, 1] == [1, 1] on the valid tokens.
    a_hole, _ = J.gae(jnp.array([[0.0, 7.0, 1.0]]), jnp.array([[0.5, 9.0, 0.5]]), jnp.array([[1, 0, 1]]), 1.0, 0.5)
    a_dense, _ = J.gae(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.5]]), jnp.ones((1, 2)), 1.0, 0.5)
    np.testing.assert_allclose(a_hole, [[a_dense[0, 0], 0.0, a_dense[0, 1]]], atol=1e-7)


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    rng = np.random.default_rng(2)
    logp = (rng.normal(size=(4, 50)) * 3).astype(np.float32)
    ref = (rng.normal(size=(4, 50)) * 3).astype(np.float32)
    k3 = J.kl_estimate(logp, ref, "k3")
    assert np.all(np.asarray(k3) >= 0)
    assert np.all(np.asarray(J.kl_estimate(logp, ref, "k2")) >= 0)
    np.testing.assert_allclose(J.kl_estimate(logp, ref, "k1"), logp - ref, rtol=1e-6)
    np.testing.assert_allclose(J.kl_estimate(logp, ref, "k2"), 0.5 * (logp - ref) ** 2, rtol=1e-5)
    np.testing.assert_allclose(k3, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-4, atol=1e-6)
    for kind in L.KL_KINDS:
        np.testing.assert_array_equal(J.kl_estimate(logp, logp, kind), 0.0)
    for alias, kind in [("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")]:
        np.testing.assert_array_equal(J.kl_estimate(logp, ref, alias), J.kl_estimate(logp, ref, kind))
    with pytest.raises(ValueError, match="'k4'"):
        J.kl_estimate(logp, ref, "k4")


def test_kl_estimators_are_unbiased_on_categorical_samples():
    rng = np.random.default_rng(3)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    true_kl = float(np.sum(p * np.log(p / q)))
    x = rng.choice(4, size=200_000, p=p)
    logp, logq = np.log(p)[x], np.log(q)[x]
    for kind in ("k1", "k3"):
        assert np.mean(np.asarray(J.kl_estimate(logp, logq, kind), np.float64)) == pytest.approx(true_kl, abs=5e-3)


def test_kl_penalized_rewards_places_clipped_score_at_last_valid_token():
    rng = np.random.default_rng(4)
    logp, ref = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    score = np.array([7.0, -9.0, 3.0, 0.25])
    got = np.asarray(J.kl_penalized_rewards(logp, ref, score, mask, kl_coef=0.2, clip_reward_value=5.0))
    want = np.where(mask, -0.2 * (logp - ref), 0.0)
    for i, last in [(0, 2), (1, 3), (3, 4)]:
        want[i, last] += np.clip(score[i], -5, 5)
    np.testing.assert_allclose(got, want, atol=1e-6)
    unclipped = J.kl_penalized_rewards(logp, logp, score, mask, clip_reward_value=None)
    assert float(unclipped[0, 2]) == 7.0 and float(unclipped[1, 3]) == -9.0


# ---------------------------------------------------------------- masked statistics and aggregation


def test_masked_statistics_and_whitening():
    rng = np.random.default_rng(5)
    x = rng.normal(loc=3.0, scale=2.0, size=(5, 7))
    mask = _random_mask(rng, 5, 7)
    x_nan = np.where(mask, x, np.nan)
    assert float(J.masked_mean(x_nan, mask)) == pytest.approx(x[mask].mean(), rel=1e-5)
    np.testing.assert_allclose(J.masked_mean(x_nan, mask, axis=1)[1:],
                               [x[i][mask[i]].mean() for i in range(1, 5)], rtol=1e-5)
    assert float(J.masked_mean(x_nan, mask, axis=1)[0]) == 0.0  # empty row
    assert float(J.masked_var(x_nan, mask)) == pytest.approx(x[mask].var(ddof=1), rel=1e-5)
    assert float(J.masked_var(x_nan, mask, unbiased=False)) == pytest.approx(x[mask].var(), rel=1e-5)
    w = J.masked_whiten(x, mask)
    assert abs(float(J.masked_mean(w, mask))) < 1e-6
    assert float(J.masked_var(w, mask)) == pytest.approx(1.0, abs=1e-5)
    w = J.masked_whiten(x, mask, shift_mean=False)
    assert float(J.masked_mean(w, mask)) == pytest.approx(x[mask].mean(), rel=1e-5)
    assert float(J.masked_var(w, mask)) == pytest.approx(1.0, abs=1e-5)
    assert float(J.masked_mean(x, np.zeros_like(mask))) == 0.0
    assert float(J.masked_var(x, np.eye(5, 7, dtype=bool) & (np.arange(5) == 0)[:, None])) == 0.0  # one element


def test_aggregate_modes():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 6))
    mask = _random_mask(rng, 4, 6)
    x_nan = np.where(mask, x, np.nan)
    rows = [i for i in range(4) if mask[i].any()]
    sums = np.array([x[i][mask[i]].sum() for i in rows])
    counts = mask[rows].sum(1)
    assert float(J.aggregate(x_nan, mask, "token-mean")) == pytest.approx(x[mask].mean(), rel=1e-5)
    assert float(J.aggregate(x_nan, mask, "seq-mean-token-mean")) == pytest.approx((sums / counts).mean(), rel=1e-5)
    assert float(J.aggregate(x_nan, mask, "seq-mean-token-sum")) == pytest.approx(sums.mean(), rel=1e-5)
    assert float(J.aggregate(x_nan, mask, "seq-mean-token-sum-norm")) == pytest.approx(x[mask].sum() / (4 * 6),
                                                                                      rel=1e-5)
    assert float(J.aggregate(x_nan, mask, "seq-mean-token-sum-norm", max_len=10)) == pytest.approx(
        x[mask].sum() / 40, rel=1e-5)
    for agg in L.AGG_MODES:
        assert float(J.aggregate(x_nan, mask, agg)) == pytest.approx(_np_aggregate(x_nan, mask, agg), rel=1e-5)
        assert float(J.aggregate(x, np.zeros_like(mask), agg)) == 0.0
    with pytest.raises(ValueError, match="'seq-sum'"):
        J.aggregate(x, mask, "seq-sum")


# ---------------------------------------------------------------- PPO


@partial(jax.jit, static_argnames=("dual_clip",))
def _ppo_grad(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=None, dual_clip=None):
    """d loss / d logp, jitted as one program."""
    return jax.grad(lambda lp: L.ppo_policy_loss(lp, old, adv, mask, clip_eps, clip_eps_high, dual_clip)[0])(
        jnp.asarray(logp, jnp.float32))


def test_ppo_at_ratio_one_is_the_policy_gradient():
    rng = np.random.default_rng(7)
    logp, adv = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    mask = _random_mask(rng, 3, 5)
    loss, metrics = J.ppo_policy_loss(logp, logp, adv, mask)
    assert float(loss) == pytest.approx(-adv[mask].mean(), rel=1e-5)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["approx_kl"]) == 0.0
    assert float(metrics["ratio_mean"]) == 1.0
    np.testing.assert_allclose(_ppo_grad(logp, logp, adv, mask), np.where(mask, -adv / mask.sum(), 0), atol=1e-6)
    # old_logp=None is the same on-policy step.
    np.testing.assert_allclose(_ppo_grad(logp, None, adv, mask), _ppo_grad(logp, logp, adv, mask), atol=1e-7)
    # Per-sequence [B] advantages cover their row's tokens (B == T here, where broadcasting would not).
    seq_adv = rng.normal(size=3)
    square = rng.normal(size=(3, 3))
    got = J.ppo_policy_loss(square, square, seq_adv, np.ones((3, 3)))[0]
    assert float(got) == pytest.approx(-seq_adv.mean(), rel=1e-5)


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_ppo_clipping_engages_exactly_beyond_eps(eps_high):
    eps = 0.2
    high = eps if eps_high is None else eps_high
    d = 1e-3
    # Per token: (ratio, advantage, clipped?)
    cases = [(1 + high + d, 1.0, True), (1 + high - d, 1.0, False), (1 - eps - d, 1.0, False),
             (1 - eps - d, -1.0, True), (1 - eps + d, -1.0, False), (1 + high + d, -1.0, False)]
    ratio = np.array([[c[0] for c in cases]])
    adv = np.array([[c[1] for c in cases]])
    clipped = np.array([[c[2] for c in cases]])
    mask = np.ones_like(ratio)
    old = np.zeros_like(ratio)
    loss, metrics = J.ppo_policy_loss(np.log(ratio), old, adv, mask, clip_eps=eps, clip_eps_high=eps_high)
    assert float(metrics["clip_fraction"]) == pytest.approx(clipped.mean())
    want = np.where(clipped, -adv * np.clip(ratio, 1 - eps, 1 + high), -adv * ratio).mean()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    g = _ppo_grad(np.log(ratio), old, adv, mask, clip_eps=eps, clip_eps_high=eps_high)
    np.testing.assert_allclose(g, np.where(clipped, 0.0, -adv * ratio / ratio.size), rtol=1e-5)


def test_ppo_dual_clip_bounds_negative_advantages():
    ratio = np.array([[10.0, 2.0, 10.0]])
    adv = np.array([[-1.0, -1.0, 1.0]])
    mask = np.ones_like(ratio)
    loss, metrics = J.ppo_policy_loss(np.log(ratio), np.zeros_like(ratio), adv, mask, dual_clip=3.0)
    # -A * min(r, c) for A < 0 (r beyond 1 - eps, so unclipped there); -A * (1 + eps) for the A > 0 token.
    assert float(loss) == pytest.approx((3.0 + 2.0 - 1.2) / 3, rel=1e-6)
    assert float(metrics["dual_clip_fraction"]) == pytest.approx(1 / 3)
    g = _ppo_grad(np.log(ratio), np.zeros_like(ratio), adv, mask, dual_clip=3.0)
    np.testing.assert_allclose(g, [[0.0, 2.0 / 3, 0.0]], rtol=1e-6)
    loss_std, _ = J.ppo_policy_loss(np.log(ratio), np.zeros_like(ratio), adv, mask)
    assert float(loss_std) == pytest.approx((10.0 + 2.0 - 1.2) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        J.ppo_policy_loss(np.log(ratio), np.zeros_like(ratio), adv, mask, dual_clip=1.0)


def test_ppo_ignores_garbage_at_invalid_positions():
    logp = np.array([[-1.0, np.nan, -np.inf]])
    old = np.array([[-1.2, np.inf, np.nan]])
    adv = np.array([[1.0, np.nan, np.inf]])
    mask = np.array([[1, 0, 0]])
    loss, metrics = J.ppo_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    g = _ppo_grad(logp, old, adv, mask, dual_clip=3.0)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(g)) and float(g[0, 1]) == 0.0 and float(g[0, 2]) == 0.0


def test_value_loss_clipping():
    values = np.array([[1.0, 0.1, -1.0, 0.5]])
    old = np.zeros((1, 4))
    returns = np.array([[2.0, 0.0, 1.0, 9.0]])
    mask = np.array([[1, 1, 1, 0]])
    loss, metrics = J.value_loss(values, old, returns, mask, clip_range=0.2)
    # Token 0: clip(1.0) = 0.2, (0.2-2)^2 = 3.24 > 1 -> clipped. Token 1: inside the range.
    # Token 2: clip(-1) = -0.2, (-0.2-1)^2 = 1.44 < 4 -> unclipped.
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.01 + 4.0) / 3, rel=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(1 / 3)
    g = jax.jit(jax.grad(lambda v: L.value_loss(v, old, returns, mask)[0]))(jnp.asarray(values, jnp.float32))
    np.testing.assert_allclose(g, [[0.0, 0.1 / 3, -2.0 / 3, 0.0]], rtol=1e-5, atol=1e-7)
    loss, metrics = J.value_loss(values, old, returns, mask, clip_range=None)
    assert float(loss) == pytest.approx(0.5 * (1.0 + 0.01 + 4.0) / 3, rel=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0


# ---------------------------------------------------------------- DPO


def test_dpo_at_equal_logps_is_ln2():
    lp = jnp.array([-3.0, -12.5, -0.25])
    for ls in (0.0, 0.1, 0.3):
        loss, metrics = J.dpo_loss(lp, lp - 1.0, lp, lp - 1.0, beta=0.1, label_smoothing=ls)
        assert abs(float(loss) - math.log(2)) < 1e-6
        assert float(metrics["margin"]) == 0.0 and float(metrics["reward_accuracy"]) == 0.0


def test_dpo_gradient_and_formulas():
    pc, pr = jnp.array([-4.0, -6.0]), jnp.array([-5.0, -5.0])
    rc, rr = jnp.array([-4.5, -5.5]), jnp.array([-5.0, -5.5])
    beta = 0.5
    g = jax.jit(jax.grad(lambda c, r: L.dpo_loss(c, r, rc, rr, beta=beta)[0], argnums=(0, 1)))(pc, pr)
    assert np.all(np.asarray(g[0]) < 0) and np.all(np.asarray(g[1]) > 0)  # descent raises chosen, lowers rejected
    h = np.asarray((pc - rc) - (pr - rr))
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for ls in (0.0, 0.2):
        loss, metrics = J.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
        want = np.mean(-(1 - ls) * np.log(sig(beta * h)) - ls * np.log(sig(-beta * h)))
        assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(metrics["chosen_reward"]) == pytest.approx(beta * np.mean(pc - rc))
    assert float(metrics["rejected_reward"]) == pytest.approx(beta * np.mean(pr - rr))
    assert float(metrics["margin"]) == pytest.approx(beta * np.mean(h))
    assert float(metrics["reward_accuracy"]) == 0.5  # h = [0.5, -1.0]
    assert float(J.dpo_loss(pc, pr, rc, rr, beta=beta, kind="ipo")[0]) == pytest.approx(np.mean((h - 1.0) ** 2))
    assert float(J.dpo_loss(pc, pr, rc, rr, beta=beta, kind="hinge")[0]) == pytest.approx(
        np.mean(np.maximum(0, 1 - beta * h)))
    with pytest.raises(ValueError, match="'kto'"):
        J.dpo_loss(pc, pr, rc, rr, kind="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(pc, pr, rc, rr, kind="ipo", label_smoothing=0.1)  # a concrete value is checked


def test_token_and_sequence_logprobs():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(2, 3, 11)) * 4, jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, 11, size=(2, 3)))
    got = J.token_logprobs(logits, tokens)
    assert got.dtype == jnp.float32
    want = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    mask = np.array([[1, 1, 0], [0, 1, 1]])
    np.testing.assert_allclose(J.sequence_logprobs(got, mask), np.sum(np.where(mask, got, 0), 1), rtol=1e-6)


# ---------------------------------------------------------------- GRPO and RLOO


def test_grpo_advantages():
    rng = np.random.default_rng(9)
    g = 8
    scores = np.concatenate([rng.normal(size=g), rng.integers(0, 2, g), np.full(g, 0.1)]).astype(np.float32)
    adv = np.asarray(J.grpo_advantages(scores, g)).reshape(3, g)
    np.testing.assert_allclose(adv[:2].mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(adv[:2].std(1), 1, atol=1e-5)  # population std
    np.testing.assert_array_equal(adv[2], 0.0)  # all equal: exactly 0
    s = scores.reshape(3, g)
    unb = np.asarray(J.grpo_advantages(scores, g, unbiased=True)).reshape(3, g)
    np.testing.assert_allclose(unb[:2], ((s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-6))[:2],
                               atol=1e-5)
    dr = np.asarray(J.grpo_advantages(scores, g, normalize_std=False)).reshape(3, g)
    np.testing.assert_allclose(dr, s - s.mean(1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(dr[2], 0.0)
    with pytest.raises(ValueError, match="group_size"):
        J.grpo_advantages(scores, 5)


def test_rloo_advantages():
    rng = np.random.default_rng(10)
    g = 4
    scores = rng.normal(size=3 * g).astype(np.float32)
    want = np.array([scores[i] - (scores[(i // g) * g:(i // g + 1) * g].sum() - scores[i]) / (g - 1)
                     for i in range(3 * g)])
    np.testing.assert_allclose(J.rloo_advantages(scores, g), want, atol=1e-6)
    np.testing.assert_array_equal(J.rloo_advantages(np.full(g, 0.3), g), 0.0)
    with pytest.raises(ValueError, match="group_size"):
        J.rloo_advantages(scores, 1)


def test_grpo_loss():
    rng = np.random.default_rng(11)
    g, t = 4, 5
    scores = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # the second group is all equal
    adv = J.grpo_advantages(scores, g)
    logp = jnp.asarray(rng.normal(size=(2 * g, t)) - 2, jnp.float32)
    old = logp + jnp.asarray(rng.normal(size=(2 * g, t)) * 0.1, jnp.float32)
    ref = logp + jnp.asarray(rng.normal(size=(2 * g, t)) * 0.3, jnp.float32)
    mask = _random_mask(rng, 2 * g, t)
    mask[0] = True
    # kl_coef = 0: the all-equal group has neither loss nor gradient.
    grad = jax.jit(jax.grad(lambda lp: L.grpo_loss(lp, old, ref, adv, mask, kl_coef=0.0)[0]))(logp)
    np.testing.assert_array_equal(grad[g:], 0.0)
    assert np.abs(np.asarray(grad[:g])).sum() > 0
    grad_noref = jax.jit(jax.grad(lambda lp: L.grpo_loss(lp, old, None, adv, mask, kl_coef=0.0)[0]))(logp)
    np.testing.assert_array_equal(grad_noref, grad)
    with pytest.raises(ValueError, match="ref_logp"):
        J.grpo_loss(logp, old, None, adv, mask)
    # Against the formula, for each aggregation.
    ratio = np.exp(np.asarray(logp - old))
    a = np.asarray(adv)[:, None]
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
    kl = np.exp(np.asarray(ref - logp)) - np.asarray(ref - logp) - 1
    per_token = pg + 0.04 * kl
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):  # DAPO, GRPO, Dr. GRPO
        loss, metrics = J.grpo_loss(logp, old, ref, adv, mask, clip_eps_high=0.28, agg=agg)
        assert float(loss) == pytest.approx(_np_aggregate(per_token, mask, agg), rel=1e-5, abs=1e-6)
        assert float(metrics["pg_loss"]) == pytest.approx(_np_aggregate(pg, mask, agg), rel=1e-5, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(kl[mask].mean(), rel=1e-5)
    # On-policy with the reference equal to the policy: loss = -token-mean advantage, zero KL.
    loss, metrics = J.grpo_loss(logp, None, logp, adv, mask)
    assert float(loss) == pytest.approx(-np.broadcast_to(a, mask.shape)[mask].mean(), abs=1e-6)
    assert float(metrics["kl"]) == 0.0 and float(metrics["approx_kl"]) == 0.0


# ---------------------------------------------------------------- jit


def test_everything_jit_compiles():
    rng = np.random.default_rng(12)
    b, t, v = 4, 5, 7
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    logp, old, ref, adv, vals = f(b, t), f(b, t), f(b, t), f(b, t), f(b, t)
    mask = jnp.asarray(_random_mask(rng, b, t))
    scores = f(b)
    calls = [
        (L.token_logprobs, (f(b, t, v), jnp.asarray(rng.integers(0, v, (b, t)))), {}),
        (L.sequence_logprobs, (logp, mask), {}),
        (L.kl_estimate, (logp, ref), {"kind": "k2"}),
        (L.kl_penalized_rewards, (logp, ref, scores, mask), {}),
        (L.gae, (adv, vals, mask, 0.99, 0.95), {}),
        (L.masked_mean, (logp, mask), {"axis": 1}),
        (L.masked_var, (logp, mask), {}),
        (L.masked_whiten, (logp, mask), {}),
        (L.aggregate, (logp, mask), {"agg": "seq-mean-token-mean"}),
        (L.ppo_policy_loss, (logp, old, adv, mask), {"clip_eps_high": 0.28, "dual_clip": 3.0}),
        (L.value_loss, (vals, old, adv, mask), {}),
        (L.dpo_loss, (scores, scores, scores, scores), {"kind": "ipo"}),
        (L.grpo_advantages, (scores,), {"group_size": 2}),
        (L.rloo_advantages, (scores,), {"group_size": 2}),
        (L.grpo_loss, (logp, old, ref, scores, mask), {"agg": "seq-mean-token-sum-norm"}),
    ]
    for fn, args, kwargs in calls:
        out = jax.jit(lambda *a, fn=fn, kwargs=kwargs: fn(*a, **kwargs))(*args)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out)), fn.__name__
    # Hyperparameters may be traced too.
    loss = jax.jit(L.ppo_policy_loss)(logp, old, adv, mask, 0.1, 0.3)[0]
    assert np.isfinite(float(loss))
    loss = jax.jit(L.grpo_loss)(logp, old, ref, scores, mask, 0.2, 0.28, 0.01)[0]
    assert np.isfinite(float(loss))
