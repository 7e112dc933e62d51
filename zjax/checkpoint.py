"""Checkpoints that never lose a run: async Orbax saves, verified commits, any-mesh restore.

A checkpoint holds the TrainState in a *portable* form that does not depend on the
mesh or the ZeRO stage: fp32 master params and optimizer moments in the user's
shapes (the padding ZeRO adds to a leaf with no dimension that divides by the shard
count is undone on save and redone on restore), the loss-scale state, the step and the
PRNG key, plus JSON run state (``extra``, e.g. the data position) and a snapshot of the
config. Restoring onto another device count, stage or compute dtype is therefore a
reshard (plus a re-pad), bit-exact. Each portable array keeps the state's sharding, so
neither saving nor restoring gathers a parameter onto one device.

A step counts only once zjax has written ``zjax_manifest.json`` into it, after
Orbax finished writing every file; the manifest lists each file's size and CRC32.
A step without a manifest, or whose files no longer match it, is skipped with a
warning naming what is wrong, and old steps are deleted only after a newer one is
committed. Before a step is saved, any directory at that step or later is cleared:
an unfinished save is deleted, a damaged step is renamed ``<step>.damaged-<n>`` (kept
as evidence; nothing reads it again), so a manifest only ever describes files written
by the save it commits.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from flax.core.meta import Partitioned
from jax.sharding import PartitionSpec as P

from zjax.parallel import zero
from zjax.errors import CheckpointError, ConfigError
from zjax.parallel.zero import map_layouts

logger = logging.getLogger("zjax")

MANIFEST = "zjax_manifest.json"


class _NoMissingMetadataWarning(logging.Filter):
    """Drops Orbax's "Metadata file does not exist" warning: reading a step's ``state`` item
    looks for a ``_CHECKPOINT_METADATA`` file that only the step directory has, and zjax's
    manifest, not that file, says whether a step is complete. Other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


_QUIET_ORBAX = _NoMissingMetadataWarning()


def _quiet_orbax() -> None:
    """Installs the filter on absl's logger (once: adding the same filter twice is a no-op);
    called where zjax reads checkpoints, not at import."""
    logging.getLogger("absl").addFilter(_QUIET_ORBAX)


class Checkpointer:
    """Saves and restores TrainStates under ``directory``, one sub-directory per step.

    Args:
      directory: where steps are written (created if missing).
      keep: committed steps kept; older ones are deleted once a newer one is committed.
      every_steps: ``should_save(step)`` is true every this many steps (None: never).
      every_seconds: ``should_save`` is also true when this long passed since the last save.

    Example:
      >>> ckpt = Checkpointer("/tmp/run/checkpoints", keep=2)  # doctest: +SKIP
      >>> ckpt.save(100, state, extra={"data_step": 100}); ckpt.wait()  # doctest: +SKIP
      >>> state, extra = ckpt.restore(train)  # doctest: +SKIP
    """

    def __init__(self, directory, keep: int = 3, every_steps: int | None = None, every_seconds: float | None = None):
        if keep < 1:
            raise ConfigError(f"keep={keep}: keep at least 1 checkpoint")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.every_steps = every_steps or None
        self.every_seconds = every_seconds
        _quiet_orbax()
        self._last_save_time = time.monotonic()
        self._pending: int | None = None
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=True, create=True),
        )

    # -- saving -----------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """True when ``every_steps`` or ``every_seconds`` says step ``step`` is due."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds) and time.monotonic() - self._last_save_time >= self.every_seconds

    def save(self, step: int, state, extra: dict | None = None, config: Any = None) -> None:
        """Starts an asynchronous save of ``state`` as ``step``; training goes on meanwhile.

        Args:
          step: the step number (a directory name).
          state: a ``TrainState``.
          extra: JSON-able run state restored next to the state (e.g. the data position).
          config: optional ``Config`` stored as a snapshot.
        """
        self._commit_pending()
        self._clear_from(step)
        portable = to_portable(state)
        meta = {
            "devices": int(state.step.sharding.mesh.size),
            "stacked": [lay.stacked for lay in jax.tree.leaves(state.all_layouts, is_leaf=zero.is_layout)],
            "config": config.model_dump(mode="json") if config is not None else None,
            "extra": extra or {},
        }
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(portable), meta=ocp.args.JsonSave(meta))
        )
        if not saved:  # a manifest written now would bless files this save did not write
            raise CheckpointError(f"Orbax declined to save step {step} in {self.directory}")
        self._pending = step
        self._last_save_time = time.monotonic()

    def wait(self) -> None:
        """Blocks until pending saves are committed; re-raises a background save's error."""
        self._commit_pending()

    def close(self) -> None:
        self._commit_pending()
        self._manager.close()

    def _commit_pending(self) -> None:
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            _write_manifest(self.directory / str(step))
            for old in self.committed_steps()[: -self.keep]:
                shutil.rmtree(self.directory / str(old), ignore_errors=True)
        _sync("zjax_checkpoint_commit")
        self._manager.reload()

    def _clear_from(self, step: int) -> None:
        """Clears ``step`` and later steps, left by an earlier run, before ``step`` is saved.

        Orbax skips a save at or below an existing step, and a manifest written then
        would describe the old files. An unfinished step (killed mid-save) is deleted;
        a damaged one is renamed ``<step>.damaged-<n>``; an intact one is refused.
        """
        later = [s for s in _step_dirs(self.directory) if s >= step]
        if not later:
            return
        problems = {s: verify_step(self.directory / str(s)) for s in later}
        intact = [s for s, problem in problems.items() if problem is None]
        if intact:
            raise CheckpointError(
                f"cannot save step {step} in {self.directory}: intact step {intact[0]} is already there; "
                f"restore the newest step (restore(train)) and train on from it, or save into another directory"
            )
        _sync("zjax_checkpoint_verified")  # every process has read the steps before they move
        if jax.process_index() == 0:
            for s, problem in problems.items():
                path = self.directory / str(s)
                if not (path / MANIFEST).exists():
                    shutil.rmtree(path)
                    logger.warning("checkpoint step %d in %s was never committed; deleted", s, self.directory)
                    continue
                aside = _unused(self.directory, f"{s}.damaged")
                path.rename(aside)
                logger.warning("checkpoint step %d in %s is damaged (%s); moved aside to %s",
                               s, self.directory, problem, aside.name)
        _sync("zjax_checkpoint_clean")
        self._manager.reload()

    # -- finding steps ----------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        """Steps with a manifest, oldest first (not yet verified)."""
        return [s for s in _step_dirs(self.directory) if (self.directory / str(s) / MANIFEST).exists()]

    def latest_step(self) -> int | None:
        """The newest step that is committed and intact, or None."""
        return newest_intact_step(self.directory)

    # -- restoring --------------------------------------------------------------------

    def restore(self, train, step: int | None = None) -> tuple[Any, dict]:
        """Restores onto ``train``'s mesh, ZeRO stage and precision.

        Args:
          train: a ``TrainStep``; if it was neither initialized nor prepared, its model
            (``make_train_step(..., model=...)``) fixes the parameter shapes, or else
            the checkpoint does (in the structure of ``logical_axes=`` when given).
          step: a step to restore (it must be intact); None = the newest intact one.

        Returns:
          ``(state, extra)``.
        """
        self._commit_pending()
        step = intact_step(self.directory, step)
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if train.layouts is None:
            _prepare_from_checkpoint(train, self.directory / str(step), meta)
        target = portable_target(train)
        _check_shapes(self.directory / str(step), target)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        return from_portable(train, restored), meta.get("extra", {})


# -- the portable form ----------------------------------------------------------------


def to_portable(state) -> dict:
    """The state in user shapes, independent of mesh and stage.

    A leaf that needs nothing done (not padded, already fp32, in device memory) is the
    state's own array, not a copy; the rest come from one jitted program
    (``save_program``) made of local slices and casts.
    """
    program, sources, portable_def = _save_plan(state)
    leaves = jax.tree.leaves(state)
    computed = iter(program(state))
    return jax.tree.unflatten(portable_def, [leaves[i] if i is not None else next(computed) for i in sources])


def save_program(state):
    """The jitted part of ``to_portable``: ``state -> [portable leaves that are not state leaves]``.

    Each portable leaf keeps the sharding of the state leaf it comes from (ZeRO splits a
    leaf along one of its own dimensions, so unpadding slices only the last shard), so no
    parameter is gathered; only a leaf padded because no dimension divides is replicated
    (a jax array cannot be split unevenly).
    """
    return _save_plan(state)[0]


# Save plans by state structure, shapes, dtypes and shardings: a run saving every N steps
# traces and compiles its save program once, not at every save.
_SAVE_PLANS: dict = {}
_SAVE_PLANS_KEPT = 8


def _save_plan(state):
    """``(program, sources, portable_def)``: ``sources[k]`` is the index of the state leaf that
    portable leaf ``k`` is, or None where ``program`` computes it (cached per state layout)."""
    key = (jax.tree.structure(state),
           tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(state)))
    if key not in _SAVE_PLANS:
        if len(_SAVE_PLANS) >= _SAVE_PLANS_KEPT:
            _SAVE_PLANS.pop(next(iter(_SAVE_PLANS)))
        _SAVE_PLANS[key] = _build_save_plan(state)
    return _SAVE_PLANS[key]


def _build_save_plan(state):
    layouts = state.layouts
    treedef = jax.tree.structure(layouts, is_leaf=zero.is_layout)
    state_def = jax.tree.structure(state)

    def portable_leaves(leaves):
        return jax.tree.leaves(_portable(jax.tree.unflatten(state_def, leaves), layouts, treedef))

    leaves = jax.tree.leaves(state)
    out_shapes = jax.eval_shape(lambda s: _portable(s, layouts, treedef), state)
    shardings = jax.tree.leaves(_portable_shardings(
        jax.tree.map(lambda x: x.sharding, state), state.master is not None, out_shapes))
    jaxpr = jax.make_jaxpr(portable_leaves)(leaves).jaxpr
    position = {id(v): i for i, v in enumerate(jaxpr.invars)}
    sources = [position.get(id(v)) for v in jaxpr.outvars]
    sources = [i if i is not None and leaves[i].sharding == sharding else None
               for i, sharding in zip(sources, shardings)]
    computed = [k for k, i in enumerate(sources) if i is None]

    def program(s):
        out = portable_leaves(jax.tree.leaves(s))
        return [out[k] for k in computed]

    out_shardings = [shardings[k] for k in computed]
    return jax.jit(program, out_shardings=out_shardings), sources, jax.tree.structure(out_shapes)


def _portable(state, layouts, treedef) -> dict:
    # host-offloaded fields (ZeRO-Offload) are brought to device memory first
    state = jax.tree.map(
        lambda x: jax.device_put(x, x.sharding.with_memory_kind("device"))
        if getattr(getattr(x, "sharding", None), "memory_kind", None) == "pinned_host" else x,
        state,
    )

    def unpad(tree):  # to user shapes, and an interleaved pipeline's stacks to the layer order
        return zero.stage_order(layouts, map_layouts(lambda lay, x: zero.from_stored(x, lay), layouts, tree), True)

    if state.master is not None:
        params = unpad(state.master)
    else:
        params = zero.stage_order(layouts, state.replicated, True)
    if state.frozen is not None:
        frozen_layouts = zero.split_layouts(state.layout_def, False)
        frozen = zero.stage_order(frozen_layouts, map_layouts(lambda lay, x: zero.from_stored(x, lay), frozen_layouts,
                                                              state.frozen), True)
        params = zero.merge_frozen(params, frozen)
    stored = tuple(lay.stored_shape for lay in treedef.flatten_up_to(layouts))
    portable = {
        "step": state.step,
        "params": jax.tree.map(lambda x: x.astype(jnp.float32), params),
        "opt_state": _map_param_subtrees(unpad, state.opt_state, treedef, stored),
        "loss_scale": state.loss_scale,
        "rng": jax.random.key_data(state.rng),
    }
    if state.comm is not None:  # LoCo's per-device error buffers, as they are (a leading device axis)
        portable["comm"] = state.comm
    return portable


def portable_target(train) -> dict:
    """Abstract portable tree with shardings on ``train``'s mesh (an Orbax restore target)."""
    layouts = train.layouts
    treedef = jax.tree.structure(layouts, is_leaf=zero.is_layout)
    shapes = jax.eval_shape(lambda s: _portable(s, layouts, treedef), train.abstract_state)
    shardings = _portable_shardings(train.state_sharding, train.keeps_master, shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def from_portable(train, portable: dict):
    """The TrainState for ``train``'s placement, from a restored portable tree."""
    return restore_program(train)(portable)


def restore_program(train):
    """The jitted ``portable -> TrainState`` program for ``train``'s placement (the inverse of
    ``save_program``: casts, re-pads and gathers only what the stage keeps replicated)."""
    layouts = train.layouts
    treedef = jax.tree.structure(layouts, is_leaf=zero.is_layout)

    def pad(tree):
        return map_layouts(lambda lay, x: zero.to_stored(x, lay), layouts, tree)

    def pad_moments(tree):  # an interleaved pipeline's stacks to stage order too
        return pad(zero.stage_order(layouts, tree))

    shapes = tuple(lay.shape for lay in treedef.flatten_up_to(layouts))

    frozen_layouts = train.frozen_layouts

    def build(p):
        p = {**p, "params": zero.stage_order(train.all_layouts, p["params"])}
        params = zero.select(layouts, p["params"])
        frozen = None if frozen_layouts is None else map_layouts(
            lambda lay, x: zero.to_stored(x.astype(train.dtypes.compute), lay),
            frozen_layouts, zero.select(frozen_layouts, p["params"]))
        return train.abstract_state.replace(
            step=p["step"],
            replicated=jax.tree.map(lambda x: x.astype(train.replicated_dtype), params)
            if train.keeps_replicated else None,
            master=pad(params) if train.keeps_master else None,
            frozen=frozen,
            opt_state=_map_param_subtrees(pad_moments, p["opt_state"], treedef, shapes),
            loss_scale=p["loss_scale"],
            rng=jax.random.wrap_key_data(p["rng"]),
            comm=p.get("comm"),
        )

    return jax.jit(build, out_shardings=train.state_sharding)


def _map_param_subtrees(fn, tree, treedef, shapes):
    """Applies ``fn`` to every subtree of ``tree`` with the params' structure and leaf
    ``shapes`` (optimizer moments); a single-array model's moments are such subtrees too."""
    def is_params(node):
        return zero.is_param_subtree(node, treedef, shapes)

    return jax.tree.map(lambda n: fn(n) if is_params(n) else n, tree, is_leaf=is_params)


def _portable_shardings(state_sharding, keeps_master: bool, shapes) -> dict:
    """Shardings of the portable tree: each leaf as the state leaf it comes from (params from
    the master when there is one), in device memory; a leaf whose shape no longer divides
    (ZeRO's padding removed) is replicated."""
    def portable(sharding, shape):
        spec = sharding.spec
        split = [i for i, names in enumerate(spec) if names is not None]
        mesh = sharding.mesh
        if any(shape.shape[i] % _axes_size(mesh, spec[i]) for i in split):
            spec = P()
        return NamedSharding(mesh, spec)

    mesh = state_sharding.step.mesh
    params = zero.merge_frozen(state_sharding.master if keeps_master else state_sharding.replicated,
                               state_sharding.frozen)
    return {
        "step": portable(state_sharding.step, shapes["step"]),
        "params": jax.tree.map(portable, params, shapes["params"]),
        "opt_state": jax.tree.map(portable, state_sharding.opt_state, shapes["opt_state"]),
        "loss_scale": jax.tree.map(portable, state_sharding.loss_scale, shapes["loss_scale"]),
        "rng": NamedSharding(mesh, P()),
        **({"comm": jax.tree.map(portable, state_sharding.comm, shapes["comm"])} if "comm" in shapes else {}),
    }


def _axes_size(mesh, names) -> int:
    names = names if isinstance(names, tuple) else (names,)
    return int(np.prod([mesh.shape[n] for n in names]))


def _prepare_from_checkpoint(train, path: Path, meta: dict) -> None:
    """Fixes ``train``'s placement before a restore when nothing was given to ``init``.

    A model (``make_train_step(..., model=...)``) gives the shapes itself; otherwise the
    checkpoint's saved params do, in the tree of ``logical_axes=`` when it was given, and
    leaves saved as ``layers`` stacks are marked so again (Linen params carry their names
    in boxes that a checkpoint does not keep).
    """
    if getattr(train.adapter, "model_params", None) is not None:
        train.prepare()
        return
    saved = ocp.PyTreeCheckpointer().metadata(path / "state").item_metadata.tree["params"]
    leaves = [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in jax.tree.leaves(saved)]
    given_axes = train.adapter.given_axes
    if given_axes is not None:
        axes_def = jax.tree.structure(given_axes, is_leaf=_is_names)
        if axes_def.num_leaves != len(leaves):
            raise CheckpointError(
                f"checkpoint {path} holds {len(leaves)} params but logical_axes= names {axes_def.num_leaves}: "
                f"it was saved from another model"
            )
        train.prepare(jax.tree.unflatten(axes_def, leaves))
        return
    stacked = meta.get("stacked") or [False] * len(leaves)
    if len(stacked) == len(leaves) and any(stacked):
        leaves = [Partitioned(x, names=("layers",) + (None,) * (x.ndim - 1)) if s else x
                  for x, s in zip(leaves, stacked)]
    train.prepare(jax.tree.unflatten(jax.tree.structure(saved), leaves))


def _is_names(x) -> bool:
    """A leaf of a logical-axes tree: a tuple of axis names (or None)."""
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


# -- verification -----------------------------------------------------------------------


def newest_intact_step(directory: Path) -> int | None:
    """The newest step under ``directory`` whose files match its manifest; warns about damaged ones."""
    for step in reversed(_step_dirs(directory)):
        problem = verify_step(directory / str(step))
        if problem is None:
            return step
        logger.warning("checkpoint step %d in %s is damaged, skipped: %s", step, directory, problem)
    return None


def intact_step(directory: Path, step: int | None = None) -> int:
    """``step`` if it is intact, or the newest intact step when None; else ``CheckpointError``."""
    if step is None:
        step = newest_intact_step(directory)
        if step is None:
            raise CheckpointError(f"no intact checkpoint in {directory}")
        return step
    steps = _step_dirs(directory)
    if step not in steps:
        there = ", ".join(map(str, steps)) or "none"
        raise CheckpointError(f"checkpoint step {step} does not exist in {directory}; steps there: {there}")
    problem = verify_step(directory / str(step))
    if problem is not None:
        raise CheckpointError(f"checkpoint step {step} in {directory} is damaged: {problem}")
    return step


def _step_dirs(directory: Path) -> list[int]:
    """Step numbers with a directory under ``directory``, committed or not, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _unused(directory: Path, stem: str) -> Path:
    """``directory/<stem>-<n>`` for the smallest n not yet taken."""
    n = 1
    while (directory / f"{stem}-{n}").exists():
        n += 1
    return directory / f"{stem}-{n}"


def _write_manifest(path: Path) -> None:
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            if name == MANIFEST:
                continue
            full = Path(root) / name
            files[str(full.relative_to(path))] = {"size": full.stat().st_size, "crc32": _crc32(full)}
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=0))
    os.replace(tmp, path / MANIFEST)  # atomic: the step is committed exactly when this lands


def verify_step(path: Path) -> str | None:
    """None when every file of the step matches its manifest, else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no manifest (the save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    for rel, want in files.items():
        full = path / rel
        if not full.exists():
            return f"missing file {rel}"
        if full.stat().st_size != want["size"]:
            return f"file {rel} has {full.stat().st_size} bytes, expected {want['size']}"
        if _crc32(full) != want["crc32"]:
            return f"file {rel} does not match its checksum"
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _check_shapes(path: Path, target) -> None:
    """Fails naming the first entry whose saved shape differs from what this model needs."""
    saved = ocp.PyTreeCheckpointer().metadata(path / "state").item_metadata.tree
    # matched by path, not position: the metadata holds NamedTuple states (optimizer states)
    # as dicts, whose leaves come in key order rather than field order
    saved_shapes = {_path_names(key): tuple(leaf.shape) for key, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    wanted = jax.tree_util.tree_leaves_with_path(target)
    if len(saved_shapes) != len(wanted):
        raise CheckpointError(
            f"checkpoint {path} holds {len(saved_shapes)} arrays but this model and optimizer need "
            f"{len(wanted)}: it was saved from another model or optimizer"
        )
    for key, want in wanted:
        saved_shape = saved_shapes.get(_path_names(key))
        if saved_shape is None:
            raise CheckpointError(f"{jax.tree_util.keystr(key)} is not in checkpoint {path}: it was saved from "
                                  "another model or optimizer")
        if saved_shape != tuple(want.shape):
            what = jax.tree_util.keystr(key)
            hint = "another model" if what.startswith("['params']") else "another optimizer or device count"
            raise CheckpointError(
                f"{what} has shape {saved_shape} in checkpoint {path} but {tuple(want.shape)} here: "
                f"it was saved from {hint}"
            )


def _path_names(path) -> tuple[str, ...]:
    """A tree path as plain names (dict keys, attribute names and indices alike)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load_params(directory, step: int | None = None) -> Any:
    """The master params of a checkpoint as host numpy arrays, without any mesh.

    Args:
      directory: a checkpoint directory (as given to ``Checkpointer``).
      step: a step, or None for the newest intact one.
    """
    directory = Path(directory).absolute()
    step = intact_step(directory, step)
    _quiet_orbax()
    handler = ocp.PyTreeCheckpointer()
    path = directory / str(step) / "state"
    params_meta = handler.metadata(path).item_metadata.tree["params"]
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
    restored = handler.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item={"params": params_meta}, restore_args={"params": restore_args}, partial_restore=True
        ),
    )
    return restored["params"]
