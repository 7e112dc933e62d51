"""`make gpu-check`: zjax's Pallas kernels and training step on one real GPU, in one command.

Meant for a machine with one GPU where JAX is already installed and nothing can be
downloaded (zjax installs there with ``pip install --no-deps --no-build-isolation -e .``
plus wheels of what it lacks). In order, within a time budget (default 7.5 minutes):

1. ``zjax report``;
2. every Pallas kernel with ``impl="pallas"`` against its XLA reference, outputs and
   gradients, on fresh random inputs of awkward shapes (odd lengths, grouped heads,
   segment ids, a vocabulary that is no power of two, an inf in fp16 gradients; the
   serving kernels, int8/w8a8/int4 matmuls and paged-attention decode, forward only);
   error is ``|out - ref| / |ref|`` (norms) against a float32 reference computed at
   ``highest`` matmul precision;
3. the reference GPT at about 1B parameters, bf16, 20 steps on one device, with the
   Pallas kernels and with XLA: step time, tokens/s and MFU (PaLM's 6N + 12·L·d·T
   FLOPs per token against the chip's published dense bf16 peak);
4. speed of each kernel against XLA at realistic shapes (attention at sequence 2k-16k,
   head_dim 128, also against cuDNN's fused attention through ``jax.nn``; cross-entropy
   at vocabulary 128k), fwd+bwd, medians over interleaved repeats; the quantized matmuls
   at a decode shape (16 tokens through a 4096 x 14336 weight), forward, also against the
   bf16 matmul of a float weight (DeepSpeed's int8 was slower than fp16: is ours?);
5. the test suite's ``-m gpu`` tests, with ``ZJAX_REQUIRE_GPU=1`` so they fail instead
   of skipping if no GPU is seen.

Every section runs even when an earlier one failed; a failure prints its traceback and
the run ends with exit code 1 and a summary that names it. Nothing is skipped silently:
a section cut by the time budget is a failure too.

``--dry-run`` runs the same code on CPU at tiny shapes with ``impl="interpret"`` (this
is what ``make test`` checks).

Usage:
  python3 benchmarks/gpu_check.py [--dry-run] [--budget-s 450] [--json PATH]
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

ROOT = Path(__file__).resolve().parents[1]
# |out - ref| / |ref| bounds: float32 inputs may meet TF32 matmuls (about 3e-4), bf16 and
# fp16 inputs round every operand to 8 or 11 bits of mantissa.
TOLERANCE = {"float32": 2e-3, "bfloat16": 2e-2, "float16": 5e-3}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = GpuCheck(dry_run=args.dry_run, budget_s=args.budget_s)
    check.section("report", check.report)
    check.section("kernel correctness", check.kernel_correctness)
    check.section("train the reference GPT", check.train)
    check.section("kernel speed", check.kernel_speed)
    check.section("tests marked gpu", check.gpu_tests)
    summary = check.summary()
    if args.json:
        Path(args.json).write_text(json.dumps(check.results, indent=2, default=str))
    print(summary)
    return 1 if check.failed else 0


class GpuCheck:
    """The sections of the check, their results, and what failed."""

    def __init__(self, dry_run: bool, budget_s: float):
        self.dry_run = dry_run
        self.impl = "interpret" if dry_run else "pallas"
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.failed: list[str] = []
        self.results: dict = {"dry_run": dry_run, "sections": {}}
        if not dry_run and jax.default_backend() != "gpu":
            raise SystemExit(f"gpu_check: the default JAX backend is {jax.default_backend()!r}, not a GPU; "
                             "run it where JAX sees a GPU, or pass --dry-run")

    def section(self, name: str, fn: Callable[[], dict | None]) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"\n=== {name} (at {elapsed:.0f} s) ===", flush=True)
        if elapsed > self.budget_s:
            self.failed.append(f"{name}: not run, the {self.budget_s:.0f} s budget was spent")
            print(f"FAILED: not run, the {self.budget_s:.0f} s budget was spent", flush=True)
            return
        try:
            self.results["sections"][name] = fn()
        except Exception:  # noqa: BLE001 - every failure is printed and counted, then the next section runs
            traceback.print_exc()
            self.failed.append(f"{name}: raised (traceback above)")
        print(f"--- {name}: {time.perf_counter() - self.start - elapsed:.1f} s", flush=True)

    def summary(self) -> str:
        took = time.perf_counter() - self.start
        if not self.failed:
            return f"\ngpu_check: all sections passed in {took:.0f} s"
        return "\ngpu_check: FAILED in {:.0f} s\n  {}".format(took, "\n  ".join(self.failed))

    # 1. what this installation is
    def report(self) -> dict:
        from zjax.analysis.report import format_report, report

        r = report()
        print(format_report(r), flush=True)
        return {"backend": r["backend"], "devices": r["devices"], "versions": r["versions"]}

    # 2. correctness of every kernel against its reference
    def kernel_correctness(self) -> dict:
        rows = {}
        for name, case in correctness_cases(self.dry_run).items():
            kernel, reference, inputs, dtype = case
            try:
                errors = compare(functools.partial(kernel, impl=self.impl), reference, inputs)
            except Exception as err:  # noqa: BLE001 - a kernel that fails to compile is a failed row
                traceback.print_exc()
                rows[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
                self.failed.append(f"kernel {name}: {type(err).__name__}")
                print(f"{name:<34} FAILED to run: {type(err).__name__}", flush=True)
                continue
            worst = max(errors.values())
            ok = worst <= TOLERANCE[dtype] and math.isfinite(worst)
            rows[name] = {"errors": errors, "tolerance": TOLERANCE[dtype], "ok": ok}
            if not ok:
                self.failed.append(f"kernel {name}: error {worst:.2e} > {TOLERANCE[dtype]:.0e}")
            detail = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
            print(f"{name:<34} {'ok  ' if ok else 'FAIL'} {detail}", flush=True)
        return rows

    # 4. speed against XLA
    def kernel_speed(self) -> dict:
        rows = {}
        print(f"{'case (fwd+bwd unless noted)':<40} {'ms kernel':>10} {'ms xla':>10} {'xla/kernel':>11}  other", flush=True)
        for name, case in speed_cases(self.dry_run).items():
            kernel, xla, others, inputs, backward = case
            fns = {"kernel": functools.partial(kernel, impl=self.impl), "xla": xla, **others}
            try:
                times = time_calls(fns, inputs, backward, repeats=3 if self.dry_run else 10)
            except ValueError as err:
                if "cannot serve this call" not in str(err):
                    raise
                # A shape the kernel declines: impl="auto" serves it with XLA. Shown, not hidden.
                rows[name] = {"refused": str(err)}
                print(f"{name:<40} kernel refuses this shape (auto uses xla): {err}", flush=True)
                continue
            except Exception as err:  # noqa: BLE001 - a row that cannot run is a failed row
                traceback.print_exc()
                rows[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
                self.failed.append(f"speed {name}: {type(err).__name__}")
                continue
            rows[name] = {k: v * 1e3 for k, v in times.items()}
            other = " ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items() if k not in ("kernel", "xla"))
            print(f"{name:<40} {times['kernel'] * 1e3:>10.3f} {times['xla'] * 1e3:>10.3f} "
                  f"{times['xla'] / times['kernel']:>10.2f}x  {other}", flush=True)
        rows["attention block sweep"] = self.attention_block_sweep()
        return rows

    def attention_block_sweep(self) -> dict:
        """Flash attention fwd+bwd at explicit (block_q, block_kv), past the shared-memory
        budget on purpose: which blocks compile on this GPU, and how fast they are."""
        from pallas_kernels import attention

        seq, heads, kv_heads, head_dim = (64, 2, 1, 32) if self.dry_run else (8192, 16, 8, 128)
        key = jax.random.split(jax.random.key(2), 3)
        q = jax.random.normal(key[0], (1, seq, heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(key[1], (1, seq, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(key[2], (1, seq, kv_heads, head_dim), jnp.bfloat16)
        segments = jnp.zeros((1, seq), jnp.int32)
        rows = {}
        sweep = ((32, 32), (64, 64), (128, 64), (64, 128), (128, 128))
        for blocks in sweep[:2] if self.dry_run else sweep:  # the dry run checks the loop, not the blocks
            def fn(q, k, v, blocks=blocks):
                return attention._flash(q, k, v, segments, True, head_dim ** -0.5, *blocks, False,
                                        self.dry_run)
            name = f"sweep seq{seq} bf16 blocks {blocks}"
            try:
                ms = time_calls({"kernel": fn}, (q, k, v), True, repeats=3 if self.dry_run else 5)["kernel"] * 1e3
            except Exception as err:  # noqa: BLE001 - a block that does not fit is a finding, not a failure
                rows[str(blocks)] = {"error": f"{type(err).__name__}: {err}"[:300]}
                print(f"{name:<40} does not run: {type(err).__name__}: {str(err)[:120]}", flush=True)
                continue
            rows[str(blocks)] = {"ms": ms}
            print(f"{name:<40} {ms:>10.3f}", flush=True)
        return rows

    # 3. a real training step
    def train(self) -> dict:
        rows = {}
        # "auto" is what a user gets: each kernel where it compiles, serves the shape and was
        # not measured slower than XLA here.
        # XLA's attention keeps [batch, heads, seq, seq] scores per layer for the backward pass:
        # at the kernels' batch of 8 it needs about 152 GB (measured on an H200), so its
        # baseline runs a batch of 2; tokens/s and MFU compare, step times do not.
        # the dry run checks the section runs: one variant
        variants = (("interpret", 8),) if self.dry_run else (("auto", 8), ("xla", 2))
        for kernels, batch in variants:
            try:
                rows[kernels] = r = train_gpt(kernels, self.dry_run, batch)
            except Exception as err:  # noqa: BLE001 - one failed run does not hide the other
                traceback.print_exc()
                rows[kernels] = {"error": f"{type(err).__name__}: {err}"[:500]}
                self.failed.append(f"train kernels={kernels}: {type(err).__name__}")
                continue
            print(f"kernels={kernels:<9} batch {batch}x{r['seq']}  params {r['params'] / 1e9:.3f}B  "
                  f"compile {r['compile_s']:.1f} s  "
                  f"step {r['step_ms']:.1f} ms (median of {r['steps']})  {r['tokens_per_s']:,.0f} tokens/s  "
                  f"MFU {r['mfu']:.1%} of {r['peak_flops'] / 1e12:.0f} TFLOP/s  loss {r['loss_first']:.3f} -> "
                  f"{r['loss_last']:.3f}", flush=True)
            if not (r["loss_last"] < r["loss_first"] and math.isfinite(r["loss_last"])):
                self.failed.append(f"train kernels={kernels}: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                                   "did not fall")
        return rows

    # 5. the suite's GPU tests
    def gpu_tests(self) -> dict:
        # This process holds most of the GPU (JAX preallocates 75%); the tests allocate as they go.
        env = {**os.environ, "ZJAX_REQUIRE_GPU": "0" if self.dry_run else "1",
               "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        if not self.dry_run:
            env["JAX_PLATFORMS"] = ""
        # Only files that mark gpu tests are collected: collecting the rest would import packages
        # (grain) that a GPU image may lack and that no gpu test needs.
        files = sorted(str(f) for f in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in f.read_text())
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                   "-W", "ignore::DeprecationWarning", *files]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(30.0, self.budget_s - (time.perf_counter() - self.start)))
        print(done.stdout[-6000:], done.stderr[-1000:], flush=True)
        # Exit code 5 (nothing collected) means the suite lost its gpu tests: a failure too.
        if done.returncode != 0 or not files:
            self.failed.append(f"tests marked gpu: pytest exit code {done.returncode}")
        return {"returncode": done.returncode, "tail": done.stdout[-1000:]}


def correctness_cases(dry_run: bool) -> dict:
    """name -> (kernel, reference, inputs, dtype name): awkward shapes, fresh random data."""
    s = 8 if dry_run else 1  # shrinks every dimension on CPU
    key = iter(jax.random.split(jax.random.key(int(time.time())), 64))

    def normal(shape, dtype):
        return jax.random.normal(next(key), shape, jnp.float32).astype(dtype)

    cases = {}
    # The dry run checks the script, not the kernels (the test suite does that): one dtype.
    for dtype in (jnp.bfloat16,) if dry_run else (jnp.float32, jnp.bfloat16):
        n = jnp.dtype(dtype).name
        rows, d = 1000 // s, 2048 // s
        cases[f"rms_norm {n} [{rows},{d}]"] = (
            pk.rms_norm, pk.rms_norm_reference, (normal((rows, d), dtype), normal((d,), dtype)), n)
        cases[f"layer_norm {n} [{rows},{d}]"] = (
            pk.layer_norm, pk.layer_norm_reference,
            (normal((rows, d), dtype), normal((d,), dtype), normal((d,), dtype)), n)
        f = 2050 // s
        for gated in ("swiglu", "geglu"):
            cases[f"{gated} {n} [{rows},{d // 2}]x[{d // 2},{f}]"] = (
                getattr(pk, gated), getattr(pk, f"{gated}_reference"),
                (normal((rows, d // 2), dtype), normal((d // 2, f), dtype) * 0.05, normal((d // 2, f), dtype) * 0.05),
                n)
        length = 1000 // s
        segments = jnp.sort(jax.random.randint(next(key), (2, length), 0, 3), axis=1)
        attention = functools.partial(_attention_with_segments, segments)
        cases[f"flash_attention {n} len{length} gqa causal segments"] = (
            lambda q, k, v, impl: attention(q, k, v, impl=impl),
            lambda q, k, v: attention(q, k, v, impl="xla"),
            (normal((2, length, 8, 128), dtype), normal((2, length, 2, 128), dtype),
             normal((2, length, 2, 128), dtype)), n)
        cases[f"flash_attention {n} q{300 // s}-kv{517 // s}"] = (
            pk.flash_attention, pk.attention_reference,
            (normal((1, 300 // s, 4, 128), dtype), normal((1, 517 // s, 4, 128), dtype),
             normal((1, 517 // s, 4, 128), dtype)), n)
        # one block of ring attention: queries and keys at zig-zag positions (explicit positions)
        block = 512 // s
        positions = jnp.concatenate([jnp.arange(block // 2), 3 * block // 2 + jnp.arange(block // 2)])
        ring_ids = jnp.sort(jax.random.randint(next(key), (2, block), 0, 2), axis=1)
        cases[f"flash ring block {n} len{block} zig-zag positions gqa"] = (
            functools.partial(_ring_block, positions, ring_ids),
            functools.partial(_ring_block_reference, positions, ring_ids),
            (normal((2, block, 8, 128), dtype), normal((2, block, 2, 128), dtype),
             normal((2, block, 2, 128), dtype)), n)
        vocab = 32003 // s
        labels = jax.random.randint(next(key), (rows,), 0, vocab)
        cases[f"softmax_cross_entropy {n} vocab{vocab}"] = (
            lambda h, w, impl: pk.softmax_cross_entropy(h, w, labels, impl=impl),
            lambda h, w: pk.cross_entropy_reference(h, w, labels),
            (normal((rows, 512 // s), dtype), normal((512 // s, vocab), dtype) * 0.05), n)
    # serving kernels (forward only: integer inputs): quantized matmuls and paged attention
    tokens, k, n, group = 37, 2048 // s, 1536 // s, 128 // s
    x = normal((tokens, k), jnp.bfloat16)
    values = jax.random.randint(next(key), (k, n), -127, 128, jnp.int32).astype(jnp.int8)
    col_scale = jax.random.uniform(next(key), (n,), jnp.float32, 1e-3, 1e-2)
    for name in ("int8_matmul", "w8a8_matmul"):
        cases[f"{name} bf16 [{tokens},{k}]x[{k},{n}]"] = (
            getattr(pk, name), getattr(pk, f"{name}_reference"), (x, values, col_scale), "bfloat16")
    packed = pk.pack_int4(jax.random.randint(next(key), (k, n), -7, 8, jnp.int32).astype(jnp.int8), group)
    group_scale = jax.random.uniform(next(key), (k // group, n), jnp.float32, 1e-3, 1e-2).astype(jnp.bfloat16)
    cases[f"int4_matmul bf16 [{tokens},{k}]x[{k},{n}] group{group}"] = (
        pk.int4_matmul, pk.int4_matmul_reference, (x, packed, group_scale), "bfloat16")
    pages, page_size, slots_n, per_seq = 64, 16, 4, 8
    lengths = jnp.array([5, 128, 77, 33])  # tokens in each slot's cache; a decode query at the last one
    table = jax.random.permutation(next(key), jnp.arange(1, pages))[:slots_n * per_seq].reshape(slots_n, per_seq)
    paged = functools.partial(_paged_decode, lengths)  # the int page table as an input: no gradient is taken
    cases["paged_attention bf16 decode 4 seqs h8/2 d128 pages of 16"] = (
        lambda q, kp, vp, t, impl: paged(q, kp, vp, t, impl=impl),
        lambda q, kp, vp, t: paged(q, kp, vp, t, impl="xla"),
        (normal((slots_n, 1, 8, 128), jnp.bfloat16), normal((pages, page_size, 2, 128), jnp.bfloat16),
         normal((pages, page_size, 2, 128), jnp.bfloat16), table), "bfloat16")
    grads = {"w": normal((1000 // s, 777), jnp.float16).at[3, 5].set(jnp.inf), "b": normal((333,), jnp.float32)}
    cases["unscale_and_check fp16 with inf"] = (
        lambda g, impl: _unscale_as_array(g, impl), lambda g: _unscale_as_array(g, "xla"), (grads,), "float16")
    if dry_run:  # the script's path once per kernel family (layer_norm and geglu share rms_norm's and swiglu's)
        cases = {name: case for name, case in cases.items() if not name.startswith(("layer_norm", "geglu"))
                 and "-kv" not in name}
    return cases


def _attention_with_segments(segments, q, k, v, impl):
    return pk.flash_attention(q, k, v, causal=True, segment_ids=segments, impl=impl)


def _ring_block(positions, ids, q, k, v, impl):
    """Ring attention's per-block kernels as one differentiable call (a ring of one block)."""
    from pallas_kernels.attention import flash_block_backward, flash_block_forward

    pos = jnp.broadcast_to(positions, q.shape[:2])
    kw = dict(causal=True, scale=1.0 / math.sqrt(q.shape[-1]), interpret=impl == "interpret")

    @jax.custom_vjp
    def attend(q, k, v):
        return flash_block_forward(q, k, v, pos, pos, ids, ids, **kw)[0]

    def fwd(q, k, v):
        out, lse = flash_block_forward(q, k, v, pos, pos, ids, ids, **kw)
        return out, (q, k, v, out, lse)

    def bwd(res, dout):
        q, k, v, out, lse = res
        delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
        dq, dk, dv = flash_block_backward(q, k, v, pos, pos, ids, ids, dout, lse, delta, **kw)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    attend.defvjp(fwd, bwd)
    return attend(q, k, v)


def _ring_block_reference(positions, ids, q, k, v):
    mask = (positions[:, None] >= positions[None, :])[None] & (ids[:, :, None] == ids[:, None, :])
    groups = q.shape[2] // k.shape[2]
    return jax.nn.dot_product_attention(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2),
                                        mask=mask[:, None])


def _paged_decode(lengths, q, k_pages, v_pages, table, impl):
    """One decode query per slot at the slot's last cached position."""
    slots = jnp.arange(q.shape[0])
    return pk.paged_attention(q, k_pages, v_pages, table, slots, (lengths - 1)[:, None], impl=impl)


def _unscale_as_array(grads, impl):
    """The unscaled leaves (infinities as 0) and the finite flag x 1e3 in one float array, so that a
    wrong flag alone gives a relative error far above any tolerance."""
    out, finite = pk.unscale_and_check(grads, 1024.0, impl=impl)
    flat = [jnp.nan_to_num(x.astype(jnp.float32).ravel(), posinf=0.0, neginf=0.0) for x in jax.tree.leaves(out)]
    return jnp.concatenate(flat + [1e3 * finite.astype(jnp.float32)[None]])


def compare(kernel: Callable, reference: Callable, inputs: tuple) -> dict[str, float]:
    """Relative errors of ``kernel`` against ``reference``: the output and, for float inputs of
    differentiable kernels, the gradient of ``sum(out * cotangent)`` for every input."""
    out = jax.jit(kernel)(*inputs)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(reference)(*_upcast(inputs))
    errors = {"out": _relative(out, ref)}
    if not all(isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) for x in inputs) or any(
            x.dtype == jnp.float16 for x in inputs):
        return errors
    cot = jax.random.normal(jax.random.key(7), out.shape, jnp.float32)

    def loss(fn, *xs):
        return jnp.sum(fn(*xs).astype(jnp.float32) * cot)

    argnums = tuple(range(len(inputs)))
    grads = jax.jit(jax.grad(functools.partial(loss, kernel), argnums))(*inputs)
    with jax.default_matmul_precision("highest"):
        ref_grads = jax.jit(jax.grad(functools.partial(loss, reference), argnums))(*_upcast(inputs))
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        errors[f"grad{i}"] = _relative(g, r)
    return errors


def _upcast(inputs):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, inputs)


def _relative(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def speed_cases(dry_run: bool) -> dict:
    """name -> (kernel, xla, other implementations, inputs, time the backward too), at realistic shapes."""
    key = iter(jax.random.split(jax.random.key(1), 64))
    bf16 = jnp.bfloat16

    def normal(shape, dtype=bf16):
        return jax.random.normal(next(key), shape, jnp.float32).astype(dtype)

    tokens, d, f = (128, 128, 256) if dry_run else (16384, 4096, 14336)
    cases = {
        f"rms_norm bf16 [{tokens},{d}]": (pk.rms_norm, functools.partial(pk.rms_norm, impl="xla"), {},
                                          (normal((tokens, d)), normal((d,))), True),
        f"layer_norm bf16 [{tokens},{d}]": (pk.layer_norm, functools.partial(pk.layer_norm, impl="xla"), {},
                                            (normal((tokens, d)), normal((d,)), normal((d,))), True),
        f"swiglu bf16 [{tokens},{d}]x[{d},{f}]": (
            pk.swiglu, functools.partial(pk.swiglu, impl="xla"), {},
            (normal((tokens, d)), normal((d, f)) * 0.02, normal((d, f)) * 0.02), True),
    }
    heads, kv_heads, head_dim = (2, 1, 32) if dry_run else (16, 8, 128)
    for seq in ((64,) if dry_run else (2048, 4096, 8192, 16384)):
        q = normal((1, seq, heads, head_dim))
        k, v = normal((1, seq, kv_heads, head_dim)), normal((1, seq, kv_heads, head_dim))
        others = {} if dry_run else {"cudnn": _cudnn_attention}
        cases[f"flash_attention bf16 causal seq{seq} h{heads}/{kv_heads}"] = (
            functools.partial(pk.flash_attention, causal=True),
            functools.partial(pk.flash_attention, causal=True, impl="xla"), others, (q, k, v), True)
    rows, vocab = (128, 1024) if dry_run else (8192, 131072)
    labels = jax.random.randint(next(key), (rows,), 0, vocab)
    for d_model in ((64,) if dry_run else (512, 4096)):
        cases[f"softmax_cross_entropy bf16 {rows}x{d_model} vocab{vocab}"] = (
            lambda h, w, impl: pk.softmax_cross_entropy(h, w, labels, impl=impl),
            lambda h, w: pk.softmax_cross_entropy(h, w, labels, impl="xla"),
            {"full logits": lambda h, w: pk.cross_entropy_reference(h, w, labels)},
            (normal((rows, d_model)), normal((d_model, vocab)) * 0.02), True)
    # serving: a decode batch through a quantized weight, against the bf16 matmul of the float weight
    m, k, f = (8, 256, 512) if dry_run else (16, 4096, 14336)
    x, w = normal((m, k)), normal((k, f)) * 0.02
    values = jax.random.randint(next(key), (k, f), -127, 128, jnp.int32).astype(jnp.int8)
    col_scale = jnp.full((f,), 1e-3, jnp.float32)
    packed = pk.pack_int4(jax.random.randint(next(key), (k, f), -7, 8, jnp.int32).astype(jnp.int8), 128)
    group_scale = jnp.full((k // 128, f), 1e-3, jnp.bfloat16)
    bf16_matmul = {"bf16 matmul": lambda x, *_: jnp.matmul(x, w, preferred_element_type=jnp.float32)}
    for name, weight in (("int8_matmul", (values, col_scale)), ("w8a8_matmul", (values, col_scale)),
                         ("int4_matmul", (packed, group_scale))):
        cases[f"{name} bf16 decode [{m},{k}]x[{k},{f}] fwd"] = (
            getattr(pk, name), functools.partial(getattr(pk, name), impl="xla"), bf16_matmul, (x, *weight), False)
    n = 1 << (16 if dry_run else 28)
    cases[f"unscale_and_check fp32 {n / 1e6:.1f}M fwd"] = (
        lambda g, impl: pk.unscale_and_check(g, 1024.0, impl=impl)[0],
        lambda g: pk.unscale_and_check(g, 1024.0, impl="xla")[0], {}, (normal((n,), jnp.float32),), False)
    if dry_run:
        cases = {name: case for name, case in cases.items() if not name.startswith("layer_norm")}
    return cases


def _cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def time_calls(fns: dict[str, Callable], inputs: tuple, backward: bool, repeats: int) -> dict[str, float]:
    """Median seconds of one call (forward+backward when ``backward``) of each function, repeats
    interleaved."""
    def step(fn):
        if not backward:
            return jax.jit(fn)

        def loss(*xs):
            return jnp.sum(fn(*xs).astype(jnp.float32))
        differentiable = tuple(i for i, x in enumerate(inputs) if jnp.issubdtype(x.dtype, jnp.floating))
        return jax.jit(jax.value_and_grad(loss, differentiable))

    steps = {name: step(fn) for name, fn in fns.items()}
    for run in steps.values():  # compile and warm up
        jax.block_until_ready(run(*inputs))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(run(*inputs))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def train_gpt(kernels: str, dry_run: bool, batch: int, steps: int = 20) -> dict:
    """Trains the reference GPT on one device for ``steps`` steps on one fixed random batch of
    ``batch`` sequences, then frees what it held."""
    from zjax import load_config, make_train_step
    from zjax.models.gpt import count_params, gpt_loss, make_gpt
    from zjax.analysis.profile import peak_flops

    if dry_run:
        model = dict(vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32)
        seq, steps = 16, 3
    else:  # about 1.0B parameters
        model = dict(vocab_size=32000, d_model=2048, n_layers=20, n_heads=16, n_kv_heads=8, d_ff=5632,
                     max_seq_len=2048)
        seq = 2048
    cfg = load_config({
        "model": model, "kernels": kernels,
        "batch": {"global_batch_size": batch}, "data": {"seq_len": seq},
        "precision": {"compute_dtype": "bfloat16"}, "zero": {"stage": 0},
        "optimizer": {"type": "adamw", "lr": 3e-4}, "schedule": {"type": "constant"},
    })
    train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, seed=0, kernels=kernels))
    state = train.init()
    rng = np.random.default_rng(0)
    data = train.shard_batch({"tokens": rng.integers(0, cfg.model.vocab_size, (batch, seq + 1), dtype=np.int32)})
    start = time.perf_counter()
    state, metrics = train(state, data)
    loss_first = float(metrics["loss"])  # waits for the step: this time includes compilation
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps - 1):
        start = time.perf_counter()
        state, metrics = train(state, data)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    loss_last = float(metrics["loss"])
    del state, metrics, train
    gc.collect()
    jax.clear_caches()
    params = count_params(cfg.model)
    step_s = statistics.median(times)
    tokens = batch * seq
    flops_per_token = 6 * params + 12 * model["n_layers"] * model["d_model"] * seq
    peak = peak_flops(compute_dtype="bfloat16")["per_device"]
    return {"params": params, "steps": len(times), "compile_s": compile_s, "step_ms": step_s * 1e3,
            "tokens_per_s": tokens / step_s, "mfu": flops_per_token * tokens / step_s / peak,
            "peak_flops": peak, "loss_first": loss_first, "loss_last": loss_last, "seq": seq}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, impl='interpret': checks the script itself")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="a section that would start after this many seconds fails as not run")
    parser.add_argument("--json", help="also write every number to this JSON file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
