"""Multi-layer indexer distillation against a plain per-layer reference; Proposition 1; frozen leaves; resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax.methods import distill
from indexcache_jax.model.layers import MLA, Block, Indexer, RMSNorm
from indexcache_jax.model.model import make_context
from indexcache_jax.model.params import unstack_layers
from random_model import random_params

PATTERN = "FSSF"  # layer 0 serves layers 1, 2 (m = 2); layer 3 serves itself (m = 0)
CFG = ic.tiny(num_layers=4, index_topk=4, mlp_layer_types=("dense", "sparse", "dense", "sparse"))
TRAIN = dict(pattern=PATTERN, steps=6, warmup_steps=2, dense_steps=3, learning_rate=3e-2, progress=False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(21)
    return random_params(CFG, 7), [rng.integers(0, CFG.vocab_size, (2, 16)) for _ in range(3)]


@pytest.fixture(scope="module")
def trained(data):
    params, batches = data
    return distill.train_indexers(params, CFG, batches, **TRAIN)


def reference_kl(params, cfg, tokens, pattern, stage, own_layer_only=False) -> float:
    """L_multi / (B T) by a per-layer loop in float64 numpy. The dense stage runs DSA with index_topk = T (every
    causal key selected == dense attention); the sparse stage runs the pattern and restricts to the F layer's set."""
    b, t = tokens.shape
    run_cfg = cfg.replace(index_topk=t) if stage == "dense" else cfg
    top, layers = unstack_layers(params, cfg)
    ctx = make_context(cfg, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.full((b,), t), jnp.zeros((b,), jnp.int32))
    h = top["embed"][jnp.asarray(tokens)]
    idx = jnp.full((b, t, min(run_cfg.index_topk, t)), -1, jnp.int32)
    probs, logits, selected = {}, {}, {}
    causal = np.arange(t)[None, :] <= np.arange(t)[:, None]
    for i, lp in enumerate(layers):
        x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps).apply({"params": lp["attn_norm"]}, h)
        qr, q = MLA(cfg).apply({"params": lp["mla"]}, x, ctx["cos"], ctx["sin"], method=MLA.project_q)
        kv = MLA(cfg).apply({"params": lp["mla"]}, x, ctx["cos"], ctx["sin"], method=MLA.project_kv)
        s = np.einsum("bthc,bsc->bhts", np.asarray(q, np.float64), np.asarray(kv, np.float64)) * cfg.softmax_scale
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        probs[i] = (p / p.sum(-1, keepdims=True)).mean(1)  # [B, T, S]
        full = pattern[i] == "F"
        if full:
            ip = {"params": lp["indexer"]}
            k = np.asarray(Indexer(cfg).apply(ip, x, ctx["cos"], ctx["sin"], method=Indexer.keys), np.float64)
            iq, iw = Indexer(cfg).apply(ip, qr, x, ctx["cos"], ctx["sin"], method=Indexer.queries)
            dots = np.maximum(np.einsum("bthd,bsd->bths", np.asarray(iq, np.float64), k), 0)
            logits[i] = np.where(causal, np.einsum("bths,bth->bts", dots, np.asarray(iw, np.float64)), -np.inf)
        block_params = lp if full else {key: v for key, v in lp.items() if key != "indexer"}
        (h, idx), _ = Block(run_cfg, full, cfg.mlp_layer_types[i]).apply({"params": block_params}, (h, idx), ctx, None)
        if full:
            selected[i] = np.asarray(idx)
    total = 0.0
    src = ic.schedule.source_layers(pattern)
    for f in logits:
        served = [f] if own_layer_only else [j for j in range(cfg.num_layers) if src[j] == f]
        for j in served:
            lq, p = logits[f], probs[j]
            if stage == "sparse":
                sel = selected[f]
                keep = np.zeros_like(p, bool)
                for bb, tt, kk in zip(*np.nonzero(sel >= 0)):
                    keep[bb, tt, sel[bb, tt, kk]] = True
                lq, p = np.where(keep, lq, -np.inf), np.where(keep, p, 0.0)
                p = p / p.sum(-1, keepdims=True)
            lq = lq - lq.max(-1, keepdims=True)
            lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
            terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.where(p > 0, lq, 0)), 0.0)
            total += terms.sum() / len(served)
    return total / (b * t)


@pytest.mark.parametrize("stage,own", [("dense", False), ("sparse", False), ("dense", True)])
def test_loss_matches_reference_and_is_chunk_invariant(data, stage, own):
    params, batches = data
    tokens = batches[0]
    ref = reference_kl(params, CFG, tokens, PATTERN, stage, own)
    got = distill.distill_loss(params, CFG, tokens, pattern=PATTERN, stage=stage, own_layer_only=own, query_chunk=5)
    assert ref > 1e-2
    assert float(got) == pytest.approx(ref, rel=1e-4)
    if not own:
        whole = distill.distill_loss(params, CFG, tokens, pattern=PATTERN, stage=stage)
        assert float(whole) == pytest.approx(ref, rel=1e-4)


def test_proposition_1_multi_and_averaged_targets_have_equal_gradients(data):
    params, batches = data
    tokens = jnp.asarray(batches[1])
    indexers = distill.trainable_indexers(params, CFG, PATTERN)
    for stage in ("dense", "sparse"):
        def loss(ix, target, stage=stage):
            return distill.distill_loss(params, CFG, tokens, pattern=PATTERN, stage=stage, target=target, indexers=ix)

        multi, g_multi = jax.value_and_grad(loss)(indexers, "multi")
        avg, g_avg = jax.value_and_grad(loss)(indexers, "average")
        assert float(multi) > float(avg) + 1e-3  # Jensen: the values differ by the p's entropy gap
        leaves_m, leaves_a = jax.tree_util.tree_leaves(g_multi), jax.tree_util.tree_leaves(g_avg)
        assert any(np.abs(np.asarray(g)).max() > 1e-4 for g in leaves_m)
        for gm, ga in zip(leaves_m, leaves_a):
            np.testing.assert_allclose(np.asarray(gm), np.asarray(ga), rtol=2e-4, atol=1e-7)


def test_training_lowers_kl_and_changes_only_f_indexers(data, trained):
    params, batches = data
    new, history = trained
    assert [r["step"] for r in history] == list(range(6))
    assert [r["stage"] for r in history] == ["dense"] * 3 + ["sparse"] * 3
    assert history[0]["loss"] == pytest.approx(reference_kl(params, CFG, batches[0], PATTERN, "dense"), rel=1e-4)
    assert history[3]["lr"] > history[5]["lr"] > 0 and history[0]["lr"] == 0.0
    for stage in ("dense", "sparse"):
        before = np.mean([reference_kl(params, CFG, b, PATTERN, stage) for b in batches])
        after = np.mean([reference_kl(new, CFG, b, PATTERN, stage) for b in batches])
        assert after < 0.9 * before, (stage, before, after)
    top0, layers0 = unstack_layers(params, CFG)
    top1, layers1 = unstack_layers(new, CFG)
    for a, b in zip(jax.tree_util.tree_leaves(top0), jax.tree_util.tree_leaves(top1)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for layer, (l0, l1) in enumerate(zip(layers0, layers1)):
        for key in l0:
            same = [np.array_equal(np.asarray(a), np.asarray(b))
                    for a, b in zip(jax.tree_util.tree_leaves(l0[key]), jax.tree_util.tree_leaves(l1[key]))]
            if key == "indexer" and PATTERN[layer] == "F":
                assert not any(same), (layer, key)  # wq_b, wk, k_norm scale/bias, weights_proj all move
            else:
                assert all(same), (layer, key)


def test_params_laid_out_with_shared_layers_train_like_all_f(data, trained):
    """Weights stored for the pattern itself (S layers without indexers, as GLM-5.2 ships) train to the same
    indexers as the all-F layout, and come back in their own layout."""
    params, batches = data
    cfg_s = CFG.with_pattern(PATTERN)
    new_s, history_s = distill.train_indexers(ic.relayout(params, CFG, cfg_s), cfg_s, batches, **TRAIN)
    new, history = trained
    assert [r["loss"] for r in history_s] == pytest.approx([r["loss"] for r in history], rel=1e-5)
    expected = ic.relayout(new, CFG, cfg_s)
    assert jax.tree_util.tree_structure(new_s) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(new_s), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_resume_after_kill_matches_uninterrupted(data, trained, tmp_path):
    params, batches = data
    new, full_history = trained

    class Killed(Exception):
        pass

    def kill(step, record):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        distill.train_indexers(params, CFG, batches, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                               callback=kill, **TRAIN)
    run_steps = []
    resumed, history = distill.train_indexers(params, CFG, batches, checkpoint_dir=str(tmp_path),
                                              checkpoint_every=2, callback=lambda s, r: run_steps.append(s), **TRAIN)
    assert run_steps == [4, 5]  # restarts after the last checkpoint (steps 0..3 done, saved at 4)
    assert history == full_history  # steps 0..3 from the checkpoint's metadata, 4..5 from this call
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(resumed)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [4, 6]  # the latest two are kept
    run_steps.clear()
    again, history = distill.train_indexers(params, CFG, batches, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                                            callback=lambda s, r: run_steps.append(s), **TRAIN)
    assert run_steps == [] and history == full_history  # already complete
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(again)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for other in ({"pattern": "FSFS"}, {"learning_rate": 1e-2}, {"steps": 8}, {"dense_steps": 2}):
        with pytest.raises(ValueError, match="holds a run with"):
            distill.train_indexers(params, CFG, batches, checkpoint_dir=str(tmp_path), **{**TRAIN, **other})


def test_bad_inputs_get_clear_errors(data):
    params, batches = data
    shared_cfg = CFG.with_pattern("FSSF")
    shared = ic.relayout(params, CFG, shared_cfg)
    with pytest.raises(ValueError, match=r"makes layers \[1\] F, but the params .* no indexer weights"):
        distill.train_indexers(shared, shared_cfg, batches, pattern="FFSF", steps=1, progress=False)
    with pytest.raises(ValueError, match="layer 0 must be 'F'"):
        distill.train_indexers(params, CFG, batches, pattern="SFFF", steps=1, progress=False)
    with pytest.raises(ValueError, match="steps >= 1"):
        distill.train_indexers(params, CFG, batches, pattern=PATTERN, steps=0, progress=False)
    with pytest.raises(ValueError, match="token ids out of range"):
        distill.train_indexers(params, CFG, [batches[0] + CFG.vocab_size], pattern=PATTERN, steps=1, progress=False)
