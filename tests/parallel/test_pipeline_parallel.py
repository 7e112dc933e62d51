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


# --- the train step over mesh.stage (reference GPT, 4 layers) ----------------------------------

from gpt_helpers import gpt_train, token_batches  # noqa: E402

import zjax  # noqa: E402

GPT = ("precision.compute_dtype=float32", "model.n_layers=4")


def run(*overrides, steps=3):
    train, state = gpt_train(*GPT, *overrides)
    losses = []
    for batch in token_batches(steps, 16, 32):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, train


@pytest.fixture(scope="module")
def data8():
    return {stage: run(f"zero.stage={stage}") for stage in (0, 1)}


@pytest.mark.parametrize("stages,zero_stage,microbatches,accum", [(4, 0, 2, 1), (2, 1, 2, 2), (4, 1, 4, 1)])
def test_gpipe_trains_like_data_parallelism(data8, stages, zero_stage, microbatches, accum):
    ref_losses, ref, _ = data8[zero_stage]
    losses, state, train = run(f"mesh.stage={stages}", f"zero.stage={zero_stage}",
                               f"pipeline.microbatches={microbatches}", f"batch.grad_accum_steps={accum}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 3e-5
    # each stage holds its chunk of the layer stacks ...
    wq = state.replicated["blocks"]["attn"]["wq"]
    assert wq.sharding.spec[0] == "stage"
    assert {s.data.shape[0] for s in wq.addressable_shards} == {4 // stages}
    # ... and never gathers another stage's: over stage only activations move (permutes) and the
    # replicated embedding's gradient is summed
    text = train.lower(state, token_batches(1, 16, 32)[0]).compile().as_text()
    kinds = {c.kind for c in hlo.collectives(text, 8, dict(train.mesh.shape)) if "stage" in c.axes}
    assert "collective-permute" in kinds and "all-gather" not in kinds


def test_pipeline_settings_that_are_not_built_or_do_not_divide_are_clear_errors():
    with pytest.raises(zjax.ConfigError, match="pipeline.schedule='1f1b'.*not built yet"):
        zjax.load_config("configs/tiny.yaml", ["pipeline.schedule=1f1b"])
    with pytest.raises(zjax.ConfigError, match="mesh.stage=2 with zero.stage=3 is not built yet"):
        zjax.load_config("configs/tiny.yaml", ["mesh.stage=2", "zero.stage=3"])
    with pytest.raises(zjax.ConfigError, match="a 'layers' stack of 2 layers does not split into mesh.stage=4"):
        gpt_train("zero.stage=1", "mesh.stage=4")


def test_deepspeed_pipeline_keys_map_where_they_mean_something():
    cfg = zjax.load_config({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                            "train_batch_size": 32, "pipeline": {"stages": 2, "partition_method": "parameters",
                                                                  "activation_checkpoint_interval": 1}})
    # a step's micro-batches go through the pipeline together, over one micro-step of 4 x 2 rows
    assert (cfg.mesh.stage, cfg.pipeline.microbatches, cfg.batch.grad_accum_steps) == (2, 4, 1)
    assert cfg.batch.micro_batch_size_per_device == 8 and cfg.remat.policy == "full"
    assert cfg.logical_axis_rules["layers"] == "stage"
    with pytest.raises(zjax.ConfigError, match="partition_method='type:transformer'"):
        zjax.load_config({"train_batch_size": 16, "pipeline": {"stages": 2, "partition_method": "type:transformer"}})
    with pytest.raises(zjax.ConfigError, match="activation_checkpoint_interval=2"):
        zjax.load_config({"train_batch_size": 16, "pipeline": {"stages": 2, "activation_checkpoint_interval": 2}})


def test_a_checkpoint_moves_from_four_stages_to_one_bit_exactly(tmp_path):
    from zjax.checkpoint import to_portable

    train, state = gpt_train(*GPT, "mesh.stage=4", "zero.stage=1", "pipeline.microbatches=2")
    state, _ = train(state, token_batches(1, 16, 32)[0])
    ckpt = zjax.Checkpointer(tmp_path)
    ckpt.save(int(state.step), state)
    ckpt.wait()
    expected = jax.tree.map(np.asarray, to_portable(state))
    for target in (("mesh.stage=2", "zero.stage=0"), ("zero.stage=1",)):
        train, _ = gpt_train(*GPT, *target)
        restored, _ = ckpt.restore(train)
        got = to_portable(restored)
        for key in ("params", "opt_state"):
            for a, b in zip(jax.tree.leaves(got[key]), jax.tree.leaves(expected[key])):
                np.testing.assert_array_equal(np.asarray(a), b)
        train(restored, token_batches(1, 16, 32)[0])
    ckpt.close()


def test_plan_prints_the_bubble_and_one_stages_memory():
    from zjax.analysis.plan import format_plan, plan

    over = [*GPT, "mesh.stage=2", "zero.stage=1", "pipeline.microbatches=2"]
    p = plan("configs/tiny.yaml", over, compile=False)
    assert p.pipeline == {"schedule": "gpipe", "stages": 2, "microbatches": 2, "bubble": pytest.approx(1 / 3)}
    whole = plan("configs/tiny.yaml", [*GPT, "zero.stage=1"], compile=False)
    # a stage holds half the layers and the whole embedding: between half and all of data=8's moments x 2
    # (data 4 instead of 8)
    assert [s.stage for s in p.stages] == [0, 1]
    assert whole.stages[1].zjax["moments"] < p.stages[1].zjax["moments"] < 2 * whole.stages[1].zjax["moments"]
    text = format_plan(p)
    assert "bubble (P-1)/(M+P-1) = 0.333" in text and "(stage 2 x 4 data-parallel" in text


def test_fit_searches_stage_sizes_that_divide_the_layers():
    from zjax.analysis.plan import stage_sizes

    assert stage_sizes(zjax.load_config("configs/tiny.yaml", ["model.n_layers=4"]), 8) == [1, 2, 4]
    assert stage_sizes(zjax.load_config("configs/tiny.yaml", ["model.n_layers=6"]), 8) == [1, 2]
