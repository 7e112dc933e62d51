"""DeepSpeed config keys in zjax terms: what each one maps to, and why the rest are ignored.

A zjax config may use DeepSpeed's own words (``train_micro_batch_size_per_gpu``,
``zero_optimization.stage``, ``fp16.loss_scale_window``, ``scheduler: {type: WarmupLR}``)
next to zjax keys. ``map_deepspeed`` rewrites them onto the zjax schema with DeepSpeed's
meaning and defaults, read from DeepSpeed's source (``deepspeed/runtime/constants.py``,
``zero/config.py``, ``lr_schedules.py``, ``fp16/loss_scaler.py``, ``deepspeed/compression/``).
Every DeepSpeed key gets one of four treatments, each a table or a handler below:

- mapped onto a zjax key (``_HANDLERS``);
- accepted and listed with the reason it does nothing here (``IGNORED``), silently when
  its value switches it off (``false``, ``{enabled: false}``);
- refused, naming the feature, when it switches on a feature zjax lacks (``UNSUPPORTED``);
- refused when DeepSpeed refuses it too.

A layer written only in DeepSpeed's words is a DeepSpeed config and also takes
DeepSpeed's defaults for what it leaves out (no gradient clipping, a batch size that
must be given); a layer that mixes in zjax keys keeps zjax's defaults.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from zjax.errors import ConfigError

_COLLECTIVES = "XLA schedules and fuses collectives; zjax issues one collective per tensor"
_OFFLOAD = "zjax offloads to host memory only through offload_optimizer/offload_param.device: cpu"
_OFFLOAD_TUNING = "XLA moves the offloaded arrays itself; there are no buffers or pools to tune"
_METRICS = (
    "zjax writes loss, grad_norm, lr, loss_scale and tokens/s to output_dir/metrics.jsonl "
    "(set output_dir); there is no TensorBoard, W&B, Comet or CSV writer"
)
_LR_ONLY = "zjax cycles only the learning rate; momentum stays at optimizer.b1"
_FP32_MASTER = "zjax keeps float32 master params; there is no 16-bit copy to manage"
_NO_BF16_SCALING = "bf16 needs no loss scaling; DeepSpeed does not read this key in the bf16 block either"

# Every DeepSpeed key zjax accepts without acting on it, with the reason it is shown.
IGNORED: dict[str, str] = {
    "wall_clock_breakdown": "`zjax profile CONFIG` times the step; `--trace DIR` writes a jax.profiler trace",
    "memory_breakdown": "`zjax plan CONFIG` and `zjax profile CONFIG` break the memory down",
    "flops_profiler": "`zjax profile CONFIG` reports model and hardware FLOPs, MFU and step time",
    "comms_logger": "`zjax profile CONFIG` lists the collectives by kind against ZeRO's theory",
    "tensorboard": _METRICS,
    "wandb": _METRICS,
    "csv_monitor": _METRICS,
    "comet": _METRICS,
    "dump_state": "there is no engine state to dump; `zjax config explain` prints the effective config",
    "prescale_gradients": "zjax averages gradients in one reduction; there is no separate pre-division",
    "gradient_predivide_factor": "zjax averages gradients in one reduction; there is no separate pre-division",
    "sparse_gradients": "JAX gradients are dense arrays",
    "zero_allow_untested_optimizer": "every zjax optimizer runs at every ZeRO stage",
    "zero_force_ds_cpu_optimizer": _OFFLOAD,
    "checkpoint": "DeepSpeed's checkpoint options do not apply to zjax checkpoints",
    "nebula": "zjax checkpoints with Orbax; there is no Nebula service",
    "aio": _OFFLOAD,
    "autotuning": "zjax has no autotuner; `zjax plan CONFIG --fit BUDGET` finds a setting that fits",
    "fp32_allreduce": "set communication_data_type: fp32 instead",
    "disable_allgather": _COLLECTIVES,
    "dataloader_drop_last": "zjax's data pipeline always drops the last partial batch",
    "activation_checkpointing.partition_activations": (
        "saved activations are already per device: each data-parallel device keeps only its own "
        "micro-batch's, and zjax does not split them further over the tensor axis"
    ),
    "activation_checkpointing.number_checkpoints": "zjax checkpoints every scanned layer; the count is model.n_layers",
    "activation_checkpointing.contiguous_memory_optimization": "XLA owns the layout of activation buffers",
    "activation_checkpointing.synchronize_checkpoint_boundary": (
        "there are no CUDA streams to synchronize; XLA orders the compiled program"
    ),
    "activation_checkpointing.profile": "use zjax.analysis.activations.remat_report or jax.profiler instead",
    "zero_optimization.reduce_bucket_size": _COLLECTIVES,
    "zero_optimization.allgather_bucket_size": _COLLECTIVES,
    "zero_optimization.overlap_comm": _COLLECTIVES,
    "zero_optimization.contiguous_gradients": "XLA owns the layout of gradient buffers",
    "zero_optimization.reduce_scatter": _COLLECTIVES,
    "zero_optimization.allgather_partitions": _COLLECTIVES,
    "zero_optimization.round_robin_gradients": _COLLECTIVES,
    "zero_optimization.use_multi_rank_bucket_allreduce": _COLLECTIVES,
    "zero_optimization.stage3_prefetch_bucket_size": _COLLECTIVES,
    "zero_optimization.stage3_max_live_parameters": _COLLECTIVES,
    "zero_optimization.stage3_max_reuse_distance": _COLLECTIVES,
    "zero_optimization.stage3_param_persistence_threshold": _COLLECTIVES,
    "zero_optimization.stage3_model_persistence_threshold": _COLLECTIVES,
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": _COLLECTIVES,
    "zero_optimization.stage3_module_granularity_threshold": _COLLECTIVES,
    "zero_optimization.sub_group_size": "the optimizer update is one XLA program; there are no sub-groups to size",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _FP32_MASTER,
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": _FP32_MASTER,
    "zero_optimization.gather_16bit_weights_on_model_save": _FP32_MASTER,
    "zero_optimization.elastic_checkpoint": "zjax checkpoints are not DeepSpeed's partitioned ZeRO checkpoints",
    "zero_optimization.load_from_fp32_weights": _FP32_MASTER,
    "zero_optimization.cpu_offload_use_pin_memory": _OFFLOAD_TUNING,
    "zero_optimization.ignore_unused_parameters": "JAX computes a gradient for every parameter",
    "zero_optimization.legacy_stage1": "zjax has one stage-1 implementation",
    "zero_optimization.memory_efficient_linear": "XLA chooses the linear-layer kernels",
    "zero_optimization.override_module_apply": "there are no torch module hooks to override",
    "zero_optimization.pipeline_loading_checkpoint": "zjax restores any checkpoint onto any stage count itself",
    "zero_optimization.log_trace_cache_warnings": "there is no ZeRO-3 trace cache; XLA compiles the gathers",
    "fp16.consecutive_hysteresis": "zjax's loss scaler has a single hysteresis rule; it is not switchable",
    "fp16.auto_cast": "zjax casts to precision.compute_dtype itself; there is no autocast switch",
    "fp16.fp16_master_weights_and_grads": _FP32_MASTER,
    "bf16.immediate_grad_update": "zjax applies the update once per optimizer step",
    "bf16.check_grad_overflow": "overflow checks belong to fp16 loss scaling only",
    **{f"bf16.{name}": _NO_BF16_SCALING for name in (
        "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")},
    "optimizer.legacy_fusion": "XLA fuses the optax update",
    "optimizer.params.torch_adam": "optax runs the same Adam on every backend",
    "optimizer.params.set_grad_none": "JAX gradients are values, not buffers to reset",
    "scheduler.params.last_batch_iteration": "the schedule position is the optimizer step count",
    "scheduler.params.cycle_min_mom": _LR_ONLY,
    "scheduler.params.cycle_max_mom": _LR_ONLY,
    "scheduler.params.decay_mom_rate": _LR_ONLY,
    "tensor_parallel.tp.tp_grain_size": "zjax splits each weight evenly along its logical axes (heads, mlp, vocab)",
    "tensor_parallel.tp.mpu": "the tensor-parallel group is the mesh's tensor axis",
    "tensor_parallel.tp.tp_group": "the tensor-parallel group is the mesh's tensor axis",
    "tensor_parallel.tp.enabled": "tensor parallelism is on exactly when mesh.tensor > 1",
    "tensor_parallel.dtype": "precision comes from the bf16/fp16 blocks (precision.compute_dtype)",
    "tensor_parallel.injection_policy_tuple": "zjax splits parameters by their logical axes; no module injection",
    "tensor_parallel.keep_module_on_host": "train.init creates parameters already split over the mesh",
    "tensor_parallel.replace_with_kernel_inject": "zjax splits parameters by their logical axes; no module injection",
}
# ``bfloat16`` is DeepSpeed's older spelling of the ``bf16`` block.
IGNORED.update({key.replace("bf16.", "bfloat16.", 1): reason for key, reason in IGNORED.items()
                if key.startswith("bf16.")})


def _block_off(value: Any) -> bool:
    """A feature block is off unless its ``enabled`` (or, without one, any nested ``enabled``) is true."""
    if not isinstance(value, Mapping):
        return not value
    if "enabled" in value:
        return value["enabled"] is not True
    return all(_block_off(child) for child in value.values() if isinstance(child, Mapping))


def _never_off(value: Any) -> bool:
    """Blocks without a switch (sparse_attention, pipeline): present means used."""
    return False


def _false(value: Any) -> bool:
    return value in (False, None)


# DeepSpeed features zjax does not have: accepted while switched off, refused by name when on.
# key -> (the feature in DeepSpeed's words, the test that it is switched off).
UNSUPPORTED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "curriculum_learning": ("curriculum learning", _block_off),
    "data_efficiency": ("data efficiency (data sampling, curriculum, random-LTD)", _block_off),
    "quantize_training": ("MoQ quantize-aware training", _block_off),
    "weight_quantization": ("weight quantization", _block_off),
    "hybrid_engine": ("the hybrid engine (RLHF generation)", _block_off),
    "progressive_layer_drop": ("progressive layer drop", _block_off),
    "eigenvalue": ("eigenvalue computation", _block_off),
    "elasticity": ("elastic training (batch size chosen per world size)", _block_off),
    "amp": ("Apex AMP (use bf16 or fp16 instead)", _block_off),
    "zero_optimization.zero_quantized_nontrainable_weights": ("ZeRO++ quantized frozen weights", _false),
}
# DeepSpeed optimizers zjax does not have (its ``type`` names are case-insensitive).
_UNSUPPORTED_OPTIMIZERS = {
    "lamb": "LAMB",
    "adagrad": "Adagrad",
    "muadam": "muP Adam",
    "muadamw": "muP AdamW",
    "musgd": "muP SGD",
}

_BATCH = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size_per_device",
    "gradient_accumulation_steps": "batch.grad_accum_steps",
}
# deepspeed/runtime/config.py lower-cases communication_data_type before checking it.
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_OPTIMIZER_PARAMS = {
    "adam": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "amsgrad", "bias_correction"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "amsgrad", "bias_correction"),
    "sgd": ("lr", "momentum", "nesterov", "weight_decay", "dampening"),
    "lion": ("lr", "betas", "weight_decay"),
    "adafactor": ("lr", "weight_decay"),
    # deepspeed/runtime/fp16/onebit/{adam,zoadam,lamb}.py
    "onebitadam": ("lr", "betas", "eps", "weight_decay", "freeze_step", "bias_correction", "eps_inside_sqrt",
                   "amsgrad", "cuda_aware", "comm_backend_name"),
    "zerooneadam": ("lr", "betas", "eps", "weight_decay", "var_freeze_step", "var_update_scaler",
                    "local_step_scaler", "local_step_clipper", "bias_correction", "eps_inside_sqrt", "amsgrad",
                    "cuda_aware", "comm_backend_name"),
    "onebitlamb": ("lr", "betas", "eps", "weight_decay", "freeze_step", "max_coeff", "min_coeff", "coeff_beta",
                   "factor_max", "factor_min", "factor_threshold", "bias_correction", "eps_inside_sqrt", "amsgrad",
                   "cuda_aware", "comm_backend_name"),
}
# zjax's own optimizer types (config.schema.OptimizerType; a flat block with one of them is zjax's)
_ZJAX_OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor", "onebit_adam", "zero_one_adam", "onebit_lamb")
_ONEBIT = {"onebitadam": "onebit_adam", "zerooneadam": "zero_one_adam", "onebitlamb": "onebit_lamb"}
# Their own options, DeepSpeed's name = zjax's optimizer.<name>
_ONEBIT_OPTIONS = ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper", "max_coeff",
                   "min_coeff", "coeff_beta", "factor_max", "factor_min", "factor_threshold")
# The optimizer's own default learning rate, which DeepSpeed leaves in place when params has no lr:
# FusedAdam, DeepSpeedCPUAdam, FusedLion and torch.optim.SGD use 1e-3, torch.optim.Adafactor 1e-2.
_OPTIMIZER_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 1e-3, "lion": 1e-3, "adafactor": 1e-2,
                 "onebitadam": 1e-3, "zerooneadam": 1e-3, "onebitlamb": 1e-3}
# DeepSpeed/torch options zjax supports only at their default value.
_DEFAULT_ONLY = {"amsgrad": False, "bias_correction": True, "dampening": 0}
# Optimizer params DeepSpeed itself refuses (engine.py _configure_basic_optimizer).
_REFUSED_PARAMS = {
    "max_grad_norm": (
        "DeepSpeed refuses it too ('max_grad_norm' is not supported as an optimizer parameter); "
        "set the top-level gradient_clipping instead, e.g. gradient_clipping: 1.0"
    ),
}
_SCHEDULERS = {
    "warmuplr": "warmup",
    "warmupdecaylr": "warmup_decay",
    "warmupcosinelr": "warmup_cosine",
    "onecycle": "onecycle",
}
_WARMUP = {
    "warmup_min_lr": "schedule.warmup_min_lr",
    "warmup_max_lr": "optimizer.lr",
    "warmup_num_steps": "schedule.warmup_steps",
    "warmup_type": "schedule.warmup_type",
}
_SCHEDULER_PARAMS = {
    "warmup": _WARMUP,
    "warmup_decay": {**_WARMUP, "total_num_steps": "schedule.total_steps"},
    "warmup_cosine": {
        "total_num_steps": "schedule.total_steps",
        "warmup_min_ratio": "schedule.warmup_min_ratio",
        "warmup_num_steps": "schedule.warmup_steps",
        "cos_min_ratio": "schedule.cos_min_ratio",
        "warmup_type": "schedule.warmup_type",
    },
    "onecycle": {
        "cycle_min_lr": "schedule.cycle_min_lr",
        "cycle_max_lr": "schedule.cycle_max_lr",
        "decay_lr_rate": "schedule.decay_lr_rate",
        "cycle_first_step_size": "schedule.cycle_first_step_size",
        "cycle_second_step_size": "schedule.cycle_second_step_size",
        "decay_step_size": "schedule.decay_step_size",
    },
}
# The scheduler classes' defaults in deepspeed/runtime/lr_schedules.py, where zjax's differ.
# WarmupLR and WarmupDecayLR peak at warmup_max_lr=0.001, not at the optimizer's lr.
_SCHEDULER_DEFAULTS = {
    "warmup": {"warmup_num_steps": 1000, "warmup_type": "log", "warmup_max_lr": 0.001},
    "warmup_decay": {"warmup_num_steps": 1000, "warmup_type": "log", "warmup_max_lr": 0.001},
    "warmup_cosine": {"warmup_num_steps": 1000, "warmup_type": "log", "cos_min_ratio": 0.0001},
    "onecycle": {"cycle_first_step_size": 2000},
}
# fp16 keys that make DeepSpeed build the loss scaler from the config (runtime/config.py get_dynamic_loss_scale_args).
_DYNAMIC_LOSS_ARGS = (
    "initial_scale_power", "loss_scale_window", "min_loss_scale", "hysteresis", "consecutive_hysteresis")
_AUTO_HINTS = {
    "train_batch_size": "give the global batch size as an integer, e.g. 32",
    "train_micro_batch_size_per_gpu": "give the per-device micro-batch size as an integer, e.g. 4",
    "gradient_accumulation_steps": "give the micro-batches per optimizer step as an integer, e.g. 1",
    "gradient_clipping": "give the max global gradient norm as a number, e.g. 1.0 (0 disables clipping)",
    "zero_optimization.stage": "give the ZeRO stage: 0, 1, 2 or 3",
    "fp16.enabled": "give true or false",
    "bf16.enabled": "give true or false",
    "bfloat16.enabled": "give true or false",
    "optimizer.params.lr": "give the learning rate as a number, e.g. 3e-4",
    "optimizer.params.betas": "give [b1, b2], e.g. [0.9, 0.999]",
    "optimizer.params.eps": "give a number, e.g. 1e-8",
    "optimizer.params.weight_decay": "give a number, e.g. 0.0",
    "scheduler.params.warmup_min_lr": "give a number, e.g. 0",
    "scheduler.params.warmup_max_lr": "give the peak learning rate, e.g. 3e-4",
    "scheduler.params.warmup_num_steps": "give the warmup length in optimizer steps, e.g. 100",
    "scheduler.params.total_num_steps": "give the run length in optimizer steps (the run's steps), e.g. 1000",
}


def map_deepspeed(raw: Mapping[str, Any]) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str]]]:
    """Rewrite the DeepSpeed keys of one config layer onto the zjax schema.

    Args:
      raw: one config layer; DeepSpeed and zjax keys may be mixed.

    Returns:
      ``(layer, ignored, mapped)``: the layer with only zjax keys; ``(key, reason)`` for
      each DeepSpeed key it accepted but ignores; ``(key, "zjax.key = value")`` for each
      DeepSpeed key (or DeepSpeed default) that set a zjax key.

    Example:
      >>> layer, ignored, mapped = map_deepspeed({"bf16": {"enabled": True}, "steps": 10})
      >>> layer
      {'steps': 10, 'precision': {'compute_dtype': 'bfloat16'}}
      >>> mapped
      [('bf16.enabled', 'precision.compute_dtype = bfloat16')]
    """
    ds_keys = [key for key, value in raw.items() if _is_deepspeed(key, value)]
    _reject_autos({key: raw[key] for key in raw if key in ds_keys or key in _SHARED})
    if not ds_keys:
        return dict(raw), [], []
    _refuse_switched_on(raw)
    translation = _Translation(raw)
    if all(key in ds_keys or key in _SHARED for key in raw):
        _deepspeed_defaults(translation)
    for key in sorted([*ds_keys, *(key for key in _SHARED if key in raw)], key=_HANDLER_ORDER.index):
        _HANDLERS.get(key, _ignore_top_level)(key, raw[key], translation)
    layer = {key: value for key, value in raw.items() if key not in ds_keys and key not in _SHARED}
    return translation.apply(layer)


def _deepspeed_defaults(out: _Translation) -> None:
    """What a config written only in DeepSpeed's words means where it is silent."""
    # deepspeed/runtime/constants.py: GRADIENT_CLIPPING_DEFAULT = 0. (no clipping).
    out.default("gradient_clipping", 0.0, "gradient_clipping (DeepSpeed default)")
    # TRAIN_BATCH_SIZE_DEFAULT, TRAIN_MICRO_BATCH_SIZE_PER_GPU_DEFAULT, GRADIENT_ACCUMULATION_STEPS_DEFAULT
    # are None: any two give the third, and Config refuses a batch with neither size.
    for ds_key, zjax_key in _BATCH.items():
        out.default(zjax_key, None, f"{ds_key} (not given)")


class _Translation:
    """Dotted zjax key -> value, collected from DeepSpeed keys, plus the ignored keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)
        self.values: dict[str, tuple[Any, str]] = {}
        self.defaults: dict[str, tuple[Any, str]] = {}
        self.ignored: list[tuple[str, str]] = []

    def set(self, zjax_key: str, value: Any, ds_key: str) -> None:
        """Record that ``ds_key`` gives ``zjax_key`` the value ``value``."""
        if zjax_key in self.values and self.values[zjax_key][0] != value:
            previous, source = self.values[zjax_key]
            raise ConfigError(
                f"{ds_key} sets {zjax_key}={value!r} but {source} sets it to {previous!r}; keep one of them"
            )
        self.values[zjax_key] = (value, ds_key)

    def default(self, zjax_key: str, value: Any, source: str) -> None:
        """Record a value that holds only where no key of this layer sets ``zjax_key``."""
        self.defaults[zjax_key] = (value, source)

    def ignore(self, ds_key: str, value: Any, reason: str | None = None) -> None:
        """List ``ds_key`` as ignored, unless its value switches it off."""
        if not (_false(value) or (isinstance(value, Mapping) and value.get("enabled", True) is False)):
            self.ignored.append((ds_key, reason or IGNORED[ds_key]))

    def stage(self) -> int:
        """The ZeRO stage this layer's zero_optimization gives (DeepSpeed's default 0)."""
        return self.values.get("zero.stage", (0, ""))[0]

    def apply(self, layer: dict) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str]]]:
        """Write the values into ``layer``; a zjax key of the same layer must agree."""
        mapped = []
        for zjax_key, (value, ds_key) in self.values.items():
            given = _get(layer, zjax_key)
            if given is not _ABSENT and given != value:
                raise ConfigError(
                    f"{ds_key} sets {zjax_key}={value!r} but the config also sets {zjax_key}={given!r}; "
                    "keep one of them"
                )
            _put(layer, zjax_key, value)
            mapped.append((ds_key, f"{zjax_key} = {_show(value)}"))
        for zjax_key, (value, source) in self.defaults.items():
            if _get(layer, zjax_key) is _ABSENT:
                _put(layer, zjax_key, value)
                mapped.append((source, f"{zjax_key} = {_show(value)}"))
        return layer, self.ignored, mapped


def _show(value: Any) -> str:
    return "null (derived)" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _map_batch(key: str, value: Any, out: _Translation) -> None:
    out.set(_BATCH[key], _int(key, value), key)
    # DeepSpeed semantics: any two of the triple give the third, so the unset ones are derived.
    for ds_key, zjax_key in _BATCH.items():
        out.default(zjax_key, None, f"{ds_key} (not given)")


def _map_gradient_clipping(key: str, value: Any, out: _Translation) -> None:
    out.set("gradient_clipping", _number(key, value), key)


def _map_zero(key: str, block: Any, out: _Translation) -> None:
    mapped = ("stage", "offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_param",
              "zero_quantized_weights", "zero_quantized_gradients", "zero_hpz_partition_size", "mics_shard_size",
              "mics_hierarchical_params_gather", "zeropp_loco_param")
    _check_keys(key, block, mapped)
    stage = _int(f"{key}.stage", block.get("stage", 0))
    if "stage" in block:
        out.set("zero.stage", stage, f"{key}.stage")
    if _bool(f"{key}.zero_quantized_weights", block.get("zero_quantized_weights", False)):
        out.set("zero.quantized_weights", True, f"{key}.zero_quantized_weights")  # ZeRO++ qwZ
    if _bool(f"{key}.zero_quantized_gradients", block.get("zero_quantized_gradients", False)):
        out.set("zero.quantized_gradients", True, f"{key}.zero_quantized_gradients")  # ZeRO++ qgZ
    loco = block.get("zeropp_loco_param")
    if loco is not None:  # ZeRO++ LoCo: on when the block is given (stage3.py: zeropp_loco_param is not None)
        loco_key = f"{key}.zeropp_loco_param"
        _check_keys(loco_key, loco, ("err_beta", "reset_T"))
        out.set("zero.loco", True, loco_key)
        if "err_beta" in loco:
            out.set("zero.loco_err_beta", _number(f"{loco_key}.err_beta", loco["err_beta"]), f"{loco_key}.err_beta")
        if "reset_T" in loco:
            # DeepSpeed counts reductions (one per parameter and step) in one counter; zjax counts steps
            out.set("zero.loco_reset_steps", _int(f"{loco_key}.reset_T", loco["reset_T"]),
                    f"{loco_key}.reset_T (counted in steps here)")
    mics = block.get("mics_shard_size")
    if mics is not None and _int(f"{key}.mics_shard_size", mics) > 0:
        # MiCS: ZeRO inside groups of mics_shard_size devices, replicated across the groups (mesh.replica)
        out.set("mesh.data", _int(f"{key}.mics_shard_size", mics), f"{key}.mics_shard_size")
        out.set("mesh.replica", -1, f"{key}.mics_shard_size")
    if _bool(f"{key}.mics_hierarchical_params_gather", block.get("mics_hierarchical_params_gather", False)):
        # gathers across the nodes, then inside them (DeepSpeed finds the node size from the launcher;
        # zjax reads zero.node_size, which the config must set)
        out.set("zero.hierarchical_gathers", True, f"{key}.mics_hierarchical_params_gather")
    hpz = block.get("zero_hpz_partition_size")
    if hpz not in (None, 0, 1):  # ZeRO++ hpZ (DeepSpeed: 1 = off)
        out.set("zero.hpz_partition_size", _int(f"{key}.zero_hpz_partition_size", hpz), f"{key}.zero_hpz_partition_size")
    # zero/config.py: the deprecated cpu_offload / cpu_offload_param become offload_optimizer /
    # offload_param with device cpu when true, and may not be given next to them.
    for legacy, name in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if legacy not in block:
            continue
        if name in block:
            raise ConfigError(
                f"{key}.{legacy} and {key}.{name} are both given; DeepSpeed refuses this too (Cannot provide "
                f"deprecated parameter '{legacy}' and replacing parameter '{name}' together): keep {name}"
            )
        if _bool(f"{key}.{legacy}", block[legacy]):
            _map_offload(f"{key}.{legacy}", "cpu", f"zero.{name}", stage, out)
    for name in ("offload_optimizer", "offload_param"):
        if name in block:
            _map_offload_block(f"{key}.{name}", block[name], f"zero.{name}", stage, out)
    _ignore_rest(key, block, mapped, out)


def _map_offload_block(key: str, block: Any, target: str, stage: int, out: _Translation) -> None:
    """``offload_*: {device: cpu|none, pin_memory, buffer_count, ...}``: only ``device`` acts."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{key}={block!r} must be a block, e.g. {key}: {{device: cpu}}")
    device = block.get("device", "none")
    if device not in ("cpu", "none"):
        raise ConfigError(f"{key}.device={device!r}: zjax offloads to host memory only; use device: cpu or none")
    _map_offload(f"{key}.device", device, target, stage, out)
    for name in block:
        if name != "device":
            out.ignore(f"{key}.{name}", block[name], _OFFLOAD_TUNING)


def _map_offload(source: str, device: str, target: str, stage: int, out: _Translation) -> None:
    if target == "zero.offload_param" and stage < 3 and device != "none":
        # DeepSpeed builds parameter offload only in its stage-3 optimizer.
        out.ignore(source, device, f"DeepSpeed offloads parameters only at stage 3; stage {stage} ignores it")
    else:
        out.set(target, device, source)


def _map_fp16(key: str, block: Any, out: _Translation) -> None:
    mapped = ("enabled", "loss_scale", *_DYNAMIC_LOSS_ARGS[:-1])
    _check_keys(key, block, mapped)
    enabled = _bool("fp16.enabled", block.get("enabled", False))
    if enabled:
        out.set("precision.compute_dtype", "float16", "fp16.enabled")
        out.set("loss_scale.enabled", True, "fp16.enabled")
    # FP16_LOSS_SCALE_DEFAULT = 0: 0 selects dynamic scaling, a positive value a fixed scale.
    scale = _number("fp16.loss_scale", block.get("loss_scale", 0))
    if "loss_scale" in block:
        out.set("loss_scale.dynamic", scale == 0, "fp16.loss_scale")
        if scale != 0:
            out.set("loss_scale.static_scale", scale, "fp16.loss_scale")
    for name, convert in (
        ("initial_scale_power", _int),
        ("loss_scale_window", _int),
        ("hysteresis", _int),
        ("min_loss_scale", _number),
    ):
        if name in block:
            out.set(f"loss_scale.{name}", convert(f"fp16.{name}", block[name]), f"fp16.{name}")
    if enabled and scale == 0 and not any(name in block for name in _DYNAMIC_LOSS_ARGS):
        # No dynamic-scaling key: ZeRO's CreateLossScaler(dynamic_loss_args=None) builds
        # DynamicLossScaler() with its class defaults (fp16/loss_scaler.py), while stage 0's
        # FP16_Optimizer starts at 2**16 (runtime/config.py get_initial_dynamic_scale).
        power = 32 if out.stage() > 0 else 16
        out.default("loss_scale.initial_scale_power", power, "fp16 (DeepSpeed default without scaling keys)")
        out.default("loss_scale.hysteresis", 1, "fp16 (DeepSpeed default without scaling keys)")
    _ignore_rest(key, block, mapped, out)


def _map_bf16(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("enabled",))
    if _bool(f"{key}.enabled", block.get("enabled", False)):
        out.set("precision.compute_dtype", "bfloat16", f"{key}.enabled")
    _ignore_rest(key, block, ("enabled",), out)


def _map_bfloat16(key: str, block: Any, out: _Translation) -> None:
    """DeepSpeed's older spelling of bf16; runtime/config.py reads it only when bf16 is absent."""
    if "bf16" in out.keys:
        out.ignore(key, True, "DeepSpeed reads the bf16 block and ignores bfloat16 when both are given")
        return
    _map_bf16(key, block, out)


def _map_optimizer(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("type", "params"))
    given_type = block.get("type")
    name = str(given_type).lower()
    if name in _UNSUPPORTED_OPTIMIZERS:
        raise ConfigError(
            f"optimizer.type={given_type!r}: {_UNSUPPORTED_OPTIMIZERS[name]} is not implemented in zjax; "
            "use one of Adam, AdamW, SGD, Lion, Adafactor, OneBitAdam, ZeroOneAdam, OneBitLamb"
        )
    if name not in _OPTIMIZER_PARAMS:
        raise ConfigError(
            f"optimizer.type={given_type!r} is not supported; use one of Adam, AdamW, SGD, Lion, Adafactor, "
            "OneBitAdam, ZeroOneAdam, OneBitLamb"
        )
    params = block.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"optimizer.params={params!r} must be a block of keys, e.g. optimizer.params: {{lr: 1e-3}}")
    for option, hint in _REFUSED_PARAMS.items():
        if option in params:
            raise ConfigError(f"optimizer.params.{option}={params[option]!r}: {hint}")
    _check_keys("optimizer.params", params, _OPTIMIZER_PARAMS[name], f" for {given_type}")
    for option, default in _DEFAULT_ONLY.items():
        if option == "bias_correction" and name in _ONEBIT:
            continue  # unused by DeepSpeed's 1-bit optimizers (handled below)
        if option in params and params[option] != default:
            raise ConfigError(
                f"optimizer.params.{option}={params[option]!r} is not supported by zjax's {name}; "
                f"remove it or set {option}: {default!r}"
            )
    if params.get("eps_inside_sqrt", False) is not False:
        raise ConfigError(f"optimizer.params.eps_inside_sqrt={params['eps_inside_sqrt']!r} is not supported; "
                          "remove it (eps is added outside the square root, DeepSpeed's default)")
    zjax_type = _adam_flavour(name, params, out) if name in ("adam", "adamw") else _ONEBIT.get(name, name)
    if name in _ONEBIT:
        _map_onebit(name, params, out)
    out.set("optimizer.type", zjax_type, "optimizer.type")
    out.default("optimizer.lr", _OPTIMIZER_LR[name], f"optimizer.params.lr ({given_type}'s default)")
    if "betas" in params:
        b1, b2 = _betas(params["betas"])
        out.set("optimizer.b1", b1, "optimizer.params.betas")
        out.set("optimizer.b2", b2, "optimizer.params.betas")
    for option, convert in (("lr", _number), ("eps", _number), ("weight_decay", _number),
                            ("momentum", _number), ("nesterov", _bool)):
        if option in params:
            ds_key = f"optimizer.params.{option}"
            out.set(f"optimizer.{option}", convert(ds_key, params[option]), ds_key)
    if out.values.get("optimizer.weight_decay", (0,))[0] > 0:
        # DeepSpeed decays every parameter the script hands to deepspeed.initialize.
        out.default("optimizer.decay_norms_and_biases", True, "optimizer.params.weight_decay (on every parameter)")
    _ignore_rest("optimizer.params", params, (*_OPTIMIZER_PARAMS[name], "adam_w_mode"), out)
    _ignore_rest(key, block, ("type", "params"), out)


def _map_onebit(name: str, params: Mapping[str, Any], out: _Translation) -> None:
    """DeepSpeed's OneBitAdam / ZeroOneAdam / OneBitLamb params onto zjax's optimizer keys."""
    if "freeze_step" in params:
        # DeepSpeed's first step() only initializes (it counts), so its freeze_step F runs F - 1 exact
        # updates: zjax's freeze_step counts exact updates (zjax.train.onebit)
        given = _number("optimizer.params.freeze_step", params["freeze_step"])
        out.set("optimizer.freeze_step", max(1, int(given) - 1), "optimizer.params.freeze_step (DeepSpeed's - 1)")
    else:
        out.default("optimizer.freeze_step", 100000 - 1, "optimizer.params.freeze_step (DeepSpeed's default - 1)")
    if name == "onebitadam":  # its bias_correction argument is unused: the update has none
        out.set("optimizer.bias_correction", False, "optimizer.type (OnebitAdam applies no bias correction)")
    if "bias_correction" in params:
        out.ignore("optimizer.params.bias_correction", params["bias_correction"],
                   "DeepSpeed's 1-bit optimizers do not read it")
    for option in _ONEBIT_OPTIONS:
        if option in params:
            ds_key = f"optimizer.params.{option}"
            value = _number(ds_key, params[option])
            out.set(f"optimizer.{option}", int(value) if option.endswith(("step", "scaler", "clipper")) else value,
                    ds_key)
    for option in ("cuda_aware", "comm_backend_name"):
        if option in params:
            out.ignore(f"optimizer.params.{option}", params[option],
                       "the transport is XLA's collectives; the packed signs are on the wire everywhere")


def _adam_flavour(name: str, params: Mapping[str, Any], out: _Translation) -> str:
    """engine.py _configure_basic_optimizer: AdamW, and Adam with adam_w_mode (default true), decay decoupled."""
    adam_w_mode = _bool("optimizer.params.adam_w_mode", params.get("adam_w_mode", True))
    if name == "adamw" and not adam_w_mode:
        out.ignore("optimizer.params.adam_w_mode", True,
                   "DeepSpeed's AdamW decouples weight decay whatever adam_w_mode says")
    decoupled = name == "adamw" or adam_w_mode
    if params.get("torch_adam") is True and decoupled and "weight_decay" not in params:
        # torch_adam selects torch.optim.AdamW, whose default weight_decay is 1e-2 (FusedAdam's is 0).
        out.set("optimizer.weight_decay", 0.01, "optimizer.params.weight_decay (torch.optim.AdamW's default)")
    weight_decay = _number("optimizer.params.weight_decay", params.get("weight_decay", 0.0))
    if weight_decay > 0 and not decoupled:
        raise ConfigError(
            f"optimizer.params.adam_w_mode=False with weight_decay={weight_decay} is L2-coupled Adam, which "
            "zjax does not implement; use adam_w_mode: true (decoupled, AdamW) or weight_decay: 0"
        )
    # Without weight decay, decoupled and coupled Adam are the same update.
    return "adamw" if weight_decay > 0 or "optimizer.weight_decay" in out.values else "adam"


def _betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"optimizer.params.betas={value!r} must be a pair [b1, b2], e.g. [0.9, 0.999]")
    return _number("optimizer.params.betas", value[0]), _number("optimizer.params.betas", value[1])


def _map_scheduler(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("type", "params"))
    given_type = block.get("type")
    name = _SCHEDULERS.get(str(given_type).lower())
    if name is None:
        raise ConfigError(
            f"scheduler.type={given_type!r} is not supported; use one of WarmupLR, WarmupDecayLR, "
            "WarmupCosineLR, OneCycle"
        )
    params = block.get("params") or {}
    mapping = _SCHEDULER_PARAMS[name]
    stairs = ("cycle_first_stair_count", "cycle_second_stair_count") if name == "onecycle" else ()
    momentum = ("cycle_momentum",) if name == "onecycle" else ()
    _check_keys("scheduler.params", params, (*mapping, *stairs, *momentum), f" for {given_type}")
    out.set("schedule.type", name, "scheduler.type")
    for ds_name, value in _SCHEDULER_DEFAULTS[name].items():
        if ds_name not in params:
            source = f"scheduler.params.{ds_name} ({given_type}'s default)"
            if mapping[ds_name] == "optimizer.lr":
                _set_peak_lr(value, source, out, weak=True)
            else:
                out.default(mapping[ds_name], value, source)
    for ds_name, zjax_key in mapping.items():
        if ds_name not in params:
            continue
        ds_key = f"scheduler.params.{ds_name}"
        value = _scalar(ds_key, params[ds_name])
        if zjax_key == "optimizer.lr":
            _set_peak_lr(_number(ds_key, value), ds_key, out, weak=False)
        else:
            out.set(zjax_key, value, ds_key)
    if name == "onecycle":
        _check_one_cycle(params, out)
    _ignore_rest("scheduler.params", params, (*mapping, *stairs, *momentum), out)


def _set_peak_lr(lr: float, source: str, out: _Translation, weak: bool) -> None:
    """WarmupLR and WarmupDecayLR run from warmup_min_lr to warmup_max_lr whatever the optimizer's lr."""
    replaced = out.values.pop("optimizer.lr", None)
    if replaced is not None and replaced[0] != lr:
        out.ignored.append((replaced[1], f"{source} sets the peak learning rate"))
    out.defaults.pop("optimizer.lr", None)
    if weak:
        # Only a zjax optimizer.lr of the same layer outranks the scheduler class's own default.
        out.default("optimizer.lr", lr, source)
    else:
        out.set("optimizer.lr", lr, source)


def _check_one_cycle(params: Mapping[str, Any], out: _Translation) -> None:
    if "cycle_max_lr" in params and "optimizer.lr" in out.values:
        out.ignored.append((out.values["optimizer.lr"][1], "OneCycle peaks at scheduler.params.cycle_max_lr"))
    for stair in ("cycle_first_stair_count", "cycle_second_stair_count"):
        if params.get(stair) not in (None, 0):
            raise ConfigError(
                f"scheduler.params.{stair}={params[stair]!r}: stair-case OneCycle is not implemented; "
                f"remove {stair} or set it to 0"
            )
    # OneCycle cycles momentum by default (cycle_momentum=True), for every optimizer with betas
    # (it also sets beta2 to 0.99); SGD has none, and DeepSpeed then switches it off itself.
    cycles = _bool("scheduler.params.cycle_momentum", params.get("cycle_momentum", True))
    if cycles and out.values.get("optimizer.type", ("adamw", ""))[0] != "sgd":
        raise ConfigError(
            "scheduler.params.cycle_momentum=True (OneCycle's default): momentum cycling is not implemented "
            "in zjax; set cycle_momentum: false to cycle only the learning rate"
        )


def _map_activation_checkpointing(key: str, block: Any, out: _Translation) -> None:
    """DeepSpeed checkpoints each layer, keeping its input: ``full``; on the host with ``cpu_checkpointing``."""
    _check_keys(key, block, ("cpu_checkpointing",))
    to_host = _bool(f"{key}.cpu_checkpointing", block.get("cpu_checkpointing", False))
    if to_host:
        out.set("remat.policy", "full_offload", f"{key}.cpu_checkpointing")
    else:
        # The block alone only says how checkpoints behave; a remat.policy of the same layer wins.
        out.default("remat.policy", "full", key)
    _ignore_rest(key, block, ("cpu_checkpointing",), out)


def _map_data_types(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("grad_accum_dtype",))
    if block.get("grad_accum_dtype") is not None:
        ds_key = "data_types.grad_accum_dtype"
        out.set("precision.accum_dtype", _dtype(ds_key, block["grad_accum_dtype"]), ds_key)


def _map_communication_dtype(key: str, value: Any, out: _Translation) -> None:
    if value is not None:
        out.set("precision.reduce_dtype", _dtype(key, value), key)


def _map_steps_per_print(key: str, value: Any, out: _Translation) -> None:
    if value is not None:
        out.set("log_every", _int(key, value), key)


def _map_tensor_parallel(key: str, block: Any, out: _Translation) -> None:
    """AutoTP's ``autotp_size`` (0 = off) and ``tp.tp_size`` map onto ``mesh.tensor``."""
    _check_keys(key, block, ("autotp_size", "tp"))
    tp = block.get("tp", {})
    _check_keys(f"{key}.tp", tp, ("tp_size",))
    sizes = {f"{key}.autotp_size": _int(f"{key}.autotp_size", block.get("autotp_size", 0)) or 1,
             f"{key}.tp.tp_size": _int(f"{key}.tp.tp_size", tp.get("tp_size", 1))}
    given = {k: v for k, v in sizes.items() if v > 1}
    if len(set(given.values())) > 1:
        raise ConfigError(f"{' and '.join(f'{k}={v}' for k, v in given.items())} disagree; "
                          "give one tensor-parallel size")
    for ds_key, size in sizes.items():
        if size < 1:
            raise ConfigError(f"{ds_key}={size}: use a tensor-parallel size >= 1 (0 = off for autotp_size)")
    source = next(iter(given), f"{key}.autotp_size")
    out.set("mesh.tensor", max(sizes.values()), source)
    _ignore_rest(f"{key}.tp", tp, ("tp_size",), out)
    _ignore_rest(key, block, ("autotp_size", "tp"), out)


def _map_sequence_parallel_size(key: str, value: Any, out: _Translation) -> None:
    """DeepSpeed-Ulysses' ``sequence_parallel_size`` maps onto ``mesh.sequence`` (Ulysses attention)."""
    size = _int(key, value)
    if size < 1:
        raise ConfigError(f"{key}={value}: use a sequence-parallel size >= 1")
    out.set("mesh.sequence", size, key)


# DeepSpeed's pipeline block (its engine reads "stages" and the rest; PipelineModule's
# partition_method and activation_checkpoint_interval may sit there too, as in Megatron-DeepSpeed).
_PIPELINE_KEYS = ("stages", "partition", "partition_method", "activation_checkpoint_interval", "seed_layers",
                  "pipe_partitioned", "grad_partitioned")


def _map_pipeline(key: str, block: Any, out: _Translation) -> None:
    """``pipeline.stages`` -> ``mesh.stage`` with ``pipeline.schedule: 1f1b`` (DeepSpeed's TrainSchedule; and ``gradient_accumulation_steps`` -> ``pipeline.microbatches``:
    DeepSpeed pipelines a step's micro-batches); ``partition_method`` uniform/parameters (zjax splits a
    stack of equal layers into equal chunks: the same split); ``activation_checkpoint_interval``
    1 -> ``remat.policy: full`` (every layer), 0 -> nothing; the rest is ignored, named."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{key}={block!r} must be a block of keys, e.g. {key}: {{stages: 4}}")
    if "stages" in block:
        stages = _int(f"{key}.stages", block["stages"])
        if stages < 1:
            raise ConfigError(f"{key}.stages={stages}: use a stage count >= 1")
        out.set("mesh.stage", stages, f"{key}.stages")
        if stages > 1:  # DeepSpeed's PipelineEngine runs its TrainSchedule: 1F1B
            out.set("pipeline.schedule", "1f1b", f"{key}.stages")
        accum = out.values.get("batch.grad_accum_steps")
        if stages > 1 and accum is not None and accum[0] > 1:
            # DeepSpeed's pipeline runs a step's gradient_accumulation_steps micro-batches through
            # the pipeline together: zjax's pipeline.microbatches, over one larger micro-step
            steps = accum[0]
            out.values["pipeline.microbatches"] = (steps, accum[1])
            out.values["batch.grad_accum_steps"] = (1, accum[1])
            micro = out.values.get("batch.micro_batch_size_per_device")
            if micro is not None:
                out.values["batch.micro_batch_size_per_device"] = (micro[0] * steps, micro[1])
    for name in ("partition", "partition_method"):
        method = block.get(name, "parameters")
        if str(method).lower() not in ("uniform", "parameters"):
            raise ConfigError(f"{key}.{name}={method!r}: zjax splits a layer stack into equal contiguous chunks "
                              "(uniform; for equal layers also DeepSpeed's parameters); use uniform or parameters")
    interval = _int(f"{key}.activation_checkpoint_interval", block.get("activation_checkpoint_interval", 0))
    if interval == 1:
        out.set("remat.policy", "full", f"{key}.activation_checkpoint_interval")
    elif interval > 1:
        raise ConfigError(f"{key}.activation_checkpoint_interval={interval}: zjax checkpoints every layer "
                          "(remat.policy) or none; use 1 or 0")
    for name in block:
        if name not in _PIPELINE_KEYS:
            raise ConfigError(f"{key}.{name} is not a DeepSpeed pipeline key zjax knows; known: "
                              f"{', '.join(_PIPELINE_KEYS)}")
    for name in ("seed_layers", "pipe_partitioned", "grad_partitioned"):
        if name in block:
            out.ignore(f"{key}.{name}", block[name], "zjax's pipeline sends whole activations between stages and "
                       "seeds every layer from the model's own initializers")


def _map_sparse_attention(key: str, block: Any, out: _Translation) -> None:
    """DeepSpeed's ``sparse_attention`` block -> ``model.sparse_attention`` (the reference GPT's
    attention over that block-sparse layout; ``zjax.models.sparse_attention`` checks its keys)."""
    from zjax.config.sparsity import map_deepspeed_sparse_attention

    map_deepspeed_sparse_attention(dict(block) if isinstance(block, Mapping) else block)  # a clear error here
    out.set("model.sparse_attention", dict(block), key)


# -- compression_training ------------------------------------------------------------------
# DeepSpeed <= 0.19.6 (v0.19.5 and master 0.19.6 have the same files): the keys and defaults of
# deepspeed/compression/constants.py and config.py (get_*_shared_parameters, get_*_different_groups),
# what they do in basic_layer.py (LinearLayer_Compress), compress.py (get_compress_methods,
# init_compression), scheduler.py (compression_scheduler) and runtime/quantize.py (Quantizer, MoQ).
# The step each technique starts at is zjax.compression.schedule's business (see its docstring).
_CT_TECHNIQUES = ("weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning",
                  "head_pruning", "channel_pruning", "layer_reduction")
# shared_parameters each technique reads (config.py get_*_shared_parameters), with DeepSpeed's defaults.
_CT_SHARED: dict[str, dict[str, Any]] = {
    "weight_quantization": {"enabled": False, "quantizer_kernel": False, "schedule_offset": 0, "quantize_groups": 1,
                            "quantize_verbose": False, "quantization_type": "symmetric",
                            "quantize_weight_in_forward": False, "rounding": "nearest", "fp16_mixed_quantize": {}},
    "activation_quantization": {"enabled": False, "quantization_type": "symmetric", "range_calibration": "dynamic",
                                "schedule_offset": 1000},
    # block_pattern, dense_ratio, schedule_offset_stride, excluded_modules and schedule_offset_end are read
    # only with method snip_momentum
    "sparse_pruning": {"enabled": False, "method": "l1", "schedule_offset": 1000, "block_pattern": "4x1",
                       "dense_ratio": 0.1, "schedule_offset_stride": 1, "excluded_modules": [],
                       "schedule_offset_end": None},
    "row_pruning": {"enabled": False, "method": "l1", "schedule_offset": 1000},
    "head_pruning": {"enabled": False, "method": "topk", "schedule_offset": 1000, "num_heads": None},
    "channel_pruning": {"enabled": False, "method": "l1", "schedule_offset": 1000},
}
_CT_SNIP_ONLY = ("block_pattern", "dense_ratio", "schedule_offset_stride", "excluded_modules", "schedule_offset_end")
# different_groups.<name>.params each technique reads (get_*_different_groups asserts the required ones).
_CT_PARAMS = {
    "weight_quantization": ("start_bits", "target_bits", "quantization_period"),
    "activation_quantization": ("bits",),
    "sparse_pruning": ("dense_ratio",),
    "row_pruning": ("dense_ratio",),
    "head_pruning": ("dense_ratio",),
    "channel_pruning": ("dense_ratio",),
}
_CT_GROUP_KEYS = ("params", "modules", "related_modules")
_CT_LAYER_REDUCTION = ("enabled", "keep_number_layer", "module_name_prefix", "teacher_layer", "other_module_name")
_CT_MOQ_ONLY = "read only by DeepSpeed's MoQ quantizer (runtime/quantize.py), which quantize_weight_in_forward: true does not build"
_CT_SHARED_WINS = ("DeepSpeed reads it from shared_parameters, whose value (given or default) replaces the group's "
                   "(compress.py get_compress_methods: {**params, **shared_parameters})")
_CT_LEARNED_ZERO = ("DeepSpeed's topk masks the forward of step 0 already (its prologue checks the schedule before the "
                    "first forward); zjax's learned masks come from an optimizer update, so its first masked forward "
                    "is step 1")


def _map_compression_training(key: str, block: Any, out: _Translation) -> None:
    """DeepSpeed's ``compression_training`` -> ``compression``: one zjax group per ``different_groups``
    entry of each enabled technique, its ``params`` with the technique's ``shared_parameters``.

    The ``modules`` (and ``related_modules``) strings are kept as given: DeepSpeed searches them
    (``re.search``) in torch module names (``bert.encoder.layer.0.attention.self.query``), zjax in
    parameter paths joined by ``/`` (``layers/attn/wq``), so a DeepSpeed regex must name zjax's
    parameters to match them (its ``.`` matches ``/`` too). Switched-off techniques map to nothing.
    """
    _ct_names(key, block, _CT_TECHNIQUES)
    for technique in _CT_TECHNIQUES[:-1]:
        if technique in block:
            groups = _ct_technique(f"{key}.{technique}", technique, block[technique], out)
            if groups:
                out.set(f"compression.{technique}", groups, f"{key}.{technique}")
    if "layer_reduction" in block:
        _ct_layer_reduction(f"{key}.layer_reduction", block["layer_reduction"], out)


def _ct_names(block_key: str, block: Any, valid: Iterable[str]) -> None:
    if not isinstance(block, Mapping):
        raise ConfigError(f"{block_key}={block!r} must be a block of keys, e.g. {block_key}: {{...}}")
    valid = list(valid)
    for name in block:
        if name not in valid:
            raise ConfigError(f"unknown key {f'{block_key}.{name}'!r}; {suggest(name, valid, block_key)}")


def _ct_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one DeepSpeed accepts either (config.py asserts it); "
                          f"use one of {', '.join(choices)}")
    return value


def _ct_offset(skey: str, shared: Mapping[str, Any], default: int) -> int:
    offset = _int(f"{skey}.schedule_offset", shared.get("schedule_offset", default))
    if offset < 0:
        raise ConfigError(f"{skey}.schedule_offset={offset}: give the step to start at, >= 0")
    return offset


def _ct_technique(tkey: str, technique: str, block: Any, out: _Translation) -> list[dict]:
    """Check one technique's keys; its zjax groups when it is switched on."""
    _ct_names(tkey, block, ("shared_parameters", "different_groups"))
    skey = f"{tkey}.shared_parameters"
    shared = block.get("shared_parameters", {})
    _ct_names(skey, shared, _CT_SHARED[technique])
    if isinstance(shared.get("fp16_mixed_quantize"), Mapping):
        _ct_names(f"{skey}.fp16_mixed_quantize", shared["fp16_mixed_quantize"], ("enabled", "quantize_change_ratio"))
    gkey = f"{tkey}.different_groups"
    groups = block.get("different_groups")
    if groups is not None:
        if not isinstance(groups, Mapping):
            raise ConfigError(f"{gkey}={groups!r} must be a block of named groups, e.g. {gkey}: "
                              "{g1: {params: {...}, modules: [...]}}")
        for name, group in groups.items():
            _ct_names(f"{gkey}.{name}", group, _CT_GROUP_KEYS)
            if "params" in group:
                _ct_names(f"{gkey}.{name}.params", group["params"], (*_CT_PARAMS[technique], *_CT_SHARED[technique]))
    if not _bool(f"{skey}.enabled", shared.get("enabled", False)):
        return []
    common, params_of = _CT_SHARED_MAPPERS[technique](skey, shared, out)
    if groups is None:
        raise ConfigError(f"{skey}.enabled=True without {gkey}: DeepSpeed refuses it too ({technique} is enabled, "
                          f"different_groups must be specified); give the groups, e.g. {gkey}: "
                          "{g1: {params: {...}, modules: ['layers/mlp']}}")
    pairs_split = technique in ("row_pruning", "head_pruning", "channel_pruning")
    zjax_groups = []
    for name, group in groups.items():
        key = f"{gkey}.{name}"
        if "params" not in group:
            raise ConfigError(f"{key} has no params; DeepSpeed reads {key}.params too (config.py); "
                              f"give them, e.g. params: {{{_CT_PARAMS[technique][-1]}: ...}}")
        params = group["params"]
        for shared_name in _CT_SHARED[technique]:
            if shared_name in params:
                out.ignore(f"{key}.params.{shared_name}", params[shared_name], _CT_SHARED_WINS)
        fields = {**common, **params_of(f"{key}.params", params)}
        for modules, related in _ct_modules(key, group, pairs_split, out):
            zjax_groups.append({"modules": modules, **({"related_modules": related} if pairs_split else {}), **fields})
    return zjax_groups


def _ct_modules(key: str, group: Mapping[str, Any], pairs_split: bool,
                out: _Translation) -> list[tuple[list[str], list[str]]]:
    """``(modules, related_modules)`` of the zjax groups one DeepSpeed group becomes.

    DeepSpeed pairs ``modules[i]`` with the list ``related_modules[i]`` (compress.py zips them); a zjax
    group has one flat ``related_modules`` list, so a pruning group with related modules becomes one
    zjax group per pair."""
    modules = group.get("modules")
    if modules is None:
        # DeepSpeed's default "*" (constants.py) is documented as every Linear/Conv2d layer
        # (config-json.md); zjax's ['*'] is every matrix.
        modules = ["*"]
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"{key}.modules={modules!r} must be a non-empty list of regular expressions, "
                          "e.g. ['layers/mlp/w_up']")
    related = group.get("related_modules")
    if not related:  # None or empty: compress.py's `if method_parameters[related_modules]` is false
        return [(list(modules), [])]
    if (not isinstance(related, list) or
            not all(isinstance(r, list) and all(isinstance(s, str) for s in r) for r in related)):
        raise ConfigError(f"{key}.related_modules={related!r} must be a list of lists of regular expressions, "
                          "one list per entry of modules, e.g. [['layers/mlp/w_down']]")
    if len(related) != len(modules):
        raise ConfigError(
            f"{key}.related_modules has {len(related)} lists for {len(modules)} modules: DeepSpeed pairs them "
            "(compress.py zips modules with related_modules) and drops what is unpaired; give one list per module")
    if not pairs_split:
        out.ignore(f"{key}.related_modules", related,
                   "only row, head and channel pruning shrink related modules (compress.py redundancy_clean)")
        return [(list(modules), [])]
    return [([module], list(rel)) for module, rel in zip(modules, related)]


def _ct_fp16(out: _Translation) -> bool:
    return out.values.get("precision.compute_dtype", (None, ""))[0] == "float16"


def _ct_weight_quantization(skey: str, shared: Mapping[str, Any], out: _Translation):
    """Two modes. ``quantize_weight_in_forward: true``: LinearLayer_Compress.forward fake-quantizes
    at ``target_bits`` from ``schedule_offset`` on (straight-through, SymQuantizer/AsymQuantizer).
    ``false`` (DeepSpeed's default, MoQ, fp16 only): runtime/quantize.py's Quantizer overwrites the
    16-bit weights with their quantized values after each optimizer step, from ``start_bits`` down
    to ``target_bits`` -- the next forward sees them, the fp32 master weights get the gradient:
    zjax's fake quantization, one step later (zjax.compression.schedule)."""
    in_forward = _bool(f"{skey}.quantize_weight_in_forward", shared.get("quantize_weight_in_forward", False))
    symmetric = _ct_choice(f"{skey}.quantization_type", shared.get("quantization_type", "symmetric"),
                           ("symmetric", "asymmetric")) == "symmetric"
    rounding = _ct_choice(f"{skey}.rounding", shared.get("rounding", "nearest"), ("nearest", "stochastic"))
    kernel = _bool(f"{skey}.quantizer_kernel", shared.get("quantizer_kernel", False))
    mixed = shared.get("fp16_mixed_quantize", {})
    if not isinstance(mixed, Mapping):
        raise ConfigError(f"{skey}.fp16_mixed_quantize={mixed!r} must be a block, e.g. {{enabled: false}}")
    mixed_on = _bool(f"{skey}.fp16_mixed_quantize.enabled", mixed.get("enabled", False))
    offset = _ct_offset(skey, shared, 0)
    if in_forward:
        if kernel:
            out.ignore(f"{skey}.quantizer_kernel", kernel, _CT_MOQ_ONLY)
        if rounding == "stochastic":
            out.ignore(f"{skey}.rounding", rounding, f"{_CT_MOQ_ONLY}; the forward rounds to nearest")
        if mixed_on:
            out.ignore(f"{skey}.fp16_mixed_quantize", mixed, _CT_MOQ_ONLY)
    else:
        moq = f"{skey}.quantize_weight_in_forward=False (MoQ, DeepSpeed's default)"
        if not _ct_fp16(out):
            raise ConfigError(
                f"{moq} without fp16.enabled: DeepSpeed refuses it too (engine.py: MoQ weight quantization is "
                "only supported for FP16); enable fp16, or set quantize_weight_in_forward: true")
        if kernel:
            raise ConfigError(
                f"{skey}.quantizer_kernel=True: DeepSpeed's CUDA quantizer rounds stochastically (runtime/quantize.py "
                "passes sr=True unless rounding is 'nearest_neighbor', a value config.py rejects); zjax rounds to "
                "nearest; set quantizer_kernel: false")
        if rounding == "stochastic":
            raise ConfigError(f"{skey}.rounding='stochastic': zjax's fake quantization rounds to nearest; "
                              "set rounding: nearest")
        if mixed_on:
            raise ConfigError(
                f"{skey}.fp16_mixed_quantize.enabled=True: blending the float and quantized weights (by "
                "quantize_change_ratio per step) is not implemented in zjax; set enabled: false")
    groups = shared.get("quantize_groups", 1)
    groups_key = f"{skey}.quantize_groups" + ("" if "quantize_groups" in shared else " (DeepSpeed default 1)")
    out.ignore(groups_key, _int(f"{skey}.quantize_groups", groups),
               "zjax scales each output column of a matrix on its own (or each group_size block of it); "
               "DeepSpeed's quantize_groups splits the flattened matrix into that many blocks of whole output "
               "rows with one scale each (1: one scale per matrix)")
    if shared.get("quantize_verbose"):
        out.ignore(f"{skey}.quantize_verbose", shared["quantize_verbose"],
                   "zjax logs no per-step quantization messages")
    # MoQ quantizes after the optimizer step: a weight first quantized after step schedule_offset is
    # first seen by the forward of step schedule_offset + 1 (offset 0: engine._forward_prologue
    # quantizes before the first forward too).
    zjax_offset = offset if in_forward or offset == 0 else offset + 1

    def params_of(pkey: str, params: Mapping[str, Any]) -> dict:
        for name in ("start_bits", "target_bits"):
            if name not in params:
                raise ConfigError(f"{pkey}.{name} is missing; DeepSpeed refuses it too ({name} must be specified "
                                  "for weight quantization group); give it, e.g. 8")
        start = _int(f"{pkey}.start_bits", params["start_bits"])
        target = _int(f"{pkey}.target_bits", params["target_bits"])
        period = _int(f"{pkey}.quantization_period", params.get("quantization_period", 1))
        if target < 3:
            raise ConfigError(
                f"{pkey}.target_bits={target}: DeepSpeed quantizes 2 bits ternary and 1 bit binary "
                "(TernaryQuantizer, BinaryQuantizer: a threshold and one scale); zjax quantizes uniformly from 3 "
                "bits up; use target_bits >= 3")
        if in_forward:
            if start != target:
                for name in ("start_bits", "quantization_period"):
                    if name in params:
                        out.ignore(f"{pkey}.{name}", params[name],
                                   "quantize_weight_in_forward quantizes at target_bits from the first quantized "
                                   "step (basic_layer.py LinearLayer_Compress.forward)")
            return {"schedule_offset": zjax_offset, "start_bits": target, "target_bits": target,
                    "symmetric": symmetric}
        if start < target:
            raise ConfigError(f"{pkey}.start_bits={start} is below target_bits={target}: DeepSpeed refuses it too "
                              "(Quantization bit is lower than target precision bits!); use start_bits >= target_bits")
        fields = {"schedule_offset": zjax_offset, "start_bits": start, "target_bits": target, "symmetric": symmetric}
        if start != target:
            if period < 1:
                raise ConfigError(
                    f"{pkey}.quantization_period={period} with start_bits={start} > target_bits={target}: DeepSpeed "
                    "then drops a bit at every step (its period, shifted left, stays 0); zjax's MoQ period doubles "
                    "from a period >= 1 as DeepSpeed's does; give quantization_period >= 1")
            fields["quantization_period"] = period
        return fields

    return {}, params_of


def _ct_activation_quantization(skey: str, shared: Mapping[str, Any], out: _Translation):
    """LinearLayer_Compress.forward quantizes its input from ``schedule_offset`` on; with the dynamic
    range (DeepSpeed's default) each token has its own range -- zjax's activation quantization."""
    symmetric = _ct_choice(f"{skey}.quantization_type", shared.get("quantization_type", "symmetric"),
                           ("symmetric", "asymmetric")) == "symmetric"
    calibration = _ct_choice(f"{skey}.range_calibration", shared.get("range_calibration", "dynamic"),
                             ("dynamic", "static"))
    if calibration == "static":
        raise ConfigError(
            f"{skey}.range_calibration='static': one range for all tokens, a momentum average of the batches' "
            "min/max (basic_layer.py QuantAct), is not implemented in zjax; set range_calibration: dynamic "
            "(each token quantized with its own range)")
    offset = _ct_offset(skey, shared, 1000)

    def params_of(pkey: str, params: Mapping[str, Any]) -> dict:
        if "bits" not in params:
            raise ConfigError(f"{pkey}.bits is missing; DeepSpeed refuses it too (bits must be specified for "
                              "activation quantization group); give it, e.g. bits: 8")
        bits = _int(f"{pkey}.bits", params["bits"])
        if bits not in (4, 8):
            raise ConfigError(f"{pkey}.bits={bits}: DeepSpeed refuses it too (Only 4/8 bits activation "
                              "quantization are supported); use 4 or 8")
        return {"bits": bits}

    return {"schedule_offset": offset, "symmetric": symmetric}, params_of


def _ct_dense_ratio(pkey: str, params: Mapping[str, Any]) -> float:
    if "dense_ratio" not in params:
        raise ConfigError(f"{pkey}.dense_ratio is missing; DeepSpeed refuses it too (dense_ratio must be specified "
                          "for the pruning group); give the fraction to keep, e.g. dense_ratio: 0.5")
    ratio = _number(f"{pkey}.dense_ratio", params["dense_ratio"])
    if not 0 < ratio <= 1:
        raise ConfigError(f"{pkey}.dense_ratio={ratio}: give the fraction of weights to keep, in (0, 1]")
    return ratio


def _ct_ranked_pruning(skey: str, shared: Mapping[str, Any], out: _Translation, name: str) -> dict:
    """l1: basic_layer.py enable_{sparse,row}_pruning ranks |w| (a row's l1 norm) once, when
    init_compression wraps the model, and keeps the top ceil(dense_ratio * n) from schedule_offset on.
    topk: a trained score per weight (row), the top ceil(dense_ratio * n) in every forward from
    schedule_offset on (zjax.compression.learned)."""
    method = _ct_choice(f"{skey}.method", shared.get("method", "l1"),
                        ("l1", "topk", "snip_momentum") if name == "sparse_pruning" else ("l1", "topk"))
    if method == "snip_momentum":
        raise ConfigError(
            f"{skey}.method='snip_momentum': DeepSpeed hands it to Intel Neural Compressor (compress.py "
            "init_compression, whose `from nc import WeightPruningConfig` cannot import in DeepSpeed <= 0.19.6); "
            "zjax has no SNIP-momentum scoring; use method: l1 or topk with different_groups, or zjax's own "
            "compression.sparse_pruning (pattern, schedule_offset_end, schedule_offset_stride: magnitude ranking)")
    offset = _ct_offset(skey, shared, 1000)
    if method == "topk":
        if offset == 0:
            out.ignored.append((f"{skey}.schedule_offset", _CT_LEARNED_ZERO))
    elif offset > 0:
        # Not exact: listed so that it is seen (zjax.compression ranks at the group's schedule_offset).
        out.ignored.append((f"{skey}.method", (
            "DeepSpeed's l1 ranks the weights once, when init_compression wraps the model (before step 0), and "
            "applies that mask from schedule_offset; zjax ranks them at schedule_offset (the same weights only "
            "when schedule_offset is 0)")))
    return {"schedule_offset": offset, "method": method}


def _ct_sparse_pruning(skey: str, shared: Mapping[str, Any], out: _Translation):
    common = _ct_ranked_pruning(skey, shared, out, "sparse_pruning")
    for name in _CT_SNIP_ONLY:
        if name in shared:
            out.ignore(f"{skey}.{name}", shared[name],
                       "DeepSpeed reads it only with method snip_momentum (config.py get_sparse_pruning_shared_parameters)")
    return common, lambda pkey, params: {"dense_ratio": _ct_dense_ratio(pkey, params)}


def _ct_row_pruning(skey: str, shared: Mapping[str, Any], out: _Translation):
    common = _ct_ranked_pruning(skey, shared, out, "row_pruning")
    return common, lambda pkey, params: {"dense_ratio": _ct_dense_ratio(pkey, params)}


def _ct_head_pruning(skey: str, shared: Mapping[str, Any], out: _Translation):
    """basic_layer.py enable_head_pruning: topk only, a trained score per head of the attention output
    projection (its input rows in num_heads groups), related_modules the q/k/v projections."""
    method = _ct_choice(f"{skey}.method", shared.get("method", "topk"), ("l1", "topk"))
    if method == "l1":
        raise ConfigError(f"{skey}.method='l1': DeepSpeed refuses it too (basic_layer.py enable_head_pruning raises "
                          "NotImplementedError for anything but topk); use method: topk, or zjax's own "
                          "compression.head_pruning with method: l1 (each head's l1 norm)")
    if shared.get("num_heads") is None:
        raise ConfigError(f"{skey}.num_heads is missing; DeepSpeed refuses it too (num_heads must be specified for "
                          "head pruning); give the model's number of attention heads, e.g. num_heads: 12")
    heads = _int(f"{skey}.num_heads", shared["num_heads"])
    if heads < 1:
        raise ConfigError(f"{skey}.num_heads={heads}: give the model's number of attention heads, >= 1")
    offset = _ct_offset(skey, shared, 1000)
    if offset == 0:
        out.ignored.append((f"{skey}.schedule_offset", _CT_LEARNED_ZERO))
    return ({"schedule_offset": offset, "method": "topk", "num_heads": heads},
            lambda pkey, params: {"dense_ratio": _ct_dense_ratio(pkey, params)})


def _ct_channel_pruning(skey: str, shared: Mapping[str, Any], out: _Translation):
    raise ConfigError(
        f"{skey}.enabled=True: DeepSpeed prunes output channels of Conv2d layers only (basic_layer.py "
        "Conv2dLayer_Compress.enable_channel_pruning; its Linear layers have none) and zjax models have no "
        "convolutions; prune a matmul's output features with row_pruning (method: l1), or write zjax's own "
        "compression.channel_pruning (input features)")


_CT_SHARED_MAPPERS = {
    "weight_quantization": _ct_weight_quantization,
    "activation_quantization": _ct_activation_quantization,
    "sparse_pruning": _ct_sparse_pruning,
    "row_pruning": _ct_row_pruning,
    "head_pruning": _ct_head_pruning,
    "channel_pruning": _ct_channel_pruning,
}


def _ct_layer_reduction(key: str, block: Any, out: _Translation) -> None:
    """compress.py student_initialization: the student's layer i starts as the teacher's layer
    ``teacher_layer[i]`` (0-based), the ``other_module_name`` modules are copied. DeepSpeed takes the
    teacher from the script (init_compression's teacher_model), not from the config."""
    _ct_names(key, block, _CT_LAYER_REDUCTION)
    if not _bool(f"{key}.enabled", block.get("enabled", False)):
        return
    if "teacher_layer" not in block:
        raise ConfigError(f"{key}.teacher_layer is missing; DeepSpeed needs it too (compress.py student_initialization); "
                          "give the teacher layer each student layer starts from, e.g. teacher_layer: [1, 3, 5]")
    layers = block["teacher_layer"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"{key}.teacher_layer={layers!r} must be a list of layer numbers (from 0), e.g. [1, 3, 5]")
    out.set("compression.layer_reduction.enabled", True, f"{key}.enabled")
    out.set("compression.layer_reduction.teacher_layer", list(layers), f"{key}.teacher_layer")
    if "keep_number_layer" in block:
        out.set("compression.layer_reduction.keep_number_layer",
                _int(f"{key}.keep_number_layer", block["keep_number_layer"]), f"{key}.keep_number_layer")
    if "module_name_prefix" in block:
        out.ignore(f"{key}.module_name_prefix", block["module_name_prefix"],
                   "zjax initializes the student's layer stack itself; it needs no module path")
    if "other_module_name" in block:
        out.ignore(f"{key}.other_module_name", block["other_module_name"],
                   "zjax copies the teacher's embeddings, final norm and head whole (DeepSpeed copies the modules "
                   "listed here)")


def _ignore_top_level(key: str, value: Any, out: _Translation) -> None:
    if key in IGNORED:
        out.ignore(key, value)


_HANDLERS: dict[str, Callable[[str, Any, _Translation], None]] = {
    **dict.fromkeys(_BATCH, _map_batch),
    # The ZeRO stage goes first: fp16's loss-scaler defaults depend on it.
    "zero_optimization": _map_zero,
    "fp16": _map_fp16,
    "bf16": _map_bf16,
    "bfloat16": _map_bfloat16,
    # The optimizer goes before the scheduler, whose peak lr replaces the optimizer's.
    "optimizer": _map_optimizer,
    "scheduler": _map_scheduler,
    "gradient_clipping": _map_gradient_clipping,
    "data_types": _map_data_types,
    "activation_checkpointing": _map_activation_checkpointing,
    "communication_data_type": _map_communication_dtype,
    "steps_per_print": _map_steps_per_print,
    "tensor_parallel": _map_tensor_parallel,
    "sequence_parallel_size": _map_sequence_parallel_size,
    "pipeline": _map_pipeline,
    "sparse_attention": _map_sparse_attention,
    # after fp16: MoQ weight quantization needs it
    "compression_training": _map_compression_training,
}
# Keys that are zjax keys too: mapped in a DeepSpeed layer, but alone they do not make one.
_SHARED = ("gradient_clipping",)
_TOP_LEVEL_IGNORED = tuple(key for key in IGNORED if "." not in key)
_TOP_LEVEL_UNSUPPORTED = tuple(key for key in UNSUPPORTED if "." not in key)
_HANDLER_ORDER = (*_HANDLERS, *_TOP_LEVEL_IGNORED, *_TOP_LEVEL_UNSUPPORTED)
TOP_LEVEL_KEYS: tuple[str, ...] = tuple(key for key in _HANDLER_ORDER if key not in _SHARED)


def _is_deepspeed(key: str, value: Any) -> bool:
    if key == "optimizer":
        # zjax's own optimizer block is flat with a lower-case zjax type; DeepSpeed's nests params
        # under its type name (Adam, AdamW, OneBitAdam, ...).
        return isinstance(value, Mapping) and ("params" in value or value.get("type", "adamw") not in _ZJAX_OPTIMIZERS)
    if key == "pipeline":
        # zjax's own pipeline block has schedule / microbatches / repeats; DeepSpeed's has stages & co.
        return isinstance(value, Mapping) and any(name in value for name in _PIPELINE_KEYS)
    return key in TOP_LEVEL_KEYS


def _refuse_switched_on(raw: Mapping[str, Any]) -> None:
    """One error naming every feature zjax lacks that this layer switches on."""
    found = []
    for key, (feature, is_off) in UNSUPPORTED.items():
        value = _get(raw, key)
        if value is not _ABSENT and not is_off(value):
            found.append(f"{key}: {feature}" if isinstance(value, Mapping) else f"{key}={value!r}: {feature}")
    if found:
        raise ConfigError(
            "this config switches on DeepSpeed features zjax does not implement; remove them or switch them "
            "off (enabled: false) to train without them:\n  " + "\n  ".join(found)
        )


def _reject_autos(raw: Mapping[str, Any]) -> None:
    """One error for every ``"auto"`` value: the HF Trainer's placeholder, which it fills in before DeepSpeed."""
    autos = list(_autos(raw, ""))
    if not autos:
        return
    lines = []
    for key in autos:
        if key in IGNORED:
            lines.append(f"{key}: zjax ignores it ({IGNORED[key]}); delete the key")
        else:
            lines.append(f"{key}: {_AUTO_HINTS.get(key, 'give a concrete value')}")
    raise ConfigError(
        f"{len(autos)} value{'s are' if len(autos) > 1 else ' is'} 'auto', the HF Trainer's placeholder that it "
        "fills in itself; zjax needs the numbers:\n  " + "\n  ".join(lines)
    )


def _autos(tree: Mapping[str, Any], prefix: str) -> Iterable[str]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _autos(value, f"{prefix}{name}.")
        elif value == "auto" or (isinstance(value, (list, tuple)) and "auto" in value):
            yield f"{prefix}{name}"


def _check_keys(block_key: str, block: Any, mapped: Iterable[str], context: str = "") -> None:
    """A DeepSpeed block must be a mapping of keys zjax maps, knowingly ignores or refuses when on."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{block_key}={block!r} must be a block of keys, e.g. {block_key}: {{...}}")
    known = [*mapped, *(key.rsplit(".", 1)[1] for key in (*IGNORED, *UNSUPPORTED)
                        if key.rsplit(".", 1)[0] == block_key)]
    for name in block:
        if name not in known:
            raise ConfigError(f"unknown key {f'{block_key}.{name}'!r}{context}; {suggest(name, known, block_key)}")


def suggest(name: str, valid: Iterable[str], parent: str = "") -> str:
    """``did you mean 'x'? valid keys: ...`` with a suggestion only when it is really near."""
    valid = list(valid)
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.75)
    where = f" at {parent}" if parent else ""
    hint = f"did you mean {'.'.join(filter(None, [parent, match[0]]))!r}? " if match else ""
    return f"{hint}valid keys{where}: {', '.join(valid)}"


def _ignore_rest(block_key: str, block: Mapping[str, Any], mapped: Iterable[str], out: _Translation) -> None:
    for name in block:
        key = f"{block_key}.{name}"
        if name not in mapped and key not in UNSUPPORTED:
            out.ignore(key, block[name])


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer, e.g. {key}: 4")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} must be a finite number, e.g. {key}: 1.0")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def _scalar(key: str, value: Any) -> Any:
    """Numbers and strings pass through for the schema to check; blocks and lists are errors."""
    if isinstance(value, (Mapping, list, tuple)):
        raise ConfigError(f"{key}={value!r} must be a single value, not a block or list")
    return value


def _dtype(key: str, value: Any) -> str:
    name = value.lower() if isinstance(value, str) else value
    if name not in _DTYPES:
        raise ConfigError(
            f"{key}={value!r} is not a DeepSpeed dtype name, and DeepSpeed refuses it too; "
            f"use one of {', '.join(_DTYPES)}"
        )
    return _DTYPES[name]


_ABSENT = object()


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for name in dotted.split("."):
        if not isinstance(node, Mapping) or name not in node:
            return _ABSENT
        node = node[name]
    return node


def _put(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{name}={tree!r} must be a block of keys to hold {dotted}")
    tree[leaf] = value
