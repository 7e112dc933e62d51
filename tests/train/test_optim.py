"""Schedules match DeepSpeed's lr_schedules.py; optimizers build, step and decay what they should."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zjax.config.schema import Config
from zjax.train.optim import default_decay_mask, make_optimizer, make_schedule


# DeepSpeed's formulas (deepspeed/runtime/lr_schedules.py), transcribed in plain Python,
# at last_batch_iteration = t.
def ds_warmup_gamma(t, warmup, kind):
    warmup = max(2, warmup)
    return math.log(t + 1) / math.log(warmup) if kind == "log" else t / warmup


def ds_warmup_lr(t, min_lr, max_lr, warmup, kind):
    gamma = ds_warmup_gamma(t, warmup, kind) if t < max(2, warmup) else 1.0
    return min_lr + (max_lr - min_lr) * gamma


def ds_warmup_decay_lr(t, total, min_lr, max_lr, warmup, kind):
    if t < max(2, warmup):
        gamma = ds_warmup_gamma(t, warmup, kind)
    else:
        gamma = max(0.0, (total - t) / max(1.0, total - max(2, warmup)))
    return min_lr + (max_lr - min_lr) * gamma


def ds_warmup_cosine_lr(t, lr, total, warmup_min_ratio, warmup, cos_min_ratio, kind):
    warmup = max(2, warmup)
    if t < warmup:
        return lr * (warmup_min_ratio + ds_warmup_gamma(t, warmup, kind) * (1 - warmup_min_ratio))
    progress = min(1.0, (t - warmup + 1) / max(1, total - warmup))
    return lr * max(0.0, cos_min_ratio + (1 - cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def ds_one_cycle_lr(t, min_lr, max_lr, first, second, decay_rate, decay_step_size):
    total = float(first + second)
    if t < total:
        b = t + 1
        x = 1.0 + b / total - math.floor(1 + b / total)
        ratio = first / total
        scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
        return min_lr + (max_lr - min_lr) * scale
    if decay_rate == 0 or decay_step_size == 0:
        return min_lr
    return min_lr / (1 + decay_rate * (t - total + 1) / decay_step_size)


def lrs(cfg, steps):
    schedule = make_schedule(cfg)
    return np.array([float(schedule(t)) for t in steps])


STEPS = [0, 1, 2, 5, 9, 10, 11, 37, 60, 99, 100, 150]


def test_constant():
    assert np.allclose(lrs(Config(optimizer={"lr": 0.01}), STEPS), 0.01)


@pytest.mark.parametrize("kind", ["linear", "log"])
def test_warmup_matches_deepspeed_warmup_lr(kind):
    schedule = {"type": "warmup", "warmup_steps": 10, "warmup_min_lr": 1e-5, "warmup_type": kind}
    cfg = Config(optimizer={"lr": 1e-3}, schedule=schedule)
    expected = [ds_warmup_lr(t, 1e-5, 1e-3, 10, kind) for t in STEPS]
    assert np.allclose(lrs(cfg, STEPS), expected, rtol=1e-5, atol=1e-9)


def test_warmup_decay_by_hand():
    cfg = Config(optimizer={"lr": 1e-3}, schedule={"type": "warmup_decay", "warmup_steps": 10, "total_steps": 100})
    # linear: t/10 up to step 10, then (100 - t) / 90 down to 0 at step 100.
    assert np.allclose(lrs(cfg, [0, 5, 10, 55, 100, 150]), [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "log"])
def test_warmup_decay_matches_deepspeed_warmup_decay_lr(kind):
    cfg = Config(steps=100, optimizer={"lr": 2e-3},
                 schedule={"type": "warmup_decay", "warmup_steps": 10, "warmup_min_lr": 1e-4, "warmup_type": kind})
    expected = [ds_warmup_decay_lr(t, 100, 1e-4, 2e-3, 10, kind) for t in STEPS]
    assert np.allclose(lrs(cfg, STEPS), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "log"])
def test_warmup_cosine_matches_deepspeed_warmup_cosine_lr(kind):
    cfg = Config(optimizer={"lr": 1e-3}, schedule={
        "type": "warmup_cosine", "warmup_steps": 10, "total_steps": 100, "warmup_min_ratio": 0.1,
        "cos_min_ratio": 0.05, "warmup_type": kind})
    expected = [ds_warmup_cosine_lr(t, 1e-3, 100, 0.1, 10, 0.05, kind) for t in STEPS]
    assert np.allclose(lrs(cfg, STEPS), expected, rtol=1e-5, atol=1e-9)


def test_warmup_cosine_by_hand():
    cfg = Config(steps=21, optimizer={"lr": 1.0}, schedule={"type": "warmup_cosine", "warmup_steps": 1})
    # One warmup step acts as two (DeepSpeed); the cosine then spans total - 2 = 19 steps.
    got = lrs(cfg, [0, 1, 2, 20, 30])
    assert np.allclose(got, [0.0, 0.5, 0.5 * (1 + math.cos(math.pi / 19)), 0.0, 0.0], atol=1e-6)


def test_one_cycle_matches_deepspeed_one_cycle():
    cfg = Config(schedule={"type": "onecycle", "cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 10,
                           "cycle_second_step_size": 30, "decay_lr_rate": 0.5, "decay_step_size": 5})
    steps = list(range(0, 60, 3)) + [9, 10, 39, 40, 100]
    expected = [ds_one_cycle_lr(t, 1e-4, 1e-3, 10, 30, 0.5, 5) for t in steps]
    assert np.allclose(lrs(cfg, steps), expected, rtol=1e-5, atol=1e-9)
    assert lrs(cfg, [9])[0] == pytest.approx(1e-3)


def test_one_cycle_defaults_span_the_run_and_peak_at_optimizer_lr():
    cfg = Config(steps=40, optimizer={"lr": 2e-3}, schedule={"type": "onecycle"})
    expected = [ds_one_cycle_lr(t, 0.0, 2e-3, 20, 20, 0.0, 0) for t in STEPS]
    assert np.allclose(lrs(cfg, STEPS), expected, rtol=1e-5, atol=1e-9)


def test_schedule_takes_a_traced_step():
    cfg = Config(optimizer={"lr": 1e-3}, schedule={"type": "warmup_cosine", "warmup_steps": 10, "total_steps": 50})
    schedule = make_schedule(cfg)
    traced = jax.jit(jax.vmap(schedule))(jnp.arange(60))
    assert np.allclose(traced, lrs(cfg, range(60)), rtol=1e-6)


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd", "lion", "adafactor"])
def test_every_optimizer_builds_and_takes_a_step(kind):
    cfg = Config(optimizer={"type": kind, "lr": 1e-2, "weight_decay": 0.0 if kind == "adam" else 0.1, "momentum": 0.9})
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    grads = {"w": jnp.full((4, 3), 0.5), "b": jnp.full(3, -0.5)}
    tx = make_optimizer(cfg, default_decay_mask({"w": (4, 3), "b": (3,)}))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(jnp.mean(updates["w"])) < 0 < float(jnp.mean(updates["b"]))


def test_no_clipping_inside_the_optimizer():
    tx = make_optimizer(Config(optimizer={"type": "sgd", "lr": 0.1}))
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([1e6, -1e6])}, tx.init(params), params)
    assert np.allclose(updates["w"], [-1e5, 1e5])


@pytest.mark.parametrize("kind", ["adamw", "lion", "sgd", "adafactor"])
def test_decay_mask_spares_masked_params(kind):
    cfg = Config(optimizer={"type": kind, "lr": 0.1, "weight_decay": 0.5})
    params = {"w": jnp.full((2, 2), 2.0), "scale": jnp.full(2, 2.0)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(cfg, default_decay_mask({"w": (2, 2), "scale": (2,)}))
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    assert np.allclose(updates["scale"], 0.0)
    assert float(jnp.max(updates["w"])) < 0


def test_sgd_weight_decay_is_added_to_the_gradient():
    tx = make_optimizer(Config(optimizer={"type": "sgd", "lr": 0.1, "weight_decay": 0.5}))
    params = {"w": jnp.full(2, 2.0)}
    updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
    assert np.allclose(updates["w"], -0.1 * 0.5 * 2.0)


def test_default_decay_mask_reads_original_shapes():
    shapes = {
        "embed": (256, 64),
        "layers": {"wq": (2, 64, 64), "norm": (64,)},
        "bias": (),
        "abstract": jax.ShapeDtypeStruct((8, 8), jnp.float32),
    }
    expected = {"embed": True, "layers": {"wq": True, "norm": False}, "bias": False, "abstract": True}
    assert default_decay_mask(shapes) == expected
