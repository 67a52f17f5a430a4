"""End to end on one GPU: prefill and decode of a DSA model under full DSA and IndexCache, plus a Pallas-vs-XLA check.

The model has the paper's 30B dims (GLM-4.7-Flash with a 32x128 indexer, index_topk 2048; `glm47_flash_dsa_30b`)
cut to `--layers` layers, random bf16 weights. For each context length and each schedule it measures, in one run:
- prefill seconds of one prompt (`Engine.generate(..., max_new_tokens=1)`, warm);
- decode tokens/s of one request at that context (two warm generations differing by `--decode-steps` tokens);
and prints the IndexCache / full-DSA ratios. The indexer and sparse attention are the Pallas kernels (`backend`
"pallas"); `--xla-baseline` also times full DSA on the XLA references at the first context. `--indexer-quant
none,fp8` times every schedule with both indexer numerics (fp8: DeepSeek's FP8 indexer and the FP8 logits kernel)
and reports each one's ratios against full DSA with the same numerics, plus fp8 against none.

Before timing, `check_backends` runs `forward` with both backends on a float32 model and on a bfloat16 model with
index_topk below the length and reports top-k set agreement and logits error.

Run: `python benchmarks/end_to_end.py --contexts 32768,65536` (writes benchmarks/results/end_to_end.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from indexcache_jax.profiling import write_result_json  # noqa: E402

import indexcache_jax as ic  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def check_backends(seq: int, topk: int) -> list[dict]:
    """`forward` with cfg.backend "pallas" vs "xla" on a 2-layer model ('FS'): top-k sets and logits."""
    results = []
    for dtype in ("float32", "bfloat16"):
        cfg = ic.glm47_flash_dsa_30b(num_layers=2, mlp_layer_types=("dense", "sparse"), pattern="FS",
                                     index_topk=topk, vocab_size=4096, n_routed_experts=8, num_experts_per_tok=2,
                                     dtype=dtype)
        params = jax.jit(lambda: jax.tree.map(lambda x: x.astype(dtype), ic.init_params(cfg, seed=3)))()
        tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, seq))
        out = {}
        for backend in ("xla", "pallas"):
            logits, idx = ic.forward(params, cfg.replace(backend=backend), tokens, return_indices=True)
            out[backend] = (np.asarray(logits), np.asarray(idx[0]))
        (lx, ix), (lp, ip) = out["xla"], out["pallas"]
        same_rows = np.mean([set(ix[0, t][ix[0, t] >= 0]) == set(ip[0, t][ip[0, t] >= 0]) for t in range(seq)])
        overlap = np.mean([len(set(ix[0, t][ix[0, t] >= 0]) & set(ip[0, t][ip[0, t] >= 0]))
                           / max(1, (ix[0, t] >= 0).sum()) for t in range(seq)])
        # Per-token errors: a tiny difference can flip one token's MoE routing, so the worst token alone says little.
        rel = np.abs(lp - lx).max(-1) / np.abs(lx).max(-1)
        argmax = float(np.mean(lp.argmax(-1) == lx.argmax(-1)))
        results.append({"dtype": dtype, "seq": seq, "index_topk": topk, "rows_with_identical_topk": float(same_rows),
                        "mean_topk_overlap": float(overlap), "logits_rel_err_median_token": float(np.median(rel)),
                        "logits_rel_err_worst_token": float(rel.max()), "argmax_agreement": argmax})
        log(f"check {dtype}: identical top-k rows {same_rows:.4f}, mean overlap {overlap:.5f}, logits rel err "
            f"median token {np.median(rel):.2e}, worst token {rel.max():.2e}, argmax agreement {argmax:.4f}")
    return results


def time_engine(cfg, params, context: int, decode_steps: int, chunk: int, moe_impl: str | None) -> dict:
    """Warm timings of one request: prefill seconds, and decode tokens/s from the difference of two generations
    that share the prompt and differ by `decode_steps` new tokens (so prefill cancels out)."""
    engine = ic.Engine(params, cfg, max_len=context + 2 * decode_steps + 1, max_batch=1, chunk=chunk,
                       moe_impl=moe_impl)
    prompt = np.random.default_rng(context).integers(0, cfg.vocab_size, context).tolist()

    def best_of(n_new: int, reps: int = 2) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.generate([prompt], n_new)
            times.append(time.perf_counter() - t0)
        return min(times)

    t0 = time.perf_counter()
    engine.generate([prompt], 1 + decode_steps)  # compiles prefill and decode
    compile_s = time.perf_counter() - t0
    prefill_s = best_of(1)
    short, long = best_of(1 + decode_steps), best_of(1 + 2 * decode_steps)
    return {"compile_and_first_s": compile_s, "prefill_s": prefill_s,
            "decode_tok_s": decode_steps / max(long - short, 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--contexts", default="32768,65536")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--check-seq", type=int, default=4096)
    ap.add_argument("--check-topk", type=int, default=1024)
    ap.add_argument("--xla-baseline", action="store_true")
    ap.add_argument("--backend", default="pallas", help="kernels for the timed runs (xla for a CPU smoke run)")
    ap.add_argument("--schedules", default="full DSA,IndexCache 1/2,IndexCache 1/4")
    ap.add_argument("--indexer-quant", default="none", help="comma list of DSAConfig.indexer_quant values to time")
    ap.add_argument("--moe-impl", default=None, help="Engine moe_impl: ragged (default) or dense")
    ap.add_argument("--name", default="end_to_end")
    args = ap.parse_args()

    log(f"devices: {jax.devices()}")
    checks = check_backends(args.check_seq, args.check_topk)

    n = args.layers
    base = ic.glm47_flash_dsa_30b(num_layers=n, mlp_layer_types=("dense",) + ("sparse",) * (n - 1),
                                  dtype="bfloat16", backend=args.backend)
    params = jax.jit(lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16), ic.init_params(base, seed=0)))()
    all_schedules = {"full DSA": "F" * n, "IndexCache 1/2": ic.uniform_pattern(n, "1/2"),
                     "IndexCache 1/4": ic.uniform_pattern(n, "1/4")}
    schedules = {name: all_schedules[name] for name in args.schedules.split(",")}
    quants = args.indexer_quant.split(",")
    rows = []
    for ci, context in enumerate(int(c) for c in args.contexts.split(",")):
        runs = [(name, pattern, args.backend, q) for q in quants for name, pattern in schedules.items()]
        if args.xla_baseline and ci == 0:
            runs.append(("full DSA (XLA kernels)", "F" * n, "xla", quants[0]))
        for name, pattern, backend, q in runs:
            cfg = base.with_pattern(pattern).replace(backend=backend, indexer_quant=q)
            r = time_engine(cfg, ic.relayout(params, base, cfg.replace(backend=args.backend)), context,
                            args.decode_steps, args.chunk, args.moe_impl)
            r.update(context=context, schedule=name, pattern=pattern, backend=backend, indexer_quant=q)
            rows.append(r)
            log(f"{context:>7} {name:24s} {q:4s} prefill {r['prefill_s']:.3f} s  decode {r['decode_tok_s']:.1f} "
                f"tok/s  (compile+first {r['compile_and_first_s']:.1f} s)")
    log("\ncontext  schedule                 indexer  prefill s  speedup  decode tok/s  speedup  (vs full DSA, same "
        "indexer)")
    for r in rows:
        same = [x for x in rows if x["context"] == r["context"] and x["backend"] == args.backend]
        full = next(x for x in same if x["schedule"] == "full DSA" and x["indexer_quant"] == r["indexer_quant"])
        r["prefill_speedup_vs_full"] = full["prefill_s"] / r["prefill_s"]
        r["decode_speedup_vs_full"] = r["decode_tok_s"] / full["decode_tok_s"]
        unquantised = next((x for x in same if x["schedule"] == r["schedule"] and x["indexer_quant"] == "none"), None)
        if r["indexer_quant"] != "none" and unquantised is not None:
            r["prefill_speedup_vs_unquantised_indexer"] = unquantised["prefill_s"] / r["prefill_s"]
            r["decode_speedup_vs_unquantised_indexer"] = r["decode_tok_s"] / unquantised["decode_tok_s"]
        log(f"{r['context']:>7}  {r['schedule']:24s} {r['indexer_quant']:7s} {r['prefill_s']:9.3f}  "
            f"{r['prefill_speedup_vs_full']:6.2f}x  {r['decode_tok_s']:12.1f}  {r['decode_speedup_vs_full']:6.2f}x"
            + (f"  fp8 vs none: prefill {r['prefill_speedup_vs_unquantised_indexer']:.2f}x, decode "
               f"{r['decode_speedup_vs_unquantised_indexer']:.2f}x" if "prefill_speedup_vs_unquantised_indexer" in r
               else ""))
    path = write_result_json(args.name, {"args": vars(args), "model": base.to_dict(), "backend_checks": checks,
                                         "results": rows})
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
