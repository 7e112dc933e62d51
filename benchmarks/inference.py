"""Serving speed of zjax.inference on the demo model: decode and prefill throughput, time to first
token, and a Poisson-arrival load on ``zjax serve``.

The demo GPT (configs/demo.yaml: d_model 256, 4 layers, 8 heads (4 kv), d_ff 704, vocab 256
bytes, ~3M parameters) with ``model.max_seq_len`` raised to 512, random weights (speed does not
depend on them; benchmarks/quantization.py measures quality on the trained model), float32 on
one CPU device (bf16 is not faster than float32 on this CPU).

Part 1, decode tokens/s at batch 1, 8 and 32: an ``Engine`` with ``max_seqs = token_budget = B``
(each pass is exactly B tokens), B prompts of 16 tokens, greedy, 64 new tokens each. Once every
request has its first token, the following passes are pure decode (B tokens each); decode
tokens/s = B x those passes / their wall time. Median over ``--repeats`` interleaved repeats
(B = 1, 8, 32, then again); the ratio to batch 1 is printed beside each (the issue's goal:
batch 8 >= 3x batch 1).

Part 2, prefill: one prompt of ``--prompt-len`` (384) tokens, ``max_tokens=1``, on an engine with
``token_budget`` 128 and 256 (the prompt is prefilled in chunks of that many tokens, one pass
each): time to first token = from ``add_request`` to the pass that returns the token; prefill
tokens/s = prompt length / that time. Medians over the repeats.

Part 3, ``zjax serve`` under load: a checkpoint of the model (``Checkpointer``, as a training run
leaves it) is served by ``zjax serve OUTPUT_DIR --port 0 --max-seqs 8`` in a subprocess (the
engine's default token budget, 64); ``--requests`` (24) requests per rate arrive as a Poisson
process (exponential gaps, seeded) at each of ``--rates`` requests/s; each is a POST to
``/v1/completions`` (urllib, one thread per request) with a 48-byte window of the standard
library's source as the prompt, ``max_tokens`` 32 and ``temperature`` 0. Latency = from the
request's arrival to its complete answer; throughput = completion tokens of all requests /
(last answer - first arrival). The server is warmed up (its first request compiles the pass)
before the clock starts.

The devices are the host's CPU cores: the numbers say how the engine scales with batch and
load here, not what a GPU would do (``make gpu-check`` times the kernels there).

Usage:
  .venv/bin/python benchmarks/inference.py [--repeats 3] [--prompt-len 384] [--rates 2,4,8] [--requests 24]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from flax import nnx

import zjax
from zjax.checkpoint import Checkpointer
from zjax.inference.engine import Engine
from zjax.inference.sampling import SamplingParams
from zjax.models.gpt import count_params, gpt_loss, make_gpt

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"
OVERRIDES = ["model.max_seq_len=512", "zero.stage=0"]
BATCHES = (1, 8, 32)
NEW_TOKENS = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=384)
    parser.add_argument("--rates", default="2,4,8", help="request rates (per second) of part 3, comma-separated")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"$ python benchmarks/inference.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    cfg = zjax.load_config(str(CONFIG), OVERRIDES)
    m = cfg.model
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; demo GPT: d_model {m.d_model}, {m.n_layers} layers, "
          f"{m.n_heads} heads ({m.n_kv_heads} kv), d_ff {m.d_ff}, {count_params(m):,} parameters, float32")
    model = make_gpt(m, seed=args.seed)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(args.seed)

    engines = {b: Engine.from_params(params, m, max_seqs=b, token_budget=b, max_seq_len=128) for b in BATCHES}
    for engine in engines.values():  # compile
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
    decode = {b: [] for b in BATCHES}
    for _ in range(args.repeats):
        for b, engine in engines.items():
            decode[b].append(decode_rate(engine, b, rng))
    print("\nPart 1: decode (max_seqs = token_budget = B, 16-token prompts, 64 new tokens each, greedy)")
    base = statistics.median(decode[1])
    rows = [("batch", "decode tok/s", "x batch 1", "repeats")]
    for b in BATCHES:
        med = statistics.median(decode[b])
        rows.append((b, f"{med:,.0f}", f"{med / base:.2f}", " ".join(f"{r:,.0f}" for r in decode[b])))
    table(rows)
    del engines

    budgets = (128, 256)
    prefill_engines = {t: Engine.from_params(params, m, max_seqs=8, token_budget=t, max_seq_len=512) for t in budgets}
    for engine in prefill_engines.values():
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
    ttft = {t: [] for t in budgets}
    for _ in range(args.repeats):
        for t, engine in prefill_engines.items():
            ttft[t].append(time_to_first_token(engine, args.prompt_len, rng))
    print(f"\nPart 2: prefill of one {args.prompt_len}-token prompt (max_tokens 1)")
    rows = [("token budget", "passes", "TTFT ms", "prefill tok/s", "repeats (ms)")]
    for t in budgets:
        med = statistics.median(ttft[t])
        rows.append((t, -(-args.prompt_len // t), f"{med * 1e3:.0f}", f"{args.prompt_len / med:,.0f}",
                     " ".join(f"{x * 1e3:.0f}" for x in ttft[t])))
    table(rows)
    del prefill_engines

    print(f"\nPart 3: zjax serve (max_seqs 8, token_budget 64) under Poisson arrivals, {args.requests} requests "
          "per rate, 48-byte prompts, max_tokens 32, greedy")
    text = Path(os.__file__).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_checkpoint(cfg, model, out)
        rows = [("rate req/s", "p50 latency s", "p95 latency s", "throughput tok/s", "completed")]
        with ServeProcess(out) as url:
            post(url, "warm-up", 4)  # compiles the pass
            for rate in [float(r) for r in args.rates.split(",")]:
                latencies, tokens, wall = poisson_load(url, rate, args.requests, text, rng)
                rows.append((f"{rate:g}", f"{np.percentile(latencies, 50):.2f}", f"{np.percentile(latencies, 95):.2f}",
                             f"{tokens / wall:,.0f}", f"{len(latencies)}/{args.requests}"))
        table(rows)
    return 0


def decode_rate(engine: Engine, batch: int, rng) -> float:
    """Decode tokens/s of ``batch`` sequences: the passes after every request has its first token."""
    ids = [engine.add_request(rng.integers(0, 256, 16).tolist(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
           for _ in range(batch)]
    started, passes, start = set(), 0, None
    while engine.has_unfinished():
        outputs = engine.step()
        if start is not None:
            passes += 1
            if any(o.finished for o in outputs):
                break
        started.update(o.request_id for o in outputs)
        if start is None and len(started) == batch:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    for request_id in ids:
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    return batch * passes / elapsed


def time_to_first_token(engine: Engine, prompt_len: int, rng) -> float:
    start = time.perf_counter()
    engine.add_request(rng.integers(0, 256, prompt_len).tolist(), SamplingParams(max_tokens=1, temperature=0.0))
    while not engine.step():
        pass
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    return elapsed


def save_checkpoint(cfg, model, out: Path) -> None:
    """``out`` as a training run leaves it: checkpoints/ and config.yaml."""
    cfg = zjax.load_config(str(CONFIG), OVERRIDES + [f"output_dir={out}"])
    state = zjax.make_train_step(cfg, gpt_loss, model=model, devices=jax.devices()[:1]).init()
    saver = Checkpointer(out / "checkpoints")
    saver.save(0, state, config=cfg)
    saver.close()
    (out / "config.yaml").write_text(cfg.to_yaml())


class ServeProcess:
    """``zjax serve OUT --port 0`` in a subprocess; the context value is its base URL; SIGTERM on exit."""

    def __init__(self, out: Path):
        self.cmd = [sys.executable, "-m", "zjax", "serve", str(out), "--port", "0", "--max-seqs", "8",
                    "--max-seq-len", "128"]

    def __enter__(self) -> str:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.time() + 300
        for line in self.proc.stdout:
            found = re.search(r"on (http://\S+)/v1", line)
            if found:
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return found.group(1)
            if time.time() > deadline:
                break
        self.proc.kill()
        raise RuntimeError(f"{' '.join(self.cmd)} did not start serving")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def post(url: str, prompt: str, max_tokens: int) -> int:
    """One completion; returns its completion tokens."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["usage"]["completion_tokens"]


def poisson_load(url: str, rate: float, n: int, text: str, rng):
    """(latencies s, completion tokens, wall s) of ``n`` requests arriving at ``rate`` per second."""
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    offsets = rng.integers(0, len(text) - 48, n)
    latencies, tokens, ends = [], [], []
    lock = threading.Lock()
    start = time.perf_counter()

    def client(k):
        time.sleep(max(0.0, start + arrivals[k] - time.perf_counter()))
        got = post(url, text[offsets[k]:offsets[k] + 48], 32)
        end = time.perf_counter()
        with lock:
            latencies.append(end - start - arrivals[k])
            tokens.append(got)
            ends.append(end)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(latencies), sum(tokens), max(ends) - start - arrivals[0]


def table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    sys.exit(main())
