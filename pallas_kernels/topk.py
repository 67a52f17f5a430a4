"""Exact row-wise top-k selection (k largest finite values) as Pallas kernels, with a pure-JAX reference.

XLA lowers `lax.top_k` with a large k (2048) to a full sort of every row (docs/kernels.md, "Top-k"). The kernels below are
a threshold select instead. Each row r has a live length: only columns <= row_limits[r] are read (the rest of the
row may hold anything, e.g. logits tiles that were never written). Every pass is a loop with a traced trip count
over the blocks wholly inside the live range, which are plain (unmasked, vectorized) loads, then one masked step
for the block that straddles the live length (`_fold_blocks`): the work is bounded by the live length while the
shapes stay static.

Many rows (prefill chunks): one program per row (`_topk_kernel`).
1. Sample: read `n_sample` elements of the live range at an even stride and find a threshold `t_lo` with (in
   expectation) about sqrt(k * cand) elements of the row at or above it (the rank-th largest sample key).
2. Filter: one pass over the live range counts the finite elements and compacts the (key, index) pairs with
   key >= t_lo, in index order, into a per-row candidate buffer of `cand` slots (cumsum positions, masked stores).
3. Select: if the candidates hold the whole answer (k <= count <= cand, or every finite element), the exact k-th
   largest key tau is found over the candidates held in registers: a bitwise search that starts below the common
   prefix of t_lo and the largest key and stops as soon as exactly k keys lie at or above its bound. Elements
   > tau are taken, then elements == tau in index order until k are taken (ties go to the lower index).
   Otherwise (an unlucky sample, or an adversarial row such as a constant one) the same exact select runs over
   the whole live range.

Few rows (decode: B = 1-64 rows of 64K-256K): a row is split over P programs so that one row is not one SM's
latency (`_split_count_kernel`, `_split_compact_kernel`, `_split_select_kernel`, three launches):
1. Every program of a row computes the same sampled threshold t_lo (step 1 above) and counts, over its own
   segment of the live range, the elements >= t_lo and the finite elements.
2. Every program adds up the counts of the segments before its own (a P-wide prefix sum) and compacts its
   candidates to that offset: the candidate buffer comes out in index order, as in the one-program kernel.
3. One program per row runs step 3 above on the candidates (or the whole-row fallback).

Non-finite values (-inf, +inf, NaN) are never selected. Output order: the selected indices in ascending index
order, then -1 for the slots beyond the number of finite live values of the row. `topk_reference` returns exactly
the same array for full rows.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._platform import resolve_interpret
from pallas_kernels._util import next_pow2 as _next_pow2

_INT_MIN = np.int32(np.iinfo(np.int32).min)
_INT_MAX = np.int32(np.iinfo(np.int32).max)
_EXP_MASK = 0x7F800000


@dataclass(frozen=True)
class TopkConfig:
    """Launch settings of the one-program-per-row top-k kernel.

    block: elements per step of the row passes (a power of two).
    cand_factor: candidate buffer slots = next power of two of cand_factor * k.
    n_sample: sampled elements per row (a power of two).
    select_block: candidates held in registers at once during the exact select. 4096, not the whole 8192-slot
        buffer of k = 2048: holding 8192 pushes the kernel past 128 registers a thread, one 8-warp program per SM
        instead of two, and the prefill shape (4096 x 131072) ran at 5.6 ms against 3.95 ms (H100, ncu and timing).
    num_warps: Triton warps per program.
    """

    block: int = 2048
    cand_factor: int = 4
    n_sample: int = 4096
    select_block: int = 4096
    num_warps: int = 8


@dataclass(frozen=True)
class SplitTopkConfig:
    """Launch settings of the split top-k for few long rows (decode).

    max_rows: rows up to which the split kernels run (more rows: one program per row).
    min_row: shortest row (columns) for which they run.
    programs: target total programs (rows x programs per row); max_programs caps programs per row (powers of two).
    block: elements per step of a segment pass (a power of two).
    cand_factor, n_sample: as in TopkConfig.
    num_warps: warps of the count and compact programs; select_warps: of the per-row select program.
    """

    max_rows: int = 64
    min_row: int = 16384
    programs: int = 256
    max_programs: int = 64
    block: int = 1024
    cand_factor: int = 4
    n_sample: int = 2048
    num_warps: int = 4
    select_warps: int = 8


DEFAULT_TOPK_CONFIG = TopkConfig()
DEFAULT_SPLIT_TOPK_CONFIG = SplitTopkConfig()


def sortable_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys with the same order; -0.0 equals +0.0; non-finite values map to INT32_MIN.

    Every finite value maps above INT32_MIN, so `key > INT32_MIN` means "finite".
    """
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))
    bits = lax.bitcast_convert_type(x, jnp.int32)
    finite = (bits & _EXP_MASK) != _EXP_MASK
    key = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return jnp.where(finite, key, _INT_MIN)


def _count(mask: jax.Array) -> jax.Array:
    return jnp.sum(mask.astype(jnp.int32))


def _cdiv(a, b):
    return (a + b - 1) // b


def _masked_pos(pos, mask, size: int):
    """Scatter positions with masked-off lanes sent out of range (interpret mode writes every lane, then drops
    out-of-range ones; on the GPU masked lanes touch no memory)."""
    return jnp.where(mask, pos, size)


def _append_candidates(ck_ref, ci_ref, row, keys, idx, t_lo, n_c, cand):
    """Appends the (key, index) pairs of one block whose key is >= t_lo, in index order, to the row's candidates
    from slot n_c on (slots past `cand` are dropped). -> the number selected."""
    sel = keys >= t_lo
    pos = n_c + jnp.cumsum(sel.astype(jnp.int32)) - 1
    keep = sel & (pos < cand)
    pos = _masked_pos(pos, keep, cand)
    plgpu.store(ck_ref.at[row, pos], keys, mask=keep)
    plgpu.store(ci_ref.at[row, pos], idx, mask=keep)
    return _count(sel)


def _load_block(x_ref, row, size: int, start, n_live):
    """(keys int32 [size], column indices [size]) of x[row, start:start+size].

    n_live None: the block lies wholly in the live range, and is a plain load with no per-element mask (vectorized
    on the GPU). Otherwise the block straddles the live length: columns >= n_live are never read and get
    INT32_MIN (so are never selected)."""
    idx = start + lax.iota(jnp.int32, size)
    if n_live is None:
        return sortable_keys(x_ref[row, pl.ds(start, size)]), idx
    ok = idx < n_live
    vals = plgpu.load(x_ref.at[row, pl.ds(start, size)], mask=ok, other=-jnp.inf)
    return jnp.where(ok, sortable_keys(vals), _INT_MIN), idx


def _fold_blocks(load, n_valid, size: int, blk: int, body, carry, b0=0, b1=None):
    """carry = body(keys, indices, carry) over the blocks [b0, b1) of a row of `size` elements whose first n_valid
    (<= size) are valid, in index order (default: every block that holds a valid element).

    load(start, n_valid) -> (keys [blk], indices [blk]) of the block at `start`, called with n_valid None for a
    block that is wholly valid. Those blocks are the loop (unmasked loads: a masked one costs a compare and a
    select per element and is not vectorized, since its mask depends on a loaded length); the one block that
    straddles n_valid follows as a single masked step, when [b0, b1) holds it. Blocks past n_valid are skipped.
    """
    n_full = n_valid // blk
    b1 = _cdiv(n_valid, blk) if b1 is None else b1
    if blk <= size:  # else no block is wholly valid (and an unmasked load of one would not fit the row)
        carry = lax.fori_loop(b0, jnp.minimum(b1, n_full), lambda j, c: body(*load(j * blk, None), c), carry)
    straddles = (b0 <= n_full) & (n_full < b1)
    return lax.cond(straddles, lambda c: body(*load(n_full * blk, n_valid), c), lambda c: c, carry)


def _fold_row(x_ref, row, n_live, blk: int, body, carry, b0=0, b1=None):
    """`_fold_blocks` over x[row]'s blocks of `blk` columns whose first n_live are live (`_load_block`)."""
    load = functools.partial(_load_block, x_ref, row, blk)
    return _fold_blocks(load, n_live, x_ref.shape[1], blk, body, carry, b0, b1)


def _kth_largest_key(count_ge, kk):
    """Largest int32 t with count_ge(t) >= kk (kk >= 1), i.e. the kk-th largest key; 32 counting steps."""
    t = jnp.where(count_ge(jnp.int32(0)) >= kk, jnp.int32(0), _INT_MIN)

    def step(i, t):
        cand = t | lax.shift_left(jnp.int32(1), jnp.int32(30) - i)
        return jnp.where(count_ge(cand) >= kk, cand, t)

    return lax.fori_loop(0, 31, step, t)


def _kth_largest_in_registers(keys, kk, lo):
    """The kk-th largest of keys [n] (kk >= 1), given a lower bound lo with count(keys >= lo) >= kk.

    The answer lies in [lo, max(keys)], so it shares their common leading bits: the bitwise search covers only
    the bits below that prefix, and stops early once exactly kk keys lie at or above its bound t (then the answer
    is the smallest of them). Random rows need about half of the 32 steps.
    """
    def count_ge(t):
        return _count(keys >= t)

    hi = jnp.max(keys)
    diff = lo ^ hi
    same_sign = diff >= 0
    # Bit length of diff (>= the true one when the float32 conversion rounds up, which only costs a step).
    exp = lax.shift_right_logical(lax.bitcast_convert_type(jnp.maximum(diff, 1).astype(jnp.float32), jnp.int32),
                                  jnp.int32(23)) & 0xFF
    n_bits = jnp.where(diff > 0, exp - 126, 0)
    low_mask = lax.shift_left(jnp.int32(1), jnp.minimum(n_bits, 31)) - 1
    t0 = jnp.where(same_sign, lo & ~low_mask, jnp.where(count_ge(jnp.int32(0)) >= kk, jnp.int32(0), _INT_MIN))
    n_bits = jnp.where(kk > 0, jnp.where(same_sign, jnp.minimum(n_bits, 31), 31), 0)

    def cond(state):
        i, _, c = state
        return (i >= 0) & (c != kk)

    def body(state):
        i, t, c = state
        cand = t | lax.shift_left(jnp.int32(1), i)
        cc = count_ge(cand)
        take = cc >= kk
        return i - 1, jnp.where(take, cand, t), jnp.where(take, cc, c)

    _, t, c = lax.while_loop(cond, body, (n_bits - 1, t0, count_ge(t0)))
    tau = jnp.where(c == kk, jnp.min(jnp.where(keys >= t, keys, _INT_MAX)), t)
    return jnp.where(kk > 0, tau, _INT_MAX)


def _emit_selected(keys, idx, tau, need_eq, o_ref, row, carry):
    """Stores the indices of one block's keys > tau, and of its keys == tau while fewer than need_eq of those were
    taken (carry: (selected so far, keys == tau so far)), at the next output slots of o_ref[row]."""
    n_sel, n_eq = carry
    gt = keys > tau
    eq = keys == tau
    eq_rank = n_eq + jnp.cumsum(eq.astype(jnp.int32)) - 1
    sel = gt | (eq & (eq_rank < need_eq))
    pos = n_sel + jnp.cumsum(sel.astype(jnp.int32)) - 1
    plgpu.store(o_ref.at[row, _masked_pos(pos, sel, o_ref.shape[1])], idx, mask=sel)
    return n_sel + _count(sel), n_eq + _count(eq)


def _select_into(fold, kk, o_ref, row):
    """Writes the indices of the kk largest keys (ties: first in index order) to o_ref[row, :kk], in index order.

    fold(body, carry) -> carry runs carry = body(keys [blk] int32, indices [blk] int32, carry) over the blocks in
    ascending index order (see `_fold_blocks`); the search makes 33 such passes, the stores one more.
    """
    def count(pred):
        return fold(lambda keys, _idx, c: c + _count(pred(keys)), jnp.int32(0))

    tau = jnp.where(kk > 0, _kth_largest_key(lambda t: count(lambda x: x >= t), jnp.maximum(kk, 1)), _INT_MAX)
    need_eq = kk - count(lambda x: x > tau)
    fold(lambda keys, idx, c: _emit_selected(keys, idx, tau, need_eq, o_ref, row, c), (jnp.int32(0), jnp.int32(0)))


def _select_block_into(keys, idx, kk, lo, o_ref, row):
    """`_select_into` for a single block held in registers, given a lower bound lo with count(keys >= lo) >= kk:
    the search starts at the common prefix of lo and max(keys) and exits early."""
    tau = _kth_largest_in_registers(keys, kk, lo)
    _emit_selected(keys, idx, tau, kk - _count(keys > tau), o_ref, row, (jnp.int32(0), jnp.int32(0)))


def _fill_unselected(o_ref, row, kk, k: int):
    """-1 in o_ref[row, kk:k] (slots the select left empty; disjoint from its stores, so no barrier is needed)."""
    kp = _next_pow2(k)
    lane = lax.iota(jnp.int32, kp)
    plgpu.store(o_ref.at[row, pl.ds(0, kp)], jnp.full((kp,), -1, jnp.int32), mask=(lane >= kk) & (lane < k))


def _sample_threshold(x_ref, row, n_live, *, n_sample: int, target: int, cand: int):
    """t_lo: the rank-th largest of n_sample keys read at an even stride over the live range, with rank chosen so
    that about `target` elements of the row lie at or above it; INT32_MIN + 1 (every finite element) when the
    live range fits the candidate buffer or the sample holds too few finite values."""
    stride = jnp.maximum(1, _cdiv(n_live, n_sample))
    pos = lax.iota(jnp.int32, n_sample) * stride
    ok = pos < n_live
    pos = jnp.minimum(pos, jnp.maximum(n_live - 1, 0))
    vals = plgpu.load(x_ref.at[row, pos], mask=ok, other=-jnp.inf)
    sample = jnp.where(ok, sortable_keys(vals), _INT_MIN)
    finite = sample != _INT_MIN
    n_finite = _count(finite)
    rank = jnp.clip((target + stride // 2) // stride, 1, n_sample)
    lo = jnp.min(jnp.where(finite, sample, _INT_MAX))
    usable = (n_live > cand) & (n_finite >= rank)
    t = _kth_largest_in_registers(sample, jnp.where(usable, rank, 0), jnp.where(usable, lo, _INT_MIN))
    return jnp.where(usable, t, _INT_MIN + 1)


def _live_length(lim_ref, row, s: int):
    return jnp.clip(lim_ref[row] + 1, 0, s)


def _candidate_select(ck_ref, ci_ref, row, n_c, kk, t_lo, o_ref, *, cand: int, sel_blk: int):
    """Exact select over the n_c <= cand candidates (in index order) of ck/ci[row]."""
    lane = lax.iota(jnp.int32, sel_blk)

    def load(start, n_valid):
        if n_valid is None:
            return ck_ref[row, pl.ds(start, sel_blk)], ci_ref[row, pl.ds(start, sel_blk)]
        ok = start + lane < n_valid
        keys = plgpu.load(ck_ref.at[row, pl.ds(start, sel_blk)], mask=ok, other=_INT_MIN)
        idx = plgpu.load(ci_ref.at[row, pl.ds(start, sel_blk)], mask=ok, other=0)
        return jnp.where(ok, keys, _INT_MIN), idx

    if sel_blk == cand:
        _select_block_into(*load(0, n_c), kk, t_lo, o_ref, row)
    else:
        _select_into(functools.partial(_fold_blocks, load, n_c, cand, sel_blk), kk, o_ref, row)


def _row_select(x_ref, row, n_live, kk, o_ref, *, blk: int):
    """Exact select over the whole live range (the fallback)."""
    _select_into(functools.partial(_fold_row, x_ref, row, n_live, blk), kk, o_ref, row)


def _topk_kernel(x_ref, lim_ref, o_ref, ck_ref, ci_ref, *, k, blk, cand, sel_blk, n_sample, target, barrier):
    row = pl.program_id(0)
    n_live = _live_length(lim_ref, row, x_ref.shape[1])
    t_lo = _sample_threshold(x_ref, row, n_live, n_sample=n_sample, target=target, cand=cand)

    def filter_block(keys, idx, carry):
        n_c, n_v = carry
        n_sel = _append_candidates(ck_ref, ci_ref, row, keys, idx, t_lo, n_c, cand)
        return n_c + n_sel, n_v + _count(keys != _INT_MIN)

    n_c, n_v = _fold_row(x_ref, row, n_live, blk, filter_block, (jnp.int32(0), jnp.int32(0)))
    kk = jnp.minimum(jnp.int32(k), n_v)
    if barrier:  # the candidate scratch is visible to every thread from here on (GPU only)
        plgpu.debug_barrier()
    fits = (n_c <= cand) & ((n_c >= k) | (n_c == n_v))

    @pl.when(fits)
    def _():
        _candidate_select(ck_ref, ci_ref, row, n_c, kk, t_lo, o_ref, cand=cand, sel_blk=sel_blk)

    @pl.when(jnp.logical_not(fits))
    def _():
        _row_select(x_ref, row, n_live, kk, o_ref, blk=blk)

    _fill_unselected(o_ref, row, kk, k)


def _sizes(s: int, k: int, block: int, cand_factor: int, n_sample: int):
    """Static sizes: (blk, cand, n_sample, target)."""
    blk = min(block, _next_pow2(s))
    cand = _next_pow2(cand_factor * k)
    n_sample = min(n_sample, _next_pow2(s))
    target = int(math.sqrt(k * cand))
    return blk, cand, n_sample, target


def _topk_one_program_call(x, lim, k: int, interpret: bool, config: TopkConfig):
    """(kernel, pallas_call keyword arguments, arguments) of the one-program-per-row top-k; output 0 is [R, k]."""
    r, s = x.shape
    blk, cand, n_sample, target = _sizes(s, k, config.block, config.cand_factor, config.n_sample)
    kernel = functools.partial(_topk_kernel, k=k, blk=blk, cand=cand, sel_blk=min(cand, config.select_block),
                               n_sample=n_sample, target=target, barrier=not interpret)
    kwargs = dict(
        out_shape=(jax.ShapeDtypeStruct((r, k), jnp.int32),
                   jax.ShapeDtypeStruct((r, cand), jnp.int32),
                   jax.ShapeDtypeStruct((r, cand), jnp.int32)),
        grid=(r,),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
    )
    return kernel, kwargs, (x, lim)


def _split_programs(r: int, s: int, cfg: SplitTopkConfig) -> int:
    blocks = max(1, _cdiv(s, cfg.block))
    return max(1, min(cfg.max_programs, _next_pow2(max(1, cfg.programs // r)), _next_pow2(blocks)))


def _segment(n_live, p, n_prog: int, blk: int):
    """Block range [b0, b1) of program p's segment of the live range."""
    n_blocks = _cdiv(n_live, blk)
    per = _cdiv(n_blocks, n_prog)
    b0 = jnp.minimum(p * per, n_blocks)
    return b0, jnp.minimum(b0 + per, n_blocks)


def _split_count_kernel(x_ref, lim_ref, tlo_ref, cnt_ref, nv_ref, *, n_prog, blk, cand, n_sample, target):
    row, p = pl.program_id(0), pl.program_id(1)
    n_live = _live_length(lim_ref, row, x_ref.shape[1])
    t_lo = _sample_threshold(x_ref, row, n_live, n_sample=n_sample, target=target, cand=cand)
    b0, b1 = _segment(n_live, p, n_prog, blk)

    def count_block(keys, _idx, carry):
        n_c, n_v = carry
        return n_c + _count(keys >= t_lo), n_v + _count(keys != _INT_MIN)

    n_c, n_v = _fold_row(x_ref, row, n_live, blk, count_block, (jnp.int32(0), jnp.int32(0)), b0, b1)
    cnt_ref[row, p] = n_c
    nv_ref[row, p] = n_v

    @pl.when(p == 0)
    def _():
        tlo_ref[row] = t_lo


def _split_compact_kernel(x_ref, lim_ref, tlo_ref, cnt_ref, ck_ref, ci_ref, *, n_prog, blk, cand):
    row, p = pl.program_id(0), pl.program_id(1)
    n_live = _live_length(lim_ref, row, x_ref.shape[1])
    t_lo = tlo_ref[row]
    counts = cnt_ref[row, pl.ds(0, n_prog)]
    base = jnp.sum(jnp.where(lax.iota(jnp.int32, n_prog) < p, counts, 0))
    b0, b1 = _segment(n_live, p, n_prog, blk)

    def compact_block(keys, idx, n_c):
        return n_c + _append_candidates(ck_ref, ci_ref, row, keys, idx, t_lo, n_c, cand)

    @pl.when(base < cand)
    def _():
        _fold_row(x_ref, row, n_live, blk, compact_block, base, b0, b1)


def _split_select_kernel(x_ref, lim_ref, tlo_ref, cnt_ref, nv_ref, ck_ref, ci_ref, o_ref, *, k, n_prog, blk, cand):
    row = pl.program_id(0)
    n_live = _live_length(lim_ref, row, x_ref.shape[1])
    n_c = jnp.sum(cnt_ref[row, pl.ds(0, n_prog)])
    kk = jnp.minimum(jnp.int32(k), jnp.sum(nv_ref[row, pl.ds(0, n_prog)]))
    fits = (n_c <= cand) & ((n_c >= k) | (n_c == kk))

    @pl.when(fits)
    def _():
        _candidate_select(ck_ref, ci_ref, row, n_c, kk, tlo_ref[row], o_ref, cand=cand, sel_blk=cand)

    @pl.when(jnp.logical_not(fits))
    def _():
        _row_select(x_ref, row, n_live, kk, o_ref, blk=blk)

    _fill_unselected(o_ref, row, kk, k)


def _split_calls(x, lim, k: int, interpret: bool, config: SplitTopkConfig):
    """The three split top-k launches as a list of (kernel, pallas_call keyword arguments, input names) with the
    inputs/outputs flowing by name (see `_run_split`)."""
    r, s = x.shape
    blk, cand, n_sample, target = _sizes(s, k, config.block, config.cand_factor, config.n_sample)
    n_prog = _split_programs(r, s, config)
    i32 = jnp.int32
    params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)
    count = (functools.partial(_split_count_kernel, n_prog=n_prog, blk=blk, cand=cand, n_sample=n_sample,
                               target=target),
             dict(out_shape=(jax.ShapeDtypeStruct((r,), i32), jax.ShapeDtypeStruct((r, n_prog), i32),
                             jax.ShapeDtypeStruct((r, n_prog), i32)),
                  grid=(r, n_prog), compiler_params=params, interpret=interpret),
             ("x", "lim"), ("tlo", "cnt", "nv"))
    compact = (functools.partial(_split_compact_kernel, n_prog=n_prog, blk=blk, cand=cand),
               dict(out_shape=(jax.ShapeDtypeStruct((r, cand), i32), jax.ShapeDtypeStruct((r, cand), i32)),
                    grid=(r, n_prog), compiler_params=params, interpret=interpret),
               ("x", "lim", "tlo", "cnt"), ("ck", "ci"))
    select = (functools.partial(_split_select_kernel, k=k, n_prog=n_prog, blk=blk, cand=cand),
              dict(out_shape=jax.ShapeDtypeStruct((r, k), i32), grid=(r,),
                   compiler_params=plgpu.CompilerParams(num_warps=config.select_warps, num_stages=1),
                   interpret=interpret),
              ("x", "lim", "tlo", "cnt", "nv", "ck", "ci"), ("out",))
    return [count, compact, select]


def _run_split(x, lim, calls):
    values = {"x": x, "lim": lim}
    for kernel, kwargs, ins, outs in calls:
        res = pl.pallas_call(kernel, **kwargs)(*(values[n] for n in ins))
        values.update(zip(outs, res if isinstance(res, (tuple, list)) else (res,)))
    return values["out"]


def uses_split(r: int, s: int, split_config: SplitTopkConfig = DEFAULT_SPLIT_TOPK_CONFIG) -> bool:
    """True when `topk_rows` splits each row over several programs (few long rows: decode)."""
    return r <= split_config.max_rows and s >= split_config.min_row


@functools.partial(jax.jit, static_argnames=("k", "interpret", "config", "split_config"))
def topk_rows(x: jax.Array, k: int, row_limits: jax.Array | None = None, *, interpret: bool,
              config: TopkConfig = DEFAULT_TOPK_CONFIG,
              split_config: SplitTopkConfig = DEFAULT_SPLIT_TOPK_CONFIG) -> jax.Array:
    """Top-k over rows x [R, S] (any float dtype, compared as float32) -> int32 [R, k] (layout as `topk`).

    row_limits: int32 [R], the last column of each row to consider (default S - 1); columns past it are never
    read, so the work is bounded by the live length and they may hold anything. -1 (or less): an empty row.
    Few long rows (`uses_split`) run the split kernels, others one program per row. k >= 1 and S >= 1.
    """
    r, s = x.shape
    x = x.astype(jnp.float32)
    lim = jnp.full((r,), s - 1, jnp.int32) if row_limits is None else jnp.asarray(row_limits, jnp.int32)
    if uses_split(r, s, split_config):
        return _run_split(x, lim, _split_calls(x, lim, k, interpret, split_config))
    kernel, kwargs, args = _topk_one_program_call(x, lim, k, interpret, config)
    return pl.pallas_call(kernel, **kwargs)(*args)[0]


def check_k(k) -> int:
    """k as a Python int; ValueError unless it is a non-negative integer (True or 2.5 are refused)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer; got {k!r}")
    return int(k)


def _check_scores(scores) -> None:
    if scores.ndim < 1 or not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be a floating array [..., S]; got shape {scores.shape}, dtype {scores.dtype}")


def _empty_topk(lead, s: int, k: int) -> jax.Array | None:
    """The result when there is nothing to select (no rows, k = 0 or S = 0), else None."""
    if math.prod(lead) and k and s:
        return None
    return jnp.full((*lead, k), -1, jnp.int32)


def topk(scores: jax.Array, k: int, *, interpret: bool | None = None) -> jax.Array:
    """Indices of the k largest finite values of each row (exact, ties to the lower index).

    Args:
      scores: float [..., S] (float32, bfloat16 or float16; compared as float32).
      k: number of indices per row; k > S is allowed.
      interpret: None = Pallas on GPU, interpret mode on CPU.

    Returns:
      int32 [..., k]: the selected column indices in ascending index order, followed by -1 in the slots beyond
      the number of finite values of the row (-inf, +inf and NaN are never selected). Equal to
      `topk_reference(scores, k)`.

    Raises:
      ValueError: for scores that are not a floating array of at least one dimension, or k that is not a
        non-negative integer.
    """
    _check_scores(scores)
    k = check_k(k)
    *lead, s = scores.shape
    if (empty := _empty_topk(lead, s, k)) is not None:
        return empty
    out = topk_rows(scores.reshape(-1, s), k, interpret=resolve_interpret(interpret))
    return out.reshape(*lead, k)


def topk_reference(scores: jax.Array, k: int) -> jax.Array:
    """Pure-JAX `topk` (lax.top_k, stable): same output, same order (ascending index, then -1). Jittable.

    scores: float [..., S]; returns int32 [..., k].
    """
    _check_scores(scores)
    k = check_k(k)
    if (empty := _empty_topk(scores.shape[:-1], scores.shape[-1], k)) is not None:
        return empty
    x = scores.astype(jnp.float32)
    x = jnp.where(jnp.isfinite(x), x, -jnp.inf)
    s = x.shape[-1]
    if k > s:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k - s)], constant_values=-jnp.inf)
    vals, idx = lax.top_k(x, k)
    big = jnp.int32(np.iinfo(np.int32).max)
    idx = jnp.sort(jnp.where(vals == -jnp.inf, big, idx.astype(jnp.int32)), axis=-1)
    return jnp.where(idx == big, -1, idx)
