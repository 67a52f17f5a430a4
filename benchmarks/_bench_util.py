"""Shared helpers for the kernel benchmarks: timing, same-run ceilings, and JSON results.

Results go to $BENCH_RESULTS_DIR (default benchmarks/results/) as <name>.json, with the device, the jax / jaxlib /
torch / triton versions and the UTC date recorded next to the payload.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, reps: int = 10,
            sync: Callable[[Any], Any] = jax.block_until_ready) -> dict:
    """Wall-clock time of fn() after `warmup` calls, synchronizing each call with `sync(result)`.

    Returns {"median_ms", "min_ms", "max_ms", "reps"}. For torch pass sync=lambda _: torch.cuda.synchronize().
    """
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}


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
