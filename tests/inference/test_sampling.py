"""The batched sampler: greedy, temperature, top-k, top-p, per-row seeds, logprobs; SamplingParams' checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zjax.inference.sampling import SamplingParams, rows_of, sample

VOCAB = 32
LOGITS = jax.random.normal(jax.random.key(0), (VOCAB,)) * 2.0


def draw(params, n=None, seeds=None, steps=None, logits=LOGITS):
    """Tokens and logprobs of ``n`` rows with the same logits and settings (or one row per params)."""
    params = [params] * n if isinstance(params, SamplingParams) else list(params)
    seeds = [p.seed or 0 for p in params] if seeds is None else seeds
    steps = list(range(len(params))) if steps is None else steps
    batch = jnp.broadcast_to(logits, (len(params), VOCAB))
    tokens, logprobs = sample(batch, rows_of(params, seeds, steps))
    return np.asarray(tokens), np.asarray(logprobs)


def test_greedy_top_k_1_and_tiny_top_p_all_take_the_argmax():
    best = int(jnp.argmax(LOGITS))
    for params in (SamplingParams(), SamplingParams(temperature=1.5, top_k=1, seed=3),
                   SamplingParams(temperature=1.5, top_p=1e-6, seed=3)):
        tokens, _ = draw(params, 64)
        assert (tokens == best).all(), params


def test_same_seed_and_step_give_the_same_token_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    alone, _ = draw([params], steps=[5])
    # the same request in another row of a batch of other requests
    others = [SamplingParams(temperature=1.0, seed=s) for s in range(7)]
    mixed, _ = draw(others[:3] + [params] + others[3:], seeds=[0, 1, 2, 1234, 3, 4, 5, 6], steps=[5] * 8)
    assert mixed[3] == alone[0]
    # other seeds give other streams
    a, _ = draw(SamplingParams(temperature=1.0), 200, seeds=[1] * 200)
    b, _ = draw(SamplingParams(temperature=1.0), 200, seeds=[2] * 200)
    assert (a != b).mean() > 0.5


def test_temperature_draws_follow_softmax_of_scaled_logits():
    n = 4000
    for temperature in (0.5, 2.0):
        tokens, _ = draw(SamplingParams(temperature=temperature, seed=7), n)
        frequency = np.bincount(tokens, minlength=VOCAB) / n
        expected = np.asarray(jax.nn.softmax(LOGITS / temperature))
        # binomial standard error at n=4000 is at most 0.008
        assert np.abs(frequency - expected).max() < 0.03, temperature
    cold, _ = draw(SamplingParams(temperature=0.5, seed=7), n)
    hot, _ = draw(SamplingParams(temperature=2.0, seed=7), n)
    assert len(set(hot.tolist())) > len(set(cold.tolist()))


def test_top_k_and_top_p_keep_only_their_tokens():
    order = np.argsort(-np.asarray(LOGITS))
    tokens, _ = draw(SamplingParams(temperature=1.0, top_k=3, seed=5), 2000)
    assert set(tokens.tolist()) == set(order[:3].tolist())
    probs = np.asarray(jax.nn.softmax(LOGITS))[order]
    top_p = float(probs[:4].sum()) - 1e-3  # the nucleus is then the 4 most likely tokens
    tokens, _ = draw(SamplingParams(temperature=1.0, top_p=top_p, seed=5), 2000)
    assert set(tokens.tolist()) == set(order[:4].tolist())


def test_logprobs_are_the_model_distributions():
    rows = [SamplingParams(), SamplingParams(temperature=0.3, top_k=5, seed=2), SamplingParams(temperature=3.0, seed=9)]
    logits = jax.random.normal(jax.random.key(4), (3, VOCAB))
    tokens, logprobs = sample(logits, rows_of(rows, [0, 2, 9], [0, 0, 0]))
    expected = jax.nn.log_softmax(logits)[jnp.arange(3), tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "temperature=-0.1: use a finite number >= 0"),
    ("temperature", float("nan"), "temperature=nan"),
    ("top_k", -1, "top_k=-1: use an integer >= 0"),
    ("top_k", 2.5, "top_k=2.5"),
    ("top_p", 0.0, r"top_p=0.0: use a number in \(0, 1\]"),
    ("top_p", 1.5, "top_p=1.5"),
    ("max_tokens", 0, "max_tokens=0: use an integer >= 1"),
    ("seed", -3, "seed=-3"),
    ("stop_token_ids", [1, -2], "stop_token_ids"),
    ("stop_token_ids", "eos", "stop_token_ids"),
    ("logprobs", 1, "logprobs=1"),
])
def test_bad_values_name_the_field_and_the_range(field, value, message):
    with pytest.raises(ValueError, match="SamplingParams." + message):
        SamplingParams(**{field: value})


def test_stop_token_ids_become_a_tuple():
    assert SamplingParams(stop_token_ids=[3, np.int64(4)]).stop_token_ids == (3, 4)
