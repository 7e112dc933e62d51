"""Per-request sampling settings and the batched sampler that applies them.

``sample`` draws one token per row of a logits batch, each row with its own temperature,
top-k, top-p and randomness. A row's key is ``fold_in(key(seed), step)``, ``step`` being the
number of tokens the request generated before, so a request's tokens depend on its seed and
its logits only: not on which other requests share the batch, nor on when it joined.

The log-probability returned with each token is that of the model's own distribution,
``log_softmax(logits)[token]``, before temperature, top-k and top-p (what vLLM returns by
default): it says how likely the model found the token, whatever the sampler did.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# seeds are folded into uint32 keys
_MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples its tokens.

    Args:
      temperature: 0 samples greedily (argmax); above 0 divides the logits.
      top_k: sample among the ``top_k`` most likely tokens; 0 turns it off.
      top_p: sample among the most likely tokens whose probabilities add up to ``top_p``
        (nucleus sampling, after temperature and top-k); 1 turns it off.
      max_tokens: at most this many new tokens (finish reason ``"length"``).
      stop_token_ids: generating one of these ends the request (finish reason ``"stop"``);
        the stop token is the last of the request's tokens.
      seed: the request's randomness; None: the engine draws one.
      logprobs: return each new token's log-probability.

    Example:
      >>> SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32).top_p
      0.95
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self):
        def bad(field, allowed):
            raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: use {allowed}")

        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1] (1 = off)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED):
            bad("seed", f"None or an integer in [0, {_MAX_SEED}]")
        if not isinstance(self.logprobs, bool):
            bad("logprobs", "True or False")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, Sequence) or not all(
                _is_int(t) and t >= 0 for t in stops):
            bad("stop_token_ids", "a sequence of token ids (integers >= 0)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


class SamplingRows(NamedTuple):
    """The settings of a batch of rows, as arrays ``[rows]`` (``rows_of`` builds them)."""

    temperature: jax.Array  # float32
    top_k: jax.Array        # int32, 0 = off
    top_p: jax.Array        # float32
    seed: jax.Array         # uint32
    step: jax.Array         # int32: tokens the row's request generated before this one


def rows_of(params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]) -> SamplingRows:
    """Host arrays for ``sample``: one row per ``SamplingParams`` with its resolved seed and step."""
    return SamplingRows(
        temperature=np.array([p.temperature for p in params], np.float32),
        top_k=np.array([p.top_k for p in params], np.int32),
        top_p=np.array([p.top_p for p in params], np.float32),
        seed=np.array(seeds, np.uint32),
        step=np.array(steps, np.int32),
    )


@jax.jit
def sample(logits: jax.Array, rows: SamplingRows) -> tuple[jax.Array, jax.Array]:
    """One token per row of float ``logits [rows, vocab]``, and its log-probability.

    Args:
      logits: the model's logits.
      rows: each row's settings (``SamplingRows``).

    Returns:
      ``(tokens int32 [rows], logprobs float32 [rows])``; the log-probability is
      ``log_softmax(logits)[token]`` (before temperature, top-k and top-p).

    Example:
      >>> rows = rows_of([SamplingParams(), SamplingParams(temperature=1.0, seed=7)], [0, 7], [0, 0])
      >>> tokens, logprobs = sample(jnp.array([[0.0, 2.0, 1.0], [0.0, 9.0, 0.0]]), rows)
      >>> tokens.tolist()
      [1, 1]
    """
    return _sample(logits, rows)


def _sample(logits, rows):
    """``sample`` unjitted, for use inside a jitted program."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    # top-k then top-p, as thresholds on the sorted scaled logits
    ordered = -jnp.sort(-scaled, axis=-1)
    k = jnp.where((rows.top_k > 0) & (rows.top_k < vocab), rows.top_k, vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    # keep a token while the mass of those more likely than it is below top_p (the first always)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(before < rows.top_p[:, None], axis=-1)
    nucleus = jnp.take_along_axis(ordered, (jnp.maximum(kept, 1) - 1)[:, None], axis=-1)
    masked = jnp.where(scaled >= jnp.maximum(kth, nucleus), scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(rows.seed, rows.step)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    tokens = jnp.where(rows.temperature > 0, drawn, greedy)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
