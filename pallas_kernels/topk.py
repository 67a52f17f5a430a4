"""Exact row-wise top-k selection (k largest finite values) as a Pallas kernel, with a pure-JAX reference.

XLA lowers `lax.top_k` with a large k (2048) to a full sort of every row (KERNELS.md §4.5). The kernel below is
a threshold select instead; one program handles one row:

1. Sample: read every `stride`-th element of the row and find, by a 32-step bitwise search over sortable int32
   keys, a threshold `t_lo` with (in expectation) about sqrt(k * cand) elements of the row at or above it.
2. Filter: one pass over the row counts the finite elements and compacts the (key, index) pairs with key >= t_lo,
   in index order, into a per-row candidate buffer of `cand` slots (cumsum positions, masked scatter stores).
3. Select: if the candidates hold the whole answer (k <= count <= cand, or every finite element), the exact k-th
   largest key tau is found by a bitwise search over the candidates held in registers. Elements > tau are taken,
   then elements == tau in index order until k are taken (ties go to the lower index). Otherwise (the sample was
   unlucky or the row is adversarial, e.g. constant) the same exact select runs over the whole row.

Every input element is read about 1.25 times on the fast path. Non-finite values (-inf, +inf, NaN) are never
selected. Output order: the selected indices in ascending index order, then -1 for the slots beyond the number
of finite values in the row. `topk_reference` returns exactly the same array.
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

_INT_MIN = np.int32(np.iinfo(np.int32).min)
_EXP_MASK = 0x7F800000


@dataclass(frozen=True)
class TopkConfig:
    """Launch settings of the top-k kernel.

    block: elements per step of the row passes (a power of two).
    cand_factor: candidate buffer slots = next power of two of cand_factor * k.
    n_sample: sampled elements per row (a power of two, capped at `block`).
    select_block: candidates held in registers at once during the exact select.
    num_warps: Triton warps per program.
    """

    block: int = 2048
    cand_factor: int = 4
    n_sample: int = 4096
    select_block: int = 8192
    num_warps: int = 8


DEFAULT_TOPK_CONFIG = TopkConfig()


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


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


def _masked_pos(pos, mask, size: int):
    """Scatter positions with masked-off lanes sent out of range (interpret mode writes every lane, then drops
    out-of-range ones; on the GPU masked lanes touch no memory)."""
    return jnp.where(mask, pos, size)


def _kth_largest_key(count_ge, kk):
    """Largest int32 t with count_ge(t) >= kk (kk >= 1), i.e. the kk-th largest key; 32 counting steps."""
    t = jnp.where(count_ge(jnp.int32(0)) >= kk, jnp.int32(0), _INT_MIN)

    def step(i, t):
        cand = t | lax.shift_left(jnp.int32(1), jnp.int32(30) - i)
        return jnp.where(count_ge(cand) >= kk, cand, t)

    return lax.fori_loop(0, 31, step, t)


def _select_into(load, n_blocks: int, kk, o_ref, row):
    """Writes the indices of the kk largest keys (ties: first in load order) to o_ref[row, :kk], in load order.

    load(j) -> (keys [blk] int32, indices [blk] int32) for block j < n_blocks; blocks come in ascending index order.
    """
    if n_blocks == 1:
        keys0, idx0 = load(0)

        def load(_j):  # noqa: F811 - hoist the single block into registers
            return keys0, idx0

    def count(pred):
        if n_blocks == 1:
            return _count(pred(keys0))
        return lax.fori_loop(0, n_blocks, lambda j, c: c + _count(pred(load(j)[0])), jnp.int32(0))

    tau = _kth_largest_key(lambda t: count(lambda x: x >= t), kk)
    need_eq = kk - count(lambda x: x > tau)

    def emit(j, carry):
        n_sel, n_eq = carry
        keys, idx = load(j)
        gt = keys > tau
        eq = keys == tau
        eq_rank = n_eq + jnp.cumsum(eq.astype(jnp.int32)) - 1
        sel = gt | (eq & (eq_rank < need_eq))
        pos = n_sel + jnp.cumsum(sel.astype(jnp.int32)) - 1
        plgpu.store(o_ref.at[row, _masked_pos(pos, sel, o_ref.shape[1])], idx, mask=sel)
        return n_sel + _count(sel), n_eq + _count(eq)

    lax.fori_loop(0, n_blocks, emit, (jnp.int32(0), jnp.int32(0)))


def _topk_kernel(x_ref, o_ref, ck_ref, ci_ref, *, k, kp, blk, n_blocks, cand, sel_blk, n_sample, stride, rank,
                 barrier):
    row = pl.program_id(0)
    lane = lax.iota(jnp.int32, blk)

    if n_sample:
        sample = sortable_keys(x_ref[row, lax.iota(jnp.int32, n_sample) * stride])
        t_lo = _kth_largest_key(lambda t: _count(sample >= t), rank)
        t_lo = jnp.where(_count(sample != _INT_MIN) >= rank, t_lo, _INT_MIN + 1)
    else:
        t_lo = jnp.int32(_INT_MIN + 1)

    def filter_block(j, carry):
        n_c, n_v = carry
        keys = sortable_keys(x_ref[row, pl.ds(j * blk, blk)])
        sel = keys >= t_lo
        pos = n_c + jnp.cumsum(sel.astype(jnp.int32)) - 1
        keep = sel & (pos < cand)
        pos = _masked_pos(pos, keep, cand)
        plgpu.store(ck_ref.at[row, pos], keys, mask=keep)
        plgpu.store(ci_ref.at[row, pos], j * blk + lane, mask=keep)
        return n_c + _count(sel), n_v + _count(keys != _INT_MIN)

    n_c, n_v = lax.fori_loop(0, n_blocks, filter_block, (jnp.int32(0), jnp.int32(0)))
    kk = jnp.minimum(jnp.int32(k), n_v)
    plgpu.store(o_ref.at[row, pl.ds(0, kp)], jnp.full((kp,), -1, jnp.int32), mask=lax.iota(jnp.int32, kp) < k)
    if barrier:  # candidate scratch and the -1 fill are visible to every thread from here on (GPU only)
        plgpu.debug_barrier()
    fits = (n_c <= cand) & ((n_c >= k) | (n_c == n_v))
    c_lane = lax.iota(jnp.int32, sel_blk)

    @pl.when(fits)
    def _():
        def load(j):
            keys = ck_ref[row, pl.ds(j * sel_blk, sel_blk)]
            return jnp.where(j * sel_blk + c_lane < n_c, keys, _INT_MIN), ci_ref[row, pl.ds(j * sel_blk, sel_blk)]

        _select_into(load, cand // sel_blk, kk, o_ref, row)

    @pl.when(jnp.logical_not(fits))
    def _():
        def load(j):
            return sortable_keys(x_ref[row, pl.ds(j * blk, blk)]), j * blk + lane

        _select_into(load, n_blocks, kk, o_ref, row)


def _plan(s: int, k: int, cfg: TopkConfig):
    """Static sizes for a row of s elements: (blk, s_pad, cand, sel_blk, n_sample, stride, rank)."""
    blk = min(cfg.block, _next_pow2(s))
    s_pad = -(-s // blk) * blk
    cand = _next_pow2(cfg.cand_factor * k)
    if cand >= s_pad:
        cand = _next_pow2(s_pad)
        n_sample = stride = rank = 0
    else:
        n_sample = min(cfg.n_sample, blk)
        stride = s_pad // n_sample
        rank = int(min(n_sample, max(1, round(math.sqrt(k * cand) / stride))))
    sel_blk = min(cand, cfg.select_block)
    return blk, s_pad, cand, sel_blk, n_sample, stride, rank


@functools.partial(jax.jit, static_argnames=("k", "interpret", "config"))
def _topk_rows(x, k: int, interpret: bool, config: TopkConfig, out_init=None):
    """x [R, S_pad] float32 with S_pad a multiple of the planned block -> int32 [R, k].

    out_init, when given ([R, k] int32), is aliased to the output (the benchmark poisons it).
    """
    r, s_pad = x.shape
    blk, s_pad2, cand, sel_blk, n_sample, stride, rank = _plan(s_pad, k, config)
    assert s_pad2 == s_pad, (s_pad, blk)
    kernel = functools.partial(
        _topk_kernel, k=k, kp=_next_pow2(k), blk=blk, n_blocks=s_pad // blk, cand=cand, sel_blk=sel_blk,
        n_sample=n_sample, stride=stride, rank=rank, barrier=not interpret)
    out_shapes = (jax.ShapeDtypeStruct((r, k), jnp.int32),
                  jax.ShapeDtypeStruct((r, cand), jnp.int32),
                  jax.ShapeDtypeStruct((r, cand), jnp.int32))
    args = (x,) if out_init is None else (x, out_init)
    call = pl.pallas_call(
        kernel if out_init is None else (lambda x_ref, _i, *outs: kernel(x_ref, *outs)),
        out_shape=out_shapes,
        grid=(r,),
        input_output_aliases={} if out_init is None else {1: 0},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
    )
    return call(*args)[0]


def topk_padded_rows(x: jax.Array, k: int, *, interpret: bool, config: TopkConfig = DEFAULT_TOPK_CONFIG,
                     out_init=None) -> jax.Array:
    """Top-k over rows x [R, S] of any float dtype (S padded with -inf here when needed) -> int32 [R, k]."""
    r, s = x.shape
    blk, s_pad, *_ = _plan(s, k, config)
    x = x.astype(jnp.float32)
    if s_pad != s:
        x = jnp.pad(x, ((0, 0), (0, s_pad - s)), constant_values=-jnp.inf)
    return _topk_rows(x, k, interpret, config, out_init)


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
    out = topk_padded_rows(scores.reshape(-1, s), k, interpret=resolve_interpret(interpret))
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
