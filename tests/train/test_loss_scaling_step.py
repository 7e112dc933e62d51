"""fp16 dynamic loss scaling inside the train step: skips, scale trajectory, the minimum."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zjax
from zjax import scan_layers

AXES = {"w_in": ("embed", "mlp"), "layers": {"w": ("layers", "mlp", "mlp")}}
SCALER = ("loss_scale.initial_scale_power=6", "loss_scale.loss_scale_window=3", "loss_scale.hysteresis=2")


def init(rng):
    k1, k2 = jax.random.split(rng)
    return {"w_in": jax.random.normal(k1, (4, 8)) * 0.5, "layers": {"w": jax.random.normal(k2, (2, 8, 8)) * 0.3}}


def loss_fn(params, batch):
    h = batch["x"].astype(params["w_in"].dtype) @ params["w_in"]
    h = scan_layers(lambda c, p: jnp.tanh(c @ p["w"]), h, params["layers"])
    loss = jnp.mean(jnp.square(h.astype(jnp.float32) - 0.5))
    # a poisoned batch makes every gradient non-finite
    return loss * jnp.where(jnp.any(batch["poison"] > 0), jnp.inf, 1.0)


def make(stage, *extra):
    cfg = zjax.load_config(
        "configs/tiny.yaml",
        [f"zero.stage={stage}", "precision.compute_dtype=float16", "batch.global_batch_size=8", *SCALER, *extra],
    )
    train = zjax.make_train_step(cfg, loss_fn, logical_axes=AXES)
    return train, train.init(init)


def batch(poison, seed):
    x = np.random.default_rng(seed).normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "poison": np.full((8,), float(poison), np.float32)}


def deepspeed_scale_trajectory(overflows, scale, window, hysteresis, min_scale):
    """DeepSpeed's DynamicLossScaler.update_scale, consecutive_hysteresis=False."""
    scales, cur_hyst, last_overflow = [], hysteresis, -1
    for it, overflow in enumerate(overflows):
        scales.append(scale)
        if overflow:
            if hysteresis == 1 or cur_hyst == 1:
                scale = max(scale / 2, min_scale)
            else:
                cur_hyst -= 1
            last_overflow = it
        elif (it - last_overflow) % window == 0:
            cur_hyst = hysteresis
            scale *= 2
    return scales


@pytest.mark.parametrize("stage", [1, 3])
def test_nonfinite_steps_are_skipped_and_scale_follows_deepspeed(stage):
    train, state = make(stage)
    poison = [0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0]
    expected_scales = deepspeed_scale_trajectory(poison, 2.0**6, 3, 2, 1.0)
    for k, p in enumerate(poison):
        before = jax.device_get((state.params, state.opt_state))
        state, metrics = train(state, batch(p, k))
        assert int(metrics["skipped"]) == p
        assert float(metrics["loss_scale"]) == expected_scales[k], k
        after = jax.device_get((state.params, state.opt_state))
        same = jax.tree.all(jax.tree.map(np.array_equal, before, after))
        assert same == bool(p), k  # untouched exactly when skipped
    assert int(state.loss_scale.skipped) == sum(poison)
    assert int(state.step) == len(poison)


def test_overflow_at_minimum_scale_raises_by_default():
    train, state = make(3, "loss_scale.min_loss_scale=64", "loss_scale.hysteresis=1")
    state, _ = train(state, batch(0, 0))
    with pytest.raises(zjax.LossScaleError, match="min_loss_scale"):
        train(state, batch(1, 1))


def test_overflow_at_minimum_scale_keeps_skipping_when_configured():
    train, state = make(3, "loss_scale.min_loss_scale=64", "loss_scale.hysteresis=1", "loss_scale.at_min=skip")
    for k in range(3):
        state, metrics = train(state, batch(1, k))
        assert int(metrics["skipped"]) == 1
        assert float(metrics["loss_scale"]) == 64.0
    state, metrics = train(state, batch(0, 9))
    assert int(metrics["skipped"]) == 0
    assert int(state.loss_scale.skipped) == 3
