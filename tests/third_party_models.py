"""Small models written the way their authors write them, not the way zjax would like.

None of them calls ``zjax.scan_layers``: the NNX model loops over its blocks in
Python, another NNX model builds its blocks with ``nnx.vmap`` and runs them with
``nnx.scan``, the Linen model stacks its blocks with ``nn.scan`` (the partition name
``layers``, as MaxText does), and the plain pytrees are dicts or one bare array. Each
has an init, a ``loss_fn(params_or_module, batch)`` and a batch maker; shapes are
tiny (d <= 64) so a step compiles in seconds on 2 cores.

``init_*`` returns what a user would hand to zjax: an NNX module, Linen params boxed
by ``nn.with_logical_partitioning``, or a plain pytree. ``plain_params`` turns any of
them into the pure pytree a hand-written ``jax.jit`` + optax loop trains, with the same
tree structure as zjax's ``state.params``.
"""
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 257  # odd on purpose: divides by no device count
D_MODEL = 32
D_FF = 64
N_LAYERS = 4
SEQ = 9  # tokens per row: 8 inputs and their 8 next-token targets


def lm_batches(n, batch=16, seq=SEQ, vocab=VOCAB, seed=0):
    """``n`` global batches ``{"tokens": int32[batch, seq]}``: random first tokens, then the
    learnable rule ``next = (5 * token + 3) % vocab``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = np.empty((batch, seq), np.int64)
        tokens[:, 0] = rng.integers(0, vocab, batch)
        for t in range(1, seq):
            tokens[:, t] = (5 * tokens[:, t - 1] + 3) % vocab
        out.append({"tokens": tokens.astype(np.int32)})
    return out


def _next_token_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


# -- Flax NNX: a Python loop over blocks ----------------------------------------------------


def _nnx_init(init, names):
    """Logical axes as metadata only (README): building the model needs no mesh."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


class NNXBlock(nnx.Module):
    """Pre-norm residual MLP block: LayerNorm, Linear + bias, gelu, Linear + bias."""

    def __init__(self, d, f, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(
            d,
            scale_init=_nnx_init(nnx.initializers.ones_init(), ("embed",)),
            bias_init=_nnx_init(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.up = nnx.Linear(
            d, f,
            kernel_init=_nnx_init(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=_nnx_init(nnx.initializers.normal(0.02), ("mlp",)),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            f, d,
            kernel_init=_nnx_init(nnx.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=_nnx_init(nnx.initializers.normal(0.02), ("embed",)),
            rngs=rngs,
        )

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class NNXLoopLM(nnx.Module):
    """Embedding (vocabulary 257), ``n_layers`` blocks called in a Python loop, LayerNorm, head.

    With ``seam=True`` each block is called through ``zjax.layer`` (the one line a user adds
    for per-layer ZeRO-3 gathers and remat)."""

    def __init__(self, vocab=VOCAB, d=D_MODEL, f=D_FF, n_layers=N_LAYERS, seam=False, *, rngs: nnx.Rngs):
        self.seam = seam
        self.embed = nnx.Embed(
            vocab, d, embedding_init=_nnx_init(nnx.initializers.normal(1.0), ("vocab", "embed")), rngs=rngs
        )
        self.layers = nnx.List([NNXBlock(d, f, rngs=rngs) for _ in range(n_layers)])
        self.final_norm = nnx.LayerNorm(
            d,
            scale_init=_nnx_init(nnx.initializers.ones_init(), ("embed",)),
            bias_init=_nnx_init(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.head = nnx.Linear(
            d, vocab,
            kernel_init=_nnx_init(nnx.initializers.lecun_normal(), ("embed", "vocab")),
            bias_init=_nnx_init(nnx.initializers.zeros_init(), ("vocab",)),
            rngs=rngs,
        )

    def __call__(self, tokens):
        import zjax

        x = self.embed(tokens)
        for layer in self.layers:
            x = zjax.layer(layer)(x) if self.seam else layer(x)
        return self.head(self.final_norm(x))


def init_nnx_loop(seed=0, **kwargs):
    return NNXLoopLM(rngs=nnx.Rngs(seed), **kwargs)


def init_nnx_layer(seed=0, **kwargs):
    return NNXLoopLM(rngs=nnx.Rngs(seed), seam=True, **kwargs)


def nnx_loop_loss(model, batch):
    tokens = batch["tokens"]
    return _next_token_loss(model(tokens[:, :-1]), tokens)


class NNXScanLM(nnx.Module):
    """The same blocks as one ``nnx.vmap``-created stack run by ``nnx.scan`` (Flax's scan-over-layers
    recipe); the partition name ``layers`` puts that axis first in each Param's ``out_sharding``."""

    def __init__(self, vocab=VOCAB, d=D_MODEL, f=D_FF, n_layers=N_LAYERS, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(
            vocab, d, embedding_init=_nnx_init(nnx.initializers.normal(1.0), ("vocab", "embed")), rngs=rngs
        )

        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return NNXBlock(d, f, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = nnx.LayerNorm(
            d,
            scale_init=_nnx_init(nnx.initializers.ones_init(), ("embed",)),
            bias_init=_nnx_init(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.head = nnx.Linear(
            d, vocab,
            kernel_init=_nnx_init(nnx.initializers.lecun_normal(), ("embed", "vocab")),
            bias_init=_nnx_init(nnx.initializers.zeros_init(), ("vocab",)),
            rngs=rngs,
        )

    def __call__(self, tokens):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run_blocks(block, x):
            return block(x)

        return self.head(self.final_norm(run_blocks(self.blocks, self.embed(tokens))))


def init_nnx_scan(seed=0, **kwargs):
    return NNXScanLM(rngs=nnx.Rngs(seed), **kwargs)


nnx_scan_loss = nnx_loop_loss


# -- Flax Linen: a standard nn.scan stack -----------------------------------------------------


def _linen_init(init, names):
    return nn.with_logical_partitioning(init, names)


class LinenBlock(nn.Module):
    """The NNX block in Linen, shaped as an ``nn.scan`` body: ``(carry, x) -> (carry, y)``."""

    d: int
    f: int

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(
            scale_init=_linen_init(nn.initializers.ones, ("embed",)),
            bias_init=_linen_init(nn.initializers.zeros, ("embed",)),
        )(x)
        h = nn.Dense(
            self.f,
            kernel_init=_linen_init(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=_linen_init(nn.initializers.normal(0.02), ("mlp",)),
        )(h)
        h = nn.Dense(
            self.d,
            kernel_init=_linen_init(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=_linen_init(nn.initializers.normal(0.02), ("embed",)),
        )(jax.nn.gelu(h))
        return x + h, None


class LinenScanLM(nn.Module):
    """Embedding, an ``nn.scan`` stack of blocks (params stacked on a leading ``layers`` axis), head."""

    vocab: int = VOCAB
    d: int = D_MODEL
    f: int = D_FF
    n_layers: int = N_LAYERS

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            self.vocab, self.d, embedding_init=_linen_init(nn.initializers.normal(1.0), ("vocab", "embed"))
        )(tokens)
        stack = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.d, self.f, name="layers")(x, None)
        x = nn.LayerNorm(
            scale_init=_linen_init(nn.initializers.ones, ("embed",)),
            bias_init=_linen_init(nn.initializers.zeros, ("embed",)),
        )(x)
        return nn.Dense(
            self.vocab,
            kernel_init=_linen_init(nn.initializers.lecun_normal(), ("embed", "vocab")),
            bias_init=_linen_init(nn.initializers.zeros, ("vocab",)),
        )(x)


LINEN_MODEL = LinenScanLM()


def init_linen_scan(seed=0):
    """Linen params as ``module.init`` returns them: boxed with logical names, ``layers`` first in the stack."""
    return LINEN_MODEL.init(jax.random.key(seed), jnp.zeros((1, SEQ - 1), jnp.int32))["params"]


def linen_scan_loss(params, batch):
    tokens = batch["tokens"]
    return _next_token_loss(LINEN_MODEL.apply({"params": params}, tokens[:, :-1]), tokens)


def linen_logical_axes(boxed):
    """Each parameter's logical axis names, read from the boxes (what zjax reads itself)."""
    return jax.tree.map(
        lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else (),
        boxed,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


# -- a plain pytree whose blocks a Python loop calls through zjax.layer ----------------------------


def init_dict_layer(seed=0, vocab=VOCAB, d=D_MODEL, f=D_FF, n_layers=N_LAYERS):
    """Embedding, a list of ``n_layers`` residual MLP blocks (dicts), head: no logical axes."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 * n_layers + 2))
    return {
        "embed": jax.random.normal(next(keys), (vocab, d)),
        "blocks": [
            {"w1": jax.random.normal(next(keys), (d, f)) / np.sqrt(d), "b1": jnp.zeros((f,)),
             "w2": jax.random.normal(next(keys), (f, d)) / np.sqrt(f), "b2": jnp.zeros((d,))}
            for _ in range(n_layers)
        ],
        "head": jax.random.normal(next(keys), (d, vocab)) / np.sqrt(d),
    }


def dict_block(p, x):
    return x + jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def dict_layer_loss(params, batch):
    import zjax

    tokens = batch["tokens"]
    x = params["embed"][tokens[:, :-1]]
    for p in params["blocks"]:
        x = zjax.layer(dict_block)(p, x)
    return _next_token_loss(x @ params["head"], tokens)


# -- plain pytrees ------------------------------------------------------------------------------

MLP_IN, MLP_HIDDEN, MLP_OUT = 13, 48, 5


def init_mlp(seed=0):
    """A dict MLP with odd shapes (13 inputs, 5 classes)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "w1": jax.random.normal(k1, (MLP_IN, MLP_HIDDEN)) / np.sqrt(MLP_IN),
        "b1": jnp.zeros((MLP_HIDDEN,)),
        "w2": jax.random.normal(k2, (MLP_HIDDEN, MLP_OUT)) / np.sqrt(MLP_HIDDEN),
        "b2": jnp.zeros((MLP_OUT,)),
    }


def mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def init_single(seed=0):
    """The whole model is one array: a softmax regression's [13, 5] weight matrix."""
    return jax.random.normal(jax.random.key(seed), (MLP_IN, MLP_OUT)) / np.sqrt(MLP_IN)


def single_loss(w, batch):
    return optax.softmax_cross_entropy_with_integer_labels(batch["x"] @ w, batch["y"]).mean()


def classification_batches(n, batch=16, seed=0):
    """``n`` global batches ``{"x": float32[batch, 13], "y": int32[batch]}`` with a learnable rule."""
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(MLP_IN, MLP_OUT))
    out = []
    for _ in range(n):
        x = rng.normal(size=(batch, MLP_IN)).astype(np.float32)
        out.append({"x": x, "y": np.argmax(x @ proj, axis=1).astype(np.int32)})
    return out


# -- what a hand-written loop trains ---------------------------------------------------------------


def plain_params(given):
    """The pure pytree of arrays behind an NNX module, boxed Linen params or a plain tree."""
    if isinstance(given, nnx.Module):
        return nnx.to_pure_dict(nnx.state(given, nnx.Param))
    return nn.meta.unbox(given)


def plain_loss(given, loss_fn):
    """``loss(params, batch)`` on the pure pytree: NNX modules are merged back around it."""
    if isinstance(given, nnx.Module):
        graphdef, _, rest = nnx.split(given, nnx.Param, ...)

        def loss(params, batch):
            return loss_fn(nnx.merge(graphdef, params, rest), batch)

        return loss
    return loss_fn


def optax_loop(params, loss, tx, batches):
    """The hand-written baseline: one device, ``jax.jit`` + optax, the whole global batch per step.

    ``params`` and ``loss(params, batch)`` are pure (``plain_params``, ``plain_loss``). Returns
    ``(losses, params)`` on the host (each loss before its update).
    """
    params = jax.device_put(params, jax.devices()[0])
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    losses = []
    for batch in batches:
        params, opt, value = step(params, opt, batch)
        losses.append(float(value))
    return np.array(losses), jax.device_get(params)


MODELS = {
    "nnx_loop": (init_nnx_loop, nnx_loop_loss, lm_batches),
    "nnx_layer": (init_nnx_layer, nnx_loop_loss, lm_batches),
    "dict_layer": (init_dict_layer, dict_layer_loss, lm_batches),
    "linen_scan": (init_linen_scan, linen_scan_loss, lm_batches),
    "nnx_scan": (init_nnx_scan, nnx_scan_loss, lm_batches),
    "plain_mlp": (init_mlp, mlp_loss, classification_batches),
    "single_array": (init_single, single_loss, classification_batches),
}


def zero_config(stage, *overrides):
    """tiny.yaml at ``stage`` in fp32 without clipping (so an optax loop is the reference)."""
    import zjax

    return zjax.load_config(
        str(ROOT / "configs" / "tiny.yaml"),
        [f"zero.stage={stage}", "gradient_clipping=0", "precision.compute_dtype=float32",
         "batch.global_batch_size=16", "batch.grad_accum_steps=1", *overrides],
    )


def train_step(model, stage, tx, *overrides):
    """A TrainStep for ``MODELS[model]`` and its initial state, given the way its author would give it."""
    import zjax

    init, loss_fn, _ = MODELS[model]
    given = init()
    if isinstance(given, nnx.Module):
        train = zjax.make_train_step(zero_config(stage, *overrides), loss_fn, model=given, optimizer=tx)
        return train, train.init()
    train = zjax.make_train_step(zero_config(stage, *overrides), loss_fn, optimizer=tx)
    return train, train.init(given)
