"""A regular (non-editable) install works from any directory.

The wheel is built from a copy of the package sources, installed with
``pip install --no-deps --target``, and the ``zjax`` commands run from an empty
directory with only that install on ``PYTHONPATH``. The checkout's editable install
stays in the venv, so the test first proves that ``import zjax`` resolves to the wheel.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zjax", "pallas_kernels")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, elsewhere, env)``: the wheel installed into ``site``, an empty cwd, and the env to run in."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheel = build_wheel(src, tmp / "dist")
    site = tmp / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)])
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    return wheel, site, elsewhere, env


def build_wheel(src: Path, out: Path) -> Path:
    """The wheel pip builds from ``src``: without build isolation when this venv can build one offline."""
    can_build_here = importlib.util.find_spec("wheel") is not None or (
        importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    )
    isolation = ["--no-build-isolation"] if can_build_here else []
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(src)], cwd=src)
    (wheel,) = out.glob("zjax-*.whl")
    return wheel


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def test_wheel_holds_every_module_and_the_defaults(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    assert sources - names == set()
    assert "zjax/base.yaml" in names
    assert "pallas_kernels/attention.py" in names


def test_import_resolves_to_the_installed_wheel_not_the_checkout(installed):
    _, site, elsewhere, env = installed
    probe = (
        "import json, importlib.metadata as m, zjax, pallas_kernels, zjax.cli; "
        "print(json.dumps([zjax.__file__, pallas_kernels.__file__, str(zjax.cli.DEFAULT_CONFIG), "
        "str(m.distribution('zjax').locate_file('zjax/base.yaml'))]))"
    )
    paths = json.loads(run([sys.executable, "-c", probe], cwd=elsewhere, env=env).stdout)
    for path in paths:
        assert Path(path).resolve().is_relative_to(site.resolve()), (path, site)
    assert Path(paths[2]).is_file()
    # The console script runs the same interpreter, so it imports the same files.
    assert (site / "bin" / "zjax").read_text().splitlines()[0] == f"#!{sys.executable}"


def zjax(installed, *args: str) -> str:
    _, site, elsewhere, env = installed
    return run([str(site / "bin" / "zjax"), *args], cwd=elsewhere, env=env).stdout


def test_config_explain_from_another_directory(installed):
    ds_config = installed[2] / "ds_config.json"
    ds_config.write_text(json.dumps({
        "train_batch_size": 16,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
    }))
    out = zjax(installed, "config", "explain", str(ds_config))
    assert "stage: 2" in out
    assert "compute_dtype: bfloat16" in out


def test_plan_from_another_directory_reads_the_packaged_defaults(installed):
    out = zjax(installed, "plan", "--params", "1e9", "--devices", "8", "--json")
    stages = json.loads(out)["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2, 3]
    # The ZeRO paper's stage 0: 16 bytes per parameter.
    assert stages[0]["paper"]["total"] == pytest.approx(16e9)


def test_report_from_another_directory(installed):
    out = zjax(installed, "report")
    assert "zjax              0.1.0" in out
    assert "flash_attention" in out
