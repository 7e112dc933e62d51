"""zjax.inference.hf: tiny random Llama / Qwen2 / Mistral models saved by transformers load
into zjax's GPT with the same logits (fp32, CPU torch), sharded or not; and what does not
fit is a ConfigError naming the file and key."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from zjax.config import load_config
from zjax.errors import ConfigError
from zjax.inference.hf import load_hf
from zjax.models.gpt import count_params, make_gpt, rotary_angles

SHAPE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=32, rms_norm_eps=1e-5, initializer_range=0.1)
SEQ = 16
# wavelengths 2 pi 1e4^(2i/16): 6.3 kept (below 24 / 2), 19.9 smoothed, the longer divided by 4
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
          "original_max_position_embeddings": 24}


def tokens(batch=2, seq=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (batch, seq))


def save(tmp_path, model_cls, config_cls, **overrides):
    """A tiny random transformers model (norm scales and biases random too) saved into tmp_path."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SHAPE, **overrides}, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def gpt_of(cfg, params):
    model = make_gpt(cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def assert_same_logits(hf_model, cfg, params, batch=None):
    batch = tokens() if batch is None else batch
    with torch.no_grad():
        ref = hf_model(torch.tensor(batch)).logits.float().numpy()
    got = np.asarray(gpt_of(cfg, params)(jnp.asarray(batch, jnp.int32)))
    assert got.shape == ref.shape
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    np.testing.assert_array_equal(got[:, -1].argmax(-1), ref[:, -1].argmax(-1))  # greedy next tokens


def check_tree(cfg, params):
    """params has exactly the GPT's Param tree and shapes, and count_params counts it."""
    want = nnx.to_pure_dict(nnx.state(make_gpt(cfg), nnx.Param))
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, want)
    assert count_params(cfg) == sum(np.size(x) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("tie,rope_scaling", [
    (False, None), (True, None), (False, LLAMA3), (True, {"rope_type": "linear", "factor": 2.0})])
def test_llama_logits_equal_transformers(tmp_path, tie, rope_scaling):
    hf = save(tmp_path, LlamaForCausalLM, LlamaConfig, tie_word_embeddings=tie,
              rope_scaling=None if rope_scaling is None else dict(rope_scaling))  # transformers edits it
    cfg, params = load_hf(tmp_path)
    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.head_dim) == (tie, False, None)
    assert cfg.rope_scaling == rope_scaling
    assert ("lm_head" in params) == (not tie)
    check_tree(cfg, params)
    assert_same_logits(hf, cfg, params)


def test_qwen2_with_qkv_biases_and_tied_embeddings_under_tensor_parallelism(tmp_path):
    hf = save(tmp_path, Qwen2ForCausalLM, Qwen2Config, tie_word_embeddings=True, rope_theta=1e6)
    cfg, params = load_hf(tmp_path)
    assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.rope_theta) == (True, True, 1e6)
    check_tree(cfg, params)
    assert_same_logits(hf, cfg, params)
    # the biases split like their weights' columns (a whole bias would not add to a shard's
    # columns): 2 shards (one KV head each) and 4 (fewer KV heads than shards: the KV
    # projections are gathered) give the same logits
    model, batch = gpt_of(cfg, params), jnp.asarray(tokens(), jnp.int32)
    graphdef, state = nnx.split(model)
    whole = model(batch)
    for tensor in (2, 4):
        mesh = jax.make_mesh((tensor,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
        with jax.set_mesh(mesh):
            forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
            split = forward(state, batch)
        np.testing.assert_allclose(split, whole, atol=1e-5 * float(jnp.abs(whole).max()))


def test_mistral_head_dim_and_sliding_window(tmp_path):
    # head_dim 24: the query width 96 differs from hidden_size 64
    hf = save(tmp_path, MistralForCausalLM, MistralConfig, head_dim=24, sliding_window=SEQ)
    with pytest.raises(ConfigError, match=r"config\.json: sliding_window=16 .*max_seq_len=32.*max_seq_len=16"):
        load_hf(tmp_path)
    cfg, params = load_hf(tmp_path, max_seq_len=SEQ)  # a window as long as the sequence never applies
    assert (cfg.head_dim, cfg.max_seq_len, params["blocks"]["attn"]["wq"].shape) == (24, SEQ, (2, 64, 96))
    check_tree(cfg, params)
    assert_same_logits(hf, cfg, params)


def test_sharded_checkpoint_and_dtypes(tmp_path):
    hf = save(tmp_path, LlamaForCausalLM, LlamaConfig)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg, params = load_hf(tmp_path / "sharded")
    assert_same_logits(hf, cfg, params)
    _, whole = load_hf(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, whole)

    # bfloat16 files (numpy has no bfloat16: read as ml_dtypes arrays); dtype= casts
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _, bf16 = load_hf(tmp_path / "bf16")
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {np.dtype(ml_dtypes.bfloat16)}
    ref = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(bf16["blocks"]["mlp"]["w_down"][1].astype(np.float32), ref)
    _, fp32 = load_hf(tmp_path / "bf16", dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(fp32)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(fp32["blocks"]["mlp"]["w_down"][1], ref)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, drop=(), add=None):
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_what_does_not_fit_is_a_config_error_naming_file_and_key(tmp_path):
    save(tmp_path, LlamaForCausalLM, LlamaConfig)
    edit_tensors(tmp_path, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight; a complete save_pretrained"):
        load_hf(tmp_path)
    edit_tensors(tmp_path, add={"model.layers.1.mlp.up_proj.weight": np.zeros((96, 64), np.float32),
                                "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ConfigError, match=r"model\.safetensors: unexpected tensor "
                                          r"'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        load_hf(tmp_path)
    edit_tensors(tmp_path, drop=["model.layers.0.self_attn.o_proj.bias"],
                 add={"model.layers.0.mlp.up_proj.weight": np.zeros((96, 65), np.float32)})
    with pytest.raises(ConfigError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(96, 65\).*\(96, 64\)"):
        load_hf(tmp_path)

    edit_config(tmp_path, model_type="gpt2")
    with pytest.raises(ConfigError, match=r"config\.json: model_type='gpt2' is not supported.*llama, mistral, qwen2"):
        load_hf(tmp_path)
    edit_config(tmp_path, model_type="llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match=r"config\.json.*model\.rope_scaling: rope_type='yarn' is not supported; "
                                          r"zjax implements default, linear, llama3"):
        load_hf(tmp_path)
    edit_config(tmp_path, rope_parameters=None, rope_theta=1e4, hidden_act="gelu")
    with pytest.raises(ConfigError, match=r"hidden_act='gelu'.*silu"):
        load_hf(tmp_path)
    with pytest.raises(ConfigError, match=r"nothing/config\.json does not exist"):
        load_hf(tmp_path / "nothing")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "config.json").write_text((tmp_path / "config.json").read_text().replace("gelu", "silu"))
    with pytest.raises(ConfigError, match=r"nothing has no \*\.safetensors"):
        load_hf(tmp_path / "nothing")


def test_rope_scaling_and_head_dim_in_the_config():
    """Legacy transformers configs write rope_scaling with ``type``; the config normalises it;
    an unknown type or a missing key is a ConfigError naming model.rope_scaling."""
    cfg = load_config({"model": {"rope_scaling": {"type": "linear", "factor": 2}, "head_dim": 24,
                                 "qkv_bias": True}}).model
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert load_config({"model": {"rope_scaling": {"rope_type": "default"}}}).model.rope_scaling is None
    for bad, what in [({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic' is not supported"),
                      ({"rope_type": "llama3", "factor": 8.0}, "rope_type=.llama3. takes exactly .*; missing low_freq"),
                      ({"rope_type": "linear", "factor": -1}, "factor=-1")]:
        with pytest.raises(ConfigError, match=rf"model\.rope_scaling: {what}"):
            load_config({"model": {"rope_scaling": bad}})
    with pytest.raises(ConfigError, match="head_dim=7 is odd"):
        load_config({"model": {"head_dim": 7}})
    # linear scaling is position interpolation; llama3 keeps the high frequencies
    cos, sin = rotary_angles(16, 16, 1e4, {"rope_type": "linear", "factor": 2.0})
    ref_cos, ref_sin = rotary_angles(8, 16, 1e4)
    np.testing.assert_allclose(cos[::2], ref_cos, atol=1e-6)
    np.testing.assert_allclose(sin[::2], ref_sin, atol=1e-6)
    ref_cos, ref_sin = rotary_angles(16, 16, 1e4)
    cos3, sin3 = rotary_angles(16, 16, 1e4, LLAMA3)
    np.testing.assert_allclose(cos3[:, 0], ref_cos[:, 0])
    np.testing.assert_allclose(sin3[:, -1], ref_sin[:, -1] / 4, rtol=1e-4)  # low frequency: divided by factor
    with pytest.raises(ConfigError, match="model.rope_scaling"):
        rotary_angles(8, 16, 1e4, {"rope_type": "yarn"})


@pytest.mark.parametrize("model_cls,config_cls,overrides", [
    (LlamaForCausalLM, LlamaConfig, dict(rope_scaling=dict(LLAMA3))),
    (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True))])
def test_the_engine_generates_transformers_greedy_tokens(tmp_path, model_cls, config_cls, overrides):
    """Engine.from_hf on the saved directory: the same 12 greedy tokens as transformers' generate,
    two prompts of different lengths batched together (paged cache, chunked prefill)."""
    from zjax.inference.engine import Engine
    from zjax.inference.sampling import SamplingParams

    hf = save(tmp_path, model_cls, config_cls, **overrides)
    prompts = [tokens(1, 9, seed=1)[0].tolist(), tokens(1, 4, seed=2)[0].tolist()]
    engine = Engine.from_hf(tmp_path, max_seqs=2, token_budget=8, page_size=4)
    got = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    for prompt, completion in zip(prompts, got):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert completion.token_ids == want
