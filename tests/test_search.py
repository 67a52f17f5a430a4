"""Greedy F/S search and the similarity DP on tiny random models, against independent references."""

import itertools
import json
import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax.methods import search
from indexcache_jax.methods.layer_runner import layer_runner
from indexcache_jax.model.layers import MLA, Block, RMSNorm
from indexcache_jax.model.model import make_context
from indexcache_jax.model.params import unstack_layers
from random_model import random_params


@pytest.fixture(scope="module")
def moe_model():
    cfg = ic.tiny(num_layers=6, index_topk=4)  # 2 dense + 4 MoE layers
    rng = np.random.default_rng(11)
    return cfg, random_params(cfg, 1), rng.integers(0, cfg.vocab_size, (4, 20))


@pytest.fixture(scope="module")
def searches(moe_model):
    cfg, params, calib = moe_model
    layer_runner.cache_clear()  # no earlier test's executable: the first search compiles exactly once
    prefix = search.greedy_search(params, cfg, calib, keep="1/4", batch_size=2, progress=False)
    naive = search.greedy_search(params, cfg, calib, n_full=2, batch_size=2, progress=False, method="naive")
    return prefix, naive


def replay_candidates(result, n: int, ranges):
    """Independently re-derives each commit's candidate set from the committed flips."""
    pattern, fixed, out = ["F"] * n, {a for a, _ in ranges}, []
    for layer in result.removed:
        block = next((a, b) for a, b in ranges if a <= layer <= b)
        out.append({l for l in range(block[0], block[1] + 1) if pattern[l] == "F" and l not in fixed})
        pattern[layer] = "S"
    return out, "".join(pattern)


def test_prefix_reuse_returns_exactly_the_naive_result(moe_model, searches):
    cfg, _, _ = moe_model
    prefix, naive = searches
    n = cfg.num_layers
    assert prefix.n_full == naive.n_full == math.ceil(n / 4)
    assert prefix.pattern == naive.pattern
    assert prefix.removed == naive.removed
    assert prefix.candidate_losses == naive.candidate_losses  # bit-identical floats
    assert prefix.step_losses == naive.step_losses and prefix.baseline_loss == naive.baseline_loss
    # invariants
    assert prefix.pattern[0] == "F" and prefix.pattern.count("F") == prefix.n_full
    assert len(prefix.removed) == n - prefix.n_full and len(set(prefix.removed)) == len(prefix.removed)
    assert 0 not in prefix.removed and all(prefix.pattern[l] == "S" for l in prefix.removed)
    cands, final = replay_candidates(prefix, n, [(0, n - 1)])
    assert final == prefix.pattern
    for c, losses, layer, step_loss in zip(cands, prefix.candidate_losses, prefix.removed, prefix.step_losses):
        assert set(losses) == c
        assert layer == min(losses, key=lambda l: (losses[l], l)) and step_loss == losses[layer]
    # cost: prefix runs each candidate from its flipped layer, naive from layer 0; one compile for all candidates.
    n_cands = sum(len(c) for c in prefix.candidate_losses)
    assert n_cands == search.naive_search_cost(n, prefix.n_full)
    assert naive.forward_passes == 1 + n_cands
    assert prefix.forward_passes == pytest.approx(1 + sum((n - l) / n for c in prefix.candidate_losses for l in c))
    assert prefix.forward_passes < naive.forward_passes
    assert prefix.compiles == 1 and naive.compiles == 0  # the second search reuses the first one's executable


def test_committed_flip_is_argmin_of_independent_full_forward_scores():
    cfg = ic.tiny(num_layers=5, index_topk=4, mlp_layer_types=("dense",) * 5)
    params = random_params(cfg, 2)
    calib = np.random.default_rng(12).integers(0, cfg.vocab_size, (3, 18))
    result = search.greedy_search(params, cfg, calib, n_full=2, progress=False)
    assert result.compiles == 1

    def loss(pattern: str) -> float:
        c = cfg.with_pattern(pattern)
        return float(-np.mean(ic.score(ic.relayout(params, cfg, c), c, calib)))

    assert result.baseline_loss == pytest.approx(loss("F" * 5), abs=2e-5)
    pattern = ["F"] * 5
    for layer, losses in zip(result.removed, result.candidate_losses):
        remaining = [l for l in range(1, 5) if pattern[l] == "F"]
        assert sorted(losses) == remaining
        ref = {l: loss("".join("S" if i == l else c for i, c in enumerate(pattern))) for l in remaining}
        for l in remaining:
            assert losses[l] == pytest.approx(ref[l], abs=2e-5)
        assert layer == min(ref, key=ref.get)
        pattern[layer] = "S"
    assert "".join(pattern) == result.pattern


def test_block_variant_keeps_block_starts_and_flips_once_per_block_per_step(moe_model):
    cfg, params, calib = moe_model
    n = cfg.num_layers
    result = search.greedy_search(params, cfg, calib, n_full=3, blocks=2, batch_size=4, progress=False)
    naive = search.greedy_search(params, cfg, calib, n_full=3, blocks=2, batch_size=4, progress=False, method="naive")
    assert (result.pattern, result.candidate_losses) == (naive.pattern, naive.candidate_losses)
    ranges = search.block_ranges(n, 2)
    assert ranges == [(0, 2), (3, 5)] == result.blocks
    assert result.pattern[0] == "F" and result.pattern[3] == "F" and result.pattern.count("F") == 3
    for step in set(result.steps):
        flips = [l for l, s in zip(result.removed, result.steps) if s == step]
        blocks_hit = [next(b for b, (a, z) in enumerate(ranges) if a <= l <= z) for l in flips]
        assert len(blocks_hit) == len(set(blocks_hit)) and blocks_hit == sorted(blocks_hit)
    cands, final = replay_candidates(result, n, ranges)
    assert final == result.pattern
    for c, losses, layer in zip(cands, result.candidate_losses, result.removed):
        assert set(losses) == c and layer == min(losses, key=lambda l: (losses[l], l))
    assert result.steps == [1, 1, 2]


def test_result_exports_hf_fields_and_round_trips(searches, tmp_path):
    prefix, _ = searches
    fields = prefix.to_hf_fields()
    assert fields["index_topk_pattern"] == prefix.pattern
    assert fields["indexer_types"] == ["full" if c == "F" else "shared" for c in prefix.pattern]
    assert ic.resolve_pattern(fields, len(prefix.pattern)) == prefix.pattern
    path = tmp_path / "r.json"
    prefix.save(str(path))
    assert search.SearchResult.from_dict(json.loads(path.read_text())) == prefix
    assert search.SearchResult.load(str(path)) == prefix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind


def test_bad_inputs_get_clear_errors(moe_model):
    cfg, params, calib = moe_model
    for n_full in (0, cfg.num_layers + 1):
        with pytest.raises(ValueError, match=r"n_full must be .*\(layer 0 stays F\)"):
            search.greedy_search(params, cfg, calib, n_full=n_full, progress=False)
    with pytest.raises(ValueError, match=r"n_full must be .*\(layer 0 and each block start stay F\)"):
        search.greedy_search(params, cfg, calib, n_full=1, blocks=2, progress=False)
    for keep, shown in ((Fraction(0), "0"), (Fraction(2, 3), "2/3"), ("1/0", "'1/0'")):
        with pytest.raises(ValueError, match=f"keep must be 1/r .*, got {shown}$"):
            search.greedy_search(params, cfg, calib, keep=keep, progress=False)
    for batch_size in (None, 2):
        with pytest.raises(ValueError, match=r"the calibration set has no rows \(tokens of shape \(0, 20\)\)"):
            search.greedy_search(params, cfg, calib[:0], n_full=2, batch_size=batch_size, progress=False)
    with pytest.raises(ValueError, match="exactly one of n_full and keep"):
        search.greedy_search(params, cfg, calib, n_full=2, keep=Fraction(1, 2), progress=False)
    with pytest.raises(ValueError, match="index_topk"):
        search.greedy_search(params, cfg, calib[:, : cfg.index_topk], n_full=2, progress=False)
    shared = cfg.with_pattern("FSFFFF")
    with pytest.raises(ValueError, match=r"indexer weights on every layer.*\[1\]"):
        search.greedy_search(ic.relayout(params, cfg, shared), shared, calib, n_full=2, progress=False)
    with pytest.raises(ValueError, match="token ids out of range"):
        search.greedy_search(params, cfg, calib + cfg.vocab_size, n_full=2, progress=False)


def reference_similarity(params, cfg, tokens) -> np.ndarray:
    """Appendix C matrix by a plain per-layer loop: all-F hidden states from `Block.apply`, indices from `forward`."""
    b, t = tokens.shape
    k = min(cfg.index_topk, t)
    _, chosen = ic.forward(params, cfg, tokens, return_indices=True)
    top, layers = unstack_layers(params, cfg)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    ctx = make_context(cfg, pos, jnp.full((b,), t), jnp.zeros((b,), jnp.int32))
    h = top["embed"][jnp.asarray(tokens)]
    idx = jnp.full((b, t, k), -1, jnp.int32)
    n = cfg.num_layers
    sim = np.zeros((n, n))
    rows = np.arange(t) + 1 > k
    for i, lp in enumerate(layers):
        x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps).apply({"params": lp["attn_norm"]}, h)
        mla = {"params": lp["mla"]}
        _, q = MLA(cfg).apply(mla, x, ctx["cos"], ctx["sin"], method=MLA.project_q)
        kv = MLA(cfg).apply(mla, x, ctx["cos"], ctx["sin"], method=MLA.project_kv)
        outs = [np.asarray(MLA(cfg).apply(mla, q, kv, chosen[j], method=MLA.attend), np.float64) for j in range(i + 1)]
        for j in range(i):
            a, o = outs[i][:, rows], outs[j][:, rows]
            sim[i, j] = np.mean((a * o).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(o, axis=-1)))
        (h, idx), _ = Block(cfg, True, cfg.mlp_layer_types[i]).apply({"params": lp}, (h, idx), ctx, None)
    return sim


def test_similarity_dp_matrix_and_exact_optimum(moe_model):
    cfg, params, calib = moe_model
    result = search.similarity_dp(params, cfg, calib[:2], n_full=3)
    np.testing.assert_allclose(result.similarity, reference_similarity(params, cfg, calib[:2]), atol=2e-5)
    n = cfg.num_layers
    assert np.all(np.triu(result.similarity) == 0) and np.all(result.similarity[np.tril_indices(n, -1)] != 0)
    # exhaustive search over every pattern with 3 F layers, layer 0 F, on a random matrix and on the real one
    rand = np.tril(np.random.default_rng(3).uniform(-1, 1, (n, n)), -1)
    for sim in (result.similarity, rand):
        best, best_val = None, -np.inf
        for rest in itertools.combinations(range(1, n), 2):
            pattern = "".join("F" if l == 0 or l in rest else "S" for l in range(n))
            src = ic.schedule.source_layers(pattern)
            val = sum(sim[l, src[l]] for l in range(n) if pattern[l] == "S")
            if val > best_val:
                best, best_val = pattern, val
        dp = search.similarity_dp(None, cfg, n_full=3, similarity=sim)
        assert dp.pattern == best and dp.objective == pytest.approx(best_val, abs=1e-12)
        assert dp.pattern[0] == "F" and dp.pattern.count("F") == 3
