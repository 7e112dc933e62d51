"""Params out of a checkpoint into safetensors, one tensor at a time; and back in.

``export_safetensors`` writes the header from the checkpoint's metadata, then reads
and writes each parameter in turn, so peak host memory stays near the largest
tensor (the ``safetensors`` package writes only from a dict held whole in memory;
it reads our files). Names join the params' dict keys with dots: ``blocks.attn.wq``.

A LoRA run's adapters (``model.lora``) are fused into their weights on the way out (as
``zjax.models.gpt.fuse_lora``, DeepSpeed-Chat's ``convert_lora_to_linear_layer`` before saving):
the file holds a plain GPT, which the run's config (or the same with ``model.lora.rank: 0``) serves.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from zjax.checkpoint import _quiet_orbax, intact_step
from zjax.config.schema import Config, load_config
from zjax.errors import ConfigError
from zjax.models.gpt import LORA_SUFFIXES
from zjax.train.adapters import load_safetensors

__all__ = ["export_safetensors", "load_safetensors", "run_config"]

_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32", "int64": "I64"}


def export_safetensors(directory, out_path, step: int | None = None, config=None) -> Path:
    """Streams the master params of a checkpoint step into ``out_path``; LoRA adapters fused.

    Args:
      directory: a run's ``output_dir`` or its ``checkpoints`` directory.
      out_path: the ``.safetensors`` file to write.
      step: a step, or None for the newest intact one.
      config: only read when the params hold LoRA adapters (for ``model.lora``'s scaling): the
        run's config (a ``Config``, path or dict); default the ``config.yaml`` beside the
        checkpoints, else the config saved in the checkpoint.

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
    leaves = jax.tree_util.tree_leaves_with_path(params_meta)
    adapters = {path[:-1] + (_key(path[-1])[:-len(suffix)],) for path, _ in leaves
                for suffix in LORA_SUFFIXES if _key(path[-1]).endswith(suffix)}
    scale = _lora_scale(directory, step, config) if adapters else None
    leaves = [(path, meta) for path, meta in leaves if not _key(path[-1]).endswith(LORA_SUFFIXES)]
    entries = [(_name(path), meta) for path, meta in leaves]

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
            for path, meta in leaves:
                value = _read_one(handler, state_dir, path, params_meta)
                if (path[:-1] + (_key(path[-1]),)) in adapters:
                    value = _fused(value, *(_read_one(handler, state_dir, _sibling(path, suffix), params_meta)
                                            for suffix in LORA_SUFFIXES), scale)
                f.write(np.ascontiguousarray(value).tobytes())
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


def _lora_scale(directory: Path, step: int, config) -> float:
    """``alpha / rank`` of the run's ``model.lora``."""
    lora = run_config(directory, config, step).model.lora
    if lora.rank == 0:
        raise ConfigError(f"the checkpoint in {directory} holds LoRA adapters but its config has model.lora.rank=0; "
                          "pass the config the run trained with")
    return float(lora.alpha) / lora.rank


def _fused(weight: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``weight + scale x a @ b`` summed in float32, in ``weight``'s dtype (``gpt.lora_fused`` on the host)."""
    delta = np.matmul(a.astype(np.float32), b.astype(np.float32))
    return (weight.astype(np.float32) + np.float32(scale) * delta).astype(weight.dtype)


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", None))))


def _sibling(path, suffix: str):
    """The path of ``path``'s adapter ``<name><suffix>`` (the same kind of key entry)."""
    last = path[-1]
    return path[:-1] + (type(last)(_key(last) + suffix),)


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


def run_config(checkpoints: Path, config: Any, step: int | None) -> Config:
    """The run's config: ``config`` when given (a ``Config``, path or dict), else ``config.yaml``
    beside the checkpoints, else the snapshot in the checkpoint."""
    if config is not None:
        return config if isinstance(config, Config) else load_config(config)
    beside = checkpoints.parent / "config.yaml"
    if beside.is_file():
        return load_config(beside)
    meta = checkpoints / str(intact_step(checkpoints, step)) / "meta" / "metadata"  # Orbax's JsonSave
    snapshot = json.loads(meta.read_text()).get("config") if meta.is_file() else None
    if snapshot is None:
        raise ValueError(f"no config for the checkpoint in {checkpoints}: no config.yaml beside it and no config "
                         "saved in it; pass config= (the run's config file or Config)")
    return load_config(snapshot)
