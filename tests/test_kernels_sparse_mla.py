"""Sparse MLA kernel (interpret mode on CPU) and its jnp reference against a numpy float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sparse_mla_oracle import sparse_mla_f64

from pallas_kernels.sparse_mla import (
    SparseMLAConfig,
    choose_kernel,
    default_config,
    sparse_mla,
    sparse_mla_reference,
    sparse_mla_with_config,
)


def _inputs(rng, batch, tokens, heads, d_qk, seq_len, top_k, dtype):
    """Random q, kv and indices with repeats, -1s, indices >= S and one row with no valid index."""
    q = rng.standard_normal((batch, tokens, heads, d_qk)).astype(np.float32)
    kv = rng.standard_normal((batch, seq_len, d_qk)).astype(np.float32)
    indices = rng.integers(0, seq_len, (batch, tokens, top_k)).astype(np.int32)
    indices[rng.random(indices.shape) < 0.15] = -1
    indices[rng.random(indices.shape) < 0.05] = seq_len + 3
    indices[0, 0, 1::3] = indices[0, 0, 0]  # explicit repeats
    indices[-1, -1, :] = -1  # a row with no valid index
    indices[0, -1, ::2] = seq_len  # first invalid value
    q, kv = jnp.asarray(q, dtype), jnp.asarray(kv, dtype)
    return q, kv, jnp.asarray(indices)


def _rel(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _check(out, lse, q, kv, indices, sm_scale, v_dim, tol):
    ref_out, ref_lse = sparse_mla_f64(jnp.asarray(q, jnp.float32), jnp.asarray(kv, jnp.float32), indices, sm_scale,
                                      v_dim)
    assert out.shape == ref_out.shape and out.dtype == q.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _rel(out, ref_out) <= tol
    lse = np.asarray(lse, np.float64)
    empty = np.isneginf(ref_lse)
    assert empty.any() and np.array_equal(np.isneginf(lse), empty)
    assert np.all(np.asarray(out, np.float32)[empty] == 0.0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=tol, atol=tol)


# (batch, tokens, heads, d_qk, v_dim, seq_len, top_k): H and K off the block sizes; K > S forces repeats;
# d_qk 40 = 32 + 8 (powers of two), 44 = 24 + 20 (padded), 32 = 32 + 0 (no RoPE part); H 70 spans two head blocks.
SHAPES = [
    (2, 3, 5, 40, 32, 48, 37),
    (1, 2, 70, 44, 24, 30, 45),
    (3, 1, 16, 32, 32, 64, 100),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_mla_float32(shape):
    batch, tokens, heads, d_qk, v_dim, seq_len, top_k = shape
    rng = np.random.default_rng(sum(shape))
    q, kv, indices = _inputs(rng, batch, tokens, heads, d_qk, seq_len, top_k, jnp.float32)
    sm_scale = 1.0 / np.sqrt(d_qk)
    out, lse = sparse_mla(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim)
    _check(out, lse, q, kv, indices, sm_scale, v_dim, 1e-4)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_sparse_mla_bfloat16(shape):
    batch, tokens, heads, d_qk, v_dim, seq_len, top_k = shape
    rng = np.random.default_rng(1 + sum(shape))
    q, kv, indices = _inputs(rng, batch, tokens, heads, d_qk, seq_len, top_k, jnp.bfloat16)
    sm_scale = 1.0 / np.sqrt(d_qk)
    out, lse = sparse_mla(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim)
    _check(out, lse, q, kv, indices, sm_scale, v_dim, 1e-2)


@pytest.mark.parametrize(
    "config",
    [
        SparseMLAConfig(block_k=16, num_splits=1),
        SparseMLAConfig(block_k=16, num_splits=4),
        SparseMLAConfig(block_k=32),
    ],
)
def test_sparse_mla_configs(config):
    """Unsplit and K-split programs (merged through lse) compute the same function."""
    rng = np.random.default_rng(7)
    q, kv, indices = _inputs(rng, 2, 2, 20, 40, 50, 70, jnp.float32)
    out, lse = sparse_mla_with_config(q, kv, indices, sm_scale=0.3, v_dim=32, interpret=True, config=config)
    _check(out, lse, q, kv, indices, 0.3, 32, 1e-4)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_sparse_mla_reference(dtype, tol):
    rng = np.random.default_rng(11)
    q, kv, indices = _inputs(rng, 2, 3, 6, 40, 40, 33, dtype)
    out, lse = sparse_mla_reference(q, kv, indices, sm_scale=0.25, v_dim=32)
    _check(out, lse, q, kv, indices, 0.25, 32, tol)


def test_default_config_splits_only_small_launches():
    assert default_config(4096, 128, 2048, num_sms=132).num_splits == 1  # prefill: 8192 programs
    assert default_config(64, 128, 2048, num_sms=132).num_splits == 1  # decode: 128 programs, one wave
    assert default_config(64, 64, 2048, num_sms=132).num_splits == 2  # 64 programs -> 128
    assert default_config(1, 128, 2048, num_sms=132).num_splits == 16  # capped: each split keeps 2 blocks
    assert default_config(1, 128, 64, num_sms=132).num_splits == 1  # a single block of indices


# --- the Hopper (Mosaic GPU) kernel: selection, lowering and the wrapper around it ---------------------------
# Mosaic GPU has no interpreter and this machine has no GPU, so its numerics are checked on the H100 by
# benchmarks/sparse_mla.py (edge shapes against float64, then every timed case); here we check what the CPU can:
# which kernel runs, that the kernel lowers to a Mosaic GPU module within Hopper's shared memory, and that the
# wrapper's padding and split merging compute the sparse MLA function.


@pytest.mark.parametrize(
    "dtype,d_qk,v_dim,heads,interpret,capability,expected",
    [
        (jnp.bfloat16, 576, 512, 64, False, "9.0", "hopper"),
        (jnp.float16, 576, 512, 128, False, "9.0", "hopper"),
        (jnp.bfloat16, 576, 512, 20, False, "9.0", "triton"),  # 20 heads fill 32-head Triton programs better
        (jnp.float32, 576, 512, 64, False, "9.0", "triton"),  # 16-bit wgmma only
        (jnp.bfloat16, 576, 512, 64, False, "8.0", "triton"),  # not Hopper
        (jnp.bfloat16, 576, 512, 64, False, "10.0", "triton"),
        (jnp.bfloat16, 576, 512, 64, True, "9.0", "triton"),  # no interpreter for Mosaic GPU
        (jnp.bfloat16, 576, 512, 64, False, None, "triton"),  # CPU
        (jnp.bfloat16, 40, 32, 64, False, "9.0", "triton"),  # features not in 64-wide tiles
    ],
)
def test_choose_kernel(dtype, d_qk, v_dim, heads, interpret, capability, expected):
    assert choose_kernel(dtype, d_qk, v_dim, heads, interpret=interpret, capability=capability) == expected


@pytest.mark.parametrize("heads,top_k,splits,gather_at,d_qk,v_dim,dtype", [
    (64, 2048, 1, "block_start", 576, 512, jnp.bfloat16),
    (20, 200, 2, "after_max", 576, 512, jnp.bfloat16),
    (128, 130, 4, "after_pv", 576, 512, jnp.bfloat16),
    (64, 256, 1, "block_start", 320, 256, jnp.float16),  # narrower output tiles for the TMA store
    (72, 100, 2, "block_start", 192, 128, jnp.bfloat16),
])
def test_hopper_kernel_lowers_to_mosaic_gpu(heads, top_k, splits, gather_at, d_qk, v_dim, dtype):
    """The kernel traces and lowers for CUDA (Mosaic GPU checks shared memory, 227 KB, while lowering)."""
    q = jax.ShapeDtypeStruct((2, 3, heads, d_qk), dtype)
    kv = jax.ShapeDtypeStruct((2, 700, d_qk), dtype)
    idx = jax.ShapeDtypeStruct((2, 3, top_k), jnp.int32)
    config = SparseMLAConfig(kernel="hopper", num_splits=splits, gather_at=gather_at)
    lowered = sparse_mla_with_config.trace(q, kv, idx, sm_scale=0.1, v_dim=v_dim, interpret=False, config=config)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" not in text


def _emulated_hopper_kernel(q, kv, idx, *, tokens, v_dim, scale_log2, gather_at):
    """The kernel's contract: per split, the float64 oracle over that split's indices alone, so each split's out
    is normalised by its own softmax sum. q [BT, Hp, D], idx [BT, splits, Ks] -> out [BT, splits, Hp, v], lse."""
    del gather_at
    bt, h_pad, d_qk = q.shape
    batch = bt // tokens
    q4 = np.asarray(q).reshape(batch, tokens, h_pad, d_qk)
    idx = np.asarray(idx)
    parts = [sparse_mla_f64(q4, kv, idx[:, s].reshape(batch, tokens, -1), scale_log2 * np.log(2.0), v_dim)
             for s in range(idx.shape[1])]
    out = np.stack([o.reshape(bt, h_pad, v_dim) for o, _ in parts], axis=1)
    lse = np.stack([l.reshape(bt, h_pad) for _, l in parts], axis=1)
    return jnp.asarray(out, jnp.float32), jnp.asarray(lse, jnp.float32)


@pytest.mark.parametrize("splits,top_k", [(1, 150), (3, 150), (2, 256)])
def test_hopper_wrapper_pads_and_merges(monkeypatch, splits, top_k):
    """With the kernel replaced by its contract, `sparse_mla` equals the float64 oracle: heads padded to 64,
    K padded with -1 to whole 64-index blocks per split only where needed (indices otherwise passed through,
    the kernel reads >= S as invalid), and the splits merged through lse."""
    from pallas_kernels import _sparse_mla_hopper

    seen = {}

    def fake(q, kv, idx, **kw):
        seen["q"] = q.shape

        def run(*args):
            seen["idx"] = np.asarray(args[2])
            return _emulated_hopper_kernel(*args, **kw)

        return jax.pure_callback(
            run,
            (jax.ShapeDtypeStruct(q.shape[:1] + (idx.shape[1],) + q.shape[1:2] + (kw["v_dim"],), jnp.float32),
             jax.ShapeDtypeStruct(q.shape[:1] + (idx.shape[1],) + q.shape[1:2], jnp.float32)),
            q, kv, idx,
        )

    monkeypatch.setattr(_sparse_mla_hopper, "sparse_mla_hopper", fake)
    rng = np.random.default_rng(23)
    q, kv, indices = _inputs(rng, 2, 3, 20, 128, 90, top_k, jnp.float32)
    config = SparseMLAConfig(kernel="hopper", num_splits=splits)
    monkeypatch.setattr(_sparse_mla_hopper, "supports", lambda *a: True)  # float32 stands in for bf16 here
    out, lse = sparse_mla_with_config(q, kv, indices, sm_scale=0.2, v_dim=64, interpret=False, config=config)
    _check(out, lse, q, kv, indices, 0.2, 64, 1e-5)
    assert seen["q"] == (6, 64, 128)
    k_split = -(-top_k // (64 * splits)) * 64
    assert seen["idx"].shape == (6, splits, k_split)
    flat = seen["idx"].reshape(6, splits * k_split)
    np.testing.assert_array_equal(flat[:, :top_k], np.asarray(indices).reshape(6, top_k))  # passed through
    assert (flat[:, top_k:] == -1).all()


def test_hopper_kernel_rejects_what_it_cannot_run():
    rng = np.random.default_rng(5)
    q, kv, indices = _inputs(rng, 1, 2, 64, 576, 100, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="no interpret mode"):
        sparse_mla_with_config(q, kv, indices, sm_scale=0.1, v_dim=512, interpret=True,
                               config=SparseMLAConfig(kernel="hopper"))
    with pytest.raises(ValueError, match="does not support"):
        sparse_mla_with_config(q.astype(jnp.float32), kv.astype(jnp.float32), indices, sm_scale=0.1, v_dim=512,
                               interpret=False, config=SparseMLAConfig(kernel="hopper"))
    with pytest.raises(ValueError, match="unknown sparse MLA kernel"):
        sparse_mla_with_config(q, kv, indices, sm_scale=0.1, v_dim=512, interpret=True,
                               config=SparseMLAConfig(kernel="cuda"))
    with pytest.raises(ValueError, match="gather_at"):
        sparse_mla_with_config(q, kv, indices, sm_scale=0.1, v_dim=512, interpret=False,
                               config=SparseMLAConfig(kernel="hopper", gather_at="never"))


def _bad_inputs():
    """(name, q, kv, indices, sm_scale, v_dim, message) for inputs `sparse_mla` must refuse."""
    rng = np.random.default_rng(21)
    q, kv, indices = _inputs(rng, 2, 3, 4, 40, 30, 16, jnp.float32)
    return [
        ("q without batch", q[0], kv, indices, 0.2, 32, "expected q"),
        ("kv batch", q, kv[:1], indices, 0.2, 32, "do not match"),
        ("kv features", q, kv[..., :36], indices, 0.2, 32, "do not match"),
        ("indices tokens", q, kv, indices[:, :2], 0.2, 32, "do not match"),
        ("dtypes differ", q.astype(jnp.bfloat16), kv, indices, 0.2, 32, "share one floating dtype"),
        ("integer q", q.astype(jnp.int32), kv.astype(jnp.int32), indices, 0.2, 32, "share one floating dtype"),
        ("float indices", q, kv, indices.astype(jnp.float32), 0.2, 32, "indices must be integers"),
        ("v_dim too wide", q, kv, indices, 0.2, 41, "v_dim=41"),
        ("scale nan", q, kv, indices, float("nan"), 32, "sm_scale=nan"),
        ("scale inf", q, kv, indices, float("inf"), 32, "sm_scale=inf"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_sparse_mla_rejects_bad_inputs(case):
    _, q, kv, indices, sm_scale, v_dim, message = case
    with pytest.raises(ValueError, match=message):
        sparse_mla(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim)
    with pytest.raises(ValueError, match=message):
        sparse_mla_with_config(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim, interpret=True,
                               config=SparseMLAConfig())


@pytest.mark.parametrize("empty_axis", ["tokens", "heads", "seq", "top_k"])
def test_sparse_mla_without_work(empty_axis):
    """A zero-length B/T/H gives empty outputs; S = 0 or K = 0 leaves every row without a valid index."""
    rng = np.random.default_rng(22)
    sizes = dict(tokens=3, heads=5, seq=20, top_k=12)
    sizes[empty_axis] = 0
    q = jnp.asarray(rng.standard_normal((2, sizes["tokens"], sizes["heads"], 40)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, sizes["seq"], 40)), jnp.float32)
    indices = jnp.asarray(rng.integers(-3, 25, (2, sizes["tokens"], sizes["top_k"])), jnp.int32)
    out, lse = sparse_mla(q, kv, indices, sm_scale=0.2, v_dim=32)
    ref_out, ref_lse = sparse_mla_f64(q, kv, indices, 0.2, 32)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    assert np.all(np.asarray(out) == ref_out) and np.all(np.isneginf(np.asarray(lse))) and np.all(np.isneginf(ref_lse))


@pytest.mark.parametrize("dtype", [np.int16, np.int64])
def test_sparse_mla_takes_other_integer_indices(dtype):
    """Narrow indices are widened; wide ones are bounded first, so 2**32 + 5 stays invalid instead of wrapping to 5."""
    rng = np.random.default_rng(23)
    q, kv, indices = _inputs(rng, 2, 3, 6, 40, 30, 24, jnp.float32)
    idx = np.asarray(indices).astype(np.int64)
    if dtype == np.int64:
        idx[1, 2, :5] = 2**32 + 5
        idx[1, 1, :5] = -(2**32) + 3
    with jax.enable_x64(dtype == np.int64):
        wide = jnp.asarray(idx.astype(dtype))
        assert wide.dtype == dtype
        out, lse = sparse_mla(q, kv, wide, sm_scale=0.2, v_dim=32)
    _check(out, lse, q, kv, idx, 0.2, 32, 1e-4)
