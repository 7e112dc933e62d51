"""What compression costs in quality, and what it buys in size and decode speed (zjax.compression).

A character-level GPT on the Python standard library's source (``--size issue``: d_model 128,
2 layers, 4 heads (2 kv), d_ff 352, ~0.40M parameters; ``--size small``: d_model 64, ~0.12M, what
tests/compression/test_quality.py runs) is trained densely for ``--dense-steps`` steps; every
variant then continues from the same dense run for ``--recovery-steps`` steps (the same data, the
same seed; the compression switches on at the first of those steps, ``schedule_offset``):

- dense: no compression (the baseline every ratio is against);
- sparse 50%: unstructured magnitude pruning of every matmul weight to dense_ratio 0.5;
- sparse 50% topk: DeepSpeed's learned-score pruning (``method: topk``): a trained score per
  weight, kaiming-initialized (so the first mask is random, as in DeepSpeed), the top half kept;
- 2:4: N:M sparsity, the largest 2 of every 4 weights along the input dimension;
- head+row pruned, cleaned: half the heads (per KV group) and half the feed-forward features,
  then ``redundancy_clean`` (the smaller model's loss, computed by the inference engine's model);
- QAT int8: 8-bit symmetric per-column fake quantization, exported to the engine's int8 weights;
- int4 (GPTQ): the dense model, post-training int4 (group 32) with GPTQ calibration;
- distilled half-depth student: a 1-layer student initialized from teacher layer 1 (layer
  reduction) trained ``--student-steps`` with KD (alpha 0.5, T 1) from the dense teacher, against
  the same student trained from that initialization without the teacher, for seeds ``--seeds``.

Held-out loss: mean token NLL on ``--eval-batches`` batches of the validation split. Size: the
bytes of the parameters as stored for serving (``zjax.inference.quant.weight_bytes``). Decode
tokens/s: ``Engine`` at batch 8 (16-token prompts, 48 new tokens, greedy), median of 3.
One CPU device, float32 (bf16 is not faster on this CPU).

Usage:
  .venv/bin/python benchmarks/compression_quality.py [--size issue|small] [--json FILE] [--only a,b]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import zjax
from zjax.compression import clean, distill
from zjax.data.corpus import TextCorpus
from zjax.inference import quant
from zjax.inference.model import logits as serve_logits
from zjax.models.gpt import count_params, gpt_loss, make_gpt

SIZES = {
    "issue": {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 352},
    "small": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 176},
}
MATMULS = ["attn/w", "mlp/w_"]
VARIANTS = ("dense", "sparse", "topk", "nm", "pruned", "qat", "int4", "kd", "reduction")


def config(size: str, steps: int, seq: int, batch: int, lr: float, seed: int, compression: dict | None = None,
           **model):
    return zjax.load_config({
        "seed": seed, "steps": steps, "zero": {"stage": 0}, "precision": {"compute_dtype": "float32"},
        "batch": {"global_batch_size": batch}, "optimizer": {"lr": lr},
        "schedule": {"type": "constant", "warmup_steps": 20},
        "model": {**SIZES[size], "vocab_size": 256, "max_seq_len": seq, **model}, "data": {"seq_len": seq},
        "compression": compression or {},
    })


class Bench:
    def __init__(self, args):
        self.args = args
        self.corpus = TextCorpus.stdlib(max_bytes=2_000_000)
        a = args
        self.train_batches = [self.corpus.batch("train", k, a.batch, a.seq, seed=0)
                              for k in range(a.dense_steps + max(a.recovery_steps, a.student_steps))]
        self.val = [self.corpus.batch("val", k, a.batch, a.seq, seed=0) for k in range(a.eval_batches)]
        self.device = jax.devices()[:1]

    def cfg(self, compression=None, steps=None, seed=0, **model):
        a = self.args
        return config(a.size, steps or a.dense_steps + a.recovery_steps, a.seq, a.batch, a.lr, seed, compression,
                      **model)

    def train(self, cfg, steps, model=None, loss_fn=gpt_loss, start=0, state=None, **kw):
        """Trains ``steps`` steps from batch ``start``; returns (train step, state)."""
        model = make_gpt(cfg.model, seed=cfg.seed) if model is None else model
        train = zjax.make_train_step(cfg, loss_fn, model=model, devices=self.device, **kw)
        state = train.init() if state is None else state
        for k in range(start, start + steps):
            state, metrics = train(state, self.train_batches[k])
        jax.block_until_ready(metrics["loss"])
        return train, state

    def held_out(self, params, model_cfg) -> float:
        """Mean token NLL of ``params`` (the GPT's dict; quantized weights too) on the validation batches."""
        total, count = 0.0, 0
        fn = jax.jit(lambda p, t: serve_logits(p, model_cfg, t))
        for batch in self.val:
            tokens = jnp.asarray(batch["tokens"])
            logp = jax.nn.log_softmax(fn(params, tokens[:, :-1]))
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
            total += float(nll.sum())
            count += nll.size
        return total / count

    def decode_rate(self, params, model_cfg) -> float:
        from zjax.inference.engine import Engine
        from zjax.inference.sampling import SamplingParams

        engine = Engine.from_params(params, model_cfg, max_seqs=8, token_budget=8, max_seq_len=self.args.seq)
        prompts = [list(b[:16]) for b in np.asarray(self.val[0]["tokens"])[:8]]
        sampling = SamplingParams(max_tokens=48, temperature=0.0)
        engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # compile
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            outs = engine.generate(prompts, sampling)
            rates.append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
        return statistics.median(rates)


def pure(state) -> dict:
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="issue")
    parser.add_argument("--dense-steps", type=int, default=400)
    parser.add_argument("--recovery-steps", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument("--kd-alpha", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--no-speed", action="store_true", help="skip the decode tokens/s column")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    print(f"$ python benchmarks/compression_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    bench = Bench(args)
    n, r = args.dense_steps, args.recovery_steps
    dense_cfg = bench.cfg()
    m = dense_cfg.model
    print(f"jax {jax.__version__}; GPT d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), "
          f"d_ff {m.d_ff}, {count_params(m):,} parameters; {n} dense steps then {r} more, batch {args.batch} x "
          f"{args.seq} bytes, lr {args.lr}")
    results: dict = {"size": args.size, "parameters": count_params(m)}
    rows = []

    def row(name, params, model_cfg, loss=None, note=""):
        loss = bench.held_out(params, model_cfg) if loss is None else loss
        size = quant.weight_bytes(params)
        speed = None if args.no_speed else bench.decode_rate(params, model_cfg)
        results[name] = {"loss": loss, "bytes": size, "decode_tok_s": speed}
        rows.append((name, loss, size, speed, note))
        print(f"  {name}: held-out {loss:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return loss

    t0 = time.perf_counter()
    _, dense_mid = bench.train(bench.cfg(steps=n), n)
    mid_state = dense_mid
    # every variant continues from the dense state at step n (the same init, data and optimizer state)

    def continue_with(compression):
        cfg = bench.cfg(compression)
        model = make_gpt(cfg.model, seed=cfg.seed)
        train = zjax.make_train_step(cfg, gpt_loss, model=model, devices=bench.device)
        template = train.init()
        state = _transplant(template, mid_state)
        for k in range(n, n + r):
            state, metrics = train(state, bench.train_batches[k])
        return cfg, pure(state)

    dense_cfg, dense = continue_with(None)
    dense_loss = row("dense", dense, dense_cfg.model)
    # the continued runs' first forward is step n; pruning's first mask is computed in an update
    # (the one of step n), so it is in effect from the forward of step n + 1
    offset = {"schedule_offset": n + 1}
    if "sparse" in only:
        cfg, p = continue_with({"sparse_pruning": [{"modules": MATMULS, "dense_ratio": 0.5, **offset}]})
        sp = zjax.compression.sparsity(p, MATMULS)
        results["sparse_fraction"] = sp
        row("sparse 50%", p, cfg.model, note=f"sparsity {min(sp.values()):.4f}-{max(sp.values()):.4f}")
    if "topk" in only:
        cfg, p = continue_with({"sparse_pruning": [{"modules": MATMULS, "dense_ratio": 0.5, "method": "topk",
                                                    **offset}]})
        sp = zjax.compression.sparsity(p, MATMULS)
        row("sparse 50% topk", p, cfg.model, note=f"learned scores; sparsity {min(sp.values()):.4f}-"
                                                   f"{max(sp.values()):.4f}")
    if "nm" in only:
        cfg, p = continue_with({"sparse_pruning": [{"modules": MATMULS, "pattern": "2:4", **offset}]})
        row("2:4", p, cfg.model)
    if "pruned" in only:
        cfg, p = continue_with({
            "row_pruning": [{"modules": ["mlp/w_up"], "related_modules": ["mlp/w_down"], "dense_ratio": 0.5,
                             **offset}],
            "head_pruning": [{"modules": ["attn/wo"], "related_modules": ["attn/w[qkv]"], "dense_ratio": 0.5,
                              "num_heads": m.n_heads, "num_kv_heads": m.n_kv_heads, **offset}]})
        masked_loss = bench.held_out(p, cfg.model)
        small, small_model = clean.redundancy_clean(p, cfg.model)
        small_cfg = zjax.load_config({"model": small_model, "data": {"seq_len": args.seq}}).model
        results["pruned_masked_loss"] = masked_loss
        row("heads+rows pruned, cleaned", small, small_cfg,
            note=f"{clean.parameter_count(small):,} params (masked loss {masked_loss:.4f})")
    if "qat" in only:
        cfg, p = continue_with({"weight_quantization": [{"modules": MATMULS, "start_bits": 8, "target_bits": 8,
                                                          "schedule_offset": n}]})
        int8 = clean.export_int8(jax.tree.map(jnp.asarray, p), impl="xla")
        results["qat_float_loss"] = bench.held_out(p, cfg.model)
        results["qat_kl"] = _kl(bench, jax.tree.map(jnp.asarray, p), int8, cfg.model)
        row("QAT int8 (exported)", int8, cfg.model, note=f"KL vs its float weights {results['qat_kl']:.2e}")
    if "int4" in only:
        calib = quant.calibrate(jax.tree.map(jnp.asarray, dense), dense_cfg.model,
                                [jnp.asarray(b["tokens"][:, :-1]) for b in bench.train_batches[:8]])
        group = 32 if m.d_ff % 32 == 0 else 16
        int4 = quant.quantize_params(jax.tree.map(jnp.asarray, dense), "int4", group_size=group, impl="xla",
                                     calibration=calib)
        row(f"int4 g{group} (GPTQ, post-training)", int4, dense_cfg.model)
    if "kd" in only:
        # the same 1-layer student (random init and data order of the seed) trained with and without
        # the dense model as teacher; and, as a row, one started from the teacher's last layer
        kd_rows = []
        teacher = make_gpt(dense_cfg.model, seed=0)
        distill._load_into(teacher, dense, "teacher")

        def student_run(seed, kd, init=None):
            cfg = bench.cfg(steps=args.student_steps, seed=seed, n_layers=1)
            student = make_gpt(cfg.model, seed=seed)
            if init is not None:
                distill._load_into(student, init, "student")
            batches = [bench.corpus.batch("train", k, args.batch, args.seq, seed=seed)
                       for k in range(args.student_steps)]
            model = distill.Distillation(student, teacher) if kd else student
            loss_fn = ((lambda mod, b: distill.distillation_loss(mod, b, temperature=args.kd_temperature,
                                                                 alpha=args.kd_alpha)) if kd else gpt_loss)
            train = zjax.make_train_step(cfg, loss_fn, model=model, devices=bench.device,
                                         trainable=nnx.PathContains("student") if kd else None)
            state = train.init()
            for batch in batches:
                state, metrics = train(state, batch)
            params = pure(state)["student"] if kd else pure(state)
            return cfg, params, bench.held_out(params, cfg.model)

        for seed in [int(s) for s in args.seeds.split(",")]:
            _, _, scratch = student_run(seed, kd=False)
            cfg, params, with_kd = student_run(seed, kd=True)
            kd_rows.append({"seed": seed, "scratch": scratch, "kd": with_kd, "gain": scratch - with_kd})
            print(f"  KD seed {seed}: {with_kd:.4f} vs from scratch {scratch:.4f}", flush=True)
        results["kd"] = kd_rows
        row("1-layer student, KD", params, cfg.model, loss=with_kd, note=f"from scratch {scratch:.4f}")
        if "reduction" in only:
            cfg, params, loss = student_run(0, kd=True, init=distill.reduce_layers(dense, [m.n_layers - 1]))
            row("1-layer student, teacher layer + KD", params, cfg.model, loss=loss)
    results["seconds"] = time.perf_counter() - t0

    print(f"\n{'variant':34} {'held-out loss':>13} {'x dense':>8} {'bytes':>10} {'x dense':>8} {'decode tok/s':>13}  note")
    dense_bytes = results["dense"]["bytes"]
    dense_speed = results["dense"]["decode_tok_s"]
    for name, loss, size, speed, note in rows:
        sp = "-" if speed is None else f"{speed:,.0f} ({speed / dense_speed:.2f}x)"
        print(f"{name:34} {loss:13.4f} {loss / dense_loss:8.4f} {size:10,} {size / dense_bytes:8.3f} {sp:>13}  {note}")
    if "kd" in results:
        for k in results["kd"]:
            print(f"KD seed {k['seed']}: student with KD {k['kd']:.4f}, from scratch {k['scratch']:.4f}, "
                  f"gain {k['gain']:.4f} nats")
    print(f"({results['seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


def _transplant(template, saved):
    """A copy of ``saved`` (a state of the same model) placed like ``template``; when ``template``'s
    optimizer chain adds pruning, its masks start fresh and its count at the saved step."""
    opt = saved.opt_state
    if isinstance(template.opt_state, zjax.compression.ScorePruneState):  # learned scores wrap the optimizer
        fresh = template.opt_state
        opt = fresh._replace(count=saved.step.astype(fresh.count.dtype), inner=saved.opt_state,
                             dense={n: _leaf(saved.params, n) for n in fresh.dense})
    elif jax.tree.structure(template.opt_state) != jax.tree.structure(opt):
        inner, prune_state = template.opt_state
        opt = (saved.opt_state, prune_state._replace(count=saved.step.astype(prune_state.count.dtype)))
    state = saved.replace(opt_state=opt)
    return jax.tree.map(lambda t, s: jax.device_put(jnp.copy(s), t.sharding), template, state)


def _leaf(params, path: str):
    for key in path.split("/"):
        params = params[key]
    return params


def _kl(bench, float_params, quantized, model_cfg) -> float:
    total, count = 0.0, 0
    for batch in bench.val:
        tokens = jnp.asarray(batch["tokens"][:, :-1])
        p = jax.nn.log_softmax(serve_logits(float_params, model_cfg, tokens))
        q = jax.nn.log_softmax(serve_logits(quantized, model_cfg, tokens))
        kl = jnp.sum(jnp.exp(p) * (p - q), -1)
        total += float(kl.sum())
        count += kl.size
    return total / count


if __name__ == "__main__":
    sys.exit(main())
