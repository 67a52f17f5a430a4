"""Rotary position embeddings: default and YaRN frequencies, interleaved (GPT-J) and split-half (NeoX) pairing."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from indexcache_jax.model.config import DSAConfig, RopeConfig, yarn_mscale


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """`(inv_freq [dim/2] float32, attention_factor)` as transformers computes them (default or YaRN)."""
    base = rope.theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(np.float32(base), exponents).astype(np.float32)
    if rope.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: DSAConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin `[B, T, rope_dim/2]` float32 for integer `positions [B, T]`, scaled by YaRN's attention factor."""
    inv_freq, attention_factor = inverse_frequencies(cfg.rope, cfg.qk_rope_head_dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, *, interleaved: bool) -> jnp.ndarray:
    """Rotates the last dim of `x [..., rope_dim]`; `cos`/`sin` broadcast to `[..., rope_dim/2]`.

    Interleaved pairs are `(x[2i], x[2i+1])`, split-half pairs `(x[i], x[i+d/2])`. The result is laid out as
    `[rotated first members, rotated second members]` in both cases, as transformers does: the layout is a fixed
    permutation shared by queries and keys, so every dot product equals that of the reference layout.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)
