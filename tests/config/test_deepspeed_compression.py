"""DeepSpeed's ``compression_training`` maps onto ``compression`` with DeepSpeed's meaning, and
``zjax.compression.schedule`` runs DeepSpeed's schedules (sources: DeepSpeed v0.19.5/0.19.6
``deepspeed/compression/*.py``, ``runtime/quantize.py``, ``runtime/engine.py``)."""
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from zjax.config.schema import CompressionConfig, load_config
from zjax.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent / "deepspeed_configs" / "compression"
BATCH = {"train_batch_size": 8}
CT = "compression_training"
WQ_SHARED = f"{CT}.weight_quantization.shared_parameters"


def _load_schedule():
    # zjax/compression/ may not be a package yet; load the module by path either way.
    path = Path(__file__).resolve().parents[2] / "zjax" / "compression" / "schedule.py"
    spec = importlib.util.spec_from_file_location("zjax_compression_schedule", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _load_schedule()
GPT2 = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _groups(cfg, technique):
    return [g.model_dump() for g in getattr(cfg.compression, technique)]


def _wq(modules, bits, offset=0, start=None, period=1, symmetric=True):
    return {"modules": modules, "schedule_offset": offset, "start_bits": bits if start is None else start,
            "target_bits": bits, "quantization_period": period, "symmetric": symmetric, "group_size": None}


def _aq(modules, bits=8, offset=0, symmetric=True):
    return {"modules": modules, "schedule_offset": offset, "bits": bits, "symmetric": symmetric}


def _ds(**techniques):
    return {**BATCH, CT: techniques}


def _technique(enabled=True, groups=None, **shared):
    block = {"shared_parameters": {"enabled": enabled, **shared}}
    if groups is not None:
        block["different_groups"] = groups
    return block


# -- the real configs ----------------------------------------------------------------------

FIXTURE_GROUPS = {
    # file: (compute dtype, {technique: groups}, layer_reduction)
    "gpt2_W8A8_Qgroup64_fp32.json": ("float32", {
        "weight_quantization": [_wq(GPT2, 8)], "activation_quantization": [_aq(GPT2)]}, None),
    # MoQ (quantize_weight_in_forward: false) under fp16, two groups with their own bits
    "gpt2_W4or8A8_Qgroup64_fp16.json": ("float16", {
        "weight_quantization": [_wq(["mlp.c_fc", "mlp.c_proj"], 4), _wq(["attn.c_attn", "attn.c_proj"], 8)],
        "activation_quantization": [_aq(GPT2)]}, None),
    # its sparse/row/head pruning blocks (topk ones too) are switched off: nothing, and no error
    "bert_ZeroQuant_W48A8_Qgroup48_lkd_fp32.json": ("float32", {
        "weight_quantization": [_wq(["attention.self", "attention.output.dense"], 8),
                                _wq(["intermediate", "layer.\\w+.output.dense"], 4)],
        "activation_quantization": [_aq(["attention.self", "attention.output.dense"])]}, None),
    "bert_XTC_layer_reduction_fp16.json": ("float32", {}, {
        "enabled": True, "keep_number_layer": 6, "teacher_layer": [1, 3, 5, 7, 9, 11]}),
    "bert_ds_config.json": ("float16", {}, None),
}
TECHNIQUES = ("weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning", "head_pruning",
              "channel_pruning")


def test_every_fixture_is_listed_with_its_source_and_tested():
    files = sorted(path.name for path in FIXTURES.glob("*.json"))
    readme = (FIXTURES / "README.md").read_text()
    assert 4 <= len(files) <= 6 and files == sorted(FIXTURE_GROUPS)
    for name in files:
        assert f"| {name} |" in readme
        json.loads((FIXTURES / name).read_text())  # plain JSON, no comments


@pytest.mark.parametrize("name", sorted(FIXTURE_GROUPS))
def test_real_compression_config_maps_to_the_expected_groups(name):
    dtype, expected, reduction = FIXTURE_GROUPS[name]
    cfg = load_config(FIXTURES / name)
    assert cfg.precision.compute_dtype == dtype
    for technique in TECHNIQUES:
        assert _groups(cfg, technique) == expected.get(technique, []), technique
    layer_reduction = cfg.compression.layer_reduction.model_dump()
    assert layer_reduction == (reduction or CompressionConfig().layer_reduction.model_dump())
    assert cfg.compression.enabled == bool(expected or reduction)
    ignored = dict(cfg.ignored)
    if "weight_quantization" in expected:
        # quantize_groups has no zjax equivalent: named with the difference, never silent
        assert "output column" in ignored[f"{WQ_SHARED}.quantize_groups"]
    if reduction:
        assert f"{CT}.layer_reduction.module_name_prefix" in ignored
        assert f"{CT}.layer_reduction.other_module_name" in ignored
    if not expected and not reduction:
        assert not any(key.startswith(CT) for key in ignored)


def test_the_mapping_is_recorded_per_technique():
    cfg = load_config(FIXTURES / "gpt2_W8A8_Qgroup64_fp32.json")
    mapped = dict(cfg.deepspeed_mapping)
    assert mapped[f"{CT}.weight_quantization"].startswith("compression.weight_quantization = [{'modules'")
    assert mapped[f"{CT}.activation_quantization"].startswith("compression.activation_quantization = ")


# -- switched off, defaults, shape of the groups ---------------------------------------------


def test_switched_off_techniques_map_to_nothing_and_are_not_checked_further():
    off = {"different_groups": {"g": {"params": {"dense_ratio": 0.5}, "modules": ["x"]}}}
    cfg = load_config(_ds(
        weight_quantization={"shared_parameters": {"enabled": False, "quantizer_kernel": True,
                                                   "rounding": "stochastic"}},
        activation_quantization={"shared_parameters": {"enabled": False, "range_calibration": "static"}},
        sparse_pruning={"shared_parameters": {"enabled": False, "method": "snip_momentum"}, **off},
        row_pruning={"shared_parameters": {"enabled": False, "method": "topk"}, **off},
        head_pruning={"shared_parameters": {"enabled": False, "method": "topk", "num_heads": 12}, **off},
        channel_pruning={"shared_parameters": {"enabled": False}, **off},
        layer_reduction={"enabled": False, "keep_number_layer": 5},
    ))
    assert not cfg.compression.enabled
    assert cfg.ignored == ()
    # a technique without shared_parameters is off too (DeepSpeed's default enabled: false)
    assert not load_config(_ds(row_pruning={"different_groups": {}})).compression.enabled


def test_shared_parameters_are_merged_into_every_group_with_deepspeeds_defaults():
    cfg = load_config(_ds(
        activation_quantization=_technique(quantization_type="asymmetric", groups={
            "a": {"params": {"bits": 8}, "modules": ["attn/wq"]}, "b": {"params": {"bits": 4}}}),
        sparse_pruning=_technique(schedule_offset=0, groups={"s": {"params": {"dense_ratio": 0.3},
                                                                   "modules": ["mlp/w_up"]}}),
    ))
    # activation_quantization's schedule_offset defaults to 1000 (constants.py); modules to every matrix
    assert _groups(cfg, "activation_quantization") == [_aq(["attn/wq"], 8, 1000, False), _aq(["*"], 4, 1000, False)]
    sparse = _groups(cfg, "sparse_pruning")[0]
    assert (sparse["modules"], sparse["schedule_offset"], sparse["dense_ratio"], sparse["method"]) == (
        ["mlp/w_up"], 0, 0.3, "l1")
    assert sparse["schedule_offset_end"] is None  # DeepSpeed's l1 has no gradual schedule


def test_row_pruning_pairs_each_module_with_its_related_modules():
    cfg = load_config(_ds(row_pruning=_technique(schedule_offset=0, method="l1", groups={"rp1": {
        "params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense", "mlp/w_up"],
        "related_modules": [["layer.\\w+.output.dense"], ["mlp/w_down", "mlp/w_gate"]]}})))
    rows = _groups(cfg, "row_pruning")
    assert [(g["modules"], g["related_modules"], g["dense_ratio"], g["schedule_offset"]) for g in rows] == [
        (["intermediate.dense"], ["layer.\\w+.output.dense"], 0.5, 0),
        (["mlp/w_up"], ["mlp/w_down", "mlp/w_gate"], 0.5, 0)]
    with pytest.raises(ConfigError, match=r"rp1.related_modules has 1 lists for 2 modules: DeepSpeed pairs them"):
        load_config(_ds(row_pruning=_technique(groups={"rp1": {
            "params": {"dense_ratio": 0.5}, "modules": ["a", "b"], "related_modules": [["c"]]}})))


def test_l1_pruning_after_step_0_maps_and_names_when_its_mask_is_ranked():
    cfg = load_config(_ds(row_pruning=_technique(groups={"r": {"params": {"dense_ratio": 0.25}}})))
    assert _groups(cfg, "row_pruning")[0]["schedule_offset"] == 1000  # ROW_PRUNING_SCHEDULE_OFFSET_DEFAULT
    assert "init_compression" in dict(cfg.ignored)[f"{CT}.row_pruning.shared_parameters.method"]
    at_zero = load_config(_ds(row_pruning=_technique(schedule_offset=0, groups={"r": {"params": {"dense_ratio": 0.25}}})))
    assert at_zero.ignored == ()


def test_topk_pruning_maps_to_learned_scores_with_deepspeeds_heads_and_related_modules():
    """DeepSpeed's topk (trained scores, TopKBinarizer) is zjax's method topk (zjax.compression.learned)."""
    cfg = load_config(_ds(
        sparse_pruning=_technique(method="topk", schedule_offset=10, groups={"s": {"params": {"dense_ratio": 0.3},
                                                                                "modules": ["mlp/w_up"]}}),
        row_pruning=_technique(method="topk", schedule_offset=0, groups={"r": {
            "params": {"dense_ratio": 0.5}, "modules": ["mlp/w_up"], "related_modules": [["mlp/w_down"]]}}),
        head_pruning=_technique(num_heads=4, schedule_offset=20, groups={"h": {
            "params": {"dense_ratio": 0.5}, "modules": ["attn/wo"], "related_modules": [["attn/w[qkv]"]]}})))
    sparse = _groups(cfg, "sparse_pruning")[0]
    assert (sparse["method"], sparse["schedule_offset"], sparse["dense_ratio"]) == ("topk", 10, 0.3)
    row = _groups(cfg, "row_pruning")[0]
    assert (row["method"], row["modules"], row["related_modules"]) == ("topk", ["mlp/w_up"], ["mlp/w_down"])
    head = _groups(cfg, "head_pruning")[0]
    assert (head["method"], head["num_heads"], head["schedule_offset"], head["related_modules"]) == (
        "topk", 4, 20, ["attn/w[qkv]"])
    ignored = dict(cfg.ignored)
    # schedule_offset 0: DeepSpeed masks the forward of step 0, zjax from step 1 -- named, not silent
    assert "step 1" in ignored[f"{CT}.row_pruning.shared_parameters.schedule_offset"]
    assert f"{CT}.sparse_pruning.shared_parameters.method" not in ignored


def test_layer_reduction_maps_its_teacher_layers():
    cfg = load_config(_ds(layer_reduction={"enabled": True, "teacher_layer": [0, 2]}))
    assert cfg.compression.layer_reduction.model_dump() == {
        "enabled": True, "keep_number_layer": None, "teacher_layer": [0, 2]}
    with pytest.raises(ConfigError, match="keep_number_layer=3 but teacher_layer has 2 entries"):
        load_config(_ds(layer_reduction={"enabled": True, "teacher_layer": [0, 2], "keep_number_layer": 3}))


# -- weight quantization: the two modes ----------------------------------------------------


def _wq_config(shared, params, fp16=True):
    raw = _ds(weight_quantization=_technique(groups={"wq1": {"params": params, "modules": ["mlp/w_up"]}}, **shared))
    if fp16:
        raw["fp16"] = {"enabled": True}
    return raw


def test_moq_starts_one_step_after_schedule_offset_and_keeps_its_bit_schedule():
    # runtime/quantize.py quantizes after the optimizer step: first seen by the forward of offset + 1
    cfg = load_config(_wq_config({"schedule_offset": 5}, {"start_bits": 12, "target_bits": 8,
                                                          "quantization_period": 50}))
    assert _groups(cfg, "weight_quantization") == [_wq(["mlp/w_up"], 8, offset=6, start=12, period=50)]
    # offset 0: engine._forward_prologue quantizes before the first forward as well
    cfg = load_config(_wq_config({"schedule_offset": 0}, {"start_bits": 8, "target_bits": 8,
                                                          "quantization_period": 0}))
    assert _groups(cfg, "weight_quantization") == [_wq(["mlp/w_up"], 8, offset=0)]


def test_quantize_in_forward_quantizes_at_target_bits_from_schedule_offset():
    shared = {"schedule_offset": 5, "quantize_weight_in_forward": True, "quantizer_kernel": True,
              "rounding": "stochastic", "fp16_mixed_quantize": {"enabled": True, "quantize_change_ratio": 0.1}}
    cfg = load_config(_wq_config(shared, {"start_bits": 12, "target_bits": 8, "quantization_period": 50},
                                 fp16=False))
    assert _groups(cfg, "weight_quantization") == [_wq(["mlp/w_up"], 8, offset=5)]
    ignored = dict(cfg.ignored)
    for name in ("quantizer_kernel", "rounding", "fp16_mixed_quantize"):
        assert "MoQ" in ignored[f"{WQ_SHARED}.{name}"]
    group = f"{CT}.weight_quantization.different_groups.wq1.params"
    assert "target_bits" in ignored[f"{group}.start_bits"] and f"{group}.quantization_period" in ignored


def test_shared_keys_inside_params_are_ignored_as_deepspeed_overrides_them():
    cfg = load_config(_wq_config({"quantize_weight_in_forward": True},
                                 {"start_bits": 8, "target_bits": 8, "schedule_offset": 7}, fp16=False))
    assert _groups(cfg, "weight_quantization")[0]["schedule_offset"] == 0
    assert "shared_parameters" in dict(cfg.ignored)[f"{CT}.weight_quantization.different_groups.wq1.params.schedule_offset"]


# -- refused, naming key and value -----------------------------------------------------------

GROUP = {"g": {"params": {"dense_ratio": 0.5}, "modules": ["mlp/w_up"]}}
REFUSED = [
    (_ds(sparse_pruning=_technique(method="snip_momentum", dense_ratio=0.4, schedule_offset_end=90)),
     r"sparse_pruning.shared_parameters.method='snip_momentum': .*Intel Neural Compressor.*method: l1"),
    (_ds(sparse_pruning=_technique(method="magnitude", groups=GROUP)),
     r"sparse_pruning.shared_parameters.method='magnitude' is not one DeepSpeed accepts.*l1, topk, snip_momentum"),
    (_ds(head_pruning=_technique(groups=GROUP)),
     r"head_pruning.shared_parameters.num_heads is missing; DeepSpeed refuses it too.*num_heads: 12"),
    (_ds(head_pruning=_technique(method="l1", num_heads=12, groups=GROUP)),
     r"head_pruning.shared_parameters.method='l1': DeepSpeed refuses it too"),
    (_ds(channel_pruning=_technique(groups=GROUP)),
     r"channel_pruning.shared_parameters.enabled=True: DeepSpeed prunes output channels of Conv2d.*row_pruning"),
    (_ds(activation_quantization=_technique(range_calibration="static", groups={"a": {"params": {"bits": 8}}})),
     r"activation_quantization.shared_parameters.range_calibration='static'.*set range_calibration: dynamic"),
    (_ds(activation_quantization=_technique(groups={"a": {"params": {"bits": 6}}})),
     r"different_groups.a.params.bits=6: DeepSpeed refuses it too.*use 4 or 8"),
    (_wq_config({}, {"start_bits": 8, "target_bits": 8}, fp16=False),
     r"quantize_weight_in_forward=False \(MoQ.*without fp16.enabled: DeepSpeed refuses it too.*"
     r"quantize_weight_in_forward: true"),
    (_wq_config({"quantizer_kernel": True}, {"start_bits": 8, "target_bits": 8}),
     r"quantizer_kernel=True: DeepSpeed's CUDA quantizer rounds stochastically.*set quantizer_kernel: false"),
    (_wq_config({"rounding": "stochastic"}, {"start_bits": 8, "target_bits": 8}),
     r"shared_parameters.rounding='stochastic'.*set rounding: nearest"),
    (_wq_config({"fp16_mixed_quantize": {"enabled": True}}, {"start_bits": 8, "target_bits": 8}),
     r"fp16_mixed_quantize.enabled=True.*set enabled: false"),
    (_wq_config({"quantization_type": "nf4"}, {"start_bits": 8, "target_bits": 8}),
     r"quantization_type='nf4' is not one DeepSpeed accepts.*symmetric, asymmetric"),
    (_wq_config({"quantize_weight_in_forward": True}, {"start_bits": 1, "target_bits": 1}, fp16=False),
     r"params.target_bits=1: DeepSpeed quantizes 2 bits ternary and 1 bit binary.*target_bits >= 3"),
    (_wq_config({}, {"start_bits": 12, "target_bits": 8, "quantization_period": 0}),
     r"params.quantization_period=0 with start_bits=12 > target_bits=8.*quantization_period >= 1"),
    (_wq_config({}, {"start_bits": 4, "target_bits": 8}),
     r"params.start_bits=4 is below target_bits=8: DeepSpeed refuses it too"),
    (_wq_config({}, {"target_bits": 8}), r"params.start_bits is missing; DeepSpeed refuses it too"),
    (_ds(sparse_pruning=_technique()),
     r"sparse_pruning.shared_parameters.enabled=True without .*different_groups: DeepSpeed refuses it too"),
    (_ds(row_pruning=_technique(groups={"g": {"params": {"dense_ratio": 1.5}}})),
     r"params.dense_ratio=1.5: give the fraction of weights to keep, in \(0, 1\]"),
    (_ds(row_pruning=_technique(groups={"g": {"modules": ["x"]}})), r"different_groups.g has no params"),
    (_ds(layer_reduction={"enabled": True, "keep_number_layer": 2}),
     r"layer_reduction.teacher_layer is missing; DeepSpeed needs it too"),
]


@pytest.mark.parametrize("raw,words", REFUSED)
def test_features_zjax_cannot_honour_are_refused_naming_key_and_value(raw, words):
    with pytest.raises(ConfigError, match=words):
        load_config(raw)


UNKNOWN = [
    # (compression_training block, the unknown key, the suggestion)
    ({"weight_quantisation": {}}, f"{CT}.weight_quantisation", f"{CT}.weight_quantization"),
    ({"sparse_pruning": {"shared_parameter": {}}}, f"{CT}.sparse_pruning.shared_parameter",
     f"{CT}.sparse_pruning.shared_parameters"),
    ({"weight_quantization": {"shared_parameters": {"schedule_ofset": 1}}}, f"{WQ_SHARED}.schedule_ofset",
     f"{WQ_SHARED}.schedule_offset"),
    ({"weight_quantization": {"shared_parameters": {"fp16_mixed_quantize": {"enable": False}}}},
     f"{WQ_SHARED}.fp16_mixed_quantize.enable", f"{WQ_SHARED}.fp16_mixed_quantize.enabled"),
    ({"row_pruning": {"different_groups": {"g": {"params": {"dense_ration": 0.5}}}}},
     f"{CT}.row_pruning.different_groups.g.params.dense_ration", f"{CT}.row_pruning.different_groups.g.params.dense_ratio"),
    ({"row_pruning": {"different_groups": {"g": {"params": {}, "module": ["x"]}}}},
     f"{CT}.row_pruning.different_groups.g.module", f"{CT}.row_pruning.different_groups.g.modules"),
    ({"layer_reduction": {"teacher_layers": [1]}}, f"{CT}.layer_reduction.teacher_layers",
     f"{CT}.layer_reduction.teacher_layer"),
]


@pytest.mark.parametrize("block,unknown,nearest", UNKNOWN)
def test_unknown_keys_name_the_nearest_valid_key(block, unknown, nearest):
    with pytest.raises(ConfigError) as err:
        load_config({**BATCH, CT: block})
    assert str(err.value).startswith(f"unknown key {unknown!r}; did you mean {nearest!r}? valid keys at ")


def test_compression_training_alone_makes_a_deepspeed_config_and_conflicts_with_zjax_keys():
    with pytest.raises(ConfigError, match="Either train_batch_size or train_micro_batch_size_per_gpu"):
        load_config({CT: {}})
    zjax_block = {"activation_quantization": [{"modules": ["x"], "bits": 4}]}
    raw = _ds(activation_quantization=_technique(groups={"a": {"params": {"bits": 8}, "modules": ["x"]}}))
    with pytest.raises(ConfigError, match="compression_training.activation_quantization sets "
                                          "compression.activation_quantization="):
        load_config({**raw, "compression": zjax_block})


# -- schedules -------------------------------------------------------------------------------


def _deepspeed_run(steps, offset, moq, start=8, target=8, period=1, offset_end=None):
    """What each forward sees in DeepSpeed's engine: scheduler.py's flag and, for MoQ,
    runtime/quantize.py's bits (None: not quantized / not pruned). One micro-batch per step."""
    training_steps, flag, qsteps, bits, q_period, current = 0, False, 0, start, period, None

    def check():
        nonlocal flag
        end_ok = offset_end is None or training_steps <= offset_end
        if offset <= training_steps and end_ok:  # check_*: set, never cleared
            flag = True

    def quantize():
        nonlocal qsteps, bits, q_period, current
        qsteps += 1  # Quantizer.step
        if bits != target and qsteps >= q_period:  # compute_quantization
            q_period <<= 1
            bits -= 1
        current = bits

    seen = []
    for step in range(steps):
        if step == 0:  # engine._forward_prologue, global_steps == 0
            check()
            if moq and flag:
                quantize()
        seen.append(current if moq else (target if flag else None))  # the forward
        if moq and flag:  # engine._take_model_step: quantize, then compression_scheduler.step()
            quantize()
        training_steps += 1
        check()
    return seen


@pytest.mark.parametrize("offset", [0, 1, 3, 10])
@pytest.mark.parametrize("start,target,period", [(8, 8, 1), (12, 8, 1), (12, 8, 3), (12, 4, 5), (16, 8, 7)])
def test_moq_bits_match_a_replay_of_deepspeeds_engine(offset, start, target, period):
    seen = _deepspeed_run(300, offset, moq=True, start=start, target=target, period=period)
    zjax_offset = offset + 1 if offset > 0 else 0  # what the config mapping writes
    for step, bits in enumerate(seen):
        active = S.quantization_active(step, zjax_offset)
        assert active == (bits is not None), step
        if active:
            assert S.weight_bits(step, start, target, period, zjax_offset) == bits, step


@pytest.mark.parametrize("offset", [0, 1, 7])
def test_flags_match_deepspeeds_scheduler(offset):
    seen = _deepspeed_run(40, offset, moq=False)
    assert [S.quantization_active(s, offset) for s in range(40)] == [b is not None for b in seen]
    assert [S.pruning_active(s, offset) for s in range(40)] == [b is not None for b in seen]
    # sparse pruning's window sets the same flag, which is never cleared after offset_end
    windowed = _deepspeed_run(40, offset, moq=False, offset_end=offset + 5)
    assert [S.pruning_active(s, offset, offset + 5) for s in range(40)] == [b is not None for b in windowed]


def test_schedules_at_their_boundary_steps():
    assert (S.quantization_active(4, 5), S.quantization_active(5, 5)) == (False, True)
    assert (S.pruning_active(9, 10, 20), S.pruning_active(10, 10, 20), S.pruning_active(500, 10, 20)) == (
        False, True, True)
    # MoQ with period 2 from 12 to 8 bits, offset 3: bit changes at calls 2, 4, 8, 16
    bits = {s: S.weight_bits(s, 12, 8, 2, 3) for s in range(0, 25)}
    assert [bits[s] for s in (2, 3, 4, 5, 6, 9, 10, 17, 18, 24)] == [12, 12, 11, 11, 10, 10, 9, 9, 8, 8]
    assert S.weight_bits(0, 8, 6, 1, 0) == 7  # period 1: the first quantized forward is one bit down
    assert S.weight_bits(10**6, 8, 8, 1, 0) == 8
    # one-shot pruning (DeepSpeed's): dense_ratio from the offset on
    assert [S.dense_ratio_at(s, 0.4, 10) for s in (9, 10, 11)] == [1.0, 0.4, 0.4]
    assert [S.mask_update_due(s, 10) for s in (9, 10, 11)] == [False, True, False]
    # zjax's gradual schedule: 1.0 at the offset, linear in the updates, dense_ratio at the end
    ratios = [S.dense_ratio_at(s, 0.25, 10, 20, 4) for s in (9, 10, 13, 14, 17, 18, 19, 20, 30)]
    assert ratios == pytest.approx([1.0, 1.0, 1.0, 0.7, 0.7, 0.4, 0.4, 0.25, 0.25])
    assert [s for s in range(40) if S.mask_update_due(s, 10, 20, 4)] == [10, 14, 18, 20]
    assert S.dense_ratio_at(20, 0.1, 0, 20, 1) == 0.1  # exactly dense_ratio at the end


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="target_bits=9 is above start_bits=8"):
        S.weight_bits(0, 8, 9, 1, 0)
    with pytest.raises(ValueError, match="period=0"):
        S.weight_bits(0, 8, 4, 0, 0)
    with pytest.raises(ValueError, match="offset_end=3 is before offset=5"):
        S.pruning_active(0, 5, 3)
    with pytest.raises(ValueError, match="stride=0"):
        S.mask_update_due(0, 0, 10, 0)
    with pytest.raises(ValueError, match="dense_ratio=0"):
        S.dense_ratio_at(0, 0, 0)
    with pytest.raises(TypeError, match="boolean"):
        S.weight_bits(True, 8, 4, 1, 0)


CASES = [
    ("quantization_active", dict(offset=7)),
    ("weight_bits", dict(start_bits=12, target_bits=4, period=3, offset=5)),
    ("weight_bits", dict(start_bits=16, target_bits=2, period=2**29, offset=0)),  # thresholds past int32
    ("pruning_active", dict(offset=11, offset_end=40)),
    ("dense_ratio_at", dict(dense_ratio=0.3, offset=11)),
    ("dense_ratio_at", dict(dense_ratio=0.3, offset=11, offset_end=97, stride=7)),
    ("dense_ratio_at", dict(dense_ratio=0.5, offset=0, offset_end=1, stride=1)),
    ("mask_update_due", dict(offset=11)),
    ("mask_update_due", dict(offset=11, offset_end=97, stride=7)),
]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_jitted_schedules_agree_with_python_ints(name, kwargs):
    fn = getattr(S, name)
    steps = list(range(0, 260))
    traced = jax.jit(jax.vmap(lambda s: fn(s, **kwargs)))(jnp.arange(260, dtype=jnp.int32))
    python = [fn(s, **kwargs) for s in steps]
    assert all(isinstance(v, (bool, int, float)) for v in python)
    if name == "dense_ratio_at":
        assert traced.tolist() == pytest.approx(python, rel=1e-6)
    else:
        assert traced.tolist() == python
