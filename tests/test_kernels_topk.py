"""pallas_kernels.topk in interpret mode against a numpy brute force (exact, ties to the lower index)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.topk import TopkConfig, topk, topk_padded_rows, topk_reference


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


def edge_rows(x: np.ndarray, rng) -> np.ndarray:
    """Rows: all -inf; 3 finite values; heavy ties; +inf/NaN sprinkled; constant; the rest random."""
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


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    s = int(rng.integers(300, 900))
    k = int(rng.integers(5, 60))
    x = edge_rows(rng.standard_normal((2, 4, s)).astype(np.float32).reshape(8, s), rng).reshape(2, 4, s)
    got = topk(jnp.asarray(x), k, interpret=True)
    chex.assert_shape(got, (2, 4, k))
    chex.assert_type(got, jnp.int32)
    want = numpy_topk(x, k)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(topk_reference, static_argnums=1)(jnp.asarray(x), k)), want)
    rows = want.reshape(8, k)
    assert (rows[0] == -1).all() and (rows[1, 3:] == -1).all() and (rows[1, :3] >= 0).all()


def test_topk_k_larger_than_row():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 37)).astype(np.float32)
    x[1, 10:] = -np.inf
    got = np.asarray(topk(jnp.asarray(x), 50, interpret=True))
    np.testing.assert_array_equal(got, numpy_topk(x, 50))
    assert (got[0, 37:] == -1).all() and (got[1, 10:] == -1).all()


def test_topk_bf16_scores():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)  # bf16 has many ties
    got = np.asarray(topk(x, 31, interpret=True))
    np.testing.assert_array_equal(got, numpy_topk(np.asarray(x, np.float32), 31))


def test_topk_sampled_threshold_and_fallback():
    """Small candidate buffer and sample: random rows take the sampled fast path, a constant row (every element a
    candidate, overflowing the buffer) and tie-heavy rows exercise the exact whole-row fallback."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 3000)).astype(np.float32)
    x[6] = 2.0
    x[7] = np.round(x[7] * 2)
    x[8] = np.sort(x[8])  # position-correlated values: the strided sample still bounds the answer
    x[9, :2990] = -np.inf
    cfg = TopkConfig(block=256, cand_factor=4, n_sample=64, select_block=16, num_warps=4)
    got = np.asarray(topk_padded_rows(jnp.asarray(x), 8, interpret=True, config=cfg))
    np.testing.assert_array_equal(got, numpy_topk(x, 8))


@pytest.mark.parametrize("fn", [topk, topk_reference], ids=["topk", "topk_reference"])
def test_topk_refuses_bad_k_and_scores(fn):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9)), jnp.float32)
    for bad_k in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="k must be a non-negative integer"):
            fn(x, bad_k)
    with pytest.raises(ValueError, match="scores must be a floating array"):
        fn(x.astype(jnp.int32), 3)
    with pytest.raises(ValueError, match="scores must be a floating array"):
        fn(x[0, 0], 3)


@pytest.mark.parametrize("fn", [topk, topk_reference], ids=["topk", "topk_reference"])
@pytest.mark.parametrize("shape,k", [((3, 0), 4), ((0, 7), 4), ((3, 7), 0)])
def test_topk_without_work(fn, shape, k):
    """No row, S = 0 or k = 0: the result keeps the shape [..., k], every slot -1."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal(shape), jnp.float32)
    got = np.asarray(fn(x, k))
    want = numpy_topk(np.asarray(x), k)
    assert got.shape == want.shape == (*shape[:-1], k) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
