"""ALST tiling (``tiling.mlp_tiles``, ``tiling.loss_tiles``): the same training, less memory."""
import functools

import numpy as np
import pytest

import zjax
from gpt_helpers import gpt_train, token_batches

# long sequences, a wide MLP and a large vocabulary: the [S, d_ff] and [S, vocab] activations matter
WIDE = ("precision.compute_dtype=float32", "data.seq_len=256", "model.max_seq_len=256", "model.d_ff=1024",
        "model.vocab_size=2048", "batch.global_batch_size=8")


@functools.lru_cache(maxsize=None)
def run(*overrides, steps=2):
    """(losses, compiled temp bytes) of ``steps`` steps; once per module for each setting (the
    untiled ZeRO-3 run is two tests' reference)."""
    train, state = gpt_train(*WIDE, *overrides)
    batches = token_batches(steps, 8, 256)
    temp = train.lower(state, batches[0]).compile().memory_analysis().temp_size_in_bytes
    losses = []
    for b in batches:
        state, metrics = train(state, b)
        losses.append(float(metrics["loss"]))
    return np.array(losses), temp


@pytest.mark.parametrize("stage", [3])
def test_tiles_train_the_same_in_less_memory(stage):
    base, base_temp = run(f"zero.stage={stage}")
    tiles2, temp2 = run(f"zero.stage={stage}", "tiling.mlp_tiles=2")
    tiles4, temp4 = run(f"zero.stage={stage}", "tiling.mlp_tiles=4")
    np.testing.assert_allclose(tiles2, base, rtol=1e-6)
    np.testing.assert_allclose(tiles4, base, rtol=1e-6)
    # the MLP's [S, d_ff] intermediates exist one tile at a time
    assert temp4 < temp2 < base_temp


def test_loss_tiles_keep_one_tile_of_logits():
    # a vocabulary large enough that the [S, vocab] logits are the peak
    big = ("model.vocab_size=16384", "zero.stage=3", "tiling.mlp_tiles=4")
    base, base_temp = run(*big)
    tiled, tiled_temp = run(*big, "tiling.loss_tiles=4")
    np.testing.assert_allclose(tiled, base, rtol=1e-6)
    assert tiled_temp < base_temp


def test_tiles_compose_with_sequence_and_tensor_parallelism():
    base, _ = run("zero.stage=3")
    tiled, _ = run("zero.stage=3", "tiling.mlp_tiles=2", "tiling.loss_tiles=2", "mesh.sequence=2", "mesh.tensor=2",
                   "sequence_parallel=ring")
    # sums in another order over 4 model-parallel devices; measured 5e-5 after one update
    np.testing.assert_allclose(tiled, base, rtol=1e-4)


def test_tiles_that_do_not_divide_the_sequence_are_a_clear_error():
    with pytest.raises(zjax.ConfigError, match="tiling.mlp_tiles=3 does not divide the 256 positions"):
        run("tiling.mlp_tiles=3", steps=1)
