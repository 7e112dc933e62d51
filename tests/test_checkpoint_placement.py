"""Checkpoints keep ZeRO's placement: saving and restoring never gather a parameter whole,
a fresh TrainStep restores from the checkpoint's shapes alone, and any tree (one bare
array included) moves between stages and device counts bit-exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import third_party_models as tpm
import zjax
from zjax.checkpoint import Checkpointer, to_portable

HERE = Path(__file__).resolve().parent


def _measure():
    """Prints one JSON line per (model, stage): per-device state bytes and the temp bytes of the
    compiled save and restore programs (lowered on abstract states: nothing is initialized);
    then saves and restores a bare array (for Orbax's warning)."""
    import tempfile

    from gpt_helpers import tiny_config
    from zjax import checkpoint
    from zjax.models import gpt_loss, make_gpt

    for model in ("gpt", "nnx_loop"):
        for stage in range(4):
            if model == "gpt":
                cfg = tiny_config(f"zero.stage={stage}")
                train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, seed=0))
            else:
                train = zjax.make_train_step(tpm.zero_config(stage), tpm.nnx_loop_loss, model=tpm.init_nnx_loop(),
                                             optimizer=optax.adam(1e-3))
            train.prepare()
            state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                 train.abstract_state, train.state_sharding)
            save = checkpoint.save_program(state).lower(state).compile()
            restore = checkpoint.restore_program(train).lower(checkpoint.portable_target(train)).compile()
            print(json.dumps({"model": model, "stage": stage, "state": _per_device_bytes(state),
                              "save_temp": save.memory_analysis().temp_size_in_bytes,
                              "restore_temp": restore.memory_analysis().temp_size_in_bytes}), flush=True)
    train, state = tpm.train_step("single_array", 3, optax.adam(1e-3))
    directory = tempfile.mkdtemp()
    ckpt = Checkpointer(directory)
    ckpt.save(1, state)
    ckpt.wait()
    Checkpointer(directory).restore(train)


def _per_device_bytes(abstract_state) -> int:
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree.leaves(abstract_state) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


@pytest.fixture(scope="module")
def measured():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                         cwd=HERE.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")], out.stderr


def test_save_and_restore_programs_hold_no_whole_parameter(measured):
    rows, _ = measured
    assert len(rows) == 8
    for row in rows:
        assert row["save_temp"] < 0.25 * row["state"], row
        assert row["restore_temp"] < 0.25 * row["state"], row


def test_xla_rematerializes_nothing_and_orbax_metadata_warning_is_hidden(measured):
    _, stderr = measured
    assert "Involuntary full rematerialization" not in stderr
    assert "Metadata file does not exist" not in stderr


def _host(tree):
    return jax.device_get(tree)


def _identical(a, b):
    return jax.tree.all(jax.tree.map(np.array_equal, a, b))


def _saved(directory, train, state, batches):
    for batch in batches:
        state, _ = train(state, batch)
    ckpt = Checkpointer(directory)
    ckpt.save(1, state)
    ckpt.wait()
    return _host(to_portable(state))


MLP_AXES = {"w1": (None, "mlp"), "b1": ("mlp",), "w2": ("mlp", None), "b2": (None,)}


@pytest.mark.parametrize("kind", ["nnx_module", "linen_params", "plain_with_logical_axes"])
def test_fresh_train_step_restores_from_the_checkpoint_shapes(tmp_path, kind):
    model = {"nnx_module": "nnx_loop", "linen_params": "linen_scan", "plain_with_logical_axes": "plain_mlp"}[kind]
    init, loss_fn, _ = tpm.MODELS[model]
    train, state = tpm.train_step(model, 1, optax.adam(1e-3))
    saved = _saved(tmp_path, train, state, [])
    given = init()
    cfg = tpm.zero_config(0)
    devices = jax.devices()[:4]
    if kind == "nnx_module":
        fresh = zjax.make_train_step(cfg, loss_fn, model=given, optimizer=optax.adam(1e-3), devices=devices)
    elif kind == "linen_params":
        fresh = zjax.make_train_step(cfg, loss_fn, optimizer=optax.adam(1e-3), devices=devices)
    else:
        fresh = zjax.make_train_step(cfg, loss_fn, optimizer=optax.adam(1e-3), logical_axes=MLP_AXES,
                                     devices=devices)
    restored, _ = Checkpointer(tmp_path).restore(fresh)  # no init: the checkpoint gives the shapes
    again = _host(to_portable(restored))
    assert _identical(again["params"], saved["params"])
    assert _identical(again["opt_state"], saved["opt_state"])
    assert int(restored.step) == 0


def test_single_array_moves_between_stages_and_device_counts_bit_exactly(tmp_path):
    batches = tpm.classification_batches(3)
    train3, state = tpm.train_step("single_array", 3, optax.adam(1e-3))
    saved = _saved(tmp_path / "a", train3, state, batches[:2])
    cfg = tpm.zero_config(1)
    train1 = zjax.make_train_step(cfg, tpm.single_loss, optimizer=optax.adam(1e-3), devices=jax.devices()[:4])
    on_four, _ = Checkpointer(tmp_path / "a").restore(train1)
    assert on_four.master is None and on_four.opt_state[0].mu.sharding.mesh.size == 4
    assert _identical(_host(to_portable(on_four)), saved)
    back = _saved(tmp_path / "b", train1, on_four, [])
    fresh3 = zjax.make_train_step(tpm.zero_config(3), tpm.single_loss, optimizer=optax.adam(1e-3))
    on_eight, _ = Checkpointer(tmp_path / "b").restore(fresh3)
    assert _identical(_host(to_portable(on_eight)), back)
    assert _identical(back, saved)
    _, m8 = train3(on_eight, batches[2])
    _, m4 = train1(on_four, batches[2])
    assert float(m8["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _measure()
