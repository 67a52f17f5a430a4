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


def _recording(monkeypatch, module, name, record):
    """Replaces `module.name` by a wrapper that appends `record(*args, **kwargs)` to the returned list first."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(record(*a, **kw)) or real(*a, **kw))
    return calls


def test_one_row_of_stacked_weights_takes_the_row_gemv(monkeypatch):
    """`project_many`: one row times `StackedWeight`s of one layer goes to the row GEMV as whole stacks with the
    layer index (interpret mode here), also read as a wider dtype (bf16 stacks into float32 products); two rows,
    the XLA backend, plain arrays (a layer's slices) and weights of different layers stay XLA's products. All equal
    the float64 products of that layer's weights."""
    from pallas_kernels import row_gemv

    rng = np.random.default_rng(45)
    stacks = [jnp.asarray(rng.standard_normal((3, 64, n)), jnp.bfloat16) for n in (32, 48)]
    calls = _recording(monkeypatch, row_gemv, "row_gemvs", lambda x, ws, **kw: (kw["layer"] is not None,
                                                                                 [w.shape for w in ws]))
    layer = jnp.int32(2)
    stacked = [kernels.StackedWeight(s[2], s, layer).astype(jnp.float32) for s in stacks]
    assert all(isinstance(w, kernels.StackedWeight) and w.dtype == jnp.float32 for w in stacked)
    other_layer = [stacked[0], kernels.StackedWeight(stacks[1][0], stacks[1], jnp.int32(0)).astype(jnp.float32)]
    plain = [s[2].astype(jnp.float32) for s in stacks]
    for rows, ws, backend in [(1, stacked, "pallas"), (2, stacked, "pallas"), (1, stacked, "xla"),
                              (1, plain, "pallas"), (1, other_layer, "pallas")]:
        x = jnp.asarray(rng.standard_normal((1, rows, 64)), jnp.float32)
        got = kernels.project_many(x, ws, backend=backend)
        for g, w in zip(got, ws):
            assert g.shape == (1, rows, w.shape[1]) and g.dtype == jnp.float32
            want = np.asarray(x, np.float64) @ np.asarray(kernels.layer_value(w), np.float64)
            np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=1e-5, atol=1e-5)
    assert calls == [(True, [(3, 64, 32), (3, 64, 48)])]
    narrowed = kernels.StackedWeight(stacks[0][1].astype(jnp.float32), stacks[0].astype(jnp.float32),
                                     jnp.int32(1)).astype(jnp.bfloat16)
    assert not isinstance(narrowed, kernels.StackedWeight) and narrowed.dtype == jnp.bfloat16
    reshaped = kernels.StackedWeight(stacks[1][0], stacks[1], jnp.int32(0)).reshape(64, 3, 16)
    assert reshaped.shape == (64, 3, 16) and reshaped.stack.shape == (3, 64, 3, 16)


def test_a_few_pairs_of_stacked_experts_take_the_routed_gemv(monkeypatch):
    """`routed_experts`: up to `ROUTED_GEMV_MAX_PAIRS` (token, expert) pairs of `StackedWeight` experts take the
    routed GEMV on the whole stacks at the layer (interpret mode here); more pairs, the XLA backend and plain
    arrays take the grouped plan. All equal the float64 oracle on that layer's experts."""
    from moe_oracle import experts_f64, rel_err
    from pallas_kernels import routed_gemv

    rng = np.random.default_rng(46)
    depth, e, d, i, k = 3, 6, 32, 48, 4
    gate, up = (rng.standard_normal((depth, e, d, i)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((depth, e, i, d)).astype(np.float32) * 0.3
    calls = _recording(monkeypatch, routed_gemv, "routed_experts_gemv", lambda x, *a, **kw: (x.shape[0], kw["layer"]
                                                                                             is not None))
    stacked = [kernels.StackedWeight(jnp.asarray(s[1]), jnp.asarray(s), jnp.int32(1)) for s in (gate, up, down)]
    plain = [jnp.asarray(s[1]) for s in (gate, up, down)]
    few = kernels.ROUTED_GEMV_MAX_PAIRS // k
    for n, experts, backend in [(few, stacked, "pallas"), (few + 1, stacked, "pallas"), (few, stacked, "xla"),
                                (few, plain, "pallas")]:
        x = rng.standard_normal((n, d)).astype(np.float32)
        ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
        w = rng.random((n, k)).astype(np.float32)
        got = kernels.routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), *experts, backend=backend)
        assert got.shape == (n, d) and rel_err(got, experts_f64(x, ids, w, gate[1], up[1], down[1])) < 1e-5
    assert calls == [(few, True)]


def test_one_token_of_stacked_head_products_takes_the_head_gemv(monkeypatch):
    """`project_each_head`: one token's per-head products with a `StackedWeight` go to `head_gemv` as the whole
    stack and its layer (interpret mode here); two tokens, the XLA backend or a plain array are XLA's einsum. All
    equal float64, in both orientations."""
    from pallas_kernels import row_gemv

    rng = np.random.default_rng(47)
    stack = jnp.asarray(rng.standard_normal((3, 4, 32, 48)), jnp.float32)  # [L, H, K, N], or [L, H, N, K] for x of 48
    calls = _recording(monkeypatch, row_gemv, "head_gemv", lambda x, w, **kw: (kw["layer"] is not None,
                                                                                kw["transposed"]))
    stacked = kernels.StackedWeight(stack[2], stack, jnp.int32(2))
    for tokens, w, backend in [(1, stacked, "pallas"), (2, stacked, "pallas"), (1, stacked, "xla"),
                               (1, stack[2], "pallas")]:
        for transposed, width in [(False, 32), (True, 48)]:
            x = rng.standard_normal((1, tokens, 4, width)).astype(np.float32)
            spec = "bthk,hnk->bthn" if transposed else "bthk,hkn->bthn"
            want = np.einsum(spec, x.astype(np.float64), np.asarray(stack[2], np.float64))
            got = kernels.project_each_head(jnp.asarray(x), w, transposed=transposed, backend=backend)
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert calls == [(True, False), (True, True)]


def test_a_shared_expert_joins_the_routed_gemv_pairs():
    """`routed_experts(shared=...)`: where `takes_routed_gemv`, the shared expert's `StackedWeight`s of the same
    layer run inside the routed GEMV and add to the result (the float64 oracle plus its SwiGLU); elsewhere, or with
    a shared expert of another layer, it is a ValueError."""
    from moe_oracle import experts_f64, rel_err, swiglu_f64

    rng = np.random.default_rng(48)
    depth, e, d, i, n, k = 2, 5, 32, 48, 2, 2
    gate, up = (rng.standard_normal((depth, e, d, i)).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.standard_normal((depth, e, i, d)).astype(np.float32) * 0.3
    shared = [rng.standard_normal((depth, *s)).astype(np.float32) * 0.3 for s in [(d, i), (d, i), (i, d)]]
    layer = jnp.int32(1)

    def stacked(s, at=layer):
        return kernels.StackedWeight(jnp.asarray(s[int(at)]), jnp.asarray(s), at)

    experts = [stacked(s) for s in (gate, up, down)]
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.random((n, k)).astype(np.float32)
    assert kernels.takes_routed_gemv(jnp.asarray(x), k, experts, backend="pallas")
    assert not kernels.takes_routed_gemv(jnp.asarray(x), k, experts, backend="xla")
    got = kernels.routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), *experts, backend="pallas",
                                 shared=[stacked(s) for s in shared])
    want = experts_f64(x, ids, w, gate[1], up[1], down[1]) + swiglu_f64(x, *(s[1] for s in shared))
    assert got.shape == (n, d) and rel_err(got, want) < 1e-5
    for backend, at in [("xla", layer), ("pallas", jnp.int32(0))]:
        with pytest.raises(ValueError, match="shared expert joins the routed GEMV"):
            kernels.routed_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(w), *experts, backend=backend,
                                   shared=[stacked(s, at) for s in shared])
