"""Checkpoints: restore onto other meshes and stages bit-exactly, detect damage, refuse other models."""
import logging
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import zjax
from gpt_helpers import token_batches
from zjax.checkpoint import CheckpointError, Checkpointer, load_params, to_portable
from zjax.models import gpt_loss, make_gpt


def make(stage, n_devices=8, *extra):
    cfg = zjax.load_config("configs/tiny.yaml", [f"zero.stage={stage}", *extra])
    return zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model), devices=jax.devices()[:n_devices])


def host(tree):
    return jax.device_get(tree)


def identical(a, b):
    return jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three steps of ZeRO-3 on 8 devices saved at steps 1, 2 and 3; the state after step 3."""
    directory = tmp_path_factory.mktemp("ckpt")
    train = make(3)
    state = train.init()
    batches = token_batches(4, 16, 32)
    ckpt = Checkpointer(directory, keep=3)
    for k in range(3):
        state, _ = train(state, batches[k])
        ckpt.save(k + 1, state, extra={"data_step": k + 1})
    ckpt.wait()
    portable = host(to_portable(state))
    _, metrics = train(state, batches[3])
    return directory, portable, float(metrics["loss"]), batches[3]


@pytest.mark.parametrize("stage,n_devices", [(1, 4), (0, 2), (3, 8)])
def test_restore_onto_other_devices_and_stage_is_bit_exact(saved, stage, n_devices):
    directory, portable, next_loss, next_batch = saved
    train = make(stage, n_devices)
    state, extra = Checkpointer(directory).restore(train)
    assert extra == {"data_step": 3}
    again = host(to_portable(state))
    assert identical(again["params"], portable["params"])
    assert identical(again["opt_state"], portable["opt_state"])
    assert int(state.step) == 3
    _, metrics = train(state, next_batch)
    assert float(metrics["loss"]) == pytest.approx(next_loss, rel=1e-5)


def test_restore_into_bf16_keeps_fp32_master(saved):
    directory, portable, _, _ = saved
    train = make(1, 8, "precision.compute_dtype=bfloat16")
    state, _ = Checkpointer(directory).restore(train)
    assert identical(host(state.params), portable["params"])
    assert jax.tree.leaves(state.replicated)[0].dtype == jax.numpy.bfloat16


def test_load_params_gives_host_numpy(saved):
    directory, portable, _, _ = saved
    params = load_params(directory)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    assert identical(params, portable["params"])


def test_mismatched_model_names_the_parameter(saved):
    directory = saved[0]
    train = make(3, 8, "model.d_ff=192")
    with pytest.raises(CheckpointError, match=r"\['blocks'\]\['mlp'\]\['w_down'\]|\['blocks'\]\['mlp'\]\['w_gate'\]"):
        Checkpointer(directory).restore(train)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _data_files(step_dir: Path):
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p))


DAMAGE = {
    "truncated data file": lambda d: _data_files(d)[0].write_bytes(_data_files(d)[0].read_bytes()[:-7]),
    "missing data file": lambda d: _data_files(d)[0].unlink(),
    "missing manifest": lambda d: (d / "zjax_manifest.json").unlink(),
    "garbage metadata": lambda d: (d / "state" / "_METADATA").write_text("{garbage"),
    "garbage manifest": lambda d: (d / "zjax_manifest.json").write_text("not json"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_latest_step_falls_back_to_previous(saved, tmp_path, caplog, kind):
    directory = _copy_tree(saved[0], tmp_path / "ckpt")
    DAMAGE[kind](directory / "3")
    ckpt = Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="zjax"):
        assert ckpt.latest_step() == 2
    assert "step 3" in caplog.text
    state, extra = ckpt.restore(make(3))
    assert extra == {"data_step": 2} and int(state.step) == 2


def _flip_a_byte(step_dir: Path) -> None:
    data = max(_data_files(step_dir), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


RESAVED_DAMAGE = {
    "flipped byte": _flip_a_byte,
    "truncated data file": DAMAGE["truncated data file"],
    "missing data file": DAMAGE["missing data file"],
}


@pytest.mark.parametrize("kind", sorted(RESAVED_DAMAGE))
def test_damaged_step_is_moved_aside_before_it_is_saved_again(saved, tmp_path, caplog, kind):
    directory, portable = _copy_tree(saved[0], tmp_path / "ckpt"), saved[1]
    RESAVED_DAMAGE[kind](directory / "3")
    train = make(3)
    ckpt = Checkpointer(directory, keep=3)
    state, _ = ckpt.restore(train)
    batches = token_batches(4, 16, 32)
    with caplog.at_level(logging.WARNING, logger="zjax"):
        for k in (2, 3):  # steps 3 and 4: the resumed run reaches the damaged step and runs past it
            state, _ = train(state, batches[k])
            ckpt.save(k + 1, state, extra={"data_step": k + 1})
        ckpt.wait()
    assert Checkpointer(directory).latest_step() == 4
    again = host(to_portable(Checkpointer(directory).restore(train, step=3)[0]))
    assert identical(again["params"], portable["params"])
    assert identical(again["opt_state"], portable["opt_state"])
    assert sorted(os.listdir(directory)) == ["2", "3", "3.damaged-1", "4"]
    assert "moved aside to 3.damaged-1" in caplog.text


def test_saving_below_an_intact_step_is_refused(saved, tmp_path):
    directory = _copy_tree(saved[0], tmp_path / "ckpt")
    train = make(3)
    ckpt = Checkpointer(directory)
    state, _ = ckpt.restore(train, step=2)
    with pytest.raises(CheckpointError, match="intact step 3 is already there"):
        ckpt.save(3, state)


def test_a_step_that_never_existed_is_named_with_the_steps_that_do(saved):
    with pytest.raises(CheckpointError, match=r"step 99 does not exist in .*; steps there: 1, 2, 3"):
        load_params(saved[0], 99)


def test_no_intact_step_names_the_directory(saved, tmp_path):
    directory = _copy_tree(saved[0], tmp_path / "ckpt")
    for step in ("1", "2", "3"):
        (directory / step / "zjax_manifest.json").unlink()
    with pytest.raises(CheckpointError, match=str(directory)):
        Checkpointer(directory).restore(make(3))


def test_keep_deletes_old_steps_only_after_a_newer_commit(tmp_path):
    train = make(2)
    state = train.init()
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, state)
        if step > 1:  # saving step k first commits k-1; the newest commit is never deleted
            assert step - 1 in ckpt.committed_steps()
    ckpt.wait()
    assert ckpt.committed_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_safetensors_export_round_trip_is_bit_exact(saved, tmp_path):
    from safetensors.numpy import load_file

    from zjax.cli import main
    from zjax.export import load_safetensors

    directory, portable = saved[0], saved[1]
    out = tmp_path / "model.safetensors"
    main(["export", str(directory), "--to", str(out)])
    assert "blocks.attn.wq" in load_file(str(out))
    assert identical(load_safetensors(out), portable["params"])
    train = make(2)
    state = train.init(str(out))
    assert identical(host(state.params), portable["params"])
