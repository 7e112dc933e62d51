"""The serving engine: cached decoding equals full recompute; continuous batching, chunked
prefill, preemption and tensor parallelism change no token; pages are reused; one compiled
pass; loading from a ZeRO-3 checkpoint equals its safetensors export; clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zjax
from gpt_helpers import token_batches
from zjax.checkpoint import Checkpointer
from zjax.config.schema import ModelConfig
from zjax.export import export_safetensors
from zjax.inference import model
from zjax.inference.engine import Engine
from zjax.inference.sampling import SamplingParams
from zjax.models import gpt_loss, make_gpt

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
                  tie_embeddings=False)
ENGINE = dict(max_seqs=4, token_budget=32, page_size=8)
GREEDY = SamplingParams(max_tokens=12, logprobs=True)


def prompt(n, seed):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).tolist()


@pytest.fixture(scope="module")
def params():
    return nnx.to_pure_dict(nnx.state(make_gpt(CFG, seed=0), nnx.Param))


@pytest.fixture(scope="module")
def engine(params):
    return Engine.from_params(params, CFG, **ENGINE)


@pytest.fixture(scope="module")
def full_logits(params):
    """Logits of one sequence by full recompute (no cache), padded to max_seq_len."""
    run = jax.jit(lambda tokens: model.logits(params, CFG, tokens))

    def logits(tokens):
        padded = np.zeros((1, CFG.max_seq_len), np.int32)
        padded[0, :len(tokens)] = tokens
        return np.asarray(run(padded))[0, :len(tokens)]  # sliced on the host: no program per length

    return logits


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_the_gpt(tied):
    cfg = CFG.model_copy(update={"tie_embeddings": tied})
    gpt = make_gpt(cfg, seed=1)
    params = nnx.to_pure_dict(nnx.state(gpt, nnx.Param))
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
    expected = gpt(tokens)
    np.testing.assert_allclose(model.logits(params, cfg, tokens), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_qkv_biases_wider_heads_and_rope_scaling_match_the_gpt_cached_or_not():
    cfg = ModelConfig(**{**CFG.model_dump(), "qkv_bias": True, "head_dim": 32,
                         "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    gpt = make_gpt(cfg, seed=2)
    state = nnx.state(gpt, nnx.Param)
    params = nnx.to_pure_dict(state)
    for i, name in enumerate(("bq", "bk", "bv")):  # created as zeros
        bias = params["blocks"]["attn"][name]
        params["blocks"]["attn"][name] = jax.random.normal(jax.random.key(i), bias.shape) * 0.5
    nnx.replace_by_pure_dict(state, params)
    nnx.update(gpt, state)
    start = prompt(13, 21)
    expected = np.asarray(gpt(jnp.asarray([start])))
    np.testing.assert_allclose(model.logits(params, cfg, jnp.asarray([start])), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
    out = Engine.from_params(params, cfg, **ENGINE).generate([start], SamplingParams(max_tokens=6))[0]
    run = jax.jit(lambda tokens: model.logits(params, cfg, tokens))
    tokens = list(start)
    for _ in range(6):
        padded = np.zeros((1, 32), np.int32)
        padded[0, :len(tokens)] = tokens
        tokens.append(int(np.argmax(np.asarray(run(padded))[0, len(tokens) - 1])))
    assert out.token_ids == tokens[13:]


def test_cached_greedy_decoding_equals_full_recompute_for_64_tokens(engine, full_logits):
    start = prompt(40, 0)
    out = engine.generate([start], SamplingParams(max_tokens=64, logprobs=True))[0]
    tokens = list(start)
    for _ in range(64):
        tokens.append(int(np.argmax(full_logits(tokens)[-1])))
    assert out.token_ids == tokens[40:]
    assert out.finish_reason == "length"
    # logprobs: log_softmax of the recomputed logits at each new token
    log_probs = jax.nn.log_softmax(full_logits(tokens[:-1])[39:], axis=-1)
    np.testing.assert_allclose(out.logprobs, log_probs[np.arange(64), tokens[40:]], rtol=1e-5, atol=1e-5)


def test_continuous_batching_equals_each_request_alone_and_reuses_pages(engine):
    requests = [(prompt(3, 1), SamplingParams(max_tokens=20)),
                (prompt(17, 2), SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=11)),
                (prompt(45, 3), SamplingParams(max_tokens=8)),
                (prompt(9, 4), SamplingParams(max_tokens=16, temperature=1.3, top_p=0.9, seed=12)),
                (prompt(26, 5), SamplingParams(max_tokens=10))]
    alone = [engine.generate([p], s)[0].token_ids for p, s in requests]
    free_at_start = engine.pages.free_count

    got: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    pages_seen: set[int] = set()
    ids: list[int] = []

    def step():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        for i in ids[:4]:
            pages_seen.update(engine.request_pages(i))

    # the first four join at different passes; the fifth after one of them finished
    for p, s in requests[:4]:
        ids.append(engine.add_request(p, s))
        step()
        step()
    while len(reasons) == 0:
        step()
    ids.append(engine.add_request(*requests[4]))
    step()
    later_pages = set(engine.request_pages(ids[4]))
    while engine.has_unfinished():
        step()

    assert [got[i] for i in ids] == alone
    assert all(reasons[i] == "length" for i in ids)
    assert later_pages & pages_seen, "the later request got none of the pages the earlier ones used"
    assert engine.pages.free_count == free_at_start


def test_a_prompt_longer_than_the_token_budget_is_prefilled_in_chunks(engine, params):
    big = Engine.from_params(params, CFG, max_seqs=2, token_budget=128, page_size=8)
    long = prompt(90, 6)  # 32 + 32 + 26 tokens in the small engine
    small_out = engine.generate([long], GREEDY)[0]
    big_out = big.generate([long], GREEDY)[0]
    assert small_out.token_ids == big_out.token_ids
    np.testing.assert_allclose(small_out.logprobs, big_out.logprobs, rtol=1e-5, atol=1e-5)


def test_stop_tokens_and_max_tokens_end_with_their_reason(engine):
    start = prompt(5, 7)
    tokens = engine.generate([start], SamplingParams(max_tokens=20))[0].token_ids
    cut = next(i for i in range(1, 20) if tokens[i] not in tokens[:i])
    stopped = engine.generate([start], SamplingParams(max_tokens=20, stop_token_ids=(tokens[cut], 255)))[0]
    assert stopped.token_ids == tokens[:cut + 1] and stopped.finish_reason == "stop"
    short = engine.generate([start], SamplingParams(max_tokens=3))[0]
    assert short.token_ids == tokens[:3] and short.finish_reason == "length"
    assert short.logprobs is None


def test_abort_frees_the_requests_pages(engine):
    free = engine.pages.free_count
    kept = engine.add_request(prompt(20, 8), SamplingParams(max_tokens=4))
    dropped = engine.add_request(prompt(30, 9), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.request_pages(dropped)
    assert engine.abort(dropped) and not engine.abort(dropped)
    while engine.has_unfinished():
        engine.step()
    assert engine.pages.free_count == free
    assert not engine.abort(kept)  # finished already


def test_out_of_pages_preempts_and_recomputes_without_changing_tokens(engine, params):
    # 8 usable pages of 8 tokens; three requests of up to 36 tokens (5 pages each) cannot all fit
    tight = Engine.from_params(params, CFG, num_pages=9, **ENGINE)
    requests = [prompt(20, 10 + i) for i in range(3)]
    alone = [engine.generate([p], SamplingParams(max_tokens=16))[0].token_ids for p in requests]
    together = tight.generate(requests, SamplingParams(max_tokens=16))
    assert [c.token_ids for c in together] == alone
    assert tight.preemptions > 0
    assert tight.pages.free_count == 8


def test_the_pallas_kernel_in_interpret_mode_gives_the_same_tokens(engine, params):
    interpret = Engine.from_params(params, CFG, attention_impl="interpret", **ENGINE)
    prompts = [prompt(11, 13), prompt(37, 14)]
    expected = engine.generate(prompts, GREEDY)
    got = interpret.generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    np.testing.assert_allclose([c.logprobs for c in got], [c.logprobs for c in expected], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tensor,impl", [(2, "xla"), (4, "xla"), (2, "interpret")])
def test_tensor_parallel_serving_equals_one_device(engine, params, tensor, impl):
    # interpret: the Pallas kernel runs per shard of the kv heads (shard_map)
    sharded = Engine.from_params(params, CFG, tensor=tensor, attention_impl=impl, **ENGINE)
    # the training layout: heads, mlp and vocab split over tensor; the cache by kv heads when they divide
    assert sharded.params["blocks"]["attn"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    kv_spec = sharded.cache.k.sharding.spec
    assert (kv_spec == jax.sharding.PartitionSpec(None, None, None, "tensor", None)) == (CFG.n_kv_heads % tensor == 0)
    prompts = [prompt(5, 15), prompt(33, 16), prompt(12, 17)]
    expected = engine.generate(prompts, GREEDY)
    got = sharded.generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    np.testing.assert_allclose([c.logprobs for c in got], [c.logprobs for c in expected], rtol=1e-5, atol=1e-5)
    tokens = jnp.asarray([prompt(20, 18)])
    with jax.set_mesh(sharded.mesh):
        split_logits = jax.jit(lambda p, t: model.logits(p, CFG, t))(sharded.params, tokens)
    np.testing.assert_allclose(split_logits, model.logits(params, CFG, tokens), rtol=1e-5, atol=1e-6)


def test_from_a_zero3_checkpoint_equals_its_safetensors_export(tmp_path):
    cfg = zjax.load_config("configs/tiny.yaml", ["zero.stage=3"])
    train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model), devices=jax.devices()[:8])
    state = train.init()
    for batch in token_batches(2, 16, 32):
        state, _ = train(state, batch)
    checkpoints = tmp_path / "run" / "checkpoints"
    saver = Checkpointer(checkpoints)
    saver.save(2, state, config=cfg)
    saver.close()
    exported = export_safetensors(tmp_path / "run", tmp_path / "model.safetensors")

    prompts = [prompt(7, 19), prompt(21, 20)]
    sampling = [SamplingParams(max_tokens=10, logprobs=True),
                SamplingParams(max_tokens=10, temperature=1.0, seed=3, logprobs=True)]
    kw = dict(max_seqs=2, token_budget=16, page_size=8)
    # the config comes from the checkpoint's snapshot (no config.yaml in this run directory)
    from_checkpoint = Engine.from_checkpoint(tmp_path / "run", **kw).generate(prompts, sampling)
    from_export = Engine.from_safetensors(exported, cfg.model, **kw).generate(prompts, sampling)
    from_state = Engine.from_params(state.params, cfg.model, **kw).generate(prompts, sampling)
    assert from_checkpoint == from_export == from_state


def test_clear_errors(engine, params):
    with pytest.raises(ValueError, match=r"prompt of 120 tokens \+ max_tokens=16 is 136, above max_seq_len=128"):
        engine.add_request(prompt(120, 0), SamplingParams())
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token 300, outside the vocabulary"):
        engine.add_request([1, 300], SamplingParams())
    with pytest.raises(ValueError, match="SamplingParams.top_p=2"):
        engine.add_request([1], SamplingParams(top_p=2))
    with pytest.raises(ValueError, match=r"needs up to 10 KV-cache pages of 8 tokens but the cache has 8 \(num_pages=9"):
        Engine.from_params(params, CFG, num_pages=9, **ENGINE).add_request(prompt(20, 0), SamplingParams(max_tokens=60))
    with pytest.raises(ValueError, match="token_budget=2 is below max_seqs=4"):
        Engine.from_params(params, CFG, max_seqs=4, token_budget=2)
    with pytest.raises(ValueError, match="model.moe.num_experts=4: zjax.inference serves dense models only"):
        Engine.from_params(params, ModelConfig(**{**CFG.model_dump(), "moe": {"num_experts": 4}}))
    with pytest.raises(ValueError, match="tensor=16 needs 16 devices"):
        Engine.from_params(params, CFG, tensor=16)
    engine.add_request([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="generate\\(\\) needs an idle engine"):
        engine.generate([[3]])
    while engine.has_unfinished():
        engine.step()


def test_every_pass_runs_one_compiled_program(engine):
    for i in range(6):
        engine.add_request(prompt(3 + 7 * i, 30 + i), SamplingParams(max_tokens=2 + i))
    passes = 0
    while engine.has_unfinished():
        engine.step()
        passes += 1
    assert passes >= 10
    assert engine.traces == 1
    assert engine._pass._cache_size() == 1
