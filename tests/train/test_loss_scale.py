"""zjax.train.loss_scale follows DeepSpeed's DynamicLossScaler step for step."""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_helpers import xla_flags
from zjax.errors import ConfigError
from zjax.train.loss_scale import (
    LossScaleState,
    all_finite,
    dynamic_loss_scale,
    loss_scaler_from_config,
    no_loss_scale,
    select_tree,
    static_loss_scale,
)


class DeepSpeedDynamicLossScaler:
    """deepspeed/runtime/fp16/loss_scaler.py DynamicLossScaler.update_scale, ported line by line.

    consecutive_hysteresis=False and raise_error_at_min_scale=False; ``would_raise``
    records where DeepSpeed with raise_error_at_min_scale=True would have raised.
    """

    def __init__(self, init_scale, scale_window, min_scale, delayed_shift, scale_factor=2.0):
        self.cur_scale = init_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.delayed_shift = delayed_shift
        self.cur_hysteresis = delayed_shift
        self.skipped = 0
        self.would_raise = False

    def update_scale(self, overflow):
        self.would_raise = False
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale:
                    self.would_raise = True
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
            self.skipped += 1
        else:
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1


def run_trajectory(scaler, finite_flags):
    """Every state after each update, from one jitted scan."""

    def step(state, finite):
        new = scaler.update(state, finite)
        return new, new

    _, states = jax.jit(lambda flags: jax.lax.scan(step, scaler.init(), flags))(
        jnp.asarray(finite_flags, jnp.bool_)
    )
    return jax.tree.map(np.asarray, states)


@pytest.mark.parametrize(
    "power, window, hysteresis, min_scale, p_overflow",
    [
        (16, 1000, 2, 1.0, 0.02),  # DeepSpeed's defaults
        (6, 3, 2, 2.0, 0.3),
        (4, 1, 1, 1.0, 0.5),
        (10, 5, 3, 0.25, 0.4),
        (3, 2, 2, 3.0, 0.6),  # a min that is not a power of two
        (5, 4, 1, 1.0, 0.9),  # mostly overflowing: lives at the minimum
    ],
)
def test_trajectory_matches_deepspeed(power, window, hysteresis, min_scale, p_overflow):
    rng = np.random.default_rng(power * 1000 + window)
    overflow = rng.random(400) < p_overflow
    ref = DeepSpeedDynamicLossScaler(2.0**power, window, min_scale, hysteresis)
    states = run_trajectory(
        dynamic_loss_scale(power, window, hysteresis, min_scale), ~overflow
    )
    for i, flag in enumerate(overflow):
        ref.update_scale(bool(flag))
        got = jax.tree.map(lambda x: x[i].item(), states)
        assert got == LossScaleState(
            scale=ref.cur_scale,
            cur_iter=ref.cur_iter,
            last_overflow_iter=ref.last_overflow_iter,
            cur_hysteresis=ref.cur_hysteresis,
            skipped=ref.skipped,
            overflow_at_min=ref.would_raise,
        ), f"step {i}"


def scales_and_hysteresis(scaler, finite_flags):
    states = run_trajectory(scaler, finite_flags)
    return states.scale.tolist(), states.cur_hysteresis.tolist()


def test_initial_state_is_deepspeeds():
    state = dynamic_loss_scale(initial_scale_power=16, hysteresis=2).init()
    assert state.scale.dtype == jnp.float32 and float(state.scale) == 65536.0
    assert int(state.last_overflow_iter) == -1
    assert int(state.cur_iter) == 0 and int(state.cur_hysteresis) == 2 and int(state.skipped) == 0


def test_scale_halves_only_after_hysteresis_is_used_up():
    scales, hyst = scales_and_hysteresis(
        dynamic_loss_scale(initial_scale_power=10, loss_scale_window=100, hysteresis=3),
        [False, False, False, False],
    )
    assert scales == [1024.0, 1024.0, 512.0, 256.0]
    assert hyst == [2, 1, 1, 1]


def test_scale_doubles_after_a_clean_window():
    scaler = dynamic_loss_scale(initial_scale_power=4, loss_scale_window=3, hysteresis=1)
    # From the start: grows on the 3rd clean update (cur_iter 2, since last_overflow_iter is -1).
    scales, _ = scales_and_hysteresis(scaler, [True] * 6)
    assert scales == [16.0, 16.0, 32.0, 32.0, 32.0, 64.0]
    # After an overflow at iteration 1: grows on the 3rd clean update after it.
    scales, _ = scales_and_hysteresis(scaler, [True, False, True, True, True, True])
    assert scales == [16.0, 8.0, 8.0, 8.0, 16.0, 16.0]


def test_hysteresis_refills_only_when_the_scale_doubles():
    scales, hyst = scales_and_hysteresis(
        dynamic_loss_scale(initial_scale_power=4, loss_scale_window=3, hysteresis=2),
        [True, False, True, True, True],
    )
    # A clean step alone does not refill it (consecutive_hysteresis=False).
    assert hyst == [2, 1, 1, 1, 2]
    assert scales == [16.0, 16.0, 16.0, 16.0, 32.0]


def test_scale_stops_at_min_loss_scale_and_flags_overflow_there():
    scaler = dynamic_loss_scale(initial_scale_power=3, loss_scale_window=100, hysteresis=1, min_loss_scale=2.0)
    states = run_trajectory(scaler, [False] * 5)
    assert states.scale.tolist() == [4.0, 2.0, 2.0, 2.0, 2.0]
    assert states.overflow_at_min.tolist() == [False, False, True, True, True]
    assert states.skipped.tolist() == [1, 2, 3, 4, 5]


def test_overflow_at_min_waits_for_hysteresis_like_deepspeed():
    scaler = dynamic_loss_scale(initial_scale_power=0, loss_scale_window=100, hysteresis=2, min_loss_scale=1.0)
    states = run_trajectory(scaler, [False, False, True, False])
    assert states.scale.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert states.overflow_at_min.tolist() == [False, True, False, True]


def test_skipped_counts_non_finite_steps():
    flags = [True, False, True, False, False, True]
    states = run_trajectory(dynamic_loss_scale(loss_scale_window=2), flags)
    assert states.skipped.tolist() == [0, 1, 1, 2, 3, 3]
    assert states.cur_iter.tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("scaler, scale", [(static_loss_scale(128.0), 128.0), (no_loss_scale(), 1.0)])
def test_fixed_scalers_keep_the_scale_and_count_skips(scaler, scale):
    states = run_trajectory(scaler, [False, True, False, False] + [True] * 20)
    assert set(states.scale.tolist()) == {scale}
    assert states.skipped[-1] == 3
    assert not states.overflow_at_min.any()


def test_update_is_pure_under_jit_and_eager_alike():
    scaler = dynamic_loss_scale(initial_scale_power=5, loss_scale_window=2)
    eager = jitted = scaler.init()
    update = jax.jit(scaler.update)
    for finite in [False, True, False, False, True, True, True]:
        eager = scaler.update(eager, finite)
        jitted = update(jitted, jnp.asarray(finite))
    assert jax.tree.map(lambda x: x.item(), eager) == jax.tree.map(lambda x: x.item(), jitted)
    assert jax.tree.map(lambda x: x.dtype, jitted) == jax.tree.map(lambda x: x.dtype, scaler.init())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite_finds_inf_and_nan(dtype, bad):
    tree = {"a": jnp.ones((3, 4), dtype), "b": [jnp.zeros(5, dtype), jnp.arange(3)]}
    assert bool(all_finite(tree))
    tree["b"][0] = tree["b"][0].at[2].set(bad)
    assert not bool(all_finite(tree))
    assert not bool(jax.jit(all_finite)(tree))


def test_all_finite_sees_fp16_overflow_and_empty_trees():
    assert not bool(all_finite({"g": jnp.array([60000.0], jnp.float16) * 2}))
    assert bool(all_finite({}))


def bits(tree):
    return jax.tree.map(lambda x: np.asarray(x).view(f"uint{np.asarray(x).dtype.itemsize * 8}").tolist(), tree)


def test_select_tree_keeps_old_bit_for_bit():
    nan_payload = np.array([0x7FC00123], np.uint32).view(np.float32)
    old = {
        "w": jnp.asarray(np.array([-0.0, 1.5, nan_payload[0]], np.float32)),
        "h": jnp.array([3.0, -0.0], jnp.bfloat16),
        "count": jnp.int32(7),
    }
    new = jax.tree.map(lambda x: x + 1, old)
    for select in (select_tree, jax.jit(select_tree)):
        assert bits(select(jnp.array(False), new, old)) == bits(old)
        assert bits(select(jnp.array(True), new, old)) == bits(new)


def config(compute_dtype, **loss_scale):
    fields = dict(
        enabled=None, dynamic=True, static_scale=1.0, initial_scale_power=16,
        loss_scale_window=1000, hysteresis=2, min_loss_scale=1.0, at_min="error",
    )
    fields.update(loss_scale)
    return SimpleNamespace(precision=SimpleNamespace(compute_dtype=compute_dtype),
                           loss_scale=SimpleNamespace(**fields))


def test_config_enables_dynamic_scaling_for_float16_only_by_default():
    state = loss_scaler_from_config(
        config("float16", initial_scale_power=8, hysteresis=1, loss_scale_window=2)
    ).init()
    assert float(state.scale) == 256.0 and int(state.cur_hysteresis) == 1
    assert float(loss_scaler_from_config(config("bfloat16")).init().scale) == 1.0


def test_config_static_and_disabled():
    static = loss_scaler_from_config(config("float32", enabled=True, dynamic=False, static_scale=64.0))
    state = static.update(static.init(), False)
    assert float(state.scale) == 64.0 and int(state.skipped) == 1
    assert float(loss_scaler_from_config(config("float16", enabled=False)).init().scale) == 1.0


def test_config_passes_the_window_through():
    scaler = loss_scaler_from_config(config("float16", initial_scale_power=1, loss_scale_window=2))
    assert run_trajectory(scaler, [True, True]).scale.tolist() == [2.0, 4.0]


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(loss_scale_window=0), "loss_scale_window"),
        (dict(hysteresis=0), "hysteresis"),
        (dict(initial_scale_power=-1), "initial_scale_power"),
        (dict(min_loss_scale=0.0), "min_loss_scale"),
        (dict(initial_scale_power=2.5), "initial_scale_power"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        dynamic_loss_scale(**kwargs)


SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from zjax.train.loss_scale import all_finite, dynamic_loss_scale, select_tree

    assert len(jax.devices()) == 4
    mesh = jax.make_mesh((4,), ("data",))
    scaler = dynamic_loss_scale(initial_scale_power=4, hysteresis=1)

    def step(state, params, grads):
        finite = all_finite(grads, axis_name="data")
        new_params = jax.tree.map(lambda p, g: p - g, params, grads)
        return scaler.update(state, finite), select_tree(finite, new_params, params)

    sharded_step = jax.jit(jax.shard_map(
        step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data"))))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    params = shard(jnp.arange(8.0))
    state, out = sharded_step(scaler.init(), params, shard(jnp.ones(8).at[7].set(jnp.inf)))
    assert float(state.scale) == 8.0 and int(state.skipped) == 1, state
    assert (out == params).all(), out  # every shard skipped, not only the one with the inf
    state, out = sharded_step(state, params, shard(jnp.ones(8)))
    assert int(state.skipped) == 1 and (out == params - 1).all(), (state, out)
    print("ok")
    """
)


def test_works_inside_shard_map_with_the_overflow_on_one_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
