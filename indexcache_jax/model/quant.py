"""FP8 numerics of the official DSA indexer (docs/math.md, "FP8 indexer"): Hadamard rotation, e4m3 quantisation.

DeepSeek's inference rotates the indexer's q and k by the normalised Walsh-Hadamard matrix (an orthogonal map, so
`Hq . Hk = q . k`; it spreads outliers before quantisation) and quantises each 128-value vector to float8_e4m3fn
with a power-of-two ("ue8m0") scale. The indexer logits are then
`k_scale[s] * sum_h w[t, h] * q_scale[t, h] * relu(q8[t, h] . k8[s])`, which the FP8 logits kernel computes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_AMAX_FLOOR = 1e-4  # the reference's clamp, so an all-zero vector gets a finite scale


@functools.lru_cache(maxsize=None)
def hadamard_matrix(d: int) -> np.ndarray:
    """The natural-order (Sylvester) Walsh-Hadamard matrix of size d (a power of two), entries +-1, float32."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two size, got {d}")
    return scipy.linalg.hadamard(d, dtype=np.float32)


def hadamard_rotate(x: jax.Array) -> jax.Array:
    """`x @ H_d * d^-0.5` over the last axis (d a power of two), computed in float32, returned in x's dtype."""
    d = x.shape[-1]
    rot = jnp.asarray(hadamard_matrix(d) * np.float32(d ** -0.5))
    y = jnp.matmul(x.astype(jnp.float32), rot, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def quantize_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-vector e4m3 quantisation over the last axis: `(x8 float8_e4m3fn [..., d], scale float32 [..., 1])`.

    `scale = 2^ceil(log2(max(amax, 1e-4) / 448))`, `x8 = clamp(x / scale, -448, 448)` rounded to nearest even;
    `x8 * scale` dequantises. The scale is a power of two, so dividing by it is exact.
    """
    xf = x.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), _AMAX_FLOOR)
    # frexp gives amax/448 = m * 2^e with m in [0.5, 1): ceil(log2) is e, or e - 1 when m is exactly 0.5.
    mant, expo = jnp.frexp(amax / FP8_MAX)
    scale = jnp.ldexp(jnp.ones_like(amax), jnp.where(mant == 0.5, expo - 1, expo))
    x8 = jnp.clip(xf / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return x8, scale


def rotate_and_quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The indexer's FP8 path for q `[B, T, H, d]` or k `[B, T, d]`: Hadamard rotation, then `quantize_fp8`."""
    return quantize_fp8(hadamard_rotate(x))
