# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # IndexCache on the embedded model: search, overlap, quality
#
# The package ships a small DSA model trained on the Python standard library (16 layers, an indexer on every
# layer keeping 256 keys per query). This notebook runs the greedy layer search on a calibration slice, draws the
# cross-layer top-k overlap, and compares full DSA with uniform and searched patterns on held-out text and on the
# key/value retrieval task. Sizes are reduced so that it runs on a CPU in a few minutes;
# `benchmarks/quality.py` runs the full study.

# %%
import tempfile

import numpy as np
from IPython.display import Image, display

import indexcache_jax as ic
from indexcache_jax import pretrained
from indexcache_jax.data import corpus, quality, retrieval, tokenizer

cfg, params, tok = pretrained.load_default()
data = corpus.load_corpus()
eos = tokenizer.eos_id(tok)
LENGTH = 512  # tokens per sequence here (the model was trained on up to 4096)
print(f"{cfg.num_layers} layers, index_topk {cfg.index_topk}; {len(data.train)} train / "
      f"{len(data.validation)} validation files of Python {data.python_version}")

# %% [markdown]
# ## Greedy search (Algorithm 1) on the train split
# Each step flips to S the F layer whose flip raises the calibration loss least.

# %%
calib = corpus.lm_windows(corpus.token_stream(data.train[:60], tok, eos), LENGTH, 2)
result = ic.search.greedy_search(params, cfg, calib, keep="1/4", progress=False)
print("searched 1/4:", result.pattern, "| flipped in order:", result.removed)
plots = tempfile.mkdtemp()
display(Image(ic.analysis.plot_search(result, f"{plots}/search.png")))

# %% [markdown]
# ## Cross-layer top-k overlap
# Mean `|T_i ∩ T_j| / k` over positions with at least k keys; the searched groups are outlined.

# %%
overlap = ic.analysis.topk_overlap(params, cfg, calib[:1])
print(f"adjacent layers share {np.mean(np.diag(overlap, 1)):.0%} of their selected keys on average")
display(Image(ic.analysis.plot_overlap(overlap, f"{plots}/overlap.png", pattern=result.pattern)))

# %% [markdown]
# ## Quality on held-out files
# Bits per byte (lower is better) on validation windows, and exact-match retrieval on fresh cases.

# %%
windows = corpus.lm_windows(corpus.token_stream(data.validation, tok, eos), LENGTH, 4)
nbytes = quality.window_bytes(windows, tokenizer.token_bytes(tok))
cases = retrieval.make_cases(retrieval.FillerPool(data.validation), tok, seed=2026, count=8, context_tokens=LENGTH)
evaluator = quality.PatternEvaluator(params, cfg)
n = cfg.num_layers
settings = {"full DSA": "F" * n, "uniform 1/4": ic.uniform_pattern(n, "1/4"), "searched 1/4": result.pattern}
for name, pattern in settings.items():
    nll = evaluator.window_nll(pattern, windows, batch_size=4)
    hits = evaluator.retrieval_hits(pattern, cases, LENGTH, eos, retrieval.newline_token_ids(tok), batch_size=4)
    print(f"{name:13s} {pattern}  bits/byte {quality.bits_per_byte(nll, nbytes):.4f}  "
          f"retrieval {hits.sum()}/{len(cases)}")
