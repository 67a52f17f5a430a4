"""pallas_kernels.topk in interpret mode against a numpy brute force (exact, ties to the lower index)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.topk import (DEFAULT_SPLIT_TOPK_CONFIG, SplitTopkConfig, TopkConfig, topk, topk_reference,
                                 topk_rows, uses_split)
from topk_oracle import edge_rows, mask_past, numpy_topk

# Small launch settings so that interpret-mode rows of a few thousand columns take every path: a sampled
# threshold, several blocks per segment, several programs per row, a candidate buffer that can overflow.
SMALL_ONE = TopkConfig(block=256, cand_factor=4, n_sample=64, select_block=16, num_warps=4)
SMALL_SPLIT = SplitTopkConfig(min_row=1, programs=16, max_programs=8, block=128, cand_factor=2, n_sample=128)
ONE_PROGRAM = SplitTopkConfig(max_rows=0)


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


def hard_rows(seed: int, r: int, s: int) -> np.ndarray:
    """Random rows plus: a constant row and a tie-heavy row (candidate overflow: the exact whole-row fallback),
    a sorted row (position-correlated values), a row with 10 finite values, and the edge rows."""
    rng = np.random.default_rng(seed)
    x = edge_rows(rng.standard_normal((r, s)).astype(np.float32), rng)
    x[6] = 2.0
    x[7] = np.round(x[7] * 2)
    x[8] = np.sort(x[8])
    x[9, :-10] = -np.inf
    return x


@pytest.mark.parametrize("split", [False, True], ids=["one_program", "split"])
def test_topk_rows_sampled_threshold_and_fallback(split):
    """Random rows take the sampled fast path; a constant row (every element a candidate, overflowing the
    buffer) and tie-heavy rows take the exact whole-row fallback. Both kernels, full rows."""
    x = hard_rows(4, 12, 3000)
    got = np.asarray(topk_rows(jnp.asarray(x), 8, interpret=True, config=SMALL_ONE,
                               split_config=SMALL_SPLIT if split else ONE_PROGRAM))
    np.testing.assert_array_equal(got, numpy_topk(x, 8))


@pytest.mark.parametrize("split", [False, True], ids=["one_program", "split"])
def test_topk_rows_live_limits(split):
    """Each row reads only columns <= its limit: past it the row holds NaN, +inf and huge values (unwritten
    logits tiles), which must never be selected. Limits: empty (-1), shorter than k, inside the first block,
    ragged, the whole row."""
    rng = np.random.default_rng(5)
    r, s, k = 12, 2500, 40
    x = hard_rows(6, r, s)
    lim = rng.integers(k, s, r).astype(np.int32)
    lim[:4] = [-1, 0, k // 2, 100]
    lim[-1] = s - 1
    garbage = x.copy()
    for i in range(r):
        garbage[i, lim[i] + 1:] = rng.choice([np.nan, np.inf, 1e30], s - lim[i] - 1)
    got = np.asarray(topk_rows(jnp.asarray(garbage), k, jnp.asarray(lim), interpret=True, config=SMALL_ONE,
                               split_config=SMALL_SPLIT if split else ONE_PROGRAM))
    want = numpy_topk(mask_past(x, lim), k)
    np.testing.assert_array_equal(got, want)
    assert (got[0] == -1).all() and (got[1, 1:] == -1).all() and got[1, 0] in (0, -1)


@pytest.mark.parametrize("split", [False, True], ids=["one_program", "split"])
def test_topk_rows_live_limits_at_block_boundaries(split):
    """Full blocks below the live length are unmasked loads, the block that straddles it one masked step: live
    lengths of 0, 1 and < k, one short of a block, exactly one or several blocks, a block + 1, the whole row (a
    multiple of the block). Random rows take the candidate path, constant rows the whole-row fallback; past the
    limit the row holds NaN, +inf and huge values, which an unmasked read would select."""
    rng = np.random.default_rng(9)
    s, k = 1024, 40
    blk = SMALL_ONE.block if not split else SMALL_SPLIT.block
    live = [0, 1, k - 1, blk - 1, blk, blk + 1, 2 * blk, 2 * blk + 1, 3 * blk - 1, s - 1, s]
    lim = np.array(live * 2, np.int32) - 1
    r = len(lim)
    x = rng.standard_normal((r, s)).astype(np.float32)
    x[len(live):] = 2.0
    garbage = x.copy()
    for i in range(r):
        garbage[i, lim[i] + 1:] = rng.choice([np.nan, np.inf, 1e30], s - lim[i] - 1)
    split_config = dataclasses.replace(SMALL_SPLIT, programs=8 * r) if split else ONE_PROGRAM
    got = np.asarray(topk_rows(jnp.asarray(garbage), k, jnp.asarray(lim), interpret=True, config=SMALL_ONE,
                               split_config=split_config))
    np.testing.assert_array_equal(got, numpy_topk(mask_past(x, lim), k))


def test_topk_rows_split_ties_go_to_the_lower_index():
    """Ties at the k-th value spread over several programs' segments: the lowest indices win."""
    rng = np.random.default_rng(7)
    s, k = 4096, 50
    x = rng.integers(0, 8, (3, s)).astype(np.float32)  # 8 distinct values: ~s/8 ties each
    x[1, ::3] = 7.0
    got = np.asarray(topk_rows(jnp.asarray(x), k, interpret=True, split_config=SMALL_SPLIT))
    want = numpy_topk(x, k)
    np.testing.assert_array_equal(got, want)
    assert (got[0] < s // 2).all()  # all ties of the top value: the first ones


def test_topk_rows_split_default_config_decode_shape():
    """The default split settings at a decode shape (few rows, k = 256 of 16384 columns), with live limits."""
    rng = np.random.default_rng(8)
    r, s, k = 2, 16384, 256
    assert uses_split(r, s)
    x = rng.standard_normal((r, s)).astype(np.float32)
    lim = np.array([s - 1, 9000], np.int32)
    got = np.asarray(jax.jit(lambda x, l: topk_rows(x, k, l, interpret=True))(jnp.asarray(x), jnp.asarray(lim)))
    np.testing.assert_array_equal(got, numpy_topk(mask_past(x, lim), k))


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


@pytest.mark.parametrize("rows, s", [(1, 131072), (64, 65536), (512, 8192)])
def test_kernels_lower_for_cuda(rows, s):
    """Decode rows take the split path (three Triton launches), prefill rows the one-program kernel; both build for
    CUDA from this CPU host (numerics are checked in interpret mode above and on the GPU by topk_decode.py)."""
    x = jax.ShapeDtypeStruct((rows, s), jnp.float32)
    lowered = jax.jit(lambda v: topk_rows(v, 2048, interpret=False)).trace(x).lower(lowering_platforms=("cuda",))
    split = uses_split(rows, s, DEFAULT_SPLIT_TOPK_CONFIG)
    assert split == (rows <= 64)
    assert lowered.as_text().count("xla.gpu.triton") == (3 if split else 1)
