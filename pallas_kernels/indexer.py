"""DSA lightning-indexer logits and fused indexer top-k as Pallas (Triton lowering) kernels, with pure-JAX references.

Math (DSA.md §2.1, §2.3):
    out[b, t, s] = k_scale[b, s] * sum_h (w[b, t, h] * q_scale[b, t, h]) * relu(q[b, t, h, :] . k[b, s, :])
and out[b, t, s] = -inf where s > q_positions[b, t] or s >= k_lengths[b]. Without FP8 the scales are 1.

Kernel layout (KERNELS.md §2): one program owns `rows // H` queries (all their heads, `rows` query-head rows of q)
and `block_k * inner` keys; it loops over `inner` key blocks so that Triton pipelines the key loads. Per key block
one MMA [block_k keys, D] x [D, rows] (keys on the M side, as in DeepGEMM), then ReLU, the head weights and the
head sum in an fp32 register epilogue, the per-key FP8 scale after the sum, the causal/length mask, and a store
of the [queries, block_k] logits tile.

`indexer_topk` chains the logits kernel and the top-k kernel (`pallas_kernels.topk`) over query chunks of
`DEFAULT_QUERY_CHUNK` rows, so the full [T, S] logits never exist at once: at most [B, chunk, S] float32 does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._fp8_dot import fp8_dot_nt
from pallas_kernels._platform import resolve_interpret
from pallas_kernels.topk import (
    DEFAULT_TOPK_CONFIG,
    TopkConfig,
    _next_pow2,
    _plan,
    check_k,
    topk_padded_rows,
    topk_reference,
)


@dataclass(frozen=True)
class LogitsConfig:
    """Tile and launch settings of the logits kernel.

    rows: query-head rows per program (queries per program = max(1, rows // H_pad)).
    block_k: keys per MMA; inner: key blocks per program (the loop Triton pipelines).
    kv_major: True puts keys on the MMA M side ([block_k, D] x [D, rows]); False puts query-heads there.
    per_query: True issues one MMA per query ([block_k, D] x [D, H]) and needs no reshape in the epilogue.
    fp8_mma: FP8 inputs use the FP8 MMA (True; `_fp8_dot.fp8_dot_nt`, FP8 wgmma accumulating all D products
      before one fp32 add) or are upcast to bfloat16 in registers for the bf16 MMA (False; exact products, since
      every e4m3 value is a bfloat16 value).
    debug: print the kernel jaxpr and the Triton module when lowering (pallas_call(debug=True)).
    """

    rows: int = 128
    block_k: int = 128
    inner: int = 8
    kv_major: bool = True
    per_query: bool = False
    num_warps: int = 8
    num_stages: int = 2
    fp8_mma: bool = True
    debug: bool = False


# Best bf16 setting on the H100 and best or within 5% of best for FP8 (benchmarks/results/indexer.json sweeps).
DEFAULT_LOGITS_CONFIG = LogitsConfig()


def _default_config(config):
    return DEFAULT_LOGITS_CONFIG if config is None else config


DEFAULT_QUERY_CHUNK = 1024


def _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale) -> None:
    """Raises ValueError, naming the problem, for inputs the indexer functions do not take."""
    if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
        raise ValueError(f"expected q [B, T, H, D], k [B, S, D] and w [B, T, H]; got shapes q {q.shape}, "
                         f"k {k.shape}, w {w.shape}")
    b, t, h, d = q.shape
    s = k.shape[1]
    if k.shape[0] != b or k.shape[2] != d or w.shape != (b, t, h):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, w {w.shape} do not match")
    if not jnp.issubdtype(q.dtype, jnp.floating) or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one floating dtype; got q {q.dtype}, k {k.dtype}")
    expected = {"q_positions": ((t,), (b, t)), "k_lengths": ((), (b,)), "q_scale": ((b, t, h),), "k_scale": ((b, s),)}
    given = {"q_positions": q_positions, "k_lengths": k_lengths, "q_scale": q_scale, "k_scale": k_scale}
    for name, value in given.items():
        if value is not None and jnp.shape(value) not in expected[name]:
            raise ValueError(f"{name} must have shape {' or '.join(map(str, expected[name]))}; "
                             f"got {jnp.shape(value)}")
    for name in ("q_positions", "k_lengths"):
        if given[name] is not None and not jnp.issubdtype(jnp.result_type(given[name]), jnp.integer):
            raise ValueError(f"{name} must be integers; got {jnp.result_type(given[name])}")


def _limits(batch: int, t: int, s: int, q_positions, k_lengths) -> jax.Array:
    """Last valid key per query, int32 [B, T]: min(q_position, k_length - 1, S - 1); -1 or less = no valid key."""
    if q_positions is None:
        qp = jnp.broadcast_to(s - t + jnp.arange(t, dtype=jnp.int32), (batch, t))
    else:
        qp = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (batch, t))
    lim = jnp.minimum(qp, s - 1)
    if k_lengths is not None:
        lim = jnp.minimum(lim, jnp.broadcast_to(jnp.asarray(k_lengths, jnp.int32), (batch,))[:, None] - 1)
    return lim


def _fold_scales(q, w, q_scale, k_scale):
    """Returns (w_eff [B,T,H] f32, k_scale [B,S] f32 or None). FP8 inputs need both scales."""
    w = w.astype(jnp.float32)
    if q.dtype == jnp.float8_e4m3fn:
        if q_scale is None or k_scale is None:
            raise ValueError("float8_e4m3fn inputs need q_scale [B, T, H] and k_scale [B, S]")
        return w * q_scale.reshape(w.shape).astype(jnp.float32), k_scale.astype(jnp.float32)
    if q_scale is not None:
        w = w * q_scale.reshape(w.shape).astype(jnp.float32)
    return w, (None if k_scale is None else k_scale.astype(jnp.float32))


# float32 inputs get IEEE products (bf16/fp8 are unaffected): TF32 rounding would move top-k boundaries.
_EXACT_F32 = lax.Precision.HIGHEST


def _logits_kernel(*refs, bq, hp, bk, inner, kv_major, per_query, has_scale, upcast):
    if has_scale:
        q_ref, k_ref, w_ref, lim_ref, ks_ref, o_ref = refs
    else:
        q_ref, k_ref, w_ref, lim_ref, o_ref = refs
    s_base = pl.program_id(2) * (bk * inner)
    dims_nt = (((1,), (1,)), ((), ()))
    cast = (lambda x: x.astype(jnp.bfloat16)) if upcast else (lambda x: x)
    if per_query:
        qs = [cast(q_ref[pl.ds(i * hp, hp), :]) for i in range(bq)]
        ws = [w_ref[i, :] for i in range(bq)]
        lims = [lim_ref[i] for i in range(bq)]
    else:
        qb = cast(q_ref[...])
        wb = w_ref[...]
        lim = lim_ref[...]

    def dot_nt(a, b):  # a [m, D] . b [n, D] -> f32 [m, n]
        if a.dtype == jnp.float8_e4m3fn:
            return fp8_dot_nt(a, b)
        return lax.dot_general(a, b, dims_nt, preferred_element_type=jnp.float32, precision=_EXACT_F32)

    def body(j, carry):
        off = pl.multiple_of(j * bk, bk)
        kb = cast(k_ref[pl.ds(off, bk), :])
        sidx = s_base + off + lax.iota(jnp.int32, bk)
        ks = ks_ref[pl.ds(off, bk)] if has_scale else None
        if per_query:
            for i in range(bq):
                sc = dot_nt(kb, qs[i])  # [bk, hp]
                lg = jnp.sum(jnp.maximum(sc, 0.0) * ws[i][None, :], axis=1)
                if has_scale:
                    lg = lg * ks
                o_ref[i, pl.ds(off, bk)] = jnp.where(sidx <= lims[i], lg, -jnp.inf)
            return carry
        if kv_major:
            sc = dot_nt(kb, qb)  # [bk, bq*hp]
            sc = jnp.maximum(sc, 0.0).reshape(bk, bq, hp)
            lg = jnp.sum(sc * wb[None, :, :], axis=2)  # [bk, bq]
            if has_scale:
                lg = lg * ks[:, None]
            lg = jnp.where(sidx[:, None] <= lim[None, :], lg, -jnp.inf)
            o_ref[:, pl.ds(off, bk)] = lg.T
        else:
            sc = dot_nt(qb, kb)  # [bq*hp, bk]
            sc = jnp.maximum(sc, 0.0).reshape(bq, hp, bk)
            lg = jnp.sum(sc * wb[:, :, None], axis=1)  # [bq, bk]
            if has_scale:
                lg = lg * ks[None, :]
            o_ref[:, pl.ds(off, bk)] = jnp.where(sidx[None, :] <= lim[:, None], lg, -jnp.inf)
        return carry

    # Key tiles past every query's last valid key (most of a long prefill chunk's cache) are -inf: skip the MMAs.
    last_valid = functools.reduce(jnp.maximum, lims) if per_query else jnp.max(lim)

    def compute():
        lax.fori_loop(0, inner, body, 0)

    def fill_masked():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)

    lax.cond(s_base <= last_valid, compute, fill_masked)


@dataclass(frozen=True)
class _Geometry:
    hp: int
    dp: int
    bq: int
    bk: int
    inner: int
    t_pad: int
    s_pad: int


def _geometry(t: int, s: int, h: int, d: int, cfg: LogitsConfig, s_multiple: int = 1, t_multiple: int = 1):
    hp = _next_pow2(h)
    dp = max(16, _next_pow2(d))
    bq = max(1, cfg.rows // hp)
    bk = min(cfg.block_k, max(16, _next_pow2(s)))
    inner = min(cfg.inner, _next_pow2(-(-s // bk)))
    tile_s = max(bk * inner, s_multiple)
    t_mult = max(bq, t_multiple)
    return _Geometry(hp, dp, bq, bk, inner, -(-t // t_mult) * t_mult, -(-s // tile_s) * tile_s)


def _pad_inputs(q, k, w_eff, ks, lim, g: _Geometry):
    b, t, h, d = q.shape
    s = k.shape[1]
    q = jnp.pad(q, ((0, 0), (0, g.t_pad - t), (0, g.hp - h), (0, g.dp - d)))
    k = jnp.pad(k, ((0, 0), (0, g.s_pad - s), (0, g.dp - d)))
    w_eff = jnp.pad(w_eff, ((0, 0), (0, g.t_pad - t), (0, g.hp - h)))
    lim = jnp.pad(lim, ((0, 0), (0, g.t_pad - t)), constant_values=-1)
    if ks is not None:
        ks = jnp.pad(ks, ((0, 0), (0, g.s_pad - s)))
    return q, k, w_eff, ks, lim


def _logits_call(q, k, w_eff, ks, lim, g: _Geometry, cfg: LogitsConfig, interpret: bool, out_init=None):
    """Padded inputs -> float32 [B, t_pad, s_pad] logits (padded rows and columns are -inf)."""
    b, t_pad = lim.shape
    s_pad = k.shape[1]
    has_scale = ks is not None
    tile_s = g.bk * g.inner
    q3 = q.reshape(b, t_pad * g.hp, g.dp)
    in_specs = [
        pl.BlockSpec((None, g.bq * g.hp, g.dp), lambda bi, i, j: (bi, i, 0)),
        pl.BlockSpec((None, tile_s, g.dp), lambda bi, i, j: (bi, j, 0)),
        pl.BlockSpec((None, g.bq, g.hp), lambda bi, i, j: (bi, i, 0)),
        pl.BlockSpec((None, g.bq), lambda bi, i, j: (bi, i)),
    ]
    args = [q3, k, w_eff, lim]
    if has_scale:
        in_specs.append(pl.BlockSpec((None, tile_s), lambda bi, i, j: (bi, j)))
        args.append(ks)
    kernel = functools.partial(_logits_kernel, bq=g.bq, hp=g.hp, bk=g.bk, inner=g.inner, kv_major=cfg.kv_major,
                               per_query=cfg.per_query, has_scale=has_scale,
                               upcast=_is_fp8(q) and not cfg.fp8_mma)
    aliases = {}
    if out_init is not None:
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(out_init)
        aliases = {len(args) - 1: 0}
        inner_kernel = kernel

        def kernel(*refs):
            return inner_kernel(*refs[:-2], refs[-1])

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, t_pad, s_pad), jnp.float32),
        grid=(b, t_pad // g.bq, s_pad // tile_s),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, g.bq, tile_s), lambda bi, i, j: (bi, i, j)),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        debug=cfg.debug,
    )(*args)


@functools.partial(jax.jit, static_argnames=("interpret", "config"))
def _indexer_logits_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale, *, interpret: bool,
                         config: LogitsConfig | None = None, out_init=None):
    b, t, h, d = q.shape
    config = _default_config(config)
    s = k.shape[1]
    w_eff, ks = _fold_scales(q, w, q_scale, k_scale)
    g = _geometry(t, s, h, d, config)
    lim = _limits(b, t, s, q_positions, k_lengths)
    padded = _pad_inputs(q, k, w_eff, ks, lim, g)
    out = _logits_call(*padded, g, config, interpret, out_init)
    if (g.t_pad, g.s_pad) != (t, s):
        out = out[:, :t, :s]
    return out


def indexer_logits(q, k, w, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None, interpret=None):
    """Indexer logits out[b,t,s] = k_scale[b,s] * sum_h w[b,t,h] * q_scale[b,t,h] * relu(q[b,t,h,:] . k[b,s,:]).

    Args:
      q: [B, T, H, D] bfloat16 (or float16 / float32), or float8_e4m3fn with q_scale.
      k: [B, S, D], same dtype as q.
      w: [B, T, H] float32 head weights with every constant folded in.
      q_positions: int [B, T] or [T]; default S - T + arange(T). Key s is valid for query t iff s <= q_positions.
      k_lengths: int [B]; keys s >= k_lengths[b] are invalid. Default: all S keys valid.
      q_scale: float32 [B, T, H] (FP8 per-(t, h) scale); k_scale: float32 [B, S] (FP8 per-key scale).
      interpret: None = Pallas on GPU, interpret mode on CPU.

    Returns:
      float32 [B, T, S]; -inf where the key is invalid for the query.

    Raises:
      ValueError: for shapes that do not match, q and k of different or non-floating dtypes, or non-integer
        positions or lengths.
    """
    _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale)
    if not q.size or not k.shape[1]:
        return jnp.full((q.shape[0], q.shape[1], k.shape[1]), -jnp.inf, jnp.float32)
    return _indexer_logits_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale,
                                interpret=resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("topk", "interpret", "config", "topk_config", "query_chunk"))
def _indexer_topk_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale, *, topk: int, interpret: bool,
                       config: LogitsConfig | None = None, topk_config: TopkConfig = DEFAULT_TOPK_CONFIG,
                       query_chunk: int = DEFAULT_QUERY_CHUNK):
    b, t, h, d = q.shape
    config = _default_config(config)
    s = k.shape[1]
    w_eff, ks = _fold_scales(q, w, q_scale, k_scale)
    blk = _plan(s, topk, topk_config)[0]
    g0 = _geometry(t, s, h, d, config, s_multiple=blk)
    chunk = min(-(-query_chunk // g0.bq) * g0.bq, g0.t_pad)
    g = _geometry(t, s, h, d, config, s_multiple=blk, t_multiple=chunk)
    lim = _limits(b, t, s, q_positions, k_lengths)
    qp, kp, wp, ksp, limp = _pad_inputs(q, k, w_eff, ks, lim, g)
    n_chunks = g.t_pad // chunk
    gc = _Geometry(g.hp, g.dp, g.bq, g.bk, g.inner, chunk, g.s_pad)

    def one_chunk(xs):
        qc, wc, limc = xs
        logits = _logits_call(qc, kp, wc, ksp, limc, gc, config, interpret)  # [B, chunk, s_pad]
        idx = topk_padded_rows(logits.reshape(b * chunk, g.s_pad), topk, interpret=interpret, config=topk_config)
        return idx.reshape(b, chunk, topk)

    def split(x):  # [B, t_pad, ...] -> [n_chunks, B, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

    out = lax.map(one_chunk, (split(qp), split(wp), split(limp)))  # [n_chunks, B, chunk, topk]
    out = jnp.moveaxis(out, 0, 1).reshape(b, g.t_pad, topk)
    return out[:, :t] if g.t_pad != t else out


def indexer_topk(q, k, w, topk, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None, interpret=None):
    """Fused indexer step: `topk(indexer_logits(q, k, w, ...), topk)` without the full [T, S] logits in HBM.

    Arguments as `indexer_logits`, plus topk (int, may exceed S). Returns int32 [B, T, topk]: per query the key
    indices of the topk largest valid logits in ascending index order (ties go to the lower key index), then -1
    for the slots beyond the number of valid keys. Works through query chunks of DEFAULT_QUERY_CHUNK rows.

    Raises:
      ValueError: as `indexer_logits`, and for a topk that is not a non-negative integer.
    """
    _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale)
    topk = check_k(topk)
    if not q.size or not k.shape[1] or not topk:
        return jnp.full((q.shape[0], q.shape[1], topk), -1, jnp.int32)
    return _indexer_topk_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale, topk=topk,
                              interpret=resolve_interpret(interpret))


# ---------------------------------------------------------------------------------------------------------------
# Pure-JAX references (jittable; used by the model on CPU and as the XLA baseline in benchmarks/indexer.py).

_REF_CHUNK_ELEMS = 1 << 29  # float32 elements of one query chunk's [B, chunk, H, S] scores (2 GiB)


def _ref_chunk(b: int, t: int, h: int, s: int) -> int:
    per_query = max(1, b * h * s)
    return max(1, min(t, 1 << int(np.log2(max(1, _REF_CHUNK_ELEMS // per_query)))))


def _ref_chunk_logits(qc, k, wc, ks, limc):
    """qc [B, c, H, D], wc [B, c, H], limc [B, c] -> float32 [B, c, S]."""
    cd = jnp.bfloat16 if _is_fp8(qc) else qc.dtype
    sc = jnp.einsum("bthd,bsd->bths", qc.astype(cd), k.astype(cd), preferred_element_type=jnp.float32,
                    precision=lax.Precision.HIGHEST)
    lg = jnp.sum(jnp.maximum(sc, 0.0) * wc[..., None], axis=2)
    if ks is not None:
        lg = lg * ks[:, None, :]
    s_idx = jnp.arange(k.shape[1], dtype=jnp.int32)
    return jnp.where(s_idx[None, None, :] <= limc[..., None], lg, -jnp.inf)


def _is_fp8(x) -> bool:
    """True for float8_e4m3fn arrays (exactly representable in bfloat16)."""
    return x.dtype == jnp.float8_e4m3fn


def _ref_map_chunks(fn, q, w_eff, lim, chunk):
    """Applies fn(q_c, w_c, lim_c) -> [B, c, X] over query chunks (lax.map) and reassembles [B, T, X]."""
    b, t = lim.shape
    if chunk >= t:
        return fn(q, w_eff, lim)
    n = -(-t // chunk)
    pad = n * chunk - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    w_eff = jnp.pad(w_eff, ((0, 0), (0, pad), (0, 0)))
    lim = jnp.pad(lim, ((0, 0), (0, pad)), constant_values=-1)

    def split(x):
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    out = lax.map(lambda xs: fn(*xs), (split(q), split(w_eff), split(lim)))
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(b, n * chunk, *out.shape[3:])[:, :t]


def indexer_logits_reference(q, k, w, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None):
    """Pure-JAX `indexer_logits` (einsum + relu + weighted head sum, scanned over query chunks). Jittable.

    Same arguments and result as `indexer_logits` (without `interpret`).
    """
    _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale)
    b, t, h, _ = q.shape
    s = k.shape[1]
    w_eff, ks = _fold_scales(q, w, q_scale, k_scale)
    lim = _limits(b, t, s, q_positions, k_lengths)
    return _ref_map_chunks(lambda qc, wc, lc: _ref_chunk_logits(qc, k, wc, ks, lc), q, w_eff, lim,
                           _ref_chunk(b, t, h, s))


def indexer_topk_reference(q, k, w, topk, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None):
    """Pure-JAX `indexer_topk`: per query chunk, reference logits then `topk_reference` (lax.top_k). Jittable.

    Never materializes more than one chunk of logits; same result layout as `indexer_topk`.
    """
    _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale)
    b, t, h, _ = q.shape
    s = k.shape[1]
    w_eff, ks = _fold_scales(q, w, q_scale, k_scale)
    lim = _limits(b, t, s, q_positions, k_lengths)
    return _ref_map_chunks(lambda qc, wc, lc: topk_reference(_ref_chunk_logits(qc, k, wc, ks, lc), topk),
                           q, w_eff, lim, _ref_chunk(b, t, h, s))
