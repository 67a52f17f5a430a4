"""Sparse MLA attention on Hopper through Pallas Mosaic GPU (bf16 / f16, 64 heads per program).

The Triton-lowered kernel in `sparse_mla.py` lets Triton place the warps: for a product feeding another
product it puts every warp along the 64 head rows, so both warpgroups compute the whole q.k. This kernel
places the work itself, after FlashMLA's sparse prefill schedule (docs/kernels.md, "Sparse MLA"):

- One program (CTA) per (query token, block of 64 heads, K split), two warpgroups.
- Each 64-index block of keys is split between the warpgroups: warpgroup w gathers rows 32w..32w+31 of the
  block into shared memory (16-byte `cp.async`, issued per row from the runtime index, since Mosaic GPU has
  no row gather on Hopper) and computes q.k for those 32 keys only (wgmma m64n32, q and keys from shared
  memory). The two warpgroups exchange their row maxima through shared memory, each writes its bf16
  probabilities [64 heads, 32 keys] to shared memory, and each accumulates p.v for all 64 keys of the block
  into its own half of the 512 value columns (wgmma m64n256). No product is computed twice.
- Two key blocks are resident (q 72 KB + 2 x 72 KB of rows). p.v of block i is issued asynchronously; each
  warpgroup waits for it before the barrier that opens block i+1, so after that barrier the slot of block i
  is free and the gather of block i+2 is issued into it, behind block i+1's q.k (`gather_at`).
- The indices travel through a 4-slot ring in shared memory, fetched with `cp.async` two blocks ahead.
- The output goes registers -> shared memory (the key slots, free once the last p.v is done) -> TMA store.
  Stored straight from the wgmma register layout (4-byte pieces of 8 rows per warp instruction, at the
  kernel's tail where nothing overlaps them), the kernel took 7.4 us longer in decode at 128 heads (105.6 against
  98.2 us, benchmarks/results/sparse_mla_decode_probe_cdd09e6.json against sparse_mla_decode_probe.json).

Index convention: indices are used as given; one < 0 or >= S is invalid (row 0 is gathered in its place and
its logit is -inf). The caller pads K with -1 to whole blocks where needed. Shapes: q [BT, Hp, Dqk],
kv [B, S, Dqk], idx [BT, splits, Kp] -> out [BT, splits, Hp, v_dim] (q's dtype), lse [BT, splits, Hp] float32
(natural log).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_H = 64  # head rows per program: one wgmma M for each warpgroup
BLOCK_K = 64  # indices per block, 32 per warpgroup
_HALF_K = BLOCK_K // 2
_IDX_SLOTS = 4  # ring of index blocks; block j+2 is fetched while block j's rows are gathered
_KV_SLOTS = 2
_SWIZZLE = 64
_CTA_BARRIER_ID = 5  # named barrier over both warpgroups (0 is __syncthreads, 1-2 are warpgroup barriers)
_LN2 = math.log(2.0)


def supports(dtype, d_qk: int, v_dim: int) -> bool:
    """Whether this kernel handles the shapes: 16-bit inputs, 64-aligned features, v split into two 64-aligned halves."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and d_qk % 64 == 0
        and v_dim % 128 == 0
        and v_dim <= 512
        and v_dim <= d_qk
    )


def _tiled(itemsize: int):
    """Shared-memory layout of every wgmma operand here: tiles of 8 rows x 64 bytes, 64-byte swizzle.

    wgmma needs one swizzle for both operands, and p [64 heads, 32 keys] per warpgroup is 64 bytes wide.
    """
    return (plgpu.TilingTransform((8, _SWIZZLE // itemsize)), plgpu.SwizzleTransform(_SWIZZLE))


def _ptx(asm: str):
    """Emits one side-effecting PTX statement for every thread of the calling warpgroup."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    @plgpu.inline_mgpu()
    def emit(_):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], asm, "", has_side_effects=True)

    emit()


def _cta_barrier():
    """bar.sync over the 256 threads of both warpgroups (orders their shared-memory accesses)."""
    _ptx(f"bar.sync {_CTA_BARRIER_ID}, 256;")


def _wait_gathers_and_fence():
    """Waits for this thread's cp.async groups, then fences them against wgmma's (async proxy) reads."""
    _ptx("cp.async.wait_group 0;\n\tfence.proxy.async.shared::cta;")


def _make_gather(d_qk: int, itemsize: int, seq_len: int):
    """Returns gather(kv_rows, idx_now, k_dst, idx_next_src, idx_next_dst), run by one warpgroup on its slices.

    kv_rows: GMEM [S, Dqk], this token's batch cache. idx_now: SMEM [32] int32, this warpgroup's indices of
    the block (< 0 or >= S = invalid, gathered as row 0 and masked later). k_dst: SMEM [32, Dqk] in tiles of 8 rows x
    64 bytes with 64-byte swizzle (`_tiled`). idx_next_src: GMEM [32] int32, idx_next_dst: SMEM [32] int32
    (look-ahead indices; the last block's again past the end).
    Every thread issues 16-byte cp.async: 8 threads cover one 128-byte segment of a row, 16 rows per pass.
    """
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, nvvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    tile_cols = _SWIZZLE // itemsize  # elements per tile row: 64 bytes
    tiles_per_row = d_qk // tile_cols
    tile_bytes = 8 * _SWIZZLE
    row_bytes = d_qk * itemsize

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(_tiled(itemsize)), plgpu.RefType(),
                   plgpu.RefType()),
    )
    def gather(_, kv_rows, idx_now, k_dst, idx_next_src, idx_next_dst):
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        i8 = ir.IntegerType.get_signless(8)
        c32 = lambda v: arith.constant(i32, v)
        c64 = lambda v: arith.constant(i64, v)
        lane = arith.remui(mgpu_utils.thread_idx(), c32(128))
        # 8 threads read one 128-byte segment of a row (two tiles), 16 rows per pass.
        chunk = arith.remui(lane, c32(8))
        tile_in_pair = arith.divui(chunk, c32(4))
        chunk_in_tile = arith.remui(chunk, c32(4))
        row0 = arith.divui(lane, c32(8))
        gmem_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(kv_rows))
        smem_base = mgpu_utils.memref_ptr(k_dst)
        idx_base = mgpu_utils.memref_ptr(idx_now)
        for p in range(_HALF_K // 16):
            row = arith.addi(row0, c32(16 * p))
            token = llvm.load(i32, mgpu_utils.getelementptr(idx_base, [row], i32))
            valid = arith.andi(arith.cmpi(arith.CmpIPredicate.sge, token, c32(0)),
                               arith.cmpi(arith.CmpIPredicate.slt, token, c32(seq_len)))
            token = arith.select(valid, token, c32(0))
            src_row = arith.muli(arith.extui(i64, token), c64(row_bytes))
            src_row = arith.addi(src_row, arith.extui(i64, arith.muli(chunk, c32(16))))
            # Mosaic's 64-byte swizzle: within a tile of 8 rows x 64 bytes, the 16-byte chunk index is XORed
            # with bits 7-8 of the byte offset, i.e. with (row % 8) // 2.
            in_tile = arith.remui(row, c32(8))
            swizzled = arith.muli(arith.xori(chunk_in_tile, arith.divui(in_tile, c32(2))), c32(16))
            dst_row = arith.addi(
                arith.muli(arith.divui(row, c32(8)), c32(tiles_per_row * tile_bytes)),
                arith.addi(arith.muli(tile_in_pair, c32(tile_bytes)),
                           arith.addi(arith.muli(in_tile, c32(_SWIZZLE)), swizzled)),
            )
            for pair in range(tiles_per_row // 2):
                src = mgpu_utils.getelementptr(gmem_base, [arith.addi(src_row, c64(pair * 128))], i8)
                dst = mgpu_utils.getelementptr(smem_base, [arith.addi(dst_row, c32(pair * 2 * tile_bytes))], i8)
                nvvm.cp_async_shared_global(dst, src, 16, nvvm.LoadCacheModifierKind.CG)
        _emit_index_copy(idx_next_src, idx_next_dst)
        nvvm.cp_async_commit_group()

    return gather


def _emit_index_copy(src_ref, dst_ref):
    """Emits the cp.async of 32 int32 indices (128 bytes) GMEM -> SMEM by threads 0..7 of the warpgroup."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, nvvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    i8 = ir.IntegerType.get_signless(8)
    lane = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, 128))
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, lane, arith.constant(i32, 8))):
        off = arith.muli(lane, arith.constant(i32, 16))
        src_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(src_ref))
        src = mgpu_utils.getelementptr(src_base, [arith.extui(ir.IntegerType.get_signless(64), off)], i8)
        dst = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(dst_ref), [off], i8)
        nvvm.cp_async_shared_global(dst, src, 16, nvvm.LoadCacheModifierKind.CG)


def _make_index_prefetch():
    """Returns fetch(src, dst): threads 0..7 of the warpgroup cp.async 32 int32 indices GMEM -> SMEM, committed."""
    from jax._src.lib.mlir.dialects import nvvm

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def fetch(_, src_ref, dst_ref):
        _emit_index_copy(src_ref, dst_ref)
        nvvm.cp_async_commit_group()

    return fetch


GATHER_POINTS = ("block_start", "after_max", "after_pv")


@functools.partial(jax.jit, static_argnames=("tokens", "v_dim", "scale_log2", "gather_at"))
def sparse_mla_hopper(q, kv, idx, *, tokens: int, v_dim: int, scale_log2: float, gather_at: str = "block_start"):
    """Runs the kernel. q [BT, Hp, Dqk] (Hp % 64 == 0), kv [B, S, Dqk], idx int32 [BT, splits, Kp] with
    Kp % 64 == 0; an index < 0 or >= S is invalid.
    gather_at: where block i+1's gather is issued into the slot block i-1 used. "block_start": each warpgroup
    waits for its p.v of block i-1 before barrier A of block i, so the slot is free there, and issues the copies
    behind block i's q.k (a whole block of look-ahead). "after_max": after barrier B of block i, the first point
    where both warpgroups are known past their p.v of block i-1 without waiting for it. "after_pv": after
    block i's p.v is issued (look-ahead: one p.v).

    Returns out [BT, splits, Hp, v_dim] in q's dtype (each split normalised by its own softmax sum) and
    lse float32 [BT, splits, Hp] in natural log (-inf where a split saw no valid index).
    """
    if gather_at not in GATHER_POINTS:
        raise ValueError(f"gather_at={gather_at!r} must be one of {GATHER_POINTS}")
    bt, h_pad, d_qk = q.shape
    splits, k_total = idx.shape[1], idx.shape[2]
    num_blocks = k_total // BLOCK_K
    seq_len = kv.shape[1]
    half_v = v_dim // 2
    dtype = q.dtype
    itemsize = jnp.dtype(dtype).itemsize
    n_hb = h_pad // BLOCK_H
    gather = _make_gather(d_qk, itemsize, seq_len)  # each warpgroup passes its own slices
    fetch_indices = _make_index_prefetch()

    def body(q_ref, kv_ref, idx_ref, out_ref, lse_ref, q_smem, kv_or_out_smem, p_smem, idx_smem, row_smem, q_barrier):
        k_smem, out_smem = kv_or_out_smem
        hb = lax.axis_index("hb")
        t = lax.axis_index("t")
        sp = lax.axis_index("sp")
        wg = lax.axis_index("wg")
        kv_rows = kv_ref.at[t // tokens]
        heads = pl.ds(hb * BLOCK_H, BLOCK_H)

        def block_indices(j, w):
            return idx_ref.at[t, sp, pl.ds(j * BLOCK_K + w * _HALF_K, _HALF_K)]

        @pl.when(wg == 0)
        def _():
            plgpu.copy_gmem_to_smem(q_ref.at[t, heads], q_smem, q_barrier)

        def warpgroup(w):
            other = 1 - w

            def issue_gather(j):
                gather(kv_rows, idx_smem.at[j % _IDX_SLOTS, w], k_smem.at[j % _KV_SLOTS, pl.ds(w * _HALF_K, _HALF_K)],
                       block_indices(jnp.minimum(j + 2, num_blocks - 1), w), idx_smem.at[(j + 2) % _IDX_SLOTS, w])

            def maybe_gather(j):
                pl.when(j < num_blocks)(functools.partial(issue_gather, j))

            # Prologue: indices of blocks 0 and 1, then the rows of block 0.
            fetch_indices(block_indices(0, w), idx_smem.at[0, w])
            fetch_indices(block_indices(min(1, num_blocks - 1), w), idx_smem.at[1, w])
            _ptx("cp.async.wait_group 0;")
            _cta_barrier()
            issue_gather(0)
            plgpu.barrier_wait(q_barrier)

            def step(acc_ref, i, carry):
                m, l = carry
                slot = i % _KV_SLOTS
                if gather_at == "block_start":
                    plgpu.wgmma_wait(0)  # this warpgroup's p.v of block i-1: its slot is refilled below
                _wait_gathers_and_fence()
                _cta_barrier()  # A: block i is in shared memory, from both warpgroups' copies

                def qk(s_ref):
                    plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot, pl.ds(w * _HALF_K, _HALF_K)], (1, 0)))
                    if gather_at == "block_start":  # issued while the tensor cores run q.k
                        maybe_gather(i + 1)
                    return s_ref[...]  # waits for every wgmma of this warpgroup, p.v of block i-1 included

                s = pl.run_scoped(qk, plgpu.ACC((BLOCK_H, _HALF_K), jnp.float32))
                ids = plgpu.load(idx_smem.at[i % _IDX_SLOTS, w], (), layout=plgpu.Layout.WGMMA.reduce(0))
                valid = lax.broadcast_in_dim((ids >= 0) & (ids < seq_len), s.shape, [1])
                s = jnp.where(valid, s * scale_log2, -jnp.inf)
                s_max = s.max(axis=1)
                row_smem[0, w] = s_max
                _cta_barrier()  # B: both row maxima written; both warpgroups are done with block i-1
                if gather_at == "after_max":
                    maybe_gather(i + 1)

                m_other = plgpu.load(row_smem.at[0, other], (), layout=plgpu.Layout.WGMMA.reduce(1))
                m_new = jnp.maximum(m, jnp.maximum(s_max, m_other))
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc_ref[...] = acc_ref[...] * lax.broadcast_in_dim(alpha, (BLOCK_H, half_v), [0])
                p_smem[w] = p.astype(dtype)
                plgpu.commit_smem()
                _cta_barrier()  # C: both halves of p are in shared memory

                # p.v runs on the tensor cores while this warpgroup waits for the next block and starts its q.k.
                for half in range(2):
                    keys = pl.ds(half * _HALF_K, _HALF_K)
                    plgpu.wgmma(acc_ref, p_smem.at[half], k_smem.at[slot, keys, pl.ds(w * half_v, half_v)])
                if gather_at == "after_pv":
                    maybe_gather(i + 1)
                return m_new, l

            def main_loop(acc_ref):
                m = plgpu.layout_cast(jnp.full((BLOCK_H,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                l = plgpu.layout_cast(jnp.zeros((BLOCK_H,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                m, l = lax.fori_loop(0, num_blocks, functools.partial(step, acc_ref), (m, l))
                acc = acc_ref[...]

                # Each warpgroup summed p over its own keys: add the two partial sums.
                row_smem[1, w] = l
                _cta_barrier()
                l = l + plgpu.load(row_smem.at[1, other], (), layout=plgpu.Layout.WGMMA.reduce(1))
                empty = l == 0.0
                l_safe = jnp.where(empty, 1.0, l)
                out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
                # Both warpgroups' last p.v finished before the barrier above: the key slots are free.
                out_smem[w] = out.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[w], out_ref.at[t, sp, heads, pl.ds(w * half_v, half_v)])
                if w == 0:
                    lse_ref[t, sp, heads] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * _LN2)
                plgpu.wait_smem_to_gmem(0)

            acc0 = plgpu.layout_cast(jnp.zeros((BLOCK_H, half_v), jnp.float32), plgpu.Layout.WGMMA)
            pl.run_state(main_loop)(plgpu.ACC.init(acc0))

        for w in range(2):
            pl.when(wg == w)(functools.partial(warpgroup, w))

    scratch = [
        plgpu.SMEM((BLOCK_H, d_qk), dtype, transforms=_tiled(itemsize)),
        plgpu.RefUnion(  # the key slots, then the output tile of each warpgroup
            plgpu.SMEM((_KV_SLOTS, BLOCK_K, d_qk), dtype, transforms=_tiled(itemsize)),
            plgpu.SMEM((2, BLOCK_H, half_v), dtype,
                       transforms=(plgpu.TilingTransform((8, 128 // itemsize)), plgpu.SwizzleTransform(128))),
        ),
        plgpu.SMEM((2, BLOCK_H, _HALF_K), dtype, transforms=_tiled(itemsize)),
        plgpu.SMEM((_IDX_SLOTS, 2, _HALF_K), jnp.int32),
        plgpu.SMEM((2, 2, BLOCK_H), jnp.float32),
        plgpu.Barrier(num_arrivals=1),
    ]
    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((bt, splits, h_pad, v_dim), dtype),
            jax.ShapeDtypeStruct((bt, splits, h_pad), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(n_hb, bt, splits),
        grid_names=("hb", "t", "sp"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),  # row reductions stay in-warp
    )
    return kernel(q, kv, idx)
