"""Choosing an implementation: "pallas" on CPU raises, "auto" falls back and says so once,
and under a mesh a kernel runs per batch shard without gathering its inputs."""
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import dispatch, flash_attention, layer_norm, rms_norm, shard_over_batch

# What XLA inserts to bring a sharded input to one device: any of these means a gather.
GATHERS = re.compile(r"all-gather|collective-permute|all-to-all")

KERNELS = {
    "rms_norm": lambda impl: rms_norm(jnp.ones((2, 16)), jnp.ones(16), impl=impl),
    "layer_norm": lambda impl: layer_norm(jnp.ones((2, 16)), jnp.ones(16), jnp.zeros(16), impl=impl),
    "flash_attention": lambda impl: flash_attention(*[jnp.ones((1, 4, 2, 16))] * 3, impl=impl),
}


@pytest.mark.parametrize("name", KERNELS)
def test_pallas_on_cpu_raises_naming_impl_backend_and_alternatives(name):
    with pytest.raises(ValueError, match=rf"{name}: impl='pallas'.*'cpu'.*'interpret'.*'xla'"):
        KERNELS[name]("pallas")


@pytest.mark.parametrize("name", KERNELS)
def test_auto_falls_back_to_xla_and_logs_it_once(name, caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger="zjax"):
        auto = KERNELS[name]("auto")
        KERNELS[name]("auto")
    np.testing.assert_array_equal(auto, KERNELS[name]("xla"))
    notes = [r.getMessage() for r in caplog.records if r.name == "zjax"]
    assert len(notes) == 1 and f"{name}: impl='auto' uses the XLA reference" in notes[0]
    assert "'cpu'" in notes[0]


def test_unknown_impl_lists_the_choices():
    with pytest.raises(ValueError, match=r"impl='cuda'.*'auto', 'pallas', 'interpret', 'xla'"):
        KERNELS["rms_norm"]("cuda")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def run_sharded_and_not(fn, sharded_fn, mesh, args, batched):
    """Values and gradients of ``sum(fn(*args) * w)``, both ways, and the sharded HLO."""
    w = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args).shape)

    def value_and_grads(f):
        return jax.jit(jax.value_and_grad(lambda *a: (f(*a) * w).sum(),
                                          argnums=tuple(range(len(args)))))

    placed = [jax.device_put(a, NamedSharding(mesh, P("data") if b else P()))
              for a, b in zip(args, batched)]
    sharded = value_and_grads(sharded_fn)
    hlo = sharded.lower(*placed).compile().as_text()
    return value_and_grads(fn)(*args), sharded(*placed), hlo


def test_rms_norm_per_shard_equals_unsharded_without_gathering(mesh):
    x = jax.random.normal(jax.random.key(0), (8, 6, 32))
    scale = 1 + jax.random.normal(jax.random.key(1), (32,)) * 0.1
    norm = functools.partial(rms_norm, impl="interpret")
    batched = (True, False)
    plain, sharded, hlo = run_sharded_and_not(
        norm, shard_over_batch(norm, mesh, batched=batched), mesh, (x, scale), batched)
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5)
    for s, p in zip(sharded[1], plain[1]):
        np.testing.assert_allclose(s, p, rtol=1e-5, atol=1e-5)
    assert not GATHERS.search(hlo)
    # Without the wrapper the same call moves the rows between devices.
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    assert GATHERS.search(jax.jit(norm).lower(x_sharded, scale).compile().as_text())


def test_flash_attention_per_shard_equals_unsharded_without_gathering(mesh):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (8, 12, 2, 16))
    k = jax.random.normal(keys[1], (8, 12, 1, 16))
    v = jax.random.normal(keys[2], (8, 12, 1, 16))
    segment_ids = jnp.broadcast_to(jnp.arange(12) // 5, (8, 12))

    def attend(q, k, v, segment_ids):
        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids, impl="interpret")

    def loss_args(q, k, v):
        return attend(q, k, v, segment_ids)

    def sharded_attend(q, k, v):
        return shard_over_batch(attend, mesh, batched=(True,) * 4)(q, k, v, segment_ids)

    batched = (True, True, True)
    plain, sharded, hlo = run_sharded_and_not(loss_args, sharded_attend, mesh, (q, k, v), batched)
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-5)
    for s, p in zip(sharded[1], plain[1]):
        np.testing.assert_allclose(s, p, rtol=1e-5, atol=1e-6)
    assert not GATHERS.search(hlo)
