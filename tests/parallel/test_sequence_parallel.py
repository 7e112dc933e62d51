"""Sequence (context) parallelism over mesh.sequence: Ulysses and all-gather attention train
exactly like data parallelism, with packed documents, alone and with tensor parallelism."""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zjax
from gpt_helpers import device0_bytes, gpt_train, rel_norm, token_batches
from zjax.analysis import hlo
from zjax.parallel.sequence import attention, sequence_parallel, zigzag
from zjax.parallel.sharding import axis_rules, per_shard

COMMON = ("precision.compute_dtype=float32", "zero.stage=3")


def packed_batches(n=3):
    """Real text with packed documents: segment ids that change inside rows."""
    rng = np.random.default_rng(0)
    out = []
    for b in token_batches(n, 16, 32):
        out.append({**b, "segment_ids": np.cumsum(rng.random(b["tokens"].shape) < 0.08, axis=1).astype(np.int32)})
    return out


def run(*overrides):
    train, state = gpt_train(*COMMON, *overrides)
    losses = []
    for batch in packed_batches():
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def data_only():
    return run()


@pytest.mark.parametrize("overrides", [
    ("mesh.sequence=4", "sequence_parallel=ulysses"),      # 4 heads over 4; 2 KV heads repeated
    ("mesh.sequence=2", "sequence_parallel=ulysses", "zero.stage=1"),
    ("mesh.sequence=8", "sequence_parallel=all_gather", "zero.stage=0"),
    ("mesh.sequence=2", "mesh.tensor=2", "sequence_parallel=ulysses"),
    ("mesh.sequence=2", "mesh.tensor=2", "sequence_parallel=all_gather"),
    ("mesh.sequence=4", "sequence_parallel=ring"),          # zig-zag order: 32 tokens in 8 chunks
    ("mesh.sequence=8", "sequence_parallel=ring", "zero.stage=2"),
    ("mesh.sequence=2", "mesh.tensor=2", "sequence_parallel=ring"),
])
def test_sequence_parallel_trains_like_data_parallel(data_only, overrides):
    ref_losses, ref = data_only
    losses, state = run(*overrides)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
        assert rel_norm(a, b) < 3e-5


def test_ulysses_with_heads_that_do_not_divide_is_a_clear_error():
    with pytest.raises(zjax.ConfigError, match="sequence_parallel=ulysses needs the heads .* mesh.sequence=8"):
        run("mesh.sequence=8", "sequence_parallel=ulysses")


@pytest.mark.parametrize("mode", ["ulysses", "all_gather", "ring"])
def test_collectives_per_layer(mode):
    train, state = gpt_train(*COMMON, "mesh.sequence=2", f"sequence_parallel={mode}")
    text = train.lower(state, packed_batches(1)[0]).compile().as_text()
    found = [c for c in hlo.collectives(text, 8, dict(train.mesh.shape)) if c.axes == ("sequence",)]
    layers = train.config.model.n_layers
    cfg = train.config.model
    in_layers = collections.Counter((c.kind, c.full_bytes) for c in found if c.runs == layers)
    # one device's q (or output): [micro, seq / P, heads, head_dim] float32
    q = 4 * train.micro_batch_size * train.config.data.seq_len * cfg.d_model // 2
    kv = q * cfg.n_kv_heads // cfg.n_heads
    if mode == "ulysses":
        # forward: q, k, v to head-split and the output back; backward: the same four
        assert in_layers[("all-to-all", q)] == 4 and in_layers[("all-to-all", kv)] == 4
        assert not any(c.kind in ("all-gather", "reduce-scatter") and c.full_bytes >= kv for c in found if c.runs == layers)
    elif mode == "ring":
        # forward: K and V each rotated P - 1 = 1 times; backward: K, V and their gradients P = 2 times
        forward = collections.Counter(c.full_bytes for c in found
                                      if c.kind == "collective-permute" and c.runs == layers)
        assert forward[kv] >= 2
        backward = collections.Counter(c.full_bytes for c in found
                                       if c.kind == "collective-permute" and c.runs == 2 * layers)
        assert backward[kv] == 4
        assert not any(c.kind in ("all-to-all", "all-gather") and c.full_bytes >= kv for c in found)
    else:
        # forward: K and V gathered (to the whole sequence); backward: their gradients reduce-scattered
        assert in_layers[("all-gather", 2 * kv)] == 2 and in_layers[("reduce-scatter", 2 * kv)] == 2
        assert not any(c.kind == "all-to-all" for c in found)
    # the rest over sequence: the parameters' gradients summed over the sequence shards
    assert {k for k, _ in in_layers} <= {"all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute"}


@functools.partial(jax.jit, static_argnames="causal")
def whole_sequence_value_and_grad(q, k, v, ids, *, causal):
    """The reference: attention on the whole sequence, its value and gradients (one program per
    shape and causal for every mode and impl below)."""
    return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, causal=causal, segment_ids=ids))),
                              argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("mode,impl", [("ulysses", "xla"), ("all_gather", "xla"), ("ring", "xla"), ("ulysses", "interpret"),
                                       ("ring", "interpret")])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_function_on_a_split_sequence(mode, impl, causal):
    """``zjax.parallel.sequence.attention`` inside a region: values and gradients equal
    attention on the whole sequence, causal or not, with packed documents (ring with
    ``interpret``: the flash kernels per block, grouped KV heads)."""
    mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    kv_heads = 2 if impl != "xla" else 4
    q = jax.random.normal(k0, (2, 16, 4, 8))
    k = jax.random.normal(k1, (2, 16, kv_heads, 8))
    v = jax.random.normal(k2, (2, 16, kv_heads, 8))
    ids = jnp.asarray(np.cumsum(np.random.default_rng(1).random((2, 16)) < 0.2, axis=1), jnp.int32)
    names = ("batch", "length", "heads", None)

    # ring attention in zig-zag order (what the reference GPT does), the others in order
    order = zigzag(16, 4) if mode == "ring" else jnp.arange(16)

    def loss(q, k, v):
        region = per_shard(lambda q, k, v, ids, pos: attention(q, k, v, causal=causal, segment_ids=ids, positions=pos,
                                                               impl=impl),
                           (names, names, names, ("batch", "length"), ("length",)), names)
        out = region(q[:, order], k[:, order], v[:, order], ids[:, order], order)
        return jnp.sum(jnp.sin(out[:, jnp.argsort(order)]))

    with jax.set_mesh(mesh), axis_rules({"batch": "data", "length": "sequence", "heads": None}), \
            sequence_parallel(mode):
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = whole_sequence_value_and_grad(q, k, v, ids, causal=causal)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # and the whole-sequence function is softmax attention (jax's own, per document)
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]
    ref = jax.nn.dot_product_attention(q, *(jnp.repeat(x, 4 // kv_heads, axis=2) for x in (k, v)), mask=mask,
                                       is_causal=causal)
    np.testing.assert_allclose(attention(q, k, v, causal=causal, segment_ids=ids), ref, rtol=1e-5, atol=1e-5)


def test_ring_attention_saves_only_this_devices_blocks():
    """At 1024 tokens, where the score matrices dominate, a device of a sequence=8 ring holds at
    most a quarter of what a data=8 device holds (the same tokens per device): the custom VJP
    rotates K/V again in the backward pass instead of keeping every block's scores."""
    base = (*COMMON, "zero.stage=0", "data.seq_len=1024", "model.max_seq_len=1024", "batch.global_batch_size=8")
    batch = {"tokens": np.zeros((8, 1025), np.int32)}

    def temp(*overrides):
        train, state = gpt_train(*base, *overrides)
        return train.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    assert temp("mesh.sequence=8", "sequence_parallel=ring") <= temp() / 4


def test_deepspeed_sequence_parallel_size_maps_onto_the_sequence_axis():
    cfg = zjax.load_config({"train_batch_size": 16, "sequence_parallel_size": 4})
    assert cfg.mesh.sequence == 4 and cfg.sequence_parallel == "ulysses"
    with pytest.raises(zjax.ConfigError, match="tensor_sequence_parallel=true and mesh.sequence=2"):
        zjax.load_config("configs/tiny.yaml", ["mesh.sequence=2", "tensor_sequence_parallel=true"])


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_group_is_data_times_sequence(stage):
    """As in DeepSpeed-Ulysses, the devices of a sequence group share ZeRO's split: at
    sequence=4 x data=2 each device holds the state a data=8 device holds (not 4 times it),
    and the gathers run over data x sequence."""
    def state_bytes(*overrides):
        train, state = gpt_train("precision.compute_dtype=float32", f"zero.stage={stage}", *overrides)
        return train, state, device0_bytes((state.master, state.opt_state))

    _, _, data8 = state_bytes()
    train, state, split = state_bytes("mesh.sequence=4")
    assert split == data8
    text = train.lower(state, packed_batches(1)[0]).compile().as_text()
    axes = {c.axes for c in hlo.collectives(text, 8, dict(train.mesh.shape)) if c.kind == "all-gather"}
    assert ("data", "sequence") in axes


def test_shifted_rows_reach_each_device_as_its_slice_and_train_the_same(data_only):
    """The data pipeline's form under sequence parallelism: inputs and targets shifted on the
    host (zjax.data.loader.shift_tokens), so every leaf splits along the sequence; each
    device receives only its quarter of every row, and the run equals the token-window one."""
    from zjax.data.loader import shift_tokens

    ref_losses, _ = data_only
    train, state = gpt_train(*COMMON, "mesh.sequence=4", "sequence_parallel=ring")
    losses = []
    for batch in packed_batches():
        placed = train.shard_batch(shift_tokens(batch))
        for x in placed.values():
            assert {s.data.shape for s in x.addressable_shards} == {(16 // 2, 32 // 4)}
        state, metrics = train(state, placed)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_sequence_parallelism_composes_with_replicas_remat_and_bf16():
    extra = ("precision.compute_dtype=bfloat16", "remat.policy=full", "mesh.replica=2", "zero.stage=2")

    def losses(*overrides):
        train, state = gpt_train(*extra, *overrides)
        out = []
        for batch in packed_batches():
            state, metrics = train(state, batch)
            out.append(float(metrics["loss"]))
        return np.array(out)

    np.testing.assert_allclose(losses("mesh.sequence=2", "sequence_parallel=ring"), losses(), rtol=2e-2)


def test_a_checkpoint_moves_between_sequence_and_data_meshes_bit_exactly(tmp_path):
    """sequence=4 x data=2 ZeRO-3 (the state split over data x sequence) -> data=8 ZeRO-1:
    params and Adam moments bit-exact, and it trains on."""
    from zjax.checkpoint import to_portable

    train, state = gpt_train("precision.compute_dtype=float32", "mesh.sequence=4")
    state, _ = train(state, packed_batches(1)[0])
    ckpt = zjax.Checkpointer(tmp_path)
    ckpt.save(int(state.step), state)
    ckpt.wait()
    expected = jax.tree.map(np.asarray, to_portable(state))
    train, _ = gpt_train("precision.compute_dtype=float32", "zero.stage=1")
    restored, _ = ckpt.restore(train)
    ckpt.close()
    got = to_portable(restored)
    for key in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(got[key]), jax.tree.leaves(expected[key])):
            np.testing.assert_array_equal(np.asarray(a), b)
    train(restored, packed_batches(1)[0])
