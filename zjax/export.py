"""Params out of a checkpoint into safetensors, one tensor at a time; and back in.

``export_safetensors`` writes the header from the checkpoint's metadata, then reads
and writes each parameter in turn, so peak host memory stays near the largest
tensor (the ``safetensors`` package writes only from a dict held whole in memory;
it reads our files). Names join the params' dict keys with dots: ``blocks.attn.wq``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from zjax.checkpoint import _quiet_orbax, intact_step
from zjax.errors import ConfigError
from zjax.train.adapters import load_safetensors

__all__ = ["export_safetensors", "load_safetensors"]

_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32", "int64": "I64"}


def export_safetensors(directory, out_path, step: int | None = None) -> Path:
    """Streams the master params of a checkpoint step into ``out_path``.

    Args:
      directory: a run's ``output_dir`` or its ``checkpoints`` directory.
      out_path: the ``.safetensors`` file to write.
      step: a step, or None for the newest intact one.

    Returns:
      The path written.
    """
    out_path = _writable_file(Path(out_path))
    directory = _checkpoint_dir(directory).absolute()
    step = intact_step(directory, step)
    state_dir = directory / str(step) / "state"
    _quiet_orbax()
    handler = ocp.PyTreeCheckpointer()
    params_meta = handler.metadata(state_dir).item_metadata.tree["params"]
    entries = [(_name(path), meta) for path, meta in jax.tree_util.tree_leaves_with_path(params_meta)]

    header, offset = {"__metadata__": {"format": "np", "step": str(step)}}, 0
    for name, meta in entries:
        size = int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize
        header[name] = {"dtype": _DTYPES[np.dtype(meta.dtype).name], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for path, meta in jax.tree_util.tree_leaves_with_path(params_meta):
                f.write(np.ascontiguousarray(_read_one(handler, state_dir, path, params_meta)).tobytes())
        tmp.replace(out_path)
    except BaseException:  # an interrupted or failed export leaves no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _read_one(handler, state_dir: Path, path, params_meta) -> np.ndarray:
    """Restores the single leaf at ``path`` as a host array."""
    item = jax.tree_util.tree_map_with_path(lambda p, m: m if p == path else None, params_meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = handler.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(item={"params": item}, restore_args={"params": args}, partial_restore=True),
    )
    return jax.tree.leaves(out["params"])[0]


def _name(path) -> str:
    keys = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
        if "." in str(key):
            raise ConfigError(f"parameter key {key!r} contains a dot; safetensors names join keys with dots")
        keys.append(str(key))
    return ".".join(keys)


def _writable_file(out_path: Path) -> Path:
    """``out_path`` if a file can be written there, else a ``ConfigError`` saying what would work."""
    if out_path.is_dir():
        raise ConfigError(
            f"out_path (--to) {str(out_path)!r} is an existing directory; give a file path such as "
            f"{str(out_path / 'model.safetensors')!r}"
        )
    if not out_path.parent.is_dir():
        raise ConfigError(
            f"out_path (--to) {str(out_path)!r}: directory {str(out_path.parent)!r} does not exist; "
            "create it first or write elsewhere"
        )
    return out_path


def _checkpoint_dir(directory) -> Path:
    directory = Path(directory)
    return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
