# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # indexcache-jax quickstart
#
# A small random-weight DSA model: jit-compiled generation and scoring, then the same model with its F/S
# schedule switched from full DSA to IndexCache. With a real checkpoint, build `cfg` and `params` with
# `ic.DSAConfig.from_hf(...)` and `ic.params_from_hf(...)` (or `ic.load(...)`); everything below stays the same.

# %%
import time

import jax
import numpy as np

import indexcache_jax as ic

cfg = ic.tiny(index_topk=8)  # 6 layers, every layer F (full DSA); the indexer keeps 8 keys per query
params = ic.init_params(cfg, seed=0)
print(f"jax {jax.__version__} on {jax.default_backend()}; pattern {cfg.pattern}")
print(f"decode cache in bfloat16: {ic.cache_bytes_per_token(cfg)} bytes per token")

# %% [markdown]
# ## Generate
#
# `Engine` compiles a chunked prefill and a decode step that donates its cache; prompts of different lengths
# share one batch. The first call compiles, later calls with prompts in the same length bucket reuse the code.

# %%
rng = np.random.default_rng(0)
prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 23, 12)]
engine = ic.Engine(params, cfg, max_len=64, max_batch=4)

for attempt in ("first call (compiles)", "second call"):
    start = time.perf_counter()
    greedy = engine.generate(prompts, max_new_tokens=16)
    print(f"{attempt}: {time.perf_counter() - start:.2f} s")
for prompt, new in zip(prompts, greedy):
    print(len(prompt), "prompt tokens ->", new)

# %% [markdown]
# Sampling: temperature, top-k and top-p are traced values, so changing them does not recompile.

# %%
sampled = engine.generate(prompts, max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9, seed=1)
print(sampled[0])

# %% [markdown]
# ## Score
#
# `score` gives the log-prob of every next token, `[B, T - 1]`: the batch-evaluation API behind perplexity.
# Right padding is marked by `mask`; entries whose target is padding are 0. It agrees with
# `log_softmax(forward)`:

# %%
seqs = [p + g for p, g in zip(prompts, greedy)]
length = max(len(s) for s in seqs)
tokens = np.zeros((len(seqs), length), np.int32)
mask = np.zeros_like(tokens)
for i, s in enumerate(seqs):
    tokens[i, :len(s)], mask[i, :len(s)] = s, 1
logprobs = engine.score(tokens, mask=mask)
print("per-row perplexity:", np.exp(-logprobs.sum(1) / (mask.sum(1) - 1)).round(1))

full = jax.nn.log_softmax(ic.forward(params, cfg, tokens[:1, :len(seqs[0])]), axis=-1)[0, :-1]
reference = np.take_along_axis(np.asarray(full), np.array(seqs[0])[1:, None], axis=-1)[:, 0]
print("max |score - log_softmax(forward)|:", np.abs(logprobs[0, :len(seqs[0]) - 1] - reference).max())

# %% [markdown]
# ## Switch the schedule: full DSA -> IndexCache
#
# `with_pattern` sets the F/S pattern; `relayout` drops the indexer weights of the S layers, which reuse the
# top-k indices of the F layer before them. The cache keeps indexer keys on F layers only. (A random model's
# next-token distribution is nearly flat, so its greedy tokens flip easily; the paper (arXiv 2603.12201) measures trained ones.)

# %%
for keep in ("1/2", "1/3"):
    cfg_ic = cfg.with_pattern(ic.uniform_pattern(cfg.num_layers, keep))
    params_ic = ic.relayout(params, cfg, cfg_ic)
    engine_ic = ic.Engine(params_ic, cfg_ic, max_len=64, max_batch=4)
    out = engine_ic.generate(prompts, max_new_tokens=16)
    agree = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(out, greedy)])
    lp = engine_ic.score(tokens, mask=mask)
    print(f"IndexCache {keep}: pattern {cfg_ic.pattern}, cache {ic.cache_bytes_per_token(cfg_ic)} B/token, "
          f"greedy tokens equal to full DSA {agree:.0%}, mean |dlogprob| {np.abs(lp - logprobs)[mask[:, 1:] > 0].mean():.4f}")
