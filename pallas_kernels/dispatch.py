"""Choosing how a kernel runs (``impl``) and running it once per batch shard.

Every kernel takes ``impl``:

- ``"pallas"``: the Pallas kernel compiled for the real backend: the Triton-style
  kernels here on GPU; on TPU, ``flash_attention`` uses the upstream Mosaic kernel
  (``jax.experimental.pallas.ops.tpu.flash_attention``) and the other kernels have no
  TPU kernel. On a backend the kernel has no lowering for, or a shape it cannot serve,
  it raises.
- ``"interpret"``: the same kernel in Pallas interpret mode; runs anywhere (CPU tests).
- ``"xla"``: a plain ``jax.numpy`` reference.
- ``"auto"``: ``"pallas"`` where the backend and shape are supported and the kernel was
  not measured slower than XLA on that backend (``AUTO_PREFERS_XLA``), ``"xla"``
  otherwise; the fallback is logged once per kernel and reason on ``logging.getLogger("zjax")``.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "pallas", "interpret", "xla")

# The kernels here are written against the generic (Triton-style) Pallas model; none has
# been lowered for Mosaic, so on TPU they take the XLA path under "auto". Only flash
# attention has a TPU kernel: the upstream Mosaic one.
PALLAS_BACKENDS = ("gpu",)
KERNEL_BACKENDS = {
    "flash_attention": ("gpu", "tpu"),
    "rms_norm": PALLAS_BACKENDS,
    "layer_norm": PALLAS_BACKENDS,
    "swiglu": PALLAS_BACKENDS,
    "geglu": PALLAS_BACKENDS,
    "softmax_cross_entropy": PALLAS_BACKENDS,
    "unscale_and_check": PALLAS_BACKENDS,
}

# Kernels that ``impl="auto"`` leaves to XLA on a backend where they compile, because they
# ran slower than XLA there (fwd+bwd, `make gpu-check` on an H200; benchmarks/RESULTS-gpu.md).
AUTO_PREFERS_XLA = {
    ("rms_norm", "gpu"): "7.4x slower than XLA's fused norm on an H200",
    ("layer_norm", "gpu"): "5.1x slower than XLA's fused norm on an H200",
    ("unscale_and_check", "gpu"): "3.0x slower than XLA's fused multiply and check on an H200",
    ("softmax_cross_entropy", "gpu"): "2.2x slower than the chunked XLA loop on an H200",
}

logger = logging.getLogger("zjax")
_logged: set[tuple[str, str]] = set()


def backend() -> str:
    """The default backend as ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


def resolve_impl(kernel: str, impl: str, unsupported: str | None = None) -> str:
    """The implementation ``kernel`` runs with: ``"pallas"``, ``"interpret"`` or ``"xla"``.

    ``"pallas"`` means the kernel for the default backend (``backend()``); the caller
    picks between its GPU and TPU kernels where it has both.

    Args:
      kernel: the public kernel's name, used in errors and log lines.
      impl: what the caller asked for, one of ``IMPLS``.
      unsupported: why the real Pallas kernel for the default backend cannot serve
        this call's shapes, or None.

    Raises:
      ValueError: for an unknown ``impl``, or ``"pallas"`` where it cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{kernel}: impl={impl!r} is not an implementation; use one of {IMPLS}")
    here = backend()
    backends = KERNEL_BACKENDS.get(kernel, PALLAS_BACKENDS)
    if impl == "pallas":
        if here not in backends:
            raise ValueError(
                f"{kernel}: impl='pallas' needs a backend in {backends}, but the "
                f"default backend is {here!r}; use impl='interpret' (the same kernel in "
                "Pallas interpret mode) or impl='xla'")
        if unsupported:
            raise ValueError(f"{kernel}: impl='pallas' cannot serve this call: {unsupported}; "
                             "use impl='xla' or impl='auto'")
    if impl == "auto":
        reason = (f"no Pallas kernel for backend {here!r}" if here not in backends
                  else AUTO_PREFERS_XLA.get((kernel, here), unsupported))
        if reason is None:
            return "pallas"
        if (kernel, reason) not in _logged:
            _logged.add((kernel, reason))
            logger.info("%s: impl='auto' uses the XLA reference (%s)", kernel, reason)
        return "xla"
    return impl


def shard_over_batch(fn: Callable, mesh: Mesh, axis: str | Sequence[str] = "data", *,
                     batched: Sequence[bool]) -> Callable:
    """``fn`` run once per shard of the batch axis, so a kernel never gathers its inputs.

    A Pallas call inside ``jit`` on sharded inputs would all-gather them and run
    replicated; under ``shard_map`` each device runs the kernel on its own rows.

    Args:
      fn: a kernel call with only positional array arguments (bind the rest with
        ``functools.partial``); its outputs are batched along their leading axis.
      mesh: the device mesh.
      axis: the mesh axis (or axes) the leading (batch) dimension is sharded over.
      batched: per positional argument, whether its leading axis is the batch
        (``True``) or it is replicated, like a norm's scale (``False``).

    Returns:
      A function with ``fn``'s signature.

    Example:
      >>> import jax, numpy as np, jax.numpy as jnp
      >>> from pallas_kernels import rms_norm
      >>> mesh = jax.make_mesh((len(jax.devices()),), ("data",),
      ...     axis_types=(jax.sharding.AxisType.Auto,))
      >>> norm = shard_over_batch(functools.partial(rms_norm, impl="xla"), mesh,
      ...     batched=(True, False))
      >>> norm(jnp.ones((len(jax.devices()) * 2, 4, 8)), jnp.ones(8)).shape[1:]
      (4, 8)
    """
    specs = tuple(P(axis) if b else P() for b in batched)
    # check_vma=False: interpret-mode Pallas calls carry no varying-axes annotations.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(axis), check_vma=False)


# What a Triton-style kernel's dot takes: these dtypes, and blocks that are powers of two
# of at least MIN_BLOCK on every side.
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MIN_BLOCK = 16
# The score of a masked position: finite, so that exp(MASKED - lse) is 0, never nan.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def block_size(limit: int, n: int) -> int:
    """A block side for a dimension of ``n``: ``n`` rounded up to a power of two, at least
    ``MIN_BLOCK`` and at most ``limit``."""
    return min(limit, max(MIN_BLOCK, pl.next_power_of_2(n)))


# A Triton program on Ampere and Hopper gets at most 227 KiB of shared memory; Triton stages
# the operands of a dot there, NUM_STAGES deep in a pipelined loop, and needs scratch of its
# own. Kernels size their blocks to stay under SMEM_BUDGET (measured on an H200: blocks
# over 227 KiB fail at run time with RESOURCE_EXHAUSTED, see benchmarks/RESULTS-gpu.md).
SMEM_BUDGET = 160 * 1024
NUM_STAGES = 2


def fit_blocks(candidates, smem_bytes: Callable[..., int]):
    """The first of ``candidates`` (tuples of block sides, largest first) whose
    ``smem_bytes(*blocks)`` fits ``SMEM_BUDGET``, or None when none does."""
    return next((blocks for blocks in candidates if smem_bytes(*blocks) <= SMEM_BUDGET), None)


def smem_unsupported(nbytes: int, what: str) -> str | None:
    """Why blocks needing ``nbytes`` of shared memory cannot run, or None when they fit."""
    if nbytes <= SMEM_BUDGET:
        return None
    return (f"{what} need about {nbytes // 1024} KiB of shared memory per program, over the "
            f"{SMEM_BUDGET // 1024} KiB budget of a Triton program here")


def dot_unsupported(dtype, **sides: int) -> str | None:
    """Why a Triton dot cannot take operands of ``dtype`` (None: not checked) with these
    block sides, or None when it can."""
    if dtype is not None and jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"dtype {jnp.dtype(dtype)} has no Triton dot (use float32, bfloat16 or float16)"
    for name, n in sides.items():
        if n < MIN_BLOCK or n & (n - 1):
            return f"{name}={n} is not a power of two >= {MIN_BLOCK} (Triton block shapes)"
    return None


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return pl.cdiv(n, multiple) * multiple


def pallas_call(kernel: Callable, *, out_shape, **kwargs) -> Callable:
    """``pl.pallas_call`` that also runs inside ``jax.shard_map(check_vma=True)``, with
    Triton's pipeline depth set to ``NUM_STAGES`` (the depth the blocks are sized for).

    There a Pallas call must say over which mesh axes its outputs vary: the inputs are
    cast to the union of their varying axes and every output is declared to vary over
    it too. Outside ``shard_map`` that union is empty and nothing changes.
    """
    kwargs.setdefault("compiler_params", plgpu.CompilerParams(num_stages=NUM_STAGES))
    def call(*args):
        varying = frozenset().union(*(jax.typeof(a).mat.varying for a in args))
        args = [_vary(a, varying) for a in args]
        mat = jax.typeof(args[0]).mat
        shapes = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat), out_shape
        )
        return pl.pallas_call(kernel, out_shape=shapes, **kwargs)(*args)

    return call


def match_cotangent(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """Sums a cotangent over the mesh axes its primal does not vary over (inside shard_map)."""
    extra = jax.typeof(ct).mat.varying - jax.typeof(primal).mat.varying
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _vary(x: jax.Array, varying: frozenset) -> jax.Array:
    missing = varying - jax.typeof(x).mat.varying
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x
