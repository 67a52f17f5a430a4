"""One activation row times a weight matrix (a decode step's projections at batch 1), as a split-K Pallas kernel.

XLA's GPU compiler rewrites a product whose activation side is a single row and whose weights hold fewer than 10M
elements into `reduce(multiply(broadcast(x), w))`, and the reduction it emits often runs on a handful of thread
blocks: at the 30B model's dims such a projection takes 4-15x the time its weights take to read. Here every program
reads one [block_k, block_n] weight tile after another from its share of the K rows, accumulates elementwise in
float32 and reduces once at the end; the programs cover (rows, N / block_n, splits of K), and the splits'
partial sums are added in float32 by one small XLA reduction.

Shapes: x [M, K] (M small: each row re-reads the weights), w [K, N] -> [M, N] in the product's result dtype.
K and N are multiples of 16 (Triton's smallest load).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._platform import resolve_interpret
from pallas_kernels.routed_gemv import DEFAULT_BLOCK, default_splits, tile_size

Array = jax.Array

_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=3)


def supports(k: int, n: int) -> bool:
    """Whether the kernel takes a [K, N] weight (each a multiple of 16)."""
    return tile_size(k) is not None and tile_size(n) is not None


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int):
    """One (row, column block, split of K): x_ref [K], w_ref [K, N] -> o_ref [block_n] float32, the split's
    partial product."""
    block_n = o_ref.shape[0]
    cols = pl.ds(pl.program_id(1) * block_n, block_n)
    first = pl.program_id(2) * steps * block_k

    def body(s, acc):
        rows = pl.ds(first + s * block_k, block_k)
        return acc + x_ref[rows].astype(jnp.float32)[:, None] * w_ref[rows, cols].astype(jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_k, block_n), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=0)


@functools.partial(jax.jit, static_argnames=("block", "splits", "interpret"))
def _row_gemv(x, w, *, block: int, splits: int, interpret: bool):
    m, k = x.shape
    n = w.shape[1]
    block_k, block_n = tile_size(k, block), tile_size(n, block)
    partials = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=k // block_k // splits),
        grid=(m, n // block_n, splits),
        in_specs=[pl.BlockSpec((None, k), lambda r, c, s: (r, 0)), pl.BlockSpec((k, n), lambda r, c, s: (0, 0))],
        out_specs=pl.BlockSpec((None, None, block_n), lambda r, c, s: (r, s, c)),
        out_shape=jax.ShapeDtypeStruct((m, splits, n), jnp.float32),
        compiler_params=_TRITON,
        interpret=interpret,
        name="row_gemv",
    )(x, w)
    return partials.sum(axis=1).astype(jnp.result_type(x.dtype, w.dtype))


def row_gemv(x: Array, w: Array, *, block: int = DEFAULT_BLOCK, splits: int | None = None,
             interpret: bool | None = None) -> Array:
    """x [M, K] @ w [K, N] -> [M, N] in `result_type(x, w)`, accumulated in float32 (see the module docstring).

    `block`: the largest tile side (a power of two >= 16); `splits`: programs sharing the K reduction, a power of
    two dividing K's tile count (None: `routed_gemv.default_splits` for this GPU); `interpret=None`: Pallas on a GPU,
    interpret mode elsewhere.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"row_gemv: x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    k, n = w.shape
    if not supports(k, n):
        raise ValueError(f"row_gemv: K {k} and N {n} must be multiples of 16")
    if block < 16 or block & (block - 1):
        raise ValueError(f"row_gemv: block must be a power of two >= 16, got {block}")
    tiles_k = k // tile_size(k, block)
    if splits is None:
        splits = default_splits(x.shape[0] * (n // tile_size(n, block)), tiles_k)
    if splits < 1 or splits & (splits - 1) or tiles_k % splits:
        raise ValueError(f"row_gemv: splits must be a power of two dividing the {tiles_k} tiles of K, got {splits}")
    if x.shape[0] == 0:
        return jnp.zeros((0, n), jnp.result_type(x.dtype, w.dtype))
    return _row_gemv(x, w, block=block, splits=int(splits), interpret=resolve_interpret(interpret))
