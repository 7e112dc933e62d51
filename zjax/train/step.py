"""``make_train_step``: one config -> a sharded, mixed-precision, ZeRO training step.

The gradients are computed inside one ``jax.shard_map`` over the mesh, so every
collective of the forward and backward pass is written here and can be counted:
gradients are reduce-scattered (stages 1-3) or all-reduced (stage 0) over ``data`` and
ZeRO-3 gathers each layer just in time (see ``zjax.parallel.zero``). The optimizer then updates
the global, sharded arrays outside ``shard_map``: it sees every parameter whole and in
its own shape, so any optax transform is exact, and XLA keeps an element-wise update on
each device's shard. Updated parameters are all-gathered (stages 1-2) by a second
``shard_map``.

What the TrainState holds per stage (Ψ parameters, N data devices):

========  =================================  ============================
stage     ``replicated`` (user shapes)        ``master`` (stored, sharded)
========  =================================  ============================
0         fp32 params (they are the master)  -
1, 2      compute-dtype copy, or the fp32    fp32 master, only when the
          master itself in fp32 runs         compute dtype is lower
3         -                                  fp32 master
========  =================================  ============================

Optimizer moments are shaped like the stored params and split like them for stages 1-3.

Frozen parameters (``trainable=``) live only in ``frozen``, in the compute dtype:
replicated at stages 0-2, split like a ZeRO-3 master at stage 3. They have no master
copy, no optimizer state and no gradient; ``replicated``, ``master`` and ``opt_state``
hold ``None`` where a frozen leaf is (and ``frozen`` holds ``None`` where a trainable
one is), so every tree keeps the user's structure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from zjax import compression
from zjax.train import adapters, loss_scale, onebit
from zjax.parallel import zero
from zjax.config.schema import Config, load_config
from zjax.errors import ConfigError, LossScaleError
from zjax.layers import gather_param, layer_context, tiling
from zjax.parallel import pipeline
from zjax.parallel.sequence import sequence_parallel
from zjax.parallel.sharding import axis_rules, logical_spec
from zjax.parallel.mesh import make_mesh
from zjax.train.optim import default_decay_mask, make_optimizer, make_schedule
from zjax.parallel.zero import BATCH_AXES, DATA, REPLICA, map_layouts

METRICS = ("loss", "grad_norm", "lr", "loss_scale", "skipped")
BALANCE_BIAS_NAMES = ("expert_bias", "e_score_correction_bias")  # MoE selection biases (see _balance_leaves)
logger = logging.getLogger("zjax")


class TrainState(struct.PyTreeNode):
    """Everything a step reads and writes; checkpoint it whole.

    Attributes:
      step: number of calls to the step (skipped ones included).
      replicated: user-shaped replicated params (stages 0-2), else None.
      master: sharded fp32 master params in their stored shapes (stage 3, and stages
        1-2 in mixed precision), else None.
      opt_state: the optax state, over the stored params.
      loss_scale: the loss scaler's state (scale, counters, skipped steps).
      rng: the base PRNG key; each micro-step folds in step, micro-batch and device.
      frozen: the parameters ``trainable=`` leaves out, in the compute dtype (None holes
        where trainable leaves are), or None when everything trains.
      comm: ZeRO++ qgZ's LoCo error buffers (``zero.loco``): per trainable leaf split over
        ``data``, each device's float32 buffer in the stored shape, with a leading device
        axis split over ``data`` (None holes elsewhere); None without LoCo.
    """

    step: jax.Array
    replicated: Any
    master: Any
    opt_state: Any
    loss_scale: loss_scale.LossScaleState
    rng: jax.Array
    frozen: Any = None
    comm: Any = None
    layout_def: Any = struct.field(pytree_node=False, default=None)

    @property
    def layouts(self):
        """Layouts of the trainable parameters (None where a leaf is frozen)."""
        return zero.split_layouts(self.layout_def, True)

    @property
    def all_layouts(self):
        """Layouts of every parameter, trainable or frozen."""
        treedef, leaves, _ = self.layout_def
        return jax.tree.unflatten(treedef, leaves)

    @property
    def params(self) -> Any:
        """The params in the user's tree and shapes: trainable ones from the master (fp32),
        frozen ones in the compute dtype."""
        trainable = self.replicated if self.master is None else _unflatten_master(self.layout_def, self.master)
        params = trainable if self.frozen is None else zero.merge_frozen(
            trainable, _unflatten_frozen(self.layout_def, self.frozen))
        return _user_order(self.layout_def, params) if zero.interleaved(self.all_layouts) else params


@functools.partial(jax.jit, static_argnums=0)
def _user_order(layout_def, params):
    """An interleaved pipeline's stacks back in the model's layer order (``zero.from_stage_order``)."""
    treedef, leaves, _ = layout_def
    return zero.stage_order(jax.tree.unflatten(treedef, leaves), params, inverse=True)


@functools.partial(jax.jit, static_argnums=0)
def _unflatten_master(layout_def, master):
    return map_layouts(lambda lay, x: zero.from_stored(x, lay), zero.split_layouts(layout_def, True), master)


@functools.partial(jax.jit, static_argnums=0)
def _unflatten_frozen(layout_def, frozen):
    """Frozen leaves in user shapes (a ZeRO-3 frozen leaf is stored, maybe padded, like a master)."""
    return map_layouts(lambda lay, x: zero.from_stored(x, lay), zero.split_layouts(layout_def, False), frozen)


def _none_tree(layouts: Any) -> Any:
    """A tree of Nones shaped like ``layouts`` (no LoCo buffers)."""
    return map_layouts(lambda lay: None, layouts)


def _per_device(tree: Any) -> Any:
    """Inside the data-manual shard_map: each leaf with a leading device axis of 1 (out_specs P(data))."""
    return jax.tree.map(lambda x: x[None], tree)


def _one_device(tree: Any) -> Any:
    """The inverse of ``_per_device``: this device's slice of leaves split over data along axis 0."""
    return jax.tree.map(lambda x: x[0], tree)


def _keep_axes(part: Any, axes: tuple[str, ...]) -> Any:
    """One entry of a PartitionSpec with only the mesh axes in ``axes`` kept."""
    names = tuple(a for a in (part if isinstance(part, tuple) else (part,)) if a in axes)
    return None if not names else names[0] if len(names) == 1 else names


class _Dtypes(NamedTuple):
    param: Any
    compute: Any
    reduce: Any
    accum: Any


def make_train_step(
    config: Any,
    loss_fn: Callable,
    *,
    model: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    logical_axes: Any = None,
    devices: Any = None,
    trainable: Any = None,
    eval_loss_fn: Callable | None = None,
) -> "TrainStep":
    """Builds the training step for ``loss_fn`` from a zjax or DeepSpeed config.

    Args:
      config: a ``Config``, a path to a YAML/JSON file, or a dict (zjax or DeepSpeed keys).
      loss_fn: ``loss_fn(params, batch) -> loss | (loss, aux)``; an optional third
        parameter ``rng`` gets a key per micro-step, device and step. ``aux`` may hold
        ``"weight"`` (e.g. the token count) for a weighted mean over micro-batches and
        devices. With ``model`` an NNX module, ``loss_fn`` receives the module.
      model: optional Flax NNX module whose ``nnx.Param`` state is trained.
      optimizer: any optax ``GradientTransformation`` instead of the config's
        optimizer (clipping is applied by the step, by the true global norm).
      logical_axes: optional pytree of logical axis-name tuples, one per parameter;
        leaves whose first name is ``layers`` are scanned stacks (gathered one layer
        at a time under ZeRO-3). Read from NNX/Linen metadata when not given.
      devices: optional device list for the mesh (default: all devices).
      trainable: which parameters train (default: all): an NNX filter (with ``model``,
        e.g. ``nnx.LoRAParam`` or ``nnx.PathContains("lora")``), a pytree of bools
        shaped like the params (or a prefix of them), or a predicate
        ``fn(path, leaf) -> bool`` with ``path`` a tuple of keys. Frozen parameters get
        no master copy, optimizer state or gradient, are kept in the compute dtype
        (split over ``data`` at ZeRO-3) and stay bit for bit as given.
      eval_loss_fn: the loss ``evaluate`` reports, called like ``loss_fn`` (default ``loss_fn``):
        e.g. a distilled student's own cross entropy while it trains on a distillation loss.

    Returns:
      A ``TrainStep``: ``train.init(params_or_fn, rng)`` then ``state, metrics = train(state, batch)``.

    Example:
      >>> train = make_train_step("configs/tiny.yaml", loss_fn)  # doctest: +SKIP
    """
    return TrainStep(config, loss_fn, model=model, optimizer=optimizer, logical_axes=logical_axes, devices=devices,
                     trainable=trainable, eval_loss_fn=eval_loss_fn)


class TrainStep:
    """A jitted, donated ZeRO training step and the placement it implies."""

    def __init__(self, config, loss_fn, *, model=None, optimizer=None, logical_axes=None, devices=None,
                 trainable=None, eval_loss_fn=None):
        self.config: Config = config if isinstance(config, Config) else load_config(config)
        cfg = self.config
        self.mesh = make_mesh(cfg.mesh, devices)
        self.data_size = self.mesh.shape[DATA]
        self.replica_size = self.mesh.shape[REPLICA]
        self.global_batch_size, self.micro_batch_size, self.grad_accum_steps = cfg.batch.resolve(
            self.replica_size * self.data_size
        )
        self.stage = cfg.zero.stage
        p = cfg.precision
        self.dtypes = _Dtypes(
            jnp.dtype(p.param_dtype),
            jnp.dtype(p.compute_dtype),
            jnp.dtype(p.reduce_dtype or p.compute_dtype),
            jnp.dtype(p.accum_dtype),
        )
        # ZeRO's group: data, times sequence (its devices share the weights: DeepSpeed-Ulysses)
        self.sequence_size = self.mesh.shape[zero.SEQUENCE]
        self.zero = zero.ZeroStage(self.stage, self.data_size * self.sequence_size,
                                   self.dtypes.compute != self.dtypes.param)
        self.adapter = adapters.adapt(loss_fn, model, logical_axes)
        self._eval_adapter = self.adapter if eval_loss_fn is None else adapters.adapt(eval_loss_fn, model, logical_axes)
        self.trainable = trainable
        self._user_optimizer = optimizer
        self.scaler = loss_scale.loss_scaler_from_config(cfg)
        self.schedule = None if optimizer is not None else make_schedule(cfg)
        self.batch_sharding = NamedSharding(self.mesh, logical_spec(("batch",), cfg.logical_axis_rules))
        self.layouts = None
        self._balance = None
        self.frozen_layouts = None
        self.abstract_state = None
        self._eval = None
        self._per_example: dict = {}
        # Whether the model's 'layers' stacks reach the loss gathered whole (it does not pass them
        # through zjax.scan_layers: a Linen nn.scan or NNX nnx.scan stack); None until traced.
        self._whole_stacks: bool | None = None
        # the pipeline schedule over mesh.stage (None without one)
        stages = self.mesh.shape.get(pipeline.STAGE, 1)
        self.schedule_table = (pipeline.make_schedule(cfg.pipeline.schedule, stages, cfg.pipeline.microbatches,
                                                      cfg.pipeline.repeats) if stages > 1 else None)

    # -- placement ------------------------------------------------------------------

    @property
    def shards(self) -> int:
        return self.zero.shards

    @property
    def keeps_replicated(self) -> bool:
        return self.zero.keeps_replicated

    @property
    def keeps_master(self) -> bool:
        return self.zero.keeps_master

    @property
    def replicated_dtype(self):
        """Stage 0 keeps fp32 params; stages 1-2 keep a compute-dtype copy when mixed."""
        return self.dtypes.compute if self.keeps_master else self.dtypes.param

    def _setup(self, abstract_params: Any) -> None:
        """Fixes layouts, optimizer and shardings from the params' shapes."""
        axes = self.adapter.logical_axes(abstract_params)
        # the logical axes the rules split over data (ZeRO's preferred dimensions)
        names = tuple(n for n, a in self.config.logical_axis_rules.items() if a == DATA and n != "batch")
        group = ((zero.SEQUENCE, self.sequence_size),) if self.sequence_size > 1 else ()
        place = dict(zero_names=names, model_rules=self.config.logical_axis_rules, mesh_shape=dict(self.mesh.shape),
                     group=group, repeats=self.schedule_table.repeats if self.schedule_table is not None else 1)
        trained = zero.make_layouts(abstract_params, axes, self.zero.shards, self.zero.partitioned, **place)
        # frozen leaves: replicated below ZeRO-3, split like a master at ZeRO-3
        frozen = zero.make_layouts(abstract_params, axes, self.zero.frozen_shards, self.zero.gathers_for_loss, **place)
        mask = self.adapter.trainable_mask(self.trainable, abstract_params)
        leaves, treedef = jax.tree.flatten(trained, is_leaf=zero.is_layout)
        frozen_leaves = treedef.flatten_up_to(frozen)
        layout_def = (treedef, tuple(t if m else f for t, f, m in zip(leaves, frozen_leaves, mask)), mask)
        if self.layouts is not None:
            if layout_def != self.layout_def:
                raise ConfigError("train.init was called with params of another tree or shapes than before")
            return
        self.layout_def = layout_def
        self.layouts = layouts = zero.split_layouts(layout_def, True)
        self._balance = self._balance_leaves(abstract_params, treedef, mask)
        self.frozen_layouts = zero.split_layouts(layout_def, False) if not all(mask) else None
        self.all_layouts = jax.tree.unflatten(treedef, layout_def[1])
        if self._user_optimizer is not None:
            self.tx = self._user_optimizer
        else:
            mask = default_decay_mask(map_layouts(lambda lay: lay.layer_shape, layouts))
            self.tx = make_optimizer(self.config, decay_mask=None if self.config.optimizer.decay_norms_and_biases else mask)
        # pruning masks (zjax.compression.prune) after the optimizer: pruned weights stay exactly zero
        self._pruning = compression.pruning_groups(self.config.compression)
        if self._pruning:
            if isinstance(self.tx, onebit.DataParallelTransformation):
                raise ConfigError("compression pruning runs after an optax optimizer; the communicating optimizer "
                                  f"{self.config.optimizer.type!r} takes local gradients: use adam/adamw with pruning")
            stacked = [compression.masks.path_name(path) for path, lay in
                       jax.tree_util.tree_flatten_with_path(layouts, is_leaf=zero.is_layout)[0] if lay.stacked]
            learned = [(kind, g) for kind, g in self._pruning if getattr(g, "method", "l1") == "topk"]
            ranked = [(kind, g) for kind, g in self._pruning if getattr(g, "method", "l1") != "topk"]
            if learned:  # DeepSpeed's topk: trained scores, the optimizer on the dense weights
                score_tx = self._user_optimizer or make_optimizer(self.config)
                self.tx = compression.learned_prune(self.tx, learned, score_tx=score_tx, stacked=stacked,
                                                    seed=self.config.seed)
            if ranked:
                self.tx = optax.chain(self.tx, compression.prune(ranked, stacked=stacked))
        stored = map_layouts(lambda lay: jax.ShapeDtypeStruct(lay.stored_shape, self.dtypes.param), layouts)
        self._param_specs = map_layouts(lambda lay: lay.spec, layouts)
        # An optimizer that communicates over data itself (1-bit Adam, 0/1 Adam, 1-bit LAMB) takes
        # each device's local gradient and keeps per-device state: a leading device axis over data.
        self.local_tx = isinstance(self.tx, onebit.DataParallelTransformation)
        if self.local_tx:
            self._check_local_tx()
            if self.zero.partitioned:
                # ZeRO 1-3: the optimizer keeps shards (reshard: each leaf's split axis, -1 whole) and
                # takes whole local gradients, which ZeRO-2 would reduce-scatter in the backward pass:
                # it runs as ZeRO-1 (the same memory: the gradient exists whole either way). ZeRO-3's
                # gathers hand their whole cotangents to per-step sinks instead (_accumulate).
                try:
                    self.tx = self.tx.reshard(map_layouts(lambda lay: lay.axis if lay.sharded else -1, layouts))
                except ConfigError as err:  # e.g. 0/1 Adam's weight decay: name the config key too
                    raise ConfigError(f"{err} (optimizer.weight_decay={self.config.optimizer.weight_decay}, "
                                      f"zero.stage={self.stage})") from None
                if self.stage == 2:
                    self.zero = dataclasses.replace(self.zero, stage=1)
            self._local_init = self._manual(lambda p: _per_device(self.tx.init(p)), in_specs=(self._param_specs,),
                                            out_specs=P(DATA))
            opt_shapes = jax.eval_shape(self._local_init, stored)
            self._opt_specs = jax.tree.map(lambda _: P(DATA), opt_shapes)
        else:
            opt_shapes = jax.eval_shape(self.tx.init, stored)
            self._opt_specs = zero.state_specs(opt_shapes, layouts)
        self.loco = self.config.zero.loco
        if self.loco:
            self._check_loco()
        # LoCo's buffers: per device (a leading axis over data), for the leaves qgZ quantizes
        self._comm_specs = map_layouts(lambda lay: P(DATA) if lay.sharded else None, layouts) if self.loco else None
        scale_state = jax.eval_shape(self.scaler.init)
        frozen_specs = None if self.frozen_layouts is None else map_layouts(lambda lay: lay.spec, self.frozen_layouts)
        self.state_specs = TrainState(
            step=P(),
            replicated=map_layouts(lambda lay: lay.model_spec, layouts) if self.keeps_replicated else None,
            master=self._param_specs if self.keeps_master else None,
            opt_state=self._opt_specs,
            loss_scale=jax.tree.map(lambda _: P(), scale_state),
            rng=P(),
            frozen=frozen_specs,
            comm=self._comm_specs,
            layout_def=self.layout_def,
        )
        self.state_sharding = self._place(self.state_specs)
        # The per-device programs are manual over the data-parallel axes only: the model's own
        # math stays automatic over the model-parallel axes (tensor), where XLA partitions it by
        # the parameters' and activations' shardings; ZeRO's collectives run on each tensor shard
        # (zero.on_model_shards). check_vma=False: Pallas kernels in interpret mode cannot run
        # under vma checks (jax 0.10.2), and nothing here relies on them: gathers have explicit
        # VJPs and every reduction is written out (tests/parallel/test_zero_equivalence.py).
        self._grads = self._manual(
            self._local_grads,
            in_specs=(self.state_specs, P(BATCH_AXES)),
            out_specs=(P(DATA) if self.local_tx else self._param_specs, P(), P(), P(), P(), self._comm_specs),
        )
        if self.local_tx:
            def local_update(grads, opt_state, params):
                updates, opt_state = self.tx.update(_one_device(grads), _one_device(opt_state), params)
                return updates, _per_device(opt_state)

            self._local_update = self._manual(local_update, in_specs=(P(DATA), P(DATA), self._param_specs),
                                              out_specs=(self._param_specs, P(DATA)))
        self._gather = self._manual(
            lambda master: map_layouts(
                lambda lay, m: zero.from_stored(zero.all_gather_params(m.astype(self.replicated_dtype), lay), lay),
                layouts, master),
            in_specs=(self._param_specs,),
            out_specs=map_layouts(lambda lay: lay.model_spec, layouts),
        )
        self._step = jax.jit(
            self._global_step,
            donate_argnums=0,
            out_shardings=(self.state_sharding, NamedSharding(self.mesh, P())),
        )

    def _balance_leaves(self, abstract_params: Any, treedef: Any, mask: tuple) -> Any:
        """Per trainable leaf, whether it is an MoE selection bias (auxiliary-loss-free balancing:
        a leaf named ``expert_bias`` or ``e_score_correction_bias``), which the step moves by
        ``-model.moe.bias_update_rate * sign(gradient)`` instead of the optimizer; None when there
        is none (None holes where a leaf is frozen)."""
        from zjax.train.adapters import _keys

        names = [str(_keys(path)[-1]) if _keys(path) else ""
                 for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
        flags = [n in BALANCE_BIAS_NAMES for n in names]
        found = [n for n, f, m in zip(names, flags, mask) if f and m]
        rate = self.config.model.moe.bias_update_rate
        if not found:
            return None
        if rate <= 0:
            raise ConfigError(f"the params have MoE selection biases ({found[0]!r}, auxiliary-loss-free balancing) "
                              f"but model.moe.bias_update_rate={rate}; set a positive rate (DeepSeek-V3 used 0.001) "
                              "or freeze them with trainable=")
        return jax.tree.unflatten(treedef, [f if m else None for f, m in zip(flags, mask)])

    def _check_loco(self) -> None:
        """LoCo threads per-device error buffers through ZeRO's gathers and reduce-scatters of
        leaves split over ``data`` alone."""
        others = {a: n for a, n in self.mesh.shape.items() if a not in (DATA, REPLICA) and n > 1}
        if others:
            axis, size = next(iter(others.items()))
            raise ConfigError(f"zero.loco (qgZ error feedback) runs over data (and replica) parallelism; "
                              f"mesh.{axis}={size}: set it to 1 or zero.loco: false")

    def _check_local_tx(self) -> None:
        """An optimizer that communicates over ``data`` itself runs where the step can hand it
        whole local gradients and per-device state: over a mesh of ``data`` alone, at ZeRO-0, or
        at ZeRO 1-3 when it can take parameter shards (``reshard``)."""
        name = self.config.optimizer.type if self._user_optimizer is None else "the given optimizer"
        if self.tx.axis_name != DATA:
            raise ConfigError(f"{name} communicates over axis_name={self.tx.axis_name!r}; the step's data-parallel "
                              f"axis is {DATA!r}: build it with axis_name={DATA!r}")
        if self.stage != 0 and self.tx.reshard is None:
            raise ConfigError(
                f"optimizer {name} runs at zero.stage 0 only, not {self.stage} (0/1 Adam's local steps give each "
                "device its own parameters, which ZeRO's shards cannot hold): set zero.stage: 0, or use onebit_adam "
                "or onebit_lamb under ZeRO")
        z = self.config.zero
        zeropp = [key for key, on in (("quantized_gradients", z.quantized_gradients), ("loco", z.loco),
                                      ("quantized_weights", z.quantized_weights),
                                      ("hpz_partition_size", z.hpz_partition_size > 1)) if on]
        if zeropp:
            raise ConfigError(f"optimizer {name} compresses the gradients' communication itself (1-bit momentum) "
                              f"and takes whole local gradients; zero.{zeropp[0]} compresses ZeRO's own collectives: "
                              f"unset zero.{zeropp[0]}, or use adam/adamw with ZeRO++")
        others = {a: n for a, n in self.mesh.shape.items() if a != DATA and n > 1}
        if others:
            axis, size = next(iter(others.items()))
            raise ConfigError(f"optimizer {name} runs over data parallelism alone; mesh.{axis}={size}: set it to 1")
        if "cpu" in (z.offload_optimizer, z.offload_param):
            raise ConfigError(f"optimizer {name} keeps per-device state on the device; set zero.offload_optimizer "
                              "and zero.offload_param to none")

    def _manual(self, fn, in_specs, out_specs):
        """``jax.shard_map`` of ``fn``, manual over ``replica`` x ``data`` (the specs may name
        other axes: those parts are dropped here and stay with XLA)."""
        def manual(spec):
            return P(*(_keep_axes(part, BATCH_AXES) for part in spec))

        def specs(tree):
            return jax.tree.map(manual, tree, is_leaf=lambda x: isinstance(x, P))

        # size-1 axes are manual too: without tensor parallelism the program is fully manual
        manual_axes = set(BATCH_AXES) | {a for a, n in self.mesh.shape.items() if n == 1}
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs(in_specs), out_specs=specs(out_specs),
                             axis_names=manual_axes, check_vma=False)

    def _constrain(self, tree: Any, specs: Any) -> Any:
        return jax.tree.map(lambda x, spec: lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec)),
                            tree, specs)

    def _place(self, specs: TrainState) -> TrainState:
        """Shardings of the state; offloaded fields live in ``pinned_host`` memory between steps."""
        zero_cfg = self.config.zero

        def on(kind):
            return lambda spec: NamedSharding(self.mesh, spec, memory_kind=kind)

        host_master = "pinned_host" if "cpu" in (zero_cfg.offload_optimizer, zero_cfg.offload_param) else None
        host_opt = "pinned_host" if zero_cfg.offload_optimizer == "cpu" else None
        placed = jax.tree.map(on(None), specs)
        return placed.replace(
            master=jax.tree.map(on(host_master), specs.master),
            opt_state=jax.tree.map(on(host_opt), specs.opt_state),
        )

    def _to_device(self, state: TrainState) -> TrainState:
        """Inside jit: brings host-offloaded fields into device memory for the step."""
        def fetch(x, sharding):
            if sharding.memory_kind == "pinned_host":
                return jax.device_put(x, sharding.with_memory_kind("device"))
            return x

        shardings = self.state_sharding
        if state.opt_state is None:  # a frozen copy (per_example): parameters only
            shardings = shardings.replace(opt_state=None)
        return jax.tree.map(fetch, state, shardings)

    # -- init -------------------------------------------------------------------------

    def init(self, params: Any = None, rng: Any = None) -> TrainState:
        """Creates the sharded TrainState.

        Args:
          params: a params pytree (host or device arrays), an NNX module, or an init
            function ``fn(rng) -> params`` (run under jit with the state's
            out_shardings, so full params never sit on one device). None uses the
            ``model`` given to ``make_train_step``.
          rng: a PRNG key (default ``jax.random.key(config.seed)``).
        """
        rng = jax.random.key(self.config.seed) if rng is None else rng
        make_params, tree = self.prepare(params, rng)
        init_state = functools.partial(self._init_state, make_params)
        return jax.jit(init_state, out_shardings=self.state_sharding)(rng, tree)

    def prepare(self, params: Any = None, rng: Any = None):
        """Fixes layouts and shardings from the params' shapes without creating anything.

        ``init`` calls it; call it yourself before restoring a checkpoint instead of
        initializing (same arguments as ``init``). Returns ``(make_params, tree)``.
        """
        rng = jax.random.key(self.config.seed) if rng is None else rng
        make_params, tree = self.adapter.params_source(params)
        self._setup(jax.eval_shape(make_params, rng, tree))
        self.abstract_state = jax.eval_shape(functools.partial(self._init_state, make_params), rng, tree)
        return make_params, tree

    def _init_state(self, make_params, rng, tree) -> TrainState:
        layouts = self.layouts
        # an interleaved pipeline keeps its stacks in stage order (zero.to_stage_order)
        given = zero.stage_order(self.all_layouts, make_params(rng, tree))
        params = jax.tree.map(lambda x: jnp.asarray(x, self.dtypes.param), zero.select(layouts, given))
        frozen = None
        if self.frozen_layouts is not None:
            frozen = self._constrain(
                map_layouts(lambda lay, x: zero.to_stored(jnp.asarray(x, self.dtypes.compute), lay),
                            self.frozen_layouts, zero.select(self.frozen_layouts, given)),
                self.state_specs.frozen)
        stored = self._constrain(map_layouts(lambda lay, x: zero.to_stored(x, lay), layouts, params),
                                 self._param_specs)
        opt_state = self._constrain(self._local_init(stored) if self.local_tx else self.tx.init(stored),
                                    self._opt_specs)
        comm = None
        if self.loco:
            comm = self._constrain(map_layouts(lambda lay: jnp.zeros((self.data_size,) + lay.stored_shape, jnp.float32)
                                               if lay.sharded else None, layouts), self._comm_specs)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            comm=comm,
            replicated=jax.tree.map(lambda x: x.astype(self.replicated_dtype), params) if self.keeps_replicated else None,
            master=stored if self.keeps_master else None,
            opt_state=opt_state,
            loss_scale=self.scaler.init(),
            rng=jax.random.fold_in(rng, 1),
            frozen=frozen,
            layout_def=self.layout_def,
        )

    # -- the step ---------------------------------------------------------------------

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """One optimizer step on the global batch (host arrays or sharded jax arrays)."""
        state, metrics = self._step(state, self.shard_batch(batch))
        if self.config.loss_scale.at_min == "error" and self.scaler_enabled:
            if bool(state.loss_scale.overflow_at_min):
                raise LossScaleError(
                    "fp16 gradients overflowed at min_loss_scale="
                    f"{self.config.loss_scale.min_loss_scale}; lower the learning rate or set "
                    "loss_scale.at_min: skip to keep skipping such steps"
                )
        return state, metrics

    @property
    def _quantization_block(self) -> int | None:
        """ZeRO++ qwZ: the block of ZeRO-3's int8 parameter gathers, or None (exact gathers)."""
        return self.config.zero.quantization_block if self.config.zero.quantized_weights else None

    @property
    def _node_size(self) -> int | None:
        """ZeRO++ qgZ: the devices of ``data`` per node, or None (exact reduce-scatters)."""
        z = self.config.zero
        if not z.quantized_gradients:
            return None
        node = z.node_size or self.data_size
        if self.data_size % node:
            raise ConfigError(f"zero.node_size={node} does not divide mesh.data={self.data_size}; a node is a group "
                              "of consecutive data devices: use a divisor")
        return node

    @property
    def scaler_enabled(self) -> bool:
        ls = self.config.loss_scale
        enabled = ls.enabled if ls.enabled is not None else self.dtypes.compute == jnp.float16
        return bool(enabled and ls.dynamic)

    def lower(self, state: TrainState, batch: Any):
        """AOT-lowers the step (``.compile().memory_analysis()``, ``.as_text()``)."""
        return self._step.lower(state, self.shard_batch(batch))

    def batch_sharding_for(self, shape: tuple[int, ...]) -> NamedSharding:
        """Where a global batch leaf of ``shape`` goes: its rows split over ``replica`` x
        ``data``; under sequence parallelism a leaf ``[B, L, ...]`` whose ``L`` divides by
        the axis that ``length`` is ruled to is split along it too (shifted inputs and
        targets, ``zjax.data.loader.shift_tokens``; ``[B, T+1]`` token windows stay whole)."""
        seq = self.config.logical_axis_rules.get("length")
        size = self.mesh.shape.get(seq, 1) if seq else 1
        if size > 1 and len(shape) >= 2 and shape[1] % size == 0:
            return NamedSharding(self.mesh, logical_spec(("batch", "length"), self.config.logical_axis_rules))
        return self.batch_sharding

    def shard_batch(self, batch: Any) -> Any:
        """Places a global batch on the mesh, split over ``data`` along axis 0 (``batch_sharding_for``)."""
        def place(x):
            if np.ndim(x) == 0 or x.shape[0] != self.global_batch_size:
                raise ConfigError(
                    f"batch leaf with shape {np.shape(x)} does not have the global batch size "
                    f"batch.global_batch_size={self.global_batch_size} as its first axis; pass the global batch"
                )
            sharding = self.batch_sharding_for(np.shape(x))
            if isinstance(x, jax.Array) and x.sharding == sharding:
                return x
            return jax.device_put(x, sharding)

        return jax.tree.map(place, batch)

    def _global_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        """The step on global arrays: gradients (in shard_map), the update, the gather."""
        state = self._to_device(state)
        grads, loss, finite, grad_norm, extras, comm = self._grads(self._quantized_for_loss(state), batch)
        if self.keeps_master:
            master = state.master
        else:
            # The replicated params are the master; each device updates its own slice of them.
            master = self._constrain(map_layouts(lambda lay, x: zero.to_stored(x, lay), self.layouts, state.replicated),
                                     self._param_specs)
        tx_grads = grads if self._balance is None else jax.tree.map(
            lambda g, bias: jnp.zeros_like(g) if bias else g, grads, self._balance)
        if self.local_tx:
            updates, opt_state = self._local_update(tx_grads, state.opt_state, master)
        else:
            updates, opt_state = self.tx.update(tx_grads, state.opt_state, master)
        new_master = optax.apply_updates(master, updates)
        if self._balance is not None:  # auxiliary-loss-free balancing: -rate * sign(load - mean load)
            rate = self.config.model.moe.bias_update_rate
            new_master = jax.tree.map(
                lambda new, old, g, bias: (old - rate * jnp.sign(g.mean(0) if self.local_tx else g)).astype(old.dtype)
                if bias else new, new_master, master, grads, self._balance)
        new_master = self._constrain(loss_scale.select_tree(finite, new_master, master), self._param_specs)
        opt_state = self._constrain(loss_scale.select_tree(finite, opt_state, state.opt_state), self._opt_specs)
        applied = state.step - state.loss_scale.skipped
        new_state = state.replace(
            step=state.step + 1,
            replicated=self._gather(new_master) if self.keeps_replicated else None,
            master=new_master if self.keeps_master else None,
            opt_state=opt_state,
            loss_scale=self.scaler.update(state.loss_scale, finite),
            comm=None if comm is None else self._constrain(loss_scale.select_tree(finite, comm, state.comm),
                                                           self._comm_specs),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.schedule(applied) if self.schedule is not None else jnp.float32(jnp.nan),
            "loss_scale": state.loss_scale.scale,
            "skipped": (~finite).astype(jnp.int32),
            **extras,
        }
        return new_state, metrics

    def _quantized_for_loss(self, state: TrainState) -> TrainState:
        """``state`` with the parameters the loss reads fake-quantized (``compression.weight_quantization``:
        the replicated copy, or ZeRO-3's master) on global arrays; the update still goes to the float
        master, with the gradient taken at the quantized weights (straight through)."""
        groups = self.config.compression.weight_quantization
        if not groups:
            return state
        applied = state.step - state.loss_scale.skipped
        if self.zero.gathers_for_loss:
            return state.replace(master=self._constrain(
                compression.quantize_weights(state.master, groups, applied), self._param_specs))
        replicated = compression.quantize_weights(state.replicated, groups, applied)
        return state.replace(replicated=self._constrain(replicated, map_layouts(lambda lay: lay.model_spec,
                                                                                self.layouts)))

    def _local_grads(self, state: TrainState, batch: Any):
        """The per-device program (inside shard_map): this device's part of the reduced,
        unscaled and clipped gradients, the loss, whether every gradient is finite, and the
        gradient's global norm before clipping."""
        calls: list = []
        with layer_context(self.config.remat, sharded_params=self.zero.reduces_in_backward, calls=calls, gathered={}), \
                axis_rules(self.config.logical_axis_rules), sequence_parallel(self.config.sequence_parallel), \
                tiling(mlp=self.config.tiling.mlp_tiles, loss=self.config.tiling.loss_tiles), \
                zero.quantized_gathers(self._quantization_block), \
                zero.quantized_reductions(self._node_size, self.config.zero.quantization_block,
                                          self.config.zero.loco_err_beta), \
                zero.secondary_partition(self.config.zero.hpz_partition_size), \
                zero.hierarchical_gathers(self.config.zero.node_size if self.config.zero.hierarchical_gathers
                                          else None), \
                zero.local_gradients(self.local_tx and self.zero.gathers_for_loss), \
                compression.activation_quantization(self.config.compression.activation_quantization,
                                                    state.step - state.loss_scale.skipped):
            grads, loss, weight, extras, comm = self._accumulate(state, batch)
        if not calls and self.config.remat.policy != "none":
            logger.warning(
                "remat.policy=%r had no effect: the model calls neither zjax.layer nor zjax.scan_layers, the seams "
                "where zjax applies a remat policy (and gathers ZeRO-3 layers one at a time); call each block "
                "of a Python loop as zjax.layer(block)(x), or pass a stacked layer tree through "
                "zjax.scan_layers(layer_fn, carry, stacked_params), or set remat.policy: none",
                self.config.remat.policy)
        layouts = self.layouts
        # one pass: divide by loss scale x total weight and check every element is finite
        specs = map_layouts(lambda lay: lay.shard_spec, layouts)
        split_over = zero.auto_axes(specs)

        def unscale(grads, divisor):
            grads, ok = pallas_kernels.unscale_and_check(
                jax.tree.map(lambda g: g.astype(jnp.float32), grads), divisor, impl=self.config.kernels)
            if split_over:  # each tensor shard checked its part
                ok = lax.psum((~ok).astype(jnp.int32), split_over) == 0
            return grads, ok

        # a communicating optimizer averages the devices' local gradients itself: each is scaled as
        # a mean over the device's share of the total weight
        share = self.data_size if self.local_tx else 1
        grads, local_finite = zero.on_model_shards(unscale, (specs, P()), (specs, P()))(
            grads, weight / share * state.loss_scale.scale)
        finite = (lax.psum((~local_finite).astype(jnp.int32), DATA) == 0
                  if self.zero.partitioned or self.local_tx else local_finite)
        # Split leaves add their shards' squares over devices; whole leaves count once.
        pairs = list(zip(jax.tree.leaves(layouts, is_leaf=zero.is_layout), jax.tree.leaves(grads)))
        if self._balance is not None:  # MoE selection biases' gradients are load counts, not gradients
            pairs = [(lay, g) for (lay, g), bias in zip(pairs, jax.tree.leaves(self._balance)) if not bias]
        split = sum((jnp.sum(jnp.square(g)) for lay, g in pairs if lay.sharded), jnp.float32(0))
        whole = sum((jnp.sum(jnp.square(g)) for lay, g in pairs if not lay.sharded), jnp.float32(0))
        if self.local_tx:  # the mean gradient never exists: the devices' local norms' root mean square
            grad_norm = jnp.sqrt(lax.pmean(split + whole, DATA))  # every leaf whole and local
        else:
            grad_norm = jnp.sqrt(lax.psum(split, DATA) + whole)
        clip = self.config.gradient_clipping
        if clip > 0:
            coef = jnp.minimum(1.0, clip / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: g * coef, grads)
        return (_per_device(grads) if self.local_tx else grads, loss, finite, grad_norm, extras,
                None if comm is None else _per_device(comm))

    def _compute_params(self, state: TrainState):
        """The differentiable inputs of the loss, what else it reads (``extra``: the replicated
        compute copy at ZeRO-2, the frozen params) and ``to_params(diff, extra)``, the user's
        params (the trainable ones from the inputs, the frozen ones merged in, gathered at
        ZeRO-3). ``extra`` is explicit so that a pipeline can hand each stage its chunk."""
        diff, extra, to_params = self._trainable_params(state)
        if self.frozen_layouts is None:
            return diff, (extra, None), lambda d, e, errors=None: to_params(d, e[0], errors)
        dt, stacked_ok, gathers = self.dtypes, not self._whole_stacks, self.zero.gathers_for_loss
        frozen_layouts = self.frozen_layouts

        def params(d, e, errors=None):
            frozen = e[1]
            if gathers:
                frozen = map_layouts(
                    lambda lay, s: zero.ShardedParam(s, lay, dt.compute, dt.reduce)
                    if lay.stacked and stacked_ok else gather_param(s, lay, dt.compute, dt.reduce),
                    frozen_layouts, frozen)
            return zero.merge_frozen(to_params(d, e[0], errors), frozen)

        return diff, (extra, state.frozen), params

    def _stage_specs(self) -> dict:
        """How ``_compute_params``' ``diff`` and ``extra`` split over ``stage`` (the pipeline's specs)."""
        compute_copy = self.layouts if self.zero.reduces_in_backward and not self.zero.gathers_for_loss else None
        extra = (compute_copy, self.frozen_layouts)
        return {"diff_specs": pipeline.stage_specs(self.layouts),
                "extra_specs": jax.tree.map(pipeline.stage_specs, extra, is_leaf=lambda x: x is None)}

    def _trainable_params(self, state: TrainState):
        """The differentiable inputs of the loss, the replicated compute copy they are read with
        (ZeRO-2; else None) and how to turn both into the trainable params.

        Stages 2 and 3 differentiate with respect to this device's shard, so every
        parameter's gradient is reduce-scattered as soon as its (layer's) backward pass
        has produced it: ZeRO-3 gathers the shard, ZeRO-2 reads the replicated copy.
        ``to_params(d, extra, errors)``: ``errors`` are LoCo's buffers (this device's), which
        the gathers take as inputs whose cotangents are the new buffers (None: without LoCo).
        """
        layouts, dt = self.layouts, self.dtypes
        # A stack the model scans itself is gathered whole; zjax.scan_layers opens placeholders.
        placeholders = not self._whole_stacks
        if self.zero.gathers_for_loss:
            def to_params(d, _, errors=None):
                errors = _none_tree(layouts) if errors is None else errors
                return map_layouts(
                    lambda lay, s, err: zero.ShardedParam(s, lay, dt.compute, dt.reduce, error=err)
                    if lay.stacked and placeholders
                    else gather_param(s, lay, dt.compute, dt.reduce, err),
                    layouts,
                    d,
                    errors,
                )

            return state.master, None, to_params
        replicated = state.replicated
        if self.local_tx and self.tx.local_offset is not None and state.opt_state is not None:
            # 0/1 Adam's local steps: this device's parameters are the consensus plus its own offset
            replicated = jax.tree.map(jnp.add, replicated, self.tx.local_offset(_one_device(state.opt_state)))
        compute = jax.tree.map(lambda x: x.astype(dt.compute), replicated)
        if self.zero.reduces_in_backward:
            def to_params(d, compute, errors=None):
                errors = _none_tree(layouts) if errors is None else errors
                return map_layouts(
                    lambda lay, s, full, err: zero.ShardedParam(s, lay, dt.compute, dt.reduce, full=full, error=err)
                    if lay.stacked and placeholders
                    else zero.take_for_compute(s, full, lay, dt.reduce, err),
                    layouts,
                    d,
                    compute,
                    errors,
                )

            shards = map_layouts(lambda lay, x: zero.local_slice(zero.to_stored(x, lay), lay), layouts, compute)
            return shards, compute, to_params
        # Marked varying so that the gradient stays local until we reduce it.
        return jax.tree.map(lambda x: lax.pcast(x, DATA, to="varying"), compute), None, lambda d, _, errors=None: d

    def _params_for_loss(self, state: TrainState, sample: Any, key: Any, probe: Callable | None = None):
        """``_compute_params``, after finding out once, by tracing the loss on ``sample`` (one
        micro-batch), whether the model passes its ``layers`` stacks through ``zjax.scan_layers``.
        A model that scans them itself (Linen ``nn.scan``, NNX ``nnx.scan``) cannot take the
        per-layer placeholders of ZeRO-2/3: its stacks are then gathered whole for the loss."""
        stacked = any(lay.stacked for lay in jax.tree.leaves(self.layouts, is_leaf=zero.is_layout))
        if self._whole_stacks is None and self.zero.reduces_in_backward and stacked:
            self._whole_stacks = False

            def trace(state):
                diff, extra, to_params = self._compute_params(state)
                run = probe or (lambda params, batch, k: self._weighted_loss(params, batch, k))
                jax.eval_shape(lambda d, e: run(to_params(d, e), sample, key), diff, extra)

            try:
                trace(state)
            except Exception as placeholder_error:  # noqa: BLE001 - retried below with whole stacks
                self._whole_stacks = True
                try:
                    trace(state)
                except Exception:
                    self._whole_stacks = None
                    raise placeholder_error from None
                logger.warning(
                    "the model does not pass its 'layers' stacks through zjax.scan_layers (a Linen nn.scan or "
                    "NNX nnx.scan stack?): ZeRO-%d gathers each stack whole for the loss instead of one layer at "
                    "a time; call zjax.scan_layers(layer_fn, carry, stacked_params) for per-layer gathering",
                    self.stage)
        return self._compute_params(state)

    def _weighted_loss(self, params, batch, key, adapter=None):
        """(loss * weight, weight, {name: value * weight}) of one micro-batch, in float32: the
        loss's aux dict may hold a ``weight`` and any other scalars (metrics the step reports as
        their weighted mean, e.g. an MoE's dropped-token fraction)."""
        loss, aux = (adapter or self.adapter).loss_fn(params, batch, key)
        aux = aux if isinstance(aux, dict) else {}
        weight = lax.stop_gradient(jnp.asarray(aux.get("weight", 1.0), jnp.float32))
        extras = {name: lax.stop_gradient(jnp.asarray(value, jnp.float32)) * weight for name, value in aux.items()
                  if name != "weight" and name not in METRICS and jnp.ndim(value) == 0}
        return loss.astype(jnp.float32) * weight, weight, extras

    @contextlib.contextmanager
    def _forward_context(self, state: TrainState):
        """What the model's forward reads while traced outside the step (evaluate, per_example):
        no remat, the placement rules, sequence parallelism, tiling, qwZ, activation quantization."""
        with layer_context("none", sharded_params=self.zero.reduces_in_backward, gathered={}), \
                axis_rules(self.config.logical_axis_rules), sequence_parallel(self.config.sequence_parallel), \
                tiling(mlp=self.config.tiling.mlp_tiles, loss=self.config.tiling.loss_tiles), \
                zero.quantized_gathers(self._quantization_block), \
                compression.activation_quantization(self.config.compression.activation_quantization,
                                                    state.step - state.loss_scale.skipped):
            yield

    def evaluate(self, state: TrainState, batch: Any) -> jax.Array:
        """The (weighted) mean loss on a global batch, without updating anything."""
        if self._eval is None:
            def local(state, batch):
                key = jax.random.fold_in(state.rng, 2**31 - 1)
                state = state.replace(opt_state=None)  # the (consensus) parameters, not a device's own
                with self._forward_context(state):
                    diff, extra, to_params = self._params_for_loss(state, batch, key)
                    if self.schedule_table is None:
                        lw, w, _ = self._weighted_loss(to_params(diff, extra), batch, key, self._eval_adapter)
                    else:
                        lw, w, _ = pipeline.pipeline_loss(
                            lambda d, e, mb, k: self._weighted_loss(to_params(d, e), mb, k, self._eval_adapter),
                            diff, extra, batch,
                            key, schedule=self.schedule_table, **self._stage_specs())
                return lax.psum(lw, BATCH_AXES) / lax.psum(w, BATCH_AXES)

            local_eval = self._manual(local, in_specs=(self.state_specs, P(BATCH_AXES)), out_specs=P())
            self._eval = jax.jit(lambda state, batch: local_eval(self._quantized_for_loss(self._to_device(state)),
                                                                 batch))
        return self._eval(state, self.shard_batch(batch))

    def per_example(self, state: TrainState, batch: Any, fn: Callable) -> Any:
        """``fn(params_or_module, batch)`` on the sharded state, without updating anything: its
        output (arrays with the batch as their leading axis, e.g. per-token log-probs or values)
        comes back as global arrays split over the batch axes.

        The params reach ``fn`` as they reach the loss (gathered a layer at a time at ZeRO-3),
        so frozen copies of a model (RLHF's reference and reward models) are a ``TrainState``
        whose ``opt_state`` is None, run here. ``fn`` is traced once per function object.
        """
        if self.schedule_table is not None:
            raise ConfigError("per_example runs the model on each data-parallel device; with mesh.stage > 1 the "
                              "model is split into pipeline stages: use mesh.stage: 1 for this model")
        state = state.replace(opt_state=None)
        if fn not in self._per_example:
            def local(state, batch):
                key = jax.random.fold_in(state.rng, 2**31 - 2)
                with self._forward_context(state):
                    diff, extra, to_params = self._params_for_loss(
                        state, batch, key, probe=lambda params, b, _: fn(self.adapter.to_user(params), b))
                    return fn(self.adapter.to_user(to_params(diff, extra)), batch)

            specs = self.state_specs.replace(opt_state=None)
            run = self._manual(local, in_specs=(specs, P(BATCH_AXES)), out_specs=P(BATCH_AXES))
            self._per_example[fn] = jax.jit(lambda state, batch: run(self._quantized_for_loss(self._to_device(state)),
                                                                     batch))
        return self._per_example[fn](state, self.shard_batch(batch))

    def _accumulate(self, state: TrainState, batch: Any):
        """Scans micro-batches; returns summed (weighted, scaled) grads, mean loss, total weight."""
        layouts, dt, in_backward = self.layouts, self.dtypes, self.zero.reduces_in_backward
        accum, micro = self.grad_accum_steps, self.micro_batch_size
        batch = jax.tree.map(lambda x: x.reshape((accum, micro) + x.shape[1:]), batch)
        scale = state.loss_scale.scale
        device = lax.axis_index(REPLICA) * self.data_size + lax.axis_index(DATA)
        step_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device)
        diff, extra, to_params = self._params_for_loss(state, jax.tree.map(lambda x: x[0], batch), step_key)

        # LoCo: this device's error buffers; at ZeRO-2/3 the gathers take them as inputs whose
        # cotangents are the new buffers, carried from micro-batch to micro-batch
        errors = None if state.comm is None else _one_device(state.comm)
        reset = self.config.zero.loco_reset_steps
        if errors is not None and reset:
            errors = jax.tree.map(lambda e: jnp.where(state.step % reset == 0, 0.0, e), errors)
        # ZeRO-3 under a communicating optimizer (1-bit Adam, LAMB): the gathers take a zero "sink"
        # per parameter (its stored shape) whose cotangent is the whole local gradient, nothing
        # reduced (zero.local_gradients); the sinks' cotangents are summed over the micro-batches
        sinks = self.local_tx and self.zero.gathers_for_loss
        if sinks:
            errors = map_layouts(lambda lay: jnp.zeros(lay.stored_shape, jnp.float32), layouts)  # the sums
            # what the gathers add: 0/1 Adam's offsets from the consensus (its local steps), else zeros
            sink_in = errors if self.tx.local_offset is None else jax.tree.map(
                lambda o: o.astype(jnp.float32), self.tx.local_offset(_one_device(state.opt_state)))
            sink_in = jax.tree.map(lambda x: lax.pcast(x, DATA, to="varying"), sink_in)
        errors_in_backward = errors is not None and in_backward

        def micro_loss(d, mb, key):
            d, errs = d if errors_in_backward else (d, None)
            lw, w, extras = self._weighted_loss(to_params(d, extra, errs), mb, key)
            return lw * scale, (lw, w, extras)

        if self.schedule_table is None:
            grad_fn = jax.grad(micro_loss, has_aux=True)
        else:  # the pipeline differentiates each stage itself
            def grad_fn(d, mb, key):
                g, lw, w, extras = pipeline.pipeline_grads(
                    lambda d, e, mb, k: self._weighted_loss(to_params(d, e), mb, k), d, extra, mb, key,
                    schedule=self.schedule_table, seed=scale, accum_dtype=dt.accum, **self._stage_specs())
                return g, (lw, w, extras)

        if not in_backward:
            acc0 = map_layouts(lambda lay, x: zero.constrain(jnp.zeros(x.shape, dt.accum), lay), layouts,
                               state.replicated)
        else:
            acc0 = map_layouts(lambda lay: zero.constrain(jnp.zeros(lay.data_shape, dt.accum), lay, shard=True),
                               layouts)

        def body(carry, xs):
            acc, loss_sum, w_sum, extras_sum, errs = carry
            mb, i = xs
            # stages 2-3: g is already this device's reduce-scattered shard
            if sinks:
                (g, ct), (lw, w, extras) = grad_fn((diff, sink_in), mb, jax.random.fold_in(step_key, i))
                errs = jax.tree.map(jnp.add, errs, ct)
            elif errors_in_backward:
                (g, errs), (lw, w, extras) = grad_fn((diff, errs), mb, jax.random.fold_in(step_key, i))
            else:
                g, (lw, w, extras) = grad_fn(diff, mb, jax.random.fold_in(step_key, i))
            acc = jax.tree.map(lambda a, x: a + x.astype(dt.accum), acc, g)
            return (acc, loss_sum + lw, w_sum + w, jax.tree.map(jnp.add, extras_sum, extras), errs), None

        # the loss's extra scalars (their names), summed like the loss
        names = jax.eval_shape(lambda d: self._weighted_loss(to_params(d, extra), jax.tree.map(lambda x: x[0], batch),
                                                             step_key)[2], diff)
        carry0 = jax.tree.map(lambda x: lax.pcast(x, DATA, to="varying"),
                              (acc0, jnp.float32(0), jnp.float32(0), {n: jnp.float32(0) for n in names}, errors))
        (acc, loss_sum, w_sum, extras_sum, errors), _ = lax.scan(body, carry0, (batch, jnp.arange(accum)))

        if sinks:  # the whole local gradients, stored shapes
            acc, errors = errors, None
        elif self.local_tx:  # the optimizer reduces them (compressed)
            acc = map_layouts(lambda lay, x: zero.to_stored(x, lay), layouts, acc)
        elif not in_backward and errors is not None:
            pairs = map_layouts(lambda lay, x, e: zero.reduce_scatter_grads(zero.to_stored(x.astype(dt.reduce), lay),
                                                                            lay, e) if e is not None else
                                (zero.reduce_scatter_grads(zero.to_stored(x.astype(dt.reduce), lay), lay), None),
                                layouts, acc, errors)
            acc = map_layouts(lambda lay, pair: pair[0], layouts, pairs)
            errors = map_layouts(lambda lay, pair: pair[1], layouts, pairs)
        elif not in_backward:
            acc = map_layouts(
                lambda lay, x: zero.reduce_scatter_grads(zero.to_stored(x.astype(dt.reduce), lay), lay), layouts, acc
            )
        if self.replica_size > 1:
            # ZeRO reduced inside each replica; one all-reduce of the shards averages across replicas.
            acc = lax.psum(acc, REPLICA)
        total_w = lax.psum(w_sum, BATCH_AXES)
        loss = lax.psum(loss_sum, BATCH_AXES) / total_w
        extras = {n: lax.psum(v, BATCH_AXES) / total_w for n, v in extras_sum.items()}
        return acc, loss, total_w, extras, errors
