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
# # End to end against the paper's Table 1
#
# Every committed sweep of `indexcache-bench` (`benchmarks/results/e2e_*.json`, written by
# `indexcache_jax.e2e_bench`): prefill seconds and decode tok/s of the 30B DSA model under full DSA and IndexCache,
# beside the paper's Table 1 (SGLang on 8 H100s). Each sweep says on which device it ran and with which
# settings; a sweep with a cut model (`layers` < 47, preset overrides) is a smoke run of the script, not a result.

# %%
import glob
import json
import os

from IPython.display import Image, Markdown, display

from indexcache_jax import e2e_bench as eb

paths = sorted(glob.glob(os.path.join("..", "benchmarks", "results", "e2e_*.json")))
sweeps = {os.path.basename(p)[:-len(".json")]: json.load(open(p)) for p in paths}
for name, sweep in sweeps.items():
    devices = sorted({part["environment"]["device"] for part in sweep["parts"]})
    s = sweep["settings"]
    kind = "full model" if s["layers"] == 47 and not s["preset_overrides"] else "cut model (smoke run)"
    print(f"{name}: {len(sweep['measurements'])} measurements on {', '.join(devices)} "
          f"({len(sweep['parts'])} parts), {s['layers']} layers, {kind}")

# %% [markdown]
# ## The table
#
# Speedups are over full DSA with the same indexer numerics, within one sweep. Decode tok/s are per request, by
# GPU time where the profiler recorded GPU kernels, else by the host clock (marked).

# %%
for name, sweep in sweeps.items():
    display(Markdown(f"### {name}\n\n" + eb.markdown_table(sweep)))

# %% [markdown]
# ## Speedup against context
#
# The paper's IndexCache 1/4 is dashed.

# %%
png = eb.plot_speedups(sweeps, "e2e_speedups.png")
display(Image(png))
os.remove(png)
