"""The FP8 indexer (`indexer_quant="fp8"`): quantisation, rotation, selection, cache and decode, against numpy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax.model import quant
from indexcache_jax.model.layers import Indexer
from indexcache_jax.model.model import make_context
import random_model
from topk_oracle import numpy_topk


def numpy_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/math.md, "FP8 indexer": act_quant with ue8m0 scales, in float64: (dequantised-ready e4m3 values as float64, scales)."""
    x = np.asarray(x, np.float64)
    amax = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-4)
    scale = 2.0 ** np.ceil(np.log2(amax / 448.0))
    x8 = np.clip(x / scale, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)  # round to nearest even
    return x8.astype(np.float64), scale


def popcount_hadamard(d: int) -> np.ndarray:
    """H[i, j] = (-1)^popcount(i & j): the natural-order Walsh-Hadamard matrix, by its closed form."""
    i = np.arange(d)
    bits = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    return np.where(bits % 2 == 0, 1.0, -1.0)


def test_quantize_fp8_matches_numpy():
    rng = np.random.default_rng(81)
    x = rng.standard_normal((6, 5, 128)) * rng.choice([1e-3, 0.3, 7.0, 900.0], (6, 5, 1))
    x[0, 0] *= 1e-5  # below the 1e-4 amax floor
    x[1, 1] = rng.standard_normal(128)
    x[1, 1] *= 448.0 * 0.125 / np.abs(x[1, 1]).max()  # amax / 448 exactly a power of two
    x = x.astype(np.float32)
    got8, got_scale = quant.quantize_fp8(jnp.asarray(x))
    want8, want_scale = numpy_quantize(x)
    assert got8.dtype == jnp.float8_e4m3fn and got_scale.shape == (6, 5, 1)
    np.testing.assert_array_equal(np.asarray(got_scale, np.float64), want_scale)
    np.testing.assert_array_equal(np.asarray(got8.astype(jnp.float32), np.float64), want8)
    assert want_scale[1, 1, 0] == 2.0 ** -3  # no extra doubling at the exact power of two
    deq = want8 * want_scale
    assert np.all(np.abs(deq - x) <= np.abs(x).max(-1, keepdims=True) * 2.0 ** -3)  # e4m3 keeps 3 mantissa bits


@pytest.mark.parametrize("d", [16, 128])
def test_hadamard_rotation_is_the_normalised_walsh_matrix(d):
    rng = np.random.default_rng(82)
    x = rng.standard_normal((3, 7, d)).astype(np.float32)
    got = np.asarray(quant.hadamard_rotate(jnp.asarray(x)), np.float64)
    want = x.astype(np.float64) @ popcount_hadamard(d) * d ** -0.5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.einsum("abd,acd->abc", got, got), np.einsum("abd,acd->abc", x, x), rtol=1e-4,
                               atol=1e-4)  # orthogonal: q.k is unchanged
    with pytest.raises(ValueError, match="power-of-two"):
        quant.hadamard_matrix(96)


def test_fp8_config_is_validated():
    with pytest.raises(ValueError, match="indexer_quant must be"):
        ic.tiny(indexer_quant="int8")
    with pytest.raises(ValueError, match="power of two <= 128"):
        ic.tiny(indexer_quant="fp8", index_head_dim=24)
    with pytest.raises(ValueError, match="power of two <= 128"):
        ic.tiny(indexer_quant="fp8", index_head_dim=256)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_fp8_indexer_selection_matches_numpy(backend):
    """The layer's FP8 path (rotate, quantise, FP8 logits, top-k) against numpy float64 on the layer's own float32
    q and k (the unquantised indexer is checked against transformers in test_model_parity)."""
    cfg = ic.tiny(indexer_quant="fp8", index_topk=6, backend=backend)
    b, t = 2, 23
    rng = np.random.default_rng(83)
    x = jnp.asarray(rng.standard_normal((b, t, cfg.hidden_size)), jnp.float32)
    qr = jnp.asarray(rng.standard_normal((b, t, cfg.q_lora_rank)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    ctx = make_context(cfg, positions, jnp.array([t, 17]), jnp.zeros((b,), jnp.int32))
    stacked = random_model.random_params(cfg, seed=int(rng.integers(1 << 30)))["segment_0"]["full"]["indexer"]
    params = {"params": jax.tree.map(lambda a: a[0], stacked)}  # the first F layer's indexer

    def run(method, *args):
        return Indexer(cfg).apply(params, *args, method=method)

    keys = run(Indexer.keys, x, ctx["cos"], ctx["sin"])
    q, w = run(Indexer.queries, qr, x, ctx["cos"], ctx["sin"])
    k8, k_scale = run(Indexer.quantize_keys, keys)
    got = np.asarray(run(Indexer.select, q, w, k8, ctx["positions"], ctx["k_lengths"], k_scale))

    qn, q_s = numpy_quantize(np.asarray(quant.hadamard_rotate(q)))
    kn, k_s = numpy_quantize(np.asarray(quant.hadamard_rotate(keys)))
    scores = np.einsum("bthd,bsd->bths", qn, kn)
    logits = np.einsum("bths,bth->bts", np.maximum(scores, 0.0), np.asarray(w, np.float64) * q_s[..., 0])
    logits = logits * k_s[..., 0][:, None, :]
    s_idx = np.arange(t)
    valid = (s_idx[None, None, :] <= np.arange(t)[None, :, None]) & (s_idx < np.array([t, 17])[:, None, None])
    want = numpy_topk(np.where(valid, logits, -np.inf), cfg.index_topk)
    np.testing.assert_array_equal(got, want)
    assert (got[:, :5, 5:] == -1).all() and (got[:, 10:] >= 0).all()


def test_fp8_model_decode_equals_forward_and_tracks_the_unquantised_indexer():
    """Engine prefill + decode over the FP8 indexer cache equal a full FP8 forward; the FP8 top-k shares most of
    the unquantised indexer's choices, and the cache holds e4m3 keys with float32 scales."""
    cfg = ic.tiny(pattern="FSFSSF", index_topk=4, indexer_quant="fp8", index_head_dim=32)
    params = random_model.random_params(cfg, seed=84, std=0.1)
    rng = np.random.default_rng(85)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 12)]
    eng = ic.Engine(params, cfg, max_len=32, max_batch=2, chunk=8)
    tokens, logits = eng.generate(prompts, 6, return_logits=True)
    for prompt, new, lg in zip(prompts, tokens, logits):
        full = np.asarray(ic.forward(params, cfg, np.array([prompt + new])))[0, len(prompt) - 1:-1]
        assert np.abs(lg - full).max() <= 1e-4 * np.abs(full).max()
        np.testing.assert_array_equal(np.argmax(full, -1), new)

    seq = np.array([rng.integers(0, cfg.vocab_size, 32)])
    _, idx8 = ic.forward(params, cfg, seq, return_indices=True)
    _, idx = ic.forward(params, cfg.replace(indexer_quant="none"), seq, return_indices=True)
    a, b = np.asarray(idx8[0])[0, 8:], np.asarray(idx[0])[0, 8:]  # rows with more keys than top-k slots
    shared = np.mean([len(set(r8) & set(r)) / len(r) for r8, r in zip(a, b)])
    assert shared >= 0.8, shared

    caches = ic.cache.init_cache(cfg, batch=2, max_len=10)
    assert caches["index_k"].dtype == jnp.float8_e4m3fn and caches["index_k_scale"].shape == (2, 3 * 10, 1)
    per_token = sum(leaf.size // 20 * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))
    assert per_token == ic.cache_bytes_per_token(cfg) == 6 * (32 + 8) * 2 + 3 * (32 + 4)
