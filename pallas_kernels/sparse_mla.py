"""Sparse MLA attention over top-k gathered latent rows (DeepSeek Sparse Attention, absorbed MQA form).

Every query token attends to K latent rows of its batch's MLA cache, chosen by index. The query is the
absorbed latent part (first `v_dim` features) plus the RoPE part (the rest); the key is the whole cache row
and the value is its first `v_dim` features. Two Pallas kernels serve prefill and decode alike:

- On Hopper (sm_90) with 16-bit inputs and more than 32 heads, `_sparse_mla_hopper` (Mosaic GPU): two
  warpgroups split each block of indices, gather the rows with cp.async and share the probabilities through
  shared memory, so no product is computed twice.
- Everywhere else, and in interpret mode, the Triton-lowered kernel of this module: a program takes one query
  token and a block of up to 64 heads, gathers the indexed rows block by block (`kv_ref[rows, ...]`) and keeps
  an online softmax in base 2.

When there are too few (token, head-block) programs to fill the GPU (decode with a small batch) the K indices
are split across programs and the partial results are merged through their log-sum-exp (flash-decoding).

Shapes: q [B, T, H, Dqk], kv [B, S, Dqk], indices int32 [B, T, K] -> out [B, T, H, v_dim] (q's dtype),
lse float32 [B, T, H].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import _sparse_mla_hopper
from pallas_kernels._platform import compute_capability, resolve_interpret
from pallas_kernels._platform import num_sms as platform_num_sms  # `default_config` has a `num_sms` argument
from pallas_kernels._util import EXACT_F32, next_pow2

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MAX_BLOCK_H = 64  # heads per program: the fp32 [64, 512] accumulator fits one program's registers.
_MIN_BLOCK_H = 16  # smallest M of a Triton dot.


@dataclasses.dataclass(frozen=True)
class SparseMLAConfig:
    """Launch settings of the kernel.

    kernel: "triton" (the Triton-lowered kernel of this module, any dtype and shape, and the one interpret
    mode runs) or "hopper" (`_sparse_mla_hopper`: Mosaic GPU, sm_90, 16-bit inputs, 64 heads and 64 indices
    per step; block_k / num_warps / num_stages do not apply to it).
    gather_at: hopper only, where the next block's row gather is issued (`_sparse_mla_hopper.GATHER_POINTS`).
    block_k: indices gathered per loop step; num_splits: programs sharing one (token, head-block)'s K indices,
    merged through their lse; num_warps / num_stages: Triton launch settings (ignored in interpret mode).
    """

    block_k: int = 64
    num_splits: int = 1
    num_warps: int = 8
    num_stages: int = 3
    kernel: str = "triton"
    gather_at: str = "block_start"


def default_config(batch_tokens: int, num_heads: int, top_k: int, *, itemsize: int = 2,
                   num_sms: int | None = None) -> SparseMLAConfig:
    """The launch settings `sparse_mla` uses for `batch_tokens` = B*T query tokens, H heads and K indices.

    Splits K across programs only when the (token, head-block) programs fill less than one wave of the GPU,
    taking the smallest split count that minimises waves per unit of work. 4-byte inputs halve the gathered
    block and drop a pipeline stage: 3 stages of 64 float32 rows of 576 features (442 KB) exceed Hopper's 227 KB
    of shared memory.
    """
    sms = platform_num_sms() if num_sms is None else num_sms
    block_k = SparseMLAConfig.block_k if itemsize <= 2 else 32
    stages = SparseMLAConfig.num_stages if itemsize <= 2 else 2
    programs = batch_tokens * -(-num_heads // _MAX_BLOCK_H)
    splits = 1
    if programs < sms:
        max_splits = max(1, next_pow2(-(-top_k // block_k)) // 2)
        best = math.inf
        s = 1
        while s <= max_splits:
            cost = math.ceil(programs * s / sms) / s
            if cost < best:
                best, splits = cost, s
            s *= 2
    return SparseMLAConfig(block_k=block_k, num_splits=splits, num_stages=stages)


def choose_kernel(dtype, d_qk: int, v_dim: int, num_heads: int, *, interpret: bool,
                  capability: str | None) -> str:
    """The kernel `sparse_mla` runs: "hopper" on sm_90 for 16-bit inputs it supports with more than 32 heads
    (it runs 64 heads per program; 32 or fewer fill the Triton kernel's narrower programs better), else "triton".
    Interpret mode is always "triton": the Mosaic GPU kernel has no interpreter."""
    if (not interpret and capability is not None and capability.startswith("9.") and num_heads > 32
            and _sparse_mla_hopper.supports(dtype, d_qk, v_dim)):
        return "hopper"
    return "triton"


def chosen_config(q_shape, dtype, top_k: int, v_dim: int, *, interpret: bool) -> SparseMLAConfig:
    """The launch settings and kernel `sparse_mla` uses for q of shape [B, T, H, Dqk] and dtype, K indices."""
    batch, tokens, heads, d_qk = q_shape
    config = default_config(batch * tokens, heads, top_k, itemsize=jnp.dtype(dtype).itemsize)
    kernel = choose_kernel(dtype, d_qk, v_dim, heads, interpret=interpret, capability=compute_capability())
    return dataclasses.replace(config, kernel=kernel)


def _kernel(idx_ref, q_ref, kv_ref, o_ref, lse_ref, *, block_k, num_blocks, v_dim, rope_dim, seq_len, scale_log2):
    """One program: q_ref [BH, Dqk], kv_ref [S, Dqk] (its batch's cache), idx_ref [Ks] -> o_ref [BH, V], lse_ref [BH]."""
    qn = q_ref[:, pl.ds(0, v_dim)]
    qr = q_ref[:, pl.ds(v_dim, rope_dim)] if rope_dim else None
    block_h = qn.shape[0]
    contract_last = (((1,), (1,)), ((), ()))

    def body(i, carry):
        m, l, acc = carry
        ids = idx_ref[pl.ds(i * block_k, block_k)]
        valid = (ids >= 0) & (ids < seq_len)
        rows = jnp.where(valid, ids, 0)
        kn = kv_ref[rows, pl.ds(0, v_dim)]
        s = jax.lax.dot_general(qn, kn, contract_last, preferred_element_type=jnp.float32, precision=EXACT_F32)
        if rope_dim:
            kr = kv_ref[rows, pl.ds(v_dim, rope_dim)]
            s += jax.lax.dot_general(qr, kr, contract_last, preferred_element_type=jnp.float32, precision=EXACT_F32)
        s = jnp.where(valid[None, :], s * scale_log2, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(kn.dtype), kn, preferred_element_type=jnp.float32, precision=EXACT_F32)
        return m_new, l, acc

    init = (
        jnp.full((block_h,), -jnp.inf, jnp.float32),
        jnp.zeros((block_h,), jnp.float32),
        jnp.zeros((block_h, v_dim), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * _LN2)


def _pad_features(x, v_dim, v_pad, r_dim, r_pad):
    """Zero-pads the latent part of x [..., v_dim + r_dim] to v_pad and the RoPE part to r_pad features."""
    if (v_pad, r_pad) == (v_dim, r_dim):
        return x
    widths = [(0, 0)] * (x.ndim - 1)
    parts = [jnp.pad(x[..., :v_dim], widths + [(0, v_pad - v_dim)])]
    if r_dim:
        parts.append(jnp.pad(x[..., v_dim:], widths + [(0, r_pad - r_dim)]))
    return jnp.concatenate(parts, axis=-1)


def _check_inputs(q, kv, indices, sm_scale, v_dim):
    """Raises ValueError, naming the problem, for inputs `sparse_mla` does not take."""
    if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
        raise ValueError(f"expected q [B, T, H, Dqk], kv [B, S, Dqk] and indices [B, T, K]; got shapes q {q.shape}, "
                         f"kv {kv.shape}, indices {indices.shape}")
    batch, tokens, _, d_qk = q.shape
    if kv.shape[0] != batch or kv.shape[2] != d_qk or indices.shape[:2] != (batch, tokens):
        raise ValueError(f"shapes q {q.shape}, kv {kv.shape}, indices {indices.shape} do not match")
    if not jnp.issubdtype(q.dtype, jnp.floating) or kv.dtype != q.dtype:
        raise ValueError(f"q and kv must share one floating dtype; got q {q.dtype}, kv {kv.dtype}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers; got {indices.dtype}")
    if not 0 < v_dim <= d_qk:
        raise ValueError(f"v_dim={v_dim} must be in (0, Dqk={d_qk}]")
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale={sm_scale} must be finite")


def _without_work(q, kv, indices, v_dim):
    """The outputs when no row can attend to anything (B, T, H, S or K of zero), else None."""
    batch, tokens, heads, _ = q.shape
    if q.size and kv.shape[1] and indices.shape[-1]:
        return None
    return (jnp.zeros((batch, tokens, heads, v_dim), q.dtype),
            jnp.full((batch, tokens, heads), -jnp.inf, jnp.float32))


@functools.partial(jax.jit, static_argnames=("sm_scale", "v_dim", "interpret", "config"))
def sparse_mla_with_config(q, kv, indices, *, sm_scale: float, v_dim: int, interpret: bool, config: SparseMLAConfig):
    """`sparse_mla` with explicit launch settings (the benchmark sweeps these). Same shapes and semantics."""
    _check_inputs(q, kv, indices, sm_scale, v_dim)
    if (empty := _without_work(q, kv, indices, v_dim)) is not None:
        return empty
    batch, tokens, heads, d_qk = q.shape
    seq_len = kv.shape[1]
    top_k = indices.shape[-1]
    if indices.dtype != jnp.int32:
        info = jnp.iinfo(indices.dtype)
        if info.max > jnp.iinfo(jnp.int32).max:  # bounded first, so no out-of-range index wraps into a valid one
            indices = jnp.minimum(indices, seq_len)
            if info.min < 0:
                indices = jnp.maximum(indices, -1)
        indices = indices.astype(jnp.int32)
    if config.kernel == "hopper":
        if interpret:
            raise ValueError("the hopper sparse MLA kernel has no interpret mode; use kernel='triton'")
        if not _sparse_mla_hopper.supports(q.dtype, d_qk, v_dim):
            raise ValueError(f"the hopper sparse MLA kernel does not support dtype {q.dtype}, Dqk={d_qk}, v_dim={v_dim}")
        return _hopper(q, kv, indices, sm_scale=sm_scale, v_dim=v_dim, splits=config.num_splits,
                       gather_at=config.gather_at)
    if config.kernel != "triton":
        raise ValueError(f"unknown sparse MLA kernel {config.kernel!r}: expected 'triton' or 'hopper'")
    block_k, splits = config.block_k, config.num_splits

    # Triton loads only power-of-two blocks: pad the latent and RoPE parts to powers of two where needed.
    r_dim = d_qk - v_dim
    v_pad, r_pad = next_pow2(v_dim), (next_pow2(r_dim) if r_dim else 0)
    q = _pad_features(q, v_dim, v_pad, r_dim, r_pad)
    kv = _pad_features(kv, v_dim, v_pad, r_dim, r_pad)
    d_pad = v_pad + r_pad

    # 64 float32 heads of 512 latent features do not fit beside the gathered rows in shared memory.
    max_block_h = _MAX_BLOCK_H if jnp.dtype(q.dtype).itemsize <= 2 else _MAX_BLOCK_H // 2
    block_h = min(max_block_h, max(_MIN_BLOCK_H, next_pow2(heads)))
    h_pad = -(-heads // block_h) * block_h
    n_hb = h_pad // block_h
    bt = batch * tokens
    q2 = jnp.pad(q.reshape(bt, heads, d_pad), ((0, 0), (0, h_pad - heads), (0, 0)))

    chunk = block_k * splits
    k_pad = -(-top_k // chunk) * chunk
    k_split = k_pad // splits
    idx = jnp.pad(indices.reshape(bt, top_k), ((0, 0), (0, k_pad - top_k)), constant_values=-1)
    idx = idx.reshape(bt, splits, k_split)

    kernel = functools.partial(
        _kernel,
        block_k=block_k,
        num_blocks=k_split // block_k,
        v_dim=v_pad,
        rope_dim=r_pad,
        seq_len=seq_len,
        scale_log2=float(sm_scale) * _LOG2E,
    )
    sq = pl.Squeezed()
    in_specs = [
        pl.BlockSpec((sq, sq, k_split), lambda hb, t, sp: (t, sp, 0)),
        pl.BlockSpec((sq, block_h, d_pad), lambda hb, t, sp: (t, hb, 0)),
        pl.BlockSpec((sq, seq_len, d_pad), lambda hb, t, sp: (t // tokens, 0, 0)),
    ]
    # Per split: outputs normalised by the split's own softmax sum, in q's dtype (halves the partials' traffic).
    out_shape = (
        jax.ShapeDtypeStruct((bt, splits, h_pad, v_pad), q.dtype),
        jax.ShapeDtypeStruct((bt, splits, h_pad), jnp.float32),
    )
    out_specs = (
        pl.BlockSpec((sq, sq, block_h, v_pad), lambda hb, t, sp: (t, sp, hb, 0)),
        pl.BlockSpec((sq, sq, block_h), lambda hb, t, sp: (t, sp, hb)),
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(n_hb, bt, splits),  # head blocks of one token are launched next to each other: shared rows hit L2.
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        name="sparse_mla",
    )(idx, q2, kv)

    return _merge_splits(out, lse, batch, tokens, heads, v_dim, q.dtype)


def _merge_splits(out, lse, batch, tokens, heads, v_dim, dtype):
    """out [BT, splits, Hp, >= v_dim], lse [BT, splits, Hp] (each split normalised by its own softmax sum)
    -> out [B, T, H, v_dim] in `dtype`, lse [B, T, H]: out = sum_s exp(lse_s - lse) * out_s."""
    if out.shape[1] > 1:
        lse_all = jax.nn.logsumexp(lse, axis=1)  # [bt, h_pad], -inf where every split was empty
        weight = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - jnp.where(lse_all == -jnp.inf, 0.0, lse_all)[:, None]))
        out = jnp.sum(weight[..., None] * out.astype(jnp.float32), axis=1).astype(dtype)
        lse = lse_all
    else:
        out, lse = out[:, 0], lse[:, 0]
    out = out[:, :heads, :v_dim].reshape(batch, tokens, heads, v_dim)
    lse = lse[:, :heads].reshape(batch, tokens, heads)
    return out, lse


def _hopper(q, kv, indices, *, sm_scale, v_dim, splits, gather_at):
    """Runs `_sparse_mla_hopper` on [B, T, H, Dqk] inputs: heads padded to 64 and each split's indices padded
    with -1 to whole 64-index blocks, both only where needed (the kernel reads -1 and >= S as invalid)."""
    batch, tokens, heads, d_qk = q.shape
    top_k = indices.shape[-1]
    block = _sparse_mla_hopper.BLOCK_K
    bt = batch * tokens
    h_pad = -(-heads // _sparse_mla_hopper.BLOCK_H) * _sparse_mla_hopper.BLOCK_H
    q2 = q.reshape(bt, heads, d_qk)
    if h_pad != heads:
        q2 = jnp.pad(q2, ((0, 0), (0, h_pad - heads), (0, 0)))
    k_split = -(-top_k // (block * splits)) * block
    idx = indices.reshape(bt, top_k)
    if k_split * splits != top_k:
        idx = jnp.pad(idx, ((0, 0), (0, k_split * splits - top_k)), constant_values=-1)
    out, lse = _sparse_mla_hopper.sparse_mla_hopper(
        q2, kv, idx.reshape(bt, splits, k_split), tokens=tokens, v_dim=v_dim, scale_log2=float(sm_scale) * _LOG2E,
        gather_at=gather_at,
    )
    return _merge_splits(out, lse, batch, tokens, heads, v_dim, q.dtype)


def sparse_mla(q, kv, indices, *, sm_scale: float, v_dim: int = 512, interpret: bool | None = None):
    """Sparse MLA attention: each query attends to the K cache rows its indices name.

    Args:
      q: [B, T, H, Dqk] queries (latent part first, then RoPE part), bf16 or float32.
      kv: [B, S, Dqk] MLA cache, same dtype as q; the value is kv[..., :v_dim].
      indices: int32 [B, T, K] (other integer types are converted); an index < 0 or >= S is invalid and
        skipped. A repeated index is a separate term of the softmax each time it appears.
      sm_scale: softmax scale, a Python float.
      v_dim: value width (512 for DeepSeek V3.2 / GLM-5).
      interpret: None means Pallas on GPU and interpret mode on CPU.

    Returns:
      out [B, T, H, v_dim] in q's dtype: out[b,t,h] = sum_j p_j kv[b, idx_j, :v_dim] with
      p = softmax_j(sm_scale * q[b,t,h] . kv[b, idx_j]) over the valid j;
      lse float32 [B, T, H], natural log of sum_j exp(sm_scale * q . kv[idx_j]).
      A row without a valid index gives out = 0 and lse = -inf (so does every row when S or K is 0).

    Raises:
      ValueError: for shapes that do not match, q and kv of different or non-floating dtypes, non-integer
        indices, v_dim outside (0, Dqk], or a non-finite sm_scale.
    """
    _check_inputs(q, kv, indices, float(sm_scale), v_dim)
    if (empty := _without_work(q, kv, indices, v_dim)) is not None:
        return empty
    interpret = resolve_interpret(interpret)
    config = chosen_config(q.shape, q.dtype, indices.shape[-1], v_dim, interpret=interpret)
    return sparse_mla_with_config(
        q, kv, indices, sm_scale=float(sm_scale), v_dim=v_dim, interpret=interpret, config=config
    )


def sparse_mla_reference(q, kv, indices, *, sm_scale: float, v_dim: int = 512):
    """Pure-jnp sparse MLA (gather + einsum + softmax), same shapes and semantics as `sparse_mla`. Jittable.

    Memory: gathers [B, T, K, Dqk] rows and holds [B, T, H, K] float32 logits; chunk T for long prefills.
    The probabilities are cast to q's dtype before the value product (float32 accumulation).
    """
    seq_len = kv.shape[1]
    valid = (indices >= 0) & (indices < seq_len)
    rows = jnp.where(valid, indices, 0)
    gathered = jax.vmap(lambda cache, ids: cache[ids])(kv, rows)  # [B, T, K, Dqk]
    s = jnp.einsum("bthd,btkd->bthk", q, gathered, preferred_element_type=jnp.float32, precision=EXACT_F32) * sm_scale
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    e = jnp.exp(s - m)
    denom = jnp.sum(e, axis=-1)
    empty = denom == 0.0
    p = e / jnp.where(empty, 1.0, denom)[..., None]
    out = jnp.einsum("bthk,btkv->bthv", p.astype(q.dtype), gathered[..., :v_dim], preferred_element_type=jnp.float32,
                     precision=EXACT_F32)
    lse = jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, denom)) + m[..., 0])
    return out.astype(q.dtype), lse
