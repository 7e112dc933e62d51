"""``zjax export`` refuses a bad ``--to`` or ``--step`` with a clear error and leaves nothing behind."""
import os

import pytest

from zjax.cli import main


def export_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["export", *args])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def steps(tmp_path):
    """A checkpoint directory holding steps 2 and 5 (their contents are never read here)."""
    for step in ("2", "5"):
        (tmp_path / "ckpt" / step).mkdir(parents=True)
    return tmp_path / "ckpt"


def test_to_an_existing_directory_is_refused_and_leaves_nothing(tmp_path, capsys, steps):
    (tmp_path / "out").mkdir()
    err = export_error(capsys, str(steps), "--to", str(tmp_path / "out"))
    assert "is an existing directory" in err and "out/model.safetensors" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out"] and os.listdir(tmp_path / "out") == []


def test_to_a_missing_directory_is_refused(tmp_path, capsys, steps):
    err = export_error(capsys, str(steps), "--to", str(tmp_path / "nowhere" / "model.safetensors"))
    assert f"directory '{tmp_path / 'nowhere'}' does not exist" in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_step_that_never_existed_lists_the_steps_that_do(tmp_path, capsys, steps):
    err = export_error(capsys, str(steps), "--to", str(tmp_path / "m.safetensors"), "--step", "99")
    assert "step 99 does not exist" in err and "steps there: 2, 5" in err
    assert "damaged" not in err
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
