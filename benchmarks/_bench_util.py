"""Shared helpers for the kernel benchmarks: timing, same-run ceilings, and JSON results.

Results go to $BENCH_RESULTS_DIR (default benchmarks/results/) as <name>.json, with the device, the jax / jaxlib /
torch / triton versions and the UTC date recorded next to the payload.
"""

from __future__ import annotations

import collections
import datetime
import glob
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, reps: int = 10, iters: int = 1,
            sync: Callable[[Any], Any] = jax.block_until_ready) -> dict:
    """Host wall-clock time of fn() per call, in ms, after `warmup` synchronized calls.

    Each of `reps` samples times `iters` back-to-back calls and synchronizes on the last result with
    `sync(result)` (iters=1: every call waits for its result; iters>1: the device queue stays full, so the host's
    dispatch hides behind the device). Returns {"median_ms", "min_ms", "max_ms", "reps"} of the per-call time.
    For torch pass sync=lambda _: torch.cuda.synchronize(); to cycle through argument sets, let fn draw the next
    one (e.g. from itertools.cycle).
    """
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - t0) * 1e3 / iters)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


def gpu_kernel_times(profile) -> tuple[collections.Counter, float]:
    """Total duration (ns) of each event name on the GPU planes' stream lines, and the span (ns) from the first
    event's start to the last one's end. Host planes and the GPU planes' summary lines ("XLA Ops", ...) are left
    out: their events describe the same work again."""
    per_kernel = collections.Counter()
    first_start, last_end = float("inf"), float("-inf")
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                per_kernel[event.name] += event.duration_ns
                first_start = min(first_start, event.start_ns)
                last_end = max(last_end, event.start_ns + event.duration_ns)
    return per_kernel, (last_end - first_start if per_kernel else 0.0)


def gpu_kernel_scopes(profile) -> dict:
    """{kernel name: its first event's string stats joined by " | "} on the GPU planes' stream lines. XLA tags
    each kernel with the HLO op and the JAX name stack it came from (flax module paths included), which places a
    fusion (`input_reduce_fusion_12`) in the model: `.../mlp_norm/...`, `.../mlp/router/...`."""
    scopes = {}
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for event in line.events:
                if event.name not in scopes:
                    scopes[event.name] = " | ".join(f"{k}={v}" for k, v in event.stats if isinstance(v, str))
    return scopes


def device_time_ms(fn: Callable, arg_sets: list, iters: int, reps: int) -> dict:
    """GPU time of fn per call, from the profiler's kernel records rather than the host clock, in ms.

    Each of `reps` samples profiles `iters` back-to-back calls (cycling through arg_sets) and sums the durations
    of every kernel and copy on the GPU's streams: time the GPU spends executing, free of the host's dispatch
    time and of idle gaps between calls. Returns {"ms": median per-call time, "samples_ms", "kernels_ms":
    per-call time of each kernel name in the median sample, "span_ms": per-call time from the first kernel's start
    to the last one's end in that sample, idle gaps included, "kernel_scopes": `gpu_kernel_scopes` of the last
    sample}.
    """
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*arg_sets[0]))
    samples = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                out = None
                for i in range(iters):
                    out = fn(*arg_sets[i % len(arg_sets)])
                jax.block_until_ready(out)
            paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
            if len(paths) != 1:
                raise RuntimeError(f"expected one profiler trace in {trace_dir}, found {paths}")
            profile = ProfileData.from_file(paths[0])
        per_kernel, span_ns = gpu_kernel_times(profile)
        scopes = gpu_kernel_scopes(profile)
        if not per_kernel:
            raise RuntimeError("the profiler recorded no GPU stream events: is this a GPU backend with CUPTI?")
        samples.append(({name: ns * 1e-6 / iters for name, ns in per_kernel.items()},
                        span_ns * 1e-6 / iters))
    totals = [sum(kernels.values()) for kernels, _ in samples]
    median = sorted(range(reps), key=totals.__getitem__)[reps // 2]
    return {"ms": totals[median], "samples_ms": totals, "kernels_ms": samples[median][0],
            "span_ms": samples[median][1], "kernel_scopes": scopes}


def matmul_ceiling_tflops(dtype, n: int = 8192, reps: int = 10) -> float:
    """Same-run matrix-product rate of XLA for an n^3 product, TFLOP/s (median; random inputs, never zeros).

    bfloat16 / float16: jnp.dot with the input dtype out. float8_e4m3fn: lax.dot_general with bfloat16 out, the
    best of the row-major B layout (a @ b) and the K-major B layout (a @ b.T, what cuBLASLt FP8 wants).
    """
    dtype = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    if dtype == jnp.float8_e4m3fn:
        fns = [jax.jit(lambda x, y, c=c: jax.lax.dot_general(x, y, (((1,), (c,)), ((), ())),
                                                             preferred_element_type=jnp.bfloat16))
               for c in (0, 1)]
    else:
        fns = [jax.jit(lambda x, y: jnp.dot(x, y))]
    best = min(time_fn(lambda f=f: f(a, b), warmup=3, reps=reps)["median_ms"] for f in fns)
    return 2.0 * n ** 3 / (best * 1e-3) / 1e12


def copy_bandwidth_gbs(nbytes: int = 2 ** 31, reps: int = 10) -> float:
    """Same-run device memory bandwidth, GB/s, counting bytes read plus bytes written, of y = x + 1 (float32)."""
    x = jax.random.normal(jax.random.key(1), (nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0)
    t = time_fn(lambda: f(x), warmup=3, reps=reps)
    return 2.0 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def environment() -> dict:
    """Device and software versions of this run."""
    import jaxlib

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    for mod in ("torch", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def write_result_json(name: str, payload: dict) -> str:
    """Writes {"environment": ..., **payload} to $BENCH_RESULTS_DIR/<name>.json; returns the path."""
    out_dir = os.environ.get("BENCH_RESULTS_DIR", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path + ".tmp", "w") as f:  # a cut-off run leaves no half-written result
        json.dump({"environment": environment(), **payload}, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
    return path
