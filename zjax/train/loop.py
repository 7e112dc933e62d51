"""``train_run``: the training loop behind ``zjax train`` — the reference GPT on the config's data.

Fetching metrics from the device waits for the step, so the loop only does it every
``log_every`` steps: the device metrics of the steps in between are kept and written
together, and the wall time between two fetches gives their tokens per second.

At most two evaluation batches are in flight. They all read the same state, so nothing
orders them: XLA:CPU runs every queued batch's per-device shares at once on one shared
thread pool, a collective holds its thread until all devices of its program arrive, and
with dozens queued the threads can all wait in different programs' collectives until XLA
aborts the process after 40 s ("Expected 8 threads to join the rendezvous"). Training
steps are chained through the state and cannot overlap that way; they are held to two
in flight so that a signal finds at most one more step queued.

From the start of ``train_run`` to its return, SIGTERM and SIGINT only set a flag: the
loop stops dispatching steps, cuts an evaluation short, saves the newest step and
returns (a signal before the first step saves nothing). Tests pick the moment with
``ZJAX_TEST_SIGNAL_AT`` (see ``_SignalAt``).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from zjax.checkpoint import Checkpointer
from zjax.config.schema import Config
from zjax.errors import ConfigError
from zjax.compression.distill import gpt_setup
from zjax.models.gpt import count_params, make_gpt
from zjax.data.loader import make_loader, shift_tokens, token_datasets
from zjax.train.step import METRICS, make_train_step

# Enough text for a demo while keeping start-up to a few seconds.
MAX_CORPUS_BYTES = 8_000_000
SIGNAL_AT_VAR = "ZJAX_TEST_SIGNAL_AT"


def train_run(cfg: Config) -> dict:
    """Trains the reference GPT on the config's data and reports validation loss.

    Args:
      cfg: a validated ``Config`` (see ``load_config``).

    Returns:
      ``{"params", "steps", "val_loss_start", "val_loss_end", "tokens_per_s"}``, where
      ``tokens_per_s`` is the mean after the first step (which includes compilation);
      ``{"params", "steps", "stopped"}`` when a signal stopped the run.
    """
    stop = _StopSignal()
    try:
        return _train(cfg, stop, _SignalAt(os.environ.get(SIGNAL_AT_VAR, "")))
    finally:
        stop.restore()


def _train(cfg: Config, stop: _StopSignal, signal_at: _SignalAt) -> dict:
    started = time.perf_counter()
    signal_at("start")
    if cfg.output_dir is not None:
        _make_output_dir(Path(cfg.output_dir))
    model = make_gpt(cfg.model, seed=cfg.seed, kernels=cfg.kernels)
    datasets = token_datasets(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.seed, max_bytes=MAX_CORPUS_BYTES)
    # compression: layer reduction starts from teacher layers; distillation trains beside a frozen teacher
    setup = gpt_setup(cfg, model)
    train = make_train_step(cfg, setup["loss_fn"], model=setup["model"], trainable=setup["trainable"],
                            eval_loss_fn=setup["eval_loss_fn"])
    batch_size = train.global_batch_size
    tokens_per_step = batch_size * cfg.data.seq_len
    params = count_params(cfg.model)

    lead = jax.process_index() == 0
    ckpt = _checkpointer(cfg)
    start = 0
    # Each process reads only its rows of every global batch (zjax.data.loader).
    loader = make_loader(datasets["train"], batch_size, seed=cfg.seed, prefetch=cfg.data.prefetch)
    if ckpt is not None and ckpt.latest_step() is not None:
        state, extra = ckpt.restore(train)
        start = int(extra["step"])
        # The saved iterator state is checked against this run's data, seed and batch size.
        loader.restore(extra.get("data", {**loader.state(), "next_batch": start}))
        if lead:
            print(f"resumed from step {start} of {ckpt.directory}")
    else:
        state = train.init()
    if start >= cfg.steps:
        print(f"{ckpt.directory} already holds step {start}; raise steps to train further")
        return {"params": params, "steps": start}
    log = _MetricsLog(cfg, keep_through=start)
    val = make_loader(datasets["val"], batch_size, shuffle=False, prefetch=0)
    # under sequence parallelism each device receives only its part of every row: inputs and
    # targets shifted on the host so that they split alike
    shift = shift_tokens if train.sequence_size > 1 else (lambda rows: rows)
    val_batches = [val.global_batch(shift(val.local_batch(k)), train.batch_sharding_for)
                   for k in range(cfg.eval_batches)]

    def evaluate(state, step: int) -> float | None:
        """The mean validation loss, or None when a signal cut the evaluation short."""
        signal_at("eval")
        losses = []
        for batch in val_batches:
            if _agree(stop.seen is not None)[0]:
                return None
            losses.append(train.evaluate(state, batch))
            if len(losses) >= 2:
                losses[-2].block_until_ready()  # unordered programs deadlock XLA:CPU (module docstring)
        loss = float(np.mean(jax.device_get(losses)))
        log.write({"step": step, "val_loss": loss})
        return loss

    def save(state, step: int) -> None:
        if ckpt is not None:
            ckpt.save(step, state, extra={"step": step, "data": loader.state()}, config=cfg)
            signal_at("save")

    pending: list[dict] = []
    timed_tokens, timed_seconds = 0, 0.0

    def flush(step: int) -> None:
        """Fetches the pending steps' metrics and writes them with their tokens per second."""
        nonlocal pending, timed_tokens, timed_seconds, since
        if not pending:
            return
        host = jax.device_get(pending)
        seconds = time.perf_counter() - since
        rate = len(host) * tokens_per_step / seconds
        if step > start + 1:
            timed_tokens += len(host) * tokens_per_step
            timed_seconds += seconds
        for i, m in enumerate(host):
            # the step's metrics, then any extra scalars the loss reported (e.g. moe_dropped_fraction)
            log.write({"step": step - len(host) + 1 + i, **{key: _number(m[key]) for key in METRICS},
                       **{key: _number(v) for key, v in m.items() if key not in METRICS}, "tokens_per_s": rate})
        bar.set_postfix(loss=f"{float(host[-1]['loss']):.3f}", tok_s=f"{rate:,.0f}")
        pending = []
        since = time.perf_counter()

    stopping = _agree(stop.seen is not None)[0]
    val_loss_start = None
    if start == 0 and not stopping:
        val_loss_start = evaluate(state, 0)
        stopping = val_loss_start is None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not lead)
    since = time.perf_counter()
    step = start
    while step < cfg.steps and not stopping:
        state, metrics = train(state, loader.global_batch(shift(next(loader)), train.batch_sharding_for))
        step += 1
        pending.append(metrics)
        if len(pending) >= 2:
            jax.block_until_ready(pending[-2])  # a signal finds at most one more step queued
        bar.update(1)
        eval_now = cfg.eval_every > 0 and step % cfg.eval_every == 0 and step != cfg.steps
        save_due = ckpt is not None and ckpt.should_save(step) and step != cfg.steps
        # The first step is fetched on its own so compilation stays out of the later rates.
        if step == start + 1 or step % cfg.log_every == 0 or step == cfg.steps or eval_now or save_due:
            signal_at("step")
            flush(step)
        # After the fetch, so a signal that came while this step ran stops here, not a step later.
        # Every process must take the same branch: a signal or a timed save seen by one is done by all.
        stopping, save_now = _agree(stop.seen is not None, save_due)
        if eval_now and not stopping:
            val_loss = evaluate(state, step)
            stopping = val_loss is None
            if not stopping:
                bar.write(f"step {step}: val_loss {val_loss:.4f}")
        if save_now or stopping:
            flush(step)
            save(state, step)
        if eval_now or save_now:
            since = time.perf_counter()  # evaluation and saving stay out of the tokens per second
    bar.close()
    loader.close()
    val_loss_end = None
    if not stopping:
        val_loss_end = evaluate(state, step)
        stopping = val_loss_end is None
        save(state, step)
    if ckpt is not None:
        ckpt.close()
    log.close()
    if stopping:
        reason = stop.seen or "a signal to another process"
        if step > start:
            where = ckpt.directory if ckpt is not None else "nowhere (no output_dir)"
            what = f"after step {step}; saved to {where}"
        elif start == 0:
            what = "before the first step; nothing to save"
        else:
            what = f"before step {start + 1}; step {start} is saved in {ckpt.directory}"
        if lead:
            print(f"stopped by {reason} {what}")
        return {"params": params, "steps": step, "stopped": reason}

    summary = {
        "params": params,
        "steps": cfg.steps,
        "val_loss_start": val_loss_start,
        "val_loss_end": val_loss_end,
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else float("nan"),
    }
    if lead:
        print(
            f"{params:,} params, {cfg.steps} steps on {train.data_size} devices (ZeRO-{cfg.zero.stage}, "
            f"{cfg.precision.compute_dtype}): val loss {_fmt(val_loss_start)} -> {val_loss_end:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s after step 1, {time.perf_counter() - started:.1f} s wall"
        )
        if stop.seen:
            print(f"{stop.seen} came after the last step; the run had finished")
    return summary


def _agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true in any process (one small host all-gather per call)."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    seen = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return tuple(bool(x) for x in np.asarray(seen).reshape(-1, len(flags)).any(axis=0))


def _checkpointer(cfg: Config) -> Checkpointer | None:
    if cfg.output_dir is None:
        return None
    c = cfg.checkpoints
    return Checkpointer(Path(cfg.output_dir) / "checkpoints", keep=c.keep, every_steps=c.every_steps,
                        every_seconds=c.every_seconds)


def _make_output_dir(out: Path) -> None:
    """Creates ``output_dir``; a path that cannot be a directory is a ``ConfigError``, not a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = "is an existing file" if out.is_file() else f"cannot be created ({err.strerror})"
        raise ConfigError(
            f"output_dir={str(out)!r} {why}; output_dir must be a directory (created if missing) "
            "for checkpoints, metrics.jsonl and config.yaml"
        ) from None


class _StopSignal:
    """Turns SIGTERM and SIGINT into a flag until ``restore``: the loop stops at a step boundary and saves."""

    def __init__(self):
        self.seen = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.seen = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _SignalAt:
    """Test hook: ``ZJAX_TEST_SIGNAL_AT=PHASE:N:SIGNAL`` sends SIGNAL to this process the N-th time
    the run reaches PHASE, so a test can signal at an exact moment. Phases: ``start`` (before
    data, model and restore), ``step`` (waiting for a step's metrics), ``eval`` (an evaluation
    begins), ``save`` (a save has started). Unset, it does nothing.
    """

    def __init__(self, spec: str):
        self.phase, count, name = spec.split(":") if spec else (None, "0", "SIGTERM")
        self.left = int(count)
        self.signal = signal.Signals[name]

    def __call__(self, phase: str) -> None:
        if phase == self.phase:
            self.left -= 1
            if self.left == 0:
                os.kill(os.getpid(), self.signal)


def _fmt(x) -> str:
    return "(resumed)" if x is None else f"{x:.4f}"


class _MetricsLog:
    """``config.yaml`` and ``metrics.jsonl`` in ``cfg.output_dir``; nothing when it is unset.

    A resumed run keeps the lines up to the step it resumes from and appends after
    them, so an interrupted-and-resumed run's file reads like one uninterrupted run.
    """

    def __init__(self, cfg: Config, keep_through: int = 0):
        self.file = None
        if cfg.output_dir is None or jax.process_index() != 0:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        path = out / "metrics.jsonl"
        kept = []
        if keep_through and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if record["step"] <= keep_through:
                    kept.append(line)
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in kept)
        self.file.flush()

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _number(x) -> int | float:
    x = np.asarray(x)
    return int(x) if np.issubdtype(x.dtype, np.integer) else float(x)
