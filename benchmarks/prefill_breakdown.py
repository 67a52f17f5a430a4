"""Where one prefill chunk's time goes: the parts of a DSA layer timed alone on the GPU, at the end-to-end shapes.

The end-to-end benchmark runs the paper's 30B dims (`glm47_flash_dsa_30b`: hidden 2048, 20 heads, MLA 512+64,
64 experts top-4, 32x128 indexer, top-k 2048) in 2048-query prefill chunks against a cache of `--context` slots.
This script times, for one chunk at the middle of that context (keys valid up to position context/2), with random
bf16 inputs and weights:
- the fused indexer top-k (Pallas), with the bf16 and the FP8 indexer;
- sparse MLA over 2048 selected rows (Pallas);
- the MoE feed-forward with `moe_impl="ragged"` (lax.ragged_dot) and `"dense"` (every expert), and their rates
  (counting the FLOPs of the routed top-k experts plus the shared one: the useful work);
- one whole F layer and one whole S layer (`layers.Block`, cache write included; the cache rows before the chunk
  hold random keys, as earlier chunks would have written),
and prints each part's share of the whole F layer. Multiply a layer's time by the number of chunks (context/2048,
times about 1/2 for the indexer's causal half) to compare with end_to_end.py's prefill seconds.

Run: `python benchmarks/prefill_breakdown.py` (writes benchmarks/results/prefill_breakdown.json).
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from indexcache_jax.profiling import time_fn, write_result_json  # noqa: E402

import indexcache_jax as ic  # noqa: E402
import pallas_kernels as pk  # noqa: E402
from indexcache_jax.model import quant  # noqa: E402
from indexcache_jax.model.layers import Block  # noqa: E402
from indexcache_jax.model.moe import MoE  # noqa: E402
from indexcache_jax.model.model import make_context  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--backend", default="pallas")
    args = ap.parse_args()
    cfg = ic.glm47_flash_dsa_30b(num_layers=2, mlp_layer_types=("sparse", "sparse"), dtype="bfloat16",
                                 backend=args.backend)
    s, t, bf = args.context, args.chunk, jnp.bfloat16
    start = s // 2  # this chunk's first position: keys [0, start + t) are valid
    keys = jax.random.split(jax.random.key(0), 8)
    rows = {}

    def record(name, fn, flops=None):
        ms = time_fn(fn, warmup=2, reps=5)["median_ms"]
        rows[name] = {"ms": ms, **({"tflops": flops / ms / 1e9} if flops else {})}
        print(f"{name:40s} {ms:9.3f} ms" + (f"  {rows[name]['tflops']:.0f} TF/s" if flops else ""), flush=True)

    positions = jnp.arange(start, start + t, dtype=jnp.int32)[None]
    k_len = jnp.array([start + t], jnp.int32)
    h_i, d_i = cfg.index_n_heads, cfg.index_head_dim
    iq = jax.random.normal(keys[0], (1, t, h_i, d_i), bf)
    ik = jax.random.normal(keys[1], (1, s, d_i), bf)
    iw = jax.random.normal(keys[2], (1, t, h_i), jnp.float32)
    topk = jax.jit(lambda q, k, w: pk.indexer_topk(q, k, w, cfg.index_topk, q_positions=positions, k_lengths=k_len))
    record("indexer_topk bf16", lambda: topk(iq, ik, iw))
    q8, qs = quant.rotate_and_quantize(iq)
    k8, ks = quant.rotate_and_quantize(ik)
    topk8 = jax.jit(lambda q, k, w, qs, ks: pk.indexer_topk(q, k, w, cfg.index_topk, q_positions=positions,
                                                            k_lengths=k_len, q_scale=qs, k_scale=ks))
    record("indexer_topk fp8", lambda: topk8(q8, k8, iw, qs[..., 0], ks[..., 0]))

    d_qk = cfg.latent_row_dim
    mq = jax.random.normal(keys[3], (1, t, cfg.num_heads, d_qk), bf)
    kv = jax.random.normal(keys[4], (1, s, d_qk), bf)
    idx = jax.random.randint(keys[5], (1, t, cfg.index_topk), 0, start)
    smla = jax.jit(lambda q, kv, i: pk.sparse_mla(q, kv, i, sm_scale=0.05, v_dim=cfg.kv_lora_rank))
    record("sparse_mla H=20", lambda: smla(mq, kv, idx),
           2.0 * t * cfg.num_heads * cfg.index_topk * (d_qk + cfg.kv_lora_rank))

    x = jax.random.normal(keys[6], (1, t, cfg.hidden_size), bf)
    active = cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.n_shared_experts * cfg.moe_intermediate_size
    moe_params = None
    for impl in ("ragged", "dense"):
        moe = MoE(cfg, impl=impl)
        if moe_params is None:
            moe_params = jax.tree.map(lambda a: a.astype(bf), nn.meta.unbox(jax.jit(moe.init)(keys[7], x)))
        moe_fn = jax.jit(moe.apply)
        record(f"MoE {impl} ({t} tokens)", lambda: moe_fn(moe_params, x), 2.0 * 3 * t * cfg.hidden_size * active)

    cos_sin_ctx = make_context(cfg, positions, k_len, jnp.array([start], jnp.int32))
    for has_indexer, name in ((True, "whole F layer"), (False, "whole S layer")):
        block = Block(cfg, has_indexer=has_indexer, mlp_kind="sparse")
        carry = (x, idx)
        # One layer's slots of the engine's cache layout ([B, layers * S, C]) and its slot ids.
        cache = {"kv": jax.random.normal(keys[4], (1, s, d_qk), bf), "index_k": ik, "layer": jnp.int32(0),
                 "full": jnp.int32(0)}
        bp = jax.jit(block.init)(keys[7], carry, cos_sin_ctx, cache)
        bp = jax.tree.map(lambda a: a.astype(bf), nn.meta.unbox(bp))
        step = jax.jit(block.apply, donate_argnums=(3,))
        state = {"cache": cache}

        def run_block(step=step, bp=bp, state=state, carry=carry):
            out, state["cache"] = step(bp, carry, cos_sin_ctx, state["cache"])
            return out

        record(name, run_block)
    whole = rows["whole F layer"]["ms"]
    print(f"\nshare of the whole F layer ({whole:.2f} ms): " + ", ".join(
        f"{k} {100 * v['ms'] / whole:.0f}%" for k, v in rows.items() if not k.startswith("whole")))
    write_result_json("prefill_breakdown", {"args": vars(args), "model": cfg.to_dict(), "chunk_start": start,
                                            "parts": rows})


if __name__ == "__main__":
    main()
