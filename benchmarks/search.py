"""Greedy-search cost: prefix reuse vs running every candidate from layer 0, vs the recompiling naive search.

Three ways to run Algorithm 1 on the same random all-F model and calibration batch:
  prefix       `greedy_search(method="prefix")`: traced pattern, candidates run from the flipped layer;
  naive        `greedy_search(method="naive")`: traced pattern, every candidate a full forward;
  recompiling  what one writes with the public forward: per candidate `relayout` + `indexcache_jax.score` under
               `cfg.with_pattern(...)`, i.e. one compile per new pattern (timed on step 1 only and extrapolated
               per candidate: running it to the end takes too long).
Cold = first call in the process (compile included); warm = a second identical call (compiled code reused).
Writes benchmarks/results/<name>.json.

    python benchmarks/search.py --layers 12 --keep 1/4 --seq 64 --rows 4 --name search_cpu
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from indexcache_jax.profiling import time_fn, write_result_json  # noqa: E402

import indexcache_jax as ic  # noqa: E402
from indexcache_jax import search  # noqa: E402
from indexcache_jax.model.model import param_shapes  # noqa: E402


def random_params(cfg, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(0.15 * rng.standard_normal(x.shape), jnp.float32),
                                  param_shapes(cfg))


def timed_search(params, cfg, calib, method: str, n_full: int) -> dict:
    out = {}
    for phase in ("cold", "warm"):
        r = search.greedy_search(params, cfg, calib, n_full=n_full, progress=False, method=method)
        out[phase] = {"seconds": r.seconds, "compiles": r.compiles}
    out.update(pattern=r.pattern, removed=r.removed, forward_passes=r.forward_passes,
               candidates=sum(len(c) for c in r.candidate_losses), step_losses=r.step_losses)
    return out


def recompiling_step1(params, cfg, calib) -> dict:
    """Step 1 of the recompiling naive search: each candidate `score`d under its own pattern."""
    n = cfg.num_layers
    times, losses = [], {}
    for layer in range(1, n):
        pattern = "".join("S" if i == layer else "F" for i in range(n))
        c = cfg.with_pattern(pattern)
        # One cold call per pattern (warmup=0): its compile is what this row measures.
        timing = time_fn(lambda c=c: ic.score(ic.relayout(params, cfg, c), c, calib), warmup=0, reps=1)
        times.append(timing["median_ms"] * 1e-3)
        losses[layer] = float(-np.mean(ic.score(ic.relayout(params, cfg, c), c, calib)))
    return {"candidates": n - 1, "seconds": sum(times), "seconds_per_candidate": float(np.mean(times)),
            "argmin": min(losses, key=losses.get)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--keep", default="1/4")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--name", default="search_cpu")
    args = ap.parse_args()
    n = args.layers
    cfg = ic.tiny(num_layers=n, index_topk=args.topk, mlp_layer_types=("dense",) * 2 + ("sparse",) * (n - 2))
    params = random_params(cfg, 0)
    calib = np.random.default_rng(1).integers(0, cfg.vocab_size, (args.rows, args.seq))
    n_full = ic.schedule.n_full_for_keep(n, args.keep)
    results = {m: timed_search(params, cfg, calib, m, n_full) for m in ("prefix", "naive")}
    assert results["prefix"]["step_losses"] == results["naive"]["step_losses"]
    rec = recompiling_step1(params, cfg, calib)
    n_cands = results["naive"]["candidates"]
    rec["extrapolated_full_search_seconds"] = rec["seconds_per_candidate"] * n_cands
    rec["argmin_matches_prefix_step1"] = rec["argmin"] == results["prefix"]["removed"][0]
    payload = {
        "config": {"layers": n, "keep": args.keep, "n_full": n_full, "seq": args.seq, "rows": args.rows,
                   "index_topk": args.topk, "hidden": cfg.hidden_size, "device": jax.devices()[0].device_kind,
                   "cpu_count": os.cpu_count()},
        "paper_forward_passes": search.naive_search_cost(n, n_full),
        "prefix": results["prefix"], "naive": results["naive"], "recompiling_naive_step1": rec,
        "speedup_prefix_vs_naive_warm": results["naive"]["warm"]["seconds"] / results["prefix"]["warm"]["seconds"],
        "forward_pass_ratio": results["naive"]["forward_passes"] / results["prefix"]["forward_passes"],
        "speedup_prefix_cold_vs_recompiling":
            rec["extrapolated_full_search_seconds"] / results["prefix"]["cold"]["seconds"],
    }
    path = write_result_json(args.name, payload)
    print(f"wrote {path}")
    for k in ("paper_forward_passes", "forward_pass_ratio", "speedup_prefix_vs_naive_warm",
              "speedup_prefix_cold_vs_recompiling"):
        print(k, payload[k])
    for m in ("prefix", "naive"):
        print(m, results[m]["cold"], results[m]["warm"], results[m]["forward_passes"])
    print("recompiling step 1", rec)


if __name__ == "__main__":
    main()
