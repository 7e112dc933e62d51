import time, jax, jax.numpy as jnp, numpy as np
from pallas_kernels import flash_attention, attention_reference
def run(B, L, H, KH, D, causal, seg, bs, dtype=jnp.float32, Lk=None):
    Lk = Lk or L
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B,L,H,D), dtype); k = jax.random.normal(ks[1], (B,Lk,KH,D), dtype); v = jax.random.normal(ks[2], (B,Lk,KH,D), dtype)
    sid = jnp.sort(jax.random.randint(ks[3], (B,L), 0, 3), axis=1) if seg else None
    ct = jax.random.normal(ks[4], (B,L,H,D), jnp.float32)
    def loss(impl):
        return lambda q,k,v: (flash_attention(q,k,v,causal=causal,segment_ids=sid,impl=impl,block_sizes=bs).astype(jnp.float32)*ct).sum()
    t=time.time()
    o1 = jax.jit(lambda q,k,v: flash_attention(q,k,v,causal=causal,segment_ids=sid,impl='interpret',block_sizes=bs))(q,k,v)
    o2 = attention_reference(q,k,v,causal=causal,segment_ids=sid)
    if not seg and Lk==L:
        mask=None
    o3 = jax.nn.dot_product_attention(q,k,v,is_causal=causal, mask=None if sid is None else (sid[:,None,:,None]==sid[:,None,None,:]))
    g1 = jax.jit(jax.grad(loss('interpret'), argnums=(0,1,2)))(q,k,v)
    g2 = jax.grad(loss('xla'), argnums=(0,1,2))(q,k,v)
    f = lambda a,b: float(jnp.abs(a.astype(jnp.float32)-b.astype(jnp.float32)).max())
    print(B,L,H,KH,D,causal,seg,bs, 'fwd', f(o1,o2), f(o1,o3), 'grads', [f(a,b) for a,b in zip(g1,g2)], f'{time.time()-t:.1f}s')
run(2, 7, 4, 2, 32, False, False, None)
run(2, 7, 4, 2, 32, True, False, None)
run(2, 100, 4, 1, 32, True, True, (16,32))
run(1, 1, 2, 2, 64, True, False, None)
run(1, 37, 2, 1, 64, False, False, (16,16), Lk=50)
run(2, 100, 4, 2, 32, True, True, (32,16), dtype=jnp.bfloat16)
