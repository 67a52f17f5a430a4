"""Grouped (per-expert) matrix products for a routed MoE: the row plan, a Hopper kernel and XLA references.

A MoE layer with N tokens, top-k routing over E experts, hidden D and expert width I runs
`y[n] = sum_j w[n, j] * down[e](silu(x[n] @ gate[e]) * (x[n] @ up[e]))` with `e = ids[n, j]`.

The row plan (`plan_rows`) sorts the N*k (token, expert) pairs by expert into a *padded* layout: each expert's rows
start on a multiple of `block_m` and fill whole tiles of `block_m` rows, so a tile holds one expert's rows only.
Tiles are numbered in expert order; `tile_expert[t]` names tile t's expert and the first `num_tiles` tiles are live.
A static bound on the number of tiles keeps the shapes static:
`max_tiles = (P + min(E, P) * (block_m - 1)) // block_m` for P = N*k pairs (every non-empty expert wastes at most
`block_m - 1` rows). Experts that receive no token get no tile, so their weights are never read: with few tokens
the products read only the routed experts' weights (the decode case) and with many they are full tiles (prefill).

- `grouped_matmul(lhs [R, K], rhs [E, K, N], plan)` -> `[R, N]`, row tile t times `rhs[tile_expert[t]]`.
- `grouped_swiglu(lhs, gate, up, plan)` -> `silu(lhs @ gate[e]) * (lhs @ up[e])`, both products and the SiLU*mul
  in one kernel (the gate and up accumulators share each lhs tile load).
- `moe_experts(x, ids, weights, gate, up, down, impl=...)`: the routed part of the layer, end to end.

Rows of the padded layout that no pair fills (and every row past the live tiles) hold unspecified values; the
combine step reads only the pairs' rows.

`impl` of the grouped products: "kernel" (Pallas Mosaic GPU, Hopper: warp-specialised TMA pipeline, two
compute warpgroups issuing wgmma, a persistent grid that visits live tiles only), "xla_ragged" (`lax.ragged_dot`
over the padded groups: the reference, and the path on CPU / in interpret mode), "xla_gather" (gathers each tile's
expert weights and runs one batched product: reads only the routed experts, for a handful of tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._platform import num_sms, resolve_interpret

Array = jax.Array

IMPLS = ("kernel", "xla_ragged", "xla_gather")


class RowPlan(NamedTuple):
    """Where each (token, expert) pair goes in the padded, expert-sorted row layout (see the module docstring).

    pair_row: int32 [N, k], the padded row of pair (n, j).
    row_token: int32 [R], the token each padded row reads (0 for rows no pair fills); R = max_tiles * block_m.
    tile_expert: int32 [max_tiles], each tile's expert (tiles past `num_tiles` repeat the last live tile's expert).
    num_tiles: int32 [], live tiles.
    padded_sizes: int32 [E], rows of each expert in the padded layout (a multiple of block_m).
    """

    pair_row: Array
    row_token: Array
    tile_expert: Array
    num_tiles: Array
    padded_sizes: Array


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static bound on the live tiles of a plan: each non-empty expert pads at most `block_m - 1` rows."""
    return max(1, (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)


# Up to this many (pair, expert) cells, the plan ranks pairs with a one-hot running count (a few fused kernels)
# instead of a sort: decode-sized batches spend less time launching the plan's small kernels.
ONE_HOT_CELLS = 1 << 20


def plan_rows(ids: Array, num_experts: int, block_m: int) -> RowPlan:
    """ids int32 [N, k] -> the padded row plan. Pure XLA. Pairs of one expert keep their token-major order (a
    stable sort by expert). An id equal to `num_experts` marks a pair with no expert (expert parallelism's empty
    slots): it gets no row, and its `pair_row` is R, one past the last row."""
    if ids.ndim != 2:
        raise ValueError(f"ids must be [N, k], got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    n, k = ids.shape
    pairs = n * k
    tiles = max_tiles(pairs, num_experts, block_m)
    rows = tiles * block_m
    flat = ids.reshape(-1).astype(jnp.int32)
    valid = flat < num_experts
    if pairs * num_experts <= ONE_HOT_CELLS:
        onehot = (flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32)[None]).astype(jnp.int32)
        sizes = onehot.sum(0)
        rank = (jnp.cumsum(onehot, axis=0) * onehot).sum(1) - 1  # earlier pairs of the same expert
    else:
        sizes_all = jnp.bincount(flat, length=num_experts + 1).astype(jnp.int32)
        sizes = sizes_all[:num_experts]
        order = jnp.argsort(flat, stable=True)
        first_sorted = (jnp.cumsum(sizes_all) - sizes_all).astype(jnp.int32)
        rank_sorted = jnp.arange(pairs, dtype=jnp.int32) - first_sorted[flat[order]]
        rank = jnp.zeros((pairs,), jnp.int32).at[order].set(rank_sorted)
    tiles_per = (sizes + block_m - 1) // block_m
    tile_end = jnp.cumsum(tiles_per).astype(jnp.int32)
    tile_start = (tile_end - tiles_per)[jnp.minimum(flat, num_experts - 1)]
    pair_row = jnp.where(valid, tile_start * block_m + rank, rows)
    token = jnp.arange(pairs, dtype=jnp.int32) // k
    row_token = jnp.zeros((rows,), jnp.int32).at[pair_row].set(token, mode="drop")
    num_tiles = tile_end[-1]
    t = jnp.clip(jnp.arange(tiles, dtype=jnp.int32), 0, jnp.maximum(num_tiles - 1, 0))
    tile_expert = jnp.minimum((t[:, None] >= tile_end[None, :]).sum(1), num_experts - 1).astype(jnp.int32)
    return RowPlan(pair_row.reshape(n, k), row_token, tile_expert, num_tiles, tiles_per * block_m)


# ----------------------------------------------------------------------------------------------- XLA paths
def _xla_ragged(lhs: Array, rhs: Array, plan: RowPlan) -> Array:
    """`lax.ragged_dot` over the padded groups (rows past the live tiles come out zero)."""
    return lax.ragged_dot(lhs, rhs, plan.padded_sizes, preferred_element_type=jnp.float32)


def _xla_gather(lhs: Array, rhs: Array, plan: RowPlan) -> Array:
    """Gathers each tile's expert weights and runs one batched product: reads the routed experts only."""
    tiles = plan.tile_expert.shape[0]
    out = jnp.einsum("tmk,tkn->tmn", lhs.reshape(tiles, -1, lhs.shape[1]), rhs[plan.tile_expert],
                     preferred_element_type=jnp.float32)
    return out.reshape(lhs.shape[0], rhs.shape[2])


def _silu_mul(g: Array, u: Array) -> Array:
    return g * u / (1.0 + jnp.exp(-g))


# ------------------------------------------------------------------------------------------- Hopper kernel
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shapes of the Hopper kernel. A CTA computes `block_m x (2 tile_n)` outputs (each of its two compute
    warpgroups `block_m x tile_n`; the fused SwiGLU keeps a gate and an up accumulator of that size each), stepping
    over K in `tile_k` slices through a `max_concurrent_steps`-deep TMA pipeline fed by a third warpgroup."""

    block_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    max_concurrent_steps: int = 4
    epi_tile_n: int = 64


PREFILL_CONFIG = KernelConfig()
PREFILL_SWIGLU_CONFIG = KernelConfig(tile_n=64)
# Decode: 64-row tiles, one per routed expert while tokens are few (the configs of the H100 run in BENCHMARKS.md).
DECODE_CONFIG = KernelConfig(block_m=64)
DECODE_SWIGLU_CONFIG = KernelConfig(block_m=64, tile_n=64)


def _tiled(itemsize: int, minor_bytes: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(minor_bytes * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


@functools.partial(jax.jit, static_argnames=("config",))
def grouped_kernel(lhs: Array, weights: tuple[Array, ...], tile_info: Array, *, config: KernelConfig) -> Array:
    """The Hopper kernel. lhs [R, K] (R = tiles * block_m), weights: (rhs,) or (gate, up), each [E, K, N];
    tile_info int32 [tiles + 1]: each tile's expert, then the number of live tiles.
    Returns [R, N] in lhs's dtype: `lhs_tile @ rhs[e]`, or `silu(lhs_tile @ gate[e]) * (lhs_tile @ up[e])`
    with float32 accumulation; rows of tiles past the live ones are not written."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, k = lhs.shape
    _, k2, n = weights[0].shape
    bm, tn, tk = config.block_m, config.tile_n, config.tile_k
    cta_n = 2 * tn
    if k2 != k or rows % bm or k % tk or n % cta_n or tn % config.epi_tile_n or bm % 64:
        raise ValueError(f"grouped_kernel: shapes lhs {lhs.shape}, rhs {weights[0].shape} do not fit {config}")
    fused = len(weights) == 2
    dtype = lhs.dtype
    itemsize = jnp.dtype(dtype).itemsize
    in_transforms = _tiled(itemsize, tk * itemsize)
    epi_n = config.epi_tile_n
    out_transforms = _tiled(itemsize, epi_n * itemsize)
    n_iters = n // cta_n
    k_iters = k // tk
    epi_m = 64

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            # delay_release=1: a step's buffers are refilled only after the next step's products were issued,
            # so one step of wgmma stays in flight behind the copies.
            in_specs=[plgpu.BlockSpec((bm, tk), lambda i: (0, i), transforms=in_transforms, delay_release=1)]
            + [plgpu.BlockSpec((tk, cta_n), lambda i: (i, 0), transforms=in_transforms, delay_release=1)]
            * len(weights),
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
        )

    def body(info_ref, lhs_ref, *refs):
        w_refs, out_ref = refs[:-1], refs[-1]
        ignore = lambda *_, **__: None  # allocations do not depend on the bodies
        allocs = pipeline(ignore, ignore).get_allocations(lhs_ref.at[pl.ds(0, bm)],
                                                            *(w.at[0, :, pl.ds(0, cta_n)] for w in w_refs))

        @functools.partial(
            pl.run_scoped,
            allocs=allocs,
            out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), dtype, transforms=out_transforms),
            collective_axes="wg",
        )
        def scope(allocs, out_smem):
            wg = lax.axis_index("wg")
            live = info_ref[info_ref.shape[0] - 1]

            @plgpu.nd_loop((live * n_iters,), collective_axes="sm")
            def tile_loop(loop_info):
                (lin,) = loop_info.index
                t = lin // n_iters
                ni = lin % n_iters
                expert = info_ref[t]
                row_slice = pl.ds(t * bm, bm)
                col_slice = pl.ds(ni * cta_n, cta_n)
                wg_cols = pl.ds(wg * tn, tn)

                def compute_context(run):
                    def epilogue(accs):
                        if fused:
                            g, u = accs[0][...], accs[1][...]
                            out = _silu_mul(g, u).astype(dtype)
                        else:
                            out = accs[0][...].astype(dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for mi in range(bm // epi_m):
                            for nj in range(tn // epi_n):
                                slot = (mi * (tn // epi_n) + nj) % 2
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                out_smem[wg, slot] = out[mi * epi_m:(mi + 1) * epi_m, nj * epi_n:(nj + 1) * epi_n]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot],
                                    out_ref.at[pl.ds(t * bm + mi * epi_m, epi_m),
                                               pl.ds(ni * cta_n + wg * tn + nj * epi_n, epi_n)])

                    def with_accs(*accs):
                        epilogue(run(accs))

                    pl.run_scoped(with_accs, *([plgpu.ACC((bm, tn), jnp.float32)] * len(weights)))

                def mma(_, lhs_smem, *rest):
                    w_smem, accs = rest[:-1], rest[-1]
                    for acc, w in zip(accs, w_smem):
                        plgpu.wgmma(acc, lhs_smem, w.at[:, wg_cols])
                    plgpu.wgmma_wait(len(w_smem))  # this step's products may run on; the previous step's are done
                    return accs

                pipeline(mma, compute_context)(
                    lhs_ref.at[row_slice], *(w.at[expert, :, col_slice] for w in w_refs), allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((rows, n), dtype),
        grid=(num_sms(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(tile_info, lhs, *weights)


def _kernel_config(fused: bool, block_m: int) -> KernelConfig:
    if block_m == 64:
        return DECODE_SWIGLU_CONFIG if fused else DECODE_CONFIG
    if block_m == 128:
        return PREFILL_SWIGLU_CONFIG if fused else PREFILL_CONFIG
    raise ValueError(f"the Hopper kernel runs block_m 64 or 128, got {block_m}")


def kernel_supports(lhs_dtype, k: int, n: int, block_m: int, fused: bool) -> bool:
    """Whether `grouped_kernel` takes these shapes (16-bit floats, K and N whole tiles)."""
    if jnp.dtype(lhs_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or block_m not in (64, 128):
        return False
    cfg = _kernel_config(fused, block_m)
    return k % cfg.tile_k == 0 and n % (2 * cfg.tile_n) == 0


def _tile_info(plan: RowPlan) -> Array:
    return jnp.concatenate([plan.tile_expert, plan.num_tiles[None]]).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ public API
def _check(lhs: Array, rhs: Array, plan: RowPlan, name: str):
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"{name}: lhs must be [R, K] and rhs [E, K, N], got {lhs.shape}, {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"{name}: contraction sizes differ, lhs {lhs.shape} vs rhs {rhs.shape}")
    tiles = plan.tile_expert.shape[0]
    if lhs.shape[0] != plan.row_token.shape[0] or lhs.shape[0] % tiles:
        raise ValueError(f"{name}: lhs has {lhs.shape[0]} rows, the plan {plan.row_token.shape[0]}")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"{name}: lhs {lhs.dtype} and rhs {rhs.dtype} differ")


def _resolve_impl(impl: str | None, interpret: bool | None) -> str:
    if impl is None:
        return "xla_ragged" if resolve_interpret(interpret) else "kernel"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def grouped_matmul(lhs: Array, rhs: Array, plan: RowPlan, *, impl: str | None = None,
                   interpret: bool | None = None) -> Array:
    """lhs [R, K] in the plan's padded layout, rhs [E, K, N] -> [R, N] in lhs's dtype (float32 accumulation).
    `impl=None`: the Hopper kernel on a GPU, `lax.ragged_dot` elsewhere (and in interpret mode)."""
    _check(lhs, rhs, plan, "grouped_matmul")
    impl = _resolve_impl(impl, interpret)
    block_m = lhs.shape[0] // plan.tile_expert.shape[0]
    if impl == "kernel":
        return grouped_kernel(lhs, (rhs,), _tile_info(plan), config=_kernel_config(False, block_m))
    out = _xla_ragged(lhs, rhs, plan) if impl == "xla_ragged" else _xla_gather(lhs, rhs, plan)
    return out.astype(lhs.dtype)


def grouped_swiglu(lhs: Array, gate: Array, up: Array, plan: RowPlan, *, impl: str | None = None,
                   interpret: bool | None = None) -> Array:
    """`silu(lhs @ gate[e]) * (lhs @ up[e])` per tile: lhs [R, D], gate and up [E, D, I] -> [R, I] in lhs's dtype,
    products accumulated and activated in float32."""
    _check(lhs, gate, plan, "grouped_swiglu")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"grouped_swiglu: gate {gate.shape} {gate.dtype} and up {up.shape} {up.dtype} differ")
    impl = _resolve_impl(impl, interpret)
    block_m = lhs.shape[0] // plan.tile_expert.shape[0]
    if impl == "kernel":
        return grouped_kernel(lhs, (gate, up), _tile_info(plan), config=_kernel_config(True, block_m))
    product = _xla_ragged if impl == "xla_ragged" else _xla_gather
    return _silu_mul(product(lhs, gate, plan), product(lhs, up, plan)).astype(lhs.dtype)


def default_block_m(num_pairs: int) -> int:
    """Rows per tile: 64 while the pairs are few (decode: one tile per routed expert), 128 for prefill."""
    return 64 if num_pairs <= 4096 else 128


def moe_experts(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array, *,
                impl: str | None = None, block_m: int | None = None, interpret: bool | None = None) -> Array:
    """The routed experts of a MoE layer. x [N, D], ids int32 [N, k], weights float32 [N, k], gate and up
    [E, D, I], down [E, I, D] -> y [N, D] in x's dtype, `y[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n])`
    (each expert's output rounded to x's dtype, the weighted sum in float32). An id equal to E adds nothing.

    `impl=None`: the Hopper kernel on a GPU when it takes the shapes and dtype (`kernel_supports`), else
    `lax.ragged_dot` over the same padded plan. `block_m=None`: `default_block_m` of the pair count."""
    if x.ndim != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: x [N, D], ids and weights [N, k]; got {x.shape}, {ids.shape}, {weights.shape}")
    e, d, i = gate.shape
    if x.shape[1] != d or up.shape != gate.shape or down.shape != (e, i, d):
        raise ValueError(f"moe_experts: x {x.shape}, gate {gate.shape}, up {up.shape}, down {down.shape} disagree")
    n, k = ids.shape
    if n == 0:
        return jnp.zeros_like(x)
    block_m = block_m or default_block_m(n * k)
    if impl is None:
        fits = kernel_supports(x.dtype, d, i, block_m, True) and kernel_supports(x.dtype, i, d, block_m, False)
        impl = "kernel" if fits and not resolve_interpret(interpret) else "xla_ragged"
    plan = plan_rows(ids, e, block_m)
    xs = x[plan.row_token]
    h = grouped_swiglu(xs, gate.astype(x.dtype), up.astype(x.dtype), plan, impl=impl, interpret=interpret)
    ys = grouped_matmul(h, down.astype(x.dtype), plan, impl=impl, interpret=interpret)
    rows = plan.row_token.shape[0]
    picked = jnp.where((plan.pair_row < rows)[..., None], ys[jnp.minimum(plan.pair_row, rows - 1)], 0)
    return jnp.einsum("nkd,nk->nd", picked.astype(jnp.float32), weights.astype(jnp.float32)).astype(x.dtype)
