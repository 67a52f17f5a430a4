"""Parity of `forward` with transformers' eager GlmMoeDsa / DeepseekV32 models (float32, CPU)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_oracle
import indexcache_jax as ic
from indexcache_jax.model import model as model_lib
from indexcache_jax.model.params import relayout


def assert_index_sets_equal(ours: np.ndarray, theirs: np.ndarray):
    """Our -1-padded top-k against transformers' (which also lists causally masked keys when fewer are valid)."""
    b, t, _ = ours.shape
    for bi in range(b):
        for ti in range(t):
            mine = set(ours[bi, ti][ours[bi, ti] >= 0].tolist())
            ref = {int(x) for x in theirs[bi, ti] if x <= ti}
            assert mine == ref, f"top-k differs at batch {bi}, query {ti}: {sorted(mine)} vs {sorted(ref)}"


def run_parity(hf_cfg, seed: int, batch: int, length: int):
    model = hf_oracle.build(hf_cfg, seed)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    params = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))
    ref_logits, ref_indices = hf_oracle.hf_logits_and_indices(model, tokens)
    logits, indices = ic.forward(params, cfg, tokens, return_indices=True)
    chex.assert_shape(logits, (batch, length, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    rel = np.abs(np.asarray(logits) - ref_logits).max() / np.abs(ref_logits).max()
    assert rel <= 1e-4, f"max relative logits error {rel:.2e}"
    assert sorted(indices) == sorted(ref_indices) == list(cfg.full_layers)
    for layer, idx in indices.items():
        chex.assert_shape(idx, (batch, length, min(cfg.index_topk, length)))
        chex.assert_type(idx, jnp.int32)
        assert_index_sets_equal(np.asarray(idx), ref_indices[layer])
    return cfg, params, tokens


GLM_PATTERNS = ["FFFFFFF", "FSFSFSS", "FSSSFSS", "FFSSSSF", "FSFFSSS", "FSSFSSF"]


@pytest.mark.parametrize("pattern", GLM_PATTERNS)
def test_glm_parity_patterns(pattern):
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=7, first_k_dense_replace=3,
                                  indexer_types=["full" if c == "F" else "shared" for c in pattern])
    cfg, _, _ = run_parity(hf_cfg, seed=len(pattern) + pattern.count("F"), batch=2, length=19)
    assert cfg.pattern == pattern


def test_glm_parity_searched_irregular_pattern():
    """A slice of the paper's searched 30B pattern: irregular groups mixing dense and MoE layers."""
    pattern = ic.schedule.GLM47_FLASH_DSA_30B_SEARCHED_1_4[:12]
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=12, first_k_dense_replace=2, n_group=4, topk_group=2,
                                  index_topk_pattern=pattern)
    cfg, _, _ = run_parity(hf_cfg, seed=11, batch=1, length=23)
    assert len(cfg.segments) > 2


def test_glm_parity_tied_embeddings_with_stored_head():
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=3, tie_word_embeddings=True, norm_topk_prob=False,
                                  first_k_dense_replace=0, routed_scaling_factor=1.5)
    model = hf_oracle.build(hf_cfg, 12)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    assert cfg.tie_word_embeddings and cfg.mlp_layer_types == ("sparse",) * 3
    tensors = hf_oracle.hub_tensors(model)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # a writer that stores the tied copy
    params = ic.params_from_hf(cfg, tensors)
    assert "lm_head" not in params
    tokens = np.random.default_rng(12).integers(0, cfg.vocab_size, (2, 15))
    ref, _ = hf_oracle.hf_logits_and_indices(model, tokens)
    out = np.asarray(ic.forward(params, cfg, tokens))
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_glm_parity_freq_schedule_and_yarn():
    hf_cfg = hf_oracle.glm_config(
        num_hidden_layers=6, index_topk_freq=2, index_skip_topk_offset=3, index_topk=3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 1.2},
    )
    cfg, _, _ = run_parity(hf_cfg, seed=5, batch=3, length=14)
    assert cfg.pattern == ic.freq_pattern(6, 2, offset=3)
    assert cfg.rope.rope_type == "yarn"


@pytest.mark.parametrize("seed", [0, 1])
def test_deepseek_v32_parity(seed):
    hf_cfg = hf_oracle.deepseek_config(first_k_dense_replace=2 if seed else 1)
    cfg, _, _ = run_parity(hf_cfg, seed=seed + 20, batch=2, length=21)
    assert cfg.architecture == "deepseek_v32" and not cfg.indexer_rope_interleave
    assert cfg.n_group == 4 and cfg.topk_group == 2


def test_relayout_matches_native_pattern_and_moe_impls_agree():
    """All-F params relaid out for a pattern equal params converted for that pattern; dense MoE equals ragged."""
    hf_all = hf_oracle.glm_config(num_hidden_layers=5)
    model = hf_oracle.build(hf_all, 3)
    tensors = hf_oracle.hub_tensors(model)
    cfg_all = ic.DSAConfig.from_hf(hf_all.to_dict())
    params_all = ic.params_from_hf(cfg_all, tensors)
    cfg_mixed = cfg_all.with_pattern("FSSFS")
    native = ic.params_from_hf(cfg_mixed, tensors)
    moved = relayout(params_all, cfg_all, cfg_mixed)
    chex.assert_trees_all_equal(native, moved)
    tokens = np.random.default_rng(3).integers(0, cfg_all.vocab_size, (2, 16))
    ragged = np.asarray(ic.forward(moved, cfg_mixed, tokens))
    dense = np.asarray(ic.forward(moved, cfg_mixed, tokens, moe_impl="dense"))
    np.testing.assert_allclose(dense, ragged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer 1 is F"):
        relayout(moved, cfg_mixed, cfg_all.with_pattern("FFSFS"))


def test_sparsity_changes_logits():
    """With index_topk below the length, sharing indices must change the output (the schedule is not a no-op)."""
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=4, index_topk=3)
    model = hf_oracle.build(hf_cfg, 9)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    params = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
    tokens = np.random.default_rng(9).integers(0, cfg.vocab_size, (1, 20))
    full = np.asarray(ic.forward(params, cfg, tokens))
    shared_cfg = cfg.with_pattern("FSSS")
    shared = np.asarray(ic.forward(relayout(params, cfg, shared_cfg), shared_cfg, tokens))
    assert np.abs(full - shared).max() > 1e-3


def test_bfloat16_compute_tracks_float32():
    hf_cfg = hf_oracle.glm_config(num_hidden_layers=3, index_topk=40)
    model = hf_oracle.build(hf_cfg, 4)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    params = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 12))
    ref = np.asarray(ic.forward(params, cfg, tokens))
    bf = ic.forward(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), cfg.replace(dtype="bfloat16"),
                    tokens)
    chex.assert_type(bf, jnp.float32)
    assert np.abs(np.asarray(bf) - ref).max() / np.abs(ref).max() < 5e-2


@functools.lru_cache(maxsize=1)
def _glm_oracle():
    """(cfg, params, tokens, transformers logits) of one tiny GLM model with shared layers."""
    hf_cfg = hf_oracle.glm_config(indexer_types=["full", "shared", "full", "shared", "shared"])
    model = hf_oracle.build(hf_cfg, 5)
    cfg = ic.DSAConfig.from_hf(hf_cfg.to_dict())
    params = ic.params_from_hf(cfg, hf_oracle.hub_tensors(model))
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 10))
    return cfg, params, tokens, hf_oracle.hf_logits_and_indices(model, tokens)[0]


class TestForwardBodyJitAndEager(chex.TestCase):
    """The un-jitted body of `forward` (`_forward` without its jit) gives transformers' logits both when run
    op by op and when jitted with traced tokens."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_transformers(self):
        cfg, params, tokens, ref = _glm_oracle()
        body = functools.partial(model_lib._forward.__wrapped__, cfg=cfg, return_indices=False, moe_impl="ragged")
        logits = self.variant(body)(params, jnp.asarray(tokens, jnp.int32))
        chex.assert_shape(logits, ref.shape)
        chex.assert_tree_all_finite(logits)
        rel = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
        assert rel <= 1e-4, f"max relative logits error {rel:.2e}"


def test_compile_size_does_not_grow_with_depth():
    """A uniform pattern is one segment scan: its program has the same size at 8 and at 24 layers."""
    def n_eqns(num_layers):
        cfg = ic.tiny(num_layers=num_layers, mlp_layer_types=("sparse",) * num_layers,
                      pattern=ic.uniform_pattern(num_layers, "1/4"))
        shapes = jax.eval_shape(lambda: ic.init_params(cfg))
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        return len(jax.make_jaxpr(lambda p, t: ic.forward(p, cfg, t))(shapes, tokens).jaxpr.eqns)

    assert n_eqns(8) == n_eqns(24)


def _layer_loop_lengths(jaxpr, outer=()):
    """For every scan in `jaxpr` (recursively) that lowers to a loop (more than one step, not fully unrolled): the
    lengths of the loops it sits in, then its own. (Whiles are op-internal loops such as the XLA top-k's.)"""
    out = []
    for eqn in jaxpr.eqns:
        inner = outer
        if eqn.primitive.name == "scan" and eqn.params["unroll"] is not True and (
                eqn.params["unroll"] < eqn.params["length"] > 1):
            inner = outer + (eqn.params["length"],)
            out.append(inner)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out.extend(_layer_loop_lengths(sub, inner))
    return out


@pytest.mark.parametrize("pattern, loops", [("FSSFSSFSS", [(3,)]), ("FSSSSS", [(5,)]),
                                            ("FSSFSSFSSSS", [(2,), (4,)])])
def test_no_layer_loop_nests_in_another(pattern, loops):
    """Within a segment of several groups the S runs are unrolled, each layer's weights one dynamic slice of the
    whole stack at (group, layer): a run loop nested in the group loop made XLA copy the group's run weights every
    group (1.2 GB a MoE layer at 30B). A one-group segment has no group loop and keeps its run scanned, so compile
    time stays flat in the run's length."""
    cfg = ic.tiny(num_layers=len(pattern), mlp_layer_types=("sparse",) * len(pattern), pattern=pattern)
    shapes = jax.eval_shape(lambda: ic.init_params(cfg))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    closed = jax.make_jaxpr(lambda p, t: ic.forward(p, cfg, t))(shapes, tokens)
    assert _layer_loop_lengths(closed.jaxpr) == loops


@pytest.mark.parametrize("bad", [[[1, 2, -1]], [[0, 256, 3]]])
def test_out_of_vocab_tokens_rejected(bad):
    cfg = ic.tiny()
    params = ic.init_params(cfg)
    with pytest.raises(ValueError, match="out of range"):
        ic.forward(params, cfg, np.asarray(bad))
