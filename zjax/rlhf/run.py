"""``zjax rlhf sft|reward|dpo|ppo|grpo CONFIG``: DeepSpeed-Chat's three steps and DPO/GRPO from JSONL.

Each stage is a run: ``output_dir`` holds ``config.yaml``, ``metrics.jsonl`` and checkpoints,
and is the next stage's source (``rlhf.actor`` = the sft or dpo run, ``rlhf.reward_model`` = the
reward run). The data are JSONL files (``rlhf.data``, ``rlhf.eval_data``): ``{"prompt",
"response"}`` for sft (``"chosen"`` is read when there is no ``"response"``), ``{"prompt",
"chosen", "rejected"}`` for reward and dpo, ``{"prompt"}`` for ppo and grpo; text is tokenized
with ``rlhf.tokenizer`` (a ``tokenizer.json`` directory) or as UTF-8 bytes.

- ``sft``: a GPT on prompt + response rows (``preference.sft_loss``); ``zjax generate`` serves
  the run.
- ``reward``: a ``ValueModel`` (the GPT's trunk from ``rlhf.actor`` when given, a scalar head)
  on preference pairs; eval reports held-out ``accuracy``.
- ``dpo``: the policy from ``rlhf.actor`` against its frozen copy.
- ``ppo``: actor (from ``rlhf.actor``), critic (from ``rlhf.critic``, else the reward model, as
  DeepSpeed-Chat starts it), frozen reference (the starting actor) and reward model
  (``rlhf.reward_model``) or a Python function (``rlhf.reward_fn``); the critic's config is
  this one with ``rlhf.critic_overrides`` (its own ZeRO stage, precision, optimizer).
  ``output_dir/actor`` and ``output_dir/critic`` are runs of their own (``zjax generate
  output_dir/actor``), ``output_dir/actor_ema`` the EMA when ``ppo.ema_decay`` is set.
- ``grpo``: the policy and its frozen reference, ``grpo.group_size`` samples per prompt.

``model.lora.rank > 0`` trains only the LoRA adapters (DeepSpeed-Chat's ``only_optimize_lora``);
generation runs on the fused weights. Batches are drawn from a fixed permutation per epoch of
the rows (``seed``), so a resumed run continues with the batches an uninterrupted one would
have seen; every model of a run is restored from the newest step all of them committed.
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from zjax.checkpoint import Checkpointer, intact_step, load_params
from zjax.config.schema import Config, load_config
from zjax.errors import ConfigError
from zjax.rlhf import ppo, preference

MODES = ("sft", "reward", "dpo", "ppo", "grpo")
_FIELDS = {"sft": ("prompt", "response"), "reward": ("prompt", "chosen", "rejected"),
           "dpo": ("prompt", "chosen", "rejected"), "ppo": ("prompt",), "grpo": ("prompt",)}


def rlhf_run(mode: str, cfg: Config) -> dict:
    """Runs one stage; returns a summary (the last metrics, steps)."""
    if mode not in MODES:
        raise ConfigError(f"zjax rlhf {mode!r}: use one of {', '.join(MODES)}")
    if cfg.rlhf.data is None:
        raise ConfigError(f"zjax rlhf {mode} reads rlhf.data, which is null; set rlhf.data to a JSONL file of "
                          f"{_describe(mode)}")
    tokenizer = _tokenizer(cfg)
    rows = read_jsonl(cfg.rlhf.data, mode, "rlhf.data")
    if mode in ("ppo", "grpo") and cfg.rlhf.reward_model is None and cfg.rlhf.reward_fn is None:
        raise ConfigError(f"zjax rlhf {mode} needs a score: set rlhf.reward_model (a `zjax rlhf reward` run) or "
                          "rlhf.reward_fn ('module:function')")
    eval_rows = read_jsonl(cfg.rlhf.eval_data, mode, "rlhf.eval_data") if cfg.rlhf.eval_data else None
    run = {"sft": _SupervisedRun, "reward": _SupervisedRun, "dpo": _SupervisedRun,
           "ppo": _RolloutRun, "grpo": _RolloutRun}[mode](mode, cfg, tokenizer, rows, eval_rows)
    return run.go()


def read_jsonl(path: str | Path, mode: str, key: str) -> list[dict]:
    """The rows of a JSONL file with the fields ``mode`` reads (strings); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is not a file; give a JSONL file of {_describe(mode)}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{key}={str(path)!r} line {number} is not JSON ({err})") from None
        if mode == "sft" and "response" not in record and "chosen" in record:
            record = {**record, "response": record["chosen"]}
        missing = [f for f in _FIELDS[mode] if not isinstance(record.get(f) if isinstance(record, dict) else None, str)]
        if missing:
            raise ConfigError(f"{key}={str(path)!r} line {number} has no string {missing[0]!r}; zjax rlhf {mode} "
                              f"reads {_describe(mode)}")
        rows.append(record)
    if not rows:
        raise ConfigError(f"{key}={str(path)!r} holds no rows; give a JSONL file of {_describe(mode)}")
    return rows


def _describe(mode: str) -> str:
    return "{" + ", ".join(f'"{f}": ...' for f in _FIELDS[mode]) + "} rows"


def _tokenizer(cfg: Config):
    from zjax.inference.tokenizer import ByteTokenizer, load_tokenizer

    if cfg.rlhf.tokenizer is None:
        if cfg.model.vocab_size < 256:
            raise ConfigError(f"rlhf.tokenizer is null (UTF-8 bytes, ids 0..255) but model.vocab_size="
                              f"{cfg.model.vocab_size}; set model.vocab_size >= 256 or give rlhf.tokenizer")
        return ByteTokenizer()
    return load_tokenizer(cfg.rlhf.tokenizer, cfg.model.vocab_size)


def _batches(n_rows: int, batch: int, seed: int, k: int) -> np.ndarray:
    """Row indices of batch ``k``: the stream of per-epoch permutations, cut into batches."""
    out, start = [], k * batch
    while len(out) < batch:
        epoch, offset = divmod(start, n_rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        take = perm[offset:offset + batch - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out)


def _source_params(run: str | None, what: str, model_cfg) -> Any:
    """The params of a run (its newest intact checkpoint), checked against ``model_cfg`` (LoRA
    aside: a LoRA policy starts from a plain sft run)."""
    if run is None:
        return None
    directory = Path(run)
    checkpoints = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    try:
        intact_step(checkpoints)
    except Exception as err:  # noqa: BLE001 - any unreadable source is the same user error
        raise ConfigError(f"{what}={run!r} holds no intact checkpoint ({err}); give the output_dir of a finished run") \
            from None
    source_cfg = directory / "config.yaml"
    if source_cfg.is_file():
        theirs = load_config(source_cfg).model.model_dump()
        ours = model_cfg.model_dump()
        differ = [k for k in ours if k != "lora" and ours[k] != theirs.get(k)]
        if differ:
            k = differ[0]
            raise ConfigError(f"{what}={run!r} holds a model with model.{k}={theirs.get(k)!r}; this config has "
                              f"model.{k}={ours[k]!r}; use the source's model block")
    return load_params(checkpoints)


def _with_lora(params: Any, model) -> Any:
    """``params`` (a plain GPT's, from a run) completed with ``model``'s fresh LoRA adapters."""
    fresh = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def merge(f, p):
        if isinstance(f, dict):
            return {k: merge(v, p[k]) if isinstance(p, dict) and k in p else v for k, v in f.items()}
        return np.asarray(p).astype(np.asarray(f).dtype) if p is not None else f

    return merge(fresh, params)


class _Run:
    """Output directory, metrics.jsonl, a progress bar; what every stage shares."""

    def __init__(self, mode, cfg, tokenizer, rows, eval_rows):
        self.mode, self.cfg, self.tok, self.rows, self.eval_rows = mode, cfg, tokenizer, rows, eval_rows
        self.out = None if cfg.output_dir is None else Path(cfg.output_dir)
        self.lead = jax.process_index() == 0

    def _log(self, start: int):
        from zjax.train.loop import _MetricsLog

        return _MetricsLog(self.cfg, keep_through=start)

    def _trainable(self, cfg=None):
        lora = (cfg or self.cfg).model.lora
        return nnx.LoRAParam if lora.rank > 0 and lora.only_optimize else None

    def _gpt(self, seed_offset: int = 0):
        from zjax.models.gpt import GPT

        return GPT(self.cfg.model, rngs=nnx.Rngs(self.cfg.seed + seed_offset), kernels=self.cfg.kernels)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def _prompt(self, text: str) -> list[int]:
        ids = self._encode(text)[-self.cfg.rlhf.max_prompt_len:]
        return ids or [0]


class _SupervisedRun(_Run):
    """sft, reward and dpo: one model, one optimizer step per batch of rows."""

    def __init__(self, *args):
        super().__init__(*args)
        cfg, mode = self.cfg, self.mode
        if mode == "reward":
            model = ppo.ValueModel(cfg.model, rngs=nnx.Rngs(cfg.seed))
            source = _source_params(cfg.rlhf.actor, "rlhf.actor", cfg.model)
            if source is not None:  # the reward model's trunk from the sft model (its head stays new)
                nnx.update(model.gpt, nnx.State(_with_lora(source, model.gpt)))
            loss = preference.reward_loss
        else:
            model = self._gpt()
            source = _source_params(cfg.rlhf.actor, "rlhf.actor", cfg.model)
            if source is not None:
                nnx.update(model, nnx.State(_with_lora(source, model)))
            loss = preference.sft_loss if mode == "sft" else preference.dpo_loss_fn(
                cfg.rlhf.dpo.beta, cfg.rlhf.dpo.label_smoothing, cfg.rlhf.dpo.kind)
        from zjax.train.step import make_train_step

        self.step = make_train_step(cfg, loss, model=model, trainable=self._trainable())
        self.initial = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def _batch(self, rows: list[dict]) -> dict:
        r, cut = self.cfg.rlhf, self.cfg.rlhf.max_len
        prompts = [self._prompt(row["prompt"]) for row in rows]
        if self.mode == "sft":
            responses = [self._encode(row["response"])[:cut - len(p)] or [0] for row, p in zip(rows, prompts)]
            batch = preference.sequence_batch(prompts, responses, cut)
            if not r.completion_only:  # every token of prompt + response (DeepSpeed-Chat's step 1)
                lengths = np.asarray([len(p) + len(q) for p, q in zip(prompts, responses)])
                batch["mask"] = (np.arange(cut - 1)[None] < lengths[:, None] - 1).astype(np.float32)
            return batch
        chosen = [self._encode(row["chosen"])[:cut - len(p)] or [0] for row, p in zip(rows, prompts)]
        rejected = [self._encode(row["rejected"])[:cut - len(p)] or [0] for row, p in zip(rows, prompts)]
        return preference.pair_batch(prompts, chosen, rejected, cut)

    def _train_batch(self, rows: list[dict], ref) -> dict:
        batch = self._batch(rows)
        return preference.reference_logps(self.step, ref, batch) if self.mode == "dpo" else batch

    def _evaluate(self, state, ref) -> dict:
        n = self.step.global_batch_size
        rows = self.eval_rows
        usable = len(rows) // n * n
        if usable == 0:
            raise ConfigError(f"rlhf.eval_data has {len(rows)} rows, fewer than batch.global_batch_size={n}; give at "
                              "least one batch")
        losses, correct = [], []
        for k in range(0, usable, n):
            batch = self._train_batch(rows[k:k + n], ref)
            losses.append(float(self.step.evaluate(state, batch)))
            if self.mode == "reward":
                scores = [self.step.per_example(state, {"tokens": batch[w], "mask": batch[f"{w}_mask"]},
                                                preference.sequence_scores) for w in ("chosen", "rejected")]
                correct.append(np.asarray(jax.device_get(scores[0] > scores[1])))
        out = {"eval_loss": float(np.mean(losses))}
        if correct:
            out["eval_accuracy"] = float(np.mean(np.concatenate(correct)))
        return out

    def go(self) -> dict:
        cfg, step = self.cfg, self.step
        ckpt = None if self.out is None else Checkpointer(self.out / "checkpoints", keep=cfg.checkpoints.keep,
                                                          every_steps=cfg.checkpoints.every_steps,
                                                          every_seconds=cfg.checkpoints.every_seconds)
        start = 0
        if ckpt is not None and ckpt.latest_step() is not None:
            state, extra = ckpt.restore(step)
            start = int(extra["step"])
            print(f"resumed from step {start} of {ckpt.directory}")
        else:
            state = step.init(self.initial)
        ref = ppo.frozen(step.init(self.initial)) if self.mode == "dpo" else None
        log = self._log(start)
        last: dict = {}
        bar = tqdm(total=cfg.steps, initial=start, desc=f"rlhf {self.mode}", unit="step", disable=not self.lead)
        n = step.global_batch_size
        for k in range(start, cfg.steps):
            rows = [self.rows[i] for i in _batches(len(self.rows), n, cfg.seed, k)]
            t0 = time.perf_counter()
            state, metrics = step(state, self._train_batch(rows, ref))
            host = {key: float(v) for key, v in jax.device_get(metrics).items()}
            last = {"step": k + 1, **host, "step_s": time.perf_counter() - t0}
            done = k + 1
            if self.eval_rows is not None and (done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                last.update(self._evaluate(state, ref))
            log.write(last)
            bar.update(1)
            bar.set_postfix(loss=f"{host['loss']:.3f}")
            if ckpt is not None and (done == cfg.steps or ckpt.should_save(done)):
                ckpt.save(done, state, extra={"step": done}, config=cfg)
        bar.close()
        if ckpt is not None:
            ckpt.close()
        log.close()
        return {"steps": cfg.steps, **last}


class _RolloutRun(_Run):
    """ppo and grpo: rollouts through the hybrid engine, then updates; every model checkpointed."""

    def __init__(self, *args):
        super().__init__(*args)
        from zjax.train.step import make_train_step

        cfg, mode = self.cfg, self.mode
        s = cfg.rlhf.ppo if mode == "ppo" else cfg.rlhf.grpo
        stop = tuple(self.tok.eos_token_ids or ())
        common = dict(max_new_tokens=s.max_new_tokens, temperature=s.temperature, stop_tokens=stop,
                      ema_decay=s.ema_decay, ppo_epochs=s.ppo_epochs, release_memory=s.release_memory)
        if mode == "ppo":
            self.settings = ppo.PPOSettings(
                kl_coef=s.kl_coef, clip_reward_value=s.clip_reward_value, cliprange=s.cliprange,
                cliprange_value=s.cliprange_value, gamma=s.gamma, lam=s.lam, whiten_advantages=s.whiten_advantages,
                ptx_coef=s.ptx_coef, **common)
            loss = ppo.actor_loss(self.settings)
        else:
            self.settings = ppo.GRPOSettings(group_size=s.group_size, kl_coef=s.kl_coef, kl_kind=s.kl_kind,
                                             cliprange=s.cliprange, cliprange_high=s.cliprange_high,
                                             advantage=s.advantage, agg=s.agg, **common)
            loss = ppo.grpo_actor_loss(self.settings)
        r = cfg.rlhf
        if r.max_prompt_len + s.max_new_tokens > cfg.model.max_seq_len:
            raise ConfigError(f"rlhf.max_prompt_len={r.max_prompt_len} + rlhf.{mode}.max_new_tokens="
                              f"{s.max_new_tokens} is above model.max_seq_len={cfg.model.max_seq_len}; shorten one")
        model = self._gpt()
        source = _source_params(r.actor, "rlhf.actor", cfg.model)
        if source is not None:
            nnx.update(model, nnx.State(_with_lora(source, model)))
        self.actor = make_train_step(cfg, loss, model=model, trainable=self._trainable())
        self.actor_initial = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        self.reward_fn = self._reward_fn()
        self.critic = None
        if mode == "ppo":
            critic_cfg = load_config(cfg, list(r.critic_overrides))
            self.critic_cfg = critic_cfg
            critic_model = ppo.ValueModel(critic_cfg.model, rngs=nnx.Rngs(cfg.seed + 1))
            source = r.critic or r.reward_model
            params = _source_params(source, "rlhf.critic" if r.critic else "rlhf.reward_model", critic_cfg.model)
            if params is not None:
                nnx.update(critic_model, nnx.State(_with_lora(params, critic_model)))
            self.critic = make_train_step(critic_cfg, ppo.critic_loss(self.settings), model=critic_model,
                                          trainable=self._trainable(critic_cfg))
            self.critic_initial = nnx.to_pure_dict(nnx.state(critic_model, nnx.Param))
        self.ptx = None
        if mode == "ppo" and s.ptx_coef > 0:
            from zjax.data.loader import make_loader, token_datasets

            data = token_datasets(cfg.data, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
            self.ptx = make_loader(data["train"], self.actor.global_batch_size, seed=cfg.seed, prefetch=0)

    def _reward_fn(self) -> Callable:
        r = self.cfg.rlhf
        if r.reward_fn is not None:
            module, _, name = r.reward_fn.partition(":")
            try:
                fn = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as err:
                raise ConfigError(f"rlhf.reward_fn={r.reward_fn!r} cannot be imported ({err}); give "
                                  "'module:function' importable from this process") from None

            def score(tokens, mask):
                prompts, responses = self._texts(tokens, mask)
                return np.asarray(fn(prompts, responses), np.float32)

            return score
        from zjax.train.step import make_train_step

        # this run's config with the reward model's own model block (it may be another size), no LoRA
        source = Path(r.reward_model) / "config.yaml"
        raw = self.cfg.model_dump()
        raw["model"] = {**(load_config(source) if source.is_file() else self.cfg).model.model_dump(),
                        "lora": {"rank": 0}}
        rm_cfg = load_config(raw)
        rm_model = ppo.ValueModel(rm_cfg.model, rngs=nnx.Rngs(0))
        params = _source_params(r.reward_model, "rlhf.reward_model", rm_cfg.model)
        nnx.update(rm_model, nnx.State(_with_lora(params, rm_model)))
        rm_step = make_train_step(rm_cfg, preference.reward_loss, model=rm_model)
        rm_state = ppo.frozen(rm_step.init(nnx.to_pure_dict(nnx.state(rm_model, nnx.Param))))

        def score(tokens, mask):
            return rm_step.per_example(rm_state, {"tokens": tokens, "mask": mask}, preference.sequence_scores)

        return score

    def _texts(self, tokens, mask) -> tuple[list[str], list[str]]:
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        prompts, responses = [], []
        for row, m in zip(tokens, mask):
            where = np.flatnonzero(m)
            first = int(where[0]) + 1 if len(where) else len(row)
            last = int(where[-1]) + 2 if len(where) else len(row)
            prompts.append(self.tok.decode(row[:first].tolist()))
            responses.append(self.tok.decode(row[first:last].tolist()))
        return prompts, responses

    def _prompts(self, k: int) -> list[list[int]]:
        n = self.actor.global_batch_size
        group = self.settings.group_size if self.mode == "grpo" else 1
        picked = _batches(len(self.rows), n // group, self.cfg.seed, k)
        return [self._prompt(self.rows[i]["prompt"]) for i in picked for _ in range(group)]

    def _checkpointers(self) -> dict:
        if self.out is None:
            return {}
        c = self.cfg.checkpoints
        names = ["actor"] + (["critic"] if self.critic is not None else []) + \
            (["actor_ema"] if self.settings.ema_decay is not None else [])
        return {name: Checkpointer(self.out / name / "checkpoints", keep=c.keep, every_steps=c.every_steps,
                                   every_seconds=c.every_seconds) for name in names}

    def go(self) -> dict:
        cfg = self.cfg
        ckpts = self._checkpointers()
        steps = {name: set(ck.committed_steps()) for name, ck in ckpts.items()}
        common = set.intersection(*steps.values()) if steps else set()
        actor_state = self.actor.init(self.actor_initial)
        ref_state = ppo.frozen(actor_state)  # the starting policy, whether or not the run resumes
        critic_state = None if self.critic is None else self.critic.init(self.critic_initial)
        start = 0
        if common:
            start = max(common)
            actor_state, _ = ckpts["actor"].restore(self.actor, start)
            if self.critic is not None:
                critic_state, _ = ckpts["critic"].restore(self.critic, start)
            print(f"resumed from iteration {start} of {self.out}")
        if self.mode == "ppo":
            trainer = ppo.PPOTrainer(self.actor, actor_state, self.critic, critic_state, self.reward_fn, cfg.model,
                                     self.settings, cfg.rlhf.max_prompt_len, ref_state=ref_state)
        else:
            trainer = ppo.GRPOTrainer(self.actor, actor_state, self.reward_fn, cfg.model, self.settings,
                                      cfg.rlhf.max_prompt_len, ref_state=ref_state)
        if start and "actor_ema" in ckpts:
            ema, _ = ckpts["actor_ema"].restore(self.actor, start)
            trainer.ema = {"master": ema.master, "replicated": ema.replicated}
        trainer.iterations = start
        if self.out is not None and self.lead:
            for name, model_cfg in (("actor", cfg), ("critic", getattr(self, "critic_cfg", None))):
                if name in ckpts and model_cfg is not None:  # each model's dir is a run of its own
                    (self.out / name).mkdir(parents=True, exist_ok=True)
                    (self.out / name / "config.yaml").write_text(model_cfg.to_yaml())
        log = self._log(start)
        last: dict = {}
        bar = tqdm(total=cfg.steps, initial=start, desc=f"rlhf {self.mode}", unit="it", disable=not self.lead)
        for k in range(start, cfg.steps):
            ptx = None
            if self.ptx is not None:
                rows = self.ptx.local_batch(k)["tokens"]
                ptx = {"tokens": rows, "mask": np.ones((rows.shape[0], rows.shape[1] - 1), np.float32)}
            metrics = trainer.iteration(self._prompts(k), seed=k, ptx=ptx)
            last = {"step": k + 1, **metrics}
            log.write(last)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl']:.3f}")
            done = k + 1
            if ckpts and (done == cfg.steps or ckpts["actor"].should_save(done)):
                ckpts["actor"].save(done, trainer.actor_state, extra={"step": done}, config=cfg)
                if "critic" in ckpts:
                    ckpts["critic"].save(done, trainer.critic_state, extra={"step": done}, config=self.critic_cfg)
                if "actor_ema" in ckpts:
                    ckpts["actor_ema"].save(done, trainer.ema_state(), extra={"step": done}, config=cfg)
        bar.close()
        for ck in ckpts.values():
            ck.close()
        log.close()
        return {"steps": cfg.steps, **last}


__all__ = ["MODES", "read_jsonl", "rlhf_run"]
