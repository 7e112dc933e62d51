"""DeepSpeed's MoE gating in JAX (zjax.models.moe): capacity arithmetic, top-1/top-2/top-k
decisions, dropped-token counts and the load-balancing loss against loop-by-loop numpy
ports of deepspeed.moe.sharded_moe; the layer equals each token's experts applied one by
one; random token selection is seeded; the NNX module trains under make_train_step."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zjax
from zjax.models.moe import GateConfig, MoE, capacity, expert_mlp, moe_ffn, route

S, E, D, F = 48, 6, 8, 12


def logits(seed=0, skew=True):
    x = np.random.default_rng(seed).normal(size=(S, E)).astype(np.float32)
    if skew:  # make experts 0 and 1 popular, so capacity drops tokens
        x[:, :2] += 1.5
    return x


def softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def ds_top1(lg, cap):
    """deepspeed top1gating without noise or RTS (first tokens kept), one token at a time."""
    gates = softmax(lg.astype(np.float64))
    choice = gates.argmax(-1)
    me, ce = gates.mean(0), np.bincount(choice, minlength=E) / S
    combine, filled = np.zeros((S, E, cap)), np.zeros(E, int)
    for s in range(S):
        e = choice[s]
        if filled[e] < cap:
            combine[s, e, filled[e]] = gates[s, e]
            filled[e] += 1
    return combine, E * np.sum(me * ce), np.bincount(choice, minlength=E)


def ds_top2(lg, cap):
    """deepspeed top2gating without second-expert sampling: first choices fill the slots first."""
    gates = softmax(lg.astype(np.float64))
    first = gates.argmax(-1)
    masked = np.where(np.eye(E)[first] > 0, -np.inf, lg)
    second = masked.argmax(-1)
    n_first = np.bincount(first, minlength=E)
    combine = np.zeros((S, E, cap))
    seen1, seen2 = np.zeros(E, int), np.zeros(E, int)
    for s in range(S):
        e1, e2 = first[s], second[s]
        loc1, loc2 = seen1[e1], n_first[e2] + seen2[e2]
        seen1[e1] += 1
        seen2[e2] += 1
        g1 = gates[s, e1] if loc1 < cap else 0.0
        g2 = gates[s, e2] if loc2 < cap else 0.0
        denom = max(g1 + g2, np.finfo(np.float32).eps)
        if loc1 < cap:
            combine[s, e1, loc1] = g1 / denom
        if loc2 < cap:
            combine[s, e2, loc2] = g2 / denom
    aux = np.mean(gates.mean(0) * np.bincount(first, minlength=E) / S) * E * E
    return combine, aux, np.bincount(first, minlength=E) + np.bincount(second, minlength=E)


def ds_topk(lg, k, cap):
    """deepspeed topkgating with drop_policy='probs': each expert keeps its cap largest gates."""
    gates = softmax(lg.astype(np.float64))
    chosen = np.argsort(-gates, axis=-1)[:, :k]
    mask = np.zeros((S, E), bool)
    np.put_along_axis(mask, chosen, True, axis=-1)
    counts = mask.sum(0)
    aux = np.mean(gates.mean(0) * mask.mean(0)) * E * E / k
    for e in range(E):
        rows = np.flatnonzero(mask[:, e])
        keep = rows[np.argsort(-gates[rows, e], kind="stable")[:cap]]
        mask[:, e] = False
        mask[keep, e] = True
    w = gates * mask
    w = w / np.maximum(w.sum(-1, keepdims=True), np.finfo(np.float32).eps)
    combine = np.zeros((S, E, cap))
    for e in range(E):
        for slot, s in enumerate(np.flatnonzero(mask[:, e])):
            combine[s, e, slot] = w[s, e]
    return combine, aux, counts


def test_capacity_is_deepspeeds_arithmetic():
    assert capacity(64, 8, 1, 1.0, 4) == 8
    assert capacity(64, 8, 2, 1.25, 4) == 20  # ceil(8 * 2.5)
    assert capacity(10, 4, 1, 1.0, 0) == 3    # ceil(2.5)
    assert capacity(8, 8, 1, 1.0, 4) == 4     # min_capacity wins


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gating_equals_deepspeeds_decisions_and_losses(k):
    lg = logits(k)
    cfg = GateConfig(E, top_k=k, capacity_factor=1.0, min_capacity=2, use_rts=False, second_expert_sampling=False)
    cap = capacity(S, E, k, 1.0, 2)
    routing = jax.jit(route, static_argnums=1)(jnp.asarray(lg), cfg)  # no key: no noise, no random selection
    ref = {1: lambda: ds_top1(lg, cap), 2: lambda: ds_top2(lg, cap), 3: lambda: ds_topk(lg, 3, cap)}[k]()
    combine, aux, counts = ref
    assert routing.capacity == cap
    np.testing.assert_allclose(routing.combine, combine, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(routing.dispatch, combine > 0)
    np.testing.assert_allclose(routing.aux_loss, aux, rtol=1e-5)
    np.testing.assert_array_equal(routing.counts, counts)
    # dropped = assignments over capacity; the skewed logits make some
    assert int(routing.dropped) == int(counts.sum() - (combine > 0).sum()) > 0
    z = np.log(np.exp(lg.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(routing.z_loss, np.mean(z ** 2), rtol=1e-5)


def test_top1_load_balancing_loss_by_hand():
    # 4 tokens, 2 experts: first choices e0, e0, e1, e0 -> ce = (3/4, 1/4); me = mean softmax
    lg = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3]], np.float32))
    routing = route(jnp.asarray(lg), GateConfig(2, min_capacity=0, use_rts=False))
    me = np.array([0.6, 0.4])
    assert float(routing.aux_loss) == pytest.approx(2 * (0.6 * 0.75 + 0.4 * 0.25), rel=1e-6)
    # capacity ceil(4/2) = 2: the third e0 token (row 3) is dropped, first come first served
    assert routing.capacity == 2 and int(routing.dropped) == 1
    assert routing.dispatch[3].sum() == 0 and routing.dispatch[:3].sum() == 3
    assert me.sum() == pytest.approx(1.0)


def test_random_token_selection_is_seeded_and_keeps_capacity():
    lg = jnp.asarray(logits(5))
    cfg = GateConfig(E, top_k=1, min_capacity=1, use_rts=True)
    a = route(lg, cfg, key=jax.random.key(0))
    b = route(lg, cfg, key=jax.random.key(0))
    c = route(lg, cfg, key=jax.random.key(1))
    np.testing.assert_array_equal(a.combine, b.combine)
    assert not np.array_equal(np.asarray(a.dispatch), np.asarray(c.dispatch))
    kept = np.asarray(a.dispatch).sum((0, 2))
    np.testing.assert_array_equal(kept, np.minimum(np.asarray(a.counts), a.capacity))


def test_dropless_keeps_every_token_and_eval_uses_its_own_factor():
    lg = jnp.asarray(logits(2))
    dropless = route(lg, GateConfig(E, top_k=2, drop_tokens=False))
    assert dropless.capacity == S and int(dropless.dropped) == 0
    np.testing.assert_allclose(dropless.combine.sum((1, 2)), 1.0, rtol=1e-6)
    cfg = GateConfig(E, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    assert route(lg, cfg, train=True).capacity == math.ceil(S / E)
    assert route(lg, cfg, train=False).capacity == math.ceil(S / E * 2)


def params(seed=0, residual=False, shared=False):
    k = jax.random.split(jax.random.key(seed), 10)
    p = {"router": jax.random.normal(k[0], (D, E)), "w_gate": jax.random.normal(k[1], (E, D, F)) / 3,
         "w_up": jax.random.normal(k[2], (E, D, F)) / 3, "w_down": jax.random.normal(k[3], (E, F, D)) / 3}
    if residual:
        p["residual"] = {"w_gate": jax.random.normal(k[4], (D, F)) / 3, "w_up": jax.random.normal(k[5], (D, F)) / 3,
                         "w_down": jax.random.normal(k[6], (F, D)) / 3}
        p["coefficient"] = jax.random.normal(k[7], (D, 2))
    if shared:
        p["shared"] = {"w_gate": jax.random.normal(k[8], (D, F)) / 3, "w_up": jax.random.normal(k[9], (D, F)) / 3,
                       "w_down": jax.random.normal(k[4], (F, D)) / 3}
    return p


def mlp(x, w_gate, w_up, w_down):
    """SwiGLU in numpy (the reference never calls the code under test)."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    g = x @ w_gate
    return (g / (1 + np.exp(-g)) * (x @ w_up)) @ w_down


@pytest.mark.parametrize("k,residual,shared", [(1, False, False), (2, True, False), (2, False, True)])
def test_the_layer_equals_each_tokens_experts_one_by_one(k, residual, shared):
    p = params(k, residual, shared)
    x = jax.random.normal(jax.random.key(9), (4, S // 4, D))
    cfg = GateConfig(E, top_k=k, drop_tokens=False)
    y, routing = jax.jit(moe_ffn, static_argnums=2)(x, p, cfg)
    tokens = np.asarray(x).reshape(S, D)
    weights = np.asarray(routing.combine).sum(-1)  # [S, E]: each token's weight per expert
    want = np.zeros((S, D))
    for s in range(S):
        for e in np.flatnonzero(weights[s]):
            want[s] += weights[s, e] * mlp(tokens[s], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    if residual:
        coef = softmax(tokens @ np.asarray(p["coefficient"]))
        dense = mlp(tokens, *(p["residual"][n] for n in ("w_gate", "w_up", "w_down")))
        want = want * coef[:, :1] + dense * coef[:, 1:]
    if shared:
        want += mlp(tokens, *(p["shared"][n] for n in ("w_gate", "w_up", "w_down")))
    np.testing.assert_allclose(np.asarray(y).reshape(S, D), want, rtol=1e-4, atol=1e-5)
    # every token's weights: top-1 its gate, top-2 renormalized to 1
    if k == 2:
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    # the router learns through the combine weights
    g = jax.jit(jax.grad(lambda p: jnp.sum(moe_ffn(x, p, cfg)[0] ** 2)))(p)
    assert float(jnp.abs(g["router"]).sum()) > 0
    assert expert_mlp(jnp.zeros((E, 1, D)), p["w_gate"], p["w_up"], p["w_down"]).shape == (E, 1, D)


def test_bad_gate_settings_are_clear_errors():
    with pytest.raises(zjax.ConfigError, match="moe.top_k=3: use 1 <= top_k <= num_experts=2"):
        GateConfig(2, top_k=3)
    with pytest.raises(zjax.ConfigError, match="noisy_gate_policy='gumbel'"):
        GateConfig(4, noisy_gate_policy="gumbel")
    with pytest.raises(zjax.ConfigError, match="router gives 3 logits per token but moe.num_experts=4"):
        route(jnp.zeros((5, 3)), GateConfig(4))


def test_the_nnx_module_trains_in_a_zero3_step():
    """A third-party-style NNX model with an MoE block (and its aux loss) trains under ZeRO-3."""
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(32, D, rngs=rngs)
            self.moe = MoE(D, F, GateConfig(4, top_k=2, min_capacity=0), rngs=rngs, shared_experts=1)
            self.head = nnx.Linear(D, 32, rngs=rngs)

        def __call__(self, tokens):
            h = self.embed(tokens)
            y, routing = self.moe(h)
            return self.head(h + y), routing

    def loss_fn(model, batch):
        logits, routing = model(batch["tokens"][:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["tokens"][:, 1:, None], -1).mean()
        return nll + 0.01 * routing.aux_loss, {"dropped": routing.dropped}

    cfg = zjax.load_config("configs/tiny.yaml", ["zero.stage=3", "batch.global_batch_size=8", "data.seq_len=8",
                                                 "optimizer.lr=0.01", "precision.compute_dtype=float32"])
    train = zjax.make_train_step(cfg, loss_fn, model=Tiny(nnx.Rngs(0)))
    state = train.init()
    batch = {"tokens": np.tile(np.arange(9, dtype=np.int32), (8, 1)) % 7}
    losses = []
    for _ in range(8):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0]


# --- auxiliary-loss-free balancing (DeepSeek-V3's per-expert selection bias) ------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_selection_bias_chooses_but_does_not_weigh(k):
    x = jnp.asarray(logits(5))
    cfg = GateConfig(E, top_k=k, drop_tokens=False)
    bias = jnp.zeros(E).at[4].set(10.0)  # expert 4 wins every token's first choice
    r = route(x, cfg, bias=bias, train=False)
    expert, _ = r.top(k)
    assert bool(jnp.all(jnp.any(expert == 4, axis=-1)))
    gates = softmax(np.asarray(x))
    if k == 1:  # the combine weight is the unbiased gate
        np.testing.assert_allclose(r.weights[:, 4], gates[:, 4], rtol=1e-6)
    # value 0; the bias's gradient is each expert's load minus the mean load
    assert float(r.balance) == 0.0
    grad = jax.grad(lambda b: route(x, cfg, bias=b, train=False).balance)(bias)
    np.testing.assert_allclose(grad, r.counts - r.counts.mean(), rtol=1e-6)


def test_sign_updates_of_the_bias_balance_a_skewed_router():
    """DeepSeek-V3's rule, bias -= rate * sign(load - mean), on a router that sends most tokens to
    two experts: the busiest expert's load falls from over twice the mean to near it."""
    x = jnp.asarray(logits(6))
    cfg = GateConfig(E, top_k=1, drop_tokens=False)
    bias = jnp.zeros(E)
    before = route(x, cfg, train=False).counts
    for _ in range(200):
        bias = bias - 0.01 * jnp.sign(jax.grad(lambda b: route(x, cfg, bias=b, train=False).balance)(bias))
    after = route(x, cfg, bias=bias, train=False).counts
    assert int(before.max()) > 2 * S / E and int(after.max()) <= 1.5 * S / E


def test_the_train_step_moves_selection_biases_by_the_sign_of_the_load():
    """A third-party NNX model whose MoE has a selection bias, under AdamW with weight decay at ZeRO-1:
    after one step the bias is exactly -rate * sign(load - mean load) of the batch (not an AdamW
    update), and the loss's value and grad norm do not include it."""
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(32, D, rngs=rngs)
            self.moe = MoE(D, F, GateConfig(4, min_capacity=0, use_rts=False), rngs=rngs, balance_bias=True)

        def __call__(self, tokens):
            y, routing = self.moe(self.embed(tokens))
            return y @ self.embed.embedding[...].T, routing

    def loss_fn(model, batch):
        out, routing = model(batch["tokens"][:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(out), batch["tokens"][:, 1:, None], -1).mean()
        return nll + routing.balance, {}

    over = ["zero.stage=1", "batch.global_batch_size=8", "data.seq_len=8", "precision.compute_dtype=float32",
            "optimizer.weight_decay=0.1"]
    with pytest.raises(zjax.ConfigError, match="'expert_bias'.*model.moe.bias_update_rate=0.0"):
        zjax.make_train_step(zjax.load_config("configs/tiny.yaml", over), loss_fn, model=Tiny(nnx.Rngs(0))).init()
    cfg = zjax.load_config("configs/tiny.yaml", [*over, "model.moe.bias_update_rate=0.125"])
    model = Tiny(nnx.Rngs(0))
    batch = {"tokens": np.random.default_rng(0).integers(0, 32, (8, 9)).astype(np.int32)}
    gate_in = model.embed(jnp.asarray(batch["tokens"][:, :-1])).reshape(-1, D)
    counts = np.zeros(4)
    for rows in np.split(np.asarray(gate_in), 8):  # each device routes its own rows
        counts += np.asarray(route(jnp.asarray(rows) @ model.moe.router[...], model.moe.cfg, train=False).counts)
    train = zjax.make_train_step(cfg, loss_fn, model=model)
    state = train.init()
    state, metrics = train(state, batch)
    np.testing.assert_array_equal(np.asarray(state.params["moe"]["expert_bias"]),
                                  (-0.125 * np.sign(counts - counts.mean())).astype(np.float32))
    # the same step with the bias frozen and out of the loss: the same loss and grad norm
    frozen = zjax.make_train_step(cfg, lambda m, b: (loss_fn(m, b)[0] - model_balance(m, b), {}), model=Tiny(nnx.Rngs(0)),
                                  trainable=lambda path, leaf: path[-1] != "expert_bias")
    _, plain = frozen(frozen.init(), batch)
    assert float(metrics["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(plain["grad_norm"]), rel=1e-5)


def model_balance(model, batch):
    return model(batch["tokens"][:, :-1])[1].balance


# --- the reference GPT's model.moe ------------------------------------------------------------

from gpt_helpers import gpt_train, many_steps, rel_norm, token_batches  # noqa: E402

MOE_GPT = ("precision.compute_dtype=float32", "model.moe.num_experts=4", "model.moe.top_k=2",
           "model.moe.use_residual=true", "model.moe.shared_experts=1", "model.moe.router_z_loss=0.001")


def test_the_moe_gpts_loss_adds_the_auxiliary_losses():
    from zjax.models.gpt import gpt_loss, make_gpt

    batch = {"tokens": jnp.asarray(token_batches(1, 4, 16)[0]["tokens"])}
    losses = {}
    for coef in (0.0, 0.5):
        cfg = zjax.load_config("configs/tiny.yaml", [*MOE_GPT, f"model.moe.aux_loss_coef={coef}",
                                                     "model.moe.router_z_loss=0"])
        # two copies: the routers' random stream advances with every call
        model = make_gpt(cfg.model, seed=0)
        twin = nnx.clone(model)
        nll, aux = nnx.jit(lambda m, t: m.token_nll_and_aux(t[:, :-1], t[:, 1:]))(model, batch["tokens"])
        loss = nnx.jit(lambda m, b: gpt_loss(m, b)[0])(twin, batch)
        losses[coef] = (float(loss), float(aux["loss"]), float(nll.mean()))
    assert losses[0.0][1] == 0.0 and losses[0.0][0] == pytest.approx(losses[0.0][2], rel=1e-6)
    # two layers' load-balancing losses, each >= 1 (its minimum, at perfect balance), times 0.5
    assert losses[0.5][1] >= 0.5 * 2 * 0.99
    assert losses[0.5][0] == pytest.approx(losses[0.5][2] + losses[0.5][1], rel=1e-6)


def test_an_moe_reaches_a_lower_validation_loss_than_the_dense_model_at_equal_active_parameters():
    """The tiny GPT dense (d_ff 352) against 8 experts of width 176, top-2 (the same active MLP
    parameters per token, 4x the MLP parameters): 400 steps of 16 x 32 tokens of real text on 2
    devices (each routing its 256 tokens), then the mean loss over 8 held-out batches (measured
    2.622 against 2.643)."""
    val = token_batches(8, 16, 32, split="val")
    batches = token_batches(400, 16, 32)
    found = {}
    for name, over in (("dense", ()), ("moe", ("model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.d_ff=176",
                                               "model.moe.capacity_factor=2"))):
        train, state = gpt_train("precision.compute_dtype=float32", "optimizer.lr=0.003", "mesh.data=2", *over,
                                 devices=jax.devices()[:2])
        step = many_steps(train, state, batches[0])  # train(state, batch)'s program, its code optimized
        for batch in batches:
            state, metrics = step(state, train.shard_batch(batch))
            float(metrics["loss"])  # one step at a time (simulated devices share two cores)
        found[name] = float(np.mean([float(train.evaluate(state, b)) for b in val]))
    assert found["moe"] < found["dense"], found


def test_moe_on_every_kth_layer():
    """model.moe.every=2 over 4 layers: groups of a dense block then an MoE block; two MoE layers
    route every token (top-2: 2 assignments each), the parameter count is count_params'."""
    from zjax.models.gpt import count_params, make_gpt

    cfg = zjax.load_config("configs/tiny.yaml", [*MOE_GPT, "model.n_layers=4", "model.moe.every=2",
                                                 "model.moe.drop_tokens=false"])
    model = make_gpt(cfg.model, seed=0)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert sum(x.size for x in jax.tree.leaves(params)) == count_params(cfg.model)
    blocks = params["blocks"]
    assert set(blocks) == {"dense", "moe"} and len(blocks["dense"]) == 1
    assert blocks["dense"][0]["mlp"]["w_up"].shape == (2, 64, cfg.model.d_ff)  # 2 groups, a dense MLP each
    assert blocks["moe"]["mlp"]["w_up"].shape == (2, 4, 64, cfg.model.d_ff)  # and an MoE of 4 experts
    tokens = jnp.asarray(token_batches(1, 4, 16)[0]["tokens"])
    _, aux = nnx.jit(lambda m, t: m.token_nll_and_aux(t[:, :-1], t[:, 1:]))(model, tokens)
    assert float(aux["assignments"]) == 2 * 2 * tokens[:, :-1].size and float(aux["dropped"]) == 0
    dense = zjax.load_config("configs/tiny.yaml", ["model.n_layers=4"]).model
    # two of the four MLPs became MoEs (router, 4 experts, PR-MoE residual and coefficient, a shared expert)
    mlp = 3 * 64 * cfg.model.d_ff
    assert count_params(cfg.model) - count_params(dense) == 2 * (64 * 4 + 4 * mlp + (mlp + 2 * 64) + mlp - mlp)


def test_moe_settings_not_built_are_clear_errors():
    with pytest.raises(zjax.ConfigError, match="model.moe.top_k=3 is more than model.moe.num_experts=2"):
        zjax.load_config("configs/tiny.yaml", ["model.moe.num_experts=2", "model.moe.top_k=3"])
    with pytest.raises(zjax.ConfigError, match="model.moe.every=3 does not divide model.n_layers=2"):
        from zjax.models.gpt import make_gpt

        make_gpt(zjax.load_config("configs/tiny.yaml", ["model.moe.num_experts=2", "model.moe.every=3"]).model)
    with pytest.raises(zjax.ConfigError, match="mesh.stage=2 with model.moe.num_experts=2 is not built yet"):
        zjax.load_config("configs/tiny.yaml", ["model.moe.num_experts=2", "mesh.stage=2"])


# --- expert parallelism: the experts split over a mesh axis, two all-to-alls ------------------


@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
@pytest.mark.parametrize("k,drop", [(1, True), (1, False), (2, True), (2, False)])
def test_expert_parallelism_equals_each_devices_tokens_through_all_experts(shape, k, drop):
    """expert=8 and data=2 x expert=4: every device routes its own tokens; the result and the
    gradients equal running each device's tokens through the whole MoE alone."""
    from jax.sharding import PartitionSpec as P

    from zjax.analysis import hlo

    experts, tokens_per_device = 8, 12
    devices = shape[0] * shape[1]
    cfg = GateConfig(experts, top_k=k, drop_tokens=drop, min_capacity=1, capacity_factor=1.25)
    key = jax.random.split(jax.random.key(3), 4)
    p = {"router": jax.random.normal(key[0], (D, experts)),
         "w_gate": jax.random.normal(key[1], (experts, D, F)) / 3,
         "w_up": jax.random.normal(key[2], (experts, D, F)) / 3,
         "w_down": jax.random.normal(key[3], (experts, F, D)) / 3}
    x = jax.random.normal(jax.random.key(4), (devices * tokens_per_device, D))
    mesh = jax.make_mesh(shape, ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {"router": P(), "w_gate": P("expert"), "w_up": P("expert"), "w_down": P("expert")}

    def parallel(p, x):
        def local(p, x):
            y, routing = moe_ffn(x, p, cfg, expert_axis="expert")
            return y, routing.dropped[None]
        return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(("data", "expert"))),
                             out_specs=(P(("data", "expert")), P(("data", "expert"))))(p, x)

    def reference(p, x):
        groups = x.reshape(devices, tokens_per_device, D)
        ys, dropped = [], []
        for g in range(devices):
            y, routing = moe_ffn(groups[g], p, cfg)
            ys.append(y)
            dropped.append(routing.dropped)
        return jnp.concatenate(ys), jnp.stack(dropped)

    y, dropped = jax.jit(parallel)(p, x)
    want_y, want_dropped = jax.jit(reference)(p, x)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dropped, want_dropped)
    if drop:
        assert int(dropped.sum()) > 0
    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)[0]))  # noqa: E731
    grads = jax.jit(jax.grad(loss(parallel), argnums=(0, 1)))(p, x)
    want = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(p, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # two all-to-alls of [E, C, d] per layer forward, four with the backward; no weight gathered
    cap = tokens_per_device if not drop else capacity(tokens_per_device, experts, k, 1.25, 1)
    text = jax.jit(jax.grad(loss(parallel), argnums=(0, 1))).lower(p, x).compile().as_text()
    found = hlo.collectives(text, devices, dict(mesh.shape))
    a2a = [c for c in found if c.kind == "all-to-all"]
    assert len(a2a) == 4 and {c.full_bytes for c in a2a} == {4 * experts * cap * D}
    assert not any(c.kind == "all-gather" for c in found)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ragged_grouped_matmuls_equal_dropless_slots(k):
    """dispatch='ragged' (lax.ragged_dot over each expert's rows, no capacity slots) gives the
    dense dropless layer's output and gradients."""
    p = params(k, residual=k == 2)
    x = jax.random.normal(jax.random.key(7), (S, D))
    dense = GateConfig(E, top_k=k, drop_tokens=False)
    ragged = GateConfig(E, top_k=k, drop_tokens=False, dispatch="ragged")

    def loss(cfg):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(moe_ffn(x, p, cfg)[0])), argnums=(0, 1)))

    (a, ga), (b, gb) = loss(ragged)(p, x), loss(dense)(p, x)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    with pytest.raises(zjax.ConfigError, match="dispatch='ragged' runs every token's experts"):
        GateConfig(E, dispatch="ragged")
    # auto: on this CPU the dense slots (the grouped matmuls are a kernel on GPU and TPU only)
    from zjax.models.moe import resolve_dispatch

    auto = GateConfig(E, top_k=k, drop_tokens=False, dispatch="auto")
    assert resolve_dispatch(auto) == "dense" and resolve_dispatch(auto, backend="gpu") == "ragged"
    np.testing.assert_array_equal(moe_ffn(x, p, auto)[0], moe_ffn(x, p, dense)[0])


def test_the_gpts_ragged_dispatch_equals_its_dropless_slots():
    from zjax.models.gpt import make_gpt

    tokens = jnp.asarray(token_batches(1, 4, 16)[0]["tokens"])
    nll = {}
    for dispatch in ("dense", "ragged"):
        cfg = zjax.load_config("configs/tiny.yaml", ["model.moe.num_experts=4", "model.moe.top_k=2",
                                                     "model.moe.drop_tokens=false", f"model.moe.dispatch={dispatch}"])
        nll[dispatch] = nnx.jit(lambda m, t: m.token_nll(t[:, :-1], t[:, 1:]))(make_gpt(cfg.model, seed=0), tokens)
    np.testing.assert_allclose(nll["ragged"], nll["dense"], rtol=1e-5, atol=1e-6)


def test_the_moe_gpt_over_mesh_expert_trains_like_data_parallelism(tmp_path):
    """data=2 x expert=4 at ZeRO-3 against data=8 at ZeRO-0: the batch is split over expert
    outside the experts, each device routes its own rows, the experts (8, two per device) are
    split over expert and reached by all-to-alls; losses, params and the dropped fraction
    equal data=8's (each device routes the same rows)."""
    from zjax.analysis import hlo
    from zjax.models.gpt import count_params

    over = (*MOE_GPT, "model.moe.num_experts=8", "model.moe.use_rts=false", "model.moe.second_expert_sampling=false")
    runs = {}
    for expert, stage in ((1, 0), (4, 3)):
        train, state = gpt_train(*over, f"mesh.expert={expert}", f"zero.stage={stage}")
        losses = []
        for batch in token_batches(2, 16, 32):
            state, metrics = train(state, batch)
            losses.append(float(metrics["loss"]))
        runs[expert] = (np.array(losses), state, train, float(metrics["moe_dropped_fraction"]))
    np.testing.assert_allclose(runs[4][0], runs[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs[4][1].params), jax.tree.leaves(runs[1][1].params)):
        assert rel_norm(a, b) < 1e-5
    # the loss's extra scalars are step metrics: the fraction of assignments capacity dropped
    assert 0 < runs[1][3] < 1 and runs[4][3] == pytest.approx(runs[1][3], rel=1e-6)
    cfg = zjax.load_config("configs/tiny.yaml", list(over))
    assert count_params(cfg.model) == sum(x.size for x in jax.tree.leaves(runs[1][1].params))
    train, state = runs[4][2], runs[4][1]
    w = state.master["blocks"]["mlp"]["w_gate"]  # [layers, experts, embed, mlp]: experts over expert, embed over data
    assert w.shape == (2, 8, 64, 176)
    assert w.sharding.spec[1] == "expert" and {s.data.shape[1] for s in w.addressable_shards} == {2}
    text = train.lower(state, token_batches(1, 16, 32)[0]).compile().as_text()
    found = [c for c in hlo.collectives(text, 8, dict(train.mesh.shape)) if "expert" in c.axes]
    # each device's 64 tokens: capacity ceil(64 / 8 x 2) = 16 slots per expert, [E, C, d] float32
    a2a = [c for c in found if c.kind == "all-to-all"]
    assert a2a and {c.full_bytes for c in a2a} == {8 * 16 * 64 * 4}
    # two per layer forward and two in its backward, over the 2 layers of the scan
    assert sum(c.runs for c in a2a) == 4 * 2, [(c.kind, c.runs) for c in a2a]
    assert not any(c.kind == "all-gather" for c in found)
    # a checkpoint saved at expert=4 (ZeRO-3) restores at expert=2 (ZeRO-1) bit for bit
    from zjax.checkpoint import to_portable

    ckpt = zjax.Checkpointer(tmp_path)
    ckpt.save(int(state.step), state)
    ckpt.wait()
    expected = jax.tree.map(np.asarray, to_portable(state))
    target, _ = gpt_train(*over, "mesh.expert=2", "zero.stage=1")
    restored, _ = ckpt.restore(target)
    got = to_portable(restored)
    for part in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(expected[part])):
            np.testing.assert_array_equal(np.asarray(a), b)
    ckpt.close()


def test_expert_parallelism_composes_with_tensor_parallelism_inside_the_experts():
    """data=2 x expert=2 x tensor=2 (each expert's hidden width split over tensor) at ZeRO-1: the
    losses of data=8 at ZeRO-0. A data device routes its own rows, and with tensor=2 it holds
    twice data=8's: dropless and without the load-balancing loss (the two things that depend on
    the routing group) the runs are the same function."""
    over = (*MOE_GPT, "model.moe.num_experts=4", "model.moe.second_expert_sampling=false",
            "model.moe.drop_tokens=false", "model.moe.aux_loss_coef=0")

    def losses(*overrides):
        train, state = gpt_train(*over, *overrides)
        out = []
        for batch in token_batches(2, 16, 32):
            state, metrics = train(state, batch)
            out.append(float(metrics["loss"]))
        return np.array(out), state

    got, state = losses("mesh.expert=2", "mesh.tensor=2", "zero.stage=1")
    want, _ = losses()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    w = state.replicated["blocks"]["mlp"]["w_up"]  # [layers, experts, embed, mlp]
    assert tuple(w.sharding.spec)[1:] == ("expert", None, "tensor")


def test_deepspeeds_ep_size_sets_the_expert_axis():
    cfg = zjax.load_config("configs/tiny.yaml", ["model.moe.num_experts=8", "model.moe.ep_size=4"])
    assert cfg.mesh.expert == 4
    with pytest.raises(zjax.ConfigError, match="model.moe.ep_size=4 .* and mesh.expert=2 disagree"):
        zjax.load_config("configs/tiny.yaml", ["model.moe.num_experts=8", "model.moe.ep_size=4", "mesh.expert=2"])
