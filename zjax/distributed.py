"""Starting JAX's distributed runtime from the environment, and local multi-process runs.

``initialize()`` joins this process to the others of its job before any device is
touched. It reads, in order:

1. explicit arguments, or ``ZJAX_COORDINATOR_ADDRESS`` (``host:port``),
   ``ZJAX_NUM_PROCESSES`` and ``ZJAX_PROCESS_ID``, all three together;
2. SLURM (``SLURM_JOB_ID`` with more than one task): JAX's own SLURM detection, which
   needs the job step's variables, so the processes must be started by ``srun``;
3. a Cloud TPU VM: JAX's TPU detection (worker list and ids from the TPU metadata);
4. otherwise nothing: a single process.

``launch_local(argv, processes)`` runs one command as ``processes`` local processes
joined on 127.0.0.1, splitting the simulated CPU devices between them; if one of them
fails, the others are stopped within ``grace_s`` and the launcher reports which one
failed, so a run never hangs on a dead peer.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from zjax.errors import ConfigError

ADDRESS_VAR, COUNT_VAR, ID_VAR = "ZJAX_COORDINATOR_ADDRESS", "ZJAX_NUM_PROCESSES", "ZJAX_PROCESS_ID"
HEARTBEAT_VAR = "ZJAX_HEARTBEAT_TIMEOUT"
# SLURM variables JAX's SlurmCluster reads; present inside an ``srun`` job step.
SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# XLA's flag for simulated CPU devices, and how many zjax simulates unless it is set.
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
SIMULATED_CPU_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: its id, the process count and how that was found."""

    process_id: int
    num_processes: int
    method: str  # "explicit", "env", "slurm", "tpu", "single" or "already"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, environ=None, initialization_timeout: int = 300,
               heartbeat_timeout_seconds: int | None = None) -> ProcessInfo:
    """Joins the job's processes through ``jax.distributed.initialize``; a no-op for one process.

    Call it before anything creates a device (``zjax train`` does).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator; with
        ``num_processes`` and ``process_id`` it overrides the environment.
      num_processes: the number of processes in the job.
      process_id: this process's id, ``0 <= process_id < num_processes``.
      environ: the environment to read (default ``os.environ``).
      initialization_timeout: seconds to wait for every process to join.
      heartbeat_timeout_seconds: after this long without a heartbeat from a peer the
        job is torn down instead of hanging (default ``ZJAX_HEARTBEAT_TIMEOUT`` or 100).

    Returns:
      A ``ProcessInfo``.

    Raises:
      ConfigError: a variable or argument is missing or malformed; the message names it.
    """
    import jax

    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return ProcessInfo(jax.process_index(), jax.process_count(), "already")
    heartbeat = heartbeat_timeout_seconds or _int_var(HEARTBEAT_VAR, env.get(HEARTBEAT_VAR, "100"), low=1)
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        method = "explicit"
        address, count, pid = _check_explicit(*explicit)
    elif any(var in env for var in (ADDRESS_VAR, COUNT_VAR, ID_VAR)):
        method = "env"
        address, count, pid = _from_zjax_env(env)
    elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        missing = [v for v in SLURM_STEP_VARS if v not in env]
        if missing:
            raise ConfigError(
                f"SLURM job {env['SLURM_JOB_ID']} has {env.get('SLURM_NTASKS')} tasks but {', '.join(missing)} "
                "is not set: start each process with srun inside the allocation (see examples/gpu_cluster)"
            )
        jax.distributed.initialize(initialization_timeout=initialization_timeout,
                                   heartbeat_timeout_seconds=heartbeat)
        return ProcessInfo(jax.process_index(), jax.process_count(), "slurm")
    elif _on_cloud_tpu_vm():
        jax.distributed.initialize(initialization_timeout=initialization_timeout,
                                   heartbeat_timeout_seconds=heartbeat)
        return ProcessInfo(jax.process_index(), jax.process_count(), "tpu")
    else:
        return ProcessInfo(0, 1, "single")
    if count == 1:
        return ProcessInfo(0, 1, method)
    jax.distributed.initialize(address, count, pid, initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat)
    return ProcessInfo(pid, count, method)


def _check_explicit(address, count, pid) -> tuple[str, int, int]:
    names = ("coordinator_address", "num_processes", "process_id")
    missing = [n for n, v in zip(names, (address, count, pid)) if v is None]
    if missing:
        raise ConfigError(f"initialize() got {', '.join(n for n in names if n not in missing)} but not "
                          f"{', '.join(missing)}; pass all three, or none to read the environment")
    return _validated(address, count, pid, names)


def _from_zjax_env(env) -> tuple[str, int, int]:
    names = (ADDRESS_VAR, COUNT_VAR, ID_VAR)
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} is not set while {', '.join(n for n in names if n not in missing)} "
                          f"is; set {', '.join(names)} together")
    return _validated(env[ADDRESS_VAR], env[COUNT_VAR], env[ID_VAR], names)


def _validated(address, count, pid, names) -> tuple[str, int, int]:
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{names[0]}={address!r} is not host:port; use e.g. 10.0.0.2:1234 or 127.0.0.1:8476")
    count = _int_var(names[1], count, low=1)
    pid = _int_var(names[2], pid, low=0)
    if pid >= count:
        raise ConfigError(f"{names[2]}={pid} is out of range for {names[1]}={count}; use 0..{count - 1}")
    return str(address), count, pid


def _int_var(name: str, value, low: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not an integer; use an integer >= {low}") from None
    if number < low:
        raise ConfigError(f"{name}={number} is below {low}; use an integer >= {low}")
    return number


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (TPU chips on the PCI bus, as JAX's own TPU detection checks)."""
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        return False
    return bool(running_in_cloud_tpu_vm)


# -- local multi-process runs -------------------------------------------------------------


def launch_local(argv: list[str], processes: int, *, devices: int | None = None, grace_s: float = 10.0,
                 heartbeat_timeout_s: int = 15, environ=None, out=None) -> int:
    """Runs ``python -m zjax *argv`` as ``processes`` processes joined on 127.0.0.1.

    Each process gets ``devices / processes`` simulated CPU devices and the
    ``ZJAX_*`` variables that ``initialize`` reads. Their output is forwarded line by
    line with a ``[pN]`` prefix. When one process exits with an error, the others get
    SIGTERM, then SIGKILL after ``grace_s``; SIGTERM or SIGINT to the launcher is
    forwarded to every process (each saves a checkpoint at the same step and exits).

    Args:
      argv: the ``zjax`` command line to run in every process (e.g. ``["train", cfg]``).
      processes: how many processes.
      devices: simulated devices in all (default: the count in ``XLA_FLAGS``, else ``SIMULATED_CPU_DEVICES``).
      grace_s: seconds the others get to exit after one failed.
      heartbeat_timeout_s: the processes' own timeout for a silent peer.
      environ: the base environment (default ``os.environ``).
      out: where forwarded lines go (default ``sys.stdout``).

    Returns:
      0 when every process exited with 0, else 1 (the failure is described on ``out``).
    """
    env = dict(os.environ if environ is None else environ)
    out = sys.stdout if out is None else out
    total = devices if devices is not None else _flag_device_count(env.get("XLA_FLAGS", "")) or SIMULATED_CPU_DEVICES
    if processes < 1:
        raise ConfigError(f"--local-processes={processes}: use 1 or more processes")
    if total % processes:
        raise ConfigError(f"--local-processes={processes} does not divide the {total} simulated devices; "
                          f"use a divisor of {total} (or set {DEVICE_COUNT_FLAG} in XLA_FLAGS)")
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG))
    env.update({
        "XLA_FLAGS": f"{flags} {DEVICE_COUNT_FLAG}={total // processes}".strip(),
        "JAX_PLATFORMS": "cpu",
        ADDRESS_VAR: f"127.0.0.1:{free_local_port()}",
        COUNT_VAR: str(processes),
        HEARTBEAT_VAR: str(heartbeat_timeout_s),
        "PYTHONUNBUFFERED": "1",
        # Forwarded through a pipe, every progress-bar refresh becomes a line: refresh rarely.
        "TQDM_MININTERVAL": "10",
    })
    lock = threading.Lock()
    procs = []
    for i in range(processes):
        proc = subprocess.Popen([sys.executable, "-m", "zjax", *argv], env={**env, ID_VAR: str(i)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs.append(proc)
        threading.Thread(target=_forward, args=(proc.stdout, f"[p{i}] ", out, lock), daemon=True).start()
    with lock:
        print(f"started {processes} processes ({total // processes} CPU devices each): "
              f"pids {' '.join(str(p.pid) for p in procs)}", file=out, flush=True)

    def forward_signal(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(procs, grace_s, out, lock)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _supervise(procs, grace_s: float, out, lock, finish_timeout_s: float = 120.0) -> int:
    """Waits for every process; on the first failure stops the rest and names the culprit.

    A process still running ``finish_timeout_s`` after another finished cleanly is
    stuck (its peers are gone, so its collectives cannot complete): it is stopped too.
    """
    first_done = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return 0
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            first, why = failed[0], f"exited with {_describe(codes[failed[0]])}"
            break
        if first_done is None and 0 in codes:
            first_done = (codes.index(0), time.monotonic())
        if first_done is not None and time.monotonic() - first_done[1] > finish_timeout_s:
            first = next(i for i, c in enumerate(codes) if c is None)
            why = f"was still running {finish_timeout_s:g} s after process {first_done[0]} finished"
            break
        time.sleep(0.1)
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.poll() is None:
            p.terminate()
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = [i for i, p in enumerate(procs) if p.poll() is None]
    for i in killed:
        procs[i].kill()
    for p in procs:
        p.wait()
    with lock:
        print(f"error: process {first} of {len(procs)} {why}; stopped the others"
              + (f" (killed {killed} after {grace_s:g} s)" if killed else "")
              + "; a rerun with the same output_dir resumes from the newest intact checkpoint",
              file=out, flush=True)
    return 1


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def _forward(stream, prefix: str, out, lock) -> None:
    for line in stream:
        with lock:
            out.write(prefix + line)
            out.flush()


def _flag_device_count(flags: str) -> int | None:
    for flag in flags.split():
        if flag.startswith(DEVICE_COUNT_FLAG + "="):
            return int(flag.split("=", 1)[1])
    return None


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
