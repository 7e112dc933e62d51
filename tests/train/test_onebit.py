"""DeepSpeed's 1-bit Adam, 0/1 Adam and 1-bit LAMB (zjax.train.onebit) on 8 simulated devices.

Each optimizer is checked against DeepSpeed itself, transcribed below in NumPy float32:
``deepspeed/runtime/comm/nccl.py`` (``compressed_allreduce``) and
``deepspeed/runtime/fp16/onebit/{adam,zoadam,lamb}.py``, with 8 workers run in lockstep.
Further tests cover the warm-up's bit-identity with optax, the compiled program's
collectives (packed uint8 signs, about 1/32 of an fp32 all-reduce's bytes), the
error-feedback identity, convergence on a small regression, and argument errors.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from zjax.analysis import hlo
from zjax.errors import ConfigError
from zjax.train.onebit import (
    compressed_allreduce,
    init_errors,
    onebit_adam,
    onebit_lamb,
    padded_size,
    zero_one_adam,
    zero_one_adam_schedule,
)

N = 8


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard(f, mesh, in_specs, out_specs):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


def first(tree):
    """A device's block of a leading-device-axis tree (inside shard_map: drop the axis of size 1)."""
    return jax.tree.map(lambda x: x[0], tree)


def run_steps(tx, params, grads, mesh, check_vma=False):
    """Applies ``tx`` for ``T`` updates with fixed gradients; ``grads`` leaves are ``(T, 8, ...)``
    (device ``i``'s local gradient at update ``t``). Returns every device's params after every
    update (leaves ``(T, 8, ...)``).

    With ``check_vma=True`` the optimizer's state and updates are typed varying over the axis
    (they are per device), so the params they update are made varying too."""

    def run(params, grads):
        def body(carry, g):
            params, state = carry
            updates, state = tx.update(first(g), state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), jax.tree.map(lambda x: x[None], params)

        state = tx.init(params)
        if check_vma:
            params = lax.pcast(params, "data", to="varying")
        return lax.scan(body, (params, state), grads)[1]

    f = jax.shard_map(run, mesh=mesh, in_specs=(P(), P(None, "data")), out_specs=P(None, "data"), check_vma=check_vma)
    return jax.jit(f)(params, grads)


def random_grads(rng, params, steps, scale=1.0):
    """Per-device gradients that share a mean direction and differ by device."""
    def leaf(p):
        common = rng.normal(size=(steps, 1) + p.shape)
        return jnp.asarray((scale * (common + 0.7 * rng.normal(size=(steps, N) + p.shape))).astype(np.float32))
    return jax.tree.map(leaf, params)


# ------------------------------------------------------------------- DeepSpeed, transcribed
# NumPy float32, statement by statement as in DeepSpeed. Each optimizer's first step() call
# only initializes (the fp16 wrapper makes it with zero gradients), so the first real update
# starts from state['step'] = 1. The engine's gradient all-reduce, when enabled, is the mean
# over workers.


def ds_sign(x):
    """torch: ``x.sign().add_(1).bool().float().add_(-0.5).mul_(2.0)`` (0 counts as +1)."""
    return ((np.sign(x) + 1).astype(bool).astype(np.float32) - np.float32(0.5)) * np.float32(2.0)


def ds_compressed_allreduce(buffers, worker_errors, server_errors):
    """NcclBackend.compressed_allreduce over ``len(buffers)`` workers; updates the errors in place."""
    n, size, padded = len(buffers), buffers[0].size, worker_errors[0].size
    chunk = padded // n
    signs, scales = [], []
    for i in range(n):
        buffer_m = np.concatenate([buffers[i], np.zeros(padded - size, np.float32)]) + worker_errors[i]
        worker_scale = np.float32(np.linalg.norm(buffer_m) / np.sqrt(buffer_m.size))
        worker_errors[i][:] = buffer_m - worker_scale * ds_sign(buffer_m)
        signs.append((np.sign(buffer_m) + 1).astype(bool).reshape(n, chunk))
        scales.append(worker_scale)
    recv_scale = np.array(scales, np.float32)[:, None] * np.float32(1 / n)
    result = []
    for k in range(n):  # worker k is the server of chunk k
        recv_sign = np.stack([signs[i][k] for i in range(n)])
        compensated = ((recv_sign.astype(np.float32) - np.float32(0.5)) * np.float32(2.0) * recv_scale).sum(0)
        compensated = compensated + server_errors[k]
        server_scale = np.float32(np.linalg.norm(compensated) / np.sqrt(compensated.size))
        server_errors[k][:] = compensated - server_scale * ds_sign(compensated)
        result.append(ds_sign(compensated) * server_scale)
    return np.concatenate(result)[:size]


def ds_errors(sizes):
    """Per worker, per tensor: zero worker and server errors of DeepSpeed's corrected sizes."""
    return ([[np.zeros(padded_size(s, N), np.float32) for s in sizes] for _ in range(N)],
            [[np.zeros(padded_size(s, N) // N, np.float32) for s in sizes] for _ in range(N)])


def ds_onebit_adam(params, grads, lr, freeze_step, b1, b2, eps, weight_decay):
    """OnebitAdam.step for each update; ``grads[t][i][j]``: worker i's gradient of tensor j. Returns params per update."""
    params = [p.copy() for p in params]
    state = [dict(step=1, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p)) for p in params]
    worker_errors, server_errors = ds_errors([p.size for p in params])
    adam_freeze_key = False
    out = []
    for g in grads:
        for j, p in enumerate(params):
            s = state[j]
            s["step"] += 1
            if adam_freeze_key is False:
                grad = np.mean([g[i][j] for i in range(N)], axis=0)  # the engine's averaged all-reduce
                s["exp_avg"] = s["exp_avg"] * b1 + (1 - b1) * grad
                s["exp_avg_sq"] = s["exp_avg_sq"] * b2 + (1 - b2) * grad * grad
            else:
                local = [(s["exp_avg"] * b1 + (1 - b1) * g[i][j]).ravel() for i in range(N)]
                s["exp_avg"] = ds_compressed_allreduce(
                    local, [e[j] for e in worker_errors], [e[j] for e in server_errors]).reshape(p.shape)
            update = s["exp_avg"] / (np.sqrt(s["exp_avg_sq"]) + eps)
            if weight_decay > 0.0:
                update = update + weight_decay * p
            params[j] = p + (-lr * update)
        if adam_freeze_key is False and state[0]["step"] >= freeze_step:
            adam_freeze_key = True
        out.append([p.copy() for p in params])
    return out


def ds_onebit_lamb(params, grads, lr, freeze_step, b1, b2, eps, weight_decay, max_coeff=10.0, min_coeff=0.01,
                   coeff_beta=0.9, factor_max=4.0, factor_min=0.5, factor_threshold=0.1):
    """OnebitLamb.step for each update (one fused momentum buffer, whose size here needs no padding)."""
    params = [p.copy() for p in params]
    state = [dict(step=1, lamb_coeff_freeze=0.0, last_factor=1.0, exp_avg=np.zeros_like(p),
                  exp_avg_sq=np.zeros_like(p), exp_avg_sq_fresh=np.zeros_like(p)) for p in params]
    total = sum(p.size for p in params)
    assert total % (N * math.lcm(N, 8)) == 0, "DeepSpeed's padding (a stale dummy tensor) is not transcribed"
    worker_errors = [np.zeros(total, np.float32) for _ in range(N)]
    server_errors = [np.zeros(total // N, np.float32) for _ in range(N)]
    lamb_freeze_key = False
    out = []
    for g in grads:
        if lamb_freeze_key:
            exp_avg_last_step = [s["exp_avg"].copy() for s in state]
            if "scaling_coeff" not in state[0]:
                momentum_scales = [float(np.linalg.norm(s["exp_avg"]) / np.sqrt(s["exp_avg"].size)) for s in state]
                united_scale = sum(momentum_scales) / len(momentum_scales)
                for s, scale in zip(state, momentum_scales):
                    s["scaling_coeff"] = united_scale / scale
        local = [[None] * len(params) for _ in range(N)]
        for j, p in enumerate(params):
            s = state[j]
            s["step"] += 1
            if lamb_freeze_key is False:
                grad = np.mean([g[i][j] for i in range(N)], axis=0)
                s["exp_avg"] = s["exp_avg"] * b1 + (1 - b1) * grad
                s["exp_avg_sq"] = s["exp_avg_sq"] * b2 + (1 - b2) * grad * grad
                if s["step"] == freeze_step:
                    s["exp_avg_sq_fresh"] = s["exp_avg_sq"].copy()
                weight_norm = np.linalg.norm(p)
                update = s["exp_avg"] / (np.sqrt(s["exp_avg_sq"]) + eps)
                if weight_decay > 0.0:
                    update = update + weight_decay * p
                update_norm = np.linalg.norm(update)
                lamb_coeff = 1.0
                if weight_norm != 0 and update_norm != 0:
                    lamb_coeff = float(weight_norm / update_norm)
                    lamb_coeff = min(max(lamb_coeff, min_coeff), max_coeff)
                if lamb_coeff != 1.0:
                    s["lamb_coeff_freeze"] = coeff_beta * s["lamb_coeff_freeze"] + (1 - coeff_beta) * lamb_coeff
                params[j] = p + np.float32(-lr * lamb_coeff) * update
            else:
                for i in range(N):
                    local[i][j] = (s["exp_avg"] * b1 + (1 - b1) * g[i][j]) * np.float32(s["scaling_coeff"])
        if lamb_freeze_key:
            flat = ds_compressed_allreduce([np.concatenate([x.ravel() for x in row]) for row in local],
                                           worker_errors, server_errors)
            offset = 0
            for j, p in enumerate(params):
                s = state[j]
                exp_avg = flat[offset:offset + p.size].reshape(p.shape) / np.float32(s["scaling_coeff"])
                offset += p.size
                grad_reconstruct = (exp_avg - exp_avg_last_step[j] * b1) / (1 - b1)
                s["exp_avg_sq_fresh"] = s["exp_avg_sq_fresh"] * b2 + (1 - b2) * grad_reconstruct * grad_reconstruct
                denom = np.sqrt(s["exp_avg_sq"]) + eps
                update_prelim = exp_avg / denom
                update = update_prelim + weight_decay * p if weight_decay > 0.0 else update_prelim
                update_norm = np.linalg.norm(update)
                denom_real = np.sqrt(s["exp_avg_sq_fresh"]) + eps
                factor = float((denom / denom_real).max())
                if weight_decay > 0.0:
                    update_ratio = min(1.0, float(np.linalg.norm(update_prelim) / update_norm))
                    factor = factor * update_ratio + (1.0 - update_ratio)
                factor = min(max(factor, factor_min), factor_max)
                factor = min(max(factor, s["last_factor"] * (1.0 - factor_threshold)),
                             s["last_factor"] * (1.0 + factor_threshold))
                s["last_factor"] = factor
                lamb_coeff = s["lamb_coeff_freeze"] * factor
                params[j] = p + np.float32(-lr * lamb_coeff) * update
                s["exp_avg"] = exp_avg
        if lamb_freeze_key is False and state[0]["step"] >= freeze_step:
            lamb_freeze_key = True
        out.append([p.copy() for p in params])
    return out


def ds_zero_one_adam(params, grads, lr, var_freeze_step, var_update_scaler, local_step_scaler, local_step_clipper,
                     b1, b2, eps, weight_decay):
    """ZeroOneAdam.step on each worker for each update. Returns each worker's params per update."""
    n_t = len(params)
    workers = [dict(p=[p.copy() for p in params], state=[
        dict(step=1, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p), var_interval=1, var_counter=0,
             local_step_interval=1, local_step_counter=0, lrs=0.0, momentum_accumulator=np.zeros_like(p))
        for p in params]) for _ in range(N)]
    worker_errors, server_errors = ds_errors([p.size for p in params])
    freeze_key, reinitial_error_buffer, enable_backward_allreduce = False, False, True
    out = []
    for g in grads:
        mean = [np.mean([g[i][j] for i in range(N)], axis=0) for j in range(n_t)]
        seen = [[mean[j] if enable_backward_allreduce else g[i][j] for j in range(n_t)] for i in range(N)]
        for j in range(n_t):
            states = [w["state"][j] for w in workers]
            for s in states:
                s["step"] += 1
            s0 = states[0]
            if freeze_key is False:
                if s0["step"] % s0["var_interval"] == 0:
                    for i, s in enumerate(states):
                        s["exp_avg_sq"] = s["exp_avg_sq"] * b2 + (1 - b2) * seen[i][j] * seen[i][j]
                        s["exp_avg"] = s["exp_avg"] * b1 + (1 - b1) * seen[i][j]
                else:
                    grad_onebit = ds_compressed_allreduce([seen[i][j].ravel() for i in range(N)],
                                                          [e[j] for e in worker_errors], [e[j] for e in server_errors])
                    for s in states:
                        s["exp_avg"] = s["exp_avg"] * b1 + (1 - b1) * grad_onebit.reshape(s["exp_avg"].shape)
            else:
                for i, s in enumerate(states):
                    s["exp_avg"] = s["exp_avg"] * b1 + (1 - b1) * seen[i][j]
                    s["lrs"] += lr
            for w, s in zip(workers, states):
                update = s["exp_avg"] / (np.sqrt(s["exp_avg_sq"]) + eps)
                if weight_decay > 0.0:
                    update = update + weight_decay * w["p"][j]
                w["p"][j] = w["p"][j] + (-lr * update)
                if freeze_key is True:
                    s["momentum_accumulator"] = s["momentum_accumulator"] + (-lr * update)
            if s0["step"] % s0["local_step_interval"] == 0 and freeze_key:
                for w, s in zip(workers, states):
                    w["p"][j] = w["p"][j] + (-1 * s["momentum_accumulator"])
                    s["momentum_accumulator"] = s["momentum_accumulator"] * (np.sqrt(s["exp_avg_sq"]) + eps)
                synced = ds_compressed_allreduce([s["momentum_accumulator"].ravel() for s in states],
                                                 [e[j] for e in worker_errors], [e[j] for e in server_errors])
                for w, s in zip(workers, states):
                    comm_buffer = synced.reshape(s["exp_avg"].shape)
                    s["exp_avg"] = -(comm_buffer / np.float32(s["lrs"]))
                    w["p"][j] = w["p"][j] + comm_buffer / (np.sqrt(s["exp_avg_sq"]) + eps)
                    s["momentum_accumulator"] = np.zeros_like(comm_buffer)
                    s["lrs"] = 0
            for s in states:
                if freeze_key is False:
                    if s["step"] % s["var_interval"] == 0:
                        s["var_counter"] += 1
                        if s["var_counter"] == var_update_scaler:
                            s["var_counter"] = 0
                            s["var_interval"] *= 2
                    enable_backward_allreduce = (s["step"] + 1) % s["var_interval"] == 0
                else:
                    s["local_step_counter"] += 1
                    if s["local_step_counter"] == local_step_scaler:
                        s["local_step_counter"] = 0
                        s["local_step_interval"] = min(local_step_clipper, s["local_step_interval"] * 2)
        if workers[0]["state"][0]["step"] > var_freeze_step:
            freeze_key, enable_backward_allreduce = True, False
        if freeze_key is True and reinitial_error_buffer is False:
            for e in worker_errors + server_errors:
                for x in e:
                    x[:] = 0
            reinitial_error_buffer = True
        out.append([[p.copy() for p in w["p"]] for w in workers])
    return out


def ds_zero_one_adam_phases(updates, var_freeze_step, var_update_scaler, local_step_scaler, local_step_clipper):
    """ZeroOneAdam.step's counters alone, including the initialization call, for ``updates`` updates.

    Returns per update: (variance updated, communicated, in the local phase)."""
    state = {"step": 0}
    initialize, freeze_key, reinitial_error_buffer, enable_backward_allreduce = False, False, False, True
    flags = []
    while len(flags) < updates:
        if not initialize or "worker_error" not in state:
            state.update(var_interval=1, var_counter=0, local_step_interval=1, local_step_counter=0, lrs=0,
                         worker_error=0)
        state["step"] += 1
        variance = sync = None
        if initialize:
            if freeze_key is False:
                variance = state["step"] % state["var_interval"] == 0
                # the engine all-reduced this step's gradient exactly iff the variance takes it
                assert enable_backward_allreduce == variance, state
                sync = True
            sync_now = state["step"] % state["local_step_interval"] == 0 and freeze_key
            if freeze_key:
                variance, sync = False, sync_now
            if freeze_key is False:
                if state["step"] % state["var_interval"] == 0:
                    state["var_counter"] += 1
                    if state["var_counter"] == var_update_scaler:
                        state["var_counter"] = 0
                        state["var_interval"] *= 2
                enable_backward_allreduce = (state["step"] + 1) % state["var_interval"] == 0
            else:
                state["local_step_counter"] += 1
                if state["local_step_counter"] == local_step_scaler:
                    state["local_step_counter"] = 0
                    state["local_step_interval"] = min(local_step_clipper, state["local_step_interval"] * 2)
            flags.append((variance, sync, freeze_key))
        if not initialize:
            freeze_key = False
            state.pop("worker_error")
            initialize = True
            continue
        if state["step"] > var_freeze_step:
            freeze_key, enable_backward_allreduce = True, False
        if freeze_key is True and reinitial_error_buffer is False:
            reinitial_error_buffer = True
    return np.array(flags, bool)


def per_step(grads):
    """``(T, 8, ...)`` gradient leaves to DeepSpeed's ``grads[t][i][j]`` (NumPy float32)."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
    return [[[leaf[t, i] for leaf in leaves] for i in range(N)] for t in range(leaves[0].shape[0])]


# ---------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_warmup_is_optax_adam_on_the_mean_gradient_bit_for_bit(mesh, weight_decay):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32)), "b": jnp.zeros(8, jnp.float32)}
    grads = random_grads(rng, params, steps=6)
    # A schedule with decay, a constant lr without: both of optax's lr paths.
    lr = optax.linear_schedule(1e-2, 1e-3, 6) if weight_decay else 3e-3
    ref = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    tx = onebit_adam(lr, weight_decay=weight_decay, freeze_step=6, axis_name="data")

    def run(tx, mean_first):
        def go(params, grads):
            def body(carry, g):
                params, state = carry
                g = first(g)
                if mean_first:
                    g = jax.tree.map(lambda x: lax.pmean(x, "data"), g)
                updates, state = tx.update(g, state, params)
                adam = state[0] if mean_first else state
                return (optax.apply_updates(params, updates), state), (updates, adam.mu, adam.nu)

            return lax.scan(body, (params, tx.init(params)), grads)[1]

        return shard(go, mesh, (P(), P(None, "data")), P())(params, grads)

    ours, theirs = run(tx, mean_first=False), run(ref, mean_first=True)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_onebit_adam_is_deepspeeds(mesh):
    """DeepSpeed's formula (bias_correction=False) before and after the freeze, per tensor. Run
    with check_vma=True, as are the next two tests (the others run with check_vma=False)."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(10, 13)).astype(np.float32)), "b": jnp.ones(5, jnp.float32)}
    grads = random_grads(rng, params, steps=8)
    tx = onebit_adam(1e-2, weight_decay=0.01, freeze_step=3, axis_name="data", bias_correction=False)
    got = run_steps(tx, params, grads, mesh, check_vma=True)
    # DeepSpeed's freeze_step counts its initialization call: freeze_step + 1 gives 3 exact updates.
    want = ds_onebit_adam([np.asarray(p) for p in jax.tree.leaves(params)], per_step(grads), 1e-2, 4,
                          0.9, 0.999, 1e-8, 0.01)
    for t, ps in enumerate(want):
        for leaf, p in zip(jax.tree.leaves(got), ps):
            for i in range(N):  # every device holds the same params
                np.testing.assert_allclose(np.asarray(leaf[t, i]), p, rtol=2e-5, atol=2e-6, err_msg=f"update {t}")


def test_onebit_lamb_is_deepspeeds(mesh):
    """Warm-up LAMB, the frozen trust ratio, the fused buffer with its scaling coefficients, the
    fresh variance and the factor's clipping, with weight decay."""
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(8, 15)).astype(np.float32)),  # 120 + 8 = 128: no padding
              "b": jnp.asarray(rng.normal(size=8).astype(np.float32) * 0.1)}
    grads = random_grads(rng, params, steps=8)
    tx = onebit_lamb(1e-2, weight_decay=0.01, freeze_step=3, axis_name="data")
    got = run_steps(tx, params, grads, mesh, check_vma=True)
    want = ds_onebit_lamb([np.asarray(p) for p in jax.tree.leaves(params)], per_step(grads), 1e-2, 4,
                          0.9, 0.999, 1e-8, 0.01)
    for t, ps in enumerate(want):
        for leaf, p in zip(jax.tree.leaves(got), ps):
            np.testing.assert_allclose(np.asarray(leaf[t, 0]), p, rtol=2e-5, atol=2e-6, err_msg=f"update {t}")


def test_zero_one_adam_is_deepspeeds(mesh):
    """All four kinds of update (exact variance, 1-bit gradient, local, local + 1-bit sync), each
    device's own params between syncs, over 28 updates (one tensor, 77 values padded to 128:
    the per-tensor path with several tensors is the one 1-bit Adam's test covers)."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(7, 11)).astype(np.float32))}
    grads = random_grads(rng, params, steps=28)
    kw = dict(var_freeze_step=10, var_update_scaler=2, local_step_scaler=3, local_step_clipper=4)
    tx = zero_one_adam(1e-2, weight_decay=0.01, axis_name="data", **kw)
    got = run_steps(tx, params, grads, mesh, check_vma=True)
    want = ds_zero_one_adam([np.asarray(p) for p in jax.tree.leaves(params)], per_step(grads), 1e-2,
                            *kw.values(), 0.9, 0.999, 1e-8, 0.01)
    phases = zero_one_adam_schedule(np.arange(28), **kw)
    assert {(bool(v), bool(s), bool(lo)) for v, s, lo in zip(*phases)} == {
        (True, True, False), (False, True, False), (False, False, True), (False, True, True)}
    for t, per_worker in enumerate(want):
        for i, ps in enumerate(per_worker):
            for leaf, p in zip(jax.tree.leaves(got), ps):
                np.testing.assert_allclose(np.asarray(leaf[t, i]), p, rtol=2e-5, atol=2e-6,
                                           err_msg=f"update {t}, device {i}")
    # Devices differ between syncs and agree again (up to rounding) after one.
    w = np.asarray(got["w"])
    local = np.flatnonzero(np.asarray(phases.local_phase & ~phases.sync))
    synced = np.flatnonzero(np.asarray(phases.local_phase & phases.sync))
    assert np.ptp(w[local[-1]], axis=0).max() > 1e-4
    assert np.ptp(w[synced[-1]], axis=0).max() < 1e-5  # a few float32 ulps: each device undoes its own sum


@pytest.mark.parametrize("kw", [
    dict(var_freeze_step=600, var_update_scaler=4, local_step_scaler=50, local_step_clipper=8),
    dict(var_freeze_step=300, var_update_scaler=3, local_step_scaler=40, local_step_clipper=12),
    dict(var_freeze_step=1, var_update_scaler=16, local_step_scaler=7, local_step_clipper=16),
    dict(var_freeze_step=1000, var_update_scaler=16),  # DeepSpeed's scalers, no local phase
    dict(var_freeze_step=100, var_update_scaler=1, local_step_scaler=1, local_step_clipper=1),
])
def test_zero_one_adam_schedule_matches_deepspeeds_loop(kw):
    want = ds_zero_one_adam_phases(1000, kw["var_freeze_step"], kw["var_update_scaler"],
                                   kw.get("local_step_scaler", 32678), kw.get("local_step_clipper", 16))
    got = np.stack([np.asarray(a) for a in zero_one_adam_schedule(jnp.arange(1000), **kw)], axis=1)
    mismatch = np.flatnonzero((got != want).any(axis=1))
    assert mismatch.size == 0, f"first differing update {mismatch[:1]}: got {got[mismatch[:1]]}, want {want[mismatch[:1]]}"
    assert want[0, 0] and (kw["var_freeze_step"] < 5 or not want[:, 0].all())  # variance updates, not all of them
    if kw["var_freeze_step"] < 1000 and kw.get("local_step_scaler", 32678) < 1000 and kw["local_step_clipper"] > 1:
        assert (~want[:, 1]).sum() > 100  # and so do local steps without communication
    # Traced steps (inside the optimizer's jit) agree with the array call.
    one = jax.jit(lambda t: zero_one_adam_schedule(t, **kw))
    for t in (0, 1, 7, 99, 500, 999):
        assert tuple(bool(x) for x in one(t)) == tuple(want[t])


def test_error_feedback_identity(mesh):
    """compressed_allreduce's identity, step by step and telescoped over 12 steps, with padding
    (1000 values padded to 1024); the same result with signs sent one per byte."""
    rng = np.random.default_rng(4)
    steps, shape = 12, (10, 100)
    common = rng.normal(size=(steps, 1) + shape)
    xs = jnp.asarray((common + rng.normal(size=(steps, N) + shape) * np.geomspace(0.1, 3, 100)).astype(np.float32))

    def run(pack):
        def go(xs):
            w0, s0 = init_errors(1000, N)

            def body(carry, x):
                w, s = carry
                est, w2, s2 = compressed_allreduce(x[0], w, s, "data", pack=pack)
                return (w2, s2), (est[None], w[None], w2[None], s[None], s2[None])

            return lax.scan(body, (w0, s0), xs)[1]

        return [np.asarray(a, np.float64) for a in shard(go, mesh, P(None, "data"), P(None, "data"))(xs)]

    packed, unpacked = run(pack=True), run(pack=False)
    for a, b in zip(packed, unpacked):
        np.testing.assert_array_equal(a, b)
    est, w, w_new, s, s_new = packed
    assert (est == est[:, :1]).all()  # every device has the same estimate
    x = np.asarray(xs, np.float64).reshape(steps, N, -1)
    mean_x = np.pad(x.mean(1), ((0, 0), (0, 24)))
    # s: (steps, devices, chunk); device k's server error covers chunk k, so concatenating over devices gives s.
    identity = mean_x + (w - w_new).mean(1) + (s - s_new).reshape(steps, -1)
    scale = np.abs(mean_x).max()
    np.testing.assert_allclose(est.reshape(steps, N, -1)[:, 0], identity[:, :1000], atol=2e-6 * scale * 8)
    telescoped = mean_x.sum(0) + (w[0] - w_new[-1]).mean(0) + (s[0] - s_new[-1]).reshape(-1)
    np.testing.assert_allclose(est.reshape(steps, N, -1)[:, 0].sum(0), telescoped[:1000], atol=2e-5 * scale * steps)
    # The errors stay bounded: the final buffers are no larger than a step's signal.
    assert np.abs(w_new[-1]).max() < 3 * np.abs(x).max() and np.abs(s_new[-1]).max() < 3 * np.abs(mean_x).max()


def _collective_dtypes(text):
    """(op, dtypes, bytes of the result) for each collective in compiled HLO text."""
    found = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(all-reduce|all-gather|all-to-all|reduce-scatter|"
                     r"collective-permute)(?:-start)?\(", line)
        if m:
            shapes = re.findall(r"\b([a-z]+[0-9]*)\[[0-9,]*\]", m.group(1))
            found.append((m.group(2), set(shapes), hlo.shape_bytes(m.group(1))))
    return found


@pytest.mark.parametrize("name", ["onebit_adam", "onebit_lamb"])
def test_compressed_phase_sends_packed_signs(mesh, name):
    """Counting: ring-equivalent bytes per device (zjax.analysis.hlo) of every collective in the
    compiled compressed-phase update, against an fp32 all-reduce of the same number of values
    (2 * 4 * size * 7/8), which the exact phase's program is measured to send."""
    params = {"w": jnp.zeros((512, 128), jnp.float32), "b": jnp.zeros(128, jnp.float32)}
    size = 512 * 128 + 128
    make = onebit_adam if name == "onebit_adam" else onebit_lamb
    tx = make(1e-3, freeze_step=10, axis_name="data")
    state = shard(lambda p: jax.tree.map(lambda x: x[None], tx.init(p)), mesh, P(), P("data"))(params)
    grads = jax.tree.map(lambda p: jnp.zeros((N,) + p.shape), params)

    def program(compressed):
        def step(params, state, grads):
            updates, state = tx.update(first(grads), first(state), params, compressed=compressed)
            return updates, jax.tree.map(lambda x: x[None], state)

        return shard(step, mesh, (P(), P("data"), P("data")), (P(), P("data"))).lower(params, state, grads).compile()

    fp32_allreduce = 2 * 4 * size * (N - 1) / N
    exact, compressed = program(False), program(True)
    assert sum(c.ring_bytes for c in hlo.collectives(exact.as_text(), N, {"data": N})) == fp32_allreduce

    # The two programs run as a training loop would: the per-device state, with its leading device
    # axis, goes from the exact step (the freeze step) into the compressed one.
    rng = np.random.default_rng(6)
    grads = jax.tree.map(lambda g: jnp.asarray(rng.normal(size=g.shape).astype(np.float32)), grads)
    state = state._replace(count=jnp.full((N,), 9, jnp.int32))  # one update before the freeze
    _, state = exact(params, state, grads)
    updates, state = compressed(params, state, grads)
    assert (np.asarray(state.count) == 11).all()
    assert all(np.abs(np.asarray(e)).max() > 0 for e in jax.tree.leaves(state.worker_error))
    for leaf in jax.tree.leaves(state.mu):
        assert (np.asarray(leaf) == np.asarray(leaf[:1])).all()  # every device has the same momentum
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))

    text = compressed.as_text()
    colls = hlo.collectives(text, N, {"data": N})
    assert colls and all(c.axes == ("data",) for c in colls)
    kinds = _collective_dtypes(text)
    assert not [k for k in kinds if k[0] == "all-reduce"], kinds  # nothing is all-reduced
    assert all(k[1] == {"u8"} for k in kinds if k[2] > 4 * N), kinds  # the payload is packed signs
    assert all(k[2] <= 4 * N for k in kinds if k[1] != {"u8"}), kinds  # float32: only the scales
    tensors = 2 if name == "onebit_adam" else 1  # per tensor, or one fused buffer
    assert sorted(k[0] for k in kinds) == sorted(["all-to-all", "all-gather", "all-gather", "all-gather"] * tensors)
    total = sum(c.ring_bytes for c in colls)
    ratio = total / fp32_allreduce
    print(f"{name}: {total:.0f} B/step vs {fp32_allreduce:.0f} B fp32 all-reduce: 1/{1 / ratio:.2f}")
    assert abs(ratio * 32 - 1) < 0.02


# A two-layer tanh regression, 8 -> 8 -> 8 without biases, from a noisy teacher of the same form
# (noise 0.3, so the loss floor is about 0.5 * 0.3**2 = 0.045), 64 samples per device: 4096
# targets for 128 parameters. Both weights have 64 values, so no tensor is mostly padding
# (a 1-value bias would be compressed in a buffer of 64).
def _regression():
    rng = np.random.default_rng(0)
    d = 8
    teacher = rng.normal(size=(d, d)) / np.sqrt(d), rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(N, 64, d)).astype(np.float32)
    y = (np.tanh(x @ teacher[0]) @ teacher[1] + 0.3 * rng.normal(size=(N, 64, d))).astype(np.float32)
    params = {"w1": rng.normal(size=(d, d)) / np.sqrt(d), "w2": rng.normal(size=(d, d)) / np.sqrt(d)}
    return jnp.asarray(x), jnp.asarray(y), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _loss(p, x, y):
    return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)


def _train(tx, mesh, steps):
    x, y, params = _regression()

    def go(x, y, params):
        x, y = x[0], y[0]

        def body(carry, _):
            params, state = carry
            grads = jax.grad(_loss)(params, x, y)  # this device's 64 samples only
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = lax.scan(body, (params, tx.init(params)), None, length=steps)
        return lax.pmean(_loss(params, x, y), "data")

    return float(shard(go, mesh, (P("data"), P("data"), P()), P())(x, y, params))


def _mean_gradient(tx):
    return optax.GradientTransformation(
        tx.init, lambda g, s, p=None: tx.update(jax.tree.map(lambda x: lax.pmean(x, "data"), g), s, p))


def test_training_converges_like_the_exact_optimizers(mesh):
    """400 updates, cosine lr from 3e-2; the 1-bit optimizers compress after a 20% warm-up (80
    updates), 0/1 Adam (lr from 1e-2) leaves its variance phase after 80 updates and then takes
    local steps of up to 4. Each must end within 8% of its exact counterpart's final loss: Adam
    on the mean gradient for 1-bit Adam and 0/1 Adam, onebit_lamb that never reaches its
    freeze_step for 1-bit LAMB. Measured over data seeds 0-5: 1-bit Adam +0.8% to +3.2%, 1-bit
    LAMB +0.2% to +4.3%, 0/1 Adam -0.5% to +2.0%. (At lr 1e-2, where 400 updates do not reach
    the floor, 1-bit LAMB trails exact LAMB by 16-21%: its trust ratio is frozen, and the factor
    that corrects it moves by at most 10% per update.)"""
    steps, warmup = 400, 80
    lr = optax.cosine_decay_schedule(3e-2, steps)
    x, y, params = _regression()
    start = float(jnp.mean(jax.vmap(_loss, (None, 0, 0))(params, x, y)))
    adam = _train(_mean_gradient(optax.adam(lr)), mesh, steps)
    onebit = _train(onebit_adam(lr, freeze_step=warmup, axis_name="data"), mesh, steps)
    lamb = _train(onebit_lamb(lr, freeze_step=steps + 1, axis_name="data"), mesh, steps)
    onebit_l = _train(onebit_lamb(lr, freeze_step=warmup, axis_name="data"), mesh, steps)
    zero_one = _train(zero_one_adam(optax.cosine_decay_schedule(1e-2, steps), var_freeze_step=warmup,
                                    var_update_scaler=4, local_step_scaler=40, local_step_clipper=4,
                                    axis_name="data"), mesh, steps)
    print(f"start {start:.4f}; adam {adam:.5f}, 1-bit adam {onebit:.5f} ({onebit / adam - 1:+.1%}); lamb {lamb:.5f},"
          f" 1-bit lamb {onebit_l:.5f} ({onebit_l / lamb - 1:+.1%}); 0/1 adam {zero_one:.5f} ({zero_one / adam - 1:+.1%})")
    assert adam < 0.055 and lamb < 0.055 and start > 0.3  # from 0.42 to near the 0.045 floor
    assert onebit <= 1.08 * adam
    assert onebit_l <= 1.08 * lamb
    assert zero_one <= 1.08 * adam


@pytest.mark.parametrize("make, kwargs, name", [
    (onebit_adam, dict(freeze_step=-1), "freeze_step"),
    (onebit_adam, dict(freeze_step=0), "freeze_step"),
    (onebit_adam, dict(freeze_step=1.5), "freeze_step"),
    (onebit_adam, dict(freeze_step=10, b1=1.0), "b1"),
    (onebit_adam, dict(freeze_step=10, b2=-0.1), "b2"),
    (onebit_adam, dict(freeze_step=10, eps=-1e-8), "eps"),
    (onebit_adam, dict(freeze_step=10, weight_decay=-0.1), "weight_decay"),
    (onebit_adam, dict(freeze_step=10, learning_rate=-1e-3), "learning_rate"),
    (onebit_adam, dict(freeze_step=10, axis_name=""), "axis_name"),
    (onebit_adam, dict(freeze_step=10, pack="yes"), "pack"),
    (onebit_adam, dict(freeze_step=10, bias_correction=None), "bias_correction"),
    (zero_one_adam, dict(var_freeze_step=-5), "var_freeze_step"),
    (zero_one_adam, dict(var_freeze_step=10, var_update_scaler=0), "var_update_scaler"),
    (zero_one_adam, dict(var_freeze_step=10, local_step_scaler=0), "local_step_scaler"),
    (zero_one_adam, dict(var_freeze_step=10, local_step_clipper=0), "local_step_clipper"),
    (onebit_lamb, dict(freeze_step=-1), "freeze_step"),
    (onebit_lamb, dict(freeze_step=10, min_coeff=0.0), "min_coeff"),
    (onebit_lamb, dict(freeze_step=10, max_coeff=0.001), "max_coeff"),
    (onebit_lamb, dict(freeze_step=10, coeff_beta=1.0), "coeff_beta"),
    (onebit_lamb, dict(freeze_step=10, factor_min=0.0), "factor_min"),
    (onebit_lamb, dict(freeze_step=10, factor_max=0.1), "factor_max"),
    (onebit_lamb, dict(freeze_step=10, factor_threshold=-0.1), "factor_threshold"),
])
def test_bad_arguments_are_config_errors_naming_the_argument(make, kwargs, name):
    kwargs = {"learning_rate": 1e-3, "axis_name": "data", **kwargs}
    with pytest.raises(ConfigError, match=rf"{make.__name__}: {name}="):
        make(**kwargs)


def test_init_outside_shard_map_and_wrong_error_buffers_are_config_errors(mesh):
    tx = onebit_adam(1e-3, freeze_step=10, axis_name="data")
    with pytest.raises(ConfigError, match="axis_name='data' is not a manual mesh axis"):
        tx.init({"w": jnp.zeros(4)})

    def bad(x):
        w, s = init_errors(x.size + 64, N)
        return compressed_allreduce(x[0], w[:-1], s, "data")[0][None]

    with pytest.raises(ConfigError, match="worker_error of shape"):
        shard(bad, mesh, P("data"), P("data"))(jnp.zeros((N, 64)))


# ------------------------------------------------------------------ under ZeRO's shards (reshard)


def run_sharded_steps(tx, params, axes, grads, mesh):
    """``run_steps`` for a resharded optimizer: the params split over ``data`` along ``axes``
    (-1: whole); every device's shards after every update are put back together."""
    specs = jax.tree.map(lambda a: P() if a < 0 else P(*(None,) * a, "data"), axes)

    def run(params, grads):
        def body(carry, g):
            params, state = carry
            updates, state = tx.update(first(g), state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), params

        return lax.scan(body, (params, tx.init(params)), grads)[1]

    out_specs = jax.tree.map(lambda a: P() if a < 0 else P(None, *(None,) * a, "data"), axes)
    f = jax.shard_map(run, mesh=mesh, in_specs=(specs, P(None, "data")), out_specs=out_specs, check_vma=False)
    return jax.jit(f)(params, grads)


def test_onebit_adam_on_zero_shards_equals_it_on_whole_params(mesh):
    """Where ZeRO's shards are the compressed all-reduce's chunks (split along axis 0, 64 values
    each), 1-bit Adam on shards (``reshard``) is 1-bit Adam on whole params, across the freeze,
    with weight decay and a leaf kept whole; a leaf split along another axis (padded to whole
    bytes per shard) trains to the same place within the compression's noise."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32)),
              "b": jnp.asarray(rng.normal(size=(5,)).astype(np.float32))}
    grads = random_grads(rng, params, steps=9)
    whole = onebit_adam(1e-2, weight_decay=0.01, freeze_step=4, axis_name="data")
    sharded = whole.reshard({"w": 0, "b": -1})
    want = run_steps(whole, params, grads, mesh)
    got = run_sharded_steps(sharded, params, {"w": 0, "b": -1}, grads, mesh)
    for name in ("w", "b"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name])[:, 0], rtol=2e-6, atol=2e-7,
                                   err_msg=name)
    # split along axis 1 (shards of 64 x 1: whole bytes) and a ragged leaf (3 x 16 over axis 1: 6 values a shard)
    params = {"w": jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32)),
              "r": jnp.asarray(rng.normal(size=(6, 8)).astype(np.float32))}
    grads = random_grads(rng, params, steps=40, scale=0.1)
    want = run_steps(onebit_adam(1e-2, freeze_step=4, axis_name="data"), params, grads, mesh)
    got = run_sharded_steps(whole.reshard({"w": 1, "r": 1}), params, {"w": 1, "r": 1}, grads, mesh)
    for name in ("w", "r"):
        moved = np.abs(np.asarray(want[name])[-1, 0] - np.asarray(params[name])).mean()
        apart = np.abs(np.asarray(got[name])[-1] - np.asarray(want[name])[-1, 0]).mean()
        assert apart < 0.25 * moved, (name, apart, moved)


def test_the_sharded_compressed_allreduce_keeps_the_error_feedback_identity(mesh):
    """result = mean_i x_i + mean_i (w_i - w_i') + (s - s') in the shard-rows layout, with ragged
    shards (16 x 13 split along axis 0: 26 values a shard, padded to 32 on its own)."""
    from zjax.train.onebit import _shard_rows, init_sharded_errors, sharded_compressed_allreduce, sharded_estimate

    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(N, 16, 13)).astype(np.float32))

    def once(x):
        w, s = init_sharded_errors((2, 13), N)
        w = w + 0.3  # nonzero starting buffers
        s = s - 0.2
        part, w2, s2, signs, scales = sharded_compressed_allreduce(x[0], w, s, "data", 0)
        whole = sharded_estimate(signs, scales, (2, 13), 0)
        return part[None], whole[None], w2[None], s2[None], w[None], s[None]

    part, whole, w2, s2, w, s = shard(once, mesh, P("data"), P("data"))(x)
    rows = lambda a: np.asarray(_shard_rows(a, 0, N)).reshape(-1)  # noqa: E731
    want = (np.mean([rows(xi) for xi in x], axis=0) + np.mean(np.asarray(w) - np.asarray(w2), axis=0)
            + (np.asarray(s) - np.asarray(s2)).reshape(-1))
    real = (np.arange(32) < 26)[None].repeat(N, 0).reshape(-1)  # each shard's 26 values, not its padding
    np.testing.assert_allclose(rows(np.asarray(whole[0]))[real], want[real], rtol=1e-5, atol=1e-5)
    for i in range(N):  # each device's part is its rows of the whole estimate, which every device rebuilds
        np.testing.assert_array_equal(np.asarray(part[i]), np.asarray(whole[0])[2 * i:2 * i + 2])
        np.testing.assert_array_equal(np.asarray(whole[i]), np.asarray(whole[0]))


def test_on_zero_shards_the_compressed_phase_sends_packed_signs(mesh):
    """The resharded 1-bit Adam's compressed update: the momentum goes as packed signs (u8
    all-to-all and all-gather) plus float32 scales, 1/32 of an fp32 all-reduce within 2% once the
    first compressed update's one float32 all-gather of the exact momentum (a branch taken once,
    at the freeze) is set aside."""
    params = {"w": jnp.zeros((512, 128), jnp.float32)}
    size = 512 * 128
    tx = onebit_adam(1e-3, freeze_step=10, axis_name="data").reshard({"w": 0})
    spec = {"w": P("data")}
    state = shard(lambda p: jax.tree.map(lambda x: x[None], tx.init(p)), mesh, (spec,), P("data"))(params)
    grads = {"w": jnp.zeros((N, 512, 128))}

    def step(params, state, grads):
        updates, state = tx.update(first(grads), first(state), params, compressed=True)
        return updates, jax.tree.map(lambda x: x[None], state)

    text = shard(step, mesh, (spec, P("data"), P("data")), (spec, P("data"))).lower(params, state, grads).compile() \
        .as_text()
    kinds = _collective_dtypes(text)
    assert not [k for k in kinds if k[0] in ("all-reduce", "reduce-scatter")], kinds
    once = [k for k in kinds if k[1] == {"f32"} and k[2] > 4 * N]
    assert [(k[0], k[2]) for k in once] == [("all-gather", 4 * size)], kinds  # the freeze's exact momentum
    steady = [k for k in kinds if k not in once]
    assert all(k[1] == {"u8"} for k in steady if k[2] > 4 * N), kinds
    packed = sum(k[2] * (N - 1) / N for k in steady)  # the all-to-all's and all-gather's results, ring bytes
    assert abs(packed / (2 * 4 * size * (N - 1) / N) * 32 - 1) < 0.02


def test_onebit_lamb_on_zero_shards_equals_it_on_whole_params(mesh):
    """1-bit LAMB resharded: where ZeRO's shards are the fused buffer's chunks (one leaf split
    along axis 0, 64 values a shard) it is 1-bit LAMB on whole params across the freeze, up to the
    order of the norms' sums; with a leaf split along axis 1 and a leaf kept whole it trains to
    the same place within the compression's noise."""
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32))}
    grads = random_grads(rng, params, steps=10)
    whole = onebit_lamb(1e-2, weight_decay=0.01, freeze_step=4, axis_name="data")
    want = run_steps(whole, params, grads, mesh)
    got = run_sharded_steps(whole.reshard({"w": 0}), params, {"w": 0}, grads, mesh)
    np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"])[:, 0], rtol=1e-5, atol=1e-6)
    params = {"w": jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32)),
              "b": jnp.asarray(rng.normal(size=(5,)).astype(np.float32))}
    grads = random_grads(rng, params, steps=40, scale=0.1)
    want = run_steps(onebit_lamb(1e-2, freeze_step=4, axis_name="data"), params, grads, mesh)
    got = run_sharded_steps(whole.reshard({"w": 1, "b": -1}), params, {"w": 1, "b": -1}, grads, mesh)
    for name in ("w", "b"):
        moved = np.abs(np.asarray(want[name])[-1, 0] - np.asarray(params[name])).mean()
        apart = np.abs(np.asarray(got[name])[-1] - np.asarray(want[name])[-1, 0]).mean()
        assert apart < 0.25 * moved, (name, apart, moved)
