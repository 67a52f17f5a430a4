"""DSA lightning-indexer logits and fused indexer top-k as Pallas (Triton lowering) kernels, with pure-JAX references.

Math (docs/math.md, "The lightning indexer", "FP8 indexer"):
    out[b, t, s] = k_scale[b, s] * sum_h (w[b, t, h] * q_scale[b, t, h]) * relu(q[b, t, h, :] . k[b, s, :])
and out[b, t, s] = -inf where s > q_positions[b, t] or s >= k_lengths[b]. Without FP8 the scales are 1.

Key window: every function takes `key_offset` (int32 scalar, may be traced) and `num_keys` (static int). The keys
considered are k[:, key_offset : key_offset + num_keys] (k_scale likewise), read in place: a cache that stacks
the keys of several layers along one axis ([B, layers * S, D]) is passed whole, with key_offset = layer * S. All
positions (q_positions, k_lengths, the returned indices) are relative to key_offset.

Live length: the last valid key of query t is limit[b, t] = min(q_positions[b, t], k_lengths[b] - 1,
num_keys - 1). The work is bounded by it, with static shapes: the logits kernel skips key tiles past every query of
its block, the top-k kernels read each row only up to its limit, and the references loop over key blocks up to the
largest limit (a traced trip count).

Kernel layout (docs/kernels.md, "Indexer logits"): one program owns `rows // H` queries (all their heads, `rows` query-head rows of q)
and `block_k * inner` keys; it loops over `inner` key blocks so that Triton pipelines the key loads. Per key block
one MMA [block_k keys, D] x [D, rows] (keys on the M side, as in DeepGEMM), then ReLU, the head weights and the
head sum in an fp32 register epilogue, the per-key FP8 scale after the sum, the causal/length mask, and a store
of the [queries, block_k] logits tile.

`indexer_topk` chains the logits kernel and the top-k kernels (`pallas_kernels.topk`) over query chunks of
`DEFAULT_QUERY_CHUNK` rows, so the full [T, S] logits never exist at once: at most [B, chunk, S] float32 does.
Its logits tiles past every query's limit are never written, and the top-k never reads them. Few rows (decode)
take the split top-k, which spreads each row over many programs.
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
from pallas_kernels._util import EXACT_F32, next_pow2
from pallas_kernels.topk import (
    DEFAULT_SPLIT_TOPK_CONFIG,
    DEFAULT_TOPK_CONFIG,
    SplitTopkConfig,
    TopkConfig,
    check_k,
    topk_rows,
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
    """

    rows: int = 128
    block_k: int = 128
    inner: int = 8
    kv_major: bool = True
    per_query: bool = False
    num_warps: int = 8
    num_stages: int = 2
    fp8_mma: bool = True


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


def _concrete_int(x):
    """x as a Python int when it is concrete, None when it is traced."""
    try:
        return int(np.asarray(x))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
            jax.errors.TracerIntegerConversionError):
        return None


def _key_window(s_total: int, key_offset, num_keys) -> tuple[jax.Array, int]:
    """(offset int32 scalar, number of keys n) of the key window k[:, offset : offset + n].

    A concrete offset is checked against the buffer; a traced one is clamped into [0, s_total - n].
    """
    if isinstance(num_keys, (bool, np.bool_)) or not isinstance(num_keys, (int, np.integer, type(None))):
        raise ValueError(f"num_keys must be a static integer; got {num_keys!r}")
    num_keys = None if num_keys is None else int(num_keys)
    if key_offset is None:
        n = s_total if num_keys is None else num_keys
        if not 0 <= n <= s_total:
            raise ValueError(f"num_keys must be an integer in [0, {s_total}] (the keys in k); got {num_keys!r}")
        return jnp.zeros((), jnp.int32), n
    if jnp.ndim(key_offset) != 0 or not jnp.issubdtype(jnp.result_type(key_offset), jnp.integer):
        raise ValueError(f"key_offset must be an integer scalar; got {key_offset!r}")
    off = _concrete_int(key_offset)
    if num_keys is None:
        if off is None:
            raise ValueError("num_keys (a static int) is required with a traced key_offset")
        num_keys = s_total - off
    if not 0 <= num_keys <= s_total:
        raise ValueError(f"num_keys must be an integer in [0, {s_total}] (the keys in k); got {num_keys!r}")
    if off is not None:
        if not 0 <= off <= s_total - num_keys:
            raise ValueError(f"key window [{off}, {off + num_keys}) is outside the {s_total} keys of k")
        return jnp.asarray(off, jnp.int32), num_keys
    return jnp.clip(jnp.asarray(key_offset, jnp.int32), 0, s_total - num_keys), num_keys


def _limits(batch: int, t: int, n: int, q_positions, k_lengths) -> jax.Array:
    """Last valid key per query, int32 [B, T]: min(q_position, k_length - 1, n - 1); -1 or less = no valid key."""
    if q_positions is None:
        qp = jnp.broadcast_to(n - t + jnp.arange(t, dtype=jnp.int32), (batch, t))
    else:
        qp = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (batch, t))
    lim = jnp.minimum(qp, n - 1)
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


def _logits_kernel(*refs, bq, hp, bk, inner, kv_major, per_query, has_scale, upcast, fill_dead):
    if has_scale:
        q_ref, k_ref, w_ref, lim_ref, off_ref, ks_ref, o_ref = refs
    else:
        q_ref, k_ref, w_ref, lim_ref, off_ref, o_ref = refs
    s_base = pl.program_id(2) * (bk * inner)  # window-relative index of this program's first key
    s_total = k_ref.shape[0]
    k_base = off_ref[0] + s_base  # its index in k
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
        return lax.dot_general(a, b, dims_nt, preferred_element_type=jnp.float32, precision=EXACT_F32)

    def body(j, carry):
        off = pl.multiple_of(j * bk, bk)
        # The window's last tile may run past k's end: those rows are not read (their logits are masked below).
        in_k = k_base + off + lax.iota(jnp.int32, bk) < s_total
        kb = cast(plgpu.load(k_ref.at[pl.ds(k_base + off, bk), :], mask=in_k[:, None]))
        sidx = s_base + off + lax.iota(jnp.int32, bk)
        ks = plgpu.load(ks_ref.at[pl.ds(k_base + off, bk)], mask=in_k) if has_scale else None
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

    # Key tiles past every query's last valid key (all but the live ones in decode, most of a long prefill chunk's
    # cache) skip the MMAs; they are filled with -inf for `indexer_logits`, and left unwritten for the fused top-k,
    # which never reads past a row's limit.
    last_valid = functools.reduce(jnp.maximum, lims) if per_query else jnp.max(lim)

    @pl.when(s_base <= last_valid)
    def _():
        lax.fori_loop(0, inner, body, 0)

    if fill_dead:
        @pl.when(s_base > last_valid)
        def _():
            o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


@dataclass(frozen=True)
class _Geometry:
    hp: int
    dp: int
    bq: int
    bk: int
    inner: int
    t_pad: int
    n_pad: int


def _geometry(t: int, n: int, h: int, d: int, cfg: LogitsConfig, t_multiple: int = 1):
    """Tile sizes for T queries over a window of n keys (n_pad: the window rounded up to whole tiles)."""
    hp = next_pow2(h)
    dp = max(16, next_pow2(d))
    bq = max(1, cfg.rows // hp)
    bk = min(cfg.block_k, max(16, next_pow2(n)))
    inner = min(cfg.inner, next_pow2(-(-n // bk)))
    tile_s = bk * inner
    t_mult = max(bq, t_multiple)
    return _Geometry(hp, dp, bq, bk, inner, -(-t // t_mult) * t_mult, -(-n // tile_s) * tile_s)


def _pad_inputs(q, k, w_eff, ks, lim, g: _Geometry):
    """Pads the query side to whole tiles. k is padded only where the MMA needs it (a head dim that is not a power
    of two >= 16, or fewer keys in the whole buffer than one key block): never at production sizes, where the
    cache is read in place."""
    b, t, h, d = q.shape
    s_total = k.shape[1]
    q = jnp.pad(q, ((0, 0), (0, g.t_pad - t), (0, g.hp - h), (0, g.dp - d)))
    w_eff = jnp.pad(w_eff, ((0, 0), (0, g.t_pad - t), (0, g.hp - h)))
    lim = jnp.pad(lim, ((0, 0), (0, g.t_pad - t)), constant_values=-1)
    s_min = max(s_total, g.bk)
    if g.dp != d or s_min != s_total:
        k = jnp.pad(k, ((0, 0), (0, s_min - s_total), (0, g.dp - d)))
        if ks is not None:
            ks = jnp.pad(ks, ((0, 0), (0, s_min - s_total)))
    return q, k, w_eff, ks, lim


def _logits_call_parts(q, k, w_eff, ks, lim, off, g: _Geometry, cfg: LogitsConfig, interpret: bool,
                       fill_dead: bool):
    """(kernel, pallas_call keyword arguments, arguments) of the logits kernel on padded inputs; the call returns
    float32 [B, t_pad, n_pad] logits of the window starting at k[:, off] (padded rows and columns are -inf)."""
    b, t_pad = lim.shape
    s_total = k.shape[1]
    has_scale = ks is not None
    tile_s = g.bk * g.inner
    q3 = q.reshape(b, t_pad * g.hp, g.dp)
    in_specs = [
        pl.BlockSpec((None, g.bq * g.hp, g.dp), lambda bi, i, j: (bi, i, 0)),
        pl.BlockSpec((None, s_total, g.dp), lambda bi, i, j: (bi, 0, 0)),  # the whole buffer: tiles index it
        pl.BlockSpec((None, g.bq, g.hp), lambda bi, i, j: (bi, i, 0)),
        pl.BlockSpec((None, g.bq), lambda bi, i, j: (bi, i)),
        pl.BlockSpec((1,), lambda bi, i, j: (0,)),
    ]
    args = [q3, k, w_eff, lim, jnp.reshape(off, (1,)).astype(jnp.int32)]
    if has_scale:
        in_specs.append(pl.BlockSpec((None, s_total), lambda bi, i, j: (bi, 0)))
        args.append(ks)
    kernel = functools.partial(_logits_kernel, bq=g.bq, hp=g.hp, bk=g.bk, inner=g.inner, kv_major=cfg.kv_major,
                               per_query=cfg.per_query, has_scale=has_scale,
                               upcast=_is_fp8(q) and not cfg.fp8_mma, fill_dead=fill_dead)
    kwargs = dict(
        out_shape=jax.ShapeDtypeStruct((b, t_pad, g.n_pad), jnp.float32),
        grid=(b, t_pad // g.bq, g.n_pad // tile_s),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, g.bq, tile_s), lambda bi, i, j: (bi, i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
    )
    return kernel, kwargs, args


def _logits_call(*args, **kwargs):
    kernel, pallas_kwargs, call_args = _logits_call_parts(*args, **kwargs)
    return pl.pallas_call(kernel, **pallas_kwargs)(*call_args)


def _logits_prepare(q, k, w, q_positions, k_lengths, q_scale, k_scale, key_offset, num_keys, config,
                    t_multiple=None):
    """Shared front of the logits kernel wrappers: (padded inputs, offset, geometry)."""
    b, t, h, d = q.shape
    n = num_keys
    w_eff, ks = _fold_scales(q, w, q_scale, k_scale)
    g = _geometry(t, n, h, d, config)
    if t_multiple is not None:
        g = _geometry(t, n, h, d, config, t_multiple=min(-(-t_multiple // g.bq) * g.bq, g.t_pad))
    lim = _limits(b, t, n, q_positions, k_lengths)
    return _pad_inputs(q, k, w_eff, ks, lim, g), key_offset, g


@functools.partial(jax.jit, static_argnames=("num_keys", "interpret", "config"))
def _indexer_logits_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale, key_offset=0, *, num_keys: int,
                         interpret: bool, config: LogitsConfig | None = None):
    b, t = q.shape[:2]
    config = _default_config(config)
    padded, off, g = _logits_prepare(q, k, w, q_positions, k_lengths, q_scale, k_scale, key_offset, num_keys,
                                     config)
    out = _logits_call(*padded, off, g, config, interpret, fill_dead=True)
    if (g.t_pad, g.n_pad) != (t, num_keys):
        out = out[:, :t, :num_keys]
    return out


def indexer_logits(q, k, w, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None, key_offset=None,
                   num_keys=None, interpret=None):
    """Indexer logits out[b,t,s] = k_scale[b,s] * sum_h w[b,t,h] * q_scale[b,t,h] * relu(q[b,t,h,:] . k[b,s,:]).

    Args:
      q: [B, T, H, D] bfloat16 (or float16 / float32), or float8_e4m3fn with q_scale.
      k: [B, S, D], same dtype as q: the key buffer, of which the window k[:, key_offset : key_offset + num_keys]
        is used (read in place).
      w: [B, T, H] float32 head weights with every constant folded in.
      q_positions: int [B, T] or [T], window-relative; default num_keys - T + arange(T). Key s is valid for query
        t iff s <= q_positions.
      k_lengths: int [B]; window keys s >= k_lengths[b] are invalid. Default: all num_keys keys valid.
      q_scale: float32 [B, T, H] (FP8 per-(t, h) scale); k_scale: float32 [B, S] (FP8 per-key scale, same
        buffer layout as k).
      key_offset: int scalar (may be traced; default 0): the window's first key in k. A concrete offset must keep
        the window inside k (ValueError otherwise); a traced one is clamped into [0, S - num_keys].
      num_keys: static int, the window's length; default S - key_offset (required when key_offset is traced).
      interpret: None = Pallas on GPU, interpret mode on CPU.

    Returns:
      float32 [B, T, num_keys]; -inf where the key is invalid for the query.

    Raises:
      ValueError: for shapes that do not match, q and k of different or non-floating dtypes, non-integer
        positions or lengths, or a key window outside k.
    """
    _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale)
    off, n = _key_window(k.shape[1], key_offset, num_keys)
    if not q.size or not n:
        return jnp.full((q.shape[0], q.shape[1], n), -jnp.inf, jnp.float32)
    return _indexer_logits_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale, off, num_keys=n,
                                interpret=resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("topk", "num_keys", "interpret", "config", "topk_config",
                                             "split_config", "query_chunk"))
def _indexer_topk_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale, key_offset=0, *, topk: int,
                       num_keys: int, interpret: bool, config: LogitsConfig | None = None,
                       topk_config: TopkConfig = DEFAULT_TOPK_CONFIG,
                       split_config: SplitTopkConfig = DEFAULT_SPLIT_TOPK_CONFIG,
                       query_chunk: int = DEFAULT_QUERY_CHUNK):
    b, t = q.shape[:2]
    config = _default_config(config)
    (qp, kp, wp, ksp, limp), off, g = _logits_prepare(q, k, w, q_positions, k_lengths, q_scale, k_scale,
                                                      key_offset, num_keys, config, t_multiple=query_chunk)
    if t == 1:
        # Decode: each batch row's one query is row 0 of its padded query block. Seen as [B, t_pad * n_pad], a
        # batch row's logits row starts its row, and the row limit keeps the top-k inside it: B rows, not
        # B * t_pad, so that few rows take the split top-k.
        logits = _logits_call(qp, kp, wp, ksp, limp, off, g, config, interpret, fill_dead=False)
        idx = topk_rows(logits.reshape(b, g.t_pad * g.n_pad), topk, limp[:, 0], interpret=interpret,
                        config=topk_config, split_config=split_config)
        return idx[:, None, :]
    chunk = min(-(-query_chunk // g.bq) * g.bq, g.t_pad)
    n_chunks = g.t_pad // chunk
    gc = _Geometry(g.hp, g.dp, g.bq, g.bk, g.inner, chunk, g.n_pad)

    def one_chunk(xs):
        qc, wc, limc = xs
        logits = _logits_call(qc, kp, wc, ksp, limc, off, gc, config, interpret, fill_dead=False)
        idx = topk_rows(logits.reshape(b * chunk, g.n_pad), topk, limc.reshape(b * chunk), interpret=interpret,
                        config=topk_config, split_config=split_config)
        return idx.reshape(b, chunk, topk)

    def split(x):  # [B, t_pad, ...] -> [n_chunks, B, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 1, 0)

    out = lax.map(one_chunk, (split(qp), split(wp), split(limp)))  # [n_chunks, B, chunk, topk]
    out = jnp.moveaxis(out, 0, 1).reshape(b, g.t_pad, topk)
    return out[:, :t] if g.t_pad != t else out


def indexer_topk(q, k, w, topk, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None, key_offset=None,
                 num_keys=None, interpret=None):
    """Fused indexer step: `topk(indexer_logits(q, k, w, ...), topk)` without the full [T, S] logits in HBM.

    Arguments as `indexer_logits` (key window included), plus topk (int, may exceed num_keys). Returns int32
    [B, T, topk]: per query the window-relative key indices (in [0, num_keys)) of the topk largest valid logits
    in ascending index order (ties go to the lower key index), then -1 for the slots beyond the number of valid
    keys. Works through query chunks of DEFAULT_QUERY_CHUNK rows; each row's top-k reads only its live keys, and
    few rows (decode) split each row over many programs.

    Raises:
      ValueError: as `indexer_logits`, and for a topk that is not a non-negative integer.
    """
    _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale)
    topk = check_k(topk)
    off, n = _key_window(k.shape[1], key_offset, num_keys)
    if not q.size or not n or not topk:
        return jnp.full((q.shape[0], q.shape[1], topk), -1, jnp.int32)
    return _indexer_topk_impl(q, k, w, q_positions, k_lengths, q_scale, k_scale, off, topk=topk, num_keys=n,
                              interpret=resolve_interpret(interpret))


# ---------------------------------------------------------------------------------------------------------------
# Pure-JAX references (jittable; used by the model on CPU and as the XLA baseline in the benchmarks). They loop
# over key blocks of the window up to the largest live limit (a traced trip count): no copy of the key window,
# no [B, T, num_keys] logits in the top-k, and time that follows the live length rather than num_keys.
# One exception, XLA's and not ours: the CPU backend computes a dynamic slice of a bfloat16 or float8 buffer in
# float32 and hoists the conversion of the whole buffer out of the loop, so on CPU only float32 keys are read in
# place (GPU backends slice bfloat16 and float8 natively).

_REF_KEY_BLOCK = 512
_REF_CHUNK_ELEMS = 1 << 27  # float32 elements of one query chunk's [B, chunk, H, key block] scores (512 MiB)


def _ref_chunk(b: int, t: int, h: int, kb: int) -> int:
    per_query = max(1, b * h * kb)
    return max(1, min(t, 1 << int(np.log2(max(1, _REF_CHUNK_ELEMS // per_query)))))


def _is_fp8(x) -> bool:
    """True for float8_e4m3fn arrays (exactly representable in bfloat16)."""
    return x.dtype == jnp.float8_e4m3fn


def _ref_block_logits(qc, kblk, wc, ksblk):
    """qc [B, c, H, D], kblk [B, kb, D], wc [B, c, H], ksblk [B, kb] or None -> unmasked float32 [B, c, kb]."""
    cd = jnp.bfloat16 if _is_fp8(qc) else qc.dtype
    sc = jnp.einsum("bthd,bsd->bths", qc.astype(cd), kblk.astype(cd), preferred_element_type=jnp.float32,
                    precision=lax.Precision.HIGHEST)
    lg = jnp.sum(jnp.maximum(sc, 0.0) * wc[..., None], axis=2)
    return lg if ksblk is None else lg * ksblk[:, None, :]


def _ref_key_blocks(k, ks, off, n: int, limc, step, init):
    """carry = step(carry, j, k block [B, kb, D], k_scale block [B, kb] or None, rel [kb]) over the window's key
    blocks j = 0 .. up to the largest limit in limc (a traced trip count); rel is the window-relative index of
    each key of the block. A block that would run past k's end is read from further back instead (k itself is
    never copied or padded): its keys rel < j * kb were already seen."""
    s_total = k.shape[1]
    kb = min(_REF_KEY_BLOCK, n)
    n_live = jnp.clip(jnp.max(limc) + 1, 0, n)

    def body(j, carry):
        start = jnp.minimum(off + j * kb, s_total - kb)
        kblk = lax.dynamic_slice_in_dim(k, start, kb, axis=1)
        ksblk = None if ks is None else lax.dynamic_slice_in_dim(ks, start, kb, axis=1)
        return step(carry, j, kblk, ksblk, start - off + jnp.arange(kb, dtype=jnp.int32))

    return lax.fori_loop(0, (n_live + kb - 1) // kb, body, init)


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


def _ref_prepare(q, k, w, q_positions, k_lengths, q_scale, k_scale, key_offset, num_keys):
    _check_inputs(q, k, w, q_positions, k_lengths, q_scale, k_scale)
    off, n = _key_window(k.shape[1], key_offset, num_keys)
    b, t, h, _ = q.shape
    w_eff, ks = _fold_scales(q, w, q_scale, k_scale)
    lim = _limits(b, t, n, q_positions, k_lengths)
    return off, n, w_eff, ks, lim, _ref_chunk(b, t, h, min(_REF_KEY_BLOCK, max(n, 1)))


def indexer_logits_reference(q, k, w, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None,
                             key_offset=None, num_keys=None):
    """Pure-JAX `indexer_logits` (einsum + relu + weighted head sum per key block, up to the live limit). Jittable.

    Same arguments (key window included) and result as `indexer_logits` (without `interpret`).
    """
    off, n, w_eff, ks, lim, chunk = _ref_prepare(q, k, w, q_positions, k_lengths, q_scale, k_scale, key_offset,
                                                 num_keys)
    b, t = lim.shape
    if not q.size or not n:
        return jnp.full((b, t, n), -jnp.inf, jnp.float32)
    kb = min(_REF_KEY_BLOCK, n)
    n_pad = -(-n // kb) * kb

    def chunk_logits(qc, wc, limc):
        def step(out, j, kblk, ksblk, rel):
            lg = jnp.where(rel <= limc[..., None], _ref_block_logits(qc, kblk, wc, ksblk), -jnp.inf)
            return lax.dynamic_update_slice_in_dim(out, lg, rel[0], axis=2)  # rel[0] <= j * kb: rewrites equal values

        init = jnp.full((b, qc.shape[1], n_pad), -jnp.inf, jnp.float32)
        return _ref_key_blocks(k, ks, off, n, limc, step, init)[:, :, :n]

    return _ref_map_chunks(chunk_logits, q, w_eff, lim, chunk)


def indexer_topk_reference(q, k, w, topk, *, q_positions=None, k_lengths=None, q_scale=None, k_scale=None,
                           key_offset=None, num_keys=None):
    """Pure-JAX `indexer_topk`: a running top-k merged per key block, up to the live limit. Jittable.

    Per key block: the running (value, index) set, then the block's logits, through a stable `lax.top_k` (equal
    values keep the running set's lower indices first). Holds [B, chunk, topk + key block] values, whatever
    num_keys is; same arguments and result layout as `indexer_topk`.
    """
    off, n, w_eff, ks, lim, chunk = _ref_prepare(q, k, w, q_positions, k_lengths, q_scale, k_scale, key_offset,
                                                 num_keys)
    topk = check_k(topk)
    b, t = lim.shape
    if not q.size or not n or not topk:
        return jnp.full((b, t, topk), -1, jnp.int32)
    kb = min(_REF_KEY_BLOCK, n)
    big = jnp.int32(np.iinfo(np.int32).max)

    def chunk_topk(qc, wc, limc):
        def step(carry, j, kblk, ksblk, rel):
            vals, idx = carry
            lg = _ref_block_logits(qc, kblk, wc, ksblk)
            ok = (rel >= j * kb) & (rel <= limc[..., None]) & jnp.isfinite(lg)
            all_vals = jnp.concatenate([vals, jnp.where(ok, lg, -jnp.inf)], axis=-1)
            all_idx = jnp.concatenate([idx, jnp.broadcast_to(rel, lg.shape)], axis=-1)
            vals, pos = lax.top_k(all_vals, topk)
            return vals, jnp.take_along_axis(all_idx, pos, axis=-1)

        c = qc.shape[1]
        init = (jnp.full((b, c, topk), -jnp.inf, jnp.float32), jnp.full((b, c, topk), big, jnp.int32))
        vals, idx = _ref_key_blocks(k, ks, off, n, limc, step, init)
        idx = jnp.sort(jnp.where(vals == -jnp.inf, big, idx), axis=-1)
        return jnp.where(idx == big, -1, idx)

    return _ref_map_chunks(chunk_topk, q, w_eff, lim, chunk)
