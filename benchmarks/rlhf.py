"""RLHF's hybrid engine (zjax.rlhf.ppo): where a PPO iteration's time goes, and what generating
through the inference engine buys over generating from the ZeRO-3 training layout.

For each model size (``--sizes``: small = d_model 64, 2 layers; large = d_model 256, 4 layers,
the demo GPT's shape;
vocab 256) the actor and the critic are ZeRO-3 train steps over 8 data devices, the reference is
the actor's frozen initial state, and the reward is the fraction of response tokens equal to one
byte. Then:

1. PPO iterations (``--iterations``, the first one compiles and is left out): the medians of the
   trainer's own timings per iteration, ``relayout_s`` (the actor's weights from the ZeRO-3 layout
   onto the engine, ``Engine.load_params``), ``generate_s`` (the engine's rollout), ``score_s``
   (log-probs of the actor and the reference, the critic's values, the reward, GAE) and
   ``train_s`` (one actor and one critic step), each as a fraction of the whole iteration (wall
   clock around ``PPOTrainer.iteration``; "other" is what the four leave: host copies, metrics).
2. Generation tokens/s, greedy, from the trained actor state, ``--repeats`` interleaved repeats:
   (a) the hybrid engine, ``ppo.generate`` (re-layout, then the paged KV cache and continuous
   batching; tokens/s with and without the re-layout), against (b) generating directly from the
   ZeRO-3 training layout, what DeepSpeed does without its hybrid engine: every new token is one
   ``TrainStep.per_example`` call, which gathers the parameters a layer at a time, on the
   fixed-shape ``[B, P + T]`` token buffer (no KV cache: each token recomputes the whole buffer),
   returning the argmax at each row's position. Both are greedy, so their tokens should agree:
   the script prints whether the first ``--check-tokens`` do, and the fraction of all that do.

8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` unless XLA_FLAGS
names a count), float32. The engine serves on one device (``tensor=1``), the training layout
spans all 8.

Usage:
  .venv/bin/python benchmarks/rlhf.py [--sizes small,large] [--batch 32] [--prompt-len 16]
      [--new-tokens 64] [--iterations 6] [--repeats 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zjax
from zjax.models.gpt import GPT, count_params
from zjax.rlhf import ppo

SIZES = {
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 176},
    "large": {"d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4, "d_ff": 704},
}
VOCAB = 256
TARGET = ord("a")
PHASES = ("relayout_s", "generate_s", "score_s", "train_s")


def score(tokens, mask):
    """The fraction of the response's tokens equal to ``TARGET``."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    return ((tokens[:, 1:] == TARGET) * mask).sum(1) / np.maximum(mask.sum(1), 1)


def next_token(model, batch):
    """The greedy token after position ``batch["pos"]`` of each row of ``batch["tokens"]``."""
    logits = model(batch["tokens"])  # [b, L, V]
    at = jnp.take_along_axis(logits, batch["pos"][:, None, None], axis=1)[:, 0]
    return jnp.argmax(at, -1).astype(jnp.int32)


def config(size: str, batch: int, seq: int):
    return zjax.load_config({
        "zero": {"stage": 3}, "mesh": {"data": 8}, "precision": {"compute_dtype": "float32"},
        "batch": {"global_batch_size": batch}, "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"type": "constant", "warmup_steps": 0},
        "model": {**SIZES[size], "vocab_size": VOCAB, "max_seq_len": seq}, "data": {"seq_len": seq},
    })


def direct_generate(actor, state, prompts: np.ndarray, new_tokens: int, steps: int | None = None
                    ) -> tuple[np.ndarray, float]:
    """Greedy generation from the training layout: one ``per_example`` call per new token on the
    fixed ``[B, P + T]`` buffer (``steps`` of the ``new_tokens``, default all). Returns the buffer
    and the seconds it took."""
    b, p = prompts.shape
    buffer = np.zeros((b, p + new_tokens), np.int32)
    buffer[:, :p] = prompts
    t0 = time.perf_counter()
    for t in range(new_tokens if steps is None else steps):
        pos = p - 1 + t
        nxt = actor.per_example(state, {"tokens": buffer, "pos": np.full((b,), pos, np.int32)}, next_token)
        buffer[:, pos + 1] = np.asarray(nxt)
    return buffer, time.perf_counter() - t0


def bench_size(size: str, args) -> dict:
    b, p, t_new = args.batch, args.prompt_len, args.new_tokens
    cfg = config(size, b, p + t_new)
    settings = ppo.PPOSettings(max_new_tokens=t_new)
    t0 = time.perf_counter()
    actor = zjax.make_train_step(cfg, ppo.actor_loss(settings), model=GPT(cfg.model, rngs=nnx.Rngs(0)))
    critic = zjax.make_train_step(cfg, ppo.critic_loss(settings), model=ppo.ValueModel(cfg.model, rngs=nnx.Rngs(1)))
    trainer = ppo.PPOTrainer(actor, actor.init(), critic, critic.init(), score, cfg.model, settings,
                             max_prompt_len=p)
    m = cfg.model
    print(f"\n=== {size}: GPT d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), "
          f"d_ff {m.d_ff}, vocab {m.vocab_size}, {count_params(m):,} parameters; actor and critic ZeRO-3 over "
          f"{actor.data_size} data devices; rollout {b} prompts x {p} tokens + {t_new} new", flush=True)

    rng = np.random.default_rng(0)
    rows, walls = [], []
    for i in range(args.iterations):
        prompts = rng.integers(0, VOCAB, (b, p)).astype(np.int32)
        start = time.perf_counter()
        metrics = trainer.iteration(prompts)
        wall = time.perf_counter() - start
        print(f"  iteration {i}: {wall:.2f} s" + (" (warm-up, compiles)" if i == 0 else "")
              + f", score {metrics['score']:.3f}, sample_logp_rel_gap {metrics['sample_logp_rel_gap']:.1e}",
              flush=True)
        if i:
            rows.append(metrics)
            walls.append(wall)
    phases = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    phases["iteration_s"] = statistics.median(walls)
    phases["other_s"] = statistics.median(w - sum(r[k] for k in PHASES) for r, w in zip(rows, walls))

    # generation: the trained actor, greedy, the same prompts both ways
    state = trainer.actor_state
    greedy = dataclasses.replace(settings, temperature=0.0)
    prompts = rng.integers(0, VOCAB, (b, p)).astype(np.int32)
    prompt_rows = prompts.tolist()
    direct_generate(actor, state, prompts, t_new, steps=1)  # compiles next_token's per_example
    ppo.generate(trainer.engine, state, prompt_rows, 0, greedy, p)  # warm (compiled in the iterations)
    engine_runs, direct_runs = [], []
    for r in range(args.repeats):
        order = ("engine", "direct") if r % 2 == 0 else ("direct", "engine")
        for which in order:
            if which == "engine":
                tokens, mask, _, times = ppo.generate(trainer.engine, state, prompt_rows, 0, greedy, p)
                n = int(mask.sum())
                engine_runs.append((n, times["relayout_s"], times["generate_s"]))
                engine_tokens = tokens
            else:
                buffer, seconds = direct_generate(actor, state, prompts, t_new)
                direct_runs.append((b * t_new, seconds))
                direct_tokens = buffer
    k = min(args.check_tokens, t_new)
    first_agree = bool(np.array_equal(engine_tokens[:, p:p + k], direct_tokens[:, p:p + k]))
    all_agree = float(np.mean(engine_tokens[:, p:] == direct_tokens[:, p:]))
    gen = {
        "engine_tok_s": statistics.median(n / g for n, _, g in engine_runs),
        "engine_with_relayout_tok_s": statistics.median(n / (rl + g) for n, rl, g in engine_runs),
        "relayout_s": statistics.median(rl for _, rl, _ in engine_runs),
        "engine_generate_s": statistics.median(g for _, _, g in engine_runs),
        "direct_tok_s": statistics.median(n / s for n, s in direct_runs),
        "direct_s": statistics.median(s for _, s in direct_runs),
        "first_tokens_agree": first_agree, "tokens_agree_fraction": all_agree,
        "engine_repeats_tok_s": [n / g for n, _, g in engine_runs],
        "direct_repeats_tok_s": [n / s for n, s in direct_runs],
    }

    total = phases["iteration_s"]
    print(f"\nPPO iteration ({size}): medians over {len(rows)} iterations after the warm-up")
    print(f"{'phase':10} {'median s':>9} {'of iteration':>13}")
    for key in (*PHASES, "other_s"):
        print(f"{key[:-2]:10} {phases[key]:9.3f} {phases[key] / total:12.1%}")
    print(f"{'iteration':10} {total:9.3f} {1:12.1%}")
    print(f"\nGeneration ({size}): greedy, {b} x {t_new} = {b * t_new} new tokens, medians of {args.repeats} "
          f"interleaved repeats")
    print(f"{'path':40} {'tok/s':>8} {'x direct':>9}  repeats tok/s")
    d = gen["direct_tok_s"]
    print(f"{'hybrid engine, generation only':40} {gen['engine_tok_s']:8,.0f} {gen['engine_tok_s'] / d:8.2f}x  "
          + " ".join(f"{x:,.0f}" for x in gen["engine_repeats_tok_s"]))
    print(f"{'hybrid engine, with the re-layout':40} {gen['engine_with_relayout_tok_s']:8,.0f} "
          f"{gen['engine_with_relayout_tok_s'] / d:8.2f}x")
    print(f"{'direct from the ZeRO-3 layout':40} {d:8,.0f} {1:8.2f}x  "
          + " ".join(f"{x:,.0f}" for x in gen["direct_repeats_tok_s"]))
    print(f"re-layout {gen['relayout_s'] * 1e3:.1f} ms, engine generation {gen['engine_generate_s'] * 1e3:.0f} ms, "
          f"direct {gen['direct_s'] * 1e3:.0f} ms")
    print(f"greedy tokens agree, first {k} of every row: {first_agree}; all {t_new}: {all_agree:.1%}")
    print(f"({time.perf_counter() - t0:.0f} s for {size})", flush=True)
    return {"size": size, "parameters": count_params(m), "model": SIZES[size], "phases": phases, "generation": gen}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="small,large")
    parser.add_argument("--batch", type=int, default=32, help="rollout size (the actor's global batch)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=6, help="PPO iterations, the first a warm-up")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved generation repeats")
    parser.add_argument("--check-tokens", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations needs at least 2 (the first is a warm-up)")
    print(f"$ python benchmarks/rlhf.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, float32; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS')}")
    t0 = time.perf_counter()
    results = [bench_size(size, args) for size in args.sizes.split(",")]

    print("\nSummary")
    print(f"{'size':6} {'params':>10} {'relayout':>9} {'generate':>9} {'score':>7} {'train':>7} {'other':>7} "
          f"{'engine tok/s':>13} {'+relayout':>10} {'direct tok/s':>13} {'engine/direct':>14} {'greedy agree':>13}")
    for r in results:
        ph, g = r["phases"], r["generation"]
        fr = [ph[k] / ph["iteration_s"] for k in (*PHASES, "other_s")]
        print(f"{r['size']:6} {r['parameters']:10,} " + " ".join(f"{f:{w}.1%}" for f, w in zip(fr, (9, 9, 7, 7, 7)))
              + f" {g['engine_tok_s']:13,.0f} {g['engine_with_relayout_tok_s']:10,.0f} {g['direct_tok_s']:13,.0f} "
              f"{g['engine_tok_s'] / g['direct_tok_s']:13.1f}x {str(g['first_tokens_agree']):>13}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
