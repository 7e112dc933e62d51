"""Shared set-up for tests that train the tiny reference GPT."""
import functools
import os

import jax
import numpy as np
from flax import nnx

import zjax
from zjax.data.corpus import TextCorpus
from zjax.models import gpt_loss, make_gpt


def tiny_config(*overrides):
    return zjax.load_config("configs/tiny.yaml", list(overrides))


@functools.lru_cache(maxsize=1)
def _corpus():
    return TextCorpus.stdlib(max_bytes=400_000)


def token_batches(n, batch, seq, seed=0, split="train"):
    """``n`` global batches of real text (the Python standard library's source; ``split`` train or val)."""
    return [_corpus().batch(split, k, batch, seq, seed=seed) for k in range(n)]


def gpt_train(*overrides, **kwargs):
    """A TrainStep for the tiny GPT plus its initial state."""
    cfg = tiny_config(*overrides)
    model = make_gpt(cfg.model, seed=0)
    train = zjax.make_train_step(cfg, gpt_loss, model=model, **kwargs)
    return train, train.init()


# The suite compiles with XLA:CPU's LLVM at -O0 (conftest.py): compiles are ~2x cheaper, the code
# runs ~2x slower. A run of hundreds of steps compiles its step at -O1 instead (measured on the
# tiny GPT over 2 devices: 5 s instead of 2.3 s to compile, 36 ms instead of 80 ms a step).
MANY_STEPS_OPTIONS = {"xla_backend_optimization_level": 1}


def many_steps(train, state, batch):
    """``train``'s step program (``TrainStep.lower``: the same HLO as ``train(state, batch)``)
    compiled with ``MANY_STEPS_OPTIONS``; call it as ``step(state, train.shard_batch(batch))``."""
    return train.lower(state, batch).compile(compiler_options=MANY_STEPS_OPTIONS)


def rel_norm(a, b):
    """``|a - b| / |b|`` in float32, on the host (``jnp.linalg.norm`` on sharded arrays compiled a
    program for every leaf shape and sharding)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def device0_bytes(tree):
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def gpt_params(cfg):
    """The tiny GPT's graphdef and its initial params as a pure dict."""
    graphdef, params = nnx.split(make_gpt(cfg.model, seed=0), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def xla_flags(devices):
    """XLA_FLAGS for a subprocess on ``devices`` simulated CPU devices, with the compile-time
    flags of this run (conftest.py: TEST_XLA_FLAGS)."""
    return f"--xla_force_host_platform_device_count={devices} {os.environ.get('ZJAX_TEST_XLA_FLAGS', '')}".strip()
