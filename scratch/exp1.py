import sys, os
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "."); sys.path.insert(0, "scratch")
import numpy as np, jax, jax.numpy as jnp
import hk_exp as hk
from pallas_kernels.sparse_mla import _LOG2E
from sparse_mla import _time_ms

B, H, S, D, V = 64, 128, 65536, 576, 512
iters = int(os.environ.get("ITERS", "100"))
q = jax.random.normal(jax.random.key(0), (B, H, D), jnp.bfloat16)
kv = jax.random.normal(jax.random.key(1), (B, S, D), jnp.bfloat16)
variants = [dict(), dict(tma_store=True), dict(lazy=True), dict(norescale=True), dict(lazy=True, tma_store=True)]
for k in [int(x) for x in os.environ.get("KS", "64,2048").split(",")]:
    idx = [jax.random.randint(jax.random.key(10 + i), (B, 1, k), 0, S, jnp.int32) for i in range(3)]
    ref = None
    for v in variants:
        f = jax.jit(lambda q_, kv_, i_, v=v: hk.sparse_mla_hopper(q_, kv_, i_, tokens=1, v_dim=V, scale_log2=0.06 * _LOG2E, **v))
        o, l = f(q, kv, idx[0])
        if ref is None:
            ref = (np.asarray(o.astype(jnp.float32)), np.asarray(l))
        elif not (v.get("nostore") or v.get("norescale")):
            err = np.abs(np.asarray(o.astype(jnp.float32)) - ref[0]).max() / np.abs(ref[0]).max()
            lerr = np.abs(np.asarray(l) - ref[1]).max()
            print("   check", v, f"rel {err:.2e} lse {lerr:.2e}", flush=True)
            assert err < 2e-2 and lerr < 1e-3, v
        ms = _time_ms(f, [(q, kv, i) for i in idx], iters, 5)
        print(f"K={k:5d} {str(v):40s} wall {1e3 * ms:8.2f} us", flush=True)
