"""One-row projections of a batch-1 decode step: XLA's product against `pallas_kernels.row_gemv`, per layer.

The shapes are the 30B DSA model's (`glm47_flash_dsa_30b`) per-layer projections at one token, in the groups that
share an input: XLA's products, one row-GEMV launch per product, one launch per group (`row_gemvs`), and one per
group reading the layer in place from the whole stacks (`row_gemvs_stacked`, the model's form); then the absorbed
MLA's per-head products (`head_gemv`). Each runs inside a `lax.scan` over 8 layers' weights, as the model's layer
scan does: XLA rewrites a one-row product into multiply + reduce there, and a custom call handed a layer's slice
makes XLA copy it out of the stack first, so the copies are counted too. Per shape the script prints GPU time per layer (profiler kernel
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
from pallas_kernels.row_gemv import head_gemv, row_gemv, row_gemvs  # noqa: E402

LAYERS = 8


def projection_groups() -> dict:
    """name -> the one-row products of a 30B-model layer that share their input, as (K, N, weight dtype) each
    (activations bf16; the indexer's head weights and the router are float32 products)."""
    c = PRESETS["glm47_flash_dsa_30b"]()
    d, bf, f32 = c.hidden_size, "bfloat16", "float32"
    shared = c.moe_intermediate_size * c.n_shared_experts
    return {
        "attention_input (q_a, kv_a, indexer k, indexer head weights)": [
            (d, c.q_lora_rank, bf), (d, c.kv_lora_rank + c.qk_rope_head_dim, bf), (d, c.index_head_dim, bf),
            (d, c.index_n_heads, f32)],
        "q_latent (q_b, indexer q_b)": [
            (c.q_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim), bf),
            (c.q_lora_rank, c.index_n_heads * c.index_head_dim, bf)],
        "o": [(c.num_heads * c.v_head_dim, d, bf)],
        "moe_input (router, shared gate, shared up)": [(d, c.n_routed_experts, f32), (d, shared, bf), (d, shared, bf)],
        "shared_down": [(shared, d, bf)],
    }


def head_groups() -> dict:
    """name -> (heads, K, N, transposed): the absorbed MLA's per-head products of a 30B-model layer at one token,
    `q_nope @ W_uk` and `o_latent @ W_uv^T` (W_uv stored [H, N, K])."""
    c = PRESETS["glm47_flash_dsa_30b"]()
    return {"w_uk (per head)": (c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank, False),
            "w_uv (per head, transposed)": (c.num_heads, c.kv_lora_rank, c.v_head_dim, True)}


def layer_scan(products, stacked: bool):
    """f(x, ws: tuple of [L, ...]) -> tuple of [L, ...]: `products(x_l, ws[l])` for each layer, x_{l+1} depending
    on the outputs (so no layer's products can be hoisted or batched with another's). With `stacked`, the scan
    carries the whole stacks and calls `products(x_l, ws, l)`, as the model does for its kernels; else it scans
    over the stacks and each layer gets its slices."""
    def f(x, ws):
        def step(h, ys):
            mean = sum(jnp.mean(y.astype(jnp.float32)) for y in ys)
            return h * (1 + 1e-3 * mean).astype(h.dtype), ys

        if stacked:
            return jax.lax.scan(lambda h, i: step(h, products(h, ws, i)), x, jnp.arange(LAYERS, dtype=jnp.int32))[1]
        return jax.lax.scan(lambda h, ws_l: step(h, products(h, ws_l)), x, ws)[1]
    return jax.jit(f)


CANDIDATES = {  # name -> (products, stacked)
    # as the model writes it: the input cast to the product's result type (float32 for float32 weights)
    "xla": (lambda x, ws: tuple(x.astype(jnp.result_type(x.dtype, w.dtype)) @ w for w in ws), False),
    "row_gemv": (lambda x, ws: tuple(row_gemv(x, w) for w in ws), False),  # one launch per product
    "row_gemvs": (lambda x, ws: row_gemvs(x, ws), False),  # one launch for the group
    "row_gemvs_unsplit": (lambda x, ws: row_gemvs(x, ws, splits=1), False),
    # the model's form: one launch for the group, reading the layer in place from the stacks
    "row_gemvs_stacked": (lambda x, ws, i: row_gemvs(
        x, ws, layer=i, dtypes=[jnp.result_type(x.dtype, w.dtype) for w in ws]), True),
}


def head_candidates(transposed: bool) -> dict:
    spec = "hk,hnk->hn" if transposed else "hk,hkn->hn"
    return {
        "xla": (lambda x, ws: (jnp.einsum(spec, x, ws[0]),), False),
        "head_gemv": (lambda x, ws: (head_gemv(x, ws[0], transposed=transposed),), False),
        "head_gemv_stacked": (lambda x, ws, i: (head_gemv(x, ws[0], transposed=transposed, layer=i),), True),
    }


def _is_copy(kernel: str) -> bool:
    return "memcpy" in kernel or "copy" in kernel or "dynamic_slice" in kernel or "dynamic-slice" in kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="row_gemv")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy ceiling {copy_gbs:.0f} GB/s (read + written)", flush=True)
    rows = []

    def measure(name, x, ws, wants, weight_bytes, candidates, shapes):
        floor_us = weight_bytes / (copy_gbs * 1e9) * 1e6  # the repository's floor: bytes read over the copy rate
        row = {"group": name, "shapes": shapes, "weight_bytes": weight_bytes, "floor_us": floor_us, "candidates": {}}
        for cand, (products, stacked) in candidates.items():
            if cand == "row_gemvs_unsplit" and len(ws) == 1:  # a group of one: row_gemv's own settings
                continue
            fn = layer_scan(products, stacked)
            try:
                outs = fn(x, ws)
                err = max(float(np.abs(np.asarray(o[0], np.float32) - want).max() / np.abs(want).max())
                          for o, want in zip(outs, wants))
                dev = device_time_ms(fn, [(x, ws)], args.iters, args.reps)
                host = time_fn(lambda: fn(x, ws), warmup=2, reps=args.reps, iters=args.iters)["median_ms"]
                copies = sum(v for kname, v in dev["kernels_ms"].items() if _is_copy(kname))
                us = dev["ms"] * 1e3 / LAYERS
                row["candidates"][cand] = {
                    "rel_err": err, "us_per_layer": us, "host_us_per_layer": host * 1e3 / LAYERS,
                    "copies_us_per_layer": copies * 1e3 / LAYERS, "frac_of_floor": floor_us / us,
                    "kernels_per_layer": dev["launches"] / LAYERS, "kernels_ms": dev["kernels_ms"]}
                print(f"[{name}] {cand}: {us:.2f} us/layer GPU ({host * 1e3 / LAYERS:.2f} host), "
                      f"{dev['launches'] / LAYERS:.1f} kernels, copies {copies * 1e3 / LAYERS:.2f} us, "
                      f"floor {floor_us:.2f} us ({floor_us / us:.0%}), rel err {err:.1e}", flush=True)
            except Exception as e:  # a candidate that fails to build is recorded, not fatal
                row["candidates"][cand] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"[{name}] {cand} failed: {e}", flush=True)
        rows.append(row)
        write_result_json(args.name, {"copy_ceiling_gbs": copy_gbs, "layers": LAYERS, "rows": rows})

    for name, shapes in projection_groups().items():
        k = shapes[0][0]
        kx, *kws = jax.random.split(jax.random.key(len(rows)), len(shapes) + 1)
        x = jax.random.normal(kx, (1, k), jnp.float32).astype(jnp.bfloat16)
        ws = tuple((jax.random.normal(kw, (LAYERS, k, n), jnp.float32) * k ** -0.5).astype(dt)
                   for kw, (_, n, dt) in zip(kws, shapes))
        wants = [np.asarray(x, np.float32) @ np.asarray(w[0], np.float32) for w in ws]
        weight_bytes = sum(k * n * jnp.dtype(dt).itemsize for _, n, dt in shapes)
        measure(name, x, ws, wants, weight_bytes, CANDIDATES, shapes)
    for name, (h, k, n, transposed) in head_groups().items():
        kx, kw = jax.random.split(jax.random.key(len(rows)))
        x = jax.random.normal(kx, (h, k), jnp.float32).astype(jnp.bfloat16)
        w = (jax.random.normal(kw, (LAYERS, h, n, k) if transposed else (LAYERS, h, k, n), jnp.float32)
             * k ** -0.5).astype(jnp.bfloat16)
        spec = "hk,hnk->hn" if transposed else "hk,hkn->hn"
        wants = [np.einsum(spec, np.asarray(x, np.float32), np.asarray(w[0], np.float32))]
        measure(name, x, (w,), wants, h * k * n * 2, head_candidates(transposed), [(h, k, n, "bfloat16")])
    total = {c: sum(r["candidates"].get(c, r["candidates"].get("row_gemvs", {})).get("us_per_layer", float("nan"))
                    for r in rows[:len(projection_groups())]) for c in CANDIDATES}
    print(f"a layer's one-row products, us: {total}; floor {sum(r['floor_us'] for r in rows):.1f}")


if __name__ == "__main__":
    main()
