"""Routed-MoE products on the GPU: our grouped Hopper kernel against JAX's `ragged_dot_mgpu`, tokamax's
`ragged_dot`, XLA's `lax.ragged_dot` (the model's `moe_impl="ragged"`) and, for decode, an XLA weight gather and
the routed GEMV kernels (`pallas_kernels.routed_gemv`, three tile sizes, three reduction splits), each decode
output checked against `pairwise_reference` (float32).

Shapes: the 30B model's dims (E=64, top-4, D=2048, I=1536) and GLM-5 / DeepSeek-V3.2 dims (E=256, top-8,
D=6144 / 7168, I=2048); prefill 2048 / 8192 / 16384 tokens, decode 1 / 8 / 64 tokens. Random bf16 inputs, routing
by a random router (sigmoid scores plus a random per-expert bias, group-limited top-k for E=256), so the expert
loads are uneven; the JSON records the largest and mean tokens per expert.

Every candidate gets the same x [N, D], ids and weights [N, k], and returns y [N, D] (routed experts only; decode
adds the shared expert, whose bytes the decode target counts). Times are GPU kernel time summed from the
profiler (`indexcache_jax.profiling.device_time_ms`, which includes the plan, gathers and combine); the host clock is beside
them. Targets: prefill >= 55% of the same run's bf16 matmul ceiling counting useful FLOPs
(2 N k 3 D I) and >= 10x `lax.ragged_dot`; decode >= 60% of the same run's copy ceiling counting the bytes of
the experts the batch touches plus the shared expert. The JSON also gives each case's roofline floor, the larger
of FLOPs / matmul ceiling and (touched weights + activations) / copy ceiling: prefill of 2048 tokens over 256
experts must read every expert (22.5 GB at D=7168), which alone bounds it under the 55% FLOP target.

Run on the GPU: `python benchmarks/moe.py --out $OUT` (writes moe.json). GPU correctness comes first: the kernel
against `lax.ragged_dot` on the same inputs for each dims set, and against a numpy float64 oracle at 30B dims.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from indexcache_jax.profiling import device_time_ms, environment, time_fn  # noqa: E402
from moe_oracle import experts_f64, rel_err  # noqa: E402
from pallas_kernels import grouped_matmul as gm  # noqa: E402
from pallas_kernels.routed_gemv import routed_experts_gemv  # noqa: E402

DIMS = {
    "30b": dict(experts=64, top_k=4, hidden=2048, width=1536, n_group=1, topk_group=1),
    "glm5": dict(experts=256, top_k=8, hidden=6144, width=2048, n_group=8, topk_group=4),
    "dsv32": dict(experts=256, top_k=8, hidden=7168, width=2048, n_group=8, topk_group=4),
}
PREFILL_TOKENS = (2048, 8192, 16384)
DECODE_TOKENS = (1, 8, 64)


# ------------------------------------------------------------------------------------------------ inputs
def make_weights(dims, key):
    e, d, i = dims["experts"], dims["hidden"], dims["width"]
    kg, ku, kd, ks, kr, kb = jax.random.split(key, 6)
    scale_in, scale_out = d ** -0.5, i ** -0.5
    w = {
        "gate": (jax.random.normal(kg, (e, d, i), jnp.bfloat16) * scale_in).astype(jnp.bfloat16),
        "up": (jax.random.normal(ku, (e, d, i), jnp.bfloat16) * scale_in).astype(jnp.bfloat16),
        "down": (jax.random.normal(kd, (e, i, d), jnp.bfloat16) * scale_out).astype(jnp.bfloat16),
        "shared": [(jax.random.normal(k, s, jnp.bfloat16) * sc).astype(jnp.bfloat16)
                   for k, s, sc in zip(jax.random.split(ks, 3), [(d, i), (d, i), (i, d)],
                                       [scale_in, scale_in, scale_out])],
        # Router logits ~ N(0, 4) plus a small per-expert bias: uneven loads (the JSON records max / mean per expert).
        "router": jax.random.normal(kr, (d, e), jnp.float32) * 2 * d ** -0.5,
        "bias": jax.random.normal(kb, (e,), jnp.float32) * 0.05,
    }
    return w


@functools.partial(jax.jit, static_argnames=("top_k", "n_group", "topk_group"))
def route(x, router, bias, *, top_k, n_group, topk_group):
    """Sigmoid scores, biased group-limited top-k, normalised weights (the model's `noaux_tc` routing)."""
    scores = jax.nn.sigmoid(x.astype(jnp.float32) @ router)
    choice = scores + bias
    n, e = choice.shape
    if n_group > 1:
        grouped = choice.reshape(n, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, keep = jax.lax.top_k(group_scores, topk_group)
        mask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(mask, e // n_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=1)
    return ids.astype(jnp.int32), weights / weights.sum(-1, keepdims=True)


def make_batch(dims, w, tokens, key):
    x = jax.random.normal(key, (tokens, dims["hidden"]), jnp.bfloat16)
    ids, weights = route(x, w["router"], w["bias"], top_k=dims["top_k"], n_group=dims["n_group"],
                         topk_group=dims["topk_group"])
    return x, ids, weights


# ------------------------------------------------------------------------------------------- candidates
def combine(ys, plan, weights, dtype):
    picked = ys[plan.pair_row].astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", picked, weights).astype(dtype)


def candidate_fns(dims, tokens, names=None):
    """name -> jitted f(x, ids, weights, w) -> y [N, D] (routed experts)."""
    e = dims["experts"]
    k = dims["top_k"]
    block_m = gm.default_block_m(tokens * k)

    def ours(x, ids, weights, w):
        return gm.moe_experts(x, ids, weights, w["gate"], w["up"], w["down"], impl="kernel", block_m=block_m)

    def ours_other_block_m(x, ids, weights, w):  # the other tile height, to check the 64 / 128 switch
        return gm.moe_experts(x, ids, weights, w["gate"], w["up"], w["down"], impl="kernel",
                              block_m=192 - block_m)

    def xla_gather(x, ids, weights, w):
        return gm.moe_experts(x, ids, weights, w["gate"], w["up"], w["down"], impl="xla_gather", block_m=8)

    def routed_gemv(block, splits=None):  # the decode kernels: expert ids index the weights, no row plan
        return lambda x, ids, weights, w: routed_experts_gemv(x, ids, weights, w["gate"], w["up"], w["down"],
                                                              block=block, splits=splits)

    def xla_ragged_dot(x, ids, weights, w):
        # The model's moe_impl="ragged": sorted pairs, lax.ragged_dot, scatter-add.
        flat = ids.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        token_of = order // k
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        xs = x[token_of]
        h = jax.nn.silu(jax.lax.ragged_dot(xs, w["gate"], sizes)) * jax.lax.ragged_dot(xs, w["up"], sizes)
        ys = jax.lax.ragged_dot(h, w["down"], sizes) * weights.reshape(-1)[order][:, None].astype(x.dtype)
        return jnp.zeros_like(x).at[token_of].add(ys)

    def two_products(product):
        def fn(x, ids, weights, w):
            plan = gm.plan_rows(ids, e, block_m)
            gu = product(x[plan.row_token], w["gate_up"], plan.padded_sizes)
            i = w["gate"].shape[2]
            h = (jax.nn.silu(gu[:, :i].astype(jnp.float32)) * gu[:, i:].astype(jnp.float32)).astype(x.dtype)
            return combine(product(h, w["down"], plan.padded_sizes), plan, weights, x.dtype)
        return fn

    def mgpu_product(lhs, rhs, sizes):
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
        return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes, block_m=block_m, block_n=128, block_k=64,
                                          max_concurrent_steps=4, grid_block_n=1)

    def tokamax_product(lhs, rhs, sizes):
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS(sys.argv[:1])  # tokamax reads absl flags; this script's own arguments are not theirs
        import tokamax
        return tokamax.ragged_dot(lhs, rhs, sizes)

    fns = {"grouped_kernel": ours, "grouped_kernel_other_block_m": ours_other_block_m,
           "mgpu_ragged_dot": two_products(mgpu_product), "tokamax_ragged_dot": two_products(tokamax_product),
           "xla_ragged_dot": xla_ragged_dot}
    if tokens * k <= 64:
        fns["xla_gather"] = xla_gather
        fns["routed_gemv"] = routed_gemv(64)
        fns["routed_gemv_block128"] = routed_gemv(128)
        fns["routed_gemv_block32"] = routed_gemv(32)
        fns["routed_gemv_unsplit"] = routed_gemv(64, (1, 1))  # one program walks a whole reduction
        fns["routed_gemv_split8"] = routed_gemv(64, (8, 8))
        # The shared expert through the same kernels, as a one-expert stack (id 0, weight 1), not XLA's products.
        fns["routed_gemv_shared_gemv"] = lambda x, ids, weights, w: routed_gemv(64)(x, ids, weights, w) + \
            routed_experts_gemv(x, jnp.zeros((x.shape[0], 1), jnp.int32), jnp.ones((x.shape[0], 1), jnp.float32),
                                *(m[None] for m in w["shared"]))
        # The shared expert as one more pair per token inside the routed launches (`shared=`): two launches in all.
        fns["routed_gemv_fused_shared_gemv"] = lambda x, ids, weights, w: routed_experts_gemv(
            x, ids, weights, w["gate"], w["up"], w["down"], shared=w["shared"])
    if tokens not in (64, 2048):  # the switch lies between decode's 64 and prefill's 2048 tokens
        del fns["grouped_kernel_other_block_m"]
    return {name: jax.jit(f) for name, f in fns.items() if names is None or name in names}


def pairwise_reference(x, ids, weights, w, pairs_per_step=16):
    """The routed experts in float32, one (token, expert) pair at a time: each pair's expert weights gathered,
    `pairs_per_step` pairs per `lax.map` step, so memory stays a few pairs' weights at any size (XLA's GPU
    ragged_dot materialises a dense operand of tokens x experts: 49 GiB at GLM-5 dims and 64 tokens)."""
    n, k = ids.shape
    pairs = -(-n * k // pairs_per_step) * pairs_per_step
    pad = pairs - n * k
    token = jnp.pad(jnp.repeat(jnp.arange(n), k), (0, pad))
    expert = jnp.pad(ids.reshape(-1), (0, pad))
    weight = jnp.pad(weights.reshape(-1).astype(jnp.float32), (0, pad))  # padded pairs weigh 0

    def step(chunk):
        t, e, wt = chunk
        xg = x[t].astype(jnp.float32)
        hi = jax.lax.Precision.HIGHEST
        gate = jnp.einsum("pd,pdi->pi", xg, w["gate"][e].astype(jnp.float32), precision=hi)
        up = jnp.einsum("pd,pdi->pi", xg, w["up"][e].astype(jnp.float32), precision=hi)
        y = jnp.einsum("pi,pid->pd", jax.nn.silu(gate) * up, w["down"][e].astype(jnp.float32), precision=hi)
        return y * wt[:, None]

    chunks = [a.reshape(-1, pairs_per_step) for a in (token, expert, weight)]
    ys = jax.lax.map(step, tuple(chunks)).reshape(pairs, -1)
    return jax.ops.segment_sum(ys, token, num_segments=n)


def shared_expert(x, w):
    g, u, d = w["shared"]
    return (jax.nn.silu(x @ g) * (x @ u)) @ d


# ------------------------------------------------------------------------------------------- measurements
def ceilings():
    n = 8192
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    x = jax.random.normal(jax.random.key(2), (2 ** 30,), jnp.bfloat16)  # 2 GiB
    cp = jax.jit(lambda v: v + jnp.bfloat16(1))
    mm_dev = device_time_ms(mm, [(a, b)], 20, 5)
    cp_dev = device_time_ms(cp, [(x,)], 20, 5)
    return {"matmul_tflops": 2 * n ** 3 / (mm_dev["ms"] * 1e-3) / 1e12,
            "copy_tbps": 2 * 2 ** 31 / (cp_dev["ms"] * 1e-3) / 1e12,
            "matmul_ms": mm_dev["ms"], "copy_ms": cp_dev["ms"]}


def check_gpu(dims_name, dims, w, log):
    """Kernel vs lax.ragged_dot on the same inputs (prefill and decode tile sizes), and at 30B dims vs the float64
    oracle. Returns {case: rel err}."""
    out = {}
    # Prefill tiles (block_m 128, above 4096 pairs) and decode tiles (block_m 64). XLA's GPU ragged_dot, the
    # reference, materialises a dense operand that grows with tokens x experts (48-56 GiB at 2048 tokens and 256
    # experts), so the 256-expert dims check 600 tokens: 4800 pairs, still the 128-row tiles.
    prefill_tokens = 2048 if dims["experts"] <= 64 else 600
    for tokens in (prefill_tokens, 3):
        x, ids, weights = make_batch(dims, w, tokens, jax.random.key(100 + tokens))
        fns = candidate_fns(dims, tokens, ("grouped_kernel", "xla_ragged_dot"))
        got = fns["grouped_kernel"](x, ids, weights, w)
        ref = fns["xla_ragged_dot"](x, ids, weights, w)
        out[f"kernel_vs_ragged_dot_{tokens}"] = rel_err(np.asarray(got, np.float32), np.asarray(ref, np.float32))
        out[f"kernel_finite_{tokens}"] = bool(np.isfinite(np.asarray(got, np.float32)).all())
        if dims_name == "30b" and tokens == 3:
            used = np.unique(np.asarray(ids))
            remap = {int(e): j for j, e in enumerate(used)}
            ids_local = np.vectorize(remap.get)(np.asarray(ids))
            oracle = experts_f64(np.asarray(x, np.float32), ids_local, np.asarray(weights),
                                 *(np.asarray(w[n][used], np.float32) for n in ("gate", "up", "down")))
            out["kernel_vs_f64_3"] = rel_err(np.asarray(got, np.float32), oracle)
    log(f"check {dims_name}: {out}")
    return out


def time_case(dims_name, dims, w, tokens, phase, ceil, candidates, log):
    e, k, d, i = dims["experts"], dims["top_k"], dims["hidden"], dims["width"]
    keys = jax.random.split(jax.random.key(tokens), 2)
    batches = [make_batch(dims, w, tokens, kk) for kk in keys]
    ids0 = np.asarray(batches[0][1])
    loads = np.bincount(ids0.reshape(-1), minlength=e)
    touched = int((loads > 0).sum())
    expert_bytes = 3 * d * i * 2
    flops = 2 * tokens * k * 3 * d * i
    act_bytes = 2 * tokens * d * 2
    if phase == "decode":
        moved = (touched + 1) * expert_bytes + act_bytes  # routed experts touched + the shared expert
    else:
        moved = touched * expert_bytes + act_bytes
    floor_ms = max(flops / (ceil["matmul_tflops"] * 1e12), moved / (ceil["copy_tbps"] * 1e12)) * 1e3
    row = {"dims": dims_name, "phase": phase, "tokens": tokens, "experts": e, "top_k": k, "hidden": d, "width": i,
           "useful_flops": flops, "bytes_touched": moved, "experts_touched": touched,
           "max_tokens_per_expert": int(loads.max()), "mean_tokens_per_expert": float(loads.mean()),
           "roofline_floor_ms": floor_ms, "results": {}}
    fns = candidate_fns(dims, tokens, candidates)
    # In decode, every candidate's output against the float32 pairwise reference on batch 0 (prefill's products
    # are checked by `check_gpu`; a reference at prefill sizes would dominate the run).
    reference = None if phase != "decode" else np.asarray(jax.jit(pairwise_reference)(*batches[0], w), np.float64)
    iters = 20 if phase == "decode" else 4
    for name in candidates:
        if name not in fns:
            continue
        fn = fns[name]
        includes_shared = name.endswith("shared_gemv")
        if phase == "decode" and not includes_shared:
            fn = jax.jit(lambda x, ids, wt, ww, f=fn: f(x, ids, wt, ww) + shared_expert(x, ww))
        args = [(x, ids, wt, w) for x, ids, wt in batches]
        slow = name == "xla_ragged_dot" and phase == "prefill"  # 14 TF/s: one profiled call, no host timing
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[0]))
            compile_s = time.perf_counter() - t0
            err = None if reference is None else rel_err(
                fns[name](*args[0]), reference + (np.asarray(shared_expert(*args[0][:1], w), np.float64)
                                                  if includes_shared else 0.0))
            dev = device_time_ms(fn, args, 1 if slow else iters, 1 if slow else 3)
            host = None if slow else time_fn(lambda: fn(*args[0]), warmup=1, reps=5)["median_ms"]
            ms = dev["ms"]
            res = {"device_ms": ms, "host_ms": host, "span_ms": dev["span_ms"], "first_call_s": compile_s,
                   "rel_err_vs_reference": err,
                   "tflops": flops / (ms * 1e-3) / 1e12,
                   "frac_matmul_ceiling": flops / (ms * 1e-3) / 1e12 / ceil["matmul_tflops"],
                   "frac_copy_ceiling": moved / (ms * 1e-3) / 1e12 / ceil["copy_tbps"], "frac_roofline": floor_ms / ms,
                   "top_kernels_ms": dict(sorted(dev["kernels_ms"].items(), key=lambda kv: -kv[1])[:12])}
        except Exception as exc:  # a candidate that does not build or run here is recorded, not fatal
            res = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
            traceback.print_exc()
        row["results"][name] = res
        log(f"{dims_name} {phase} N={tokens} {name}: " + (f"{res['device_ms']:.3f} ms dev ({res['host_ms']} host), "
            f"{res['frac_matmul_ceiling']:.1%} matmul, {res['frac_copy_ceiling']:.1%} copy, "
            + ("" if res["rel_err_vs_reference"] is None else f"rel. error {res['rel_err_vs_reference']:.1e}, ") +
            f"{res['frac_roofline']:.1%} roofline" if "device_ms" in res else res["error"][:200]))
    ours = row["results"].get("grouped_kernel", {})
    base = row["results"].get("xla_ragged_dot", {})
    if "device_ms" in ours and "device_ms" in base:
        row["speedup_vs_ragged_dot"] = base["device_ms"] / ours["device_ms"]
    return row


def write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": environment(), **payload}, f, indent=2, default=float)
    os.replace(tmp, path)


def markdown(path: str) -> str:
    """The BENCHMARKS.md tables of one result JSON: per case, our kernel's GPU time and ratios, and every other
    candidate's GPU time."""
    with open(path) as f:
        res = json.load(f)
    env, ceil = res["environment"], res["ceilings"]
    out = [f"`{os.path.relpath(path)}`: {env['device']}, jax {env['jax']}, {env['date_utc']}; same-run ceilings "
           f"{ceil['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {ceil['copy_tbps']:.2f} TB/s copy.", "",
           "| dims | phase | tokens | experts touched | max / mean tokens per expert | ours (ms) | TFLOP/s | "
           "% matmul | % copy | % roofline | x lax.ragged_dot | others (ms) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in res["cases"]:
        ours = c["results"].get("grouped_kernel", {})
        if "device_ms" not in ours:
            continue
        others = ", ".join(f"{name} {r['device_ms']:.3f}" if "device_ms" in r else f"{name} failed"
                           for name, r in c["results"].items() if name != "grouped_kernel")
        speed = f"{c['speedup_vs_ragged_dot']:.1f}" if "speedup_vs_ragged_dot" in c else "-"
        out.append(f"| {c['dims']} | {c['phase']} | {c['tokens']} | {c['experts_touched']}/{c['experts']} | "
                   f"{c['max_tokens_per_expert']} / {c['mean_tokens_per_expert']:.1f} | {ours['device_ms']:.3f} | "
                   f"{ours['tflops']:.0f} | {ours['frac_matmul_ceiling']:.1%} | {ours['frac_copy_ceiling']:.1%} | "
                   f"{ours['frac_roofline']:.1%} | {speed} | {others} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", default="", help="print the tables of this result JSON and exit")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="moe")
    ap.add_argument("--dims", default=",".join(DIMS))
    ap.add_argument("--candidates", default="grouped_kernel,grouped_kernel_other_block_m,mgpu_ragged_dot,"
                                            "tokamax_ragged_dot,xla_ragged_dot,xla_gather,routed_gemv,"
                                            "routed_gemv_block128,routed_gemv_block32,routed_gemv_unsplit,"
                                            "routed_gemv_split8,routed_gemv_shared_gemv,routed_gemv_fused_shared_gemv")
    ap.add_argument("--prefill", default=",".join(map(str, PREFILL_TOKENS)))
    ap.add_argument("--decode", default=",".join(map(str, DECODE_TOKENS)))
    ap.add_argument("--others-on", default="30b", help="dims sets that time the other candidates too")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the cases left after this many seconds")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}.json")
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    payload = {"ceilings": ceilings(), "checks": {}, "cases": [], "log": lines,
               "timing": "GPU kernel time per call from the profiler (device_ms), host clock beside it"}
    log(f"ceilings: {payload['ceilings']}")
    for dims_name in args.dims.split(","):
        candidates = args.candidates.split(",")
        if dims_name not in args.others_on.split(","):
            candidates = [c for c in candidates if c in ("grouped_kernel", "xla_ragged_dot")
                          or c.startswith("routed_gemv")]
        dims = DIMS[dims_name]
        w = make_weights(dims, jax.random.key(7))
        if any(c in candidates for c in ("mgpu_ragged_dot", "tokamax_ragged_dot")):
            w["gate_up"] = jnp.concatenate([w["gate"], w["up"]], axis=2)
        try:
            payload["checks"][dims_name] = check_gpu(dims_name, dims, w, log)
        except Exception as exc:
            payload["checks"][dims_name] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
            traceback.print_exc()
        for phase, counts in (("decode", args.decode), ("prefill", args.prefill)):
            for tokens in [int(t) for t in counts.split(",") if t]:
                if time.perf_counter() - start > args.budget_s:
                    log(f"budget: skipped {dims_name} {phase} N={tokens}")
                    continue
                payload["cases"].append(time_case(dims_name, dims, w, tokens, phase, payload["ceilings"],
                                                  candidates, log))
                write_json(path, payload)
        del w
    write_json(path, payload)
    log(f"wrote {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
