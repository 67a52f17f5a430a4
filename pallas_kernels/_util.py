"""Small helpers shared by the kernels and their references."""

from __future__ import annotations

import jax

# float32 inputs get IEEE products (bf16 and fp8 are unaffected): TF32 rounding would move top-k boundaries and
# break the references' bit-level agreement with float64 oracles. Used by the kernels and the references alike.
EXACT_F32 = jax.lax.Precision.HIGHEST


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): block and padding sizes."""
    return 1 << max(0, int(n) - 1).bit_length()
