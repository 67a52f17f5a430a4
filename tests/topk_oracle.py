"""numpy float64 oracles of the indexer logits and the top-k selection: the independent references of the kernel
tests (tests/test_kernels_topk.py, test_kernels_indexer.py, test_indexer_fp8.py) and of the top-k benchmarks.

numpy only, so a GPU benchmark can import it without the test dependencies.
"""

import numpy as np


def numpy_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite values per row (ties: lower index), ascending, then -1."""
    x = np.asarray(x, np.float64)
    out = np.full(x.shape[:-1] + (k,), -1, np.int64)
    rows = int(np.prod(x.shape[:-1]))
    flat_x, flat_o = x.reshape(rows, x.shape[-1]), out.reshape(rows, k)
    for r, row in enumerate(flat_x):
        idx = np.flatnonzero(np.isfinite(row))
        order = np.lexsort((idx, -row[idx]))  # by value descending, then index ascending
        chosen = np.sort(idx[order[:k]])
        flat_o[r, : len(chosen)] = chosen
    return out


def mask_past(x: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """x [R, S] with the columns past each row's limit set to -inf (what a limited top-k must ignore)."""
    x = np.array(x, np.float64)
    cols = np.arange(x.shape[-1])
    return np.where(cols[None, :] <= np.asarray(limits)[:, None], x, -np.inf)


def edge_rows(x: np.ndarray, rng) -> np.ndarray:
    """Rows: all -inf; 3 finite values; heavy ties; +inf/NaN sprinkled; constant; -0.0 and 0.0; the rest as given."""
    s = x.shape[-1]
    x[0] = -np.inf
    x[1] = -np.inf
    x[1, rng.choice(s, 3, replace=False)] = rng.standard_normal(3)
    x[2] = np.round(x[2])
    x[3, ::5] = np.inf
    x[3, 2::7] = np.nan
    x[4] = 1.25
    x[5, 0] = -0.0
    x[5, 1] = 0.0
    return x


def numpy_logits(q, k, w, q_positions=None, k_lengths=None, q_scale=None, k_scale=None, key_offset=0,
                 num_keys=None):
    """float64 indexer logits over the key window k[:, key_offset : key_offset + num_keys]:
    out[b,t,s] = k_scale[b,off+s] * sum_h w[b,t,h] q_scale[b,t,h] relu(q[b,t,h].k[b,off+s]); -inf where key s
    is invalid (s > q_positions[b,t], default num_keys - T + t, or s >= k_lengths[b]).

    Inputs are anything np.asarray(..., float32) reads (pass float8 / bfloat16 arrays converted to float32)."""
    q, k, w = (np.asarray(a, np.float64) for a in (q, k, w))
    n = k.shape[1] - key_offset if num_keys is None else num_keys
    k = k[:, key_offset:key_offset + n]
    b, t, h, _ = q.shape
    if q_scale is not None:
        w = w * np.asarray(q_scale, np.float64)
    out = np.einsum("bths,bth->bts", np.maximum(np.einsum("bthd,bsd->bths", q, k), 0.0), w)
    if k_scale is not None:
        out = out * np.asarray(k_scale, np.float64)[:, key_offset:key_offset + n][:, None, :]
    qp = np.broadcast_to(n - t + np.arange(t) if q_positions is None else np.asarray(q_positions), (b, t))
    kl = np.full((b,), n) if k_lengths is None else np.broadcast_to(np.asarray(k_lengths), (b,))
    sidx = np.arange(n)
    valid = (sidx[None, None, :] <= qp[..., None]) & (sidx[None, None, :] < kl[:, None, None])
    return np.where(valid, out, -np.inf)
