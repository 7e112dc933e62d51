"""Per-device TrainState bytes follow ZeRO's table (docs/architecture.md) for every stage."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zjax
from gpt_helpers import device0_bytes, gpt_train

N = 8
# bytes per parameter on one device: (replicated part, part divided by N)
TABLE = {
    ("float32", 0): (12, 0),
    ("float32", 1): (4, 8),
    ("float32", 2): (4, 8),
    ("float32", 3): (0, 12),
    ("bfloat16", 0): (12, 0),
    ("bfloat16", 1): (2, 12),
    ("bfloat16", 2): (2, 12),
    ("bfloat16", 3): (0, 12),
}


@pytest.mark.parametrize("dtype,stage", sorted(TABLE))
def test_state_bytes_match_design_table(dtype, stage):
    train, state = gpt_train(f"zero.stage={stage}", f"precision.compute_dtype={dtype}")
    psi = sum(x.size for x in jax.tree.leaves(state.params))
    replicated, sharded = TABLE[(dtype, stage)]
    expected = replicated * psi + sharded * psi / N
    measured = device0_bytes(state)
    assert abs(measured - expected) / expected < 0.01, (measured, expected)


def test_indivisible_shapes_pad_by_less_than_one_row_per_device():
    """A vocabulary of 50257 on 8 devices: a leaf with no dimension divisible by N is padded by
    at most N-1 rows along its largest dimension; a divisible one is not padded at all."""
    params = {"embed": jnp.ones((50257, 3)), "stack": jnp.ones((3, 7, 5)), "bias": jnp.ones((13,)),
              "wide": jnp.ones((50257, 16))}
    axes = {"embed": ("vocab", "embed"), "stack": ("layers", "embed", "mlp"), "bias": ("embed",),
            "wide": ("vocab", "embed")}
    cfg = zjax.load_config("configs/tiny.yaml", ["zero.stage=3"])
    train = zjax.make_train_step(cfg, lambda p, b: jnp.sum(p["embed"]) * jnp.mean(b["x"]), logical_axes=axes)
    state = train.init(params)
    psi = sum(x.size for x in jax.tree.leaves(params))
    # at most N-1 rows of the padded dimension: 3 per embed row, 5 per stack row and layer, 1 per bias row
    padding_elements = (N - 1) * 3 + 3 * (N - 1) * 5 + (N - 1)
    assert device0_bytes(state.master) <= 4 * (psi + padding_elements) / N
    np.testing.assert_array_equal(state.params["embed"], params["embed"])
    assert state.master["embed"].sharding.shard_shape(state.master["embed"].shape) == (-(-50257 // N), 3)
    # 16 divides by 8: split along 'embed', no padding, and the optimizer sees (50257, 16).
    assert state.master["wide"].shape == (50257, 16)
    assert state.master["wide"].sharding.shard_shape((50257, 16)) == (50257, 2)


def test_stage2_reduce_scatters_inside_the_backward_pass():
    """Stage 2 never holds a full local gradient: its compiled temp is well below stage 1's."""
    from gpt_helpers import token_batches

    temps = {}
    for stage in (1, 2):
        train, state = gpt_train(f"zero.stage={stage}")
        compiled = train.lower(state, token_batches(1, 16, 32)[0]).compile()
        temps[stage] = compiled.memory_analysis().temp_size_in_bytes
    psi = sum(x.size for x in jax.tree.leaves(state.params))
    assert temps[1] - temps[2] > 0.5 * 4 * psi, temps
