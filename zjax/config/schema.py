"""The zjax config: one typed schema, loaded from YAML, JSON, a dict or a DeepSpeed config.

Every default lives in the models below and, commented, in ``configs/base.yaml``;
a test keeps the two equal. ``load_config`` is the only way in: it layers ``base:``
files, maps DeepSpeed keys, applies ``key=value`` overrides, then validates, and it
turns every pydantic error into a ``ConfigError`` that names the key, the value
received and what would work.
"""
from __future__ import annotations

import codecs
import copy
import json
import logging
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from zjax.config import deepspeed
from zjax.errors import ConfigError
from zjax.config.remat import check_policy

logger = logging.getLogger("zjax")

DType = Literal["float32", "bfloat16", "float16"]

DEFAULT_LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "batch": "data",
    "layers": None,
    "embed": "data",
    "length": "sequence",
    "residual_length": "sequence",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "experts": "expert",
}


def load_config(
    path_or_dict: str | Path | Mapping[str, Any] | Config,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> Config:
    """Load, map, override and validate a config.

    Args:
      path_or_dict: a path to a YAML or JSON file, a dict, or an existing ``Config``.
        A file or dict may name ``base: other.yaml`` (relative to the file) to inherit
        from, and may use DeepSpeed keys (``zero_optimization``, ``fp16``, ...).
      overrides: ``"dotted.key=value"`` strings (values parsed as YAML scalars) or a
        dict of dotted keys to values; applied after ``base:`` and DeepSpeed mapping.

    Returns:
      The validated ``Config``; ``Config.ignored`` lists the DeepSpeed keys it ignored and
      ``Config.deepspeed_mapping`` what each DeepSpeed key (or DeepSpeed default) became.

    Example:
      >>> load_config({"train_batch_size": 32, "zero_optimization": {"stage": 3}}, ["steps=20"]).zero.stage
      3
    """
    if isinstance(path_or_dict, Config):
        raw = path_or_dict.model_dump()
        ignored, mapped = list(path_or_dict.ignored), list(path_or_dict.deepspeed_mapping)
    else:
        raw, ignored, mapped = _read_layered(path_or_dict, chain=())
    _apply_overrides(raw, overrides)
    try:
        config = Config.model_validate(raw)
    except pydantic.ValidationError as err:
        raise _config_error(err) from None
    config._ignored, config._mapped = tuple(ignored), tuple(mapped)
    if ignored and not isinstance(path_or_dict, Config):
        # One warning per load, each reason once, so a DeepSpeed config does not flood the log.
        by_reason: dict[str, list[str]] = {}
        for key, reason in ignored:
            by_reason.setdefault(reason, []).append(key)
        logger.warning(
            "zjax ignores these DeepSpeed keys (`zjax config explain` lists them): %s",
            "; ".join(f"{', '.join(keys)} ({reason})" for reason, keys in by_reason.items()),
        )
    return config


class _Section(BaseModel):
    """Base of every config block: an unknown key is an error, never silently dropped.

    Numbers must be finite, and true/false is not a number (pydantic would read it as 1/0).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError(f"got {value}, a boolean; give a number instead")
        return value


def _leaf_types(annotation: Any) -> set[type]:
    """The types a field annotation admits (a Literal's by its values)."""
    if typing.get_origin(annotation) is Literal:
        return {type(arg) for arg in typing.get_args(annotation)}
    args = typing.get_args(annotation)
    return set().union(*map(_leaf_types, args)) if args else {annotation}


class MeshConfig(_Section):
    """Device-mesh size per axis; -1 takes every device the other axes leave.

    The axes, outermost first: ``replica``, ``data`` (ZeRO), ``stage`` (pipeline),
    ``tensor``, ``sequence`` and ``expert`` (experts of ``model.moe`` split over it, and the
    activations' batch outside the experts).

    ``replica`` is the outermost axis: full replicas (e.g. TPU slices or nodes joined
    over the data-center network) that each run ZeRO over their own ``data`` devices
    and average gradients with one all-reduce of the ZeRO shards.
    """

    replica: int = 1
    data: int = -1
    stage: int = 1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1

    @model_validator(mode="after")
    def _check_sizes(self) -> MeshConfig:
        sizes = self.model_dump()
        if any(size != -1 and size < 1 for size in sizes.values()):
            raise ValueError(f"{_axes(sizes)} has a size below 1; use sizes >= 1, or -1 for all remaining devices")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"{_axes(sizes)} has more than one -1; at most one axis can take the remaining devices")
        return self


def resolve_mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Fill in the -1 axis and check the mesh uses exactly the devices available.

    Args:
      mesh_cfg: the ``mesh`` block.
      n_devices: how many devices the run has.

    Returns:
      Axis name -> size, in mesh order, with a product of ``n_devices``.

    Example:
      >>> resolve_mesh_shape(MeshConfig(tensor=2), 8)
      {'replica': 1, 'data': 4, 'stage': 1, 'tensor': 2, 'sequence': 1, 'expert': 1}
    """
    sizes = mesh_cfg.model_dump()
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if -1 not in sizes.values():
        if fixed != n_devices:
            raise ConfigError(
                f"mesh {_axes(sizes)} needs {fixed} devices but {n_devices} are available; "
                f"use data: -1 or sizes whose product is {n_devices}"
            )
        return sizes
    if n_devices % fixed:
        raise ConfigError(
            f"mesh {_axes(sizes)} cannot fill {n_devices} devices: {n_devices} is not divisible by {fixed}, "
            f"the product of the fixed axes; use fixed sizes whose product divides {n_devices}"
        )
    return {axis: n_devices // fixed if size == -1 else size for axis, size in sizes.items()}


def _axes(sizes: Mapping[str, int]) -> str:
    return "{" + ", ".join(f"{axis}: {size}" for axis, size in sizes.items()) + "}"


MESH_AXES = tuple(MeshConfig.model_fields)


class BatchConfig(_Section):
    """The batch triple; any two give the third (global = micro x accum x data devices)."""

    global_batch_size: int | None = Field(32, gt=0)
    micro_batch_size_per_device: int | None = Field(None, gt=0)
    grad_accum_steps: int | None = Field(1, gt=0)

    @model_validator(mode="after")
    def _one_size_given(self) -> BatchConfig:
        if self.global_batch_size is None and self.micro_batch_size_per_device is None:
            raise ValueError(
                "global_batch_size and micro_batch_size_per_device are both null; give one, e.g. "
                "global_batch_size: 32 (in a DeepSpeed config, train_batch_size or train_micro_batch_size_per_gpu: "
                "DeepSpeed also stops with 'Either train_batch_size or train_micro_batch_size_per_gpu needs to be "
                "provided')"
            )
        return self

    def resolve(self, data_size: int) -> tuple[int, int, int]:
        """Derive the missing sizes and check the given ones agree.

        Args:
          data_size: devices the batch is split over (``replica`` x ``data`` mesh axes).

        Returns:
          ``(global_batch_size, micro_batch_size_per_device, grad_accum_steps)``.

        Example:
          >>> BatchConfig(global_batch_size=32, grad_accum_steps=2).resolve(8)
          (32, 2, 2)
        """
        total, micro, accum = self.global_batch_size, self.micro_batch_size_per_device, self.grad_accum_steps
        if total is not None and micro is not None and accum is not None:
            if total != micro * accum * data_size:
                raise ConfigError(
                    f"batch: global_batch_size={total} != micro_batch_size_per_device={micro} x "
                    f"grad_accum_steps={accum} x data devices={data_size} (={micro * accum * data_size}); "
                    "set one of the three to null to derive it"
                )
            return total, micro, accum
        if total is None:
            accum = 1 if accum is None else accum
            return micro * accum * data_size, micro, accum
        if micro is None:
            accum = 1 if accum is None else accum
            if total % (data_size * accum):
                raise ConfigError(
                    f"batch: global_batch_size={total} is not divisible by grad_accum_steps={accum} x "
                    f"data devices={data_size} (={accum * data_size}); use a multiple of {accum * data_size}"
                )
            return total, total // (data_size * accum), accum
        if total % (micro * data_size):
            raise ConfigError(
                f"batch: global_batch_size={total} is not divisible by micro_batch_size_per_device={micro} x "
                f"data devices={data_size} (={micro * data_size}); use a multiple of {micro * data_size}"
            )
        return total, micro, total // (micro * data_size)


class ZeroConfig(_Section):
    """ZeRO stage: 0 replicates, 1 shards optimizer state, 2 also gradients, 3 also params.

    ``offload_optimizer: cpu`` keeps optimizer moments and master params in host
    memory between steps (ZeRO-Offload); ``offload_param: cpu`` keeps ZeRO-3's
    parameter shards there (ZeRO-Infinity's parameter offload, stage 3 only).
    ``quantized_weights`` (ZeRO++'s qwZ, stage 3): every parameter gather moves int8 values
    with one float32 scale per ``quantization_block`` elements (``zjax.parallel.quantize``);
    gradients stay exact. ``quantized_gradients`` (ZeRO++'s qgZ, stages 1-3): the gradients'
    reduce-scatters run in two int4 all-to-all hops, inside each node of ``node_size``
    consecutive ``data`` devices (default: all of them, one node) and then across nodes, and
    give the exact mean up to quantization; ``loco`` adds LoCo's error feedback (each device
    keeps a float32 buffer of what its quantizers lost per split leaf, its whole stored shape,
    decayed by ``loco_err_beta`` and zeroed every ``loco_reset_steps`` steps; DeepSpeed's
    ``zeropp_loco_param``). ``hpz_partition_size`` L
    > 1 (ZeRO++'s hpZ, stage 3): each device keeps a secondary partition (1/L of every layer's
    parameters, saved by the remat policy) so that the backward pass gathers only inside
    groups of L consecutive ``data`` devices. ``hierarchical_gathers`` (MiCS's
    ``mics_hierarchical_params_gather``, stage 3): every parameter gather runs in two hops, across
    the nodes of ``node_size`` devices (each device gathering its node position's shards) and
    then inside the node, as for a ZeRO group (``mesh.data``, MiCS's ``mics_shard_size``) that
    spans nodes; nothing is kept between the forward and the backward pass.
    """

    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    quantized_weights: bool = False
    quantized_gradients: bool = False
    hpz_partition_size: int = Field(1, ge=1)
    hierarchical_gathers: bool = False
    node_size: int | None = Field(None, ge=1)
    quantization_block: int = Field(256, ge=2)
    loco: bool = False
    loco_err_beta: float = Field(0.8, ge=0, lt=1)
    loco_reset_steps: int = Field(1024, ge=0)

    @model_validator(mode="after")
    def _loco_needs_qgz(self) -> ZeroConfig:
        if self.loco and not self.quantized_gradients:
            raise ValueError("loco=true is error feedback for qgZ's quantized gradients; set "
                             "zero.quantized_gradients: true too (or loco: false)")
        if self.loco and (self.hpz_partition_size > 1 or self.quantized_weights):
            raise ValueError("loco=true runs without hpz_partition_size > 1 and quantized_weights (not built "
                             "together yet); unset them or set loco: false")
        return self

    @model_validator(mode="after")
    def _quantized_gradients_need_a_split(self) -> ZeroConfig:
        if self.quantized_gradients and self.stage == 0:
            raise ValueError("quantized_gradients=true quantizes the gradients' reduce-scatters (ZeRO stages 1-3); "
                             "got stage=0 (an all-reduce): use zero.stage 1, 2 or 3")
        if self.quantization_block % 2:
            raise ValueError(f"quantization_block={self.quantization_block}: int4 packs two values per byte; use an "
                             "even block")
        return self

    @model_validator(mode="after")
    def _hierarchical_gathers(self) -> ZeroConfig:
        if self.hierarchical_gathers and (self.stage != 3 or self.node_size is None):
            raise ValueError(f"hierarchical_gathers=true gathers ZeRO-3's parameters across the nodes of node_size "
                             f"devices, then inside them; got stage={self.stage}, node_size={self.node_size}: use "
                             "zero.stage: 3 and set zero.node_size (data devices per node)")
        if self.hierarchical_gathers and self.hpz_partition_size > 1:
            raise ValueError("hierarchical_gathers=true and hpz_partition_size > 1 both gather in two hops (hpZ also "
                             "keeps the first hop for the backward pass); use one of them")
        return self

    @model_validator(mode="after")
    def _hpz_needs_stage3(self) -> ZeroConfig:
        if self.hpz_partition_size > 1 and self.stage != 3:
            raise ValueError(f"hpz_partition_size={self.hpz_partition_size} keeps a secondary partition of ZeRO-3's "
                             f"parameters; got stage={self.stage}: use zero.stage: 3 or hpz_partition_size: 1")
        return self

    @model_validator(mode="after")
    def _quantized_weights_need_stage3(self) -> ZeroConfig:
        if self.quantized_weights and self.stage != 3:
            raise ValueError(f"quantized_weights=true quantizes ZeRO-3's parameter gathers; got stage={self.stage}: "
                             "use zero.stage: 3 or quantized_weights: false")
        return self

    @model_validator(mode="after")
    def _params_offload_needs_stage3(self) -> ZeroConfig:
        if self.offload_param != "none" and self.stage != 3:
            raise ValueError(
                f"offload_param={self.offload_param!r} needs stage 3 (only ZeRO-3 keeps parameter shards); "
                f"got stage={self.stage}: use zero.stage: 3 or offload_param: none"
            )
        return self


class PrecisionConfig(_Section):
    """Dtypes of master params, compute, gradient reduction and gradient accumulation."""

    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    reduce_dtype: DType | None = None
    accum_dtype: DType = "float32"

    @field_validator("param_dtype")
    @classmethod
    def _master_params_are_float32(cls, value: str) -> str:
        if value != "float32":
            raise ValueError(
                f"{value!r} is not supported: zjax keeps float32 master params; set param_dtype: float32 "
                "and lower compute_dtype (bfloat16 or float16) instead"
            )
        return value


class LossScaleConfig(_Section):
    """fp16 loss scaling; the dynamic rule follows DeepSpeed's ``DynamicLossScaler``."""

    enabled: bool | None = None
    dynamic: bool = True
    static_scale: float = Field(1.0, gt=0)
    initial_scale_power: int = Field(16, ge=0)
    loss_scale_window: int = Field(1000, gt=0)
    hysteresis: int = Field(2, gt=0)
    min_loss_scale: float = Field(1.0, gt=0)
    at_min: Literal["error", "skip"] = "error"


OptimizerType = Literal["adamw", "adam", "sgd", "lion", "adafactor", "onebit_adam", "zero_one_adam", "onebit_lamb"]


class OptimizerConfig(_Section):
    """Optimizer and its hyper-parameters; ``lr`` is the peak of the schedule."""

    type: OptimizerType = "adamw"
    lr: float = Field(3e-4, gt=0)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    decay_norms_and_biases: bool = False
    # 1-bit Adam / 0/1 Adam / 1-bit LAMB (zjax.train.onebit; DeepSpeed's names and defaults)
    freeze_step: int = Field(100000, ge=1)
    bias_correction: bool = True
    var_freeze_step: int = Field(100000, ge=1)
    var_update_scaler: int = Field(16, ge=1)
    local_step_scaler: int = Field(32678, ge=1)
    local_step_clipper: int = Field(16, ge=1)
    max_coeff: float = Field(10.0, gt=0)
    min_coeff: float = Field(0.01, gt=0)
    coeff_beta: float = Field(0.9, ge=0, lt=1)
    factor_max: float = Field(4.0, gt=0)
    factor_min: float = Field(0.5, gt=0)
    factor_threshold: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _check_combinations(self) -> OptimizerConfig:
        if self.type == "adam" and self.weight_decay > 0:
            raise ValueError(
                f"type='adam' with weight_decay={self.weight_decay}: adam has no weight decay; "
                "use type: adamw for decoupled weight decay"
            )
        if not self.bias_correction and self.type != "onebit_adam":
            raise ValueError(f"bias_correction=false is onebit_adam's option (DeepSpeed's OnebitAdam formula); "
                             f"type={self.type!r} always corrects the bias: remove it")
        if self.type == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("type='sgd' with nesterov=true needs momentum > 0, e.g. momentum: 0.9")
        return self


class ScheduleConfig(_Section):
    """Learning-rate schedule; formulas follow DeepSpeed's ``lr_schedules.py``."""

    type: Literal["constant", "warmup", "warmup_decay", "warmup_cosine", "onecycle"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    warmup_min_lr: float = Field(0.0, ge=0)
    warmup_type: Literal["linear", "log"] = "linear"
    total_steps: int | None = Field(None, gt=0)
    warmup_min_ratio: float = Field(0.0, ge=0, le=1)
    cos_min_ratio: float = Field(0.0, ge=0, le=1)
    cycle_min_lr: float = Field(0.0, ge=0)
    cycle_max_lr: float | None = Field(None, gt=0)
    cycle_first_step_size: int | None = Field(None, gt=0)
    cycle_second_step_size: int | None = Field(None, gt=0)
    decay_lr_rate: float = Field(0.0, ge=0)
    decay_step_size: int = Field(0, ge=0)


class TilingConfig(_Section):
    """Arctic Long Sequence Training's tiling: the MLP and the loss computed in sequence tiles,
    each recomputed in the backward pass, so no ``[S, d_ff]`` or ``[S, vocab]`` activation
    exists whole (``zjax.layers.tiled``; 1 = off). Each must divide the sequence a device holds."""

    mlp_tiles: int = Field(1, ge=1)
    loss_tiles: int = Field(1, ge=1)


class PipelineConfig(_Section):
    """Pipeline parallelism over ``mesh.stage`` (``zjax.parallel.pipeline``): the loss's
    ``scan_layers`` stack is split into ``mesh.stage`` x ``repeats`` contiguous chunks and every
    device's micro-batch runs through them as ``microbatches`` pipeline micro-batches.
    ``schedule``: ``gpipe`` (all forwards, then all backwards; a stage keeps M micro-batches'
    inputs), ``1f1b`` (one forward, one backward; at most 2P - 3, whatever M is), both idle
    (P - 1) / (M + P - 1) of the time, or ``interleaved`` (Megatron's interleaved 1F1B: each
    stage holds ``repeats`` = V chunks, chunk v of stage s being the model's v·P + s-th; idle
    (P - 1) / (V·M + P - 1); M a multiple of P). The embedding and head are replicated on
    every stage; the first stage computes the embedding, the last the head and loss."""

    schedule: Literal["gpipe", "1f1b", "interleaved"] = "gpipe"
    microbatches: int = Field(1, ge=1)
    repeats: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _repeats(self) -> PipelineConfig:
        if self.repeats != 1 and self.schedule != "interleaved":
            raise ValueError(f"pipeline.repeats={self.repeats} needs pipeline.schedule: interleaved (the "
                             f"{self.schedule} schedule runs one chunk per stage); use repeats: 1 or schedule: "
                             "interleaved")
        return self


class RematConfig(_Section):
    """Which activations the backward pass recomputes instead of storing (see ``zjax.config.remat``)."""

    policy: Literal[
        "none", "full", "full_offload", "selective", "selective_offload", "dots", "dots_no_batch", "custom"
    ] = "none"
    names: dict[str, Literal["save", "remat", "offload"]] = Field(default_factory=dict)
    extra_names: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_names(self) -> RematConfig:
        check_policy(self.policy, self.names, self.extra_names)
        return self


class MoEConfig(_Section):
    """Mixture-of-Experts MLPs in the reference GPT (``zjax.models.moe``; the names and
    defaults of DeepSpeed's ``deepspeed.moe.layer.MoE``). ``num_experts: 0`` keeps the dense
    MLP; above 0 every block's MLP is an MoE of that many SwiGLU experts of width ``d_ff``
    (default ``model.d_ff``). The loss adds ``aux_loss_coef`` x DeepSpeed's load-balancing loss
    and ``router_z_loss`` x the router z-loss, summed over the layers. ``ep_size`` (DeepSpeed's
    expert-parallel group size) sets ``mesh.expert``; ``dispatch: ragged`` runs dropless grouped
    matmuls instead of capacity slots. ``every: k`` makes every k-th layer an MoE (the others
    dense). ``bias_update_rate`` > 0: auxiliary-loss-free balancing (DeepSeek-V3): each MoE layer
    gets a per-expert selection bias ``expert_bias`` that the train step moves by
    ``-rate * sign(load - mean load)`` each step (not the optimizer); it applies to any model's
    leaves named ``expert_bias`` or ``e_score_correction_bias``."""

    num_experts: int = Field(0, ge=0)
    top_k: int = Field(1, ge=1)
    capacity_factor: float = Field(1.0, gt=0)
    eval_capacity_factor: float = Field(1.0, gt=0)
    min_capacity: int = Field(4, ge=0)
    drop_tokens: bool = True
    noisy_gate_policy: Literal["Jitter", "RSample"] | None = None
    use_rts: bool = True
    second_expert_sampling: bool = True
    drop_policy: Literal["probs", "position"] = "probs"
    dispatch: Literal["dense", "ragged", "auto"] = "dense"
    use_residual: bool = False
    shared_experts: int = Field(0, ge=0)
    d_ff: int | None = Field(None, gt=0)
    aux_loss_coef: float = Field(0.01, ge=0)
    router_z_loss: float = Field(0.0, ge=0)
    every: int = Field(1, ge=1)
    ep_size: int | None = Field(None, ge=1)
    bias_update_rate: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.num_experts and self.top_k > self.num_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} is more than model.moe.num_experts={self.num_experts}; "
                             "use top_k <= num_experts")
        if self.num_experts and self.dispatch == "ragged" and self.drop_tokens:
            raise ValueError("model.moe.dispatch=ragged runs every token's experts (dropless): set "
                             "model.moe.drop_tokens: false, or use dispatch: dense for capacity and dropping")
        return self


# The reference GPT's projections LoRA adapters can target (model.lora.targets), as "<module>/<weight>"
LORA_PROJECTIONS = ("attn/wq", "attn/wk", "attn/wv", "attn/wo", "mlp/w_gate", "mlp/w_up", "mlp/w_down")


class LoRAConfig(_Section):
    """Low-rank adapters on the reference GPT's projections (DeepSpeed-Chat's LoRA).

    ``rank`` > 0 gives every targeted weight ``W [d_in, d_out]`` of every layer two adapters
    (``nnx.LoRAParam``), ``<name>_lora_a [d_in, rank]`` (uniform in ``±1/sqrt(rank)``, as DeepSpeed-Chat) and
    ``<name>_lora_b [rank, d_out]`` (zeros), and the layer reads ``W + alpha / rank x A @ B``.
    ``targets``: regular expressions searched (``re.search``) in the projection names
    ``attn/wq attn/wk attn/wv attn/wo mlp/w_gate mlp/w_up mlp/w_down``; each must match one.
    DeepSpeed-Chat's ``--lora_dim`` is ``rank``, ``--lora_module_name`` ``targets`` (``alpha: 1``
    gives its ``lora_scaling / lora_dim``) and ``--only_optimize_lora`` is ``only_optimize`` (in
    ``zjax train`` and ``zjax rlhf``; in Python ``make_train_step(..., trainable=nnx.LoRAParam)``);
    ``zjax.models.gpt.fuse_lora`` folds the adapters into the weights (generation and export do it
    themselves)."""

    rank: int = Field(0, ge=0)
    alpha: float = Field(1.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: [".*"])
    only_optimize: bool = True

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, targets: list[str]) -> list[str]:
        import re

        valid = ", ".join(LORA_PROJECTIONS)
        if not targets:
            raise ValueError(f"an empty list targets no projection; give regular expressions searched in {valid} "
                             "(e.g. ['attn/'] or ['.*'])")
        for pattern in targets:
            try:
                matched = any(re.search(pattern, name) for name in LORA_PROJECTIONS)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a regular expression ({err}); e.g. 'attn/w[qv]'") from None
            if not matched:
                raise ValueError(f"{pattern!r} matches none of the projections {valid}; use a regular expression "
                                 "that re.search finds in one of them, e.g. 'attn/w[qv]' or 'mlp/'")
        return targets


# transformers' rope_scaling types zjax's rotary embeddings implement, and the keys each reads
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``model.rope_scaling`` normalised: None for none (or ``rope_type: default``), else
    ``{"rope_type": ..., <its numbers>}`` (transformers' legacy ``type`` key is read as
    ``rope_type``). Raises ``ValueError`` naming the value and what would work."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"got {scaling!r}; give a mapping such as {{rope_type: linear, factor: 2.0}} or null")
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None)
    legacy = scaling.pop("type", None)
    kind = kind if kind is not None else legacy
    supported = ", ".join(ROPE_SCALING_KEYS)
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_type={kind!r} is not supported; zjax implements {supported} "
                         "(transformers' names), or null for unscaled rotary embeddings")
    needed = ROPE_SCALING_KEYS[kind]
    missing = [key for key in needed if key not in scaling]
    extra = sorted(set(scaling) - set(needed))
    if missing or extra:
        raise ValueError(f"rope_type={kind!r} takes exactly {', '.join(needed) or 'no other keys'}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; unknown {', '.join(extra)}" if extra else ""))
    out: dict[str, Any] = {"rope_type": kind}
    for key in needed:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{key}={value!r} (rope_type={kind!r}) must be a positive number")
        out[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(f"rope_type='llama3' needs high_freq_factor > low_freq_factor; got "
                         f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    return None if kind == "default" else out


class ModelConfig(_Section):
    """Shape of the reference decoder-only transformer."""

    vocab_size: int = Field(256, gt=0)
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(2, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int = Field(2, gt=0)
    d_ff: int = Field(352, gt=0)
    max_seq_len: int = Field(256, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-6, gt=0)
    # Hugging Face checkpoints (zjax.inference.hf): the width of one attention head (None =
    # d_model // n_heads; set, the query width n_heads * head_dim may differ from d_model),
    # biases on the q/k/v projections (Qwen2) and transformers' rope_scaling (linear, llama3)
    head_dim: int | None = Field(None, gt=0)
    qkv_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    moe: MoEConfig = Field(default_factory=MoEConfig)
    # LoRA adapters (rank 0 = none): DeepSpeed-Chat's lora_dim, lora_module_name
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    # DeepSpeed's sparse_attention block (mode, block, ...; zjax.models.sparse_attention): the
    # attention of every layer runs over that block-sparse layout (causal); None = dense
    sparse_attention: dict[str, Any] | None = None

    @field_validator("rope_scaling")
    @classmethod
    def _check_rope_scaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_rope_scaling(value)

    @model_validator(mode="after")
    def _check_sparse_attention(self) -> ModelConfig:
        if self.sparse_attention is not None:
            from zjax.config.sparsity import map_deepspeed_sparse_attention, make_layout

            sparsity = map_deepspeed_sparse_attention(dict(self.sparse_attention), num_heads=self.n_heads)
            if self.max_seq_len % sparsity.block:
                raise ValueError(f"model.sparse_attention.block={sparsity.block} does not divide model.max_seq_len="
                                 f"{self.max_seq_len}; the sequence is cut into whole blocks")
            make_layout(sparsity, self.max_seq_len, num_heads=self.n_heads)  # fails here, naming the key
        return self

    @model_validator(mode="after")
    def _check_lora(self) -> ModelConfig:
        import re

        mlp = [name for name in LORA_PROJECTIONS[4:] if any(re.search(p, name) for p in self.lora.targets)]
        if self.lora.rank and self.moe.num_experts and mlp:
            raise ValueError(f"model.lora.targets={self.lora.targets} adapts the MLP projections {', '.join(mlp)}, "
                             f"but model.moe.num_experts={self.moe.num_experts}: LoRA does not adapt MoE experts; "
                             "target the attention only (model.lora.targets: ['attn/'])")
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"use a multiple of {self.n_heads}, e.g. d_model: "
                f"{self.n_heads * max(1, self.d_model // self.n_heads)}, or set head_dim (queries are then "
                "n_heads * head_dim wide)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "use an n_kv_heads that divides n_heads, e.g. n_kv_heads: 1"
            )
        # RoPE rotates pairs of features, so each head needs an even width.
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd; RoPE needs an even one")
        if self.head_dim is None and (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} / n_heads={self.n_heads} gives an odd head width "
                f"{self.d_model // self.n_heads}; RoPE needs an even one"
            )
        return self


class CheckpointsConfig(_Section):
    """When ``zjax train`` saves into ``output_dir/checkpoints`` and how many it keeps."""

    every_steps: int = Field(0, ge=0)
    every_seconds: float | None = Field(None, gt=0)
    keep: int = Field(3, gt=0)


class DataConfig(_Section):
    """Training tokens and how they are cut into sequences (``zjax.data.loader`` reads them)."""

    dataset: Literal["stdlib", "text_dir", "tokens"] = "stdlib"
    path: str | None = None
    eos_id: int | None = Field(None, ge=0)
    seq_len: int = Field(128, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    prefetch: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.dataset != "stdlib" and self.path is None:
            what = "a directory of text files" if self.dataset == "text_dir" else "a .npy file of token ids"
            raise ValueError(f"dataset={self.dataset!r} reads data.path, which is null; set data.path to {what}")
        if self.dataset == "stdlib" and self.path is not None:
            raise ValueError(
                f"path={self.path!r} is not read by dataset='stdlib'; use data.dataset: text_dir (a directory "
                "of text files) or tokens (a .npy file), or data.path: null"
            )
        if self.eos_id is not None and self.dataset != "tokens":
            raise ValueError(
                f"eos_id={self.eos_id} only applies to dataset='tokens' (got dataset={self.dataset!r}); "
                "set data.eos_id: null or use data.dataset: tokens"
            )
        return self


class _CompressionGroup(_Section):
    """One group of a compression technique: the parameters it applies to and from which step.

    ``modules``: regular expressions searched (``re.search``) in each parameter's path, its keys
    joined by ``/`` (the reference GPT's ``layers/mlp/w_up``, a Linen ``params/Dense_0/kernel``);
    every matched parameter must be a matrix (or a stack of them, ``layers`` first)."""

    modules: list[str] = Field(default_factory=lambda: ["*"])
    schedule_offset: int = Field(0, ge=0)

    @field_validator("modules")
    @classmethod
    def _regexes(cls, modules: list[str]) -> list[str]:
        import re

        if not modules:
            raise ValueError("an empty list matches no parameter; give at least one regular expression, or '*'")
        for pattern in modules:
            if pattern == "*":
                continue
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a regular expression ({err}); e.g. 'mlp/w_up'") from None
        return modules


class SparsePruningGroup(_CompressionGroup):
    """Unstructured (or block / N:M) pruning of individual weights (DeepSpeed's ``sparse_pruning``).

    ``dense_ratio`` of each matrix's weights are kept: ``l1`` keeps every weight at or above the
    k-th largest magnitude; ``topk`` is DeepSpeed's learned scores (``zjax.compression.learned``: a
    trained score per weight, the top ``ceil(dense_ratio * n)`` kept in every forward from
    ``schedule_offset``, straight-through gradients, masked-out weights come back when their score
    rises; no ``pattern`` or ``schedule_offset_end``). ``pattern: "4x1"`` ranks
    blocks of 4 input rows by 1 output column by their l1 norm; ``pattern: "2:4"`` keeps the
    largest 2 of every 4 consecutive weights along the input dimension (N:M; ``dense_ratio`` is
    then unused). The mask takes effect at ``schedule_offset`` and, with ``schedule_offset_end``
    (zjax's own gradual schedule, ``zjax.compression.schedule``), is narrowed again every
    ``schedule_offset_stride`` steps while the kept fraction falls linearly from 1 to
    ``dense_ratio``; pruned weights stay exactly zero after."""

    dense_ratio: float = Field(0.5, gt=0, le=1)
    method: Literal["l1", "topk"] = "l1"
    pattern: str | None = None
    schedule_offset_end: int | None = Field(None, ge=0)
    schedule_offset_stride: int = Field(1, gt=0)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        import re

        if pattern is None or re.fullmatch(r"[1-9]\d*x[1-9]\d*", pattern) or re.fullmatch(r"[1-9]\d*:[1-9]\d*", pattern):
            if pattern and ":" in pattern and int(pattern.split(":")[0]) >= int(pattern.split(":")[1]):
                raise ValueError(f"{pattern!r}: N:M keeps N of every M weights, so N < M; e.g. '2:4'")
            return pattern
        raise ValueError(f"{pattern!r} is neither a block 'RxC' (e.g. '4x1') nor an N:M pattern (e.g. '2:4')")

    @model_validator(mode="after")
    def _end(self) -> SparsePruningGroup:
        if self.schedule_offset_end is not None and self.schedule_offset_end < self.schedule_offset:
            raise ValueError(f"schedule_offset_end={self.schedule_offset_end} is before schedule_offset="
                             f"{self.schedule_offset}; use an end at or after the start")
        return self


class StructuredPruningGroup(_CompressionGroup):
    """Row, channel or head pruning: ``dense_ratio`` of each matrix's rows / channels / heads are
    kept from ``schedule_offset``, ranked by l1 norm (``l1``) or by a trained score per row / channel
    / head (``topk``, DeepSpeed's learned scores, ``zjax.compression.learned``).

    Rows are output features (a matmul weight's last axis, torch's rows), channels input features
    (its first axis), heads groups of ``num_heads`` input rows of an attention output projection.
    ``related_modules`` (regexes) are the matrices that share the pruned dimension on their other
    side (the MLP's down projection for row pruning of its up projection, the q/k/v projections
    for head pruning): they are masked alike, so that ``zjax compress clean`` can drop both."""

    dense_ratio: float = Field(0.5, gt=0, le=1)
    method: Literal["l1", "topk"] = "l1"
    related_modules: list[str] = Field(default_factory=list)
    num_heads: int | None = Field(None, gt=0)
    # zjax: grouped-query attention's KV heads; heads are then kept in equal numbers per KV group
    num_kv_heads: int | None = Field(None, gt=0)


class WeightQuantizationGroup(_CompressionGroup):
    """Quantization-aware training of weights (DeepSpeed's ``weight_quantization``, MoQ): from
    ``schedule_offset`` the forward pass sees the weights fake-quantized (straight-through
    gradients to the float weights), at ``start_bits``, one bit fewer at the P-th, 2P-th, 4P-th, ...
    quantized step (P = ``quantization_period``; MoQ's period doubles at every change) down to
    ``target_bits``. ``symmetric``: ``absmax / (2^(b-1) - 1)`` scales, values in ``±(2^(b-1) - 1)``
    (at 8 bits exactly ``zjax.inference.quant``'s int8, so training exports as served; DeepSpeed
    divides by ``2^(b-1)``); ``symmetric: false``: scale and zero point over ``2^b - 1`` levels.
    One scale per output column, or per ``group_size`` input rows of each column."""

    start_bits: int = Field(8, ge=2, le=16)
    target_bits: int = Field(8, ge=2, le=16)
    quantization_period: int = Field(1, gt=0)
    symmetric: bool = True
    group_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bits(self) -> WeightQuantizationGroup:
        if self.target_bits > self.start_bits:
            raise ValueError(f"target_bits={self.target_bits} is above start_bits={self.start_bits}; training "
                             "lowers the precision, so use target_bits <= start_bits")
        return self


class ActivationQuantizationGroup(_CompressionGroup):
    """Token-wise fake quantization of the inputs of the matched matmuls (DeepSpeed's
    ``activation_quantization`` with dynamic range), from ``schedule_offset``; straight-through
    gradients. The reference GPT's projections read it; ``modules`` match their weights' paths."""

    bits: int = Field(8, ge=2, le=16)
    symmetric: bool = True


class LayerReductionConfig(_Section):
    """A student with ``keep_number_layer`` layers initialized from the teacher's layers
    ``teacher_layer`` (0-based, in order; DeepSpeed's ``layer_reduction``); embeddings, final norm
    and head are copied whole."""

    enabled: bool = False
    keep_number_layer: int | None = Field(None, gt=0)
    teacher_layer: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _layers(self) -> LayerReductionConfig:
        if not self.enabled:
            return self
        if not self.teacher_layer:
            raise ValueError("enabled layer reduction needs teacher_layer, the teacher layers the student starts "
                             "from, e.g. teacher_layer: [1, 3]")
        if self.keep_number_layer is not None and self.keep_number_layer != len(self.teacher_layer):
            raise ValueError(f"keep_number_layer={self.keep_number_layer} but teacher_layer has "
                             f"{len(self.teacher_layer)} entries ({self.teacher_layer}); give one teacher layer per "
                             "student layer")
        if any(i < 0 for i in self.teacher_layer):
            raise ValueError(f"teacher_layer={self.teacher_layer}: layers are numbered from 0")
        return self


class DistillationConfig(_Section):
    """Knowledge distillation from a frozen teacher (``teacher``: a zjax checkpoint directory or a
    safetensors file of the reference GPT; ``teacher_model``: its shape, default ``model``'s): the
    loss is ``(1 - alpha) * task loss + alpha * T^2 * KL(teacher_T || student_T)`` over tokens,
    plus ``hidden_weight`` times the mean squared difference of the final hidden states."""

    teacher: str | None = None
    teacher_model: dict[str, Any] | None = None
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    hidden_weight: float = Field(0.0, ge=0)


class CompressionConfig(_Section):
    """Model compression during training (``zjax.compression``; DeepSpeed's ``compression_training``
    maps onto it): pruning masks and fake quantization applied by the train step, layer reduction
    and distillation for the reference GPT. Each technique is a list of groups."""

    sparse_pruning: list[SparsePruningGroup] = Field(default_factory=list)
    row_pruning: list[StructuredPruningGroup] = Field(default_factory=list)
    channel_pruning: list[StructuredPruningGroup] = Field(default_factory=list)
    head_pruning: list[StructuredPruningGroup] = Field(default_factory=list)
    weight_quantization: list[WeightQuantizationGroup] = Field(default_factory=list)
    activation_quantization: list[ActivationQuantizationGroup] = Field(default_factory=list)
    layer_reduction: LayerReductionConfig = Field(default_factory=LayerReductionConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.sparse_pruning or self.row_pruning or self.channel_pruning or self.head_pruning
                    or self.weight_quantization or self.activation_quantization or self.layer_reduction.enabled
                    or self.distillation.teacher)


class PPOConfig(_Section):
    """``zjax rlhf ppo``: ``zjax.rlhf.ppo.PPOSettings`` (DeepSpeed-Chat's defaults)."""

    kl_coef: float = 0.1  # DeepSpeed-Chat's kl_ctl
    clip_reward_value: float = Field(5.0, gt=0)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    ppo_epochs: int = Field(1, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    whiten_advantages: bool = False
    ema_decay: float | None = Field(None, gt=0, lt=1)  # DeepSpeed-Chat's enable_ema: 0.992
    release_memory: bool = False  # free the engine's weights and KV cache after each rollout
    ptx_coef: float = Field(0.0, ge=0)  # PPO-ptx on data: (the pretraining text); DeepSpeed-Chat's unsup_coef


class GRPOConfig(_Section):
    """``zjax rlhf grpo``: ``zjax.rlhf.ppo.GRPOSettings``."""

    group_size: int = Field(8, gt=1)
    kl_coef: float = Field(0.04, ge=0)
    kl_kind: Literal["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"] = "k3"
    cliprange: float = Field(0.2, gt=0)
    cliprange_high: float | None = Field(None, gt=0)
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    ppo_epochs: int = Field(1, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    release_memory: bool = False


class DPOConfig(_Section):
    """``zjax rlhf dpo``: ``zjax.rlhf.losses.dpo_loss``'s settings."""

    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    kind: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


class RLHFConfig(_Section):
    """``zjax rlhf sft|reward|ppo|dpo|grpo`` (``zjax.rlhf.run``): the JSONL data, the models each
    stage starts from, and each algorithm's settings. ``steps`` counts optimizer steps (sft,
    reward, dpo) or rollout iterations (ppo, grpo); ``batch.global_batch_size`` is the batch of
    rows (pairs for reward and dpo, prompts for ppo, prompts x group_size for grpo)."""

    # JSONL: {"prompt", "response"} (sft; "chosen" also works), {"prompt", "chosen", "rejected"}
    # (reward, dpo), {"prompt"} (ppo, grpo)
    data: str | None = None
    eval_data: str | None = None  # the same format, for held-out metrics
    tokenizer: str | None = None  # a directory with tokenizer.json; null = UTF-8 bytes (vocab 256)
    max_prompt_len: int = Field(64, gt=0)  # prompts are cut to their last max_prompt_len tokens
    max_len: int = Field(128, gt=1)  # sft, reward, dpo: prompt + response rows, cut to this
    completion_only: bool = True  # sft: the loss on the response only (DeepSpeed-Chat: every token)
    actor: str | None = None  # a run to start the policy from (e.g. the sft run); null = a new model
    reward_model: str | None = None  # ppo/grpo: a `zjax rlhf reward` run that scores responses
    reward_fn: str | None = None  # ppo/grpo: "module:function", fn(prompts, responses) -> scores (strings)
    critic: str | None = None  # ppo: a run to start the critic from; null = the reward model (DeepSpeed-Chat)
    critic_overrides: list[str] = Field(default_factory=list)  # ppo: the critic's key=value config changes
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)

    @model_validator(mode="after")
    def _check_rewards(self) -> RLHFConfig:
        if self.reward_model is not None and self.reward_fn is not None:
            raise ValueError(f"reward_model={self.reward_model!r} and reward_fn={self.reward_fn!r} both score "
                             "responses; set one of them to null")
        if self.reward_fn is not None and ":" not in self.reward_fn:
            raise ValueError(f"reward_fn={self.reward_fn!r}: give 'module:function' (an importable module and a "
                             "function(prompts, responses) -> scores in it)")
        for item in self.critic_overrides:
            if "=" not in item:
                raise ValueError(f"critic_overrides has {item!r}; give key=value strings, e.g. zero.stage=3")
        return self


class Config(_Section):
    """A whole zjax run. Build it with ``load_config``; ``Config()`` is all defaults."""

    seed: int = 0
    steps: int = Field(100, gt=0)
    output_dir: str | None = None
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)
    eval_batches: int = Field(4, gt=0)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    logical_axis_rules: dict[str, str | None] = Field(default_factory=lambda: dict(DEFAULT_LOGICAL_AXIS_RULES))
    batch: BatchConfig = Field(default_factory=BatchConfig)
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    loss_scale: LossScaleConfig = Field(default_factory=LossScaleConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    gradient_clipping: float = Field(1.0, ge=0)
    remat: RematConfig = Field(default_factory=RematConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    # Megatron sequence parallelism: the residual stream (norms, residual adds) split along the
    # sequence over the tensor group, all-gathered before each column-parallel block and
    # reduce-scattered after each row-parallel one; sets the rule residual_length: tensor.
    tensor_sequence_parallel: bool = False
    # How attention combines a sequence split over mesh.sequence (zjax.parallel.sequence):
    # ulysses (all-to-all to whole sequences on 1/P of the heads), ring (K/V blocks rotated, zig-zag
    # order) or all_gather (K/V gathered).
    sequence_parallel: Literal["ulysses", "ring", "all_gather"] = "ulysses"
    kernels: Literal["xla", "auto", "pallas", "interpret"] = "xla"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoints: CheckpointsConfig = Field(default_factory=CheckpointsConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    rlhf: RLHFConfig = Field(default_factory=RLHFConfig)

    _ignored: tuple[tuple[str, str], ...] = PrivateAttr(default=())
    _mapped: tuple[tuple[str, str], ...] = PrivateAttr(default=())

    @field_validator("logical_axis_rules")
    @classmethod
    def _rules_name_mesh_axes(cls, rules: dict[str, str | None]) -> dict[str, str | None]:
        for name, axis in rules.items():
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(
                    f"{name}={axis!r} is not a mesh axis; use one of {', '.join(MESH_AXES)} or null"
                )
        if rules.get("batch", "data") != "data":
            raise ValueError(
                f"batch={rules['batch']!r}: the batch is always split over replica x data (data parallelism); "
                "use batch: data"
            )
        return rules

    @model_validator(mode="after")
    def _check_cross_block(self) -> Config:
        if self.tensor_sequence_parallel:
            if self.mesh.sequence != 1:
                raise ValueError(
                    f"tensor_sequence_parallel=true and mesh.sequence={self.mesh.sequence} both split the "
                    "sequence; use one of them (mesh.sequence: 1, or tensor_sequence_parallel: false)")
            rule = self.logical_axis_rules.get("residual_length")
            if rule not in (None, "tensor", "sequence"):
                raise ValueError(
                    f"tensor_sequence_parallel=true splits the residual stream over tensor, but "
                    f"logical_axis_rules.residual_length={rule!r}; set residual_length: tensor or null")
            self.logical_axis_rules["residual_length"] = "tensor"
        ep = self.model.moe.ep_size
        if ep is not None and ep != self.mesh.expert:
            # DeepSpeed's expert-parallel group size is zjax's expert axis
            if self.mesh.expert != 1:
                raise ValueError(f"model.moe.ep_size={ep} (DeepSpeed's expert-parallel size) and mesh.expert="
                                 f"{self.mesh.expert} disagree; keep one of them")
            self.mesh.expert = ep
        if self.mesh.stage > 1 or self.mesh.stage == -1:
            rule = self.logical_axis_rules.get("layers")
            if rule not in (None, "stage"):
                raise ValueError(f"mesh.stage={self.mesh.stage} splits the layer stacks over stage, but "
                                 f"logical_axis_rules.layers={rule!r}; set layers: stage or null")
            self.logical_axis_rules["layers"] = "stage"
            if self.model.moe.num_experts:
                raise ValueError(f"mesh.stage={self.mesh.stage} with model.moe.num_experts={self.model.moe.num_experts}"
                                 " is not built yet (the MoE GPT's layers carry their auxiliary loss, a pipeline "
                                 "sends one activation); use mesh.stage: 1 or num_experts: 0")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is longer than model.max_seq_len={self.model.max_seq_len}; "
                "lower data.seq_len or raise model.max_seq_len"
            )
        return self

    @property
    def ignored(self) -> tuple[tuple[str, str], ...]:
        """DeepSpeed keys this config accepted but ignores, as ``(key, reason)`` pairs."""
        return self._ignored

    @property
    def deepspeed_mapping(self) -> tuple[tuple[str, str], ...]:
        """What each DeepSpeed key (or DeepSpeed default) became, as ``(key, "zjax.key = value")`` pairs."""
        return self._mapped

    def to_yaml(self) -> str:
        """The effective config as YAML that ``load_config`` reads back to an equal config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _read_layered(source: str | Path | Mapping[str, Any], chain: tuple[Path, ...]) -> tuple[dict, list, list]:
    """Read one layer, map its DeepSpeed keys, then merge it over its ``base:`` layer."""
    if isinstance(source, Mapping):
        raw, here = copy.deepcopy(dict(source)), Path.cwd()
    else:
        path = Path(source).resolve()
        raw, here = _read_file(path), path.parent
        chain = chain + (path,)
    base = raw.pop("base", None)
    # Map each layer on its own so a DeepSpeed key only conflicts with zjax keys of its own file.
    layer, ignored, mapped = deepspeed.map_deepspeed(raw)
    if base is None:
        return layer, ignored, mapped
    if not isinstance(base, (str, Path)):
        raise ConfigError(f"base={base!r} must be a path to a YAML or JSON file, e.g. base: base.yaml")
    base_path = (here / base).resolve()
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in chain + (base_path,))
        raise ConfigError(f"base={str(base)!r} makes a cycle ({cycle}); remove one of the base: keys")
    parent, parent_ignored, parent_mapped = _read_layered(base_path, chain)
    return _deep_merge(parent, layer), parent_ignored + ignored, parent_mapped + mapped


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give a path to a YAML or JSON file")
    text = _decode(path)
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} holds a {type(raw).__name__}; it must be a mapping of keys")
    return raw


# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's); PowerShell's `>` writes UTF-16 LE.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def _decode(path: Path) -> str:
    """The file's text: UTF-8, or any UTF with a byte-order mark."""
    data = path.read_bytes()
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\x00" in data:
        # NUL bytes are valid UTF-8 but never part of a config: the file is wider text without a BOM.
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text: it holds NUL bytes, as UTF-16 or UTF-32 without a "
            "byte-order mark does; save it as UTF-8"
        )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not {encoding} text: {err.reason} at byte {err.start}; save it as UTF-8"
        ) from None


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any] | None) -> None:
    if overrides is None:
        return
    if isinstance(overrides, str):
        overrides = [overrides]
    pairs = overrides.items() if isinstance(overrides, Mapping) else map(_parse_override, overrides)
    for key, value in pairs:
        node = raw
        *parents, leaf = key.split(".")
        for depth, name in enumerate(parents):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(f"override {key}={value!r}: {section} is {node!r}, not a block with keys")
        node[leaf] = value


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value; write e.g. zero.stage=3 or optimizer.lr=1e-3")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not a YAML scalar ({err}); quote it") from None


def _config_error(err: pydantic.ValidationError) -> ConfigError:
    return ConfigError("\n".join(_describe(error) for error in err.errors()))


def _describe(error: Mapping[str, Any]) -> str:
    """One line for one pydantic error: the dotted key, the value, what would work."""
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return _unknown_key(loc)
    if error["type"] == "value_error":
        # Our own validators already name the values in their message.
        message = str(error["ctx"]["error"])
        return f"{key}: {message}" if key else message
    message = error["msg"].replace("Input should be", "should be")
    return f"{key}={error['input']!r}: {message}"


def _unknown_key(loc: tuple[str, ...]) -> str:
    *parents, name = loc
    if not parents and name in deepspeed.TOP_LEVEL_KEYS:
        # Only overrides get here: they apply after DeepSpeed keys were mapped.
        return (
            f"{name!r} is a DeepSpeed key, which only a config file or dict can use; "
            "override the zjax key instead (`zjax config explain` lists them), e.g. zero.stage=3"
        )
    section = _section_at(parents)
    valid = list(section.model_fields) if section else []
    if not parents:
        valid += [key for key in ("base", *deepspeed.TOP_LEVEL_KEYS) if key not in valid]
    return f"unknown key {'.'.join(loc)!r}; {deepspeed.suggest(name, valid, '.'.join(parents))}"


def _section_at(path: Sequence[str]) -> type[BaseModel] | None:
    section: type[BaseModel] = Config
    for name in path:
        field = section.model_fields.get(name)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        section = annotation
    return section
