"""LoRA adapters on the reference GPT (issue 20: DeepSpeed-Chat's ``lora_dim``, ``lora_module_name``,
``only_optimize_lora``): ``model.lora`` adds ``nnx.LoRAParam`` adapters to the chosen projections;
trained alone (``trainable=nnx.LoRAParam``) they leave the base weights bit for bit and hold all
the optimizer state; ``fuse_lora``, the engine and the export serve them fused into the weights."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import zjax
from gpt_helpers import rel_norm, token_batches
from zjax.checkpoint import Checkpointer
from zjax.errors import ConfigError
from zjax.export import export_safetensors, load_safetensors
from zjax.inference.engine import Engine
from zjax.inference.sampling import SamplingParams
from zjax.models.gpt import count_params, fuse_lora, gpt_loss, make_gpt

SMALL = ("model.d_model=32", "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=16", "batch.global_batch_size=8",
         "optimizer.lr=1e-2")
RANK = 4
STEPS = 3


def config(*overrides, **keys):
    """The small GPT's config with ``overrides`` (``key=value``) and ``keys`` (``model__lora__rank``: a value)."""
    given = {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in (*SMALL, *overrides))}
    return zjax.load_config("configs/tiny.yaml", {**given, **{k.replace("__", "."): v for k, v in keys.items()}})


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def adapter_paths(params):
    return [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if str(path[-1].key).endswith(("_lora_a", "_lora_b"))]


def test_rank_0_adds_nothing_and_rank_r_adds_the_adapters_of_the_targets():
    plain = params_of(make_gpt(config().model))
    cfg = config(model__lora__rank=RANK, model__lora__targets=["attn/w[qv]", "w_down"]).model
    lora = params_of(make_gpt(cfg))
    m = cfg
    q, kv = m.n_heads * (m.d_model // m.n_heads), m.n_kv_heads * (m.d_model // m.n_heads)
    expected = m.n_layers * RANK * ((m.d_model + q) + (m.d_model + kv) + (m.d_ff + m.d_model))
    extra = sum(x.size for x in jax.tree.leaves(lora)) - sum(x.size for x in jax.tree.leaves(plain))
    assert extra == expected == count_params(cfg) - count_params(config().model)
    assert sorted("/".join(str(k.key) for k in p) for p in adapter_paths(lora)) == [
        "blocks/attn/wq_lora_a", "blocks/attn/wq_lora_b", "blocks/attn/wv_lora_a", "blocks/attn/wv_lora_b",
        "blocks/mlp/w_down_lora_a", "blocks/mlp/w_down_lora_b"]
    assert adapter_paths(plain) == []
    # the base weights are those of the same seed without LoRA; at init (B = 0) so are the logits
    assert jax.tree.structure(fuse_lora(lora, cfg)) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(fuse_lora(lora, cfg)), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.asarray(token_batches(1, 2, 16)[0]["tokens"][:, :16])
    np.testing.assert_array_equal(make_gpt(cfg)(tokens), make_gpt(config().model)(tokens))


@functools.lru_cache(maxsize=None)
def run(*overrides):
    """Trains only the adapters of the small GPT for STEPS steps on one batch: ``(cfg, initial params,
    losses, state)``."""
    cfg = config(f"model.lora.rank={RANK}", *overrides)
    model = make_gpt(cfg.model)
    initial = jax.tree.map(np.asarray, params_of(model))
    train = zjax.make_train_step(cfg, gpt_loss, model=model, trainable=nnx.LoRAParam)
    state = train.init()
    batch = token_batches(1, 8, 16)[0]
    losses = []
    for _ in range(STEPS):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return cfg, initial, losses, state


@pytest.mark.parametrize("stage", [0, 3])
def test_only_the_adapters_train_and_hold_the_optimizer_state(stage):
    cfg, initial, losses, state = run(f"zero.stage={stage}")
    assert losses[-1] < losses[0], losses
    params = jax.device_get(state.params)
    adapters = {tuple(k.key for k in p) for p in adapter_paths(params)}
    flat = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    start = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(initial)[0]}
    for path, value in flat.items():
        if path in adapters:
            if path[-1].endswith("_lora_b"):  # A's gradient is 0 until B moves: B moves from the first step
                assert np.abs(value - start[path]).max() > 0, path
        else:
            np.testing.assert_array_equal(value, start[path], err_msg=str(path))  # bit for bit
    assert all(np.abs(flat[p]).max() > 0 for p in adapters if p[-1].endswith("_lora_b"))
    assert any(np.abs(flat[p] - start[p]).max() > 0 for p in adapters if p[-1].endswith("_lora_a"))
    # optimizer state: AdamW's two moments of the adapters, nothing of the base weights
    n_adapters = sum(flat[p].size for p in adapters)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert moments == 2 * n_adapters
    # no master (or replicated fp32) copy of the base weights: they are only in `frozen`
    trained = state.master if state.master is not None else state.replicated
    assert sum(x.size for x in jax.tree.leaves(trained)) == n_adapters
    assert sum(x.size for x in jax.tree.leaves(state.frozen)) == count_params(cfg.model) - n_adapters


def test_the_same_losses_at_zero_0_zero_3_and_under_tensor_parallelism():
    zero0, zero3 = run("zero.stage=0")[2], run("zero.stage=3")[2]
    tensor = run("zero.stage=3", "mesh.tensor=2")[2]
    np.testing.assert_allclose(zero3, zero0, rtol=1e-5)
    np.testing.assert_allclose(tensor, zero0, rtol=1e-5)


def test_fused_params_serve_the_trained_lora_model(tmp_path):
    cfg, _, _, state = run("zero.stage=3")
    lora_params = jax.device_get(state.params)
    plain_cfg = config().model
    fused = fuse_lora(lora_params, cfg.model)

    def model_with(model_cfg, params):
        graphdef, state, rest = nnx.split(make_gpt(model_cfg), nnx.Param, ...)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state, rest)

    tokens = jnp.asarray(token_batches(1, 2, 16)[0]["tokens"][:, :16])
    lora_logits = model_with(cfg.model, lora_params)(tokens)
    plain = model_with(plain_cfg, fused)
    assert rel_norm(plain(tokens), lora_logits) < 1e-5
    # the trained adapters matter: the base weights alone give other logits
    assert rel_norm(make_gpt(plain_cfg)(tokens), lora_logits) > 1e-3

    # the engine takes the LoRA params and the LoRA config, and decodes as the fused model
    prompt = [int(t) for t in tokens[0, :6]]
    engine = Engine.from_params(lora_params, cfg.model, max_seqs=1, token_budget=8, page_size=8)
    out = engine.generate([prompt], SamplingParams(max_tokens=5))[0].token_ids
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(jnp.argmax(plain(jnp.asarray([seq]))[0, -1])))
    assert list(out) == seq[len(prompt):]

    # the export fuses: a plain GPT's tensors, loadable with a rank-0 config
    out_dir = tmp_path / "run"
    saver = Checkpointer(out_dir / "checkpoints")
    saver.save(STEPS, state, config=cfg)
    saver.close()
    (out_dir / "config.yaml").write_text(cfg.to_yaml())
    exported = load_safetensors(export_safetensors(out_dir, tmp_path / "model.safetensors"))
    assert jax.tree.structure(exported) == jax.tree.structure(fused)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(fused)):
        assert rel_norm(a, b) < 1e-6


def test_bad_targets_are_clear_errors():
    with pytest.raises(ConfigError, match=r"model\.lora\.targets.*'attn/wz'.*attn/wq, attn/wk"):
        config(model__lora__rank=4, model__lora__targets=["attn/wz"])
    with pytest.raises(ConfigError, match=r"model\.lora\.targets.*MoE"):
        config("model.lora.rank=4", "model.moe.num_experts=2")
    config("model.lora.rank=4", "model.moe.num_experts=2", model__lora__targets=["attn/"])  # attention only: fine
    with pytest.raises(ConfigError, match=r"model\.lora\.rank"):
        config("model.lora.rank=-1")


def test_zjax_train_and_rlhf_train_only_the_adapters_unless_told_otherwise():
    """``model.lora.only_optimize`` (DeepSpeed-Chat's only_optimize_lora) is what ``zjax train``
    hands ``make_train_step`` as ``trainable``."""
    from zjax.compression.distill import gpt_setup

    cfg = config("model.lora.rank=4")
    assert gpt_setup(cfg, make_gpt(cfg.model))["trainable"] is nnx.LoRAParam
    cfg = config("model.lora.rank=4", "model.lora.only_optimize=false")
    assert gpt_setup(cfg, make_gpt(cfg.model))["trainable"] is None
