"""``zjax plan``: per-device memory of every ZeRO stage, before anything runs.

Two accountings side by side (Ψ parameters, N data devices):

- the ZeRO paper's (Rajbhandari et al. 2020, Table 1): fp16 params (2Ψ) and grads
  (2Ψ) plus K = 12 bytes of Adam state per parameter; stage 1 is 4Ψ + 12Ψ/N,
  stage 2 is 2Ψ + 14Ψ/N, stage 3 is 16Ψ/N;
- zjax's own: what its ``TrainState`` holds (``zjax.train.step``'s table; docs/architecture.md), the
  gradient buffers its step allocates (a full local accumulator in
  ``precision.accum_dtype`` for stages 0-1, a sharded one (Ψ/N) for stages 2-3, and,
  when ``grad_accum_steps > 1``, the micro-step gradient of the scanned layers next to
  it), and, from the
  traced model, the batch, the activations the remat policy keeps and the workspace
  of one layer's backward pass.

The workspace is what XLA's temp holds beyond the buffers above while the peak
(one layer's backward pass) runs, by named terms:

- ``layer params and grads``: the largest layer's parameters in the compute dtype
  (ZeRO-3 gathers them, the others read them) and their gradient in the reduce
  dtype before it is reduced or accumulated; in stages 2-3, which reduce-scatter each
  parameter's gradient as soon as it is made, only the largest one parameter's;
- ``unscanned grads`` (stages 2-3): the full gradient of the parameters outside the
  scanned layers (embedding, final norm), which collects the head's part before the
  layers' backward and the input embedding's after it, then is reduce-scattered
  (stages 0-1 count it in the gradient row);
- ``layer backward``: the backward pass of that layer walks it in reverse, freeing
  each activation after its last use while each cotangent is made and consumed, so
  half of what it reads is live on average: half of the activations it
  rematerializes (all of one layer's activations, ``remat: none``'s, less what the
  policy keeps) plus half of one layer's activations as cotangents;
- ``compute copy`` (stage 0 in mixed precision only): the step's cast of the fp32
  params to the compute dtype.

On CPU, XLA computes bfloat16 and float16 in float32, so there the activations and
the layer terms take float32's bytes.

For a config whose step can be compiled here, ``plan`` lowers and compiles the
reference GPT's step for each stage and sets the prediction against
``memory_analysis()``: argument plus temp bytes, both per device. Measured on 8 CPU
devices, stages 0-3 x remat none/full/selective x ``grad_accum_steps`` 1, 2 and 4:
within 10% (0.95-1.09) on ``configs/tiny.yaml`` (tests/analysis/test_plan.py) and on a wider,
deeper, longer variant. The stage 2-3 and accumulation terms were read off XLA's live
ranges at the peak (``XLA_FLAGS=--xla_dump_to=DIR``'s ``*live-range.txt``). In
bfloat16 on CPU the prediction is low: ZeRO-2 by 10-12% (remat any, no
accumulation), and with ``grad_accum_steps: 2`` (remat full) stages 1-3 by 12-21%;
for ZeRO-2 the live ranges show XLA:CPU upcasting the whole replicated bfloat16
stack to float32 outside the layer scan, which no term counts.
Under tensor parallelism (``mesh.tensor`` = T) every row counts each device's share:
weights split over ``tensor`` count 1/T (exactly, leaf by leaf, when compiled), and the
reference GPT's activations inside its attention and MLP (and, with
``tensor_sequence_parallel``, the residual stream's) count 1/T. That prediction is low:
predicted/compiled on ``configs/tiny.yaml``, stages 0-3 x remat none/full, 0.76-0.92 at
T=2 and 0.56-0.75 at T=4 (each data device then runs a T times larger micro-batch,
whose backward workspace is under-counted). The tensor axis' collectives are predicted
exactly (``tensor_traffic``, within 1% of the compiled HLO's).
Under sequence parallelism (``mesh.sequence`` = P) the ZeRO group is ``data`` x
``sequence`` (its devices share the weights, as in DeepSpeed-Ulysses), so the state
rows divide by D·P; every activation of a layer holds 1/P of the sequence, so the
activation rows count 1/P; attention's collectives over ``sequence`` are predicted by
mode (``sequence_traffic``: Ulysses' all-to-alls, ring's K/V permutes, all-gather's
gather and reduce-scatter). The weights' gradient is summed over ``sequence`` by XLA
(an all-reduce on XLA:CPU, counted with the data axis' collectives). The memory
prediction is low here too: predicted/compiled 0.72-0.90 on ``configs/tiny.yaml`` at
P=2-4 (modes ulysses/ring/all_gather, remat none/full; XLA's temp grows with the
gathers and the gradient's sum over ``sequence``, which no row counts).
Under expert parallelism (``mesh.expert`` = E_p, with ``model.moe``) the experts' weights
count 1/E_p (the router and the dense parts stay whole) and, since the batch is split over
``expert`` too, the batch and activation rows count 1/E_p: predicted/compiled 1.05-1.13 at
E_p = 4 x data 2, stages 0-3 (tests/analysis/test_plan.py).
``fit`` searches the cheapest setting whose compiled step fits a budget, the tensor
and sequence axes included.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from zjax.parallel import zero
from zjax.parallel.pipeline import bubble_fraction
from zjax.parallel.zero import ZeroStage
from zjax.config.schema import Config, load_config, resolve_mesh_shape
from zjax.errors import ConfigError

GB = 1e9
STAGES = (0, 1, 2, 3)
STAGE_NAMES = ("baseline", "optimizer states", "+ gradients", "+ parameters")
PAPER_ROWS = ("params", "gradients", "optimizer state")
ZJAX_ROWS = ("compute params", "master params", "moments", "gradients", "batch", "activations", "workspace")
# What the step traces, not what the state holds: None in an analytic plan.
TRACED_ROWS = ("batch", "activations", "workspace")
# --fit's order of remat policies, lightest (least recomputation) first.
FIT_POLICIES = ("none", "selective", "full")
# Bytes of optimizer moments per parameter: Adam keeps m and v in fp32, Lion one momentum.
_MOMENT_BYTES = {"adam": 8, "adamw": 8, "lion": 4}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class StagePlan:
    """Per-device bytes of one ZeRO stage.

    Attributes:
      stage: the ZeRO stage.
      paper: the ZeRO paper's rows (``PAPER_ROWS``) in bytes.
      zjax: zjax's rows (``ZJAX_ROWS``) in bytes; the ``TRACED_ROWS`` are None without a compile.
      workspace: the named terms of the ``workspace`` row (empty without a compile).
      compiled: from the compiled step, else None: ``argument`` and ``temp`` bytes of
        ``memory_analysis()``, ``total`` (their sum), ``predicted`` (zjax's total) and
        ``ratio`` (predicted / compiled).
    """

    stage: int
    paper: dict[str, float]
    zjax: dict[str, float | None]
    workspace: dict[str, float] = dataclasses.field(default_factory=dict)
    compiled: dict[str, float] | None = None

    @property
    def paper_total(self) -> float:
        return sum(self.paper.values())

    @property
    def zjax_total(self) -> float:
        return sum(v for v in self.zjax.values() if v is not None)


@dataclasses.dataclass
class Plan:
    """The plan of a config: its size, chosen stage and one ``StagePlan`` per stage."""

    params: int
    devices: int
    chosen_stage: int
    compute_dtype: str
    remat: str
    stages: list[StagePlan]
    note: str = ""
    tensor: int = 1
    tensor_traffic: dict[str, Any] | None = None
    sequence: int = 1
    sequence_traffic: dict[str, Any] | None = None
    pipeline: dict[str, Any] | None = None

    def to_json(self) -> dict:
        return {
            "params": self.params,
            "devices": self.devices,
            "tensor": self.tensor,
            "tensor_traffic": self.tensor_traffic,
            "sequence": self.sequence,
            "sequence_traffic": self.sequence_traffic,
            "pipeline": self.pipeline,
            "chosen_stage": self.chosen_stage,
            "compute_dtype": self.compute_dtype,
            "remat": self.remat,
            "note": self.note,
            "stages": [
                {
                    "stage": s.stage,
                    "paper": {**s.paper, "total": s.paper_total},
                    "zjax": {**s.zjax, "total": s.zjax_total},
                    "workspace": s.workspace,
                    "compiled": s.compiled,
                }
                for s in self.stages
            ],
        }


def plan(config: Any = None, overrides=None, *, params: float | None = None,
         devices: int | None = None, compile: bool = True) -> Plan:
    """The per-device memory of every ZeRO stage for ``config``.

    Args:
      config: a config path, dict or ``Config`` (default: every default).
      overrides: ``key=value`` overrides, as for ``load_config``.
      params: a parameter count to plan for instead of the config's reference GPT;
        analytic only (nothing is compiled).
      devices: the number of data-parallel devices (default: the visible devices).
      compile: compile each stage's step when the config's model can be built here.

    Returns:
      A ``Plan``.

    Example:
      >>> p = plan(params=7.5e9, devices=64)
      >>> [round(s.paper_total / 1e9, 2) for s in p.stages]
      [120.0, 31.41, 16.64, 1.88]
    """
    cfg = config if isinstance(config, Config) else load_config(Config() if config is None else config, overrides)
    import jax

    visible = len(jax.devices())
    n = visible if devices is None else int(devices)
    if n < 1:
        raise ConfigError(f"--devices={devices}: the device count must be at least 1")
    note = ""
    if params is None:
        from zjax.models.gpt import count_params

        psi = count_params(cfg.model)
        if compile and n != visible:
            note = (f"compiled: n/a (--devices={n} but {visible} devices are visible; "
                    f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} on CPU)")
            compile = False
    else:
        psi = int(params)
        if psi < 1:
            raise ConfigError(f"--params={params}: the parameter count must be at least 1")
        compile = False
        note = "analytic only (--params): batch, activations and workspace n/a"
    # ZeRO shards over data x sequence; the other mesh axes (tensor, replica) divide the devices.
    shape = resolve_mesh_shape(cfg.mesh, n)
    data, tensor, sequence, stages = shape["data"], shape["tensor"], shape["sequence"], shape["stage"]
    group = data * sequence
    # Tensor parallelism splits the weights T ways (the norm scales, a rounding error, stay whole);
    # a pipeline stage holds 1/P of the layers and the whole embedding (replicated on every stage).
    local = psi / tensor
    moe = cfg.model.moe
    if params is None and moe.num_experts and shape["expert"] > 1:
        # the experts' weights are split over mesh.expert (the router and the rest are not)
        experts = (cfg.model.n_layers // moe.every) * 3 * cfg.model.d_model * (moe.d_ff or cfg.model.d_ff) \
            * moe.num_experts
        local = (psi - experts * (1 - 1 / shape["expert"])) / tensor
    pipe = None
    if stages > 1:
        from zjax.models.gpt import count_params as _count

        layers = _count(cfg.model) - _count(cfg.model.model_copy(update={"n_layers": 0}))
        local = (psi - layers + layers / stages) / tensor
        m = cfg.pipeline.microbatches
        pipe = {"schedule": cfg.pipeline.schedule, "stages": stages, "microbatches": m,
                "bubble": bubble_fraction(stages, m, cfg.pipeline.repeats)}
        if cfg.pipeline.repeats > 1:
            pipe["repeats"] = cfg.pipeline.repeats
    stage_plans = [
        compiled_stage_plan(load_config(cfg, {"zero.stage": stage})) if compile
        else StagePlan(stage, paper_bytes(local, group, stage), zjax_bytes(cfg, local, group, stage))
        for stage in STAGES
    ]
    traffic = seq_traffic = None
    if params is None and (tensor > 1 or sequence > 1):
        _, micro, accum = cfg.batch.resolve(shape["replica"] * data)
        if tensor > 1:
            traffic = tensor_traffic(cfg, micro, tensor, accum)
        if sequence > 1:
            seq_traffic = sequence_traffic(cfg, micro, tensor, sequence, accum)
    return Plan(psi, n, cfg.zero.stage, cfg.precision.compute_dtype, cfg.remat.policy, stage_plans, note, tensor,
                traffic, sequence, seq_traffic, pipe)


def tensor_traffic(cfg: Config, micro: int, tensor: int, accum: int) -> dict[str, Any]:
    """The reference GPT's activation collectives over the tensor axis per step, per device.

    Megatron's layout: per layer the forward sums the attention and MLP outputs over the
    tensor group (2 all-reduces of one ``[micro, seq, d_model]`` activation) and the
    backward sums the gradients of their inputs (2 more); with sequence parallelism each
    all-reduce is a reduce-scatter plus an all-gather, the same bytes. Outside the layers
    the vocabulary-parallel embedding sums its lookup and the loss the hidden state's
    gradient (2 more). A remat policy other than ``none`` recomputes the layer's forward,
    its 2 sums included (at most: a policy that keeps a sum's inputs may not). Ring bytes,
    an all-reduce counting ``2 (T-1)/T`` of its size.
    """
    activation = micro * cfg.data.seq_len * cfg.model.d_model * ITEMSIZE[cfg.precision.compute_dtype]
    per_layer = 4 + (2 if cfg.remat.policy != "none" else 0)
    sums = (per_layer * cfg.model.n_layers + 2) * accum
    ring = 2 * activation * (tensor - 1) / tensor
    kind = ("all-gather + reduce-scatter" if cfg.tensor_sequence_parallel else "all-reduce")
    return {"activation_bytes": activation, "sums_per_layer": per_layer, "sums_per_step": sums,
            "kind": kind, "ring_bytes": sums * ring}


def sequence_traffic(cfg: Config, micro: int, tensor: int, sequence: int, accum: int) -> dict[str, Any]:
    """The reference GPT's attention collectives over the sequence axis per step, per device.

    Each device holds ``micro x seq_len / P`` tokens and, under tensor parallelism, its
    heads (KV heads fewer than T shards are selected per query head, as the model does).
    Per layer forward: ``ulysses`` all-to-alls q, k, v and the output (KV heads that do not
    divide by P are repeated to the query heads first); ``all_gather`` gathers K and V;
    ``ring`` sends its K/V block (and the tokens' positions and segment ids) P - 1 times.
    Backward: Ulysses' and all-gather's transposes move the same bytes; ring's rotates the
    K/V blocks with their float32 gradients P times. A remat policy other than ``none``
    runs the forward again. Ring-equivalent bytes, as ``zjax.analysis.hlo`` counts them.
    """
    m, item = cfg.model, ITEMSIZE[cfg.precision.compute_dtype]
    tokens, head_dim, p = micro * cfg.data.seq_len // sequence, m.d_model // m.n_heads, sequence
    heads = m.n_heads // tensor
    kv = m.n_kv_heads // tensor if m.n_kv_heads % tensor == 0 else heads
    mode = cfg.sequence_parallel
    if mode == "ulysses":
        moved = kv if kv % p == 0 else heads
        forward = (2 * heads + 2 * moved) * tokens * head_dim * item * (p - 1) / p
        backward = forward
    elif mode == "all_gather":
        forward = 2 * kv * tokens * p * head_dim * item * (p - 1) / p
        backward = forward
    else:
        block = 2 * kv * tokens * head_dim * item + 2 * tokens * 4  # K, V, positions, segment ids
        forward = (p - 1) * block
        backward = p * (block + 2 * kv * tokens * head_dim * 4)
    forwards = 2 if cfg.remat.policy != "none" else 1
    per_layer = forwards * forward + backward
    return {"mode": mode, "tokens_per_device": tokens, "bytes_per_layer": per_layer,
            "ring_bytes": accum * m.n_layers * per_layer}


def compiled_stage_plan(cfg: Config) -> StagePlan:
    """The ``StagePlan`` of ``cfg``'s own stage, predicted in full and compiled (on the visible devices).

    Example:
      >>> s = compiled_stage_plan(load_config("configs/tiny.yaml"))  # doctest: +SKIP
      >>> s.compiled["ratio"]  # predicted / compiled  # doctest: +SKIP
    """
    import jax

    train, state, batch = abstract_step(cfg)
    stage = cfg.zero.stage
    layouts = jax.tree.leaves(train.layouts, is_leaf=zero.is_layout)
    mesh = dict(train.mesh.shape)
    # parameters per device of the tensor axis: a weight split over it counts 1/T
    psi = sum(math.prod(lay.shape) / _model_split(lay, mesh) for lay in layouts)
    scanned = sum(math.prod(lay.shape) / _model_split(lay, mesh) for lay in layouts if lay.stacked)
    rows = zjax_bytes(cfg, psi, train.zero.data, stage, accum_steps=train.grad_accum_steps, scanned=scanned)
    traced, workspace = traced_bytes(train, batch)
    rows.update(traced)
    s = StagePlan(stage, paper_bytes(psi, train.zero.data, stage), rows, workspace,
                  compiled_memory(cfg, (train, state, batch)))
    s.compiled["predicted"] = s.zjax_total
    s.compiled["ratio"] = s.zjax_total / s.compiled["total"]
    return s


def _model_split(lay: zero.LeafLayout, mesh_shape: dict[str, int]) -> int:
    """How many ways the model-parallel axes (and a pipeline's stage axis) split a parameter."""
    return math.prod(mesh_shape[a] for a in (*lay.model_axes, lay.lead_axis) if a is not None)


def paper_bytes(psi: float, n: int, stage: int) -> dict[str, float]:
    """The ZeRO paper's per-device bytes: fp16 params and grads, K = 12 bytes of Adam state."""
    return {
        "params": 2 * psi / (n if stage >= 3 else 1),
        "gradients": 2 * psi / (n if stage >= 2 else 1),
        "optimizer state": 12 * psi / (n if stage >= 1 else 1),
    }


def zjax_bytes(cfg: Config, psi: float, n: int, stage: int, accum_steps: int = 1,
               scanned: float | None = None) -> dict[str, float | None]:
    """What zjax's TrainState holds per device at ``stage``, plus its gradient buffers.

    Reads the same ``zero.ZeroStage`` as the step: stages 0-2 keep the params
    replicated (in the compute dtype when a sharded fp32 master exists, else as the
    fp32 master itself); stage 3, and mixed-precision stages 1-2, keep a sharded fp32
    master. Moments are sharded from stage 1.

    With ``accum_steps > 1`` the accumulator (a carry of the micro-batch scan) sits
    next to the micro-step gradient of the scanned layers (compute dtype, full for
    stages 0-1; the master's dtype, sharded, for stages 2-3): the backward layer scan
    builds it whole as its own carry before ``_accumulate`` adds it. The gradient of
    the other parameters (embedding, final norm) never stands alone: XLA writes its
    scatter and adds straight into the accumulator's buffer (the compiled buffer
    assignment of ``configs/tiny.yaml``).

    Args:
      cfg: the config.
      psi: the parameter count.
      n: the ZeRO group's devices (``data`` x ``sequence``).
      stage: the ZeRO stage.
      accum_steps: micro-batches per step.
      scanned: parameters in scanned (stacked) layers; default ``psi``, an upper bound.

    Returns:
      ``ZJAX_ROWS`` in bytes; the ``TRACED_ROWS`` are None.
    """
    p = cfg.precision
    param, compute, accum = (ITEMSIZE[d] for d in (p.param_dtype, p.compute_dtype, p.accum_dtype))
    z = ZeroStage(stage, n, p.compute_dtype != p.param_dtype)
    shards, keeps_master = z.shards, z.keeps_master
    replicated = psi * (compute if keeps_master else param) if z.keeps_replicated else 0.0
    grad_shards = n if z.reduces_in_backward else 1
    micro_grads = 0.0
    if accum_steps > 1:
        micro_grads = (psi if scanned is None else scanned) * (param if z.reduces_in_backward else compute) / grad_shards
    rows = {
        "compute params": replicated if keeps_master else 0.0,
        "master params": psi * param / shards if keeps_master else replicated,
        "moments": psi * _moment_bytes(cfg) / shards,
        "gradients": psi * accum / grad_shards + micro_grads,
    }
    return {**rows, **{name: None for name in TRACED_ROWS}}


def _moment_bytes(cfg: Config) -> int:
    opt = cfg.optimizer
    if opt.type == "sgd":
        return 4 if opt.momentum > 0 else 0
    if opt.type == "adafactor":
        # Factored second moments: O(rows + cols) per matrix, negligible against Ψ.
        return 0
    return _MOMENT_BYTES[opt.type]


def traced_bytes(train: Any, batch: Any) -> tuple[dict[str, float], dict[str, float]]:
    """The ``TRACED_ROWS`` of a prepared train step, and the named terms of its workspace.

    Activations are measured from the jaxpr (``saved_residuals`` of one layer of each
    ``scan_layers`` call, times its layer count: ``zjax.analysis.activations.layer_residuals``, as ``remat_report``
    does), once with the config's remat policy and once with ``none`` for all a layer
    produces. Nothing is compiled.

    Args:
      train: a ``TrainStep`` after ``prepare``.
      batch: its global batch (arrays or ShapeDtypeStructs).

    Returns:
      ``({"batch", "activations", "workspace"}, {"layer params and grads"[, "unscanned grads"],
      "layer backward"[, "compute copy"]})``, bytes per device (``unscanned grads``: stages 2-3;
      ``compute copy``: stage 0 in mixed precision).
    """
    import jax
    import numpy as np

    from zjax.config.remat import remat_policy

    policy = remat_policy(train.config.remat)
    dt = train.dtypes
    compute, reduce = dt.compute, dt.reduce
    if train.mesh.devices.flat[0].platform == "cpu":
        # XLA:CPU computes bfloat16 and float16 in float32 (its float-normalization
        # pass): activations, gathered layers and their gradients take float32's bytes.
        compute = reduce = np.dtype(np.float32)
    kept = _layer_residuals(train, batch, policy, compute)
    everything = _layer_residuals(train, batch, remat_policy("none"), compute)
    saved = sum(layers * device for layers, device, _ in kept)
    # The largest layer's backward: what it reads (none's activations) less what the policy kept.
    layer_acts, rematerialized = max(
        ((all_, all_ - device - host) for (_, all_, _), (_, device, host) in zip(everything, kept)), default=(0, 0)
    )
    layouts = jax.tree.leaves(train.layouts, is_leaf=zero.is_layout)
    mesh = dict(train.mesh.shape)
    stacked = [lay.size / _model_split(lay, mesh) for lay in layouts if lay.stacked]
    if train.zero.reduces_in_backward:
        # Each parameter's gradient is reduce-scattered as soon as the layer's backward
        # makes it (zero.ShardedParam), so one of them is live in full, not the layer's;
        # the unscanned parameters' full gradient gathers the head's and the input
        # embedding's parts across every layer's backward before its reduce-scatter.
        unscanned = sum(math.prod(lay.shape) / _model_split(lay, mesh) for lay in layouts if not lay.stacked)
        workspace = {
            "layer params and grads": float(sum(stacked) * compute.itemsize
                                            + max(stacked, default=0) * reduce.itemsize),
            "unscanned grads": float(unscanned * reduce.itemsize),
        }
    else:
        workspace = {"layer params and grads": float(sum(stacked) * (compute.itemsize + reduce.itemsize))}
    workspace["layer backward"] = (rematerialized + layer_acts) / 2
    if not train.zero.keeps_master and train.zero.mixed:
        # stage 0 keeps fp32 params; the step casts all of them to the compute dtype once
        workspace["compute copy"] = float(sum(math.prod(lay.shape) / _model_split(lay, mesh) for lay in layouts)
                                          * dt.compute.itemsize)
    per_device = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(batch))
    rows = {
        "batch": per_device / (train.data_size * train.mesh.shape.get("expert", 1)),
        "activations": float(saved),
        "workspace": sum(workspace.values()),
    }
    return rows, workspace


def _layer_residuals(train: Any, batch: Any, policy: Any, dtype: Any) -> list[tuple[int, int, int]]:
    """``(layer count, device bytes, host bytes)`` one layer keeps, per ``scan_layers`` call.

    Traced on one device's micro-batch with parameters in ``dtype``; parameters
    and constants are not counted (they live in the train state).
    """
    from zjax.analysis.activations import layer_residuals

    split = _activation_split(train)
    # the batch is split over mesh.expert too (the MoE layers' tokens and everything else)
    expert = train.mesh.shape.get("expert", 1)
    out = []
    for n_layers, named in layer_residuals(train, batch, policy, dtype):
        named = [(name, nbytes / split.get(name, 1) / expert) for name, nbytes in named]
        host = sum(nbytes for name, nbytes in named if name in policy.offload)
        out.append((n_layers, sum(nbytes for _, nbytes in named) - host, host))
    return out


def _activation_split(train: Any) -> dict[str, int]:
    """How many ways the model-parallel axes split each of the reference GPT's tagged
    activations (traced whole): tensor parallelism the heads' and the MLP's (untagged ones
    too) by T, the residual stream's by T under Megatron's sequence parallelism (the
    row-parallel outputs before their sum are whole on every device); ``mesh.sequence``
    every activation by P (each device holds 1/P of the tokens; Ulysses 1/P of the heads
    of the whole sequence)."""
    from zjax.models import gpt

    tensor, sequence = train.mesh.shape["tensor"], train.mesh.shape["sequence"]
    names = {*gpt.TENSOR_SPLIT_ACTIVATIONS, *gpt.SEQUENCE_SPLIT_ACTIVATIONS, "untagged"}
    split = dict.fromkeys(names, sequence)
    if tensor > 1:
        # untagged residuals are the attention's and MLP's internals (scores, probabilities, gates)
        split.update(dict.fromkeys((*gpt.TENSOR_SPLIT_ACTIVATIONS, "untagged"), tensor * sequence))
        if train.config.tensor_sequence_parallel:
            split.update(dict.fromkeys(gpt.SEQUENCE_SPLIT_ACTIVATIONS, tensor))
    return {name: ways for name, ways in split.items() if ways > 1}


def abstract_step(cfg: Config):
    """The reference GPT's prepared train step for ``cfg``, its abstract state and a zero batch."""
    import jax
    import numpy as np

    from zjax.models import gpt_loss, make_gpt
    from zjax.train.step import make_train_step

    model = make_gpt(cfg.model, seed=cfg.seed, kernels=cfg.kernels)
    train = make_train_step(cfg, gpt_loss, model=model)
    train.prepare()
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), train.abstract_state, train.state_sharding
    )
    batch = {"tokens": np.zeros((train.global_batch_size, cfg.data.seq_len + 1), np.int32)}
    return train, state, batch


# Compiled figures by config (its YAML): plan and fit compile a setting once per process.
_COMPILED: dict[str, dict[str, float]] = {}


def compiled_memory(cfg: Config, step: tuple | None = None) -> dict[str, float]:
    """Compiles the reference GPT's step for ``cfg``; its per-device memory.

    Nothing runs: the state is abstract (shapes and shardings) and the batch is zeros.
    ``argument_size_in_bytes`` and ``temp_size_in_bytes`` are per device (measured:
    stage 0's argument bytes are 12Ψ, stage 3's 12Ψ/N on 8 CPU devices). The collective
    bytes per step are ring-equivalent bytes per device from the compiled HLO, over the
    tensor axis, attention's over the sequence axis (all-to-alls, permutes, gathers) and
    over the others (ZeRO's ``data``, ``replica``, and the gradient's sum over ``sequence``).

    Args:
      cfg: the config.
      step: ``(train, state, batch)`` already built for ``cfg`` (see ``abstract_step``).

    Returns:
      ``{"argument", "temp", "total", "collective_data", "collective_tensor", "collective_sequence"}``
      in bytes.
    """
    from zjax.analysis import hlo

    key = cfg.to_yaml()
    if key not in _COMPILED:
        train, state, batch = step or abstract_step(cfg)
        compiled = train.lower(state, batch).compile()
        memory = compiled.memory_analysis()
        argument, temp = int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes)
        found = hlo.collectives(compiled.as_text(), train.mesh.size, dict(train.mesh.shape))
        kinds = {"tensor": [], "sequence": [], "data": []}
        for c in found:
            kinds["tensor" if "tensor" in c.axes else "sequence" if _attention_collective(c) else "data"].append(c)
        _COMPILED[key] = {"argument": argument, "temp": temp, "total": argument + temp,
                          **{f"collective_{k}": sum(c.ring_bytes for c in cs) for k, cs in kinds.items()}}
    return dict(_COMPILED[key])


def _attention_collective(c: Any) -> bool:
    """A collective over ``sequence`` alone that attention makes (not the gradient's sum)."""
    return c.axes == ("sequence",) and c.kind != "all-reduce"


@dataclasses.dataclass
class Fit:
    """The result of ``fit``.

    Attributes:
      budget: the per-device budget in bytes.
      chosen: the overrides of the cheapest setting that fits, or None.
      chosen_memory: its compiled ``{"argument", "temp", "total"}``, or None.
      rejected: the overrides of the setting just before ``chosen`` in the search order
        (it did not fit), or None when the first setting fit.
      rejected_bytes: its compiled total, or, when its state alone was over the budget
        and it was not compiled, that state's bytes (a lower bound).
      rejected_compiled: whether ``rejected_bytes`` comes from a compile.
      compiled: how many settings were compiled; ``searched``: how many were looked at.
    """

    budget: int
    chosen: dict[str, Any] | None
    chosen_memory: dict[str, float] | None
    rejected: dict[str, Any] | None
    rejected_bytes: float | None
    rejected_compiled: bool
    compiled: int
    searched: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_bytes(text: str | float) -> int:
    """A byte count from ``2e9``, ``2GB`` (10^9), ``512MiB`` (2^20) or ``1.5 GB``.

    Example:
      >>> parse_bytes("512MiB"), parse_bytes("2e9"), parse_bytes("2GB")
      (536870912, 2000000000, 2000000000)
    """
    import pydantic

    try:
        value = float(text)
    except ValueError:
        try:
            value = pydantic.TypeAdapter(pydantic.ByteSize).validate_python(str(text).strip())
        except pydantic.ValidationError:
            value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(
            f"--fit={text!r} is not a byte count; give a positive number with an optional unit, "
            "e.g. 2e9, 2GB or 512MiB"
        )
    return int(value)


def fit(config: Any, overrides=None, *, budget: int | str, stages: tuple[int, ...] = STAGES,
        sequences: tuple[int, ...] | None = None, pipeline_stages: tuple[int, ...] | None = None) -> Fit:
    """The cheapest setting whose compiled step fits ``budget`` bytes per device.

    Settings are searched in order of cost: the smallest model-parallel degree (tensor x
    sequence x pipeline stage sizes: the config's, then powers of two: ``tensor_sizes``,
    ``sequence_sizes``, ``stage_sizes``; they move activations, so they come only when data
    parallelism alone does not fit), at equal degree sequence, then stage, then tensor
    first (Ulysses' all-to-alls move a 1/P share of what tensor parallelism's all-reduces
    move and join ZeRO's group; a pipeline sends one activation per stage boundary but
    idles in its bubble and takes ZeRO 0-1 only), then
    the lowest ZeRO stage (least communication),
    then the lightest remat policy (``FIT_POLICIES``: least recomputation), then the
    largest micro-batch (the config's, halved while the global batch stays whole; the
    rest goes to gradient accumulation). The search
    compiles each setting (nothing runs) and stops at the first that fits; a setting
    whose train state alone (an exact part of its argument bytes) is over the budget
    is passed over without compiling.

    Args:
      config: a config path, dict or ``Config``.
      overrides: ``key=value`` overrides, as for ``load_config``.
      budget: bytes per device (an int, or a string for ``parse_bytes``).
      stages: the ZeRO stages to try (default all).
      sequences: the ``mesh.sequence`` sizes to try (default ``sequence_sizes``).
      pipeline_stages: the ``mesh.stage`` sizes to try (default ``stage_sizes``).

    Returns:
      A ``Fit``.

    Raises:
      ConfigError: nothing fits; the message names the budget and the smallest
        compiled figure (or state) found.
    """
    import jax

    from zjax.models.gpt import count_params

    budget = parse_bytes(budget)
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    n = len(jax.devices())
    psi = count_params(cfg.model)
    rejected, rejected_bytes, rejected_compiled = None, None, False
    smallest: tuple[float, dict] | None = None
    smallest_state: tuple[float, dict] | None = None
    compiled = searched = 0
    tensors = tensor_sizes(cfg, n)
    sequences = sequence_sizes(cfg, n) if sequences is None else list(sequences)
    pipes = stage_sizes(cfg, n) if pipeline_stages is None else list(pipeline_stages)
    own = resolve_mesh_shape(cfg.mesh, n)
    # the global batch is what the run trains on; each mesh splits it over its replica x data devices
    total, own_micro, _ = cfg.batch.resolve(own["replica"] * own["data"])
    fixed = math.prod(size for axis, size in own.items() if axis not in ("data", "tensor", "sequence", "stage"))
    degrees = sorted(((t, q, s) for t in tensors for q in sequences for s in pipes if (n // fixed) % (t * q * s) == 0),
                     key=lambda tqs: (math.prod(tqs), tqs[0], tqs[2]))
    layers = count_params(cfg.model) - count_params(cfg.model.model_copy(update={"n_layers": 0}))
    for tensor, sequence, pipe in degrees:
        shape = resolve_mesh_shape(cfg.mesh.model_copy(update={"tensor": tensor, "sequence": sequence, "stage": pipe,
                                                               "data": -1}), n)
        # the batch splits over replica x data; ZeRO shards over data x sequence
        split, data = shape["replica"] * shape["data"], shape["data"] * shape["sequence"]
        if total % split:
            continue
        micro = own_micro if (total // split) % own_micro == 0 else total // split
        micros = []
        while micro >= 1 and total % (micro * split) == 0:
            micros.append(micro)
            if micro % 2:
                break
            micro //= 2
        for stage in stages:
            for policy in FIT_POLICIES:
                for m in micros:
                    setting = {
                        "mesh.tensor": tensor, "mesh.sequence": sequence, "mesh.stage": pipe, "mesh.data": -1,
                        "zero.stage": stage, "remat.policy": policy, "remat.names": {},
                        "batch.global_batch_size": total, "batch.micro_batch_size_per_device": m,
                        "batch.grad_accum_steps": total // (m * split),
                    }
                    shown = {k: v for k, v in setting.items() if k not in ("remat.names", "mesh.data")}
                    try:
                        candidate = load_config(cfg, setting)
                    except ConfigError:
                        # not a valid setting of this config (e.g. offload_param needs stage 3)
                        continue
                    searched += 1
                    # a pipeline stage holds 1/P of the layers and the whole embedding
                    local = (psi - layers + layers / pipe) / tensor
                    state = sum(v for k, v in zjax_bytes(candidate, local, data, stage).items()
                                if k in ("compute params", "master params", "moments"))
                    if state > budget:
                        rejected, rejected_bytes, rejected_compiled = shown, state, False
                        if smallest_state is None or state < smallest_state[0]:
                            smallest_state = (state, shown)
                        continue
                    try:
                        memory = compiled_memory(candidate)
                    except ConfigError:
                        # the model refuses this split (e.g. Ulysses with heads that do not divide)
                        continue
                    compiled += 1
                    if memory["total"] <= budget:
                        return Fit(budget, shown, memory, rejected, rejected_bytes, rejected_compiled, compiled,
                                   searched)
                    rejected, rejected_bytes, rejected_compiled = shown, memory["total"], True
                    if smallest is None or memory["total"] < smallest[0]:
                        smallest = (memory["total"], shown)
    if smallest is not None:
        found = f"the smallest compiled step needs {smallest[0]:,.0f} bytes ({_overrides(smallest[1])})"
    else:
        found = (f"no setting was compiled: even the smallest train state alone needs {smallest_state[0]:,.0f} "
                 f"bytes per device ({_overrides(smallest_state[1])})")
    raise ConfigError(
        f"--fit={budget:,} bytes per device: no setting fits; {found}; "
        f"searched {searched} settings (mesh.tensor {'/'.join(map(str, tensors))} x mesh.sequence "
        f"{'/'.join(map(str, sequences))} x mesh.stage {'/'.join(map(str, pipes))} x stages "
        f"{'/'.join(map(str, stages))} x remat "
        f"{'/'.join(FIT_POLICIES)} x micro-batch); raise the budget, use more devices or a smaller model"
    )


def tensor_sizes(cfg: Config, n: int) -> list[int]:
    """The tensor-axis sizes ``fit`` tries, smallest first: the config's, then every larger
    power of two that divides the devices of one host (the tensor group stays on one host's
    fast links), the heads, the MLP width and what the other fixed axes leave."""
    import jax

    host = jax.local_device_count()
    fixed = math.prod(size for axis, size in cfg.mesh.model_dump().items() if axis not in ("data", "tensor")
                      and size > 0)
    start = cfg.mesh.tensor if cfg.mesh.tensor > 0 else 1
    sizes, t = [start], start * 2
    while host % t == 0 and (n // fixed) % t == 0 and cfg.model.n_heads % t == 0 and cfg.model.d_ff % t == 0:
        sizes.append(t)
        t *= 2
    return sizes


def sequence_sizes(cfg: Config, n: int) -> list[int]:
    """The sequence-axis sizes ``fit`` tries, smallest first: the config's, then every larger
    power of two that divides the devices of one host and the sequence (twice over for
    ring attention's zig-zag chunks)."""
    import jax

    host = jax.local_device_count()
    start = cfg.mesh.sequence if cfg.mesh.sequence > 0 else 1
    chunks = 2 if cfg.sequence_parallel == "ring" else 1
    sizes, q = [start], start * 2
    while host % q == 0 and n % q == 0 and cfg.data.seq_len % (chunks * q) == 0:
        sizes.append(q)
        q *= 2
    return sizes


def stage_sizes(cfg: Config, n: int) -> list[int]:
    """The pipeline-stage sizes ``fit`` tries, smallest first: the config's, then every larger
    power of two that divides the layers and the devices (stages may span hosts)."""
    start = cfg.mesh.stage if cfg.mesh.stage > 0 else 1
    sizes, s = [start], start * 2
    while n % s == 0 and cfg.model.n_layers % s == 0:
        sizes.append(s)
        s *= 2
    return sizes


def format_fit(result: Fit) -> str:
    """The ``fit`` result as text: the chosen overrides and bytes, and the cheaper setting that did not fit."""
    lines = [
        f"budget {result.budget:,} bytes per device ({_gb(result.budget)} GB); compiled {result.compiled} "
        f"of {result.searched} settings searched (smallest tensor x sequence, then lowest stage, then lightest "
        "remat, "
        "then largest micro-batch)",
        f"fits: {_overrides(result.chosen)}",
        f"  compiled: argument {result.chosen_memory['argument']:,} + temp {result.chosen_memory['temp']:,} "
        f"= {result.chosen_memory['total']:,} bytes",
        f"  collectives per step per device: {result.chosen_memory['collective_data']:,.0f} bytes over data, "
        f"{result.chosen_memory['collective_tensor']:,.0f} over tensor, "
        f"{result.chosen_memory['collective_sequence']:,.0f} over sequence (attention)",
    ]
    if result.rejected is None:
        lines.append("next cheaper setting: none (this is the first in the search order)")
    else:
        how = "compiled" if result.rejected_compiled else "train state alone, not compiled"
        lines.append(f"next cheaper, does not fit: {_overrides(result.rejected)}")
        lines.append(f"  {result.rejected_bytes:,.0f} bytes ({how}) > budget {result.budget:,}")
    return "\n".join(lines)


def _overrides(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def format_plan(p: Plan) -> str:
    """The plan as text: one block per stage, paper and zjax columns, GB = 1e9 bytes."""
    stages = p.pipeline["stages"] if p.pipeline else 1
    data = p.devices // (p.tensor * p.sequence * stages)
    if p.tensor > 1 or p.sequence > 1 or stages > 1:
        axes = [f"{name} {size}" for name, size in (("stage", stages), ("tensor", p.tensor),
                                                     ("sequence", p.sequence)) if size > 1]
        where = f"{p.devices} devices ({' x '.join(axes)} x {data} data-parallel"
        where += f"; each device holds 1/{p.tensor} of the weights)" if p.tensor > 1 else ")"
    else:
        where = f"{p.devices} data-parallel devices"
    lines = [
        f"params {p.params:,} ({p.params / 1e9:.3g}B) on {where}; "
        f"compute {p.compute_dtype}, remat {p.remat}; per-device memory, GB = 1e9 bytes",
        "paper: fp16 params + fp16 grads + 12 bytes/param Adam state (ZeRO, Table 1); "
        "zjax: its TrainState + gradient buffers + batch + kept activations + one layer's backward workspace",
    ]
    if p.note:
        lines.append(p.note)
    if p.tensor_traffic:
        t = p.tensor_traffic
        lines.append(
            f"tensor axis: {t['sums_per_layer']} activation sums per layer ({t['kind']}, {t['activation_bytes']:,} "
            f"bytes each), {t['sums_per_step']} per step: {t['ring_bytes']:,.0f} bytes per device per step "
            "(ring), the same at every ZeRO stage")
    if p.pipeline:
        t = p.pipeline
        lines.append(
            f"pipeline: {t['schedule']} over {t['stages']} stages"
            + (f" x {t['repeats']} chunks each" if "repeats" in t else "")
            + f", {t['microbatches']} micro-batches: bubble "
            + ("(P-1)/(V*M+P-1)" if "repeats" in t else "(P-1)/(M+P-1)")
            + f" = {t['bubble']:.3f} of the ticks; per-device figures are one stage's (1/{t['stages']} "
            "of the layers, the whole embedding)")
    if p.sequence_traffic:
        t = p.sequence_traffic
        lines.append(
            f"sequence axis ({t['mode']}, {t['tokens_per_device']:,} tokens per device per micro-batch): attention "
            f"moves {t['bytes_per_layer']:,.0f} bytes per layer, {t['ring_bytes']:,.0f} per device per step "
            f"(ring); ZeRO's group is data x sequence ({data * p.sequence} devices)")
    for s in p.stages:
        mark = "  <- config" if s.stage == p.chosen_stage else ""
        lines.append("")
        lines.append(f"stage {s.stage} ({STAGE_NAMES[s.stage]}){mark}")
        lines.append(f"  {'paper':<18}{'bytes':>16}{'GB':>10}    {'zjax':<16}{'bytes':>16}{'GB':>10}")
        paper = list(s.paper.items())
        mine = list(s.zjax.items())
        for i in range(len(mine)):
            left = _cell(*paper[i], 18) if i < len(paper) else " " * 44
            lines.append(f"  {left}    {_cell(*mine[i], 16)}")
        lines.append(f"  {_cell('total', s.paper_total, 18)}    {_cell('total', s.zjax_total, 16)}")
        if s.workspace:
            terms = " + ".join(f"{name} {value:,.0f}" for name, value in s.workspace.items())
            lines.append(f"  workspace = {terms}")
        if s.compiled:
            c = s.compiled
            lines.append(
                f"  compiled: argument {_gb(c['argument'])} + temp {_gb(c['temp'])} = {_gb(c['total'])} GB; "
                f"predicted {_gb(c['predicted'])} GB (predicted/compiled {c['ratio']:.3f})"
            )
    return "\n".join(lines)


def _cell(name: str, value: float | None, width: int) -> str:
    """``name bytes GB``, fixed width; ``n/a`` for a figure only a compile gives."""
    if value is None:
        return f"{name:<{width}}{'n/a':>16}{'n/a':>10}"
    return f"{name:<{width}}{value:>16,.0f}{_gb(value):>10}"


def _gb(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value / GB:.3g}" if value >= 1e6 else f"{value / GB:.2e}"
