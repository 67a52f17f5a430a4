"""The model's kernel dispatch: backend choice and the query-chunked XLA sparse attention."""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from indexcache_jax.inference import kernels


def test_chunked_reference_equals_float64_bruteforce(monkeypatch):
    rng = np.random.default_rng()
    b, t, h, d, s, k, v = 2, int(rng.integers(20, 40)), 3, 24, 50, 9, 16
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    kv = rng.standard_normal((b, s, d)).astype(np.float32)
    idx = rng.integers(-2, s + 2, (b, t, k)).astype(np.int32)
    idx[0, 3] = -1  # a query with no valid key
    monkeypatch.setattr(kernels, "_REFERENCE_GATHER_BYTES", b * k * d * 4 * 5)  # chunks of 4 queries
    out, lse = kernels.sparse_mla(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx), sm_scale=0.2, v_dim=v,
                                  backend="xla")
    assert out.shape == (b, t, h, v) and lse.shape == (b, t, h)
    for bi in range(b):
        for ti in range(t):
            valid = idx[bi, ti][(idx[bi, ti] >= 0) & (idx[bi, ti] < s)]
            for hi in range(h):
                if len(valid) == 0:
                    assert np.all(np.asarray(out[bi, ti, hi]) == 0) and np.isneginf(lse[bi, ti, hi])
                    continue
                logits = 0.2 * kv[bi, valid].astype(np.float64) @ q[bi, ti, hi].astype(np.float64)
                p = np.exp(logits - logits.max())
                ref = (p / p.sum()) @ kv[bi, valid, :v].astype(np.float64)
                np.testing.assert_allclose(np.asarray(out[bi, ti, hi]), ref, rtol=1e-4, atol=1e-5)
                assert abs(float(lse[bi, ti, hi]) - (np.log(p.sum()) + logits.max())) < 1e-4
    full_out, _ = pk.sparse_mla_reference(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(idx), sm_scale=0.2, v_dim=v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full_out), rtol=1e-6, atol=1e-6)


def test_backend_switch():
    assert kernels.use_pallas("pallas") and not kernels.use_pallas("xla")
    with pytest.raises(ValueError, match="backend"):
        kernels.use_pallas("cuda")
