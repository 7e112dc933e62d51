"""ZeRO++'s quantized collectives (zjax.parallel.quantize) on 8 simulated devices.

The quantizer keeps every element within half its block's scale; qwZ's gather is each
shard's own quantize-dequantize, bit for bit, with an exact reduce-scatter backward; qgZ's
two-hop reduce-scatter routes slice d to device d, stays within the bound its two
quantizations imply, and with error feedback delays quantization loss without dropping
it. The bytes on the wire are read from the compiled HLO.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from zjax.analysis import hlo
from zjax.errors import ConfigError
from zjax.parallel import quantize as qz

N, NODE = 8, 4
LEVELS = {8: 127, 4: 7}
NODES = [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def spmd(mesh, f, in_specs, out_specs):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


# jitted: one compilation per shape instead of one per eager op
quantize = jax.jit(qz.quantize, static_argnums=(1, 2))
dequantize = jax.jit(qz.dequantize)


def roundtrip(x, bits, block):
    return np.asarray(dequantize(quantize(jnp.asarray(x), bits, block)))


# --- the quantizer -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_quantizer_error_within_half_a_scale(bits, dist):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal(1000) if dist == "normal" else rng.standard_t(1.0, 1000)  # Cauchy: outliers to ~1e3
    x = x.astype(np.float32)
    q = quantize(jnp.asarray(x.reshape(10, 100)), bits, 64)  # 1000 = 15 blocks of 64 + 40: padded
    assert q.values.shape == ((16, 64) if bits == 8 else (16, 32))
    assert q.values.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    ints = np.asarray(qz.unpack_int4(q.values) if bits == 4 else q.values)
    assert np.abs(ints).max() == LEVELS[bits]
    padded = np.pad(x, (0, 24)).reshape(16, 64)
    # max|block| / levels (XLA may multiply by 1/levels: an ulp off)
    np.testing.assert_allclose(np.asarray(q.scales), np.abs(padded).max(1) / LEVELS[bits], rtol=2e-7)
    back = np.asarray(dequantize(q))
    assert back.shape == (10, 100) and back.dtype == np.float32
    scale = np.repeat(np.asarray(q.scales), 64)[:1000]
    err = np.abs(x - back.ravel())
    # the documented bound: half a scale, plus float32 rounding of x / scale and q * scale
    assert np.all(err <= scale / 2 + 2 * LEVELS[bits] * scale * 2.0 ** -24)
    assert np.all(err <= scale / 2)  # on this data not even one ulp over
    assert err.max() > 0.3 * scale.max() / 2  # not trivially exact


def test_all_zero_block_is_exact():
    x = np.zeros(200, np.float32)
    x[:64] = np.linspace(-1, 1, 64)
    x[150] = 1e-30  # a tiny value alone in its block: no underflow to inf/nan
    for bits in (8, 4):
        q = quantize(jnp.asarray(x), bits, 64)
        assert np.asarray(q.scales)[1] == 0.0  # block 1 (elements 64..127) is all zero
        back = np.asarray(dequantize(q))
        assert np.all(np.isfinite(back))
        np.testing.assert_array_equal(back[64:128], 0.0)
        assert back[150] == pytest.approx(1e-30, rel=1e-6)
        np.testing.assert_array_equal(roundtrip(np.zeros((3, 5)), bits, 4), np.zeros((3, 5)))


def test_pack_int4_and_signs_round_trip():
    rng = np.random.default_rng(0)
    v = rng.integers(-8, 8, size=(3, 5, 16)).astype(np.int8)
    packed = qz.pack_int4(jnp.asarray(v))
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 8)
    np.testing.assert_array_equal(np.asarray(qz.unpack_int4(packed)), v)
    # every byte value unpacks and packs back
    every = jnp.arange(256, dtype=jnp.uint8)
    np.testing.assert_array_equal(np.asarray(qz.pack_int4(qz.unpack_int4(every))), np.arange(256))

    x = rng.standard_normal(37).astype(np.float32)
    x[[3, 20]] = 0.0  # zero counts as non-negative
    bits = qz.pack_signs(jnp.asarray(x.reshape(37, 1)))
    assert bits.dtype == jnp.uint8 and bits.shape == (5,)
    np.testing.assert_array_equal(np.asarray(qz.unpack_signs(bits, 37)), np.where(x >= 0, 1.0, -1.0))


def test_bad_arguments_name_what_works(mesh):
    x = jnp.ones(16)
    with pytest.raises(ConfigError, match="bits=3"):
        qz.quantize(x, 3, 8)
    with pytest.raises(ConfigError, match="block=0"):
        qz.quantize(x, 8, 0)
    with pytest.raises(ConfigError, match="even block"):
        qz.quantize(x, 4, 7)
    with pytest.raises(ConfigError, match="node_size=3.*divisor of 8"):
        spmd(mesh, lambda x: qz.two_hop_reduce_scatter(x, "data", node_size=3)[0], P("data"), P("data"))(jnp.ones(64))


# --- qwZ: quantized all-gather -------------------------------------------------------

GATHERS = [  # (bits, axis, tiled, groups)
    (8, 0, True, None),
    (4, 0, True, None),
    (8, 1, True, None),
    (4, 1, False, None),
    (8, 0, True, NODES),
]


@pytest.mark.parametrize("bits,axis,tiled,groups", GATHERS)
def test_gather_is_each_shards_own_roundtrip_bit_for_bit(mesh, bits, axis, tiled, groups):
    rng = np.random.default_rng(1)
    shards = (rng.standard_normal((N, 6, 20)) * rng.uniform(0.1, 10, (N, 1, 1))).astype(np.float32)  # 120: ragged

    def f(x):
        return qz.quantized_all_gather(x[0], "data", bits=bits, block=64, axis=axis, tiled=tiled, groups=groups)[None]

    got = np.asarray(spmd(mesh, f, P("data"), P("data"))(shards))
    own = np.stack([roundtrip(s, bits, 64) for s in shards])
    for d in range(N):
        members = next(g for g in groups if d in g) if groups else range(N)
        parts = [own[i] for i in members]
        want = np.concatenate(parts, axis) if tiled else np.stack(parts, axis)
        assert got[d].shape == want.shape
        np.testing.assert_array_equal(got[d], want)
    assert not np.array_equal(own, shards)  # the quantization is real


@pytest.mark.parametrize("tiled,groups", [(True, None), (False, None), (True, NODES)])
def test_gather_gradient_is_a_plain_psum_scatter(mesh, tiled, groups):
    rng = np.random.default_rng(2)
    g = 4 if groups else N
    x = rng.standard_normal((N, 6, 5)).astype(np.float32)
    ct = rng.standard_normal((N, g * 6, 5) if tiled else (N, 6, g, 5)).astype(np.float32)  # cotangent of the gather
    axis = 0 if tiled else 1

    def f(x, w):
        x, w = x[0], w[0]

        def loss(x):
            full = qz.quantized_all_gather(x, "data", bits=4, block=16, axis=axis, tiled=tiled, groups=groups)
            return jnp.sum(full * w)

        grad = jax.grad(loss)(x)
        exact = lax.psum_scatter(w, "data", scatter_dimension=axis, tiled=tiled, axis_index_groups=groups)
        return grad[None], exact[None]

    grad, exact = spmd(mesh, f, (P("data"), P("data")), (P("data"), P("data")))(x, ct)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(exact))
    # and that is the sum of the group's cotangents, this device's part
    for d in range(N):
        members = next(m for m in groups if d in m) if groups else list(range(N))
        total = ct[members].astype(np.float64).sum(0)
        mine = total.reshape(g, 6, 5)[members.index(d)] if tiled else total[:, members.index(d)]
        np.testing.assert_allclose(np.asarray(grad[d]), mine, rtol=1e-5, atol=1e-5)


# --- qgZ: two-hop quantized reduce-scatter -------------------------------------------


def two_hop(mesh, node_size, bits, block, n):
    def f(x):
        out, err = qz.two_hop_reduce_scatter(x[0], "data", node_size=node_size, bits=bits, block=block)
        return out, err[None], lax.psum_scatter(jnp.pad(x[0], (0, out.size * N - n)), "data", tiled=True) / N

    return spmd(mesh, f, P("data"), (P("data"), P("data"), P("data")))


@pytest.mark.parametrize("node_size", [1, 2, 4, 8])
def test_unquantized_two_hop_routes_slice_d_to_device_d(mesh, node_size):
    rng = np.random.default_rng(3)
    n = 1000  # block 64: padded to 1024, 128 elements per device
    # device d's element j is j + 1000·d plus noise: the mean of slice d is identifiable
    x = (np.arange(n)[None] + 1000.0 * np.arange(N)[:, None] + rng.standard_normal((N, n))).astype(np.float32)
    out, err, scattered = (np.asarray(a) for a in two_hop(mesh, node_size, None, 64, n)(x))
    assert out.shape == (1024,)
    np.testing.assert_allclose(out, scattered, rtol=1e-6)
    np.testing.assert_allclose(out, np.pad(x.astype(np.float64).mean(0), (0, 24)), rtol=1e-6)
    np.testing.assert_array_equal(err, 0.0)


def hop_reference(x, node_size, bits, block):
    """The two quantizations on the host: per-element bound and the result they imply."""
    pad = -x.shape[1] % (N * block)
    x = np.pad(x, ((0, 0), (0, pad)))
    q1 = [quantize(jnp.asarray(row), bits, block) for row in x]
    s1 = np.stack([np.repeat(np.asarray(q.scales), block) for q in q1])  # [N, P]
    partial = np.stack([sum(np.asarray(dequantize(q)) for q in q1[m:m + node_size])
                        for m in range(0, N, node_size)])  # [M, P]: each node's sum, in float32
    q2 = [quantize(jnp.asarray(p), bits, block) for p in partial]
    s2 = np.stack([np.repeat(np.asarray(q.scales), block) for q in q2])  # [M, P]
    implied = sum(np.asarray(dequantize(q)).astype(np.float64) for q in q2) / N
    bound = (s1.sum(0) / 2 + s2.sum(0) / 2) / N
    return x.astype(np.float64).mean(0), implied, bound, s1.sum(0) / N


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_two_hop_within_the_two_hops_bound(mesh, bits):
    rng = np.random.default_rng(4)
    n = 1000
    x = (rng.standard_normal((N, n)) * rng.uniform(0.5, 2.0, (N, 1))).astype(np.float32)
    out, err, _ = (np.asarray(a) for a in two_hop(mesh, NODE, bits, 64, n)(x))
    mean, implied, bound, loose = hop_reference(x, NODE, bits, 64)
    gap = np.abs(out - mean)
    # |out - mean| <= (sum_d scale1_d / 2 + sum_m scale2_m / 2) / N: hop 1 quantizes each of the
    # N inputs (error <= its block scale / 2), hop 2 each node's partial sum (<= its scale / 2)
    assert np.all(gap <= bound * (1 + 1e-5) + 1e-7)
    # |partial| <= sum of the node's block maxima, so scale2 <= sum of its scale1's: a closed form
    assert np.all(bound <= loose * (1 + 1e-6))
    assert gap.max() > 0.2 * bound.max() and np.mean(gap > 0) > 0.9  # not trivially exact
    # the result is exactly those two quantizations (up to float32 summation order)
    np.testing.assert_allclose(out, implied, rtol=0, atol=1e-6 * np.abs(implied).max())


def feedback_run(mesh, xs, feedback, node_size=NODE, bits=4, block=64):
    """T steps of the two-hop reduction inside one program; returns outputs [T, N*c], last buffers."""

    def f(xs):
        def step(error, x):
            out, new = qz.two_hop_reduce_scatter(x[0], "data", node_size=node_size, bits=bits, block=block,
                                                 error=error if feedback else None)
            return new, out

        error, outs = lax.scan(step, jnp.zeros(xs.shape[2:], jnp.float32), xs)
        return outs, error[None]

    outs, error = spmd(mesh, f, P(None, "data"), (P(None, "data"), P("data")))(xs)
    return np.asarray(outs, np.float64), np.asarray(error, np.float64)


@pytest.mark.parametrize("node_size", [4, 2])
def test_error_feedback_delays_loss_and_never_drops_it(mesh, node_size):
    T, n = 200, 1000
    rng = np.random.default_rng(5)
    # fixed random inputs: each device's fixed gradient plus a little noise per step
    xs = (rng.standard_normal((1, N, n)) + 0.1 * rng.standard_normal((T, N, n))).astype(np.float32)
    exact = xs.astype(np.float64).mean(1).sum(0)  # sum over steps of the exact means
    outs, error = feedback_run(mesh, xs, True, node_size)
    drift = outs.sum(0)[:n] - exact
    # sum_t out_t - sum_t mean_t = -(1/N) sum_d error_T^d: what was lost is still in the buffers
    held = -error.sum(0) / N
    rel = np.linalg.norm(drift - held) / np.linalg.norm(held)
    assert rel <= 1e-4
    np.testing.assert_array_equal(outs.sum(0)[n:], 0.0)  # the padding stays zero
    # negative control: the same run without feedback drifts by the summed per-step losses
    outs_nf, error_nf = feedback_run(mesh, xs, False, node_size)
    drift_nf = outs_nf.sum(0)[:n] - exact
    assert np.linalg.norm(drift_nf) >= 2 * np.linalg.norm(drift)
    print(f"node_size={node_size}: |drift| {np.linalg.norm(drift):.3g} with feedback, "
          f"{np.linalg.norm(drift_nf):.3g} without; identity off by {rel:.2g}")


# --- bytes on the wire, from the compiled HLO -----------------------------------------

_OP = re.compile(r"=\s*(.*?)\s+(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)(?:-start)?\(")


def wire(text):
    """(kind, dtypes, bytes of its result, groups) of each collective in compiled HLO text."""
    found = []
    for line in text.splitlines():
        m = _OP.search(line)
        if m:
            dtypes = set(re.findall(r"\b([a-z]+[0-9]*)\[", m.group(1)))
            found.append((m.group(2), dtypes, hlo.shape_bytes(m.group(1)), hlo.replica_groups(line)))
    return found


@pytest.mark.parametrize("bits", [8, 4])
def test_gather_moves_packed_bytes_plus_scales(mesh, bits):
    B, per = 256, 4096
    x = jnp.ones((N * per,), jnp.float32)
    text = spmd(mesh, lambda x: qz.quantized_all_gather(x, "data", bits=bits, block=B)[None], P("data"), P("data")) \
        .lower(x).compile().as_text()
    ops = wire(text)
    assert {k for k, *_ in ops} == {"all-gather"}
    payload = sum(b for _, d, b, _ in ops if d <= {"s8", "u8"})
    scales = sum(b for _, d, b, _ in ops if d == {"f32"})
    assert payload + scales == sum(b for *_, b, _ in ops)
    elements = N * per
    assert payload == elements * bits / 8 and scales == 4 * elements / B
    ring = sum(c.ring_bytes for c in hlo.collectives(text, N, {"data": N}))
    per_element = bits / 8 + 4 / B  # 1.0156 (int8) or 0.5156 (int4) with B = 256
    assert ring / (elements * (N - 1) / N) == pytest.approx(per_element, rel=0.02)
    # a bf16 gather moves 2 bytes per element (XLA:CPU would widen it to f32: not compiled here)
    assert ring / (2 * elements * (N - 1) / N) == pytest.approx(per_element / 2, rel=0.02)


def test_two_hop_moves_packed_int4_and_one_node_share_across_nodes(mesh):
    B, n = 256, 8 * 1024  # per device; 1024 elements per slice
    x = jnp.ones((N, n), jnp.float32)
    text = spmd(mesh, lambda x: qz.two_hop_reduce_scatter(x[0], "data", node_size=NODE, bits=4, block=B)[0],
                P("data"), P("data")).lower(x).compile().as_text()
    ops = wire(text)
    assert {k for k, *_ in ops} == {"all-to-all"}
    intra = [(d, b) for _, d, b, g in ops if g == NODES]
    inter = [(d, b) for _, d, b, g in ops if g == [[0, 4], [1, 5], [2, 6], [3, 7]]]
    assert len(intra) + len(inter) == len(ops)

    def split(hop):
        payload = sum(b for d, b in hop if d == {"u8"})
        scales = sum(b for d, b in hop if d == {"f32"})
        assert payload + scales == sum(b for _, b in hop)
        return payload, scales

    (p1, s1), (p2, s2) = split(intra), split(inter)
    assert p1 == n / 2 and s1 == 4 * n / B  # int4: half a byte per element, plus a scale per block
    assert max(b for d, b in intra + inter if d == {"f32"}) <= 4 * n / B  # no f32 payload on the wire
    assert (p1 + s1) / n == pytest.approx(0.5 + 4 / B, rel=0.02)
    assert (p2 + s2) / (p1 + s1) == pytest.approx(1 / NODE, rel=0.02)
    ring = [(c.group, c.ring_bytes) for c in hlo.collectives(text, N, {"data": N})]
    hop1 = sum(r for g, r in ring if g == NODE)
    hop2 = sum(r for g, r in ring if g == N // NODE)
    # ring-equivalent bytes leaving each device: (L-1)/L of hop 1, (M-1)/M of hop 2
    assert hop1 == pytest.approx((p1 + s1) * (NODE - 1) / NODE, rel=0.02)
    assert hop2 == pytest.approx((p2 + s2) / 2, rel=0.02)
