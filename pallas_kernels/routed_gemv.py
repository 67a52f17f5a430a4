"""The routed experts of a MoE layer for a few tokens (decode), as two matrix-vector kernels that index the
expert axis by the routing ids.

`moe_experts` plans padded, expert-sorted row tiles and runs grouped GEMMs over them. For a decode step's handful of
tokens that plan and its gathers, scatters and 64-row tiles are mostly overhead: each routed (token, expert) pair is
one vector times one expert's matrices. Here a program reads its pair's expert id and streams a slice of that
expert's weights once:

- `_swiglu_kernel`, grid (pairs, I / block_i, splits_d): the float32 partial sums of `x[t] @ gate[e]` and
  `x[t] @ up[e]` over the split's rows of D, with `t = p // k` and `e = ids[p]`;
- `_down_kernel`, grid (pairs, D / block_d, splits_i): `h[p] = silu(g) * u` from the summed partials (rounded to
  x's dtype, as `moe_experts` stores it), then the float32 partial sum of `h[p] @ down[e]` over the split's rows of
  I; then `y[t] = sum_j w[t, j] * o[t k + j]` in float32, `o` the summed partials rounded to x's dtype (one small
  XLA product: the pairs are in token order, no scatter).

Splitting the reduction axis is what makes this fast at one token: 4 pairs x 24 column blocks are 96 programs, under
one per SM on an H100, each walking 32 weight tiles one after the other, so few bytes are in flight. The splits
multiply the programs and shorten each one's walk (`default_splits`).

Only the routed experts' weights are read, as in `moe_experts`, and the results are the same products (float32
reference in the tests). An id equal to E (no expert) adds nothing. The experts a token shares with another token
are read once per token, so this serves few tokens; `moe_experts` serves the rest.

Shapes: x [N, D], ids int32 [N, k], weights float32 [N, k], gate and up [E, D, I], down [E, I, D] -> y [N, D].

With `layer`, gate, up and down are stacks of every layer's experts (`[L, E, D, I]`, `[L, E, I, D]`) and the
kernels read layer `layer`'s experts where they lie: a layer's `[E, D, I]` slice given to a Triton kernel inside the
model's layer scan is copied out of the stack first (1.2 GB a layer at 30B dims, BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels._platform import num_sms, resolve_interpret
from pallas_kernels._util import checked_layer

Array = jax.Array

DEFAULT_BLOCK = 64  # features a step on each side of a weight tile: [64, 64] keeps 128-byte rows, many programs
# Triton, not Mosaic GPU: these are plain loads and reductions, and the Triton lowering has an interpreter.
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=3)


def tile_size(dim: int, largest: int = DEFAULT_BLOCK) -> int | None:
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
    return tile_size(hidden) is not None and tile_size(inter) is not None


def default_splits(programs: int, blocks: int, sms: int | None = None) -> int:
    """Splits of a reduction of `blocks` weight tiles for a grid of `programs` (pair, column block) programs: the
    smallest power of two that gives at least two programs per SM, keeping >= 2 tiles per split and dividing
    `blocks` (1 when none does)."""
    target = 2 * (num_sms() if sms is None else sms)
    splits = 1
    while programs * splits < target and blocks % (2 * splits) == 0 and blocks // (2 * splits) >= 2:
        splits *= 2
    return splits


def _expert_row(layer_ref, ids_ref, num_experts: int):
    """The pair's expert's row in the [L E, ...] view of the stacks: layer E + id, id E (no expert) read as E - 1
    (the combine drops it)."""
    return jnp.minimum(ids_ref[0], num_experts - 1) + layer_ref[0] * num_experts


def _expert_refs(refs, layer_ref, ids_ref, num_experts: int, routed_pairs: int | None, outputs: int):
    """Splits a kernel's refs into (the pair's weight refs and their row, the outputs) for `lax.cond`: the routed
    stacks [L E, ...] at `_expert_row`, or for a pair past `routed_pairs` (the shared expert's, one per token) the
    shared stacks [L, ...] at the layer. Returns (branches, outputs), each branch a (weight refs, row) pair."""
    n_weights = (len(refs) - outputs) // (1 if routed_pairs is None else 2)
    routed = (refs[:n_weights], _expert_row(layer_ref, ids_ref, num_experts))
    if routed_pairs is None:
        return [routed], refs[n_weights:]
    return [routed, (refs[n_weights:2 * n_weights], layer_ref[0])], refs[2 * n_weights:]


def _run_pair(branches, routed_pairs: int | None, walk):
    """`walk(weight refs, row)` on the pair's weights: routed, or shared past `routed_pairs`."""
    if routed_pairs is None:
        walk(*branches[0])
    else:
        lax.cond(pl.program_id(0) < routed_pairs, lambda: walk(*branches[0]), lambda: walk(*branches[1]))


def _swiglu_kernel(layer_ref, ids_ref, x_ref, *refs, block_d: int, steps: int, num_experts: int,
                   routed_pairs: int | None):
    """One (pair, column block, split of D): layer_ref [1], ids_ref [1] (the pair's expert id), x_ref [D] (the
    pair's token), refs = gate and up [L E, D, I] (then the shared expert's [L, D, I] with `routed_pairs`), then
    g_ref, u_ref [block_i] float32, the split's partial products. The tiles accumulate elementwise and are reduced
    once at the end, so no step waits on a cross-thread reduction."""
    branches, (g_ref, u_ref) = _expert_refs(refs, layer_ref, ids_ref, num_experts, routed_pairs, 2)
    block_i = g_ref.shape[0]
    cols = pl.ds(pl.program_id(1) * block_i, block_i)
    first = pl.program_id(2) * steps * block_d

    def walk(weights, row):
        gate_ref, up_ref = weights

        def body(s, acc):
            g_acc, u_acc = acc
            rows = pl.ds(first + s * block_d, block_d)
            xv = x_ref[rows].astype(jnp.float32)[:, None]
            return (g_acc + xv * gate_ref[row, rows, cols].astype(jnp.float32),
                    u_acc + xv * up_ref[row, rows, cols].astype(jnp.float32))

        zeros = jnp.zeros((block_d, block_i), jnp.float32)
        g, u = lax.fori_loop(0, steps, body, (zeros, zeros))
        g_ref[...] = jnp.sum(g, axis=0)
        u_ref[...] = jnp.sum(u, axis=0)

    _run_pair(branches, routed_pairs, walk)


def _down_kernel(layer_ref, ids_ref, g_ref, u_ref, *refs, block_i: int, steps: int, h_dtype, num_experts: int,
                 routed_pairs: int | None):
    """One (pair, column block, split of I): layer_ref [1], ids_ref [1], g_ref and u_ref [splits_d, I] (the pair's
    partials), refs = down [L E, I, D] (then the shared expert's [L, I, D] with `routed_pairs`), then o_ref
    [block_d] float32, the split's partial of the pair's expert output."""
    branches, (o_ref,) = _expert_refs(refs, layer_ref, ids_ref, num_experts, routed_pairs, 1)
    block_d = o_ref.shape[0]
    cols = pl.ds(pl.program_id(1) * block_d, block_d)
    first = pl.program_id(2) * steps * block_i

    def walk(weights, row):
        (down_ref,) = weights

        def body(s, acc):
            rows = pl.ds(first + s * block_i, block_i)
            g = jnp.sum(g_ref[:, rows], axis=0)
            h = (g * jnp.sum(u_ref[:, rows], axis=0) / (1.0 + jnp.exp(-g))).astype(h_dtype).astype(jnp.float32)
            return acc + h[:, None] * down_ref[row, rows, cols].astype(jnp.float32)

        out = lax.fori_loop(0, steps, body, jnp.zeros((block_i, block_d), jnp.float32))
        o_ref[...] = jnp.sum(out, axis=0)

    _run_pair(branches, routed_pairs, walk)


def _pair_gemv(kernel, layer, flat_ids, pairs: int, acts, act_row, weights, out_width: int, out_block: int,
               splits: int, outputs: int, interpret: bool, name: str):
    """One `pallas_call` over (pairs, out_width / out_block, splits): a program gets the layer, its pair's id (the
    shared expert's pairs, past the ids, get the last), the pair's rows of each activation in `acts`
    (`act[act_row(p)]`, whole) and the whole weight stacks (the kernel picks the expert inside), and writes
    `out_block` float32 columns of its split's partial in each of `outputs` arrays `[pairs, splits, out_width]`."""
    last_id = flat_ids.shape[0] - 1
    whole = [pl.BlockSpec(w.shape, lambda p, c, s, ndim=w.ndim: (0,) * ndim) for w in weights]
    act_specs = [pl.BlockSpec((None, *a.shape[1:]), lambda p, c, s, nd=a.ndim: (act_row(p),) + (0,) * (nd - 1))
                 for a in acts]
    out_spec = pl.BlockSpec((None, None, out_block), lambda p, c, s: (p, s, c))
    out_shape = jax.ShapeDtypeStruct((pairs, splits, out_width), jnp.float32)
    return pl.pallas_call(
        kernel,
        grid=(pairs, out_width // out_block, splits),
        in_specs=[pl.BlockSpec((1,), lambda p, c, s: (0,)),
                  pl.BlockSpec((1,), lambda p, c, s: (jnp.minimum(p, last_id),)), *act_specs, *whole],
        out_specs=[out_spec] * outputs,
        out_shape=[out_shape] * outputs,
        compiler_params=_TRITON,
        interpret=interpret,
        name=name,
    )(layer, flat_ids, *acts, *weights)


@functools.partial(jax.jit, static_argnames=("block", "splits", "interpret"))
def _routed_gemv(x, ids, weights, gate, up, down, shared, layer, *, block: int, splits: tuple[int, int],
                 interpret: bool):
    """As `routed_experts_gemv`, with stacks gate, up [L, E, D, I], down [L, E, I, D], the shared expert's stacks
    ([L, D, I], [L, D, I], [L, I, D]) or (), and layer int32 scalar."""
    n, hidden = x.shape
    top_k = ids.shape[1]
    num_experts, inter = gate.shape[1], gate.shape[3]
    block_d, block_i = tile_size(hidden, block), tile_size(inter, block)
    split_d, split_i = splits
    # The layers' experts side by side, [L E, ...] (a free view); the kernels find the pair's row (`_expert_row`).
    gate, up, down = (w.reshape(-1, *w.shape[2:]) for w in (gate, up, down))
    routed = n * top_k
    # The shared expert's pairs, one per token, follow the routed ones.
    pairs, routed_pairs = (routed + n, routed) if shared else (routed, None)
    flat_ids, layer = ids.reshape(routed), layer.reshape(1)
    shared_gate_up, shared_down = tuple(shared[:2]), tuple(shared[2:])
    g, u = _pair_gemv(functools.partial(_swiglu_kernel, block_d=block_d, steps=hidden // block_d // split_d,
                                        num_experts=num_experts, routed_pairs=routed_pairs),
                      layer, flat_ids, pairs, [x], lambda p: jnp.where(p < routed, p // top_k, p - routed),
                      (gate, up) + shared_gate_up, inter, block_i, split_d, 2, interpret, "routed_swiglu_gemv")
    (partials,) = _pair_gemv(functools.partial(_down_kernel, block_i=block_i, steps=inter // block_i // split_i,
                                               h_dtype=x.dtype, num_experts=num_experts, routed_pairs=routed_pairs),
                             layer, flat_ids, pairs, [g, u], lambda p: p, (down,) + shared_down, hidden, block_d,
                             split_i, 1, interpret, "routed_down_gemv")
    per_pair = partials.sum(axis=1).astype(x.dtype).astype(jnp.float32)  # each expert's output rounded, as grouped
    live = jnp.where(ids < num_experts, weights.astype(jnp.float32), 0.0)
    y = jnp.einsum("nkd,nk->nd", per_pair[:routed].reshape(n, top_k, hidden), live)
    if shared:
        y = y + per_pair[routed:]
    return y.astype(x.dtype)


def routed_experts_gemv(x: Array, ids: Array, weights: Array, gate: Array, up: Array, down: Array, *,
                        shared: tuple[Array, Array, Array] | None = None, layer: Array | int | None = None,
                        block: int = DEFAULT_BLOCK, splits: tuple[int, int] | None = None,
                        interpret: bool | None = None) -> Array:
    """The routed experts of a MoE layer for few tokens: x [N, D], ids int32 [N, k], weights float32 [N, k], gate
    and up [E, D, I], down [E, I, D] -> y [N, D] in x's dtype (see the module docstring). Same result as
    `grouped_matmul.moe_experts`.

    `shared`: a shared expert's (gate [D, I], up [D, I], down [I, D]) of the same width I, run as one more pair per
    token in the same two launches and added to y with weight 1 (its output rounded to x's dtype, as each routed
    expert's). `layer`: with it, gate, up and down (and the shared expert's) are every layer's stacks
    [L, E, D, I], [L, E, I, D] ([L, D, I], [L, I, D]), in x's dtype, and layer `layer` (int32 scalar, may be traced)
    is read in place. `block`: the largest weight-tile side (a power of two >= 16); `splits`: how many programs share
    the reduction over D (gate/up) and over I (down), each a power of two dividing that axis's tile count (None:
    `default_splits` for this GPU); `interpret=None`: Pallas on a GPU, interpret mode elsewhere."""
    if x.ndim != 2 or ids.ndim != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"routed_experts_gemv: x [N, D], ids and weights [N, k]; got {x.shape}, {ids.shape}, "
                         f"{weights.shape}")
    stacked = layer is not None
    if gate.ndim != 3 + stacked:
        want = "[L, E, D, I] stacks (with layer)" if stacked else "[E, D, I]"
        raise ValueError(f"routed_experts_gemv: gate must be {want}, got {gate.shape}")
    if not stacked:
        gate, up, down = gate[None], up[None], down[None]
        shared = None if shared is None else tuple(w[None] for w in shared)
    depth, e, d, i = gate.shape
    if x.shape[1] != d or up.shape != gate.shape or down.shape != (depth, e, i, d):
        raise ValueError(f"routed_experts_gemv: x {x.shape}, gate {gate.shape}, up {up.shape}, down {down.shape} "
                         "disagree")
    shared = () if shared is None else tuple(shared)
    if shared and (len(shared) != 3 or [w.shape for w in shared] != [(depth, d, i), (depth, d, i), (depth, i, d)]):
        raise ValueError(f"routed_experts_gemv: the shared expert must be gate, up [D, I] and down [I, D] of the "
                         f"routed width (as [L, ...] stacks with layer), got {[w.shape for w in shared]}")
    if stacked and any(w.dtype != x.dtype for w in (gate, up, down, *shared)):
        raise ValueError(f"routed_experts_gemv: stacks read in place must be in x's dtype {x.dtype}, got "
                         f"{[str(w.dtype) for w in (gate, up, down, *shared)]}")
    layer = checked_layer(0 if layer is None else layer, depth, "routed_experts_gemv")
    if not supports(d, i):
        raise ValueError(f"routed_experts_gemv: hidden {d} and expert width {i} must be multiples of 16")
    if block < 16 or block & (block - 1):
        raise ValueError(f"routed_experts_gemv: block must be a power of two >= 16, got {block}")
    tiles_d, tiles_i = d // tile_size(d, block), i // tile_size(i, block)
    if splits is None:
        pairs = ids.shape[0] * (ids.shape[1] + bool(shared))
        splits = (default_splits(pairs * tiles_i, tiles_d), default_splits(pairs * tiles_d, tiles_i))
    splits = tuple(int(v) for v in splits)
    if len(splits) != 2 or any(v < 1 or v & (v - 1) for v in splits) or tiles_d % splits[0] or tiles_i % splits[1]:
        raise ValueError(f"routed_experts_gemv: splits must be two powers of two dividing the {tiles_d} tiles of D "
                         f"and the {tiles_i} tiles of I, got {splits}")
    if x.shape[0] == 0:
        return jnp.zeros_like(x)
    dt = x.dtype
    return _routed_gemv(x, ids.astype(jnp.int32), weights, gate.astype(dt), up.astype(dt), down.astype(dt),
                        tuple(w.astype(dt) for w in shared), layer, block=block, splits=splits,
                        interpret=resolve_interpret(interpret))
