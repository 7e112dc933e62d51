"""Pipeline parallelism over the ``stage`` mesh axis: schedules as tables, one executor.

A model's ``scan_layers`` stack is split into ``V·P`` contiguous chunks, chunk ``v·P + s`` on
stage ``s`` (the rule ``layers: stage``; ``V = pipeline.repeats``, 1 but for the interleaved
schedule, where the state keeps the stack in *stage order* so that each stage's rows are its
chunks: ``zero.to_stage_order``). A *schedule* is a table (``make_schedule``): at tick ``t``
stage ``s`` runs the forward of micro-batch ``forward[t, s]`` (of its chunk
``forward_chunk[t, s]``) and then the backward of micro-batch ``backward[t, s]`` (``-1``:
none). Three are built:

- ``gpipe``: all forwards, then all backwards; a stage keeps the inputs of all ``M``
  micro-batches until their backward.
- ``1f1b`` (DeepSpeed's and PipeDream-flush's): after the warm-up, each tick one forward
  and one backward; stage ``s`` > 0 keeps at most ``2(P - s) - 1`` micro-batches' inputs (the first
  stage recomputes its input from the batch),
  whatever ``M`` is (DeepSpeed's asynchronous engine keeps ``P - s``; in lock-step ticks a
  micro-batch's round trip to the last stage and back takes ``2(P - 1 - s)`` ticks).
- ``interleaved`` (Megatron's interleaved 1F1B): 1F1B over ``V·P`` chunks of ``1/V`` of a
  stage's layers each, micro-batches in groups of ``P``; activations go round a ring of
  stages ``V`` times.

GPipe and 1F1B idle ``(P - 1) / (M + P - 1)`` of the time, interleaved ``(P - 1) / (V·M + P - 1)``
(``Schedule.idle_fraction`` counts it from the table).

``pipeline_grads`` runs a table inside a ``shard_map`` manual over ``stage`` (each device
runs its own stage's program, with real conditionals: a stage with nothing to do at a tick
does nothing). The model is not split by hand: the user's loss is traced per slot with a
hook in ``scan_layers`` that (a) on the model's first chunk keeps the layers' input (the
embedding), elsewhere replaces it by the activation received from the previous chunk,
(b) runs only the slot's chunk of the stack, and (c) on all but the model's last chunk stops
the loss there, returning the chunk's output; on the last chunk the loss runs to the end and
is differentiated at once. Each forward slot keeps only its input; the backward slot
recomputes the chunk from it (a checkpoint per chunk, as DeepSpeed's pipeline with
activation checkpointing). One collective-permute sends a micro-batch's activation to the
next chunk per tick that has a forward, one sends its gradient back per tick that has a
backward; no parameter crosses a stage boundary. Gradients of the parameters outside the
stack (embedding on the first stage, head on the last, both for a tied embedding) are
summed over the stages once per call. ZeRO's collectives over ``data`` run inside the
stage's program, so every ZeRO stage composes (each stage reduce-scatters its own chunk's
gradients per micro-batch at ZeRO-2/3).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from zjax.errors import ConfigError

STAGE = "stage"
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def stage_axis() -> tuple[str, int] | None:
    """``("stage", P)`` when the current mesh splits layers over a ``stage`` axis of size P > 1
    that is not manual yet, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or STAGE not in mesh.shape or mesh.shape[STAGE] == 1 or STAGE in mesh.manual_axes:
        return None
    return STAGE, mesh.shape[STAGE]


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The idle fraction of a pipeline's ticks: ``(P - 1) / (V·M + P - 1)`` (GPipe and 1F1B
    with V = 1; interleaved 1F1B with V virtual stages per device).

    Example:
      >>> round(bubble_fraction(4, 8), 4)
      0.2727
    """
    return (stages - 1) / (repeats * microbatches + stages - 1)


# --- schedules ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A pipeline schedule as tables over ``[ticks, stages]``.

    Attributes:
      name: ``gpipe``, ``1f1b`` or ``interleaved``.
      stages, microbatches, repeats: ``P``, ``M`` and ``V`` (virtual stages per device; 1 but for
        ``interleaved``).
      forward, backward: the micro-batch whose forward (backward) a stage runs at a tick, -1 none.
      forward_chunk, backward_chunk: which of the stage's ``V`` chunks that forward (backward)
        runs (chunk ``v`` of stage ``s`` is the model's ``v·P + s``-th of ``V·P``), 0 when none.
      write, read: the stash slot a forward stores its input in, and a backward reads it from
        (-1: none; the model's first chunk recomputes its input from the batch).
      slots: stash slots a stage needs (the most chunk inputs it keeps at once).
    """

    name: str
    stages: int
    microbatches: int
    forward: np.ndarray
    backward: np.ndarray
    write: np.ndarray
    read: np.ndarray
    slots: int
    repeats: int = 1
    forward_chunk: np.ndarray | None = None
    backward_chunk: np.ndarray | None = None

    @property
    def ticks(self) -> int:
        return self.forward.shape[0]

    def in_flight(self) -> list[int]:
        """Per stage, the most chunk inputs it keeps at once (between a micro-batch's forward and
        its backward; the model's first chunk keeps none: it recomputes its input)."""
        out = []
        for s in range(self.stages):
            held, most = 0, 0
            for t in range(self.ticks):
                held += int(self.write[t, s] >= 0)
                most = max(most, held)
                held -= int(self.read[t, s] >= 0)
            out.append(most)
        return out

    def idle_fraction(self, forward_cost: float = 1.0, backward_cost: float = 2.0) -> float:
        """The idle fraction counted from the table: each tick lasts as long as its slowest stage
        (a chunk's forward costs ``forward_cost / V``, its backward ``backward_cost / V``), and the
        work done is every stage's M forwards and M backwards of its whole share of layers."""
        cost = ((self.forward >= 0) * forward_cost + (self.backward >= 0) * backward_cost) / self.repeats
        elapsed = float(cost.max(axis=1).sum())
        return 1.0 - self.microbatches * (forward_cost + backward_cost) / elapsed

    def sends(self) -> tuple[np.ndarray, np.ndarray]:
        """Per tick, whether some stage sends an activation to the next chunk (any forward but of
        the model's last chunk) and whether some stage sends a gradient to the previous chunk."""
        chunks = self.repeats * self.stages
        fc = self.forward_chunk * self.stages + np.arange(self.stages)[None, :]
        bc = self.backward_chunk * self.stages + np.arange(self.stages)[None, :]
        return (((self.forward >= 0) & (fc < chunks - 1)).any(axis=1),
                ((self.backward >= 0) & (bc > 0)).any(axis=1))


def make_schedule(name: str, stages: int, microbatches: int, repeats: int = 1) -> Schedule:
    """The table of ``name`` (``gpipe`` | ``1f1b`` | ``interleaved``) for ``stages`` stages,
    ``microbatches`` and ``repeats`` virtual stages per device (interleaved only).

    The model's stack is cut into ``C = V·P`` chunks, chunk ``c`` on stage ``c mod P``. A
    micro-batch's activation reaches the next chunk by the next tick and its gradient the
    previous chunk by the next tick (no queues): forward ``F(m, c) = F0(m) + c``; backward
    ``B(m, c) = (M + P - 1) + m + (P - 1 - c)`` (GPipe) or ``F0(m) + 2(C - 1) - c`` (1F1B and
    interleaved; the last chunk's in the same tick as its forward). ``F0(m) = m``, but for
    interleaved, which runs micro-batches in groups of P: ``F0(m) = (m mod P) + ⌊m / P⌋·V·P``
    (Megatron's interleaved 1F1B; M must be a multiple of P). Idle fraction: (P-1)/(V·M+P-1).

    Example:
      >>> s = make_schedule("1f1b", 4, 16)
      >>> s.in_flight(), round(s.idle_fraction(), 4)
      ([0, 5, 3, 1], 0.1579)
      >>> round(make_schedule("interleaved", 4, 16, repeats=2).idle_fraction(), 4)
      0.0857
    """
    if name not in SCHEDULES:
        raise ConfigError(f"pipeline.schedule={name!r} is not a schedule; use one of {', '.join(SCHEDULES)}")
    p, m, v = int(stages), int(microbatches), int(repeats)
    if p < 1 or m < 1 or v < 1:
        raise ConfigError(f"a pipeline needs stages, microbatches and repeats >= 1; got {p}, {m} and {v}")
    if name != "interleaved" and v != 1:
        raise ConfigError(f"pipeline.repeats={v} needs pipeline.schedule: interleaved (the {name} schedule runs one "
                          "chunk per stage); use repeats: 1 or schedule: interleaved")
    if name == "interleaved" and m % p:
        raise ConfigError(f"the interleaved schedule runs micro-batches in groups of mesh.stage={p}; "
                          f"pipeline.microbatches={m} is not a multiple of {p}")
    chunks = v * p
    mb = np.arange(m)[:, None]
    c = np.arange(chunks)[None, :]
    f0 = (mb % p) + (mb // p) * v * p if name == "interleaved" else mb
    f_at = f0 + c  # [M, C]
    if name == "gpipe":
        b_at = (m + p - 1) + mb + (p - 1 - c)
    else:
        b_at = f0 + 2 * (chunks - 1) - c
    ticks = int(b_at.max()) + 1
    forward = np.full((ticks, p), -1, np.int32)
    backward = np.full((ticks, p), -1, np.int32)
    f_chunk = np.zeros((ticks, p), np.int32)
    b_chunk = np.zeros((ticks, p), np.int32)
    for i in range(m):
        for cc in range(chunks):
            s, t_f, t_b = cc % p, f_at[i, cc], b_at[i, cc]
            assert forward[t_f, s] < 0 and backward[t_b, s] < 0, (name, i, cc)
            forward[t_f, s], f_chunk[t_f, s] = i, cc // p
            backward[t_b, s], b_chunk[t_b, s] = i, cc // p
    # stash slots, lowest free first; a backward frees its slot after the same tick's forward wrote
    write = np.full((ticks, p), -1, np.int32)
    read = np.full((ticks, p), -1, np.int32)
    slots = 0
    for s in range(p):
        free, where = list(range(m * v)), {}
        for t in range(ticks):
            if forward[t, s] >= 0 and (s, f_chunk[t, s]) != (0, 0):
                where[forward[t, s], f_chunk[t, s]] = write[t, s] = free.pop(0)
                slots = max(slots, write[t, s] + 1)
            if backward[t, s] >= 0 and (s, b_chunk[t, s]) != (0, 0):
                read[t, s] = where.pop((backward[t, s], b_chunk[t, s]))
                free = sorted(free + [read[t, s]])
    return Schedule(name, p, m, forward, backward, write, read, slots, v, f_chunk, b_chunk)


# --- the hook in scan_layers ---------------------------------------------------------------


class _Carry(Exception):
    def __init__(self, carry):
        super().__init__("zjax pipeline probe (internal)")
        self.carry = carry


class _Output(Exception):
    def __init__(self, out):
        super().__init__("zjax pipeline stage output (internal)")
        self.out = out


@dataclasses.dataclass
class _Hook:
    """What ``scan_layers`` does inside a pipeline slot (``mode``: ``probe`` stops at the stack and
    reports its input; ``stage`` runs this stage's chunk and stops with its output; ``last`` runs
    the chunk and lets the loss finish)."""

    mode: str
    h: Any = None
    is_first: Any = None
    chunk: Any = None
    repeats: int = 1
    used: bool = False

    def run(self, body: Callable, carry: Any, stacked: Any) -> Any:
        if self.used:
            raise ConfigError("pipeline parallelism (mesh.stage > 1) needs the loss to call zjax.scan_layers "
                              "exactly once (the stack the stages split); this loss calls it more than once")
        self.used = True
        if not isinstance(carry, jax.Array):
            raise ConfigError("pipeline parallelism (mesh.stage > 1) needs scan_layers' carry to be one array (the "
                              "activations); got " + type(carry).__name__)
        if self.mode == "probe":
            raise _Carry(carry)
        h = self.h if self.is_first is None else jnp.where(self.is_first, carry, self.h.astype(carry.dtype))
        if self.repeats > 1:  # this stage holds V chunks (interleaved): run the slot's one
            rows = jax.tree.leaves(stacked)[0].shape[0] // self.repeats
            stacked = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, self.chunk * rows, rows, 0), stacked)
        out = lax.scan(body, h, stacked)[0]
        if self.mode == "stage":
            raise _Output(out)
        return out


_HOOK: contextvars.ContextVar[_Hook | None] = contextvars.ContextVar("zjax_pipeline_hook", default=None)


def current_hook() -> _Hook | None:
    """The pipeline slot ``scan_layers`` runs in, or None."""
    return _HOOK.get()


@contextlib.contextmanager
def _hooked(hook: _Hook):
    token = _HOOK.set(hook)
    try:
        yield hook
    finally:
        _HOOK.reset(token)


def _never_called() -> ConfigError:
    return ConfigError("pipeline parallelism (mesh.stage > 1) splits the stack the loss passes through "
                       "zjax.scan_layers; this loss never calls scan_layers (a Python loop over blocks or a "
                       "Linen/NNX scan cannot be split into stages yet)")


def _probe(loss_of, *args):
    with _hooked(_Hook("probe")):
        try:
            loss_of(*args)
        except _Carry as found:
            return found.carry
    raise _never_called()


def _stage_output(loss_of, h, is_first, chunk, repeats, *args):
    with _hooked(_Hook("stage", h, is_first, chunk, repeats)):
        try:
            loss_of(*args)
        except _Output as found:
            return found.out
    raise _never_called()


def _last_loss(loss_of, h, repeats, *args):
    with _hooked(_Hook("last", h, None, repeats - 1, repeats)) as hook:
        out = loss_of(*args)
    if not hook.used:
        raise _never_called()
    return out


# --- the executor ----------------------------------------------------------------------------


def stage_specs(layouts: Any) -> Any:
    """Per leaf of a layout tree (``None`` holes kept), its split over ``stage``: ``P("stage")``
    for a stack split into stage chunks, else ``P()``."""
    from zjax.parallel import zero

    return zero.map_layouts(lambda lay: None if lay is None else P(STAGE) if lay.lead_axis == STAGE else P(),
                            layouts)


def _select(batch: Any, microbatches: int, m: jax.Array) -> Any:
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, m, keepdims=False), batch)


def _micro(batch: Any, m: int, what: str) -> Any:
    rows = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(rows) != 1 or next(iter(rows)) % m:
        raise ConfigError(f"pipeline.microbatches={m} does not divide the {sorted(rows)} rows a device holds{what}; "
                          "use a divisor of it")
    return jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), batch)


def _neighbours(schedule: Schedule) -> tuple[list, list]:
    """The ``ppermute`` pairs to the next and the previous chunk: a line over the stages, a ring
    when a stage holds several chunks (the last stage's chunk ``v`` feeds the first's ``v + 1``)."""
    p = schedule.stages
    ring = schedule.repeats > 1
    to_next = [(s, (s + 1) % p) for s in range(p if ring else p - 1)]
    to_prev = [((s + 1) % p, s) for s in range(p if ring else p - 1)]
    return to_next, to_prev


def pipeline_grads(loss_of: Callable, diff: Any, extra: Any, batch: Any, key: jax.Array, *, schedule: Schedule,
                   diff_specs: Any, extra_specs: Any, seed: jax.Array, accum_dtype=jnp.float32):
    """Runs ``schedule`` over the ``stage`` axis: the gradient of ``seed * sum_m lw_m`` with respect
    to ``diff``, ``sum_m lw_m``, ``sum_m w_m`` and ``sum_m extras_m``, where ``(lw_m, w_m, extras_m) =
    loss_of(diff, extra, mb_m, key_m)`` (``extras``: a dict of float32 scalars, possibly empty) for
    the ``M`` micro-batches ``mb_m`` of ``batch`` (rows split evenly) and ``key_m = fold_in(key, m)``.

    ``loss_of`` must pass its layer stack through ``zjax.scan_layers`` once, with one array as the
    carry. ``diff_specs``/``extra_specs``: ``stage_specs`` of ``diff``/``extra`` (a stack split over
    ``stage`` arrives as this stage's rows; with ``V`` repeats they are its ``V`` chunks in order,
    see ``zjax.parallel.zero.to_stage_order``). Call inside a trace where ``stage`` is an automatic
    mesh axis (the step calls it inside its ``shard_map`` over ``data``).
    """
    p, m, v = schedule.stages, schedule.microbatches, schedule.repeats
    micro = _micro(batch, m, " per micro-step")
    fields = (schedule.forward, schedule.backward, schedule.forward_chunk, schedule.backward_chunk,
              schedule.write, schedule.read)
    tables = jnp.asarray(np.stack(fields, -1))
    sends_f, sends_b = (jnp.asarray(x) for x in schedule.sends())
    to_next, to_prev = _neighbours(schedule)

    def program(diff, extra, micro, key, seed):
        s = lax.axis_index(STAGE)
        first, last = s == 0, s == p - 1

        def args(mb_index):
            return _select(micro, m, mb_index), jax.random.fold_in(key, mb_index)

        mb0, k0 = args(jnp.int32(0))
        carry = _probe(loss_of, diff, extra, mb0, k0)
        zeros_h = jnp.zeros(carry.shape, carry.dtype)

        def stage_out(d, h, chunk, mb, k):
            return _stage_output(loss_of, h, first & (chunk == 0), chunk, v, d, extra, mb, k)

        # the loss's extra scalars, computed on the last stage
        zeros_x = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                               jax.eval_shape(lambda: _last_loss(loss_of, zeros_h, v, diff, extra, mb0, k0)[2]))

        def forward(mb_index, chunk, h_recv):
            mb, k = args(mb_index)
            return stage_out(diff, h_recv, chunk, mb, k)

        def back_stage(mb_index, chunk, h_in, ct):
            mb, k = args(mb_index)
            _, vjp = jax.vjp(lambda d, h: stage_out(d, h, chunk, mb, k), diff, h_in)
            gd, gh = vjp(ct.astype(carry.dtype))
            return gd, gh, jnp.float32(0), jnp.float32(0), zeros_x

        def back_last(mb_index, chunk, h_in, ct):
            mb, k = args(mb_index)

            def scaled(d, h):
                lw, w, extras = _last_loss(loss_of, h, v, d, extra, mb, k)
                return lw * seed, (lw, w, extras)

            (_, (lw, w, extras)), (gd, gh) = jax.value_and_grad(scaled, argnums=(0, 1), has_aux=True)(diff, h_in)
            return gd, gh, lw.astype(jnp.float32), jnp.asarray(w, jnp.float32), extras

        def idle(mb_index, chunk, h_in, ct):
            return jax.tree.map(jnp.zeros_like, diff), zeros_h, jnp.float32(0), jnp.float32(0), zeros_x

        def tick(state, t):
            h_recv, ct_recv, stash, acc, lw_sum, w_sum, x_sum = state
            f_mb, b_mb, f_v, b_v, write, read = (tables[t, s, i] for i in range(6))
            # the model's last chunk runs its forward inside its backward, in the same tick
            h_out = lax.cond((f_mb >= 0) & ~(last & (f_v == v - 1)), forward, lambda i, c, h: zeros_h,
                             f_mb, f_v, h_recv)
            # the input is kept until the backward (slot `slots` is scratch for ticks that keep none)
            stash = lax.dynamic_update_index_in_dim(stash, h_recv, jnp.where(write >= 0, write, schedule.slots), 0)
            h_in = lax.dynamic_index_in_dim(stash, jnp.maximum(read, 0), keepdims=False)
            kind = jnp.where(b_mb < 0, 0, jnp.where(last & (b_v == v - 1), 2, 1))
            gd, gh, lw, w, extras = lax.switch(kind, (idle, back_stage, back_last), b_mb, b_v, h_in, ct_recv)
            acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, gd)
            h_next = lax.cond(sends_f[t], lambda x: lax.ppermute(x, STAGE, to_next), jnp.zeros_like, h_out)
            ct_next = lax.cond(sends_b[t], lambda x: lax.ppermute(x, STAGE, to_prev), jnp.zeros_like, gh)
            return (h_next, ct_next, stash, acc, lw_sum + lw, w_sum + w, jax.tree.map(jnp.add, x_sum, extras)), None

        stash = jnp.zeros((schedule.slots + 1,) + carry.shape, carry.dtype)
        acc = jax.tree.map(lambda x: jnp.zeros(x.shape, accum_dtype), diff)
        state = (zeros_h, zeros_h, stash, acc, jnp.float32(0), jnp.float32(0), zeros_x)
        (_, _, _, acc, lw_sum, w_sum, x_sum), _ = lax.scan(tick, state, jnp.arange(schedule.ticks))
        # what lives outside the stack (embedding, head) is summed over the stages that used it
        acc = jax.tree.map(lambda g, spec: g if spec == P(STAGE) else lax.psum(g, STAGE), acc, diff_specs)
        return acc, lax.psum(lw_sum, STAGE), lax.psum(w_sum, STAGE), lax.psum(x_sum, STAGE)

    run = jax.shard_map(program, mesh=jax.sharding.get_abstract_mesh(),
                        in_specs=(diff_specs, extra_specs, P(), P(), P()), out_specs=(diff_specs, P(), P(), P()),
                        axis_names={STAGE}, check_vma=False)
    return run(diff, extra, micro, key, jnp.asarray(seed, jnp.float32))


def pipeline_loss(loss_of: Callable, diff: Any, extra: Any, batch: Any, key: jax.Array, *, schedule: Schedule,
                  diff_specs: Any, extra_specs: Any):
    """``(sum_m lw_m, sum_m w_m, sum_m extras_m)`` as ``pipeline_grads`` defines them, forwards only (evaluation):
    each micro-batch passes the chunks in ``schedule``'s forward order; the last chunk computes its loss."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.repeats
    micro = _micro(batch, m, "")
    fwd = schedule.forward.copy()
    ticks = int(np.nonzero((fwd >= 0).any(axis=1))[0].max()) + 1  # the last forward's tick
    tables = jnp.asarray(np.stack([fwd[:ticks], schedule.forward_chunk[:ticks]], -1))
    to_next, _ = _neighbours(schedule)

    def program(diff, extra, micro, key):
        s = lax.axis_index(STAGE)
        first, last = s == 0, s == p - 1

        def args(mb_index):
            return _select(micro, m, mb_index), jax.random.fold_in(key, mb_index)

        carry = _probe(loss_of, diff, extra, *args(jnp.int32(0)))
        zeros_h = jnp.zeros(carry.shape, carry.dtype)
        zeros_x = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
            lambda: _last_loss(loss_of, zeros_h, v, diff, extra, *args(jnp.int32(0)))[2]))
        nothing = (jnp.float32(0), jnp.float32(0), zeros_x)

        def forward(mb_index, chunk, h):
            return _stage_output(loss_of, h, first & (chunk == 0), chunk, v, diff, extra, *args(mb_index)), *nothing

        def finish(mb_index, chunk, h):
            lw, w, extras = _last_loss(loss_of, h, v, diff, extra, *args(mb_index))
            return zeros_h, lw.astype(jnp.float32), jnp.asarray(w, jnp.float32), extras

        def tick(state, t):
            h_recv, sums = state
            mb_index, chunk = tables[t, s, 0], tables[t, s, 1]
            kind = jnp.where(mb_index < 0, 0, jnp.where(last & (chunk == v - 1), 2, 1))
            h_out, *got = lax.switch(kind, (lambda i, c, h: (zeros_h, *nothing), forward, finish),
                                     jnp.maximum(mb_index, 0), chunk, h_recv)
            return (lax.ppermute(h_out, STAGE, to_next), jax.tree.map(jnp.add, sums, tuple(got))), None

        (_, sums), _ = lax.scan(tick, (zeros_h, nothing), jnp.arange(ticks))
        return lax.psum(sums, STAGE)

    run = jax.shard_map(program, mesh=jax.sharding.get_abstract_mesh(), in_specs=(diff_specs, extra_specs, P(), P()),
                        out_specs=P(), axis_names={STAGE}, check_vma=False)
    return run(diff, extra, micro, key)
