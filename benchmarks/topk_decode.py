"""Top-k for decode shapes (issue 18): few rows (B = 1-64) over 64K-256K cache slots, k = 2048.

Run on the GPU machine from the repository root:
    BENCH_RESULTS_DIR=$OUT python benchmarks/topk_decode.py          # checks, config sweep, timings, JSON
    python benchmarks/topk_decode.py --smoke                          # CPU, interpret mode, tiny shapes

Work and bytes: a row of S float32 logits is read about twice (a count pass and a compaction pass of
the split kernel) plus a strided sample and the candidates, so the memory floor is B * S * 4 bytes at the same
run's copy bandwidth: 0.5 MB for B=1, S=131072, i.e. ~0.2 us at 2.5 TB/s. B=1 is latency-bound (three launches
and the sequential search steps inside each program), not bandwidth-bound.

Every configuration is checked against a numpy brute force (exact indices, ties to the lower index; rows with
-inf, NaN, constant values and live limits) before it is timed. GPU time comes from the profiler's kernel records
(`indexcache_jax.profiling.device_time_ms`), with the host clock beside it; torch.topk and lax.top_k run in the same process.
`measure_topk_decode()` is the entry point for other benchmarks (benchmarks/decode.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from indexcache_jax.profiling import copy_bandwidth_gbs, device_time_ms, time_fn, write_result_json  # noqa: E402
from pallas_kernels.indexer import indexer_topk, indexer_topk_reference  # noqa: E402
from pallas_kernels.topk import DEFAULT_SPLIT_TOPK_CONFIG, SplitTopkConfig, topk_rows  # noqa: E402
from topk_oracle import edge_rows, mask_past, numpy_topk  # noqa: E402

ONE_PROGRAM = SplitTopkConfig(max_rows=0)  # forces the one-program-per-row kernel (the prefill path)
SWEEP = {
    "default": DEFAULT_SPLIT_TOPK_CONFIG,
    "cand2_sample4096": SplitTopkConfig(cand_factor=2, n_sample=4096),
    "p128": SplitTopkConfig(max_programs=128, programs=512),
    "sample1024": SplitTopkConfig(n_sample=1024),
}


def random_rows(seed: int, r: int, s: int, edge: bool) -> np.ndarray:
    """Seeded float32 rows: standard normal, with the edge-case rows of tests/topk_oracle.py first when edge."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((r, s)).astype(np.float32)
    if edge and r >= 6:
        x = edge_rows(x, rng)
    return x


def check_rows(fn, seed: int, r: int, s: int, k: int) -> dict:
    """fn(x, limits) against numpy on fresh rows with random live limits (some full, one empty)."""
    rng = np.random.default_rng(seed + 1)
    x = random_rows(seed, r, s, edge=True)
    lim = rng.integers(k // 2, s, r).astype(np.int32)
    lim[-1] = s - 1
    if r > 1:
        lim[-2] = -1
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(lim)))
    want = numpy_topk(mask_past(x, lim), k)
    bad = (got != want).any(-1)
    return {"ok": bool(not bad.any()), "rows_differing": int(bad.sum()), "rows": r, "s": s, "k": k}


def check_indexer_decode(seed: int, b: int, s: int, k: int, interpret: bool, layers: int = 3) -> dict:
    """indexer_topk over layer 1's window of a stacked [B, layers * S, D] bf16 cache, ragged k_lengths, decode
    (T = 1), against indexer_topk_reference on the same device: identical -1 padding and >= 99.9% of indices
    shared (bf16 products summed in fp32 in a different order may flip exact near-ties)."""
    h, d = 32, 128
    kq, kk, kw = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, 1, h, d), jnp.float32).astype(jnp.bfloat16)
    keys = jax.random.normal(kk, (b, layers * s, d), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (b, 1, h), jnp.float32) * (h * d) ** -0.5
    rng = np.random.default_rng(seed)
    klen = jnp.asarray(rng.integers(k // 2, s + 1, b), jnp.int32)
    qpos = (klen - 1)[:, None]
    kw_ = dict(q_positions=qpos, k_lengths=klen, key_offset=jnp.int32(s), num_keys=s)
    got = np.asarray(jax.jit(lambda q_, k_, w_: indexer_topk(q_, k_, w_, k, interpret=interpret, **kw_))(q, keys, w))
    ref = np.asarray(jax.jit(lambda q_, k_, w_: indexer_topk_reference(q_, k_, w_, k, **kw_))(q, keys, w))
    same_pad = bool(((got < 0) == (ref < 0)).all())
    shared = float(np.mean([len(np.intersect1d(a[a >= 0], c[c >= 0])) / max(1, (c >= 0).sum())
                            for a, c in zip(got.reshape(-1, k), ref.reshape(-1, k))]))
    return {"ok": same_pad and shared >= 0.999, "same_padding": same_pad, "shared_fraction": shared,
            "identical_rows": float(np.mean((got == ref).all(-1))), "b": b, "s": s, "k": k}


def torch_topk_ms(r: int, s: int, k: int, seed: int) -> dict:
    """torch.topk on the GPU over the same shape: GPU time by CUDA events around back-to-back calls and by the
    profiler's kernel records (when this torch exposes them), host clock beside."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(r, s, device="cuda", dtype=torch.float32, generator=g)
    sync = lambda _: torch.cuda.synchronize()  # noqa: E731
    out = {}
    for name, kwargs in (("sorted", {}), ("unsorted", {"sorted": False})):
        host = time_fn(lambda: torch.topk(x, k, dim=-1, **kwargs), warmup=3, reps=20, sync=sync)["median_ms"]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        iters = 50
        start.record()
        for _ in range(iters):
            torch.topk(x, k, dim=-1, **kwargs)
        end.record()
        torch.cuda.synchronize()
        entry = {"host_ms": host, "events_ms": start.elapsed_time(end) / iters}
        try:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(iters):
                    torch.topk(x, k, dim=-1, **kwargs)
                torch.cuda.synchronize()
            total_us = 0.0
            for ev in prof.events():
                if str(getattr(ev, "device_type", "")).endswith("CUDA"):
                    total_us += getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0) or 0.0
            entry["kernels_ms"] = total_us / iters / 1e3 if total_us else None
        except Exception as e:  # noqa: BLE001 - a torch without the profiler API keeps the event timing
            entry["kernels_ms"] = None
            entry["profiler_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out[name] = entry
    return out


def time_jax(fn, args, iters=10, reps=3) -> dict:
    dev = device_time_ms(fn, [args], iters=iters, reps=reps)
    host = time_fn(lambda: fn(*args), warmup=2, reps=10)["median_ms"]
    return {"gpu_ms": dev["ms"], "gpu_span_ms": dev["span_ms"], "host_ms": host,
            "kernels_ms": {k_: v for k_, v in dev["kernels_ms"].items() if v > 1e-4}}


def measure_topk_decode(rows=(1, 8, 64), s: int = 131072, k: int = 2048, sweep: bool = True, seed: int = 0,
                        interpret: bool = False, log=print, checkpoint=None, budget_s: float = 150.0) -> dict:
    """Checks, then GPU times of the decode top-k at [rows, s], k: the split kernels (config sweep at B=1, the
    best at every B), the one-program kernel, lax.top_k and torch.topk, the same run's copy ceiling, a live-length
    scaling row and the fused decode indexer_topk. Returns the JSON payload (times in ms); checkpoint(payload),
    when given, is called after every entry (a run cut short keeps what it measured). The live-length, fused and
    prefill-shape entries are skipped once budget_s seconds have passed."""
    start = time.time()
    res = {"shape": {"rows": list(rows), "s": s, "k": k}, "checks": [], "times": [], "errors": []}

    def guard(label, fn):
        if checkpoint is not None:
            checkpoint(res)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a failing entry is recorded, the run goes on
            res["errors"].append({"where": label, "error": f"{type(e).__name__}: {str(e)[:1500]}"})
            log(f"ERROR {label} {type(e).__name__} {str(e)[:400]}")
            return None

    res["copy_gbs"] = guard("copy", lambda: copy_bandwidth_gbs(nbytes=2 ** 30)) if not interpret else None
    configs = SWEEP if sweep else {"default": DEFAULT_SPLIT_TOPK_CONFIG}
    checked = {}
    for name, cfg in {**configs, "one_program": ONE_PROGRAM}.items():
        fn = jax.jit(lambda x, lim, cfg=cfg: topk_rows(x, k, lim, interpret=interpret, split_config=cfg))
        c = guard(f"check {name}", lambda: [check_rows(fn, seed + 10 + i, r, s, k) for i, r in enumerate((1, 8))])
        if c is not None:
            ok = all(x["ok"] for x in c)
            res["checks"].append({"what": f"topk_rows[{name}]", "ok": ok, "cases": c})
            log(f"check {name}: {ok} {c}")
            if ok:
                checked[name] = cfg
    c = guard("check indexer_topk decode", lambda: check_indexer_decode(seed + 50, 4, s, k, interpret))
    if c is not None:
        res["checks"].append({"what": "indexer_topk decode (stacked cache window, ragged lengths)", **c})
        log(f"check indexer_topk decode: {c}")
    if interpret:
        return res

    x1 = jnp.asarray(random_rows(seed + 100, 1, s, edge=False))
    full1 = jnp.full((1,), s - 1, jnp.int32)
    sweep_ms = {}
    for name, cfg in checked.items():
        fn = jax.jit(lambda x, lim, cfg=cfg: topk_rows(x, k, lim, interpret=False, split_config=cfg))
        t = guard(f"time {name}", lambda: time_jax(fn, (x1, full1)))
        if t is not None:
            res["times"].append({"what": f"topk_rows[{name}]", "rows": 1, "live": s, **t})
            sweep_ms[name] = t["gpu_ms"]
            log(f"B=1 {name}: {t['gpu_ms'] * 1e3:.1f} us GPU, host {t['host_ms'] * 1e3:.1f} us")
    split_names = [n_ for n_ in sweep_ms if n_ != "one_program"]
    best = min(split_names, key=sweep_ms.get) if split_names else None
    res["best_config"] = best
    res["best_config_fields"] = None if best is None else vars(SWEEP.get(best, DEFAULT_SPLIT_TOPK_CONFIG))
    for r in rows:
        x = jnp.asarray(random_rows(seed + 200 + r, r, s, edge=False))
        full = jnp.full((r,), s - 1, jnp.int32)
        entry = {"rows": r, "s": s, "k": k, "floor_ms": (r * s * 4) / (res["copy_gbs"] * 1e9) * 1e3
                 if res["copy_gbs"] else None}
        if best is not None:
            cfg = checked[best]
            fn = jax.jit(lambda x, lim, cfg=cfg: topk_rows(x, k, lim, interpret=False, split_config=cfg))
            entry["split"] = guard(f"split B={r}", lambda: time_jax(fn, (x, full)))
        one = jax.jit(lambda x, lim: topk_rows(x, k, lim, interpret=False, split_config=ONE_PROGRAM))
        entry["one_program"] = guard(f"one_program B={r}", lambda: time_jax(one, (x, full)))
        lax_topk = jax.jit(lambda x: jax.lax.top_k(x, k)[1])
        entry["lax_top_k"] = guard(f"lax.top_k B={r}", lambda: time_jax(lax_topk, (x,), iters=5, reps=3))
        res["times"].append({"what": "per_batch", **entry})
        log(f"B={r}: {entry}")
    def in_budget(label):
        if time.time() - start < budget_s:
            return True
        res["errors"].append({"where": label, "error": f"skipped: past the {budget_s:.0f} s budget"})
        return False

    if best is not None and in_budget("live-length scaling"):
        cfg = checked[best]
        fn = jax.jit(lambda x, lim, cfg=cfg: topk_rows(x, k, lim, interpret=False, split_config=cfg))
        for live in (8192, 32768):
            t = guard(f"live {live}", lambda: time_jax(fn, (x1, jnp.full((1,), live - 1, jnp.int32))))
            if t is not None:
                res["times"].append({"what": f"topk_rows[{best}] live-length scaling", "rows": 1, "live": live, **t})
                log(f"B=1 live {live}: {t['gpu_ms'] * 1e3:.1f} us")

    def fused():
        h, d, layers = 32, 128, 4
        kq, kk, kw = jax.random.split(jax.random.key(seed + 300), 3)
        out = []
        for b in (1, 8):
            q = jax.random.normal(kq, (b, 1, h, d), jnp.float32).astype(jnp.bfloat16)
            keys = jax.random.normal(kk, (b, layers * s, d), jnp.float32).astype(jnp.bfloat16)
            w = jax.random.normal(kw, (b, 1, h), jnp.float32) * (h * d) ** -0.5
            klen = jnp.full((b,), s, jnp.int32)
            fn = jax.jit(lambda q, keys, w, off: indexer_topk(
                q, keys, w, k, q_positions=(klen - 1)[:, None], k_lengths=klen, key_offset=off, num_keys=s))
            t = time_jax(fn, (q, keys, w, jnp.int32(2 * s)))
            out.append({"what": "indexer_topk decode bf16 H=32 (window of a 4-layer stacked cache)", "rows": b,
                        "live": s, **t})
            log(f"fused decode B={b}: {t['gpu_ms'] * 1e3:.1f} us")
        return out

    f = guard("fused", fused) if in_budget("fused") else None
    if f:
        res["times"].extend(f)

    def prefill_rows(r=1024):
        """The one-program kernel at a prefill chunk's shape, next to torch.topk (issue 6 measured 2.09x at 4096
        rows with the kernel before the live limits)."""
        x = jnp.asarray(random_rows(seed + 400, r, s, edge=False))
        one = jax.jit(lambda x: topk_rows(x, k, interpret=False))
        return {"what": "prefill rows, one program per row", "rows": r, "s": s,
                **time_jax(one, (x,), iters=5, reps=3)}

    p = guard("prefill rows", prefill_rows) if in_budget("prefill rows") else None
    if p:
        res["times"].append(p)
        log(f"prefill rows: {p}")

    # torch.topk last: once torch's profiler has run, it keeps CUPTI, and JAX's profiler records no kernel after it.
    for t in res["times"]:
        if t["what"] == "per_batch":
            t["torch_topk"] = guard(f"torch B={t['rows']}", lambda t=t: torch_topk_ms(t["rows"], s, k, seed + t["rows"]))
        elif t["what"].startswith("prefill rows"):
            t["torch_topk"] = guard("torch prefill rows", lambda t=t: torch_topk_ms(t["rows"], s, k, seed + 401))
        else:
            continue
        log(f"torch.topk {t['rows']} rows: {t['torch_topk']}")
    return res


def measure_reference_cpu(seed: int = 0, h: int = 4, d: int = 32, k: int = 256, log=print) -> dict:
    """Host time of one decode step of `indexer_topk_reference` (what the CPU engine runs) for a fixed live
    length in windows of growing num_keys, and for growing live lengths: the time should follow the live
    length. float32 keys (the CPU engine's dtype), a 2-layer stacked buffer, the window of layer 1."""
    rows = []
    rng = np.random.default_rng(seed)
    for num_keys, live in ((2048, 1024), (131072, 1024), (131072, 8192), (131072, 131072)):
        q = jnp.asarray(rng.standard_normal((1, 1, h, d)), jnp.float32)
        keys = jnp.asarray(rng.standard_normal((1, 2 * num_keys, d)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((1, 1, h)), jnp.float32)
        klen = jnp.asarray([live], jnp.int32)
        fn = jax.jit(lambda q, keys, w, klen, off, n=num_keys: indexer_topk_reference(
            q, keys, w, k, q_positions=(klen - 1)[:, None], k_lengths=klen, key_offset=off, num_keys=n))
        t = time_fn(lambda: fn(q, keys, w, klen, jnp.int32(num_keys)), warmup=2, reps=10)
        rows.append({"num_keys": num_keys, "live": live, "host_ms": t["median_ms"], "min_ms": t["min_ms"]})
        log(f"reference decode step num_keys={num_keys} live={live}: {t['median_ms']:.3f} ms")
    return {"what": "indexer_topk_reference decode step, host clock (CPU)", "h": h, "d": d, "k": k, "rows": rows}


def markdown(path: str) -> str:
    """The BENCHMARKS.md table of a topk_decode.json, built only from the JSON (microseconds of GPU time)."""
    import json

    d = json.load(open(path))
    us = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
    lines = [f"Device {d['environment']['device']}, jax {d['environment']['jax']}, torch {d['environment']['torch']}; "
             f"copy ceiling {d['copy_gbs']:.0f} GB/s; best split config `{d['best_config']}`.", "",
             "| rows x slots, k | split kernels, us | one program per row, us | lax.top_k, us | "
             "torch.topk, us (events / kernels) | torch / split | read floor, us |", "|---|---|---|---|---|---|---|"]
    for t in d["times"]:
        if t["what"] != "per_batch":
            continue
        sp, one, lx, th = t.get("split"), t.get("one_program"), t.get("lax_top_k"), t.get("torch_topk")
        events = min((e["events_ms"] for e in (th or {}).values()), default=None)
        kernels = min((e["kernels_ms"] for e in (th or {}).values() if e.get("kernels_ms")), default=None)
        torch_best = kernels or events
        ratio = f"{torch_best / sp['gpu_ms']:.2f}x" if sp and torch_best else "-"
        lines.append(f"| {t['rows']} x {t['s']}, {t['k']} | {us(sp and sp['gpu_ms'])} (host {us(sp and sp['host_ms'])})"
                     f" | {us(one and one['gpu_ms'])} | {us(lx and lx['gpu_ms'])} | {us(events)} / {us(kernels)} | "
                     f"{ratio} | {us(t['floor_ms'])} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU interpret mode, tiny shapes")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip the optional entries after this")
    p.add_argument("--cpu-reference", action="store_true",
                   help="CPU: time a decode step of the XLA reference against num_keys and the live length")
    p.add_argument("--markdown", default=None, metavar="JSON", help="print the BENCHMARKS.md table of a result")
    args = p.parse_args()
    t0 = time.time()
    if args.markdown:
        print(markdown(args.markdown))
        return
    if args.cpu_reference:
        print("wrote", write_result_json("topk_decode_cpu_reference", measure_reference_cpu()))
        return
    if args.smoke:
        small = {"default": SplitTopkConfig(min_row=1, block=256, n_sample=256, programs=16, max_programs=8)}
        SWEEP.clear()
        SWEEP.update(small)
        res = measure_topk_decode(rows=(1,), s=4096, k=64, sweep=True, interpret=True)
        print({c["what"]: c["ok"] for c in res["checks"]})
        return
    res = measure_topk_decode(sweep=not args.no_sweep, checkpoint=lambda r: write_result_json("topk_decode", r),
                              budget_s=args.budget_s)
    res["elapsed_s"] = time.time() - t0
    print("wrote", write_result_json("topk_decode", res))


if __name__ == "__main__":
    main()
