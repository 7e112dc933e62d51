"""One placement (issue 12, item 5): the logical-axis rules place activations (``zjax.shard``) and
choose the dimension ZeRO splits each parameter along; one ``ZeroStage`` object holds what each
ZeRO stage decides, and the step and ``zjax plan`` read it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import zjax
from zjax.parallel import zero
from zjax.analysis.plan import zjax_bytes
from zjax.parallel.sharding import logical_spec

import third_party_models as tpm


def test_logical_spec_maps_names_through_the_rules_and_uses_each_mesh_axis_once():
    rules = {"batch": "data", "embed": "data", "mlp": "tensor", "length": None}
    assert logical_spec(("batch", "length", "embed"), rules) == P(("replica", "data"), None, None)
    assert logical_spec(("length", "embed"), rules) == P(None, "data")
    assert logical_spec(("embed", "mlp"), rules) == P("data", "tensor")
    # axes the mesh lacks or holds once are left out
    assert logical_spec(("embed", "mlp"), rules, mesh_axes={"data": 8, "tensor": 1}) == P("data", None)


def test_shard_is_a_no_op_outside_a_mesh_and_inside_the_train_step():
    x = jnp.ones((8, 4))
    assert zjax.shard(x, ("batch", "embed")) is x
    mesh = jax.make_mesh((1, 8), ("replica", "data"), axis_types=(AxisType.Auto,) * 2)
    inside = jax.shard_map(lambda y: zjax.shard(y, ("batch", "embed")) * 2, mesh=mesh,
                           in_specs=P("data"), out_specs=P("data"))
    np.testing.assert_array_equal(jax.jit(inside)(x), x * 2)
    with pytest.raises(ValueError, match="one name"):
        zjax.shard(x, ("batch",))


def test_shard_constrains_activations_under_a_mesh_by_the_rules():
    mesh = jax.make_mesh((1, 8), ("replica", "data"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda x: zjax.shard(x * 2, ("length", "embed")))(jnp.ones((4, 16)))
        assert out.sharding.spec == P(None, "data")
        out = jax.jit(lambda x: zjax.shard(x * 2, ("batch", "embed")))(jnp.ones((8, 16)))
        assert out.sharding.spec in (P("data"), P("data", None), P(("replica", "data"), None))


def test_the_rules_choose_the_dimension_zero_splits():
    """Under the default rules (embed -> data) the MLP kernels split along embed; ruling mlp to
    data instead splits them along mlp, and training still equals the optax loop."""
    given = tpm.init_nnx_loop()

    def split_dims(*overrides):
        train = zjax.make_train_step(tpm.zero_config(3, *overrides), tpm.nnx_loop_loss, model=given,
                                     optimizer=optax.adam(1e-3))
        train.prepare()
        up = train.layouts["layers"][0]["up"]["kernel"]  # (embed, mlp) = (32, 64)
        return up.dim, train

    assert split_dims()[0] == 0
    dim, train = split_dims("logical_axis_rules.embed=null", "logical_axis_rules.mlp=data")
    assert dim == 1
    state = train.init()
    state, metrics = train(state, tpm.lm_batches(1)[0])
    assert np.isfinite(float(metrics["loss"]))


def test_the_batch_is_always_data_parallel():
    with pytest.raises(zjax.ConfigError, match="batch='tensor'"):
        zjax.load_config("configs/tiny.yaml", ["logical_axis_rules.batch=tensor"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("mixed", [False, True])
def test_one_zero_stage_object_gives_the_zero_table_that_plan_uses(stage, mixed):
    n, psi = 8, 1000
    z = zero.ZeroStage(stage, n, mixed)
    compute = 2 if mixed else 4
    table = {0: 12 * psi if not mixed else 12 * psi,  # stage 0 keeps fp32 params (the master)
             1: (compute * psi + 4 * psi / n + 8 * psi / n) if mixed else 4 * psi + 8 * psi / n,
             3: 12 * psi / n}
    table[2] = table[1]
    assert z.state_bytes(psi, compute) == pytest.approx(table[stage])
    overrides = [f"zero.stage={stage}"] + (["precision.compute_dtype=bfloat16"] if mixed else [])
    rows = zjax_bytes(zjax.load_config("configs/tiny.yaml", overrides), psi, n, stage)
    assert rows["compute params"] + rows["master params"] + rows["moments"] == pytest.approx(table[stage])
    assert z.gathers_after_update == (stage in (1, 2)) and z.reduces_in_backward == (stage >= 2)
