"""numpy float64 sparse MLA: the independent reference of the kernel tests and of `benchmarks/sparse_mla.py`.

numpy only, so the GPU benchmark can import it without the test dependencies.
"""

import numpy as np


def sparse_mla_f64(q, kv, indices, sm_scale, v_dim):
    """q [B, T, H, D], kv [B, S, D], indices [B, T, K] -> out [B, T, H, v_dim], lse [B, T, H] (natural log).

    An index < 0 or >= S is skipped; a repeated index is its own softmax term. A row with no valid index gives
    out = 0 and lse = -inf.
    """
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv, np.float64)
    indices = np.asarray(indices)
    batch, tokens, heads, _ = q.shape
    seq_len = kv.shape[1]
    out = np.zeros((batch, tokens, heads, v_dim))
    lse = np.full((batch, tokens, heads), -np.inf)
    for b in range(batch):
        for t in range(tokens):
            ids = indices[b, t]
            ids = ids[(ids >= 0) & (ids < seq_len)]
            if ids.size == 0:
                continue
            rows = kv[b, ids]  # [k, D]
            s = sm_scale * q[b, t] @ rows.T  # [H, k]
            m = s.max(axis=1, keepdims=True)
            e = np.exp(s - m)
            out[b, t] = (e / e.sum(axis=1, keepdims=True)) @ rows[:, :v_dim]
            lse[b, t] = np.log(e.sum(axis=1)) + m[:, 0]
    return out, lse
