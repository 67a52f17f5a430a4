"""The routed MoE on CPU: every `moe_impl` against the numpy float64 oracle (`moe_oracle.py`), the grouped row plan
against a brute-force numpy plan, the grouped products' XLA paths, and the Hopper kernel's lowering for CUDA
(Mosaic GPU has no interpreter: its numerics are checked on the GPU by `benchmarks/moe.py`)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax.model.moe import MOE_IMPLS, MoE, resolve_moe_impl
from moe_oracle import experts_f64, rel_err, route_f64, swiglu_f64
from pallas_kernels import grouped_matmul as gm

ROUTINGS = {
    "grouped_scaled_norm": dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
    "plain_unnormalised": dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
}


def _config(routing: str, shared: int, experts: int = 16, top_k: int = 3):
    return ic.tiny(n_routed_experts=experts, num_experts_per_tok=top_k, n_shared_experts=shared, hidden_size=24,
                   moe_intermediate_size=12, **ROUTINGS[routing])


def _random_params(cfg, rng, x):
    params = nn.meta.unbox(MoE(cfg).init(jax.random.key(0), x)["params"])
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.4, jnp.float32), params)


def _oracle(cfg, params, x):
    flat = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
    ids, weights = route_f64(flat, params["router"], params["router_bias"], top_k=cfg.num_experts_per_tok,
                             n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                             routed_scaling_factor=cfg.routed_scaling_factor)
    y = experts_f64(flat, ids, weights, params["experts_gate"], params["experts_up"], params["experts_down"])
    if cfg.n_shared_experts:
        s = params["shared"]
        y = y + swiglu_f64(flat, s["gate"], s["up"], s["down"])
    return y.reshape(np.shape(x)), ids


@pytest.mark.parametrize("impl", MOE_IMPLS)
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("shared", [0, 2])
def test_moe_equals_oracle(impl, routing, shared):
    rng = np.random.default_rng(hash((impl, routing, shared)) % 2**32)
    cfg = _config(routing, shared)
    x = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)), jnp.float32)
    params = _random_params(cfg, rng, x)
    want, _ = _oracle(cfg, params, x)
    got = jax.jit(lambda p, v: MoE(cfg, impl=impl).apply({"params": p}, v))(params, x)
    chex.assert_shape(got, x.shape)
    chex.assert_tree_all_finite(got)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)


@pytest.mark.parametrize("impl", MOE_IMPLS)
def test_one_expert_set_takes_every_token(impl):
    """A bias that puts every token on experts 0..k-1: those get all tokens, every other expert none."""
    rng = np.random.default_rng(5)
    cfg = _config("plain_unnormalised", 1)
    x = jnp.asarray(rng.standard_normal((3, 5, cfg.hidden_size)), jnp.float32)
    params = _random_params(cfg, rng, x)
    params["router_bias"] = jnp.asarray(np.where(np.arange(16) < cfg.num_experts_per_tok, 50.0, 0.0), jnp.float32)
    want, ids = _oracle(cfg, params, x)
    assert set(np.unique(ids)) == set(range(cfg.num_experts_per_tok))
    got = jax.jit(lambda p, v: MoE(cfg, impl=impl).apply({"params": p}, v))(params, x)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("impl", MOE_IMPLS)
def test_padding_rows_do_not_change_real_tokens(impl):
    """Ragged batches: appended padding rows (any values) leave every real token's output as it was."""
    rng = np.random.default_rng(6)
    cfg = _config("grouped_scaled_norm", 1)
    x = jnp.asarray(rng.standard_normal((2, 7, cfg.hidden_size)), jnp.float32)
    params = _random_params(cfg, rng, x)
    pad = jnp.asarray(rng.standard_normal((2, 5, cfg.hidden_size)) * 10, jnp.float32)
    apply = jax.jit(lambda p, v: MoE(cfg, impl=impl).apply({"params": p}, v))
    alone = apply(params, x)
    padded = apply(params, jnp.concatenate([x, pad], axis=1))
    np.testing.assert_allclose(np.asarray(padded[:, :7]), np.asarray(alone), rtol=1e-5, atol=1e-6)


def test_forward_and_init_take_grouped():
    cfg = ic.tiny(num_layers=2, mlp_layer_types=("dense", "sparse"), pattern="FS", index_topk=4)
    params = ic.init_params(cfg, seed=3, moe_impl="grouped")
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 11))
    got = ic.forward(params, cfg, tokens, moe_impl="grouped")
    assert rel_err(got, ic.forward(params, cfg, tokens, moe_impl="ragged")) < 1e-5


@pytest.mark.parametrize("impl", ["grouped", "expert_parallel"])
def test_transformers_parity_with_grouped(impl):
    """GLM-5 layout with group-limited routing: logits equal transformers' eager model (float32)."""
    import hf_oracle

    hf_cfg = hf_oracle.glm_config(num_hidden_layers=3, first_k_dense_replace=1, n_group=4, topk_group=2,
                                  indexer_types=["full", "shared", "full"])
    model = hf_oracle.build(hf_cfg, seed=11)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    params = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
    tokens = np.random.default_rng(11).integers(0, cfg.vocab_size, (2, 13))
    ref_logits, _ = hf_oracle.hf_logits_and_indices(model, tokens)
    logits = np.asarray(ic.forward(params, cfg, tokens, moe_impl=impl))
    assert np.abs(logits - ref_logits).max() / np.abs(ref_logits).max() <= 1e-4


def test_bad_moe_impl_names_the_choices():
    with pytest.raises(ValueError, match="grouped.*expert_parallel.*ragged.*dense"):
        resolve_moe_impl("fast")
    cfg = _config("plain_unnormalised", 0)
    x = jnp.ones((1, 2, cfg.hidden_size))
    with pytest.raises(ValueError, match="moe_impl must be one of"):
        MoE(cfg, impl="fast").init(jax.random.key(0), x)


def test_resolve_moe_impl_defaults():
    assert resolve_moe_impl(None, None) == ("grouped" if jax.default_backend() == "gpu" else "ragged")
    assert resolve_moe_impl(None, jax.sharding.AbstractMesh((2, 4), ("data", "model"))) == "expert_parallel"
    assert resolve_moe_impl(None, jax.sharding.AbstractMesh((8, 1), ("data", "model"))) != "expert_parallel"
    assert resolve_moe_impl("dense", jax.sharding.AbstractMesh((2, 4), ("data", "model"))) == "dense"


# ------------------------------------------------------------------------------------- the grouped row plan
def _numpy_plan(ids, num_experts, block_m):
    """Brute force: pairs in token-major order, grouped by expert, each expert's rows padded to whole tiles."""
    flat = ids.reshape(-1)
    pair_row = np.full(flat.shape, -1)
    tile_expert, row = [], 0
    for e in range(num_experts):
        members = np.flatnonzero(flat == e)
        for j, p in enumerate(members):
            pair_row[p] = row + j
        tiles = -(-len(members) // block_m)
        tile_expert += [e] * tiles
        row += tiles * block_m
    return pair_row, tile_expert


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("one_hot", [True, False])
def test_plan_rows_matches_brute_force(monkeypatch, block_m, one_hot):
    monkeypatch.setattr(gm, "ONE_HOT_CELLS", 1 << 30 if one_hot else 0)
    rng = np.random.default_rng(block_m)
    e, n, k = 12, 23, 3
    ids = np.stack([rng.choice(e - 4, k, replace=False) for _ in range(n)])  # experts 8..11 get no token
    ids[::7, 0] = e  # a few pairs with no expert (expert parallelism's empty slots)
    plan = gm.plan_rows(jnp.asarray(ids), e, block_m)
    pair_row, tile_expert = _numpy_plan(ids, e, block_m)
    rows = plan.row_token.shape[0]
    valid = ids.reshape(-1) < e
    got_rows = np.asarray(plan.pair_row).reshape(-1)
    np.testing.assert_array_equal(got_rows[valid], pair_row[valid])
    assert (got_rows[~valid] == rows).all()
    assert int(plan.num_tiles) == len(tile_expert) <= plan.tile_expert.shape[0] == gm.max_tiles(n * k, e, block_m)
    np.testing.assert_array_equal(np.asarray(plan.tile_expert)[:len(tile_expert)], tile_expert)
    np.testing.assert_array_equal(np.asarray(plan.row_token)[got_rows[valid]], np.flatnonzero(valid) // k)
    assert int(np.asarray(plan.padded_sizes).sum()) == len(tile_expert) * block_m


def test_plan_rows_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        gm.plan_rows(jnp.zeros((4,), jnp.int32), 4, 8)
    with pytest.raises(ValueError, match="integers"):
        gm.plan_rows(jnp.zeros((4, 2), jnp.float32), 4, 8)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("impl", ["xla_ragged", "xla_gather"])
@pytest.mark.parametrize("block_m", [1, 8, 64])
def test_moe_experts_xla_paths(impl, block_m, jit):
    rng = np.random.default_rng(block_m)
    n, d, i, e, k = 29, 16, 24, 10, 3
    x = rng.standard_normal((n, d)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    w = rng.random((n, k)).astype(np.float32)
    gate, up, down = (rng.standard_normal(s).astype(np.float32) * 0.3 for s in [(e, d, i), (e, d, i), (e, i, d)])
    fn = lambda *a: gm.moe_experts(*a, impl=impl, block_m=block_m)  # noqa: E731
    fn = jax.jit(fn) if jit else fn
    got = fn(x, ids, w, gate, up, down)
    chex.assert_shape(got, (n, d))
    assert rel_err(got, experts_f64(x, ids, w, gate, up, down)) < 1e-5


def test_moe_experts_rejects_mismatched_shapes():
    x = jnp.ones((4, 8))
    ids = jnp.zeros((4, 2), jnp.int32)
    g = jnp.ones((3, 8, 6))
    with pytest.raises(ValueError, match="disagree"):
        gm.moe_experts(x, ids, jnp.ones((4, 2)), g, g, jnp.ones((3, 8, 6)))
    with pytest.raises(ValueError, match=r"ids and weights \[N, k\]"):
        gm.moe_experts(x, ids, jnp.ones((4, 3)), g, g, jnp.ones((3, 6, 8)))
    with pytest.raises(ValueError, match="impl must be one of"):
        gm.moe_experts(x, ids, jnp.ones((4, 2)), g, g, jnp.ones((3, 6, 8)), impl="cuda")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block_m", [64, 128])
def test_kernel_lowers_to_mosaic_gpu(fused, block_m):
    """The kernel traces and lowers for CUDA at the 30B and DeepSeek dims (Mosaic GPU checks the 227 KB of shared
    memory while lowering)."""
    for d, i in ((2048, 1536), (7168, 2048)):
        k, n = (d, i) if fused else (i, d)
        assert gm.kernel_supports(jnp.bfloat16, k, n, block_m, fused)
        lhs = jax.ShapeDtypeStruct((block_m * 5, k), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((8, k, n), jnp.bfloat16)
        info = jax.ShapeDtypeStruct((6,), jnp.int32)
        config = gm._kernel_config(fused, block_m)
        lowered = gm.grouped_kernel.trace(lhs, (w, w) if fused else (w,), info, config=config)
        assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


def test_kernel_supports_only_its_shapes():
    assert not gm.kernel_supports(jnp.float32, 2048, 1536, 128, True)
    assert not gm.kernel_supports(jnp.bfloat16, 2048, 1536 + 64, 128, True)
    assert not gm.kernel_supports(jnp.bfloat16, 2048, 1536, 32, True)
    with pytest.raises(ValueError, match="do not fit"):
        gm.grouped_kernel(jnp.ones((128, 100), jnp.bfloat16), (jnp.ones((2, 100, 256), jnp.bfloat16),),
                          jnp.zeros((2,), jnp.int32), config=gm.PREFILL_CONFIG)
