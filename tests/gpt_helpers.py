"""Shared set-up for tests that train the tiny reference GPT."""
import functools

import jax
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


def device0_bytes(tree):
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def gpt_params(cfg):
    """The tiny GPT's graphdef and its initial params as a pure dict."""
    graphdef, params = nnx.split(make_gpt(cfg.model, seed=0), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)
