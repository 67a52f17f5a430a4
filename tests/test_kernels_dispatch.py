"""The model's kernel dispatch: backend choice and the query-chunked XLA sparse attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from indexcache_jax.inference import kernels


def test_chunked_reference_equals_float64_bruteforce(monkeypatch):
    rng = np.random.default_rng(41)
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


@pytest.mark.parametrize("platform,pallas", [(None, False), ("cpu", False), ("tpu", False), ("gpu", True)])
def test_auto_picks_pallas_on_gpu_only(monkeypatch, platform, pallas):
    """backend="auto" routes both kernels to Pallas when JAX's default backend is a GPU and to the XLA references
    otherwise (None: this machine's real backend, a CPU in CI). The kernels are replaced by recorders, so no GPU
    is needed."""
    if platform is not None:
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
    elif jax.default_backend() == "gpu":
        pytest.skip("checks the real non-GPU default; this machine's default backend is a GPU")
    calls = []
    for name in ("sparse_mla", "sparse_mla_reference", "indexer_topk", "indexer_topk_reference"):
        monkeypatch.setattr(pk, name, lambda *a, _name=name, **kw: calls.append(_name) or (None, None))
    rng = np.random.default_rng(42)
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, 6, 8)), jnp.float32)
    kernels.sparse_mla(q, kv, jnp.zeros((1, 4, 3), jnp.int32), sm_scale=0.5, v_dim=4, backend="auto")
    kernels.indexer_topk(q, kv, jnp.ones((1, 4, 2), jnp.float32), 3, q_positions=jnp.zeros((1, 4), jnp.int32),
                         k_lengths=jnp.full((1,), 6, jnp.int32), backend="auto")
    suffix = "" if pallas else "_reference"
    assert calls == ["sparse_mla" + suffix, "indexer_topk" + suffix]
    assert kernels.use_pallas("auto") is pallas


def test_project_sends_one_row_to_the_row_gemv_kernel(monkeypatch):
    """`project`: a single row goes to the Pallas row GEMV when Pallas is in use (interpret mode here), and agrees with
    the float64 product; more rows, the XLA backend, or a shape the kernel does not take stay XLA's product."""
    from pallas_kernels import row_gemv

    rng = np.random.default_rng(43)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    one = rng.standard_normal((1, 1, 64)).astype(np.float32)
    calls = []
    real = row_gemv.row_gemvs
    monkeypatch.setattr(row_gemv, "row_gemvs", lambda x, ws, **kw: calls.append(x.shape) or real(x, ws, **kw))
    got = kernels.project(jnp.asarray(one), jnp.asarray(w), backend="pallas")
    assert got.shape == (1, 1, 48) and calls == [(1, 64)]
    np.testing.assert_allclose(np.asarray(got), one.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-5)
    two = rng.standard_normal((1, 2, 64)).astype(np.float32)
    for x, weight, backend in [(two, w, "pallas"), (one, w, "xla"), (one[..., :40], w[:40, :47], "pallas")]:
        got = kernels.project(jnp.asarray(x), jnp.asarray(weight), backend=backend)
        np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ weight.astype(np.float64), rtol=1e-5,
                                   atol=1e-5)
    assert calls == [(1, 64)]


def test_routed_experts_take_the_gemv_for_a_few_pairs(monkeypatch):
    """`routed_experts`: up to `ROUTED_GEMV_MAX_PAIRS` (token, expert) pairs take the routed GEMV kernels when Pallas
    is in use (interpret mode here), more pairs or the XLA backend the grouped plan; all equal the float64 oracle."""
    from moe_oracle import experts_f64, rel_err
    from pallas_kernels import routed_gemv

    rng = np.random.default_rng(44)
    e, d, i, k = 6, 32, 48, 4
    gate, up = (rng.standard_normal((e, d, i)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((e, i, d)).astype(np.float32) * 0.3
    calls = []
    real = routed_gemv.routed_experts_gemv
    monkeypatch.setattr(routed_gemv, "routed_experts_gemv",
                        lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    few = kernels.ROUTED_GEMV_MAX_PAIRS // k
    for n, backend in [(few, "pallas"), (few + 1, "pallas"), (few, "xla")]:
        x = rng.standard_normal((n, d)).astype(np.float32)
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
        w = rng.random((n, k)).astype(np.float32)
        got = kernels.routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), gate, up, down, backend=backend)
        assert got.shape == (n, d) and rel_err(got, experts_f64(x, ids, w, gate, up, down)) < 1e-5
    assert calls == [few]


def test_stacked_weights_are_read_in_place_at_their_layer(monkeypatch):
    """`StackedWeight`s of one layer go to the row GEMV as whole stacks with the layer index (interpret mode here),
    and equal the float64 products of that layer's weights, also as a wider dtype (bf16 stack read as float32);
    weights of different layers, or a narrowing cast, fall back to the layer's own values; the XLA backend uses the
    values."""
    from pallas_kernels import row_gemv

    rng = np.random.default_rng(45)
    stacks = [jnp.asarray(rng.standard_normal((3, 64, n)), jnp.bfloat16) for n in (32, 48)]
    x = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.float32)
    calls = []
    real = row_gemv.row_gemvs
    monkeypatch.setattr(row_gemv, "row_gemvs", lambda x, ws, **kw: calls.append(
        (kw.get("layer") is not None, [w.shape for w in ws])) or real(x, ws, **kw))
    layer = jnp.int32(2)
    ws = [kernels.StackedWeight(s[2], s, layer).astype(jnp.float32) for s in stacks]
    assert all(isinstance(w, kernels.StackedWeight) and w.dtype == jnp.float32 for w in ws)
    for backend in ("pallas", "xla"):
        got = kernels.project_many(x, ws, backend=backend)
        for g, s in zip(got, stacks):
            assert g.shape == (1, 1, s.shape[2]) and g.dtype == jnp.float32
            want = np.asarray(x, np.float64)[0] @ np.asarray(s[2], np.float64)
            np.testing.assert_allclose(np.asarray(g, np.float64)[0], want, rtol=1e-5, atol=1e-5)
    assert calls == [(True, [(3, 64, 32), (3, 64, 48)])]
    other = kernels.StackedWeight(stacks[1][0], stacks[1], jnp.int32(0))
    kernels.project_many(x.astype(jnp.bfloat16), [ws[0].astype(jnp.bfloat16), other], backend="pallas")
    assert calls[-1] == (False, [(64, 32), (64, 48)])
    narrowed = kernels.StackedWeight(stacks[0][1].astype(jnp.float32), stacks[0].astype(jnp.float32),
                                     jnp.int32(1)).astype(jnp.bfloat16)
    assert not isinstance(narrowed, kernels.StackedWeight) and narrowed.dtype == jnp.bfloat16
    reshaped = kernels.StackedWeight(stacks[1][0], stacks[1], jnp.int32(0)).reshape(64, 3, 16)
    assert reshaped.shape == (64, 3, 16) and reshaped.stack.shape == (3, 64, 3, 16)


def test_stacked_experts_are_read_in_place_at_their_layer(monkeypatch):
    """`routed_experts` with `StackedWeight` experts of one layer hands the routed GEMV the whole stacks and the
    layer (interpret mode here); the result equals the float64 oracle on that layer's experts."""
    from moe_oracle import experts_f64, rel_err
    from pallas_kernels import routed_gemv

    rng = np.random.default_rng(46)
    depth, e, d, i, n, k = 3, 6, 32, 48, 2, 4
    gate, up = (rng.standard_normal((depth, e, d, i)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((depth, e, i, d)).astype(np.float32) * 0.3
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.random((n, k)).astype(np.float32)
    calls = []
    real = routed_gemv.routed_experts_gemv
    monkeypatch.setattr(routed_gemv, "routed_experts_gemv",
                        lambda *a, **kw: calls.append(kw.get("layer") is not None) or real(*a, **kw))
    layer = jnp.int32(1)
    experts = [kernels.StackedWeight(jnp.asarray(s[1]), jnp.asarray(s), layer) for s in (gate, up, down)]
    got = kernels.routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), *experts, backend="pallas")
    assert got.shape == (n, d) and calls == [True]
    assert rel_err(got, experts_f64(x, ids, w, gate[1], up[1], down[1])) < 1e-5


def test_each_head_product_takes_the_head_gemv_at_one_token(monkeypatch):
    """`project_each_head`: one token's per-head products go to `head_gemv` with Pallas (interpret mode here), from a
    `StackedWeight` as the whole stack and its layer; two tokens, or the XLA backend, are XLA's einsum. All equal
    float64, in both orientations."""
    from pallas_kernels import row_gemv

    rng = np.random.default_rng(47)
    stack = rng.standard_normal((3, 4, 32, 48)).astype(np.float32)  # [L, H, K, N]
    calls = []
    real = row_gemv.head_gemv
    monkeypatch.setattr(row_gemv, "head_gemv", lambda x, w, **kw: calls.append(
        (kw.get("layer") is not None, kw["transposed"])) or real(x, w, **kw))
    for tokens, backend in [(1, "pallas"), (2, "pallas"), (1, "xla")]:
        x = rng.standard_normal((1, tokens, 4, 32)).astype(np.float32)
        want = np.einsum("bthk,hkn->bthn", x.astype(np.float64), stack[2].astype(np.float64))
        got = kernels.project_each_head(jnp.asarray(x), kernels.StackedWeight(jnp.asarray(stack[2]),
                                                                              jnp.asarray(stack), jnp.int32(2)),
                                        backend=backend)
        assert got.shape == (1, tokens, 4, 48)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        xt = rng.standard_normal((1, tokens, 4, 48)).astype(np.float32)  # against w [H, N, K]: contract on 48
        want = np.einsum("bthk,hnk->bthn", xt.astype(np.float64), stack[1].astype(np.float64))
        got = kernels.project_each_head(jnp.asarray(xt), jnp.asarray(stack[1]), transposed=True, backend=backend)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert calls == [(True, False), (False, True)]
