"""Pipeline parallelism over mesh.stage: the schedules' tables (idle fraction and memory from
their own counters), the executor (values and gradients equal the layers in order; only
activations cross stages; 1F1B keeps a bounded stash where GPipe's grows with M), and the
train step (every ZeRO stage, both schedules, with accumulation, equals data=8)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import zjax
from gpt_helpers import gpt_train, rel_norm, token_batches
from zjax.analysis import hlo
from zjax.layers import scan_layers
from zjax.parallel.pipeline import bubble_fraction, make_schedule, pipeline_grads, pipeline_loss, stage_specs
from zjax.parallel.zero import LeafLayout, stage_order

STAGES, D, VOCAB, ROWS, LEN = 4, 16, 32, 16, 4


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [2, 4])
def test_a_schedules_idle_fraction_and_stash_come_from_its_table(name, stages):
    for m in (stages, 2 * stages, 4 * stages):
        s = make_schedule(name, stages, m)
        # each stage runs every micro-batch's forward and backward once, the forward first
        for st in range(stages):
            f, b = list(s.forward[:, st]), list(s.backward[:, st])
            assert sorted(x for x in f if x >= 0) == list(range(m)) == sorted(x for x in b if x >= 0)
            assert all(f.index(i) <= b.index(i) for i in range(m))
        # idle fraction counted from the table (backward = 2 forwards) = the textbook formula
        assert s.idle_fraction() == pytest.approx(bubble_fraction(stages, m))
        assert s.idle_fraction(1.0, 1.0) == pytest.approx(bubble_fraction(stages, m))
        held = s.in_flight()
        if name == "gpipe":  # every micro-batch's input until the backward phase
            assert held == [0] + [m] * (stages - 1)
        else:  # at most 2(P - s) - 1, whatever M is
            assert held == [0] + [min(m, 2 * (stages - st) - 1) for st in range(1, stages)]


@pytest.mark.parametrize("stages,repeats", [(2, 2), (4, 2), (2, 4)])
def test_the_interleaved_schedules_idle_fraction_is_megatrons(stages, repeats):
    held = []
    for m in (stages, 2 * stages, 4 * stages):
        s = make_schedule("interleaved", stages, m, repeats)
        for st in range(stages):
            f = {(int(s.forward[t, st]), int(s.forward_chunk[t, st])): t for t in range(s.ticks) if s.forward[t, st] >= 0}
            b = {(int(s.backward[t, st]), int(s.backward_chunk[t, st])): t for t in range(s.ticks)
                 if s.backward[t, st] >= 0}
            # every (micro-batch, chunk) once each way, the forward first
            assert sorted(f) == sorted(b) == [(i, v) for i in range(m) for v in range(repeats)]
            assert all(f[x] <= b[x] for x in f)
        # a micro-batch goes through the V·P chunks in the model's order, one tick each, and back
        for i in range(m):
            when = [int(np.nonzero((s.forward[:, c % stages] == i) & (s.forward_chunk[:, c % stages] == c // stages))[0][0])
                    for c in range(stages * repeats)]
            assert np.all(np.diff(when) == 1)
        # chunks of 1/V of a stage: (P-1)/(V·M+P-1), V times below 1F1B's at large M
        assert s.idle_fraction() == pytest.approx(bubble_fraction(stages, m, repeats))
        held.append(max(s.in_flight()))
    assert held[0] <= held[1] == held[2]  # bounded whatever M is
    with pytest.raises(zjax.ConfigError, match="pipeline.microbatches=3 is not a multiple of 2"):
        make_schedule("interleaved", 2, 3, 2)
    with pytest.raises(zjax.ConfigError, match="pipeline.repeats=2 needs pipeline.schedule: interleaved"):
        make_schedule("1f1b", 2, 4, 2)


def test_bubble_fraction_is_the_schedules_formula():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 16, repeats=2) == pytest.approx(3 / 35)
    assert bubble_fraction(1, 8) == 0.0


# --- the executor on a small model that is not the reference GPT --------------------------------


def toy_params():
    k = jax.random.split(jax.random.key(0), 4)
    return {"embed": jax.random.normal(k[0], (VOCAB, D)),
            "layers": {"w": jax.random.normal(k[1], (2 * STAGES, D, D)) / np.sqrt(D),
                       "b": 0.1 * jax.random.normal(k[2], (2 * STAGES, D))},
            "scale": jnp.ones((D,))}


def toy_loss(params, batch):
    """A tied-embedding model: embed, 8 tanh layers through scan_layers, head = embed.T."""
    h = params["embed"][batch["tokens"]]
    h = scan_layers(lambda h, p: jnp.tanh(h @ p["w"] + p["b"]), h, params["layers"])
    logits = (h * params["scale"]) @ params["embed"].T
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return jnp.mean(nll)


def toy_batch():
    tokens = jax.random.randint(jax.random.key(1), (ROWS, LEN + 1), 0, VOCAB)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def toy_mesh():
    return jax.make_mesh((2, STAGES), ("data", "stage"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def toy_layouts(params, repeats=1):
    layouts = jax.tree.map(lambda x: LeafLayout(x.shape, False, 1, False), params)
    interleave = (repeats, STAGES) if repeats > 1 else None
    layouts["layers"] = jax.tree.map(lambda x: LeafLayout(x.shape, True, 1, False, lead_axis="stage",
                                                          interleave=interleave), params["layers"])
    return layouts


def toy_specs(params):
    return stage_specs(toy_layouts(params))


def toy_pipeline(name, microbatches, repeats=1):
    layouts = toy_layouts(toy_params(), repeats)
    # an interleaved pipeline's stack in stage order: each stage's rows are its chunks s, P + s, ...
    params, specs = stage_order(layouts, toy_params()), stage_specs(layouts)
    schedule = make_schedule(name, STAGES, microbatches, repeats)

    def loss_of(d, extra, mb, key):
        return toy_loss(d, mb), jnp.float32(1.0), {"tokens": jnp.float32(mb["tokens"].size)}

    def run(params, batch):
        g, lw, w, extras = pipeline_grads(loss_of, params, None, batch, jax.random.key(0), schedule=schedule,
                                          diff_specs=specs, extra_specs=None, seed=jnp.float32(1.0))
        # the loss's extra scalars are summed over the micro-batches like the loss
        return lw / w, jax.tree.map(lambda x: x / w, g), extras["tokens"]

    with jax.set_mesh(toy_mesh()):
        placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(toy_mesh(), s), specs))
        return jax.jit(run), placed, layouts


@pytest.mark.parametrize("name,microbatches,repeats", [("gpipe", 2, 1), ("1f1b", 8, 1), ("interleaved", 4, 2)])
def test_the_executor_equals_the_layers_in_order_with_gradients(name, microbatches, repeats):
    run, placed, layouts = toy_pipeline(name, microbatches, repeats)
    batch = toy_batch()
    with jax.set_mesh(toy_mesh()):
        loss, grads, tokens = run(placed, batch)
        text = run.lower(placed, batch).compile().as_text()
    grads = stage_order(layouts, grads, inverse=True)  # back to the layers' order
    # the mean over micro-batches of the loss, and its gradient (the tied embedding's from both ends)
    micro = jax.tree.map(lambda x: x.reshape((microbatches, -1) + x.shape[1:]), batch)
    want_loss, want = jax.jit(jax.value_and_grad(
        lambda p: jnp.mean(jax.vmap(lambda mb: toy_loss(p, mb))(micro))))(toy_params())
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert float(tokens) == batch["tokens"].size
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    # over stage: two permutes of one micro-batch's activation per tick, and the gradients of what
    # lives outside the stack summed once; no parameter is gathered over stage
    found = [c for c in hlo.collectives(text, 8, {"data": 2, "stage": STAGES}) if "stage" in c.axes]
    act = 4 * ROWS // microbatches * LEN * D
    ticks = make_schedule(name, STAGES, microbatches, repeats).ticks
    assert sorted((c.kind, c.full_bytes) for c in found if c.runs == ticks) == [("collective-permute", act)] * 2
    assert {c.kind for c in found if c.runs == 1} == {"all-reduce"}
    assert sum(c.full_bytes for c in found if c.kind == "all-reduce") <= 4 * (VOCAB * D + D + 3)  # + 3 scalars


def test_1f1b_keeps_fewer_activations_than_gpipe_and_does_not_grow_with_microbatches():
    """Compiled temp bytes per device at M = 4P and 8P (one micro-batch of the same size)."""
    temp = {}
    for name, repeats in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        for m in (4 * STAGES, 8 * STAGES):
            params, specs = toy_params(), toy_specs(toy_params())
            schedule = make_schedule(name, STAGES, m, repeats)
            batch = jax.tree.map(lambda x: jnp.tile(x, (m // 4, 1)), toy_batch())  # 4 rows per micro-batch

            def run(params, batch, schedule=schedule, specs=specs):
                return pipeline_grads(lambda d, e, mb, k: (toy_loss(d, mb), jnp.float32(1), {}), params, None, batch,
                                      jax.random.key(0), schedule=schedule, diff_specs=specs, extra_specs=None,
                                      seed=jnp.float32(1.0))

            with jax.set_mesh(toy_mesh()):
                compiled = jax.jit(run).lower(params, batch).compile()
            temp[name, m] = compiled.memory_analysis().temp_size_in_bytes
    small, large = 4 * STAGES, 8 * STAGES
    assert temp["1f1b", small] < temp["gpipe", small]
    assert temp["1f1b", large] <= 1.1 * temp["1f1b", small]
    assert temp["gpipe", large] > 1.2 * temp["gpipe", small]
    # interleaved keeps more chunk inputs than 1F1B (one per chunk in flight), but as flat in M
    assert temp["interleaved", large] <= 1.1 * temp["interleaved", small] < temp["gpipe", large]


@pytest.mark.parametrize("name,repeats", [("1f1b", 1), ("interleaved", 2)])
def test_evaluation_runs_the_forwards_only(name, repeats):
    layouts = toy_layouts(toy_params(), repeats)
    params, specs = stage_order(layouts, toy_params()), stage_specs(layouts)
    batch = toy_batch()
    with jax.set_mesh(toy_mesh()):
        lw, w, _ = jax.jit(lambda p, b: pipeline_loss(lambda d, e, mb, k: (toy_loss(d, mb), jnp.float32(1), {}), p, None, b,
                                                   jax.random.key(0), schedule=make_schedule(name, STAGES, 4, repeats),
                                                   diff_specs=specs, extra_specs=None))(params, batch)
    micro = jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch)
    np.testing.assert_allclose(lw / w, jnp.mean(jax.vmap(lambda mb: toy_loss(toy_params(), mb))(micro)), rtol=1e-5)


def test_a_loss_without_scan_layers_or_rows_that_do_not_split_are_clear_errors():
    params, specs = toy_params(), toy_specs(toy_params())

    def no_scan(d, e, mb, k):
        return jnp.sum(d["embed"][mb["tokens"]]), jnp.float32(1), {}

    with jax.set_mesh(toy_mesh()), pytest.raises(zjax.ConfigError, match="never calls scan_layers"):
        jax.jit(lambda p, b: pipeline_grads(no_scan, p, None, b, jax.random.key(0),
                                            schedule=make_schedule("1f1b", STAGES, 4), diff_specs=specs,
                                            extra_specs=None, seed=1.0))(params, toy_batch())
    with pytest.raises(zjax.ConfigError, match="pipeline.microbatches=3 does not divide the \\[16\\] rows"):
        pipeline_grads(no_scan, params, None, toy_batch(), jax.random.key(0), schedule=make_schedule("gpipe", 2, 3),
                       diff_specs=specs, extra_specs=None, seed=1.0)
    with pytest.raises(zjax.ConfigError, match="pipeline.schedule='zigzag' is not a schedule"):
        make_schedule("zigzag", 2, 2)


# --- the train step over mesh.stage (reference GPT, 4 layers) ----------------------------------

GPT = ("precision.compute_dtype=float32", "model.n_layers=4")


def run(*overrides, steps=5):
    train, state = gpt_train(*GPT, *overrides)
    losses = []
    for batch in token_batches(steps, 16, 32):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, train


@pytest.fixture(scope="module")
def data8():
    # in float32 the ZeRO stages give the same run on data=8 (tests/train): one reference for all
    return run("zero.stage=0")


@pytest.mark.parametrize("stages,schedule,zero_stage,microbatches,accum", [
    (4, "gpipe", 0, 2, 1), (2, "1f1b", 1, 2, 2), (4, "1f1b", 2, 4, 1), (2, "gpipe", 3, 2, 2),
    (2, "interleaved", 3, 2, 2), (2, "interleaved", 1, 4, 1)])
def test_pipelines_train_like_data_parallelism(data8, stages, schedule, zero_stage, microbatches, accum):
    ref_losses, ref, _ = data8
    repeats = 2 if schedule == "interleaved" else 1
    losses, state, train = run(f"mesh.stage={stages}", f"zero.stage={zero_stage}", f"pipeline.schedule={schedule}",
                               f"pipeline.microbatches={microbatches}", f"batch.grad_accum_steps={accum}",
                               f"pipeline.repeats={repeats}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        assert rel_norm(a, b) < 1e-5
    # each stage holds its chunk of the layer stacks (and at ZeRO-1+ its data shard of it) ...
    wq = (state.master if state.master is not None else state.replicated)["blocks"]["attn"]["wq"]
    assert wq.sharding.spec[0] == "stage"
    assert {s.data.shape[0] for s in wq.addressable_shards} == {4 // stages}
    # ... and never gathers another stage's: over stage only activations move (permutes) and the
    # gradients of the replicated embedding and norm are summed
    text = train.lower(state, token_batches(1, 16, 32)[0]).compile().as_text()
    kinds = {c.kind for c in hlo.collectives(text, 8, dict(train.mesh.shape)) if "stage" in c.axes}
    assert kinds == {"collective-permute", "all-reduce"}


def test_pipeline_settings_that_do_not_fit_are_clear_errors():
    with pytest.raises(zjax.ConfigError, match="pipeline.repeats=2 needs pipeline.schedule: interleaved"):
        zjax.load_config("configs/tiny.yaml", ["pipeline.repeats=2"])
    with pytest.raises(zjax.ConfigError, match="a 'layers' stack of 2 layers does not split into mesh.stage=4"):
        gpt_train("zero.stage=1", "mesh.stage=4")
    with pytest.raises(zjax.ConfigError, match=r"stack of 2 layers does not split into mesh.stage=2 x "
                                               r"pipeline.repeats=2 = 4 equal chunks"):
        gpt_train("zero.stage=1", "mesh.stage=2", "pipeline.schedule=interleaved", "pipeline.repeats=2",
                  "pipeline.microbatches=2")


def test_deepspeed_pipeline_keys_map_where_they_mean_something():
    cfg = zjax.load_config({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                            "train_batch_size": 32, "pipeline": {"stages": 2, "partition_method": "parameters",
                                                                  "activation_checkpoint_interval": 1}})
    # a step's micro-batches go through the pipeline together, over one micro-step of 4 x 2 rows
    assert (cfg.mesh.stage, cfg.pipeline.microbatches, cfg.batch.grad_accum_steps) == (2, 4, 1)
    assert cfg.pipeline.schedule == "1f1b"  # what DeepSpeed's PipelineEngine runs
    assert cfg.batch.micro_batch_size_per_device == 8 and cfg.remat.policy == "full"
    assert cfg.logical_axis_rules["layers"] == "stage"
    with pytest.raises(zjax.ConfigError, match="partition_method='type:transformer'"):
        zjax.load_config({"train_batch_size": 16, "pipeline": {"stages": 2, "partition_method": "type:transformer"}})
    with pytest.raises(zjax.ConfigError, match="activation_checkpoint_interval=2"):
        zjax.load_config({"train_batch_size": 16, "pipeline": {"stages": 2, "activation_checkpoint_interval": 2}})


@pytest.mark.parametrize("source", [("mesh.stage=4", "zero.stage=1", "pipeline.microbatches=2"),
                                    ("mesh.stage=2", "zero.stage=0", "pipeline.microbatches=2",
                                     "pipeline.schedule=interleaved", "pipeline.repeats=2")])
def test_a_checkpoint_moves_from_four_stages_to_one_bit_exactly(tmp_path, source):
    from zjax.checkpoint import to_portable

    train, state = gpt_train(*GPT, *source)
    state, _ = train(state, token_batches(1, 16, 32)[0])
    ckpt = zjax.Checkpointer(tmp_path)
    ckpt.save(int(state.step), state)
    ckpt.wait()
    expected = jax.tree.map(np.asarray, to_portable(state))
    interleaved = ("mesh.stage=2", "zero.stage=2", "pipeline.schedule=interleaved", "pipeline.repeats=2",
                   "pipeline.microbatches=2")
    for target in (("mesh.stage=2", "zero.stage=3"), interleaved, ("zero.stage=1",)):
        train, _ = gpt_train(*GPT, *target)
        restored, _ = ckpt.restore(train)
        got = to_portable(restored)
        for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(expected["params"])):
            np.testing.assert_array_equal(np.asarray(a, np.float32), b)
        for key in ("params", "opt_state"):
            for a, b in zip(jax.tree.leaves(got[key]), jax.tree.leaves(expected[key])):
                np.testing.assert_array_equal(np.asarray(a), b)
    train(restored, token_batches(1, 16, 32)[0])  # the last one trains on
    ckpt.close()


def test_plan_prints_the_bubble_and_one_stages_memory():
    from zjax.analysis.plan import format_plan, plan

    over = [*GPT, "mesh.stage=2", "zero.stage=1", "pipeline.microbatches=2"]
    p = plan("configs/tiny.yaml", over, compile=False)
    assert p.pipeline == {"schedule": "gpipe", "stages": 2, "microbatches": 2, "bubble": pytest.approx(1 / 3)}
    whole = plan("configs/tiny.yaml", [*GPT, "zero.stage=1"], compile=False)
    # a stage holds half the layers and the whole embedding: between half and all of data=8's moments x 2
    # (data 4 instead of 8)
    assert [s.stage for s in p.stages] == [0, 1, 2, 3]
    assert whole.stages[1].zjax["moments"] < p.stages[1].zjax["moments"] < 2 * whole.stages[1].zjax["moments"]
    text = format_plan(p)
    assert "bubble (P-1)/(M+P-1) = 0.333" in text and "(stage 2 x 4 data-parallel" in text
    inter = plan("configs/tiny.yaml", [*over, "pipeline.schedule=interleaved", "pipeline.repeats=2"], compile=False)
    assert inter.pipeline["bubble"] == pytest.approx(1 / 5)
    assert "interleaved over 2 stages x 2 chunks each, 2 micro-batches: bubble (P-1)/(V*M+P-1) = 0.200" in format_plan(inter)


def test_fit_searches_stage_sizes_that_divide_the_layers():
    from zjax.analysis.plan import stage_sizes

    assert stage_sizes(zjax.load_config("configs/tiny.yaml", ["model.n_layers=4"]), 8) == [1, 2, 4]
    assert stage_sizes(zjax.load_config("configs/tiny.yaml", ["model.n_layers=6"]), 8) == [1, 2]


def blocks_only(path, leaf):
    return path[0] == "blocks"


@pytest.mark.parametrize("pipe,rest", [
    (("mesh.stage=2", "mesh.tensor=2", "pipeline.schedule=interleaved", "pipeline.repeats=2",
      "pipeline.microbatches=2"), ("zero.stage=1", "remat.policy=full")),
    (("mesh.stage=2", "mesh.replica=2", "pipeline.schedule=1f1b", "pipeline.microbatches=2"),
     ("zero.stage=3", "remat.policy=dots")),
])
def test_pipelines_compose_with_tensor_replica_remat_and_frozen_params(pipe, rest):
    """The embedding frozen (trainable=), remat on, with tensor or replica beside stage: the same run as data=8."""
    def go(*overrides):
        train, state = gpt_train(*GPT, *rest, *overrides, trainable=blocks_only)
        initial = np.asarray(state.params["embedding"])
        losses = []
        for batch in token_batches(3, 16, 32):
            state, metrics = train(state, batch)
            losses.append(float(metrics["loss"]))
        return np.array(losses), state, initial

    ref_losses, ref, initial = go()
    losses, state, _ = go(*pipe)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        assert rel_norm(a, b) < 1e-5
    # the frozen embedding did not move (from the model's initial one, as data=8 held it before its steps)
    np.testing.assert_array_equal(np.asarray(state.params["embedding"]), initial)


def test_a_pipeline_in_bf16_trains_like_data_parallelism_in_bf16():
    def go(*overrides):
        losses, _, _ = run("precision.compute_dtype=bfloat16", "zero.stage=2", *overrides)
        return losses

    np.testing.assert_allclose(go("mesh.stage=2", "pipeline.schedule=1f1b", "pipeline.microbatches=2"), go(),
                               rtol=1e-2)
