"""DeepSpeed's words in a config mean what they mean in DeepSpeed (defaults read from its source)."""
import logging

import pytest

from zjax.config.schema import load_config
from zjax.errors import ConfigError

BATCH = {"train_batch_size": 32}


def _triple(batch):
    return batch.global_batch_size, batch.micro_batch_size_per_device, batch.grad_accum_steps


# -- what makes a DeepSpeed config, and its defaults ---------------------------------------


def test_a_deepspeed_config_without_batch_sizes_is_refused_as_deepspeed_refuses_it():
    # runtime/config.py _set_batch_related_parameters: "Either train_batch_size or
    # train_micro_batch_size_per_gpu needs to be provided" (gradient_accumulation_steps alone is not enough).
    for raw in ({"zero_optimization": {"stage": 2}}, {"gradient_accumulation_steps": 4, "bf16": {"enabled": True}}):
        with pytest.raises(ConfigError, match="Either train_batch_size or train_micro_batch_size_per_gpu"):
            load_config(raw)
    # An override may give the size the file leaves out.
    assert load_config({"bf16": {"enabled": True}}, ["batch.global_batch_size=64"]).batch.resolve(8) == (64, 8, 1)


def test_a_zjax_config_borrowing_deepspeed_words_keeps_zjax_defaults():
    cfg = load_config({"zero_optimization": {"stage": 2}, "steps": 12})
    assert (cfg.zero.stage, cfg.steps, _triple(cfg.batch), cfg.gradient_clipping) == (2, 12, (32, None, 1), 1.0)
    assert load_config({}).batch.global_batch_size == 32


def test_deepspeed_default_gradient_clipping_is_off():
    # deepspeed/runtime/constants.py: GRADIENT_CLIPPING_DEFAULT = 0. (the 1.0 is zjax's own default).
    assert load_config(BATCH).gradient_clipping == 0.0
    assert load_config({**BATCH, "gradient_clipping": 1.0}).gradient_clipping == 1.0


def test_deepspeed_batch_triple_leaves_unset_sizes_to_derive():
    two = load_config({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4})
    assert _triple(two.batch) == (None, 2, 4)
    assert two.batch.resolve(8) == (64, 2, 4)
    one = load_config({"train_batch_size": 64})
    assert _triple(one.batch) == (64, None, None)
    assert one.batch.resolve(8) == (64, 8, 1)
    three = load_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    assert three.batch.resolve(8) == (64, 4, 2)


# -- ZeRO ---------------------------------------------------------------------------------


def test_deepspeed_zero_stage_maps_and_tuning_keys_are_ignored_with_reasons():
    cfg = load_config({**BATCH, "zero_optimization": {
        "stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 1e6,
        "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
    }})
    assert cfg.zero.stage == 3
    reasons = dict(cfg.ignored)
    assert "XLA schedules and fuses collectives" in reasons["zero_optimization.overlap_comm"]
    assert "zero_optimization.reduce_bucket_size" in reasons
    assert "zero_optimization.stage3_prefetch_bucket_size" in reasons
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_param) == ("cpu", "cpu")
    assert "zero_optimization.offload_optimizer" not in reasons


def test_legacy_cpu_offload_keys_map_as_deepspeed_maps_them():
    # zero/config.py: cpu_offload -> offload_optimizer {device: cpu}, cpu_offload_param -> offload_param.
    cfg = load_config({**BATCH, "zero_optimization": {
        "stage": 3, "cpu_offload": True, "cpu_offload_param": True, "cpu_offload_use_pin_memory": True}})
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_param) == ("cpu", "cpu")
    assert "zero_optimization.cpu_offload_use_pin_memory" in dict(cfg.ignored)
    off = load_config({**BATCH, "zero_optimization": {"stage": 2, "cpu_offload": False}})
    assert off.zero.offload_optimizer == "none" and off.ignored == ()
    with pytest.raises(ConfigError, match="cpu_offload and zero_optimization.offload_optimizer are both given; "
                                          "DeepSpeed refuses this too"):
        load_config({**BATCH, "zero_optimization": {"cpu_offload": False, "offload_optimizer": {"device": "cpu"}}})


@pytest.mark.parametrize("zero", [
    {"stage": 2, "offload_param": {"device": "cpu"}},
    {"stage": 1, "cpu_offload_param": True},
])
def test_parameter_offload_below_stage_3_is_ignored_as_in_deepspeed(zero):
    cfg = load_config({**BATCH, "zero_optimization": zero})
    assert cfg.zero.offload_param == "none"
    assert any("only at stage 3" in reason for _, reason in cfg.ignored)


def test_zero_plus_plus_and_mics_map_on_and_off():
    off = {"zero_quantized_weights": False, "zero_quantized_gradients": False, "zero_hpz_partition_size": 1,
           "mics_shard_size": -1, "mics_hierarchical_params_gather": False}
    assert load_config({**BATCH, "zero_optimization": {"stage": 3, **off}}).ignored == ()
    # MiCS's hierarchical gather maps, and needs the node size DeepSpeed reads from its launcher
    with pytest.raises(ConfigError) as err:
        load_config({**BATCH, "zero_optimization": {"stage": 3, "mics_hierarchical_params_gather": True,
                                                    "mics_shard_size": 8}})
    assert "hierarchical_gathers" in str(err.value) and "zero.node_size" in str(err.value)
    assert load_config({**BATCH, "zero_optimization": {"stage": 3, "mics_hierarchical_params_gather": True,
                                                       "mics_shard_size": 8}}, ["zero.node_size=4"]).zero.hierarchical_gathers
    # MiCS: ZeRO inside groups of mics_shard_size devices, replicas across them
    mics = load_config({**BATCH, "zero_optimization": {"stage": 3, "mics_shard_size": 4}})
    assert (mics.mesh.data, mics.mesh.replica) == (4, -1)
    assert load_config({**BATCH, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}}).zero.hpz_partition_size == 4
    # qwZ is built: DeepSpeed's key maps onto zero.quantized_weights
    assert load_config({**BATCH, "zero_optimization": {"stage": 3, "zero_quantized_weights": True}}).zero.quantized_weights
    assert load_config({**BATCH, "zero_optimization": {"stage": 2, "zero_quantized_gradients": True}}).zero.quantized_gradients


def test_deepspeed_stage_must_be_an_integer_not_a_boolean():
    with pytest.raises(ConfigError, match="zero_optimization.stage=True must be an integer"):
        load_config({**BATCH, "zero_optimization": {"stage": True}})


# -- precision and loss scaling ----------------------------------------------------------


def test_deepspeed_fp16_dynamic_scaling():
    cfg = load_config({**BATCH, "fp16": {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
        "hysteresis": 3, "min_loss_scale": 2, "consecutive_hysteresis": True, "auto_cast": True,
    }})
    assert cfg.precision.compute_dtype == "float16"
    ls = cfg.loss_scale
    assert (ls.enabled, ls.dynamic, ls.initial_scale_power, ls.loss_scale_window, ls.hysteresis, ls.min_loss_scale) == (
        True, True, 12, 500, 3, 2.0)
    assert {"fp16.consecutive_hysteresis", "fp16.auto_cast"} <= set(dict(cfg.ignored))


def test_fp16_without_scaling_keys_takes_the_loss_scaler_class_defaults():
    # ZeRO's CreateLossScaler(dynamic_loss_args=None) -> DynamicLossScaler(init_scale=2**32, delayed_shift=1)
    # (fp16/loss_scaler.py); stage 0's FP16_Optimizer starts at 2**16 and halves on every overflow.
    zero2 = load_config({**BATCH, "zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}).loss_scale
    assert (zero2.initial_scale_power, zero2.hysteresis, zero2.loss_scale_window, zero2.min_loss_scale) == (
        32, 1, 1000, 1)
    zero0 = load_config({**BATCH, "fp16": {"enabled": True}}).loss_scale
    assert (zero0.initial_scale_power, zero0.hysteresis) == (16, 1)
    # Any scaling key selects FP16_*_DEFAULT for the rest (runtime/constants.py: 16, 1000, 2, 1).
    some = load_config({**BATCH, "zero_optimization": {"stage": 2},
                        "fp16": {"enabled": True, "loss_scale_window": 100}})
    assert (some.loss_scale.initial_scale_power, some.loss_scale.hysteresis, some.loss_scale.loss_scale_window) == (
        16, 2, 100)


def test_deepspeed_fp16_positive_loss_scale_is_static():
    ls = load_config({**BATCH, "fp16": {"enabled": True, "loss_scale": 128}}).loss_scale
    assert (ls.enabled, ls.dynamic, ls.static_scale) == (True, False, 128.0)


def test_deepspeed_bf16_its_older_spelling_and_both_half_precisions():
    assert load_config({**BATCH, "bf16": {"enabled": True}}).precision.compute_dtype == "bfloat16"
    assert load_config({**BATCH, "bfloat16": {"enabled": True}}).precision.compute_dtype == "bfloat16"
    assert load_config({**BATCH, "bf16": {"enabled": False}}).precision.compute_dtype == "float32"
    # runtime/config.py get_bfloat16_enabled reads bf16 first and bfloat16 only without it.
    both = load_config({**BATCH, "bf16": {"enabled": False}, "bfloat16": {"enabled": True}})
    assert both.precision.compute_dtype == "float32" and "bfloat16" in dict(both.ignored)
    with pytest.raises(ConfigError, match="fp16.enabled") as err:
        load_config({**BATCH, "fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "bf16.enabled" in str(err.value)


def test_deepspeed_key_that_contradicts_a_zjax_key_is_an_error():
    with pytest.raises(ConfigError, match="bf16.enabled sets precision.compute_dtype='bfloat16'.*'float32'"):
        load_config({"bf16": {"enabled": True}, "precision": {"compute_dtype": "float32"}})


# -- optimizers -------------------------------------------------------------------------


def test_deepspeed_adam_with_weight_decay_is_adamw_on_every_parameter():
    # engine.py _configure_basic_optimizer: Adam with adam_w_mode (ADAM_W_MODE_DEFAULT = True) is
    # FusedAdam(adam_w_mode=True), decoupled decay on every parameter handed to deepspeed.initialize.
    cfg = load_config({**BATCH, "optimizer": {"type": "Adam", "params": {
        "lr": 1e-3, "betas": [0.8, 0.98], "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True}}})
    o = cfg.optimizer
    assert (o.type, o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.decay_norms_and_biases) == (
        "adamw", 1e-3, 0.8, 0.98, 1e-6, 0.01, True)
    assert "optimizer.params.torch_adam" in dict(cfg.ignored)
    assert load_config({**BATCH, "optimizer": {"type": "adam", "params": {"lr": 1e-3}}}).optimizer.type == "adam"
    with pytest.raises(ConfigError, match="adam_w_mode"):
        load_config({**BATCH, "optimizer": {"type": "Adam", "params": {"weight_decay": 0.01, "adam_w_mode": False}}})


def test_adamw_without_params_and_with_adam_w_mode():
    # FusedAdam's own defaults (ops/adam/fused_adam.py): lr=1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.
    cfg = load_config({**BATCH, "optimizer": {"type": "AdamW"}})
    o = cfg.optimizer
    assert (o.type, o.lr, o.b1, o.b2, o.eps, o.weight_decay) == ("adam", 1e-3, 0.9, 0.999, 1e-8, 0.0)
    assert load_config({**BATCH, "optimizer": {"type": "AdamW", "params": {
        "weight_decay": 0.1, "adam_w_mode": True}}}).optimizer.type == "adamw"
    # AdamW ignores adam_w_mode: effective_adam_w_mode = name == "adamw" or adam_w_mode.
    off = load_config({**BATCH, "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1, "adam_w_mode": False}}})
    assert off.optimizer.type == "adamw" and "optimizer.params.adam_w_mode" in dict(off.ignored)
    # torch_adam selects torch.optim.AdamW, whose weight_decay defaults to 1e-2.
    torch_adamw = load_config({**BATCH, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}).optimizer
    assert (torch_adamw.type, torch_adamw.weight_decay) == ("adamw", 0.01)


def test_deepspeed_sgd_lion_and_adafactor():
    params = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    sgd = load_config({**BATCH, "optimizer": {"type": "SGD", "params": params}}).optimizer
    assert (sgd.type, sgd.lr, sgd.momentum, sgd.nesterov, sgd.weight_decay) == ("sgd", 0.1, 0.9, True, 1e-4)
    lion = load_config({**BATCH, "optimizer": {"type": "Lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99]}}})
    assert (lion.optimizer.type, lion.optimizer.b2) == ("lion", 0.99)
    assert load_config({**BATCH, "optimizer": {"type": "Adafactor", "params": {}}}).optimizer.lr == 1e-2


def test_deepspeed_onebit_optimizers_map_with_their_count_and_formula():
    adam = load_config({**BATCH, "optimizer": {"type": "OneBitAdam", "params": {
        "lr": 4e-4, "freeze_step": 23000, "bias_correction": False, "cuda_aware": False}}}).optimizer
    # DeepSpeed's freeze_step F runs F - 1 exact updates; its OnebitAdam has no bias correction
    assert (adam.type, adam.lr, adam.freeze_step, adam.bias_correction) == ("onebit_adam", 4e-4, 22999, False)
    zo = load_config({**BATCH, "optimizer": {"type": "ZeroOneAdam", "params": {
        "var_freeze_step": 500, "local_step_scaler": 1000}}}).optimizer
    assert (zo.type, zo.lr, zo.var_freeze_step, zo.local_step_scaler, zo.local_step_clipper) == (
        "zero_one_adam", 1e-3, 500, 1000, 16)
    lamb = load_config({**BATCH, "optimizer": {"type": "OneBitLamb", "params": {"freeze_step": 10, "max_coeff": 0.3,
                                                                                "factor_threshold": 0.2}}}).optimizer
    assert (lamb.type, lamb.freeze_step, lamb.max_coeff, lamb.factor_threshold) == ("onebit_lamb", 9, 0.3, 0.2)
    with pytest.raises(ConfigError, match="eps_inside_sqrt"):
        load_config({**BATCH, "optimizer": {"type": "OneBitAdam", "params": {"eps_inside_sqrt": True}}})
    with pytest.raises(ConfigError, match="bias_correction=false is onebit_adam's option"):
        load_config({"optimizer": {"type": "adamw", "bias_correction": False}})


@pytest.mark.parametrize("name, feature", [("Lamb", "LAMB")])
def test_deepspeed_optimizers_zjax_lacks_are_named(name, feature):
    with pytest.raises(ConfigError, match=f"optimizer.type='{name}': {feature} is not implemented in zjax"):
        load_config({**BATCH, "optimizer": {"type": name, "params": {"lr": 1e-3}}})


def test_deepspeed_unknown_optimizer_type_or_param():
    with pytest.raises(ConfigError, match="optimizer.type='RMSprop' is not supported.*Adam, AdamW, SGD, Lion"):
        load_config({**BATCH, "optimizer": {"type": "RMSprop", "params": {}}})
    with pytest.raises(ConfigError, match="unknown key 'optimizer.params.momentum' for Adam"):
        load_config({**BATCH, "optimizer": {"type": "Adam", "params": {"momentum": 0.9}}})
    with pytest.raises(ConfigError, match="amsgrad"):
        load_config({**BATCH, "optimizer": {"type": "AdamW", "params": {"amsgrad": True}}})
    with pytest.raises(ConfigError, match="max_grad_norm=1.0: DeepSpeed refuses it too.*gradient_clipping"):
        load_config({**BATCH, "optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}})


# -- schedules ----------------------------------------------------------------------------


def test_deepspeed_warmup_lr_peak_replaces_the_optimizer_lr():
    cfg = load_config({**BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupLR", "params": {
            "warmup_min_lr": 1e-5, "warmup_max_lr": 2e-3, "warmup_num_steps": 50}},
    })
    s = cfg.schedule
    assert (s.type, s.warmup_min_lr, s.warmup_steps, s.warmup_type) == ("warmup", 1e-5, 50, "log")
    assert cfg.optimizer.lr == 2e-3
    assert "warmup_max_lr" in dict(cfg.ignored)["optimizer.params.lr"]


def test_warmup_lr_without_a_peak_runs_to_deepspeeds_default_peak():
    # lr_schedules.py WarmupLR(warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000, warmup_type='log'):
    # the optimizer's lr does not set the peak (the issue said it did; the source says 0.001).
    cfg = load_config({**BATCH, "optimizer": {"type": "AdamW", "params": {"lr": 5e-5}},
                       "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}})
    assert (cfg.optimizer.lr, cfg.schedule.warmup_steps, cfg.schedule.warmup_min_lr) == (0.001, 10, 0.0)
    assert "WarmupLR's default" in dict(cfg.ignored)["optimizer.params.lr"]
    # A zjax optimizer.lr of the same layer is zjax's word for the peak and wins over the class default.
    mixed = load_config({"optimizer": {"lr": 5e-5}, "scheduler": {"type": "WarmupLR", "params": {}}})
    assert (mixed.optimizer.lr, mixed.schedule.warmup_steps, mixed.schedule.warmup_type) == (5e-5, 1000, "log")


def test_deepspeed_warmup_decay_lr():
    cfg = load_config({**BATCH, "scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 500, "warmup_num_steps": 20, "warmup_max_lr": 1e-3, "warmup_type": "linear"}}})
    s = cfg.schedule
    assert (s.type, s.total_steps, s.warmup_steps, s.warmup_type) == ("warmup_decay", 500, 20, "linear")
    assert cfg.optimizer.lr == 1e-3
    assert load_config({**BATCH, "scheduler": {"type": "WarmupDecayLR", "params": {}}}).optimizer.lr == 0.001


def test_deepspeed_warmup_cosine_lr_fills_deepspeed_defaults():
    # WarmupCosineLR scales the optimizer's own lr: warmup_num_steps=1000, cos_min_ratio=0.0001, log warmup.
    cfg = load_config({**BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-4}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 300, "warmup_min_ratio": 0.1}},
    })
    s = cfg.schedule
    assert (s.type, s.total_steps, s.warmup_min_ratio, s.warmup_steps, s.cos_min_ratio, s.warmup_type) == (
        "warmup_cosine", 300, 0.1, 1000, 0.0001, "log")
    assert cfg.optimizer.lr == 5e-4


def test_deepspeed_one_cycle():
    cfg = load_config({**BATCH, "scheduler": {"type": "OneCycle", "params": {
        "cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 10, "cycle_second_step_size": 30,
        "decay_lr_rate": 0.5, "decay_step_size": 5, "cycle_momentum": False, "cycle_min_mom": 0.8,
        "cycle_first_stair_count": 0}}})
    s = cfg.schedule
    assert (s.type, s.cycle_min_lr, s.cycle_max_lr, s.cycle_first_step_size, s.cycle_second_step_size) == (
        "onecycle", 1e-4, 1e-3, 10, 30)
    assert (s.decay_lr_rate, s.decay_step_size) == (0.5, 5)
    assert "scheduler.params.cycle_min_mom" in dict(cfg.ignored)
    with pytest.raises(ConfigError, match="cycle_first_stair_count=4"):
        load_config({**BATCH, "scheduler": {"type": "OneCycle", "params": {
            "cycle_momentum": False, "cycle_first_stair_count": 4}}})


def test_one_cycle_momentum_is_refused_unless_switched_off():
    # lr_schedules.py OneCycle(cycle_momentum=True): it cycles beta1 (and sets beta2 to 0.99) for Adam.
    with pytest.raises(ConfigError, match="cycle_momentum=True \\(OneCycle's default\\).*cycle_momentum: false"):
        load_config({**BATCH, "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1e-3}}})
    # SGD has no betas: DeepSpeed switches momentum cycling off itself.
    sgd = load_config({**BATCH, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                       "scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": 1e-3}}})
    assert sgd.schedule.type == "onecycle"


def test_deepspeed_unknown_scheduler_type():
    with pytest.raises(ConfigError, match="scheduler.type='LRRangeTest'.*WarmupLR"):
        load_config({**BATCH, "scheduler": {"type": "LRRangeTest", "params": {}}})


# -- the rest -----------------------------------------------------------------------------


def test_deepspeed_clipping_dtypes_and_print_interval():
    cfg = load_config({**BATCH,
        "gradient_clipping": 0.5, "steps_per_print": 7, "communication_data_type": "BF16",
        "data_types": {"grad_accum_dtype": "fp16"},
    })
    assert (cfg.gradient_clipping, cfg.log_every) == (0.5, 7)
    assert (cfg.precision.reduce_dtype, cfg.precision.accum_dtype) == ("bfloat16", "float16")
    # Megatron-DeepSpeed's "bfp16" fails in DeepSpeed too (runtime/config.py get_communication_data_type).
    with pytest.raises(ConfigError, match="communication_data_type='bfp16'.*DeepSpeed refuses it too.*fp32"):
        load_config({**BATCH, "communication_data_type": "bfp16"})


def test_autotp_and_tp_size_map_onto_the_tensor_axis():
    cfg = load_config({**BATCH, "tensor_parallel": {"autotp_size": 1, "tp": {"tp_size": 1, "tp_grain_size": 64}}})
    assert cfg.mesh.tensor == 1
    assert load_config({**BATCH, "tensor_parallel": {"autotp_size": 0}}).mesh.tensor == 1
    for block in ({"autotp_size": 4}, {"tp": {"tp_size": 4}}, {"autotp_size": 4, "tp": {"tp_size": 4}}):
        cfg = load_config({**BATCH, "tensor_parallel": block})
        assert cfg.mesh.tensor == 4
        assert any(key.startswith("tensor_parallel") and "mesh.tensor = 4" in to for key, to in cfg.deepspeed_mapping)
    with pytest.raises(ConfigError, match="tensor_parallel.autotp_size=2 and tensor_parallel.tp.tp_size=4 disagree"):
        load_config({**BATCH, "tensor_parallel": {"autotp_size": 2, "tp": {"tp_size": 4}}})
    with pytest.raises(ConfigError, match=r"tensor_parallel.tp.tp_size=0: use a tensor-parallel size >= 1"):
        load_config({**BATCH, "tensor_parallel": {"tp": {"tp_size": 0}}})


def test_switched_off_features_are_accepted_silently():
    cfg = load_config({**BATCH,
        "curriculum_learning": {"enabled": False, "curriculum_type": "seqlen"},
        "hybrid_engine": {"enabled": False, "max_out_tokens": 512},
        "data_efficiency": {"enabled": False, "data_sampling": {"enabled": True}},
        "compression_training": {"weight_quantization": {"shared_parameters": {"enabled": False}},
                                 "layer_reduction": {"enabled": False}},
        "flops_profiler": {"enabled": False, "profile_step": 1}, "tensorboard": {"enabled": False},
        "wall_clock_breakdown": False, "prescale_gradients": False, "amp": {"enabled": False},
    })
    assert cfg.ignored == ()


def test_switched_on_features_are_refused_in_one_error_naming_each():
    # compression_training is mapped now (tests/config/test_deepspeed_compression.py)
    with pytest.raises(ConfigError) as err:
        load_config({**BATCH,
            "curriculum_learning": {"enabled": True}, "hybrid_engine": {"enabled": True},
            "progressive_layer_drop": {"enabled": True}})
    for feature in ("curriculum learning", "the hybrid engine", "progressive layer drop"):
        assert feature in str(err.value)


def test_sparse_attention_maps_to_the_models_block_and_bad_keys_are_named():
    block = {"mode": "fixed", "block": 16, "different_layout_per_head": True, "num_local_blocks": 4,
             "num_global_blocks": 1, "attention": "bidirectional", "horizontal_global_attention": False,
             "num_different_global_patterns": 4}
    cfg = load_config({**BATCH, "sparse_attention": block})
    assert cfg.model.sparse_attention == block
    with pytest.raises(ConfigError, match="num_local_block"):
        load_config({**BATCH, "sparse_attention": {"mode": "fixed", "num_local_block": 4}})
    with pytest.raises(ConfigError, match="model.sparse_attention.block=48 does not divide model.max_seq_len"):
        load_config({**BATCH, "sparse_attention": {"mode": "fixed", "block": 48}})


def test_monitors_and_profilers_point_to_zjaxs_own():
    cfg = load_config({**BATCH, "flops_profiler": {"enabled": True}, "tensorboard": {"enabled": True},
                       "comms_logger": {"enabled": True}, "wall_clock_breakdown": True})
    reasons = dict(cfg.ignored)
    assert "zjax profile" in reasons["flops_profiler"] and "zjax profile" in reasons["comms_logger"]
    assert "metrics.jsonl" in reasons["tensorboard"] and "--trace" in reasons["wall_clock_breakdown"]


def test_meaningless_keys_are_recorded_and_logged_once_each_reason_once(caplog):
    ds = {
        **BATCH, "wall_clock_breakdown": True, "prescale_gradients": True,
        "activation_checkpointing": {"partition_activations": True},
        "zero_optimization": {"stage": 1, "overlap_comm": True, "reduce_scatter": True, "allgather_bucket_size": 5e8},
    }
    with caplog.at_level(logging.WARNING, logger="zjax"):
        cfg = load_config(ds)
    reasons = dict(cfg.ignored)
    assert set(reasons) == {"wall_clock_breakdown", "prescale_gradients",
                            "activation_checkpointing.partition_activations",
                            "zero_optimization.overlap_comm", "zero_optimization.reduce_scatter",
                            "zero_optimization.allgather_bucket_size"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "zjax"]
    assert len(warnings) == 1
    assert all(key in warnings[0] for key in reasons)
    assert warnings[0].count("XLA schedules and fuses collectives") == 1


def test_no_warning_when_the_config_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="zjax"), pytest.raises(ConfigError):
        load_config({**BATCH, "zero_optimization": {"overlap_comm": True}, "steps": -1})
    assert [r for r in caplog.records if r.name == "zjax"] == []


def test_all_autos_are_reported_in_one_error_with_the_number_to_give():
    raw = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
           "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    message = str(err.value)
    assert message.startswith("7 values are 'auto'")
    for line in ("train_batch_size: give the global batch size as an integer, e.g. 32",
                 "train_micro_batch_size_per_gpu: give the per-device micro-batch size as an integer, e.g. 4",
                 "gradient_clipping: give the max global gradient norm as a number, e.g. 1.0",
                 "optimizer.params.lr: give the learning rate as a number, e.g. 3e-4",
                 "optimizer.params.betas: give [b1, b2], e.g. [0.9, 0.999]",
                 "scheduler.params.warmup_num_steps: give the warmup length in optimizer steps, e.g. 100",
                 "zero_optimization.reduce_bucket_size: zjax ignores it"):
        assert line in message
    # gradient_clipping is a zjax key too: "auto" gets the same hint in a zjax config.
    with pytest.raises(ConfigError, match="gradient_clipping: give the max global gradient norm"):
        load_config({"gradient_clipping": "auto"})


def test_deepspeed_numbers_must_be_finite():
    with pytest.raises(ConfigError, match="optimizer.params.lr=inf must be a finite number"):
        load_config({**BATCH, "optimizer": {"type": "AdamW", "params": {"lr": float("inf")}}})
    with pytest.raises(ConfigError, match="gradient_clipping=nan must be a finite number"):
        load_config({**BATCH, "gradient_clipping": float("nan")})


def test_sequence_parallel_size_maps_to_the_sequence_axis():
    assert load_config({**BATCH, "sequence_parallel_size": 1}).mesh.sequence == 1
    assert load_config({**BATCH, "sequence_parallel_size": 4}).mesh.sequence == 4
    with pytest.raises(ConfigError, match="sequence_parallel_size=0: use a sequence-parallel size >= 1"):
        load_config({**BATCH, "sequence_parallel_size": 0})
