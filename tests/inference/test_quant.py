"""Quantized weights (zjax.inference.quant) and their matmul kernels (pallas_kernels.quantized_matmul).

Kernel tolerances, relative to the largest magnitude of the reference: interpret mode against
the XLA path 1e-5 in float32 (summation order only; w8a8 accumulates in int32 and is exact),
2e-2 in bfloat16 (int4's reference rounds the dequantized weight to bfloat16); the XLA path
against ``x @ dequantized W`` 1e-5 (float32).

Quality thresholds were measured on the tiny GPT (d_model 64, 2 layers, d_ff 192) trained 150
steps on the standard library's source (loss ~2.0), bfloat16 reference, 512 val tokens: KL
int8 2.1e-5, w8a8 7.8e-5, int4 group 32 2.0e-3; top-1 agreement 99.6%, 99.0%, 96.1% (bfloat16
itself agrees with float32 on 99.4%). The KL bounds are the issue's (1e-3, 2e-3, 0.08, stated
for the demo model); top-1 is held to the issue's 98% for int8 and w8a8 and to 93% for int4.
benchmarks/quantization.py measures the demo model itself.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gpt_helpers import MANY_STEPS_OPTIONS, tiny_config, token_batches
from pallas_kernels import (int4_matmul, int4_matmul_reference, int8_matmul, int8_matmul_reference,
                            pack_int4, quantize_rows, unpack_int4, w8a8_matmul,
                            w8a8_matmul_reference)
from zjax.inference.model import logits
from zjax.inference.quant import (Int4Weight, Int8Weight, W8A8Weight, quantize_int4, quantize_int8,
                                  quantize_params, weight_bytes)
from zjax.models import gpt_loss, make_gpt

import zjax


def weights(k, n, seed=0, zero_cols=(3,)):
    w = jax.random.normal(jax.random.key(seed), (k, n)) * jnp.linspace(0.01, 1.0, n)
    return w.at[:, list(zero_cols)].set(0.0)


def test_int8_error_is_at_most_half_a_step_and_zero_columns_are_exact():
    w = weights(64, 40)
    q = quantize_int8(w)
    assert q.values.dtype == jnp.int8 and q.scale.shape == (40,) and q.scale.dtype == jnp.float32
    err = np.abs(np.asarray(w - q.dequantize()))
    assert (err <= np.asarray(q.scale) / 2 * (1 + 1e-5)).all()
    assert float(q.scale[3]) == 0.0 and (np.asarray(q.dequantize()[:, 3]) == 0).all()
    assert np.abs(np.asarray(q.values)).max() == 127


def test_int4_error_is_at_most_half_a_step_and_zero_groups_are_exact():
    w = weights(64, 40).at[32:, 7].set(0.0)  # column 3 all zero, column 7's second group zero
    q = quantize_int4(w, group_size=32)
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (32, 40)
    assert q.scale.shape == (2, 40) and q.group_size == 32 and q.shape == (64, 40)
    deq = np.asarray(q.dequantize())
    step = np.repeat(np.asarray(q.scale, np.float32), 32, axis=0)
    assert (np.abs(np.asarray(w) - deq) <= step / 2).all()
    assert (deq[:, 3] == 0).all() and (deq[32:, 7] == 0).all() and float(q.scale[1, 7]) == 0.0
    values = np.asarray(unpack_int4(q.packed, 32))
    assert values.min() >= -7 and values.max() <= 7


@pytest.mark.parametrize("group", [2, 8, 32])
def test_int4_packing_round_trips_every_value(group):
    k, n = 32, 16
    q = ((jnp.arange(k)[:, None] + 3 * jnp.arange(n)[None, :]) % 16 - 8).astype(jnp.int8)
    assert set(np.unique(np.asarray(q))) == set(range(-8, 8))
    packed = pack_int4(q, group)
    assert packed.dtype == jnp.uint8 and packed.shape == (k // 2, n)
    np.testing.assert_array_equal(unpack_int4(packed, group), q)


def test_stacked_weights_slice_per_layer():
    w = jax.random.normal(jax.random.key(1), (3, 64, 32))
    for quantize in (quantize_int8, functools.partial(quantize_int4, group_size=16)):
        stacked = quantize(w)
        assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(stacked))
        layer = jax.tree.map(lambda a: a[1], stacked)
        alone = quantize(w[1])
        jax.tree.map(np.testing.assert_array_equal, layer, alone)
        x = jax.random.normal(jax.random.key(2), (5, 64))
        scanned = jax.lax.scan(lambda c, lw: (c, lw.dot(x)), 0, stacked)[1]
        np.testing.assert_allclose(scanned[1], x @ alone.dequantize(), rtol=1e-5, atol=1e-5)


def assert_close(got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32
    err = np.abs(np.asarray(got) - np.asarray(want)).max()
    assert err <= tol * np.abs(np.asarray(want)).max(), (err, tol)


def int8_case(k, n, seed):
    return quantize_int8(weights(k, n, seed))


KERNELS = {
    "int8": (lambda w, x, impl, blocks: int8_matmul(x, w.values, w.scale, impl, block_sizes=blocks),
             lambda w, x: int8_matmul_reference(x, w.values, w.scale), quantize_int8),
    "w8a8": (lambda w, x, impl, blocks: w8a8_matmul(x, w.values, w.scale, impl, block_sizes=blocks),
             lambda w, x: w8a8_matmul_reference(x, w.values, w.scale), quantize_int8),
    "int4": (lambda w, x, impl, blocks: int4_matmul(x, w.packed, w.scale, impl, block_sizes=blocks and blocks[:2]),
             lambda w, x: int4_matmul_reference(x, w.packed, w.scale),
             functools.partial(quantize_int4, group_size=32)),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lead,k,n,blocks,dtype", [
    ((32,), 64, 64, (16, 16, 32), jnp.float32),      # 2 x 4 blocks, 2 K steps: every side divides
    ((3, 5), 96, 40, (16, 16, 32), jnp.float32),     # 15 rows, N=40: rows and N padded
    ((2, 3), 64, 48, None, jnp.bfloat16),            # default blocks, clamped
], ids=["divides", "padded", "bf16"])
def test_kernel_matches_reference_and_reference_matches_dequantized(kernel, lead, k, n, blocks, dtype):
    fused, reference, quantize = KERNELS[kernel]
    w = quantize(weights(k, n, seed=k + n))
    x = jax.random.normal(jax.random.key(3), (*lead, k)).astype(dtype)
    got = jax.jit(lambda w, x: fused(w, x, "interpret", blocks))(w, x)
    want = reference(w, x)
    if kernel == "w8a8":
        np.testing.assert_array_equal(got, want)  # int32 accumulation: exact
    else:
        assert_close(got, want, 1e-5 if dtype == jnp.float32 else 2e-2)
    if dtype == jnp.float32:
        if kernel == "w8a8":  # against the dequantized activations too
            x_q, x_scale = quantize_rows(x)
            x = x_q.astype(jnp.float32) * x_scale[..., None]
        assert_close(want, x @ w.dequantize(), 1e-5)


def test_w8a8_quantizes_each_token_by_its_own_absmax():
    x = jnp.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [100.0, 1.0, -50.0]])
    q, scale = quantize_rows(x)
    np.testing.assert_allclose(scale, [2 / 127, 0.0, 100 / 127])
    assert q.dtype == jnp.int8 and q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0]


def test_bad_arguments_name_what_works():
    params = {"embedding": jnp.ones((8, 4)), "blocks": {"mlp": {"w_up": jnp.ones((2, 4, 6)),
                                                                "w_down": jnp.ones((2, 6, 4))}}}
    with pytest.raises(ValueError, match=r"mode='int2'.*'int8', 'w8a8', 'int4'"):
        quantize_params(params, "int2")
    with pytest.raises(ValueError, match=r"group_size=4 does not divide K.*blocks/mlp/w_down.*one of \[2\]"):
        quantize_params(params, "int4", group_size=4)
    with pytest.raises(ValueError, match=r"group_size=3.*even"):
        quantize_params(params, "int4", group_size=3)
    with pytest.raises(ValueError, match=r"skip=\['wq'\] names no matmul weight.*blocks/mlp/w_up"):
        quantize_params(params, "int8", skip=["wq"])
    with pytest.raises(ValueError, match=r"int4_matmul: impl='pallas' needs a backend"):
        int4_matmul(jnp.ones((1, 4)), jnp.zeros((2, 6), jnp.uint8), jnp.ones((1, 6)), impl="pallas")


def test_quantize_params_replaces_the_matmul_weights_only():
    cfg = tiny_config("model.d_ff=192", "model.tie_embeddings=false")
    params = nnx.to_pure_dict(nnx.state(make_gpt(cfg.model), nnx.Param))
    q = quantize_params(params, "w8a8", skip=["w_down"])
    assert q["embedding"] is params["embedding"] and q["final_norm"]["scale"] is params["final_norm"]["scale"]
    assert q["blocks"]["attn_norm"]["scale"] is params["blocks"]["attn_norm"]["scale"]
    assert q["blocks"]["mlp"]["w_down"] is params["blocks"]["mlp"]["w_down"]
    assert isinstance(q["lm_head"], W8A8Weight) and q["lm_head"].shape == (64, 256)
    quantized = [k for k, v in {**q["blocks"]["attn"], **q["blocks"]["mlp"]}.items() if isinstance(v, W8A8Weight)]
    assert sorted(quantized) == ["w_gate", "w_up", "wk", "wo", "wq", "wv"]
    assert params["blocks"]["mlp"]["w_up"].ndim == 3  # the input is untouched


def test_demo_sized_weights_are_small_as_stored_and_as_compiled_arguments():
    """On the demo model's shapes (abstract: nothing is computed but the compilation)."""
    cfg = zjax.load_config("configs/demo.yaml", [])
    bf16 = jax.eval_shape(lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                               nnx.to_pure_dict(nnx.state(make_gpt(cfg.model), nnx.Param))))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)

    def compiled(params):
        return jax.jit(lambda p, t: logits(p, cfg.model, t)).lower(params, tokens).compile()

    reference = compiled(bf16).memory_analysis().argument_size_in_bytes
    for mode, bound, group in (("int8", 0.55, 128), ("int4", 0.32, 32)):
        q = jax.eval_shape(functools.partial(quantize_params, mode=mode, group_size=group), bf16)
        assert weight_bytes(q) <= bound * weight_bytes(bf16), mode
        program = compiled(q)
        assert program.memory_analysis().argument_size_in_bytes <= bound * reference, mode
        entry = program.as_text().split("ENTRY", 1)[1].split("\n", 1)[0]
        stored = "u8[4,128,704]" if mode == "int4" else "s8[4,256,704]"
        assert stored in entry and "[4,256,704]" not in entry.replace(stored, ""), entry


@pytest.fixture(scope="module")
def trained():
    """The tiny GPT (d_ff 192, so that group 32 divides every K) after 150 adamw steps on real text."""
    cfg = tiny_config("model.d_ff=192")
    graphdef, state = nnx.split(make_gpt(cfg.model, seed=0), nnx.Param)
    opt = optax.adamw(3e-3, weight_decay=0.0)

    @functools.partial(jax.jit, compiler_options=MANY_STEPS_OPTIONS)  # 150 steps: code optimized
    def step(state, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda s: gpt_loss(nnx.merge(graphdef, s), {"tokens": tokens})[0])(state)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    opt_state = opt.init(state)
    for batch in token_batches(150, 16, 64):
        state, opt_state, loss = step(state, opt_state, jnp.asarray(batch["tokens"]))
    assert float(loss) < 2.3
    val = jnp.asarray(token_batches(1, 8, 64, split="val")[0]["tokens"][:, :-1])
    return cfg, nnx.to_pure_dict(state), val


def test_quantized_logits_stay_close_to_bf16_on_a_trained_model(trained):
    cfg, params, val = trained
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    def forward(p, t):  # one jitted program per mode (a fresh function each: nothing cached across modes)
        return jax.jit(lambda p, t: jax.nn.log_softmax(logits(p, cfg.model, t), axis=-1))(p, t)

    reference = forward(bf16, val)
    kls = {}
    for mode, kl_bound, top1_bound in (("int8", 1e-3, 0.98), ("w8a8", 2e-3, 0.98), ("int4", 0.08, 0.93)):
        quantized = quantize_params(bf16, mode, group_size=32)
        assert type(quantized["blocks"]["attn"]["wq"]) is {"int8": Int8Weight, "w8a8": W8A8Weight,
                                                           "int4": Int4Weight}[mode]
        got = forward(quantized, val)
        kls[mode] = float((jnp.exp(reference) * (reference - got)).sum(-1).mean())
        top1 = float((reference.argmax(-1) == got.argmax(-1)).mean())
        assert kls[mode] <= kl_bound and top1 >= top1_bound, (mode, kls[mode], top1)
    assert 0 < kls["int8"] < kls["w8a8"] < kls["int4"], kls


@pytest.mark.parametrize("mode", ["int8", "w8a8", "int4"])
def test_the_pallas_path_serves_the_model_as_the_xla_path(trained, mode):
    cfg, params, val = trained
    tokens = val[:2, :16]
    out = {impl: logits(quantize_params(params, mode, group_size=32, impl=impl), cfg.model, tokens)
           for impl in ("xla", "interpret")}
    assert isinstance(quantize_params(params, mode, group_size=32)["blocks"]["attn"]["wq"],
                      {"int8": Int8Weight, "w8a8": W8A8Weight, "int4": Int4Weight}[mode])
    np.testing.assert_allclose(out["interpret"], out["xla"], rtol=1e-4, atol=1e-4)


def test_gptq_calibration_lowers_the_int4_error_and_its_moments_are_the_inputs():
    """``calibrate``'s moments equal ``xᵀx / tokens`` of a weight's input; int4 rounded by GPTQ
    with them has a lower output error on those inputs than rounding to nearest."""
    w = weights(64, 48, seed=3, zero_cols=())
    x = jax.random.normal(jax.random.key(4), (512, 64)) @ (jnp.eye(64) + 0.5 * jax.random.normal(jax.random.key(5), (64, 64)))
    moment = x.T @ x / x.shape[0]
    nearest = quantize_int4(w, group_size=32)
    gptq = quantize_int4(w, group_size=32, input_moment=moment)
    error = {name: float(jnp.mean((x @ w - x @ q.dequantize()) ** 2)) for name, q in (("nearest", nearest), ("gptq", gptq))}
    assert error["gptq"] < 0.7 * error["nearest"], error
    # a group's scales: the absmax of its rows as they stand when it starts (the first group's: w's own)
    np.testing.assert_array_equal(gptq.scale[0], nearest.scale[0])
    assert not np.array_equal(gptq.scale[1], nearest.scale[1])


def test_calibrate_measures_each_weights_input(trained):
    from zjax.inference.quant import calibrate
    cfg, params, val = trained
    moments = calibrate(params, cfg.model, [val[:4, :32], val[4:, :32]])
    assert sorted(moments) == ["blocks/attn/wk", "blocks/attn/wo", "blocks/attn/wq", "blocks/attn/wv",
                               "blocks/mlp/w_down", "blocks/mlp/w_gate", "blocks/mlp/w_up"]
    d, layers = cfg.model.d_model, cfg.model.n_layers
    assert moments["blocks/attn/wq"].shape == (layers, d, d)
    # wq and wk read the same normed input: the same moment; the first layer's is PSD with a positive trace
    np.testing.assert_allclose(moments["blocks/attn/wq"], moments["blocks/attn/wk"], rtol=1e-6)
    assert (np.linalg.eigvalsh(np.asarray(moments["blocks/attn/wq"][0])) > -1e-4).all()
    # GPTQ int4 on the trained model: a lower KL against bf16 on held-out tokens than rounding to nearest
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    train = jnp.asarray(np.concatenate([b["tokens"][:, :-1] for b in token_batches(4, 16, 64, seed=7)]))
    moments = calibrate(bf16, cfg.model, [train[i:i + 16] for i in range(0, len(train), 16)])
    forward = jax.jit(lambda p, t: jax.nn.log_softmax(logits(p, cfg.model, t), axis=-1))
    reference = forward(bf16, val)
    kl = {name: float((jnp.exp(reference) * (reference - forward(quantize_params(bf16, "int4", group_size=32, **kw),
                                                                  val))).sum(-1).mean())
          for name, kw in (("nearest", {}), ("gptq", {"calibration": moments}))}
    assert kl["gptq"] < 0.7 * kl["nearest"], kl
