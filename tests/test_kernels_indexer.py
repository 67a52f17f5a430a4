"""pallas_kernels.indexer in interpret mode against a numpy float64 brute force."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.indexer as ix
from pallas_kernels.indexer import (
    LogitsConfig,
    indexer_logits,
    indexer_logits_reference,
    indexer_topk,
    indexer_topk_reference,
)
from topk_oracle import numpy_logits, numpy_topk


def inputs(seed, b, t, s, h, d, fp8=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, d)).astype(np.float32)
    w = (rng.standard_normal((b, t, h)) * 0.1).astype(np.float32)
    if fp8:
        qs = jnp.asarray(rng.uniform(0.5, 2.0, (b, t, h)), jnp.float32)
        ks = jnp.asarray(rng.uniform(0.5, 2.0, (b, s)), jnp.float32)
        return jnp.asarray(q, jnp.float8_e4m3fn), jnp.asarray(k, jnp.float8_e4m3fn), jnp.asarray(w), qs, ks
    return jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(w), None, None


def assert_logits_close(got, want):
    got = np.asarray(got, np.float64)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin)
    assert (got[~fin] == -np.inf).all()
    assert fin.any() and np.abs(want[fin]).max() > 0  # never compare on zeros or an empty set
    err = np.linalg.norm(got[fin] - want[fin]) / np.linalg.norm(want[fin])
    assert err < 1e-5, err


def ragged_positions(seed, b, t, s):
    rng = np.random.default_rng(seed)
    qpos = rng.integers(-1, s + 4, (b, t)).astype(np.int32)
    qpos[0, 0] = -1  # a query with no valid key
    klen = rng.integers(1, s + 1, (b,)).astype(np.int32)
    klen[-1] = s
    return qpos, klen


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_logits_ragged_unaligned(fp8):
    b, t, s, h, d = 2, 11, 150, 5, 24  # nothing a multiple of a block size
    q, k, w, qs, ks = inputs(10 + fp8, b, t, s, h, d, fp8)
    qpos, klen = ragged_positions(3, b, t, s)
    kw = dict(q_positions=jnp.asarray(qpos), k_lengths=jnp.asarray(klen), q_scale=qs, k_scale=ks)
    want = numpy_logits(q, k, w, qpos, klen, qs, ks)
    got = indexer_logits(q, k, w, interpret=True, **kw)
    chex.assert_shape(got, (b, t, s))
    chex.assert_type(got, jnp.float32)
    assert_logits_close(got, want)
    assert_logits_close(jax.jit(indexer_logits_reference)(q, k, w, **kw), want)


@pytest.mark.parametrize("cfg", [LogitsConfig(kv_major=False), LogitsConfig(per_query=True),
                                 LogitsConfig(rows=16, block_k=16, inner=2)])
def test_indexer_logits_kernel_variants_default_causal(cfg):
    b, t, s, h, d = 1, 9, 70, 4, 32
    q, k, w, _, _ = inputs(20, b, t, s, h, d)
    got = ix._indexer_logits_impl(q, k, w, None, None, None, None, num_keys=s, interpret=True, config=cfg)
    assert_logits_close(got, numpy_logits(q, k, w))


def fused_cases():
    b, t, s, h, d = 2, 10, 120, 3, 16
    qpos, klen = ragged_positions(5, b, t, s)
    qpos[1, :3] = [0, 2, 5]  # rows with fewer than topk valid keys
    return b, t, s, h, d, qpos, klen


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_topk_matches_numpy(fp8):
    b, t, s, h, d, qpos, klen = fused_cases()
    q, k, w, qs, ks = inputs(30 + fp8, b, t, s, h, d, fp8)
    kw = dict(q_positions=jnp.asarray(qpos), k_lengths=jnp.asarray(klen), q_scale=qs, k_scale=ks)
    want = numpy_topk(numpy_logits(q, k, w, qpos, klen, qs, ks), 16)
    got = indexer_topk(q, k, w, 16, interpret=True, **kw)
    chex.assert_shape(got, (b, t, 16))
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(indexer_topk_reference, static_argnums=3)(q, k, w, 16, **kw)),
                                  want)
    assert (want[0, 0] == -1).all() and (want[1, 0, 1:] == -1).all()


def test_indexer_topk_query_chunks_and_reference_chunks(monkeypatch):
    """Several query chunks in the fused kernel and in the (lax.map-scanned) reference."""
    b, t, s, h, d, qpos, klen = fused_cases()
    q, k, w, _, _ = inputs(40, b, t, s, h, d)
    want = numpy_topk(numpy_logits(q, k, w, qpos, klen), 7)
    got = ix._indexer_topk_impl(q, k, w, jnp.asarray(qpos), jnp.asarray(klen), None, None, topk=7, num_keys=s,
                                interpret=True, config=LogitsConfig(rows=16, block_k=16, inner=2), query_chunk=4)
    np.testing.assert_array_equal(np.asarray(got), want)
    monkeypatch.setattr(ix, "_REF_KEY_BLOCK", 32)  # 4 key blocks, the last one read from further back
    monkeypatch.setattr(ix, "_REF_CHUNK_ELEMS", b * h * 32 * 4)  # 4 queries per reference chunk
    ref = indexer_topk_reference(q, k, w, 7, q_positions=jnp.asarray(qpos), k_lengths=jnp.asarray(klen))
    np.testing.assert_array_equal(np.asarray(ref), want)
    logits = indexer_logits_reference(q, k, w, q_positions=jnp.asarray(qpos), k_lengths=jnp.asarray(klen))
    assert_logits_close(logits, numpy_logits(q, k, w, qpos, klen))


def test_indexer_logits_fp8_upcast_variant():
    """FP8 inputs through the bf16 MMA (fp8_mma=False) give the same logits."""
    b, t, s, h, d = 1, 6, 90, 4, 32
    q, k, w, qs, ks = inputs(50, b, t, s, h, d, fp8=True)
    got = ix._indexer_logits_impl(q, k, w, None, None, qs, ks, num_keys=s, interpret=True,
                                  config=LogitsConfig(fp8_mma=False))
    assert_logits_close(got, numpy_logits(q, k, w, q_scale=qs, k_scale=ks))


def triton_modules(fn, *avals) -> list[str]:
    """The Triton modules (TTIR text) of the pallas_calls in jit(fn), lowered for CUDA on this CPU host: the
    Pallas Triton lowering is wrapped to keep the module it builds."""
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    return captured


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_logits_gpu_lowering_dot(fp8):
    """The kernel lowered for a GPU (on this CPU host) issues its key-query product as one Triton dot: FP8 inputs
    as an e4m3 dot with maxNumImpreciseAcc = D (the setting that lets Triton pick FP8 wgmma on Hopper; Pallas'
    own dot lowering leaves it 0, which falls back to f16 mma.sync), bf16 inputs as a plain bf16 dot."""
    from pallas_kernels._fp8_dot import FAST_FP8_ACCUMULATION

    if fp8 and not FAST_FP8_ACCUMULATION:
        pytest.skip("this jax has no Pallas Triton lowering table to register the FP8 dot in")
    b, t, s, h, d = 1, 64, 1024, 32, 128
    dt = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    args = [jax.ShapeDtypeStruct((b, t, h, d), dt), jax.ShapeDtypeStruct((b, s, d), dt),
            jax.ShapeDtypeStruct((b, t, h), jnp.float32)]
    if fp8:
        args += [jax.ShapeDtypeStruct((b, t, h), jnp.float32), jax.ShapeDtypeStruct((b, s), jnp.float32)]

    def fn(q, k, w, qs=None, ks=None):
        return ix._indexer_logits_impl(q, k, w, None, None, qs, ks, num_keys=s, interpret=False)

    (module,) = triton_modules(fn, *args)
    dots = [line for line in module.splitlines() if "tt.dot " in line]
    assert len(dots) == 1, module[-4000:]
    if fp8:
        assert f"maxNumImpreciseAcc = {d}" in dots[0] and dots[0].count("f8E4M3FN") >= 2, dots[0]
    else:
        assert "maxNumImpreciseAcc" not in dots[0] and "bf16" in dots[0], dots[0]


def _bad_indexer_inputs():
    """(name, q, k, w, keyword arguments, message) for inputs the indexer functions must refuse."""
    q, k, w, _, _ = inputs(31, 2, 5, 12, 4, 16)
    return [
        ("q without batch", q[0], k, w, {}, "expected q"),
        ("k features", q, k[..., :8], w, {}, "do not match"),
        ("w heads", q, k, w[..., :3], {}, "do not match"),
        ("k batch", q, k[:1], w, {}, "do not match"),
        ("dtypes differ", q, k.astype(jnp.float32), w, {}, "share one floating dtype"),
        ("integer q", q.astype(jnp.int32), k.astype(jnp.int32), w, {}, "share one floating dtype"),
        ("q_positions length", q, k, w, {"q_positions": jnp.arange(4)}, "q_positions must have shape"),
        ("k_lengths shape", q, k, w, {"k_lengths": jnp.ones((2, 1), jnp.int32)}, "k_lengths must have shape"),
        ("k_lengths float", q, k, w, {"k_lengths": jnp.array([3.0, 4.0])}, "k_lengths must be integers"),
        ("q_scale shape", q, k, w, {"q_scale": jnp.ones((2, 5)), "k_scale": jnp.ones((2, 12))}, "q_scale must have"),
        ("k_scale shape", q, k, w, {"k_scale": jnp.ones((2, 11))}, "k_scale must have"),
    ]


@pytest.mark.parametrize("case", _bad_indexer_inputs(), ids=lambda c: c[0])
def test_indexer_refuses_bad_inputs(case):
    _, q, k, w, kwargs, message = case
    for fn in (indexer_logits, indexer_logits_reference):
        with pytest.raises(ValueError, match=message):
            fn(q, k, w, **kwargs)
    for fn in (indexer_topk, indexer_topk_reference):
        with pytest.raises(ValueError, match=message):
            fn(q, k, w, 3, **kwargs)


def test_indexer_topk_refuses_bad_k():
    q, k, w, _, _ = inputs(33, 1, 3, 8, 2, 16)
    for fn in (indexer_topk, indexer_topk_reference):
        for bad_k in (-2, 1.5):
            with pytest.raises(ValueError, match="k must be a non-negative integer"):
                fn(q, k, w, bad_k)


@pytest.mark.parametrize("empty_axis", ["tokens", "seq", "top_k"])
def test_indexer_without_work(empty_axis):
    """T = 0 gives empty results; S = 0 leaves no valid key (-inf logits, all -1); topk = 0 gives [B, T, 0]."""
    sizes = dict(tokens=5, seq=12, top_k=4)
    sizes[empty_axis] = 0
    q, k, w, _, _ = inputs(32, 2, sizes["tokens"], sizes["seq"], 4, 16)
    logits = np.asarray(indexer_logits(q, k, w))
    want = numpy_logits(q, k, w)
    assert logits.shape == want.shape == (2, sizes["tokens"], sizes["seq"])
    if empty_axis == "top_k":  # only the top-k is empty: the logits are real
        assert_logits_close(logits, want)
    else:
        np.testing.assert_array_equal(logits, want)  # empty, or all -inf
    for fn in (indexer_topk, indexer_topk_reference):
        got = np.asarray(fn(q, k, w, sizes["top_k"]))
        np.testing.assert_array_equal(got, numpy_topk(want, sizes["top_k"]))
        assert got.shape == (2, sizes["tokens"], sizes["top_k"]) and got.dtype == np.int32


# ---- key windows of a stacked cache, live limits ---------------------------------------------------------------

def stacked_cache(seed, b, layers, s, d, fp8):
    """A [B, layers * S, D] key buffer (and [B, layers * S] scales for FP8), as the engine stacks its F layers."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, layers * s, d)).astype(np.float32)
    if fp8:
        return jnp.asarray(k, jnp.float8_e4m3fn), jnp.asarray(rng.uniform(0.5, 2.0, (b, layers * s)), jnp.float32)
    return jnp.asarray(k, jnp.bfloat16), None


def window_case(seed, t, fp8, heads=3):
    """Queries over layer windows of a 3-layer stacked cache; S = 150 is not a multiple of any tile, so the last
    layer's last tile runs past the buffer's end. Ragged lengths; decode (t = 1) sits at each row's last key."""
    b, layers, s, d = 2, 3, 150, 16
    k, ks = stacked_cache(seed, b, layers, s, d, fp8)
    q, _, w, qs, _ = inputs(seed + 1, b, t, 8, heads, d, fp8)
    klen = np.array([97, s], np.int32)
    if t == 1:
        qpos = (klen - 1)[:, None]
    else:
        qpos = np.random.default_rng(seed + 2).integers(-1, s, (b, t)).astype(np.int32)
    return dict(q=q, k=k, w=w, qs=qs, ks=ks, s=s, layers=layers, klen=klen, qpos=qpos)


@pytest.mark.parametrize("t,fp8", [(1, False), (1, True), (7, False)], ids=["decode", "decode-fp8", "prefill"])
def test_indexer_key_window_matches_numpy(t, fp8):
    """Layer windows of the stacked buffer against numpy on that window (indices window-relative): the kernel with
    concrete offsets (first and last layer, whose last tile runs past the buffer's end) and with a traced one under
    jit, the reference traced for every layer, and the logits of both."""
    c = window_case(20 + 2 * t + fp8, t, fp8)
    s, topk = c["s"], 12
    common = dict(q_positions=jnp.asarray(c["qpos"]), k_lengths=jnp.asarray(c["klen"]), q_scale=c["qs"],
                  k_scale=c["ks"], num_keys=s)
    kernel_traced = jax.jit(lambda q, k, w, off: indexer_topk(q, k, w, topk, key_offset=off, interpret=True, **common))
    reference_traced = jax.jit(lambda q, k, w, off: indexer_topk_reference(q, k, w, topk, key_offset=off, **common))
    args = (c["q"], c["k"], c["w"])
    for layer in range(c["layers"]):
        want_logits = numpy_logits(c["q"], c["k"], c["w"], c["qpos"], c["klen"], c["qs"], c["ks"],
                                   key_offset=layer * s, num_keys=s)
        want = numpy_topk(want_logits, topk)
        assert (want >= 0).sum() > 0 and want.max() < s
        got = {"reference traced": reference_traced(*args, jnp.int32(layer * s))}
        if layer == 1:
            got["kernel traced"] = kernel_traced(*args, jnp.int32(layer * s))
            assert_logits_close(jax.jit(lambda q, k, w, off: indexer_logits_reference(q, k, w, key_offset=off,
                                                                                      **common))(*args, layer * s),
                                want_logits)
        else:
            got["kernel"] = indexer_topk(*args, topk, key_offset=layer * s, interpret=True, **common)
        if layer == 2:
            assert_logits_close(indexer_logits(*args, key_offset=layer * s, interpret=True, **common), want_logits)
        for name, value in got.items():
            np.testing.assert_array_equal(np.asarray(value), want, err_msg=f"{name}, layer {layer}")


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_topk_decode_takes_the_split_top_k(fp8):
    """Decode (T = 1) rows in the fused kernel go to the split top-k (small launch settings here so that a short
    window is split over several programs), over layer 1's window with ragged lengths."""
    from pallas_kernels.topk import SplitTopkConfig

    c = window_case(60 + fp8, 1, fp8, heads=4)
    s, topk = c["s"], 10
    split = SplitTopkConfig(min_row=1, programs=8, max_programs=4, block=32, cand_factor=2, n_sample=32)
    got = ix._indexer_topk_impl(c["q"], c["k"], c["w"], jnp.asarray(c["qpos"]), jnp.asarray(c["klen"]), c["qs"],
                                c["ks"], jnp.int32(s), topk=topk, num_keys=s, interpret=True, split_config=split)
    want = numpy_topk(numpy_logits(c["q"], c["k"], c["w"], c["qpos"], c["klen"], c["qs"], c["ks"], key_offset=s,
                                   num_keys=s), topk)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_indexer_topk_ties_go_to_the_lower_index():
    """One head and keys whose products are often <= 0: many logits are exactly 0 and tie at the k-th place,
    where the lowest window indices must win (kernel and blockwise reference, across key blocks)."""
    rng = np.random.default_rng(40)
    b, t, s, d = 1, 3, 200, 16
    q = jnp.asarray(rng.standard_normal((b, t, 1, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, 2 * s, d)), jnp.bfloat16)
    w = jnp.ones((b, t, 1), jnp.float32)
    want_logits = numpy_logits(q, k, w, key_offset=s, num_keys=s)
    topk = int((want_logits[0, 0] > 0).sum()) + 20  # reaches into the zeros of the first query
    want = numpy_topk(want_logits, topk)
    assert (want_logits[0, 0][want[0, 0]] == 0).sum() >= 20
    np.testing.assert_array_equal(np.asarray(indexer_topk(q, k, w, topk, key_offset=s, interpret=True)), want)
    np.testing.assert_array_equal(np.asarray(indexer_topk_reference(q, k, w, topk, key_offset=s, num_keys=s)), want)


def test_indexer_window_refuses_bad_windows():
    q, k, w, _, _ = inputs(41, 1, 2, 12, 2, 16)
    bad = [({"key_offset": 5}, {"num_keys": 8}, "outside"),
           ({"key_offset": -1}, {"num_keys": 4}, "outside"),
           ({}, {"num_keys": 13}, "num_keys must be an integer in"),
           ({}, {"num_keys": 2.0}, "num_keys must be a static integer"),
           ({"key_offset": 1.5}, {}, "key_offset must be an integer scalar"),
           ({"key_offset": jnp.array([1, 2])}, {}, "key_offset must be an integer scalar")]
    for off, n, message in bad:
        for fn in (indexer_logits, indexer_logits_reference):
            with pytest.raises(ValueError, match=message):
                fn(q, k, w, **off, **n)
        for fn in (indexer_topk, indexer_topk_reference):
            with pytest.raises(ValueError, match=message):
                fn(q, k, w, 3, **off, **n)
    with pytest.raises(ValueError, match="num_keys .* is required with a traced key_offset"):
        jax.jit(lambda off: indexer_topk_reference(q, k, w, 3, key_offset=off))(jnp.int32(0))


def test_reference_decode_temp_memory_does_not_grow_with_num_keys():
    """The compiled decode step of the XLA reference (T = 1, traced offset into a stacked float32 buffer, as the
    CPU engine keeps it) keeps the same temporaries at 4x the window: no window copy, no [B, T, num_keys] logits.
    (XLA's CPU backend upcasts a bfloat16 buffer whole before slicing it: see the note above the references.)"""
    b, h, d, topk = 2, 4, 32, 64

    def temp_bytes(n):
        args = (jax.ShapeDtypeStruct((b, 1, h, d), jnp.float32), jax.ShapeDtypeStruct((b, 3 * n, d), jnp.float32),
                jax.ShapeDtypeStruct((b, 1, h), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32),
                jax.ShapeDtypeStruct((), jnp.int32))

        def step(q, k, w, lengths, off):
            return indexer_topk_reference(q, k, w, topk, q_positions=(lengths - 1)[:, None], k_lengths=lengths,
                                          key_offset=off, num_keys=n)

        return jax.jit(step).lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(16384)
    assert large <= small, (small, large)
    assert small < 4096 * d * 4, small  # under one window of keys
