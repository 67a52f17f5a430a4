"""The embedded model: files within the size limits, `load_default` shapes and dtypes, held-out quality."""

import glob
import os

import jax
import numpy as np
import pytest

import indexcache_jax as ic
from indexcache_jax import pretrained, train
from indexcache_jax.data import corpus, quality, tokenizer
from indexcache_jax.model.model import param_shapes

# The embedded model must beat a uniform guess over its vocabulary (log2(V) bits per token, ~3.3 bits per byte on
# this text) by this factor on held-out text (the GPU-trained model reaches ~0.48 on this window; the earlier
# CPU-trained one ~0.74).
MAX_SHARE_OF_UNIFORM = 0.6


@pytest.fixture(scope="module")
def default():
    return pretrained.load_default()


def test_weight_files_fit_the_repository_limits():
    shards = glob.glob(os.path.join(pretrained.DEFAULT_MODEL_DIR, "model-*.safetensors"))
    sizes = [os.path.getsize(p) for p in shards]
    assert shards and max(sizes) <= 16_000_000 and sum(sizes) <= 25_000_000


def test_load_default_shapes_and_dtypes(default):
    cfg, params, tok = default
    assert cfg == train.default_model_config().replace(dtype="float32", backend="auto")
    assert cfg.num_layers >= 16 and cfg.index_topk * 16 <= cfg.max_position_embeddings
    expected = param_shapes(cfg)
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), expected)
    assert got == want
    assert tok.get_vocab_size() == cfg.vocab_size
    leaves = jax.tree_util.tree_leaves(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_held_out_bits_per_byte(default):
    """One held-out window of 1024 tokens: the forward's bits per byte, against the same sum from numpy."""
    cfg, params, tok = default
    data = corpus.load_corpus()
    window = corpus.lm_windows(corpus.token_stream(data.validation, tok, tokenizer.eos_id(tok)), 1024, 1)
    logits = np.asarray(ic.forward(params, cfg.replace(backend="xla"), window), np.float64)[0, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(1023), window[0, 1:]].sum()
    nbytes = quality.window_bytes(window, tokenizer.token_bytes(tok))
    bpb = quality.bits_per_byte(np.asarray([nll]), nbytes)
    uniform = 1023 * np.log2(cfg.vocab_size) / nbytes.sum()
    assert bpb < MAX_SHARE_OF_UNIFORM * uniform, (bpb, uniform)
    evaluator = quality.PatternEvaluator(params, cfg.replace(backend="xla"))
    assert quality.bits_per_byte(evaluator.window_nll("F" * cfg.num_layers, window), nbytes) == pytest.approx(bpb,
                                                                                                      rel=1e-4)


def test_shipped_patterns_are_valid_and_keep_their_share(default):
    cfg, _, _ = default
    for table in (pretrained.SEARCHED_PATTERNS, pretrained.SIMILARITY_DP_PATTERNS):
        for keep, pattern in table.items():
            ic.validate_pattern(pattern, cfg.num_layers)
            r = int(keep.split("/")[1])
            assert pattern.count("F") == -(-cfg.num_layers // r)
