"""The paper's Table 1 on one device: prefill seconds and decode tok/s of the 30B DSA model from 10K to 200K tokens
under full DSA and IndexCache (issue 20). CLI: `indexcache-bench` (also `python benchmarks/e2e.py`).

Model: the `glm47_flash_dsa_30b` preset (47 layers; `--layers` and `--preset-overrides` cut it for tests), bf16
random weights generated on the device one leaf at a time, in blocks of at most `BLOCK_BYTES`, directly in bf16
(`random_params`): 30B float32 values would not fit, and nothing large travels from the host. Each layer's weights
depend only on (seed, leaf name, layer index), so every schedule's params hold the same per-layer weights as
`ic.relayout` of the full-DSA params would give (tested), without the eager per-layer copies `relayout` makes of
a 60 GB tree.

For each schedule (full DSA; IndexCache 1/2 and 1/4 with the paper's searched 30B patterns; uniform 1/2 and 1/4),
each indexer numerics (`fp8`: DeepSeek's FP8 indexer; `none`: bf16) and each context (batch 1), it measures:
- `prefill`: seconds of the engine's jitted prefill (`engine._prefill`: `--chunk`-token query chunks, the LM head on
  the last row), compiled ahead, host clock; one chunk in the middle of the prompt profiled on the GPU, by kernel
  category (its indexer share stands for the whole prefill's: the indexer's cost grows linearly with the chunk's
  position, so the middle chunk is the mean one); model FLOPs (`prefill_flops`) over the time and the same run's
  bf16 matmul ceiling (MFU);
- `decode`: the engine's on-device decode loop (`engine._decode_loop`) for `--decode-steps` steps at that live
  length, on a cache filled with random rows (a step's cost does not depend on how the rows got there), host clock
  and GPU profiler time, by category;
- `full_kv` (at `FULL_KV_CONTEXT` only): the same decode at the largest batch whose cache fits the device's free
  memory (`largest_batch`), tokens/s summed over the batch.
Every entry also records the device's peak memory so far and its wall time. On a backend without GPU profiler
events (CPU) the GPU fields are null with the error beside them; the host clock is always there.

Output: `<results dir>/<--name>.json`, rewritten atomically after every measurement; a rerun with the same name
skips what is measured (resume), so a sweep runs in parts of a few minutes (`--contexts`, `--schedules`,
`--indexer-quant`, `--measure`, `--time-budget-s`); the model, the prefill chunk and the XLA compiler options
(`--xla-option`, for trying a compiler setting on the whole model) must match to resume. `--markdown JSON` prints
our numbers beside the paper's Table 1; `--plot PNG` draws the speedups against context.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import signal
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from indexcache_jax import profiling
from indexcache_jax.inference import cache as cache_lib
from indexcache_jax.inference import engine as engine_lib
from indexcache_jax.model.config import DSAConfig, glm47_flash_dsa_30b
from indexcache_jax.model.model import DSAModel, make_context, param_shapes
from indexcache_jax.model.moe import resolve_moe_impl
from indexcache_jax.model.params import layer_location, layer_specs, top_specs
from indexcache_jax.model.schedule import SEARCHED_PATTERNS, uniform_pattern

# ------------------------------------------------------------------------------------------------ the paper's numbers
# IndexCache (arXiv 2603.12201), Table 1: the 30B DSA model (47 layers) served by SGLang on 8 H100s (data-parallel
# attention: one request's attention on one GPU, the MoE over eight). IndexCache 1/4 is the searched pattern.
PAPER_CONTEXTS = (10000, 60000, 120000, 200000)
PAPER_PREFILL_S = {"full": (0.57, 3.38, 8.57, 19.5), "searched-1/4": (0.45, 2.59, 5.66, 10.7)}
PAPER_DECODE_TOK_S = {"full": (73.5, 67.0, 63.0, 58.0), "searched-1/4": (91.0, 89.5, 88.0, 86.0)}
# The indexer's share of full-DSA prefill time at PAPER_CONTEXTS (the paper's profile).
PAPER_INDEXER_SHARE = (0.27, 0.50, 0.68, 0.81)

FULL_KV_CONTEXT = 60000  # "decode at full KV cache": the largest batch that fits, at this context
SCHEDULES = ("full", "searched-1/2", "searched-1/4", "uniform-1/2", "uniform-1/4")
SCHEDULE_LABELS = {"full": "full DSA", "searched-1/2": "IndexCache 1/2 (searched)",
                   "searched-1/4": "IndexCache 1/4 (searched)", "uniform-1/2": "IndexCache 1/2 (uniform)",
                   "uniform-1/4": "IndexCache 1/4 (uniform)"}
INDEXER_QUANTS = ("fp8", "none")
MEASUREMENTS = ("prefill", "decode", "full_kv")
BLOCK_BYTES = 1 << 26  # largest block one generator step writes (64 MiB): bounds the generator's temporaries
SEARCHED_PRESET = "glm47_flash_dsa_30b"


# --------------------------------------------------------------------------------------------------- schedules
def schedule_pattern(schedule: str, num_layers: int) -> str:
    """The F/S pattern of `schedule` (one of `SCHEDULES`) for `num_layers` layers. The searched patterns are the
    paper's for the 47-layer model; a cut model (`--layers` < 47) takes their first `num_layers` layers."""
    if schedule == "full":
        return "F" * num_layers
    kind, keep = schedule.split("-", 1) if "-" in schedule else (schedule, "")
    if kind == "uniform" and keep in ("1/2", "1/4"):
        return uniform_pattern(num_layers, keep)
    if kind == "searched" and f"{SEARCHED_PRESET}/{keep}" in SEARCHED_PATTERNS and keep in ("1/2", "1/4"):
        pattern = SEARCHED_PATTERNS[f"{SEARCHED_PRESET}/{keep}"]
        if num_layers > len(pattern):
            raise ValueError(f"schedule {schedule!r} has a {len(pattern)}-layer pattern, the model {num_layers} layers")
        return pattern[:num_layers]
    raise ValueError(f"unknown schedule {schedule!r}: choose from {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------------- random weights on the device
def block_split(shape: Sequence[int], itemsize: int, block_bytes: int) -> tuple[int, int]:
    """(n_blocks, block_elements) with n_blocks * block_elements == prod(shape): contiguous row-major blocks made of
    whole trailing sub-arrays, each at most `block_bytes` (or one row of the last axis, if even that is larger)."""
    shape = tuple(int(s) for s in shape)
    k = 0
    while k < len(shape) and math.prod(shape[k:]) * itemsize > block_bytes:
        k += 1
    inner = math.prod(shape[k:])
    rows = math.prod(shape[:k])
    group = max(1, min(rows, block_bytes // (inner * itemsize)))
    while rows % group:
        group -= 1
    return rows // group, group * inner


@functools.lru_cache(maxsize=None)
def block_generator(stack: int, shape: tuple[int, ...], dtype: str, fill: str, scale: float,
                    block_bytes: int = BLOCK_BYTES) -> Callable:
    """A jitted `(key, layer_ids int32 [stack]) -> dtype [stack, *shape]` array made block by block on the device.

    Slice i along the stack axis is layer `layer_ids[i]`'s: block b of it is drawn from
    `fold_in(fold_in(key, layer_ids[i]), b)`, so a layer's values do not depend on where the stack puts it.
    `fill`: "normal" (`normal(dtype) * scale`, drawn in `dtype` itself, or in bf16 and cast for float8 dtypes),
    "positive" (`|normal| + scale`, float32 draws), "ones", "zeros". A `lax.fori_loop` writes each block in place,
    so the temporaries are one block's, never the leaf's, and never float32 for a bf16 leaf.
    """
    dt = jnp.dtype(dtype)
    n_blocks, block = block_split(shape, dt.itemsize, block_bytes)
    draw_dt = jnp.float32 if fill == "positive" else (jnp.bfloat16 if dt.itemsize == 1 else dt)

    def draw(key):
        x = jax.random.normal(key, (block,), draw_dt)
        x = jnp.abs(x) + jnp.asarray(scale, draw_dt) if fill == "positive" else x * jnp.asarray(scale, draw_dt)
        return x.astype(dt)

    @jax.jit
    def generate(key, layer_ids):
        if fill in ("ones", "zeros"):
            return jnp.full((stack,) + shape, 1 if fill == "ones" else 0, dt)

        def body(i, buf):
            slot, b = i // n_blocks, i % n_blocks
            values = draw(jax.random.fold_in(jax.random.fold_in(key, layer_ids[slot]), b))
            return jax.lax.dynamic_update_slice(buf, values[None, None], (slot, b, 0))

        buf = jax.lax.fori_loop(0, stack * n_blocks, body, jnp.zeros((stack, n_blocks, block), dt))
        return buf.reshape((stack,) + shape)

    return generate


def leaf_init(name: str) -> tuple[str, float]:
    """(fill, scale) of a param leaf as `init_params` initializes it: norm scales 1, biases 0, every weight
    normal with std 0.02 (`model.axes.normal_init`, the embedding and the LM head)."""
    if name == "scale" or name.endswith("_scale"):
        return "ones", 1.0
    if name.endswith("bias"):
        return "zeros", 0.0
    return "normal", 0.02


def _stack_layer_ids(cfg: DSAConfig) -> dict[tuple[str, str], np.ndarray]:
    """{(segment key, part): int32 layer ids shaped like that part's stacking dims}."""
    places: dict[tuple[str, str], dict[tuple[int, ...], int]] = {}
    for layer in range(cfg.num_layers):
        seg, part, index = layer_location(cfg, layer)
        places.setdefault((seg, part), {})[index] = layer
    out = {}
    for where, by_index in places.items():
        dims = tuple(max(i[d] for i in by_index) + 1 for d in range(len(next(iter(by_index)))))
        ids = np.zeros(dims, np.int32)
        for index, layer in by_index.items():
            ids[index] = layer
        out[where] = ids
    return out


def random_params(cfg: DSAConfig, seed: int = 0, *, dtype: Any = jnp.bfloat16, block_bytes: int = BLOCK_BYTES) -> dict:
    """Random params laid out for `cfg.pattern`, every leaf `dtype`, made on the device one leaf at a time
    (`block_generator`). Layer l's leaf `mlp/experts_down` is the same array under every pattern that holds it."""
    root = jax.random.key(seed)
    ids = _stack_layer_ids(cfg)
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))
    leaves = []
    for path, shape in flat[0]:
        names = [p.key for p in path]
        if names[0].startswith("segment_"):
            layer_ids = ids[(names[0], names[1])]
            leaf_name = "/".join(names[2:])
        else:
            layer_ids, leaf_name = np.zeros((), np.int32), "/".join(names)
        layer_shape = tuple(shape.shape[layer_ids.ndim:])
        fill, scale = leaf_init(names[-1])
        gen = block_generator(max(1, layer_ids.size), layer_shape, jnp.dtype(dtype).name, fill, scale, block_bytes)
        key = jax.random.fold_in(root, zlib.crc32(leaf_name.encode()) & 0x7FFFFFFF)
        leaf = gen(key, jnp.asarray(layer_ids.reshape(-1)))
        leaves.append(leaf.reshape(shape.shape))
    return jax.tree_util.tree_unflatten(flat[1], leaves)


def random_cache(cfg: DSAConfig, batch: int, slots: int, seed: int, *, block_bytes: int = BLOCK_BYTES) -> dict:
    """A bf16 decode cache (`inference.cache` layout) of `slots` per layer filled with random rows, made on the
    device block by block: normal rows, FP8 keys cast from bf16 draws, positive float32 key scales."""
    out = {}
    for i, (name, s) in enumerate(sorted(cache_lib.cache_shapes(cfg, batch, slots, jnp.bfloat16).items())):
        fill, scale = ("positive", 0.01) if name == "index_k_scale" else ("normal", 1.0)
        gen = block_generator(1, tuple(s.shape), jnp.dtype(s.dtype).name, fill, scale, block_bytes)
        out[name] = gen(jax.random.key(seed * 1000 + i), jnp.zeros((1,), jnp.int32))[0]
    return out


# ----------------------------------------------------------------------------------------------------- model FLOPs
def _causal_pairs(tokens: int, cap: int | None = None) -> int:
    """sum over t < tokens of min(t + 1, cap): causal (query, key) pairs, each query keeping at most `cap` keys."""
    if cap is None or tokens <= cap:
        return tokens * (tokens + 1) // 2
    return cap * (cap + 1) // 2 + (tokens - cap) * cap


def prefill_flops(cfg: DSAConfig, tokens: int) -> dict[str, float]:
    """Model FLOPs of one prefill of `tokens` tokens (batch 1), by term; 2 FLOPs per multiply-add, matmuls only
    (norms, RoPE, softmax, routing and top-k selection are left out), useful work only (no padding, no masked pairs,
    no unused experts). Per token and layer, with D hidden, H heads, r = kv_lora_rank, p = qk_rope_head_dim:
    - `mla_projections`: q_a (D x q_lora), q_b (q_lora x H(nope + p)), kv_a (D x (r + p)), the absorbed
      q_nope -> latent (H nope r) and latent -> v (H v r), o (H v x D);
    - `sparse_attention`: per attended key 2 H (r + p) for the scores and 2 H r for PV; query t attends
      min(t + 1, index_topk) keys (the real head count, no padding of heads);
    - F layers only: `indexer_projections` q_b (q_lora x Hi Di), k (D x Di), head weights (D x Hi); and
      `indexer_logits`, 2 Hi Di per causal (query, key) pair (t + 1 keys for query t);
    - `dense_mlp` (dense layers): 3 D x intermediate; MoE layers: `moe_router` D x E, `moe_routed` the useful
      `2 * tokens * top_k * 3 * D * moe_intermediate`, `moe_shared` 3 D x n_shared moe_intermediate;
    - `lm_head`: D x V on the last row only (the engine's prefill runs the head on each prompt's last token).
    Returns {term: FLOPs, "total": their sum}.
    """
    c, t = cfg, tokens
    d, h, r, p = c.hidden_size, c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim
    n_full = c.pattern.count("F")
    n_dense = c.mlp_layer_types.count("dense")
    n_moe = c.num_layers - n_dense
    mla = (d * c.q_lora_rank + c.q_lora_rank * h * (c.qk_nope_head_dim + p) + d * (r + p)
           + h * c.qk_nope_head_dim * r + h * c.v_head_dim * r + h * c.v_head_dim * d)
    hi, di = c.index_n_heads, c.index_head_dim
    terms = {
        "mla_projections": 2.0 * t * c.num_layers * mla,
        "sparse_attention": 2.0 * h * (2 * r + p) * c.num_layers * _causal_pairs(t, c.index_topk),
        "indexer_projections": 2.0 * t * n_full * (c.q_lora_rank * hi * di + d * di + d * hi),
        "indexer_logits": 2.0 * hi * di * n_full * _causal_pairs(t),
        "dense_mlp": 2.0 * t * n_dense * 3 * d * c.intermediate_size,
        "moe_router": 2.0 * t * n_moe * d * c.n_routed_experts,
        "moe_routed": 2.0 * t * n_moe * c.num_experts_per_tok * 3 * d * c.moe_intermediate_size,
        "moe_shared": 2.0 * t * n_moe * 3 * d * c.moe_intermediate_size * c.n_shared_experts,
        "lm_head": 2.0 * d * c.vocab_size,
    }
    terms["total"] = sum(terms.values())
    return terms


# ----------------------------------------------------------------------------------------------- the batch search
def largest_batch(fits: Callable[[int], bool], upper: int) -> int:
    """The largest batch b in [1, upper] with `fits(b)` for a predicate that holds up to some b and fails above
    (0 when even 1 does not fit); binary search, log2(upper) calls."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def decode_cache_bytes(cfg: DSAConfig, batch: int, slots: int) -> int:
    """Bytes of the bf16 decode cache for `batch` rows of `slots` key slots under `cfg.pattern`."""
    return batch * slots * cache_lib.cache_bytes_per_token(cfg, jnp.bfloat16)


def free_device_bytes(device) -> tuple[int | None, str | None]:
    """(bytes the allocator can still hand out, None) from `device.memory_stats()`, or (None, why not)."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None, f"{device.platform} device reports no memory_stats()"
    return int(stats["bytes_limit"] - stats["bytes_in_use"]), None


def peak_device_bytes(device) -> tuple[int | None, str | None]:
    """(the process's peak allocated bytes so far, None), or (None, why not)."""
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None, f"{device.platform} device reports no memory_stats()"
    return int(stats["peak_bytes_in_use"]), None


# --------------------------------------------------------------------------------------------------- measurements
@dataclasses.dataclass(frozen=True)
class Task:
    """One measurement of the sweep; `key` identifies it in the JSON (resume skips a key already there)."""

    kind: str  # one of MEASUREMENTS
    schedule: str
    indexer_quant: str
    context: int

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.schedule}|{self.indexer_quant}|{self.context}"


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """What a sweep's numbers depend on: a resumed sweep must have the same (else its parts are not comparable)."""

    layers: int
    preset_overrides: tuple[tuple[str, Any], ...]
    backend: str
    chunk: int
    decode_steps: int
    moe_impl: str
    seed: int
    xla_options: tuple[tuple[str, Any], ...] = ()  # compiler options of every measured program (`--xla-option`)

    def base_config(self) -> DSAConfig:
        """The bf16 model with every layer F; schedules and indexer numerics are applied per task."""
        overrides = dict(self.preset_overrides)
        overrides.setdefault("mlp_layer_types", ("dense",) + ("sparse",) * (self.layers - 1))
        return glm47_flash_dsa_30b(num_layers=self.layers, dtype="bfloat16", backend=self.backend, **overrides)

    def config(self, schedule: str, indexer_quant: str) -> DSAConfig:
        base = self.base_config()
        return base.with_pattern(schedule_pattern(schedule, base.num_layers)).replace(indexer_quant=indexer_quant)

    @property
    def compiler_options(self) -> dict:
        """`xla_options` as `Lowered.compile` takes them."""
        return dict(self.xla_options)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["preset_overrides"] = dict(self.preset_overrides)
        d["xla_options"] = self.compiler_options
        return d


def plan_tasks(schedules: Sequence[str], quants: Sequence[str], contexts: Sequence[int], kinds: Sequence[str],
               full_kv_context: int = FULL_KV_CONTEXT) -> list[Task]:
    """The sweep's measurements in run order: by schedule (one params tree at a time), indexer numerics, context;
    `full_kv` only at `full_kv_context` (when it is one of `contexts`)."""
    return [Task(kind, s, q, c) for s in schedules for q in quants for c in contexts for kind in MEASUREMENTS
            if kind in kinds and (kind != "full_kv" or c == full_kv_context)]


def _host_ms(fn: Callable[[], Any], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _gpu_profile(run: Callable[[], Any], reps: int, per: int, hlo_text: str) -> dict:
    """GPU time of `run` from the profiler (`profiling.device_time_ms`) divided by `per` (steps), with the kernel
    categories (kernels named by the profiler's records and by `hlo_text`, the compiled module `run` executes);
    {"gpu_ms": None, "gpu_error": ...} where the backend records no GPU kernels (CPU)."""
    try:
        dev = profiling.device_time_ms(run, [()], iters=1, reps=reps, hlo_text=hlo_text)
    except RuntimeError as e:
        return {"gpu_ms": None, "gpu_error": str(e)}
    kernels = {k: v / per for k, v in dev["kernels_ms"].items()}
    scopes = dev["kernel_scopes"]
    fine = profiling.categorize(kernels, scopes)
    return {"gpu_ms": dev["ms"] / per, "gpu_span_ms": dev["span_ms"] / per, "launches": dev["launches"] / per,
            "categories_ms": fine,
            "coarse_categories_ms": profiling.coarse_categories(fine), "indexer_share": profiling.indexer_share(fine),
            "top_kernels_ms": profiling.top_kernels(kernels, scopes),
            "materialised_slices": profiling.materialised_slices(hlo_text)}


def compile_prefill_chunk(cfg: DSAConfig, moe_impl: str, params: dict, cache: dict, tokens: jax.Array, start: int,
                          length: int, slots: int, compiler_options: dict | None = None):
    """The compiled forward of one batch-1 prefill chunk: tokens `[1, C]` at positions `start .. start + C - 1` of
    a `length`-token prompt, written into `cache` (`slots` per layer, donated) -> `(logits, cache)`. Compiled ahead
    (with the XLA `compiler_options`) so a profile can name its kernels from `.as_text()`."""
    c = tokens.shape[1]
    model = DSAModel(cfg, moe_impl)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, tokens):
        positions = start + jnp.arange(c, dtype=jnp.int32)[None]
        ctx = make_context(cfg, positions, jnp.full((1,), length, jnp.int32), jnp.full((1,), start, jnp.int32))
        logits, _, cache = model.apply({"params": params}, tokens, ctx, cache, slots, jnp.full((1, 1), c - 1, jnp.int32))
        return logits, cache

    return step.lower(params, cache, tokens).compile(compiler_options)


class Measurer:
    """Runs `Task`s on the default device, keeping one schedule's params resident (regenerated on a switch)."""

    def __init__(self, settings: SweepSettings, *, prefill_reps: int, decode_reps: int, profile_reps: int,
                 ceiling_n: int, kv_memory_bytes: int | None, kv_reserve_bytes: int, hlo_dir: str | None = None):
        self.s = settings
        self.hlo_dir = hlo_dir
        self.prefill_reps, self.decode_reps, self.profile_reps = prefill_reps, decode_reps, profile_reps
        self.ceiling_n = ceiling_n
        self.kv_memory_bytes, self.kv_reserve_bytes = kv_memory_bytes, kv_reserve_bytes
        self.device = jax.devices()[0]
        self._params_for: str | None = None
        self._params = None
        self.ceiling_tflops: float | None = None

    def params(self, cfg: DSAConfig, schedule: str) -> tuple[dict, float | None]:
        """The params of `schedule` (made now if another schedule's are resident) and the seconds making took."""
        if self._params_for == schedule:
            return self._params, None
        self._params = None  # free the old tree before making the new one
        gc.collect()  # a failed measurement's traceback can keep its frames (params, cache) alive in reference cycles
        t0 = time.perf_counter()
        self._params = jax.block_until_ready(random_params(cfg, self.s.seed))
        self._params_for = schedule
        return self._params, time.perf_counter() - t0

    def __call__(self, task: Task) -> dict:
        cfg = self.s.config(task.schedule, task.indexer_quant)
        params, params_s = self.params(cfg, task.schedule)
        out = {"pattern": cfg.pattern, "params_made_s": params_s}
        if task.kind == "prefill":
            out.update(self.prefill(cfg, params, task.context))
        elif task.kind == "decode":
            out.update(self.decode(cfg, params, 1, task.context))
        else:
            out.update(self.full_kv(cfg, params, task.context))
        out["peak_device_bytes"], out["peak_device_bytes_note"] = peak_device_bytes(self.device)
        return out

    def prefill(self, cfg: DSAConfig, params: dict, context: int) -> dict:
        chunk = self.s.chunk
        width = engine_lib.bucket(context, chunk)
        rng = np.random.default_rng(context)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :context] = rng.integers(0, cfg.vocab_size, context)
        tokens, lengths = jnp.asarray(tokens), jnp.full((1,), context, jnp.int32)
        settings = (jnp.float32(0), jnp.float32(1), jnp.int32(0))
        key = jax.random.key(0)
        cache = [cache_lib.init_cache(cfg, 1, width, jnp.bfloat16)]
        t0 = time.perf_counter()
        compiled = engine_lib._prefill.lower(params, cache[0], tokens, lengths, key, *settings, cfg=cfg,
                                             moe_impl=self.s.moe_impl, mesh=None,
                                             chunk=chunk).compile(self.s.compiler_options)
        compile_s = time.perf_counter() - t0

        def run():
            nxt, cache[0], _ = compiled(params, cache[0], tokens, lengths, key, *settings)
            return nxt

        times = _host_ms(run, self.prefill_reps)
        prefill_s = float(np.median(times)) / 1e3
        profile = self._profile_chunk(cfg, params, cache, tokens, context, width)
        cache[0] = None
        if self.ceiling_tflops is None:
            self.ceiling_tflops = profiling.matmul_ceiling_tflops(jnp.bfloat16, n=self.ceiling_n)
        flops = prefill_flops(cfg, context)
        n_chunks = width // min(chunk, width)
        out = {"prefill_s": prefill_s, "prefill_samples_s": [t / 1e3 for t in times], "compile_s": compile_s,
               "chunk": chunk, "padded_tokens": width, "model_flops": flops,
               "model_tflops_per_s": flops["total"] / prefill_s / 1e12,
               "matmul_ceiling_tflops": self.ceiling_tflops,
               "mfu": flops["total"] / prefill_s / (self.ceiling_tflops * 1e12)}
        out["middle_chunk"] = profile
        if profile.get("gpu_ms") is not None:
            out["prefill_gpu_estimate_s"] = profile["gpu_ms"] * n_chunks / 1e3
        return out

    def _profile_chunk(self, cfg, params, cache, tokens, context, width) -> dict:
        """GPU time by category of the prefill chunk in the middle of the prompt, on the cache the prefill filled
        (re-running a chunk rewrites the same rows)."""
        c = min(self.s.chunk, width)
        start = (width // c // 2) * c
        chunk_tokens = tokens[:, start:start + c]
        compiled = compile_prefill_chunk(cfg, self.s.moe_impl, params, cache[0], chunk_tokens, start, context, width,
                                         self.s.compiler_options)

        def run():
            out, cache[0] = compiled(params, cache[0], chunk_tokens)
            return out

        return {"start": start, "chunk": c, **_gpu_profile(run, self.profile_reps, 1, compiled.as_text())}

    def decode(self, cfg: DSAConfig, params: dict, batch: int, context: int) -> dict:
        """`decode_steps` steps of the on-device loop, every row at live length `context`, on random cache rows."""
        steps = self.s.decode_steps
        slots = engine_lib.bucket(context + steps + 1, self.s.chunk)
        cache = [random_cache(cfg, batch, slots, seed=batch)]
        rng = np.random.default_rng(batch)
        first = jnp.asarray(rng.integers(0, cfg.vocab_size, batch), jnp.int32)
        lengths = jnp.full((batch,), context, jnp.int32)
        caps = jnp.full((batch,), steps + 1, jnp.int32)  # the first token is given: `steps` model steps follow
        args = (jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(0), caps, jnp.zeros((0,), jnp.int32))
        t0 = time.perf_counter()
        compiled = engine_lib._decode_loop.lower(params, cache[0], first, lengths, *args, cfg=cfg,
                                                 moe_impl=self.s.moe_impl, mesh=None,
                                                 out_len=engine_lib._out_bucket(steps + 1)).compile(
                                                     self.s.compiler_options)
        compile_s = time.perf_counter() - t0
        hlo_text = compiled.as_text()
        if self.hlo_dir:
            os.makedirs(self.hlo_dir, exist_ok=True)
            with open(os.path.join(self.hlo_dir, f"decode_{cfg.pattern}_b{batch}_{slots}.hlo.txt"), "w") as f:
                f.write(hlo_text)

        def run():
            out, cache[0] = compiled(params, cache[0], first, lengths, *args)
            return out

        jax.block_until_ready(run())  # warm
        times = _host_ms(run, self.decode_reps)
        step_ms = float(np.median(times)) / steps
        out = {"batch": batch, "steps": steps, "slots": slots, "compile_s": compile_s,
               "cache_bytes": decode_cache_bytes(cfg, batch, slots), "step_host_ms": step_ms,
               "tok_s_per_row_host": 1e3 / step_ms, "tok_s_host": batch * 1e3 / step_ms,
               "profile": _gpu_profile(run, self.profile_reps, steps, hlo_text)}
        gpu = out["profile"]["gpu_ms"]
        if gpu is not None:
            out.update(step_gpu_ms=gpu, tok_s_per_row_gpu=1e3 / gpu, tok_s_gpu=batch * 1e3 / gpu)
        cache[0] = None
        return out

    def full_kv(self, cfg: DSAConfig, params: dict, context: int) -> dict:
        """Decode at the largest batch whose cache fits the free device memory less `kv_reserve_bytes` (or
        `kv_memory_bytes`, where given or where the device reports no memory)."""
        slots = engine_lib.bucket(context + self.s.decode_steps + 1, self.s.chunk)
        free, why = free_device_bytes(self.device)
        budget = self.kv_memory_bytes if self.kv_memory_bytes is not None else (
            None if free is None else free - self.kv_reserve_bytes)
        if budget is None:
            return {"batch": None, "error": f"free memory unknown ({why}); pass --kv-memory-gb"}
        per_row = decode_cache_bytes(cfg, 1, slots)
        batch = largest_batch(lambda b: decode_cache_bytes(cfg, b, slots) <= budget, max(1, budget // per_row + 1))
        if batch == 0:
            return {"batch": 0, "error": f"one row's cache ({per_row} bytes) exceeds the budget ({budget} bytes)"}
        out = self.decode(cfg, params, batch, context)
        out.update(free_device_bytes=free, kv_budget_bytes=budget, cache_bytes_per_row=per_row)
        return out


# -------------------------------------------------------------------------------------------------- the sweep file
class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: the sweep stops after writing what it has."""


def cache_savings(settings: SweepSettings, schedules: Sequence[str], quants: Sequence[str],
                  contexts: Sequence[int]) -> list[dict]:
    """Decode-cache bytes per token of each schedule and the bytes IndexCache saves against full DSA (same indexer
    numerics), per token and at each context."""
    rows = []
    for q in quants:
        full = cache_lib.cache_bytes_breakdown(settings.config("full", q))
        for s in schedules:
            b = cache_lib.cache_bytes_breakdown(settings.config(s, q))
            saved = full["total"] - b["total"]
            rows.append({"schedule": s, "indexer_quant": q, "bytes_per_token": b, "saved_bytes_per_token": saved,
                         "saved_bytes_at_context": {str(c): saved * c for c in contexts}})
    return rows


def estimate_s(task: Task, done: Sequence[dict], first_estimate_s: float) -> float:
    """Seconds `task` will take, from the measured ones: the same kind at the same context (the slowest), else
    the nearest smaller context's, whose timed part (its wall less making params and compiling, which do not grow
    with the context) is scaled by (ratio)^2 for prefill (the indexer is quadratic) or by the ratio for decode,
    else the nearest larger context's; `first_estimate_s` when nothing of its kind ran yet."""
    same = [e for e in done if e["kind"] == task.kind and "wall_s" in e]
    if not same:
        return first_estimate_s
    at = [e["wall_s"] for e in same if e["context"] == task.context]
    if at:
        return max(at)
    smaller = [e for e in same if e["context"] < task.context]
    if smaller:
        ref = max(smaller, key=lambda e: (e["context"], e["wall_s"]))
        fixed = min((ref.get("params_made_s") or 0.0) + (ref.get("compile_s") or 0.0), ref["wall_s"])
        growth = (task.context / ref["context"]) ** (2 if task.kind == "prefill" else 1)
        return fixed + (ref["wall_s"] - fixed) * growth
    return max(min(same, key=lambda e: e["context"])["wall_s"], first_estimate_s)


def load_sweep(path: str, settings: SweepSettings) -> dict | None:
    """The sweep file at `path` (None if absent); a ValueError if it was measured with other settings."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        sweep = json.load(f)
    # A sweep written before `xla_options` existed ran with none.
    if {"xla_options": {}, **sweep.get("settings", {})} != json.loads(json.dumps(settings.to_dict())):
        raise ValueError(f"{path} was measured with settings {sweep.get('settings')}, this run has "
                         f"{settings.to_dict()}: pass another --name, or the same settings to resume")
    return sweep


def run_sweep(path: str, settings: SweepSettings, tasks: Sequence[Task], measure: Callable[[Task], dict], *,
              part: dict, header: dict, time_budget_s: float | None = None, first_estimate_s: float = 120.0,
              retry_failed: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs the tasks not yet in the sweep file, rewriting it atomically after each one; returns the sweep.

    A task whose estimate (`estimate_s`) would overrun `time_budget_s` (seconds since this call) stops the part
    cleanly; a task that raises records its error (a later part retries it only with `retry_failed`).
    `Interrupted` (SIGTERM / SIGINT) and other exceptions propagate after the file is written whole.
    """
    t_start = time.perf_counter()
    sweep = load_sweep(path, settings) or {**header, "settings": settings.to_dict(), "parts": [],
                                           "measurements": []}
    sweep.update({k: v for k, v in header.items() if k not in sweep})
    part = {**part, "started_utc": _utc_now(), "finished_utc": None, "stopped": None, "measured": []}
    sweep["parts"].append(part)
    entries = sweep["measurements"]

    def save():
        profiling.write_json_atomic(path, sweep)

    try:
        for task in tasks:
            old = next((e for e in entries if e["key"] == task.key), None)
            if old is not None and ("error" not in old or not retry_failed):
                continue
            elapsed = time.perf_counter() - t_start
            guess = estimate_s(task, [e for e in entries if "error" not in e], first_estimate_s)
            if time_budget_s is not None and elapsed + guess > time_budget_s:
                part["stopped"] = (f"time budget: {task.key} needs ~{guess:.0f} s, {time_budget_s - elapsed:.0f} s "
                                   "left")
                log(f"stopping: {part['stopped']}")
                break
            log(f"measuring {task.key} (estimate {guess:.0f} s)")
            t0 = time.perf_counter()
            try:
                result = measure(task)
            except (Interrupted, KeyboardInterrupt):
                raise
            except Exception as e:  # a failed measurement (e.g. out of memory) is a result of the sweep
                result = {"error": f"{type(e).__name__}: {e}"}
            entry = {"key": task.key, **dataclasses.asdict(task), **result, "wall_s": time.perf_counter() - t0,
                     "part": len(sweep["parts"]) - 1}
            if old is not None:
                entries.remove(old)
            entries.append(entry)
            part["measured"].append(task.key)
            save()
            log(summarize(entry))
    except (Interrupted, KeyboardInterrupt) as e:
        part["stopped"] = f"interrupted ({type(e).__name__})"
        raise
    finally:
        part["finished_utc"] = _utc_now()
        save()
    return sweep


def summarize(e: dict) -> str:
    """One log line for a sweep entry."""
    head = f"{e['kind']:8s} {e['schedule']:13s} {e['indexer_quant']:4s} {e['context']:>7d}"
    if "error" in e:
        return f"{head}  error: {e['error']}"
    if e["kind"] == "prefill":
        share = e["middle_chunk"].get("indexer_share")
        return (f"{head}  prefill {e['prefill_s']:.3f} s, MFU {e['mfu']:.1%}, indexer share "
                + ("n/a" if share is None else f"{share:.0%}") + f" ({e['wall_s']:.0f} s wall)")
    return (f"{head}  batch {e['batch']}: {e['tok_s_host']:.1f} tok/s host"
            + (f", {e['tok_s_gpu']:.1f} GPU" if "tok_s_gpu" in e else "") + f" ({e['wall_s']:.0f} s wall)")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- table and plot
def _entry(sweep: dict, kind: str, schedule: str, quant: str, context: int) -> dict | None:
    for e in sweep["measurements"]:
        if (e["kind"], e["schedule"], e["indexer_quant"], e["context"]) == (kind, schedule, quant, context) \
                and "error" not in e:
            return e
    return None


def _decode_tok_s(e: dict | None) -> float | None:
    """tok/s per row: the GPU time where profiled, else the host clock (`_clock` says which)."""
    if e is None:
        return None
    return e.get("tok_s_per_row_gpu", e.get("tok_s_per_row_host"))


def _clock(e: dict | None) -> str | None:
    return None if e is None else ("GPU" if "tok_s_per_row_gpu" in e else "host")


def table_rows(sweep: dict) -> list[dict]:
    """One row per (context, schedule, indexer numerics) with a prefill or decode entry: ours, the speedup over
    full DSA with the same numerics, and the paper's Table 1 numbers where it has that schedule and context."""
    keys = sorted({(e["context"], e["indexer_quant"], e["schedule"]) for e in sweep["measurements"]
                   if e["kind"] in ("prefill", "decode") and "error" not in e},
                  key=lambda k: (k[0], k[1], SCHEDULES.index(k[2])))
    rows = []
    for context, quant, schedule in keys:
        pre = _entry(sweep, "prefill", schedule, quant, context)
        dec = _entry(sweep, "decode", schedule, quant, context)
        full_pre = _entry(sweep, "prefill", "full", quant, context)
        full_dec = _decode_tok_s(_entry(sweep, "decode", "full", quant, context))
        i = PAPER_CONTEXTS.index(context) if context in PAPER_CONTEXTS else None
        paper_pre = PAPER_PREFILL_S.get(schedule, (None,) * 4)[i] if i is not None else None
        paper_dec = PAPER_DECODE_TOK_S.get(schedule, (None,) * 4)[i] if i is not None else None
        tok_s = _decode_tok_s(dec)
        rows.append({
            "context": context, "schedule": schedule, "indexer_quant": quant,
            "prefill_s": pre and pre["prefill_s"],
            "prefill_speedup": pre and full_pre and full_pre["prefill_s"] / pre["prefill_s"],
            "paper_prefill_s": paper_pre,
            "paper_prefill_speedup": paper_pre and PAPER_PREFILL_S["full"][i] / paper_pre,
            "decode_tok_s": tok_s, "decode_clock": _clock(dec),
            "decode_speedup": tok_s and full_dec and tok_s / full_dec,
            "paper_decode_tok_s": paper_dec,
            "paper_decode_speedup": paper_dec and paper_dec / PAPER_DECODE_TOK_S["full"][i],
            "mfu": pre and pre["mfu"],
            "indexer_share": pre and pre["middle_chunk"].get("indexer_share"),
            "paper_indexer_share": PAPER_INDEXER_SHARE[i] if i is not None and schedule == "full" else None,
        })
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown_table(sweep: dict) -> str:
    """A BENCHMARKS.md table of the sweep beside the paper's Table 1 (SGLang, 8 H100s), and the full-KV rows."""
    env = sweep["parts"][0]["environment"] if sweep.get("parts") else {}
    s = sweep["settings"]
    lines = [f"Device: {env.get('device', '?')} ({env.get('backend', '?')}), jax {env.get('jax', '?')}; "
             f"{s['layers']} layers, backend {s['backend']}, MoE {s['moe_impl']}, chunk {s['chunk']}"
             + (f", preset overrides {s['preset_overrides']}" if s["preset_overrides"] else "")
             + ". Paper: SGLang on 8 H100s. Decode tok/s per row by GPU time, or the host clock where marked.",
             "",
             "| context | schedule | indexer | prefill s | paper | speedup | paper | decode tok/s | paper | speedup "
             "| paper | prefill MFU | indexer share | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table_rows(sweep):
        lines.append(
            f"| {r['context']} | {SCHEDULE_LABELS[r['schedule']]} | {'FP8' if r['indexer_quant'] == 'fp8' else 'bf16'} "
            f"| {_fmt(r['prefill_s'], '.3f')} | {_fmt(r['paper_prefill_s'], '.2f')} "
            f"| {_fmt(r['prefill_speedup'], '.2f')}{'x' if r['prefill_speedup'] else ''} "
            f"| {_fmt(r['paper_prefill_speedup'], '.2f')}{'x' if r['paper_prefill_speedup'] else ''} "
            f"| {_fmt(r['decode_tok_s'], '.1f')}{' (host)' if r['decode_clock'] == 'host' else ''} "
            f"| {_fmt(r['paper_decode_tok_s'], '.1f')} "
            f"| {_fmt(r['decode_speedup'], '.2f')}{'x' if r['decode_speedup'] else ''} "
            f"| {_fmt(r['paper_decode_speedup'], '.2f')}{'x' if r['paper_decode_speedup'] else ''} "
            f"| {_fmt(r['mfu'], '.1%')} | {_fmt(r['indexer_share'], '.0%')} | {_fmt(r['paper_indexer_share'], '.0%')} |")
    full_kv = [e for e in sweep["measurements"] if e["kind"] == "full_kv" and "error" not in e]
    if full_kv:
        lines += ["", "| decode at full KV cache | indexer | context | batch | tok/s (all rows) |", "|---|---|---|---|---|"]
        for e in full_kv:
            lines.append(f"| {SCHEDULE_LABELS[e['schedule']]} | {e['indexer_quant']} | {e['context']} | {e['batch']} "
                         f"| {e.get('tok_s_gpu', e['tok_s_host']):.1f}{'' if 'tok_s_gpu' in e else ' (host)'} |")
    return "\n".join(lines)


def plot_speedups(sweeps: dict[str, dict], path: str) -> str:
    """Prefill and decode speedup over full DSA (same indexer numerics) against context, one line per sweep,
    schedule and numerics, the paper's IndexCache 1/4 dashed; PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, what, paper in ((axes[0], "prefill", "paper_prefill_speedup"), (axes[1], "decode", "paper_decode_speedup")):
        paper_x, paper_y = [], []
        for name, sweep in sweeps.items():
            rows = table_rows(sweep)
            device = sweep["parts"][0]["environment"]["device"] if sweep.get("parts") else "?"
            for schedule in SCHEDULES[1:]:
                for q in INDEXER_QUANTS:
                    pts = [(r["context"], r[f"{what}_speedup"]) for r in rows
                           if r["schedule"] == schedule and r["indexer_quant"] == q and r[f"{what}_speedup"]]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{name} ({device}): {SCHEDULE_LABELS[schedule]}, {q}")
            if not paper_x:
                paper_x, paper_y = list(PAPER_CONTEXTS), [
                    (PAPER_PREFILL_S["full"][i] / PAPER_PREFILL_S["searched-1/4"][i]) if what == "prefill" else
                    (PAPER_DECODE_TOK_S["searched-1/4"][i] / PAPER_DECODE_TOK_S["full"][i])
                    for i in range(len(PAPER_CONTEXTS))]
        ax.plot(paper_x, paper_y, "k--", marker="s", label="paper: IndexCache 1/4 (SGLang, 8 H100s)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(f"{what} speedup over full DSA")
        ax.set_title(what)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------- CLI
def _csv(kind: Callable[[str], Any], choices: Sequence[Any] | None = None, what: str = "value"):
    def parse(text: str) -> tuple:
        try:
            items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad {what} list {text!r}") from None
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad)) or '(none given)'}: "
                                             f"choose from {', '.join(map(str, choices or ()))}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="indexcache-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default=None, help="sweep name: the JSON is <results dir>/<name>.json "
                    "(default: e2e_<device kind>)")
    ap.add_argument("--results-dir", default=None, help="default: $BENCH_RESULTS_DIR or benchmarks/results")
    ap.add_argument("--contexts", type=_csv(int, what="context"), default=PAPER_CONTEXTS,
                    help="comma list of prompt lengths (default: 10000,60000,120000,200000)")
    ap.add_argument("--schedules", type=_csv(str, SCHEDULES, "schedule"), default=SCHEDULES,
                    help=f"comma list of {', '.join(SCHEDULES)} (default: all)")
    ap.add_argument("--indexer-quant", type=_csv(str, INDEXER_QUANTS, "indexer numerics"), default=INDEXER_QUANTS,
                    help="comma list of fp8, none (default: both)")
    ap.add_argument("--measure", type=_csv(str, MEASUREMENTS, "measurement"), default=MEASUREMENTS,
                    help=f"comma list of {', '.join(MEASUREMENTS)} (default: all; full_kv runs at {FULL_KV_CONTEXT})")
    ap.add_argument("--full-kv-context", type=int, default=FULL_KV_CONTEXT,
                    help="context of the full-KV-cache decode (it runs when this is one of --contexts)")
    ap.add_argument("--layers", type=int, default=47)
    ap.add_argument("--preset-overrides", default="{}",
                    help="JSON object of DSAConfig fields over the glm47_flash_dsa_30b preset (for tests)")
    ap.add_argument("--backend", default="pallas", choices=("pallas", "xla", "auto"))
    ap.add_argument("--moe-impl", default=None, help="engine moe_impl (default: the engine's for this platform)")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill query chunk (a power of two)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill-reps", type=int, default=1, help="timed prefills after compiling (median)")
    ap.add_argument("--decode-reps", type=int, default=3, help="timed decode loops after a warm one (median)")
    ap.add_argument("--profile-reps", type=int, default=1, help="profiled runs per measurement (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ceiling-n", type=int, default=8192, help="size of the n^3 bf16 matmul ceiling")
    ap.add_argument("--kv-memory-gb", type=float, default=None,
                    help="cache budget of the full-KV batch (default: free device memory less --kv-reserve-gb)")
    ap.add_argument("--kv-reserve-gb", type=float, default=8.0,
                    help="device memory kept free for the full-KV decode's activations and workspaces")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="stop before a measurement whose estimate would overrun this many seconds")
    ap.add_argument("--hlo-dir", default=None,
                    help="write each decode loop's compiled HLO text here (it names what each kernel runs)")
    ap.add_argument("--first-estimate-s", type=float, default=120.0,
                    help="time assumed for a measurement of a kind not yet measured")
    ap.add_argument("--retry-failed", action="store_true", help="rerun measurements that recorded an error")
    ap.add_argument("--compilation-cache", default=None, help="JAX persistent compilation cache directory")
    ap.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA compiler option for every measured program (repeatable), e.g. "
                         "xla_gpu_enable_dot_strength_reduction=false; part of the sweep's settings")
    ap.add_argument("--markdown", metavar="JSON", default=None,
                    help="print the table of a sweep JSON beside the paper's and exit (no measuring)")
    ap.add_argument("--plot", metavar="PNG", default=None, help="write the speedup-vs-context plot")
    return ap


def settings_from_args(args: argparse.Namespace, moe_impl: str) -> SweepSettings:
    """Checks the model-shaping arguments (a ValueError naming the problem) and returns the sweep's settings."""
    try:
        overrides = json.loads(args.preset_overrides)
    except json.JSONDecodeError as e:
        raise ValueError(f"--preset-overrides is not JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise ValueError("--preset-overrides must be a JSON object of DSAConfig fields")
    for k, v in overrides.items():
        if isinstance(v, list):
            overrides[k] = tuple(v)
    if args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    if args.chunk < 1 or args.chunk & (args.chunk - 1):
        raise ValueError(f"--chunk must be a power of two, got {args.chunk}")
    if args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {args.decode_steps}")
    settings = SweepSettings(args.layers, tuple(sorted(overrides.items())), args.backend, args.chunk,
                             args.decode_steps, moe_impl, args.seed,
                             tuple(sorted(profiling.parse_xla_options(args.xla_option).items())))
    base = settings.base_config()
    for s in args.schedules:
        settings.config(s, "none")
    for c in args.contexts:
        if c < 1 or c + args.decode_steps + 1 > base.max_position_embeddings:
            raise ValueError(f"context {c} (+ {args.decode_steps + 1} decode tokens) is outside [1, "
                             f"max_position_embeddings = {base.max_position_embeddings}]")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            sweep = json.load(f)
        print(markdown_table(sweep))
        if args.plot:
            print(f"wrote {plot_speedups({os.path.basename(args.markdown)[:-5]: sweep}, args.plot)}")
        return 0
    try:
        settings = settings_from_args(args, resolve_moe_impl(args.moe_impl))
    except ValueError as e:
        ap.error(str(e))
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    env = profiling.environment()
    name = args.name or "e2e_" + "".join(ch if ch.isalnum() else "_" for ch in env["device"]).lower()
    path = os.path.join(args.results_dir or profiling.results_dir(), f"{name}.json")
    try:
        load_sweep(path, settings)
    except ValueError as e:
        ap.error(str(e))
    measure = Measurer(settings, prefill_reps=args.prefill_reps, decode_reps=args.decode_reps,
                       profile_reps=args.profile_reps, ceiling_n=args.ceiling_n,
                       kv_memory_bytes=None if args.kv_memory_gb is None else int(args.kv_memory_gb * 2**30),
                       kv_reserve_bytes=int(args.kv_reserve_gb * 2**30), hlo_dir=args.hlo_dir)
    tasks = plan_tasks(args.schedules, args.indexer_quant, args.contexts, args.measure, args.full_kv_context)
    header = {"model": settings.base_config().to_dict(),
              "paper": {"contexts": PAPER_CONTEXTS, "prefill_s": PAPER_PREFILL_S, "decode_tok_s": PAPER_DECODE_TOK_S,
                        "indexer_share": PAPER_INDEXER_SHARE, "source": "arXiv 2603.12201 Table 1, SGLang, 8 H100s"}}
    part = {"argv": list(sys.argv[1:] if argv is None else argv), "environment": env,
            "cache_savings": cache_savings(settings, args.schedules, args.indexer_quant, args.contexts)}

    def stop(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"devices: {jax.devices()}; writing {path}", flush=True)
    try:
        run_sweep(path, settings, tasks, measure, part=part, header=header, time_budget_s=args.time_budget_s,
                  first_estimate_s=args.first_estimate_s, retry_failed=args.retry_failed,
                  log=lambda m: print(m, flush=True))
    except Interrupted as e:
        print(f"interrupted by {e}: {path} holds every finished measurement", flush=True)
        return 130
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    with open(path) as f:
        sweep = json.load(f)
    print(markdown_table(sweep))
    if args.plot:
        print(f"wrote {plot_speedups({name: sweep}, args.plot)}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
