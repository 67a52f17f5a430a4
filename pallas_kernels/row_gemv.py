"""One activation row times a weight matrix (a decode step's projections at batch 1), as a split-K Pallas kernel.

XLA's GPU compiler rewrites a product whose activation side is a single row and whose weights hold fewer than 10M
elements into `reduce(multiply(broadcast(x), w))`, and the reduction it emits often runs on a handful of thread
blocks: at the 30B model's dims such a projection takes 4-15x the time its weights take to read. Here every program
reads one [block_k, block_n] weight tile after another from its share of the K rows, accumulates elementwise in
float32 and reduces once at the end; the programs cover (rows, N / block_n, splits of K), and the splits'
partial sums are added in float32 by one small XLA reduction.

Shapes: x [M, K] (M small: each row re-reads the weights), w [K, N] -> [M, N] in the product's result dtype.
K and N are multiples of 16 (Triton's smallest load). `head_gemv` is the same kernel with a matrix per row:
x [H, K], w [H, K, N] (or [H, N, K], transposed) -> [H, N], the absorbed MLA's per-head products at one token.

With `layer` (an int32 scalar, may be traced), each weight is a stack `[L, K, N]` of every layer's and the kernel
reads layer `layer`'s rows where they lie. A model scanning its layers passes the whole stack this way: given a
layer's slice instead, XLA copies it out of the stack before the kernel (a Triton kernel is a custom call that
takes its operands as buffers of their own), which cost 5.8 ms of a batch-1 step of the 8-layer 30B model
(BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._platform import resolve_interpret
from pallas_kernels._util import checked_layer
from pallas_kernels.routed_gemv import DEFAULT_BLOCK, default_splits, tile_size

Array = jax.Array

_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=3)


def supports(k: int, n: int) -> bool:
    """Whether the kernel takes a [K, N] weight (each a multiple of 16)."""
    return tile_size(k) is not None and tile_size(n) is not None


def _kernel(layer_ref, x_ref, *refs, block_k: int, steps: int, first_blocks: tuple[int, ...],
            block_ns: tuple[int, ...], widths: tuple[int, ...], starts: tuple[int, ...], matrices: int,
            transposed: bool):
    """One (row, column block of the weights side by side, split of K): layer_ref [1], x_ref [K], refs = the weight
    stacks then the output row [sum_j N_j] float32, weight j's N_j = `widths[j]` columns from `starts[j]`.
    `first_blocks[j]` is weight j's first column block and `block_ns[j]` its block width; a program computes the
    split's partial product of the one weight its block falls in.

    Weight j's stack is a view `[L matrices K, N_j]` of `[L, matrices, K, N_j]`, or `[L matrices N_j, K]` when
    `transposed` (the product is then x @ w.T). `matrices` is 1 (every row times the layer's matrix) or the row
    count (row r times the layer's matrix r, as attention heads are)."""
    w_refs, o_ref = refs[:-1], refs[-1]
    c = pl.program_id(1)
    first = pl.program_id(2) * steps * block_k
    matrix = layer_ref[0] * matrices + (pl.program_id(0) if matrices > 1 else 0)

    def product(w_ref, first_block, block_n, width, out_offset):
        col = (c - first_block) * block_n

        def body(s, acc):
            at = first + s * block_k
            xv = x_ref[pl.ds(at, block_k)].astype(jnp.float32)
            if transposed:  # [block_n, block_k] tiles of w [N, K]
                w = w_ref[pl.ds(matrix * width + col, block_n), pl.ds(at, block_k)].astype(jnp.float32)
                return acc + w * xv[None, :]
            w = w_ref[pl.ds(matrix * x_ref.shape[0] + at, block_k), pl.ds(col, block_n)].astype(jnp.float32)
            return acc + xv[:, None] * w

        tile = (block_n, block_k) if transposed else (block_k, block_n)
        acc = lax.fori_loop(0, steps, body, jnp.zeros(tile, jnp.float32))
        o_ref[pl.ds(out_offset + col, block_n)] = jnp.sum(acc, axis=1 if transposed else 0)

    branches = [functools.partial(product, *args) for args in zip(w_refs, first_blocks, block_ns, widths, starts)]
    if len(branches) == 1:
        branches[0]()
    else:
        which = sum((c >= f).astype(jnp.int32) for f in first_blocks[1:])
        lax.switch(which, branches)


@functools.partial(jax.jit, static_argnames=("block", "splits", "dtypes", "transposed", "interpret"))
def _row_gemvs(x, ws, layer, *, block: int, splits: int, dtypes: tuple, transposed: bool, interpret: bool):
    """x [M, K], ws: stacks [L_j, G, K, N_j] (G = 1 or M; [L_j, G, N_j, K] when `transposed`), layer int32 [1] ->
    the products [M, N_j] in `dtypes`.

    The programs write their float32 partial sums side by side into one [M, splits, sum_j N_j] buffer, so the
    splits are added by one XLA reduction for the whole group, not one per product."""
    m, k = x.shape
    matrices = ws[0].shape[1]
    widths = tuple(w.shape[2] if transposed else w.shape[3] for w in ws)
    block_k = tile_size(k, block)
    block_ns = tuple(tile_size(width, block) for width in widths)
    counts = [width // b for width, b in zip(widths, block_ns)]
    ws = [w.reshape(-1, w.shape[3]) for w in ws]  # a free view: the kernel finds the layer's matrix inside
    first_blocks = tuple(sum(counts[:j]) for j in range(len(ws)))
    starts = tuple(sum(widths[:j]) for j in range(len(ws)))
    partials = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=k // block_k // splits, first_blocks=first_blocks,
                          block_ns=block_ns, widths=widths, starts=starts, matrices=matrices,
                          transposed=transposed),
        grid=(m, sum(counts), splits),
        in_specs=[pl.BlockSpec((1,), lambda r, c, s: (0,)), pl.BlockSpec((None, k), lambda r, c, s: (r, 0))]
                 + [pl.BlockSpec(w.shape, lambda r, c, s: (0, 0)) for w in ws],
        out_specs=pl.BlockSpec((None, None, sum(widths)), lambda r, c, s: (r, s, 0)),
        out_shape=jax.ShapeDtypeStruct((m, splits, sum(widths)), jnp.float32),
        compiler_params=_TRITON,
        interpret=interpret,
        name="row_gemv",
    )(layer, x, *ws)
    total = partials.sum(axis=1)
    return tuple(total[:, a:a + width].astype(dt) for a, width, dt in zip(starts, widths, dtypes))


def _launch(x: Array, ws: tuple, layer: Array, dtypes: tuple, *, transposed: bool, block: int, splits: int | None,
            interpret: bool | None, name: str) -> tuple[Array, ...]:
    """Checks the tiling and runs `_row_gemvs` on x [M, K] and stacks ws [L_j, G, K, N_j] (or [L_j, G, N_j, K])."""
    k = x.shape[1]
    widths = [w.shape[2] if transposed else w.shape[3] for w in ws]
    if not all(supports(k, width) for width in widths):
        raise ValueError(f"{name}: K {k} and every N {widths} must be multiples of 16")
    if block < 16 or block & (block - 1):
        raise ValueError(f"{name}: block must be a power of two >= 16, got {block}")
    tiles_k = k // tile_size(k, block)
    if splits is None:
        splits = default_splits(x.shape[0] * sum(width // tile_size(width, block) for width in widths), tiles_k)
    if splits < 1 or splits & (splits - 1) or tiles_k % splits:
        raise ValueError(f"{name}: splits must be a power of two dividing the {tiles_k} tiles of K, got {splits}")
    if x.shape[0] == 0:
        return tuple(jnp.zeros((0, width), dt) for width, dt in zip(widths, dtypes))
    return _row_gemvs(x, ws, layer.reshape(1), block=block, splits=int(splits), dtypes=dtypes, transposed=transposed,
                      interpret=resolve_interpret(interpret))


def row_gemvs(x: Array, ws, *, layer: Array | int | None = None, dtypes=None, block: int = DEFAULT_BLOCK,
              splits: int | None = None, interpret: bool | None = None) -> tuple[Array, ...]:
    """`(x @ w for w in ws)` in one kernel launch: x [M, K], each w [K, N_j] -> [M, N_j], accumulated in float32
    (see the module docstring). One launch for the products that share an input (a layer's attention input feeds
    four), where a decode step at batch 1 pays for every launch.

    `layer`: with it, each w is a stack [L_j, K, N_j] and the products use layer `layer` of each (int32 scalar, may
    be traced; read in place, no slice is made). `dtypes`: each product's result dtype (None: `result_type(x, w)`);
    a weight may be read as a wider dtype than it is stored in (bfloat16 weights into a float32 product), the
    kernel computes in float32 either way. `block`: the largest tile side (a power of two >= 16); `splits`: programs
    sharing the K reduction, a power of two dividing K's tile count (None: `routed_gemv.default_splits` for this
    GPU); `interpret=None`: Pallas on a GPU, interpret mode elsewhere.
    """
    ws = tuple(ws)
    stacked = layer is not None
    if x.ndim != 2 or not ws or any(w.ndim != 2 + stacked or w.shape[stacked] != x.shape[1] for w in ws):
        want = "[L, K, N] stacks (with layer)" if stacked else "[K, N]"
        raise ValueError(f"row_gemv: x [M, K] and weights {want}, got {x.shape} and {[w.shape for w in ws]}")
    ws = tuple(w if stacked else w[None] for w in ws)
    dtypes = tuple(jnp.dtype(dt) for dt in (dtypes or [jnp.result_type(x.dtype, w.dtype) for w in ws]))
    if len(dtypes) != len(ws):
        raise ValueError(f"row_gemv: {len(dtypes)} dtypes for {len(ws)} weights")
    layer = checked_layer(0 if layer is None else layer, min(w.shape[0] for w in ws), "row_gemv")
    return _launch(x, tuple(w[:, None] for w in ws), layer, dtypes, transposed=False, block=block, splits=splits,
                   interpret=interpret, name="row_gemv")


def row_gemv(x: Array, w: Array, *, layer: Array | int | None = None, block: int = DEFAULT_BLOCK,
             splits: int | None = None, interpret: bool | None = None) -> Array:
    """x [M, K] @ w [K, N] (or layer `layer` of a stack w [L, K, N]) -> [M, N]: `row_gemvs` of one weight."""
    return row_gemvs(x, (w,), layer=layer, block=block, splits=splits, interpret=interpret)[0]


def head_gemv(x: Array, w: Array, *, transposed: bool = False, layer: Array | int | None = None,
              block: int = DEFAULT_BLOCK, splits: int | None = None, interpret: bool | None = None) -> Array:
    """Each head's row times that head's matrix: x [H, K], w [H, K, N] -> [H, N] (`y[h] = x[h] @ w[h]`), or with
    `transposed` w [H, N, K] and `y[h] = x[h] @ w[h].T`, in `result_type(x, w)`, accumulated in float32. These are
    the per-head products of absorbed MLA at one token (`q_nope @ W_uk`, `o_latent @ W_uv^T`), which XLA's GPU
    compiler rewrites into multiply + reduce as it does one-row products.

    `layer`: with it, w is a stack [L, H, ...] read in place at layer `layer` (as `row_gemvs`). `block`, `splits`
    and `interpret` as `row_gemvs`.
    """
    stacked = layer is not None
    k_axis = 2 if transposed else 1
    if (x.ndim != 2 or w.ndim != 3 + stacked or w.shape[stacked] != x.shape[0]
            or w.shape[k_axis + stacked] != x.shape[1]):
        want = ("[L, " if stacked else "[") + ("H, N, K]" if transposed else "H, K, N]")
        raise ValueError(f"head_gemv: x [H, K] and w {want}, got {x.shape} and {w.shape}")
    w = w if stacked else w[None]
    layer = checked_layer(0 if layer is None else layer, w.shape[0], "head_gemv")
    return _launch(x, (w,), layer, (jnp.result_type(x.dtype, w.dtype),), transposed=transposed, block=block,
                   splits=splits, interpret=interpret, name="head_gemv")[0]
