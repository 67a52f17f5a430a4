"""Sparse MLA attention on Hopper through Pallas Mosaic GPU, warp-specialized (bf16 / f16, 64 heads per program).

The schedule follows FlashMLA's sparse prefill kernel (KERNELS.md §1.1), written here with Pallas Mosaic GPU:

- One program (CTA) per (query token, block of 64 heads, K split) with three warpgroups. Warpgroup 2 is the
  producer: it gathers cache rows by index with 16-byte `cp.async` (Mosaic GPU has no row gather on Hopper)
  and signals each finished copy on an mbarrier (`cp.async.mbarrier.arrive.noinc`), so it never waits for
  its own copies. Warpgroups 0 and 1 compute.
- Key blocks come in pairs: block 2j sits in slot 0 and is warpgroup 0's, block 2j+1 sits in slot 1 and is
  warpgroup 1's. Each computes q.k for its whole block (wgmma m64n64, q and keys from shared memory), so the
  two softmaxes overlap the other warpgroup's products instead of stalling both.
- The value columns are split: warpgroup 0 accumulates columns [0, v/2) and warpgroup 1 [v/2, v) of both
  blocks. Each multiplies its own probabilities straight from registers (wgmma with A in registers) and the
  other's from shared memory. The row max is chained (warpgroup 0 first, then 1); warpgroup 0 rescales its
  probabilities to the pair's final max before sharing them, so one max serves both accumulators.
- Each slot is copied and released in two column halves, "left" [0, v/2) and "right" [v/2, Dqk): a half is
  refilled with the next pair's rows as soon as both warpgroups are done with it. For Dqk = 576 there is no
  room for a second probability buffer, so warpgroup 0's probabilities overwrite slot 0's RoPE columns,
  which only q.k reads.

Index convention: indices are used as given; an index < 0 or >= S is invalid (its row is not read, its logit
is -inf). Shapes: q [BT, Hp, Dqk], kv [B, S, Dqk], idx int32 [BT, splits, Kp] with Kp % 128 == 0
-> out [BT, splits, Hp, v_dim] (q's dtype, each split normalised by its own softmax sum) and
lse [BT, splits, Hp] float32 (natural log, -inf where a split saw no valid index).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_H = 64  # head rows per program: the wgmma M of both compute warpgroups
BLOCK_K = 64  # keys per block; blocks go in pairs, one per compute warpgroup
PAIR_K = 2 * BLOCK_K
_SWIZZLE = 128
_SMEM_BYTES = 227 * 1024
_LN2 = math.log(2.0)
_ROWS_PER_THREAD = BLOCK_K // 16  # the producer's 128 threads: 16 rows per pass, 8 threads per 128-byte segment
# Named barriers (0 is __syncthreads, 1-3 are Mosaic's warpgroup barriers).
_BAR_M0, _BAR_M1, _BAR_P0, _BAR_P1, _BAR_SUM, _BAR_INIT = 8, 9, 10, 11, 12, 13
# mbarriers: READY[slot][half] are completed by the producer's copies, FREE[slot][half] by the consumers.
_LEFT, _RIGHT = 0, 1
_NUM_MBARRIERS = 8
# The small shared buffers, in 4-byte words of one allocation: the index ring [2 pairs, 2 blocks, 64], the
# mbarriers (8 bytes each, 8-aligned after the ring), and two float32 rows (row max / the softmax sums).
_IDX_WORDS = 2 * 2 * BLOCK_K
_ROWS_AT = _IDX_WORDS + 2 * _NUM_MBARRIERS
_MISC_WORDS = _ROWS_AT + 2 * BLOCK_H


def _ready(slot, half):
    return 2 * slot + half


def _free(slot, half):
    return 4 + 2 * slot + half


def supports(dtype, d_qk: int, v_dim: int) -> bool:
    """Whether this kernel handles the shapes: 16-bit inputs, 64-aligned features, v split into two 64-aligned
    halves, and room in shared memory (for Dqk = 576 the shared probabilities reuse the RoPE columns)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and d_qk % 64 == 0
        and v_dim % 128 == 0
        and (not _p0_in_rope(d_qk, 2) or d_qk - 64 >= v_dim)
    )


def _p0_in_rope(d_qk: int, itemsize: int) -> bool:
    """Whether q + two key slots + two probability tiles overflow shared memory, so that warpgroup 0's
    probabilities must live in slot 0's last 64 columns."""
    return 3 * BLOCK_K * d_qk * itemsize + 2 * BLOCK_H * BLOCK_K * itemsize + 4096 > _SMEM_BYTES


def _tiled(itemsize: int):
    """Shared-memory layout of every wgmma operand: tiles of 8 rows x 128 bytes, 128-byte swizzle."""
    return (plgpu.TilingTransform((8, _SWIZZLE // itemsize)), plgpu.SwizzleTransform(_SWIZZLE))


def _ptx(asm: str):
    """Emits one side-effecting PTX statement for every thread of the calling warpgroup."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    @plgpu.inline_mgpu()
    def emit(_):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], asm, "", has_side_effects=True)

    emit()


def _mbarrier_ptr(misc, index: int):
    """Address of mbarrier `index` in the small-buffer allocation `misc` (a memref of 4-byte words)."""
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    return mgpu_utils.getelementptr(mgpu_utils.memref_ptr(misc), [_IDX_WORDS + 2 * index],
                                    ir.IntegerType.get_signless(32))


def _init_mbarriers(misc):
    """One thread initialises the mbarriers (128 arrivals each: one warpgroup); then all 384 threads sync."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, nvvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def init(_, misc):
        i32 = ir.IntegerType.get_signless(32)
        first = arith.cmpi(arith.CmpIPredicate.eq, mgpu_utils.thread_idx(), arith.constant(i32, 0))
        with mgpu_utils.when(first):
            for i in range(_NUM_MBARRIERS):
                nvvm.mbarrier_init(_mbarrier_ptr(misc, i), arith.constant(i32, 128))
            llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.mbarrier_init.release.cluster;", "",
                            has_side_effects=True)
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], f"bar.sync {_BAR_INIT}, 384;", "", has_side_effects=True)

    init(misc)


def _mbarrier_wait(misc, index: int, parity):
    """Waits until the phase of mbarrier `index` with this parity (a Python int or a traced int32, 0 or 1) has
    completed, then fences, so that the copies it tracked are visible to wgmma's (async proxy) reads."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, nvvm

    def emit(misc, parity_value):
        i32 = ir.IntegerType.get_signless(32)
        nvvm.mbarrier_try_wait_parity(_mbarrier_ptr(misc, index), parity_value, arith.constant(i32, 10_000_000))
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.proxy.async.shared::cta;", "", has_side_effects=True)

    if isinstance(parity, int):
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
        def wait_static(_, misc):
            emit(misc, arith.constant(ir.IntegerType.get_signless(32), parity))

        wait_static(misc)
    else:
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT(())))
        def wait(_, misc, parity):
            emit(misc, parity.registers.item())

        wait(misc, parity)


def _mbarrier_arrive(misc, index: int):
    """Every thread of the calling warpgroup arrives once on mbarrier `index` (it expects 128 arrivals)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def arrive(_, misc):
        llvm.inline_asm(ir.IntegerType.get_signless(64), [_mbarrier_ptr(misc, index)],
                        "mbarrier.arrive.shared::cta.b64 $0, [$1];", "=l,r", has_side_effects=True)

    arrive(misc)


def _make_producer(*, d_qk: int, itemsize: int, v_dim: int, seq_len: int, num_pairs: int, l2_prefetch: bool,
                   l2_lookahead: bool, probe: str = ""):
    """Returns produce(kv_rows, idx_row, k_smem, misc), the whole loop of the producer warpgroup.

    kv_rows: GMEM [S, Dqk], this token's batch cache. idx_row: GMEM [Kp] int32, this (token, split)'s indices.
    k_smem: SMEM [2, 64, Dqk] in tiles of 8 rows x 128 bytes, 128-byte swizzle (`_tiled`). misc: the small
    buffers (`_MISC_WORDS`): the index ring [2 pairs, 2 blocks, 64] (the compute warpgroups mask with it) and
    the mbarriers. Per pair j it fills slot 0 left, slot 1 right, slot 0 right, slot 1 left, each after
    waiting for that half to be released by the pair before, and each completing READY[slot][half] when its
    copies land. Threads: 8 per 128-byte segment of a row, 16 rows per pass; invalid rows are zero-filled
    without a read (source size 0).
    """
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, nvvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    tile_cols = _SWIZZLE // itemsize
    tiles = d_qk // tile_cols
    left_tiles = (v_dim // 2) // tile_cols
    tile_bytes = 8 * _SWIZZLE
    row_bytes = d_qk * itemsize
    slot_bytes = BLOCK_K * d_qk * itemsize
    prefetch = ".L2::256B" if l2_prefetch else ""
    half_tiles = {_LEFT: range(0, left_tiles), _RIGHT: range(left_tiles, tiles)}
    order = ((0, _LEFT), (1, _RIGHT), (0, _RIGHT), (1, _LEFT))  # FlashMLA's: each warpgroup's first q.k half first

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(_tiled(itemsize)), plgpu.RefType()),
    )
    def produce(_, kv_rows, idx_row, k_smem, misc):
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        i8 = ir.IntegerType.get_signless(8)
        c32 = lambda v: arith.constant(i32, v)
        lane = arith.remui(mgpu_utils.thread_idx(), c32(128))
        chunk = arith.remui(lane, c32(8))
        group = arith.divui(lane, c32(8))
        gmem_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(kv_rows))
        idx_base = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(idx_row))
        smem_base = mgpu_utils.memref_ptr(k_smem)
        idx_smem_base = mgpu_utils.memref_ptr(misc)  # the index ring starts the allocation
        chunk_bytes = arith.muli(chunk, c32(16))
        # Destination of (row, tile 0) for this thread's rows, without the slot: the 16-byte chunk index is
        # XORed with row % 8 (Mosaic's 128-byte swizzle).
        dst_rows = []
        for r in range(_ROWS_PER_THREAD):
            row = arith.addi(group, c32(16 * r))
            in_tile = arith.remui(row, c32(8))
            dst_rows.append(arith.addi(
                arith.muli(arith.divui(row, c32(8)), c32(tiles * tile_bytes)),
                arith.addi(arith.muli(in_tile, c32(_SWIZZLE)), arith.muli(arith.xori(chunk, in_tile), c32(16))),
            ))

        def copy_indices(block, slot, ring):
            """Threads 0..15 copy the block's 64 indices (16 bytes each) into idx_smem[ring, slot]."""
            with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, lane, c32(16))):
                off = arith.muli(lane, c32(16))
                src = mgpu_utils.getelementptr(
                    idx_base, [arith.extui(i64, arith.addi(arith.muli(block, c32(BLOCK_K * 4)), off))], i8)
                dst = mgpu_utils.getelementptr(
                    idx_smem_base, [arith.addi(arith.muli(arith.addi(arith.muli(ring, c32(2)), c32(slot)),
                                                          c32(BLOCK_K * 4)), off)], i8)
                nvvm.cp_async_shared_global(dst, src, 16, nvvm.LoadCacheModifierKind.CG)

        def prefetch_pair_to_l2(j):
            """One thread per row (chunk 0) asks the L2 for the rows of pair j (bulk prefetch, no smem)."""
            go = arith.andi(arith.cmpi(arith.CmpIPredicate.ult, j, c32(num_pairs)),
                            arith.cmpi(arith.CmpIPredicate.eq, chunk, c32(0)))
            with mgpu_utils.when(go):
                for slot in range(2):
                    block = arith.addi(arith.muli(j, c32(2)), c32(slot))
                    for r in range(_ROWS_PER_THREAD):
                        pos = arith.addi(arith.muli(block, c32(BLOCK_K)), arith.addi(group, c32(16 * r)))
                        token = llvm.load(i32, mgpu_utils.getelementptr(idx_base, [arith.extui(i64, pos)], i32))
                        valid = arith.andi(arith.cmpi(arith.CmpIPredicate.sge, token, c32(0)),
                                           arith.cmpi(arith.CmpIPredicate.slt, token, c32(seq_len)))
                        src = mgpu_utils.getelementptr(
                            gmem_base, [arith.muli(arith.extui(i64, token), arith.constant(i64, row_bytes))], i8)
                        llvm.inline_asm(ir.Type.parse("!llvm.void"), [src, valid],
                                        f"@$1 cp.async.bulk.prefetch.L2.global [$0], {row_bytes};", "l,b",
                                        has_side_effects=True)

        if l2_lookahead:
            prefetch_pair_to_l2(c32(0))

        @mgpu_utils.fori(arith.constant(i32, num_pairs), ())
        def _pair(j, carry):
            if l2_lookahead:  # the next pair's rows head for the L2 while this pair waits for free slots
                prefetch_pair_to_l2(arith.addi(j, c32(1)))
            parity_free = arith.xori(arith.andi(j, c32(1)), c32(1))  # the previous pair's release
            ring = arith.andi(j, c32(1))
            sources, sizes = {}, {}
            for slot in range(2):
                block = arith.addi(arith.muli(j, c32(2)), c32(slot))
                for r in range(_ROWS_PER_THREAD):
                    pos = arith.addi(arith.muli(block, c32(BLOCK_K)), arith.addi(group, c32(16 * r)))
                    token = llvm.load(i32, mgpu_utils.getelementptr(idx_base, [arith.extui(i64, pos)], i32))
                    valid = arith.andi(arith.cmpi(arith.CmpIPredicate.sge, token, c32(0)),
                                       arith.cmpi(arith.CmpIPredicate.slt, token, c32(seq_len)))
                    token = arith.select(valid, token, c32(0))
                    src = arith.addi(arith.muli(arith.extui(i64, token), arith.constant(i64, row_bytes)),
                                     arith.extui(i64, chunk_bytes))
                    sources[slot, r] = src
                    sizes[slot, r] = arith.select(valid, c32(16), c32(0))
            for slot, half in order:
                nvvm.mbarrier_try_wait_parity(_mbarrier_ptr(misc, _free(slot, half)), parity_free,
                                              c32(10_000_000))
                if (slot, half) in ((0, _LEFT), (1, _RIGHT)):  # the first copy of each block carries its indices
                    copy_indices(arith.addi(arith.muli(j, c32(2)), c32(slot)), slot, ring)
                for r in range(_ROWS_PER_THREAD if probe != "no_gather" else 0):
                    for tile in half_tiles[half]:
                        src = mgpu_utils.getelementptr(
                            gmem_base, [arith.addi(sources[slot, r], arith.constant(i64, tile * tile_cols * itemsize))],
                            i8)
                        dst = mgpu_utils.getelementptr(
                            smem_base, [arith.addi(dst_rows[r], c32(slot * slot_bytes + tile * tile_bytes))], i8)
                        llvm.inline_asm(
                            ir.Type.parse("!llvm.void"),
                            [dst, src, sizes[slot, r]],
                            f"cp.async.cg.shared.global{prefetch} [$0], [$1], 16, $2;",
                            "r,l,r",
                            has_side_effects=True,
                        )
                llvm.inline_asm(ir.Type.parse("!llvm.void"), [_mbarrier_ptr(misc, _ready(slot, half))],
                                "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [$0];", "r", has_side_effects=True)
            return carry

    return produce


@functools.partial(jax.jit, static_argnames=("tokens", "v_dim", "scale_log2", "l2_prefetch", "l2_lookahead",
                                             "probe"))
def sparse_mla_hopper_ws(q, kv, idx, *, tokens: int, v_dim: int, scale_log2: float, l2_prefetch: bool = True,
                         l2_lookahead: bool = False, probe: str = ""):
    """Runs the kernel. q [BT, Hp, Dqk] (Hp % 64 == 0), kv [B, S, Dqk], idx int32 [BT, splits, Kp] with
    Kp % 128 == 0 (indices < 0 or >= S are invalid). tokens: query tokens per batch row (BT = B * tokens).
    scale_log2: softmax scale times log2(e). l2_prefetch: the gathers ask the L2 for 256-byte sectors.

    Returns out [BT, splits, Hp, v_dim] in q's dtype (each split normalised by its own softmax sum) and
    lse float32 [BT, splits, Hp] in natural log (-inf where a split saw no valid index).
    """
    bt, h_pad, d_qk = q.shape
    seq_len = kv.shape[1]
    splits, k_total = idx.shape[1], idx.shape[2]
    if k_total % PAIR_K or h_pad % BLOCK_H:
        raise ValueError(f"idx length {k_total} must be a multiple of {PAIR_K} and heads {h_pad} of {BLOCK_H}")
    num_pairs = k_total // PAIR_K
    half_v = v_dim // 2
    dtype = q.dtype
    itemsize = jnp.dtype(dtype).itemsize
    n_hb = h_pad // BLOCK_H
    p0_in_rope = _p0_in_rope(d_qk, itemsize)
    produce = _make_producer(d_qk=d_qk, itemsize=itemsize, v_dim=v_dim, seq_len=seq_len, num_pairs=num_pairs,
                             l2_prefetch=l2_prefetch, l2_lookahead=l2_lookahead, probe=probe)
    left, right = pl.ds(0, half_v), pl.ds(half_v, d_qk - half_v)

    def wgmma(*args):
        if probe != "no_compute":
            plgpu.wgmma(*args)

    def body(q_ref, kv_ref, idx_ref, out_ref, lse_ref, q_smem, k_smem, p1_smem, misc, q_barrier, *p0_extra):
        hb = lax.axis_index("hb")
        t = lax.axis_index("t")
        sp = lax.axis_index("sp")
        wg = lax.axis_index("wg")
        heads = pl.ds(hb * BLOCK_H, BLOCK_H)
        # Views are made inside each warpgroup's branch: a view made outside would enter the branch as a
        # closed-over constant, which Pallas (jax 0.11) cannot lower.
        def p0_view():
            return k_smem.at[0, :, pl.ds(d_qk - BLOCK_K, BLOCK_K)] if p0_in_rope else p0_extra[0]

        def idx_view():
            return misc.at[pl.ds(0, _IDX_WORDS)]


        def store_rows(r, x):
            misc[pl.ds(_ROWS_AT + r * BLOCK_H, BLOCK_H)] = lax.bitcast_convert_type(x, jnp.int32)

        def load_rows(r):
            x = plgpu.load(misc.at[pl.ds(_ROWS_AT + r * BLOCK_H, BLOCK_H)], (), layout=plgpu.Layout.WGMMA.reduce(1))
            return lax.bitcast_convert_type(x, jnp.float32)
        _init_mbarriers(misc)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(56, action="decrease")
            produce(kv_ref.at[t // tokens], idx_ref.at[t, sp], k_smem, misc)

        def masked_logits(s_ref, j, slot):
            ids = plgpu.load(idx_view().at[pl.ds(((j % 2) * 2 + slot) * BLOCK_K, BLOCK_K)], (),
                             layout=plgpu.Layout.WGMMA.reduce(0))
            valid = lax.broadcast_in_dim((ids >= 0) & (ids < seq_len), (BLOCK_H, BLOCK_K), [1])
            return jnp.where(valid, s_ref[...] * scale_log2, -jnp.inf)

        def rows(x):
            return lax.broadcast_in_dim(x, (BLOCK_H, BLOCK_K), [0])

        def qk_half(s_ref, slot, half, parity):
            cols = left if half == _LEFT else right
            _mbarrier_wait(misc, _ready(slot, half), parity)
            wgmma(s_ref, q_smem.at[:, cols], plgpu.transpose_ref(k_smem.at[slot, :, cols], (1, 0)))

        def compute(w):
            plgpu.set_max_registers(224, action="increase")
            my_cols = pl.ds(w * half_v, half_v)

            def pair_wg0(acc_ref, s_ref, j, carry):
                m_prev, l = carry
                s = masked_logits(s_ref, j, 0)
                m0 = jnp.maximum(m_prev, s.max(axis=1))
                m0_use = jnp.where(m0 == -jnp.inf, 0.0, m0)
                alpha = jnp.exp2(m_prev - m0_use)
                p = jnp.exp2(s - rows(m0_use))
                l = l * alpha + p.sum(axis=1)
                acc_ref[...] = acc_ref[...] * lax.broadcast_in_dim(alpha, (BLOCK_H, half_v), [0])
                store_rows(0, m0)
                _ptx(f"bar.arrive {_BAR_M0}, 256;")
                wgmma(acc_ref, p.astype(dtype), k_smem.at[0, :, my_cols])  # own p from registers
                plgpu.wgmma_wait(0)
                _mbarrier_arrive(misc, _free(0, _LEFT))
                _ptx(f"bar.sync {_BAR_M1}, 256;")
                m1 = load_rows(0)
                m1_use = jnp.where(m1 == -jnp.inf, 0.0, m1)
                to_m1 = jnp.where(m0 == -jnp.inf, 1.0, jnp.exp2(m0_use - m1_use))
                p0_view()[...] = (p * rows(to_m1)).astype(dtype)
                plgpu.commit_smem()
                _ptx(f"bar.arrive {_BAR_P0}, 256;")
                _ptx(f"bar.sync {_BAR_P1}, 256;")
                acc_ref[...] = acc_ref[...] * lax.broadcast_in_dim(to_m1, (BLOCK_H, half_v), [0])
                wgmma(acc_ref, p1_smem, k_smem.at[1, :, my_cols])

                @pl.when(j + 1 < num_pairs)
                def _():  # the next pair's q.k overlaps this p.v
                    parity = (j + 1) % 2
                    s_ref[...] = plgpu.layout_cast(jnp.zeros((BLOCK_H, BLOCK_K), jnp.float32), plgpu.Layout.WGMMA)
                    qk_half(s_ref, 0, _LEFT, parity)
                    plgpu.wgmma_wait(1)
                    _mbarrier_arrive(misc, _free(1, _LEFT))
                    qk_half(s_ref, 0, _RIGHT, parity)
                    plgpu.wgmma_wait(0)

                @pl.when(j + 1 == num_pairs)
                def _():
                    plgpu.wgmma_wait(0)
                    _mbarrier_arrive(misc, _free(1, _LEFT))

                return m1, l * to_m1

            def pair_wg1(acc_ref, s_ref, j, carry):
                m_prev, l = carry
                parity = j % 2
                s_ref[...] = plgpu.layout_cast(jnp.zeros((BLOCK_H, BLOCK_K), jnp.float32), plgpu.Layout.WGMMA)
                qk_half(s_ref, 1, _RIGHT, parity)
                qk_half(s_ref, 1, _LEFT, parity)
                plgpu.wgmma_wait(0)
                s = masked_logits(s_ref, j, 1)
                s_max = s.max(axis=1)
                _ptx(f"bar.sync {_BAR_M0}, 256;")
                m0 = load_rows(0)
                m1 = jnp.maximum(m0, s_max)
                m1_use = jnp.where(m1 == -jnp.inf, 0.0, m1)
                alpha = jnp.exp2(m_prev - m1_use)
                p = jnp.exp2(s - rows(m1_use))
                l = l * alpha + p.sum(axis=1)
                acc_ref[...] = acc_ref[...] * lax.broadcast_in_dim(alpha, (BLOCK_H, half_v), [0])
                store_rows(0, m1)
                _ptx(f"bar.arrive {_BAR_M1}, 256;")
                p16 = p.astype(dtype)
                wgmma(acc_ref, p16, k_smem.at[1, :, my_cols])  # own p from registers
                p1_smem[...] = p16
                plgpu.commit_smem()
                _ptx(f"bar.sync {_BAR_P0}, 256;")
                wgmma(acc_ref, p0_view(), k_smem.at[0, :, pl.ds(half_v, half_v)])
                _ptx(f"bar.arrive {_BAR_P1}, 256;")
                plgpu.wgmma_wait(1)
                _mbarrier_arrive(misc, _free(1, _RIGHT))
                plgpu.wgmma_wait(0)
                _mbarrier_arrive(misc, _free(0, _RIGHT))
                return m1, l

            def main_loop(refs):
                acc_ref, s_ref = refs
                plgpu.barrier_wait(q_barrier)
                if w == 0:
                    qk_half(s_ref, 0, _LEFT, 0)
                    qk_half(s_ref, 0, _RIGHT, 0)
                    plgpu.wgmma_wait(0)
                step = pair_wg0 if w == 0 else pair_wg1
                m = plgpu.layout_cast(jnp.full((BLOCK_H,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                l = plgpu.layout_cast(jnp.zeros((BLOCK_H,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                m, l = lax.fori_loop(0, num_pairs, functools.partial(step, acc_ref, s_ref), (m, l))
                acc = acc_ref[...]
                # Each warpgroup summed p over its own blocks: add the two partial sums. Warpgroup 1 may take
                # the row-max slot: warpgroup 0 read the last max before the barrier warpgroup 1 passed last.
                store_rows(1 - w, l)
                _ptx(f"bar.sync {_BAR_SUM}, 256;")
                l = l + load_rows(w)
                empty = l == 0.0
                l_safe = jnp.where(empty, 1.0, l)
                out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
                out_ref[t, sp, heads, my_cols] = out.astype(dtype)
                if w == 0:
                    lse_ref[t, sp, heads] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * _LN2)

            acc0 = plgpu.layout_cast(jnp.zeros((BLOCK_H, half_v), jnp.float32), plgpu.Layout.WGMMA)
            s0 = plgpu.layout_cast(jnp.zeros((BLOCK_H, BLOCK_K), jnp.float32), plgpu.Layout.WGMMA)
            pl.run_state(main_loop)((plgpu.ACC.init(acc0), plgpu.ACC.init(s0)))

        @pl.when(wg == 0)
        def _():
            plgpu.copy_gmem_to_smem(q_ref.at[t, heads], q_smem, q_barrier)
            compute(0)

        pl.when(wg == 1)(functools.partial(compute, 1))

    # Every scratch buffer starts on a 1024-byte boundary, so the small ones share one: for Dqk = 576 the
    # kernel takes 231 432 of the 232 448 bytes.
    scratch = [
        plgpu.SMEM((BLOCK_H, d_qk), dtype, transforms=_tiled(itemsize)),
        plgpu.SMEM((2, BLOCK_K, d_qk), dtype, transforms=_tiled(itemsize)),
        plgpu.SMEM((BLOCK_H, BLOCK_K), dtype, transforms=_tiled(itemsize)),
        plgpu.SMEM((_MISC_WORDS,), jnp.int32),
        plgpu.Barrier(num_arrivals=1),
    ]
    if not p0_in_rope:
        scratch.append(plgpu.SMEM((BLOCK_H, BLOCK_K), dtype, transforms=_tiled(itemsize)))
    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct((bt, splits, h_pad, v_dim), dtype),
            jax.ShapeDtypeStruct((bt, splits, h_pad), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(n_hb, bt, splits),
        grid_names=("hb", "t", "sp"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
    )
    return kernel(q, kv, idx)
