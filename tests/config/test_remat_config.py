"""remat config: policies and tagged names are checked, and DeepSpeed's activation_checkpointing maps onto them."""
import pytest

from zjax import ConfigError, load_config
from zjax.layers import layer_context
from zjax.models import ACTIVATION_NAMES
from zjax.config.remat import POLICIES, remat_policy


def test_unknown_policy_lists_the_policies():
    with pytest.raises(ConfigError, match="remat.policy='some'.*'selective'.*'custom'"):
        load_config({"remat": {"policy": "some"}})
    with pytest.raises(ConfigError, match="remat.policy='some' is not a policy; use one of " + ", ".join(POLICIES)):
        with layer_context("some"):
            pass


def test_unknown_activation_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="remat.names.mlp_hiden: .*valid names: " + ", ".join(ACTIVATION_NAMES)
                       + ", layer_input"):
        load_config({"remat": {"policy": "custom", "names": {"mlp_hiden": "save"}}})


def test_unknown_action_and_names_without_custom_are_errors():
    with pytest.raises(ConfigError, match="remat.names.mlp_up='keep'.*save.*remat.*offload"):
        load_config({"remat": {"policy": "custom", "names": {"mlp_up": "keep"}}})
    with pytest.raises(ConfigError, match="applies only to remat.policy=custom"):
        load_config({"remat": {"policy": "full", "names": {"mlp_up": "save"}}})


def test_extra_names_admit_a_user_models_tags():
    cfg = load_config({"remat": {"policy": "custom", "names": {"ffn_act": "offload", "attn_out": "save"},
                                 "extra_names": ["ffn_act"]}})
    policy = remat_policy(cfg.remat)
    assert (policy.save, policy.offload) == (("attn_out",), ("ffn_act",))


def test_custom_needs_the_whole_remat_block():
    with pytest.raises(ConfigError, match="pass the whole remat config block"):
        remat_policy("custom")


@pytest.mark.parametrize("block, policy", [
    ({}, "full"),
    ({"partition_activations": True, "number_checkpoints": 4}, "full"),
    ({"cpu_checkpointing": True}, "full_offload"),
])
def test_deepspeed_activation_checkpointing_maps_to_a_policy(block, policy):
    # A config in DeepSpeed's words alone needs a batch size, as in DeepSpeed.
    assert load_config({"train_batch_size": 32, "activation_checkpointing": block}).remat.policy == policy


def test_deepspeed_activation_checkpointing_reports_what_it_ignores():
    cfg = load_config({"train_batch_size": 32, "activation_checkpointing": {
        "partition_activations": True, "cpu_checkpointing": False, "number_checkpoints": 2,
        "contiguous_memory_optimization": True, "synchronize_checkpoint_boundary": True, "profile": True}})
    ignored = dict(cfg.ignored)
    assert set(ignored) == {f"activation_checkpointing.{k}" for k in (
        "partition_activations", "number_checkpoints", "contiguous_memory_optimization",
        "synchronize_checkpoint_boundary", "profile")}
    assert all(ignored.values())


def test_a_remat_policy_next_to_the_block_wins_unless_cpu_checkpointing_contradicts_it():
    cfg = load_config({"activation_checkpointing": {}, "remat": {"policy": "selective"}})
    assert cfg.remat.policy == "selective"
    with pytest.raises(ConfigError, match="cpu_checkpointing sets remat.policy='full_offload'.*'selective'"):
        load_config({"activation_checkpointing": {"cpu_checkpointing": True}, "remat": {"policy": "selective"}})
