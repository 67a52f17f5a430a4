"""Small helpers shared by the kernels and their references."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# float32 inputs get IEEE products (bf16 and fp8 are unaffected): TF32 rounding would move top-k boundaries and
# break the references' bit-level agreement with float64 oracles. Used by the kernels and the references alike.
EXACT_F32 = jax.lax.Precision.HIGHEST


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): block and padding sizes."""
    return 1 << max(0, int(n) - 1).bit_length()


def checked_layer(layer, depth: int, name: str) -> jax.Array:
    """A layer index into `depth`-layer weight stacks as an int32 scalar array, checked when it is concrete (a traced
    index is the caller's promise: the kernels read the stack at it unchecked)."""
    if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < depth:
        raise ValueError(f"{name}: layer {int(layer)} outside the stacks of {depth} layers")
    layer = jnp.asarray(layer, jnp.int32)
    if layer.ndim != 0:
        raise ValueError(f"{name}: layer must be a scalar, got shape {layer.shape}")
    return layer
