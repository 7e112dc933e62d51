"""``zjax report``: what this installation can do, like DeepSpeed's ``ds_report``.

Versions, the backend, the devices and their memory, which ``pallas_kernels`` run as
Pallas under ``impl="auto"`` and which fall back to XLA, and whether multi-process
collectives (``jax.distributed``) are initialized.
"""
from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("zjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def report() -> dict:
    """The report as a dict: ``versions``, ``backend``, ``devices``, ``kernels``, ``distributed``.

    Example:
      >>> report()["backend"] in ("cpu", "gpu", "tpu")
      True
    """
    import jax

    from pallas_kernels.dispatch import backend

    devices = jax.devices()
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "backend": backend(),
        "devices": [
            {"id": d.id, "kind": d.device_kind, "process": d.process_index, "memory_bytes": _memory(d)}
            for d in devices
        ],
        "process_count": jax.process_count(),
        "kernels": kernel_support(),
        "distributed": _distributed(),
    }


def kernel_support() -> dict[str, str]:
    """Per Pallas kernel: ``"pallas"``, or ``"xla (why)"`` for what ``impl="auto"`` falls back to."""
    from pallas_kernels import dispatch

    here = dispatch.backend()
    out = {}
    for kernel in dispatch.KERNEL_BACKENDS:
        if (kernel, here) in dispatch.AUTO_PREFERS_XLA:
            out[kernel] = f"xla (the Pallas kernel ran {dispatch.AUTO_PREFERS_XLA[kernel, here]})"
        elif here in dispatch.KERNEL_BACKENDS[kernel]:
            out[kernel] = "pallas (shapes it cannot serve fall back to xla)"
        else:
            out[kernel] = f"xla (no Pallas kernel for backend {here!r})"
    return out


def format_report(r: dict) -> str:
    """The report as text."""
    lines = ["versions:"]
    lines += [f"  {name:<18}{version}" for name, version in r["versions"].items()]
    lines.append(f"backend: {r['backend']}")
    kinds: dict[str, int] = {}
    for d in r["devices"]:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    lines.append(f"devices: {len(r['devices'])} ({', '.join(f'{n} x {k}' for k, n in kinds.items())}), "
                 f"{r['process_count']} process(es)")
    for d in r["devices"]:
        memory = "unknown" if d["memory_bytes"] is None else f"{d['memory_bytes'] / 1e9:.1f} GB"
        lines.append(f"  device {d['id']}: {d['kind']}, process {d['process']}, memory {memory}")
    lines.append("kernels under impl='auto':")
    lines += [f"  {name:<22}{how}" for name, how in r["kernels"].items()]
    lines.append(f"multi-process (jax.distributed): {r['distributed']}")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _memory(device) -> int | None:
    """The device's memory limit; None where the backend does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None
    return None if not stats else stats.get("bytes_limit")


def _distributed() -> str:
    import jax

    initialized = jax.distributed.is_initialized()
    if initialized:
        return f"initialized, {jax.process_count()} processes"
    return "available, not initialized (call jax.distributed.initialize to run multi-host)"
