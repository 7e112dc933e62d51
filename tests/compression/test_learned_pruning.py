"""DeepSpeed's learned-score pruning (``method: topk``, zjax.compression.learned): equal to
DeepSpeed's formulation written out (W * TopKBinarizer(scores) in the forward, straight-through
gradients, scores trained by the optimizer), and through make_train_step under ZeRO 0-3 and the
tensor axis, across a checkpoint, and cleaned to a smaller model."""
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zjax
from gpt_helpers import gpt_train, tiny_config, token_batches
from zjax import compression
from zjax.checkpoint import Checkpointer
from zjax.compression import clean
from zjax.compression.learned import dense_values, scores_mask
from zjax.errors import ConfigError
from zjax.models import gpt_loss, make_gpt

KEY = jax.random.key(0)


def _group(modules, ratio, offset, **kw):
    return types.SimpleNamespace(modules=modules, dense_ratio=ratio, schedule_offset=offset, pattern=None,
                                 schedule_offset_end=None, related_modules=kw.pop("related", []), method="topk", **kw)


@jax.custom_vjp
def _binarize(mask, scores):
    return mask.astype(scores.dtype)


_binarize.defvjp(lambda mask, scores: (mask.astype(scores.dtype), None),
                 lambda _, g: (None, g))  # TopKBinarizer.backward: the gradient passes straight through


def test_top_k_mask_is_exact_on_signed_scores_and_keeps_deepspeeds_count():
    x = jax.random.normal(KEY, (3, 1000))
    for k in (1, 37, 500, 1000):
        kept = np.asarray(compression.top_k_mask(x, k))
        assert (kept.sum(-1) == k).all()
        xs = np.asarray(x)
        for i in range(3):
            assert xs[i][kept[i]].min() > (xs[i][~kept[i]].max() if k < 1000 else -np.inf)
    ties = jnp.zeros((7,)).at[3].set(-1.0)
    assert compression.top_k_mask(ties, 3).tolist() == [True, True, True, False, False, False, False]
    # TopKBinarizer keeps ceil(ratio * n): 0.3 of 10 heads is 3, of 11 is 4
    assert int(scores_mask("head", jnp.arange(10.0), 0.3).sum()) == 3
    assert int(scores_mask("head", jnp.arange(11.0), 0.3).sum()) == math.ceil(0.3 * 11)
    grouped = np.asarray(scores_mask("head", jax.random.normal(KEY, (2, 8)), 0.5, groups=2))
    assert (grouped.reshape(2, 2, 4).sum(-1) == 2).all()


def _model(params, x):
    return jnp.tanh(jnp.tanh(x @ params["a"]["w"]) @ params["b"]["w"]) @ params["c"]["w"]


def _reference(params, x, y, groups, steps, lr, score_lr, seed):
    """DeepSpeed's topk written out: the weights masked in the forward from step max(offset, 1) on
    (zjax's first masked forward), W and scores trained by Adam from autodiff through an identity-
    gradient binarizer, each group's scores (and their Adam state) moving once their mask is in
    the forward."""
    tx, stx = optax.adam(lr), optax.adam(score_lr)
    init = compression.learned_prune(tx, groups, score_tx=stx, seed=seed).init(params)
    scores = dict(init.scores)
    sstate = {k: stx.init(s) for k, s in scores.items()}
    wstate = tx.init(params)
    layout = {"row:a/w": ("a", lambda m, w: w * m[None, :]), "head:b/w": ("b", lambda m, w: w * jnp.repeat(m, 4)[:, None]),
              "sparse:c/w": ("c", lambda m, w: w * m)}
    starts = {f"{kind}:{g.modules[0]}": max(g.schedule_offset, 1) for kind, g in groups}
    ratios = {f"{kind}:{g.modules[0]}": g.dense_ratio for kind, g in groups}
    history = []
    for step in range(steps):
        active = {k: step >= starts[k] for k in scores}

        def loss(params, scores, active=active):
            eff = {n: dict(v) for n, v in params.items()}
            for k, (leaf, apply) in layout.items():
                if active[k]:
                    mask = scores_mask(k.split(":")[0], jax.lax.stop_gradient(scores[k]), ratios[k])
                    eff[leaf]["w"] = apply(_binarize(mask, scores[k]), eff[leaf]["w"])
            return jnp.mean((_model(eff, x) - y) ** 2)

        gw, gs = jax.grad(loss, argnums=(0, 1))(params, scores)
        u, wstate = tx.update(gw, wstate, params)
        params = optax.apply_updates(params, u)
        for k in scores:
            if active[k]:
                su, sstate[k] = stx.update(gs[k], sstate[k], scores[k])
                scores[k] = optax.apply_updates(scores[k], su)
        masks = {k: scores_mask(k.split(":")[0], scores[k], ratios[k]) if step + 1 >= starts[k] else None
                 for k in scores}
        history.append((params, masks))
    return history


def test_learned_pruning_equals_deepspeeds_masked_forward_with_straight_through_scores():
    ka, kb, kc, kx = jax.random.split(KEY, 4)
    params = {"a": {"w": jax.random.normal(ka, (8, 16)) / 3}, "b": {"w": jax.random.normal(kb, (16, 16)) / 4},
              "c": {"w": jax.random.normal(kc, (16, 6)) / 4}}
    x = jax.random.normal(kx, (32, 8))
    y = jnp.sin(x[:, :6] * 2)
    groups = [("row", _group(["a/w"], 0.5, 2, related=["b/w"])),
              ("head", _group(["b/w"], 0.5, 3, num_heads=4)),
              ("sparse", _group(["c/w"], 0.25, 0))]
    steps, lr, score_lr = 8, 1e-2, 5e-2
    ref = _reference(params, x, y, groups, steps, lr, score_lr, seed=3)
    tx = compression.learned_prune(optax.adam(lr), groups, score_tx=optax.adam(score_lr), seed=3)
    state = tx.init(params)
    loss = jax.jit(lambda p: jnp.mean((_model(p, x) - y) ** 2))
    step = jax.jit(lambda p, s: tx.update(jax.grad(lambda q: jnp.mean((_model(q, x) - y) ** 2))(p), s, p))
    changed = 0
    previous = None
    for i, (ref_params, ref_masks) in enumerate(ref):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
        dense = dense_values(state)
        for leaf in ("a", "b", "c"):
            # the optimizer ran on DeepSpeed's dense weights; the stored ones are them masked, zeros exact
            np.testing.assert_allclose(dense[f"{leaf}/w"], ref_params[leaf]["w"], rtol=2e-5, atol=1e-6)
            stored, mask = np.asarray(params[leaf]["w"]), np.asarray(state.masks[f"{leaf}/w"])
            assert (stored[~mask] == 0).all() and (stored[mask] == np.asarray(dense[f"{leaf}/w"])[mask]).all()
        # the masks of the next forward: DeepSpeed's top-k of the same scores (all ones before)
        sparse, row, head = (np.ones(n, bool) if ref_masks[k] is None else np.asarray(ref_masks[k])
                             for k, n in (("sparse:c/w", (16, 6)), ("row:a/w", (16,)), ("head:b/w", (4,))))
        np.testing.assert_array_equal(state.masks["c/w"], sparse)
        np.testing.assert_array_equal(state.masks["a/w"], np.broadcast_to(row, (8, 16)))
        # b: its heads' rows only (a related module is not masked: it carries the gradient that lets
        # a's masked-out features come back)
        np.testing.assert_array_equal(state.masks["b/w"], np.broadcast_to(np.repeat(head, 4)[:, None], (16, 16)))
        counts = (int(sparse.sum()), int(row.sum()), int(head.sum()))
        assert counts == tuple(n if ref_masks[k] is not None else full for k, n, full in (
            ("sparse:c/w", math.ceil(0.25 * 96), 96), ("row:a/w", 8, 16), ("head:b/w", 2, 4)))
        current = np.concatenate([np.asarray(state.masks[n]).ravel() for n in ("a/w", "b/w", "c/w")])
        if previous is not None:
            changed += int((current & ~previous).sum())  # weights that came back
        previous = current
        assert np.isfinite(float(loss(params)))
    assert changed > 0  # learned masks move: masked-out weights come back with their dense values


def test_topk_refusals_name_the_key():
    with pytest.raises(ConfigError, match="pattern='2:4'.*method: l1"):
        compression.learned_prune(optax.sgd(0.1), [("sparse", types.SimpleNamespace(
            modules=["w"], dense_ratio=0.5, schedule_offset=0, pattern="2:4"))])
    with pytest.raises(ConfigError, match="method 'topk' learns scores.*learned_prune"):
        compression.prune([("row", _group(["w"], 0.5, 0))])
    with pytest.raises(ConfigError, match="schedule_offset_end"):
        gpt_train("compression.sparse_pruning=[{modules: [mlp/w_up], method: topk, schedule_offset_end: 5}]")


# --- through the train step ---------------------------------------------------------------------

LEARNED = ("compression.sparse_pruning=[{modules: [mlp/w_up], method: topk, dense_ratio: 0.5, schedule_offset: 2}]",
           "compression.head_pruning=[{modules: [attn/wo], related_modules: ['attn/w[qkv]'], method: topk, "
           "dense_ratio: 0.5, num_heads: 4, num_kv_heads: 2, schedule_offset: 1}]",
           "optimizer.lr=0.01", "schedule.warmup_steps=0")


def _steps(train, state, batches):
    losses, params = [], []
    for batch in batches:
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
        params.append(jax.device_get(state.params))
    return state, losses, params


@pytest.fixture(scope="module")
def learned_runs(tmp_path_factory):
    batches = token_batches(5, 16, 32)
    runs = {}
    train, state = gpt_train(*LEARNED, "zero.stage=3")
    state, losses, params = _steps(train, state, batches[:3])
    path = tmp_path_factory.mktemp("learned")
    ckpt = Checkpointer(path)
    ckpt.save(3, state)
    ckpt.wait()
    ckpt.close()
    state, more, more_params = _steps(train, state, batches[3:])
    runs["zero3"] = (train, losses + more, params + more_params)
    train0, state0 = gpt_train(*LEARNED, "zero.stage=0")
    runs["zero0"] = (train0, *_steps(train0, state0, batches)[1:])
    resumed = zjax.make_train_step(tiny_config(*LEARNED, "zero.stage=2", "mesh.tensor=2"), gpt_loss,
                                   model=make_gpt(tiny_config().model))
    restored, _ = Checkpointer(path).restore(resumed)
    runs["resumed_zero2_tensor2"] = (resumed, *_steps(resumed, restored, batches[3:])[1:])
    runs["dense"] = _steps(*gpt_train("zero.stage=3", "optimizer.lr=0.01", "schedule.warmup_steps=0"), batches[:2])[1]
    return runs


def test_learned_pruning_in_the_step_under_zero_and_tensor_and_across_a_checkpoint(learned_runs):
    train, losses, params = learned_runs["zero3"]
    # head pruning from step 1: the forward of step 0 is dense, step 1's is the first masked
    assert losses[0] == pytest.approx(learned_runs["dense"][0], rel=1e-6)
    assert losses[1] != pytest.approx(learned_runs["dense"][1], rel=1e-4)
    cfg = train.config.model
    for step, p in enumerate(params):
        up = np.asarray(p["blocks"]["mlp"]["w_up"])
        wo = np.asarray(p["blocks"]["attn"]["wo"]).reshape(cfg.n_layers, cfg.n_heads, -1)
        live_heads = (wo != 0).any(-1)
        assert (live_heads.reshape(cfg.n_layers, 2, 2).sum(-1) == 1).all()  # 1 of 2 per KV group
        # sparse from step 2: the update of step 1 leaves exactly ceil(0.5 * n) per layer's matrix
        kept = (up != 0).reshape(cfg.n_layers, -1).sum(-1)
        assert (kept == (up[0].size if step < 1 else math.ceil(0.5 * up[0].size))).all(), (step, kept)
    _, losses0, params0 = learned_runs["zero0"]
    np.testing.assert_allclose(losses0, losses, rtol=2e-5)
    for name in ("w_up",):
        np.testing.assert_array_equal(np.asarray(params0[-1]["blocks"]["mlp"][name]) == 0,
                                      np.asarray(params[-1]["blocks"]["mlp"][name]) == 0)
    # restored at ZeRO-2 x tensor=2 from the ZeRO-3 checkpoint of step 3: scores, dense values and
    # the optimizer state carried over, the last two steps as the uninterrupted run's
    _, resumed_losses, resumed_params = learned_runs["resumed_zero2_tensor2"]
    np.testing.assert_allclose(resumed_losses, losses[3:], rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(resumed_params[-1]["blocks"]["attn"]["wo"]) == 0,
                                  np.asarray(params[-1]["blocks"]["attn"]["wo"]) == 0)


def test_learned_head_pruning_cleans_to_a_smaller_model_that_computes_the_same(learned_runs):
    from zjax.inference.model import logits

    train, _, params = learned_runs["zero3"]
    cfg = train.config.model
    small, small_cfg = clean.redundancy_clean(params[-1], cfg)
    assert small_cfg["n_heads"] == cfg.n_heads // 2 and small_cfg["n_kv_heads"] == cfg.n_kv_heads
    shrunk = zjax.load_config({"model": small_cfg, "data": {"seq_len": 32}}).model
    tokens = jnp.asarray(token_batches(1, 2, 32, split="val")[0]["tokens"][:, :-1])
    np.testing.assert_allclose(logits(jax.tree.map(jnp.asarray, small), shrunk, tokens),
                               logits(jax.tree.map(jnp.asarray, params[-1]), cfg, tokens), rtol=1e-5, atol=1e-5)
