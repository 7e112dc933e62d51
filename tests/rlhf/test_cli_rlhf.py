"""``zjax rlhf sft|reward|ppo|dpo|grpo``: the DeepSpeed-Chat pipeline from JSONL files through the
CLI (UTF-8 bytes), each stage starting from the last one's run; a PPO run with its own critic
config, EMA and PPO-ptx resumes all its models and continues exactly as an uninterrupted run."""
import json

import jax
import numpy as np
import pytest

from zjax import cli
from zjax.checkpoint import load_params

MODEL = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.d_ff=64", "model.max_seq_len=32"]
COMMON = [*MODEL, "precision.compute_dtype=float32", "batch.global_batch_size=8", "schedule.type=constant",
          "schedule.warmup_steps=0", "optimizer.lr=3e-3", "rlhf.max_prompt_len=12", "rlhf.max_len=24",
          "data.seq_len=16", "checkpoints.keep=5"]
WORDS = ["red", "blue", "green", "gold", "gray"]


def reward_fn(prompts, responses):
    """A verifiable reward (GRPO): the fraction of the response that is letters."""
    return [sum(c.isalpha() for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf_data")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(48):
        word = WORDS[rng.integers(len(WORDS))]
        rows.append({"prompt": f"say {word}:", "response": f" {word}!", "chosen": f" {word}!",
                     "rejected": f" {WORDS[(WORDS.index(word) + 1) % len(WORDS)]}?"})
    for name, part in (("train", rows[:40]), ("eval", rows[40:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    config = root / "rlhf.yaml"
    config.write_text("{}\n")
    return root


def rlhf(mode, data, *overrides):
    cli.main(["rlhf", mode, str(data / "rlhf.yaml"), *COMMON, f"rlhf.data={data / 'train.jsonl'}", *overrides])


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_pipeline_through_the_cli(data, tmp_path, capsys):
    sft, rm, policy = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    rlhf("sft", data, "steps=12", f"output_dir={sft}", f"rlhf.eval_data={data / 'eval.jsonl'}", "eval_every=6")
    lines = metrics(sft)
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert lines[-1]["eval_loss"] < lines[5]["eval_loss"] and lines[-1]["loss"] < lines[0]["loss"]

    rlhf("reward", data, "steps=12", f"output_dir={rm}", f"rlhf.actor={sft}", f"rlhf.eval_data={data / 'eval.jsonl'}")
    last = metrics(rm)[-1]
    assert "eval_accuracy" in last and 0.0 <= last["eval_accuracy"] <= 1.0
    assert set(load_params(rm / "checkpoints")) == {"gpt", "value_head"}

    ppo_args = ["rlhf.ppo.max_new_tokens=6", f"rlhf.actor={sft}", f"rlhf.reward_model={rm}",
                "rlhf.critic_overrides=[zero.stage=3, optimizer.lr=1e-3]", "rlhf.ppo.ema_decay=0.9",
                "rlhf.ppo.ptx_coef=0.5", "zero.stage=1"]
    rlhf("ppo", data, "steps=3", f"output_dir={tmp_path / 'straight'}", *ppo_args)
    rlhf("ppo", data, "steps=2", f"output_dir={policy}", *ppo_args)
    capsys.readouterr()
    rlhf("ppo", data, "steps=3", f"output_dir={policy}", *ppo_args)
    assert "resumed from iteration 2" in capsys.readouterr().out
    lines = metrics(policy)
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in ("score", "kl", "reward", "response_length", "actor_clip_fraction", "critic_loss",
                "actor_ptx_loss", "generate_s", "relayout_s", "train_s"):
        assert key in lines[-1], key
    # every model of the resumed run equals the uninterrupted run's: actor, critic, EMA
    for name in ("actor", "critic", "actor_ema"):
        a = load_params(policy / name / "checkpoints")
        b = load_params(tmp_path / "straight" / name / "checkpoints")
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert (policy / "critic" / "config.yaml").read_text().count("stage: 3") == 1
    # the actor's run serves: zjax generate reads output_dir/actor
    capsys.readouterr()
    cli.main(["generate", str(policy / "actor"), "--prompt", "say red:", "--max-tokens", "4"])
    out = capsys.readouterr().out
    assert 0 < len(out.rstrip("\n")) <= 4  # 4 byte tokens (the tiny sft model's favourite is a space)


def test_dpo_and_grpo_through_the_cli(data, tmp_path):
    rlhf("dpo", data, "steps=6", f"output_dir={tmp_path / 'dpo'}", "rlhf.dpo.beta=0.5")
    lines = metrics(tmp_path / "dpo")
    assert abs(lines[0]["loss"] - np.log(2)) < 1e-5 and lines[-1]["loss"] < lines[0]["loss"]
    # GRPO with LoRA adapters on the dpo policy: only the adapters train, generation runs fused
    rlhf("grpo", data, "steps=2", f"output_dir={tmp_path / 'grpo'}", "rlhf.grpo.group_size=4",
         "rlhf.grpo.max_new_tokens=6", f"rlhf.reward_fn={__name__}:reward_fn", f"rlhf.actor={tmp_path / 'dpo'}",
         "model.lora.rank=4", "optimizer.lr=3e-2")
    lines = metrics(tmp_path / "grpo")
    assert [m["step"] for m in lines] == [1, 2] and "actor_loss" in lines[-1]
    assert lines[0]["sample_logp_rel_gap"] <= 1e-5  # the engine's fused weights = the training forward
    base, tuned = load_params(tmp_path / "dpo" / "checkpoints"), load_params(tmp_path / "grpo" / "actor" / "checkpoints")
    np.testing.assert_array_equal(tuned["blocks"]["attn"]["wq"], base["blocks"]["attn"]["wq"])
    assert np.abs(tuned["blocks"]["attn"]["wq_lora_b"]).max() > 0


@pytest.mark.parametrize("overrides, says", [
    ([], "rlhf.data"),
    (["rlhf.data=/nonexistent.jsonl"], "is not a file"),
    (["rlhf.reward_fn=nocolon"], "module:function"),
])
def test_bad_rlhf_input_is_a_clean_error(data, capsys, overrides, says):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rlhf", "ppo", str(data / "rlhf.yaml"), *COMMON, *overrides])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err
