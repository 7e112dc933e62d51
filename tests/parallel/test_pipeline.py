"""The GPipe core over the stage axis (zjax.parallel.pipeline.gpipe): the stages run in order
on every micro-batch, gradients equal the sequential layers', each device computes its own
stage, and only activations cross stage boundaries."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zjax.analysis import hlo
from zjax.parallel.pipeline import bubble_fraction, gpipe

STAGES, D, ROWS = 4, 16, 8


def stage_fn(w, h):
    return jnp.tanh(h @ w["w"] + w["b"])


def sequential(params, x):
    for s in range(STAGES):
        x = stage_fn(jax.tree.map(lambda a: a[s], params), x)
    return x


def inputs():
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k0, (STAGES, D, D)) / np.sqrt(D), "b": jax.random.normal(k1, (STAGES, D))}
    return params, jax.random.normal(k2, (ROWS, D))


@pytest.mark.parametrize("microbatches", [1, 2, 8])
def test_gpipe_equals_the_layers_in_order_with_gradients(microbatches):
    mesh = jax.make_mesh((2, STAGES), ("data", "stage"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params, x = inputs()

    def loss(fn, params, x):
        return jnp.sum(jnp.sin(fn(params, x)))

    with jax.set_mesh(mesh):
        placed = jax.device_put(params, NamedSharding(mesh, P("stage")))
        pipelined = jax.jit(jax.value_and_grad(
            lambda p, x: loss(lambda p, x: gpipe(jax.checkpoint(stage_fn), p, x, microbatches=microbatches),
                              p, x), argnums=(0, 1)))
        got = pipelined(placed, x)
        text = pipelined.lower(placed, x).compile().as_text()
    want = jax.value_and_grad(lambda p, x: loss(sequential, p, x), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # one micro-batch's activation [ROWS / M, D] f32 moves one stage on per tick (a collective-permute)
    ticks, act = microbatches + STAGES - 1, 4 * ROWS // microbatches * D
    with jax.set_mesh(mesh):
        forward = jax.jit(lambda p, x: gpipe(stage_fn, p, x, microbatches=microbatches)).lower(placed, x)
        found = hlo.collectives(forward.compile().as_text(), 8, dict(mesh.shape))
    per_tick = [(c.kind, c.full_bytes) for c in found if c.runs == ticks]
    assert per_tick == [("collective-permute", act)]
    # outside the loop only the last stage's outputs [ROWS, D] leave it, once
    assert {c.full_bytes for c in found if c.runs == 1} == {4 * ROWS * D}
    # with the backward pass too, every collective over stage moves activations (never a weight:
    # nothing is gathered over stage) and the loop's are one micro-batch's
    found = hlo.collectives(text, 8, dict(mesh.shape))
    assert all(c.kind != "all-gather" for c in found if "stage" in c.axes)
    assert {c.full_bytes for c in found if c.runs == ticks and "stage" in c.axes} == {act}


def test_bubble_fraction_is_the_schedules_formula():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 16, repeats=2) == pytest.approx(3 / 35)
    assert bubble_fraction(1, 8) == 0.0


def test_gpipe_refuses_a_micro_batch_count_that_does_not_divide_the_rows():
    import zjax

    params, x = inputs()
    with pytest.raises(zjax.ConfigError, match="pipeline.microbatches=3 does not divide the 8 rows"):
        gpipe(stage_fn, params, x, microbatches=3)
    with pytest.raises(ValueError, match="must lead with the same stage count"):
        gpipe(stage_fn, {**params, "b": params["b"][:3]}, x, microbatches=2)


def test_each_device_computes_only_its_stage():
    """The per-tick stage computation is partitioned over the stage axis: the compiled
    program's dot is one stage's [ROWS/M, D] x [D, D] product per device, not the P stages'."""
    mesh = jax.make_mesh((2, STAGES), ("data", "stage"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params, x = inputs()
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, NamedSharding(mesh, P("stage")))
        text = jax.jit(lambda p, x: gpipe(stage_fn, p, x, microbatches=4)).lower(placed, x).compile().as_text()
    dots = collections.Counter(line.split("=")[1].split()[0].split("{")[0] for line in text.splitlines()
                               if " dot(" in line)
    # one stage's [ROWS/M, D] product per device (a stage dimension of 1 at most), not [P, ROWS/M, D]
    assert dots and set(dots) <= {f"f32[{ROWS // 4},{D}]", f"f32[1,{ROWS // 4},{D}]"}, dots
