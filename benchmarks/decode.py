"""Decode at long context on one GPU: the engine's decode step against its memory floor, and one prefill chunk.

The model has the 30B preset's dims (`glm47_flash_dsa_30b`: 20 heads, 64 experts top-4, 32x128 indexer,
index_topk 2048) cut to `--layers` layers (one dense, the rest MoE), random bf16 weights, Pallas kernels. The cache
is filled with random rows up to each row's live length (a decode step's cost does not depend on how the rows got
there), so no long prefill is needed to time decode.

For each schedule (full DSA, IndexCache 1/4) and batch size it times `--steps` decode steps run by the engine's
on-device loop (`engine._decode_loop`, one compiled `lax.while_loop`), and reports per step:
- GPU time from the profiler's kernel records (`indexcache_jax.profiling.device_time_ms`), the host clock beside it;
- the memory floor: the bytes a step must read (weights it touches once: attention, norms, the dense MLP, the
  routed experts the batch's routing can touch plus the shared expert, the LM head; per row: the indexer keys up
  to the live length and the top-k latent rows of every layer) divided by the same run's copy ceiling;
- the GPU time by kernel category (indexer logits, top-k, sparse MLA, MoE, dense matmuls, copies, other).
It also profiles one prefill chunk at the end of the context, and prints decode tok/s at batch 1 with the
IndexCache / full DSA ratio.

Run: `python benchmarks/decode.py` (writes benchmarks/results/decode.json).
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
from indexcache_jax.profiling import (categorize, device_time_ms, parse_xla_options, top_kernels,  # noqa: E402
                                      write_result_json)
from sparse_mla import ceilings  # noqa: E402

import indexcache_jax as ic  # noqa: E402
from indexcache_jax.inference import cache as cache_lib  # noqa: E402
from indexcache_jax.e2e_bench import compile_prefill_chunk  # noqa: E402
from indexcache_jax.inference import engine as engine_lib  # noqa: E402

def log(msg: str) -> None:
    print(msg, flush=True)


def random_cache(cfg, batch: int, slots: int, key) -> dict:
    """A cache of `slots` per layer filled with random rows (bf16; FP8 keys with positive scales)."""
    shapes = cache_lib.cache_shapes(cfg, batch, slots, jnp.bfloat16)

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(shapes))
        out = {}
        for (name, s), k in zip(sorted(shapes.items()), keys):
            x = jax.random.normal(k, s.shape, jnp.float32)
            out[name] = jnp.abs(x) + 0.01 if name == "index_k_scale" else x.astype(s.dtype)
        return out

    return make(key)


def floor_bytes(cfg, params, batch: int, live: int) -> dict:
    """Bytes one decode step must read at least, by term (see the module docstring)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    itemsize = 2
    experts = shared = other = 0
    for path, x in leaves:
        names = [getattr(p, "key", str(p)) for p in path]
        n = int(np.prod(x.shape)) * itemsize
        if names[-1] == "embed":
            other += batch * cfg.hidden_size * itemsize  # only the batch's rows are read
        elif names[-1].startswith("experts_"):
            experts += n
        elif "shared" in names:
            shared += n
        else:
            other += n
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)  # expected distinct experts a batch of random tokens routes to
    n_full = cfg.pattern.count("F")
    row = cfg.latent_row_dim * itemsize
    terms = {
        "weights_other": other,
        "shared_experts": shared,
        "routed_experts_touched": experts * touched / e,
        "indexer_keys": batch * live * n_full * cfg.index_head_dim * itemsize,
        "gathered_rows": batch * min(cfg.index_topk, live) * cfg.num_layers * row,
    }
    terms["total"] = sum(terms.values())
    terms["expected_experts_touched_per_layer"] = touched
    return terms


def time_decode(cfg, params, batch: int, context: int, steps: int, moe_impl: str, copy_tbps: float,
                hlo_path: str | None = None, compiler_options: dict | None = None) -> dict:
    """Per-step GPU time of `steps` on-device decode steps at live length `context - steps - 1`; `hlo_path`: where
    to write the compiled loop's optimised HLO, which maps each kernel name to its ops; `compiler_options`: XLA
    options for compiling the loop (`--xla-option`)."""
    live = context - steps - 1
    cache = [random_cache(cfg, batch, context, jax.random.key(batch))]
    rng = np.random.default_rng(batch)
    first = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)
    lengths = jnp.full((batch,), live, jnp.int32)
    caps = jnp.full((batch,), steps, jnp.int32)
    settings = (jnp.float32(0), jnp.float32(1), jnp.int32(0))
    eos = jnp.zeros((0,), jnp.int32)
    key = jax.random.key(0)
    # Compiled ahead, so the same executable runs and names its kernels (`device_time_ms(hlo_text=...)`).
    loop = engine_lib._decode_loop.lower(params, cache[0], first, lengths, key, *settings, caps, eos, cfg=cfg,
                                         moe_impl=moe_impl, mesh=None,
                                         out_len=max(16, 1 << (steps - 1).bit_length())).compile(compiler_options)

    def run():
        out, cache[0] = loop(params, cache[0], first, lengths, key, *settings, caps, eos)
        return out

    hlo_text = loop.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo_text)
    jax.block_until_ready(run())
    host = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        host.append((time.perf_counter() - t0) * 1e3 / steps)
    dev = device_time_ms(run, [()], iters=2, reps=3, hlo_text=hlo_text)
    step_ms = dev["ms"] / steps
    per_step = {k: v / steps for k, v in dev["kernels_ms"].items()}
    floor = floor_bytes(cfg, params, batch, live)
    floor_ms = floor["total"] / (copy_tbps * 1e12) * 1e3
    cache[0] = None
    scopes = dev["kernel_scopes"]
    return {"batch": batch, "context": context, "live_length": live, "steps": steps,
            "step_gpu_ms": step_ms, "step_host_ms": float(np.median(host)), "tok_s_per_row": 1e3 / np.median(host),
            "floor_bytes": floor, "floor_ms": floor_ms, "step_over_floor": step_ms / floor_ms,
            "span_ms_per_step": dev["span_ms"] / steps, "launches_per_step": dev["launches"] / steps,
            "categories_ms": categorize(per_step, scopes), "top_kernels_ms": top_kernels(per_step, scopes),
            "kernels_ms": per_step}


def time_prefill_chunk(cfg, params, context: int, chunk: int, moe_impl: str) -> dict:
    """GPU time of the last prefill chunk of a `context`-token prompt (batch 1), cache filled with random rows."""
    cache = [random_cache(cfg, 1, context, jax.random.key(7))]
    start = context - chunk
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, cfg.vocab_size, (1, chunk)), jnp.int32)
    compiled = compile_prefill_chunk(cfg, moe_impl, params, cache[0], tokens, start, context, context)

    def run():
        out, cache[0] = compiled(params, cache[0], tokens)
        return out

    dev = device_time_ms(run, [()], iters=3, reps=3, hlo_text=compiled.as_text())
    cache[0] = None
    scopes = dev["kernel_scopes"]
    return {"context": context, "chunk": chunk, "chunk_gpu_ms": dev["ms"],
            "categories_ms": categorize(dev["kernels_ms"], scopes), "top_kernels_ms": top_kernels(dev["kernels_ms"], scopes),
            "kernels_ms": dev["kernels_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--runs", default="full DSA:1,8,64;IndexCache 1/4:1,8",
                    help="schedule:batch sizes, ';'-separated (schedules: full DSA, IndexCache 1/2, IndexCache 1/4, "
                         "or a pattern of --layers F/S letters such as FSFSSSFS)")
    ap.add_argument("--cache-budget-gb", type=float, default=40.0,
                    help="largest cache to allocate; a batch whose cache at --context exceeds it runs at the "
                         "largest power-of-two context that fits")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--moe-impl", default=None, help="Engine moe_impl (default: the engine's choice)")
    ap.add_argument("--backend", default="pallas")
    ap.add_argument("--prefill-schedules", default="full DSA,IndexCache 1/4",
                    help="schedules whose last prefill chunk is profiled ('' for none)")
    ap.add_argument("--name", default="decode")
    ap.add_argument("--hlo-dir", default=None, help="write each decode loop's optimised HLO text here")
    ap.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA compiler option for the decode loops (repeatable), e.g. "
                         "xla_gpu_enable_dynamic_slice_fusion=true")
    args = ap.parse_args()
    try:
        compiler_options = parse_xla_options(args.xla_option)
    except ValueError as e:
        ap.error(str(e))

    log(f"devices: {jax.devices()}")
    ceil = ceilings()
    copy_tbps = ceil["copy_device_tbps"]
    log(f"ceilings: copy {copy_tbps:.2f} TB/s (GPU time), matmul {ceil['matmul_device_tflops']:.0f} TFLOP/s")
    n = args.layers
    base = ic.glm47_flash_dsa_30b(num_layers=n, mlp_layer_types=("dense",) + ("sparse",) * (n - 1),
                                  dtype="bfloat16", backend=args.backend)
    params = jax.jit(lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16), ic.init_params(base, seed=0)))()
    moe_impl = args.moe_impl or engine_lib.Engine(params, base, max_len=2, max_batch=1).moe_impl
    schedules = {"full DSA": "F" * n, "IndexCache 1/4": ic.uniform_pattern(n, "1/4"),
                 "IndexCache 1/2": ic.uniform_pattern(n, "1/2")}
    rows, prefill = [], []

    def save(summary=None):  # after every row, so a run cut off by its time limit keeps what it measured
        return write_result_json(args.name, {"args": vars(args), "model": base.to_dict(), "ceilings": ceil,
                                             "decode": rows, "prefill_chunk": prefill, "summary": summary or {}})

    for run in args.runs.split(";"):
        name, batches = run.split(":")
        cfg = base.with_pattern(schedules.get(name, name))
        p = ic.relayout(params, base, cfg)
        for batch in (int(b) for b in batches.split(",")):
            context = args.context
            while (ic.cache_bytes_per_token(cfg) * batch * context > args.cache_budget_gb * 2**30
                   and context > 1024):
                context //= 2
            hlo = None if args.hlo_dir is None else os.path.join(
                args.hlo_dir, f"{args.name}_{name.replace(' ', '_').replace('/', '-')}_b{batch}.hlo.txt")
            r = time_decode(cfg, p, batch, context, args.steps, moe_impl, copy_tbps, hlo, compiler_options or None)
            r.update(schedule=name, pattern=cfg.pattern, moe_impl=moe_impl)
            rows.append(r)
            save()
            log(f"{name:16s} B={batch:<3d} ctx={context:<7d} step {r['step_gpu_ms']:.3f} ms GPU "
                f"({r['step_host_ms']:.3f} host), floor {r['floor_ms']:.3f} ms -> {r['step_over_floor']:.2f}x; "
                + ", ".join(f"{k} {v:.3f}" for k, v in r["categories_ms"].items() if v > 0.001))
        if name in args.prefill_schedules.split(","):
            r = time_prefill_chunk(cfg, p, args.context, args.chunk, moe_impl)
            r.update(schedule=name)
            prefill.append(r)
            save()
            log(f"{name:16s} prefill chunk of {args.chunk} at {args.context}: {r['chunk_gpu_ms']:.2f} ms GPU; "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["categories_ms"].items() if v > 0.01))
    summary = {}
    b1 = {r["schedule"]: r for r in rows if r["batch"] == 1}
    if "full DSA" in b1 and "IndexCache 1/4" in b1:
        summary = {"tok_s_b1_full": b1["full DSA"]["tok_s_per_row"],
                   "tok_s_b1_quarter": b1["IndexCache 1/4"]["tok_s_per_row"],
                   "decode_speedup_quarter_vs_full_gpu": b1["full DSA"]["step_gpu_ms"]
                   / b1["IndexCache 1/4"]["step_gpu_ms"],
                   "decode_speedup_quarter_vs_full_host": b1["full DSA"]["step_host_ms"]
                   / b1["IndexCache 1/4"]["step_host_ms"]}
        log("batch 1: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    log(f"wrote {save(summary)}")


if __name__ == "__main__":
    main()
