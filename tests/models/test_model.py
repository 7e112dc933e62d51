"""The reference GPT: causality, documents, GQA, dtypes, metadata and scan placeholders."""
import functools
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from zjax import layers
from zjax.errors import ConfigError
from zjax.models import gpt
from zjax.models.gpt import ACTIVATION_NAMES, count_params, gpt_loss, logical_axes, make_gpt


def tiny_config(**overrides):
    values = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176,
                  max_seq_len=64, rope_theta=10000.0, tie_embeddings=True, norm_eps=1e-5)
    return SimpleNamespace(**{**values, **overrides})


def random_tokens(shape, seed=1):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.int32)


def forward(model, tokens, segment_ids=None):
    """Jitted logits: eager forward passes would dominate the test time."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, tokens, segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, segment_ids):
    return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)


def loss_of(model, batch):
    graphdef, state = nnx.split(model)
    return _loss(graphdef, state, batch)


@functools.partial(jax.jit, static_argnums=0)
def _loss(graphdef, state, batch):
    return gpt_loss(nnx.merge(graphdef, state), batch)


@pytest.fixture(scope="module")
def model():
    return make_gpt(tiny_config())


def test_logits_shape_and_dtype(model):
    logits = forward(model, random_tokens((2, 16)))
    assert logits.shape == (2, 16, 256)
    assert logits.dtype == jnp.float32


def test_future_tokens_do_not_change_earlier_logits(model):
    tokens = random_tokens((2, 16))
    changed = tokens.copy()
    changed[:, 10] = (tokens[:, 10] + 1) % 256
    before, after = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert jnp.abs(before[:, 10:] - after[:, 10:]).max() > 1e-3


def test_segment_ids_isolate_packed_documents(model):
    doc_a, doc_b = random_tokens((1, 8), seed=2), random_tokens((1, 8), seed=3)
    packed = np.concatenate([doc_a, doc_b], axis=1)
    segment_ids = np.array([[0] * 8 + [1] * 8])
    packed_logits = forward(model, packed, segment_ids=segment_ids)
    # Rotary embeddings are relative, so doc B alone gives the same logits.
    np.testing.assert_allclose(packed_logits[:, 8:], forward(model, doc_b), atol=1e-4)
    np.testing.assert_allclose(packed_logits[:, :8], forward(model, doc_a), atol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_kv_heads_equal_repeated_full_heads(n_kv_heads):
    grouped = make_gpt(tiny_config(n_kv_heads=n_kv_heads), seed=4)
    full = make_gpt(tiny_config(n_kv_heads=4), seed=5)
    repeats = 4 // n_kv_heads
    state = nnx.to_pure_dict(nnx.state(grouped))
    attn = state["blocks"]["attn"]
    for name in ("wk", "wv"):
        per_head = attn[name].reshape(2, 64, n_kv_heads, 16)
        attn[name] = jnp.repeat(per_head, repeats, axis=2).reshape(2, 64, 64)
    full_state = nnx.state(full)
    nnx.replace_by_pure_dict(full_state, state)
    nnx.update(full, full_state)
    tokens = random_tokens((2, 16))
    np.testing.assert_allclose(forward(grouped, tokens), forward(full, tokens), atol=1e-5)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        make_gpt(tiny_config(n_kv_heads=3))


def test_untrained_loss_is_near_uniform(model):
    loss, aux = loss_of(model, {"tokens": random_tokens((8, 17))})
    assert abs(float(loss) - math.log(256)) < 0.1
    assert float(aux["weight"]) == 8 * 16


def test_loss_mask_and_document_boundaries_set_the_weight(model):
    tokens = random_tokens((2, 9))
    loss_mask = np.ones((2, 9), np.int32)
    loss_mask[0, 5:] = 0
    segment_ids = np.array([[0] * 9, [0] * 4 + [1] * 5])
    _, aux = loss_of(model, {"tokens": tokens, "loss_mask": loss_mask,
                              "segment_ids": segment_ids})
    # Row 0 counts targets 1..4; row 1 drops the target that starts document 1.
    assert float(aux["weight"]) == 4 + 7


@pytest.mark.slow
def test_adam_steps_reduce_loss_on_a_fixed_batch():
    model = make_gpt(tiny_config())
    graphdef, params = nnx.split(model)
    batch = {"tokens": random_tokens((4, 33))}
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: gpt_loss(nnx.merge(graphdef, p), batch)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(15):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1.0


def test_bf16_params_give_a_finite_loss_close_to_fp32(model):
    graphdef, params = nnx.split(model)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    batch = {"tokens": random_tokens((8, 17))}
    loss32, _ = loss_of(model, batch)
    loss16, _ = loss_of(nnx.merge(graphdef, bf16), batch)
    assert loss16.dtype == jnp.float32 and jnp.isfinite(loss16)
    assert abs(float(loss16) - float(loss32)) < 0.02


def test_logical_axes_name_every_dimension(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    axes = logical_axes(model)
    is_names = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_names)
    assert all(jax.tree.leaves(jax.tree.map(lambda p, names: p.ndim == len(names),
                                            params, axes)))
    block_axes = jax.tree.leaves(axes["blocks"], is_leaf=is_names)
    assert all(names[0] == "layers" for names in block_axes)
    assert axes["blocks"]["mlp"]["w_gate"] == ("layers", "embed", "mlp")
    assert axes["embedding"] == ("vocab", "embed")
    assert "layers" not in axes["final_norm"]["scale"]


def test_logical_axes_of_an_abstract_model_match_the_real_one(model):
    abstract = nnx.eval_shape(lambda: make_gpt(tiny_config()))
    assert logical_axes(abstract) == logical_axes(model)


def test_sequences_longer_than_max_seq_len_are_refused(model):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(random_tokens((1, 65)))


def test_every_activation_name_is_tagged(model):
    graphdef, params = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda p: gpt_loss(nnx.merge(graphdef, p),
                                                  {"tokens": random_tokens((1, 9))})[0])(params))
    for name in ACTIVATION_NAMES:
        assert f"name[name={name}]" in jaxpr, name


@jax.tree_util.register_pytree_node_class
class Box:
    """A stand-in for the placeholder leaves the train step hands to scan_layers."""

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_placeholder_leaves_reach_scan_layers_through_merge(model, monkeypatch):
    tokens = random_tokens((2, 16))
    expected = forward(model, tokens)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    pure["blocks"] = jax.tree.map(Box, pure["blocks"])
    nnx.replace_by_pure_dict(state, pure)
    is_box = lambda x: isinstance(x, Box)  # noqa: E731
    seen = []

    def unboxing_scan(fn, carry, stacked_params):
        leaves = jax.tree.leaves(stacked_params, is_leaf=is_box)
        seen.append(len(leaves) == 9 and all(map(is_box, leaves)))
        unboxed = jax.tree.map(lambda box: box.value, stacked_params, is_leaf=is_box)
        return layers.scan_layers(fn, carry, unboxed)

    monkeypatch.setattr(gpt, "scan_layers", unboxing_scan)
    logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens))(state)
    assert seen == [True]
    np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_param_count_formula(tie_embeddings):
    cfg = tiny_config(tie_embeddings=tie_embeddings)
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(make_gpt(cfg), nnx.Param)))
    assert counted == count_params(cfg)
    assert counted == 108_864 + (0 if tie_embeddings else 256 * 64)
