"""Measuring on the device: timing, GPU kernel times from profiler traces, their categories, same-run ceilings,
and JSON results.

The benchmarks (`benchmarks/*.py`) and the end-to-end sweep (`indexcache_jax.e2e_bench`) share these helpers.
Results go to `results_dir()` ($BENCH_RESULTS_DIR, else the checkout's `benchmarks/results/`) as <name>.json, with
the device, the jax / jaxlib / torch / triton versions and the UTC date recorded next to the payload.
"""

from __future__ import annotations

import collections
import datetime
import glob
import json
import os
import platform
import re
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


def _gpu_stream_events(profile):
    """The events on the GPU planes' stream lines. Host planes and the GPU planes' summary lines ("XLA Ops", ...)
    are left out: their events describe the same work again."""
    for plane in profile.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    yield from line.events


def gpu_kernel_times(profile) -> tuple[collections.Counter, float]:
    """Total duration (ns) of each event name on the GPU's streams (`_gpu_stream_events`), and the span (ns) from
    the first event's start to the last one's end."""
    per_kernel = collections.Counter()
    first_start, last_end = float("inf"), float("-inf")
    for event in _gpu_stream_events(profile):
        per_kernel[event.name] += event.duration_ns
        first_start = min(first_start, event.start_ns)
        last_end = max(last_end, event.start_ns + event.duration_ns)
    return per_kernel, (last_end - first_start if per_kernel else 0.0)


def gpu_kernel_launches(profile) -> collections.Counter:
    """How many times each event name ran on the GPU's streams (`_gpu_stream_events`): launches, not time. A step of
    many tiny kernels is bound by their count, whatever bytes each reads."""
    return collections.Counter(event.name for event in _gpu_stream_events(profile))


def gpu_kernel_scopes(profile) -> dict:
    """{kernel name: its first event's string stats joined by " | "} on the GPU planes' stream lines. XLA tags
    each kernel with the HLO op and the JAX name stack it came from (flax module paths included), which places a
    fusion (`input_reduce_fusion_12`) in the model: `.../mlp_norm/...`, `.../mlp/router/...`."""
    scopes = {}
    for event in _gpu_stream_events(profile):
        if event.name not in scopes:
            scopes[event.name] = " | ".join(f"{k}={v}" for k, v in event.stats if isinstance(v, str))
    return scopes


def device_time_ms(fn: Callable, arg_sets: list, iters: int, reps: int, hlo_text: str | None = None) -> dict:
    """GPU time of fn per call, from the profiler's kernel records rather than the host clock, in ms.

    Each of `reps` samples profiles `iters` back-to-back calls (cycling through arg_sets) and sums the durations
    of every kernel and copy on the GPU's streams: time the GPU spends executing, free of the host's dispatch
    time and of idle gaps between calls. Returns {"ms": median per-call time, "samples_ms", "kernels_ms":
    per-call time of each kernel name in the median sample, "span_ms": per-call time from the first kernel's start
    to the last one's end in that sample, idle gaps included, "launches": kernels and copies per call in that
    sample, "kernel_scopes": `gpu_kernel_scopes` of the last
    sample, overlaid with `hlo_kernel_scopes(hlo_text)` where fn runs that compiled module (`.compile().as_text()`)
    and the caller has it}.
    """
    from jax.profiler import ProfileData

    if jax.default_backend() != "gpu":  # no GPU streams to record: fail before running or tracing anything
        raise RuntimeError(f"no GPU stream events to record: the default backend is {jax.default_backend()!r}")
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
                        span_ns * 1e-6 / iters, sum(gpu_kernel_launches(profile).values()) / iters))
    totals = [sum(kernels.values()) for kernels, _, _ in samples]
    median = sorted(range(reps), key=totals.__getitem__)[reps // 2]
    return {"ms": totals[median], "samples_ms": totals, "kernels_ms": samples[median][0],
            "span_ms": samples[median][1], "launches": samples[median][2],
            "kernel_scopes": {**scopes, **hlo_kernel_scopes(hlo_text or "")}}


# ------------------------------------------------------------------------------------------- kernel categories
# A kernel's category: first by its own name (our Pallas kernels, cuBLAS, copies), then by the JAX name stack XLA
# tagged it with (flax module paths), which places XLA's fusions in the model.
KERNEL_CATEGORIES = (
    ("indexer logits", ("_logits_kernel",)),
    ("top-k", ("topk", "_split_count", "_split_compact", "_split_select")),
    ("sparse MLA", ("sparse_mla",)),
    ("MoE", ("mosaic_gpu", "grouped", "ragged", "routed_")),
    ("copies", ("memcpy", "memset", "copy")),
)
# flax puts a module call in the name stack as `.../indexer/...` and a method call as `.../indexer.select/...`.
SCOPE_CATEGORIES = (
    ("indexer (projections, rope, quant)", ("/indexer/", "/indexer.")),
    ("MoE", ("/mlp/", "/mlp.", "moe", "expert", "router")),
    ("attention projections (MLA)", ("/mla/", "/mla.")),
    ("norms", ("_norm/", "_norm.", "final_norm")),
    ("LM head and sampling", ("lm_head", "argmax", "sample", "categorical", "sort")),
    ("cache writes", ("write_rows", "scatter")),
)
CATEGORIES = tuple(name for name, _ in KERNEL_CATEGORIES) + tuple(
    name for name, _ in SCOPE_CATEGORIES if name != "MoE") + ("dense matmuls", "other")
MATMUL_KERNELS = ("gemm", "gemv", "nvjet", "cutlass", "dot", "matmul", "sm90_xmma")

# The coarse categories (issue 20: indexer logits, top-k, sparse MLA, MoE, dense projections and norms,
# copies, other), each fine category above mapped into one.
COARSE_CATEGORY = {
    "indexer logits": "indexer logits",
    "top-k": "top-k",
    "sparse MLA": "sparse MLA",
    "MoE": "MoE",
    "copies": "copies",
    "indexer (projections, rope, quant)": "dense projections and norms",
    "attention projections (MLA)": "dense projections and norms",
    "norms": "dense projections and norms",
    "LM head and sampling": "dense projections and norms",
    "cache writes": "copies",
    "dense matmuls": "dense projections and norms",
    "other": "other",
}
COARSE_CATEGORIES = ("indexer logits", "top-k", "sparse MLA", "MoE", "dense projections and norms", "copies", "other")
# What the paper counts as the indexer's time: its logits, its top-k, and its own projections / RoPE / FP8 quant.
INDEXER_CATEGORIES = ("indexer logits", "top-k", "indexer (projections, rope, quant)")


_HLO_INSTRUCTION = re.compile(r"^\s*(?P<root>ROOT\s+)?%(?P<name>[\w.\-]+)\s*=")
_HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_HLO_CALLS = re.compile(r"calls=%(?P<name>[\w.\-]+)")
_HLO_INNER = re.compile(r"(?:calls|to_apply)=%(?P<name>[\w.\-]+)")
_HLO_OP_NAME = re.compile(r'metadata=\{op_name="(?P<op>[^"]*)"')


def _hlo_instructions(hlo_text: str):
    """Yields `(computation name, _HLO_INSTRUCTION match, line)` for each instruction of an HLO module's text."""
    computation = None
    for line in hlo_text.splitlines():
        head = _HLO_COMPUTATION.match(line)
        if head:
            computation = head.group("name")
            continue
        m = _HLO_INSTRUCTION.match(line)
        if m:
            yield computation, m, line


def hlo_kernel_scopes(hlo_text: str) -> dict:
    """{GPU kernel name: JAX name stack} from a compiled module's HLO text (`jax.jit(f).lower(...).compile()
    .as_text()`). XLA names a fusion's kernel after the instruction with dots as underscores
    (`%input_reduce_fusion.12` runs as `input_reduce_fusion_12`), and its `op_name` metadata holds the name stack,
    which the profiler's kernel records often lack (inside CUDA command buffers). A fusion without metadata of its
    own takes its fused computation's root's. Instructions inside fused computations and reduction regions are
    not kernels and are left out."""
    instructions, roots, inner = [], {}, set()
    for computation, m, line in _hlo_instructions(hlo_text):
        if " parameter(" in line:  # a parameter runs no kernel; its op_name is the argument's name
            continue
        op = _HLO_OP_NAME.search(line)
        calls = _HLO_CALLS.search(line)
        inner.update(x.group("name") for x in _HLO_INNER.finditer(line))
        if m.group("root") and op:
            roots[computation] = op.group("op")
        instructions.append((computation, m.group("name"), op and op.group("op"), calls and calls.group("name")))
    scopes = {}
    for computation, name, op, calls in instructions:
        if computation in inner:
            continue
        op = op or roots.get(calls)
        if op:
            scopes[name.replace(".", "_")] = op
    return scopes


_HLO_SHAPE = re.compile(r"=\s*(?P<dtype>[a-z]\w*)\[(?P<dims>[\d,]*)\]")
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
              "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def materialised_slices(hlo_text: str) -> dict:
    """The dynamic slices a compiled GPU module writes out as copies, from its HLO text: fusions that are not a
    kernel's custom fusion and whose fused computation's root is a `dynamic-slice` that XLA gave a
    `dynamic_slice_config` (a slice indexed by a loop counter, as of a layer's weights out of a stack). Inside a
    kernel's custom fusion the same slice is an address, not a copy. `{"count", "bytes", "largest"}`: each fusion
    counted once as it stands in the program, not times its loop's trip count; `largest` lists up to 8
    `[shape, bytes]`, biggest first."""
    sliced = {}
    for computation, m, line in _hlo_instructions(hlo_text):
        if m.group("root") and " dynamic-slice(" in line and "dynamic_slice_config" in line:
            shape = _HLO_SHAPE.search(line)
            n = int(np.prod([int(d) for d in shape.group("dims").split(",") if d]))
            sliced[computation] = (f"{shape.group('dtype')}[{shape.group('dims')}]",
                                   n * _HLO_BYTES.get(shape.group("dtype"), 4))
    copies = []
    for _, _, line in _hlo_instructions(hlo_text):
        calls = _HLO_CALLS.search(line)
        if calls and calls.group("name") in sliced and "kind=kCustom" not in line:
            copies.append(sliced[calls.group("name")])
    copies.sort(key=lambda c: -c[1])
    return {"count": len(copies), "bytes": sum(b for _, b in copies), "largest": [list(c) for c in copies[:8]]}


def category(kernel: str, scope: str) -> str:
    """The fine category (one of `CATEGORIES`) of a GPU kernel, from its name and its name stack `scope`."""
    low, scope = kernel.lower(), scope.lower()
    for name, keys in KERNEL_CATEGORIES:
        if any(k in low for k in keys):
            return name
    for name, keys in SCOPE_CATEGORIES:
        if any(k in scope for k in keys):
            return name
    return "dense matmuls" if any(k in low for k in MATMUL_KERNELS) else "other"


def categorize(kernels_ms: dict, scopes: dict) -> dict:
    """Per-category GPU ms: a kernel's name decides first, then the name stack in its profiler stats (`scopes`)."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for kernel, ms in kernels_ms.items():
        out[category(kernel, scopes.get(kernel, ""))] += ms
    return out


def coarse_categories(fine_ms: dict) -> dict:
    """`categorize`'s fine categories summed into `COARSE_CATEGORIES` (same unit)."""
    out = dict.fromkeys(COARSE_CATEGORIES, 0.0)
    for name, ms in fine_ms.items():
        out[COARSE_CATEGORY[name]] += ms
    return out


def indexer_share(fine_ms: dict) -> float:
    """The indexer's fraction of the total in `categorize`'s fine categories (`INDEXER_CATEGORIES` / all)."""
    total = sum(fine_ms.values())
    return sum(fine_ms.get(name, 0.0) for name in INDEXER_CATEGORIES) / total if total else float("nan")


def top_kernels(kernels_ms: dict, scopes: dict, n: int = 25) -> list:
    """The n slowest kernels as [name, ms, category, name stack (trimmed)]."""
    return [[k, v, category(k, scopes.get(k, "")), scopes.get(k, "")[:240]]
            for k, v in sorted(kernels_ms.items(), key=lambda kv: -kv[1])[:n]]


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


def parse_xla_options(specs) -> dict:
    """XLA compiler options from `NAME=VALUE` strings (`--xla-option`), for `.compile(options)`. XLA wants a bool for
    `true`/`false` and numbers as numbers, not strings; a spec without `=` is a ValueError naming it."""
    options = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"an XLA option takes NAME=VALUE, got {spec!r}")
        value: bool | int | float | str = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        options[name] = value
    return options


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


def results_dir() -> str:
    """Where result JSONs go: $BENCH_RESULTS_DIR, else `benchmarks/results/` of the checkout this package sits in,
    else `benchmarks/results/` under the working directory (an installed package has no checkout beside it)."""
    if os.environ.get("BENCH_RESULTS_DIR"):
        return os.environ["BENCH_RESULTS_DIR"]
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    return os.path.join(checkout if os.path.isdir(checkout) else os.path.join(os.getcwd(), "benchmarks"), "results")


def write_json_atomic(path: str, payload: Any) -> str:
    """Writes `payload` as JSON to `path` through a temporary file renamed over it, so a reader (or a run killed
    mid-write) only ever sees the old file or the new one; returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_result_json(name: str, payload: dict) -> str:
    """Writes {"environment": ..., **payload} to `results_dir()`/<name>.json atomically; returns the path."""
    return write_json_atomic(os.path.join(results_dir(), f"{name}.json"), {"environment": environment(), **payload})
