"""1-bit Adam, 0/1 Adam and 1-bit LAMB inside ``make_train_step`` (issue 17), 8 simulated devices.

The step hands each device's local gradient (scaled as the mean over that device's share of
the weight) to the optimizer inside a shard_map over ``data``, keeps the optimizer state per
device (a leading device axis) and, for 0/1 Adam, evaluates each device's loss at the
consensus parameters plus its own offset. Each test runs the same optimizer by hand on the
same per-device gradients (``jax.grad`` of each device's mean loss) and compares.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from zjax import Checkpointer, make_train_step
from zjax.errors import ConfigError
from zjax.train import onebit

N = 8
STEPS = 7


def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (12, 32)) * 0.3, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 4)) * 0.3}


def batches(n=STEPS):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 4)).astype(np.float32)
    out = []
    for _ in range(n):
        x = rng.normal(size=(16, 12)).astype(np.float32)
        out.append({"x": x, "y": np.tanh(x @ w) + 0.1 * rng.normal(size=(16, 4)).astype(np.float32)})
    return out


def config(optimizer, lr=1e-2, stage=0, **extra):
    return {"mesh": {"data": N}, "batch": {"global_batch_size": 16}, "zero": {"stage": stage},
            "optimizer": {"type": optimizer, "lr": lr, **extra}, "gradient_clipping": 0.0,
            "precision": {"param_dtype": "float32", "compute_dtype": "float32"}}


def by_hand(tx, params, data, per_device_params=False):
    """``tx`` applied to each device's own gradient of its rows: params after every step
    (leaves [N, ...] when ``per_device_params``: each device's own copy)."""
    mesh = jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def first(tree):
        return jax.tree.map(lambda x: x[0], tree)

    def step(params, state, batch):
        p = first(params) if per_device_params else params
        grads = jax.grad(loss_fn)(p, batch)
        updates, state = tx.update(grads, first(state), p)
        p = jax.tree.map(jnp.add, p, updates)
        expand = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
        return (expand(p) if per_device_params else p), expand(state)

    p_spec = P("data") if per_device_params else P()
    run = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(p_spec, P("data"), P("data")),
                                out_specs=(p_spec, P("data")), check_vma=False))
    init = jax.jit(jax.shard_map(lambda p: jax.tree.map(lambda x: x[None], tx.init(p)), mesh=mesh,
                                 in_specs=P(), out_specs=P("data"), check_vma=False))
    state = init(params)
    if per_device_params:
        params = jax.tree.map(lambda x: jnp.broadcast_to(x, (N,) + x.shape), params)
    history = []
    for batch in data:
        params, state = run(params, state, batch)
        history.append(params)
    return history


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def train(cfg, data, *, checkpoint_at=None, tmp_path=None):
    train = make_train_step(cfg, loss_fn)
    state = train.init(init_params())
    out = []
    for i, batch in enumerate(data):
        if checkpoint_at == i:  # save, restore into a new step object, go on from there
            saver = Checkpointer(tmp_path)
            saver.save(i, state)
            saver.wait()
            train = make_train_step(cfg, loss_fn)
            train.prepare(init_params())
            state, _ = Checkpointer(tmp_path).restore(train)
        state, metrics = train(state, batch)
        # the step donates its input state: keep host copies
        kept = Snapshot(jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.opt_state))
        out.append((kept, float(metrics["loss"])))
    return train, out


class Snapshot:
    def __init__(self, params, opt_state):
        self.params, self.opt_state = params, opt_state


@pytest.mark.parametrize("optimizer", ["onebit_adam", "onebit_lamb"])
def test_onebit_in_the_step_equals_the_optimizer_on_each_devices_gradient(optimizer):
    data = batches()
    step, out = train(config(optimizer, freeze_step=3), data)
    assert isinstance(step.tx, onebit.DataParallelTransformation)
    # the state is per device: a leading axis of N split over data
    leaves = jax.tree.leaves(out[-1][0].opt_state)
    assert all(x.shape[0] == N for x in leaves if x.ndim)
    spec = jax.tree.leaves(step.state_specs.opt_state, is_leaf=lambda x: isinstance(x, P))
    assert spec and all(s == P("data") for s in spec)
    tx = onebit.onebit_adam(1e-2, freeze_step=3, axis_name="data") if optimizer == "onebit_adam" else \
        onebit.onebit_lamb(1e-2, freeze_step=3, axis_name="data")
    ref = by_hand(tx, init_params(), data)
    for t, ((state, _), want) in enumerate(zip(out, ref)):
        for name in ("w1", "b1", "w2"):
            assert rel(state.params[name], want[name]) < 2e-5, (t, name)
    assert out[-1][1] < out[0][1]


def test_onebit_adam_warmup_equals_adam_in_the_step():
    data = batches(3)
    _, exact = train(config("adam"), data)
    _, onebit_run = train(config("onebit_adam", freeze_step=5), data)
    for (s1, l1), (s2, l2) in zip(exact, onebit_run):
        assert abs(l1 - l2) <= 1e-6 * abs(l1)
        for name in ("w1", "b1", "w2"):
            assert rel(s2.params[name], s1.params[name]) < 1e-5


def test_zero_one_adam_consensus_plus_offset_is_each_devices_params():
    kw = dict(var_freeze_step=2, var_update_scaler=1, local_step_scaler=1, local_step_clipper=4)
    data = batches()
    _, out = train(config("zero_one_adam", lr=1e-3, **kw), data)
    tx = onebit.zero_one_adam(1e-3, axis_name="data", **kw)
    ref = by_hand(tx, init_params(), data, per_device_params=True)
    local_steps = 0
    for t, ((state, _), want) in enumerate(zip(out, ref)):
        offset = state.opt_state.momentum_accumulator
        local_steps += bool(np.any(np.asarray(offset["w1"]) != 0))
        for name in ("w1", "b1", "w2"):
            mine = np.asarray(state.params[name])[None] + np.asarray(offset[name])
            assert rel(mine, want[name]) < 2e-5, (t, name)
    assert local_steps >= 2  # the devices really ran apart between syncs


@pytest.mark.parametrize("stage", [0, 1])
def test_a_checkpoint_keeps_the_error_buffers(tmp_path, stage):
    data = batches()
    cfg = config("onebit_adam", freeze_step=2, stage=stage)
    _, straight = train(cfg, data)
    _, resumed = train(cfg, data, checkpoint_at=4, tmp_path=tmp_path)
    errors = np.asarray(straight[-1][0].opt_state.worker_error["w1"])
    assert np.any(errors != 0) and np.any(errors[0] != errors[1])  # per device, and in use
    for (s1, l1), (s2, l2) in zip(straight, resumed):
        assert l1 == l2
        for a, b in zip(jax.tree.leaves(s1.opt_state), jax.tree.leaves(s2.opt_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_deepspeed_onebit_blocks_map_and_train():
    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0,
          "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-2, "freeze_step": 3, "cuda_aware": False,
                                                         "comm_backend_name": "nccl"}}}
    train_, out = train(ds, batches(5))
    o = train_.config.optimizer
    assert (o.type, o.freeze_step, o.bias_correction) == ("onebit_adam", 2, False)  # DeepSpeed's count and formula
    assert out[-1][1] < out[0][1]
    zo = make_train_step({**ds, "optimizer": {"type": "ZeroOneAdam", "params": {
        "lr": 1e-3, "var_freeze_step": 10, "var_update_scaler": 4, "local_step_scaler": 100,
        "local_step_clipper": 8}}}, loss_fn).config.optimizer
    assert (zo.type, zo.var_freeze_step, zo.var_update_scaler, zo.local_step_clipper) == ("zero_one_adam", 10, 4, 8)
    lamb = make_train_step({**ds, "optimizer": {"type": "OneBitLamb", "params": {
        "lr": 1e-3, "freeze_step": 10, "max_coeff": 0.3, "min_coeff": 0.01, "coeff_beta": 0.9,
        "factor_max": 4.0, "factor_min": 0.5, "factor_threshold": 0.1}}}, loss_fn).config.optimizer
    assert (lamb.type, lamb.freeze_step, lamb.max_coeff) == ("onebit_lamb", 9, 0.3)


@pytest.mark.parametrize("optimizer, change, key", [
    ("onebit_adam", {"zero": {"stage": 1, "quantized_gradients": True, "node_size": 4}}, "zero.quantized_gradients"),
    ("zero_one_adam", {"zero": {"stage": 1}, "optimizer": {"type": "zero_one_adam", "lr": 1e-2, "var_freeze_step": 3,
                                                          "weight_decay": 0.1}}, "optimizer.weight_decay=0.1"),
    ("onebit_lamb", {"zero": {"stage": 3, "hpz_partition_size": 4}}, "zero.hpz_partition_size"),
    ("onebit_adam", {"mesh": {"data": 4, "tensor": 2}}, "mesh.tensor")])
def test_where_it_cannot_run_the_error_says_so(optimizer, change, key):
    extra = {"var_freeze_step": 3} if optimizer == "zero_one_adam" else {"freeze_step": 3}
    cfg = {**config(optimizer, **extra), **change}
    train_ = make_train_step(cfg, loss_fn)
    with pytest.raises(ConfigError, match=key):
        train_.init(init_params())


def by_hand_on_shards(tx, params, axes, data):
    """``by_hand`` for a resharded optimizer: the params split over data along ``axes``."""
    mesh = jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = jax.tree.map(lambda a: P() if a < 0 else P(*(None,) * a, "data"), axes)

    def step(shards, state, batch):
        whole = jax.tree.map(lambda x, a: x if a < 0 else jax.lax.all_gather(x, "data", axis=a, tiled=True),
                             shards, axes)
        grads = jax.grad(loss_fn)(whole, batch)
        updates, state = tx.update(grads, jax.tree.map(lambda x: x[0], state), shards)
        return jax.tree.map(jnp.add, shards, updates), jax.tree.map(lambda x: x[None], state)

    run = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P("data"), P("data")),
                                out_specs=(specs, P("data")), check_vma=False))
    state = jax.jit(jax.shard_map(lambda p: jax.tree.map(lambda x: x[None], tx.init(p)), mesh=mesh,
                                  in_specs=(specs,), out_specs=P("data"), check_vma=False))(params)
    history = []
    for batch in data:
        params, state = run(params, state, batch)
        history.append(params)
    return history


@pytest.mark.parametrize("optimizer, stage, accum", [("onebit_adam", 1, 1), ("onebit_adam", 2, 1),
                                                    ("onebit_adam", 3, 2), ("onebit_lamb", 1, 1),
                                                    ("onebit_lamb", 3, 1)])
def test_onebit_under_zero_keeps_shards_and_equals_it_by_hand(optimizer, stage, accum):
    """Under ZeRO 1-3 the step hands 1-bit Adam (and LAMB) whole local gradients and this
    device's parameter shards (``reshard``: its moments are shards too, its worker error whole;
    at ZeRO-3 the gathers hand their whole cotangents to sinks, summed over ``accum``
    micro-batches); across the freeze, the params equal the resharded optimizer applied by hand
    to each device's gradient."""
    data = batches()
    cfg = config(optimizer, freeze_step=3, stage=stage)
    cfg["batch"] = {**cfg["batch"], "micro_batch_size_per_device": 2 // accum, "grad_accum_steps": accum}
    step, out = train(cfg, data)
    assert step.grad_accum_steps == accum
    axes = jax.tree.map(lambda lay: lay.axis if lay.sharded else -1, step.layouts,
                        is_leaf=lambda x: hasattr(x, "sharded"))
    assert sorted(jax.tree.leaves(axes)) == [0, 0, 1]  # w1 along its 32 columns, b1 and w2 along their first axis
    mu = out[-1][0].opt_state.mu
    assert mu["w1"].shape == (N, 12, 32 // N) and mu["w2"].shape == (N, 32 // N, 4)  # a shard per device
    make = onebit.onebit_adam if optimizer == "onebit_adam" else onebit.onebit_lamb
    tx = make(1e-2, freeze_step=3, axis_name="data").reshard(axes)
    ref = by_hand_on_shards(tx, init_params(), axes, data)
    for t, ((state, _), want) in enumerate(zip(out, ref)):
        for name in ("w1", "b1", "w2"):
            assert rel(state.params[name], want[name]) < 2e-5, (t, name)
    assert out[-1][1] < out[0][1]


@pytest.mark.parametrize("optimizer", [
    ("optimizer.type=onebit_adam", "optimizer.freeze_step=2", "precision.compute_dtype=bfloat16"),
    # a variance phase of 4 exact updates (var_update_scaler 16: every one updates the variance), then
    # local steps (intervals of up to 2) with 1-bit syncs
    ("optimizer.type=zero_one_adam", "optimizer.var_freeze_step=4", "optimizer.var_update_scaler=16",
     "optimizer.local_step_scaler=1", "optimizer.local_step_clipper=2", "optimizer.weight_decay=0.0",
     "optimizer.lr=3e-4")],
    ids=["onebit_adam-bf16", "zero_one_adam"])
def test_communicating_optimizers_at_zero_3_on_the_gpt_equal_zero_1(optimizer):
    """The reference GPT (scan_layers, tied embedding) with 1-bit Adam (bf16 compute) and 0/1 Adam
    (local steps): ZeRO-3's gathers hand their whole local gradients to sinks, layer by layer (0/1
    Adam's sinks carry each device's offset onto the gathered consensus); the run equals ZeRO-1's,
    where the gradient of the replicated compute copy is whole anyway, step for step."""
    from gpt_helpers import gpt_train, token_batches

    runs = {}
    for stage in (1, 3):
        train_, state = gpt_train(f"zero.stage={stage}", "gradient_clipping=0", "optimizer.lr=3e-3", *optimizer)
        losses = []
        for batch in token_batches(7, 16, 32):
            state, metrics = train_(state, batch)
            losses.append(float(metrics["loss"]))
        runs[stage] = losses, jax.tree.map(np.asarray, state.params)
    np.testing.assert_allclose(runs[3][0], runs[1][0], rtol=1e-5)
    assert runs[3][0][-1] < runs[3][0][0]
    for a, b in zip(jax.tree.leaves(runs[3][1]), jax.tree.leaves(runs[1][1])):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_one_adam_under_zero_equals_zero_0(stage):
    """0/1 Adam on ZeRO's shards: the consensus master split, its state whole per device (the local
    phase gives each device its own momentum and offset; at ZeRO-3 each gather adds the device's
    offset to the gathered consensus); every phase equals ZeRO-0's run."""
    kw = dict(var_freeze_step=2, var_update_scaler=1, local_step_scaler=1, local_step_clipper=4, weight_decay=0.0)
    data = batches()
    _, zero0 = train(config("zero_one_adam", lr=1e-3, **kw), data)
    step, sharded = train(config("zero_one_adam", lr=1e-3, stage=stage, **kw), data)
    assert step.grad_accum_steps == 1 and step.zero.partitioned
    local_steps = 0
    for t, ((s0, l0), (s1, l1)) in enumerate(zip(zero0, sharded)):
        assert abs(l0 - l1) <= 1e-5 * abs(l0), t
        offset = s1.opt_state.momentum_accumulator
        local_steps += bool(np.any(np.asarray(offset["w1"]) != 0))
        for name in ("w1", "b1", "w2"):
            assert rel(s1.params[name], s0.params[name]) < 1e-5, (t, name)
            assert rel(offset[name], s0.opt_state.momentum_accumulator[name]) < 1e-4, (t, name)
    assert local_steps >= 2
