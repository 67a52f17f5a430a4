"""Exploration: H=128 decode kernel time against the number of key blocks, per probe mode."""
import sys, os, time, statistics
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import jax, jax.numpy as jnp
from pallas_kernels import _sparse_mla_hopper as hk
from pallas_kernels.sparse_mla import _LOG2E
from sparse_mla import _time_ms

B, H, S, D, V = 64, 128, 65536, 576, 512
ks = [int(x) for x in os.environ.get("KS", "64,512,2048,4096").split(",")]
probes = os.environ.get("PROBES", ",no_gather,no_compute").split(",")
iters = int(os.environ.get("ITERS", "100"))
key = jax.random.key(0)
q = jax.random.normal(key, (B, H, D), jnp.bfloat16)
kv = jax.random.normal(jax.random.key(1), (B, S, D), jnp.bfloat16)
for k in ks:
    idx = [jax.random.randint(jax.random.key(10 + i), (B, 1, k), 0, S, jnp.int32) for i in range(3)]
    for p in probes:
        f = jax.jit(lambda q_, kv_, i_, p=p: hk.sparse_mla_hopper(q_, kv_, i_, tokens=1, v_dim=V, scale_log2=0.06 * _LOG2E, probe=p))
        ms = _time_ms(f, [(q, kv, i) for i in idx], iters, 5)
        print(f"K={k:5d} probe={p or 'full':10s} {1e3 * ms:8.2f} us  per-block {1e3 * ms / (k // 64):6.3f} us", flush=True)
