"""The routed experts of a MoE layer for a few tokens (decode), as two matrix-vector kernels that index the
expert axis by the routing ids.

`moe_experts` plans padded, expert-sorted row tiles and runs grouped GEMMs over them. For a decode step's handful of
tokens that plan and its gathers, scatters and 64-row tiles are mostly overhead: each routed (token, expert) pair is
one vector times one expert's matrices. Here a program reads its pair's expert id and streams that expert's weights
once, in column blocks:

- `_swiglu_kernel`, grid (pairs, I / block_i): `h[p] = silu(x[t] @ gate[e]) * (x[t] @ up[e])`, with `t = p // k` and
  `e = ids[p]`, both products accumulated in float32 and `h` stored in x's dtype;
- `_down_kernel`, grid (pairs, D / block_d): `o[p] = h[p] @ down[e]`, rounded to x's dtype; then
  `y[t] = sum_j w[t, j] * o[t k + j]` in float32 (one small XLA product: the pairs are in token order, no scatter).

Only the routed experts' weights are read, as in `moe_experts`, and the results are the same products (float32
reference in the tests). An id equal to E (no expert) adds nothing. The experts a token shares with another token
are read once per token, so this serves few tokens; `moe_experts` serves the rest.

Shapes: x [N, D], ids int32 [N, k], weights float32 [N, k], gate and up [E, D, I], down [E, I, D] -> y [N, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._platform import resolve_interpret

Array = jax.Array

DEFAULT_BLOCK = 64  # features a step on each side of a weight tile: [64, 64] keeps 128-byte rows, many programs
# Triton, not Mosaic GPU: these are plain loads and reductions, and the Triton lowering has an interpreter.
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=3)


def _block(dim: int, largest: int = DEFAULT_BLOCK) -> int | None:
    """The largest power of two <= `largest` that divides `dim` and is at least 16 (Triton's smallest load), or None
    when there is none."""
    block = largest
    while block >= 16:
        if dim % block == 0:
            return block
        block //= 2
    return None


def supports(hidden: int, inter: int) -> bool:
    """Whether the kernels take hidden size D and expert width I (each a multiple of 16)."""
    return _block(hidden) is not None and _block(inter) is not None


def _swiglu_kernel(ids_ref, x_ref, gate_ref, up_ref, h_ref, *, block_d: int, block_i: int, hidden: int,
                   num_experts: int):
    """One (pair, column block): ids_ref [1], x_ref [D] (the pair's token), gate/up_ref [E, D, I] -> h_ref [block_i]."""
    e = jnp.minimum(ids_ref[0], num_experts - 1)  # id E (no expert) reads expert E - 1; `_down_kernel` drops it
    cols = pl.ds(pl.program_id(1) * block_i, block_i)

    def body(s, acc):
        g_acc, u_acc = acc
        rows = pl.ds(s * block_d, block_d)
        xv = x_ref[rows].astype(jnp.float32)[:, None]
        g_acc += jnp.sum(xv * gate_ref[e, rows, cols].astype(jnp.float32), axis=0)
        u_acc += jnp.sum(xv * up_ref[e, rows, cols].astype(jnp.float32), axis=0)
        return g_acc, u_acc

    zeros = jnp.zeros((block_i,), jnp.float32)
    g, u = lax.fori_loop(0, hidden // block_d, body, (zeros, zeros))
    h_ref[...] = (g * u / (1.0 + jnp.exp(-g))).astype(h_ref.dtype)


def _down_kernel(ids_ref, h_ref, down_ref, o_ref, *, block_i: int, inter: int, num_experts: int):
    """One (pair, column block): ids_ref [1], h_ref [I] (the pair's activation), down_ref [E, I, D] -> o_ref
    [block_d], the pair's expert output in x's dtype."""
    e = jnp.minimum(ids_ref[0], num_experts - 1)
    cols = pl.ds(pl.program_id(1) * o_ref.shape[0], o_ref.shape[0])

    def body(s, acc):
        rows = pl.ds(s * block_i, block_i)
        hv = h_ref[rows].astype(jnp.float32)[:, None]
        return acc + jnp.sum(hv * down_ref[e, rows, cols].astype(jnp.float32), axis=0)

    out = lax.fori_loop(0, inter // block_i, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = out.astype(o_ref.dtype)


def _pair_gemv(kernel, flat_ids, act, act_row, weights, out_width: int, out_block: int, interpret: bool, name: str):
    """One `pallas_call` over (pairs, out_width / out_block): a program gets its pair's id, the activation row
    `act[act_row(p)]` and the whole weight stacks (the id picks the expert inside), and writes `out_block` columns
    of the pair's output row `[pairs, out_width]` in act's dtype."""
    pairs = flat_ids.shape[0]
    whole = [pl.BlockSpec(w.shape, lambda p, c, ndim=w.ndim: (0,) * ndim) for w in weights]
    return pl.pallas_call(
        kernel,
        grid=(pairs, out_width // out_block),
        in_specs=[pl.BlockSpec((1,), lambda p, c: (p,)),
                  pl.BlockSpec((None, act.shape[1]), lambda p, c: (act_row(p), 0)), *whole],
        out_specs=pl.BlockSpec((None, out_block), lambda p, c: (p, c)),
        out_shape=jax.ShapeDtypeStruct((pairs, out_width), act.dtype),
        compiler_params=_TRITON,
        interpret=interpret,
        name=name,
    )(flat_ids, act, *weights)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def _routed_gemv(x, ids, weights, gate, up, down, *, block: int, interpret: bool):
    n, hidden = x.shape
    top_k = ids.shape[1]
    num_experts, _, inter = gate.shape
    block_d, block_i = _block(hidden, block), _block(inter, block)
    flat_ids = ids.reshape(n * top_k)
    h = _pair_gemv(functools.partial(_swiglu_kernel, block_d=block_d, block_i=block_i, hidden=hidden,
                                     num_experts=num_experts),
                   flat_ids, x, lambda p: p // top_k, (gate, up), inter, block_i, interpret, "routed_swiglu_gemv")
    per_pair = _pair_gemv(functools.partial(_down_kernel, block_i=block_i, inter=inter, num_experts=num_experts),
                          flat_ids, h, lambda p: p, (down,), hidden, block_d, interpret, "routed_down_gemv")
    live = jnp.where(ids < num_experts, weights.astype(jnp.float32), 0.0)
    y = jnp.einsum("nkd,nk->nd", per_pair.reshape(n, top_k, hidden).astype(jnp.float32), live)
    return y.astype(x.dtype)


def routed_experts_gemv(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array, *,
                        block: int = DEFAULT_BLOCK, interpret: bool | None = None) -> Array:
    """The routed experts of a MoE layer for few tokens: x [N, D], ids int32 [N, k], weights float32 [N, k], gate
    and up [E, D, I], down [E, I, D] -> y [N, D] in x's dtype (see the module docstring). Same result as
    `grouped_matmul.moe_experts`. `block`: the largest weight-tile side (a power of two >= 16); `interpret=None`:
    Pallas on a GPU, interpret mode elsewhere."""
    if x.ndim != 2 or ids.ndim != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"routed_experts_gemv: x [N, D], ids and weights [N, k]; got {x.shape}, {ids.shape}, "
                         f"{weights.shape}")
    e, d, i = gate.shape
    if x.shape[1] != d or up.shape != gate.shape or down.shape != (e, i, d):
        raise ValueError(f"routed_experts_gemv: x {x.shape}, gate {gate.shape}, up {up.shape}, down {down.shape} "
                         "disagree")
    if not supports(d, i):
        raise ValueError(f"routed_experts_gemv: hidden {d} and expert width {i} must be multiples of 16")
    if block < 16 or block & (block - 1):
        raise ValueError(f"routed_experts_gemv: block must be a power of two >= 16, got {block}")
    if x.shape[0] == 0:
        return jnp.zeros_like(x)
    dt = x.dtype
    return _routed_gemv(x, ids.astype(jnp.int32), weights, gate.astype(dt), up.astype(dt), down.astype(dt),
                        block=block, interpret=resolve_interpret(interpret))
