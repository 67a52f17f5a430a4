"""One-row projections of a batch-1 decode step: XLA's product against `pallas_kernels.row_gemv`, per layer.

The shapes are the 30B DSA model's (`glm47_flash_dsa_30b`) per-layer projections at one token. Each candidate runs
inside a `lax.scan` over a stack of 8 layers' weights, as the model's layer scan does: XLA rewrites a one-row
product into multiply + reduce there, and a custom call may make it copy each layer's weight slice out of the
stack first, so the copies are counted too. Per shape the script prints GPU time per layer (profiler kernel
records, `indexcache_jax.profiling.device_time_ms`, host clock beside it), the copy kernels among them, and the
floor: the layer's weight bytes over the same run's copy ceiling (bytes read + written of `x + 1`). Every
candidate's output is checked against a float32 numpy product first.

    BENCH_RESULTS_DIR=$OUT python benchmarks/row_gemv.py        # GPU: JSON to benchmarks/results/row_gemv.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from indexcache_jax.model.config import PRESETS  # noqa: E402
from indexcache_jax.profiling import copy_bandwidth_gbs, device_time_ms, time_fn, write_result_json  # noqa: E402
from pallas_kernels.row_gemv import row_gemv  # noqa: E402

LAYERS = 8


def projection_shapes() -> dict:
    """name -> (K, N, weight dtype) of each one-row projection of a 30B-model layer (activations bf16, except the
    float32 indexer head weights and router)."""
    c = PRESETS["glm47_flash_dsa_30b"]()
    d, bf, f32 = c.hidden_size, "bfloat16", "float32"
    return {
        "q_a": (d, c.q_lora_rank, bf),
        "kv_a": (d, c.kv_lora_rank + c.qk_rope_head_dim, bf),
        "q_b": (c.q_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim), bf),
        "o": (c.num_heads * c.v_head_dim, d, bf),
        "indexer_k": (d, c.index_head_dim, bf),
        "indexer_q_b": (c.q_lora_rank, c.index_n_heads * c.index_head_dim, bf),
        "indexer_head_weights": (d, c.index_n_heads, f32),
        "shared_gate": (d, c.moe_intermediate_size * c.n_shared_experts, bf),
        "shared_down": (c.moe_intermediate_size * c.n_shared_experts, d, bf),
        "router": (d, c.n_routed_experts, f32),
    }


def layer_scan(product):
    """f(x [1, K], w [L, K, N]) -> [L, 1, N]: `product(x_l, w[l])` for each layer, x_{l+1} depending on y_l (so no
    layer's product can be hoisted or batched with another's)."""
    def f(x, w):
        def body(h, w_l):
            y = product(h, w_l)
            return h * (1 + 1e-3 * jnp.mean(y.astype(jnp.float32))).astype(h.dtype), y
        return jax.lax.scan(body, x, w)[1]
    return jax.jit(f)


CANDIDATES = {
    "xla": lambda x, w: x @ w,  # as the model writes it
    "row_gemv": lambda x, w: row_gemv(x, w),
    "row_gemv_unsplit": lambda x, w: row_gemv(x, w, splits=1),
    "row_gemv_block128": lambda x, w: row_gemv(x, w, block=128),
}


def _is_copy(kernel: str) -> bool:
    return "memcpy" in kernel or "copy" in kernel or "dynamic_slice" in kernel or "dynamic-slice" in kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="row_gemv")
    ap.add_argument("--shapes", default=",".join(projection_shapes()))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy ceiling {copy_gbs:.0f} GB/s (read + written)", flush=True)
    rows = []
    for name in args.shapes.split(","):
        k, n, wdt = projection_shapes()[name]
        x_dtype = jnp.float32 if wdt == "float32" else jnp.bfloat16
        kx, kw = jax.random.split(jax.random.key(len(rows)))
        x = jax.random.normal(kx, (1, k), jnp.float32).astype(x_dtype)
        w = (jax.random.normal(kw, (LAYERS, k, n), jnp.float32) * k ** -0.5).astype(wdt)
        want = np.asarray(x, np.float32) @ np.asarray(w[0], np.float32)
        weight_bytes = k * n * jnp.dtype(wdt).itemsize
        floor_ms = weight_bytes / (copy_gbs * 1e9) * 1e3  # the repository's floor: bytes read over the copy rate
        row = {"shape": name, "k": k, "n": n, "weight_dtype": wdt, "weight_bytes": weight_bytes,
               "floor_us": floor_ms * 1e3, "candidates": {}}
        for cand, product in CANDIDATES.items():
            fn = layer_scan(product)
            try:
                got = np.asarray(fn(x, w)[0], np.float32)
                err = float(np.abs(got - want).max() / np.abs(want).max())
                dev = device_time_ms(fn, [(x, w)], args.iters, args.reps)
                host = time_fn(lambda: fn(x, w), warmup=2, reps=args.reps, iters=args.iters)["median_ms"]
                copies = sum(v for kname, v in dev["kernels_ms"].items() if _is_copy(kname))
                us = dev["ms"] * 1e3 / LAYERS
                row["candidates"][cand] = {
                    "rel_err": err, "us_per_layer": us, "host_us_per_layer": host * 1e3 / LAYERS,
                    "copies_us_per_layer": copies * 1e3 / LAYERS, "frac_of_floor": row["floor_us"] / us,
                    "kernels_per_layer": dev["launches"] / LAYERS,
                    "kernels_ms": dev["kernels_ms"]}
                print(f"[{name} K={k} N={n} {wdt}] {cand}: {us:.2f} us/layer GPU ({host * 1e3 / LAYERS:.2f} host), "
                      f"copies {copies * 1e3 / LAYERS:.2f} us, floor {row['floor_us']:.2f} us "
                      f"({row['floor_us'] / us:.0%}), rel err {err:.1e}", flush=True)
            except Exception as e:  # a candidate that fails to build is recorded, not fatal
                row["candidates"][cand] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"[{name}] {cand} failed: {e}", flush=True)
        rows.append(row)
        write_result_json(args.name, {"copy_ceiling_gbs": copy_gbs, "layers": LAYERS, "rows": rows})
    total = {c: sum(r["candidates"].get(c, {}).get("us_per_layer", float("nan")) for r in rows) for c in CANDIDATES}
    print(f"sum over shapes, us per layer: {total}; floor {sum(r['floor_us'] for r in rows):.1f}")


if __name__ == "__main__":
    main()
