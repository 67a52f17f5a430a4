"""The main job: a small random DSA model end to end, under full DSA and under IndexCache.

Prints each schedule's pattern, the logits shape, compile and steady-state timings, and how far the IndexCache
logits move from full DSA's. Runs on CPU in about a minute; on GPU the Pallas kernels take over.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import indexcache_jax as ic


def _time(fn, *args, repeats: int = 3) -> tuple[float, float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = jax.block_until_ready(fn(*args))
    return compile_s, (time.perf_counter() - start) / repeats, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--index-topk", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    n = args.layers
    cfg = ic.tiny(num_layers=n, mlp_layer_types=("dense",) + ("sparse",) * (n - 1), index_topk=args.index_topk)
    params = ic.init_params(cfg, seed=args.seed)
    tokens = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq))
    print(f"jax {jax.__version__} on {jax.default_backend()}: {n} layers, hidden {cfg.hidden_size}, "
          f"index_topk {cfg.index_topk}, tokens {tokens.shape}")

    reference = None
    for name, pattern in [("full DSA", "F" * n), ("IndexCache 1/2", ic.uniform_pattern(n, "1/2")),
                          ("IndexCache 1/4", ic.uniform_pattern(n, "1/4"))]:
        run_cfg = cfg.with_pattern(pattern)
        run_params = ic.relayout(params, cfg, run_cfg)
        compile_s, step_s, logits = _time(lambda p, t, c=run_cfg: ic.forward(p, c, t), run_params, tokens)
        logits = np.asarray(logits)
        drift = "" if reference is None else f", max |logits - full DSA| {np.abs(logits - reference).max():.3f}"
        reference = logits if reference is None else reference
        print(f"{name:15s} pattern {pattern}  logits {logits.shape}  compile {compile_s:.2f} s  "
              f"forward {1e3 * step_s:.1f} ms{drift}")


if __name__ == "__main__":
    main()
