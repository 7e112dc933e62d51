"""zjax.compression: pruning masks, fake quantization, cleaning, layer reduction and distillation,
through make_train_step under ZeRO 0-3 and the tensor axis (8 simulated devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zjax
from gpt_helpers import gpt_train, tiny_config, token_batches
from zjax import compression
from zjax.checkpoint import Checkpointer
from zjax.compression import clean, distill, schedule
from zjax.errors import ConfigError
from zjax.models import gpt_loss, make_gpt
from zjax.models.gpt import count_params

KEY = jax.random.key(0)


# --- masks ------------------------------------------------------------------------------------


def test_kth_largest_is_exact_and_magnitude_masks_keep_the_ratio():
    x = jax.random.normal(KEY, (3, 4096))
    for k in (1, 7, 2048, 4096):
        assert np.array_equal(compression.kth_largest(jnp.abs(x), k), -np.sort(-np.abs(x), axis=-1)[:, k - 1])
    ties = jnp.ones((2, 8, 4))
    assert int(compression.magnitude_mask(ties, 0.25).sum()) == 64  # l1: every tie at the threshold
    assert (np.asarray(compression.magnitude_mask(ties, 0.25, exact=True)).sum((1, 2)) == 8).all()  # topk: k
    w = jax.random.normal(KEY, (2, 96, 40))
    for ratio in (0.5, 0.1, 0.75):
        kept = np.asarray(compression.magnitude_mask(w, ratio))
        np.testing.assert_array_equal(kept.sum((1, 2)), round(96 * 40 * ratio))
        # every kept weight is at least as large as every pruned one, per matrix
        a = np.abs(np.asarray(w))
        for i in range(2):
            assert a[i][kept[i]].min() >= a[i][~kept[i]].max()


def test_structured_masks_n_of_m_blocks_rows_channels_heads():
    w = jax.random.normal(KEY, (2, 64, 48))
    nm = np.asarray(compression.n_of_m_mask(w, 2, 4)).reshape(2, 16, 4, 48)
    assert (nm.sum(2) == 2).all()
    top2 = np.sort(np.abs(np.asarray(w)).reshape(2, 16, 4, 48), axis=2)[:, :, 2:]
    np.testing.assert_array_equal(np.sort(np.where(nm, np.abs(np.asarray(w)).reshape(2, 16, 4, 48), 0), 2)[:, :, 2:],
                                  top2)
    blocks = np.asarray(compression.block_mask(w, 0.5, 4, 1)).reshape(2, 16, 4, 48)
    assert (blocks.all(2) | ~blocks.any(2)).all() and blocks.mean() == 0.5
    assert (np.asarray(compression.row_mask(w, 0.25)).sum(-1) == 12).all()
    assert (np.asarray(compression.channel_mask(w, 0.5)).sum(-1) == 32).all()
    heads = np.asarray(compression.head_mask(w, 0.5, num_heads=8, groups=2))
    assert heads.shape == (2, 8) and (heads.reshape(2, 2, 4).sum(-1) == 2).all()
    with pytest.raises(ConfigError, match="5x1"):
        compression.block_mask(w, 0.5, 5, 1)


# --- through the train step ---------------------------------------------------------------------

SPARSE = "compression.sparse_pruning=[{modules: [mlp/w_, attn/w], dense_ratio: 0.5, schedule_offset: 2}]"


def _run(*overrides, steps=4, **kw):
    train, state = gpt_train(*overrides, **kw)
    losses, params = [], []
    for batch in token_batches(steps, train.global_batch_size, 32):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
        params.append(jax.device_get(state.params))
    return train, state, losses, params


@pytest.fixture(scope="module")
def sparse_runs():
    return {name: _run(SPARSE, *extra) for name, extra in
            {"zero0": ("zero.stage=0",), "zero3": ("zero.stage=3",), "zero2_tensor2": ("zero.stage=2", "mesh.tensor=2")}
            .items()}


def test_sparse_pruning_starts_on_its_step_and_zeros_stay_zero_under_every_stage(sparse_runs):
    _, _, losses, params = sparse_runs["zero0"]
    matched = ("mlp/w_", "attn/w")
    # schedule_offset=2: the forward of step 2 is the first to see pruned weights, which the update
    # of step 1 leaves (params[i] is what step i's update gives, step i + 1's forward reads)
    for step, p in enumerate(params):
        fractions = compression.sparsity(p, matched)
        assert len(fractions) == 7 and "blocks/attn_norm/scale" not in fractions
        for name, fraction in fractions.items():
            assert (fraction == 0.0) if step < 1 else abs(fraction - 0.5) <= 0.005, (step, name, fraction)
    np.testing.assert_array_equal(losses[:2], _run("zero.stage=0", steps=2)[2])  # dense forwards before
    zeros = [np.asarray(params[1]["blocks"]["mlp"]["w_up"]) == 0, np.asarray(params[3]["blocks"]["mlp"]["w_up"]) == 0]
    np.testing.assert_array_equal(zeros[0], zeros[1])
    for name in ("zero3", "zero2_tensor2"):
        _, _, other_losses, other = sparse_runs[name]
        np.testing.assert_allclose(other_losses, losses, rtol=2e-5)
        np.testing.assert_array_equal(np.asarray(other[-1]["blocks"]["mlp"]["w_up"]) == 0, zeros[1])


def test_pruned_zeros_survive_a_checkpoint_and_more_steps(sparse_runs, tmp_path):
    train, state, _, params = sparse_runs["zero3"]
    ckpt = Checkpointer(tmp_path)
    ckpt.save(4, state)
    ckpt.wait()
    ckpt.close()
    fresh = zjax.make_train_step(tiny_config(SPARSE, "zero.stage=1"), gpt_loss, model=make_gpt(tiny_config().model))
    restored, _ = Checkpointer(tmp_path).restore(fresh)
    zeros = np.asarray(params[-1]["blocks"]["attn"]["wq"]) == 0
    for batch in token_batches(3, fresh.global_batch_size, 32, seed=5):
        restored, _ = fresh(restored, batch)
    assert np.array_equal(np.asarray(jax.device_get(restored.params)["blocks"]["attn"]["wq"]) == 0, zeros)


def test_gradual_schedule_and_patterns():
    groups = ("compression.sparse_pruning=[{modules: [mlp/w_up], dense_ratio: 0.25, schedule_offset: 1, "
              "schedule_offset_end: 3, schedule_offset_stride: 1}, {modules: [mlp/w_down], pattern: '2:4'}]")
    _, _, _, params = _run(groups, "zero.stage=2", steps=5)
    ups = [compression.sparsity(p, ["mlp/w_up"])["blocks/mlp/w_up"] for p in params]
    expected = [1 - schedule.dense_ratio_at(step + 1, 0.25, 1, 3, 1) for step in range(5)]
    np.testing.assert_allclose(ups, expected, atol=0.005)
    down = np.asarray(params[-1]["blocks"]["mlp"]["w_down"])
    assert ((down.reshape(down.shape[0], -1, 4, down.shape[-1]) != 0).sum(2) == 2).all()


# --- row and head pruning, then cleaning --------------------------------------------------------

STRUCTURED = ("compression.row_pruning=[{modules: [mlp/w_up], related_modules: [mlp/w_down], dense_ratio: 0.5}]",
              "compression.head_pruning=[{modules: [attn/wo], related_modules: ['attn/w[qkv]'], dense_ratio: 0.5, "
              "num_heads: 4, num_kv_heads: 2}]")


@pytest.mark.parametrize("kv", [2, 4])
def test_row_and_head_pruning_clean_to_an_exactly_smaller_model_that_computes_the_same(kv):
    overrides = (*STRUCTURED, f"model.n_kv_heads={kv}")
    overrides = tuple(o.replace("num_kv_heads: 2", f"num_kv_heads: {kv}") for o in overrides)
    train, state, _, params = _run(*overrides, "zero.stage=3", steps=2)
    cfg = train.config.model
    pruned = params[-1]
    small, small_cfg = clean.redundancy_clean(pruned, cfg)
    assert small_cfg["d_ff"] == cfg.d_ff // 2 and small_cfg["n_heads"] == cfg.n_heads // 2
    assert small_cfg["n_kv_heads"] == (kv if kv == 2 else cfg.n_heads // 2)
    shrunk = zjax.load_config({"model": small_cfg, "data": {"seq_len": 32}}).model
    assert clean.parameter_count(small) == count_params(shrunk) < clean.parameter_count(pruned)
    expected_drop = cfg.n_layers * (3 * cfg.d_model * cfg.d_ff // 2 + 2 * cfg.d_model * (cfg.d_model // 2)
                                    + (2 * cfg.d_model * (cfg.d_model // 2) if kv == 4 else 0))
    assert clean.parameter_count(pruned) - clean.parameter_count(small) == expected_drop

    from zjax.inference.model import logits

    tokens = jnp.asarray(token_batches(1, 4, 32, split="val")[0]["tokens"][:, :-1])
    np.testing.assert_allclose(logits(jax.tree.map(jnp.asarray, small), shrunk, tokens),
                               logits(jax.tree.map(jnp.asarray, pruned), cfg, tokens), rtol=1e-5, atol=1e-5)


def test_channel_pruning_of_the_down_projection_cleans_like_row_pruning():
    """Channel pruning masks input features (w_down's rows; its related w_up's columns)."""
    groups = "compression.channel_pruning=[{modules: [mlp/w_down], related_modules: [mlp/w_up], dense_ratio: 0.25}]"
    train, _, _, params = _run(groups, "zero.stage=2", steps=2)
    cfg = train.config.model
    down = np.asarray(params[-1]["blocks"]["mlp"]["w_down"])
    assert ((down != 0).any(-1).sum(-1) == round(cfg.d_ff * 0.25)).all()
    small, small_cfg = clean.redundancy_clean(params[-1], cfg)
    assert small_cfg["d_ff"] == round(cfg.d_ff * 0.25) and small_cfg["n_heads"] == cfg.n_heads
    from zjax.inference.model import logits

    shrunk = zjax.load_config({"model": small_cfg, "data": {"seq_len": 32}}).model
    tokens = jnp.asarray(token_batches(1, 2, 32, split="val")[0]["tokens"][:, :-1])
    np.testing.assert_allclose(logits(jax.tree.map(jnp.asarray, small), shrunk, tokens),
                               logits(jax.tree.map(jnp.asarray, params[-1]), cfg, tokens), rtol=1e-5, atol=1e-5)


# --- quantization-aware training ---------------------------------------------------------------


def test_fake_quant_rounds_like_the_inference_int8_and_passes_gradients_straight_through():
    from zjax.inference.quant import quantize_int8

    w = jax.random.normal(KEY, (2, 32, 16))
    q = quantize_int8(w, impl="xla")
    np.testing.assert_array_equal(compression.fake_quant(w, 8), q.values.astype(jnp.float32) * q.scale[..., None, :])
    grad = jax.grad(lambda w: jnp.sum(compression.fake_quant(w, 4) * 3.0))(w)
    np.testing.assert_array_equal(grad, np.full(w.shape, 3.0))
    for symmetric in (True, False):
        for group in (None, 8):
            err = np.abs(compression.fake_quant(w, 4, symmetric=symmetric, group_size=group) - w)
            assert 0 < err.max() < 0.5
    x = jax.random.normal(KEY, (3, 5, 16))
    xq = compression.fake_quant_tokens(x, 8)
    scale = np.abs(x).max(-1, keepdims=True) / 127
    assert (np.abs(xq - x) <= scale / 2 + 1e-7).all()


QAT = "compression.weight_quantization=[{modules: ['attn/w', 'mlp/w_'], start_bits: 8, target_bits: 8}]"
ACT = "compression.activation_quantization=[{modules: ['mlp/w_down'], bits: 4, schedule_offset: 1}]"


def test_qat_steps_equal_training_at_the_quantized_weights_and_compose_with_zero3_and_tensor():
    base = _run("zero.stage=0", steps=3)[2]
    qat = {stage: _run(QAT, ACT, f"zero.stage={stage}", steps=3) for stage in (0, 3)}
    tensor = _run(QAT, ACT, "zero.stage=1", "mesh.tensor=2", steps=3)
    np.testing.assert_allclose(qat[3][2], qat[0][2], rtol=2e-5)
    np.testing.assert_allclose(tensor[2], qat[0][2], rtol=2e-5)
    assert base[0] != qat[0][2][0] and base[1:] != qat[0][2][1:]
    # step 0 by hand: the loss at fake-quantized weights, the activation group not yet active
    cfg = tiny_config("zero.stage=0")
    graphdef, params = nnx.split(make_gpt(cfg.model, seed=0), nnx.Param)
    pure = nnx.to_pure_dict(params)
    groups = zjax.load_config({"compression": {"weight_quantization": [{"modules": ["attn/w", "mlp/w_"]}]}})
    quantized = compression.quantize_weights(pure, groups.compression.weight_quantization, 0)
    nnx.replace_by_pure_dict(params, quantized)
    batch = token_batches(1, 16, 32)[0]
    loss, _ = gpt_loss(nnx.merge(graphdef, params), {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss), qat[0][2][0], rtol=1e-5)


def test_qat_exports_to_the_engines_int8_weights():
    from zjax.inference.model import logits as serve_logits

    train, state, _, params = _run(QAT, "zero.stage=3", steps=3)
    float_params = jax.tree.map(jnp.asarray, params[-1])
    int8 = clean.export_int8(float_params, impl="xla")
    cfg = train.config.model
    tokens = jnp.asarray(token_batches(1, 4, 32, split="val")[0]["tokens"][:, :-1])
    groups = train.config.compression.weight_quantization
    fake = serve_logits(compression.quantize_weights(float_params, groups, 3), cfg, tokens)
    real = serve_logits(int8, cfg, tokens)
    np.testing.assert_allclose(real, fake, rtol=1e-4, atol=1e-4)
    p, q = jax.nn.log_softmax(serve_logits(float_params, cfg, tokens)), jax.nn.log_softmax(real)
    kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
    assert kl <= 1e-3, kl


# --- layer reduction and distillation -----------------------------------------------------------


def test_layer_reduction_copies_the_chosen_teacher_layers_bit_for_bit():
    teacher_cfg = tiny_config("model.n_layers=4").model
    _, params = nnx.split(make_gpt(teacher_cfg, seed=3), nnx.Param)
    teacher = nnx.to_pure_dict(params)
    student = distill.reduce_layers(teacher, [1, 3])
    for path, leaf in jax.tree_util.tree_flatten_with_path(student)[0]:
        source = teacher
        for key in path:
            source = source[key.key]
        if path[0].key == "blocks":
            np.testing.assert_array_equal(leaf, np.asarray(source)[[1, 3]])
        else:
            np.testing.assert_array_equal(leaf, source)
    loop = {"layers": {"0": np.zeros(2), "1": np.ones(2), "2": np.full(2, 2.0)}, "head": np.ones(3)}
    reduced = distill.reduce_layers(loop, [2, 0])
    assert list(reduced["layers"]) == ["0", "1"] and reduced["layers"]["0"][0] == 2.0
    with pytest.raises(ConfigError, match="layers \\[7\\] do not exist"):
        distill.reduce_layers(teacher, [0, 7])


def test_distillation_trains_only_the_student_with_the_teacher_frozen_and_sharded():
    cfg = tiny_config("zero.stage=3")
    model = distill.Distillation(make_gpt(cfg.model, seed=1), make_gpt(cfg.model, seed=2))
    teacher_before = jax.device_get(nnx.to_pure_dict(nnx.state(model.teacher, nnx.Param)))

    def loss_fn(model, batch):
        return distill.distillation_loss(model, batch, temperature=2.0, alpha=0.5)

    train = zjax.make_train_step(cfg, loss_fn, model=model, trainable=nnx.PathContains("student"))
    state = train.init()
    assert not jax.tree.leaves(state.master["teacher"]) and not jax.tree.leaves(state.frozen["student"])
    # the frozen teacher is split over data like a ZeRO-3 master
    assert state.frozen["teacher"]["blocks"]["mlp"]["w_up"].sharding.spec != jax.sharding.PartitionSpec()
    for batch in token_batches(2, train.global_batch_size, 32):
        state, metrics = train(state, batch)
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(after["teacher"]["blocks"]["mlp"]["w_up"], teacher_before["blocks"]["mlp"]["w_up"])
    assert np.isfinite(float(metrics["kd"])) and float(metrics["kd"]) > 0
    # hidden-state matching adds hidden_weight x the mean squared difference of the final hidden states
    batch = {k: jnp.asarray(v) for k, v in token_batches(1, 2, 32)[0].items()}
    base, aux = distill.distillation_loss(model, batch, alpha=0.5)
    with_hidden, _ = distill.distillation_loss(model, batch, alpha=0.5, hidden_weight=3.0)
    tokens = batch["tokens"][:, :-1]
    mse = float(jnp.mean(jnp.square(model.student.hidden(tokens) - model.teacher.hidden(tokens))))
    np.testing.assert_allclose(float(with_hidden), float(base) + 3.0 * mse, rtol=1e-5)
    # kd_loss is T^2 KL(teacher || student): zero against itself, positive otherwise
    logits = jax.random.normal(KEY, (2, 3, 11))
    assert float(jnp.abs(distill.kd_loss(logits, logits, 2.0)).max()) < 1e-6
    assert float(distill.kd_loss(logits, logits * 0.5, 2.0).min()) > 0


def test_bad_compression_config_names_the_key():
    with pytest.raises(ConfigError, match="pattern"):
        zjax.load_config({"compression": {"sparse_pruning": [{"pattern": "4:2"}]}})
    with pytest.raises(ConfigError, match="target_bits"):
        zjax.load_config({"compression": {"weight_quantization": [{"start_bits": 4, "target_bits": 8}]}})
    with pytest.raises(ConfigError, match="match no matmul weight"):
        _run("compression.row_pruning=[{modules: [nothing_here]}]", steps=1)
    with pytest.raises(ConfigError, match="dense_ratoi|dense_ratio"):
        zjax.load_config({"compression": {"sparse_pruning": [{"dense_ratoi": 0.5}]}})
