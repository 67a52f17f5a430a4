"""Weight products of the decoder layers, kept as GEMMs when a decode step has a single token.

XLA's GPU simplifier rewrites a product whose activation side is one row (batch 1, one token) and whose weights are
small (under ~10M elements) into `reduce(multiply(broadcast(x), w))`. In a decode step that covers every layer
projection: the elementwise product is materialised in bf16 (rounding each term before the float32 sum) and then
column-reduced, often by a single thread block, at 4-15x the weights' read time (an H100 profile of one 30B-dims
decode step put 0.8 of 2.25 ms there). With two rows the product is no longer a vector-matrix one and stays a GEMM.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def project(spec: str, x: Array, w: Array, *, precision=None) -> Array:
    """`jnp.einsum(spec, x, w, precision=precision)` for activations x whose first axis is also the output's first.

    When x's row axes (those not in w) hold a single row, x is padded with a zero row along its first axis behind an
    optimisation barrier, the product runs on two rows, and row 0 is returned (the barriers keep XLA from folding
    the padding away and strength-reducing the product again). Any other x runs the plain einsum.
    """
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    rows = math.prod(x.shape[i] for i, axis in enumerate(lhs) if axis not in rhs)
    if rows != 1 or lhs[0] in rhs or out[0] != lhs[0]:
        return jnp.einsum(spec, x, w, precision=precision)
    padded = jax.lax.optimization_barrier(jnp.concatenate([x, jnp.zeros_like(x)], axis=0))
    return jax.lax.optimization_barrier(jnp.einsum(spec, padded, w, precision=precision))[:1]
