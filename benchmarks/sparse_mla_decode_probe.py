"""Where the time of sparse MLA decode goes on the GPU: gather ceilings, wrapper cost, memory against compute.

Decode (issue 7: B=64, T=1, K=2048, S=65536, Dqk=576) reads 64 x 2048 random 1152-byte cache rows. Beside the
copy ceiling of `sparse_mla.py` this measures, in the same run:
- the XLA row gather `kv[idx]` of exactly those rows (bytes read + written, as the copy ceiling counts them);
- torch's `index_select` of the same rows, when torch with CUDA is installed (CUDA-event timing);
- the public `sparse_mla` call against the Hopper kernel alone (the wrapper's cost: index handling, merge);
- the public call 8 times inside one jitted program (idle time between dispatches gone).
(Earlier runs also timed "no_compute" / "no_gather" ablations of the kernel; those modes left the production
kernel, and their results stay in the committed JSONs.)
Every row is timed twice: by the host clock around back-to-back calls, and by the GPU's kernel time from the
profiler (`indexcache_jax.profiling.device_time_ms`), which leaves out the GPU's idle time between calls.
The public call and the kernel are checked against the float32 reference before they are timed. The kernel rows use the split count `sparse_mla`
picks on this GPU.

Results go to $BENCH_RESULTS_DIR (default benchmarks/results/) as sparse_mla_decode_probe<tag>.json.

Usage: python benchmarks/sparse_mla_decode_probe.py [--gather-at POINT] [--tag SUFFIX]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from indexcache_jax.profiling import device_time_ms, write_result_json  # noqa: E402
from sparse_mla import (  # noqa: E402
    CASES, D_QK, SM_SCALE, TOP_K, V_DIM, _check, _inputs, _reference_f32, _time_ms, ceilings,
)

from pallas_kernels import _sparse_mla_hopper  # noqa: E402
from pallas_kernels.sparse_mla import _LOG2E, _merge_splits, chosen_config, sparse_mla  # noqa: E402

DEVICE_TIME_REPS = 5  # at most this many profiled samples per row (each writes and parses a trace)


def _kernel_fn(tokens, heads, gather_at):
    """The Hopper kernel alone on indices already shaped [BT, splits, K / splits] (K = 2048 needs no padding)."""
    def run(q2, kv, idx):
        out, lse = _sparse_mla_hopper.sparse_mla_hopper(
            q2, kv, idx, tokens=tokens, v_dim=V_DIM, scale_log2=SM_SCALE * _LOG2E, gather_at=gather_at
        )
        return _merge_splits(out, lse, q2.shape[0] // tokens, tokens, heads, V_DIM, q2.dtype)

    return jax.jit(run)


def gather_ceilings(case, iters, reps):
    """XLA and torch row-gather rates for the decode case's rows: TB/s counting bytes read + written."""
    b = case["batch"]
    q, kv, idx_sets = _inputs(case, jax.random.key(7))
    rows = kv.reshape(-1, D_QK)
    flat = [(i.reshape(b, -1) + (jnp.arange(b, dtype=jnp.int32) * kv.shape[1])[:, None]).reshape(-1) for i in idx_sets]
    nbytes = 2 * flat[0].size * D_QK * 2
    gather = jax.jit(lambda r, i: r[i])
    xla_ms = _time_ms(gather, [(rows, i) for i in flat], iters, reps)
    out = {"rows": int(flat[0].size), "row_bytes": D_QK * 2, "xla_gather_ms": xla_ms,
           "xla_gather_tbps": nbytes / (xla_ms * 1e-3) / 1e12}
    try:
        import torch

        if torch.cuda.is_available():
            t_rows = torch.from_numpy(np.asarray(rows.astype(jnp.float32))).to("cuda", torch.bfloat16)
            t_idx = [torch.from_numpy(np.asarray(i)).to("cuda", torch.int64) for i in flat]
            for i in t_idx:
                torch.index_select(t_rows, 0, i)
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for n in range(iters):
                    torch.index_select(t_rows, 0, t_idx[n % len(t_idx)])
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / iters)
            torch_ms = sorted(times)[len(times) // 2]
            out.update(torch_version=torch.__version__, torch_index_select_ms=torch_ms,
                       torch_index_select_tbps=nbytes / (torch_ms * 1e-3) / 1e12)
            del t_rows, t_idx
    except ImportError:
        out["torch"] = "not installed"
    del q, kv, rows, flat
    return out


def _hopper_splits(name):
    """The split count `sparse_mla` picks for the case on this GPU; exits unless it picks the Hopper kernel."""
    case = CASES[name]
    q_shape = (case["batch"], case["tokens"], case["heads"], D_QK)
    config = chosen_config(q_shape, jnp.bfloat16, TOP_K, V_DIM, interpret=False)
    if config.kernel != "hopper":
        raise SystemExit(f"{name}: sparse_mla picks the {config.kernel} kernel here; the probe needs a Hopper GPU")
    return config.num_splits


def probe_case(name, splits, ceil, iters, reps, gather_at):
    case = CASES[name]
    b, t, h = case["batch"], case["tokens"], case["heads"]
    bytes_moved = 2 * (b * t * TOP_K * D_QK + b * t * h * D_QK + b * t * h * V_DIM)
    q, kv, idx_sets = _inputs(case, jax.random.key(list(CASES).index(name)))
    ref = jax.block_until_ready(_reference_f32(q, kv, idx_sets[0]))
    public = jax.jit(lambda q_, kv_, i_: sparse_mla(q_, kv_, i_, sm_scale=SM_SCALE, v_dim=V_DIM))
    q2 = q.reshape(b * t, h, D_QK)
    kernel_args = [(q2, kv, i.reshape(b * t, splits, TOP_K // splits)) for i in idx_sets]
    # (label, fn, arg sets, checked against the reference, sparse MLA calls per fn call)
    entries = [("public", public, [(q, kv, i) for i in idx_sets], True, 1)]
    entries.append(("kernel", _kernel_fn(t, h, gather_at), kernel_args, True, 1))
    # The public call 8 times inside one program: whether GPU idle time between calls comes from the host's
    # per-dispatch work (gone in-program) or from the kernel's launch itself (still there).
    in_program = jax.jit(lambda q_, kv_, *ids: [sparse_mla(q_, kv_, i_, sm_scale=SM_SCALE, v_dim=V_DIM) for i_ in ids])
    in_program_args = [(q, kv, *[idx_sets[n % len(idx_sets)] for n in range(8)])]
    entries.append(("public_x8_in_one_program", in_program, in_program_args, False, 8))
    rows = []
    for label, fn, arg_sets, checked, calls in entries:
        row = {"variant": label}
        if checked:
            row["check"] = _check(lambda *_: fn(*arg_sets[0]), q, kv, idx_sets[0], ref, 1)
        ms = _time_ms(fn, arg_sets, iters, reps) / calls
        dev = device_time_ms(fn, arg_sets, iters, min(reps, DEVICE_TIME_REPS))
        dev_ms, span_ms = dev["ms"] / calls, dev["span_ms"] / calls
        row.update(ms=ms, frac_copy=bytes_moved / (ms * 1e-3) / 1e12 / ceil["copy_tbps"],
                   device_ms=dev_ms, device_span_ms=span_ms,
                   device_kernels_ms={k: v / calls for k, v in dev["kernels_ms"].items()},
                   device_frac_copy=bytes_moved / (dev_ms * 1e-3) / 1e12 / ceil["copy_device_tbps"])
        print(f"[{name}] {label}: host {ms:.4f} ms, {100 * row['frac_copy']:.1f}% of copy; device {dev_ms:.4f} ms "
              f"(span {span_ms:.4f}), {100 * row['device_frac_copy']:.1f}% of copy, {row.get('check', '')}", flush=True)
        rows.append(row)
    del q, kv, idx_sets, entries, kernel_args
    return {"case": name, "splits": splits, "gather_at": gather_at, "bytes": bytes_moved, "runs": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tag", default="")
    ap.add_argument("--gather-at", default="block_start", help="the kernel's gather_at for the kernel rows")
    args = ap.parse_args()
    splits = {name: _hopper_splits(name) for name in ("decode_h64", "decode_h128")}  # before any measurement
    ceil = ceilings()
    print(f"ceilings: {ceil}", flush=True)
    gathers = gather_ceilings(CASES["decode_h64"], args.iters, args.reps)
    gathers["frac_copy_xla"] = gathers["xla_gather_tbps"] / ceil["copy_tbps"]
    print(f"gather: {gathers}", flush=True)
    cases = [probe_case(n, s, ceil, args.iters, args.reps, args.gather_at) for n, s in splits.items()]
    path = write_result_json(f"sparse_mla_decode_probe{args.tag}", {
        "timing": (f"{args.iters} back-to-back calls per sample; host clock: median of {args.reps} samples, "
                   f"GPU kernel time (profiler): median of {min(args.reps, DEVICE_TIME_REPS)}"),
        "ceilings": ceil, "gather": gathers, "cases": cases,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
